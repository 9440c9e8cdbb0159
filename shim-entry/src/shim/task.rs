//! The containerd Task service (task API v2) of `containerd-shim-joey-v2`: one sandbox microVM
//! (one `SandboxActor`) per shim, any number of containers in it (one `ContainerActor` each).
//!
//! Create checks and translates the bundle's spec for the guest, mounts containerd's rootfs
//! under `<bundle>/rootfs` and, for the first container, boots the VM; Start shares the rootfs
//! and the bind-mount sources over virtio-fs and starts the process (agent `CreateContainer`,
//! or `ExecProcess` for an exec), then pumps stdio and waits for it; Delete removes the
//! container in the guest, releases its shares and unmounts, and stops the VM with the last
//! container. Events go out through one ordered publisher ([`super::events`]).
//!
//! While the sandbox runs the shim serves the sandbox's Prometheus endpoint
//! `<state_dir>/<id>/metrics.sock`, like `joeyctl run`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::dev::ToEnvelope;
use actix::prelude::*;
use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api;
use containerd_shim::protos::cgroups_v2::metrics as cg2;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message as _, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use joey_actors::container::{
    AddExec, ContainerActor, ContainerError, ContainerState, ContainerView, GetContainer, GetProcess, ProcessExited,
    ProcessIo, ProcessStarted, ProcessState, ProcessView, RemoveExec, SetPaused, StopContainer,
};
pub use joey_actors::container::ExitInfo;
use joey_actors::sandbox::{
    CreateContainer, ExecProcess, GetOomEvent, ListPids, PauseContainer, ResizeTerminal, ResumeContainer,
    SandboxActor, SandboxError, SignalProcess, StartSandbox, StatsContainer, StopSandbox, UpdateContainer,
    WaitProcess,
};
use joey_actors::{AgentError, RpcCode};
use joey_agent_protocol::agent;

use joey_actors::resource::{ResourceError, ResourceStack};

use super::events::{Events, ShimMetrics};
use super::resources::{GuestContainer, HostRootfs};
use super::{mounts, spec, stdio};

/// Booting the VM (TCG can be slow) and starting the agent.
const START_SANDBOX_TIMEOUT: Duration = Duration::from_secs(180);
/// One agent call (CreateContainer, ExecProcess, SignalProcess, Pause, Stats...).
const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Tearing the VM down.
const STOP_SANDBOX_TIMEOUT: Duration = Duration::from_secs(60);
/// After a process exited: how long its output may still take to reach containerd's fifos.
const IO_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Replies of the Container actors (in-memory bookkeeping only).
const ACTOR_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry bounds of the OOM long poll after an error.
const OOM_BACKOFF_MIN: Duration = Duration::from_millis(100);
const OOM_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// containerd's type URL of cgroup v2 metrics (what `ctr task metrics` decodes).
pub const CGROUPS_V2_METRICS_URL: &str = "io.containerd.cgroups.v2.Metrics";

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("joey config: {0}")]
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
            TaskError::Container(ContainerError::NoProcess { .. }) => Code::NOT_FOUND,
            TaskError::Container(ContainerError::ExecExists { .. }) => Code::ALREADY_EXISTS,
            TaskError::Container(ContainerError::InvalidExecId(_)) => Code::INVALID_ARGUMENT,
            TaskError::Container(_) => Code::FAILED_PRECONDITION,
            TaskError::Sandbox(SandboxError::Agent(AgentError::Rpc { code, .. })) => match code {
                RpcCode::NotFound => Code::NOT_FOUND,
                RpcCode::InvalidArgument => Code::INVALID_ARGUMENT,
                RpcCode::AlreadyExists => Code::ALREADY_EXISTS,
                RpcCode::PermissionDenied => Code::PERMISSION_DENIED,
                RpcCode::Unimplemented => Code::UNIMPLEMENTED,
                RpcCode::FailedPrecondition => Code::FAILED_PRECONDITION,
                RpcCode::Transport | RpcCode::Other => Code::INTERNAL,
            },
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
        TaskError::Internal(format!("actor mailbox: {e}"))
    }
}

fn ts(t: SystemTime) -> MessageField<Timestamp> {
    MessageField::some(Timestamp::from(t))
}

/// The exit status containerd expects for a process killed by `signal` (before it ran).
pub fn killed_status(signal: u32) -> u32 {
    128 + signal
}

/// Whether an agent error says the guest agent lacks the RPC (an agent older than the host).
fn agent_lacks_rpc(e: &SandboxError) -> bool {
    matches!(e, SandboxError::Agent(AgentError::Rpc { code: RpcCode::Unimplemented, .. }))
}

/// One agent call through the Sandbox actor, bounded by [`AGENT_CALL_TIMEOUT`].
async fn call<M, T>(sb: &Addr<SandboxActor>, what: &'static str, m: M) -> Result<T, TaskError>
where
    M: actix::Message<Result = Result<T, SandboxError>> + Send + 'static,
    T: Send + 'static,
    SandboxActor: Handler<M>,
    <SandboxActor as Actor>::Context: ToEnvelope<SandboxActor, M>,
{
    match tokio::time::timeout(AGENT_CALL_TIMEOUT, sb.send(m)).await {
        Ok(r) => Ok(r??),
        Err(_) => Err(TaskError::Timeout {
            what,
            after: AGENT_CALL_TIMEOUT,
        }),
    }
}

/// One request to a Container actor, bounded by [`ACTOR_TIMEOUT`].
async fn ask<M>(c: &Addr<ContainerActor>, m: M) -> Result<M::Result, TaskError>
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

/// What the shim keeps per container besides its actor: the spec and the resources.
#[derive(Clone)]
struct Entry {
    actor: Addr<ContainerActor>,
    spec: Arc<spec::ContainerSpec>,
    guest: Arc<spec::GuestSpec>,
    /// `<bundle>/rootfs`, where containerd's rootfs mounts are mounted.
    rootfs: PathBuf,
    /// Host rootfs, then guest container: cleaned up in reverse order by Delete.
    resources: Arc<tokio::sync::Mutex<ResourceStack>>,
}

/// The sandbox's lifetime, guarded by one lock (Create, Delete and Shutdown hold it).
#[derive(Default)]
struct SandboxSlot {
    running: bool,
    oom_watch: Option<tokio::task::JoinHandle<()>>,
}

/// The Task service.
pub struct JoeyTask {
    inner: Arc<Inner>,
}

struct Inner {
    /// None when the joey config failed to load (the reason is in `config_error`).
    sandbox: Option<Addr<SandboxActor>>,
    config_error: Option<String>,
    /// containerd namespace of this shim's tasks (for logging binaries' environment).
    namespace: String,
    events: Events,
    metrics: ShimMetrics,
    exit: Arc<ExitSignal>,
    /// The actix arbiter the actors run on (task requests arrive on plain tokio tasks, where
    /// `Actor::start` has no arbiter).
    arbiter: actix::ArbiterHandle,
    life: tokio::sync::Mutex<SandboxSlot>,
    containers: std::sync::Mutex<HashMap<String, Entry>>,
    /// The sandbox's metrics endpoint while it runs; dropped (socket removed) before StopSandbox.
    metrics_server: std::sync::Mutex<Option<joey_observability::http::UnixServer>>,
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
        JoeyTask {
            inner: Arc::new(Inner {
                sandbox,
                config_error,
                namespace,
                events,
                metrics,
                exit,
                arbiter: actix::Arbiter::current(),
                life: tokio::sync::Mutex::new(SandboxSlot::default()),
                containers: std::sync::Mutex::new(HashMap::new()),
                metrics_server: std::sync::Mutex::new(None),
            }),
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn status_of(p: &ProcessView, container: ContainerState) -> Status {
    match p.state {
        ProcessState::Created => Status::CREATED,
        ProcessState::Running if container == ContainerState::Paused => Status::PAUSED,
        ProcessState::Running => Status::RUNNING,
        ProcessState::Stopped => Status::STOPPED,
    }
}

/// cgroup v2 metrics in containerd's format from the agent's figures.
pub fn v2_metrics(s: &agent::ContainerStats) -> cg2::Metrics {
    let stat = |k: &str| s.memory_stat.get(k).copied().unwrap_or(0);
    cg2::Metrics {
        pids: MessageField::some(cg2::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(cg2::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        }),
        memory: MessageField::some(cg2::MemoryStat {
            anon: stat("anon"),
            file: stat("file"),
            kernel_stack: stat("kernel_stack"),
            slab: stat("slab"),
            sock: stat("sock"),
            shmem: stat("shmem"),
            file_mapped: stat("file_mapped"),
            file_dirty: stat("file_dirty"),
            file_writeback: stat("file_writeback"),
            anon_thp: stat("anon_thp"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            unevictable: stat("unevictable"),
            slab_reclaimable: stat("slab_reclaimable"),
            slab_unreclaimable: stat("slab_unreclaimable"),
            pgfault: stat("pgfault"),
            pgmajfault: stat("pgmajfault"),
            workingset_refault: stat("workingset_refault"),
            workingset_activate: stat("workingset_activate"),
            workingset_nodereclaim: stat("workingset_nodereclaim"),
            pgrefill: stat("pgrefill"),
            pgscan: stat("pgscan"),
            pgsteal: stat("pgsteal"),
            pgactivate: stat("pgactivate"),
            pgdeactivate: stat("pgdeactivate"),
            pglazyfree: stat("pglazyfree"),
            pglazyfreed: stat("pglazyfreed"),
            thp_fault_alloc: stat("thp_fault_alloc"),
            thp_collapse_alloc: stat("thp_collapse_alloc"),
            usage: s.memory_usage_bytes,
            usage_limit: s.memory_limit_bytes,
            swap_usage: s.memory_swap_usage_bytes,
            swap_limit: s.memory_swap_limit_bytes,
            ..Default::default()
        }),
        memory_events: MessageField::some(cg2::MemoryEvents {
            low: s.memory_events_low,
            high: s.memory_events_high,
            max: s.memory_events_max,
            oom: s.memory_events_oom,
            oom_kill: s.memory_events_oom_kill,
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Inner {
    fn sandbox(&self) -> Result<Addr<SandboxActor>, TaskError> {
        self.sandbox
            .clone()
            .ok_or_else(|| TaskError::Config(self.config_error.clone().unwrap_or_default()))
    }

    fn entry(&self, id: &str) -> Result<Entry, TaskError> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(id.to_string()))
    }

    async fn process(&self, id: &str, exec_id: &str) -> Result<(Entry, ProcessView), TaskError> {
        let e = self.entry(id)?;
        let p = ask(
            &e.actor,
            GetProcess {
                exec_id: exec_id.to_string(),
            },
        )
        .await??;
        Ok((e, p))
    }

    fn publish_exit(&self, container_id: &str, exec_id: &str, pid: u32, exit: ExitInfo) {
        let ev = TaskExit {
            container_id: container_id.to_string(),
            id: if exec_id.is_empty() { container_id } else { exec_id }.to_string(),
            pid,
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        };
        self.events.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev));
    }

    /// Stops serving the metrics endpoint and removes its socket (no-op when not serving).
    async fn stop_metrics(&self) {
        let server = lock(&self.metrics_server).take();
        if let Some(server) = server {
            // Dropping unlinks the socket: off the async threads.
            if let Err(e) = tokio::task::spawn_blocking(move || drop(server)).await {
                tracing::warn!(error = %e, "stopping the metrics endpoint failed");
            }
        }
    }

    /// Stops the VM and its resources (the caller holds `life`).
    async fn stop_sandbox(&self, slot: &mut SandboxSlot) {
        if let Some(w) = slot.oom_watch.take() {
            w.abort();
        }
        self.stop_metrics().await;
        slot.running = false;
        let Some(sb) = self.sandbox.clone() else { return };
        match tokio::time::timeout(STOP_SANDBOX_TIMEOUT, sb.send(StopSandbox)).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "stopping the sandbox failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "sandbox actor unreachable"),
            Err(_) => tracing::warn!("stopping the sandbox timed out"),
        }
    }

    /// Boots the VM (first container), serves its metrics and starts the OOM watch.
    async fn start_sandbox(self: &Arc<Self>, sb: &Addr<SandboxActor>, slot: &mut SandboxSlot) -> Result<(), TaskError> {
        let started = match tokio::time::timeout(START_SANDBOX_TIMEOUT, sb.send(StartSandbox)).await {
            Ok(Ok(Ok(s))) => s,
            Ok(Ok(Err(e))) => return Err(TaskError::Sandbox(e)),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(TaskError::Timeout {
                    what: "starting the sandbox VM",
                    after: START_SANDBOX_TIMEOUT,
                })
            }
        };
        slot.running = true;
        tracing::info!(backend = %started.backend, accel = %started.accel, "sandbox VM started");
        // GET /metrics on <state_dir>/<id>/metrics.sock while the sandbox runs (docs/metrics.md).
        // Binding touches the filesystem: on the blocking pool (which has the runtime's context,
        // so the endpoint's accept loop is spawned on the runtime).
        let (msb, dir) = (sb.clone(), started.state_dir.clone());
        match tokio::task::spawn_blocking(move || joey_actors::sandbox::serve_metrics(&msb, &dir)).await {
            Ok(Ok(server)) => *lock(&self.metrics_server) = Some(server),
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics endpoint unavailable"),
            Err(e) => tracing::warn!(error = %e, "metrics endpoint unavailable"),
        }
        slot.oom_watch = Some(tokio::spawn(oom_watch(sb.clone(), self.events.clone())));
        Ok(())
    }

    async fn create(self: &Arc<Self>, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse, TaskError> {
        let sb = self.sandbox()?;
        let mut slot = self.life.lock().await;
        if lock(&self.containers).contains_key(&req.id) {
            return Err(TaskError::AlreadyExists(format!("container {} already exists in this shim", req.id)));
        }
        if !joey_agent_protocol::is_valid_container_id(&req.id) {
            return Err(TaskError::InvalidArgument(format!(
                "invalid container id {:?}: expected 1 to 64 of [A-Za-z0-9_.-], starting alphanumeric",
                req.id
            )));
        }
        if !req.checkpoint.is_empty() {
            return Err(TaskError::Unimplemented("restoring from a checkpoint"));
        }
        // Spec checks (and bind source checks) come before anything is set up.
        let bundle = PathBuf::from(&req.bundle);
        let (b, id) = (bundle.clone(), req.id.clone());
        let (spec, guest) = tokio::task::spawn_blocking(move || -> Result<_, spec::SpecError> {
            let s = spec::load(&b)?;
            let g = spec::translate(&s, &id)?;
            Ok((s, g))
        })
        .await
        .map_err(|e| TaskError::Internal(e.to_string()))??;
        let io = ProcessIo {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        stdio::check_outputs(&io)?;
        let rootfs = bundle.join("rootfs");
        let mut resources = ResourceStack::default();
        if !req.rootfs.is_empty() {
            // Unsupported mount types are bad input: checked before anything is mounted.
            mounts::check(&req.rootfs)?;
            let r = HostRootfs {
                mounts: req.rootfs.clone(),
                target: rootfs.clone(),
            };
            resources.add(Box::new(r)).await?;
        }
        if !slot.running {
            if let Err(e) = self.start_sandbox(&sb, &mut slot).await {
                self.stop_sandbox(&mut slot).await;
                resources.cleanup_all().await;
                return Err(e);
            }
        }
        let actor = ContainerActor::new(req.id.clone(), req.bundle.clone(), io.clone());
        let actor = ContainerActor::start_in_arbiter(&self.arbiter, move |_| actor);
        lock(&self.containers).insert(
            req.id.clone(),
            Entry {
                actor,
                spec: Arc::new(spec),
                guest: Arc::new(guest),
                rootfs,
                resources: Arc::new(tokio::sync::Mutex::new(resources)),
            },
        );
        drop(slot);
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
        self.events.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev));
        Ok(api::CreateTaskResponse {
            pid: 0,
            ..Default::default()
        })
    }

    async fn start(self: &Arc<Self>, req: api::StartRequest) -> Result<api::StartResponse, TaskError> {
        let sb = self.sandbox()?;
        let (e, p) = self.process(&req.id, &req.exec_id).await?;
        if p.state != ProcessState::Created {
            return Err(TaskError::FailedPrecondition(format!(
                "process {:?} of container {} is {}, not created",
                req.exec_id, req.id, p.state
            )));
        }
        // Before the process exists, so that a logging binary sees all of its output.
        let (out_sink, err_sink) = stdio::open_outputs(&p.io, &req.id, &self.namespace).await?;
        let pid = if req.exec_id.is_empty() {
            let s = &e.spec;
            let msg = CreateContainer {
                container_id: req.id.clone(),
                rootfs: e.rootfs.clone(),
                read_only: s.read_only,
                argv: s.argv.clone(),
                env: s.env.clone(),
                cwd: s.cwd.clone(),
                terminal: s.terminal,
                hostname: s.hostname.clone(),
                oci_spec_json: e.guest.json.clone(),
                volumes: e.guest.volumes.clone(),
            };
            let pid = call(&sb, "CreateContainer", msg).await?;
            // The shares and the guest container now exist: released by Delete.
            e.resources.lock().await.push_ready(Box::new(GuestContainer {
                sandbox: sb.clone(),
                container_id: req.id.clone(),
            }));
            pid
        } else {
            let view = ask(&e.actor, GetContainer).await?;
            if view.state != ContainerState::Running {
                return Err(TaskError::FailedPrecondition(format!(
                    "container {} is {}: exec needs it running",
                    req.id, view.state
                )));
            }
            let x = spec::parse_process(p.process_json.as_bytes())?;
            let msg = ExecProcess(agent::ExecProcessRequest {
                exec_id: p.agent_id.clone(),
                argv: x.argv,
                env: x.env,
                cwd: x.cwd,
                terminal: p.io.terminal || x.terminal,
                container_id: req.id.clone(),
                oci_process_json: x.json,
                ..Default::default()
            });
            call(&sb, "ExecProcess", msg).await?
        };
        let out = tokio::spawn(stdio::pump_output(sb.clone(), p.agent_id.clone(), false, out_sink));
        let err = tokio::spawn(stdio::pump_output(sb.clone(), p.agent_id.clone(), true, err_sink));
        let inp = tokio::spawn(stdio::pump_stdin(
            sb.clone(),
            p.agent_id.clone(),
            p.io.stdin.clone(),
            p.stdin_closed.clone(),
        ));
        let pumps = vec![out.abort_handle(), err.abort_handle(), inp.abort_handle()];
        ask(
            &e.actor,
            ProcessStarted {
                exec_id: req.exec_id.clone(),
                pid,
                pumps,
            },
        )
        .await??;
        // The start event is queued before the monitor can queue the exit.
        if req.exec_id.is_empty() {
            let ev = TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            self.events.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev));
        } else {
            let ev = TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.events.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev));
        }
        let me = self.clone();
        let (actor, id, exec_id, agent_id) = (e.actor.clone(), req.id.clone(), req.exec_id.clone(), p.agent_id);
        tokio::spawn(async move { me.monitor(sb, actor, id, exec_id, agent_id, pid, out, err, inp).await });
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    /// Waits for a process; records and publishes its exit once its output has reached
    /// containerd's fifos (or `IO_DRAIN_TIMEOUT` passed).
    #[allow(clippy::too_many_arguments)]
    async fn monitor(
        self: Arc<Self>,
        sb: Addr<SandboxActor>,
        actor: Addr<ContainerActor>,
        id: String,
        exec_id: String,
        agent_id: String,
        pid: u32,
        out: tokio::task::JoinHandle<()>,
        err: tokio::task::JoinHandle<()>,
        inp: tokio::task::JoinHandle<()>,
    ) {
        // No timeout: a process may run for as long as it likes; the VM dying ends the wait.
        let status = match sb.send(WaitProcess { exec_id: agent_id }).await {
            Ok(Ok(w)) => {
                // An OOM kill the agent's watcher had not reported yet comes with the exit of
                // the container's first process: published first, as containerd expects.
                if w.oom_killed && exec_id.is_empty() {
                    tracing::info!(container = %id, "OOM kill in the guest (reported with the exit)");
                    let ev = TaskOOM {
                        container_id: id.clone(),
                        ..Default::default()
                    };
                    self.events.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev));
                }
                u32::try_from(w.status).unwrap_or(255)
            }
            Ok(Err(e)) => {
                tracing::error!(id, exec_id, error = %e, "waiting for the process failed");
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
            tracing::warn!(id, exec_id, "process output not drained in time");
        }
        inp.abort();
        let exit = ExitInfo {
            status,
            at: SystemTime::now(),
        };
        let exit = match ask(
            &actor,
            ProcessExited {
                exec_id: exec_id.clone(),
                exit,
            },
        )
        .await
        {
            Ok(Ok(first)) => first,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "recording the exit failed");
                exit
            }
            Err(e) => {
                tracing::warn!(error = %e, "recording the exit failed");
                exit
            }
        };
        self.publish_exit(&id, &exec_id, pid, exit);
    }

    async fn kill(&self, req: api::KillRequest) -> Result<(), TaskError> {
        let sb = self.sandbox()?;
        let (e, p) = self.process(&req.id, &req.exec_id).await?;
        match p.state {
            ProcessState::Stopped => Err(TaskError::NotFound(format!(
                "process {:?} of container {} has already exited",
                req.exec_id, req.id
            ))),
            ProcessState::Created => {
                // Never started: it "exits" with the signal right away.
                let exit = ExitInfo {
                    status: killed_status(req.signal),
                    at: SystemTime::now(),
                };
                let exit = ask(
                    &e.actor,
                    ProcessExited {
                        exec_id: req.exec_id.clone(),
                        exit,
                    },
                )
                .await??;
                self.publish_exit(&req.id, &req.exec_id, 0, exit);
                Ok(())
            }
            ProcessState::Running => {
                let msg = SignalProcess {
                    exec_id: p.agent_id,
                    signal: req.signal,
                    // `kill --all` addresses the container (its init); an exec is one process.
                    all: req.all && req.exec_id.is_empty(),
                };
                call(&sb, "SignalProcess", msg).await
            }
        }
    }

    async fn delete(self: &Arc<Self>, req: api::DeleteRequest) -> Result<api::DeleteResponse, TaskError> {
        if !req.exec_id.is_empty() {
            let e = self.entry(&req.id)?;
            let (p, exit) = ask(
                &e.actor,
                RemoveExec {
                    exec_id: req.exec_id.clone(),
                },
            )
            .await??;
            let exit = exit.unwrap_or(ExitInfo {
                status: 0,
                at: SystemTime::now(),
            });
            return Ok(api::DeleteResponse {
                pid: p.pid,
                exit_status: exit.status,
                exited_at: ts(exit.at),
                ..Default::default()
            });
        }
        let mut slot = self.life.lock().await;
        let e = self.entry(&req.id)?;
        let view: ContainerView = ask(&e.actor, GetContainer).await?;
        if matches!(view.state, ContainerState::Running | ContainerState::Paused) {
            return Err(TaskError::FailedPrecondition(format!(
                "container {} is still {}",
                req.id, view.state
            )));
        }
        lock(&self.containers).remove(&req.id);
        // Reverse order of setup: the guest container and its shares, then the host rootfs.
        let errors = e.resources.lock().await.cleanup_all().await;
        if !errors.is_empty() {
            tracing::warn!(id = %req.id, ?errors, "container cleanup incomplete");
        }
        e.actor.do_send(StopContainer);
        if lock(&self.containers).is_empty() {
            // The last container: the VM goes.
            self.stop_sandbox(&mut slot).await;
        }
        drop(slot);
        let exit = view.init.exit.unwrap_or(ExitInfo {
            status: 0,
            at: SystemTime::now(),
        });
        let ev = TaskDelete {
            container_id: req.id.clone(),
            id: req.id.clone(),
            pid: view.init.pid,
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        };
        self.events.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev));
        Ok(api::DeleteResponse {
            pid: view.init.pid,
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }

    async fn state(&self, req: api::StateRequest) -> Result<api::StateResponse, TaskError> {
        let (e, p) = self.process(&req.id, &req.exec_id).await?;
        let view = ask(&e.actor, GetContainer).await?;
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() { req.id.clone() } else { req.exec_id.clone() },
            bundle: view.bundle,
            pid: p.pid,
            status: status_of(&p, view.state).into(),
            stdin: p.io.stdin.clone(),
            stdout: p.io.stdout.clone(),
            stderr: p.io.stderr.clone(),
            terminal: p.io.terminal,
            exit_status: p.exit.map(|x| x.status).unwrap_or(0),
            exited_at: p.exit.map(|x| ts(x.at)).unwrap_or_default(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse, TaskError> {
        let (_, p) = self.process(&req.id, &req.exec_id).await?;
        let mut rx = p.exit_rx;
        // No timeout of our own: Wait lasts as long as the process; containerd cancels it.
        let exit = rx
            .wait_for(|x| x.is_some())
            .await
            .map_err(|_| TaskError::NotFound(format!("process {:?} of container {} is gone", req.exec_id, req.id)))?
            .ok_or_else(|| TaskError::Internal("exit missing".into()))?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }

    async fn exec(&self, req: api::ExecProcessRequest) -> Result<(), TaskError> {
        let e = self.entry(&req.id)?;
        let any = req
            .spec
            .as_ref()
            .ok_or_else(|| TaskError::InvalidArgument(format!("exec {}: no process spec", req.exec_id)))?;
        // Checked now, so that a bad spec fails Exec rather than Start.
        let x = spec::parse_process(&any.value)?;
        let exec_id = req.exec_id.clone();
        ask(
            &e.actor,
            AddExec {
                exec_id: exec_id.clone(),
                io: {
                    let io = ProcessIo {
                        stdin: req.stdin,
                        stdout: req.stdout,
                        stderr: req.stderr,
                        terminal: req.terminal,
                    };
                    stdio::check_outputs(&io)?;
                    io
                },
                process_json: x.json,
            },
        )
        .await??;
        let ev = TaskExecAdded {
            container_id: req.id,
            exec_id,
            ..Default::default()
        };
        self.events.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev));
        Ok(())
    }

    async fn pids(&self, req: api::PidsRequest) -> Result<api::PidsResponse, TaskError> {
        let e = self.entry(&req.id)?;
        let view = ask(&e.actor, GetContainer).await?;
        let pids = if matches!(view.state, ContainerState::Running | ContainerState::Paused) {
            match call(&self.sandbox()?, "ListPids", ListPids { container_id: req.id.clone() }).await {
                Ok(p) => p,
                Err(err) => {
                    tracing::debug!(error = %err, "agent ListPids failed; replying with the known pids");
                    let mut p = vec![view.init.pid];
                    for x in &view.execs {
                        if let Ok(Ok(v)) = ask(&e.actor, GetProcess { exec_id: x.clone() }).await {
                            if v.state == ProcessState::Running {
                                p.push(v.pid);
                            }
                        }
                    }
                    p
                }
            }
        } else {
            Vec::new()
        };
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, id: String, pause: bool) -> Result<(), TaskError> {
        let sb = self.sandbox()?;
        let e = self.entry(&id)?;
        let view = ask(&e.actor, GetContainer).await?;
        let want = if pause { ContainerState::Running } else { ContainerState::Paused };
        if view.state != want {
            return Err(TaskError::FailedPrecondition(format!(
                "container {id} is {}, not {want}",
                view.state
            )));
        }
        if pause {
            call(&sb, "PauseContainer", PauseContainer { container_id: id.clone() }).await?;
        } else {
            call(&sb, "ResumeContainer", ResumeContainer { container_id: id.clone() }).await?;
        }
        ask(&e.actor, SetPaused(pause)).await??;
        if pause {
            let ev = TaskPaused {
                container_id: id,
                ..Default::default()
            };
            self.events.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev));
        } else {
            let ev = TaskResumed {
                container_id: id,
                ..Default::default()
            };
            self.events.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev));
        }
        Ok(())
    }

    async fn stats(&self, req: api::StatsRequest) -> Result<api::StatsResponse, TaskError> {
        let sb = self.sandbox()?;
        self.entry(&req.id)?;
        let s = call(&sb, "StatsContainer", StatsContainer { container_id: req.id.clone() }).await?;
        let value = v2_metrics(&s)
            .write_to_bytes()
            .map_err(|e| TaskError::Internal(format!("encode metrics: {e}")))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: CGROUPS_V2_METRICS_URL.to_string(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn update(&self, req: api::UpdateTaskRequest) -> Result<(), TaskError> {
        let sb = self.sandbox()?;
        self.entry(&req.id)?;
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| TaskError::InvalidArgument(format!("update of {}: no resources", req.id)))?;
        let v: serde_json::Value = serde_json::from_slice(&any.value).map_err(|e| {
            TaskError::InvalidArgument(format!("update of {}: resources are not OCI LinuxResources JSON: {e}", req.id))
        })?;
        let msg = UpdateContainer {
            container_id: req.id.clone(),
            resources_json: v.to_string(),
        };
        call(&sb, "UpdateContainer", msg).await
    }

    async fn resize_pty(&self, req: api::ResizePtyRequest) -> Result<(), TaskError> {
        let sb = self.sandbox()?;
        let (_, p) = self.process(&req.id, &req.exec_id).await?;
        if p.state != ProcessState::Running || !p.io.terminal || req.width == 0 || req.height == 0 {
            // Nothing to resize (not started, exited, or no terminal), or a 0x0 size (ctr on a
            // terminal that has no size yet): the guest terminal keeps its size.
            return Ok(());
        }
        let msg = ResizeTerminal {
            exec_id: p.agent_id,
            rows: req.height,
            cols: req.width,
        };
        match call(&sb, "ResizeTerminal", msg).await {
            Err(TaskError::Sandbox(ref e)) if agent_lacks_rpc(e) => {
                tracing::debug!("the guest agent cannot resize terminals; ignored");
                Ok(())
            }
            r => r,
        }
    }

    async fn close_io(&self, req: api::CloseIORequest) -> Result<(), TaskError> {
        let (_, p) = self.process(&req.id, &req.exec_id).await?;
        if req.stdin {
            p.stdin_closed.notify_one();
        }
        Ok(())
    }

    async fn shutdown(&self) {
        let mut slot = self.life.lock().await;
        if !lock(&self.containers).is_empty() {
            // Containers are left: keep serving them.
            return;
        }
        self.stop_sandbox(&mut slot).await;
        drop(slot);
        self.events.flush().await;
        self.exit.signal();
    }
}

/// Long-polls the agent for OOM kills while the sandbox runs and publishes TaskOOM. Retries
/// with backoff after errors; ends when the sandbox stops (its task is also aborted then).
async fn oom_watch(sb: Addr<SandboxActor>, events: Events) {
    let mut backoff = OOM_BACKOFF_MIN;
    loop {
        match sb.send(GetOomEvent).await {
            Ok(Ok(container_id)) => {
                backoff = OOM_BACKOFF_MIN;
                tracing::info!(container = %container_id, "OOM kill in the guest");
                let ev = TaskOOM {
                    container_id,
                    ..Default::default()
                };
                events.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev));
            }
            Ok(Err(e)) if agent_lacks_rpc(&e) => {
                tracing::info!("the guest agent has no GetOomEvent: no OOM events for this sandbox");
                return;
            }
            Ok(Err(SandboxError::State(_))) | Ok(Err(SandboxError::VmDied { .. })) | Err(_) => return,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, ?backoff, "GetOomEvent failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(OOM_BACKOFF_MAX);
            }
        }
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
        let _t = self.inner.metrics.time("Create");
        tracing::info!(id = %req.id, bundle = %req.bundle, "Create");
        reply(self.inner.create(req).await, "Create")
    }

    async fn start(&self, _: &TtrpcContext, req: api::StartRequest) -> ttrpc::Result<api::StartResponse> {
        let _t = self.inner.metrics.time("Start");
        reply(self.inner.start(req).await, "Start")
    }

    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("Kill");
        reply(self.inner.kill(req).await.map(|()| api::Empty::new()), "Kill")
    }

    async fn delete(&self, _: &TtrpcContext, req: api::DeleteRequest) -> ttrpc::Result<api::DeleteResponse> {
        let _t = self.inner.metrics.time("Delete");
        reply(self.inner.delete(req).await, "Delete")
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
        let task_pid = match self.inner.process(&req.id, "").await {
            Ok((_, p)) => p.pid,
            Err(_) => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
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
        reply(self.inner.close_io(req).await.map(|()| api::Empty::new()), "CloseIO")
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: api::ResizePtyRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("ResizePty");
        reply(self.inner.resize_pty(req).await.map(|()| api::Empty::new()), "ResizePty")
    }

    async fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("Exec");
        reply(self.inner.exec(req).await.map(|()| api::Empty::new()), "Exec")
    }

    async fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("Pause");
        reply(self.inner.pause(req.id, true).await.map(|()| api::Empty::new()), "Pause")
    }

    async fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("Resume");
        reply(self.inner.pause(req.id, false).await.map(|()| api::Empty::new()), "Resume")
    }

    async fn checkpoint(&self, _: &TtrpcContext, _: api::CheckpointTaskRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("Checkpoint");
        Err(TaskError::Unimplemented("Checkpoint").into())
    }

    async fn update(&self, _: &TtrpcContext, req: api::UpdateTaskRequest) -> ttrpc::Result<api::Empty> {
        let _t = self.inner.metrics.time("Update");
        reply(self.inner.update(req).await.map(|()| api::Empty::new()), "Update")
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
        assert_eq!(TaskError::Container(ContainerError::InvalidExecId("/".into())).code(), Code::INVALID_ARGUMENT);
        let unimpl = SandboxError::Agent(AgentError::Rpc {
            rpc: "PauseContainer",
            code: RpcCode::Unimplemented,
            message: "x".into(),
        });
        assert!(agent_lacks_rpc(&unimpl));
        assert_eq!(TaskError::Sandbox(unimpl).code(), Code::UNIMPLEMENTED);
        assert_eq!(TaskError::InvalidArgument("x".into()).code(), Code::INVALID_ARGUMENT);
    }

    #[test]
    fn stats_become_cgroup_v2_metrics() {
        let mut s = agent::ContainerStats {
            cpu_usage_usec: 1500,
            cpu_user_usec: 1000,
            cpu_system_usec: 500,
            memory_usage_bytes: 4096,
            memory_limit_bytes: 1 << 20,
            pids_current: 2,
            pids_limit: 100,
            memory_events_oom_kill: 1,
            ..Default::default()
        };
        s.memory_stat.insert("anon".into(), 8192);
        let m = v2_metrics(&s);
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!(m.cpu.user_usec, 1000);
        assert_eq!(m.cpu.system_usec, 500);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, 1 << 20);
        assert_eq!(m.memory.anon, 8192);
        assert_eq!(m.memory.file, 0);
        assert_eq!(m.pids.current, 2);
        assert_eq!(m.pids.limit, 100);
        assert_eq!(m.memory_events.oom_kill, 1);
        // Round trip through the wire format containerd decodes.
        let bytes = m.write_to_bytes().unwrap();
        let back = cg2::Metrics::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn process_status_follows_container_pause() {
        let (tx, rx) = tokio::sync::watch::channel(None);
        drop(tx);
        let p = ProcessView {
            exec_id: String::new(),
            agent_id: "c".into(),
            pid: 1,
            state: ProcessState::Running,
            io: ProcessIo::default(),
            process_json: String::new(),
            exit: None,
            exit_rx: rx,
            stdin_closed: Arc::new(tokio::sync::Notify::new()),
        };
        assert_eq!(status_of(&p, ContainerState::Running), Status::RUNNING);
        assert_eq!(status_of(&p, ContainerState::Paused), Status::PAUSED);
        let stopped = ProcessView {
            state: ProcessState::Stopped,
            ..p.clone()
        };
        assert_eq!(status_of(&stopped, ContainerState::Paused), Status::STOPPED);
    }

    #[test]
    fn killed_status_is_128_plus_signal() {
        assert_eq!(killed_status(9), 137);
        assert_eq!(killed_status(15), 143);
    }
}
