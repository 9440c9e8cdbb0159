//! `joey-pool`: the warm VM pool (docs/pool.md).
//!
//! Keeps `pool.size` QEMU VMs of its config's shape booted, each with its agent having answered
//! `Check`, and leases them over `<runtime.state_dir>/.pool/pool.sock`
//! ([`joey_actors::hypervisor::pooled`] is the protocol). The pool owns every VM it booted,
//! leased or not: its QEMU (a child of this process, killed by the kernel if this process dies),
//! its vsock and virtio-fs backends (threads of this process) and its directory
//! `<state>/.pool/vms/<vm-id>/`. A lease lives as long as its connection; when the connection
//! closes the VM is stopped and removed, and it is never handed out again. A refill boot starts
//! after each lease, one boot at a time. SIGTERM/SIGINT stop and remove every VM, then the
//! pool's own files. A start first removes what a crashed pool left behind (processes, mounts,
//! directories); a single pool per state dir is enforced with a lock file.
//!
//! Each VM is a Hypervisor actor and a ShareFs actor of its own, as in a sandbox; the Pool actor
//! owns the ready VMs and the counts, and every connection is a task that owns its leased VM.

use std::collections::VecDeque;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use actix::prelude::*;
use clap::{Parser, Subcommand};
use joey_actors::hypervisor::pooled::{self, LeasedVm, Reply, Request, Shape};
use joey_actors::hypervisor::{
    host, select_backend, BackendKind, HypervisorActor, HypervisorError, StartVm, StopVm, VmExit,
    VmStarted,
};
use joey_actors::sandbox::{plan, prepare, SandboxError};
use joey_actors::sharefs::{SetupShareFs, ShareFsActor, ShareFsError, StopShareFs};
use joey_actors::{AgentClient, AgentError};
use joey_config::Config;
use tokio::io::BufReader;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::shim::cleanup::kill_processes_mentioning;
use crate::shim::mounts::{unmount_below, MountError};

/// Exit code for bad input (config, host), as joeyctl's.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code for a failure (another pool runs, a file operation failed, leftovers).
pub const EXIT_FAILURE: i32 = 1;
/// How long a connection may take to send its first request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between boot retries after failures (doubling from one second).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long an orphaned QEMU may take to go after SIGKILL.
const ORPHAN_KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often shutdown looks whether every VM is gone.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);

#[derive(Parser, Debug)]
#[command(
    name = "joey-pool",
    version,
    about = "joey warm VM pool: keeps VMs booted and leases them to joeyctl and the shim"
)]
pub struct Cli {
    /// Config file (default: $JOEY_CONFIG, else /etc/joey/config.toml if present, else built-in defaults).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Log at least at info level to stderr (default: `runtime.log_level`).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Print the running pool's counts (`ready=N booting=N leased=N size=N`); exit 1 when no
    /// pool runs.
    Status,
    /// Lease a VM of the config's shape as a sandbox would, print `vm_id=.. dir=.. pid=..` and
    /// hold the lease until stdin closes or a SIGTERM/SIGINT (for operators and tests); exit 1
    /// when no VM was leased (the reason on stderr).
    Lease,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolServerError {
    #[error("{0}")]
    BadInput(String),
    #[error("another joey-pool runs on {0} (its lock is held)")]
    AlreadyRunning(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    ShareFs(#[from] ShareFsError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Mounts(#[from] MountError),
    #[error(transparent)]
    Pool(#[from] pooled::PoolError),
    #[error("the VM {0} before its agent answered")]
    Died(VmExit),
    #[error("actor mailbox: {0}")]
    Mailbox(#[from] MailboxError),
    #[error("blocking task failed: {0}")]
    Task(String),
    #[error("{0} are left behind")]
    Leftovers(String),
}

impl PoolServerError {
    fn exit_code(&self) -> i32 {
        match self {
            PoolServerError::BadInput(_) => EXIT_BAD_INPUT,
            PoolServerError::Sandbox(e) if e.is_bad_input() => EXIT_BAD_INPUT,
            _ => EXIT_FAILURE,
        }
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> PoolServerError {
    move |source| PoolServerError::Io { what, source }
}

/// Runs blocking work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, PoolServerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PoolServerError::Task(e.to_string()))
}

/// `<state>/.pool/vms`.
fn vms_dir(pool_dir: &Path) -> PathBuf {
    pool_dir.join("vms")
}

/// One VM the pool booted.
pub struct PoolVm {
    vm_id: String,
    dir: PathBuf,
    shape: Shape,
    hv: Addr<HypervisorActor>,
    sharefs: Addr<ShareFsActor>,
    started: VmStarted,
}

impl PoolVm {
    fn leased(&self) -> LeasedVm {
        LeasedVm {
            vm_id: self.vm_id.clone(),
            dir: self.dir.clone(),
            pid: self.started.pid,
            vsock_uds: self.started.vsock_uds.clone(),
            console_log: self.started.console_log.clone(),
            qemu_log: self
                .started
                .vmm_log
                .clone()
                .unwrap_or_else(|| self.dir.join("qemu.log")),
        }
    }

    fn exited(&self) -> bool {
        self.started.exit.borrow().is_some()
    }

    /// Stops the VM and removes all of it.
    async fn remove(self, grace: Duration) {
        remove_vm(&self.hv, &self.sharefs, self.dir, grace).await;
    }
}

/// Stops a VM (after `grace`), its devices and shares, and removes its directory once nothing
/// is mounted in it (never a recursive delete through a mount). Failures are logged.
async fn remove_vm(
    hv: &Addr<HypervisorActor>,
    sharefs: &Addr<ShareFsActor>,
    dir: PathBuf,
    grace: Duration,
) {
    match hv.send(StopVm { grace }).await {
        Ok(Ok(_)) | Ok(Err(HypervisorError::NotRunning)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, dir = %dir.display(), "stopping a pool VM failed"),
        Err(e) => tracing::warn!(error = %e, "stopping a pool VM: actor unreachable"),
    }
    match sharefs.send(StopShareFs).await {
        Ok(Ok(())) => {}
        // A lessee's leftovers keep the shared dir from going: the unmounts below take them.
        Ok(Err(e)) => tracing::debug!(error = %e, "pool VM sharefs cleanup incomplete"),
        Err(e) => tracing::warn!(error = %e, "stopping a pool VM's sharefs: actor unreachable"),
    }
    let shown = dir.display().to_string();
    match blocking(move || remove_dir_unmounted(&dir)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, dir = %shown, "removing a pool VM's directory failed")
        }
        Err(e) => tracing::warn!(error = %e, dir = %shown, "removing a pool VM's directory failed"),
    }
}

/// Unmounts everything at or below `dir`, then removes it recursively (blocking). Gone already
/// is fine; a mount that stays is an error and the directory is kept.
fn remove_dir_unmounted(dir: &Path) -> Result<(), PoolServerError> {
    if !unmount_below(dir)? {
        return Err(PoolServerError::Leftovers(format!(
            "mounts under {}",
            dir.display()
        )));
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("remove {}", dir.display()))(e)),
    }
}

/// Boots one VM of the config's shape in `<vms>/<vm-id>` and waits for its agent; on failure
/// everything it started is removed.
async fn boot_vm(cfg: Config, origin: String, vms: PathBuf) -> Result<PoolVm, PoolServerError> {
    let vm_id = format!("vm-{}", joey_actors::new_sandbox_id());
    let dir = vms.join(&vm_id);
    let (c, o, id, d) = (cfg.clone(), origin, vm_id.clone(), dir.clone());
    let prepared = blocking(move || prepare(&c, &o, &id, &d)).await??;
    if prepared.backend != BackendKind::Qemu {
        let _ = blocking(move || std::fs::remove_dir(&dir)).await;
        return Err(PoolServerError::BadInput(format!(
            "the pool runs QEMU VMs; this host and config give {}",
            prepared.backend
        )));
    }
    let shape = Shape::of(&prepared.spec);
    let hv = HypervisorActor::new().start();
    let sharefs = ShareFsActor::new(dir.clone()).start();
    let t0 = Instant::now();
    let booted = async {
        let device = sharefs.send(SetupShareFs { vhost_user: true }).await??;
        let mut spec = prepared.spec;
        spec.share_fs = Some(device);
        let started = hv
            .send(StartVm {
                spec,
                backend: BackendKind::Qemu,
            })
            .await??;
        let mut exit = started.exit.clone();
        let died = async move {
            let _ = exit.wait_for(|v| v.is_some()).await;
            let e = exit.borrow().clone();
            e.unwrap_or(VmExit::WaitFailed("exit watch closed".into()))
        };
        // While it boots the VM yields to the leased ones (this host's cores are few).
        renice(started.pid, BOOT_NICE);
        let a = &cfg.agent;
        let rpc_timeout = Duration::from_millis(a.rpc_timeout_ms);
        let ready = async {
            let agent = AgentClient::connect_ready(
                &started.vsock_uds,
                a.vsock_port,
                Duration::from_millis(a.ready_timeout_ms),
                rpc_timeout,
            )
            .await?;
            warm_up(&agent, rpc_timeout).await
            // The connection closes when the client is dropped: the lessee makes its own.
        };
        tokio::select! {
            r = ready => r?,
            e = died => return Err(PoolServerError::Died(e)),
        }
        renice(started.pid, 0);
        Ok::<_, PoolServerError>(started)
    }
    .await;
    match booted {
        Ok(started) => {
            tracing::info!(vm = %vm_id, pid = started.pid, ms = t0.elapsed().as_millis() as u64, "pool VM ready");
            Ok(PoolVm {
                vm_id,
                dir,
                shape,
                hv,
                sharefs,
                started,
            })
        }
        Err(e) => {
            remove_vm(&hv, &sharefs, dir, Duration::ZERO).await;
            Err(e)
        }
    }
}

/// The nice value of a booting VM's QEMU.
const BOOT_NICE: i32 = 10;
/// The exec id of the warm-up command.
const WARM_UP_EXEC_ID: &str = "joey-pool-warm-up";

/// Sets the nice value of every thread of `pid` (best effort: nice is per thread on Linux).
fn renice(pid: u32, nice: i32) {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for tid in rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::id_t>().ok())
    {
        // SAFETY: setpriority(2) on a thread of our own child; it changes no memory.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            tracing::debug!(pid, tid, nice, "setpriority failed");
        }
    }
}

/// Runs `true` in the guest once and waits for it: under TCG the guest's fork/exec/exit paths
/// are translated on their first run, which then happens here rather than in the lessee's
/// first command. The command is the pool's own; nothing of any sandbox is involved.
async fn warm_up(agent: &AgentClient, timeout: Duration) -> Result<(), PoolServerError> {
    let req = joey_agent_protocol::agent::ExecProcessRequest {
        exec_id: WARM_UP_EXEC_ID.into(),
        argv: vec!["true".into()],
        ..Default::default()
    };
    agent.exec(req).await?;
    tokio::time::timeout(timeout, agent.wait(WARM_UP_EXEC_ID))
        .await
        .map_err(|_| {
            PoolServerError::Agent(AgentError::NotReady(
                timeout,
                "warm-up command did not end".into(),
            ))
        })??;
    Ok(())
}

/// The Pool actor: the ready VMs, the boot in flight and the lease count.
pub struct PoolActor {
    cfg: Config,
    origin: String,
    vms: PathBuf,
    size: usize,
    ready: VecDeque<PoolVm>,
    /// A boot runs (or waits out its backoff).
    booting: bool,
    leased: u32,
    /// VMs being removed in the background (a boot that ended after shutdown began, a ready
    /// VM that died).
    removing: u32,
    stopping: bool,
    failures: u32,
}

impl PoolActor {
    /// Removes a VM on the actor's context, counted in `removing` until it is gone.
    fn remove_later(&mut self, vm: PoolVm, ctx: &mut Context<Self>) {
        self.removing += 1;
        ctx.spawn(
            vm.remove(Duration::ZERO)
                .into_actor(self)
                .map(|(), act, _| act.removing -= 1),
        );
    }

    /// Removes and replaces a ready VM that ends on its own (a leased one is its lease's).
    fn watch_ready(&mut self, vm: &PoolVm, ctx: &mut Context<Self>) {
        let (vm_id, mut exit) = (vm.vm_id.clone(), vm.started.exit.clone());
        ctx.spawn(
            async move {
                let _ = exit.wait_for(|v| v.is_some()).await;
            }
            .into_actor(self)
            .map(move |(), act, ctx| {
                if let Some(i) = act.ready.iter().position(|v| v.vm_id == vm_id) {
                    if let Some(vm) = act.ready.remove(i) {
                        tracing::warn!(vm = %vm_id, "a ready pool VM ended; replacing it");
                        act.remove_later(vm, ctx);
                        act.refill(ctx);
                    }
                }
            }),
        );
    }

    pub fn new(cfg: Config, origin: String, vms: PathBuf) -> Self {
        let size = cfg.pool.size as usize;
        PoolActor {
            cfg,
            origin,
            vms,
            size,
            ready: VecDeque::new(),
            booting: false,
            leased: 0,
            removing: 0,
            stopping: false,
            failures: 0,
        }
    }

    /// Starts a boot when the pool is short of VMs and none runs.
    fn refill(&mut self, ctx: &mut Context<Self>) {
        if self.stopping || self.booting || self.ready.len() >= self.size {
            return;
        }
        self.booting = true;
        let fut = boot_vm(self.cfg.clone(), self.origin.clone(), self.vms.clone());
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| match res {
                        Ok(vm) if act.stopping => {
                act.booting = false;
                act.remove_later(vm, ctx);
            }
            Ok(vm) => {
                act.booting = false;
                act.failures = 0;
                act.watch_ready(&vm, ctx);
                act.ready.push_back(vm);
                act.refill(ctx);
            }
            Err(e) => {
                act.failures += 1;
                let wait = backoff(act.failures);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "booting a pool VM failed");
                ctx.run_later(wait, |act, ctx| {
                    act.booting = false;
                    act.refill(ctx);
                });
            }
        }));
    }
}

/// The wait before the next boot after `failures` failed ones in a row.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(MAX_BACKOFF)
}

impl Actor for PoolActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.refill(ctx);
    }
}

/// Hands out the oldest ready VM of `shape` (moved out: it is never handed out again).
#[derive(Message)]
#[rtype(result = "Result<PoolVm, String>")]
struct TakeVm {
    shape: Shape,
}

/// A leased VM is gone.
#[derive(Message)]
#[rtype(result = "()")]
struct Released;

/// Stop booting and remove every ready VM (leased ones go with their connections).
#[derive(Message)]
#[rtype(result = "()")]
struct Shutdown;

/// The counts.
#[derive(Message)]
#[rtype(result = "Counts")]
struct GetStatus;

#[derive(Debug, Clone, Copy)]
struct Counts {
    ready: u32,
    booting: u32,
    leased: u32,
    removing: u32,
    size: u32,
}

impl Handler<TakeVm> for PoolActor {
    type Result = Result<PoolVm, String>;

    fn handle(&mut self, m: TakeVm, ctx: &mut Context<Self>) -> Self::Result {
        if self.stopping {
            return Err("the pool is shutting down".into());
        }
        let taken = loop {
            match self.ready.pop_front() {
                None => break Err(format!("no VM ready, {} booting", u32::from(self.booting))),
                Some(vm) if vm.exited() => {
                    tracing::warn!(vm = %vm.vm_id, "a ready pool VM ended; removing it");
                    self.remove_later(vm, ctx);
                }
                Some(vm) if vm.shape != m.shape => {
                    self.ready.push_front(vm);
                    break Err("the pool keeps VMs of another shape".into());
                }
                Some(vm) => {
                    self.leased += 1;
                    break Ok(vm);
                }
            }
        };
        self.refill(ctx);
        taken
    }
}

impl Handler<Released> for PoolActor {
    type Result = ();

    fn handle(&mut self, _: Released, _: &mut Context<Self>) {
        self.leased = self.leased.saturating_sub(1);
    }
}

impl Handler<Shutdown> for PoolActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        let ready: Vec<PoolVm> = self.ready.drain(..).collect();
        Box::pin(async move {
            for vm in ready {
                vm.remove(Duration::ZERO).await;
            }
        })
    }
}

impl Handler<GetStatus> for PoolActor {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(Counts {
            ready: self.ready.iter().filter(|v| !v.exited()).count() as u32,
            booting: u32::from(self.booting),
            leased: self.leased,
            removing: self.removing,
            size: self.size as u32,
        })
    }
}

/// Serves one connection: a status query, or a lease that lasts until the connection closes
/// (or the pool shuts down), after which the VM is removed.
async fn serve_conn(stream: UnixStream, pool: Addr<PoolActor>, shutdown: watch::Receiver<bool>) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let first =
        match tokio::time::timeout(REQUEST_TIMEOUT, pooled::read_msg::<Request, _>(&mut r)).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) | Err(_) => return,
            Ok(Err(e)) => {
                refuse(&mut w, e.to_string()).await;
                return;
            }
        };
    let shape = match first {
        Request::Lease { shape } => shape,
        Request::Status => {
            if let Ok(c) = pool.send(GetStatus).await {
                let reply = Reply::Status {
                    ready: c.ready,
                    booting: c.booting,
                    leased: c.leased,
                    size: c.size,
                };
                let _ = pooled::write_msg(&mut w, &reply).await;
            }
            return;
        }
        Request::Stop { .. } => {
            refuse(&mut w, "nothing is leased on this connection".into()).await;
            return;
        }
    };
    let vm = match pool.send(TakeVm { shape }).await {
        Ok(Ok(vm)) => vm,
        Ok(Err(reason)) => {
            let _ = pooled::write_msg(&mut w, &Reply::Empty { reason }).await;
            return;
        }
        Err(e) => {
            let reason = e.to_string();
            let _ = pooled::write_msg(&mut w, &Reply::Empty { reason }).await;
            return;
        }
    };
    let vm_id = vm.vm_id.clone();
    tracing::info!(vm = %vm_id, "pool VM leased");
    serve_lease(&vm, r, w, shutdown).await;
    vm.remove(Duration::ZERO).await;
    pool.do_send(Released);
    tracing::info!(vm = %vm_id, "leased pool VM removed");
}

async fn refuse(w: &mut OwnedWriteHalf, message: String) {
    let _ = pooled::write_msg(w, &Reply::Refused { message }).await;
}

/// The lease: answers stops, tells the lessee when the VM ends; returns when the connection
/// closes (a release, or a dead lessee) or the pool shuts down.
async fn serve_lease(
    vm: &PoolVm,
    mut r: BufReader<OwnedReadHalf>,
    mut w: OwnedWriteHalf,
    mut shutdown: watch::Receiver<bool>,
) {
    if pooled::write_msg(&mut w, &Reply::Leased { vm: vm.leased() })
        .await
        .is_err()
    {
        return;
    }
    let mut exit = vm.started.exit.clone();
    let mut exit_told = false;
    loop {
        tokio::select! {
            msg = pooled::read_msg::<Request, _>(&mut r) => {
                let reply = match msg {
                    Ok(Some(Request::Stop { grace_ms })) => {
                        exit_told = true;
                        stop_reply(vm, Duration::from_millis(grace_ms)).await
                    }
                    Ok(Some(other)) => Reply::Refused {
                        message: format!("{other:?} is not valid during a lease"),
                    },
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, vm = %vm.vm_id, "reading from a lessee failed");
                        return;
                    }
                };
                if pooled::write_msg(&mut w, &reply).await.is_err() {
                    return;
                }
            }
            _ = exit.wait_for(|v| v.is_some()), if !exit_told => {
                exit_told = true;
                let e = vm.started.exit.borrow().clone();
                if let Some(exit) = e {
                    if pooled::write_msg(&mut w, &Reply::Exited { exit }).await.is_err() {
                        return;
                    }
                }
            }
            _ = shutdown.wait_for(|v| *v) => return,
        }
    }
}

/// Stops the leased VM for [`Request::Stop`] (a second stop reports the recorded exit).
async fn stop_reply(vm: &PoolVm, grace: Duration) -> Reply {
    match vm.hv.send(StopVm { grace }).await {
        Ok(Ok(rep)) => Reply::Stopped {
            method: rep.method,
            exit: rep.exit,
        },
        Ok(Err(HypervisorError::NotRunning)) => match vm.started.exit.borrow().clone() {
            Some(exit) => Reply::Stopped {
                method: joey_actors::hypervisor::StopMethod::GuestExit,
                exit,
            },
            None => Reply::Refused {
                message: "the VM is being stopped".into(),
            },
        },
        Ok(Err(e)) => Reply::Refused {
            message: e.to_string(),
        },
        Err(e) => Reply::Refused {
            message: e.to_string(),
        },
    }
}

/// Holds the pool's lock file (`<pool_dir>/lock`, `flock`) for as long as it lives.
struct PoolLock {
    file: std::fs::File,
}

fn lock(pool_dir: &Path) -> Result<PoolLock, PoolServerError> {
    let path = pool_dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(format!("open {}", path.display())))?;
    // SAFETY: flock(2) on a file descriptor we own; it changes no memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
            PoolServerError::AlreadyRunning(pool_dir.to_path_buf())
        } else {
            io_err(format!("lock {}", path.display()))(e)
        });
    }
    Ok(PoolLock { file })
}

/// Creates `p` (0700) if missing.
fn mkdir_private(p: &Path) -> Result<(), PoolServerError> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(io_err(format!("create {}", p.display()))(e)),
    }
}

/// Removes what a pool that died left in `vms`: kills each VM's QEMU (normally already killed
/// by the kernel with its parent), removes its sandbox cgroup, unmounts and removes its
/// directory (blocking). Returns how
/// many VMs were cleaned.
pub fn clean_orphans(vms: &Path) -> Result<usize, PoolServerError> {
    let Ok(rd) = std::fs::read_dir(vms) else {
        return Ok(0);
    };
    let mut n = 0;
    for e in rd.flatten() {
        let dir = e.path();
        // QEMU's command line names its sockets in the VM's directory.
        if !kill_processes_mentioning(&format!("{}/", dir.display()), ORPHAN_KILL_TIMEOUT) {
            return Err(PoolServerError::Leftovers(format!(
                "processes of {}",
                dir.display()
            )));
        }
        // And its sandbox cgroup, which QEMU's exit watcher would have removed.
        let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Err(e) = joey_actors::hypervisor::sandbox_cgroup::remove_leftover(&id, ORPHAN_KILL_TIMEOUT) {
            tracing::warn!(error = %e, vm = %id, "removing an orphaned VM's cgroup failed");
        }
        remove_dir_unmounted(&dir)?;
        n += 1;
    }
    Ok(n)
}

/// Runs the pool until SIGTERM/SIGINT, then stops every VM and removes the pool's files.
async fn serve(cfg: Config, origin: String) -> Result<(), PoolServerError> {
    if cfg.pool.size == 0 {
        return Err(PoolServerError::BadInput(format!(
            "{origin}: pool.size is 0, the pool is off (docs/pool.md)"
        )));
    }
    let (c, o) = (cfg.clone(), origin.clone());
    let backend = blocking(move || {
        let flavor = host::detect_kvm(&host::HostPaths::default());
        select_backend(&c, &o, &flavor).map(|s| s.backend)
    })
    .await??;
    if backend != BackendKind::Qemu {
        return Err(PoolServerError::BadInput(format!(
            "the pool runs QEMU VMs; {origin} and this host give the {backend} backend"
        )));
    }
    let pool_dir = pooled::pool_dir(&cfg.runtime.state_dir);
    let vms = vms_dir(&pool_dir);
    let sock = pooled::socket_path(&cfg.runtime.state_dir);
    let (pd, v, s) = (pool_dir.clone(), vms.clone(), sock.clone());
    let (lock, listener) = blocking(move || {
        mkdir_private(&pd)?;
        let lock = lock(&pd)?;
        let cleaned = clean_orphans(&v)?;
        if cleaned > 0 {
            tracing::warn!(cleaned, "removed VMs left behind by a pool that died");
        }
        mkdir_private(&v)?;
        match std::fs::remove_file(&s) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("remove {}", s.display()))(e)),
        }
        let listener = std::os::unix::net::UnixListener::bind(&s)
            .map_err(io_err(format!("bind {}", s.display())))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(format!("chmod {}", s.display())))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("nonblocking listener".into()))?;
        Ok::<_, PoolServerError>((lock, listener))
    })
    .await??;
    let listener = UnixListener::from_std(listener).map_err(io_err("listener".into()))?;
    let size = cfg.pool.size;
    let deadline_for_boot = Duration::from_millis(cfg.agent.ready_timeout_ms);
    let pool = PoolActor::new(cfg, origin, vms.clone()).start();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let accept = {
        let pool = pool.clone();
        actix::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        actix::spawn(serve_conn(s, pool.clone(), shutdown_rx.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a pool connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    };
    tracing::info!(size, socket = %sock.display(), "joey-pool running");
    let sig = crate::signals::first_termination_signal(false).await;
    tracing::info!(signal_exit = sig, "joey-pool stopping every VM");
    accept.abort();
    let _ = std::fs::remove_file(&sock);
    shutdown_tx.send_replace(true);
    pool.send(Shutdown).await?;
    // Leases end with their connections; a boot in flight ends within the agent's timeout.
    let deadline = Instant::now() + deadline_for_boot + Duration::from_secs(30);
    loop {
        let c = pool.send(GetStatus).await?;
        if c.ready + c.booting + c.leased + c.removing == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(PoolServerError::Leftovers(format!("VMs ({c:?})")));
        }
        tokio::time::sleep(SHUTDOWN_POLL).await;
    }
    blocking(move || {
        std::fs::remove_dir(&vms).map_err(io_err(format!("remove {}", vms.display())))?;
        std::fs::remove_file(pool_dir.join("lock"))
            .map_err(io_err("remove the lock file".into()))?;
        std::fs::remove_dir(&pool_dir).map_err(io_err(format!("remove {}", pool_dir.display())))?;
        drop(lock.file);
        Ok::<_, PoolServerError>(())
    })
    .await??;
    tracing::info!("joey-pool stopped");
    Ok(())
}

/// `joey-pool status`.
async fn print_status(cfg: &Config) -> i32 {
    match pooled::status(&cfg.runtime.state_dir, REQUEST_TIMEOUT).await {
        Ok(Some(Reply::Status {
            ready,
            booting,
            leased,
            size,
        })) => {
            println!("ready={ready} booting={booting} leased={leased} size={size}");
            0
        }
        Ok(None) => {
            eprintln!(
                "joey-pool: no pool runs on {}",
                cfg.runtime.state_dir.display()
            );
            EXIT_FAILURE
        }
        Ok(Some(other)) => {
            eprintln!("joey-pool: unexpected answer {other:?}");
            EXIT_FAILURE
        }
        Err(e) => {
            eprintln!("joey-pool: {e}");
            EXIT_FAILURE
        }
    }
}

/// `joey-pool lease`.
async fn hold_lease(cfg: Config, origin: String) -> i32 {
    let c = cfg.clone();
    let scratch = cfg.runtime.state_dir.join("lease");
    let shape = match blocking(move || plan(&c, &origin, "lease", &scratch)).await {
        Ok(Ok(p)) => Shape::of(&p.spec),
        Ok(Err(e)) => {
            eprintln!("joey-pool: error: {e}");
            return EXIT_BAD_INPUT;
        }
        Err(e) => {
            eprintln!("joey-pool: error: {e}");
            return EXIT_FAILURE;
        }
    };
    let lease = match pooled::lease(&cfg.runtime.state_dir, shape, REQUEST_TIMEOUT).await {
        pooled::LeaseOutcome::Leased(l) => l,
        pooled::LeaseOutcome::Cold(why) => {
            eprintln!("joey-pool: no VM leased: {why}");
            return EXIT_FAILURE;
        }
    };
    println!(
        "vm_id={} dir={} pid={}",
        lease.vm.vm_id,
        lease.vm.dir.display(),
        lease.vm.pid
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let stdin_closed = async {
        use tokio::io::AsyncReadExt as _;
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let mut exit = lease.exit_watch();
    tokio::select! {
        _ = stdin_closed => {}
        _ = crate::signals::first_termination_signal(false) => {}
        _ = exit.wait_for(|v| v.is_some()) => eprintln!("joey-pool: the leased VM ended"),
    }
    drop(lease);
    0
}

/// Parses arguments and runs; returns the process exit code.
pub fn main() -> i32 {
    let cli: Cli = match crate::ctl::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (cfg, origin) = match joey_config::Config::load(cli.config.as_deref()) {
        Ok((c, o)) => (
            c,
            o.map_or_else(|| "<defaults>".to_string(), |p| p.display().to_string()),
        ),
        Err(e) => {
            eprintln!("joey-pool: error: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let level = cfg.runtime.log_level.clone();
    crate::logging::init_stderr(if cli.verbose {
        crate::logging::at_least(&level, "info")
    } else {
        &level
    });
    // The serving pool runs VMs and their devices like the shim: the runtime filter on every
    // thread, before any other thread starts (they all inherit it; docs/security.md).
    if cli.cmd.is_none() {
        if let Err(e) = crate::security::install_seccomp(cfg.security.seccomp) {
            eprintln!("joey-pool: error: {e}");
            return EXIT_FAILURE;
        }
    }
    let sys = actix::System::new();
    match cli.cmd {
        Some(Cmd::Status) => sys.block_on(print_status(&cfg)),
        Some(Cmd::Lease) => sys.block_on(hold_lease(cfg, origin)),
        None => match sys.block_on(serve(cfg, origin)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("joey-pool: error: {e}");
                e.exit_code()
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shim::cleanup::pids_mentioning;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let secs: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn one_pool_per_state_dir() {
        let d = tempfile::tempdir().unwrap();
        let held = lock(d.path()).unwrap();
        assert!(matches!(
            lock(d.path()),
            Err(PoolServerError::AlreadyRunning(_))
        ));
        drop(held);
        lock(d.path()).unwrap();
    }

    #[test]
    fn orphans_are_removed_with_their_processes() {
        let d = tempfile::tempdir().unwrap();
        let vm = d.path().join("vm-0");
        std::fs::create_dir_all(vm.join("shared/c1")).unwrap();
        std::fs::write(vm.join("console.log"), b"x").unwrap();
        // A stand-in for an orphaned QEMU: a process whose command line names the VM's dir.
        // (`read` is a builtin: sh itself blocks, with the path as its $0.)
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("read x")
            .arg(vm.join("vhost-vsock.sock"))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Until it has exec'd, the child's command line is still ours.
        let needle = format!("{}/", vm.display());
        let t0 = Instant::now();
        while !pids_mentioning(&needle).contains(&(child.id() as i32)) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the stand-in never started"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(clean_orphans(d.path()).unwrap(), 1);
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(!vm.exists());
        assert_eq!(clean_orphans(d.path()).unwrap(), 0);
        assert_eq!(clean_orphans(&d.path().join("missing")).unwrap(), 0);
    }
}
