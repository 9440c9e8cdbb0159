//! A private containerd with its CRI plugin for the CRI tests: `scripts/cri-containerd.sh`
//! starts it (own network namespace, CNI bridge, runtime handlers `runc` and `joey`, locally
//! built pause and busybox images in namespace `k8s.io`) and stops it on drop. Tests drive it
//! with [`joey_cri_client::CriClient`], as kubelet would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use joey_cri_client::{
    api, container_config, container_state, parse_log, pod_config, CriClient, Logs,
};

use crate::containerd::shim_path;
use crate::*;

/// The busybox image `cri-containerd.sh` imports (scripts/make-busybox-image.sh).
pub const BUSYBOX: &str = "docker.io/library/busybox:local";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cri-containerd.sh")
}

/// One running instance of `scripts/cri-containerd.sh`; stopped (everything removed) on drop.
pub struct CriContainerd {
    /// Holds the instance directory (`dir`), created by the script inside it.
    _parent: tempfile::TempDir,
    pub dir: PathBuf,
    env: BTreeMap<String, String>,
}

impl CriContainerd {
    /// Starts the instance with the shim, kernel and initrd under test (JOEY_SHIM, JOEY_KERNEL,
    /// JOEY_INITRD) and hypervisor kind `qemu`.
    pub fn start() -> CriContainerd {
        let kernel = std::env::var("JOEY_KERNEL").expect("JOEY_KERNEL is not set");
        let initrd = std::env::var("JOEY_INITRD").expect("JOEY_INITRD is not set");
        let parent = tempfile::Builder::new()
            .prefix("jcri-")
            .tempdir()
            .expect("tempdir");
        // The script names its network namespace after the directory's name: unique per test.
        let name = parent.path().file_name().expect("name").to_owned();
        let dir = parent.path().join(name);
        let o = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .env("JOEY_SHIM", shim_path())
            .env("JOEY_KERNEL", kernel)
            .env("JOEY_INITRD", initrd)
            .env("JOEY_HYPERVISOR", "qemu")
            .env_remove("JOEY_CONFIG")
            .env_remove("JOEY_LOG")
            .output()
            .expect("run scripts/cri-containerd.sh");
        assert!(
            o.status.success(),
            "cri-containerd.sh start failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            stderr_of(&o)
        );
        let env = String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CriContainerd {
            _parent: parent,
            dir,
            env,
        }
    }

    /// A setting the script printed (`CRI_ADDRESS`, `CRI_NETNS`, `JOEY_STATE_DIR`, ...).
    pub fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("cri-containerd.sh printed no {key}: {:?}", self.env))
    }

    pub fn client(&self) -> CriClient {
        CriClient::connect(Path::new(self.var("CRI_ADDRESS"))).expect("connect to the CRI socket")
    }

    /// containerd's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.var("CRI_LOG")).unwrap_or_default()
    }

    /// A fresh log directory for pod `name` (under the instance: removed with it).
    pub fn pod_log_dir(&self, name: &str) -> PathBuf {
        let d = Path::new(self.var("CRI_POD_LOGS")).join(name);
        std::fs::create_dir_all(&d).expect("pod log dir");
        d
    }

    /// CNI's cached results of this instance's network and of the loopback networks of `pods`.
    pub fn cni_results(&self, pods: &[&str]) -> Vec<String> {
        let prefix = format!("{}-", self.var("CRI_NETWORK"));
        let lo: Vec<String> = pods.iter().map(|p| format!("cni-loopback-{p}-")).collect();
        std::fs::read_dir("/var/lib/cni/results")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix) || lo.iter().any(|l| n.starts_with(l)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// host-local's IP allocations of this instance (files named by IP).
    pub fn ip_allocations(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("cni/ipam"))
            .map(|rd| {
                rd.flatten()
                    .flat_map(|net| {
                        std::fs::read_dir(net.path())
                            .into_iter()
                            .flatten()
                            .flatten()
                    })
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// After every pod is stopped and removed (`pods`: their ids): no shim or VM process, no joey
    /// state, no mount of the instance but containerd's own, no pinned pod netns, no CNI result
    /// or IP allocation (waits up to 15 s for the shims to finish exiting).
    pub fn assert_clean(&self, pods: &[&str]) {
        let d = self.dir.display().to_string();
        let state = self.var("JOEY_STATE_DIR").to_string();
        let netns_dir = self.dir.join("state/io.containerd.grpc.v1.cri/netns");
        let mut last = String::new();
        let r = wait_for(
            "a clean instance",
            Duration::from_secs(15),
            Duration::from_millis(100),
            || {
                let procs: Vec<_> = processes_mentioning(&d)
                    .into_iter()
                    .chain(processes_mentioning(&state))
                    .filter(|(_, cmd)| !cmd.starts_with("containerd --config"))
                    .collect();
                let mi = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
                let mounts: Vec<String> = mi
                    .lines()
                    .filter_map(|l| l.split(' ').nth(4))
                    .filter(|m| m.starts_with(&d) || m.starts_with(&state))
                    .map(str::to_string)
                    .collect();
                let entries = |p: &Path| -> Vec<PathBuf> {
                    std::fs::read_dir(p)
                        .map(|r| r.flatten().map(|e| e.path()).collect())
                        .unwrap_or_default()
                };
                let left = (
                    procs,
                    mounts,
                    entries(Path::new(&state)),
                    entries(&netns_dir),
                    self.cni_results(pods),
                    self.ip_allocations(),
                );
                let clean = left.0.is_empty()
                    && left.1.is_empty()
                    && left.2.is_empty()
                    && left.3.is_empty()
                    && left.4.is_empty()
                    && left.5.is_empty();
                last = format!("{left:?}");
                clean.then_some(())
            },
        );
        if r.is_err() {
            panic!(
                "left behind (processes, mounts, joey state, pod netns, CNI results, IPs): {last}\ncontainerd log:\n{}",
                self.log()
            );
        }
    }

    /// Polls `ContainerStatus` until container `id` has exited; returns its exit code.
    pub fn wait_exited(&self, cri: &CriClient, id: &str, timeout: Duration) -> i32 {
        let r = wait_for(
            &format!("container {id} exits"),
            timeout,
            Duration::from_millis(100),
            || {
                let s = cri.container_status(id).expect("ContainerStatus");
                (container_state(&s) == api::ContainerState::ContainerExited).then_some(s.exit_code)
            },
        );
        r.unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", self.log()))
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

/// The container's CRI log file (`<pod log dir>/<container log_path>`) parsed into its streams.
pub fn read_logs(pod_log_dir: &Path, config: &api::ContainerConfig) -> Logs {
    parse_log(&std::fs::read_to_string(pod_log_dir.join(&config.log_path)).unwrap_or_default())
}
