//! Events the VM reports to its owner through a bounded channel.

use crossbeam_channel::{Sender, TrySendError};

/// Something the guest (or KVM) did that the owner of the VM must act on.
/// After any event but none, the vCPU that reported it stops running guest
/// code; the owner normally calls [`crate::vmm::Vmm::stop`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest asked for a reset (i8042 command 0xFE, or a KVM reset system event).
    Reset,
    /// The guest powered off (KVM_SYSTEM_EVENT_SHUTDOWN).
    Shutdown { vcpu: u8 },
    /// KVM_EXIT_SHUTDOWN: the vCPU triple faulted.
    TripleFault { vcpu: u8 },
    /// The guest reported a crash (KVM_SYSTEM_EVENT_CRASH).
    Crash { vcpu: u8 },
    /// KVM_EXIT_HLT reached userspace (only without an in-kernel LAPIC).
    Halted { vcpu: u8 },
    /// KVM_EXIT_INTERNAL_ERROR.
    InternalError {
        vcpu: u8,
        suberror: u32,
        data: Vec<u64>,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry { vcpu: u8, reason: u64, cpu: u32 },
    /// KVM_RUN failed with `errno`.
    VcpuError { vcpu: u8, errno: i32 },
    /// An exit the VMM does not handle.
    UnhandledExit { vcpu: u8, reason: String },
    /// A thread of the VM (a vCPU, the device event loop) ended on its own: it panicked, or
    /// its loop failed. The VM cannot go on.
    ThreadFailed { thread: String, reason: String },
}

/// What a caught panic says (its `&str` or `String` payload).
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Sending half of the event channel; never blocks (a full channel drops the
/// event with a warning, so a vCPU thread can never hang on a slow owner).
#[derive(Debug, Clone)]
pub struct EventSender(pub(crate) Sender<VmEvent>);

impl EventSender {
    /// Wraps a sender.
    pub fn new(tx: Sender<VmEvent>) -> Self {
        EventSender(tx)
    }

    /// Emits `ev`; returns false if it was dropped.
    pub fn emit(&self, ev: VmEvent) -> bool {
        match self.0.try_send(ev) {
            Ok(()) => true,
            Err(TrySendError::Full(ev)) => {
                tracing::warn!(?ev, "VM event channel full; event dropped");
                false
            }
            Err(TrySendError::Disconnected(ev)) => {
                tracing::debug!(?ev, "VM event channel closed; event dropped");
                false
            }
        }
    }
}
