//! The containerd Task service (task API v2) of `containerd-shim-joey-v2`: one sandbox microVM
//! (one `SandboxActor`) per shim, any number of containers in it (one `ContainerActor` each).
//!
//! This is a stateless adapter from ttrpc requests to actor messages: the Container actors own
//! the containers' state and make their agent calls ([`joey_actors::container`]); the shim keeps
//! only their addresses ([`Registry`]) and the sandbox slot (whether the VM runs). The requests
//! are served in [`super::lifecycle`] (Create, Delete, Pause/Resume, Shutdown, the VM's
//! lifetime), [`super::process`] (Start, Exec, Kill, Wait, State, stdio) and [`super::cgroup`]
//! (Stats, Update). Events go out through one ordered publisher ([`super::events`]).
//!
//! While the sandbox runs the shim serves the sandbox's Prometheus endpoint
//! `<state_dir>/<id>/metrics.sock`, like `joeyctl run`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::dev::ToEnvelope;
use actix::prelude::*;
use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext, Code};
use joey_actors::container::{ContainerActor, ContainerError, AGENT_CALL_TIMEOUT};
use joey_actors::resource::ResourceError;
use joey_actors::sandbox::{SandboxActor, SandboxError};
use joey_actors::{AgentError, RpcCode};

use super::events::{Events, ShimMetrics};
use super::lifecycle::SandboxSlot;
use super::{mounts, spec, stdio};

/// Replies of the Container actors: covers an operation queued behind another one (each agent
/// call of an operation is bounded by [`AGENT_CALL_TIMEOUT`]; Delete makes two).
const ACTOR_TIMEOUT: Duration = Duration::from_secs(2 * AGENT_CALL_TIMEOUT.as_secs() + 30);

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Why the joey config did not load (`ShimError::Config`'s text, which names it).
    #[error("{0}")]
    Config(String),
    #[error("container {0} not found in this shim")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0} is not implemented by containerd-shim-joey-v2")]
    Unimplemented(&'static str),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
    #[error("sandbox: {0}")]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error(transparent)]
    Stdio(#[from] stdio::StdioError),
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("internal: {0}")]
    Internal(String),
}

/// The gRPC code of a Sandbox actor error (an agent's code passes through).
fn sandbox_code(e: &SandboxError) -> Code {
    match e {
        SandboxError::Agent(AgentError::Rpc { code, .. }) => match code {
            RpcCode::NotFound => Code::NOT_FOUND,
            RpcCode::InvalidArgument => Code::INVALID_ARGUMENT,
            RpcCode::AlreadyExists => Code::ALREADY_EXISTS,
            RpcCode::PermissionDenied => Code::PERMISSION_DENIED,
            RpcCode::Unimplemented => Code::UNIMPLEMENTED,
            RpcCode::FailedPrecondition => Code::FAILED_PRECONDITION,
            RpcCode::Transport | RpcCode::Other => Code::INTERNAL,
        },
        e if e.is_bad_input() => Code::INVALID_ARGUMENT,
        _ => Code::INTERNAL,
    }
}

impl TaskError {
    fn code(&self) -> Code {
        match self {
            TaskError::NotFound(_) => Code::NOT_FOUND,
            TaskError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            TaskError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            TaskError::FailedPrecondition(_) | TaskError::Config(_) => Code::FAILED_PRECONDITION,
            TaskError::Unimplemented(_) => Code::UNIMPLEMENTED,
            TaskError::Spec(_) | TaskError::Mount(mounts::MountError::Unsupported(_)) => Code::INVALID_ARGUMENT,
            TaskError::Stdio(stdio::StdioError::BadUri { .. } | stdio::StdioError::SplitBinary { .. }) => {
                Code::INVALID_ARGUMENT
            }
            TaskError::Container(e) => match e {
                ContainerError::NoProcess { .. } | ContainerError::Exited { .. } | ContainerError::Deleted(_) => {
                    Code::NOT_FOUND
                }
                ContainerError::ExecExists { .. } => Code::ALREADY_EXISTS,
                ContainerError::InvalidExecId(_) => Code::INVALID_ARGUMENT,
                ContainerError::Sandbox(e) => sandbox_code(e),
                ContainerError::Timeout { .. } => Code::DEADLINE_EXCEEDED,
                ContainerError::ProcessState { .. }
                | ContainerError::NotAllowed { .. }
                | ContainerError::Exiting(_)
                | ContainerError::State(_) => {
                    Code::FAILED_PRECONDITION
                }
            },
            TaskError::Sandbox(e) => sandbox_code(e),
            TaskError::Timeout { .. } => Code::DEADLINE_EXCEEDED,
            _ => Code::INTERNAL,
        }
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

impl From<MailboxError> for TaskError {
    fn from(e: MailboxError) -> Self {
        TaskError::Internal(format!("actor mailbox: {e}"))
    }
}

pub(super) fn ts(t: SystemTime) -> MessageField<Timestamp> {
    MessageField::some(Timestamp::from(t))
}

/// One request to a Container actor, bounded by [`ACTOR_TIMEOUT`].
pub(super) async fn ask<M>(c: &Addr<ContainerActor>, m: M) -> Result<M::Result, TaskError>
where
    M: actix::Message + Send + 'static,
    M::Result: Send,
    ContainerActor: Handler<M>,
    <ContainerActor as Actor>::Context: ToEnvelope<ContainerActor, M>,
{
    match tokio::time::timeout(ACTOR_TIMEOUT, c.send(m)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(TaskError::Timeout {
            what: "container actor",
            after: ACTOR_TIMEOUT,
        }),
    }
}

/// The addresses of this shim's Container actors by container id: which containers this shim
/// owns. Nothing else about a container is kept outside its actor; the lock is never held
/// across an await.
#[derive(Clone, Default)]
pub struct Registry(Arc<std::sync::Mutex<HashMap<String, Addr<ContainerActor>>>>);

impl Registry {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Addr<ContainerActor>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Result<Addr<ContainerActor>, TaskError> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(id.to_string()))
    }

    pub fn contains(&self, id: &str) -> bool {
        self.map().contains_key(id)
    }

    pub fn insert(&self, id: String, a: Addr<ContainerActor>) {
        self.map().insert(id, a);
    }

    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }
}

/// The Task service.
pub struct JoeyTask {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    /// None when the joey config failed to load (the reason is in `config_error`).
    pub(super) sandbox: Option<Addr<SandboxActor>>,
    pub(super) config_error: Option<String>,
    /// containerd namespace of this shim's tasks (for logging binaries' environment).
    pub(super) namespace: String,
    pub(super) events: Events,
    pub(super) metrics: ShimMetrics,
    pub(super) exit: Arc<ExitSignal>,
    /// The actix arbiter the actors run on (task requests arrive on plain tokio tasks, where
    /// `Actor::start` has no arbiter).
    pub(super) arbiter: actix::ArbiterHandle,
    /// The sandbox's lifetime, guarded by one lock (Create, Delete and Shutdown hold it).
    pub(super) life: tokio::sync::Mutex<SandboxSlot>,
    pub(super) containers: Registry,
    /// The sequence number of the last guest OOM event the OOM watch has handled (published
    /// or ignored): the exit of a container's first process waits for the events the agent
    /// had queued when it answered WaitProcess (see `monitor`).
    pub(super) oom_handled: Arc<tokio::sync::watch::Sender<u64>>,
}

impl JoeyTask {
    /// `sandbox`: the Sandbox actor and its metrics registry, or why there is none. Call it
    /// inside the actix system: the Container actors start on its arbiter.
    pub fn new(
        sandbox: Result<(Addr<SandboxActor>, Arc<joey_observability::SandboxMetrics>), String>,
        namespace: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> JoeyTask {
        // The definitions are constants (unit-tested in `events`).
        let metrics = ShimMetrics::new().expect("shim metric definitions are valid");
        let (sandbox, config_error) = match sandbox {
            Ok((a, registry)) => {
                if let Err(e) = metrics.register(&registry) {
                    tracing::warn!(error = %e, "shim metrics not served");
                }
                (Some(a), None)
            }
            Err(e) => (None, Some(e)),
        };
        let events = Events::start(publisher, namespace.clone(), metrics.clone());
        let task = JoeyTask {
            inner: Arc::new(Inner {
                sandbox,
                config_error,
                namespace,
                events,
                metrics,
                exit,
                arbiter: actix::Arbiter::current(),
                life: tokio::sync::Mutex::new(SandboxSlot::default()),
                containers: Registry::default(),
                oom_handled: Arc::new(tokio::sync::watch::channel(0).0),
            }),
        };
        tokio::spawn(task.inner.clone().exit_when_idle());
        task
    }
}

impl Inner {
    pub(super) fn sandbox(&self) -> Result<Addr<SandboxActor>, TaskError> {
        self.sandbox
            .clone()
            .ok_or_else(|| TaskError::Config(self.config_error.clone().unwrap_or_default()))
    }
}

/// Runs a Create, Start or Delete to its end even when containerd drops the request (its
/// connection closed: containerd restarted meanwhile). Half a Create — the VM booted, no
/// container recorded — or half a Delete would leave a VM that nothing owns and a shim that
/// never exits; half a Start — the process started in the guest, no output pump, no exit
/// monitor — a task that never leaves RUNNING and cannot be deleted. A finished one is a task
/// the restarted containerd lists, and can delete.
async fn to_completion<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, TaskError>> + Send + 'static,
) -> Result<T, TaskError> {
    tokio::spawn(f).await.unwrap_or_else(|e| Err(TaskError::Internal(format!("request task: {e}"))))
}

fn reply<T>(r: Result<T, TaskError>, what: &str) -> ttrpc::Result<T> {
    r.map_err(|e| {
        tracing::warn!(rpc = what, error = %e, "task request failed");
        e.into()
    })
}

fn empty(r: Result<(), TaskError>, what: &str) -> ttrpc::Result<api::Empty> {
    reply(r.map(|()| api::Empty::new()), what)
}

#[async_trait]
impl Task for JoeyTask {
    async fn create(&self, _: &TtrpcContext, req: api::CreateTaskRequest) -> ttrpc::Result<api::CreateTaskResponse> {
        let _t = self.inner.metrics.time("Create");
        tracing::info!(id = %req.id, bundle = %req.bundle, "Create");
        let inner = self.inner.clone();
        reply(to_completion(async move { inner.create(req).await }).await, "Create")
    }

    async fn start(&self, _: &TtrpcContext, req: api::StartRequest) -> ttrpc::Result<api::StartResponse> {
        let _t = self.inner.metrics.time("Start");
        let inner = self.inner.clone();
        reply(to_completion(async move { inner.start(req).await }).await, "Start")
    }

    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("Kill");
        empty(self.inner.kill(req).await, "Kill")
    }

    async fn delete(&self, _: &TtrpcContext, req: api::DeleteRequest) -> ttrpc::Result<api::DeleteResponse> {
        let _t = self.inner.metrics.time("Delete");
        let inner = self.inner.clone();
        reply(to_completion(async move { inner.delete(req).await }).await, "Delete")
    }

    async fn state(&self, _: &TtrpcContext, req: api::StateRequest) -> ttrpc::Result<api::StateResponse> {
        let _t = self.inner.metrics.time("State");
        reply(self.inner.state(req).await, "State")
    }

    async fn wait(&self, _: &TtrpcContext, req: api::WaitRequest) -> ttrpc::Result<api::WaitResponse> {
        let _t = self.inner.metrics.time("Wait");
        reply(self.inner.wait(req).await, "Wait")
    }

    async fn pids(&self, _: &TtrpcContext, req: api::PidsRequest) -> ttrpc::Result<api::PidsResponse> {
        let _t = self.inner.metrics.time("Pids");
        reply(self.inner.pids(req).await, "Pids")
    }

    async fn connect(&self, _: &TtrpcContext, req: api::ConnectRequest) -> ttrpc::Result<api::ConnectResponse> {
        let _t = self.inner.metrics.time("Connect");
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.inner.init_pid(&req.id).await,
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, _: api::ShutdownRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("Shutdown");
        self.inner.shutdown().await;
        Ok(api::Empty::new())
    }

    async fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("CloseIO");
        empty(self.inner.close_io(req).await, "CloseIO")
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: api::ResizePtyRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("ResizePty");
        empty(self.inner.resize_pty(req).await, "ResizePty")
    }

    async fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("Exec");
        empty(self.inner.exec(req).await, "Exec")
    }

    async fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("Pause");
        empty(self.inner.pause(req.id, true).await, "Pause")
    }

    async fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("Resume");
        empty(self.inner.pause(req.id, false).await, "Resume")
    }

    async fn checkpoint(&self, _: &TtrpcContext, _: api::CheckpointTaskRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("Checkpoint");
        Err(TaskError::Unimplemented("Checkpoint").into())
    }

    async fn update(&self, _: &TtrpcContext, req: api::UpdateTaskRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("Update");
        empty(self.inner.update(req).await, "Update")
    }

    async fn stats(&self, _: &TtrpcContext, req: api::StatsRequest) -> ttrpc::Result<api::StatsResponse> {
        let _t = self.inner.metrics.time("Stats");
        reply(self.inner.stats(req).await, "Stats")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_match_containerd_expectations() {
        assert_eq!(TaskError::NotFound("x".into()).code(), Code::NOT_FOUND);
        assert_eq!(TaskError::Unimplemented("Exec").code(), Code::UNIMPLEMENTED);
        assert_eq!(TaskError::AlreadyExists("x".into()).code(), Code::ALREADY_EXISTS);
        let bad = spec::parse(b"{", "config.json").unwrap_err();
        assert_eq!(TaskError::Spec(bad).code(), Code::INVALID_ARGUMENT);
        let msg = TaskError::Unimplemented("Pause").to_string();
        assert!(msg.contains("Pause") && msg.contains("not implemented"), "{msg}");
    }

    #[test]
    fn container_and_agent_errors_map_to_grpc_codes() {
        let no = ContainerError::NoProcess {
            container: "c".into(),
            exec_id: "e".into(),
        };
        assert_eq!(TaskError::Container(no).code(), Code::NOT_FOUND);
        let exited = ContainerError::Exited {
            container: "c".into(),
            exec_id: String::new(),
        };
        assert_eq!(TaskError::Container(exited).code(), Code::NOT_FOUND);
        assert_eq!(
            TaskError::Container(ContainerError::InvalidExecId("/".into())).code(),
            Code::INVALID_ARGUMENT
        );
        let unimpl = || {
            SandboxError::Agent(AgentError::Rpc {
                rpc: "PauseContainer",
                code: RpcCode::Unimplemented,
                message: "x".into(),
            })
        };
        assert!(joey_actors::container::sandbox_lacks_rpc(&unimpl()));
        assert_eq!(TaskError::Sandbox(unimpl()).code(), Code::UNIMPLEMENTED);
        let through_actor = TaskError::Container(ContainerError::Sandbox(unimpl()));
        assert_eq!(through_actor.code(), Code::UNIMPLEMENTED);
        assert!(through_actor.to_string().starts_with("sandbox: "), "{through_actor}");
        assert_eq!(TaskError::InvalidArgument("x".into()).code(), Code::INVALID_ARGUMENT);
    }
}
