// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! vhost-user transport for the virtio-fs device (QEMU's `vhost-user-fs-device`).
//!
//! [`FsBackend`] implements `VhostUserBackendMut` on top of [`super::device`];
//! [`VhostUserFsServer`] binds the socket and [`VhostUserFsHandle`] controls the dedicated
//! serving thread. Both are thin wrappers of [`crate::devices::vhost_user_server`], which owns
//! the serving-thread lifecycle (one frontend, stop via `shutdown(2)` on the accepted frontend
//! socket, bounded joins) shared with the vsock device.
//!
//! The passthrough filesystem sets `umask(0)` when the guest mounts (FUSE_INIT) so the guest's
//! modes reach the host unchanged. The serving thread therefore first gives itself a private
//! filesystem context (`unshare(CLONE_FS)`, the backend's
//! [`ServedBackend::prepare_serving_thread`] hook); the vhost-user threads it spawns share that
//! context, so the umask of the rest of the runtime process is never touched.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

use super::device::{process_queue, MAX_QUEUE_SIZE, NUM_QUEUES};
use super::filesystem::{new_server, FsServer};
use super::metrics::FsMetrics;
use super::{FsConfig, FsError};
pub use crate::devices::vhost_user_server::VhostUserError;
use crate::devices::vhost_user_server::{
    backend_plumbing, ensure_free, process_vring, signal_used, ExitEvents, GuestMemory, ServedBackend,
    ServerHandle,
    VhostUserServer,
};

/// Name of the serving thread.
pub const SERVER_THREAD_NAME: &str = "joey-fs";

/// Log prefix.
const NAME: &str = "virtio-fs";

/// The vhost-user backend: the FUSE server plus vhost-user bookkeeping.
pub struct FsBackend {
    server: Arc<FsServer>,
    metrics: Arc<FsMetrics>,
    mem: Option<GuestMemory>,
    event_idx: bool,
    exit_events: ExitEvents,
}

impl FsBackend {
    /// Wraps a FUSE server.
    pub fn new(server: Arc<FsServer>) -> Self {
        FsBackend {
            server,
            metrics: Arc::new(FsMetrics::default()),
            mem: None,
            event_idx: false,
            exit_events: ExitEvents::default(),
        }
    }

    /// The device's counters (shared with whoever reads them).
    pub fn metrics(&self) -> &Arc<FsMetrics> {
        &self.metrics
    }

    /// Processes the requests of queue `index` and signals the guest if any were used.
    fn process(&self, vrings: &[VringRwLock], index: usize) {
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return;
        };
        let Some(vring) = vrings.get(index) else {
            return;
        };
        let used = process_vring(NAME, vring, index, |q| {
            process_queue(&self.server, &*mem, q, &self.metrics).map(|outcome| outcome.used_any())
        });
        signal_used(NAME, vring, index, used);
    }
}

impl VhostUserBackendMut for FsBackend {
    backend_plumbing!(NAME);



    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No CONFIG: QEMU's vhost-user-fs-device serves the tag from its own config space.
        VhostUserProtocolFeatures::MQ
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

impl ServedBackend for FsBackend {
    const NAME: &'static str = NAME;
    const THREAD_NAME: &'static str = SERVER_THREAD_NAME;
    const SECCOMP: crate::seccomp::ThreadClass = crate::seccomp::ThreadClass::VhostUserFs;

    fn exit_events(&self) -> &ExitEvents {
        &self.exit_events
    }

    fn prepare_serving_thread(&self) -> Result<(), VhostUserError> {
        isolate_fs_context()
    }
}

/// Gives the calling thread its own filesystem context (cwd, root, umask), inherited by the
/// threads it spawns afterwards, so that the passthrough filesystem's `umask(0)` stays local.
pub fn isolate_fs_context() -> Result<(), VhostUserError> {
    // SAFETY: unshare(2) with CLONE_FS only copies the calling thread's fs_struct; no memory is
    // touched and the result is checked.
    let r = unsafe { libc::unshare(libc::CLONE_FS) };
    if r != 0 {
        return Err(VhostUserError::Setup {
            what: "cannot unshare the filesystem context of the serving thread",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A bound, not yet serving vhost-user virtio-fs server.
pub struct VhostUserFsServer {
    inner: VhostUserServer<FsBackend>,
    cfg: FsConfig,
}

impl std::fmt::Debug for VhostUserFsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFsServer")
            .field("socket_path", &self.inner.socket_path())
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl VhostUserFsServer {
    /// Checks the shared directory and binds the vhost-user listener at `socket_path` (removed
    /// again on stop/drop). Errors if the path exists or the directory is unusable.
    pub fn bind(socket_path: &Path, cfg: FsConfig) -> Result<Self, FsError> {
        ensure_free(socket_path)?;
        let server = Arc::new(new_server(&cfg)?);
        let inner =
            VhostUserServer::bind(socket_path, || Ok::<_, FsError>(FsBackend::new(server)))?;
        info!(
            "virtio-fs: vhost-user socket {} bound, sharing {} ({}, cache {:?})",
            socket_path.display(),
            cfg.shared_dir.display(),
            if cfg.read_only { "ro" } else { "rw" },
            cfg.cache
        );
        Ok(VhostUserFsServer { inner, cfg })
    }

    /// The vhost-user socket path.
    pub fn socket_path(&self) -> &Path {
        self.inner.socket_path()
    }

    /// The configuration.
    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    /// Spawns a dedicated OS thread (named "joey-fs") that accepts ONE vhost-user frontend
    /// (QEMU) and serves it until the frontend disconnects or the handle is stopped.
    pub fn spawn(self) -> Result<VhostUserFsHandle, FsError> {
        let metrics = self.metrics();
        Ok(VhostUserFsHandle(self.inner.spawn()?, metrics))
    }

    /// The device's counters (shared with the serving thread).
    pub fn metrics(&self) -> Arc<FsMetrics> {
        self.inner.backend().metrics().clone()
    }
}

/// Controls a running vhost-user virtio-fs server. Dropping it stops the thread (without
/// waiting) and removes the socket path.
pub struct VhostUserFsHandle(ServerHandle, Arc<FsMetrics>);

impl std::fmt::Debug for VhostUserFsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFsHandle")
            .field("socket_path", &self.socket_path())
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl VhostUserFsHandle {
    /// The device's counters (they stay readable after the server ended).
    pub fn metrics(&self) -> &Arc<FsMetrics> {
        &self.1
    }

    /// Asks the serving thread to stop (also when no frontend ever connected).
    pub fn stop(&self) {
        self.0.stop();
    }

    /// Waits at most `timeout` for the serving thread to end; removes the socket path. Err on
    /// timeout (the thread is then asked to stop, since nobody could stop it later).
    pub fn join_timeout(self, timeout: Duration) -> Result<(), FsError> {
        Ok(self.0.join_timeout(timeout)?)
    }

    /// True once the serving thread has ended (frontend gone or stopped).
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// Waits up to `timeout` for the serving thread to end (frontend gone or stopped); true when
    /// it has.
    pub fn wait_finished(&self, timeout: Duration) -> bool {
        self.0.wait_finished(timeout)
    }

    /// The vhost-user socket path.
    pub fn socket_path(&self) -> &Path {
        self.0.socket_path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fs::device::tests::{mem, write_init_request, QSIZE};
    use crate::devices::fs::device::{HIPRIO_QUEUE, REQUEST_QUEUE};
    use crate::devices::fs::filesystem::SharedDirError;
    use crate::devices::vhost_user_server::tests::mock_vrings;
    use vm_memory::GuestMemoryAtomic;

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

    /// The generic lifecycle is tested in `vhost_user_server`; here: the fs hook
    /// (`unshare(CLONE_FS)`) succeeds on the serving thread (join would report its error), and
    /// the wrappers keep the socket path.
    #[test]
    fn spawn_stop_join_with_the_fs_hook() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fs.sock");
        let server = VhostUserFsServer::bind(&sock, cfg(dir.path())).unwrap();
        assert_eq!(server.socket_path(), sock);
        assert_eq!(server.config(), &cfg(dir.path()));
        let handle = server.spawn().unwrap();
        assert_eq!(handle.socket_path(), sock);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!handle.is_finished());
        handle.stop();
        handle.join_timeout(Duration::from_secs(1)).unwrap();
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
        let (vrings, calls) = mock_vrings(
            &atomic,
            NUM_QUEUES,
            &[(HIPRIO_QUEUE, &hiprio), (REQUEST_QUEUE, &request)],
            QSIZE,
        );

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
