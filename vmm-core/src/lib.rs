//! joey VMM core: device models shared by the in-process VMM and vhost-user backends.

pub mod devices;

// Built-in VMM (Dragonball-style, in the runtime process).
pub mod boot;
/// Legacy PC devices (serial, i8042) of the built-in VMM. Lives in
/// `devices/legacy/`; mounted here so `devices/mod.rs` need not change.
#[path = "devices/legacy/mod.rs"]
pub mod legacy;
pub mod vmm;
pub mod vstate;
