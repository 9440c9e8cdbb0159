//! Netlink work inside the pod's network namespace: the thread that enters it, bounded netlink
//! requests, and the plumbing of one interface (tap + ingress qdiscs + mirred redirect filters,
//! Kata's tcfilter model) with its undo.
//!
//! A netlink socket belongs to the namespace of the thread that creates it, and so does a tap:
//! every piece of work runs on a fresh thread that `setns`-ed into the pod netns and drives a
//! current-thread tokio runtime ([`Netns::run`]); the caller (a blocking-pool thread) waits for it
//! with a bound. Every netlink request inside is bounded too ([`OP_TIMEOUT`]).

use std::fs::File;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, TryStreamExt};
use joey_vmm_core::devices::net::Tap;
use rtnetlink::{Handle, LinkUnspec};

use super::{InterfaceInfo, NetworkError};

/// Bound of one netlink request (or dump).
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of the plumbing steps of one interface (six requests and a tap); its undo, when it
/// fails, takes at most five more requests.
pub const PLUMB_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound of one piece of work in the netns as the caller waits for it: longer than any piece of
/// work takes (a scan: five dumps; a plumbing: [`PLUMB_TIMEOUT`] and its undo; a teardown: five
/// requests), so that the thread always answers, with its own typed error at worst.
pub const NETNS_TIMEOUT: Duration = Duration::from_secs(60);
/// The network namespace of joey's own process.
const OWN_NETNS: &str = "/proc/self/ns/net";
/// The ingress qdisc's handle (`ffff:`), also the parent of the filters attached to it.
pub const INGRESS_HANDLE: u32 = 0xffff_0000;

/// A netlink connection inside the pod netns (only valid on the thread of [`Netns::run`]).
pub struct Netlink {
    pub(crate) handle: Handle,
    pub(crate) netns: PathBuf,
}

impl Netlink {
    /// Runs one request, bounded by [`OP_TIMEOUT`]; errors name the netns, the interface and
    /// the operation.
    pub async fn run<T>(
        &self,
        interface: &str,
        op: &'static str,
        request: impl Future<Output = Result<T, rtnetlink::Error>>,
    ) -> Result<T, NetworkError> {
        match tokio::time::timeout(OP_TIMEOUT, request).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(NetworkError::Netlink {
                netns: self.netns.clone(),
                interface: interface.to_string(),
                op,
                source: Box::new(source),
            }),
            Err(_) => Err(NetworkError::Timeout {
                netns: self.netns.clone(),
                what: format!("{op} ({interface})"),
                timeout: OP_TIMEOUT,
            }),
        }
    }

    /// Collects a dump, bounded by [`OP_TIMEOUT`].
    pub async fn dump<T>(
        &self,
        op: &'static str,
        stream: impl Stream<Item = Result<T, rtnetlink::Error>>,
    ) -> Result<Vec<T>, NetworkError> {
        self.run("*", op, stream.try_collect::<Vec<T>>()).await
    }

    /// The index of the link `name`.
    pub async fn link_index(&self, name: &str) -> Result<u32, NetworkError> {
        let links = self
            .dump(
                "get link",
                self.handle
                    .link()
                    .get()
                    .match_name(name.to_string())
                    .execute(),
            )
            .await?;
        links
            .first()
            .map(|l| l.header.index)
            .ok_or_else(|| NetworkError::Missing {
                netns: self.netns.clone(),
                interface: name.to_string(),
            })
    }
}

/// An open network namespace: the fd keeps it (and joey's access to it) alive even after its
/// path is unmounted (containerd removes a pod's netns before the sandbox stops); the path is
/// kept for messages.
#[derive(Debug, Clone)]
pub struct Netns {
    file: Arc<File>,
    path: PathBuf,
}

impl Netns {
    /// Opens the netns at `path`; joey's own netns is refused ([`NetworkError::OwnNetns`]).
    pub fn open(path: &Path) -> Result<Netns, NetworkError> {
        let file = File::open(path).map_err(|source| NetworkError::NetnsOpen {
            netns: path.to_path_buf(),
            source,
        })?;
        refuse_own_netns(&file, path)?;
        Ok(Netns {
            file: Arc::new(file),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on a fresh thread that entered this namespace, with a netlink connection
    /// made there; waits at most [`NETNS_TIMEOUT`] for its result. Blocking: call it from the
    /// blocking pool or a thread of its own.
    pub fn run<T, F, Fut>(&self, what: &str, work: F) -> Result<T, NetworkError>
    where
        T: Send + 'static,
        F: FnOnce(Netlink) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, NetworkError>>,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let ns = self.clone();
        std::thread::Builder::new()
            .name("joey-netns".into())
            .spawn(move || {
                let _ = tx.send(enter_and_run(ns, work));
            })
            .map_err(|source| NetworkError::Thread {
                netns: self.path.clone(),
                source,
            })?;
        match rx.recv_timeout(NETNS_TIMEOUT) {
            Ok(r) => r,
            Err(_) => Err(NetworkError::Timeout {
                netns: self.path.clone(),
                what: what.to_string(),
                timeout: NETNS_TIMEOUT,
            }),
        }
    }
}

/// Opens the netns at `path` and runs `work` in it (see [`Netns::run`]).
pub fn in_netns<T, F, Fut>(path: &Path, what: &str, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    Netns::open(path)?.run(what, work)
}

/// Refuses the namespace joey itself runs in (the host's, normally): plumbing its interfaces
/// would redirect the host's traffic into a VM. A pod on the host network has no netns path.
fn refuse_own_netns(ns: &File, netns: &Path) -> Result<(), NetworkError> {
    use std::os::unix::fs::MetadataExt;
    let open_err = |source| NetworkError::NetnsOpen {
        netns: netns.to_path_buf(),
        source,
    };
    let theirs = ns.metadata().map_err(open_err)?;
    let ours = std::fs::metadata(OWN_NETNS).map_err(open_err)?;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Err(NetworkError::OwnNetns {
            netns: netns.to_path_buf(),
        });
    }
    Ok(())
}

/// The body of the thread of [`Netns::run`].
fn enter_and_run<T, F, Fut>(ns: Netns, work: F) -> Result<T, NetworkError>
where
    F: FnOnce(Netlink) -> Fut,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let netns = ns.path;
    // SAFETY: setns(2) with a namespace fd we own (kept open by the Arc for the call); it
    // changes only this thread's network namespace, and this thread ends when the work is done.
    if unsafe { libc::setns(ns.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetworkError::NetnsEnter {
            netns,
            source: std::io::Error::last_os_error(),
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| NetworkError::Thread {
            netns: netns.clone(),
            source,
        })?;
    rt.block_on(async move {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetworkError::Connection {
                netns: netns.clone(),
                source,
            })?;
        tokio::spawn(conn);
        work(Netlink { handle, netns }).await
    })
}

/// The steps of the plumbing of one interface, in order (a fail point names one, see
/// [`super::FailPoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupStep {
    /// The tap is created (`/dev/net/tun`, inside the netns).
    Tap,
    /// The tap has the interface's MTU and is up.
    TapUp,
    /// The interface has an ingress qdisc.
    InterfaceQdisc,
    /// The tap has an ingress qdisc.
    TapQdisc,
    /// The interface's ingress redirects to the tap.
    InterfaceFilter,
    /// The tap's ingress redirects to the interface.
    TapFilter,
}

impl SetupStep {
    /// Every step, in order.
    pub const ALL: [SetupStep; 6] = [
        SetupStep::Tap,
        SetupStep::TapUp,
        SetupStep::InterfaceQdisc,
        SetupStep::TapQdisc,
        SetupStep::InterfaceFilter,
        SetupStep::TapFilter,
    ];

    /// The step's name in a failpoint argument (`tap_qdisc`, ...).
    pub fn name(self) -> &'static str {
        match self {
            SetupStep::Tap => "tap",
            SetupStep::TapUp => "tap_up",
            SetupStep::InterfaceQdisc => "interface_qdisc",
            SetupStep::TapQdisc => "tap_qdisc",
            SetupStep::InterfaceFilter => "interface_filter",
            SetupStep::TapFilter => "tap_filter",
        }
    }
}

/// One thing made in the netns, with what undoes it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Made {
    /// The tap link (deleted; the fd, wherever it is, is then detached).
    Tap { name: String, index: u32 },
    /// An ingress qdisc on a link.
    Qdisc { dev: String, index: u32 },
    /// The filters under a link's ingress qdisc.
    Filter { dev: String, index: u32 },
}

/// What the plumbing of one interface made, in order; undone in reverse by [`unplumb`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plumbing {
    made: Vec<Made>,
}

/// Plumbs one interface: its tap (MTU, up), an ingress qdisc on both, and a u32 match-all
/// filter with a mirred egress redirect each way. On error, what was made is undone before the
/// error is returned. `fail_after` (tests) fails right after that step.
pub async fn plumb(
    nl: &Netlink,
    iface: &InterfaceInfo,
    fail_after: Option<SetupStep>,
) -> Result<(Tap, Plumbing), NetworkError> {
    let mut p = Plumbing::default();
    // On timeout the steps' future is dropped (a tap not yet recorded closes with it) and what
    // it recorded is undone like after any failure.
    let steps = tokio::time::timeout(PLUMB_TIMEOUT, plumb_steps(nl, iface, fail_after, &mut p));
    let r = steps.await.unwrap_or_else(|_| {
        Err(NetworkError::Timeout {
            netns: nl.netns.clone(),
            what: format!("plumbing {} to {}", iface.name, iface.tap),
            timeout: PLUMB_TIMEOUT,
        })
    });
    match r {
        Ok(tap) => Ok((tap, p)),
        Err(e) => {
            let errors = unplumb(nl, p).await;
            if !errors.is_empty() {
                tracing::warn!(interface = %iface.name, ?errors, "undoing a failed plumbing was incomplete");
            }
            Err(e)
        }
    }
}

async fn plumb_steps(
    nl: &Netlink,
    iface: &InterfaceInfo,
    fail_after: Option<SetupStep>,
    p: &mut Plumbing,
) -> Result<Tap, NetworkError> {
    let check = |step: SetupStep| -> Result<(), NetworkError> {
        if fail_after == Some(step) {
            return Err(NetworkError::Injected {
                netns: nl.netns.clone(),
                interface: iface.name.clone(),
                step,
            });
        }
        Ok(())
    };
    let tap = Tap::open(&iface.tap).map_err(|source| NetworkError::Tap {
        netns: nl.netns.clone(),
        interface: iface.name.clone(),
        source,
    })?;
    let tap_index = nl.link_index(&iface.tap).await?;
    p.made.push(Made::Tap {
        name: iface.tap.clone(),
        index: tap_index,
    });
    check(SetupStep::Tap)?;

    let msg = LinkUnspec::new_with_index(tap_index)
        .mtu(iface.mtu)
        .up()
        .build();
    nl.run(
        &iface.tap,
        "set mtu and up",
        nl.handle.link().set(msg).execute(),
    )
    .await?;
    check(SetupStep::TapUp)?;

    for (dev, index, step) in [
        (&iface.name, iface.index, SetupStep::InterfaceQdisc),
        (&iface.tap, tap_index, SetupStep::TapQdisc),
    ] {
        let req = nl.handle.qdisc().add(index as i32).ingress();
        nl.run(dev, "add ingress qdisc", req.execute()).await?;
        p.made.push(Made::Qdisc {
            dev: dev.clone(),
            index,
        });
        check(step)?;
    }

    for (dev, index, to, step) in [
        (
            &iface.name,
            iface.index,
            tap_index,
            SetupStep::InterfaceFilter,
        ),
        (&iface.tap, tap_index, iface.index, SetupStep::TapFilter),
    ] {
        let req = nl
            .handle
            .traffic_filter(index as i32)
            .add()
            .parent(INGRESS_HANDLE)
            .protocol((libc::ETH_P_ALL as u16).to_be())
            .redirect(to);
        let req = req.map_err(|source| NetworkError::Netlink {
            netns: nl.netns.clone(),
            interface: dev.clone(),
            op: "build redirect filter",
            source: Box::new(source),
        })?;
        nl.run(dev, "add redirect filter", req.execute()).await?;
        p.made.push(Made::Filter {
            dev: dev.clone(),
            index,
        });
        check(step)?;
    }
    Ok(tap)
}

/// Whether a netlink error says the object is already gone (the link was deleted, the qdisc or
/// filter does not exist): nothing left to undo.
fn already_gone(e: &NetworkError) -> bool {
    match e {
        NetworkError::Netlink { source, .. } => match &**source {
            rtnetlink::Error::NetlinkError(m) => {
                [libc::ENODEV, libc::ENOENT, libc::EINVAL].contains(&m.raw_code().abs())
            }
            _ => false,
        },
        _ => false,
    }
}

/// Undoes a plumbing, last first; every step is tried, the failures are returned (an object
/// that is already gone is not a failure).
pub async fn unplumb(nl: &Netlink, p: Plumbing) -> Vec<NetworkError> {
    let mut errors = Vec::new();
    for m in p.made.into_iter().rev() {
        let r = match &m {
            Made::Filter { dev, index } => {
                let req = nl
                    .handle
                    .traffic_filter(*index as i32)
                    .del()
                    .parent(INGRESS_HANDLE);
                nl.run(dev, "delete filters", req.execute()).await
            }
            Made::Qdisc { dev, index } => {
                let mut req = nl.handle.qdisc().del(*index as i32);
                let h = &mut req.message_mut().header;
                h.parent = netlink_packet_route::tc::TcHandle::INGRESS;
                h.handle = INGRESS_HANDLE.into();
                nl.run(dev, "delete ingress qdisc", req.execute()).await
            }
            Made::Tap { name, index } => {
                nl.run(name, "delete tap", nl.handle.link().del(*index).execute())
                    .await
            }
        };
        match r {
            Err(e) if !already_gone(&e) => errors.push(e),
            _ => {}
        }
    }
    errors
}

/// The mirred targets (ifindexes) of the filters under `index`'s ingress qdisc; `None` when the
/// link has no ingress qdisc.
async fn ingress_redirects(
    nl: &Netlink,
    dev: &str,
    index: u32,
) -> Result<Option<Vec<u32>>, NetworkError> {
    use netlink_packet_route::tc::{
        TcActionAttribute, TcActionMirrorOption, TcActionOption, TcAttribute, TcFilterU32Option,
        TcOption,
    };
    let req = nl.handle.traffic_filter(index as i32).get().ingress();
    let filters = match nl
        .run(
            dev,
            "dump ingress filters",
            req.execute().try_collect::<Vec<_>>(),
        )
        .await
    {
        Ok(f) => f,
        Err(e) if already_gone(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut targets = Vec::new();
    for f in &filters {
        for a in &f.attributes {
            let TcAttribute::Options(opts) = a else {
                continue;
            };
            for o in opts {
                let TcOption::U32(TcFilterU32Option::Action(actions)) = o else {
                    continue;
                };
                for action in actions {
                    for aa in &action.attributes {
                        let TcActionAttribute::Options(aopts) = aa else {
                            continue;
                        };
                        for ao in aopts {
                            if let TcActionOption::Mirror(TcActionMirrorOption::Parms(m)) = ao {
                                targets.push(m.ifindex);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(Some(targets))
}

/// Removes what a joey that could not tear down (a crashed shim) left in the netns: joey's taps
/// (`tap<N>_joey`; they vanish by themselves once no process holds their fd) and the ingress
/// qdisc of every interface whose ingress filters only redirect to a joey tap or to a device
/// that no longer exists. Another ingress qdisc (a redirect to a live device of someone else)
/// is left alone. Only for a netns whose sandbox is gone. Returns what was removed.
pub async fn remove_leftovers(nl: &Netlink) -> Result<Vec<String>, NetworkError> {
    let links = nl
        .dump("dump links", nl.handle.link().get().execute())
        .await?;
    let mut names = std::collections::HashMap::new();
    for l in &links {
        for a in &l.attributes {
            if let netlink_packet_route::link::LinkAttribute::IfName(n) = a {
                names.insert(l.header.index, n.clone());
            }
        }
    }
    let ours = |i: &u32| names.get(i).is_none_or(|n| super::scan::is_joey_tap(n));
    let mut removed = Vec::new();
    let mut p = Plumbing::default();
    for (index, name) in &names {
        if super::scan::is_joey_tap(name) {
            continue;
        }
        if let Some(targets) = ingress_redirects(nl, name, *index).await? {
            if !targets.is_empty() && targets.iter().all(ours) {
                p.made.push(Made::Qdisc {
                    dev: name.clone(),
                    index: *index,
                });
                removed.push(format!("ingress qdisc of {name}"));
            }
        }
    }
    for (index, name) in &names {
        if super::scan::is_joey_tap(name) {
            p.made.insert(
                0,
                Made::Tap {
                    name: name.clone(),
                    index: *index,
                },
            );
            removed.push(format!("tap {name}"));
        }
    }
    let errors = unplumb(nl, p).await;
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    removed.sort();
    Ok(removed)
}
