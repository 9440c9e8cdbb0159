//! Who owns a `joeyctl run` sandbox, and cleaning up after one whose `joeyctl` died.
//!
//! A `joeyctl run` holds an exclusive `flock` on `<runtime.state_dir>/<id>.joeyctl` from before
//! its sandbox starts until it has stopped it; the file says `joeyctl <pid>` and, with
//! `--netns`, `netns <path>` (best effort: on a full disk the file stays empty, the lock is what
//! counts). It is made as `.<id>.joeyctl.tmp`, locked, then linked, so a `*.joeyctl` file is
//! locked from its first moment. The kernel drops the lock when the process dies, however it
//! dies. Every `joeyctl run` first looks for such files whose lock it can take: their `joeyctl`
//! was killed (SIGKILL, OOM) before its teardown, and left its sandbox behind (QEMU dies with
//! it, `PR_SET_PDEATHSIG`, but not the sandbox's state dir, its virtio-fs mounts, its taps in the
//! pod netns, its cgroup). Those are removed, then the file. Sandboxes of the shim and of
//! `joey-pool` have no such file and are never touched (containerd's `delete` and the pool's own
//! start clean theirs).

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::shim::cleanup;

/// Suffix of an owner file (`<id>.joeyctl`).
pub const SUFFIX: &str = ".joeyctl";
/// How long a dead owner's processes may take to go after SIGKILL, and its cgroup to empty.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Suffix of an owner file being made (`.<id>.joeyctl.tmp`), before it is linked as `<id>.joeyctl`.
const TMP_SUFFIX: &str = ".joeyctl.tmp";
/// An unlocked file being made is removed once older than this (its `joeyctl` died between
/// creating and linking it; younger, it may be between creating and locking it).
const TMP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("owner file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cleanup(#[from] cleanup::CleanupError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OwnerError + '_ {
    move |source| OwnerError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: Ok(true) when taken, Ok(false) when another process holds it.
fn try_lock(f: &File) -> std::io::Result<bool> {
    // SAFETY: flock(2) on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// A live `joeyctl run`'s claim on its sandbox: dropping it (at the end of the run) releases
/// the lock; [`OwnerLock::release`] also removes the file.
#[derive(Debug)]
pub struct OwnerLock {
    path: PathBuf,
    file: Option<File>,
}

impl OwnerLock {
    /// Claims sandbox `id` under `state_root` for this process, before the sandbox exists.
    pub fn claim(
        state_root: &Path,
        id: &str,
        netns: Option<&Path>,
    ) -> Result<OwnerLock, OwnerError> {
        std::fs::create_dir_all(state_root).map_err(io_err(state_root))?;
        let path = state_root.join(format!("{id}{SUFFIX}"));
        let tmp = state_root.join(format!(".{id}{TMP_SUFFIX}"));
        let made = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            if !try_lock(&file)? {
                return Err(std::io::Error::from_raw_os_error(libc::EWOULDBLOCK));
            }
            let mut text = format!("joeyctl {}\n", std::process::id());
            if let Some(ns) = netns {
                text.push_str(&format!("netns {}\n", ns.display()));
            }
            // Best effort: a full state dir still has the lock (and the cleanup without the
            // netns' taps).
            if let Err(e) = file.write_all(text.as_bytes()) {
                tracing::warn!(error = %e, file = %tmp.display(), "owner file left empty");
            }
            // A link, not a rename: an owner file of the same name is never replaced.
            std::fs::hard_link(&tmp, &path)?;
            let _ = std::fs::remove_file(&tmp);
            Ok(file)
        })();
        match made {
            Ok(file) => Ok(OwnerLock {
                path,
                file: Some(file),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(io_err(&path)(e))
            }
        }
    }

    /// The end of a run whose sandbox is stopped: removes the file, then drops the lock.
    pub fn release(mut self) {
        let _ = std::fs::remove_file(&self.path);
        self.file = None;
    }

    /// The end of a run whose teardown failed: the file stays, and the lock goes with this
    /// process, so the next `joeyctl run` cleans up what is left ([`clean_dead`]).
    pub fn keep(mut self) {
        // Closing the file releases the lock; Drop then finds no file and removes nothing.
        self.file = None;
    }
}

impl Drop for OwnerLock {
    fn drop(&mut self) {
        // Without a file (a failed claim) there is nothing of ours to remove.
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes the sandboxes of dead `joeyctl run`s under `state_root` (see the module docs);
/// returns their ids. Blocking. Problems with one sandbox are logged and leave it (and its
/// owner file) for the next try.
pub fn clean_dead(state_root: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(state_root) else {
        return Vec::new();
    };
    let mut cleaned = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(TMP_SUFFIX) {
            remove_if_abandoned(&e.path());
            continue;
        }
        let Some(id) = name
            .strip_suffix(SUFFIX)
            .filter(|id| joey_agent_protocol::is_valid_container_id(id))
        else {
            continue;
        };
        match clean_if_dead(state_root, id, &e.path()) {
            Ok(true) => cleaned.push(id.to_string()),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "cleaning up after a dead joeyctl run failed")
            }
        }
    }
    cleaned
}

/// Removes an owner file that was being made when its `joeyctl` died (unlocked, and older than
/// [`TMP_GRACE`]); no sandbox was started for it yet.
fn remove_if_abandoned(tmp: &Path) {
    let Ok(file) = File::open(tmp) else { return };
    let old = file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age >= TMP_GRACE);
    if old && try_lock(&file).unwrap_or(false) {
        let _ = std::fs::remove_file(tmp);
    }
}

/// Cleans sandbox `id` when its owner file's lock can be taken (its owner is dead).
fn clean_if_dead(state_root: &Path, id: &str, owner: &Path) -> Result<bool, OwnerError> {
    let mut file = match File::open(owner) {
        Ok(f) => f,
        // Its owner finished meanwhile.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(owner)(e)),
    };
    if !try_lock(&file).map_err(io_err(owner))? {
        return Ok(false);
    }
    // Empty when its owner found the disk full: then without the netns' taps.
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io_err(owner))?;
    let state = state_root.join(id);
    // Whatever still runs for it (QEMU is normally gone already: PR_SET_PDEATHSIG).
    cleanup::kill_processes_mentioning(&format!("{}/", state.display()), KILL_WAIT);
    if let Some(ns) = text
        .lines()
        .find_map(|l| l.strip_prefix("netns "))
        .map(Path::new)
    {
        if ns.exists() {
            if let Err(e) = joey_actors::network::remove_leftovers_in(ns) {
                tracing::warn!(sandbox = %id, netns = %ns.display(), error = %e, "removing a dead run's taps failed");
            }
        }
    }
    cleanup::remove_state_dir(&state)?;
    if let Err(e) = joey_actors::hypervisor::sandbox_cgroup::remove_leftover(id, KILL_WAIT) {
        tracing::warn!(sandbox = %id, error = %e, "removing the dead run's cgroup failed");
    }
    std::fs::remove_file(owner).map_err(io_err(owner))?;
    tracing::info!(sandbox = %id, "removed what a dead joeyctl run left behind");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_claim_is_kept_and_a_released_one_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let lock =
            OwnerLock::claim(d.path(), "live1", Some(Path::new("/var/run/netns/x"))).unwrap();
        let text = std::fs::read_to_string(d.path().join("live1.joeyctl")).unwrap();
        assert_eq!(
            text,
            format!("joeyctl {}\nnetns /var/run/netns/x\n", std::process::id())
        );
        // Its sandbox dir, as a sandbox would have it.
        std::fs::create_dir(d.path().join("live1")).unwrap();
        // flock locks belong to the open file: another open of it cannot take the lock.
        assert!(clean_dead(d.path()).is_empty());
        assert!(d.path().join("live1").exists());
        // A second claim of the same id fails.
        assert!(OwnerLock::claim(d.path(), "live1", None).is_err());
        assert!(d.path().join("live1.joeyctl").exists());
        std::fs::remove_dir(d.path().join("live1")).unwrap();
        lock.release();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_dead_owners_sandbox_is_removed_and_others_are_left() {
        let d = tempfile::tempdir().unwrap();
        // A dead owner: an unlocked, written owner file and its sandbox dir with files.
        std::fs::write(d.path().join("dead1.joeyctl"), "joeyctl 1\n").unwrap();
        std::fs::create_dir_all(d.path().join("dead1/shared")).unwrap();
        std::fs::write(d.path().join("dead1/console.log"), "x").unwrap();
        // A sandbox with no owner file (the shim's): never touched.
        std::fs::create_dir(d.path().join("shim1")).unwrap();
        // An empty owner file (its run found the disk full) counts as well.
        std::fs::write(d.path().join("dead2.joeyctl"), "").unwrap();
        // A file being made, just created: left for now.
        std::fs::write(d.path().join(".new1.joeyctl.tmp"), "").unwrap();
        // Names that are no sandbox ids are ignored.
        std::fs::write(d.path().join("..joeyctl"), "joeyctl 1\n").unwrap();
        let mut cleaned = clean_dead(d.path());
        cleaned.sort();
        assert_eq!(cleaned, ["dead1", "dead2"]);
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["..joeyctl", ".new1.joeyctl.tmp", "shim1"]);
        assert!(clean_dead(&d.path().join("missing")).is_empty());
    }
}
