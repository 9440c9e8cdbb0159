//! The Hypervisor actor and its backends.
//!
//! The actor owns one VM on one of two backends ([`BackendKind`]):
//! - `qemu`: QEMU `microvm` in its own process, with our vsock device served over vhost-user on a
//!   device thread ([`qemu::QemuVm`]);
//! - `builtin`: the built-in VMM (`joey-vmm-core`) in this process, on KVM, owned by a dedicated
//!   VMM thread that bridges the VM's events to the async world ([`builtin::BuiltinVm`]).
//!
//! [`select_backend`] decides which one runs (and why), [`host`] says what the host's KVM can
//! do, [`cmdline`] builds the guest kernel command line for both. The spec carries the ShareFs
//! actor's device ([`VmSpec::share_fs`]): each backend attaches it from there, and
//! [`counters::GetVmCounters`] answers its counters with the VM's. Device and VMM threads only
//! talk to async code through channels with timeouts; starting QEMU (binding sockets, spawning
//! the device thread and the process) runs on the blocking pool.

pub mod builtin;
pub mod cmdline;
pub mod counters;
pub mod host;
pub mod jail;
pub mod pooled;
pub mod qemu;
pub mod rate_limits;
pub mod sandbox_cgroup;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;

use crate::lifecycle::{InvalidTransition, StateMachine as _, VmState};
use crate::resource::BoxFuture;
use crate::sharefs::ShareFsDevice;
use joey_vmm_core::devices::net::NetAttachment;

/// Accelerator used for guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        })
    }
}

/// Which backend runs the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// QEMU `microvm` (an external process).
    Qemu,
    /// The built-in VMM (in this process, KVM only).
    Builtin,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Builtin => "builtin",
        })
    }
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmExit {
    /// The QEMU process exited with a code.
    Exited(i32),
    /// The QEMU process was killed by a signal.
    Signaled(i32),
    WaitFailed(String),
    /// Built-in VMM: the guest ended the VM (reset, power off, fault); what happened.
    GuestStopped(String),
    /// Built-in VMM: stopped by the runtime.
    ForceStopped,
    /// Built-in VMM: the VMM failed (create, stop, or its thread panicked).
    VmmFailed(String),
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Exited(c) => write!(f, "exited with code {c}"),
            VmExit::Signaled(s) if *s == libc::SIGSYS => {
                write!(f, "killed by signal {s} (SIGSYS: a system call its seccomp filter forbids)")
            }
            VmExit::Signaled(s) => write!(f, "killed by signal {s}"),
            VmExit::WaitFailed(e) => write!(f, "wait failed: {e}"),
            VmExit::GuestStopped(why) => write!(f, "stopped ({why})"),
            VmExit::ForceStopped => write!(f, "was stopped by the runtime"),
            VmExit::VmmFailed(e) => write!(f, "failed in the built-in VMM ({e})"),
        }
    }
}

/// How a stop ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMethod {
    /// The guest ended the VM itself (agent DestroySandbox) or had already ended it.
    GuestExit,
    /// QEMU: QMP `quit`.
    QmpQuit,
    /// QEMU: SIGKILL after the timeouts.
    Kill,
    /// Built-in VMM: `Vmm::stop` on the VMM thread.
    VmmStop,
}

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    /// Per-sandbox state directory (must exist).
    pub state_dir: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The kernel the backend boots (ELF `vmlinux` through PVH or a bzImage for QEMU, ELF
    /// `vmlinux` for the built-in VMM).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `hypervisor.kernel_params` (appended to joey's own, see [`cmdline`]).
    pub kernel_params: String,
    /// `agent.vsock_port`: told to the guest agent on the kernel command line.
    pub agent_port: u32,
    pub qemu_binary: PathBuf,
    /// `hypervisor.qemu.tcg_tb_size_mib` (QEMU under TCG only; 0: QEMU's default).
    pub tcg_tb_size_mib: u32,
    pub accel: Accelerator,
    pub guest_cid: u64,
    /// The ShareFs actor's virtio-fs device (`None`: no shared directory).
    pub share_fs: Option<ShareFsDevice>,
    /// One virtio-net device per pod interface, in the Network actor's order (its taps): QEMU
    /// gets joey's vhost-user device, the built-in VMM serves them in-process.
    pub net: Vec<NetAttachment>,
    /// Cap of the console log (`hypervisor.console_log_max_kib` in bytes; 0: unlimited).
    pub console_log_max_bytes: u64,
    /// `[hypervisor.rate_limits.vsock]`: the vsock device's limits (both backends).
    pub vsock_limits: joey_config::RxTxLimits,
    /// `security.qemu_user` when `security.qemu_jail` is on: QEMU runs confined as that user
    /// ([`jail`]); `None`: as root in the host's mount namespace.
    pub qemu_user: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// Bad input (config vs. host): exit code 2 in joeyctl.
    #[error("{0}")]
    BadInput(String),
    #[error("QEMU binary not found: {0}")]
    QemuNotFound(String),
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    #[error("failed to start {binary}: {source}")]
    Spawn { binary: String, source: std::io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("vsock device: {0}")]
    Device(String),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("VM process {0} did not exit after SIGKILL")]
    StopTimeout(u32),
    #[error(transparent)]
    Builtin(#[from] builtin::BuiltinError),
    #[error(transparent)]
    Pool(#[from] pooled::PoolError),
    #[error("no VM is running")]
    NotRunning,
    #[error("starting the VM: blocking task failed: {0}")]
    Task(String),
    #[error(transparent)]
    State(#[from] InvalidTransition),
}

impl HypervisorError {
    /// Whether the error was caused by bad input (configuration, missing files or binaries).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, HypervisorError::BadInput(_) | HypervisorError::QemuNotFound(_))
    }
}

/// The backend that will run a sandbox, decided before anything starts.
#[derive(Debug, Clone)]
pub struct BackendSelection {
    pub backend: BackendKind,
    pub backend_reason: String,
    pub accel: host::AccelChoice,
    /// The kernel this backend boots.
    pub kernel: PathBuf,
}

/// Picks the backend for `cfg` on a host whose KVM is `flavor` (see [`host::choose_backend`])
/// and checks what that backend needs: its kernel and the initrd exist, the QEMU binary is
/// found, the vCPU count fits. Everything refused here is bad input.
pub fn select_backend(
    cfg: &joey_config::Config,
    origin: &str,
    flavor: &host::KvmFlavor,
) -> Result<BackendSelection, HypervisorError> {
    let h = &cfg.hypervisor;
    let (backend, backend_reason) = host::choose_backend(h.kind, flavor).map_err(HypervisorError::BadInput)?;
    let accel = host::choose_accel(backend, h.qemu.accel, flavor).map_err(HypervisorError::BadInput)?;
    let bad = |e: joey_config::ConfigError| HypervisorError::BadInput(e.to_string());
    let kernel = match backend {
        BackendKind::Qemu => {
            cfg.check_files(origin).map_err(bad)?;
            qemu::resolve_binary(&h.qemu.binary)?;
            h.kernel.clone()
        }
        BackendKind::Builtin => {
            if h.vcpus > u32::from(joey_vmm_core::vmm::MAX_VCPUS) {
                return Err(HypervisorError::BadInput(format!(
                    "{origin}: invalid value for `hypervisor.vcpus`: the built-in VMM runs at most {} vCPUs, \
                     {} configured",
                    joey_vmm_core::vmm::MAX_VCPUS,
                    h.vcpus
                )));
            }
            cfg.check_builtin_files(origin).map_err(bad)?;
            h.builtin.kernel.clone()
        }
    };
    Ok(BackendSelection {
        backend,
        backend_reason,
        accel,
        kernel,
    })
}

/// Reply to [`StartVm`].
#[derive(Debug, Clone)]
pub struct VmStarted {
    /// The process running the guest (QEMU, or this process for the built-in VMM).
    pub pid: u32,
    /// Hybrid-vsock unix socket of the guest (`CONNECT <port>`).
    pub vsock_uds: PathBuf,
    pub console_log: PathBuf,
    /// QEMU's own log (`None` for the built-in VMM, which logs through tracing).
    pub vmm_log: Option<PathBuf>,
    /// Turns `Some` when the VM has ended.
    pub exit: watch::Receiver<Option<VmExit>>,
}

/// Starts the VM described by the spec on the given backend.
#[derive(Message)]
#[rtype(result = "Result<VmStarted, HypervisorError>")]
pub struct StartVm {
    pub spec: VmSpec,
    pub backend: BackendKind,
}

/// Takes over a VM leased from `joey-pool` ([`pooled::Lease`]): the actor then stops it
/// through the pool and holds the lease until [`ReleaseVm`].
#[derive(Message)]
#[rtype(result = "Result<VmStarted, HypervisorError>")]
pub struct AdoptLease {
    pub lease: pooled::Lease,
}

/// Gives a leased VM back to the pool (which removes it): after [`StopVm`] and after the
/// sandbox's shares in the VM's shared dir are gone. Nothing to do for other VMs.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleaseVm;

/// Stops the VM (after `grace` for the guest to power off by itself).
#[derive(Message)]
#[rtype(result = "Result<StopReport, HypervisorError>")]
pub struct StopVm {
    pub grace: Duration,
}

/// Reply to [`StopVm`].
#[derive(Debug, Clone)]
pub struct StopReport {
    pub method: StopMethod,
    pub exit: VmExit,
}

/// Waits up to `timeout` for the VM's exit (`None`: still running). A closed watch (its sender,
/// the exit watcher, is gone without a report) counts as an exit.
pub(crate) async fn wait_exit(rx: &mut watch::Receiver<Option<VmExit>>, timeout: Duration) -> Option<VmExit> {
    match tokio::time::timeout(timeout, rx.wait_for(|v| v.is_some())).await {
        Ok(Ok(v)) => v.clone(),
        Ok(Err(_)) => Some(VmExit::WaitFailed("the exit watcher ended without reporting".into())),
        Err(_) => None,
    }
}

/// One escalation step of a stop: its action (run only while the VM still runs) and how long
/// to wait for the exit after it.
pub(crate) struct StopStep<'a> {
    pub method: StopMethod,
    pub action: BoxFuture<'a, ()>,
    pub wait: Duration,
}

/// Stops a VM in steps: waits up to `grace` for the guest to end it, then runs the steps in
/// turn until the exit shows. Returns the method that ended it (`GuestExit` when the guest did;
/// else the last step tried) and the exit (`None`: still running after every step).
pub(crate) async fn stop_in_steps(
    mut rx: watch::Receiver<Option<VmExit>>,
    grace: Duration,
    steps: Vec<StopStep<'_>>,
) -> (StopMethod, Option<VmExit>) {
    let mut method = StopMethod::GuestExit;
    let mut exit = wait_exit(&mut rx, grace).await;
    for step in steps {
        if exit.is_some() {
            break;
        }
        method = step.method;
        step.action.await;
        exit = wait_exit(&mut rx, step.wait).await;
    }
    (method, exit)
}

/// Most bytes [`tail`] reads: the guest writes the console log, so it is never read whole.
pub const TAIL_MAX_BYTES: u64 = 16 * 1024;

/// The last `n` lines of a log file (for error messages), from at most its last
/// [`TAIL_MAX_BYTES`] (a line cut by that window is left out). Blocking: async callers run it
/// on `spawn_blocking`.
pub fn tail(path: &Path, n: usize) -> String {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let start = f
        .metadata()
        .map(|m| m.len().saturating_sub(TAIL_MAX_BYTES))
        .unwrap_or(0);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.take(TAIL_MAX_BYTES).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The running VM, on whichever backend.
enum Vm {
    Qemu(qemu::QemuVm),
    Builtin(builtin::BuiltinVm),
    /// Leased from `joey-pool`, which runs it.
    Pooled(pooled::Lease),
}

impl Vm {
    /// Stops the VM; a lease comes back (the VM's files stay until it is dropped).
    async fn stop(self, grace: Duration) -> (Result<(StopMethod, VmExit), HypervisorError>, Option<pooled::Lease>) {
        match self {
            Vm::Qemu(vm) => (vm.stop(grace).await, None),
            Vm::Builtin(vm) => (vm.stop(grace).await.map_err(Into::into), None),
            Vm::Pooled(mut lease) => (lease.stop(grace).await.map_err(Into::into), Some(lease)),
        }
    }
}

/// The Hypervisor actor: owns the VM backend.
pub struct HypervisorActor {
    vm: Option<Vm>,
    state: VmState,
    /// A stopped leased VM, kept until [`ReleaseVm`].
    stopped_lease: Option<pooled::Lease>,
}

impl HypervisorActor {
    pub fn new() -> Self {
        HypervisorActor {
            vm: None,
            state: VmState::NotStarted,
            stopped_lease: None,
        }
    }

    /// The running VM's counters (none once it is being stopped).
    fn counter_sources(&self) -> Option<counters::VmCounterSources> {
        match self.vm.as_ref()? {
            Vm::Qemu(vm) => Some(vm.counter_sources()),
            Vm::Builtin(vm) => Some(vm.counter_sources()),
            // The pool serves the devices: their counters are in its process.
            Vm::Pooled(_) => Some(counters::VmCounterSources::default()),
        }
    }

    fn adopt_qemu(&mut self, vm: qemu::QemuVm) -> Result<VmStarted, HypervisorError> {
        self.state.transition(VmState::Running)?;
        let started = VmStarted {
            pid: vm.pid,
            vsock_uds: vm.paths.vsock_uds.clone(),
            console_log: vm.paths.console_log.clone(),
            vmm_log: Some(vm.paths.qemu_log.clone()),
            exit: vm.exit_watch(),
        };
        self.vm = Some(Vm::Qemu(vm));
        Ok(started)
    }

    fn adopt_builtin(
        &mut self,
        mut vm: builtin::BuiltinVm,
        ctx: &mut Context<Self>,
    ) -> Result<VmStarted, HypervisorError> {
        self.state.transition(VmState::Running)?;
        if let Some(mut events) = vm.take_events() {
            // The VMM thread's events, drained on the actor's context (never blocking).
            ctx.spawn(
                async move {
                    while let Some(ev) = events.recv().await {
                        tracing::info!(event = ?ev, "built-in VM event received");
                    }
                }
                .into_actor(self),
            );
        }
        let started = VmStarted {
            pid: std::process::id(),
            vsock_uds: vm.paths.vsock_uds.clone(),
            console_log: vm.paths.console_log.clone(),
            vmm_log: None,
            exit: vm.exit_watch(),
        };
        self.vm = Some(Vm::Builtin(vm));
        Ok(started)
    }
}

impl Default for HypervisorActor {
    fn default() -> Self {
        Self::new()
    }
}

impl Actor for HypervisorActor {
    type Context = Context<Self>;
}

impl Handler<StartVm> for HypervisorActor {
    type Result = AtomicResponse<Self, Result<VmStarted, HypervisorError>>;

    fn handle(&mut self, msg: StartVm, _ctx: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.state.check(VmState::Running) {
            return AtomicResponse::new(Box::pin(fut::ready(Err(e.into()))));
        }
        let StartVm { spec, backend } = msg;
        match backend {
            BackendKind::Qemu => {
                // Binding sockets, spawning the device thread and QEMU: on the blocking pool.
                let fut = async move { qemu::QemuVm::start(spec).await };
                AtomicResponse::new(Box::pin(fut.into_actor(self).map(|res, act, _| act.adopt_qemu(res?))))
            }
            BackendKind::Builtin => {
                // Creating the VM (kernel load, memory, vCPUs) happens on the VMM thread; the
                // actor only awaits its report, bounded by builtin::START_TIMEOUT.
                let fut = async move { builtin::BuiltinVm::start(&spec).await };
                AtomicResponse::new(Box::pin(fut.into_actor(self).map(|res, act, ctx| {
                    let vm = res?;
                    act.adopt_builtin(vm, ctx)
                })))
            }
        }
    }
}

impl Handler<StopVm> for HypervisorActor {
    type Result = ResponseActFuture<Self, Result<StopReport, HypervisorError>>;

    fn handle(&mut self, msg: StopVm, _ctx: &mut Context<Self>) -> Self::Result {
        let vm = self.vm.take();
        if vm.is_some() && self.state == VmState::Running {
            let _ = self.state.transition(VmState::Stopping);
        }
        let fut = async move {
            match vm {
                Some(vm) => {
                    let (res, lease) = vm.stop(msg.grace).await;
                    (res.map(|(method, exit)| StopReport { method, exit }), lease)
                }
                None => (Err(HypervisorError::NotRunning), None),
            }
        };
        Box::pin(fut.into_actor(self).map(|(res, lease), act, _ctx| {
            if lease.is_some() {
                act.stopped_lease = lease;
            }
            if res.is_ok() {
                let _ = act.state.transition(VmState::Exited);
            }
            res
        }))
    }
}

impl Handler<AdoptLease> for HypervisorActor {
    type Result = Result<VmStarted, HypervisorError>;

    fn handle(&mut self, msg: AdoptLease, _ctx: &mut Context<Self>) -> Self::Result {
        self.state.transition(VmState::Running)?;
        let l = &msg.lease;
        let started = VmStarted {
            pid: l.vm.pid,
            vsock_uds: l.vm.vsock_uds.clone(),
            console_log: l.vm.console_log.clone(),
            vmm_log: Some(l.vm.qemu_log.clone()),
            exit: l.exit_watch(),
        };
        self.vm = Some(Vm::Pooled(msg.lease));
        Ok(started)
    }
}

impl Handler<ReleaseVm> for HypervisorActor {
    type Result = ();

    fn handle(&mut self, _: ReleaseVm, _ctx: &mut Context<Self>) {
        if let Some(l) = self.stopped_lease.take() {
            tracing::info!(vm = %l.vm.vm_id, "leased VM given back to the pool");
        }
        if matches!(self.vm, Some(Vm::Pooled(_))) {
            // Never stopped: the pool stops it once the lease is dropped.
            self.vm = None;
            let _ = self.state.transition(VmState::Exited);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use host::KvmFlavor;

    /// A current-thread runtime for the backends' tests.
    pub(crate) fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn cfg_with_files(kind: joey_config::HypervisorKind) -> (tempfile::TempDir, joey_config::Config) {
        let d = tempfile::tempdir().unwrap();
        let mut c = joey_config::Config::default();
        c.hypervisor.kind = kind;
        for (name, slot) in [
            ("bzImage", &mut c.hypervisor.kernel),
            ("initrd.img", &mut c.hypervisor.initrd),
            ("vmlinux", &mut c.hypervisor.builtin.kernel),
        ] {
            let p = d.path().join(name);
            std::fs::write(&p, b"x").unwrap();
            *slot = p;
        }
        c.hypervisor.qemu.binary = PathBuf::from("sh");
        (d, c)
    }

    const HW: fn() -> KvmFlavor = || KvmFlavor::Hardware("kvm_intel (VT-x)".into());

    #[test]
    fn selection_boots_the_backends_kernel() {
        use joey_config::HypervisorKind;
        let (_d, c) = cfg_with_files(HypervisorKind::Auto);
        let s = select_backend(&c, "<t>", &HW()).unwrap();
        assert_eq!((s.backend, s.accel.accel), (BackendKind::Builtin, Accelerator::Kvm));
        assert_eq!(s.kernel, c.hypervisor.builtin.kernel);
        let s = select_backend(&c, "<t>", &KvmFlavor::Pvm).unwrap();
        assert_eq!((s.backend, s.accel.accel), (BackendKind::Qemu, Accelerator::Tcg));
        assert_eq!(s.kernel, c.hypervisor.kernel);
    }

    #[test]
    fn builtin_on_pvm_is_bad_input() {
        let (_d, c) = cfg_with_files(joey_config::HypervisorKind::Builtin);
        let e = select_backend(&c, "<t>", &KvmFlavor::Pvm).unwrap_err();
        assert!(e.is_bad_input(), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&host::linux_guest_blocker(&KvmFlavor::Pvm).unwrap()),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn builtin_needs_only_its_own_files() {
        use joey_config::HypervisorKind;
        let (_d, mut c) = cfg_with_files(HypervisorKind::Builtin);
        // Neither QEMU nor the bzImage are needed by the built-in VMM.
        c.hypervisor.qemu.binary = PathBuf::from("/nonexistent/qemu");
        c.hypervisor.kernel = PathBuf::from("/nonexistent/bzImage");
        select_backend(&c, "<t>", &HW()).unwrap();
        c.hypervisor.builtin.kernel = PathBuf::from("/nonexistent/vmlinux");
        let e = select_backend(&c, "<t>", &HW()).unwrap_err();
        assert!(
            e.is_bad_input() && e.to_string().contains("hypervisor.builtin.kernel"),
            "{e}"
        );
        // And QEMU needs its binary.
        let (_d2, mut c) = cfg_with_files(HypervisorKind::Qemu);
        c.hypervisor.qemu.binary = PathBuf::from("/nonexistent/qemu");
        let e = select_backend(&c, "<t>", &HW()).unwrap_err();
        assert!(
            matches!(e, HypervisorError::QemuNotFound(_)) && e.is_bad_input(),
            "{e:?}"
        );
    }

    #[test]
    fn builtin_vcpu_limit_is_bad_input() {
        let (_d, mut c) = cfg_with_files(joey_config::HypervisorKind::Builtin);
        c.hypervisor.vcpus = 64;
        let e = select_backend(&c, "<t>", &HW()).unwrap_err();
        assert!(e.is_bad_input() && e.to_string().contains("hypervisor.vcpus"), "{e}");
    }

    #[test]
    fn tail_reads_only_the_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        assert_eq!(tail(&p, 5), "");
        std::fs::write(&p, "a\nb\nc\n").unwrap();
        assert_eq!(tail(&p, 2), "b\nc");
        assert_eq!(tail(&p, 10), "a\nb\nc");
        // A guest that floods its console: only the last window is read, its cut first line
        // left out.
        let mut big = "x".repeat(3 * TAIL_MAX_BYTES as usize);
        big.push_str("\nlast-but-one\nlast\n");
        std::fs::write(&p, &big).unwrap();
        assert_eq!(tail(&p, 5), "last-but-one\nlast");
    }

    #[test]
    fn displays() {
        assert_eq!(BackendKind::Builtin.to_string(), "builtin");
        assert_eq!(BackendKind::Qemu.to_string(), "qemu");
        assert_eq!(
            VmExit::GuestStopped("guest reset".into()).to_string(),
            "stopped (guest reset)"
        );
        assert_eq!(VmExit::ForceStopped.to_string(), "was stopped by the runtime");
    }
}
