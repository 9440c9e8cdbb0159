//! Metrics: the per-sandbox `GET /metrics` on `<state_dir>/<id>/metrics.sock`, `joey-monitor`
//! merging every sandbox with a `sandbox_id` label, a real Prometheus server scraping the
//! monitor, a hung sandbox endpoint that must not stall the monitor, the device counters of
//! the vsock device, and the `[metrics]` config keys.
//!
//! Needs `JOEYCTL`, `JOEY_KERNEL`, `JOEY_INITRD` (see the harness), `JOEY_MONITOR` (the
//! joey-monitor binary) and the Debian package `prometheus` (`promtool`, `prometheus`).

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpStream;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use joey_tests::*;

/// Every family a sandbox endpoint exposes while its agent answers.
const SANDBOX_METRICS: &[&str] = &[
    "joey_shim_process_cpu_seconds_total",
    "joey_shim_process_resident_memory_bytes",
    "joey_shim_process_open_fds",
    "joey_shim_process_threads",
    "joey_shim_agent_rpc_duration_seconds_bucket",
    "joey_shim_agent_rpc_duration_seconds_sum",
    "joey_shim_agent_rpc_duration_seconds_count",
    "joey_shim_metrics_agent_timeouts_total",
    "joey_shim_metrics_agent_errors_total",
    "joey_hypervisor_vm_start_duration_seconds",
    "joey_hypervisor_guest_memory_bytes",
    "joey_hypervisor_vcpus",
    "joey_hypervisor_accelerator",
    "joey_hypervisor_info",
    "joey_hypervisor_process_cpu_seconds_total",
    "joey_hypervisor_process_resident_memory_bytes",
    "joey_guest_memory_total_bytes",
    "joey_guest_memory_free_bytes",
    "joey_guest_memory_available_bytes",
    "joey_guest_memory_cached_bytes",
    "joey_guest_memory_used_bytes",
    "joey_guest_load1",
    "joey_guest_load5",
    "joey_guest_load15",
    "joey_guest_cpus",
    "joey_guest_cpu_seconds_total",
    "joey_agent_process_cpu_seconds_total",
    "joey_agent_process_resident_memory_bytes",
    "joey_agent_process_threads",
    "joey_agent_process_open_fds",
    "joey_hypervisor_device_bytes_total",
    "joey_hypervisor_device_operations_total",
    "joey_hypervisor_device_errors_total",
    "joey_hypervisor_device_rate_limiter_throttled_total",
];

const MONITOR_METRICS: &[&str] = &[
    "joey_monitor_sandboxes",
    "joey_monitor_scrapes_total",
    "joey_monitor_scrape_timeouts_total",
    "joey_monitor_scrape_errors_total",
    "joey_monitor_scrape_duration_seconds_count",
    "joey_monitor_sandbox_up",
];

fn monitor_path() -> PathBuf {
    match std::env::var_os("JOEY_MONITOR") {
        Some(v) => PathBuf::from(v),
        None => panic!(
            "JOEY_MONITOR is not set: run the integration tests through `make test` \
             (it is target/release/joey-monitor, built by `cargo build --release --bins`)"
        ),
    }
}

fn env_256m() -> Env {
    Env::with_config(|k, i| {
        format!(
            "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = 256\n",
            k.display(),
            i.display()
        )
    })
}

/// A child process that is terminated (SIGTERM, then SIGKILL) and reaped when dropped.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Some(st);
        }
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} ignored SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `joeyctl run` of `script`, running once it printed `started`.
fn start_sandbox(env: &Env, script: &str) -> (Proc, String) {
    let mut c = env.command(&[], &["sh", "-c", script]);
    c.stdout(Stdio::piped()).stderr(Stdio::inherit()).stdin(Stdio::null());
    let mut child = c.spawn().expect("spawn joeyctl");
    let out = child.stdout.take().unwrap();
    let proc_ = Proc { child, name: "joeyctl" };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l == "started" => break,
            Ok(_) => {}
            Err(e) => panic!("the sandbox did not print \"started\": {e}"),
        }
    }
    let id = sandbox_ids(&env.state_dir)
        .into_iter()
        .next()
        .expect("no metrics.sock under the state dir while the sandbox runs");
    (proc_, id)
}

/// Ids of the sandboxes under `state_dir` that have a metrics socket.
fn sandbox_ids(state_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state_dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join("metrics.sock").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn get_tcp(port: u16, path: &str, timeout: Duration) -> Result<(u16, String), std::io::Error> {
    let s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(exchange(s, path))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits until `GET path` on the loopback `port` answers 200.
fn wait_http_ready(port: u16, path: &str, timeout: Duration) {
    let t0 = Instant::now();
    loop {
        if let Ok((200, _)) = get_tcp(port, path, Duration::from_secs(2)) {
            return;
        }
        assert!(t0.elapsed() < timeout, "nothing answered {path} on port {port} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `promtool check metrics` on `text`; fails the test on any problem (lint included).
fn promtool_check(text: &str, what: &str) {
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package prometheus)");
    let mut si = c.stdin.take().unwrap();
    let data = text.as_bytes().to_vec();
    let writer = std::thread::spawn(move || {
        let _ = si.write_all(&data);
    });
    let o = wait_output(c, Duration::from_secs(30));
    let _ = writer.join();
    assert!(
        o.status.success(),
        "promtool check metrics failed on the {what}: {}{}\n{text}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn has_metric(text: &str, name: &str) -> bool {
    text.lines()
        .any(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with('{') || r.starts_with(' ')))
}

/// The QEMU accelerator joeyctl host-check reports for `env`'s config.
fn host_accel(env: &Env) -> String {
    let o = Command::new(joeyctl_path())
        .arg("host-check")
        .arg("--config")
        .arg(&env.config)
        .env_remove("JOEY_CONFIG")
        .output()
        .expect("joeyctl host-check");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.lines()
        .find_map(|l| l.strip_prefix("qemu accelerator: "))
        .map(|a| a.split_whitespace().next().unwrap_or("").to_string())
        .unwrap_or_else(|| panic!("host-check reports no qemu accelerator:\n{out}"))
}

fn start_monitor(env: &Env, port: u16, scrape_timeout_ms: u64) -> Proc {
    let child = Command::new(monitor_path())
        .arg("--config")
        .arg(&env.config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--scrape-timeout-ms", &scrape_timeout_ms.to_string()])
        .env_remove("JOEY_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn joey-monitor");
    let p = Proc {
        child,
        name: "joey-monitor",
    };
    wait_http_ready(port, "/", Duration::from_secs(10));
    p
}

fn finish(mut sandbox: Proc, env: &Env) {
    let st = sandbox.stop();
    assert_eq!(st.and_then(|s| s.code()), Some(143), "joeyctl should tear down on SIGTERM");
    env.assert_no_leaks();
}

#[test]
fn sandbox_and_monitor_expositions_pass_promtool() {
    let env = env_256m();
    let accel = host_accel(&env);
    let (sandbox, id) = start_sandbox(&env, "echo started; sleep 30");
    let sock = env.state_dir.join(&id).join("metrics.sock");

    let (status, text) = get_unix(&sock, "/metrics", Duration::from_secs(5));
    assert_eq!(status, 200, "{text}");
    promtool_check(&text, "sandbox endpoint");
    for name in SANDBOX_METRICS {
        assert!(has_metric(&text, name), "{name} missing from the sandbox endpoint:\n{text}");
    }
    let total = value(&text, "joey_guest_memory_total_bytes", &[]).unwrap();
    assert!(total > 100.0 * 1048576.0 && total <= 256.0 * 1048576.0, "guest MemTotal {total}");
    assert_eq!(value(&text, "joey_hypervisor_guest_memory_bytes", &[]), Some(256.0 * 1048576.0));
    assert_eq!(value(&text, "joey_hypervisor_vcpus", &[]), Some(1.0));
    assert_eq!(value(&text, "joey_guest_cpus", &[]), Some(1.0));
    assert_eq!(
        value(&text, "joey_hypervisor_accelerator", &[&format!("accel=\"{accel}\"")]),
        Some(1.0),
        "accelerator per host-check: {accel}\n{text}"
    );
    assert_eq!(value(&text, "joey_hypervisor_info", &["kind=\"qemu\""]), Some(1.0));
    let start = value(&text, "joey_hypervisor_vm_start_duration_seconds", &[]).unwrap();
    assert!(start > 0.0 && start < 90.0, "vm start {start}");
    assert!(value(&text, "joey_shim_process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert!(value(&text, "joey_agent_process_resident_memory_bytes", &[]).unwrap() > 1e5);
    assert!(value(&text, "joey_hypervisor_process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert_eq!(
        value(&text, "joey_shim_agent_rpc_duration_seconds_count", &["method=\"ExecProcess\""]),
        Some(1.0)
    );
    assert_eq!(value(&text, "joey_shim_metrics_agent_timeouts_total", &[]), Some(0.0));
    // The vsock device served in this process carried the agent's RPCs both ways.
    for dir in ["to_guest", "from_guest"] {
        let labels = ["device=\"vsock\"", &format!("direction=\"{dir}\"")];
        let b = value(&text, "joey_hypervisor_device_bytes_total", &labels).unwrap_or(0.0);
        assert!(b > 0.0, "vsock {dir} bytes {b}:\n{text}");
    }
    for op in ["rx", "tx"] {
        let labels = ["device=\"vsock\"", &format!("op=\"{op}\"")];
        let n = value(&text, "joey_hypervisor_device_operations_total", &labels).unwrap_or(0.0);
        assert!(n > 0.0, "vsock {op} packets {n}:\n{text}");
    }
    assert_eq!(value(&text, "joey_hypervisor_device_errors_total", &["device=\"vsock\""]), Some(0.0));
    // No vsock rate limit in this config: its limiters never held a queue back.
    for dir in ["to_guest", "from_guest"] {
        let labels = ["device=\"vsock\"", &format!("direction=\"{dir}\"")];
        assert_eq!(value(&text, "joey_hypervisor_device_rate_limiter_throttled_total", &labels), Some(0.0));
    }
    // QEMU runs the vCPUs: no exit counters.
    assert!(!has_metric(&text, "joey_hypervisor_vcpu_exits_total"), "{text}");
    // Counters never go down between scrapes.
    let before = value(&text, "joey_hypervisor_device_bytes_total", &["device=\"vsock\"", "direction=\"to_guest\""]);
    let (_, again) = get_unix(&sock, "/metrics", Duration::from_secs(5));
    let after = value(&again, "joey_hypervisor_device_bytes_total", &["device=\"vsock\"", "direction=\"to_guest\""]);
    assert!(after.unwrap() >= before.unwrap(), "{before:?} -> {after:?}");
    // Other paths are not served.
    assert_eq!(get_unix(&sock, "/other", Duration::from_secs(5)).0, 404);

    let port = free_port();
    let monitor = start_monitor(&env, port, 1000);
    let (status, all) = get_tcp(port, "/metrics", Duration::from_secs(5)).unwrap();
    assert_eq!(status, 200, "{all}");
    promtool_check(&all, "monitor output");
    let label = format!("sandbox_id=\"{id}\"");
    for name in SANDBOX_METRICS {
        assert!(
            all.lines().any(|l| l.starts_with(name) && l.contains(&label)),
            "{name} with {label} missing from the monitor:\n{all}"
        );
    }
    // Every sample of a sandbox family carries its sandbox_id.
    for l in all.lines().filter(|l| !l.starts_with('#') && !l.starts_with("joey_monitor_")) {
        assert!(l.contains(&label), "sample without {label}: {l}");
    }
    for name in MONITOR_METRICS {
        assert!(has_metric(&all, name), "{name} missing from the monitor:\n{all}");
    }
    assert_eq!(value(&all, "joey_monitor_sandboxes", &[]), Some(1.0));
    assert_eq!(value(&all, "joey_monitor_sandbox_up", &[&label]), Some(1.0));
    drop(monitor);
    finish(sandbox, &env);
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of the first result of a Prometheus instant-query answer, if any.
fn first_query_value(json: &str) -> Option<f64> {
    let at = json.find("\"value\":[")?;
    let rest = &json[at + "\"value\":[".len()..];
    let (_, after_ts) = rest.split_once(",\"")?;
    let (v, _) = after_ts.split_once('"')?;
    v.parse().ok()
}

#[test]
fn prometheus_scrapes_guest_memory_through_the_monitor() {
    let env = env_256m();
    let mon_port = free_port();
    let monitor = start_monitor(&env, mon_port, 1000);
    let prom_port = free_port();
    let prom_cfg = env.dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: joey\n    \
             static_configs:\n      - targets: ['127.0.0.1:{mon_port}']\n"
        ),
    )
    .unwrap();
    let prom = Proc {
        child: Command::new("prometheus")
            .arg(format!("--config.file={}", prom_cfg.display()))
            .arg(format!("--storage.tsdb.path={}", env.dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run prometheus (Debian package prometheus)"),
        name: "prometheus",
    };
    wait_http_ready(prom_port, "/-/ready", Duration::from_secs(60));

    let (sandbox, id) = start_sandbox(&env, "head -c 50000000 /dev/zero > /tmp/fill; echo started; sleep 60");
    let query = url_encode(&format!("joey_guest_memory_used_bytes{{sandbox_id=\"{id}\"}}"));
    let t0 = Instant::now();
    let mut last = String::new();
    let used = loop {
        if let Ok((200, body)) = get_tcp(prom_port, &format!("/api/v1/query?query={query}"), Duration::from_secs(5)) {
            if let Some(v) = first_query_value(&body) {
                if v > 50e6 {
                    break v;
                }
            }
            last = body;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "Prometheus has no plausible joey_guest_memory_used_bytes for {id}; last answer: {last}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(used < 256.0 * 1048576.0, "used {used}");
    drop(prom);
    drop(monitor);
    finish(sandbox, &env);
}

/// A unix socket server that accepts connections and never answers, until dropped.
struct HungEndpoint {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
}

impl HungEndpoint {
    fn new(dir: PathBuf) -> HungEndpoint {
        std::fs::create_dir_all(&dir).unwrap();
        let l = UnixListener::bind(dir.join("metrics.sock")).unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => held.push(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        HungEndpoint {
            stop,
            thread: Some(thread),
            dir,
        }
    }
}

impl Drop for HungEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn hung_sandbox_endpoint_does_not_stall_the_monitor() {
    let env = env_256m();
    let (sandbox, id) = start_sandbox(&env, "echo started; sleep 30");
    let hung = HungEndpoint::new(env.state_dir.join("fake-hung"));
    let timeout = Duration::from_millis(1000);
    let port = free_port();
    let monitor = start_monitor(&env, port, timeout.as_millis() as u64);
    for round in 1..=2 {
        let t0 = Instant::now();
        let (status, all) = get_tcp(port, "/metrics", Duration::from_secs(10)).unwrap();
        let took = t0.elapsed();
        assert_eq!(status, 200, "{all}");
        assert!(took < timeout + Duration::from_secs(1), "the monitor answered after {took:?}");
        assert_eq!(value(&all, "joey_monitor_scrape_timeouts_total", &[]), Some(round as f64), "{all}");
        assert_eq!(value(&all, "joey_monitor_sandboxes", &[]), Some(2.0), "{all}");
        assert_eq!(value(&all, "joey_monitor_sandbox_up", &["sandbox_id=\"fake-hung\""]), Some(0.0));
        assert_eq!(value(&all, "joey_monitor_sandbox_up", &[&format!("sandbox_id=\"{id}\"")]), Some(1.0));
        assert!(
            value(&all, "joey_guest_memory_total_bytes", &[&format!("sandbox_id=\"{id}\"")]).is_some(),
            "the live sandbox is missing:\n{all}"
        );
        promtool_check(&all, "monitor output with a hung sandbox");
    }
    drop(monitor);
    drop(hung);
    finish(sandbox, &env);
}

/// joey-monitor without flags listens on `metrics.monitor_listen` and waits
/// `metrics.monitor_scrape_timeout_ms` for a sandbox (a hung one takes all of it).
#[test]
fn monitor_takes_listen_and_scrape_timeout_from_the_config() {
    let port = free_port();
    let env = Env::with_config(|k, i| {
        format!(
            "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\n[metrics]\nmonitor_listen = \"127.0.0.1:{port}\"\n\
             monitor_scrape_timeout_ms = 300\n",
            k.display(),
            i.display()
        )
    });
    let hung = HungEndpoint::new(env.state_dir.join("fake-hung"));
    let child = Command::new(monitor_path())
        .arg("--config")
        .arg(&env.config)
        .env_remove("JOEY_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn joey-monitor");
    let monitor = Proc {
        child,
        name: "joey-monitor",
    };
    wait_http_ready(port, "/", Duration::from_secs(10));
    let t0 = Instant::now();
    let (status, all) = get_tcp(port, "/metrics", Duration::from_secs(10)).unwrap();
    let took = t0.elapsed();
    assert_eq!(status, 200, "{all}");
    // 300 ms from the config, not the 1000 ms default.
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(900),
        "the monitor answered after {took:?}"
    );
    assert_eq!(value(&all, "joey_monitor_scrape_timeouts_total", &[]), Some(1.0), "{all}");
    assert_eq!(value(&all, "joey_monitor_sandbox_up", &["sandbox_id=\"fake-hung\""]), Some(0.0));
    promtool_check(&all, "monitor output (config)");
    drop(monitor);
    drop(hung);
}

/// Out-of-range metrics settings are bad input (exit 2) naming the key or flag.
#[test]
fn monitor_refuses_bad_metrics_settings() {
    let env = Env::with_config(|k, i| {
        format!(
            "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\n[metrics]\nmonitor_scrape_timeout_ms = 0\n",
            k.display(),
            i.display()
        )
    });
    let o = Command::new(monitor_path())
        .arg("--config")
        .arg(&env.config)
        .env_remove("JOEY_CONFIG")
        .output()
        .expect("run joey-monitor");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("`metrics.monitor_scrape_timeout_ms`") && err.contains("1..=60000"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let good = env_256m();
    let o = Command::new(monitor_path())
        .arg("--config")
        .arg(&good.config)
        .args(["--scrape-timeout-ms", "60001"])
        .env_remove("JOEY_CONFIG")
        .output()
        .expect("run joey-monitor");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--scrape-timeout-ms") && err.contains("60001"), "{err}");
}

/// `metrics.agent_timeout_ms` bounds the agent fetch of the sandbox endpoint: with 1 ms the
/// guest families are skipped and counted as agent timeouts (a vsock round trip to a TCG guest
/// takes longer), while the other families are still served.
#[test]
fn sandbox_endpoint_uses_the_configured_agent_timeout() {
    let env = Env::with_config(|k, i| {
        format!(
            "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = 256\n[metrics]\nagent_timeout_ms = 1\n",
            k.display(),
            i.display()
        )
    });
    let (sandbox, id) = start_sandbox(&env, "echo started; sleep 30");
    let sock = env.state_dir.join(&id).join("metrics.sock");
    let mut skipped = 0;
    let mut text = String::new();
    for _ in 0..3 {
        let (status, t) = get_unix(&sock, "/metrics", Duration::from_secs(5));
        assert_eq!(status, 200, "{t}");
        if !has_metric(&t, "joey_guest_memory_total_bytes") {
            skipped += 1;
        }
        text = t;
    }
    assert!(skipped >= 1, "no scrape skipped the guest families with a 1 ms agent timeout:\n{text}");
    assert_eq!(value(&text, "joey_shim_metrics_agent_timeouts_total", &[]), Some(f64::from(skipped)), "{text}");
    assert!(has_metric(&text, "joey_hypervisor_device_bytes_total"), "{text}");
    promtool_check(&text, "sandbox endpoint with agent timeouts");
    finish(sandbox, &env);
}

/// A guest flooding its console (380 KB through the serial port) with a 64 KiB cap: the log on
/// the host stays under the cap and holds the newest output; what was dropped is counted in
/// `joey_hypervisor_console_dropped_bytes_total`.
#[test]
fn a_flooding_console_is_capped_keeping_the_newest_output() {
    let env = Env::with_config(|k, i| {
        format!(
            "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\nconsole_log_max_kib = 64\n",
            k.display(),
            i.display()
        )
    });
    let script = "yes joey-console-flood | head -n 20000 > /dev/console; echo the-end > /dev/console; \
                  echo started; sleep 300";
    let (sandbox, id) = start_sandbox(&env, script);
    let dir = env.state_dir.join(&id);
    // The pump may still be writing the last bytes QEMU took.
    let log = wait_for("the-end at the end of console.log", Duration::from_secs(10), Duration::from_millis(50), || {
        let log = std::fs::read(dir.join("console.log")).ok()?;
        String::from_utf8_lossy(&log).trim_end().ends_with("joey-console-flood\r\nthe-end").then_some(log)
    })
    .unwrap();
    assert!(log.len() <= 64 * 1024, "console.log is {} bytes", log.len());
    assert!(log.len() >= 32 * 1024, "console.log is only {} bytes", log.len());
    let text = String::from_utf8_lossy(&log);
    assert!(!text.contains("joey-agent: started as PID 1"), "the oldest output should be gone");
    let (status, metrics) = get_unix(&dir.join("metrics.sock"), "/metrics", Duration::from_secs(10));
    assert_eq!(status, 200, "{metrics}");
    let dropped = value(&metrics, "joey_hypervisor_console_dropped_bytes_total", &[]).expect("console counter");
    assert!(dropped >= 380_000.0 - 64.0 * 1024.0, "dropped {dropped}");
    finish(sandbox, &env);
}
