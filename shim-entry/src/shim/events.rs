//! The shim's one ordered event publisher and its task-service metrics.
//!
//! Every event goes through one queue drained by one task, so containerd receives them in the
//! order they were queued (TaskCreate before TaskStart before TaskExit before TaskDelete, and
//! likewise for execs). Publishing is counted by topic:
//! `joey_shim_events_published_total{topic}` / `joey_shim_events_failed_total{topic}`; task RPCs
//! are timed in `joey_shim_task_rpc_duration_seconds{method}`. These live in the sandbox's
//! registry, so they are served on its metrics endpoint.

use std::time::Duration;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc;
use joey_observability::prometheus::{HistogramOpts, HistogramTimer, HistogramVec, IntCounterVec, Opts};
use tokio::sync::{mpsc, oneshot};

/// How long a flush (before the shim exits) waits for queued events.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Buckets of `joey_shim_task_rpc_duration_seconds` (Create boots a VM: seconds; Wait is long).
const RPC_BUCKETS: &[f64] = &[0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("metric definition: {0}")]
    Metric(#[from] joey_observability::prometheus::Error),
}

/// The shim's task-service metrics.
#[derive(Clone)]
pub struct ShimMetrics {
    pub published: IntCounterVec,
    pub failed: IntCounterVec,
    pub task_rpc: HistogramVec,
}

impl ShimMetrics {
    pub fn new() -> Result<ShimMetrics, EventsError> {
        Ok(ShimMetrics {
            published: IntCounterVec::new(
                Opts::new("joey_shim_events_published_total", "Task events delivered to containerd, by topic."),
                &["topic"],
            )?,
            failed: IntCounterVec::new(
                Opts::new(
                    "joey_shim_events_failed_total",
                    "Task events containerd could not be given (publish failed), by topic.",
                ),
                &["topic"],
            )?,
            task_rpc: HistogramVec::new(
                HistogramOpts::new(
                    "joey_shim_task_rpc_duration_seconds",
                    "Duration of containerd task API requests served by the shim, by method.",
                )
                .buckets(RPC_BUCKETS.to_vec()),
                &["method"],
            )?,
        })
    }

    /// Adds the families to the sandbox's registry (served on its metrics endpoint).
    pub fn register(&self, m: &joey_observability::SandboxMetrics) -> Result<(), joey_observability::MetricsError> {
        m.register(Box::new(self.published.clone()))?;
        m.register(Box::new(self.failed.clone()))?;
        m.register(Box::new(self.task_rpc.clone()))?;
        Ok(())
    }

    /// Records the duration of a task RPC when dropped.
    pub fn time(&self, method: &'static str) -> HistogramTimer {
        self.task_rpc.with_label_values(&[method]).start_timer()
    }
}

enum Item {
    Event(&'static str, Box<dyn MessageDyn>),
    Flush(oneshot::Sender<()>),
}

/// The ordered publisher (cheap to clone).
#[derive(Clone)]
pub struct Events {
    tx: mpsc::UnboundedSender<Item>,
}

impl Events {
    /// Starts the draining task on the current tokio runtime.
    pub fn start(publisher: RemotePublisher, namespace: String, metrics: ShimMetrics) -> Events {
        let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                match item {
                    Item::Event(topic, ev) => {
                        match publisher
                            .publish(ttrpc::context::Context::default(), topic, &namespace, ev)
                            .await
                        {
                            Ok(()) => metrics.published.with_label_values(&[topic]).inc(),
                            Err(e) => {
                                metrics.failed.with_label_values(&[topic]).inc();
                                tracing::warn!(topic, error = %e, "publishing event failed");
                            }
                        }
                    }
                    Item::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Events { tx }
    }

    /// Queues an event (never blocks).
    pub fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        if self.tx.send(Item::Event(topic, event)).is_err() {
            tracing::warn!(topic, "event publisher gone; event dropped");
        }
    }

    /// Waits until everything queued before was published (bounded by [`FLUSH_TIMEOUT`]).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Item::Flush(tx)).is_ok() && tokio::time::timeout(FLUSH_TIMEOUT, rx).await.is_err() {
            tracing::warn!("events not flushed in time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_register_on_the_sandbox_registry() {
        let sm = joey_observability::SandboxMetrics::new().unwrap();
        let m = ShimMetrics::new().unwrap();
        m.register(&sm).unwrap();
        m.published.with_label_values(&["/tasks/create"]).inc();
        m.failed.with_label_values(&["/tasks/exit"]).inc_by(2);
        drop(m.time("Create"));
        let text = sm.render(None, None).unwrap();
        assert!(text.contains("joey_shim_events_published_total{topic=\"/tasks/create\"} 1"), "{text}");
        assert!(text.contains("joey_shim_events_failed_total{topic=\"/tasks/exit\"} 2"), "{text}");
        assert!(
            text.contains("joey_shim_task_rpc_duration_seconds_count{method=\"Create\"} 1"),
            "{text}"
        );
        // Registering twice is refused (one family per name).
        assert!(m.register(&sm).is_err());
    }
}
