//! Seccomp filters per thread class (see docs/security.md).
//!
//! Every thread of a runtime process (`containerd-shim-joey-v2`, `joeyctl run`) runs under an
//! allowlist of system calls. [`init`] compiles one BPF program per [`ThreadClass`] and installs
//! the [`ThreadClass::Runtime`] filter on every thread of the process (`SECCOMP_FILTER_FLAG_TSYNC`);
//! threads created later inherit it. A device, vhost-user, vCPU or console thread then calls
//! [`apply`] with its own class first thing: its filter stacks on the inherited one, and the
//! kernel takes the stricter verdict. The runtime list is the union of every class's list plus
//! what only the runtime threads do, so a thread's effective allowlist is exactly its class's.
//!
//! Filters are inherited over fork and exec and can never be lifted: QEMU, which the runtime
//! thread forks, runs under the runtime filter too (plus its own `-sandbox`), so the runtime list
//! also holds the calls QEMU makes ([`QEMU_CHILD`]).
//!
//! A call outside the list kills the process (`SECCOMP_RET_KILL_PROCESS`, [`Action::Kill`]) or
//! ([`Action::Trap`]) raises SIGSYS on the thread: a handler counts the violation, logs it to
//! stderr and makes the call fail with `EPERM`, so a device thread fails and the VM is reported
//! failed. The lists were collected with `scripts/seccomp-trace.sh` (strace per thread).
//! Without [`init`] (unit tests, seccomp off) [`apply`] does nothing.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a system call outside a thread's allowlist does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `SECCOMP_RET_KILL_PROCESS`: the whole process dies of SIGSYS.
    Kill,
    /// `SECCOMP_RET_TRAP`: SIGSYS on the thread; the handler logs and counts it and the call
    /// fails with `EPERM`.
    Trap,
}

/// The classes of threads, each with its own allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadClass {
    /// The async runtime (actix/tokio, blocking pool) and every other thread of the process
    /// that has no class of its own; also what QEMU inherits.
    Runtime,
    /// A vCPU thread of the built-in VMM (`vcpuN`): `KVM_RUN`, and the device registers it
    /// emulates in place.
    Vcpu,
    /// An in-process device event loop of the built-in VMM (`joey-virtio`, the VMM thread's
    /// devices) and the virtio-net tap relays.
    Device,
    /// The vhost-user vsock and virtio-net devices served to QEMU, and their vring workers.
    VhostUser,
    /// The vhost-user virtio-fs device (a passthrough file system: it opens, creates and
    /// removes files under the shared directory) and its vring workers.
    VhostUserFs,
    /// The guest console pump (`joey-console`): a pipe into the capped log file.
    Console,
}

impl ThreadClass {
    /// Every class.
    pub const ALL: [ThreadClass; 6] = [
        ThreadClass::Runtime,
        ThreadClass::Vcpu,
        ThreadClass::Device,
        ThreadClass::VhostUser,
        ThreadClass::VhostUserFs,
        ThreadClass::Console,
    ];

    /// The name used in logs and docs.
    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Runtime => "runtime",
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::Device => "device",
            ThreadClass::VhostUser => "vhost-user",
            ThreadClass::VhostUserFs => "vhost-user-fs",
            ThreadClass::Console => "console",
        }
    }

    /// The system calls this class may make.
    pub fn allowlist(self) -> Vec<i64> {
        let mut v: Vec<i64> = BASE.to_vec();
        match self {
            ThreadClass::Runtime => {
                for c in ThreadClass::ALL {
                    if c != ThreadClass::Runtime {
                        v.extend(c.allowlist());
                    }
                }
                v.extend_from_slice(RUNTIME);
                v.extend_from_slice(QEMU_CHILD);
                v.extend_from_slice(SPAWNED);
            }
            // A vCPU thread runs device code in place on register accesses (activate, reset,
            // notify, the serial into its capped log): the device class's calls plus KVM's.
            ThreadClass::Vcpu => {
                v.extend([KVM, CONSOLE_LOG, EVENTS, VSOCK_HOST, NET, BLK, FS].concat())
            }
            ThreadClass::Device => v.extend([EVENTS, VSOCK_HOST, NET, BLK, FS].concat()),
            ThreadClass::VhostUser => v.extend([EVENTS, VHOST_PROTOCOL, VSOCK_HOST, NET].concat()),
            ThreadClass::VhostUserFs => v.extend([EVENTS, VHOST_PROTOCOL, FS].concat()),
            ThreadClass::Console => v.extend_from_slice(CONSOLE_LOG),
        }
        v.sort_unstable();
        v.dedup();
        v
    }
}

impl std::fmt::Display for ThreadClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a filter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("compile the {class} seccomp filter: {source}")]
    Compile {
        class: ThreadClass,
        source: seccompiler::BackendError,
    },
    #[error("install the {class} seccomp filter: {source}")]
    Install {
        class: ThreadClass,
        source: seccompiler::Error,
    },
    #[error("compile QEMU's child filters: {0}")]
    CompileQemu(seccompiler::BackendError),
    #[error("seccomp filters are already installed in this process")]
    AlreadyInitialized,
    #[error("install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// The compiled filters of this process, set once by [`init`].
struct Policy {
    filters: HashMap<ThreadClass, BpfProgram>,
}

static POLICY: OnceLock<Policy> = OnceLock::new();
/// Violations trapped so far ([`Action::Trap`]).
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
/// The system call number of the last trapped violation (-1: none).
static LAST_SYSCALL: AtomicI64 = AtomicI64::new(-1);

/// Compiles the filter of `class` with `action` for calls outside its list.
pub fn compile(class: ThreadClass, action: Action) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = class
        .allowlist()
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    // Every thread may open files read-only (glibc reads /sys/devices/system/cpu/online when a
    // thread first allocates) and name itself; only the classes with `openat` (`prctl`) in their
    // list may write or create files (use other prctl options).
    let cond = |arg, op, value| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(|source| SeccompError::Compile { class, source })
    };
    if let Entry::Vacant(e) = rules.entry(libc::SYS_openat) {
        let flags = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
        e.insert(vec![cond(2, SeccompCmpOp::MaskedEq(flags), 0)?]);
    }
    if let Entry::Vacant(e) = rules.entry(libc::SYS_prctl) {
        e.insert(vec![
            cond(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?,
            cond(0, SeccompCmpOp::Eq, libc::PR_GET_NAME as u64)?,
        ]);
    }
    let mismatch = match action {
        Action::Kill => SeccompAction::KillProcess,
        Action::Trap => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|source| SeccompError::Compile { class, source })?;
    filter
        .try_into()
        .map_err(|source| SeccompError::Compile { class, source })
}

/// Compiles every class's filter, installs the SIGSYS handler for [`Action::Trap`], and puts
/// the runtime filter on every thread of the process. Once per process.
pub fn init(action: Action) -> Result<(), SeccompError> {
    let mut filters = HashMap::new();
    for class in ThreadClass::ALL {
        filters.insert(class, compile(class, action)?);
    }
    if action == Action::Trap {
        install_sigsys_handler()?;
    }
    let runtime = filters[&ThreadClass::Runtime].clone();
    POLICY
        .set(Policy { filters })
        .map_err(|_| SeccompError::AlreadyInitialized)?;
    seccompiler::apply_filter_all_threads(&runtime).map_err(|source| SeccompError::Install {
        class: ThreadClass::Runtime,
        source,
    })
}

/// Whether [`init`] has installed the filters in this process.
pub fn enabled() -> bool {
    POLICY.get().is_some()
}

/// Installs `class`'s filter on the calling thread (on top of the inherited runtime filter);
/// threads it spawns afterwards inherit it. Does nothing when seccomp is not initialized.
pub fn apply(class: ThreadClass) -> Result<(), SeccompError> {
    let Some(policy) = POLICY.get() else {
        return Ok(());
    };
    if class == ThreadClass::Runtime {
        // Already inherited from init.
        return Ok(());
    }
    seccompiler::apply_filter(&policy.filters[&class])
        .map_err(|source| SeccompError::Install { class, source })
}

/// [`apply`] for a thread body that has no error path of its own: a failure is logged and the
/// thread goes on under the inherited (broader) runtime filter.
pub fn apply_or_log(class: ThreadClass) {
    if let Err(e) = apply(class) {
        tracing::error!(error = %e, "seccomp: thread runs under the runtime filter only");
    }
}

/// The calls QEMU's extra filter refuses with `ENOSYS`.
const QEMU_REFUSED: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// The calls that send a signal to (or get a handle on) a process by pid which QEMU may only
/// aim at itself: `kill(pid, ..)`, `tgkill(tgid, ..)`, `pidfd_open(pid, ..)` (then
/// `pidfd_send_signal`). Every sandbox's QEMU runs as the same user, which could otherwise
/// signal the others. (`tkill`, `rt_sigqueueinfo` and `rt_tgsigqueueinfo` are outside the
/// runtime's allowlist, which QEMU inherits.)
const QEMU_SIGNALS_SELF_ONLY: &[i64] = &[libc::SYS_kill, libc::SYS_tgkill, libc::SYS_pidfd_open];

/// Stands for QEMU's own pid in its signal filter until the child, which knows its pid,
/// replaces it ([`QemuChildFilter::apply_in_child`]). No pid is this large (`pid_max` is at
/// most 2^22), and no other immediate of the program has this value (unit-tested).
const OWN_PID_PLACEHOLDER: u32 = 0x7a5e_1f1d;

/// The longest signal filter [`QemuChildFilter::apply_in_child`] can patch (on its stack).
const SIGNAL_FILTER_MAX: usize = 64;

/// The extra filters a QEMU process installs between fork and exec (see [`qemu_child_filter`]).
#[derive(Debug)]
pub struct QemuChildFilter {
    /// io_uring refused with `ENOSYS`.
    io_uring: BpfProgram,
    /// Signals to any process but itself refused with `EPERM`; its pid is
    /// [`OWN_PID_PLACEHOLDER`] until the child patches it.
    signals: BpfProgram,
}

/// The extra filters a QEMU process installs between fork and exec, where [`init`] ran (`None`
/// otherwise): io_uring fails with `ENOSYS`, so QEMU falls back to ppoll and none of its I/O
/// goes through io_uring, whose operations no seccomp filter sees; and a signal (or pidfd) aimed
/// at any process but QEMU itself fails with `EPERM`.
pub fn qemu_child_filter() -> Result<Option<QemuChildFilter>, SeccompError> {
    if !enabled() {
        return Ok(None);
    }
    compile_qemu_child_filter().map(Some)
}

/// Compiles [`QemuChildFilter`] (whether or not [`init`] ran).
fn compile_qemu_child_filter() -> Result<QemuChildFilter, SeccompError> {
    let compile = |rules, errno: i32| -> Result<BpfProgram, SeccompError> {
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32), TargetArch::x86_64)
            .and_then(|f| f.try_into())
            .map_err(SeccompError::CompileQemu)
    };
    let io_uring = compile(QEMU_REFUSED.iter().map(|&nr| (nr, Vec::new())).collect(), libc::ENOSYS)?;
    let not_self = || -> Result<Vec<SeccompRule>, SeccompError> {
        // The pid argument (a 32-bit pid_t) differs from QEMU's own pid.
        let c = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, u64::from(OWN_PID_PLACEHOLDER))
            .map_err(SeccompError::CompileQemu)?;
        Ok(vec![SeccompRule::new(vec![c]).map_err(SeccompError::CompileQemu)?])
    };
    let mut rules = BTreeMap::new();
    for &nr in QEMU_SIGNALS_SELF_ONLY {
        rules.insert(nr, not_self()?);
    }
    let signals = compile(rules, libc::EPERM)?;
    Ok(QemuChildFilter { io_uring, signals })
}

impl QemuChildFilter {
    /// Installs both filters on the calling process; for a forked child before exec (QEMU keeps
    /// the child's pid through exec): the signal filter is copied onto the stack and given this
    /// process's pid there. Nothing is allocated.
    pub fn apply_in_child(&self) -> std::io::Result<()> {
        apply_in_child(&self.io_uring)?;
        const NOP: sock_filter = sock_filter { code: 0, jt: 0, jf: 0, k: 0 };
        let n = self.signals.len();
        if n > SIGNAL_FILTER_MAX {
            return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
        }
        let mut prog = [NOP; SIGNAL_FILTER_MAX];
        // SAFETY: getpid(2) has no preconditions.
        let pid = unsafe { libc::getpid() } as u32;
        for (dst, src) in prog.iter_mut().zip(&self.signals) {
            *dst = src.clone();
            if dst.k == OWN_PID_PLACEHOLDER {
                dst.k = pid;
            }
        }
        apply_in_child(&prog[..n])
    }
}

/// Installs a compiled filter on the calling thread; for a forked child before exec: it only
/// makes two system calls and does not allocate.
pub fn apply_in_child(filter: &[sock_filter]) -> std::io::Result<()> {
    match seccompiler::apply_filter(filter) {
        Ok(()) => Ok(()),
        Err(seccompiler::Error::Prctl(e)) | Err(seccompiler::Error::Seccomp(e)) => Err(e),
        Err(_) => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// Violations trapped so far in this process ([`Action::Trap`]), and the last one's call.
pub fn violations() -> (u64, Option<i64>) {
    let n = VIOLATIONS.load(Ordering::Relaxed);
    let last = LAST_SYSCALL.load(Ordering::Relaxed);
    (n, (last >= 0).then_some(last))
}

/// The SIGSYS part of `siginfo_t` on x86_64 (`_sigsys` of the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

/// `si_code` of a seccomp SIGSYS.
const SYS_SECCOMP: i32 = 1;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo_t; for SIGSYS its union holds `_sigsys`.
    let info = unsafe { &*(info as *const SigsysInfo) };
    if info.code != SYS_SECCOMP {
        return;
    }
    VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    LAST_SYSCALL.store(i64::from(info.syscall), Ordering::Relaxed);
    // Only async-signal-safe work: format into a stack buffer, one write(2).
    let mut buf = [0u8; 96];
    let mut len = 0;
    for part in [
        &b"joey: seccomp violation: syscall "[..],
        itoa(i64::from(info.syscall), &mut [0u8; 20]),
        &b" on thread "[..],
        // SAFETY: gettid(2) has no preconditions (and is in every allowlist).
        itoa(unsafe { libc::syscall(libc::SYS_gettid) }, &mut [0u8; 20]),
        &b"; failing it with EPERM\n"[..],
    ] {
        let n = part.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: write(2) of our own stack buffer to stderr.
    unsafe { libc::write(2, buf.as_ptr().cast(), len) };
    // The trapped call was not made; make it return -EPERM to its caller.
    // SAFETY: the kernel hands a valid ucontext_t to an SA_SIGINFO handler; RAX holds the
    // return value of the interrupted system call once the handler returns.
    unsafe {
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        uc.uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
    }
}

/// Formats `v` into `buf` (async-signal-safe).
fn itoa(mut v: i64, buf: &mut [u8; 20]) -> &[u8] {
    let neg = v < 0;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10).unsigned_abs() as u8;
        v /= 10;
        if v == 0 || i == 1 {
            break;
        }
    }
    if neg {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler is an
    // `extern "C" fn(c_int, *mut siginfo_t, *mut c_void)` as SA_SIGINFO requires.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Allowlists (x86_64). Collected with scripts/seccomp-trace.sh; see docs/security.md.
// ---------------------------------------------------------------------------------------------

/// What every thread needs: memory, locks, time, signals, its own start and end (the thread
/// names it sets: `prctl(PR_SET_NAME)`, added by [`compile`]), file metadata (std's reads ask for the size first), logging (a formatted line goes to stderr or to the log writer's queue).
const BASE: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fstat,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_lseek,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_read,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_set_robust_list,
    libc::SYS_sigaltstack,
    libc::SYS_statx,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
];

/// Event loops: epoll on eventfds and sockets, timers, fd flags.
const EVENTS: &[i64] = &[
    libc::SYS_dup,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
];

/// The vhost-user protocol: the frontend's socket (messages carrying the memory regions' and
/// vrings' fds), the daemon's request and vring worker threads, the socket file's removal.
const VHOST_PROTOCOL: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_fstat,
    libc::SYS_getdents64,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_statx,
    libc::SYS_unlink,
];

/// The vsock device's host side: unix sockets to and from host processes (hybrid vsock).
const VSOCK_HOST: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_listen,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_socket,
    libc::SYS_unlink,
];

/// virtio-net: frames to and from the tap.
const NET: &[i64] = &[libc::SYS_readv, libc::SYS_writev];

/// virtio-blk: the backing file.
const BLK: &[i64] = &[
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
];

/// virtio-fs: fuse-backend-rs's passthrough file system over the shared directory (every
/// FUSE operation it implements; credentials are switched per request with setres[ug]id; the
/// in-process device gives its thread a private umask with `unshare(CLONE_FS)` at the first
/// request).
const FS: &[i64] = &[
    libc::SYS_copy_file_range,
    libc::SYS_dup,
    libc::SYS_fallocate,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fdatasync,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_flock,
    libc::SYS_fremovexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getuid,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_linkat,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_lseek,
    libc::SYS_lsetxattr,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_name_to_handle_at,
    libc::SYS_newfstatat,
    libc::SYS_open_by_handle_at,
    libc::SYS_openat,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_readlinkat,
    libc::SYS_removexattr,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_setxattr,
    libc::SYS_statx,
    libc::SYS_symlinkat,
    libc::SYS_umask,
    libc::SYS_unshare,
    libc::SYS_unlinkat,
    libc::SYS_utimensat,
];

/// The capped console log (serial output): appends, and the rewrite at the cap.
const CONSOLE_LOG: &[i64] = &[libc::SYS_ftruncate];

/// `KVM_RUN` and the other vCPU ioctls.
const KVM: &[i64] = &[libc::SYS_ioctl];

/// Only the runtime threads: the rest of what the process does (files and directories, mounts,
/// namespaces, netlink, the metrics endpoint, spawning and reaping QEMU and loggers).
const RUNTIME: &[i64] = &[
    libc::SYS_access,
    libc::SYS_arch_prctl,
    libc::SYS_chdir,
    libc::SYS_chmod,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_execve,
    libc::SYS_fchdir,
    libc::SYS_getcwd,
    libc::SYS_getpgid,
    libc::SYS_getppid,
    libc::SYS_getsid,
    libc::SYS_kill,
    libc::SYS_mkdir,
    libc::SYS_mount,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pipe,
    libc::SYS_pipe2,
    // QEMU's jail, between fork and exec (actors/src/hypervisor/jail.rs).
    libc::SYS_pivot_root,
    libc::SYS_prctl,
    libc::SYS_prlimit64,
    libc::SYS_readlink,
    libc::SYS_recvmmsg,
    libc::SYS_rename,
    libc::SYS_rmdir,
    libc::SYS_rt_sigaction,
    libc::SYS_sendmmsg,
    libc::SYS_set_tid_address,
    libc::SYS_setgroups,
    libc::SYS_setns,
    libc::SYS_setpgid,
    libc::SYS_setsid,
    // joey-pool lowers the priority of a booting VM's QEMU threads.
    libc::SYS_setpriority,
    libc::SYS_socketpair,
    libc::SYS_statfs,
    libc::SYS_symlink,
    libc::SYS_sysinfo,
    libc::SYS_umount2,
    libc::SYS_uname,
    libc::SYS_unshare,
    libc::SYS_wait4,
    libc::SYS_waitid,
];

/// What the other processes the runtime spawns need beyond the lists above (they inherit the
/// runtime filter too): containerd's `binary://` loggers, typically a shell and `cat`.
const SPAWNED: &[i64] = &[
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fadvise64,
    libc::SYS_getgroups,
    libc::SYS_getpgrp,
    libc::SYS_getresgid,
    libc::SYS_getresuid,
    libc::SYS_getrusage,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_setitimer,
    libc::SYS_times,
    libc::SYS_vfork,
];

/// What QEMU calls beyond the runtime's list (it inherits the runtime filter; see the module
/// docs): its memory backend, signals, NUMA policy queries, its own seccomp filter, io_uring's
/// probe (refused with ENOSYS by QEMU's extra filter, see [`qemu_child_filter`]).
const QEMU_CHILD: &[i64] = &[
    libc::SYS_get_mempolicy,
    libc::SYS_getpeername,
    libc::SYS_io_uring_setup,
    libc::SYS_mbind,
    libc::SYS_memfd_create,
    libc::SYS_seccomp,
    libc::SYS_sched_setaffinity,
    libc::SYS_set_mempolicy,
    libc::SYS_signalfd4,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_compiles_and_runtime_holds_every_other_list() {
        let runtime = ThreadClass::Runtime.allowlist();
        for class in ThreadClass::ALL {
            for action in [Action::Kill, Action::Trap] {
                assert!(!compile(class, action).unwrap().is_empty(), "{class}");
            }
            for nr in class.allowlist() {
                assert!(runtime.contains(&nr), "{class}: {nr} missing from runtime");
            }
        }
        // A device class never execs.
        for class in [
            ThreadClass::Vcpu,
            ThreadClass::Device,
            ThreadClass::VhostUser,
            ThreadClass::Console,
        ] {
            assert!(!class.allowlist().contains(&libc::SYS_execve), "{class}");
        }
    }

    /// Set in the child processes the tests below run (filters cannot be lifted, so every
    /// test that installs one runs in a child of its own: this test binary, one ignored test).
    const CHILD_ENV: &str = "JOEY_SECCOMP_TEST_CHILD";

    /// Runs the ignored test `name` of this binary in a child process.
    fn run_child(name: &str) -> std::process::Output {
        // The child dies of SIGSYS before its temporary directories are dropped: they go in
        // this one, which is.
        let tmp = tempfile::tempdir().unwrap();
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                name,
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .env("TMPDIR", tmp.path())
            .output()
            .unwrap()
    }

    fn in_child() -> bool {
        std::env::var_os(CHILD_ENV).is_some()
    }

    /// `Seccomp:` of every thread of this process.
    fn seccomp_modes() -> Vec<String> {
        let mut v = Vec::new();
        for t in std::fs::read_dir("/proc/self/task").unwrap() {
            let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
            let line = status.lines().find(|l| l.starts_with("Seccomp:")).unwrap();
            v.push(line.split_whitespace().nth(1).unwrap().to_string());
        }
        v
    }

    /// mkdir(2): in the runtime's list, in no device class's.
    fn mkdir(path: &std::ffi::CStr) -> std::io::Result<()> {
        // SAFETY: mkdir(2) with a valid NUL-terminated path.
        match unsafe { libc::syscall(libc::SYS_mkdir, path.as_ptr(), 0o700) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    #[test]
    fn a_forbidden_call_from_a_device_thread_kills_the_process() {
        let out = run_child("seccomp::tests::child_device_thread_calls_mkdir");
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("filters installed: 2 2"), "{stdout}");
        assert!(!stdout.contains("survived"), "{stdout}");
    }

    #[test]
    #[ignore = "runs in a child process of a_forbidden_call_from_a_device_thread_kills_the_process"]
    fn child_device_thread_calls_mkdir() {
        if !in_child() {
            return;
        }
        init(Action::Kill).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ok = std::ffi::CString::new(dir.path().join("runtime").to_str().unwrap()).unwrap();
        // The runtime class may (and its threads inherit the runtime filter).
        mkdir(&ok).unwrap();
        let bad = std::ffi::CString::new(dir.path().join("device").to_str().unwrap()).unwrap();
        std::thread::spawn(move || {
            apply(ThreadClass::VhostUser).unwrap();
            println!("filters installed: {}", seccomp_modes().join(" "));
            let _ = mkdir(&bad);
            println!("survived");
        })
        .join()
        .unwrap();
        println!("survived");
    }

    #[test]
    fn a_trapped_call_is_logged_counted_and_fails_with_eperm() {
        let out = run_child("seccomp::tests::child_trap_mode");
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stdout.contains(&format!("trapped: EPERM 3 {}", libc::SYS_mkdir)),
            "{stdout}"
        );
        assert!(
            stderr.contains(&format!(
                "joey: seccomp violation: syscall {} on thread ",
                libc::SYS_mkdir
            )),
            "{stderr}"
        );
    }

    #[test]
    #[ignore = "runs in a child process of a_trapped_call_is_logged_counted_and_fails_with_eperm"]
    fn child_trap_mode() {
        if !in_child() {
            return;
        }
        init(Action::Trap).unwrap();
        assert!(matches!(
            init(Action::Trap),
            Err(SeccompError::AlreadyInitialized)
        ));
        let dir = tempfile::tempdir().unwrap();
        let bad = std::ffi::CString::new(dir.path().join("console").to_str().unwrap()).unwrap();
        let created = dir.path().join("created");
        let e = std::thread::spawn(move || {
            apply(ThreadClass::Console).unwrap();
            // Opening read-only is allowed to every class; creating is not.
            std::fs::read_to_string("/proc/self/status").unwrap();
            let c = std::fs::File::create(&created).unwrap_err();
            assert_eq!(c.raw_os_error(), Some(libc::EPERM));
            // Naming itself is allowed; any other prctl option is not.
            // SAFETY: prctl(2) with a NUL-terminated name, then a plain integer option.
            unsafe {
                assert_eq!(libc::prctl(libc::PR_SET_NAME, c"console-test".as_ptr()), 0);
                assert_eq!(libc::prctl(libc::PR_SET_DUMPABLE, 0), -1);
            }
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EPERM)
            );
            mkdir(&bad).unwrap_err()
        })
        .join()
        .unwrap();
        assert!(!dir.path().join("console").exists());
        assert!(!dir.path().join("created").exists());
        let (n, last) = violations();
        let last = last.unwrap();
        println!(
            "trapped: {} {n} {last}",
            if e.raw_os_error() == Some(libc::EPERM) {
                "EPERM"
            } else {
                "other"
            }
        );
    }

    #[test]
    fn qemu_child_filter_refuses_io_uring_and_signals_to_others() {
        let out = run_child("seccomp::tests::child_qemu_filter");
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("io_uring: ENOSYS") && stdout.contains("signals: own only"), "{out:?}");
    }

    #[test]
    #[ignore = "runs in a child process of qemu_child_filter_refuses_io_uring_and_signals_to_others"]
    fn child_qemu_filter() {
        if !in_child() {
            return;
        }
        assert!(
            qemu_child_filter().unwrap().is_none(),
            "no filter before init"
        );
        init(Action::Kill).unwrap();
        let f = qemu_child_filter().unwrap().unwrap();
        f.apply_in_child().unwrap();
        let mut params = [0u8; 120];
        // SAFETY: io_uring_setup(2) with a zeroed params buffer of the kernel's size.
        let rc = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        assert_eq!(rc, -1);
        assert_eq!(errno, Some(libc::ENOSYS));
        println!("io_uring: ENOSYS");
        // Signal 0 checks the target only. Our own process, by pid and by thread: allowed.
        let errno = |rc: libc::c_long| if rc == 0 { 0 } else { std::io::Error::last_os_error().raw_os_error().unwrap() };
        // SAFETY: getpid/gettid/getppid have no preconditions; signal 0 is delivered to no one.
        let (me, tid, parent) = unsafe { (libc::getpid(), libc::gettid(), libc::getppid()) };
        // SAFETY: as above: kill(2), tgkill(2), pidfd_open(2) with signal 0 / no flags.
        let (own, own_thread, own_pidfd) = unsafe {
            (
                errno(libc::kill(me, 0).into()),
                errno(libc::syscall(libc::SYS_tgkill, me, tid, 0)),
                libc::syscall(libc::SYS_pidfd_open, me, 0),
            )
        };
        assert_eq!((own, own_thread), (0, 0));
        assert!(own_pidfd >= 0, "pidfd_open of itself: {}", std::io::Error::last_os_error());
        // SAFETY: closing the pidfd opened above.
        unsafe { libc::close(own_pidfd as i32) };
        // The parent (the test harness), by every route, and every process group: EPERM.
        // SAFETY: as above.
        let others = unsafe {
            [
                errno(libc::kill(parent, 0).into()),
                errno(libc::syscall(libc::SYS_tgkill, parent, parent, 0)),
                errno(libc::syscall(libc::SYS_pidfd_open, parent, 0)),
                errno(libc::kill(0, 0).into()),
                errno(libc::kill(-1, 0).into()),
            ]
        };
        assert_eq!(others, [libc::EPERM; 5]);
        println!("signals: own only");
    }

    #[test]
    fn qemu_signal_filter_has_its_placeholder_once_per_call() {
        let f = compile_qemu_child_filter().unwrap();
        let n = |p: &BpfProgram| p.iter().filter(|i| i.k == OWN_PID_PLACEHOLDER).count();
        assert_eq!(n(&f.signals), QEMU_SIGNALS_SELF_ONLY.len());
        assert_eq!(n(&f.io_uring), 0);
        assert!(f.signals.len() <= SIGNAL_FILTER_MAX, "{}", f.signals.len());
    }

    #[test]
    fn itoa_formats() {
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(itoa(59, &mut [0; 20]), b"59");
        assert_eq!(itoa(-12, &mut [0; 20]), b"-12");
    }
}
