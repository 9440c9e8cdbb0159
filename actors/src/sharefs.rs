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
//! Every host resource is recorded in a [`Resources`] stack as it is set up and released in
//! reverse order: binds are lazily unmounted, directories removed with `rmdir` only (never a
//! recursive delete, which could walk into a still-mounted rootfs), the device thread stopped
//! and joined with a timeout. Blocking work runs on `spawn_blocking`, never on the actor's thread;
//! handlers are atomic, so requests are served one at a time.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actix::prelude::*;
use joey_agent_protocol::{GUEST_SHARED_DIR, SHARED_FS_TAG};
use joey_vmm_core::devices::fs::{CachePolicy, FsConfig, FsError, VhostUserFsHandle, VhostUserFsServer};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::lifecycle::InvalidTransition;

/// Name of the shared directory inside the sandbox state dir.
pub const SHARED_DIR_NAME: &str = "shared";
/// Name of the vhost-user socket of the virtio-fs device inside the sandbox state dir.
pub const VHOST_FS_SOCK: &str = "vhost-fs.sock";
/// How long stopping waits for the device thread.
const DEVICE_JOIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest container id (also a guest hostname).

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
    #[error("blocking task failed: {0}")]
    Task(String),
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

/// One host directory or file shared into the guest for a container's bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeShare {
    pub host_path: PathBuf,
    pub read_only: bool,
}

/// Guest path of a container's `index`-th shared volume.
pub fn guest_volume_path(container_id: &str, index: usize) -> String {
    format!("{GUEST_SHARED_DIR}/{container_id}/volumes/{index}")
}

/// Guest path of a shared container rootfs.
pub fn guest_rootfs_path(container_id: &str) -> String {
    format!("{GUEST_SHARED_DIR}/{container_id}/rootfs")
}

/// Lifecycle of the ShareFs actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareFsState {
    Created,
    Ready,
    Stopping,
    Stopped,
}

impl fmt::Display for ShareFsState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShareFsState::Created => "created",
            ShareFsState::Ready => "ready",
            ShareFsState::Stopping => "stopping",
            ShareFsState::Stopped => "stopped",
        })
    }
}

impl ShareFsState {
    pub fn can_transition(self, to: ShareFsState) -> bool {
        use ShareFsState::*;
        matches!(
            (self, to),
            (Created, Ready) | (Created, Stopping) | (Ready, Stopping) | (Stopping, Stopped) | (Created, Stopped)
        )
    }

    pub fn transition(&mut self, to: ShareFsState) -> Result<(), InvalidTransition> {
        if self.can_transition(to) {
            *self = to;
            Ok(())
        } else {
            Err(InvalidTransition {
                what: "sharefs",
                from: self.to_string(),
                to: to.to_string(),
            })
        }
    }

    fn expect(self, want: ShareFsState) -> Result<(), InvalidTransition> {
        if self == want {
            Ok(())
        } else {
            Err(InvalidTransition {
                what: "sharefs (request)",
                from: self.to_string(),
                to: want.to_string(),
            })
        }
    }
}

/// One host resource and how to release it.
#[derive(Debug)]
pub enum Resource {
    /// A directory we created: `rmdir` (fails, harmlessly, if not empty).
    Dir(PathBuf),
    /// An empty file we created as a bind mountpoint: unlink.
    File(PathBuf),
    /// A mount we made: lazy unmount.
    Mount(PathBuf),
    /// The virtio-fs device thread: stop, join with a timeout (removes its socket).
    Device(VhostUserFsHandle),
}

impl Resource {
    /// Releases the resource (blocking, bounded).
    fn release(self) -> Result<(), String> {
        match self {
            Resource::Dir(p) => match std::fs::remove_dir(&p) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("rmdir {}: {e}", p.display())),
            },
            Resource::File(p) => match std::fs::remove_file(&p) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("unlink {}: {e}", p.display())),
            },
            Resource::Mount(p) => match umount2(&p, MntFlags::MNT_DETACH) {
                Ok(()) => Ok(()),
                Err(e) => Err(format!("unmount {}: {e}", p.display())),
            },
            Resource::Device(h) => {
                h.stop();
                h.join_timeout(DEVICE_JOIN_TIMEOUT)
                    .map_err(|e| format!("virtio-fs device thread: {e}"))
            }
        }
    }
}

/// Resources set up in order and released in reverse order.
#[derive(Debug, Default)]
pub struct Resources {
    stack: Vec<Resource>,
}

impl Resources {
    pub fn push(&mut self, r: Resource) {
        self.stack.push(r);
    }

    pub fn is_empty(&self) -> bool {
        self.stack.is_empty()
    }

    /// Releases everything, last first; returns the failures (an unmount failure keeps its
    /// mountpoint's directory from being removed, by `rmdir` failing on it).
    pub fn release_all(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        while let Some(r) = self.stack.pop() {
            if let Err(e) = r.release() {
                tracing::warn!(error = %e, "sharefs cleanup");
                errors.push(e);
            }
        }
        errors
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        if !self.stack.is_empty() {
            // Only reached when the owner was dropped without stopping; do it now.
            let errors = self.release_all();
            if !errors.is_empty() {
                tracing::warn!(?errors, "sharefs resources dropped without a clean stop");
            }
        }
    }
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> ShareFsError {
    move |source| ShareFsError::Io { what, source }
}

fn mount_err(what: String) -> impl FnOnce(nix::Error) -> ShareFsError {
    move |source| ShareFsError::Mount { what, source }
}

fn mkdir(p: &Path, res: &mut Resources) -> Result<(), ShareFsError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(p)
        .map_err(io_err(format!("create {}", p.display())))?;
    res.push(Resource::Dir(p.to_path_buf()));
    Ok(())
}

/// Runs `f` with a fresh stack; on error releases what `f` had set up.
fn staged<T>(f: impl FnOnce(&mut Resources) -> Result<T, ShareFsError>) -> Result<(T, Resources), ShareFsError> {
    let mut res = Resources::default();
    match f(&mut res) {
        Ok(v) => Ok((v, res)),
        Err(e) => {
            res.release_all();
            Err(e)
        }
    }
}

/// Creates the shared dir (private self-bind) and starts the device. Blocking.
fn setup_blocking(state_dir: &Path, vhost_user: bool) -> Result<Resources, ShareFsError> {
    let shared = state_dir.join(SHARED_DIR_NAME);
    let sock = state_dir.join(VHOST_FS_SOCK);
    staged(|res| {
        mkdir(&shared, res)?;
        mount(Some(&shared), &shared, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(mount_err(format!("bind {} onto itself", shared.display())))?;
        res.push(Resource::Mount(shared.clone()));
        mount(None::<&str>, &shared, None::<&str>, MsFlags::MS_PRIVATE, None::<&str>)
            .map_err(mount_err(format!("make {} private", shared.display())))?;
        if !vhost_user {
            return Ok(());
        }
        let server = VhostUserFsServer::bind(
            &sock,
            FsConfig {
                shared_dir: shared.clone(),
                read_only: false,
                cache: CachePolicy::Auto,
            },
        )?;
        crate::hypervisor::counters::register_fs(state_dir, &server.metrics());
        res.push(Resource::Device(server.spawn()?));
        Ok(())
    })
    .map(|((), res)| res)
}

/// Bind-mounts `host_path` at `<shared>/<cid>/rootfs` (read-only if asked). Blocking.
fn share_blocking(
    shared: &Path,
    cid: &str,
    host_path: &Path,
    read_only: bool,
    volumes: &[VolumeShare],
) -> Result<Resources, ShareFsError> {
    let meta = std::fs::metadata(host_path);
    if !meta.map(|m| m.is_dir()).unwrap_or(false) {
        return Err(ShareFsError::RootfsNotFound(host_path.to_path_buf()));
    }
    let dir = shared.join(cid);
    let target = dir.join("rootfs");
    staged(|res| {
        mkdir(&dir, res)?;
        mkdir(&target, res)?;
        mount(
            Some(host_path),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(mount_err(format!("bind {} on {}", host_path.display(), target.display())))?;
        res.push(Resource::Mount(target.clone()));
        if read_only {
            remount_ro(host_path, &target)?;
        }
        if !volumes.is_empty() {
            let vdir = dir.join("volumes");
            mkdir(&vdir, res)?;
            for (i, v) in volumes.iter().enumerate() {
                let meta = std::fs::metadata(&v.host_path)
                    .map_err(io_err(format!("bind mount source {}", v.host_path.display())))?;
                let t = vdir.join(i.to_string());
                if meta.is_dir() {
                    mkdir(&t, res)?;
                } else {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&t)
                        .map_err(io_err(format!("create {}", t.display())))?;
                    res.push(Resource::File(t.clone()));
                }
                mount(
                    Some(&v.host_path),
                    &t,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(mount_err(format!("bind {} on {}", v.host_path.display(), t.display())))?;
                res.push(Resource::Mount(t.clone()));
                if v.read_only {
                    remount_ro(&v.host_path, &t)?;
                }
            }
        }
        Ok(())
    })
    .map(|((), res)| res)
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

/// Reply to [`SetupShareFs`].
#[derive(Debug, Clone)]
pub struct ShareFsReady {
    /// vhost-user socket to give the VMM; `None` when the VMM serves virtio-fs itself.
    pub socket: Option<PathBuf>,
    /// virtio-fs mount tag.
    pub tag: &'static str,
}

/// Creates the shared dir and, for a VMM in another process (QEMU), starts the vhost-user
/// virtio-fs device on `<state_dir>/vhost-fs.sock` (before the VM starts). The built-in VMM
/// serves the shared dir in-process and needs no socket.
#[derive(Message)]
#[rtype(result = "Result<ShareFsReady, ShareFsError>")]
pub struct SetupShareFs {
    pub vhost_user: bool,
}

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
    base: Resources,
    shares: HashMap<String, Resources>,
}

impl ShareFsActor {
    /// `state_dir`: the sandbox state directory (must exist before [`SetupShareFs`]).
    pub fn new(state_dir: PathBuf) -> Self {
        ShareFsActor {
            state: ShareFsState::Created,
            state_dir,
            base: Resources::default(),
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
        // Dropping the stacks releases anything a missing StopShareFs left behind.
        if !self.base.is_empty() || !self.shares.is_empty() {
            tracing::warn!("sharefs actor stopped without StopShareFs; releasing now");
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ShareFsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ShareFsError::Task(e.to_string()))
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
    type Result = Reply<ShareFsReady>;

    fn handle(&mut self, m: SetupShareFs, _: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.state.expect(ShareFsState::Created) {
            return ready(Err(e.into()));
        }
        let dir = self.state_dir.clone();
        let socket = m.vhost_user.then(|| Self::socket_path(&dir));
        AtomicResponse::new(Box::pin(
            blocking(move || setup_blocking(&dir, m.vhost_user))
                .into_actor(self)
                .map(move |r, act, _| {
                    act.base = r??;
                    act.state.transition(ShareFsState::Ready)?;
                    tracing::info!(socket = ?socket, tag = SHARED_FS_TAG, "shared dir ready");
                    Ok(ShareFsReady {
                        socket,
                        tag: SHARED_FS_TAG,
                    })
                }),
        ))
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
        AtomicResponse::new(Box::pin(
            blocking(move || share_blocking(&shared, &m.container_id, &m.host_path, m.read_only, &m.volumes))
                .into_actor(self)
                .map(move |r, act, _| {
                    let res = r??;
                    if act.state != ShareFsState::Ready {
                        // Stopped meanwhile (cannot happen with atomic handlers, but never leak).
                        drop(res);
                        return Err(ShareFsError::State(InvalidTransition {
                            what: "sharefs (request)",
                            from: act.state.to_string(),
                            to: ShareFsState::Ready.to_string(),
                        }));
                    }
                    act.shares.insert(cid.clone(), res);
                    Ok(guest_rootfs_path(&cid))
                }),
        ))
    }
}

impl Handler<Unshare> for ShareFsActor {
    type Result = Reply<()>;

    fn handle(&mut self, m: Unshare, _: &mut Context<Self>) -> Self::Result {
        let Some(mut res) = self.shares.remove(&m.container_id) else {
            return ready(Err(ShareFsError::NotShared(m.container_id)));
        };
        AtomicResponse::new(Box::pin(blocking(move || res.release_all()).into_actor(self).map(
            |r, _, _| {
                let errors = r?;
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(ShareFsError::Cleanup(errors.join("; ")))
                }
            },
        )))
    }
}

impl Handler<StopShareFs> for ShareFsActor {
    type Result = Reply<()>;

    fn handle(&mut self, _: StopShareFs, _: &mut Context<Self>) -> Self::Result {
        match self.state {
            ShareFsState::Stopped => return ready(Ok(())),
            ShareFsState::Stopping => {
                return ready(Err(InvalidTransition {
                    what: "sharefs",
                    from: "stopping".into(),
                    to: "stopping".into(),
                }
                .into()))
            }
            _ => {}
        }
        if let Err(e) = self.state.transition(ShareFsState::Stopping) {
            return ready(Err(e.into()));
        }
        // Shares first (their binds live inside the shared dir), then the base in reverse order.
        let shares: Vec<Resources> = self.shares.drain().map(|(_, r)| r).collect();
        let base = std::mem::take(&mut self.base);
        AtomicResponse::new(Box::pin(
            blocking(move || {
                let mut errors = Vec::new();
                for mut r in shares {
                    errors.extend(r.release_all());
                }
                let mut base = base;
                errors.extend(base.release_all());
                errors
            })
            .into_actor(self)
            .map(|r, act, _| {
                let _ = act.state.transition(ShareFsState::Stopped);
                let errors = r?;
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(ShareFsError::Cleanup(errors.join("; ")))
                }
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle() {
        let mut s = ShareFsState::Created;
        s.transition(ShareFsState::Ready).unwrap();
        assert!(s.transition(ShareFsState::Ready).is_err());
        s.transition(ShareFsState::Stopping).unwrap();
        s.transition(ShareFsState::Stopped).unwrap();
        assert!(s.transition(ShareFsState::Ready).is_err());
        assert!(ShareFsState::Created.can_transition(ShareFsState::Stopped));
        assert!(ShareFsState::Ready.expect(ShareFsState::Created).is_err());
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

    #[test]
    fn resources_release_in_reverse_order() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = a.join("b");
        let mut res = Resources::default();
        mkdir(&a, &mut res).unwrap();
        mkdir(&b, &mut res).unwrap();
        // Reverse order: b before a, so both rmdirs succeed.
        assert!(res.release_all().is_empty());
        assert!(!a.exists());
    }

    #[test]
    fn release_never_deletes_contents() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let mut res = Resources::default();
        mkdir(&a, &mut res).unwrap();
        std::fs::write(a.join("keep"), b"x").unwrap();
        let errors = res.release_all();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(a.join("keep").exists());
    }

    #[test]
    fn share_of_missing_dir_is_typed() {
        let d = tempfile::tempdir().unwrap();
        let e = share_blocking(d.path(), "c1", &d.path().join("nope"), false, &[]).unwrap_err();
        assert!(matches!(e, ShareFsError::RootfsNotFound(_)));
        assert!(!d.path().join("c1").exists());
    }

    /// Needs CAP_SYS_ADMIN (mounts); skipped otherwise.
    #[test]
    fn share_and_release_bind_mounts() {
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let host = d.path().join("img");
        std::fs::create_dir(&host).unwrap();
        std::fs::write(host.join("marker"), b"m").unwrap();
        let mut res = match share_blocking(&shared, "c1", &host, true, &[]) {
            Ok(r) => r,
            Err(ShareFsError::Mount {
                source: nix::errno::Errno::EPERM,
                ..
            }) => return,
            Err(e) => panic!("{e}"),
        };
        let target = shared.join("c1/rootfs");
        assert_eq!(std::fs::read(target.join("marker")).unwrap(), b"m");
        let e = std::fs::write(target.join("new"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        assert!(res.release_all().is_empty());
        assert!(!shared.join("c1").exists());
        assert!(host.join("marker").exists());
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mi.contains(&d.path().display().to_string()));
    }

    /// Needs CAP_SYS_ADMIN (mounts); skipped otherwise.
    #[test]
    fn volumes_are_shared_ro_and_rw_and_released() {
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let host = d.path().join("img");
        std::fs::create_dir(&host).unwrap();
        let vro = d.path().join("vro");
        std::fs::create_dir(&vro).unwrap();
        std::fs::write(vro.join("in"), b"ro").unwrap();
        let vrw = d.path().join("vrw");
        std::fs::create_dir(&vrw).unwrap();
        let vfile = d.path().join("afile");
        std::fs::write(&vfile, b"file").unwrap();
        let vols = vec![
            VolumeShare { host_path: vro.clone(), read_only: true },
            VolumeShare { host_path: vrw.clone(), read_only: false },
            VolumeShare { host_path: vfile.clone(), read_only: true },
        ];
        let mut res = match share_blocking(&shared, "c1", &host, false, &vols) {
            Ok(r) => r,
            Err(ShareFsError::Mount {
                source: nix::errno::Errno::EPERM,
                ..
            }) => return,
            Err(e) => panic!("{e}"),
        };
        let v = shared.join("c1/volumes");
        assert_eq!(std::fs::read(v.join("0/in")).unwrap(), b"ro");
        let e = std::fs::write(v.join("0/new"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        std::fs::write(v.join("1/new"), b"rw").unwrap();
        assert_eq!(std::fs::read(vrw.join("new")).unwrap(), b"rw");
        assert_eq!(std::fs::read(v.join("2")).unwrap(), b"file");
        assert_eq!(guest_volume_path("c1", 2), "/run/joey/shared/c1/volumes/2");
        assert!(res.release_all().is_empty());
        assert!(!shared.join("c1").exists());
        assert_eq!(std::fs::read(&vfile).unwrap(), b"file");
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mi.contains(&d.path().display().to_string()));
    }

    #[test]
    fn missing_volume_source_releases_everything() {
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        let host = d.path().join("img");
        std::fs::create_dir(&host).unwrap();
        let vols = vec![VolumeShare { host_path: d.path().join("missing"), read_only: false }];
        match share_blocking(&shared, "c1", &host, false, &vols) {
            Err(ShareFsError::Io { what, .. }) => assert!(what.contains("missing"), "{what}"),
            Err(ShareFsError::Mount {
                source: nix::errno::Errno::EPERM,
                ..
            }) => return,
            other => panic!("expected an Io error, got {:?}", other.map(|_| ())),
        }
        assert!(!shared.join("c1").exists());
    }
}
