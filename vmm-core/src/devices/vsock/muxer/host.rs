// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The host side's unix sockets ("hybrid vsock").
//!
//! Host-initiated connections: a host process connects to `uds_path` and writes
//! `CONNECT <port>\n` (read byte by byte, so no payload byte after it is consumed; at most
//! [`MAX_PENDING_HOST_STREAMS`] streams may be waiting to complete that line, each for at most
//! the connect timeout); the muxer then allocates a local port from [`FIRST_HOST_PORT`] up and
//! the connection starts in `LocalInit`. Guest-initiated connections to host port `P` are
//! forwarded to the unix socket `<uds_path>_<P>`, connected without blocking.
//!
//! A failed `accept` (e.g. out of fds) pauses the listener for [`LISTENER_PAUSE`] instead of
//! letting the level-triggered listener spin the event loop.

use std::ffi::OsString;
use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::super::csm::{ConnKey, VsockConnection};
use super::super::packet::VsockHeader;
use super::{VsockMuxer, LISTENER_TOKEN, MAX_CONNECTIONS};

/// Maximum number of accepted host streams that have not sent their `CONNECT` line yet.
pub const MAX_PENDING_HOST_STREAMS: usize = 64;
/// Maximum length of a `CONNECT <port>\n` line (newline included).
pub const MAX_CONNECT_LINE: usize = 32;
/// First local port handed out to host-initiated connections.
pub const FIRST_HOST_PORT: u32 = 1 << 30;
/// How long the listener is not polled after a failed accept (e.g. out of fds).
const LISTENER_PAUSE: Duration = Duration::from_millis(100);
const ACCEPTS_PER_PASS: usize = 32;

/// An accepted host stream that has not completed its `CONNECT <port>\n` line.
pub(super) struct PendingHost {
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

impl VsockMuxer {
    /// Guest `OP_REQUEST` for a new connection: connect to `<uds_path>_<port>`.
    pub(super) fn guest_connect(&mut self, key: ConnKey, hdr: &VsockHeader) {
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!("vsock: connection limit reached, refusing guest connection");
            self.rxq.reply_rst(hdr);
            return;
        }
        let path = port_path(&self.uds_path, key.local_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                debug!("vsock: guest connect to {} failed: {e}", path.display());
                self.rxq.reply_rst(hdr);
                return;
            }
        };
        debug!(
            "vsock: guest port {} connected to {}",
            key.peer_port,
            path.display()
        );
        let token = self.alloc_token();
        self.insert_conn(key, VsockConnection::new_peer(stream, token, hdr));
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

    pub(super) fn accept_host_streams(&mut self) {
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
        self.timer.arm(deadline);
    }

    pub(super) fn read_pending_host(&mut self, token: u64) {
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
        self.unpoll(&pending.stream);
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
        self.local_ports.insert(local_port);
        self.insert_conn(key, VsockConnection::new_local(stream, token));
    }

    /// Closes the host streams whose `CONNECT` line is overdue at `now`.
    pub(super) fn expire_pending_host(&mut self, now: Instant) {
        let stale: Vec<u64> = self
            .pending_host
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in stale {
            if let Some(p) = self.pending_host.remove(&token) {
                debug!("vsock: host stream sent no CONNECT line in time, closing");
                self.unpoll(&p.stream);
            }
        }
    }

    /// The earliest deadline of the host side: a `CONNECT` line or the end of a listener pause.
    pub(super) fn next_host_deadline(&self) -> Option<Instant> {
        self.pending_host
            .values()
            .map(|p| p.deadline)
            .chain(self.listener_paused_until)
            .min()
    }

    fn pause_listener(&mut self) {
        if self.listener_paused_until.is_some() {
            return;
        }
        self.unpoll(&self.listener);
        let until = Instant::now() + LISTENER_PAUSE;
        self.listener_paused_until = Some(until);
        self.timer.arm(until);
    }

    pub(super) fn resume_listener(&mut self, now: Instant) {
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

    /// Removes `fd` from the epoll set (it may not be in it).
    fn unpoll(&self, fd: &impl AsRawFd) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            fd.as_raw_fd(),
            EpollEvent::default(),
        );
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

/// Connects a non-blocking unix stream socket; never blocks (a full backlog gives `EAGAIN`).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
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
    use super::super::tests::{host_stream, pump_until_eof, tmp_muxer};
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

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
    fn nonblocking_connect_refuses_bad_paths_and_reaches_a_listener() {
        let long = PathBuf::from(format!("/{}", "x".repeat(200)));
        for bad in [Path::new(""), long.as_path()] {
            let e = connect_nonblocking(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l.sock");
        assert!(connect_nonblocking(&p).is_err(), "nobody listens yet");
        let l = UnixListener::bind(&p).unwrap();
        let mut s = connect_nonblocking(&p).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        s.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        peer.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
    }

    #[test]
    fn local_ports_skip_those_in_use_and_wrap() {
        let (_d, mut m) = tmp_muxer();
        assert_eq!(m.alloc_local_port(), FIRST_HOST_PORT);
        m.local_ports.insert(FIRST_HOST_PORT + 1);
        assert_eq!(m.alloc_local_port(), FIRST_HOST_PORT + 2);
        m.next_local_port = u32::MAX - 1;
        assert_eq!(m.alloc_local_port(), u32::MAX - 1);
        assert_eq!(m.alloc_local_port(), FIRST_HOST_PORT);
    }

    #[test]
    fn malformed_and_overlong_connect_lines_close_the_stream() {
        let (d, mut m) = tmp_muxer();
        for line in [&b"HELLO 5\n"[..], &[b'C'; 40][..]] {
            let mut s = host_stream(&d, line);
            pump_until_eof(&mut m, &mut s);
        }
        assert_eq!(m.num_connections(), 0);
        assert!(!m.has_pending_rx());
    }

    #[test]
    fn silent_host_stream_times_out() {
        let (d, mut m) = tmp_muxer();
        m.set_connect_timeout(Duration::from_millis(50));
        let mut s = host_stream(&d, b"CONN");
        pump_until_eof(&mut m, &mut s);
        assert!(!m.has_pending_rx());
    }
}
