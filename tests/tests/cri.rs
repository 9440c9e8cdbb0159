//! Kubernetes pods through containerd's CRI plugin (CRI v1, as kubelet drives it): a private
//! containerd from scripts/cri-containerd.sh, runtime handlers `runc` (the reference) and `joey`
//! (one microVM per pod), the locally built pause and busybox images. Every scenario runs on both
//! handlers and must give the same observable outcome, then leave nothing behind.

use std::time::{Duration, Instant};

use joey_tests::cri::*;
use joey_tests::wait_for;

const POD_TIMEOUT: Duration = Duration::from_secs(180);

/// One pod's lifecycle on `handler`: a container's exact stdout and stderr through its CRI log
/// file, ExecSync (stdout, stderr, exit code), StopContainer's grace period ending in SIGKILL for
/// a PID 1 that ignores SIGTERM, StopPodSandbox + RemovePodSandbox, and no leftovers.
fn pod_lifecycle(handler: &str) {
    let c = CriContainerd::start();
    let cri = c.client();
    let logs = c.pod_log_dir("web");
    let pod_cfg = pod_config("web", &format!("uid-{handler}"), &logs);
    let pod = cri
        .run_pod(&pod_cfg, handler)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.log()));
    let st = cri.pod_status(&pod).expect("PodSandboxStatus");
    assert_eq!(
        api::PodSandboxState::try_from(st.state),
        Ok(api::PodSandboxState::SandboxReady)
    );

    // Output first, then a process that only SIGKILL ends (SIGTERM ignored, kept across exec).
    let app = container_config(
        "app",
        BUSYBOX,
        &[
            "sh",
            "-c",
            "echo hello from the pod; echo to stderr >&2; trap '' TERM; exec sleep 3600",
        ],
    );
    let id = cri
        .create_container(&pod, &app, &pod_cfg)
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", c.log()));
    cri.start_container(&id)
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", c.log()));
    let out = wait_for(
        "both log lines",
        POD_TIMEOUT,
        Duration::from_millis(100),
        || {
            let l = read_logs(&logs, &app);
            (l.stdout.ends_with('\n') && l.stderr.ends_with('\n')).then_some(l)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", read_logs(&logs, &app)));
    assert_eq!(out.stdout, "hello from the pod\n");
    assert_eq!(out.stderr, "to stderr\n");
    let s = cri.container_status(&id).expect("ContainerStatus");
    assert_eq!(container_state(&s), api::ContainerState::ContainerRunning);

    let r = cri
        .exec_sync(
            &id,
            &["sh", "-c", "echo exec out; echo exec err >&2; exit 3"],
            60,
        )
        .expect("ExecSync");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "exec out\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "exec err\n");
    assert_eq!(r.exit_code, 3);

    // Grace period 2 s: SIGTERM is ignored, SIGKILL follows.
    let t0 = Instant::now();
    cri.stop_container(&id, 2).expect("StopContainer");
    let took = t0.elapsed();
    assert_eq!(c.wait_exited(&cri, &id, POD_TIMEOUT), 137);
    assert!(
        took >= Duration::from_secs(2),
        "StopContainer returned after {took:?}, before the grace period"
    );

    remove_pod(&c, &cri, &pod);
}

#[test]
fn runc_pod_lifecycle() {
    pod_lifecycle("runc");
}

#[test]
fn joey_pod_lifecycle() {
    pod_lifecycle("joey");
}

/// Runs pod `name` on `handler` with `containers` (all started); returns the pod's id and the
/// containers' ids.
fn start_pod(
    c: &CriContainerd,
    cri: &CriClient,
    handler: &str,
    name: &str,
    containers: &[api::ContainerConfig],
) -> (String, Vec<String>) {
    let logs = c.pod_log_dir(name);
    let pod_cfg = pod_config(name, &format!("uid-{name}-{handler}"), &logs);
    let pod = cri
        .run_pod(&pod_cfg, handler)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.log()));
    let mut ids = Vec::new();
    for cfg in containers {
        let id = cri
            .create_container(&pod, cfg, &pod_cfg)
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", c.log()));
        cri.start_container(&id)
            .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", c.log()));
        ids.push(id);
    }
    (pod, ids)
}

/// Stops and removes `pod`, then checks that nothing of it is left.
fn remove_pod(c: &CriContainerd, cri: &CriClient, pod: &str) {
    cri.stop_pod(pod).expect("StopPodSandbox");
    cri.remove_pod(pod).expect("RemovePodSandbox");
    assert!(cri.list_pods().expect("ListPodSandbox").is_empty());
    c.assert_clean(&[pod]);
}

/// `readlink /proc/self/ns/<ns>` in container `id` (ExecSync).
fn namespace_of(cri: &CriClient, id: &str, ns: &str) -> String {
    let r = cri
        .exec_sync(id, &["readlink", &format!("/proc/self/ns/{ns}")], 30)
        .expect("ExecSync readlink");
    assert_eq!(
        r.exit_code,
        0,
        "readlink: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).trim().to_string()
}

/// Two containers of one pod are in the same network, IPC and UTS namespaces (the pod's), as
/// CRI asks, and see the pod's hostname.
fn pod_shares_namespaces(handler: &str) {
    let c = CriContainerd::start();
    let cri = c.client();
    let sleeper = |n: &str| container_config(n, BUSYBOX, &["sleep", "3600"]);
    let (pod, ids) = start_pod(&c, &cri, handler, "shared", &[sleeper("a"), sleeper("b")]);
    for ns in ["net", "ipc", "uts"] {
        let (a, b) = (
            namespace_of(&cri, &ids[0], ns),
            namespace_of(&cri, &ids[1], ns),
        );
        assert!(a.starts_with(&format!("{ns}:[")), "{a}");
        assert_eq!(
            a, b,
            "the pod's containers are in different {ns} namespaces"
        );
    }
    for id in &ids {
        let r = cri
            .exec_sync(id, &["hostname"], 30)
            .expect("ExecSync hostname");
        assert_eq!(
            String::from_utf8_lossy(&r.stdout),
            "shared\n",
            "the pod's hostname"
        );
    }
    remove_pod(&c, &cri, &pod);
}

#[test]
fn runc_pod_shares_namespaces() {
    pod_shares_namespaces("runc");
}

#[test]
fn joey_pod_shares_namespaces() {
    pod_shares_namespaces("joey");
}

/// Two containers of one pod talk over localhost: one serves HTTP on 127.0.0.1, the other
/// fetches it (ExecSync), as in any Kubernetes pod.
fn pod_localhost(handler: &str) {
    let c = CriContainerd::start();
    let cri = c.client();
    let server = container_config(
        "server",
        BUSYBOX,
        &["sh", "-c", "mkdir -p /tmp/www && echo pong > /tmp/www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /tmp/www"],
    );
    let client = container_config("client", BUSYBOX, &["sleep", "3600"]);
    let (pod, ids) = start_pod(&c, &cri, handler, "duo", &[server, client]);
    let body = fetch(&c, &cri, &ids[1], "http://127.0.0.1:8080/");
    assert_eq!(body, "pong\n");
    remove_pod(&c, &cri, &pod);
}

#[test]
fn runc_pod_containers_talk_over_localhost() {
    pod_localhost("runc");
}

#[test]
fn joey_pod_containers_talk_over_localhost() {
    pod_localhost("joey");
}

/// A pod on an unknown runtime handler is refused with a CRI error naming the handler, and
/// nothing is left.
#[test]
fn unknown_runtime_handler_is_a_cri_error() {
    let c = CriContainerd::start();
    let cri = c.client();
    let logs = c.pod_log_dir("bad");
    let e = cri
        .run_pod(&pod_config("bad", "uid-bad", &logs), "no-such-handler")
        .expect_err("an unknown handler must be refused");
    assert!(e.to_string().contains("no-such-handler"), "{e}");
    assert!(e.code().is_some(), "not a CRI status: {e}");
    assert!(cri.list_pods().expect("ListPodSandbox").is_empty());
    c.assert_clean(&[]);
}

/// `joeyctl cri run-pod`, the user's entry: CMD's stdout and stderr on joeyctl's, its exit code
/// as joeyctl's, the pod removed after.
#[test]
fn joeyctl_cri_run_pod() {
    let c = CriContainerd::start();
    let o = std::process::Command::new(joey_tests::joeyctl_path())
        .args([
            "cri",
            "--address",
            c.var("CRI_ADDRESS"),
            "run-pod",
            "--runtime",
            "joey",
            "--image",
            BUSYBOX,
        ])
        .args(["--", "sh", "-c", "echo out; echo err >&2; exit 7"])
        .env_remove("CRI_ADDRESS")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run joeyctl cri");
    let o = joey_tests::wait_output(o, POD_TIMEOUT);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    assert_eq!(o.status.code(), Some(7));
    assert!(c.client().list_pods().expect("ListPodSandbox").is_empty());
    c.assert_clean(&[]);
}

/// ExecSync of `cmd` in container `id`, retried until it exits 0 (a server in another pod may
/// not listen yet); returns its stdout.
fn exec_until_ok(c: &CriContainerd, cri: &CriClient, id: &str, cmd: &[&str]) -> String {
    let mut last = String::new();
    let r = wait_for(
        &format!("{cmd:?} succeeds"),
        Duration::from_secs(60),
        Duration::from_millis(300),
        || {
            match cri.exec_sync(id, cmd, 30) {
                Ok(r) if r.exit_code == 0 => {
                    return Some(String::from_utf8_lossy(&r.stdout).into_owned())
                }
                Ok(r) => {
                    last = format!(
                        "exit {} stderr {:?}",
                        r.exit_code,
                        String::from_utf8_lossy(&r.stderr)
                    )
                }
                Err(e) => last = e.to_string(),
            }
            None
        },
    );
    r.unwrap_or_else(|e| panic!("{e}; last try: {last}\ncontainerd log:\n{}", c.log()))
}

/// `GET url` from container `id` (busybox wget, retried until it succeeds); the body.
fn fetch(c: &CriContainerd, cri: &CriClient, id: &str, url: &str) -> String {
    exec_until_ok(c, cri, id, &["timeout", "10", "wget", "-q", "-O", "-", url])
}

/// An HTTP server container answering `body` on port 8080.
fn web(body: &str) -> api::ContainerConfig {
    let script = format!("mkdir -p /tmp/www && echo {body} > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www");
    container_config("web", BUSYBOX, &["sh", "-c", &script])
}

/// The pod network through CNI on joey: PodSandboxStatus's IP is the guest's eth0 address; the
/// pod's DNS config is the containers' resolv.conf; a runc pod on the same bridge reaches the
/// joey pod by IP and back; a hostPort mapping (portmap) reaches the joey pod's server from
/// containerd's network namespace; StopPodSandbox + RemovePodSandbox leave no CNI state.
#[test]
fn joey_pod_network_through_cni() {
    let c = CriContainerd::start();
    let cri = c.client();
    let mut joey_cfg = pod_config("net-joey", "uid-net-joey", &c.pod_log_dir("net-joey"));
    joey_cfg.dns_config = Some(api::DnsConfig {
        servers: vec!["10.88.0.53".into()],
        searches: vec!["pods.test".into()],
        options: vec!["ndots:2".into()],
    });
    joey_cfg.port_mappings = vec![api::PortMapping {
        protocol: api::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: 30080,
        host_ip: String::new(),
    }];
    let joey = cri
        .run_pod(&joey_cfg, "joey")
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.log()));
    let joey_web = cri
        .create_container(&joey, &web("from-joey"), &joey_cfg)
        .expect("CreateContainer");
    cri.start_container(&joey_web).expect("StartContainer");
    let runc_cfg = pod_config("net-runc", "uid-net-runc", &c.pod_log_dir("net-runc"));
    let runc = cri.run_pod(&runc_cfg, "runc").expect("RunPodSandbox runc");
    let runc_web = cri
        .create_container(&runc, &web("from-runc"), &runc_cfg)
        .expect("CreateContainer runc");
    cri.start_container(&runc_web).expect("StartContainer runc");

    let ip_of = |pod: &str| {
        cri.pod_status(pod)
            .expect("PodSandboxStatus")
            .network
            .map(|n| n.ip)
            .unwrap_or_default()
    };
    let (joey_ip, runc_ip) = (ip_of(&joey), ip_of(&runc));
    assert!(joey_ip.starts_with("10.88.0."), "joey pod IP {joey_ip:?}");
    assert!(
        runc_ip.starts_with("10.88.0.") && runc_ip != joey_ip,
        "runc pod IP {runc_ip:?}"
    );
    let eth0 = exec_until_ok(
        &c,
        &cri,
        &joey_web,
        &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
    );
    assert!(
        eth0.contains(&format!(" inet {joey_ip}/24 ")),
        "the guest's eth0: {eth0}"
    );
    let resolv = exec_until_ok(&c, &cri, &joey_web, &["cat", "/etc/resolv.conf"]);
    for want in [
        "nameserver 10.88.0.53",
        "search pods.test",
        "options ndots:2",
    ] {
        assert!(
            resolv.lines().any(|l| l == want),
            "{want:?} not in resolv.conf:\n{resolv}"
        );
    }

    let (to_joey, to_runc) = (
        format!("http://{joey_ip}:8080/"),
        format!("http://{runc_ip}:8080/"),
    );
    assert_eq!(fetch(&c, &cri, &runc_web, &to_joey), "from-joey\n");
    assert_eq!(fetch(&c, &cri, &joey_web, &to_runc), "from-runc\n");

    // hostPort 30080 -> the joey pod's 8080, from containerd's netns (portmap's DNAT for local
    // traffic) to the bridge address.
    let mut last = String::new();
    let host = wait_for(
        "GET hostPort 30080",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let o = std::process::Command::new("timeout")
                .args([
                    "10",
                    "nsenter",
                    &format!("--net={}", c.var("CRI_NETNS")),
                    "busybox",
                    "wget",
                    "-q",
                    "-O",
                    "-",
                ])
                .arg("http://10.88.0.1:30080/")
                .output()
                .expect("run nsenter busybox wget");
            last = format!("{} {}", o.status, String::from_utf8_lossy(&o.stderr));
            o.status
                .success()
                .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
        },
    );
    assert_eq!(
        host.unwrap_or_else(|e| panic!("{e}: {last}")),
        "from-joey\n"
    );

    for pod in [&joey, &runc] {
        cri.stop_pod(pod).expect("StopPodSandbox");
        cri.remove_pod(pod).expect("RemovePodSandbox");
    }
    assert!(cri.list_pods().expect("ListPodSandbox").is_empty());
    c.assert_clean(&[&joey, &runc]);
}

/// ContainerStats / ListContainerStats report CPU and memory of a container that worked,
/// UpdateContainerResources changes its memory limit (read back from its cgroup), and an ExecSync
/// that outlives its timeout is an error, not a hang.
fn pod_stats_update_and_exec_timeout(handler: &str) {
    let c = CriContainerd::start();
    let cri = c.client();
    let busy = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo done; exec sleep 3600";
    let work = container_config("work", BUSYBOX, &["sh", "-c", busy]);
    let (pod, ids) = start_pod(&c, &cri, handler, "stats", std::slice::from_ref(&work));
    let logs = c.pod_log_dir("stats");
    wait_for(
        "the busy loop",
        POD_TIMEOUT,
        Duration::from_millis(200),
        || (read_logs(&logs, &work).stdout == "done\n").then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", read_logs(&logs, &work)));
    let s = cri.container_stats(&ids[0]).expect("ContainerStats");
    let cpu = s
        .cpu
        .and_then(|c| c.usage_core_nano_seconds)
        .map_or(0, |v| v.value);
    let mem = s
        .memory
        .and_then(|m| m.working_set_bytes)
        .map_or(0, |v| v.value);
    assert!(cpu > 0, "no CPU time reported");
    assert!(mem > 0, "no memory reported");
    let all = cri.list_container_stats(&pod).expect("ListContainerStats");
    let listed: Vec<_> = all
        .iter()
        .filter_map(|s| s.attributes.as_ref())
        .map(|a| a.id.as_str())
        .collect();
    assert_eq!(listed, vec![ids[0].as_str()]);

    let limit = 96 * 1024 * 1024;
    let res = api::LinuxContainerResources {
        memory_limit_in_bytes: limit,
        ..Default::default()
    };
    cri.update_resources(&ids[0], res)
        .expect("UpdateContainerResources");
    // cgroup v2 without a cgroup namespace (joey's guest: the group's path under the root), v2
    // with one, or runc's v1 memory controller on this hybrid host.
    let read = "p=$(sed -n 's/^0:://p' /proc/self/cgroup); for f in /sys/fs/cgroup$p/memory.max \
                /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do \
                [ -f $f ] && exec cat $f; done; exit 1";
    assert_eq!(
        exec_until_ok(&c, &cri, &ids[0], &["sh", "-c", read]),
        format!("{limit}\n")
    );

    let t0 = Instant::now();
    let e = cri
        .exec_sync(&ids[0], &["sleep", "60"], 2)
        .expect_err("ExecSync past its timeout");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "ExecSync returned after {:?}",
        t0.elapsed()
    );
    assert!(e.to_string().contains("timeout"), "{e}");
    remove_pod(&c, &cri, &pod);
}

#[test]
fn runc_pod_stats_update_and_exec_timeout() {
    pod_stats_update_and_exec_timeout("runc");
}

#[test]
fn joey_pod_stats_update_and_exec_timeout() {
    pod_stats_update_and_exec_timeout("joey");
}

/// Malformed requests get a CRI error naming the problem and leave nothing: a pod config without
/// metadata, a container of an image that is not there.
#[test]
fn joey_malformed_requests_are_cri_errors() {
    let c = CriContainerd::start();
    let cri = c.client();
    let logs = c.pod_log_dir("bad");
    let mut no_meta = pod_config("bad", "uid-bad", &logs);
    no_meta.metadata = None;
    let e = cri
        .run_pod(&no_meta, "joey")
        .expect_err("a pod without metadata");
    assert!(e.to_string().contains("metadata"), "{e}");
    let pod_cfg = pod_config("bad", "uid-bad", &logs);
    let pod = cri.run_pod(&pod_cfg, "joey").expect("RunPodSandbox");
    let missing = container_config("ghost", "docker.io/library/no-such-image:1", &["true"]);
    let e = cri
        .create_container(&pod, &missing, &pod_cfg)
        .expect_err("an image that is not there");
    assert!(e.to_string().contains("no-such-image"), "{e}");
    remove_pod(&c, &cri, &pod);
}
