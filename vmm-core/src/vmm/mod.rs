//! The built-in VMM: [`Vmm`] builds a KVM VM from a [`VmConfig`], boots an
//! ELF64 kernel through the Linux 64-bit boot protocol and runs one thread
//! per vCPU.
//!
//! Lifecycle (checked, see [`VmmState`]):
//!
//! ```text
//! Vmm::create(cfg) -> Created --start()--> Running <--pause()/resume()--> Paused
//!                                          Running|Paused|Created --stop()--> Stopped
//! ```
//!
//! Guest-side events (reset, triple fault, KVM errors, ...) arrive through
//! [`Vmm::wait_event`]; the vCPU that saw one stops running guest code, and
//! the owner decides what to do (normally [`Vmm::stop`]). Every wait is bounded.

pub mod bus;
pub mod event;
pub mod virtio;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::boot::{self, layout};
pub use crate::devices::blk::BlockConfig;
use crate::devices::blk::BlockMetrics;
pub use crate::devices::fs::VirtioFsConfig;
use crate::devices::legacy::{serial::IrqTrigger, LogSink, RateLimit, SerialDevice, I8042};
pub use crate::devices::net::NetAttachment;
pub use crate::devices::vsock::VsockConfig;
use crate::vstate::metrics::VcpuMetrics;
use crate::vstate::vcpu::{BootEntry, Vcpu, VcpuCommand, VcpuError, VcpuHandle, VcpuState};
use crate::vstate::{cpuid, memory, regs, vm};
use bus::{Bus, BusError};
pub use event::{EventSender, VmEvent};
pub use virtio::{MmioDeviceInfo, VirtioDevices, VirtioDevicesError};

/// Capacity of the VM event channel.
pub const EVENT_CHANNEL_CAPACITY: usize = 64;
/// Default bound for one pause/resume/stop round trip with all vCPUs.
pub const DEFAULT_CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// What to boot and with which resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs (1..=32).
    pub vcpus: u8,
    /// Guest RAM in MiB (>= 16).
    pub memory_mib: u32,
    /// ELF64 `vmlinux`-style kernel (64-bit entry, rsi = boot_params).
    pub kernel: PathBuf,
    /// Optional initrd, loaded page aligned at the top of low memory.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// File receiving the guest's COM1 output (truncated at create).
    pub serial_log: PathBuf,
    /// Cap of the serial log in bytes, the newest output kept (0: unlimited).
    pub serial_log_max_bytes: u64,
    /// In-process virtio-vsock device (hybrid vsock on the host side).
    pub vsock: Option<VsockConfig>,
    /// In-process virtio-fs device (a host directory shared under a mount tag); it sits after
    /// the vsock device and before the network and block devices.
    pub virtio_fs: Option<VirtioFsConfig>,
    /// In-process virtio-net devices, in order (the pod's interfaces), after virtio-fs.
    pub net_devices: Vec<NetAttachment>,
    /// virtio-blk devices, in order (`joey-blk<N>` serials).
    pub block_devices: Vec<BlockConfig>,
}

/// Most vCPUs accepted by [`Vmm::create`].
pub const MAX_VCPUS: u8 = 32;

/// VMM lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmState {
    Created,
    Running,
    Paused,
    Stopped,
}

impl VmmState {
    /// Whether `self -> next` is legal.
    pub fn can_transition_to(self, next: VmmState) -> bool {
        use VmmState::*;
        matches!(
            (self, next),
            (Created, Running)
                | (Created, Stopped)
                | (Running, Paused)
                | (Paused, Running)
                | (Running, Stopped)
                | (Paused, Stopped)
        )
    }
}

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    #[error("guest memory: {0}")]
    Memory(#[from] memory::MemoryError),
    #[error("vm: {0}")]
    Vm(#[from] vm::VmError),
    #[error("cpuid: {0}")]
    Cpuid(#[from] cpuid::CpuidError),
    #[error("boot: {0}")]
    Boot(#[from] boot::BootError),
    #[error("registers: {0}")]
    Regs(#[from] regs::RegsError),
    #[error("vcpu: {0}")]
    Vcpu(#[from] VcpuError),
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    #[error("serial: {0}")]
    Serial(#[from] crate::devices::legacy::serial::SerialError),
    #[error("virtio devices: {0}")]
    Virtio(#[from] VirtioDevicesError),
    #[error("KVM_IRQFD: {0}")]
    Irqfd(#[source] kvm_ioctls::Error),
    #[error("cannot {op} a VM in state {state:?}")]
    InvalidState { op: &'static str, state: VmmState },
    #[error("vCPU {vcpu} answered {got:?}, expected {want:?}")]
    UnexpectedVcpuState {
        vcpu: u8,
        got: VcpuState,
        want: VcpuState,
    },
}

/// A built-in VM.
pub struct Vmm {
    state: VmmState,
    vcpus: Vec<Vcpu>,
    handles: Vec<VcpuHandle>,
    events_rx: Receiver<VmEvent>,
    /// For threads started later (the device event loop) to report their failure.
    events: EventSender,
    control_timeout: Duration,
    serial: Arc<Mutex<SerialDevice>>,
    /// Bytes the serial log's cap dropped.
    console_dropped: Option<Arc<std::sync::atomic::AtomicU64>>,
    pio_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    virtio: VirtioDevices,
    vcpu_metrics: Arc<VcpuMetrics>,
    boot: boot::BootSetup,
    // Order matters for drop: the VM fd goes before the memory it maps.
    vm: VmFd,
    _kvm: Kvm,
    mem: GuestMemoryMmap,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("state", &self.state)
            .field("boot", &self.boot)
            .finish()
    }
}

fn validate(cfg: &VmConfig) -> Result<(), VmmError> {
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(VmmError::InvalidConfig(format!(
            "vcpus {} not in 1..={MAX_VCPUS}",
            cfg.vcpus
        )));
    }
    if cfg.memory_mib < layout::MIN_MEMORY_MIB {
        return Err(VmmError::InvalidConfig(format!(
            "memory_mib {} below {}",
            cfg.memory_mib,
            layout::MIN_MEMORY_MIB
        )));
    }
    Ok(())
}

impl Vmm {
    /// Builds the VM: memory, KVM VM with irqchip + PIT, kernel/initrd/cmdline,
    /// zero page, MP table, page tables, COM1 + i8042, configured vCPUs.
    /// Nothing runs until [`Vmm::start`].
    pub fn create(cfg: VmConfig) -> Result<Self, VmmError> {
        validate(&cfg)?;
        let kvm = vm::open_kvm()?;
        let mem = memory::create_guest_memory(cfg.memory_mib)?;
        let mem_size = u64::from(cfg.memory_mib) << 20;
        let vm_fd = vm::create_vm(&kvm)?;
        vm::setup_irqchip(&vm_fd)?;
        vm::register_memory(&kvm, &vm_fd, &mem)?;

        let pending = virtio::create_devices(
            cfg.vsock.as_ref(),
            cfg.virtio_fs.as_ref(),
            &cfg.net_devices,
            &cfg.block_devices,
        )?;
        let cmdline = pending.extend_cmdline(&cfg.cmdline);
        let boot = boot::setup_boot(
            &mem,
            mem_size,
            &cfg.kernel,
            cfg.initrd.as_deref(),
            &cmdline,
            cfg.vcpus,
        )?;
        regs::write_boot_tables(&mem)?;

        let (ev_tx, events_rx) = bounded(EVENT_CHANNEL_CAPACITY);
        let events = EventSender::new(ev_tx);

        let sink = LogSink::file(&cfg.serial_log, RateLimit::default(), cfg.serial_log_max_bytes)?;
        let console_dropped = sink.cap_dropped();
        let serial = SerialDevice::new(IrqTrigger::new()?, sink);
        vm_fd
            .register_irqfd(serial.irq_evt(), layout::COM1_IRQ)
            .map_err(VmmError::Irqfd)?;
        let serial = Arc::new(Mutex::new(serial));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), layout::COM1_PORT, 8)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(events.clone()))),
            layout::I8042_PORT,
            5,
        )?;
        let mut mmio = Bus::new();
        let virtio = pending.attach(&vm_fd, &mem, &mut mmio)?;
        let mmio = Arc::new(mmio);
        let pio_bus = Arc::new(pio);

        let base_cpuid = cpuid::supported_cpuid(&kvm)?;
        let entry = BootEntry {
            entry: boot.entry.0,
            boot_params: boot.zero_page.0,
        };
        let vcpu_metrics = Arc::new(VcpuMetrics::default());
        let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
        for id in 0..cfg.vcpus {
            let mut v = Vcpu::new(id, &vm_fd, pio_bus.clone(), mmio.clone(), events.clone())?;
            v.set_metrics(vcpu_metrics.clone());
            v.configure(&base_cpuid, cfg.vcpus, entry)?;
            vcpus.push(v);
        }
        tracing::info!(
            vcpus = cfg.vcpus,
            memory_mib = cfg.memory_mib,
            entry = format_args!("{:#x}", boot.entry.0),
            "built-in VM created"
        );
        Ok(Vmm {
            state: VmmState::Created,
            vcpus,
            handles: Vec::new(),
            events_rx,
            events,
            control_timeout: DEFAULT_CONTROL_TIMEOUT,
            serial,
            console_dropped,
            pio_bus,
            mmio_bus: mmio,
            virtio,
            vcpu_metrics,
            boot,
            vm: vm_fd,
            _kvm: kvm,
            mem,
        })
    }

    /// Current lifecycle state.
    pub fn state(&self) -> VmmState {
        self.state
    }

    /// Boot data placement (entry, zero page, initrd).
    pub fn boot_setup(&self) -> boot::BootSetup {
        self.boot
    }

    /// Guest memory (e.g. to inspect what the guest wrote).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The KVM VM fd (for devices added later: irqfd, ioeventfd).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Port IO bus.
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio_bus
    }

    /// MMIO bus (virtio-mmio devices).
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio_bus
    }

    /// The virtio-mmio devices (vsock first, then virtio-fs, then block devices), with their
    /// windows and GSIs.
    pub fn virtio_devices(&self) -> &[MmioDeviceInfo] {
        self.virtio.infos()
    }

    /// Counters of the `index`-th block device.
    pub fn block_metrics(&self, index: usize) -> Option<&Arc<BlockMetrics>> {
        self.virtio.block_metrics(index)
    }

    /// Counters of every block device, in order.
    pub fn all_block_metrics(&self) -> &[Arc<BlockMetrics>] {
        self.virtio.all_block_metrics()
    }

    /// vCPU exit counters, all vCPUs together (shared with the vCPU threads).
    pub fn vcpu_metrics(&self) -> &Arc<VcpuMetrics> {
        &self.vcpu_metrics
    }

    /// Counters of the in-process vsock device, if the VM has one.
    pub fn vsock_metrics(&self) -> Option<&Arc<crate::devices::vsock::VsockMetrics>> {
        self.virtio.vsock_metrics()
    }

    /// Bytes of guest console output the serial log's cap dropped so far.
    pub fn console_dropped(&self) -> Option<&Arc<std::sync::atomic::AtomicU64>> {
        self.console_dropped.as_ref()
    }

    /// Counters of every virtio-net device, in order.
    pub fn all_net_metrics(&self) -> &[Arc<crate::devices::net::NetMetrics>] {
        self.virtio.all_net_metrics()
    }

    /// Counters of the in-process virtio-fs device, if the VM has one.
    pub fn fs_metrics(&self) -> Option<&Arc<crate::devices::fs::FsMetrics>> {
        self.virtio.fs_metrics()
    }

    /// Transport counters (notifications, interrupts, errors) of the `index`-th virtio device.
    pub fn virtio_metrics(
        &self,
        index: usize,
    ) -> Option<Arc<crate::devices::virtio::metrics::TransportMetrics>> {
        self.virtio.transport_metrics(index)
    }

    /// Device status register of the `index`-th virtio device.
    pub fn virtio_status(&self, index: usize) -> Option<u32> {
        self.virtio.status(index)
    }

    /// Bytes of serial output dropped by the rate limiter.
    pub fn serial_dropped(&self) -> u64 {
        self.serial.lock().map(|s| s.dropped()).unwrap_or(0)
    }

    /// Bound for each pause/resume/stop (default [`DEFAULT_CONTROL_TIMEOUT`]).
    pub fn set_control_timeout(&mut self, t: Duration) {
        self.control_timeout = t;
    }

    fn transition(&mut self, op: &'static str, next: VmmState) -> Result<(), VmmError> {
        if self.state.can_transition_to(next) {
            Ok(())
        } else {
            Err(VmmError::InvalidState {
                op,
                state: self.state,
            })
        }
    }

    /// Starts the device event loop, then all vCPU threads.
    pub fn start(&mut self) -> Result<(), VmmError> {
        self.transition("start", VmmState::Running)?;
        self.virtio.start(Some(self.events.clone()))?;
        for v in self.vcpus.drain(..) {
            self.handles.push(v.start()?);
        }
        self.state = VmmState::Running;
        Ok(())
    }

    fn broadcast(&self, cmd: VcpuCommand, ok: &[VcpuState]) -> Result<(), VmmError> {
        let deadline = Instant::now() + self.control_timeout;
        // A thread that ended on its own (it failed: a `ThreadFailed` event said so) is stopped.
        let live = || {
            self.handles
                .iter()
                .filter(move |h| cmd != VcpuCommand::Stop || !h.is_finished())
        };
        for h in live() {
            while h.recv(Duration::ZERO).is_ok() {}
            h.send(cmd, deadline.saturating_duration_since(Instant::now()))?;
        }
        for h in live() {
            let r = h.recv(deadline.saturating_duration_since(Instant::now()))?;
            if !ok.contains(&r.state) {
                return Err(VmmError::UnexpectedVcpuState {
                    vcpu: r.id,
                    got: r.state,
                    want: ok[0],
                });
            }
        }
        Ok(())
    }

    /// Pauses every vCPU (each acknowledges within the control timeout).
    pub fn pause(&mut self) -> Result<(), VmmError> {
        self.transition("pause", VmmState::Paused)?;
        self.broadcast(
            VcpuCommand::Pause,
            &[VcpuState::Paused, VcpuState::GuestStopped],
        )?;
        self.state = VmmState::Paused;
        Ok(())
    }

    /// Resumes every vCPU.
    pub fn resume(&mut self) -> Result<(), VmmError> {
        self.transition("resume", VmmState::Running)?;
        self.broadcast(
            VcpuCommand::Resume,
            &[VcpuState::Running, VcpuState::GuestStopped],
        )?;
        self.state = VmmState::Running;
        Ok(())
    }

    /// Stops every vCPU and joins the threads. Idempotent once stopped.
    pub fn stop(&mut self) -> Result<(), VmmError> {
        if self.state == VmmState::Stopped {
            return Ok(());
        }
        self.transition("stop", VmmState::Stopped)?;
        self.state = VmmState::Stopped;
        // One bound for the whole stop: a hung vCPU costs the control timeout once.
        let deadline = Instant::now() + self.control_timeout;
        let r = self.broadcast(VcpuCommand::Stop, &[VcpuState::Exited]);
        for h in &mut self.handles {
            let left = deadline.saturating_duration_since(Instant::now());
            if !h.join_finished(left.max(Duration::from_millis(100))) {
                tracing::error!(
                    vcpu = h.id(),
                    "vCPU thread did not exit; leaving it detached"
                );
            }
        }
        let d = self.virtio.stop(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100)),
        );
        r?;
        Ok(d?)
    }

    /// Next VM event, waiting at most `timeout`.
    pub fn wait_event(&self, timeout: Duration) -> Option<VmEvent> {
        match self.events_rx.recv_timeout(timeout) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Reads a u64 from guest memory (helper for monitoring guests).
    pub fn read_guest_u64(&self, addr: u64) -> Option<u64> {
        use vm_memory::Bytes;
        self.mem.read_obj::<u64>(GuestAddress(addr)).ok()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.state != VmmState::Stopped && !self.handles.is_empty() {
            if let Err(e) = self.stop() {
                tracing::warn!("stopping VM on drop: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_state_transitions() {
        use VmmState::*;
        assert!(Created.can_transition_to(Running));
        assert!(Running.can_transition_to(Paused));
        assert!(Paused.can_transition_to(Running));
        assert!(Paused.can_transition_to(Stopped));
        assert!(!Created.can_transition_to(Paused));
        assert!(!Stopped.can_transition_to(Running));
        assert!(!Running.can_transition_to(Running));
    }

    #[test]
    fn config_validation() {
        let cfg = VmConfig {
            vcpus: 0,
            memory_mib: 128,
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
            serial_log: "/dev/null".into(),
            serial_log_max_bytes: 0,
            vsock: None,
            virtio_fs: None,
            net_devices: Vec::new(),
            block_devices: Vec::new(),
        };
        assert!(matches!(
            Vmm::create(cfg.clone()),
            Err(VmmError::InvalidConfig(_))
        ));
        assert!(matches!(
            Vmm::create(VmConfig {
                vcpus: 1,
                memory_mib: 4,
                ..cfg
            }),
            Err(VmmError::InvalidConfig(_))
        ));
    }
}
