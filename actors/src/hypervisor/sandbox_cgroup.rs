//! The sandbox cgroup: QEMU runs in `joey/<sandbox id>` under the host's memory and pids
//! controllers (cgroup v2: one directory with both; v1: one directory per controller), with
//! limits derived from the sandbox's size, so a guest that takes its QEMU over cannot take more
//! of the host than its size allows (docs/security.md). The shim's serving process, which runs
//! the sandbox's vhost-user device threads, joins it too ([`set_runtime_joins`], Kata's
//! `sandbox_cgroup_only`) and leaves it again before it is removed.
//!
//! Blocking (cgroupfs reads and writes): async callers run it on the blocking pool.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Where the host's cgroup file systems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// joey's cgroup under each controller; sandboxes are its children.
pub const PARENT: &str = "joey";
/// Memory the VMM process may use beyond the guest's RAM: QEMU's own heap, TCG's translation
/// cache, device and I/O buffers.
pub const VMM_OVERHEAD_MIB: u64 = 512;
/// Tasks (threads) QEMU may have besides two per vCPU: its I/O thread pool tops out at 64
/// workers, plus the main loop, RCU and the helpers.
pub const PIDS_BASE: u64 = 128;
/// Memory the runtime process adds when it joins (the shim: its heap, the device threads'
/// buffers; the page cache its virtio-fs device fills is charged too, and reclaimable).
pub const RUNTIME_OVERHEAD_MIB: u64 = 128;
/// Tasks the runtime process adds when it joins: its threads (actix, the blocking pool, the
/// device threads) and its binary loggers.
pub const RUNTIME_PIDS: u64 = 128;

/// Whether this process joins the sandbox cgroups it creates (the shim's serving process,
/// which serves one sandbox; not `joeyctl run`, a user's command, nor `joey-pool`, which
/// serves many VMs).
static RUNTIME_JOINS: AtomicBool = AtomicBool::new(false);

/// Makes this process join each sandbox cgroup it creates (see [`RUNTIME_JOINS`]).
pub fn set_runtime_joins(on: bool) {
    RUNTIME_JOINS.store(on, Ordering::Relaxed);
}

/// Whether [`set_runtime_joins`] is on.
pub fn runtime_joins() -> bool {
    RUNTIME_JOINS.load(Ordering::Relaxed)
}

/// Why the sandbox cgroup could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy with the memory and pids controllers, nor cgroup v1 memory and pids hierarchies, under {}", .0.display())]
    NoHierarchy(PathBuf),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
}

impl Limits {
    /// The guest's memory plus [`VMM_OVERHEAD_MIB`]; [`PIDS_BASE`] plus two per vCPU.
    pub fn for_size(memory_mib: u32, vcpus: u32) -> Limits {
        Limits {
            memory_bytes: (u64::from(memory_mib) + VMM_OVERHEAD_MIB) << 20,
            pids: PIDS_BASE + 2 * u64::from(vcpus),
        }
    }

    /// These limits with the runtime process in the cgroup too: plus
    /// [`RUNTIME_OVERHEAD_MIB`] and [`RUNTIME_PIDS`].
    pub fn with_runtime(self) -> Limits {
        Limits {
            memory_bytes: self.memory_bytes + (RUNTIME_OVERHEAD_MIB << 20),
            pids: self.pids + RUNTIME_PIDS,
        }
    }
}

/// Which cgroup version the host runs, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    V2(PathBuf),
    V1 { memory: PathBuf, pids: PathBuf },
}

fn detect(root: &Path) -> Result<Layout, CgroupError> {
    if let Ok(c) = std::fs::read_to_string(root.join("cgroup.controllers")) {
        let has = |name: &str| c.split_whitespace().any(|x| x == name);
        if has("memory") && has("pids") {
            return Ok(Layout::V2(root.to_path_buf()));
        }
    }
    let (memory, pids) = (root.join("memory"), root.join("pids"));
    if memory.join("cgroup.procs").exists() && pids.join("cgroup.procs").exists() {
        return Ok(Layout::V1 { memory, pids });
    }
    Err(CgroupError::NoHierarchy(root.to_path_buf()))
}

/// The directories of sandbox `id` under `root` (whether or not they exist).
fn dirs_of(layout: &Layout, id: &str) -> Vec<PathBuf> {
    match layout {
        Layout::V2(root) => vec![root.join(PARENT).join(id)],
        Layout::V1 { memory, pids } => {
            vec![memory.join(PARENT).join(id), pids.join(PARENT).join(id)]
        }
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_err("write", path))
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_err("create", path)(e)),
        _ => Ok(()),
    }
}

/// Removes `dir` if it exists (it must hold no process).
fn rmdir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", dir)(e)),
        _ => Ok(()),
    }
}

/// A sandbox cgroup with its limits written; [`SandboxCgroup::remove`] deletes it once its
/// processes have exited.
#[derive(Debug)]
pub struct SandboxCgroup {
    /// Where the hierarchies are mounted ([`CGROUP_ROOT`]).
    root: PathBuf,
    dirs: Vec<PathBuf>,
    /// `<dir>/cgroup.procs` of each directory, for a child to join between fork and exec.
    procs: Vec<CString>,
}

impl SandboxCgroup {
    /// Creates (or takes over) `joey/<id>` under the host's cgroups with `limits`.
    pub fn create(id: &str, limits: Limits) -> Result<SandboxCgroup, CgroupError> {
        Self::create_in(Path::new(CGROUP_ROOT), id, limits)
    }

    fn create_in(root: &Path, id: &str, limits: Limits) -> Result<SandboxCgroup, CgroupError> {
        let layout = detect(root)?;
        let dirs = dirs_of(&layout, id);
        let cg = SandboxCgroup {
            root: root.to_path_buf(),
            procs: dirs
                .iter()
                .map(|d| {
                    CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).unwrap_or_default()
                })
                .collect(),
            dirs,
        };
        let made = match &layout {
            Layout::V2(root) => {
                let parent = root.join(PARENT);
                write(&root.join("cgroup.subtree_control"), "+memory +pids")?;
                mkdir(&parent)?;
                write(&parent.join("cgroup.subtree_control"), "+memory +pids")?;
                mkdir(&cg.dirs[0])?;
                write(
                    &cg.dirs[0].join("memory.max"),
                    &limits.memory_bytes.to_string(),
                )
                .and_then(|_| write(&cg.dirs[0].join("pids.max"), &limits.pids.to_string()))
            }
            Layout::V1 { memory, pids } => {
                mkdir(&memory.join(PARENT))?;
                mkdir(&pids.join(PARENT))?;
                mkdir(&cg.dirs[0])
                    .and_then(|_| mkdir(&cg.dirs[1]))
                    .and_then(|_| {
                        write(
                            &cg.dirs[0].join("memory.limit_in_bytes"),
                            &limits.memory_bytes.to_string(),
                        )
                    })
                    .and_then(|_| write(&cg.dirs[1].join("pids.max"), &limits.pids.to_string()))
            }
        };
        if let Err(e) = made {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// The cgroup's directories (one for v2, memory then pids for v1).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves the calling process into the cgroup. For a forked child before exec: open(2),
    /// write(2) and close(2) of paths prepared before the fork, nothing allocated.
    pub fn join_in_child(&self) -> io::Result<()> {
        for p in &self.procs {
            // SAFETY: open(2) of a NUL-terminated path; the fd is closed below.
            let fd = unsafe { libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: write(2) of a 1-byte static buffer ("0": the writing process) to our fd.
            let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            let err = io::Error::last_os_error();
            // SAFETY: closing the fd opened above.
            unsafe { libc::close(fd) };
            if n != 1 {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Moves the calling process (all its threads; children it spawns later follow) into the
    /// cgroup; returns the cgroups it was in, for [`SandboxCgroup::leave`].
    pub fn join_self(&self) -> Result<Origin, CgroupError> {
        let own = Path::new("/proc/self/cgroup");
        let text = std::fs::read_to_string(own).map_err(io_err("read", own))?;
        let origin = origin_of(&text, &self.root, self.dirs.len() == 1)
            .ok_or_else(|| CgroupError::NoHierarchy(self.root.clone()))?;
        let me = std::process::id().to_string();
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &me)?;
        }
        Ok(origin)
    }

    /// Moves the calling process back to the cgroups it was in before
    /// [`SandboxCgroup::join_self`].
    pub fn leave(&self, origin: &Origin) -> Result<(), CgroupError> {
        let me = std::process::id().to_string();
        for d in &origin.0 {
            write(&d.join("cgroup.procs"), &me)?;
        }
        Ok(())
    }

    /// Removes the directories (their processes must have exited). Idempotent.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut first = Ok(());
        for d in &self.dirs {
            if let Err(e) = rmdir(d) {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

/// The cgroups a process was in before it joined a sandbox cgroup (in the order of its
/// directories: v2 one, v1 memory then pids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin(Vec<PathBuf>);

/// The cgroups of a process (its `/proc/<pid>/cgroup` text) as directories under `root`: the
/// v2 one, or the v1 memory and pids ones.
fn origin_of(text: &str, root: &Path, v2: bool) -> Option<Origin> {
    let path_of = |want: &str| {
        text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let hit = if want.is_empty() {
                controllers.is_empty()
            } else {
                controllers.split(',').any(|c| c == want)
            };
            hit.then(|| path.trim_start_matches('/').to_string())
        })
    };
    if v2 {
        return Some(Origin(vec![root.join(path_of("")?)]));
    }
    Some(Origin(vec![
        root.join("memory").join(path_of("memory")?),
        root.join("pids").join(path_of("pids")?),
    ]))
}

/// Removes sandbox `id`'s cgroup if one was left (after a crash of its runtime): whatever still
/// runs in it (a QEMU still exiting after its runtime died) is SIGKILLed, and the removal is
/// tried again until `timeout`. Nothing to do on a host without the hierarchies.
pub fn remove_leftover(id: &str, timeout: Duration) -> Result<(), CgroupError> {
    let Ok(layout) = detect(Path::new(CGROUP_ROOT)) else {
        return Ok(());
    };
    let deadline = Instant::now() + timeout;
    for dir in dirs_of(&layout, id) {
        loop {
            match rmdir(&dir) {
                Err(CgroupError::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    let procs =
                        std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    for pid in procs
                        .lines()
                        .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
                    {
                        // SAFETY: kill(2); the pid is a process of the dead sandbox's cgroup.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => {
                    other?;
                    break;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_sandbox_size() {
        assert_eq!(
            Limits::for_size(256, 1),
            Limits {
                memory_bytes: 768 << 20,
                pids: 130
            }
        );
        assert_eq!(Limits::for_size(2048, 4).memory_bytes, (2048 + 512) << 20);
        assert_eq!(Limits::for_size(2048, 4).pids, 136);
    }

    #[test]
    fn the_runtime_adds_its_share() {
        assert_eq!(
            Limits::for_size(256, 1).with_runtime(),
            Limits {
                memory_bytes: (768 + 128) << 20,
                pids: 258
            }
        );
    }

    #[test]
    fn origins_are_read_from_proc_cgroup() {
        let root = Path::new("/sys/fs/cgroup");
        let v1 = "12:pids:/system.slice/containerd.service\n5:memory:/\n3:cpu,cpuacct:/x\n0::/\n";
        assert_eq!(
            origin_of(v1, root, false),
            Some(Origin(vec![
                root.join("memory"),
                root.join("pids/system.slice/containerd.service")
            ]))
        );
        assert_eq!(
            origin_of("0::/system.slice/containerd.service\n", root, true),
            Some(Origin(vec![root.join("system.slice/containerd.service")]))
        );
        assert_eq!(origin_of("5:memory:/\n", root, false), None);
    }

    /// On the host's real cgroups: this test process joins a sandbox cgroup and leaves it
    /// again, after which the cgroup can be removed.
    #[test]
    fn the_runtime_joins_and_leaves() {
        let id = format!("unit-join-{}", std::process::id());
        // Generous limits: every thread of this test process is moved in, for a moment.
        let limits = Limits {
            memory_bytes: 64 << 30,
            pids: 1 << 20,
        };
        let cg = match SandboxCgroup::create(&id, limits) {
            Ok(cg) => cg,
            Err(CgroupError::NoHierarchy(_)) => return,
            Err(e) => panic!("{e}"),
        };
        let before = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let origin = cg.join_self().unwrap();
        let inside = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let want = format!("/{PARENT}/{id}");
        assert_eq!(inside.lines().filter(|l| l.ends_with(&want)).count(), cg.dirs().len(), "{inside}");
        cg.leave(&origin).unwrap();
        assert_eq!(std::fs::read_to_string("/proc/self/cgroup").unwrap(), before);
        cg.remove().unwrap();
        assert!(cg.dirs().iter().all(|d| !d.exists()));
    }

    #[test]
    fn layouts_are_detected_and_a_missing_one_is_typed() {
        let d = tempfile::tempdir().unwrap();
        let e = detect(d.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "no cgroup v2 hierarchy with the memory and pids controllers, nor cgroup v1 memory and pids hierarchies, under {}",
                d.path().display()
            )
        );
        for c in ["memory", "pids"] {
            std::fs::create_dir(d.path().join(c)).unwrap();
            std::fs::write(d.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        assert_eq!(
            detect(d.path()).unwrap(),
            Layout::V1 {
                memory: d.path().join("memory"),
                pids: d.path().join("pids")
            }
        );
        std::fs::write(d.path().join("cgroup.controllers"), "cpu memory io pids\n").unwrap();
        assert_eq!(
            detect(d.path()).unwrap(),
            Layout::V2(d.path().to_path_buf())
        );
    }

    #[test]
    fn v2_directories_get_the_limits_and_go_again() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cgroup.controllers"), "memory pids\n").unwrap();
        let cg = SandboxCgroup::create_in(d.path(), "sb1", Limits::for_size(256, 1)).unwrap();
        let dir = d.path().join("joey/sb1");
        assert_eq!(cg.dirs(), std::slice::from_ref(&dir));
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            (768u64 << 20).to_string()
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("pids.max")).unwrap(),
            "130"
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("joey/cgroup.subtree_control")).unwrap(),
            "+memory +pids"
        );
        // A regular directory with files is not empty (a real cgroup's files do not count).
        for f in ["memory.max", "pids.max"] {
            std::fs::remove_file(dir.join(f)).unwrap();
        }
        cg.remove().unwrap();
        assert!(!dir.exists());
        cg.remove().unwrap();
    }

    /// On the host's real cgroups (tests run as root): a child joins between fork and exec,
    /// sees the limits, and the cgroup goes once it has exited.
    #[test]
    fn a_child_joins_the_host_cgroup_with_the_limits() {
        use std::os::unix::process::CommandExt as _;
        let id = format!("unit-test-{}", std::process::id());
        let cg = match SandboxCgroup::create(&id, Limits::for_size(64, 1)) {
            Ok(cg) => cg,
            Err(CgroupError::NoHierarchy(_)) => {
                eprintln!("no memory and pids cgroups on this host; nothing to check");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let procs = cg.procs.clone();
        let joined = SandboxCgroup {
            root: PathBuf::from(CGROUP_ROOT),
            dirs: Vec::new(),
            procs,
        };
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        // SAFETY: join_in_child only makes async-signal-safe calls.
        unsafe { cmd.pre_exec(move || joined.join_in_child()) };
        let mut child = cmd.spawn().unwrap();
        let groups = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let want = format!("/{PARENT}/{id}");
        let lines: Vec<&str> = groups.lines().filter(|l| l.ends_with(&want)).collect();
        assert_eq!(lines.len(), cg.dirs().len(), "{groups}");
        let limit_file = if cg.dirs().len() == 1 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        assert_eq!(
            std::fs::read_to_string(cg.dirs()[0].join(limit_file))
                .unwrap()
                .trim(),
            (576u64 << 20).to_string()
        );
        cg.remove().unwrap();
        assert!(cg.dirs().iter().all(|d| !d.exists()));
    }
}
