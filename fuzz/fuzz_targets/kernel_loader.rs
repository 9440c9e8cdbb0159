// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The guest kernel loaders: a bzImage (setup header, protocol version, sizes) or an ELF
//! (program headers, segment bounds) parsed and loaded into 8 MiB of guest memory.
#![no_main]

use std::sync::OnceLock;

use joey_vmm_core::boot::{bzimage, elf};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fn mem() -> &'static GuestMemoryMmap {
    static M: OnceLock<GuestMemoryMmap> = OnceLock::new();
    M.get_or_init(|| {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("guest memory")
    })
}

fuzz_target!(|data: &[u8]| {
    if bzimage::is_bzimage(data) {
        let _ = bzimage::parse(data);
        let _ = bzimage::load(mem(), data);
    } else {
        let _ = elf::parse(data);
        let _ = elf::load_elf(mem(), data);
    }
});
