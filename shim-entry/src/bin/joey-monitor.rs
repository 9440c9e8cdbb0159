//! `joey-monitor`: one Prometheus endpoint for every sandbox on this host.
//!
//! Finds the live sandboxes under `runtime.state_dir` (directories with a `metrics.sock`),
//! scrapes them concurrently, each within the scrape timeout (`metrics.monitor_scrape_timeout_ms`
//! or `--scrape-timeout-ms`), and serves the union on
//! `GET /metrics` with a `sandbox_id` label on every sample, plus its own `joey_monitor_*`
//! metrics. A sandbox that does not answer in time is skipped and counted; it never stalls the
//! scrape. See docs/metrics.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use joey_observability::http::{self, Handler, Response};
use joey_observability::monitor::Monitor;
use joey_shim::logging;

/// Exit code for bad input (arguments, config), as joeyctl's.
const EXIT_BAD_INPUT: i32 = 2;
/// Exit code when serving fails.
const EXIT_RUNTIME: i32 = 1;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;

#[derive(Debug, thiserror::Error)]
enum MonitorMainError {
    #[error("config: {0}")]
    Config(String),
    #[error("--scrape-timeout-ms: {0}")]
    BadTimeout(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] joey_observability::monitor::MonitorError),
}

#[derive(Parser, Debug)]
#[command(name = "joey-monitor", version, about = "Prometheus endpoint for every joey sandbox on this host")]
struct Args {
    /// Config file (default: $JOEY_CONFIG, else /etc/joey/config.toml if present, else built-in defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to serve /metrics on (default: `metrics.monitor_listen`, 127.0.0.1:8090).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// How long to wait for each sandbox per scrape, 1..=60000 (default:
    /// `metrics.monitor_scrape_timeout_ms`, 1000).
    #[arg(long)]
    scrape_timeout_ms: Option<u64>,
    /// Log at least at info level to stderr (default: `runtime.log_level`).
    #[arg(short, long)]
    verbose: bool,
}

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => EXIT_BAD_INPUT,
            };
            std::process::exit(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("joey-monitor: error: tokio runtime: {e}");
            std::process::exit(EXIT_RUNTIME);
        }
    };
    let code = match runtime.block_on(run(args)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("joey-monitor: error: {e}");
            match e {
                MonitorMainError::Config(_) | MonitorMainError::BadTimeout(_) => EXIT_BAD_INPUT,
                _ => EXIT_RUNTIME,
            }
        }
    };
    std::process::exit(code);
}


async fn run(args: Args) -> Result<(), MonitorMainError> {
    if let Some(ms) = args.scrape_timeout_ms {
        joey_config::check_metrics_timeout_ms(ms).map_err(MonitorMainError::BadTimeout)?;
    }
    let (config, _origin) =
        joey_config::Config::load(args.config.as_deref()).map_err(|e| MonitorMainError::Config(e.to_string()))?;
    let level = config.runtime.log_level.as_str();
    logging::init_stderr(if args.verbose { logging::at_least(level, "info") } else { level });
    let state_dir = config.runtime.state_dir.clone();
    let scrape_timeout = args
        .scrape_timeout_ms
        .map(Duration::from_millis)
        .unwrap_or_else(|| config.metrics.monitor_scrape_timeout());
    let listen = match args.listen {
        Some(a) => a,
        // Validated when the config was loaded.
        None => config.metrics.monitor_listen_addr().map_err(MonitorMainError::Config)?,
    };
    let monitor = Arc::new(Monitor::new(state_dir.clone(), scrape_timeout)?);
    let handler: Handler = Arc::new(move |path: String| {
        let monitor = monitor.clone();
        Box::pin(async move {
            match path.as_str() {
                "/metrics" => match monitor.collect().await {
                    Ok(body) => Response::ok_metrics(body),
                    Err(e) => Response::text(500, format!("{e}\n")),
                },
                "/" => Response::text(200, "joey-monitor: see /metrics\n"),
                _ => Response::text(404, "not found; try /metrics\n"),
            }
        })
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| MonitorMainError::Io {
            what: format!("listening on {listen}"),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| MonitorMainError::Io {
        what: "local address".into(),
        source,
    })?;
    eprintln!("joey-monitor: serving http://{local}/metrics for sandboxes under {}", state_dir.display());
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let serve = async {
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else { return };
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let h = handler.clone();
                    tokio::spawn(async move {
                        if let Err(e) = http::serve_connection(stream, h).await {
                            tracing::debug!(%peer, error = %e, "request failed");
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = joey_shim::signals::first_termination_signal(false) => tracing::info!("terminating"),
    }
    Ok(())
}
