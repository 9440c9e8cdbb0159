//! Intel MultiProcessor Specification 1.4 table, so that a guest can count its
//! CPUs (Linux without ACPI uses it; the probe guest parses it).
//!
//! Layout at [`MPTABLE_START`]: floating pointer (16 bytes), then the
//! configuration table: header, one processor entry per vCPU, the ISA bus,
//! the IOAPIC, 24 IO interrupt entries and 2 local interrupt entries.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{HIGH_MEMORY_START, MPTABLE_START};

/// Local APIC base address.
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// IOAPIC base address.
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Number of IOAPIC pins routed.
pub const IRQ_COUNT: u8 = 24;
/// Most vCPUs the table (and this VMM) supports.
pub const MAX_CPUS: u8 = 254;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("invalid vCPU count {0} (1..={MAX_CPUS})")]
    BadCpuCount(u8),
    #[error("MP table of {0} bytes does not fit below 1 MiB")]
    TooLarge(usize),
    #[error("writing MP table to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(b: &[u8]) -> u8 {
    let s = b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
    0u8.wrapping_sub(s)
}

/// IOAPIC id used in the table (after the CPU APIC ids).
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus.saturating_add(1)
}

/// Builds the MP floating pointer + configuration table image, to be placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MptableError::BadCpuCount(num_cpus));
    }
    let table_addr = base + 16;
    let mut t: Vec<u8> = Vec::with_capacity(64 + 20 * num_cpus as usize + 256);
    // Configuration table header (44 bytes); length/checksum/count fixed below.
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&0u16.to_le_bytes()); // length
    t.push(4); // spec rev 1.4
    t.push(0); // checksum
    t.extend_from_slice(b"JOEYVMM "); // oem id
    t.extend_from_slice(b"BUILTINVMM  "); // product id
    t.extend_from_slice(&0u32.to_le_bytes()); // oem table ptr
    t.extend_from_slice(&0u16.to_le_bytes()); // oem table size
    t.extend_from_slice(&0u16.to_le_bytes()); // entry count
    t.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes()); // extended length/checksum/reserved
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        t.push(MP_PROCESSOR);
        t.push(cpu); // APIC id == vCPU index
        t.push(APIC_VERSION);
        t.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        t.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        t.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        t.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    let isa_bus = 0u8;
    t.push(MP_BUS);
    t.push(isa_bus);
    t.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(num_cpus);
    t.extend_from_slice(&[MP_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    t.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    count += 1;
    for irq in 0..IRQ_COUNT {
        t.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, isa_bus, irq, ioapic, irq]);
        count += 1;
    }
    t.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, isa_bus, 0, 0, 0]);
    t.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, isa_bus, 0, 0xff, 1]);
    count += 2;
    let len = t.len();
    if base as usize + 16 + len > HIGH_MEMORY_START as usize {
        return Err(MptableError::TooLarge(len + 16));
    }
    t[4..6].copy_from_slice(&(len as u16).to_le_bytes());
    t[34..36].copy_from_slice(&count.to_le_bytes());
    t[7] = checksum(&t);

    let mut fp = Vec::with_capacity(16 + len);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec rev
    fp.push(0); // checksum
    fp.extend_from_slice(&[0u8; 5]); // feature bytes: 0 = config table present
    fp[10] = checksum(&fp[..16]);
    fp.extend_from_slice(&t);
    Ok(fp)
}

/// Writes the MP table for `num_cpus` vCPUs at [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let img = build(num_cpus, MPTABLE_START)?;
    mem.write_slice(&img, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Parses the image like a guest would and returns the enabled CPU count.
    fn count_cpus(img: &[u8], base: u64) -> usize {
        assert_eq!(&img[0..4], b"_MP_");
        assert_eq!(sum(&img[..16]), 0);
        let phys = u32::from_le_bytes(img[4..8].try_into().unwrap()) as u64;
        let t = &img[(phys - base) as usize..];
        assert_eq!(&t[0..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(sum(&t[..len]), 0);
        let n = u16::from_le_bytes([t[34], t[35]]) as usize;
        let mut o = 44;
        let mut cpus = 0;
        for _ in 0..n {
            match t[o] {
                0 => {
                    if t[o + 3] & 1 != 0 {
                        cpus += 1;
                    }
                    o += 20
                }
                _ => o += 8,
            }
        }
        assert_eq!(o, len);
        cpus
    }

    #[test]
    fn table_counts_cpus_and_checksums() {
        for n in [1u8, 2, 4, 32] {
            let img = build(n, MPTABLE_START).unwrap();
            assert_eq!(count_cpus(&img, MPTABLE_START), n as usize);
        }
    }

    #[test]
    fn bsp_flag_only_on_cpu0() {
        let img = build(2, MPTABLE_START).unwrap();
        assert_eq!(img[16 + 44 + 3], CPU_ENABLED | CPU_BOOTPROCESSOR);
        assert_eq!(img[16 + 44 + 20 + 3], CPU_ENABLED);
        assert_eq!(img[16 + 44 + 20 + 1], 1);
    }

    #[test]
    fn rejects_bad_counts() {
        assert!(matches!(
            build(0, MPTABLE_START),
            Err(MptableError::BadCpuCount(0))
        ));
        assert!(matches!(
            build(255, MPTABLE_START),
            Err(MptableError::BadCpuCount(255))
        ));
        // 254 CPUs do not fit in the EBDA..1MiB window? 16+44+20*254+... < 0x60400: fits.
        assert!(build(254, MPTABLE_START).is_ok());
        assert!(matches!(build(4, 0xfff00), Err(MptableError::TooLarge(_))));
    }
}
