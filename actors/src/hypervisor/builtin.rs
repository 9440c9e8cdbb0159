//! The `builtin` backend: the VM runs inside this process on [`joey_vmm_core::vmm::Vmm`]
//! (KVM; vCPU threads, the in-process virtio-vsock device on the sandbox's hybrid-vsock socket
//! `vsock.sock`, the serial console to `console.log`, an ELF `vmlinux` as the kernel, and, when
//! the spec carries the ShareFs actor's device ([`VmSpec::share_fs`], in-process transport), the
//! in-process virtio-fs device exporting its shared directory under its tag).
//!
//! The `Vmm` lives on one dedicated OS thread (the *VMM thread*), which creates and starts it and
//! then bridges its events to the async world: it calls [`Vmm::wait_event`] with a short timeout
//! in a loop, forwards every [`VmEvent`] to a bounded tokio mpsc channel (never blocking: a full
//! channel drops the event with a warning), and checks a bounded control channel for `Stop`.
//! Every guest event (i8042 reset after the agent's DestroySandbox reboots the guest, shutdown,
//! triple fault, KVM errors) ends the VM: the thread stops the `Vmm` and publishes the
//! [`VmExit`] on a tokio watch channel. The actor never calls the `Vmm` and never blocks: it
//! awaits the start report and the exit watch with timeouts, and joins the thread only once the
//! thread has said it is done, on the blocking pool with a deadline
//! ([`joey_vmm_core::thread::join_with_deadline`]).

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::TryRecvError;
use joey_vmm_core::thread::{join_with_deadline, JoinError};
use joey_vmm_core::vmm::{VirtioFsConfig, VmConfig, VmEvent, Vmm, VmmError, VsockConfig, MAX_VCPUS};
use tokio::sync::{mpsc, oneshot, watch};

use super::cmdline::{self, Reboot};
use super::counters::VmCounterSources;
use super::{stop_in_steps, StopMethod, StopStep, VmExit, VmSpec};
use crate::sharefs::ShareFsTransport;

/// Bound for creating and starting the VM (kernel load, memory, vCPUs) on the VMM thread.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `wait_event` call on the VMM thread blocks before it checks for `Stop`.
pub const EVENT_POLL: Duration = Duration::from_millis(50);
/// Bound for a forced stop: `Vmm::stop` bounds each vCPU round trip and join by its own
/// control timeout (5 s), plus the device threads.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound for joining the VMM thread after it reported the exit.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Capacity of the event channel to the async world.
pub const EVENT_BUFFER: usize = 16;

/// Errors of the built-in backend.
#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    #[error("invalid VM spec for the built-in VMM: {0}")]
    InvalidSpec(String),
    #[error("creating the built-in VM: {0}")]
    Create(#[source] VmmError),
    #[error("starting the built-in VM: {0}")]
    Start(#[source] VmmError),
    #[error("stopping the built-in VM: {0}")]
    Stop(#[source] VmmError),
    #[error("spawning the VMM thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the VMM thread ended without reporting whether the VM started")]
    ThreadGone,
    #[error("the built-in VM did not start within {0:?}")]
    StartTimeout(Duration),
    #[error("the built-in VM did not stop within {0:?}; its VMM thread is left detached")]
    StopTimeout(Duration),
    #[error("the VMM thread, after the VM stopped: {0}")]
    Join(#[from] JoinError),
}

/// Files of one built-in VM inside its sandbox state directory.
#[derive(Debug, Clone)]
pub struct BuiltinPaths {
    pub state_dir: PathBuf,
    pub console_log: PathBuf,
    pub vsock_uds: PathBuf,
}

impl BuiltinPaths {
    pub fn new(state_dir: &Path) -> Self {
        BuiltinPaths {
            state_dir: state_dir.to_path_buf(),
            console_log: state_dir.join("console.log"),
            vsock_uds: state_dir.join("vsock.sock"),
        }
    }
}

/// The `VmConfig` for a sandbox spec. The kernel command line says `reboot=k`: the guest resets
/// through the i8042 (a `Reset` event); the VMM appends the virtio-mmio devices.
pub fn vm_config(spec: &VmSpec, paths: &BuiltinPaths) -> Result<VmConfig, BuiltinError> {
    let vcpus = u8::try_from(spec.vcpus)
        .ok()
        .filter(|v| (1..=MAX_VCPUS).contains(v))
        .ok_or_else(|| BuiltinError::InvalidSpec(format!("vcpus {} not in 1..={MAX_VCPUS}", spec.vcpus)))?;
    Ok(VmConfig {
        vcpus,
        memory_mib: spec.memory_mib,
        kernel: spec.kernel.clone(),
        initrd: Some(spec.initrd.clone()),
        cmdline: cmdline::for_spec(spec, Reboot::Keyboard, None),
        serial_log: paths.console_log.clone(),
        serial_log_max_bytes: spec.console_log_max_bytes,
        vsock: Some(VsockConfig {
            guest_cid: spec.guest_cid,
            uds_path: paths.vsock_uds.clone(),
        }),
        virtio_fs: match &spec.share_fs {
            None => None,
            Some(fs) => match fs.transport {
                ShareFsTransport::InProcess => Some(VirtioFsConfig {
                    shared_dir: fs.shared_dir.clone(),
                    tag: fs.tag.to_string(),
                    read_only: false,
                }),
                ShareFsTransport::VhostUser { .. } => {
                    return Err(BuiltinError::InvalidSpec(
                        "the built-in VMM serves virtio-fs in-process; the spec's device is vhost-user".into(),
                    ))
                }
            },
        },
        net_devices: spec.net.clone(),
        block_devices: Vec::new(),
    })
}

/// What the VMM thread needs from a running VM. [`Vmm`] is the real one; the unit tests drive
/// the bridge with a fake.
pub trait BridgedVm {
    /// Next event, waiting at most `timeout`.
    fn wait_event(&self, timeout: Duration) -> Option<VmEvent>;
    /// Stops the VM (bounded; idempotent).
    fn stop(&mut self) -> Result<(), BuiltinError>;
    /// Its device and vCPU counters (shared `Arc`s, read from other threads).
    fn counter_sources(&self) -> VmCounterSources {
        VmCounterSources::default()
    }
}

impl BridgedVm for Vmm {
    fn wait_event(&self, timeout: Duration) -> Option<VmEvent> {
        Vmm::wait_event(self, timeout)
    }

    fn stop(&mut self) -> Result<(), BuiltinError> {
        Vmm::stop(self).map_err(BuiltinError::Stop)
    }

    fn counter_sources(&self) -> VmCounterSources {
        VmCounterSources {
            vsock: self.vsock_metrics().cloned(),
            fs: self.fs_metrics().cloned(),
            blk: self.all_block_metrics().to_vec(),
            net: self.all_net_metrics().to_vec(),
            console_dropped: self.console_dropped().cloned(),
            vcpus: Some(self.vcpu_metrics().clone()),
        }
    }
}

/// Creates and starts a `Vmm` (runs on the VMM thread).
fn create_and_start(cfg: VmConfig) -> Result<Vmm, BuiltinError> {
    let mut vmm = Vmm::create(cfg).map_err(BuiltinError::Create)?;
    if let Err(e) = vmm.start() {
        if let Err(se) = vmm.stop() {
            tracing::warn!(error = %se, "stopping the half-started built-in VM failed");
        }
        return Err(BuiltinError::Start(e));
    }
    Ok(vmm)
}

/// Requests to the VMM thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Stop,
}

/// What a guest event means for the exit report.
fn describe(ev: &VmEvent) -> String {
    match ev {
        VmEvent::Reset => "guest reset".into(),
        VmEvent::Shutdown { .. } => "guest powered off".into(),
        VmEvent::TripleFault { vcpu } => format!("vCPU {vcpu} triple fault"),
        VmEvent::Crash { vcpu } => format!("guest crash reported by vCPU {vcpu}"),
        VmEvent::Halted { vcpu } => format!("vCPU {vcpu} halted"),
        VmEvent::InternalError { vcpu, suberror, .. } => {
            format!("KVM internal error {suberror} on vCPU {vcpu}")
        }
        VmEvent::FailEntry { vcpu, reason, .. } => {
            format!("KVM entry failure {reason:#x} on vCPU {vcpu}")
        }
        VmEvent::VcpuError { vcpu, errno } => {
            format!("KVM_RUN failed with errno {errno} on vCPU {vcpu}")
        }
        VmEvent::UnhandledExit { vcpu, reason } => {
            format!("unhandled exit {reason} on vCPU {vcpu}")
        }
        VmEvent::ThreadFailed { thread, reason } => format!("thread {thread} failed: {reason}"),
    }
}

/// Stops the VM; the exit is `exit` unless stopping failed.
fn stop_vm<V: BridgedVm>(vm: &mut V, exit: VmExit) -> VmExit {
    match vm.stop() {
        Ok(()) => exit,
        Err(e) => VmExit::VmmFailed(format!("{exit}, then {e}")),
    }
}

/// The event loop of the VMM thread: returns once the VM has stopped.
fn bridge_events<V: BridgedVm>(
    vm: &mut V,
    control: &crossbeam_channel::Receiver<Control>,
    events: &mpsc::Sender<VmEvent>,
) -> VmExit {
    loop {
        match control.try_recv() {
            Ok(Control::Stop) => return stop_vm(vm, VmExit::ForceStopped),
            // The owner is gone without a stop: do not leave the guest running.
            Err(TryRecvError::Disconnected) => return stop_vm(vm, VmExit::ForceStopped),
            Err(TryRecvError::Empty) => {}
        }
        if let Some(ev) = vm.wait_event(EVENT_POLL) {
            tracing::info!(event = ?ev, "built-in VM event");
            let exit = VmExit::GuestStopped(describe(&ev));
            if let Err(e) = events.try_send(ev) {
                tracing::warn!(error = %e, "VM event not forwarded");
            }
            // After any event the vCPU that reported it runs no more guest code.
            return stop_vm(vm, exit);
        }
    }
}

/// Body of the VMM thread: create, report, bridge, report the exit.
fn vmm_thread<V, F>(
    factory: F,
    ready: oneshot::Sender<Result<VmCounterSources, BuiltinError>>,
    control: crossbeam_channel::Receiver<Control>,
    events: mpsc::Sender<VmEvent>,
    exit_tx: &watch::Sender<Option<VmExit>>,
) where
    V: BridgedVm,
    F: FnOnce() -> Result<V, BuiltinError>,
{
    let mut vm = match factory() {
        Ok(vm) => vm,
        Err(e) => {
            let _ = exit_tx.send(Some(VmExit::VmmFailed(e.to_string())));
            let _ = ready.send(Err(e));
            return;
        }
    };
    if ready.send(Ok(vm.counter_sources())).is_err() {
        // The starter gave up waiting (start timeout): nobody owns this VM.
        let _ = exit_tx.send(Some(stop_vm(&mut vm, VmExit::ForceStopped)));
        return;
    }
    let exit = bridge_events(&mut vm, &control, &events);
    tracing::info!(%exit, "built-in VM ended");
    let _ = exit_tx.send(Some(exit));
}

/// A running built-in VM, seen from the async world.
pub struct BuiltinVm {
    pub paths: BuiltinPaths,
    control: crossbeam_channel::Sender<Control>,
    exit_rx: watch::Receiver<Option<VmExit>>,
    events: Option<mpsc::Receiver<VmEvent>>,
    thread: Option<JoinHandle<()>>,
    counters: VmCounterSources,
    pub started_at: Instant,
}

impl BuiltinVm {
    /// Starts the VM of `spec` on its VMM thread; resolves once it runs (bounded by
    /// [`START_TIMEOUT`]).
    pub async fn start(spec: &VmSpec) -> Result<BuiltinVm, BuiltinError> {
        let paths = BuiltinPaths::new(&spec.state_dir);
        let cfg = vm_config(spec, &paths)?;
        let vm = Self::start_with(paths, move || create_and_start(cfg), START_TIMEOUT).await?;
        tracing::info!(vcpus = spec.vcpus, memory_mib = spec.memory_mib, "built-in VM started");
        Ok(vm)
    }

    /// Spawns the VMM thread, which builds the VM with `factory`, and waits up to `timeout` for
    /// it to report.
    pub async fn start_with<V, F>(paths: BuiltinPaths, factory: F, timeout: Duration) -> Result<BuiltinVm, BuiltinError>
    where
        V: BridgedVm + 'static,
        F: FnOnce() -> Result<V, BuiltinError> + Send + 'static,
    {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (ctl_tx, ctl_rx) = crossbeam_channel::bounded(1);
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_BUFFER);
        let (exit_tx, exit_rx) = watch::channel(None);
        let started_at = Instant::now();
        let thread = std::thread::Builder::new()
            .name("joey-vmm".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    vmm_thread(factory, ready_tx, ctl_rx, ev_tx, &exit_tx)
                }));
                if r.is_err() {
                    let _ = exit_tx.send(Some(VmExit::VmmFailed("the VMM thread panicked".into())));
                }
            })
            .map_err(BuiltinError::Thread)?;
        let mut vm = BuiltinVm {
            paths,
            control: ctl_tx,
            exit_rx,
            events: Some(ev_rx),
            thread: Some(thread),
            counters: VmCounterSources::default(),
            started_at,
        };
        match tokio::time::timeout(timeout, ready_rx).await {
            Ok(Ok(Ok(counters))) => {
                vm.counters = counters;
                Ok(vm)
            }
            Ok(Ok(Err(e))) => {
                // The thread is ending on its own; reap it.
                let _ = vm.join().await;
                Err(e)
            }
            Ok(Err(_)) => {
                let _ = vm.join().await;
                Err(BuiltinError::ThreadGone)
            }
            // Dropping `vm` asks the thread to stop; it stops the VM once created.
            Err(_) => Err(BuiltinError::StartTimeout(timeout)),
        }
    }

    /// A receiver that turns `Some` once the VM has ended.
    pub fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.exit_rx.clone()
    }

    /// The VM's device and vCPU counters.
    pub fn counter_sources(&self) -> VmCounterSources {
        self.counters.clone()
    }

    /// The VM's events (once; the Hypervisor actor drains them).
    pub fn take_events(&mut self) -> Option<mpsc::Receiver<VmEvent>> {
        self.events.take()
    }

    /// Stops the VM: waits up to `grace` for the guest to end it (after the agent's
    /// DestroySandbox the guest reboots: i8042 reset), then asks the VMM thread to stop the
    /// `Vmm` (bounded by [`STOP_TIMEOUT`]), then joins the thread.
    pub async fn stop(mut self, grace: Duration) -> Result<(StopMethod, VmExit), BuiltinError> {
        let control = self.control.clone();
        let vmm_stop = StopStep {
            method: StopMethod::VmmStop,
            action: Box::pin(async move {
                tracing::info!("guest did not end the built-in VM; stopping it");
                // Full means a stop is already queued.
                let _ = control.try_send(Control::Stop);
            }),
            wait: STOP_TIMEOUT,
        };
        let (method, exit) = stop_in_steps(self.exit_rx.clone(), grace, vec![vmm_stop]).await;
        let Some(exit) = exit else {
            // Leave the thread detached; `Drop` has nothing more to do.
            self.thread.take();
            return Err(BuiltinError::StopTimeout(STOP_TIMEOUT));
        };
        if let Err(e) = self.join().await {
            tracing::warn!(error = %e, "VMM thread");
        }
        Ok((method, exit))
    }

    /// Joins the VMM thread (which has ended or is ending) on the blocking pool, bounded by
    /// [`JOIN_TIMEOUT`]; past it the thread is left detached.
    async fn join(&mut self) -> Result<(), BuiltinError> {
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        match tokio::task::spawn_blocking(move || join_with_deadline(t, JOIN_TIMEOUT)).await {
            Ok(r) => Ok(r?),
            // The blocking task itself was lost (runtime shutting down): the thread is detached.
            Err(_) => Err(JoinError::Timeout(JOIN_TIMEOUT).into()),
        }
    }
}

impl Drop for BuiltinVm {
    fn drop(&mut self) {
        if self.thread.take().is_some() {
            // Never block here (this may run on the actor's thread): ask for a stop and let the
            // thread finish on its own. A disconnected control channel means stop as well.
            let _ = self.control.try_send(Control::Stop);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::tests::rt;
    use crate::hypervisor::Accelerator;
    use crate::sharefs::ShareFsDevice;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A VM that reports `event` after `after` polls (never if `None`) and counts stops.
    struct FakeVm {
        polls: AtomicUsize,
        event: Option<(usize, VmEvent)>,
        stops: Arc<AtomicUsize>,
        stop_fails: bool,
        counters: VmCounterSources,
    }

    impl FakeVm {
        fn new(event: Option<(usize, VmEvent)>, stops: Arc<AtomicUsize>) -> FakeVm {
            FakeVm {
                polls: AtomicUsize::new(0),
                event,
                stops,
                stop_fails: false,
                counters: VmCounterSources::default(),
            }
        }
    }

    impl BridgedVm for FakeVm {
        fn wait_event(&self, timeout: Duration) -> Option<VmEvent> {
            let n = self.polls.fetch_add(1, Ordering::SeqCst);
            match &self.event {
                Some((after, ev)) if n >= *after => Some(ev.clone()),
                _ => {
                    std::thread::sleep(timeout.min(Duration::from_millis(5)));
                    None
                }
            }
        }

        fn stop(&mut self) -> Result<(), BuiltinError> {
            self.stops.fetch_add(1, Ordering::SeqCst);
            if self.stop_fails {
                Err(BuiltinError::InvalidSpec("fake stop failure".into()))
            } else {
                Ok(())
            }
        }

        fn counter_sources(&self) -> VmCounterSources {
            self.counters.clone()
        }
    }

    fn fake(
        event: Option<(usize, VmEvent)>,
    ) -> (impl FnOnce() -> Result<FakeVm, BuiltinError> + Send, Arc<AtomicUsize>) {
        let stops = Arc::new(AtomicUsize::new(0));
        let s = stops.clone();
        (move || Ok(FakeVm::new(event, s)), stops)
    }

    fn paths() -> BuiltinPaths {
        BuiltinPaths::new(Path::new("/run/joey/t"))
    }

    #[test]
    fn guest_reset_ends_the_vm_and_is_forwarded() {
        rt().block_on(async {
            let (f, stops) = fake(Some((3, VmEvent::Reset)));
            let mut vm = BuiltinVm::start_with(paths(), f, Duration::from_secs(5)).await.unwrap();
            let mut events = vm.take_events().unwrap();
            assert!(vm.take_events().is_none());
            let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
                .await
                .unwrap();
            assert_eq!(ev, Some(VmEvent::Reset));
            let mut exit = vm.exit_watch();
            let x = tokio::time::timeout(Duration::from_secs(5), exit.wait_for(|v| v.is_some()))
                .await
                .unwrap()
                .unwrap()
                .clone();
            assert_eq!(x, Some(VmExit::GuestStopped("guest reset".into())));
            let (method, x) = vm.stop(Duration::from_secs(1)).await.unwrap();
            assert_eq!(method, StopMethod::GuestExit);
            assert_eq!(x.to_string(), "stopped (guest reset)");
            assert_eq!(stops.load(Ordering::SeqCst), 1);
        });
    }

    #[test]
    fn stop_without_guest_exit_forces_a_vmm_stop() {
        rt().block_on(async {
            let (f, stops) = fake(None);
            let vm = BuiltinVm::start_with(paths(), f, Duration::from_secs(5)).await.unwrap();
            let t0 = Instant::now();
            let (method, x) = vm.stop(Duration::from_millis(50)).await.unwrap();
            assert_eq!(method, StopMethod::VmmStop);
            assert_eq!(x, VmExit::ForceStopped);
            assert_eq!(stops.load(Ordering::SeqCst), 1);
            assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        });
    }

    #[test]
    fn the_vms_counters_come_back_with_the_start_report() {
        rt().block_on(async {
            let vsock = Arc::new(joey_vmm_core::devices::vsock::VsockMetrics::default());
            let vcpus = Arc::new(joey_vmm_core::vstate::metrics::VcpuMetrics::default());
            let counters = VmCounterSources {
                vsock: Some(vsock.clone()),
                fs: None,
                blk: Vec::new(),
                net: Vec::new(),
                vcpus: Some(vcpus.clone()),
                console_dropped: None,
            };
            let vm = BuiltinVm::start_with(
                paths(),
                move || -> Result<FakeVm, BuiltinError> {
                    Ok(FakeVm {
                        counters,
                        ..FakeVm::new(None, Arc::new(AtomicUsize::new(0)))
                    })
                },
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            let got = vm.counter_sources();
            assert!(Arc::ptr_eq(got.vsock.as_ref().unwrap(), &vsock));
            assert!(Arc::ptr_eq(got.vcpus.as_ref().unwrap(), &vcpus));
            // Bumped by the device after the start: visible through the same Arc.
            vsock.tx_bytes.fetch_add(7, Ordering::Relaxed);
            assert_eq!(
                vm.counter_sources().read().devices[0].bytes,
                vec![("to_guest", 0), ("from_guest", 7)]
            );
            vm.stop(Duration::ZERO).await.unwrap();
        });
    }

    #[test]
    fn dropping_the_vm_stops_it() {
        rt().block_on(async {
            let (f, stops) = fake(None);
            let vm = BuiltinVm::start_with(paths(), f, Duration::from_secs(5)).await.unwrap();
            let mut exit = vm.exit_watch();
            drop(vm);
            let x = tokio::time::timeout(Duration::from_secs(5), exit.wait_for(|v| v.is_some()))
                .await
                .unwrap()
                .unwrap()
                .clone();
            assert_eq!(x, Some(VmExit::ForceStopped));
            assert_eq!(stops.load(Ordering::SeqCst), 1);
        });
    }

    #[test]
    fn create_failure_is_reported_not_hung() {
        rt().block_on(async {
            let r = BuiltinVm::start_with(
                paths(),
                || -> Result<FakeVm, BuiltinError> { Err(BuiltinError::InvalidSpec("no kernel".into())) },
                Duration::from_secs(5),
            )
            .await;
            assert!(matches!(r, Err(BuiltinError::InvalidSpec(_))), "{:?}", r.err());
        });
    }

    #[test]
    fn slow_create_times_out_and_the_vm_is_stopped_later() {
        rt().block_on(async {
            let stops = Arc::new(AtomicUsize::new(0));
            let s = stops.clone();
            let r = BuiltinVm::start_with(
                paths(),
                move || {
                    std::thread::sleep(Duration::from_millis(200));
                    Ok(FakeVm::new(None, s))
                },
                Duration::from_millis(20),
            )
            .await;
            assert!(matches!(r, Err(BuiltinError::StartTimeout(_))), "{:?}", r.err());
            let t0 = Instant::now();
            while stops.load(Ordering::SeqCst) == 0 && t0.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(stops.load(Ordering::SeqCst), 1);
        });
    }

    #[test]
    fn panicking_vmm_thread_reports_failure() {
        rt().block_on(async {
            let r = BuiltinVm::start_with(
                paths(),
                || -> Result<FakeVm, BuiltinError> { panic!("boom") },
                Duration::from_secs(5),
            )
            .await;
            assert!(matches!(r, Err(BuiltinError::ThreadGone)), "{:?}", r.err());
        });
    }

    #[test]
    fn stop_failure_is_in_the_exit() {
        let mut vm = FakeVm {
            stop_fails: true,
            ..FakeVm::new(
                Some((0, VmEvent::TripleFault { vcpu: 0 })),
                Arc::new(AtomicUsize::new(0)),
            )
        };
        let (_ctl_tx, ctl_rx) = crossbeam_channel::bounded(1);
        let (ev_tx, _ev_rx) = mpsc::channel(1);
        let x = bridge_events(&mut vm, &ctl_rx, &ev_tx);
        match x {
            VmExit::VmmFailed(m) => assert!(
                m.contains("vCPU 0 triple fault") && m.contains("fake stop failure"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn vm_config_from_spec() {
        let spec = VmSpec {
            id: "t".into(),
            state_dir: PathBuf::from("/run/joey/t"),
            vcpus: 2,
            memory_mib: 256,
            kernel: PathBuf::from("/k/vmlinux"),
            initrd: PathBuf::from("/k/initrd.img"),
            kernel_params: " foo=1 ".into(),
            agent_port: 1024,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            tcg_tb_size_mib: 0,
            accel: Accelerator::Kvm,
            guest_cid: 3,
            share_fs: None,
            net: Vec::new(),
            console_log_max_bytes: 65536,
        };
        let c = vm_config(&spec, &BuiltinPaths::new(&spec.state_dir)).unwrap();
        assert_eq!(c.serial_log_max_bytes, 65536);
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.kernel, Path::new("/k/vmlinux"));
        assert_eq!(c.initrd.as_deref(), Some(Path::new("/k/initrd.img")));
        assert_eq!(c.serial_log, Path::new("/run/joey/t/console.log"));
        let v = c.vsock.unwrap();
        assert_eq!(
            (v.guest_cid, v.uds_path.as_path()),
            (3, Path::new("/run/joey/t/vsock.sock"))
        );
        assert_eq!(
            c.cmdline,
            "console=ttyS0 reboot=k panic=-1 quiet no_timer_check apic_timer_hz=1000000000 foo=1 joey.agent_port=1024"
        );
        assert_eq!(c.virtio_fs, None);
        let mut device = ShareFsDevice {
            shared_dir: PathBuf::from("/run/joey/t/shared"),
            tag: "joeyfs",
            transport: ShareFsTransport::InProcess,
        };
        let with_fs = VmSpec {
            share_fs: Some(device.clone()),
            ..spec.clone()
        };
        let fs = vm_config(&with_fs, &paths()).unwrap().virtio_fs.unwrap();
        assert_eq!(
            fs,
            VirtioFsConfig {
                shared_dir: PathBuf::from("/run/joey/t/shared"),
                tag: "joeyfs".into(),
                read_only: false
            }
        );
        // The built-in VMM has no vhost-user frontend.
        device.transport = ShareFsTransport::VhostUser {
            socket: PathBuf::from("/run/joey/t/vhost-fs.sock"),
            metrics: Arc::new(joey_vmm_core::devices::fs::FsMetrics::default()),
        };
        assert!(matches!(
            vm_config(
                &VmSpec {
                    share_fs: Some(device),
                    ..spec.clone()
                },
                &paths()
            ),
            Err(BuiltinError::InvalidSpec(_))
        ));
        assert!(matches!(
            vm_config(
                &VmSpec {
                    vcpus: 33,
                    ..spec.clone()
                },
                &paths()
            ),
            Err(BuiltinError::InvalidSpec(_))
        ));
        assert!(matches!(
            vm_config(&VmSpec { vcpus: 300, ..spec }, &paths()),
            Err(BuiltinError::InvalidSpec(_))
        ));
    }
}
