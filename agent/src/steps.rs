//! Precomputed setup steps that a forked child runs between fork and exec.
//!
//! Every step is built before forking (paths are C strings, lists are vectors, the seccomp
//! program is compiled) and [`run_op`] makes raw syscalls only: no allocation, no locks, so
//! the steps are async-signal-safe in the child of a multi-threaded agent. [`process_steps`]
//! is the one builder of the "who the process is" steps (rlimits, capabilities, user,
//! no_new_privs, seccomp) shared by CreateContainer and an exec in a container.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;

use crate::exec::ExecError;
use crate::seccomp::{self, Filter};
use crate::spec::{CapSets, ProcessConfig};

const PR_CAP_AMBIENT: libc::c_int = 47;
const PR_CAP_AMBIENT_RAISE: libc::c_ulong = 2;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const IFF_UP: libc::c_short = 1;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Highest capability number assumed when /proc/sys/kernel/cap_last_cap cannot be read.
pub const DEFAULT_LAST_CAP: u32 = 40;

/// One setup step of the child, everything already in the form the syscall takes.
#[derive(Debug)]
pub enum Op {
    Unshare(libc::c_int),
    Setns(RawFd, libc::c_int),
    Umask(libc::mode_t),
    Mount {
        src: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// mkdir; an existing directory is fine.
    Mkdir(CString, libc::mode_t),
    /// Creates an empty file as a bind mountpoint; an existing entry is fine.
    CreateFile(CString),
    /// mknod; an existing entry is fine.
    Mknod(CString, libc::mode_t, libc::dev_t),
    /// symlink; an existing entry is fine.
    Symlink { target: CString, link: CString },
    Sethostname(CString),
    Chroot(CString),
    Chdir(CString),
    /// fchdir(2) to a directory fd opened before the fork.
    Fchdir(RawFd),
    /// `pivot_root(".", ".")`.
    PivotRootHere,
    /// `umount2(".", MNT_DETACH)`.
    DetachHere,
    /// `umount2(path, MNT_DETACH)`; a path that is no mount point (any more) is fine.
    Detach(CString),
    /// write(2) of the bytes to an fd opened before the fork (cgroup.procs).
    WriteFd(RawFd, &'static [u8]),
    /// open + write + close (a /proc file).
    WriteFile(CString, CString),
    /// Brings the loopback interface of the current network namespace up.
    LoopbackUp,
    /// /dev/null over a file, a read-only tmpfs over a directory; a missing path is fine.
    MaskPath(CString),
    /// A read-only bind of the path onto itself; a missing path is fine.
    ReadonlyPath(CString),
    Setrlimit(u32, u64, u64),
    Prctl(libc::c_int, libc::c_ulong),
    /// Drops every bounding capability up to `last` that is not in `keep`.
    CapbsetDrop { keep: u64, last: u32 },
    Setgroups(Vec<libc::gid_t>),
    Setresgid(libc::gid_t),
    Setresuid(libc::uid_t),
    Capset(CapSets),
    /// Raises each ambient capability of the mask.
    Ambient(u64, u32),
    Seccomp(Filter),
}

/// A step and its description (for the error that names it).
#[derive(Debug)]
pub struct Step {
    pub what: String,
    pub op: Op,
}

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// `stat(2)` file type bits of `p`, or the errno.
fn file_type(p: &CString) -> Result<libc::mode_t, i32> {
    // SAFETY: zeroed `stat` is a valid out-buffer; `p` is a live C string.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::stat(p.as_ptr(), &mut st) == 0 {
            Ok(st.st_mode & libc::S_IFMT)
        } else {
            Err(last_errno())
        }
    }
}

#[repr(C)]
struct IfreqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Runs one step. Async-signal-safe: raw syscalls on prepared data, no allocation.
pub fn run_op(op: &Op) -> io::Result<()> {
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    let tolerate = |rc: libc::c_int, errno: i32| {
        if rc != 0 && last_errno() == errno {
            0
        } else {
            rc
        }
    };
    // SAFETY (all calls below): every pointer comes from a live value owned by the step (or
    // is null where the syscall allows it) or from a local on this stack frame; the calls
    // take no other memory.
    let rc: libc::c_int = unsafe {
        match op {
            Op::Unshare(flags) => libc::unshare(*flags),
            Op::Setns(fd, nstype) => libc::setns(*fd, *nstype),
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
            } => libc::mount(ptr(src), target.as_ptr(), ptr(fstype), *flags, ptr(data) as *const libc::c_void),
            Op::Mkdir(p, mode) => {
                let rc = libc::mkdir(p.as_ptr(), *mode);
                if rc != 0 && file_type(p) == Ok(libc::S_IFDIR) {
                    0
                } else {
                    rc
                }
            }
            Op::CreateFile(p) => {
                let fd = libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC, 0o644);
                if fd >= 0 {
                    libc::close(fd);
                    0
                } else if file_type(p).is_ok() {
                    0
                } else {
                    -1
                }
            }
            Op::Mknod(p, mode, dev) => tolerate(libc::mknod(p.as_ptr(), *mode, *dev), libc::EEXIST),
            Op::Symlink { target, link } => tolerate(libc::symlink(target.as_ptr(), link.as_ptr()), libc::EEXIST),
            Op::Sethostname(h) => libc::sethostname(h.as_ptr(), h.as_bytes().len()),
            Op::Chroot(p) => libc::chroot(p.as_ptr()),
            Op::Chdir(p) => libc::chdir(p.as_ptr()),
            Op::Fchdir(fd) => libc::fchdir(*fd),
            Op::PivotRootHere => {
                let dot = c".".as_ptr();
                libc::syscall(libc::SYS_pivot_root, dot, dot) as libc::c_int
            }
            Op::DetachHere => libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            Op::Detach(p) => {
                let rc = libc::umount2(p.as_ptr(), libc::MNT_DETACH);
                if rc != 0 && matches!(last_errno(), libc::EINVAL | libc::ENOENT) {
                    0
                } else {
                    rc
                }
            }
            Op::WriteFd(fd, data) => {
                let n = libc::write(*fd, data.as_ptr() as *const libc::c_void, data.len());
                if n == data.len() as isize {
                    0
                } else {
                    -1
                }
            }
            Op::WriteFile(p, data) => {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    -1
                } else {
                    let b = data.as_bytes();
                    let n = libc::write(fd, b.as_ptr() as *const libc::c_void, b.len());
                    let errno = last_errno();
                    libc::close(fd);
                    if n == b.len() as isize {
                        0
                    } else {
                        *libc::__errno_location() = if n < 0 { errno } else { libc::EIO };
                        -1
                    }
                }
            }
            Op::LoopbackUp => {
                let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
                if s < 0 {
                    -1
                } else {
                    let mut ifr = IfreqFlags {
                        name: [0; 16],
                        flags: 0,
                        _pad: [0; 22],
                    };
                    ifr.name[..2].copy_from_slice(b"lo");
                    let mut rc = libc::ioctl(s, SIOCGIFFLAGS as _, &mut ifr as *mut IfreqFlags);
                    if rc == 0 {
                        ifr.flags |= IFF_UP;
                        rc = libc::ioctl(s, SIOCSIFFLAGS as _, &ifr as *const IfreqFlags);
                    }
                    let errno = last_errno();
                    libc::close(s);
                    *libc::__errno_location() = errno;
                    rc
                }
            }
            Op::MaskPath(p) => match file_type(p) {
                Err(libc::ENOENT) => 0,
                Err(e) => {
                    *libc::__errno_location() = e;
                    -1
                }
                Ok(libc::S_IFDIR) => libc::mount(
                    c"tmpfs".as_ptr(),
                    p.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_RDONLY,
                    std::ptr::null(),
                ),
                Ok(_) => libc::mount(
                    c"/dev/null".as_ptr(),
                    p.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ),
            },
            Op::ReadonlyPath(p) => {
                let rc = libc::mount(p.as_ptr(), p.as_ptr(), std::ptr::null(), libc::MS_BIND | libc::MS_REC, std::ptr::null());
                if rc != 0 {
                    tolerate(rc, libc::ENOENT)
                } else {
                    libc::mount(
                        p.as_ptr(),
                        p.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
                        std::ptr::null(),
                    )
                }
            }
            Op::Setrlimit(res, soft, hard) => {
                let lim = libc::rlimit64 {
                    rlim_cur: *soft,
                    rlim_max: *hard,
                };
                libc::syscall(libc::SYS_prlimit64, 0, *res, &lim as *const libc::rlimit64, std::ptr::null_mut::<libc::rlimit64>())
                    as libc::c_int
            }
            Op::Prctl(opt, arg) => libc::prctl(*opt, *arg, 0, 0, 0),
            Op::CapbsetDrop { keep, last } => {
                let mut rc = 0;
                for c in 0..=*last {
                    if keep & (1u64 << c) == 0 && libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) != 0 {
                        rc = -1;
                        break;
                    }
                }
                rc
            }
            Op::Setgroups(g) => libc::syscall(libc::SYS_setgroups, g.len(), g.as_ptr()) as libc::c_int,
            Op::Setresgid(g) => libc::syscall(libc::SYS_setresgid, *g, *g, *g) as libc::c_int,
            Op::Setresuid(u) => libc::syscall(libc::SYS_setresuid, *u, *u, *u) as libc::c_int,
            Op::Capset(c) => {
                let hdr = CapHeader {
                    version: LINUX_CAPABILITY_VERSION_3,
                    pid: 0,
                };
                let data = [
                    CapData {
                        effective: c.effective as u32,
                        permitted: c.permitted as u32,
                        inheritable: c.inheritable as u32,
                    },
                    CapData {
                        effective: (c.effective >> 32) as u32,
                        permitted: (c.permitted >> 32) as u32,
                        inheritable: (c.inheritable >> 32) as u32,
                    },
                ];
                libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) as libc::c_int
            }
            Op::Ambient(mask, last) => {
                let mut rc = 0;
                for c in 0..=*last {
                    if mask & (1u64 << c) != 0
                        && libc::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, c as libc::c_ulong, 0, 0) != 0
                    {
                        rc = -1;
                        break;
                    }
                }
                rc
            }
            Op::Seccomp(f) => match seccomp::install(f) {
                Ok(()) => 0,
                Err(e) => {
                    *libc::__errno_location() = e.raw_os_error().unwrap_or(libc::EIO);
                    -1
                }
            },
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn cstr(s: &str) -> Result<CString, ExecError> {
    CString::new(s).map_err(|_| ExecError::NulByte { what: "path" })
}

/// The highest capability number of the running kernel.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_LAST_CAP)
        .min(63)
}

/// The identity steps of a process, in runc's order: oom_score_adj, rlimits, (seccomp here
/// when no_new_privs is off: it needs CAP_SYS_ADMIN, which may be dropped below), bounding
/// set, keep-caps + groups/gid/uid, cwd, capset + ambient, umask, no_new_privs, seccomp.
/// `cwd` is the in-container working directory (already absolute).
pub fn process_steps(
    p: &ProcessConfig,
    cwd: &str,
    filter: Option<&Filter>,
    last_cap: u32,
) -> Result<Vec<Step>, ExecError> {
    let mut s = Vec::new();
    let mut push = |what: String, op: Op| s.push(Step { what, op });
    if let Some(adj) = p.oom_score_adj {
        push(
            format!("set oom_score_adj {adj}"),
            Op::WriteFile(cstr("/proc/self/oom_score_adj")?, cstr(&adj.to_string())?),
        );
    }
    for r in &p.rlimits {
        push(format!("setrlimit {} {} {}", r.name, r.soft, r.hard), Op::Setrlimit(r.resource, r.soft, r.hard));
    }
    if let Some(f) = filter.filter(|_| !p.no_new_privs) {
        push("install the seccomp filter".into(), Op::Seccomp(f.clone()));
    }
    if let Some(c) = &p.caps {
        push("drop bounding capabilities".into(), Op::CapbsetDrop { keep: c.bounding, last: last_cap });
    }
    if let Some(u) = &p.user {
        if p.caps.is_some() {
            push("keep capabilities across setuid".into(), Op::Prctl(libc::PR_SET_KEEPCAPS, 1));
        }
        push(format!("setgroups {:?}", u.additional_gids), Op::Setgroups(u.additional_gids.clone()));
        push(format!("setgid {}", u.gid), Op::Setresgid(u.gid));
        push(format!("setuid {}", u.uid), Op::Setresuid(u.uid));
        if p.caps.is_some() {
            push("clear keep-capabilities".into(), Op::Prctl(libc::PR_SET_KEEPCAPS, 0));
        }
    }
    push(format!("chdir {cwd}"), Op::Chdir(cstr(cwd)?));
    if let Some(c) = &p.caps {
        push("set capabilities".into(), Op::Capset(*c));
        if c.ambient != 0 {
            push("raise ambient capabilities".into(), Op::Ambient(c.ambient, last_cap));
        }
    }
    let umask = p.user.as_ref().and_then(|u| u.umask).unwrap_or(0o022);
    push(format!("umask {umask:o}"), Op::Umask(umask as libc::mode_t));
    if p.no_new_privs {
        push("set no_new_privs".into(), Op::Prctl(libc::PR_SET_NO_NEW_PRIVS, 1));
        if let Some(f) = filter {
            push("install the seccomp filter".into(), Op::Seccomp(f.clone()));
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Rlimit, UserConfig};

    fn names(s: &[Step]) -> Vec<&str> {
        s.iter().map(|s| s.what.as_str()).collect()
    }

    fn filter() -> Filter {
        let p: oci_spec::runtime::LinuxSeccomp = serde_json::from_str(r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).unwrap();
        seccomp::compile(&p).unwrap()
    }

    #[test]
    fn order_with_no_new_privs() {
        let p = ProcessConfig {
            user: Some(UserConfig { uid: 1000, gid: 100, additional_gids: vec![5], umask: Some(0o027) }),
            rlimits: vec![Rlimit { name: "RLIMIT_NOFILE".into(), resource: 7, soft: 10, hard: 20 }],
            caps: Some(CapSets { bounding: 1, effective: 1, permitted: 1, inheritable: 0, ambient: 1 }),
            no_new_privs: true,
            oom_score_adj: Some(100),
            ..Default::default()
        };
        let s = process_steps(&p, "/work", Some(&filter()), 40).unwrap();
        assert_eq!(
            names(&s),
            vec![
                "set oom_score_adj 100",
                "setrlimit RLIMIT_NOFILE 10 20",
                "drop bounding capabilities",
                "keep capabilities across setuid",
                "setgroups [5]",
                "setgid 100",
                "setuid 1000",
                "clear keep-capabilities",
                "chdir /work",
                "set capabilities",
                "raise ambient capabilities",
                "umask 27",
                "set no_new_privs",
                "install the seccomp filter",
            ]
        );
    }

    #[test]
    fn seccomp_first_without_no_new_privs_and_nothing_for_flat_processes() {
        let p = ProcessConfig {
            user: Some(UserConfig { uid: 0, gid: 0, additional_gids: vec![], umask: None }),
            ..Default::default()
        };
        let s = process_steps(&p, "/", Some(&filter()), 40).unwrap();
        assert_eq!(names(&s), vec!["install the seccomp filter", "setgroups []", "setgid 0", "setuid 0", "chdir /", "umask 22"]);
        let s = process_steps(&ProcessConfig::default(), "/", None, 40).unwrap();
        assert_eq!(names(&s), vec!["chdir /", "umask 22"]);
    }

    #[test]
    fn file_steps_tolerate_existing_entries_and_report_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| cstr(&d.path().join(n).display().to_string()).unwrap();
        run_op(&Op::Mkdir(p("a"), 0o755)).unwrap();
        run_op(&Op::Mkdir(p("a"), 0o755)).unwrap();
        run_op(&Op::CreateFile(p("f"))).unwrap();
        run_op(&Op::CreateFile(p("f"))).unwrap();
        assert!(d.path().join("f").is_file());
        let e = run_op(&Op::Mkdir(p("f"), 0o755)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        let e = run_op(&Op::Mkdir(p("missing/x"), 0o755)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        run_op(&Op::Symlink { target: cstr("/x").unwrap(), link: p("l") }).unwrap();
        run_op(&Op::Symlink { target: cstr("/x").unwrap(), link: p("l") }).unwrap();
        run_op(&Op::WriteFile(p("f"), cstr("hello").unwrap())).unwrap();
        assert_eq!(std::fs::read_to_string(d.path().join("f")).unwrap(), "hello");
        let e = run_op(&Op::WriteFile(p("nope/f"), cstr("x").unwrap())).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // A missing path is fine for masking.
        run_op(&Op::MaskPath(p("absent"))).unwrap();
    }
}
