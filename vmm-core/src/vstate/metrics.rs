//! vCPU exit counters of one VM (Firecracker style: plain atomics shared by `Arc` between the
//! vCPU threads, bumped with `Relaxed` ordering on every exit, read at scrape time).

use std::sync::atomic::{AtomicU64, Ordering};

/// Why `KVM_RUN` returned, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    /// `KVM_EXIT_SHUTDOWN` (triple fault).
    Shutdown,
    FailEntry,
    InternalError,
    /// `KVM_EXIT_INTR`, or `KVM_RUN` interrupted (`EINTR`/`EAGAIN`, e.g. by the kick signal).
    Intr,
    /// Anything else (system events, unhandled exits).
    Other,
}

impl ExitReason {
    /// Every reason, in the order of [`VcpuExitSnapshot::exits`].
    pub const ALL: [ExitReason; 10] = [
        ExitReason::IoIn,
        ExitReason::IoOut,
        ExitReason::MmioRead,
        ExitReason::MmioWrite,
        ExitReason::Hlt,
        ExitReason::Shutdown,
        ExitReason::FailEntry,
        ExitReason::InternalError,
        ExitReason::Intr,
        ExitReason::Other,
    ];

    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::IoIn => "io_in",
            ExitReason::IoOut => "io_out",
            ExitReason::MmioRead => "mmio_read",
            ExitReason::MmioWrite => "mmio_write",
            ExitReason::Hlt => "hlt",
            ExitReason::Shutdown => "shutdown",
            ExitReason::FailEntry => "fail_entry",
            ExitReason::InternalError => "internal_error",
            ExitReason::Intr => "intr",
            ExitReason::Other => "other",
        }
    }
}

/// vCPU exit counters, all vCPUs of a VM together (shared, lock free).
#[derive(Debug, Default)]
pub struct VcpuMetrics {
    exits: [AtomicU64; 10],
}

/// A point-in-time copy of [`VcpuMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuExitSnapshot {
    /// Exits per reason, in the order of [`ExitReason::ALL`].
    pub exits: [u64; 10],
}

impl VcpuExitSnapshot {
    /// Exits of one reason.
    pub fn get(&self, r: ExitReason) -> u64 {
        self.exits[r as usize]
    }

    /// `(reason label, exits)` pairs, every reason.
    pub fn by_name(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ExitReason::ALL.iter().map(|r| (r.as_str(), self.get(*r)))
    }

    /// All exits.
    pub fn total(&self) -> u64 {
        self.exits.iter().sum()
    }
}

impl VcpuMetrics {
    /// Counts one exit.
    pub(crate) fn exit(&self, r: ExitReason) {
        self.exits[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Exits of one reason so far.
    pub fn exits(&self, r: ExitReason) -> u64 {
        self.exits[r as usize].load(Ordering::Relaxed)
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> VcpuExitSnapshot {
        let mut s = VcpuExitSnapshot::default();
        for r in ExitReason::ALL {
            s.exits[r as usize] = self.exits(r);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason() {
        let m = VcpuMetrics::default();
        m.exit(ExitReason::IoOut);
        m.exit(ExitReason::IoOut);
        m.exit(ExitReason::Hlt);
        let s = m.snapshot();
        assert_eq!(s.get(ExitReason::IoOut), 2);
        assert_eq!(s.get(ExitReason::Hlt), 1);
        assert_eq!(s.total(), 3);
        let names: Vec<_> = s.by_name().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "io_in", "io_out", "mmio_read", "mmio_write", "hlt", "shutdown", "fail_entry",
                "internal_error", "intr", "other"
            ]
        );
        for (i, r) in ExitReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
