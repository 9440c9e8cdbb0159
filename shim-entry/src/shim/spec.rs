//! What the shim needs from a bundle's OCI `config.json`: the `joey-oci` crate (kept apart from
//! the shim so that the `oci_spec` fuzz target builds without the shim's runtime).

pub use joey_oci::*;
