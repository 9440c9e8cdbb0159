// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-blk requests: a guest-built request queue processed by the device on a 64 KiB disk
//! image (request parsing, bounds checks against the capacity, reads/writes, GET_ID, status).
#![no_main]

use std::sync::Mutex;
use std::sync::OnceLock;

use joey_fuzz::one_queue;
use joey_vmm_core::devices::blk::{Block, BlockConfig};
use libfuzzer_sys::fuzz_target;

struct Disk {
    _dir: tempfile::TempDir,
    block: Block,
}

fn disk() -> &'static Mutex<Disk> {
    static DISK: OnceLock<Mutex<Disk>> = OnceLock::new();
    DISK.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0x5a; 64 * 1024]).expect("disk image");
        let cfg = BlockConfig {
            path,
            read_only: false,
            limits: Default::default(),
        };
        let block = Block::new(&cfg, "fuzz-disk").expect("block device");
        Mutex::new(Disk { _dir: dir, block })
    })
}

fuzz_target!(|data: &[u8]| {
    let (mem, mut queue) = one_queue(data);
    let mut d = disk().lock().unwrap();
    let _ = d.block.process_queue(&mem, &mut queue);
});
