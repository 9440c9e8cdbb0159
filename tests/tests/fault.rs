//! The fault-injection matrix (issue 12; `make fault`, docs/faults.md): every fault class is
//! injected into a real sandbox (QEMU-TCG, guest kernel, agent; `joeyctl run` or the shim under a
//! private containerd) while a *neighbour* sandbox, in a containerd of its own, answers `ctr task
//! exec` every half second. For each class the row checks the defined outcome (exit status,
//! error, events), then that nothing of the sandbox is left (processes, mounts, sockets, state
//! files, taps and qdiscs in a pod netns, cgroups named after it), that nothing panicked, and
//! that every exec into the neighbour during the row succeeded. One table is printed at the end,
//! one row per class, PASS or FAIL; the test fails when any row failed.
//!
//! `FAULT_ONLY=name,name` runs the named rows only (prefix match). Needs what the shim tests need
//! (`JOEYCTL`, `JOEY_SHIM`, `JOEY_KERNEL`, `JOEY_INITRD`, containerd, runc, busybox-static).

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use joey_tests::containerd::*;
use joey_tests::netns::{veth, NetNs};
use joey_tests::*;

/// How long `joeyctl run` may take to exit 125 after a runtime fault (docs/faults.md).
const REPORT_BOUND: Duration = Duration::from_secs(30);
/// How long whatever a fault left may take to disappear (QEMU reaped, lazy unmounts...).
const CLEAN_BOUND: Duration = Duration::from_secs(20);
/// How long one exec into the neighbour may take before it counts as failed.
const PROBE_BOUND: Duration = Duration::from_secs(30);

/// What a row function reports when its fault had the defined outcome.
type RowResult = Result<String, String>;

/// One fault class: its name (`class/variant`), how it is injected (for the table), its body.
struct Class {
    name: &'static str,
    injection: &'static str,
    run: fn(&mut Fixture) -> RowResult,
}

/// The fault side of the matrix: a private containerd whose shim sandboxes take the faults.
struct Fixture {
    c: Containerd,
    /// Sandboxes (container ids, `joeyctl` env dirs) of the current row, for the leak check.
    scope: Scope,
}

#[derive(Default)]
struct Scope {
    ids: Vec<String>,
    dirs: Vec<PathBuf>,
    netns: Vec<NetNs>,
    /// Text in which a panic would show (joeyctl's stderr).
    stderr: String,
}

/// A unique container id for this row: `<prefix><pid mod 10^4><n>`, short enough for sockets.
fn fresh_id(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}{}{}",
        std::process::id() % 10_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid this harness found for its own sandbox; errors are ignored (the
    // process may be gone already).
    unsafe { libc::kill(pid, sig) };
}

/// Pids of the QEMU processes whose command line mentions `needle`.
fn qemus(needle: &str) -> Vec<i32> {
    processes_mentioning(needle)
        .into_iter()
        .filter(|(_, cmd)| {
            cmd.split(' ')
                .next()
                .is_some_and(|b| b.ends_with("qemu-system-x86_64"))
        })
        .map(|(pid, _)| pid)
        .collect()
}

fn vm_rss_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| {
        l.strip_prefix("VmRSS:")?
            .trim()
            .strip_suffix(" kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// Checks a `joeyctl run` that met a runtime fault: exit 125 within `bound` (measured from
/// `since`), one stderr line `joeyctl: error: ...` containing `names`.
fn expect_125(child: &mut Child, since: Instant, bound: Duration, names: &str) -> RowResult {
    let st = wait_child(child, bound.saturating_sub(since.elapsed()))?;
    let took = since.elapsed();
    let mut err = String::new();
    let _ = child.stderr.as_mut().map(|e| e.read_to_string(&mut err));
    if st.code() != Some(125) {
        return Err(format!("exit {st:?}, not 125: {err}"));
    }
    check_one_line(&err, names)?;
    Ok(format!(
        "125 in {:.1}s: {}",
        took.as_secs_f64(),
        err.trim_end()
    ))
}

fn check_one_line(err: &str, names: &str) -> Result<(), String> {
    if err.lines().count() != 1 || !err.starts_with("joeyctl: error: ") || !err.contains(names) {
        return Err(format!(
            "stderr is not one `joeyctl: error:` line naming {names:?}: {err:?}"
        ));
    }
    Ok(())
}

fn wait_child(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus, String> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(st);
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("did not exit within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `joeyctl run --config <env's> [extra...] -- argv...` (the env logs errors only: on a runtime
/// failure joeyctl's stderr must then be exactly one line).
fn joeyctl(env: &Env, extra: &[&str], argv: &[&str]) -> Command {
    env.command(extra, argv)
}

/// The last line of `s`, at most `n` characters of it (for an outcome cell).
fn last_line(s: &str, n: usize) -> String {
    s.lines().last().unwrap_or("").chars().take(n).collect()
}

/// `joeyctl run -- true` with its stderr piped (for [`expect_125`]), stdin and stdout closed.
fn spawn_joeyctl_true(env: &Env) -> Result<Child, String> {
    let mut c = joeyctl(env, &[], &["true"]);
    c.stdout(Stdio::null()).stderr(Stdio::piped()).stdin(Stdio::null());
    c.spawn().map_err(|e| e.to_string())
}

/// `joeyctl run -- sh -c SCRIPT` in `env`, returning once it printed `started`.
fn start_script(
    env: &Env,
    extra: &[&str],
    script: &str,
) -> Result<(Child, BufReader<std::process::ChildStdout>), String> {
    let mut c = joeyctl(env, extra, &["sh", "-c", script]);
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = c.spawn().map_err(|e| format!("spawn joeyctl: {e}"))?;
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let _ = out.read_line(&mut line);
    if line != "started\n" {
        let _ = child.kill();
        let o = wait_output(child, Duration::from_secs(30));
        return Err(format!(
            "no `started` from the guest: {line:?} {}",
            stderr_of(&o)
        ));
    }
    Ok((child, out))
}

/// Runs `joeyctl` to completion (bounded), recording its stderr for the panic check.
fn joeyctl_output(f: &mut Fixture, mut c: Command, bound: Duration) -> Result<Output, String> {
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let child = c.spawn().map_err(|e| format!("spawn joeyctl: {e}"))?;
    let o = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wait_output(child, bound)))
        .map_err(|_| format!("joeyctl did not finish within {bound:?}"))?;
    f.scope.stderr.push_str(&stderr_of(&o));
    Ok(o)
}

/// The initramfs whose agent has failpoints (`JOEY_FP_INITRD`, built by scripts/fault.sh).
fn failpoint_initrd() -> Result<PathBuf, String> {
    let p = PathBuf::from(std::env::var_os("JOEY_FP_INITRD").ok_or(
        "JOEY_FP_INITRD is not set: scripts/fault.sh builds the failpoint agent's initramfs",
    )?);
    if !p.is_file() {
        return Err(format!("JOEY_FP_INITRD={} does not exist", p.display()));
    }
    Ok(p)
}

/// `[hypervisor]` lines booting the failpoint agent with `joey.failpoints=<points>`.
fn failpoint_lines(points: &str) -> Result<String, String> {
    Ok(format!(
        "initrd = \"{}\"\nkernel_params = \"joey.failpoints={points}\"\n",
        failpoint_initrd()?.display()
    ))
}

/// A failpoint build of the host binaries (`JOEY_FP_JOEYCTL`, `JOEY_FP_SHIM`: scripts/fault.sh).
fn failpoint_binary(var: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(std::env::var_os(var).ok_or(format!(
        "{var} is not set: scripts/fault.sh builds the host binaries with failpoints"
    ))?);
    if !p.is_file() {
        return Err(format!("{var}={} does not exist", p.display()));
    }
    Ok(p)
}

/// `joeyctl run` of `env` (as [`joeyctl`]) with the failpoint joeyctl: `debug.failpoints` in
/// the env's config takes effect.
fn failpoint_joeyctl(env: &Env, extra: &[&str], argv: &[&str]) -> Result<Command, String> {
    let release = env.command(extra, argv);
    let mut c = Command::new(failpoint_binary("JOEY_FP_JOEYCTL")?);
    c.args(release.get_args());
    c.env_remove("JOEY_CONFIG").env_remove("JOEY_LOG");
    Ok(c)
}

/// `[debug]` lines setting the host `failpoints` (docs/faults.md).
fn host_failpoints(points: &str) -> String {
    format!("[debug]\nfailpoints = \"{points}\"\n")
}

impl Fixture {
    /// A `joeyctl` environment with `extra` config lines, in this row's scope.
    fn env(&mut self, extra: &str) -> Env {
        let initrd = if extra.contains("initrd = ") {
            String::new()
        } else {
            "initrd = \"{i}\"\n".into()
        };
        let env = Env::with_config(|k, i| {
            format!(
                "[hypervisor]\nkernel = \"{}\"\n{}{extra}",
                k.display(),
                initrd.replace("{i}", &i.display().to_string())
            )
        });
        // `runtime.log_level = "error"`: the warnings logged on the way to a failure stay out of
        // stderr, which must then be the one error line.
        let text = std::fs::read_to_string(&env.config).expect("read config");
        let text = text.replacen("[runtime]\n", "[runtime]\nlog_level = \"error\"\n", 1);
        std::fs::write(&env.config, text).expect("write config");
        self.scope.dirs.push(env.dir.path().to_path_buf());
        env
    }

    /// Runs `f` while the shim's joey config boots the failpoint agent with `points`.
    fn with_shim_failpoints<T>(
        &mut self,
        points: &str,
        f: impl FnOnce(&mut Fixture) -> Result<T, String>,
    ) -> Result<T, String> {
        let cfg = self.c.dir.path().join("joey.toml");
        let good = std::fs::read_to_string(&cfg).map_err(|e| e.to_string())?;
        let initrd_line = good
            .lines()
            .find(|l| l.starts_with("initrd = "))
            .ok_or("no initrd line")?
            .to_string();
        let bad = good.replacen(&format!("{initrd_line}\n"), &failpoint_lines(points)?, 1);
        std::fs::write(&cfg, bad).map_err(|e| e.to_string())?;
        let r = f(self);
        std::fs::write(&cfg, good).map_err(|e| e.to_string())?;
        r
    }

    /// Runs `f` with the host failpoints `points` in the shim's joey config; `f` gets the
    /// failpoint shim's path for `ctr run --runtime` (containerd 1.6 takes an absolute path).
    fn with_host_failpoints<T>(
        &mut self,
        points: &str,
        f: impl FnOnce(&mut Fixture, &str) -> Result<T, String>,
    ) -> Result<T, String> {
        let shim = failpoint_binary("JOEY_FP_SHIM")?.display().to_string();
        let cfg = self.c.dir.path().join("joey.toml");
        let good = std::fs::read_to_string(&cfg).map_err(|e| e.to_string())?;
        std::fs::write(&cfg, format!("{good}{}", host_failpoints(points)))
            .map_err(|e| e.to_string())?;
        let r = f(self, &shim);
        std::fs::write(&cfg, good).map_err(|e| e.to_string())?;
        r
    }

    /// A container id of this row, in its scope.
    fn id(&mut self, prefix: &str) -> String {
        let id = fresh_id(prefix);
        self.scope.ids.push(id.clone());
        id
    }

    /// `ctr run -d --runtime joey IMAGE id argv...`, then waits for RUNNING.
    fn run_detached(&self, id: &str, ctr_args: &[&str], argv: &[&str]) -> Result<(), String> {
        let mut args = vec!["run", "-d", "--runtime", RUNTIME];
        args.extend_from_slice(ctr_args);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(argv);
        let o = self.c.ctr_out_within(&args, RUN_TIMEOUT)?;
        if !o.status.success() {
            return Err(format!("ctr run -d {id}: {}", stderr_of(&o)));
        }
        wait_for(
            &format!("{id} RUNNING"),
            RUN_TIMEOUT,
            Duration::from_millis(100),
            || (self.c.task_status(id).as_deref() == Some("RUNNING")).then_some(()),
        )
    }

    /// Removes task and container `id` through ctr (bounded steps; errors ignored: what is left
    /// is what the leak check reports).
    fn remove(&self, id: &str) {
        let step = Duration::from_secs(20);
        let _ = self
            .c
            .ctr_out_within(&["task", "kill", "-s", "SIGKILL", id], step);
        let _ = self
            .c
            .ctr_out_within(&["task", "delete", "--force", id], step);
        let _ = self.c.ctr_out_within(&["container", "rm", id], step);
    }

    /// Everything of the row's scope still there after [`CLEAN_BOUND`]: processes, mounts, unix
    /// sockets, state files, shim sockets, containerd records, cgroups, netns links and qdiscs.
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let t0 = Instant::now();
        loop {
            left.clear();
            let cdir = self.c.dir.path().to_path_buf();
            let mut needles: Vec<String> = self
                .scope
                .dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            for id in &self.scope.ids {
                needles.push(format!("{}/joey-state/{id}", cdir.display()));
                needles.push(format!(" -id {id} "));
            }
            for n in &needles {
                for (pid, cmd) in processes_mentioning(n.trim_end()) {
                    if n.starts_with(' ') && !format!("{cmd} ").contains(n.as_str()) {
                        continue;
                    }
                    left.push(format!(
                        "process {pid} {}",
                        cmd.chars().take(120).collect::<String>()
                    ));
                }
            }
            let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let unix = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
            for n in needles.iter().filter(|n| !n.starts_with(' ')) {
                left.extend(
                    mi.lines()
                        .filter(|l| l.contains(n.as_str()))
                        .map(|l| format!("mount {l}")),
                );
                left.extend(
                    unix.lines()
                        .filter(|l| l.contains(n.as_str()))
                        .map(|l| format!("socket {l}")),
                );
            }
            for d in &self.scope.dirs {
                let state = d.join("state");
                if let Ok(rd) = std::fs::read_dir(&state) {
                    left.extend(
                        rd.flatten()
                            .map(|e| format!("state {}", e.path().display())),
                    );
                }
            }
            let tasks = self
                .c
                .ctr_out_within(&["task", "ls", "-q"], PROBE_BOUND)
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let ctrs = self
                .c
                .ctr_out_within(&["container", "ls", "-q"], PROBE_BOUND)
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            for id in &self.scope.ids {
                let state = cdir.join("joey-state").join(id);
                if state.exists() {
                    left.push(format!("state {}", state.display()));
                }
                let sock = self.c.shim_socket(id);
                if sock.exists() {
                    left.push(format!("shim socket {}", sock.display()));
                }
                for (what, ls) in [("task", &tasks), ("container", &ctrs)] {
                    if ls.as_ref().is_ok_and(|s| s.lines().any(|l| l.trim() == id)) {
                        left.push(format!("containerd {what} {id}"));
                    }
                }
                left.extend(
                    cgroups_named(id)
                        .into_iter()
                        .map(|p| format!("cgroup {}", p.display())),
                );
            }
            for ns in &self.scope.netns {
                let links = ns.links();
                if links != ["lo"] {
                    left.push(format!("links in {}: {links:?}", ns.name));
                }
                if ns.qdiscs().contains("ingress") {
                    left.push(format!("ingress qdisc in {}", ns.name));
                }
            }
            if left.is_empty() || t0.elapsed() > CLEAN_BOUND {
                return left;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Cgroups (v2 tree, 4 levels deep) whose name contains `id`.
fn cgroups_named(id: &str) -> Vec<PathBuf> {
    fn walk(d: &Path, depth: u32, id: &str, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if e.file_name().to_string_lossy().contains(id) {
                    out.push(e.path());
                }
                if depth > 0 {
                    walk(&e.path(), depth - 1, id, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), 4, id, &mut out);
    out
}

/// A sandbox in a containerd of its own, probed with `ctr task exec` every half second by a
/// thread while the rows run.
struct Neighbour {
    c: Containerd,
    id: String,
    probes: Mutex<Vec<(Instant, Result<(), String>)>>,
    stop: AtomicBool,
}

impl Neighbour {
    fn start() -> Neighbour {
        let c = Containerd::start();
        c.import_busybox();
        let id = fresh_id("nb");
        let o = c.ctr_out(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            &id,
            "sleep",
            "100000",
        ]);
        assert!(
            o.status.success(),
            "neighbour: ctr run -d: {}\n{}",
            stderr_of(&o),
            c.log()
        );
        c.wait_task_status(&id, "RUNNING", RUN_TIMEOUT);
        Neighbour {
            c,
            id,
            probes: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        }
    }

    fn probe(&self, n: usize) -> Result<(), String> {
        let exec_id = format!("p{n}");
        let o = self.c.ctr_out_within(
            &[
                "task",
                "exec",
                "--exec-id",
                &exec_id,
                &self.id,
                "echo",
                "alive",
            ],
            PROBE_BOUND,
        )?;
        if o.status.success() && o.stdout == b"alive\n" {
            Ok(())
        } else {
            Err(format!(
                "exec {exec_id}: {:?} {:?} {}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                stderr_of(&o)
            ))
        }
    }

    /// The probing loop (its own thread) until [`Neighbour::stop`] is set.
    fn run(&self) {
        let mut n = 0;
        while !self.stop.load(Ordering::Relaxed) {
            n += 1;
            let r = self.probe(n);
            self.probes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((Instant::now(), r));
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The probes since `since`: `Ok(n)` when all n (at least one) succeeded.
    fn verdict(&self, since: Instant) -> Result<usize, String> {
        // One more exec now, so every row has at least one probe that ran after its fault.
        let t0 = Instant::now();
        loop {
            let v = self.probes.lock().unwrap_or_else(|p| p.into_inner());
            let recent: Vec<_> = v.iter().filter(|(at, _)| *at >= since).collect();
            if let Some((_, Err(e))) = recent.iter().find(|(_, r)| r.is_err()) {
                return Err(e.clone());
            }
            if recent.iter().any(|(at, _)| *at >= t0) {
                return Ok(recent.len());
            }
            drop(v);
            if t0.elapsed() > PROBE_BOUND * 2 {
                return Err("no exec finished".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One line of the table.
struct Row {
    name: &'static str,
    injection: &'static str,
    outcome: Result<String, String>,
    leaks: Vec<String>,
    panicked: bool,
    neighbour: Result<usize, String>,
    secs: f64,
}

impl Row {
    fn pass(&self) -> bool {
        self.outcome.is_ok() && self.leaks.is_empty() && !self.panicked && self.neighbour.is_ok()
    }
}

fn print_table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{:<30} {:<44} {:<6} {:<10} {:<11} {:>6}  outcome\n",
        "fault", "injection", "result", "leaks", "neighbour", "secs"
    ));
    for r in rows {
        let leaks = if r.leaks.is_empty() {
            "none".to_string()
        } else {
            format!("{} LEFT", r.leaks.len())
        };
        let nb = match &r.neighbour {
            Ok(n) => format!("ok ({n})"),
            Err(_) => "FAILED".to_string(),
        };
        let outcome = match &r.outcome {
            Ok(o) => o.clone(),
            Err(e) => format!("WRONG: {e}"),
        };
        let outcome = if r.panicked {
            format!("PANIC; {outcome}")
        } else {
            outcome
        };
        s.push_str(&format!(
            "{:<30} {:<44} {:<6} {:<10} {:<11} {:>6.1}  {}\n",
            r.name,
            r.injection,
            if r.pass() { "PASS" } else { "FAIL" },
            leaks,
            nb,
            r.secs,
            outcome
                .replace('\n', " ")
                .chars()
                .take(160)
                .collect::<String>()
        ));
    }
    for r in rows.iter().filter(|r| !r.pass()) {
        if !r.leaks.is_empty() {
            s.push_str(&format!(
                "{}: left behind:\n  {}\n",
                r.name,
                r.leaks.join("\n  ")
            ));
        }
        if let Err(e) = &r.neighbour {
            s.push_str(&format!("{}: neighbour: {e}\n", r.name));
        }
    }
    let passed = rows.iter().filter(|r| r.pass()).count();
    s.push_str(&format!("fault matrix: {passed}/{} PASS\n", rows.len()));
    s
}

#[test]
fn fault_matrix() {
    let only: Vec<String> = std::env::var("FAULT_ONLY")
        .map(|s| {
            s.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let classes: Vec<&Class> = CLASSES
        .iter()
        .filter(|c| only.is_empty() || only.iter().any(|o| c.name.starts_with(o.as_str())))
        .collect();
    assert!(!classes.is_empty(), "FAULT_ONLY={only:?} names no row");

    let neighbour = Neighbour::start();
    let c = Containerd::start();
    c.import_busybox();
    let mut f = Fixture {
        c,
        scope: Scope::default(),
    };
    let mut rows = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| neighbour.run());
        for class in &classes {
            eprintln!("fault: {} ...", class.name);
            f.scope = Scope::default();
            let log_before = f.c.log().len();
            let t0 = Instant::now();
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (class.run)(&mut f)))
                    .unwrap_or_else(|p| Err(format!("harness panic: {}", panic_text(&p))));
            let leaks = f.leftovers();
            let shim_log = f.c.log().get(log_before..).unwrap_or_default().to_string();
            let panicked = shim_log.contains("panicked") || f.scope.stderr.contains("panicked");
            let row = Row {
                name: class.name,
                injection: class.injection,
                outcome,
                leaks,
                panicked,
                neighbour: neighbour.verdict(t0),
                secs: t0.elapsed().as_secs_f64(),
            };
            eprintln!(
                "fault: {} {} ({:.1} s)",
                class.name,
                if row.pass() { "PASS" } else { "FAIL" },
                row.secs
            );
            if !row.pass() {
                let about: Vec<&str> = shim_log
                    .lines()
                    .filter(|l| f.scope.ids.iter().any(|id| l.contains(id.as_str())))
                    .collect();
                eprintln!(
                    "fault: {}: containerd log about {:?}:\n{}",
                    class.name,
                    f.scope.ids,
                    about.join("\n")
                );
            }
            rows.push(row);
            for ns in std::mem::take(&mut f.scope.netns) {
                drop(ns);
            }
        }
        neighbour.stop.store(true, Ordering::Relaxed);
    });
    let table = print_table(&rows);
    println!("{table}");
    if let Some(path) = std::env::var_os("FAULT_REPORT") {
        let _ = std::fs::write(path, &table);
    }
    let nb = neighbour.probe(0);
    assert!(nb.is_ok(), "neighbour after the matrix: {nb:?}");
    assert!(rows.iter().all(Row::pass), "fault rows failed:\n{table}");
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "?".into())
}

const CLASSES: &[Class] = &[
    Class {
        name: "vmm-sigkill/joeyctl",
        injection: "SIGKILL QEMU under `joeyctl run`",
        run: rows::vmm_sigkill_joeyctl,
    },
    Class {
        name: "vmm-sigkill/pod-netns",
        injection: "SIGKILL QEMU, pod netns carried in",
        run: rows::vmm_sigkill_netns,
    },
    Class {
        name: "vmm-sigkill/shim",
        injection: "SIGKILL QEMU of a running task",
        run: rows::vmm_sigkill_shim,
    },
    Class {
        name: "joeyctl-sigkill/rootfs",
        injection: "SIGKILL `joeyctl run --rootfs`, run again",
        run: rows::joeyctl_sigkill_rootfs,
    },
    Class {
        name: "vmm-frozen/agent-ready",
        injection: "SIGSTOP QEMU during boot",
        run: rows::vmm_frozen_at_boot,
    },
    Class {
        name: "guest-oom/container",
        injection: "memory hog past the task's memory limit",
        run: rows::guest_oom,
    },
    Class {
        name: "guest-panic/sysrq",
        injection: "`echo c > /proc/sysrq-trigger` in the guest",
        run: rows::guest_panic_sysrq,
    },
    Class {
        name: "agent-crash/joeyctl",
        injection: "agent aborts (PID 1) at ExecProcess",
        run: rows::agent_crash_joeyctl,
    },
    Class {
        name: "agent-crash/shim-exec",
        injection: "agent aborts at an exec into a task",
        run: rows::agent_crash_shim_exec,
    },
    Class {
        name: "agent-hang/exec",
        injection: "ExecProcess never answers",
        run: rows::agent_hang_exec,
    },
    Class {
        name: "agent-error/create-container",
        injection: "CreateContainer fails in the agent",
        run: rows::agent_error_create_container,
    },
    Class {
        name: "console-flood",
        injection: "`yes > /dev/ttyS0` in the guest, 8 s",
        run: rows::console_flood,
    },
    Class {
        name: "output-flood/shim",
        injection: "a task writes `yes` to stdout, 8 s",
        run: rows::output_flood_shim,
    },
    Class {
        name: "enospc/state-dir",
        injection: "state dir on a full tmpfs, inodes 2..",
        run: rows::enospc_state_dir,
    },
    Class {
        name: "bad-config/joeyctl",
        injection: "unknown key in the config file",
        run: rows::bad_config_joeyctl,
    },
    Class {
        name: "bad-config/shim",
        injection: "the shim's config file is not TOML",
        run: rows::bad_config_shim,
    },
    Class {
        name: "bad-oci-spec",
        injection: "config.json with empty process.args",
        run: rows::bad_oci_spec,
    },
    Class {
        name: "shim-sigkill",
        injection: "SIGKILL the shim, containerd deletes",
        run: rows::shim_sigkill,
    },
    Class {
        name: "containerd-restart/create",
        injection: "restart containerd while Create boots",
        run: rows::containerd_restart_create,
    },
    Class {
        name: "containerd-restart/start",
        injection: "restart containerd while Start runs",
        run: rows::containerd_restart_start,
    },
    Class {
        name: "sharefs-mount/setup",
        injection: "failpoint: the shared dir's bind fails",
        run: rows::sharefs_setup_fails,
    },
    Class {
        name: "sharefs-mount/share",
        injection: "failpoint: the rootfs share's bind fails",
        run: rows::sharefs_share_fails,
    },
    Class {
        name: "network/second-interface",
        injection: "failpoint: plumbing the 2nd interface fails",
        run: rows::network_second_interface_fails,
    },
    Class {
        name: "network/second-interface-shim",
        injection: "the same under the shim (Create)",
        run: rows::network_second_interface_shim,
    },
    Class {
        name: "events-publish/exit",
        injection: "failpoint: publishing TaskExit fails",
        run: rows::events_publish_exit_fails,
    },
    Class {
        name: "containerd-restart/exec",
        injection: "restart containerd while Exec runs",
        run: rows::containerd_restart_exec,
    },
    // Host failpoints (`debug.failpoints`, the failpoint joeyctl of scripts/fault.sh).
    Class {
        name: "vsock-drop/joeyctl",
        injection: "vsock::tx drops the agent's conn mid-RPC",
        run: host_rows::vsock_drop_joeyctl,
    },
    Class {
        name: "vsock-panic/joeyctl",
        injection: "vsock::tx=panic in the vhost-user thread",
        run: host_rows::vsock_panic_joeyctl,
    },
    Class {
        name: "fs-error/joeyctl",
        injection: "fs::request fails every FUSE request",
        run: host_rows::fs_error_joeyctl,
    },
    Class {
        name: "fs-panic/joeyctl",
        injection: "fs::request=panic in the vhost-user thread",
        run: host_rows::fs_panic_joeyctl,
    },
    Class {
        name: "vcpu-panic/boot",
        injection: "vmm::vcpu_run=panic (built-in VMM, probe)",
        run: host_rows::vcpu_panic_boot,
    },
    Class {
        name: "vcpu-hang/boot",
        injection: "vmm::vcpu_run=pause (built-in VMM, probe)",
        run: host_rows::vcpu_hang_boot,
    },
];

mod rows {
    use super::*;

    pub fn vmm_sigkill_joeyctl(f: &mut Fixture) -> RowResult {
        let env = f.env("");
        let (mut child, _out) = start_script(&env, &[], "echo started; sleep 300")?;
        let q = qemus(&env.dir.path().display().to_string());
        if q.len() != 1 {
            return Err(format!("QEMU processes: {q:?}"));
        }
        let t0 = Instant::now();
        kill(q[0], libc::SIGKILL);
        expect_125(&mut child, t0, REPORT_BOUND, "unexpectedly")
    }

    /// `joeyctl run --rootfs` is SIGKILLed while its container runs. Its QEMU dies with it
    /// (`PR_SET_PDEATHSIG`); its state dir with the virtio-fs mounts, its owner file
    /// (`<id>.joeyctl`) and its cgroup stay, as nothing of it ran any more to remove them. The
    /// next `joeyctl run` on the same state dir removes them first (ctl/owner.rs), then runs.
    pub fn joeyctl_sigkill_rootfs(f: &mut Fixture) -> RowResult {
        let rootfs = f.c.dir.path().join("sigkill-rootfs");
        make_busybox_rootfs(&rootfs, &["sh", "echo", "sleep"])
            .map_err(|e| format!("busybox rootfs: {e}"))?;
        let env = f.env("");
        let res = (|| {
            let r = rootfs.display().to_string();
            let (mut child, _out) =
                start_script(&env, &["--rootfs", &r], "echo started; sleep 300")?;
            let owners: Vec<String> = std::fs::read_dir(&env.state_dir)
                .map_err(|e| e.to_string())?
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_suffix(".joeyctl")
                        .map(str::to_string)
                })
                .collect();
            let [id] = owners.as_slice() else {
                let _ = child.kill();
                return Err(format!("owner files while it runs: {owners:?}"));
            };
            f.scope.ids.push(id.clone());
            let state = env.state_dir.join(id);
            let owner = env.state_dir.join(format!("{id}.joeyctl"));
            kill(child.id() as i32, libc::SIGKILL);
            let _ = child.wait();
            let dir = env.dir.path().display().to_string();
            wait_for("its QEMU gone", CLEAN_BOUND, Duration::from_millis(100), || {
                qemus(&dir).is_empty().then_some(())
            })?;
            let (mounts, groups) = (mounts_under(&state).len(), cgroups_named(id).len());
            if !state.is_dir() || !owner.is_file() || mounts == 0 || groups == 0 {
                return Err(format!(
                    "not what a killed run leaves: state dir {}, owner file {}, {mounts} mounts, {groups} cgroups",
                    state.is_dir(),
                    owner.is_file()
                ));
            }
            let o = joeyctl_output(f, joeyctl(&env, &[], &["echo", "ok"]), REPORT_BOUND)?;
            if o.status.code() != Some(0) || o.stdout != b"ok\n" {
                return Err(format!("the next run: {:?} {}", o.status, stderr_of(&o)));
            }
            let left = (
                state.exists(),
                owner.exists(),
                mounts_under(&state).len(),
                cgroups_named(id).len(),
            );
            if left != (false, false, 0, 0) {
                return Err(format!("after the next run: (state dir, owner file, mounts, cgroups) = {left:?}"));
            }
            Ok(format!(
                "left its state dir, {mounts} mounts, its owner file, {groups} cgroup(s); the next run removed them, exit 0"
            ))
        })();
        let _ = std::fs::remove_dir_all(&rootfs);
        res
    }

    pub fn vmm_sigkill_netns(f: &mut Fixture) -> RowResult {
        let env = f.env("");
        let ns = NetNs::new("jfault");
        ns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ]);
        ns.ip(&["addr", "add", "10.203.0.2/24", "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        let path = ns.path().display().to_string();
        let started = start_script(&env, &["--netns", &path], "echo started; sleep 300");
        let res = started.and_then(|(mut child, _out)| {
            let links = ns.links();
            if links.len() < 4 {
                return Err(format!(
                    "no tap in the pod netns while the VM runs: {links:?}"
                ));
            }
            let q = qemus(&env.dir.path().display().to_string());
            let t0 = Instant::now();
            q.iter().for_each(|&p| kill(p, libc::SIGKILL));
            expect_125(&mut child, t0, REPORT_BOUND, "unexpectedly")
        });
        // The veth pair is the test's: the leak check expects the netns as `ip netns add` left it.
        let _ = wait_for("taps gone", CLEAN_BOUND, Duration::from_millis(100), || {
            (ns.links().len() == 3).then_some(())
        });
        ns.ip(&["link", "del", "eth0"]);
        f.scope.netns.push(ns);
        res
    }

    /// Task events about `id` must be create, start, `before_exit`, one exit with `status`,
    /// delete, in this order.
    fn check_events(
        events: &joey_tests::containerd::Events,
        id: &str,
        before_exit: &[&str],
        status: u32,
    ) -> Result<(), String> {
        let topics: Vec<String> = events
            .about(id)
            .into_iter()
            .filter(|e| e.topic.starts_with("/tasks/") && !e.topic.starts_with("/tasks/exec"))
            .map(|e| {
                if e.topic == "/tasks/exit" {
                    format!("/tasks/exit {}", e.exit_status().unwrap_or(u32::MAX))
                } else {
                    e.topic.clone()
                }
            })
            .collect();
        let mut want = vec!["/tasks/create".to_string(), "/tasks/start".to_string()];
        want.extend(before_exit.iter().map(|t| t.to_string()));
        want.push(format!("/tasks/exit {status}"));
        want.push("/tasks/delete".to_string());
        if topics != want {
            return Err(format!("task events {topics:?}, want {want:?}"));
        }
        Ok(())
    }

    /// The VM of task `id` died at `t0`: its TaskExit must come (within [`REPORT_BOUND`]) with
    /// status 255, the task and container must delete, and the task events must be in order.
    /// Returns "TaskExit <status> once in <secs>, in order; deleted".
    fn dead_task_deletes(
        f: &Fixture,
        events: &joey_tests::containerd::Events,
        id: &str,
        t0: Instant,
    ) -> RowResult {
        let status = events.exit_status(id, REPORT_BOUND).ok_or("no TaskExit")?;
        let took = t0.elapsed();
        for args in [["task", "delete", id], ["container", "rm", id]] {
            let o = f.c.ctr_out_within(&args, REPORT_BOUND)?;
            if !o.status.success() {
                return Err(format!("ctr {} {}: {}", args[0], args[1], stderr_of(&o)));
            }
        }
        wait_task_delete(events, id)?;
        check_events(events, id, &[], 255)?;
        Ok(format!(
            "TaskExit {status} once in {:.1}s, in order; deleted",
            took.as_secs_f64()
        ))
    }

    pub fn vmm_sigkill_shim(f: &mut Fixture) -> RowResult {
        let id = f.id("fq");
        let events = f.c.events();
        f.run_detached(&id, &[], &["sleep", "300"])?;
        let state = format!("{}/joey-state/{id}/", f.c.dir.path().display());
        let q = qemus(&state);
        if q.len() != 1 {
            return Err(format!("QEMU processes of {id}: {q:?}"));
        }
        let t0 = Instant::now();
        kill(q[0], libc::SIGKILL);
        dead_task_deletes(f, &events, &id, t0)
    }

    pub fn vmm_frozen_at_boot(f: &mut Fixture) -> RowResult {
        let env = f.env("[agent]\nready_timeout_ms = 5000\n");
        let mut child = spawn_joeyctl_true(&env)?;
        let dir = env.dir.path().display().to_string();
        let q = wait_for(
            "QEMU to start",
            Duration::from_secs(20),
            Duration::from_millis(5),
            || {
                let q = qemus(&dir);
                (!q.is_empty()).then_some(q)
            },
        )?;
        kill(q[0], libc::SIGSTOP);
        let t0 = Instant::now();
        let r = expect_125(
            &mut child,
            t0,
            Duration::from_secs(5) + REPORT_BOUND,
            "agent",
        );
        if let Some(e) = &r.as_ref().err() {
            if e.contains("did not exit") {
                kill(q[0], libc::SIGKILL);
            }
        }
        r
    }

    pub fn guest_oom(f: &mut Fixture) -> RowResult {
        let id = f.id("fo");
        let events = f.c.events();
        let argv = ["sh", "-c", "echo hog; tail /dev/zero"];
        let o = f.c.ctr_out_within(
            &[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                "--memory-limit",
                "33554432",
                IMAGE,
                &id,
                argv[0],
                argv[1],
                argv[2],
            ],
            RUN_TIMEOUT,
        )?;
        if o.status.code() != Some(137) {
            return Err(format!("ctr run: {:?} {}", o.status, stderr_of(&o)));
        }
        wait_task_delete(&events, &id)?;
        check_events(&events, &id, &["/tasks/oom"], 137)?;
        Ok("exit 137; TaskOOM, then TaskExit 137 once, in order".into())
    }

    pub fn guest_panic_sysrq(f: &mut Fixture) -> RowResult {
        let env = f.env("");
        let script = "echo started; sleep 1; echo c > /proc/sysrq-trigger; sleep 300";
        let (mut child, _out) = start_script(&env, &[], script)?;
        // The guest kernel panics (`panic=-1` reboots it, QEMU's `-no-reboot` ends the VM).
        expect_125(&mut child, Instant::now(), REPORT_BOUND, "unexpectedly")
    }

    pub fn agent_crash_joeyctl(f: &mut Fixture) -> RowResult {
        let env = f.env(&failpoint_lines("exec_process=return(crash)")?);
        let mut child = spawn_joeyctl_true(&env)?;
        // PID 1 died: the guest kernel panics (`panic=-1` reboots it) and QEMU exits.
        expect_125(&mut child, Instant::now(), RUN_TIMEOUT, "unexpectedly")
    }

    pub fn agent_crash_shim_exec(f: &mut Fixture) -> RowResult {
        let id = f.id("fx");
        f.with_shim_failpoints("exec_process=return(crash)", |f| {
            let events = f.c.events();
            f.run_detached(&id, &[], &["sleep", "300"])?;
            let t0 = Instant::now();
            let o = f.c.ctr_out_within(
                &["task", "exec", "--exec-id", "x1", &id, "true"],
                RUN_TIMEOUT,
            )?;
            if o.status.success() {
                return Err("the exec succeeded".into());
            }
            let deleted = dead_task_deletes(f, &events, &id, t0)?;
            let err = stderr_of(&o);
            Ok(format!(
                "exec fails ({}); {deleted}",
                err.trim_end().chars().take(60).collect::<String>()
            ))
        })
    }

    pub fn agent_hang_exec(f: &mut Fixture) -> RowResult {
        let extra = format!(
            "{}[agent]\nrpc_timeout_ms = 3000\n",
            failpoint_lines("exec_process=return(hang)")?
        );
        let env = f.env(&extra);
        let mut child = spawn_joeyctl_true(&env)?;
        expect_125(&mut child, Instant::now(), RUN_TIMEOUT, "ExecProcess")
    }

    pub fn agent_error_create_container(f: &mut Fixture) -> RowResult {
        let id = f.id("fa");
        f.with_shim_failpoints("create_container=return(error)", |f| {
            let o = f.c.ctr_out_within(
                &["run", "--rm", "--runtime", RUNTIME, IMAGE, &id, "true"],
                RUN_TIMEOUT,
            )?;
            let err = stderr_of(&o);
            f.remove(&id);
            if o.status.success() || !err.contains("failpoint agent::create_container") {
                return Err(format!("ctr run: {:?} {err}", o.status));
            }
            Ok(format!(
                "Start fails: {}",
                err.trim_end().chars().take(110).collect::<String>()
            ))
        })
    }

    pub fn console_flood(f: &mut Fixture) -> RowResult {
        let env = f.env("console_log_max_kib = 64\n");
        let (mut child, mut out) = start_script(
            &env,
            &[],
            "yes 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz > /dev/ttyS0 & echo started; sleep 8; kill $!; echo done",
        )?;
        let pid = child.id() as i32;
        let log = walk_for(&env.state_dir, "console.log").ok_or("no console.log")?;
        let rss0 = vm_rss_kib(pid).ok_or("no RSS")?;
        let mut max_log = 0;
        let mut rss1 = rss0;
        let t0 = Instant::now();
        while child.try_wait().map_err(|e| e.to_string())?.is_none()
            && t0.elapsed() < Duration::from_secs(60)
        {
            max_log = max_log.max(std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0));
            rss1 = vm_rss_kib(pid).unwrap_or(rss1);
            std::thread::sleep(Duration::from_millis(100));
        }
        let st = wait_child(&mut child, Duration::from_secs(30))?;
        let mut rest = String::new();
        let _ = out.read_to_string(&mut rest);
        let mut err = String::new();
        let _ = child.stderr.as_mut().map(|e| e.read_to_string(&mut err));
        f.scope.stderr.push_str(&err);
        if st.code() != Some(0) || rest != "done\n" {
            return Err(format!("exit {st:?}, stdout {rest:?}, stderr {err:?}"));
        }
        if !(32 * 1024..=64 * 1024 + 8192).contains(&max_log) {
            return Err(format!("console.log reached {max_log} bytes (cap 64 KiB)"));
        }
        if rss1 > rss0 + 16 * 1024 {
            return Err(format!("joeyctl RSS grew from {rss0} to {rss1} KiB"));
        }
        Ok(format!(
            "exit 0; console.log <= {max_log} B (cap 64 KiB); RSS {rss0}->{rss1} KiB"
        ))
    }

    /// A detached task floods its stdout (the shim pumps it out of the guest and discards it,
    /// as `ctr run -d` gives no stdout): the shim's memory must not grow with the output.
    pub fn output_flood_shim(f: &mut Fixture) -> RowResult {
        let id = f.id("fl");
        f.run_detached(
            &id,
            &[],
            &[
                "yes",
                "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz",
            ],
        )?;
        let shims = f.c.shim_pids("containerd-shim-joey-v2", &id);
        let shim = *shims.first().ok_or("no shim")?;
        // Past the start-up allocations; then 8 s of flood.
        let t0 = Instant::now();
        wait_for(
            "1 s of flood",
            Duration::from_secs(2),
            Duration::from_millis(100),
            || (t0.elapsed() >= Duration::from_secs(1)).then_some(()),
        )?;
        let rss0 = vm_rss_kib(shim).ok_or("no shim RSS")?;
        let mut rss1 = rss0;
        wait_for(
            "8 s of flood",
            Duration::from_secs(9),
            Duration::from_millis(200),
            || {
                rss1 = rss1.max(vm_rss_kib(shim).unwrap_or(0));
                (t0.elapsed() >= Duration::from_secs(9)).then_some(())
            },
        )?;
        let running = f.c.task_status(&id);
        f.remove(&id);
        if running.as_deref() != Some("RUNNING") {
            return Err(format!("the flooding task is {running:?}, not RUNNING"));
        }
        if rss1 > rss0 + 16 * 1024 {
            return Err(format!("shim RSS grew from {rss0} to {rss1} KiB"));
        }
        Ok(format!(
            "task RUNNING throughout; shim RSS {rss0}->{rss1} KiB (max); removed"
        ))
    }

    fn walk_for(dir: &Path, name: &str) -> Option<PathBuf> {
        wait_for(
            name,
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                let rd = std::fs::read_dir(dir).ok()?;
                rd.flatten()
                    .map(|e| e.path().join(name))
                    .find(|p| p.exists())
            },
        )
        .ok()
    }

    pub fn enospc_state_dir(f: &mut Fixture) -> RowResult {
        let mut seen = Vec::new();
        for inodes in 2..=16 {
            let env = f.env("");
            std::fs::create_dir_all(&env.state_dir).map_err(|e| e.to_string())?;
            let st = env.state_dir.display().to_string();
            let m = Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size=64k,nr_inodes={inodes}"),
                    "joey-fault",
                    &st,
                ])
                .output()
                .map_err(|e| e.to_string())?;
            if !m.status.success() {
                return Err(format!("mount tmpfs: {}", stderr_of(&m)));
            }
            // Fill the bytes: writes fail with ENOSPC; each inode is what the run may use.
            let _ = std::fs::write(env.state_dir.join("filler"), vec![0u8; 128 * 1024]);
            let res = joeyctl_output(f, joeyctl(&env, &[], &["echo", "ok"]), REPORT_BOUND);
            let leftover: Vec<_> = std::fs::read_dir(&env.state_dir)
                .map(|r| {
                    r.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            // The tmpfs must go (a busy one is detached, and the row fails saying so).
            let u = Command::new("umount")
                .arg(&st)
                .output()
                .map_err(|e| e.to_string())?;
            if !u.status.success() {
                let _ = Command::new("umount").args(["-l", &st]).output();
                return Err(format!("umount {st}: {}", stderr_of(&u)));
            }
            let o = res?;
            if leftover != ["filler"] {
                return Err(format!(
                    "nr_inodes={inodes}: left in the state dir: {leftover:?}"
                ));
            }
            match o.status.code() {
                Some(0) if o.stdout == b"ok\n" => {
                    seen.push(format!("{inodes}:ok"));
                    return Ok(format!(
                        "exit 125, one line, until it fits (nr_inodes:outcome): {}",
                        seen.join(" ")
                    ));
                }
                Some(125) => {
                    // Where joey itself hits ENOSPC, the line names it; where QEMU does (its
                    // sockets), the line says the VM exited: its own log had no space either.
                    let err = stderr_of(&o);
                    let names = if err.contains("No space left on device") {
                        "No space left on device"
                    } else {
                        "the VM exited"
                    };
                    check_one_line(&err, names).map_err(|e| format!("nr_inodes={inodes}: {e}"))?;
                    seen.push(format!(
                        "{inodes}:125{}",
                        if names.starts_with('N') {
                            "/ENOSPC"
                        } else {
                            "/VM"
                        }
                    ));
                }
                other => {
                    return Err(format!(
                        "nr_inodes={inodes}: exit {other:?}: {}",
                        stderr_of(&o)
                    ))
                }
            }
        }
        Err(format!("never fitted: {}", seen.join(" ")))
    }

    pub fn bad_config_joeyctl(f: &mut Fixture) -> RowResult {
        let env = f.env("no_such_key = 1\n");
        let o = joeyctl_output(f, joeyctl(&env, &[], &["true"]), REPORT_BOUND)?;
        let err = stderr_of(&o);
        if o.status.code() != Some(2) {
            return Err(format!("exit {:?}: {err}", o.status));
        }
        check_one_line(&err, "no_such_key")?;
        Ok(format!("exit 2: {}", err.trim_end()))
    }

    pub fn bad_config_shim(f: &mut Fixture) -> RowResult {
        let cfg = f.c.dir.path().join("joey.toml");
        let good = std::fs::read_to_string(&cfg).map_err(|e| e.to_string())?;
        std::fs::write(&cfg, "[hypervisor\nkind = ").map_err(|e| e.to_string())?;
        let id = f.id("fc");
        let o = f.c.ctr_out_within(
            &["run", "--rm", "--runtime", RUNTIME, IMAGE, &id, "true"],
            RUN_TIMEOUT,
        );
        std::fs::write(&cfg, good).map_err(|e| e.to_string())?;
        let o = o?;
        let err = stderr_of(&o);
        let _ = f.c.ctr_out_within(&["container", "rm", &id], PROBE_BOUND);
        if o.status.success()
            || !err.contains("FailedPrecondition") && !err.contains("failed precondition")
        {
            return Err(format!("ctr run: {:?} {err}", o.status));
        }
        // Regression: the reason was prefixed twice ("joey config: joey config: ...").
        if err.matches("joey config: ").count() != 1 {
            return Err(format!("the error does not name the config once: {err}"));
        }
        Ok(format!(
            "Create FAILED_PRECONDITION: {}",
            last_line(&err, 100)
        ))
    }

    pub fn bad_oci_spec(f: &mut Fixture) -> RowResult {
        let id = f.id("fs");
        let spec = f.c.dir.path().join(format!("{id}.json"));
        std::fs::write(
            &spec,
            r#"{"ociVersion": "1.0.2",
                "process": {"user": {"uid": 0, "gid": 0}, "args": [], "cwd": "/"},
                "root": {"path": "rootfs"},
                "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}}"#,
        )
        .map_err(|e| e.to_string())?;
        let spec = spec.display().to_string();
        let o = f.c.ctr_out_within(
            &["run", "--rm", "--runtime", RUNTIME, "--config", &spec, &id],
            RUN_TIMEOUT,
        )?;
        let err = stderr_of(&o);
        let _ = f.c.ctr_out_within(&["container", "rm", &id], PROBE_BOUND);
        if o.status.success()
            || !err.contains("InvalidArgument") && !err.contains("invalid argument")
        {
            return Err(format!("ctr run: {:?} {err}", o.status));
        }
        if !qemus(&f.c.dir.path().display().to_string()).is_empty() {
            return Err("a VM was started for a malformed spec".into());
        }
        Ok(format!(
            "Create INVALID_ARGUMENT: {}",
            last_line(&err, 100)
        ))
    }

    pub fn shim_sigkill(f: &mut Fixture) -> RowResult {
        let id = f.id("fk");
        f.run_detached(&id, &[], &["sleep", "300"])?;
        let shims = f.c.shim_pids("containerd-shim-joey-v2", &id);
        if shims.len() != 1 {
            return Err(format!("shims of {id}: {shims:?}"));
        }
        let t0 = Instant::now();
        kill(shims[0], libc::SIGKILL);
        wait_for(
            "task to leave RUNNING",
            REPORT_BOUND,
            Duration::from_millis(100),
            || (f.c.task_status(&id).as_deref() != Some("RUNNING")).then_some(()),
        )?;
        let took = t0.elapsed();
        f.remove(&id);
        Ok(format!(
            "task STOPPED in {:.1}s; shim `delete` cleaned up",
            took.as_secs_f64()
        ))
    }

    /// Regression: containerd's SIGTERM drops the shim's Create while the VM boots, and the
    /// dying containerd's clean-up Delete too; the Delete's Shutdown never comes. The shim used to
    /// keep a VM (the dropped Create went on booting, the dropped Delete stopped half-way) and
    /// never exit: the restarted containerd lists no task for it. Now Create and Delete run to
    /// their end whatever containerd does, and a shim without containers exits on its own
    /// after `IDLE_EXIT` (10 s).
    pub fn containerd_restart_create(f: &mut Fixture) -> RowResult {
        let id = f.id("fr");
        let ctr =
            f.c.ctr(&[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                IMAGE,
                &id,
                "sleep",
                "300",
            ])
            .spawn()
            .map_err(|e| e.to_string())?;
        let state = format!("{}/joey-state/{id}/", f.c.dir.path().display());
        let booting = wait_for(
            "the VM to boot",
            Duration::from_secs(60),
            Duration::from_millis(5),
            || (!qemus(&state).is_empty()).then_some(()),
        );
        f.c.restart();
        let o = wait_output(ctr, RUN_TIMEOUT);
        booting?;
        // Settled: the shim's Create ended with a task containerd lists, or the shim is gone
        // (the dying containerd deleted the half-made task; the shim exited when idle).
        let status = wait_for(
            "a settled task state",
            RUN_TIMEOUT,
            Duration::from_millis(200),
            || match f.c.task_status(&id) {
                Some(s) if s == "RUNNING" || s == "CREATED" || s == "STOPPED" => Some(s),
                _ if f.c.shim_pids("containerd-shim-joey-v2", &id).is_empty() => {
                    Some("no task, shim exited".into())
                }
                _ => None,
            },
        )?;
        f.remove(&id);
        Ok(format!(
            "ctr run {}; after the restart: {status}; removed",
            if o.status.success() { "ok" } else { "failed" }
        ))
    }

    /// Regression: containerd's SIGTERM dropped the shim's Start after it had asked the
    /// container's actor to start the process: the process ran in the guest, but nothing
    /// pumped its output, waited for it or published its exit, so it never left RUNNING and
    /// could not be deleted. Now Start runs to its end whatever containerd does. The agent's
    /// CreateContainer (the init process's start) is delayed 4 s so that the restart hits it.
    pub fn containerd_restart_start(f: &mut Fixture) -> RowResult {
        let id = f.id("ft");
        let r = f.with_shim_failpoints("create_container=return(delay:4000)", |f| {
            let ctr = f.c.ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, &id, "sleep", "300"])
                .spawn()
                .map_err(|e| e.to_string())?;
            // Start waits in the agent's delay (which the agent logs on the console).
            let console = f.c.dir.path().join(format!("joey-state/{id}/console.log"));
            let starting = wait_for(
                "the agent to delay CreateContainer",
                RUN_TIMEOUT,
                Duration::from_millis(20),
                || {
                    let log = std::fs::read_to_string(&console).unwrap_or_default();
                    log.contains("failpoint agent::create_container: delay").then_some(())
                },
            );
            f.c.restart();
            let o = wait_output(ctr, RUN_TIMEOUT);
            starting?;
            let events = f.c.events();
            let running = wait_for(
                "the task to be RUNNING after the restart",
                RUN_TIMEOUT,
                Duration::from_millis(100),
                || (f.c.task_status(&id).as_deref() == Some("RUNNING")).then_some(()),
            );
            running.map_err(|e| format!("{e}: it is {:?}", f.c.task_status(&id)))?;
            let x = f.c.ctr_out_within(
                &["task", "exec", "--exec-id", "a1", &id, "echo", "after"],
                RUN_TIMEOUT,
            )?;
            if x.stdout != b"after\n" {
                return Err(format!("exec after the restart: {:?} {}", x.status, stderr_of(&x)));
            }
            let k = f.c.ctr_out_within(&["task", "kill", "-s", "SIGKILL", &id], RUN_TIMEOUT)?;
            if !k.status.success() {
                return Err(format!("ctr task kill: {}", stderr_of(&k)));
            }
            let t0 = Instant::now();
            let status = events.exit_status(&id, REPORT_BOUND).ok_or("no TaskExit after the kill")?;
            let took = t0.elapsed();
            delete_task(f, &id)?;
            wait_task_delete(&events, &id)?;
            // The init process's (the exec's exit has `"id":"a1"`).
            let init = format!("\"id\":\"{id}\"");
            let exits: Vec<String> = events
                .about(&id)
                .into_iter()
                .filter(|e| e.topic == "/tasks/delete" || e.topic == "/tasks/exit" && e.body.contains(&init))
                .map(|e| format!("{} {}", e.topic, e.exit_status().unwrap_or(u32::MAX)))
                .collect();
            if status != 137 || exits != ["/tasks/exit 137", "/tasks/delete 137"] {
                return Err(format!("events after the kill: {exits:?}, want one TaskExit 137 then TaskDelete"));
            }
            Ok(format!(
                "ctr run {}; RUNNING after the restart, exec works; TaskExit 137 once in {:.1}s; deleted",
                if o.status.success() { "ok" } else { "failed" },
                took.as_secs_f64()
            ))
        });
        f.remove(&id);
        r
    }

    pub fn containerd_restart_exec(f: &mut Fixture) -> RowResult {
        let id = f.id("fe");
        f.run_detached(&id, &[], &["sleep", "300"])?;
        let exec =
            f.c.ctr(&[
                "task",
                "exec",
                "--exec-id",
                "e1",
                &id,
                "sh",
                "-c",
                "sleep 3; echo done",
            ])
            .spawn()
            .map_err(|e| e.to_string())?;
        let state = format!("{}/joey-state/{id}/", f.c.dir.path().display());
        // The exec's process runs in the guest (a second pid in the task), then the restart.
        wait_for(
            "the exec to run",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || (f.c.task_pids(&id).len() >= 2).then_some(()),
        )?;
        f.c.restart();
        let _ = wait_output(exec, RUN_TIMEOUT);
        if f.c.task_status(&id).as_deref() != Some("RUNNING") {
            return Err(format!(
                "task after the restart: {:?}",
                f.c.task_status(&id)
            ));
        }
        let o = f.c.ctr_out_within(
            &["task", "exec", "--exec-id", "e2", &id, "echo", "after"],
            RUN_TIMEOUT,
        )?;
        if o.stdout != b"after\n" {
            return Err(format!(
                "exec after the restart: {:?} {}",
                o.status,
                stderr_of(&o)
            ));
        }
        if qemus(&state).len() != 1 {
            return Err("the VM did not survive the restart".into());
        }
        f.remove(&id);
        Ok("task RUNNING after the restart, exec works, removed".into())
    }

    /// Waits (10 s) for the TaskDelete event of `id`.
    fn wait_task_delete(events: &joey_tests::containerd::Events, id: &str) -> Result<(), String> {
        wait_for(
            "TaskDelete",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                events
                    .about(id)
                    .iter()
                    .any(|e| e.topic == "/tasks/delete")
                    .then_some(())
            },
        )
    }

    /// `ctr task delete` and `ctr container rm` of `id`: both must succeed.
    fn delete_task(f: &Fixture, id: &str) -> Result<(), String> {
        for args in [["task", "delete", id], ["container", "rm", id]] {
            let d = f.c.ctr_out_within(&args, REPORT_BOUND)?;
            if !d.status.success() {
                return Err(format!("ctr {} {}: {}", args[0], args[1], stderr_of(&d)));
            }
        }
        Ok(())
    }

    /// A finished `joeyctl run` must have exited `code`, its stderr one error line naming
    /// `names`; returns that line.
    fn exited_with(o: &Output, code: i32, names: &str) -> Result<String, String> {
        let err = stderr_of(o);
        if o.status.code() != Some(code) {
            return Err(format!("exit {:?}, not {code}: {err}", o.status));
        }
        check_one_line(&err, names)?;
        Ok(err.trim_end().to_string())
    }

    /// Mounts (from /proc/self/mountinfo) whose mountpoint is under `dir`.
    fn mounts_under(dir: &Path) -> Vec<String> {
        let d = format!("{}/", dir.display());
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|m| format!("{m}/").starts_with(&d))
            })
            .map(str::to_string)
            .collect()
    }

    /// ShareFs's shared dir is bind-mounted, then fails (failpoint `sharefs::setup`), before
    /// the VM starts: `joeyctl run` reports it, and the sandbox's set-up unwinds.
    pub fn sharefs_setup_fails(f: &mut Fixture) -> RowResult {
        let env = f.env(&host_failpoints("sharefs::setup=return"));
        let c = failpoint_joeyctl(&env, &[], &["true"])?;
        let o = joeyctl_output(f, c, REPORT_BOUND)?;
        let err = exited_with(&o, 125, "injected failure (failpoint sharefs::setup)")?;
        Ok(format!("125: {err}"))
    }

    /// The bind of a container's rootfs into the shared dir fails (failpoint `sharefs::share`)
    /// at Start: Start fails naming it, nothing of the container is left mounted, the task
    /// stays CREATED and deletes; the last container's Delete stops the VM.
    pub fn sharefs_share_fails(f: &mut Fixture) -> RowResult {
        let id = f.id("fm");
        f.with_host_failpoints("sharefs::share=return", |f, shim| {
            let o = f.c.ctr_out_within(
                &["run", "-d", "--runtime", shim, IMAGE, &id, "true"],
                RUN_TIMEOUT,
            )?;
            let err = stderr_of(&o);
            let share = f.c.dir.path().join(format!("joey-state/{id}/shared/{id}"));
            let (mounted, status) = (mounts_under(&share), f.c.task_status(&id));
            if o.status.success() || !err.contains("injected failure (failpoint sharefs::share)") {
                return Err(format!("ctr run: {:?} {err}", o.status));
            }
            if !mounted.is_empty() || share.exists() {
                return Err(format!(
                    "left of the share: {} {mounted:?}",
                    share.display()
                ));
            }
            if status.as_deref() != Some("CREATED") {
                return Err(format!("the task is {status:?}, not CREATED"));
            }
            delete_task(f, &id)?;
            Ok(format!(
                "Start fails: {}; task CREATED, share unmounted; deleted",
                last_line(&err, 90)
            ))
        })
    }

    /// A pod netns with two interfaces (veths whose peers are in another netns, as CNI makes
    /// them); plumbing the second one fails after its tap's qdisc (failpoint
    /// `network::setup=return(1)`): `joeyctl run` reports it before any VM starts, and no tap,
    /// qdisc or filter is left in the netns (the first interface's included).
    pub fn network_second_interface_fails(f: &mut Fixture) -> RowResult {
        let env = f.env(&host_failpoints("network::setup=return(1)"));
        let (ns, host) = two_interface_pod();
        let before = ns.links();
        let path = ns.path().display().to_string();
        let res = failpoint_joeyctl(&env, &["--netns", &path], &["true"])
            .and_then(|c| joeyctl_output(f, c, REPORT_BOUND));
        let (after, qdiscs) = (ns.links(), ns.qdiscs());
        // The pairs go with the peers' netns: the leak check expects only `lo` in the pod's.
        drop(host);
        f.scope.netns.push(ns);
        let err = exited_with(
            &res?,
            125,
            "interface eth1: injected failure after step tap_qdisc",
        )?;
        if after != before || qdiscs.contains("ingress") {
            return Err(format!(
                "left in the netns: links {after:?} (before {before:?}); qdiscs {qdiscs}"
            ));
        }
        Ok(format!("125, netns as before: {}", last_line(&err, 110)))
    }

    /// A pod netns (`jfnet-*`) with `eth0` and `eth1`, veths whose peers are in the second
    /// netns returned (deleting it deletes the pairs).
    fn two_interface_pod() -> (NetNs, NetNs) {
        let (ns, host) = (NetNs::new("jfnet"), NetNs::new("jfnh"));
        for i in 0..2 {
            let eth = format!("eth{i}");
            veth(&ns, &eth, &host, &format!("peer{i}"));
            ns.ip(&["addr", "add", &format!("10.204.{i}.2/24"), "dev", &eth]);
            ns.ip(&["link", "set", &eth, "up"]);
        }
        (ns, host)
    }

    /// The same under the shim: the first container's Create boots the sandbox in the pod
    /// netns (`ctr run --with-ns network:<path>`); it fails naming the interface, and the
    /// shim, with no container, is ended by containerd (Delete, Shutdown).
    pub fn network_second_interface_shim(f: &mut Fixture) -> RowResult {
        let id = f.id("fn");
        let (ns, host) = two_interface_pod();
        let before = ns.links();
        let with_ns = format!("network:{}", ns.path().display());
        let res = f.with_host_failpoints("network::setup=return(1)", |f, shim| {
            let args = [
                "run",
                "-d",
                "--runtime",
                shim,
                "--with-ns",
                &with_ns,
                IMAGE,
                &id,
                "true",
            ];
            f.c.ctr_out_within(&args, RUN_TIMEOUT)
        });
        let (after, qdiscs) = (ns.links(), ns.qdiscs());
        drop(host);
        f.scope.netns.push(ns);
        let o = res?;
        let err = stderr_of(&o);
        let _ = f.c.ctr_out_within(&["container", "rm", &id], PROBE_BOUND);
        if o.status.success() || !err.contains("interface eth1: injected failure after step") {
            return Err(format!("ctr run: {:?} {err}", o.status));
        }
        if after != before || qdiscs.contains("ingress") {
            return Err(format!(
                "left in the netns: links {after:?} (before {before:?}); qdiscs {qdiscs}"
            ));
        }
        Ok(format!(
            "Create fails, netns as before: {}",
            last_line(&err, 100)
        ))
    }

    /// Publishing TaskExit fails (failpoint `events::publish=return(/tasks/exit)`): the event is
    /// lost (counted, logged), but containerd still learns the exit through Wait and State: a
    /// foreground `ctr run` exits with the task's status, and the task deletes.
    pub fn events_publish_exit_fails(f: &mut Fixture) -> RowResult {
        let id = f.id("fp");
        let log_before = f.c.log().len();
        f.with_host_failpoints("events::publish=return(/tasks/exit)", |f, shim| {
            let events = f.c.events();
            let o = f.c.ctr_out_within(
                &[
                    "run",
                    "--rm",
                    "--runtime",
                    shim,
                    IMAGE,
                    &id,
                    "sh",
                    "-c",
                    "exit 3",
                ],
                RUN_TIMEOUT,
            )?;
            if o.status.code() != Some(3) {
                return Err(format!("ctr run: {:?}, not 3: {}", o.status, stderr_of(&o)));
            }
            wait_task_delete(&events, &id)?;
            let topics: Vec<String> = events
                .about(&id)
                .into_iter()
                .filter(|e| e.topic.starts_with("/tasks/"))
                .map(|e| {
                    format!(
                        "{} {}",
                        e.topic,
                        e.exit_status().map_or(String::new(), |s| s.to_string())
                    )
                })
                .collect();
            let want = ["/tasks/create ", "/tasks/start ", "/tasks/delete 3"];
            if topics != want {
                return Err(format!("task events {topics:?}, want {want:?}"));
            }
            let log = f.c.log();
            let failed = log
                .get(log_before..)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("publishing event failed") && l.contains("/tasks/exit"));
            if !failed {
                return Err("the shim did not log the failed TaskExit".into());
            }
            Ok("ctr run exits 3 (Wait); no TaskExit, logged as failed; TaskDelete 3".into())
        })
    }
}

/// Rows of the host failpoints: `joeyctl` built with `--features joey-shim/failpoints`
/// (`JOEY_FP_JOEYCTL`, scripts/fault.sh), the points set by the config's `debug.failpoints`.
mod host_rows {
    use super::*;

    /// `<failpoint joeyctl> run --config <env's> -- argv...`, output piped, stdin closed.
    fn fp_run(env: &Env, argv: &[&str]) -> Result<Child, String> {
        let mut c = Command::new(failpoint_binary("JOEY_FP_JOEYCTL")?);
        c.arg("run").arg("--config").arg(&env.config).arg("--").args(argv);
        c.env_remove("JOEY_CONFIG").env_remove("JOEY_LOG");
        c.stdout(Stdio::null()).stderr(Stdio::piped()).stdin(Stdio::null());
        c.spawn().map_err(|e| format!("spawn joeyctl: {e}"))
    }

    /// An injected panic is logged as such; a panic report (`panicked at`) is a real one.
    fn no_panic_report(err: &str) -> Result<(), String> {
        if err.contains("panicked at") {
            return Err(format!("a panic report: {err:?}"));
        }
        Ok(())
    }

    /// The guest's data packets (OP_RW to the host) are dropped with their connection from the
    /// 13th on: the agent's connection breaks under an RPC in flight (here ExecProcess; the
    /// count decides which, docs/faults.md).
    pub fn vsock_drop_joeyctl(f: &mut Fixture) -> RowResult {
        vsock_fault(f, "vsock::tx=12*off->return(drop)")
    }

    /// The same packet makes the vsock device's vring worker (joeyctl's vhost-user thread)
    /// panic: the panic is caught under the vring lock, the packet is lost, the RPC's deadline
    /// (3 s here) ends the wait.
    pub fn vsock_panic_joeyctl(f: &mut Fixture) -> RowResult {
        vsock_fault(f, "vsock::tx=12*off->panic")
    }

    fn vsock_fault(f: &mut Fixture, points: &str) -> RowResult {
        let extra = format!(
            "[agent]\nrpc_timeout_ms = 3000\nready_timeout_ms = 5000\n{}",
            host_failpoints(points)
        );
        let env = f.env(&extra);
        let mut child = fp_run(&env, &["sh", "-c", "sleep 1; echo ok"])?;
        let r = expect_125(&mut child, Instant::now(), RUN_TIMEOUT, "agent RPC");
        if let Ok(o) = &r {
            no_panic_report(o)?;
        }
        r
    }

    /// Every FUSE request of the virtio-fs device (served to QEMU over vhost-user by joeyctl)
    /// fails: the guest cannot mount the container's rootfs share.
    pub fn fs_error_joeyctl(f: &mut Fixture) -> RowResult {
        fs_fault(f, "fs::request=return", "opening the container rootfs")
    }

    /// Regression: the virtio-fs vring worker's panic poisoned the vring's lock; the
    /// vhost-user request thread panicked on it and joeyctl died of SIGSYS, leaving its state
    /// dir. Now the panic is caught under the lock: the request is lost, the RPC's deadline
    /// ends the wait, the stop cleans up.
    pub fn fs_panic_joeyctl(f: &mut Fixture) -> RowResult {
        fs_fault(f, "fs::request=panic", "CreateContainer")
    }

    /// `joeyctl run --rootfs DIR -- /bin/true` with the virtio-fs failpoint `points`: exit 125,
    /// one line naming `names`.
    fn fs_fault(f: &mut Fixture, points: &str, names: &str) -> RowResult {
        let rootfs = f.c.dir.path().join("fs-fault-rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).map_err(|e| e.to_string())?;
        let env = f.env(&format!(
            "[agent]\nrpc_timeout_ms = 3000\n{}",
            host_failpoints(points)
        ));
        let mut c = Command::new(failpoint_binary("JOEY_FP_JOEYCTL")?);
        c.arg("run").arg("--config").arg(&env.config);
        c.arg("--rootfs").arg(&rootfs).args(["--", "/bin/true"]);
        c.env_remove("JOEY_CONFIG").env_remove("JOEY_LOG");
        c.stdout(Stdio::null()).stderr(Stdio::piped()).stdin(Stdio::null());
        let mut child = c.spawn().map_err(|e| format!("spawn joeyctl: {e}"))?;
        let r = expect_125(&mut child, Instant::now(), RUN_TIMEOUT, names);
        if let Ok(o) = &r {
            no_panic_report(o)?;
        }
        let _ = std::fs::remove_dir_all(&rootfs);
        r
    }

    /// The probe guest (guest/probe/build.sh, cached by input hash).
    fn probe_elf() -> Result<PathBuf, String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/probe/build.sh");
        let o = Command::new("bash")
            .arg(script)
            .output()
            .map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(format!("guest/probe/build.sh: {}", stderr_of(&o)));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("probe.elf"))
    }

    /// `joeyctl boot` (built-in VMM, the probe spinning) with `points`: exit 125 within `bound`,
    /// one stderr line containing `names`.
    fn boot_fault(f: &mut Fixture, points: &str, timeout_s: u64, bound: Duration, names: &str) -> RowResult {
        let env = f.env(&host_failpoints(points));
        let k = probe_elf()?;
        let mut c = Command::new(failpoint_binary("JOEY_FP_JOEYCTL")?);
        c.arg("boot").arg("--config").arg(&env.config).arg("--kernel").arg(&k);
        c.args(["--memory-mib", "64", "--timeout-s", &timeout_s.to_string()]);
        c.args(["--cmdline", "probe.mem_mib=64 probe.cpus=1 probe.spin=1"]);
        c.stdout(Stdio::null()).stderr(Stdio::piped()).stdin(Stdio::null());
        let t0 = Instant::now();
        let mut child = c.spawn().map_err(|e| format!("spawn joeyctl boot: {e}"))?;
        let st = wait_child(&mut child, bound)?;
        let took = t0.elapsed();
        let mut err = String::new();
        let _ = child.stderr.as_mut().map(|e| e.read_to_string(&mut err));
        if st.code() != Some(125) {
            return Err(format!("exit {st:?}, not 125: {err:?}"));
        }
        no_panic_report(&err)?;
        if err.lines().count() != 1 || !err.starts_with("joeyctl boot: error: ") || !err.contains(names) {
            return Err(format!("stderr is not one line naming {names:?}: {err:?}"));
        }
        Ok(format!("125 in {:.1}s: {}", took.as_secs_f64(), err.trim_end()))
    }

    /// Regression: a panicking vCPU thread ended silently and `joeyctl boot` waited for ever.
    pub fn vcpu_panic_boot(f: &mut Fixture) -> RowResult {
        boot_fault(
            f,
            "vmm::vcpu_run=panic",
            0,
            Duration::from_secs(20),
            "thread vcpu0 failed: panicked: failpoint vmm::vcpu_run panic",
        )
    }

    /// A vCPU thread that never returns to its loop: `--timeout-s` ends the wait, the stop
    /// gives up on the vCPU after the control timeout (5 s); one line says both.
    pub fn vcpu_hang_boot(f: &mut Fixture) -> RowResult {
        boot_fault(
            f,
            "vmm::vcpu_run=pause",
            2,
            Duration::from_secs(20),
            "still running after --timeout-s 2; stopping the VM",
        )
    }
}
