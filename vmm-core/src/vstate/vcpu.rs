//! vCPUs: creation/configuration, the checked state machine, and one OS
//! thread per vCPU running `KVM_RUN`.
//!
//! Control: a bounded command channel per vCPU plus a *kick* — the
//! [`kick_signal`] sent with `pthread_kill`. Its handler sets
//! `kvm_run.immediate_exit` of the vCPU running on that thread (found through
//! a thread-local pointer), so a kick that races with the thread entering
//! `KVM_RUN` is never lost: `KVM_RUN` returns `EINTR` at once and the thread
//! then looks at its command channel. Every wait on a channel has a timeout.

use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use kvm_bindings::{
    kvm_run, CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::metrics::{ExitReason, VcpuMetrics};
use super::{cpuid, regs};
use crate::thread::{join_with_deadline, JoinError};
use crate::vmm::bus::Bus;
use crate::vmm::event::{EventSender, VmEvent};

/// Offset from SIGRTMIN of the vCPU kick signal.
pub const VCPU_KICK_SIGNAL_OFFSET: i32 = 0;
/// How often an idle (paused / guest-stopped) vCPU thread re-checks its channel.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Capacity of the command and response channels.
const CHANNEL_CAPACITY: usize = 8;

/// Errors of vCPU setup and control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU {id}: {source}")]
    Create {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_CPUID2: {0}")]
    SetCpuid(#[source] kvm_ioctls::Error),
    #[error("cpuid: {0}")]
    Cpuid(#[from] cpuid::CpuidError),
    #[error("registers: {0}")]
    Regs(#[from] regs::RegsError),
    #[error("invalid vCPU state transition {from:?} -> {to:?}")]
    InvalidTransition { from: VcpuState, to: VcpuState },
    #[error("registering the vCPU kick signal handler: {0}")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("spawning vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("vCPU {0}: kick signal: {1}")]
    Kick(u8, #[source] vmm_sys_util::errno::Error),
    #[error("vCPU {0}: command channel full or closed")]
    Send(u8),
    #[error("vCPU {0}: no response within {1:?}")]
    Timeout(u8, Duration),
    #[error("vCPU {0}: thread is gone")]
    Disconnected(u8),
}

/// vCPU lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Configured, thread not started.
    Created,
    /// Running guest code.
    Running,
    /// Paused by the owner; not running guest code.
    Paused,
    /// Stopped running guest code because of a guest event (reset, triple fault, error).
    GuestStopped,
    /// Thread finished.
    Exited,
}

impl VcpuState {
    /// Whether `self -> next` is a legal transition.
    pub fn can_transition_to(self, next: VcpuState) -> bool {
        use VcpuState::*;
        matches!(
            (self, next),
            (Created, Running)
                | (Created, Exited)
                | (Running, Paused)
                | (Running, GuestStopped)
                | (Running, Exited)
                | (Paused, Running)
                | (Paused, Exited)
                | (GuestStopped, Exited)
        )
    }

    /// Checked transition.
    pub fn transition(self, next: VcpuState) -> Result<VcpuState, VcpuError> {
        if self.can_transition_to(next) {
            Ok(next)
        } else {
            Err(VcpuError::InvalidTransition {
                from: self,
                to: next,
            })
        }
    }
}

/// Commands to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    Pause,
    Resume,
    Stop,
}

/// A vCPU thread's answer to a command: its state after handling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuResponse {
    pub id: u8,
    pub state: VcpuState,
}

thread_local! {
    /// `kvm_run` of the vCPU running on this thread (null when none).
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // Only async-signal-safe work: a const-initialized thread-local read and a volatile store.
    let p = KVM_RUN_PTR
        .try_with(|c| c.get())
        .unwrap_or(std::ptr::null_mut());
    if !p.is_null() {
        // SAFETY: `p` points to the kvm_run mapping of the vCPU owned by this thread; it is
        // set when the run loop starts and cleared before the vCPU (and the mapping) is dropped.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), 1) };
    }
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN() + VCPU_KICK_SIGNAL_OFFSET
}

/// Registers the (process-wide) kick signal handler once.
pub fn register_kick_handler() -> Result<(), VcpuError> {
    static RESULT: OnceLock<i32> = OnceLock::new();
    let r = *RESULT.get_or_init(|| {
        register_signal_handler(kick_signal(), kick_handler)
            .map(|_| 0)
            .unwrap_or_else(|e| e.errno())
    });
    if r == 0 {
        Ok(())
    } else {
        Err(VcpuError::SignalHandler(vmm_sys_util::errno::Error::new(r)))
    }
}

/// Everything needed to put a vCPU at the 64-bit kernel entry.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub entry: u64,
    pub boot_params: u64,
}

/// A vCPU before its thread starts.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: EventSender,
    cmd_rx: Receiver<VcpuCommand>,
    resp_tx: Sender<VcpuResponse>,
    cmd_tx: Sender<VcpuCommand>,
    resp_rx: Receiver<VcpuResponse>,
    state: VcpuState,
    metrics: Arc<VcpuMetrics>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .field("state", &self.state)
            .finish()
    }
}

enum Outcome {
    Continue,
    Interrupted,
    Stopped(VmEvent),
    InternalError,
}

impl Vcpu {
    /// Creates vCPU `id` in `vm`.
    pub fn new(
        id: u8,
        vm: &VmFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        events: EventSender,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        let (cmd_tx, cmd_rx) = bounded(CHANNEL_CAPACITY);
        let (resp_tx, resp_rx) = bounded(CHANNEL_CAPACITY);
        Ok(Vcpu {
            id,
            fd,
            pio,
            mmio,
            events,
            cmd_rx,
            resp_tx,
            cmd_tx,
            resp_rx,
            state: VcpuState::Created,
            metrics: Arc::new(VcpuMetrics::default()),
        })
    }

    /// Counts this vCPU's exits in `m` (shared by the vCPUs of a VM) instead of its own counters.
    pub fn set_metrics(&mut self, m: Arc<VcpuMetrics>) {
        self.metrics = m;
    }

    /// The exit counters this vCPU bumps.
    pub fn metrics(&self) -> &Arc<VcpuMetrics> {
        &self.metrics
    }

    /// vCPU index (also its APIC id).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The KVM vCPU fd (for further configuration).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// CPUID, MSRs, registers, FPU and LAPIC for the 64-bit boot protocol entry.
    /// Guest memory (GDT, page tables) is prepared by [`regs::configure_sregs`].
    pub fn configure(
        &self,
        base_cpuid: &CpuId,
        vcpu_count: u8,
        boot: BootEntry,
    ) -> Result<(), VcpuError> {
        let c = cpuid::vcpu_cpuid(base_cpuid, self.id, vcpu_count)?;
        self.fd.set_cpuid2(&c).map_err(VcpuError::SetCpuid)?;
        regs::setup_msrs(&self.fd)?;
        regs::setup_regs(&self.fd, boot.entry, boot.boot_params)?;
        regs::setup_sregs(&self.fd)?;
        regs::setup_fpu(&self.fd)?;
        regs::setup_lint(&self.fd)?;
        Ok(())
    }

    /// Starts the vCPU thread (running guest code immediately).
    pub fn start(mut self) -> Result<VcpuHandle, VcpuError> {
        register_kick_handler()?;
        self.state = self.state.transition(VcpuState::Running)?;
        let id = self.id;
        let cmd_tx = self.cmd_tx.clone();
        let resp_rx = self.resp_rx.clone();
        let events = self.events.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // A panic (a bug, or an injected failpoint) becomes a VM event: the owner stops
                // the VM instead of waiting for a vCPU that is gone.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_loop()));
                let reason = match r {
                    Ok(true) => return,
                    Ok(false) => format!("failpoint {}", crate::failpoints::VCPU_RUN),
                    Err(p) => format!("panicked: {}", crate::vmm::event::panic_message(&*p)),
                };
                tracing::error!(vcpu = id, "vCPU thread failed: {reason}");
                events.emit(VmEvent::ThreadFailed {
                    thread: format!("vcpu{id}"),
                    reason,
                });
            })
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle {
            id,
            cmd_tx,
            resp_rx,
            thread: Some(thread),
        })
    }

    fn respond(&self) {
        let r = VcpuResponse {
            id: self.id,
            state: self.state,
        };
        if let Err(TrySendError::Full(_)) = self.resp_tx.try_send(r) {
            tracing::warn!(
                vcpu = self.id,
                "vCPU response channel full; response dropped"
            );
        }
    }

    /// Applies a command; returns false when the thread must exit.
    fn handle_command(&mut self, cmd: VcpuCommand) -> bool {
        use VcpuState::*;
        let next = match (cmd, self.state) {
            (VcpuCommand::Pause, Running) => Paused,
            (VcpuCommand::Resume, Paused) => Running,
            (VcpuCommand::Stop, _) => Exited,
            // Idempotent / not applicable: answer with the current state.
            (_, s) => s,
        };
        if next != self.state {
            match self.state.transition(next) {
                Ok(s) => self.state = s,
                Err(e) => tracing::warn!(vcpu = self.id, "{e}"),
            }
        }
        if self.state == Running {
            // A kick that arrived while paused must not cause a spurious EINTR later.
            self.fd.set_kvm_immediate_exit(0);
        }
        tracing::debug!(vcpu = self.id, ?cmd, state = ?self.state, "vCPU command");
        self.respond();
        self.state != Exited
    }

    /// The thread's body; false when the `vmm::vcpu_run` failpoint ended it.
    fn run_loop(mut self) -> bool {
        crate::seccomp::apply_or_log(crate::seccomp::ThreadClass::Vcpu);
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|c| c.set(run_ptr));
        // Cleared however the loop ends (a panic too), before `self` (the mapping) is dropped.
        struct ClearRunPtr;
        impl Drop for ClearRunPtr {
            fn drop(&mut self) {
                KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
            }
        }
        let _clear = ClearRunPtr;
        // Threads inherit the creator's signal mask; the kick must get through.
        let _ = vmm_sys_util::signal::unblock_signal(kick_signal());
        tracing::debug!(vcpu = self.id, "vCPU thread running");
        loop {
            match self.state {
                VcpuState::Running => {
                    match self.cmd_rx.try_recv() {
                        Ok(cmd) => {
                            if !self.handle_command(cmd) {
                                break;
                            }
                            continue;
                        }
                        Err(TryRecvError::Disconnected) => break,
                        Err(TryRecvError::Empty) => {}
                    }
                    if crate::failpoints::fired(crate::failpoints::VCPU_RUN).is_some() {
                        return false;
                    }
                    match self.run_once() {
                        Outcome::Continue => {}
                        Outcome::Interrupted => self.fd.set_kvm_immediate_exit(0),
                        Outcome::Stopped(ev) => self.guest_stopped(ev),
                        Outcome::InternalError => {
                            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
                            // `internal` union member is the one KVM filled in.
                            let internal =
                                unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                            let n = (internal.ndata as usize).min(internal.data.len());
                            let ev = VmEvent::InternalError {
                                vcpu: self.id,
                                suberror: internal.suberror,
                                data: internal.data[..n].to_vec(),
                            };
                            self.guest_stopped(ev);
                        }
                    }
                }
                VcpuState::Paused | VcpuState::GuestStopped => {
                    match self.cmd_rx.recv_timeout(IDLE_POLL) {
                        Ok(cmd) => {
                            if !self.handle_command(cmd) {
                                break;
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                VcpuState::Created | VcpuState::Exited => break,
            }
        }
        KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
        self.state = VcpuState::Exited;
        tracing::debug!(vcpu = self.id, "vCPU thread exiting");
        true
    }

    fn guest_stopped(&mut self, ev: VmEvent) {
        tracing::info!(vcpu = self.id, ?ev, "vCPU stopped by guest event");
        match self.state.transition(VcpuState::GuestStopped) {
            Ok(s) => self.state = s,
            Err(e) => tracing::warn!(vcpu = self.id, "{e}"),
        }
        self.events.emit(ev);
    }

    fn run_once(&mut self) -> Outcome {
        let id = self.id;
        let m = &self.metrics;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    m.exit(ExitReason::IoIn);
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    Outcome::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    m.exit(ExitReason::IoOut);
                    if !self.pio.write(u64::from(port), data) {
                        tracing::trace!(vcpu = id, port, "write to unmapped port");
                    }
                    Outcome::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    m.exit(ExitReason::MmioRead);
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                    Outcome::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    m.exit(ExitReason::MmioWrite);
                    if !self.mmio.write(addr, data) {
                        tracing::trace!(vcpu = id, addr, "write to unmapped MMIO");
                    }
                    Outcome::Continue
                }
                VcpuExit::Hlt => {
                    m.exit(ExitReason::Hlt);
                    Outcome::Stopped(VmEvent::Halted { vcpu: id })
                }
                VcpuExit::Shutdown => {
                    m.exit(ExitReason::Shutdown);
                    Outcome::Stopped(VmEvent::TripleFault { vcpu: id })
                }
                VcpuExit::SystemEvent(kind, _) => {
                    m.exit(ExitReason::Other);
                    Outcome::Stopped(match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::Shutdown { vcpu: id },
                        KVM_SYSTEM_EVENT_RESET => VmEvent::Reset,
                        KVM_SYSTEM_EVENT_CRASH => VmEvent::Crash { vcpu: id },
                        other => VmEvent::UnhandledExit {
                            vcpu: id,
                            reason: format!("system event {other}"),
                        },
                    })
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    m.exit(ExitReason::FailEntry);
                    Outcome::Stopped(VmEvent::FailEntry {
                        vcpu: id,
                        reason,
                        cpu,
                    })
                }
                VcpuExit::InternalError => {
                    m.exit(ExitReason::InternalError);
                    Outcome::InternalError
                }
                VcpuExit::Intr => {
                    m.exit(ExitReason::Intr);
                    Outcome::Interrupted
                }
                other => {
                    m.exit(ExitReason::Other);
                    Outcome::Stopped(VmEvent::UnhandledExit {
                        vcpu: id,
                        reason: format!("{other:?}"),
                    })
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                m.exit(ExitReason::Intr);
                Outcome::Interrupted
            }
            Err(e) => Outcome::Stopped(VmEvent::VcpuError {
                vcpu: id,
                errno: e.errno(),
            }),
        }
    }
}

/// Owner's handle on a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    cmd_tx: Sender<VcpuCommand>,
    resp_rx: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Queues `cmd` and kicks the thread out of `KVM_RUN`.
    pub fn send(&self, cmd: VcpuCommand, timeout: Duration) -> Result<(), VcpuError> {
        self.cmd_tx
            .send_timeout(cmd, timeout)
            .map_err(|_| VcpuError::Send(self.id))?;
        self.kick()
    }

    /// Sends the kick signal to the vCPU thread.
    pub fn kick(&self) -> Result<(), VcpuError> {
        match &self.thread {
            Some(t) if !t.is_finished() => t
                .kill(kick_signal())
                .map_err(|e| VcpuError::Kick(self.id, e)),
            _ => Ok(()),
        }
    }

    /// Waits for the next response.
    pub fn recv(&self, timeout: Duration) -> Result<VcpuResponse, VcpuError> {
        self.resp_rx.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuError::Timeout(self.id, timeout),
            RecvTimeoutError::Disconnected => VcpuError::Disconnected(self.id),
        })
    }

    /// Sends `cmd` and waits (bounded) for the response, skipping stale ones.
    pub fn command(&self, cmd: VcpuCommand, timeout: Duration) -> Result<VcpuState, VcpuError> {
        while self.resp_rx.try_recv().is_ok() {}
        let deadline = std::time::Instant::now() + timeout;
        self.send(cmd, timeout)?;
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        Ok(self.recv(left)?.state)
    }

    /// Joins the thread if it ends within `timeout` (call after the thread acknowledged `Stop`);
    /// returns whether it was joined. A thread that misses the deadline is left detached.
    pub fn join_finished(&mut self, timeout: Duration) -> bool {
        let Some(t) = self.thread.take() else {
            return true;
        };
        match join_with_deadline(t, timeout) {
            Ok(()) => true,
            Err(JoinError::Panicked) => {
                tracing::error!(vcpu = self.id, "vCPU thread panicked");
                true
            }
            Err(JoinError::Timeout(_)) => false,
        }
    }

    /// Whether the thread has finished (or was joined or left detached).
    pub fn is_finished(&self) -> bool {
        match &self.thread {
            Some(t) => t.is_finished(),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VcpuState::*;

    #[test]
    fn state_machine_transitions() {
        let all = [Created, Running, Paused, GuestStopped, Exited];
        let allowed = [
            (Created, Running),
            (Created, Exited),
            (Running, Paused),
            (Running, GuestStopped),
            (Running, Exited),
            (Paused, Running),
            (Paused, Exited),
            (GuestStopped, Exited),
        ];
        for a in all {
            for b in all {
                let ok = allowed.contains(&(a, b));
                assert_eq!(a.can_transition_to(b), ok, "{a:?} -> {b:?}");
                match a.transition(b) {
                    Ok(s) => assert!(ok && s == b),
                    Err(VcpuError::InvalidTransition { from, to }) => {
                        assert!(!ok && from == a && to == b)
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
            }
        }
    }

    #[test]
    fn exited_is_terminal() {
        for s in [Created, Running, Paused, GuestStopped, Exited] {
            assert!(!Exited.can_transition_to(s));
        }
    }
}
