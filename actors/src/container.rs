//! The Container actor: one per container of a sandbox. It owns the container's lifecycle
//! (Created → Running ⇄ Paused → Stopped, checked transitions), its processes (the init process
//! under exec id "" and every exec), their exit watches, and the abort handles of their stdio
//! pumps. Agent calls are made by its owner through the Sandbox actor; this actor is the one
//! place that records what they did, so that concurrent task requests see one consistent state.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use actix::prelude::*;
use tokio::sync::{watch, Notify};

use crate::lifecycle::InvalidTransition;

/// Lifecycle of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    /// Resources set up, init process not started.
    Created,
    Running,
    /// Frozen by the agent (cgroup.freeze).
    Paused,
    /// The init process exited (or was killed before it started).
    Stopped,
}

impl fmt::Display for ContainerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContainerState::Created => "created",
            ContainerState::Running => "running",
            ContainerState::Paused => "paused",
            ContainerState::Stopped => "stopped",
        })
    }
}

impl ContainerState {
    pub fn can_transition(self, to: ContainerState) -> bool {
        use ContainerState::*;
        matches!(
            (self, to),
            (Created, Running) | (Created, Stopped) | (Running, Paused) | (Paused, Running) | (Running, Stopped) | (Paused, Stopped)
        )
    }

    pub fn transition(&mut self, to: ContainerState) -> Result<(), InvalidTransition> {
        if self.can_transition(to) {
            *self = to;
            Ok(())
        } else {
            Err(InvalidTransition {
                what: "container",
                from: self.to_string(),
                to: to.to_string(),
            })
        }
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
    #[error("container {container} is {state}: {what}")]
    NotAllowed {
        container: String,
        state: ContainerState,
        what: &'static str,
    },
    #[error(transparent)]
    State(#[from] InvalidTransition),
}

/// Lifecycle of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    Created,
    Running,
    Stopped,
}

impl fmt::Display for ProcessState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProcessState::Created => "created",
            ProcessState::Running => "running",
            ProcessState::Stopped => "stopped",
        })
    }
}

/// How a process ended: shell-style status (exit code, or 128 + signal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub status: u32,
    pub at: SystemTime,
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
    /// The OCI process JSON of an exec (empty for init).
    pub process_json: String,
    pub exit: Option<ExitInfo>,
    pub exit_rx: watch::Receiver<Option<ExitInfo>>,
    pub stdin_closed: Arc<Notify>,
}

struct Process {
    agent_id: String,
    pid: u32,
    state: ProcessState,
    io: ProcessIo,
    process_json: String,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    stdin_closed: Arc<Notify>,
    pumps: Vec<tokio::task::AbortHandle>,
}

impl Process {
    fn new(agent_id: String, io: ProcessIo, process_json: String) -> Process {
        let (exit_tx, _) = watch::channel(None);
        Process {
            agent_id,
            pid: 0,
            state: ProcessState::Created,
            io,
            process_json,
            exit_tx,
            stdin_closed: Arc::new(Notify::new()),
            pumps: Vec::new(),
        }
    }

    fn view(&self, exec_id: &str) -> ProcessView {
        ProcessView {
            exec_id: exec_id.to_string(),
            agent_id: self.agent_id.clone(),
            pid: self.pid,
            state: self.state,
            io: self.io.clone(),
            process_json: self.process_json.clone(),
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

/// The Container actor (see the module docs).
pub struct ContainerActor {
    id: String,
    bundle: String,
    state: ContainerState,
    processes: HashMap<String, Process>,
    /// Execs added so far (numbers their agent ids).
    exec_seq: u64,
}

impl ContainerActor {
    pub fn new(id: String, bundle: String, init_io: ProcessIo) -> ContainerActor {
        let mut processes = HashMap::new();
        processes.insert(String::new(), Process::new(id.clone(), init_io, String::new()));
        ContainerActor {
            id,
            bundle,
            state: ContainerState::Created,
            processes,
            exec_seq: 0,
        }
    }

    fn process(&mut self, exec_id: &str) -> Result<&mut Process, ContainerError> {
        let id = self.id.clone();
        self.processes.get_mut(exec_id).ok_or_else(|| ContainerError::NoProcess {
            container: id,
            exec_id: exec_id.to_string(),
        })
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
        let mut execs: Vec<String> = self.processes.keys().filter(|k| !k.is_empty()).cloned().collect();
        execs.sort();
        let init = self.processes[""].view("");
        MessageResult(ContainerView {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            state: self.state,
            init,
            execs,
        })
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

/// Registers an exec (not started yet). Replies with its agent exec id.
#[derive(Message)]
#[rtype(result = "Result<String, ContainerError>")]
pub struct AddExec {
    pub exec_id: String,
    pub io: ProcessIo,
    pub process_json: String,
}

impl Handler<AddExec> for ContainerActor {
    type Result = Result<String, ContainerError>;
    fn handle(&mut self, m: AddExec, _: &mut Context<Self>) -> Self::Result {
        if !joey_agent_protocol::is_valid_container_id(&m.exec_id) {
            return Err(ContainerError::InvalidExecId(m.exec_id));
        }
        if self.state != ContainerState::Running {
            return Err(ContainerError::NotAllowed {
                container: self.id.clone(),
                state: self.state,
                what: "exec needs a running container",
            });
        }
        if self.processes.contains_key(&m.exec_id) {
            return Err(ContainerError::ExecExists {
                container: self.id.clone(),
                exec_id: m.exec_id,
            });
        }
        self.exec_seq += 1;
        let agent_id = agent_exec_id(&self.id, &m.exec_id, self.exec_seq);
        self.processes
            .insert(m.exec_id, Process::new(agent_id.clone(), m.io, m.process_json));
        Ok(agent_id)
    }
}

/// The agent started the process: record its pid; the init process makes the container Running.
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct ProcessStarted {
    pub exec_id: String,
    pub pid: u32,
    pub pumps: Vec<tokio::task::AbortHandle>,
}

impl Handler<ProcessStarted> for ContainerActor {
    type Result = Result<(), ContainerError>;
    fn handle(&mut self, m: ProcessStarted, _: &mut Context<Self>) -> Self::Result {
        let container = self.id.clone();
        if m.exec_id.is_empty() {
            self.state.transition(ContainerState::Running)?;
        }
        let p = self.process(&m.exec_id)?;
        if p.state != ProcessState::Created {
            return Err(ContainerError::ProcessState {
                container,
                exec_id: m.exec_id,
                state: p.state,
                want: "created",
            });
        }
        p.pid = m.pid;
        p.state = ProcessState::Running;
        p.pumps = m.pumps;
        Ok(())
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
        let init = m.exec_id.is_empty();
        let p = self.process(&m.exec_id)?;
        if let Some(e) = *p.exit_tx.borrow() {
            return Ok(e);
        }
        p.state = ProcessState::Stopped;
        p.pumps.clear();
        p.exit_tx.send_replace(Some(m.exit));
        if init && self.state != ContainerState::Stopped {
            self.state.transition(ContainerState::Stopped)?;
        }
        Ok(m.exit)
    }
}

/// Running ⇄ Paused, after the agent froze or thawed the container.
#[derive(Message)]
#[rtype(result = "Result<(), ContainerError>")]
pub struct SetPaused(pub bool);

impl Handler<SetPaused> for ContainerActor {
    type Result = Result<(), ContainerError>;
    fn handle(&mut self, m: SetPaused, _: &mut Context<Self>) -> Self::Result {
        let to = if m.0 { ContainerState::Paused } else { ContainerState::Running };
        Ok(self.state.transition(to)?)
    }
}

/// Forgets a stopped (or never started) exec; replies with its exit.
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

/// Ends the actor (after Delete): aborts every stdio pump still running.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopContainer;

impl Handler<StopContainer> for ContainerActor {
    type Result = ();
    fn handle(&mut self, _: StopContainer, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn agent_exec_ids() {
        assert_eq!(agent_exec_id("c1", "e1", 2), "c1.e1.2");
    }

    #[actix_rt::test]
    async fn actor_tracks_processes_and_exits() {
        let a = ContainerActor::new("c1".into(), "/b".into(), ProcessIo::default()).start();
        // No exec before the container runs.
        let e = a
            .send(AddExec { exec_id: "e1".into(), io: ProcessIo::default(), process_json: "{}".into() })
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, ContainerError::NotAllowed { state: ContainerState::Created, .. }), "{e}");
        a.send(ProcessStarted { exec_id: String::new(), pid: 7, pumps: vec![] }).await.unwrap().unwrap();
        let id = a
            .send(AddExec { exec_id: "e1".into(), io: ProcessIo::default(), process_json: "{}".into() })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(id, "c1.e1.1");
        let dup = a
            .send(AddExec { exec_id: "e1".into(), io: ProcessIo::default(), process_json: "{}".into() })
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(dup, ContainerError::ExecExists { .. }), "{dup}");
        let bad = a
            .send(AddExec { exec_id: "../x".into(), io: ProcessIo::default(), process_json: "{}".into() })
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(bad, ContainerError::InvalidExecId(_)), "{bad}");
        a.send(ProcessStarted { exec_id: "e1".into(), pid: 9, pumps: vec![] }).await.unwrap().unwrap();
        let running = a.send(RemoveExec { exec_id: "e1".into() }).await.unwrap().unwrap_err();
        assert!(matches!(running, ContainerError::ProcessState { state: ProcessState::Running, .. }));
        let p = a.send(GetProcess { exec_id: "e1".into() }).await.unwrap().unwrap();
        let mut rx = p.exit_rx.clone();
        assert_eq!(p.pid, 9);
        let exit = ExitInfo { status: 3, at: SystemTime::UNIX_EPOCH };
        a.send(ProcessExited { exec_id: "e1".into(), exit }).await.unwrap().unwrap();
        assert_eq!(*rx.wait_for(|e| e.is_some()).await.unwrap(), Some(exit));
        // A second exit keeps the first.
        let again = ExitInfo { status: 9, at: SystemTime::now() };
        assert_eq!(a.send(ProcessExited { exec_id: "e1".into(), exit: again }).await.unwrap().unwrap(), exit);
        let (_, got) = a.send(RemoveExec { exec_id: "e1".into() }).await.unwrap().unwrap();
        assert_eq!(got, Some(exit));
        assert!(a.send(GetProcess { exec_id: "e1".into() }).await.unwrap().is_err());
        // The exec id may be used again; the agent id differs.
        let again_id = a
            .send(AddExec { exec_id: "e1".into(), io: ProcessIo::default(), process_json: "{}".into() })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again_id, "c1.e1.2");
        a.send(RemoveExec { exec_id: "e1".into() }).await.unwrap().unwrap();
        a.send(SetPaused(true)).await.unwrap().unwrap();
        assert_eq!(a.send(GetContainer).await.unwrap().state, ContainerState::Paused);
        assert!(a.send(SetPaused(true)).await.unwrap().is_err());
        a.send(ProcessExited { exec_id: String::new(), exit }).await.unwrap().unwrap();
        let v = a.send(GetContainer).await.unwrap();
        assert_eq!(v.state, ContainerState::Stopped);
        assert_eq!(v.init.pid, 7);
        assert_eq!(v.init.exit, Some(exit));
        assert!(v.execs.is_empty());
    }
}
