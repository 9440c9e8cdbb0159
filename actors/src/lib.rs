//! joey's actors: Sandbox, Hypervisor, ShareFs, Container and Network.
//!
//! Each actor owns its state; others hold an `Addr`. Requests are typed messages, one struct per
//! request with its reply type. Nothing here blocks the async runtime: long agent calls are
//! forwarded as futures, device threads are reached only through channels with timeouts.

pub mod agent_client;
pub mod container;
pub mod hypervisor;
pub mod lifecycle;
pub mod metrics;
pub mod network;
pub mod resource;
pub mod sandbox;
pub mod sharefs;

pub use agent_client::{AgentClient, AgentError, RpcCode};
pub use hypervisor::{Accelerator, BackendKind, HypervisorActor, HypervisorError};
pub use lifecycle::{InvalidTransition, SandboxState, StateMachine, VmState};
pub use sandbox::*;

/// A new random sandbox id (16 hex digits).
pub fn new_sandbox_id() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read as _;
        let _ = f.read_exact(&mut b);
    }
    if b == [0u8; 8] {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0) as u64;
        b = (t ^ ((std::process::id() as u64) << 32)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}
