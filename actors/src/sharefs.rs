//! The ShareFs actor: owns the sandbox's virtio-fs device and its shared directory.
//!
//! Layout inside the sandbox state dir:
//!
//! ```text
//! <state>/vhost-fs.sock             vhost-user socket of the virtio-fs device (QEMU connects)
//! <state>/shared/                   shared with the guest (tag `joeyfs`, mounted by the agent at
//!                                   /run/joey/shared); a private bind mount onto itself so that
//!                                   the binds below never propagate elsewhere
//! <state>/shared/<cid>/rootfs       bind mount (ro or rw) of a container's host rootfs dir
//! ```
//!
//! Every host resource is recorded in a [`ResourceStack`] as it is set up (each blocking step
//! on the blocking pool, see [`ResourceStack::add_blocking`]) and released in reverse order:
//! binds are lazily unmounted, directories removed with `rmdir` only (never a recursive delete,
//! which could walk into a still-mounted rootfs), the device thread stopped and joined with a
//! timeout, all on the blocking pool, never on the actor's thread; handlers are atomic, so
//! requests are served one at a time.
//!
//! [`SetupShareFs`] replies with what it made, a [`ShareFsDevice`]: the Sandbox actor puts it
//! into the VM spec, from which the backend attaches the device (QEMU: the vhost-user socket;
//! built-in VMM: its in-process virtio-fs over the shared dir) and the Hypervisor actor reads
//! its counters. Nobody rediscovers it from the filesystem.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use joey_agent_protocol::SHARED_FS_TAG;
use joey_vmm_core::devices::fs::{CachePolicy, FsConfig, FsError, FsMetrics, VhostUserFsHandle, VhostUserFsServer};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::lifecycle::InvalidTransition;
use crate::resource::{Resource, ResourceError, ResourceStack, Undo};

/// Name of the shared directory inside the sandbox state dir.
pub const SHARED_DIR_NAME: &str = "shared";
/// Name of the vhost-user socket of the virtio-fs device inside the sandbox state dir.
pub const VHOST_FS_SOCK: &str = "vhost-fs.sock";
/// How long stopping waits for the device thread.
const DEVICE_JOIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Failpoint (the `failpoints` cargo feature, docs/faults.md) of the shared dir's private
/// self-bind at [`SetupShareFs`]: the bind is made, then fails as its follow-up would.
pub const SETUP_FAILPOINT: &str = "sharefs::setup";
/// Failpoint of each bind of a container's rootfs or volume at [`ShareRootfs`], likewise.
pub const SHARE_FAILPOINT: &str = "sharefs::share";

#[derive(Debug, thiserror::Error)]
pub enum ShareFsError {
    #[error("invalid container id {0:?}: expected 1 to 64 of [A-Za-z0-9_.-], starting alphanumeric")]
    InvalidId(String),
    #[error("container rootfs {0} is not a directory")]
    RootfsNotFound(PathBuf),
    #[error("container {0} is already shared")]
    AlreadyShared(String),
    #[error("container {0} is not shared")]
    NotShared(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{what}: {source}")]
    Mount { what: String, source: nix::Error },
    #[error("virtio-fs device: {0}")]
    Device(#[from] FsError),
    #[error(transparent)]
    State(#[from] InvalidTransition),
    #[error("cleanup left resources behind: {0}")]
    Cleanup(String),
    /// A failpoint ([`SETUP_FAILPOINT`], [`SHARE_FAILPOINT`]) failed the bind on `target`.
    #[error("bind mount on {}: injected failure (failpoint {point})", .target.display())]
    Injected { point: &'static str, target: PathBuf },
    #[error(transparent)]
    Resource(#[from] ResourceError),
}

/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`, the rule the agent enforces too
/// ([`joey_agent_protocol::is_valid_container_id`]).
pub fn validate_container_id(id: &str) -> Result<(), ShareFsError> {
    if joey_agent_protocol::is_valid_container_id(id) {
        Ok(())
    } else {
        Err(ShareFsError::InvalidId(id.to_string()))
    }
}

/// A container's shared volumes and rootfs in the guest (`joey-oci`, which the OCI spec
/// translation uses too).
pub use joey_oci::{guest_rootfs_path, guest_volume_path, VolumeShare};

crate::state_machine! {
    /// Lifecycle of the ShareFs actor.
    pub enum ShareFsState: "sharefs" {
        Created => "created",
        Ready => "ready",
        Stopping => "stopping",
        Stopped => "stopped",
    }
    transitions {
        Created => Ready | Stopping | Stopped,
        Ready => Stopping,
        Stopping => Stopped,
    }
}

/// How the VMM reaches the shared directory.
#[derive(Debug, Clone)]
pub enum ShareFsTransport {
    /// A vhost-user virtio-fs device served by the ShareFs actor's device thread; the VMM
    /// (QEMU) connects to `socket`. `metrics` are the device's counters.
    VhostUser { socket: PathBuf, metrics: Arc<FsMetrics> },
    /// The VMM serves the shared directory itself (the built-in VMM's in-process virtio-fs,
    /// whose counters the VMM keeps).
    InProcess,
}

/// What [`SetupShareFs`] made, handed to the hypervisor in the VM spec
/// ([`crate::hypervisor::VmSpec::share_fs`]).
#[derive(Debug, Clone)]
pub struct ShareFsDevice {
    /// The directory shared with the guest (`<state>/shared`).
    pub shared_dir: PathBuf,
    /// virtio-fs mount tag.
    pub tag: &'static str,
    pub transport: ShareFsTransport,
}

/// One blocking setup step's result: a value and the resource that undoes the step.
type Staged<T> = Result<(T, Box<dyn Resource>), ShareFsError>;

fn io_err(what: String) -> impl FnOnce(io::Error) -> ShareFsError {
    move |source| ShareFsError::Io { what, source }
}

fn mount_err(what: String) -> impl FnOnce(nix::Error) -> ShareFsError {
    move |source| ShareFsError::Mount { what, source }
}

/// The resource that removes `p`, which a step just created: `rmdir` for a directory (which
/// fails, harmlessly, if it is not empty), unlink for a file. Gone already is fine.
fn created(p: &Path, dir: bool) -> Box<dyn Resource> {
    let (kind, verb, remove): (_, _, fn(&Path) -> io::Result<()>) = if dir {
        ("dir", "rmdir", |p| std::fs::remove_dir(p))
    } else {
        ("file", "unlink", |p| std::fs::remove_file(p))
    };
    let p = p.to_path_buf();
    Undo::new(format!("{kind} {}", p.display()), move || match remove(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{verb} {}: {e}", p.display())),
    })
}

/// Creates directory `p` (0700).
fn mkdir(p: &Path) -> Staged<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(p)
        .map_err(io_err(format!("create {}", p.display())))?;
    Ok(((), created(p, true)))
}

/// Creates the empty file `p` (a bind mountpoint).
fn touch(p: &Path) -> Staged<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
        .map_err(io_err(format!("create {}", p.display())))?;
    Ok(((), created(p, false)))
}

/// `Err` when failpoint `point` is on (never without the `failpoints` feature): `return` fails
/// every bind, `return(<text>)` those whose target path contains `<text>` (a container id).
fn injected(point: &'static str, target: &Path) -> Result<(), ShareFsError> {
    #[cfg(feature = "failpoints")]
    if let Some(arg) = fail::eval(point, |arg| arg) {
        if arg.is_some_and(|a| !target.to_string_lossy().contains(a.as_str())) {
            return Ok(());
        }
        return Err(ShareFsError::Injected {
            point,
            target: target.to_path_buf(),
        });
    }
    let _ = (point, target);
    Ok(())
}

/// Lazily unmounts `target`.
fn unmount(target: &Path) -> Result<(), String> {
    umount2(target, MntFlags::MNT_DETACH).map_err(|e| format!("unmount {}: {e}", target.display()))
}

/// Bind-mounts `source` on `target` (recursively if asked), then runs `then` on it (e.g. make it
/// private or read-only); undone by a lazy unmount. On error nothing is left mounted. Failpoint
/// `point` fails it after the mount, before `then`.
fn bind(
    point: &'static str,
    source: &Path,
    target: &Path,
    flags: MsFlags,
    then: impl FnOnce() -> Result<(), ShareFsError>,
) -> Staged<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | flags,
        None::<&str>,
    )
    .map_err(mount_err(format!("bind {} on {}", source.display(), target.display())))?;
    if let Err(e) = injected(point, target).and_then(|()| then()) {
        if let Err(u) = unmount(target) {
            tracing::warn!(error = %u, "undoing a failed bind");
        }
        return Err(e);
    }
    let t = target.to_path_buf();
    Ok(((), Undo::new(format!("mount {}", t.display()), move || unmount(&t))))
}

/// Binds `source` on `target` recursively, read-only if asked.
fn bind_share(source: &Path, target: &Path, read_only: bool) -> Staged<()> {
    bind(SHARE_FAILPOINT, source, target, MsFlags::MS_REC, || {
        if read_only {
            remount_ro(source, target)
        } else {
            Ok(())
        }
    })
}

/// Starts the vhost-user virtio-fs device on `sock` exporting `shared`; undone by stopping
/// and joining its thread (bounded), which removes the socket.
fn start_device(shared: &Path, sock: &Path) -> Staged<Arc<FsMetrics>> {
    let server = VhostUserFsServer::bind(
        sock,
        FsConfig {
            shared_dir: shared.to_path_buf(),
            read_only: false,
            cache: CachePolicy::Auto,
        },
    )?;
    let metrics = server.metrics();
    let handle: VhostUserFsHandle = server.spawn()?;
    let undo = Undo::new(format!("virtio-fs device {}", sock.display()), move || {
        handle.stop();
        handle
            .join_timeout(DEVICE_JOIN_TIMEOUT)
            .map_err(|e| format!("virtio-fs device thread: {e}"))
    });
    Ok((metrics, undo))
}

/// Creates the shared dir (private self-bind) and, for a VMM in another process, starts the
/// vhost-user device. On error nothing is left.
async fn setup(state_dir: &Path, vhost_user: bool) -> Result<(ResourceStack, ShareFsDevice), ShareFsError> {
    let shared = state_dir.join(SHARED_DIR_NAME);
    let mut res = ResourceStack::default();
    let s = shared.clone();
    res.add_blocking(move || mkdir(&s)).await?;
    let s = shared.clone();
    res.add_blocking(move || {
        bind(SETUP_FAILPOINT, &s, &s, MsFlags::empty(), || {
            mount(None::<&str>, &s, None::<&str>, MsFlags::MS_PRIVATE, None::<&str>)
                .map_err(mount_err(format!("make {} private", s.display())))
        })
    })
    .await?;
    let transport = if vhost_user {
        let (s, socket) = (shared.clone(), state_dir.join(VHOST_FS_SOCK));
        let sock = socket.clone();
        let metrics = res.add_blocking(move || start_device(&s, &sock)).await?;
        ShareFsTransport::VhostUser { socket, metrics }
    } else {
        ShareFsTransport::InProcess
    };
    Ok((
        res,
        ShareFsDevice {
            shared_dir: shared,
            tag: SHARED_FS_TAG,
            transport,
        },
    ))
}

/// Bind-mounts `host_path` at `<shared>/<cid>/rootfs` (read-only if asked) and each volume at
/// `<shared>/<cid>/volumes/<index>`. On error nothing is left.
async fn share(
    shared: &Path,
    cid: &str,
    host_path: PathBuf,
    read_only: bool,
    volumes: Vec<VolumeShare>,
) -> Result<ResourceStack, ShareFsError> {
    let dir = shared.join(cid);
    let target = dir.join("rootfs");
    let mut res = ResourceStack::default();
    let (d, h) = (dir.clone(), host_path.clone());
    res.add_blocking(move || {
        if !std::fs::metadata(&h).map(|m| m.is_dir()).unwrap_or(false) {
            return Err(ShareFsError::RootfsNotFound(h));
        }
        mkdir(&d)
    })
    .await?;
    let t = target.clone();
    res.add_blocking(move || mkdir(&t)).await?;
    res.add_blocking(move || bind_share(&host_path, &target, read_only))
        .await?;
    if volumes.is_empty() {
        return Ok(res);
    }
    let vdir = dir.join("volumes");
    let v = vdir.clone();
    res.add_blocking(move || mkdir(&v)).await?;
    for (i, v) in volumes.into_iter().enumerate() {
        let t = vdir.join(i.to_string());
        let (src, mp) = (v.host_path.clone(), t.clone());
        res.add_blocking(move || {
            let meta = std::fs::metadata(&src).map_err(io_err(format!("bind mount source {}", src.display())))?;
            if meta.is_dir() {
                mkdir(&mp)
            } else {
                touch(&mp)
            }
        })
        .await?;
        res.add_blocking(move || bind_share(&v.host_path, &t, v.read_only))
            .await?;
    }
    Ok(res)
}

/// Remounts the bind at `target` read-only, keeping the source's nosuid/nodev/noexec.
fn remount_ro(source: &Path, target: &Path) -> Result<(), ShareFsError> {
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if let Ok(st) = nix::sys::statvfs::statvfs(source) {
        use nix::sys::statvfs::FsFlags;
        for (f, m) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        ] {
            if st.flags().contains(f) {
                flags |= m;
            }
        }
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(mount_err(format!("remount {} read-only", target.display())))
}

/// Creates the shared dir and, for a VMM in another process (QEMU), starts the vhost-user
/// virtio-fs device on `<state_dir>/vhost-fs.sock` (before the VM starts). The built-in VMM
/// serves the shared dir in-process and needs no socket. Replies with what it made.
#[derive(Message)]
#[rtype(result = "Result<ShareFsDevice, ShareFsError>")]
pub struct SetupShareFs {
    pub vhost_user: bool,
}

/// Uses the shared dir that already exists in the state dir, whose device another process
/// serves (a VM leased from `joey-pool`, docs/pool.md, which owns both): only the shares made
/// afterwards are this actor's to release.
#[derive(Message)]
#[rtype(result = "Result<(), ShareFsError>")]
pub struct AdoptSharedDir;

/// Shares a container's host rootfs dir; replies with its guest path.
#[derive(Message)]
#[rtype(result = "Result<String, ShareFsError>")]
pub struct ShareRootfs {
    pub container_id: String,
    pub host_path: PathBuf,
    pub read_only: bool,
    /// Bind-mount sources shared next to the rootfs, at `<cid>/volumes/<index>`.
    pub volumes: Vec<VolumeShare>,
}

/// Removes a container's share.
#[derive(Message)]
#[rtype(result = "Result<(), ShareFsError>")]
pub struct Unshare {
    pub container_id: String,
}

/// Releases everything (after the VM has stopped). Err lists what could not be released; the
/// caller must then not delete the state dir recursively.
#[derive(Message)]
#[rtype(result = "Result<(), ShareFsError>")]
pub struct StopShareFs;

/// Current state.
#[derive(Message)]
#[rtype(result = "ShareFsState")]
pub struct GetShareFsState;

/// The ShareFs actor of one sandbox.
pub struct ShareFsActor {
    state: ShareFsState,
    state_dir: PathBuf,
    base: ResourceStack,
    shares: HashMap<String, ResourceStack>,
}

impl ShareFsActor {
    /// `state_dir`: the sandbox state directory (must exist before [`SetupShareFs`]).
    pub fn new(state_dir: PathBuf) -> Self {
        ShareFsActor {
            state: ShareFsState::Created,
            state_dir,
            base: ResourceStack::default(),
            shares: HashMap::new(),
        }
    }

    pub fn socket_path(state_dir: &Path) -> PathBuf {
        state_dir.join(VHOST_FS_SOCK)
    }

    fn shared_dir(&self) -> PathBuf {
        self.state_dir.join(SHARED_DIR_NAME)
    }
}

impl Actor for ShareFsActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Dropping the stacks hands what a missing StopShareFs left behind to the runtime.
        if !self.base.is_empty() || !self.shares.is_empty() {
            tracing::warn!("sharefs actor stopped without StopShareFs; releasing now");
        }
    }
}

/// Releases the stacks in order; Err names what could not be released.
async fn release_all(stacks: Vec<ResourceStack>) -> Result<(), ShareFsError> {
    let mut errors = Vec::new();
    for mut s in stacks {
        errors.extend(s.cleanup_all().await);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ShareFsError::Cleanup(errors.join("; ")))
    }
}

type Reply<T> = AtomicResponse<ShareFsActor, Result<T, ShareFsError>>;

fn ready<T: 'static>(r: Result<T, ShareFsError>) -> Reply<T> {
    AtomicResponse::new(Box::pin(fut::ready(r)))
}

impl Handler<GetShareFsState> for ShareFsActor {
    type Result = MessageResult<GetShareFsState>;
    fn handle(&mut self, _: GetShareFsState, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.state)
    }
}

impl Handler<SetupShareFs> for ShareFsActor {
    type Result = Reply<ShareFsDevice>;

    fn handle(&mut self, m: SetupShareFs, _: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.state.expect(ShareFsState::Created) {
            return ready(Err(e.into()));
        }
        let dir = self.state_dir.clone();
        AtomicResponse::new(Box::pin(
            async move { setup(&dir, m.vhost_user).await }
                .into_actor(self)
                .map(|r, act, _| {
                    let (res, device) = r?;
                    act.base = res;
                    act.state.transition(ShareFsState::Ready)?;
                    tracing::info!(device = ?device, "shared dir ready");
                    Ok(device)
                }),
        ))
    }
}

impl Handler<AdoptSharedDir> for ShareFsActor {
    type Result = Result<(), ShareFsError>;

    fn handle(&mut self, _: AdoptSharedDir, _: &mut Context<Self>) -> Self::Result {
        self.state.expect(ShareFsState::Created)?;
        let shared = self.shared_dir();
        if !shared.is_dir() {
            return Err(ShareFsError::Io {
                what: format!("adopt shared dir {}", shared.display()),
                source: io::ErrorKind::NotFound.into(),
            });
        }
        self.state.transition(ShareFsState::Ready)?;
        Ok(())
    }
}

impl Handler<ShareRootfs> for ShareFsActor {
    type Result = Reply<String>;

    fn handle(&mut self, m: ShareRootfs, _: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.state.expect(ShareFsState::Ready) {
            return ready(Err(e.into()));
        }
        if let Err(e) = validate_container_id(&m.container_id) {
            return ready(Err(e));
        }
        if self.shares.contains_key(&m.container_id) {
            return ready(Err(ShareFsError::AlreadyShared(m.container_id)));
        }
        let shared = self.shared_dir();
        let cid = m.container_id.clone();
        let fut = async move { share(&shared, &m.container_id, m.host_path, m.read_only, m.volumes).await };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |r, act, _| {
            let res = r?;
            // Handlers are atomic: the state cannot have changed meanwhile (a stack dropped here
            // would still be released, by the runtime).
            act.state.expect(ShareFsState::Ready)?;
            act.shares.insert(cid.clone(), res);
            Ok(guest_rootfs_path(&cid))
        })))
    }
}

impl Handler<Unshare> for ShareFsActor {
    type Result = Reply<()>;

    fn handle(&mut self, m: Unshare, _: &mut Context<Self>) -> Self::Result {
        let Some(res) = self.shares.remove(&m.container_id) else {
            return ready(Err(ShareFsError::NotShared(m.container_id)));
        };
        AtomicResponse::new(Box::pin(release_all(vec![res]).into_actor(self)))
    }
}

impl Handler<StopShareFs> for ShareFsActor {
    type Result = Reply<()>;

    fn handle(&mut self, _: StopShareFs, _: &mut Context<Self>) -> Self::Result {
        if self.state == ShareFsState::Stopped {
            return ready(Ok(()));
        }
        if let Err(e) = self.state.transition(ShareFsState::Stopping) {
            return ready(Err(e.into()));
        }
        // Shares first (their binds live inside the shared dir), then the base in reverse order.
        let mut stacks: Vec<ResourceStack> = self.shares.drain().map(|(_, r)| r).collect();
        stacks.push(std::mem::take(&mut self.base));
        AtomicResponse::new(Box::pin(release_all(stacks).into_actor(self).map(|r, act, _| {
            let _ = act.state.transition(ShareFsState::Stopped);
            r
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The result of a step that mounts; these tests need CAP_SYS_ADMIN and say so when it is
    /// missing (they never pass silently).
    fn mounting<T>(r: Result<T, ShareFsError>) -> T {
        match r {
            Ok(v) => v,
            Err(ShareFsError::Mount {
                source: nix::errno::Errno::EPERM,
                what,
            }) => panic!("{what}: EPERM; the sharefs mount tests need CAP_SYS_ADMIN (run them as root)"),
            Err(e) => panic!("{e}"),
        }
    }

    /// `<dir>/shared` and a host rootfs dir `<dir>/img`, both created.
    fn shared_and_host(dir: &Path) -> (PathBuf, PathBuf) {
        let (shared, host) = (dir.join("shared"), dir.join("img"));
        std::fs::create_dir(&shared).unwrap();
        std::fs::create_dir(&host).unwrap();
        (shared, host)
    }

    fn assert_no_mounts_under(dir: &Path) {
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mi.contains(&dir.display().to_string()), "{mi}");
    }

    #[test]
    fn lifecycle() {
        use ShareFsState::*;
        crate::lifecycle::assert_transitions(
            &[Created, Ready, Stopping, Stopped],
            &[
                (Created, Ready),
                (Created, Stopping),
                (Created, Stopped),
                (Ready, Stopping),
                (Stopping, Stopped),
            ],
        );
        let e = Ready.expect(Created).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid sharefs (request) state transition: ready -> created"
        );
    }

    #[test]
    fn container_ids() {
        assert!(validate_container_id("0123abcd").is_ok());
        assert!(validate_container_id("web_1.a-b").is_ok());
        for bad in ["", "..", "a/b", "-x", &"a".repeat(65)] {
            assert!(validate_container_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(guest_rootfs_path("c1"), "/run/joey/shared/c1/rootfs");
    }

    /// A stack that made the directories `dirs`, in order.
    async fn made_dirs(dirs: &[&Path]) -> ResourceStack {
        let mut res = ResourceStack::default();
        for d in dirs {
            let d = d.to_path_buf();
            res.add_blocking(move || mkdir(&d)).await.unwrap();
        }
        res
    }

    #[tokio::test]
    async fn resources_release_in_reverse_order() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = a.join("b");
        let mut res = made_dirs(&[&a, &b]).await;
        assert_eq!(
            res.names(),
            vec![format!("dir {}", a.display()), format!("dir {}", b.display())]
        );
        // Reverse order: b before a, so both rmdirs succeed.
        assert!(res.cleanup_all().await.is_empty());
        assert!(!a.exists());
    }

    #[tokio::test]
    async fn release_never_deletes_contents() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let mut res = made_dirs(&[&a]).await;
        std::fs::write(a.join("keep"), b"x").unwrap();
        let errors = res.cleanup_all().await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(a.join("keep").exists());
    }

    #[tokio::test]
    async fn share_of_missing_dir_is_typed() {
        let d = tempfile::tempdir().unwrap();
        let e = share(d.path(), "c1", d.path().join("nope"), false, Vec::new())
            .await
            .err()
            .unwrap();
        assert!(matches!(e, ShareFsError::RootfsNotFound(_)));
        assert!(!d.path().join("c1").exists());
    }

    #[tokio::test]
    async fn a_failed_step_undoes_the_earlier_ones() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let mut res = made_dirs(&[&a]).await;
        // Creating it again fails: the first step is undone, the error stays typed.
        let a3 = a.clone();
        let e = res.add_blocking(move || mkdir(&a3)).await.unwrap_err();
        assert!(
            matches!(&e, ShareFsError::Io { what, .. } if what.contains("create")),
            "{e}"
        );
        assert!(res.is_empty());
        assert!(!a.exists());
    }

    /// Needs CAP_SYS_ADMIN (mounts).
    #[tokio::test]
    async fn setup_replies_with_the_device_it_made() {
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join(SHARED_DIR_NAME);
        let sock = d.path().join(VHOST_FS_SOCK);
        let (mut res, dev) = mounting(setup(d.path(), true).await);
        assert_eq!((dev.shared_dir.as_path(), dev.tag), (shared.as_path(), "joeyfs"));
        match &dev.transport {
            ShareFsTransport::VhostUser { socket, metrics } => {
                assert_eq!(socket, &sock);
                assert!(sock.exists());
                assert_eq!(metrics.snapshot().failed_requests, 0);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(res.names().len(), 3, "{:?}", res.names());
        assert!(res.cleanup_all().await.is_empty());
        assert!(!sock.exists() && !shared.exists());

        // For the built-in VMM: the shared dir only, no socket.
        let (mut res, dev) = setup(d.path(), false).await.unwrap();
        assert!(matches!(dev.transport, ShareFsTransport::InProcess));
        assert!(shared.is_dir() && !sock.exists());
        assert!(res.cleanup_all().await.is_empty());
        assert!(!shared.exists());
    }

    /// A leased VM's shared dir (the pool's): adopted as it is, only the shares are released.
    /// Needs CAP_SYS_ADMIN (mounts).
    #[test]
    fn an_adopted_shared_dir_stays_with_its_owner() {
        actix::System::new().block_on(async {
            let d = tempfile::tempdir().unwrap();
            let a = ShareFsActor::new(d.path().to_path_buf()).start();
            // No shared dir yet: refused, nothing changes.
            let e = a.send(AdoptSharedDir).await.unwrap().unwrap_err();
            assert!(matches!(e, ShareFsError::Io { .. }), "{e}");
            assert_eq!(a.send(GetShareFsState).await.unwrap(), ShareFsState::Created);
            let (shared, host) = shared_and_host(d.path());
            a.send(AdoptSharedDir).await.unwrap().unwrap();
            let share = ShareRootfs {
                container_id: "c1".into(),
                host_path: host,
                read_only: false,
                volumes: Vec::new(),
            };
            assert_eq!(mounting(a.send(share).await.unwrap()), guest_rootfs_path("c1"));
            assert!(shared.join("c1/rootfs").is_dir());
            a.send(StopShareFs).await.unwrap().unwrap();
            assert!(shared.is_dir() && !shared.join("c1").exists());
            assert_no_mounts_under(d.path());
        });
    }

    /// Needs CAP_SYS_ADMIN (mounts).
    #[tokio::test]
    async fn share_and_release_bind_mounts() {
        let d = tempfile::tempdir().unwrap();
        let (shared, host) = shared_and_host(d.path());
        std::fs::write(host.join("marker"), b"m").unwrap();
        let mut res = mounting(share(&shared, "c1", host.clone(), true, Vec::new()).await);
        let target = shared.join("c1/rootfs");
        assert_eq!(std::fs::read(target.join("marker")).unwrap(), b"m");
        let e = std::fs::write(target.join("new"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        assert!(res.cleanup_all().await.is_empty());
        assert!(!shared.join("c1").exists());
        assert!(host.join("marker").exists());
        assert_no_mounts_under(d.path());
    }

    /// Needs CAP_SYS_ADMIN (mounts).
    #[tokio::test]
    async fn volumes_are_shared_ro_and_rw_and_released() {
        let d = tempfile::tempdir().unwrap();
        let (shared, host) = shared_and_host(d.path());
        let vro = d.path().join("vro");
        std::fs::create_dir(&vro).unwrap();
        std::fs::write(vro.join("in"), b"ro").unwrap();
        let vrw = d.path().join("vrw");
        std::fs::create_dir(&vrw).unwrap();
        let vfile = d.path().join("afile");
        std::fs::write(&vfile, b"file").unwrap();
        let vols = vec![
            VolumeShare {
                host_path: vro.clone(),
                read_only: true,
            },
            VolumeShare {
                host_path: vrw.clone(),
                read_only: false,
            },
            VolumeShare {
                host_path: vfile.clone(),
                read_only: true,
            },
        ];
        let mut res = mounting(share(&shared, "c1", host.clone(), false, vols).await);
        let v = shared.join("c1/volumes");
        assert_eq!(std::fs::read(v.join("0/in")).unwrap(), b"ro");
        let e = std::fs::write(v.join("0/new"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        std::fs::write(v.join("1/new"), b"rw").unwrap();
        assert_eq!(std::fs::read(vrw.join("new")).unwrap(), b"rw");
        assert_eq!(std::fs::read(v.join("2")).unwrap(), b"file");
        assert_eq!(guest_volume_path("c1", 2), "/run/joey/shared/c1/volumes/2");
        assert!(res.cleanup_all().await.is_empty());
        assert!(!shared.join("c1").exists());
        assert_eq!(std::fs::read(&vfile).unwrap(), b"file");
        assert_no_mounts_under(d.path());
    }

    #[tokio::test]
    async fn missing_volume_source_releases_everything() {
        let d = tempfile::tempdir().unwrap();
        let (shared, host) = shared_and_host(d.path());
        let vols = vec![VolumeShare {
            host_path: d.path().join("missing"),
            read_only: false,
        }];
        match share(&shared, "c1", host.clone(), false, vols).await.map(|_| ()) {
            Err(ShareFsError::Io { what, .. }) => assert!(what.contains("missing"), "{what}"),
            other => panic!("expected an Io error, got {other:?}"),
        }
        assert!(!shared.join("c1").exists());
    }

    /// The failpoint fails a container's second bind (a volume) after it was mounted: that
    /// bind and the rootfs bind before it are undone, the dirs removed. Only this test's
    /// binds fail (the argument is its temp dir), so the other tests may run meanwhile.
    #[cfg(feature = "failpoints")]
    #[tokio::test]
    async fn a_share_failpoint_undoes_the_binds_made() {
        let d = tempfile::tempdir().unwrap();
        let (shared, host) = shared_and_host(d.path());
        let vol = d.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        let vols = vec![VolumeShare {
            host_path: vol,
            read_only: true,
        }];
        let failing = shared.join("c1/volumes/0");
        fail::cfg(SHARE_FAILPOINT, &format!("return({})", failing.display())).unwrap();
        let r = share(&shared, "c1", host, false, vols).await.map(|_| ());
        fail::cfg(SHARE_FAILPOINT, "off").unwrap();
        match r {
            Err(ShareFsError::Injected { point, target }) => {
                assert_eq!((point, target), (SHARE_FAILPOINT, failing))
            }
            other => panic!("expected the injected failure, got {other:?}"),
        }
        assert!(!shared.join("c1").exists());
        assert_no_mounts_under(d.path());
    }
}
