//! QEMU microvm (TCG) helpers of the vhost-user integration tests: a busybox initramfs, QEMU
//! started with the project's measured command line plus device arguments, bounded waits and
//! console checks. Missing tools or kernel fail the test with a clear message (no silent skip).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const QEMU: &str = "qemu-system-x86_64";
pub const BUSYBOX: &str = "/bin/busybox";

/// The guest kernel: `JOEY_KERNEL`, else `build/guest/bzImage` of the repository.
pub fn kernel() -> PathBuf {
    let k = std::env::var_os("JOEY_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest/bzImage"));
    assert!(
        k.exists(),
        "guest kernel {} is missing: set JOEY_KERNEL or run `make guest` \
         (guest/kernel.fragment); this test does not skip silently",
        k.display()
    );
    k
}

/// Fails unless QEMU, cpio, gzip and a static busybox are installed.
pub fn require_tools() {
    for tool in [QEMU, "cpio", "gzip"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "{tool} is not installed; this test needs it");
    }
    assert!(Path::new(BUSYBOX).exists(), "{BUSYBOX} (static) is missing");
}

/// Builds a gzip'ed newc initramfs with busybox, its `applets` and `script` as /init.
pub fn build_initrd(dir: &Path, script: &str, applets: &[&str]) -> PathBuf {
    let root = dir.join("initramfs");
    for d in ["bin", "dev", "proc", "sys", "mnt", "tmp"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    for applet in applets {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let init = root.join("init");
    fs::write(&init, script).unwrap();
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("initrd.gz");
    let status = Command::new("sh")
        .current_dir(&root)
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
            out.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "building the initramfs failed");
    out
}

/// Kills QEMU if the test panics before it exited.
pub struct QemuGuard(pub Option<Child>);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts QEMU microvm (TCG, shared memfd memory, 1 vCPU) on the guest kernel and `initrd`,
/// console to the file `console`, QEMU's own output to `dir/qemu.log`, plus `devices` (e.g.
/// `-chardev ... -device ...`). The guest ends with `reboot -f` (QEMU runs with -no-reboot).
pub fn spawn_qemu(dir: &Path, initrd: &Path, console: &Path, devices: &[String]) -> QemuGuard {
    let log = fs::File::create(dir.join("qemu.log")).unwrap();
    let child = Command::new(QEMU)
        .args([
            "-M",
            "microvm,isa-serial=on,rtc=on,acpi=off,memory-backend=mem",
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-global",
            "virtio-mmio.force-legacy=false",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "256M",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
        ])
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel())
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 reboot=t panic=-1 quiet no_timer_check"])
        .args(devices)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("cannot start qemu-system-x86_64");
    QemuGuard(Some(child))
}

/// Waits for QEMU to exit successfully within `timeout` (killed and failed otherwise).
pub fn wait_qemu(guard: &mut QemuGuard, dir: &Path, console: &Path, timeout: Duration) -> Duration {
    let start = Instant::now();
    let child = guard.0.as_mut().unwrap();
    let logs = || {
        format!(
            "qemu: {}\nconsole: {}",
            fs::read_to_string(dir.join("qemu.log")).unwrap_or_default(),
            fs::read_to_string(console).unwrap_or_default()
        )
    };
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            guard.0 = None;
            assert!(status.success(), "qemu failed: {status}\n{}", logs());
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            guard.0 = None;
            panic!("qemu did not exit within {timeout:?}\n{}", logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Console lines, without carriage returns.
pub fn console_lines(console: &Path) -> Vec<String> {
    let raw = fs::read(console).unwrap();
    String::from_utf8_lossy(&raw)
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// Fails unless the console has exactly the line `want`.
pub fn assert_line(lines: &[String], want: &str) {
    assert!(
        lines.iter().any(|l| l == want),
        "console lacks line {want:?}; console:\n{}",
        lines.join("\n")
    );
}

/// Polls `done` until it holds, failing with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} (after {timeout:?})");
        std::thread::sleep(Duration::from_millis(10));
    }
}
