//! `joeyctl boot`: the built-in VMM on its own — no agent, no actors, no sandbox.
//!
//! It loads a kernel (an ELF `vmlinux`-style image with a 64-bit entry, or a bzImage), an
//! optional initrd and a command line, runs the guest with its COM1 output on stdout, and
//! exits 0 when the guest resets or powers off. Anything else ends it with one line on stderr
//! naming what happened and a non-zero code: 2 for bad input (a missing or unloadable kernel,
//! bad arguments), 125 for a VM failure (triple fault, KVM error, no `/dev/kvm`), 124 when
//! `--timeout-s` passed. This is the job of `firecracker --no-api --config-file`, so the bare
//! VMM can be measured whole-process (`scripts/bench.sh`, docs/performance.md).
//!
//! On a host whose KVM is PVM-type only guests that run there boot (the probe guest,
//! `guest/probe/`, or any identity-mapped 64-bit ELF); nothing is faked: KVM's answer is
//! reported as it is.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use joey_vmm_core::vmm::{VmConfig, VmEvent, Vmm, VmmError, MAX_VCPUS};

use super::{EXIT_BAD_INPUT, EXIT_RUNTIME};

/// Exit code when `--timeout-s` passed (as timeout(1)).
pub const EXIT_TIMEOUT: i32 = 124;

/// The guest's console: COM1 writes go straight to the process's stdout.
const STDOUT: &str = "/dev/stdout";

#[derive(Args, Debug)]
pub struct BootArgs {
    /// Guest kernel: ELF `vmlinux` (64-bit entry) or bzImage.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk, loaded at the top of low memory.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long = "memory-mib", default_value_t = 128)]
    pub memory_mib: u32,
    /// Give up after this many seconds (exit 124); 0: wait for the guest for ever.
    #[arg(long = "timeout-s", default_value_t = 0)]
    pub timeout_s: u64,
    /// Print on stderr how long create and run took and the process's peak RSS.
    #[arg(long)]
    pub timings: bool,
    /// A joey config file; only its `[debug]` section is used (`debug.failpoints`, in a build
    /// with the `failpoints` feature).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// How a boot ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest reset or powered off: a clean end.
    Ended(&'static str),
    /// The VM failed; the text names how.
    Failed(String),
}

/// What a VM event means for `joeyctl boot`.
pub fn outcome_of(event: &VmEvent) -> Outcome {
    match event {
        VmEvent::Reset => Outcome::Ended("reset"),
        VmEvent::Shutdown { .. } => Outcome::Ended("power off"),
        VmEvent::TripleFault { vcpu } => Outcome::Failed(format!("vCPU {vcpu} triple faulted")),
        VmEvent::Crash { vcpu } => {
            Outcome::Failed(format!("the guest reported a crash on vCPU {vcpu}"))
        }
        VmEvent::Halted { vcpu } => {
            Outcome::Failed(format!("vCPU {vcpu} halted with no way to wake it"))
        }
        VmEvent::InternalError { vcpu, suberror, .. } => {
            Outcome::Failed(format!("KVM internal error {suberror} on vCPU {vcpu}"))
        }
        VmEvent::FailEntry { vcpu, reason, cpu } => Outcome::Failed(format!(
            "KVM could not enter vCPU {vcpu} (hardware reason {reason:#x}, host CPU {cpu})"
        )),
        VmEvent::VcpuError { vcpu, errno } => Outcome::Failed(format!(
            "KVM_RUN failed on vCPU {vcpu}: {}",
            std::io::Error::from_raw_os_error(*errno)
        )),
        VmEvent::UnhandledExit { vcpu, reason } => {
            Outcome::Failed(format!("unhandled exit on vCPU {vcpu}: {reason}"))
        }
        VmEvent::ThreadFailed { thread, reason } => {
            Outcome::Failed(format!("the VM's thread {thread} failed: {reason}"))
        }
    }
}

/// Checks the arguments before anything is created; the error names the argument.
pub fn check_args(a: &BootArgs) -> Result<(), String> {
    if a.vcpus == 0 || a.vcpus > MAX_VCPUS {
        return Err(format!("--vcpus {}: must be 1..={MAX_VCPUS}", a.vcpus));
    }
    if a.memory_mib < 16 {
        return Err(format!(
            "--memory-mib {}: must be at least 16",
            a.memory_mib
        ));
    }
    check_file("--kernel", &a.kernel)?;
    if let Some(i) = &a.initrd {
        check_file("--initrd", i)?;
    }
    Ok(())
}

fn check_file(arg: &str, p: &Path) -> Result<(), String> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{arg} {}: not a regular file", p.display())),
        Err(e) => Err(format!("{arg} {}: {e}", p.display())),
    }
}

/// Whether a create error is the user's input (kernel/initrd/cmdline) rather than the host.
fn is_bad_input(e: &VmmError) -> bool {
    matches!(e, VmmError::Boot(_) | VmmError::InvalidConfig(_))
}

fn peak_rss_kib() -> i64 {
    // SAFETY: getrusage only writes the rusage struct we pass, which is zero-initialised.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) == 0 {
            ru.ru_maxrss
        } else {
            -1
        }
    }
}

/// Runs `joeyctl boot`; returns the process exit code.
pub fn run(a: BootArgs) -> i32 {
    if let Err(e) = check_args(&a) {
        eprintln!("joeyctl boot: error: {e}");
        return EXIT_BAD_INPUT;
    }
    if let Some(p) = &a.config {
        let (config, _) = match super::load_config(Some(p)) {
            Ok(v) => v,
            Err(code) => return code,
        };
        if let Err(e) = crate::failpoints::setup(&config.debug) {
            eprintln!("joeyctl boot: error: {e}");
            return EXIT_BAD_INPUT;
        }
    }
    let t0 = Instant::now();
    let cfg = VmConfig {
        vcpus: a.vcpus,
        memory_mib: a.memory_mib,
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        cmdline: a.cmdline.clone(),
        serial_log: PathBuf::from(STDOUT),
        serial_log_max_bytes: 0,
        vsock: None,
        virtio_fs: None,
        net_devices: Vec::new(),
        block_devices: Vec::new(),
    };
    let mut vmm = match Vmm::create(cfg) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("joeyctl boot: error: creating the VM: {e}");
            return if is_bad_input(&e) {
                EXIT_BAD_INPUT
            } else {
                EXIT_RUNTIME
            };
        }
    };
    if let Err(e) = vmm.start() {
        eprintln!("joeyctl boot: error: starting the VM: {e}");
        return EXIT_RUNTIME;
    }
    let created = t0.elapsed();
    let deadline = (a.timeout_s > 0).then(|| Instant::now() + Duration::from_secs(a.timeout_s));
    // The failure to report (one line), if any.
    let (mut code, mut failure) = loop {
        // Until the deadline, or an hour at a time without one.
        let wait = deadline.map_or(Duration::from_secs(3600), |d| d.saturating_duration_since(Instant::now()));
        match vmm.wait_event(wait) {
            Some(ev) => match outcome_of(&ev) {
                Outcome::Ended(_) => break (0, None),
                Outcome::Failed(why) => break (EXIT_RUNTIME, Some(why)),
            },
            None if deadline.is_some_and(|d| Instant::now() >= d) => {
                let why = format!("the guest was still running after --timeout-s {}", a.timeout_s);
                break (EXIT_TIMEOUT, Some(why));
            }
            None => {}
        }
    };
    let ran = t0.elapsed();
    // A vCPU that does not stop (hung) is a VM failure, said on the same line.
    if let Err(e) = vmm.stop() {
        let stop = format!("stopping the VM: {e}");
        failure = Some(failure.map_or(stop.clone(), |f| format!("{f}; {stop}")));
        code = EXIT_RUNTIME;
    }
    if let Some(f) = failure {
        eprintln!("joeyctl boot: error: {f}");
    }
    drop(vmm);
    if a.timings {
        eprintln!(
            "timings: create+start {:.1} ms, until the guest ended {:.1} ms, total {:.1} ms, peak RSS {} KiB",
            created.as_secs_f64() * 1e3,
            ran.as_secs_f64() * 1e3,
            t0.elapsed().as_secs_f64() * 1e3,
            peak_rss_kib()
        );
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(kernel: &Path) -> BootArgs {
        BootArgs {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 128,
            timeout_s: 0,
            timings: false,
            config: None,
        }
    }

    #[test]
    fn arguments_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, b"x").unwrap();
        assert_eq!(check_args(&args(&k)), Ok(()));
        let mut a = args(&k);
        a.vcpus = 0;
        assert_eq!(
            check_args(&a).unwrap_err(),
            format!("--vcpus 0: must be 1..={MAX_VCPUS}")
        );
        let mut a = args(&k);
        a.memory_mib = 8;
        assert_eq!(
            check_args(&a).unwrap_err(),
            "--memory-mib 8: must be at least 16"
        );
        let missing = dir.path().join("nope");
        let e = check_args(&args(&missing)).unwrap_err();
        assert!(
            e.starts_with(&format!("--kernel {}: ", missing.display())),
            "{e}"
        );
        let mut a = args(&k);
        a.initrd = Some(dir.path().to_path_buf());
        assert_eq!(
            check_args(&a).unwrap_err(),
            format!("--initrd {}: not a regular file", dir.path().display())
        );
    }

    #[test]
    fn only_reset_and_power_off_end_cleanly() {
        assert_eq!(outcome_of(&VmEvent::Reset), Outcome::Ended("reset"));
        assert_eq!(
            outcome_of(&VmEvent::ThreadFailed {
                thread: "vcpu1".into(),
                reason: "panicked: boom".into()
            }),
            Outcome::Failed("the VM's thread vcpu1 failed: panicked: boom".into())
        );
        assert_eq!(
            outcome_of(&VmEvent::Shutdown { vcpu: 0 }),
            Outcome::Ended("power off")
        );
        assert_eq!(
            outcome_of(&VmEvent::TripleFault { vcpu: 1 }),
            Outcome::Failed("vCPU 1 triple faulted".into())
        );
        assert_eq!(
            outcome_of(&VmEvent::VcpuError {
                vcpu: 0,
                errno: libc::EFAULT
            }),
            Outcome::Failed("KVM_RUN failed on vCPU 0: Bad address (os error 14)".into())
        );
        assert!(matches!(
            outcome_of(&VmEvent::Halted { vcpu: 0 }),
            Outcome::Failed(_)
        ));
    }
}
