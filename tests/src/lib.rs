//! Harness for joey's integration tests: real QEMU, real guest kernel and agent, no mocks.
//!
//! The Makefile passes the artifacts under test: `JOEYCTL` (binary), `JOEY_KERNEL`, `JOEY_INITRD`.
//! A test run without them fails loudly rather than skipping. The built-in VMM boots the ELF
//! `vmlinux`: `JOEY_VMLINUX`, else `vmlinux` next to `JOEY_KERNEL`.
//!
//! Every environment pins its [`Backend`] (`hypervisor.kind`), so a test means the same thing on
//! every host whatever `auto` would pick.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod containerd;
pub mod cri;
pub mod netns;

fn required_env(name: &str) -> PathBuf {
    match std::env::var_os(name) {
        Some(v) => PathBuf::from(v),
        None => panic!("{name} is not set: run the integration tests through `make test`"),
    }
}

pub fn joeyctl_path() -> PathBuf {
    required_env("JOEYCTL")
}

/// The ELF kernel the built-in VMM boots.
pub fn vmlinux_path() -> PathBuf {
    match std::env::var_os("JOEY_VMLINUX") {
        Some(v) => PathBuf::from(v),
        None => required_env("JOEY_KERNEL")
            .parent()
            .map(|d| d.join("vmlinux"))
            .unwrap_or_else(|| PathBuf::from("vmlinux")),
    }
}

/// Which hypervisor backend an environment runs (`hypervisor.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Qemu,
    Builtin,
}

impl Backend {
    /// The `hypervisor.kind` value, also what `joeyctl run --timings` prints as `hypervisor=`.
    pub fn kind(self) -> &'static str {
        match self {
            Backend::Qemu => "qemu",
            Backend::Builtin => "builtin",
        }
    }

    /// Puts `kind = "<backend>"` into the `[hypervisor]` table of `body` and, for the built-in
    /// VMM, adds `[hypervisor.builtin] kernel = <vmlinux>` unless `body` has that table.
    pub fn apply(self, body: &str) -> String {
        let kind = format!("[hypervisor]\nkind = \"{}\"\n", self.kind());
        let mut out = if body.contains("[hypervisor]\n") {
            body.replacen("[hypervisor]\n", &kind, 1)
        } else {
            format!("{kind}{body}")
        };
        if self == Backend::Builtin && !body.contains("[hypervisor.builtin]") {
            out.push_str(&format!("\n[hypervisor.builtin]\nkernel = \"{}\"\n", vmlinux_path().display()));
        }
        out
    }
}

/// What `joeyctl host-check` says about the built-in VMM on this host: `Ok(why)` where it can
/// run the Linux guest, `Err(why not)` otherwise (the reason joey's host detection gives).
pub fn builtin_host_support() -> Result<String, String> {
    let o = Command::new(joeyctl_path())
        .args(["host-check"])
        .env_remove("JOEY_CONFIG")
        .output()
        .expect("run joeyctl host-check");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("builtin vmm: "))
        .unwrap_or_else(|| panic!("host-check says nothing about the built-in VMM:\n{out}"));
    if let Some(why) = line.strip_prefix("available: ") {
        Ok(why.to_string())
    } else if let Some(why) = line.strip_prefix("unavailable: ") {
        Err(why.to_string())
    } else {
        panic!("unexpected host-check line: builtin vmm: {line}")
    }
}

/// Declares a test file's scenarios (functions of its `mod scenario`, each taking the
/// [`Backend`] to run on): one `#[test]` each on QEMU, named as the scenario, and the table
/// `SCENARIOS` for [`run_builtin_suite`].
#[macro_export]
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                scenario::$name($crate::Backend::Qemu)
            }
        )*
        const SCENARIOS: &[$crate::Scenario] = &[$((stringify!($name), scenario::$name)),*];
    };
}

/// A named scenario: a test body to run on a [`Backend`].
pub type Scenario = (&'static str, fn(Backend));

/// Runs every scenario again on the built-in VMM where the host's KVM runs Linux guests (first
/// printing `builtin suite: running (<why>)` to stderr: the nested test host's step checks for
/// it, see scripts/nested-builtin-tests.sh), failing with the names of the scenarios that failed.
/// Elsewhere joey must refuse `hypervisor.kind = "builtin"` with exit 2 and the reason its host
/// detection gives.
pub fn run_builtin_suite(scenarios: &[Scenario]) {
    match builtin_host_support() {
        Ok(why) => {
            eprintln!("builtin suite: running ({why})");
            let retries = if in_nested_host() { NESTED_TRIPLE_FAULT_RETRIES } else { 0 };
            let failed = run_scenarios(scenarios, Backend::Builtin, retries, &l2_triple_faults);
            assert!(failed.is_empty(), "builtin suite: failed scenarios: {failed:?}");
        }
        Err(reason) => {
            println!("builtin suite not run: {reason}");
            let env = Env::with_backend(Backend::Builtin);
            let o = env.run(&["true"], None);
            let err = stderr_of(&o);
            assert_eq!(o.status.code(), Some(2), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.starts_with("joeyctl: error: "), "{err}");
            assert!(err.contains("hypervisor.kind = \"builtin\""), "{err}");
            assert!(err.contains(&reason), "reason {reason:?} not in {err}");
            assert!(o.stdout.is_empty());
        }
    }
}

/// How many scenarios of one built-in suite run may be run again because their guest triple
/// faulted, in the nested test host only. There, an L2 guest (under L1's kvm_amd, itself under
/// QEMU-TCG's emulated SVM) now and then triple faults early in its boot (3 in 275 runs
/// measured, 2 of them in one L1 boot); AMD's KVM re-initialises the vCPU on that exit, so no
/// register state survives to tell why. The retry is printed; a second fault in one suite run
/// fails it. docs/testing.md, "Known flake".
pub const NESTED_TRIPLE_FAULT_RETRIES: usize = 1;

/// Whether this process runs in the nested test host's L1 (scripts/nested-host.sh exports
/// `JOEY_NESTED_L1=1` there).
pub fn in_nested_host() -> bool {
    std::env::var_os("JOEY_NESTED_L1").is_some_and(|v| v == "1")
}

static L2_TRIPLE_FAULTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many joeyctl runs of this process so far reported that their VM stopped on a triple
/// fault (counted by [`wait_output`]).
pub fn l2_triple_faults() -> usize {
    L2_TRIPLE_FAULTS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Runs every scenario on `backend` (each under `catch_unwind`, printing its name first) and
/// returns the names of those that failed. A failed scenario runs once more when `faults()`
/// grew while it ran (one of its guests triple faulted) and fewer than `retries` have been
/// used in this call; the retry is printed. See [`NESTED_TRIPLE_FAULT_RETRIES`].
pub fn run_scenarios(
    scenarios: &[Scenario],
    backend: Backend,
    retries: usize,
    faults: &dyn Fn() -> usize,
) -> Vec<&'static str> {
    let mut failed = Vec::new();
    let mut retries_left = retries;
    for (name, f) in scenarios {
        eprintln!("builtin suite: {name}");
        loop {
            let before = faults();
            if std::panic::catch_unwind(|| f(backend)).is_ok() {
                break;
            }
            if retries_left > 0 && faults() > before {
                retries_left -= 1;
                eprintln!(
                    "builtin suite: {name}: RETRY: its guest triple-faulted in the nested test host \
                     (docs/testing.md, \"Known flake\"); running the scenario once more"
                );
                continue;
            }
            failed.push(*name);
            break;
        }
    }
    failed
}

/// Makes `root` a busybox container rootfs: `/bin/busybox` (the host's static one) with a
/// symlink per applet in `applets`, and empty `/proc`, `/sys`, `/dev`, `/tmp` mountpoints.
pub fn make_busybox_rootfs(root: &Path, applets: &[&str]) -> std::io::Result<()> {
    for d in ["bin", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    for a in applets {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a))?;
    }
    Ok(())
}

/// One isolated test environment: its own config file and state directory.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state_dir: PathBuf,
}

impl Env {
    /// A QEMU environment whose config uses the kernel and initrd under test.
    pub fn new() -> Env {
        Self::with_backend(Backend::Qemu)
    }

    /// An environment on `backend` whose config uses the kernel and initrd under test.
    pub fn with_backend(backend: Backend) -> Env {
        Self::with_backend_config(backend, |k, i| {
            format!(
                "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\n",
                k.display(),
                i.display()
            )
        })
    }

    /// A QEMU environment with a custom config (see [`Env::with_backend_config`]).
    pub fn with_config(f: impl FnOnce(&Path, &Path) -> String) -> Env {
        Self::with_backend_config(Backend::Qemu, f)
    }

    /// An environment with a custom config; the closure gets (kernel, initrd) and returns TOML
    /// without `[runtime]` (the harness adds its own state_dir) and without
    /// `hypervisor.kind` (the harness sets it to `backend`, see [`Backend::apply`]).
    pub fn with_backend_config(backend: Backend, f: impl FnOnce(&Path, &Path) -> String) -> Env {
        let kernel = required_env("JOEY_KERNEL");
        let initrd = required_env("JOEY_INITRD");
        let dir = tempfile::Builder::new().prefix("joey-it-").tempdir().expect("tempdir");
        let state_dir = dir.path().join("state");
        let config = dir.path().join("config.toml");
        let body = backend.apply(&f(&kernel, &initrd));
        let text = format!("{body}\n[runtime]\nstate_dir = \"{}\"\n", state_dir.display());
        std::fs::write(&config, text).expect("write config");
        Env { dir, config, state_dir }
    }

    /// `joeyctl run --config <ours> [extra...] -- argv...`
    pub fn command(&self, extra: &[&str], argv: &[&str]) -> Command {
        let mut c = Command::new(joeyctl_path());
        c.arg("run").arg("--config").arg(&self.config);
        c.args(extra);
        c.arg("--");
        c.args(argv);
        c.env_remove("JOEY_CONFIG").env_remove("JOEY_LOG");
        c
    }

    /// Runs a command to completion with `stdin` bytes (or /dev/null), checking for leaks after.
    pub fn run(&self, argv: &[&str], stdin: Option<&[u8]>) -> Output {
        self.run_with(&[], argv, stdin)
    }

    pub fn run_with(&self, extra: &[&str], argv: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut c = self.command(extra, argv);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        c.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = c.spawn().expect("spawn joeyctl");
        if let Some(data) = stdin {
            let mut si = child.stdin.take().unwrap();
            let data = data.to_vec();
            std::thread::spawn(move || {
                let _ = si.write_all(&data);
            });
        }
        let out = wait_output(child, Duration::from_secs(120));
        self.assert_no_leaks();
        out
    }

    /// Processes whose command line mentions this environment's directory (QEMU does).
    pub fn processes(&self) -> Vec<(i32, String)> {
        processes_mentioning(&self.dir.path().display().to_string())
    }

    /// Fails unless no process, socket or state directory of this environment is left.
    pub fn assert_no_leaks(&self) {
        // QEMU may need a moment to be reaped after joeyctl exits? No: joeyctl waits for it.
        let procs = self.processes();
        assert!(procs.is_empty(), "leaked processes: {procs:?}");
        if self.state_dir.exists() {
            let left: Vec<_> = walk(&self.state_dir);
            assert!(left.is_empty(), "leaked state: {left:?}");
        }
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            v.push(e.path());
            if e.path().is_dir() {
                v.extend(walk(&e.path()));
            }
        }
    }
    v
}

/// (pid, cmdline) of every process whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            if pid == me {
                continue;
            }
            let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(needle) {
                v.push((pid, cmd));
            }
        }
    }
    v
}

/// Waits for a child with a deadline; kills it (and fails) past the deadline.
pub fn wait_output(mut child: Child, timeout: Duration) -> Output {
    use std::io::Read as _;
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = so.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = se.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("joeyctl did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    };
    if String::from_utf8_lossy(&out.stderr).contains("triple fault) unexpectedly") {
        L2_TRIPLE_FAULTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    out
}

/// Polls `probe` every `every` until it yields a value or `timeout` has passed; past the
/// deadline, `Err` says what was awaited and how long. The one way tests wait for a condition
/// (never a bare sleep).
pub fn wait_for<T>(what: &str, timeout: Duration, every: Duration, mut probe: impl FnMut() -> Option<T>) -> Result<T, String> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if t0.elapsed() >= timeout {
            return Err(format!("{what}: not within {timeout:?}"));
        }
        std::thread::sleep(every.min(timeout.saturating_sub(t0.elapsed())));
    }
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(b);
    d.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Splits a raw `Connection: close` HTTP response into (status, body).
pub fn split_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("bad HTTP response: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    (status, body.to_string())
}

pub fn exchange<S: std::io::Read + std::io::Write>(mut s: S, path: &str) -> (u16, String) {
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    split_response(&raw)
}

/// `GET path` over a unix socket (HTTP/1.0: no chunked answers).
pub fn get_unix(sock: &Path, path: &str, timeout: Duration) -> (u16, String) {
    let s = std::os::unix::net::UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    exchange(s, path)
}

/// Value of the first sample of `name` whose labels contain every `labels` entry (`k="v"`).
pub fn value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return None;
        }
        let (series, v) = l.rsplit_once(' ')?;
        if labels.iter().all(|want| series.contains(want)) {
            v.parse().ok()
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // Scenario bodies are plain fns: they count calls and "faults" in statics of their own.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    static FAULTS: AtomicUsize = AtomicUsize::new(0);

    fn ok(_: Backend) {
        CALLS.fetch_add(1, Ordering::SeqCst);
    }
    /// Triple faults on its first run only, then passes.
    fn faults_once(_: Backend) {
        if CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
            FAULTS.fetch_add(1, Ordering::SeqCst);
            panic!("the VM stopped (vCPU 0 triple fault) unexpectedly");
        }
    }
    /// Fails without a triple fault.
    fn plain_failure(_: Backend) {
        CALLS.fetch_add(1, Ordering::SeqCst);
        panic!("wrong stdout");
    }
    /// Triple faults every time.
    fn always_faults(_: Backend) {
        CALLS.fetch_add(1, Ordering::SeqCst);
        FAULTS.fetch_add(1, Ordering::SeqCst);
        panic!("triple fault");
    }

    fn faults() -> usize {
        FAULTS.load(Ordering::SeqCst)
    }

    /// One test, as the statics are shared: each case resets them.
    #[test]
    fn only_a_triple_fault_is_retried_and_only_as_often_as_allowed() {
        let case = |scenarios: &[Scenario], retries: usize| {
            CALLS.store(0, Ordering::SeqCst);
            FAULTS.store(0, Ordering::SeqCst);
            let failed = run_scenarios(scenarios, Backend::Builtin, retries, &faults);
            (failed, CALLS.load(Ordering::SeqCst))
        };
        assert_eq!(case(&[("ok", ok)], 1), (vec![], 1));
        // A triple fault, retried: passes on the second run.
        assert_eq!(case(&[("faults_once", faults_once)], 1), (vec![], 2));
        // No retries allowed (not in the nested host): the fault fails the scenario.
        assert_eq!(case(&[("faults_once", faults_once)], 0), (vec!["faults_once"], 1));
        // Any other failure is never retried.
        assert_eq!(case(&[("plain_failure", plain_failure)], 1), (vec!["plain_failure"], 1));
        // A second fault in the same suite run fails.
        assert_eq!(
            case(&[("a", always_faults), ("b", ok), ("c", always_faults)], 1),
            (vec!["a", "c"], 4)
        );
    }
}
