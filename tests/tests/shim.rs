//! containerd shim v2: a private containerd 1.6 runs busybox in a joey microVM through
//! `containerd-shim-joey-v2` (`ctr run --runtime io.containerd.joey.v2`). Needs `JOEY_SHIM`
//! (the shim binary), `JOEY_KERNEL`, `JOEY_INITRD` and Debian's containerd, runc, busybox-static.

use std::time::{Duration, Instant};

use joey_tests::containerd::*;
use joey_tests::*;

#[test]
fn ctr_run_busybox_in_a_microvm() {
    let c = Containerd::start();
    c.import_busybox();

    // Exact stdout, exit 0.
    let o = c.run("t1", &["echo", "hello from a microVM"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "hello from a microVM\n",
        "stderr: {}\ncontainerd log:\n{}",
        stderr_of(&o),
        c.log()
    );
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr_of(&o));

    // The command's exit code.
    let o = c.run("t2", &["sh", "-c", "exit 3"]);
    assert_eq!(o.status.code(), Some(3), "stderr: {}", stderr_of(&o));

    // Detached, then SIGKILL: the task's exit status is 137 (what `ctr run` in the foreground
    // reports for the same task; ctr 1.6 has no `task wait`).
    let o = c.ctr_out(&["run", "-d", "--runtime", RUNTIME, IMAGE, "t3", "sleep", "300"]);
    assert!(o.status.success(), "ctr run -d: {}", stderr_of(&o));

    // While it runs, the shim serves the sandbox's metrics endpoint (what joey-monitor finds).
    let sock = c.metrics_socket("t3");
    let t0 = Instant::now();
    let body = loop {
        if sock.exists() {
            let (status, body) = get_unix(&sock, "/metrics", Duration::from_secs(5));
            if status == 200 && value(&body, "joey_guest_memory_total_bytes", &[]).is_some() {
                break body;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no guest metrics on {} (exists: {})\ncontainerd log:\n{}",
            sock.display(),
            sock.exists(),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mem = value(&body, "joey_guest_memory_total_bytes", &[]).unwrap();
    assert!(
        (100.0 * 1048576.0..=256.0 * 1048576.0).contains(&mem),
        "guest MemTotal {mem} bytes not in 100..=256 MiB:\n{body}"
    );
    assert_eq!(value(&body, "joey_hypervisor_info", &["kind=\"qemu\""]), Some(1.0), "{body}");
    // The container's own cgroup figures (read in the guest at scrape time): one process
    // (`sleep`), some memory charged to it, well below the VM's.
    let cid = ["container_id=\"t3\""];
    assert_eq!(value(&body, "joey_guest_container_pids", &cid), Some(1.0), "{body}");
    let used = value(&body, "joey_guest_container_memory_usage_bytes", &cid).unwrap_or(-1.0);
    assert!(used > 0.0 && used < mem, "container memory {used} bytes not in (0, {mem}):\n{body}");

    let o = c.ctr_out(&["task", "kill", "-s", "SIGKILL", "t3"]);
    assert!(o.status.success(), "ctr task kill: {}", stderr_of(&o));
    let t0 = Instant::now();
    loop {
        let ls = c.ctr_out(&["task", "ls"]);
        let out = String::from_utf8_lossy(&ls.stdout).into_owned();
        if out.lines().any(|l| l.starts_with("t3 ") && l.contains("STOPPED")) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "t3 did not stop: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = c.ctr_out(&["task", "delete", "t3"]);
    assert!(o.status.success(), "ctr task delete: {}", stderr_of(&o));
    // The endpoint went away with the sandbox and its state dir.
    assert!(!sock.exists(), "{} left after Delete", sock.display());
    assert!(!sock.parent().unwrap().exists(), "{} left after Delete", sock.parent().unwrap().display());
    let o = c.ctr_out(&["container", "rm", "t3"]);
    assert!(o.status.success(), "ctr container rm: {}", stderr_of(&o));

    // Foreground run killed from outside: ctr reports 128+9.
    let child = c
        .ctr(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "t4", "sleep", "300"])
        .spawn()
        .expect("ctr run");
    let t0 = Instant::now();
    loop {
        let ls = c.ctr_out(&["task", "ls"]);
        if String::from_utf8_lossy(&ls.stdout).lines().any(|l| l.starts_with("t4 ") && l.contains("RUNNING")) {
            break;
        }
        assert!(t0.elapsed() < RUN_TIMEOUT, "t4 did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let k = c.ctr_out(&["task", "kill", "-s", "SIGKILL", "t4"]);
    assert!(k.status.success(), "ctr task kill: {}", stderr_of(&k));
    let o = wait_output(child, RUN_TIMEOUT);
    assert_eq!(o.status.code(), Some(137), "stderr: {}", stderr_of(&o));

    c.assert_clean(&["t1", "t2", "t3", "t4"]);
}

/// The shim of a running task is SIGKILLed: containerd runs our binary's `delete`, which must
/// leave no QEMU, mount, shim socket or joey state behind.
#[test]
fn killed_shim_is_cleaned_up_by_delete() {
    let c = Containerd::start();
    c.import_busybox();
    let d = c.dir.path().display().to_string();

    let o = c.ctr_out(&["run", "-d", "--runtime", RUNTIME, IMAGE, "tk", "sleep", "300"]);
    assert!(o.status.success(), "ctr run -d: {}\ncontainerd log:\n{}", stderr_of(&o), c.log());
    let t0 = Instant::now();
    loop {
        let ls = c.ctr_out(&["task", "ls"]);
        if String::from_utf8_lossy(&ls.stdout).lines().any(|l| l.starts_with("tk ") && l.contains("RUNNING")) {
            break;
        }
        assert!(t0.elapsed() < RUN_TIMEOUT, "tk did not start\ncontainerd log:\n{}", c.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The VM runs (its QEMU mentions the sandbox state dir).
    let state = c.dir.path().join("joey-state").join("tk");
    assert!(state.is_dir(), "{} missing while tk runs", state.display());
    assert!(
        !processes_mentioning(&format!("{}/", state.display())).is_empty(),
        "no QEMU for tk: {:?}",
        processes_mentioning(&d)
    );

    let shims: Vec<i32> = processes_mentioning(&d)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim-joey-v2") && cmd.contains(" -id tk"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(shims.len(), 1, "shim of tk: {:?}", processes_mentioning(&d));
    sigkill(shims[0]);

    // containerd notices the dead shim, runs `containerd-shim-joey-v2 delete`; then the task
    // and container go away through ctr.
    let t0 = Instant::now();
    loop {
        let ls = c.ctr_out(&["task", "ls"]);
        let out = String::from_utf8_lossy(&ls.stdout).into_owned();
        if !out.lines().any(|l| l.starts_with("tk ") && l.contains("RUNNING")) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "tk still RUNNING after its shim died: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = c.ctr_out(&["task", "delete", "--force", "tk"]);
    assert!(
        o.status.success() || stderr_of(&o).contains("not found"),
        "ctr task delete --force: {}\ncontainerd log:\n{}",
        stderr_of(&o),
        c.log()
    );
    let o = c.ctr_out(&["container", "rm", "tk"]);
    assert!(o.status.success(), "ctr container rm: {}\ncontainerd log:\n{}", stderr_of(&o), c.log());

    assert!(!state.exists(), "{} left after delete", state.display());
    c.assert_clean(&["tk"]);
}

/// containerd is stopped (SIGTERM) and started again with the same config while a joey task
/// runs: the shim and the VM live on (same pids), the new containerd reconnects to the shim, and
/// the task is still RUNNING, killable (137), deletable, and leaves nothing behind.
#[test]
fn task_survives_containerd_restart() {
    let mut c = Containerd::start();
    c.import_busybox();
    let id = "tr";
    let d = c.dir.path().display().to_string();

    let o = c.ctr_out(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "300"]);
    assert!(o.status.success(), "ctr run -d: {}\ncontainerd log:\n{}", stderr_of(&o), c.log());
    c.wait_task_status(id, "RUNNING", RUN_TIMEOUT);
    let shims = c.shim_pids("containerd-shim-joey-v2", id);
    assert_eq!(shims.len(), 1, "shim of {id}: {:?}", processes_mentioning(&d));
    let shim = shims[0];
    let state = c.dir.path().join("joey-state").join(id);
    let vm = || -> Vec<i32> {
        processes_mentioning(&format!("{}/", state.display()))
            .into_iter()
            .filter(|(_, cmd)| cmd.split(' ').next().is_some_and(|b| b.ends_with("qemu-system-x86_64")))
            .map(|(pid, _)| pid)
            .collect()
    };
    let qemu = vm();
    assert_eq!(qemu.len(), 1, "QEMU of {id}: {:?}", processes_mentioning(&d));
    let task_pid = |c: &Containerd| -> Option<String> {
        let ls = c.ctr_out(&["task", "ls"]);
        String::from_utf8_lossy(&ls.stdout).lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f[1].to_string())
        })
    };
    let pid_before = task_pid(&c);

    let old = c.pid();
    c.restart();
    assert_ne!(c.pid(), old, "containerd was not restarted");

    // Same shim and QEMU processes, alive.
    let alive = |pid: i32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(alive(shim), "shim {shim} died with containerd");
    assert_eq!(c.shim_pids("containerd-shim-joey-v2", id), vec![shim], "shim of {id} after the restart");
    assert_eq!(vm(), qemu, "QEMU of {id} after the restart");
    // The new containerd reconnected to it: the task is RUNNING with the same pid.
    assert_eq!(c.task_status(id).as_deref(), Some("RUNNING"), "containerd log:\n{}", c.log());
    assert_eq!(task_pid(&c), pid_before, "task pid after the restart");

    let events = c.events();
    let o = c.ctr_out(&["task", "kill", "-s", "SIGKILL", id]);
    assert!(o.status.success(), "ctr task kill after the restart: {}\ncontainerd log:\n{}", stderr_of(&o), c.log());
    c.wait_task_status(id, "STOPPED", Duration::from_secs(30));
    assert_eq!(
        events.exit_status(id, Duration::from_secs(10)),
        Some(137),
        "exit event after the restart: {:?}",
        events.about(id)
    );
    let o = c.ctr_out(&["task", "delete", id]);
    assert!(o.status.success(), "ctr task delete: {}\ncontainerd log:\n{}", stderr_of(&o), c.log());
    let o = c.ctr_out(&["container", "rm", id]);
    assert!(o.status.success(), "ctr container rm: {}\ncontainerd log:\n{}", stderr_of(&o), c.log());
    assert_eq!(c.task_status(id), None);
    drop(events);
    // The shim exits once its last container is gone, and the VM with it.
    let t0 = Instant::now();
    while alive(shim) || qemu.iter().any(|&p| alive(p)) {
        assert!(t0.elapsed() < Duration::from_secs(15), "shim {shim} or QEMU {qemu:?} still alive after delete");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.assert_clean(&[id]);
}
