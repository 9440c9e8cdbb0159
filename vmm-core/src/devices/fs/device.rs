// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-fs request processing: descriptor chains of a virtqueue → FUSE server → used ring.
//!
//! Transport agnostic: works on any `GuestMemory` and any `virtio_queue::QueueT`, so the same
//! code serves the vhost-user backend and (later) the built-in VMM.

use std::ops::Deref;
use std::panic::{catch_unwind, AssertUnwindSafe};

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use tracing::warn;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::metrics::{FsMetrics, FsOp};

/// Virtio device id of virtio-fs.
pub const VIRTIO_ID_FS: u32 = 26;
/// Index of the high-priority queue (FORGET, INTERRUPT).
pub const HIPRIO_QUEUE: usize = 0;
/// Index of the (single) request queue.
pub const REQUEST_QUEUE: usize = 1;
/// Number of request queues.
pub const NUM_REQUEST_QUEUES: usize = 1;
/// Total number of virtqueues: hiprio + request queues.
pub const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES;
/// Largest queue size we accept (QEMU's vhost-user devices ask for up to 1024).
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Errors processing one request (descriptor chain).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The descriptor chain does not describe valid guest memory.
    #[error("malformed descriptor chain: {0}")]
    DescriptorChain(#[source] fuse_backend_rs::transport::Error),
    /// The FUSE server could not handle the message (e.g. it is truncated or undecodable).
    #[error("FUSE request failed: {0}")]
    Fuse(#[source] fuse_backend_rs::Error),
    /// The FUSE server panicked on this request (caught; the chain is returned unanswered).
    #[error("FUSE server panicked on a request")]
    Panicked,
    /// The `fs::request` failpoint failed it.
    #[error("failpoint {}", crate::failpoints::FS_REQUEST)]
    Injected,
    /// The chain could not be returned to the used ring.
    #[error("cannot return descriptor {index} to the used ring: {source}")]
    UsedRing {
        /// Head index of the chain.
        index: u16,
        /// The queue error.
        source: virtio_queue::Error,
    },
}

/// What one pass over a queue did.
#[derive(Debug, Default)]
pub struct QueueOutcome {
    /// Chains returned to the used ring (answered or not).
    pub used: u32,
    /// Chains that failed (returned with length 0).
    pub failed: u32,
    /// The last failure, if any.
    pub last_error: Option<RequestError>,
}

impl QueueOutcome {
    /// True if the used ring changed (the driver may need a notification).
    pub fn used_any(&self) -> bool {
        self.used > 0
    }
}

/// Handles one FUSE request: reads the request from the chain's readable descriptors and writes
/// the reply into its writable ones. Returns the number of bytes written (0 for requests without
/// reply, like FORGET). Never panics on guest input.
pub fn process_chain<F, M>(
    server: &Server<F>,
    mem: &M::Target,
    chain: DescriptorChain<M>,
) -> Result<usize, RequestError>
where
    F: FileSystem + Sync,
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    // Outside the catch below: its `panic` is a device thread's panic.
    if crate::failpoints::fired(crate::failpoints::FS_REQUEST).is_some() {
        return Err(RequestError::Injected);
    }
    let reader =
        Reader::from_descriptor_chain(mem, chain.clone()).map_err(RequestError::DescriptorChain)?;
    let writer = VirtioFsWriter::new(mem, chain).map_err(RequestError::DescriptorChain)?;
    // fuse-backend-rs parses guest-controlled data; a bug there must not take the device down.
    let handled = catch_unwind(AssertUnwindSafe(|| {
        server.handle_message(reader, writer.into(), None, None)
    }));
    match handled {
        Ok(Ok(len)) => Ok(len),
        Ok(Err(e)) => Err(RequestError::Fuse(e)),
        Err(_) => Err(RequestError::Panicked),
    }
}

/// The opcode group and the readable length (request bytes) of a chain, read without consuming
/// it; `Other` when the header cannot be read (the request then fails anyway).
fn request_summary<M>(mem: &M::Target, chain: &DescriptorChain<M>) -> (FsOp, u64)
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    let mut op = None;
    let mut bytes = 0u64;
    for d in chain.clone().readable() {
        if op.is_none() {
            // fuse_in_header: le32 len, le32 opcode, ...
            op = Some(
                d.addr()
                    .0
                    .checked_add(4)
                    .filter(|_| d.len() >= 8)
                    .and_then(|a| mem.read_obj::<u32>(GuestAddress(a)).ok())
                    .map_or(FsOp::Other, |o| FsOp::from_opcode(u32::from_le(o))),
            );
        }
        bytes = bytes.saturating_add(u64::from(d.len()));
    }
    (op.unwrap_or(FsOp::Other), bytes)
}

/// Processes every available chain of `queue`. A chain that fails is returned to the used ring
/// with length 0 and counted in the outcome; processing goes on with the next one. Err only if
/// the used ring cannot be written (the queue is then unusable). Every request is counted in
/// `metrics` (answered: by opcode group and bytes; failed: `failed_requests`).
pub fn process_queue<F, M, Q>(
    server: &Server<F>,
    mem: &M,
    queue: &mut Q,
    metrics: &FsMetrics,
) -> Result<QueueOutcome, RequestError>
where
    F: FileSystem + Sync,
    M: GuestMemory,
    Q: QueueT,
{
    let mut outcome = QueueOutcome::default();
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let (op, request_bytes) = request_summary(mem, &chain);
        let len = match process_chain(server, mem, chain) {
            Ok(len) => {
                metrics.count_op(op);
                FsMetrics::add(&metrics.bytes_from_guest, request_bytes);
                FsMetrics::add(&metrics.bytes_to_guest, len as u64);
                len
            }
            Err(e) => {
                FsMetrics::add(&metrics.failed_requests, 1);
                warn!("virtio-fs: request in descriptor {head} failed: {e}");
                outcome.failed += 1;
                outcome.last_error = Some(e);
                0
            }
        };
        // A reply never exceeds the chain's writable length, which is < 2^32.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        queue
            .add_used(mem, head, len)
            .map_err(|source| RequestError::UsedRing {
                index: head,
                source,
            })?;
        outcome.used += 1;
    }
    Ok(outcome)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::fs::filesystem::{new_server, FsServer};
    use crate::devices::fs::metrics::FsSnapshot;
    use crate::devices::fs::FsConfig;
    use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn, Opcode, OutHeader};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

    pub(crate) const QSIZE: u16 = 16;

    pub(crate) fn server(dir: &std::path::Path) -> FsServer {
        new_server(&FsConfig::new(dir)).unwrap()
    }

    pub(crate) fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    pub(crate) fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    /// Writes a FUSE_INIT request at 0x1_0000 and returns its length.
    pub(crate) fn write_init_request(mem: &GuestMemoryMmap<()>) -> u32 {
        let len = (std::mem::size_of::<InHeader>() + std::mem::size_of::<InitIn>()) as u32;
        let hdr = InHeader {
            len,
            opcode: Opcode::Init as u32,
            unique: 7,
            nodeid: 0,
            ..Default::default()
        };
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0x2_0000,
            flags: 0,
        };
        mem.write_obj(hdr, GuestAddress(0x1_0000)).unwrap();
        mem.write_obj(
            init,
            GuestAddress(0x1_0000 + std::mem::size_of::<InHeader>() as u64),
        )
        .unwrap();
        len
    }

    /// Puts the chains `chains` returns (after writing what they need into the guest memory) on
    /// a fresh queue and processes it on a thread with its own fs context (FUSE_INIT imports the
    /// root, which sets the umask: keep that off the test process). Returns the outcome, the
    /// used ring's (id, len) entries and the guest memory.
    fn process_chains(
        chains: impl FnOnce(&GuestMemoryMmap<()>) -> Vec<RawDescriptor>,
    ) -> (QueueOutcome, Vec<(u32, u32)>, GuestMemoryMmap<()>) {
        let (o, u, m, _) = process_chains_counted(chains);
        (o, u, m)
    }

    /// [`process_chains`], also returning the device counters.
    fn process_chains_counted(
        chains: impl FnOnce(&GuestMemoryMmap<()>) -> Vec<RawDescriptor>,
    ) -> (QueueOutcome, Vec<(u32, u32)>, GuestMemoryMmap<()>, FsSnapshot) {
        let metrics = FsMetrics::default();
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path());
        let m = mem();
        let mock = MockSplitQueue::create(&m, GuestAddress(0), QSIZE);
        let mut queue: Queue = mock.create_queue().unwrap();
        mock.add_desc_chains(&chains(&m), 0).unwrap();
        let outcome = std::thread::scope(|s| {
            s.spawn(|| {
                crate::devices::fs::vhost_user::isolate_fs_context().unwrap();
                process_queue(&server, &m, &mut queue, &metrics).unwrap()
            })
            .join()
            .unwrap()
        });
        let used = (0..mock.used().idx().load())
            .map(|i| mock.used().ring().ref_at(usize::from(i)).unwrap().load())
            .map(|e| (e.id(), e.len()))
            .collect();
        (outcome, used, m.clone(), metrics.snapshot())
    }

    #[test]
    fn malformed_chain_is_returned_with_len_zero() {
        let w = VRING_DESC_F_WRITE;
        let wn = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
        let rn = VRING_DESC_F_NEXT;
        let (outcome, used, _, counters) = process_chains_counted(|_| {
            vec![
                // 1: request buffer outside guest memory.
                desc(0x4000_0000, 64, rn, 1),
                desc(0x2_0000, 256, w, 0),
                // 2: truncated request header (4 bytes), reply buffer fine.
                desc(0x1_0000, 4, rn, 3),
                desc(0x2_0000, 256, w, 0),
                // 3: reply buffer crossing the end of guest memory.
                desc(0x1_0000, 64, rn, 5),
                desc((1 << 20) - 16, 256, wn, 6),
                desc(0x2_0000, 16, w, 0),
            ]
        });
        assert_eq!(outcome.used, 3);
        assert_eq!(outcome.failed, 3);
        assert!(matches!(
            outcome.last_error,
            Some(RequestError::DescriptorChain(_))
        ));
        assert_eq!(used, vec![(0, 0), (2, 0), (4, 0)]);
        assert_eq!(counters.failed_requests, 3);
        assert_eq!(counters.ops, [0; 9]);
        assert_eq!((counters.bytes_from_guest, counters.bytes_to_guest), (0, 0));
    }

    #[test]
    fn chain_without_reply_buffer_is_a_typed_error() {
        let (outcome, used, _) =
            process_chains(|m| vec![desc(0x1_0000, write_init_request(m), 0, 0)]);
        assert_eq!((outcome.used, outcome.failed), (1, 1));
        assert!(matches!(outcome.last_error, Some(RequestError::Fuse(_))));
        assert_eq!(used, vec![(0, 0)]);
    }

    #[test]
    fn init_request_is_answered() {
        let mut request_len = 0;
        let (outcome, used, m, counters) = process_chains_counted(|m| {
            request_len = write_init_request(m);
            vec![
                desc(0x1_0000, request_len, VRING_DESC_F_NEXT, 1),
                desc(0x2_0000, 256, VRING_DESC_F_WRITE, 0),
            ]
        });
        assert_eq!((outcome.used, outcome.failed), (1, 0));
        // INIT is counted as `other`, with the request's and the reply's bytes.
        let by: Vec<_> = counters.ops_by_name().filter(|(_, n)| *n > 0).collect();
        assert_eq!(by, vec![("other", 1)]);
        assert_eq!(counters.bytes_from_guest, u64::from(request_len));
        assert_eq!(counters.failed_requests, 0);
        let out: OutHeader = m.read_obj(GuestAddress(0x2_0000)).unwrap();
        assert_eq!(out.unique, 7);
        assert_eq!(out.error, 0);
        assert_eq!(used, vec![(0, out.len)]);
        assert_eq!(counters.bytes_to_guest, u64::from(out.len));
        assert!(out.len as usize > OutHeader::default().as_slice().len());
    }
}
