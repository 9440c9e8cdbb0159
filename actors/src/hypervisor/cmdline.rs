//! The guest kernel command line, built the same way for both backends.
//!
//! joey's own part: the serial console, how the guest reboots (which decides how a reboot ends
//! the VM: see [`Reboot`]), `panic=-1` (a panic reboots at once, so a dying guest always ends
//! the VM), `quiet`, `no_timer_check` (see [`KernelCmdline::new`]), then the user's
//! `hypervisor.kernel_params`, then the agent's vsock port (`joey.agent_port=<N>`, read by the
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

/// The command line of a VM spec on a backend that reboots the guest with `reboot`.
pub fn for_spec(spec: &super::VmSpec, reboot: Reboot) -> String {
    KernelCmdline::new(reboot)
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
}
