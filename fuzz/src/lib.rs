// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Helpers of joey's fuzz targets: a split virtqueue laid out in test guest memory from fuzz
//! input, the way a hostile guest driver would lay it out.
//!
//! Input layout of one queue ([`QueueInput::parse`]):
//! - 1 byte: number of descriptors `n` (taken modulo [`QUEUE_SIZE`] + 1);
//! - `n` × 12 bytes: descriptor `i` = `le32 addr`, `le32 len`, `le16 flags`, `le16 next`; the
//!   guest address is `DATA_BASE + addr` (so small values land in memory and large ones run off
//!   its end);
//! - 1 byte: number of avail ring entries `m` (modulo `QUEUE_SIZE` + 1);
//! - `m` × 2 bytes: `le16` head indices (any value: out-of-range heads are the queue's problem);
//! - the rest: bytes copied to guest memory at [`DATA_BASE`] (request headers, payloads).

pub mod agent;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Size of the test guest memory.
pub const MEM_SIZE: usize = 1 << 20;
/// Queue size of every fuzzed queue.
pub const QUEUE_SIZE: u16 = 32;
/// Where the queue structures go (each queue gets 16 KiB from here on).
pub const QUEUE_AREA: u64 = 0;
/// Space of one queue's structures.
pub const QUEUE_SPAN: u64 = 0x4000;
/// Where descriptor addresses point to and the payload bytes are copied.
pub const DATA_BASE: u64 = 0x1_0000;

/// Little-endian reader over the fuzz input; missing bytes read as 0.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The descriptor table and avail ring of one queue.
#[derive(Debug, Default)]
pub struct QueueInput {
    pub descs: Vec<RawDescriptor>,
    pub heads: Vec<u16>,
}

impl QueueInput {
    /// Reads one queue's table and ring from `input`.
    pub fn parse(input: &mut Input<'_>) -> Self {
        let n = usize::from(input.u8()) % (usize::from(QUEUE_SIZE) + 1);
        let descs = (0..n)
            .map(|_| {
                let addr = DATA_BASE + u64::from(input.u32());
                let len = input.u32();
                let flags = input.u16();
                let next = input.u16();
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        let m = usize::from(input.u8()) % (usize::from(QUEUE_SIZE) + 1);
        let heads = (0..m).map(|_| input.u16()).collect();
        QueueInput { descs, heads }
    }

    /// Writes the table and ring of queue number `slot` into `mem` and returns the device's
    /// view of the queue (ready, at avail index 0).
    pub fn install(&self, mem: &GuestMemoryMmap, slot: u64) -> Queue {
        let mock = MockSplitQueue::create(
            mem,
            GuestAddress(QUEUE_AREA + slot * QUEUE_SPAN),
            QUEUE_SIZE,
        );
        for (i, d) in self.descs.iter().enumerate() {
            mock.desc_table()
                .store(i as u16, *d)
                .expect("descriptor in the table");
        }
        for (i, h) in self.heads.iter().enumerate() {
            mock.avail()
                .ring()
                .ref_at(i)
                .expect("avail entry")
                .store(*h);
        }
        mock.avail().idx().store(self.heads.len() as u16);
        mock.create_queue().expect("mock queue")
    }
}

/// Fresh test guest memory with `payload` at [`DATA_BASE`] (truncated to fit).
pub fn guest_memory(payload: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let room = MEM_SIZE - DATA_BASE as usize;
    mem.write_slice(&payload[..payload.len().min(room)], GuestAddress(DATA_BASE))
        .expect("payload");
    mem
}

/// Memory and one queue built from the whole input.
pub fn one_queue(data: &[u8]) -> (GuestMemoryMmap, Queue) {
    let mut input = Input::new(data);
    let q = QueueInput::parse(&mut input);
    let mem = guest_memory(input.rest());
    let queue = q.install(&mem, 0);
    (mem, queue)
}
