// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-blk as a [`VirtioDevice`]: one request queue, handled on the device event loop.

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::device::Block;
use crate::devices::virtio::mmio::read_config_bytes;
use crate::devices::virtio::{VirtioDevice, VirtioError, TYPE_BLOCK};

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.queue_sizes()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config_bytes(), offset, data)
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool, VirtioError> {
        match queues.get_mut(index) {
            Some(q) if index == 0 => Ok(Block::process_queue(self, mem, q)?),
            _ => Ok(false),
        }
    }

    /// The rate limiter's timer (only when limited).
    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        self.limiter_fd()
    }

    /// The limiter's timer fired: the requests it held back go now.
    fn process_event(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: Option<&mut [Queue]>,
    ) -> Result<bool, VirtioError> {
        let fired = self.handle_limiter_event()?;
        match queues.and_then(|q| q.get_mut(0)) {
            Some(q) if fired => Ok(Block::process_queue(self, mem, q)?),
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::blk::BlockConfig;
    use std::io::Write;

    #[test]
    fn virtio_view_of_the_device() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        let b = Block::new(
            &BlockConfig {
                path: f.path().to_path_buf(),
                read_only: true,
                limits: Default::default(),
            },
            "id",
        )
        .unwrap();
        assert_eq!(b.device_type(), 2);
        assert_eq!(b.queue_max_sizes(), &[256]);
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut seg = [0u8; 4];
        b.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), 62);
        assert_ne!(b.avail_features() & (1 << 32), 0);
    }
}
