//! Guest boot preparation: kernel loading (ELF64 `vmlinux` or bzImage), command line,
//! initrd, Linux boot protocol zero page and MP table.
//!
//! The entry state of the vCPUs (GDT, page tables, registers) lives in
//! [`crate::vstate::regs`]; this module only fills guest memory.

pub mod bzimage;
pub mod elf;
pub mod layout;
pub mod mptable;
pub mod zeropage;

use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, MMIO_GAP_START, PAGE_SIZE, ZERO_PAGE_ADDR};

/// Errors of the boot preparation.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel: {0}")]
    Elf(#[from] elf::ElfError),
    #[error("kernel (bzImage): {0}")]
    BzImage(#[from] bzimage::BzImageError),
    #[error("reading kernel {path}: {source}")]
    KernelRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("zero page: {0}")]
    ZeroPage(#[from] zeropage::ZeroPageError),
    #[error("mptable: {0}")]
    Mptable(#[from] mptable::MptableError),
    #[error("command line is {len} bytes, at most {max} allowed")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error("reading initrd {path}: {source}")]
    InitrdRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "initrd of {size} bytes does not fit between the kernel end {kernel_end:#x} and {top:#x}"
    )]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        top: u64,
    },
    #[error("writing boot data to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// What the vCPU setup needs to know after the boot data was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootSetup {
    /// 64-bit kernel entry point.
    pub entry: GuestAddress,
    /// Address of the zero page (goes into `rsi`).
    pub zero_page: GuestAddress,
    /// Kernel image range end.
    pub kernel_end: GuestAddress,
    /// Initrd `(address, size)` if any.
    pub initrd: Option<(u64, u64)>,
}

/// Writes `cmdline` (NUL terminated) at [`CMDLINE_ADDR`]; returns its length without the NUL.
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<u32, BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let mut b = Vec::with_capacity(cmdline.len() + 1);
    b.extend_from_slice(cmdline.as_bytes());
    b.push(0);
    mem.write_slice(&b, GuestAddress(CMDLINE_ADDR))?;
    Ok(cmdline.len() as u32)
}

/// Page-aligned address for an initrd of `size` bytes placed as high as
/// possible below `top` (the end of RAM below the 32-bit MMIO gap) and not
/// below `kernel_end`.
pub fn initrd_load_addr(top: u64, kernel_end: u64, size: u64) -> Result<u64, BootError> {
    let too_large = BootError::InitrdTooLarge {
        size,
        kernel_end,
        top,
    };
    let addr = top.checked_sub(size).ok_or(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(BootError::InitrdTooLarge {
            size,
            kernel_end,
            top,
        });
    }
    Ok(addr)
}

/// Loads the initrd file high in low memory; returns `(address, size)`.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::InitrdRead {
        path: path.display().to_string(),
        source,
    })?;
    let size = data.len() as u64;
    let addr = initrd_load_addr(mem_size.min(MMIO_GAP_START), kernel_end, size)?;
    mem.write_slice(&data, GuestAddress(addr))?;
    tracing::debug!(addr = format_args!("{addr:#x}"), size, "loaded initrd");
    Ok((addr, size))
}

/// Loads an ELF64 vmlinux or a bzImage (told apart by their magic). For a bzImage the kernel's
/// setup header is returned too, for the zero page.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<(elf::KernelLoadInfo, Option<Vec<u8>>), BootError> {
    let image = std::fs::read(path).map_err(|source| BootError::KernelRead {
        path: path.display().to_string(),
        source,
    })?;
    if bzimage::is_bzimage(&image) {
        let (info, hdr) = bzimage::load(mem, &image)?;
        Ok((info, Some(hdr)))
    } else {
        Ok((elf::load_elf(mem, &image)?, None))
    }
}

/// Loads the kernel, command line and initrd, and writes the zero page and MP table.
pub fn setup_boot(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u8,
) -> Result<BootSetup, BootError> {
    let (k, setup_header) = load_kernel(mem, kernel)?;
    let cmdline_len = load_cmdline(mem, cmdline)?;
    let initrd = match initrd {
        Some(p) => Some(load_initrd(mem, mem_size, k.end.0, p)?),
        None => None,
    };
    let mut bp = zeropage::build(mem_size, (CMDLINE_ADDR, cmdline_len), initrd)?;
    if let Some(h) = setup_header {
        bp.apply_setup_header(&h, (CMDLINE_ADDR, cmdline_len), initrd);
    }
    bp.write_to(mem, GuestAddress(ZERO_PAGE_ADDR))?;
    mptable::setup_mptable(mem, vcpus)?;
    Ok(BootSetup {
        entry: k.entry,
        zero_page: GuestAddress(ZERO_PAGE_ADDR),
        kernel_end: k.end,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_placement_is_high_and_aligned() {
        let a = initrd_load_addr(128 << 20, 0x200000, 0x1234).unwrap();
        assert_eq!(a % PAGE_SIZE, 0);
        assert!(a + 0x1234 <= 128 << 20);
        assert!(a >= (128 << 20) - 0x3000);
        assert!(matches!(
            initrd_load_addr(16 << 20, 15 << 20, 2 << 20),
            Err(BootError::InitrdTooLarge { .. })
        ));
        assert!(matches!(
            initrd_load_addr(1 << 20, 0, 2 << 20),
            Err(BootError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn cmdline_written_with_nul() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(
            load_cmdline(&mem, "console=ttyS0 probe.cpus=1").unwrap(),
            26
        );
        let mut b = [0u8; 27];
        mem.read_slice(&mut b, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&b[..26], b"console=ttyS0 probe.cpus=1");
        assert_eq!(b[26], 0);
        assert!(matches!(
            load_cmdline(&mem, &"x".repeat(CMDLINE_MAX_SIZE)),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            load_cmdline(&mem, "a\0b"),
            Err(BootError::CmdlineNul)
        ));
    }
}
