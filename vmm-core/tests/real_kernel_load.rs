//! Loads the project's real guest kernel (build/guest/{bzImage,vmlinux}, built by
//! `make guest`) into a built-in VMM exactly as a boot would, and checks the boot data.
//! The VM is not started: this host's PVM-type KVM cannot run an unmodified Linux kernel
//! (boots are proven with the probe guest; see tests/probe*.rs).

use std::path::{Path, PathBuf};

use joey_vmm_core::boot::bzimage;
use joey_vmm_core::vmm::{VmConfig, Vmm};
use vm_memory::{Bytes, GuestAddress};

fn guest_file(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make guest` first (this test does not skip)",
        p.display()
    );
    p
}

fn create(kernel: PathBuf, dir: &Path) -> Vmm {
    Vmm::create(VmConfig {
        vcpus: 2,
        memory_mib: 256,
        kernel,
        initrd: Some(guest_file("initrd.img")),
        cmdline: "console=ttyS0 reboot=k panic=-1".into(),
        serial_log: dir.join("serial.log"),
        vsock: None,
        virtio_fs: None,
        net_devices: Vec::new(),
        block_devices: Vec::new(),
    })
    .expect("creating a VM with the real kernel")
}

#[test]
fn bzimage_is_loaded_per_the_boot_protocol() {
    let path = guest_file("bzImage");
    let image = std::fs::read(&path).unwrap();
    let bz = bzimage::parse(&image).expect("our bzImage parses");
    assert!(bz.version >= 0x020c, "boot protocol {:#x}", bz.version);
    let dir = tempfile::tempdir().unwrap();
    let vmm = create(path, dir.path());
    let setup = vmm.boot_setup();
    assert_eq!(setup.entry, GuestAddress(0x100200));
    // The protected-mode kernel sits at 1 MiB, byte for byte.
    let mut head = vec![0u8; 4096];
    vmm.guest_memory().read_slice(&mut head, GuestAddress(0x100000)).unwrap();
    assert_eq!(&head[..], &bz.payload[..4096]);
    // The zero page carries the kernel's own setup header, with our loader fields.
    let mut zp = vec![0u8; 0x300];
    vmm.guest_memory().read_slice(&mut zp, GuestAddress(0x7000)).unwrap();
    assert_eq!(&zp[0x202..0x206], b"HdrS");
    assert_eq!(u16::from_le_bytes([zp[0x206], zp[0x207]]), bz.version);
    assert_eq!(zp[0x210], 0xff, "type_of_loader");
    assert_eq!(u32::from_le_bytes(zp[0x228..0x22c].try_into().unwrap()), 0x20000, "cmd_line_ptr");
    let (initrd_addr, initrd_size) = setup.initrd.expect("initrd loaded");
    assert_eq!(u32::from_le_bytes(zp[0x218..0x21c].try_into().unwrap()) as u64, initrd_addr);
    assert_eq!(
        initrd_size,
        std::fs::metadata(guest_file("initrd.img")).unwrap().len()
    );
    assert!(initrd_addr >= setup.kernel_end.0, "initrd overlaps the kernel");
}

#[test]
fn vmlinux_elf_is_loaded_with_its_entry_point() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = create(guest_file("vmlinux"), dir.path());
    let setup = vmm.boot_setup();
    assert!(setup.entry.0 >= 0x100000 && setup.entry.0 < setup.kernel_end.0, "{setup:?}");
    let mut zp = vec![0u8; 0x300];
    vmm.guest_memory().read_slice(&mut zp, GuestAddress(0x7000)).unwrap();
    assert_eq!(&zp[0x202..0x206], b"HdrS");
}
