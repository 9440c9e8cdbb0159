//! Starting processes: request validation, executable lookup, pipes or a pseudo terminal, and the
//! fork/exec itself (through [`ProcTable::spawn`], so the reaper cannot steal the status).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::OFlag;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::unistd::{access, AccessFlags};

use crate::reaper::{ExitReceiver, ProcTable};

/// PATH used when the request's environment has none (also the agent's own PATH as PID 1).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("argv must not be empty")]
    EmptyArgv,
    #[error("argv[0] must not be empty")]
    EmptyProgram,
    #[error("{what} contains a NUL byte")]
    NulByte { what: &'static str },
    #[error("invalid environment entry {0:?}: expected KEY=VALUE")]
    InvalidEnv(String),
    #[error("invalid cwd {cwd:?}: {reason}")]
    InvalidCwd { cwd: String, reason: String },
    #[error("executable file not found: {0}")]
    NotFound(String),
    #[error("permission denied: {0} is not executable")]
    PermissionDenied(String),
    #[error("failed to allocate a pseudo terminal: {0}")]
    Pty(#[source] io::Error),
    #[error("failed to set up stdio pipes: {0}")]
    Stdio(#[source] io::Error),
    #[error("failed to start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
}

/// What to start (the fields of `ExecProcessRequest` that matter here).
#[derive(Debug, Clone, Copy)]
pub struct ExecSpec<'a> {
    pub argv: &'a [String],
    pub env: &'a [String],
    pub cwd: &'a str,
    pub terminal: bool,
}

/// A started process and the agent's ends of its stdio.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub exit: ExitReceiver,
    /// Write end of stdin (for a terminal: a duplicate of the pty master).
    pub stdin: File,
    /// Read end of stdout (for a terminal: the pty master).
    pub stdout: File,
    /// Read end of stderr; `None` for a terminal (stderr goes to the pty).
    pub stderr: Option<File>,
    /// Another duplicate of the pty master (window size changes); `None` without a terminal.
    pub pty: Option<OwnedFd>,
}

/// Splits `KEY=VALUE` entries; rejects entries without `=`, with an empty key or a NUL byte.
pub fn parse_env(env: &[String]) -> Result<Vec<(String, String)>, ExecError> {
    env.iter()
        .map(|entry| {
            if entry.contains('\0') {
                return Err(ExecError::NulByte {
                    what: "environment",
                });
            }
            match entry.split_once('=') {
                Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
                _ => Err(ExecError::InvalidEnv(entry.clone())),
            }
        })
        .collect()
}

/// Resolves `name` like `execvp` would: names containing `/` are taken as paths (relative to
/// `cwd`), other names are searched in the `:`-separated `path_var` (an empty element means the
/// current directory). Returns NotFound if nothing matches, PermissionDenied if only
/// non-executable files (or directories given as a path) match.
pub fn resolve_executable(name: &str, path_var: &str, cwd: &Path) -> Result<PathBuf, ExecError> {
    if name.is_empty() {
        return Err(ExecError::EmptyProgram);
    }
    if name.contains('/') {
        let candidate = cwd.join(name);
        return match std::fs::metadata(&candidate) {
            Err(_) => Err(ExecError::NotFound(name.to_string())),
            Ok(meta) if meta.is_file() && is_executable(&candidate) => Ok(candidate),
            Ok(_) => Err(ExecError::PermissionDenied(name.to_string())),
        };
    }
    let mut denied = false;
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = cwd.join(dir).join(name);
        match std::fs::metadata(&candidate) {
            Ok(meta) if meta.is_file() => {
                if is_executable(&candidate) {
                    return Ok(candidate);
                }
                denied = true;
            }
            _ => {}
        }
    }
    if denied {
        Err(ExecError::PermissionDenied(name.to_string()))
    } else {
        Err(ExecError::NotFound(name.to_string()))
    }
}

fn is_executable(path: &Path) -> bool {
    access(path, AccessFlags::X_OK).is_ok()
}

/// Checks that `cwd` (empty: `/`) is an existing directory.
pub fn check_cwd(cwd: &str) -> Result<PathBuf, ExecError> {
    let cwd = if cwd.is_empty() { "/" } else { cwd };
    if cwd.contains('\0') {
        return Err(ExecError::NulByte { what: "cwd" });
    }
    match std::fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => Ok(PathBuf::from(cwd)),
        Ok(_) => Err(ExecError::InvalidCwd {
            cwd: cwd.to_string(),
            reason: "not a directory".into(),
        }),
        Err(e) => Err(ExecError::InvalidCwd {
            cwd: cwd.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Opens a pseudo terminal; returns (master, slave), both close-on-exec.
fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let slave_path = ptsname_r(&master)?;
    // std opens with O_CLOEXEC.
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(slave_path)?;
    // SAFETY: into_raw_fd hands over ownership of the open master fd, which nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    // posix_openpt passes O_CLOEXEC through to open(2), but make sure.
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&master),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok((master, slave.into()))
}

/// The kernel's `struct sigaction` for rt_sigaction(2) on x86_64 (and the other architectures
/// with `sa_restorer`). Used through the raw syscall because glibc refuses to touch the signals
/// it reserves (32, 33), which may have been inherited as ignored.
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: libc::sighandler_t,
    mask: u64,
}

/// Resets the signal state of a freshly forked child: empty mask, default dispositions.
///
/// # Safety
/// Only to be called in the child between fork and exec; makes raw syscalls only (no
/// allocation, no locks), which are async-signal-safe.
unsafe fn reset_signals_in_child() -> io::Result<()> {
    let empty: u64 = 0;
    // SAFETY: rt_sigprocmask reads an 8-byte kernel sigset from a valid pointer; the old-set
    // pointer is null.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            std::mem::size_of::<u64>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads a valid, fully initialised kernel sigaction; the old-action
        // pointer is null. Setting SIG_DFL needs no restorer.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                std::mem::size_of::<u64>(),
            );
        }
    }
    Ok(())
}

/// Validates `spec` and starts the process. Blocking (filesystem lookups, fork/exec): call it
/// from a blocking context.
pub fn spawn(table: &ProcTable, spec: ExecSpec<'_>) -> Result<Spawned, ExecError> {
    let program = spec.argv.first().ok_or(ExecError::EmptyArgv)?;
    if spec.argv.iter().any(|a| a.contains('\0')) {
        return Err(ExecError::NulByte { what: "argv" });
    }
    let env = parse_env(spec.env)?;
    let cwd = check_cwd(spec.cwd)?;
    let path_var = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    let resolved = resolve_executable(program, path_var, &cwd)?;

    let mut cmd = Command::new(&resolved);
    cmd.arg0(program)
        .args(&spec.argv[1..])
        .env_clear()
        .current_dir(&cwd);
    if !env.iter().any(|(k, _)| k == "PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    spawn_prepared(table, program, cmd, spec.terminal, None)
}

/// Extra work done in the forked child, after the stdio and signal setup and right before
/// exec. It must only make async-signal-safe calls (no allocation, no locks).
pub type ChildSetup = Box<dyn FnMut() -> io::Result<()> + Send + Sync>;

/// Wires stdio (pipes or a pseudo terminal) into `cmd` (program, arguments and environment
/// already set), spawns it through the table and returns the agent's ends. `setup` runs in the
/// child last before exec. Blocking: call it from a blocking context.
pub fn spawn_prepared(
    table: &ProcTable,
    program: &str,
    mut cmd: Command,
    terminal: bool,
    setup: Option<ChildSetup>,
) -> Result<Spawned, ExecError> {
    let program = program.to_string();
    let mut setup = setup;
    let mut pty_master = None;
    if terminal {
        let (master, slave) = open_pty().map_err(ExecError::Pty)?;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(ExecError::Pty);
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        // SAFETY: the closure runs in the forked child and only makes async-signal-safe calls
        // (sigprocmask, signal, setsid, ioctl, and `setup`, which by its contract makes only
        // such calls); it does not allocate or take locks.
        unsafe {
            cmd.pre_exec(move || {
                reset_signals_in_child()?;
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // stdin is already the pty slave (std dup2s stdio before running pre_exec).
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                match setup.as_mut() {
                    Some(f) => f(),
                    None => Ok(()),
                }
            });
        }
        pty_master = Some(master);
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child and only makes async-signal-safe calls
        // (`setup` included, by its contract).
        unsafe {
            cmd.pre_exec(move || {
                reset_signals_in_child()?;
                match setup.as_mut() {
                    Some(f) => f(),
                    None => Ok(()),
                }
            });
        }
    }

    let spawned = table.spawn(&mut cmd);
    // Drop the Command now: for a terminal it holds the parent's copies of the slave, which must
    // be closed or reading the master would never report EOF.
    drop(cmd);
    let (mut child, exit) = spawned.map_err(|source| ExecError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = child.id() as i32;

    let (stdin, stdout, stderr, pty) = match pty_master {
        Some(master) => {
            let writer = master.try_clone().map_err(ExecError::Pty)?;
            let resizer = master.try_clone().map_err(ExecError::Pty)?;
            (File::from(writer), File::from(master), None, Some(resizer))
        }
        None => {
            let missing = || ExecError::Stdio(io::Error::other("std did not create a pipe"));
            let stdin = child.stdin.take().ok_or_else(missing)?;
            let stdout = child.stdout.take().ok_or_else(missing)?;
            let stderr = child.stderr.take().ok_or_else(missing)?;
            (
                File::from(OwnedFd::from(stdin)),
                File::from(OwnedFd::from(stdout)),
                Some(File::from(OwnedFd::from(stderr))),
                None,
            )
        }
    };
    // `child` is dropped without waiting: the reaper collects the status.
    Ok(Spawned {
        pid,
        exit,
        stdin,
        stdout,
        stderr,
        pty,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file_with_mode(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }

    #[test]
    fn resolves_in_path_order() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        file_with_mode(b.path(), "tool", 0o755);
        let path = format!("{}:{}", a.path().display(), b.path().display());
        let got = resolve_executable("tool", &path, Path::new("/")).expect("found");
        assert_eq!(got, b.path().join("tool"));

        let first = file_with_mode(a.path(), "tool", 0o755);
        let got = resolve_executable("tool", &path, Path::new("/")).expect("found");
        assert_eq!(got, first);
    }

    #[test]
    fn missing_is_not_found() {
        let a = tempfile::tempdir().expect("tempdir");
        let err = resolve_executable("nope", &a.path().display().to_string(), Path::new("/"))
            .expect_err("missing");
        assert!(matches!(err, ExecError::NotFound(ref n) if n == "nope"));
        assert_eq!(err.to_string(), "executable file not found: nope");
    }

    #[test]
    fn non_executable_is_permission_denied_unless_a_later_one_is_executable() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        file_with_mode(a.path(), "tool", 0o644);
        let only_a = a.path().display().to_string();
        let err = resolve_executable("tool", &only_a, Path::new("/")).expect_err("denied");
        assert!(matches!(err, ExecError::PermissionDenied(_)));

        let exe = file_with_mode(b.path(), "tool", 0o700);
        let both = format!("{}:{}", a.path().display(), b.path().display());
        assert_eq!(
            resolve_executable("tool", &both, Path::new("/")).expect("found"),
            exe
        );
    }

    #[test]
    fn paths_with_slash_skip_path_search_and_are_relative_to_cwd() {
        let a = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(a.path().join("bin")).expect("mkdir");
        let exe = file_with_mode(&a.path().join("bin"), "tool", 0o755);
        assert_eq!(
            resolve_executable("./bin/tool", "", a.path()).expect("found"),
            a.path().join("./bin/tool")
        );
        assert_eq!(
            resolve_executable(&exe.display().to_string(), "", Path::new("/")).expect("found"),
            exe
        );
        assert!(matches!(
            resolve_executable("./bin/none", "/bin", a.path()),
            Err(ExecError::NotFound(_))
        ));
        // A directory cannot be executed.
        assert!(matches!(
            resolve_executable("./bin", "", a.path()),
            Err(ExecError::PermissionDenied(_))
        ));
    }

    #[test]
    fn empty_path_element_means_cwd() {
        let a = tempfile::tempdir().expect("tempdir");
        let exe = file_with_mode(a.path(), "tool", 0o755);
        assert_eq!(
            resolve_executable("tool", "/nonexistent:", a.path()).expect("found"),
            a.path().join(".").join("tool")
        );
        assert!(exe.exists());
    }

    #[test]
    fn env_parsing() {
        let ok = parse_env(&["A=1".into(), "B=x=y".into(), "C=".into()]).expect("valid");
        assert_eq!(
            ok,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "x=y".into()),
                ("C".into(), String::new())
            ]
        );
        assert!(matches!(
            parse_env(&["NOEQUALS".into()]),
            Err(ExecError::InvalidEnv(_))
        ));
        assert!(matches!(
            parse_env(&["=v".into()]),
            Err(ExecError::InvalidEnv(_))
        ));
        assert!(matches!(
            parse_env(&["A=\0".into()]),
            Err(ExecError::NulByte { .. })
        ));
    }

    #[test]
    fn cwd_checks() {
        assert_eq!(check_cwd("").expect("root"), PathBuf::from("/"));
        assert!(matches!(
            check_cwd("/nonexistent/dir"),
            Err(ExecError::InvalidCwd { ref cwd, .. }) if cwd == "/nonexistent/dir"
        ));
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        assert!(matches!(
            check_cwd(&f.path().display().to_string()),
            Err(ExecError::InvalidCwd { .. })
        ));
    }
}
