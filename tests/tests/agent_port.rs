//! `agent.vsock_port` reaches the guest agent: joey puts `joey.agent_port=<N>` on the guest
//! kernel command line, the agent (PID 1) listens on that vsock port, and the host connects on
//! the same configured port. A run that completes proves both ends agree (the host would time
//! out waiting for an agent on another port); the guest's own command line shows what it was
//! told.

use joey_tests::*;

/// The `joey.agent_port=` parameters of the guest's `/proc/cmdline`, one a line, then exit 7.
const SHOW_PORT: &[&str] = &[
    "sh",
    "-c",
    "for p in $(cat /proc/cmdline); do case $p in joey.agent_port=*) echo $p;; esac; done; exit 7",
];

fn env_with_port(port: Option<u32>) -> Env {
    Env::with_config(|kernel, initrd| {
        let mut c = format!(
            "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\n",
            kernel.display(),
            initrd.display()
        );
        if let Some(p) = port {
            c.push_str(&format!("\n[agent]\nvsock_port = {p}\n"));
        }
        c
    })
}

/// Runs [`SHOW_PORT`] in a sandbox configured with `port`; checks its exact output and exit.
fn check_guest_is_told(port: Option<u32>, want_stdout: &str) {
    let env = env_with_port(port);
    let o = env.run(SHOW_PORT, None);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        want_stdout,
        "stderr: {}",
        stderr_of(&o)
    );
    assert_eq!(stderr_of(&o), "");
    assert_eq!(o.status.code(), Some(7));
}

#[test]
fn agent_listens_on_the_configured_vsock_port() {
    check_guest_is_told(Some(2048), "joey.agent_port=2048\n");
}

#[test]
fn default_agent_port_is_1024() {
    check_guest_is_told(None, "joey.agent_port=1024\n");
}
