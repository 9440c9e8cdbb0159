//! Failpoints of the VMM and its devices for the fault-injection harness (docs/faults.md),
//! compiled in only with the `failpoints` cargo feature (the `fail` crate): without it
//! [`fired`] is `None`, always, and costs nothing.
//!
//! The points are set per process (a shim or `joeyctl` serves one sandbox) from the config key
//! `debug.failpoints` (`joey_shim::failpoints::setup`). The `fail` crate runs the actions
//! `panic`, `sleep(<ms>)`, `pause` (hang until the point is reconfigured), `delay(<ms>)` and
//! `print` itself; `return(<arg>)` is what each point's code does with [`fired`]'s answer, as
//! its doc in [`NAMES`] says.

/// Every failpoint of this crate, with what its `return(<arg>)` does.
pub const NAMES: &[(&str, &str)] = &[
    (
        VSOCK_TX,
        "guest->host packet: `return(drop)` drops the host side of its connection (the guest gets a reset)",
    ),
    (
        VSOCK_RX,
        "host->guest data read from a host connection: `return(drop)` drops that connection",
    ),
    (
        FS_REQUEST,
        "one FUSE request: `return` fails it (the chain goes back with length 0); `panic` panics the device thread",
    ),
    (
        NET_TX,
        "guest->host frame: `return` drops the frame",
    ),
    (
        NET_RX,
        "host->guest frame: `return` drops the frame",
    ),
    (
        VCPU_RUN,
        "built-in VMM, before each KVM_RUN of a vCPU thread: `return` ends the thread as if KVM_RUN failed",
    ),
    (
        EVENT_LOOP,
        "built-in VMM, each turn of the virtio device event loop: `return` ends the loop",
    ),
];

/// Failpoint name: the vsock device, guest -> host.
pub const VSOCK_TX: &str = "vsock::tx";
/// Failpoint name: the vsock device, host -> guest.
pub const VSOCK_RX: &str = "vsock::rx";
/// Failpoint name: a virtio-fs request.
pub const FS_REQUEST: &str = "fs::request";
/// Failpoint name: virtio-net, guest -> host.
pub const NET_TX: &str = "net::tx";
/// Failpoint name: virtio-net, host -> guest.
pub const NET_RX: &str = "net::rx";
/// Failpoint name: the built-in VMM's vCPU loop.
pub const VCPU_RUN: &str = "vmm::vcpu_run";
/// Failpoint name: the built-in VMM's device event loop.
pub const EVENT_LOOP: &str = "vmm::event_loop";

/// Evaluates failpoint `name`: `Some(arg)` when its action is `return(arg)` (`""` for a bare
/// `return`), `None` when it is off (or this build has no failpoints). Panics, sleeps and
/// pauses happen inside.
#[inline]
pub fn fired(name: &str) -> Option<String> {
    #[cfg(feature = "failpoints")]
    {
        fail::eval(name, |arg| arg.unwrap_or_default())
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        None
    }
}

/// Whether a panic's message is the `fail` crate's `panic` action on one of [`NAMES`]
/// (`failpoint <name> panic`): an expected panic, logged as a warning.
pub fn is_injected_panic(message: &str) -> bool {
    panicked_failpoint(message).is_some_and(|n| NAMES.iter().any(|(name, _)| *name == n))
}

/// The failpoint a panic's message names, if it is the `fail` crate's `panic` action
/// (`failpoint <name> panic`), whatever crate the point is in.
pub fn panicked_failpoint(message: &str) -> Option<&str> {
    message
        .strip_prefix("failpoint ")
        .and_then(|m| m.strip_suffix(" panic"))
}

/// Whether this build has failpoints.
pub const ENABLED: bool = cfg!(feature = "failpoints");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_area_and_point() {
        for (n, _) in NAMES {
            let (area, point) = n.split_once("::").unwrap();
            assert!(!area.is_empty() && !point.is_empty(), "{n}");
        }
    }

    #[test]
    fn injected_panics_are_told_apart() {
        assert!(is_injected_panic("failpoint vmm::vcpu_run panic"));
        assert!(!is_injected_panic("failpoint nosuch::point panic"));
        assert!(!is_injected_panic("index out of bounds"));
    }

    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn without_the_feature_nothing_fires() {
        const { assert!(!ENABLED) };
        assert_eq!(fired(VSOCK_TX), None);
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn return_gives_its_argument() {
        fail::cfg("test::point", "return(drop)").unwrap();
        assert_eq!(fired("test::point").as_deref(), Some("drop"));
        fail::cfg("test::point", "return").unwrap();
        assert_eq!(fired("test::point").as_deref(), Some(""));
        fail::cfg("test::point", "off").unwrap();
        assert_eq!(fired("test::point"), None);
    }
}
