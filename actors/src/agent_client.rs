//! Client of the guest agent: ttrpc over hybrid vsock (`CONNECT <port>\n` on a unix socket).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use joey_agent_protocol::agent;
use joey_agent_protocol::agent_ttrpc::AgentServiceClient;
use joey_observability::prometheus::{HistogramTimer, HistogramVec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("hybrid vsock connect to {path} port {port}: {reason}")]
    Connect { path: PathBuf, port: u32, reason: String },
    #[error("agent did not become ready within {0:?} (last error: {1})")]
    NotReady(Duration, String),
    #[error("agent RPC {rpc} failed: {message}")]
    Rpc {
        rpc: &'static str,
        code: RpcCode,
        message: String,
    },
}

/// The gRPC status code class of a failed RPC, as far as callers care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcCode {
    NotFound,
    InvalidArgument,
    PermissionDenied,
    AlreadyExists,
    /// The agent does not know the RPC (an older agent): UNIMPLEMENTED, or the NOT_FOUND
    /// "<method> is not supported" of the generated service's default methods.
    Unimplemented,
    FailedPrecondition,
    Transport,
    Other,
}

fn rpc_err(rpc: &'static str, e: ttrpc::Error) -> AgentError {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let code = match s.code() {
                // The generated server's default for a method the agent does not implement.
                ttrpc::Code::NOT_FOUND if s.message().ends_with(" is not supported") => RpcCode::Unimplemented,
                ttrpc::Code::NOT_FOUND => RpcCode::NotFound,
                ttrpc::Code::INVALID_ARGUMENT => RpcCode::InvalidArgument,
                ttrpc::Code::PERMISSION_DENIED => RpcCode::PermissionDenied,
                ttrpc::Code::ALREADY_EXISTS => RpcCode::AlreadyExists,
                ttrpc::Code::UNIMPLEMENTED => RpcCode::Unimplemented,
                ttrpc::Code::FAILED_PRECONDITION => RpcCode::FailedPrecondition,
                _ => RpcCode::Other,
            };
            AgentError::Rpc {
                rpc,
                code,
                message: s.message().to_string(),
            }
        }
        other => AgentError::Rpc {
            rpc,
            code: RpcCode::Transport,
            message: other.to_string(),
        },
    }
}

/// Opens a stream to guest port `port` through the hybrid vsock unix socket.
pub async fn hybrid_connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, AgentError> {
    let err = |reason: String| AgentError::Connect {
        path: uds.to_path_buf(),
        port,
        reason,
    };
    let fut = async {
        let mut s = UnixStream::connect(uds).await.map_err(|e| err(e.to_string()))?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|e| err(e.to_string()))?;
        // Read the reply byte by byte so no payload byte is consumed.
        let mut line = Vec::with_capacity(16);
        loop {
            let mut b = [0u8; 1];
            let n = s.read(&mut b).await.map_err(|e| err(e.to_string()))?;
            if n == 0 {
                return Err(err("closed before OK (nobody listening in the guest yet?)".into()));
            }
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
            if line.len() > 32 {
                return Err(err("over-long reply".into()));
            }
        }
        let line = String::from_utf8_lossy(&line);
        if !line.starts_with("OK ") {
            return Err(err(format!("unexpected reply {line:?}")));
        }
        Ok(s)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(err(format!("timed out after {timeout:?}"))),
    }
}

/// A connected agent client. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    inner: AgentServiceClient,
    rpc_timeout: Duration,
    /// `joey_shim_agent_rpc_duration_seconds`, once the sandbox attached it.
    rpc_metrics: Option<HistogramVec>,
}

fn ctx(t: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(t.as_nanos().min(i64::MAX as u128) as i64)
}

/// No client-side deadline (long waits: process exit, output). Cancelled by dropping the future.
fn ctx_forever() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

/// One timed agent RPC: `rpc!(self, "Name", method(context, &request))` is the reply or the
/// [`AgentError`] naming the RPC.
macro_rules! rpc {
    ($self:ident, $name:literal, $method:ident($ctx:expr, $req:expr)) => {{
        let _timer = $self.time($name);
        $self.inner.$method($ctx, $req).await.map_err(|e| rpc_err($name, e))
    }};
}

impl AgentClient {
    /// Times every later RPC of this client (and its clones) in `h`, labelled by method.
    pub fn with_rpc_metrics(mut self, h: HistogramVec) -> AgentClient {
        self.rpc_metrics = Some(h);
        self
    }

    /// A timer that records the RPC's duration when dropped (also when the call is cancelled).
    fn time(&self, method: &'static str) -> Option<HistogramTimer> {
        self.rpc_metrics
            .as_ref()
            .map(|h| h.with_label_values(&[method]).start_timer())
    }

    /// Guest and agent resource usage, with its own deadline (metrics must never wait long).
    pub async fn guest_metrics(&self, timeout: Duration) -> Result<agent::GuestMetricsResponse, AgentError> {
        rpc!(
            self,
            "GetGuestMetrics",
            get_guest_metrics(ctx(timeout), &agent::GuestMetricsRequest::new())
        )
    }

    /// Connects and waits until the agent answers `Check`, retrying until `deadline` passes.
    pub async fn connect_ready(
        uds: &Path,
        port: u32,
        ready_timeout: Duration,
        rpc_timeout: Duration,
    ) -> Result<AgentClient, AgentError> {
        let start = Instant::now();
        let mut last = String::from("no attempt");
        while start.elapsed() < ready_timeout {
            let left = ready_timeout.saturating_sub(start.elapsed());
            match hybrid_connect(uds, port, left.min(Duration::from_secs(5))).await {
                Ok(stream) => {
                    let c = AgentClient {
                        inner: AgentServiceClient::new(ttrpc::asynchronous::Client::new(
                            ttrpc::asynchronous::transport::Socket::from(stream),
                        )),
                        rpc_timeout,
                        rpc_metrics: None,
                    };
                    match c.check().await {
                        Ok(_) => return Ok(c),
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(AgentError::NotReady(ready_timeout, last))
    }

    pub async fn check(&self) -> Result<String, AgentError> {
        Ok(rpc!(self, "Check", check(ctx(self.rpc_timeout), &agent::CheckRequest::new()))?.status)
    }

    pub async fn version(&self) -> Result<agent::VersionResponse, AgentError> {
        rpc!(self, "Version", version(ctx(self.rpc_timeout), &agent::Empty::new()))
    }

    pub async fn exec(&self, req: agent::ExecProcessRequest) -> Result<u32, AgentError> {
        Ok(rpc!(self, "ExecProcess", exec_process(ctx(self.rpc_timeout), &req))?.pid)
    }

    pub async fn wait(&self, exec_id: &str) -> Result<agent::WaitProcessResponse, AgentError> {
        let req = agent::WaitProcessRequest {
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        rpc!(self, "WaitProcess", wait_process(ctx_forever(), &req))
    }

    pub async fn signal(&self, exec_id: &str, signal: u32, all: bool) -> Result<(), AgentError> {
        let req = agent::SignalProcessRequest {
            exec_id: exec_id.to_string(),
            signal,
            all,
            ..Default::default()
        };
        rpc!(self, "SignalProcess", signal_process(ctx(self.rpc_timeout), &req))?;
        Ok(())
    }

    pub async fn write_stdin(&self, exec_id: &str, data: Vec<u8>) -> Result<u32, AgentError> {
        let req = agent::WriteStdinRequest {
            exec_id: exec_id.to_string(),
            data,
            ..Default::default()
        };
        Ok(rpc!(self, "WriteStdin", write_stdin(ctx_forever(), &req))?.len)
    }

    pub async fn close_stdin(&self, exec_id: &str) -> Result<(), AgentError> {
        let req = agent::CloseStdinRequest {
            exec_id: exec_id.to_string(),
            ..Default::default()
        };
        rpc!(self, "CloseStdin", close_stdin(ctx(self.rpc_timeout), &req))?;
        Ok(())
    }

    /// Reads output; an empty vector means end of stream.
    pub async fn read_output(&self, exec_id: &str, stderr: bool, len: u32) -> Result<Vec<u8>, AgentError> {
        let req = agent::ReadOutputRequest {
            exec_id: exec_id.to_string(),
            len,
            ..Default::default()
        };
        let r = if stderr {
            rpc!(self, "ReadStderr", read_stderr(ctx_forever(), &req))?
        } else {
            rpc!(self, "ReadStdout", read_stdout(ctx_forever(), &req))?
        };
        Ok(r.data)
    }

    pub async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        let req = agent::DestroySandboxRequest::new();
        rpc!(self, "DestroySandbox", destroy_sandbox(ctx(self.rpc_timeout), &req))?;
        Ok(())
    }

    /// Configures the guest's network (interfaces matched by MAC, addresses, routes,
    /// neighbours); the agent checks everything first and names what it refuses.
    pub async fn configure_network(&self, req: &agent::ConfigureNetworkRequest) -> Result<(), AgentError> {
        rpc!(self, "ConfigureNetwork", configure_network(ctx(self.rpc_timeout), req))?;
        Ok(())
    }

    /// Starts a container; returns the guest pid of its first process.
    pub async fn create_container(&self, req: agent::CreateContainerRequest) -> Result<u32, AgentError> {
        Ok(rpc!(self, "CreateContainer", create_container(ctx(self.rpc_timeout), &req))?.pid)
    }

    fn container_req(id: &str) -> agent::ContainerRequest {
        agent::ContainerRequest {
            container_id: id.to_string(),
            ..Default::default()
        }
    }

    /// Freezes every process of the container (cgroup.freeze).
    pub async fn pause_container(&self, id: &str) -> Result<(), AgentError> {
        rpc!(
            self,
            "PauseContainer",
            pause_container(ctx(self.rpc_timeout), &Self::container_req(id))
        )?;
        Ok(())
    }

    /// Thaws the container.
    pub async fn resume_container(&self, id: &str) -> Result<(), AgentError> {
        rpc!(
            self,
            "ResumeContainer",
            resume_container(ctx(self.rpc_timeout), &Self::container_req(id))
        )?;
        Ok(())
    }

    /// The container's cgroup figures.
    pub async fn stats_container(&self, id: &str) -> Result<agent::ContainerStats, AgentError> {
        rpc!(
            self,
            "StatsContainer",
            stats_container(ctx(self.rpc_timeout), &Self::container_req(id))
        )
    }

    /// Applies new cgroup limits (OCI LinuxResources as JSON).
    pub async fn update_container(&self, id: &str, resources_json: String) -> Result<(), AgentError> {
        let req = agent::UpdateContainerRequest {
            container_id: id.to_string(),
            resources_json,
            ..Default::default()
        };
        rpc!(self, "UpdateContainer", update_container(ctx(self.rpc_timeout), &req))?;
        Ok(())
    }

    /// Guest pids of the container's processes, ascending.
    pub async fn list_pids(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        Ok(rpc!(
            self,
            "ListPids",
            list_pids(ctx(self.rpc_timeout), &Self::container_req(id))
        )?
        .pids)
    }

    /// Sets the window size of a process's pseudo terminal.
    pub async fn resize_terminal(&self, exec_id: &str, rows: u32, cols: u32) -> Result<(), AgentError> {
        let req = agent::ResizeTerminalRequest {
            exec_id: exec_id.to_string(),
            rows,
            cols,
            ..Default::default()
        };
        rpc!(self, "ResizeTerminal", resize_terminal(ctx(self.rpc_timeout), &req))?;
        Ok(())
    }

    /// Long poll for the next OOM kill; returns the container id. No deadline: cancelled by
    /// dropping the future.
    pub async fn get_oom_event(&self) -> Result<agent::OomEvent, AgentError> {
        self.inner
            .get_oom_event(ctx_forever(), &agent::Empty::new())
            .await
            .map_err(|e| rpc_err("GetOomEvent", e))
    }

    /// Kills what is left of the container and forgets it.
    pub async fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        rpc!(
            self,
            "RemoveContainer",
            remove_container(ctx(self.rpc_timeout), &Self::container_req(id))
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_rpc_of_an_older_agent_is_unimplemented() {
        let st = |code, msg: &str| ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.to_string()));
        let code = |e: AgentError| match e {
            AgentError::Rpc { code, .. } => code,
            other => panic!("{other}"),
        };
        let e = rpc_err(
            "PauseContainer",
            st(
                ttrpc::Code::NOT_FOUND,
                "/joey.agent.v1.AgentService/PauseContainer is not supported",
            ),
        );
        assert_eq!(code(e), RpcCode::Unimplemented);
        assert_eq!(
            code(rpc_err("x", st(ttrpc::Code::NOT_FOUND, "container c1 not found"))),
            RpcCode::NotFound
        );
        assert_eq!(
            code(rpc_err("x", st(ttrpc::Code::UNIMPLEMENTED, "no"))),
            RpcCode::Unimplemented
        );
    }
}
