//! joey guest agent.
//!
//! Runs as PID 1 (`/init`) of the sandbox microVM and serves the ttrpc `AgentService` on the
//! vsock port the host put on the kernel command line (`joey.agent_port=<N>`, from the host's
//! `agent.vsock_port`; 1024 without it). For host-side testing it can also run as an ordinary
//! process:
//! `joey-agent --listen unix:///path/agent.sock` (no mounts; DestroySandbox exits the process).

#[macro_use]
mod log;
mod cgroup;
mod container;
mod exec;
mod failpoints;
mod init;
mod metrics;
mod network;
mod process;
mod reaper;
mod seccomp;
mod service;
mod spec;
mod steps;
mod syscalls;

use std::sync::Arc;
use std::time::Duration;

use joey_agent_protocol::{agent_ttrpc, AGENT_PORT_PARAM, AGENT_VSOCK_PORT};

use crate::reaper::ProcTable;
use crate::service::{Agent, ShutdownMode};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}")]
    Usage(String),
    #[error("building the tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: ttrpc::Error,
    },
    #[error("removing stale socket {path}: {source}")]
    StaleSocket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the ttrpc server: {0}")]
    Start(#[source] ttrpc::Error),
    #[error(transparent)]
    Reaper(#[from] reaper::ReaperError),
}

const USAGE: &str = "usage: joey-agent [--listen ADDR]
  ADDR: vsock://CID:PORT (default vsock://-1:1024) or unix:///path/to/socket
As PID 1 the agent also mounts the basic filesystems, reaps orphans and reboots on DestroySandbox;
without --listen it then listens on the vsock port named by joey.agent_port=<N> on the kernel
command line (default 1024).";

#[derive(Debug, PartialEq, Eq)]
struct Options {
    /// `--listen`; `None`: the default vsock address (see [`listen_addr`]).
    listen: Option<String>,
}

enum Parsed {
    Run(Options),
    Exit(String),
}

fn vsock_listen(port: u32) -> String {
    format!("vsock://-1:{port}")
}

/// The agent's vsock port named on the kernel command line `cmdline` (`joey.agent_port=<N>`;
/// the last one counts, as for kernel parameters); `None` when it names none.
fn agent_port_from_cmdline(cmdline: &str) -> Result<Option<u32>, String> {
    let Some(v) = cmdline
        .split_whitespace()
        .rev()
        .find_map(|p| p.strip_prefix(AGENT_PORT_PARAM)?.strip_prefix('='))
    else {
        return Ok(None);
    };
    match v.parse::<u32>() {
        // 0 is reserved for the hypervisor, u32::MAX is VMADDR_PORT_ANY.
        Ok(p) if p != 0 && p != u32::MAX => Ok(Some(p)),
        _ => Err(format!(
            "invalid {AGENT_PORT_PARAM}={v:?} on the kernel command line (expected 1..=4294967294)"
        )),
    }
}

/// Where to listen: `--listen`, else (as PID 1) the port named on the kernel command line
/// `cmdline`, else vsock port 1024.
fn listen_addr(opts: &Options, cmdline: Option<&str>) -> String {
    if let Some(l) = &opts.listen {
        return l.clone();
    }
    let port = match cmdline.map(agent_port_from_cmdline) {
        Some(Ok(Some(p))) => p,
        Some(Err(e)) => {
            agent_log!("{e}; listening on port {AGENT_VSOCK_PORT}");
            AGENT_VSOCK_PORT
        }
        Some(Ok(None)) | None => AGENT_VSOCK_PORT,
    };
    vsock_listen(port)
}

/// Parses arguments. As PID 1, unknown arguments (the kernel passes unrecognised command-line
/// parameters to init) are ignored instead of rejected.
fn parse_args<I: IntoIterator<Item = String>>(args: I, pid1: bool) -> Result<Parsed, MainError> {
    let mut listen = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => match args.next() {
                Some(v) => listen = Some(v),
                None => return Err(MainError::Usage("--listen needs an address".into())),
            },
            s if s.starts_with("--listen=") => listen = Some(s["--listen=".len()..].to_string()),
            "-h" | "--help" if !pid1 => return Ok(Parsed::Exit(USAGE.to_string())),
            "-V" | "--version" if !pid1 => {
                return Ok(Parsed::Exit(format!(
                    "joey-agent {}",
                    env!("CARGO_PKG_VERSION")
                )))
            }
            other if !pid1 => {
                return Err(MainError::Usage(format!(
                    "unknown argument {other:?}\n{USAGE}"
                )))
            }
            _ => {}
        }
    }
    Ok(Parsed::Run(Options { listen }))
}

/// The line printed once the server accepts connections.
fn ready_line(addr: &str) -> String {
    match addr.strip_prefix("vsock://") {
        Some(rest) => {
            let port = rest.rsplit(':').next().unwrap_or(rest);
            format!("ready on vsock port {port}")
        }
        None => format!("ready on {addr}"),
    }
}

/// Removes a leftover socket file so that bind succeeds (only sockets, nothing else).
fn remove_stale_socket(addr: &str) -> Result<(), MainError> {
    use std::os::unix::fs::FileTypeExt;
    let Some(path) = addr.strip_prefix("unix://") else {
        return Ok(());
    };
    if path.starts_with('@') {
        return Ok(()); // abstract socket
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| MainError::StaleSocket {
                path: path.to_string(),
                source,
            })
        }
        _ => Ok(()),
    }
}

async fn serve(agent: Arc<Agent>, addr: &str) -> Result<(), MainError> {
    remove_stale_socket(addr)?;
    let service = agent_ttrpc::create_agent_service(agent);
    let mut server = ttrpc::r#async::Server::new()
        .bind(addr)
        .map_err(|source| MainError::Listen {
            addr: addr.to_string(),
            source,
        })?
        .register_service(service);
    server.start().await.map_err(MainError::Start)?;
    agent_log!("{}", ready_line(addr));
    // The server runs on spawned tasks; this task only keeps it (and the runtime) alive.
    std::future::pending::<()>().await;
    Ok(())
}

fn run(listen: String, pid1: bool) -> Result<(), MainError> {
    let table = Arc::new(ProcTable::new());
    reaper::start_reaper(table.clone())?;
    let shutdown = if pid1 {
        ShutdownMode::Reboot
    } else {
        ShutdownMode::Exit
    };
    let agent = Arc::new(Agent::new(table, shutdown));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agent-worker")
        .enable_all()
        .build()
        .map_err(MainError::Runtime)?;
    runtime.block_on(async {
        agent.start_oom_watcher();
        let mut attempt = 0u32;
        loop {
            match serve(agent.clone(), &listen).await {
                // In PID 1 mode the vsock device may not be usable yet; retry for a while.
                Err(e @ MainError::Listen { .. }) if pid1 && attempt < 10 => {
                    attempt += 1;
                    agent_log!("{e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                other => return other,
            }
        }
    })
}

fn main() {
    let pid1 = std::process::id() == 1;
    // Before any thread exists, so that every thread inherits the blocked SIGCHLD.
    if let Err(e) = reaper::block_sigchld() {
        agent_log!("{e}");
    }
    let opts = match parse_args(std::env::args().skip(1), pid1) {
        Ok(Parsed::Run(opts)) => opts,
        Ok(Parsed::Exit(text)) => {
            println!("{text}");
            return;
        }
        Err(e) => {
            agent_log!("{e}");
            std::process::exit(2);
        }
    };
    if pid1 {
        init::setup_pid1();
        agent_log!("started as PID 1, version {}", env!("CARGO_PKG_VERSION"));
    } else if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        // Orphans of our processes then get reaped by us, as they would be by PID 1.
        agent_log!("cannot become child subreaper: {e}");
    }
    // /proc is mounted by now (setup_pid1).
    let cmdline = pid1
        .then(|| std::fs::read_to_string("/proc/cmdline"))
        .and_then(|r| r.map_err(|e| agent_log!("reading /proc/cmdline: {e}")).ok());
    if let Some(c) = &cmdline {
        failpoints::setup(c);
    }
    let result = run(listen_addr(&opts, cmdline.as_deref()), pid1);
    if let Err(e) = &result {
        agent_log!("fatal: {e}");
    }
    if pid1 {
        // PID 1 must never exit (the kernel would panic); end the VM instead.
        agent_log!("agent stopped serving; rebooting");
        init::reboot_now();
    }
    if result.is_err() {
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn run_opts(v: &[&str], pid1: bool) -> Options {
        match parse_args(args(v), pid1) {
            Ok(Parsed::Run(o)) => o,
            Ok(Parsed::Exit(t)) => panic!("unexpected exit: {t}"),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    #[test]
    fn default_is_vsock_1024() {
        let o = run_opts(&[], false);
        assert_eq!(o.listen, None);
        assert_eq!(listen_addr(&o, None), "vsock://-1:1024");
        assert_eq!(ready_line("vsock://-1:1024"), "ready on vsock port 1024");
    }

    #[test]
    fn listen_forms() {
        assert_eq!(
            run_opts(&["--listen", "unix:///tmp/a.sock"], false)
                .listen
                .as_deref(),
            Some("unix:///tmp/a.sock")
        );
        assert_eq!(
            run_opts(&["--listen=unix:///tmp/b.sock"], false)
                .listen
                .as_deref(),
            Some("unix:///tmp/b.sock")
        );
        assert!(parse_args(args(&["--listen"]), false).is_err());
        assert_eq!(
            ready_line("unix:///tmp/a.sock"),
            "ready on unix:///tmp/a.sock"
        );
    }

    #[test]
    fn unknown_args_rejected_unless_pid1() {
        assert!(parse_args(args(&["console=ttyS0"]), false).is_err());
        assert_eq!(run_opts(&["console=ttyS0", "quiet"], true).listen, None);
    }

    #[test]
    fn agent_port_on_the_kernel_command_line() {
        let base = "console=ttyS0 reboot=t panic=-1 quiet";
        assert_eq!(agent_port_from_cmdline(base), Ok(None));
        assert_eq!(agent_port_from_cmdline(""), Ok(None));
        assert_eq!(
            agent_port_from_cmdline(&format!("{base} joey.agent_port=2048\n")),
            Ok(Some(2048))
        );
        // The last one counts; look-alike names do not.
        assert_eq!(
            agent_port_from_cmdline("joey.agent_port=9 x.joey.agent_port=7 joey.agent_port=4096"),
            Ok(Some(4096))
        );
        assert_eq!(
            agent_port_from_cmdline("joey.agent_portx=5 joey.agent_port"),
            Ok(None)
        );
        for bad in [
            "joey.agent_port=",
            "joey.agent_port=0",
            "joey.agent_port=4294967295",
            "joey.agent_port=-1",
            "joey.agent_port=12ab",
        ] {
            let e = agent_port_from_cmdline(bad).unwrap_err();
            assert!(e.starts_with("invalid joey.agent_port="), "{e}");
        }
    }

    #[test]
    fn listen_address_follows_the_kernel_command_line() {
        let pid1 = run_opts(&[], true);
        assert_eq!(
            listen_addr(&pid1, Some("quiet joey.agent_port=2048")),
            "vsock://-1:2048"
        );
        assert_eq!(listen_addr(&pid1, Some("quiet")), "vsock://-1:1024");
        // A bad value falls back to the default port; --listen always wins.
        assert_eq!(
            listen_addr(&pid1, Some("joey.agent_port=0")),
            "vsock://-1:1024"
        );
        let explicit = run_opts(&["--listen", "vsock://-1:5000"], true);
        assert_eq!(
            listen_addr(&explicit, Some("joey.agent_port=2048")),
            "vsock://-1:5000"
        );
    }
}
