//! joey VMM core: device models shared by the in-process VMM and vhost-user backends.

pub mod devices;
pub mod failpoints;
pub mod rate_limiter;
pub mod seccomp;
pub mod thread;

// Built-in VMM (Dragonball-style, in the runtime process).
pub mod boot;
pub mod vmm;
pub mod vstate;
