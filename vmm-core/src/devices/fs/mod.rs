// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-fs device (virtio id 26): shares a host directory with the guest.
//!
//! Layers, bottom up:
//! - [`filesystem`]: fuse-backend-rs's `PassthroughFs` over the shared directory, behind
//!   [`filesystem::SharedDirFs`] (read-only export, confinement of `..` at the root) and the
//!   fuse-backend-rs virtio-fs `Server`;
//! - [`device`]: virtqueue processing (descriptor chain → FUSE request → used ring) on any
//!   `GuestMemory` and `virtio_queue` queue;
//! - [`vhost_user`]: `vhost-user-backend` glue and the [`VhostUserFsServer`] used with QEMU's
//!   `vhost-user-fs-device` (1 hiprio + 1 request queue; the mount tag lives in QEMU's config
//!   space: `-device vhost-user-fs-device,chardev=...,tag=...`);
//! - [`virtio`]: the same device served in-process by the built-in VMM on its virtio-mmio
//!   transport ([`VirtioFs`], tag and queue count in its own config space).

pub mod device;
pub mod filesystem;
pub mod metrics;
pub mod vhost_user;
pub mod virtio;

use std::path::PathBuf;

pub use device::RequestError;
pub use filesystem::SharedDirError;
pub use metrics::{FsMetrics, FsOp, FsSnapshot};
pub use vhost_user::{FsBackend, VhostUserError, VhostUserFsHandle, VhostUserFsServer};
pub use virtio::{VirtioFs, VirtioFsConfig, VirtioFsError};

/// How long the guest may cache file data and metadata.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CachePolicy {
    /// No caching: every access goes to the host (the directory may change under the guest).
    Never,
    /// Close-to-open consistency with short (1 s) metadata timeouts.
    #[default]
    Auto,
    /// Cache everything for long: only when the guest has exclusive access to the directory.
    Always,
}

/// Configuration of a virtio-fs device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// Host directory shared with the guest (the root of the guest mount).
    pub shared_dir: PathBuf,
    /// Refuse every modification with `EROFS`.
    pub read_only: bool,
    /// Guest cache policy.
    pub cache: CachePolicy,
}

impl FsConfig {
    /// A read-write export of `shared_dir` with the default cache policy.
    pub fn new(shared_dir: impl Into<PathBuf>) -> Self {
        FsConfig {
            shared_dir: shared_dir.into(),
            read_only: false,
            cache: CachePolicy::default(),
        }
    }
}

/// Errors of the virtio-fs device stack.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The shared directory cannot be used.
    #[error(transparent)]
    SharedDir(#[from] SharedDirError),
    /// A request (descriptor chain) failed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// vhost-user transport error.
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults() {
        let c = FsConfig::new("/srv/share");
        assert_eq!(c.shared_dir, PathBuf::from("/srv/share"));
        assert!(!c.read_only);
        assert_eq!(c.cache, CachePolicy::Auto);
        assert_eq!(CachePolicy::default(), CachePolicy::Auto);
    }

    #[test]
    fn errors_wrap_upward() {
        let e: FsError = SharedDirError::NotADirectory(PathBuf::from("/x")).into();
        assert!(e.to_string().contains("/x"));
        let e: FsError = VhostUserError::ThreadPanicked.into();
        assert!(matches!(e, FsError::VhostUser(_)));
        let e: FsError = RequestError::Panicked.into();
        assert!(matches!(e, FsError::Request(RequestError::Panicked)));
    }
}
