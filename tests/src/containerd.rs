//! A private containerd 1.6 for the shim tests: own root, state, sockets and joey state dir under
//! a temp dir, our shim first in its PATH, a locally built busybox image (no registry).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::*;

pub const IMAGE: &str = "docker.io/library/busybox:local";
pub const RUNTIME: &str = "io.containerd.joey.v2";
pub const RUN_TIMEOUT: Duration = Duration::from_secs(180);

pub fn shim_path() -> PathBuf {
    match std::env::var_os("JOEY_SHIM") {
        Some(v) => PathBuf::from(v),
        None => panic!("JOEY_SHIM is not set: run the integration tests through `make test`"),
    }
}

/// A private containerd (own root, state, sockets and joey state dir under a temp dir) that
/// finds our shim first in its PATH. Killed on drop.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Containerd {
    pub fn start() -> Containerd {
        let kernel = std::env::var("JOEY_KERNEL").expect("JOEY_KERNEL is not set");
        let initrd = std::env::var("JOEY_INITRD").expect("JOEY_INITRD is not set");
        let shim = shim_path();
        assert!(shim.is_file(), "JOEY_SHIM={} does not exist", shim.display());
        let dir = tempfile::Builder::new().prefix("joey-shim-").tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(
            d.join("joey.toml"),
            format!(
                "[hypervisor]\nkind = \"qemu\"\nkernel = \"{kernel}\"\ninitrd = \"{initrd}\"\n\n[runtime]\nstate_dir = \"{}\"\n",
                d.join("joey-state").display()
            ),
        )
        .expect("write joey config");
        std::fs::write(
            d.join("containerd.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n[grpc]\n  address = \"{0}/c.sock\"\n[ttrpc]\n  address = \"{0}/c.sock.ttrpc\"\n",
                d.display()
            ),
        )
        .expect("write containerd config");
        let mut c = Containerd { dir, child: None };
        c.spawn();
        c
    }

    /// Starts containerd with this harness's config (first start and [`Containerd::restart`]);
    /// returns once it answers `ctr version`. Its output is appended to `containerd.log`.
    fn spawn(&mut self) {
        let d = self.dir.path();
        let shim = shim_path();
        let path = format!(
            "{}:{}",
            shim.parent().expect("shim dir").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("containerd.log"))
            .expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("containerd.toml"))
            .env("PATH", path)
            .env("JOEY_CONFIG", d.join("joey.toml"))
            .env_remove("JOEY_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd (apt-get install containerd runc)");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if self.sock().exists() {
                let v = self.ctr(&["version"]).spawn().expect("run ctr");
                if wait_output(v, Duration::from_secs(10)).status.success() {
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                panic!("containerd exited ({st}) at start:\n{}", self.log());
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "containerd did not start:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// containerd's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("containerd runs").id() as i32
    }

    /// Stops containerd with SIGTERM (as systemd does; shims keep running), waits for it to exit
    /// (20 s bound), then starts it again with the same config, root, state and sockets.
    pub fn restart(&mut self) {
        let mut child = self.child.take().expect("containerd runs");
        // SAFETY: plain kill(2) on our own child, which has not been waited for yet.
        let r = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(r, 0, "kill -TERM containerd: {}", std::io::Error::last_os_error());
        let t0 = Instant::now();
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("containerd ignored SIGTERM for 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.spawn();
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// The per-sandbox metrics endpoint the shim serves for container `id` (sandbox id = `id`).
    pub fn metrics_socket(&self, id: &str) -> PathBuf {
        self.dir.path().join("joey-state").join(id).join("metrics.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(self.sock()).args(args);
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    }

    pub fn ctr_out(&self, args: &[&str]) -> Output {
        let child = self.ctr(args).spawn().expect("run ctr");
        wait_output(child, RUN_TIMEOUT)
    }

    /// Asserts that the ctr run `o` (`what`) succeeded; else fails with its exit code, output
    /// and containerd's log.
    pub fn assert_ok(&self, o: &Output, what: &str) {
        assert!(
            o.status.success(),
            "{what}: exit {:?}\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            stderr_of(o),
            self.log()
        );
    }

    pub fn import_busybox(&self) {
        let tar = self.dir.path().join("busybox.tar");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-busybox-image.sh");
        let o = Command::new("bash").arg(script).arg(&tar).output().expect("make-busybox-image.sh");
        assert!(o.status.success(), "make-busybox-image.sh: {}", stderr_of(&o));
        let t = tar.display().to_string();
        // The manifest's ref.name (IMAGE) names the image. No `--index-name`: with it, ctr 1.6
        // fails ("content digest ...: not found") before unpacking, and every `ctr run` then
        // unpacks on its own, racing containerd's GC ("parent snapshot ... does not exist").
        let o = self.ctr_out(&["image", "import", &t]);
        assert!(o.status.success(), "ctr image import: {}\ncontainerd log:\n{}", stderr_of(&o), self.log());
        let ls = self.ctr_out(&["image", "ls", "-q"]);
        assert!(
            String::from_utf8_lossy(&ls.stdout).lines().any(|l| l == IMAGE),
            "image not imported: {}",
            String::from_utf8_lossy(&ls.stdout)
        );
    }

    pub fn run(&self, id: &str, argv: &[&str]) -> Output {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME, IMAGE, id];
        args.extend_from_slice(argv);
        self.ctr_out(&args)
    }

    /// `ctr run --rm --runtime <runtime> [ctr_args...] IMAGE id argv...` in the foreground, with
    /// `stdin` bytes piped in (pass `-i` in `ctr_args` so ctr forwards them) or /dev/null.
    pub fn run_on(&self, runtime: &str, id: &str, ctr_args: &[&str], argv: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut args = vec!["run", "--rm", "--runtime", runtime];
        args.extend_from_slice(ctr_args);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(argv);
        let mut cmd = self.ctr(&args);
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().expect("run ctr");
        if let Some(data) = stdin {
            let mut si = child.stdin.take().expect("stdin");
            let data = data.to_vec();
            // Dropping `si` at the end closes ctr's stdin: the container sees EOF.
            std::thread::spawn(move || {
                use std::io::Write as _;
                let _ = si.write_all(&data);
            });
        }
        wait_output(child, RUN_TIMEOUT)
    }

    /// Like [`Containerd::ctr_out`] but a ctr still running after `timeout` is killed and
    /// reported as `Err` (for steps whose hang is an outcome to report, not a harness failure).
    pub fn ctr_out_within(&self, args: &[&str], timeout: Duration) -> Result<Output, String> {
        let mut child = self.ctr(args).spawn().expect("run ctr");
        let t0 = Instant::now();
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                return Ok(wait_output(child, Duration::from_secs(5)));
            }
            if t0.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`ctr {}` did not finish within {timeout:?}", args.join(" ")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The STATUS column of `ctr task ls` for task `id` (`RUNNING`, `STOPPED`, `PAUSED`, ...),
    /// None when containerd lists no such task.
    pub fn task_status(&self, id: &str) -> Option<String> {
        let ls = self.ctr_out(&["task", "ls"]);
        assert!(ls.status.success(), "ctr task ls: {}", stderr_of(&ls));
        let out = String::from_utf8_lossy(&ls.stdout).into_owned();
        out.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[0] == id).then(|| f[2].to_string())
        })
    }

    /// Pids `ctr task ps` lists for task `id` (empty when the task is unknown).
    pub fn task_pids(&self, id: &str) -> Vec<u32> {
        let ps = self.ctr_out(&["task", "ps", id]);
        String::from_utf8_lossy(&ps.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// Polls `ctr task ls` until task `id` has `status`; fails after `timeout` naming the last one.
    pub fn wait_task_status(&self, id: &str, status: &str, timeout: Duration) {
        let t0 = Instant::now();
        loop {
            let now = self.task_status(id);
            if now.as_deref() == Some(status) {
                return;
            }
            assert!(
                t0.elapsed() < timeout,
                "task {id} did not reach {status} within {timeout:?} (now {now:?})\ncontainerd log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pids of the shim processes (binary name containing `shim_binary`, e.g.
    /// `containerd-shim-joey-v2`) serving container `id` under this containerd.
    pub fn shim_pids(&self, shim_binary: &str, id: &str) -> Vec<i32> {
        let needle = format!(" -id {id} ");
        processes_mentioning(&self.sock().display().to_string())
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(shim_binary) && format!("{cmd} ").contains(&needle))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Starts `ctr events` on this containerd: every event from now on, see [`Events`].
    pub fn events(&self) -> Events {
        Events::start(self)
    }

    /// containerd's shim socket for container `id` (namespace default).
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        let h = sha256_hex(format!("{}/default/{id}", self.sock().display()).as_bytes());
        PathBuf::from("/run/containerd/s").join(h)
    }

    /// Nothing of this test is left: no QEMU or shim process, no mount, no shim socket.
    pub fn assert_clean(&self, ids: &[&str]) {
        let d = self.dir.path().display().to_string();
        let t0 = Instant::now();
        loop {
            let procs: Vec<_> = processes_mentioning(&d)
                .into_iter()
                .filter(|(_, cmd)| !cmd.starts_with("containerd --config"))
                .collect();
            let mi = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
            let mounts: Vec<&str> = mi.lines().filter(|l| l.contains(&d)).collect();
            let socks: Vec<PathBuf> = ids.iter().map(|i| self.shim_socket(i)).filter(|p| p.exists()).collect();
            let state_left = std::fs::read_dir(self.dir.path().join("joey-state"))
                .map(|r| r.count())
                .unwrap_or(0);
            if procs.is_empty() && mounts.is_empty() && socks.is_empty() && state_left == 0 {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "left behind: processes {procs:?}, mounts {mounts:?}, sockets {socks:?}, joey state entries {state_left}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Containerd {
    /// Best-effort teardown, also after a failed test: every container still known is SIGKILLed,
    /// deleted and removed through ctr (10 s bound per step, so runc's containers go too), then
    /// containerd is SIGKILLed, and whatever still mentions this harness's directory (a shim or
    /// QEMU whose delete never came) is SIGKILLed, its mounts lazily unmounted, the shims'
    /// sockets removed. Idempotent; [`Drop`] runs it, a suite holding a `static` harness calls it
    /// at exit.
    pub fn teardown(&self) {
        let step = Duration::from_secs(10);
        let ids: Vec<String> = match self.child.as_ref().map(|_| self.ctr_out_within(&["container", "ls", "-q"], step)) {
            Some(Ok(o)) if o.status.success() => String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect(),
            _ => Vec::new(),
        };
        for id in &ids {
            let _ = self.ctr_out_within(&["task", "kill", "-s", "SIGKILL", id], step);
            let _ = self.ctr_out_within(&["task", "delete", "--force", id], step);
            let _ = self.ctr_out_within(&["container", "rm", id], step);
        }
        if let Some(c) = self.child.as_ref() {
            let pid = c.id() as i32;
            // SAFETY: kill(2) and waitpid(2) of our own child; a second call finds it reaped
            // (ESRCH/ECHILD), which is ignored.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                let mut st = 0;
                libc::waitpid(pid, &mut st, 0);
            }
        }
        let d = self.dir.path().display().to_string();
        let me = std::process::id() as i32;
        let t0 = Instant::now();
        loop {
            let left: Vec<i32> = processes_mentioning(&d).into_iter().map(|(p, _)| p).filter(|&p| p != me).collect();
            if left.is_empty() || t0.elapsed() > Duration::from_secs(10) {
                break;
            }
            for pid in left {
                // SAFETY: kill(2) of a process whose command line names our private directory.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> = mi.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&d)).collect();
        mounts.sort_by(|a, b| b.cmp(a)); // deepest first
        for m in mounts {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: umount2 with a valid NUL-terminated path; failure is ignored.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        for id in &ids {
            let _ = std::fs::remove_file(self.shim_socket(id));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.teardown();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One event line of `ctr events`: `<time> <namespace> <topic> <json>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub topic: String,
    pub body: String,
}

impl Event {
    fn parse(line: &str) -> Option<Event> {
        // "2026-11-27 05:40:01.1 +0000 UTC default /tasks/exit {...}": the topic is the first
        // field that starts with '/'.
        let start = line.find(" /")? + 1;
        let rest = &line[start..];
        let (topic, body) = rest.split_once(' ').unwrap_or((rest, ""));
        Some(Event {
            topic: topic.to_string(),
            body: body.to_string(),
        })
    }

    /// The event is about container `id` (`"container_id":"<id>"` or, for /containers/*, `"id":"<id>"`).
    pub fn about(&self, id: &str) -> bool {
        self.body.contains(&format!("\"container_id\":\"{id}\""))
            || (self.topic.starts_with("/containers/") && self.body.contains(&format!("\"id\":\"{id}\"")))
    }

    /// The `exit_status` field (absent in JSON when 0).
    pub fn exit_status(&self) -> Option<u32> {
        if !self.topic.ends_with("/exit") && !self.topic.ends_with("/delete") {
            return None;
        }
        let Some(i) = self.body.find("\"exit_status\":") else { return Some(0) };
        let digits: String = self.body[i + 14..].chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    }
}

/// A running `ctr events` whose lines a thread collects; killed on drop. Events of one
/// containerd only: after [`Containerd::restart`] start a new one.
pub struct Events {
    child: Option<Child>,
    lines: std::sync::Arc<std::sync::Mutex<Vec<Event>>>,
}

impl Events {
    fn start(c: &Containerd) -> Events {
        let mut child = c.ctr(&["events"]).spawn().expect("run ctr events");
        let out = child.stdout.take().expect("stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(e) = Event::parse(&line) {
                    l2.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                }
            }
        });
        let events = Events { child: Some(child), lines };
        events.await_subscribed(c);
        events
    }

    /// `ctr events` subscribes asynchronously: until it has, events are missed. Labels the
    /// namespace (a `/namespaces/update` event) until that event shows up, with a deadline.
    fn await_subscribed(&self, c: &Containerd) {
        let seen = |n: u32| {
            let v = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            v.iter().any(|e| e.topic == "/namespaces/update" && e.body.contains(&format!("events-probe-{n}")))
        };
        let mut n = 0;
        crate::wait_for("ctr events to subscribe", Duration::from_secs(20), Duration::from_millis(0), || {
            n += 1;
            let o = c.ctr_out(&["namespaces", "label", "default", &format!("joey.test/events-probe=events-probe-{n}")]);
            assert!(o.status.success(), "ctr namespaces label: {}", crate::stderr_of(&o));
            crate::wait_for("probe event", Duration::from_millis(500), Duration::from_millis(20), || seen(n).then_some(()))
                .ok()
        })
        .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", c.log()));
    }

    /// Events about container `id` so far, in order.
    pub fn about(&self, id: &str) -> Vec<Event> {
        let v = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        v.iter().filter(|e| e.about(id)).cloned().collect()
    }

    /// Waits (up to `timeout`) for the `/tasks/exit` event of container `id`'s init process and
    /// returns its exit status; None past the deadline.
    pub fn exit_status(&self, id: &str, timeout: Duration) -> Option<u32> {
        let t0 = Instant::now();
        loop {
            let found = self
                .about(id)
                .into_iter()
                .find(|e| e.topic == "/tasks/exit" && e.body.contains(&format!("\"id\":\"{id}\"")));
            if let Some(e) = found {
                return e.exit_status();
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn sigkill(pid: i32) {
    // SAFETY: plain kill(2) on a pid we just found.
    let r = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(r, 0, "kill -KILL {pid}: {}", std::io::Error::last_os_error());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_parse() {
        let e = Event::parse(
            "2026-11-27 05:40:01.123 +0000 UTC default /tasks/exit {\"container_id\":\"a1\",\"id\":\"a1\",\"pid\":7,\"exit_status\":137,\"exited_at\":{}}",
        )
        .unwrap();
        assert_eq!(e.topic, "/tasks/exit");
        assert!(e.about("a1"));
        assert!(!e.about("a"));
        assert_eq!(e.exit_status(), Some(137));
        let e = Event::parse("2026-11-27 05:40:01 +0000 UTC default /tasks/exit {\"container_id\":\"a1\",\"id\":\"a1\",\"pid\":7}").unwrap();
        assert_eq!(e.exit_status(), Some(0));
        let e = Event::parse("2026-11-27 05:40:01 +0000 UTC default /containers/create {\"id\":\"b\",\"image\":\"x\"}").unwrap();
        assert_eq!(e.topic, "/containers/create");
        assert!(e.about("b"));
        assert_eq!(e.exit_status(), None);
        assert_eq!(Event::parse("no topic here"), None);
    }
}
