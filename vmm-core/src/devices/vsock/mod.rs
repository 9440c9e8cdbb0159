// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-vsock device (stream sockets) with a Firecracker-style "hybrid vsock" host side.
//!
//! Layers, bottom up:
//! - `csm`: one connection's state machine, credit accounting and buffer;
//! - [`muxer`]: connection table and host unix sockets, transport agnostic;
//! - [`device`]: virtqueue processing on top of a `GuestMemory` and a `virtio_queue` queue;
//! - [`vhost_user`]: `vhost-user-backend` glue and the [`VhostUserVsockServer`] used with QEMU's
//!   `vhost-user-vsock-device`.
//!
//! Host processes reach guest port `P` by connecting to `uds_path` and writing `CONNECT P\n`
//! (answered by `OK <hostport>\n`); guest connections to host port `P` are forwarded to the unix
//! socket `<uds_path>_<P>`.

mod csm;
pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod muxer;
pub mod packet;
pub mod socket_path;
pub mod vhost_user;

use std::path::PathBuf;

pub use device::{DeviceError, VsockDevice};
pub use event_handler::VirtioVsock;
pub use metrics::{VsockMetrics, VsockSnapshot};
pub use muxer::{MuxerError, VsockMuxer};
pub use vhost_user::{VhostUserError, VhostUserVsockHandle, VhostUserVsockServer, VsockBackend};

/// Configuration of a vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// Context id of the guest (> 2).
    pub guest_cid: u64,
    /// Hybrid-vsock unix listener path on the host.
    pub uds_path: PathBuf,
    /// Rate limits of the packets to (`rx`) and from (`tx`) the guest: ops are packets,
    /// bandwidth is payload bytes (unlimited by default).
    pub limits: crate::rate_limiter::RxTxLimiterConfig,
}

/// Errors of the vsock device stack.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Device model error.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Host side (muxer) error.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    /// vhost-user transport error.
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_wrap_upward() {
        let e: VsockError = MuxerError::PathExists(PathBuf::from("/x")).into();
        assert!(e.to_string().contains("/x"));
        let e: VsockError = DeviceError::InvalidCid(1).into();
        assert!(matches!(e, VsockError::Device(DeviceError::InvalidCid(1))));
        let e: VsockError = VhostUserError::ThreadPanicked.into();
        assert!(matches!(e, VsockError::VhostUser(_)));
    }
}
