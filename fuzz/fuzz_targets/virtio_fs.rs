// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! virtio-fs requests: a guest-built request queue (FUSE messages) processed by joey's FUSE
//! server on a read-only export of a small temporary directory (nothing on the host can be
//! changed, and the export keeps lookups inside the directory).
#![no_main]

use std::sync::OnceLock;

use joey_fuzz::one_queue;
use joey_vmm_core::devices::fs::device::process_queue;
use joey_vmm_core::devices::fs::filesystem::{new_server, FsServer};
use joey_vmm_core::devices::fs::metrics::FsMetrics;
use joey_vmm_core::devices::fs::FsConfig;
use libfuzzer_sys::fuzz_target;

struct Export {
    _dir: tempfile::TempDir,
    server: FsServer,
    metrics: FsMetrics,
}

fn export() -> &'static Export {
    static E: OnceLock<Export> = OnceLock::new();
    E.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("d")).expect("dir");
        std::fs::write(dir.path().join("d/f"), b"hello").expect("file");
        std::os::unix::fs::symlink("d/f", dir.path().join("l")).expect("symlink");
        let server = new_server(&FsConfig {
            read_only: true,
            ..FsConfig::new(dir.path())
        })
        .expect("fs server");
        Export {
            _dir: dir,
            server,
            metrics: FsMetrics::default(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let e = export();
    let (mem, mut queue) = one_queue(data);
    let _ = process_queue(&e.server, &mem, &mut queue, &e.metrics);
});
