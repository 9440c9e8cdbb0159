//! PID 1 duties: early filesystem mounts, a usable console, environment, resource limits, and
//! the final reboot. Nothing here may abort: every failure is logged and the agent carries on.

use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

use crate::exec::DEFAULT_PATH;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mkdir {path}: {source}")]
    Mkdir {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        fstype: String,
        target: String,
        #[source]
        source: Errno,
    },
    #[error("symlink {link} -> {target}: {source}")]
    Symlink {
        link: String,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("opening a console for stdio: {0}")]
    Console(#[source] io::Error),
    #[error("raising RLIMIT_NOFILE: {0}")]
    Rlimit(#[source] Errno),
}

struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Mounted in this order (a target must exist on a filesystem mounted before it).
const MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    MountSpec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// Symlinks created in /dev when missing: (link, target).
const DEV_LINKS: &[(&str, &str)] = &[
    ("/dev/ptmx", "pts/ptmx"),
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

fn mount_one(m: &MountSpec) -> Result<(), InitError> {
    std::fs::create_dir_all(m.target).map_err(|source| InitError::Mkdir {
        path: m.target.into(),
        source,
    })?;
    match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
        // Already mounted (e.g. by a kernel with CONFIG_DEVTMPFS_MOUNT on a disk root).
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(source) => Err(InitError::Mount {
            fstype: m.fstype.into(),
            target: m.target.into(),
            source,
        }),
    }
}

fn link_if_missing(link: &str, target: &str) -> Result<(), InitError> {
    if Path::new(link).symlink_metadata().is_ok() {
        return Ok(());
    }
    std::os::unix::fs::symlink(target, link).map_err(|source| InitError::Symlink {
        link: link.into(),
        target: target.into(),
        source,
    })
}

fn fd_is_open(fd: i32) -> bool {
    fcntl(fd, FcntlArg::F_GETFD).is_ok()
}

/// Without /dev/console in the initramfs the kernel starts init with fds 0-2 closed. Fill the
/// holes with /dev/console (from devtmpfs) so logs reach the serial console and later opens do
/// not land on 0-2.
fn ensure_stdio() -> Result<(), InitError> {
    if (0..=2).all(fd_is_open) {
        return Ok(());
    }
    let console: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
        .or_else(|_| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
        })
        .map_err(InitError::Console)?
        .into();
    let raw = console.as_raw_fd();
    for fd in 0..=2 {
        if fd != raw && !fd_is_open(fd) {
            nix::unistd::dup2(raw, fd).map_err(|e| InitError::Console(e.into()))?;
        }
    }
    if raw <= 2 {
        // The console landed on one of the stdio slots: keep it open there. std opened it with
        // O_CLOEXEC, which stdio must not have.
        let raw = console.into_raw_fd();
        fcntl(raw, FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))
            .map_err(|e| InitError::Console(e.into()))?;
    }
    Ok(())
}

/// Raises the soft fd limit to the hard limit (the kernel starts init with 1024/4096).
fn raise_nofile() -> Result<(), InitError> {
    let (_soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(InitError::Rlimit)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(InitError::Rlimit)
}

/// Everything PID 1 does before serving. Never fails: problems are logged.
pub fn setup_pid1() {
    let mut devtmpfs_ok = false;
    for (i, m) in MOUNTS.iter().enumerate() {
        match mount_one(m) {
            Ok(()) => devtmpfs_ok |= i == 0,
            Err(e) => agent_log!("{e}"),
        }
        if i == 0 && devtmpfs_ok {
            if let Err(e) = ensure_stdio() {
                agent_log!("{e}");
            }
        }
    }
    for (link, target) in DEV_LINKS {
        if let Err(e) = link_if_missing(link, target) {
            agent_log!("{e}");
        }
    }
    if let Err(e) = raise_nofile() {
        agent_log!("{e}");
    }
    // The guest's network namespace is the pod's: its containers share it and reach each other
    // on localhost.
    if let Err(e) = crate::steps::run_op(&crate::steps::Op::LoopbackUp) {
        agent_log!("bring up lo: {e}");
    }
    // Runs before any thread exists, so changing the environment is sound.
    std::env::set_var("PATH", DEFAULT_PATH);
    if std::env::var_os("HOME").is_none() {
        std::env::set_var("HOME", "/root");
    }
}

/// Syncs and reboots; with QEMU's -no-reboot this ends the VM. Never returns: if rebooting
/// fails, PID 1 must still not exit (that would panic the kernel).
pub fn reboot_now() -> ! {
    nix::unistd::sync();
    // reboot() only returns on failure.
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    agent_log!("reboot failed: {e}; trying power-off");
    let Err(e) = reboot(RebootMode::RB_POWER_OFF);
    agent_log!("power-off failed: {e}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_targets_come_after_their_parents() {
        // /dev first (everything under it needs devtmpfs), /sys before /sys/fs/cgroup.
        assert_eq!(MOUNTS[0].target, "/dev");
        let pos = |t: &str| MOUNTS.iter().position(|m| m.target == t).expect("listed");
        assert!(pos("/sys") < pos("/sys/fs/cgroup"));
        assert!(pos("/dev") < pos("/dev/pts"));
        assert!(pos("/dev") < pos("/dev/shm"));
    }

    #[test]
    fn devpts_is_a_private_instance_with_usable_ptmx() {
        let devpts = MOUNTS
            .iter()
            .find(|m| m.fstype == "devpts")
            .expect("devpts listed");
        let data = devpts.data.expect("options");
        assert!(data.contains("newinstance"));
        assert!(data.contains("ptmxmode=0666"));
    }
}
