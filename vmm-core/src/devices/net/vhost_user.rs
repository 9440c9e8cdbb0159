// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! vhost-user transport for the virtio-net device (QEMU's `-netdev vhost-user,chardev=...` with
//! `-device virtio-net-device,netdev=...,mac=...`).
//!
//! [`NetBackend`] implements `VhostUserBackendMut` on top of [`super::device::NetQueues`]: queues
//! rx (0) and tx (1); QEMU keeps the control queue and the config space (MAC, status, MTU) for
//! itself (CONFIG is not offered), `get_config` answers with the same bytes as the in-process
//! device for a frontend that asks anyway.
//! QEMU connects to a [`Relay`] in front of the daemon (see [`super::relay`]: QEMU 7.2 enables
//! the rings before acking the features, which the `vhost` crate treats as fatal).
//! The tap's private epoll fd ([`NetQueues::event_fd`]) is an extra listener of the vring worker
//! ([`TAP_EVENT`]): readable only while a tap frame waits and the guest has rx buffers, so the
//! worker neither spins nor reads frames it could not deliver; the guest's next rx kick resumes
//! reading. [`VhostUserNetServer`] binds the socket and [`VhostUserNetHandle`] controls the
//! serving thread (both over [`crate::devices::vhost_user_server`]).

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;

use super::device::{NetQueues, MAX_QUEUE_SIZE, NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use super::metrics::NetMetrics;
use super::relay::{Relay, RelayHandle};
use super::tap::Tap;
use super::virtio::{config_space, AVAIL_FEATURES, CONFIG_LEN};
use super::{NetConfig, NetError};
use crate::devices::vhost_user_server::{
    backend_plumbing, ensure_free, process_vring, signal_used, ExitEvents, GuestMemory,
    ServedBackend, ServerHandle, VhostUserServer,
};

/// Name of the serving thread.
pub const SERVER_THREAD_NAME: &str = "joey-net";
/// Name of the relay thread.
pub const RELAY_THREAD_NAME: &str = "joey-net-relay";
/// Device event of the tap (above the queue indices and the exit event, which is `NUM_QUEUES`).
pub const TAP_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Log prefix.
const NAME: &str = "virtio-net";

/// The vhost-user backend: the data path plus vhost-user bookkeeping.
pub struct NetBackend {
    queues: NetQueues,
    config: [u8; CONFIG_LEN],
    mem: Option<GuestMemory>,
    event_idx: bool,
    exit_events: ExitEvents,
}

impl std::fmt::Debug for NetBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetBackend")
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl NetBackend {
    /// Checks `cfg` and takes the (already opened) tap.
    pub fn new(cfg: NetConfig, tap: Tap) -> Result<Self, NetError> {
        cfg.validate()?;
        Ok(NetBackend {
            queues: NetQueues::new(tap, cfg.limits)?,
            config: config_space(&cfg),
            mem: None,
            event_idx: false,
            exit_events: ExitEvents::default(),
        })
    }

    /// The device's counters (shared with whoever reads them).
    pub fn metrics(&self) -> &Arc<NetMetrics> {
        self.queues.metrics()
    }

    /// The data path.
    pub fn queues(&self) -> &NetQueues {
        &self.queues
    }

    /// Delivers tap frames to the rx vring; stops polling the tap while the vring is unusable.
    fn rx(&mut self, vrings: &[VringRwLock]) {
        let (Some(mem), Some(vring)) =
            (self.mem.as_ref().map(|m| m.memory()), vrings.get(RX_QUEUE))
        else {
            self.pause_rx();
            return;
        };
        let mut ready = false;
        let queues = &mut self.queues;
        let used = process_vring(NAME, vring, RX_QUEUE, |q| {
            ready = true;
            queues.process_rx(&*mem, q).map(|o| o.used_any())
        });
        if !ready {
            self.pause_rx();
        }
        signal_used(NAME, vring, RX_QUEUE, used);
    }

    fn pause_rx(&mut self) {
        if let Err(e) = self.queues.pause_rx() {
            tracing::warn!("{NAME}: {e}");
        }
    }

    /// Sends the tx vring's frames to the tap.
    fn tx(&mut self, vrings: &[VringRwLock]) {
        let (Some(mem), Some(vring)) =
            (self.mem.as_ref().map(|m| m.memory()), vrings.get(TX_QUEUE))
        else {
            return;
        };
        let queues = &mut self.queues;
        let used = process_vring(NAME, vring, TX_QUEUE, |q| {
            queues.process_tx(&*mem, q).map(|o| o.used_any())
        });
        signal_used(NAME, vring, TX_QUEUE, used);
    }
}

impl VhostUserBackendMut for NetBackend {
    backend_plumbing!(NAME);

    fn features(&self) -> u64 {
        AVAIL_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// No CONFIG: QEMU's virtio-net serves MAC, status and MTU from its own config space (and
    /// warns about a backend offering CONFIG); `get_config` answers a frontend that asks anyway.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (offset, size) = (offset as usize, size as usize);
        match offset.checked_add(size) {
            Some(end) if end <= CONFIG_LEN => self.config[offset..end].to_vec(),
            _ => Vec::new(),
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
            TAP_EVENT => {
                // A tap frame, or a rate limiter's timer: tokens are back.
                match self.queues.handle_timers() {
                    Ok(fired) if fired.tx => self.tx(vrings),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("{NAME}: {e}"),
                }
                self.rx(vrings)
            }
            e if e as usize == RX_QUEUE => self.rx(vrings),
            e if e as usize == TX_QUEUE => self.tx(vrings),
            e => debug!("{NAME}: unexpected device event {e}"),
        }
        Ok(())
    }
}

impl ServedBackend for NetBackend {
    const NAME: &'static str = NAME;
    const THREAD_NAME: &'static str = SERVER_THREAD_NAME;

    fn exit_events(&self) -> &ExitEvents {
        &self.exit_events
    }

    fn host_events(&self) -> Vec<(RawFd, u16)> {
        vec![(self.queues.event_fd(), TAP_EVENT)]
    }
}

/// A bound, not yet serving vhost-user virtio-net server: the relay QEMU connects to and the
/// daemon behind it.
pub struct VhostUserNetServer {
    inner: VhostUserServer<NetBackend>,
    relay: Relay,
    socket_path: PathBuf,
    cfg: NetConfig,
}

impl std::fmt::Debug for VhostUserNetServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserNetServer")
            .field("socket_path", &self.socket_path)
            .field("backend_socket", &self.inner.socket_path())
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// The daemon's socket behind the relay at `socket_path`: `<socket_path>.backend`.
pub fn backend_socket_path(socket_path: &Path) -> PathBuf {
    let mut p = socket_path.as_os_str().to_owned();
    p.push(".backend");
    PathBuf::from(p)
}

impl VhostUserNetServer {
    /// Checks `cfg` and binds the vhost-user socket at `socket_path` (and the daemon's at
    /// [`backend_socket_path`]; both removed again on stop/drop) for a device on `tap`. Errors if
    /// a path exists or `cfg` is invalid.
    pub fn bind(socket_path: &Path, cfg: NetConfig, tap: Tap) -> Result<Self, NetError> {
        ensure_free(socket_path)?;
        cfg.validate()?;
        let tap_name = tap.name().to_string();
        let backend_path = backend_socket_path(socket_path);
        let inner = VhostUserServer::bind(&backend_path, || NetBackend::new(cfg, tap))?;
        let relay = Relay::bind(socket_path, &backend_path)?;
        info!(
            "{NAME}: vhost-user socket {} bound, tap {tap_name}, guest MAC {}, MTU {}",
            socket_path.display(),
            cfg.mac,
            cfg.mtu
        );
        Ok(VhostUserNetServer {
            inner,
            relay,
            socket_path: socket_path.to_path_buf(),
            cfg,
        })
    }

    /// The vhost-user socket path (QEMU's `-chardev socket,path=`).
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The configuration.
    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// The device's counters (shared with the serving thread).
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.inner.backend().metrics().clone()
    }

    /// Spawns the serving thread (named "joey-net") and the relay thread ("joey-net-relay"):
    /// ONE vhost-user frontend (QEMU) is served until it disconnects or the handle is stopped.
    pub fn spawn(self) -> Result<VhostUserNetHandle, NetError> {
        let metrics = self.metrics();
        let server = self.inner.spawn()?;
        let relay = self.relay.spawn(RELAY_THREAD_NAME)?;
        Ok(VhostUserNetHandle {
            server: Some(server),
            relay,
            metrics,
            socket_path: self.socket_path,
        })
    }
}

/// Controls a running vhost-user virtio-net server (relay + daemon). Dropping it stops both
/// threads (without waiting) and removes the socket paths; the tap is closed when the daemon's
/// thread ends.
#[derive(Debug)]
pub struct VhostUserNetHandle {
    server: Option<ServerHandle>,
    relay: RelayHandle,
    metrics: Arc<NetMetrics>,
    socket_path: PathBuf,
}

impl VhostUserNetHandle {
    /// The device's counters (readable also after the server ended).
    pub fn metrics(&self) -> &Arc<NetMetrics> {
        &self.metrics
    }

    /// The vhost-user socket path QEMU connects to.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Asks both threads to stop (also when no frontend ever connected).
    pub fn stop(&self) {
        self.relay.stop();
        if let Some(s) = &self.server {
            s.stop();
        }
    }

    /// True once both threads have ended (frontend gone or stopped).
    pub fn is_finished(&self) -> bool {
        self.relay.is_finished() && self.server.as_ref().is_none_or(|s| s.is_finished())
    }

    /// Waits at most `timeout` for both threads to end; removes the socket paths. On timeout
    /// the threads are asked to stop (nobody could stop them later).
    pub fn join_timeout(mut self, timeout: Duration) -> Result<(), NetError> {
        let deadline = Instant::now() + timeout;
        let server = self.server.take().map(|s| s.join_timeout(timeout));
        let relay = self.relay.join_until(deadline, timeout);
        if let Some(r) = server {
            r?;
        }
        Ok(relay?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::net::device::rx_header;
    use crate::devices::net::device::tests::{desc, mem, put_tx, used, QSIZE, W};
    use crate::devices::net::tap::tests::{test_frame, test_tap};
    use crate::devices::net::tap::VNET_HDR_LEN;
    use crate::devices::net::MacAddr;
    use crate::devices::vhost_user_server::tests::mock_vrings;
    use crate::devices::vhost_user_server::VhostUserError;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

    fn cfg() -> NetConfig {
        NetConfig {
            mac: MacAddr([0x02, 0, 0, 0, 0, 0x07]),
            mtu: 1500,
            limits: Default::default(),
        }
    }

    #[test]
    fn backend_features_config_and_events() {
        let t = test_tap();
        let b = NetBackend::new(cfg(), t.tap.try_clone().unwrap()).unwrap();
        assert_eq!(b.num_queues(), 2);
        assert_eq!(b.max_queue_size(), 1024);
        let f = b.features();
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert_eq!(
            f & ((1 << 0) | (1 << 15) | (1 << 17)),
            0,
            "no csum, mrg_rxbuf, ctrl_vq"
        );
        assert_eq!(b.protocol_features(), VhostUserProtocolFeatures::MQ);
        assert_eq!(b.get_config(0, 6), vec![0x02, 0, 0, 0, 0, 0x07]);
        assert_eq!(b.get_config(10, 2), 1500u16.to_le_bytes().to_vec());
        assert!(b.get_config(10, 3).is_empty());
        assert!(b.get_config(u32::MAX, 2).is_empty());
        assert_eq!(b.host_events(), vec![(b.queues().event_fd(), 3)]);
        assert!(TAP_EVENT as usize > NUM_QUEUES);
    }

    /// The vhost-user glue on vrings over test memory: a tap event with no memory or no ready rx
    /// vring stops polling; an rx kick delivers the frame; a tx kick sends one; both signal.
    #[test]
    fn backend_handle_event_moves_frames() {
        let t = test_tap();
        let m = mem();
        let atomic = GuestMemoryAtomic::new(m.clone());
        let mut b = NetBackend::new(cfg(), t.tap.try_clone().unwrap()).unwrap();
        let f = test_frame(100, 3);
        t.send(&f);

        // Tap event before the frontend set anything up: nothing happens, tap not polled.
        let (bare, _) = mock_vrings(&atomic, NUM_QUEUES, &[], QSIZE);
        b.handle_event(TAP_EVENT, EventSet::IN, &bare, 0).unwrap();
        assert!(!b.queues().tap_polled());
        b.update_memory(atomic.clone()).unwrap();
        b.handle_event(TAP_EVENT, EventSet::IN, &bare, 0).unwrap();
        assert!(!b.queues().tap_polled() && !b.queues().has_pending_frame());

        let rxq = MockSplitQueue::create(&m, GuestAddress(0x8_0000), QSIZE);
        let txq = MockSplitQueue::create(&m, GuestAddress(0x9_0000), QSIZE);
        let (vrings, calls) = mock_vrings(
            &atomic,
            NUM_QUEUES,
            &[(RX_QUEUE, &rxq), (TX_QUEUE, &txq)],
            QSIZE,
        );
        rxq.add_desc_chains(&[desc(0x1_0000, 1600, W, 0)], 0)
            .unwrap();
        b.handle_event(RX_QUEUE as u16, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(used(&rxq), vec![(0, (VNET_HDR_LEN + 100) as u32)]);
        let mut got = vec![0u8; VNET_HDR_LEN + 100];
        m.read_slice(&mut got, GuestAddress(0x1_0000)).unwrap();
        assert_eq!(got[..VNET_HDR_LEN], rx_header());
        assert_eq!(&got[VNET_HDR_LEN..], &f[..]);
        assert!(b.queues().tap_polled());
        assert!(calls[0].read().unwrap() > 0, "rx queue not signalled");

        let out = test_frame(64, 9);
        let len = put_tx(&m, 0x2_0000, &out);
        txq.add_desc_chains(&[desc(0x2_0000, len, 0, 0)], 0)
            .unwrap();
        b.handle_event(TX_QUEUE as u16, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(t.recv(), out);
        assert_eq!(used(&txq), vec![(0, 0)]);
        assert!(calls[1].read().unwrap() > 0, "tx queue not signalled");
        b.handle_event(9, EventSet::IN, &vrings, 0).unwrap();

        let s = b.metrics().snapshot();
        assert_eq!(
            (s.rx_packets, s.tx_packets, s.rx_errors, s.tx_errors),
            (1, 1, 0, 0)
        );
    }

    /// Through the vring worker's events: the tap event with an empty rx vring keeps the frame
    /// and stops polling the tap (the worker would otherwise spin); the guest's rx kick after
    /// posting a buffer delivers it and resumes polling.
    #[test]
    fn backend_keeps_the_frame_until_the_guest_posts_rx_buffers() {
        use crate::devices::net::device::tests::{readable_now, wait_readable};
        let t = test_tap();
        let m = mem();
        let atomic = GuestMemoryAtomic::new(m.clone());
        let mut b = NetBackend::new(cfg(), t.tap.try_clone().unwrap()).unwrap();
        b.update_memory(atomic.clone()).unwrap();
        let rxq = MockSplitQueue::create(&m, GuestAddress(0x8_0000), QSIZE);
        let (vrings, calls) = mock_vrings(&atomic, NUM_QUEUES, &[(RX_QUEUE, &rxq)], QSIZE);
        // A first kick with no buffer starts polling the tap.
        b.handle_event(RX_QUEUE as u16, EventSet::IN, &vrings, 0)
            .unwrap();
        assert!(b.queues().tap_polled());
        let f = test_frame(333, 4);
        t.send(&f);
        let fd = b.host_events()[0].0;
        assert!(wait_readable(fd));
        b.handle_event(TAP_EVENT, EventSet::IN, &vrings, 0).unwrap();
        assert!(b.queues().has_pending_frame() && !b.queues().tap_polled());
        assert!(!readable_now(fd), "the worker would spin on the tap event");
        assert!(calls[0].read().is_err(), "nothing used, no signal");
        rxq.add_desc_chains(&[desc(0x1_0000, 2048, W, 0)], 0)
            .unwrap();
        b.handle_event(RX_QUEUE as u16, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(used(&rxq), vec![(0, (VNET_HDR_LEN + 333) as u32)]);
        let mut got = vec![0u8; f.len()];
        m.read_slice(&mut got, GuestAddress(0x1_0000 + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, f);
        assert!(b.queues().tap_polled() && !b.queues().has_pending_frame());
        assert!(calls[0].read().unwrap() > 0);
        assert_eq!(b.metrics().snapshot().rx_dropped, 0);
    }

    #[test]
    fn bind_spawn_stop_and_bad_input() {
        let t = test_tap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("net.sock");
        let bad = NetConfig { mtu: 0, ..cfg() };
        assert!(matches!(
            VhostUserNetServer::bind(&sock, bad, t.tap.try_clone().unwrap()),
            Err(NetError::Mtu(0))
        ));
        assert!(!sock.exists(), "socket left behind");
        let server = VhostUserNetServer::bind(&sock, cfg(), t.tap.try_clone().unwrap()).unwrap();
        assert_eq!(server.socket_path(), sock);
        assert_eq!(server.config(), &cfg());
        assert!(matches!(
            VhostUserNetServer::bind(&sock, cfg(), t.tap.try_clone().unwrap()),
            Err(NetError::VhostUser(VhostUserError::PathExists(_)))
        ));
        let backend = backend_socket_path(&sock);
        assert_eq!(backend, dir.path().join("net.sock.backend"));
        assert!(backend.exists());
        let handle = server.spawn().unwrap();
        assert_eq!(handle.socket_path(), sock);
        assert!(!handle.is_finished());
        assert_eq!(handle.metrics().snapshot(), Default::default());
        handle.stop();
        handle.join_timeout(Duration::from_secs(2)).unwrap();
        assert!(!sock.exists(), "vhost-user socket not removed");
        assert!(!backend.exists(), "backend socket not removed");
    }
}
