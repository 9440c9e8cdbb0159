//! Entry points of joey's binaries: `joeyctl` (developer/operator CLI) and, with the shim issue,
//! `containerd-shim-joey-v2`.

pub mod ctl;
pub mod failpoints;
pub mod logging;
pub mod pool;
pub mod security;
pub mod signals;
pub mod shim;
