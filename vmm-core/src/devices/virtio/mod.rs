// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! In-process virtio devices of the built-in VMM.
//!
//! - [`mmio`]: the virtio-mmio transport (virtio 1.x, register layout version 2) that sits on the
//!   VMM's MMIO bus and owns the virtqueues of one device;
//! - [`event_loop`]: the device thread that epolls the queue ioeventfds and device fds and runs
//!   the device handlers;
//! - [`VirtioDevice`]: what a device model (vsock, blk, fs) implements for the transport.

pub mod event_loop;
pub mod metrics;
pub mod mmio;

use std::os::fd::RawFd;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

pub use event_loop::{EventLoopError, EventLoopHandle};
pub use mmio::MmioTransport;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Virtio device id of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// Virtio device id of a vsock device.
pub const TYPE_VSOCK: u32 = 19;
/// Virtio device id of a virtio-fs device.
pub const TYPE_FS: u32 = crate::devices::fs::device::VIRTIO_ID_FS;

/// `VIRTIO_F_VERSION_1` (feature bit 32).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Interrupt status bit: a used ring changed.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration (or device status) changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

/// Errors of the virtio layer (transport and device handlers).
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("device has no queues or a queue max size that is not a power of two <= 32768")]
    BadQueueConfig(#[source] virtio_queue::Error),
    #[error("virtqueue {index} is ready but its rings are not in guest memory")]
    InvalidQueue { index: usize },
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("vsock: {0}")]
    Vsock(#[from] crate::devices::vsock::DeviceError),
    #[error("block: {0}")]
    Block(#[from] crate::devices::blk::BlockError),
    #[error("fs: {0}")]
    Fs(#[from] crate::devices::fs::VirtioFsError),
    #[error("net: {0}")]
    Net(#[from] crate::devices::net::NetError),
}

/// A device model served by [`MmioTransport`].
///
/// The transport owns the queues and guest memory and calls the handlers from the device event
/// loop thread; a handler returns whether it changed a used ring (the transport then interrupts
/// the guest). Handlers must never panic or block on guest-controlled input; an `Err` puts the
/// device in `DEVICE_NEEDS_RESET`.
pub trait VirtioDevice: Send {
    /// Virtio device id (2 = block, 19 = vsock, 26 = fs).
    fn device_type(&self) -> u32;
    /// Features offered to the driver (must include `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Maximum size of each queue (one entry per queue; powers of two).
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device config space at `offset` (out-of-range bytes read as 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device config space (ignored by default: read-only config).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with `acked_features`.
    fn activate(&mut self, _acked_features: u64) -> Result<(), VirtioError> {
        Ok(())
    }
    /// The driver reset the device (status 0).
    fn reset(&mut self) {}
    /// The guest notified queue `index` (only called while the device is active).
    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool, VirtioError>;
    /// A device-specific fd the event loop should watch (level triggered, readable).
    fn event_fd(&self) -> Option<RawFd> {
        None
    }
    /// [`event_fd`](Self::event_fd) is readable. `queues` is `None` while the device is not
    /// active: the handler must still drain the fd (or it would spin) but not touch the queues.
    fn process_event(
        &mut self,
        _mem: &GuestMemoryMmap,
        _queues: Option<&mut [Queue]>,
    ) -> Result<bool, VirtioError> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_wrap_upward() {
        let e: VirtioError = virtio_queue::Error::QueueNotReady.into();
        assert!(matches!(e, VirtioError::Queue(_)));
        let e: VirtioError = crate::devices::blk::BlockError::ReadOnlyWrite.into();
        assert!(e.to_string().contains("block"));
    }
}
