// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Counters of one virtio-mmio transport.

use std::sync::atomic::{AtomicU64, Ordering};

/// Transport counters (shared, lock free).
#[derive(Debug, Default)]
pub struct TransportMetrics {
    /// Queue notifications handled (ioeventfd or trapped QueueNotify writes).
    pub queue_notifications: AtomicU64,
    /// QueueNotify writes that trapped to the bus handler (not caught by an ioeventfd).
    pub trapped_notifications: AtomicU64,
    /// Used-buffer interrupts raised.
    pub interrupts: AtomicU64,
    /// Device activations (DRIVER_OK accepted).
    pub activations: AtomicU64,
    /// Times the device entered DEVICE_NEEDS_RESET.
    pub device_errors: AtomicU64,
    /// Driver accesses that violated the spec and were ignored.
    pub bad_accesses: AtomicU64,
}

impl TransportMetrics {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        let m = TransportMetrics::default();
        TransportMetrics::inc(&m.interrupts);
        TransportMetrics::inc(&m.interrupts);
        assert_eq!(TransportMetrics::get(&m.interrupts), 2);
        assert_eq!(TransportMetrics::get(&m.device_errors), 0);
    }
}
