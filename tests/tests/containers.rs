//! Containers: `joeyctl run --rootfs DIR` runs the command in new namespaces inside the microVM,
//! with DIR shared from the host over virtio-fs (our vhost-user device, QEMU's
//! vhost-user-fs-device; on the built-in VMM its in-process virtio-fs device) and set up as the
//! container's root by the agent. Every scenario is a `#[test]` on QEMU; `builtin_suite` runs them
//! all on the built-in VMM where the host's KVM runs Linux guests (the nested test host).

use std::path::{Path, PathBuf};
use std::process::Output;

use joey_tests::*;

const MARKER: &str = "joey container marker 7f3a\nsecond line\n";
const APPLETS: &[&str] = &["sh", "echo", "cat", "ls", "hostname", "mount", "id", "ps"];

/// A busybox rootfs in a temp dir: /bin/busybox (static) plus applet symlinks, /marker, and
/// empty mountpoints.
struct Rootfs {
    dir: tempfile::TempDir,
}

impl Rootfs {
    fn new() -> Rootfs {
        let dir = tempfile::Builder::new()
            .prefix("joey-rootfs-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        make_busybox_rootfs(root, APPLETS).expect("busybox rootfs");
        std::fs::write(root.join("marker"), MARKER).expect("write marker");
        Rootfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn arg(&self) -> String {
        self.path().display().to_string()
    }

    /// Every entry (relative path, and file contents or symlink target) in the rootfs.
    fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        fn walk(base: &Path, p: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
            let mut entries: Vec<_> = std::fs::read_dir(p).expect("read_dir").flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let path = e.path();
                let rel = path.strip_prefix(base).expect("prefix").to_path_buf();
                let ft = e.file_type().expect("file type");
                if ft.is_symlink() {
                    let t = std::fs::read_link(&path).expect("readlink");
                    out.push((rel, t.into_os_string().into_encoded_bytes()));
                } else if ft.is_dir() {
                    out.push((rel, Vec::new()));
                    walk(base, &path, out);
                } else {
                    out.push((rel, std::fs::read(&path).expect("read")));
                }
            }
        }
        let mut v = Vec::new();
        walk(self.path(), self.path(), &mut v);
        v
    }
}

/// Fails if any mount of the host mentions `needle` (the rootfs dir or the sandbox state).
fn assert_no_mounts(needle: &Path) {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let n = needle.display().to_string();
    let leaked: Vec<&str> = mi.lines().filter(|l| l.contains(&n)).collect();
    assert!(leaked.is_empty(), "leaked mounts: {leaked:?}");
}

/// `joeyctl run --rootfs <rootfs> [extra] -- argv`, then checks that nothing is left behind.
fn run_in(env: &Env, rootfs: &Rootfs, extra: &[&str], argv: &[&str]) -> Output {
    let r = rootfs.arg();
    let mut args = vec!["--rootfs", r.as_str()];
    args.extend_from_slice(extra);
    let o = env.run_with(&args, argv, None);
    assert_no_mounts(rootfs.path());
    assert_no_mounts(env.dir.path());
    o
}

scenarios!(
    container_sees_the_image_rootfs_not_the_initramfs,
    container_command_is_pid_1_of_its_namespace,
    hostname_is_the_sandbox_id_or_the_requested_one,
    rw_rootfs_writes_reach_the_host_dir,
    read_only_rootfs_refuses_writes_and_the_host_dir_is_unchanged,
    command_missing_from_the_rootfs_is_127,
    missing_rootfs_dir_is_exit_2,
);

/// The scenarios on the built-in VMM (see [`run_builtin_suite`]).
#[test]
fn builtin_suite() {
    run_builtin_suite(SCENARIOS);
}

mod scenario {
    use super::*;

    pub fn container_sees_the_image_rootfs_not_the_initramfs(b: Backend) {
        let env = Env::with_backend(b);
        let rootfs = Rootfs::new();
        let o = run_in(&env, &rootfs, &[], &["cat", "/marker"]);
        assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr_of(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout), MARKER);
        // The initramfs has /init and /etc/passwd; the image has neither.
        let o = run_in(
            &env,
            &rootfs,
            &[],
            &["sh", "-c", "ls /; test -e /init || echo no-init"],
        );
        assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr_of(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(out, "bin\ndev\nmarker\nproc\nsys\ntmp\nno-init\n");
    }

    pub fn container_command_is_pid_1_of_its_namespace(b: Backend) {
        let env = Env::with_backend(b);
        let rootfs = Rootfs::new();
        let o = run_in(&env, &rootfs, &[], &["sh", "-c", "echo $$; ps"]);
        assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr_of(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(out.lines().next(), Some("1"), "{out}");
        // Only the container's own processes are visible: not the agent (/init).
        assert!(!out.contains("init"), "{out}");
    }

    pub fn hostname_is_the_sandbox_id_or_the_requested_one(b: Backend) {
        let env = Env::with_backend(b);
        let rootfs = Rootfs::new();
        let o = run_in(&env, &rootfs, &[], &["hostname"]);
        assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr_of(&o));
        let h = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert_eq!(h.len(), 16, "{h:?}");
        assert!(h.bytes().all(|b| b.is_ascii_hexdigit()), "{h:?}");
        let o = run_in(&env, &rootfs, &["--hostname", "web-1"], &["hostname"]);
        assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr_of(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "web-1\n");
    }

    pub fn rw_rootfs_writes_reach_the_host_dir(b: Backend) {
        let env = Env::with_backend(b);
        let rootfs = Rootfs::new();
        let o = run_in(
            &env,
            &rootfs,
            &[],
            &[
                "sh",
                "-c",
                "echo written-in-guest > /out.txt && cat /out.txt",
            ],
        );
        assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr_of(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "written-in-guest\n");
        assert_eq!(
            std::fs::read_to_string(rootfs.path().join("out.txt")).expect("file on the host"),
            "written-in-guest\n"
        );
    }

    pub fn read_only_rootfs_refuses_writes_and_the_host_dir_is_unchanged(b: Backend) {
        let env = Env::with_backend(b);
        let rootfs = Rootfs::new();
        let before = rootfs.snapshot();
        let o = run_in(
            &env,
            &rootfs,
            &["--read-only"],
            &["sh", "-c", "echo x > /ro.txt"],
        );
        assert_ne!(o.status.code(), Some(0));
        let err = stderr_of(&o);
        assert!(err.contains("Read-only file system"), "{err}");
        assert_eq!(rootfs.snapshot(), before);
        // Reading still works.
        let o = run_in(&env, &rootfs, &["--read-only"], &["cat", "/marker"]);
        assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr_of(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout), MARKER);
        assert_eq!(rootfs.snapshot(), before);
    }

    pub fn command_missing_from_the_rootfs_is_127(b: Backend) {
        let env = Env::with_backend(b);
        let rootfs = Rootfs::new();
        // `sha256sum` exists in the guest's initramfs but not in this image.
        for cmd in ["no-such-command", "sha256sum", "/bin/sha256sum"] {
            let o = run_in(&env, &rootfs, &[], &[cmd]);
            assert_eq!(
                o.status.code(),
                Some(127),
                "{cmd}: stderr: {}",
                stderr_of(&o)
            );
            let err = stderr_of(&o);
            assert!(err.starts_with("joeyctl: error: "), "{err}");
            assert!(err.contains(cmd) && err.contains("not found"), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(o.stdout.is_empty());
        }
    }

    pub fn missing_rootfs_dir_is_exit_2(b: Backend) {
        let env = Env::with_backend(b);
        let missing = env.dir.path().join("no-such-rootfs");
        let m = missing.display().to_string();
        let o = env.run_with(&["--rootfs", &m], &["true"], None);
        assert_eq!(o.status.code(), Some(2), "stderr: {}", stderr_of(&o));
        assert!(stderr_of(&o).contains("no-such-rootfs"));
    }
}
