//! containerd's stdio fifos ↔ the agent's process streams.
//!
//! stdout/stderr: `ReadOutput` until EOF (empty reply), written to the fifo (or discarded when
//! containerd gave none, so that the guest never blocks on a full pipe). stdin: the fifo is
//! forwarded with `WriteStdin`; on CloseIO(stdin) what is still buffered in the fifo is drained
//! and forwarded before `CloseStdin`, so nothing written before the close is lost.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use joey_actors::sandbox::{next_output, CloseStdin, SandboxActor, WriteStdin};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Notify;

const READ_CHUNK: u32 = 256 * 1024;
/// One write to a fifo whose reader went away must not hang the pump forever.
const FIFO_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const STDIN_CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("open fifo {path}: {source}")]
    Open { path: String, source: std::io::Error },
}

/// The fifo paths containerd gave for a process (empty: none).
pub use joey_actors::container::ProcessIo as StdioPaths;

/// Opens a fifo for writing without waiting for a reader (O_RDWR keeps the open from blocking).
fn open_writer(path: &str) -> Result<tokio::net::unix::pipe::Sender, StdioError> {
    tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)
        .map_err(|e| StdioError::Open {
            path: path.into(),
            source: e,
        })
}

/// Copies the process's stdout (or stderr) to the fifo at `path` until EOF.
pub async fn pump_output(sb: Addr<SandboxActor>, exec_id: String, stderr: bool, path: String) {
    let mut fifo = if path.is_empty() {
        None
    } else {
        match open_writer(&path) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(error = %e, "output discarded");
                None
            }
        }
    };
    loop {
        match next_output(&sb, &exec_id, stderr, READ_CHUNK).await {
            Ok(None) => break,
            Ok(Some(data)) => {
                if let Some(f) = fifo.as_mut() {
                    match tokio::time::timeout(FIFO_WRITE_TIMEOUT, f.write_all(&data)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, stderr, "writing to containerd's fifo failed; discarding the rest");
                            fifo = None;
                        }
                        Err(_) => {
                            tracing::warn!(stderr, "containerd's fifo is not read; discarding the rest");
                            fifo = None;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, stderr, "reading process output failed");
                break;
            }
        }
    }
    // Dropping the fifo closes our (only) write end: containerd sees EOF.
}

/// Forwards the stdin fifo at `path` to the process until CloseIO(stdin) (`closed`); then drains
/// what is still buffered and closes the process's stdin. No fifo: stdin is closed at once.
pub async fn pump_stdin(sb: Addr<SandboxActor>, exec_id: String, path: String, closed: Arc<Notify>) {
    let close = |sb: Addr<SandboxActor>, exec_id: String| async move {
        let _ = tokio::time::timeout(STDIN_CALL_TIMEOUT, sb.send(CloseStdin { exec_id })).await;
    };
    if path.is_empty() {
        close(sb, exec_id).await;
        return;
    }
    // Read-write, so that the open does not block and containerd closing its end is no EOF:
    // the end of stdin is CloseIO.
    let mut fifo = match tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&path)
    {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path, error = %e, "stdin fifo unavailable; closing stdin");
            close(sb, exec_id).await;
            return;
        }
    };
    let send = |sb: Addr<SandboxActor>, exec_id: String, data: Vec<u8>| async move {
        matches!(
            tokio::time::timeout(STDIN_CALL_TIMEOUT, sb.send(WriteStdin { exec_id, data })).await,
            Ok(Ok(Ok(_)))
        )
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            biased;
            r = fifo.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => {
                    if !send(sb.clone(), exec_id.clone(), buf[..n].to_vec()).await {
                        // The process stopped reading (exited or closed stdin).
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the stdin fifo failed");
                    break;
                }
            },
            _ = closed.notified() => {
                // Drain what was written before the close.
                loop {
                    match fifo.try_read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if !send(sb.clone(), exec_id.clone(), buf[..n].to_vec()).await {
                                return;
                            }
                        }
                        Err(_) => break,
                    }
                }
                break;
            }
        }
    }
    close(sb, exec_id).await;
}
