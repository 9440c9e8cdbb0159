//! Differential suite: the same `ctr` scenarios run with runc (`io.containerd.runc.v2`, the
//! reference) and with joey (`io.containerd.joey.v2`) in one private containerd, and their
//! outcomes must be equal: stdout and stderr bytes, exit codes, the `ctr task ls` status after each
//! step of a detached task, its exit status (from `ctr events`), and what a bind mount left on
//! the host. Each scenario is written once, in the table below; a normaliser may rewrite the
//! output of both sides, only for a difference listed in docs/runc-differences.md.
//!
//! One containerd and one image import serve the whole suite (started by the first test, killed at
//! exit); each test runs its scenario on runc first (fast), then on joey.
//! Needs `JOEY_SHIM`, `JOEY_KERNEL`, `JOEY_INITRD`, Debian's containerd, runc, busybox-static.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use joey_tests::containerd::*;

const RUNC: &str = "io.containerd.runc.v2";

/// How long a step of a detached task may take to change the task's status (a signal the process
/// ignores leaves it RUNNING: the step then records RUNNING after this long).
const SETTLE: Duration = Duration::from_secs(3);

#[derive(Clone, Copy)]
enum Step {
    /// `ctr task kill -s <signal>`
    Signal(&'static str),
    /// `ctr task kill --all -s <signal>`: every process of the container.
    SignalAll(&'static str),
    /// Waits (30 s bound) for the task to stop on its own. As the first step, the status right
    /// after `ctr run -d` is not recorded (RUNNING or already STOPPED: a race on both runtimes).
    AwaitStop,
    /// `ctr task pause`
    Pause,
    /// `ctr task resume`
    Resume,
    /// `ctr task exec --exec-id x1 <id> argv...`: its stdout, stderr and exit code are recorded.
    Exec(&'static [&'static str]),
}

#[derive(Clone, Copy)]
enum Flow {
    /// `ctr run --rm` in the foreground: exit code, stdout, stderr.
    Foreground,
    /// `ctr run -d`, then the steps; each records the task status (and an exec's output). A task
    /// still running after them is SIGKILLed; its exit status comes from the `/tasks/exit` event.
    Detached(&'static [Step]),
}

#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    /// ctr run options; `{host}` is replaced with a fresh host directory (see `host_files`).
    ctr_args: &'static [&'static str],
    argv: &'static [&'static str],
    /// Piped into `ctr run -i`.
    stdin: Option<&'static [u8]>,
    flow: Flow,
    /// Files put into the `{host}` directory before the run; the directory's files and contents
    /// after the run are part of the outcome.
    host_files: &'static [(&'static str, &'static str)],
    /// Applied to stdout and stderr (exec output too) of both runtimes.
    norm: fn(&str) -> String,
}

const BASE: Scenario = Scenario {
    name: "",
    ctr_args: &[],
    argv: &[],
    stdin: None,
    flow: Flow::Foreground,
    host_files: &[],
    norm: same,
};

fn same(s: &str) -> String {
    s.to_string()
}

/// Field 5 (the mount point) of every /proc/self/mountinfo line, in order: mount ids, devices,
/// sources and options differ between any two runs (and the rootfs is virtio-fs in joey).
fn mount_point_column(s: &str) -> String {
    s.lines()
        .map(|l| l.split(' ').nth(4).unwrap_or("<short line>").to_string() + "\n")
        .collect()
}

/// `ls -l` dates ("Nov 27 05:40" or "Nov 27  2025") become `<date>`: device nodes are created at
/// container start, so their times differ between any two runs.
fn no_ls_dates(s: &str) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    s.lines()
        .map(|l| {
            let mut out = l.to_string();
            for m in MONTHS {
                if let Some(i) = l.find(&format!(" {m} ")) {
                    // " Mmm dd hh:mm " or " Mmm dd  yyyy ": 13 characters after the space.
                    let end = (i + 1 + 12).min(l.len());
                    out = format!("{} <date>{}", &l[..i], &l[end..]);
                    break;
                }
            }
            out + "\n"
        })
        .collect()
}

/// ctr's logrus lines start with `time="<RFC 3339>"`: the time becomes `<time>`.
fn mask_ctr_log_time(s: &str) -> String {
    if !s.lines().any(|l| l.starts_with("time=\"")) {
        return s.to_string(); // byte for byte, a missing last newline included
    }
    s.lines()
        .map(|l| match (l.strip_prefix("time=\""), l.find("\" level=")) {
            (Some(_), Some(end)) => format!("time=<time>{}\n", &l[end + 1..]),
            _ => format!("{l}\n"),
        })
        .collect()
}

/// Without `--hostname`, runc's new UTS namespace keeps the host's name, while joey's guest has
/// no host name to copy and the agent names it after the container id (already masked as
/// `<id>`): a line that is the host's name becomes `<id>`.
fn host_name_as_id(s: &str) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(r, 0, "gethostname: {}", std::io::Error::last_os_error());
    let host = String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == 0).unwrap_or(buf.len())]).into_owned();
    s.lines().map(|l| if l == host { "<id>\n".to_string() } else { format!("{l}\n") }).collect()
}

/// The second line (`ulimit -u`, RLIMIT_NPROC) becomes `<inherited>`: the OCI spec from ctr sets
/// no RLIMIT_NPROC, so runc's container inherits containerd's limit and joey's inherits the guest
/// agent's, which the guest kernel derives from the VM's memory.
fn nproc_inherited(s: &str) -> String {
    s.lines()
        .enumerate()
        .map(|(i, l)| if i == 1 { "<inherited>\n".to_string() } else { format!("{l}\n") })
        .collect()
}

/// Masked paths that exist on only one of the two kernels: the OCI spec masks /proc/acpi and
/// /proc/keys, which runc finds on the host kernel, while the guest kernel has neither (no ACPI,
/// no KEYS), so the agent has nothing to mask there; it masks /proc/sysrq-trigger, which the
/// guest kernel has (MAGIC_SYSRQ, for the fault harness) and this host's kernel may lack. Their
/// mount points are dropped from both lists.
const ONE_KERNEL_MASKS: [&str; 3] = ["/proc/acpi", "/proc/keys", "/proc/sysrq-trigger"];

/// [`mount_point_column`] without [`ONE_KERNEL_MASKS`].
fn mount_points_in_guest_kernel(s: &str) -> String {
    mount_point_column(s)
        .lines()
        .filter(|l| !ONE_KERNEL_MASKS.contains(l))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// In `ps` lines (`  PID USER COMMAND`), a pid other than 1 becomes `<pid>`: runc's exec goes
/// through `runc init` (nsexec forks twice inside the container's pid namespace), so exec'd
/// processes get higher pids than with joey's agent, which forks once.
fn exec_pids(s: &str) -> String {
    s.lines()
        .map(|l| {
            let t = l.trim_start();
            let digits = t.len() - t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let is_ps_line = digits > 0 && t[digits..].starts_with(' ');
            if is_ps_line && &t[..digits] != "1" {
                format!("<pid>{}\n", &t[digits..])
            } else {
                format!("{l}\n")
            }
        })
        .collect()
}

macro_rules! scenarios {
    ($($name:ident: $s:expr;)*) => {
        /// The table: every scenario, once.
        fn table() -> Vec<Scenario> {
            vec![$(Scenario { name: stringify!($name), ..$s }),*]
        }
        $(
            #[test]
            fn $name() {
                check(stringify!($name));
            }
        )*
    };
}

scenarios! {
    echo: Scenario { argv: &["echo", "hello differential"], ..BASE };
    exit_3: Scenario { argv: &["sh", "-c", "exit 3"], ..BASE };
    stdout_and_stderr: Scenario { argv: &["sh", "-c", "echo out; echo err >&2"], ..BASE };
    env: Scenario { ctr_args: &["--env", "A=b"], argv: &["sh", "-c", "env | sort"], ..BASE };
    cwd: Scenario { ctr_args: &["--cwd", "/tmp"], argv: &["pwd"], ..BASE };
    id_root: Scenario { argv: &["id"], ..BASE };
    id_user_1000: Scenario { ctr_args: &["--user", "1000:1000"], argv: &["id"], ..BASE };
    capabilities: Scenario {
        argv: &["sh", "-c", "cat /proc/self/status | grep -E '^(Cap|NoNewPrivs|Seccomp)'"],
        ..BASE
    };
    rlimits: Scenario { argv: &["sh", "-c", "ulimit -n; ulimit -u"], norm: nproc_inherited, ..BASE };
    mount_points: Scenario { argv: &["cat", "/proc/self/mountinfo"], norm: mount_points_in_guest_kernel, ..BASE };
    dev_listing: Scenario { argv: &["ls", "-la", "/dev"], norm: no_ls_dates, ..BASE };
    hostname_default: Scenario { argv: &["hostname"], norm: host_name_as_id, ..BASE };
    hostname_set: Scenario { ctr_args: &["--hostname", "diffhost"], argv: &["hostname"], ..BASE };
    ps_pid1: Scenario { argv: &["ps"], ..BASE };
    readonly_rootfs: Scenario { ctr_args: &["--read-only"], argv: &["touch", "/x"], ..BASE };
    bind_ro: Scenario {
        ctr_args: &["--mount", "type=bind,src={host},dst=/data,options=rbind:ro"],
        argv: &["sh", "-c", "cat /data/in; echo x > /data/new; echo rc=$?"],
        host_files: &[("in", "from the host\n")],
        ..BASE
    };
    bind_rw: Scenario {
        ctr_args: &["--mount", "type=bind,src={host},dst=/data,options=rbind:rw"],
        argv: &["sh", "-c", "cat /data/in; echo written > /data/out; echo rc=$?"],
        host_files: &[("in", "from the host\n")],
        ..BASE
    };
    seccomp_default_profile: Scenario {
        ctr_args: &["--seccomp"],
        argv: &["sh", "-c", "grep ^Seccomp: /proc/self/status; unshare -U true; echo rc=$?"],
        ..BASE
    };
    sigterm_detached_sleep: Scenario {
        argv: &["sleep", "300"],
        flow: Flow::Detached(&[Step::Signal("SIGTERM")]),
        ..BASE
    };
    sigterm_all_to_detached_shell: Scenario {
        argv: &["sh", "-c", "sleep 300 & wait $!"],
        flow: Flow::Detached(&[Step::SignalAll("SIGTERM")]),
        ..BASE
    };
    sigkill_detached_sleep: Scenario {
        argv: &["sleep", "300"],
        flow: Flow::Detached(&[Step::Signal("SIGKILL")]),
        ..BASE
    };
    detached_quick_exit: Scenario {
        argv: &["sh", "-c", "exit 7"],
        flow: Flow::Detached(&[Step::AwaitStop]),
        ..BASE
    };
    pause_resume: Scenario {
        argv: &["sleep", "300"],
        flow: Flow::Detached(&[Step::Pause, Step::Resume, Step::Signal("SIGKILL")]),
        ..BASE
    };
    exec: Scenario {
        argv: &["sleep", "300"],
        flow: Flow::Detached(&[
            Step::Exec(&["sh", "-c", "echo exec-out; echo exec-err >&2; exit 5"]),
            Step::Exec(&["ps"]),
            Step::Signal("SIGKILL"),
        ]),
        norm: exec_pids,
        ..BASE
    };
    stdin_cat: Scenario {
        ctr_args: &["-i"],
        argv: &["cat"],
        stdin: Some(b"line one\nline two\n"),
        ..BASE
    };
    stdin_wc: Scenario {
        ctr_args: &["-i"],
        argv: &["wc", "-c"],
        stdin: Some(b"twelve bytes"),
        ..BASE
    };
}

/// The one containerd of this test process (killed, and its directory removed, at exit).
struct Suite {
    c: Containerd,
    events: Events,
}

static SUITE: OnceLock<Suite> = OnceLock::new();

extern "C" fn stop_suite() {
    if let Some(s) = SUITE.get() {
        // Statics are never dropped: tear down (containers, containerd, leftovers) here, then
        // remove the directory.
        s.c.teardown();
        let _ = std::fs::remove_dir_all(s.c.dir.path());
    }
}

fn suite() -> &'static Suite {
    SUITE.get_or_init(|| {
        let c = Containerd::start();
        // SAFETY: registers a plain extern "C" fn with no captured state.
        unsafe { libc::atexit(stop_suite) };
        c.import_busybox();
        let events = c.events();
        Suite { c, events }
    })
}

/// What one runtime did with one scenario, rendered as text (normalised).
fn outcome(s: &Scenario, runtime: &str, side: &str) -> String {
    let Suite { c, events } = suite();
    let id = format!("{}-{side}-{}", s.name.replace('_', "-"), std::process::id());
    let host = tempfile::Builder::new().prefix("joey-diff-").tempdir().expect("tempdir");
    for (name, body) in s.host_files {
        std::fs::write(host.path().join(name), body).expect("write host file");
    }
    let hs = host.path().display().to_string();
    let args: Vec<String> = s.ctr_args.iter().map(|a| a.replace("{host}", &hs)).collect();
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let mut t = String::new();
    // The container id differs between the sides by construction, and ctr's own log lines carry
    // the time: both are masked on both sides before the scenario's normaliser.
    let id2 = id.clone();
    let harness = move |x: &str| -> String { mask_ctr_log_time(&x.replace(&id2, "<id>")) };
    let scenario_norm = s.norm;
    let norm = &move |x: &str| scenario_norm(&harness(x));
    match s.flow {
        Flow::Foreground => {
            let o = c.run_on(runtime, &id, &args, s.argv, s.stdin);
            t += &format!("exit: {:?}\n", o.status.code());
            t += &format!("stdout:\n{}", norm(&String::from_utf8_lossy(&o.stdout)));
            t += &format!("stderr:\n{}", norm(&String::from_utf8_lossy(&o.stderr)));
        }
        Flow::Detached(steps) => {
            let mut run = vec!["run", "-d", "--runtime", runtime];
            run.extend_from_slice(&args);
            run.push(IMAGE);
            run.push(&id);
            run.extend_from_slice(s.argv);
            let (ok, rec) = ctr_step(c, &run, "run -d", norm);
            t += &rec;
            if ok {
                t += &detached(c, events, &id, steps, norm);
                t += &ctr_step(c, &["task", "delete", &id], "task delete", norm).1;
            }
            t += &ctr_step(c, &["container", "rm", &id], "container rm", norm).1;
            // Whatever a failed step left behind (not part of the outcome).
            let _ = c.ctr_out_within(&["task", "delete", "--force", &id], STEP_TIMEOUT);
            let _ = c.ctr_out_within(&["container", "rm", &id], STEP_TIMEOUT);
        }
    }
    t += &host_listing(host.path());
    t
}

fn detached(c: &Containerd, events: &Events, id: &str, steps: &[Step], norm: &dyn Fn(&str) -> String) -> String {
    let mut t = String::new();
    let wait_change = |from: Option<String>, within: Duration| -> Option<String> {
        let t0 = Instant::now();
        loop {
            let now = c.task_status(id);
            if now != from || t0.elapsed() > within {
                return now;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // `ctr run -d` returns once the task started; RUNNING is what ls shows right after.
    let mut status = c.task_status(id);
    if !matches!(steps.first(), Some(Step::AwaitStop)) {
        t += &format!("status after run -d: {status:?}\n");
    }
    for step in steps {
        match step {
            Step::Signal(sig) | Step::SignalAll(sig) => {
                let all = matches!(step, Step::SignalAll(_));
                if all {
                    // `--all` is about the processes the command started: wait (not recorded)
                    // until they exist, or a slow start races the signal on either runtime.
                    let t0 = Instant::now();
                    while c.task_pids(id).len() < 2 && t0.elapsed() < Duration::from_secs(30) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                let mut a = vec!["task", "kill", "-s", sig];
                if all {
                    a.push("--all");
                }
                a.push(id);
                t += &ctr_step(c, &a, &format!("kill -s {sig} (all: {all})"), norm).1;
                status = wait_change(status, SETTLE);
                t += &format!("status after {sig}: {status:?}\n");
            }
            Step::Pause | Step::Resume => {
                let verb = if matches!(step, Step::Pause) { "pause" } else { "resume" };
                t += &ctr_step(c, &["task", verb, id], verb, norm).1;
                status = wait_change(status, SETTLE);
                t += &format!("status after {verb}: {status:?}\n");
            }
            Step::AwaitStop => {
                let t0 = Instant::now();
                while status.as_deref() != Some("STOPPED") && t0.elapsed() < Duration::from_secs(30) {
                    std::thread::sleep(Duration::from_millis(100));
                    status = c.task_status(id);
                }
                t += &format!("status after waiting: {status:?}\n");
            }
            Step::Exec(argv) => {
                let mut a = vec!["task", "exec", "--exec-id", "x1", id];
                a.extend_from_slice(argv);
                t += &ctr_step(c, &a, &format!("exec {argv:?}"), norm).1;
            }
        }
    }
    if status.as_deref() != Some("STOPPED") {
        // Not part of the scenario: the cleanup. Its outcome is recorded all the same.
        t += &ctr_step(c, &["task", "kill", "-s", "SIGKILL", id], "cleanup kill -s SIGKILL", norm).1;
        status = wait_change(status, Duration::from_secs(30));
        t += &format!("status after cleanup: {status:?}\n");
    }
    t += &format!("exit status: {:?}\n", events.exit_status(id, Duration::from_secs(10)));
    t
}

/// Bound of one ctr step of a detached flow: a hang is recorded as the step's outcome.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one ctr step and records its exit code, stdout and stderr (normalised), or its hang.
/// Returns whether it exited 0, and the record.
fn ctr_step(c: &Containerd, args: &[&str], what: &str, norm: &dyn Fn(&str) -> String) -> (bool, String) {
    match c.ctr_out_within(args, STEP_TIMEOUT) {
        Ok(o) => (
            o.status.success(),
            format!(
                "{what}: exit {:?}\n  stdout:\n{}  stderr:\n{}",
                o.status.code(),
                norm(&String::from_utf8_lossy(&o.stdout)),
                norm(&String::from_utf8_lossy(&o.stderr))
            ),
        ),
        Err(e) => (false, format!("{what}: {e}\n")),
    }
}

/// The files of the `{host}` directory and their contents, sorted by name.
fn host_listing(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read host dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut t = String::from("host files:\n");
    for n in names {
        let body = std::fs::read(dir.join(&n)).unwrap_or_default();
        t += &format!("  {n}: {:?}\n", String::from_utf8_lossy(&body));
    }
    t
}

fn check(name: &str) {
    let s = table().into_iter().find(|s| s.name == name).expect("scenario in the table");
    let runc = outcome(&s, RUNC, "r");
    let joey = outcome(&s, RUNTIME, "j");
    assert!(
        runc == joey,
        "scenario {name}: joey differs from runc\n===== runc =====\n{runc}===== joey =====\n{joey}================\ncontainerd log (tail):\n{}",
        tail(&suite().c.log(), 12)
    );
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The normalisers change exactly what they are documented to change.
#[test]
fn normalisers() {
    let mi = "22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/a\n\
              23 22 0:5 / /proc rw,nosuid - proc proc rw\n";
    assert_eq!(mount_point_column(mi), "/\n/proc\n");
    let ls = "crw-rw-rw-    1 root     root        1,   3 Nov 27 05:40 null\n\
              lrwxrwxrwx    1 root     root            13 Jan  2  2025 fd -> /proc/self/fd\n\
              total 0\n";
    assert_eq!(
        no_ls_dates(ls),
        "crw-rw-rw-    1 root     root        1,   3 <date> null\n\
         lrwxrwxrwx    1 root     root            13 <date> fd -> /proc/self/fd\n\
         total 0\n"
    );
    assert_eq!(
        mask_ctr_log_time("time=\"2026-11-27T05:46:30Z\" level=warning msg=\"x\"\nplain\n"),
        "time=<time> level=warning msg=\"x\"\nplain\n"
    );
    assert_eq!(mask_ctr_log_time("no newline"), "no newline");
    assert_eq!(nproc_inherited("1024\n96365\n"), "1024\n<inherited>\n");
    assert_eq!(nproc_inherited("1024\n"), "1024\n");
    assert_eq!(
        mount_points_in_guest_kernel(&format!("{mi}24 23 0:5 / /proc/acpi ro - tmpfs tmpfs ro\n25 23 0:5 / /proc/keys rw - proc proc rw\n")),
        "/\n/proc\n"
    );
    assert_eq!(
        exec_pids("PID   USER     COMMAND\n    1 root     sleep 300\n   13 root     ps\nexec-out 5\n"),
        "PID   USER     COMMAND\n    1 root     sleep 300\n<pid> root     ps\nexec-out 5\n"
    );
    let names: Vec<&str> = table().iter().map(|s| s.name).collect();
    let mut uniq = names.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), names.len(), "duplicate scenario names: {names:?}");
}
