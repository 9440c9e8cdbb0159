//! Containers: a process in new mount, pid, uts and ipc namespaces (and net and cgroup ones
//! when asked) whose root is a rootfs shared from the host over virtio-fs (tag
//! [`SHARED_FS_TAG`], mounted at [`GUEST_SHARED_DIR`]), in its own cgroup v2 group.
//!
//! A container is described by a [`ContainerConfig`] (built from the OCI spec or the flat
//! request fields, see `spec.rs`). Everything that can fail for a reason the caller should
//! hear about (bad id, missing rootfs, executable not found inside the rootfs, bad cwd, bind
//! sources outside the share, bad resources or seccomp profile) is checked before forking, with
//! the lookups done *inside* the rootfs (`openat2(RESOLVE_IN_ROOT)`, so absolute symlinks
//! resolve as they will in the container). The child then runs a precomputed list of steps
//! (`steps.rs`) with raw syscalls only (no allocation between fork and exec):
//!
//! 1. the pid namespace comes from a dedicated thread that called `unshare(CLONE_NEWPID)` before
//!    forking, so the container's first process is pid 1 of its namespace and the agent's other
//!    threads keep theirs;
//! 2. it joins its cgroup (writes `0` to the group's `cgroup.procs`, opened before the fork),
//!    then `unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC [| CLONE_NEWNET | CLONE_NEWCGROUP])`
//!    (with a new net namespace, `lo` is brought up), every mount made private;
//! 3. a tmpfs on [`STAGE_DIR`] (private to the container's mount namespace), the shared rootfs
//!    bind-mounted at `STAGE_DIR/root`, then the spec's mounts in order (mountpoints created as
//!    needed; a file mountpoint for a bind of a file), runc's default /dev nodes and symlinks,
//!    the rootfs remounted read-only when asked, the hostname set;
//! 4. `chroot(STAGE_DIR)` (the initramfs root cannot be pivoted away from, a tmpfs can),
//!    `pivot_root(".", ".")` into the rootfs and a lazy unmount of the old root: nothing of the
//!    agent's filesystem stays reachable;
//! 5. sysctls, read-only paths, masked paths; then the process steps (rlimits, capabilities,
//!    user, cwd, umask, no_new_privs, seccomp last), exec.
//!
//! An exec into a running container ([`exec_in`]) joins the first process's namespaces (pid
//! from a dedicated thread with `setns`, the others in the child, mnt last) and cgroup, chroots
//! into the first process's root (`/proc/<pid>/root`, opened before the fork: setns(mnt) alone
//! lands on the namespace's root, the guest's initramfs), then runs the same process steps.
//!
//! A failing step writes its index and errno to a close-on-exec pipe, so the error names the
//! step instead of only carrying an errno.

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

use crate::cgroup::{Cgroup, CgroupError};
use crate::exec::{self, parse_env, ExecError, Spawned, DEFAULT_PATH};
use crate::reaper::ProcTable;
use crate::seccomp::Filter;
use crate::spec::{is_clean_absolute, ContainerConfig, MountKind, ProcessConfig, SpecError, UserConfig, ALLOWED_GUEST_SOURCES};
use crate::steps::{cstr, last_cap, process_steps, run_op, Op, Step};

/// Directory on which each container's child mounts its private staging tmpfs. It sits on the
/// root mount itself (not below /run or another mount) so that the child can detach every
/// other mount of the agent before `pivot_root` (see [`agent_mounts`]).
pub const STAGE_DIR: &str = "/.joey-stage";
/// Longest hostname (HOST_NAME_MAX).
pub const MAX_HOSTNAME_LEN: usize = 64;
/// Bound on the fork/exec of a container (the setup touches the shared filesystem).
const SPAWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on killing what a failed start left in its cgroup.
const CGROUP_CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

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
    #[error("mount {index} ({destination}): bind source {source_path} not found: {reason}")]
    BindSourceMissing {
        index: usize,
        destination: String,
        source_path: String,
        reason: String,
    },
    #[error("mount {index} ({destination}): bind source {source_path} is outside the shared directory")]
    BindSourceOutside {
        index: usize,
        destination: String,
        source_path: String,
    },
    #[error("too many levels of symbolic links resolving {0:?} in the container rootfs")]
    SymlinkLoop(String),
    #[error("container resources need cgroup v2, which is not mounted at /sys/fs/cgroup")]
    NoCgroup,
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
    Spec(#[from] SpecError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Exec(#[from] ExecError),
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
    std::fs::create_dir_all(GUEST_SHARED_DIR).map_err(|e| err(errno_of(&e)))?;
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

/// Which pid namespace the child is born in.
enum PidNs {
    /// A new one: the child is its pid 1.
    New,
    /// The one of this fd (`/proc/<pid>/ns/pid` of a container's first process).
    Join(OwnedFd),
}

/// A started container: its first process and its cgroup.
#[derive(Debug)]
pub struct Started {
    pub spawned: Spawned,
    pub cgroup: Option<Cgroup>,
}

/// What an exec into a running container needs to know about it.
#[derive(Debug, Clone)]
pub struct Target {
    pub id: String,
    pub init_pid: i32,
    pub cgroup: Option<Cgroup>,
    pub seccomp: Option<Filter>,
}

/// Pushes a `Mkdir` for every ancestor of the in-container path `dir` (not `/`), and for
/// `dir` itself when `include_self`.
fn mkdir_all(steps: &mut Vec<Step>, root: &str, dir: &str, include_self: bool) -> Result<(), ContainerError> {
    let comps: Vec<&str> = dir.split('/').filter(|c| !c.is_empty()).collect();
    let n = if include_self { comps.len() } else { comps.len().saturating_sub(1) };
    let mut p = String::new();
    for c in &comps[..n] {
        p.push('/');
        p.push_str(c);
        steps.push(Step {
            what: format!("create directory {p} in the rootfs"),
            op: Op::Mkdir(cstr(&format!("{root}{p}"))?, 0o755),
        });
    }
    Ok(())
}

fn mount_op(
    src: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<Op, ContainerError> {
    Ok(Op::Mount {
        src: src.map(cstr).transpose()?,
        target: cstr(target)?,
        fstype: fstype.map(cstr).transpose()?,
        flags,
        data: data.filter(|d| !d.is_empty()).map(cstr).transpose()?,
    })
}

/// Most symlinks followed while resolving one path in the rootfs (Linux's MAXSYMLINKS).
const MAX_SYMLINKS: usize = 40;

/// Resolves `path` inside the directory `root` as the container will see it: symlinks are
/// followed within `root` (absolute targets start again at `root`, `..` stops at it) and the
/// part that does not exist is kept as written. Returns an absolute in-container path whose
/// existing part has no symlinks, so that the child, which mounts before `pivot_root`, never
/// follows a rootfs symlink out of the rootfs (runc's securejoin).
pub fn secure_join(root: &Path, path: &str) -> Result<String, ContainerError> {
    let mut todo: std::collections::VecDeque<String> =
        path.split('/').filter(|c| !c.is_empty()).map(str::to_string).collect();
    let mut resolved: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        match c.as_str() {
            "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let mut cand = root.to_path_buf();
        cand.extend(resolved.iter());
        cand.push(&c);
        match std::fs::symlink_metadata(&cand) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(ContainerError::SymlinkLoop(path.to_string()));
                }
                let target = std::fs::read_link(&cand).map_err(|e| ContainerError::Setup {
                    step: format!("readlink {}", cand.display()),
                    source: e,
                })?;
                let target = target.to_string_lossy();
                if target.starts_with('/') {
                    resolved.clear();
                }
                for t in target.split('/').filter(|t| !t.is_empty()).rev() {
                    todo.push_front(t.to_string());
                }
            }
            _ => resolved.push(c),
        }
    }
    Ok(format!("/{}", resolved.join("/")))
}

/// Pre-fork facts about the rootfs that the child's steps need.
#[derive(Debug, Clone)]
struct Layout {
    /// `file_binds[i]`: mount i binds a non-directory (it gets a file mountpoint).
    file_binds: Vec<bool>,
    /// Where the container's /dev is, in-container, symlinks resolved.
    dev_dir: String,
    /// The working directory to create when missing (symlinks resolved); `None`: "/".
    cwd_dir: Option<String>,
    /// The agent's mount points (parents first) that the child detaches before `pivot_root`.
    detach: Vec<String>,
}

/// Decodes the octal escapes (`\040`) of a /proc/self/mountinfo path.
fn unescape_mountinfo(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points of `mountinfo` other than `/` and the staging area, parents first. The
/// child detaches them in its own mount namespace before `pivot_root`: the namespace's root
/// (the guest's initramfs, which cannot be pivoted away) then holds nothing but the initramfs
/// files, so even a process that leaves its root with a chroot trick finds no guest /proc,
/// no /dev and no other container's rootfs under /run/joey/shared.
fn agent_mounts(mountinfo: &str) -> Vec<String> {
    let mut v: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| m != "/" && m != STAGE_DIR && !m.starts_with(&format!("{STAGE_DIR}/")))
        .collect();
    v.sort_by_key(|m| (m.matches('/').count(), m.clone()));
    v.dedup();
    v
}

/// The child's setup steps for `c` (validated; mount destinations already resolved with
/// [`secure_join`]; `cgroup_fd`: its group's cgroup.procs).
fn plan(
    c: &ContainerConfig,
    hostname: &str,
    cwd: &str,
    layout: &Layout,
    cgroup_fd: Option<RawFd>,
    last_cap: u32,
) -> Result<Vec<Step>, ContainerError> {
    let root = format!("{STAGE_DIR}/root");
    let at = |p: &str| format!("{root}{p}");
    let mut steps = Vec::new();
    let push = |steps: &mut Vec<Step>, what: String, op: Op| steps.push(Step { what, op });

    if let Some(fd) = cgroup_fd {
        push(&mut steps, "join the container's cgroup".into(), Op::WriteFd(fd, b"0"));
    }
    let mut ns = libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if c.new_net_ns {
        ns |= libc::CLONE_NEWNET;
    }
    if c.new_cgroup_ns {
        ns |= libc::CLONE_NEWCGROUP;
    }
    push(&mut steps, "unshare the container's namespaces".into(), Op::Unshare(ns));
    if c.new_net_ns {
        push(&mut steps, "bring up lo".into(), Op::LoopbackUp);
    }
    push(&mut steps, "umask".into(), Op::Umask(0));
    push(
        &mut steps,
        "make mounts private".into(),
        mount_op(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)?,
    );
    push(
        &mut steps,
        format!("mount staging tmpfs on {STAGE_DIR}"),
        mount_op(Some("tmpfs"), STAGE_DIR, Some("tmpfs"), libc::MS_NOSUID | libc::MS_NODEV, Some("mode=0755"))?,
    );
    push(&mut steps, "create the rootfs mountpoint".into(), Op::Mkdir(cstr(&root)?, 0o755));
    push(
        &mut steps,
        format!("bind-mount rootfs {}", c.root),
        mount_op(Some(&c.root), &root, None, libc::MS_BIND | libc::MS_REC, None)?,
    );
    for (i, m) in c.mounts.iter().enumerate() {
        let dest = &m.destination;
        let target = at(dest);
        let is_file = layout.file_binds.get(i).copied().unwrap_or(false);
        mkdir_all(&mut steps, &root, dest, !is_file)?;
        if is_file {
            push(&mut steps, format!("create mountpoint file {dest}"), Op::CreateFile(cstr(&target)?));
        }
        match &m.kind {
            MountKind::Bind { source, recursive } => {
                let rec = if *recursive { libc::MS_REC } else { 0 };
                push(
                    &mut steps,
                    format!("mount {i}: bind {source} on {dest}"),
                    mount_op(Some(source), &target, None, libc::MS_BIND | rec, None)?,
                );
                if m.flags != 0 {
                    push(
                        &mut steps,
                        format!("mount {i}: remount {dest} with its options"),
                        mount_op(None, &target, None, libc::MS_BIND | libc::MS_REMOUNT | rec | m.flags, None)?,
                    );
                }
            }
            MountKind::Fs { fstype, source } => push(
                &mut steps,
                format!("mount {i}: {fstype} on {dest}"),
                mount_op(Some(source), &target, Some(fstype), m.flags, Some(&m.data))?,
            ),
        }
        if m.propagation != 0 {
            push(
                &mut steps,
                format!("mount {i}: propagation of {dest}"),
                mount_op(None, &target, None, m.propagation, None)?,
            );
        }
    }
    if c.dev_nodes {
        let dev = layout.dev_dir.trim_end_matches('/');
        let at = |p: &str| format!("{root}{dev}{}", p.strip_prefix("/dev").unwrap_or(p));
        mkdir_all(&mut steps, &root, dev, true)?;
        for (name, major, minor) in [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)] {
            push(
                &mut steps,
                format!("create /dev/{name}"),
                Op::Mknod(cstr(&at(&format!("/dev/{name}")))?, libc::S_IFCHR | 0o666, libc::makedev(major, minor)),
            );
        }
        for (link, target) in [
            ("/dev/ptmx", "pts/ptmx"),
            ("/dev/fd", "/proc/self/fd"),
            ("/dev/stdin", "/proc/self/fd/0"),
            ("/dev/stdout", "/proc/self/fd/1"),
            ("/dev/stderr", "/proc/self/fd/2"),
        ] {
            push(
                &mut steps,
                format!("create {link}"),
                Op::Symlink {
                    target: cstr(target)?,
                    link: cstr(&at(link))?,
                },
            );
        }
    }
    if let Some(dir) = &layout.cwd_dir {
        mkdir_all(&mut steps, &root, dir, true)?;
    }
    if c.readonly_root {
        push(
            &mut steps,
            "remount the rootfs read-only".into(),
            mount_op(None, &root, None, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NODEV, None)?,
        );
    }
    push(&mut steps, format!("set hostname {hostname}"), Op::Sethostname(cstr(hostname)?));
    for m in &layout.detach {
        push(&mut steps, format!("detach the agent's mount {m}"), Op::Detach(cstr(m)?));
    }
    push(
        &mut steps,
        "make the guest root read-only".into(),
        mount_op(None, "/", None, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY, None)?,
    );
    push(&mut steps, format!("chroot {STAGE_DIR}"), Op::Chroot(cstr(STAGE_DIR)?));
    push(&mut steps, "chdir /root".into(), Op::Chdir(cstr("/root")?));
    push(&mut steps, "pivot_root into the rootfs".into(), Op::PivotRootHere);
    push(&mut steps, "detach the old root".into(), Op::DetachHere);
    for (k, v) in &c.sysctl {
        let path = format!("/proc/sys/{}", k.replace('.', "/"));
        push(&mut steps, format!("sysctl {k}={v}"), Op::WriteFile(cstr(&path)?, cstr(v)?));
    }
    for p in &c.readonly_paths {
        push(&mut steps, format!("readonly path {p}"), Op::ReadonlyPath(cstr(p)?));
    }
    for p in &c.masked_paths {
        push(&mut steps, format!("mask path {p}"), Op::MaskPath(cstr(p)?));
    }
    steps.extend(process_steps(&c.process, cwd, c.seccomp.as_ref(), last_cap)?);
    Ok(steps)
}

fn errno_of(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Canonicalises the bind sources (symlinks inside the share must not lead out of it) and
/// says which ones are not directories (they get a file mountpoint).
fn resolve_binds(c: &mut ContainerConfig, shared_dir: &str) -> Result<Vec<bool>, ContainerError> {
    let mut files = Vec::with_capacity(c.mounts.len());
    for (i, m) in c.mounts.iter_mut().enumerate() {
        let MountKind::Bind { source, .. } = &mut m.kind else {
            files.push(false);
            continue;
        };
        let real = std::fs::canonicalize(&*source).map_err(|e| ContainerError::BindSourceMissing {
            index: i,
            destination: m.destination.clone(),
            source_path: source.clone(),
            reason: e.to_string(),
        })?;
        let real_s = real.to_string_lossy().into_owned();
        let inside = real.strip_prefix(shared_dir).is_ok_and(|r| r.components().next().is_some());
        if !inside && !ALLOWED_GUEST_SOURCES.contains(&real_s.as_str()) {
            return Err(ContainerError::BindSourceOutside {
                index: i,
                destination: m.destination.clone(),
                source_path: format!("{source} (resolves to {real_s})"),
            });
        }
        let is_dir = std::fs::metadata(&real).map(|m| m.is_dir()).unwrap_or(false);
        *source = real_s;
        files.push(!is_dir);
    }
    Ok(files)
}

/// True when an in-container path may be provided by a mount (not visible in the rootfs
/// before the child mounts it).
fn covered_by_mount(c: &ContainerConfig, path: &str) -> bool {
    c.mounts.iter().any(|m| {
        !is_system_dest(&m.destination) && (path == m.destination || path.starts_with(&format!("{}/", m.destination)))
    })
}

/// /dev, /proc, /sys and below: mounts that never hold a program or a working directory.
fn is_system_dest(d: &str) -> bool {
    ["/dev", "/proc", "/sys"]
        .iter()
        .any(|s| d == *s || d.strip_prefix(s).is_some_and(|r| r.starts_with('/')))
}

/// Validates `c`, creates its cgroup, then starts the container's first process (blocking:
/// call it from a blocking context). `mount_shared`: mount the virtio-fs share first (PID 1 in
/// the guest). `cgroup_root`: the cgroup2 mount (None: no cgroup, only allowed without
/// resources).
pub fn spawn(
    table: Arc<ProcTable>,
    c: &ContainerConfig,
    shared_dir: &str,
    mount_shared: bool,
    cgroup_root: Option<&Path>,
) -> Result<Started, ContainerError> {
    validate_id(&c.id)?;
    let hostname = if c.hostname.is_empty() { c.id.clone() } else { c.hostname.clone() };
    validate_hostname(&hostname)?;
    validate_rootfs(&c.root, shared_dir)?;
    let p = &c.process;
    let program = p.args.first().ok_or(ExecError::EmptyArgv)?.clone();
    if p.args.iter().any(|a| a.contains('\0')) {
        return Err(ExecError::NulByte { what: "argv" }.into());
    }
    let env = parse_env(&p.env)?;
    let cwd = if p.cwd.is_empty() { "/".to_string() } else { p.cwd.clone() };
    if !is_clean_absolute(&cwd) {
        return Err(ContainerError::InvalidCwd(cwd));
    }
    if mount_shared {
        ensure_shared_mounted()?;
    }

    let root = match std::fs::metadata(&c.root) {
        Ok(m) if m.is_dir() => nix::fcntl::open(
            c.root.as_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| ContainerError::OpenRootfs {
            path: c.root.clone(),
            source,
        })?,
        _ => return Err(ContainerError::RootfsNotFound(c.root.clone())),
    };
    // SAFETY: open just returned this fd and nothing else owns it.
    let root = unsafe { OwnedFd::from_raw_fd(root) };
    if !covered_by_mount(c, &cwd) {
        match stat_in_root(root.as_raw_fd(), &cwd) {
            Ok(st) if is_dir(&st) => {}
            // Created by the child (like runc) when missing; a non-directory is an error.
            Err(Errno::ENOENT) if c.process.user.is_some() => {}
            _ => return Err(ContainerError::InvalidCwd(cwd)),
        }
    }
    let path_var = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    let env = with_home(env, root.as_raw_fd(), p.user.as_ref());
    let program_path = match resolve_in_rootfs(root.as_raw_fd(), &program, &path_var, &cwd) {
        Ok(p) => p,
        // May come from a mount: let execvp in the child search PATH.
        Err(ContainerError::ExecutableNotFound(_)) if c.mounts.iter().any(|m| !is_system_dest(&m.destination)) => {
            program.clone()
        }
        Err(e) => return Err(e),
    };
    drop(root);

    let mut c = c.clone();
    let file_binds = resolve_binds(&mut c, shared_dir)?;
    let root_dir = Path::new(&c.root);
    for m in c.mounts.iter_mut() {
        m.destination = secure_join(root_dir, &m.destination)?;
    }
    let layout = Layout {
        file_binds,
        dev_dir: secure_join(root_dir, "/dev")?,
        cwd_dir: if cwd == "/" { None } else { Some(secure_join(root_dir, &cwd)?) },
        detach: agent_mounts(&std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
            ContainerError::Setup {
                step: "read /proc/self/mountinfo".into(),
                source,
            }
        })?),
    };

    std::fs::create_dir_all(STAGE_DIR).map_err(|source| ContainerError::Setup {
        step: format!("create {STAGE_DIR}"),
        source,
    })?;
    let cgroup = match cgroup_root {
        Some(r) => Some(Cgroup::create(r, &c.id)?),
        None if c.resources.is_some() => return Err(ContainerError::NoCgroup),
        None => None,
    };
    let result = (|| {
        let procs = match &cgroup {
            Some(cg) => {
                if let Some(r) = &c.resources {
                    cg.apply(r)?;
                }
                Some(cg.open_procs()?)
            }
            None => None,
        };
        let steps = plan(&c, &hostname, &cwd, &layout, procs.as_ref().map(|f| f.as_raw_fd()), last_cap())?;
        let cmd = command(&program_path, &program, &p.args, &env);
        spawn_with_steps(table, PidNs::New, program.clone(), cmd, p.terminal, steps, procs.into_iter().collect())
    })();
    match result {
        Ok(spawned) => Ok(Started { spawned, cgroup }),
        Err(e) => {
            if let Some(cg) = &cgroup {
                if let Err(ce) = cg.kill_and_remove(CGROUP_CLEANUP_TIMEOUT) {
                    agent_log!("container {}: cleaning up its cgroup: {ce}", c.id);
                }
            }
            Err(e)
        }
    }
}

/// Largest /etc/passwd read to find a home directory.
const MAX_PASSWD_BYTES: u64 = 1 << 20;

/// The home directory of `uid` in the rootfs open at `root` (its /etc/passwd, resolved inside
/// the rootfs), or "/" when there is no such file or entry: what runc gives a process whose
/// environment has no HOME.
fn home_in_rootfs(root: RawFd, uid: u32) -> String {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT);
    let Ok(fd) = openat2(root, "/etc/passwd", how) else {
        return "/".into();
    };
    // SAFETY: openat2 just returned this fd and nothing else owns it.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut text = String::new();
    use std::io::Read as _;
    if !file.metadata().is_ok_and(|m| m.is_file()) || file.take(MAX_PASSWD_BYTES).read_to_string(&mut text).is_err() {
        return "/".into();
    }
    home_from_passwd(&text, uid).unwrap_or_else(|| "/".into())
}

/// The home field of the first `name:pw:uid:gid:gecos:home:shell` line with this uid.
fn home_from_passwd(text: &str, uid: u32) -> Option<String> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[2].parse() == Ok(uid) && !f[5].is_empty()).then(|| f[5].to_string())
    })
}

/// Adds HOME (from the rootfs's /etc/passwd) when `env` has none, as runc does.
fn with_home(mut env: Vec<(String, String)>, root: RawFd, user: Option<&UserConfig>) -> Vec<(String, String)> {
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), home_in_rootfs(root, user.map_or(0, |u| u.uid))));
    }
    env
}

/// The Command for `program_path` (argv[0] = `program`) with exactly `env` (plus a default PATH).
fn command(program_path: &str, program: &str, args: &[String], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(program_path);
    cmd.arg0(program).args(&args[1..]).env_clear();
    if !env.iter().any(|(k, _)| k == "PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

fn open_ns(t: &Target, ns: &str) -> Result<OwnedFd, ContainerError> {
    let path = format!("/proc/{}/ns/{ns}", t.init_pid);
    let f = std::fs::File::open(&path).map_err(|e| ContainerError::Setup {
        step: format!("open {path} of container {}", t.id),
        source: e,
    })?;
    Ok(f.into())
}

/// Starts `p` inside the running container `t`: its namespaces (pid through a dedicated
/// thread, then ipc, uts, net, cgroup and mnt last in the child), its cgroup, and the same
/// identity steps as its first process got (`p`'s user, rlimits, capabilities,
/// no_new_privs; the container's seccomp filter). Blocking.
pub fn exec_in(table: Arc<ProcTable>, t: &Target, p: &ProcessConfig) -> Result<Spawned, ContainerError> {
    let program = p.args.first().ok_or(ExecError::EmptyArgv)?.clone();
    if p.args.iter().any(|a| a.contains('\0')) {
        return Err(ExecError::NulByte { what: "argv" }.into());
    }
    let env = parse_env(&p.env)?;
    let cwd = if p.cwd.is_empty() { "/".to_string() } else { p.cwd.clone() };
    if !is_clean_absolute(&cwd) {
        return Err(ContainerError::InvalidCwd(cwd));
    }
    // The container's root as its first process sees it (its mount namespace).
    let root_path = format!("/proc/{}/root", t.init_pid);
    let root = nix::fcntl::open(root_path.as_str(), OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|source| ContainerError::OpenRootfs { path: root_path, source })?;
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
    let program_path = resolve_in_rootfs(root.as_raw_fd(), &program, &path_var, &cwd)?;
    let env = with_home(env, root.as_raw_fd(), p.user.as_ref());

    let mut keep = Vec::new();
    let mut steps = Vec::new();
    if let Some(cg) = &t.cgroup {
        let fd = cg.open_procs()?;
        steps.push(Step {
            what: "join the container's cgroup".into(),
            op: Op::WriteFd(fd.as_raw_fd(), b"0"),
        });
        keep.push(fd);
    }
    for (ns, flag) in [
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("cgroup", libc::CLONE_NEWCGROUP),
        ("mnt", libc::CLONE_NEWNS),
    ] {
        let fd = open_ns(t, ns)?;
        steps.push(Step {
            what: format!("join the container's {ns} namespace"),
            op: Op::Setns(fd.as_raw_fd(), flag),
        });
        keep.push(fd);
    }
    // setns(mnt) put us at the namespace's root, which is the guest's initramfs (it cannot be
    // pivoted away); the container's root is where its first process has it.
    steps.push(Step {
        what: "enter the container's root".into(),
        op: Op::Fchdir(root.as_raw_fd()),
    });
    steps.push(Step {
        what: "chroot into the container's root".into(),
        op: Op::Chroot(cstr(".")?),
    });
    keep.push(root);
    steps.extend(process_steps(p, &cwd, t.seccomp.as_ref(), last_cap())?);
    let pidns = open_ns(t, "pid")?;
    let cmd = command(&program_path, &program, &p.args, &env);
    spawn_with_steps(table, PidNs::Join(pidns), program, cmd, p.terminal, steps, keep)
}

/// Forks `cmd` from a thread in the right pid namespace; the child runs `steps`, then execs.
/// A failing step is reported by name. `keep`: fds the steps use, closed after the fork.
fn spawn_with_steps(
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
                    // No step failed: exec itself did.
                    _ => Err(match e {
                        ExecError::Spawn { program, source } if source.kind() == io::ErrorKind::NotFound => {
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
fn spawn_on_pid_thread<F>(table: Arc<ProcTable>, pidns: PidNs, f: F) -> Result<Spawned, ContainerError>
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
                    PidNs::New => (libc::unshare(libc::CLONE_NEWPID), "unshare the pid namespace"),
                    PidNs::Join(fd) => (libc::setns(fd.as_raw_fd(), libc::CLONE_NEWPID), "join the container's pid namespace"),
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
    fn home_comes_from_the_rootfs_passwd() {
        let text = "root:x:0:0:root:/root:/bin/sh\nbroken line\nnobody:x:65534:65534::/nonexistent:/bin/false\nu:x:1000:1000::/home/u:/bin/sh\n";
        assert_eq!(home_from_passwd(text, 0).as_deref(), Some("/root"));
        assert_eq!(home_from_passwd(text, 1000).as_deref(), Some("/home/u"));
        assert_eq!(home_from_passwd(text, 7), None);
        let d = tempfile::tempdir().expect("tempdir");
        let root = nix::fcntl::open(d.path(), OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()).expect("open");
        // SAFETY: fresh fd from open.
        let root = unsafe { OwnedFd::from_raw_fd(root) };
        // No /etc/passwd: "/".
        assert_eq!(home_in_rootfs(root.as_raw_fd(), 0), "/");
        std::fs::create_dir(d.path().join("etc")).expect("mkdir");
        std::fs::write(d.path().join("etc/passwd"), text).expect("write");
        assert_eq!(home_in_rootfs(root.as_raw_fd(), 1000), "/home/u");
        let env = with_home(vec![("A".into(), "b".into())], root.as_raw_fd(), None);
        assert_eq!(env, vec![("A".into(), "b".into()), ("HOME".into(), "/root".into())]);
        let env = with_home(vec![("HOME".into(), "/x".into())], root.as_raw_fd(), None);
        assert_eq!(env, vec![("HOME".into(), "/x".into())]);
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

    fn layout(file_binds: &[bool]) -> Layout {
        Layout {
            file_binds: file_binds.to_vec(),
            dev_dir: "/dev".into(),
            cwd_dir: None,
            detach: vec!["/run".into()],
        }
    }

    #[test]
    fn agent_mounts_parents_first_without_root_and_stage() {
        let mi = "22 1 0:5 / / rw - rootfs rootfs rw
23 22 0:20 / /proc rw - proc proc rw
24 22 0:21 / /run rw - tmpfs tmpfs rw
25 24 0:22 / /run/joey/shared rw - virtiofs joeyfs rw
26 22 0:23 / /sys rw - sysfs sysfs rw
27 26 0:24 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
28 22 0:25 / /.joey-stage rw - tmpfs tmpfs rw
29 28 0:26 / /.joey-stage/root rw - virtiofs joeyfs rw
30 22 0:27 / /my\\040dir rw - tmpfs tmpfs rw
";
        assert_eq!(
            agent_mounts(mi),
            vec!["/my dir", "/proc", "/run", "/sys", "/run/joey/shared", "/sys/fs/cgroup"]
        );
    }

    #[test]
    fn secure_join_stays_in_the_rootfs() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("run/systemd")).unwrap();
        std::fs::create_dir_all(r.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/run", r.join("var-run")).unwrap();
        std::os::unix::fs::symlink("../run/systemd/stub.conf", r.join("usr/resolv.conf")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", r.join("usr/lib/up")).unwrap();
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        assert_eq!(secure_join(r, "/var-run/secrets/token").unwrap(), "/run/secrets/token");
        // A dangling symlink resolves to where its target would be.
        assert_eq!(secure_join(r, "/usr/resolv.conf").unwrap(), "/run/systemd/stub.conf");
        // `..` (written or in a link) stops at the root.
        assert_eq!(secure_join(r, "/usr/lib/up/shadow").unwrap(), "/etc/shadow");
        assert_eq!(secure_join(r, "/../../x/./y").unwrap(), "/x/y");
        assert_eq!(secure_join(r, "/").unwrap(), "/");
        assert!(matches!(secure_join(r, "/loop/x"), Err(ContainerError::SymlinkLoop(_))));
    }

    fn flat(readonly: bool) -> ContainerConfig {
        crate::spec::from_flat(crate::spec::FlatContainer {
            id: "c1".into(),
            rootfs: "/run/joey/shared/c1/rootfs".into(),
            argv: vec!["sh".into()],
            readonly_rootfs: readonly,
            ..Default::default()
        })
    }

    #[test]
    fn plan_ends_in_the_rootfs() {
        let steps = plan(&flat(true), "c1", "/", &layout(&[false; 5]), Some(7), 40).unwrap();
        let names: Vec<&str> = steps.iter().map(|s| s.what.as_str()).collect();
        let pos = |n: &str| names.iter().position(|x| x.starts_with(n)).unwrap_or_else(|| panic!("{n}"));
        assert_eq!(pos("join the container's cgroup"), 0);
        assert_eq!(pos("unshare"), 1);
        assert!(pos("bind-mount rootfs") < pos("mount 0: proc on /proc"));
        assert!(pos("mount 2: tmpfs on /dev") < pos("mount 3: devpts on /dev/pts"));
        assert!(pos("mount 3: devpts on /dev/pts") < pos("create /dev/null"));
        assert!(pos("create /dev/ptmx") < pos("remount the rootfs read-only"));
        assert!(pos("remount the rootfs read-only") < pos("detach the agent's mount /run"));
        assert!(pos("detach the agent's mount /run") < pos("make the guest root read-only"));
        assert!(pos("make the guest root read-only") < pos("chroot"));
        assert!(pos("chroot") < pos("pivot_root"));
        assert!(pos("pivot_root") < pos("detach the old root"));
        assert_eq!(names[names.len() - 2..], ["chdir /", "umask 22"]);
        assert!(!plan(&flat(false), "c1", "/", &layout(&[]), None, 40).unwrap().iter().any(|s| s.what == "remount the rootfs read-only"));
    }

    #[test]
    fn plan_of_an_oci_spec() {
        let json = r#"{"ociVersion":"1.1.0","root":{"path":"/run/joey/shared/c1/rootfs"},
            "process":{"user":{"uid":1000,"gid":1000},"args":["sh"],"cwd":"/work","noNewPrivileges":true},
            "mounts":[{"destination":"/etc/hosts","type":"bind","source":"/run/joey/shared/c1/hosts","options":["rbind","ro","rprivate"]},
                      {"destination":"/data/cache","type":"tmpfs","source":"tmpfs","options":["size=1m"]}],
            "linux":{"namespaces":[{"type":"network"}],"maskedPaths":["/proc/kcore"],"readonlyPaths":["/proc/sys"],
                     "sysctl":{"net.ipv4.ip_forward":"1"}}}"#;
        let c = crate::spec::from_oci_json("c1", json, "/run/joey/shared").unwrap();
        let mut l = layout(&[false, true, false]);
        l.cwd_dir = Some("/work".into());
        let steps = plan(&c, "c1", "/work", &l, None, 40).unwrap();
        let names: Vec<&str> = steps.iter().map(|s| s.what.as_str()).collect();
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap_or_else(|| panic!("{n}: {names:#?}"));
        assert_eq!(names[..2], ["unshare the container's namespaces", "bring up lo"]);
        assert!(pos("create directory /etc in the rootfs") < pos("create mountpoint file /etc/hosts"));
        assert!(pos("create mountpoint file /etc/hosts") < pos("mount 1: bind /run/joey/shared/c1/hosts on /etc/hosts"));
        assert!(pos("mount 1: bind /run/joey/shared/c1/hosts on /etc/hosts") < pos("mount 1: remount /etc/hosts with its options"));
        assert!(pos("mount 1: remount /etc/hosts with its options") < pos("mount 1: propagation of /etc/hosts"));
        assert!(pos("create directory /data in the rootfs") < pos("create directory /data/cache in the rootfs"));
        assert!(pos("create directory /work in the rootfs") < pos("pivot_root into the rootfs"));
        assert!(pos("detach the old root") < pos("sysctl net.ipv4.ip_forward=1"));
        assert!(pos("sysctl net.ipv4.ip_forward=1") < pos("readonly path /proc/sys"));
        assert!(pos("readonly path /proc/sys") < pos("mask path /proc/kcore"));
        assert!(pos("mask path /proc/kcore") < pos("setuid 1000"));
        assert_eq!(names.last(), Some(&"set no_new_privs"));
        match &steps[pos("mount 2: tmpfs on /data/cache")].op {
            Op::Mount { data, fstype, .. } => {
                assert_eq!(data.as_deref(), Some(c"size=1m"));
                assert_eq!(fstype.as_deref(), Some(c"tmpfs"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn system_destinations() {
        assert!(is_system_dest("/dev") && is_system_dest("/dev/shm") && is_system_dest("/proc"));
        assert!(!is_system_dest("/device") && !is_system_dest("/data"));
    }
}
