//! `containerd-shim-joey-v2 delete`: cleans up after a shim that died (VM, mounts, sockets,
//! state). Blocking; runs on a blocking thread.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;

use joey_actors::network::{self, NetworkError};

use super::{mounts, spec};

const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("joey config: {0}")]
    Config(String),
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
    #[error("mounts are left under {0}; not removing it")]
    MountsLeft(String),
    #[error("remove {path}: {source}")]
    Remove { path: String, source: std::io::Error },
    #[error(transparent)]
    Network(#[from] NetworkError),
}

/// Pids (not ours) whose command line mentions `needle` (the sandbox state dir: QEMU's sockets).
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// SIGKILLs every process (not ours) whose command line mentions `needle` (a sandbox's or a
/// VM's directory, which QEMU's sockets are in) and waits, up to `wait`, until none is left.
/// True when none is.
pub fn kill_processes_mentioning(needle: &str, wait: Duration) -> bool {
    for pid in pids_mentioning(needle) {
        // SAFETY: kill(2) of a process whose command line names the dead sandbox's directory.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let t0 = Instant::now();
    loop {
        if pids_mentioning(needle).is_empty() {
            return true;
        }
        if t0.elapsed() > wait {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmounts whatever is mounted below a dead sandbox's state dir and removes the dir (gone
/// already is fine); refuses while mounts are left.
pub fn remove_state_dir(state: &Path) -> Result<(), CleanupError> {
    if !state.exists() {
        return Ok(());
    }
    if !mounts::unmount_below(state)? {
        return Err(CleanupError::MountsLeft(state.display().to_string()));
    }
    std::fs::remove_dir_all(state).map_err(|e| CleanupError::Remove {
        path: state.display().to_string(),
        source: e,
    })
}

/// Removes the shim's ttrpc socket named in `<bundle>/address` (`unix:///run/containerd/s/<sha>`)
/// when nobody listens on it any more: a SIGKILLed shim never removes its own socket. A socket
/// that still accepts connections (a live shim of the same pod) is left alone.
fn remove_dead_socket(bundle: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else { return };
    let address = address.trim();
    let path = Path::new(address.strip_prefix("unix://").unwrap_or(address));
    if !path.is_absolute() {
        return;
    }
    let Ok(md) = std::fs::symlink_metadata(path) else { return };
    if !md.file_type().is_socket() {
        return;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Whether the shim named in `<bundle>/address` still accepts connections.
fn shim_alive(bundle: &Path) -> bool {
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else { return false };
    let address = address.trim();
    let path = Path::new(address.strip_prefix("unix://").unwrap_or(address));
    path.is_absolute() && std::os::unix::net::UnixStream::connect(path).is_ok()
}

fn killed_response() -> DeleteResponse {
    DeleteResponse {
        pid: 0,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: MessageField::some(Timestamp::from(SystemTime::now())),
        ..Default::default()
    }
}

/// Kills the sandbox's leftover processes, unmounts its mounts and the bundle rootfs, removes
/// its state dir. Reports the container as killed (137).
///
/// containerd runs this after every shim connection closes, also after a normal Delete of one
/// container of a pod whose shim still serves the others: when the shim still accepts
/// connections nothing is touched (the live shim owns the VM and its resources). The sandbox
/// is found by the pod's grouping id (`io.kubernetes.cri.sandbox-id`, else the container id),
/// which names its state dir.
pub fn delete_dead(id: &str, bundle: &Path) -> Result<DeleteResponse, CleanupError> {
    if shim_alive(bundle) {
        return Ok(killed_response());
    }
    let (config, _) = joey_config::Config::load(None).map_err(|e| CleanupError::Config(e.to_string()))?;
    let spec = spec::load(bundle).ok();
    let group = super::group_of(spec.as_ref(), id);
    let state: PathBuf = config.runtime.state_dir.join(&group);
    kill_processes_mentioning(&format!("{}/", state.display()), KILL_WAIT);
    remove_dead_socket(bundle);
    // Only the sandbox's own container names the pod's netns (app containers of a CRI pod
    // have /proc/<pid>/ns/net paths).
    if let Some(netns) = spec.as_ref().filter(|_| group == id).and_then(|s| s.network_namespace()) {
        remove_network_leftovers(&netns)?;
    }
    let rootfs = bundle.join("rootfs");
    mounts::unmount_below(&rootfs)?;
    remove_state_dir(&state)?;
    // The dead sandbox's cgroup, once its QEMU has finished exiting (docs/security.md).
    if let Err(e) = joey_actors::hypervisor::sandbox_cgroup::remove_leftover(&group, KILL_WAIT) {
        tracing::warn!(error = %e, "removing the sandbox cgroup failed");
    }
    Ok(killed_response())
}

/// Removes the taps and filters a dead shim left in the pod's network namespace (the sandbox
/// container's `network` namespace path; the VM that used them is gone). A netns that no
/// longer exists took them with it; joey's own netns is never plumbed.
fn remove_network_leftovers(netns: &Path) -> Result<(), CleanupError> {
    match network::remove_leftovers_in(netns) {
        Ok(removed) => {
            if !removed.is_empty() {
                tracing::info!(netns = %netns.display(), ?removed, "removed a dead sandbox's network leftovers");
            }
            Ok(())
        }
        Err(NetworkError::NetnsOpen { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(NetworkError::OwnNetns { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_socket_is_removed_live_socket_kept() {
        let d = tempfile::tempdir().unwrap();
        let dead = d.path().join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        std::fs::write(d.path().join("address"), format!("unix://{}", dead.display())).unwrap();
        remove_dead_socket(d.path());
        assert!(!dead.exists());

        let live = d.path().join("live.sock");
        let _l = std::os::unix::net::UnixListener::bind(&live).unwrap();
        std::fs::write(d.path().join("address"), format!("unix://{}", live.display())).unwrap();
        remove_dead_socket(d.path());
        assert!(live.exists());
        assert!(shim_alive(d.path()));
        drop(_l);
        assert!(!shim_alive(d.path()));
    }

    #[test]
    fn pids_mentioning_finds_ourselves_never() {
        let me = std::process::id() as i32;
        assert!(!pids_mentioning("").contains(&me));
    }
}
