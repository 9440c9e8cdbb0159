//! A private containerd 1.6 for the shim tests: own root, state, sockets and joey state dir under
//! a temp dir, our shim first in its PATH, a locally built busybox image (no registry).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::*;

pub const IMAGE: &str = "docker.io/library/busybox:local";
pub const RUNTIME: &str = "io.containerd.joey.v2";
pub const RUN_TIMEOUT: Duration = Duration::from_secs(180);

pub fn shim_path() -> PathBuf {
    match std::env::var_os("JOEY_SHIM") {
        Some(v) => PathBuf::from(v),
        None => panic!("JOEY_SHIM is not set: run the integration tests through `make test`"),
    }
}

/// A private containerd (own root, state, sockets and joey state dir under a temp dir) that
/// finds our shim first in its PATH. Killed on drop.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Containerd {
    pub fn start() -> Containerd {
        let kernel = std::env::var("JOEY_KERNEL").expect("JOEY_KERNEL is not set");
        let initrd = std::env::var("JOEY_INITRD").expect("JOEY_INITRD is not set");
        let shim = shim_path();
        assert!(shim.is_file(), "JOEY_SHIM={} does not exist", shim.display());
        let dir = tempfile::Builder::new().prefix("joey-shim-").tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(
            d.join("joey.toml"),
            format!(
                "[hypervisor]\nkind = \"qemu\"\nkernel = \"{kernel}\"\ninitrd = \"{initrd}\"\n\n[runtime]\nstate_dir = \"{}\"\n",
                d.join("joey-state").display()
            ),
        )
        .expect("write joey config");
        std::fs::write(
            d.join("containerd.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n[grpc]\n  address = \"{0}/c.sock\"\n[ttrpc]\n  address = \"{0}/c.sock.ttrpc\"\n",
                d.display()
            ),
        )
        .expect("write containerd config");
        let path = format!(
            "{}:{}",
            shim.parent().expect("shim dir").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(d.join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("containerd.toml"))
            .env("PATH", path)
            .env("JOEY_CONFIG", d.join("joey.toml"))
            .env_remove("JOEY_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd (apt-get install containerd runc)");
        let c = Containerd { dir, child: Some(child) };
        let t0 = Instant::now();
        while !c.sock().exists() {
            assert!(t0.elapsed() < Duration::from_secs(20), "containerd did not start:\n{}", c.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }

    /// The per-sandbox metrics endpoint the shim serves for container `id` (sandbox id = `id`).
    pub fn metrics_socket(&self, id: &str) -> PathBuf {
        self.dir.path().join("joey-state").join(id).join("metrics.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(self.sock()).args(args);
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    }

    pub fn ctr_out(&self, args: &[&str]) -> Output {
        let child = self.ctr(args).spawn().expect("run ctr");
        wait_output(child, RUN_TIMEOUT)
    }

    pub fn import_busybox(&self) {
        let tar = self.dir.path().join("busybox.tar");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-busybox-image.sh");
        let o = Command::new("bash").arg(script).arg(&tar).output().expect("make-busybox-image.sh");
        assert!(o.status.success(), "make-busybox-image.sh: {}", stderr_of(&o));
        let t = tar.display().to_string();
        // The manifest's ref.name names the image; ctr may complain about the extra index name.
        let _ = self.ctr_out(&["image", "import", "--index-name", IMAGE, &t]);
        let ls = self.ctr_out(&["image", "ls", "-q"]);
        assert!(
            String::from_utf8_lossy(&ls.stdout).lines().any(|l| l == IMAGE),
            "image not imported: {}",
            String::from_utf8_lossy(&ls.stdout)
        );
    }

    pub fn run(&self, id: &str, argv: &[&str]) -> Output {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME, IMAGE, id];
        args.extend_from_slice(argv);
        self.ctr_out(&args)
    }

    /// containerd's shim socket for container `id` (namespace default).
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        let h = sha256_hex(format!("{}/default/{id}", self.sock().display()).as_bytes());
        PathBuf::from("/run/containerd/s").join(h)
    }

    /// Nothing of this test is left: no QEMU or shim process, no mount, no shim socket.
    pub fn assert_clean(&self, ids: &[&str]) {
        let d = self.dir.path().display().to_string();
        let t0 = Instant::now();
        loop {
            let procs: Vec<_> = processes_mentioning(&d)
                .into_iter()
                .filter(|(_, cmd)| !cmd.starts_with("containerd --config"))
                .collect();
            let mi = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
            let mounts: Vec<&str> = mi.lines().filter(|l| l.contains(&d)).collect();
            let socks: Vec<PathBuf> = ids.iter().map(|i| self.shim_socket(i)).filter(|p| p.exists()).collect();
            let state_left = std::fs::read_dir(self.dir.path().join("joey-state"))
                .map(|r| r.count())
                .unwrap_or(0);
            if procs.is_empty() && mounts.is_empty() && socks.is_empty() && state_left == 0 {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "left behind: processes {procs:?}, mounts {mounts:?}, sockets {socks:?}, joey state entries {state_left}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn sigkill(pid: i32) {
    // SAFETY: plain kill(2) on a pid we just found.
    let r = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(r, 0, "kill -KILL {pid}: {}", std::io::Error::last_os_error());
}
