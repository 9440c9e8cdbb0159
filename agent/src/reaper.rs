//! Child reaping without stealing exit statuses.
//!
//! SIGCHLD is blocked in every thread (see [`block_sigchld`], called before any thread exists) and
//! a dedicated thread waits for it with `sigwait`. On each SIGCHLD the reaper takes the
//! process-table lock and loops `waitpid(-1, WNOHANG)`: statuses of pids the agent started are
//! published to their waiters, everything else (orphans re-parented to PID 1 or to us as
//! subreaper) is simply discarded.
//!
//! Spawning holds the same lock ([`ProcTable::spawn`]) until the new pid is registered, so
//! * a child that exits immediately cannot be reaped before its pid is known, and
//! * std's `Command::spawn`, which itself `waitpid`s the child when `exec` fails, cannot race
//!   with the reaper.
//!
//! Signals are sent under the lock as well ([`ProcTable::kill`]), so a pid cannot be reaped and
//! reused between the "still running?" check and `kill(2)`.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::sync::watch;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("failed to block SIGCHLD: {0}")]
    BlockSigchld(#[source] Errno),
    #[error("failed to start the reaper thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("process already exited")]
    AlreadyExited,
    #[error("invalid signal {0}")]
    InvalidSignal(u32),
    #[error("kill({pid}, {signal}) failed: {source}")]
    Kill {
        pid: i32,
        signal: i32,
        #[source]
        source: Errno,
    },
}

/// Highest signal number Linux accepts (`_NSIG - 1`, i.e. SIGRTMAX of the kernel).
pub const MAX_SIGNAL: u32 = 64;

/// How a process ended, in the shape of `WaitProcessResponse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// The process called `exit` (as opposed to being killed by a signal).
    pub exited: bool,
    pub exit_code: i32,
    /// Signal that killed the process, 0 if it exited.
    pub signal: i32,
    /// Shell-style status: `exit_code`, or `128 + signal`.
    pub status: i32,
    /// Order in which processes were reaped (1, 2, ...); used to evict the oldest entries.
    pub reap_seq: u64,
}

impl ExitInfo {
    /// Converts a terminal wait status; `None` for stop/continue events (never requested).
    pub fn from_wait_status(ws: WaitStatus, reap_seq: u64) -> Option<ExitInfo> {
        match ws {
            WaitStatus::Exited(_, code) => Some(ExitInfo {
                exited: true,
                exit_code: code,
                signal: 0,
                status: code,
                reap_seq,
            }),
            WaitStatus::Signaled(_, sig, _core_dumped) => {
                let signal = sig as i32;
                Some(ExitInfo {
                    exited: false,
                    exit_code: 0,
                    signal,
                    status: 128 + signal,
                    reap_seq,
                })
            }
            _ => None,
        }
    }
}

/// Validates a signal number from a request: 1..=64 (0 would only probe, so it is rejected).
pub fn validate_signal(signal: u32) -> Result<i32, ReaperError> {
    if (1..=MAX_SIGNAL).contains(&signal) {
        // The range check makes the conversion lossless.
        Ok(signal as i32)
    } else {
        Err(ReaperError::InvalidSignal(signal))
    }
}

/// Receiving side of a process' exit status: `None` while it runs.
pub type ExitReceiver = watch::Receiver<Option<ExitInfo>>;

/// Pids started by the agent that have not been reaped yet, with the channel that publishes the
/// exit status.
#[derive(Default)]
pub struct ProcTable {
    running: Mutex<HashMap<i32, watch::Sender<Option<ExitInfo>>>>,
    reap_seq: AtomicU64,
}

impl ProcTable {
    pub fn new() -> ProcTable {
        ProcTable::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, watch::Sender<Option<ExitInfo>>>> {
        // A poisoned lock only means another thread panicked while holding it; the map itself is
        // still consistent (every mutation is a single insert/remove).
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `cmd` while holding the table lock and registers the child's pid.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<(Child, ExitReceiver)> {
        let mut running = self.lock();
        let child = cmd.spawn()?;
        let (tx, rx) = watch::channel(None);
        // Pids fit in i32 on Linux (pid_max <= 2^22).
        running.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Sends `signal` to `pid` if it was started by us and has not been reaped yet.
    pub fn kill(&self, pid: i32, signal: i32) -> Result<(), ReaperError> {
        let running = self.lock();
        if !running.contains_key(&pid) {
            return Err(ReaperError::AlreadyExited);
        }
        // SAFETY: kill(2) takes no pointers; the pid is ours and cannot have been reused since it
        // is still in the table (reaping needs the lock we hold).
        let rc = unsafe { libc::kill(pid, signal) };
        if rc == 0 {
            Ok(())
        } else {
            Err(ReaperError::Kill {
                pid,
                signal,
                source: Errno::last(),
            })
        }
    }

    /// Pids started by the agent that are still running (not reaped).
    pub fn running_pids(&self) -> Vec<i32> {
        self.lock().keys().copied().collect()
    }

    /// Reaps every child that has terminated; publishes statuses of known pids.
    pub fn reap_all(&self) {
        let mut running = self.lock();
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(ws) => {
                    let Some(pid) = ws.pid() else { continue };
                    let seq = self.reap_seq.fetch_add(1, Ordering::Relaxed) + 1;
                    let Some(info) = ExitInfo::from_wait_status(ws, seq) else {
                        continue;
                    };
                    if let Some(tx) = running.remove(&pid.as_raw()) {
                        tx.send_replace(Some(info));
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => break,
                Err(e) => {
                    agent_log!("waitpid failed: {e}");
                    break;
                }
            }
        }
    }
}

/// Blocks SIGCHLD in the calling thread. Must run before any other thread is created so that
/// every thread inherits the mask and only the reaper's `sigwait` consumes SIGCHLD.
pub fn block_sigchld() -> Result<(), ReaperError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.thread_block().map_err(ReaperError::BlockSigchld)
}

/// Starts the reaper thread.
pub fn start_reaper(table: Arc<ProcTable>) -> Result<JoinHandle<()>, ReaperError> {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || {
            let mut set = SigSet::empty();
            set.add(Signal::SIGCHLD);
            // Children that exited before we started waiting.
            table.reap_all();
            loop {
                match set.wait() {
                    Ok(_) => table.reap_all(),
                    Err(e) => {
                        agent_log!("sigwait failed: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        table.reap_all();
                    }
                }
            }
        })
        .map_err(ReaperError::Thread)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Pid;

    #[test]
    fn exit_status_is_exit_code() {
        let info = ExitInfo::from_wait_status(WaitStatus::Exited(Pid::from_raw(7), 3), 1);
        assert_eq!(
            info,
            Some(ExitInfo {
                exited: true,
                exit_code: 3,
                signal: 0,
                status: 3,
                reap_seq: 1
            })
        );
    }

    #[test]
    fn signal_status_is_128_plus_signal() {
        let ws = WaitStatus::Signaled(Pid::from_raw(7), Signal::SIGKILL, false);
        let info = ExitInfo::from_wait_status(ws, 2).expect("terminal status");
        assert!(!info.exited);
        assert_eq!(info.signal, 9);
        assert_eq!(info.status, 137);
        assert_eq!(info.exit_code, 0);
    }

    #[test]
    fn stop_events_are_not_exits() {
        let ws = WaitStatus::Stopped(Pid::from_raw(7), Signal::SIGSTOP);
        assert_eq!(ExitInfo::from_wait_status(ws, 1), None);
    }

    #[test]
    fn signal_validation() {
        assert!(validate_signal(0).is_err());
        assert_eq!(validate_signal(9).ok(), Some(9));
        assert_eq!(validate_signal(64).ok(), Some(64));
        assert!(validate_signal(65).is_err());
        assert!(validate_signal(u32::MAX).is_err());
    }
}
