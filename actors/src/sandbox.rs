//! The Sandbox actor: owns the agent client and the sandbox lifecycle, and drives the
//! Hypervisor actor and the ShareFs actor. The ShareFs actor's reply to `SetupShareFs` (a
//! [`crate::sharefs::ShareFsDevice`]) goes into the VM spec; host probing, the state directory
//! and the console tail are blocking work and run on the blocking pool.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use actix::prelude::*;
use joey_agent_protocol::agent;
use joey_config::Config;
use tokio::sync::watch;

use crate::agent_client::{AgentClient, AgentError, RpcCode};
use crate::hypervisor::pooled::{self, LeaseOutcome};
use crate::hypervisor::{
    self, host, Accelerator, AdoptLease, BackendKind, HypervisorActor, HypervisorError, ReleaseVm, StartVm, StopVm,
    VmExit, VmSpec,
};
use crate::lifecycle::{InvalidTransition, SandboxState};
use crate::network::{NetworkActor, NetworkError, NetworkInfo, SetupNetwork, TeardownNetwork};
use crate::sharefs::{AdoptSharedDir, SetupShareFs, ShareFsActor, ShareFsError, ShareRootfs, StopShareFs, Unshare, VolumeShare};

/// Guest context id given to every sandbox's vsock device (each device is private to its VM).
pub const GUEST_CID: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Bad input from the user (config, missing files or binaries): exit code 2 in joeyctl.
    #[error("{0}")]
    BadInput(String),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    ShareFs(#[from] ShareFsError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("the VM {exit} unexpectedly{details}")]
    VmDied { exit: VmExit, details: String },
    #[error(transparent)]
    State(#[from] InvalidTransition),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("actor mailbox error: {0}")]
    Mailbox(String),
    #[error("blocking task failed: {0}")]
    Task(String),
    /// An `io.joey.config.*` annotation that may not apply (docs/config.md).
    #[error(transparent)]
    Annotation(#[from] joey_config::AnnotationError),
}

impl SandboxError {
    /// Whether the error was caused by bad input (configuration, missing files).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            SandboxError::BadInput(_)
                | SandboxError::Annotation(_)
                | SandboxError::Hypervisor(HypervisorError::QemuNotFound(_))
                | SandboxError::Network(
                    NetworkError::NetnsOpen { .. } | NetworkError::OwnNetns { .. } | NetworkError::Device { .. }
                )
        ) || matches!(self, SandboxError::Hypervisor(h) if h.is_bad_input())
    }
}

impl From<MailboxError> for SandboxError {
    fn from(e: MailboxError) -> Self {
        SandboxError::Mailbox(e.to_string())
    }
}

/// What a started sandbox reports.
#[derive(Debug, Clone)]
pub struct SandboxStarted {
    pub id: String,
    pub backend: BackendKind,
    pub backend_reason: String,
    pub accel: Accelerator,
    pub accel_reason: String,
    /// From asking the hypervisor to start the VM until the agent answered `Check`.
    pub vm_start_to_agent_ready: Duration,
    pub agent_version: String,
    pub kernel_release: String,
    pub vm_pid: u32,
    pub state_dir: PathBuf,
    /// How long the metrics endpoint waits for this actor (`metrics.reply_timeout()` of the
    /// sandbox's config): pass it to [`serve_metrics`].
    pub metrics_reply_timeout: Duration,
    /// The pod network carried into the VM (`None`: no network namespace was given).
    pub network: Option<NetworkInfo>,
    /// Where the VM came from (a pooled VM's `vm_start_to_agent_ready` is lease -> ready).
    pub source: VmSource,
    /// Pool: the leased VM's id; cold: why no pooled VM was used.
    pub source_detail: String,
}

/// Where a sandbox's VM came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmSource {
    /// Leased, already booted, from `joey-pool` (docs/pool.md).
    Pool,
    /// Booted for this sandbox.
    Cold,
}

impl std::fmt::Display for VmSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmSource::Pool => "pool",
            VmSource::Cold => "cold",
        })
    }
}

/// How long a sandbox waits for the pool's answer before it boots cold.
const LEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a stopped sandbox reports.
#[derive(Debug, Clone)]
pub struct SandboxStopped {
    pub teardown: Duration,
    pub method: Option<hypervisor::qemu::StopMethod>,
}

/// Boots the VM. With `netns` (the pod's network namespace: the `network` namespace path of the
/// sandbox container's OCI spec), the Network actor carries that namespace's interfaces into the
/// VM and the agent configures them before any container starts; without it the guest has only
/// its loopback.
#[derive(Message, Debug, Default)]
#[rtype(result = "Result<SandboxStarted, SandboxError>")]
pub struct StartSandbox {
    pub netns: Option<PathBuf>,
}

#[derive(Message)]
#[rtype(result = "Result<SandboxStopped, SandboxError>")]
pub struct StopSandbox;

/// A container's OCI annotations: its `io.joey.config.*` overrides (docs/config.md) become this
/// sandbox's config while the sandbox is still `Created` (before [`StartSandbox`] sizes the
/// VM); once it has started they are only checked, as the running VM cannot change. Refused
/// ones are [`SandboxError::Annotation`], naming the annotation; nothing changes then.
#[derive(Message)]
#[rtype(result = "Result<(), SandboxError>")]
pub struct ApplyAnnotations(pub Vec<(String, String)>);

#[derive(Message)]
#[rtype(result = "SandboxState")]
pub struct GetState;

#[derive(Message)]
#[rtype(result = "Result<u32, SandboxError>")]
pub struct ExecProcess(pub agent::ExecProcessRequest);

#[derive(Message)]
#[rtype(result = "Result<agent::WaitProcessResponse, SandboxError>")]
pub struct WaitProcess {
    pub exec_id: String,
}

#[derive(Message)]
#[rtype(result = "Result<(), SandboxError>")]
pub struct SignalProcess {
    pub exec_id: String,
    pub signal: u32,
    /// Every process of the container whose first process `exec_id` is (`kill --all`).
    pub all: bool,
}

#[derive(Message)]
#[rtype(result = "Result<u32, SandboxError>")]
pub struct WriteStdin {
    pub exec_id: String,
    pub data: Vec<u8>,
}

#[derive(Message)]
#[rtype(result = "Result<(), SandboxError>")]
pub struct CloseStdin {
    pub exec_id: String,
}

/// Reads process output; an empty reply means end of stream.
#[derive(Message)]
#[rtype(result = "Result<Vec<u8>, SandboxError>")]
pub struct ReadOutput {
    pub exec_id: String,
    pub stderr: bool,
    pub len: u32,
}

/// Reads the next chunk of a process's output through the Sandbox actor; `None` at end of
/// stream. The one read loop step shared by `joeyctl run` and the shim's stdio pumps.
pub async fn next_output(
    sb: &Addr<SandboxActor>,
    exec_id: &str,
    stderr: bool,
    len: u32,
) -> Result<Option<Vec<u8>>, SandboxError> {
    let data = sb
        .send(ReadOutput {
            exec_id: exec_id.to_string(),
            stderr,
            len,
        })
        .await??;
    Ok(if data.is_empty() { None } else { Some(data) })
}

/// The Sandbox actor.
pub struct SandboxActor {
    id: String,
    config: Config,
    config_origin: String,
    state: SandboxState,
    hypervisor: Addr<HypervisorActor>,
    agent: Option<AgentClient>,
    vm_exit: Option<watch::Receiver<Option<VmExit>>>,
    state_dir: PathBuf,
    console_log: Option<PathBuf>,
    /// This sandbox's metrics registry (served by [`serve_metrics`]).
    metrics: std::sync::Arc<joey_observability::SandboxMetrics>,
    /// Created by StartSandbox; owns the virtio-fs device and the shared dir.
    sharefs: Option<Addr<ShareFsActor>>,
    /// Created by StartSandbox when a network namespace was given; owns the taps and filters.
    network: Option<Addr<NetworkActor>>,
}

/// What an agent call needs: the client, the VM exit watch (to fail fast with VmDied) and the
/// console log (quoted in that error).
type AgentCall = (AgentClient, watch::Receiver<Option<VmExit>>, Option<PathBuf>);

impl SandboxActor {
    pub fn new(id: String, config: Config, config_origin: String, hypervisor: Addr<HypervisorActor>) -> Self {
        let state_dir = config.runtime.state_dir.join(&id);
        SandboxActor {
            id,
            config,
            config_origin,
            state: SandboxState::Created,
            hypervisor,
            agent: None,
            vm_exit: None,
            state_dir,
            console_log: None,
            // The metric definitions are constants (unit-tested in joey-observability).
            metrics: std::sync::Arc::new(
                joey_observability::SandboxMetrics::new().expect("joey metric definitions are valid"),
            ),
            sharefs: None,
            network: None,
        }
    }

    /// This sandbox's metrics registry (served on its metrics endpoint).
    pub fn metrics(&self) -> std::sync::Arc<joey_observability::SandboxMetrics> {
        self.metrics.clone()
    }

    fn agent(&self) -> Result<AgentCall, SandboxError> {
        match (&self.agent, &self.vm_exit, self.state) {
            (Some(a), Some(x), SandboxState::Running) => Ok((a.clone(), x.clone(), self.console_log.clone())),
            _ => Err(InvalidTransition::new("sandbox (agent call)", self.state, SandboxState::Running).into()),
        }
    }
}

/// Runs `fut`, but fails with `VmDied` as soon as the VM process exits.
async fn guarded<T, F>(
    mut exit: watch::Receiver<Option<VmExit>>,
    console: Option<PathBuf>,
    fut: F,
) -> Result<T, SandboxError>
where
    F: std::future::Future<Output = Result<T, AgentError>>,
{
    let finished = tokio::select! {
        r = fut => Ok(r),
        ex = exit.wait_for(|v| v.is_some()) => Err(ex.ok().and_then(|v| v.clone())),
    };
    let r = match finished {
        Ok(r) => r,
        Err(exit) => return Err(vm_died(exit, console).await),
    };
    match r {
        // A VM that dies breaks the agent connection a moment before its exit is recorded:
        // a broken connection followed by the VM's exit is the VM dying, not the agent.
        Err(
            e @ AgentError::Rpc {
                code: RpcCode::Transport,
                ..
            },
        ) => {
            let died = match tokio::time::timeout(VM_EXIT_GRACE, exit.wait_for(|v| v.is_some())).await {
                Ok(ex) => ex.ok().and_then(|v| v.clone()),
                Err(_) => return Err(e.into()),
            };
            Err(vm_died(died, console).await)
        }
        r => r.map_err(SandboxError::from),
    }
}

/// How long a broken agent connection waits for the VM's exit to be recorded.
const VM_EXIT_GRACE: Duration = Duration::from_secs(2);

/// `VmDied` with the last console lines (read, capped, on the blocking pool).
async fn vm_died(exit: Option<VmExit>, console: Option<PathBuf>) -> SandboxError {
    let exit = exit.unwrap_or(VmExit::WaitFailed("watch closed".into()));
    let tail = match console {
        Some(p) => blocking(move || hypervisor::tail(&p, 5)).await.unwrap_or_default(),
        None => String::new(),
    };
    let mut details = match joey_vmm_core::seccomp::violations() {
        (0, _) => String::new(),
        (n, last) => format!("; {n} seccomp violation(s) trapped in the runtime, the last: syscall {}", last.unwrap_or(-1)),
    };
    if !tail.trim().is_empty() {
        details.push_str(&format!("; last console lines:\n{tail}"));
    }
    SandboxError::VmDied { exit, details }
}

/// Runs blocking work (filesystem, host probing) on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, SandboxError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SandboxError::Task(e.to_string()))
}

/// Removes the sandbox state dir (on the blocking pool); gone already is fine.
async fn remove_state_dir(dir: PathBuf) {
    let shown = dir.display().to_string();
    match blocking(move || std::fs::remove_dir_all(&dir)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(Err(e)) => tracing::warn!(error = %e, dir = %shown, "removing sandbox state dir failed"),
        Err(e) => tracing::warn!(error = %e, dir = %shown, "removing sandbox state dir failed"),
    }
}

/// What StartSandbox decided before anything runs.
pub struct Prepared {
    pub spec: VmSpec,
    pub backend: BackendKind,
    pub backend_reason: String,
    pub accel: host::AccelChoice,
}

/// Asks the pool for a VM like `p`'s when the config has a pool (`pool.size` > 0) and the
/// sandbox can use one: a QEMU VM without a pod network (a pooled VM has no network device and
/// microvm cannot hotplug one, docs/pool.md).
async fn try_lease(cfg: &Config, p: &Prepared, netns: bool) -> LeaseOutcome {
    if cfg.pool.size == 0 {
        return LeaseOutcome::Cold("pool.size is 0".into());
    }
    if netns {
        return LeaseOutcome::Cold("the sandbox has a pod network".into());
    }
    if p.backend != BackendKind::Qemu {
        return LeaseOutcome::Cold(format!("the pool runs QEMU VMs, this sandbox runs on {}", p.backend));
    }
    pooled::lease(&cfg.runtime.state_dir, pooled::Shape::of(&p.spec), LEASE_TIMEOUT).await
}

/// Picks the backend for the host (its KVM, the files and binaries that backend needs), then
/// creates the state dir. Blocking.
pub fn prepare(cfg: &Config, origin: &str, id: &str, state_dir: &Path) -> Result<Prepared, SandboxError> {
    let p = plan(cfg, origin, id, state_dir)?;
    make_state_dir(state_dir)?;
    Ok(p)
}

/// What [`prepare`] decides (backend, VM spec), without creating anything. Blocking.
pub fn plan(cfg: &Config, origin: &str, id: &str, state_dir: &Path) -> Result<Prepared, SandboxError> {
    let flavor = host::detect_kvm(&host::HostPaths::default());
    let hypervisor::BackendSelection {
        backend,
        backend_reason,
        accel,
        kernel,
    } = hypervisor::select_backend(cfg, origin, &flavor)?;
    tracing::info!(sandbox = %id, %backend, reason = %backend_reason, "hypervisor backend chosen");
    tracing::info!(sandbox = %id, accel = %accel.accel, reason = %accel.reason, "accelerator chosen");
    let spec = VmSpec {
        id: id.to_string(),
        state_dir: state_dir.to_path_buf(),
        vcpus: cfg.hypervisor.vcpus,
        memory_mib: cfg.hypervisor.memory_mib,
        kernel,
        initrd: cfg.hypervisor.initrd.clone(),
        kernel_params: cfg.hypervisor.kernel_params.clone(),
        agent_port: cfg.agent.vsock_port,
        qemu_binary: cfg.hypervisor.qemu.binary.clone(),
        tcg_tb_size_mib: cfg.hypervisor.qemu.tcg_tb_size_mib,
        accel: accel.accel,
        guest_cid: GUEST_CID,
        // Filled in with the ShareFs actor's reply.
        share_fs: None,
        // Filled in from the Network actor's reply.
        net: Vec::new(),
        console_log_max_bytes: u64::from(cfg.hypervisor.console_log_max_kib) * 1024,
        vsock_limits: cfg.hypervisor.rate_limits.vsock,
        qemu_user: cfg.security.qemu_jail.then(|| cfg.security.qemu_user.clone()),
    };
    Ok(Prepared {
        spec,
        backend,
        backend_reason,
        accel,
    })
}

fn make_state_dir(p: &std::path::Path) -> Result<(), SandboxError> {
    use std::os::unix::fs::DirBuilderExt as _;
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(|e| SandboxError::Io {
            what: format!("create state dir {}", parent.display()),
            source: e,
        })?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(p)
        .map_err(|e| SandboxError::Io {
            what: format!("create sandbox dir {}", p.display()),
            source: e,
        })
}

impl Actor for SandboxActor {
    type Context = Context<Self>;
}

impl Handler<GetState> for SandboxActor {
    type Result = MessageResult<GetState>;
    fn handle(&mut self, _: GetState, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.state)
    }
}

impl Handler<ApplyAnnotations> for SandboxActor {
    type Result = Result<(), SandboxError>;

    fn handle(&mut self, msg: ApplyAnnotations, _: &mut Context<Self>) -> Self::Result {
        let cfg = self.config.with_annotations(msg.0.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        if self.state == SandboxState::Created && cfg != self.config {
            tracing::info!(sandbox = %self.id, "config overridden by annotations");
            self.config = cfg;
        }
        Ok(())
    }
}

impl Handler<StartSandbox> for SandboxActor {
    type Result = AtomicResponse<Self, Result<SandboxStarted, SandboxError>>;

    fn handle(&mut self, msg: StartSandbox, _ctx: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.state.transition(SandboxState::Starting) {
            return AtomicResponse::new(Box::pin(fut::ready(Err(e.into()))));
        }
        let (cfg, origin, id, dir) = (
            self.config.clone(),
            self.config_origin.clone(),
            self.id.clone(),
            self.state_dir.clone(),
        );
        // Host probing, file checks and the state dir: blocking, on the blocking pool.
        let netns = msg.netns.is_some();
        let prep = async move {
            let p = blocking({
                let cfg = cfg.clone();
                move || prepare(&cfg, &origin, &id, &dir)
            })
            .await??;
            let lease = try_lease(&cfg, &p, netns).await;
            Ok::<_, SandboxError>((p, lease))
        };
        AtomicResponse::new(Box::pin(prep.into_actor(self).then(|prep, act, _| match prep {
            Ok((p, lease)) => act.boot(p, msg.netns, lease),
            Err(e) => {
                // Nothing was started (and no state dir of ours made).
                let _ = act.state.transition(SandboxState::Stopping);
                let _ = act.state.transition(SandboxState::Stopped);
                Box::pin(fut::ready(Err(e)))
            }
        })))
    }
}

impl SandboxActor {
    /// StartSandbox after [`prepare`]: the pod network, ShareFs, the VM, the agent (which then
    /// configures the network); on failure everything started is torn down.
    fn boot(
        &mut self,
        prepared: Prepared,
        netns: Option<PathBuf>,
        lease: LeaseOutcome,
    ) -> ResponseActFuture<Self, Result<SandboxStarted, SandboxError>> {
        let Prepared {
            mut spec,
            backend,
            backend_reason,
            accel,
        } = prepared;
        let hv = self.hypervisor.clone();
        let port = self.config.agent.vsock_port;
        let ready_timeout = Duration::from_millis(self.config.agent.ready_timeout_ms);
        let rpc_timeout = Duration::from_millis(self.config.agent.rpc_timeout_ms);
        let id = self.id.clone();
        let state_dir = self.state_dir.clone();
        let (lease, source_detail) = match lease {
            LeaseOutcome::Leased(l) => {
                let detail = l.vm.vm_id.clone();
                (Some(l), detail)
            }
            LeaseOutcome::Cold(why) => (None, why),
        };
        let source = if lease.is_some() { VmSource::Pool } else { VmSource::Cold };
        tracing::info!(sandbox = %self.id, %source, detail = %source_detail, "VM source chosen");
        // A leased VM's shared dir is in its own (the pool's) directory: the shares go there.
        let share_root = lease.as_ref().map_or_else(|| self.state_dir.clone(), |l| l.vm.dir.clone());
        let sharefs = ShareFsActor::new(share_root).start();
        self.sharefs = Some(sharefs.clone());
        let network = netns.map(|ns| (NetworkActor::new().start(), ns));
        let net_limits = crate::network::net_rate_limits(&self.config.hypervisor.rate_limits);
        self.network = network.as_ref().map(|(n, _)| n.clone());
        let fut = async move {
            // The taps exist before the VMM starts: its virtio-net devices serve them.
            let pod = match network {
                Some((n, netns)) => Some(n.send(SetupNetwork { netns }).await??),
                None => None,
            };
            if let Some(p) = &pod {
                spec.net = p.attachments(net_limits)?;
            }
            let (t0, vm) = match lease {
                // The pool runs the VM and serves its devices.
                Some(lease) => {
                    sharefs.send(AdoptSharedDir).await??;
                    (lease.requested_at, hv.send(AdoptLease { lease }).await??)
                }
                None => {
                    // The virtio-fs device must be listening before the VMM starts.
                    // The built-in VMM serves the shared dir itself; QEMU gets our vhost-user device.
                    let device = sharefs
                        .send(SetupShareFs {
                            vhost_user: backend == BackendKind::Qemu,
                        })
                        .await??;
                    spec.share_fs = Some(device);
                    let t0 = Instant::now();
                    (t0, hv.send(StartVm { spec, backend }).await??)
                }
            };
            let agent = guarded(
                vm.exit.clone(),
                Some(vm.console_log.clone()),
                AgentClient::connect_ready(&vm.vsock_uds, port, ready_timeout, rpc_timeout),
            )
            .await?;
            let ready = t0.elapsed();
            let version = agent.version().await?;
            let info = pod.map(|p| p.info);
            if let Some(info) = info.as_ref().filter(|i| !i.is_empty()) {
                // Before any container starts (they share the guest's network namespace).
                let req = info.to_request();
                guarded(
                    vm.exit.clone(),
                    Some(vm.console_log.clone()),
                    agent.configure_network(&req),
                )
                .await?;
            }
            Ok((agent, vm, ready, version, info))
        };
        Box::pin(fut.into_actor(self).then(move |res, act, ctx| {
            let out = match res {
                Ok((agent, vm, ready, version, network)) => {
                    // Mark the sandbox failed as soon as the VM process goes away on its own.
                    let mut exit = vm.exit.clone();
                    ctx.spawn(
                        async move {
                            let _ = exit.wait_for(|v| v.is_some()).await;
                        }
                        .into_actor(act)
                        .map(|_, act, _| {
                            if act.state == SandboxState::Running {
                                tracing::warn!(sandbox = %act.id, "VM exited unexpectedly");
                                let _ = act.state.transition(SandboxState::Failed);
                            }
                        }),
                    );
                    act.metrics.set_vm(&joey_observability::VmFacts {
                        hypervisor: backend.to_string(),
                        accel: accel.accel.to_string(),
                        vcpus: act.config.hypervisor.vcpus,
                        memory_bytes: u64::from(act.config.hypervisor.memory_mib) << 20,
                        start_duration: ready,
                        vmm_pid: (vm.pid != std::process::id()).then_some(vm.pid),
                        source: source.to_string(),
                    });
                    let agent = agent.with_rpc_metrics(act.metrics.agent_rpc_histogram());
                    act.agent = Some(agent);
                    act.vm_exit = Some(vm.exit.clone());
                    act.console_log = Some(vm.console_log.clone());
                    match act.state.transition(SandboxState::Running) {
                        Ok(()) => Ok(SandboxStarted {
                            id: id.clone(),
                            backend,
                            backend_reason,
                            accel: accel.accel,
                            accel_reason: accel.reason,
                            vm_start_to_agent_ready: ready,
                            agent_version: version.agent_version,
                            kernel_release: version.kernel_release,
                            vm_pid: vm.pid,
                            state_dir: state_dir.clone(),
                            metrics_reply_timeout: act.config.metrics.reply_timeout(),
                            network,
                            source,
                            source_detail: source_detail.clone(),
                        }),
                        Err(e) => Err(e.into()),
                    }
                }
                Err(e) => Err(e),
            };
            let cleanup = if out.is_err() {
                // Tear down whatever was started; the caller gets the original error.
                let _ = act.state.transition(SandboxState::Failed);
                let _ = act.state.transition(SandboxState::Stopping);
                Some((
                    act.hypervisor.clone(),
                    act.state_dir.clone(),
                    act.sharefs.take(),
                    act.network.take(),
                ))
            } else {
                None
            };
            async move {
                if let Some((hv, dir, sharefs, network)) = cleanup {
                    let _ = hv.send(StopVm { grace: Duration::ZERO }).await;
                    stop_network(network).await;
                    let unshared = stop_sharefs(sharefs).await;
                    let _ = hv.send(ReleaseVm).await;
                    if unshared {
                        remove_state_dir(dir).await;
                    }
                }
                out
            }
            .into_actor(act)
            .map(|out, act, _| {
                if out.is_err() {
                    let _ = act.state.transition(SandboxState::Stopped);
                }
                out
            })
        }))
    }
}

impl Handler<StopSandbox> for SandboxActor {
    type Result = AtomicResponse<Self, Result<SandboxStopped, SandboxError>>;

    fn handle(&mut self, _: StopSandbox, _ctx: &mut Context<Self>) -> Self::Result {
        if matches!(self.state, SandboxState::Stopped | SandboxState::Created) {
            if self.state == SandboxState::Created {
                let _ = self.state.transition(SandboxState::Stopped);
            }
            return AtomicResponse::new(Box::pin(fut::ready(Ok(SandboxStopped {
                teardown: Duration::ZERO,
                method: None,
            }))));
        }
        let graceful = self.state == SandboxState::Running;
        if let Err(e) = self.state.transition(SandboxState::Stopping) {
            return AtomicResponse::new(Box::pin(fut::ready(Err(e.into()))));
        }
        let agent = self.agent.take();
        let hv = self.hypervisor.clone();
        let dir = self.state_dir.clone();
        let sharefs = self.sharefs.take();
        let network = self.network.take();
        let destroy_timeout = Duration::from_millis(self.config.runtime.shutdown_timeout_ms);
        let fut = async move {
            let t0 = Instant::now();
            // The agent's DestroySandbox kills what still runs in the guest and syncs its
            // filesystems before it answers: after that the guest holds nothing worth waiting
            // for, so the VM is stopped at once (QMP quit / the vCPUs stopped) instead of
            // waiting ~0.3 s for the guest to reboot itself (docs/performance.md).
            if let (true, Some(a)) = (graceful, agent) {
                match tokio::time::timeout(destroy_timeout, a.destroy_sandbox()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "agent DestroySandbox failed"),
                    Err(_) => tracing::warn!("agent DestroySandbox timed out"),
                }
            }
            let report = hv.send(StopVm { grace: Duration::ZERO }).await.map(|r| match r {
                Err(HypervisorError::NotRunning) => Ok(None),
                r => r.map(|r| Some(r.method)),
            });
            let method = teardown_reply("stopping the VM", report).flatten();
            // The VM's devices are gone: the taps can go.
            stop_network(network).await;
            let unshared = stop_sharefs(sharefs).await;
            // A leased VM goes back to the pool (which removes it) once our shares are out of it.
            let _ = hv.send(ReleaseVm).await;
            if unshared {
                remove_state_dir(dir).await;
            } else {
                tracing::warn!(dir = %dir.display(), "sharefs cleanup incomplete; keeping the state dir");
            }
            SandboxStopped {
                teardown: t0.elapsed(),
                method,
            }
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(|r, act, _| {
            act.vm_exit = None;
            act.state.transition(SandboxState::Stopped)?;
            Ok(r)
        })))
    }
}

macro_rules! forward {
    ($msg:ty, $ret:ty, |$a:ident, $m:ident| $body:expr) => {
        impl Handler<$msg> for SandboxActor {
            type Result = ResponseFuture<Result<$ret, SandboxError>>;
            fn handle(&mut self, $m: $msg, _: &mut Context<Self>) -> Self::Result {
                let ($a, exit, console) = match self.agent() {
                    Ok(v) => v,
                    Err(e) => return Box::pin(async move { Err(e) }),
                };
                Box::pin(async move { guarded(exit, console, async move { $body }).await })
            }
        }
    };
}

forward!(ExecProcess, u32, |a, m| a.exec(m.0).await);
forward!(WaitProcess, agent::WaitProcessResponse, |a, m| a.wait(&m.exec_id).await);
forward!(SignalProcess, (), |a, m| a.signal(&m.exec_id, m.signal, m.all).await);
forward!(WriteStdin, u32, |a, m| a.write_stdin(&m.exec_id, m.data).await);
forward!(CloseStdin, (), |a, m| a.close_stdin(&m.exec_id).await);
forward!(ReadOutput, Vec<u8>, |a, m| a
    .read_output(&m.exec_id, m.stderr, m.len)
    .await);
forward!(PauseContainer, (), |a, m| a.pause_container(&m.container_id).await);
forward!(ResumeContainer, (), |a, m| a.resume_container(&m.container_id).await);
forward!(StatsContainer, agent::ContainerStats, |a, m| a
    .stats_container(&m.container_id)
    .await);
forward!(UpdateContainer, (), |a, m| a
    .update_container(&m.container_id, m.resources_json)
    .await);
forward!(ListPids, Vec<u32>, |a, m| a.list_pids(&m.container_id).await);
forward!(ResizeTerminal, (), |a, m| a
    .resize_terminal(&m.exec_id, m.rows, m.cols)
    .await);
forward!(RemoveContainer, (), |a, m| a.remove_container(&m.container_id).await);
forward!(GetOomEvent, agent::OomEvent, |a, _m| a.get_oom_event().await);

/// Freezes a container (agent `PauseContainer`).
#[derive(Message)]
#[rtype(result = "Result<(), SandboxError>")]
pub struct PauseContainer {
    pub container_id: String,
}

/// Thaws a container (agent `ResumeContainer`).
#[derive(Message)]
#[rtype(result = "Result<(), SandboxError>")]
pub struct ResumeContainer {
    pub container_id: String,
}

/// A container's cgroup figures (agent `StatsContainer`).
#[derive(Message)]
#[rtype(result = "Result<agent::ContainerStats, SandboxError>")]
pub struct StatsContainer {
    pub container_id: String,
}

/// New cgroup limits for a container (agent `UpdateContainer`; OCI LinuxResources JSON).
#[derive(Message)]
#[rtype(result = "Result<(), SandboxError>")]
pub struct UpdateContainer {
    pub container_id: String,
    pub resources_json: String,
}

/// Guest pids of a container's processes (agent `ListPids`).
#[derive(Message)]
#[rtype(result = "Result<Vec<u32>, SandboxError>")]
pub struct ListPids {
    pub container_id: String,
}

/// Window size of a process's pseudo terminal (agent `ResizeTerminal`).
#[derive(Message)]
#[rtype(result = "Result<(), SandboxError>")]
pub struct ResizeTerminal {
    pub exec_id: String,
    pub rows: u32,
    pub cols: u32,
}

/// Kills what is left of a container in the guest and forgets it (agent `RemoveContainer`).
#[derive(Message)]
#[rtype(result = "Result<(), SandboxError>")]
pub struct RemoveContainer {
    pub container_id: String,
}

/// Long poll for the next OOM kill in the sandbox; replies with the container id and the event's
/// sequence number.
#[derive(Message)]
#[rtype(result = "Result<agent::OomEvent, SandboxError>")]
pub struct GetOomEvent;

/// Releases a container's shared rootfs and volumes (ShareFs `Unshare`). Not shared is fine.
#[derive(Message)]
#[rtype(result = "Result<(), SandboxError>")]
pub struct UnshareContainer {
    pub container_id: String,
}

impl Handler<UnshareContainer> for SandboxActor {
    type Result = ResponseFuture<Result<(), SandboxError>>;

    fn handle(&mut self, m: UnshareContainer, _: &mut Context<Self>) -> Self::Result {
        let Some(sharefs) = self.sharefs.clone() else {
            return Box::pin(async { Ok(()) });
        };
        Box::pin(async move {
            match sharefs
                .send(Unshare {
                    container_id: m.container_id,
                })
                .await?
            {
                Ok(()) | Err(ShareFsError::NotShared(_)) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    }
}

/// Stops the ShareFs actor (after the VM). True when nothing of it is left, so that the state dir
/// may be removed recursively (never while a container rootfs may still be bind-mounted in it).
/// Removes the pod network's taps and filters (after the VM stopped) and stops the actor;
/// failures are logged (what is left is named; `delete` retries after a crash).
async fn stop_network(network: Option<Addr<NetworkActor>>) {
    if let Some(n) = network {
        // The actor stops once this, its last address, is dropped.
        let _ = teardown_reply("removing the pod network", n.send(TeardownNetwork).await);
    }
}

async fn stop_sharefs(sharefs: Option<Addr<ShareFsActor>>) -> bool {
    let Some(sharefs) = sharefs else { return true };
    teardown_reply("stopping sharefs", sharefs.send(StopShareFs).await).is_some()
}

/// The reply to a teardown request sent to another actor; a failure (the actor's, or an
/// unreachable actor) is logged as `what` and gives `None`.
fn teardown_reply<T, E: std::fmt::Display>(what: &str, reply: Result<Result<T, E>, MailboxError>) -> Option<T> {
    match reply {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "{what} failed");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "{what}: actor unreachable");
            None
        }
    }
}

/// Starts a container whose rootfs is the host directory `rootfs`, shared with the guest over
/// virtio-fs (ShareFs actor) and set up by the agent. Its process is served by the process
/// messages under exec id = `container_id`. Replies with the guest pid.
#[derive(Message, Clone)]
#[rtype(result = "Result<u32, SandboxError>")]
pub struct CreateContainer {
    pub container_id: String,
    pub rootfs: PathBuf,
    pub read_only: bool,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub terminal: bool,
    /// Empty: the container id.
    pub hostname: String,
    /// The guest OCI spec (see `CreateContainerRequest.oci_spec_json`); empty: none.
    pub oci_spec_json: String,
    /// Host sources of the container's bind mounts, shared as `<shared>/<cid>/volumes/<n>`
    /// (n = index in this list; [`crate::sharefs::guest_volume_path`]).
    pub volumes: Vec<VolumeShare>,
}

impl Handler<CreateContainer> for SandboxActor {
    type Result = ResponseFuture<Result<u32, SandboxError>>;

    fn handle(&mut self, m: CreateContainer, _: &mut Context<Self>) -> Self::Result {
        let (a, exit, console) = match self.agent() {
            Ok(v) => v,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let Some(sharefs) = self.sharefs.clone() else {
            return Box::pin(async move { Err(SandboxError::BadInput("sandbox has no shared filesystem".into())) });
        };
        Box::pin(async move {
            let rootfs = sharefs
                .send(ShareRootfs {
                    container_id: m.container_id.clone(),
                    host_path: m.rootfs,
                    // With an OCI spec the agent first creates missing mountpoints in the rootfs
                    // (like runc), then makes it read-only itself (root.readonly).
                    read_only: m.read_only && m.oci_spec_json.is_empty(),
                    volumes: m.volumes,
                })
                .await??;
            let req = agent::CreateContainerRequest {
                container_id: m.container_id.clone(),
                rootfs,
                argv: m.argv,
                env: m.env,
                cwd: m.cwd,
                terminal: m.terminal,
                hostname: m.hostname,
                readonly_rootfs: m.read_only,
                oci_spec_json: m.oci_spec_json,
                ..Default::default()
            };
            let r = guarded(exit, console, a.create_container(req)).await;
            if r.is_err() {
                let _ = sharefs
                    .send(Unshare {
                        container_id: m.container_id,
                    })
                    .await;
            }
            r
        })
    }
}

/// What a metrics scrape needs from the actor ([`crate::metrics::ScrapeSources`]); answered at
/// once, the scrape itself runs outside the actor (`crate::metrics::scrape`). Task RPCs are
/// never waited on.
#[derive(Message)]
#[rtype(result = "crate::metrics::ScrapeSources")]
pub struct GetMetrics;

impl Handler<GetMetrics> for SandboxActor {
    type Result = MessageResult<GetMetrics>;

    fn handle(&mut self, _: GetMetrics, _: &mut Context<Self>) -> Self::Result {
        MessageResult(crate::metrics::ScrapeSources {
            metrics: self.metrics.clone(),
            agent: self.agent.clone().filter(|_| self.state == SandboxState::Running),
            hypervisor: self.hypervisor.clone(),
            agent_timeout: self.config.metrics.agent_timeout(),
        })
    }
}

/// Serves `GET /metrics` for the sandbox on `<state_dir>/metrics.sock` (the sandbox's own state
/// dir) on a task of the current tokio runtime, until the returned server is dropped. Each
/// scrape sends [`GetMetrics`] and answers 503 if the actor does not reply in time.
/// `reply_timeout` is `metrics.reply_timeout()` of the sandbox's config (the agent timeout
/// plus 300 ms, docs/metrics.md).
pub fn serve_metrics(
    sb: &Addr<SandboxActor>,
    sandbox_state_dir: &std::path::Path,
    reply_timeout: Duration,
) -> Result<joey_observability::http::UnixServer, joey_observability::http::HttpError> {
    crate::metrics::serve(sb, sandbox_state_dir, reply_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broken() -> Result<(), AgentError> {
        Err(AgentError::Rpc {
            rpc: "ReadStdout",
            code: RpcCode::Transport,
            message: "socket err: early eof".into(),
        })
    }

    #[test]
    fn a_broken_connection_of_a_dying_vm_is_vm_died() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // The connection breaks first, the VM's exit is recorded 100 ms later.
            let (tx, rx) = watch::channel(None);
            let later = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tx.send_replace(Some(VmExit::Signaled(9)));
                tx
            });
            let e = guarded(rx, None, async { broken() }).await.unwrap_err();
            assert!(
                matches!(
                    e,
                    SandboxError::VmDied {
                        exit: VmExit::Signaled(9),
                        ..
                    }
                ),
                "{e}"
            );
            drop(later.await.unwrap());

            // The VM lives on: the agent's transport error is reported as it is.
            let (_tx, rx) = watch::channel(None);
            let e = guarded(rx, None, async { broken() }).await.unwrap_err();
            assert!(e.to_string().contains("early eof"), "{e}");

            // Other errors are not delayed or changed.
            let (_tx, rx) = watch::channel(None);
            let t0 = Instant::now();
            let e = guarded(rx, None, async {
                Err::<(), _>(AgentError::Rpc {
                    rpc: "ExecProcess",
                    code: RpcCode::NotFound,
                    message: "x".into(),
                })
            })
            .await
            .unwrap_err();
            assert!(
                t0.elapsed() < VM_EXIT_GRACE && e.to_string().contains("ExecProcess"),
                "{e}"
            );
        });
    }
}
