//! The Network actor: the pod's network namespace carried into the microVM.
//!
//! For every interface CNI (or the user) made in the pod netns ([`scan`]), joey creates a tap
//! there (`tap<N>_joey`, the interface's MTU, up) and joins the two with an ingress qdisc and a
//! u32 match-all filter with a mirred egress redirect on each side ([`netlink::plumb`], Kata's
//! tcfilter model): what arrives on the interface leaves through the tap (to the VM's
//! virtio-net device), what the VM sends on the tap leaves through the interface. The scan also
//! records what the guest must reproduce (MAC, MTU, addresses, routes, permanent neighbours),
//! convertible into the agent's `ConfigureNetworkRequest` ([`NetworkInfo::to_request`]).
//!
//! Every interface's plumbing is one resource on the actor's [`ResourceStack`]: a setup that
//! fails midway undoes what it made; [`TeardownNetwork`] removes filters, qdiscs and taps, so
//! only what existed before is left in the netns (the netns belongs to whoever created it).
//! All netlink work runs on a short-lived thread that entered the netns
//! ([`netlink::Netns::run`]), waited for from the blocking pool with a bound: the actor's runtime
//! never blocks.

pub mod netlink;
pub mod scan;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actix::prelude::*;
use joey_agent_protocol::agent;
use joey_vmm_core::devices::net::{MacAddr, NetAttachment, NetConfig, NetError, NetRateLimits, Tap, TapError};

use crate::lifecycle::InvalidTransition;
use crate::resource::{ResourceError, ResourceStack, Undo};
pub use netlink::SetupStep;

/// The name of the tap of the `i`-th interface.
pub fn tap_name(i: usize) -> String {
    format!("tap{i}_joey")
}

/// An address with its prefix length ("10.88.0.5/16").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One interface of the pod and its tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// Its name in the pod netns (and in the guest).
    pub name: String,
    /// Its index in the pod netns.
    pub index: u32,
    /// The guest's virtio-net device gets this MAC.
    pub mac: MacAddr,
    pub mtu: u32,
    /// IPv4 and IPv6 addresses, link-local IPv6 left out.
    pub addresses: Vec<IpCidr>,
    /// The tap joey made for it in the pod netns.
    pub tap: String,
}

/// A route of the pod (main table, not kernel-protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// `None`: the default route of the gateway's family (a default route without a gateway
    /// is recorded as `0.0.0.0/0` or `::/0`, so its family is never lost).
    pub destination: Option<IpCidr>,
    pub gateway: Option<IpAddr>,
    /// Interface name.
    pub device: String,
    /// Preferred source address.
    pub source: Option<IpAddr>,
    /// `RT_SCOPE_*` (0 universe, 253 link, 254 host).
    pub scope: u8,
}

/// A permanent neighbour entry of the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighborInfo {
    pub ip: IpAddr,
    pub mac: MacAddr,
    /// Interface name.
    pub device: String,
}

/// What the pod's network is: recorded by the scan of its netns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkInfo {
    pub netns: PathBuf,
    /// In interface-index order; `interfaces[i]` has the tap `tap<i>_joey`.
    pub interfaces: Vec<InterfaceInfo>,
    pub routes: Vec<RouteInfo>,
    pub neighbors: Vec<NeighborInfo>,
}

impl NetworkInfo {
    /// No interface: the pod has no network (only `lo`).
    pub fn is_empty(&self) -> bool {
        self.interfaces.is_empty()
    }

    /// The agent request that reproduces this network in the guest. Routes without a gateway
    /// come first (a gateway must be reachable when its route is added).
    pub fn to_request(&self) -> agent::ConfigureNetworkRequest {
        let mut routes: Vec<&RouteInfo> = self.routes.iter().collect();
        routes.sort_by_key(|r| r.gateway.is_some());
        let mut req = agent::ConfigureNetworkRequest::new();
        req.interfaces = self.interfaces.iter().map(Into::into).collect();
        req.routes = routes.into_iter().map(Into::into).collect();
        req.neighbors = self.neighbors.iter().map(Into::into).collect();
        req
    }
}

/// An optional address as the protocol writes it ("" for none).
fn opt_ip(a: Option<IpAddr>) -> String {
    a.map(|a| a.to_string()).unwrap_or_default()
}

impl From<&InterfaceInfo> for agent::NetInterface {
    fn from(i: &InterfaceInfo) -> Self {
        let mut n = agent::NetInterface::new();
        n.name = i.name.clone();
        n.mac = i.mac.to_string();
        n.mtu = i.mtu;
        n.addresses = i.addresses.iter().map(|a| a.to_string()).collect();
        n
    }
}

impl From<&RouteInfo> for agent::NetRoute {
    fn from(r: &RouteInfo) -> Self {
        let mut n = agent::NetRoute::new();
        n.destination = r.destination.map(|d| d.to_string()).unwrap_or_default();
        n.gateway = opt_ip(r.gateway);
        n.device = r.device.clone();
        n.source = opt_ip(r.source);
        n.scope = u32::from(r.scope);
        n
    }
}

impl From<&NeighborInfo> for agent::NetNeighbor {
    fn from(nb: &NeighborInfo) -> Self {
        let mut n = agent::NetNeighbor::new();
        n.ip = nb.ip.to_string();
        n.mac = nb.mac.to_string();
        n.device = nb.device.clone();
        n
    }
}

/// The result of [`SetupNetwork`]: the description and the taps' fds, `taps[i]` for
/// `info.interfaces[i]`, for the VM's virtio-net devices (they keep working from any thread
/// and namespace; [`TeardownNetwork`] deletes the taps, which detaches them).
#[derive(Debug)]
pub struct PodNetwork {
    pub info: NetworkInfo,
    pub taps: Vec<Tap>,
}

impl PodNetwork {
    /// The VM's virtio-net devices, one per interface in order: the interface's MAC and MTU on
    /// its tap, with the sandbox's rate `limits` each. An interface whose MTU or MAC the device
    /// cannot offer is refused by name.
    pub fn attachments(&self, limits: NetRateLimits) -> Result<Vec<NetAttachment>, NetworkError> {
        self.info
            .interfaces
            .iter()
            .zip(&self.taps)
            .map(|(iface, tap)| {
                let device = |source| NetworkError::Device {
                    netns: self.info.netns.clone(),
                    interface: iface.name.clone(),
                    source,
                };
                // Linux MTUs fit in 16 bits; anything larger is out of the device's range too.
                let mtu = u16::try_from(iface.mtu).unwrap_or(u16::MAX);
                let config = NetConfig {
                    mac: iface.mac,
                    mtu,
                    limits,
                };
                config.validate().map_err(device)?;
                Ok(NetAttachment {
                    config,
                    tap: std::sync::Arc::new(tap.try_clone().map_err(|e| device(e.into()))?),
                })
            })
            .collect()
    }
}

/// The virtio-net rate limits of `[hypervisor.rate_limits]`.
pub fn net_rate_limits(cfg: &joey_config::RateLimitsConfig) -> NetRateLimits {
    crate::hypervisor::rate_limits::rx_tx(&cfg.net)
}

/// Where a setup fails on purpose (tests of the unwinding): right after `step` of the
/// `interface`-th interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailPoint {
    pub interface: usize,
    pub step: SetupStep,
}

/// Failpoint `network::setup` (the `failpoints` cargo feature, docs/faults.md), evaluated once
/// per [`SetupNetwork`]: its return argument `<interface>[:<step>]` fails the setup of the
/// `<interface>`-th interface (0-based, in [`NetworkInfo::interfaces`] order) right after
/// `<step>` ([`SetupStep::name`], default `tap_qdisc`: a tap, its qdisc and the interface's
/// qdisc exist to be undone); no argument means interface 0.
pub const SETUP_FAILPOINT: &str = "network::setup";

impl FailPoint {
    /// The fail point a `network::setup` return argument names.
    pub fn parse(arg: Option<&str>) -> Result<FailPoint, String> {
        let arg = arg.unwrap_or("0");
        let (i, step) = arg.split_once(':').unwrap_or((arg, SetupStep::TapQdisc.name()));
        let bad = || format!("{SETUP_FAILPOINT}: invalid argument {arg:?} (expected <interface>[:<step>])");
        Ok(FailPoint {
            interface: i.parse().map_err(|_| bad())?,
            step: *SetupStep::ALL.iter().find(|s| s.name() == step).ok_or_else(bad)?,
        })
    }

    /// The fail point configured for [`SETUP_FAILPOINT`], if any (none without the
    /// `failpoints` feature). A bad argument is logged and injects nothing.
    fn configured() -> Option<FailPoint> {
        #[cfg(feature = "failpoints")]
        if let Some(arg) = fail::eval(SETUP_FAILPOINT, |arg| arg) {
            return FailPoint::parse(arg.as_deref())
                .inspect_err(|e| tracing::warn!(error = %e, "failpoint ignored"))
                .ok();
        }
        None
    }
}

/// Errors of the Network actor; each names the netns (and the interface and netlink operation
/// where there is one).
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {}: cannot open: {source}", .netns.display())]
    NetnsOpen {
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error("network namespace {}: cannot enter: {source}", .netns.display())]
    NetnsEnter {
        netns: PathBuf,
        source: std::io::Error,
    },
    /// The path is joey's own network namespace (the host's): never plumbed.
    #[error(
        "network namespace {}: is joey's own (host) network namespace, refused",
        .netns.display()
    )]
    OwnNetns { netns: PathBuf },
    /// The thread (or its runtime) that works inside the netns could not be started.
    #[error("network namespace {}: worker thread: {source}", .netns.display())]
    Thread {
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error("network namespace {}: netlink connection: {source}", .netns.display())]
    Connection {
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error("network namespace {}: {what} did not finish within {timeout:?}", .netns.display())]
    Timeout {
        netns: PathBuf,
        what: String,
        timeout: Duration,
    },
    #[error("network namespace {}: interface {interface}: {op} failed: {source}", .netns.display())]
    Netlink {
        netns: PathBuf,
        interface: String,
        op: &'static str,
        source: Box<rtnetlink::Error>,
    },
    #[error("network namespace {}: interface {interface} not found", .netns.display())]
    Missing { netns: PathBuf, interface: String },
    #[error(
        "network namespace {}: interface {interface} has no Ethernet MAC address (not supported)",
        .netns.display()
    )]
    NotEthernet { netns: PathBuf, interface: String },
    #[error("network namespace {}: interface {interface}: {source}", .netns.display())]
    Tap {
        netns: PathBuf,
        interface: String,
        source: TapError,
    },
    /// The interface cannot become a virtio-net device (MTU or MAC out of its range).
    #[error("network namespace {}: interface {interface}: {source}", .netns.display())]
    Device {
        netns: PathBuf,
        interface: String,
        source: NetError,
    },
    /// A [`FailPoint`] was reached (tests).
    #[error("network namespace {}: interface {interface}: injected failure after step {}", .netns.display(), .step.name())]
    Injected {
        netns: PathBuf,
        interface: String,
        step: SetupStep,
    },
    /// Teardown could not remove everything; each entry names what is left.
    #[error("network namespace {}: cleanup incomplete: {}", .netns.display(), .errors.join("; "))]
    Cleanup { netns: PathBuf, errors: Vec<String> },
    #[error(transparent)]
    State(#[from] InvalidTransition),
    #[error(transparent)]
    Resource(#[from] ResourceError),
}

/// Scans the netns and plumbs every interface, each one a resource on `res` (a failure undoes
/// all of them). Nothing here blocks the caller's runtime.
async fn setup(
    netns: &Path,
    res: &mut ResourceStack,
    fail: Option<FailPoint>,
) -> Result<PodNetwork, NetworkError> {
    let path = netns.to_path_buf();
    let (ns, info) = tokio::task::spawn_blocking(move || {
        let ns = netlink::Netns::open(&path)?;
        let info = ns.run("scan", |nl| async move { scan::scan(&nl).await })?;
        Ok::<_, NetworkError>((ns, info))
    })
    .await
    .map_err(|e| ResourceError::Task(e.to_string()))??;
    let mut taps = Vec::with_capacity(info.interfaces.len());
    for (i, iface) in info.interfaces.iter().enumerate() {
        let fail_after = fail.filter(|f| f.interface == i).map(|f| f.step);
        let ns = ns.clone();
        let iface = iface.clone();
        let tap = res
            .add_blocking(move || {
                let what = format!("plumbing {} to {}", iface.name, iface.tap);
                let ifc = iface.clone();
                let (tap, plumbing) = ns.run(&what, move |nl| async move {
                    netlink::plumb(&nl, &ifc, fail_after).await
                })?;
                let name = format!("{} in {}", what, ns.path().display());
                // The undo holds the open netns: it works after the netns path is unmounted.
                let undo = Undo::new(name, move || unplumb_in(&ns, plumbing));
                Ok::<_, NetworkError>((tap, undo as Box<dyn crate::resource::Resource>))
            })
            .await?;
        taps.push(tap);
    }
    Ok(PodNetwork { info, taps })
}

/// Undoes one interface's plumbing from a thread in the netns (blocking, bounded).
fn unplumb_in(ns: &netlink::Netns, plumbing: netlink::Plumbing) -> Result<(), String> {
    let errors = ns
        .run("teardown", |nl| async move {
            Ok(netlink::unplumb(&nl, plumbing).await)
        })
        .map_err(|e| e.to_string())?;
    if errors.is_empty() {
        Ok(())
    } else {
        let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        Err(list.join("; "))
    }
}

crate::state_machine! {
    /// Lifecycle of the pod network.
    pub enum NetworkState: "network" {
        /// Nothing set up.
        Idle => "idle",
        SettingUp => "setting up",
        /// Taps and filters in place.
        Ready => "ready",
        TearingDown => "tearing down",
        /// Torn down (terminal).
        Down => "down",
    }
    transitions {
        Idle => SettingUp | Down,
        SettingUp => Ready | Idle,
        Ready => TearingDown,
        TearingDown => Down,
    }
}

/// Sets the pod network up from the netns at `netns` (a `/var/run/netns/<x>` or
/// `/proc/<pid>/ns/net` path). A netns with only `lo` gives an empty [`NetworkInfo`]. Allowed
/// once, while idle; a failure leaves nothing behind and the actor idle.
#[derive(Message)]
#[rtype(result = "Result<PodNetwork, NetworkError>")]
pub struct SetupNetwork {
    pub netns: PathBuf,
}

/// Removes the filters, the ingress qdiscs (on the pod's interfaces too) and the taps.
/// Idempotent once down.
#[derive(Message)]
#[rtype(result = "Result<(), NetworkError>")]
pub struct TeardownNetwork;

/// Removes what a joey that could not tear down (a crashed shim) left in the netns at `netns`
/// (see [`netlink::remove_leftovers`]): for the delete path, when the sandbox is gone. Returns
/// what was removed. Blocking (a thread enters the netns): [`RemoveLeftovers`] runs it on the
/// blocking pool; the shim's `delete`, which has no actor, calls it directly.
pub fn remove_leftovers_in(netns: &Path) -> Result<Vec<String>, NetworkError> {
    netlink::in_netns(netns, "removing leftovers", |nl| async move {
        netlink::remove_leftovers(&nl).await
    })
}

/// [`remove_leftovers_in`] as a message. Any state.
#[derive(Message)]
#[rtype(result = "Result<Vec<String>, NetworkError>")]
pub struct RemoveLeftovers {
    pub netns: PathBuf,
}

/// The recorded network, once set up.
#[derive(Message)]
#[rtype(result = "Option<NetworkInfo>")]
pub struct GetNetworkInfo;

/// The lifecycle state.
#[derive(Message)]
#[rtype(result = "NetworkState")]
pub struct GetNetworkState;

/// The Network actor of one sandbox.
pub struct NetworkActor {
    state: NetworkState,
    info: Option<NetworkInfo>,
    res: ResourceStack,
    fail: Option<FailPoint>,
}

impl Default for NetworkActor {
    fn default() -> Self {
        Self::new()
    }
}

impl NetworkActor {
    pub fn new() -> Self {
        NetworkActor {
            state: NetworkState::Idle,
            info: None,
            res: ResourceStack::default(),
            fail: None,
        }
    }

    /// An actor whose setup fails at `fail` (tests of the unwinding).
    #[cfg(test)]
    fn failing_at(fail: FailPoint) -> Self {
        NetworkActor {
            fail: Some(fail),
            ..Self::new()
        }
    }
}

/// Replies of the requests that change the network: atomic (the actor's other messages wait).
type Reply<T> = AtomicResponse<NetworkActor, Result<T, NetworkError>>;

impl Actor for NetworkActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Dropping the stack hands what a missing TeardownNetwork left behind to the runtime.
        if !self.res.is_empty() {
            tracing::warn!("network actor stopped without TeardownNetwork; releasing now");
        }
    }
}

/// A reply known at once (a refused or no-op request).
fn ready<T: 'static>(r: Result<T, NetworkError>) -> Reply<T> {
    AtomicResponse::new(Box::pin(fut::ready(r)))
}

impl Handler<SetupNetwork> for NetworkActor {
    type Result = Reply<PodNetwork>;

    fn handle(&mut self, m: SetupNetwork, _: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.state.transition(NetworkState::SettingUp) {
            return ready(Err(e.into()));
        }
        let fail = self.fail.or_else(FailPoint::configured);
        let mut res = std::mem::take(&mut self.res);
        AtomicResponse::new(Box::pin(
            async move {
                let r = setup(&m.netns, &mut res, fail).await;
                (r, res)
            }
            .into_actor(self)
            .map(|(r, res), act, _| {
                act.res = res;
                match r {
                    Ok(pod) => {
                        act.state.transition(NetworkState::Ready)?;
                        tracing::info!(netns = %pod.info.netns.display(), interfaces = pod.info.interfaces.len(), "pod network ready");
                        act.info = Some(pod.info.clone());
                        Ok(pod)
                    }
                    Err(e) => {
                        act.state.transition(NetworkState::Idle)?;
                        Err(e)
                    }
                }
            }),
        ))
    }
}

impl Handler<TeardownNetwork> for NetworkActor {
    type Result = Reply<()>;

    fn handle(&mut self, _: TeardownNetwork, _: &mut Context<Self>) -> Self::Result {
        match self.state {
            NetworkState::Down => return ready(Ok(())),
            NetworkState::Idle => {
                return ready(
                    self.state
                        .transition(NetworkState::Down)
                        .map_err(Into::into),
                )
            }
            _ => {}
        }
        if let Err(e) = self.state.transition(NetworkState::TearingDown) {
            return ready(Err(e.into()));
        }
        let netns = self
            .info
            .as_ref()
            .map(|i| i.netns.clone())
            .unwrap_or_default();
        let mut res = std::mem::take(&mut self.res);
        AtomicResponse::new(Box::pin(
            async move { res.cleanup_all().await }
                .into_actor(self)
                .map(move |errors, act, _| {
                    act.state.transition(NetworkState::Down)?;
                    if errors.is_empty() {
                        Ok(())
                    } else {
                        Err(NetworkError::Cleanup { netns, errors })
                    }
                }),
        ))
    }
}

impl Handler<RemoveLeftovers> for NetworkActor {
    type Result = ResponseFuture<Result<Vec<String>, NetworkError>>;

    fn handle(&mut self, m: RemoveLeftovers, _: &mut Context<Self>) -> Self::Result {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || remove_leftovers_in(&m.netns))
                .await
                .map_err(|e| ResourceError::Task(e.to_string()))?
        })
    }
}

impl Handler<GetNetworkInfo> for NetworkActor {
    type Result = MessageResult<GetNetworkInfo>;
    fn handle(&mut self, _: GetNetworkInfo, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.info.clone())
    }
}

impl Handler<GetNetworkState> for NetworkActor {
    type Result = MessageResult<GetNetworkState>;
    fn handle(&mut self, _: GetNetworkState, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use joey_vmm_core::devices::net::tap::VNET_HDR_LEN;
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    fn run(args: &[&str]) -> String {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A network namespace made with `ip netns add`, deleted on drop (also when a test fails).
    struct TestNetns {
        name: String,
    }

    impl TestNetns {
        fn new(role: &str) -> TestNetns {
            static SEQ: AtomicUsize = AtomicUsize::new(0);
            let name = format!(
                "joey-nt-{}-{}-{role}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            );
            run(&["ip", "netns", "add", &name]);
            TestNetns { name }
        }

        fn path(&self) -> PathBuf {
            PathBuf::from("/var/run/netns").join(&self.name)
        }

        /// `ip -n <ns> <args>`.
        fn ip(&self, args: &str) -> String {
            let mut v = vec!["ip", "-n", &self.name];
            v.extend(args.split_whitespace());
            run(&v)
        }

        /// `tc -n <ns> <args>`.
        fn tc(&self, args: &str) -> String {
            let mut v = vec!["tc", "-n", &self.name];
            v.extend(args.split_whitespace());
            run(&v)
        }

        /// What must be equal before setup and after teardown: links and qdiscs.
        fn snapshot(&self) -> (String, String) {
            (self.ip("-o link show"), self.tc("qdisc show"))
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    async fn set_up(
        actor: &Addr<NetworkActor>,
        netns: impl Into<PathBuf>,
    ) -> Result<PodNetwork, NetworkError> {
        actor
            .send(SetupNetwork {
                netns: netns.into(),
            })
            .await
            .unwrap()
    }

    async fn tear_down(actor: &Addr<NetworkActor>) -> Result<(), NetworkError> {
        actor.send(TeardownNetwork).await.unwrap()
    }

    async fn state(actor: &Addr<NetworkActor>) -> NetworkState {
        actor.send(GetNetworkState).await.unwrap()
    }

    async fn leftovers(
        actor: &Addr<NetworkActor>,
        netns: PathBuf,
    ) -> Result<Vec<String>, NetworkError> {
        actor.send(RemoveLeftovers { netns }).await.unwrap()
    }

    const MAC0: &str = "02:00:00:00:c8:01";
    const MAC1: &str = "02:00:00:00:c8:02";
    const NEIGH_MAC: &str = "02:00:00:00:c8:09";

    /// A pod netns as CNI would leave it, joined to a peer netns by two veth pairs:
    /// eth0 (10.200.0.2/24, fd00:200::2/64, default routes via the peer, a permanent
    /// neighbour) and eth1 (MTU 1400, 10.200.1.2/24, a gateway route and a link route), plus a
    /// tap without address (not the pod's).
    fn pod_fixture() -> (TestNetns, TestNetns) {
        let pod = TestNetns::new("pod");
        let peer = TestNetns::new("peer");
        let (p, q) = (&pod.name, &peer.name);
        pod.ip(&format!(
            "link add eth0 address {MAC0} type veth peer name veth0 netns {q}"
        ));
        pod.ip(&format!(
            "link add eth1 address {MAC1} mtu 1400 type veth peer name veth1 mtu 1400 netns {q}"
        ));
        pod.ip("tuntap add dev other0 mode tap");
        peer.ip("addr add 10.200.0.1/24 dev veth0");
        peer.ip("addr add fd00:200::1/64 dev veth0 nodad");
        peer.ip("addr add 10.200.1.1/24 dev veth1");
        for l in ["lo", "veth0", "veth1"] {
            peer.ip(&format!("link set {l} up"));
        }
        pod.ip("addr add 10.200.0.2/24 dev eth0");
        pod.ip("addr add fd00:200::2/64 dev eth0 nodad");
        pod.ip("addr add 10.200.1.2/24 dev eth1");
        for l in ["lo", "eth0", "eth1"] {
            pod.ip(&format!("link set {l} up"));
        }
        pod.ip("route add default via 10.200.0.1 dev eth0");
        pod.ip("-6 route add default via fd00:200::1 dev eth0");
        pod.ip("route add 10.201.0.0/16 via 10.200.1.1 dev eth1");
        pod.ip("route add 10.202.0.0/24 dev eth1 scope link");
        pod.ip(&format!(
            "neigh add 10.200.0.9 lladdr {NEIGH_MAC} dev eth0 nud permanent"
        ));
        let _ = p;
        (pod, peer)
    }

    fn cidr(s: &str) -> IpCidr {
        let (a, p) = s.split_once('/').unwrap();
        IpCidr {
            addr: a.parse().unwrap(),
            prefix_len: p.parse().unwrap(),
        }
    }

    fn ifindex(ns: &TestNetns, name: &str) -> u32 {
        let v: serde_json::Value =
            serde_json::from_str(&ns.ip(&format!("-j link show {name}"))).unwrap();
        v[0]["ifindex"].as_u64().unwrap() as u32
    }

    fn route(dst: Option<&str>, gw: Option<&str>, dev: &str, scope: u8) -> RouteInfo {
        RouteInfo {
            destination: dst.map(cidr),
            gateway: gw.map(|g| g.parse().unwrap()),
            device: dev.into(),
            source: None,
            scope,
        }
    }

    fn expected_info(pod: &TestNetns) -> NetworkInfo {
        NetworkInfo {
            netns: pod.path(),
            interfaces: vec![
                InterfaceInfo {
                    name: "eth0".into(),
                    index: ifindex(pod, "eth0"),
                    mac: MAC0.parse().unwrap(),
                    mtu: 1500,
                    addresses: vec![cidr("10.200.0.2/24"), cidr("fd00:200::2/64")],
                    tap: "tap0_joey".into(),
                },
                InterfaceInfo {
                    name: "eth1".into(),
                    index: ifindex(pod, "eth1"),
                    mac: MAC1.parse().unwrap(),
                    mtu: 1400,
                    addresses: vec![cidr("10.200.1.2/24")],
                    tap: "tap1_joey".into(),
                },
            ],
            routes: vec![
                route(None, Some("10.200.0.1"), "eth0", 0),
                route(Some("10.201.0.0/16"), Some("10.200.1.1"), "eth1", 0),
                route(Some("10.202.0.0/24"), None, "eth1", 253),
                route(None, Some("fd00:200::1"), "eth0", 0),
            ],
            neighbors: vec![NeighborInfo {
                ip: "10.200.0.9".parse().unwrap(),
                mac: NEIGH_MAC.parse().unwrap(),
                device: "eth0".into(),
            }],
        }
    }

    /// The ingress filter of `dev`: a match-all u32 redirecting every protocol to `to`.
    fn assert_redirect(pod: &TestNetns, dev: &str, to: &str) {
        let f = pod.tc(&format!("filter show dev {dev} ingress"));
        assert!(f.contains("protocol all"), "{dev}: {f}");
        assert!(f.contains("match 00000000/00000000 at 0"), "{dev}: {f}");
        assert!(
            f.contains(&format!("mirred (Egress Redirect to device {to}) stolen")),
            "{dev}: {f}"
        );
    }

    #[actix_rt::test]
    async fn setup_records_the_pod_network_plumbs_taps_and_teardown_restores_the_netns() {
        let (pod, _peer) = pod_fixture();
        let before = pod.snapshot();
        let actor = NetworkActor::new().start();
        let net = set_up(&actor, pod.path()).await.unwrap();
        assert_eq!(net.info, expected_info(&pod));
        assert_eq!(
            actor.send(GetNetworkInfo).await.unwrap(),
            Some(net.info.clone())
        );
        assert_eq!(state(&actor).await, NetworkState::Ready);
        let names: Vec<&str> = net.taps.iter().map(|t| t.name()).collect();
        assert_eq!(names, ["tap0_joey", "tap1_joey"]);
        for (tap, mtu) in [("tap0_joey", 1500), ("tap1_joey", 1400)] {
            let v: serde_json::Value =
                serde_json::from_str(&pod.ip(&format!("-j link show {tap}"))).unwrap();
            assert_eq!(v[0]["mtu"], mtu, "{tap}");
            let flags = v[0]["flags"].as_array().unwrap();
            assert!(flags.iter().any(|f| f == "UP"), "{tap}: {flags:?}");
        }
        for dev in ["eth0", "eth1", "tap0_joey", "tap1_joey"] {
            let q = pod.tc(&format!("qdisc show dev {dev} ingress"));
            assert!(
                q.contains("qdisc ingress ffff: parent ffff:fff1"),
                "{dev}: {q}"
            );
        }
        assert_redirect(&pod, "eth0", "tap0_joey");
        assert_redirect(&pod, "tap0_joey", "eth0");
        assert_redirect(&pod, "eth1", "tap1_joey");
        assert_redirect(&pod, "tap1_joey", "eth1");
        // The VM's devices: the interfaces' MACs and MTUs on their taps, in order.
        let limits = net_rate_limits(&joey_config::RateLimitsConfig {
            net: joey_config::RxTxLimits {
                tx: joey_config::LimitConfig {
                    bandwidth_bytes_per_s: 1000,
                    ops_burst: 7,
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        });
        assert!(!limits.rx.is_limited() && limits.tx.is_limited());
        assert_eq!(
            (limits.tx.bandwidth, limits.tx.ops.one_time_burst),
            (joey_vmm_core::rate_limiter::BucketConfig { rate: 1000, one_time_burst: 0, refill_time_ms: 100 }, 7)
        );
        let att = net.attachments(limits).unwrap();
        assert!(att.iter().all(|a| a.config.limits == limits));
        let got: Vec<(MacAddr, u16, &str)> = att
            .iter()
            .map(|a| (a.config.mac, a.config.mtu, a.tap.name()))
            .collect();
        let i = &net.info.interfaces;
        assert_eq!(
            got,
            [
                (i[0].mac, 1500, "tap0_joey"),
                (i[1].mac, 1400, "tap1_joey")
            ]
        );
        // An MTU the device cannot offer is refused, naming the interface.
        let mut info = net.info.clone();
        info.interfaces[1].mtu = 70_000;
        let taps = net.taps.iter().map(|t| t.try_clone().unwrap()).collect();
        let e = PodNetwork { info, taps }.attachments(NetRateLimits::default()).unwrap_err();
        assert!(
            matches!(&e, NetworkError::Device { interface, source: NetError::Mtu(65535), .. } if interface == "eth1"),
            "{e}"
        );
        // A second setup is refused while ready.
        let e = set_up(&actor, pod.path()).await.unwrap_err();
        assert!(matches!(e, NetworkError::State(_)), "{e}");

        tear_down(&actor).await.unwrap();
        assert_eq!(state(&actor).await, NetworkState::Down);
        // The taps are gone even though their fds are still open.
        assert_eq!(pod.snapshot(), before);
        assert_eq!(pod.tc("filter show dev eth0 ingress"), "");
        drop(net);
        assert_eq!(pod.snapshot(), before);
        // Teardown is idempotent once down.
        tear_down(&actor).await.unwrap();
    }

    #[actix_rt::test]
    async fn a_failure_midway_unwinds_everything_made() {
        let (pod, _peer) = pod_fixture();
        let before = pod.snapshot();
        for step in SetupStep::ALL {
            let actor = NetworkActor::failing_at(FailPoint { interface: 1, step }).start();
            let e = set_up(&actor, pod.path()).await.unwrap_err();
            match &e {
                NetworkError::Injected {
                    interface, step: s, ..
                } => {
                    assert_eq!((interface.as_str(), *s), ("eth1", step))
                }
                other => panic!("{step:?}: expected the injected failure, got {other}"),
            }
            assert!(e.to_string().contains(&pod.name), "{e}");
            assert_eq!(pod.snapshot(), before, "after a failure at {step:?}");
            assert_eq!(state(&actor).await, NetworkState::Idle);
            assert_eq!(actor.send(GetNetworkInfo).await.unwrap(), None);
        }
        // The first interface failing is unwound the same way, and a later setup works.
        let actor = NetworkActor::failing_at(FailPoint {
            interface: 0,
            step: SetupStep::TapFilter,
        })
        .start();
        assert!(set_up(&actor, pod.path()).await.is_err());
        assert_eq!(pod.snapshot(), before);
        let actor = NetworkActor::new().start();
        let net = set_up(&actor, pod.path()).await.unwrap();
        assert_eq!(net.taps.len(), 2);
        tear_down(&actor).await.unwrap();
        assert_eq!(pod.snapshot(), before);
    }

    /// CNI may delete the pod's interfaces before the sandbox is torn down, and a tap may be
    /// gone already: teardown treats what is gone as done.
    #[actix_rt::test]
    async fn teardown_after_interfaces_vanished_succeeds() {
        let (pod, _peer) = pod_fixture();
        let actor = NetworkActor::new().start();
        let net = set_up(&actor, pod.path()).await.unwrap();
        pod.ip("link del eth1");
        pod.ip("link del tap0_joey");
        tear_down(&actor).await.unwrap();
        let (links, qdiscs) = pod.snapshot();
        assert!(!links.contains("_joey"), "{links}");
        assert!(!qdiscs.contains("ingress"), "{qdiscs}");
        drop(net);
    }

    /// containerd removes the pod's netns path before the sandbox stops: teardown still works
    /// (the actor holds the netns open) and leaves it as it was.
    #[actix_rt::test]
    async fn teardown_after_the_netns_path_is_gone() {
        use std::os::fd::AsRawFd;
        let (pod, _peer) = pod_fixture();
        let before = pod.snapshot();
        let actor = NetworkActor::new().start();
        let net = set_up(&actor, pod.path()).await.unwrap();
        let keep = std::fs::File::open(pod.path()).unwrap();
        run(&["ip", "netns", "del", &pod.name]);
        assert!(!pod.path().exists());
        tear_down(&actor).await.unwrap();
        drop(net);
        // Look inside through our own fd on it.
        let fd_path = format!("/proc/{}/fd/{}", std::process::id(), keep.as_raw_fd());
        let links = run(&[
            "nsenter",
            &format!("--net={fd_path}"),
            "ip",
            "-o",
            "link",
            "show",
        ]);
        let qdiscs = run(&[
            "nsenter",
            &format!("--net={fd_path}"),
            "tc",
            "qdisc",
            "show",
        ]);
        assert_eq!((links, qdiscs), before);
    }

    /// After a crash (nothing torn down, the taps' fds closed or not), the leftovers are found
    /// and removed; someone else's ingress redirect is left alone.
    #[actix_rt::test]
    async fn leftovers_of_a_crash_are_removed() {
        let (pod, _peer) = pod_fixture();
        pod.tc("qdisc add dev other0 ingress");
        pod.tc(
            "filter add dev other0 parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev eth1",
        );
        let before = pod.snapshot();
        for keep_taps_open in [false, true] {
            let mut res = ResourceStack::default();
            let net = setup(&pod.path(), &mut res, None).await.unwrap();
            // The crash: no teardown ran.
            std::mem::forget(res);
            let taps = if keep_taps_open {
                Some(net.taps)
            } else {
                // The shim's process is gone: so are the taps, once no fd holds them (a child
                // another test forks may hold a copy until it execs).
                drop(net);
                let deadline = Instant::now() + Duration::from_secs(5);
                while pod.snapshot().0.contains("_joey") {
                    assert!(Instant::now() < deadline, "closed taps still there");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                None
            };
            let actor = NetworkActor::new().start();
            let removed = leftovers(&actor, pod.path()).await.unwrap();
            let mut want = vec!["ingress qdisc of eth0", "ingress qdisc of eth1"];
            if keep_taps_open {
                want.extend(["tap tap0_joey", "tap tap1_joey"]);
            }
            assert_eq!(removed, want);
            assert_eq!(pod.snapshot(), before, "taps kept open: {keep_taps_open}");
            drop(taps);
            // Nothing more to remove.
            let again = leftovers(&actor, pod.path()).await.unwrap();
            assert!(again.is_empty(), "{again:?}");
        }
    }

    #[actix_rt::test]
    async fn a_netns_with_only_lo_is_no_network() {
        let ns = TestNetns::new("empty");
        ns.ip("link set lo up");
        let before = ns.snapshot();
        let actor = NetworkActor::new().start();
        let net = set_up(&actor, ns.path()).await.unwrap();
        assert!(net.info.is_empty() && net.taps.is_empty(), "{net:?}");
        assert_eq!(net.info.netns, ns.path());
        assert_eq!(net.info.to_request(), agent::ConfigureNetworkRequest::new());
        tear_down(&actor).await.unwrap();
        assert_eq!(ns.snapshot(), before);
    }

    #[actix_rt::test]
    async fn bad_netns_paths_are_typed_errors_naming_them() {
        let actor = NetworkActor::new().start();
        let e = set_up(&actor, "/var/run/netns/joey-no-such-netns")
            .await
            .unwrap_err();
        assert!(matches!(e, NetworkError::NetnsOpen { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with("network namespace /var/run/netns/joey-no-such-netns: cannot open"),
            "{e}"
        );
        // Not a namespace: opened, but cannot be entered.
        let e = set_up(&actor, "/dev/null").await.unwrap_err();
        assert!(matches!(e, NetworkError::NetnsEnter { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with("network namespace /dev/null: cannot enter"),
            "{e}"
        );
        // joey's own (the host's) netns is refused, whatever the path.
        for own in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
            let e = set_up(&actor, own).await.unwrap_err();
            assert!(matches!(e, NetworkError::OwnNetns { .. }), "{e}");
            assert_eq!(
                e.to_string(),
                format!("network namespace {own}: is joey's own (host) network namespace, refused")
            );
        }
        let e = leftovers(&actor, "/proc/self/ns/net".into())
            .await
            .unwrap_err();
        assert!(matches!(e, NetworkError::OwnNetns { .. }), "{e}");
        // Still idle: a later setup may be tried; teardown of nothing is fine.
        assert_eq!(state(&actor).await, NetworkState::Idle);
        tear_down(&actor).await.unwrap();
        assert_eq!(state(&actor).await, NetworkState::Down);
        let e = set_up(&actor, "/dev/null").await.unwrap_err();
        assert!(matches!(e, NetworkError::State(_)), "{e}");
    }

    #[test]
    fn to_request_carries_everything_gateway_less_routes_first() {
        let info = NetworkInfo {
            netns: "/var/run/netns/x".into(),
            interfaces: vec![InterfaceInfo {
                name: "eth0".into(),
                index: 2,
                mac: "02:00:00:00:c8:01".parse().unwrap(),
                mtu: 1400,
                addresses: vec![cidr("10.200.0.2/24"), cidr("fd00:200::2/64")],
                tap: "tap0_joey".into(),
            }],
            routes: vec![
                route(None, Some("10.200.0.1"), "eth0", 0),
                RouteInfo {
                    source: Some("10.200.0.2".parse().unwrap()),
                    ..route(Some("10.202.0.0/24"), None, "eth0", 253)
                },
            ],
            neighbors: vec![NeighborInfo {
                ip: "fd00:200::9".parse().unwrap(),
                mac: "02:00:00:00:c8:09".parse().unwrap(),
                device: "eth0".into(),
            }],
        };
        let r = info.to_request();
        assert_eq!(r.interfaces.len(), 1);
        let i = &r.interfaces[0];
        assert_eq!(
            (i.name.as_str(), i.mac.as_str(), i.mtu, i.addresses.clone()),
            (
                "eth0",
                "02:00:00:00:c8:01",
                1400,
                vec!["10.200.0.2/24".to_string(), "fd00:200::2/64".to_string()]
            )
        );
        let routes: Vec<(&str, &str, &str, &str, u32)> = r
            .routes
            .iter()
            .map(|r| {
                (
                    r.destination.as_str(),
                    r.gateway.as_str(),
                    r.device.as_str(),
                    r.source.as_str(),
                    r.scope,
                )
            })
            .collect();
        assert_eq!(
            routes,
            [
                ("10.202.0.0/24", "", "eth0", "10.200.0.2", 253),
                ("", "10.200.0.1", "eth0", "", 0)
            ]
        );
        let n = &r.neighbors[0];
        assert_eq!(
            (n.ip.as_str(), n.mac.as_str(), n.device.as_str()),
            ("fd00:200::9", "02:00:00:00:c8:09", "eth0")
        );
    }

    #[test]
    fn lifecycle_transitions() {
        use NetworkState::*;
        crate::lifecycle::assert_transitions(
            &[Idle, SettingUp, Ready, TearingDown, Down],
            &[
                (Idle, SettingUp),
                (Idle, Down),
                (SettingUp, Idle),
                (SettingUp, Ready),
                (Ready, TearingDown),
                (TearingDown, Down),
            ],
        );
    }

    /// Frames cross the redirect both ways: an ARP request written to the tap leaves through
    /// eth0 (the peer learns the sender), and the peer's reply arrives on eth0 and comes out of
    /// the tap.
    #[actix_rt::test]
    async fn frames_cross_the_redirect_both_ways() {
        let (pod, peer) = pod_fixture();
        let actor = NetworkActor::new().start();
        let net = set_up(&actor, pod.path()).await.unwrap();
        // Each interface with its own tap: (tap, the pod's address, the peer's, the peer's dev).
        for (tap, ours, theirs, dev) in [
            (&net.taps[0], [10, 200, 0, 2], [10, 200, 0, 1], "veth0"),
            (&net.taps[1], [10, 200, 1, 2], [10, 200, 1, 1], "veth1"),
        ] {
            let sender = [0x02, 0, 0, 0, 0xc8, 0xaa];
            let mut frame = vec![0u8; VNET_HDR_LEN];
            frame.extend_from_slice(&[0xff; 6]); // broadcast
            frame.extend_from_slice(&sender);
            frame.extend_from_slice(&[0x08, 0x06]); // ARP
            frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4 request
            frame.extend_from_slice(&sender);
            frame.extend_from_slice(&ours);
            frame.extend_from_slice(&[0; 6]);
            frame.extend_from_slice(&theirs);
            assert!(tap.write_frame(&frame).unwrap());
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = vec![0u8; 2048];
            let reply = loop {
                assert!(
                    Instant::now() < deadline,
                    "{dev}: no ARP reply came out of {}",
                    tap.name()
                );
                match tap.read_frame(&mut buf).unwrap() {
                    Some(n) => {
                        let f = &buf[VNET_HDR_LEN..n];
                        // An ARP reply (opcode 2).
                        if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                            break f.to_vec();
                        }
                    }
                    None => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            };
            assert_eq!(&reply[0..6], &sender, "{dev}: to our sender");
            assert_eq!(&reply[28..32], &theirs, "{dev}: from the peer");
            let ip = format!("{}.{}.{}.{}", ours[0], ours[1], ours[2], ours[3]);
            let neigh = peer.ip(&format!("neigh show {ip} dev {dev}"));
            assert!(neigh.contains("02:00:00:00:c8:aa"), "{dev}: {neigh}");
        }
        tear_down(&actor).await.unwrap();
    }

    #[test]
    fn failpoint_arguments_name_an_interface_and_a_step() {
        let at = |interface, step| Ok(FailPoint { interface, step });
        assert_eq!(FailPoint::parse(None), at(0, SetupStep::TapQdisc));
        assert_eq!(FailPoint::parse(Some("1")), at(1, SetupStep::TapQdisc));
        assert_eq!(FailPoint::parse(Some("1:tap")), at(1, SetupStep::Tap));
        for step in SetupStep::ALL {
            assert_eq!(FailPoint::parse(Some(&format!("2:{}", step.name()))), at(2, step));
        }
        for bad in ["", "x", "1:", "1:tapp", "-1:tap", "1:tap:tap"] {
            let e = FailPoint::parse(Some(bad)).unwrap_err();
            assert!(e.contains("network::setup") && e.contains(bad), "{e}");
        }
    }
}
