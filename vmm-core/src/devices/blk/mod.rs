// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-blk device (device id 2) with a raw file backend, served in-process through the
//! virtio-mmio transport.
//!
//! - [`request`]: descriptor chain parsing and validation (never panics on guest input);
//! - [`device`]: the disk backend and request execution (`T_IN`, `T_OUT`, `T_FLUSH`, `T_GET_ID`);
//! - [`event_handler`]: the [`VirtioDevice`](crate::devices::virtio::VirtioDevice) glue;
//! - [`metrics`]: counters.

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod request;

use std::path::PathBuf;

pub use device::Block;
pub use metrics::{BlockMetrics, BlockSnapshot};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header (`type`, `reserved`, `sector`).
pub const REQUEST_HEADER_SIZE: u32 = 16;
/// Most descriptors accepted in one request chain (header + data + status).
pub const MAX_DESCRIPTORS: usize = 64;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the `T_GET_ID` answer.
pub const ID_BYTES: usize = 20;

/// A block device of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Raw disk image on the host.
    pub path: PathBuf,
    /// Offer `VIRTIO_BLK_F_RO`; writes fail with `VIRTIO_BLK_S_IOERR`.
    pub read_only: bool,
    /// Rate limit of the requests (ops) and their data bytes (unlimited by default).
    pub limits: crate::rate_limiter::LimiterConfig,
}

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening disk {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    RateLimiter(#[from] crate::rate_limiter::RateLimiterError),
    #[error("disk I/O: {0}")]
    Io(#[source] std::io::Error),
    #[error("descriptor chain too short ({0} descriptors)")]
    ChainTooShort(usize),
    #[error("descriptor chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("descriptor chain loops or leaves the descriptor table")]
    ChainTruncated,
    #[error("zero-length descriptor")]
    ZeroLengthDescriptor,
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    AddressOutOfRange { addr: u64, len: u32 },
    #[error("request header descriptor is device-writable or shorter than 16 bytes")]
    BadHeader,
    #[error("status descriptor is not device-writable")]
    BadStatus,
    #[error("data descriptor has the wrong direction for request type {0}")]
    WrongDirection(u32),
    #[error("data length {0} is not a multiple of the sector size")]
    UnalignedLength(u64),
    #[error("sectors {sector}+{count} are beyond the disk's {capacity} sectors")]
    SectorOutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnlyWrite,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages() {
        let e = BlockError::SectorOutOfRange {
            sector: 9,
            count: 1,
            capacity: 8,
        };
        assert!(e.to_string().contains("beyond"));
        assert!(BlockError::TooManyDescriptors.to_string().contains("64"));
    }
}
