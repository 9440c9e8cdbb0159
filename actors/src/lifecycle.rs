//! Lifecycle states with checked transitions.

use std::fmt;

/// Error returned when a lifecycle transition is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} state transition: {from} -> {to}")]
pub struct InvalidTransition {
    pub what: &'static str,
    pub from: String,
    pub to: String,
}

/// Lifecycle of a sandbox (one microVM plus its agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    /// Actor exists, nothing started.
    Created,
    /// VM is booting; waiting for the agent.
    Starting,
    /// Agent answered; processes can be run.
    Running,
    /// Teardown in progress.
    Stopping,
    /// VM gone, resources released.
    Stopped,
    /// The VM or agent died unexpectedly (terminal until stopped).
    Failed,
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            SandboxState::Created => "created",
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Stopping => "stopping",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
        };
        f.write_str(s)
    }
}

impl SandboxState {
    /// Whether `self -> to` is a legal transition.
    pub fn can_transition(self, to: SandboxState) -> bool {
        use SandboxState::*;
        matches!(
            (self, to),
            (Created, Starting)
                | (Starting, Running)
                | (Starting, Failed)
                | (Starting, Stopping)
                | (Running, Stopping)
                | (Running, Failed)
                | (Failed, Stopping)
                | (Stopping, Stopped)
                | (Created, Stopped)
        )
    }

    /// Performs a checked transition.
    pub fn transition(&mut self, to: SandboxState) -> Result<(), InvalidTransition> {
        if self.can_transition(to) {
            *self = to;
            Ok(())
        } else {
            Err(InvalidTransition {
                what: "sandbox",
                from: self.to_string(),
                to: to.to_string(),
            })
        }
    }
}

/// Lifecycle of a VM as seen by the Hypervisor actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    NotStarted,
    Running,
    Stopping,
    Exited,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            VmState::NotStarted => "not-started",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Exited => "exited",
        };
        f.write_str(s)
    }
}

impl VmState {
    pub fn can_transition(self, to: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, to),
            (NotStarted, Running)
                | (NotStarted, Exited)
                | (Running, Stopping)
                | (Running, Exited)
                | (Stopping, Exited)
        )
    }

    pub fn transition(&mut self, to: VmState) -> Result<(), InvalidTransition> {
        if self.can_transition(to) {
            *self = to;
            Ok(())
        } else {
            Err(InvalidTransition {
                what: "vm",
                from: self.to_string(),
                to: to.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_happy_path() {
        let mut s = SandboxState::Created;
        for to in [
            SandboxState::Starting,
            SandboxState::Running,
            SandboxState::Stopping,
            SandboxState::Stopped,
        ] {
            s.transition(to).unwrap();
        }
        assert_eq!(s, SandboxState::Stopped);
    }

    #[test]
    fn sandbox_rejects_illegal() {
        let mut s = SandboxState::Created;
        let err = s.transition(SandboxState::Running).unwrap_err();
        assert_eq!(err.to_string(), "invalid sandbox state transition: created -> running");
        assert_eq!(s, SandboxState::Created);
        let mut s = SandboxState::Stopped;
        assert!(s.transition(SandboxState::Starting).is_err());
    }

    #[test]
    fn sandbox_failure_then_stop() {
        let mut s = SandboxState::Running;
        s.transition(SandboxState::Failed).unwrap();
        assert!(s.transition(SandboxState::Running).is_err());
        s.transition(SandboxState::Stopping).unwrap();
        s.transition(SandboxState::Stopped).unwrap();
    }

    #[test]
    fn vm_transitions() {
        let mut v = VmState::NotStarted;
        v.transition(VmState::Running).unwrap();
        v.transition(VmState::Stopping).unwrap();
        v.transition(VmState::Exited).unwrap();
        assert!(v.transition(VmState::Running).is_err());
    }
}
