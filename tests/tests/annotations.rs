//! Per-sandbox config overrides from OCI annotations (`io.joey.config.<key>`, docs/config.md),
//! through a private containerd 1.6 and `ctr run --annotation`. Needs `JOEY_SHIM`,
//! `JOEY_KERNEL`, `JOEY_INITRD` and Debian's containerd, runc, busybox-static.

use joey_tests::containerd::*;
use joey_tests::*;

/// `MemTotal` of the guest in KiB and the number of CPUs it sees, from inside the container.
fn guest_size(c: &Containerd, id: &str, annotations: &[&str]) -> (u64, u32) {
    let mut ctr_args = Vec::new();
    for a in annotations {
        ctr_args.extend_from_slice(&["--annotation", a]);
    }
    let o = c.run_on(
        RUNTIME,
        id,
        &ctr_args,
        &["sh", "-c", "grep ^MemTotal: /proc/meminfo; grep -c ^processor /proc/cpuinfo"],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "stderr: {}\ncontainerd log:\n{}", stderr_of(&o), c.log());
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let mut lines = out.lines();
    let mem = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {out:?}"));
    let cpus = lines.next().and_then(|l| l.trim().parse::<u32>().ok()).unwrap_or_else(|| panic!("no cpu count in {out:?}"));
    (mem, cpus)
}

/// The guest's MemTotal is the VM's memory less what the kernel keeps for itself: within
/// 48 MiB below it.
fn assert_mem_of_vm(mem_kib: u64, vm_mib: u64) {
    let vm_kib = vm_mib * 1024;
    assert!(
        mem_kib <= vm_kib && mem_kib > vm_kib - 48 * 1024,
        "guest MemTotal {mem_kib} KiB does not fit a VM of {vm_mib} MiB"
    );
}

#[test]
fn enabled_annotations_size_the_vm() {
    let c = Containerd::start();
    c.import_busybox();
    let (mem, cpus) = guest_size(&c, "a-default", &[]);
    assert_mem_of_vm(mem, 256);
    assert_eq!(cpus, 1);
    let (mem, cpus) = guest_size(
        &c,
        "a-sized",
        &["io.joey.config.hypervisor.memory_mib=512", "io.joey.config.hypervisor.vcpus=2", "unrelated.example.com/x=y"],
    );
    assert_mem_of_vm(mem, 512);
    assert_eq!(cpus, 2);
    c.assert_clean(&["a-default", "a-sized"]);
}

#[test]
fn refused_annotations_name_themselves_and_start_nothing() {
    let c = Containerd::start();
    c.import_busybox();
    for (id, annotation, why) in [
        (
            "r-kernel",
            "io.joey.config.hypervisor.kernel=/tmp/evil-kernel",
            "annotation io.joey.config.hypervisor.kernel: `hypervisor.kernel` names a path and is never overridable",
        ),
        (
            "r-off",
            "io.joey.config.agent.rpc_timeout_ms=5",
            "annotation io.joey.config.agent.rpc_timeout_ms: `agent.rpc_timeout_ms` is not listed in runtime.enable_annotations",
        ),
        (
            "r-range",
            "io.joey.config.hypervisor.memory_mib=16",
            "annotation io.joey.config.hypervisor.memory_mib: invalid value for `hypervisor.memory_mib`: 16 is out of range (valid: 64..=65536)",
        ),
    ] {
        let o = c.run_on(RUNTIME, id, &["--annotation", annotation], &["echo", "must not run"], None);
        let err = stderr_of(&o);
        assert_ne!(o.status.code(), Some(0), "{id}: ctr run succeeded; stdout {:?}", String::from_utf8_lossy(&o.stdout));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "", "{id}: the command ran");
        assert!(err.contains(why), "{id}: stderr does not name the annotation:\n{err}\ncontainerd log:\n{}", c.log());
        assert!(err.contains("invalid argument"), "{id}: not INVALID_ARGUMENT:\n{err}");
        let _ = c.ctr_out(&["container", "rm", id]);
    }
    c.assert_clean(&["r-kernel", "r-off", "r-range"]);
}
