//! The shim's host resource of a container, behind the resource manager's interface
//! ([`joey_actors::resource`]): the host rootfs (containerd's mounts on `<bundle>/rootfs`).
//! The Container actor holds it under the guest container it makes at Start
//! ([`joey_actors::container::GuestContainer`]); Delete cleans them up in reverse order.

use std::path::PathBuf;

use containerd_shim::protos::api::Mount;
use joey_actors::resource::{BoxFuture, Resource};

use super::mounts;

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
            mounts::mount_all(&self.mounts, &self.target)
                .await
                .map_err(|e| e.to_string())
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
