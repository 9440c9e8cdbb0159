// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-net frames: the chains of a guest-built queue gathered as tx frames (header +
//! frame, bounded buffer) and used as rx buffers for a frame taken from the input (header
//! written, frame scattered, capacity checked).
#![no_main]

use joey_fuzz::{guest_memory, Input, QueueInput};
use joey_vmm_core::devices::net::device::{
    gather_tx, rx_header, scatter_rx, MAX_BUFFER_LEN, MAX_FRAME_LEN,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let q = QueueInput::parse(&mut input);
    let frame_len = usize::from(input.u16());
    let frame = input.bytes(frame_len.min(MAX_FRAME_LEN));
    // What the device writes into an rx chain: the header, then the frame.
    let mut data = rx_header().to_vec();
    data.extend_from_slice(frame);
    let mem = guest_memory(input.rest());
    let mut queue = q.install(&mem, 0);
    let mut buf = vec![0u8; MAX_BUFFER_LEN];
    let mut rx = false;
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        if rx {
            if let Ok(n) = scatter_rx(&mem, chain, &data) {
                assert!(n as usize <= MAX_BUFFER_LEN);
            }
        } else if let Ok(n) = gather_tx(&mem, chain, &mut buf) {
            assert!(n <= MAX_BUFFER_LEN);
        }
        rx = !rx;
    }
});
