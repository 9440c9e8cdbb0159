//! ttrpc protocol between the joey runtime (host) and the guest agent.
//!
//! Generated from `protos/agent.proto` with ttrpc-codegen at build time.

/// Protobuf messages of `agent.proto`.
#[allow(
    unknown_lints,
    clippy::all,
    unused_attributes,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    trivial_casts,
    unused_results,
    unused_mut
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// ttrpc client and server glue of `AgentService`.
#[allow(
    unknown_lints,
    clippy::all,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    trivial_casts,
    unsafe_code,
    unused_imports,
    unused_results
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// vsock port the agent listens on inside the guest, unless the kernel command line names
/// another with [`AGENT_PORT_PARAM`].
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Kernel command-line parameter that tells the agent its vsock port (`joey.agent_port=<N>`,
/// from the host's `agent.vsock_port`).
pub const AGENT_PORT_PARAM: &str = "joey.agent_port";
/// Protocol version reported by `Version`.
pub const PROTOCOL_VERSION: &str = "1";
/// virtio-fs mount tag of the sandbox's shared directory (container rootfs dirs live under it).
pub const SHARED_FS_TAG: &str = "joeyfs";
/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/joey/shared";

/// Longest container id the runtime and the agent accept.
pub const MAX_CONTAINER_ID_LEN: usize = 64;

/// Whether `id` is a valid container id: `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`. The host (which
/// names directories after it) and the agent (which trusts nothing from the host) both check it.
pub fn is_valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CONTAINER_ID_LEN
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids() {
        for ok in ["a", "c1", "A.b_c-d", &"x".repeat(64)] {
            assert!(is_valid_container_id(ok), "{ok}");
        }
        for bad in ["", "-a", ".a", "_a", "a/b", "a b", "..", &"x".repeat(65), "é"] {
            assert!(!is_valid_container_id(bad), "{bad}");
        }
    }
}
