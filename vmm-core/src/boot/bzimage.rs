//! bzImage loader (Linux x86 boot protocol ≥ 2.12, 64-bit entry).
//!
//! The protected-mode kernel (everything after the real-mode setup sectors) is copied to
//! 1 MiB; the 64-bit entry point is 0x200 bytes into it. The kernel's own setup header is
//! returned so the zero page can carry it (the boot protocol asks the loader to copy it).

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::elf::KernelLoadInfo;
use super::layout::HIGH_MEMORY_START;

/// Offset of the setup header in the image (and in `boot_params`).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
const SETUP_SECTS: usize = 0x1f1;
const BOOT_FLAG: usize = 0x1fe;
const JUMP_END_BYTE: usize = 0x201;
const HEADER_MAGIC: usize = 0x202;
const VERSION: usize = 0x206;
const LOADFLAGS: usize = 0x211;
const XLOADFLAGS: usize = 0x236;
const INIT_SIZE: usize = 0x260;
/// Boot protocol 2.12 introduced xloadflags (XLF_KERNEL_64).
const MIN_VERSION: u16 = 0x020c;
const LOADED_HIGH: u8 = 0x01;
const XLF_KERNEL_64: u16 = 0x01;
/// 64-bit entry: `startup_64` is 0x200 bytes past the protected-mode start.
const ENTRY_64_OFFSET: u64 = 0x200;

/// Errors of the bzImage loader.
#[derive(Debug, thiserror::Error)]
pub enum BzImageError {
    #[error("bzImage truncated: need {needed} bytes, file has {len}")]
    Truncated { needed: u64, len: u64 },
    #[error("not a bzImage: missing boot flag 0xAA55 or \"HdrS\" magic")]
    NotBzImage,
    #[error("boot protocol {0:#06x} too old (need >= 2.12 for a 64-bit entry)")]
    OldProtocol(u16),
    #[error("kernel is not loadable high (loadflags LOADED_HIGH clear)")]
    NotLoadedHigh,
    #[error("kernel has no 64-bit entry point (xloadflags XLF_KERNEL_64 clear)")]
    No64BitEntry,
    #[error("kernel of {size:#x} bytes (init_size) does not fit in guest memory at {addr:#x}")]
    OutsideMemory { addr: u64, size: u64 },
    #[error("writing the kernel to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// A parsed bzImage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BzImage<'a> {
    /// The protected-mode kernel.
    pub payload: &'a [u8],
    /// The setup header bytes, `0x1f1..0x202 + jump end` of the image.
    pub setup_header: &'a [u8],
    /// Memory the kernel needs from its load address while decompressing and booting.
    pub init_size: u64,
    pub version: u16,
}

fn rd_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn rd_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Whether `image` looks like a bzImage (boot flag and "HdrS").
pub fn is_bzimage(image: &[u8]) -> bool {
    image.len() > HEADER_MAGIC + 4
        && rd_u16(image, BOOT_FLAG) == 0xaa55
        && &image[HEADER_MAGIC..HEADER_MAGIC + 4] == b"HdrS"
}

/// Parses and validates the setup header of `image`.
pub fn parse(image: &[u8]) -> Result<BzImage<'_>, BzImageError> {
    let len = image.len() as u64;
    let need = |n: usize| {
        if image.len() < n {
            Err(BzImageError::Truncated {
                needed: n as u64,
                len,
            })
        } else {
            Ok(())
        }
    };
    need(INIT_SIZE + 4)?;
    if !is_bzimage(image) {
        return Err(BzImageError::NotBzImage);
    }
    let version = rd_u16(image, VERSION);
    if version < MIN_VERSION {
        return Err(BzImageError::OldProtocol(version));
    }
    if image[LOADFLAGS] & LOADED_HIGH == 0 {
        return Err(BzImageError::NotLoadedHigh);
    }
    if rd_u16(image, XLOADFLAGS) & XLF_KERNEL_64 == 0 {
        return Err(BzImageError::No64BitEntry);
    }
    let setup_sects = match image[SETUP_SECTS] {
        0 => 4,
        n => n as usize,
    };
    let payload_off = (setup_sects + 1) * 512;
    need(payload_off + ENTRY_64_OFFSET as usize)?;
    let header_end = (JUMP_END_BYTE + 1 + image[JUMP_END_BYTE] as usize).min(payload_off);
    Ok(BzImage {
        payload: &image[payload_off..],
        setup_header: &image[SETUP_HEADER_OFFSET..header_end],
        init_size: u64::from(rd_u32(image, INIT_SIZE)),
        version,
    })
}

/// Loads the protected-mode kernel at 1 MiB. Returns where it went and the setup header.
pub fn load(mem: &GuestMemoryMmap, image: &[u8]) -> Result<(KernelLoadInfo, Vec<u8>), BzImageError> {
    let bz = parse(image)?;
    let addr = HIGH_MEMORY_START;
    let size = bz.init_size.max(bz.payload.len() as u64);
    let last = addr.checked_add(size.saturating_sub(1));
    let fits = match last {
        Some(last) => match (mem.find_region(GuestAddress(addr)), mem.find_region(GuestAddress(last))) {
            (Some(a), Some(b)) => std::ptr::eq(a, b),
            _ => false,
        },
        None => false,
    };
    if !fits {
        return Err(BzImageError::OutsideMemory { addr, size });
    }
    mem.write_slice(bz.payload, GuestAddress(addr))?;
    tracing::debug!(
        version = format_args!("{:#06x}", bz.version),
        payload = bz.payload.len(),
        init_size = bz.init_size,
        "loaded bzImage"
    );
    Ok((
        KernelLoadInfo {
            entry: GuestAddress(addr + ENTRY_64_OFFSET),
            start: GuestAddress(addr),
            end: GuestAddress(addr + size),
        },
        bz.setup_header.to_vec(),
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid bzImage: `setup_sects` real-mode sectors then `payload`.
    pub(crate) fn make_bzimage(setup_sects: u8, payload: &[u8], init_size: u32) -> Vec<u8> {
        let sects = if setup_sects == 0 { 4 } else { setup_sects as usize };
        let mut v = vec![0u8; (sects + 1) * 512];
        v[SETUP_SECTS] = setup_sects;
        v[BOOT_FLAG..BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
        v[JUMP_END_BYTE] = 0x6a;
        v[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        v[VERSION..VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        v[LOADFLAGS] = LOADED_HIGH;
        v[XLOADFLAGS..XLOADFLAGS + 2].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        v[INIT_SIZE..INIT_SIZE + 4].copy_from_slice(&init_size.to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn mem(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)]).unwrap()
    }

    #[test]
    fn loads_payload_at_1mib_with_64bit_entry() {
        let payload: Vec<u8> = (0..0x400u32).map(|i| i as u8).collect();
        let img = make_bzimage(2, &payload, 0x10000);
        let m = mem(4);
        let (info, hdr) = load(&m, &img).unwrap();
        assert_eq!(info.entry, GuestAddress(0x100200));
        assert_eq!(info.start, GuestAddress(0x100000));
        assert_eq!(info.end, GuestAddress(0x110000));
        let mut back = vec![0u8; payload.len()];
        m.read_slice(&mut back, GuestAddress(0x100000)).unwrap();
        assert_eq!(back, payload);
        assert_eq!(hdr.len(), 0x202 + 0x6a - 0x1f1);
        assert_eq!(&hdr[0x202 - 0x1f1..0x206 - 0x1f1], b"HdrS");
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let img = make_bzimage(0, &[0x90; 0x300], 0x1000);
        assert_eq!(parse(&img).unwrap().payload.len(), 0x300);
    }

    #[test]
    fn rejects_malformed_images() {
        assert!(matches!(parse(&[0u8; 100]), Err(BzImageError::Truncated { .. })));
        let elf_like = vec![0x7fu8; 0x1000];
        assert!(matches!(parse(&elf_like), Err(BzImageError::NotBzImage)));
        let mut old = make_bzimage(1, &[0; 0x300], 0x1000);
        old[VERSION..VERSION + 2].copy_from_slice(&0x0204u16.to_le_bytes());
        assert!(matches!(parse(&old), Err(BzImageError::OldProtocol(0x0204))));
        let mut low = make_bzimage(1, &[0; 0x300], 0x1000);
        low[LOADFLAGS] = 0;
        assert!(matches!(parse(&low), Err(BzImageError::NotLoadedHigh)));
        let mut no64 = make_bzimage(1, &[0; 0x300], 0x1000);
        no64[XLOADFLAGS] = 0;
        assert!(matches!(parse(&no64), Err(BzImageError::No64BitEntry)));
        // setup_sects pointing past the end of the file.
        let mut short = make_bzimage(1, &[0; 0x300], 0x1000);
        short[SETUP_SECTS] = 200;
        assert!(matches!(parse(&short), Err(BzImageError::Truncated { .. })));
    }

    #[test]
    fn kernel_larger_than_memory_is_refused() {
        let img = make_bzimage(1, &[0; 0x300], 64 << 20);
        assert!(matches!(load(&mem(16), &img), Err(BzImageError::OutsideMemory { .. })));
    }

    #[test]
    fn never_panics_on_garbage() {
        let mut x: u32 = 12345;
        for len in [0usize, 1, 0x1f0, 0x263, 0x264, 0x400, 0x1000] {
            for _ in 0..50 {
                let v: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    })
                    .collect();
                let _ = parse(&v);
                let mut hv = make_bzimage(1, &[0; 0x300], 0x1000);
                if len < hv.len() {
                    hv.truncate(len);
                }
                let _ = parse(&hv);
            }
        }
    }
}
