//! Host failpoints (docs/faults.md): `debug.failpoints` of the config, applied once when a
//! process that serves one sandbox starts (the shim's serving process, `joeyctl run`,
//! `joeyctl boot --config`), so the `fail` crate's process-wide registry is per sandbox.
//!
//! Only a build with the `failpoints` cargo feature (scripts/fault.sh) has failpoints; any
//! other refuses a non-empty `debug.failpoints` rather than ignoring it.

use joey_config::DebugConfig;

/// Failpoints of the actors crate and the shim (`<area>::<point>`), next to
/// [`joey_vmm_core::failpoints`]'s.
pub const ACTOR_NAMES: &[&str] = &[
    joey_actors::sharefs::SETUP_FAILPOINT,
    joey_actors::sharefs::SHARE_FAILPOINT,
    joey_actors::network::SETUP_FAILPOINT,
    crate::shim::events::PUBLISH_FAILPOINT,
];

/// Why the failpoints could not be set.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FailpointsError {
    #[error(
        "debug.failpoints set but this build has no failpoints (build with --features failpoints)"
    )]
    NotBuilt,
    #[error("debug.failpoints: {0}")]
    Invalid(String),
    #[error("debug.failpoints: no failpoint {0:?} (docs/faults.md lists them)")]
    Unknown(String),
    #[error("debug.failpoints: {name}: {message}")]
    Cfg { name: String, message: String },
}

/// Whether `name` is a failpoint of the host crates.
pub fn is_known(name: &str) -> bool {
    joey_vmm_core::failpoints::NAMES
        .iter()
        .any(|(n, _)| *n == name)
        || ACTOR_NAMES.contains(&name)
}

/// The `(name, action)` pairs to set: `debug.failpoints` parsed, every name known.
pub fn points(cfg: &DebugConfig) -> Result<Vec<(String, String)>, FailpointsError> {
    let pairs = cfg.failpoint_pairs().map_err(FailpointsError::Invalid)?;
    if let Some((n, _)) = pairs.iter().find(|(n, _)| !is_known(n)) {
        return Err(FailpointsError::Unknown(n.clone()));
    }
    Ok(pairs)
}

/// Sets the failpoints `debug.failpoints` names; returns how many. Call it once, at start,
/// before the sandbox's threads exist.
pub fn setup(cfg: &DebugConfig) -> Result<usize, FailpointsError> {
    let pairs = points(cfg)?;
    if pairs.is_empty() {
        return Ok(0);
    }
    if !joey_vmm_core::failpoints::ENABLED {
        return Err(FailpointsError::NotBuilt);
    }
    apply(&pairs)?;
    Ok(pairs.len())
}

/// Whether a panic's message is the `fail` crate's `panic` action (`failpoint <name> panic`).
pub fn is_injected_panic(message: &str) -> bool {
    joey_vmm_core::failpoints::panicked_failpoint(message).is_some_and(is_known)
}

#[cfg(feature = "failpoints")]
fn apply(pairs: &[(String, String)]) -> Result<(), FailpointsError> {
    // An injected panic is expected: one log line names it, instead of the panic report (the
    // fault harness counts any other `panicked` as a bug).
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = joey_vmm_core::vmm::event::panic_message(info.payload());
        if is_injected_panic(&msg) {
            let thread = std::thread::current();
            tracing::warn!("injected {msg} on thread {}", thread.name().unwrap_or("?"));
        } else {
            previous(info);
        }
    }));
    for (name, action) in pairs {
        fail::cfg(name.as_str(), action).map_err(|message| FailpointsError::Cfg {
            name: name.clone(),
            message,
        })?;
        tracing::warn!(failpoint = %name, action = %action, "failpoint set");
    }
    Ok(())
}

#[cfg(not(feature = "failpoints"))]
fn apply(_: &[(String, String)]) -> Result<(), FailpointsError> {
    Err(FailpointsError::NotBuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> DebugConfig {
        DebugConfig {
            failpoints: s.into(),
        }
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(setup(&cfg("")), Ok(0));
        assert_eq!(
            points(&cfg("vsock::tx=return(drop);vmm::vcpu_run=panic")).unwrap(),
            vec![
                ("vsock::tx".to_string(), "return(drop)".to_string()),
                ("vmm::vcpu_run".to_string(), "panic".to_string())
            ]
        );
        assert_eq!(
            setup(&cfg("vsock::txx=panic")).unwrap_err().to_string(),
            "debug.failpoints: no failpoint \"vsock::txx\" (docs/faults.md lists them)"
        );
        assert!(matches!(
            setup(&cfg("vsock::tx")),
            Err(FailpointsError::Invalid(_))
        ));
    }

    #[test]
    fn injected_panics_are_told_apart() {
        assert!(is_injected_panic("failpoint vmm::vcpu_run panic"));
        assert!(is_injected_panic("failpoint sharefs::share panic"));
        assert!(!is_injected_panic("failpoint nosuch::point panic"));
    }

    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn a_build_without_failpoints_refuses_them() {
        assert_eq!(
            setup(&cfg("vsock::tx=return(drop)")).unwrap_err().to_string(),
            "debug.failpoints set but this build has no failpoints (build with --features failpoints)"
        );
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn a_failpoint_build_sets_them() {
        assert_eq!(setup(&cfg("net::tx=off")), Ok(1));
    }
}
