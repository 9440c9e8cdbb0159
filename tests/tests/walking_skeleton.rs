//! Walking skeleton: `joeyctl run` boots a real microVM (QEMU microvm, our vsock device over
//! vhost-user, real guest kernel and agent) and runs a command in it.
//!
//! Every scenario takes the [`Backend`] it runs on. Each one is a `#[test]` on QEMU (named as the
//! scenario); `builtin_suite` runs all of them again with `hypervisor.kind = "builtin"` where the
//! host's KVM runs Linux guests, and elsewhere checks that joey refuses the built-in VMM with the
//! reason its host detection gives.

use std::io::{BufRead as _, BufReader};
use std::os::unix::process::ExitStatusExt as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use joey_tests::*;

scenarios!(
    stdout_stderr_and_exit_code_are_exact,
    sigkilled_process_gives_137,
    missing_command_is_a_clear_error,
    stdin_is_forwarded_then_eof,
    one_mib_of_binary_output_arrives_intact,
    two_sandboxes_run_at_the_same_time,
    timings_report_hypervisor_and_accelerator,
    unknown_config_key_is_exit_2_with_one_line,
    missing_kernel_is_exit_2,
    missing_qemu_binary_is_exit_2,
    ctrl_c_tears_the_vm_down,
    guest_dying_unexpectedly_is_reported_and_cleaned_up,
);

/// The whole suite on the built-in VMM where the host's KVM runs Linux guests; elsewhere, joey
/// must refuse `hypervisor.kind = "builtin"` (see [`run_builtin_suite`]).
#[test]
fn builtin_suite() {
    run_builtin_suite(SCENARIOS);
}

mod scenario {
    use super::*;

    pub fn stdout_stderr_and_exit_code_are_exact(b: Backend) {
        let env = Env::with_backend(b);
        let o = env.run(&["sh", "-c", "echo out; echo err >&2; exit 3"], None);
        assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
        assert_eq!(stderr_of(&o), "err\n");
        assert_eq!(o.status.code(), Some(3));
    }

    pub fn sigkilled_process_gives_137(b: Backend) {
        let env = Env::with_backend(b);
        let o = env.run(&["sh", "-c", "kill -9 $$"], None);
        assert_eq!(o.status.code(), Some(137), "stderr: {}", stderr_of(&o));
        assert!(o.stdout.is_empty());
    }

    pub fn missing_command_is_a_clear_error(b: Backend) {
        let env = Env::with_backend(b);
        let o = env.run(&["/no/such/command"], None);
        assert_eq!(o.status.code(), Some(127), "stderr: {}", stderr_of(&o));
        let err = stderr_of(&o);
        assert!(err.starts_with("joeyctl: error: "), "{err}");
        assert!(err.contains("/no/such/command") && err.contains("not found"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    pub fn stdin_is_forwarded_then_eof(b: Backend) {
        let env = Env::with_backend(b);
        let input = b"hello\nworld\x00\xff\n";
        let o = env.run(&["sh", "-c", "cat; echo EOF-SEEN"], Some(input));
        let mut want = input.to_vec();
        want.extend_from_slice(b"EOF-SEEN\n");
        assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr_of(&o));
        assert_eq!(o.stdout, want, "stderr: {}", stderr_of(&o));
    }

    pub fn one_mib_of_binary_output_arrives_intact(b: Backend) {
        let env = Env::with_backend(b);
        let o = env.run(
            &[
                "sh",
                "-c",
                "head -c 1048576 /dev/urandom > /tmp/blob && sha256sum /tmp/blob >&2 && cat /tmp/blob",
            ],
            None,
        );
        assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr_of(&o));
        assert_eq!(o.stdout.len(), 1048576);
        let guest_sum = stderr_of(&o).split_whitespace().next().unwrap_or("").to_string();
        assert_eq!(sha256_hex(&o.stdout), guest_sum);
    }

    pub fn two_sandboxes_run_at_the_same_time(backend: Backend) {
        let (a, b) = (Env::with_backend(backend), Env::with_backend(backend));
        let script =
            |n: u8| format!("echo start-{n}; sleep 1; cat /proc/sys/kernel/random/boot_id; echo end-{n}; exit {n}");
        let spawn = |env: &Env, n: u8| {
            let mut c = env.command(&[], &["sh", "-c", &script(n)]);
            c.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
            c.spawn().unwrap()
        };
        let t0 = Instant::now();
        let ca = spawn(&a, 5);
        let cb = spawn(&b, 6);
        // Both VMs are up at the same time: wait for both sandboxes' QEMUs to exist together.
        let mut both = false;
        while t0.elapsed() < Duration::from_secs(60) {
            if !a.processes().is_empty() && !b.processes().is_empty() {
                both = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let oa = wait_output(ca, Duration::from_secs(120));
        let ob = wait_output(cb, Duration::from_secs(120));
        assert!(both, "the two sandboxes never ran concurrently");
        let la: Vec<String> = String::from_utf8_lossy(&oa.stdout).lines().map(String::from).collect();
        let lb: Vec<String> = String::from_utf8_lossy(&ob.stdout).lines().map(String::from).collect();
        assert_eq!(oa.status.code(), Some(5), "{}", stderr_of(&oa));
        assert_eq!(ob.status.code(), Some(6), "{}", stderr_of(&ob));
        assert_eq!(la.len(), 3);
        assert_eq!(lb.len(), 3);
        assert_eq!((la[0].as_str(), la[2].as_str()), ("start-5", "end-5"));
        assert_eq!((lb[0].as_str(), lb[2].as_str()), ("start-6", "end-6"));
        assert_ne!(la[1], lb[1], "both commands ran in the same kernel");
        a.assert_no_leaks();
        b.assert_no_leaks();
    }

    pub fn timings_report_hypervisor_and_accelerator(b: Backend) {
        let env = Env::with_backend(b);
        let o = env.run_with(&["--timings"], &["true"], None);
        assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
        let err = stderr_of(&o);
        let line = err
            .lines()
            .find(|l| l.starts_with("joey timings: hypervisor="))
            .unwrap_or_else(|| panic!("no timings line in {err}"));
        // Backend and accelerator must be the ones host-check reports for this config and host.
        let hc = std::process::Command::new(joeyctl_path())
            .args(["host-check", "--config"])
            .arg(&env.config)
            .output()
            .unwrap();
        let hc = String::from_utf8_lossy(&hc.stdout).into_owned();
        assert!(
            hc.lines()
                .any(|l| l.starts_with(&format!("hypervisor: {} (", b.kind()))),
            "host-check said {hc}"
        );
        let accel = match b {
            // The built-in VMM always runs on KVM.
            Backend::Builtin => "kvm",
            Backend::Qemu => hc
                .lines()
                .find_map(|l| l.strip_prefix("qemu accelerator: "))
                .and_then(|l| l.split_whitespace().next())
                .unwrap_or_else(|| panic!("host-check said {hc}")),
        };
        assert!(
            line.contains(&format!("hypervisor={} accel={accel} ", b.kind())),
            "{line}"
        );
        for key in ["vm_start_to_agent_ready_ms=", "exec_to_exit_ms=", "teardown_ms="] {
            let v = line
                .split(key)
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("");
            assert!(v.parse::<u64>().is_ok(), "{key} in {line}");
        }
        assert!(err.contains("joey timings: accel reason: "), "{err}");
        assert!(err.contains("joey timings: hypervisor reason: "), "{err}");
    }

    /// Runs `true` in an environment whose input is bad: exit 2 and exactly one stderr line,
    /// which is returned.
    fn run_expecting_bad_input(env: &Env) -> String {
        let o = env.run(&["true"], None);
        assert_eq!(o.status.code(), Some(2));
        let err = stderr_of(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        err
    }

    pub fn unknown_config_key_is_exit_2_with_one_line(b: Backend) {
        let env = Env::with_backend_config(b, |k, i| {
            format!(
                "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\nvcpu = 2\n",
                k.display(),
                i.display()
            )
        });
        let err = run_expecting_bad_input(&env);
        assert!(
            err.contains("vcpu") && err.contains(&env.config.display().to_string()),
            "{err}"
        );
    }

    /// The kernel the backend boots is missing: `hypervisor.kernel` (bzImage) for QEMU,
    /// `hypervisor.builtin.kernel` (vmlinux) for the built-in VMM.
    pub fn missing_kernel_is_exit_2(b: Backend) {
        let (key, missing) = match b {
            Backend::Qemu => ("hypervisor.kernel", "/nonexistent/bzImage"),
            Backend::Builtin => ("hypervisor.builtin.kernel", "/nonexistent/vmlinux"),
        };
        let env = Env::with_backend_config(b, |k, i| match b {
            Backend::Qemu => format!("[hypervisor]\nkernel = \"{missing}\"\ninitrd = \"{}\"\n", i.display()),
            Backend::Builtin => format!(
                "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\n[hypervisor.builtin]\nkernel = \"{missing}\"\n",
                k.display(),
                i.display()
            ),
        });
        let err = run_expecting_bad_input(&env);
        assert!(err.contains(missing) && err.contains(&format!("`{key}`")), "{err}");
    }

    pub fn missing_qemu_binary_is_exit_2(b: Backend) {
        let env = Env::with_backend_config(b, |k, i| {
            format!(
            "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\n[hypervisor.qemu]\nbinary = \"/nonexistent/qemu-system-x86_64\"\n",
            k.display(),
            i.display()
        )
        });
        let o = env.run(&["true"], None);
        let err = stderr_of(&o);
        if b == Backend::Builtin {
            // The built-in VMM does not need QEMU at all.
            assert_eq!(o.status.code(), Some(0), "{err}");
            return;
        }
        assert_eq!(o.status.code(), Some(2));
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("/nonexistent/qemu-system-x86_64"), "{err}");
    }

    /// Starts `sh -c 'echo started; sleep 100'` and returns once "started" was printed.
    fn start_sleeper(env: &Env) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
        start_script(env, "echo started; sleep 100")
    }

    /// Starts `sh -c SCRIPT` and returns once it printed "started".
    fn start_script(env: &Env, script: &str) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
        let mut c = env.command(&[], &["sh", "-c", script]);
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        let mut child = c.spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "started\n");
        (child, out)
    }

    fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > timeout {
                let _ = child.kill();
                panic!("joeyctl did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn ctrl_c_tears_the_vm_down(b: Backend) {
        let env = Env::with_backend(b);
        let (mut child, _out) = start_sleeper(&env);
        assert!(!env.processes().is_empty(), "no VM process while the command runs");
        // SAFETY: sending SIGINT to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let st = wait_exit(&mut child, Duration::from_secs(30));
        assert_eq!(st.code(), Some(130), "{st:?}");
        env.assert_no_leaks();
    }

    pub fn guest_dying_unexpectedly_is_reported_and_cleaned_up(b: Backend) {
        let env = Env::with_backend(b);
        let mut child = match b {
            Backend::Qemu => {
                let (child, _out) = start_sleeper(&env);
                let procs = env.processes();
                let qemu: Vec<_> = procs.iter().filter(|(_, c)| c.contains("qemu-system")).collect();
                assert_eq!(qemu.len(), 1, "{procs:?}");
                // SAFETY: killing the QEMU process of this test's sandbox.
                unsafe { libc::kill(qemu[0].0, libc::SIGKILL) };
                child
            }
            // The VM runs inside joeyctl: the guest ends it behind the agent's back (reboot(2),
            // which the built-in VMM sees as an i8042 reset).
            Backend::Builtin => start_script(&env, "echo started; sleep 1; /bin/busybox reboot -f; sleep 100").0,
        };
        let st = wait_exit(&mut child, Duration::from_secs(30));
        assert_eq!(st.code(), Some(125), "{st:?}");
        assert!(st.signal().is_none());
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(err.contains("unexpectedly"), "{err}");
        env.assert_no_leaks();
    }
}
