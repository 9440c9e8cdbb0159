//! virtio-mmio devices of the built-in VMM: creation from the [`VmConfig`](super::VmConfig),
//! placement in the MMIO gap (one window and one GSI each), wiring to KVM (irqfd, one
//! ioeventfd per queue on QueueNotify with datamatch = queue index), the kernel command line
//! entries, and the device event loop thread.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::boot::layout::{
    MAX_VIRTIO_DEVICES, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::devices::blk::{Block, BlockConfig, BlockError, BlockMetrics};
use crate::devices::fs::{FsMetrics, VirtioFs, VirtioFsConfig, VirtioFsError};
use crate::devices::net::{NetAttachment, NetError, NetMetrics, VirtioNet};
use crate::devices::virtio::event_loop::{self, EventLoopError, EventLoopHandle, SharedTransport};
use crate::vmm::event::EventSender;
use crate::devices::virtio::metrics::TransportMetrics;
use crate::devices::virtio::mmio::QUEUE_NOTIFY_OFFSET;
use crate::devices::virtio::{MmioTransport, VirtioDevice, VirtioError};
use crate::devices::vsock::{
    DeviceError as VsockDeviceError, VirtioVsock, VsockConfig, VsockMetrics,
};
use crate::vmm::bus::{Bus, BusError};

/// Errors setting up the virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioDevicesError {
    #[error("{0} virtio devices requested, at most {MAX_VIRTIO_DEVICES} supported")]
    TooManyDevices(usize),
    #[error("vsock device: {0}")]
    Vsock(#[from] VsockDeviceError),
    #[error("virtio-fs device: {0}")]
    Fs(#[from] VirtioFsError),
    #[error("network device {index}: {source}")]
    Net {
        index: usize,
        #[source]
        source: NetError,
    },
    #[error("block device {index}: {source}")]
    Block {
        index: usize,
        #[source]
        source: BlockError,
    },
    #[error("virtio transport: {0}")]
    Transport(#[from] VirtioError),
    #[error("KVM_IRQFD for GSI {gsi}: {source}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IOEVENTFD at {addr:#x} for queue {queue}: {source}")]
    Ioeventfd {
        addr: u64,
        queue: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("MMIO bus: {0}")]
    Bus(#[from] BusError),
    #[error("device event loop: {0}")]
    EventLoop(#[from] EventLoopError),
}

/// Where a virtio-mmio device sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Virtio device id (1 = net, 2 = block, 19 = vsock, 26 = fs).
    pub device_type: u32,
    /// Guest physical base of its register window.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// GSI of its interrupt.
    pub irq: u32,
}

impl MmioDeviceInfo {
    /// Window and GSI of the `index`-th device.
    pub fn for_slot(index: usize, device_type: u32) -> Self {
        MmioDeviceInfo {
            device_type,
            base: VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
            size: VIRTIO_MMIO_SIZE,
            irq: VIRTIO_IRQ_BASE + index as u32,
        }
    }

    /// The Linux `virtio_mmio.device=<size>@<base>:<irq>` parameter declaring the device.
    pub fn cmdline_param(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.size >> 10,
            self.base,
            self.irq
        )
    }
}

/// Device models built from the configuration, not yet attached to a VM.
pub struct PendingDevices {
    devices: Vec<Box<dyn VirtioDevice>>,
    infos: Vec<MmioDeviceInfo>,
    block_metrics: Vec<Arc<BlockMetrics>>,
    net_metrics: Vec<Arc<NetMetrics>>,
    vsock_metrics: Option<Arc<VsockMetrics>>,
    fs_metrics: Option<Arc<FsMetrics>>,
}

/// Creates the configured devices: vsock first, then virtio-fs, then network devices, then
/// block devices, each kind in order.
pub fn create_devices(
    vsock: Option<&VsockConfig>,
    fs: Option<&VirtioFsConfig>,
    nets: &[NetAttachment],
    blocks: &[BlockConfig],
) -> Result<PendingDevices, VirtioDevicesError> {
    let n = usize::from(vsock.is_some()) + usize::from(fs.is_some()) + nets.len() + blocks.len();
    if n > MAX_VIRTIO_DEVICES {
        return Err(VirtioDevicesError::TooManyDevices(n));
    }
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::with_capacity(n);
    let mut block_metrics = Vec::new();
    let mut net_metrics = Vec::new();
    let mut vsock_metrics = None;
    let mut fs_metrics = None;
    if let Some(cfg) = vsock {
        let v = VirtioVsock::new(cfg)?;
        vsock_metrics = Some(v.device().metrics().clone());
        devices.push(Box::new(v));
    }
    if let Some(cfg) = fs {
        let f = VirtioFs::new(cfg)?;
        fs_metrics = Some(f.metrics().clone());
        devices.push(Box::new(f));
    }
    for (index, net) in nets.iter().enumerate() {
        let d = net
            .device_tap()
            .and_then(|tap| VirtioNet::new(net.config, tap))
            .map_err(|source| VirtioDevicesError::Net { index, source })?;
        net_metrics.push(d.metrics().clone());
        devices.push(Box::new(d));
    }
    for (index, cfg) in blocks.iter().enumerate() {
        let b = Block::new(cfg, &format!("joey-blk{index}"))
            .map_err(|source| VirtioDevicesError::Block { index, source })?;
        block_metrics.push(b.metrics().clone());
        devices.push(Box::new(b));
    }
    let infos = devices
        .iter()
        .enumerate()
        .map(|(i, d)| MmioDeviceInfo::for_slot(i, d.device_type()))
        .collect();
    Ok(PendingDevices {
        devices,
        infos,
        block_metrics,
        net_metrics,
        vsock_metrics,
        fs_metrics,
    })
}

impl PendingDevices {
    /// Where the devices will sit.
    pub fn infos(&self) -> &[MmioDeviceInfo] {
        &self.infos
    }

    /// `cmdline` with one `virtio_mmio.device=` parameter per device appended.
    pub fn extend_cmdline(&self, cmdline: &str) -> String {
        let mut s = cmdline.trim_end().to_string();
        for info in &self.infos {
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(&info.cmdline_param());
        }
        s
    }

    /// Wraps each device in a transport, wires its irqfd and ioeventfds and maps it on `mmio`.
    pub fn attach(
        self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        mmio: &mut Bus,
    ) -> Result<VirtioDevices, VirtioDevicesError> {
        let mut transports = Vec::with_capacity(self.devices.len());
        for (dev, info) in self.devices.into_iter().zip(&self.infos) {
            let t = MmioTransport::new(dev, mem.clone())?;
            register_eventfds(vm, &t, info)?;
            let shared: SharedTransport = Arc::new(Mutex::new(t));
            mmio.insert(shared.clone(), info.base, info.size)?;
            transports.push(shared);
        }
        Ok(VirtioDevices {
            infos: self.infos,
            transports,
            block_metrics: self.block_metrics,
            net_metrics: self.net_metrics,
            vsock_metrics: self.vsock_metrics,
            fs_metrics: self.fs_metrics,
            event_loop: None,
        })
    }
}

fn register_eventfds(
    vm: &VmFd,
    t: &MmioTransport,
    info: &MmioDeviceInfo,
) -> Result<(), VirtioDevicesError> {
    vm.register_irqfd(t.irq_evt(), info.irq)
        .map_err(|source| VirtioDevicesError::Irqfd {
            gsi: info.irq,
            source,
        })?;
    let addr = info.base + QUEUE_NOTIFY_OFFSET;
    for (queue, evt) in t.queue_evts().iter().enumerate() {
        vm.register_ioevent(evt, &IoEventAddress::Mmio(addr), queue as u32)
            .map_err(|source| VirtioDevicesError::Ioeventfd {
                addr,
                queue,
                source,
            })?;
        tracing::trace!(fd = evt.as_raw_fd(), addr, queue, "ioeventfd registered");
    }
    Ok(())
}

/// The attached virtio devices of a VM and their event loop.
pub struct VirtioDevices {
    infos: Vec<MmioDeviceInfo>,
    transports: Vec<SharedTransport>,
    block_metrics: Vec<Arc<BlockMetrics>>,
    net_metrics: Vec<Arc<NetMetrics>>,
    vsock_metrics: Option<Arc<VsockMetrics>>,
    fs_metrics: Option<Arc<FsMetrics>>,
    event_loop: Option<EventLoopHandle>,
}

impl std::fmt::Debug for VirtioDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioDevices")
            .field("infos", &self.infos)
            .field("running", &self.event_loop.is_some())
            .finish()
    }
}

impl VirtioDevices {
    /// Where the devices sit.
    pub fn infos(&self) -> &[MmioDeviceInfo] {
        &self.infos
    }

    /// Counters of the `index`-th block device.
    pub fn block_metrics(&self, index: usize) -> Option<&Arc<BlockMetrics>> {
        self.block_metrics.get(index)
    }

    /// Counters of the vsock device, if configured.
    pub fn vsock_metrics(&self) -> Option<&Arc<VsockMetrics>> {
        self.vsock_metrics.as_ref()
    }

    /// Counters of the virtio-fs device, if configured.
    pub fn fs_metrics(&self) -> Option<&Arc<FsMetrics>> {
        self.fs_metrics.as_ref()
    }

    /// Counters of every block device, in order.
    pub fn all_block_metrics(&self) -> &[Arc<BlockMetrics>] {
        &self.block_metrics
    }

    /// Counters of every network device, in order.
    pub fn all_net_metrics(&self) -> &[Arc<NetMetrics>] {
        &self.net_metrics
    }

    /// Transport counters of the `index`-th device.
    pub fn transport_metrics(&self, index: usize) -> Option<Arc<TransportMetrics>> {
        self.transports.get(index).map(|t| {
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .metrics()
                .clone()
        })
    }

    /// Device status register of the `index`-th device.
    pub fn status(&self, index: usize) -> Option<u32> {
        self.transports
            .get(index)
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).status())
    }

    /// Starts the device event loop (no-op without devices or when already running).
    /// A failed event loop is reported to `events`.
    pub fn start(&mut self, events: Option<EventSender>) -> Result<(), VirtioDevicesError> {
        if self.transports.is_empty() || self.event_loop.is_some() {
            return Ok(());
        }
        self.event_loop = Some(event_loop::spawn_reporting(self.transports.clone(), events)?);
        Ok(())
    }

    /// Stops the event loop, joining it within `timeout`.
    pub fn stop(&mut self, timeout: Duration) -> Result<(), VirtioDevicesError> {
        match self.event_loop.as_mut() {
            Some(h) => Ok(h.stop(timeout)?),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_cmdline() {
        let i = MmioDeviceInfo::for_slot(1, 2);
        assert_eq!(i.base, 0xd000_1000);
        assert_eq!(i.irq, 6);
        assert_eq!(i.cmdline_param(), "virtio_mmio.device=4K@0xd0001000:6");
    }

    #[test]
    fn creates_devices_in_order_and_extends_cmdline() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, [0u8; 1024]).unwrap();
        let vsock = VsockConfig {
            guest_cid: 3,
            uds_path: dir.path().join("v.sock"),
        };
        let blk = BlockConfig {
            path: disk,
            read_only: false,
        };
        let p = create_devices(Some(&vsock), None, &[], &[blk.clone(), blk]).unwrap();
        let types: Vec<u32> = p.infos().iter().map(|i| i.device_type).collect();
        assert_eq!(types, vec![19, 2, 2]);
        assert_eq!(
            p.extend_cmdline("console=ttyS0 "),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6 virtio_mmio.device=4K@0xd0002000:7"
        );
        assert!(matches!(
            create_devices(
                None,
                None,
                &[],
                &[BlockConfig {
                    path: dir.path().join("missing"),
                    read_only: true
                }]
            ),
            Err(VirtioDevicesError::Block { index: 0, .. })
        ));
        let many = vec![
            BlockConfig {
                path: dir.path().join("d.img"),
                read_only: true,
            };
            MAX_VIRTIO_DEVICES + 1
        ];
        assert!(matches!(
            create_devices(None, None, &[], &many),
            Err(VirtioDevicesError::TooManyDevices(20))
        ));
    }

    #[test]
    fn net_devices_sit_between_fs_and_blk() {
        use crate::devices::net::tap::tests::test_tap;
        use crate::devices::net::{MacAddr, NetConfig};
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, [0u8; 1024]).unwrap();
        let blk = BlockConfig {
            path: disk,
            read_only: true,
        };
        let t = test_tap();
        let net = |mtu| NetAttachment {
            config: NetConfig {
                mac: MacAddr([0x02, 0, 0, 0, 0, 1]),
                mtu,
                limits: Default::default(),
            },
            tap: Arc::new(t.tap.try_clone().unwrap()),
        };
        let p = create_devices(
            None,
            None,
            &[net(1500), net(9000)],
            std::slice::from_ref(&blk),
        )
        .unwrap();
        let types: Vec<u32> = p.infos().iter().map(|i| i.device_type).collect();
        assert_eq!(types, vec![1, 1, 2]);
        assert_eq!(p.net_metrics.len(), 2);
        // A bad device config names the device.
        assert!(matches!(
            create_devices(None, None, &[net(1500), net(10)], &[]),
            Err(VirtioDevicesError::Net {
                index: 1,
                source: NetError::Mtu(10)
            })
        ));
    }

    #[test]
    fn fs_sits_between_vsock_and_blk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, [0u8; 1024]).unwrap();
        let vsock = VsockConfig {
            guest_cid: 3,
            uds_path: dir.path().join("v.sock"),
        };
        let fs = VirtioFsConfig {
            shared_dir: dir.path().to_path_buf(),
            tag: "joeyfs".into(),
            read_only: true,
        };
        let blk = BlockConfig {
            path: disk,
            read_only: false,
        };
        let p = create_devices(Some(&vsock), Some(&fs), &[], std::slice::from_ref(&blk)).unwrap();
        let types: Vec<(u32, u32)> = p.infos().iter().map(|i| (i.device_type, i.irq)).collect();
        assert_eq!(types, vec![(19, 5), (26, 6), (2, 7)]);
        assert!(p.fs_metrics.is_some());
        let p = create_devices(None, Some(&fs), &[], &[]).unwrap();
        assert_eq!(
            p.extend_cmdline("x"),
            "x virtio_mmio.device=4K@0xd0000000:5"
        );
        let bad = VirtioFsConfig {
            tag: String::new(),
            ..fs.clone()
        };
        assert!(matches!(
            create_devices(None, Some(&bad), &[], &[]),
            Err(VirtioDevicesError::Fs(VirtioFsError::EmptyTag))
        ));
        let missing = VirtioFsConfig {
            shared_dir: dir.path().join("nope"),
            ..fs
        };
        assert!(matches!(
            create_devices(None, Some(&missing), &[], &[]),
            Err(VirtioDevicesError::Fs(VirtioFsError::SharedDir(_)))
        ));
    }
}
