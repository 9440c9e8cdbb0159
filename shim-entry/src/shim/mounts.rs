//! Host mounts of the shim: containerd's rootfs mounts under `<bundle>/rootfs`, and the
//! cleanup of a dead shim's mounts.

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("unsupported rootfs mount type {0:?} (overlay and bind are supported)")]
    Unsupported(String),
    #[error("mount {what} on {target}: {reason}")]
    Mount { what: String, target: String, reason: String },
    #[error("unmount {target}: {source}")]
    Unmount { target: String, source: nix::Error },
    #[error("read mountinfo: {0}")]
    MountInfo(std::io::Error),
}

/// Checks containerd's mounts before anything is mounted (only overlay and bind for now).
pub fn check(mounts: &[Mount]) -> Result<(), MountError> {
    for m in mounts {
        match m.type_.as_str() {
            "overlay" | "bind" | "rbind" => {}
            // A bind mount may come with an empty type and "bind"/"rbind" in its options.
            "" | "none" if m.options.iter().any(|o| o == "bind" || o == "rbind") => {}
            t => return Err(MountError::Unsupported(t.to_string())),
        }
    }
    Ok(())
}

/// Mounts containerd's rootfs mounts on `target` (async; the syscalls run on a blocking thread).
/// On failure, whatever was mounted is unmounted again.
pub async fn mount_all(mounts: &[Mount], target: &Path) -> Result<(), MountError> {
    check(mounts)?;
    for (done, m) in mounts.iter().enumerate() {
        if let Err(e) = containerd_shim::asynchronous::util::mount_rootfs(m, target).await {
            for _ in 0..done {
                let t = target.to_path_buf();
                let _ = tokio::task::spawn_blocking(move || unmount(&t)).await;
            }
            return Err(MountError::Mount {
                what: format!("{} {}", m.type_, m.source),
                target: target.display().to_string(),
                reason: e.to_string(),
            });
        }
    }
    Ok(())
}

/// Lazily unmounts `target` (blocking). Not mounted is fine.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(MountError::Unmount {
            target: target.display().to_string(),
            source: e,
        }),
    }
}

/// Mount points in `mountinfo` text at or below `prefix`, deepest first.
pub fn mounts_below(mountinfo: &str, prefix: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(prefix))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Unmounts every mount at or below `prefix` (blocking); true when none is left.
pub fn unmount_below(prefix: &Path) -> Result<bool, MountError> {
    for _ in 0..4 {
        let mi = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountInfo)?;
        let left = mounts_below(&mi, prefix);
        if left.is_empty() {
            return Ok(true);
        }
        for p in left {
            if let Err(e) = unmount(&p) {
                tracing::warn!(error = %e, "cleanup unmount failed");
            }
        }
    }
    let mi = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountInfo)?;
    Ok(mounts_below(&mi, prefix).is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: &str, opts: &[&str]) -> Mount {
        Mount {
            type_: t.into(),
            source: "x".into(),
            options: opts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn check_accepts_overlay_and_bind_only() {
        assert!(check(&[m("overlay", &["lowerdir=/a"])]).is_ok());
        assert!(check(&[m("bind", &["rbind"])]).is_ok());
        assert!(check(&[m("none", &["rbind", "ro"])]).is_ok());
        assert!(matches!(check(&[m("ext4", &[])]), Err(MountError::Unsupported(t)) if t == "ext4"));
    }

    #[test]
    fn mounts_below_is_deepest_first_and_unescapes() {
        let mi = "22 1 0:21 / /run/joey/sb rw - tmpfs t rw\n\
                  23 22 0:22 / /run/joey/sb/shared/c\\040d/rootfs rw - overlay o rw\n\
                  24 1 0:23 / /run/joey/sbx rw - tmpfs t rw\n";
        let v = mounts_below(mi, Path::new("/run/joey/sb"));
        assert_eq!(
            v,
            vec![PathBuf::from("/run/joey/sb/shared/c d/rootfs"), PathBuf::from("/run/joey/sb")]
        );
    }
}
