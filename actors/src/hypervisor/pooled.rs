//! Leasing a pre-booted VM from `joey-pool` (docs/pool.md): the wire protocol both sides speak
//! and the lessee's side of a lease.
//!
//! The pool listens on `<runtime.state_dir>/.pool/pool.sock` (mode 0600). A connection carries
//! at most one lease and the lease lives exactly as long as the connection: the lessee sends
//! [`Request::Lease`] with the [`Shape`] it needs, gets [`Reply::Leased`] (or
//! [`Reply::Empty`]: boot cold), may later send [`Request::Stop`] (answered by
//! [`Reply::Stopped`]), and releases the VM by closing the connection. The pool owns the VM's
//! QEMU and device backends throughout: when the connection closes, by a release or because
//! the lessee died, it stops the VM and removes all of it. Each message is one JSON object on
//! one line (at most [`MAX_LINE`] bytes).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader,
};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

use super::{StopMethod, VmExit, VmSpec};

/// The pool's directory under `runtime.state_dir` (a sandbox id never starts with a dot).
pub const POOL_DIR: &str = ".pool";
/// The pool's socket inside [`POOL_DIR`].
pub const POOL_SOCK: &str = "pool.sock";
/// Longest accepted message line, in bytes.
pub const MAX_LINE: u64 = 64 * 1024;
/// How long a lessee waits beyond the stop's grace for the pool's [`Reply::Stopped`].
const STOP_REPLY_SLACK: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("pool message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("pool message longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("the pool closed the connection")]
    Closed,
    #[error("the pool did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the pool answered {0}")]
    Unexpected(String),
}

/// `<state_dir>/.pool`.
pub fn pool_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(POOL_DIR)
}

/// `<state_dir>/.pool/pool.sock`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    pool_dir(state_dir).join(POOL_SOCK)
}

/// What makes two VMs interchangeable: a lessee only gets a VM booted exactly as it would boot
/// its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    // The machine.
    pub vcpus: u32,
    pub memory_mib: u32,
    pub accel: String,
    pub qemu_binary: PathBuf,
    pub tcg_tb_size_mib: u32,
    // What it boots.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_params: String,
    pub agent_port: u32,
    // How its console is kept.
    pub console_log_max_bytes: u64,
    // What its vsock device lets through (the pool serves it).
    pub vsock_limits: joey_config::RxTxLimits,
}

impl Shape {
    pub fn of(spec: &VmSpec) -> Shape {
        Shape {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            accel: spec.accel.to_string(),
            qemu_binary: spec.qemu_binary.clone(),
            tcg_tb_size_mib: spec.tcg_tb_size_mib,
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            kernel_params: spec.kernel_params.clone(),
            agent_port: spec.agent_port,
            console_log_max_bytes: spec.console_log_max_bytes,
            vsock_limits: spec.vsock_limits,
        }
    }
}

/// Lessee -> pool.
// One request per connection, parsed from a line of JSON: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Hand me a VM of this shape (the first request of a connection).
    Lease { shape: Shape },
    /// Stop the leased VM (after `grace_ms` for the guest to end it itself); the VM's files
    /// stay until the connection closes.
    Stop { grace_ms: u64 },
    /// How many VMs are ready, booting and leased (for operators, tests and benchmarks).
    Status,
}

/// A leased VM: where its files are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeasedVm {
    /// The pool's name for the VM (`vm-<hex>`), used once.
    pub vm_id: String,
    /// The VM's directory (its sockets, logs and `shared/`).
    pub dir: PathBuf,
    /// QEMU's pid.
    pub pid: u32,
    /// Hybrid-vsock socket to reach the agent.
    pub vsock_uds: PathBuf,
    pub console_log: PathBuf,
    pub qemu_log: PathBuf,
}

/// Pool -> lessee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    Leased {
        vm: LeasedVm,
    },
    /// No VM for this lease (none ready, another shape, shutting down): boot cold.
    Empty {
        reason: String,
    },
    /// The leased VM ended (sent once, whenever it happens).
    Exited {
        exit: VmExit,
    },
    /// The answer to [`Request::Stop`].
    Stopped {
        method: StopMethod,
        exit: VmExit,
    },
    Status {
        ready: u32,
        booting: u32,
        leased: u32,
        size: u32,
    },
    /// A request that is not valid now.
    Refused {
        message: String,
    },
}

/// Reads one message; `None` at end of stream.
pub async fn read_msg<T, R>(r: &mut BufReader<R>) -> Result<Option<T>, PoolError>
where
    T: for<'de> Deserialize<'de>,
    R: AsyncRead + Unpin,
{
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(MAX_LINE + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(if n as u64 > MAX_LINE {
            PoolError::TooLong
        } else {
            PoolError::Closed
        });
    }
    Ok(Some(serde_json::from_slice(&line)?))
}

/// Writes one message.
pub async fn write_msg<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
) -> Result<(), PoolError> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    Ok(())
}

/// Whether a lease was had, and if not, why (the sandbox then boots cold).
pub enum LeaseOutcome {
    Leased(Lease),
    Cold(String),
}

/// One request on a fresh connection and its first reply, within `timeout`. `Ok(None)`: no pool
/// runs (no socket, or nobody listens on it).
async fn ask(
    state_dir: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Option<(BufReader<OwnedReadHalf>, OwnedWriteHalf, Reply)>, PoolError> {
    let sock = socket_path(state_dir);
    let fut = async {
        let stream = match UnixStream::connect(&sock).await {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        write_msg(&mut w, req).await?;
        let reply = read_msg::<Reply, _>(&mut r)
            .await?
            .ok_or(PoolError::Closed)?;
        Ok(Some((r, w, reply)))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| PoolError::Timeout(timeout))?
}

/// Asks the pool under `state_dir` for a VM of `shape`. Never fails: anything but a lease is a
/// reason to boot cold.
pub async fn lease(state_dir: &Path, shape: Shape, timeout: Duration) -> LeaseOutcome {
    let requested_at = Instant::now();
    match ask(state_dir, &Request::Lease { shape }, timeout).await {
        Ok(None) => LeaseOutcome::Cold("no pool runs".into()),
        Ok(Some((r, w, Reply::Leased { vm }))) => {
            LeaseOutcome::Leased(Lease::new(vm, requested_at, r, w))
        }
        Ok(Some((_, _, Reply::Empty { reason }))) => {
            LeaseOutcome::Cold(format!("the pool is empty ({reason})"))
        }
        Ok(Some((_, _, other))) => {
            LeaseOutcome::Cold(PoolError::Unexpected(format!("{other:?}")).to_string())
        }
        Err(e) => LeaseOutcome::Cold(format!("asking the pool failed: {e}")),
    }
}

/// The pool's counts ([`Reply::Status`]); `Ok(None)`: no pool runs.
pub async fn status(state_dir: &Path, timeout: Duration) -> Result<Option<Reply>, PoolError> {
    Ok(ask(state_dir, &Request::Status, timeout)
        .await?
        .map(|(_, _, reply)| reply))
}

/// A VM leased from the pool: held for as long as this value lives (dropping it closes the
/// connection, upon which the pool stops and removes the VM).
pub struct Lease {
    pub vm: LeasedVm,
    /// When the lease was asked for (the start of "lease -> agent ready").
    pub requested_at: Instant,
    writer: OwnedWriteHalf,
    exit: watch::Receiver<Option<VmExit>>,
    stopped: mpsc::Receiver<(StopMethod, VmExit)>,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Starts the task that reads the pool's later replies: the VM's exit and stop answers. A
    /// connection the pool closes counts as the VM's end.
    fn new(
        vm: LeasedVm,
        requested_at: Instant,
        mut r: BufReader<OwnedReadHalf>,
        writer: OwnedWriteHalf,
    ) -> Lease {
        let (exit_tx, exit) = watch::channel(None);
        let (stopped_tx, stopped) = mpsc::channel(1);
        let reader = tokio::spawn(async move {
            let record = |e: VmExit| {
                exit_tx.send_if_modified(|v| v.is_none() && v.replace(e).is_none());
            };
            loop {
                match read_msg::<Reply, _>(&mut r).await {
                    Ok(Some(Reply::Exited { exit })) => record(exit),
                    Ok(Some(Reply::Stopped { method, exit })) => {
                        record(exit.clone());
                        let _ = stopped_tx.send((method, exit)).await;
                    }
                    Ok(Some(other)) => {
                        tracing::warn!(reply = ?other, "unexpected message from the pool")
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading from the pool failed");
                        break;
                    }
                }
            }
            record(VmExit::WaitFailed("the pool closed the lease".into()));
        });
        Lease {
            vm,
            requested_at,
            writer,
            exit,
            stopped,
            reader,
        }
    }

    /// Turns `Some` once the VM has ended (or the pool is gone).
    pub fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.exit.clone()
    }

    /// Has the pool stop the VM (the guest gets `grace` to end it itself) and waits for its
    /// answer. The VM's files stay until the lease is dropped.
    pub async fn stop(&mut self, grace: Duration) -> Result<(StopMethod, VmExit), PoolError> {
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        write_msg(&mut self.writer, &Request::Stop { grace_ms }).await?;
        let wait = grace + STOP_REPLY_SLACK;
        match tokio::time::timeout(wait, self.stopped.recv()).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(PoolError::Closed),
            Err(_) => Err(PoolError::Timeout(wait)),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::tests::rt;

    fn shape() -> Shape {
        Shape {
            vcpus: 1,
            memory_mib: 256,
            kernel: "/k/bzImage".into(),
            initrd: "/k/initrd.img".into(),
            kernel_params: String::new(),
            agent_port: 1024,
            qemu_binary: "qemu-system-x86_64".into(),
            tcg_tb_size_mib: 16,
            accel: "tcg".into(),
            console_log_max_bytes: 1 << 20,
            vsock_limits: Default::default(),
        }
    }

    #[test]
    fn messages_are_one_tagged_json_line() {
        rt().block_on(async {
            let mut buf = Vec::new();
            write_msg(&mut buf, &Request::Stop { grace_ms: 5 })
                .await
                .unwrap();
            assert_eq!(buf, b"{\"op\":\"stop\",\"grace_ms\":5}\n");
            let exit = Reply::Exited {
                exit: VmExit::Signaled(9),
            };
            let mut buf = Vec::new();
            write_msg(&mut buf, &exit).await.unwrap();
            write_msg(&mut buf, &Request::Lease { shape: shape() })
                .await
                .unwrap();
            let mut r = BufReader::new(&buf[..]);
            assert_eq!(read_msg::<Reply, _>(&mut r).await.unwrap(), Some(exit));
            assert_eq!(
                read_msg::<Request, _>(&mut r).await.unwrap(),
                Some(Request::Lease { shape: shape() })
            );
            assert_eq!(read_msg::<Request, _>(&mut r).await.unwrap(), None);
        });
    }

    #[test]
    fn bad_messages_are_typed_errors() {
        rt().block_on(async {
            let read = |b: &'static [u8]| async move {
                read_msg::<Request, _>(&mut BufReader::new(b)).await
            };
            assert!(matches!(
                read(b"{\"op\":\"fly\"}\n").await,
                Err(PoolError::Json(_))
            ));
            assert!(matches!(
                read(b"{\"op\":\"stop\",\"grace_ms\":1,\"x\":2}\n").await,
                Err(PoolError::Json(_))
            ));
            // Cut short, and longer than a line may be.
            assert!(matches!(
                read(b"{\"op\":\"status\"}").await,
                Err(PoolError::Closed)
            ));
            let long: &'static [u8] =
                Box::leak(vec![b' '; MAX_LINE as usize + 10].into_boxed_slice());
            assert!(matches!(read(long).await, Err(PoolError::TooLong)));
        });
    }

    #[test]
    fn no_pool_means_cold() {
        rt().block_on(async {
            let d = tempfile::tempdir().unwrap();
            match lease(d.path(), shape(), Duration::from_secs(1)).await {
                LeaseOutcome::Cold(why) => assert_eq!(why, "no pool runs"),
                LeaseOutcome::Leased(_) => panic!("leased without a pool"),
            }
            // A socket nobody listens on any more (a crashed pool) is no pool either.
            std::fs::create_dir(pool_dir(d.path())).unwrap();
            drop(std::os::unix::net::UnixListener::bind(socket_path(d.path())).unwrap());
            assert!(matches!(
                status(d.path(), Duration::from_secs(1)).await,
                Ok(None)
            ));
        });
    }

    #[test]
    fn a_lease_follows_the_pools_replies() {
        rt().block_on(async {
            let d = tempfile::tempdir().unwrap();
            std::fs::create_dir(pool_dir(d.path())).unwrap();
            let listener = tokio::net::UnixListener::bind(socket_path(d.path())).unwrap();
            let vm = LeasedVm {
                vm_id: "vm-1".into(),
                dir: d.path().join("vm-1"),
                pid: 42,
                vsock_uds: d.path().join("vm-1/vsock.sock"),
                console_log: d.path().join("vm-1/console.log"),
                qemu_log: d.path().join("vm-1/qemu.log"),
            };
            let served = vm.clone();
            // A pool that leases, then answers a stop, then sees the lessee close.
            let pool = tokio::spawn(async move {
                let (s, _) = listener.accept().await.unwrap();
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                assert_eq!(
                    read_msg::<Request, _>(&mut r).await.unwrap(),
                    Some(Request::Lease { shape: shape() })
                );
                write_msg(&mut w, &Reply::Leased { vm: served })
                    .await
                    .unwrap();
                assert_eq!(
                    read_msg::<Request, _>(&mut r).await.unwrap(),
                    Some(Request::Stop { grace_ms: 10 })
                );
                let reply = Reply::Stopped {
                    method: StopMethod::QmpQuit,
                    exit: VmExit::Exited(0),
                };
                write_msg(&mut w, &reply).await.unwrap();
                read_msg::<Request, _>(&mut r).await.unwrap()
            });
            let LeaseOutcome::Leased(mut l) =
                lease(d.path(), shape(), Duration::from_secs(5)).await
            else {
                panic!("no lease");
            };
            assert_eq!(l.vm, vm);
            let exit = l.exit_watch();
            assert_eq!(*exit.borrow(), None);
            let stopped = l.stop(Duration::from_millis(10)).await.unwrap();
            assert_eq!(stopped, (StopMethod::QmpQuit, VmExit::Exited(0)));
            assert_eq!(*exit.borrow(), Some(VmExit::Exited(0)));
            drop(l);
            // Dropping the lease is the release: the pool reads end of stream.
            assert_eq!(pool.await.unwrap(), None);
        });
    }
}
