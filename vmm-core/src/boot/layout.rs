//! x86_64 guest physical memory layout used by the built-in VMM.
//!
//! Mirrors Firecracker's layout so that a Linux `vmlinux` (or the probe guest)
//! finds everything where the 64-bit boot protocol expects it.

/// GDT used for the 64-bit entry (4 entries: null, code, data, TSS).
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Maximum number of GDT entries written by the VMM.
pub const BOOT_GDT_MAX: usize = 4;
/// Empty IDT (the guest installs its own).
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// Linux boot protocol "zero page" (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer handed to the guest (the guest sets its own stack).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First page directory; `IDENTITY_MAP_GIB` consecutive page directories follow.
pub const PD_ADDR: u64 = 0xb000;
/// Number of GiB identity mapped with 2 MiB pages at entry.
pub const IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line location.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Maximum command line length including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area; low RAM reported in e820 ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// MP table (floating pointer + configuration table) location.
pub const MPTABLE_START: u64 = EBDA_START;
/// Start of "high" memory: the kernel must be loaded at or above this address.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// 32-bit MMIO gap (no RAM here): [3 GiB, 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Address of the 3-page TSS region KVM needs on Intel (inside the MMIO gap).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Address of the identity-map page KVM needs on Intel (just below the TSS).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Smallest guest memory accepted (MiB).
pub const MIN_MEMORY_MIB: u32 = 16;
/// Page size used for initrd alignment.
pub const PAGE_SIZE: u64 = 0x1000;
/// Legacy serial COM1 port base.
pub const COM1_PORT: u64 = 0x3f8;
/// Legacy serial COM1 IRQ (GSI).
pub const COM1_IRQ: u32 = 4;
/// i8042 keyboard controller port base (command register at +4 = 0x64).
pub const I8042_PORT: u64 = 0x60;
/// First virtio-mmio device window (inside the 32-bit MMIO gap); devices follow every
/// [`VIRTIO_MMIO_SIZE`] bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI (IOAPIC pin) of the first virtio-mmio device.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last GSI usable by virtio-mmio devices (the IOAPIC has pins 0..=23).
pub const VIRTIO_IRQ_LAST: u32 = 23;
/// Most virtio-mmio devices of one VM (one IRQ each).
pub const MAX_VIRTIO_DEVICES: usize = (VIRTIO_IRQ_LAST - VIRTIO_IRQ_BASE + 1) as usize;

// The boot data areas must not overlap.
const _: () = assert!(BOOT_IDT_ADDR + 8 <= ZERO_PAGE_ADDR);
const _: () = assert!(ZERO_PAGE_ADDR + 4096 <= BOOT_STACK_POINTER);
const _: () = assert!(BOOT_STACK_POINTER < PML4_ADDR);
const _: () = assert!(PD_ADDR + IDENTITY_MAP_GIB * 0x1000 <= CMDLINE_ADDR);
const _: () = assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START);
// The virtio-mmio windows lie in the MMIO gap, below the KVM TSS / identity map pages.
const _: () = assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START);
const _: () = assert!(
    VIRTIO_MMIO_BASE + MAX_VIRTIO_DEVICES as u64 * VIRTIO_MMIO_SIZE <= KVM_IDENTITY_MAP_ADDRESS
);
const _: () = assert!(VIRTIO_IRQ_BASE > COM1_IRQ);
