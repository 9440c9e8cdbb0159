//! Guest memory allocation.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::boot::layout::{MIN_MEMORY_MIB, MMIO_GAP_END, MMIO_GAP_START};

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small (min {MIN_MEMORY_MIB} MiB)")]
    TooSmall(u32),
    #[error("guest memory of {0} MiB does not fit the host address space")]
    TooLarge(u32),
    #[error("allocating guest memory: {0}")]
    Alloc(#[from] vm_memory::mmap::FromRangesError),
}

/// RAM regions for `size` bytes of guest memory: `[0, min(size, 3 GiB))` and,
/// for what is left, a second region from 4 GiB (the gap is for MMIO).
pub fn arch_memory_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Allocates anonymous guest memory of `mem_mib` MiB.
pub fn create_guest_memory(mem_mib: u32) -> Result<GuestMemoryMmap, MemoryError> {
    if mem_mib < MIN_MEMORY_MIB {
        return Err(MemoryError::TooSmall(mem_mib));
    }
    let size = (mem_mib as u64) << 20;
    if usize::try_from(size).is_err() {
        return Err(MemoryError::TooLarge(mem_mib));
    }
    Ok(GuestMemoryMmap::from_ranges(&arch_memory_regions(size))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemory;

    #[test]
    fn regions_split_around_gap() {
        assert_eq!(
            arch_memory_regions(128 << 20),
            vec![(GuestAddress(0), 128 << 20)]
        );
        let r = arch_memory_regions(5 << 30);
        assert_eq!(
            r,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]
        );
    }

    #[test]
    fn creates_memory() {
        let m = create_guest_memory(32).unwrap();
        assert_eq!(m.num_regions(), 1);
        assert!(matches!(
            create_guest_memory(1),
            Err(MemoryError::TooSmall(1))
        ));
    }
}
