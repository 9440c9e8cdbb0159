// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! vhost-user transport for the virtio-fs device (QEMU's `vhost-user-fs-device`).
//!
//! [`FsBackend`] implements `VhostUserBackendMut` on top of [`super::device`];
//! [`VhostUserFsServer`] binds the socket and [`VhostUserFsHandle`] controls the dedicated
//! serving thread. The design (one frontend, stop via `shutdown(2)` on a duplicate of the
//! accepted frontend socket, bounded joins) is the one of the vsock device, see
//! `crate::devices::vsock::vhost_user`.
//!
//! The passthrough filesystem sets `umask(0)` when the guest mounts (FUSE_INIT) so the guest's
//! modes reach the host unchanged. The serving thread therefore first gives itself a private
//! filesystem context (`unshare(CLONE_FS)`); the vhost-user threads it spawns share that
//! context, so the umask of the rest of the runtime process is never touched.

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
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{process_queue, MAX_QUEUE_SIZE, NUM_QUEUES};
use super::filesystem::{new_server, FsServer};
use super::{FsConfig, FsError};
use crate::devices::vsock::socket_path::BoundPath;

/// Name of the serving thread.
pub const SERVER_THREAD_NAME: &str = "joey-fs";

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
    #[error("cannot spawn the virtio-fs serving thread: {0}")]
    Spawn(#[source] io::Error),
    /// Giving the serving thread its own filesystem context (umask) failed.
    #[error("cannot unshare the filesystem context of the serving thread: {0}")]
    IsolateFsContext(#[source] io::Error),
    /// The vhost-user daemon failed.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// Waiting for a frontend failed.
    #[error("waiting for a vhost-user frontend failed: {0}")]
    Poll(#[source] io::Error),
    /// The serving thread did not end in time.
    #[error("virtio-fs serving thread did not finish within {0:?}")]
    JoinTimeout(Duration),
    /// The serving thread panicked.
    #[error("virtio-fs serving thread panicked")]
    ThreadPanicked,
}

impl From<DaemonError> for VhostUserError {
    fn from(e: DaemonError) -> Self {
        VhostUserError::Daemon(e.to_string())
    }
}

type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The vhost-user backend: the FUSE server plus vhost-user bookkeeping.
pub struct FsBackend {
    server: Arc<FsServer>,
    mem: Option<GuestMemory>,
    event_idx: bool,
    /// Exit eventfds handed to vring workers; `vhost-user-backend` never closes them.
    exit_fds: Mutex<Vec<RawFd>>,
}

impl FsBackend {
    /// Wraps a FUSE server.
    pub fn new(server: Arc<FsServer>) -> Self {
        FsBackend {
            server,
            mem: None,
            event_idx: false,
            exit_fds: Mutex::new(Vec::new()),
        }
    }

    /// Processes the requests of queue `index` and signals the guest if any were used.
    fn process(&self, vrings: &[VringRwLock], index: usize) {
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return;
        };
        let Some(vring) = vrings.get(index) else {
            return;
        };
        let used = {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            if !queue.ready() {
                return;
            }
            match process_queue(&self.server, &*mem, queue) {
                Ok(outcome) => outcome.used_any(),
                Err(e) => {
                    warn!("virtio-fs: queue {index} processing failed: {e}");
                    // Chains may have been returned before the failure.
                    true
                }
            }
        };
        if used && vring.needs_notification().unwrap_or(true) {
            if let Err(e) = vring.signal_used_queue() {
                warn!("virtio-fs: cannot signal used queue {index}: {e}");
            }
        }
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

impl VhostUserBackendMut for FsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No CONFIG: QEMU's vhost-user-fs-device serves the tag from its own config space.
        VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, enabled: bool) {
        // EVENT_IDX is not offered; kept for completeness.
        self.event_idx = enabled;
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
                warn!("virtio-fs: cannot create exit event: {e}");
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
        match device_event as usize {
            q if q < NUM_QUEUES => self.process(vrings, q),
            e => debug!("virtio-fs: unexpected device event {e}"),
        }
        Ok(())
    }
}

/// Gives the calling thread its own filesystem context (cwd, root, umask), inherited by the
/// threads it spawns afterwards, so that the passthrough filesystem's `umask(0)` stays local.
pub fn isolate_fs_context() -> Result<(), VhostUserError> {
    // SAFETY: unshare(2) with CLONE_FS only copies the calling thread's fs_struct; no memory is
    // touched and the result is checked.
    let r = unsafe { libc::unshare(libc::CLONE_FS) };
    if r != 0 {
        return Err(VhostUserError::IsolateFsContext(io::Error::last_os_error()));
    }
    Ok(())
}

/// State shared between the handle and the serving thread.
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
            warn!("virtio-fs: cannot signal stop event: {e}");
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

/// A bound, not yet serving vhost-user virtio-fs server.
pub struct VhostUserFsServer {
    listener: UnixListener,
    socket_path: BoundPath,
    cfg: FsConfig,
    server: Arc<FsServer>,
}

impl std::fmt::Debug for VhostUserFsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFsServer")
            .field("socket_path", &self.socket_path.path())
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl VhostUserFsServer {
    /// Checks the shared directory and binds the vhost-user listener at `socket_path` (removed
    /// again on stop/drop). Errors if the path exists or the directory is unusable.
    pub fn bind(socket_path: &Path, cfg: FsConfig) -> Result<Self, FsError> {
        if socket_path.symlink_metadata().is_ok() {
            return Err(VhostUserError::PathExists(socket_path.to_path_buf()).into());
        }
        let server = Arc::new(new_server(&cfg)?);
        let listener = UnixListener::bind(socket_path).map_err(|source| VhostUserError::Bind {
            path: socket_path.to_path_buf(),
            source,
        })?;
        let bound = BoundPath::new(socket_path);
        info!(
            "virtio-fs: vhost-user socket {} bound, sharing {} ({}, cache {:?})",
            socket_path.display(),
            cfg.shared_dir.display(),
            if cfg.read_only { "ro" } else { "rw" },
            cfg.cache
        );
        Ok(VhostUserFsServer {
            listener,
            socket_path: bound,
            cfg,
            server,
        })
    }

    /// The vhost-user socket path.
    pub fn socket_path(&self) -> &Path {
        self.socket_path.path()
    }

    /// The configuration.
    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    /// Spawns a dedicated OS thread (named "joey-fs") that accepts ONE vhost-user frontend
    /// (QEMU) and serves it until the frontend disconnects or the handle is stopped.
    pub fn spawn(self) -> Result<VhostUserFsHandle, FsError> {
        let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(VhostUserError::StopEvent)?;
        let shared = Arc::new(Shared {
            stop_requested: AtomicBool::new(false),
            stop_evt,
            frontend: Mutex::new(None),
        });
        let socket_path = self.socket_path.clone();
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(SERVER_THREAD_NAME.to_string())
            .spawn(move || {
                let result = serve(self, &thread_shared);
                if let Err(e) = &result {
                    warn!("virtio-fs: serving thread ended with error: {e}");
                }
                let _ = done_tx.send(result);
            })
            .map_err(VhostUserError::Spawn)?;
        Ok(VhostUserFsHandle {
            thread: Some(thread),
            shared,
            done: done_rx,
            socket_path,
        })
    }
}

/// Controls a running vhost-user virtio-fs server. Dropping it stops the thread (without
/// waiting) and removes the socket path.
pub struct VhostUserFsHandle {
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    done: mpsc::Receiver<Result<(), VhostUserError>>,
    socket_path: BoundPath,
}

impl std::fmt::Debug for VhostUserFsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFsHandle")
            .field("socket_path", &self.socket_path.path())
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl VhostUserFsHandle {
    /// Asks the serving thread to stop (also when no frontend ever connected).
    pub fn stop(&self) {
        self.shared.request_stop();
    }

    /// Waits at most `timeout` for the serving thread to end; removes the socket path. Err on
    /// timeout (the thread is then asked to stop, since nobody could stop it later).
    pub fn join_timeout(mut self, timeout: Duration) -> Result<(), FsError> {
        let deadline = Instant::now() + timeout;
        let result = match self.done.recv_timeout(timeout) {
            Ok(r) => r.map_err(FsError::from),
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
        self.socket_path.remove();
        result
    }

    /// True once the serving thread has ended (frontend gone or stopped).
    pub fn is_finished(&self) -> bool {
        self.thread
            .as_ref()
            .map(|t| t.is_finished())
            .unwrap_or(true)
    }

    /// The vhost-user socket path.
    pub fn socket_path(&self) -> &Path {
        self.socket_path.path()
    }
}

impl Drop for VhostUserFsHandle {
    fn drop(&mut self) {
        if !self.is_finished() {
            self.shared.request_stop();
        }
        self.socket_path.remove();
    }
}

/// Body of the serving thread.
fn serve(server: VhostUserFsServer, shared: &Shared) -> Result<(), VhostUserError> {
    let VhostUserFsServer {
        listener,
        socket_path,
        cfg: _,
        server,
    } = server;
    // Before any thread is spawned from here: they all inherit the private context.
    isolate_fs_context()?;
    let backend = Arc::new(RwLock::new(FsBackend::new(server)));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon =
        VhostUserDaemon::new(format!("{SERVER_THREAD_NAME}-req"), backend.clone(), mem)?;

    let result = serve_frontend(&mut daemon, listener, socket_path.path(), shared);

    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // Dropping the daemon joins the vring worker (it exits on the event above).
    drop(daemon);
    match backend.read() {
        Ok(b) => b.close_exit_fds(),
        Err(p) => p.into_inner().close_exit_fds(),
    }
    drop(backend);
    drop(socket_path);
    info!("virtio-fs: serving thread finished");
    result
}

fn serve_frontend(
    daemon: &mut VhostUserDaemon<Arc<RwLock<FsBackend>>>,
    listener: UnixListener,
    socket_path: &Path,
    shared: &Shared,
) -> Result<(), VhostUserError> {
    if !wait_for_frontend(&listener, shared)? {
        debug!("virtio-fs: stopped before a frontend connected");
        return Ok(());
    }
    let mut listener = Listener::from(listener);
    // The listener is readable, so this accept() does not block.
    daemon.start(&mut listener)?;
    // Exactly one frontend: later connection attempts are refused.
    drop(listener);
    info!("virtio-fs: vhost-user frontend connected");
    let frontend = find_accepted_socket(socket_path);
    if frontend.is_none() {
        warn!("virtio-fs: cannot find the frontend socket; stop() must wait for the frontend");
    }
    shared.set_frontend(frontend);
    let result = daemon.wait();
    shared.set_frontend(None);
    match result {
        Ok(()) => Ok(()),
        Err(DaemonError::HandleRequest(VhostError::Disconnected))
        | Err(DaemonError::HandleRequest(VhostError::PartialMessage)) => {
            info!("virtio-fs: vhost-user frontend disconnected");
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
            "virtio-fs: shutdown of frontend socket: {}",
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
    use crate::devices::fs::device::tests::{mem, write_init_request, QSIZE};
    use crate::devices::fs::device::{HIPRIO_QUEUE, REQUEST_QUEUE};
    use crate::devices::fs::filesystem::SharedDirError;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn cfg(dir: &Path) -> FsConfig {
        FsConfig::new(dir)
    }

    #[test]
    fn backend_features_and_queues() {
        let dir = tempfile::tempdir().unwrap();
        let b = FsBackend::new(Arc::new(new_server(&cfg(dir.path())).unwrap()));
        assert_eq!(b.num_queues(), 2);
        assert_eq!((HIPRIO_QUEUE, REQUEST_QUEUE), (0, 1));
        assert_eq!(b.max_queue_size(), 1024);
        let f = b.features();
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert_ne!(f & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
        let pf = b.protocol_features();
        assert!(pf.contains(VhostUserProtocolFeatures::MQ));
        assert!(!pf.contains(VhostUserProtocolFeatures::CONFIG));
        assert_eq!(b.queues_per_thread(), vec![0xffff_ffff]);
        assert_eq!(super::super::device::VIRTIO_ID_FS, 26);
    }

    #[test]
    fn isolated_umask_does_not_leak_to_the_process() {
        // SAFETY: umask(2) only reads/swaps the file mode mask; restored at once.
        let before = unsafe { libc::umask(0o022) };
        // SAFETY: as above.
        unsafe { libc::umask(before) };
        std::thread::spawn(|| {
            isolate_fs_context().unwrap();
            // SAFETY: as above; this thread has its own fs context now.
            unsafe { libc::umask(0) };
            // Threads spawned from here share the private context.
            // SAFETY: as above.
            let inner = std::thread::spawn(|| unsafe { libc::umask(0) })
                .join()
                .unwrap();
            assert_eq!(inner, 0);
        })
        .join()
        .unwrap();
        // SAFETY: as above.
        let after = unsafe { libc::umask(before) };
        assert_eq!(after, before);
    }

    #[test]
    fn bind_spawn_stop_join_without_frontend() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fs.sock");
        let start = Instant::now();
        let server = VhostUserFsServer::bind(&sock, cfg(dir.path())).unwrap();
        assert!(sock.exists());
        let handle = server.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!handle.is_finished());
        handle.stop();
        handle.join_timeout(Duration::from_secs(1)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(!sock.exists(), "vhost-user socket not removed");
    }

    #[test]
    fn bind_fails_on_existing_path_or_bad_dir() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fs.sock");
        std::fs::write(&sock, b"").unwrap();
        let err = VhostUserFsServer::bind(&sock, cfg(dir.path())).unwrap_err();
        assert!(matches!(
            err,
            FsError::VhostUser(VhostUserError::PathExists(_))
        ));
        assert!(sock.exists(), "someone else's file must stay");
        std::fs::remove_file(&sock).unwrap();

        let err = VhostUserFsServer::bind(&sock, cfg(&dir.path().join("nope"))).unwrap_err();
        assert!(matches!(
            err,
            FsError::SharedDir(SharedDirError::Inaccessible { .. })
        ));
        assert!(!sock.exists(), "socket left behind");

        // Dropping an unspawned server removes the socket.
        let server = VhostUserFsServer::bind(&sock, cfg(dir.path())).unwrap();
        drop(server);
        assert!(!sock.exists());
    }

    #[test]
    fn frontend_disconnect_ends_serving_thread() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fs.sock");
        let handle = VhostUserFsServer::bind(&sock, cfg(dir.path()))
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
        let sock = dir.path().join("fs.sock");
        let handle = VhostUserFsServer::bind(&sock, cfg(dir.path()))
            .unwrap()
            .spawn()
            .unwrap();
        let mut frontend = UnixStream::connect(&sock).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(UnixStream::connect(&sock).is_err(), "only one frontend");
        let start = Instant::now();
        handle.stop();
        handle.join_timeout(Duration::from_secs(1)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        frontend
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut b = [0u8; 1];
        assert_eq!(frontend.read(&mut b).unwrap(), 0);
        assert!(!sock.exists());
    }

    #[test]
    fn dropping_the_handle_stops_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fs.sock");
        let handle = VhostUserFsServer::bind(&sock, cfg(dir.path()))
            .unwrap()
            .spawn()
            .unwrap();
        drop(handle);
        assert!(!sock.exists());
    }

    /// The vhost-user glue on vrings over test memory: a request-queue kick answers FUSE_INIT
    /// and signals the call eventfd; a malformed hiprio chain is returned with length 0.
    #[test]
    fn backend_handle_event_processes_queues() {
        use fuse_backend_rs::abi::fuse_abi::OutHeader;
        use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{Bytes, GuestAddress};

        let dir = tempfile::tempdir().unwrap();
        let m = mem();
        let atomic = GuestMemoryAtomic::new(m.clone());
        let mut backend = FsBackend::new(Arc::new(new_server(&cfg(dir.path())).unwrap()));
        backend.update_memory(atomic.clone()).unwrap();

        let hiprio = MockSplitQueue::create(&m, GuestAddress(0x8_0000), QSIZE);
        let request = MockSplitQueue::create(&m, GuestAddress(0x9_0000), QSIZE);
        let vrings: Vec<VringRwLock> = (0..NUM_QUEUES)
            .map(|_| VringRwLock::new(atomic.clone(), QSIZE).unwrap())
            .collect();
        let mut calls = Vec::new();
        for (vring, mock) in vrings.iter().zip([&hiprio, &request]) {
            vring.set_queue_size(QSIZE);
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

        let len = write_init_request(&m);
        request
            .add_desc_chains(
                &[
                    RawDescriptor::from(SplitDescriptor::new(
                        0x1_0000,
                        len,
                        VRING_DESC_F_NEXT as u16,
                        1,
                    )),
                    RawDescriptor::from(SplitDescriptor::new(
                        0x2_0000,
                        256,
                        VRING_DESC_F_WRITE as u16,
                        0,
                    )),
                ],
                0,
            )
            .unwrap();
        hiprio
            .add_desc_chains(
                &[RawDescriptor::from(SplitDescriptor::new(
                    0xdead_0000,
                    40,
                    0,
                    0,
                ))],
                0,
            )
            .unwrap();

        // FUSE_INIT imports the root (umask(0)): run it on an isolated thread like the daemon.
        std::thread::scope(|s| {
            s.spawn(|| {
                isolate_fs_context().unwrap();
                backend
                    .handle_event(REQUEST_QUEUE as u16, EventSet::IN, &vrings, 0)
                    .unwrap();
                backend
                    .handle_event(HIPRIO_QUEUE as u16, EventSet::IN, &vrings, 0)
                    .unwrap();
                // Unknown events are ignored.
                backend.handle_event(7, EventSet::IN, &vrings, 0).unwrap();
            })
            .join()
            .unwrap()
        });
        assert_eq!(request.used().idx().load(), 1);
        let out: OutHeader = m.read_obj(GuestAddress(0x2_0000)).unwrap();
        assert_eq!((out.unique, out.error), (7, 0));
        assert_eq!(
            request.used().ring().ref_at(0).unwrap().load().len(),
            out.len
        );
        assert_eq!(hiprio.used().idx().load(), 1);
        assert_eq!(hiprio.used().ring().ref_at(0).unwrap().load().len(), 0);
        assert!(calls[0].read().unwrap() > 0, "hiprio queue not signalled");
        assert!(calls[1].read().unwrap() > 0, "request queue not signalled");
    }
}
