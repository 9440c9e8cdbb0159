//! The ttrpc `AgentService` implementation.
//!
//! Process entries are kept in a map keyed by exec id. Resource policy: an entry holds fds while
//! its process runs or its output has not been read to EOF. Once the process was reaped and both
//! output streams reached EOF the entry is "finished": its fds are released at the next
//! ExecProcess and only the exit status remains (so WaitProcess keeps working any number of
//! times, and SignalProcess answers "process already exited"). At most [`MAX_FINISHED`] finished
//! entries are retained; beyond that the oldest (by reap order) are dropped, after which their
//! exec ids are unknown (NOT_FOUND) and may be reused. Entries whose output is never read are
//! kept: dropping them would lose data the host may still want.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use joey_agent_protocol::agent::{
    CheckRequest, CheckResponse, CloseStdinRequest, ContainerRequest, ContainerStats,
    ContainerStatsEntry, CreateContainerRequest, CreateContainerResponse, DestroySandboxRequest,
    Empty, ExecProcessRequest, ExecProcessResponse, ListPidsResponse, OomEvent, ReadOutputRequest,
    ReadOutputResponse, ResizeTerminalRequest, SignalProcessRequest, UpdateContainerRequest,
    VersionResponse, WaitProcessRequest, WaitProcessResponse, WriteStdinRequest,
    WriteStdinResponse,
};
use joey_agent_protocol::agent_ttrpc;
use joey_agent_protocol::{GUEST_SHARED_DIR, PROTOCOL_VERSION};
use ttrpc::r#async::TtrpcContext;
use ttrpc::Code;

use crate::cgroup::{self, Cgroup, CgroupError};
use crate::container::{self, ContainerError};
use crate::exec::{self, ExecError, ExecSpec, Spawned};
use crate::process::{effective_read_len, Process, StreamError};
use crate::reaper::{validate_signal, ProcTable, ReaperError};
use crate::seccomp::Filter;
use crate::spec::{self, FlatContainer, ProcessConfig, SpecError};

/// Finished entries (exit status only) retained for late WaitProcess calls.
pub const MAX_FINISHED: usize = 1024;

/// Delay between answering DestroySandbox and rebooting, so the reply leaves the VM first.
const DESTROY_DELAY: Duration = Duration::from_millis(200);
/// Bound on PauseContainer/ResumeContainer waiting for `cgroup.events`.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on RemoveContainer waiting for the container's cgroup to empty.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the OOM watcher reads every container's `memory.events`.
const OOM_POLL: Duration = Duration::from_millis(200);
/// OOM events kept while nobody polls (the oldest are dropped beyond this).
pub const MAX_OOM_EVENTS: usize = 64;

/// Errors of this module; each maps to a ttrpc status code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("exec id must not be empty")]
    EmptyExecId,
    #[error("unknown exec id: {0}")]
    UnknownExec(String),
    #[error("exec id already exists: {0}")]
    AlreadyExists(String),
    #[error("unknown container: {0}")]
    UnknownContainer(String),
    #[error("container {0} is not running (its first process exited)")]
    ContainerNotRunning(String),
    #[error("container {0} is paused")]
    ContainerPaused(String),
    #[error("container {0} has no cgroup (cgroup v2 is not mounted at /sys/fs/cgroup)")]
    NoCgroup(String),
    #[error("process {0} has no terminal")]
    NotATerminal(String),
    #[error("oci_process_json needs a container_id")]
    OciProcessWithoutContainer,
    #[error("invalid window size {rows}x{cols}: rows and cols must be 1 to 65535")]
    InvalidWindowSize { rows: u32, cols: u32 },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Reaper(#[from] ReaperError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// The ttrpc status code for this error.
    pub fn code(&self) -> Code {
        match self {
            ServiceError::EmptyExecId => Code::INVALID_ARGUMENT,
            ServiceError::UnknownExec(_) => Code::NOT_FOUND,
            ServiceError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ServiceError::UnknownContainer(_) => Code::NOT_FOUND,
            ServiceError::ContainerNotRunning(_)
            | ServiceError::ContainerPaused(_)
            | ServiceError::NoCgroup(_)
            | ServiceError::NotATerminal(_) => Code::FAILED_PRECONDITION,
            ServiceError::OciProcessWithoutContainer | ServiceError::InvalidWindowSize { .. } => {
                Code::INVALID_ARGUMENT
            }
            ServiceError::Spec(_) => Code::INVALID_ARGUMENT,
            ServiceError::Cgroup(e) => cgroup_code(e),
            ServiceError::Exec(e) => exec_code(e),
            ServiceError::Container(e) => match e {
                ContainerError::InvalidId(_)
                | ContainerError::InvalidRootfs { .. }
                | ContainerError::InvalidHostname(_)
                | ContainerError::InvalidCwd(_)
                | ContainerError::BindSourceOutside { .. }
                | ContainerError::SymlinkLoop(_)
                | ContainerError::Spec(_) => Code::INVALID_ARGUMENT,
                ContainerError::RootfsNotFound(_)
                | ContainerError::ExecutableNotFound(_)
                | ContainerError::BindSourceMissing { .. } => Code::NOT_FOUND,
                ContainerError::NotExecutable(_) => Code::PERMISSION_DENIED,
                ContainerError::MountShared { .. } | ContainerError::NoCgroup => {
                    Code::FAILED_PRECONDITION
                }
                ContainerError::Cgroup(e) => cgroup_code(e),
                ContainerError::OpenRootfs { .. }
                | ContainerError::Setup { .. }
                | ContainerError::Thread(_) => Code::INTERNAL,
                ContainerError::Exec(e) => exec_code(e),
            },
            ServiceError::Stream(e) => match e {
                StreamError::StdinClosed
                | StreamError::BrokenPipe
                | StreamError::ExitedDuringWrite { .. } => Code::FAILED_PRECONDITION,
                StreamError::StatusLost | StreamError::Io { .. } => Code::INTERNAL,
            },
            ServiceError::Reaper(e) => match e {
                ReaperError::AlreadyExited => Code::NOT_FOUND,
                ReaperError::InvalidSignal(_) => Code::INVALID_ARGUMENT,
                ReaperError::Kill { source, .. } if *source == nix::errno::Errno::ESRCH => {
                    Code::NOT_FOUND
                }
                _ => Code::INTERNAL,
            },
            ServiceError::Internal(_) => Code::INTERNAL,
        }
    }
}

fn cgroup_code(e: &CgroupError) -> Code {
    match e {
        CgroupError::InvalidResources(_) | CgroupError::Json(_) => Code::INVALID_ARGUMENT,
        CgroupError::Io { .. } | CgroupError::Timeout { .. } | CgroupError::Parse { .. } => {
            Code::INTERNAL
        }
    }
}

fn exec_code(e: &ExecError) -> Code {
    match e {
        ExecError::EmptyArgv
        | ExecError::EmptyProgram
        | ExecError::NulByte { .. }
        | ExecError::InvalidEnv(_)
        | ExecError::InvalidCwd { .. } => Code::INVALID_ARGUMENT,
        ExecError::NotFound(_) => Code::NOT_FOUND,
        ExecError::PermissionDenied(_) => Code::PERMISSION_DENIED,
        ExecError::Spawn { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => Code::NOT_FOUND,
            std::io::ErrorKind::PermissionDenied => Code::PERMISSION_DENIED,
            _ => Code::INTERNAL,
        },
        ExecError::Pty(_) | ExecError::Stdio(_) => Code::INTERNAL,
    }
}

impl From<ServiceError> for ttrpc::Error {
    fn from(e: ServiceError) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// What DestroySandbox does after replying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// PID 1 in the guest: reboot (which ends the VM).
    Reboot,
    /// `--listen` mode on a host: kill our processes and exit.
    Exit,
}

/// What the service keeps about a container until RemoveContainer.
struct ContainerRecord {
    init_pid: i32,
    cgroup: Option<Cgroup>,
    seccomp: Option<Filter>,
    /// Its first process (also in `procs` under the container id, until evicted).
    process: Arc<Process>,
    /// Frozen by PauseContainer (an exec would be frozen before it could exec).
    paused: bool,
    /// The cgroup's oom_kill count already reported (GetOomEvent or WaitProcess).
    oom_reported: u64,
    /// Whether the first process's exit carried OOM kills (decided at its first WaitProcess).
    oom_at_exit: Option<bool>,
}

impl ContainerRecord {
    fn running(&self) -> bool {
        self.process.exit_info().is_none()
    }
}

/// State of the agent service.
pub struct Agent {
    table: Arc<ProcTable>,
    procs: Mutex<HashMap<String, Arc<Process>>>,
    containers: Mutex<HashMap<String, ContainerRecord>>,
    /// Serialises ExecProcess so that checking and inserting an exec id is atomic.
    exec_lock: tokio::sync::Mutex<()>,
    shutdown: ShutdownMode,
    /// The cgroup2 mount for container groups; `None` where /sys/fs/cgroup is not cgroup2
    /// (host mode on a v1 or hybrid host).
    cgroup_root: Option<PathBuf>,
    /// Container ids whose oom_kill count grew, oldest first (bounded by [`MAX_OOM_EVENTS`]).
    oom_events: Mutex<VecDeque<String>>,
    oom_notify: tokio::sync::Notify,
}

/// Picks the finished entries to drop: all but the `keep` most recently reaped.
fn eviction_victims(mut finished: Vec<(u64, String)>, keep: usize) -> Vec<String> {
    if finished.len() <= keep {
        return Vec::new();
    }
    finished.sort();
    let excess = finished.len() - keep;
    finished
        .into_iter()
        .take(excess)
        .map(|(_, id)| id)
        .collect()
}

impl Agent {
    pub fn new(table: Arc<ProcTable>, shutdown: ShutdownMode) -> Agent {
        let root = Path::new(cgroup::CGROUP_ROOT);
        let cgroup_root = cgroup::is_cgroup2(root).then(|| root.to_path_buf());
        if cgroup_root.is_none() {
            agent_log!("no cgroup2 at {}: containers get no cgroup", cgroup::CGROUP_ROOT);
        }
        Agent {
            table,
            procs: Mutex::new(HashMap::new()),
            containers: Mutex::new(HashMap::new()),
            exec_lock: tokio::sync::Mutex::new(()),
            shutdown,
            cgroup_root,
            oom_events: Mutex::new(VecDeque::new()),
            oom_notify: tokio::sync::Notify::new(),
        }
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, ContainerRecord>> {
        // Plain map operations only: a poisoned map is still consistent.
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The container's cgroup, or the error for an unknown container or one without a group.
    fn cgroup_of(&self, id: &str) -> Result<Cgroup, ServiceError> {
        let c = self.containers();
        let rec = c.get(id).ok_or_else(|| ServiceError::UnknownContainer(id.to_string()))?;
        rec.cgroup.clone().ok_or_else(|| ServiceError::NoCgroup(id.to_string()))
    }

    /// Starts the task that turns growing `oom_kill` counts into OOM events. Must run inside
    /// the runtime.
    pub fn start_oom_watcher(self: &Arc<Self>) {
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(OOM_POLL).await;
                let Some(agent) = agent.upgrade() else { return };
                let groups: Vec<(String, Cgroup)> = agent
                    .containers()
                    .iter()
                    .filter_map(|(id, r)| r.cgroup.clone().map(|c| (id.clone(), c)))
                    .collect();
                if groups.is_empty() {
                    continue;
                }
                let counts = match tokio::task::spawn_blocking(move || {
                    groups.into_iter().map(|(id, c)| (id, c.oom_kills())).collect::<Vec<_>>()
                })
                .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        agent_log!("oom watcher: {e}");
                        continue;
                    }
                };
                for (id, n) in counts {
                    for _ in 0..agent.take_new_ooms(&id, n) {
                        agent.push_oom_event(&id);
                    }
                }
            }
        });
    }

    /// How many of a container's `count` OOM kills nobody reported yet; records them as
    /// reported. One lock, so the watcher and WaitProcess never report the same kill twice.
    fn take_new_ooms(&self, id: &str, count: u64) -> u64 {
        match self.containers().get_mut(id) {
            Some(r) if count > r.oom_reported => {
                let new = count - r.oom_reported;
                r.oom_reported = count;
                new
            }
            _ => 0,
        }
    }

    /// For a container's first process that exited: whether OOM kills happened that nobody
    /// reported (then they count as reported by this exit). The same answer on every call.
    async fn oom_at_exit(&self, exec_id: &str, p: &Arc<Process>) -> bool {
        let cgroup = match self.containers().get(exec_id) {
            Some(r) if Arc::ptr_eq(&r.process, p) => match r.oom_at_exit {
                Some(v) => return v,
                None => r.cgroup.clone(),
            },
            _ => return false,
        };
        let count = match cgroup {
            Some(cg) => tokio::task::spawn_blocking(move || cg.oom_kills()).await.unwrap_or(0),
            None => 0,
        };
        let new = self.take_new_ooms(exec_id, count) > 0;
        match self.containers().get_mut(exec_id) {
            Some(r) => *r.oom_at_exit.get_or_insert(new),
            None => new,
        }
    }

    fn push_oom_event(&self, id: &str) {
        agent_log!("container {id}: OOM kill");
        {
            let mut q = self.oom_events.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= MAX_OOM_EVENTS {
                q.pop_front();
            }
            q.push_back(id.to_string());
        }
        self.oom_notify.notify_one();
    }

    async fn next_oom_event(&self) -> OomEvent {
        loop {
            if let Some(id) = self.oom_events.lock().unwrap_or_else(|e| e.into_inner()).pop_front() {
                return OomEvent {
                    container_id: id,
                    ..Default::default()
                };
            }
            // notify_one stores a permit when nobody waits: an event pushed between the check
            // above and this await is not missed.
            self.oom_notify.notified().await;
        }
    }

    fn procs(&self) -> MutexGuard<'_, HashMap<String, Arc<Process>>> {
        // Every critical section is a plain map operation: a poisoned map is still consistent.
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, exec_id: &str) -> Result<Arc<Process>, ServiceError> {
        self.procs()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ServiceError::UnknownExec(exec_id.to_string()))
    }

    /// Releases fds of finished entries and enforces [`MAX_FINISHED`].
    fn prune(procs: &mut HashMap<String, Arc<Process>>) {
        let mut finished = Vec::new();
        for (id, p) in procs.iter() {
            if p.is_finished() {
                p.release();
                let seq = p.exit_info().map(|i| i.reap_seq).unwrap_or(0);
                finished.push((seq, id.clone()));
            }
        }
        for id in eviction_victims(finished, MAX_FINISHED) {
            procs.remove(&id);
        }
    }

    async fn exec(&self, req: ExecProcessRequest) -> Result<ExecProcessResponse, ServiceError> {
        if req.exec_id.is_empty() {
            return Err(ServiceError::EmptyExecId);
        }
        if !req.oci_process_json.is_empty() && req.container_id.is_empty() {
            return Err(ServiceError::OciProcessWithoutContainer);
        }
        let _serial = self.exec_lock.lock().await;
        if self.procs().contains_key(&req.exec_id) {
            return Err(ServiceError::AlreadyExists(req.exec_id));
        }
        if !req.container_id.is_empty() {
            return self.exec_in_container(req).await;
        }
        let table = self.table.clone();
        let terminal = req.terminal;
        let (req, spawned) = tokio::task::spawn_blocking(move || {
            let spec = ExecSpec {
                argv: &req.argv,
                env: &req.env,
                cwd: &req.cwd,
                terminal: req.terminal,
            };
            let spawned = exec::spawn(&table, spec);
            (req, spawned)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("exec task failed: {e}")))?;
        let spawned = spawned?;
        self.register(req.exec_id, spawned, terminal, &req.argv, "exec")
    }

    /// ExecProcess with a container_id: the process joins that container (caller holds
    /// `exec_lock` and checked the exec id).
    async fn exec_in_container(
        &self,
        req: ExecProcessRequest,
    ) -> Result<ExecProcessResponse, ServiceError> {
        let target = {
            let c = self.containers();
            let rec = c
                .get(&req.container_id)
                .ok_or_else(|| ServiceError::UnknownContainer(req.container_id.clone()))?;
            if !rec.running() {
                return Err(ServiceError::ContainerNotRunning(req.container_id.clone()));
            }
            if rec.paused {
                return Err(ServiceError::ContainerPaused(req.container_id.clone()));
            }
            container::Target {
                id: req.container_id.clone(),
                init_pid: rec.init_pid,
                cgroup: rec.cgroup.clone(),
                seccomp: rec.seccomp.clone(),
            }
        };
        let process = if req.oci_process_json.is_empty() {
            ProcessConfig {
                args: req.argv.clone(),
                env: req.env.clone(),
                cwd: req.cwd.clone(),
                terminal: req.terminal,
                ..Default::default()
            }
        } else {
            spec::process_from_json(&req.oci_process_json)?
        };
        let table = self.table.clone();
        let (process, spawned) = tokio::task::spawn_blocking(move || {
            let spawned = container::exec_in(table, &target, &process);
            (process, spawned)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("exec task failed: {e}")))?;
        let spawned = spawned?;
        self.register(req.exec_id, spawned, process.terminal, &process.args, "exec in container")
    }

    /// Starts a container (its process is served under exec id = container id).
    async fn create(
        &self,
        req: CreateContainerRequest,
    ) -> Result<CreateContainerResponse, ServiceError> {
        container::validate_id(&req.container_id)?;
        let _serial = self.exec_lock.lock().await;
        if self.procs().contains_key(&req.container_id)
            || self.containers().contains_key(&req.container_id)
        {
            return Err(ServiceError::AlreadyExists(req.container_id));
        }
        let id = req.container_id.clone();
        let config = if req.oci_spec_json.is_empty() {
            spec::from_flat(FlatContainer {
                id: req.container_id,
                rootfs: req.rootfs,
                argv: req.argv,
                env: req.env,
                cwd: req.cwd,
                terminal: req.terminal,
                hostname: req.hostname,
                readonly_rootfs: req.readonly_rootfs,
            })
        } else {
            spec::from_oci_json(&req.container_id, &req.oci_spec_json, GUEST_SHARED_DIR)
                .map_err(ContainerError::from)?
        };
        let table = self.table.clone();
        // Only PID 1 in the guest has the virtio-fs share to mount.
        let mount_shared = self.shutdown == ShutdownMode::Reboot;
        let cgroup_root = self.cgroup_root.clone();
        let (config, started) = tokio::task::spawn_blocking(move || {
            let started = container::spawn(
                table,
                &config,
                GUEST_SHARED_DIR,
                mount_shared,
                cgroup_root.as_deref(),
            );
            (config, started)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("container task failed: {e}")))?;
        let started = started?;
        let cgroup = started.cgroup;
        let r = match self.register(
            id.clone(),
            started.spawned,
            config.process.terminal,
            &config.process.args,
            "container",
        ) {
            Ok(r) => r,
            Err(e) => {
                // register killed the process; do not leave its group behind.
                if let Some(cg) = cgroup {
                    match blocking(move || cg.kill_and_remove(REMOVE_TIMEOUT)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(ce)) => agent_log!("container {id}: removing its cgroup: {ce}"),
                        Err(je) => agent_log!("container {id}: removing its cgroup: {je}"),
                    }
                }
                return Err(e);
            }
        };
        let process = self.get(&id)?;
        self.containers().insert(
            id,
            ContainerRecord {
                init_pid: r.pid as i32,
                cgroup,
                seccomp: config.seccomp,
                process,
                paused: false,
                oom_reported: 0,
                oom_at_exit: None,
            },
        );
        Ok(CreateContainerResponse {
            pid: r.pid,
            ..Default::default()
        })
    }

    async fn pause(&self, id: &str, frozen: bool) -> Result<Empty, ServiceError> {
        let cg = self.cgroup_of(id)?;
        // Marked before freezing (no exec may start into a freezing group), cleared after a
        // thaw; a failed freeze leaves it marked, as the group may be partly frozen.
        if frozen {
            self.set_paused(id, true);
        }
        blocking(move || cg.set_frozen(frozen, FREEZE_TIMEOUT)).await??;
        if !frozen {
            self.set_paused(id, false);
        }
        Ok(Empty::default())
    }

    fn set_paused(&self, id: &str, paused: bool) {
        if let Some(r) = self.containers().get_mut(id) {
            r.paused = paused;
        }
    }

    async fn stats(&self, id: &str) -> Result<ContainerStats, ServiceError> {
        let cg = self.cgroup_of(id)?;
        blocking(move || cg.stats()).await
    }

    async fn update(&self, req: UpdateContainerRequest) -> Result<Empty, ServiceError> {
        let cg = self.cgroup_of(&req.container_id)?;
        let r = cgroup::parse_resources(&req.resources_json)?;
        cgroup::resource_writes(&r)?;
        blocking(move || cg.apply(&r)).await??;
        Ok(Empty::default())
    }

    async fn list_pids(&self, id: &str) -> Result<ListPidsResponse, ServiceError> {
        let cg = self.cgroup_of(id)?;
        let pids = blocking(move || cg.procs()).await??;
        Ok(ListPidsResponse {
            pids,
            ..Default::default()
        })
    }

    fn resize(&self, req: &ResizeTerminalRequest) -> Result<Empty, ServiceError> {
        let p = self.get(&req.exec_id)?;
        let (Ok(rows), Ok(cols)) = (u16::try_from(req.rows), u16::try_from(req.cols)) else {
            return Err(ServiceError::InvalidWindowSize {
                rows: req.rows,
                cols: req.cols,
            });
        };
        if rows == 0 || cols == 0 {
            return Err(ServiceError::InvalidWindowSize {
                rows: req.rows,
                cols: req.cols,
            });
        }
        if !p.terminal || !p.resize(rows, cols)? {
            return Err(ServiceError::NotATerminal(req.exec_id.clone()));
        }
        Ok(Empty::default())
    }

    async fn remove(&self, id: &str) -> Result<Empty, ServiceError> {
        let (cgroup, process, init_pid) = {
            let c = self.containers();
            let rec = c
                .get(id)
                .ok_or_else(|| ServiceError::UnknownContainer(id.to_string()))?;
            (rec.cgroup.clone(), rec.process.clone(), rec.init_pid)
        };
        match cgroup {
            Some(cg) => blocking(move || cg.kill_and_remove(REMOVE_TIMEOUT)).await??,
            None => {
                if process.exit_info().is_none() {
                    // Killing pid 1 of its namespace kills the rest of it.
                    match self.table.kill(init_pid, libc::SIGKILL) {
                        Ok(()) | Err(ReaperError::AlreadyExited) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        self.containers().remove(id);
        agent_log!("container {id}: removed");
        Ok(Empty::default())
    }

    /// The cgroups of every live container (first process running), for GetGuestMetrics.
    fn container_groups(&self) -> Vec<(String, Cgroup)> {
        self.containers()
            .iter()
            .filter(|(_, r)| r.running())
            .filter_map(|(id, r)| r.cgroup.clone().map(|c| (id.clone(), c)))
            .collect()
    }

    /// Serves the stdio of a started process under `exec_id`.
    fn register(
        &self,
        exec_id: String,
        spawned: Spawned,
        terminal: bool,
        argv: &[String],
        what: &str,
    ) -> Result<ExecProcessResponse, ServiceError> {
        let pid = spawned.pid;
        let process = match Process::new(spawned, terminal) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                // Cannot serve its stdio: do not leave it running unobserved.
                let _ = self.table.kill(pid, libc::SIGKILL);
                return Err(ServiceError::Internal(format!(
                    "registering stdio of pid {pid}: {e}"
                )));
            }
        };
        // Only the program name: arguments may carry secrets and the console log leaves the VM.
        agent_log!(
            "{what} {exec_id}: pid {pid}{} {:?}",
            if terminal { " (tty)" } else { "" },
            argv.first().map(String::as_str).unwrap_or_default()
        );
        let mut procs = self.procs();
        procs.insert(exec_id, process);
        Self::prune(&mut procs);
        // Pids fit in u32 (they are positive).
        Ok(ExecProcessResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn wait(&self, req: WaitProcessRequest) -> Result<WaitProcessResponse, ServiceError> {
        let p = self.get(&req.exec_id)?;
        let info = p.wait().await?;
        let oom_killed = self.oom_at_exit(&req.exec_id, &p).await;
        if oom_killed {
            agent_log!("container {}: OOM kill, reported with its exit", req.exec_id);
        }
        Ok(WaitProcessResponse {
            exited: info.exited,
            exit_code: info.exit_code,
            signal: info.signal,
            status: info.status,
            oom_killed,
            ..Default::default()
        })
    }

    fn signal(&self, req: SignalProcessRequest) -> Result<Empty, ServiceError> {
        let p = self.get(&req.exec_id)?;
        let signal = validate_signal(req.signal)?;
        if p.exit_info().is_some() {
            return Err(ReaperError::AlreadyExited.into());
        }
        if req.all {
            // Every process of the container whose first process this is (its cgroup).
            let group = self
                .containers()
                .get(&req.exec_id)
                .filter(|c| Arc::ptr_eq(&c.process, &p))
                .and_then(|c| c.cgroup.as_ref().map(|cg| cg.procs()));
            if let Some(pids) = group {
                let pids = pids.map_err(|e| ServiceError::Internal(format!("listing the container's processes: {e}")))?;
                for pid in pids {
                    // SAFETY: kill(2) takes no pointers; the pid was just listed in the
                    // container's cgroup, which holds only the container's processes.
                    unsafe { libc::kill(pid as libc::pid_t, signal) };
                }
                return Ok(Empty::default());
            }
        }
        self.table.kill(p.pid, signal)?;
        Ok(Empty::default())
    }

    async fn read(
        &self,
        req: ReadOutputRequest,
        stderr: bool,
    ) -> Result<ReadOutputResponse, ServiceError> {
        let p = self.get(&req.exec_id)?;
        let stream = if stderr { &p.stderr } else { &p.stdout };
        let data = stream.read(effective_read_len(req.len)).await?;
        Ok(ReadOutputResponse {
            data,
            ..Default::default()
        })
    }

    fn destroy(&self) {
        nix::unistd::sync();
        let table = self.table.clone();
        let mode = self.shutdown;
        agent_log!("destroying sandbox");
        tokio::spawn(async move {
            tokio::time::sleep(DESTROY_DELAY).await;
            match mode {
                ShutdownMode::Reboot => crate::init::reboot_now(),
                ShutdownMode::Exit => {
                    for pid in table.running_pids() {
                        let _ = table.kill(pid, libc::SIGKILL);
                    }
                    std::process::exit(0);
                }
            }
        });
    }
}

/// Runs blocking cgroupfs work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(format!("blocking task failed: {e}")))
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

#[async_trait::async_trait]
impl agent_ttrpc::AgentService for Agent {
    async fn get_guest_metrics(
        &self,
        _ctx: &TtrpcContext,
        _: joey_agent_protocol::agent::GuestMetricsRequest,
    ) -> ttrpc::Result<joey_agent_protocol::agent::GuestMetricsResponse> {
        // procfs reads are synchronous: keep them off the async workers.
        let groups = self.container_groups();
        let collect = move || {
            crate::metrics::collect().map(|mut r| {
                r.containers = groups
                    .into_iter()
                    .map(|(id, cg)| ContainerStatsEntry {
                        container_id: id,
                        stats: Some(cg.stats()).into(),
                        ..Default::default()
                    })
                    .collect();
                r
            })
        };
        match tokio::task::spawn_blocking(collect).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(ServiceError::Internal(e.to_string()).into()),
            Err(e) => Err(ServiceError::Internal(format!("metrics task: {e}")).into()),
        }
    }

    async fn check(&self, _ctx: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            status: "SERVING".into(),
            ..Default::default()
        })
    }

    async fn version(&self, _ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<VersionResponse> {
        Ok(VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION.into(),
            kernel_release: kernel_release(),
            ..Default::default()
        })
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        Ok(self.exec(req).await?)
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        Ok(self.wait(req).await?)
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(self.signal(req)?)
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: WriteStdinRequest,
    ) -> ttrpc::Result<WriteStdinResponse> {
        let p = self.get(&req.exec_id)?;
        let n = p.write_stdin(&req.data).await.map_err(ServiceError::from)?;
        Ok(WriteStdinResponse {
            // A request is at most 4 MiB (ttrpc's message limit).
            len: u32::try_from(n).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> ttrpc::Result<Empty> {
        let p = self.get(&req.exec_id)?;
        p.close_stdin().await.map_err(ServiceError::from)?;
        Ok(Empty::default())
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: ReadOutputRequest,
    ) -> ttrpc::Result<ReadOutputResponse> {
        Ok(self.read(req, false).await?)
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: ReadOutputRequest,
    ) -> ttrpc::Result<ReadOutputResponse> {
        Ok(self.read(req, true).await?)
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        Ok(self.create(req).await?)
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(self.pause(&req.container_id, true).await?)
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(self.pause(&req.container_id, false).await?)
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ContainerStats> {
        Ok(self.stats(&req.container_id).await?)
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(self.update(req).await?)
    }

    async fn list_pids(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListPidsResponse> {
        Ok(Agent::list_pids(self, &req.container_id).await?)
    }

    async fn resize_terminal(
        &self,
        _ctx: &TtrpcContext,
        req: ResizeTerminalRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(self.resize(&req)?)
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<OomEvent> {
        Ok(self.next_oom_event().await)
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(self.remove(&req.container_id).await?)
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.destroy();
        Ok(Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_oldest_finished_beyond_cap() {
        let finished = vec![(5, "e".into()), (1, "a".into()), (3, "c".into())];
        assert_eq!(eviction_victims(finished.clone(), 3), Vec::<String>::new());
        assert_eq!(eviction_victims(finished.clone(), 2), vec!["a".to_string()]);
        assert_eq!(
            eviction_victims(finished, 0),
            vec!["a".to_string(), "c".to_string(), "e".to_string()]
        );
    }

    #[test]
    fn error_codes() {
        assert_eq!(
            ServiceError::UnknownExec("x".into()).code(),
            Code::NOT_FOUND
        );
        assert_eq!(
            ServiceError::from(ExecError::NotFound("x".into())).code(),
            Code::NOT_FOUND
        );
        assert_eq!(
            ServiceError::from(ExecError::PermissionDenied("x".into())).code(),
            Code::PERMISSION_DENIED
        );
        assert_eq!(
            ServiceError::from(ExecError::InvalidCwd {
                cwd: "/x".into(),
                reason: "r".into()
            })
            .code(),
            Code::INVALID_ARGUMENT
        );
        assert_eq!(
            ServiceError::from(ReaperError::AlreadyExited).code(),
            Code::NOT_FOUND
        );
        assert_eq!(
            ServiceError::from(ReaperError::InvalidSignal(99)).code(),
            Code::INVALID_ARGUMENT
        );
        assert_eq!(
            ServiceError::AlreadyExists("x".into()).code(),
            Code::ALREADY_EXISTS
        );
    }

    #[test]
    fn error_messages_name_the_culprit() {
        let e: ttrpc::Error = ServiceError::from(ExecError::NotFound("nope".into())).into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert_eq!(s.message(), "executable file not found: nope");
            }
            other => panic!("unexpected {other:?}"),
        }
        let e = ServiceError::from(ReaperError::AlreadyExited);
        assert_eq!(e.to_string(), "process already exited");
    }

    #[test]
    fn container_error_codes() {
        let cases: Vec<(ServiceError, Code)> = vec![
            (ServiceError::UnknownContainer("c".into()), Code::NOT_FOUND),
            (ServiceError::ContainerNotRunning("c".into()), Code::FAILED_PRECONDITION),
            (ServiceError::ContainerPaused("c".into()), Code::FAILED_PRECONDITION),
            (ServiceError::NoCgroup("c".into()), Code::FAILED_PRECONDITION),
            (ServiceError::NotATerminal("e".into()), Code::FAILED_PRECONDITION),
            (ServiceError::OciProcessWithoutContainer, Code::INVALID_ARGUMENT),
            (SpecError::InvalidRlimit("RLIMIT_FOO".into()).into(), Code::INVALID_ARGUMENT),
            (CgroupError::InvalidResources("x".into()).into(), Code::INVALID_ARGUMENT),
            (
                CgroupError::Timeout {
                    path: "p".into(),
                    what: "frozen 1",
                    timeout: Duration::from_secs(1),
                }
                .into(),
                Code::INTERNAL,
            ),
            (ContainerError::from(SpecError::Missing("root")).into(), Code::INVALID_ARGUMENT),
            (
                ContainerError::BindSourceOutside {
                    index: 1,
                    destination: "/d".into(),
                    source_path: "/etc".into(),
                }
                .into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                ContainerError::BindSourceMissing {
                    index: 1,
                    destination: "/d".into(),
                    source_path: "/run/joey/shared/x".into(),
                    reason: "gone".into(),
                }
                .into(),
                Code::NOT_FOUND,
            ),
            (ContainerError::NoCgroup.into(), Code::FAILED_PRECONDITION),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e}");
        }
        assert_eq!(
            ServiceError::from(SpecError::InvalidRlimit("RLIMIT_FOO".into())).to_string(),
            "invalid rlimit type \"RLIMIT_FOO\""
        );
    }
}
