//! The child's setup steps of a container's first process (see `steps.rs`): namespaces, the
//! staging tmpfs, the rootfs and the spec's mounts, /dev, hostname, the agent's mounts
//! detached, `pivot_root`, sysctls, read-only and masked paths, then the process steps.

use std::os::fd::RawFd;

use super::{ContainerError, STAGE_DIR};
use crate::spec::{ContainerConfig, MountKind};
use crate::steps::{cstr, process_steps, Op, Step};

/// Pushes a `Mkdir` for every ancestor of the in-container path `dir` (not `/`), and for
/// `dir` itself when `include_self`.
fn mkdir_all(
    steps: &mut Vec<Step>,
    root: &str,
    dir: &str,
    include_self: bool,
) -> Result<(), ContainerError> {
    let comps: Vec<&str> = dir.split('/').filter(|c| !c.is_empty()).collect();
    let n = if include_self {
        comps.len()
    } else {
        comps.len().saturating_sub(1)
    };
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

/// Pre-fork facts about the rootfs that the child's steps need.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// `file_binds[i]`: mount i binds a non-directory (it gets a file mountpoint).
    pub(super) file_binds: Vec<bool>,
    /// Where the container's /dev is, in-container, symlinks resolved.
    pub(super) dev_dir: String,
    /// The working directory to create when missing (symlinks resolved); `None`: "/".
    pub(super) cwd_dir: Option<String>,
    /// The agent's mount points (parents first) that the child detaches before `pivot_root`.
    pub(super) detach: Vec<String>,
}

/// Decodes the octal escapes (`\040`) of a /proc/self/mountinfo path.
fn unescape_mountinfo(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
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
pub(super) fn agent_mounts(mountinfo: &str) -> Vec<String> {
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
pub(super) fn plan(
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
        push(
            &mut steps,
            "join the container's cgroup".into(),
            Op::WriteFd(fd, b"0"),
        );
    }
    let mut ns = libc::CLONE_NEWNS;
    if c.new_uts_ns {
        ns |= libc::CLONE_NEWUTS;
    }
    if c.new_ipc_ns {
        ns |= libc::CLONE_NEWIPC;
    }
    if c.new_net_ns {
        ns |= libc::CLONE_NEWNET;
    }
    if c.new_cgroup_ns {
        ns |= libc::CLONE_NEWCGROUP;
    }
    push(
        &mut steps,
        "unshare the container's namespaces".into(),
        Op::Unshare(ns),
    );
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
        mount_op(
            Some("tmpfs"),
            STAGE_DIR,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=0755"),
        )?,
    );
    push(
        &mut steps,
        "create the rootfs mountpoint".into(),
        Op::Mkdir(cstr(&root)?, 0o755),
    );
    push(
        &mut steps,
        format!("bind-mount rootfs {}", c.root),
        mount_op(
            Some(&c.root),
            &root,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?,
    );
    for (i, m) in c.mounts.iter().enumerate() {
        let dest = &m.destination;
        let target = at(dest);
        let is_file = layout.file_binds.get(i).copied().unwrap_or(false);
        mkdir_all(&mut steps, &root, dest, !is_file)?;
        if is_file {
            push(
                &mut steps,
                format!("create mountpoint file {dest}"),
                Op::CreateFile(cstr(&target)?),
            );
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
                        mount_op(
                            None,
                            &target,
                            None,
                            libc::MS_BIND | libc::MS_REMOUNT | rec | m.flags,
                            None,
                        )?,
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
        for (name, major, minor) in [
            ("null", 1, 3),
            ("zero", 1, 5),
            ("full", 1, 7),
            ("random", 1, 8),
            ("urandom", 1, 9),
            ("tty", 5, 0),
        ] {
            push(
                &mut steps,
                format!("create /dev/{name}"),
                Op::Mknod(
                    cstr(&at(&format!("/dev/{name}")))?,
                    libc::S_IFCHR | 0o666,
                    libc::makedev(major, minor),
                ),
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
            mount_op(
                None,
                &root,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NODEV,
                None,
            )?,
        );
    }
    // Empty: a pod's shared UTS namespace whose hostname the pod (its sandbox container) set.
    if !hostname.is_empty() {
        push(
            &mut steps,
            format!("set hostname {hostname}"),
            Op::Sethostname(cstr(hostname)?),
        );
    }
    for m in &layout.detach {
        push(
            &mut steps,
            format!("detach the agent's mount {m}"),
            Op::Detach(cstr(m)?),
        );
    }
    push(
        &mut steps,
        "make the guest root read-only".into(),
        mount_op(
            None,
            "/",
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            None,
        )?,
    );
    push(
        &mut steps,
        format!("chroot {STAGE_DIR}"),
        Op::Chroot(cstr(STAGE_DIR)?),
    );
    push(&mut steps, "chdir /root".into(), Op::Chdir(cstr("/root")?));
    push(
        &mut steps,
        "pivot_root into the rootfs".into(),
        Op::PivotRootHere,
    );
    push(&mut steps, "detach the old root".into(), Op::DetachHere);
    for (k, v) in &c.sysctl {
        let path = format!("/proc/sys/{}", k.replace('.', "/"));
        push(
            &mut steps,
            format!("sysctl {k}={v}"),
            Op::WriteFile(cstr(&path)?, cstr(v)?),
        );
    }
    for p in &c.readonly_paths {
        push(
            &mut steps,
            format!("readonly path {p}"),
            Op::ReadonlyPath(cstr(p)?),
        );
    }
    for p in &c.masked_paths {
        push(&mut steps, format!("mask path {p}"), Op::MaskPath(cstr(p)?));
    }
    steps.extend(process_steps(
        &c.process,
        cwd,
        c.seccomp.as_ref(),
        last_cap,
    )?);
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            vec![
                "/my dir",
                "/proc",
                "/run",
                "/sys",
                "/run/joey/shared",
                "/sys/fs/cgroup"
            ]
        );
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

    /// Index of the first step whose name starts with `prefix`.
    fn pos(names: &[&str], prefix: &str) -> usize {
        names
            .iter()
            .position(|x| x.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix}: {names:#?}"))
    }

    /// Asserts that the steps named (by prefix) come in this order.
    fn assert_in_order(names: &[&str], order: &[&str]) {
        for w in order.windows(2) {
            assert!(
                pos(names, w[0]) < pos(names, w[1]),
                "{:?} must come before {:?}: {names:#?}",
                w[0],
                w[1]
            );
        }
    }

    #[test]
    fn plan_ends_in_the_rootfs() {
        let steps = plan(&flat(true), "c1", "/", &layout(&[false; 5]), Some(7), 40).unwrap();
        let names: Vec<&str> = steps.iter().map(|s| s.what.as_str()).collect();
        assert_eq!(pos(&names, "join the container's cgroup"), 0);
        assert_eq!(pos(&names, "unshare"), 1);
        assert_in_order(&names, &["bind-mount rootfs", "mount 0: proc on /proc"]);
        assert_in_order(
            &names,
            &[
                "mount 2: tmpfs on /dev",
                "mount 3: devpts on /dev/pts",
                "create /dev/null",
            ],
        );
        assert_in_order(
            &names,
            &[
                "create /dev/ptmx",
                "remount the rootfs read-only",
                "detach the agent's mount /run",
                "make the guest root read-only",
                "chroot",
                "pivot_root",
                "detach the old root",
            ],
        );
        assert_eq!(names[names.len() - 2..], ["chdir /", "umask 22"]);
        assert!(!plan(&flat(false), "c1", "/", &layout(&[]), None, 40)
            .unwrap()
            .iter()
            .any(|s| s.what == "remount the rootfs read-only"));
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
        assert_eq!(
            names[..2],
            ["unshare the container's namespaces", "bring up lo"]
        );
        assert_in_order(
            &names,
            &[
                "create directory /etc in the rootfs",
                "create mountpoint file /etc/hosts",
                "mount 1: bind /run/joey/shared/c1/hosts on /etc/hosts",
                "mount 1: remount /etc/hosts with its options",
                "mount 1: propagation of /etc/hosts",
            ],
        );
        assert_in_order(
            &names,
            &[
                "create directory /data in the rootfs",
                "create directory /data/cache in the rootfs",
            ],
        );
        assert_in_order(
            &names,
            &[
                "create directory /work in the rootfs",
                "pivot_root into the rootfs",
            ],
        );
        assert_in_order(
            &names,
            &[
                "detach the old root",
                "sysctl net.ipv4.ip_forward=1",
                "readonly path /proc/sys",
                "mask path /proc/kcore",
                "setuid 1000",
            ],
        );
        assert_eq!(names.last(), Some(&"set no_new_privs"));
        match &steps[pos(&names, "mount 2: tmpfs on /data/cache")].op {
            Op::Mount { data, fstype, .. } => {
                assert_eq!(data.as_deref(), Some(c"size=1m"));
                assert_eq!(fstype.as_deref(), Some(c"tmpfs"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A network namespace with a path (a CRI pod's) is the guest's: the container stays in
    /// the agent's namespace, which ConfigureNetwork set up (no CLONE_NEWNET, lo left alone);
    /// without a path it gets a new one with lo up.
    #[test]
    fn network_namespace_with_a_path_is_the_guests() {
        let spec = |ns: &str| {
            format!(
                r#"{{"ociVersion":"1.1.0","root":{{"path":"/run/joey/shared/c1/rootfs"}},
                "process":{{"user":{{"uid":0,"gid":0}},"args":["sh"],"cwd":"/"}},
                "linux":{{"namespaces":[{ns}]}}}}"#
            )
        };
        let unshare_flags = |ns: &str| {
            let c = crate::spec::from_oci_json("c1", &spec(ns), "/run/joey/shared").unwrap();
            let steps = plan(&c, "c1", "/", &layout(&[]), None, 40).unwrap();
            let lo = steps.iter().any(|s| s.what == "bring up lo");
            match steps.iter().find_map(|s| match s.op {
                Op::Unshare(flags) => Some(flags),
                _ => None,
            }) {
                Some(flags) => (flags & libc::CLONE_NEWNET != 0, lo),
                None => panic!("no unshare step"),
            }
        };
        assert_eq!(
            unshare_flags(r#"{"type":"network","path":"/var/run/netns/cni-1234"}"#),
            (false, false)
        );
        assert_eq!(unshare_flags(r#"{"type":"network"}"#), (true, true));
        assert_eq!(unshare_flags(""), (false, false));
    }
}
