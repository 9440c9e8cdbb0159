//! Prometheus metrics for joey (shim, hypervisor, agent and guest). See `docs/metrics.md`.
//!
//! - [`sandbox::SandboxMetrics`]: one custom registry per sandbox, served as `GET /metrics` on
//!   `<state_dir>/<id>/metrics.sock` by the process hosting the sandbox ([`http::serve_unix`]).
//! - [`monitor::Monitor`]: `joey-monitor`'s scrape of every sandbox, merged with a
//!   `sandbox_id` label ([`expo`]).
//! - [`procfs`]: process stats from /proc.

pub mod expo;
pub mod http;
pub mod monitor;
pub mod procfs;
pub mod sandbox;

/// The `prometheus` crate, for users that time or count with our families.
pub use prometheus;
pub use sandbox::{
    ContainerSample, DeviceCounters, GuestSample, HypervisorCounters, MetricsError, SandboxMetrics, VmFacts,
};

/// Namespace prefix used by every joey metric.
pub const METRIC_PREFIX: &str = "joey";
