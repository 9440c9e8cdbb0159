// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-net queue processing between a [`Tap`] and the guest's rx/tx virtqueues.
//!
//! Transport agnostic: works on any `GuestMemory` and any `virtio_queue::QueueT`, so the same
//! [`NetQueues`] serves the vhost-user backend and the built-in VMM.
//!
//! - tx (guest → tap): each chain (readable descriptors: 12-byte `virtio_net_hdr_v1` + frame) is
//!   gathered into a bounded buffer and written to the tap as one frame. No offload is
//!   negotiated, so the guest's header is replaced by a zero one. Every chain goes back to the
//!   used ring with length 0.
//! - rx (tap → guest): one frame at a time is read from the tap into a pending buffer and copied
//!   into the next rx chain (writable descriptors) behind a zero header with `num_buffers` = 1.
//!   When the guest has posted no rx buffer the frame stays pending and the tap is no longer
//!   polled until the guest posts buffers (its next rx notification): nothing is read that could
//!   not be delivered.
//!
//! The tap is polled through a private epoll instance that holds only the tap fd (level
//! triggered): its fd ([`NetQueues::event_fd`]) is what the device event loop or the vhost-user
//! vring worker watches, and the tap is taken out of it while rx is blocked. An epoll fd is
//! readable exactly while one of its fds is, so no one ever needs to drain it.
//!
//! Rate limits ([`crate::rate_limiter`], one limiter per direction): a tx chain is gathered and
//! then charged one op and its frame's bytes; a pending rx frame is charged before it is copied
//! into a chain. When the limiter refuses, the chain goes back to the avail ring (the frame stays
//! pending, the tap is no longer polled) and the queue is not processed until the limiter's
//! timer fires. The two timer fds are in the tap's private epoll, so the same
//! [`NetQueues::event_fd`] wakes the device; its handler calls [`NetQueues::handle_timers`].
//!
//! A malformed chain (address outside guest memory, wrong descriptor direction, too long, too
//! short for the header, too many descriptors) is returned with used length 0 and counted; the
//! queue goes on with the next chain. Only a used ring that cannot be written (or the tap's epoll
//! failing) is an `Err` for the whole pass.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::metrics::NetMetrics;
use super::tap::{Tap, TapError, VNET_HDR_LEN};
use super::NetRateLimits;
use crate::rate_limiter::{RateLimiter, RateLimiterError};

/// Virtio device id of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Number of queues (one rx/tx pair, no control queue).
pub const NUM_QUEUES: usize = 2;
/// Largest queue size we accept (QEMU's vhost-user devices ask for up to 1024).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Longest Ethernet frame carried (without the virtio-net header).
pub const MAX_FRAME_LEN: usize = 65_550;
/// Size of the rx and tx frame buffers: header + longest frame.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Most descriptors accepted in one chain (Linux uses at most MAX_SKB_FRAGS + 2 = 19).
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;
/// Frames read from the tap in one pass (the tap stays polled: the next pass follows at once).
pub const RX_FRAMES_PER_PASS: usize = 256;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Private epoll tokens: the tap and the two limiters' timers.
const TAP_TOKEN: u64 = 0;
const RX_TIMER_TOKEN: u64 = 1;
const TX_TIMER_TOKEN: u64 = 2;

/// Errors of virtio-net queue processing.
#[derive(Debug, thiserror::Error)]
pub enum NetQueueError {
    /// The `net::rx` failpoint dropped the frame.
    #[error("failpoint {}", crate::failpoints::NET_RX)]
    Injected,
    /// The chain has more descriptors than allowed.
    #[error("descriptor chain has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// A tx chain has a device-writable descriptor.
    #[error("tx chain has a write-only descriptor at {addr:#x}")]
    WriteOnlyInTx {
        /// Guest address of the descriptor.
        addr: u64,
    },
    /// An rx chain has a device-readable descriptor.
    #[error("rx chain has a read-only descriptor at {addr:#x}")]
    ReadOnlyInRx {
        /// Guest address of the descriptor.
        addr: u64,
    },
    /// A descriptor points outside guest memory.
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutOfRange {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A tx chain is longer than the frame buffer.
    #[error("tx chain is longer than {MAX_BUFFER_LEN} bytes (at least {len})")]
    TxTooLong {
        /// Bytes seen when the bound was crossed.
        len: usize,
    },
    /// A chain is too short for the header (and, in tx, a frame behind it).
    #[error("chain of {len} bytes is too short for the {VNET_HDR_LEN}-byte virtio-net header and a frame")]
    TooShort {
        /// Length of the chain.
        len: usize,
    },
    /// A frame from the tap does not fit the guest's rx chain (the frame is dropped).
    #[error("frame of {frame} bytes (+{VNET_HDR_LEN} header) does not fit the rx chain of {capacity} bytes")]
    FrameTooLarge {
        /// Frame length.
        frame: usize,
        /// Writable length of the chain.
        capacity: usize,
    },
    /// The tap returned less than a vnet header.
    #[error("tap returned a {len}-byte frame, shorter than the vnet header")]
    ShortTapFrame {
        /// Bytes read.
        len: usize,
    },
    /// Reading from or writing to the tap failed.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The tap's private epoll failed.
    #[error("tap {name}: epoll: {source}")]
    Poll {
        /// The tap.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// A rate limiter's timer failed.
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
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
pub struct Pass {
    /// Chains returned to the used ring.
    pub used: u32,
    /// Every failure of the pass, in order (bounded by the queue size plus the tap frames
    /// read in one pass).
    pub errors: Vec<NetQueueError>,
}

impl Pass {
    /// True if the used ring changed (the driver may need a notification).
    pub fn used_any(&self) -> bool {
        self.used > 0
    }

    fn fail(&mut self, e: NetQueueError) {
        tracing::debug!("virtio-net: {e}");
        self.errors.push(e);
    }
}

/// The `virtio_net_hdr_v1` the device puts in front of every received frame: no checksum or
/// GSO information (none negotiated), one buffer.
pub fn rx_header() -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[NUM_BUFFERS_OFFSET..].copy_from_slice(&1u16.to_le_bytes());
    h
}

/// Gathers the readable descriptors of a tx chain into `buf`; returns the chain's length.
/// Public for the fuzz targets (`fuzz/`).
pub fn gather_tx<M>(
    mem: &M::Target,
    chain: DescriptorChain<M>,
    buf: &mut [u8],
) -> Result<usize, NetQueueError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut len = 0usize;
    for (i, d) in chain.enumerate() {
        if i >= MAX_CHAIN_DESCRIPTORS {
            return Err(NetQueueError::TooManyDescriptors);
        }
        if d.is_write_only() {
            return Err(NetQueueError::WriteOnlyInTx { addr: d.addr().0 });
        }
        let end = len + d.len() as usize;
        if end > buf.len() {
            return Err(NetQueueError::TxTooLong { len: end });
        }
        mem.read_slice(&mut buf[len..end], d.addr())
            .map_err(|_| NetQueueError::OutOfRange {
                addr: d.addr().0,
                len: d.len(),
            })?;
        len = end;
    }
    if len <= VNET_HDR_LEN {
        return Err(NetQueueError::TooShort { len });
    }
    Ok(len)
}

/// Copies `data` (header + frame) into the writable descriptors of an rx chain after checking
/// the whole chain; returns the used length. Public for the fuzz targets (`fuzz/`).
pub fn scatter_rx<M>(
    mem: &M::Target,
    chain: DescriptorChain<M>,
    data: &[u8],
) -> Result<u32, NetQueueError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut descs = [(vm_memory::GuestAddress(0), 0u32); MAX_CHAIN_DESCRIPTORS];
    let mut n = 0;
    let mut capacity = 0usize;
    for d in chain {
        if n >= MAX_CHAIN_DESCRIPTORS {
            return Err(NetQueueError::TooManyDescriptors);
        }
        if !d.is_write_only() {
            return Err(NetQueueError::ReadOnlyInRx { addr: d.addr().0 });
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(NetQueueError::OutOfRange {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        capacity += d.len() as usize;
        descs[n] = (d.addr(), d.len());
        n += 1;
    }
    if capacity < VNET_HDR_LEN {
        return Err(NetQueueError::TooShort { len: capacity });
    }
    if capacity < data.len() {
        return Err(NetQueueError::FrameTooLarge {
            frame: data.len() - VNET_HDR_LEN,
            capacity,
        });
    }
    let mut off = 0;
    for &(addr, len) in &descs[..n] {
        if off == data.len() {
            break;
        }
        let end = data.len().min(off + len as usize);
        mem.write_slice(&data[off..end], addr)
            .map_err(|_| NetQueueError::OutOfRange { addr: addr.0, len })?;
        off = end;
    }
    // At most MAX_BUFFER_LEN.
    Ok(data.len() as u32)
}

fn add_used<M: GuestMemory, Q: QueueT>(
    queue: &mut Q,
    mem: &M,
    head: u16,
    len: u32,
) -> Result<(), NetQueueError> {
    queue
        .add_used(mem, head, len)
        .map_err(|source| NetQueueError::UsedRing {
            index: head,
            source,
        })
}

/// The data path of one virtio-net device: the tap, its poller, the pending rx frame, the tx
/// buffer and the counters.
pub struct NetQueues {
    tap: Tap,
    poll: Epoll,
    /// Whether the tap fd is in `poll`.
    tap_polled: bool,
    /// Tap read buffer; `rx_len` bytes of it are a frame not yet delivered.
    rx_buf: Vec<u8>,
    rx_len: Option<usize>,
    tx_buf: Vec<u8>,
    metrics: Arc<NetMetrics>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
}

/// Which limiter timers fired ([`NetQueues::handle_timers`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimersFired {
    /// The rx limiter is open again: process rx.
    pub rx: bool,
    /// The tx limiter is open again: process tx.
    pub tx: bool,
}

/// Puts the chain just popped back on the avail ring (processed again later).
fn undo_pop<Q: QueueT>(queue: &mut Q) {
    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
}

impl std::fmt::Debug for NetQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetQueues")
            .field("tap", &self.tap.name())
            .field("tap_polled", &self.tap_polled)
            .field("pending_rx", &self.rx_len)
            .field("rx_limiter", &self.rx_limiter)
            .field("tx_limiter", &self.tx_limiter)
            .finish()
    }
}

impl NetQueues {
    /// Takes the tap; it is not polled before [`process_rx`](Self::process_rx) or
    /// [`resume_rx`](Self::resume_rx) asks for it.
    pub fn new(tap: Tap, limits: NetRateLimits) -> Result<Self, NetQueueError> {
        let poll_err = |source| NetQueueError::Poll {
            name: tap.name().to_string(),
            source,
        };
        let poll = Epoll::new().map_err(poll_err)?;
        let rx_limiter = RateLimiter::new(limits.rx)?;
        let tx_limiter = RateLimiter::new(limits.tx)?;
        for (l, token) in [(&rx_limiter, RX_TIMER_TOKEN), (&tx_limiter, TX_TIMER_TOKEN)] {
            if let Some(fd) = l.fd() {
                poll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
                    .map_err(poll_err)?;
            }
        }
        Ok(NetQueues {
            rx_limiter,
            tx_limiter,
            tap,
            poll,
            tap_polled: false,
            rx_buf: vec![0; MAX_BUFFER_LEN],
            rx_len: None,
            tx_buf: vec![0; MAX_BUFFER_LEN],
            metrics: Arc::new(NetMetrics::default()),
        })
    }

    /// The fd to watch (readable: a tap frame waits and rx is not blocked).
    pub fn event_fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }

    /// The tap.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The device's counters.
    pub fn metrics(&self) -> &Arc<NetMetrics> {
        &self.metrics
    }

    /// Whether a frame read from the tap waits for an rx buffer.
    pub fn has_pending_frame(&self) -> bool {
        self.rx_len.is_some()
    }

    /// Whether the tap is polled.
    pub fn tap_polled(&self) -> bool {
        self.tap_polled
    }

    fn set_tap_polled(&mut self, on: bool) -> Result<(), NetQueueError> {
        if on == self.tap_polled {
            return Ok(());
        }
        let (op, events) = if on {
            (ControlOperation::Add, EventSet::IN)
        } else {
            (ControlOperation::Delete, EventSet::empty())
        };
        self.poll
            .ctl(op, self.tap.as_raw_fd(), EpollEvent::new(events, TAP_TOKEN))
            .map_err(|source| NetQueueError::Poll {
                name: self.tap.name().to_string(),
                source,
            })?;
        self.tap_polled = on;
        Ok(())
    }

    /// Reads the limiters' timers (call on every readiness of [`event_fd`](Self::event_fd)):
    /// a limiter whose timer fired is open again and its queue should be processed.
    pub fn handle_timers(&mut self) -> Result<TimersFired, NetQueueError> {
        Ok(TimersFired {
            rx: self.rx_limiter.event_handler()?,
            tx: self.tx_limiter.event_handler()?,
        })
    }

    /// Times the (rx, tx) limiters refused a frame.
    pub fn throttled(&self) -> (u64, u64) {
        (
            self.rx_limiter.throttled_count(),
            self.tx_limiter.throttled_count(),
        )
    }

    /// Starts polling the tap (the device became active).
    pub fn resume_rx(&mut self) -> Result<(), NetQueueError> {
        self.set_tap_polled(true)
    }

    /// Stops polling the tap (device inactive, or its rx queue not usable); frames stay queued
    /// in the tap.
    pub fn pause_rx(&mut self) -> Result<(), NetQueueError> {
        self.set_tap_polled(false)
    }

    /// The driver reset the device: stop polling, drop the pending frame (counted).
    pub fn reset(&mut self) -> Result<(), NetQueueError> {
        if self.rx_len.take().is_some() {
            NetMetrics::add(&self.metrics.rx_dropped, 1);
        }
        self.pause_rx()
    }

    /// Sends every available tx chain to the tap, until the tx limiter refuses one (it stays
    /// on the avail ring).
    pub fn process_tx<M: GuestMemory, Q: QueueT>(
        &mut self,
        mem: &M,
        queue: &mut Q,
    ) -> Result<Pass, NetQueueError> {
        let mut pass = Pass::default();
        while !self.tx_limiter.is_blocked() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let gathered = gather_tx(mem, chain, &mut self.tx_buf);
            // A malformed chain costs one op.
            let bytes = gathered.as_ref().map_or(0, |len| len - VNET_HDR_LEN);
            if !self.tx_limiter.consume(bytes as u64)? {
                undo_pop(queue);
                break;
            }
            match gathered {
                Ok(_) if crate::failpoints::fired(crate::failpoints::NET_TX).is_some() => {
                    NetMetrics::add(&self.metrics.tx_dropped, 1);
                }
                Ok(len) => self.send(len, &mut pass),
                Err(e) => {
                    NetMetrics::add(&self.metrics.tx_errors, 1);
                    pass.fail(e);
                }
            }
            add_used(queue, mem, head, 0)?;
            pass.used += 1;
        }
        Ok(pass)
    }

    /// Writes the gathered `len` bytes of the tx buffer to the tap behind a zero header.
    fn send(&mut self, len: usize, pass: &mut Pass) {
        self.tx_buf[..VNET_HDR_LEN].fill(0);
        match self.tap.write_frame(&self.tx_buf[..len]) {
            Ok(true) => {
                NetMetrics::add(&self.metrics.tx_packets, 1);
                NetMetrics::add(&self.metrics.tx_bytes, (len - VNET_HDR_LEN) as u64);
            }
            Ok(false) => NetMetrics::add(&self.metrics.tx_dropped, 1),
            Err(e) => {
                NetMetrics::add(&self.metrics.tx_errors, 1);
                pass.fail(e.into());
            }
        }
    }

    /// Reads the next frame from the tap into the pending buffer. `Ok(true)`: a frame was taken
    /// off the tap (pending now, or dropped as malformed); `Ok(false)`: none queued.
    fn read_tap(&mut self, pass: &mut Pass) -> Result<bool, NetQueueError> {
        match self.tap.read_frame(&mut self.rx_buf)? {
            None => Ok(false),
            Some(n) if n < VNET_HDR_LEN => {
                NetMetrics::add(&self.metrics.rx_errors, 1);
                pass.fail(NetQueueError::ShortTapFrame { len: n });
                Ok(true)
            }
            Some(n) => {
                self.rx_len = Some(n);
                Ok(true)
            }
        }
    }

    /// Delivers tap frames into the rx chains of `queue` until the tap is empty, the guest has
    /// no rx buffer left or the rx limiter refuses the frame (the frame stays pending, the tap
    /// is no longer polled) or [`RX_FRAMES_PER_PASS`] frames were read (the tap stays polled).
    pub fn process_rx<M: GuestMemory, Q: QueueT>(
        &mut self,
        mem: &M,
        queue: &mut Q,
    ) -> Result<Pass, NetQueueError> {
        let mut pass = Pass::default();
        let mut frames = 0;
        let mut blocked = false;
        loop {
            let len = match self.rx_len {
                Some(len) => len,
                None if frames >= RX_FRAMES_PER_PASS => break,
                None => match self.read_tap(&mut pass) {
                    Ok(true) => {
                        frames += 1;
                        continue;
                    }
                    Ok(false) => break,
                    Err(e) => {
                        // Left polled: a passing error must not stall rx.
                        NetMetrics::add(&self.metrics.rx_errors, 1);
                        pass.fail(e);
                        break;
                    }
                },
            };
            if self.rx_limiter.is_blocked() {
                blocked = true;
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                blocked = true;
                break;
            };
            if !self.rx_limiter.consume((len - VNET_HDR_LEN) as u64)? {
                undo_pop(queue);
                blocked = true;
                break;
            }
            let head = chain.head_index();
            self.rx_buf[..VNET_HDR_LEN].copy_from_slice(&rx_header());
            let delivered = if crate::failpoints::fired(crate::failpoints::NET_RX).is_some() {
                Err(NetQueueError::Injected)
            } else {
                scatter_rx(mem, chain, &self.rx_buf[..len])
            };
            let used_len = match delivered {
                Ok(used_len) => {
                    NetMetrics::add(&self.metrics.rx_packets, 1);
                    NetMetrics::add(&self.metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
                    self.rx_len = None;
                    used_len
                }
                Err(e @ (NetQueueError::FrameTooLarge { .. } | NetQueueError::Injected)) => {
                    NetMetrics::add(&self.metrics.rx_dropped, 1);
                    self.rx_len = None;
                    pass.fail(e);
                    0
                }
                Err(e) => {
                    // The chain is unusable, the frame waits for the next one.
                    NetMetrics::add(&self.metrics.rx_errors, 1);
                    pass.fail(e);
                    0
                }
            };
            add_used(queue, mem, head, used_len)?;
            pass.used += 1;
        }
        self.set_tap_polled(!blocked)?;
        Ok(pass)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::net::tap::tests::{test_frame, test_tap, TestTap};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_bindings::virtio_net::virtio_net_hdr_v1;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    pub(crate) const QSIZE: u16 = 16;
    pub(crate) const W: u32 = VRING_DESC_F_WRITE;
    pub(crate) const WN: u32 = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
    pub(crate) const N: u32 = VRING_DESC_F_NEXT;

    pub(crate) fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    pub(crate) fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    /// The used ring's (id, len) entries.
    pub(crate) fn used(mock: &MockSplitQueue<GuestMemoryMmap<()>>) -> Vec<(u32, u32)> {
        (0..mock.used().idx().load())
            .map(|i| mock.used().ring().ref_at(usize::from(i)).unwrap().load())
            .map(|e| (e.id(), e.len()))
            .collect()
    }

    /// Writes `hdr` (12 bytes of 0xaa: the device must not pass it on) + `frame` at `addr`.
    pub(crate) fn put_tx(m: &GuestMemoryMmap<()>, addr: u64, frame: &[u8]) -> u32 {
        m.write_slice(&[0xaa; VNET_HDR_LEN], GuestAddress(addr))
            .unwrap();
        m.write_slice(frame, GuestAddress(addr + VNET_HDR_LEN as u64))
            .unwrap();
        (VNET_HDR_LEN + frame.len()) as u32
    }

    fn setup() -> (TestTap, NetQueues, GuestMemoryMmap<()>) {
        let t = test_tap();
        let q = NetQueues::new(t.tap.try_clone().unwrap(), NetRateLimits::default()).unwrap();
        (t, q, mem())
    }

    /// Waits (5 s deadline) until the device's event fd is readable.
    pub(crate) fn wait_readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one live pollfd.
        let r = unsafe { libc::poll(&mut p, 1, 5000) };
        r == 1
    }

    /// Whether the fd is readable right now.
    pub(crate) fn readable_now(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one live pollfd, no wait.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn header_layout() {
        assert_eq!(std::mem::size_of::<virtio_net_hdr_v1>(), VNET_HDR_LEN);
        assert_eq!(rx_header(), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(MAX_BUFFER_LEN, 65_562);
    }

    #[test]
    fn tx_frames_reach_the_tap_and_bad_chains_are_consumed() {
        let (t, mut q, m) = setup();
        let f1 = test_frame(60, 3);
        let f2 = test_frame(1514, 9);
        let l1 = put_tx(&m, 0x1_0000, &f1);
        // f2 split over three descriptors: header alone, then the frame in two parts.
        let l2 = put_tx(&m, 0x2_0000, &f2);
        let mock = MockSplitQueue::create(&m, GuestAddress(0), QSIZE);
        let chains = [
            // 0: good, one descriptor.
            desc(0x1_0000, l1, 0, 0),
            // 1: write-only descriptor in tx.
            desc(0x1_0000, l1, W, 0),
            // 2: out of guest memory.
            desc(0x4000_0000, 100, 0, 0),
            // 3: only a header.
            desc(0x1_0000, VNET_HDR_LEN as u32, 0, 0),
            // 4: longer than the buffer bound (two descriptors of 40,000 bytes).
            desc(0x1_0000, 40_000, N, 5),
            desc(0x1_0000, 40_000, 0, 0),
            // 6: good, three descriptors.
            desc(0x2_0000, VNET_HDR_LEN as u32, N, 7),
            desc(0x2_0000 + VNET_HDR_LEN as u64, 1000, N, 8),
            desc(
                0x2_0000 + VNET_HDR_LEN as u64 + 1000,
                l2 - 1000 - VNET_HDR_LEN as u32,
                0,
                0,
            ),
        ];
        mock.add_desc_chains(&chains, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let out = q.process_tx(&m, &mut queue).unwrap();
        assert_eq!(out.used, 6);
        let errors: Vec<String> = out.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            [
                "tx chain has a write-only descriptor at 0x10000",
                "descriptor 0x40000000+100 is outside guest memory",
                "chain of 12 bytes is too short for the 12-byte virtio-net header and a frame",
                "tx chain is longer than 65562 bytes (at least 80000)",
            ]
        );
        assert_eq!(
            used(&mock),
            vec![(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (6, 0)]
        );
        assert_eq!(t.recv(), f1);
        assert_eq!(t.recv(), f2);
        let s = q.metrics().snapshot();
        assert_eq!(
            (s.tx_packets, s.tx_bytes),
            (2, (f1.len() + f2.len()) as u64)
        );
        assert_eq!((s.tx_errors, s.tx_dropped), (4, 0));
        assert_eq!((s.rx_packets, s.rx_errors), (0, 0));
    }

    #[test]
    fn rx_frame_lands_in_the_guest_with_a_v1_header() {
        let (t, mut q, m) = setup();
        let f = test_frame(200, 5);
        t.send(&f);
        assert!(!q.tap_polled());
        q.resume_rx().unwrap();
        assert!(wait_readable(q.event_fd()), "tap frame not signalled");
        let mock = MockSplitQueue::create(&m, GuestAddress(0), QSIZE);
        // Header and frame split across two writable descriptors.
        mock.add_desc_chains(&[desc(0x1_0000, 100, WN, 1), desc(0x2_0000, 1500, W, 0)], 0)
            .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let out = q.process_rx(&m, &mut queue).unwrap();
        assert_eq!(out.used, 1);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let total = VNET_HDR_LEN + f.len();
        assert_eq!(used(&mock), vec![(0, total as u32)]);
        let mut got = vec![0u8; total];
        m.read_slice(&mut got[..100], GuestAddress(0x1_0000))
            .unwrap();
        m.read_slice(&mut got[100..], GuestAddress(0x2_0000))
            .unwrap();
        assert_eq!(got[..VNET_HDR_LEN], rx_header());
        assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
        // Tap drained, rx not blocked: still polled, but nothing to read.
        assert!(q.tap_polled() && !q.has_pending_frame());
        assert!(!readable_now(q.event_fd()));
        let s = q.metrics().snapshot();
        assert_eq!(
            (s.rx_packets, s.rx_bytes, s.rx_errors, s.rx_dropped),
            (1, 200, 0, 0)
        );
    }

    #[test]
    fn frame_waits_for_rx_buffers_and_tap_is_not_polled_meanwhile() {
        let (t, mut q, m) = setup();
        let f1 = test_frame(80, 1);
        let f2 = test_frame(90, 2);
        t.send(&f1);
        t.send(&f2);
        q.resume_rx().unwrap();
        assert!(wait_readable(q.event_fd()));
        let mock = MockSplitQueue::create(&m, GuestAddress(0), QSIZE);
        let mut queue: Queue = mock.create_queue().unwrap();
        // No rx buffer: f1 is kept, the tap is no longer polled although f2 waits in it.
        let out = q.process_rx(&m, &mut queue).unwrap();
        assert_eq!(out.used, 0);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert!(q.has_pending_frame() && !q.tap_polled());
        assert!(
            !readable_now(q.event_fd()),
            "a blocked rx must not wake the loop"
        );
        // The guest posts one buffer (and notifies): f1 is delivered, f2 is read and waits.
        mock.add_desc_chains(&[desc(0x1_0000, 2048, W, 0)], 0)
            .unwrap();
        let out = q.process_rx(&m, &mut queue).unwrap();
        assert_eq!(out.used, 1);
        assert!(q.has_pending_frame() && !q.tap_polled());
        let mut got = vec![0u8; f1.len()];
        m.read_slice(&mut got, GuestAddress(0x1_0000 + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, f1);
        // Another buffer: f2 arrives, the tap is polled again.
        mock.add_desc_chains(&[desc(0x2_0000, 2048, W, 0)], 1)
            .unwrap();
        let out = q.process_rx(&m, &mut queue).unwrap();
        assert_eq!(out.used, 1);
        assert!(!q.has_pending_frame() && q.tap_polled());
        let mut got = vec![0u8; f2.len()];
        m.read_slice(&mut got, GuestAddress(0x2_0000 + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, f2);
        assert_eq!(
            used(&mock),
            vec![
                (0, (VNET_HDR_LEN + 80) as u32),
                (1, (VNET_HDR_LEN + 90) as u32)
            ]
        );
        let s = q.metrics().snapshot();
        assert_eq!((s.rx_packets, s.rx_dropped, s.rx_errors), (2, 0, 0));
    }

    #[test]
    fn malformed_rx_chains_are_consumed_and_the_frame_goes_to_the_next_good_one() {
        let (t, mut q, m) = setup();
        let big = test_frame(1000, 4);
        let small = test_frame(64, 8);
        t.send(&big);
        t.send(&small);
        q.resume_rx().unwrap();
        assert!(wait_readable(q.event_fd()));
        let mock = MockSplitQueue::create(&m, GuestAddress(0), QSIZE);
        let chains = [
            // 0: read-only descriptor.
            desc(0x1_0000, 2048, 0, 0),
            // 1: outside guest memory.
            desc(0x4000_0000, 2048, W, 0),
            // 2: too short for the header.
            desc(0x1_0000, 8, W, 0),
            // 3: valid but too small for `big`: `big` is dropped.
            desc(0x1_0000, 512, W, 0),
            // 4: good: gets `small`.
            desc(0x3_0000, 512, W, 0),
        ];
        mock.add_desc_chains(&chains, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let out = q.process_rx(&m, &mut queue).unwrap();
        assert_eq!(out.used, 5);
        assert_eq!(
            used(&mock),
            vec![
                (0, 0),
                (1, 0),
                (2, 0),
                (3, 0),
                (4, (VNET_HDR_LEN + 64) as u32)
            ]
        );
        let mut got = vec![0u8; small.len()];
        m.read_slice(&mut got, GuestAddress(0x3_0000 + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, small);
        let s = q.metrics().snapshot();
        assert_eq!((s.rx_packets, s.rx_errors, s.rx_dropped), (1, 3, 1));
        // The error kinds, one per bad chain.
        let e = &out.errors;
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(matches!(
            e[0],
            NetQueueError::ReadOnlyInRx { addr: 0x1_0000 }
        ));
        assert!(matches!(
            e[1],
            NetQueueError::OutOfRange {
                addr: 0x4000_0000,
                len: 2048
            }
        ));
        assert!(matches!(e[2], NetQueueError::TooShort { len: 8 }));
        assert!(matches!(
            e[3],
            NetQueueError::FrameTooLarge {
                frame: 1000,
                capacity: 512
            }
        ));
    }

    #[test]
    fn too_many_descriptors_is_a_typed_error() {
        let m = mem();
        let n = MAX_CHAIN_DESCRIPTORS + 1;
        // The same 65-descriptor chain as tx (readable) and as rx (writable).
        for (next, last) in [(N, 0), (WN, W)] {
            let mock = MockSplitQueue::create(&m, GuestAddress(0), 128);
            let mut chain: Vec<_> = (0..n)
                .map(|i| desc(0x1_0000 + 16 * i as u64, 16, next, (i + 1) as u16))
                .collect();
            chain[n - 1] = desc(0x1_0000, 16, last, 0);
            mock.add_desc_chains(&chain, 0).unwrap();
            let mut queue: Queue = mock.create_queue().unwrap();
            let c = queue.pop_descriptor_chain(&m).unwrap();
            let r = if next == N {
                gather_tx(&m, c, &mut vec![0u8; MAX_BUFFER_LEN]).map(|_| ())
            } else {
                scatter_rx(&m, c, &rx_header()).map(|_| ())
            };
            assert!(matches!(r, Err(NetQueueError::TooManyDescriptors)), "{r:?}");
        }
    }

    #[test]
    fn reset_drops_the_pending_frame_and_stops_polling() {
        let (t, mut q, m) = setup();
        t.send(&test_frame(64, 0));
        q.resume_rx().unwrap();
        assert!(wait_readable(q.event_fd()));
        let mock = MockSplitQueue::create(&m, GuestAddress(0), QSIZE);
        let mut queue: Queue = mock.create_queue().unwrap();
        q.process_rx(&m, &mut queue).unwrap();
        assert!(q.has_pending_frame());
        q.reset().unwrap();
        assert!(!q.has_pending_frame() && !q.tap_polled());
        assert_eq!(q.metrics().snapshot().rx_dropped, 1);
    }

    /// 1000 bytes/s in a 1000-byte bucket (1 s refill time).
    fn slow() -> crate::rate_limiter::LimiterConfig {
        crate::rate_limiter::LimiterConfig {
            bandwidth: crate::rate_limiter::BucketConfig {
                rate: 1000,
                one_time_burst: 0,
                refill_time_ms: 1000,
            },
            ops: Default::default(),
        }
    }

    /// tx over the limit: the chain that does not fit stays on the avail ring, nothing more goes
    /// out (even on a new kick) until the limiter's timer makes the event fd readable.
    #[test]
    fn tx_limiter_holds_chains_until_its_timer_fires() {
        let t = test_tap();
        let limits = NetRateLimits { rx: Default::default(), tx: slow() };
        let mut q = NetQueues::new(t.tap.try_clone().unwrap(), limits).unwrap();
        let m = mem();
        let frames: Vec<_> = (0..3).map(|i| test_frame(400, i)).collect();
        let mock = MockSplitQueue::create(&m, GuestAddress(0), QSIZE);
        let chains: Vec<_> = frames
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let addr = 0x1_0000 * (i as u64 + 1);
                desc(addr, put_tx(&m, addr, f), 0, 0)
            })
            .collect();
        mock.add_desc_chains(&chains, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let t0 = std::time::Instant::now();
        assert_eq!(q.process_tx(&m, &mut queue).unwrap().used, 2);
        assert_eq!(used(&mock), vec![(0, 0), (1, 0)]);
        assert_eq!(queue.next_avail(), 2);
        assert_eq!(q.throttled(), (0, 1));
        assert_eq!((t.recv(), t.recv()), (frames[0].clone(), frames[1].clone()));
        // Blocked: a kick does nothing.
        assert_eq!(q.process_tx(&m, &mut queue).unwrap().used, 0);
        assert_eq!(q.handle_timers().unwrap(), TimersFired::default());
        // 200 more bytes take 200 ms.
        assert!(wait_readable(q.event_fd()));
        assert!(t0.elapsed() >= std::time::Duration::from_millis(150));
        assert_eq!(q.handle_timers().unwrap(), TimersFired { rx: false, tx: true });
        assert!(!readable_now(q.event_fd()));
        assert_eq!(q.process_tx(&m, &mut queue).unwrap().used, 1);
        assert_eq!(t.recv(), frames[2]);
        assert_eq!(q.metrics().snapshot().tx_bytes, 1200);
    }

    /// rx over the limit: the frame stays pending and the tap unpolled until the timer fires,
    /// though the guest has buffers.
    #[test]
    fn rx_limiter_keeps_the_frame_pending_until_its_timer_fires() {
        let t = test_tap();
        let limits = NetRateLimits { rx: slow(), tx: Default::default() };
        let mut q = NetQueues::new(t.tap.try_clone().unwrap(), limits).unwrap();
        let m = mem();
        let mock = MockSplitQueue::create(&m, GuestAddress(0), QSIZE);
        let bufs: Vec<_> = (0..4).map(|i| desc(0x1_0000 * (i + 1), 2048, W, 0)).collect();
        mock.add_desc_chains(&bufs, 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        for i in 0..3 {
            t.send(&test_frame(400, i));
        }
        q.resume_rx().unwrap();
        assert!(wait_readable(q.event_fd()));
        assert_eq!(q.process_rx(&m, &mut queue).unwrap().used, 2);
        assert!(q.has_pending_frame() && !q.tap_polled());
        assert_eq!(q.throttled(), (1, 0));
        assert_eq!(queue.next_avail(), 2);
        assert!(wait_readable(q.event_fd()));
        assert_eq!(q.handle_timers().unwrap(), TimersFired { rx: true, tx: false });
        assert_eq!(q.process_rx(&m, &mut queue).unwrap().used, 1);
        let l = (VNET_HDR_LEN + 400) as u32;
        assert_eq!(used(&mock), vec![(0, l), (1, l), (2, l)]);
        assert!(!q.has_pending_frame() && q.tap_polled());
        assert_eq!(q.metrics().snapshot().rx_bytes, 1200);
    }
}
