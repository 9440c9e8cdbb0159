// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-net served in-process by the built-in VMM: a [`VirtioDevice`] on the virtio-mmio
//! transport (device id 1, queues rx + tx, config space = MAC, link status, one queue pair,
//! MTU). Frames go through the same [`NetQueues`] as the vhost-user backend.
//!
//! The device event loop watches [`NetQueues::event_fd`], the tap's private epoll: it is
//! readable only while a tap frame waits and the guest has rx buffers, so a guest that posts no
//! rx buffer neither loses frames nor makes the loop spin; its next rx notification resumes
//! reading. The tap is polled only while the device is active.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::device::{NetQueues, NUM_QUEUES, RX_QUEUE, TX_QUEUE, VIRTIO_ID_NET};
use super::metrics::NetMetrics;
use super::tap::Tap;
use super::{MacAddr, NetConfig, NetError};
use crate::devices::virtio::mmio::read_config_bytes;
use crate::devices::virtio::{VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

/// Size of the config space: `u8 mac[6]`, `le16 status`, `le16 max_virtqueue_pairs`,
/// `le16 mtu`.
pub const CONFIG_LEN: usize = 12;
/// Size offered for each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Features offered to the driver.
pub const AVAIL_FEATURES: u64 = (1u64 << VIRTIO_F_VERSION_1)
    | (1u64 << VIRTIO_NET_F_MAC)
    | (1u64 << VIRTIO_NET_F_MTU)
    | (1u64 << VIRTIO_NET_F_STATUS);

/// The config space of a device with `cfg`: link always up, one queue pair.
pub fn config_space(cfg: &NetConfig) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[..6].copy_from_slice(&cfg.mac.0);
    c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c[8..10].copy_from_slice(&1u16.to_le_bytes());
    c[10..12].copy_from_slice(&cfg.mtu.to_le_bytes());
    c
}

/// The in-process virtio-net device.
#[derive(Debug)]
pub struct VirtioNet {
    queues: NetQueues,
    cfg: NetConfig,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; NUM_QUEUES],
}

impl VirtioNet {
    /// Checks `cfg` and takes the (already opened) tap.
    pub fn new(cfg: NetConfig, tap: Tap) -> Result<Self, NetError> {
        cfg.validate()?;
        Ok(VirtioNet {
            queues: NetQueues::new(tap, cfg.limits)?,
            config: config_space(&cfg),
            cfg,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
        })
    }

    /// The device's counters (shared with whoever reads them).
    pub fn metrics(&self) -> &std::sync::Arc<NetMetrics> {
        self.queues.metrics()
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.cfg.mac
    }

    /// The data path (tap, pending frame).
    pub fn queues(&self) -> &NetQueues {
        &self.queues
    }

    /// Delivers tap frames to the rx queue, or stops polling the tap if it is not usable.
    fn rx(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue]) -> Result<bool, VirtioError> {
        match queues.get_mut(RX_QUEUE) {
            Some(q) if q.ready() => Ok(self
                .queues
                .process_rx(mem, q)
                .map_err(NetError::from)?
                .used_any()),
            _ => {
                self.queues.pause_rx().map_err(NetError::from)?;
                Ok(false)
            }
        }
    }

    /// Sends the tx queue's frames to the tap.
    fn tx(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue]) -> Result<bool, VirtioError> {
        match queues.get_mut(TX_QUEUE) {
            Some(q) if q.ready() => Ok(self
                .queues
                .process_tx(mem, q)
                .map_err(NetError::from)?
                .used_any()),
            _ => Ok(false),
        }
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }

    fn activate(&mut self, _acked_features: u64) -> Result<(), VirtioError> {
        self.queues.resume_rx().map_err(NetError::from)?;
        Ok(())
    }

    fn reset(&mut self) {
        if let Err(e) = self.queues.reset() {
            tracing::warn!("virtio-net: reset: {e}");
        }
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool, VirtioError> {
        match index {
            RX_QUEUE => self.rx(mem, queues),
            TX_QUEUE => self.tx(mem, queues),
            _ => Ok(false),
        }
    }

    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.queues.event_fd())
    }

    fn process_event(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: Option<&mut [Queue]>,
    ) -> Result<bool, VirtioError> {
        // A tap frame, or a rate limiter's timer: tokens are back.
        let fired = self.queues.handle_timers().map_err(NetError::from)?;
        match queues {
            Some(q) => {
                let tx = fired.tx && self.tx(mem, q)?;
                Ok(self.rx(mem, q)? | tx)
            }
            None => {
                // Inactive: leave the frames in the tap and stop polling it.
                self.queues.pause_rx().map_err(NetError::from)?;
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::net::device::rx_header;
    use crate::devices::net::device::tests::{
        desc, mem, put_tx, readable_now, used, wait_readable, QSIZE, W,
    };
    use crate::devices::net::tap::tests::{test_frame, test_tap};
    use crate::devices::net::tap::VNET_HDR_LEN;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn cfg() -> NetConfig {
        NetConfig {
            mac: MacAddr([0x02, 0x42, 0xac, 0x11, 0x00, 0x02]),
            mtu: 1400,
            limits: Default::default(),
        }
    }

    #[test]
    fn config_space_and_features() {
        let t = test_tap();
        let net = VirtioNet::new(cfg(), t.tap.try_clone().unwrap()).unwrap();
        assert_eq!(net.device_type(), 1);
        assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        assert_eq!(
            net.avail_features(),
            (1 << 32) | (1 << 5) | (1 << 3) | (1 << 16)
        );
        let mut c = [0xffu8; CONFIG_LEN];
        net.read_config(0, &mut c);
        assert_eq!(
            c,
            [0x02, 0x42, 0xac, 0x11, 0x00, 0x02, 1, 0, 1, 0, 0x78, 0x05]
        );
        let mut mtu = [0u8; 2];
        net.read_config(10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 1400);
        assert_eq!(net.mac().to_string(), "02:42:ac:11:00:02");
        // A bad config is refused before anything is set up.
        let bad = NetConfig { mtu: 10, ..cfg() };
        assert!(matches!(
            VirtioNet::new(bad, t.tap.try_clone().unwrap()),
            Err(NetError::Mtu(10))
        ));
    }

    /// Through the `VirtioDevice` interface: the tap is polled only once active; tx reaches the
    /// tap; an rx frame waits for a buffer and the event fd stays quiet until the guest posts one.
    #[test]
    fn device_interface_end_to_end() {
        let t = test_tap();
        let mut net = VirtioNet::new(cfg(), t.tap.try_clone().unwrap()).unwrap();
        let fd = net.event_fd().unwrap();
        let m = mem();
        let rxq = MockSplitQueue::create(&m, GuestAddress(0), QSIZE);
        let txq = MockSplitQueue::create(&m, GuestAddress(0x8_0000), QSIZE);
        let mut queues = [
            rxq.create_queue::<Queue>().unwrap(),
            txq.create_queue::<Queue>().unwrap(),
        ];

        let f = test_frame(120, 6);
        t.send(&f);
        // Inactive: not polled, the frame stays in the tap.
        assert!(!readable_now(fd));
        assert!(!net.process_event(&m, None).unwrap());
        net.activate(AVAIL_FEATURES).unwrap();
        assert!(wait_readable(fd));
        // No rx buffer yet: the frame is kept and the fd goes quiet.
        assert!(!net.process_event(&m, Some(&mut queues)).unwrap());
        assert!(net.queues().has_pending_frame());
        assert!(!readable_now(fd));
        // The guest posts a buffer and notifies the rx queue.
        rxq.add_desc_chains(&[desc(0x1_0000, 1600, W, 0)], 0)
            .unwrap();
        assert!(net.process_queue(&m, &mut queues, RX_QUEUE).unwrap());
        assert_eq!(used(&rxq), vec![(0, (VNET_HDR_LEN + 120) as u32)]);
        let mut got = vec![0u8; VNET_HDR_LEN + 120];
        m.read_slice(&mut got, GuestAddress(0x1_0000)).unwrap();
        assert_eq!(got[..VNET_HDR_LEN], rx_header());
        assert_eq!(&got[VNET_HDR_LEN..], &f[..]);

        // tx.
        let out = test_frame(300, 2);
        let len = put_tx(&m, 0x2_0000, &out);
        txq.add_desc_chains(&[desc(0x2_0000, len, 0, 0)], 0)
            .unwrap();
        assert!(net.process_queue(&m, &mut queues, TX_QUEUE).unwrap());
        assert_eq!(t.recv(), out);
        assert!(!net.process_queue(&m, &mut queues, 5).unwrap());

        let s = net.metrics().snapshot();
        assert_eq!(
            (s.rx_packets, s.rx_bytes, s.tx_packets, s.tx_bytes),
            (1, 120, 1, 300)
        );

        // Reset: not polled any more, even with a frame queued in the tap.
        net.reset();
        t.send(&test_frame(64, 1));
        assert!(wait_readable(std::os::fd::AsRawFd::as_raw_fd(&t.tap)));
        assert!(!readable_now(fd));
    }

    /// The in-process path as the built-in VMM runs it: transport + device event loop. A frame
    /// that arrives before any rx buffer is kept (read from the tap) and delivered once the
    /// guest posts a buffer and notifies; a later frame goes straight into an already posted
    /// buffer through the tap event; tx goes out on notification; interrupts are raised.
    #[test]
    fn served_by_the_device_event_loop() {
        use crate::devices::virtio::event_loop;
        use crate::devices::virtio::mmio::tests::{negotiate_features, setup_queue, wr};
        use crate::devices::virtio::mmio::{reg, MmioTransport};
        use crate::devices::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
        use std::os::fd::AsRawFd;
        use std::sync::{Arc, Mutex};
        use std::time::{Duration, Instant};

        let wait = |what: &str, f: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !f() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        let t = test_tap();
        let net = VirtioNet::new(cfg(), t.tap.try_clone().unwrap()).unwrap();
        let metrics = net.metrics().clone();
        let m = mem();
        let mut tr = MmioTransport::new(Box::new(net), m.clone()).unwrap();
        let rxq = MockSplitQueue::create(&m, GuestAddress(0x8_0000), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(0x9_0000), 16);
        negotiate_features(&mut tr, AVAIL_FEATURES);
        setup_queue(&mut tr, RX_QUEUE as u32, &rxq);
        setup_queue(&mut tr, TX_QUEUE as u32, &txq);
        wr(
            &mut tr,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(tr.is_active());
        let irq = tr.irq_evt().try_clone().unwrap();
        let rx_kick = tr.queue_evts()[RX_QUEUE].try_clone().unwrap();
        let tx_kick = tr.queue_evts()[TX_QUEUE].try_clone().unwrap();
        let mut ev = event_loop::spawn(vec![Arc::new(Mutex::new(tr))]).unwrap();

        // No rx buffer: the device takes the frame off the tap and keeps it.
        let f1 = test_frame(100, 1);
        t.send(&f1);
        wait("frame taken off the tap", &|| {
            !readable_now(t.tap.as_raw_fd())
        });
        assert_eq!(rxq.used().idx().load(), 0);
        // The guest posts a buffer and notifies: f1 lands, with an interrupt.
        rxq.add_desc_chains(&[desc(0x1_0000, 2048, W, 0)], 0)
            .unwrap();
        rx_kick.write(1).unwrap();
        wait("f1 delivered", &|| rxq.used().idx().load() == 1);
        let mut got = vec![0u8; VNET_HDR_LEN + f1.len()];
        m.read_slice(&mut got, GuestAddress(0x1_0000)).unwrap();
        assert_eq!(got[..VNET_HDR_LEN], rx_header());
        assert_eq!(&got[VNET_HDR_LEN..], &f1[..]);
        assert!(irq.read().unwrap() > 0);
        // A buffer is already there: the next frame arrives through the tap event alone.
        rxq.add_desc_chains(&[desc(0x2_0000, 2048, W, 0)], 1)
            .unwrap();
        let f2 = test_frame(200, 2);
        t.send(&f2);
        wait("f2 delivered", &|| rxq.used().idx().load() == 2);
        let mut got = vec![0u8; f2.len()];
        m.read_slice(&mut got, GuestAddress(0x2_0000 + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, f2);
        // tx on notification.
        let out = test_frame(500, 3);
        let len = put_tx(&m, 0x3_0000, &out);
        txq.add_desc_chains(&[desc(0x3_0000, len, 0, 0)], 0)
            .unwrap();
        tx_kick.write(1).unwrap();
        assert_eq!(t.recv(), out);
        wait("tx chain used", &|| txq.used().idx().load() == 1);
        ev.stop(Duration::from_secs(2)).unwrap();
        let s = metrics.snapshot();
        assert_eq!(
            (s.rx_packets, s.rx_bytes, s.tx_packets, s.tx_bytes),
            (2, 300, 1, 500)
        );
        assert_eq!(
            (s.rx_errors, s.tx_errors, s.rx_dropped, s.tx_dropped),
            (0, 0, 0, 0)
        );
    }
}
