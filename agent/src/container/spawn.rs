//! Forking a container's process: from a dedicated thread that was moved into the right pid
//! namespace first ([`PidNs`]), the child running the precomputed steps, a failing step
//! reported by name through a close-on-exec pipe.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use nix::fcntl::OFlag;

use super::{ContainerError, Target};
use crate::exec::{self, ExecError, Spawned, DEFAULT_PATH};
use crate::reaper::ProcTable;
use crate::steps::{run_op, Step};

/// Bound on the fork/exec of a container (the setup touches the shared filesystem).
const SPAWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Which pid namespace the child is born in.
pub(super) enum PidNs {
    /// A new one: the child is its pid 1.
    New,
    /// The one of this fd (`/proc/<pid>/ns/pid` of a container's first process).
    Join(OwnedFd),
}

/// The Command for `program_path` (argv[0] = `program`) with exactly `env` (plus a default PATH).
pub(super) fn command(
    program_path: &str,
    program: &str,
    args: &[String],
    env: &[(String, String)],
) -> Command {
    let mut cmd = Command::new(program_path);
    cmd.arg0(program).args(&args[1..]).env_clear();
    if !env.iter().any(|(k, _)| k == "PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

pub(super) fn open_ns(t: &Target, ns: &str) -> Result<OwnedFd, ContainerError> {
    let path = format!("/proc/{}/ns/{ns}", t.init_pid);
    let f = std::fs::File::open(&path).map_err(|e| ContainerError::Setup {
        step: format!("open {path} of container {}", t.id),
        source: e,
    })?;
    Ok(f.into())
}

/// Forks `cmd` from a thread in the right pid namespace; the child runs `steps`, then execs.
/// A failing step is reported by name. `keep`: fds the steps use, closed after the fork.
pub(super) fn spawn_with_steps(
    table: Arc<ProcTable>,
    pidns: PidNs,
    program: String,
    cmd: Command,
    terminal: bool,
    steps: Vec<Step>,
    keep: Vec<OwnedFd>,
) -> Result<Spawned, ContainerError> {
    let names: Vec<String> = steps.iter().map(|s| s.what.clone()).collect();
    spawn_on_pid_thread(table, pidns, move |table| {
        let _keep = keep;
        let (err_rd, err_wr) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(|e| {
                ContainerError::Setup {
                    step: "create the error pipe".into(),
                    source: e.into(),
                }
            })?;
        let wr = err_wr.as_raw_fd();
        let setup: exec::ChildSetup = Box::new(move || {
            for (i, step) in steps.iter().enumerate() {
                if let Err(e) = run_op(&step.op) {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    let mut msg = [0u8; 8];
                    msg[..4].copy_from_slice(&(i as u32).to_le_bytes());
                    msg[4..].copy_from_slice(&errno.to_le_bytes());
                    // SAFETY: write(2) of a stack buffer to the pipe fd, which stays open in the
                    // child until exec (close-on-exec) or exit.
                    unsafe {
                        libc::write(wr, msg.as_ptr() as *const libc::c_void, msg.len());
                    }
                    return Err(e);
                }
            }
            Ok(())
        });
        let result = exec::spawn_prepared(table, &program, cmd, terminal, Some(setup));
        drop(err_wr);
        match result {
            Ok(s) => Ok(s),
            Err(e) => {
                let mut msg = [0u8; 8];
                match nix::unistd::read(err_rd.as_raw_fd(), &mut msg) {
                    Ok(8) => {
                        let i = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize;
                        let errno = i32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
                        Err(ContainerError::Setup {
                            step: names.get(i).cloned().unwrap_or_else(|| format!("step {i}")),
                            source: io::Error::from_raw_os_error(errno),
                        })
                    }
                    // No step failed: exec itself did.
                    _ => Err(match e {
                        ExecError::Spawn { program, source }
                            if source.kind() == io::ErrorKind::NotFound =>
                        {
                            ContainerError::ExecutableNotFound(program)
                        }
                        e => e.into(),
                    }),
                }
            }
        }
    })
}

/// Runs `f` on a fresh thread whose children are born in `pidns`, waiting at most
/// [`SPAWN_TIMEOUT`].
fn spawn_on_pid_thread<F>(
    table: Arc<ProcTable>,
    pidns: PidNs,
    f: F,
) -> Result<Spawned, ContainerError>
where
    F: FnOnce(&ProcTable) -> Result<Spawned, ContainerError> + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let thread_table = table.clone();
    std::thread::Builder::new()
        .name("container-spawn".into())
        .spawn(move || {
            // SAFETY: unshare(2)/setns(2) take no pointers (the fd is owned by `pidns`, alive
            // for the call); CLONE_NEWPID only sets the pid namespace of this thread's future
            // children, and this thread ends after one spawn.
            let (rc, step) = unsafe {
                match &pidns {
                    PidNs::New => (
                        libc::unshare(libc::CLONE_NEWPID),
                        "unshare the pid namespace",
                    ),
                    PidNs::Join(fd) => (
                        libc::setns(fd.as_raw_fd(), libc::CLONE_NEWPID),
                        "join the container's pid namespace",
                    ),
                }
            };
            let result = if rc != 0 {
                Err(ContainerError::Setup {
                    step: step.into(),
                    source: io::Error::last_os_error(),
                })
            } else {
                f(&thread_table)
            };
            drop(pidns);
            if let Err(mpsc::SendError(Ok(orphan))) = tx.send(result) {
                // The caller gave up waiting: nobody would serve this process.
                let _ = thread_table.kill(orphan.pid, libc::SIGKILL);
            }
        })
        .map_err(|e| ContainerError::Thread(e.to_string()))?;
    match rx.recv_timeout(SPAWN_TIMEOUT) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(ContainerError::Thread(format!(
            "container did not start within {SPAWN_TIMEOUT:?}"
        ))),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(ContainerError::Thread("spawn thread died".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn envs(cmd: &Command) -> Vec<(&OsStr, Option<&OsStr>)> {
        let mut v: Vec<_> = cmd.get_envs().collect();
        v.sort();
        v
    }

    #[test]
    fn command_gets_exactly_its_env_plus_a_default_path() {
        let args = ["sh".to_string(), "-c".into(), "true".into()];
        let cmd = command("/bin/busybox", "sh", &args, &[("A".into(), "1".into())]);
        assert_eq!(cmd.get_program(), "/bin/busybox");
        assert_eq!(cmd.get_args().collect::<Vec<_>>(), ["-c", "true"]);
        assert_eq!(
            envs(&cmd),
            [
                (OsStr::new("A"), Some(OsStr::new("1"))),
                (OsStr::new("PATH"), Some(OsStr::new(DEFAULT_PATH))),
            ]
        );
        let cmd = command("/p", "p", &["p".into()], &[("PATH".into(), "/x".into())]);
        assert_eq!(envs(&cmd), [(OsStr::new("PATH"), Some(OsStr::new("/x")))]);
    }
}
