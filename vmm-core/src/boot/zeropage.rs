//! Linux x86 boot protocol "zero page" (`struct boot_params`).
//!
//! Built as a 4 KiB byte image with fields written at their documented offsets
//! (Documentation/arch/x86/zero-page.rst, boot.rst), so no bindgen struct is
//! needed and every offset is visible (and unit tested) here.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{EBDA_START, HIGH_MEMORY_START, MMIO_GAP_END, MMIO_GAP_START};

/// Size of `struct boot_params`.
pub const ZERO_PAGE_SIZE: usize = 4096;
/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;
/// Maximum number of e820 entries in the zero page.
pub const E820_MAX_ENTRIES: usize = 128;

/// Field offsets inside `struct boot_params`.
pub mod off {
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const E820_TABLE: usize = 0x2d0;
}

/// "HdrS"
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// Boot sector signature.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "undefined" boot loader id.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Boot protocol version advertised (2.15).
pub const BOOT_PROTOCOL_VERSION: u16 = 0x020f;
/// loadflags bit: kernel loaded high (at 1 MiB).
pub const LOADED_HIGH: u8 = 0x01;

/// Errors building the zero page.
#[derive(Debug, thiserror::Error)]
pub enum ZeroPageError {
    #[error("too many e820 entries (max {E820_MAX_ENTRIES})")]
    E820Full,
    #[error("writing boot_params to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// e820 map for a guest with `mem_size` bytes of RAM laid out as in
/// [`crate::vstate::memory::arch_memory_regions`]: low RAM up to the EBDA,
/// reserved EBDA (holds the MP table), RAM from 1 MiB up to the MMIO gap and
/// RAM above 4 GiB for what does not fit below the gap.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut v = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > HIGH_MEMORY_START {
        v.push(E820Entry {
            addr: HIGH_MEMORY_START,
            size: low_end - HIGH_MEMORY_START,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_GAP_START {
        v.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    v
}

/// In-memory image of `struct boot_params`.
#[derive(Clone)]
pub struct BootParams {
    bytes: Box<[u8; ZERO_PAGE_SIZE]>,
}

impl Default for BootParams {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for BootParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootParams")
            .field("e820_entries", &self.bytes[off::E820_ENTRIES])
            .finish()
    }
}

impl BootParams {
    /// A zero page with the setup header fields every 64-bit boot needs:
    /// boot_flag 0xAA55, "HdrS", version, type_of_loader 0xff, loadflags.
    pub fn new() -> Self {
        let mut bp = BootParams {
            bytes: Box::new([0u8; ZERO_PAGE_SIZE]),
        };
        bp.put_u16(off::BOOT_FLAG, BOOT_FLAG_MAGIC);
        bp.put_u32(off::HEADER, HDRS_MAGIC);
        bp.put_u16(off::VERSION, BOOT_PROTOCOL_VERSION);
        bp.bytes[off::TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED;
        bp.bytes[off::LOADFLAGS] = LOADED_HIGH;
        bp.put_u32(off::KERNEL_ALIGNMENT, 0x0100_0000);
        bp.put_u32(off::INITRD_ADDR_MAX, (MMIO_GAP_START - 1) as u32);
        bp
    }

    fn put_u16(&mut self, o: usize, v: u16) {
        self.bytes[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, o: usize, v: u32) {
        self.bytes[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, o: usize, v: u64) {
        self.bytes[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Copies a bzImage's own setup header (from offset 0x1f1) into the zero page, as the boot
    /// protocol asks, then re-applies what the loader owns: loader type, LOADED_HIGH, the
    /// command line and the initrd.
    pub fn apply_setup_header(&mut self, hdr: &[u8], cmdline: (u64, u32), initrd: Option<(u64, u64)>) {
        let start = 0x1f1;
        let n = hdr.len().min(ZERO_PAGE_SIZE - start);
        self.bytes[start..start + n].copy_from_slice(&hdr[..n]);
        self.bytes[off::TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED;
        self.bytes[off::LOADFLAGS] |= LOADED_HIGH;
        self.set_cmdline(cmdline.0, cmdline.1);
        if let Some((a, s)) = initrd {
            self.set_initrd(a, s);
        }
    }

    /// Reads a little-endian u32 at `o` (for tests and diagnostics).
    pub fn get_u32(&self, o: usize) -> u32 {
        u32::from_le_bytes(self.bytes[o..o + 4].try_into().unwrap_or([0; 4]))
    }

    /// Raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..]
    }

    /// Appends an e820 entry.
    pub fn add_e820(&mut self, e: E820Entry) -> Result<(), ZeroPageError> {
        let n = self.bytes[off::E820_ENTRIES] as usize;
        if n >= E820_MAX_ENTRIES {
            return Err(ZeroPageError::E820Full);
        }
        let o = off::E820_TABLE + n * 20;
        self.put_u64(o, e.addr);
        self.put_u64(o + 8, e.size);
        self.put_u32(o + 16, e.kind);
        self.bytes[off::E820_ENTRIES] = (n + 1) as u8;
        Ok(())
    }

    /// Sets the command line pointer and its length (bytes, without the NUL).
    pub fn set_cmdline(&mut self, addr: u64, len: u32) {
        self.put_u32(off::CMD_LINE_PTR, addr as u32);
        self.put_u32(off::EXT_CMD_LINE_PTR, (addr >> 32) as u32);
        self.put_u32(off::CMDLINE_SIZE, len);
    }

    /// Sets the initrd location.
    pub fn set_initrd(&mut self, addr: u64, size: u64) {
        self.put_u32(off::RAMDISK_IMAGE, addr as u32);
        self.put_u32(off::EXT_RAMDISK_IMAGE, (addr >> 32) as u32);
        self.put_u32(off::RAMDISK_SIZE, size as u32);
        self.put_u32(off::EXT_RAMDISK_SIZE, (size >> 32) as u32);
    }

    /// Writes the zero page to guest memory at `addr`.
    pub fn write_to(&self, mem: &GuestMemoryMmap, addr: GuestAddress) -> Result<(), ZeroPageError> {
        mem.write_slice(&self.bytes[..], addr)?;
        Ok(())
    }
}

/// Builds the zero page for a guest of `mem_size` bytes.
pub fn build(
    mem_size: u64,
    cmdline: (u64, u32),
    initrd: Option<(u64, u64)>,
) -> Result<BootParams, ZeroPageError> {
    let mut bp = BootParams::new();
    for e in e820_map(mem_size) {
        bp.add_e820(e)?;
    }
    bp.set_cmdline(cmdline.0, cmdline.1);
    if let Some((a, s)) = initrd {
        bp.set_initrd(a, s);
    }
    Ok(bp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e820_at(bp: &BootParams, i: usize) -> E820Entry {
        let b = bp.as_bytes();
        let o = off::E820_TABLE + i * 20;
        E820Entry {
            addr: u64::from_le_bytes(b[o..o + 8].try_into().unwrap()),
            size: u64::from_le_bytes(b[o + 8..o + 16].try_into().unwrap()),
            kind: u32::from_le_bytes(b[o + 16..o + 20].try_into().unwrap()),
        }
    }

    #[test]
    fn header_fields() {
        let bp = build(128 << 20, (0x20000, 17), Some((0x7000000, 0x1234))).unwrap();
        let b = bp.as_bytes();
        assert_eq!(&b[0x202..0x206], b"HdrS");
        assert_eq!(u16::from_le_bytes([b[0x1fe], b[0x1ff]]), 0xaa55);
        assert_eq!(b[0x210], 0xff);
        assert_eq!(bp.get_u32(0x228), 0x20000);
        assert_eq!(bp.get_u32(0x238), 17);
        assert_eq!(bp.get_u32(0x218), 0x7000000);
        assert_eq!(bp.get_u32(0x21c), 0x1234);
        assert_eq!(bp.get_u32(0x0c0), 0);
    }

    #[test]
    fn e820_small_guest() {
        let bp = build(128 << 20, (0x20000, 0), None).unwrap();
        assert_eq!(bp.as_bytes()[0x1e8], 3);
        assert_eq!(
            e820_at(&bp, 0),
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(
            e820_at(&bp, 1),
            E820Entry {
                addr: 0x9fc00,
                size: 0x400,
                kind: E820_RESERVED
            }
        );
        assert_eq!(
            e820_at(&bp, 2),
            E820Entry {
                addr: 0x100000,
                size: (128 << 20) - 0x100000,
                kind: E820_RAM
            }
        );
        let usable: u64 = e820_map(128 << 20)
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert!(((128 << 20) - (1 << 20)..=128 << 20).contains(&usable));
        assert_eq!(bp.get_u32(0x218), 0);
    }

    #[test]
    fn e820_above_gap() {
        let m = e820_map(4 << 30);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[2],
            E820Entry {
                addr: 0x100000,
                size: 0xc000_0000 - 0x100000,
                kind: E820_RAM
            }
        );
        assert_eq!(
            m[3],
            E820Entry {
                addr: 1 << 32,
                size: 1 << 30,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn e820_table_full() {
        let mut bp = BootParams::new();
        for i in 0..E820_MAX_ENTRIES {
            bp.add_e820(E820Entry {
                addr: i as u64,
                size: 1,
                kind: 1,
            })
            .unwrap();
        }
        assert!(matches!(
            bp.add_e820(E820Entry {
                addr: 0,
                size: 1,
                kind: 1
            }),
            Err(ZeroPageError::E820Full)
        ));
    }
}
