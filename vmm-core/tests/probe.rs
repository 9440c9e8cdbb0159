//! Runs the probe guest (guest/probe/) under the real /dev/kvm with the
//! built-in VMM and checks what it reports from inside the guest.
//!
//! These tests need /dev/kvm; without it they fail with a clear message.

mod common;
use common::{fnv1a32, probe_elf, require_kvm};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use joey_vmm_core::vmm::{VmConfig, VmEvent, Vmm, VmmState};
use joey_vmm_core::vstate::metrics::ExitReason;

/// Guest physical address of the probe's spin counter (guest/probe/probe.c).
const PROBE_COUNTER_ADDR: u64 = 0x5000;
const MEM_MIB: u32 = 128;
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);




struct Guest {
    vmm: Vmm,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Guest {
    fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn wait_serial(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.serial();
            if s.contains(needle) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on serial within {timeout:?}; got:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for `want`; other events fail the test.
    fn expect_event(&self, want: &VmEvent) {
        match self.vmm.wait_event(EVENT_TIMEOUT) {
            Some(e) if &e == want => {}
            other => panic!(
                "expected {want:?} within {EVENT_TIMEOUT:?}, got {other:?}; serial:\n{}",
                self.serial()
            ),
        }
    }
}

/// Creates and starts a probe VM. `initrd` bytes are written to a temp file.
fn start_probe(vcpus: u8, cmdline: &str, initrd: Option<&[u8]>) -> Guest {
    start_probe_mem(vcpus, MEM_MIB, cmdline, initrd)
}

fn start_probe_mem(vcpus: u8, memory_mib: u32, cmdline: &str, initrd: Option<&[u8]>) -> Guest {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let initrd_path = initrd.map(|b| {
        let p = dir.path().join("initrd.img");
        std::fs::write(&p, b).unwrap();
        p
    });
    let cfg = VmConfig {
        vcpus,
        memory_mib,
        kernel: probe_elf("probe").to_path_buf(),
        initrd: initrd_path,
        cmdline: cmdline.to_string(),
        serial_log: log.clone(),
        vsock: None,
        virtio_fs: None,
        net_devices: Vec::new(),
        block_devices: Vec::new(),
    };
    let t = Instant::now();
    let mut vmm = Vmm::create(cfg).expect("creating the probe VM");
    eprintln!("create: {:?}", t.elapsed());
    vmm.start().expect("starting the probe VM");
    Guest {
        vmm,
        log,
        _dir: dir,
    }
}

fn initrd_bytes() -> Vec<u8> {
    // Small: this PVM host runs the probe slowly (~5 us per checksummed byte).
    (0..24 * 1024 + 123)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn good_cmdline(vcpus: u8, initrd: &[u8]) -> String {
    format!(
        "console=ttyS0 probe.mem_mib={MEM_MIB} probe.cpus={vcpus} probe.initrd_sum={:08x}",
        fnv1a32(initrd)
    )
}

const ALL_CHECKS: [&str; 5] = ["boot_params", "cmdline", "e820", "initrd", "cpus"];

fn probe_passes(vcpus: u8) {
    let t0 = Instant::now();
    let initrd = initrd_bytes();
    let mut g = start_probe(vcpus, &good_cmdline(vcpus, &initrd), Some(&initrd));
    let t = Instant::now();
    g.expect_event(&VmEvent::Reset);
    eprintln!("start -> reset: {:?}", t.elapsed());
    let s = g.wait_serial("PROBE done", Duration::from_secs(1));
    eprintln!("{s}");
    for c in ALL_CHECKS {
        assert!(
            s.lines().any(|l| l == format!("PROBE {c} ok")),
            "check {c} not ok:\n{s}"
        );
    }
    assert!(!s.contains("FAIL"), "{s}");
    assert!(s.lines().any(|l| l == "PROBE done 5/5"), "{s}");
    g.vmm.stop().unwrap();
    assert_eq!(g.vmm.state(), VmmState::Stopped);
    check_exit_counters(&g);
    eprintln!("probe with {vcpus} vCPU(s): {:?}", t0.elapsed());
}

/// The vCPU exit counters agree with what the probe did: every serial byte is one `outb` to
/// COM1 after at least one `inb` of its line status register, the 7 `outb`s of the UART setup
/// and the `outb` to the i8042 that reset the VM.
fn check_exit_counters(g: &Guest) {
    let e = g.vmm.vcpu_metrics().snapshot();
    let printed = std::fs::read(&g.log).unwrap().len() as u64 + g.vmm.serial_dropped();
    eprintln!("vCPU exits: {e:?}, serial bytes: {printed}");
    assert!(printed > 0);
    assert!(e.get(ExitReason::IoOut) >= printed + 8, "{e:?} vs {printed} serial bytes");
    assert!(e.get(ExitReason::IoIn) >= printed, "{e:?} vs {printed} serial bytes");
    // The probe ends with the reset, never in a triple fault or a KVM failure.
    assert_eq!(e.get(ExitReason::Shutdown), 0, "{e:?}");
    assert_eq!(e.get(ExitReason::FailEntry), 0, "{e:?}");
    assert_eq!(e.get(ExitReason::InternalError), 0, "{e:?}");
    assert_eq!(e.total(), e.by_name().map(|(_, n)| n).sum::<u64>());
}

#[test]
fn probe_all_checks_pass_1_vcpu() {
    probe_passes(1);
}

#[test]
fn probe_all_checks_pass_2_vcpus() {
    probe_passes(2);
}

#[test]
fn probe_memory_above_the_mmio_gap() {
    // 4.5 GiB: RAM split around the 32-bit MMIO gap, initrd just below 3 GiB.
    let mib = 4608;
    let initrd = initrd_bytes();
    let cmdline = format!(
        "probe.mem_mib={mib} probe.cpus=1 probe.initrd_sum={:08x}",
        fnv1a32(&initrd)
    );
    let mut g = start_probe_mem(1, mib, &cmdline, Some(&initrd));
    g.expect_event(&VmEvent::Reset);
    let s = g.wait_serial("PROBE done", Duration::from_secs(1));
    assert!(s.lines().any(|l| l == "PROBE done 5/5"), "{s}");
    let (addr, _) = g.vmm.boot_setup().initrd.unwrap();
    assert!(addr < 3 << 30 && addr > (3 << 30) - (1 << 20), "{addr:#x}");
    g.vmm.stop().unwrap();
}

#[test]
fn probe_detects_initrd_checksum_mismatch() {
    let initrd = initrd_bytes();
    let cmdline = format!(
        "probe.mem_mib={MEM_MIB} probe.cpus=1 probe.initrd_sum={:08x}",
        fnv1a32(&initrd) ^ 1
    );
    let mut g = start_probe(1, &cmdline, Some(&initrd));
    g.expect_event(&VmEvent::Reset);
    let s = g.wait_serial("PROBE done", Duration::from_secs(1));
    assert!(
        s.lines().any(|l| l.starts_with("PROBE initrd FAIL sum=")),
        "{s}"
    );
    assert!(s.lines().any(|l| l == "PROBE done 4/5"), "{s}");
    g.vmm.stop().unwrap();
}

#[test]
fn probe_detects_cpu_count_mismatch() {
    let initrd = initrd_bytes();
    let cmdline = good_cmdline(2, &initrd); // says 2, VM has 1
    let mut g = start_probe(1, &cmdline, Some(&initrd));
    g.expect_event(&VmEvent::Reset);
    let s = g.wait_serial("PROBE done", Duration::from_secs(1));
    assert!(
        s.lines()
            .any(|l| l == "PROBE cpus FAIL mptable has 1 expected 2"),
        "{s}"
    );
    assert!(s.lines().any(|l| l == "PROBE done 4/5"), "{s}");
    g.vmm.stop().unwrap();
}

#[test]
fn probe_without_initrd_and_missing_params_fails_cleanly() {
    let mut g = start_probe(1, "probe.mem_mib=64", None);
    g.expect_event(&VmEvent::Reset);
    let s = g.wait_serial("PROBE done", Duration::from_secs(1));
    assert!(
        s.lines().any(|l| l.starts_with("PROBE e820 FAIL usable=")),
        "{s}"
    );
    assert!(
        s.lines()
            .any(|l| l == "PROBE cpus FAIL no probe.cpus on the command line"),
        "{s}"
    );
    assert!(s.lines().any(|l| l == "PROBE done 2/4"), "{s}");
    g.vmm.stop().unwrap();
}

fn counter(g: &Guest) -> u64 {
    g.vmm.read_guest_u64(PROBE_COUNTER_ADDR).unwrap()
}

#[test]
fn pause_resume_stop_spinning_2_vcpu_guest() {
    let initrd = initrd_bytes();
    let cmdline = format!("{} probe.spin=1", good_cmdline(2, &initrd));
    let mut g = start_probe(2, &cmdline, Some(&initrd));
    g.wait_serial("PROBE spin counter=0x5000", EVENT_TIMEOUT);
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while counter(&g) == 0 {
        assert!(Instant::now() < deadline, "spin counter never moved");
        std::thread::sleep(Duration::from_millis(5));
    }

    let t = Instant::now();
    g.vmm.pause().unwrap();
    eprintln!("pause took {:?}", t.elapsed());
    assert_eq!(g.vmm.state(), VmmState::Paused);
    let c1 = counter(&g);
    std::thread::sleep(Duration::from_millis(300));
    let c2 = counter(&g);
    assert_eq!(c1, c2, "paused guest made progress");
    assert!(g.vmm.pause().is_err(), "double pause must be rejected");

    let t = Instant::now();
    g.vmm.resume().unwrap();
    eprintln!("resume took {:?}", t.elapsed());
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while counter(&g) == c2 {
        assert!(Instant::now() < deadline, "resumed guest made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }

    // Second pause/resume cycle.
    g.vmm.pause().unwrap();
    let c4 = counter(&g);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(c4, counter(&g));
    g.vmm.resume().unwrap();

    let t = Instant::now();
    g.vmm.stop().unwrap();
    eprintln!("stop took {:?}", t.elapsed());
    assert_eq!(g.vmm.state(), VmmState::Stopped);
    let c5 = counter(&g);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(c5, counter(&g), "stopped guest made progress");
    assert!(g.vmm.resume().is_err());
    assert!(
        g.vmm.wait_event(Duration::from_millis(10)).is_none(),
        "spinning guest raised an event"
    );
}

#[test]
fn triple_fault_is_reported_and_never_hangs() {
    let t0 = Instant::now();
    let initrd = initrd_bytes();
    let cmdline = format!("{} probe.triple_fault=1", good_cmdline(1, &initrd));
    let mut g = start_probe(1, &cmdline, Some(&initrd));
    g.expect_event(&VmEvent::TripleFault { vcpu: 0 });
    assert!(g.serial().contains("PROBE triple_fault now"));
    g.vmm.stop().unwrap();
    let e = g.vmm.vcpu_metrics().snapshot();
    assert_eq!(e.get(ExitReason::Shutdown), 1, "{e:?}");
    assert!(e.get(ExitReason::IoOut) > 0, "{e:?}");
    assert!(t0.elapsed() < EVENT_TIMEOUT);
}

#[test]
fn stop_before_start_and_drop_without_stop() {
    let initrd = initrd_bytes();
    let cmdline = format!("{} probe.spin=1", good_cmdline(2, &initrd));
    // Never started: stop is fine.
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let cfg = VmConfig {
        vcpus: 2,
        memory_mib: MEM_MIB,
        kernel: probe_elf("probe").to_path_buf(),
        initrd: None,
        cmdline: cmdline.clone(),
        serial_log: dir.path().join("s.log"),
        vsock: None,
        virtio_fs: None,
        net_devices: Vec::new(),
        block_devices: Vec::new(),
    };
    let mut vmm = Vmm::create(cfg).unwrap();
    vmm.stop().unwrap();
    // Started and dropped while spinning: Drop stops the vCPU threads.
    let g = start_probe(2, &cmdline, Some(&initrd));
    g.wait_serial("PROBE spin", EVENT_TIMEOUT);
    let t = Instant::now();
    drop(g);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn malformed_kernel_is_a_typed_error() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("bad.elf");
    std::fs::write(
        &k,
        b"this is not an ELF file, just some bytes that are long enough to parse as a header",
    )
    .unwrap();
    let cfg = VmConfig {
        vcpus: 1,
        memory_mib: 32,
        kernel: k,
        initrd: None,
        cmdline: String::new(),
        serial_log: dir.path().join("s.log"),
        vsock: None,
        virtio_fs: None,
        net_devices: Vec::new(),
        block_devices: Vec::new(),
    };
    let err = Vmm::create(cfg).unwrap_err();
    assert!(err.to_string().contains("bad ELF magic"), "{err}");
}
