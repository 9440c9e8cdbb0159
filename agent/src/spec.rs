//! The agent's description of a container and of a process to start in it, built either from
//! the OCI runtime spec (`CreateContainerRequest.oci_spec_json`, `ExecProcessRequest.
//! oci_process_json`) or from the flat request fields, so that one code path starts both.
//!
//! Everything here is pure translation and validation (no filesystem access): bad content is a
//! [`SpecError`] naming the culprit, before anything is forked. See docs/agent.md for what is
//! honoured and what is ignored.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process, Spec};
use serde_json::Value;

use crate::cgroup;
use crate::seccomp::{self, Filter, SeccompError};

/// Guest device nodes that may be bind-mounted into a container besides the shared directory.
pub const ALLOWED_GUEST_SOURCES: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"];

/// Errors of this module (all are bad request content: INVALID_ARGUMENT).
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid OCI spec: {0}")]
    Json(String),
    #[error("invalid OCI spec: {0} is missing")]
    Missing(&'static str),
    #[error("invalid rlimit type {0:?}")]
    InvalidRlimit(String),
    #[error("invalid rlimit {name}: soft limit {soft} exceeds hard limit {hard}")]
    RlimitOrder { name: String, soft: u64, hard: u64 },
    #[error("invalid capability {name:?} in the {set} set")]
    InvalidCapability { set: &'static str, name: String },
    #[error("mount {index} ({destination}): {reason}")]
    Mount {
        index: usize,
        destination: String,
        reason: String,
    },
    #[error("{0} namespaces are not supported")]
    UnsupportedNamespace(&'static str),
    #[error("invalid sysctl {key:?}: {reason}")]
    InvalidSysctl { key: String, reason: String },
    #[error("invalid {what} {path:?}: expected an absolute path without '.' or '..' components")]
    InvalidPath { what: &'static str, path: String },
    #[error("invalid cwd {0:?}: expected an absolute path")]
    InvalidCwd(String),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Resources(#[from] cgroup::CgroupError),
}

/// `process.user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserConfig {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
}

/// One `process.rlimits` entry, with the resource number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rlimit {
    pub name: String,
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// `process.capabilities` as bit masks (bit n = capability n).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

/// What a process runs as and with.
#[derive(Debug, Clone, Default)]
pub struct ProcessConfig {
    pub args: Vec<String>,
    pub env: Vec<String>,
    /// Absolute; empty means "/".
    pub cwd: String,
    pub terminal: bool,
    /// `None`: keep the agent's identity (root), as the flat fields do.
    pub user: Option<UserConfig>,
    pub rlimits: Vec<Rlimit>,
    /// `None`: leave the capability sets alone.
    pub caps: Option<CapSets>,
    pub no_new_privs: bool,
    pub oom_score_adj: Option<i32>,
}

/// Where a mount comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountKind {
    /// A guest path (below the shared directory, or one of [`ALLOWED_GUEST_SOURCES`]).
    Bind { source: String, recursive: bool },
    /// A kernel filesystem: proc, sysfs, tmpfs, devpts, mqueue, cgroup2.
    Fs { fstype: String, source: String },
}

/// One mount, in spec order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub destination: String,
    pub kind: MountKind,
    /// MS_* flags other than MS_BIND/MS_REC and propagation.
    pub flags: libc::c_ulong,
    /// MS_PRIVATE/MS_SHARED/MS_SLAVE/MS_UNBINDABLE, possibly with MS_REC; 0 if none.
    pub propagation: libc::c_ulong,
    /// Filesystem options (mode=, size=, newinstance, ...), comma-joined.
    pub data: String,
}

/// Everything needed to start a container.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub id: String,
    /// Guest path of the rootfs (checked to be below the shared directory by the caller).
    pub root: String,
    pub readonly_root: bool,
    /// Empty: the container id.
    pub hostname: String,
    pub process: ProcessConfig,
    pub mounts: Vec<MountEntry>,
    /// Create runc's default /dev nodes and symlinks (/dev is not a bind mount).
    pub dev_nodes: bool,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    /// (key, value), sorted by key.
    pub sysctl: Vec<(String, String)>,
    pub new_net_ns: bool,
    pub new_cgroup_ns: bool,
    /// False when the spec gives the uts namespace a path (a CRI pod's): the container stays in
    /// the guest's UTS namespace, which is the pod's.
    pub new_uts_ns: bool,
    /// False when the spec gives the ipc namespace a path (a CRI pod's): the guest's, the pod's.
    pub new_ipc_ns: bool,
    pub resources: Option<LinuxResources>,
    pub seccomp: Option<Filter>,
}

/// An absolute path made of normal components only (no `.`, `..`, NUL).
pub fn is_clean_absolute(p: &str) -> bool {
    !p.contains('\0') && p.starts_with('/') && p.split('/').all(|c| c != "." && c != "..")
}

/// Linux resource numbers of the OCI rlimit names.
const RLIMITS: &[(&str, u32)] = &[
    ("RLIMIT_CPU", 0),
    ("RLIMIT_FSIZE", 1),
    ("RLIMIT_DATA", 2),
    ("RLIMIT_STACK", 3),
    ("RLIMIT_CORE", 4),
    ("RLIMIT_RSS", 5),
    ("RLIMIT_NPROC", 6),
    ("RLIMIT_NOFILE", 7),
    ("RLIMIT_MEMLOCK", 8),
    ("RLIMIT_AS", 9),
    ("RLIMIT_LOCKS", 10),
    ("RLIMIT_SIGPENDING", 11),
    ("RLIMIT_MSGQUEUE", 12),
    ("RLIMIT_NICE", 13),
    ("RLIMIT_RTPRIO", 14),
    ("RLIMIT_RTTIME", 15),
];

pub fn rlimit_number(name: &str) -> Option<u32> {
    RLIMITS.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// Capability numbers (linux/capability.h), index = number.
const CAPS: &[&str] = &[
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
];

/// The number of capability `name` ("CAP_SYS_ADMIN", case-insensitive, prefix optional).
pub fn capability_number(name: &str) -> Option<u32> {
    let up = name.to_ascii_uppercase();
    let bare = up.strip_prefix("CAP_").unwrap_or(&up);
    CAPS.iter().position(|c| *c == bare).map(|i| i as u32)
}

fn parse_caps(v: &Value) -> Result<CapSets, SpecError> {
    let set = |key: &'static str| -> Result<u64, SpecError> {
        let mut mask = 0u64;
        let Some(list) = v.get(key) else { return Ok(0) };
        if list.is_null() {
            return Ok(0);
        }
        let list = list
            .as_array()
            .ok_or_else(|| SpecError::Json(format!("process.capabilities.{key} must be an array")))?;
        for item in list {
            let name = item.as_str().unwrap_or_default();
            let n = capability_number(name).ok_or_else(|| SpecError::InvalidCapability {
                set: key,
                name: item.as_str().map(str::to_string).unwrap_or_else(|| item.to_string()),
            })?;
            mask |= 1 << n;
        }
        Ok(mask)
    };
    Ok(CapSets {
        bounding: set("bounding")?,
        effective: set("effective")?,
        permitted: set("permitted")?,
        inheritable: set("inheritable")?,
        ambient: set("ambient")?,
    })
}

fn parse_rlimits(v: &Value) -> Result<Vec<Rlimit>, SpecError> {
    let list = v
        .as_array()
        .ok_or_else(|| SpecError::Json("process.rlimits must be an array".into()))?;
    list.iter()
        .map(|r| {
            let name = r.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
            let resource = rlimit_number(&name).ok_or_else(|| SpecError::InvalidRlimit(name.clone()))?;
            let num = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
            let (soft, hard) = (num("soft"), num("hard"));
            if soft > hard {
                return Err(SpecError::RlimitOrder { name, soft, hard });
            }
            Ok(Rlimit { name, resource, soft, hard })
        })
        .collect()
}

/// Translates an OCI `process` object. Capabilities and rlimits are read from the JSON here
/// (for errors that name the culprit), the rest through oci-spec.
pub fn process_from_value(mut v: Value) -> Result<ProcessConfig, SpecError> {
    let obj = v
        .as_object_mut()
        .ok_or_else(|| SpecError::Json("process must be an object".into()))?;
    let caps = match obj.remove("capabilities") {
        Some(c) if !c.is_null() => Some(parse_caps(&c)?),
        _ => None,
    };
    let rlimits = match obj.remove("rlimits") {
        Some(r) if !r.is_null() => parse_rlimits(&r)?,
        _ => Vec::new(),
    };
    let p: Process = serde_json::from_value(v).map_err(|e| SpecError::Json(format!("process: {e}")))?;
    let cwd = p.cwd().to_string_lossy().into_owned();
    if !cwd.is_empty() && !is_clean_absolute(&cwd) {
        return Err(SpecError::InvalidCwd(cwd));
    }
    let u = p.user();
    Ok(ProcessConfig {
        args: p.args().clone().unwrap_or_default(),
        env: p.env().clone().unwrap_or_default(),
        cwd,
        terminal: p.terminal().unwrap_or(false),
        user: Some(UserConfig {
            uid: u.uid(),
            gid: u.gid(),
            additional_gids: u.additional_gids().clone().unwrap_or_default(),
            umask: u.umask(),
        }),
        rlimits,
        caps,
        no_new_privs: p.no_new_privileges().unwrap_or(false),
        oom_score_adj: p.oom_score_adj(),
    })
}

/// Parses `ExecProcessRequest.oci_process_json`.
pub fn process_from_json(json: &str) -> Result<ProcessConfig, SpecError> {
    let v: Value = serde_json::from_str(json).map_err(|e| SpecError::Json(e.to_string()))?;
    process_from_value(v)
}

/// Parsed mount options (runc's `parseMountOptions`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: libc::c_ulong,
    pub propagation: libc::c_ulong,
    pub bind: bool,
    pub recursive: bool,
    pub data: Vec<String>,
}

pub fn parse_mount_options(opts: &[String]) -> MountOptions {
    let mut m = MountOptions::default();
    for o in opts {
        let (set, clear): (libc::c_ulong, libc::c_ulong) = match o.as_str() {
            "defaults" => (0, 0),
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "dirsync" => (libc::MS_DIRSYNC, 0),
            "mand" => (libc::MS_MANDLOCK, 0),
            "nomand" => (0, libc::MS_MANDLOCK),
            "noatime" => (libc::MS_NOATIME, 0),
            "atime" => (0, libc::MS_NOATIME),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "diratime" => (0, libc::MS_NODIRATIME),
            "relatime" => (libc::MS_RELATIME, 0),
            "norelatime" => (0, libc::MS_RELATIME),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "nostrictatime" => (0, libc::MS_STRICTATIME),
            "silent" => (libc::MS_SILENT, 0),
            "loud" => (0, libc::MS_SILENT),
            "bind" => {
                m.bind = true;
                (0, 0)
            }
            "rbind" => {
                m.bind = true;
                m.recursive = true;
                (0, 0)
            }
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let base = o.trim_start_matches('r');
                let kind = match base {
                    "private" => libc::MS_PRIVATE,
                    "shared" => libc::MS_SHARED,
                    "slave" => libc::MS_SLAVE,
                    _ => libc::MS_UNBINDABLE,
                };
                let rec = if o.starts_with('r') && base != o { libc::MS_REC } else { 0 };
                m.propagation = kind | rec;
                (0, 0)
            }
            _ => {
                m.data.push(o.clone());
                (0, 0)
            }
        };
        m.flags = (m.flags | set) & !clear;
    }
    m
}

/// Translates one OCI mount; `index` is its position in `mounts` for error messages.
pub fn mount_entry(
    index: usize,
    destination: &str,
    typ: Option<&str>,
    source: Option<&str>,
    options: &[String],
    shared_dir: &str,
) -> Result<MountEntry, SpecError> {
    let bad = |reason: String| SpecError::Mount {
        index,
        destination: destination.to_string(),
        reason,
    };
    if !is_clean_absolute(destination) || destination == "/" {
        return Err(bad("the destination must be an absolute path below / without '.' or '..'".into()));
    }
    let o = parse_mount_options(options);
    let typ = typ.unwrap_or("");
    let kind = if o.bind || typ == "bind" {
        let src = source.unwrap_or("");
        if !is_clean_absolute(src) {
            return Err(bad(format!("bind source {src:?} must be an absolute path without '.' or '..'")));
        }
        let below_shared = src
            .strip_prefix(shared_dir)
            .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1);
        if !below_shared && !ALLOWED_GUEST_SOURCES.contains(&src) {
            return Err(bad(format!("bind source {src} is outside the shared directory")));
        }
        MountKind::Bind {
            source: src.to_string(),
            recursive: o.recursive,
        }
    } else {
        let fstype = match typ {
            "proc" | "sysfs" | "tmpfs" | "devpts" | "mqueue" | "cgroup2" => typ,
            // The guest has the unified hierarchy only.
            "cgroup" => "cgroup2",
            "" => return Err(bad("no type and no bind option".into())),
            other => return Err(bad(format!("unsupported mount type {other:?}"))),
        };
        MountKind::Fs {
            fstype: fstype.to_string(),
            source: source.filter(|s| !s.is_empty()).unwrap_or(fstype).to_string(),
        }
    };
    let data = match kind {
        // The kernel ignores data for binds: do not pretend to honour it.
        MountKind::Bind { .. } => String::new(),
        MountKind::Fs { .. } => o.data.join(","),
    };
    Ok(MountEntry {
        destination: destination.to_string(),
        kind,
        flags: o.flags,
        propagation: o.propagation,
        data,
    })
}

/// Sysctls that are namespaced (ipc, or net with a new net namespace), as runc allows.
fn check_sysctl(key: &str, new_net: bool) -> Result<(), SpecError> {
    let bad = |reason: &str| SpecError::InvalidSysctl {
        key: key.to_string(),
        reason: reason.to_string(),
    };
    let ok_chars = !key.is_empty()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && key.split('.').all(|c| !c.is_empty());
    if !ok_chars {
        return Err(bad("expected dot-separated names"));
    }
    const IPC: &[&str] = &[
        "kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
        "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced",
    ];
    if IPC.contains(&key) || key.starts_with("fs.mqueue.") {
        return Ok(());
    }
    if key.starts_with("net.") {
        return if new_net {
            Ok(())
        } else {
            Err(bad("net.* sysctls need the container's own network namespace"))
        };
    }
    Err(bad("not namespaced: it would change the whole guest"))
}

/// The default mounts of a container started from the flat fields.
pub fn default_mounts() -> Vec<MountEntry> {
    let m = |d: &str, t: &str, s: &str, opts: &[&str]| {
        let opts: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
        mount_entry(0, d, Some(t), Some(s), &opts, "/nonexistent").expect("static default mount")
    };
    vec![
        m("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        m("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
        m("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
        m("/dev/pts", "devpts", "devpts", &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]),
        m("/dev/shm", "tmpfs", "shm", &["nosuid", "nodev", "mode=1777"]),
    ]
}

/// The flat `CreateContainerRequest` fields.
#[derive(Debug, Clone, Default)]
pub struct FlatContainer {
    pub id: String,
    pub rootfs: String,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub terminal: bool,
    pub hostname: String,
    pub readonly_rootfs: bool,
}

/// The description of a container started from the flat fields: namespaces, the default
/// mounts and /dev, no user change, no cgroup limits, no seccomp.
pub fn from_flat(f: FlatContainer) -> ContainerConfig {
    ContainerConfig {
        id: f.id,
        root: f.rootfs,
        readonly_root: f.readonly_rootfs,
        hostname: f.hostname,
        process: ProcessConfig {
            args: f.argv,
            env: f.env,
            cwd: f.cwd,
            terminal: f.terminal,
            ..Default::default()
        },
        mounts: default_mounts(),
        dev_nodes: true,
        masked_paths: Vec::new(),
        readonly_paths: Vec::new(),
        sysctl: Vec::new(),
        new_net_ns: false,
        new_cgroup_ns: false,
        new_uts_ns: true,
        new_ipc_ns: true,
        resources: None,
        seccomp: None,
    }
}

/// Translates `CreateContainerRequest.oci_spec_json`.
pub fn from_oci_json(id: &str, json: &str, shared_dir: &str) -> Result<ContainerConfig, SpecError> {
    let mut v: Value = serde_json::from_str(json).map_err(|e| SpecError::Json(e.to_string()))?;
    let process_v = v
        .as_object_mut()
        .and_then(|o| o.remove("process"))
        .filter(|p| !p.is_null())
        .ok_or(SpecError::Missing("process"))?;
    let process = process_from_value(process_v)?;
    let spec: Spec = serde_json::from_value(v).map_err(|e| SpecError::Json(e.to_string()))?;
    let root = spec.root().as_ref().ok_or(SpecError::Missing("root"))?;

    let linux = spec.linux().clone().unwrap_or_default();
    let (mut new_net, mut new_cgroup) = (false, false);
    let (mut new_uts, mut new_ipc) = (true, true);
    for ns in linux.namespaces().as_deref().unwrap_or_default() {
        match ns.typ() {
            // Always new, whatever the path says (docs/agent.md).
            LinuxNamespaceType::Mount | LinuxNamespaceType::Pid => {}
            // New unless a path (a CRI pod's) says the guest's own, which is the pod's.
            LinuxNamespaceType::Uts => new_uts = ns.path().is_none(),
            LinuxNamespaceType::Ipc => new_ipc = ns.path().is_none(),
            // With a path (a CRI pod's namespace): the guest's own, which is the pod's.
            LinuxNamespaceType::Network => new_net = ns.path().is_none(),
            LinuxNamespaceType::Cgroup => new_cgroup = ns.path().is_none(),
            LinuxNamespaceType::User => return Err(SpecError::UnsupportedNamespace("user")),
            LinuxNamespaceType::Time => return Err(SpecError::UnsupportedNamespace("time")),
        }
    }

    let mut mounts = Vec::new();
    for (i, m) in spec.mounts().as_deref().unwrap_or_default().iter().enumerate() {
        let dest = m.destination().to_string_lossy();
        let src = m.source().as_ref().map(|s| s.to_string_lossy().into_owned());
        mounts.push(mount_entry(
            i,
            &dest,
            m.typ().as_deref(),
            src.as_deref(),
            m.options().as_deref().unwrap_or_default(),
            shared_dir,
        )?);
    }
    let dev = mounts.iter().find(|m| m.destination == "/dev");
    let dev_nodes = !matches!(dev, Some(MountEntry { kind: MountKind::Bind { .. }, .. }));
    if dev.is_none() {
        // Device nodes go on a tmpfs, never onto the shared rootfs.
        let d = default_mounts().into_iter().find(|m| m.destination == "/dev").expect("default /dev");
        mounts.insert(0, d);
    }

    let paths = |what: &'static str, list: &Option<Vec<String>>| -> Result<Vec<String>, SpecError> {
        let list = list.clone().unwrap_or_default();
        for p in &list {
            if !is_clean_absolute(p) {
                return Err(SpecError::InvalidPath { what, path: p.clone() });
            }
        }
        Ok(list)
    };
    let masked_paths = paths("masked path", linux.masked_paths())?;
    let readonly_paths = paths("readonly path", linux.readonly_paths())?;

    let sysctl: BTreeMap<String, String> = linux.sysctl().clone().unwrap_or_default().into_iter().collect();
    for k in sysctl.keys() {
        check_sysctl(k, new_net)?;
    }
    let resources = linux.resources().clone();
    if let Some(r) = &resources {
        cgroup::resource_writes(r)?;
    }
    let seccomp = linux.seccomp().as_ref().map(seccomp::compile).transpose()?;

    Ok(ContainerConfig {
        id: id.to_string(),
        root: root.path().to_string_lossy().into_owned(),
        readonly_root: root.readonly().unwrap_or(false),
        hostname: spec.hostname().clone().unwrap_or_default(),
        process,
        mounts,
        dev_nodes,
        masked_paths,
        readonly_paths,
        sysctl: sysctl.into_iter().collect(),
        new_net_ns: new_net,
        new_cgroup_ns: new_cgroup,
        new_uts_ns: new_uts,
        new_ipc_ns: new_ipc,
        resources,
        seccomp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARED: &str = "/run/joey/shared";

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn mount_options_like_runc() {
        let o = parse_mount_options(&opts(&["nosuid", "noexec", "nodev", "relatime", "ro"]));
        assert_eq!(o.flags, libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV | libc::MS_RELATIME | libc::MS_RDONLY);
        assert!(!o.bind && o.data.is_empty() && o.propagation == 0);
        let o = parse_mount_options(&opts(&["rbind", "rprivate", "ro", "rw", "strictatime"]));
        assert!(o.bind && o.recursive);
        assert_eq!(o.flags, libc::MS_STRICTATIME);
        assert_eq!(o.propagation, libc::MS_PRIVATE | libc::MS_REC);
        let o = parse_mount_options(&opts(&["bind", "slave"]));
        assert!(o.bind && !o.recursive);
        assert_eq!(o.propagation, libc::MS_SLAVE);
        assert_eq!(parse_mount_options(&opts(&["shared"])).propagation, libc::MS_SHARED);
        assert_eq!(parse_mount_options(&opts(&["runbindable"])).propagation, libc::MS_UNBINDABLE | libc::MS_REC);
        let o = parse_mount_options(&opts(&["nosuid", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5", "size=65536k"]));
        assert_eq!(o.flags, libc::MS_NOSUID);
        assert_eq!(o.data, opts(&["newinstance", "ptmxmode=0666", "mode=0620", "gid=5", "size=65536k"]));
    }

    #[test]
    fn mount_entries_and_bind_sources() {
        let e = mount_entry(0, "/dev/pts", Some("devpts"), Some("devpts"), &opts(&["nosuid", "newinstance", "gid=5"]), SHARED).unwrap();
        assert_eq!(e.kind, MountKind::Fs { fstype: "devpts".into(), source: "devpts".into() });
        assert_eq!(e.data, "newinstance,gid=5");
        let e = mount_entry(1, "/sys/fs/cgroup", Some("cgroup"), Some("cgroup"), &opts(&["ro"]), SHARED).unwrap();
        assert_eq!(e.kind, MountKind::Fs { fstype: "cgroup2".into(), source: "cgroup".into() });
        let e = mount_entry(2, "/data", Some("none"), Some("/run/joey/shared/c1/data"), &opts(&["rbind", "ro"]), SHARED).unwrap();
        assert_eq!(e.kind, MountKind::Bind { source: "/run/joey/shared/c1/data".into(), recursive: true });
        assert_eq!(e.flags, libc::MS_RDONLY);
        assert!(mount_entry(2, "/dev/null2", Some("bind"), Some("/dev/null"), &[], SHARED).is_ok());

        let e = mount_entry(3, "/data", Some("bind"), Some("/etc/shadow"), &opts(&["bind"]), SHARED).unwrap_err();
        assert_eq!(e.to_string(), "mount 3 (/data): bind source /etc/shadow is outside the shared directory");
        for src in ["/run/joey/shared", "/run/joey/shared/../x", "/run/joey/sharedx/a", "rel"] {
            assert!(mount_entry(0, "/d", None, Some(src), &opts(&["bind"]), SHARED).is_err(), "{src}");
        }
        let e = mount_entry(4, "/x", Some("ext4"), Some("/dev/vda"), &[], SHARED).unwrap_err();
        assert_eq!(e.to_string(), "mount 4 (/x): unsupported mount type \"ext4\"");
        assert!(mount_entry(5, "/a/../b", Some("tmpfs"), None, &[], SHARED).is_err());
        assert!(mount_entry(5, "/", Some("tmpfs"), None, &[], SHARED).is_err());
    }

    #[test]
    fn rlimit_and_capability_names() {
        assert_eq!(rlimit_number("RLIMIT_NOFILE"), Some(libc::RLIMIT_NOFILE));
        assert_eq!(rlimit_number("RLIMIT_RTTIME"), Some(libc::RLIMIT_RTTIME));
        assert_eq!(rlimit_number("RLIMIT_FOO"), None);
        assert_eq!(capability_number("CAP_CHOWN"), Some(0));
        assert_eq!(capability_number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(capability_number("net_raw"), Some(13));
        assert_eq!(capability_number("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(capability_number("CAP_FOO"), None);
        assert_eq!(CAPS.len(), 41);
        assert_eq!(CAPS[40], "CHECKPOINT_RESTORE");
    }

    fn process(extra: &str) -> Result<ProcessConfig, SpecError> {
        process_from_json(&format!(r#"{{"user":{{"uid":1000,"gid":100,"additionalGids":[5,6],"umask":63}},
            "args":["sh"],"cwd":"/"{extra}}}"#))
    }

    #[test]
    fn process_translation() {
        let p = process(
            r#","env":["A=1"],"terminal":true,"noNewPrivileges":true,"oomScoreAdj":-500,
            "capabilities":{"bounding":["CAP_KILL","CAP_CHOWN"],"effective":["CAP_KILL"],"ambient":[]},
            "rlimits":[{"type":"RLIMIT_NOFILE","soft":1024,"hard":4096}]"#,
        )
        .unwrap();
        assert_eq!(p.args, vec!["sh"]);
        assert_eq!(p.env, vec!["A=1"]);
        assert!(p.terminal && p.no_new_privs);
        assert_eq!(p.oom_score_adj, Some(-500));
        assert_eq!(p.user, Some(UserConfig { uid: 1000, gid: 100, additional_gids: vec![5, 6], umask: Some(63) }));
        assert_eq!(p.caps, Some(CapSets { bounding: (1 << 5) | 1, effective: 1 << 5, ..Default::default() }));
        assert_eq!(p.rlimits, vec![Rlimit { name: "RLIMIT_NOFILE".into(), resource: 7, soft: 1024, hard: 4096 }]);

        let e = process(r#","rlimits":[{"type":"RLIMIT_FOO","soft":1,"hard":1}]"#).unwrap_err();
        assert_eq!(e.to_string(), "invalid rlimit type \"RLIMIT_FOO\"");
        let e = process(r#","rlimits":[{"type":"RLIMIT_CORE","soft":2,"hard":1}]"#).unwrap_err();
        assert!(matches!(e, SpecError::RlimitOrder { .. }));
        let e = process(r#","capabilities":{"permitted":["CAP_BOGUS"]}"#).unwrap_err();
        assert_eq!(e.to_string(), "invalid capability \"CAP_BOGUS\" in the permitted set");
        assert!(matches!(process(r#","cwd":"rel""#), Err(SpecError::Json(_)) | Err(SpecError::InvalidCwd(_))));
        assert!(matches!(process_from_json("[]"), Err(SpecError::Json(_))));
    }

    fn spec(linux: &str, mounts: &str) -> String {
        format!(
            r#"{{"ociVersion":"1.1.0","root":{{"path":"/run/joey/shared/c1/rootfs","readonly":true}},
            "hostname":"web","process":{{"user":{{"uid":0,"gid":0}},"args":["sh"],"cwd":"/"}},
            "mounts":[{mounts}],"linux":{{{linux}}}}}"#
        )
    }

    #[test]
    fn spec_translation() {
        let mounts = r#"{"destination":"/proc","type":"proc","source":"proc"},
            {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]},
            {"destination":"/etc/hosts","type":"bind","source":"/run/joey/shared/c1/hosts","options":["rbind","ro"]}"#;
        let linux = r#""namespaces":[{"type":"pid"},{"type":"network"},{"type":"ipc"},{"type":"uts"},{"type":"mount"},{"type":"cgroup"}],
            "maskedPaths":["/proc/kcore"],"readonlyPaths":["/proc/sys"],
            "sysctl":{"net.ipv4.ip_forward":"1","kernel.shmmax":"4096"},
            "resources":{"memory":{"limit":67108864},"pids":{"limit":20}},
            "seccomp":{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_ERRNO"}]}"#;
        let c = from_oci_json("c1", &spec(linux, mounts), SHARED).unwrap();
        assert_eq!(c.root, "/run/joey/shared/c1/rootfs");
        assert!(c.readonly_root);
        assert_eq!(c.hostname, "web");
        assert_eq!(c.mounts.len(), 3);
        assert_eq!(c.mounts[2].destination, "/etc/hosts");
        assert!(c.dev_nodes);
        assert!(c.new_net_ns && c.new_cgroup_ns && c.new_uts_ns && c.new_ipc_ns);
        assert_eq!(c.masked_paths, vec!["/proc/kcore"]);
        assert_eq!(c.readonly_paths, vec!["/proc/sys"]);
        assert_eq!(c.sysctl, vec![("kernel.shmmax".into(), "4096".into()), ("net.ipv4.ip_forward".into(), "1".into())]);
        assert!(c.resources.is_some() && c.seccomp.is_some());

        // A pod's network namespace (path) is the guest's: net sysctls are refused then.
        let linux2 = r#""namespaces":[{"type":"network","path":"/proc/1/ns/net"}],"sysctl":{"net.ipv4.ip_forward":"1"}"#;
        let e = from_oci_json("c1", &spec(linux2, ""), SHARED).unwrap_err();
        assert!(e.to_string().starts_with("invalid sysctl \"net.ipv4.ip_forward\""), "{e}");
        let e = from_oci_json("c1", &spec(r#""sysctl":{"vm.swappiness":"1"}"#, ""), SHARED).unwrap_err();
        assert!(matches!(e, SpecError::InvalidSysctl { .. }));
        // A pod's IPC and UTS namespaces (paths) are the guest's; without an entry: new.
        let pod = r#""namespaces":[{"type":"ipc","path":"/proc/1/ns/ipc"},{"type":"uts","path":"/proc/1/ns/uts"}]"#;
        let c = from_oci_json("c1", &spec(pod, ""), SHARED).unwrap();
        assert!(!c.new_ipc_ns && !c.new_uts_ns);
        let c = from_oci_json("c1", &spec(r#""namespaces":[{"type":"pid"}]"#, ""), SHARED).unwrap();
        assert!(c.new_ipc_ns && c.new_uts_ns);
        // No /dev mount: a tmpfs /dev comes first.
        let c = from_oci_json("c1", &spec("", ""), SHARED).unwrap();
        assert_eq!(c.mounts[0].destination, "/dev");
        assert!(!c.new_net_ns);
        // /dev bound from the share: no device nodes are created.
        let c = from_oci_json("c1", &spec("", r#"{"destination":"/dev","type":"bind","source":"/run/joey/shared/dev","options":["rbind"]}"#), SHARED).unwrap();
        assert!(!c.dev_nodes);

        let e = from_oci_json("c1", &spec(r#""namespaces":[{"type":"user"}]"#, ""), SHARED).unwrap_err();
        assert_eq!(e.to_string(), "user namespaces are not supported");
        let e = from_oci_json("c1", &spec(r#""resources":{"memory":{"limit":100,"swap":50}}"#, ""), SHARED).unwrap_err();
        assert!(e.to_string().contains("below memory.limit"), "{e}");
        let e = from_oci_json("c1", &spec(r#""maskedPaths":["proc/x"]"#, ""), SHARED).unwrap_err();
        assert!(matches!(e, SpecError::InvalidPath { .. }));
        assert!(matches!(from_oci_json("c1", "{}", SHARED), Err(SpecError::Missing("process"))));
        assert!(matches!(from_oci_json("c1", "not json", SHARED), Err(SpecError::Json(_))));
    }

    #[test]
    fn flat_fields_get_the_default_mounts() {
        let c = from_flat(FlatContainer { id: "c".into(), rootfs: "/r".into(), argv: vec!["sh".into()], ..Default::default() });
        let d: Vec<&str> = c.mounts.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(d, vec!["/proc", "/sys", "/dev", "/dev/pts", "/dev/shm"]);
        assert!(c.dev_nodes && c.process.user.is_none() && c.process.caps.is_none() && c.seccomp.is_none());
    }

    /// `ctr oci spec` of containerd 1.6 (what `ctr run` starts from), with the guest's root.
    #[test]
    fn containerd_default_spec() {
        let json = include_str!("testdata/containerd-1.6-default-spec.json")
            .replace("\"path\": \"rootfs\"", "\"path\": \"/run/joey/shared/c1/rootfs\"");
        let c = from_oci_json("c1", &json, SHARED).unwrap();
        assert_eq!(c.root, "/run/joey/shared/c1/rootfs");
        let d: Vec<&str> = c.mounts.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(d, vec!["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/run"]);
        assert_eq!(c.mounts[2].data, "newinstance,ptmxmode=0666,mode=0620,gid=5");
        assert_eq!(c.mounts[5].flags, libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV | libc::MS_RDONLY);
        assert!(c.dev_nodes && c.new_net_ns && !c.new_cgroup_ns);
        assert_eq!(c.masked_paths.len(), 10);
        assert_eq!(c.readonly_paths, vec!["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]);
        // Only a devices rule: nothing to write.
        assert!(cgroup::resource_writes(c.resources.as_ref().unwrap()).unwrap().is_empty());
        let p = &c.process;
        assert!(p.no_new_privs);
        assert_eq!(p.user, Some(UserConfig { uid: 0, gid: 0, additional_gids: vec![], umask: None }));
        assert_eq!(p.rlimits, vec![Rlimit { name: "RLIMIT_NOFILE".into(), resource: 7, soft: 1024, hard: 1024 }]);
        let caps = p.caps.unwrap();
        let names = [
            "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
            "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
        ];
        let mask = names.iter().fold(0u64, |m, n| m | 1 << capability_number(n).unwrap());
        assert_eq!((caps.bounding, caps.effective, caps.permitted), (mask, mask, mask));
        assert_eq!((caps.inheritable, caps.ambient), (0, 0));
        assert!(p.args.is_empty() && c.seccomp.is_none());
    }
}
