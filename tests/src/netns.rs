//! Network namespaces made by a test (and only those: every address a network test uses lives
//! inside them): `ip netns add` on creation, `ip netns del` on drop (which also deletes the veth
//! ends inside), plus a thread that entered a namespace for sockets the test opens there.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `ip ARGS`, panicking with its stderr if it fails; returns its stdout.
pub fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// Runs `tc ARGS` like [`ip`].
pub fn tc(args: &[&str]) -> String {
    run("tc", args)
}

fn run(bin: &str, args: &[&str]) -> String {
    let o = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{bin} (apt-get install iproute2): {e}"));
    assert!(
        o.status.success(),
        "{bin} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A named network namespace (`/var/run/netns/<name>`), deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// `ip netns add <prefix>-<pid>-<n>`: unique across the tests of this process and others.
    pub fn new(prefix: &str) -> NetNs {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n <name> ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// The names of the namespace's links, sorted.
    pub fn links(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect();
        names.sort();
        names
    }

    /// `tc qdisc show` in the namespace.
    pub fn qdiscs(&self) -> String {
        tc(&["-n", &self.name, "qdisc", "show"])
    }

    /// The MAC of `dev`.
    pub fn mac(&self, dev: &str) -> String {
        let out = self.ip(&["-o", "link", "show", "dev", dev]);
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC for {dev} in {}: {out}", self.name))
            .to_string()
    }

    /// Runs `f` on a thread that entered this namespace (sockets it opens stay in it).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: setns(2) on a valid netns fd changes only this short-lived thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in netns")
    }

    /// A TCP listener on `addr` inside the namespace.
    pub fn listen(&self, addr: &str) -> TcpListener {
        let addr: SocketAddr = addr.parse().expect("listen address");
        self.enter(move || TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")))
    }

    /// Connects from inside the namespace to `addr`, retrying refused connections until
    /// `timeout` (the server in a VM may not listen yet).
    pub fn connect(&self, addr: &str, timeout: Duration) -> Result<TcpStream, String> {
        let addr: SocketAddr = addr.parse().expect("connect address");
        self.enter(move || {
            let t0 = Instant::now();
            loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(s) => return Ok(s),
                    Err(e) if t0.elapsed() >= timeout => return Err(format!("connect {addr}: {e}")),
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A veth pair from `a` (named `a_if`) to `b` (named `b_if`).
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    // Each end is created inside its namespace: its name only has to be free there.
    ip(&[
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
}
