//! The Container actor: one per container of a sandbox, the one owner of the container's state.
//! It keeps the container's lifecycle (Created → Running ⇄ Paused → Stopped, checked
//! transitions), its processes (the init process under exec id "" and every exec), their exit
//! watches, the abort handles of their stdio pumps, and the container's resources (the host
//! rootfs, then the guest container and its shares), cleaned up in reverse order by Delete.
//!
//! Every operation that changes the container (start, kill, pause, resume, update, delete) is
//! one atomic handler ([`AtomicResponse`]): it checks the state, makes the agent call through
//! the Sandbox actor (bounded by [`AGENT_CALL_TIMEOUT`]) and records the result when the call
//! returns, while other messages for this container wait. A failed call records nothing, so the
//! recorded state stays what the guest has. Waiting for an exit ([`WaitExit`]) and queries do
//! not hold the actor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::dev::ToEnvelope;
use actix::prelude::*;
use joey_agent_protocol::agent;
use tokio::sync::{watch, Notify};

use crate::agent_client::{AgentError, RpcCode};
use crate::lifecycle::InvalidTransition;
use crate::resource::{BoxFuture, Resource, ResourceStack};
use crate::sandbox::{
    CreateContainer, ExecProcess, ListPids, PauseContainer, RemoveContainer, ResizeTerminal, ResumeContainer,
    SandboxActor, SandboxError, SignalProcess, StatsContainer, UnshareContainer, UpdateContainer,
};

/// Bound of one agent call made for a container operation.
pub const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound of each agent or actor call of the guest container's cleanup (Delete).
const CLEANUP_CALL_TIMEOUT: Duration = Duration::from_secs(30);

crate::state_machine! {
    /// Lifecycle of a container.
    pub enum ContainerState: "container" {
        /// Resources set up, init process not started.
        Created => "created",
        Running => "running",
        /// Frozen by the agent (cgroup.freeze).
        Paused => "paused",
        /// The init process exited (or was killed before it started).
        Stopped => "stopped",
    }
    transitions {
        Created => Running | Stopped,
        Running => Paused | Stopped,
        Paused => Running | Stopped,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("process {exec_id:?} of container {container} not found")]
    NoProcess { container: String, exec_id: String },
    #[error("exec {exec_id:?} already exists in container {container}")]
    ExecExists { container: String, exec_id: String },
    #[error("invalid exec id {0:?}: expected 1 to 64 of [A-Za-z0-9_.-], starting alphanumeric")]
    InvalidExecId(String),
    #[error("process {exec_id:?} of container {container} is {state}, not {want}")]
    ProcessState {
        container: String,
        exec_id: String,
        state: ProcessState,
        want: &'static str,
    },
    #[error("process {exec_id:?} of container {container} has already exited")]
    Exited { container: String, exec_id: String },
    #[error("container {container} is {state}: {what}")]
    NotAllowed {
        container: String,
        state: ContainerState,
        what: &'static str,
    },
    #[error("the process of container {0} has exited")]
    Exiting(String),
    #[error("container {0} has been deleted")]
    Deleted(String),
    #[error(transparent)]
    State(#[from] InvalidTransition),
    #[error("sandbox: {0}")]
    Sandbox(#[from] SandboxError),
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
}

impl ContainerError {
    /// Whether the guest agent lacks the RPC (an agent older than the host).
    pub fn agent_lacks_rpc(&self) -> bool {
        matches!(self, ContainerError::Sandbox(e) if sandbox_lacks_rpc(e))
    }
}

/// Whether a Sandbox actor error says the guest agent lacks the RPC.
pub fn sandbox_lacks_rpc(e: &SandboxError) -> bool {
    matches!(
        e,
        SandboxError::Agent(AgentError::Rpc {
            code: RpcCode::Unimplemented,
            ..
        })
    )
}

crate::state_machine! {
    /// Lifecycle of one process.
    pub enum ProcessState: "process" {
        Created => "created",
        Running => "running",
        Stopped => "stopped",
    }
    transitions {
        Created => Running | Stopped,
        Running => Stopped,
    }
}

/// How a process ended: shell-style status (exit code, or 128 + signal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub status: u32,
    pub at: SystemTime,
}

/// The exit status containerd expects for a process killed by `signal` before it ran.
pub fn killed_status(signal: u32) -> u32 {
    128 + signal
}

/// The stdio containerd gave a process (fifo paths; empty: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessIo {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The agent exec id of the `seq`-th exec (1-based, per container) `exec_id` of `container_id`:
/// `<container>.<exec>.<seq>`. The sequence number keeps it unique in the sandbox when
/// containerd reuses an exec id after deleting the first (the agent may still hold the old
/// entry). Made of the characters of the container id rule only.
pub fn agent_exec_id(container_id: &str, exec_id: &str, seq: u64) -> String {
    format!("{container_id}.{exec_id}.{seq}")
}

/// A snapshot of one process, with the handles to wait for it and close its stdin.
#[derive(Debug, Clone)]
pub struct ProcessView {
    /// containerd's exec id ("" for the init process).
    pub exec_id: String,
    /// The id the agent knows it by.
    pub agent_id: String,
    pub pid: u32,
    pub state: ProcessState,
    pub io: ProcessIo,
    pub exit: Option<ExitInfo>,
    pub exit_rx: watch::Receiver<Option<ExitInfo>>,
    pub stdin_closed: Arc<Notify>,
}

struct Process {
    agent_id: String,
    pid: u32,
    state: ProcessState,
    io: ProcessIo,
    /// How the agent starts an exec (exec id and container id filled in); None for init.
    exec: Option<agent::ExecProcessRequest>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    stdin_closed: Arc<Notify>,
    pumps: Vec<tokio::task::AbortHandle>,
    /// The agent reported the exit; it is recorded once the output has drained.
    gone: bool,
}

impl Process {
    fn new(agent_id: String, io: ProcessIo, exec: Option<agent::ExecProcessRequest>) -> Process {
        let (exit_tx, _) = watch::channel(None);
        Process {
            agent_id,
            pid: 0,
            state: ProcessState::Created,
            io,
            exec,
            exit_tx,
            stdin_closed: Arc::new(Notify::new()),
            pumps: Vec::new(),
            gone: false,
        }
    }

    fn view(&self, exec_id: &str) -> ProcessView {
        ProcessView {
            exec_id: exec_id.to_string(),
            agent_id: self.agent_id.clone(),
            pid: self.pid,
            state: self.state,
            io: self.io.clone(),
            exit: *self.exit_tx.borrow(),
            exit_rx: self.exit_tx.subscribe(),
            stdin_closed: self.stdin_closed.clone(),
        }
    }

    fn abort_pumps(&mut self) {
        for p in self.pumps.drain(..) {
            p.abort();
        }
    }
}

/// What a new Container actor starts from.
pub struct ContainerSetup {
    pub id: String,
    pub bundle: String,
    /// The init process's stdio.
    pub io: ProcessIo,
    /// How the agent creates the container and starts its init process (from the bundle's
    /// spec; `container_id` is the container's id).
    pub init: CreateContainer,
    /// What Create set up on the host (cleaned up, after the guest container, by Delete).
    pub resources: ResourceStack,
}

/// The Container actor (see the module docs).
pub struct ContainerActor {
    id: String,
    bundle: String,
    state: ContainerState,
    processes: HashMap<String, Process>,
    /// Execs added so far (numbers their agent ids).
    exec_seq: u64,
    init: CreateContainer,
    resources: ResourceStack,
    sandbox: Addr<SandboxActor>,
    call_timeout: Duration,
    deleted: bool,
}

type LocalFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T>>>;

/// One agent call through the Sandbox actor, bounded by `after`.
async fn call<M, T>(sb: Addr<SandboxActor>, what: &'static str, m: M, after: Duration) -> Result<T, ContainerError>
where
    M: actix::Message<Result = Result<T, SandboxError>> + Send + 'static,
    T: Send + 'static,
    SandboxActor: Handler<M>,
    <SandboxActor as Actor>::Context: ToEnvelope<SandboxActor, M>,
{
    match tokio::time::timeout(after, sb.send(m)).await {
        Ok(Ok(r)) => Ok(r?),
        Ok(Err(e)) => Err(SandboxError::from(e).into()),
        Err(_) => Err(ContainerError::Timeout { what, after }),
    }
}

/// A handler's reply that holds the actor until `fut` is done, then records its result.
fn atomic<T: 'static, R: 'static>(
    act: &mut ContainerActor,
    fut: Result<LocalFuture<Result<T, ContainerError>>, ContainerError>,
    record: impl FnOnce(T, &mut ContainerActor, &mut Context<ContainerActor>) -> Result<R, ContainerError> + 'static,
) -> AtomicResponse<ContainerActor, Result<R, ContainerError>> {
    match fut {
        Err(e) => AtomicResponse::new(Box::pin(fut::ready(Err(e)))),
        Ok(f) => AtomicResponse::new(Box::pin(f.into_actor(act).map(move |r, act, ctx| record(r?, act, ctx)))),
    }
}

impl ContainerActor {
    pub fn new(setup: ContainerSetup, sandbox: Addr<SandboxActor>) -> ContainerActor {
        let mut processes = HashMap::new();
        processes.insert(String::new(), Process::new(setup.id.clone(), setup.io, None));
        ContainerActor {
            id: setup.id,
            bundle: setup.bundle,
            state: ContainerState::Created,
            processes,
            exec_seq: 0,
            init: setup.init,
            resources: setup.resources,
            sandbox,
            call_timeout: AGENT_CALL_TIMEOUT,
            deleted: false,
        }
    }

    /// Bounds each agent call by `d` instead of [`AGENT_CALL_TIMEOUT`].
    pub fn with_call_timeout(mut self, d: Duration) -> ContainerActor {
        self.call_timeout = d;
        self
    }

    fn live(&self) -> Result<(), ContainerError> {
        if self.deleted {
            Err(ContainerError::Deleted(self.id.clone()))
        } else {
            Ok(())
        }
    }

    fn process(&mut self, exec_id: &str) -> Result<&mut Process, ContainerError> {
        let id = self.id.clone();
        self.processes
            .get_mut(exec_id)
            .ok_or_else(|| ContainerError::NoProcess {
                container: id,
                exec_id: exec_id.to_string(),
            })
    }

    fn not_allowed(&self, what: &'static str) -> ContainerError {
        ContainerError::NotAllowed {
            container: self.id.clone(),
            state: self.state,
            what,
        }
    }

    fn call<M, T>(&self, what: &'static str, m: M) -> LocalFuture<Result<T, ContainerError>>
    where
        M: actix::Message<Result = Result<T, SandboxError>> + Send + 'static,
        T: Send + 'static,
        SandboxActor: Handler<M>,
        <SandboxActor as Actor>::Context: ToEnvelope<SandboxActor, M>,
    {
        Box::pin(call(self.sandbox.clone(), what, m, self.call_timeout))
    }

    /// Checks that the process may start and makes the agent call that starts it.
    fn start_call(&mut self, exec_id: &str) -> Result<LocalFuture<Result<u32, ContainerError>>, ContainerError> {
        self.live()?;
        let container = self.id.clone();
        let state = self.state;
        let p = self.process(exec_id)?;
        if p.state != ProcessState::Created {
            return Err(ContainerError::ProcessState {
                container,
                exec_id: exec_id.to_string(),
                state: p.state,
                want: "created",
            });
        }
        match p.exec.clone() {
            Some(req) => {
                if state != ContainerState::Running {
                    return Err(self.not_allowed("exec needs it running"));
                }
                Ok(self.call("ExecProcess", ExecProcess(req)))
            }
            None => {
                if !state.can_transition(ContainerState::Running) {
                    return Err(self.not_allowed("start needs a created container"));
                }
                let msg = CreateContainer {
                    container_id: self.id.clone(),
                    ..self.init.clone()
                };
                Ok(self.call("CreateContainer", msg))
            }
        }
    }

    /// Records a started process: the init process makes the container Running, and its guest
    /// container (with its shares) becomes a resource that Delete releases.
    fn record_start(&mut self, exec_id: &str, pid: u32) -> Result<u32, ContainerError> {
        if exec_id.is_empty() {
            self.state.transition(ContainerState::Running)?;
            self.resources.push_ready(Box::new(GuestContainer {
                sandbox: self.sandbox.clone(),
                container_id: self.id.clone(),
            }));
        }
        let p = self.process(exec_id)?;
        p.state.transition(ProcessState::Running)?;
        p.pid = pid;
        Ok(pid)
    }

    /// Records an exit (the first one wins) and wakes the process's waiters; the init process
    /// makes the container Stopped.
    fn record_exit(&mut self, exec_id: &str, exit: ExitInfo) -> Result<ExitInfo, ContainerError> {
        let p = self.process(exec_id)?;
        if let Some(e) = *p.exit_tx.borrow() {
            return Ok(e);
        }
        p.state.transition(ProcessState::Stopped)?;
        p.pumps.clear();
        p.exit_tx.send_replace(Some(exit));
        if exec_id.is_empty() && self.state != ContainerState::Stopped {
            self.state.transition(ContainerState::Stopped)?;
        }
        Ok(exit)
    }

    fn view(&self) -> ContainerView {
        let mut execs: Vec<String> = self.processes.keys().filter(|k| !k.is_empty()).cloned().collect();
        execs.sort();
        ContainerView {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            state: self.state,
            init: self.processes[""].view(""),
            execs,
        }
    }
}

impl Actor for ContainerActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        for p in self.processes.values_mut() {
            p.abort_pumps();
        }
    }
}

/// What a container looks like now.
#[derive(Debug, Clone)]
pub struct ContainerView {
    pub id: String,
    pub bundle: String,
    pub state: ContainerState,
    pub init: ProcessView,
    /// containerd exec ids of the execs, sorted.
    pub execs: Vec<String>,
}

#[derive(Message)]
#[rtype(result = "ContainerView")]
pub struct GetContainer;

impl Handler<GetContainer> for ContainerActor {
    type Result = MessageResult<GetContainer>;
    fn handle(&mut self, _: GetContainer, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.view())
    }
}

/// One process ("" = init).
#[derive(Message)]
#[rtype(result = "Result<ProcessView, ContainerError>")]
pub struct GetProcess {
    pub exec_id: String,
}

impl Handler<GetProcess> for ContainerActor {
    type Result = Result<ProcessView, ContainerError>;
    fn handle(&mut self, m: GetProcess, _: &mut Context<Self>) -> Self::Result {
        Ok(self.process(&m.exec_id)?.view(&m.exec_id))
    }
}

/// Registers an exec (not started yet; containerd's Exec). `request` says what to run (argv,
/// env, cwd, terminal, OCI process JSON); its exec id and container id are filled in. Replies
/// with its agent exec id.
#[derive(Message)]
#[rtype(result = "Result<String, ContainerError>")]
pub struct AddExec {
    pub exec_id: String,
    pub io: ProcessIo,
    pub request: agent::ExecProcessRequest,
}

impl Handler<AddExec> for ContainerActor {
    type Result = Result<String, ContainerError>;
    fn handle(&mut self, m: AddExec, _: &mut Context<Self>) -> Self::Result {
        self.live()?;
        if !joey_agent_protocol::is_valid_container_id(&m.exec_id) {
            return Err(ContainerError::InvalidExecId(m.exec_id));
        }
        if self.state != ContainerState::Running {
            return Err(self.not_allowed("exec needs a running container"));
        }
        if self.processes.contains_key(&m.exec_id) {
            return Err(ContainerError::ExecExists {
                container: self.id.clone(),
                exec_id: m.exec_id,
            });
        }
        self.exec_seq += 1;
        let agent_id = agent_exec_id(&self.id, &m.exec_id, self.exec_seq);
        let request = agent::ExecProcessRequest {
            exec_id: agent_id.clone(),
            container_id: self.id.clone(),
            terminal: m.io.terminal || m.request.terminal,
            ..m.request
        };
        self.processes
            .insert(m.exec_id, Process::new(agent_id.clone(), m.io, Some(request)));
        Ok(agent_id)
    }
}

/// Starts a created process (containerd's Start): the init process with agent
/// `CreateContainer` (sharing the rootfs and volumes), an exec with `ExecProcess` (the
/// container must be running). Replies with the guest pid. A failed call leaves the process
/// (and the container) as they were.
#[derive(Message)]
#[rtype(result = "Result<u32, ContainerError>")]
pub struct StartProcess {
    pub exec_id: String,
}

impl Handler<StartProcess> for ContainerActor {
    type Result = AtomicResponse<Self, Result<u32, ContainerError>>;
    fn handle(&mut self, m: StartProcess, _: &mut Context<Self>) -> Self::Result {
        let f = self.start_call(&m.exec_id);
        atomic(self, f, move |pid, act, _| act.record_start(&m.exec_id, pid))
    }
}

/// Hands the actor the stdio pumps of a started process (aborted when it is removed, or when
/// the actor stops).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachPumps {
    pub exec_id: String,
    pub pumps: Vec<tokio::task::AbortHandle>,
}

impl Handler<AttachPumps> for ContainerActor {
    type Result = ();
    fn handle(&mut self, m: AttachPumps, _: &mut Context<Self>) {
        match self.processes.get_mut(&m.exec_id) {
            Some(p) if p.state == ProcessState::Running => p.pumps.extend(m.pumps),
            // Exited or removed meanwhile: the pumps end on their own (EOF); never keep them.
            _ => {}
        }
    }
}

/// The agent reported that the process exited; its exit is recorded ([`ProcessExited`]) once
/// its output has drained. Meanwhile the container is not paused any more.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ProcessGone {
    pub exec_id: String,
}

impl Handler<ProcessGone> for ContainerActor {
    type Result = ();
    fn handle(&mut self, m: ProcessGone, _: &mut Context<Self>) {
        if let Some(p) = self.processes.get_mut(&m.exec_id) {
            p.gone = true;
        }
    }
}

/// The process exited (or was killed before it started): record it and wake its waiters. The
/// init process makes the container Stopped. Recording twice keeps the first exit.
#[derive(Message)]
#[rtype(result = "Result<ExitInfo, ContainerError>")]
pub struct ProcessExited {
    pub exec_id: String,
    pub exit: ExitInfo,
}

impl Handler<ProcessExited> for ContainerActor {
    type Result = Result<ExitInfo, ContainerError>;
    fn handle(&mut self, m: ProcessExited, _: &mut Context<Self>) -> Self::Result {
        self.record_exit(&m.exec_id, m.exit)
    }
}

/// What [`Kill`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Killed {
    /// The signal went to the running process (its exit is recorded when it happens).
    Signalled,
    /// The process had not started: it is recorded as exited with 128 + signal now.
    BeforeStart(ExitInfo),
}

/// Signals a process (containerd's Kill); `all`: every process of the container (init only).
#[derive(Message)]
#[rtype(result = "Result<Killed, ContainerError>")]
pub struct Kill {
    pub exec_id: String,
    pub signal: u32,
    pub all: bool,
}

impl Handler<Kill> for ContainerActor {
    type Result = AtomicResponse<Self, Result<Killed, ContainerError>>;
    fn handle(&mut self, m: Kill, _: &mut Context<Self>) -> Self::Result {
        let f = (|| {
            self.live()?;
            let container = self.id.clone();
            let p = self.process(&m.exec_id)?;
            match p.state {
                ProcessState::Stopped => Err(ContainerError::Exited {
                    container,
                    exec_id: m.exec_id.clone(),
                }),
                ProcessState::Created => {
                    let exit = ExitInfo {
                        status: killed_status(m.signal),
                        at: SystemTime::now(),
                    };
                    let exit = self.record_exit(&m.exec_id, exit)?;
                    Ok(Box::pin(fut::ready(Ok(Killed::BeforeStart(exit)))) as LocalFuture<_>)
                }
                ProcessState::Running => {
                    let msg = SignalProcess {
                        exec_id: p.agent_id.clone(),
                        signal: m.signal,
                        // `kill --all` addresses the container (its init); an exec is one process.
                        all: m.all && m.exec_id.is_empty(),
                    };
                    let f = self.call("SignalProcess", msg);
                    Ok(Box::pin(async move { f.await.map(|()| Killed::Signalled) }) as LocalFuture<_>)
                }
            }
        })();
        atomic(self, f, |k, _, _| Ok(k))
    }
}

/// Freezes a running container (agent `PauseContainer`, containerd's Pause).
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct Pause;

/// Thaws a paused container (agent `ResumeContainer`, containerd's Resume).
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct Resume;

impl ContainerActor {
    /// Running → Paused or back: the agent call, recorded when it succeeded.
    fn freeze(&mut self, pause: bool) -> AtomicResponse<Self, Result<(), ContainerError>> {
        let (from, to) = if pause {
            (ContainerState::Running, ContainerState::Paused)
        } else {
            (ContainerState::Paused, ContainerState::Running)
        };
        let f = self.live().and_then(|()| {
            if self.state != from {
                return Err(self.not_allowed(if pause {
                    "pause needs it running"
                } else {
                    "resume needs it paused"
                }));
            }
            if pause && self.processes[""].gone {
                // Its process has exited (the exit is recorded once the output has drained);
                // a paused one may still be thawed, so that nothing stays frozen.
                return Err(ContainerError::Exiting(self.id.clone()));
            }
            let id = self.id.clone();
            Ok(if pause {
                self.call("PauseContainer", PauseContainer { container_id: id })
            } else {
                self.call("ResumeContainer", ResumeContainer { container_id: id })
            })
        });
        atomic(self, f, move |(), act, _| Ok(act.state.transition(to)?))
    }
}

impl Handler<Pause> for ContainerActor {
    type Result = AtomicResponse<Self, Result<(), ContainerError>>;
    fn handle(&mut self, _: Pause, _: &mut Context<Self>) -> Self::Result {
        self.freeze(true)
    }
}

impl Handler<Resume> for ContainerActor {
    type Result = AtomicResponse<Self, Result<(), ContainerError>>;
    fn handle(&mut self, _: Resume, _: &mut Context<Self>) -> Self::Result {
        self.freeze(false)
    }
}

/// Changes the container's resources (agent `UpdateContainer`; OCI LinuxResources JSON).
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct Update {
    pub resources_json: String,
}

impl Handler<Update> for ContainerActor {
    type Result = AtomicResponse<Self, Result<(), ContainerError>>;
    fn handle(&mut self, m: Update, _: &mut Context<Self>) -> Self::Result {
        let f = self.live().map(|()| {
            let msg = UpdateContainer {
                container_id: self.id.clone(),
                resources_json: m.resources_json,
            };
            self.call("UpdateContainer", msg)
        });
        atomic(self, f, |(), _, _| Ok(()))
    }
}

/// The container's cgroup figures (agent `StatsContainer`).
#[derive(Message)]
#[rtype(result = "Result<agent::ContainerStats, ContainerError>")]
pub struct Stats;

impl Handler<Stats> for ContainerActor {
    type Result = ResponseFuture<Result<agent::ContainerStats, ContainerError>>;
    fn handle(&mut self, _: Stats, _: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.live() {
            return Box::pin(fut::ready(Err(e)));
        }
        let f = call(
            self.sandbox.clone(),
            "StatsContainer",
            StatsContainer {
                container_id: self.id.clone(),
            },
            self.call_timeout,
        );
        Box::pin(f)
    }
}

/// The guest pids of the container's processes: the agent's list while the container runs
/// (the known pids of the running processes when the agent cannot tell); none otherwise.
#[derive(Message)]
#[rtype(result = "Vec<u32>")]
pub struct Pids;

impl Handler<Pids> for ContainerActor {
    type Result = ResponseFuture<Vec<u32>>;
    fn handle(&mut self, _: Pids, _: &mut Context<Self>) -> Self::Result {
        if self.deleted || !matches!(self.state, ContainerState::Running | ContainerState::Paused) {
            return Box::pin(fut::ready(Vec::new()));
        }
        let mut known: Vec<(&String, u32)> = self
            .processes
            .iter()
            .filter(|(_, p)| p.state == ProcessState::Running)
            .map(|(k, p)| (k, p.pid))
            .collect();
        // The init process first, then the execs by id.
        known.sort();
        let known: Vec<u32> = known.into_iter().map(|(_, pid)| pid).collect();
        let f = call(
            self.sandbox.clone(),
            "ListPids",
            ListPids {
                container_id: self.id.clone(),
            },
            self.call_timeout,
        );
        Box::pin(async move {
            match f.await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "agent ListPids failed; replying with the known pids");
                    known
                }
            }
        })
    }
}

/// Resizes a process's terminal. Nothing to do (Ok) when it is not running, has no terminal,
/// or the size is 0x0 (ctr on a terminal that has no size yet), or when the agent cannot
/// resize terminals.
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct Resize {
    pub exec_id: String,
    pub rows: u32,
    pub cols: u32,
}

impl Handler<Resize> for ContainerActor {
    type Result = ResponseFuture<Result<(), ContainerError>>;
    fn handle(&mut self, m: Resize, _: &mut Context<Self>) -> Self::Result {
        let p = match self.process(&m.exec_id) {
            Ok(p) => p,
            Err(e) => return Box::pin(fut::ready(Err(e))),
        };
        if p.state != ProcessState::Running || !p.io.terminal || m.rows == 0 || m.cols == 0 {
            return Box::pin(fut::ready(Ok(())));
        }
        let msg = ResizeTerminal {
            exec_id: p.agent_id.clone(),
            rows: m.rows,
            cols: m.cols,
        };
        let f = call(self.sandbox.clone(), "ResizeTerminal", msg, self.call_timeout);
        Box::pin(async move {
            match f.await {
                Err(e) if e.agent_lacks_rpc() => {
                    tracing::debug!("the guest agent cannot resize terminals; ignored");
                    Ok(())
                }
                r => r,
            }
        })
    }
}

/// containerd closed a process's stdin (CloseIO): its stdin pump drains and closes it.
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct CloseStdin {
    pub exec_id: String,
}

impl Handler<CloseStdin> for ContainerActor {
    type Result = Result<(), ContainerError>;
    fn handle(&mut self, m: CloseStdin, _: &mut Context<Self>) -> Self::Result {
        self.process(&m.exec_id)?.stdin_closed.notify_one();
        Ok(())
    }
}

/// Waits for a process's exit (containerd's Wait) without holding the actor: replies when it
/// is recorded, however long that takes.
#[derive(Message)]
#[rtype(result = "Result<ExitInfo, ContainerError>")]
pub struct WaitExit {
    pub exec_id: String,
}

impl Handler<WaitExit> for ContainerActor {
    type Result = ResponseFuture<Result<ExitInfo, ContainerError>>;
    fn handle(&mut self, m: WaitExit, _: &mut Context<Self>) -> Self::Result {
        let container = self.id.clone();
        let mut rx = match self.process(&m.exec_id) {
            Ok(p) => p.exit_tx.subscribe(),
            Err(e) => return Box::pin(fut::ready(Err(e))),
        };
        Box::pin(async move {
            let gone = || ContainerError::NoProcess {
                container: container.clone(),
                exec_id: m.exec_id.clone(),
            };
            let exit = *rx.wait_for(|x| x.is_some()).await.map_err(|_| gone())?;
            exit.ok_or_else(gone)
        })
    }
}

/// Forgets a stopped (or never started) exec; replies with it and its exit.
#[derive(Message)]
#[rtype(result = "Result<(ProcessView, Option<ExitInfo>), ContainerError>")]
pub struct RemoveExec {
    pub exec_id: String,
}

impl Handler<RemoveExec> for ContainerActor {
    type Result = Result<(ProcessView, Option<ExitInfo>), ContainerError>;
    fn handle(&mut self, m: RemoveExec, _: &mut Context<Self>) -> Self::Result {
        let container = self.id.clone();
        if m.exec_id.is_empty() {
            return Err(ContainerError::InvalidExecId(m.exec_id));
        }
        let p = self.process(&m.exec_id)?;
        if p.state == ProcessState::Running {
            return Err(ContainerError::ProcessState {
                container,
                exec_id: m.exec_id,
                state: p.state,
                want: "stopped",
            });
        }
        let view = p.view(&m.exec_id);
        let exit = view.exit;
        if let Some(mut p) = self.processes.remove(&m.exec_id) {
            p.abort_pumps();
        }
        Ok((view, exit))
    }
}

/// Deletes a created or stopped container (containerd's Delete of the init process): releases
/// its resources, last first (the guest container and its shares, then the host rootfs), and
/// stops the actor. Replies with the container as it was.
#[derive(Message)]
#[rtype(result = "Result<ContainerView, ContainerError>")]
pub struct DeleteContainer;

impl Handler<DeleteContainer> for ContainerActor {
    type Result = AtomicResponse<Self, Result<ContainerView, ContainerError>>;
    fn handle(&mut self, _: DeleteContainer, _: &mut Context<Self>) -> Self::Result {
        let f = self.live().and_then(|()| {
            if matches!(self.state, ContainerState::Running | ContainerState::Paused) {
                return Err(self.not_allowed("delete needs it stopped"));
            }
            self.deleted = true;
            let mut resources = std::mem::take(&mut self.resources);
            let id = self.id.clone();
            Ok(Box::pin(async move {
                let errors = resources.cleanup_all().await;
                if !errors.is_empty() {
                    tracing::warn!(id, ?errors, "container cleanup incomplete");
                }
                Ok(())
            }) as LocalFuture<_>)
        });
        atomic(self, f, |(), act, ctx| {
            ctx.stop();
            Ok(act.view())
        })
    }
}

/// The container in the guest and its shares (made by agent `CreateContainer` at Start):
/// cleanup is agent `RemoveContainer`, then ShareFs `Unshare`.
pub struct GuestContainer {
    pub sandbox: Addr<SandboxActor>,
    pub container_id: String,
}

fn ignorable(e: &SandboxError) -> bool {
    // An agent without the RPC (older than the host), or one that already forgot it.
    matches!(
        e,
        SandboxError::Agent(AgentError::Rpc {
            code: RpcCode::Unimplemented | RpcCode::NotFound,
            ..
        })
    )
}

impl Resource for GuestContainer {
    fn name(&self) -> String {
        format!("guest container {}", self.container_id)
    }

    fn setup(&mut self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Err("a guest container is set up by CreateContainer (push_ready)".to_string()) })
    }

    fn cleanup(self: Box<Self>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async move {
            let mut errors = Vec::new();
            let id = self.container_id.clone();
            let remove = RemoveContainer {
                container_id: id.clone(),
            };
            match call(self.sandbox.clone(), "RemoveContainer", remove, CLEANUP_CALL_TIMEOUT).await {
                Ok(()) => {}
                Err(ContainerError::Sandbox(e)) if ignorable(&e) => {
                    tracing::debug!(error = %e, "RemoveContainer skipped")
                }
                Err(e) => errors.push(format!("RemoveContainer: {e}")),
            }
            let unshare = UnshareContainer { container_id: id };
            if let Err(e) = call(self.sandbox.clone(), "Unshare", unshare, CLEANUP_CALL_TIMEOUT).await {
                errors.push(format!("Unshare: {e}"));
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("; "))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::hypervisor::HypervisorActor;

    #[test]
    fn container_transitions_are_checked() {
        let mut s = ContainerState::Created;
        assert!(s.transition(ContainerState::Paused).is_err());
        s.transition(ContainerState::Running).unwrap();
        s.transition(ContainerState::Paused).unwrap();
        let e = s.transition(ContainerState::Paused).unwrap_err();
        assert_eq!(e.to_string(), "invalid container state transition: paused -> paused");
        s.transition(ContainerState::Running).unwrap();
        s.transition(ContainerState::Stopped).unwrap();
        assert!(s.transition(ContainerState::Running).is_err());
        assert_eq!(s, ContainerState::Stopped);
    }

    #[test]
    fn agent_exec_ids_and_killed_status() {
        assert_eq!(agent_exec_id("c1", "e1", 2), "c1.e1.2");
        assert_eq!(killed_status(9), 137);
        assert_eq!(killed_status(15), 143);
    }

    fn kill(exec_id: impl Into<String>, signal: u32, all: bool) -> Kill {
        Kill {
            exec_id: exec_id.into(),
            signal,
            all,
        }
    }

    fn exited(exec_id: impl Into<String>, exit: ExitInfo) -> ProcessExited {
        ProcessExited {
            exec_id: exec_id.into(),
            exit,
        }
    }

    /// Whether `e` refuses the operation because the container is `state`.
    fn refused_in(e: &ContainerError, state: ContainerState) -> bool {
        matches!(e, ContainerError::NotAllowed { state: s, .. } if *s == state)
    }

    /// A real Sandbox actor whose VM never started: every agent call fails.
    fn no_vm() -> Addr<SandboxActor> {
        let hv = HypervisorActor::new().start();
        SandboxActor::new("t".into(), joey_config::Config::default(), "<test>".into(), hv).start()
    }

    fn container(resources: ResourceStack) -> ContainerActor {
        let setup = ContainerSetup {
            id: "c1".into(),
            bundle: "/b".into(),
            io: ProcessIo::default(),
            init: CreateContainer {
                container_id: "c1".into(),
                rootfs: "/b/rootfs".into(),
                read_only: false,
                argv: vec!["true".into()],
                env: Vec::new(),
                cwd: String::new(),
                terminal: false,
                hostname: String::new(),
                oci_spec_json: String::new(),
                volumes: Vec::new(),
            },
            resources,
        };
        ContainerActor::new(setup, no_vm()).with_call_timeout(Duration::from_secs(5))
    }

    /// As if the agent had started the init process with pid 7.
    fn running() -> ContainerActor {
        let mut c = container(ResourceStack::default());
        c.record_start("", 7).unwrap();
        c
    }

    fn exec(id: &str) -> AddExec {
        AddExec {
            exec_id: id.into(),
            io: ProcessIo::default(),
            request: agent::ExecProcessRequest {
                argv: vec!["true".into()],
                ..Default::default()
            },
        }
    }

    const EXIT: ExitInfo = ExitInfo {
        status: 3,
        at: SystemTime::UNIX_EPOCH,
    };

    #[actix_rt::test]
    async fn a_failed_start_leaves_the_container_created() {
        let a = container(ResourceStack::default()).start();
        let e = a
            .send(StartProcess { exec_id: String::new() })
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, ContainerError::Sandbox(SandboxError::State(_))), "{e}");
        let v = a.send(GetContainer).await.unwrap();
        assert_eq!(v.state, ContainerState::Created);
        assert_eq!((v.init.state, v.init.pid), (ProcessState::Created, 0));
        // Nothing in the guest to release: Delete cleans up only what Create made.
        a.send(DeleteContainer).await.unwrap().unwrap();
    }

    #[actix_rt::test]
    async fn a_failed_pause_or_signal_leaves_the_state_recorded() {
        let a = running().start();
        let e = a.send(Pause).await.unwrap().unwrap_err();
        assert!(matches!(e, ContainerError::Sandbox(_)), "{e}");
        assert_eq!(a.send(GetContainer).await.unwrap().state, ContainerState::Running);
        let e = a.send(kill(String::new(), 9, true)).await.unwrap().unwrap_err();
        assert!(matches!(e, ContainerError::Sandbox(_)), "{e}");
        let e = a.send(Resume).await.unwrap().unwrap_err();
        assert!(refused_in(&e, ContainerState::Running), "{e}");
        // The agent reports the exit: pause is refused before the exit is recorded.
        a.send(ProcessGone { exec_id: String::new() }).await.unwrap();
        let e = a.send(Pause).await.unwrap().unwrap_err();
        assert_eq!(e.to_string(), "the process of container c1 has exited");
        assert_eq!(a.send(GetContainer).await.unwrap().state, ContainerState::Running);
        // The exit is recorded: pause is refused, the container is stopped and deletable.
        a.send(exited(String::new(), EXIT)).await.unwrap().unwrap();
        let e = a.send(Pause).await.unwrap().unwrap_err();
        assert_eq!(e.to_string(), "container c1 is stopped: pause needs it running");
        let e = a.send(kill(String::new(), 9, false)).await.unwrap().unwrap_err();
        assert!(matches!(e, ContainerError::Exited { .. }), "{e}");
        let v = a.send(DeleteContainer).await.unwrap().unwrap();
        assert_eq!(
            (v.state, v.init.pid, v.init.exit),
            (ContainerState::Stopped, 7, Some(EXIT))
        );
    }

    #[actix_rt::test]
    async fn kill_before_start_records_the_exit() {
        let a = container(ResourceStack::default()).start();
        let w = a.send(WaitExit { exec_id: String::new() });
        let k = a.send(kill(String::new(), 9, false)).await.unwrap().unwrap();
        let Killed::BeforeStart(exit) = k else { panic!("{k:?}") };
        assert_eq!(exit.status, 137);
        assert_eq!(w.await.unwrap().unwrap(), exit);
        let v = a.send(GetContainer).await.unwrap();
        assert_eq!(
            (v.state, v.init.state),
            (ContainerState::Stopped, ProcessState::Stopped)
        );
        let e = a
            .send(StartProcess { exec_id: String::new() })
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(
                e,
                ContainerError::ProcessState {
                    state: ProcessState::Stopped,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[actix_rt::test]
    async fn waiting_does_not_hold_the_actor() {
        let a = running().start();
        let mut wait = Box::pin(a.send(WaitExit { exec_id: String::new() }));
        // Other requests are answered while the wait is pending.
        assert_eq!(a.send(GetContainer).await.unwrap().state, ContainerState::Running);
        assert!(futures_poll_pending(&mut wait).await);
        a.send(exited(String::new(), EXIT)).await.unwrap().unwrap();
        assert_eq!(wait.await.unwrap().unwrap(), EXIT);
    }

    /// Whether `f` is still pending after the actor had a chance to run.
    async fn futures_poll_pending<F: std::future::Future + Unpin>(f: &mut F) -> bool {
        tokio::select! {
            biased;
            _ = f => false,
            _ = tokio::task::yield_now() => true,
        }
    }

    #[actix_rt::test]
    async fn actor_tracks_execs() {
        let a = container(ResourceStack::default()).start();
        // No exec before the container runs.
        let e = a.send(exec("e1")).await.unwrap().unwrap_err();
        assert!(refused_in(&e, ContainerState::Created), "{e}");
        a.send(exited(String::new(), EXIT)).await.unwrap().unwrap();

        let a = running().start();
        assert_eq!(a.send(exec("e1")).await.unwrap().unwrap(), "c1.e1.1");
        let dup = a.send(exec("e1")).await.unwrap().unwrap_err();
        assert!(matches!(dup, ContainerError::ExecExists { .. }), "{dup}");
        let bad = a.send(exec("../x")).await.unwrap().unwrap_err();
        assert!(matches!(bad, ContainerError::InvalidExecId(_)), "{bad}");
        // The agent is unreachable: the exec stays created.
        let e = a
            .send(StartProcess { exec_id: "e1".into() })
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, ContainerError::Sandbox(_)), "{e}");
        let p = a.send(GetProcess { exec_id: "e1".into() }).await.unwrap().unwrap();
        assert_eq!((p.state, p.agent_id.as_str()), (ProcessState::Created, "c1.e1.1"));
        let k = a.send(kill("e1", 15, true)).await.unwrap().unwrap();
        assert!(matches!(k, Killed::BeforeStart(ExitInfo { status: 143, .. })), "{k:?}");
        // A second exit keeps the first.
        let again = ExitInfo {
            status: 9,
            at: SystemTime::now(),
        };
        let first = a.send(exited("e1", again)).await.unwrap().unwrap();
        assert_eq!(first.status, 143);
        let (_, got) = a.send(RemoveExec { exec_id: "e1".into() }).await.unwrap().unwrap();
        assert_eq!(got.map(|x| x.status), Some(143));
        assert!(a.send(GetProcess { exec_id: "e1".into() }).await.unwrap().is_err());
        // The exec id may be used again; the agent id differs.
        assert_eq!(a.send(exec("e1")).await.unwrap().unwrap(), "c1.e1.2");
        a.send(RemoveExec { exec_id: "e1".into() }).await.unwrap().unwrap();
        assert!(a.send(GetContainer).await.unwrap().execs.is_empty());
        // Still running: not deletable.
        let e = a.send(DeleteContainer).await.unwrap().unwrap_err();
        assert!(refused_in(&e, ContainerState::Running), "{e}");
    }

    struct Flag(Arc<AtomicBool>);

    impl Resource for Flag {
        fn name(&self) -> String {
            "flag".into()
        }
        fn setup(&mut self) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async { Ok(()) })
        }
        fn cleanup(self: Box<Self>) -> BoxFuture<'static, Result<(), String>> {
            self.0.store(true, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
    }

    #[actix_rt::test]
    async fn delete_releases_the_resources_and_stops_the_actor() {
        let cleaned = Arc::new(AtomicBool::new(false));
        let mut r = ResourceStack::default();
        r.add(Box::new(Flag(cleaned.clone()))).await.unwrap();
        let a = container(r).start();
        a.send(DeleteContainer).await.unwrap().unwrap();
        assert!(cleaned.load(Ordering::SeqCst));
        // The actor is gone: later requests fail.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while a.connected() {
            assert!(std::time::Instant::now() < deadline, "actor still running");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(a.send(GetContainer).await.is_err());
    }
}
