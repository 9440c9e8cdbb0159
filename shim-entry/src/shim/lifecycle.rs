//! Create, Delete, Pause/Resume and Shutdown, and the sandbox VM's lifetime: the first Create
//! boots the VM (and serves its metrics endpoint and watches for OOM kills), the Delete of the
//! last container stops it.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskIO, TaskOOM, TaskPaused, TaskResumed};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;
use joey_actors::container::{
    sandbox_lacks_rpc, ContainerActor, ContainerSetup, DeleteContainer, ExitInfo, Pause, ProcessIo, Resume,
};
use joey_actors::resource::ResourceStack;
use joey_actors::sandbox::{
    ApplyAnnotations, CreateContainer, GetOomEvent, SandboxActor, SandboxError, StartSandbox, StopSandbox,
};

use super::events::Events;
use super::resources::HostRootfs;
use super::service::{ask, ts, Inner, Registry, TaskError};
use super::{mounts, spec, stdio};

/// Booting the VM (TCG can be slow) and starting the agent.
const START_SANDBOX_TIMEOUT: Duration = Duration::from_secs(180);
/// Tearing the VM down.
const STOP_SANDBOX_TIMEOUT: Duration = Duration::from_secs(60);
/// Retry bounds of the OOM long poll after an error.
/// How long a shim stays without any container, and with no Create or Delete in flight, before
/// it exits on its own (see [`Inner::exit_when_idle`]).
pub(super) const IDLE_EXIT: Duration = Duration::from_secs(10);
/// How often that is checked.
const IDLE_CHECK: Duration = Duration::from_secs(1);
const OOM_BACKOFF_MIN: Duration = Duration::from_millis(100);
const OOM_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Which VM this shim runs: started or not, with what serves it while it runs.
#[derive(Default)]
pub(super) struct SandboxSlot {
    running: bool,
    oom_watch: Option<tokio::task::JoinHandle<()>>,
    /// The sandbox's metrics endpoint; dropped (socket removed) before StopSandbox.
    metrics_server: Option<joey_observability::http::UnixServer>,
}

impl Inner {
    /// Stops the VM and its resources (the caller holds `life`).
    async fn stop_sandbox(&self, slot: &mut SandboxSlot) {
        if let Some(w) = slot.oom_watch.take() {
            w.abort();
        }
        if let Some(server) = slot.metrics_server.take() {
            // Dropping unlinks the socket: off the async threads.
            if let Err(e) = tokio::task::spawn_blocking(move || drop(server)).await {
                tracing::warn!(error = %e, "stopping the metrics endpoint failed");
            }
        }
        slot.running = false;
        let Some(sb) = self.sandbox.clone() else {
            return;
        };
        match tokio::time::timeout(STOP_SANDBOX_TIMEOUT, sb.send(StopSandbox)).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "stopping the sandbox failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "sandbox actor unreachable"),
            Err(_) => tracing::warn!("stopping the sandbox timed out"),
        }
    }

    /// Boots the VM (first container) with the pod network of `netns`, serves its metrics and
    /// starts the OOM watch.
    async fn start_sandbox(
        &self,
        sb: &Addr<SandboxActor>,
        slot: &mut SandboxSlot,
        netns: Option<PathBuf>,
    ) -> Result<(), TaskError> {
        let started = match tokio::time::timeout(START_SANDBOX_TIMEOUT, sb.send(StartSandbox { netns })).await {
            Ok(Ok(Ok(s))) => s,
            Ok(Ok(Err(e))) => return Err(TaskError::Sandbox(e)),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(TaskError::Timeout {
                    what: "starting the sandbox VM",
                    after: START_SANDBOX_TIMEOUT,
                })
            }
        };
        slot.running = true;
        tracing::info!(backend = %started.backend, accel = %started.accel, "sandbox VM started");
        // GET /metrics on <state_dir>/<id>/metrics.sock while the sandbox runs (docs/metrics.md).
        // Binding touches the filesystem: on the blocking pool (which has the runtime's context,
        // so the endpoint's accept loop is spawned on the runtime).
        let (msb, dir) = (sb.clone(), started.state_dir.clone());
        let reply_timeout = started.metrics_reply_timeout;
        match tokio::task::spawn_blocking(move || joey_actors::sandbox::serve_metrics(&msb, &dir, reply_timeout)).await {
            Ok(Ok(server)) => slot.metrics_server = Some(server),
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics endpoint unavailable"),
            Err(e) => tracing::warn!(error = %e, "metrics endpoint unavailable"),
        }
        let watch = oom_watch(
            sb.clone(),
            self.events.clone(),
            self.containers.clone(),
            self.oom_handled.clone(),
        );
        slot.oom_watch = Some(tokio::spawn(watch));
        Ok(())
    }

    pub(super) async fn create(&self, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse, TaskError> {
        let sb = self.sandbox()?;
        let mut slot = self.life.lock().await;
        if self.containers.contains(&req.id) {
            return Err(TaskError::AlreadyExists(format!(
                "container {} already exists in this shim",
                req.id
            )));
        }
        if !joey_agent_protocol::is_valid_container_id(&req.id) {
            return Err(TaskError::InvalidArgument(format!(
                "invalid container id {:?}: expected 1 to 64 of [A-Za-z0-9_.-], starting alphanumeric",
                req.id
            )));
        }
        if !req.checkpoint.is_empty() {
            return Err(TaskError::Unimplemented("restoring from a checkpoint"));
        }
        // Spec checks (and bind source checks) come before anything is set up.
        let bundle = PathBuf::from(&req.bundle);
        let (b, id) = (bundle.clone(), req.id.clone());
        let (spec, guest) = tokio::task::spawn_blocking(move || -> Result<_, spec::SpecError> {
            let s = spec::load(&b)?;
            let g = spec::translate(&s, &id)?;
            Ok((s, g))
        })
        .await
        .map_err(|e| TaskError::Internal(e.to_string()))??;
        let io = ProcessIo {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        stdio::check_outputs(&io)?;
        // `io.joey.config.*` overrides: they size the VM when this container starts it, and are
        // checked (refused ones name themselves, INVALID_ARGUMENT) before anything is set up.
        sb.send(ApplyAnnotations(spec.annotations.clone())).await??;
        let rootfs = bundle.join("rootfs");
        let mut resources = ResourceStack::default();
        if !req.rootfs.is_empty() {
            // Unsupported mount types are bad input: checked before anything is mounted.
            mounts::check(&req.rootfs)?;
            let r = HostRootfs {
                mounts: req.rootfs.clone(),
                target: rootfs.clone(),
            };
            resources.add(Box::new(r)).await?;
        }
        if !slot.running {
            // The first container's network namespace is the pod's (CRI's sandbox container,
            // or `ctr run --with-ns network:<path>`).
            if let Err(e) = self.start_sandbox(&sb, &mut slot, spec.network_namespace()).await {
                self.stop_sandbox(&mut slot).await;
                resources.cleanup_all().await;
                return Err(e);
            }
        }
        let setup = ContainerSetup {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            io: io.clone(),
            init: CreateContainer {
                container_id: req.id.clone(),
                rootfs,
                read_only: spec.read_only,
                argv: spec.argv,
                env: spec.env,
                cwd: spec.cwd,
                terminal: spec.terminal,
                hostname: spec.hostname,
                oci_spec_json: guest.json,
                volumes: guest.volumes,
            },
            resources,
        };
        let actor = ContainerActor::start_in_arbiter(&self.arbiter, move |_| ContainerActor::new(setup, sb));
        self.containers.insert(req.id.clone(), actor);
        drop(slot);
        let ev = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: io.stdin,
                stdout: io.stdout,
                stderr: io.stderr,
                terminal: io.terminal,
                ..Default::default()
            }),
            checkpoint: String::new(),
            pid: 0,
            ..Default::default()
        };
        self.events.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev));
        Ok(api::CreateTaskResponse {
            pid: 0,
            ..Default::default()
        })
    }

    /// Delete of the init process: the container's resources are released by its actor (which
    /// then stops); the VM goes with the last container.
    pub(super) async fn delete_container(&self, id: &str) -> Result<api::DeleteResponse, TaskError> {
        let mut slot = self.life.lock().await;
        let c = self.containers.get(id)?;
        let view = ask(&c, DeleteContainer).await??;
        self.containers.remove(id);
        if self.containers.is_empty() {
            self.stop_sandbox(&mut slot).await;
        }
        drop(slot);
        let exit = view.init.exit.unwrap_or(ExitInfo {
            status: 0,
            at: SystemTime::now(),
        });
        let ev = TaskDelete {
            container_id: id.to_string(),
            id: id.to_string(),
            pid: view.init.pid,
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        };
        self.events.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev));
        Ok(api::DeleteResponse {
            pid: view.init.pid,
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }

    pub(super) async fn pause(&self, id: String, pause: bool) -> Result<(), TaskError> {
        let c = self.containers.get(&id)?;
        if pause {
            ask(&c, Pause).await??;
            let ev = TaskPaused {
                container_id: id,
                ..Default::default()
            };
            self.events.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev));
        } else {
            ask(&c, Resume).await??;
            let ev = TaskResumed {
                container_id: id,
                ..Default::default()
            };
            self.events.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev));
        }
        Ok(())
    }

    pub(super) async fn shutdown(&self) {
        let mut slot = self.life.lock().await;
        if !self.containers.is_empty() {
            // Containers are left: keep serving them.
            return;
        }
        self.stop_sandbox(&mut slot).await;
        drop(slot);
        self.events.flush().await;
        self.exit.signal();
    }
}

impl Inner {
    /// Exits the shim, as Shutdown would, once it has held no container for [`IDLE_EXIT`] with
    /// no Create or Delete in flight. containerd sends Shutdown right after the last Delete (or
    /// a failed Create); when it is restarted in between, that Shutdown never comes and the
    /// restarted containerd does not know the shim, which would otherwise live forever.
    pub(super) async fn exit_when_idle(self: std::sync::Arc<Self>) {
        let mut idle_since = Some(std::time::Instant::now());
        loop {
            tokio::time::sleep(IDLE_CHECK).await;
            // A held lock is a Create, Delete or Shutdown in flight: not idle.
            let busy = self.life.try_lock().is_err();
            if busy || !self.containers.is_empty() {
                idle_since = None;
                continue;
            }
            let since = *idle_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= IDLE_EXIT {
                tracing::warn!(idle = ?IDLE_EXIT, "no container and no Shutdown from containerd: exiting");
                // Exits only if still no container (the check is repeated under the lock).
                self.shutdown().await;
                idle_since = None;
            }
        }
    }
}

/// Long-polls the agent for OOM kills while the sandbox runs and publishes TaskOOM for the
/// containers of this shim (the guest may report others: ignored). Retries with backoff after
/// errors; ends when the sandbox stops (its task is also aborted then). Each event's sequence
/// number goes to `handled` once it is published (or ignored).
async fn oom_watch(
    sb: Addr<SandboxActor>,
    events: Events,
    containers: Registry,
    handled: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
) {
    let mut backoff = OOM_BACKOFF_MIN;
    loop {
        match sb.send(GetOomEvent).await {
            Ok(Ok(ev)) => {
                backoff = OOM_BACKOFF_MIN;
                let (container_id, seq) = (ev.container_id, ev.seq);
                if !containers.contains(&container_id) {
                    tracing::info!(container = %container_id, "OOM kill of a container not in this shim; ignored");
                } else {
                    tracing::info!(container = %container_id, "OOM kill in the guest");
                    let ev = TaskOOM {
                        container_id,
                        ..Default::default()
                    };
                    events.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev));
                }
                handled.send_modify(|h| *h = (*h).max(seq));
            }
            Ok(Err(e)) if sandbox_lacks_rpc(&e) => {
                tracing::info!("the guest agent has no GetOomEvent: no OOM events for this sandbox");
                return;
            }
            Ok(Err(SandboxError::State(_))) | Ok(Err(SandboxError::VmDied { .. })) | Err(_) => return,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, ?backoff, "GetOomEvent failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(OOM_BACKOFF_MAX);
            }
        }
    }
}
