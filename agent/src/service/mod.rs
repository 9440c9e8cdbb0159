//! The ttrpc `AgentService` implementation, split by RPC family:
//!
//! - this file: the service state ([`Agent`]), the error type and its mapping to ttrpc status
//!   codes, and the registration of every RPC with the method that serves it;
//! - `process.rs`: ExecProcess, WaitProcess, SignalProcess, stdio, ResizeTerminal (and the
//!   retention policy of process entries);
//! - `container.rs`: CreateContainer, RemoveContainer, Pause/ResumeContainer, UpdateContainer,
//!   StatsContainer, ListPids, GetOomEvent (and the OOM watcher);
//! - `sandbox.rs`: Check, Version, GetGuestMetrics, DestroySandbox;
//! - `network.rs`: ConfigureNetwork.

mod container;
mod network;
mod process;
mod sandbox;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use joey_agent_protocol::agent::{
    CheckRequest, CheckResponse, CloseStdinRequest, ConfigureNetworkRequest, ContainerRequest,
    ContainerStats, CreateContainerRequest, CreateContainerResponse, DestroySandboxRequest, Empty,
    ExecProcessRequest, ExecProcessResponse, GuestMetricsRequest, GuestMetricsResponse,
    ListPidsResponse, OomEvent, ReadOutputRequest, ReadOutputResponse, ResizeTerminalRequest,
    SignalProcessRequest, UpdateContainerRequest, VersionResponse, WaitProcessRequest,
    WaitProcessResponse, WriteStdinRequest, WriteStdinResponse,
};
use joey_agent_protocol::agent_ttrpc;
use ttrpc::r#async::TtrpcContext;
use ttrpc::Code;

use crate::cgroup::{self, CgroupError};
use crate::container::ContainerError;
use crate::exec::ExecError;
use crate::network::NetworkError;
use crate::process::{Process, StreamError};
use crate::reaper::{ProcTable, ReaperError};
use crate::spec::SpecError;
use container::{ContainerRecord, OomEvents};

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
    Container(#[from] ContainerError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Reaper(#[from] ReaperError),
    #[error(transparent)]
    Network(#[from] NetworkError),
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
            ServiceError::Network(e) => match e {
                NetworkError::InvalidInterface { .. }
                | NetworkError::UnknownMac { .. }
                | NetworkError::NameTaken { .. }
                | NetworkError::InvalidRoute { .. }
                | NetworkError::InvalidNeighbor { .. }
                | NetworkError::UnknownDevice { .. } => Code::INVALID_ARGUMENT,
                NetworkError::NoIpv6(_) => Code::FAILED_PRECONDITION,
                NetworkError::Socket(_) | NetworkError::Netlink { .. } => Code::INTERNAL,
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

/// State of the agent service.
pub struct Agent {
    table: Arc<ProcTable>,
    /// Process entries by exec id (see `process.rs` for their retention).
    procs: Mutex<HashMap<String, Arc<Process>>>,
    containers: Mutex<HashMap<String, ContainerRecord>>,
    /// Serialises ExecProcess and CreateContainer so that checking and inserting an exec id
    /// is atomic.
    exec_lock: tokio::sync::Mutex<()>,
    shutdown: ShutdownMode,
    /// The cgroup2 mount for container groups; `None` where /sys/fs/cgroup is not cgroup2
    /// (host mode on a v1 or hybrid host).
    cgroup_root: Option<PathBuf>,
    oom_events: OomEvents,
    /// Serialises ConfigureNetwork.
    network_lock: tokio::sync::Mutex<()>,
}

impl Agent {
    pub fn new(table: Arc<ProcTable>, shutdown: ShutdownMode) -> Agent {
        let root = Path::new(cgroup::CGROUP_ROOT);
        let cgroup_root = cgroup::is_cgroup2(root).then(|| root.to_path_buf());
        if cgroup_root.is_none() {
            agent_log!(
                "no cgroup2 at {}: containers get no cgroup",
                cgroup::CGROUP_ROOT
            );
        }
        Agent {
            table,
            procs: Mutex::new(HashMap::new()),
            containers: Mutex::new(HashMap::new()),
            exec_lock: tokio::sync::Mutex::new(()),
            shutdown,
            cgroup_root,
            oom_events: OomEvents::default(),
            network_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, ContainerRecord>> {
        // Plain map operations only: a poisoned map is still consistent.
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn procs(&self) -> MutexGuard<'_, HashMap<String, Arc<Process>>> {
        // Every critical section is a plain map operation: a poisoned map is still consistent.
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, exec_id: &str) -> Result<Arc<Process>> {
        self.procs()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ServiceError::UnknownExec(exec_id.to_string()))
    }
}

/// What every RPC method of the service returns.
type Result<T> = std::result::Result<T, ServiceError>;

/// Runs blocking work (cgroupfs, procfs, fork/exec) off the async workers; `what` names it in
/// the error when the task panics.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(format!("{what} task failed: {e}")))
}

/// Implements the ttrpc service: each RPC is served by the `Agent` method of its family, whose
/// [`ServiceError`] becomes the ttrpc status. An RPC left out here would answer NOT_FOUND
/// ("not supported"), the generated default.
macro_rules! agent_service {
    ($($rpc:ident($req:ty) -> $resp:ty => $method:ident;)*) => {
        #[async_trait::async_trait]
        impl agent_ttrpc::AgentService for Agent {
            $(
                async fn $rpc(&self, _ctx: &TtrpcContext, req: $req) -> ttrpc::Result<$resp> {
                    crate::failpoints::inject(stringify!($rpc)).await?;
                    Ok(self.$method(req).await?)
                }
            )*
        }
    };
}

agent_service! {
    // sandbox.rs
    check(CheckRequest) -> CheckResponse => check;
    version(Empty) -> VersionResponse => version;
    get_guest_metrics(GuestMetricsRequest) -> GuestMetricsResponse => guest_metrics;
    destroy_sandbox(DestroySandboxRequest) -> Empty => destroy;
    // process.rs
    exec_process(ExecProcessRequest) -> ExecProcessResponse => exec;
    wait_process(WaitProcessRequest) -> WaitProcessResponse => wait;
    signal_process(SignalProcessRequest) -> Empty => signal;
    write_stdin(WriteStdinRequest) -> WriteStdinResponse => write_stdin;
    close_stdin(CloseStdinRequest) -> Empty => close_stdin;
    read_stdout(ReadOutputRequest) -> ReadOutputResponse => read_stdout;
    read_stderr(ReadOutputRequest) -> ReadOutputResponse => read_stderr;
    resize_terminal(ResizeTerminalRequest) -> Empty => resize;
    // container.rs
    create_container(CreateContainerRequest) -> CreateContainerResponse => create;
    remove_container(ContainerRequest) -> Empty => remove;
    pause_container(ContainerRequest) -> Empty => pause;
    resume_container(ContainerRequest) -> Empty => resume;
    update_container(UpdateContainerRequest) -> Empty => update;
    stats_container(ContainerRequest) -> ContainerStats => stats;
    list_pids(ContainerRequest) -> ListPidsResponse => list_pids;
    get_oom_event(Empty) -> OomEvent => next_oom_event;
    // network.rs
    configure_network(ConfigureNetworkRequest) -> Empty => configure_network;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
            (
                ServiceError::ContainerNotRunning("c".into()),
                Code::FAILED_PRECONDITION,
            ),
            (
                ServiceError::ContainerPaused("c".into()),
                Code::FAILED_PRECONDITION,
            ),
            (
                ServiceError::NoCgroup("c".into()),
                Code::FAILED_PRECONDITION,
            ),
            (
                ServiceError::NotATerminal("e".into()),
                Code::FAILED_PRECONDITION,
            ),
            (
                ServiceError::OciProcessWithoutContainer,
                Code::INVALID_ARGUMENT,
            ),
            (
                SpecError::InvalidRlimit("RLIMIT_FOO".into()).into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                CgroupError::InvalidResources("x".into()).into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                CgroupError::Timeout {
                    path: "p".into(),
                    what: "frozen 1",
                    timeout: Duration::from_secs(1),
                }
                .into(),
                Code::INTERNAL,
            ),
            (
                ContainerError::from(SpecError::Missing("root")).into(),
                Code::INVALID_ARGUMENT,
            ),
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
