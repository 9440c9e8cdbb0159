//! `joeyctl run`: one command in a fresh sandbox microVM.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use actix::prelude::*;
use joey_actors::sandbox::{
    CloseStdin, CreateContainer, ExecProcess, SandboxActor, SandboxError, SandboxStarted, StartSandbox, StopSandbox,
    WaitProcess, WriteStdin,
};
use joey_actors::{AgentError, HypervisorActor, RpcCode};
use joey_agent_protocol::agent::ExecProcessRequest;

use crate::shim::stdio::{pump_output, PumpOptions, Writer};

use super::{EXIT_BAD_INPUT, EXIT_CANNOT_EXEC, EXIT_NOT_FOUND, EXIT_RUNTIME};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Config file (default: $JOEY_CONFIG, else /etc/joey/config.toml if present, else built-in defaults).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print timings (ms) and the hypervisor/accelerator used to stderr when done.
    #[arg(long)]
    pub timings: bool,
    /// Log at least at info level to stderr (default: `runtime.log_level`).
    #[arg(short, long)]
    pub verbose: bool,
    /// Run CMD in a container whose root filesystem is this host directory (shared with the
    /// guest over virtio-fs); without it CMD runs in the guest's own filesystem.
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// With --rootfs: mount the container's root filesystem read-only.
    #[arg(long, requires = "rootfs")]
    pub read_only: bool,
    /// With --rootfs: the container's hostname (default: the sandbox id).
    #[arg(long, requires = "rootfs")]
    pub hostname: Option<String>,
    /// Carry this network namespace's interfaces (e.g. `/var/run/netns/NAME`, made by CNI or
    /// `ip netns add` + veth) into the VM: the guest gets their MACs, addresses, MTUs and routes.
    /// Without it the guest has only its loopback.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// The command and its arguments, after `--`.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

const EXEC_ID: &str = "main";

/// What to start in the sandbox.
#[derive(Debug, Clone)]
enum Target {
    /// A process in the guest's own filesystem (exec id [`EXEC_ID`]).
    Guest,
    /// A container (exec id = container id = sandbox id).
    Container {
        id: String,
        rootfs: PathBuf,
        read_only: bool,
        hostname: Option<String>,
    },
}

/// Runs the subcommand; returns the exit code.
pub fn run(args: RunArgs) -> i32 {
    let (config, origin) = match super::load_config(args.config.as_deref()) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let level = config.runtime.log_level.as_str();
    crate::logging::init_stderr(if args.verbose { crate::logging::at_least(level, "info") } else { level });
    if let Err(e) = crate::failpoints::setup(&config.debug) {
        super::print_error(e);
        return EXIT_BAD_INPUT;
    }
    // Before any other thread: they all inherit the runtime filter.
    if let Err(e) = crate::security::install_seccomp(config.security.seccomp) {
        eprintln!("joeyctl: error: {e}");
        return super::EXIT_RUNTIME;
    }
    let sys = actix::System::new();
    let code = sys.block_on(run_async(args, config, origin));
    let _ = std::io::stdout().flush();
    code
}

/// Reads our stdin on a dedicated OS thread (stdin reads cannot be cancelled) and hands the
/// chunks to async code through a bounded channel. `None` marks EOF.
fn spawn_stdin_reader() -> tokio::sync::mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let _ = std::thread::Builder::new()
        .name("joeyctl-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.blocking_send(None);
                        return;
                    }
                    Ok(n) => {
                        if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    rx
}


fn report_error(e: &SandboxError) -> i32 {
    super::print_error(e);
    if e.is_bad_input() {
        EXIT_BAD_INPUT
    } else {
        EXIT_RUNTIME
    }
}

enum Outcome {
    Exited(i32),
    Interrupted(i32),
    Failed(i32),
}

async fn run_async(args: RunArgs, config: joey_config::Config, origin: String) -> i32 {
    let id = joey_actors::new_sandbox_id();
    let target = match &args.rootfs {
        None => Target::Guest,
        Some(dir) => match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => Target::Container {
                id: id.clone(),
                // Absolute, so that the bind mount does not depend on our cwd.
                rootfs: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()),
                read_only: args.read_only,
                hostname: args.hostname.clone(),
            },
            _ => {
                eprintln!("joeyctl: error: --rootfs {}: not a directory", dir.display());
                return EXIT_BAD_INPUT;
            }
        },
    };
    // Sandboxes of earlier runs whose joeyctl was killed before its teardown (ctl/owner.rs),
    // then our own claim, held until our sandbox is stopped.
    let state_root = config.runtime.state_dir.clone();
    let root = state_root.clone();
    let _ = tokio::task::spawn_blocking(move || super::owner::clean_dead(&root)).await;
    let owner = match super::owner::OwnerLock::claim(&state_root, &id, args.netns.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            super::print_error(e);
            return EXIT_RUNTIME;
        }
    };
    let hv = HypervisorActor::new().start();
    let sb = SandboxActor::new(id, config, origin, hv).start();

    let signalled = crate::signals::first_termination_signal(true);
    tokio::pin!(signalled);

    // Boot. StartSandbox is atomic in the actor; a signal meanwhile is honoured right after.
    let start = sb.send(StartSandbox {
        netns: args.netns.clone(),
    });
    let started: SandboxStarted = tokio::select! {
        r = start => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return report_error(&e),
            Err(e) => { super::print_error(e); return EXIT_RUNTIME; }
        },
        code = &mut signalled => {
            let _ = sb.send(StopSandbox).await;
            return code;
        }
    };

    // GET /metrics on <state_dir>/<id>/metrics.sock while the sandbox runs (see docs/metrics.md).
    let metrics_server = match joey_actors::sandbox::serve_metrics(&sb, &started.state_dir, started.metrics_reply_timeout) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "metrics endpoint unavailable");
            None
        }
    };

    let t_exec = Instant::now();
    let outcome = tokio::select! {
        o = run_process(&sb, args.command.clone(), target) => o,
        code = &mut signalled => Outcome::Interrupted(code),
    };
    let exec_to_exit = t_exec.elapsed();

    drop(metrics_server);
    let stopped = sb.send(StopSandbox).await;
    match &stopped {
        Ok(Ok(_)) => owner.release(),
        // What the failed teardown left is the next run's to clean (ctl/owner.rs).
        _ => owner.keep(),
    }
    let teardown = match &stopped {
        Ok(Ok(s)) => s.teardown,
        Ok(Err(e)) => {
            super::print_error(format_args!("teardown: {e}"));
            Duration::ZERO
        }
        Err(e) => {
            super::print_error(format_args!("teardown: {e}"));
            Duration::ZERO
        }
    };
    if args.timings {
        eprintln!(
            "joey timings: hypervisor={} accel={} vm_start_to_agent_ready_ms={} exec_to_exit_ms={} teardown_ms={}",
            started.backend,
            started.accel,
            started.vm_start_to_agent_ready.as_millis(),
            exec_to_exit.as_millis(),
            teardown.as_millis()
        );
        eprintln!("joey timings: hypervisor reason: {}", started.backend_reason);
        eprintln!("joey timings: accel reason: {}", started.accel_reason);
        eprintln!("joey timings: vm source={} ({})", started.source, started.source_detail);
    }
    match outcome {
        Outcome::Exited(c) | Outcome::Interrupted(c) | Outcome::Failed(c) => c,
    }
}

async fn run_process(sb: &Addr<SandboxActor>, argv: Vec<String>, target: Target) -> Outcome {
    let (exec_id, started) = match target {
        Target::Guest => {
            let req = ExecProcessRequest {
                exec_id: EXEC_ID.into(),
                argv,
                ..Default::default()
            };
            (EXEC_ID.to_string(), sb.send(ExecProcess(req)).await)
        }
        Target::Container {
            id,
            rootfs,
            read_only,
            hostname,
        } => {
            let msg = CreateContainer {
                container_id: id.clone(),
                rootfs,
                read_only,
                argv,
                env: Vec::new(),
                cwd: String::new(),
                terminal: false,
                hostname: hostname.unwrap_or_default(),
                oci_spec_json: String::new(),
                volumes: Vec::new(),
            };
            (id, sb.send(msg).await)
        }
    };
    match started {
        Ok(Ok(_pid)) => {}
        Ok(Err(e)) => {
            super::print_error(&e);
            let code = match &e {
                SandboxError::Agent(AgentError::Rpc { code: RpcCode::NotFound, .. }) => EXIT_NOT_FOUND,
                SandboxError::Agent(AgentError::Rpc {
                    code: RpcCode::PermissionDenied | RpcCode::InvalidArgument,
                    ..
                }) => EXIT_CANNOT_EXEC,
                _ => EXIT_RUNTIME,
            };
            return Outcome::Failed(code);
        }
        Err(e) => {
            super::print_error(e);
            return Outcome::Failed(EXIT_RUNTIME);
        }
    }

    let pump = |stderr: bool| {
        let out: Writer = if stderr {
            Box::new(tokio::io::stderr())
        } else {
            Box::new(tokio::io::stdout())
        };
        pump_output(sb, &exec_id, stderr, Some(out), PumpOptions::TERMINAL)
    };
    let stdin_fwd = {
        let sb = sb.clone();
        let exec_id = exec_id.clone();
        async move {
            let mut rx = spawn_stdin_reader();
            while let Some(Some(chunk)) = rx.recv().await {
                match sb
                    .send(WriteStdin {
                        exec_id: exec_id.clone(),
                        data: chunk,
                    })
                    .await
                {
                    Ok(Ok(_)) => {}
                    // The process stopped reading (exited or closed stdin): stop forwarding.
                    _ => return,
                }
            }
            let _ = sb.send(CloseStdin { exec_id }).await;
        }
    };
    let stdin_task = tokio::spawn(stdin_fwd);
    let outputs = async { tokio::join!(pump(false), pump(true)) };
    let wait = sb.send(WaitProcess { exec_id: exec_id.clone() });
    let (waited, (o1, o2)) = tokio::join!(wait, outputs);
    stdin_task.abort();
    for r in [o1, o2] {
        if let Err(e) = r {
            super::print_error(format_args!("output stream: {e}"));
            return Outcome::Failed(EXIT_RUNTIME);
        }
    }
    match waited {
        Ok(Ok(w)) => Outcome::Exited(w.status),
        Ok(Err(e)) => {
            super::print_error(e);
            Outcome::Failed(EXIT_RUNTIME)
        }
        Err(e) => {
            super::print_error(e);
            Outcome::Failed(EXIT_RUNTIME)
        }
    }
}
