//! KVM state of the built-in VMM, as small composable steps
//! (Firecracker-style): guest memory, the VM (irqchip, PIT, memory slots),
//! per-vCPU CPUID / MSRs / registers, and the vCPU threads.

pub mod cpuid;
pub mod memory;
pub mod metrics;
pub mod regs;
pub mod vcpu;
pub mod vm;
