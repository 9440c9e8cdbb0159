//! The shim's container resources, in setup order, each behind the resource manager's
//! interface ([`joey_actors::resource`]): the host rootfs (containerd's mounts on
//! `<bundle>/rootfs`), then the guest container (its rootfs and volume shares plus the agent's
//! container). Delete cleans them up in reverse order.

use std::path::PathBuf;
use std::time::Duration;

use actix::Addr;
use containerd_shim::protos::api::Mount;
use joey_actors::resource::{BoxFuture, Resource};
use joey_actors::sandbox::{RemoveContainer, SandboxActor, SandboxError, UnshareContainer};
use joey_actors::{AgentError, RpcCode};

use super::mounts;

/// Bound of each agent or actor call of a cleanup.
const CLEANUP_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// containerd's rootfs mounts on `<bundle>/rootfs`.
pub struct HostRootfs {
    pub mounts: Vec<Mount>,
    pub target: PathBuf,
}

impl Resource for HostRootfs {
    fn name(&self) -> String {
        format!("rootfs mount {}", self.target.display())
    }

    fn setup(&mut self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            mounts::check(&self.mounts).map_err(|e| e.to_string())?;
            let t = self.target.clone();
            tokio::task::spawn_blocking(move || std::fs::create_dir_all(&t))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("create {}: {e}", self.target.display()))?;
            // Undoes its own partial mounts on failure.
            mounts::mount_all(&self.mounts, &self.target).await.map_err(|e| e.to_string())
        })
    }

    fn cleanup(self: Box<Self>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async move {
            let t = self.target.clone();
            tokio::task::spawn_blocking(move || mounts::unmount(&t))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        })
    }
}

/// The container in the guest and its shares (set up by `CreateContainer` at Start, recorded
/// with `push_ready`): cleanup is agent `RemoveContainer`, then ShareFs `Unshare`.
pub struct GuestContainer {
    pub sandbox: Addr<SandboxActor>,
    pub container_id: String,
}

fn ignorable(e: &SandboxError) -> bool {
    // An agent without the RPC (older than the host), or one that already forgot it.
    matches!(
        e,
        SandboxError::Agent(AgentError::Rpc {
            code: RpcCode::Unimplemented | RpcCode::NotFound,
            ..
        })
    )
}

impl Resource for GuestContainer {
    fn name(&self) -> String {
        format!("guest container {}", self.container_id)
    }

    fn setup(&mut self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Err("a guest container is set up by CreateContainer (push_ready)".to_string()) })
    }

    fn cleanup(self: Box<Self>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async move {
            let mut errors = Vec::new();
            let id = self.container_id.clone();
            match tokio::time::timeout(
                CLEANUP_CALL_TIMEOUT,
                self.sandbox.send(RemoveContainer { container_id: id.clone() }),
            )
            .await
            {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) if ignorable(&e) => tracing::debug!(error = %e, "RemoveContainer skipped"),
                Ok(Ok(Err(e))) => errors.push(format!("RemoveContainer: {e}")),
                Ok(Err(e)) => errors.push(format!("RemoveContainer: {e}")),
                Err(_) => errors.push("RemoveContainer timed out".to_string()),
            }
            match tokio::time::timeout(CLEANUP_CALL_TIMEOUT, self.sandbox.send(UnshareContainer { container_id: id })).await
            {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => errors.push(format!("Unshare: {e}")),
                Ok(Err(e)) => errors.push(format!("Unshare: {e}")),
                Err(_) => errors.push("Unshare timed out".to_string()),
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("; "))
            }
        })
    }
}
