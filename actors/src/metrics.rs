//! One scrape of a sandbox's metrics endpoint (docs/metrics.md), kept out of the Sandbox actor.
//!
//! The endpoint asks the Sandbox actor for [`ScrapeSources`] (a cheap, synchronous answer:
//! the registry, the agent client, the Hypervisor actor's address, the configured agent
//! timeout), then scrapes without the actor: the guest metrics from the agent (bounded by
//! `metrics.agent_timeout_ms`), the device and vCPU counters from the Hypervisor actor (bounded
//! by [`VM_COUNTERS_TIMEOUT`]; they include the virtio-fs device's), and the process stats on
//! the blocking pool. Task RPCs never wait on metrics, and a busy actor only costs the reply timeout (`metrics.agent_timeout_ms` + 300 ms; then 503).

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use joey_agent_protocol::agent;
use joey_observability::http::{serve_unix, HttpError, Response, UnixServer};
use joey_observability::{ContainerSample, GuestSample, HypervisorCounters, MetricsError, SandboxMetrics};

use crate::agent_client::AgentClient;
use crate::hypervisor::counters::GetVmCounters;
use crate::hypervisor::HypervisorActor;
use crate::sandbox::{GetMetrics, SandboxActor};

/// How long a scrape waits for the Hypervisor actor's counters (busy while the VM starts or
/// stops); then the device and vCPU families are skipped.
pub const VM_COUNTERS_TIMEOUT: Duration = Duration::from_millis(100);

/// What a scrape needs from the Sandbox actor (the reply to [`GetMetrics`]).
pub struct ScrapeSources {
    pub metrics: Arc<SandboxMetrics>,
    /// The agent, while the sandbox runs.
    pub agent: Option<AgentClient>,
    pub hypervisor: Addr<HypervisorActor>,
    /// `metrics.agent_timeout_ms`.
    pub agent_timeout: Duration,
}

/// The guest sample of a `GetGuestMetrics` answer.
pub fn guest_sample(r: &agent::GuestMetricsResponse) -> GuestSample {
    GuestSample {
        mem_total_bytes: r.mem_total_bytes,
        mem_free_bytes: r.mem_free_bytes,
        mem_available_bytes: r.mem_available_bytes,
        mem_cached_bytes: r.mem_cached_bytes,
        load1: r.load1,
        load5: r.load5,
        load15: r.load15,
        cpu_seconds: vec![
            ("user", r.cpu_user_seconds),
            ("nice", r.cpu_nice_seconds),
            ("system", r.cpu_system_seconds),
            ("idle", r.cpu_idle_seconds),
            ("iowait", r.cpu_iowait_seconds),
            ("irq", r.cpu_irq_seconds),
            ("softirq", r.cpu_softirq_seconds),
            ("steal", r.cpu_steal_seconds),
        ],
        cpus: r.cpus,
        agent: joey_observability::procfs::ProcessStats {
            cpu_seconds: r.agent_cpu_seconds,
            resident_bytes: r.agent_resident_bytes,
            threads: u64::from(r.agent_threads),
            open_fds: u64::from(r.agent_open_fds),
        },
        containers: r
            .containers
            .iter()
            .map(|c| {
                let s = c.stats.as_ref();
                let get = |f: fn(&agent::ContainerStats) -> u64| s.map(f).unwrap_or(0);
                ContainerSample {
                    container_id: c.container_id.clone(),
                    memory_usage_bytes: get(|s| s.memory_usage_bytes),
                    memory_limit_bytes: get(|s| s.memory_limit_bytes),
                    cpu_usage_usec: get(|s| s.cpu_usage_usec),
                    pids: get(|s| s.pids_current),
                    oom_kills: get(|s| s.memory_events_oom_kill),
                }
            })
            .collect(),
    }
}

/// The device and vCPU counters of the sandbox's VM, or `None` when no VM runs or the
/// Hypervisor actor is busy.
async fn vm_counters(hypervisor: &Addr<HypervisorActor>) -> Option<HypervisorCounters> {
    match tokio::time::timeout(VM_COUNTERS_TIMEOUT, hypervisor.send(GetVmCounters)).await {
        Ok(Ok(Some(src))) => Some(src.read()),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "hypervisor actor gone; no device counters");
            None
        }
        Err(_) => {
            tracing::debug!("hypervisor actor busy; device counters skipped this scrape");
            None
        }
    }
}

/// One scrape: the exposition of the sandbox's metrics.
pub async fn scrape(s: ScrapeSources) -> Result<String, MetricsError> {
    let ScrapeSources {
        metrics,
        agent,
        hypervisor,
        agent_timeout,
    } = s;
    let guest = async {
        let a = agent?;
        // The RPC's own deadline is later, so that a slow agent shows as our timeout.
        match tokio::time::timeout(agent_timeout, a.guest_metrics(agent_timeout + Duration::from_secs(1))).await {
            Ok(Ok(r)) => Some(guest_sample(&r)),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "guest metrics unavailable");
                metrics.agent_failed();
                None
            }
            Err(_) => {
                tracing::debug!(timeout = ?agent_timeout, "agent did not answer GetGuestMetrics in time");
                metrics.agent_timed_out();
                None
            }
        }
    };
    let (guest, vm) = tokio::join!(guest, vm_counters(&hypervisor));
    let refresh = metrics.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || refresh.refresh_processes()).await {
        tracing::debug!(error = %e, "refreshing process metrics failed");
    }
    metrics.render(guest.as_ref(), vm.as_ref())
}

/// Serves `GET /metrics` for the sandbox `sb` on `<sandbox_state_dir>/metrics.sock` (see
/// [`crate::sandbox::serve_metrics`]).
/// `reply_timeout`: how long a scrape waits for the Sandbox actor to hand out the
/// [`ScrapeSources`] (it is busy while the sandbox starts or stops); then the answer is 503.
pub fn serve(
    sb: &Addr<SandboxActor>,
    sandbox_state_dir: &std::path::Path,
    reply_timeout: Duration,
) -> Result<UnixServer, HttpError> {
    let sb = sb.clone();
    let handler: joey_observability::http::Handler = Arc::new(move |path: String| {
        let sb = sb.clone();
        Box::pin(async move {
            if path != "/metrics" {
                return Response::text(404, "not found; try /metrics\n");
            }
            let sources = match tokio::time::timeout(reply_timeout, sb.send(GetMetrics)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Response::text(503, format!("sandbox actor: {e}\n")),
                Err(_) => return Response::text(503, "sandbox busy\n"),
            };
            match scrape(sources).await {
                Ok(body) => Response::ok_metrics(body),
                Err(e) => Response::text(500, format!("{e}\n")),
            }
        })
    });
    serve_unix(
        &sandbox_state_dir.join(joey_observability::monitor::METRICS_SOCKET),
        handler,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-filled `GetGuestMetrics` answer with two containers, rendered and checked line by
    /// line (promtool validity of the whole exposition is checked in tests/tests/metrics.rs).
    #[test]
    fn containers_of_a_guest_metrics_answer_are_exposed() {
        let mut r = agent::GuestMetricsResponse::new();
        r.mem_total_bytes = 256 << 20;
        r.mem_available_bytes = 200 << 20;
        r.cpus = 1;
        let mut web = agent::ContainerStatsEntry::new();
        web.container_id = "web-1".into();
        let mut st = agent::ContainerStats::new();
        st.memory_usage_bytes = 12 << 20;
        st.memory_limit_bytes = 128 << 20;
        st.cpu_usage_usec = 1_250_000;
        st.pids_current = 4;
        st.memory_events_oom_kill = 2;
        web.stats = protobuf::MessageField::some(st);
        let mut bare = agent::ContainerStatsEntry::new();
        bare.container_id = "no-stats".into();
        r.containers = vec![web, bare];

        let g = guest_sample(&r);
        assert_eq!(
            g.containers,
            vec![
                ContainerSample {
                    container_id: "web-1".into(),
                    memory_usage_bytes: 12 << 20,
                    memory_limit_bytes: 128 << 20,
                    cpu_usage_usec: 1_250_000,
                    pids: 4,
                    oom_kills: 2,
                },
                ContainerSample {
                    container_id: "no-stats".into(),
                    ..Default::default()
                },
            ]
        );
        let m = SandboxMetrics::new().unwrap();
        let text = m.render(Some(&g), None).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "joey_guest_container_memory_usage_bytes{container_id=\"web-1\"} 12582912",
            "joey_guest_container_memory_limit_bytes{container_id=\"web-1\"} 134217728",
            "joey_guest_container_cpu_seconds_total{container_id=\"web-1\"} 1.25",
            "joey_guest_container_pids{container_id=\"web-1\"} 4",
            "joey_guest_container_oom_kills_total{container_id=\"web-1\"} 2",
            "joey_guest_container_memory_usage_bytes{container_id=\"no-stats\"} 0",
            "joey_guest_container_pids{container_id=\"no-stats\"} 0",
            "joey_guest_memory_used_bytes 58720256",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in:\n{text}");
        }
        // No limit reported: no limit sample.
        assert!(
            !text.contains("memory_limit_bytes{container_id=\"no-stats\"}"),
            "{text}"
        );
        // Valid exposition (parses back, every family typed once).
        let families = joey_observability::expo::parse(&text, None).unwrap();
        assert!(families.iter().all(|f| f.kind.is_some()), "{families:?}");
    }
}
