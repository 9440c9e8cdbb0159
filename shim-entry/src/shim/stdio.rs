//! containerd's stdio fifos ↔ the agent's process streams.
//!
//! stdout/stderr: `ReadOutput` until EOF (empty reply), written to the fifo (or discarded when
//! containerd gave none, so that the guest never blocks on a full pipe) by [`pump_output`],
//! the one output pump, which `joeyctl run` uses too. stdin: the fifo is
//! forwarded with `WriteStdin`; on CloseIO(stdin) what is still buffered in the fifo is drained
//! and forwarded before `CloseStdin`, so nothing written before the close is lost.
//!
//! Output destinations are what containerd's runc shim accepts: a fifo path, `file:///abs/path`
//! (appended, parent directories created), or `binary:///path/to/logger?key=value` (a logging
//! binary started once per process with stdout on fd 3, stderr on fd 4 and a ready pipe on fd 5,
//! `CONTAINER_ID` and `CONTAINER_NAMESPACE` in its environment; the query becomes its arguments).

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use joey_actors::sandbox::{next_output, CloseStdin, SandboxActor, SandboxError, WriteStdin};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Notify;

const READ_CHUNK: u32 = 256 * 1024;
/// One write to a fifo whose reader went away must not hang the pump forever.
const FIFO_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const STDIN_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a logging binary may take to signal ready (close or write fd 5).
const LOGGER_READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("open fifo {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("stdio URI {uri:?}: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("stdout {stdout:?} and stderr {stderr:?}: a logging binary must receive both streams")]
    SplitBinary { stdout: String, stderr: String },
    #[error("open log file {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("start logging binary {path}: {source}")]
    Logger { path: String, source: std::io::Error },
    #[error("logging binary {path} did not signal ready within {LOGGER_READY_TIMEOUT:?}")]
    LoggerNotReady { path: String },
}

/// Where one output stream goes.
pub enum OutputSink {
    /// Discarded (containerd gave nothing).
    None,
    /// A fifo, a pipe to a logging binary.
    Pipe(tokio::net::unix::pipe::Sender),
    /// A `file://` log.
    File(tokio::fs::File),
}

/// A writer [`pump_output`] takes.
pub type Writer = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

impl OutputSink {
    /// The writer to pump to (None: discard).
    pub fn into_writer(self) -> Option<Writer> {
        match self {
            OutputSink::None => None,
            OutputSink::Pipe(p) => Some(Box::new(p)),
            OutputSink::File(f) => Some(Box::new(f)),
        }
    }
}

/// A parsed stdout/stderr destination.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dest {
    None,
    Fifo(String),
    File(std::path::PathBuf),
    Binary { path: String, args: Vec<String> },
}

fn parse_dest(s: &str) -> Result<Dest, StdioError> {
    if s.is_empty() {
        return Ok(Dest::None);
    }
    let bad = |reason: &str| StdioError::BadUri {
        uri: s.to_string(),
        reason: reason.to_string(),
    };
    if !s.contains("://") {
        return Ok(Dest::Fifo(s.to_string()));
    }
    let u = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
    // Percent-decoded, as Go's url.URL.Path that containerd uses.
    let path = || match u.to_file_path() {
        Ok(p) if p.is_absolute() && p.parent().is_some() => Ok(p.display().to_string()),
        _ => Err(bad("expected an absolute path (scheme:///path, no host)")),
    };
    match u.scheme() {
        "fifo" => Ok(Dest::Fifo(path()?)),
        "file" => Ok(Dest::File(path()?.into())),
        "binary" => {
            // containerd (NewBinaryCmd): every query key, then its value ("" for a bare key).
            let mut args = Vec::new();
            for (k, v) in u.query_pairs() {
                args.push(k.into_owned());
                args.push(v.into_owned());
            }
            Ok(Dest::Binary { path: path()?, args })
        }
        other => Err(bad(&format!("unsupported scheme {other:?} (fifo path, file://, binary://)"))),
    }
}

/// Checks containerd's stdout/stderr destinations without opening anything (Create/Exec).
pub fn check_outputs(io: &StdioPaths) -> Result<(), StdioError> {
    let (out, err) = (parse_dest(&io.stdout)?, parse_dest(&io.stderr)?);
    match (&out, &err) {
        (Dest::Binary { .. }, _) | (_, Dest::Binary { .. }) if out != err && err != Dest::None => Err(StdioError::SplitBinary {
            stdout: io.stdout.clone(),
            stderr: io.stderr.clone(),
        }),
        _ => Ok(()),
    }
}

async fn open_file(path: &std::path::Path) -> Result<OutputSink, StdioError> {
    let err = |source| StdioError::File {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(err)?;
    }
    let f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(path)
        .await
        .map_err(err)?;
    Ok(OutputSink::File(f))
}

fn open_one(d: &Dest) -> Result<OutputSink, StdioError> {
    match d {
        Dest::None | Dest::File(_) | Dest::Binary { .. } => Ok(OutputSink::None),
        Dest::Fifo(p) => open_writer(p).map(OutputSink::Pipe),
    }
}

/// A pipe whose read end goes to the logging binary: (our async write end, its read end).
fn logger_pipe() -> Result<(tokio::net::unix::pipe::Sender, std::os::fd::OwnedFd), std::io::Error> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let w = tokio::net::unix::pipe::Sender::from_owned_fd(w)?;
    Ok((w, r))
}

/// Opens the destinations of a process's stdout and stderr; for `binary://`, starts the
/// logging binary (reaped by a task of its own once both streams closed) and waits until it is
/// ready. `id`/`namespace`: the container's, for the binary's environment.
pub async fn open_outputs(io: &StdioPaths, id: &str, namespace: &str) -> Result<(OutputSink, OutputSink), StdioError> {
    check_outputs(io)?;
    let (out, err) = (parse_dest(&io.stdout)?, parse_dest(&io.stderr)?);
    if let Dest::Binary { path, args } = &out {
        let lerr = |source| StdioError::Logger {
            path: path.clone(),
            source,
        };
        let (out_w, out_r) = logger_pipe().map_err(lerr)?;
        let (err_w, err_r) = logger_pipe().map_err(lerr)?;
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| lerr(e.into()))?;
        let fds = [out_r, err_r, ready_w];
        let raw: Vec<i32> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let mut cmd = tokio::process::Command::new(path);
        cmd.args(args)
            .env("CONTAINER_ID", id)
            .env("CONTAINER_NAMESPACE", namespace)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: the closure only calls dup2(2) (async-signal-safe) on fds that stay open in
        // the parent until spawn returns; dup2 clears close-on-exec on the new fds 3, 4, 5.
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in raw.iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(lerr)?;
        drop(fds);
        // Ready: the binary writes to or closes fd 5 (EOF once its copy is gone).
        let ready = tokio::task::spawn_blocking(move || {
            let mut b = [0u8; 1];
            let _ = nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&ready_r), &mut b);
        });
        if tokio::time::timeout(LOGGER_READY_TIMEOUT, ready).await.is_err() {
            let _ = child.start_kill();
            return Err(StdioError::LoggerNotReady { path: path.clone() });
        }
        let p = path.clone();
        tokio::spawn(async move {
            // It exits once both streams reached EOF (the process ended and the pumps closed).
            match child.wait().await {
                Ok(st) if !st.success() => tracing::warn!(path = p, status = %st, "logging binary failed"),
                Ok(_) => {}
                Err(e) => tracing::warn!(path = p, error = %e, "waiting for the logging binary failed"),
            }
        });
        return Ok((OutputSink::Pipe(out_w), OutputSink::Pipe(err_w)));
    }
    let o = match &out {
        Dest::File(p) => open_file(p).await?,
        d => open_one(d)?,
    };
    let e = match &err {
        Dest::File(p) => open_file(p).await?,
        d => open_one(d)?,
    };
    Ok((o, e))
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

/// How [`pump_output`] treats its writer.
#[derive(Debug, Clone, Copy)]
pub struct PumpOptions {
    /// Bound of one write: a writer that takes longer is given up.
    pub write_timeout: Option<Duration>,
    /// Flush after every chunk (a terminal); the writer is always flushed at the end.
    pub flush_each: bool,
}

impl PumpOptions {
    /// containerd's fifos and log files: a reader that stops reading is given up.
    pub const CONTAINERD: PumpOptions = PumpOptions {
        write_timeout: Some(FIFO_WRITE_TIMEOUT),
        flush_each: false,
    };
    /// `joeyctl run`'s own stdout/stderr: waits for the terminal, flushes every chunk.
    pub const TERMINAL: PumpOptions = PumpOptions {
        write_timeout: None,
        flush_each: true,
    };
}

/// The one process-output pump (the shim and `joeyctl run`): reads the process's stdout (or
/// stderr) through the Sandbox actor until EOF and writes it to `out`. A writer that fails (or
/// exceeds the write timeout) is given up, and the rest is read and discarded so that the
/// process never blocks on a full pipe; `out` None discards everything. Ends at EOF, or with
/// the error of a failed read.
pub async fn pump_output(
    sb: &Addr<SandboxActor>,
    exec_id: &str,
    stderr: bool,
    mut out: Option<Writer>,
    opts: PumpOptions,
) -> Result<(), SandboxError> {
    loop {
        let Some(data) = next_output(sb, exec_id, stderr, READ_CHUNK).await? else { break };
        let Some(w) = out.as_mut() else { continue };
        let write = async {
            w.write_all(&data).await?;
            if opts.flush_each {
                w.flush().await?;
            }
            Ok::<(), std::io::Error>(())
        };
        let r = match opts.write_timeout {
            Some(t) => tokio::time::timeout(t, write).await.unwrap_or_else(|_| {
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("not read for {t:?}")))
            }),
            None => write.await,
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, stderr, "writing process output failed; discarding the rest");
            out = None;
        }
    }
    if let Some(w) = out.as_mut() {
        let _ = w.flush().await;
    }
    Ok(())
    // Dropping the writer closes our (only) write end: the reader sees EOF.
}

/// Copies the process's stdout (or stderr) to containerd's `sink` until EOF.
pub async fn pump_to_containerd(sb: Addr<SandboxActor>, exec_id: String, stderr: bool, sink: OutputSink) {
    if let Err(e) = pump_output(&sb, &exec_id, stderr, sink.into_writer(), PumpOptions::CONTAINERD).await {
        tracing::warn!(error = %e, stderr, "reading process output failed");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn io(out: &str, err: &str) -> StdioPaths {
        StdioPaths {
            stdin: String::new(),
            stdout: out.into(),
            stderr: err.into(),
            terminal: false,
        }
    }

    #[test]
    fn destinations_parse_like_containerd() {
        assert_eq!(parse_dest("").unwrap(), Dest::None);
        assert_eq!(parse_dest("/run/x/fifo").unwrap(), Dest::Fifo("/run/x/fifo".into()));
        assert_eq!(parse_dest("fifo:///run/x/f").unwrap(), Dest::Fifo("/run/x/f".into()));
        assert_eq!(parse_dest("file:///var/log/a%20b.log").unwrap(), Dest::File("/var/log/a b.log".into()));
        assert_eq!(
            parse_dest("binary:///usr/bin/logger?dir=%2Ftmp%2Fx&flag").unwrap(),
            Dest::Binary {
                path: "/usr/bin/logger".into(),
                args: vec!["dir".into(), "/tmp/x".into(), "flag".into(), String::new()],
            }
        );
        let e = parse_dest("ftp://h/x").unwrap_err().to_string();
        assert_eq!(e, "stdio URI \"ftp://h/x\": unsupported scheme \"ftp\" (fifo path, file://, binary://)");
        assert!(parse_dest("file://").unwrap_err().to_string().contains("absolute path"));
        assert!(parse_dest("file://host/x").unwrap_err().to_string().contains("no host"));
    }

    #[test]
    fn a_logging_binary_gets_both_streams() {
        let b = "binary:///bin/logger";
        assert!(check_outputs(&io(b, b)).is_ok());
        assert!(check_outputs(&io(b, "")).is_ok());
        assert!(check_outputs(&io("file:///a", "/fifo")).is_ok());
        assert!(matches!(check_outputs(&io(b, "/fifo")), Err(StdioError::SplitBinary { .. })));
        assert!(matches!(check_outputs(&io("/fifo", b)), Err(StdioError::SplitBinary { .. })));
    }

    #[test]
    fn file_logs_append_and_create_parents() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("a/b/c.log");
            let uri = format!("file://{}", p.display());
            for chunk in [&b"one\n"[..], b"two\n"] {
                let (o, _) = open_outputs(&io(&uri, ""), "c", "ns").await.unwrap();
                let mut o = o.into_writer().unwrap();
                o.write_all(chunk).await.unwrap();
                o.flush().await.unwrap();
            }
            assert_eq!(std::fs::read_to_string(&p).unwrap(), "one\ntwo\n");
        });
    }
}

