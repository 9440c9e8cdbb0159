//! Shared helpers of the probe-guest integration tests.

#![allow(dead_code)]

pub mod qemu;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Fails (never skips) when /dev/kvm is missing.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the built-in VMM tests need KVM (they do not skip silently)"
    );
}

/// Builds the probe guest once per test binary (into `CARGO_TARGET_TMPDIR/<subdir>/probe.elf`).
pub fn probe_elf(subdir: &str) -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(subdir)
            .join("probe.elf");
        let st = std::process::Command::new("bash")
            .arg(root.join("guest/probe/build.sh"))
            .arg(&out)
            .status()
            .expect("running guest/probe/build.sh");
        assert!(st.success(), "guest/probe/build.sh failed");
        out
    })
}

/// FNV-1a (32 bit), the checksum the probe computes over the initrd and disk sectors.
pub fn fnv1a32(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5u32, |h, x| {
        (h ^ u32::from(*x)).wrapping_mul(0x0100_0193)
    })
}
