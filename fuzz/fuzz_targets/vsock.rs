// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! vsock packets and the muxer: a guest-built tx queue (packets to the host: connection
//! requests, data, credit updates, shutdowns, resets, garbage) processed by the device and its
//! muxer, then an rx queue filled with what the muxer has for the guest.
#![no_main]

use std::sync::{Mutex, OnceLock};

use joey_fuzz::{guest_memory, Input, QueueInput};
use joey_vmm_core::devices::vsock::device::VsockDevice;
use joey_vmm_core::devices::vsock::VsockConfig;
use libfuzzer_sys::fuzz_target;

struct Vsock {
    _dir: tempfile::TempDir,
    dev: VsockDevice,
}

fn vsock() -> &'static Mutex<Vsock> {
    static V: OnceLock<Mutex<Vsock>> = OnceLock::new();
    V.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = VsockConfig {
            guest_cid: 3,
            uds_path: dir.path().join("vsock"),
            limits: Default::default(),
        };
        let dev = VsockDevice::new(&cfg).expect("vsock device");
        Mutex::new(Vsock { _dir: dir, dev })
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let tx = QueueInput::parse(&mut input);
    let rx = QueueInput::parse(&mut input);
    let mem = guest_memory(input.rest());
    let mut txq = tx.install(&mem, 0);
    let mut rxq = rx.install(&mem, 1);
    let mut v = vsock().lock().unwrap();
    let _ = v.dev.process_tx_queue(&mem, &mut txq);
    let _ = v.dev.process_host_events();
    let _ = v.dev.process_rx_queue(&mem, &mut rxq);
    // Each input starts from a device without connections.
    v.dev.muxer_mut().reset();
});
