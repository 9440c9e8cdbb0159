//! The process RPCs: ExecProcess, WaitProcess, SignalProcess, the stdio calls (WriteStdin,
//! CloseStdin, ReadStdout, ReadStderr) and ResizeTerminal.
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
use std::sync::Arc;

use joey_agent_protocol::agent::{
    CloseStdinRequest, Empty, ExecProcessRequest, ExecProcessResponse, ReadOutputRequest,
    ReadOutputResponse, ResizeTerminalRequest, SignalProcessRequest, WaitProcessRequest,
    WaitProcessResponse, WriteStdinRequest, WriteStdinResponse,
};

use super::{blocking, Agent, Result, ServiceError};
use crate::container;
use crate::exec::{self, ExecSpec, Spawned};
use crate::process::{effective_read_len, Process};
use crate::reaper::{validate_signal, ReaperError};
use crate::spec::{self, ProcessConfig};

/// Finished entries (exit status only) retained for late WaitProcess calls.
pub const MAX_FINISHED: usize = 1024;

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

impl Agent {
    /// ExecProcess: a process in the guest, or in a container when `container_id` is set.
    pub(super) async fn exec(&self, req: ExecProcessRequest) -> Result<ExecProcessResponse> {
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
        let (req, spawned) = blocking("exec", move || {
            let spec = ExecSpec {
                argv: &req.argv,
                env: &req.env,
                cwd: &req.cwd,
                terminal: req.terminal,
            };
            let spawned = exec::spawn(&table, spec);
            (req, spawned)
        })
        .await?;
        let spawned = spawned?;
        self.register(req.exec_id, spawned, terminal, &req.argv, "exec")
    }

    /// ExecProcess with a container_id: the process joins that container (caller holds
    /// `exec_lock` and checked the exec id).
    async fn exec_in_container(&self, req: ExecProcessRequest) -> Result<ExecProcessResponse> {
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
        let (process, spawned) = blocking("exec", move || {
            let spawned = container::exec_in(table, &target, &process);
            (process, spawned)
        })
        .await?;
        let spawned = spawned?;
        self.register(
            req.exec_id,
            spawned,
            process.terminal,
            &process.args,
            "exec in container",
        )
    }

    /// Serves the stdio of a started process under `exec_id`.
    pub(super) fn register(
        &self,
        exec_id: String,
        spawned: Spawned,
        terminal: bool,
        argv: &[String],
        what: &str,
    ) -> Result<ExecProcessResponse> {
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
        prune(&mut procs);
        // Pids fit in u32 (they are positive).
        Ok(ExecProcessResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    /// WaitProcess: the exit status (and, for a container's first process, whether OOM kills
    /// came with it).
    pub(super) async fn wait(&self, req: WaitProcessRequest) -> Result<WaitProcessResponse> {
        let p = self.get(&req.exec_id)?;
        let info = p.wait().await?;
        let oom_killed = self.oom_at_exit(&req.exec_id, &p).await;
        // After oom_at_exit: a kill the watcher took first is queued by now (queue_new_ooms).
        let oom_events = self.oom_events.pushed();
        if oom_killed {
            agent_log!(
                "container {}: OOM kill, reported with its exit",
                req.exec_id
            );
        }
        Ok(WaitProcessResponse {
            exited: info.exited,
            exit_code: info.exit_code,
            signal: info.signal,
            status: info.status,
            oom_killed,
            oom_events,
            ..Default::default()
        })
    }

    /// SignalProcess; with `all`, every process of the container whose first process it is.
    pub(super) async fn signal(&self, req: SignalProcessRequest) -> Result<Empty> {
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
                let pids = pids.map_err(|e| {
                    ServiceError::Internal(format!("listing the container's processes: {e}"))
                })?;
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

    /// WriteStdin.
    pub(super) async fn write_stdin(&self, req: WriteStdinRequest) -> Result<WriteStdinResponse> {
        let p = self.get(&req.exec_id)?;
        let n = p.write_stdin(&req.data).await?;
        Ok(WriteStdinResponse {
            // A request is at most 4 MiB (ttrpc's message limit).
            len: u32::try_from(n).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    /// CloseStdin.
    pub(super) async fn close_stdin(&self, req: CloseStdinRequest) -> Result<Empty> {
        let p = self.get(&req.exec_id)?;
        p.close_stdin().await?;
        Ok(Empty::default())
    }

    /// ReadStdout.
    pub(super) async fn read_stdout(&self, req: ReadOutputRequest) -> Result<ReadOutputResponse> {
        self.read(req, false).await
    }

    /// ReadStderr.
    pub(super) async fn read_stderr(&self, req: ReadOutputRequest) -> Result<ReadOutputResponse> {
        self.read(req, true).await
    }

    async fn read(&self, req: ReadOutputRequest, stderr: bool) -> Result<ReadOutputResponse> {
        let p = self.get(&req.exec_id)?;
        let stream = if stderr { &p.stderr } else { &p.stdout };
        let data = stream.read(effective_read_len(req.len)).await?;
        Ok(ReadOutputResponse {
            data,
            ..Default::default()
        })
    }

    /// ResizeTerminal.
    pub(super) async fn resize(&self, req: ResizeTerminalRequest) -> Result<Empty> {
        let p = self.get(&req.exec_id)?;
        let invalid = || ServiceError::InvalidWindowSize {
            rows: req.rows,
            cols: req.cols,
        };
        let (Ok(rows), Ok(cols)) = (u16::try_from(req.rows), u16::try_from(req.cols)) else {
            return Err(invalid());
        };
        if rows == 0 || cols == 0 {
            return Err(invalid());
        }
        if !p.terminal || !p.resize(rows, cols)? {
            return Err(ServiceError::NotATerminal(req.exec_id.clone()));
        }
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
}
