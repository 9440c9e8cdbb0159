// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! One vsock connection: a host unix stream on one side, a guest port on the other.
//!
//! The connection applies the guest's packets ([`VsockConnection::recv_guest_pkt`]), produces at
//! most one packet for the guest at a time from its pending work
//! ([`VsockConnection::send_pkt`]) and reacts to host stream readiness
//! ([`VsockConnection::notify`]). It keeps the credit accounting of both directions and the
//! shutdown state of each, and knows which epoll interest its stream needs
//! ([`VsockConnection::interest`]): the stream is only polled for reading while the guest has
//! credit and no read is already pending, and it is removed from the epoll set while nothing
//! is wanted, so a level-triggered `EPOLLHUP` can never make the event loop spin.
//!
//! The muxer owns the connections and decides what an error or [`ConnAction::Forget`] means
//! for the table; a connection never touches other connections.

use std::io::ErrorKind;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::super::packet::*;
use super::txbuf::{send_nosignal, TxBuf};
use super::{
    rst_header, ConnAction, ConnKey, ConnState, CsmError, CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD,
};

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

/// Which directions of an established connection were shut down, and by whom.
#[derive(Clone, Copy, Debug, Default)]
struct Shutdowns {
    /// The host stream reached EOF (the host will not send more).
    host_eof: bool,
    /// The guest will not send more.
    guest_send: bool,
    /// The guest will not receive more.
    guest_rcv: bool,
    /// We shut down the host stream's write side (after forwarding everything).
    host_write: bool,
}

/// Outcome of reading the host stream into a guest buffer.
enum HostRead {
    Data(u32),
    Eof,
    Error,
    Nothing,
}

/// The state of one connection (see the module documentation).
#[derive(Debug)]
pub struct VsockConnection {
    stream: UnixStream,
    /// Epoll token of the stream.
    token: u64,
    state: ConnState,
    host_initiated: bool,
    pending: PendingRx,
    /// Queued in the muxer's rx queue.
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
    tx_buf: TxBuf,
    shut: Shutdowns,
    /// When the guest must have answered our `OP_REQUEST` (set once it is sent).
    deadline: Option<Instant>,
}

impl VsockConnection {
    fn new(stream: UnixStream, token: u64, state: ConnState, host_initiated: bool) -> Self {
        VsockConnection {
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
            tx_buf: TxBuf::default(),
            shut: Shutdowns::default(),
            deadline: None,
        }
    }

    /// A connection the host asked for (`CONNECT <port>`): its `OP_REQUEST` is pending.
    pub fn new_local(stream: UnixStream, token: u64) -> Self {
        let mut c = Self::new(stream, token, ConnState::LocalInit, true);
        c.pending.request = true;
        c
    }

    /// A connection the guest asked for with `req` and the host socket accepted: its
    /// `OP_RESPONSE` is pending.
    pub fn new_peer(stream: UnixStream, token: u64, req: &VsockHeader) -> Self {
        let mut c = Self::new(stream, token, ConnState::PeerInit, false);
        c.update_peer_credit(req);
        c.pending.response = true;
        c
    }

    /// The epoll token of the host stream.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Whether the host initiated the connection (its local port was allocated by the muxer).
    pub fn host_initiated(&self) -> bool {
        self.host_initiated
    }

    /// Until when the guest may answer our `OP_REQUEST` (only while waiting for it).
    pub fn connect_deadline(&self) -> Option<Instant> {
        self.deadline.filter(|_| self.state == ConnState::LocalInit)
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
            && !self.shut.host_eof
            && !self.shut.guest_rcv
            && !self.pending.rw
            && self.peer_credit() > 0
    }

    /// The epoll interest the host stream needs now.
    pub fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.want_read() {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    fn needs_credit_update(&self) -> bool {
        self.state == ConnState::Established
            && !self.shut.guest_send
            && self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Both directions are finished: the guest will not send, nobody reads host data any more
    /// and everything the guest sent has reached the host stream.
    fn is_done(&self) -> bool {
        self.shut.guest_send
            && (self.shut.host_eof || self.shut.guest_rcv)
            && self.tx_buf.is_empty()
    }

    /// Re-evaluates the connection after a change: half-closes the host stream once everything
    /// the guest sent is forwarded, asks for a credit update when due. Returns whether both
    /// directions are finished (the muxer then closes it with `OP_RST`).
    pub fn refresh(&mut self) -> bool {
        self.maybe_shutdown_host_write();
        if self.is_done() {
            return true;
        }
        if self.needs_credit_update() {
            self.pending.credit_update = true;
        }
        false
    }

    /// Whether the connection has packets for the guest and is not in the rx queue yet; marks
    /// it as queued (the muxer then appends it to its rx queue).
    pub fn claim_rxq_slot(&mut self) -> bool {
        if self.pending.any() && !self.in_rxq {
            self.in_rxq = true;
            return true;
        }
        false
    }

    /// Registers [`interest`](Self::interest) with `epoll` (deregisters when it is empty).
    pub fn update_interest(&mut self, epoll: &Epoll) -> std::io::Result<()> {
        let desired = self.interest();
        if self.registered == desired {
            return Ok(());
        }
        let fd = self.stream.as_raw_fd();
        if desired.is_empty() {
            epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())?;
        } else {
            let op = if self.registered.is_empty() {
                ControlOperation::Add
            } else {
                ControlOperation::Modify
            };
            epoll.ctl(op, fd, EpollEvent::new(desired, self.token))?;
        }
        self.registered = desired;
        Ok(())
    }

    /// Removes the host stream from `epoll` (before the connection is dropped).
    pub fn deregister(&mut self, epoll: &Epoll) {
        if !self.registered.is_empty() {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                self.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.registered = EventSet::empty();
        }
    }

    /// Host stream readiness: marks pending reads, flushes buffered guest data.
    pub fn notify(&mut self, evset: EventSet) -> Result<(), CsmError> {
        if evset.contains(EventSet::ERROR) {
            return Err(CsmError::HostStream);
        }
        if evset.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP)
            && self.want_read()
        {
            self.pending.rw = true;
        }
        if evset.contains(EventSet::OUT) || evset.contains(EventSet::HANG_UP) {
            self.flush_to_host()?;
        }
        Ok(())
    }

    /// Applies a guest packet (already known to belong to this connection, `key`).
    pub fn recv_guest_pkt<B: BitmapSlice>(
        &mut self,
        key: ConnKey,
        hdr: &VsockHeader,
        pkt: &VsockPacket<'_, B>,
    ) -> Result<ConnAction, CsmError> {
        if hdr.op == VSOCK_OP_RST {
            debug!("vsock: guest reset {key:?}");
            return Ok(ConnAction::Forget);
        }
        self.update_peer_credit(hdr);
        match hdr.op {
            // Only the side that sent `OP_REQUEST` may get an answer.
            VSOCK_OP_RESPONSE if self.state == ConnState::LocalInit => {
                self.state = self.state.transition(ConnState::Established)?;
                self.deadline = None;
                let line = format!("OK {}\n", key.local_port);
                // The stream is fresh, so its send buffer is empty and the short line fits.
                match send_nosignal(&self.stream, line.as_bytes()) {
                    Ok(n) if n == line.len() => Ok(ConnAction::Keep),
                    Ok(n) => Err(CsmError::ShortOkLine {
                        written: n,
                        len: line.len(),
                    }),
                    Err(e) => Err(CsmError::HostWrite(e)),
                }
            }
            VSOCK_OP_RW if self.state == ConnState::Established && !self.shut.guest_send => {
                if let Some(data) = pkt.data_slice() {
                    // `len` <= CONN_BUF_ALLOC once accepted, so it fits in u32.
                    let written = self.tx_buf.push(&self.stream, data)?;
                    self.rx_cnt = self.rx_cnt.wrapping_add(data.len() as u32);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
                }
                Ok(ConnAction::Keep)
            }
            VSOCK_OP_CREDIT_UPDATE => Ok(ConnAction::Keep),
            VSOCK_OP_CREDIT_REQUEST => {
                self.pending.credit_update = true;
                Ok(ConnAction::Keep)
            }
            VSOCK_OP_SHUTDOWN => {
                if hdr.flags & VSOCK_FLAGS_SHUTDOWN_SEND != 0 {
                    self.shut.guest_send = true;
                }
                if hdr.flags & VSOCK_FLAGS_SHUTDOWN_RCV != 0 && !self.shut.guest_rcv {
                    self.shut.guest_rcv = true;
                    self.pending.rw = false;
                    if let Err(e) = self.stream.shutdown(Shutdown::Read) {
                        debug!("vsock: shutdown(read) of host stream: {e}");
                    }
                }
                Ok(ConnAction::Keep)
            }
            op => Err(CsmError::UnexpectedOp {
                op,
                state: self.state,
            }),
        }
    }

    /// Produces at most one packet for the guest (connection `key` of guest `guest_cid`) from
    /// the pending work; returns the bytes written into `pkt` (header and payload). Sending
    /// `OP_REQUEST` starts the `connect_timeout` for the guest's answer.
    pub fn send_pkt<B: BitmapSlice>(
        &mut self,
        key: ConnKey,
        guest_cid: u64,
        connect_timeout: Duration,
        pkt: &mut VsockPacket<'_, B>,
    ) -> (Option<u32>, ConnAction) {
        // The muxer popped us from its rx queue to call this.
        self.in_rxq = false;
        if self.pending.request {
            self.pending.request = false;
            self.deadline = Some(Instant::now() + connect_timeout);
            let hdr = self.header(key, guest_cid, VSOCK_OP_REQUEST);
            return (self.emit(&hdr, pkt), ConnAction::Keep);
        }
        if self.pending.response {
            self.pending.response = false;
            match self.state.transition(ConnState::Established) {
                Ok(s) => self.state = s,
                // Only a PeerInit connection has a response pending.
                Err(e) => warn!("vsock: {key:?}: {e}"),
            }
            let hdr = self.header(key, guest_cid, VSOCK_OP_RESPONSE);
            return (self.emit(&hdr, pkt), ConnAction::Keep);
        }
        if self.pending.rw {
            self.pending.rw = false;
            match self.read_host_data(pkt) {
                HostRead::Data(n) => {
                    self.tx_cnt = self.tx_cnt.wrapping_add(n);
                    let mut hdr = self.header(key, guest_cid, VSOCK_OP_RW);
                    hdr.len = n;
                    let used = self.emit(&hdr, pkt).map(|h| h + n);
                    return (used, ConnAction::Keep);
                }
                HostRead::Eof => {
                    self.shut.host_eof = true;
                    let mut hdr = self.header(key, guest_cid, VSOCK_OP_SHUTDOWN);
                    if peer_fully_closed(&self.stream) {
                        hdr.flags = VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND;
                        debug!("vsock: host closed {key:?}");
                        return (self.emit(&hdr, pkt), ConnAction::Forget);
                    }
                    hdr.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
                    debug!("vsock: host half-closed {key:?}");
                    return (self.emit(&hdr, pkt), ConnAction::Keep);
                }
                HostRead::Error => {
                    let hdr = rst_header(key, guest_cid);
                    return (self.emit(&hdr, pkt), ConnAction::Forget);
                }
                HostRead::Nothing => {}
            }
        }
        if self.pending.credit_update {
            let hdr = self.header(key, guest_cid, VSOCK_OP_CREDIT_UPDATE);
            return (self.emit(&hdr, pkt), ConnAction::Keep);
        }
        (None, ConnAction::Keep)
    }

    fn header(&self, key: ConnKey, guest_cid: u64, op: u16) -> VsockHeader {
        VsockHeader {
            op,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
            ..rst_header(key, guest_cid)
        }
    }

    /// Writes `hdr` into `pkt`; every header carries our credit, so no separate update is
    /// pending afterwards.
    fn emit<B: BitmapSlice>(
        &mut self,
        hdr: &VsockHeader,
        pkt: &mut VsockPacket<'_, B>,
    ) -> Option<u32> {
        match hdr.write_to(pkt) {
            Ok(()) => {
                self.last_fwd_cnt_sent = hdr.fwd_cnt;
                self.pending.credit_update = false;
                Some(HEADER_SIZE as u32)
            }
            Err(e) => {
                warn!("vsock: cannot write rx header: {e}");
                None
            }
        }
    }

    /// Reads host stream data directly into the guest buffer, bounded by the guest's credit.
    fn read_host_data<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> HostRead {
        let Some(data) = pkt.data_slice() else {
            return HostRead::Nothing;
        };
        let max = (self.peer_credit() as usize).min(data.len());
        if max == 0 {
            // Re-polled once the guest grants credit (see `want_read`).
            return HostRead::Nothing;
        }
        let Ok(mut buf) = data.subslice(0, max) else {
            return HostRead::Nothing;
        };
        loop {
            match (&self.stream).read_volatile(&mut buf) {
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

    /// Writes buffered guest data to the host stream; half-closes the stream once drained if
    /// the guest will not send more.
    fn flush_to_host(&mut self) -> Result<(), CsmError> {
        let n = self.tx_buf.flush_to(&self.stream)?;
        // At most CONN_BUF_ALLOC bytes are buffered.
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        self.maybe_shutdown_host_write();
        Ok(())
    }

    fn maybe_shutdown_host_write(&mut self) {
        if self.shut.guest_send && self.tx_buf.is_empty() && !self.shut.host_write {
            self.shut.host_write = true;
            if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                debug!("vsock: shutdown(write) of host stream: {e}");
            }
        }
    }
}

fn volatile_io_kind(e: &VolatileMemoryError) -> Option<ErrorKind> {
    match e {
        VolatileMemoryError::IOError(io) => Some(io.kind()),
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_is_bounded_by_peer_buffer() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = VsockConnection::new(a, 99, ConnState::Established, false);
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
    fn read_interest_follows_credit_and_shutdown() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = VsockConnection::new_local(a, 7);
        // Not established yet: nothing to poll, the request is pending.
        assert_eq!(c.interest(), EventSet::empty());
        assert!(c.claim_rxq_slot());
        assert!(!c.claim_rxq_slot(), "queued once");
        c.state = c.state.transition(ConnState::Established).unwrap();
        assert_eq!(
            c.interest(),
            EventSet::empty(),
            "no credit from the guest yet"
        );
        c.peer_buf_alloc = 4096;
        assert_eq!(c.interest(), EventSet::IN);
        c.pending.rw = true;
        assert_eq!(c.interest(), EventSet::empty(), "a read is already pending");
        c.pending.rw = false;
        c.shut.guest_rcv = true;
        assert_eq!(c.interest(), EventSet::empty());
    }

    #[test]
    fn connect_deadline_only_while_waiting_for_the_guest() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = VsockConnection::new_local(a, 7);
        assert_eq!(c.connect_deadline(), None, "request not sent yet");
        let d = Instant::now();
        c.deadline = Some(d);
        assert_eq!(c.connect_deadline(), Some(d));
        c.state = ConnState::Established;
        assert_eq!(c.connect_deadline(), None);
    }

    #[test]
    fn finished_once_both_directions_are_done() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = VsockConnection::new(a, 1, ConnState::Established, false);
        assert!(!c.refresh());
        c.shut.guest_send = true;
        assert!(!c.refresh(), "the host may still send");
        assert!(
            c.shut.host_write,
            "nothing buffered: host write side shut down"
        );
        c.shut.host_eof = true;
        assert!(c.refresh());
    }

    #[test]
    fn credit_update_is_due_after_the_threshold() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = VsockConnection::new(a, 1, ConnState::Established, false);
        c.fwd_cnt = CREDIT_UPDATE_THRESHOLD - 1;
        c.refresh();
        assert!(!c.pending.credit_update);
        c.fwd_cnt = CREDIT_UPDATE_THRESHOLD;
        c.refresh();
        assert!(c.pending.credit_update);
    }
}
