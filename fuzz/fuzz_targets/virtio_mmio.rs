// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The virtio-mmio transport: a sequence of guest register reads and writes (any offset, any
//! width: status and feature negotiation, queue selection and addresses, config space, notify,
//! interrupt ack) and queue notifications, on a transport serving a virtio-blk device; the
//! queues the guest sets up point into memory filled from the input.
#![no_main]

use std::sync::OnceLock;

use joey_fuzz::{guest_memory, Input};
use joey_vmm_core::devices::blk::{Block, BlockConfig};
use joey_vmm_core::devices::virtio::mmio::MmioTransport;
use joey_vmm_core::vmm::bus::BusDevice;
use libfuzzer_sys::fuzz_target;

fn disk() -> &'static tempfile::TempDir {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("disk.img"), vec![0u8; 16 * 1024]).expect("disk image");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let n = usize::from(input.u8());
    let ops: Vec<(u8, u16, u32)> = (0..n)
        .map(|_| (input.u8(), input.u16(), input.u32()))
        .collect();
    let mem = guest_memory(input.rest());
    let cfg = BlockConfig {
        path: disk().path().join("disk.img"),
        read_only: true,
        limits: Default::default(),
    };
    let block = Block::new(&cfg, "fuzz").expect("block device");
    let Ok(mut tr) = MmioTransport::new(Box::new(block), mem) else {
        return;
    };
    for (kind, offset, value) in ops {
        let offset = u64::from(offset & 0x1ff);
        let width = [1usize, 2, 4, 8][usize::from(kind >> 2) & 3];
        match kind & 3 {
            0 => {
                let mut buf = [0u8; 8];
                tr.read(0, offset, &mut buf[..width]);
            }
            1 | 2 => {
                let bytes = u64::from(value).to_le_bytes();
                tr.write(0, offset, &bytes[..width]);
            }
            _ => {
                let index = usize::from(value as u8 & 3);
                if let Some(evt) = tr.queue_evts().get(index) {
                    let _ = evt.write(1);
                }
                tr.process_queue_event(index);
                let _ = tr.irq_evt().read();
            }
        }
    }
});
