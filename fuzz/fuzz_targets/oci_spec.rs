// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The shim's OCI spec handling: a bundle's `config.json` parsed (`spec::parse`), its network
//! namespace looked up and the spec translated for the guest (`spec::translate`: rootfs and
//! bind mounts rewritten to the shared directory); the same bytes parsed as an exec process
//! spec (`spec::parse_process`). The code is the `joey-oci` crate, which the shim re-exports as
//! `joey_shim::shim::spec`: only serde_json and oci-spec get into the sanitizer build.
#![no_main]

use joey_oci as spec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = spec::parse(data, "config.json") {
        let _ = s.network_namespace();
        if let Ok(g) = spec::translate(&s, "fuzz-container") {
            // What goes to the guest is JSON again.
            let _: serde_json::Value =
                serde_json::from_str(&g.json).expect("translated spec is JSON");
        }
    }
    let _ = spec::parse_process(data);
});
