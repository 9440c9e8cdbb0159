//! QEMU's jail (`security.qemu_jail`, docs/security.md): between fork and exec the child enters
//! namespaces of its own (mount, an empty network, IPC, UTS); the mount namespace's root is a
//! small tmpfs holding only what QEMU needs (`/usr`
//! and the `/lib*`, `/bin`, `/sbin` links, `/etc/ld.so.cache`, the kernel and initrd read-only,
//! its vhost-user sockets, `/dev/null`, `/dev/urandom`, `/dev/kvm` under KVM), pivots into it,
//! drops every capability (bounding set included) and becomes `security.qemu_user` with no
//! supplementary groups (but `/dev/kvm`'s) and `no_new_privs`.
//!
//! Everything that allocates or reads files happens before the fork ([`JailBuilder`]); the child
//! only replays prepared system calls ([`Jail::enter_in_child`]). A failing step is reported to
//! the parent through a [`StepReport`] pipe, so the error names it ("jail: pivot_root: ...").
//! The namespace, and so every mount in it, dies with QEMU: nothing is mounted on the host.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// Where user names are looked up.
pub const PASSWD: &str = "/etc/passwd";
/// The jail root's mount point (an empty directory) inside the VM's state directory.
pub const ROOT_DIR: &str = "jail";
/// What the jail shows of the host's system: directories bound read-only, or copied as
/// symbolic links where the host has links (a merged `/usr`).
const SYSTEM_TREES: [&str; 7] = [
    "/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin",
];
/// The dynamic loader's cache (bound read-only when the host has one).
const LD_SO_CACHE: &str = "/etc/ld.so.cache";
/// The devices every QEMU gets.
const DEVICES: [&str; 2] = ["/dev/null", "/dev/urandom"];
/// The KVM device (under KVM only).
pub const KVM_DEVICE: &str = "/dev/kvm";
/// The namespaces QEMU gets of its own: mounts (its jail), and an empty network (it needs none:
/// every device it has is a vhost-user unix socket at a path, or an fd it is handed), System V
/// IPC / POSIX message queue and UTS namespace.
const NAMESPACES: libc::c_int = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
/// The lowest fd number of the fds a child is handed ([`high_fd`]), above those it is given.
pub const HIGH_FD: i32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: no user {user} in {} (scripts/deps.sh creates joey-qemu; or set security.qemu_user, or security.qemu_jail = false)", file.display())]
    NoUser { user: String, file: PathBuf },
    #[error("jail: user {0} is root (uid or gid 0)")]
    Root(String),
    #[error("jail: read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("jail: {} is not an absolute path", .0.display())]
    Relative(PathBuf),
    #[error("jail: {}: {source}", path.display())]
    Missing { path: PathBuf, source: io::Error },
    #[error("jail: {} is not {what} by {user} (mode {mode:o}, owner {uid}:{gid})", path.display())]
    Denied {
        path: PathBuf,
        what: &'static str,
        user: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    #[error("jail: {KVM_DEVICE} is not accessible to {0}: give it a group other than root with read and write access (e.g. kvm, mode 0660)")]
    Kvm(String),
    #[error("jail: give {} to {user}: {source}", path.display())]
    Chown {
        path: PathBuf,
        user: String,
        source: io::Error,
    },
    #[error("jail: {} holds a NUL byte", .0.display())]
    Nul(PathBuf),
    #[error("jail: create the root's mount point {}: {source}", path.display())]
    MountPoint { path: PathBuf, source: io::Error },
    #[error("jail: the step report pipe: {0}")]
    Pipe(io::Error),
    /// A step between fork and exec failed (in the jail or around it).
    #[error("{}{what}: {source}", if *jail { "jail: " } else { "QEMU's start: " })]
    Step {
        jail: bool,
        what: String,
        source: io::Error,
    },
}

/// Who QEMU runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// As configured (`security.qemu_user`), for messages.
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: none, or `/dev/kvm`'s group under KVM.
    pub groups: Vec<u32>,
}

impl Credentials {
    /// `UID:GID`, or a name looked up in [`PASSWD`] (with its primary group). Never root.
    pub fn resolve(user: &str) -> Result<Credentials, JailError> {
        Self::resolve_in(user, Path::new(PASSWD))
    }

    fn resolve_in(user: &str, passwd: &Path) -> Result<Credentials, JailError> {
        let numeric = user
            .split_once(':')
            .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)));
        let (uid, gid) = match numeric {
            Some(ids) => ids,
            None => {
                let text = std::fs::read_to_string(passwd).map_err(|source| JailError::Read {
                    path: passwd.to_path_buf(),
                    source,
                })?;
                text.lines()
                    .filter_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.len() >= 4 && f[0] == user).then_some(f)
                    })
                    .find_map(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                    .ok_or_else(|| JailError::NoUser {
                        user: user.to_string(),
                        file: passwd.to_path_buf(),
                    })?
            }
        };
        if uid == 0 || gid == 0 {
            return Err(JailError::Root(user.to_string()));
        }
        Ok(Credentials {
            user: user.to_string(),
            uid,
            gid,
            groups: Vec::new(),
        })
    }

    /// Whether these credentials get `bits` (read 4, write 2, execute 1) on a file with `meta`.
    fn may(&self, meta: &std::fs::Metadata, bits: u32) -> bool {
        let mode = meta.mode();
        if meta.uid() == self.uid {
            return mode >> 6 & bits == bits;
        }
        if meta.gid() == self.gid || self.groups.contains(&meta.gid()) {
            return mode >> 3 & bits == bits;
        }
        mode & bits == bits
    }
}

/// A step the child takes between fork and exec, as reported to the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    JoinCgroup = 1,
    Unshare,
    MakePrivate,
    MountRoot,
    /// One of the jail's operations ([`Jail`]'s list; the report carries its index).
    Op,
    RemountReadOnly,
    PivotRoot,
    DetachOldRoot,
    RootReadOnly,
    DropCapabilities,
    SetGroups,
    SetGid,
    SetUid,
    NoNewPrivs,
    DeathSignal,
    ParentGone,
    Seccomp,
    Fds,
}

impl Step {
    const ALL: [Step; 18] = [
        Step::JoinCgroup,
        Step::Unshare,
        Step::MakePrivate,
        Step::MountRoot,
        Step::Op,
        Step::RemountReadOnly,
        Step::PivotRoot,
        Step::DetachOldRoot,
        Step::RootReadOnly,
        Step::DropCapabilities,
        Step::SetGroups,
        Step::SetGid,
        Step::SetUid,
        Step::NoNewPrivs,
        Step::DeathSignal,
        Step::ParentGone,
        Step::Seccomp,
        Step::Fds,
    ];

    fn name(self) -> &'static str {
        match self {
            Step::JoinCgroup => "join the sandbox cgroup",
            Step::Unshare => "unshare(CLONE_NEWNS|CLONE_NEWNET|CLONE_NEWIPC|CLONE_NEWUTS)",
            Step::MakePrivate => "make the mounts private",
            Step::MountRoot => "mount the root tmpfs",
            Step::Op => "prepare the root",
            Step::RemountReadOnly => "remount read-only",
            Step::PivotRoot => "pivot_root",
            Step::DetachOldRoot => "detach the old root",
            Step::RootReadOnly => "remount the root read-only",
            Step::DropCapabilities => "drop the capability bounding set",
            Step::SetGroups => "setgroups",
            Step::SetGid => "setresgid",
            Step::SetUid => "setresuid",
            Step::NoNewPrivs => "PR_SET_NO_NEW_PRIVS",
            Step::DeathSignal => "PR_SET_PDEATHSIG",
            Step::ParentGone => "the runtime exited",
            Step::Seccomp => "install the io_uring and signal filters",
            Step::Fds => "hand over the console and QMP fds",
        }
    }

    /// Steps of the jail itself (the others are QEMU's start around it).
    fn in_jail(self) -> bool {
        !matches!(
            self,
            Step::JoinCgroup | Step::DeathSignal | Step::ParentGone | Step::Seccomp | Step::Fds
        )
    }
}

/// Duplicates `fd` to a close-on-exec fd numbered [`HIGH_FD`] or above (closing `fd`): a child
/// can then `dup2` the fds it is given onto low numbers without overwriting one of them.
pub fn high_fd(fd: OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(2) F_DUPFD_CLOEXEC on an fd we own; the new fd is owned by the result.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `n` is a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// The pipe through which a child between fork and exec tells the parent which step failed
/// (three bytes: the step, the operation's index). Both ends close on exec.
#[derive(Debug)]
pub struct StepReport {
    read: OwnedFd,
    write: OwnedFd,
}

impl StepReport {
    pub fn new() -> Result<StepReport, JailError> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| JailError::Pipe(e.into()))?;
        Ok(StepReport {
            read: high_fd(read).map_err(JailError::Pipe)?,
            write: high_fd(write).map_err(JailError::Pipe)?,
        })
    }

    /// In the child: records that `step` (operation `index`) failed and returns `err`.
    /// Async-signal-safe (one write(2)).
    pub fn fail(&self, step: Step, index: usize, err: io::Error) -> io::Error {
        let i = u16::try_from(index).unwrap_or(u16::MAX).to_le_bytes();
        let msg = [step as u8, i[0], i[1]];
        // SAFETY: write(2) of a 3-byte stack buffer to the pipe's write end, which we own.
        unsafe { libc::write(self.write.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
        err
    }

    /// In the parent, after a failed spawn: the step the child reported, if any, as the error
    /// (`jail` names its operations), or `source` as it is.
    pub fn error(&self, jail: Option<&Jail>, source: io::Error) -> Result<io::Error, JailError> {
        let mut msg = [0u8; 3];
        // SAFETY: read(2) into a 3-byte stack buffer from the non-blocking read end we own.
        let n = unsafe { libc::read(self.read.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        let Some(&step) = (n == 3)
            .then(|| Step::ALL.iter().find(|s| **s as u8 == msg[0]))
            .flatten()
        else {
            return Ok(source);
        };
        let index = usize::from(u16::from_le_bytes([msg[1], msg[2]]));
        let what = match (step, jail) {
            (Step::Op | Step::RemountReadOnly, Some(j)) => match j.shown.get(index) {
                Some(op) if step == Step::Op => op.clone(),
                Some(op) => format!("remount read-only ({op})"),
                None => step.name().to_string(),
            },
            _ => step.name().to_string(),
        };
        Err(JailError::Step {
            jail: step.in_jail(),
            what,
            source,
        })
    }
}

/// One prepared operation inside the new root (paths as the host sees them before the pivot).
#[derive(Debug)]
enum Op {
    Dir(CString),
    /// An empty file to mount a non-directory on.
    File(CString),
    Symlink {
        target: CString,
        path: CString,
    },
    Bind {
        src: CString,
        dst: CString,
        read_only: bool,
    },
}

/// What [`JailBuilder::add`] puts in the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A file or directory bound read-only (nosuid, nodev).
    ReadOnly,
    /// A socket or device, bound as it is.
    Writable,
}

/// Collects what QEMU's jail holds (blocking: it looks at the files).
#[derive(Debug)]
pub struct JailBuilder {
    root: PathBuf,
    creds: Credentials,
    ops: Vec<Op>,
    shown: Vec<String>,
    dirs: BTreeSet<PathBuf>,
    /// Trees already in the jail (bound directories and copied links): what lies below them
    /// is visible already.
    trees: Vec<PathBuf>,
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Nul(p.to_path_buf()))
}

impl JailBuilder {
    /// A jail whose root is mounted on `root` (created if missing, by [`JailBuilder::build`]).
    pub fn new(root: &Path, creds: Credentials) -> JailBuilder {
        JailBuilder {
            root: root.to_path_buf(),
            creds,
            ops: Vec::new(),
            shown: Vec::new(),
            dirs: BTreeSet::new(),
            trees: Vec::new(),
        }
    }

    /// `p` as the host sees it under the root before the pivot.
    fn inside(&self, p: &Path) -> Result<CString, JailError> {
        cstr(&self.root.join(p.strip_prefix("/").unwrap_or(p)))
    }

    fn push(&mut self, op: Op, shown: String) {
        self.ops.push(op);
        self.shown.push(shown);
    }

    fn covered(&self, p: &Path) -> bool {
        self.trees.iter().any(|t| p.starts_with(t))
    }

    /// The directories above `p` inside the root.
    fn parents(&mut self, p: &Path) -> Result<(), JailError> {
        let mut above: Vec<&Path> = p
            .ancestors()
            .skip(1)
            .filter(|a| *a != Path::new("/"))
            .collect();
        above.reverse();
        for a in above {
            if self.dirs.insert(a.to_path_buf()) {
                let op = Op::Dir(self.inside(a)?);
                self.push(op, format!("mkdir {}", a.display()));
            }
        }
        Ok(())
    }

    /// The host's system files QEMU runs from: [`SYSTEM_TREES`] and [`LD_SO_CACHE`], and the
    /// devices every QEMU gets.
    pub fn system(&mut self) -> Result<&mut Self, JailError> {
        for t in SYSTEM_TREES {
            let p = Path::new(t);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(p).map_err(|source| JailError::Read {
                        path: p.to_path_buf(),
                        source,
                    })?;
                    let op = Op::Symlink {
                        target: cstr(&target)?,
                        path: self.inside(p)?,
                    };
                    self.push(op, format!("symlink {t}"));
                    self.trees.push(p.to_path_buf());
                }
                Ok(m) if m.is_dir() => {
                    self.bind(p, Kind::ReadOnly, true)?;
                    self.trees.push(p.to_path_buf());
                }
                _ => {}
            }
        }
        if Path::new(LD_SO_CACHE).is_file() {
            self.bind(Path::new(LD_SO_CACHE), Kind::ReadOnly, false)?;
        }
        for d in DEVICES {
            self.add_device(Path::new(d))?;
        }
        Ok(self)
    }

    fn bind(&mut self, p: &Path, kind: Kind, dir: bool) -> Result<(), JailError> {
        self.parents(p)?;
        let dst = self.inside(p)?;
        if dir {
            self.dirs.insert(p.to_path_buf());
            self.push(Op::Dir(dst.clone()), format!("mkdir {}", p.display()));
        } else {
            self.push(
                Op::File(dst.clone()),
                format!("create the mount point {}", p.display()),
            );
        }
        let op = Op::Bind {
            src: cstr(p)?,
            dst,
            read_only: kind == Kind::ReadOnly,
        };
        self.push(op, format!("bind mount {}", p.display()));
        Ok(())
    }

    fn metadata(p: &Path) -> Result<std::fs::Metadata, JailError> {
        if !p.is_absolute() {
            return Err(JailError::Relative(p.to_path_buf()));
        }
        std::fs::metadata(p).map_err(|source| JailError::Missing {
            path: p.to_path_buf(),
            source,
        })
    }

    fn check(
        &self,
        p: &Path,
        meta: &std::fs::Metadata,
        bits: u32,
        what: &'static str,
    ) -> Result<(), JailError> {
        if self.creds.may(meta, bits) {
            return Ok(());
        }
        Err(JailError::Denied {
            path: p.to_path_buf(),
            what,
            user: self.creds.user.clone(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }

    /// A file QEMU reads (`exec`: and runs), at the same path, read-only. It must be readable
    /// (and executable) by QEMU's user; one below a system tree is visible already.
    pub fn add_file(&mut self, p: &Path, exec: bool) -> Result<&mut Self, JailError> {
        let meta = Self::metadata(p)?;
        self.check(
            p,
            &meta,
            if exec { 5 } else { 4 },
            if exec { "executable" } else { "readable" },
        )?;
        if !self.covered(p) {
            self.bind(p, Kind::ReadOnly, false)?;
        } else {
            // Visible through a system tree, unless it is a link that leads out of them (e.g.
            // /usr/share/joey/guest/vmlinux -> /var/cache/...): then its target goes in too.
            let real = std::fs::canonicalize(p).map_err(|source| JailError::Missing {
                path: p.to_path_buf(),
                source,
            })?;
            if !self.covered(&real) {
                self.bind(&real, Kind::ReadOnly, false)?;
            }
        }
        Ok(self)
    }

    /// A vhost-user socket QEMU connects to, at the same path; given to QEMU's user (its
    /// directory on the host stays closed to it).
    pub fn add_socket(&mut self, p: &Path) -> Result<&mut Self, JailError> {
        Self::metadata(p)?;
        let c = cstr(p)?;
        // fchownat(2), not chown(2): the runtime's seccomp filter allows the former only.
        // SAFETY: fchownat(2) of a NUL-terminated path.
        check(
            unsafe {
                libc::fchownat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    self.creds.uid,
                    self.creds.gid,
                    0,
                )
            }
            .into(),
        )
        .map_err(|source| JailError::Chown {
            path: p.to_path_buf(),
            user: self.creds.user.clone(),
            source,
        })?;
        self.bind(p, Kind::Writable, false)?;
        Ok(self)
    }

    fn add_device(&mut self, p: &Path) -> Result<&mut Self, JailError> {
        Self::metadata(p)?;
        self.bind(p, Kind::Writable, false)?;
        Ok(self)
    }

    /// `/dev/kvm`, and its group as QEMU's one supplementary group unless it is open to all.
    pub fn add_kvm(&mut self) -> Result<&mut Self, JailError> {
        let p = Path::new(KVM_DEVICE);
        let meta = Self::metadata(p)?;
        if !self.creds.may(&meta, 6) {
            if meta.gid() == 0 || meta.mode() & 0o060 != 0o060 {
                return Err(JailError::Kvm(self.creds.user.clone()));
            }
            self.creds.groups.push(meta.gid());
        }
        self.add_device(p)
    }

    /// The jail, ready for [`Jail::enter_in_child`]; creates the root's mount point.
    pub fn build(self) -> Result<Jail, JailError> {
        use std::os::unix::fs::DirBuilderExt as _;
        match std::fs::DirBuilder::new().mode(0o700).create(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(JailError::MountPoint {
                    path: self.root.clone(),
                    source: e,
                })
            }
            _ => {}
        }
        Ok(Jail {
            root_c: cstr(&self.root)?,
            root: self.root,
            ops: self.ops,
            shown: self.shown,
            groups: self
                .creds
                .groups
                .iter()
                .map(|g| *g as libc::gid_t)
                .collect(),
            creds: self.creds,
        })
    }
}

/// A prepared jail: the child replays it between fork and exec.
#[derive(Debug)]
pub struct Jail {
    root: PathBuf,
    root_c: CString,
    ops: Vec<Op>,
    /// Each operation as an error names it.
    shown: Vec<String>,
    creds: Credentials,
    groups: Vec<libc::gid_t>,
}

/// Returns the last OS error if `rc` is negative.
fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mount(2) with optional source, type and data (NUL-terminated C strings or null).
///
/// # Safety
/// Every pointer is null or points to a NUL-terminated string.
unsafe fn mount(
    src: *const libc::c_char,
    dst: *const libc::c_char,
    fstype: *const libc::c_char,
    flags: libc::c_ulong,
    data: *const libc::c_char,
) -> io::Result<()> {
    // SAFETY: the caller passes valid or null strings.
    check(unsafe { libc::mount(src, dst, fstype, flags, data.cast()) }.into())
}

impl Jail {
    /// The root's mount point on the host (an empty directory, removed after QEMU's exit).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Who QEMU runs as.
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// Enters the jail: for a forked child before exec, as root. Only system calls on memory
    /// prepared before the fork; nothing allocated. A failing step is written to `report`.
    pub fn enter_in_child(&self, report: &StepReport) -> io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        let fail = |step: Step, i: usize| move |e: io::Error| report.fail(step, i, e);
        // SAFETY: unshare(2) of the calling (single-threaded, forked) process's namespaces.
        check(unsafe { libc::unshare(NAMESPACES) }.into()).map_err(fail(Step::Unshare, 0))?;
        // SAFETY: mount(2) with static strings: nothing mounted below propagates to the host.
        unsafe {
            mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                null,
            )
        }
        .map_err(fail(Step::MakePrivate, 0))?;
        // SAFETY: mount(2) of a tmpfs on the prepared mount point, static strings.
        unsafe {
            mount(
                c"joey-jail".as_ptr(),
                self.root_c.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"mode=0755,size=1m,nr_inodes=1024".as_ptr(),
            )
        }
        .map_err(fail(Step::MountRoot, 0))?;
        for (i, op) in self.ops.iter().enumerate() {
            let op_err = |e: io::Error| (Step::Op, e);
            let done: Result<(), (Step, io::Error)> = match op {
                // SAFETY: mkdir(2) of a prepared path.
                Op::Dir(p) => check(unsafe { libc::mkdir(p.as_ptr(), 0o755) }.into())
                    .or_else(|e| {
                        if e.raw_os_error() == Some(libc::EEXIST) {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(op_err),
                Op::File(p) => {
                    // SAFETY: open(2) of a prepared path; the fd is closed right away.
                    let fd = unsafe {
                        libc::open(
                            p.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o600,
                        )
                    };
                    check(fd.into())
                        .map(|()| {
                            // SAFETY: closing the fd opened above.
                            unsafe { libc::close(fd) };
                        })
                        .map_err(op_err)
                }
                Op::Symlink { target, path } => {
                    // SAFETY: symlink(2) of prepared strings.
                    check(unsafe { libc::symlink(target.as_ptr(), path.as_ptr()) }.into())
                        .map_err(op_err)
                }
                Op::Bind {
                    src,
                    dst,
                    read_only,
                } => {
                    // SAFETY: mount(2) of prepared paths.
                    unsafe {
                        mount(
                            src.as_ptr(),
                            dst.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REC,
                            null,
                        )
                    }
                    .map_err(op_err)
                    .and_then(|()| {
                        if !read_only {
                            return Ok(());
                        }
                        let flags = libc::MS_BIND
                            | libc::MS_REMOUNT
                            | libc::MS_RDONLY
                            | libc::MS_NOSUID
                            | libc::MS_NODEV;
                        // SAFETY: mount(2) remounting the bind mount made above.
                        unsafe { mount(null, dst.as_ptr(), null, flags, null) }
                            .map_err(|e| (Step::RemountReadOnly, e))
                    })
                }
            };
            done.map_err(|(step, e)| report.fail(step, i, e))?;
        }
        // pivot_root(".", "."): the old root ends up on top of the new one and is detached.
        // SAFETY: chdir(2), pivot_root(2), umount2(2) and chdir(2) with prepared or static paths.
        check(unsafe { libc::chdir(self.root_c.as_ptr()) }.into())
            .map_err(fail(Step::PivotRoot, 0))?;
        // SAFETY: as above.
        check(unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) })
            .map_err(fail(Step::PivotRoot, 0))?;
        // SAFETY: as above.
        check(unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) }.into())
            .map_err(fail(Step::DetachOldRoot, 0))?;
        // SAFETY: as above.
        check(unsafe { libc::chdir(c"/".as_ptr()) }.into())
            .map_err(fail(Step::DetachOldRoot, 0))?;
        let ro =
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        // SAFETY: mount(2) remounting the new root (the tmpfs) read-only.
        unsafe { mount(null, c"/".as_ptr(), null, ro, null) }
            .map_err(fail(Step::RootReadOnly, 0))?;
        // Every capability out of the bounding set (the effective, permitted and ambient sets
        // are cleared by the change to non-zero uids below).
        for cap in 0..64 {
            // SAFETY: prctl(2) PR_CAPBSET_DROP; capabilities beyond the kernel's last are EINVAL.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(report.fail(Step::DropCapabilities, 0, e));
                }
            }
        }
        let (uid, gid) = (self.creds.uid, self.creds.gid);
        // Raw system calls: only this thread (the child's only one) changes.
        // SAFETY: setgroups(2) with a prepared array and its length.
        check(unsafe {
            libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr())
        })
        .map_err(fail(Step::SetGroups, 0))?;
        // SAFETY: setresgid(2) with plain integers.
        check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) })
            .map_err(fail(Step::SetGid, 0))?;
        // SAFETY: setresuid(2) with plain integers.
        check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) })
            .map_err(fail(Step::SetUid, 0))?;
        // SAFETY: prctl(2) PR_SET_NO_NEW_PRIVS.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())
            .map_err(fail(Step::NoNewPrivs, 0))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt as _;
    use std::process::{Command, Stdio};

    #[test]
    fn users_resolve_from_passwd_or_numbers_and_never_to_root() {
        let d = tempfile::tempdir().unwrap();
        let pw = d.path().join("passwd");
        std::fs::write(&pw, "root:x:0:0:root:/root:/bin/sh\nbad:x:y:1::/:/bin/false\njoey-qemu:x:999:995::/nonexistent:/usr/sbin/nologin\n").unwrap();
        let c = Credentials::resolve_in("joey-qemu", &pw).unwrap();
        assert_eq!((c.uid, c.gid, c.groups.len()), (999, 995, 0));
        assert_eq!(Credentials::resolve_in("1001:1002", &pw).unwrap().gid, 1002);
        let e = Credentials::resolve_in("nobody-here", &pw).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "jail: no user nobody-here in {} (scripts/deps.sh creates joey-qemu; or set security.qemu_user, or security.qemu_jail = false)",
                pw.display()
            )
        );
        assert!(matches!(
            Credentials::resolve_in("bad", &pw),
            Err(JailError::NoUser { .. })
        ));
        assert_eq!(
            Credentials::resolve_in("root", &pw)
                .unwrap_err()
                .to_string(),
            "jail: user root is root (uid or gid 0)"
        );
        assert!(matches!(
            Credentials::resolve_in("5:0", &pw),
            Err(JailError::Root(_))
        ));
        let e = Credentials::resolve_in("x", &d.path().join("none")).unwrap_err();
        assert!(e.to_string().starts_with("jail: read "), "{e}");
    }

    fn creds() -> Credentials {
        Credentials {
            user: "65534:65534".into(),
            uid: 65534,
            gid: 65534,
            groups: Vec::new(),
        }
    }

    #[test]
    fn files_must_be_absolute_existing_and_readable() {
        let d = tempfile::tempdir().unwrap();
        let mut b = JailBuilder::new(&d.path().join(ROOT_DIR), creds());
        let e = b.add_file(Path::new("rel/vmlinux"), false).unwrap_err();
        assert_eq!(e.to_string(), "jail: rel/vmlinux is not an absolute path");
        assert!(matches!(
            b.add_file(&d.path().join("nope"), false),
            Err(JailError::Missing { .. })
        ));
        let secret = d.path().join("secret");
        std::fs::write(&secret, "k").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = b.add_file(&secret, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "jail: {} is not readable by 65534:65534 (mode 640, owner 0:0)",
                secret.display()
            )
        );
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        b.add_file(&secret, false).unwrap();
        assert!(matches!(
            b.add_file(&secret, true),
            Err(JailError::Denied {
                what: "executable",
                ..
            })
        ));
    }

    /// A file below a system tree is not bound again, unless it is a link out of them, whose
    /// target is bound then.
    #[test]
    fn files_below_the_system_trees_are_bound_only_when_they_lead_out() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("vmlinux");
        std::fs::write(&target, "k").unwrap();
        let mut b = JailBuilder::new(&d.path().join(ROOT_DIR), creds());
        b.system().unwrap();
        let before = b.ops.len();
        b.add_file(Path::new("/usr/bin/env"), true).unwrap();
        assert_eq!(b.ops.len(), before, "{:?}", &b.shown[before..]);
        // A tree of links standing in for /usr: /usr/... -> the temporary file.
        b.trees.push(d.path().join("tree"));
        std::fs::create_dir(d.path().join("tree")).unwrap();
        let link = d.path().join("tree/vmlinux");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        b.add_file(&link, false).unwrap();
        assert_eq!(
            b.shown.last().unwrap(),
            &format!("bind mount {}", target.display())
        );
    }

    /// Runs `script` with `sh` in a jail holding the system and `extra` files; its stdout.
    fn run_jailed(root: &Path, extra: &[&Path], script: &str) -> Result<String, JailError> {
        let mut b = JailBuilder::new(root, creds());
        b.system()?;
        for p in extra {
            b.add_file(p, false)?;
        }
        let jail = std::sync::Arc::new(b.build()?);
        let report = std::sync::Arc::new(StepReport::new()?);
        let (j, r) = (jail.clone(), report.clone());
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: enter_in_child only makes system calls on memory prepared before the fork.
        unsafe { cmd.pre_exec(move || j.enter_in_child(&r)) };
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) => match report.error(Some(&jail), e) {
                Ok(e) => panic!("spawn: {e}"),
                Err(e) => return Err(e),
            },
        };
        assert!(out.status.success(), "{out:?}");
        Ok(String::from_utf8(out.stdout).unwrap())
    }

    /// On the host (tests run as root): a jailed shell runs as the user, with no capabilities
    /// and no_new_privs, sees the system and the files it was given and nothing else; nothing
    /// stays mounted on the host.
    #[test]
    fn a_jailed_process_sees_only_its_files_and_has_no_privileges() {
        let d = tempfile::tempdir().unwrap();
        let kernel = d.path().join("vmlinux");
        std::fs::write(&kernel, "kernel").unwrap();
        std::fs::write(d.path().join("state.json"), "{}").unwrap();
        let root = d.path().join(ROOT_DIR);
        let script = format!(
            "id -u; id -G; cat {k}; echo; test -e {s} || echo no-state; test -e /root || echo no-root; \
             test -e /proc/self || echo no-proc; test -e /home || echo no-home; test -e /var || echo no-var; \
             echo x > /dev/null && echo devnull; touch /new 2>/dev/null || echo ro-root; \
             {{ echo x > {k}; }} 2>/dev/null || echo ro-kernel",
            k = kernel.display(),
            s = d.path().join("state.json").display()
        );
        let out = run_jailed(&root, &[&kernel], &script).unwrap();
        assert_eq!(
            out,
            "65534\n65534\nkernel\nno-state\nno-root\nno-proc\nno-home\nno-var\ndevnull\nro-root\nro-kernel\n"
        );
        // CapEff, CapBnd and NoNewPrivs, read through the host's /proc of the jailed process.
        let mut b = JailBuilder::new(&root, creds());
        b.system().unwrap();
        let jail = std::sync::Arc::new(b.build().unwrap());
        let report = std::sync::Arc::new(StepReport::new().unwrap());
        let r = report.clone();
        let j = jail.clone();
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("30");
        // SAFETY: enter_in_child only makes system calls on memory prepared before the fork.
        unsafe { cmd.pre_exec(move || j.enter_in_child(&r)) };
        let mut child = cmd.spawn().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let ns = |pid: &str, ns: &str| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let pid = child.id().to_string();
        let shared: Vec<_> = ["mnt", "net", "ipc", "uts"]
            .into_iter()
            .filter(|n| ns("self", n) == ns(&pid, n))
            .collect();
        // Its network namespace has a loopback device and nothing else.
        let netdevs: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
            .unwrap()
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
            .collect();
        let sees_state =
            Path::new(&format!("/proc/{}/root{}", child.id(), d.path().display())).exists();
        child.kill().unwrap();
        child.wait().unwrap();
        for (field, want) in [
            ("CapEff:", "0000000000000000"),
            ("CapPrm:", "0000000000000000"),
            ("CapBnd:", "0000000000000000"),
            ("NoNewPrivs:", "1"),
            ("Groups:", ""),
        ] {
            let got = status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .map(str::trim);
            assert_eq!(got, Some(want), "{field} in {status}");
        }
        assert!(
            shared.is_empty(),
            "the jailed process shares the host's namespaces {shared:?}"
        );
        assert_eq!(netdevs, ["lo"]);
        assert!(!sees_state, "the jail shows the state dir");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&d.path().display().to_string()),
            "a jail mount leaked onto the host: {mounts}"
        );
    }

    #[test]
    fn a_failing_step_is_named() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join(ROOT_DIR);
        // The root's mount point is a file: mounting the tmpfs on it fails.
        std::fs::write(&root, "").unwrap();
        let b = JailBuilder::new(&root, creds());
        let jail = b.build().unwrap();
        let report = std::sync::Arc::new(StepReport::new().unwrap());
        let r = report.clone();
        let mut cmd = Command::new("/bin/true");
        // SAFETY: enter_in_child only makes system calls on memory prepared before the fork.
        unsafe { cmd.pre_exec(move || jail.enter_in_child(&r)) };
        let e = cmd.spawn().unwrap_err();
        let e = report.error(None, e).unwrap_err();
        assert_eq!(
            e.to_string(),
            "jail: mount the root tmpfs: Not a directory (os error 20)"
        );
        // Without a report the spawn error is kept as it is.
        let fresh = StepReport::new().unwrap();
        let e = fresh
            .error(None, io::Error::from_raw_os_error(libc::ENOENT))
            .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
