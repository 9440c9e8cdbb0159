//! Processes: Start (the init process or an exec), Exec, Kill, Wait, State, Pids, and their
//! stdio (ResizePty, CloseIO). Each started process gets its stdio pumps ([`super::stdio`]) and
//! a monitor that records its exit in the Container actor once its output reached containerd,
//! then publishes TaskExit.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskStart};
use containerd_shim::protos::topics;
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use joey_actors::container::{
    AddExec, AttachPumps, CloseStdin, ContainerActor, ContainerState, ExitInfo, GetContainer, GetProcess, Kill, Killed,
    Pids, ProcessExited, ProcessGone, ProcessIo, ProcessState, ProcessView, RemoveExec, Resize, StartProcess, WaitExit,
};
use joey_actors::sandbox::{SandboxActor, WaitProcess};
use joey_agent_protocol::agent;

use super::service::{ask, ts, Inner, TaskError};
use super::{spec, stdio};

/// After a process exited: how long its output may still take to reach containerd's fifos.
const IO_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the exit of a container's first process waits for the guest's OOM events the agent
/// had queued when it answered WaitProcess (so that TaskOOM precedes TaskExit).
const OOM_ORDER_WAIT: Duration = Duration::from_secs(2);

/// containerd's status of a process in a container that is `container`.
pub(super) fn status_of(p: &ProcessView, container: ContainerState) -> Status {
    match p.state {
        ProcessState::Created => Status::CREATED,
        ProcessState::Running if container == ContainerState::Paused => Status::PAUSED,
        ProcessState::Running => Status::RUNNING,
        ProcessState::Stopped => Status::STOPPED,
    }
}

/// What the exit monitor of one process needs.
struct Started {
    sb: Addr<SandboxActor>,
    actor: Addr<ContainerActor>,
    id: String,
    exec_id: String,
    agent_id: String,
    pid: u32,
    out: tokio::task::JoinHandle<()>,
    err: tokio::task::JoinHandle<()>,
    inp: tokio::task::JoinHandle<()>,
}

impl Inner {
    async fn process(&self, id: &str, exec_id: &str) -> Result<(Addr<ContainerActor>, ProcessView), TaskError> {
        let c = self.containers.get(id)?;
        let p = ask(
            &c,
            GetProcess {
                exec_id: exec_id.to_string(),
            },
        )
        .await??;
        Ok((c, p))
    }

    /// The init process's pid (0: none, or no such container).
    pub(super) async fn init_pid(&self, id: &str) -> u32 {
        self.process(id, "").await.map(|(_, p)| p.pid).unwrap_or(0)
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

    pub(super) async fn start(self: &Arc<Self>, req: api::StartRequest) -> Result<api::StartResponse, TaskError> {
        let sb = self.sandbox()?;
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        if p.state != ProcessState::Created {
            return Err(TaskError::FailedPrecondition(format!(
                "process {:?} of container {} is {}, not created",
                req.exec_id, req.id, p.state
            )));
        }
        // Before the process exists, so that a logging binary sees all of its output.
        let (out_sink, err_sink) = stdio::open_outputs(&p.io, &req.id, &self.namespace).await?;
        let pid = ask(
            &c,
            StartProcess {
                exec_id: req.exec_id.clone(),
            },
        )
        .await??;
        let out = tokio::spawn(stdio::pump_to_containerd(
            sb.clone(),
            p.agent_id.clone(),
            false,
            out_sink,
        ));
        let err = tokio::spawn(stdio::pump_to_containerd(
            sb.clone(),
            p.agent_id.clone(),
            true,
            err_sink,
        ));
        let inp = tokio::spawn(stdio::pump_stdin(
            sb.clone(),
            p.agent_id.clone(),
            p.io.stdin.clone(),
            p.stdin_closed.clone(),
        ));
        let pumps = vec![out.abort_handle(), err.abort_handle(), inp.abort_handle()];
        c.do_send(AttachPumps {
            exec_id: req.exec_id.clone(),
            pumps,
        });
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
        let started = Started {
            sb,
            actor: c,
            id: req.id,
            exec_id: req.exec_id,
            agent_id: p.agent_id,
            pid,
            out,
            err,
            inp,
        };
        tokio::spawn(self.clone().monitor(started));
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    /// Waits for a process; records and publishes its exit once its output has reached
    /// containerd's fifos (or `IO_DRAIN_TIMEOUT` passed).
    async fn monitor(self: Arc<Self>, s: Started) {
        let (id, exec_id) = (s.id.as_str(), s.exec_id.as_str());
        // No timeout: a process may run for as long as it likes; the VM dying ends the wait.
        let status = match s.sb.send(WaitProcess { exec_id: s.agent_id }).await {
            Ok(Ok(w)) => {
                // An OOM kill the agent's watcher had not reported yet comes with the exit of
                // the container's first process: published first, as containerd expects.
                if w.oom_killed && exec_id.is_empty() {
                    tracing::info!(container = %id, "OOM kill in the guest (reported with the exit)");
                    let ev = TaskOOM {
                        container_id: id.to_string(),
                        ..Default::default()
                    };
                    self.events.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev));
                }
                // An OOM kill the agent's watcher reported first is on its way through the OOM
                // watch: its TaskOOM goes out before this exit (containerd's order). Bounded:
                // an event dropped by a full agent queue never comes.
                if exec_id.is_empty() && w.oom_events > *self.oom_handled.borrow() {
                    let mut handled = self.oom_handled.subscribe();
                    let caught_up = tokio::time::timeout(OOM_ORDER_WAIT, handled.wait_for(|h| *h >= w.oom_events));
                    if caught_up.await.is_err() {
                        tracing::warn!(container = %id, "the guest's OOM events did not arrive in time; the exit goes first");
                    }
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
        s.actor.do_send(ProcessGone {
            exec_id: exec_id.to_string(),
        });
        let (out, err) = (s.out, s.err);
        let drained = tokio::time::timeout(IO_DRAIN_TIMEOUT, async {
            let _ = out.await;
            let _ = err.await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(id, exec_id, "process output not drained in time");
        }
        s.inp.abort();
        let exit = ExitInfo {
            status,
            at: SystemTime::now(),
        };
        let recorded = ask(
            &s.actor,
            ProcessExited {
                exec_id: exec_id.to_string(),
                exit,
            },
        )
        .await;
        let exit = match recorded {
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
        self.publish_exit(id, exec_id, s.pid, exit);
    }

    pub(super) async fn kill(&self, req: api::KillRequest) -> Result<(), TaskError> {
        let c = self.containers.get(&req.id)?;
        let msg = Kill {
            exec_id: req.exec_id.clone(),
            signal: req.signal,
            all: req.all,
        };
        if let Killed::BeforeStart(exit) = ask(&c, msg).await?? {
            self.publish_exit(&req.id, &req.exec_id, 0, exit);
        }
        Ok(())
    }

    pub(super) async fn delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse, TaskError> {
        if req.exec_id.is_empty() {
            return self.delete_container(&req.id).await;
        }
        let c = self.containers.get(&req.id)?;
        let (p, exit) = ask(
            &c,
            RemoveExec {
                exec_id: req.exec_id.clone(),
            },
        )
        .await??;
        let exit = exit.unwrap_or(ExitInfo {
            status: 0,
            at: SystemTime::now(),
        });
        Ok(api::DeleteResponse {
            pid: p.pid,
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }

    pub(super) async fn state(&self, req: api::StateRequest) -> Result<api::StateResponse, TaskError> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        let view = ask(&c, GetContainer).await?;
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
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

    pub(super) async fn wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse, TaskError> {
        let c = self.containers.get(&req.id)?;
        // No timeout of our own: Wait lasts as long as the process; containerd cancels it.
        let exit = c.send(WaitExit { exec_id: req.exec_id }).await??;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }

    pub(super) async fn exec(&self, req: api::ExecProcessRequest) -> Result<(), TaskError> {
        let c = self.containers.get(&req.id)?;
        let any = req
            .spec
            .as_ref()
            .ok_or_else(|| TaskError::InvalidArgument(format!("exec {}: no process spec", req.exec_id)))?;
        // Checked now, so that a bad spec fails Exec rather than Start.
        let x = spec::parse_process(&any.value)?;
        let io = ProcessIo {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        stdio::check_outputs(&io)?;
        let msg = AddExec {
            exec_id: req.exec_id.clone(),
            io,
            request: agent::ExecProcessRequest {
                argv: x.argv,
                env: x.env,
                cwd: x.cwd,
                terminal: x.terminal,
                oci_process_json: x.json,
                ..Default::default()
            },
        };
        ask(&c, msg).await??;
        let ev = TaskExecAdded {
            container_id: req.id,
            exec_id: req.exec_id,
            ..Default::default()
        };
        self.events.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev));
        Ok(())
    }

    pub(super) async fn pids(&self, req: api::PidsRequest) -> Result<api::PidsResponse, TaskError> {
        let c = self.containers.get(&req.id)?;
        let pids = ask(&c, Pids).await?;
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

    pub(super) async fn resize_pty(&self, req: api::ResizePtyRequest) -> Result<(), TaskError> {
        let c = self.containers.get(&req.id)?;
        let msg = Resize {
            exec_id: req.exec_id,
            rows: req.height,
            cols: req.width,
        };
        Ok(ask(&c, msg).await??)
    }

    pub(super) async fn close_io(&self, req: api::CloseIORequest) -> Result<(), TaskError> {
        let c = self.containers.get(&req.id)?;
        if req.stdin {
            ask(&c, CloseStdin { exec_id: req.exec_id }).await??;
        } else {
            // Only checks that the process exists.
            ask(&c, GetProcess { exec_id: req.exec_id }).await??;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
