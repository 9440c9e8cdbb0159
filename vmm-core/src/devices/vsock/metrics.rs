// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Counters of one vsock device (Firecracker style: plain atomics shared by `Arc`, bumped on
//! the hot path with `Relaxed` ordering, read at scrape time).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// vsock device counters (shared, lock free).
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Packets the guest put on the tx queue (guest to host), malformed ones excluded.
    pub tx_packets: AtomicU64,
    /// Payload bytes of those packets (headers excluded).
    pub tx_bytes: AtomicU64,
    /// Packets the device put on the rx queue (host to guest).
    pub rx_packets: AtomicU64,
    /// Payload bytes of those packets (headers excluded).
    pub rx_bytes: AtomicU64,
    /// Malformed descriptor chains on either queue.
    pub malformed_chains: AtomicU64,
    /// Times the rx rate limiter held packets to the guest back (shared with the limiter).
    pub rx_throttled: Arc<AtomicU64>,
    /// Times the tx rate limiter held the guest's packets back (shared with the limiter).
    pub tx_throttled: Arc<AtomicU64>,
}

/// A point-in-time copy of [`VsockMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockSnapshot {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub malformed_chains: u64,
    pub rx_throttled: u64,
    pub tx_throttled: u64,
}

impl VsockMetrics {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Reads every counter (each one atomically; the set is not one transaction).
    pub fn snapshot(&self) -> VsockSnapshot {
        VsockSnapshot {
            tx_packets: Self::get(&self.tx_packets),
            tx_bytes: Self::get(&self.tx_bytes),
            rx_packets: Self::get(&self.rx_packets),
            rx_bytes: Self::get(&self.rx_bytes),
            malformed_chains: Self::get(&self.malformed_chains),
            rx_throttled: Self::get(&self.rx_throttled),
            tx_throttled: Self::get(&self.tx_throttled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_and_snapshots() {
        let m = VsockMetrics::default();
        VsockMetrics::add(&m.tx_packets, 1);
        VsockMetrics::add(&m.tx_bytes, 100);
        VsockMetrics::add(&m.tx_bytes, 20);
        VsockMetrics::add(&m.malformed_chains, 1);
        assert_eq!(
            m.snapshot(),
            VsockSnapshot {
                tx_packets: 1,
                tx_bytes: 120,
                rx_packets: 0,
                rx_bytes: 0,
                malformed_chains: 1,
                rx_throttled: 0,
                tx_throttled: 0,
            }
        );
    }
}
