//! virtio-fs end to end: QEMU (TCG, microvm) boots the real guest kernel with a tiny busybox
//! initramfs that mounts our vhost-user-fs device and reports what it sees on the serial console.
//!
//! Needs qemu-system-x86_64, /bin/busybox (static), cpio, gzip and the guest kernel
//! (`JOEY_KERNEL`, else build/guest/bzImage); without them the tests fail with a clear message
//! (they do not skip silently).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::qemu::{
    assert_line, build_initrd, console_lines, kernel, require_tools, spawn_qemu, wait_qemu,
    QemuGuard,
};
use joey_vmm_core::devices::fs::{CachePolicy, FsConfig, VhostUserFsServer};
use sha2::{Digest, Sha256};

const TAG: &str = "joeyfs";
const QEMU_TIMEOUT: Duration = Duration::from_secs(60);
const HELLO: &[u8] = b"hello from the host\n";
const WRITTEN: &[u8] = b"written by the guest\n";

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// 1 MiB of deterministic pseudo-random bytes (xorshift).
fn big_data() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The guest's /init: mounts the share and prints tagged lines to the console.
fn init_script(read_only: bool) -> String {
    let write_part = if read_only {
        r#"
if (echo nope > /mnt/new.txt) 2>/tmp/err; then echo "WRITE ok"; else echo "WRITE failed: $(cat /tmp/err)"; fi
if rm /mnt/hello.txt 2>/tmp/err; then echo "RM ok"; else echo "RM failed: $(cat /tmp/err)"; fi
if mkdir /mnt/newdir 2>/tmp/err; then echo "MKDIR ok"; else echo "MKDIR failed: $(cat /tmp/err)"; fi
"#
    } else {
        r#"
if (echo "written by the guest" > /mnt/written.txt) 2>/tmp/err; then echo "WRITE ok"; else echo "WRITE failed: $(cat /tmp/err)"; fi
echo "READBACK $(cat /mnt/written.txt)"
if mkdir /mnt/newdir 2>/tmp/err; then echo "MKDIR ok"; else echo "MKDIR failed: $(cat /tmp/err)"; fi
sync
"#
    };
    format!(
        r#"#!/bin/sh
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
if mount -t virtiofs {TAG} /mnt; then echo "MOUNT ok"; else echo "MOUNT failed"; fi
echo "HELLO $(cat /mnt/hello.txt)"
echo "SHA $(sha256sum /mnt/hello.txt)"
echo "SHA $(sha256sum /mnt/sub/big.bin)"
echo "LS-BEGIN"
ls -1 /mnt/sub
echo "LS-END"
{write_part}
echo "DONE"
reboot -f
"#
    )
}

/// Busybox applets the guest's /init uses.
const APPLETS: &[&str] = &[
    "sh",
    "mount",
    "cat",
    "ls",
    "echo",
    "reboot",
    "mkdir",
    "sha256sum",
    "rm",
    "sync",
];

/// QEMU with our vhost-user-fs device.
fn spawn_fs_guest(dir: &Path, sock: &Path, initrd: &Path, console: &Path) -> QemuGuard {
    let devices = [
        "-chardev".to_string(),
        format!("socket,id=fs0,path={}", sock.display()),
        "-device".to_string(),
        format!("vhost-user-fs-device,chardev=fs0,tag={TAG}"),
    ];
    spawn_qemu(dir, initrd, console, &devices)
}

/// The umask of the test process (main thread's fs context), from /proc.
fn process_umask() -> String {
    let status = fs::read_to_string(format!("/proc/{}/status", std::process::id())).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("Umask:"))
        .expect("Umask in /proc/PID/status")
        .to_string()
}

struct Run {
    lines: Vec<String>,
    share: PathBuf,
    _dir: tempfile::TempDir,
}

/// Prepares the shared directory, serves it, boots the guest, and checks the server side
/// (thread ends with QEMU, socket removed).
fn run_guest(read_only: bool) -> Run {
    let kernel_path = kernel();
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    fs::create_dir_all(share.join("sub")).unwrap();
    fs::write(share.join("hello.txt"), HELLO).unwrap();
    fs::write(share.join("sub/big.bin"), big_data()).unwrap();
    fs::write(share.join("sub/a.txt"), b"a").unwrap();
    fs::create_dir(share.join("sub/zdir")).unwrap();

    let sock = dir.path().join("fs.sock");
    let console = dir.path().join("console.log");
    let initrd = build_initrd(dir.path(), &init_script(read_only), APPLETS);
    let cfg = FsConfig {
        shared_dir: share.clone(),
        read_only,
        cache: CachePolicy::Auto,
    };
    let umask_before = process_umask();
    let handle = VhostUserFsServer::bind(&sock, cfg)
        .unwrap()
        .spawn()
        .unwrap();
    let mut qemu = spawn_fs_guest(dir.path(), &sock, &initrd, &console);
    let took = wait_qemu(&mut qemu, dir.path(), &console, QEMU_TIMEOUT);
    eprintln!(
        "guest run ({}, kernel {}) took {took:?}",
        if read_only { "ro" } else { "rw" },
        kernel_path.display()
    );

    // QEMU is gone: the serving thread must end by itself.
    assert!(
        handle.wait_finished(Duration::from_secs(5)),
        "serving thread still running 5 s after QEMU exited"
    );
    handle.join_timeout(Duration::from_secs(1)).unwrap();
    assert!(!sock.exists(), "vhost-user socket left behind");
    // The passthrough fs set umask(0) on FUSE_INIT, but only in the device's fs context.
    assert_eq!(process_umask(), umask_before, "process umask changed");

    let lines = console_lines(&console);
    // Keep the console for post-mortems.
    eprintln!("console:\n{}", lines.join("\n"));
    Run {
        lines,
        share,
        _dir: dir,
    }
}

fn assert_common(lines: &[String]) {
    assert_line(lines, "MOUNT ok");
    assert_line(
        lines,
        &format!("HELLO {}", String::from_utf8_lossy(HELLO).trim_end()),
    );
    assert_line(lines, &format!("SHA {}  /mnt/hello.txt", sha256_hex(HELLO)));
    assert_line(
        lines,
        &format!("SHA {}  /mnt/sub/big.bin", sha256_hex(&big_data())),
    );
    let begin = lines
        .iter()
        .position(|l| l == "LS-BEGIN")
        .expect("LS-BEGIN");
    let end = lines.iter().position(|l| l == "LS-END").expect("LS-END");
    assert_eq!(lines[begin + 1..end], ["a.txt", "big.bin", "zdir"]);
    assert_line(lines, "DONE");
}

#[test]
fn virtiofs_guest_reads_and_writes_shared_dir() {
    let run = run_guest(false);
    assert_common(&run.lines);
    assert_line(&run.lines, "WRITE ok");
    assert_line(
        &run.lines,
        &format!("READBACK {}", String::from_utf8_lossy(WRITTEN).trim_end()),
    );
    assert_line(&run.lines, "MKDIR ok");
    assert_eq!(fs::read(run.share.join("written.txt")).unwrap(), WRITTEN);
    assert!(run.share.join("newdir").is_dir());
    assert_eq!(fs::read(run.share.join("hello.txt")).unwrap(), HELLO);
}

#[test]
fn virtiofs_read_only_export_refuses_writes() {
    let run = run_guest(true);
    assert_common(&run.lines);
    let failed = |what: &str| {
        run.lines
            .iter()
            .find(|l| l.starts_with(&format!("{what} ")))
            .cloned()
            .unwrap_or_default()
    };
    for what in ["WRITE", "RM", "MKDIR"] {
        let line = failed(what);
        assert!(
            line.starts_with(&format!("{what} failed:")) && line.contains("Read-only file system"),
            "{what} did not fail with EROFS: {line:?}"
        );
    }
    // The host directory is unchanged.
    let mut names: Vec<_> = fs::read_dir(&run.share)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["hello.txt", "sub"]);
    assert_eq!(fs::read(run.share.join("hello.txt")).unwrap(), HELLO);
    assert_eq!(fs::read(run.share.join("sub/big.bin")).unwrap(), big_data());
}
