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
//!    then `unshare(CLONE_NEWNS [| CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWCGROUP])`
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
//!
//! Files: this one starts containers and execs ([`spawn`], [`exec_in`]); `rootfs.rs` holds the
//! checks and lookups done before forking; `plan.rs` builds the first process's setup steps;
//! `spawn.rs` forks from the pid-namespace thread and reports a failing step.

mod plan;
mod rootfs;
mod spawn;

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use joey_agent_protocol::{GUEST_SHARED_DIR, SHARED_FS_TAG};
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

use crate::cgroup::{Cgroup, CgroupError};
use crate::exec::{ExecError, Spawned};
use crate::reaper::ProcTable;
use crate::seccomp::Filter;
use crate::spec::{ContainerConfig, ProcessConfig, SpecError};
use crate::steps::{cstr, last_cap, process_steps, Op, Step};
use plan::{agent_mounts, plan, Layout};
use rootfs::{
    covered_by_mount, is_dir, is_system_dest, open_dir, path_var, resolve_binds, stat_in_root,
    validate_hostname, with_home, ProcessArgs,
};
pub use rootfs::{resolve_in_rootfs, secure_join, validate_id, validate_rootfs};
use spawn::{command, open_ns, spawn_with_steps, PidNs};

/// Directory on which each container's child mounts its private staging tmpfs. It sits on the
/// root mount itself (not below /run or another mount) so that the child can detach every
/// other mount of the agent before `pivot_root` (see [`agent_mounts`]).
pub const STAGE_DIR: &str = "/.joey-stage";
/// Bound on killing what a failed start left in its cgroup.
const CGROUP_CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(
        "invalid container id {0:?}: expected 1 to 64 of [A-Za-z0-9_.-], starting alphanumeric"
    )]
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
    #[error(
        "mount {index} ({destination}): bind source {source_path} is outside the shared directory"
    )]
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

fn errno_of(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
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
    // A new UTS namespace is named after the container unless the spec names it; a shared one
    // (a CRI pod's) keeps its name unless the spec gives one.
    let hostname = if c.hostname.is_empty() && c.new_uts_ns {
        c.id.clone()
    } else {
        c.hostname.clone()
    };
    if !hostname.is_empty() {
        validate_hostname(&hostname)?;
    }
    validate_rootfs(&c.root, shared_dir)?;
    let p = &c.process;
    let ProcessArgs { program, env, cwd } = ProcessArgs::check(p)?;
    if mount_shared {
        ensure_shared_mounted()?;
    }

    let root = match std::fs::metadata(&c.root) {
        Ok(m) if m.is_dir() => open_dir(&c.root)?,
        // The share failing (EIO from virtio-fs) is not a missing rootfs: say what it is.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ContainerError::OpenRootfs {
                path: c.root.clone(),
                source: errno_of(&e),
            })
        }
        _ => return Err(ContainerError::RootfsNotFound(c.root.clone())),
    };
    if !covered_by_mount(c, &cwd) {
        match stat_in_root(root.as_raw_fd(), &cwd) {
            Ok(st) if is_dir(&st) => {}
            // Created by the child (like runc) when missing; a non-directory is an error.
            Err(Errno::ENOENT) if c.process.user.is_some() => {}
            _ => return Err(ContainerError::InvalidCwd(cwd)),
        }
    }
    let path_var = path_var(&env);
    let env = with_home(env, root.as_raw_fd(), p.user.as_ref());
    let program_path = match resolve_in_rootfs(root.as_raw_fd(), &program, &path_var, &cwd) {
        Ok(p) => p,
        // May come from a mount: let execvp in the child search PATH.
        Err(ContainerError::ExecutableNotFound(_))
            if c.mounts.iter().any(|m| !is_system_dest(&m.destination)) =>
        {
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
        cwd_dir: if cwd == "/" {
            None
        } else {
            Some(secure_join(root_dir, &cwd)?)
        },
        detach: agent_mounts(&std::fs::read_to_string("/proc/self/mountinfo").map_err(
            |source| ContainerError::Setup {
                step: "read /proc/self/mountinfo".into(),
                source,
            },
        )?),
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
        let steps = plan(
            &c,
            &hostname,
            &cwd,
            &layout,
            procs.as_ref().map(|f| f.as_raw_fd()),
            last_cap(),
        )?;
        let cmd = command(&program_path, &program, &p.args, &env);
        spawn_with_steps(
            table,
            PidNs::New,
            program.clone(),
            cmd,
            p.terminal,
            steps,
            procs.into_iter().collect(),
        )
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

/// Starts `p` inside the running container `t`: its namespaces (pid through a dedicated
/// thread, then ipc, uts, net, cgroup and mnt last in the child), its cgroup, and the same
/// identity steps as its first process got (`p`'s user, rlimits, capabilities,
/// no_new_privs; the container's seccomp filter). Blocking.
pub fn exec_in(
    table: Arc<ProcTable>,
    t: &Target,
    p: &ProcessConfig,
) -> Result<Spawned, ContainerError> {
    let ProcessArgs { program, env, cwd } = ProcessArgs::check(p)?;
    // The container's root as its first process sees it (its mount namespace).
    let root = open_dir(&format!("/proc/{}/root", t.init_pid))?;
    match stat_in_root(root.as_raw_fd(), &cwd) {
        Ok(st) if is_dir(&st) => {}
        _ => return Err(ContainerError::InvalidCwd(cwd)),
    }
    let path_var = path_var(&env);
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
    spawn_with_steps(
        table,
        PidNs::Join(pidns),
        program,
        cmd,
        p.terminal,
        steps,
        keep,
    )
}
