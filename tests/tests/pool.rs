//! The warm VM pool (docs/pool.md): `joey-pool` keeps booted QEMU VMs and `joeyctl run` leases
//! one when the pool runs, booting cold when it is absent or empty. Real QEMU, kernel and agent.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use joey_tests::containerd::{IMAGE, RUNTIME};
use joey_tests::*;

/// The `joey-pool` binary: `$JOEY_POOL`, else next to `$JOEYCTL`.
fn pool_path() -> PathBuf {
    match std::env::var_os("JOEY_POOL") {
        Some(p) => PathBuf::from(p),
        None => joeyctl_path().with_file_name("joey-pool"),
    }
}

/// A QEMU environment whose config has `[pool] size = <size>`.
fn pool_env(size: u32) -> Env {
    Env::with_config(|k, i| {
        format!(
            "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\n\n[pool]\nsize = {size}\n",
            k.display(),
            i.display()
        )
    })
}

fn pool_cmd(env: &Env, args: &[&str]) -> Command {
    let mut c = Command::new(pool_path());
    c.args(args).arg("--config").arg(&env.config);
    c.env_remove("JOEY_CONFIG").env_remove("JOEY_LOG");
    c
}

/// A running `joey-pool` of an environment.
struct Pool {
    child: Option<Child>,
}

impl Pool {
    fn start(env: &Env) -> Pool {
        let child = pool_cmd(env, &[])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn joey-pool");
        Pool { child: Some(child) }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGTERM, then the pool's exit status and stderr.
    fn terminate(mut self) -> Output {
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        wait_output(self.child.take().expect("running"), Duration::from_secs(60))
    }

    /// SIGKILL (a crash), then reaped.
    fn kill(mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().expect("kill joey-pool");
        c.wait().expect("reap joey-pool");
    }
}

impl Drop for Pool {
    /// After a failed test: SIGTERM, so that the pool removes its VMs (a SIGKILL would leave
    /// their mounts behind); SIGKILL only if it has not exited within a minute.
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let gone = wait_for(
            "joey-pool exit",
            Duration::from_secs(60),
            Duration::from_millis(50),
            || c.try_wait().ok().flatten(),
        );
        if gone.is_err() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every thread of the pool runs under its seccomp filter (`Seccomp: 2`; the runtime class,
/// docs/security.md), as the shim's and `joeyctl run`'s do (tests/tests/security.rs).
fn assert_seccomp_on_every_thread(pid: i32) {
    let mut threads = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the pool's threads") {
        let status = t.unwrap().path().join("status");
        // A thread may end while we look.
        let Ok(text) = std::fs::read_to_string(&status) else {
            continue;
        };
        threads += 1;
        assert!(text.lines().any(|l| l == "Seccomp:\t2"), "{}:\n{text}", status.display());
    }
    assert!(threads > 1, "joey-pool has {threads} threads");
}

/// `joey-pool status` output (`None`: no pool answers).
fn status(env: &Env) -> Option<String> {
    let o = pool_cmd(env, &["status"])
        .output()
        .expect("joey-pool status");
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Waits until the pool has `ready` VMs ready and none booting.
fn wait_ready(env: &Env, ready: u32, size: u32) {
    let want = format!("ready={ready} booting=0 leased=0 size={size}");
    let r = wait_for(
        &want,
        Duration::from_secs(120),
        Duration::from_millis(100),
        || status(env).filter(|s| *s == want),
    );
    r.unwrap_or_else(|e| panic!("{e}; last status {:?}", status(env)));
}

/// The VM directories the pool holds.
fn vm_dirs(env: &Env) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(env.state_dir.join(".pool/vms"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// `joey timings: vm source=<source> (<detail>)` of a `joeyctl run --timings`.
fn source_of(o: &Output) -> (String, String) {
    let err = stderr_of(o);
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("joey timings: vm source="))
        .unwrap_or_else(|| panic!("no vm source line in {err}"));
    let (src, detail) = line.split_once(" (").expect("source (detail)");
    (src.to_string(), detail.trim_end_matches(')').to_string())
}

/// `vm_start_to_agent_ready_ms` of a `joeyctl run --timings`.
fn ready_ms(o: &Output) -> u64 {
    let err = stderr_of(o);
    err.split_whitespace()
        .find_map(|w| w.strip_prefix("vm_start_to_agent_ready_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no timing in {err}"))
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn mounts_mentioning(needle: &Path) -> Vec<String> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let n = needle.display().to_string();
    mi.lines()
        .filter(|l| l.contains(&n))
        .map(str::to_string)
        .collect()
}

/// Waits until `dir` is gone and `pid` has exited (a released or orphaned VM).
fn wait_vm_gone(dir: &Path, pid: i32) {
    wait_for(
        &format!("VM {} (pid {pid}) removed", dir.display()),
        Duration::from_secs(30),
        Duration::from_millis(50),
        || (!dir.exists() && !pid_alive(pid)).then_some(()),
    )
    .unwrap();
}

/// `joeyctl run --config <env> [extra] -- argv` to completion; the run leaves no sandbox state
/// of its own (the pool's directory aside).
fn run(env: &Env, extra: &[&str], argv: &[&str]) -> Output {
    let mut c = env.command(extra, argv);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let o = wait_output(c.spawn().expect("spawn joeyctl"), Duration::from_secs(120));
    let own: Vec<PathBuf> = std::fs::read_dir(&env.state_dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| !p.ends_with(".pool"))
                .collect()
        })
        .unwrap_or_default();
    assert!(own.is_empty(), "leaked sandbox state: {own:?}");
    o
}

/// Everything of the environment is gone: processes, state files, sockets, mounts.
fn assert_all_gone(env: &Env) {
    env.assert_no_leaks();
    let m = mounts_mentioning(env.dir.path());
    assert!(m.is_empty(), "leaked mounts: {m:?}");
}

/// A pool of `size` in a new environment, once it is full.
fn full_pool(size: u32) -> (Env, Pool) {
    let env = pool_env(size);
    let pool = Pool::start(&env);
    wait_ready(&env, size, size);
    (env, pool)
}

/// SIGTERM: the pool exits 0 and nothing of the environment is left.
fn stop_cleanly(pool: Pool, env: &Env) {
    let out = pool.terminate();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert_all_gone(env);
}

/// A VM leased by `joey-pool lease` (a lessee process of its own): (child, vm dir, QEMU pid).
fn lease(env: &Env) -> (Child, PathBuf, i32) {
    let mut c = pool_cmd(env, &["lease"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn joey-pool lease");
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read the lease");
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .to_string()
    };
    (
        c,
        PathBuf::from(field("dir=")),
        field("pid=").parse().expect("pid"),
    )
}

#[test]
fn pooled_runs_are_fast_refilled_never_reused_and_sigterm_leaves_nothing() {
    let (env, pool) = full_pool(1);
    let first = vm_dirs(&env);
    assert_eq!(first.len(), 1);

    let o = run(
        &env,
        &["--timings"],
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr_of(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert!(stderr_of(&o).starts_with("err\n"), "{}", stderr_of(&o));
    let (src, vm1) = source_of(&o);
    assert_eq!(src, "pool");
    assert_eq!(first[0].file_name().unwrap().to_string_lossy(), vm1);
    eprintln!("pooled lease -> agent ready: {} ms", ready_ms(&o));
    // Used once: the pool removes it once the lease ended (and the run left nothing of its own).
    wait_for(
        "the used VM removed",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || (!first[0].exists()).then_some(()),
    )
    .unwrap();

    // The pool refills with a new VM, and the next run gets that one.
    wait_ready(&env, 1, 1);
    assert_seccomp_on_every_thread(pool.pid());
    let second = vm_dirs(&env);
    assert_eq!(second.len(), 1);
    assert_ne!(second, first);
    let o = run(&env, &["--timings"], &["true"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    let (src, vm2) = source_of(&o);
    assert_eq!((src.as_str(), vm2 != vm1), ("pool", true));
    eprintln!("pooled lease -> agent ready: {} ms", ready_ms(&o));

    // SIGTERM (while a refill may be booting): every VM stopped, nothing left.
    stop_cleanly(pool, &env);
    assert!(status(&env).is_none());
}

#[test]
fn absent_or_empty_pool_boots_cold_and_a_dead_lessees_vm_is_removed() {
    let env = pool_env(1);
    // No pool runs.
    let o = run(&env, &["--timings"], &["echo", "cold"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "cold\n");
    assert_eq!(
        source_of(&o),
        ("cold".to_string(), "no pool runs".to_string())
    );

    // The only VM is leased by another lessee: the pool is empty while it refills.
    let pool = Pool::start(&env);
    wait_ready(&env, 1, 1);
    let (mut lessee, dir, qemu) = lease(&env);
    assert!(dir.join("shared").is_dir() && pid_alive(qemu));
    let o = run(&env, &["--timings"], &["echo", "still"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "still\n");
    let (src, why) = source_of(&o);
    assert_eq!(src, "cold");
    assert!(why.starts_with("the pool is empty"), "{why}");

    // The lessee dies without giving the VM back: the pool stops and removes it.
    lessee.kill().unwrap();
    lessee.wait().unwrap();
    wait_vm_gone(&dir, qemu);
    assert!(mounts_mentioning(&dir).is_empty());

    stop_cleanly(pool, &env);
}

#[test]
fn a_killed_pools_orphans_are_cleaned_by_the_next_start() {
    let (env, pool) = full_pool(1);
    // A lessee that shared a directory into its VM, as a sandbox does.
    let (mut lessee, dir, qemu) = lease(&env);
    let share = dir.join("shared/c1");
    std::fs::create_dir(&share).unwrap();
    let src = tempfile::tempdir().unwrap();
    let st = Command::new("mount")
        .arg("--bind")
        .arg(src.path())
        .arg(&share)
        .status()
        .unwrap();
    assert!(st.success());
    pool.kill();
    // The kernel kills QEMU with its parent; the directory and the mounts stay behind.
    wait_for(
        "orphaned QEMU gone",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || (!pid_alive(qemu)).then_some(()),
    )
    .unwrap();
    assert!(dir.exists());
    assert!(!mounts_mentioning(&dir).is_empty());
    let _ = lessee.kill();
    let _ = lessee.wait();

    let pool = Pool::start(&env);
    wait_ready(&env, 1, 1);
    assert!(!dir.exists(), "orphan {} not removed", dir.display());
    let m = mounts_mentioning(&dir);
    assert!(m.is_empty(), "orphan mounts: {m:?}");
    assert_eq!(vm_dirs(&env).len(), 1);
    // And a second pool on the same state dir is refused while this one runs.
    let o = pool_cmd(&env, &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr_of(&o).contains("another joey-pool runs"),
        "{}",
        stderr_of(&o)
    );

    stop_cleanly(pool, &env);
}

#[test]
fn sandboxes_in_pooled_vms_see_only_their_own_files() {
    let (env, pool) = full_pool(2);
    let roots: Vec<tempfile::TempDir> = ["alpha", "beta"]
        .iter()
        .map(|name| {
            let d = tempfile::Builder::new()
                .prefix("joey-pool-rootfs-")
                .tempdir()
                .unwrap();
            std::fs::create_dir(d.path().join("bin")).unwrap();
            std::fs::copy("/bin/busybox", d.path().join("bin/busybox")).unwrap();
            for a in ["sh", "cat", "ls", "sleep"] {
                std::os::unix::fs::symlink("busybox", d.path().join("bin").join(a)).unwrap();
            }
            std::fs::write(d.path().join(format!("{name}-only")), name).unwrap();
            d
        })
        .collect();
    // Both at once, each in its own pooled VM: each sees its own files only, and each VM's
    // shared dir holds one container's share.
    let children: Vec<Child> = roots
        .iter()
        .map(|r| {
            let root = r.path().display().to_string();
            env.command(
                &["--timings", "--rootfs", &root],
                &["sh", "-c", "ls / | grep only; sleep 4"],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let shared = wait_for(
        "both shares in place",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            let per_vm: Vec<Vec<String>> = vm_dirs(&env)
                .iter()
                .map(|d| {
                    std::fs::read_dir(d.join("shared"))
                        .map(|rd| {
                            rd.flatten()
                                .map(|e| e.file_name().to_string_lossy().into_owned())
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .filter(|v: &Vec<String>| !v.is_empty())
                .collect();
            (per_vm.len() == 2).then_some(per_vm)
        },
    )
    .unwrap();
    assert!(shared.iter().all(|v| v.len() == 1), "{shared:?}");
    assert_ne!(shared[0], shared[1]);
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| wait_output(c, Duration::from_secs(120)))
        .collect();
    for (o, want) in outs.iter().zip(["alpha-only\n", "beta-only\n"]) {
        assert_eq!(o.status.code(), Some(0), "{}", stderr_of(o));
        assert_eq!(String::from_utf8_lossy(&o.stdout), want);
        assert_eq!(source_of(o).0, "pool");
    }
    stop_cleanly(pool, &env);
    for r in &roots {
        assert!(mounts_mentioning(r.path()).is_empty());
    }
}

#[test]
fn the_shim_leases_from_the_pool() {
    let ctd = joey_tests::containerd::Containerd::start();
    // The shim reads the config at each start: the pool section applies to the next task.
    let config = ctd.dir.path().join("joey.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[pool]\nsize = 1\n");
    std::fs::write(&config, text).unwrap();
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
        config,
        state_dir: ctd.dir.path().join("joey-state"),
    };
    ctd.import_busybox();
    let pool = Pool::start(&env);
    wait_ready(&env, 1, 1);
    let ready = vm_dirs(&env);
    let o = ctd.run("pooled", &["echo", "hi"]);
    assert!(o.status.success(), "{}\n{}", stderr_of(&o), ctd.log());
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
    // The shim leased the ready VM: used once, then removed by the pool.
    wait_for(
        "the leased VM removed",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || (!ready[0].exists()).then_some(()),
    )
    .unwrap();

    // A detached task in the refilled VM: its sandbox's metrics say where the VM came from.
    wait_ready(&env, 1, 1);
    let o = ctd.ctr_out(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "detached",
        "sleep",
        "300",
    ]);
    assert!(o.status.success(), "ctr run -d: {}", stderr_of(&o));
    let sock = ctd.metrics_socket("detached");
    let body = wait_for(
        "the sandbox's metrics",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let (status, body) = sock
                .exists()
                .then(|| get_unix(&sock, "/metrics", Duration::from_secs(5)))?;
            (status == 200).then_some(body)
        },
    )
    .unwrap();
    let src = |s: &str| {
        value(
            &body,
            "joey_sandbox_starts_total",
            &[&format!("source=\"{s}\"")],
        )
    };
    assert_eq!((src("pool"), src("cold")), (Some(1.0), None), "{body}");
    for args in [
        &["task", "kill", "-s", "SIGKILL", "detached"][..],
        &["task", "rm", "-f", "detached"],
        &["container", "rm", "detached"],
    ] {
        let o = ctd.ctr_out(args);
        assert!(o.status.success(), "ctr {args:?}: {}", stderr_of(&o));
    }
    stop_cleanly(pool, &env);
    ctd.assert_clean(&["pooled", "detached"]);
}
