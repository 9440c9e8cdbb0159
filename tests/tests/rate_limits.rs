//! Device rate limits (issue 14) end to end: a sandbox whose `[hypervisor.rate_limits.net]`
//! limits both directions of its virtio-net (joey's vhost-user device under QEMU-TCG) moves
//! TCP data to and from a peer network namespace at the limit, within 10%, whatever the guest
//! tries. Every address lives inside namespaces the test creates.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use joey_tests::containerd::RUN_TIMEOUT;
use joey_tests::netns::{veth, NetNs};
use joey_tests::{get_unix, stderr_of, value, wait_output, Env};

/// The limit, each way, in Ethernet frame bytes per second.
const LIMIT: u64 = 512 * 1024;
/// Bytes moved each way: about 4 s at the limit.
const BYTES: usize = 2 * 1024 * 1024;
/// TCP payload per frame at MTU 1500 with timestamps: 1448 of 1514 bytes.
const PAYLOAD_SHARE: f64 = 1448.0 / 1514.0;
/// How long the peer keeps trying to reach the server inside the VM (it boots under TCG).
const REACH_TIMEOUT: Duration = Duration::from_secs(150);

/// The guest sends BYTES to the peer, then receives BYTES from it and reports how many it got
/// on a new connection (its `nc` half-closes at once, its stdin being empty: the end of the
/// peer's connection says nothing).
const GUEST_SCRIPT: &str = r#"
dd if=/dev/zero bs=65536 count=32 2>/dev/null | nc 10.202.1.1 7000
n=$(nc -l -p 7777 | wc -c)
echo $n | nc 10.202.1.1 7001
echo received $n
"#;

/// Reads a connection until its end or `max` bytes; returns the bytes and the time taken.
fn drain(s: &mut std::net::TcpStream, max: usize) -> (usize, Duration) {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t0 = Instant::now();
    let mut buf = vec![0u8; 65536];
    let mut n = 0;
    while n < max {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => panic!("peer read after {n} bytes: {e}"),
        }
    }
    (n, t0.elapsed())
}

/// Payload bytes/s of `bytes` in `t`, as a share of the frame limit's payload rate.
fn share_of_limit(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / (LIMIT as f64 * PAYLOAD_SHARE)
}

#[test]
fn limited_sandbox_moves_data_at_its_limit() {
    let env = Env::with_config(|k, i| {
        format!(
            "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\n\
             [hypervisor.rate_limits.net.rx]\nbandwidth_bytes_per_s = {LIMIT}\n\
             [hypervisor.rate_limits.net.tx]\nbandwidth_bytes_per_s = {LIMIT}\n",
            k.display(),
            i.display()
        )
    });
    let pod = NetNs::new("jrl-pod");
    let peer = NetNs::new("jrl-peer");
    veth(&pod, "eth0", &peer, "p0");
    pod.ip(&["addr", "add", "10.202.1.2/24", "dev", "eth0", "nodad"]);
    peer.ip(&["addr", "add", "10.202.1.1/24", "dev", "p0", "nodad"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    peer.ip(&["link", "set", "p0", "up"]);

    let l: TcpListener = peer.listen("0.0.0.0:7000");
    let report: TcpListener = peer.listen("0.0.0.0:7001");
    let mut cmd = env.command(
        &["--netns", pod.path().to_str().unwrap()],
        &["sh", "-c", GUEST_SCRIPT],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("joeyctl run");
    let runner = std::thread::spawn(move || wait_output(child, RUN_TIMEOUT));

    // Accepts the guest's next connection on `l` while the run lasts (the VM boots first).
    let accept = |l: &TcpListener, runner: &std::thread::JoinHandle<_>| {
        l.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + REACH_TIMEOUT;
        loop {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    return Some(s);
                }
                Err(_) if Instant::now() < deadline && !runner.is_finished() => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => return None,
            }
        }
    };
    let fail = |runner: std::thread::JoinHandle<std::process::Output>, what: &str| -> ! {
        let o = runner.join().unwrap();
        panic!(
            "no {what} from the guest; stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&o.stdout),
            stderr_of(&o)
        );
    };

    // guest -> peer (tx): from accept to the last byte.
    let Some(mut conn) = accept(&l, &runner) else {
        fail(runner, "connection")
    };
    let (tx_bytes, tx_time) = drain(&mut conn, BYTES);
    drop(conn);

    // peer -> guest (rx): from connect to the guest closing, once it has read everything.
    let mut s = peer
        .connect("10.202.1.2:7777", REACH_TIMEOUT)
        .unwrap_or_else(|e| panic!("peer -> VM: {e}"));
    let t0 = Instant::now();
    s.write_all(&vec![0u8; BYTES]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    // The guest got everything once it reports back.
    let Some(mut r) = accept(&report, &runner) else {
        fail(runner, "report")
    };
    let rx_time = t0.elapsed();
    let mut got = String::new();
    r.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    r.read_to_string(&mut got).unwrap();
    // The guest's `nc`s wait for the peer to close.
    drop((r, s));

    let o = runner.join().expect("runner");
    let want = format!("received {BYTES}\n");
    let got_out = String::from_utf8_lossy(&o.stdout);
    let err = stderr_of(&o);
    assert_eq!(
        (o.status.code(), got_out.as_ref()),
        (Some(0), want.as_str()),
        "{err}"
    );
    assert_eq!((tx_bytes, got.trim()), (BYTES, BYTES.to_string().as_str()));
    let (tx, rx) = (
        share_of_limit(tx_bytes, tx_time),
        share_of_limit(BYTES, rx_time),
    );
    println!("rate limit {LIMIT} B/s: guest->peer {tx_time:?} ({tx:.3} of the limit), peer->guest {rx_time:?} ({rx:.3})");
    for (dir, share) in [("guest -> peer", tx), ("peer -> guest", rx)] {
        assert!(
            (0.9..=1.1).contains(&share),
            "{dir}: {share:.3} of the limit"
        );
    }
    env.assert_no_leaks();
}

/// The vsock limit of the guest → host direction, in payload bytes per second.
const VSOCK_LIMIT: u64 = 512 * 1024;
/// Bytes a container writes to its stdout: about 4 s at the limit.
const VSOCK_BYTES: usize = 2 * 1024 * 1024;

/// A sandbox whose `[hypervisor.rate_limits.vsock.tx]` limits the guest → host direction of its
/// vsock streams a container's stdout (the agent's `ReadStdout` replies over the vsock) at the
/// limit, within 10%: from the first chunk the host sees to the end of the output. The
/// sandbox's metrics endpoint then counts the tx limiter's throttled events (rx: none).
#[test]
fn vsock_limited_sandbox_streams_output_at_its_limit() {
    let env = Env::with_config(|k, i| {
        format!(
            "[hypervisor]\nkernel = \"{}\"\ninitrd = \"{}\"\n\
             [hypervisor.rate_limits.vsock.tx]\nbandwidth_bytes_per_s = {VSOCK_LIMIT}\n",
            k.display(),
            i.display()
        )
    });
    // The sandbox stays a little while after the output, for the metrics scrape.
    let script = format!(
        "dd if=/dev/zero bs=65536 count={} 2>/dev/null; sleep 3",
        VSOCK_BYTES / 65536
    );
    let mut cmd = env.command(&[], &["sh", "-c", &script]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("joeyctl run");
    let mut out = child.stdout.take().unwrap();
    let runner = std::thread::spawn(move || wait_output(child, RUN_TIMEOUT));
    // (bytes of the first read, when it came, total bytes, when the output ended)
    let mut buf = vec![0u8; 65536];
    let mut first: Option<(usize, Instant)> = None;
    let mut total = 0usize;
    while total < VSOCK_BYTES {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                first.get_or_insert((n, Instant::now()));
                total += n;
            }
            Err(e) => panic!("joeyctl stdout after {total} bytes: {e}"),
        }
    }
    let end = Instant::now();
    // The sandbox's metrics endpoint (`<state_dir>/<id>/metrics.sock`) while it sleeps.
    let sock = std::fs::read_dir(&env.state_dir)
        .expect("state dir")
        .map(|e| e.unwrap().path().join("metrics.sock"))
        .find(|p| p.exists());
    let scraped = sock.map(|s| get_unix(&s, "/metrics", Duration::from_secs(5)));
    let rest = out.read_to_end(&mut buf).expect("joeyctl stdout");
    let o = runner.join().expect("runner");
    assert_eq!(rest, 0, "more output than written");
    assert_eq!((o.status.code(), total), (Some(0), VSOCK_BYTES), "{}", stderr_of(&o));
    let (first_len, t0) = first.unwrap();
    let t = end - t0;
    let share = (total - first_len) as f64 / t.as_secs_f64() / VSOCK_LIMIT as f64;
    println!(
        "vsock rate limit {VSOCK_LIMIT} B/s: {total} bytes in {t:?} after a first chunk of \
         {first_len} ({share:.3} of the limit)"
    );
    assert!((0.9..=1.1).contains(&share), "{share:.3} of the limit");
    let (status, text) = scraped.expect("no metrics.sock while the sandbox ran");
    assert_eq!(status, 200, "{text}");
    let throttled = |dir: &str| {
        let labels = ["device=\"vsock\"", &format!("direction=\"{dir}\"")];
        value(&text, "joey_hypervisor_device_rate_limiter_throttled_total", &labels)
    };
    let tx = throttled("from_guest").unwrap_or(0.0);
    println!("vsock tx limiter throttled {tx} times");
    assert!(tx > 0.0, "{text}");
    assert_eq!(throttled("to_guest"), Some(0.0), "{text}");
    env.assert_no_leaks();
}
