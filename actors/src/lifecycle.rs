//! Lifecycle states with checked transitions: one helper for every state enum of the actors.
//!
//! [`state_machine!`] declares an enum (its variants with their display names) and the
//! transitions it allows; it implements [`StateMachine`] for it and gives it the inherent
//! methods `can_transition(self, to) -> bool`, `transition(&mut self, to) -> Result<(),
//! InvalidTransition>` and `expect(self, want) -> Result<(), InvalidTransition>` (a request
//! that needs the actor in state `want`). Every refused transition is the typed
//! [`InvalidTransition`], which names the machine and both states.
//!
//! ```
//! joey_actors::state_machine! {
//!     /// A door.
//!     pub enum Door: "door" {
//!         Open => "open",
//!         Shut => "shut",
//!     }
//!     transitions {
//!         Open => Shut,
//!         Shut => Open,
//!     }
//! }
//! let mut d = Door::Open;
//! d.transition(Door::Shut).unwrap();
//! assert_eq!(
//!     d.transition(Door::Shut).unwrap_err().to_string(),
//!     "invalid door state transition: shut -> shut"
//! );
//! ```

use std::fmt;

/// Error returned when a lifecycle transition is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} state transition: {from} -> {to}")]
pub struct InvalidTransition {
    pub what: &'static str,
    pub from: String,
    pub to: String,
}

impl InvalidTransition {
    pub fn new(what: &'static str, from: impl fmt::Display, to: impl fmt::Display) -> Self {
        InvalidTransition {
            what,
            from: from.to_string(),
            to: to.to_string(),
        }
    }
}

/// A lifecycle enum with checked transitions (implemented by [`state_machine!`]).
pub trait StateMachine: Copy + Eq + fmt::Display {
    /// The machine's name in errors ("sandbox", "vm", ...).
    const WHAT: &'static str;
    /// Label of a refused request (see [`StateMachine::require`]), e.g. "sandbox (request)".
    const REQUEST: &'static str;

    /// Whether `from -> to` is a legal transition.
    fn allowed(from: Self, to: Self) -> bool;

    /// Checks `self -> to` without performing it.
    fn check(self, to: Self) -> Result<(), InvalidTransition> {
        if Self::allowed(self, to) {
            Ok(())
        } else {
            Err(InvalidTransition::new(Self::WHAT, self, to))
        }
    }

    /// Performs a checked transition; on error the state is unchanged.
    fn step(&mut self, to: Self) -> Result<(), InvalidTransition> {
        self.check(to)?;
        *self = to;
        Ok(())
    }

    /// Ok when the state is `want` (a request that needs that state), else the error
    /// "invalid <REQUEST> state transition: <state> -> <want>".
    fn require(self, want: Self) -> Result<(), InvalidTransition> {
        if self == want {
            Ok(())
        } else {
            Err(InvalidTransition::new(Self::REQUEST, self, want))
        }
    }
}

/// Declares a lifecycle enum and its allowed transitions (see the module documentation).
#[macro_export]
macro_rules! state_machine {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $what:literal {
            $( $(#[$vmeta:meta])* $variant:ident => $display:literal ),+ $(,)?
        }
        transitions {
            $( $from:ident => $($to:ident)|+ ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(match self {
                    $( $name::$variant => $display ),+
                })
            }
        }

        impl $crate::lifecycle::StateMachine for $name {
            const WHAT: &'static str = $what;
            const REQUEST: &'static str = concat!($what, " (request)");

            fn allowed(from: Self, to: Self) -> bool {
                matches!((from, to), $( ($name::$from, $($name::$to)|+) )|+)
            }
        }

        impl $name {
            /// Whether `self -> to` is a legal transition.
            pub fn can_transition(self, to: $name) -> bool {
                <$name as $crate::lifecycle::StateMachine>::allowed(self, to)
            }

            /// Performs a checked transition; on error the state is unchanged.
            pub fn transition(&mut self, to: $name) -> Result<(), $crate::lifecycle::InvalidTransition> {
                $crate::lifecycle::StateMachine::step(self, to)
            }

            /// Ok when the state is `want` (a request that needs that state).
            pub fn expect(self, want: $name) -> Result<(), $crate::lifecycle::InvalidTransition> {
                $crate::lifecycle::StateMachine::require(self, want)
            }
        }
    };
}

state_machine! {
    /// Lifecycle of a sandbox (one microVM plus its agent).
    pub enum SandboxState: "sandbox" {
        /// Actor exists, nothing started.
        Created => "created",
        /// VM is booting; waiting for the agent.
        Starting => "starting",
        /// Agent answered; processes can be run.
        Running => "running",
        /// Teardown in progress.
        Stopping => "stopping",
        /// VM gone, resources released.
        Stopped => "stopped",
        /// The VM or agent died unexpectedly (terminal until stopped).
        Failed => "failed",
    }
    transitions {
        Created => Starting | Stopped,
        Starting => Running | Failed | Stopping,
        Running => Stopping | Failed,
        Failed => Stopping,
        Stopping => Stopped,
    }
}

state_machine! {
    /// Lifecycle of a VM as seen by the Hypervisor actor.
    pub enum VmState: "vm" {
        NotStarted => "not-started",
        Running => "running",
        Stopping => "stopping",
        Exited => "exited",
    }
    transitions {
        NotStarted => Running | Exited,
        Running => Stopping | Exited,
        Stopping => Exited,
    }
}

/// Test helper: asserts that the legal transitions among `all` are exactly `allowed`, listed
/// in the order of `all` (from, then to).
#[cfg(test)]
pub(crate) fn assert_transitions<S: StateMachine + fmt::Debug>(all: &[S], allowed: &[(S, S)]) {
    let pairs = all.iter().flat_map(|&f| all.iter().map(move |&t| (f, t)));
    let legal: Vec<_> = pairs.filter(|&(f, t)| S::allowed(f, t)).collect();
    assert_eq!(legal, allowed, "legal {} transitions", S::WHAT);
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
    fn sandbox_transition_table_is_exact() {
        use SandboxState::*;
        let all = [Created, Starting, Running, Stopping, Stopped, Failed];
        let allowed = [
            (Created, Starting),
            (Created, Stopped),
            (Starting, Running),
            (Starting, Stopping),
            (Starting, Failed),
            (Running, Stopping),
            (Running, Failed),
            (Stopping, Stopped),
            (Failed, Stopping),
        ];
        assert_transitions(&all, &allowed);
    }

    #[test]
    fn vm_transitions() {
        use VmState::*;
        assert_transitions(
            &[NotStarted, Running, Stopping, Exited],
            &[
                (NotStarted, Running),
                (NotStarted, Exited),
                (Running, Stopping),
                (Running, Exited),
                (Stopping, Exited),
            ],
        );
        let mut v = VmState::NotStarted;
        assert_eq!(v.to_string(), "not-started");
        v.transition(VmState::Running).unwrap();
        v.transition(VmState::Stopping).unwrap();
        v.transition(VmState::Exited).unwrap();
        let e = v.transition(VmState::Running).unwrap_err();
        assert_eq!(e, InvalidTransition::new("vm", "exited", "running"));
        assert_eq!(
            VmState::NotStarted.check(VmState::Stopping).unwrap_err().to_string(),
            "invalid vm state transition: not-started -> stopping"
        );
    }

    #[test]
    fn expect_names_the_request() {
        assert!(SandboxState::Running.expect(SandboxState::Running).is_ok());
        let e = SandboxState::Stopped.expect(SandboxState::Running).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid sandbox (request) state transition: stopped -> running"
        );
    }
}
