//! virtio-mmio devices of the built-in VMM (vsock, blk, fs) driven by the probe guest
//! (guest/probe/) under the real /dev/kvm: the probe finds the devices on its command line,
//! negotiates features, sets up split queues and talks to them like a driver would.
//!
//! These tests need /dev/kvm; without it they fail with a clear message.

mod common;
use common::{fnv1a32, probe_elf, require_kvm};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use joey_vmm_core::devices::blk::BlockMetrics;
use joey_vmm_core::devices::fs::FsOp;
use joey_vmm_core::devices::virtio::metrics::TransportMetrics;
use joey_vmm_core::vmm::{
    BlockConfig, VirtioFsConfig, VmConfig, VmEvent, Vmm, VmmState, VsockConfig,
};
use joey_vmm_core::vstate::metrics::ExitReason;

const MEM_MIB: u32 = 128;
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
const GUEST_CID: u64 = 3;
const VSOCK_PORT: u32 = 7000;
const VSOCK_MSG: &str = "hello-joey-vsock";
const DISK_SECTORS: u64 = 64;

/// What the probe writes into sector 1 of the `dev`-th disk (`blk_pattern` in probe.c).
fn blk_pattern(dev: u64) -> Vec<u8> {
    (0..512u64).map(|j| (j * 7 + 0x5a + dev) as u8).collect()
}

/// A disk image with distinct content per sector; returns (path, FNV of sector 0).
fn make_disk(dir: &Path, name: &str, seed: u8) -> (PathBuf, u32) {
    let data: Vec<u8> = (0..DISK_SECTORS * 512)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect();
    let p = dir.join(name);
    std::fs::write(&p, &data).unwrap();
    (p, fnv1a32(&data[..512]))
}

/// Host side of the guest's vsock connection: accepts on `<uds>_<port>`, checks the exact
/// bytes, answers them upper-cased, and returns what it received.
fn spawn_echo(uds: &Path, port: u32, expect: &'static str) -> JoinHandle<Vec<u8>> {
    let path = format!("{}_{port}", uds.display());
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("guest never connected to {path}: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
        let mut got = vec![0u8; expect.len()];
        s.read_exact(&mut got).unwrap();
        s.write_all(&got.to_ascii_uppercase()).unwrap();
        // Wait for the guest's shutdown (EOF), bounded by the read timeout.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        got.extend_from_slice(&rest);
        got
    })
}

struct Guest {
    vmm: Vmm,
    log: PathBuf,
}

impl Guest {
    fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Waits for the probe's reset; returns the serial output.
    fn run_to_reset(&mut self) -> String {
        let t = Instant::now();
        match self.vmm.wait_event(EVENT_TIMEOUT) {
            Some(VmEvent::Reset) => {}
            other => panic!(
                "expected Reset within {EVENT_TIMEOUT:?}, got {other:?}; serial:\n{}",
                self.serial()
            ),
        }
        eprintln!("start -> reset: {:?}", t.elapsed());
        let s = self.serial();
        eprintln!("{s}");
        assert!(s.contains("PROBE done"), "{s}");
        s
    }
}

fn start(
    vcpus: u8,
    cmdline: &str,
    log: PathBuf,
    vsock: Option<VsockConfig>,
    fs: Option<VirtioFsConfig>,
    blk: Vec<BlockConfig>,
) -> Guest {
    require_kvm();
    let cfg = VmConfig {
        vcpus,
        memory_mib: MEM_MIB,
        kernel: probe_elf("probe-virtio").to_path_buf(),
        initrd: None,
        cmdline: format!("probe.mem_mib={MEM_MIB} probe.cpus={vcpus} {cmdline}"),
        serial_log: log.clone(),
        serial_log_max_bytes: 0,
        vsock,
        virtio_fs: fs,
        net_devices: Vec::new(),
        block_devices: blk,
    };
    let mut vmm = Vmm::create(cfg).expect("creating the probe VM");
    vmm.start().expect("starting the probe VM");
    Guest { vmm, log }
}

fn has_line(s: &str, l: &str) -> bool {
    s.lines().any(|x| x == l)
}

fn vsock_cfg(dir: &Path) -> VsockConfig {
    VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: dir.join("vsock.sock"),
        limits: Default::default(),
    }
}

fn vsock_and_blk_pass(vcpus: u8) {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (rw, rw_sum) = make_disk(dir.path(), "rw.img", 1);
    let (ro, ro_sum) = make_disk(dir.path(), "ro.img", 2);
    let ro_before = std::fs::read(&ro).unwrap();
    let vsock = vsock_cfg(dir.path());
    let echo = spawn_echo(&vsock.uds_path, VSOCK_PORT, VSOCK_MSG);
    let cmdline = format!(
        "probe.vsock_port={VSOCK_PORT} probe.vsock_msg={VSOCK_MSG} probe.vsock_cid={GUEST_CID} \
         probe.blk0_sum={rw_sum:08x} probe.blk0_sectors={DISK_SECTORS} \
         probe.blk1_sum={ro_sum:08x} probe.blk1_sectors={DISK_SECTORS}"
    );
    let blk = vec![
        BlockConfig {
            path: rw.clone(),
            read_only: false,
            limits: Default::default(),
        },
        BlockConfig {
            path: ro.clone(),
            read_only: true,
            limits: Default::default(),
        },
    ];
    let mut g = start(
        vcpus,
        &cmdline,
        dir.path().join("serial.log"),
        Some(vsock),
        None,
        blk,
    );
    let infos = g.vmm.virtio_devices().to_vec();
    assert_eq!(
        infos
            .iter()
            .map(|i| (i.device_type, i.irq))
            .collect::<Vec<_>>(),
        vec![(19, 5), (2, 6), (2, 7)]
    );
    let s = g.run_to_reset();
    let checks = [
        "boot_params",
        "cmdline",
        "e820",
        "cpus",
        "virtio0",
        "vsock_init",
        "vsock_connect",
        "vsock_echo",
        "virtio1",
        "blk0_init",
        "blk0_read",
        "blk0_id",
        "blk0_write",
        "blk0_bounds",
        "virtio2",
        "blk1_init",
        "blk1_read",
        "blk1_id",
        "blk1_ro",
        "blk1_bounds",
    ];
    for c in checks {
        assert!(
            has_line(&s, &format!("PROBE {c} ok")),
            "check {c} not ok:\n{s}"
        );
    }
    assert!(!s.contains("FAIL"), "{s}");
    assert!(
        has_line(&s, &format!("PROBE done {0}/{0}", checks.len())),
        "{s}"
    );

    // Host side of vsock: exactly the guest's bytes arrived.
    let got = echo.join().expect("echo thread");
    assert_eq!(got, VSOCK_MSG.as_bytes());
    // Sector 1 of the rw disk holds the probe's pattern; the ro disk is untouched.
    let disk = std::fs::read(&rw).unwrap();
    assert_eq!(&disk[512..1024], &blk_pattern(0)[..]);
    assert_eq!(std::fs::read(&ro).unwrap(), ro_before);
    // Every device is live, and QueueNotify went through the ioeventfds, not the vCPU exit path.
    for i in 0..infos.len() {
        assert_eq!(g.vmm.virtio_status(i), Some(0xf), "device {i} status");
        let tm = g.vmm.virtio_metrics(i).unwrap();
        assert!(
            TransportMetrics::get(&tm.queue_notifications) > 0,
            "device {i}"
        );
        assert_eq!(
            TransportMetrics::get(&tm.trapped_notifications),
            0,
            "device {i}"
        );
        assert!(TransportMetrics::get(&tm.interrupts) > 0, "device {i}");
        assert_eq!(TransportMetrics::get(&tm.device_errors), 0, "device {i}");
    }
    let m = g.vmm.block_metrics(1).unwrap();
    assert_eq!(BlockMetrics::get(&m.write_bytes), 0);
    assert!(BlockMetrics::get(&m.io_errors) >= 2, "ro write + bounds");
    // vsock counters: exactly the message's payload each way (the rest are control packets).
    let v = g.vmm.vsock_metrics().unwrap().snapshot();
    let n = VSOCK_MSG.len() as u64;
    assert_eq!(
        (v.tx_bytes, v.rx_bytes, v.malformed_chains),
        (n, n, 0),
        "{v:?}"
    );
    assert!(
        v.tx_packets >= 3 && v.rx_packets >= 2,
        "request, data, shutdown: {v:?}"
    );
    // The probe drove the virtio-mmio registers through MMIO exits.
    let e = g.vmm.vcpu_metrics().snapshot();
    assert!(
        e.get(ExitReason::MmioRead) > 0 && e.get(ExitReason::MmioWrite) > 0,
        "{e:?}"
    );
    assert_eq!(
        e.get(ExitReason::InternalError) + e.get(ExitReason::FailEntry),
        0,
        "{e:?}"
    );
    let t = Instant::now();
    g.vmm.stop().unwrap();
    eprintln!("stop: {:?}", t.elapsed());
    assert_eq!(g.vmm.state(), VmmState::Stopped);
    eprintln!("virtio probe with {vcpus} vCPU(s): {:?}", t0.elapsed());
}

#[test]
fn probe_virtio_vsock_and_blk_pass_1_vcpu() {
    vsock_and_blk_pass(1);
}

#[test]
fn probe_virtio_vsock_and_blk_pass_2_vcpus() {
    vsock_and_blk_pass(2);
}

#[test]
fn probe_detects_missing_virtio_devices() {
    let dir = tempfile::tempdir().unwrap();
    let vsock = vsock_cfg(dir.path());
    let echo = spawn_echo(&vsock.uds_path, VSOCK_PORT, VSOCK_MSG);
    // The command line names a device the VMM did not create, and expects a disk that the
    // test dropped from the config.
    let cmdline = format!(
        "virtio_mmio.device=4K@0xd0008000:12 probe.blk0_sum=12345678 \
         probe.vsock_port={VSOCK_PORT} probe.vsock_msg={VSOCK_MSG}"
    );
    let mut g = start(
        1,
        &cmdline,
        dir.path().join("serial.log"),
        Some(vsock),
        None,
        Vec::new(),
    );
    let s = g.run_to_reset();
    assert!(
        has_line(
            &s,
            "PROBE virtio0 FAIL no device at 0xd0008000 magic=0xffffffff"
        ),
        "{s}"
    );
    assert!(
        has_line(
            &s,
            "PROBE blk0 FAIL expected by the command line but not found"
        ),
        "{s}"
    );
    assert!(has_line(&s, "PROBE virtio1 ok"), "{s}");
    assert!(has_line(&s, "PROBE vsock_echo ok"), "{s}");
    assert!(has_line(&s, "PROBE done 8/10"), "{s}");
    assert_eq!(echo.join().unwrap(), VSOCK_MSG.as_bytes());
    g.vmm.stop().unwrap();
}

#[test]
fn probe_read_only_disk_write_fails_with_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let (ro, sum) = make_disk(dir.path(), "ro.img", 9);
    let before = std::fs::read(&ro).unwrap();
    let blk = vec![BlockConfig {
        path: ro.clone(),
        read_only: true,
        limits: Default::default(),
    }];
    let mut g = start(
        1,
        &format!("probe.blk0_sum={sum:08x}"),
        dir.path().join("serial.log"),
        None,
        None,
        blk,
    );
    let s = g.run_to_reset();
    assert!(has_line(&s, "PROBE blk0_ro ok"), "{s}");
    assert!(has_line(&s, "PROBE blk0_read ok"), "{s}");
    assert!(!s.contains("FAIL"), "{s}");
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        before,
        "read-only disk changed"
    );
    let m = g.vmm.block_metrics(0).unwrap();
    assert_eq!(BlockMetrics::get(&m.write_ops), 0);
    assert_eq!(BlockMetrics::get(&m.invalid_chains), 0);
    g.vmm.stop().unwrap();
}

#[test]
fn probe_virtio_fs_init_and_lookup() {
    use fuse_backend_rs::abi::fuse_abi::{EntryOut, InHeader, InitIn, InitOut, OutHeader};
    use std::mem::size_of;
    const FILE: &str = "hello-joey.txt";
    const SIZE: usize = 1234;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join(FILE), vec![b'j'; SIZE]).unwrap();
    let fs = VirtioFsConfig {
        shared_dir: shared.clone(),
        tag: "joeyfs".into(),
        read_only: true,
    };
    let mut g = start(
        1,
        &format!("probe.fs_tag=joeyfs probe.fs_file={FILE} probe.fs_size={SIZE}"),
        dir.path().join("serial.log"),
        None,
        Some(fs),
        Vec::new(),
    );
    let infos = g.vmm.virtio_devices().to_vec();
    assert_eq!(
        infos
            .iter()
            .map(|i| (i.device_type, i.irq))
            .collect::<Vec<_>>(),
        vec![(26, 5)]
    );
    let s = g.run_to_reset();
    let checks = [
        "boot_params",
        "cmdline",
        "e820",
        "cpus",
        "virtio0",
        "fs_init",
        "fs_lookup",
    ];
    for c in checks {
        assert!(
            has_line(&s, &format!("PROBE {c} ok")),
            "check {c} not ok:\n{s}"
        );
    }
    assert!(!s.contains("FAIL"), "{s}");
    assert!(
        has_line(&s, &format!("PROBE done {0}/{0}", checks.len())),
        "{s}"
    );
    // Exactly the two requests went through the FUSE server: INIT (other) and LOOKUP.
    let m = g.vmm.fs_metrics().expect("fs metrics").snapshot();
    let by: Vec<_> = m.ops_by_name().filter(|(_, n)| *n > 0).collect();
    assert_eq!(by, vec![("lookup", 1), ("other", 1)], "{m:?}");
    assert_eq!(m.ops[FsOp::Lookup as usize], 1);
    assert_eq!(m.failed_requests, 0);
    let request_bytes = 2 * size_of::<InHeader>() + size_of::<InitIn>() + FILE.len() + 1;
    assert_eq!(m.bytes_from_guest, request_bytes as u64, "{m:?}");
    let reply_bytes = 2 * size_of::<OutHeader>() + size_of::<InitOut>() + size_of::<EntryOut>();
    assert_eq!(m.bytes_to_guest, reply_bytes as u64, "{m:?}");
    assert_eq!(g.vmm.virtio_status(0), Some(0xf));
    let tm = g.vmm.virtio_metrics(0).unwrap();
    assert_eq!(TransportMetrics::get(&tm.queue_notifications), 2);
    assert_eq!(TransportMetrics::get(&tm.trapped_notifications), 0);
    assert_eq!(TransportMetrics::get(&tm.device_errors), 0);
    // Read-only export: the shared directory is unchanged.
    let names: Vec<_> = std::fs::read_dir(&shared)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(FILE)]);
    g.vmm.stop().unwrap();
    assert_eq!(g.vmm.state(), VmmState::Stopped);
}

#[test]
fn probe_virtio_fs_lookup_of_a_missing_file_fails_with_enoent() {
    let dir = tempfile::tempdir().unwrap();
    let fs = VirtioFsConfig {
        shared_dir: dir.path().to_path_buf(),
        tag: "joeyfs".into(),
        read_only: false,
    };
    let mut g = start(
        1,
        "probe.fs_tag=joeyfs probe.fs_file=no-such-file probe.fs_size=1",
        dir.path().join("serial.log"),
        None,
        Some(fs),
        Vec::new(),
    );
    let s = g.run_to_reset();
    assert!(has_line(&s, "PROBE fs_init ok"), "{s}");
    // -ENOENT in fuse_out_header.error.
    assert!(
        has_line(&s, "PROBE fs_lookup FAIL FUSE_LOOKUP error 0xfffffffe"),
        "{s}"
    );
    assert!(has_line(&s, "PROBE done 6/7"), "{s}");
    // The error is a FUSE reply, not a failed request.
    let m = g.vmm.fs_metrics().unwrap().snapshot();
    assert_eq!((m.ops[FsOp::Lookup as usize], m.failed_requests), (1, 0));
    g.vmm.stop().unwrap();
}
