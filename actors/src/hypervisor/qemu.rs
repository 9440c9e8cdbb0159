//! The `qemu` backend: QEMU `microvm` with our own vsock device served over vhost-user.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use joey_vmm_core::devices::fs::FsMetrics;
use joey_vmm_core::devices::legacy::capped_log::CappedLog;
use joey_vmm_core::devices::net::{NetMetrics, VhostUserNetHandle, VhostUserNetServer};
use joey_vmm_core::devices::vsock::{VhostUserVsockHandle, VhostUserVsockServer, VsockConfig, VsockMetrics};
use joey_vmm_core::seccomp;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::cmdline::{self, Reboot};
use super::jail::{self, Credentials, Jail, JailBuilder, JailError, Step, StepReport};
use super::sandbox_cgroup::{self, Limits, Origin, SandboxCgroup};
use super::{stop_in_steps, Accelerator, HypervisorError, StopStep, VmExit, VmSpec};
use crate::sharefs::ShareFsTransport;

/// Files of one VM inside its sandbox state directory.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub console_log: PathBuf,
    pub qemu_log: PathBuf,
    pub qmp_sock: PathBuf,
    pub vhost_vsock_sock: PathBuf,
    pub vsock_uds: PathBuf,
}

impl VmPaths {
    pub fn new(state_dir: &Path) -> Self {
        VmPaths {
            console_log: state_dir.join("console.log"),
            qemu_log: state_dir.join("qemu.log"),
            qmp_sock: state_dir.join("qmp.sock"),
            vhost_vsock_sock: state_dir.join("vhost-vsock.sock"),
            vsock_uds: state_dir.join("vsock.sock"),
        }
    }

    /// The vhost-user socket of the `index`-th virtio-net device.
    pub fn net_sock(&self, index: usize) -> PathBuf {
        let dir = self.qmp_sock.parent().unwrap_or(Path::new("."));
        dir.join(format!("net{index}.sock"))
    }
}

/// How a stop ended the VM (shared by both backends; QEMU uses `GuestExit`, `QmpQuit`, `Kill`).
pub use super::StopMethod;

/// Resolves a binary name against PATH (absolute or relative paths are taken as they are).
pub fn resolve_binary(bin: &Path) -> Result<PathBuf, HypervisorError> {
    use std::os::unix::fs::PermissionsExt as _;
    let is_exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if bin.components().count() > 1 || bin.is_absolute() {
        return if is_exec(bin) {
            Ok(bin.to_path_buf())
        } else {
            Err(HypervisorError::QemuNotFound(bin.display().to_string()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let cand = dir.join(bin);
        if is_exec(&cand) {
            return Ok(cand);
        }
    }
    Err(HypervisorError::QemuNotFound(bin.display().to_string()))
}

/// Builds QEMU's argument list (without the binary). `reboot=t`: a guest reboot is a triple
/// fault, which makes QEMU (`-no-reboot`) exit. `tsc_khz`: the host's TSC rate, which a TCG
/// guest sees (see [`super::host::host_tsc_khz`]); ignored with KVM, whose guests get kvmclock.
pub fn qemu_args(spec: &VmSpec, paths: &VmPaths, tsc_khz: Option<u64>) -> Result<Vec<String>, HypervisorError> {
    let tsc_khz = tsc_khz.filter(|_| spec.accel == Accelerator::Tcg);
    let cmdline = cmdline::for_spec(spec, Reboot::TripleFault, tsc_khz);
    let (accel, cpu) = match spec.accel {
        Accelerator::Kvm => ("kvm", "host"),
        Accelerator::Tcg => ("tcg", "max"),
    };
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    // rtc=on: without a CMOS RTC the guest kernel stalls ~1 s at boot trying to read the time
    // ("Unable to read current time from RTC"); measured 2.2 s -> 1.2 s per boot under TCG.
    push(&["-M", "microvm,isa-serial=on,rtc=on,acpi=off,memory-backend=mem"]);
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={}M,share=on", spec.memory_mib),
    ]);
    push(&["-global", "virtio-mmio.force-legacy=false"]);
    let accel = match (spec.accel, spec.tcg_tb_size_mib) {
        (Accelerator::Tcg, n) if n > 0 => format!("tcg,tb-size={n}"),
        _ => accel.to_string(),
    };
    push(&["-accel", &accel, "-cpu", cpu]);
    push(&["-m", &format!("{}M", spec.memory_mib), "-smp", &spec.vcpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
    // The console goes through joey (a pipe on fd 3, see `ConsolePump`), which caps its log.
    // QEMU takes it from an fd set rather than reopening it through /proc (its jail has none);
    // `append=on`: a pipe cannot be truncated.
    push(&["-add-fd", &format!("fd={CONSOLE_FD},set={CONSOLE_FDSET}")]);
    push(&[
        "-chardev",
        &format!("file,id=con0,path=/dev/fdset/{CONSOLE_FDSET},append=on"),
    ]);
    push(&["-serial", "chardev:con0"]);
    push(&["-kernel", &spec.kernel.display().to_string()]);
    push(&["-initrd", &spec.initrd.display().to_string()]);
    push(&["-append", &cmdline]);
    push(&[
        "-chardev",
        &format!("socket,id=vsock0,path={}", paths.vhost_vsock_sock.display()),
    ]);
    push(&["-device", "vhost-user-vsock-device,chardev=vsock0"]);
    if let Some(fs) = &spec.share_fs {
        // virtio-fs served by the ShareFs actor (needs the shared memfd memory backend above).
        let ShareFsTransport::VhostUser { socket, .. } = &fs.transport else {
            return Err(HypervisorError::Device(
                "QEMU attaches virtio-fs over vhost-user only; the spec's device is in-process".into(),
            ));
        };
        push(&["-chardev", &format!("socket,id=fs0,path={}", socket.display())]);
        push(&["-device", &format!("vhost-user-fs-device,chardev=fs0,tag={}", fs.tag)]);
    }
    for (i, net) in spec.net.iter().enumerate() {
        // virtio-net served by our vhost-user backend on the pod interface's tap; QEMU keeps the
        // control queue and tells the guest the MAC and MTU.
        push(&[
            "-chardev",
            &format!("socket,id=net{i},path={}", paths.net_sock(i).display()),
        ]);
        push(&["-netdev", &format!("vhost-user,id=n{i},chardev=net{i}")]);
        push(&[
            "-device",
            &format!(
                "virtio-net-device,netdev=n{i},mac={},host_mtu={}",
                net.config.mac, net.config.mtu
            ),
        ]);
    }
    push(&["-device", "virtio-rng-device"]);
    // QMP on `qmp.sock`, which the runtime binds (QEMU in its jail could not make it where the
    // runtime sees it): QEMU accepts on fd 4.
    push(&["-chardev", &format!("socket,id=qmp,fd={QMP_FD},server=on,wait=off")]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    Ok(a)
}

/// What QEMU leaves to remove once it has exited (or failed to start): its sandbox cgroup, the
/// QMP socket, the jail's mount point.
struct AfterExit {
    cgroup: Option<Arc<SandboxCgroup>>,
    /// Where this (runtime) process was before it joined the cgroup.
    runtime_origin: Option<Origin>,
    qmp_sock: PathBuf,
    jail_root: Option<PathBuf>,
}

impl AfterExit {
    /// Blocking (cgroupfs and file removals).
    fn clean(&self) {
        if let Some(cg) = &self.cgroup {
            if let Some(origin) = &self.runtime_origin {
                if let Err(e) = cg.leave(origin) {
                    tracing::warn!(error = %e, "leaving the sandbox cgroup failed");
                }
            }
            if let Err(e) = cg.remove() {
                tracing::warn!(error = %e, "removing the sandbox cgroup failed");
            }
        }
        if let Err(e) = std::fs::remove_file(&self.qmp_sock) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, path = %self.qmp_sock.display(), "removing the QMP socket failed");
            }
        }
        if let Some(root) = &self.jail_root {
            if let Err(e) = std::fs::remove_dir(root) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(error = %e, path = %root.display(), "removing the jail's mount point failed");
                }
            }
        }
    }
}

/// Binds QMP's listening socket (replacing a stale one) for QEMU to accept on ([`QMP_FD`]).
fn bind_qmp(path: &Path) -> Result<std::os::fd::OwnedFd, HypervisorError> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| HypervisorError::Io { what, source }
    };
    use std::os::unix::fs::FileTypeExt as _;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path).map_err(io("remove the stale QMP socket"))?;
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(io("bind the QMP socket"))?;
    jail::high_fd(l.into()).map_err(io("dup the QMP socket"))
}

/// The jail QEMU runs in (`security.qemu_jail`): the system, its binary, the kernel and initrd,
/// its vhost-user sockets (given to `user`), `/dev/kvm` under KVM (blocking).
fn confine(spec: &VmSpec, paths: &VmPaths, binary: &Path, user: &str) -> Result<Jail, JailError> {
    let mut b = JailBuilder::new(&spec.state_dir.join(jail::ROOT_DIR), Credentials::resolve(user)?);
    if spec.accel == Accelerator::Kvm {
        b.add_kvm()?;
    }
    b.system()?
        .add_file(binary, true)?
        .add_file(&spec.kernel, false)?
        .add_file(&spec.initrd, false)?
        .add_socket(&paths.vhost_vsock_sock)?;
    if let Some(ShareFsTransport::VhostUser { socket, .. }) = spec.share_fs.as_ref().map(|fs| &fs.transport) {
        b.add_socket(socket)?;
    }
    for i in 0..spec.net.len() {
        b.add_socket(&paths.net_sock(i))?;
    }
    b.build()
}

/// QEMU's own seccomp filter (with seccomp on): obsolete calls, privilege changes, new
/// processes and resource-control calls (scheduler, affinity, memory policy) are refused.
pub const SANDBOX_ARGS: [&str; 2] = [
    "-sandbox",
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
];

/// QEMU's fd for the console pipe.
const CONSOLE_FD: i32 = 3;
/// The fd set QEMU gets the console pipe in.
const CONSOLE_FDSET: u32 = 1;
/// QEMU's fd for QMP's listening socket.
const QMP_FD: i32 = 4;
/// How long QEMU's exit waits for the console pump to write the last output to the log.
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);

/// The guest console: QEMU writes into a pipe, a thread (`joey-console`) copies it into the
/// console log, capped at `hypervisor.console_log_max_kib` with the newest output kept (a
/// flooding guest cannot fill the disk). It ends at EOF (QEMU gone) and then says so on `done`.
struct ConsolePump {
    /// The pipe's write end, handed to QEMU as fd [`CONSOLE_FD`]; closed here once QEMU runs.
    write: std::os::fd::OwnedFd,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    done: tokio::sync::oneshot::Receiver<()>,
}

impl ConsolePump {
    /// Creates the log and the pipe and starts the thread (blocking).
    fn start(log: &Path, cap: u64) -> Result<ConsolePump, HypervisorError> {
        use std::io::Read as _;
        let mut out = CappedLog::create(log, cap).map_err(|e| HypervisorError::Device(e.to_string()))?;
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| HypervisorError::Io {
            what: "console pipe".into(),
            source: e.into(),
        })?;
        let write = jail::high_fd(write).map_err(|source| HypervisorError::Io {
            what: "dup the console pipe".into(),
            source,
        })?;
        let dropped = out.dropped().clone();
        let (tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("joey-console".into())
            .spawn(move || {
                joey_vmm_core::seccomp::apply_or_log(joey_vmm_core::seccomp::ThreadClass::Console);
                let mut read = std::fs::File::from(read);
                let mut buf = [0u8; 8192];
                let mut failed = false;
                loop {
                    match read.read(&mut buf) {
                        Ok(0) => break,
                        // Keep draining even when the log cannot be written (a full disk):
                        // QEMU, and so the guest, must never stall on its console.
                        Ok(n) => {
                            if let Err(e) = out.append(&buf[..n]) {
                                if !failed {
                                    tracing::warn!(error = %e, "console log write failed; dropping console output");
                                    failed = true;
                                }
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "reading the console pipe failed");
                            break;
                        }
                    }
                }
                let _ = tx.send(());
            })
            .map_err(|e| HypervisorError::Io {
                what: "spawn the console thread".into(),
                source: e,
            })?;
        Ok(ConsolePump { write, dropped, done })
    }
}

/// A running QEMU microVM.
pub struct QemuVm {
    pub pid: u32,
    pub paths: VmPaths,
    exit_rx: watch::Receiver<Option<VmExit>>,
    /// Shared with the device watchdog task; taken out (None) when the VM is stopped on purpose.
    vsock: Arc<Mutex<Option<VhostUserVsockHandle>>>,
    /// The vsock device's counters (they outlive the device thread).
    vsock_metrics: Arc<VsockMetrics>,
    /// The counters of the ShareFs actor's vhost-user virtio-fs device (from the spec).
    fs_metrics: Option<Arc<FsMetrics>>,
    /// The virtio-net device threads (taken out when the VM is stopped on purpose).
    net: Vec<VhostUserNetHandle>,
    /// Their counters, in device order.
    net_metrics: Vec<Arc<NetMetrics>>,
    /// Console output dropped by the log's cap.
    console_dropped: Arc<std::sync::atomic::AtomicU64>,
    pub started_at: Instant,
}

/// How often the watchdog looks at the device thread.
const DEVICE_WATCH_PERIOD: Duration = Duration::from_millis(200);
/// How long QEMU may take to exit after its vsock device thread ended before it counts as hung.
const DEVICE_EXIT_GRACE: Duration = Duration::from_secs(2);

/// Kills QEMU if the vsock device thread ends while the VM runs: without it the agent is
/// unreachable, and the sandbox must fail now (VmDied) rather than at the next timeout.
fn spawn_device_watchdog(
    pid: u32,
    vsock: Arc<Mutex<Option<VhostUserVsockHandle>>>,
    mut exit: watch::Receiver<Option<VmExit>>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(DEVICE_WATCH_PERIOD);
        loop {
            tokio::select! {
                _ = exit.wait_for(|v| v.is_some()) => return,
                _ = tick.tick() => {}
            }
            let dead = vsock
                .lock()
                .map(|g| g.as_ref().is_some_and(|h| h.is_finished()))
                .unwrap_or(false);
            if !dead {
                continue;
            }
            // A guest that powers off makes QEMU drop the vhost-user connection (which ends the
            // device thread) a moment before QEMU itself exits: give it that moment.
            if tokio::time::timeout(DEVICE_EXIT_GRACE, exit.wait_for(|v| v.is_some()))
                .await
                .is_ok()
            {
                return;
            }
            if exit.borrow().is_none() {
                tracing::error!(pid, "vsock device thread ended while the VM runs; killing QEMU");
                // SAFETY: kill(2) on our own QEMU child, which the exit watch says is not reaped.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
                return;
            }
        }
    });
}

impl QemuVm {
    /// Starts the device threads on the blocking pool (binding sockets, creating the log and
    /// spawning threads block), then QEMU from the calling task's thread: QEMU gets
    /// `PR_SET_PDEATHSIG`, which fires when the *thread* that forked it exits, so it must not be
    /// a blocking-pool thread (those exit after 10 s idle, which killed QEMU mid-run).
    pub async fn start(spec: VmSpec) -> Result<QemuVm, HypervisorError> {
        let accel = spec.accel;
        let launch = tokio::task::spawn_blocking(move || Launch::prepare(&spec))
            .await
            .map_err(|e| HypervisorError::Task(e.to_string()))??;
        launch.spawn(accel)
    }
}

/// A QEMU ready to spawn: its command line and the device threads it will connect to.
struct Launch {
    cmd: std::process::Command,
    /// What to remove once QEMU has exited.
    after: AfterExit,
    /// The jail (for its error messages) and the child's step report.
    jail: Option<Arc<Jail>>,
    report: Arc<StepReport>,
    /// QMP's listening socket, until QEMU holds it.
    qmp: std::os::fd::OwnedFd,
    paths: VmPaths,
    vsock: VhostUserVsockHandle,
    vsock_metrics: Arc<VsockMetrics>,
    fs_metrics: Option<Arc<FsMetrics>>,
    net: Vec<VhostUserNetHandle>,
    net_metrics: Vec<Arc<NetMetrics>>,
    console: ConsolePump,
}

impl Launch {
    /// Blocking part of [`QemuVm::start`]: the device threads, the log, the command.
    fn prepare(spec: &VmSpec) -> Result<Launch, HypervisorError> {
        let binary = resolve_binary(&spec.qemu_binary)?;
        let paths = VmPaths::new(&spec.state_dir);
        let mut args = qemu_args(spec, &paths, super::host::host_tsc_khz())?;
        // With seccomp on (`security.seccomp`), QEMU inherits the runtime thread's filter, adds
        // the io_uring refusal between fork and exec, and its own `-sandbox` (docs/security.md).
        let child_filter = seccomp::qemu_child_filter().map_err(|e| HypervisorError::Device(e.to_string()))?;
        if child_filter.is_some() {
            args.extend(SANDBOX_ARGS.iter().map(|s| s.to_string()));
        }
        let fs_metrics = spec.share_fs.as_ref().and_then(|fs| match &fs.transport {
            ShareFsTransport::VhostUser { metrics, .. } => Some(metrics.clone()),
            ShareFsTransport::InProcess => None,
        });
        let server = VhostUserVsockServer::bind(
            &paths.vhost_vsock_sock,
            VsockConfig {
                guest_cid: spec.guest_cid,
                uds_path: paths.vsock_uds.clone(),
                limits: super::rate_limits::rx_tx(&spec.vsock_limits),
            },
        )
        .map_err(|e| HypervisorError::Device(e.to_string()))?;
        let vsock = server.spawn().map_err(|e| HypervisorError::Device(e.to_string()))?;
        let vsock_metrics = vsock.metrics().clone();
        // On an error below, dropping the handles stops the device threads and removes sockets.
        let net = spawn_net_devices(spec, &paths)?;
        let net_metrics = net.iter().map(|n| n.metrics().clone()).collect();
        let console = ConsolePump::start(&paths.console_log, spec.console_log_max_bytes)?;
        let console_fd = std::os::fd::AsRawFd::as_raw_fd(&console.write);

        let log = std::fs::File::create(&paths.qemu_log).map_err(|e| HypervisorError::Io {
            what: format!("create {}", paths.qemu_log.display()),
            source: e,
        })?;
        let log2 = log.try_clone().map_err(|e| HypervisorError::Io {
            what: "dup qemu log fd".into(),
            source: e,
        })?;
        let report = Arc::new(StepReport::new()?);
        let qmp = bind_qmp(&paths.qmp_sock)?;
        let qmp_fd = std::os::fd::AsRawFd::as_raw_fd(&qmp);
        // The jail (`security.qemu_jail`): built here, entered by the child below.
        let jail = match spec.qemu_user.as_deref().map(|u| confine(spec, &paths, &binary, u)).transpose() {
            Ok(j) => j.map(Arc::new),
            Err(e) => {
                let _ = std::fs::remove_file(&paths.qmp_sock);
                return Err(e.into());
            }
        };
        // The sandbox cgroup (last: nothing below fails and would leave it). A host without the
        // memory and pids controllers runs QEMU without it, and says so.
        // The shim joins it too (`sandbox_cgroup::set_runtime_joins`), with its share added.
        let joins = sandbox_cgroup::runtime_joins();
        let limits = Limits::for_size(spec.memory_mib, spec.vcpus);
        let limits = if joins { limits.with_runtime() } else { limits };
        let cgroup = match SandboxCgroup::create(&spec.id, limits) {
            Ok(cg) => Some(Arc::new(cg)),
            Err(e) => {
                tracing::warn!(error = %e, "QEMU runs without its sandbox cgroup");
                None
            }
        };
        let runtime_origin = match cgroup.as_ref().filter(|_| joins).map(|cg| cg.join_self()) {
            Some(Ok(origin)) => Some(origin),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the runtime stays outside the sandbox cgroup");
                None
            }
            None => None,
        };
        let after = AfterExit {
            cgroup: cgroup.clone(),
            runtime_origin,
            qmp_sock: paths.qmp_sock.clone(),
            jail_root: jail.as_ref().map(|j| j.root().to_path_buf()),
        };
        let (join, confined, steps) = (cgroup, jail.clone(), report.clone());
        let parent = std::process::id() as libc::pid_t;
        let mut cmd = std::process::Command::new(&binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            // Own process group: a Ctrl-C on the terminal reaches joeyctl, which tears the VM down.
            .process_group(0);
        // SAFETY: the closure only makes async-signal-safe system calls on memory prepared
        // before the fork (open(2), write(2) and close(2) of the cgroup's files, the jail's
        // mount(2), pivot_root(2) and credential calls, prctl(2), seccomp(2) with a filter
        // compiled before the fork, dup2(2)) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let steps: &StepReport = &steps;
                let fail = |step: Step| move |e: std::io::Error| steps.fail(step, 0, e);
                // Joined as root, before the jail drops the privileges it takes.
                if let Some(cg) = &join {
                    cg.join_in_child().map_err(fail(Step::JoinCgroup))?;
                }
                if let Some(j) = &confined {
                    j.enter_in_child(steps)?;
                }
                // QEMU must not outlive the runtime process, even if it is SIGKILLed. Set after
                // the change of credentials, which clears it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(fail(Step::DeathSignal)(std::io::Error::last_os_error()));
                }
                if libc::getppid() != parent {
                    return Err(fail(Step::ParentGone)(std::io::Error::from_raw_os_error(libc::ESRCH)));
                }
                if let Some(f) = &child_filter {
                    f.apply_in_child().map_err(fail(Step::Seccomp))?;
                }
                // The console pipe on CONSOLE_FD and QMP's socket on QMP_FD, without
                // close-on-exec (both come from fds numbered HIGH_FD or above).
                if libc::dup2(console_fd, CONSOLE_FD) < 0 || libc::dup2(qmp_fd, QMP_FD) < 0 {
                    return Err(fail(Step::Fds)(std::io::Error::last_os_error()));
                }
                Ok(())
            });
        }
        Ok(Launch {
            cmd,
            after,
            jail,
            report,
            qmp,
            paths,
            vsock,
            vsock_metrics,
            fs_metrics,
            net,
            net_metrics,
            console,
        })
    }

    /// Spawns QEMU from this (long-lived runtime) thread; the exit watcher and the device
    /// watchdog are tokio tasks. On failure the device threads stop and their sockets go
    /// (dropping their handles; no join).
    fn spawn(self, accel: Accelerator) -> Result<QemuVm, HypervisorError> {
        let binary = self.cmd.get_program().to_string_lossy().into_owned();
        let mut cmd = tokio::process::Command::from(self.cmd);
        cmd.kill_on_drop(true);
        let started_at = Instant::now();
        let after = self.after;
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                tokio::task::spawn_blocking(move || after.clean());
                return Err(match self.report.error(self.jail.as_deref(), source) {
                    Ok(source) => HypervisorError::Spawn { binary, source },
                    Err(step) => step.into(),
                });
            }
        };
        let pid = child.id().unwrap_or(0);
        // QEMU holds QMP's socket now.
        drop(self.qmp);
        // Only QEMU holds the console pipe's write end now: its exit is the pump's EOF.
        let ConsolePump { write, dropped, done } = self.console;
        drop(write);
        let (tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let st = child.wait().await;
            let exit = match st {
                Ok(s) => VmExit::from_status(s),
                Err(e) => VmExit::WaitFailed(e.to_string()),
            };
            let _ = tokio::task::spawn_blocking(move || after.clean()).await;
            // The console log is complete before anyone reads its tail for the exit report.
            let _ = tokio::time::timeout(CONSOLE_DRAIN, done).await;
            let _ = tx.send(Some(exit));
        });
        tracing::info!(pid, %accel, "qemu started");
        let vsock = Arc::new(Mutex::new(Some(self.vsock)));
        spawn_device_watchdog(pid, vsock.clone(), exit_rx.clone());
        Ok(QemuVm {
            pid,
            paths: self.paths,
            exit_rx,
            vsock,
            vsock_metrics: self.vsock_metrics,
            fs_metrics: self.fs_metrics,
            net: self.net,
            net_metrics: self.net_metrics,
            console_dropped: dropped,
            started_at,
        })
    }
}

impl QemuVm {
    /// The counters of the devices this backend serves in-process (vsock) and of the ShareFs
    /// actor's virtio-fs device it was given in the spec. QEMU has no vCPU exit counters.
    pub fn counter_sources(&self) -> super::counters::VmCounterSources {
        super::counters::VmCounterSources {
            vsock: Some(self.vsock_metrics.clone()),
            fs: self.fs_metrics.clone(),
            blk: Vec::new(),
            net: self.net_metrics.clone(),
            vcpus: None,
            console_dropped: Some(self.console_dropped.clone()),
        }
    }

    /// A receiver that turns `Some` once QEMU has exited.
    pub fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.exit_rx.clone()
    }

    /// Stops the VM: waits up to `grace` for the guest to exit by itself (after the agent's
    /// DestroySandbox), then QMP `quit`, then SIGKILL. Stops and joins the device thread.
    pub async fn stop(mut self, grace: Duration) -> Result<(StopMethod, VmExit), HypervisorError> {
        let (pid, qmp) = (self.pid, self.paths.qmp_sock.clone());
        let quit = StopStep {
            method: StopMethod::QmpQuit,
            action: Box::pin(async move {
                if let Err(e) = qmp_quit(&qmp, Duration::from_secs(2)).await {
                    tracing::warn!(error = %e, "QMP quit failed");
                }
            }),
            wait: Duration::from_secs(3),
        };
        let kill = StopStep {
            method: StopMethod::Kill,
            action: Box::pin(async move {
                tracing::warn!(pid, "qemu did not quit; sending SIGKILL");
                // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet
                // (the watcher task has not reported its exit).
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }),
            wait: Duration::from_secs(5),
        };
        let (method, exit) = stop_in_steps(self.exit_rx.clone(), grace, vec![quit, kill]).await;
        // Joining the device thread blocks (bounded by its timeout): keep it off the async runtime.
        let vsock = self.take_vsock();
        let net = std::mem::take(&mut self.net);
        let _ = tokio::task::spawn_blocking(move || {
            Self::stop_vsock(vsock);
            stop_net_devices(net);
        })
        .await;
        match exit {
            Some(e) => Ok((method, e)),
            None => Err(HypervisorError::StopTimeout(self.pid)),
        }
    }

    fn stop_vsock(vsock: Option<VhostUserVsockHandle>) {
        if let Some(v) = vsock {
            v.stop();
            if let Err(e) = v.join_timeout(Duration::from_secs(3)) {
                tracing::warn!(error = %e, "vsock device thread ended with an error or did not end in time");
            }
        }
    }

    fn take_vsock(&mut self) -> Option<VhostUserVsockHandle> {
        match self.vsock.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }
}

impl Drop for QemuVm {
    /// Only signals (never joins or waits): SIGKILL to a QEMU still running, stop to the device
    /// thread (dropping its handle removes its sockets). [`QemuVm::stop`] is the orderly way.
    fn drop(&mut self) {
        if self.exit_rx.borrow().is_none() {
            // SAFETY: kill(2) on our own, not yet reaped child.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
            }
        }
        if let Some(v) = self.take_vsock() {
            v.stop();
        }
        for n in &self.net {
            n.stop();
        }
    }
}

/// Binds and starts one vhost-user virtio-net device per pod interface of the spec (before QEMU
/// connects to their sockets).
fn spawn_net_devices(spec: &VmSpec, paths: &VmPaths) -> Result<Vec<VhostUserNetHandle>, HypervisorError> {
    let device = |i: usize, e: &dyn std::fmt::Display| HypervisorError::Device(format!("virtio-net device {i}: {e}"));
    let mut handles = Vec::with_capacity(spec.net.len());
    for (i, net) in spec.net.iter().enumerate() {
        let tap = net.device_tap().map_err(|e| device(i, &e))?;
        let server = VhostUserNetServer::bind(&paths.net_sock(i), net.config, tap).map_err(|e| device(i, &e))?;
        handles.push(server.spawn().map_err(|e| device(i, &e))?);
    }
    Ok(handles)
}

/// Stops the virtio-net device threads and joins each within a bound (blocking).
fn stop_net_devices(net: Vec<VhostUserNetHandle>) {
    for n in &net {
        n.stop();
    }
    for (i, n) in net.into_iter().enumerate() {
        if let Err(e) = n.join_timeout(Duration::from_secs(3)) {
            tracing::warn!(error = %e, device = i, "virtio-net device thread ended with an error or did not end in time");
        }
    }
}

/// Sends `quit` over QMP.
pub async fn qmp_quit(sock: &Path, timeout: Duration) -> Result<(), HypervisorError> {
    let fut = async {
        let stream = UnixStream::connect(sock).await?;
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        // Greeting.
        let _ = lines.next_line().await?;
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").await?;
        let _ = lines.next_line().await?;
        w.write_all(b"{\"execute\":\"quit\"}\n").await?;
        let _ = lines.next_line().await?;
        Ok::<(), std::io::Error>(())
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(HypervisorError::Qmp(e.to_string())),
        Err(_) => Err(HypervisorError::Qmp("timed out".into())),
    }
}

impl VmExit {
    fn from_status(s: ExitStatus) -> VmExit {
        use std::os::unix::process::ExitStatusExt as _;
        match (s.code(), s.signal()) {
            (Some(c), _) => VmExit::Exited(c),
            (None, Some(sig)) => VmExit::Signaled(sig),
            _ => VmExit::WaitFailed("unknown exit status".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::tests::rt;
    use crate::sharefs::ShareFsDevice;

    fn spec() -> VmSpec {
        VmSpec {
            id: "t".into(),
            state_dir: PathBuf::from("/run/joey/t"),
            vcpus: 2,
            memory_mib: 256,
            kernel: PathBuf::from("/k/bzImage"),
            initrd: PathBuf::from("/k/initrd.img"),
            kernel_params: "foo=1".into(),
            agent_port: 2048,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            tcg_tb_size_mib: 0,
            accel: Accelerator::Tcg,
            guest_cid: 3,
            share_fs: None,
            net: Vec::new(),
            console_log_max_bytes: 0,
            vsock_limits: Default::default(),
            qemu_user: None,
        }
    }

    #[test]
    fn args_have_the_vhost_user_requirements() {
        let s = spec();
        let a = qemu_args(&s, &VmPaths::new(&s.state_dir), Some(2_600_003)).unwrap().join(" ");
        assert!(a.contains("acpi=off"));
        assert!(a.contains("rtc=on"), "the guest stalls ~1 s without an RTC");
        assert!(a.contains("memory-backend-memfd,id=mem,size=256M,share=on"));
        assert!(a.contains("virtio-mmio.force-legacy=false"));
        assert!(a.contains("-accel tcg -cpu max"));
        let small = VmSpec { tcg_tb_size_mib: 16, ..spec() };
        let b = qemu_args(&small, &VmPaths::new(&small.state_dir), None).unwrap().join(" ");
        assert!(b.contains("-accel tcg,tb-size=16 -cpu max"), "{b}");
        let kvm = VmSpec { accel: Accelerator::Kvm, ..small };
        let k = qemu_args(&kvm, &VmPaths::new(&kvm.state_dir), None).unwrap().join(" ");
        assert!(k.contains("-accel kvm -cpu host"), "the code cache is TCG's only: {k}");
        assert!(a.contains("-smp 2"));
        assert!(a.contains("vhost-user-vsock-device,chardev=vsock0"));
        assert!(a.contains("path=/run/joey/t/vhost-vsock.sock"));
        assert!(a.contains("-no-reboot"));
        // The console pipe and QMP's socket are fds (QEMU's jail has no /proc, and its sockets
        // would not be seen by the runtime).
        assert!(
            a.contains(
                "-add-fd fd=3,set=1 -chardev file,id=con0,path=/dev/fdset/1,append=on -serial chardev:con0"
            ),
            "{a}"
        );
        assert!(
            a.contains("-chardev socket,id=qmp,fd=4,server=on,wait=off -mon chardev=qmp,mode=control"),
            "{a}"
        );
        assert!(!a.contains("/proc/self") && !a.contains("qmp.sock"), "{a}");
        assert!(
            a.contains(
                "-append console=ttyS0 reboot=t panic=-1 quiet no_timer_check apic_timer_hz=1000000000 \
                 tsc_early_khz=2600003 foo=1 joey.agent_port=2048 "
            ),
            "{a}"
        );
        assert!(!a.contains("vhost-user-fs-device"));
    }

    #[test]
    fn args_attach_the_sharefs_device() {
        let mut s = spec();
        s.share_fs = Some(ShareFsDevice {
            shared_dir: PathBuf::from("/run/joey/t/shared"),
            tag: "joeyfs",
            transport: ShareFsTransport::VhostUser {
                socket: PathBuf::from("/run/joey/t/vhost-fs.sock"),
                metrics: Arc::new(FsMetrics::default()),
            },
        });
        let paths = VmPaths::new(&s.state_dir);
        let a = qemu_args(&s, &paths, None).unwrap().join(" ");
        assert!(a.contains("-chardev socket,id=fs0,path=/run/joey/t/vhost-fs.sock"));
        assert!(a.contains("-device vhost-user-fs-device,chardev=fs0,tag=joeyfs"));
        // QEMU cannot serve the directory itself.
        s.share_fs.as_mut().unwrap().transport = ShareFsTransport::InProcess;
        assert!(matches!(qemu_args(&s, &paths, None), Err(HypervisorError::Device(_))));
    }

    #[test]
    fn args_attach_one_vhost_user_net_device_per_interface() {
        use joey_vmm_core::devices::net::{MacAddr, NetAttachment, NetConfig, Tap};
        // A tap in a namespace of its own (the thread's), so the host's is untouched.
        let tap = std::thread::spawn(|| {
            // SAFETY: unshare(2) only changes this short-lived thread's namespaces.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            Tap::open("tap0_joey").unwrap()
        })
        .join()
        .unwrap();
        let tap = Arc::new(tap);
        let mut s = spec();
        s.net = [(0x02, 1500), (0x06, 9000)]
            .into_iter()
            .map(|(m, mtu)| NetAttachment {
                config: NetConfig {
                    mac: MacAddr([m, 0, 0, 0, 0, 1]),
                    mtu,
                    limits: Default::default(),
                },
                tap: tap.clone(),
            })
            .collect();
        let a = qemu_args(&s, &VmPaths::new(&s.state_dir), None).unwrap().join(" ");
        for i in 0..2 {
            assert!(a.contains(&format!("-chardev socket,id=net{i},path=/run/joey/t/net{i}.sock")), "{a}");
            assert!(a.contains(&format!("-netdev vhost-user,id=n{i},chardev=net{i}")), "{a}");
        }
        assert!(a.contains("-device virtio-net-device,netdev=n0,mac=02:00:00:00:00:01,host_mtu=1500"), "{a}");
        assert!(a.contains("-device virtio-net-device,netdev=n1,mac=06:00:00:00:00:01,host_mtu=9000"), "{a}");
    }

    #[test]
    fn resolve_missing_binary_is_typed() {
        let e = resolve_binary(Path::new("/nonexistent/qemu")).unwrap_err();
        assert!(matches!(e, HypervisorError::QemuNotFound(_)));
        let e = resolve_binary(Path::new("no-such-qemu-binary-xyz")).unwrap_err();
        assert_eq!(e.to_string(), "QEMU binary not found: no-such-qemu-binary-xyz");
        assert!(resolve_binary(Path::new("sh")).is_ok());
    }

    /// A running vhost-user vsock device (no frontend) in `dir`.
    fn vsock_device(dir: &Path) -> VhostUserVsockHandle {
        let cfg = VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("vsock.sock"),
            limits: Default::default(),
        };
        VhostUserVsockServer::bind(&dir.join("vhost.sock"), cfg)
            .unwrap()
            .spawn()
            .unwrap()
    }

    type DeviceSlot = Arc<Mutex<Option<VhostUserVsockHandle>>>;

    /// A stand-in for QEMU (a child that only a SIGKILL ends quickly), a vsock device in `dir`
    /// and the watchdog over both: (child, device slot, exit sender).
    fn watched_vm(dir: &Path) -> (tokio::process::Child, DeviceSlot, watch::Sender<Option<VmExit>>) {
        let child = tokio::process::Command::new("sleep").arg("30").spawn().unwrap();
        let (tx, exit_rx) = watch::channel(None);
        let slot = Arc::new(Mutex::new(Some(vsock_device(dir))));
        spawn_device_watchdog(child.id().unwrap(), slot.clone(), exit_rx);
        (child, slot, tx)
    }

    #[test]
    fn watchdog_kills_qemu_when_the_vsock_thread_dies() {
        rt().block_on(async {
            let d = tempfile::tempdir().unwrap();
            let (mut child, device, _tx) = watched_vm(d.path());
            // While the device thread lives, nothing happens.
            tokio::time::sleep(DEVICE_WATCH_PERIOD * 3).await;
            assert!(child.try_wait().unwrap().is_none(), "killed while the device was alive");
            // The device thread ends (as if it failed): QEMU is killed within a few periods.
            device.lock().unwrap().as_ref().unwrap().stop();
            let st = tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .expect("watchdog did not kill the VM process")
                .unwrap();
            use std::os::unix::process::ExitStatusExt as _;
            assert_eq!(st.signal(), Some(libc::SIGKILL));
        });
    }

    #[test]
    fn watchdog_lets_a_powering_off_vm_exit_on_its_own() {
        rt().block_on(async {
            let d = tempfile::tempdir().unwrap();
            let (mut child, device, tx) = watched_vm(d.path());
            // The device thread ends first (QEMU dropped vhost-user while powering off) ...
            device.lock().unwrap().as_ref().unwrap().stop();
            tokio::time::sleep(DEVICE_WATCH_PERIOD * 2).await;
            // ... and the VM exit is recorded within the grace period: no kill.
            tx.send_replace(Some(VmExit::Exited(0)));
            tokio::time::sleep(DEVICE_EXIT_GRACE + DEVICE_WATCH_PERIOD).await;
            assert!(
                child.try_wait().unwrap().is_none(),
                "a VM that was exiting got SIGKILLed"
            );
            child.kill().await.unwrap();
        });
    }

    #[test]
    fn watchdog_leaves_a_deliberately_stopped_device_alone() {
        rt().block_on(async {
            let mut child = tokio::process::Command::new("sleep").arg("30").spawn().unwrap();
            let pid = child.id().unwrap();
            let (_tx, exit_rx) = watch::channel(None);
            // Handle already taken out (the VM is being stopped on purpose).
            spawn_device_watchdog(pid, Arc::new(Mutex::new(None)), exit_rx);
            tokio::time::sleep(DEVICE_WATCH_PERIOD * 3).await;
            assert!(child.try_wait().unwrap().is_none());
            child.kill().await.unwrap();
        });
    }
}
