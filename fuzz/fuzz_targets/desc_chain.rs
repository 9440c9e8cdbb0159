// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The descriptor-chain walk: every chain of a guest-built queue (loops, out-of-range `next`,
//! indirect tables, huge lengths) walked as the devices walk it, and parsed as a virtio-blk
//! request, with the invariants the devices rely on checked.
#![no_main]

use joey_fuzz::{one_queue, QUEUE_SIZE};
use joey_vmm_core::devices::blk::request::{collect_descriptors, parse};
use joey_vmm_core::devices::blk::MAX_DESCRIPTORS;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::GuestMemory;

fuzz_target!(|data: &[u8]| {
    let (mem, mut queue) = one_queue(data);
    let mut chains = 0;
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        chains += 1;
        assert!(
            chains <= usize::from(QUEUE_SIZE),
            "more chains than avail entries"
        );
        let all: Vec<_> = chain.clone().collect();
        let readable = chain.clone().readable().count();
        let writable = chain.clone().writable().count();
        assert!(readable + writable <= all.len());
        match collect_descriptors(chain.clone()) {
            Ok(descs) => {
                assert!(descs.len() <= MAX_DESCRIPTORS);
                assert!(descs.last().map_or(true, |d| !d.has_next()));
            }
            Err(_) => {}
        }
        if let Ok(req) = parse(&mem, chain) {
            for b in &req.data {
                assert!(mem.check_range(b.addr, b.len as usize));
            }
            assert!(mem.check_range(req.status, 1));
        }
    }
});
