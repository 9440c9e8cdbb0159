//! The built-in VMM's in-process virtio-net device driven by the probe guest (guest/probe/)
//! under the real /dev/kvm: the probe negotiates, checks MAC/link/MTU from the config space,
//! sends a frame before it has posted any rx buffer, then posts buffers and must receive the
//! host's answer, which waited in the tap meanwhile. The host side is an AF_PACKET socket on
//! the tap, in a network namespace of the test's own.
//!
//! These tests need /dev/kvm; without it they fail with a clear message.

mod common;
use common::{probe_elf, require_kvm};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use joey_vmm_core::devices::net::{MacAddr, NetAttachment, NetConfig, Tap};
use joey_vmm_core::vmm::{VmConfig, VmEvent, Vmm};

const MEM_MIB: u32 = 128;
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
const TAP: &str = "jprobe0";
const ETHERTYPE: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];

/// The tap (up, IPv6 off so the host sends nothing of its own) in a fresh network namespace,
/// and an AF_PACKET socket bound to it there. Made on a thread of its own.
fn host_side() -> (Tap, OwnedFd) {
    std::thread::spawn(|| {
        // SAFETY: unshare(2) only changes the calling (short-lived) thread's namespaces.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
        // /proc/sys/net is resolved in the opening thread's namespace.
        for p in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{p}/disable_ipv6"), "1");
        }
        let tap = Tap::open(TAP).unwrap();
        // Children inherit the calling thread's network namespace.
        let st = Command::new("ip").args(["link", "set", TAP, "up"]).status().expect("running ip");
        assert!(st.success(), "ip link set {TAP} up failed");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the result is checked and owned right away.
        let s = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
        assert!(s >= 0, "socket(AF_PACKET): {}", std::io::Error::last_os_error());
        // SAFETY: `s` is a fresh fd nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(s) };
        let name = std::ffi::CString::new(TAP).unwrap();
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "if_nametoindex({TAP})");
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: bind(2) with a live sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
        (tap, sock)
    })
    .join()
    .unwrap()
}

/// Answers the first frame of ETHERTYPE with its payload upper-cased, to the sender; returns
/// the payload received (empty if none came within EVENT_TIMEOUT).
fn answer(sock: OwnedFd) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one live pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            // SAFETY: recv(2) into a live buffer of the length passed.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 14 || u16::from_be_bytes([buf[12], buf[13]]) != ETHERTYPE {
                continue;
            }
            let n = n as usize;
            let payload: Vec<u8> = buf[14..n].iter().copied().take_while(|&b| b != 0).collect();
            let mut reply = Vec::with_capacity(60);
            reply.extend_from_slice(&buf[6..12]);
            reply.extend_from_slice(&HOST_MAC);
            reply.extend_from_slice(&ETHERTYPE.to_be_bytes());
            reply.extend(payload.to_ascii_uppercase());
            reply.resize(60, 0);
            // SAFETY: send(2) from a live buffer of the length passed.
            let w = unsafe { libc::send(sock.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
            assert_eq!(w, reply.len() as isize, "send: {}", std::io::Error::last_os_error());
            return payload;
        }
        Vec::new()
    })
}

/// Starts the probe guest (1 vCPU, serial to `log`) with `params` and these net devices.
fn start_probe(log: &std::path::Path, params: &str, net_devices: Vec<NetAttachment>) -> Vmm {
    let cfg = VmConfig {
        vcpus: 1,
        memory_mib: MEM_MIB,
        kernel: probe_elf("probe-net").to_path_buf(),
        initrd: None,
        cmdline: format!("probe.mem_mib={MEM_MIB} probe.cpus=1 {params}"),
        serial_log: log.to_path_buf(),
        serial_log_max_bytes: 0,
        vsock: None,
        virtio_fs: None,
        net_devices,
        block_devices: Vec::new(),
    };
    let mut vmm = Vmm::create(cfg).expect("creating the probe VM");
    vmm.start().expect("starting the probe VM");
    vmm
}

#[test]
fn probe_virtio_net_sends_and_receives_a_frame_that_waited_for_rx_buffers() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let (tap, sock) = host_side();
    let host = answer(sock);
    let net = NetAttachment {
        config: NetConfig {
            mac: MacAddr(GUEST_MAC),
            mtu: 1400,
            limits: Default::default(),
        },
        tap: Arc::new(tap),
    };
    let mut vmm = start_probe(&log, "probe.net0_mac=0242ac110002 probe.net0_mtu=1400", vec![net]);
    let ev = vmm.wait_event(EVENT_TIMEOUT);
    let serial = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    eprintln!("{serial}");
    assert!(matches!(ev, Some(VmEvent::Reset)), "expected Reset, got {ev:?}");
    let metrics = vmm.all_net_metrics()[0].clone();
    vmm.stop().unwrap();
    assert_eq!(host.join().unwrap(), b"joey-probe-net0");
    for l in ["PROBE virtio0 ok", "PROBE net0_init ok", "PROBE net0_tx ok", "PROBE net0_rx ok"] {
        assert!(serial.lines().any(|x| x == l), "missing {l:?} in:\n{serial}");
    }
    let done = serial.lines().find(|l| l.starts_with("PROBE done ")).expect("PROBE done");
    let (passed, total) = done["PROBE done ".len()..].split_once('/').unwrap();
    assert_eq!(passed, total, "{serial}");
    let s = metrics.snapshot();
    assert_eq!((s.tx_packets, s.tx_bytes), (1, 60), "{s:?}");
    assert!(s.rx_packets >= 1, "{s:?}");
    assert_eq!((s.rx_errors, s.tx_errors, s.rx_dropped, s.tx_dropped), (0, 0, 0, 0), "{s:?}");
}

/// The command line promises a device the VM does not have: the probe says so.
#[test]
fn probe_reports_a_missing_net_device() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let mut vmm = start_probe(&log, "probe.net0_mac=0242ac110002", Vec::new());
    let ev = vmm.wait_event(EVENT_TIMEOUT);
    vmm.stop().unwrap();
    let serial = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    assert!(matches!(ev, Some(VmEvent::Reset)), "expected Reset, got {ev:?}\n{serial}");
    assert!(
        serial.lines().any(|l| l == "PROBE net0 FAIL expected by the command line but not found"),
        "{serial}"
    );
}
