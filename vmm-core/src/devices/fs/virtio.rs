// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-fs served in-process by the built-in VMM: a [`VirtioDevice`] on the virtio-mmio
//! transport (device id 26, config space = mount tag + number of request queues, queues =
//! hiprio + one request queue). Requests go through the same FUSE server and queue processing
//! as the vhost-user backend ([`super::device::process_queue`]).
//!
//! The passthrough filesystem sets `umask(0)` on FUSE_INIT; the device therefore gives the
//! thread that processes its queues (the VMM's device event loop) a private filesystem context
//! before it handles the first request, like the vhost-user serving thread does.

use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::device::{process_queue, RequestError, NUM_QUEUES, NUM_REQUEST_QUEUES, VIRTIO_ID_FS};
use super::filesystem::{new_server, FsServer, SharedDirError};
use super::metrics::FsMetrics;
use super::vhost_user::{isolate_fs_context, VhostUserError};
use super::FsConfig;
use crate::devices::virtio::mmio::read_config_bytes;
use crate::devices::virtio::{VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

/// Length of the mount tag field of the config space (NUL padded, not NUL terminated).
pub const TAG_LEN: usize = 36;
/// Size of the config space: `u8 tag[36]`, `le32 num_request_queues`.
pub const CONFIG_LEN: usize = TAG_LEN + 4;
/// Size offered for each queue.
pub const QUEUE_SIZE: u16 = 256;

/// The virtio-fs device of a built-in VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioFsConfig {
    /// Host directory shared with the guest.
    pub shared_dir: PathBuf,
    /// Mount tag (`mount -t virtiofs <tag> /mnt`): 1 to 36 bytes.
    pub tag: String,
    /// Refuse every modification with `EROFS`.
    pub read_only: bool,
}

/// Errors of the in-process virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioFsError {
    /// The mount tag is empty.
    #[error("virtio-fs mount tag is empty")]
    EmptyTag,
    /// The mount tag does not fit the config space.
    #[error("virtio-fs mount tag {tag:?} is {len} bytes long, at most {TAG_LEN} allowed")]
    TagTooLong {
        /// The configured tag.
        tag: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The shared directory is missing or unusable.
    #[error("virtio-fs: {0}")]
    SharedDir(#[from] SharedDirError),
    /// The device thread could not get a private filesystem context.
    #[error("virtio-fs: {0}")]
    FsContext(#[source] VhostUserError),
    /// A used ring could not be written (the queue is unusable).
    #[error("virtio-fs: {0}")]
    Request(#[from] RequestError),
}

/// The in-process virtio-fs device.
pub struct VirtioFs {
    server: FsServer,
    metrics: Arc<FsMetrics>,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; NUM_QUEUES],
    read_only: bool,
    /// Whether the processing thread has its own filesystem context yet.
    fs_context_isolated: bool,
}

impl std::fmt::Debug for VirtioFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioFs")
            .field("tag", &self.tag())
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// The config space for `tag` (checked: 1..=36 bytes).
fn config_space(tag: &str) -> Result<[u8; CONFIG_LEN], VirtioFsError> {
    if tag.is_empty() {
        return Err(VirtioFsError::EmptyTag);
    }
    if tag.len() > TAG_LEN {
        return Err(VirtioFsError::TagTooLong {
            tag: tag.to_string(),
            len: tag.len(),
        });
    }
    let mut config = [0u8; CONFIG_LEN];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config[TAG_LEN..].copy_from_slice(&(NUM_REQUEST_QUEUES as u32).to_le_bytes());
    Ok(config)
}

impl VirtioFs {
    /// Checks the tag and the shared directory and builds the FUSE server (nothing is opened in
    /// the directory before the guest's FUSE_INIT).
    pub fn new(cfg: &VirtioFsConfig) -> Result<Self, VirtioFsError> {
        let config = config_space(&cfg.tag)?;
        let server = new_server(&FsConfig {
            read_only: cfg.read_only,
            ..FsConfig::new(&cfg.shared_dir)
        })?;
        Ok(VirtioFs {
            server,
            metrics: Arc::new(FsMetrics::default()),
            config,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            read_only: cfg.read_only,
            fs_context_isolated: false,
        })
    }

    /// The device's counters (shared with whoever reads them).
    pub fn metrics(&self) -> &Arc<FsMetrics> {
        &self.metrics
    }

    /// The mount tag.
    pub fn tag(&self) -> String {
        let end = self.config[..TAG_LEN]
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(TAG_LEN);
        String::from_utf8_lossy(&self.config[..end]).into_owned()
    }

    /// Processes every available request of `queue` on the calling thread. Returns whether the
    /// used ring changed. Failed requests are returned with length 0 and counted; Err only if
    /// the used ring cannot be written or the thread cannot be isolated.
    pub fn process(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, VirtioFsError> {
        use virtio_queue::QueueT;
        if !queue.ready() {
            return Ok(false);
        }
        if !self.fs_context_isolated {
            isolate_fs_context().map_err(VirtioFsError::FsContext)?;
            self.fs_context_isolated = true;
        }
        let outcome = process_queue(&self.server, mem, queue, &self.metrics)?;
        Ok(outcome.used_any())
    }
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn avail_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool, VirtioError> {
        match queues.get_mut(index) {
            Some(q) if index < NUM_QUEUES => Ok(self.process(mem, q)?),
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fs::device::tests::{desc, mem, write_init_request, QSIZE};
    use crate::devices::fs::device::REQUEST_QUEUE;
    use fuse_backend_rs::abi::fuse_abi::{InitOut, OutHeader};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    fn cfg(dir: &std::path::Path, tag: &str) -> VirtioFsConfig {
        VirtioFsConfig {
            shared_dir: dir.to_path_buf(),
            tag: tag.to_string(),
            read_only: false,
        }
    }

    #[test]
    fn config_space_holds_tag_and_queue_count() {
        let dir = tempfile::tempdir().unwrap();
        let fs = VirtioFs::new(&cfg(dir.path(), "joeyfs")).unwrap();
        assert_eq!(fs.device_type(), 26);
        assert_eq!(fs.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        assert_ne!(fs.avail_features() & (1 << 32), 0);
        assert_eq!(fs.tag(), "joeyfs");
        let mut tag = [0xffu8; TAG_LEN];
        fs.read_config(0, &mut tag);
        assert_eq!(&tag[..6], b"joeyfs");
        assert_eq!(&tag[6..], &[0u8; TAG_LEN - 6][..]);
        let mut n = [0u8; 4];
        fs.read_config(TAG_LEN as u64, &mut n);
        assert_eq!(u32::from_le_bytes(n), 1);
        // A read across the end copies what exists (the transport zero-fills the rest).
        let mut tail = [0u8; 8];
        fs.read_config(CONFIG_LEN as u64 - 4, &mut tail);
        assert_eq!(tail, [1, 0, 0, 0, 0, 0, 0, 0]);
        // A 36-byte tag fills the field exactly.
        let long = "t".repeat(TAG_LEN);
        assert_eq!(VirtioFs::new(&cfg(dir.path(), &long)).unwrap().tag(), long);
    }

    #[test]
    fn bad_tag_and_missing_dir_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            VirtioFs::new(&cfg(dir.path(), "")),
            Err(VirtioFsError::EmptyTag)
        ));
        let long = "x".repeat(TAG_LEN + 1);
        match VirtioFs::new(&cfg(dir.path(), &long)) {
            Err(VirtioFsError::TagTooLong { tag, len }) => assert_eq!((tag, len), (long, 37)),
            other => panic!("expected TagTooLong, got {other:?}"),
        }
        let missing = dir.path().join("missing");
        match VirtioFs::new(&cfg(&missing, "joeyfs")) {
            Err(e @ VirtioFsError::SharedDir(SharedDirError::Inaccessible { .. })) => {
                assert!(e.to_string().contains("missing"), "{e}")
            }
            other => panic!("expected SharedDir(Inaccessible), got {other:?}"),
        }
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            VirtioFs::new(&cfg(&file, "joeyfs")),
            Err(VirtioFsError::SharedDir(SharedDirError::NotADirectory(_)))
        ));
    }

    /// A malformed chain then FUSE_INIT on the request queue, through the `VirtioDevice`
    /// interface on a thread of its own (FUSE_INIT sets the umask of the processing thread).
    #[test]
    fn init_is_answered_after_a_malformed_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mut fs = VirtioFs::new(&cfg(dir.path(), "joeyfs")).unwrap();
        let m = mem();
        let mock = MockSplitQueue::create(&m, GuestAddress(0), QSIZE);
        let request_len = write_init_request(&m);
        let chains = [
            // Request buffer outside guest memory.
            desc(0x4000_0000, 64, VRING_DESC_F_NEXT, 1),
            desc(0x2_0000, 256, VRING_DESC_F_WRITE, 0),
            // FUSE_INIT with a 256-byte reply buffer.
            desc(0x1_0000, request_len, VRING_DESC_F_NEXT, 3),
            desc(0x2_0000, 256, VRING_DESC_F_WRITE, 0),
        ];
        mock.add_desc_chains(&chains, 0).unwrap();
        let hiprio: Queue = Queue::new(QSIZE).unwrap();
        let request: Queue = mock.create_queue().unwrap();
        let mut queues = [hiprio, request];
        let used = std::thread::scope(|s| {
            s.spawn(|| {
                // The hiprio queue is not ready: nothing to do.
                assert!(!fs.process_queue(&m, &mut queues, 0).unwrap());
                fs.process_queue(&m, &mut queues, REQUEST_QUEUE).unwrap()
            })
            .join()
            .unwrap()
        });
        assert!(used);
        let out: OutHeader = m.read_obj(GuestAddress(0x2_0000)).unwrap();
        let init: InitOut = m
            .read_obj(GuestAddress(
                0x2_0000 + std::mem::size_of::<OutHeader>() as u64,
            ))
            .unwrap();
        assert_eq!((out.error, out.unique), (0, 7));
        assert_eq!(init.major, 7);
        assert_eq!(
            out.len as usize,
            std::mem::size_of::<OutHeader>() + std::mem::size_of::<InitOut>()
        );
        let ring: Vec<(u32, u32)> = (0..mock.used().idx().load())
            .map(|i| mock.used().ring().ref_at(usize::from(i)).unwrap().load())
            .map(|e| (e.id(), e.len()))
            .collect();
        assert_eq!(ring, vec![(0, 0), (2, out.len)]);
        let s = fs.metrics().snapshot();
        assert_eq!(s.failed_requests, 1);
        assert_eq!(s.bytes_from_guest, u64::from(request_len));
        assert_eq!(s.bytes_to_guest, u64::from(out.len));
        // An index past the queues is ignored.
        assert!(!fs.process_queue(&m, &mut queues, 2).unwrap());
    }

    /// FORGET on the hiprio queue: no reply (used length 0), counted as a forget, not a failure.
    #[test]
    fn forget_on_the_hiprio_queue_is_consumed_without_reply() {
        use fuse_backend_rs::abi::fuse_abi::{ForgetIn, InHeader, Opcode};
        let dir = tempfile::tempdir().unwrap();
        let mut fs = VirtioFs::new(&cfg(dir.path(), "joeyfs")).unwrap();
        let m = mem();
        let len = (std::mem::size_of::<InHeader>() + std::mem::size_of::<ForgetIn>()) as u32;
        let hdr = InHeader {
            len,
            opcode: Opcode::Forget as u32,
            unique: 9,
            nodeid: 1,
            ..Default::default()
        };
        m.write_obj(hdr, GuestAddress(0x1_0000)).unwrap();
        m.write_obj(
            ForgetIn { nlookup: 1 },
            GuestAddress(0x1_0000 + std::mem::size_of::<InHeader>() as u64),
        )
        .unwrap();
        let mock = MockSplitQueue::create(&m, GuestAddress(0), QSIZE);
        mock.add_desc_chains(&[desc(0x1_0000, len, 0, 0)], 0)
            .unwrap();
        let mut queues = [mock.create_queue().unwrap(), Queue::new(QSIZE).unwrap()];
        let used = std::thread::scope(|s| {
            s.spawn(|| fs.process_queue(&m, &mut queues, 0).unwrap())
                .join()
                .unwrap()
        });
        assert!(used);
        let e = mock.used().ring().ref_at(0).unwrap().load();
        assert_eq!((mock.used().idx().load(), e.id(), e.len()), (1, 0, 0));
        let s = fs.metrics().snapshot();
        let by: Vec<_> = s.ops_by_name().filter(|(_, n)| *n > 0).collect();
        assert_eq!(by, vec![("forget", 1)]);
        assert_eq!((s.failed_requests, s.bytes_to_guest), (0, 0));
        assert_eq!(s.bytes_from_guest, u64::from(len));
    }
}
