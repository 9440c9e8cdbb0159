// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! Ownership of a filesystem path a unix socket was bound to.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A path we bound a unix socket to. Removing it (explicitly or on drop) only unlinks the file
/// if it still is the very socket we created (same device and inode), so a late cleanup can
/// never delete a socket somebody else bound at the same path in the meantime. Removal is
/// idempotent; clones share the same identity.
#[derive(Clone, Debug)]
pub struct BoundPath {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl BoundPath {
    /// Records the identity of the socket file that was just bound at `path`.
    pub fn new(path: &Path) -> Self {
        let id = path.symlink_metadata().ok().map(|m| (m.dev(), m.ino()));
        BoundPath {
            path: path.to_path_buf(),
            id,
        }
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unlinks the path if it still refers to our socket.
    pub fn remove(&self) {
        let Some(id) = self.id else {
            return;
        };
        if let Ok(m) = self.path.symlink_metadata() {
            if (m.dev(), m.ino()) == id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for BoundPath {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn removes_only_its_own_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let l = UnixListener::bind(&p).unwrap();
        let bound = BoundPath::new(&p);
        let copy = bound.clone();
        // Created while ours still exists, so it cannot reuse our inode.
        let p2 = dir.path().join("s2");
        let _other = UnixListener::bind(&p2).unwrap();
        bound.remove();
        assert!(!p.exists());
        drop(l);

        // Someone else's socket now lives at the same path: stale guards leave it alone.
        std::fs::rename(&p2, &p).unwrap();
        drop(copy);
        drop(bound);
        assert!(p.exists());
    }
}
