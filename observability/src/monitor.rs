//! `joey-monitor`'s collection: find the live sandboxes under the state directory (those with
//! a `metrics.sock`), scrape them concurrently, each within a deadline, and merge their
//! expositions with a `sandbox_id` label on every sample, followed by the monitor's own
//! `joey_monitor_*` metrics. A sandbox that does not answer in time is skipped and counted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prometheus::{Encoder as _, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::expo::Merger;
use crate::http::{self, HttpError};

/// The per-sandbox socket's file name in `<state_dir>/<id>/`.
pub const METRICS_SOCKET: &str = "metrics.sock";
/// The label the monitor adds to every sandbox sample.
pub const SANDBOX_LABEL: &str = "sandbox_id";
/// At most this many sandboxes are scraped per request (the rest are counted as skipped).
pub const MAX_SANDBOXES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("prometheus: {0}")]
    Prometheus(#[from] prometheus::Error),
    #[error("encoding the exposition: {0}")]
    Encode(String),
}

/// Whether a directory name can be a sandbox id (and so a label value we pass on).
pub fn valid_sandbox_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !id.starts_with('.')
}

/// Sandboxes under `state_dir`: (id, socket path), sorted by id.
pub async fn discover(state_dir: &Path) -> Vec<(String, PathBuf)> {
    use std::os::unix::fs::FileTypeExt as _;
    let mut out = Vec::new();
    let Ok(mut rd) = tokio::fs::read_dir(state_dir).await else {
        return out;
    };
    while let Ok(Some(e)) = rd.next_entry().await {
        let Some(id) = e.file_name().to_str().map(str::to_string) else { continue };
        if !valid_sandbox_id(&id) {
            continue;
        }
        let sock = e.path().join(METRICS_SOCKET);
        if let Ok(m) = tokio::fs::symlink_metadata(&sock).await {
            if m.file_type().is_socket() {
                out.push((id, sock));
            }
        }
        if out.len() >= MAX_SANDBOXES {
            break;
        }
    }
    out.sort();
    out
}

/// The monitor's own metrics.
pub struct Monitor {
    state_dir: PathBuf,
    scrape_timeout: Duration,
    registry: Registry,
    sandboxes: IntGauge,
    scrapes: IntCounter,
    timeouts: IntCounter,
    errors: IntCounter,
    duration: Histogram,
    last_up: IntGaugeVec,
}

impl Monitor {
    pub fn new(state_dir: PathBuf, scrape_timeout: Duration) -> Result<Monitor, MonitorError> {
        let registry = Registry::new();
        let sandboxes = IntGauge::new(
            "joey_monitor_sandboxes",
            "Sandboxes with a metrics socket found at the last scrape.",
        )?;
        let scrapes = IntCounter::new("joey_monitor_scrapes_total", "Scrapes of the monitor's /metrics.")?;
        let timeouts = IntCounter::new(
            "joey_monitor_scrape_timeouts_total",
            "Sandbox scrapes skipped because the sandbox did not answer within the scrape timeout.",
        )?;
        let errors = IntCounter::new(
            "joey_monitor_scrape_errors_total",
            "Sandbox scrapes skipped because of an error (refused connection, bad answer).",
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "joey_monitor_scrape_duration_seconds",
                "Time to collect all sandboxes for one scrape of the monitor.",
            )
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        let last_up = IntGaugeVec::new(
            Opts::new(
                "joey_monitor_sandbox_up",
                "Whether the sandbox answered at the last scrape (1) or was skipped (0).",
            ),
            &[SANDBOX_LABEL],
        )?;
        for c in [
            Box::new(sandboxes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(scrapes.clone()),
            Box::new(timeouts.clone()),
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(last_up.clone()),
        ] {
            registry.register(c)?;
        }
        Ok(Monitor {
            state_dir,
            scrape_timeout,
            registry,
            sandboxes,
            scrapes,
            timeouts,
            errors,
            duration,
            last_up,
        })
    }

    /// One scrape: every sandbox concurrently (each bounded by the scrape timeout), merged,
    /// then the monitor's own metrics. Never takes much longer than the scrape timeout.
    pub async fn collect(&self) -> Result<String, MonitorError> {
        let t0 = Instant::now();
        self.scrapes.inc();
        let found = discover(&self.state_dir).await;
        self.sandboxes.set(found.len() as i64);
        let timeout = self.scrape_timeout;
        let mut tasks = tokio::task::JoinSet::new();
        for (id, sock) in found {
            tasks.spawn(async move {
                let r = http::get_unix(&sock, "/metrics", timeout).await;
                (id, r)
            });
        }
        // Each task bounds itself; this outer deadline only guards against a stuck task.
        let deadline = tokio::time::Instant::now() + timeout + Duration::from_millis(250);
        let mut results = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(Ok(r))) => results.push(r),
                Ok(Some(Err(e))) => tracing::warn!(error = %e, "a sandbox scrape task failed"),
                Ok(None) => break,
                Err(_) => {
                    let left = tasks.len();
                    tasks.abort_all();
                    for _ in 0..left {
                        self.timeouts.inc();
                    }
                    break;
                }
            }
        }
        results.sort_by(|a, b| a.0.cmp(&b.0));
        let mut merger = Merger::new();
        self.last_up.reset();
        for (id, r) in results {
            let up = match r {
                Ok(body) => match merger.add_text(&body, Some((SANDBOX_LABEL, &id))) {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(sandbox = %id, error = %e, "bad exposition from sandbox");
                        self.errors.inc();
                        false
                    }
                },
                Err(HttpError::Timeout(_)) => {
                    tracing::warn!(sandbox = %id, ?timeout, "sandbox did not answer in time; skipped");
                    self.timeouts.inc();
                    false
                }
                Err(e) => {
                    tracing::debug!(sandbox = %id, error = %e, "sandbox scrape failed; skipped");
                    self.errors.inc();
                    false
                }
            };
            self.last_up.with_label_values(&[id.as_str()]).set(up as i64);
        }
        self.duration.observe(t0.elapsed().as_secs_f64());
        let mut own = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut own)
            .map_err(|e| MonitorError::Encode(e.to_string()))?;
        let own = String::from_utf8(own).map_err(|e| MonitorError::Encode(e.to_string()))?;
        merger
            .add_text(&own, None)
            .map_err(|e| MonitorError::Encode(e.to_string()))?;
        Ok(merger.render())
    }

    /// The monitor's own families with one sample each (for the documentation test).
    #[cfg(test)]
    pub(crate) fn render_own_for_docs() -> String {
        let m = Monitor::new(PathBuf::from("/nonexistent"), Duration::from_secs(1)).unwrap();
        m.last_up.with_label_values(&["x"]).set(1);
        let mut out = Vec::new();
        TextEncoder::new().encode(&m.registry.gather(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn sandbox_ids() {
        assert!(valid_sandbox_id("0123abcd"));
        assert!(valid_sandbox_id("fake-id_1.x"));
        assert!(!valid_sandbox_id(""));
        assert!(!valid_sandbox_id(".hidden"));
        assert!(!valid_sandbox_id("a\"b"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn merges_live_sandboxes_and_skips_a_hung_one() {
        let dir = std::env::temp_dir().join(format!("joey-monitor-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for id in ["good", "hung", "stale", "nosock"] {
            std::fs::create_dir_all(dir.join(id)).unwrap();
        }
        let handler: http::Handler = Arc::new(|_path: String| {
            Box::pin(async { http::Response::ok_metrics("# HELP joey_x A.\n# TYPE joey_x gauge\njoey_x 1\n".into()) })
        });
        let _good = http::serve_unix(&dir.join("good").join(METRICS_SOCKET), handler).unwrap();
        let hung = tokio::net::UnixListener::bind(dir.join("hung").join(METRICS_SOCKET)).unwrap();
        let hold = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok(c) = hung.accept().await {
                conns.push(c);
            }
        });
        // A socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(dir.join("stale").join(METRICS_SOCKET)).unwrap());

        let m = Monitor::new(dir.clone(), Duration::from_millis(300)).unwrap();
        let t0 = Instant::now();
        let out = m.collect().await.unwrap();
        assert!(t0.elapsed() < Duration::from_millis(1300), "{:?}", t0.elapsed());
        assert!(out.contains("joey_x{sandbox_id=\"good\"} 1"), "{out}");
        assert!(out.contains("joey_monitor_sandboxes 3"), "{out}");
        assert!(out.contains("joey_monitor_scrape_timeouts_total 1"), "{out}");
        assert!(out.contains("joey_monitor_scrape_errors_total 1"), "{out}");
        assert!(out.contains("joey_monitor_sandbox_up{sandbox_id=\"hung\"} 0"), "{out}");
        assert!(out.contains("joey_monitor_sandbox_up{sandbox_id=\"good\"} 1"), "{out}");
        hold.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
