//! The Hypervisor actor and its backends.
//!
//! The actor owns the backend (today: QEMU `microvm`; the built-in VMM joins later). Device
//! threads (the vsock device) are owned by the backend and only talk to async code through
//! channels with timeouts.

pub mod host;
pub mod qemu;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;

use crate::lifecycle::{InvalidTransition, VmState};

/// Accelerator used for guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        })
    }
}

/// Which backend runs the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Qemu,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Qemu => "qemu",
        })
    }
}

/// How the VM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    Exited(i32),
    Signaled(i32),
    WaitFailed(String),
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Exited(c) => write!(f, "exited with code {c}"),
            VmExit::Signaled(s) => write!(f, "killed by signal {s}"),
            VmExit::WaitFailed(e) => write!(f, "wait failed: {e}"),
        }
    }
}

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    /// Per-sandbox state directory (must exist).
    pub state_dir: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_params: String,
    pub qemu_binary: PathBuf,
    pub accel: Accelerator,
    pub guest_cid: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("QEMU binary not found: {0}")]
    QemuNotFound(String),
    #[error("failed to start {binary}: {source}")]
    Spawn { binary: String, source: std::io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("vsock device: {0}")]
    Device(String),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("VM process {0} did not exit after SIGKILL")]
    StopTimeout(u32),
    #[error("no VM is running")]
    NotRunning,
    #[error(transparent)]
    State(#[from] InvalidTransition),
}

/// Reply to [`StartVm`].
#[derive(Debug, Clone)]
pub struct VmStarted {
    pub pid: u32,
    /// Hybrid-vsock unix socket of the guest (`CONNECT <port>`).
    pub vsock_uds: PathBuf,
    pub console_log: PathBuf,
    pub qemu_log: PathBuf,
    /// Turns `Some` when the VM process has exited.
    pub exit: watch::Receiver<Option<VmExit>>,
}

/// Starts the VM described by the spec.
#[derive(Message)]
#[rtype(result = "Result<VmStarted, HypervisorError>")]
pub struct StartVm(pub VmSpec);

/// Stops the VM (after `grace` for the guest to power off by itself).
#[derive(Message)]
#[rtype(result = "Result<StopReport, HypervisorError>")]
pub struct StopVm {
    pub grace: Duration,
}

/// Reply to [`StopVm`].
#[derive(Debug, Clone)]
pub struct StopReport {
    pub method: qemu::StopMethod,
    pub exit: VmExit,
}

/// The Hypervisor actor: owns the VM backend.
pub struct HypervisorActor {
    vm: Option<qemu::QemuVm>,
    state: VmState,
}

impl HypervisorActor {
    pub fn new() -> Self {
        HypervisorActor {
            vm: None,
            state: VmState::NotStarted,
        }
    }
}

impl Default for HypervisorActor {
    fn default() -> Self {
        Self::new()
    }
}

impl Actor for HypervisorActor {
    type Context = Context<Self>;
}

impl Handler<StartVm> for HypervisorActor {
    type Result = Result<VmStarted, HypervisorError>;

    fn handle(&mut self, msg: StartVm, _ctx: &mut Context<Self>) -> Self::Result {
        if !self.state.can_transition(VmState::Running) {
            return Err(InvalidTransition {
                what: "vm",
                from: self.state.to_string(),
                to: VmState::Running.to_string(),
            }
            .into());
        }
        let vm = qemu::QemuVm::start(&msg.0)?;
        self.state.transition(VmState::Running)?;
        let started = VmStarted {
            pid: vm.pid,
            vsock_uds: vm.paths.vsock_uds.clone(),
            console_log: vm.paths.console_log.clone(),
            qemu_log: vm.paths.qemu_log.clone(),
            exit: vm.exit_watch(),
        };
        self.vm = Some(vm);
        Ok(started)
    }
}

impl Handler<StopVm> for HypervisorActor {
    type Result = ResponseActFuture<Self, Result<StopReport, HypervisorError>>;

    fn handle(&mut self, msg: StopVm, _ctx: &mut Context<Self>) -> Self::Result {
        let vm = self.vm.take();
        if vm.is_some() && self.state == VmState::Running {
            let _ = self.state.transition(VmState::Stopping);
        }
        let fut = async move {
            match vm {
                Some(vm) => vm
                    .stop(msg.grace)
                    .await
                    .map(|(method, exit)| StopReport { method, exit }),
                None => Err(HypervisorError::NotRunning),
            }
        };
        Box::pin(fut.into_actor(self).map(|res, act, _ctx| {
            if res.is_ok() {
                let _ = act.state.transition(VmState::Exited);
            }
            res
        }))
    }
}
