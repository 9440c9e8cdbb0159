// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Counters of one virtio-fs device (plain atomics shared by `Arc`, `Relaxed`, read at scrape
//! time). FUSE requests are counted by a small, fixed set of opcode groups ([`FsOp`]) so that a
//! label built from them stays low-cardinality.

use std::sync::atomic::{AtomicU64, Ordering};

/// Opcode groups of counted FUSE requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsOp {
    Lookup,
    Getattr,
    Open,
    Read,
    Write,
    Readdir,
    Release,
    Forget,
    Other,
}

impl FsOp {
    /// Every group, in the order of [`FsSnapshot::ops`].
    pub const ALL: [FsOp; 9] = [
        FsOp::Lookup,
        FsOp::Getattr,
        FsOp::Open,
        FsOp::Read,
        FsOp::Write,
        FsOp::Readdir,
        FsOp::Release,
        FsOp::Forget,
        FsOp::Other,
    ];

    /// The group of a FUSE opcode (`fuse_in_header.opcode`).
    pub fn from_opcode(opcode: u32) -> FsOp {
        match opcode {
            1 => FsOp::Lookup,
            3 | 4 => FsOp::Getattr,                // GETATTR, SETATTR
            14 | 27 | 35 => FsOp::Open,            // OPEN, OPENDIR, CREATE
            15 => FsOp::Read,                      // READ
            16 => FsOp::Write,                     // WRITE
            28 | 44 => FsOp::Readdir,              // READDIR, READDIRPLUS
            18 | 25 | 29 => FsOp::Release,         // RELEASE, FLUSH, RELEASEDIR
            2 | 42 => FsOp::Forget,                // FORGET, BATCH_FORGET
            _ => FsOp::Other,
        }
    }

    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FsOp::Lookup => "lookup",
            FsOp::Getattr => "getattr",
            FsOp::Open => "open",
            FsOp::Read => "read",
            FsOp::Write => "write",
            FsOp::Readdir => "readdir",
            FsOp::Release => "release",
            FsOp::Forget => "forget",
            FsOp::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// virtio-fs device counters (shared, lock free).
#[derive(Debug, Default)]
pub struct FsMetrics {
    /// FUSE requests by [`FsOp`] group (indexed by `FsOp as usize`).
    ops: [AtomicU64; 9],
    /// Bytes the driver handed to the device (readable descriptors: requests and write data).
    pub bytes_from_guest: AtomicU64,
    /// Bytes the device wrote back (replies and read data: the used lengths).
    pub bytes_to_guest: AtomicU64,
    /// Requests that failed: malformed descriptor chains, undecodable FUSE messages, server panics.
    pub failed_requests: AtomicU64,
}

/// A point-in-time copy of [`FsMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsSnapshot {
    /// Requests per group, in the order of [`FsOp::ALL`].
    pub ops: [u64; 9],
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
    pub failed_requests: u64,
}

impl FsSnapshot {
    /// `(group label, requests)` pairs.
    pub fn ops_by_name(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        FsOp::ALL.iter().map(|op| (op.as_str(), self.ops[op.index()]))
    }
}

impl FsMetrics {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one request of group `op`.
    pub(crate) fn count_op(&self, op: FsOp) {
        Self::add(&self.ops[op.index()], 1);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Requests of group `op` so far.
    pub fn ops(&self, op: FsOp) -> u64 {
        Self::get(&self.ops[op.index()])
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> FsSnapshot {
        let mut ops = [0; 9];
        for op in FsOp::ALL {
            ops[op.index()] = self.ops(op);
        }
        FsSnapshot {
            ops,
            bytes_from_guest: Self::get(&self.bytes_from_guest),
            bytes_to_guest: Self::get(&self.bytes_to_guest),
            failed_requests: Self::get(&self.failed_requests),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcode_groups() {
        assert_eq!(FsOp::from_opcode(1), FsOp::Lookup);
        assert_eq!(FsOp::from_opcode(15), FsOp::Read);
        assert_eq!(FsOp::from_opcode(16), FsOp::Write);
        assert_eq!(FsOp::from_opcode(44), FsOp::Readdir);
        assert_eq!(FsOp::from_opcode(42), FsOp::Forget);
        assert_eq!(FsOp::from_opcode(26), FsOp::Other); // INIT
        assert_eq!(FsOp::from_opcode(u32::MAX), FsOp::Other);
        for (i, op) in FsOp::ALL.iter().enumerate() {
            assert_eq!(op.index(), i);
        }
    }

    #[test]
    fn counts_and_snapshots() {
        let m = FsMetrics::default();
        m.count_op(FsOp::Read);
        m.count_op(FsOp::Read);
        m.count_op(FsOp::Other);
        FsMetrics::add(&m.bytes_to_guest, 4096);
        let s = m.snapshot();
        assert_eq!(m.ops(FsOp::Read), 2);
        let by: Vec<_> = s.ops_by_name().filter(|(_, n)| *n > 0).collect();
        assert_eq!(by, vec![("read", 2), ("other", 1)]);
        assert_eq!((s.bytes_to_guest, s.bytes_from_guest, s.failed_requests), (4096, 0, 0));
    }
}
