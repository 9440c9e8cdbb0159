//! The sandbox RPCs: Check, Version, GetGuestMetrics and DestroySandbox.

use std::time::Duration;

use joey_agent_protocol::agent::{
    CheckRequest, CheckResponse, ContainerStatsEntry, DestroySandboxRequest, Empty,
    GuestMetricsRequest, GuestMetricsResponse, VersionResponse,
};
use joey_agent_protocol::PROTOCOL_VERSION;

use super::{blocking, Agent, Result, ServiceError, ShutdownMode};

/// Delay between answering DestroySandbox and rebooting, so the reply leaves the VM first.
const DESTROY_DELAY: Duration = Duration::from_millis(200);

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

impl Agent {
    /// Check: the agent serves.
    pub(super) async fn check(&self, _: CheckRequest) -> Result<CheckResponse> {
        Ok(CheckResponse {
            status: "SERVING".into(),
            ..Default::default()
        })
    }

    /// Version: agent, protocol and guest kernel versions.
    pub(super) async fn version(&self, _: Empty) -> Result<VersionResponse> {
        Ok(VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION.into(),
            kernel_release: kernel_release(),
            ..Default::default()
        })
    }

    /// GetGuestMetrics: guest-wide counters plus the stats of every live container.
    pub(super) async fn guest_metrics(
        &self,
        _: GuestMetricsRequest,
    ) -> Result<GuestMetricsResponse> {
        // procfs reads are synchronous: keep them off the async workers.
        let groups = self.container_groups();
        let collect = move || {
            crate::metrics::collect().map(|mut r| {
                r.containers = groups
                    .into_iter()
                    .map(|(id, cg)| ContainerStatsEntry {
                        container_id: id,
                        stats: Some(cg.stats()).into(),
                        ..Default::default()
                    })
                    .collect();
                r
            })
        };
        blocking("metrics", collect)
            .await?
            .map_err(|e| ServiceError::Internal(e.to_string()))
    }

    /// DestroySandbox: answers, then (after [`DESTROY_DELAY`]) reboots the guest, or in
    /// `--listen` mode kills our processes and exits.
    pub(super) async fn destroy(&self, _: DestroySandboxRequest) -> Result<Empty> {
        nix::unistd::sync();
        let table = self.table.clone();
        let mode = self.shutdown;
        agent_log!("destroying sandbox");
        tokio::spawn(async move {
            tokio::time::sleep(DESTROY_DELAY).await;
            match mode {
                ShutdownMode::Reboot => crate::init::reboot_now(),
                ShutdownMode::Exit => {
                    for pid in table.running_pids() {
                        let _ = table.kill(pid, libc::SIGKILL);
                    }
                    std::process::exit(0);
                }
            }
        });
        Ok(Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_release_is_the_running_kernel() {
        let r = kernel_release();
        assert!(!r.is_empty() && !r.starts_with("unknown"), "{r}");
        let proc = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(r, proc.trim());
    }
}
