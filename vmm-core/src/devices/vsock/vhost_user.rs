// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! vhost-user transport for the vsock device (QEMU's `vhost-user-vsock-device`).
//!
//! [`VsockBackend`] implements `VhostUserBackendMut`; the muxer's epoll fd is registered with the
//! vring worker so host socket activity wakes it. [`VhostUserVsockServer`] binds the sockets and
//! [`VhostUserVsockHandle`] controls the dedicated serving thread.
//!
//! Stopping while a frontend is connected: `vhost-user-backend` blocks in `recvmsg()` on the
//! frontend connection and does not expose it. Right after the daemon accepted the connection we
//! therefore locate that socket among our fds (the accepted socket is the only non-listening
//! socket whose local address is our vhost-user path) and keep a duplicate of it;
//! [`VhostUserVsockHandle::stop`] calls `shutdown(2)` on it, which makes the request loop see
//! "disconnected" and end.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostError, Listener};
use vhost_user_backend::{
    Error as DaemonError, VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{VsockDevice, MAX_QUEUE_SIZE, NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use super::socket_path::BoundPath;
use super::{VsockConfig, VsockError};

/// Epoll token of the muxer fd in the vring worker (0..=NUM_QUEUES are reserved).
pub const BACKEND_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Name of the serving thread.
pub const SERVER_THREAD_NAME: &str = "joey-vsock";

/// How often the serving thread re-checks the stop flag while waiting for a frontend.
const ACCEPT_POLL_INTERVAL_MS: i32 = 250;

/// Errors of the vhost-user transport.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The vhost-user socket path already exists.
    #[error("vhost-user socket path {0} already exists")]
    PathExists(PathBuf),
    /// Binding the vhost-user socket failed.
    #[error("cannot bind vhost-user socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Creating the stop eventfd failed.
    #[error("cannot create stop event: {0}")]
    StopEvent(#[source] io::Error),
    /// Spawning the serving thread failed.
    #[error("cannot spawn the vsock serving thread: {0}")]
    Spawn(#[source] io::Error),
    /// The vhost-user daemon failed.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// Registering the muxer fd with the vring worker failed.
    #[error("cannot register host event fd with the vring worker: {0}")]
    RegisterListener(#[source] io::Error),
    /// Waiting for a frontend failed.
    #[error("waiting for a vhost-user frontend failed: {0}")]
    Poll(#[source] io::Error),
    /// The serving thread did not end in time.
    #[error("vsock serving thread did not finish within {0:?}")]
    JoinTimeout(Duration),
    /// The serving thread panicked.
    #[error("vsock serving thread panicked")]
    ThreadPanicked,
}

impl From<DaemonError> for VhostUserError {
    fn from(e: DaemonError) -> Self {
        VhostUserError::Daemon(e.to_string())
    }
}

type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The vhost-user backend: the vsock device plus vhost-user bookkeeping.
pub struct VsockBackend {
    device: VsockDevice,
    mem: Option<GuestMemory>,
    event_idx: bool,
    /// Exit eventfds handed to vring workers; `vhost-user-backend` never closes them.
    exit_fds: Mutex<Vec<RawFd>>,
}

impl VsockBackend {
    /// Wraps a device.
    pub fn new(device: VsockDevice) -> Self {
        VsockBackend {
            device,
            mem: None,
            event_idx: false,
            exit_fds: Mutex::new(Vec::new()),
        }
    }

    /// The device.
    pub fn device(&self) -> &VsockDevice {
        &self.device
    }

    /// Runs one round of device work: tx queue, host sockets, rx queue; signals used queues.
    fn process(&mut self, vrings: &[VringRwLock]) {
        if let Err(e) = self.device.process_host_events() {
            warn!("vsock: host event processing failed: {e}");
        }
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return;
        };
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE), vrings.get(TX_QUEUE)) else {
            return;
        };
        let device = &mut self.device;
        let tx_used = with_queue(tx, |q| device.process_tx_queue(&*mem, q));
        if tx_used {
            // Guest packets may have made host sockets ready (new streams, credit).
            if let Err(e) = device.process_host_events() {
                warn!("vsock: host event processing failed: {e}");
            }
        }
        let rx_used = with_queue(rx, |q| device.process_rx_queue(&*mem, q));
        signal_used(tx, tx_used);
        signal_used(rx, rx_used);
    }

    /// Closes the exit eventfds leaked into the (now finished) vring workers.
    fn close_exit_fds(&self) {
        for fd in lock(&self.exit_fds).drain(..) {
            // SAFETY: `fd` is an eventfd we created in `exit_event`; vhost-user-backend took it
            // via `into_raw_fd` and never closes it. Its worker thread has been joined, so no one
            // uses the fd any more and it is closed exactly once.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// Runs `f` on the queue of `vring` (if it is ready); returns whether the used ring changed.
fn with_queue(
    vring: &VringRwLock,
    f: impl FnOnce(&mut virtio_queue::Queue) -> Result<bool, super::DeviceError>,
) -> bool {
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    if !queue.ready() {
        return false;
    }
    match f(queue) {
        Ok(used) => used,
        Err(e) => {
            warn!("vsock: queue processing failed: {e}");
            // Some chains may have been returned before the failure.
            true
        }
    }
}

fn signal_used(vring: &VringRwLock, used: bool) {
    if !used {
        return;
    }
    let needed = vring.needs_notification().unwrap_or(true);
    if needed {
        if let Err(e) = vring.signal_used_queue() {
            warn!("vsock: cannot signal used queue: {e}");
        }
    }
}

impl VhostUserBackendMut for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn reset_device(&mut self) {
        // The guest driver forgot all connections; so do we (host streams get closed).
        self.device.muxer_mut().reset();
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.read_config(offset, size)
    }

    fn update_memory(&mut self, mem: GuestMemory) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                lock(&self.exit_fds).push(consumer.as_raw_fd());
                Some((consumer, notifier))
            }
            Err(e) => {
                warn!("vsock: cannot create exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Never return an error: that would terminate the vring worker for good.
        match device_event {
            e if e == RX_QUEUE as u16 || e == TX_QUEUE as u16 || e == BACKEND_EVENT => {
                self.process(vrings)
            }
            e if (e as usize) < NUM_QUEUES => {} // event queue: nothing to do
            e => debug!("vsock: unexpected device event {e}"),
        }
        Ok(())
    }
}

/// Configuration-free parts shared between the handle and the serving thread.
struct Shared {
    stop_requested: AtomicBool,
    stop_evt: EventFd,
    /// Duplicate of the accepted frontend socket, used to interrupt the request loop.
    frontend: Mutex<Option<OwnedFd>>,
}

impl Shared {
    fn request_stop(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.stop_evt.write(1) {
            warn!("vsock: cannot signal stop event: {e}");
        }
        if let Some(fd) = lock(&self.frontend).as_ref() {
            shutdown_socket(fd);
        }
    }

    fn stop_requested(&self) -> bool {
        self.stop_requested.load(Ordering::SeqCst)
    }

    fn set_frontend(&self, fd: Option<OwnedFd>) {
        let mut guard = lock(&self.frontend);
        *guard = fd;
        // A stop requested before the fd was published must still take effect.
        if self.stop_requested() {
            if let Some(fd) = guard.as_ref() {
                shutdown_socket(fd);
            }
        }
    }
}

/// A bound, not yet serving vhost-user vsock server.
pub struct VhostUserVsockServer {
    listener: UnixListener,
    socket_path: BoundPath,
    uds_path: PathBuf,
    device: VsockDevice,
}

impl std::fmt::Debug for VhostUserVsockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserVsockServer")
            .field("socket_path", &self.socket_path.path())
            .field("uds_path", &self.uds_path)
            .field("guest_cid", &self.device.guest_cid())
            .finish()
    }
}

impl VhostUserVsockServer {
    /// Binds the vhost-user listener at `socket_path` and the hybrid-vsock unix listener at
    /// `cfg.uds_path` (both removed again on stop/drop). Errors if either path exists or cannot
    /// be bound.
    pub fn bind(socket_path: &Path, cfg: VsockConfig) -> Result<Self, VsockError> {
        if socket_path.symlink_metadata().is_ok() {
            return Err(VhostUserError::PathExists(socket_path.to_path_buf()).into());
        }
        if cfg.uds_path.symlink_metadata().is_ok() {
            return Err(super::MuxerError::PathExists(cfg.uds_path.clone()).into());
        }
        let listener = UnixListener::bind(socket_path).map_err(|source| VhostUserError::Bind {
            path: socket_path.to_path_buf(),
            source,
        })?;
        let bound = BoundPath::new(socket_path);
        // On error `bound` is dropped and removes the vhost-user socket again.
        let device = VsockDevice::new(&cfg)?;
        info!(
            "vsock: vhost-user socket {} and host socket {} bound for guest cid {}",
            socket_path.display(),
            cfg.uds_path.display(),
            cfg.guest_cid
        );
        Ok(VhostUserVsockServer {
            listener,
            socket_path: bound,
            uds_path: cfg.uds_path,
            device,
        })
    }

    /// The vhost-user socket path.
    pub fn socket_path(&self) -> &Path {
        self.socket_path.path()
    }

    /// The hybrid-vsock socket path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Spawns a dedicated OS thread (named "joey-vsock") that accepts ONE vhost-user frontend
    /// (QEMU) and serves it until the frontend disconnects or the handle is stopped.
    pub fn spawn(self) -> Result<VhostUserVsockHandle, VsockError> {
        let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(VhostUserError::StopEvent)?;
        let shared = Arc::new(Shared {
            stop_requested: AtomicBool::new(false),
            stop_evt,
            frontend: Mutex::new(None),
        });
        let socket_path = self.socket_path.clone();
        let uds_path = BoundPath::new(&self.uds_path);
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(SERVER_THREAD_NAME.to_string())
            .spawn(move || {
                let result = serve(self, &thread_shared);
                if let Err(e) = &result {
                    warn!("vsock: serving thread ended with error: {e}");
                }
                let _ = done_tx.send(result);
            })
            .map_err(VhostUserError::Spawn)?;
        Ok(VhostUserVsockHandle {
            thread: Some(thread),
            shared,
            done: done_rx,
            paths: [socket_path, uds_path],
        })
    }
}

/// Controls a running vhost-user vsock server.
pub struct VhostUserVsockHandle {
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    done: mpsc::Receiver<Result<(), VhostUserError>>,
    paths: [BoundPath; 2],
}

impl std::fmt::Debug for VhostUserVsockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserVsockHandle")
            .field("socket_path", &self.paths[0].path())
            .field("uds_path", &self.paths[1].path())
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl VhostUserVsockHandle {
    /// Asks the serving thread to stop (works also when no frontend ever connected: must not
    /// hang in accept).
    pub fn stop(&self) {
        self.shared.request_stop();
    }

    /// Waits at most `timeout` for the serving thread to end; removes both socket paths. Err on
    /// timeout (the thread is then asked to stop, since nobody could stop it later).
    pub fn join_timeout(mut self, timeout: Duration) -> Result<(), VsockError> {
        let deadline = Instant::now() + timeout;
        let result = match self.done.recv_timeout(timeout) {
            Ok(r) => r.map_err(VsockError::from),
            Err(RecvTimeoutError::Timeout) => {
                self.shared.request_stop();
                Err(VhostUserError::JoinTimeout(timeout).into())
            }
            Err(RecvTimeoutError::Disconnected) => Err(VhostUserError::ThreadPanicked.into()),
        };
        if let Some(thread) = self.thread.take() {
            // The thread sends its result as its very last action; wait (bounded) for it to
            // actually exit before joining, so join() itself can never block for long.
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                self.thread = Some(thread);
            }
        }
        for p in &self.paths {
            p.remove();
        }
        result
    }

    /// True once the serving thread has ended (frontend gone or stopped).
    pub fn is_finished(&self) -> bool {
        self.thread
            .as_ref()
            .map(|t| t.is_finished())
            .unwrap_or(true)
    }
}

impl Drop for VhostUserVsockHandle {
    fn drop(&mut self) {
        if !self.is_finished() {
            self.shared.request_stop();
        }
        for p in &self.paths {
            p.remove();
        }
    }
}

/// Body of the serving thread.
fn serve(server: VhostUserVsockServer, shared: &Shared) -> Result<(), VhostUserError> {
    let VhostUserVsockServer {
        listener,
        socket_path,
        uds_path: _,
        device,
    } = server;
    let muxer_fd = device.muxer().as_raw_fd();
    let backend = Arc::new(RwLock::new(VsockBackend::new(device)));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon =
        VhostUserDaemon::new(format!("{SERVER_THREAD_NAME}-req"), backend.clone(), mem)?;

    let result = serve_frontend(&mut daemon, listener, socket_path.path(), muxer_fd, shared);

    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // Dropping the daemon joins the vring worker (it exits on the event above).
    drop(daemon);
    match backend.read() {
        Ok(b) => b.close_exit_fds(),
        Err(p) => p.into_inner().close_exit_fds(),
    }
    // Drops the muxer: host streams close and the hybrid-vsock path is removed.
    drop(backend);
    drop(socket_path);
    info!("vsock: serving thread finished");
    result
}

fn serve_frontend(
    daemon: &mut VhostUserDaemon<Arc<RwLock<VsockBackend>>>,
    listener: UnixListener,
    socket_path: &Path,
    muxer_fd: RawFd,
    shared: &Shared,
) -> Result<(), VhostUserError> {
    for handler in daemon.get_epoll_handlers() {
        handler
            .register_listener(muxer_fd, EventSet::IN, u64::from(BACKEND_EVENT))
            .map_err(VhostUserError::RegisterListener)?;
    }
    if !wait_for_frontend(&listener, shared)? {
        debug!("vsock: stopped before a frontend connected");
        return Ok(());
    }
    let mut listener = Listener::from(listener);
    // The listener is readable, so this accept() does not block.
    daemon.start(&mut listener)?;
    // Exactly one frontend: later connection attempts are refused.
    drop(listener);
    info!("vsock: vhost-user frontend connected");
    let frontend = find_accepted_socket(socket_path);
    if frontend.is_none() {
        warn!("vsock: cannot find the frontend socket; stop() must wait for the frontend");
    }
    shared.set_frontend(frontend);
    let result = daemon.wait();
    shared.set_frontend(None);
    match result {
        Ok(()) => Ok(()),
        Err(DaemonError::HandleRequest(VhostError::Disconnected))
        | Err(DaemonError::HandleRequest(VhostError::PartialMessage)) => {
            info!("vsock: vhost-user frontend disconnected");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Waits until a frontend connects (true) or a stop is requested (false).
fn wait_for_frontend(listener: &UnixListener, shared: &Shared) -> Result<bool, VhostUserError> {
    loop {
        if shared.stop_requested() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: shared.stop_evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds that lives across the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, ACCEPT_POLL_INTERVAL_MS) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(VhostUserError::Poll(e));
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(VhostUserError::Poll(io::Error::other(
                "vhost-user listener failed",
            )));
        }
    }
}

/// Finds the socket the daemon accepted on `listen_path` and returns a duplicate of it.
fn find_accepted_socket(listen_path: &Path) -> Option<OwnedFd> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        if !is_accepted_socket_of(fd, listen_path) {
            continue;
        }
        // SAFETY: F_DUPFD_CLOEXEC only creates a new descriptor; on failure nothing changes.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            continue;
        }
        // SAFETY: `dup` is a fresh descriptor owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        // Re-check on our own descriptor: `fd` might have been closed and reused meanwhile.
        if is_accepted_socket_of(owned.as_raw_fd(), listen_path) {
            return Some(owned);
        }
    }
    None
}

/// True if `fd` is a connected (non-listening) unix socket whose local address is `path`,
/// i.e. a connection accepted by the listener bound at `path`.
fn is_accepted_socket_of(fd: RawFd, path: &Path) -> bool {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr`/`len` are valid for writes of `len` bytes; a non-socket fd gives ENOTSOCK.
    let r = unsafe {
        libc::getsockname(
            fd,
            &mut addr as *mut libc::sockaddr_un as *mut libc::sockaddr,
            &mut len,
        )
    };
    if r != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return false;
    }
    let want = path.as_os_str().as_bytes();
    let name: Vec<u8> = addr
        .sun_path
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    if name != want {
        return false;
    }
    let mut listening: libc::c_int = 0;
    let mut optlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `listening`/`optlen` are valid for writes of an int.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            &mut listening as *mut libc::c_int as *mut libc::c_void,
            &mut optlen,
        )
    };
    r == 0 && listening == 0
}

fn shutdown_socket(fd: &OwnedFd) {
    // SAFETY: shutdown(2) on a descriptor we own; it has no memory effects.
    let r = unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
    if r != 0 {
        debug!(
            "vsock: shutdown of frontend socket: {}",
            io::Error::last_os_error()
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::vsock::device::QUEUE_SIZE;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn cfg(dir: &Path) -> VsockConfig {
        VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("vsock.sock"),
        }
    }

    #[test]
    fn backend_features_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let b = VsockBackend::new(VsockDevice::new(&cfg(dir.path())).unwrap());
        assert_eq!(b.num_queues(), 3);
        assert_eq!(b.max_queue_size(), 1024);
        let f = b.features();
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG));
        assert_eq!(b.get_config(0, 8), 3u64.to_le_bytes().to_vec());
        assert!(b.get_config(0, 9).is_empty());
        assert!(BACKEND_EVENT as usize > NUM_QUEUES);
    }

    #[test]
    fn bind_spawn_stop_join_without_frontend() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vhost.sock");
        let c = cfg(dir.path());
        let uds = c.uds_path.clone();
        let start = Instant::now();
        let server = VhostUserVsockServer::bind(&sock, c).unwrap();
        assert!(sock.exists() && uds.exists());
        let handle = server.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!handle.is_finished());
        handle.stop();
        handle.join_timeout(Duration::from_secs(1)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(!sock.exists(), "vhost-user socket not removed");
        assert!(!uds.exists(), "hybrid vsock socket not removed");
    }

    #[test]
    fn bind_fails_on_existing_paths_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vhost.sock");
        std::fs::write(&sock, b"").unwrap();
        let err = VhostUserVsockServer::bind(&sock, cfg(dir.path())).unwrap_err();
        assert!(matches!(
            err,
            VsockError::VhostUser(VhostUserError::PathExists(_))
        ));
        std::fs::remove_file(&sock).unwrap();

        let c = cfg(dir.path());
        std::fs::write(&c.uds_path, b"").unwrap();
        assert!(VhostUserVsockServer::bind(&sock, c).is_err());
        assert!(!sock.exists(), "vhost-user socket left behind");

        // Dropping an unspawned server removes both sockets.
        let c = cfg(dir.path());
        let uds = dir.path().join("other.sock");
        let c = VsockConfig {
            uds_path: uds.clone(),
            ..c
        };
        let server = VhostUserVsockServer::bind(&sock, c).unwrap();
        drop(server);
        assert!(!sock.exists() && !uds.exists());
    }

    #[test]
    fn frontend_disconnect_ends_serving_thread() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vhost.sock");
        let handle = VhostUserVsockServer::bind(&sock, cfg(dir.path()))
            .unwrap()
            .spawn()
            .unwrap();
        let frontend = UnixStream::connect(&sock).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!handle.is_finished());
        drop(frontend);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !handle.is_finished() {
            assert!(
                Instant::now() < deadline,
                "thread did not notice the disconnect"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        handle.join_timeout(Duration::from_secs(1)).unwrap();
        assert!(!sock.exists());
    }

    #[test]
    fn stop_interrupts_a_connected_idle_frontend() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vhost.sock");
        let handle = VhostUserVsockServer::bind(&sock, cfg(dir.path()))
            .unwrap()
            .spawn()
            .unwrap();
        let mut frontend = UnixStream::connect(&sock).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // Only one frontend is served.
        assert!(UnixStream::connect(&sock).is_err());
        let start = Instant::now();
        handle.stop();
        handle.join_timeout(Duration::from_secs(1)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        // The frontend sees the connection closed.
        frontend
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut b = [0u8; 1];
        assert_eq!(frontend.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn dropping_the_handle_stops_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vhost.sock");
        let c = cfg(dir.path());
        let uds = c.uds_path.clone();
        let handle = VhostUserVsockServer::bind(&sock, c)
            .unwrap()
            .spawn()
            .unwrap();
        drop(handle);
        assert!(!sock.exists() && !uds.exists());
    }

    /// The vhost-user glue end to end on vrings built over test memory: a tx kick makes the
    /// backend answer a guest connection, a host socket event relays host data, and the guest
    /// is signalled through the call eventfd.
    #[test]
    fn backend_handle_event_drives_the_device() {
        use super::super::packet::*;
        use std::io::Write;
        use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{Bytes, GuestAddress};

        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let host_listener = UnixListener::bind(format!("{}_5000", c.uds_path.display())).unwrap();
        let mut backend = VsockBackend::new(VsockDevice::new(&c).unwrap());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        backend.update_memory(atomic.clone()).unwrap();

        let rx_mock = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
        let tx_mock = MockSplitQueue::create(&mem, GuestAddress(0x8000), QUEUE_SIZE);
        let mut calls = Vec::new();
        let vrings: Vec<VringRwLock> = (0..NUM_QUEUES)
            .map(|_| VringRwLock::new(atomic.clone(), QUEUE_SIZE).unwrap())
            .collect();
        for (vring, mock) in [(&vrings[RX_QUEUE], &rx_mock), (&vrings[TX_QUEUE], &tx_mock)] {
            vring.set_queue_size(QUEUE_SIZE);
            vring
                .set_queue_info(
                    mock.desc_table_addr().0,
                    mock.avail_addr().0,
                    mock.used_addr().0,
                )
                .unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            // SAFETY: `into_raw_fd` hands over sole ownership of a freshly duplicated eventfd.
            let file = unsafe {
                std::fs::File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(
                    call.try_clone().unwrap(),
                ))
            };
            vring.set_call(Some(file));
            calls.push(call);
        }

        // Guest: REQUEST to host port 5000, plus two rx buffers.
        let hdr = VsockHeader {
            src_cid: 3,
            dst_cid: VSOCK_HOST_CID,
            src_port: 777,
            dst_port: 5000,
            type_: VSOCK_TYPE_STREAM,
            op: VSOCK_OP_REQUEST,
            buf_alloc: 65536,
            ..Default::default()
        };
        mem.write_slice(&hdr.to_bytes(), GuestAddress(0x10_0000))
            .unwrap();
        tx_mock
            .add_desc_chains(
                &[RawDescriptor::from(SplitDescriptor::new(
                    0x10_0000, 44, 0, 0,
                ))],
                0,
            )
            .unwrap();
        let w = VRING_DESC_F_WRITE as u16;
        let wn = (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16;
        rx_mock
            .add_desc_chains(
                &[
                    RawDescriptor::from(SplitDescriptor::new(0x20_0000, 44, wn, 1)),
                    RawDescriptor::from(SplitDescriptor::new(0x21_0000, 4096, w, 0)),
                    RawDescriptor::from(SplitDescriptor::new(0x22_0000, 44, wn, 3)),
                    RawDescriptor::from(SplitDescriptor::new(0x23_0000, 4096, w, 0)),
                ],
                0,
            )
            .unwrap();

        backend
            .handle_event(TX_QUEUE as u16, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(tx_mock.used().idx().load(), 1);
        assert_eq!(rx_mock.used().idx().load(), 1);
        assert!(calls[0].read().unwrap() > 0, "rx queue not signalled");
        assert!(calls[1].read().unwrap() > 0, "tx queue not signalled");
        let read_hdr = |addr: u64| {
            let mut raw = [0u8; HEADER_SIZE];
            mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            VsockHeader::from_bytes(&raw)
        };
        assert_eq!(read_hdr(0x20_0000).op, VSOCK_OP_RESPONSE);

        // Host data arrives: the muxer fd event relays it into the second rx buffer.
        let (mut host, _) = host_listener.accept().unwrap();
        host.write_all(b"hi guest").unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while rx_mock.used().idx().load() < 2 {
            backend
                .handle_event(BACKEND_EVENT, EventSet::IN, &vrings, 0)
                .unwrap();
            assert!(Instant::now() < deadline, "host data not relayed");
            std::thread::sleep(Duration::from_millis(2));
        }
        let h = read_hdr(0x22_0000);
        assert_eq!((h.op, h.len), (VSOCK_OP_RW, 8));
        let mut data = [0u8; 8];
        mem.read_slice(&mut data, GuestAddress(0x23_0000)).unwrap();
        assert_eq!(&data, b"hi guest");

        // Device reset forgets the connection and closes the host stream.
        backend.reset_device();
        let mut b = [0u8; 1];
        host.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        assert_eq!(host.read(&mut b).unwrap(), 0);
    }

    /// Smoke test against a real QEMU (no guest): vhost-user negotiation incl. GET_CONFIG must
    /// succeed and QEMU going away must end the serving thread.
    /// Run with `cargo test -p joey-vmm-core -- --ignored qemu`.
    #[test]
    #[ignore = "needs qemu-system-x86_64"]
    fn qemu_frontend_negotiates_and_disconnects() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vhost.sock");
        let handle = VhostUserVsockServer::bind(&sock, cfg(dir.path()))
            .unwrap()
            .spawn()
            .unwrap();
        let mut qemu = std::process::Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm,memory-backend=mem",
                "-m",
                "256M",
                "-object",
                "memory-backend-memfd,id=mem,size=256M,share=on",
                "-global",
                "virtio-mmio.force-legacy=false",
                "-chardev",
            ])
            .arg(format!("socket,id=v0,path={}", sock.display()))
            .args([
                "-device",
                "vhost-user-vsock-device,chardev=v0",
                "-display",
                "none",
                "-nodefaults",
                "-S",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let exited = qemu.try_wait().unwrap();
        if exited.is_some() {
            let mut err = String::new();
            qemu.stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("qemu exited early: {exited:?}: {err}");
        }
        assert!(!handle.is_finished());
        qemu.kill().unwrap();
        qemu.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while !handle.is_finished() {
            assert!(Instant::now() < deadline, "serving thread still running");
            std::thread::sleep(Duration::from_millis(10));
        }
        handle.join_timeout(Duration::from_secs(1)).unwrap();
    }
}
