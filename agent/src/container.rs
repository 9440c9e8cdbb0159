//! Containers: a process in new mount, pid, uts and ipc namespaces whose root is a rootfs shared
//! from the host over virtio-fs (tag [`SHARED_FS_TAG`], mounted at [`GUEST_SHARED_DIR`]).
//!
//! Everything that can fail for a reason the caller should hear about (bad id, missing rootfs,
//! executable not found inside the rootfs, bad cwd) is checked before forking, with the lookups
//! done *inside* the rootfs (`openat2(RESOLVE_IN_ROOT)`, so absolute symlinks resolve as they
//! will in the container). The child then runs a precomputed list of steps ([`Op`]) with raw
//! syscalls only (no allocation between fork and exec):
//!
//! 1. the pid namespace comes from a dedicated thread that called `unshare(CLONE_NEWPID)` before
//!    forking, so the container's first process is pid 1 of its namespace and the agent's other
//!    threads keep theirs;
//! 2. `unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC)`, every mount made private;
//! 3. a tmpfs on [`STAGE_DIR`] (private to the container's mount namespace), the shared rootfs
//!    bind-mounted at `STAGE_DIR/root`, then /proc, /sys (read-only), /dev (tmpfs with
//!    null, zero, full, random, urandom, tty, /dev/pts, /dev/shm and the usual symlinks), the
//!    rootfs remounted read-only when asked, the hostname set;
//! 4. `chroot(STAGE_DIR)` (the initramfs root cannot be pivoted away from, a tmpfs can),
//!    `pivot_root(".", ".")` into the rootfs and a lazy unmount of the old root: nothing of the
//!    agent's filesystem stays reachable;
//! 5. `chdir(cwd)`, exec.
//!
//! A failing step writes its index and errno to a close-on-exec pipe, so the error names the
//! step instead of only carrying an errno.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use joey_agent_protocol::{GUEST_SHARED_DIR, SHARED_FS_TAG};
use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{fstat, FileStat, Mode};

use crate::exec::{self, parse_env, ExecError, Spawned, DEFAULT_PATH};
use crate::reaper::ProcTable;

/// Directory on which each container's child mounts its private staging tmpfs.
pub const STAGE_DIR: &str = "/run/joey/stage";
/// Longest hostname (HOST_NAME_MAX).
pub const MAX_HOSTNAME_LEN: usize = 64;
/// Bound on the fork/exec of a container (the setup touches the shared filesystem).
const SPAWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid container id {0:?}: expected 1 to 64 of [A-Za-z0-9_.-], starting alphanumeric")]
    InvalidId(String),
    #[error("invalid rootfs {path:?}: {reason}")]
    InvalidRootfs { path: String, reason: String },
    #[error("container rootfs not found: {0}")]
    RootfsNotFound(String),
    #[error("invalid hostname {0:?}: expected 1 to 64 of [A-Za-z0-9.-]")]
    InvalidHostname(String),
    #[error("invalid cwd {0:?}: expected an absolute path of a directory in the container rootfs")]
    InvalidCwd(String),
    #[error("executable file not found in the container rootfs: {0}")]
    ExecutableNotFound(String),
    #[error("permission denied: {0} is not an executable file in the container rootfs")]
    NotExecutable(String),
    #[error("mounting the shared filesystem (tag {tag}) on {target}: {source}")]
    MountShared {
        tag: &'static str,
        target: &'static str,
        #[source]
        source: Errno,
    },
    #[error("opening the container rootfs {path}: {source}")]
    OpenRootfs {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("container setup failed at {step}: {source}")]
    Setup {
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("container spawn thread: {0}")]
    Thread(String),
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// What to start (the fields of `CreateContainerRequest`).
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub id: String,
    pub rootfs: String,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub terminal: bool,
    pub hostname: String,
    pub readonly_rootfs: bool,
}

/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
pub fn validate_id(id: &str) -> Result<(), ContainerError> {
    if joey_agent_protocol::is_valid_container_id(id) {
        Ok(())
    } else {
        Err(ContainerError::InvalidId(id.to_string()))
    }
}

fn validate_hostname(h: &str) -> Result<(), ContainerError> {
    let ok = !h.is_empty()
        && h.len() <= MAX_HOSTNAME_LEN
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidHostname(h.to_string()))
    }
}

/// An absolute path made of normal components only (no `.`, `..`, NUL).
fn is_clean_absolute(p: &str) -> bool {
    !p.contains('\0') && p.starts_with('/') && p.split('/').all(|c| c != "." && c != "..")
}

/// Checks that `rootfs` is a clean path strictly below `shared_dir`.
pub fn validate_rootfs(rootfs: &str, shared_dir: &str) -> Result<(), ContainerError> {
    let bad = |reason: &str| ContainerError::InvalidRootfs {
        path: rootfs.to_string(),
        reason: reason.to_string(),
    };
    if !is_clean_absolute(rootfs) {
        return Err(bad("expected an absolute path without '.' or '..' components"));
    }
    match Path::new(rootfs).strip_prefix(shared_dir) {
        Ok(rest) if rest.components().next().is_some() => Ok(()),
        _ => Err(bad(&format!("must be below {shared_dir}"))),
    }
}

static SHARED_MOUNTED: Mutex<bool> = Mutex::new(false);

/// Mounts the sandbox's virtio-fs share on [`GUEST_SHARED_DIR`] once (first container).
pub fn ensure_shared_mounted() -> Result<(), ContainerError> {
    let mut mounted = SHARED_MOUNTED.lock().unwrap_or_else(|e| e.into_inner());
    if *mounted {
        return Ok(());
    }
    let err = |source| ContainerError::MountShared {
        tag: SHARED_FS_TAG,
        target: GUEST_SHARED_DIR,
        source,
    };
    std::fs::create_dir_all(GUEST_SHARED_DIR).map_err(|e| err(io_errno(&e)))?;
    match mount(
        Some(SHARED_FS_TAG),
        GUEST_SHARED_DIR,
        Some("virtiofs"),
        MsFlags::MS_NODEV,
        None::<&str>,
    ) {
        Ok(()) => {
            agent_log!("mounted virtio-fs {SHARED_FS_TAG} on {GUEST_SHARED_DIR}");
            *mounted = true;
            Ok(())
        }
        Err(e) => Err(err(e)),
    }
}

fn io_errno(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// `fstat` of `path` resolved inside the directory `root` as if it were `/`.
fn stat_in_root(root: RawFd, path: &str) -> Result<FileStat, Errno> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT);
    let fd = openat2(root, path, how)?;
    // SAFETY: openat2 just returned this fd and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    fstat(fd.as_raw_fd())
}

fn is_dir(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn is_executable_file(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_mode & 0o111 != 0
}

/// `dir/name` without empty or `.` components (`..` is left to the in-root resolution).
fn join_in(dir: &str, name: &str) -> String {
    let parts: Vec<&str> = dir
        .split('/')
        .chain(name.split('/'))
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// Resolves `name` like `execvp` would, inside the rootfs open at `root`; returns the absolute
/// in-container path. `cwd` is absolute.
pub fn resolve_in_rootfs(
    root: RawFd,
    name: &str,
    path_var: &str,
    cwd: &str,
) -> Result<String, ContainerError> {
    if name.is_empty() {
        return Err(ExecError::EmptyProgram.into());
    }
    if name.contains('/') {
        let p = if name.starts_with('/') {
            name.to_string()
        } else {
            join_in(cwd, name)
        };
        return match stat_in_root(root, &p) {
            Ok(st) if is_executable_file(&st) => Ok(p),
            Ok(_) => Err(ContainerError::NotExecutable(name.to_string())),
            Err(_) => Err(ContainerError::ExecutableNotFound(name.to_string())),
        };
    }
    let mut denied = false;
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() {
            cwd.to_string()
        } else if dir.starts_with('/') {
            dir.to_string()
        } else {
            join_in(cwd, dir)
        };
        let p = join_in(&dir, name);
        match stat_in_root(root, &p) {
            Ok(st) if is_executable_file(&st) => return Ok(p),
            Ok(st) if !is_dir(&st) => denied = true,
            _ => {}
        }
    }
    if denied {
        Err(ContainerError::NotExecutable(name.to_string()))
    } else {
        Err(ContainerError::ExecutableNotFound(name.to_string()))
    }
}

/// One setup step of the child, with every path already a C string.
#[derive(Debug)]
enum Op {
    Unshare(libc::c_int),
    Umask(libc::mode_t),
    Mount {
        src: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// mkdir; an existing entry is fine.
    Mkdir(CString, libc::mode_t),
    Mknod(CString, libc::mode_t, libc::dev_t),
    Symlink { target: CString, link: CString },
    Sethostname(CString),
    Chroot(CString),
    Chdir(CString),
    /// `pivot_root(".", ".")`.
    PivotRootHere,
    /// `umount2(".", MNT_DETACH)`.
    DetachHere,
}

#[derive(Debug)]
struct Step {
    what: String,
    op: Op,
}

/// Runs one step. Async-signal-safe: raw syscalls on prepared C strings, no allocation.
fn run_op(op: &Op) -> io::Result<()> {
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY (all calls below): every pointer comes from a live CString owned by the step list
    // (or is null where the syscall allows it); the calls take no other memory.
    let rc = unsafe {
        match op {
            Op::Unshare(flags) => libc::unshare(*flags),
            Op::Umask(m) => {
                libc::umask(*m);
                0
            }
            Op::Mount {
                src,
                target,
                fstype,
                flags,
                data,
            } => libc::mount(
                ptr(src),
                target.as_ptr(),
                ptr(fstype),
                *flags,
                ptr(data) as *const libc::c_void,
            ),
            Op::Mkdir(p, mode) => {
                let rc = libc::mkdir(p.as_ptr(), *mode);
                if rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) {
                    0
                } else {
                    rc
                }
            }
            Op::Mknod(p, mode, dev) => libc::mknod(p.as_ptr(), *mode, *dev),
            Op::Symlink { target, link } => libc::symlink(target.as_ptr(), link.as_ptr()),
            Op::Sethostname(h) => libc::sethostname(h.as_ptr(), h.as_bytes().len()),
            Op::Chroot(p) => libc::chroot(p.as_ptr()),
            Op::Chdir(p) => libc::chdir(p.as_ptr()),
            Op::PivotRootHere => {
                let dot = c".".as_ptr();
                libc::syscall(libc::SYS_pivot_root, dot, dot) as libc::c_int
            }
            Op::DetachHere => libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cstr(s: &str) -> Result<CString, ContainerError> {
    CString::new(s).map_err(|_| ExecError::NulByte { what: "path" }.into())
}

/// The child's setup steps for `spec` (rootfs, cwd and hostname already validated).
fn plan(spec: &ContainerSpec, hostname: &str, cwd: &str) -> Result<Vec<Step>, ContainerError> {
    let root = format!("{STAGE_DIR}/root");
    let at = |p: &str| format!("{root}{p}");
    let mut steps = Vec::new();
    let mut push = |what: String, op: Op| steps.push(Step { what, op });
    let mnt = |src: Option<&str>, target: &str, fstype: Option<&str>, flags: MsFlags, data: Option<&str>| {
        Ok::<Op, ContainerError>(Op::Mount {
            src: src.map(cstr).transpose()?,
            target: cstr(target)?,
            fstype: fstype.map(cstr).transpose()?,
            flags: flags.bits(),
            data: data.map(cstr).transpose()?,
        })
    };
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;

    push(
        "unshare mount/uts/ipc namespaces".into(),
        Op::Unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC),
    );
    push("umask".into(), Op::Umask(0));
    push(
        "make mounts private".into(),
        mnt(None, "/", None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)?,
    );
    push(
        format!("mount staging tmpfs on {STAGE_DIR}"),
        mnt(Some("tmpfs"), STAGE_DIR, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?,
    );
    push("create the rootfs mountpoint".into(), Op::Mkdir(cstr(&root)?, 0o755));
    push(
        format!("bind-mount rootfs {}", spec.rootfs),
        mnt(Some(&spec.rootfs), &root, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?,
    );
    for (dir, mode) in [("/proc", 0o555), ("/sys", 0o555), ("/dev", 0o755)] {
        push(format!("create mountpoint {dir} in the rootfs"), Op::Mkdir(cstr(&at(dir))?, mode));
    }
    push("mount /proc".into(), mnt(Some("proc"), &at("/proc"), Some("proc"), nosuid_nodev_noexec, None)?);
    push(
        "mount /sys".into(),
        mnt(Some("sysfs"), &at("/sys"), Some("sysfs"), nosuid_nodev_noexec | MsFlags::MS_RDONLY, None)?,
    );
    push(
        "mount /dev".into(),
        mnt(
            Some("tmpfs"),
            &at("/dev"),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
            Some("mode=0755,size=65536k"),
        )?,
    );
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        push(
            format!("create /dev/{name}"),
            Op::Mknod(cstr(&at(&format!("/dev/{name}")))?, libc::S_IFCHR | 0o666, libc::makedev(major, minor)),
        );
    }
    push("create /dev/pts".into(), Op::Mkdir(cstr(&at("/dev/pts"))?, 0o755));
    push(
        "mount /dev/pts".into(),
        mnt(
            Some("devpts"),
            &at("/dev/pts"),
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )?,
    );
    push("create /dev/shm".into(), Op::Mkdir(cstr(&at("/dev/shm"))?, 0o1777));
    push(
        "mount /dev/shm".into(),
        mnt(Some("shm"), &at("/dev/shm"), Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))?,
    );
    for (link, target) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        push(
            format!("create {link}"),
            Op::Symlink {
                target: cstr(target)?,
                link: cstr(&at(link))?,
            },
        );
    }
    if spec.readonly_rootfs {
        push(
            "remount the rootfs read-only".into(),
            mnt(
                None,
                &root,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
                None,
            )?,
        );
    }
    push(format!("set hostname {hostname}"), Op::Sethostname(cstr(hostname)?));
    push(format!("chroot {STAGE_DIR}"), Op::Chroot(cstr(STAGE_DIR)?));
    push("chdir /root".into(), Op::Chdir(cstr("/root")?));
    push("pivot_root into the rootfs".into(), Op::PivotRootHere);
    push("detach the old root".into(), Op::DetachHere);
    push(format!("chdir {cwd}"), Op::Chdir(cstr(cwd)?));
    push("umask".into(), Op::Umask(0o022));
    Ok(steps)
}

/// Validates `spec`, then starts the container's first process (blocking: call it from a
/// blocking context). `mount_shared`: mount the virtio-fs share first (PID 1 in the guest).
pub fn spawn(
    table: Arc<ProcTable>,
    spec: &ContainerSpec,
    shared_dir: &str,
    mount_shared: bool,
) -> Result<Spawned, ContainerError> {
    validate_id(&spec.id)?;
    let hostname = if spec.hostname.is_empty() {
        spec.id.clone()
    } else {
        spec.hostname.clone()
    };
    validate_hostname(&hostname)?;
    validate_rootfs(&spec.rootfs, shared_dir)?;
    let program = spec.argv.first().ok_or(ExecError::EmptyArgv)?.clone();
    if spec.argv.iter().any(|a| a.contains('\0')) {
        return Err(ExecError::NulByte { what: "argv" }.into());
    }
    let env = parse_env(&spec.env)?;
    let cwd = if spec.cwd.is_empty() { "/".to_string() } else { spec.cwd.clone() };
    if !is_clean_absolute(&cwd) {
        return Err(ContainerError::InvalidCwd(cwd));
    }
    if mount_shared {
        ensure_shared_mounted()?;
    }

    let root = match std::fs::metadata(&spec.rootfs) {
        Ok(m) if m.is_dir() => nix::fcntl::open(
            spec.rootfs.as_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| ContainerError::OpenRootfs {
            path: spec.rootfs.clone(),
            source,
        })?,
        _ => return Err(ContainerError::RootfsNotFound(spec.rootfs.clone())),
    };
    // SAFETY: open just returned this fd and nothing else owns it.
    let root = unsafe { OwnedFd::from_raw_fd(root) };
    match stat_in_root(root.as_raw_fd(), &cwd) {
        Ok(st) if is_dir(&st) => {}
        _ => return Err(ContainerError::InvalidCwd(cwd)),
    }
    let path_var = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    let resolved = resolve_in_rootfs(root.as_raw_fd(), &program, &path_var, &cwd)?;
    drop(root);

    std::fs::create_dir_all(STAGE_DIR).map_err(|source| ContainerError::Setup {
        step: format!("create {STAGE_DIR}"),
        source,
    })?;
    let steps = plan(spec, &hostname, &cwd)?;
    let names: Vec<String> = steps.iter().map(|s| s.what.clone()).collect();

    let mut cmd = Command::new(&resolved);
    cmd.arg0(&program).args(&spec.argv[1..]).env_clear();
    if !env.iter().any(|(k, _)| k == "PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));

    let terminal = spec.terminal;
    spawn_in_new_pid_namespace(table, move |table| {
        let (err_rd, err_wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(|e| {
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
                    // No step failed: exec itself did (the lookup raced with a change).
                    _ => Err(e.into()),
                }
            }
        }
    })
}

/// Runs `f` on a fresh thread whose children are born in a new pid namespace (so the first one
/// is its pid 1), waiting at most [`SPAWN_TIMEOUT`].
fn spawn_in_new_pid_namespace<F>(table: Arc<ProcTable>, f: F) -> Result<Spawned, ContainerError>
where
    F: FnOnce(&ProcTable) -> Result<Spawned, ContainerError> + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let thread_table = table.clone();
    std::thread::Builder::new()
        .name("container-spawn".into())
        .spawn(move || {
            // SAFETY: unshare(2) takes no pointers; CLONE_NEWPID only sets the pid namespace of
            // this thread's future children, and this thread ends after one spawn.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWPID) };
            let result = if rc != 0 {
                Err(ContainerError::Setup {
                    step: "unshare the pid namespace".into(),
                    source: io::Error::last_os_error(),
                })
            } else {
                f(&thread_table)
            };
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
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(ContainerError::Thread("spawn thread died".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ids_and_hostnames() {
        assert!(validate_id("abc-1_2.3").is_ok());
        assert!(validate_id(&"a".repeat(64)).is_ok());
        for bad in ["", "-a", ".", "a/b", "..", &"a".repeat(65), "a b"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_hostname("web-1.local").is_ok());
        assert!(validate_hostname("a_b").is_err());
        assert!(validate_hostname("").is_err());
    }

    #[test]
    fn rootfs_must_be_clean_and_below_the_share() {
        let s = "/run/joey/shared";
        assert!(validate_rootfs("/run/joey/shared/c1/rootfs", s).is_ok());
        for bad in [
            "/run/joey/shared",
            "/run/joey/shared/",
            "/run/joey/shared/../x",
            "/run/joey/shared/./c",
            "run/joey/shared/c",
            "/tmp/c",
            "/run/joey/sharedx/c",
        ] {
            let e = validate_rootfs(bad, s).expect_err(bad);
            assert!(e.to_string().contains(bad.trim_end_matches('/')), "{e}");
        }
    }

    #[test]
    fn lookup_resolves_symlinks_inside_the_rootfs() {
        let d = tempfile::tempdir().expect("tempdir");
        let bin = d.path().join("bin");
        std::fs::create_dir(&bin).expect("mkdir");
        std::fs::write(bin.join("busybox"), b"x").expect("write");
        std::fs::set_permissions(bin.join("busybox"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::write(bin.join("data"), b"x").expect("write");
        // Absolute target: only valid when resolved inside the rootfs.
        std::os::unix::fs::symlink("/bin/busybox", bin.join("sh")).expect("symlink");
        let root = nix::fcntl::open(d.path(), OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()).expect("open");
        // SAFETY: fresh fd from open.
        let root = unsafe { OwnedFd::from_raw_fd(root) };
        let r = root.as_raw_fd();
        assert_eq!(resolve_in_rootfs(r, "sh", "/usr/bin:/bin", "/").unwrap(), "/bin/sh");
        assert_eq!(resolve_in_rootfs(r, "./bin/sh", "", "/").unwrap(), "/bin/sh");
        assert_eq!(resolve_in_rootfs(r, "busybox", "bin", "/").unwrap(), "/bin/busybox");
        let e = resolve_in_rootfs(r, "nope", "/bin", "/").unwrap_err();
        assert_eq!(e.to_string(), "executable file not found in the container rootfs: nope");
        assert!(matches!(resolve_in_rootfs(r, "data", "/bin", "/"), Err(ContainerError::NotExecutable(_))));
        // `..` cannot climb out of the rootfs.
        assert!(resolve_in_rootfs(r, "/../../bin/busybox", "", "/").is_ok());
    }

    #[test]
    fn plan_ends_in_the_rootfs() {
        let spec = ContainerSpec {
            id: "c1".into(),
            rootfs: "/run/joey/shared/c1/rootfs".into(),
            argv: vec!["sh".into()],
            env: vec![],
            cwd: String::new(),
            terminal: false,
            hostname: String::new(),
            readonly_rootfs: true,
        };
        let steps = plan(&spec, "c1", "/").unwrap();
        let names: Vec<&str> = steps.iter().map(|s| s.what.as_str()).collect();
        let pos = |n: &str| names.iter().position(|x| x.starts_with(n)).unwrap_or_else(|| panic!("{n}"));
        assert_eq!(pos("unshare"), 0);
        assert!(pos("bind-mount rootfs") < pos("mount /proc"));
        assert!(pos("mount /dev/pts") < pos("remount the rootfs read-only"));
        assert!(pos("remount the rootfs read-only") < pos("pivot_root"));
        assert!(pos("pivot_root") < pos("detach the old root"));
        assert_eq!(names.last(), Some(&"umask"));
        let spec_rw = ContainerSpec {
            readonly_rootfs: false,
            ..spec
        };
        assert!(!plan(&spec_rw, "c1", "/").unwrap().iter().any(|s| s.what.contains("read-only")));
    }
}
