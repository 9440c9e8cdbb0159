// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Counters of one block device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
    /// Times the rate limiter held requests back (shared with the limiter).
    pub throttled: Arc<AtomicU64>,
}

/// A point-in-time copy of [`BlockMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockSnapshot {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flush_ops: u64,
    pub get_id_ops: u64,
    pub invalid_chains: u64,
    pub io_errors: u64,
    pub unsupported: u64,
    pub throttled: u64,
}

impl BlockSnapshot {
    /// Adds `o` (several disks of one VM, summed).
    pub fn add(&mut self, o: &BlockSnapshot) {
        self.read_ops += o.read_ops;
        self.read_bytes += o.read_bytes;
        self.write_ops += o.write_ops;
        self.write_bytes += o.write_bytes;
        self.flush_ops += o.flush_ops;
        self.get_id_ops += o.get_id_ops;
        self.invalid_chains += o.invalid_chains;
        self.io_errors += o.io_errors;
        self.unsupported += o.unsupported;
        self.throttled += o.throttled;
    }
}

impl BlockMetrics {
    /// Reads every counter.
    pub fn snapshot(&self) -> BlockSnapshot {
        BlockSnapshot {
            read_ops: Self::get(&self.read_ops),
            read_bytes: Self::get(&self.read_bytes),
            write_ops: Self::get(&self.write_ops),
            write_bytes: Self::get(&self.write_bytes),
            flush_ops: Self::get(&self.flush_ops),
            get_id_ops: Self::get(&self.get_id_ops),
            invalid_chains: Self::get(&self.invalid_chains),
            io_errors: Self::get(&self.io_errors),
            unsupported: Self::get(&self.unsupported),
            throttled: Self::get(&self.throttled),
        }
    }

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
        BlockMetrics::add(&m.invalid_chains, 1);
        let mut s = m.snapshot();
        assert_eq!((s.read_bytes, s.invalid_chains, s.write_ops), (1024, 1, 0));
        s.add(&m.snapshot());
        assert_eq!((s.read_bytes, s.invalid_chains), (2048, 2));
    }
}
