//! The guest kernel command line, built the same way for both backends.
//!
//! joey's own part: the serial console, how the guest reboots (which decides how a reboot ends
//! the VM: see [`Reboot`]), `panic=-1` (a panic reboots at once, so a dying guest always ends
//! the VM), `quiet`, `no_timer_check` (see [`KernelCmdline::new`]), then the boot-time tuning
//! (see [`KernelCmdline::fast_boot`] and [`KernelCmdline::tsc_khz`]), then the user's
//! `hypervisor.kernel_params` (which can override any of joey's), then the agent's vsock port (`joey.agent_port=<N>`, read by the
//! agent from `/proc/cmdline`; last, so that the configured `agent.vsock_port` wins over a
//! stray copy in the extra parameters). The built-in VMM appends its virtio-mmio devices
//! itself, QEMU does so too (`acpi=off`).

use std::fmt;

pub use joey_agent_protocol::AGENT_PORT_PARAM;

/// How the guest kernel resets the machine (`reboot=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reboot {
    /// `reboot=t`: triple fault; QEMU with `-no-reboot` then exits.
    TripleFault,
    /// `reboot=k`: through the i8042 keyboard controller; the built-in VMM reports a `Reset`.
    Keyboard,
}

impl Reboot {
    fn param(self) -> &'static str {
        match self {
            Reboot::TripleFault => "t",
            Reboot::Keyboard => "k",
        }
    }
}

/// A guest kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCmdline {
    params: Vec<String>,
}

impl KernelCmdline {
    /// joey's base parameters: `console=ttyS0 reboot=<r> panic=-1 quiet no_timer_check`.
    pub fn new(reboot: Reboot) -> Self {
        KernelCmdline {
            params: vec![
                "console=ttyS0".into(),
                format!("reboot={}", reboot.param()),
                "panic=-1".into(),
                "quiet".into(),
                // The IO-APIC timer check waits for timer interrupts within a fixed window,
                // which a slow (TCG, loaded host) vCPU can miss: the guest then panics ("IO-APIC
                // + timer doesn't work!"). A VM's timer is known to work.
                "no_timer_check".into(),
            ],
        }
    }

    /// Appends what spares the guest work whose result the VMM already knows (docs/performance.md):
    /// - `apic_timer_hz=1000000000`: QEMU's and KVM's local APIC timers count at a 1 GHz bus
    ///   clock; joey's guest kernel takes the rate (guest/patches/0002) and skips the APIC timer
    ///   calibration and its verification (~108 ms each under TCG). A kernel without the patch
    ///   ignores it.
    /// - `noreplace-smp` with one vCPU: the kernel does not rewrite its SMP alternatives to UP
    ///   ones (each text poke flushes TCG's translations; ~61 ms). Never with more vCPUs.
    pub fn fast_boot(mut self, vcpus: u32) -> Self {
        self.params.push(format!("apic_timer_hz={APIC_TIMER_HZ}"));
        if vcpus == 1 {
            self.params.push("noreplace-smp".into());
        }
        self
    }

    /// Appends `tsc_early_khz=<khz>`: the TSC rate the guest sees (under QEMU-TCG the host's),
    /// so the guest does not calibrate it against the PIT — which, on a busy host, sometimes
    /// fails and leaves the guest on a 4 ms jiffies clock ("Marking TSC unstable").
    pub fn tsc_khz(mut self, khz: Option<u64>) -> Self {
        if let Some(khz) = khz {
            self.params.push(format!("tsc_early_khz={khz}"));
        }
        self
    }

    /// Appends free-form parameters (whitespace separated; surrounding whitespace ignored).
    pub fn extra(mut self, params: &str) -> Self {
        self.params.extend(params.split_whitespace().map(str::to_string));
        self
    }

    /// Appends `joey.agent_port=<port>`: the vsock port the guest agent listens on.
    pub fn agent_port(mut self, port: u32) -> Self {
        self.params.push(format!("{AGENT_PORT_PARAM}={port}"));
        self
    }
}

impl fmt::Display for KernelCmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.params.join(" "))
    }
}

/// The rate of the local APIC timer's clock in QEMU (TCG and KVM) and KVM (`APIC_BUS_CYCLE_NS` = 1).
pub const APIC_TIMER_HZ: u64 = 1_000_000_000;

/// The command line of a VM spec on a backend that reboots the guest with `reboot`;
/// `tsc_khz`: the guest's TSC rate when the backend knows it (see [`KernelCmdline::tsc_khz`]).
pub fn for_spec(spec: &super::VmSpec, reboot: Reboot, tsc_khz: Option<u64>) -> String {
    KernelCmdline::new(reboot)
        .fast_boot(spec.vcpus)
        .tsc_khz(tsc_khz)
        .extra(&spec.kernel_params)
        .agent_port(spec.agent_port)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_parameters_per_reboot_method() {
        assert_eq!(
            KernelCmdline::new(Reboot::TripleFault).to_string(),
            "console=ttyS0 reboot=t panic=-1 quiet no_timer_check"
        );
        assert_eq!(
            KernelCmdline::new(Reboot::Keyboard).to_string(),
            "console=ttyS0 reboot=k panic=-1 quiet no_timer_check"
        );
    }

    #[test]
    fn extra_parameters_then_the_agent_port() {
        let c = KernelCmdline::new(Reboot::Keyboard)
            .extra("  foo=1\tbar  ")
            .agent_port(2048);
        assert_eq!(
            c.to_string(),
            "console=ttyS0 reboot=k panic=-1 quiet no_timer_check foo=1 bar joey.agent_port=2048"
        );
        // Blank extras add nothing; the configured port comes after a user-supplied one.
        let c = KernelCmdline::new(Reboot::TripleFault)
            .extra(" ")
            .extra("joey.agent_port=9")
            .agent_port(1024);
        assert_eq!(
            c.to_string(),
            "console=ttyS0 reboot=t panic=-1 quiet no_timer_check joey.agent_port=9 joey.agent_port=1024"
        );
    }

    #[test]
    fn fast_boot_depends_on_the_vcpu_count_and_the_user_comes_last() {
        assert_eq!(
            KernelCmdline::new(Reboot::TripleFault).fast_boot(1).to_string(),
            "console=ttyS0 reboot=t panic=-1 quiet no_timer_check apic_timer_hz=1000000000 noreplace-smp"
        );
        // noreplace-smp keeps SMP alternatives: only right with one vCPU.
        assert_eq!(
            KernelCmdline::new(Reboot::Keyboard)
                .fast_boot(2)
                .tsc_khz(Some(2_600_003))
                .extra("apic_timer_hz=5")
                .to_string(),
            "console=ttyS0 reboot=k panic=-1 quiet no_timer_check apic_timer_hz=1000000000 \
             tsc_early_khz=2600003 apic_timer_hz=5"
        );
        assert_eq!(
            KernelCmdline::new(Reboot::Keyboard).tsc_khz(None).to_string(),
            KernelCmdline::new(Reboot::Keyboard).to_string()
        );
    }
}
