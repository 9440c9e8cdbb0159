//! Minimal ELF64 (`vmlinux`-style) loader.
//!
//! Parses the ELF64 header and the program headers by hand (no external
//! parser), validates every field that is used, and copies `PT_LOAD` segments
//! to their physical addresses (`p_paddr`) in guest memory, zero-filling BSS.
//! A malformed file yields a typed [`ElfError`], never a panic.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::layout::HIGH_MEMORY_START;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
/// Size of the ELF64 file header.
pub const EHDR_SIZE: usize = 64;
/// Size of one ELF64 program header.
pub const PHDR_SIZE: usize = 56;
/// Upper bound on program headers we are willing to look at.
pub const MAX_PHDRS: usize = 128;

/// Errors of the ELF loader.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("kernel image truncated: need {needed} bytes, file has {len}")]
    Truncated { needed: u64, len: u64 },
    #[error("bad ELF magic")]
    BadMagic,
    #[error("unsupported ELF class {0} (need ELFCLASS64)")]
    BadClass(u8),
    #[error("unsupported ELF data encoding {0} (need little endian)")]
    BadEndian(u8),
    #[error("unsupported ELF type {0} (need ET_EXEC)")]
    BadType(u16),
    #[error("unsupported ELF machine {0} (need x86_64)")]
    BadMachine(u16),
    #[error("bad program header entry size {0}")]
    BadPhentsize(u16),
    #[error("too many program headers ({0})")]
    TooManyPhdrs(u16),
    #[error("no PT_LOAD segment")]
    NoLoadSegment,
    #[error("segment {index}: file size {filesz:#x} larger than memory size {memsz:#x}")]
    FileSizeAboveMemSize {
        index: usize,
        filesz: u64,
        memsz: u64,
    },
    #[error("segment {index}: file range offset {offset:#x} + {filesz:#x} outside the file")]
    SegmentOutsideFile {
        index: usize,
        offset: u64,
        filesz: u64,
    },
    #[error("segment {index}: [{paddr:#x}, +{memsz:#x}) outside guest memory")]
    SegmentOutsideMemory {
        index: usize,
        paddr: u64,
        memsz: u64,
    },
    #[error("segment {index}: load address {paddr:#x} below {HIGH_MEMORY_START:#x}")]
    SegmentBelowHighMemory { index: usize, paddr: u64 },
    #[error("entry point {0:#x} is not inside any PT_LOAD segment")]
    EntryOutsideSegments(u64),
    #[error("writing segment {index} to guest memory: {source}")]
    GuestMemory {
        index: usize,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("reading kernel image {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Result of loading a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLoadInfo {
    /// 64-bit entry point (guest physical, identity mapped).
    pub entry: GuestAddress,
    /// Lowest guest physical address written.
    pub start: GuestAddress,
    /// First guest physical address past the loaded image (including BSS).
    pub end: GuestAddress,
}

/// One parsed `PT_LOAD` program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

fn rd_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn rd_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap_or([0; 4]))
}
fn rd_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or([0; 8]))
}

/// Parses and validates the ELF header and `PT_LOAD` segments of `image`
/// without touching guest memory. Returns the entry point and the segments.
pub fn parse(image: &[u8]) -> Result<(u64, Vec<LoadSegment>), ElfError> {
    let len = image.len() as u64;
    if image.len() < EHDR_SIZE {
        return Err(ElfError::Truncated {
            needed: EHDR_SIZE as u64,
            len,
        });
    }
    if image[0..4] != ELF_MAGIC {
        return Err(ElfError::BadMagic);
    }
    if image[4] != ELFCLASS64 {
        return Err(ElfError::BadClass(image[4]));
    }
    if image[5] != ELFDATA2LSB {
        return Err(ElfError::BadEndian(image[5]));
    }
    let e_type = rd_u16(image, 0x10);
    if e_type != ET_EXEC {
        return Err(ElfError::BadType(e_type));
    }
    let machine = rd_u16(image, 0x12);
    if machine != EM_X86_64 {
        return Err(ElfError::BadMachine(machine));
    }
    let entry = rd_u64(image, 0x18);
    let phoff = rd_u64(image, 0x20);
    let phentsize = rd_u16(image, 0x36);
    let phnum = rd_u16(image, 0x38);
    if phentsize as usize != PHDR_SIZE {
        return Err(ElfError::BadPhentsize(phentsize));
    }
    if phnum as usize > MAX_PHDRS {
        return Err(ElfError::TooManyPhdrs(phnum));
    }
    let ph_end = (phnum as u64)
        .checked_mul(PHDR_SIZE as u64)
        .and_then(|s| s.checked_add(phoff))
        .ok_or(ElfError::Truncated {
            needed: u64::MAX,
            len,
        })?;
    if ph_end > len {
        return Err(ElfError::Truncated {
            needed: ph_end,
            len,
        });
    }
    let mut segs = Vec::new();
    for index in 0..phnum as usize {
        // In bounds: checked against ph_end above.
        let base = phoff as usize + index * PHDR_SIZE;
        let ph = &image[base..base + PHDR_SIZE];
        if rd_u32(ph, 0) != PT_LOAD {
            continue;
        }
        let seg = LoadSegment {
            offset: rd_u64(ph, 8),
            paddr: rd_u64(ph, 24),
            filesz: rd_u64(ph, 32),
            memsz: rd_u64(ph, 40),
        };
        if seg.filesz > seg.memsz {
            return Err(ElfError::FileSizeAboveMemSize {
                index,
                filesz: seg.filesz,
                memsz: seg.memsz,
            });
        }
        match seg.offset.checked_add(seg.filesz) {
            Some(end) if end <= len => {}
            _ => {
                return Err(ElfError::SegmentOutsideFile {
                    index,
                    offset: seg.offset,
                    filesz: seg.filesz,
                })
            }
        }
        if seg.paddr < HIGH_MEMORY_START {
            return Err(ElfError::SegmentBelowHighMemory {
                index,
                paddr: seg.paddr,
            });
        }
        if seg.paddr.checked_add(seg.memsz).is_none() {
            return Err(ElfError::SegmentOutsideMemory {
                index,
                paddr: seg.paddr,
                memsz: seg.memsz,
            });
        }
        segs.push(seg);
    }
    if segs.is_empty() {
        return Err(ElfError::NoLoadSegment);
    }
    if !segs
        .iter()
        .any(|s| entry >= s.paddr && entry < s.paddr + s.memsz)
    {
        return Err(ElfError::EntryOutsideSegments(entry));
    }
    Ok((entry, segs))
}

fn range_in_memory(mem: &GuestMemoryMmap, start: u64, len: u64) -> bool {
    if len == 0 {
        return mem.address_in_range(GuestAddress(start));
    }
    // Every byte must be backed; regions are contiguous only within one region,
    // so require start and last byte in the same region.
    let last = match start.checked_add(len - 1) {
        Some(l) => l,
        None => return false,
    };
    match (
        mem.find_region(GuestAddress(start)),
        mem.find_region(GuestAddress(last)),
    ) {
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

/// Validates `image` and loads its `PT_LOAD` segments into `mem`.
pub fn load_elf(mem: &GuestMemoryMmap, image: &[u8]) -> Result<KernelLoadInfo, ElfError> {
    let (entry, segs) = parse(image)?;
    // Check all segments before writing anything.
    for (index, s) in segs.iter().enumerate() {
        if !range_in_memory(mem, s.paddr, s.memsz) {
            return Err(ElfError::SegmentOutsideMemory {
                index,
                paddr: s.paddr,
                memsz: s.memsz,
            });
        }
    }
    let mut start = u64::MAX;
    let mut end = 0u64;
    for (index, s) in segs.iter().enumerate() {
        let data = &image[s.offset as usize..(s.offset + s.filesz) as usize];
        mem.write_slice(data, GuestAddress(s.paddr))
            .map_err(|source| ElfError::GuestMemory { index, source })?;
        let bss = (s.memsz - s.filesz) as usize;
        if bss > 0 {
            let zeros = vec![0u8; bss.min(1 << 20)];
            let mut done = 0usize;
            while done < bss {
                let n = (bss - done).min(zeros.len());
                mem.write_slice(&zeros[..n], GuestAddress(s.paddr + s.filesz + done as u64))
                    .map_err(|source| ElfError::GuestMemory { index, source })?;
                done += n;
            }
        }
        start = start.min(s.paddr);
        end = end.max(s.paddr + s.memsz);
    }
    tracing::debug!(
        entry = format_args!("{entry:#x}"),
        start = format_args!("{start:#x}"),
        end = format_args!("{end:#x}"),
        "loaded ELF kernel"
    );
    Ok(KernelLoadInfo {
        entry: GuestAddress(entry),
        start: GuestAddress(start),
        end: GuestAddress(end),
    })
}

/// Reads the file at `path` and loads it with [`load_elf`].
pub fn load_elf_file(
    mem: &GuestMemoryMmap,
    path: &std::path::Path,
) -> Result<KernelLoadInfo, ElfError> {
    let image = std::fs::read(path).map_err(|e| ElfError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    load_elf(mem, &image)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal valid ELF64 with one PT_LOAD segment at `paddr`.
    pub(crate) fn make_elf(paddr: u64, code: &[u8], bss: u64) -> Vec<u8> {
        let mut v = vec![0u8; EHDR_SIZE + PHDR_SIZE];
        v[0..4].copy_from_slice(&ELF_MAGIC);
        v[4] = ELFCLASS64;
        v[5] = ELFDATA2LSB;
        v[6] = 1;
        v[0x10..0x12].copy_from_slice(&ET_EXEC.to_le_bytes());
        v[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
        v[0x18..0x20].copy_from_slice(&paddr.to_le_bytes());
        v[0x20..0x28].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        v[0x34..0x36].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
        v[0x36..0x38].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        v[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = EHDR_SIZE;
        let off = (EHDR_SIZE + PHDR_SIZE) as u64;
        v[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        v[ph + 8..ph + 16].copy_from_slice(&off.to_le_bytes());
        v[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        v[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        v[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        v[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + bss).to_le_bytes());
        v.extend_from_slice(code);
        v
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn loads_valid_elf_and_zeroes_bss() {
        let m = mem();
        m.write_slice(&[0xaa; 16], GuestAddress(0x100004)).unwrap();
        let info = load_elf(&m, &make_elf(0x100000, &[0xf4, 0x90, 0x90, 0x90], 16)).unwrap();
        assert_eq!(info.entry, GuestAddress(0x100000));
        assert_eq!(info.end, GuestAddress(0x100014));
        let mut b = [0u8; 8];
        m.read_slice(&mut b, GuestAddress(0x100000)).unwrap();
        assert_eq!(b, [0xf4, 0x90, 0x90, 0x90, 0, 0, 0, 0]);
    }

    #[test]
    fn rejects_bad_magic() {
        let mut e = make_elf(0x100000, &[0xf4], 0);
        e[1] = b'X';
        assert!(matches!(load_elf(&mem(), &e), Err(ElfError::BadMagic)));
    }

    #[test]
    fn rejects_wrong_class_and_machine() {
        let mut e = make_elf(0x100000, &[0xf4], 0);
        e[4] = 1;
        assert!(matches!(parse(&e), Err(ElfError::BadClass(1))));
        let mut e = make_elf(0x100000, &[0xf4], 0);
        e[0x12] = 3;
        e[0x13] = 0;
        assert!(matches!(parse(&e), Err(ElfError::BadMachine(3))));
    }

    #[test]
    fn rejects_truncated_headers() {
        let e = make_elf(0x100000, &[0xf4], 0);
        assert!(matches!(parse(&e[..40]), Err(ElfError::Truncated { .. })));
        // Program header table cut in half.
        assert!(matches!(
            parse(&e[..EHDR_SIZE + 20]),
            Err(ElfError::Truncated { .. })
        ));
        // Segment data cut.
        let mut e = make_elf(0x100000, &[0xf4; 64], 0);
        e.truncate(e.len() - 10);
        assert!(matches!(
            parse(&e),
            Err(ElfError::SegmentOutsideFile { .. })
        ));
        assert!(matches!(parse(&[]), Err(ElfError::Truncated { .. })));
    }

    #[test]
    fn rejects_huge_phoff_without_overflow_panic() {
        let mut e = make_elf(0x100000, &[0xf4], 0);
        e[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(parse(&e), Err(ElfError::Truncated { .. })));
    }

    #[test]
    fn rejects_segment_outside_memory() {
        let e = make_elf(0x3ff000, &[0xf4; 16], 0x2000);
        assert!(matches!(
            load_elf(&mem(), &e),
            Err(ElfError::SegmentOutsideMemory { .. })
        ));
        let e = make_elf(0x8000_0000, &[0xf4], 0);
        assert!(matches!(
            load_elf(&mem(), &e),
            Err(ElfError::SegmentOutsideMemory { .. })
        ));
        let mut e = make_elf(0x100000, &[0xf4], 0);
        // memsz overflowing the address space
        let ph = EHDR_SIZE;
        e[ph + 40..ph + 48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            load_elf(&mem(), &e),
            Err(ElfError::SegmentOutsideMemory { .. })
        ));
    }

    #[test]
    fn rejects_low_segment_and_bad_entry() {
        let e = make_elf(0x7000, &[0xf4], 0);
        assert!(matches!(
            parse(&e),
            Err(ElfError::SegmentBelowHighMemory { .. })
        ));
        let mut e = make_elf(0x100000, &[0xf4], 0);
        e[0x18..0x20].copy_from_slice(&0x200000u64.to_le_bytes());
        assert!(matches!(
            parse(&e),
            Err(ElfError::EntryOutsideSegments(0x200000))
        ));
    }

    #[test]
    fn rejects_filesz_above_memsz_and_no_load() {
        let mut e = make_elf(0x100000, &[0xf4; 8], 0);
        let ph = EHDR_SIZE;
        e[ph + 40..ph + 48].copy_from_slice(&4u64.to_le_bytes());
        assert!(matches!(
            parse(&e),
            Err(ElfError::FileSizeAboveMemSize { .. })
        ));
        let mut e = make_elf(0x100000, &[0xf4], 0);
        e[ph..ph + 4].copy_from_slice(&6u32.to_le_bytes());
        assert!(matches!(parse(&e), Err(ElfError::NoLoadSegment)));
    }
}
