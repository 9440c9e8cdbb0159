//! virtio-net over vhost-user end to end: QEMU (TCG, microvm) boots the real guest kernel with
//! `-netdev vhost-user` + `-device virtio-net-device` against our backend, whose tap lives in a
//! private network namespace of the test (10.77.0.1/24). The guest's /init brings eth0 up as
//! 10.77.0.2/24, pings the host side, and moves 1 MiB each way over TCP; it reports on the
//! serial console.
//!
//! Needs qemu-system-x86_64, /bin/busybox (static), cpio, gzip, iproute2's `ip`, root (tap,
//! netns) and the guest kernel (`JOEY_KERNEL`, else build/guest/bzImage); without them the test
//! fails with a clear message (it does not skip silently).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use common::qemu::{
    assert_line, build_initrd, console_lines, require_tools, spawn_qemu, wait_qemu, wait_until,
};
use joey_vmm_core::devices::net::{MacAddr, NetConfig, Tap, VhostUserNetServer};

const QEMU_TIMEOUT: Duration = Duration::from_secs(120);
const MAC: &str = "02:4a:6f:65:79:01";
const MTU: u16 = 1400;
const TAP: &str = "jnet0";
/// Bytes moved each way.
const DATA_LEN: usize = 1 << 20;

const INIT: &str = r#"#!/bin/sh
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
echo "MAC $(cat /sys/class/net/eth0/address)"
echo "MTU $(cat /sys/class/net/eth0/mtu)"
ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
if ping -c 3 -W 5 10.77.0.1 >/tmp/ping 2>&1; then echo "PING ok"; else echo "PING failed"; cat /tmp/ping; fi
echo "TO-GUEST $(timeout 60 nc 10.77.0.1 5001 </dev/null | wc -c)"
echo "FROM-GUEST $(dd if=/dev/zero bs=1024 count=1024 2>/dev/null | timeout 60 nc 10.77.0.1 5000 | wc -c)"
echo "DONE"
reboot -f
"#;

const APPLETS: &[&str] = &[
    "sh", "mount", "cat", "echo", "reboot", "ip", "ping", "nc", "timeout", "wc", "dd",
];

/// The host side: the tap in a fresh network namespace with 10.77.0.1/24, and TCP listeners on
/// ports 5000 (guest → host) and 5001 (host → guest). Made on a thread of its own; the fds keep
/// the namespace alive and nothing is left in the test's namespace.
fn host_side() -> (Tap, TcpListener, TcpListener) {
    std::thread::spawn(|| {
        // SAFETY: unshare(2) only changes the calling (short-lived) thread's namespaces.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
        let tap = Tap::open(TAP).unwrap();
        // Children inherit the calling thread's network namespace.
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", "10.77.0.1/24", "dev", TAP],
            vec!["link", "set", TAP, "up"],
        ] {
            let st = Command::new("ip").args(&args).status().expect("running ip");
            assert!(st.success(), "ip {args:?} failed");
        }
        let rx = TcpListener::bind("10.77.0.1:5000").unwrap();
        let tx = TcpListener::bind("10.77.0.1:5001").unwrap();
        (tap, rx, tx)
    })
    .join()
    .unwrap()
}

/// Serves one connection on each listener: counts what the guest sends on 5000 (closing after
/// DATA_LEN bytes), sends DATA_LEN bytes on 5001. Returns the byte count received.
fn serve_tcp(rx: TcpListener, tx: TcpListener) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let (mut c, _) = tx.accept().unwrap();
        c.write_all(&vec![0x5a; DATA_LEN]).unwrap();
        drop(c);
        let (mut c, _) = rx.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 65536];
        while got < DATA_LEN {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    assert!(
                        buf[..n].iter().all(|&b| b == 0),
                        "corrupted data from guest"
                    );
                    got += n;
                }
            }
        }
        got
    })
}

#[test]
fn guest_negotiates_and_moves_frames_both_ways() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let console = dir.path().join("console.log");
    let initrd = build_initrd(dir.path(), INIT, APPLETS);
    let (tap, rx, tx) = host_side();
    let tcp = serve_tcp(rx, tx);
    let cfg = NetConfig {
        mac: MAC.parse::<MacAddr>().unwrap(),
        mtu: MTU,
        limits: Default::default(),
    };
    let handle = VhostUserNetServer::bind(&sock, cfg, tap)
        .unwrap()
        .spawn()
        .unwrap();
    let devices = [
        "-chardev".to_string(),
        format!("socket,id=net0,path={}", sock.display()),
        "-netdev".to_string(),
        "vhost-user,id=n0,chardev=net0".to_string(),
        "-device".to_string(),
        format!("virtio-net-device,netdev=n0,mac={MAC},host_mtu={MTU}"),
    ];
    let mut qemu = spawn_qemu(dir.path(), &initrd, &console, &devices);
    let took = wait_qemu(&mut qemu, dir.path(), &console, QEMU_TIMEOUT);
    let lines = console_lines(&console);
    eprintln!("guest run took {took:?}; console:\n{}", lines.join("\n"));

    // QEMU is gone: the serving thread ends by itself and removes the socket.
    wait_until(
        "serving thread still running after QEMU exited",
        Duration::from_secs(5),
        || handle.is_finished(),
    );
    let metrics = handle.metrics().clone();
    handle.join_timeout(Duration::from_secs(1)).unwrap();
    assert!(!sock.exists(), "vhost-user socket left behind");

    assert_line(&lines, &format!("MAC {MAC}"));
    assert_line(&lines, &format!("MTU {MTU}"));
    assert_line(&lines, "PING ok");
    assert_line(&lines, &format!("TO-GUEST {DATA_LEN}"));
    assert_line(&lines, "FROM-GUEST 0");
    assert_line(&lines, "DONE");
    assert!(tcp.is_finished(), "host TCP side still waiting");
    assert_eq!(tcp.join().unwrap(), DATA_LEN);
    let s = metrics.snapshot();
    eprintln!("device counters: {s:?}");
    assert!(s.rx_packets > 700 && s.tx_packets > 700, "{s:?}");
    assert!(
        s.rx_bytes > DATA_LEN as u64 && s.tx_bytes > DATA_LEN as u64,
        "{s:?}"
    );
    assert_eq!(
        (s.rx_errors, s.tx_errors, s.rx_dropped, s.tx_dropped),
        (0, 0, 0, 0)
    );
}
