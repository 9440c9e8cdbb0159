//! Host-side confinement (docs/security.md): every thread of a running sandbox's shim, of
//! `joeyctl run` and of their QEMU runs under a seccomp filter (`Seccomp: 2`), the device
//! threads under their class's filter stacked on the runtime's, and QEMU with its own
//! `-sandbox`, in its sandbox's cgroup with the limits of the sandbox's size, jailed (an
//! unprivileged user without capabilities, in a mount namespace of its own). Needs `JOEY_SHIM`, `JOEYCTL`, `JOEY_KERNEL`, `JOEY_INITRD`, containerd, runc.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use joey_tests::containerd::*;
use joey_tests::*;

/// QEMU's `-sandbox` argument (actors/src/hypervisor/qemu.rs).
const QEMU_SANDBOX: &str =
    "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// One thread of a process: name, `Seccomp:` mode, `Seccomp_filters:` count.
#[derive(Debug)]
struct Task {
    comm: String,
    mode: u32,
    filters: u32,
}

fn tasks(pid: i32) -> Vec<Task> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let t = t.expect("task").path();
        // A thread that ended meanwhile is skipped.
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(t.join("comm")),
            std::fs::read_to_string(t.join("status")),
        ) else {
            continue;
        };
        let field = |name: &str| -> u32 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {status}"))
        };
        v.push(Task {
            comm: comm.trim().to_string(),
            mode: field("Seccomp:"),
            filters: field("Seccomp_filters:"),
        });
    }
    v
}

/// Every thread of `pid` is in filter mode; the named device threads carry their class's filter
/// on top of the runtime's (two filters), the runtime threads one.
fn assert_runtime_confined(pid: i32, what: &str) {
    let ts = tasks(pid);
    assert!(
        ts.iter().all(|t| t.mode == 2),
        "{what}: a thread without a seccomp filter: {ts:?}"
    );
    for class_thread in [
        "joey-vsock",
        "joey-vsock-req",
        "joey-fs",
        "joey-fs-req",
        "vring_worker",
        "joey-console",
    ] {
        let of: Vec<&Task> = ts.iter().filter(|t| t.comm == class_thread).collect();
        assert!(!of.is_empty(), "{what}: no {class_thread} thread: {ts:?}");
        assert!(
            of.iter().all(|t| t.filters == 2),
            "{what}: {class_thread} without its own filter: {ts:?}"
        );
    }
    let runtime: Vec<&Task> = ts
        .iter()
        .filter(|t| {
            t.comm == "tokio-rt-worker"
                || t.comm.starts_with("joeyctl")
                || t.comm.starts_with("containerd-shim")
        })
        .collect();
    assert!(!runtime.is_empty(), "{what}: no runtime thread: {ts:?}");
    assert!(
        runtime.iter().all(|t| t.filters == 1),
        "{what}: runtime threads: {ts:?}"
    );
}

/// QEMU: every thread filtered, by the runtime's filter, the io_uring refusal, the signal
/// filter (signals to itself only) and its own `-sandbox` (four or more filters), and started
/// with `-sandbox`.
fn assert_qemu_confined(pid: i32, cmdline: &str) {
    assert!(
        cmdline.contains(QEMU_SANDBOX),
        "QEMU without -sandbox: {cmdline}"
    );
    let ts = tasks(pid);
    assert!(!ts.is_empty());
    assert!(
        ts.iter().all(|t| t.mode == 2 && t.filters >= 4),
        "QEMU threads: {ts:?}"
    );
}

/// The uid and gid of `joey-qemu` (scripts/deps.sh), QEMU's default user in its jail.
fn joey_qemu_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == "joey-qemu")
        .map(|f| (f[2].parse().unwrap(), f[3].parse().unwrap()))
        .expect("no joey-qemu user: run scripts/deps.sh")
}

/// QEMU runs jailed (docs/security.md, `security.qemu_jail`): as joey-qemu with no capabilities,
/// no supplementary groups and no_new_privs, in mount, network (a loopback device only), IPC
/// and UTS namespaces of its own; in its mount namespace its state
/// directory holds only its vhost-user sockets, the runtime's state dir only its own sandbox,
/// and /root, /home, /proc, /var/lib, /etc/shadow are absent; the kernel it boots is there. No
/// jail mount shows on the host.
fn assert_qemu_jailed(pid: i32, cmdline: &str) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    let (uid, gid) = joey_qemu_ids();
    assert_ne!(uid, 0);
    assert_eq!(field("Uid:"), format!("{uid} {uid} {uid} {uid}"), "{status}");
    assert_eq!(field("Gid:"), format!("{gid} {gid} {gid} {gid}"), "{status}");
    assert_eq!(field("Groups:"), "", "{status}");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(caps), "0000000000000000", "{caps} {status}");
    }
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    let ns = |p: &str, n: &str| std::fs::read_link(format!("/proc/{p}/ns/{n}")).expect("ns");
    for n in ["mnt", "net", "ipc", "uts"] {
        assert_ne!(ns(&pid.to_string(), n), ns("self", n), "QEMU shares the host's {n} namespace");
    }
    // No network but its own loopback device.
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).expect("net/dev");
    let devs: Vec<&str> = dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    assert_eq!(devs, ["lo"], "QEMU's network devices");

    let sock = cmdline
        .split([',', ' '])
        .find_map(|a| a.strip_prefix("path=").filter(|p| p.ends_with("/vhost-vsock.sock")))
        .unwrap_or_else(|| panic!("no vhost-vsock socket in {cmdline}"));
    let state = Path::new(sock).parent().expect("state dir");
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let inside = |p: &Path| root.join(p.strip_prefix("/").expect("absolute"));
    let mut seen: Vec<String> = std::fs::read_dir(inside(state))
        .expect("QEMU's state dir in its jail")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    seen.sort();
    assert_eq!(seen, ["vhost-fs.sock", "vhost-vsock.sock"], "QEMU's view of {}", state.display());
    assert!(state.join("console.log").exists() && state.join("vsock.sock").exists());
    let runtime_state = state.parent().expect("runtime state dir");
    let ids: Vec<_> = std::fs::read_dir(inside(runtime_state))
        .expect("the runtime's state dir in the jail")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(ids, [state.file_name().expect("id")], "other sandboxes are visible to QEMU");
    for hidden in ["/root", "/home", "/proc/self", "/sys/fs", "/var/lib", "/etc/shadow", "/etc/passwd", "/run/containerd"] {
        assert!(!inside(Path::new(hidden)).exists(), "{hidden} is visible to QEMU");
    }
    let kernel = std::env::var("JOEY_KERNEL").expect("JOEY_KERNEL");
    assert!(inside(Path::new(&kernel)).is_file(), "QEMU cannot see its kernel {kernel}");
    assert_no_jail_mounts(state);
}

/// No mount under `state` on the host (the jail's live in QEMU's namespace only).
fn assert_no_jail_mounts(state: &Path) {
    let jail = state.join("jail").display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.lines().any(|l| l.contains(&jail)),
        "a jail mount on the host: {mounts}"
    );
}

/// The sandbox cgroup's directories of sandbox `id` on this host (cgroup v2: one; v1: memory
/// and pids), as actors/src/hypervisor/sandbox_cgroup.rs makes them.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        vec![root.join("joey").join(id)]
    } else {
        vec![
            root.join("memory/joey").join(id),
            root.join("pids/joey").join(id),
        ]
    }
}

/// The limits of a default-sized sandbox's cgroup (256 MiB, 1 vCPU): 256 + 512 MiB of memory
/// and 130 tasks; with the runtime (the shim) in it too, 128 MiB and 128 tasks more.
const LIMITS_QEMU: (u64, u64) = (768 << 20, 130);
const LIMITS_WITH_SHIM: (u64, u64) = (896 << 20, 258);

/// Process `pid` (QEMU, the shim) is in its sandbox's cgroup (`joey/<id>` for memory and pids)
/// with `limits` (memory bytes, tasks). Returns the id.
fn assert_in_sandbox_cgroup(pid: i32, limits: (u64, u64)) -> String {
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let ids: Vec<&str> = groups
        .lines()
        .filter_map(|l| l.split_once("/joey/").map(|(_, id)| id))
        .collect();
    assert!(
        !ids.is_empty() && ids.iter().all(|i| *i == ids[0]),
        "cgroups of {pid}: {groups}"
    );
    let dirs = cgroup_dirs(ids[0]);
    assert_eq!(ids.len(), dirs.len(), "cgroups of {pid}: {groups}");
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_string()
    };
    let (memory, pids) = if dirs.len() == 1 {
        (
            read(dirs[0].join("memory.max")),
            read(dirs[0].join("pids.max")),
        )
    } else {
        (
            read(dirs[0].join("memory.limit_in_bytes")),
            read(dirs[1].join("pids.max")),
        )
    };
    assert_eq!((memory, pids), (limits.0.to_string(), limits.1.to_string()));
    ids[0].to_string()
}

/// The sandbox cgroup of `id` is gone (removed once QEMU exited).
fn assert_cgroup_removed(id: &str) {
    let left = wait_for(
        "the sandbox cgroup's removal",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || cgroup_dirs(id).iter().all(|d| !d.exists()).then_some(()),
    );
    assert!(left.is_ok(), "{left:?}: {:?}", cgroup_dirs(id));
}

#[test]
fn joeyctl_and_its_qemu_run_under_seccomp() {
    let env = Env::new();
    let mut c = env.command(&[], &["sh", "-c", "echo started; sleep 100"]);
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = c.spawn().expect("spawn joeyctl");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    assert_eq!(line, "started\n");

    assert_runtime_confined(child.id() as i32, "joeyctl");
    let qemu: Vec<(i32, String)> = env
        .processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .collect();
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    assert_qemu_confined(qemu[0].0, &qemu[0].1);
    assert_qemu_jailed(qemu[0].0, &qemu[0].1);
    let id = assert_in_sandbox_cgroup(qemu[0].0, LIMITS_QEMU);
    // joeyctl (a user's command) stays where it was.
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).expect("cgroup");
    assert!(!own.contains("/joey/"), "{own}");

    // SAFETY: SIGINT to our own child: joeyctl tears the VM down.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = wait_output(child, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(130), "stderr: {}", stderr_of(&o));
    env.assert_no_leaks();
    assert_cgroup_removed(&id);
}

/// A private containerd running sandbox `id` (`sleep 300`, detached); its shim's pid.
fn start_sandbox(id: &str) -> (Containerd, i32) {
    let c = Containerd::start();
    c.import_busybox();
    let o = c.ctr_out(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "300"]);
    c.assert_ok(&o, "ctr run -d");
    c.wait_task_status(id, "RUNNING", Duration::from_secs(60));
    let shims = c.shim_pids("containerd-shim-joey-v2", id);
    assert_eq!(shims.len(), 1, "{shims:?}");
    (c, shims[0])
}

#[test]
fn shim_and_its_qemu_run_under_seccomp() {
    let (c, shim) = start_sandbox("s1");

    assert_runtime_confined(shim, "shim");
    let state = c.dir.path().join("joey-state").join("s1");
    let qemu: Vec<(i32, String)> = processes_mentioning(&format!("{}/", state.display()))
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .collect();
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    assert_qemu_confined(qemu[0].0, &qemu[0].1);
    assert_qemu_jailed(qemu[0].0, &qemu[0].1);
    assert_eq!(assert_in_sandbox_cgroup(qemu[0].0, LIMITS_WITH_SHIM), "s1");
    // The shim's serving process (the device threads) is in it too.
    assert_eq!(assert_in_sandbox_cgroup(shim, LIMITS_WITH_SHIM), "s1");

    let k = c.ctr_out(&["task", "kill", "-s", "SIGKILL", "s1"]);
    assert!(k.status.success(), "ctr task kill: {}", stderr_of(&k));
    c.wait_task_status("s1", "STOPPED", Duration::from_secs(30));
    for args in [
        &["task", "delete", "s1"][..],
        &["container", "rm", "s1"][..],
    ] {
        c.assert_ok(&c.ctr_out(args), &format!("ctr {args:?}"));
    }
    c.assert_clean(&["s1"]);
    assert_cgroup_removed("s1");
    assert_no_jail_mounts(&state);
}

/// The shim of a running sandbox is SIGKILLed (its QEMU dies with it): containerd runs the
/// shim's `delete`, which removes the sandbox cgroup too.
#[test]
fn a_killed_shims_sandbox_cgroup_is_removed_by_delete() {
    let (c, shim) = start_sandbox("k1");
    assert!(
        cgroup_dirs("k1").iter().all(|d| d.is_dir()),
        "{:?}",
        cgroup_dirs("k1")
    );
    sigkill(shim);
    let gone = wait_for(
        "k1 no longer RUNNING",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || (c.task_status("k1").as_deref() != Some("RUNNING")).then_some(()),
    );
    assert!(gone.is_ok(), "{gone:?}\ncontainerd log:\n{}", c.log());
    let o = c.ctr_out(&["task", "delete", "--force", "k1"]);
    assert!(
        o.status.success() || stderr_of(&o).contains("not found"),
        "ctr task delete --force: {}\ncontainerd log:\n{}",
        stderr_of(&o),
        c.log()
    );
    c.assert_ok(&c.ctr_out(&["container", "rm", "k1"]), "ctr container rm");
    c.assert_clean(&["k1"]);
    assert_cgroup_removed("k1");
}

/// `joey-pool` spawns its VMs' QEMU through the same code: jailed the same way, and nothing
/// of the jail is left on the host once the pool has stopped (SIGTERM).
#[test]
fn the_pools_qemu_is_jailed_too() {
    let env = Env::with_config(|k, i| {
        format!(
            "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\n\n[pool]\nsize = 1\n",
            k.display(),
            i.display()
        )
    });
    let mut pool = std::process::Command::new(joeyctl_path().with_file_name("joey-pool"))
        .arg("--config")
        .arg(&env.config)
        .env_remove("JOEY_CONFIG")
        .env_remove("JOEY_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn joey-pool");
    let vms = format!("{}/", env.state_dir.join(".pool/vms").display());
    // The VM is up once its QEMU runs as joey-qemu (the jail is entered before exec).
    let (uid, _) = joey_qemu_ids();
    let qemu = wait_for(
        "the pool's QEMU",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            processes_mentioning(&vms).into_iter().find(|(pid, cmd)| {
                cmd.contains("qemu-system")
                    && std::fs::read_to_string(format!("/proc/{pid}/status"))
                        .is_ok_and(|s| s.contains(&format!("Uid:\t{uid}\t")))
            })
        },
    );
    let qemu = match qemu {
        Ok(q) => q,
        Err(e) => {
            let _ = pool.kill();
            let o = pool.wait_with_output().expect("joey-pool output");
            panic!("{e}; joey-pool: {}", stderr_of(&o));
        }
    };
    assert_qemu_jailed(qemu.0, &qemu.1);
    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(pool.id() as i32, libc::SIGTERM) };
    let o = wait_output(pool, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    env.assert_no_leaks();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let dir = env.dir.path().display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&dir)),
        "mounts left: {mounts}"
    );
}

/// `security.qemu_jail = false` (debugging) runs QEMU as root in the host's mount namespace; a
/// `security.qemu_user` missing from /etc/passwd fails the start with a clear error and
/// leaves nothing behind.
#[test]
fn the_jail_can_be_turned_off_and_a_missing_user_is_named() {
    let config = |security: &'static str| {
        move |k: &Path, i: &Path| {
            format!(
                "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\n\n[security]\n{security}\n",
                k.display(),
                i.display()
            )
        }
    };
    let env = Env::with_config(config("qemu_user = \"no-such-user\""));
    let o = env.run(&["true"], None);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr_of(&o).contains("jail: no user no-such-user in /etc/passwd"),
        "{}",
        stderr_of(&o)
    );

    let env = Env::with_config(config("qemu_jail = false"));
    let mut c = env.command(&[], &["sh", "-c", "echo started; sleep 100"]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
    let mut child = c.spawn().expect("spawn joeyctl");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line, "started\n");
    let qemu: Vec<i32> = env
        .processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", qemu[0])).expect("status");
    assert!(status.contains("\nUid:\t0\t0\t0\t0\n"), "{status}");
    let ns = |p: String, n: &str| std::fs::read_link(format!("/proc/{p}/ns/{n}")).expect("ns");
    for n in ["mnt", "net"] {
        assert_eq!(ns(qemu[0].to_string(), n), ns("self".into(), n), "{n}");
    }
    // SAFETY: SIGINT to our own child: joeyctl tears the VM down.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = wait_output(child, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(130), "stderr: {}", stderr_of(&o));
    env.assert_no_leaks();
}
