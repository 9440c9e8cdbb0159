// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-mmio transport, register layout version 2 ("modern", virtio 1.x, 4.2.2).
//!
//! The transport sits on the MMIO bus (register accesses come from vCPU threads) and is shared
//! with the device event loop (queue notifications, device fds) behind one mutex. QueueNotify
//! normally never reaches [`BusDevice::write`]: the VMM registers each queue's eventfd as a KVM
//! ioeventfd on the notify address with `datamatch = queue index`. A trapped QueueNotify write
//! (no ioeventfd, or an index without one) signals the same eventfd, so both paths end in the
//! event loop.

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::TransportMetrics;
use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{
    VirtioDevice, VirtioError, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};
use crate::vmm::bus::BusDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Register layout version 2 (virtio 1.x).
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported by joey devices ("JOEY").
pub const VENDOR_ID: u32 = 0x594f_454a;
/// Size of one device's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of the QueueNotify register (the ioeventfd address is `base + this`).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device config space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Register offsets (virtio 1.x, 4.2.2).
pub(crate) mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// The transport of one virtio device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    irq_evt: EventFd,
    interrupt_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    /// The driver configured a queue with values the device cannot honour (bad size/alignment).
    queue_config_error: bool,
    metrics: Arc<TransportMetrics>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &format_args!("{:#x}", self.status))
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .finish()
    }
}

fn new_eventfd() -> Result<EventFd, VirtioError> {
    EventFd::new(EFD_NONBLOCK).map_err(VirtioError::EventFd)
}

impl MmioTransport {
    /// Wraps `device`, creating its queues, queue eventfds and interrupt eventfd.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Result<Self, VirtioError> {
        let sizes = device.queue_max_sizes();
        if sizes.is_empty() {
            return Err(VirtioError::BadQueueConfig(
                virtio_queue::Error::InvalidMaxSize,
            ));
        }
        let queues = sizes
            .iter()
            .map(|&s| Queue::new(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioError::BadQueueConfig)?;
        let queue_evts = (0..queues.len())
            .map(|_| new_eventfd())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            queues,
            queue_evts,
            irq_evt: new_eventfd()?,
            interrupt_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            queue_config_error: false,
            metrics: Arc::new(TransportMetrics::default()),
        })
    }

    /// Virtio device id of the device.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// One eventfd per queue (register as ioeventfds with datamatch = index).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt eventfd (register as irqfd).
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }

    /// The device's own fd for the event loop, if any.
    pub fn device_fd(&self) -> Option<RawFd> {
        self.device.event_fd()
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver acked.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Pending interrupt status bits.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Transport counters.
    pub fn metrics(&self) -> &Arc<TransportMetrics> {
        &self.metrics
    }

    /// Whether the driver finished initialization and the device is usable.
    pub fn is_active(&self) -> bool {
        self.status & DRIVER_OK != 0 && self.status & (DEVICE_NEEDS_RESET | FAILED) == 0
    }

    /// Handles a notification of queue `index` (its eventfd became readable).
    pub fn process_queue_event(&mut self, index: usize) {
        let Some(evt) = self.queue_evts.get(index) else {
            return;
        };
        // Non-blocking: EAGAIN just means someone drained it already.
        let _ = evt.read();
        TransportMetrics::inc(&self.metrics.queue_notifications);
        if !self.is_active() {
            return;
        }
        let r = self
            .device
            .process_queue(&self.mem, &mut self.queues, index);
        self.handle_result(r);
    }

    /// Handles readiness of the device fd.
    pub fn process_device_event(&mut self) {
        let queues = if self.is_active() {
            Some(&mut self.queues[..])
        } else {
            None
        };
        let r = self.device.process_event(&self.mem, queues);
        self.handle_result(r);
    }

    fn handle_result(&mut self, r: Result<bool, VirtioError>) {
        match r {
            Ok(true) => self.trigger(VIRTIO_MMIO_INT_VRING),
            Ok(false) => {}
            Err(e) => self.fail_device(e),
        }
    }

    /// Puts the device in DEVICE_NEEDS_RESET and tells the driver (config interrupt).
    fn fail_device(&mut self, e: VirtioError) {
        tracing::warn!(
            device_type = self.device.device_type(),
            "virtio device needs reset: {e}"
        );
        TransportMetrics::inc(&self.metrics.device_errors);
        if self.status & DEVICE_NEEDS_RESET == 0 {
            self.status |= DEVICE_NEEDS_RESET;
            self.trigger(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    fn trigger(&mut self, bit: u32) {
        self.interrupt_status |= bit;
        if bit == VIRTIO_MMIO_INT_VRING {
            TransportMetrics::inc(&self.metrics.interrupts);
        }
        if let Err(e) = self.irq_evt.write(1) {
            tracing::warn!("virtio: cannot signal interrupt: {e}");
        }
    }

    fn bad_access(&self, what: &str, offset: u64) {
        TransportMetrics::inc(&self.metrics.bad_accesses);
        tracing::debug!(
            device_type = self.device.device_type(),
            status = self.status,
            "virtio-mmio: ignored {what} at {offset:#x}"
        );
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Whether the driver may configure queues now (after FEATURES_OK, before DRIVER_OK).
    fn queue_config_allowed(&self) -> bool {
        self.status & FEATURES_OK != 0 && self.status & (DRIVER_OK | FAILED) == 0
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        for e in &self.queue_evts {
            let _ = e.read();
        }
        self.interrupt_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.queue_config_error = false;
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: length and base read as all ones (virtio 1.x, 4.2.2).
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            _ => {
                self.bad_access("read", offset);
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.set_status(v),
            reg::SHM_SEL => {}
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, v),
            _ => self.bad_access("write", offset),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
            return self.bad_access("DriverFeatures write outside the DRIVER phase", 0x20);
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return self.bad_access("DriverFeatures page", 0x20),
        };
        let page = (u64::from(v) << shift) & self.device.avail_features();
        self.acked_features = (self.acked_features & !(0xffff_ffffu64 << shift)) | page;
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if !self.queue_config_allowed() {
            return self.bad_access("queue config outside the FEATURES_OK phase", offset);
        }
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            return self.bad_access("queue config of a missing queue", offset);
        };
        if offset != reg::QUEUE_READY && q.ready() {
            return self.bad_access("queue config of a ready queue", offset);
        }
        let bad = match offset {
            reg::QUEUE_NUM => u16::try_from(v)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|s| q.try_set_size(s))
                .is_err(),
            reg::QUEUE_READY => {
                q.set_ready(v == 1);
                false
            }
            _ => set_queue_addr(q, offset, v),
        };
        if bad {
            self.queue_config_error = true;
            self.bad_access("invalid queue config value", offset);
        }
    }

    fn notify(&mut self, v: u32) {
        match self.queue_evts.get(v as usize) {
            Some(e) => {
                TransportMetrics::inc(&self.metrics.trapped_notifications);
                if let Err(err) = e.write(1) {
                    tracing::warn!("virtio: cannot signal queue {v}: {err}");
                }
            }
            None => self.bad_access("notify of a missing queue", reg::QUEUE_NOTIFY),
        }
    }

    /// Status register write: 0 resets; otherwise bits may only be added, in spec order.
    fn set_status(&mut self, v: u32) {
        if v == 0 {
            return self.reset();
        }
        let old = self.status & !DEVICE_NEEDS_RESET;
        let v = v & !DEVICE_NEEDS_RESET;
        if v & old != old || old & FAILED != 0 {
            return self.bad_access("status write clearing bits", reg::STATUS);
        }
        if v & FAILED != 0 {
            self.status |= FAILED;
        }
        for bit in [ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK] {
            if v & bit == 0 || self.status & bit != 0 {
                continue;
            }
            if !self.advance(bit) {
                return;
            }
        }
    }

    /// Sets `bit` if the state machine allows it now. Returns whether it was set.
    fn advance(&mut self, bit: u32) -> bool {
        let cur = self.status & !(DEVICE_NEEDS_RESET | FAILED);
        let allowed = match bit {
            ACKNOWLEDGE => cur == 0,
            DRIVER => cur == ACKNOWLEDGE,
            FEATURES_OK => cur == ACKNOWLEDGE | DRIVER && self.features_acceptable(),
            DRIVER_OK => cur == ACKNOWLEDGE | DRIVER | FEATURES_OK,
            _ => false,
        };
        if !allowed {
            self.bad_access("status transition", reg::STATUS);
            return false;
        }
        self.status |= bit;
        if bit == DRIVER_OK {
            if let Err(e) = self.activate() {
                self.fail_device(e);
            } else {
                TransportMetrics::inc(&self.metrics.activations);
            }
        }
        true
    }

    /// A modern transport needs VERSION_1; everything acked was offered (masked on write).
    fn features_acceptable(&self) -> bool {
        self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) -> Result<(), VirtioError> {
        if self.queue_config_error {
            return Err(VirtioError::InvalidQueue {
                index: self.queue_sel as usize,
            });
        }
        for (index, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(VirtioError::InvalidQueue { index });
            }
        }
        self.device.activate(self.acked_features)
    }
}

/// Writes one half of a ring address. Returns true if the value is invalid (misaligned).
fn set_queue_addr(q: &mut Queue, offset: u64, v: u32) -> bool {
    use vm_memory::GuestAddress;
    let merge = |old: u64, high: bool| {
        let v = u64::from(v);
        if high {
            (old & 0xffff_ffff) | (v << 32)
        } else {
            (old & !0xffff_ffff) | v
        }
    };
    let r = match offset {
        reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => q.try_set_desc_table_address(GuestAddress(
            merge(q.desc_table(), offset == reg::QUEUE_DESC_HIGH),
        )),
        reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => q.try_set_avail_ring_address(
            GuestAddress(merge(q.avail_ring(), offset == reg::QUEUE_DRIVER_HIGH)),
        ),
        _ => q.try_set_used_ring_address(GuestAddress(merge(
            q.used_ring(),
            offset == reg::QUEUE_DEVICE_HIGH,
        ))),
    };
    r.is_err()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            return self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
        }
        if data.len() != 4 || offset & 3 != 0 {
            data.fill(0);
            return self.bad_access("non 32-bit register read", offset);
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            return self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return self.bad_access("non 32-bit register write", offset);
        };
        if offset & 3 != 0 {
            return self.bad_access("unaligned register write", offset);
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

/// Copies `config[offset..]` into `data` (bytes past the end stay 0). Helper for devices.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Probe {
        processed: AtomicUsize,
        fail: AtomicBool,
        resets: AtomicUsize,
        activated: AtomicBool,
    }

    struct Dummy(Arc<Probe>);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn avail_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 0b101
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data)
        }
        fn activate(&mut self, _acked: u64) -> Result<(), VirtioError> {
            self.0.activated.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) {
            self.0.resets.fetch_add(1, Ordering::SeqCst);
        }
        fn process_queue(
            &mut self,
            mem: &GuestMemoryMmap,
            queues: &mut [Queue],
            index: usize,
        ) -> Result<bool, VirtioError> {
            if self.0.fail.load(Ordering::SeqCst) {
                return Err(virtio_queue::Error::QueueNotReady.into());
            }
            let q = &mut queues[index];
            let mut used = false;
            while let Some(c) = q.pop_descriptor_chain(mem) {
                q.add_used(mem, c.head_index(), 0)?;
                self.0.processed.fetch_add(1, Ordering::SeqCst);
                used = true;
            }
            Ok(used)
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn transport() -> (MmioTransport, Arc<Probe>) {
        let p = Arc::new(Probe::default());
        (
            MmioTransport::new(Box::new(Dummy(p.clone())), mem()).unwrap(),
            p,
        )
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    pub(crate) fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(0, off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport) {
        negotiate_features(t, (1 << 32) | 0b1);
    }

    /// Drives the status register up to FEATURES_OK, acking `features`.
    pub(crate) fn negotiate_features(t: &mut MmioTransport, features: u64) {
        wr(t, reg::STATUS, ACKNOWLEDGE);
        wr(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, features as u32);
        wr(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    pub(crate) fn setup_queue(t: &mut MmioTransport, index: u32, mq: &MockSplitQueue<GuestMemoryMmap>) {
        wr(t, reg::QUEUE_SEL, index);
        wr(t, reg::QUEUE_NUM, 16);
        let a = |g: GuestAddress| g.0;
        wr(t, reg::QUEUE_DESC_LOW, a(mq.desc_table_addr()) as u32);
        wr(
            t,
            reg::QUEUE_DESC_HIGH,
            (a(mq.desc_table_addr()) >> 32) as u32,
        );
        wr(t, reg::QUEUE_DRIVER_LOW, a(mq.avail_addr()) as u32);
        wr(t, reg::QUEUE_DRIVER_HIGH, 0);
        wr(t, reg::QUEUE_DEVICE_LOW, a(mq.used_addr()) as u32);
        wr(t, reg::QUEUE_DEVICE_HIGH, 0);
        wr(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0b101);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 16);
        wr(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0, "missing queue");
        wr(&mut t, reg::SHM_SEL, 0);
        assert_eq!(rd(&mut t, reg::SHM_LEN_LOW), u32::MAX, "no shared memory");
        assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), 0);
        // Config space: any width, out of range reads 0.
        let mut b = [0u8; 2];
        t.read(0, CONFIG_SPACE_OFFSET + 3, &mut b);
        assert_eq!(b, [4, 5]);
        let mut b = [0xffu8; 4];
        t.read(0, CONFIG_SPACE_OFFSET + 6, &mut b);
        assert_eq!(b, [7, 8, 0, 0]);
        // Odd-sized register accesses are ignored and read as 0.
        let mut b = [0xffu8; 2];
        t.read(0, reg::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(0, reg::STATUS, &[1]);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn status_state_machine() {
        let (mut t, p) = transport();
        // Skipping ACKNOWLEDGE is refused.
        wr(&mut t, reg::STATUS, DRIVER);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        wr(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        assert_eq!(rd(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER);
        // Features not offered are masked; FEATURES_OK needs VERSION_1.
        wr(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.acked_features(), 0b101);
        wr(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(rd(&mut t, reg::STATUS) & FEATURES_OK, 0);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.acked_features(), (1 << 32) | 0b101);
        wr(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_ne!(rd(&mut t, reg::STATUS) & FEATURES_OK, 0);
        // Features are frozen after FEATURES_OK.
        wr(&mut t, reg::DRIVER_FEATURES, 0);
        assert_eq!(t.acked_features(), (1 << 32) | 0b101);
        // Clearing bits without a reset is ignored.
        wr(&mut t, reg::STATUS, ACKNOWLEDGE);
        assert_eq!(rd(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        // Reset clears everything.
        wr(&mut t, reg::QUEUE_SEL, 1);
        wr(&mut t, reg::QUEUE_NUM, 8);
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert_eq!(t.acked_features(), 0);
        assert_eq!(p.resets.load(Ordering::SeqCst), 1);
        assert_eq!(t.queues[1].size(), 16);
        // FAILED sticks until reset.
        wr(&mut t, reg::STATUS, ACKNOWLEDGE | FAILED);
        wr(&mut t, reg::STATUS, ACKNOWLEDGE | FAILED | DRIVER);
        assert_eq!(rd(&mut t, reg::STATUS), ACKNOWLEDGE | FAILED);
    }

    #[test]
    fn queue_config_only_in_features_ok_phase() {
        let (mut t, _) = transport();
        wr(&mut t, reg::QUEUE_NUM, 4);
        assert_eq!(t.queues[0].size(), 16, "queue config before FEATURES_OK");
        negotiate(&mut t);
        wr(&mut t, reg::QUEUE_NUM, 4);
        assert_eq!(t.queues[0].size(), 4);
        // Not a power of two: refused and remembered, activation then fails.
        wr(&mut t, reg::QUEUE_NUM, 5);
        assert_eq!(t.queues[0].size(), 4);
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_ne!(rd(&mut t, reg::STATUS) & DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert!(!t.is_active());
    }

    #[test]
    fn notify_processes_queue_and_interrupts() {
        let m = mem();
        let p = Arc::new(Probe::default());
        let mut t = MmioTransport::new(Box::new(Dummy(p.clone())), m.clone()).unwrap();
        let mq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        negotiate(&mut t);
        setup_queue(&mut t, 1, &mq);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        // Ready queues cannot be reconfigured.
        wr(&mut t, reg::QUEUE_NUM, 2);
        assert_eq!(t.queues[1].size(), 16);
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.is_active());
        assert!(p.activated.load(Ordering::SeqCst));
        let mut mq = mq;
        mq.add_chain(1).unwrap();
        // A trapped notify signals the queue eventfd; the event loop then processes it.
        wr(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        assert_eq!(TransportMetrics::get(&t.metrics().trapped_notifications), 1);
        t.process_queue_event(1);
        assert_eq!(p.processed.load(Ordering::SeqCst), 1);
        assert_eq!(mq.used().idx().load(), 1);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(t.irq_evt().read().unwrap(), 1);
        wr(&mut t, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        // Unknown queue index: ignored.
        wr(&mut t, reg::QUEUE_NOTIFY, 9);
        // Device error: DEVICE_NEEDS_RESET + config interrupt; no more processing.
        p.fail.store(true, Ordering::SeqCst);
        t.process_queue_event(1);
        assert_ne!(rd(&mut t, reg::STATUS) & DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        // The driver cannot clear DEVICE_NEEDS_RESET, only reset.
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_ne!(rd(&mut t, reg::STATUS) & DEVICE_NEEDS_RESET, 0);
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(TransportMetrics::get(&t.metrics().device_errors), 1);
    }

    #[test]
    fn activation_with_rings_outside_memory_needs_reset() {
        let (mut t, p) = transport();
        negotiate(&mut t);
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_DESC_LOW, 0xfff0_0000);
        wr(&mut t, reg::QUEUE_DRIVER_LOW, 0x1000);
        wr(&mut t, reg::QUEUE_DEVICE_LOW, 0x2000);
        wr(&mut t, reg::QUEUE_READY, 1);
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_ne!(rd(&mut t, reg::STATUS) & DEVICE_NEEDS_RESET, 0);
        assert!(!p.activated.load(Ordering::SeqCst));
        // Notifications of an inactive device do nothing.
        t.process_queue_event(0);
        assert_eq!(p.processed.load(Ordering::SeqCst), 0);
    }
}
