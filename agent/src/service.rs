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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use joey_agent_protocol::agent::{
    CheckRequest, CheckResponse, CloseStdinRequest, CreateContainerRequest,
    CreateContainerResponse, DestroySandboxRequest, Empty,
    ExecProcessRequest, ExecProcessResponse, ReadOutputRequest, ReadOutputResponse,
    SignalProcessRequest, VersionResponse, WaitProcessRequest, WaitProcessResponse,
    WriteStdinRequest, WriteStdinResponse,
};
use joey_agent_protocol::agent_ttrpc;
use joey_agent_protocol::{GUEST_SHARED_DIR, PROTOCOL_VERSION};
use ttrpc::r#async::TtrpcContext;
use ttrpc::Code;

use crate::container::{self, ContainerError, ContainerSpec};
use crate::exec::{self, ExecError, ExecSpec, Spawned};
use crate::process::{effective_read_len, Process, StreamError};
use crate::reaper::{validate_signal, ProcTable, ReaperError};

/// Finished entries (exit status only) retained for late WaitProcess calls.
pub const MAX_FINISHED: usize = 1024;

/// Delay between answering DestroySandbox and rebooting, so the reply leaves the VM first.
const DESTROY_DELAY: Duration = Duration::from_millis(200);

/// Errors of this module; each maps to a ttrpc status code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("exec id must not be empty")]
    EmptyExecId,
    #[error("unknown exec id: {0}")]
    UnknownExec(String),
    #[error("exec id already exists: {0}")]
    AlreadyExists(String),
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
            ServiceError::Exec(e) => exec_code(e),
            ServiceError::Container(e) => match e {
                ContainerError::InvalidId(_)
                | ContainerError::InvalidRootfs { .. }
                | ContainerError::InvalidHostname(_)
                | ContainerError::InvalidCwd(_) => Code::INVALID_ARGUMENT,
                ContainerError::RootfsNotFound(_) | ContainerError::ExecutableNotFound(_) => {
                    Code::NOT_FOUND
                }
                ContainerError::NotExecutable(_) => Code::PERMISSION_DENIED,
                ContainerError::MountShared { .. } => Code::FAILED_PRECONDITION,
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

/// State of the agent service.
pub struct Agent {
    table: Arc<ProcTable>,
    procs: Mutex<HashMap<String, Arc<Process>>>,
    /// Serialises ExecProcess so that checking and inserting an exec id is atomic.
    exec_lock: tokio::sync::Mutex<()>,
    shutdown: ShutdownMode,
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
        Agent {
            table,
            procs: Mutex::new(HashMap::new()),
            exec_lock: tokio::sync::Mutex::new(()),
            shutdown,
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
        let _serial = self.exec_lock.lock().await;
        if self.procs().contains_key(&req.exec_id) {
            return Err(ServiceError::AlreadyExists(req.exec_id));
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

    /// Starts a container (its process is served under exec id = container id).
    async fn create(
        &self,
        req: CreateContainerRequest,
    ) -> Result<CreateContainerResponse, ServiceError> {
        container::validate_id(&req.container_id)?;
        let _serial = self.exec_lock.lock().await;
        if self.procs().contains_key(&req.container_id) {
            return Err(ServiceError::AlreadyExists(req.container_id));
        }
        let spec = ContainerSpec {
            id: req.container_id,
            rootfs: req.rootfs,
            argv: req.argv,
            env: req.env,
            cwd: req.cwd,
            terminal: req.terminal,
            hostname: req.hostname,
            readonly_rootfs: req.readonly_rootfs,
        };
        let table = self.table.clone();
        // Only PID 1 in the guest has the virtio-fs share to mount.
        let mount_shared = self.shutdown == ShutdownMode::Reboot;
        let (spec, spawned) = tokio::task::spawn_blocking(move || {
            let spawned = container::spawn(table, &spec, GUEST_SHARED_DIR, mount_shared);
            (spec, spawned)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("container task failed: {e}")))?;
        let spawned = spawned?;
        let r = self.register(spec.id, spawned, spec.terminal, &spec.argv, "container")?;
        Ok(CreateContainerResponse {
            pid: r.pid,
            ..Default::default()
        })
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
        Ok(WaitProcessResponse {
            exited: info.exited,
            exit_code: info.exit_code,
            signal: info.signal,
            status: info.status,
            ..Default::default()
        })
    }

    fn signal(&self, req: SignalProcessRequest) -> Result<Empty, ServiceError> {
        let p = self.get(&req.exec_id)?;
        let signal = validate_signal(req.signal)?;
        if p.exit_info().is_some() {
            return Err(ReaperError::AlreadyExited.into());
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
        match tokio::task::spawn_blocking(crate::metrics::collect).await {
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
}
