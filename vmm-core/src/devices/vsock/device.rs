// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The virtio-vsock device model: moves packets between the virtqueues and the muxer.
//!
//! Transport independent: it only needs a `GuestMemory` and a `virtio_queue` queue, so the same
//! code serves vhost-user (see `vhost_user.rs`) and an in-process virtio transport.
//!
//! Every descriptor chain that is popped is returned to the used ring, malformed or not, so a
//! buggy or malicious driver can never wedge a queue.
//!
//! Rate limits ([`VsockDevice::set_rate_limits`], off by default): a tx packet is charged one
//! op and its payload before the muxer sees it (over the limit, its chain goes back to the avail
//! ring); an rx packet is charged once built (its size is known only then). A blocked direction
//! is not processed until its timer fires; the timers and the muxer's fd are then watched
//! through one epoll ([`VsockDevice::event_fd`]).

use virtio_queue::{DescriptorChain, QueueOwnedT};
use virtio_vsock::packet::{Error as PacketError, VsockPacket};
use vm_memory::GuestMemory;

use tracing::{debug, warn};

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::metrics::VsockMetrics;
use super::muxer::{MuxerError, VsockMuxer};
use super::packet::HEADER_SIZE;
use super::VsockConfig;
use crate::rate_limiter::{LimiterConfig, RateLimiter, RateLimiterError};

/// Index of the receive (device to driver) queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit (driver to device) queue.
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (unused: we never send transport events).
pub const EVT_QUEUE: usize = 2;
/// Number of virtqueues of a vsock device.
pub const NUM_QUEUES: usize = 3;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest queue a frontend may configure (QEMU's vhost-user-vsock-device asks for 1024).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Largest payload accepted in one packet (Linux uses 64 KiB, `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Size of the device config space (`le64 guest_cid`).
pub const CONFIG_SPACE_SIZE: usize = 8;

/// Errors of the vsock device model.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A tx descriptor chain could not be parsed as a vsock packet.
    #[error("malformed tx descriptor chain: {0}")]
    MalformedTxChain(#[source] PacketError),
    /// An rx descriptor chain could not be used as a vsock packet buffer.
    #[error("malformed rx descriptor chain: {0}")]
    MalformedRxChain(#[source] PacketError),
    /// Accessing the virtqueue itself failed.
    #[error("virtqueue error: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// Host side (muxer) failure.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    /// A rate limiter could not be set up or armed.
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
    /// The epoll of the muxer and the rate limiters' timers failed.
    #[error("vsock event epoll: {0}")]
    Epoll(#[source] std::io::Error),
    /// The guest CID is reserved (0, 1, 2 and `u32::MAX` and above are not valid guest CIDs).
    #[error("invalid guest CID {0}")]
    InvalidCid(u64),
}

/// The vsock device: config space plus packet processing for the rx and tx queues.
#[derive(Debug)]
pub struct VsockDevice {
    guest_cid: u64,
    muxer: VsockMuxer,
    malformed_chains: u64,
    last_chain_error: Option<DeviceError>,
    metrics: Arc<VsockMetrics>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// The muxer's fd and the limiters' timers (only when limited).
    poll: Option<Epoll>,
}

impl VsockDevice {
    /// Creates the device with `cfg.limits` and binds the hybrid-vsock listener at
    /// `cfg.uds_path`.
    pub fn new(cfg: &VsockConfig) -> Result<Self, DeviceError> {
        if cfg.guest_cid <= 2 || cfg.guest_cid >= u64::from(u32::MAX) {
            return Err(DeviceError::InvalidCid(cfg.guest_cid));
        }
        let muxer = VsockMuxer::new(cfg.guest_cid, &cfg.uds_path)?;
        let mut dev = Self::with_muxer(muxer);
        if cfg.limits.is_limited() {
            dev.set_rate_limits(cfg.limits.rx, cfg.limits.tx)?;
        }
        Ok(dev)
    }

    /// Wraps an existing muxer.
    pub fn with_muxer(muxer: VsockMuxer) -> Self {
        VsockDevice {
            guest_cid: muxer.guest_cid(),
            muxer,
            malformed_chains: 0,
            last_chain_error: None,
            metrics: Arc::new(VsockMetrics::default()),
            rx_limiter: RateLimiter::default(),
            tx_limiter: RateLimiter::default(),
            poll: None,
        }
    }

    /// Limits the packets to the guest (`rx`) and from it (`tx`): ops are packets, bandwidth
    /// is payload bytes. Unlimited by default.
    pub fn set_rate_limits(
        &mut self,
        rx: LimiterConfig,
        tx: LimiterConfig,
    ) -> Result<(), DeviceError> {
        self.rx_limiter = RateLimiter::new(rx)?;
        self.tx_limiter = RateLimiter::new(tx)?;
        self.rx_limiter
            .count_throttled_in(self.metrics.rx_throttled.clone());
        self.tx_limiter
            .count_throttled_in(self.metrics.tx_throttled.clone());
        self.poll = None;
        let timers: Vec<RawFd> = [self.rx_limiter.fd(), self.tx_limiter.fd()]
            .into_iter()
            .flatten()
            .collect();
        if timers.is_empty() {
            return Ok(());
        }
        let poll = Epoll::new().map_err(DeviceError::Epoll)?;
        for fd in timers.into_iter().chain([self.muxer.as_raw_fd()]) {
            poll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd as u64))
                .map_err(DeviceError::Epoll)?;
        }
        self.poll = Some(poll);
        Ok(())
    }

    /// The fd to watch: readable when the host side has work for
    /// [`process_host_events`](Self::process_host_events) or a rate limiter's tokens are back.
    pub fn event_fd(&self) -> RawFd {
        match &self.poll {
            Some(p) => p.as_raw_fd(),
            None => self.muxer.as_raw_fd(),
        }
    }

    /// Times the (rx, tx) limiters blocked.
    pub fn throttled(&self) -> (u64, u64) {
        (
            self.rx_limiter.throttled_count(),
            self.tx_limiter.throttled_count(),
        )
    }

    /// The device's counters (shared; read them at any time from any thread).
    pub fn metrics(&self) -> &Arc<VsockMetrics> {
        &self.metrics
    }

    /// The guest CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The config space: `le64 guest_cid`.
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        self.guest_cid.to_le_bytes()
    }

    /// Reads `size` bytes of config space at `offset`; empty if out of range.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config_space();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= cfg.len() => cfg[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    /// The muxer (host side).
    pub fn muxer(&self) -> &VsockMuxer {
        &self.muxer
    }

    /// Mutable access to the muxer.
    pub fn muxer_mut(&mut self) -> &mut VsockMuxer {
        &mut self.muxer
    }

    /// Number of malformed descriptor chains seen so far.
    pub fn malformed_chains(&self) -> u64 {
        self.malformed_chains
    }

    /// Takes the error of the most recent malformed descriptor chain.
    pub fn take_last_chain_error(&mut self) -> Option<DeviceError> {
        self.last_chain_error.take()
    }

    /// Handles host socket readiness and the rate limiters' timers (never blocks).
    pub fn process_host_events(&mut self) -> Result<(), DeviceError> {
        self.rx_limiter.event_handler()?;
        self.tx_limiter.event_handler()?;
        self.muxer.process_host_events()?;
        Ok(())
    }

    /// Consumes every available tx chain, until the tx limiter refuses one. Returns whether the
    /// used ring changed.
    pub fn process_tx_queue<M, Q>(&mut self, mem: &M, queue: &mut Q) -> Result<bool, DeviceError>
    where
        M: GuestMemory,
        Q: QueueOwnedT,
    {
        self.process_queue(
            mem,
            queue,
            |dev| !dev.tx_limiter.is_blocked(),
            |dev, chain| {
                let pkt = VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_DATA);
                // A malformed chain costs one op.
                let bytes = pkt.as_ref().map_or(0, |p| u64::from(p.len()));
                if !dev.tx_limiter.consume(bytes).unwrap_or_else(|e| {
                    warn!("vsock: tx rate limiter: {e}");
                    true
                }) {
                    return None;
                }
                match pkt {
                    Ok(pkt) => {
                        VsockMetrics::add(&dev.metrics.tx_packets, 1);
                        VsockMetrics::add(&dev.metrics.tx_bytes, u64::from(pkt.len()));
                        dev.muxer.handle_guest_packet(&pkt)
                    }
                    Err(e) => dev.record_chain_error(DeviceError::MalformedTxChain(e)),
                }
                Some(0)
            },
        )
    }

    /// Fills available rx chains with pending packets. Returns whether the used ring changed.
    pub fn process_rx_queue<M, Q>(&mut self, mem: &M, queue: &mut Q) -> Result<bool, DeviceError>
    where
        M: GuestMemory,
        Q: QueueOwnedT,
    {
        let pending = |dev: &Self| dev.muxer.has_pending_rx() && !dev.rx_limiter.is_blocked();
        self.process_queue(mem, queue, pending, |dev, chain| {
            match VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_DATA) {
                Ok(mut pkt) => {
                    // `None`: nothing to send after all, the buffer goes back to the queue.
                    let len = dev.muxer.fill_rx_packet(&mut pkt)?;
                    VsockMetrics::add(&dev.metrics.rx_packets, 1);
                    let payload = u64::from(len).saturating_sub(HEADER_SIZE as u64);
                    VsockMetrics::add(&dev.metrics.rx_bytes, payload);
                    if let Err(e) = dev.rx_limiter.charge(payload) {
                        warn!("vsock: rx rate limiter: {e}");
                    }
                    Some(len)
                }
                Err(e) => {
                    dev.record_chain_error(DeviceError::MalformedRxChain(e));
                    Some(0)
                }
            }
        })
    }

    /// Pops chains while `more` holds and returns each to the used ring with the length
    /// `handle` gives it; `handle` answering `None` puts the chain back and stops. Returns
    /// whether the used ring changed.
    fn process_queue<'m, M, Q>(
        &mut self,
        mem: &'m M,
        queue: &mut Q,
        more: impl Fn(&Self) -> bool,
        mut handle: impl FnMut(&mut Self, &mut DescriptorChain<&'m M>) -> Option<u32>,
    ) -> Result<bool, DeviceError>
    where
        M: GuestMemory,
        Q: QueueOwnedT,
    {
        if !queue.ready() {
            return Ok(false);
        }
        let mut used = false;
        while more(self) {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let Some(len) = handle(self, &mut chain) else {
                queue.go_to_previous_position();
                break;
            };
            queue.add_used(mem, head, len)?;
            used = true;
        }
        Ok(used)
    }

    fn record_chain_error(&mut self, e: DeviceError) {
        self.malformed_chains += 1;
        VsockMetrics::add(&self.metrics.malformed_chains, 1);
        if self.malformed_chains <= 16 || self.malformed_chains.is_power_of_two() {
            warn!(
                "vsock: {e} (total malformed chains: {})",
                self.malformed_chains
            );
        } else {
            debug!("vsock: {e}");
        }
        self.last_chain_error = Some(e);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{ErrorKind, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::super::muxer::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
    use super::super::packet::*;
    use super::*;

    const GUEST_CID: u64 = 3;
    const MEM_SIZE: usize = 32 << 20;
    const RX_RING: u64 = 0;
    const TX_RING: u64 = 0x8000;
    const BUF_BASE: u64 = 0x10_0000;

    /// Plays the guest driver: owns guest memory, both queues and the device.
    struct Guest {
        mem: &'static GuestMemoryMmap<()>,
        rx_mock: MockSplitQueue<'static, GuestMemoryMmap<()>>,
        tx_mock: MockSplitQueue<'static, GuestMemoryMmap<()>>,
        rx: Queue,
        tx: Queue,
        rx_desc_next: u16,
        tx_desc_next: u16,
        rx_used_seen: u16,
        tx_used_seen: u16,
        rx_bufs: HashMap<u16, (u64, u64)>,
        next_buf: u64,
        dev: VsockDevice,
        dir: tempfile::TempDir,
        /// Credit the guest advertises.
        buf_alloc: u32,
        fwd_cnt: u32,
    }

    #[derive(Debug, Clone)]
    struct RxPkt {
        hdr: VsockHeader,
        data: Vec<u8>,
    }

    impl Guest {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let cfg = VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: dir.path().join("vsock.sock"),
                limits: Default::default(),
            };
            let dev = VsockDevice::new(&cfg).unwrap();
            // Leaked on purpose: the mock queues borrow the memory for the whole test.
            let mem: &'static GuestMemoryMmap<()> = Box::leak(Box::new(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            ));
            let rx_mock = MockSplitQueue::create(mem, GuestAddress(RX_RING), QUEUE_SIZE);
            let tx_mock = MockSplitQueue::create(mem, GuestAddress(TX_RING), QUEUE_SIZE);
            let rx = rx_mock.create_queue().unwrap();
            let tx = tx_mock.create_queue().unwrap();
            Guest {
                mem,
                rx_mock,
                tx_mock,
                rx,
                tx,
                rx_desc_next: 0,
                tx_desc_next: 0,
                rx_used_seen: 0,
                tx_used_seen: 0,
                rx_bufs: HashMap::new(),
                next_buf: BUF_BASE,
                dev,
                dir,
                buf_alloc: CONN_BUF_ALLOC,
                fwd_cnt: 0,
            }
        }

        fn uds_path(&self) -> PathBuf {
            self.dir.path().join("vsock.sock")
        }

        fn alloc(&mut self, len: u64) -> u64 {
            let a = self.next_buf;
            self.next_buf += (len + 0xfff) & !0xfff;
            assert!(
                self.next_buf < MEM_SIZE as u64,
                "test guest memory exhausted"
            );
            a
        }

        fn hdr(&self, op: u16, src_port: u32, dst_port: u32) -> VsockHeader {
            VsockHeader {
                src_cid: GUEST_CID,
                dst_cid: VSOCK_HOST_CID,
                src_port,
                dst_port,
                len: 0,
                type_: VSOCK_TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: self.buf_alloc,
                fwd_cnt: self.fwd_cnt,
            }
        }

        /// Adds a raw tx chain (flags given per descriptor; NEXT is handled here).
        fn add_tx_chain(&mut self, descs: &[(u64, u32, u32)]) -> u16 {
            add_chain(&self.tx_mock, &mut self.tx_desc_next, descs)
        }

        fn add_rx_chain(&mut self, descs: &[(u64, u32, u32)]) -> u16 {
            add_chain(&self.rx_mock, &mut self.rx_desc_next, descs)
        }

        /// Puts a packet on the tx queue and lets the device process it.
        fn send(&mut self, mut hdr: VsockHeader, data: &[u8]) {
            hdr.len = data.len() as u32;
            let h = self.alloc(HEADER_SIZE as u64);
            self.mem
                .write_slice(&hdr.to_bytes(), GuestAddress(h))
                .unwrap();
            if data.is_empty() {
                self.add_tx_chain(&[(h, HEADER_SIZE as u32, 0)]);
            } else {
                let d = self.alloc(data.len() as u64);
                self.mem.write_slice(data, GuestAddress(d)).unwrap();
                self.add_tx_chain(&[(h, HEADER_SIZE as u32, 0), (d, data.len() as u32, 0)]);
            }
            assert!(self.dev.process_tx_queue(self.mem, &mut self.tx).unwrap());
        }

        /// Offers `n` rx buffers of `data_len` payload bytes each.
        fn offer_rx(&mut self, n: usize, data_len: u32) {
            for _ in 0..n {
                let h = self.alloc(HEADER_SIZE as u64);
                let d = self.alloc(u64::from(data_len));
                let head = self.add_rx_chain(&[
                    (h, HEADER_SIZE as u32, VRING_DESC_F_WRITE),
                    (d, data_len, VRING_DESC_F_WRITE),
                ]);
                self.rx_bufs.insert(head, (h, d));
            }
        }

        /// One device iteration: host events, then rx filling; returns the new rx packets.
        fn poll(&mut self) -> Vec<RxPkt> {
            self.dev.process_host_events().unwrap();
            self.dev.process_rx_queue(self.mem, &mut self.rx).unwrap();
            self.collect_rx()
        }

        fn collect_rx(&mut self) -> Vec<RxPkt> {
            let mut out = Vec::new();
            for (id, len) in take_used(&self.rx_mock, &mut self.rx_used_seen) {
                let (h, d) = self.rx_bufs[&(id as u16)];
                let mut raw = [0u8; HEADER_SIZE];
                self.mem.read_slice(&mut raw, GuestAddress(h)).unwrap();
                let hdr = VsockHeader::from_bytes(&raw);
                assert_eq!(len as usize, HEADER_SIZE + hdr.len as usize);
                let mut data = vec![0u8; hdr.len as usize];
                self.mem.read_slice(&mut data, GuestAddress(d)).unwrap();
                out.push(RxPkt { hdr, data });
            }
            out
        }

        /// Polls until `pred` holds for the accumulated packets (2 s max).
        fn poll_until(&mut self, pred: impl Fn(&[RxPkt]) -> bool) -> Vec<RxPkt> {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut all = Vec::new();
            loop {
                all.extend(self.poll());
                if pred(&all) {
                    return all;
                }
                assert!(Instant::now() < deadline, "timed out, got {all:?}");
                std::thread::sleep(Duration::from_millis(2));
            }
        }

        /// Reads `n` bytes from a host stream, pumping host events (buffered data is flushed on
        /// EPOLLOUT) but not the rx queue.
        fn host_read_exact(&mut self, s: &mut UnixStream, n: usize) -> Vec<u8> {
            s.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut out = vec![0u8; n];
            let mut got = 0;
            while got < n {
                self.dev.process_host_events().unwrap();
                match s.read(&mut out[got..]) {
                    Ok(0) => panic!("host stream closed after {got} bytes"),
                    Ok(k) => got += k,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline, "timed out after {got} bytes");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("read failed: {e}"),
                }
            }
            s.set_nonblocking(false).unwrap();
            out
        }

        fn tx_used(&mut self) -> Vec<(u32, u32)> {
            take_used(&self.tx_mock, &mut self.tx_used_seen)
        }

        /// A host process connects and writes `sent` (a CONNECT line, maybe more); returns its
        /// stream and the `OP_REQUEST` the guest got for it.
        fn host_request(&mut self, sent: &[u8]) -> (UnixStream, VsockHeader) {
            let mut host = UnixStream::connect(self.uds_path()).unwrap();
            host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            host.write_all(sent).unwrap();
            self.offer_rx(4, 4096);
            let pkts = self.poll_until(|p| !p.is_empty());
            assert_eq!(pkts.len(), 1);
            assert_eq!(pkts[0].hdr.op, VSOCK_OP_REQUEST);
            (host, pkts[0].hdr)
        }

        /// Host-initiated connection up to the OK line; returns (host stream, host port).
        fn host_connect(&mut self, guest_port: u32) -> (UnixStream, u32) {
            let (mut host, req) = self.host_request(format!("CONNECT {guest_port}\n").as_bytes());
            assert_eq!(req.dst_port, guest_port);
            assert_eq!(req.dst_cid, GUEST_CID);
            assert_eq!(req.src_cid, VSOCK_HOST_CID);
            assert_eq!(req.type_, VSOCK_TYPE_STREAM);
            assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
            let host_port = req.src_port;
            self.send(self.hdr(VSOCK_OP_RESPONSE, guest_port, host_port), &[]);
            let line = read_line(&mut host);
            assert_eq!(line, format!("OK {host_port}\n"));
            (host, host_port)
        }

        /// Guest-initiated connection to `<uds>_<port>` with a listener present.
        fn guest_connect(&mut self, guest_port: u32, host_port: u32) -> UnixStream {
            let listener =
                UnixListener::bind(format!("{}_{host_port}", self.uds_path().display())).unwrap();
            self.send(self.hdr(VSOCK_OP_REQUEST, guest_port, host_port), &[]);
            self.offer_rx(4, 4096);
            let pkts = self.poll_until(|p| !p.is_empty());
            assert_eq!(pkts.len(), 1);
            let resp = pkts[0].hdr;
            assert_eq!(resp.op, VSOCK_OP_RESPONSE);
            assert_eq!((resp.src_port, resp.dst_port), (host_port, guest_port));
            assert_eq!(resp.dst_cid, GUEST_CID);
            let (s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        }
    }

    /// Adds a raw chain to `mock` at descriptor index `*next`; returns its head.
    fn add_chain(
        mock: &MockSplitQueue<'static, GuestMemoryMmap<()>>,
        next: &mut u16,
        descs: &[(u64, u32, u32)],
    ) -> u16 {
        let head = *next;
        mock.add_desc_chains(&chain_descs(descs, head), head)
            .unwrap();
        *next += descs.len() as u16;
        head
    }

    fn chain_descs(descs: &[(u64, u32, u32)], first: u16) -> Vec<RawDescriptor> {
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT
                };
                let next = if last { 0 } else { first + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
            })
            .collect()
    }

    fn read_line(s: &mut UnixStream) -> String {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while out.last() != Some(&b'\n') {
            assert_eq!(s.read(&mut b).unwrap(), 1, "stream closed before newline");
            out.push(b[0]);
        }
        String::from_utf8(out).unwrap()
    }

    fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).unwrap();
        buf
    }

    fn rw_bytes(pkts: &[RxPkt]) -> usize {
        pkts.iter()
            .filter(|p| p.hdr.op == VSOCK_OP_RW)
            .map(|p| p.data.len())
            .sum()
    }

    #[test]
    fn config_space_holds_guest_cid() {
        let g = Guest::new();
        assert_eq!(g.dev.config_space(), 3u64.to_le_bytes());
        assert_eq!(g.dev.read_config(0, 8), 3u64.to_le_bytes().to_vec());
        assert_eq!(g.dev.read_config(0, 4), vec![3, 0, 0, 0]);
        assert!(g.dev.read_config(4, 8).is_empty());
        assert!(g.dev.read_config(u32::MAX, u32::MAX).is_empty());
    }

    #[test]
    fn reserved_guest_cid_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for cid in [0, 1, 2, u64::from(u32::MAX)] {
            let cfg = VsockConfig {
                guest_cid: cid,
                uds_path: dir.path().join("v.sock"),
                limits: Default::default(),
            };
            assert!(matches!(
                VsockDevice::new(&cfg),
                Err(DeviceError::InvalidCid(_))
            ));
        }
    }

    /// `VsockConfig.limits` gives the device its limiters: their timers and the muxer's fd
    /// are then watched through one epoll.
    #[test]
    fn config_limits_are_applied() {
        use crate::rate_limiter::BucketConfig;
        let dir = tempfile::tempdir().unwrap();
        let cfg = VsockConfig {
            guest_cid: 3,
            uds_path: dir.path().join("a.sock"),
            limits: Default::default(),
        };
        let d = VsockDevice::new(&cfg).unwrap();
        assert_eq!(d.event_fd(), d.muxer.as_raw_fd());
        let mut cfg = VsockConfig {
            uds_path: dir.path().join("b.sock"),
            ..cfg
        };
        cfg.limits.tx.ops = BucketConfig {
            rate: 10,
            one_time_burst: 0,
            refill_time_ms: 100,
        };
        let d = VsockDevice::new(&cfg).unwrap();
        assert_ne!(d.event_fd(), d.muxer.as_raw_fd());
        assert!(d.tx_limiter.is_limited() && !d.rx_limiter.is_limited());
    }

    #[test]
    fn host_initiated_connection_relays_both_ways() {
        let mut g = Guest::new();
        let (mut host, host_port) = g.host_connect(1024);
        assert!(host_port >= super::super::muxer::FIRST_HOST_PORT);

        // Host -> guest.
        host.write_all(b"hello guest").unwrap();
        let pkts = g.poll_until(|p| rw_bytes(p) >= 11);
        assert_eq!(pkts.len(), 1);
        let p = &pkts[0];
        assert_eq!(p.hdr.op, VSOCK_OP_RW);
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (host_port, 1024));
        assert_eq!(p.data, b"hello guest");

        // Guest -> host.
        g.send(g.hdr(VSOCK_OP_RW, 1024, host_port), b"hello host");
        assert_eq!(read_exact_timeout(&mut host, 10), b"hello host");
        assert_eq!(g.tx_used().len(), 2);

        // Counters: rx = OP_REQUEST + 11 payload bytes, tx = OP_RESPONSE + 10 payload bytes.
        let m = g.dev.metrics().snapshot();
        assert_eq!((m.rx_packets, m.rx_bytes), (2, 11), "{m:?}");
        assert_eq!((m.tx_packets, m.tx_bytes), (2, 10), "{m:?}");
        assert_eq!(m.malformed_chains, 0);
    }

    /// Rate limits: tx packets over the limit stay on the avail ring and rx packets wait in
    /// the muxer until each limiter's timer makes the device's event fd readable.
    #[test]
    fn rate_limits_hold_packets_until_their_timers_fire() {
        use crate::devices::net::device::tests::{readable_now, wait_readable};
        use crate::rate_limiter::BucketConfig;
        let ops = |rate| LimiterConfig {
            bandwidth: BucketConfig::default(),
            ops: BucketConfig {
                rate,
                one_time_burst: 0,
                refill_time_ms: 200,
            },
        };
        let mut g = Guest::new();
        assert_eq!(g.dev.event_fd(), g.dev.muxer().as_raw_fd());
        // tx: 2 packets at once, 10/s; rx: 1 at once, 5/s.
        g.dev.set_rate_limits(ops(5), ops(10)).unwrap();
        let fd = g.dev.event_fd();
        assert_ne!(fd, g.dev.muxer().as_raw_fd());
        // Three packets for unknown connections: each gets an RST back.
        for port in 0..3 {
            let hdr = g.hdr(VSOCK_OP_RW, 1234 + port, 4321);
            let h = g.alloc(HEADER_SIZE as u64);
            g.mem.write_slice(&hdr.to_bytes(), GuestAddress(h)).unwrap();
            g.add_tx_chain(&[(h, HEADER_SIZE as u32, 0)]);
        }
        assert!(g.dev.process_tx_queue(g.mem, &mut g.tx).unwrap());
        assert_eq!((g.tx.next_avail(), g.dev.throttled()), (2, (0, 1)));
        assert!(!g.dev.process_tx_queue(g.mem, &mut g.tx).unwrap());
        assert!(wait_readable(fd));
        g.dev.process_host_events().unwrap();
        assert!(g.dev.process_tx_queue(g.mem, &mut g.tx).unwrap());
        assert_eq!(g.tx.next_avail(), 3);
        // rx: one RST goes, then the limiter blocks with two pending.
        g.offer_rx(3, 4096);
        assert!(g.dev.process_rx_queue(g.mem, &mut g.rx).unwrap());
        assert_eq!((g.rx.next_avail(), g.dev.throttled()), (1, (1, 1)));
        let s = g.dev.metrics().snapshot();
        assert_eq!((s.rx_throttled, s.tx_throttled), (1, 1));
        assert!(g.dev.muxer().has_pending_rx());
        assert!(!readable_now(fd) || !g.dev.process_rx_queue(g.mem, &mut g.rx).unwrap());
        assert!(wait_readable(fd));
        g.dev.process_host_events().unwrap();
        assert!(g.dev.process_rx_queue(g.mem, &mut g.rx).unwrap());
        assert_eq!(g.rx.next_avail(), 2);
    }

    #[test]
    fn host_connect_refused_by_guest_closes_stream() {
        let mut g = Guest::new();
        let (mut host, req) = g.host_request(b"CONNECT 9999\n");
        g.send(g.hdr(VSOCK_OP_RST, 9999, req.src_port), &[]);
        let mut buf = [0u8; 16];
        assert_eq!(host.read(&mut buf).unwrap(), 0, "no OK line, just EOF");
        assert_eq!(g.dev.muxer().num_connections(), 0);
        // Nothing is sent in reply to the RST.
        assert!(g.poll().is_empty());
    }

    #[test]
    fn guest_initiated_connection_with_listener() {
        let mut g = Guest::new();
        let mut host = g.guest_connect(40000, 5000);
        g.send(g.hdr(VSOCK_OP_RW, 40000, 5000), b"ping");
        assert_eq!(read_exact_timeout(&mut host, 4), b"ping");
        host.write_all(b"pong").unwrap();
        let pkts = g.poll_until(|p| rw_bytes(p) >= 4);
        assert_eq!(pkts[0].hdr.op, VSOCK_OP_RW);
        assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (5000, 40000));
        assert_eq!(pkts[0].data, b"pong");
    }

    #[test]
    fn guest_initiated_connection_without_listener_gets_rst() {
        let mut g = Guest::new();
        g.send(g.hdr(VSOCK_OP_REQUEST, 40001, 5001), &[]);
        g.offer_rx(1, 4096);
        let pkts = g.poll_until(|p| !p.is_empty());
        assert_eq!(pkts.len(), 1);
        let h = pkts[0].hdr;
        assert_eq!(h.op, VSOCK_OP_RST);
        assert_eq!((h.src_port, h.dst_port), (5001, 40001));
        assert_eq!((h.src_cid, h.dst_cid), (VSOCK_HOST_CID, GUEST_CID));
        assert_eq!(g.dev.muxer().num_connections(), 0);
    }

    #[test]
    fn packet_for_unknown_connection_gets_rst() {
        let mut g = Guest::new();
        g.send(g.hdr(VSOCK_OP_RW, 1234, 4321), b"data");
        g.send(g.hdr(VSOCK_OP_CREDIT_REQUEST, 1235, 4321), &[]);
        let mut bad = g.hdr(VSOCK_OP_REQUEST, 1236, 4321);
        bad.dst_cid = 99;
        g.send(bad, &[]);
        let mut bad = g.hdr(VSOCK_OP_REQUEST, 1237, 4321);
        bad.type_ = 5;
        g.send(bad, &[]);
        g.offer_rx(8, 4096);
        let pkts = g.poll_until(|p| p.len() >= 4);
        assert!(pkts.iter().all(|p| p.hdr.op == VSOCK_OP_RST));
        let ports: Vec<u32> = pkts.iter().map(|p| p.hdr.dst_port).collect();
        assert_eq!(ports, vec![1234, 1235, 1236, 1237]);
        assert!(g.poll().is_empty());
    }

    #[test]
    fn device_never_exceeds_guest_credit() {
        let mut g = Guest::new();
        g.buf_alloc = 8192;
        let mut host = g.guest_connect(40002, 5002);
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        host.write_all(&payload).unwrap();

        g.offer_rx(16, 4096);
        let mut got = g.poll_until(|p| rw_bytes(p) >= 8192);
        // Give the device every chance to overrun the credit.
        for _ in 0..20 {
            got.extend(g.poll());
        }
        assert_eq!(rw_bytes(&got), 8192, "device exceeded the guest credit");

        // Credit request -> credit update.
        g.send(g.hdr(VSOCK_OP_CREDIT_REQUEST, 40002, 5002), &[]);
        let upd = g.poll_until(|p| !p.is_empty());
        assert_eq!(upd.len(), 1);
        assert_eq!(upd[0].hdr.op, VSOCK_OP_CREDIT_UPDATE);
        assert_eq!(upd[0].hdr.buf_alloc, CONN_BUF_ALLOC);

        // The guest consumed everything: sending resumes, again bounded by the credit.
        g.fwd_cnt = 8192;
        g.send(g.hdr(VSOCK_OP_CREDIT_UPDATE, 40002, 5002), &[]);
        let mut more = g.poll_until(|p| rw_bytes(p) >= 8192);
        for _ in 0..20 {
            more.extend(g.poll());
        }
        assert_eq!(rw_bytes(&more), 8192);
        g.fwd_cnt = 16384;
        g.send(g.hdr(VSOCK_OP_CREDIT_UPDATE, 40002, 5002), &[]);
        let rest = g.poll_until(|p| rw_bytes(p) >= 20_000 - 16384);
        got.extend(more);
        got.extend(rest);
        let data: Vec<u8> = got
            .iter()
            .filter(|p| p.hdr.op == VSOCK_OP_RW)
            .flat_map(|p| p.data.clone())
            .collect();
        assert_eq!(data, payload);
    }

    #[test]
    fn forwarded_guest_data_triggers_credit_update() {
        let mut g = Guest::new();
        let mut host = g.guest_connect(40003, 5003);
        let chunk = vec![7u8; 32 * 1024];
        let n = (CREDIT_UPDATE_THRESHOLD as usize / chunk.len()) + 1;
        for _ in 0..n {
            g.send(g.hdr(VSOCK_OP_RW, 40003, 5003), &chunk);
            assert_eq!(g.host_read_exact(&mut host, chunk.len()), chunk);
        }
        let pkts = g.poll_until(|p| !p.is_empty());
        let upd = pkts
            .iter()
            .find(|p| p.hdr.op == VSOCK_OP_CREDIT_UPDATE)
            .expect("credit update");
        assert!(upd.hdr.fwd_cnt >= CREDIT_UPDATE_THRESHOLD);
    }

    #[test]
    fn shutdown_both_ways() {
        let mut g = Guest::new();
        let (mut host, host_port) = g.host_connect(2000);
        // Guest stops sending: the host sees EOF.
        let mut h = g.hdr(VSOCK_OP_SHUTDOWN, 2000, host_port);
        h.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
        g.send(h, &[]);
        let mut buf = [0u8; 4];
        assert_eq!(host.read(&mut buf).unwrap(), 0);
        // Host can still send, then closes: guest gets data and a full SHUTDOWN.
        host.write_all(b"bye").unwrap();
        drop(host);
        let pkts = g.poll_until(|p| p.iter().any(|p| p.hdr.op == VSOCK_OP_SHUTDOWN));
        assert_eq!(pkts[0].data, b"bye");
        let sd = pkts.last().unwrap().hdr;
        assert_eq!(sd.op, VSOCK_OP_SHUTDOWN);
        assert_eq!(
            sd.flags,
            VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND
        );
        assert_eq!(g.dev.muxer().num_connections(), 0);
        // The guest's final RST is ignored.
        g.send(g.hdr(VSOCK_OP_RST, 2000, host_port), &[]);
        assert!(g.poll().is_empty());
    }

    #[test]
    fn guest_full_shutdown_resets_connection() {
        let mut g = Guest::new();
        let mut host = g.guest_connect(40004, 5004);
        g.send(g.hdr(VSOCK_OP_RW, 40004, 5004), b"last words");
        let mut h = g.hdr(VSOCK_OP_SHUTDOWN, 40004, 5004);
        h.flags = VSOCK_FLAGS_SHUTDOWN_SEND | VSOCK_FLAGS_SHUTDOWN_RCV;
        g.send(h, &[]);
        let pkts = g.poll_until(|p| !p.is_empty());
        assert_eq!(pkts[0].hdr.op, VSOCK_OP_RST);
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"last words");
        assert_eq!(g.dev.muxer().num_connections(), 0);
    }

    #[test]
    fn host_half_close_sends_shutdown_send() {
        let mut g = Guest::new();
        let mut host = g.guest_connect(40005, 5005);
        host.write_all(b"req").unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let pkts = g.poll_until(|p| p.iter().any(|p| p.hdr.op == VSOCK_OP_SHUTDOWN));
        let sd = pkts.last().unwrap().hdr;
        assert_eq!(sd.flags, VSOCK_FLAGS_SHUTDOWN_SEND);
        // The other direction still works.
        g.send(g.hdr(VSOCK_OP_RW, 40005, 5005), b"resp");
        assert_eq!(read_exact_timeout(&mut host, 4), b"resp");
    }

    #[test]
    fn rx_waits_for_buffers() {
        let mut g = Guest::new();
        let mut host = UnixStream::connect(g.uds_path()).unwrap();
        host.write_all(b"CONNECT 88\n").unwrap();
        // No rx buffers yet: the request waits, nothing is consumed or lost.
        for _ in 0..5 {
            assert!(g.poll().is_empty());
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(g.dev.muxer().has_pending_rx());
        assert_eq!(g.rx_mock.used().idx().load(), 0);
        g.offer_rx(1, 4096);
        let pkts = g.poll_until(|p| !p.is_empty());
        assert_eq!(pkts[0].hdr.op, VSOCK_OP_REQUEST);
        assert_eq!(pkts[0].hdr.dst_port, 88);
    }

    /// The (id, len) of the used elements `mock` added since `*seen`; advances `*seen`.
    fn take_used(
        mock: &MockSplitQueue<'static, GuestMemoryMmap<()>>,
        seen: &mut u16,
    ) -> Vec<(u32, u32)> {
        let used_idx = mock.used().idx().load();
        let mut out = Vec::new();
        while *seen != used_idx {
            let elem = mock
                .used()
                .ring()
                .ref_at(*seen as usize % QUEUE_SIZE as usize)
                .unwrap()
                .load();
            *seen = seen.wrapping_add(1);
            out.push((elem.id(), elem.len()));
        }
        out
    }

    fn assert_tx_chain_rejected(descs: &[(u64, u32, u32)], check: impl Fn(&PacketError) -> bool) {
        assert_built_tx_chain_rejected(|_| descs.to_vec(), check);
    }

    /// Like [`assert_tx_chain_rejected`], for the chain `build` prepares in the guest.
    fn assert_built_tx_chain_rejected(
        build: impl FnOnce(&mut Guest) -> Vec<(u64, u32, u32)>,
        check: impl Fn(&PacketError) -> bool,
    ) {
        let mut g = Guest::new();
        let descs = build(&mut g);
        let head = g.add_tx_chain(&descs);
        assert!(g.dev.process_tx_queue(g.mem, &mut g.tx).unwrap());
        match g.dev.take_last_chain_error() {
            Some(DeviceError::MalformedTxChain(e)) => assert!(check(&e), "unexpected {e:?}"),
            other => panic!("expected a malformed tx chain error, got {other:?}"),
        }
        assert_eq!(g.tx_used(), vec![(u32::from(head), 0)]);
        // The queue keeps working afterwards.
        g.send(g.hdr(VSOCK_OP_RW, 1, 2), b"x");
        assert_eq!(g.tx_used().len(), 1);
        assert!(g.dev.take_last_chain_error().is_none());
        assert_eq!(g.dev.malformed_chains(), 1);
    }

    /// Writes a RW header claiming `len` payload bytes; returns its descriptor followed by the
    /// data descriptor `data` makes from the header address.
    fn rw_chain(
        g: &mut Guest,
        len: u32,
        data: impl FnOnce(u64) -> (u64, u32, u32),
    ) -> Vec<(u64, u32, u32)> {
        let h = g.alloc(HEADER_SIZE as u64);
        let mut hdr = g.hdr(VSOCK_OP_RW, 1, 2);
        hdr.len = len;
        g.mem.write_slice(&hdr.to_bytes(), GuestAddress(h)).unwrap();
        vec![(h, HEADER_SIZE as u32, 0), data(h)]
    }

    #[test]
    fn malformed_tx_chain_out_of_range_address() {
        assert_tx_chain_rejected(&[(MEM_SIZE as u64 + 0x1000, HEADER_SIZE as u32, 0)], |e| {
            matches!(e, PacketError::InvalidMemoryAccess(_))
        });
        // Header fine, data out of range.
        assert_built_tx_chain_rejected(
            |g| rw_chain(g, 16, |_| (u64::MAX - 8, 16, 0)),
            |e| matches!(e, PacketError::InvalidMemoryAccess(_)),
        );
    }

    #[test]
    fn malformed_tx_chain_zero_length_descriptor() {
        assert_tx_chain_rejected(&[(BUF_BASE, 0, 0)], |e| {
            matches!(e, PacketError::DescriptorLengthTooSmall)
        });
    }

    #[test]
    fn malformed_tx_chain_wrong_direction() {
        assert_tx_chain_rejected(&[(BUF_BASE, HEADER_SIZE as u32, VRING_DESC_F_WRITE)], |e| {
            matches!(e, PacketError::UnexpectedWriteOnlyDescriptor)
        });
    }

    #[test]
    fn malformed_tx_chain_short_header() {
        assert_tx_chain_rejected(&[(BUF_BASE, HEADER_SIZE as u32 - 1, 0)], |e| {
            matches!(e, PacketError::DescriptorLengthTooSmall)
        });
    }

    #[test]
    fn malformed_tx_chain_oversized_payload() {
        assert_built_tx_chain_rejected(
            |g| rw_chain(g, MAX_PKT_DATA + 1, |h| (h + 0x1000, 16, 0)),
            |e| matches!(e, PacketError::InvalidHeaderLen(_)),
        );
    }

    #[test]
    fn malformed_rx_chains_are_returned_and_skipped() {
        let mut g = Guest::new();
        // A pending RST so the device wants rx buffers.
        g.send(g.hdr(VSOCK_OP_RW, 1, 2), b"x");
        let bad: [&[(u64, u32, u32)]; 4] = [
            // read-only header
            &[
                (BUF_BASE, HEADER_SIZE as u32, 0),
                (BUF_BASE + 0x1000, 64, VRING_DESC_F_WRITE),
            ],
            // read-only data
            &[
                (BUF_BASE, HEADER_SIZE as u32, VRING_DESC_F_WRITE),
                (BUF_BASE + 0x1000, 64, 0),
            ],
            // short header
            &[
                (BUF_BASE, 8, VRING_DESC_F_WRITE),
                (BUF_BASE + 0x1000, 64, VRING_DESC_F_WRITE),
            ],
            // out of range
            &[
                (MEM_SIZE as u64 * 2, HEADER_SIZE as u32, VRING_DESC_F_WRITE),
                (BUF_BASE + 0x1000, 64, VRING_DESC_F_WRITE),
            ],
        ];
        let mut heads = Vec::new();
        for descs in bad {
            heads.push(g.add_rx_chain(descs));
        }
        assert!(g.dev.process_rx_queue(g.mem, &mut g.rx).unwrap());
        assert_eq!(g.dev.malformed_chains(), 4);
        assert_eq!(g.dev.metrics().snapshot().malformed_chains, 4);
        assert!(matches!(
            g.dev.take_last_chain_error(),
            Some(DeviceError::MalformedRxChain(
                PacketError::InvalidMemoryAccess(_)
            ))
        ));
        let used_idx = g.rx_mock.used().idx().load();
        assert_eq!(used_idx, 4);
        for (i, head) in heads.iter().enumerate() {
            let e = g.rx_mock.used().ring().ref_at(i).unwrap().load();
            assert_eq!((e.id(), e.len()), (u32::from(*head), 0));
        }
        g.rx_used_seen = used_idx;
        // The RST is still pending and goes into the next good buffer.
        g.offer_rx(1, 4096);
        let pkts = g.poll_until(|p| !p.is_empty());
        assert_eq!(pkts[0].hdr.op, VSOCK_OP_RST);
    }

    #[test]
    fn rx_with_nothing_pending_leaves_buffers_available() {
        let mut g = Guest::new();
        g.offer_rx(2, 4096);
        assert!(!g.dev.process_rx_queue(g.mem, &mut g.rx).unwrap());
        assert!(g.poll().is_empty());
        assert_eq!(g.rx.next_avail(), 0);
        // Unready queues are left alone.
        let mut q: Queue = Queue::new(QUEUE_SIZE).unwrap();
        assert!(!g.dev.process_tx_queue(g.mem, &mut q).unwrap());
        assert!(!g.dev.process_rx_queue(g.mem, &mut q).unwrap());
    }

    #[test]
    fn host_data_before_guest_response_is_not_lost() {
        let mut g = Guest::new();
        let (mut host, req) = g.host_request(b"CONNECT 77\nearly");
        let host_port = req.src_port;
        g.send(g.hdr(VSOCK_OP_RESPONSE, 77, host_port), &[]);
        assert_eq!(read_line(&mut host), format!("OK {host_port}\n"));
        let pkts = g.poll_until(|p| rw_bytes(p) >= 5);
        assert_eq!(pkts[0].data, b"early");
    }

    #[test]
    fn buffered_guest_data_is_flushed_in_order() {
        let mut g = Guest::new();
        let mut host = g.guest_connect(40007, 5007);
        // The host does not read: part of this lands in the socket, the rest in our buffer.
        let payload: Vec<u8> = (0..5 * 64 * 1024u32).map(|i| (i % 253) as u8).collect();
        for chunk in payload.chunks(64 * 1024) {
            g.send(g.hdr(VSOCK_OP_RW, 40007, 5007), chunk);
        }
        assert_eq!(g.dev.muxer().num_connections(), 1, "reset within credit");
        let got = g.host_read_exact(&mut host, payload.len());
        assert!(got == payload, "data corrupted or reordered");
        // Freed buffer space is advertised.
        let pkts = g.poll_until(|p| !p.is_empty());
        assert!(pkts.iter().all(|p| p.hdr.op == VSOCK_OP_CREDIT_UPDATE));
        assert_eq!(pkts.last().unwrap().hdr.fwd_cnt, payload.len() as u32);
    }
}
