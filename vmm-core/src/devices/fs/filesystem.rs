// Copyright 2024 The joey Authors.
// SPDX-License-Identifier: Apache-2.0

//! The filesystem behind the virtio-fs device: fuse-backend-rs's `PassthroughFs` over the shared
//! directory, wrapped in [`SharedDirFs`], which
//! - keeps the guest inside the shared directory (a `..` lookup on the root stays at the root;
//!   `PassthroughFs` itself would open the host parent directory), and
//! - enforces the read-only export: every mutating operation fails with `EROFS`, and files
//!   cannot be opened for writing or truncation.

use std::ffi::CStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::abi::virtio_fs::SetupmappingFlags;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SetattrValid, ZeroCopyReader, ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{self, PassthroughFs};
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::{CachePolicy, FsConfig};

/// Errors setting up the shared directory.
#[derive(Debug, thiserror::Error)]
pub enum SharedDirError {
    /// The shared directory cannot be accessed.
    #[error("shared directory {path}: {source}")]
    Inaccessible {
        /// The configured path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The shared path is not a directory.
    #[error("shared directory {0} is not a directory")]
    NotADirectory(PathBuf),
    /// fuse-backend-rs takes the root as a UTF-8 string.
    #[error("shared directory path {0} is not valid UTF-8")]
    NonUtf8Path(PathBuf),
    /// Creating the passthrough filesystem failed.
    #[error("cannot create the passthrough filesystem: {0}")]
    Passthrough(#[source] io::Error),
}

/// The FUSE server the device hands requests to.
pub type FsServer = Server<Arc<SharedDirFs<PassthroughFs>>>;

/// Attribute/entry timeouts the guest may cache for, per cache policy (virtiofsd's values).
pub fn cache_timeout(cache: CachePolicy) -> Duration {
    match cache {
        CachePolicy::Never => Duration::ZERO,
        CachePolicy::Auto => Duration::from_secs(1),
        CachePolicy::Always => Duration::from_secs(86_400),
    }
}

/// Resolves and checks the shared directory: it must exist, be a directory and have a UTF-8
/// path. Returns the canonical path.
pub fn resolve_shared_dir(dir: &Path) -> Result<PathBuf, SharedDirError> {
    let canonical = dir
        .canonicalize()
        .map_err(|source| SharedDirError::Inaccessible {
            path: dir.to_path_buf(),
            source,
        })?;
    let meta = canonical
        .metadata()
        .map_err(|source| SharedDirError::Inaccessible {
            path: dir.to_path_buf(),
            source,
        })?;
    if !meta.is_dir() {
        return Err(SharedDirError::NotADirectory(dir.to_path_buf()));
    }
    if canonical.to_str().is_none() {
        return Err(SharedDirError::NonUtf8Path(dir.to_path_buf()));
    }
    Ok(canonical)
}

/// The `PassthroughFs` configuration for `cfg`, rooted at the (resolved) `root`.
pub fn passthrough_config(cfg: &FsConfig, root: &str) -> passthrough::Config {
    let timeout = cache_timeout(cfg.cache);
    passthrough::Config {
        root_dir: root.to_string(),
        cache_policy: match cfg.cache {
            CachePolicy::Never => passthrough::CachePolicy::Never,
            CachePolicy::Auto => passthrough::CachePolicy::Auto,
            CachePolicy::Always => passthrough::CachePolicy::Always,
        },
        entry_timeout: timeout,
        attr_timeout: timeout,
        // Guest writes go straight to the host file; the host sees them at once.
        writeback: false,
        // Import the root on FUSE_INIT (that happens on the device thread, whose umask is private,
        // see `vhost_user::isolate_fs_context`).
        do_import: true,
        xattr: false,
        ..Default::default()
    }
}

/// Builds the FUSE server for `cfg`. Nothing is opened in the shared directory yet: the root is
/// imported when the guest sends FUSE_INIT.
pub fn new_server(cfg: &FsConfig) -> Result<FsServer, SharedDirError> {
    let root = resolve_shared_dir(&cfg.shared_dir)?;
    // `resolve_shared_dir` checked the path is UTF-8.
    let root = root.to_string_lossy();
    let fs = PassthroughFs::<()>::new(passthrough_config(cfg, &root))
        .map_err(SharedDirError::Passthrough)?;
    Ok(Server::new(Arc::new(SharedDirFs::new(fs, cfg.read_only))))
}

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

/// True if `open(2)` flags ask for write access or truncation.
pub fn open_flags_write(flags: u32) -> bool {
    let flags = flags as i32;
    (flags & libc::O_ACCMODE) != libc::O_RDONLY || (flags & libc::O_TRUNC) != 0
}

/// A `FileSystem` wrapper confining lookups to the shared directory and enforcing read-only
/// exports. Everything else is delegated unchanged.
pub struct SharedDirFs<F> {
    inner: F,
    read_only: bool,
}

impl<F> SharedDirFs<F> {
    /// Wraps `inner`.
    pub fn new(inner: F, read_only: bool) -> Self {
        SharedDirFs { inner, read_only }
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(erofs())
        } else {
            Ok(())
        }
    }
}

impl<F: FileSystem> FileSystem for SharedDirFs<F> {
    type Inode = F::Inode;
    type Handle = F::Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut opts = self.inner.init(capable)?;
        if self.read_only {
            opts.remove(FsOptions::WRITEBACK_CACHE);
        }
        Ok(opts)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        let parent: u64 = parent.into();
        // The root's parent is outside the shared directory: ".." at the root is the root.
        let name = if parent == ROOT_ID && name.to_bytes() == b".." {
            c"."
        } else {
            name
        };
        self.inner.lookup(ctx, parent.into(), name)
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        attr: stat64,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.check_writable()?;
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        self.inner.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        self.inner.mknod(ctx, inode, name, mode, rdev, umask)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        self.inner.mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        if open_flags_write(flags) {
            self.check_writable()?;
        }
        self.inner.open(ctx, inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        self.check_writable()?;
        self.inner.create(ctx, parent, name, args)
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.check_writable()?;
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    #[allow(clippy::too_many_arguments)]
    fn setupmapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        if SetupmappingFlags::from_bits_truncate(flags).contains(SetupmappingFlags::WRITE) {
            self.check_writable()?;
        }
        self.inner
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        requests: Vec<fuse_backend_rs::abi::virtio_fs::RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        if mask & (libc::W_OK as u32) != 0 {
            self.check_writable()?;
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn cfg(dir: &Path, read_only: bool) -> FsConfig {
        FsConfig {
            shared_dir: dir.to_path_buf(),
            read_only,
            cache: CachePolicy::default(),
        }
    }

    /// A PassthroughFs over `dir`, imported (the root inode exists) without touching the
    /// process umask of the test binary.
    fn fs(dir: &Path, read_only: bool) -> SharedDirFs<PassthroughFs> {
        let root = resolve_shared_dir(dir).unwrap();
        let mut pcfg = passthrough_config(&cfg(dir, read_only), root.to_str().unwrap());
        pcfg.do_import = true;
        let fs = PassthroughFs::<()>::new(pcfg).unwrap();
        // import() sets umask(0): do it on a thread with its own umask, as the device does.
        let fs = std::thread::spawn(move || {
            crate::devices::fs::vhost_user::isolate_fs_context().unwrap();
            fs.import().unwrap();
            fs
        })
        .join()
        .unwrap();
        SharedDirFs::new(fs, read_only)
    }

    #[test]
    fn cache_policy_maps_to_passthrough() {
        let c = FsConfig {
            shared_dir: "/x".into(),
            read_only: true,
            cache: CachePolicy::Never,
        };
        let p = passthrough_config(&c, "/x");
        assert_eq!(p.cache_policy, passthrough::CachePolicy::Never);
        assert_eq!(p.attr_timeout, Duration::ZERO);
        assert!(!p.writeback);
        assert_eq!(p.root_dir, "/x");
        let p = passthrough_config(&FsConfig::new("/y"), "/y");
        assert_eq!(p.cache_policy, passthrough::CachePolicy::Auto);
        assert_eq!(p.entry_timeout, Duration::from_secs(1));
        let p = passthrough_config(
            &FsConfig {
                cache: CachePolicy::Always,
                ..FsConfig::new("/y")
            },
            "/y",
        );
        assert_eq!(p.cache_policy, passthrough::CachePolicy::Always);
    }

    #[test]
    fn shared_dir_must_be_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            resolve_shared_dir(&file),
            Err(SharedDirError::NotADirectory(_))
        ));
        assert!(matches!(
            resolve_shared_dir(&dir.path().join("missing")),
            Err(SharedDirError::Inaccessible { .. })
        ));
        assert_eq!(
            resolve_shared_dir(dir.path()).unwrap(),
            dir.path().canonicalize().unwrap()
        );
        assert!(new_server(&cfg(&file, false)).is_err());
        assert!(new_server(&cfg(dir.path(), false)).is_ok());
    }

    #[test]
    fn write_flags_are_detected() {
        assert!(!open_flags_write(libc::O_RDONLY as u32));
        assert!(!open_flags_write((libc::O_RDONLY | libc::O_CLOEXEC) as u32));
        assert!(open_flags_write(libc::O_WRONLY as u32));
        assert!(open_flags_write(libc::O_RDWR as u32));
        assert!(open_flags_write((libc::O_RDONLY | libc::O_TRUNC) as u32));
    }

    #[test]
    fn dotdot_at_the_root_stays_in_the_shared_dir() {
        let outer = tempfile::tempdir().unwrap();
        let shared = outer.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::create_dir(shared.join("sub")).unwrap();
        let fs = fs(&shared, false);
        let ctx = Context::new();
        let root = fs.getattr(&ctx, ROOT_ID, None).unwrap().0;
        let up = fs.lookup(&ctx, ROOT_ID, c"..").unwrap();
        assert_eq!(up.inode, ROOT_ID);
        assert_eq!(up.attr.st_ino, root.st_ino);
        // ".." below the root still works normally.
        let sub = fs.lookup(&ctx, ROOT_ID, c"sub").unwrap();
        let back = fs.lookup(&ctx, sub.inode, c"..").unwrap();
        assert_eq!(back.attr.st_ino, root.st_ino);
    }

    #[test]
    fn read_only_refuses_every_mutation() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"data").unwrap();
        let fs = fs(dir.path(), true);
        let ctx = Context::new();
        let name = CString::new("new").unwrap();
        let is_erofs = |e: io::Error| e.raw_os_error() == Some(libc::EROFS);

        let f = fs.lookup(&ctx, ROOT_ID, c"f").unwrap();
        assert!(is_erofs(
            fs.open(&ctx, f.inode, libc::O_WRONLY as u32, 0)
                .unwrap_err()
        ));
        assert!(is_erofs(
            fs.open(&ctx, f.inode, libc::O_RDWR as u32, 0).unwrap_err()
        ));
        assert!(is_erofs(
            fs.open(&ctx, f.inode, (libc::O_RDONLY | libc::O_TRUNC) as u32, 0)
                .unwrap_err()
        ));
        let (h, _, _) = fs.open(&ctx, f.inode, libc::O_RDONLY as u32, 0).unwrap();
        fs.release(&ctx, f.inode, 0, h.unwrap(), false, false, None)
            .unwrap();

        let args = CreateIn {
            flags: libc::O_WRONLY as u32,
            mode: 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        assert!(is_erofs(fs.create(&ctx, ROOT_ID, &name, args).unwrap_err()));
        assert!(is_erofs(
            fs.mkdir(&ctx, ROOT_ID, &name, 0o755, 0).unwrap_err()
        ));
        assert!(is_erofs(
            fs.mknod(&ctx, ROOT_ID, &name, libc::S_IFREG | 0o644, 0, 0)
                .unwrap_err()
        ));
        assert!(is_erofs(
            fs.symlink(&ctx, c"f", ROOT_ID, &name).unwrap_err()
        ));
        assert!(is_erofs(
            fs.link(&ctx, f.inode, ROOT_ID, &name).unwrap_err()
        ));
        assert!(is_erofs(fs.unlink(&ctx, ROOT_ID, c"f").unwrap_err()));
        assert!(is_erofs(fs.rmdir(&ctx, ROOT_ID, c"f").unwrap_err()));
        assert!(is_erofs(
            fs.rename(&ctx, ROOT_ID, c"f", ROOT_ID, &name, 0)
                .unwrap_err()
        ));
        // SAFETY: stat64 is plain old data; all-zero is valid.
        let attr: stat64 = unsafe { std::mem::zeroed() };
        assert!(is_erofs(
            fs.setattr(&ctx, f.inode, attr, None, SetattrValid::SIZE)
                .unwrap_err()
        ));
        assert!(is_erofs(
            fs.setxattr(&ctx, f.inode, c"user.x", b"1", 0).unwrap_err()
        ));
        assert!(is_erofs(
            fs.removexattr(&ctx, f.inode, c"user.x").unwrap_err()
        ));
        assert!(is_erofs(
            fs.access(&ctx, f.inode, libc::W_OK as u32).unwrap_err()
        ));
        fs.access(&ctx, f.inode, libc::R_OK as u32).unwrap();

        // The host directory is unchanged.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["f"]);
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"data");
    }

    #[test]
    fn read_write_export_allows_creation() {
        let dir = tempfile::tempdir().unwrap();
        let fs = fs(dir.path(), false);
        let ctx = Context::new();
        fs.mkdir(&ctx, ROOT_ID, c"d", 0o755, 0).unwrap();
        assert!(dir.path().join("d").is_dir());
    }
}
