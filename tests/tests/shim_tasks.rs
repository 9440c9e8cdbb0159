//! The task service of `containerd-shim-joey-v2` beyond run/kill: exec (with and without a
//! terminal), `ctr task ps`, pause/resume, `ctr task metrics`, bind mounts, env/cwd, several
//! containers of one pod in one VM, and a malformed spec. A private containerd 1.6 (see
//! `joey_tests::containerd`) with real QEMU, guest kernel and agent. Needs `JOEY_SHIM`,
//! `JOEY_KERNEL`, `JOEY_INITRD` and Debian's containerd, runc, busybox-static, util-linux
//! (`script` gives `ctr -t` a terminal). Every test ends with `assert_clean`.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use joey_tests::containerd::*;
use joey_tests::*;

const POD_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// containerd 1.6 sometimes garbage-collects a freshly imported image's layer snapshot between
/// ctr's "is it unpacked" check and preparing the container snapshot ("parent snapshot … does
/// not exist"), before any shim is involved; ctr unpacks again on the next try.
fn snapshot_race(text: &str) -> bool {
    text.contains("parent snapshot") && text.contains("does not exist")
}

/// `ctr <args>` (a `run`), retried when it hit [`snapshot_race`].
fn ctr_run(c: &Containerd, args: &[&str]) -> Output {
    let mut tries = 0;
    loop {
        let o = c.ctr_out(args);
        tries += 1;
        if o.status.success() || !snapshot_race(&stderr_of(&o)) || tries == 3 {
            return o;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// When a test fails, force-deletes its tasks and containers before containerd goes, so that
/// the shims stop their VMs instead of outliving the test. Declare it after the `Containerd`.
struct OnPanic<'a> {
    c: &'a Containerd,
    ids: &'a [&'a str],
}

impl Drop for OnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in self.ids {
                let _ = self.c.ctr_out(&["task", "delete", "--force", id]);
                let _ = self.c.ctr_out(&["container", "rm", id]);
            }
        }
    }
}

/// STATUS of task `id` in `ctr task ls`, if listed.
fn task_status(c: &Containerd, id: &str) -> Option<String> {
    let ls = c.ctr_out(&["task", "ls"]);
    String::from_utf8_lossy(&ls.stdout).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 3 && f[0] == id).then(|| f[2].to_string())
    })
}

/// PID of task `id` in `ctr task ls`.
fn task_pid(c: &Containerd, id: &str) -> u32 {
    let ls = c.ctr_out(&["task", "ls"]);
    let out = String::from_utf8_lossy(&ls.stdout).into_owned();
    out.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[0] == id).then(|| f[1].parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no pid for {id} in:\n{out}"))
}

fn wait_status(c: &Containerd, id: &str, want: &str) {
    let t0 = Instant::now();
    loop {
        let s = task_status(c, id);
        if s.as_deref() == Some(want) {
            return;
        }
        assert!(
            t0.elapsed() < RUN_TIMEOUT,
            "task {id} is {s:?}, not {want}\ncontainerd log:\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`Containerd::assert_ok`], in this file's argument order.
fn ok(o: &Output, what: &str, c: &Containerd) {
    c.assert_ok(o, what);
}

/// `ctr run -d` of `argv` as task `id` with extra flags; waits until it runs.
fn run_detached(c: &Containerd, id: &str, flags: &[&str], argv: &[&str]) {
    let mut args = vec!["run", "-d", "--runtime", RUNTIME];
    args.extend_from_slice(flags);
    args.push(IMAGE);
    args.push(id);
    args.extend_from_slice(argv);
    let o = ctr_run(c, &args);
    ok(&o, "ctr run -d", c);
    wait_status(c, id, "RUNNING");
}

/// SIGKILL, wait for STOPPED, delete the task and the container.
fn remove(c: &Containerd, id: &str) {
    let o = c.ctr_out(&["task", "kill", "-s", "SIGKILL", id]);
    ok(&o, "ctr task kill", c);
    wait_status(c, id, "STOPPED");
    ok(&c.ctr_out(&["task", "delete", id]), "ctr task delete", c);
    ok(&c.ctr_out(&["container", "rm", id]), "ctr container rm", c);
}

/// Runs a ctr command line under a pseudo terminal (`script`), as `ctr -t` needs.
/// Retried when a `run` hit [`snapshot_race`] (ctr's stderr is in `script`'s stdout).
fn with_tty(c: &Containerd, args: &str) -> Output {
    let cmd = format!("ctr -a {} {args}", c.sock().display());
    let mut tries = 0;
    loop {
        let child = std::process::Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script (util-linux)");
        let o = wait_output(child, RUN_TIMEOUT);
        tries += 1;
        if !snapshot_race(&String::from_utf8_lossy(&o.stdout)) || tries == 3 {
            return o;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Terminal output as text: without the `\r` the terminals add, and without the `^@` a guest
/// terminal echoes for the NUL that `script`/ctr feed its stdin at start or end.
fn tty_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).replace('\r', "").replace("^@", "")
}

fn qemus(c: &Containerd) -> Vec<(i32, String)> {
    let state = c.dir.path().join("joey-state").display().to_string();
    processes_mentioning(&format!("{state}/"))
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .collect()
}

/// env and cwd of the init process (flat fields and OCI spec agree).
#[test]
fn run_with_env_and_cwd() {
    let c = Containerd::start();
    c.import_busybox();
    let o = ctr_run(&c, &[
        "run", "--rm", "--runtime", RUNTIME, "--env", "FOO=bar baz", "--cwd", "/etc", IMAGE, "ec", "sh", "-c",
        "echo \"$FOO\"; pwd",
    ]);
    ok(&o, "ctr run --env --cwd", &c);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "bar baz\n/etc\n");
    c.assert_clean(&["ec"]);
}

/// `ctr task exec` with and without a terminal: exact output and exit code; `ctr task ps`
/// lists the guest pids (the init pid, and the exec's while it runs).
#[test]
fn exec_and_ps() {
    let c = Containerd::start();
    c.import_busybox();
    let _guard = OnPanic { c: &c, ids: &["x1"] };
    run_detached(&c, "x1", &["--env", "FOO=from-spec"], &["sleep", "300"]);

    let o = c.ctr_out(&["task", "exec", "--exec-id", "e1", "x1", "sh", "-c", "echo \"out $FOO\"; echo err >&2; exit 5"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out from-spec\n", "stderr: {}\n{}", stderr_of(&o), c.log());
    assert_eq!(stderr_of(&o), "err\n");
    assert_eq!(o.status.code(), Some(5));

    // The same exec id again after the first was deleted (ctr deletes it when it exits).
    let o = c.ctr_out(&["task", "exec", "--exec-id", "e1", "x1", "true"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr_of(&o));

    // With a terminal: stdout is the pty (stderr merged), \r\n line ends.
    let o = with_tty(&c, "task exec -t --exec-id e2 x1 sh -c 'test -t 1 && echo is-a-tty; echo e >&2; exit 4'");
    assert_eq!(
        tty_text(&o),
        "is-a-tty\ne\n",
        "stderr: {}\ncontainerd log:\n{}",
        stderr_of(&o),
        c.log()
    );
    assert_eq!(o.status.code(), Some(4));

    // ps: the init pid; with a running exec, two pids.
    let init = task_pid(&c, "x1");
    let ps = c.ctr_out(&["task", "ps", "x1"]);
    ok(&ps, "ctr task ps", &c);
    let pids = |o: &Output| -> Vec<u32> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    };
    assert_eq!(pids(&ps), vec![init], "{}", String::from_utf8_lossy(&ps.stdout));
    let child = c
        .ctr(&["task", "exec", "--exec-id", "e3", "x1", "sleep", "300"])
        .spawn()
        .expect("ctr task exec");
    let t0 = Instant::now();
    let listed = loop {
        let p = pids(&c.ctr_out(&["task", "ps", "x1"]));
        if p.len() == 2 {
            break p;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "exec pid not listed: {p:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(listed.contains(&init), "{listed:?}");
    assert!(listed.iter().all(|p| *p > 0), "{listed:?}");
    ok(&c.ctr_out(&["task", "kill", "--exec-id", "e3", "-s", "SIGKILL", "x1"]), "kill exec", &c);
    let o = wait_output(child, RUN_TIMEOUT);
    assert_eq!(o.status.code(), Some(137), "stderr: {}", stderr_of(&o));

    remove(&c, "x1");
    c.assert_clean(&["x1"]);
}

/// `ctr run -t`: the container's process gets a terminal.
#[test]
fn run_with_terminal() {
    let c = Containerd::start();
    c.import_busybox();
    let o = with_tty(
        &c,
        &format!("run --rm -t --runtime {RUNTIME} {IMAGE} tt sh -c 'test -t 0 && test -t 1 && echo tty-ok; exit 2'"),
    );
    assert_eq!(
        tty_text(&o),
        "tty-ok\n",
        "stderr: {}\ncontainerd log:\n{}",
        stderr_of(&o),
        c.log()
    );
    assert_eq!(o.status.code(), Some(2));
    c.assert_clean(&["tt"]);
}

/// Bind mounts from the host: `ro` refuses writes, rw writes reach the host.
#[test]
fn bind_mounts_ro_and_rw() {
    let c = Containerd::start();
    c.import_busybox();
    let host = tempfile::tempdir().expect("tempdir");
    let ro = host.path().join("ro");
    let rw = host.path().join("rw");
    std::fs::create_dir(&ro).unwrap();
    std::fs::create_dir(&rw).unwrap();
    std::fs::write(ro.join("in"), "from the host\n").unwrap();
    let m_ro = format!("type=bind,src={},dst=/ro,options=rbind:ro", ro.display());
    let m_rw = format!("type=bind,src={},dst=/rw,options=rbind:rw", rw.display());
    let o = ctr_run(&c, &[
        "run", "--rm", "--runtime", RUNTIME, "--mount", &m_ro, "--mount", &m_rw, IMAGE, "bm", "sh", "-c",
        "cat /ro/in; echo written > /rw/out; (echo x > /ro/new) 2>/dev/null || echo ro-refused",
    ]);
    ok(&o, "ctr run --mount", &c);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "from the host\nro-refused\n");
    assert_eq!(std::fs::read_to_string(rw.join("out")).unwrap(), "written\n");
    assert!(!ro.join("new").exists());
    c.assert_clean(&["bm"]);
    // The host dirs are untouched otherwise and nothing is mounted on them.
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mi.contains(&host.path().display().to_string()), "{mi}");
}

fn count_lines(p: &Path) -> usize {
    std::fs::read_to_string(p).map(|s| s.lines().count()).unwrap_or(0)
}

/// Pause freezes the container (no progress in a bind-mounted host file), resume thaws it;
/// the task shows PAUSED in between.
#[test]
fn pause_and_resume() {
    let c = Containerd::start();
    c.import_busybox();
    let host = tempfile::tempdir().expect("tempdir");
    let m = format!("type=bind,src={},dst=/data,options=rbind:rw", host.path().display());
    let _guard = OnPanic { c: &c, ids: &["pr"] };
    run_detached(
        &c,
        "pr",
        &["--mount", &m],
        &["sh", "-c", "i=0; while :; do echo $i >> /data/count; i=$((i+1)); sleep 0.1; done"],
    );
    let count = host.path().join("count");
    let t0 = Instant::now();
    while count_lines(&count) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(30), "no progress before pause\n{}", c.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(&c.ctr_out(&["task", "pause", "pr"]), "ctr task pause", &c);
    assert_eq!(task_status(&c, "pr").as_deref(), Some("PAUSED"));
    // A write in flight may still land: wait until two reads 200 ms apart agree (deadline),
    // then watch for 1.5 s: nothing may change while paused (an absence needs a window).
    let mut last = count_lines(&count);
    let frozen = wait_for("the paused writer's file to settle", Duration::from_secs(10), Duration::from_millis(200), || {
        let now = count_lines(&count);
        let settled = now == last;
        last = now;
        settled.then_some(now)
    })
    .unwrap_or_else(|e| panic!("{e}: still growing while paused"));
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_millis(1500) {
        assert_eq!(count_lines(&count), frozen, "progress while paused");
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(&c.ctr_out(&["task", "resume", "pr"]), "ctr task resume", &c);
    assert_eq!(task_status(&c, "pr").as_deref(), Some("RUNNING"));
    let t0 = Instant::now();
    while count_lines(&count) < frozen + 3 {
        assert!(t0.elapsed() < Duration::from_secs(30), "no progress after resume");
        std::thread::sleep(Duration::from_millis(100));
    }
    remove(&c, "pr");
    c.assert_clean(&["pr"]);
}

/// `ctr task metrics` prints the container's cgroup v2 memory and cpu figures. (Update has no
/// test here: ctr 1.6 has no `task update`.)
#[test]
fn task_metrics() {
    let c = Containerd::start();
    c.import_busybox();
    let _guard = OnPanic { c: &c, ids: &["mt"] };
    run_detached(&c, "mt", &[], &["sh", "-c", "x=$(seq 1 20000); sleep 300"]);
    let o = c.ctr_out(&["task", "metrics", "mt"]);
    ok(&o, "ctr task metrics", &c);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let get = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 2 && f[0] == name).then(|| f[1].parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("{name} missing in:\n{out}"))
    };
    assert!(get("memory.usage") > 0, "{out}");
    assert!(get("cpu.usage_usec") > 0, "{out}");
    assert!(get("pids.current") >= 1, "{out}");
    remove(&c, "mt");
    c.assert_clean(&["mt"]);
}

/// Containers carrying the same CRI sandbox id share one shim and one VM; the VM stays while
/// any of them is left and goes with the last one.
#[test]
fn pod_containers_share_one_vm() {
    let c = Containerd::start();
    c.import_busybox();
    let ann = format!("{POD_ANNOTATION}=pod1");
    let _guard = OnPanic { c: &c, ids: &["p1", "p2", "p3"] };
    run_detached(&c, "p1", &["--annotation", &ann], &["sleep", "300"]);
    run_detached(&c, "p2", &["--annotation", &ann], &["sleep", "300"]);
    assert_eq!(qemus(&c).len(), 1, "{:?}", qemus(&c));
    let d = c.dir.path().display().to_string();
    let shims = || -> usize {
        processes_mentioning(&d)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("containerd-shim-joey-v2"))
            .count()
    };
    assert_eq!(shims(), 1, "{:?}", processes_mentioning(&d));

    // A third one comes and goes while the others run, in the same VM.
    let o = ctr_run(&c, &["run", "--rm", "--runtime", RUNTIME, "--annotation", &ann, IMAGE, "p3", "echo", "hi from p3"]);
    ok(&o, "ctr run p3", &c);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi from p3\n");
    assert_eq!(qemus(&c).len(), 1);

    // The first container goes: the VM stays for p2.
    remove(&c, "p1");
    assert_eq!(qemus(&c).len(), 1, "VM gone with p2 still there");
    assert_eq!(task_status(&c, "p2").as_deref(), Some("RUNNING"));
    let o = c.ctr_out(&["task", "exec", "--exec-id", "e1", "p2", "echo", "still here"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "still here\n", "stderr: {}", stderr_of(&o));

    remove(&c, "p2");
    c.assert_clean(&["pod1", "p1", "p2", "p3"]);
}

/// An empty network namespace in a file (`unshare --net=FILE`), unmounted on drop: a CRI-style
/// pod netns path for `ctr run --with-ns network:PATH` that holds nothing but `lo`.
struct NetnsFile {
    dir: tempfile::TempDir,
}

impl NetnsFile {
    fn new() -> NetnsFile {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("netns"), b"").expect("netns file");
        let o = std::process::Command::new("unshare")
            .arg(format!("--net={}", dir.path().join("netns").display()))
            .arg("true")
            .output()
            .expect("unshare");
        assert!(o.status.success(), "unshare --net=FILE (needs root): {}", stderr_of(&o));
        NetnsFile { dir }
    }

    fn path(&self) -> String {
        self.dir.path().join("netns").display().to_string()
    }
}

impl Drop for NetnsFile {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.path()).status();
    }
}

/// A network namespace *with a path* (a CRI pod's) means the guest's network namespace: two
/// containers of the pod that carry it share one namespace (an exec joins it too), while a
/// container with a path-less network namespace (ctr's default spec) gets a new one.
#[test]
fn netns_path_means_the_pods_network_namespace() {
    let c = Containerd::start();
    c.import_busybox();
    let netns = NetnsFile::new();
    let ann = format!("{POD_ANNOTATION}=pod2");
    let with_ns = format!("network:{}", netns.path());
    let _guard = OnPanic { c: &c, ids: &["n1", "n2", "n3"] };
    run_detached(&c, "n1", &["--annotation", &ann, "--with-ns", &with_ns], &["sleep", "300"]);
    let o = c.ctr_out(&["task", "exec", "--exec-id", "e1", "n1", "readlink", "/proc/self/ns/net"]);
    ok(&o, "ctr task exec n1", &c);
    let n1 = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(n1.starts_with("net:["), "{n1:?}");
    let run = |id: &str, flags: &[&str]| {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME, "--annotation", &ann];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[IMAGE, id, "readlink", "/proc/self/ns/net"]);
        let o = ctr_run(&c, &args);
        ok(&o, "ctr run", &c);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(run("n2", &["--with-ns", &with_ns]), n1, "same pod netns path, same namespace");
    let n3 = run("n3", &[]);
    assert!(n3.starts_with("net:[") && n3 != n1, "no path: a namespace of its own ({n3:?})");
    remove(&c, "n1");
    c.assert_clean(&["pod2", "n1", "n2", "n3"]);
}

/// A bind mount whose source does not exist: Create fails naming it, no VM is left.
#[test]
fn malformed_spec_is_refused() {
    let c = Containerd::start();
    c.import_busybox();
    let o = ctr_run(&c, &[
        "run", "--rm", "--runtime", RUNTIME, "--mount", "type=bind,src=/nonexistent/joey-src,dst=/x,options=rbind",
        IMAGE, "bad", "true",
    ]);
    assert!(!o.status.success(), "ctr run with a missing bind source succeeded");
    let err = stderr_of(&o);
    assert!(
        err.contains("bind source /nonexistent/joey-src does not exist"),
        "stderr: {err}\ncontainerd log:\n{}",
        c.log()
    );
    assert!(qemus(&c).is_empty(), "{:?}", qemus(&c));
    // ctr leaves the container record; its removal must work.
    let _ = c.ctr_out(&["container", "rm", "bad"]);

    // An invalid rlimit type in a hand-written spec.
    let spec = c.dir.path().join("bad-rlimit.json");
    std::fs::write(
        &spec,
        r#"{"ociVersion": "1.0.2",
            "process": {"user": {"uid": 0, "gid": 0}, "args": ["true"], "cwd": "/",
                        "rlimits": [{"type": "RLIMIT_BOGUS", "hard": 1, "soft": 1}]},
            "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}}"#,
    )
    .unwrap();
    let spec = spec.display().to_string();
    // With --config, ctr takes the spec as is (no image).
    let o = ctr_run(&c, &["run", "--rm", "--runtime", RUNTIME, "--config", &spec, "bad2"]);
    assert!(!o.status.success(), "ctr run with an invalid rlimit succeeded");
    let err = stderr_of(&o);
    assert!(err.contains("RLIMIT_BOGUS"), "stderr: {err}\ncontainerd log:\n{}", c.log());
    let _ = c.ctr_out(&["container", "rm", "bad2"]);
    c.assert_clean(&["bad", "bad2"]);
}

/// `ctr run --log-uri`: `file://` appends the output to a file (parent directories created);
/// `binary://` hands stdout and stderr to a logging binary on fds 3 and 4 (ready on fd 5), with
/// the query as its arguments and the container's id and namespace in its environment.
#[test]
fn log_uris_file_and_binary() {
    let c = Containerd::start();
    c.import_busybox();
    let _guard = OnPanic { c: &c, ids: &["lf", "lb"] };
    let d = c.dir.path();

    let log = d.join("logs/sub/lf.log");
    let uri = format!("file://{}", log.display());
    let o = ctr_run(&c, &["run", "--rm", "--runtime", RUNTIME, "--log-uri", &uri, IMAGE, "lf", "sh", "-c", "echo one; echo two"]);
    ok(&o, "ctr run --log-uri file://", &c);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "", "output went to the log file, not ctr");
    assert_eq!(std::fs::read_to_string(&log).unwrap_or_default(), "one\ntwo\n");

    let out = d.join("binlog");
    std::fs::create_dir(&out).unwrap();
    let logger = d.join("logger.sh");
    std::fs::write(
        &logger,
        "#!/bin/sh\n# $1 = dir (query key), $2 = its value\nexec 5>&-\n\
         echo \"$CONTAINER_ID $CONTAINER_NAMESPACE $1\" > \"$2/env\"\n\
         cat <&3 > \"$2/out\" &\ncat <&4 > \"$2/err\"\nwait\n",
    )
    .unwrap();
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let uri = format!("binary://{}?dir={}", logger.display(), out.display());
    let o = ctr_run(&c, &[
        "run", "--rm", "--runtime", RUNTIME, "--log-uri", &uri, IMAGE, "lb", "sh", "-c", "echo to-out; echo to-err >&2; exit 4",
    ]);
    assert_eq!(o.status.code(), Some(4), "stderr: {}\ncontainerd log:\n{}", stderr_of(&o), c.log());
    // The logger ends once both streams reached EOF.
    let t0 = Instant::now();
    while std::fs::read_to_string(out.join("err")).unwrap_or_default() != "to-err\n" && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read_to_string(out.join("out")).unwrap_or_default(), "to-out\n");
    assert_eq!(std::fs::read_to_string(out.join("err")).unwrap_or_default(), "to-err\n");
    assert_eq!(std::fs::read_to_string(out.join("env")).unwrap_or_default(), "lb default dir\n");

    // An unsupported scheme is refused with a message naming it, before any VM starts.
    let o = ctr_run(&c, &["run", "--rm", "--runtime", RUNTIME, "--log-uri", "ftp://x/y", IMAGE, "lx", "true"]);
    assert!(!o.status.success(), "an ftp:// log URI was accepted");
    assert!(stderr_of(&o).contains("unsupported scheme \"ftp\""), "stderr: {}", stderr_of(&o));
    let _ = c.ctr_out(&["container", "rm", "lx"]);
    assert!(processes_mentioning(&format!("{}/", out.display())).is_empty(), "logger left running");
    c.assert_clean(&["lf", "lb", "lx"]);
}

/// Update (containerd's UpdateTask; ctr 1.6 has no `task update`, so the test calls the shim's
/// task API itself): new memory and pids limits reach the container's guest cgroup, as
/// `ctr task metrics` then shows; a malformed resources object is INVALID_ARGUMENT.
#[test]
fn update_changes_the_guest_cgroup_limits() {
    use containerd_shim_protos::api::UpdateTaskRequest;
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::MessageField;
    use containerd_shim_protos::{Client, TaskClient};

    let c = Containerd::start();
    c.import_busybox();
    let _guard = OnPanic { c: &c, ids: &["up"] };
    run_detached(&c, "up", &[], &["sleep", "300"]);
    let metric = |name: &str| -> String {
        let o = c.ctr_out(&["task", "metrics", "up"]);
        ok(&o, "ctr task metrics", &c);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 2 && f[0] == name).then(|| f[1].to_string())
            })
            .unwrap_or_else(|| panic!("{name} missing in:\n{out}"))
    };
    assert_ne!(metric("memory.usage_limit"), "67108864", "limit set before the update");

    let addr = format!("unix://{}", c.shim_socket("up").display());
    let client = TaskClient::new(Client::connect(&addr).expect("connect to the shim"));
    let update = |json: &str| {
        let req = UpdateTaskRequest {
            id: "up".into(),
            resources: MessageField::some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
                value: json.as_bytes().to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        };
        client.update(containerd_shim_protos::ttrpc::context::with_timeout(30_000_000_000), &req)
    };
    update(r#"{"memory": {"limit": 67108864}, "pids": {"limit": 32}}"#).expect("Update");
    assert_eq!(metric("memory.usage_limit"), "67108864");
    assert_eq!(metric("pids.limit"), "32");

    let e = update("{not json").expect_err("a malformed resources object was accepted");
    let msg = format!("{e:?}");
    assert!(msg.contains("INVALID_ARGUMENT"), "{msg}");
    drop(client);
    remove(&c, "up");
    c.assert_clean(&["up"]);
}

/// Pause racing the exit of the container's process: every Pause either succeeds (the task is
/// PAUSED, the process frozen, and Resume lets it finish; or, as with runc, the exit landed
/// just after the freeze and the task is STOPPED) or fails because the process has exited;
/// then the task is STOPPED with the process's status and deletes cleanly. (That exit may also
/// be recorded between the PAUSED status and the Resume, which then fails saying so.) No answer leaves a
/// frozen container behind an error, or a PAUSED task whose process is gone.
#[test]
fn pause_racing_the_exit_keeps_the_state_true() {
    let c = Containerd::start();
    c.import_busybox();
    let _guard = OnPanic { c: &c, ids: &["px"] };
    let events = c.events();
    run_detached(&c, "px", &[], &["sh", "-c", "sleep 1; exit 3"]);
    let t0 = Instant::now();
    let mut paused = 0;
    loop {
        assert!(t0.elapsed() < RUN_TIMEOUT, "pause never failed\n{}", c.log());
        let o = c.ctr_out(&["task", "pause", "px"]);
        if !o.status.success() {
            // The process exited: the task is (or is about to be) STOPPED, never PAUSED.
            break;
        }
        paused += 1;
        match task_status(&c, "px").as_deref() {
            Some("PAUSED") => {}
            Some("STOPPED") => break,
            s => panic!("after pause {paused}: {s:?}"),
        }
        let r = c.ctr_out(&["task", "resume", "px"]);
        if !r.status.success() {
            // The exit that landed just after the freeze was recorded between the status
            // above and this resume: the task is STOPPED, and resume says so.
            let s = task_status(&c, "px");
            assert!(
                s.as_deref() == Some("STOPPED") && stderr_of(&r).contains("is stopped"),
                "resume {paused} failed with the task {s:?}: {}\n{}",
                stderr_of(&r),
                c.log()
            );
            break;
        }
        let s = task_status(&c, "px");
        assert!(matches!(s.as_deref(), Some("RUNNING" | "STOPPED")), "after resume {paused}: {s:?}");
    }
    wait_status(&c, "px", "STOPPED");
    assert_eq!(events.exit_status("px", RUN_TIMEOUT), Some(3), "{:?}", events.about("px"));
    ok(&c.ctr_out(&["task", "delete", "px"]), "ctr task delete", &c);
    ok(&c.ctr_out(&["container", "rm", "px"]), "ctr container rm", &c);
    drop(events);
    c.assert_clean(&["px"]);
}

/// Start of a container whose VM died (QEMU killed after the pod's first container started):
/// Start fails, and the new task stays CREATED instead of being recorded RUNNING; both tasks
/// delete cleanly and nothing is left.
#[test]
fn start_after_the_vm_died_fails_and_the_task_stays_created() {
    let c = Containerd::start();
    c.import_busybox();
    let ann = format!("{POD_ANNOTATION}=podx");
    let _guard = OnPanic { c: &c, ids: &["v1", "v2"] };
    run_detached(&c, "v1", &["--annotation", &ann], &["sleep", "300"]);
    let vms = qemus(&c);
    assert_eq!(vms.len(), 1, "{vms:?}");
    sigkill(vms[0].0);
    // The first container's process is gone with the VM.
    wait_status(&c, "v1", "STOPPED");
    let o = ctr_run(&c, &["run", "-d", "--runtime", RUNTIME, "--annotation", &ann, IMAGE, "v2", "sleep", "300"]);
    assert!(!o.status.success(), "start in a dead VM succeeded: {}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(task_status(&c, "v2").as_deref(), Some("CREATED"), "{}", c.log());
    for id in ["v2", "v1"] {
        ok(&c.ctr_out(&["task", "delete", id]), "ctr task delete", &c);
        ok(&c.ctr_out(&["container", "rm", id]), "ctr container rm", &c);
    }
    c.assert_clean(&["podx", "v1", "v2"]);
}
