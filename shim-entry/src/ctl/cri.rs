//! `joeyctl cri`: a Kubernetes-style pod through a CRI runtime (containerd's CRI plugin), as
//! kubelet would run it, without crictl (Debian packages none). docs/cri.md.
//!
//! `joeyctl cri run-pod --runtime joey -- CMD...` runs RunPodSandbox (runtime handler
//! `--runtime`), CreateContainer + StartContainer of one container running CMD, streams the
//! container's stdout and stderr from its CRI log file, then StopPodSandbox + RemovePodSandbox and
//! exits with CMD's exit code.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use joey_cri_client::{
    api, container_config, container_state, parse_log, pod_config, CriClient, CriError,
};

use super::{EXIT_BAD_INPUT, EXIT_RUNTIME};

/// The CRI socket when neither `--address` nor `$CRI_ADDRESS` names one.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";

#[derive(Args, Debug)]
pub struct CriArgs {
    /// The CRI runtime's unix socket (default: $CRI_ADDRESS, else /run/containerd/containerd.sock).
    #[arg(long, global = true, value_name = "SOCKET")]
    pub address: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: CriCmd,
}

#[derive(Subcommand, Debug)]
pub enum CriCmd {
    /// Print the CRI runtime's name and version.
    Version,
    /// Run CMD as the one container of a new pod, print its output, remove the pod, exit with
    /// CMD's exit code.
    RunPod(RunPodArgs),
}

#[derive(Args, Debug)]
pub struct RunPodArgs {
    /// The pod's runtime handler (RuntimeClass): `joey` for a microVM, `runc` for comparison.
    #[arg(long, default_value = "joey")]
    pub runtime: String,
    /// The container image (already in the runtime's image store: nothing is pulled).
    #[arg(long, default_value = "docker.io/library/busybox:local")]
    pub image: String,
    /// The pod's name (and hostname).
    #[arg(long, default_value = "joeyctl-pod")]
    pub name: String,
    /// Give up (and remove the pod) when CMD runs longer than this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Print to stderr how long RunPodSandbox, CreateContainer and StartContainer took
    /// (`timings: ... first_running_ms=N`, as soon as the container runs) and the whole run.
    #[arg(long)]
    pub timings: bool,
    /// The command and its arguments, after `--`.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CriCmdError {
    #[error(transparent)]
    Cri(#[from] CriError),
    #[error("log directory {path}: {source}")]
    LogDir {
        path: String,
        source: std::io::Error,
    },
    #[error("the container did not exit within {0:?}")]
    Timeout(Duration),
}

/// Runs `joeyctl cri ...`; returns the exit code.
pub fn run(args: CriArgs) -> i32 {
    let address = args
        .address
        .or_else(|| std::env::var_os("CRI_ADDRESS").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ADDRESS));
    let cri = match CriClient::connect(&address) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("joeyctl: error: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let r = match args.cmd {
        CriCmd::Version => cri.version().map_err(CriCmdError::from).map(|v| {
            println!(
                "{} {} (CRI {})",
                v.runtime_name, v.runtime_version, v.runtime_api_version
            );
            0
        }),
        CriCmd::RunPod(a) => run_pod(&cri, &a),
    };
    r.unwrap_or_else(|e| {
        eprintln!("joeyctl: error: {e}");
        EXIT_RUNTIME
    })
}

/// A fresh directory for the pod's container logs, removed on drop.
struct LogDir(PathBuf);

impl LogDir {
    fn create(name: &str) -> Result<LogDir, CriCmdError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p =
            std::env::temp_dir().join(format!("joeyctl-cri-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&p).map_err(|source| CriCmdError::LogDir {
            path: p.display().to_string(),
            source,
        })?;
        Ok(LogDir(p))
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Prints what the CRI log file gained since the last call (complete lines only).
struct LogFollower {
    path: PathBuf,
    done: usize,
}

impl LogFollower {
    fn poll(&mut self) {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return;
        };
        let Some(end) = text.rfind('\n').map(|i| i + 1) else {
            return;
        };
        if end <= self.done {
            return;
        }
        let logs = parse_log(&text[self.done..end]);
        self.done = end;
        let _ = std::io::stdout().write_all(logs.stdout.as_bytes());
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().write_all(logs.stderr.as_bytes());
    }
}

/// Milliseconds since `t`.
fn ms(t: Instant) -> u128 {
    t.elapsed().as_millis()
}

fn run_pod(cri: &CriClient, a: &RunPodArgs) -> Result<i32, CriCmdError> {
    let t0 = Instant::now();
    let logs = LogDir::create(&a.name)?;
    let pod_cfg = pod_config(&a.name, &format!("joeyctl-{}", std::process::id()), &logs.0);
    let pod = cri.run_pod(&pod_cfg, &a.runtime)?;
    let run_pod_ms = ms(t0);
    let r = run_in_pod(cri, a, &pod, &pod_cfg, &logs.0, (t0, run_pod_ms));
    // The pod goes whatever happened to the container.
    let stopped = cri.stop_pod(&pod).and_then(|()| cri.remove_pod(&pod));
    if a.timings {
        eprintln!("timings: runtime={} total_ms={}", a.runtime, ms(t0));
    }
    let code = r?;
    stopped?;
    Ok(code)
}

fn run_in_pod(
    cri: &CriClient,
    a: &RunPodArgs,
    pod: &str,
    pod_cfg: &api::PodSandboxConfig,
    logs: &Path,
    (t0, run_pod_ms): (Instant, u128),
) -> Result<i32, CriCmdError> {
    let argv: Vec<&str> = a.command.iter().map(String::as_str).collect();
    let cfg = container_config("main", &a.image, &argv);
    let t1 = Instant::now();
    let id = cri.create_container(pod, &cfg, pod_cfg)?;
    let create_ms = ms(t1);
    let t2 = Instant::now();
    cri.start_container(&id)?;
    if a.timings {
        eprintln!(
            "timings: runtime={} run_pod_sandbox_ms={run_pod_ms} create_container_ms={create_ms} start_container_ms={} first_running_ms={}",
            a.runtime,
            ms(t2),
            ms(t0)
        );
    }
    let mut follow = LogFollower {
        path: logs.join(&cfg.log_path),
        done: 0,
    };
    let timeout = Duration::from_secs(a.timeout);
    let t0 = Instant::now();
    loop {
        follow.poll();
        let s = cri.container_status(&id)?;
        if container_state(&s) == api::ContainerState::ContainerExited {
            follow.poll();
            return Ok(s.exit_code);
        }
        if t0.elapsed() > timeout {
            return Err(CriCmdError::Timeout(timeout));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follower_prints_only_complete_new_lines() {
        let d = LogDir::create("unit").expect("log dir");
        let p = d.0.join("main.log");
        let mut f = LogFollower {
            path: p.clone(),
            done: 0,
        };
        f.poll();
        assert_eq!(f.done, 0);
        std::fs::write(
            &p,
            "2026-12-07T08:00:00Z stdout F one\n2026-12-07T08:00:01Z stdout P tw",
        )
        .unwrap();
        f.poll();
        assert_eq!(f.done, "2026-12-07T08:00:00Z stdout F one\n".len());
        let dir = d.0.clone();
        drop(d);
        assert!(!dir.exists());
    }

    #[test]
    fn missing_socket_is_bad_input() {
        let args = CriArgs {
            address: Some(PathBuf::from("/nonexistent/cri.sock")),
            cmd: CriCmd::Version,
        };
        assert_eq!(run(args), EXIT_BAD_INPUT);
    }
}
