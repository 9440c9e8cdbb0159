//! Prometheus metrics for joey (shim, hypervisor, agent, guest).
//!
//! Placeholder crate: the metrics themselves arrive with the observability issue.
//! It exists now so the workspace has its final shape.

/// Namespace prefix used by every joey metric.
pub const METRIC_PREFIX: &str = "joey";
