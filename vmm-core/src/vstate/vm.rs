//! KVM VM creation: in-kernel irqchip, PIT2, TSS / identity map, memory slots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors setting up the KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (the built-in VMM needs KVM; is /dev/kvm present and accessible?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} unsupported (need 12)")]
    KvmApiVersion(i32),
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR: {0}")]
    SetTss(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR: {0}")]
    SetIdentityMap(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP: {0}")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2: {0}")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION slot {slot}: {source}")]
    SetMemoryRegion {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory has {0} regions, more than KVM's {1} slots")]
    TooManySlots(usize, usize),
}

/// Opens `/dev/kvm` and checks the API version.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
    let v = kvm.get_api_version();
    if v != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(VmError::KvmApiVersion(v));
    }
    Ok(kvm)
}

/// Creates a VM.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    kvm.create_vm().map_err(VmError::CreateVm)
}

/// Sets the TSS and identity map addresses, then creates the in-kernel
/// irqchip (PIC + IOAPIC + LAPICs) and PIT.
pub fn setup_irqchip(vm: &VmFd) -> Result<(), VmError> {
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(VmError::SetIdentityMap)?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(VmError::SetTss)?;
    vm.create_irq_chip().map_err(VmError::CreateIrqchip)?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(VmError::CreatePit)?;
    Ok(())
}

/// Registers every guest memory region as a KVM memory slot.
pub fn register_memory(kvm: &Kvm, vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    let max = kvm.get_nr_memslots();
    if mem.num_regions() > max {
        return Err(VmError::TooManySlots(mem.num_regions(), max));
    }
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let r = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live anonymous mapping of `memory_size` bytes owned by
        // `mem`, which the VMM keeps alive for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|source| VmError::SetMemoryRegion { slot, source })?;
    }
    Ok(())
}
