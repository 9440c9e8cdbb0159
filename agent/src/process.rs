//! A started process as the service sees it: exit status, stdin writer, stdout/stderr readers.
//!
//! All fds are non-blocking and driven by tokio's `AsyncFd`, so blocked reads and writes never
//! occupy a runtime thread. Each stream sits behind its own async mutex: concurrent reads of one
//! stream (or concurrent writes to stdin) are served one after the other.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Mutex;

use crate::exec::Spawned;
use crate::reaper::{ExitInfo, ExitReceiver};

/// Largest chunk one ReadStdout/ReadStderr returns.
pub const MAX_READ: usize = 1 << 20;
/// Chunk size when the request asks for 0 bytes.
pub const DEFAULT_READ: usize = 64 << 10;
/// The end-of-file character a terminal's line discipline turns into EOF (VEOF, ^D).
const TTY_EOF: u8 = 0x04;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stdin is closed")]
    StdinClosed,
    #[error("the process closed its stdin")]
    BrokenPipe,
    #[error("process exited before its terminal accepted the input ({written} bytes written)")]
    ExitedDuringWrite { written: usize },
    #[error("process exit status is unavailable")]
    StatusLost,
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Number of bytes a read request may return: `len` capped at 1 MiB, 64 KiB when `len` is 0.
pub fn effective_read_len(len: u32) -> usize {
    match len {
        0 => DEFAULT_READ,
        n => (n as usize).min(MAX_READ),
    }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Registers `file` with the tokio reactor. Must run inside the runtime.
fn async_fd(file: File, interest: Interest) -> io::Result<AsyncFd<File>> {
    set_nonblocking(&file)?;
    // SAFETY: the AsyncFd owns the File, which keeps the same open fd until the AsyncFd is
    // dropped; nothing else closes or replaces it.
    let afd = unsafe { AsyncFd::register_with_interest(file, interest) }?;
    Ok(afd)
}

/// Read side of stdout or stderr.
pub struct OutputStream {
    /// `None` once EOF was returned to a reader (the fd is closed then).
    fd: Mutex<Option<AsyncFd<File>>>,
    eof: AtomicBool,
    /// Reading a pty master whose slave side is gone fails with EIO: that is EOF.
    pty: bool,
}

enum ReadOutcome {
    Data(Vec<u8>),
    Eof,
}

impl OutputStream {
    fn new(file: Option<File>, pty: bool) -> io::Result<OutputStream> {
        let fd = file.map(|f| async_fd(f, Interest::READABLE)).transpose()?;
        let eof = fd.is_none();
        Ok(OutputStream {
            fd: Mutex::new(fd),
            eof: AtomicBool::new(eof),
            pty,
        })
    }

    /// True once a reader got EOF.
    pub fn at_eof(&self) -> bool {
        self.eof.load(Ordering::Acquire)
    }

    fn read_once(file: &File, buf: &mut [u8], pty: bool) -> io::Result<usize> {
        loop {
            match (&*file).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if pty && e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                other => return other,
            }
        }
    }

    /// Waits for at least one byte or EOF and returns up to `max` bytes; empty means EOF.
    pub async fn read(&self, max: usize) -> Result<Vec<u8>, StreamError> {
        let mut guard = self.fd.lock().await;
        let outcome = match guard.as_ref() {
            None => ReadOutcome::Eof,
            Some(afd) => Self::read_ready(afd, max, self.pty).await?,
        };
        match outcome {
            ReadOutcome::Data(d) => Ok(d),
            ReadOutcome::Eof => {
                // Close the fd: nothing more will ever come.
                *guard = None;
                self.eof.store(true, Ordering::Release);
                Ok(Vec::new())
            }
        }
    }

    async fn read_ready(
        afd: &AsyncFd<File>,
        max: usize,
        pty: bool,
    ) -> Result<ReadOutcome, StreamError> {
        let io_err = |source| StreamError::Io { op: "read", source };
        let mut buf = vec![0u8; max.max(1)];
        let mut filled = 0;
        loop {
            let mut ready = afd.readable().await.map_err(io_err)?;
            // Consume data only in this inner loop, which never awaits: once bytes were read they
            // are returned, even if the request future is dropped (e.g. on a deadline) afterwards.
            loop {
                let res =
                    ready.try_io(|inner| Self::read_once(inner.get_ref(), &mut buf[filled..], pty));
                match res {
                    Ok(Ok(0)) if filled == 0 => return Ok(ReadOutcome::Eof),
                    // EOF after data: return the data; the next read sees EOF again.
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => {
                        filled += n;
                        if filled == buf.len() {
                            break;
                        }
                        // Keep reading what is already buffered.
                    }
                    Ok(Err(e)) if filled == 0 => return Err(io_err(e)),
                    Ok(Err(_)) => break,
                    // Drained (readiness is cleared): return what we have, or wait again.
                    Err(_would_block) => break,
                }
            }
            if filled > 0 {
                buf.truncate(filled);
                return Ok(ReadOutcome::Data(buf));
            }
        }
    }

    /// Closes the fd without reading (used when an entry is evicted).
    fn try_close(&self) {
        if let Ok(mut g) = self.fd.try_lock() {
            g.take();
        }
    }
}

/// Write side of stdin.
struct Stdin {
    fd: AsyncFd<File>,
}

/// A process started by ExecProcess.
pub struct Process {
    pub pid: i32,
    pub terminal: bool,
    exit: ExitReceiver,
    /// `None` after CloseStdin.
    stdin: Mutex<Option<Stdin>>,
    pub stdout: OutputStream,
    pub stderr: OutputStream,
    /// A duplicate of the pty master for TIOCSWINSZ; `None` without a terminal or once released.
    pty: std::sync::Mutex<Option<std::os::fd::OwnedFd>>,
}

impl Process {
    /// Wraps the fds of a freshly spawned process. Must run inside the tokio runtime.
    pub fn new(spawned: Spawned, terminal: bool) -> io::Result<Process> {
        Ok(Process {
            pid: spawned.pid,
            terminal,
            exit: spawned.exit,
            stdin: Mutex::new(Some(Stdin {
                fd: async_fd(spawned.stdin, Interest::WRITABLE)?,
            })),
            stdout: OutputStream::new(Some(spawned.stdout), terminal)?,
            stderr: OutputStream::new(spawned.stderr, terminal)?,
            pty: std::sync::Mutex::new(spawned.pty),
        })
    }

    /// Sets the terminal's window size. `Ok(false)`: the process has no terminal (any more).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<bool, StreamError> {
        let guard = self.pty.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fd) = guard.as_ref() else {
            return Ok(false);
        };
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid winsize from a live stack value; the fd is open
        // (owned by the guard for the duration of the call).
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws as *const libc::winsize) };
        if rc != 0 {
            return Err(StreamError::Io {
                op: "TIOCSWINSZ",
                source: io::Error::last_os_error(),
            });
        }
        Ok(true)
    }

    /// Exit status if the process has been reaped.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Waits until the process has exited.
    pub async fn wait(&self) -> Result<ExitInfo, StreamError> {
        let mut rx = self.exit.clone();
        let info = rx
            .wait_for(|s| s.is_some())
            .await
            .map_err(|_| StreamError::StatusLost)?;
        (*info).ok_or(StreamError::StatusLost)
    }

    /// Exited, and both output streams were read to EOF: only the status is left.
    pub fn is_finished(&self) -> bool {
        self.exit_info().is_some() && self.stdout.at_eof() && self.stderr.at_eof()
    }

    /// Releases the fds of a process that is being dropped from the table.
    pub fn release(&self) {
        if let Ok(mut g) = self.stdin.try_lock() {
            g.take();
        }
        self.stdout.try_close();
        self.stderr.try_close();
        self.pty.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Writes all of `data` to stdin; returns its length.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize, StreamError> {
        let guard = self.stdin.lock().await;
        let stdin = guard.as_ref().ok_or(StreamError::StdinClosed)?;
        self.write_all(&stdin.fd, data).await?;
        Ok(data.len())
    }

    async fn write_all(&self, afd: &AsyncFd<File>, data: &[u8]) -> Result<(), StreamError> {
        let mut written = 0;
        while written < data.len() {
            let mut ready = if self.terminal {
                // Nobody drains a pty whose process is gone: do not wait forever for space.
                let mut exit = self.exit.clone();
                tokio::select! {
                    biased;
                    r = afd.writable() => r,
                    _ = exit.wait_for(|s| s.is_some()) => {
                        return Err(StreamError::ExitedDuringWrite { written });
                    }
                }
            } else {
                afd.writable().await
            }
            .map_err(|source| StreamError::Io {
                op: "write",
                source,
            })?;
            match ready.try_io(|inner| inner.get_ref().write(&data[written..])) {
                Ok(Ok(n)) => written += n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                    return Err(StreamError::BrokenPipe)
                }
                Ok(Err(source)) => {
                    return Err(StreamError::Io {
                        op: "write",
                        source,
                    })
                }
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// Closes stdin. For a terminal (whose master cannot be half-closed) this sends the EOF
    /// character (^D), which ends the input of a program reading in canonical mode at the
    /// start of a line. Closing twice is fine.
    pub async fn close_stdin(&self) -> Result<(), StreamError> {
        let mut guard = self.stdin.lock().await;
        if let Some(stdin) = guard.take() {
            if self.terminal && self.exit_info().is_none() {
                match self.write_all(&stdin.fd, &[TTY_EOF]).await {
                    Ok(()) | Err(StreamError::ExitedDuringWrite { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_len_is_capped() {
        assert_eq!(effective_read_len(0), 64 * 1024);
        assert_eq!(effective_read_len(1), 1);
        assert_eq!(effective_read_len(4096), 4096);
        assert_eq!(effective_read_len(1 << 20), 1 << 20);
        assert_eq!(effective_read_len((1 << 20) + 1), 1 << 20);
        assert_eq!(effective_read_len(u32::MAX), 1 << 20);
    }
}
