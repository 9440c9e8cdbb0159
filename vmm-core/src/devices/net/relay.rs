// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! A vhost-user relay between QEMU and the virtio-net backend daemon.
//!
//! QEMU 7.2's virtio-net enables the rings of a vhost-user peer (`SET_VRING_ENABLE`) as soon as
//! the guest sets its features, before it ever sends `SET_FEATURES` to the backend (it does so
//! at DRIVER_OK, and then enables the rings again). `vhost` 0.15's request handler checks that
//! `VHOST_USER_F_PROTOCOL_FEATURES` was acked in `SET_FEATURES` and ends the connection when it
//! was not. Without that protocol feature, QEMU 7.2 refuses to start vhost-user net at all. So
//! QEMU connects to this relay instead: it forwards every message (with its attached fds) to the
//! daemon's socket and every reply back, except that a `SET_VRING_ENABLE` sent before the first
//! `SET_FEATURES` is held back (answered by the relay itself if QEMU asked for a reply) and
//! forwarded right after that `SET_FEATURES`. QEMU 7.2 does not send the enable again, so the
//! rings end up in the state QEMU asked for.
//!
//! One frontend; the relay ends when either side closes or when stopped.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::devices::vhost_user_server::ensure_free;
use crate::devices::vsock::socket_path::BoundPath;

/// `VHOST_USER_SET_FEATURES`.
pub const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_VRING_ENABLE`.
pub const SET_VRING_ENABLE: u32 = 18;
/// Length of a vhost-user message header (request, flags, size).
const HDR_LEN: usize = 12;
/// Largest message body accepted (vhost's own limit).
const MAX_BODY_LEN: usize = 0x1000;
/// Most fds attached to one message (memory regions of SET_MEM_TABLE).
const MAX_FDS: usize = 32;
/// Header flags: protocol version 1, reply, need reply.
const VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The frontend socket path exists or cannot be bound.
    #[error("vhost-user relay: cannot bind {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Connecting to the backend daemon failed.
    #[error("vhost-user relay: cannot connect to the backend at {path}: {source}")]
    Connect {
        /// The backend socket.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// I/O on one of the connections failed.
    #[error("vhost-user relay: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The frontend sent a message with an oversized body.
    #[error("vhost-user relay: request {request} has a {size}-byte body (at most {MAX_BODY_LEN})")]
    Oversized {
        /// Request code.
        request: u32,
        /// Body size.
        size: usize,
    },
    /// The relay thread did not end in time.
    #[error("vhost-user relay thread did not finish within {0:?}")]
    JoinTimeout(Duration),
    /// The relay thread panicked.
    #[error("vhost-user relay thread panicked")]
    Panicked,
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> RelayError {
    move |source| RelayError::Io { what, source }
}

/// Holds back `SET_VRING_ENABLE` until the first `SET_FEATURES`.
#[derive(Debug, Default)]
struct Filter {
    features_set: bool,
    /// Held-back messages (header + body, without the need-reply flag), in order.
    deferred: Vec<Vec<u8>>,
}

impl Filter {
    /// Whether to forward message `msg` (header + body) now; if not, it is kept for later.
    fn forward_now(&mut self, msg: &[u8]) -> bool {
        match u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]) {
            SET_FEATURES => {
                self.features_set = true;
                true
            }
            SET_VRING_ENABLE if !self.features_set => {
                let mut m = msg.to_vec();
                let flags = u32::from_le_bytes([m[4], m[5], m[6], m[7]]) & !FLAG_NEED_REPLY;
                m[4..8].copy_from_slice(&flags.to_le_bytes());
                self.deferred.push(m);
                false
            }
            _ => true,
        }
    }

    /// The held-back messages, once features were set.
    fn take_deferred(&mut self) -> Vec<Vec<u8>> {
        if self.features_set {
            std::mem::take(&mut self.deferred)
        } else {
            Vec::new()
        }
    }
}

/// A bound relay, not yet running.
#[derive(Debug)]
pub struct Relay {
    listener: UnixListener,
    path: BoundPath,
    backend: PathBuf,
}

impl Relay {
    /// Binds the frontend socket at `path`; the relay will connect to the daemon at `backend`.
    pub fn bind(path: &Path, backend: &Path) -> Result<Self, RelayError> {
        ensure_free(path).map_err(|_| RelayError::Bind {
            path: path.to_path_buf(),
            source: io::Error::from(io::ErrorKind::AlreadyExists),
        })?;
        let listener = UnixListener::bind(path).map_err(|source| RelayError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Relay {
            listener,
            path: BoundPath::new(path),
            backend: backend.to_path_buf(),
        })
    }

    /// Starts the relay thread (named `name`).
    pub fn spawn(self, name: &str) -> Result<RelayHandle, RelayError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(io_err("creating the stop event"))?;
        let thread_stop = stop
            .try_clone()
            .map_err(io_err("creating the stop event"))?;
        let path = self.path.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let r = self.run(&thread_stop);
                if let Err(e) = &r {
                    warn!("{e}");
                }
                r
            })
            .map_err(io_err("spawning the relay thread"))?;
        Ok(RelayHandle {
            thread: Some(thread),
            stop,
            path,
        })
    }

    fn run(self, stop: &EventFd) -> Result<(), RelayError> {
        crate::seccomp::apply_or_log(crate::seccomp::ThreadClass::VhostUser);
        let Relay {
            listener, backend, ..
        } = self;
        if !wait_readable(&[listener.as_raw_fd()], stop)?.contains(&true) {
            return Ok(());
        }
        let (front, _) = listener
            .accept()
            .map_err(io_err("accepting the frontend"))?;
        // One frontend: later connection attempts are refused.
        drop(listener);
        let back = UnixStream::connect(&backend).map_err(|source| RelayError::Connect {
            path: backend.clone(),
            source,
        })?;
        info!("vhost-user relay: frontend connected");
        let mut filter = Filter::default();
        let mut buf = vec![0u8; MAX_BODY_LEN];
        loop {
            let ready = wait_readable(&[front.as_raw_fd(), back.as_raw_fd()], stop)?;
            if ready.is_empty() {
                return Ok(());
            }
            if ready[0] && !relay_request(&front, &back, &mut filter)? {
                debug!("vhost-user relay: frontend closed");
                return Ok(());
            }
            if ready[1] {
                let n = (&back).read(&mut buf).map_err(io_err("reading a reply"))?;
                if n == 0 {
                    debug!("vhost-user relay: backend closed");
                    return Ok(());
                }
                (&front)
                    .write_all(&buf[..n])
                    .map_err(io_err("forwarding a reply"))?;
            }
        }
    }
}

/// Waits until one of `fds` is readable (or hung up) or `stop` fires. Returns, per fd, whether
/// it is ready; empty when stopped.
fn wait_readable(fds: &[RawFd], stop: &EventFd) -> Result<Vec<bool>, RelayError> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .chain(std::iter::once(&stop.as_raw_fd()))
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `p` is a live array of initialised pollfds, its length is passed.
        let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io_err("poll")(e));
        }
        if p[fds.len()].revents != 0 {
            return Ok(Vec::new());
        }
        return Ok(p[..fds.len()].iter().map(|x| x.revents != 0).collect());
    }
}

/// Reads one message (header with its fds, then body) from `front` and forwards it to `back`
/// unless the filter drops it. `Ok(false)`: the frontend closed.
fn relay_request(
    front: &UnixStream,
    back: &UnixStream,
    filter: &mut Filter,
) -> Result<bool, RelayError> {
    let mut hdr = [0u8; HDR_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr() as *mut libc::c_void,
        iov_len: HDR_LEN,
    }];
    // SAFETY: the iovec points to `hdr`, which outlives the call; received fds are written
    // into `raw_fds` (at most its length) and owned right below.
    let (n, nfds) = unsafe { front.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io_err("reading a request")(io::Error::from_raw_os_error(e.errno())))?;
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        // SAFETY: these fds were just received with SCM_RIGHTS: nobody else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(false);
    }
    (&*front)
        .read_exact(&mut hdr[n..])
        .map_err(io_err("reading a request header"))?;
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    if size > MAX_BODY_LEN {
        return Err(RelayError::Oversized { request, size });
    }
    let mut body = vec![0u8; size];
    (&*front)
        .read_exact(&mut body)
        .map_err(io_err("reading a request body"))?;
    let mut msg = hdr.to_vec();
    msg.extend_from_slice(&body);
    if !filter.forward_now(&msg) {
        debug!("vhost-user relay: SET_VRING_ENABLE before SET_FEATURES held back");
        if flags & FLAG_NEED_REPLY != 0 {
            let mut reply = Vec::with_capacity(HDR_LEN + 8);
            reply.extend_from_slice(&request.to_le_bytes());
            reply.extend_from_slice(&(VERSION_1 | FLAG_REPLY).to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&0u64.to_le_bytes());
            (&*front)
                .write_all(&reply)
                .map_err(io_err("answering a held-back request"))?;
        }
        return Ok(true);
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let sent = back
        .send_with_fds(&[&msg[..]], &raw)
        .map_err(|e| io_err("forwarding a request")(io::Error::from_raw_os_error(e.errno())))?;
    (&*back)
        .write_all(&msg[sent..])
        .map_err(io_err("forwarding a request"))?;
    for m in filter.take_deferred() {
        (&*back)
            .write_all(&m)
            .map_err(io_err("forwarding a held-back request"))?;
    }
    Ok(true)
}

/// Controls a running relay. Dropping it stops the thread (without waiting) and removes the
/// frontend socket path.
#[derive(Debug)]
pub struct RelayHandle {
    thread: Option<JoinHandle<Result<(), RelayError>>>,
    stop: EventFd,
    path: BoundPath,
}

impl RelayHandle {
    /// Asks the relay thread to end.
    pub fn stop(&self) {
        if let Err(e) = self.stop.write(1) {
            warn!("vhost-user relay: cannot signal stop: {e}");
        }
    }

    /// True once the relay thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits until `deadline` for the thread to end, then removes the socket path.
    pub fn join_until(&mut self, deadline: Instant, timeout: Duration) -> Result<(), RelayError> {
        self.path.remove();
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if !crate::thread::wait_finished(&thread, left) {
            self.stop();
            self.thread = Some(thread);
            return Err(RelayError::JoinTimeout(timeout));
        }
        thread.join().map_err(|_| RelayError::Panicked)?
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if !self.is_finished() {
            self.stop();
        }
        self.path.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(request: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut m = request.to_le_bytes().to_vec();
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).unwrap();
        b
    }

    #[test]
    fn filter_holds_enable_back_until_features() {
        let mut f = Filter::default();
        assert!(f.forward_now(&msg(1, VERSION_1, &[])));
        assert!(!f.forward_now(&msg(SET_VRING_ENABLE, VERSION_1, &[0; 8])));
        let asked = msg(SET_VRING_ENABLE, VERSION_1 | FLAG_NEED_REPLY, &[1; 8]);
        assert!(!f.forward_now(&asked));
        assert!(f.take_deferred().is_empty(), "released before SET_FEATURES");
        assert!(f.forward_now(&msg(SET_FEATURES, VERSION_1, &[0; 8])));
        assert_eq!(
            f.take_deferred(),
            vec![
                msg(SET_VRING_ENABLE, VERSION_1, &[0; 8]),
                msg(SET_VRING_ENABLE, VERSION_1, &[1; 8])
            ]
        );
        assert!(f.take_deferred().is_empty());
        assert!(f.forward_now(&msg(SET_VRING_ENABLE, VERSION_1, &[0; 8])));
    }

    /// Frontend → relay → fake backend: early enables are held back until SET_FEATURES (and
    /// answered by the relay when a reply is requested), everything arrives with its fd,
    /// replies come back, and the relay ends when the frontend leaves.
    #[test]
    fn relays_messages_fds_and_replies() {
        let dir = tempfile::tempdir().unwrap();
        let (front_path, back_path) = (dir.path().join("f.sock"), dir.path().join("b.sock"));
        let backend = UnixListener::bind(&back_path).unwrap();
        let mut relay = Relay::bind(&front_path, &back_path)
            .unwrap()
            .spawn("t-relay")
            .unwrap();
        assert!(matches!(
            Relay::bind(&front_path, &back_path),
            Err(RelayError::Bind { .. })
        ));
        let mut front = UnixStream::connect(&front_path).unwrap();
        let (mut back, _) = backend.accept().unwrap();
        back.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        front
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();

        let early = msg(SET_VRING_ENABLE, VERSION_1, &[0; 8]);
        front.write_all(&early).unwrap();
        let asked = msg(SET_VRING_ENABLE, VERSION_1 | FLAG_NEED_REPLY, &[1; 8]);
        front.write_all(&asked).unwrap();
        // The relay answers the second one itself: success (0).
        assert_eq!(
            read_n(&mut front, 20),
            msg(SET_VRING_ENABLE, VERSION_1 | FLAG_REPLY, &[0; 8])
        );
        // A message with an fd (like SET_VRING_KICK).
        let evt = EventFd::new(0).unwrap();
        let kick = msg(12, VERSION_1, &[1, 0, 0, 0, 0, 0, 0, 0]);
        front
            .send_with_fds(&[&kick[..]], &[evt.as_raw_fd()])
            .unwrap();
        let features = msg(SET_FEATURES, VERSION_1, &[0; 8]);
        front.write_all(&features).unwrap();
        let late = msg(SET_VRING_ENABLE, VERSION_1, &[2; 8]);
        front.write_all(&late).unwrap();

        // The backend sees the kick first (with a working fd), SET_FEATURES, the held-back
        // enables (without the need-reply flag) and the late one.
        let mut got = [0u8; 20];
        let mut fds = [-1; 4];
        let mut iov = [libc::iovec {
            iov_base: got.as_mut_ptr() as *mut libc::c_void,
            iov_len: got.len(),
        }];
        // SAFETY: the iovec points to `got`, live across the call; fds land in `fds`.
        let (n, nfds) = unsafe { back.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!((n, nfds), (20, 1));
        assert_eq!(got.to_vec(), kick);
        // SAFETY: received just now with SCM_RIGHTS; owned here only.
        let passed = unsafe { EventFd::from_raw_fd(fds[0]) };
        passed.write(3).unwrap();
        assert_eq!(evt.read().unwrap(), 3);
        assert_eq!(read_n(&mut back, 20), features);
        assert_eq!(read_n(&mut back, 20), early);
        assert_eq!(
            read_n(&mut back, 20),
            msg(SET_VRING_ENABLE, VERSION_1, &[1; 8])
        );
        assert_eq!(read_n(&mut back, 20), late);
        // Replies go back unchanged.
        let reply = msg(1, VERSION_1 | FLAG_REPLY, &[7; 8]);
        back.write_all(&reply).unwrap();
        assert_eq!(read_n(&mut front, 20), reply);

        // The frontend leaves: the relay closes the backend side and ends.
        drop(front);
        assert_eq!(back.read(&mut [0u8; 8]).unwrap(), 0);
        let deadline = Instant::now() + Duration::from_secs(2);
        relay.join_until(deadline, Duration::from_secs(2)).unwrap();
        assert!(!front_path.exists(), "frontend socket left behind");
    }

    #[test]
    fn stop_without_frontend_and_oversized_message() {
        let dir = tempfile::tempdir().unwrap();
        let (front_path, back_path) = (dir.path().join("f.sock"), dir.path().join("b.sock"));
        let mut relay = Relay::bind(&front_path, &back_path)
            .unwrap()
            .spawn("t-relay")
            .unwrap();
        assert!(!relay.is_finished());
        relay.stop();
        let deadline = Instant::now() + Duration::from_secs(2);
        relay.join_until(deadline, Duration::from_secs(2)).unwrap();
        assert!(!front_path.exists());

        let backend = UnixListener::bind(&back_path).unwrap();
        let mut relay = Relay::bind(&front_path, &back_path)
            .unwrap()
            .spawn("t-relay")
            .unwrap();
        let mut front = UnixStream::connect(&front_path).unwrap();
        let _back = backend.accept().unwrap();
        let mut m = msg(5, VERSION_1, &[]);
        m[8..12].copy_from_slice(&(MAX_BODY_LEN as u32 + 1).to_le_bytes());
        front.write_all(&m).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        match relay.join_until(deadline, Duration::from_secs(2)) {
            Err(RelayError::Oversized { request: 5, size }) => assert_eq!(size, MAX_BODY_LEN + 1),
            other => panic!("expected Oversized, got {other:?}"),
        }
    }
}
