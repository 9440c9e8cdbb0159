//! A small blocking client of the Kubernetes Container Runtime Interface (CRI v1) over a unix
//! socket, for `joeyctl cri` and joey's CRI integration tests (Debian packages no crictl).
//!
//! [`CriClient`] owns a single-threaded tokio runtime and the two gRPC clients (runtime and image
//! service) of the `k8s-cri` crate; every call is bounded by the client's timeout. [`pod_config`]
//! and [`container_config`] build the minimal configs kubelet would send, [`parse_log`] reads the
//! CRI log files containerd writes for a container's stdout and stderr.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use k8s_cri::v1 as api;

use api::image_service_client::ImageServiceClient;
use api::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long one CRI call may take by default (a joey pod boots a VM under TCG in RunPodSandbox).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error("connect to the CRI socket {path}: {source}")]
    Connect {
        path: String,
        source: tonic::transport::Error,
    },
    /// The runtime answered with an error status (code and message as the runtime gave them).
    #[error("{call}: {} ({:?})", .status.message(), .status.code())]
    Status {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("{call}: no answer within {timeout:?}")]
    Timeout {
        call: &'static str,
        timeout: Duration,
    },
    #[error("{call}: the reply lacks {what}")]
    Incomplete {
        call: &'static str,
        what: &'static str,
    },
}

impl CriError {
    /// The gRPC status code of a runtime error, None for transport problems and timeouts.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            CriError::Status { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// A connected CRI client (blocking calls; not for use inside an async runtime).
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    image: ImageServiceClient<Channel>,
    timeout: Duration,
    path: PathBuf,
}

impl CriClient {
    /// Connects to the CRI gRPC server listening on the unix socket `path` (containerd's
    /// `grpc.address`).
    pub fn connect(path: &Path) -> Result<CriClient, CriError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let sock = path.to_path_buf();
        let connect_err = |source| CriError::Connect {
            path: path.display().to_string(),
            source,
        };
        // The URI is a placeholder: the connector below dials the unix socket.
        let endpoint =
            Endpoint::from_static("http://[::]:50051").connect_timeout(Duration::from_secs(10));
        let channel = rt
            .block_on(
                endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let sock = sock.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(sock).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                })),
            )
            .map_err(connect_err)?;
        Ok(CriClient {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            image: ImageServiceClient::new(channel),
            timeout: DEFAULT_TIMEOUT,
            path: path.to_path_buf(),
        })
    }

    /// Bounds every later call by `timeout` instead of [`DEFAULT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> CriClient {
        self.timeout = timeout;
        self
    }

    /// The socket this client talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn call<T, F>(&self, call: &'static str, fut: F) -> Result<T, CriError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let timeout = self.timeout;
        match self
            .rt
            .block_on(async { tokio::time::timeout(timeout, fut).await })
        {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(CriError::Status { call, status }),
            Err(_) => Err(CriError::Timeout { call, timeout }),
        }
    }

    /// The runtime's name and version (`Version`).
    pub fn version(&self) -> Result<api::VersionResponse, CriError> {
        let mut c = self.runtime.clone();
        self.call(
            "Version",
            c.version(api::VersionRequest {
                version: "v1".into(),
            }),
        )
    }

    /// `RunPodSandbox` with runtime handler `handler` (e.g. `joey`, `runc`); returns the pod id.
    pub fn run_pod(
        &self,
        config: &api::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let req = api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        };
        Ok(self
            .call("RunPodSandbox", c.run_pod_sandbox(req))?
            .pod_sandbox_id)
    }

    /// `PodSandboxStatus` (not verbose).
    pub fn pod_status(&self, pod: &str) -> Result<api::PodSandboxStatus, CriError> {
        let mut c = self.runtime.clone();
        let req = api::PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: false,
        };
        self.call("PodSandboxStatus", c.pod_sandbox_status(req))?
            .status
            .ok_or(CriError::Incomplete {
                call: "PodSandboxStatus",
                what: "status",
            })
    }

    /// `StopPodSandbox`: stops every container of the pod and tears its network down.
    pub fn stop_pod(&self, pod: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = api::StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        };
        self.call("StopPodSandbox", c.stop_pod_sandbox(req))
            .map(drop)
    }

    /// `RemovePodSandbox`: removes the (stopped) pod and its containers.
    pub fn remove_pod(&self, pod: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = api::RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        };
        self.call("RemovePodSandbox", c.remove_pod_sandbox(req))
            .map(drop)
    }

    /// `ListPodSandbox` without a filter.
    pub fn list_pods(&self) -> Result<Vec<api::PodSandbox>, CriError> {
        let mut c = self.runtime.clone();
        let req = api::ListPodSandboxRequest { filter: None };
        Ok(self.call("ListPodSandbox", c.list_pod_sandbox(req))?.items)
    }

    /// `CreateContainer` in pod `pod` (created with `pod_config`); returns the container id.
    pub fn create_container(
        &self,
        pod: &str,
        config: &api::ContainerConfig,
        pod_config: &api::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let req = api::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config.clone()),
            sandbox_config: Some(pod_config.clone()),
        };
        Ok(self
            .call("CreateContainer", c.create_container(req))?
            .container_id)
    }

    /// `StartContainer`.
    pub fn start_container(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = api::StartContainerRequest {
            container_id: id.into(),
        };
        self.call("StartContainer", c.start_container(req))
            .map(drop)
    }

    /// `StopContainer` with a grace period of `timeout_s` seconds (SIGTERM, then SIGKILL).
    pub fn stop_container(&self, id: &str, timeout_s: i64) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = api::StopContainerRequest {
            container_id: id.into(),
            timeout: timeout_s,
        };
        self.call("StopContainer", c.stop_container(req)).map(drop)
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = api::RemoveContainerRequest {
            container_id: id.into(),
        };
        self.call("RemoveContainer", c.remove_container(req))
            .map(drop)
    }

    /// `ContainerStatus` (not verbose).
    pub fn container_status(&self, id: &str) -> Result<api::ContainerStatus, CriError> {
        let mut c = self.runtime.clone();
        let req = api::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        self.call("ContainerStatus", c.container_status(req))?
            .status
            .ok_or(CriError::Incomplete {
                call: "ContainerStatus",
                what: "status",
            })
    }

    /// `ExecSync`: runs `cmd` in container `id` to completion (`timeout_s` 0: no limit).
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_s: i64,
    ) -> Result<api::ExecSyncResponse, CriError> {
        let mut c = self.runtime.clone();
        let req = api::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_s,
        };
        self.call("ExecSync", c.exec_sync(req))
    }

    /// `ContainerStats` of container `id`.
    pub fn container_stats(&self, id: &str) -> Result<api::ContainerStats, CriError> {
        let mut c = self.runtime.clone();
        let req = api::ContainerStatsRequest {
            container_id: id.into(),
        };
        self.call("ContainerStats", c.container_stats(req))?
            .stats
            .ok_or(CriError::Incomplete {
                call: "ContainerStats",
                what: "stats",
            })
    }

    /// `ListContainerStats` of the containers of pod `pod`.
    pub fn list_container_stats(&self, pod: &str) -> Result<Vec<api::ContainerStats>, CriError> {
        let mut c = self.runtime.clone();
        let filter = api::ContainerStatsFilter {
            pod_sandbox_id: pod.into(),
            ..Default::default()
        };
        let req = api::ListContainerStatsRequest {
            filter: Some(filter),
        };
        Ok(self
            .call("ListContainerStats", c.list_container_stats(req))?
            .stats)
    }

    /// `UpdateContainerResources` with Linux resources `linux`.
    pub fn update_resources(
        &self,
        id: &str,
        linux: api::LinuxContainerResources,
    ) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = api::UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(linux),
            ..Default::default()
        };
        self.call(
            "UpdateContainerResources",
            c.update_container_resources(req),
        )
        .map(drop)
    }

    /// `ListImages` without a filter.
    pub fn list_images(&self) -> Result<Vec<api::Image>, CriError> {
        let mut c = self.image.clone();
        let req = api::ListImagesRequest { filter: None };
        Ok(self.call("ListImages", c.list_images(req))?.images)
    }
}

/// The container state `ContainerStatus` reports, as its enum.
pub fn container_state(s: &api::ContainerStatus) -> api::ContainerState {
    api::ContainerState::try_from(s.state).unwrap_or(api::ContainerState::ContainerUnknown)
}

/// A pod config as kubelet sends it, minimal: metadata (name, uid = `uid`, namespace `default`),
/// hostname = `name`, container logs under `log_dir`.
pub fn pod_config(name: &str, uid: &str, log_dir: &Path) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        linux: Some(api::LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

/// A container config: image `image`, `argv` as its command, its log at `<name>.log` in the
/// pod's log directory.
pub fn container_config(name: &str, image: &str, argv: &[&str]) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: argv.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(api::LinuxContainerConfig::default()),
        ..Default::default()
    }
}

/// A container's output as read from its CRI log file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Logs {
    pub stdout: String,
    pub stderr: String,
}

/// Parses a CRI log file (`<RFC3339 time> <stdout|stderr> <F|P> <text>` per line; `P` marks a
/// partial line continued by the next entry) back into the streams' text. Lines not in that
/// format are skipped.
pub fn parse_log(text: &str) -> Logs {
    let mut logs = Logs::default();
    for line in text.lines() {
        let mut f = line.splitn(4, ' ');
        let (Some(_time), Some(stream), Some(tag), msg) =
            (f.next(), f.next(), f.next(), f.next().unwrap_or(""))
        else {
            continue;
        };
        let out = match stream {
            "stdout" => &mut logs.stdout,
            "stderr" => &mut logs.stderr,
            _ => continue,
        };
        out.push_str(msg);
        match tag {
            "F" => out.push('\n'),
            "P" => {}
            _ => continue,
        }
    }
    logs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_log_joins_streams_and_partial_lines() {
        let text = "2026-12-07T08:00:00.1Z stdout F hello world\n\
                    2026-12-07T08:00:00.2Z stderr P par\n\
                    2026-12-07T08:00:00.3Z stderr F tial\n\
                    2026-12-07T08:00:00.4Z stdout F \n\
                    garbage\n";
        let l = parse_log(text);
        assert_eq!(l.stdout, "hello world\n\n");
        assert_eq!(l.stderr, "partial\n");
    }

    #[test]
    fn configs_carry_names_and_log_paths() {
        let p = pod_config("web", "u1", Path::new("/var/log/pods/x"));
        assert_eq!(p.metadata.as_ref().map(|m| m.name.as_str()), Some("web"));
        assert_eq!(p.log_directory, "/var/log/pods/x");
        let c = container_config("app", "busybox", &["echo", "hi"]);
        assert_eq!(c.command, vec!["echo", "hi"]);
        assert_eq!(c.log_path, "app.log");
    }

    #[test]
    fn connect_to_a_missing_socket_is_a_typed_error() {
        let e = CriClient::connect(Path::new("/nonexistent/cri.sock"))
            .err()
            .expect("no socket, no client");
        assert!(matches!(e, CriError::Connect { .. }), "{e}");
        assert_eq!(e.code(), None);
    }
}
