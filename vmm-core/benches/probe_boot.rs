//! Built-in VMM benchmark (prints numbers; not a pass/fail test).
//!
//! Median over N runs (default 20, env `N`) with the probe guest under the host's real /dev/kvm:
//! - VMM create -> first guest output (the probe's first serial byte: the first observable
//!   guest instruction's effect),
//! - VMM create -> probe done (i8042 reset event),
//! - RSS of this process grown by the VMM beyond its start, after the probe finished (includes
//!   the few guest pages the probe touches), next to the RSS of a QEMU microvm started in the
//!   same run with the same guest memory size (paused with -S, so it touches no guest memory).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use joey_vmm_core::vmm::{VmConfig, VmEvent, Vmm};

const MEM_MIB: u32 = 128;

fn rss_kib(pid: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn build_probe(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = dir.join("probe.elf");
    let st = std::process::Command::new("bash")
        .arg(root.join("guest/probe/build.sh"))
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("guest/probe/build.sh");
    assert!(st.success(), "building the probe failed");
    out
}

fn one_run(probe: &Path, dir: &Path, i: usize) -> (f64, f64, u64) {
    let log = dir.join(format!("serial-{i}.log"));
    let cfg = VmConfig {
        vcpus: 1,
        memory_mib: MEM_MIB,
        kernel: probe.to_path_buf(),
        initrd: None,
        cmdline: format!("console=ttyS0 probe.mem_mib={MEM_MIB} probe.cpus=1"),
        serial_log: log.clone(),
        vsock: None,
        virtio_fs: None,
        net_devices: Vec::new(),
        block_devices: Vec::new(),
    };
    let rss0 = rss_kib("self");
    let t0 = Instant::now();
    let mut vmm = Vmm::create(cfg).expect("create");
    vmm.start().expect("start");
    let mut first = None;
    let deadline = t0 + Duration::from_secs(20);
    while first.is_none() && Instant::now() < deadline {
        if std::fs::metadata(&log).map(|m| m.len() > 0).unwrap_or(false) {
            first = Some(t0.elapsed());
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let ev = vmm.wait_event(Duration::from_secs(20));
    let done = t0.elapsed();
    assert_eq!(ev, Some(VmEvent::Reset), "probe did not finish");
    let rss = rss_kib("self").saturating_sub(rss0);
    vmm.stop().expect("stop");
    let first = first.expect("no serial output");
    (
        first.as_secs_f64() * 1000.0,
        done.as_secs_f64() * 1000.0,
        rss,
    )
}

fn qemu_rss_kib() -> Option<u64> {
    let mut child = std::process::Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,isa-serial=on,rtc=on,acpi=off,memory-backend=mem",
            "-object",
            &format!("memory-backend-memfd,id=mem,size={MEM_MIB}M,share=on"),
            "-accel",
            "tcg",
            "-m",
            &format!("{MEM_MIB}M"),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-S",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(1500));
    let rss = rss_kib(&child.id().to_string());
    let _ = child.kill();
    let _ = child.wait();
    Some(rss)
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().expect("tempdir");
    let probe = build_probe(dir.path());
    let (mut first, mut done, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let (f, d, r) = one_run(&probe, dir.path(), i);
        first.push(f);
        done.push(d);
        rss.push(r as f64);
    }
    let mut qemu: Vec<f64> = (0..3).filter_map(|_| qemu_rss_kib()).map(|r| r as f64).collect();
    println!("builtin-vmm bench: runs={n} guest_memory={MEM_MIB}MiB vcpus=1 (probe guest, real /dev/kvm)");
    println!("builtin-vmm bench: create_to_first_guest_output_ms median={:.2}", median(&mut first));
    println!("builtin-vmm bench: create_to_probe_done_ms        median={:.2}", median(&mut done));
    let first_rss = rss.first().copied().unwrap_or(0.0);
    let vmm_rss = median(&mut rss);
    println!("builtin-vmm bench: vmm_rss_growth_kib             median={vmm_rss:.0} first_run={first_rss:.0} (process RSS growth over one VM's life)");
    if qemu.is_empty() {
        println!("builtin-vmm bench: qemu_rss_kib not measured (qemu-system-x86_64 did not start)");
    } else {
        let q = median(&mut qemu);
        println!("builtin-vmm bench: qemu_microvm_rss_kib           median={q:.0} (same guest memory, paused, TCG)");
        println!("builtin-vmm bench: ratio vmm_rss / qemu_rss = {:.3}", vmm_rss / q);
    }
}
