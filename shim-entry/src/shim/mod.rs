//! `containerd-shim-joey-v2`: the containerd shim v2 (task API v2, containerd 1.6/1.7) of joey.
//! See docs/shim.md.

pub mod cgroup;
pub mod cleanup;
pub mod events;
mod lifecycle;
pub mod logwriter;
pub mod mounts;
mod process;
pub mod resources;
pub mod service;
pub mod spec;
pub mod stdio;

use std::path::Path;
use std::sync::Arc;

use actix::Actor as _;
use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::{Config, Flags, StartOpts};
use joey_actors::sandbox::SandboxActor;
use joey_actors::HypervisorActor;

/// containerd's runtime name for this shim.
pub const RUNTIME_ID: &str = "io.containerd.joey.v2";

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("joey config: {0}")]
    Config(String),
    #[error(transparent)]
    Seccomp(#[from] joey_vmm_core::seccomp::SeccompError),
    #[error(transparent)]
    Failpoints(#[from] crate::failpoints::FailpointsError),
}

/// The shim's sandbox id (which shim a container joins, and the name of the sandbox's state
/// dir): the CRI sandbox id from the bundle's annotations when it is a valid id
/// ([`joey_agent_protocol::is_valid_container_id`]), else the container id.
pub fn grouping_id(bundle: &Path, id: &str) -> String {
    group_of(spec::load(bundle).ok().as_ref(), id)
}

/// [`grouping_id`] of an already loaded spec (`None`: unreadable).
pub fn group_of(spec: Option<&spec::ContainerSpec>, id: &str) -> String {
    spec.and_then(|s| s.sandbox_id.clone())
        .filter(|s| joey_agent_protocol::is_valid_container_id(s))
        .unwrap_or_else(|| id.to_string())
}

fn load_config() -> Result<(joey_config::Config, String), ShimError> {
    joey_config::Config::load(None)
        .map(|(c, origin)| {
            (
                c,
                origin.map(|p| p.display().to_string()).unwrap_or_else(|| "<defaults>".into()),
            )
        })
        .map_err(|e| ShimError::Config(e.to_string()))
}

/// The shim's sandbox: loads the joey config and starts the sandbox's Hypervisor and Sandbox
/// actors (the one place that decides the sandbox's configuration). Replies with the Sandbox
/// actor and its metrics registry, or why there is none (every Create then fails with it).
fn load_sandbox(
    sandbox_id: String,
    loaded: Result<(joey_config::Config, String), ShimError>,
) -> Result<(actix::Addr<SandboxActor>, Arc<joey_observability::SandboxMetrics>), String> {
    let (config, origin) = loaded.map_err(|e| e.to_string())?;
    let hv = HypervisorActor::new().start();
    let sa = SandboxActor::new(sandbox_id, config, origin, hv);
    let registry = sa.metrics();
    Ok((sa.start(), registry))
}

/// Logs go to containerd's `log` fifo in the bundle (the shim's cwd), when there is a reader,
/// through the non-blocking [`logwriter::LogWriter`], at `level` (`runtime.log_level`, see
/// [`crate::logging`]).
fn init_logging(level: &str) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log")
        .ok();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(crate::logging::filter(level)).with_ansi(false).with_target(false);
    let writer = file.and_then(|f| {
        // Blocking writes, on the writer's own thread only: a full pipe holds that thread, and
        // the lines queued meanwhile are dropped (and counted) instead of stalling the shim.
        use std::os::fd::AsRawFd as _;
        let _ = nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()));
        logwriter::LogWriter::start(f, logwriter::QUEUE_LINES).ok()
    });
    match writer {
        Some(w) => {
            let _ = builder.with_writer(w).try_init();
        }
        None => {
            let _ = builder.with_writer(std::io::sink).try_init();
        }
    }
    // The shim's stderr goes nowhere: a panic is logged too (the fault harness looks for it).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!("shim panicked: {info}");
        default_hook(info);
    }));
}

pub struct JoeyShim {
    id: String,
    /// containerd runs its shims with `-debug` when it logs at debug level itself.
    debug: bool,
    namespace: String,
    bundle: String,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for JoeyShim {
    type T = service::JoeyTask;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        JoeyShim {
            id: args.id.clone(),
            debug: args.debug,
            namespace: args.namespace.clone(),
            bundle: args.bundle.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let id = opts.id.clone();
        let grouping = tokio::task::spawn_blocking(move || grouping_id(Path::new("."), &id))
            .await
            .unwrap_or_else(|_| opts.id.clone());
        let address = spawn(opts, &grouping, Vec::new()).await?;
        containerd_shim::asynchronous::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let id = self.id.clone();
        let bundle = if self.bundle.is_empty() { ".".to_string() } else { self.bundle.clone() };
        let r = tokio::task::spawn_blocking(move || cleanup::delete_dead(&id, Path::new(&bundle))).await;
        match r {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(containerd_shim::Error::Other(e.to_string())),
            Err(e) => Err(containerd_shim::Error::Other(e.to_string())),
        }
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let loaded = load_config();
        let level = loaded.as_ref().map_or("info", |(c, _)| c.runtime.log_level.as_str());
        init_logging(if self.debug { crate::logging::at_least(level, "debug") } else { level });
        // `debug.failpoints`: this process serves one sandbox; a bad list means no sandbox.
        let loaded = loaded.and_then(|(c, o)| Ok(crate::failpoints::setup(&c.debug).map(|_| (c, o))?));
        // Seccomp on every thread of the serving shim (TSYNC: the runtime's threads exist
        // already), before the sandbox starts; without it, no sandbox (fail closed).
        let mode = loaded.as_ref().map_or(Default::default(), |(c, _)| c.security.seccomp);
        let loaded = match crate::security::install_seccomp(mode) {
            Ok(_) => loaded,
            Err(e) => Err(ShimError::Seccomp(e)),
        };
        // The sandbox (and its state dir) is named after the pod: the grouping id of the first
        // container, which every container of the pod shares (and `delete` finds again).
        let (id, bundle) = (self.id.clone(), if self.bundle.is_empty() { ".".into() } else { self.bundle.clone() });
        let sandbox_id = tokio::task::spawn_blocking(move || grouping_id(Path::new(&bundle), &id))
            .await
            .unwrap_or_else(|_| self.id.clone());
        // Called inside the actix system (see `main`): the actors start here.
        let sandbox = load_sandbox(sandbox_id, loaded);
        if let Err(e) = &sandbox {
            tracing::error!(error = %e, "no sandbox: the joey config did not load");
        }
        service::JoeyTask::new(sandbox, self.namespace.clone(), publisher, self.exit.clone())
    }
}

/// Entry point of `containerd-shim-joey-v2`.
pub fn main() -> i32 {
    let config = Config {
        // Our tracing subscriber writes the log fifo.
        no_setup_logger: true,
        // The hypervisor backend waits for its own children (QEMU); a reaper calling
        // waitpid(-1) would steal their exit statuses.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    let sys = actix::System::new();
    sys.block_on(containerd_shim::asynchronous::run::<JoeyShim>(RUNTIME_ID, Some(config)));
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_uses_cri_sandbox_id_else_container_id() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(grouping_id(d.path(), "c1"), "c1");
        std::fs::write(
            d.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"},
                "annotations":{"io.kubernetes.cri.sandbox-id":"pod1"}}"#,
        )
        .expect("write");
        assert_eq!(grouping_id(d.path(), "c1"), "pod1");
        // Not a usable directory name: the container id.
        std::fs::write(
            d.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"},
                "annotations":{"io.kubernetes.cri.sandbox-id":"../etc"}}"#,
        )
        .expect("write");
        assert_eq!(grouping_id(d.path(), "c1"), "c1");
    }
}
