//! Host-side confinement of a runtime process (the shim, `joeyctl run`): the seccomp filters per
//! thread class of [`joey_vmm_core::seccomp`], as `security.seccomp` says. See docs/security.md.

use joey_config::SeccompMode;
use joey_vmm_core::seccomp::{self, Action, SeccompError};

/// The filters' action for a configured mode (`None`: off).
pub fn action(mode: SeccompMode) -> Option<Action> {
    match mode {
        SeccompMode::Kill => Some(Action::Kill),
        SeccompMode::Trap => Some(Action::Trap),
        SeccompMode::Off => None,
    }
}

/// Installs the runtime filter on every thread of this process (threads created later inherit
/// it; device, vCPU and console threads add their own). Call it before the process runs a
/// sandbox. `Ok(false)` when `mode` is off.
pub fn install_seccomp(mode: SeccompMode) -> Result<bool, SeccompError> {
    let Some(action) = action(mode) else {
        tracing::warn!(
            "security.seccomp = \"off\": the runtime's threads run without seccomp filters"
        );
        return Ok(false);
    };
    seccomp::init(action)?;
    tracing::info!(mode = %mode, "seccomp filters installed");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_map_to_actions() {
        assert_eq!(action(SeccompMode::Kill), Some(Action::Kill));
        assert_eq!(action(SeccompMode::Trap), Some(Action::Trap));
        assert_eq!(action(SeccompMode::Off), None);
        // Off installs nothing (this test process stays unfiltered).
        assert!(!install_seccomp(SeccompMode::Off).unwrap());
        assert!(!seccomp::enabled());
    }
}
