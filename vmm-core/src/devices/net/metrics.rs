// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Counters of one virtio-net device (plain atomics shared by `Arc`, `Relaxed`, read at scrape
//! time). "rx" is host → guest (tap → rx queue), "tx" guest → host (tx queue → tap); bytes are
//! Ethernet frame bytes, without the virtio-net header.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// virtio-net device counters (shared, lock free).
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Bytes of the frames delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Frames the guest sent that reached the tap.
    pub tx_packets: AtomicU64,
    /// Bytes of the frames that reached the tap.
    pub tx_bytes: AtomicU64,
    /// Malformed rx descriptor chains and tap read errors.
    pub rx_errors: AtomicU64,
    /// Malformed tx descriptor chains and tap write errors.
    pub tx_errors: AtomicU64,
    /// Frames from the tap dropped: larger than the guest's rx buffer, or pending at a reset.
    pub rx_dropped: AtomicU64,
    /// Frames from the guest the tap could not take (`EAGAIN`).
    pub tx_dropped: AtomicU64,
    /// Times the rx rate limiter held frames back (shared with the limiter).
    pub rx_throttled: Arc<AtomicU64>,
    /// Times the tx rate limiter held the guest's frames back (shared with the limiter).
    pub tx_throttled: Arc<AtomicU64>,
}

/// A point-in-time copy of [`NetMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub rx_throttled: u64,
    pub tx_throttled: u64,
}

impl NetSnapshot {
    /// Adds `o` (the interfaces of one VM summed up, so that a label set stays fixed).
    pub fn add(&mut self, o: &NetSnapshot) {
        let sum = |a: &mut u64, b: u64| *a = a.saturating_add(b);
        sum(&mut self.rx_packets, o.rx_packets);
        sum(&mut self.rx_bytes, o.rx_bytes);
        sum(&mut self.tx_packets, o.tx_packets);
        sum(&mut self.tx_bytes, o.tx_bytes);
        sum(&mut self.rx_errors, o.rx_errors);
        sum(&mut self.tx_errors, o.tx_errors);
        sum(&mut self.rx_dropped, o.rx_dropped);
        sum(&mut self.tx_dropped, o.tx_dropped);
        sum(&mut self.rx_throttled, o.rx_throttled);
        sum(&mut self.tx_throttled, o.tx_throttled);
    }

    /// `(name, value)` pairs, e.g. for one labelled counter family per direction.
    pub fn by_name(&self) -> [(&'static str, u64); 8] {
        [
            ("rx_packets", self.rx_packets),
            ("rx_bytes", self.rx_bytes),
            ("tx_packets", self.tx_packets),
            ("tx_bytes", self.tx_bytes),
            ("rx_errors", self.rx_errors),
            ("tx_errors", self.tx_errors),
            ("rx_dropped", self.rx_dropped),
            ("tx_dropped", self.tx_dropped),
        ]
    }
}

impl NetMetrics {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> NetSnapshot {
        NetSnapshot {
            rx_packets: Self::get(&self.rx_packets),
            rx_bytes: Self::get(&self.rx_bytes),
            tx_packets: Self::get(&self.tx_packets),
            tx_bytes: Self::get(&self.tx_bytes),
            rx_errors: Self::get(&self.rx_errors),
            tx_errors: Self::get(&self.tx_errors),
            rx_dropped: Self::get(&self.rx_dropped),
            tx_dropped: Self::get(&self.tx_dropped),
            rx_throttled: Self::get(&self.rx_throttled),
            tx_throttled: Self::get(&self.tx_throttled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_snapshots() {
        let m = NetMetrics::default();
        NetMetrics::add(&m.rx_packets, 2);
        NetMetrics::add(&m.rx_bytes, 1500);
        NetMetrics::add(&m.tx_dropped, 1);
        let s = m.snapshot();
        assert_eq!((s.rx_packets, s.rx_bytes, s.tx_dropped), (2, 1500, 1));
        assert_eq!((s.tx_packets, s.tx_bytes, s.rx_errors), (0, 0, 0));
        let nonzero: Vec<_> = s.by_name().into_iter().filter(|(_, v)| *v > 0).collect();
        assert_eq!(
            nonzero,
            vec![("rx_packets", 2), ("rx_bytes", 1500), ("tx_dropped", 1)]
        );
        let mut total = s;
        total.add(&NetSnapshot {
            tx_packets: 3,
            rx_packets: u64::MAX,
            ..Default::default()
        });
        assert_eq!(
            (total.rx_packets, total.tx_packets, total.rx_bytes),
            (u64::MAX, 3, 1500)
        );
    }
}
