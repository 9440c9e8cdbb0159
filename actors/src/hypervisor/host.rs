//! Honest detection of what the host's KVM can run.
//!
//! A PVM-type KVM (`kvm_pvm`) runs small identity-mapped guests but cannot run an unmodified
//! Linux kernel; only hardware-assisted KVM (`kvm_intel` / `kvm_amd`) can.

use std::fmt;
use std::path::{Path, PathBuf};

/// What the host's KVM is, as far as we can tell without booting anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmFlavor {
    /// No usable /dev/kvm.
    Absent(String),
    /// Hardware virtualisation (VT-x / AMD-V): unmodified Linux guests run.
    Hardware(String),
    /// PVM-type KVM: unmodified Linux guests do not run.
    Pvm,
    /// /dev/kvm exists but the module is unknown.
    Unknown(String),
}

/// The accelerator picked for a QEMU guest, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: crate::hypervisor::Accelerator,
    pub reason: String,
}

impl fmt::Display for AccelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.accel, self.reason)
    }
}

/// Where to look; a struct so tests can point it at a fake sysfs.
#[derive(Debug, Clone)]
pub struct HostPaths {
    pub dev_kvm: PathBuf,
    pub sys_module: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            dev_kvm: PathBuf::from("/dev/kvm"),
            sys_module: PathBuf::from("/sys/module"),
        }
    }
}

fn dev_kvm_usable(p: &Path) -> Result<(), String> {
    match std::fs::OpenOptions::new().read(true).write(true).open(p) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{} not usable: {}", p.display(), e)),
    }
}

/// Classifies the host's KVM.
pub fn detect_kvm(paths: &HostPaths) -> KvmFlavor {
    if let Err(why) = dev_kvm_usable(&paths.dev_kvm) {
        return KvmFlavor::Absent(why);
    }
    let loaded = |m: &str| paths.sys_module.join(m).exists();
    if loaded("kvm_intel") {
        return KvmFlavor::Hardware("kvm_intel (VT-x)".into());
    }
    if loaded("kvm_amd") {
        return KvmFlavor::Hardware("kvm_amd (AMD-V)".into());
    }
    if loaded("kvm_pvm") {
        return KvmFlavor::Pvm;
    }
    KvmFlavor::Unknown("/dev/kvm present but neither kvm_intel, kvm_amd nor kvm_pvm is loaded".into())
}

/// Picks KVM or TCG for a QEMU guest running an unmodified Linux kernel.
pub fn choose_qemu_accel(requested: joey_config::Accel, flavor: &KvmFlavor) -> Result<AccelChoice, String> {
    use crate::hypervisor::Accelerator;
    use joey_config::Accel;
    match requested {
        Accel::Tcg => Ok(AccelChoice {
            accel: Accelerator::Tcg,
            reason: "hypervisor.qemu.accel = \"tcg\" in config".into(),
        }),
        Accel::Kvm => match flavor {
            KvmFlavor::Hardware(m) => Ok(AccelChoice {
                accel: Accelerator::Kvm,
                reason: format!("hypervisor.qemu.accel = \"kvm\"; host KVM is {m}"),
            }),
            KvmFlavor::Pvm => Err("hypervisor.qemu.accel = \"kvm\" but the host KVM is PVM-type \
                 (/sys/module/kvm_pvm), which cannot run an unmodified Linux guest"
                .into()),
            KvmFlavor::Absent(why) | KvmFlavor::Unknown(why) => {
                Err(format!("hypervisor.qemu.accel = \"kvm\" but {why}"))
            }
        },
        Accel::Auto => Ok(match flavor {
            KvmFlavor::Hardware(m) => AccelChoice {
                accel: Accelerator::Kvm,
                reason: format!("host KVM is {m}, which runs unmodified Linux guests"),
            },
            KvmFlavor::Pvm => AccelChoice {
                accel: Accelerator::Tcg,
                reason: "host KVM is PVM-type (kvm_pvm loaded, no kvm_intel/kvm_amd): it cannot run \
                         an unmodified Linux guest, so QEMU uses TCG"
                    .into(),
            },
            KvmFlavor::Absent(why) => AccelChoice {
                accel: Accelerator::Tcg,
                reason: format!("{why}; QEMU uses TCG"),
            },
            KvmFlavor::Unknown(why) => AccelChoice {
                accel: Accelerator::Tcg,
                reason: format!("{why}; not trusting it with a Linux guest, QEMU uses TCG"),
            },
        }),
    }
}

/// Why the host's KVM cannot run an unmodified Linux guest (`None`: it can).
///
/// This is what decides whether the built-in VMM (which always uses KVM) is usable.
pub fn linux_guest_blocker(flavor: &KvmFlavor) -> Option<String> {
    match flavor {
        KvmFlavor::Hardware(_) => None,
        KvmFlavor::Pvm => Some(
            "the host KVM is PVM-type (kvm_pvm loaded, no kvm_intel/kvm_amd), which cannot run an \
             unmodified Linux guest"
                .into(),
        ),
        KvmFlavor::Absent(why) => Some(format!("no usable KVM ({why})")),
        KvmFlavor::Unknown(why) => Some(why.clone()),
    }
}

/// Whether the built-in VMM can run the Linux guest here: `Ok(why)` or `Err(why not)`.
pub fn builtin_support(flavor: &KvmFlavor) -> Result<String, String> {
    match (flavor, linux_guest_blocker(flavor)) {
        (_, Some(why)) => Err(why),
        (KvmFlavor::Hardware(m), None) => Ok(format!("host KVM is {m}, which runs unmodified Linux guests")),
        (other, None) => Ok(format!("{other:?}")),
    }
}

/// Which hypervisor backend runs the sandbox, and why.
///
/// | configured | hardware KVM | PVM / unknown / no KVM |
/// |---|---|---|
/// | `qemu` | qemu | qemu |
/// | `builtin` | builtin | error (why) |
/// | `auto` | builtin | qemu |
pub fn choose_backend(
    requested: joey_config::HypervisorKind,
    flavor: &KvmFlavor,
) -> Result<(crate::hypervisor::BackendKind, String), String> {
    use crate::hypervisor::BackendKind;
    use joey_config::HypervisorKind;
    match (requested, builtin_support(flavor)) {
        (HypervisorKind::Qemu, _) => Ok((BackendKind::Qemu, "hypervisor.kind = \"qemu\" in config".into())),
        (HypervisorKind::Builtin, Ok(why)) => Ok((
            BackendKind::Builtin,
            format!("hypervisor.kind = \"builtin\" in config; {why}"),
        )),
        (HypervisorKind::Builtin, Err(why)) => Err(format!(
            "hypervisor.kind = \"builtin\" cannot be used on this host: {why}; use \"qemu\" or \"auto\""
        )),
        (HypervisorKind::Auto, Ok(why)) => Ok((BackendKind::Builtin, format!("auto: {why}; using the built-in VMM"))),
        (HypervisorKind::Auto, Err(why)) => Ok((BackendKind::Qemu, format!("auto: {why}; using qemu"))),
    }
}

/// The accelerator of the chosen backend: the built-in VMM always runs on KVM (it is only
/// chosen where KVM runs Linux guests); QEMU follows `hypervisor.qemu.accel`.
pub fn choose_accel(
    backend: crate::hypervisor::BackendKind,
    requested: joey_config::Accel,
    flavor: &KvmFlavor,
) -> Result<AccelChoice, String> {
    use crate::hypervisor::{Accelerator, BackendKind};
    match backend {
        BackendKind::Qemu => choose_qemu_accel(requested, flavor),
        BackendKind::Builtin => match builtin_support(flavor) {
            Ok(why) => Ok(AccelChoice {
                accel: Accelerator::Kvm,
                reason: format!("the built-in VMM runs guests on KVM; {why}"),
            }),
            Err(why) => Err(format!("the built-in VMM needs KVM that runs Linux guests: {why}")),
        },
    }
}

/// The host's TSC rate in kHz, from the first `cpu MHz` line of `/proc/cpuinfo` (on a host
/// without frequency scaling, such as a VM, that is the rate the kernel calibrated its TSC to;
/// measured here: 2599.998 MHz there vs 2600003 kHz against CLOCK_MONOTONIC_RAW). `None` when
/// it is not there: the guest then calibrates its TSC itself.
pub fn host_tsc_khz() -> Option<u64> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| tsc_khz_from_cpuinfo(&text))
}

fn tsc_khz_from_cpuinfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split_once(':')?.1.trim().parse().ok()?;
    (mhz.is_finite() && mhz >= 1.0).then(|| (mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Accelerator;

    fn fake_host(modules: &[&str], kvm: bool) -> (tempfile::TempDir, HostPaths) {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("module");
        std::fs::create_dir(&sys).unwrap();
        for m in modules {
            std::fs::create_dir(sys.join(m)).unwrap();
        }
        let dev = d.path().join("kvm");
        if kvm {
            std::fs::write(&dev, b"").unwrap();
        }
        (d, HostPaths { dev_kvm: dev, sys_module: sys })
    }

    #[test]
    fn pvm_host_picks_tcg() {
        let (_d, p) = fake_host(&["kvm", "kvm_pvm"], true);
        assert_eq!(detect_kvm(&p), KvmFlavor::Pvm);
        let c = choose_qemu_accel(joey_config::Accel::Auto, &KvmFlavor::Pvm).unwrap();
        assert_eq!(c.accel, Accelerator::Tcg);
        assert!(c.reason.contains("PVM"), "{}", c.reason);
        assert!(choose_qemu_accel(joey_config::Accel::Kvm, &KvmFlavor::Pvm).is_err());
    }

    #[test]
    fn hardware_host_picks_kvm() {
        let (_d, p) = fake_host(&["kvm", "kvm_intel"], true);
        let f = detect_kvm(&p);
        assert!(matches!(f, KvmFlavor::Hardware(_)));
        let c = choose_qemu_accel(joey_config::Accel::Auto, &f).unwrap();
        assert_eq!(c.accel, Accelerator::Kvm);
    }

    #[test]
    fn no_kvm_picks_tcg() {
        let (_d, p) = fake_host(&[], false);
        let f = detect_kvm(&p);
        assert!(matches!(f, KvmFlavor::Absent(_)));
        let c = choose_qemu_accel(joey_config::Accel::Auto, &f).unwrap();
        assert_eq!(c.accel, Accelerator::Tcg);
        let c = choose_qemu_accel(joey_config::Accel::Tcg, &KvmFlavor::Hardware("x".into())).unwrap();
        assert_eq!(c.accel, Accelerator::Tcg);
    }

    fn flavors() -> Vec<KvmFlavor> {
        vec![
            KvmFlavor::Hardware("kvm_intel (VT-x)".into()),
            KvmFlavor::Hardware("kvm_amd (AMD-V)".into()),
            KvmFlavor::Pvm,
            KvmFlavor::Absent("/dev/kvm not usable: No such file or directory (os error 2)".into()),
            KvmFlavor::Unknown("/dev/kvm present but neither kvm_intel, kvm_amd nor kvm_pvm is loaded".into()),
        ]
    }

    /// Host flavor x configured kind -> backend or error, the whole matrix.
    #[test]
    fn backend_choice_matrix() {
        use crate::hypervisor::BackendKind;
        use joey_config::HypervisorKind;
        for f in flavors() {
            let hw = matches!(f, KvmFlavor::Hardware(_));
            // qemu: always qemu.
            let (b, why) = choose_backend(HypervisorKind::Qemu, &f).unwrap();
            assert_eq!(b, BackendKind::Qemu, "{f:?}");
            assert!(why.contains("\"qemu\" in config"), "{why}");
            // auto: builtin exactly where KVM runs Linux guests.
            let (b, why) = choose_backend(HypervisorKind::Auto, &f).unwrap();
            assert_eq!(b, if hw { BackendKind::Builtin } else { BackendKind::Qemu }, "{f:?}");
            assert!(why.starts_with("auto: "), "{why}");
            // builtin: refused, with the detection's reason, where KVM cannot run Linux guests.
            match (choose_backend(HypervisorKind::Builtin, &f), linux_guest_blocker(&f)) {
                (Ok((b, why)), None) => {
                    assert_eq!(b, BackendKind::Builtin);
                    assert!(why.contains("runs unmodified Linux guests"), "{why}");
                }
                (Err(e), Some(blocker)) => {
                    assert!(e.contains(&blocker), "{e}");
                    assert!(e.starts_with("hypervisor.kind = \"builtin\" cannot be used on this host: "), "{e}");
                    assert!(!e.contains('\n'), "{e:?}");
                }
                other => panic!("{f:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn builtin_refusal_names_pvm() {
        let e = choose_backend(joey_config::HypervisorKind::Builtin, &KvmFlavor::Pvm).unwrap_err();
        assert!(e.contains("PVM-type") && e.contains("cannot run an unmodified Linux guest"), "{e}");
        assert_eq!(builtin_support(&KvmFlavor::Pvm).unwrap_err(), linux_guest_blocker(&KvmFlavor::Pvm).unwrap());
    }

    #[test]
    fn builtin_backend_runs_on_kvm() {
        use crate::hypervisor::BackendKind;
        let hw = KvmFlavor::Hardware("kvm_intel (VT-x)".into());
        // hypervisor.qemu.accel does not matter for the built-in VMM.
        for a in [joey_config::Accel::Auto, joey_config::Accel::Tcg, joey_config::Accel::Kvm] {
            let c = choose_accel(BackendKind::Builtin, a, &hw).unwrap();
            assert_eq!(c.accel, Accelerator::Kvm);
        }
        assert!(choose_accel(BackendKind::Builtin, joey_config::Accel::Auto, &KvmFlavor::Pvm).is_err());
        let c = choose_accel(BackendKind::Qemu, joey_config::Accel::Auto, &KvmFlavor::Pvm).unwrap();
        assert_eq!(c.accel, Accelerator::Tcg);
    }

    #[test]
    fn tsc_rate_from_cpuinfo() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2599.998\ncache size\t: 512 KB\n\nprocessor\t: 1\ncpu MHz\t\t: 1800.000\n";
        assert_eq!(tsc_khz_from_cpuinfo(text), Some(2_599_998));
        assert_eq!(tsc_khz_from_cpuinfo("processor\t: 0\n"), None);
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz\t: fast\n"), None);
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz\t: 0.000\n"), None);
    }
}
