// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Transport-agnostic vsock connection multiplexer ("hybrid vsock" host side).
//!
//! The muxer owns everything that lives on the host: the unix listener at `uds_path`, one
//! non-blocking unix stream per connection and an epoll fd whose readability means "the host
//! side has work" ([`VsockMuxer::process_host_events`]). It knows nothing about virtqueues: the
//! device feeds it guest packets ([`VsockMuxer::handle_guest_packet`]) and asks it to fill
//! receive buffers ([`VsockMuxer::fill_rx_packet`]).
//!
//! Host-initiated connections: a host process connects to `uds_path` and writes
//! `CONNECT <port>\n`; the guest gets an `OP_REQUEST`; on `OP_RESPONSE` the host reads
//! `OK <hostport>\n` and the stream relays bytes. Guest-initiated connections to host port `P`
//! are forwarded to the unix socket `<uds_path>_<P>`.
//!
//! Flow control follows the virtio-vsock credit scheme: we never send the guest more than its
//! advertised credit, we advertise `CONN_BUF_ALLOC` bytes of buffer per connection and keep at
//! most that many bytes of guest data that the host stream could not take yet.
//!
//! Epoll interest of a stream is recomputed after every state change ([`Conn::interest`]): a
//! stream is only polled for reading while the guest has credit and no read is already pending,
//! and it is removed from the epoll set while nothing is wanted, so a level-triggered
//! `EPOLLHUP` can never make the event loop spin.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::packet::*;
use super::socket_path::BoundPath;

/// Receive buffer we advertise to the guest for every connection (bytes).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Send an unsolicited credit update once this many bytes were forwarded since the last header.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// Maximum number of simultaneous connections.
pub const MAX_CONNECTIONS: usize = 1024;
/// Maximum number of accepted host streams that have not sent their `CONNECT` line yet.
pub const MAX_PENDING_HOST_STREAMS: usize = 64;
/// Maximum length of a `CONNECT <port>\n` line (newline included).
pub const MAX_CONNECT_LINE: usize = 32;
/// Time the guest has to answer a host-initiated `OP_REQUEST`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Maximum number of queued RST replies for packets that match no connection.
pub const MAX_PENDING_RST: usize = 1024;
/// First local port handed out to host-initiated connections.
pub const FIRST_HOST_PORT: u32 = 1 << 30;

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;
const FIRST_STREAM_TOKEN: u64 = 16;
const EVENTS_PER_PASS: usize = 64;
/// How long the listener is not polled after a failed accept (e.g. out of fds).
const LISTENER_PAUSE: Duration = Duration::from_millis(100);
const ACCEPTS_PER_PASS: usize = 32;

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

/// Identifies a connection: (host side port, guest side port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Port on the host side (`src_port` of packets we send).
    pub local_port: u32,
    /// Port on the guest side (`dst_port` of packets we send).
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// Host asked to connect; `OP_REQUEST` queued or sent, waiting for `OP_RESPONSE`.
    LocalInit,
    /// Guest asked to connect and the host socket accepted; `OP_RESPONSE` not sent yet.
    PeerInit,
    /// Data may flow.
    Established,
}

/// Packets a connection still has to send to the guest.
#[derive(Clone, Copy, Debug, Default)]
struct PendingRx {
    request: bool,
    response: bool,
    credit_update: bool,
    /// The host stream is readable (or at EOF) and the guest has credit.
    rw: bool,
}

impl PendingRx {
    fn any(&self) -> bool {
        self.request || self.response || self.credit_update || self.rw
    }
}

/// Why a connection has to go away.
#[derive(Debug)]
enum Kill {
    /// Reset: close the host stream and send `OP_RST` to the guest.
    Reset,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: ConnState,
    host_initiated: bool,
    pending: PendingRx,
    in_rxq: bool,
    /// Interest currently registered with epoll (empty: not registered).
    registered: EventSet,
    // Host -> guest direction.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    // Guest -> host direction.
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    to_host: VecDeque<u8>,
    // Shutdown tracking.
    host_eof: bool,
    guest_shut_send: bool,
    guest_shut_rcv: bool,
    host_write_shut: bool,
    deadline: Option<Instant>,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: ConnState, host_initiated: bool) -> Self {
        Conn {
            stream,
            token,
            state,
            host_initiated,
            pending: PendingRx::default(),
            in_rxq: false,
            registered: EventSet::empty(),
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            to_host: VecDeque::new(),
            host_eof: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_write_shut: false,
            deadline: None,
        }
    }

    /// Bytes we may still send to the guest.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, hdr: &VsockHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// Whether the host stream should be polled for reading.
    fn want_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && !self.guest_shut_rcv
            && !self.pending.rw
            && self.peer_credit() > 0
    }

    fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.want_read() {
            ev |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    fn needs_credit_update(&self) -> bool {
        self.state == ConnState::Established
            && !self.guest_shut_send
            && self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Both directions are finished: the guest will not send, nobody reads host data any more
    /// and everything the guest sent has reached the host stream.
    fn is_done(&self) -> bool {
        self.guest_shut_send && (self.host_eof || self.guest_shut_rcv) && self.to_host.is_empty()
    }

    fn header(&self, key: ConnKey, guest_cid: u64, op: u16) -> VsockHeader {
        VsockHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: VSOCK_TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Accepts `data` from the guest: writes what the host stream takes right now and buffers
    /// the rest (never more than `CONN_BUF_ALLOC` in total).
    fn push_guest_data<B: BitmapSlice>(
        &mut self,
        data: &vm_memory::VolatileSlice<'_, B>,
    ) -> Result<(), Kill> {
        let len = data.len();
        if len == 0 {
            return Ok(());
        }
        let free = (CONN_BUF_ALLOC as usize).saturating_sub(self.to_host.len());
        if len > free {
            warn!(
                "vsock: guest exceeded its credit ({} bytes, {} free); resetting",
                len, free
            );
            return Err(Kill::Reset);
        }
        // `len` <= CONN_BUF_ALLOC, so it fits in u32.
        self.rx_cnt = self.rx_cnt.wrapping_add(len as u32);
        let mut written = 0usize;
        if self.to_host.is_empty() {
            while written < len {
                let chunk = data.subslice(written, len - written).map_err(|e| {
                    warn!("vsock: bad guest data slice: {e}");
                    Kill::Reset
                })?;
                match send_volatile_nosignal(&self.stream, &chunk) {
                    Ok(0) => return Err(Kill::Reset),
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        debug!("vsock: host stream write failed: {e}");
                        return Err(Kill::Reset);
                    }
                }
            }
            self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
        }
        if written < len {
            let rest = data
                .subslice(written, len - written)
                .map_err(|_| Kill::Reset)?;
            let mut tmp = vec![0u8; rest.len()];
            rest.copy_to(&mut tmp[..]);
            self.to_host.extend(tmp);
        }
        Ok(())
    }

    /// Writes buffered guest data to the host stream; half-closes the stream once drained if
    /// the guest will not send more.
    fn flush_to_host(&mut self) -> Result<(), Kill> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(0) => return Err(Kill::Reset),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("vsock: host stream write failed: {e}");
                    return Err(Kill::Reset);
                }
            }
        }
        self.maybe_shutdown_host_write();
        Ok(())
    }

    fn maybe_shutdown_host_write(&mut self) {
        if self.guest_shut_send && self.to_host.is_empty() && !self.host_write_shut {
            self.host_write_shut = true;
            if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                debug!("vsock: shutdown(write) of host stream: {e}");
            }
        }
    }
}

/// An accepted host stream that has not completed its `CONNECT <port>\n` line.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// Outcome of reading (part of) a connect line.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    Incomplete,
    Port(u32),
    Invalid,
    Closed,
}

/// The host side of the vsock device: connection table and host unix sockets.
pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    bound_path: Option<BoundPath>,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    conns: HashMap<ConnKey, Conn>,
    tokens: HashMap<u64, ConnKey>,
    pending_host: HashMap<u64, PendingHost>,
    rxq: VecDeque<ConnKey>,
    rst_queue: VecDeque<VsockHeader>,
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
        let timer = TimerFd::new()
            .map_err(|e| MuxerError::Timer(io::Error::from_raw_os_error(e.errno())))?;
        set_fd_nonblocking(timer.as_raw_fd()).map_err(MuxerError::Timer)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(MuxerError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )
            .map_err(MuxerError::Epoll)?;
        Ok(VsockMuxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            bound_path: None,
            listener,
            epoll,
            timer,
            timer_deadline: None,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending_host: HashMap::new(),
            rxq: VecDeque::new(),
            rst_queue: VecDeque::new(),
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
        self.rst_queue.clear();
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
        !self.rst_queue.is_empty() || !self.rxq.is_empty()
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
            self.reply_rst(&hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if !self.conns.contains_key(&key) {
            match hdr.op {
                VSOCK_OP_REQUEST => self.guest_connect(key, &hdr),
                VSOCK_OP_RST => {}
                _ => self.reply_rst(&hdr),
            }
            return;
        }
        let result = match self.conns.get_mut(&key) {
            Some(conn) => guest_packet_for_conn(conn, key, &hdr, pkt),
            None => return,
        };
        match result {
            Ok(GuestAction::Keep) => self.sync_conn(key),
            Ok(GuestAction::Forget) => self.remove_conn(key, false),
            Err(Kill::Reset) => self.remove_conn(key, true),
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
                TIMER_TOKEN => self.expire_connects(),
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
        if let Some(hdr) = self.rst_queue.pop_front() {
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
        let mut budget = self.rxq.len() * 2 + 1;
        while budget > 0 {
            budget -= 1;
            let key = self.rxq.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rxq = false;
            let (produced, action) =
                produce_conn_packet(conn, key, self.guest_cid, self.connect_timeout, pkt);
            match action {
                ConnAction::Keep => {
                    if let Some(deadline) = conn.deadline.filter(|_| produced.is_some()) {
                        if conn.state == ConnState::LocalInit {
                            self.arm_timer(deadline);
                        }
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

    // ---- guest side helpers -------------------------------------------------------------

    /// Queues an `OP_RST` answering `hdr` (unless `hdr` is itself a RST).
    fn reply_rst(&mut self, hdr: &VsockHeader) {
        if hdr.op == VSOCK_OP_RST {
            return;
        }
        let rst = VsockHeader {
            src_cid: hdr.dst_cid,
            dst_cid: hdr.src_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: hdr.type_,
            op: VSOCK_OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        };
        self.push_rst(rst);
    }

    fn push_rst(&mut self, rst: VsockHeader) {
        if self.rst_queue.len() >= MAX_PENDING_RST {
            warn!("vsock: too many pending resets, dropping one");
            return;
        }
        self.rst_queue.push_back(rst);
    }

    fn conn_rst_header(&self, key: ConnKey) -> VsockHeader {
        VsockHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: VSOCK_TYPE_STREAM,
            op: VSOCK_OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// Guest `OP_REQUEST` for a new connection: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, hdr: &VsockHeader) {
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!("vsock: connection limit reached, refusing guest connection");
            self.reply_rst(hdr);
            return;
        }
        let path = port_path(&self.uds_path, key.local_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                debug!("vsock: guest connect to {} failed: {e}", path.display());
                self.reply_rst(hdr);
                return;
            }
        };
        debug!(
            "vsock: guest port {} connected to {}",
            key.peer_port,
            path.display()
        );
        let token = self.alloc_token();
        let mut conn = Conn::new(stream, token, ConnState::PeerInit, false);
        conn.update_peer_credit(hdr);
        conn.pending.response = true;
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        self.sync_conn(key);
    }

    // ---- host side helpers --------------------------------------------------------------

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_STREAM_TOKEN);
        t
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = match self.next_local_port.checked_add(1) {
                Some(n) if n != u32::MAX => n,
                _ => FIRST_HOST_PORT,
            };
            if !self.local_ports.contains(&p) {
                return p;
            }
        }
    }

    fn accept_host_streams(&mut self) {
        for _ in 0..ACCEPTS_PER_PASS {
            match self.listener.accept() {
                Ok((stream, _)) => self.add_pending_host(stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. EMFILE: the connection stays queued and the listener stays readable;
                    // stop polling it for a moment instead of spinning.
                    warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    self.pause_listener();
                    return;
                }
            }
        }
    }

    fn add_pending_host(&mut self, stream: UnixStream) {
        if self.pending_host.len() >= MAX_PENDING_HOST_STREAMS
            || self.conns.len() >= MAX_CONNECTIONS
        {
            warn!("vsock: too many host connections, closing new one");
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            warn!("vsock: cannot make host stream non-blocking: {e}");
            return;
        }
        let token = self.alloc_token();
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        ) {
            warn!("vsock: cannot poll host stream: {e}");
            return;
        }
        let deadline = Instant::now() + self.connect_timeout;
        self.pending_host.insert(
            token,
            PendingHost {
                stream,
                line: Vec::new(),
                deadline,
            },
        );
        self.arm_timer(deadline);
    }

    fn read_pending_host(&mut self, token: u64) {
        let outcome = match self.pending_host.get_mut(&token) {
            Some(p) => read_connect_line(&mut p.stream, &mut p.line),
            None => return,
        };
        if outcome == LineRead::Incomplete {
            return;
        }
        let Some(pending) = self.pending_host.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            pending.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        match outcome {
            LineRead::Port(port) => self.host_connect(pending.stream, token, port),
            LineRead::Invalid => debug!("vsock: invalid CONNECT line, closing host stream"),
            _ => debug!("vsock: host stream closed before CONNECT"),
        }
    }

    /// Host asked (via `CONNECT <peer_port>`) for a connection to the guest.
    fn host_connect(&mut self, stream: UnixStream, token: u64, peer_port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!("vsock: connection limit reached, closing host stream");
            return;
        }
        let local_port = self.alloc_local_port();
        let key = ConnKey {
            local_port,
            peer_port,
        };
        debug!("vsock: host connect to guest port {peer_port} via host port {local_port}");
        let mut conn = Conn::new(stream, token, ConnState::LocalInit, true);
        conn.pending.request = true;
        self.local_ports.insert(local_port);
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        self.sync_conn(key);
    }

    fn host_stream_event(&mut self, key: ConnKey, evset: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if evset.contains(EventSet::ERROR) {
            debug!("vsock: host stream error, resetting {key:?}");
            self.remove_conn(key, true);
            return;
        }
        if evset.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP)
            && conn.want_read()
        {
            conn.pending.rw = true;
        }
        if evset.contains(EventSet::OUT) || evset.contains(EventSet::HANG_UP) {
            if let Err(Kill::Reset) = conn.flush_to_host() {
                self.remove_conn(key, true);
                return;
            }
        }
        self.sync_conn(key);
    }

    fn arm_timer(&mut self, deadline: Instant) {
        if self.timer_deadline.is_some_and(|d| d <= deadline) {
            return;
        }
        let dur = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(dur, None) {
            Ok(()) => self.timer_deadline = Some(deadline),
            Err(e) => warn!("vsock: cannot arm connect timer: {e}"),
        }
    }

    fn pause_listener(&mut self) {
        if self.listener_paused_until.is_some() {
            return;
        }
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.listener.as_raw_fd(),
            EpollEvent::default(),
        );
        let until = Instant::now() + LISTENER_PAUSE;
        self.listener_paused_until = Some(until);
        self.arm_timer(until);
    }

    fn resume_listener(&mut self, now: Instant) {
        if self.listener_paused_until.is_some_and(|t| t <= now) {
            self.listener_paused_until = None;
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                self.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            ) {
                warn!("vsock: cannot re-enable host listener: {e}");
            }
        }
    }

    /// Timer expiry: closes host streams that did not send `CONNECT` in time, resets
    /// host-initiated connections the guest did not answer in time, resumes a paused listener.
    fn expire_connects(&mut self) {
        // Non-blocking read to clear readiness; EAGAIN just means nothing expired.
        let _ = self.timer.wait();
        self.timer_deadline = None;
        let now = Instant::now();
        self.resume_listener(now);
        let stale: Vec<u64> = self
            .pending_host
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in stale {
            if let Some(p) = self.pending_host.remove(&token) {
                debug!("vsock: host stream sent no CONNECT line in time, closing");
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    p.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == ConnState::LocalInit && c.deadline.is_some_and(|d| d <= now)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            info!("vsock: guest did not answer connection request {key:?}, closing");
            self.remove_conn(key, true);
        }
        let next = self
            .conns
            .values()
            .filter(|c| c.state == ConnState::LocalInit)
            .filter_map(|c| c.deadline)
            .chain(self.pending_host.values().map(|p| p.deadline))
            .chain(self.listener_paused_until)
            .min();
        if let Some(deadline) = next {
            self.arm_timer(deadline);
        }
    }

    // ---- connection bookkeeping ---------------------------------------------------------

    /// Re-evaluates a connection after a change: completion, credit update, rx queueing and
    /// epoll interest.
    fn sync_conn(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.maybe_shutdown_host_write();
        if conn.is_done() {
            debug!("vsock: connection {key:?} finished");
            self.remove_conn(key, true);
            return;
        }
        if conn.needs_credit_update() {
            conn.pending.credit_update = true;
        }
        if conn.pending.any() && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(key);
        }
        let desired = conn.interest();
        if let Err(e) = set_interest(&self.epoll, conn, desired) {
            warn!("vsock: epoll update failed for {key:?}: {e}");
            self.remove_conn(key, true);
        }
    }

    /// Forgets a connection, closing its host stream; optionally tells the guest with RST.
    fn remove_conn(&mut self, key: ConnKey, send_rst: bool) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        self.tokens.remove(&conn.token);
        if conn.host_initiated {
            self.local_ports.remove(&key.local_port);
        }
        if !conn.registered.is_empty() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        if send_rst {
            let rst = self.conn_rst_header(key);
            self.push_rst(rst);
        }
    }
}

impl AsRawFd for VsockMuxer {
    /// The epoll fd: readable when the host side has work for [`VsockMuxer::process_host_events`].
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

/// What to do with a connection after a guest packet.
enum GuestAction {
    Keep,
    Forget,
}

/// What to do with a connection after producing an rx packet.
enum ConnAction {
    Keep,
    Forget,
}

/// Applies a guest packet to an existing connection.
fn guest_packet_for_conn<B: BitmapSlice>(
    conn: &mut Conn,
    key: ConnKey,
    hdr: &VsockHeader,
    pkt: &VsockPacket<'_, B>,
) -> Result<GuestAction, Kill> {
    if hdr.op == VSOCK_OP_RST {
        debug!("vsock: guest reset {key:?}");
        return Ok(GuestAction::Forget);
    }
    conn.update_peer_credit(hdr);
    match hdr.op {
        VSOCK_OP_RESPONSE if conn.state == ConnState::LocalInit => {
            conn.state = ConnState::Established;
            conn.deadline = None;
            let line = format!("OK {}\n", key.local_port);
            // The stream is fresh, so its send buffer is empty and the short line fits.
            match send_nosignal(&conn.stream, line.as_bytes()) {
                Ok(n) if n == line.len() => Ok(GuestAction::Keep),
                Ok(_) | Err(_) => {
                    debug!("vsock: cannot write OK line to host stream {key:?}");
                    Err(Kill::Reset)
                }
            }
        }
        VSOCK_OP_RW if conn.state == ConnState::Established && !conn.guest_shut_send => {
            if let Some(data) = pkt.data_slice() {
                conn.push_guest_data(data)?;
            }
            Ok(GuestAction::Keep)
        }
        VSOCK_OP_CREDIT_UPDATE => Ok(GuestAction::Keep),
        VSOCK_OP_CREDIT_REQUEST => {
            conn.pending.credit_update = true;
            Ok(GuestAction::Keep)
        }
        VSOCK_OP_SHUTDOWN => {
            if hdr.flags & VSOCK_FLAGS_SHUTDOWN_SEND != 0 {
                conn.guest_shut_send = true;
            }
            if hdr.flags & VSOCK_FLAGS_SHUTDOWN_RCV != 0 && !conn.guest_shut_rcv {
                conn.guest_shut_rcv = true;
                conn.pending.rw = false;
                if let Err(e) = conn.stream.shutdown(Shutdown::Read) {
                    debug!("vsock: shutdown(read) of host stream: {e}");
                }
            }
            Ok(GuestAction::Keep)
        }
        op => {
            debug!(
                "vsock: unexpected op {op} in state {:?} for {key:?}",
                conn.state
            );
            Err(Kill::Reset)
        }
    }
}

/// Produces at most one packet for the guest from a connection's pending work.
fn produce_conn_packet<B: BitmapSlice>(
    conn: &mut Conn,
    key: ConnKey,
    guest_cid: u64,
    connect_timeout: Duration,
    pkt: &mut VsockPacket<'_, B>,
) -> (Option<u32>, ConnAction) {
    if conn.pending.request {
        conn.pending.request = false;
        conn.deadline = Some(Instant::now() + connect_timeout);
        let hdr = conn.header(key, guest_cid, VSOCK_OP_REQUEST);
        return (emit(conn, &hdr, pkt), ConnAction::Keep);
    }
    if conn.pending.response {
        conn.pending.response = false;
        conn.state = ConnState::Established;
        let hdr = conn.header(key, guest_cid, VSOCK_OP_RESPONSE);
        return (emit(conn, &hdr, pkt), ConnAction::Keep);
    }
    if conn.pending.rw {
        conn.pending.rw = false;
        match read_host_data(conn, pkt) {
            HostRead::Data(n) => {
                conn.tx_cnt = conn.tx_cnt.wrapping_add(n);
                let mut hdr = conn.header(key, guest_cid, VSOCK_OP_RW);
                hdr.len = n;
                let used = emit(conn, &hdr, pkt).map(|h| h + n);
                return (used, ConnAction::Keep);
            }
            HostRead::Eof => {
                conn.host_eof = true;
                let mut hdr = conn.header(key, guest_cid, VSOCK_OP_SHUTDOWN);
                if peer_fully_closed(&conn.stream) {
                    hdr.flags = VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND;
                    debug!("vsock: host closed {key:?}");
                    return (emit(conn, &hdr, pkt), ConnAction::Forget);
                }
                hdr.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
                debug!("vsock: host half-closed {key:?}");
                return (emit(conn, &hdr, pkt), ConnAction::Keep);
            }
            HostRead::Error => {
                let mut hdr = conn.header(key, guest_cid, VSOCK_OP_RST);
                hdr.buf_alloc = 0;
                hdr.fwd_cnt = 0;
                return (emit(conn, &hdr, pkt), ConnAction::Forget);
            }
            HostRead::Nothing => {}
        }
    }
    if conn.pending.credit_update {
        let hdr = conn.header(key, guest_cid, VSOCK_OP_CREDIT_UPDATE);
        return (emit(conn, &hdr, pkt), ConnAction::Keep);
    }
    (None, ConnAction::Keep)
}

/// Writes `hdr` into `pkt`; every header carries our credit, so no separate update is pending.
fn emit<B: BitmapSlice>(
    conn: &mut Conn,
    hdr: &VsockHeader,
    pkt: &mut VsockPacket<'_, B>,
) -> Option<u32> {
    match hdr.write_to(pkt) {
        Ok(()) => {
            conn.last_fwd_cnt_sent = hdr.fwd_cnt;
            conn.pending.credit_update = false;
            Some(HEADER_SIZE as u32)
        }
        Err(e) => {
            warn!("vsock: cannot write rx header: {e}");
            None
        }
    }
}

enum HostRead {
    Data(u32),
    Eof,
    Error,
    Nothing,
}

/// Reads host stream data directly into the guest buffer, bounded by the guest's credit.
fn read_host_data<B: BitmapSlice>(conn: &mut Conn, pkt: &mut VsockPacket<'_, B>) -> HostRead {
    let Some(data) = pkt.data_slice() else {
        return HostRead::Nothing;
    };
    let max = (conn.peer_credit() as usize).min(data.len());
    if max == 0 {
        // Re-polled once the guest grants credit (see `Conn::want_read`).
        return HostRead::Nothing;
    }
    let Ok(mut buf) = data.subslice(0, max) else {
        return HostRead::Nothing;
    };
    loop {
        match (&conn.stream).read_volatile(&mut buf) {
            Ok(0) => return HostRead::Eof,
            // `n` <= `max` <= peer credit, a u32.
            Ok(n) => return HostRead::Data(n as u32),
            Err(e) => match volatile_io_kind(&e) {
                Some(ErrorKind::Interrupted) => continue,
                Some(ErrorKind::WouldBlock) => return HostRead::Nothing,
                _ => {
                    debug!("vsock: host stream read failed: {e}");
                    return HostRead::Error;
                }
            },
        }
    }
}

/// `send(2)` with `MSG_NOSIGNAL`: a host peer that went away yields `EPIPE`, never `SIGPIPE`.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
    unsafe { send_raw_nosignal(stream, buf.as_ptr(), buf.len()) }
}

/// [`send_nosignal`] straight from guest memory.
fn send_volatile_nosignal<B: BitmapSlice>(
    stream: &UnixStream,
    buf: &vm_memory::VolatileSlice<'_, B>,
) -> io::Result<usize> {
    let guard = buf.ptr_guard();
    // SAFETY: the guard keeps the mapping behind `buf` valid for `buf.len()` bytes during the
    // call and the kernel only reads from it. Concurrent guest writes can only change the bytes
    // sent, which is the guest's own business.
    unsafe { send_raw_nosignal(stream, guard.as_ptr(), buf.len()) }
}

/// Non-blocking `send(2)` of the `len` bytes at `ptr` with `MSG_NOSIGNAL`.
///
/// # Safety
///
/// `ptr` must be valid for reads of `len` bytes for the duration of the call.
unsafe fn send_raw_nosignal(stream: &UnixStream, ptr: *const u8, len: usize) -> io::Result<usize> {
    // SAFETY: the caller guarantees that `ptr` is readable for `len` bytes.
    let r = unsafe {
        libc::send(
            stream.as_raw_fd(),
            ptr.cast::<libc::c_void>(),
            len,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn volatile_io_kind(e: &VolatileMemoryError) -> Option<ErrorKind> {
    match e {
        VolatileMemoryError::IOError(io) => Some(io.kind()),
        _ => None,
    }
}

/// Reads a `CONNECT <port>\n` line byte by byte so no payload byte after it is consumed.
fn read_connect_line(stream: &mut UnixStream, line: &mut Vec<u8>) -> LineRead {
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return LineRead::Closed,
            Ok(_) => {
                if byte[0] == b'\n' {
                    return parse_connect_line(line).map_or(LineRead::Invalid, LineRead::Port);
                }
                line.push(byte[0]);
                if line.len() >= MAX_CONNECT_LINE {
                    return LineRead::Invalid;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return LineRead::Incomplete,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return LineRead::Closed,
        }
    }
}

/// Parses `CONNECT <decimal u32>` (an optional trailing `\r` is accepted).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `<uds_path>_<port>`.
fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s: OsString = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

fn set_interest(epoll: &Epoll, conn: &mut Conn, desired: EventSet) -> io::Result<()> {
    if conn.registered == desired {
        return Ok(());
    }
    let fd = conn.stream.as_raw_fd();
    if desired.is_empty() {
        epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())?;
    } else {
        let op = if conn.registered.is_empty() {
            ControlOperation::Add
        } else {
            ControlOperation::Modify
        };
        epoll.ctl(op, fd, EpollEvent::new(desired, conn.token))?;
    }
    conn.registered = desired;
    Ok(())
}

/// True if the peer closed the stream completely (not just shut down its write side).
fn peer_fully_closed(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call, nfds is 1 and the timeout is
    // zero, so the call neither blocks nor touches other memory.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

fn set_fd_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on an fd we own has no memory effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on an fd we own only changes its status flags.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connects a non-blocking unix stream socket; never blocks (a full backlog gives `EAGAIN`).
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "unix socket path empty or too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un and `len` does not exceed its size.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmp_muxer() -> (tempfile::TempDir, VsockMuxer) {
        let dir = tempfile::tempdir().unwrap();
        let m = VsockMuxer::new(3, &dir.path().join("v.sock")).unwrap();
        (dir, m)
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
    fn connect_line_parsing() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 1024\r"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect_line(b"CONNECT +5"), None);
        assert_eq!(parse_connect_line(b"CONNECT "), None);
        assert_eq!(parse_connect_line(b"connect 5"), None);
        assert_eq!(parse_connect_line(b"CONNECT 5 6"), None);
    }

    #[test]
    fn port_path_appends_port() {
        assert_eq!(
            port_path(Path::new("/run/x/v.sock"), 52),
            PathBuf::from("/run/x/v.sock_52")
        );
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
    fn credit_is_bounded_by_peer_buffer() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, 99, ConnState::Established, false);
        c.peer_buf_alloc = 100;
        c.tx_cnt = 60;
        c.peer_fwd_cnt = 10;
        assert_eq!(c.peer_credit(), 50);
        // Guest shrank its buffer below what is in flight.
        c.peer_buf_alloc = 20;
        assert_eq!(c.peer_credit(), 0);
        // Garbage fwd_cnt from the guest never yields credit out of thin air.
        c.peer_buf_alloc = 100;
        c.peer_fwd_cnt = 1000;
        assert_eq!(c.peer_credit(), 0);
        // Counters wrap.
        c.tx_cnt = 5;
        c.peer_fwd_cnt = u32::MAX - 4;
        assert_eq!(c.peer_credit(), 90);
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
        let listener = UnixListener::bind(d.path().join("v.sock_77")).unwrap();
        HostPkt::new(guest_hdr(VSOCK_OP_REQUEST, 5, 77, 0), &[])
            .with(|pkt| m.handle_guest_packet(pkt));
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

    #[test]
    fn malformed_and_overlong_connect_lines_close_the_stream() {
        let (d, mut m) = tmp_muxer();
        let path = d.path().join("v.sock");
        for line in [&b"HELLO 5\n"[..], &[b'C'; 40][..]] {
            let mut s = UnixStream::connect(&path).unwrap();
            s.write_all(line).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut buf = [0u8; 8];
            loop {
                m.process_host_events().unwrap();
                s.set_nonblocking(true).unwrap();
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => panic!("no reply expected"),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
                assert!(Instant::now() < deadline, "stream was not closed");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert_eq!(m.num_connections(), 0);
        assert!(!m.has_pending_rx());
    }

    /// Pumps host events until `s` reports EOF (or fails after 2 s).
    fn pump_until_eof(m: &mut VsockMuxer, s: &mut UnixStream) {
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
        let mut s = UnixStream::connect(d.path().join("v.sock")).unwrap();
        s.write_all(b"CONNECT 5\n").unwrap();
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
    fn silent_host_stream_times_out() {
        let (d, mut m) = tmp_muxer();
        m.set_connect_timeout(Duration::from_millis(50));
        let mut s = UnixStream::connect(d.path().join("v.sock")).unwrap();
        s.write_all(b"CONN").unwrap();
        pump_until_eof(&mut m, &mut s);
        assert!(!m.has_pending_rx());
    }

    #[test]
    fn reset_drops_all_connections() {
        let (d, mut m) = tmp_muxer();
        let listener = UnixListener::bind(d.path().join("v.sock_9")).unwrap();
        HostPkt::new(guest_hdr(VSOCK_OP_REQUEST, 5, 9, 0), &[])
            .with(|pkt| m.handle_guest_packet(pkt));
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
