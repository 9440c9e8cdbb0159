//! The containerd Task service (task API v2) of `containerd-shim-joey-v2`: one sandbox microVM
//! (one `SandboxActor`) per shim, one container in it for this increment.
//!
//! Create mounts containerd's rootfs under `<bundle>/rootfs` and boots the VM; Start shares the
//! rootfs over virtio-fs and starts the process (agent `CreateContainer`), then pumps stdio and
//! waits for it; Delete stops the VM and unmounts. Events go to containerd in the order
//! TaskCreate, TaskStart, TaskExit, TaskDelete (one ordered publisher queue).
//!
//! While the sandbox runs (from Create until Delete/Shutdown stops it) the shim serves the
//! sandbox's Prometheus endpoint `<state_dir>/<id>/metrics.sock`, like `joeyctl run`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskIO, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use joey_actors::sandbox::{
    CreateContainer, SandboxActor, SandboxError, SignalProcess, StartSandbox, StopSandbox, WaitProcess,
};
use joey_actors::{AgentError, RpcCode};
use tokio::sync::{watch, Mutex, Notify};

use super::{mounts, spec, stdio};

/// Booting the VM (TCG can be slow) and starting the agent.
const START_SANDBOX_TIMEOUT: Duration = Duration::from_secs(180);
/// Agent CreateContainer, SignalProcess.
const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Tearing the VM down.
const STOP_SANDBOX_TIMEOUT: Duration = Duration::from_secs(60);
/// After the process exited: how long its output may still take to reach containerd's fifos.
const IO_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("joey config: {0}")]
    Config(String),
    #[error("container {0} not found in this shim")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0} is not implemented by containerd-shim-joey-v2 yet")]
    Unimplemented(&'static str),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
    #[error("sandbox: {0}")]
    Sandbox(#[from] SandboxError),
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("internal: {0}")]
    Internal(String),
}

impl TaskError {
    fn code(&self) -> Code {
        match self {
            TaskError::NotFound(_) => Code::NOT_FOUND,
            TaskError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            TaskError::FailedPrecondition(_) | TaskError::Config(_) => Code::FAILED_PRECONDITION,
            TaskError::Unimplemented(_) => Code::UNIMPLEMENTED,
            TaskError::Spec(_) | TaskError::Mount(mounts::MountError::Unsupported(_)) => Code::INVALID_ARGUMENT,
            TaskError::Sandbox(SandboxError::Agent(AgentError::Rpc { code: RpcCode::NotFound, .. })) => Code::NOT_FOUND,
            TaskError::Sandbox(e) if e.is_bad_input() => Code::INVALID_ARGUMENT,
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
        TaskError::Internal(format!("sandbox actor: {e}"))
    }
}

/// How a container's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub status: u32,
    pub at: SystemTime,
}

fn ts(t: SystemTime) -> MessageField<Timestamp> {
    MessageField::some(Timestamp::from(t))
}

/// The exit status containerd expects for a process killed by `signal` (before it ran).
pub fn killed_status(signal: u32) -> u32 {
    128 + signal
}

struct Container {
    id: String,
    bundle: String,
    rootfs: PathBuf,
    rootfs_mounted: bool,
    spec: spec::ContainerSpec,
    io: stdio::StdioPaths,
    pid: u32,
    status: Status,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    stdin_closed: Arc<Notify>,
}

impl Container {
    fn exit(&self) -> Option<ExitInfo> {
        *self.exit_tx.borrow()
    }
}

/// The Task service.
pub struct JoeyTask {
    inner: Arc<Inner>,
}

struct Inner {
    /// None when the joey config failed to load (the reason is in `config_error`).
    sandbox: Option<Addr<SandboxActor>>,
    config_error: Option<String>,
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    container: Mutex<Option<Container>>,
    /// The sandbox's metrics endpoint while it runs; dropped (socket removed) before StopSandbox.
    metrics: std::sync::Mutex<Option<joey_observability::http::UnixServer>>,
}

impl JoeyTask {
    pub fn new(
        sandbox: Result<Addr<SandboxActor>, String>,
        namespace: String,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> JoeyTask {
        let (sandbox, config_error) = match sandbox {
            Ok(a) => (Some(a), None),
            Err(e) => (None, Some(e)),
        };
        JoeyTask {
            inner: Arc::new(Inner {
                sandbox,
                config_error,
                namespace,
                publisher,
                exit,
                container: Mutex::new(None),
                metrics: std::sync::Mutex::new(None),
            }),
        }
    }
}

impl Inner {
    fn sandbox(&self) -> Result<Addr<SandboxActor>, TaskError> {
        self.sandbox
            .clone()
            .ok_or_else(|| TaskError::Config(self.config_error.clone().unwrap_or_default()))
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(ttrpc::context::Context::default(), topic, &self.namespace, event)
            .await
        {
            tracing::warn!(topic, error = %e, "publishing event failed");
        }
    }

    async fn publish_exit(&self, id: &str, pid: u32, exit: ExitInfo) {
        let ev = TaskExit {
            container_id: id.to_string(),
            id: id.to_string(),
            pid,
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        };
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev)).await;
    }

    /// Stops serving the metrics endpoint and removes its socket (no-op when not serving).
    async fn stop_metrics(&self) {
        let server = self.metrics.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(server) = server {
            // Dropping unlinks the socket: off the async threads.
            if let Err(e) = tokio::task::spawn_blocking(move || drop(server)).await {
                tracing::warn!(error = %e, "stopping the metrics endpoint failed");
            }
        }
    }

    async fn stop_sandbox(&self) {
        self.stop_metrics().await;
        let Some(sb) = self.sandbox.clone() else { return };
        match tokio::time::timeout(STOP_SANDBOX_TIMEOUT, sb.send(StopSandbox)).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "stopping the sandbox failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "sandbox actor unreachable"),
            Err(_) => tracing::warn!("stopping the sandbox timed out"),
        }
    }

    async fn unmount_rootfs(rootfs: PathBuf) {
        match tokio::task::spawn_blocking(move || mounts::unmount(&rootfs)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "unmounting the rootfs failed"),
            Err(e) => tracing::warn!(error = %e, "unmount task failed"),
        }
    }

    async fn create(&self, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse, TaskError> {
        let sb = self.sandbox()?;
        let mut slot = self.container.lock().await;
        if let Some(c) = slot.as_ref() {
            return Err(TaskError::AlreadyExists(format!(
                "this shim already runs container {}; more containers per sandbox come with a later increment",
                c.id
            )));
        }
        if !req.checkpoint.is_empty() {
            return Err(TaskError::Unimplemented("restoring from a checkpoint"));
        }
        let bundle = PathBuf::from(&req.bundle);
        let b = bundle.clone();
        let spec = tokio::task::spawn_blocking(move || spec::load(&b))
            .await
            .map_err(|e| TaskError::Internal(e.to_string()))??;
        let io = stdio::StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let rootfs = bundle.join("rootfs");
        let mounted = !req.rootfs.is_empty();
        if mounted {
            mounts::check(&req.rootfs)?;
            let r = rootfs.clone();
            tokio::task::spawn_blocking(move || std::fs::create_dir_all(&r))
                .await
                .map_err(|e| TaskError::Internal(e.to_string()))?
                .map_err(|e| TaskError::Internal(format!("create {}: {e}", rootfs.display())))?;
            mounts::mount_all(&req.rootfs, &rootfs).await?;
        }
        let started = match tokio::time::timeout(START_SANDBOX_TIMEOUT, sb.send(StartSandbox)).await {
            Ok(Ok(Ok(s))) => Ok(s),
            Ok(Ok(Err(e))) => Err(TaskError::Sandbox(e)),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(TaskError::Timeout {
                what: "starting the sandbox VM",
                after: START_SANDBOX_TIMEOUT,
            }),
        };
        let started = match started {
            Ok(s) => s,
            Err(e) => {
                self.stop_sandbox().await;
                if mounted {
                    Self::unmount_rootfs(rootfs).await;
                }
                return Err(e);
            }
        };
        tracing::info!(id = %req.id, backend = %started.backend, accel = %started.accel, "sandbox VM started");
        // GET /metrics on <state_dir>/<id>/metrics.sock while the sandbox runs (docs/metrics.md).
        // Binding touches the filesystem: on the blocking pool (which has the runtime's context,
        // so the endpoint's accept loop is spawned on the runtime).
        let (msb, dir) = (sb.clone(), started.state_dir.clone());
        match tokio::task::spawn_blocking(move || joey_actors::sandbox::serve_metrics(&msb, &dir)).await {
            Ok(Ok(server)) => *self.metrics.lock().unwrap_or_else(|p| p.into_inner()) = Some(server),
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics endpoint unavailable"),
            Err(e) => tracing::warn!(error = %e, "metrics endpoint unavailable"),
        }
        let ev = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: io.stdin.clone(),
                stdout: io.stdout.clone(),
                stderr: io.stderr.clone(),
                terminal: io.terminal,
                ..Default::default()
            }),
            checkpoint: String::new(),
            pid: 0,
            ..Default::default()
        };
        let (exit_tx, _) = watch::channel(None);
        *slot = Some(Container {
            id: req.id.clone(),
            bundle: req.bundle,
            rootfs,
            rootfs_mounted: mounted,
            spec,
            io,
            pid: 0,
            status: Status::CREATED,
            exit_tx,
            stdin_closed: Arc::new(Notify::new()),
        });
        drop(slot);
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev)).await;
        Ok(api::CreateTaskResponse {
            pid: 0,
            ..Default::default()
        })
    }

    async fn start(self: &Arc<Self>, req: api::StartRequest) -> Result<api::StartResponse, TaskError> {
        let sb = self.sandbox()?;
        let mut slot = self.container.lock().await;
        let c = slot.as_mut().filter(|c| c.id == req.id).ok_or_else(|| TaskError::NotFound(req.id.clone()))?;
        if !req.exec_id.is_empty() {
            return Err(TaskError::NotFound(format!("exec {} (exec is not implemented yet)", req.exec_id)));
        }
        if c.status != Status::CREATED {
            return Err(TaskError::FailedPrecondition(format!("container {} is not in the created state", c.id)));
        }
        let msg = CreateContainer {
            container_id: c.id.clone(),
            rootfs: c.rootfs.clone(),
            read_only: c.spec.read_only,
            argv: c.spec.argv.clone(),
            env: c.spec.env.clone(),
            cwd: c.spec.cwd.clone(),
            terminal: c.spec.terminal,
            hostname: c.spec.hostname.clone(),
        };
        let pid = match tokio::time::timeout(AGENT_CALL_TIMEOUT, sb.send(msg)).await {
            Ok(r) => r??,
            Err(_) => {
                return Err(TaskError::Timeout {
                    what: "CreateContainer",
                    after: AGENT_CALL_TIMEOUT,
                })
            }
        };
        c.pid = pid;
        c.status = Status::RUNNING;
        let (id, io, stdin_closed, exit_tx) = (c.id.clone(), c.io.clone(), c.stdin_closed.clone(), c.exit_tx.clone());
        drop(slot);
        // TaskStart is queued before the monitor can queue TaskExit.
        let ev = TaskStart {
            container_id: id.clone(),
            pid,
            ..Default::default()
        };
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev)).await;
        let me = self.clone();
        tokio::spawn(async move { me.monitor(sb, id, pid, io, stdin_closed, exit_tx).await });
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    /// Pumps stdio and waits for the process; records and publishes its exit once its output
    /// has reached containerd's fifos (or `IO_DRAIN_TIMEOUT` passed).
    async fn monitor(
        self: Arc<Self>,
        sb: Addr<SandboxActor>,
        id: String,
        pid: u32,
        io: stdio::StdioPaths,
        stdin_closed: Arc<Notify>,
        exit_tx: watch::Sender<Option<ExitInfo>>,
    ) {
        let out = tokio::spawn(stdio::pump_output(sb.clone(), id.clone(), false, io.stdout.clone()));
        let err = tokio::spawn(stdio::pump_output(sb.clone(), id.clone(), true, io.stderr.clone()));
        let inp = tokio::spawn(stdio::pump_stdin(sb.clone(), id.clone(), io.stdin.clone(), stdin_closed));
        let status = match sb.send(WaitProcess { exec_id: id.clone() }).await {
            Ok(Ok(w)) => u32::try_from(w.status).unwrap_or(255),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "waiting for the container process failed");
                255
            }
            Err(e) => {
                tracing::error!(error = %e, "sandbox actor unreachable");
                255
            }
        };
        let drained = tokio::time::timeout(IO_DRAIN_TIMEOUT, async {
            let _ = out.await;
            let _ = err.await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("container output not drained in time");
        }
        inp.abort();
        let exit = ExitInfo {
            status,
            at: SystemTime::now(),
        };
        {
            let mut slot = self.container.lock().await;
            if let Some(c) = slot.as_mut().filter(|c| c.id == id) {
                c.status = Status::STOPPED;
            }
        }
        let _ = exit_tx.send_replace(Some(exit));
        self.publish_exit(&id, pid, exit).await;
    }

    async fn kill(&self, req: api::KillRequest) -> Result<(), TaskError> {
        let sb = self.sandbox()?;
        let mut slot = self.container.lock().await;
        let c = slot.as_mut().filter(|c| c.id == req.id).ok_or_else(|| TaskError::NotFound(req.id.clone()))?;
        if !req.exec_id.is_empty() {
            return Err(TaskError::NotFound(format!("exec {}", req.exec_id)));
        }
        if c.exit().is_some() || c.status == Status::STOPPED {
            return Err(TaskError::NotFound(format!("process of container {} has already exited", c.id)));
        }
        if c.status == Status::CREATED {
            // Never started: it "exits" with the signal right away.
            let exit = ExitInfo {
                status: killed_status(req.signal),
                at: SystemTime::now(),
            };
            c.status = Status::STOPPED;
            let _ = c.exit_tx.send_replace(Some(exit));
            let id = c.id.clone();
            drop(slot);
            self.publish_exit(&id, 0, exit).await;
            return Ok(());
        }
        let msg = SignalProcess {
            exec_id: c.id.clone(),
            signal: req.signal,
        };
        drop(slot);
        match tokio::time::timeout(AGENT_CALL_TIMEOUT, sb.send(msg)).await {
            Ok(r) => Ok(r??),
            Err(_) => Err(TaskError::Timeout {
                what: "SignalProcess",
                after: AGENT_CALL_TIMEOUT,
            }),
        }
    }

    async fn delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse, TaskError> {
        let mut slot = self.container.lock().await;
        let c = slot.as_ref().filter(|c| c.id == req.id).ok_or_else(|| TaskError::NotFound(req.id.clone()))?;
        if !req.exec_id.is_empty() {
            return Err(TaskError::NotFound(format!("exec {}", req.exec_id)));
        }
        if c.status == Status::RUNNING {
            return Err(TaskError::FailedPrecondition(format!("container {} is still running", c.id)));
        }
        let Some(c) = slot.take() else {
            return Err(TaskError::NotFound(req.id));
        };
        drop(slot);
        self.stop_sandbox().await;
        if c.rootfs_mounted {
            Self::unmount_rootfs(c.rootfs.clone()).await;
        }
        let exit = c.exit().unwrap_or(ExitInfo {
            status: 0,
            at: SystemTime::now(),
        });
        let ev = TaskDelete {
            container_id: c.id.clone(),
            id: c.id.clone(),
            pid: c.pid,
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev)).await;
        Ok(api::DeleteResponse {
            pid: c.pid,
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }

    async fn state(&self, req: api::StateRequest) -> Result<api::StateResponse, TaskError> {
        let slot = self.container.lock().await;
        let c = slot.as_ref().filter(|c| c.id == req.id).ok_or_else(|| TaskError::NotFound(req.id.clone()))?;
        if !req.exec_id.is_empty() {
            return Err(TaskError::NotFound(format!("exec {}", req.exec_id)));
        }
        let exit = c.exit();
        Ok(api::StateResponse {
            id: c.id.clone(),
            bundle: c.bundle.clone(),
            pid: c.pid,
            status: c.status.into(),
            stdin: c.io.stdin.clone(),
            stdout: c.io.stdout.clone(),
            stderr: c.io.stderr.clone(),
            terminal: c.io.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| ts(e.at)).unwrap_or_default(),
            ..Default::default()
        })
    }

    async fn wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse, TaskError> {
        let mut rx = {
            let slot = self.container.lock().await;
            let c = slot.as_ref().filter(|c| c.id == req.id).ok_or_else(|| TaskError::NotFound(req.id.clone()))?;
            if !req.exec_id.is_empty() {
                return Err(TaskError::NotFound(format!("exec {}", req.exec_id)));
            }
            c.exit_tx.subscribe()
        };
        // No timeout of our own: Wait lasts as long as the process; containerd cancels it.
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| TaskError::NotFound(req.id.clone()))?
            .ok_or_else(|| TaskError::Internal("exit missing".into()))?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }
}

fn reply<T>(r: Result<T, TaskError>, what: &str) -> ttrpc::Result<T> {
    r.map_err(|e| {
        tracing::warn!(rpc = what, error = %e, "task request failed");
        e.into()
    })
}

#[async_trait]
impl Task for JoeyTask {
    async fn create(&self, _: &TtrpcContext, req: api::CreateTaskRequest) -> ttrpc::Result<api::CreateTaskResponse> {
        tracing::info!(id = %req.id, bundle = %req.bundle, "Create");
        reply(self.inner.create(req).await, "Create")
    }

    async fn start(&self, _: &TtrpcContext, req: api::StartRequest) -> ttrpc::Result<api::StartResponse> {
        reply(self.inner.start(req).await, "Start")
    }

    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<api::Empty> {
        reply(self.inner.kill(req).await.map(|()| api::Empty::new()), "Kill")
    }

    async fn delete(&self, _: &TtrpcContext, req: api::DeleteRequest) -> ttrpc::Result<api::DeleteResponse> {
        reply(self.inner.delete(req).await, "Delete")
    }

    async fn state(&self, _: &TtrpcContext, req: api::StateRequest) -> ttrpc::Result<api::StateResponse> {
        reply(self.inner.state(req).await, "State")
    }

    async fn wait(&self, _: &TtrpcContext, req: api::WaitRequest) -> ttrpc::Result<api::WaitResponse> {
        reply(self.inner.wait(req).await, "Wait")
    }

    async fn pids(&self, _: &TtrpcContext, req: api::PidsRequest) -> ttrpc::Result<api::PidsResponse> {
        let slot = self.inner.container.lock().await;
        let r = match slot.as_ref().filter(|c| c.id == req.id) {
            Some(c) => Ok(api::PidsResponse {
                processes: if c.pid != 0 {
                    vec![ProcessInfo {
                        pid: c.pid,
                        ..Default::default()
                    }]
                } else {
                    Vec::new()
                },
                ..Default::default()
            }),
            None => Err(TaskError::NotFound(req.id)),
        };
        reply(r, "Pids")
    }

    async fn connect(&self, _: &TtrpcContext, req: api::ConnectRequest) -> ttrpc::Result<api::ConnectResponse> {
        let slot = self.inner.container.lock().await;
        let task_pid = slot.as_ref().filter(|c| c.id == req.id).map(|c| c.pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, _: api::ShutdownRequest) -> ttrpc::Result<api::Empty> {
        if self.inner.container.lock().await.is_some() {
            // Containers are left: keep serving them.
            return Ok(api::Empty::new());
        }
        self.inner.stop_sandbox().await;
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }

    async fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> ttrpc::Result<api::Empty> {
        let slot = self.inner.container.lock().await;
        let r = match slot.as_ref().filter(|c| c.id == req.id) {
            Some(c) => {
                if req.stdin {
                    c.stdin_closed.notify_one();
                }
                Ok(api::Empty::new())
            }
            None => Err(TaskError::NotFound(req.id)),
        };
        reply(r, "CloseIO")
    }

    /// A no-op for now: terminals are not resized yet (documented in docs/shim.md).
    async fn resize_pty(&self, _: &TtrpcContext, _: api::ResizePtyRequest) -> ttrpc::Result<api::Empty> {
        Ok(api::Empty::new())
    }

    async fn exec(&self, _: &TtrpcContext, _: api::ExecProcessRequest) -> ttrpc::Result<api::Empty> {
        Err(TaskError::Unimplemented("Exec").into())
    }

    async fn pause(&self, _: &TtrpcContext, _: api::PauseRequest) -> ttrpc::Result<api::Empty> {
        Err(TaskError::Unimplemented("Pause").into())
    }

    async fn resume(&self, _: &TtrpcContext, _: api::ResumeRequest) -> ttrpc::Result<api::Empty> {
        Err(TaskError::Unimplemented("Resume").into())
    }

    async fn checkpoint(&self, _: &TtrpcContext, _: api::CheckpointTaskRequest) -> ttrpc::Result<api::Empty> {
        Err(TaskError::Unimplemented("Checkpoint").into())
    }

    async fn update(&self, _: &TtrpcContext, _: api::UpdateTaskRequest) -> ttrpc::Result<api::Empty> {
        Err(TaskError::Unimplemented("Update").into())
    }

    async fn stats(&self, _: &TtrpcContext, _: api::StatsRequest) -> ttrpc::Result<api::StatsResponse> {
        Err(TaskError::Unimplemented("Stats").into())
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
    fn killed_status_is_128_plus_signal() {
        assert_eq!(killed_status(9), 137);
        assert_eq!(killed_status(15), 143);
    }
}
