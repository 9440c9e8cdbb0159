//! The VM's device and vCPU counters for a metrics scrape.
//!
//! The counters themselves live in `joey-vmm-core` (structs of atomics shared by `Arc`, bumped
//! by the device and vCPU threads); here they are only collected: the backends hand their
//! `Arc`s to the Hypervisor actor ([`VmCounterSources`], answered by [`GetVmCounters`]). The
//! virtio-fs counters come from the device the VM was given: the ShareFs actor's vhost-user
//! device (its metrics travel in [`super::VmSpec::share_fs`]) for QEMU, the in-process device
//! the built-in VMM built from that spec. Reading never blocks on a device thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use joey_observability::{DeviceCounters, HypervisorCounters};
use joey_vmm_core::devices::blk::{BlockMetrics, BlockSnapshot};
use joey_vmm_core::devices::fs::FsMetrics;
use joey_vmm_core::devices::net::{NetMetrics, NetSnapshot};
use joey_vmm_core::devices::vsock::VsockMetrics;
use joey_vmm_core::vstate::metrics::VcpuMetrics;

use super::HypervisorActor;

/// The counters of one running VM, as `Arc`s (cheap to clone, read at any time).
#[derive(Debug, Clone, Default)]
pub struct VmCounterSources {
    pub vsock: Option<Arc<VsockMetrics>>,
    /// The virtio-fs device (the ShareFs actor's vhost-user device, or the built-in VMM's).
    pub fs: Option<Arc<FsMetrics>>,
    pub blk: Vec<Arc<BlockMetrics>>,
    /// The VM's virtio-net devices (one per pod interface).
    pub net: Vec<Arc<NetMetrics>>,
    /// vCPU exits (built-in VMM only).
    pub vcpus: Option<Arc<VcpuMetrics>>,
    /// Bytes of guest console output the console log's cap dropped.
    pub console_dropped: Option<Arc<AtomicU64>>,
}

impl VmCounterSources {
    /// Reads every counter.
    pub fn read(&self) -> HypervisorCounters {
        let mut devices = Vec::new();
        if let Some(v) = &self.vsock {
            let s = v.snapshot();
            devices.push(DeviceCounters {
                device: "vsock",
                bytes: vec![("to_guest", s.rx_bytes), ("from_guest", s.tx_bytes)],
                operations: vec![("rx", s.rx_packets), ("tx", s.tx_packets)],
                errors: s.malformed_chains,
                dropped: Vec::new(),
                throttled: vec![("to_guest", s.rx_throttled), ("from_guest", s.tx_throttled)],
            });
        }
        if let Some(f) = &self.fs {
            let s = f.snapshot();
            devices.push(DeviceCounters {
                device: "fs",
                bytes: vec![("to_guest", s.bytes_to_guest), ("from_guest", s.bytes_from_guest)],
                operations: s.ops_by_name().collect(),
                errors: s.failed_requests,
                dropped: Vec::new(),
                throttled: Vec::new(),
            });
        }
        if !self.blk.is_empty() {
            // All disks of the VM together: the label set stays fixed.
            let mut s = BlockSnapshot::default();
            for b in &self.blk {
                s.add(&b.snapshot());
            }
            devices.push(DeviceCounters {
                device: "blk",
                bytes: vec![("to_guest", s.read_bytes), ("from_guest", s.write_bytes)],
                operations: vec![
                    ("read", s.read_ops),
                    ("write", s.write_ops),
                    ("flush", s.flush_ops),
                    ("get_id", s.get_id_ops),
                ],
                errors: s.invalid_chains + s.io_errors + s.unsupported,
                dropped: Vec::new(),
                throttled: vec![("both", s.throttled)],
            });
        }
        if !self.net.is_empty() {
            // All interfaces of the VM together: the label set stays fixed.
            let mut s = NetSnapshot::default();
            for n in &self.net {
                s.add(&n.snapshot());
            }
            devices.push(DeviceCounters {
                device: "net",
                bytes: vec![("to_guest", s.rx_bytes), ("from_guest", s.tx_bytes)],
                operations: vec![("rx", s.rx_packets), ("tx", s.tx_packets)],
                errors: s.rx_errors.saturating_add(s.tx_errors),
                dropped: vec![("to_guest", s.rx_dropped), ("from_guest", s.tx_dropped)],
                throttled: vec![("to_guest", s.rx_throttled), ("from_guest", s.tx_throttled)],
            });
        }
        let vcpu_exits = self
            .vcpus
            .as_ref()
            .map(|v| v.snapshot().by_name().collect())
            .unwrap_or_default();
        let console_dropped_bytes = self
            .console_dropped
            .as_ref()
            .map_or(0, |d| d.load(Ordering::Relaxed));
        HypervisorCounters {
            devices,
            vcpu_exits,
            console_dropped_bytes,
        }
    }
}

/// The counters of the running VM; `None` when no VM runs.
#[derive(Message)]
#[rtype(result = "Option<VmCounterSources>")]
pub struct GetVmCounters;

impl Handler<GetVmCounters> for HypervisorActor {
    type Result = MessageResult<GetVmCounters>;

    fn handle(&mut self, _: GetVmCounters, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.counter_sources())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_device_with_fixed_labels() {
        let vsock = Arc::new(VsockMetrics::default());
        vsock.rx_bytes.fetch_add(100, Ordering::Relaxed);
        vsock.tx_packets.fetch_add(3, Ordering::Relaxed);
        let b1 = Arc::new(BlockMetrics::default());
        let b2 = Arc::new(BlockMetrics::default());
        b1.read_bytes.fetch_add(512, Ordering::Relaxed);
        b2.read_bytes.fetch_add(1024, Ordering::Relaxed);
        b2.invalid_chains.fetch_add(1, Ordering::Relaxed);
        b1.io_errors.fetch_add(1, Ordering::Relaxed);
        let fs = Arc::new(FsMetrics::default());
        fs.bytes_to_guest.fetch_add(4096, Ordering::Relaxed);
        fs.failed_requests.fetch_add(2, Ordering::Relaxed);
        let n1 = Arc::new(NetMetrics::default());
        let n2 = Arc::new(NetMetrics::default());
        n1.rx_bytes.fetch_add(1514, Ordering::Relaxed);
        n2.rx_bytes.fetch_add(60, Ordering::Relaxed);
        n1.tx_packets.fetch_add(4, Ordering::Relaxed);
        n2.rx_dropped.fetch_add(2, Ordering::Relaxed);
        n1.tx_errors.fetch_add(1, Ordering::Relaxed);
        n2.rx_errors.fetch_add(1, Ordering::Relaxed);
        n1.tx_throttled.fetch_add(5, Ordering::Relaxed);
        n2.tx_throttled.fetch_add(1, Ordering::Relaxed);
        vsock.tx_throttled.fetch_add(2, Ordering::Relaxed);
        b2.throttled.fetch_add(3, Ordering::Relaxed);
        let src = VmCounterSources {
            vsock: Some(vsock),
            fs: Some(fs),
            blk: vec![b1, b2],
            net: vec![n1, n2],
            vcpus: Some(Arc::new(VcpuMetrics::default())),
            console_dropped: Some(Arc::new(AtomicU64::new(7))),
        };
        let c = src.read();
        let names: Vec<_> = c.devices.iter().map(|d| d.device).collect();
        assert_eq!(names, ["vsock", "fs", "blk", "net"]);
        assert_eq!(c.devices[3].bytes, vec![("to_guest", 1574), ("from_guest", 0)]);
        assert_eq!(c.devices[3].operations, vec![("rx", 0), ("tx", 4)]);
        assert_eq!(c.devices[3].errors, 2);
        assert_eq!(c.devices[3].dropped, vec![("to_guest", 2), ("from_guest", 0)]);
        assert!(c.devices[..3].iter().all(|d| d.dropped.is_empty()));
        assert_eq!(c.devices[0].bytes, vec![("to_guest", 100), ("from_guest", 0)]);
        assert_eq!(c.devices[0].operations, vec![("rx", 0), ("tx", 3)]);
        assert_eq!(c.devices[1].bytes, vec![("to_guest", 4096), ("from_guest", 0)]);
        assert_eq!(c.devices[1].operations.len(), 9);
        assert_eq!(c.devices[1].errors, 2);
        assert_eq!(c.devices[2].bytes, vec![("to_guest", 1536), ("from_guest", 0)]);
        assert_eq!(c.devices[2].errors, 2);
        assert_eq!(c.devices[0].throttled, vec![("to_guest", 0), ("from_guest", 2)]);
        assert!(c.devices[1].throttled.is_empty());
        assert_eq!(c.devices[2].throttled, vec![("both", 3)]);
        assert_eq!(c.devices[3].throttled, vec![("to_guest", 0), ("from_guest", 6)]);
        assert_eq!(c.vcpu_exits.len(), 10);
        assert!(c.vcpu_exits.iter().all(|(_, n)| *n == 0));
        assert_eq!(c.console_dropped_bytes, 7);
        // No devices, no vCPUs (QEMU before its vsock started): nothing.
        assert_eq!(VmCounterSources::default().read(), HypervisorCounters::default());
    }
}
