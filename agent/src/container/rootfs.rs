//! Checks and lookups done before forking: ids, hostnames, the rootfs path, the program and
//! working directory looked up *inside* the rootfs (`openat2(RESOLVE_IN_ROOT)`, so absolute
//! symlinks resolve as they will in the container), mount destinations resolved without
//! leaving the rootfs ([`secure_join`]), bind sources kept inside the share, HOME from the
//! rootfs's /etc/passwd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, FileStat, Mode};

use super::ContainerError;
use crate::exec::{parse_env, ExecError, DEFAULT_PATH};
use crate::spec::{
    is_clean_absolute, ContainerConfig, MountKind, ProcessConfig, UserConfig, ALLOWED_GUEST_SOURCES,
};

/// Longest hostname (HOST_NAME_MAX).
pub const MAX_HOSTNAME_LEN: usize = 64;

/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
pub fn validate_id(id: &str) -> Result<(), ContainerError> {
    if joey_agent_protocol::is_valid_container_id(id) {
        Ok(())
    } else {
        Err(ContainerError::InvalidId(id.to_string()))
    }
}

pub(super) fn validate_hostname(h: &str) -> Result<(), ContainerError> {
    let ok = !h.is_empty()
        && h.len() <= MAX_HOSTNAME_LEN
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
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
        return Err(bad(
            "expected an absolute path without '.' or '..' components",
        ));
    }
    match Path::new(rootfs).strip_prefix(shared_dir) {
        Ok(rest) if rest.components().next().is_some() => Ok(()),
        _ => Err(bad(&format!("must be below {shared_dir}"))),
    }
}

/// A process's program (argv[0]), environment and working directory, checked before any
/// lookup in the rootfs.
pub(super) struct ProcessArgs {
    pub(super) program: String,
    pub(super) env: Vec<(String, String)>,
    /// Clean and absolute ("/" when the spec gives none).
    pub(super) cwd: String,
}

impl ProcessArgs {
    pub(super) fn check(p: &ProcessConfig) -> Result<Self, ContainerError> {
        let program = p.args.first().ok_or(ExecError::EmptyArgv)?.clone();
        if p.args.iter().any(|a| a.contains('\0')) {
            return Err(ExecError::NulByte { what: "argv" }.into());
        }
        let env = parse_env(&p.env)?;
        let cwd = if p.cwd.is_empty() {
            "/".to_string()
        } else {
            p.cwd.clone()
        };
        if !is_clean_absolute(&cwd) {
            return Err(ContainerError::InvalidCwd(cwd));
        }
        Ok(ProcessArgs { program, env, cwd })
    }
}

/// The search path for the program: the environment's last PATH, else [`DEFAULT_PATH`].
pub(super) fn path_var(env: &[(String, String)]) -> String {
    env.iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| DEFAULT_PATH.to_string())
}

/// Opens the directory `path` (`O_PATH`) as the root of the lookups below.
pub(super) fn open_dir(path: &str) -> Result<OwnedFd, ContainerError> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| ContainerError::OpenRootfs {
        path: path.to_string(),
        source,
    })?;
    // SAFETY: open just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat` of `path` resolved inside the directory `root` as if it were `/`.
pub(super) fn stat_in_root(root: RawFd, path: &str) -> Result<FileStat, Errno> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT);
    let fd = openat2(root, path, how)?;
    // SAFETY: openat2 just returned this fd and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    fstat(fd.as_raw_fd())
}

pub(super) fn is_dir(st: &FileStat) -> bool {
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

/// Most symlinks followed while resolving one path in the rootfs (Linux's MAXSYMLINKS).
const MAX_SYMLINKS: usize = 40;

/// Resolves `path` inside the directory `root` as the container will see it: symlinks are
/// followed within `root` (absolute targets start again at `root`, `..` stops at it) and the
/// part that does not exist is kept as written. Returns an absolute in-container path whose
/// existing part has no symlinks, so that the child, which mounts before `pivot_root`, never
/// follows a rootfs symlink out of the rootfs (runc's securejoin).
pub fn secure_join(root: &Path, path: &str) -> Result<String, ContainerError> {
    let mut todo: std::collections::VecDeque<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect();
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

/// Canonicalises the bind sources (symlinks inside the share must not lead out of it) and
/// says which ones are not directories (they get a file mountpoint).
pub(super) fn resolve_binds(
    c: &mut ContainerConfig,
    shared_dir: &str,
) -> Result<Vec<bool>, ContainerError> {
    let mut files = Vec::with_capacity(c.mounts.len());
    for (i, m) in c.mounts.iter_mut().enumerate() {
        let MountKind::Bind { source, .. } = &mut m.kind else {
            files.push(false);
            continue;
        };
        let real =
            std::fs::canonicalize(&*source).map_err(|e| ContainerError::BindSourceMissing {
                index: i,
                destination: m.destination.clone(),
                source_path: source.clone(),
                reason: e.to_string(),
            })?;
        let real_s = real.to_string_lossy().into_owned();
        let inside = real
            .strip_prefix(shared_dir)
            .is_ok_and(|r| r.components().next().is_some());
        if !inside && !ALLOWED_GUEST_SOURCES.contains(&real_s.as_str()) {
            return Err(ContainerError::BindSourceOutside {
                index: i,
                destination: m.destination.clone(),
                source_path: format!("{source} (resolves to {real_s})"),
            });
        }
        let is_dir = std::fs::metadata(&real)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        *source = real_s;
        files.push(!is_dir);
    }
    Ok(files)
}

/// True when an in-container path may be provided by a mount (not visible in the rootfs
/// before the child mounts it).
pub(super) fn covered_by_mount(c: &ContainerConfig, path: &str) -> bool {
    c.mounts.iter().any(|m| {
        !is_system_dest(&m.destination)
            && (path == m.destination || path.starts_with(&format!("{}/", m.destination)))
    })
}

/// /dev, /proc, /sys and below: mounts that never hold a program or a working directory.
pub(super) fn is_system_dest(d: &str) -> bool {
    ["/dev", "/proc", "/sys"]
        .iter()
        .any(|s| d == *s || d.strip_prefix(s).is_some_and(|r| r.starts_with('/')))
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
    if !file.metadata().is_ok_and(|m| m.is_file())
        || file
            .take(MAX_PASSWD_BYTES)
            .read_to_string(&mut text)
            .is_err()
    {
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
pub(super) fn with_home(
    mut env: Vec<(String, String)>,
    root: RawFd,
    user: Option<&UserConfig>,
) -> Vec<(String, String)> {
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push((
            "HOME".into(),
            home_in_rootfs(root, user.map_or(0, |u| u.uid)),
        ));
    }
    env
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
        let root = open_dir(d.path().to_str().unwrap()).expect("open");
        // No /etc/passwd: "/".
        assert_eq!(home_in_rootfs(root.as_raw_fd(), 0), "/");
        std::fs::create_dir(d.path().join("etc")).expect("mkdir");
        std::fs::write(d.path().join("etc/passwd"), text).expect("write");
        assert_eq!(home_in_rootfs(root.as_raw_fd(), 1000), "/home/u");
        let env = with_home(vec![("A".into(), "b".into())], root.as_raw_fd(), None);
        assert_eq!(
            env,
            vec![("A".into(), "b".into()), ("HOME".into(), "/root".into())]
        );
        let env = with_home(vec![("HOME".into(), "/x".into())], root.as_raw_fd(), None);
        assert_eq!(env, vec![("HOME".into(), "/x".into())]);
    }

    #[test]
    fn lookup_resolves_symlinks_inside_the_rootfs() {
        let d = tempfile::tempdir().expect("tempdir");
        let bin = d.path().join("bin");
        std::fs::create_dir(&bin).expect("mkdir");
        std::fs::write(bin.join("busybox"), b"x").expect("write");
        std::fs::set_permissions(bin.join("busybox"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::write(bin.join("data"), b"x").expect("write");
        // Absolute target: only valid when resolved inside the rootfs.
        std::os::unix::fs::symlink("/bin/busybox", bin.join("sh")).expect("symlink");
        let root = open_dir(d.path().to_str().unwrap()).expect("open");
        let r = root.as_raw_fd();
        assert_eq!(
            resolve_in_rootfs(r, "sh", "/usr/bin:/bin", "/").unwrap(),
            "/bin/sh"
        );
        assert_eq!(
            resolve_in_rootfs(r, "./bin/sh", "", "/").unwrap(),
            "/bin/sh"
        );
        assert_eq!(
            resolve_in_rootfs(r, "busybox", "bin", "/").unwrap(),
            "/bin/busybox"
        );
        let e = resolve_in_rootfs(r, "nope", "/bin", "/").unwrap_err();
        assert_eq!(
            e.to_string(),
            "executable file not found in the container rootfs: nope"
        );
        assert!(matches!(
            resolve_in_rootfs(r, "data", "/bin", "/"),
            Err(ContainerError::NotExecutable(_))
        ));
        // `..` cannot climb out of the rootfs.
        assert!(resolve_in_rootfs(r, "/../../bin/busybox", "", "/").is_ok());
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
        assert_eq!(
            secure_join(r, "/var-run/secrets/token").unwrap(),
            "/run/secrets/token"
        );
        // A dangling symlink resolves to where its target would be.
        assert_eq!(
            secure_join(r, "/usr/resolv.conf").unwrap(),
            "/run/systemd/stub.conf"
        );
        // `..` (written or in a link) stops at the root.
        assert_eq!(secure_join(r, "/usr/lib/up/shadow").unwrap(), "/etc/shadow");
        assert_eq!(secure_join(r, "/../../x/./y").unwrap(), "/x/y");
        assert_eq!(secure_join(r, "/").unwrap(), "/");
        assert!(matches!(
            secure_join(r, "/loop/x"),
            Err(ContainerError::SymlinkLoop(_))
        ));
    }

    #[test]
    fn system_destinations() {
        assert!(is_system_dest("/dev") && is_system_dest("/dev/shm") && is_system_dest("/proc"));
        assert!(!is_system_dest("/device") && !is_system_dest("/data"));
    }
}
