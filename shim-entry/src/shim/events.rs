//! The shim's one ordered event publisher and its task-service metrics.
//!
//! Every event goes through one queue drained by one task, so containerd receives them in the
//! order they were queued (TaskCreate before TaskStart before TaskExit before TaskDelete, and
//! likewise for execs). Queuing never waits: the queue holds [`QUEUE_CAPACITY`] events, and
//! one that does not fit is dropped; each publish is bounded by [`PUBLISH_TIMEOUT`]. Publishing
//! is counted by topic: `joey_shim_events_published_total{topic}` /
//! `joey_shim_events_failed_total{topic}` (failed, timed out or dropped); task RPCs
//! are timed in `joey_shim_task_rpc_duration_seconds{method}`. These live in the sandbox's
//! registry, so they are served on its metrics endpoint.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc;
use joey_observability::prometheus::{HistogramOpts, HistogramTimer, HistogramVec, IntCounterVec, Opts};
use tokio::sync::{mpsc, oneshot};

/// How long a flush (before the shim exits) waits for queued events.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Events waiting to be published; one more is dropped (and counted as failed).
pub const QUEUE_CAPACITY: usize = 1024;
/// Deadline of one publish to containerd.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Failpoint (the `failpoints` cargo feature, docs/faults.md) of each publish to containerd:
/// `return` fails every event, `return(<topic>)` those of one topic (`/tasks/exit`), as if
/// containerd had refused them: counted as failed, logged, not retried.
pub const PUBLISH_FAILPOINT: &str = "events::publish";
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
                    "Task events containerd could not be given (publish failed or timed out, or the queue was full), by topic.",
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

/// `Err` when [`PUBLISH_FAILPOINT`] fails events of `topic` (never without the feature).
fn injected(topic: &str) -> Result<(), String> {
    #[cfg(feature = "failpoints")]
    if let Some(arg) = fail::eval(PUBLISH_FAILPOINT, |arg| arg) {
        if arg.is_none_or(|t| t == topic) {
            return Err(format!("failpoint {PUBLISH_FAILPOINT}"));
        }
    }
    let _ = topic;
    Ok(())
}

enum Item {
    Event(&'static str, Box<dyn MessageDyn>),
    Flush(oneshot::Sender<()>),
}

/// One publish to containerd (the shim's [`RemotePublisher`]).
pub type PublishFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The ordered publisher (cheap to clone).
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Item>,
    metrics: ShimMetrics,
}

impl Events {
    /// Starts the draining task on the current tokio runtime, publishing to containerd.
    pub fn start(publisher: RemotePublisher, namespace: String, metrics: ShimMetrics) -> Events {
        let publisher = std::sync::Arc::new(publisher);
        let publish = move |topic: &'static str, ev: Box<dyn MessageDyn>| -> PublishFuture {
            let (p, ns) = (publisher.clone(), namespace.clone());
            Box::pin(async move {
                p.publish(ttrpc::context::Context::default(), topic, &ns, ev)
                    .await
                    .map_err(|e| e.to_string())
            })
        };
        Events::start_with(publish, metrics, QUEUE_CAPACITY, PUBLISH_TIMEOUT)
    }

    /// Starts the draining task with `publish` as the way out, a queue of `capacity` events and
    /// `deadline` per publish.
    pub fn start_with(
        publish: impl Fn(&'static str, Box<dyn MessageDyn>) -> PublishFuture + Send + 'static,
        metrics: ShimMetrics,
        capacity: usize,
        deadline: Duration,
    ) -> Events {
        let (tx, mut rx) = mpsc::channel::<Item>(capacity);
        let m = metrics.clone();
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                match item {
                    Item::Event(topic, ev) => {
                        let published = match injected(topic) {
                            Ok(()) => tokio::time::timeout(deadline, publish(topic, ev)).await,
                            Err(e) => Ok(Err(e)),
                        };
                        match published {
                            Ok(Ok(())) => m.published.with_label_values(&[topic]).inc(),
                            Ok(Err(e)) => {
                                m.failed.with_label_values(&[topic]).inc();
                                tracing::warn!(topic, error = %e, "publishing event failed");
                            }
                            Err(_) => {
                                m.failed.with_label_values(&[topic]).inc();
                                tracing::warn!(topic, ?deadline, "publishing event timed out");
                            }
                        }
                    }
                    Item::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Events { tx, metrics }
    }

    /// Queues an event (never waits: dropped and counted as failed when the queue is full).
    pub fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self.tx.try_send(Item::Event(topic, event)) {
            self.metrics.failed.with_label_values(&[topic]).inc();
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "queue full",
                mpsc::error::TrySendError::Closed(_) => "publisher gone",
            };
            tracing::warn!(topic, why, "event dropped");
        }
    }

    /// Waits until everything queued before was published (bounded by [`FLUSH_TIMEOUT`]).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        let flushed = tokio::time::timeout(FLUSH_TIMEOUT, async {
            self.tx.send(Item::Flush(tx)).await.is_ok() && rx.await.is_ok()
        })
        .await;
        if !matches!(flushed, Ok(true)) {
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
        assert!(
            text.contains("joey_shim_events_published_total{topic=\"/tasks/create\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("joey_shim_events_failed_total{topic=\"/tasks/exit\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("joey_shim_task_rpc_duration_seconds_count{method=\"Create\"} 1"),
            "{text}"
        );
        // Registering twice is refused (one family per name).
        assert!(m.register(&sm).is_err());
    }

    #[tokio::test]
    async fn a_stuck_containerd_drops_and_counts_events_but_never_blocks() {
        let m = ShimMetrics::new().unwrap();
        // containerd never answers: each publish hits its deadline.
        let publish = |_: &'static str, _: Box<dyn MessageDyn>| -> PublishFuture { Box::pin(std::future::pending()) };
        let ev = Events::start_with(publish, m.clone(), 2, Duration::from_millis(100));
        let t0 = std::time::Instant::now();
        for _ in 0..10 {
            let e = containerd_shim::protos::events::task::TaskOOM::default();
            ev.publish("/tasks/oom", Box::new(e));
        }
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "publish waited: {:?}",
            t0.elapsed()
        );
        let failed = || m.failed.with_label_values(&["/tasks/oom"]).get();
        // At most the queue (2) and the one in flight got in; the rest were dropped at once.
        assert!(failed() >= 7, "{}", failed());
        // The others time out, one after the other.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while failed() < 10 {
            assert!(std::time::Instant::now() < deadline, "failed = {}", failed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(m.published.with_label_values(&["/tasks/oom"]).get(), 0);
        // A flush after them is answered.
        tokio::time::timeout(Duration::from_secs(1), ev.flush()).await.unwrap();
    }

    /// A publisher (queue of 8) whose events arrive on the returned channel.
    fn recording(m: &ShimMetrics) -> (Events, mpsc::UnboundedReceiver<&'static str>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let publish = move |topic: &'static str, _: Box<dyn MessageDyn>| -> PublishFuture {
            let _ = tx.send(topic);
            Box::pin(async { Ok(()) })
        };
        (Events::start_with(publish, m.clone(), 8, Duration::from_secs(1)), rx)
    }

    #[tokio::test]
    async fn events_are_published_in_order() {
        let m = ShimMetrics::new().unwrap();
        let (ev, mut rx) = recording(&m);
        for t in ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"] {
            ev.publish(t, Box::new(containerd_shim::protos::events::task::TaskOOM::default()));
        }
        ev.flush().await;
        let mut got = Vec::new();
        while let Ok(t) = rx.try_recv() {
            got.push(t);
        }
        assert_eq!(got, ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]);
        assert_eq!(m.published.with_label_values(&["/tasks/exit"]).get(), 1);
    }

    /// `return(<topic>)` fails the events of that topic only (a topic of this test's own, so
    /// the other tests may publish meanwhile): counted as failed, the next event goes out.
    #[cfg(feature = "failpoints")]
    #[tokio::test]
    async fn a_publish_failpoint_fails_its_topic_only() {
        let m = ShimMetrics::new().unwrap();
        let (ev, mut rx) = recording(&m);
        fail::cfg(PUBLISH_FAILPOINT, "return(/joey-test/failing)").unwrap();
        for t in ["/joey-test/failing", "/joey-test/other"] {
            ev.publish(t, Box::new(containerd_shim::protos::events::task::TaskOOM::default()));
        }
        ev.flush().await;
        fail::cfg(PUBLISH_FAILPOINT, "off").unwrap();
        let mut got = Vec::new();
        while let Ok(t) = rx.try_recv() {
            got.push(t);
        }
        assert_eq!(got, ["/joey-test/other"]);
        assert_eq!(m.failed.with_label_values(&["/joey-test/failing"]).get(), 1);
        assert_eq!(m.published.with_label_values(&["/joey-test/other"]).get(), 1);
    }
}
