// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Transport-agnostic vsock connection multiplexer ("hybrid vsock" host side).
//!
//! The muxer owns everything that lives on the host: the unix listener at `uds_path`, the table
//! of connections ([`VsockConnection`], each with its non-blocking unix stream) and an epoll fd
//! whose readability means "the host side has work" ([`VsockMuxer::process_host_events`]). It
//! knows nothing about virtqueues: the device feeds it guest packets
//! ([`VsockMuxer::handle_guest_packet`]) and asks it to fill receive buffers
//! ([`VsockMuxer::fill_rx_packet`]).
//!
//! Split the way Firecracker splits its vsock backend:
//! - this file: the connection table, routing of guest packets and epoll events to
//!   connections, and their bookkeeping (rx queueing, epoll interest, removal);
//! - `host.rs`: the host's unix sockets: the listener and its `CONNECT <port>\n` handshake, the
//!   forwarding of guest connections to `<uds_path>_<port>`;
//! - `rxq.rs`: what waits for guest receive buffers (RST replies, connections);
//! - `timer.rs`: the timerfd behind every deadline;
//! - `../csm/`: one connection's state machine, credit accounting and buffer.
//!
//! Host-initiated connections: a host process connects to `uds_path` and writes
//! `CONNECT <port>\n`; the guest gets an `OP_REQUEST`; on `OP_RESPONSE` the host reads
//! `OK <hostport>\n` and the stream relays bytes. Guest-initiated connections to host port `P`
//! are forwarded to the unix socket `<uds_path>_<P>`.

mod host;
mod rxq;
mod timer;

use std::collections::{HashMap, HashSet};
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub use super::csm::{ConnKey, CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
pub use host::{parse_connect_line, FIRST_HOST_PORT, MAX_CONNECT_LINE, MAX_PENDING_HOST_STREAMS};
pub use rxq::MAX_PENDING_RST;

use super::csm::{rst_header, ConnAction, CsmError, VsockConnection};
use crate::failpoints::{fired, VSOCK_RX, VSOCK_TX};
use super::packet::*;
use super::socket_path::BoundPath;
use host::PendingHost;
use rxq::MuxerRxQ;
use timer::DeadlineTimer;

/// Maximum number of simultaneous connections.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time the guest has to answer a host-initiated `OP_REQUEST`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;
const FIRST_STREAM_TOKEN: u64 = 16;
const EVENTS_PER_PASS: usize = 64;

/// Errors of the vsock muxer.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The hybrid-vsock unix socket path already exists.
    #[error("host vsock socket path {0} already exists")]
    PathExists(PathBuf),
    /// Binding the hybrid-vsock unix socket failed.
    #[error("cannot bind host vsock socket {path}: {source}")]
    Bind {
        /// The path that could not be bound.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Configuring the listener failed.
    #[error("cannot configure host vsock listener: {0}")]
    Listener(#[source] io::Error),
    /// Creating or using the epoll fd failed.
    #[error("epoll error: {0}")]
    Epoll(#[source] io::Error),
    /// Creating or configuring the connect timer failed.
    #[error("timerfd error: {0}")]
    Timer(#[source] io::Error),
}

/// The host side of the vsock device: connection table and host unix sockets.
pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    bound_path: Option<BoundPath>,
    listener: UnixListener,
    epoll: Epoll,
    timer: DeadlineTimer,
    conns: HashMap<ConnKey, VsockConnection>,
    tokens: HashMap<u64, ConnKey>,
    pending_host: HashMap<u64, PendingHost>,
    rxq: MuxerRxQ,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    next_token: u64,
    connect_timeout: Duration,
    listener_paused_until: Option<Instant>,
}

impl std::fmt::Debug for VsockMuxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockMuxer")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path)
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl VsockMuxer {
    /// Binds the hybrid-vsock listener at `uds_path` (which must not exist; it is removed again
    /// when the muxer is dropped, see [`BoundPath`]).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        if uds_path.symlink_metadata().is_ok() {
            return Err(MuxerError::PathExists(uds_path.to_path_buf()));
        }
        let listener = UnixListener::bind(uds_path).map_err(|source| MuxerError::Bind {
            path: uds_path.to_path_buf(),
            source,
        })?;
        let bound = BoundPath::new(uds_path);
        let mut muxer = Self::with_listener(guest_cid, uds_path, listener)?;
        muxer.bound_path = Some(bound);
        Ok(muxer)
    }

    /// Uses an already bound listener (the path is not removed on drop).
    pub fn with_listener(
        guest_cid: u64,
        uds_path: &Path,
        listener: UnixListener,
    ) -> Result<Self, MuxerError> {
        listener
            .set_nonblocking(true)
            .map_err(MuxerError::Listener)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let timer = DeadlineTimer::new().map_err(MuxerError::Timer)?;
        for (fd, token) in [
            (listener.as_raw_fd(), LISTENER_TOKEN),
            (timer.as_raw_fd(), TIMER_TOKEN),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(MuxerError::Epoll)?;
        }
        Ok(VsockMuxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            bound_path: None,
            listener,
            epoll,
            timer,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending_host: HashMap::new(),
            rxq: MuxerRxQ::default(),
            local_ports: HashSet::new(),
            next_local_port: FIRST_HOST_PORT,
            next_token: FIRST_STREAM_TOKEN,
            connect_timeout: CONNECT_TIMEOUT,
            listener_paused_until: None,
        })
    }

    /// Changes how long a host stream may take to send `CONNECT` and the guest to answer a
    /// host-initiated request (default [`CONNECT_TIMEOUT`]).
    pub fn set_connect_timeout(&mut self, timeout: Duration) {
        self.connect_timeout = timeout.max(Duration::from_millis(1));
    }

    /// Drops every connection and queued packet (device reset: the guest forgot them).
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key, false);
        }
        self.rxq.clear();
    }

    /// The guest CID this muxer serves.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The hybrid-vsock listener path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Number of live connections.
    pub fn num_connections(&self) -> usize {
        self.conns.len()
    }

    /// Whether [`fill_rx_packet`](Self::fill_rx_packet) may have something for the guest.
    pub fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// Handles one packet the guest put on the tx queue. Never fails: protocol violations are
    /// answered with `OP_RST`.
    pub fn handle_guest_packet<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) {
        let hdr = VsockHeader::from_packet(pkt);
        if hdr.dst_cid != VSOCK_HOST_CID
            || hdr.src_cid != self.guest_cid
            || hdr.type_ != VSOCK_TYPE_STREAM
        {
            debug!(
                "vsock: dropping packet src_cid={} dst_cid={} type={}",
                hdr.src_cid, hdr.dst_cid, hdr.type_
            );
            self.rxq.reply_rst(&hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                VSOCK_OP_REQUEST => self.guest_connect(key, &hdr),
                VSOCK_OP_RST => {}
                _ => self.rxq.reply_rst(&hdr),
            }
            return;
        };
        if hdr.op == VSOCK_OP_RW && fired(VSOCK_TX).is_some() {
            warn!("vsock: failpoint {VSOCK_TX}: dropping {key:?}");
            self.remove_conn(key, true);
            return;
        }
        match conn.recv_guest_pkt(key, &hdr, pkt) {
            Ok(ConnAction::Keep) => self.sync_conn(key),
            Ok(ConnAction::Forget) => self.remove_conn(key, false),
            Err(e) => self.reset_conn(key, &e),
        }
    }

    /// Handles ready host sockets (non-blocking). Returns the number of epoll events handled.
    pub fn process_host_events(&mut self) -> Result<usize, MuxerError> {
        let mut events = vec![EpollEvent::new(EventSet::empty(), 0); EVENTS_PER_PASS];
        let n = match self.epoll.wait(0, &mut events[..]) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => 0,
            Err(e) => return Err(MuxerError::Epoll(e)),
        };
        for ev in events.iter().take(n) {
            let evset = EventSet::from_bits_truncate(ev.events());
            match ev.data() {
                LISTENER_TOKEN => self.accept_host_streams(),
                TIMER_TOKEN => self.expire_deadlines(),
                token => {
                    if self.pending_host.contains_key(&token) {
                        self.read_pending_host(token);
                    } else if let Some(key) = self.tokens.get(&token).copied() {
                        self.host_stream_event(key, evset);
                    }
                    // Otherwise the stream was closed earlier in this pass: stale event.
                }
            }
        }
        Ok(n)
    }

    /// Writes the next packet for the guest into `pkt` (an rx packet). Returns the number of
    /// bytes written (header + payload), or `None` if there is nothing to send right now.
    pub fn fill_rx_packet<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> Option<u32> {
        if let Some(hdr) = self.rxq.pop_rst() {
            return match hdr.write_to(pkt) {
                Ok(()) => Some(HEADER_SIZE as u32),
                Err(e) => {
                    warn!("vsock: cannot write rx header: {e}");
                    None
                }
            };
        }
        // Every entry is either consumed or re-queued once after producing a packet, so this
        // bound only guards against bugs.
        let mut budget = self.rxq.conns_len() * 2 + 1;
        while budget > 0 {
            budget -= 1;
            let key = self.rxq.pop_conn()?;
            if !self.conns.contains_key(&key) {
                continue;
            }
            if fired(VSOCK_RX).is_some() {
                warn!("vsock: failpoint {VSOCK_RX}: dropping {key:?}");
                self.remove_conn(key, true);
                continue;
            }
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let (produced, action) = conn.send_pkt(key, self.guest_cid, self.connect_timeout, pkt);
            match action {
                ConnAction::Keep => {
                    if let Some(deadline) = conn.connect_deadline().filter(|_| produced.is_some()) {
                        self.timer.arm(deadline);
                    }
                    self.sync_conn(key);
                }
                ConnAction::Forget => self.remove_conn(key, false),
            }
            if produced.is_some() {
                return produced;
            }
        }
        None
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_STREAM_TOKEN);
        t
    }

    fn host_stream_event(&mut self, key: ConnKey, evset: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.notify(evset) {
            Ok(()) => self.sync_conn(key),
            Err(e) => self.reset_conn(key, &e),
        }
    }

    /// Timer expiry: closes host streams that did not send `CONNECT` in time, resets
    /// host-initiated connections the guest did not answer in time, resumes a paused listener.
    fn expire_deadlines(&mut self) {
        self.timer.ack();
        let now = Instant::now();
        self.resume_listener(now);
        self.expire_pending_host(now);
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.connect_deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            info!("vsock: guest did not answer connection request {key:?}, closing");
            self.remove_conn(key, true);
        }
        let next = self
            .conns
            .values()
            .filter_map(VsockConnection::connect_deadline)
            .chain(self.next_host_deadline())
            .min();
        if let Some(deadline) = next {
            self.timer.arm(deadline);
        }
    }

    // ---- connection bookkeeping ---------------------------------------------------------

    /// Adds a new connection to the table and queues its first packet.
    fn insert_conn(&mut self, key: ConnKey, conn: VsockConnection) {
        self.tokens.insert(conn.token(), key);
        self.conns.insert(key, conn);
        self.sync_conn(key);
    }

    /// Re-evaluates a connection after a change: completion, credit update, rx queueing and
    /// epoll interest.
    fn sync_conn(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.refresh() {
            debug!("vsock: connection {key:?} finished");
            self.remove_conn(key, true);
            return;
        }
        if conn.claim_rxq_slot() {
            self.rxq.push_conn(key);
        }
        if let Err(e) = conn.update_interest(&self.epoll) {
            warn!("vsock: epoll update failed for {key:?}: {e}");
            self.remove_conn(key, true);
        }
    }

    /// Resets a connection whose state machine failed.
    fn reset_conn(&mut self, key: ConnKey, e: &CsmError) {
        if let CsmError::CreditExceeded { .. } = e {
            warn!("vsock: {key:?}: {e}; resetting");
        } else {
            debug!("vsock: {key:?}: {e}; resetting");
        }
        self.remove_conn(key, true);
    }

    /// Forgets a connection, closing its host stream; optionally tells the guest with RST.
    fn remove_conn(&mut self, key: ConnKey, send_rst: bool) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        self.tokens.remove(&conn.token());
        if conn.host_initiated() {
            self.local_ports.remove(&key.local_port);
        }
        conn.deregister(&self.epoll);
        if send_rst {
            self.rxq.push_rst(rst_header(key, self.guest_cid));
        }
    }
}

impl AsRawFd for VsockMuxer {
    /// The epoll fd: readable when the host side has work for [`VsockMuxer::process_host_events`].
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    pub(super) fn tmp_muxer() -> (tempfile::TempDir, VsockMuxer) {
        let dir = tempfile::tempdir().unwrap();
        let m = VsockMuxer::new(3, &dir.path().join("v.sock")).unwrap();
        (dir, m)
    }

    /// A host process connecting to the muxer's socket and writing `line`.
    pub(super) fn host_stream(d: &tempfile::TempDir, line: &[u8]) -> UnixStream {
        let mut s = UnixStream::connect(d.path().join("v.sock")).unwrap();
        s.write_all(line).unwrap();
        s
    }

    /// The guest's `OP_REQUEST` from port 5 to host `port`, forwarded to a listener there.
    fn guest_connect(d: &tempfile::TempDir, m: &mut VsockMuxer, port: u32) -> UnixListener {
        let listener = UnixListener::bind(d.path().join(format!("v.sock_{port}"))).unwrap();
        HostPkt::new(guest_hdr(VSOCK_OP_REQUEST, 5, port, 0), &[])
            .with(|pkt| m.handle_guest_packet(pkt));
        listener
    }

    /// A host-memory packet for the tests (header + data buffers).
    struct HostPkt {
        hdr: Box<[u8; HEADER_SIZE]>,
        data: Vec<u8>,
    }

    impl HostPkt {
        fn new(hdr: VsockHeader, data: &[u8]) -> Self {
            let mut d = data.to_vec();
            if d.is_empty() {
                d.resize(4096, 0);
            }
            HostPkt {
                hdr: Box::new(hdr.to_bytes()),
                data: d,
            }
        }

        fn with<R>(&mut self, f: impl FnOnce(&mut VsockPacket<'_, ()>) -> R) -> R {
            let bytes = *self.hdr;
            // SAFETY: both buffers outlive the packet, which is dropped before returning.
            let mut pkt =
                unsafe { VsockPacket::new(&mut self.hdr[..], Some(&mut self.data[..])) }.unwrap();
            pkt.set_header_from_raw(&bytes[..]).unwrap();
            f(&mut pkt)
        }
    }

    fn guest_hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: VSOCK_HOST_CID,
            src_port,
            dst_port,
            len,
            type_: VSOCK_TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    fn rx(m: &mut VsockMuxer) -> Option<(VsockHeader, Vec<u8>)> {
        let mut p = HostPkt::new(VsockHeader::default(), &[]);
        let used = p.with(|pkt| m.fill_rx_packet(pkt))?;
        let hdr = VsockHeader::from_bytes(&p.hdr);
        assert_eq!(used as usize, HEADER_SIZE + hdr.len as usize);
        Some((hdr, p.data[..hdr.len as usize].to_vec()))
    }

    #[test]
    fn bind_refuses_existing_path_and_drop_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let m = VsockMuxer::new(3, &path).unwrap();
        assert!(matches!(
            VsockMuxer::new(3, &path),
            Err(MuxerError::PathExists(_))
        ));
        drop(m);
        assert!(!path.exists());
    }

    #[test]
    fn rst_for_unknown_connection_and_bad_addressing() {
        let (_d, mut m) = tmp_muxer();
        let mut p = HostPkt::new(guest_hdr(VSOCK_OP_RW, 1000, 2000, 3), b"abc");
        p.with(|pkt| m.handle_guest_packet(pkt));
        let (h, _) = rx(&mut m).unwrap();
        assert_eq!(h.op, VSOCK_OP_RST);
        assert_eq!((h.src_port, h.dst_port, h.dst_cid), (2000, 1000, 3));

        // RST to an unknown connection is ignored.
        let mut p = HostPkt::new(guest_hdr(VSOCK_OP_RST, 1000, 2000, 0), &[]);
        p.with(|pkt| m.handle_guest_packet(pkt));
        assert!(!m.has_pending_rx());

        // Wrong destination CID and wrong type are reset.
        let mut h = guest_hdr(VSOCK_OP_REQUEST, 1, 2, 0);
        h.dst_cid = 7;
        HostPkt::new(h, &[]).with(|pkt| m.handle_guest_packet(pkt));
        let mut h = guest_hdr(VSOCK_OP_REQUEST, 1, 2, 0);
        h.type_ = 2;
        HostPkt::new(h, &[]).with(|pkt| m.handle_guest_packet(pkt));
        assert_eq!(rx(&mut m).unwrap().0.op, VSOCK_OP_RST);
        assert_eq!(rx(&mut m).unwrap().0.op, VSOCK_OP_RST);
        assert!(rx(&mut m).is_none());
    }

    #[test]
    fn guest_exceeding_credit_is_reset() {
        let (d, mut m) = tmp_muxer();
        let listener = guest_connect(&d, &mut m, 77);
        assert_eq!(rx(&mut m).unwrap().0.op, VSOCK_OP_RESPONSE);
        let (_host, _) = listener.accept().unwrap();
        // Host never reads: the socket buffer fills, then our 256 KiB buffer, then RST.
        let chunk = vec![0x5a; 64 * 1024];
        let mut reset = false;
        for _ in 0..64 {
            HostPkt::new(guest_hdr(VSOCK_OP_RW, 5, 77, chunk.len() as u32), &chunk)
                .with(|pkt| m.handle_guest_packet(pkt));
            if m.num_connections() == 0 {
                reset = true;
                break;
            }
        }
        assert!(
            reset,
            "connection must be reset once the guest overruns its credit"
        );
        let mut saw_rst = false;
        while let Some((h, _)) = rx(&mut m) {
            saw_rst |= h.op == VSOCK_OP_RST;
        }
        assert!(saw_rst);
    }

    /// Pumps host events until `s` reports EOF (or fails after 2 s).
    pub(super) fn pump_until_eof(m: &mut VsockMuxer, s: &mut UnixStream) {
        s.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = [0u8; 64];
        loop {
            m.process_host_events().unwrap();
            match s.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => panic!("unexpected data {:?}", &buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
            assert!(Instant::now() < deadline, "stream was not closed");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn pump_until_rx(m: &mut VsockMuxer) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !m.has_pending_rx() {
            m.process_host_events().unwrap();
            assert!(Instant::now() < deadline, "nothing for the guest");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn unanswered_host_connect_times_out() {
        let (d, mut m) = tmp_muxer();
        m.set_connect_timeout(Duration::from_millis(50));
        let mut s = host_stream(&d, b"CONNECT 5\n");
        pump_until_rx(&mut m);
        let (req, _) = rx(&mut m).unwrap();
        assert_eq!(req.op, VSOCK_OP_REQUEST);
        pump_until_eof(&mut m, &mut s);
        assert_eq!(m.num_connections(), 0);
        let (rst, _) = rx(&mut m).unwrap();
        assert_eq!(rst.op, VSOCK_OP_RST);
        assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 5));
    }

    #[test]
    fn reset_drops_all_connections() {
        let (d, mut m) = tmp_muxer();
        let listener = guest_connect(&d, &mut m, 9);
        let (mut host, _) = listener.accept().unwrap();
        assert_eq!(m.num_connections(), 1);
        assert!(m.has_pending_rx());
        m.reset();
        assert_eq!(m.num_connections(), 0);
        assert!(!m.has_pending_rx());
        let mut b = [0u8; 1];
        assert_eq!(host.read(&mut b).unwrap(), 0);
    }
}
