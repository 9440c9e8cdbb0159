// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Serving a `vhost-user-backend` device to ONE frontend (QEMU) on a dedicated OS thread.
//!
//! [`VhostUserServer`] binds the vhost-user socket; [`VhostUserServer::spawn`] starts the serving
//! thread, which waits for a frontend (or a stop), runs a `VhostUserDaemon` over the device's
//! [`ServedBackend`] until the frontend disconnects, then tears the vring workers down. The
//! returned [`ServerHandle`] stops and joins the thread (bounded) and removes the socket paths.
//! Devices plug in through [`ServedBackend`]: names, host fds the vring workers must watch, and a
//! hook that prepares the serving thread before it spawns any other thread.
//!
//! Stopping while a frontend is connected: `vhost-user-backend` blocks in `recvmsg()` on the
//! frontend connection and does not expose it. Right after the daemon accepted the connection we
//! therefore locate that socket among our fds (the accepted socket is the only non-listening
//! socket whose local address is our vhost-user path) and keep a duplicate of it;
//! [`ServerHandle::stop`] calls `shutdown(2)` on it, which makes the request loop see
//! "disconnected" and end.

use std::fmt::Display;
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

use crate::thread::{join_with_deadline, wait_finished};
use vhost::vhost_user::{Error as VhostError, Listener};
use vhost_user_backend::{
    Error as DaemonError, VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::vsock::socket_path::BoundPath;

/// How often the serving thread re-checks the stop flag while waiting for a frontend.
const ACCEPT_POLL_INTERVAL_MS: i32 = 250;

/// Guest memory as seen by the vhost-user backends.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

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
    #[error("cannot spawn the vhost-user serving thread: {0}")]
    Spawn(#[source] io::Error),
    /// A device-specific preparation of the serving thread failed.
    #[error("{what}: {source}")]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The vhost-user daemon failed.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// The serving thread's seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// Registering a host event fd with the vring worker failed.
    #[error("cannot register host event fd with the vring worker: {0}")]
    RegisterListener(#[source] io::Error),
    /// Waiting for a frontend failed.
    #[error("waiting for a vhost-user frontend failed: {0}")]
    Poll(#[source] io::Error),
    /// The serving thread did not end in time.
    #[error("vhost-user serving thread did not finish within {0:?}")]
    JoinTimeout(Duration),
    /// The serving thread panicked.
    #[error("vhost-user serving thread panicked")]
    ThreadPanicked,
}

impl From<DaemonError> for VhostUserError {
    fn from(e: DaemonError) -> Self {
        VhostUserError::Daemon(e.to_string())
    }
}

/// What a device backend adds to the generic server.
pub trait ServedBackend: VhostUserBackendMut<Bitmap = (), Vring = VringRwLock> + 'static {
    /// Log prefix ("vsock", "virtio-fs").
    const NAME: &'static str;
    /// Name of the serving thread; the daemon's request thread is named `<THREAD_NAME>-req`.
    const THREAD_NAME: &'static str;
    /// The seccomp class of the serving thread and of every thread it spawns.
    const SECCOMP: crate::seccomp::ThreadClass = crate::seccomp::ThreadClass::VhostUser;

    /// The exit events handed out by the backend's `exit_event` (see [`ExitEvents`]).
    fn exit_events(&self) -> &ExitEvents;

    /// Host fds every vring worker must watch, each with the device event it raises in
    /// `handle_event` (must be above the queue indices).
    fn host_events(&self) -> Vec<(RawFd, u16)> {
        Vec::new()
    }

    /// Runs first on the serving thread, before it spawns any other thread (the daemon's threads
    /// inherit what it sets up).
    fn prepare_serving_thread(&self) -> Result<(), VhostUserError> {
        Ok(())
    }
}

/// Exit eventfds handed to vring workers through `exit_event`: `vhost-user-backend` takes them
/// via `into_raw_fd` and never closes them, so the server closes them once the workers ended.
#[derive(Debug, Default)]
pub struct ExitEvents {
    fds: Mutex<Vec<RawFd>>,
}

impl ExitEvents {
    /// Creates an exit event for a vring worker (an implementation of `exit_event`).
    pub fn create(&self, name: &str) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                lock(&self.fds).push(consumer.as_raw_fd());
                Some((consumer, notifier))
            }
            Err(e) => {
                warn!("{name}: cannot create exit event: {e}");
                None
            }
        }
    }

    /// Closes the exit eventfds leaked into the (now finished) vring workers.
    fn close_all(&self) {
        for fd in lock(&self.fds).drain(..) {
            // SAFETY: `fd` is an eventfd we created in `create`; vhost-user-backend took it via
            // `into_raw_fd` and never closes it. Its worker thread has been joined, so no one
            // uses the fd any more and it is closed exactly once.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// Runs `f` on the queue of `vring` (queue `index`) if it is ready; returns whether the used
/// ring may have changed (a failure counts: chains may have been returned before it).
pub fn process_vring<E: Display>(
    name: &str,
    vring: &VringRwLock,
    index: usize,
    f: impl FnOnce(&mut Queue) -> Result<bool, E>,
) -> bool {
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    if !queue.ready() {
        return false;
    }
    // A panic is caught here, under the vring's lock: unwinding through the lock would poison
    // it, and vhost-user-backend's request thread then panicked on it at the next message (and
    // the process died of it). The request in flight is lost; its sender's deadline ends it.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(queue))) {
        Ok(Ok(used)) => used,
        Ok(Err(e)) => {
            warn!("{name}: queue {index} processing failed: {e}");
            true
        }
        Err(p) => {
            let msg = crate::vmm::event::panic_message(&*p);
            if crate::failpoints::is_injected_panic(&msg) {
                warn!("{name}: queue {index}: {msg}; its request is lost");
            } else {
                tracing::error!("{name}: queue {index}: the device panicked ({msg}); its request is lost");
            }
            true
        }
    }
}

/// Signals the guest that the used ring of `vring` (queue `index`) changed, if `used` and the
/// guest asked for notifications.
pub fn signal_used(name: &str, vring: &VringRwLock, index: usize, used: bool) {
    if used && vring.needs_notification().unwrap_or(true) {
        if let Err(e) = vring.signal_used_queue() {
            warn!("{name}: cannot signal used queue {index}: {e}");
        }
    }
}

/// The part of `VhostUserBackendMut` that every joey backend implements the same way, expanded
/// inside its `impl VhostUserBackendMut for …` block: the associated types, the queue count and
/// size (`NUM_QUEUES`, `MAX_QUEUE_SIZE` in scope at the call site), `set_event_idx`,
/// `update_memory` and `exit_event`. The backend needs the fields `mem:
/// Option<GuestMemory>`, `event_idx: bool` and `exit_events: ExitEvents`; `$name` names it in
/// logs.
macro_rules! backend_plumbing {
    ($name:expr) => {
        type Bitmap = ();
        type Vring = vhost_user_backend::VringRwLock;

        fn num_queues(&self) -> usize {
            NUM_QUEUES
        }

        fn max_queue_size(&self) -> usize {
            MAX_QUEUE_SIZE as usize
        }

        fn set_event_idx(&mut self, enabled: bool) {
            self.event_idx = enabled;
        }

        fn update_memory(&mut self, mem: $crate::devices::vhost_user_server::GuestMemory) -> std::io::Result<()> {
            self.mem = Some(mem);
            Ok(())
        }

        fn exit_event(
            &self,
            _thread_index: usize,
        ) -> Option<(vmm_sys_util::event::EventConsumer, vmm_sys_util::event::EventNotifier)> {
            self.exit_events.create($name)
        }
    };
}
pub(crate) use backend_plumbing;

/// Errors with [`VhostUserError::PathExists`] if something exists at `path`.
pub fn ensure_free(path: &Path) -> Result<(), VhostUserError> {
    if path.symlink_metadata().is_ok() {
        return Err(VhostUserError::PathExists(path.to_path_buf()));
    }
    Ok(())
}

/// State shared between the handle and the serving thread.
struct Shared {
    name: &'static str,
    stop_requested: AtomicBool,
    stop_evt: EventFd,
    /// Duplicate of the accepted frontend socket, used to interrupt the request loop.
    frontend: Mutex<Option<OwnedFd>>,
}

impl Shared {
    fn request_stop(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.stop_evt.write(1) {
            warn!("{}: cannot signal stop event: {e}", self.name);
        }
        if let Some(fd) = lock(&self.frontend).as_ref() {
            shutdown_socket(self.name, fd);
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
                shutdown_socket(self.name, fd);
            }
        }
    }
}

/// A bound, not yet serving vhost-user server of backend `B`. Dropping it removes the socket
/// path(s).
pub struct VhostUserServer<B> {
    listener: UnixListener,
    socket_path: BoundPath,
    extra_paths: Vec<BoundPath>,
    backend: B,
}

impl<B> std::fmt::Debug for VhostUserServer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserServer")
            .field("socket_path", &self.socket_path.path())
            .finish_non_exhaustive()
    }
}

impl<B: ServedBackend> VhostUserServer<B> {
    /// Binds the vhost-user listener at `socket_path` (removed again on stop/drop, or if
    /// `make_backend` fails), then builds the backend. Errors if the path exists.
    pub fn bind<E: From<VhostUserError>>(
        socket_path: &Path,
        make_backend: impl FnOnce() -> Result<B, E>,
    ) -> Result<Self, E> {
        ensure_free(socket_path)?;
        let listener = UnixListener::bind(socket_path).map_err(|source| VhostUserError::Bind {
            path: socket_path.to_path_buf(),
            source,
        })?;
        let socket_path = BoundPath::new(socket_path);
        // On error `socket_path` is dropped and removes the socket again.
        let backend = make_backend()?;
        Ok(VhostUserServer {
            listener,
            socket_path,
            extra_paths: Vec::new(),
            backend,
        })
    }

    /// Also removes the socket now bound at `path` on stop/drop (a device's extra socket).
    pub fn also_remove(&mut self, path: &Path) {
        self.extra_paths.push(BoundPath::new(path));
    }

    /// The vhost-user socket path.
    pub fn socket_path(&self) -> &Path {
        self.socket_path.path()
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Spawns a dedicated OS thread (named `B::THREAD_NAME`) that accepts ONE vhost-user
    /// frontend and serves it until the frontend disconnects or the handle is stopped.
    pub fn spawn(self) -> Result<ServerHandle, VhostUserError> {
        let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(VhostUserError::StopEvent)?;
        let shared = Arc::new(Shared {
            name: B::NAME,
            stop_requested: AtomicBool::new(false),
            stop_evt,
            frontend: Mutex::new(None),
        });
        let socket_path = self.socket_path.clone();
        let extra_paths = self.extra_paths.clone();
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(B::THREAD_NAME.to_string())
            .spawn(move || {
                let result = self.serve(&thread_shared);
                if let Err(e) = &result {
                    warn!("{}: serving thread ended with error: {e}", B::NAME);
                }
                let _ = done_tx.send(result);
            })
            .map_err(VhostUserError::Spawn)?;
        Ok(ServerHandle {
            thread: Some(thread),
            shared,
            done: done_rx,
            socket_path,
            extra_paths,
        })
    }

    /// Body of the serving thread.
    fn serve(self, shared: &Shared) -> Result<(), VhostUserError> {
        let VhostUserServer {
            listener,
            socket_path,
            extra_paths,
            backend,
        } = self;
        // Before any thread is spawned from here: they all inherit what it sets up.
        backend.prepare_serving_thread()?;
        crate::seccomp::apply(B::SECCOMP)?;
        let host_events = backend.host_events();
        let backend = Arc::new(RwLock::new(backend));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new(format!("{}-req", B::THREAD_NAME), backend.clone(), mem)?;

        let result = serve_frontend(
            &mut daemon,
            listener,
            socket_path.path(),
            &host_events,
            shared,
        );

        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        // Dropping the daemon joins the vring workers (they exit on the event above).
        drop(daemon);
        match backend.read() {
            Ok(b) => b.exit_events().close_all(),
            Err(p) => p.into_inner().exit_events().close_all(),
        }
        // Drops the device (e.g. the vsock muxer closes host streams and its socket).
        drop(backend);
        drop(extra_paths);
        drop(socket_path);
        info!("{}: serving thread finished", B::NAME);
        result
    }
}

fn serve_frontend<B: ServedBackend>(
    daemon: &mut VhostUserDaemon<Arc<RwLock<B>>>,
    listener: UnixListener,
    socket_path: &Path,
    host_events: &[(RawFd, u16)],
    shared: &Shared,
) -> Result<(), VhostUserError> {
    for handler in daemon.get_epoll_handlers() {
        for &(fd, event) in host_events {
            handler
                .register_listener(fd, EventSet::IN, u64::from(event))
                .map_err(VhostUserError::RegisterListener)?;
        }
    }
    if !wait_for_frontend(&listener, shared)? {
        debug!("{}: stopped before a frontend connected", B::NAME);
        return Ok(());
    }
    let mut listener = Listener::from(listener);
    // The listener is readable, so this accept() does not block.
    daemon.start(&mut listener)?;
    // Exactly one frontend: later connection attempts are refused.
    drop(listener);
    info!("{}: vhost-user frontend connected", B::NAME);
    let frontend = find_accepted_socket(socket_path);
    if frontend.is_none() {
        warn!(
            "{}: cannot find the frontend socket; stop() must wait for the frontend",
            B::NAME
        );
    }
    shared.set_frontend(frontend);
    let result = daemon.wait();
    shared.set_frontend(None);
    match result {
        Ok(()) => Ok(()),
        Err(DaemonError::HandleRequest(VhostError::Disconnected))
        | Err(DaemonError::HandleRequest(VhostError::PartialMessage)) => {
            info!("{}: vhost-user frontend disconnected", B::NAME);
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Controls a running vhost-user server. Dropping it stops the thread (without waiting) and
/// removes the socket path(s).
pub struct ServerHandle {
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    done: mpsc::Receiver<Result<(), VhostUserError>>,
    socket_path: BoundPath,
    extra_paths: Vec<BoundPath>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("socket_path", &self.socket_path.path())
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// Asks the serving thread to stop (also when no frontend ever connected: it must not hang
    /// in accept).
    pub fn stop(&self) {
        self.shared.request_stop();
    }

    /// Waits at most `timeout` for the serving thread to end; removes the socket path(s). Err on
    /// timeout (the thread is then asked to stop, since nobody could stop it later).
    pub fn join_timeout(mut self, timeout: Duration) -> Result<(), VhostUserError> {
        let deadline = Instant::now() + timeout;
        let result = match self.done.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                self.shared.request_stop();
                Err(VhostUserError::JoinTimeout(timeout))
            }
            Err(RecvTimeoutError::Disconnected) => Err(VhostUserError::ThreadPanicked),
        };
        if let Some(thread) = self.thread.take() {
            // The thread sends its result as its very last action: what is left is its exit.
            if let Err(e) =
                join_with_deadline(thread, deadline.saturating_duration_since(Instant::now()))
            {
                warn!("{}: serving thread: {e}", self.socket_path.path().display());
            }
        }
        self.remove_paths();
        result
    }

    /// True once the serving thread has ended (frontend gone or stopped).
    pub fn is_finished(&self) -> bool {
        self.thread
            .as_ref()
            .map(|t| t.is_finished())
            .unwrap_or(true)
    }

    /// Waits up to `timeout` for the serving thread to end (without joining it); true when it
    /// has.
    pub fn wait_finished(&self, timeout: Duration) -> bool {
        match &self.thread {
            Some(t) => wait_finished(t, timeout),
            None => true,
        }
    }

    /// The vhost-user socket path.
    pub fn socket_path(&self) -> &Path {
        self.socket_path.path()
    }

    /// The extra socket paths registered with [`VhostUserServer::also_remove`].
    pub fn extra_paths(&self) -> impl Iterator<Item = &Path> {
        self.extra_paths.iter().map(BoundPath::path)
    }

    fn remove_paths(&self) {
        self.socket_path.remove();
        for p in &self.extra_paths {
            p.remove();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if !self.is_finished() {
            self.shared.request_stop();
        }
        self.remove_paths();
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

fn shutdown_socket(name: &str, fd: &OwnedFd) {
    // SAFETY: shutdown(2) on a descriptor we own; it has no memory effects.
    let r = unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
    if r != 0 {
        debug!(
            "{name}: shutdown of frontend socket: {}",
            io::Error::last_os_error()
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::AtomicUsize;
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use virtio_queue::mock::MockSplitQueue;

    /// Builds `num_queues` vrings over `mem`; the queues in `mocks` (index, mock queue) are set
    /// up on the mock's rings, made ready and enabled, and get a call eventfd each (returned in
    /// the order of `mocks`). The other queues stay unready.
    pub(crate) fn mock_vrings(
        mem: &GuestMemory,
        num_queues: usize,
        mocks: &[(usize, &MockSplitQueue<'_, GuestMemoryMmap<()>>)],
        queue_size: u16,
    ) -> (Vec<VringRwLock>, Vec<EventFd>) {
        let vrings: Vec<VringRwLock> = (0..num_queues)
            .map(|_| VringRwLock::new(mem.clone(), queue_size).unwrap())
            .collect();
        let mut calls = Vec::new();
        for (index, mock) in mocks {
            let vring = &vrings[*index];
            vring.set_queue_size(queue_size);
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
        (vrings, calls)
    }

    /// Waits (at most 2 s) until the serving thread of `handle` has ended.
    pub(crate) fn wait_finished(handle: &ServerHandle, what: &str) {
        assert!(handle.wait_finished(Duration::from_secs(2)), "{what}");
    }

    /// Serving-thread preparations seen by [`TestBackend`] (counted by the hook).
    static PREPARED: AtomicUsize = AtomicUsize::new(0);

    /// A one-queue backend that does nothing, with one host event fd; its thread preparation
    /// fails if asked to.
    struct TestBackend {
        exit_events: ExitEvents,
        host_evt: EventFd,
        fail_prepare: bool,
    }

    impl TestBackend {
        fn new() -> Self {
            TestBackend {
                exit_events: ExitEvents::default(),
                host_evt: EventFd::new(EFD_NONBLOCK).unwrap(),
                fail_prepare: false,
            }
        }
    }

    impl VhostUserBackendMut for TestBackend {
        type Bitmap = ();
        type Vring = VringRwLock;

        fn num_queues(&self) -> usize {
            1
        }

        fn max_queue_size(&self) -> usize {
            256
        }

        fn features(&self) -> u64 {
            0
        }

        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            VhostUserProtocolFeatures::MQ
        }

        fn set_event_idx(&mut self, _enabled: bool) {}

        fn update_memory(&mut self, _mem: GuestMemory) -> io::Result<()> {
            Ok(())
        }

        fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
            self.exit_events.create(Self::NAME)
        }

        fn handle_event(
            &mut self,
            _device_event: u16,
            _evset: EventSet,
            _vrings: &[VringRwLock],
            _thread_id: usize,
        ) -> io::Result<()> {
            Ok(())
        }
    }

    impl ServedBackend for TestBackend {
        const NAME: &'static str = "test";
        const THREAD_NAME: &'static str = "joey-test";

        fn exit_events(&self) -> &ExitEvents {
            &self.exit_events
        }

        fn host_events(&self) -> Vec<(RawFd, u16)> {
            vec![(self.host_evt.as_raw_fd(), 2)]
        }

        fn prepare_serving_thread(&self) -> Result<(), VhostUserError> {
            assert_eq!(std::thread::current().name(), Some(Self::THREAD_NAME));
            if self.fail_prepare {
                return Err(VhostUserError::Setup {
                    what: "cannot prepare",
                    source: io::Error::from_raw_os_error(libc::EPERM),
                });
            }
            PREPARED.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A spawned test server on `<dir>/vhost.sock` with an extra socket `<dir>/extra.sock`.
    fn spawn_server(dir: &Path) -> (PathBuf, PathBuf, ServerHandle) {
        let sock = dir.join("vhost.sock");
        let extra = dir.join("extra.sock");
        let mut server =
            VhostUserServer::bind(&sock, || Ok::<_, VhostUserError>(TestBackend::new())).unwrap();
        let _extra_listener = UnixListener::bind(&extra).unwrap();
        server.also_remove(&extra);
        assert_eq!(server.socket_path(), sock);
        let handle = server.spawn().unwrap();
        assert_eq!(handle.socket_path(), sock);
        assert_eq!(handle.extra_paths().collect::<Vec<_>>(), [extra.as_path()]);
        (sock, extra, handle)
    }

    #[test]
    fn bind_spawn_stop_join_without_frontend() {
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let before = PREPARED.load(Ordering::SeqCst);
        let (sock, extra, handle) = spawn_server(dir.path());
        assert!(sock.exists() && extra.exists());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!handle.is_finished());
        handle.stop();
        handle.join_timeout(Duration::from_secs(1)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(PREPARED.load(Ordering::SeqCst) > before, "hook did not run");
        assert!(!sock.exists(), "vhost-user socket not removed");
        assert!(!extra.exists(), "extra socket not removed");
    }

    #[test]
    fn bind_refuses_existing_path_and_cleans_up_on_backend_error() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vhost.sock");
        std::fs::write(&sock, b"").unwrap();
        let err = VhostUserServer::bind(&sock, || Ok::<_, VhostUserError>(TestBackend::new()))
            .unwrap_err();
        assert!(matches!(err, VhostUserError::PathExists(_)));
        assert!(sock.exists(), "someone else's file must stay");
        std::fs::remove_file(&sock).unwrap();

        let err = VhostUserServer::<TestBackend>::bind(&sock, || {
            Err(VhostUserError::StopEvent(io::Error::other("no backend")))
        })
        .unwrap_err();
        assert!(matches!(err, VhostUserError::StopEvent(_)));
        assert!(!sock.exists(), "socket left behind");

        // Dropping an unspawned server removes the socket.
        let server =
            VhostUserServer::bind(&sock, || Ok::<_, VhostUserError>(TestBackend::new())).unwrap();
        assert!(sock.exists());
        drop(server);
        assert!(!sock.exists());
    }

    #[test]
    fn failing_thread_preparation_is_reported_by_join() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vhost.sock");
        let backend = TestBackend {
            fail_prepare: true,
            ..TestBackend::new()
        };
        let handle = VhostUserServer::bind(&sock, || Ok::<_, VhostUserError>(backend))
            .unwrap()
            .spawn()
            .unwrap();
        let err = handle.join_timeout(Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, VhostUserError::Setup { .. }), "{err}");
        assert!(err.to_string().starts_with("cannot prepare: "));
        assert!(!sock.exists());
    }

    #[test]
    fn frontend_disconnect_ends_serving_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, extra, handle) = spawn_server(dir.path());
        let frontend = UnixStream::connect(&sock).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!handle.is_finished());
        drop(frontend);
        wait_finished(&handle, "thread did not notice the disconnect");
        handle.join_timeout(Duration::from_secs(1)).unwrap();
        assert!(!sock.exists() && !extra.exists());
    }

    #[test]
    fn stop_interrupts_a_connected_idle_frontend() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, _extra, handle) = spawn_server(dir.path());
        let mut frontend = UnixStream::connect(&sock).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(UnixStream::connect(&sock).is_err(), "only one frontend");
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
        assert!(!sock.exists());
    }

    #[test]
    fn dropping_the_handle_stops_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, extra, handle) = spawn_server(dir.path());
        let shared = handle.shared.clone();
        drop(handle);
        assert!(!sock.exists() && !extra.exists());
        assert!(shared.stop_requested());
    }

    #[test]
    fn join_timeout_asks_a_stuck_thread_to_stop() {
        let dir = tempfile::tempdir().unwrap();
        let (_sock, _extra, handle) = spawn_server(dir.path());
        let shared = handle.shared.clone();
        let err = handle.join_timeout(Duration::from_millis(10)).unwrap_err();
        assert!(matches!(err, VhostUserError::JoinTimeout(_)));
        assert!(shared.stop_requested());
    }

    #[test]
    fn accepted_socket_is_found_and_listener_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        assert!(!is_accepted_socket_of(listener.as_raw_fd(), &sock));
        assert!(find_accepted_socket(&sock).is_none());
        let _client = UnixStream::connect(&sock).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(is_accepted_socket_of(accepted.as_raw_fd(), &sock));
        assert!(!is_accepted_socket_of(
            accepted.as_raw_fd(),
            &dir.path().join("x")
        ));
        let dup = find_accepted_socket(&sock).expect("accepted socket not found");
        assert!(is_accepted_socket_of(dup.as_raw_fd(), &sock));
    }
}
