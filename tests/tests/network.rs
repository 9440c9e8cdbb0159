//! The pod network carried into the microVM (issue 10), end to end: containerd's `ctr run
//! --with-ns network:<netns>` and `joeyctl run --netns` on real network namespaces made by the
//! test (veth pairs as CNI makes them, and Debian's CNI `bridge` + `host-local` plugins), the
//! Network actor's taps and tc redirects, joey's vhost-user virtio-net under QEMU-TCG, and the
//! agent's ConfigureNetwork. Every address lives inside namespaces the test creates.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use joey_tests::containerd::{sigkill, Containerd, IMAGE, RUNTIME, RUN_TIMEOUT};
use joey_tests::netns::{veth, NetNs};
use joey_tests::{builtin_host_support, processes_mentioning, stderr_of, wait_for, wait_output, Backend, Env};

/// How long the peer keeps trying to reach a server inside the VM (it boots under TCG).
const REACH_TIMEOUT: Duration = Duration::from_secs(150);

/// A pod netns as CNI leaves it, and a peer netns on the other end of its veths:
/// - `eth0` 10.201.1.2/24, MTU 1400, default route via the peer's 10.201.1.1;
/// - `eth1` 10.201.2.2/24 and fd00:201:2::2/64, MTU 9000, a route to 10.201.99.0/24 via the
///   peer's 10.201.2.1.
struct PodNet {
    pod: NetNs,
    peer: NetNs,
}

impl PodNet {
    fn new() -> PodNet {
        let pod = NetNs::new("jnet-pod");
        let peer = NetNs::new("jnet-peer");
        veth(&pod, "eth0", &peer, "p0");
        veth(&pod, "eth1", &peer, "p1");
        for (ns, dev, mtu, addrs) in [
            (&pod, "eth0", "1400", &["10.201.1.2/24"][..]),
            (&pod, "eth1", "9000", &["10.201.2.2/24", "fd00:201:2::2/64"][..]),
            (&peer, "p0", "1400", &["10.201.1.1/24"][..]),
            (&peer, "p1", "9000", &["10.201.2.1/24", "fd00:201:2::1/64"][..]),
        ] {
            ns.ip(&["link", "set", dev, "mtu", mtu]);
            for a in addrs {
                ns.ip(&["addr", "add", a, "dev", dev, "nodad"]);
            }
            ns.ip(&["link", "set", dev, "up"]);
        }
        pod.ip(&["route", "add", "default", "via", "10.201.1.1"]);
        pod.ip(&["route", "add", "10.201.99.0/24", "via", "10.201.2.1", "dev", "eth1"]);
        PodNet { pod, peer }
    }

    /// Only what the test made is left in the pod netns: no tap, no ingress qdisc.
    fn assert_untouched(&self) {
        let links = wait_for(
            "the pod netns back to lo, eth0, eth1",
            Duration::from_secs(15),
            Duration::from_millis(100),
            || {
                let l = self.pod.links();
                (l == ["eth0", "eth1", "lo"]).then_some(l)
            },
        );
        assert!(links.is_ok(), "{}: links {:?}", self.pod.name, self.pod.links());
        let q = self.pod.qdiscs();
        assert!(!q.contains("ingress"), "ingress qdisc left in {}:\n{q}", self.pod.name);
    }
}

/// A TCP server in `ns` on `addr`: each connection sends one line, gets "ack <line>" back.
/// Returns the lines received, once `n` connections were served (or the deadline passed).
fn serve_lines(ns: &NetNs, addr: &str, n: usize) -> std::thread::JoinHandle<Vec<String>> {
    let l: TcpListener = ns.listen(addr);
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + RUN_TIMEOUT;
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < deadline {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut line = String::new();
                    let mut r = BufReader::new(&s);
                    if r.read_line(&mut line).is_ok() {
                        let line = line.trim_end().to_string();
                        let _ = (&s).write_all(format!("ack {line}\n").as_bytes());
                        got.push(line);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        got
    })
}

/// From the peer: connects to a server in the VM, sends `line`, returns what comes back.
fn send_line(ns: &NetNs, addr: &str, line: &str) -> String {
    let mut s = ns
        .connect(addr, REACH_TIMEOUT)
        .unwrap_or_else(|e| panic!("peer -> VM: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = String::new();
    let _ = s.read_to_string(&mut back);
    back
}

/// What the guest reports about its network, then traffic both ways on both interfaces:
/// the container connects to the peer's servers, then serves twice on port 7777 (echoing
/// what it got) for the peer to reach it through eth0, then eth1.
const GUEST_SCRIPT: &str = r#"
for i in eth0 eth1; do echo "$i $(cat /sys/class/net/$i/address) $(cat /sys/class/net/$i/mtu)"; done
ip -o addr show | awk '$2 != "lo" {print "addr", $2, $4}' | grep -v ' fe80:'
ip route | sed 's/ *$//' | sed 's/^/route /'
ping -c 1 -W 10 10.201.1.1 >/dev/null && echo ping-eth0 ok
ping -c 1 -W 10 10.201.2.1 >/dev/null && echo ping-eth1 ok
ping -6 -c 1 -W 10 fd00:201:2::1 >/dev/null && echo ping6-eth1 ok
echo c2p-eth0 | nc 10.201.1.1 7000
echo c2p-eth1 | nc 10.201.2.1 7000
echo c2p-route | nc 10.201.99.1 7000
echo "p2c: $(echo served | nc -l -p 7777)"
echo "p2c: $(echo served | nc -l -p 7777)"
"#;

/// The lines of GUEST_SCRIPT's output for the pod of [`PodNet`] (`mac0`, `mac1`: its MACs).
fn expected_guest_lines(mac0: &str, mac1: &str) -> Vec<String> {
    [
        format!("eth0 {mac0} 1400"),
        format!("eth1 {mac1} 9000"),
        "addr eth0 10.201.1.2/24".into(),
        "addr eth1 10.201.2.2/24".into(),
        "addr eth1 fd00:201:2::2/64".into(),
        "route default via 10.201.1.1 dev eth0".into(),
        "route 10.201.1.0/24 dev eth0 scope link  src 10.201.1.2".into(),
        "route 10.201.2.0/24 dev eth1 scope link  src 10.201.2.2".into(),
        "route 10.201.99.0/24 via 10.201.2.1 dev eth1".into(),
        "ping-eth0 ok".into(),
        "ping-eth1 ok".into(),
        "ping6-eth1 ok".into(),
        "ack c2p-eth0".into(),
        "ack c2p-eth1".into(),
        "ack c2p-route".into(),
        "p2c: p2c-eth0".into(),
        "p2c: p2c-eth1".into(),
    ]
    .into()
}

/// Runs the traffic of GUEST_SCRIPT against `net` while `run` (the container or VM) executes
/// it; checks the run's output and what the peer saw.
fn exercise(net: &PodNet, run: impl FnOnce() -> Output + Send + 'static) {
    // 10.201.99.1 is behind the peer's p1 (the pod's eth1 route).
    net.peer.ip(&["addr", "add", "10.201.99.1/32", "dev", "lo"]);
    let server = serve_lines(&net.peer, "0.0.0.0:7000", 3);
    let runner = std::thread::spawn(run);
    let back0 = send_line(&net.peer, "10.201.1.2:7777", "p2c-eth0");
    let back1 = send_line(&net.peer, "10.201.2.2:7777", "p2c-eth1");
    let o = runner.join().expect("runner");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{out}\nstderr:\n{}",
        o.status,
        stderr_of(&o)
    );
    let lines: Vec<&str> = out.lines().collect();
    let want = expected_guest_lines(&net.pod.mac("eth0"), &net.pod.mac("eth1"));
    assert_eq!(lines, want, "guest output:\n{out}");
    assert_eq!((back0.as_str(), back1.as_str()), ("served\n", "served\n"));
    assert_eq!(server.join().unwrap(), ["c2p-eth0", "c2p-eth1", "c2p-route"]);
}

/// `ctr run <mode> --runtime joey --with-ns network:<netns> IMAGE id argv...` (`mode`: `--rm`
/// or `-d`).
fn ctr_run_in(c: &Containerd, mode: &str, netns: &NetNs, id: &str, argv: &[&str]) -> Command {
    let ns = format!("network:{}", netns.path().display());
    let mut args = vec!["run", mode, "--runtime", RUNTIME, "--with-ns", &ns, IMAGE, id];
    args.extend_from_slice(argv);
    c.ctr(&args)
}

/// `joeyctl run --netns <netns> -- sh -c GUEST_SCRIPT` in `env`, its output piped.
fn spawn_guest_script(env: &Env, netns: &NetNs) -> Child {
    let mut cmd = env.command(&["--netns", netns.path().to_str().unwrap()], &["sh", "-c", GUEST_SCRIPT]);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().expect("joeyctl run")
}

#[test]
fn ctr_run_with_the_pod_netns_has_its_network_both_ways() {
    let c = Containerd::start();
    c.import_busybox();
    let net = PodNet::new();
    let child = ctr_run_in(&c, "--rm", &net.pod, "net1", &["sh", "-c", GUEST_SCRIPT])
        .spawn()
        .expect("ctr run");
    exercise(&net, move || wait_output(child, RUN_TIMEOUT));
    c.assert_clean(&["net1"]);
    net.assert_untouched();
}

#[test]
fn joeyctl_run_with_netns_has_the_network() {
    let env = Env::new();
    let net = PodNet::new();
    let child = spawn_guest_script(&env, &net.pod);
    exercise(&net, move || wait_output(child, RUN_TIMEOUT));
    env.assert_no_leaks();
    net.assert_untouched();
}

/// The same on the built-in VMM (its in-process virtio-net) where the host's KVM runs Linux
/// guests (the nested test host here: scripts/nested-builtin-tests.sh); elsewhere joey must
/// refuse the backend before it touches the pod netns.
#[test]
fn builtin_vmm_carries_the_pod_network() {
    let env = Env::with_backend(Backend::Builtin);
    let net = PodNet::new();
    let netns = net.pod.path().to_str().unwrap().to_string();
    match builtin_host_support() {
        Ok(why) => {
            eprintln!("builtin network: running ({why})");
            let child = spawn_guest_script(&env, &net.pod);
            exercise(&net, move || wait_output(child, RUN_TIMEOUT));
        }
        Err(reason) => {
            println!("builtin network not run: {reason}");
            let o = env.run_with(&["--netns", &netns], &["true"], None);
            assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
            assert!(stderr_of(&o).contains(&reason), "{}", stderr_of(&o));
        }
    }
    env.assert_no_leaks();
    net.assert_untouched();
}

#[test]
fn joeyctl_refuses_its_own_netns_and_a_missing_one() {
    let env = Env::new();
    let o = env.run_with(&["--netns", "/proc/self/ns/net"], &["true"], None);
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    let err = stderr_of(&o);
    assert!(
        err.contains("/proc/self/ns/net: is joey's own (host) network namespace, refused"),
        "{err}"
    );
    let o = env.run_with(&["--netns", "/var/run/netns/joey-no-such-netns"], &["true"], None);
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("network namespace /var/run/netns/joey-no-such-netns: cannot open"),
        "{}",
        stderr_of(&o)
    );
    env.assert_no_leaks();
}

/// A pod whose second interface cannot be plumbed (a tap refuses eth1's MTU of 65535): the
/// start fails naming the interface and the step, after the first interface was plumbed; what
/// was made is unwound, nothing is left in the pod netns or on the host.
#[test]
fn a_failure_at_the_second_interface_fails_the_start_and_unwinds() {
    let env = Env::new();
    let net = PodNet::new();
    net.pod.ip(&["link", "set", "eth1", "mtu", "65535"]);
    let o = env.run_with(&["--netns", net.pod.path().to_str().unwrap()], &["true"], None);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains(&format!(
            "joeyctl: error: network namespace {}: interface tap1_joey: set mtu and up failed",
            net.pod.path().display()
        )),
        "{err}"
    );
    env.assert_no_leaks();
    net.assert_untouched();
}

/// The VM's network comes from Debian's CNI plugins (`bridge` + `host-local`), run as containerd's
/// CRI plugin would, with the bridge in a "host" netns of the test's own.
#[test]
fn cni_bridge_network_reaches_the_container() {
    const PLUGINS: &str = "/usr/lib/cni";
    assert!(
        std::path::Path::new(PLUGINS).join("bridge").exists(),
        "{PLUGINS}/bridge missing: apt-get install containernetworking-plugins (scripts/deps.sh)"
    );
    let c = Containerd::start();
    c.import_busybox();
    let host = NetNs::new("jcni-host");
    let pod = NetNs::new("jcni-pod");
    let ipam_dir = c.dir.path().join("cni-ipam");
    let conf = format!(
        r#"{{"cniVersion": "1.0.0", "name": "joeytest", "type": "bridge", "bridge": "jcni0",
            "isGateway": true, "ipMasq": false, "mtu": 1450,
            "ipam": {{"type": "host-local", "dataDir": "{}",
                      "ranges": [[{{"subnet": "10.202.0.0/24"}}]],
                      "routes": [{{"dst": "0.0.0.0/0"}}]}}}}"#,
        ipam_dir.display()
    );
    let cni = |command: &str| -> String {
        let mut p = Command::new("nsenter")
            .arg(format!("--net={}", host.path().display()))
            .arg(format!("{PLUGINS}/bridge"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "jcni")
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", PLUGINS)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the bridge plugin");
        p.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
        let o = wait_output(p, Duration::from_secs(30));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "CNI {command}: {out}{}", stderr_of(&o));
        out
    };
    let result = cni("ADD");
    assert!(result.contains("\"10.202.0.2/24\""), "CNI result: {result}");
    let mac = pod.mac("eth0");

    let server = serve_lines(&host, "10.202.0.1:7000", 1);
    let script = "echo \"eth0 $(cat /sys/class/net/eth0/address) $(cat /sys/class/net/eth0/mtu)\"; \
                  ip route | sed 's/ *$//'; echo c2h | nc 10.202.0.1 7000; echo \"h2c: $(echo served | nc -l -p 7777)\"";
    let child = ctr_run_in(&c, "--rm", &pod, "cni1", &["sh", "-c", script])
        .spawn()
        .expect("ctr run");
    let back = send_line(&host, "10.202.0.2:7777", "h2c");
    let o = wait_output(child, RUN_TIMEOUT);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "stdout:\n{out}\nstderr:\n{}\n{}",
        stderr_of(&o),
        c.log()
    );
    assert_eq!(
        out,
        format!(
            "eth0 {mac} 1450\ndefault via 10.202.0.1 dev eth0\n10.202.0.0/24 dev eth0 scope link  src 10.202.0.2\nack c2h\nh2c: h2c\n"
        )
    );
    assert_eq!(back, "served\n");
    assert_eq!(server.join().unwrap(), ["c2h"]);
    c.assert_clean(&["cni1"]);
    assert_eq!(pod.links(), ["eth0", "lo"]);
    assert!(!pod.qdiscs().contains("ingress"), "{}", pod.qdiscs());
    cni("DEL");
    assert_eq!(pod.links(), ["lo"]);
}

/// A shim SIGKILLed while its pod runs: containerd's `delete` removes the ingress qdiscs its
/// redirect left on the pod's interfaces (the taps went with the shim's fds and QEMU).
#[test]
fn killed_shim_leaves_nothing_in_the_pod_netns() {
    let c = Containerd::start();
    c.import_busybox();
    let net = PodNet::new();
    let o = wait_output(
        ctr_run_in(&c, "-d", &net.pod, "netk", &["sleep", "300"])
            .spawn()
            .expect("ctr run -d"),
        RUN_TIMEOUT,
    );
    assert!(o.status.success(), "ctr run -d: {}\n{}", stderr_of(&o), c.log());
    c.wait_task_status("netk", "RUNNING", RUN_TIMEOUT);
    // Plumbed while it runs.
    assert_eq!(net.pod.links(), ["eth0", "eth1", "lo", "tap0_joey", "tap1_joey"]);
    assert!(net.pod.qdiscs().contains("ingress"), "{}", net.pod.qdiscs());
    let d = c.dir.path().display().to_string();
    let shims: Vec<i32> = processes_mentioning(&d)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("containerd-shim-joey-v2") && cmd.contains(" -id netk"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(shims.len(), 1, "shim of netk: {:?}", processes_mentioning(&d));
    sigkill(shims[0]);
    let gone = wait_for(
        "netk no longer RUNNING",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || (c.task_status("netk").as_deref() != Some("RUNNING")).then_some(()),
    );
    assert!(gone.is_ok(), "{gone:?}");
    c.ctr_out(&["task", "delete", "--force", "netk"]);
    let o = c.ctr_out(&["container", "rm", "netk"]);
    assert!(o.status.success(), "ctr container rm: {}", stderr_of(&o));
    c.assert_clean(&["netk"]);
    net.assert_untouched();
}
