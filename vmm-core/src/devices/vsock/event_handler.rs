// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! In-process virtio-vsock: [`VsockDevice`] served through the built-in VMM's virtio-mmio
//! transport. The device event loop watches the queue ioeventfds and the muxer's epoll fd.

use std::os::fd::RawFd;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::device::{DeviceError, VsockDevice, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use super::VsockConfig;
use crate::devices::virtio::mmio::read_config_bytes;
use crate::devices::virtio::{VirtioDevice, VirtioError, TYPE_VSOCK, VIRTIO_F_VERSION_1};

/// The vsock device as a [`VirtioDevice`].
#[derive(Debug)]
pub struct VirtioVsock {
    device: VsockDevice,
    queue_sizes: [u16; NUM_QUEUES],
}

impl VirtioVsock {
    /// Creates the device and binds its hybrid-vsock listener.
    pub fn new(cfg: &VsockConfig) -> Result<Self, DeviceError> {
        Ok(Self::with_device(VsockDevice::new(cfg)?))
    }

    /// Wraps an existing device.
    pub fn with_device(device: VsockDevice) -> Self {
        VirtioVsock {
            device,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
        }
    }

    /// The device model.
    pub fn device(&self) -> &VsockDevice {
        &self.device
    }

    fn rx(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue]) -> Result<bool, DeviceError> {
        match queues.get_mut(RX_QUEUE) {
            Some(q) => self.device.process_rx_queue(mem, q),
            None => Ok(false),
        }
    }

    fn tx(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue]) -> Result<bool, DeviceError> {
        let used = match queues.get_mut(TX_QUEUE) {
            Some(q) => self.device.process_tx_queue(mem, q)?,
            None => false,
        };
        if used {
            // Guest packets may have made host sockets ready (new streams, credit).
            self.device.process_host_events()?;
        }
        Ok(used)
    }
}

impl VirtioDevice for VirtioVsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.device.config_space(), offset, data)
    }

    fn reset(&mut self) {
        // The driver forgot every connection; so do we (host streams get closed).
        self.device.muxer_mut().reset();
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool, VirtioError> {
        let tx_used = if index == TX_QUEUE {
            self.tx(mem, queues)?
        } else {
            false
        };
        let rx_used = if index == TX_QUEUE || index == RX_QUEUE {
            self.rx(mem, queues)?
        } else {
            false
        };
        Ok(tx_used || rx_used)
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.device.event_fd())
    }

    fn process_event(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: Option<&mut [Queue]>,
    ) -> Result<bool, VirtioError> {
        self.device.process_host_events()?;
        match queues {
            // Host work, or a rate limiter's tokens are back (tx may have been held).
            Some(q) => {
                let tx = self.tx(mem, q)?;
                Ok(self.rx(mem, q)? | tx)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_view_of_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let v = VirtioVsock::new(&VsockConfig {
            guest_cid: 42,
            uds_path: dir.path().join("v.sock"),
            limits: Default::default(),
        })
        .unwrap();
        assert_eq!(v.device_type(), 19);
        assert_eq!(v.queue_max_sizes().len(), 3);
        assert_eq!(v.avail_features(), 1 << 32);
        let mut cid = [0u8; 8];
        v.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 42);
        let mut tail = [0xffu8; 4];
        v.read_config(6, &mut tail);
        assert_eq!(tail, [0, 0, 0xff, 0xff]);
        assert!(v.event_fd().is_some());
    }
}
