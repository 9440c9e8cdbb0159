// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Counters of one block device.

use std::sync::atomic::{AtomicU64, Ordering};

/// Block device counters (shared, lock free).
#[derive(Debug, Default)]
pub struct BlockMetrics {
    pub read_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_ops: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_ops: AtomicU64,
    pub get_id_ops: AtomicU64,
    /// Malformed descriptor chains (used length 0).
    pub invalid_chains: AtomicU64,
    /// Requests answered with `VIRTIO_BLK_S_IOERR` (bounds, read-only, host I/O errors).
    pub io_errors: AtomicU64,
    /// Requests answered with `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported: AtomicU64,
}

impl BlockMetrics {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
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
    fn adds() {
        let m = BlockMetrics::default();
        BlockMetrics::add(&m.read_bytes, 512);
        BlockMetrics::add(&m.read_bytes, 512);
        assert_eq!(BlockMetrics::get(&m.read_bytes), 1024);
    }
}
