//! Per-vCPU CPUID derived from `KVM_GET_SUPPORTED_CPUID`, with the APIC id
//! and topology leaves patched so each vCPU knows who it is and how many
//! siblings it has (one socket, one thread per core, `n` cores).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Errors building CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    GetSupported(#[source] kvm_ioctls::Error),
    #[error("building CPUID table: {0:?}")]
    Fam(vmm_sys_util::fam::Error),
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const ECX_HYPERVISOR_BIT: u32 = 1 << 31;
const EDX_HTT_BIT: u32 = 1 << 28;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Host/KVM supported CPUID.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::GetSupported)
}

/// Number of bits needed to hold ids `0..n`.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Patches one CPUID entry for vCPU `id` of `count`.
pub fn patch_entry(e: &mut kvm_cpuid_entry2, id: u8, count: u8) {
    let id32 = id as u32;
    let count32 = count.max(1) as u32;
    match e.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC id, EBX[23:16] logical processor count.
            e.ebx = (e.ebx & 0x0000_ffff) | (id32 << 24) | (count32 << 16);
            e.ecx |= ECX_HYPERVISOR_BIT;
            if count32 > 1 {
                e.edx |= EDX_HTT_BIT;
            } else {
                e.edx &= !EDX_HTT_BIT;
            }
        }
        LEAF_CACHE => {
            // EAX[31:26] = cores per package - 1, EAX[25:14] = threads sharing - 1 (keep 0 = private).
            e.eax = (e.eax & 0x03ff_ffff & !(0xfff << 14)) | ((count32 - 1) << 26);
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            e.edx = id32; // x2APIC id
            match e.index {
                0 => {
                    e.eax = 0; // no SMT bits
                    e.ebx = 1;
                    e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                }
                1 => {
                    e.eax = bits_for(count32);
                    e.ebx = count32;
                    e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        _ => {}
    }
}

/// CPUID for vCPU `id` out of `count`, derived from `base`.
pub fn vcpu_cpuid(base: &CpuId, id: u8, count: u8) -> Result<CpuId, CpuidError> {
    let mut entries: Vec<kvm_cpuid_entry2> = base.as_slice().to_vec();
    for e in entries.iter_mut() {
        patch_entry(e, id, count);
    }
    CpuId::from_entries(&entries).map_err(CpuidError::Fam)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_beef,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_apic_id_and_count() {
        let base =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(4, 0)]).unwrap();
        let c = vcpu_cpuid(&base, 3, 4).unwrap();
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_eq!(s[0].ebx & 0xffff, 0xbeef);
        assert_ne!(s[0].ecx & ECX_HYPERVISOR_BIT, 0);
        assert_ne!(s[0].edx & EDX_HTT_BIT, 0);
        assert_eq!((s[1].edx, s[1].ebx, s[1].ecx >> 8), (3, 1, LEVEL_TYPE_SMT));
        assert_eq!(
            (s[2].edx, s[2].ebx, s[2].eax, s[2].ecx >> 8),
            (3, 4, 2, LEVEL_TYPE_CORE)
        );
        assert_eq!(s[3].eax >> 26, 3);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut e = entry(1, 0);
        e.edx = EDX_HTT_BIT;
        patch_entry(&mut e, 0, 1);
        assert_eq!(e.edx & EDX_HTT_BIT, 0);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(8), 3);
    }
}
