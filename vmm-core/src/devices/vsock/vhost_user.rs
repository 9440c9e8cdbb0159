// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! vhost-user transport for the vsock device (QEMU's `vhost-user-vsock-device`).
//!
//! [`VsockBackend`] implements `VhostUserBackendMut`; the muxer's epoll fd is registered with the
//! vring worker so host socket activity wakes it. [`VhostUserVsockServer`] binds the sockets and
//! [`VhostUserVsockHandle`] controls the dedicated serving thread; both are thin wrappers of
//! [`crate::devices::vhost_user_server`], which owns the serving-thread lifecycle (one frontend,
//! stop via `shutdown(2)` on the accepted frontend socket, bounded joins). The vsock device adds
//! the hybrid-vsock unix socket, removed together with the vhost-user socket.

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

use super::device::{VsockDevice, MAX_QUEUE_SIZE, NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use super::metrics::VsockMetrics;
use super::{VsockConfig, VsockError};
pub use crate::devices::vhost_user_server::VhostUserError;
use crate::devices::vhost_user_server::{
    backend_plumbing, ensure_free, process_vring, signal_used, ExitEvents, GuestMemory, ServedBackend,
    ServerHandle,
    VhostUserServer,
};

/// Epoll token of the muxer fd in the vring worker (0..=NUM_QUEUES are reserved).
pub const BACKEND_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Name of the serving thread.
pub const SERVER_THREAD_NAME: &str = "joey-vsock";

/// Log prefix.
const NAME: &str = "vsock";

/// The vhost-user backend: the vsock device plus vhost-user bookkeeping.
pub struct VsockBackend {
    device: VsockDevice,
    mem: Option<GuestMemory>,
    event_idx: bool,
    exit_events: ExitEvents,
}

impl VsockBackend {
    /// Wraps a device.
    pub fn new(device: VsockDevice) -> Self {
        VsockBackend {
            device,
            mem: None,
            event_idx: false,
            exit_events: ExitEvents::default(),
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
        let tx_used = process_vring(NAME, tx, TX_QUEUE, |q| device.process_tx_queue(&*mem, q));
        if tx_used {
            // Guest packets may have made host sockets ready (new streams, credit).
            if let Err(e) = device.process_host_events() {
                warn!("vsock: host event processing failed: {e}");
            }
        }
        let rx_used = process_vring(NAME, rx, RX_QUEUE, |q| device.process_rx_queue(&*mem, q));
        signal_used(NAME, tx, TX_QUEUE, tx_used);
        signal_used(NAME, rx, RX_QUEUE, rx_used);
    }
}

impl VhostUserBackendMut for VsockBackend {
    backend_plumbing!(NAME);



    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }


    fn reset_device(&mut self) {
        // The guest driver forgot all connections; so do we (host streams get closed).
        self.device.muxer_mut().reset();
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.read_config(offset, size)
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

impl ServedBackend for VsockBackend {
    const NAME: &'static str = NAME;
    const THREAD_NAME: &'static str = SERVER_THREAD_NAME;

    fn exit_events(&self) -> &ExitEvents {
        &self.exit_events
    }

    fn host_events(&self) -> Vec<(RawFd, u16)> {
        vec![(self.device.event_fd(), BACKEND_EVENT)]
    }
}

/// A bound, not yet serving vhost-user vsock server.
pub struct VhostUserVsockServer {
    inner: VhostUserServer<VsockBackend>,
    uds_path: PathBuf,
}

impl std::fmt::Debug for VhostUserVsockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserVsockServer")
            .field("socket_path", &self.inner.socket_path())
            .field("uds_path", &self.uds_path)
            .field("guest_cid", &self.inner.backend().device().guest_cid())
            .finish()
    }
}

impl VhostUserVsockServer {
    /// Binds the vhost-user listener at `socket_path` and the hybrid-vsock unix listener at
    /// `cfg.uds_path` (both removed again on stop/drop). Errors if either path exists or cannot
    /// be bound.
    pub fn bind(socket_path: &Path, cfg: VsockConfig) -> Result<Self, VsockError> {
        ensure_free(socket_path)?;
        if cfg.uds_path.symlink_metadata().is_ok() {
            return Err(super::MuxerError::PathExists(cfg.uds_path.clone()).into());
        }
        let mut inner = VhostUserServer::bind(socket_path, || {
            Ok::<_, VsockError>(VsockBackend::new(VsockDevice::new(&cfg)?))
        })?;
        inner.also_remove(&cfg.uds_path);
        info!(
            "vsock: vhost-user socket {} and host socket {} bound for guest cid {}",
            socket_path.display(),
            cfg.uds_path.display(),
            cfg.guest_cid
        );
        Ok(VhostUserVsockServer {
            inner,
            uds_path: cfg.uds_path,
        })
    }

    /// The vhost-user socket path.
    pub fn socket_path(&self) -> &Path {
        self.inner.socket_path()
    }

    /// The hybrid-vsock socket path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The device's counters (shared with the serving thread).
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.inner.backend().device().metrics().clone()
    }

    /// Spawns a dedicated OS thread (named "joey-vsock") that accepts ONE vhost-user frontend
    /// (QEMU) and serves it until the frontend disconnects or the handle is stopped.
    pub fn spawn(self) -> Result<VhostUserVsockHandle, VsockError> {
        let metrics = self.metrics();
        Ok(VhostUserVsockHandle(self.inner.spawn()?, metrics))
    }
}

/// Controls a running vhost-user vsock server. Dropping it stops the thread (without waiting)
/// and removes both socket paths.
pub struct VhostUserVsockHandle(ServerHandle, Arc<VsockMetrics>);

impl std::fmt::Debug for VhostUserVsockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserVsockHandle")
            .field("socket_path", &self.0.socket_path())
            .field("uds_path", &self.0.extra_paths().next())
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl VhostUserVsockHandle {
    /// The device's counters (they stay readable after the server ended).
    pub fn metrics(&self) -> &Arc<VsockMetrics> {
        &self.1
    }

    /// Asks the serving thread to stop (works also when no frontend ever connected: must not
    /// hang in accept).
    pub fn stop(&self) {
        self.0.stop();
    }

    /// Waits at most `timeout` for the serving thread to end; removes both socket paths. Err on
    /// timeout (the thread is then asked to stop, since nobody could stop it later).
    pub fn join_timeout(self, timeout: Duration) -> Result<(), VsockError> {
        Ok(self.0.join_timeout(timeout)?)
    }

    /// True once the serving thread has ended (frontend gone or stopped).
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::vhost_user_server::tests::{mock_vrings, wait_finished};
    use crate::devices::vsock::device::QUEUE_SIZE;
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    use std::time::Instant;
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    fn cfg(dir: &Path) -> VsockConfig {
        VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("vsock.sock"),
            limits: Default::default(),
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

    /// The generic lifecycle is tested in `vhost_user_server`; here: the hybrid-vsock socket
    /// goes away with the vhost-user socket, on stop+join and on drop.
    #[test]
    fn stop_join_and_drop_remove_both_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vhost.sock");
        let c = cfg(dir.path());
        let uds = c.uds_path.clone();
        let server = VhostUserVsockServer::bind(&sock, c).unwrap();
        assert_eq!((server.socket_path(), server.uds_path()), (&*sock, &*uds));
        assert!(sock.exists() && uds.exists());
        let handle = server.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!handle.is_finished());
        handle.stop();
        handle.join_timeout(Duration::from_secs(1)).unwrap();
        assert!(!sock.exists(), "vhost-user socket not removed");
        assert!(!uds.exists(), "hybrid vsock socket not removed");

        let handle = VhostUserVsockServer::bind(&sock, cfg(dir.path()))
            .unwrap()
            .spawn()
            .unwrap();
        drop(handle);
        assert!(!sock.exists() && !uds.exists());
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
            limits: Default::default(),
            ..c
        };
        let server = VhostUserVsockServer::bind(&sock, c).unwrap();
        drop(server);
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
        let (vrings, calls) = mock_vrings(
            &atomic,
            NUM_QUEUES,
            &[(RX_QUEUE, &rx_mock), (TX_QUEUE, &tx_mock)],
            QUEUE_SIZE,
        );

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
        wait_finished(&handle.0, "serving thread still running");
        handle.join_timeout(Duration::from_secs(1)).unwrap();
    }
}
