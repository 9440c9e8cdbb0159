//! `joeyctl boot`: the built-in VMM alone, with the probe guest (guest/probe/) under this host's
//! real KVM. The probe checks its boot data from inside and reports on COM1, which `joeyctl
//! boot` puts on stdout; it then resets the VM (exit 0), triple faults (exit 125) or spins for
//! ever (`--timeout-s`: exit 124).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use joey_tests::joeyctl_path;

/// The probe guest, from guest/probe/build.sh's cache (built once per input hash).
fn probe_elf() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/probe/build.sh");
        let o = Command::new("bash")
            .arg(script)
            .output()
            .expect("running guest/probe/build.sh");
        assert!(
            o.status.success(),
            "guest/probe/build.sh failed: {}",
            text(&o.stderr)
        );
        PathBuf::from(text(&o.stdout).trim()).join("probe.elf")
    })
}

fn boot(args: &[&str]) -> Output {
    Command::new(joeyctl_path())
        .arg("boot")
        .args(args)
        .output()
        .expect("running joeyctl boot")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_probe_guest_boots_reports_on_stdout_and_resets() {
    let k = probe_elf().display().to_string();
    let o = boot(&[
        "--kernel",
        &k,
        "--vcpus",
        "2",
        "--memory-mib",
        "64",
        "--cmdline",
        "probe.mem_mib=64 probe.cpus=2",
    ]);
    let out = text(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        text(&o.stderr)
    );
    assert!(out.starts_with("PROBE start boot_params=0x7000\n"), "{out}");
    assert!(out.ends_with("PROBE done 4/4\n"), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    assert_eq!(text(&o.stderr), "");
}

#[test]
fn timings_report_wall_time_and_peak_rss() {
    let k = probe_elf().display().to_string();
    let o = boot(&[
        "--kernel",
        &k,
        "--cmdline",
        "probe.mem_mib=128 probe.cpus=1",
        "--timings",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("timings: "))
        .unwrap_or_else(|| panic!("{err}"));
    let rss: u64 = line
        .rsplit_once("peak RSS ")
        .and_then(|(_, r)| r.strip_suffix(" KiB"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    // Guest memory is touched only where the probe writes: far below the 128 MiB it has.
    assert!(rss > 0 && rss < 64 * 1024, "{line}");
}

#[test]
fn a_triple_fault_is_a_vm_failure() {
    let k = probe_elf().display().to_string();
    let o = boot(&[
        "--kernel",
        &k,
        "--cmdline",
        "probe.mem_mib=128 probe.cpus=1 probe.triple_fault=1",
    ]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
    assert!(text(&o.stdout).ends_with("PROBE triple_fault now\n"));
    assert_eq!(
        text(&o.stderr),
        "joeyctl boot: error: vCPU 0 triple faulted\n"
    );
}

#[test]
fn a_guest_that_never_ends_stops_at_the_timeout() {
    let k = probe_elf().display().to_string();
    let t = std::time::Instant::now();
    let o = boot(&[
        "--kernel",
        &k,
        "--cmdline",
        "probe.mem_mib=128 probe.cpus=1 probe.spin=1",
        "--timeout-s",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(124), "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stderr),
        "joeyctl boot: error: the guest was still running after --timeout-s 1\n"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn bad_input_is_named_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("vmlinux");
    let o = boot(&["--kernel", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        text(&o.stderr),
        format!(
            "joeyctl boot: error: --kernel {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a kernel at all").unwrap();
    let o = boot(&["--kernel", junk.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.starts_with("joeyctl boot: error: creating the VM: boot: kernel"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(text(&o.stdout), "");
    let k = probe_elf().display().to_string();
    let o = boot(&["--kernel", &k, "--vcpus", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        text(&o.stderr),
        "joeyctl boot: error: --vcpus 0: must be 1..=32\n"
    );
}

/// The guest kernel's boot shortcuts (guest/patches/, actors' cmdline) are in effect: APIC timer
/// calibration is skipped because the VMM told the rate (`apic_timer_hz`), the LAPIC timer
/// still ticks, freed init memory is not poisoned, no legacy ptys exist, the TSC rate came from
/// the host, and the initrd is an uncompressed cpio.
#[test]
fn the_guest_kernel_takes_its_boot_shortcuts() {
    let env = joey_tests::Env::with_config(|k, i| {
        format!(
            "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\nkernel_params = \"apic=verbose\"\n",
            k.display(),
            i.display()
        )
    });
    let script = "dmesg; grep -c LOC /proc/interrupts; ls /dev | grep -c '^pty' ; \
                  cat /sys/devices/system/clockevents/clockevent0/current_device";
    let o = env.run(&["sh", "-c", script], None);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // 1 GHz / HZ (250 in the guest's config).
    assert!(
        out.contains("lapic timer already calibrated 4000000\n"),
        "{out}"
    );
    assert!(!out.contains("calibrating APIC timer"), "{out}");
    assert!(!out.contains("verify APIC timer"), "{out}");
    assert!(out.contains("tsc: Detected "), "{out}");
    let cmdline = out
        .lines()
        .find(|l| l.starts_with("Command line: "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(cmdline.contains(" noreplace-smp "), "{cmdline}");
    assert!(
        cmdline.contains(" tsc_early_khz="),
        "under TCG the host's TSC rate is passed: {cmdline}"
    );
    let tail: Vec<&str> = out.lines().rev().take(3).collect();
    assert_eq!(
        tail,
        ["lapic", "0", "1"],
        "LAPIC clockevent, no /dev/pty*, one LOC line:\n{out}"
    );
    let initrd = std::fs::read(std::env::var("JOEY_INITRD").unwrap()).unwrap();
    assert_eq!(
        &initrd[..6],
        b"070701",
        "the initrd is an uncompressed newc cpio"
    );
}
