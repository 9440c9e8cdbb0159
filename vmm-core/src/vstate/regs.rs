//! Long-mode entry state of a vCPU: GDT, identity-mapped page tables,
//! segment/control registers, general purpose registers, FPU, boot MSRs and
//! LAPIC LINT0/LINT1 wiring. Everything Firecracker sets for a `vmlinux`.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::layout::{
    BOOT_GDT_ADDR, BOOT_GDT_MAX, BOOT_IDT_ADDR, BOOT_STACK_POINTER, IDENTITY_MAP_GIB, PDPT_ADDR,
    PD_ADDR, PML4_ADDR,
};

/// Errors configuring vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing {what} to guest memory: {source}")]
    GuestMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("{ioctl}: {source}")]
    Ioctl {
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("building MSR list: {0:?}")]
    Fam(vmm_sys_util::fam::Error),
}

fn ioctl(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Ioctl { ioctl, source }
}

pub const X86_CR0_PE: u64 = 0x1;
pub const X86_CR0_PG: u64 = 0x8000_0000;
pub const X86_CR4_PAE: u64 = 0x20;
pub const EFER_LME: u64 = 0x100;
pub const EFER_LMA: u64 = 0x400;
/// Page table entry bits.
pub const PTE_PRESENT: u64 = 1;
pub const PTE_WRITABLE: u64 = 2;
pub const PTE_HUGE: u64 = 0x80;

/// Builds a GDT entry from flags, base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// Converts a GDT entry into the KVM segment descriptor for selector `index * 8`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry & 0xff00_0000_0000_0000) >> 32)
            | ((entry & 0x0000_00ff_0000_0000) >> 16)
            | ((entry & 0x0000_0000_ffff_0000) >> 16),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if present == 0 { 1 } else { 0 },
    }
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub fn boot_gdt() -> [u64; BOOT_GDT_MAX] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Writes the identity-mapped page tables: PML4[0] -> PDPT, PDPT[i] -> PD i,
/// PD entries map 2 MiB pages covering the first [`IDENTITY_MAP_GIB`] GiB.
pub fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let w = |what| move |source| RegsError::GuestMemory { what, source };
    mem.write_obj(
        PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE,
        GuestAddress(PML4_ADDR),
    )
    .map_err(w("PML4"))?;
    let mut pd = vec![0u8; (IDENTITY_MAP_GIB * 4096) as usize];
    for gib in 0..IDENTITY_MAP_GIB {
        let pd_addr = PD_ADDR + gib * 0x1000;
        mem.write_obj(
            pd_addr | PTE_PRESENT | PTE_WRITABLE,
            GuestAddress(PDPT_ADDR + gib * 8),
        )
        .map_err(w("PDPT"))?;
        for i in 0..512u64 {
            let e = (((gib << 9) + i) << 21) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE;
            let o = ((gib * 512 + i) * 8) as usize;
            pd[o..o + 8].copy_from_slice(&e.to_le_bytes());
        }
    }
    mem.write_slice(&pd, GuestAddress(PD_ADDR))
        .map_err(w("PD"))?;
    Ok(())
}

/// Writes GDT/IDT/page tables to guest memory and fills `sregs` for 64-bit mode.
pub fn configure_sregs(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    write_boot_tables(mem)?;
    apply_long_mode_sregs(sregs);
    Ok(())
}

/// Writes the boot GDT, the empty IDT and the identity-mapped page tables.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let gdt = boot_gdt();
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_ADDR + 8 * i as u64))
            .map_err(|source| RegsError::GuestMemory {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_ADDR))
        .map_err(|source| RegsError::GuestMemory {
            what: "IDT",
            source,
        })?;
    setup_page_tables(mem)
}

/// Fills `sregs` for 64-bit mode with the boot GDT and page tables (no memory writes).
pub fn apply_long_mode_sregs(sregs: &mut kvm_sregs) {
    let gdt = boot_gdt();
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment_from_gdt(gdt[3], 3);
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// Sets the special registers of `vcpu` for the 64-bit entry (memory already prepared).
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    apply_long_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))
}

/// General purpose registers for the 64-bit boot protocol entry.
pub fn boot_regs(entry: u64, boot_params: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: boot_params,
        ..Default::default()
    }
}

/// Sets the general purpose registers.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64, boot_params: u64) -> Result<(), RegsError> {
    vcpu.set_regs(&boot_regs(entry, boot_params))
        .map_err(ioctl("KVM_SET_REGS"))
}

/// Default FPU state (x87 control word 0x37f, MXCSR 0x1f80).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))
}

pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// The MSRs Firecracker sets before booting a Linux guest.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Sets the boot MSRs. KVM flavours that refuse some MSRs (e.g. PVM) are
/// tolerated: the refused ones are logged and skipped. Returns how many were set.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<usize, RegsError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(RegsError::Fam)?;
    let n = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if n == entries.len() {
        return Ok(n);
    }
    // KVM stops at the first refused MSR: set the rest one by one.
    let mut set = n;
    for e in &entries[n..] {
        let one = Msrs::from_entries(std::slice::from_ref(e)).map_err(RegsError::Fam)?;
        match vcpu.set_msrs(&one) {
            Ok(1) => set += 1,
            _ => tracing::warn!(
                msr = format_args!("{:#x}", e.index),
                "KVM refused boot MSR; skipped"
            ),
        }
    }
    Ok(set)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| l.regs[off + i] as u8);
    u32::from_le_bytes(b)
}
fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}
fn delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 as ExtINT (legacy PIC) and LINT1 as NMI in the in-kernel LAPIC.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut l = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&l, APIC_LVT0);
    set_lapic_reg(&mut l, APIC_LVT0, delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&l, APIC_LVT1);
    set_lapic_reg(&mut l, APIC_LVT1, delivery_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&l).map_err(ioctl("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemory;

    #[test]
    fn gdt_round_trip() {
        let gdt = boot_gdt();
        let cs = kvm_segment_from_gdt(gdt[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.type_, cs.s),
            (8, 1, 0, 1, 0xb, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = kvm_segment_from_gdt(gdt[2], 2);
        assert_eq!((ds.selector, ds.db, ds.type_), (0x10, 1, 3));
        let null = kvm_segment_from_gdt(gdt[0], 0);
        assert_eq!(null.unusable, 1);
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn page_table_layout() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let mut sregs = kvm_sregs::default();
        configure_sregs(&mem, &mut sregs).unwrap();
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PML4_ADDR)).unwrap(),
            PDPT_ADDR | 3
        );
        for gib in 0..IDENTITY_MAP_GIB {
            assert_eq!(
                mem.read_obj::<u64>(GuestAddress(PDPT_ADDR + gib * 8))
                    .unwrap(),
                (PD_ADDR + gib * 0x1000) | 3
            );
        }
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PDPT_ADDR + IDENTITY_MAP_GIB * 8))
                .unwrap(),
            0
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PD_ADDR)).unwrap(), 0x83);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PD_ADDR + 8)).unwrap(),
            (2 << 20) | 0x83
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PD_ADDR + 511 * 8))
                .unwrap(),
            (511u64 << 21) | 0x83
        );
        // Last entry of the last PD maps the 2 MiB page just below IDENTITY_MAP_GIB GiB.
        let last = PD_ADDR + (IDENTITY_MAP_GIB * 512 - 1) * 8;
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(last)).unwrap(),
            ((IDENTITY_MAP_GIB << 30) - (2 << 20)) | 0x83
        );
        assert!(mem.address_in_range(GuestAddress(last)));
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PE, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.gdt.base, BOOT_GDT_ADDR);
        assert_eq!(sregs.gdt.limit, 31);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(BOOT_GDT_ADDR + 8))
                .unwrap(),
            boot_gdt()[1]
        );
    }

    #[test]
    fn regs_and_msrs() {
        let r = boot_regs(0x100000, 0x7000);
        assert_eq!(
            (r.rip, r.rsi, r.rflags, r.rsp),
            (0x100000, 0x7000, 2, BOOT_STACK_POINTER)
        );
        let m = boot_msr_entries();
        assert!(m
            .iter()
            .any(|e| e.index == MSR_MTRR_DEF_TYPE && e.data == (1 << 11) | 6));
        assert_eq!(delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
    }
}
