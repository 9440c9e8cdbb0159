//! The pod's network inside the guest (the ConfigureNetwork RPC): the host side attaches one
//! virtio-net device per pod interface, with the pod interface's MAC; this module finds each
//! device by that MAC and makes it the pod's interface (name, MTU, addresses, up), then adds the
//! pod's routes and permanent neighbours. Netlink only (rtnetlink), in the network namespace of
//! the calling thread — the agent's, which is the guest's root namespace and the one that
//! containers with a network namespace path share (docs/agent.md).
//!
//! A request is checked whole before anything changes: the static checks ([`NetworkPlan::parse`]:
//! names, MACs, CIDRs, IPs, scopes, route and neighbour devices named in the request) and then
//! the checks against the guest's links ([`bind`]: every MAC belongs to a link, every other
//! device exists, no target name is held by a link outside the request, IPv6 is built into the
//! guest kernel when the request uses it). Only then [`apply`] changes the links, in this order:
//!
//! 1. each interface whose name differs from the target is set down and renamed (through a
//!    temporary name when another interface of the request holds the target name);
//! 2. each interface gets its MTU, its addresses (replace: an existing one is fine) and is set up;
//! 3. routes without a gateway (link-scope ones), then routes with a gateway, so that every
//!    gateway is reachable when its route is added (replace: an existing one is fine);
//! 4. the permanent neighbours (replace).
//!
//! The same request applied twice gives the same result and succeeds.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use futures::TryStreamExt;
use joey_agent_protocol::agent::{ConfigureNetworkRequest, NetInterface, NetNeighbor, NetRoute};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Longest interface name the kernel takes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;
/// Smallest MTU an IPv4 interface may have (RFC 791).
const MIN_MTU: u32 = 68;
/// Where the guest kernel shows its IPv6 settings when it has IPv6.
const IPV6_PROC: &str = "/proc/sys/net/ipv6";

/// Errors of this module. The `Invalid*`, `UnknownMac`, `UnknownDevice` and `NameTaken` ones are
/// found before anything is changed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("interface {index} ({name:?}): {reason}")]
    InvalidInterface {
        index: usize,
        name: String,
        reason: String,
    },
    #[error("interface {name:?}: no link of the guest has MAC {mac}")]
    UnknownMac { name: String, mac: String },
    #[error("interface {name:?}: the name is taken by the guest's link {index} (MAC {mac}), which is not in the request")]
    NameTaken {
        name: String,
        index: u32,
        mac: String,
    },
    #[error("route {index} ({route}): {reason}")]
    InvalidRoute {
        index: usize,
        route: String,
        reason: String,
    },
    #[error("neighbour {index} ({ip:?}): {reason}")]
    InvalidNeighbor {
        index: usize,
        ip: String,
        reason: String,
    },
    #[error(
        "{what}: device {device:?} is neither an interface of the request nor a link of the guest"
    )]
    UnknownDevice { what: String, device: String },
    #[error("{0} uses IPv6, which the guest kernel does not have (no {IPV6_PROC})")]
    NoIpv6(String),
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("{what}: {op} failed: {source}")]
    Netlink {
        what: String,
        op: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = String;

    /// "aa:bb:cc:dd:ee:ff", hex digits in either case.
    fn from_str(s: &str) -> Result<Mac, String> {
        let bad = || format!("malformed MAC {s:?} (want aa:bb:cc:dd:ee:ff)");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in mac.iter_mut() {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ":" };
            write!(f, "{sep}{b:02x}")?;
        }
        Ok(())
    }
}

/// An address with its prefix length ("10.88.0.5/16", "fd00::5/64").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = |why: &str| format!("malformed CIDR {s:?}: {why}");
        let (addr, prefix) = s.split_once('/').ok_or_else(|| bad("no /prefix"))?;
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| bad(&format!("prefix must be 0 to {max}")))?;
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// The same prefix with the host bits cleared.
    pub fn network(&self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One interface of a checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfacePlan {
    pub name: String,
    pub mac: Mac,
    /// `None`: the link keeps its MTU (the request said 0).
    pub mtu: Option<u32>,
    pub addresses: Vec<Cidr>,
}

/// One route of a checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// Its index in the request.
    pub index: usize,
    /// `None`: the default route of the route's family.
    pub destination: Option<Cidr>,
    pub gateway: Option<IpAddr>,
    pub device: String,
    pub source: Option<IpAddr>,
    pub scope: u8,
    pub ipv6: bool,
}

impl fmt::Display for RoutePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.destination {
            Some(d) => write!(f, "{d}")?,
            None if self.ipv6 => write!(f, "default (IPv6)")?,
            None => write!(f, "default")?,
        }
        if let Some(g) = &self.gateway {
            write!(f, " via {g}")?;
        }
        write!(f, " dev {}", self.device)
    }
}

/// One permanent neighbour of a checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighborPlan {
    pub ip: IpAddr,
    pub mac: Mac,
    pub device: String,
}

/// A ConfigureNetworkRequest that passed the static checks; routes already in the order they
/// are added (gateway-less first, request order otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPlan {
    pub interfaces: Vec<InterfacePlan>,
    pub routes: Vec<RoutePlan>,
    pub neighbors: Vec<NeighborPlan>,
}

fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_IFNAME {
        return Err(format!("name must be 1 to {MAX_IFNAME} bytes"));
    }
    if name == "."
        || name == ".."
        || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err("name must not be \".\" or \"..\" nor contain '/', ':' or whitespace".into());
    }
    Ok(())
}

fn parse_interface(index: usize, i: &NetInterface) -> Result<InterfacePlan, NetworkError> {
    let bad = |reason: String| NetworkError::InvalidInterface {
        index,
        name: i.name.clone(),
        reason,
    };
    check_ifname(&i.name).map_err(bad)?;
    let mac: Mac = i.mac.parse().map_err(bad)?;
    if mac.0[0] & 1 == 1 || mac.0 == [0; 6] {
        return Err(bad(format!("MAC {mac} is not a unicast address")));
    }
    let mtu = match i.mtu {
        0 => None,
        m if (MIN_MTU..=65535).contains(&m) => Some(m),
        m => {
            return Err(bad(format!(
                "MTU {m} is outside {MIN_MTU} to 65535 (0 keeps the link's)"
            )))
        }
    };
    let addresses = i
        .addresses
        .iter()
        .map(|a| a.parse::<Cidr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    Ok(InterfacePlan {
        name: i.name.clone(),
        mac,
        mtu,
        addresses,
    })
}

/// An optional field: empty is `None`.
fn optional<T: FromStr>(s: &str, what: &str) -> Result<Option<T>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| format!("malformed {what} {s:?}"))
}

fn parse_route(index: usize, r: &NetRoute) -> Result<RoutePlan, String> {
    let destination = match r.destination.as_str() {
        "" => None,
        d => Some(d.parse::<Cidr>()?),
    };
    if let Some(d) = destination.filter(|d| d.network() != *d) {
        return Err(format!(
            "destination {d} has host bits set (the prefix is {})",
            d.network()
        ));
    }
    let gateway = optional::<IpAddr>(&r.gateway, "gateway")?;
    let source = optional::<IpAddr>(&r.source, "source")?;
    let family = [destination.map(|d| d.addr), gateway, source]
        .into_iter()
        .flatten()
        .map(|a| a.is_ipv6())
        .collect::<Vec<_>>();
    let ipv6 = *family
        .first()
        .ok_or("a default route needs a gateway or a source address (to know its family)")?;
    if family.iter().any(|f| *f != ipv6) {
        return Err("destination, gateway and source mix IPv4 and IPv6".into());
    }
    if r.device.is_empty() {
        return Err("no device".into());
    }
    let scope = match r.scope {
        s @ (0 | 200 | 253 | 254) => s as u8,
        s => {
            return Err(format!(
                "scope {s} is not 0 (universe), 200 (site), 253 (link) or 254 (host)"
            ))
        }
    };
    if gateway.is_some() && scope != 0 {
        return Err(format!(
            "a route with a gateway must have scope 0 (universe), not {scope}"
        ));
    }
    Ok(RoutePlan {
        index,
        destination,
        gateway,
        device: r.device.clone(),
        source,
        scope,
        ipv6,
    })
}

fn describe_route(r: &NetRoute) -> String {
    let dest = if r.destination.is_empty() {
        "default"
    } else {
        &r.destination
    };
    let via = if r.gateway.is_empty() {
        String::new()
    } else {
        format!(" via {}", r.gateway)
    };
    format!("{dest}{via} dev {}", r.device)
}

fn parse_neighbor(n: &NetNeighbor) -> Result<NeighborPlan, String> {
    let ip: IpAddr =
        n.ip.parse()
            .map_err(|_| format!("malformed IP {:?}", n.ip))?;
    let mac: Mac = n.mac.parse()?;
    if n.device.is_empty() {
        return Err("no device".into());
    }
    Ok(NeighborPlan {
        ip,
        mac,
        device: n.device.clone(),
    })
}

impl NetworkPlan {
    /// The static checks of a request (everything that needs no look at the guest).
    pub fn parse(req: &ConfigureNetworkRequest) -> Result<NetworkPlan, NetworkError> {
        let mut interfaces = Vec::new();
        let (mut names, mut macs) = (HashSet::new(), HashSet::new());
        for (index, i) in req.interfaces.iter().enumerate() {
            let plan = parse_interface(index, i)?;
            let dup = |what: &str| NetworkError::InvalidInterface {
                index,
                name: i.name.clone(),
                reason: format!("{what} is also another interface's"),
            };
            if !names.insert(plan.name.clone()) {
                return Err(dup("the name"));
            }
            if !macs.insert(plan.mac) {
                return Err(dup(&format!("MAC {}", plan.mac)));
            }
            interfaces.push(plan);
        }
        let mut routes = Vec::new();
        for (index, r) in req.routes.iter().enumerate() {
            let plan = parse_route(index, r).map_err(|reason| NetworkError::InvalidRoute {
                index,
                route: describe_route(r),
                reason,
            })?;
            routes.push(plan);
        }
        // Gateway-less routes first (stable: request order otherwise).
        routes.sort_by_key(|r| r.gateway.is_some());
        let neighbors = req
            .neighbors
            .iter()
            .enumerate()
            .map(|(index, n)| {
                parse_neighbor(n).map_err(|reason| NetworkError::InvalidNeighbor {
                    index,
                    ip: n.ip.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NetworkPlan {
            interfaces,
            routes,
            neighbors,
        })
    }

    /// What in the request uses IPv6, if anything.
    fn first_ipv6(&self) -> Option<String> {
        for i in &self.interfaces {
            if let Some(a) = i.addresses.iter().find(|a| a.addr.is_ipv6()) {
                return Some(format!("interface {:?} address {a}", i.name));
            }
        }
        if let Some(r) = self.routes.iter().find(|r| r.ipv6) {
            return Some(format!("route {r}"));
        }
        self.neighbors
            .iter()
            .find(|n| n.ip.is_ipv6())
            .map(|n| format!("neighbour {}", n.ip))
    }
}

/// A link of the guest as netlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: u32,
    pub up: bool,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            up: m.header.flags.contains(LinkFlags::Up),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::Address(bytes) => {
                    link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(Mac)
                }
                _ => {}
            }
        }
        link
    }
}

/// Every link of the namespace the handle's socket lives in.
pub async fn links(handle: &Handle) -> Result<Vec<Link>, NetworkError> {
    handle
        .link()
        .get()
        .execute()
        .map_ok(|m| Link::from_message(&m))
        .try_collect()
        .await
        .map_err(|source| NetworkError::Netlink {
            what: "the guest's links".into(),
            op: "list",
            source,
        })
}

/// A plan bound to the guest's links: the link of each interface (same order) and the link
/// index of every device name that routes and neighbours may use.
#[derive(Debug, Clone)]
pub struct Bound {
    pub links: Vec<Link>,
    pub devices: HashMap<String, u32>,
}

/// The checks of a plan against the guest's `links` (nothing is changed).
pub fn bind(plan: &NetworkPlan, links: &[Link]) -> Result<Bound, NetworkError> {
    let mut bound = Vec::new();
    for i in &plan.interfaces {
        let link = links.iter().find(|l| l.mac == Some(i.mac)).ok_or_else(|| {
            NetworkError::UnknownMac {
                name: i.name.clone(),
                mac: i.mac.to_string(),
            }
        })?;
        bound.push(link.clone());
    }
    let ours: HashSet<u32> = bound.iter().map(|l| l.index).collect();
    // Links outside the request keep their names; a target name they hold cannot be had.
    let mut devices: HashMap<String, u32> = links
        .iter()
        .filter(|l| !ours.contains(&l.index))
        .map(|l| (l.name.clone(), l.index))
        .collect();
    for (i, link) in plan.interfaces.iter().zip(&bound) {
        if let Some(other) = links
            .iter()
            .find(|l| l.name == i.name && !ours.contains(&l.index))
        {
            return Err(NetworkError::NameTaken {
                name: i.name.clone(),
                index: other.index,
                mac: other
                    .mac
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "none".into()),
            });
        }
        devices.insert(i.name.clone(), link.index);
    }
    let known = |what: String, device: &str| {
        if devices.contains_key(device) {
            Ok(())
        } else {
            Err(NetworkError::UnknownDevice {
                what,
                device: device.to_string(),
            })
        }
    };
    for r in &plan.routes {
        known(format!("route {r}"), &r.device)?;
    }
    for n in &plan.neighbors {
        known(format!("neighbour {}", n.ip), &n.device)?;
    }
    Ok(Bound {
        links: bound,
        devices,
    })
}

/// Opens a netlink socket in the calling thread's network namespace and runs its connection on
/// the current tokio runtime (it ends when the last clone of the handle is dropped).
pub fn connect() -> Result<Handle, NetworkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Socket)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Checks `req` whole (nothing changes when it is refused), then applies it.
pub async fn configure(handle: &Handle, req: &ConfigureNetworkRequest) -> Result<(), NetworkError> {
    let plan = NetworkPlan::parse(req)?;
    if let Some(what) = plan.first_ipv6() {
        if !Path::new(IPV6_PROC).exists() {
            return Err(NetworkError::NoIpv6(what));
        }
    }
    let bound = bind(&plan, &links(handle).await?)?;
    apply(handle, &plan, &bound).await
}

fn netlink(
    what: impl FnOnce() -> String,
    op: &'static str,
) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    move |source| NetworkError::Netlink {
        what: what(),
        op,
        source,
    }
}

async fn set_link(handle: &Handle, msg: LinkMessage) -> Result<(), rtnetlink::Error> {
    handle.link().set(msg).execute().await
}

/// Applies a checked and bound plan (see the module docs for the order).
pub async fn apply(handle: &Handle, plan: &NetworkPlan, bound: &Bound) -> Result<(), NetworkError> {
    let iface = |name: &str| {
        let name = name.to_string();
        move || format!("interface {name:?}")
    };
    // 1. Renames: down first (a link that is up cannot be renamed). A link of the request whose
    //    current name is another one's target moves to a temporary name first (a link outside
    //    the request holding a target name was refused by `bind`).
    let renamed: Vec<(&InterfacePlan, &Link)> = plan
        .interfaces
        .iter()
        .zip(&bound.links)
        .filter(|(i, l)| i.name != l.name)
        .collect();
    let targets: HashSet<&str> = renamed.iter().map(|(i, _)| i.name.as_str()).collect();
    for (i, l) in &renamed {
        let e = iface(&i.name);
        set_link(handle, LinkUnspec::new_with_index(l.index).down().build())
            .await
            .map_err(netlink(e.clone(), "set down"))?;
        if targets.contains(l.name.as_str()) {
            let temp = format!("joeytmp{}", l.index);
            set_link(
                handle,
                LinkUnspec::new_with_index(l.index).name(temp).build(),
            )
            .await
            .map_err(netlink(e, "rename to a temporary name"))?;
        }
    }
    for (i, l) in &renamed {
        set_link(
            handle,
            LinkUnspec::new_with_index(l.index)
                .name(i.name.clone())
                .build(),
        )
        .await
        .map_err(netlink(iface(&i.name), "rename"))?;
    }
    // 2. MTU, addresses, up.
    for (i, l) in plan.interfaces.iter().zip(&bound.links) {
        if let Some(mtu) = i.mtu.filter(|m| *m != l.mtu) {
            set_link(handle, LinkUnspec::new_with_index(l.index).mtu(mtu).build())
                .await
                .map_err(netlink(iface(&i.name), "set MTU"))?;
        }
        for a in &i.addresses {
            let mut req = handle.address().add(l.index, a.addr, a.prefix).replace();
            // The pod's addresses were checked for uniqueness where CNI made them: no duplicate
            // address detection, so an IPv6 address is usable at once (not "tentative").
            let msg = req.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            req.execute()
                .await
                .map_err(|source| NetworkError::Netlink {
                    what: format!("interface {:?} address {a}", i.name),
                    op: "add",
                    source,
                })?;
        }
        set_link(handle, LinkUnspec::new_with_index(l.index).up().build())
            .await
            .map_err(netlink(iface(&i.name), "set up"))?;
    }
    // 3. Routes, gateway-less ones first (the plan is in that order).
    for r in &plan.routes {
        let what = || format!("route {r}");
        let mut b = RouteMessageBuilder::<IpAddr>::new();
        b = match r.destination {
            Some(d) => b.destination_prefix(d.addr, d.prefix),
            None => Ok(b),
        }
        .map_err(|e| invalid_route(r, e))?;
        if r.destination.is_none() {
            b.get_mut().header.address_family = if r.ipv6 {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            };
        }
        if let Some(g) = r.gateway {
            b = b.gateway(g).map_err(|e| invalid_route(r, e))?;
        }
        if let Some(s) = r.source {
            b = b.pref_source(s).map_err(|e| invalid_route(r, e))?;
        }
        let msg = b
            .output_interface(bound.devices[&r.device])
            .scope(RouteScope::from(r.scope))
            .build();
        handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(netlink(what, "add"))?;
    }
    // 4. Permanent neighbours.
    for n in &plan.neighbors {
        handle
            .neighbours()
            .add(bound.devices[&n.device], n.ip)
            .link_layer_address(&n.mac.0)
            .replace()
            .execute()
            .await
            .map_err(netlink(
                || format!("neighbour {} dev {}", n.ip, n.device),
                "add",
            ))?;
    }
    Ok(())
}

fn invalid_route(r: &RoutePlan, e: impl fmt::Display) -> NetworkError {
    NetworkError::InvalidRoute {
        index: r.index,
        route: r.to_string(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::future::Future;
    use std::pin::Pin;
    use std::time::Duration;

    use rtnetlink::packet_route::address::AddressAttribute;
    use rtnetlink::packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourState,
    };
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
    use rtnetlink::LinkVeth;

    use super::*;

    const MAC0: &str = "02:00:00:c8:00:01";
    const MAC1: &str = "02:00:00:c8:00:02";
    const TEST_TIMEOUT: Duration = Duration::from_secs(30);

    type TestFn = Box<dyn FnOnce(Handle) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

    /// Runs `f` in a network namespace of its own: a thread that unshared CLONE_NEWNET (root
    /// only), with two veth pairs: `pa0` (MAC0) / `pb0` and `pa1` (MAC1) / `pb1`, the `pb` ends
    /// up so the `pa` ends get a carrier.
    fn in_netns(f: TestFn) {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // SAFETY: unshare(2) with a constant flag; it only changes this thread's network
            // namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let handle = connect().expect("netlink");
                for (a, b, mac) in [("pa0", "pb0", MAC0), ("pa1", "pb1", MAC1)] {
                    let mac: Mac = mac.parse().unwrap();
                    let veth = LinkVeth::new(a, b).address(mac.0.to_vec()).build();
                    handle.link().add(veth).execute().await.expect("add veth");
                    let peer = link_named(&handle, b).await;
                    set_link(&handle, LinkUnspec::new_with_index(peer.index).up().build())
                        .await
                        .expect("peer up");
                }
                f(handle).await;
            });
            let _ = tx.send(());
        });
        match rx.recv_timeout(TEST_TIMEOUT) {
            Ok(()) => thread.join().expect("test thread"),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // The thread panicked: show its panic.
                if let Err(p) = thread.join() {
                    std::panic::resume_unwind(p);
                }
            }
            Err(e) => panic!("test did not finish within {TEST_TIMEOUT:?}: {e}"),
        }
    }

    async fn link_named(handle: &Handle, name: &str) -> Link {
        links(handle)
            .await
            .unwrap()
            .into_iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("no link {name}"))
    }

    /// Everything `configure` may change, read back through netlink: links (name, MAC, MTU,
    /// up), addresses (without IPv6 link-local ones), the main table's routes that are not
    /// the kernel's, permanent neighbours.
    #[derive(Debug, PartialEq, Eq)]
    struct State {
        links: BTreeSet<(String, String, u32, bool)>,
        addresses: BTreeSet<(String, String)>,
        routes: BTreeSet<String>,
        neighbors: BTreeSet<(String, String, String)>,
    }

    async fn state(handle: &Handle) -> State {
        let all = links(handle).await.unwrap();
        let name = |index: u32| {
            all.iter()
                .find(|l| l.index == index)
                .map(|l| l.name.clone())
                .unwrap_or_else(|| format!("#{index}"))
        };
        let links = all
            .iter()
            .map(|l| {
                let mac = l.mac.map(|m| m.to_string()).unwrap_or_default();
                (l.name.clone(), mac, l.mtu, l.up)
            })
            .collect();
        let addrs: Vec<_> = handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .unwrap();
        let addresses = addrs
            .iter()
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })?;
                let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] == 0xfe80);
                let cidr = Cidr {
                    addr: ip,
                    prefix: m.header.prefix_len,
                };
                (!link_local).then(|| (name(m.header.index), cidr.to_string()))
            })
            .collect();
        let mut routes = BTreeSet::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessageBuilder::<IpAddr>::new().build();
            query.header.address_family = family;
            let msgs: Vec<_> = handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .unwrap();
            for m in msgs {
                if m.header.table != 254 || m.header.protocol == RouteProtocol::Kernel {
                    continue;
                }
                let mut s = String::new();
                let (mut dest, mut via, mut dev, mut src) = (None, None, None, None);
                for a in &m.attributes {
                    let ip = |r: &RouteAddress| match r {
                        RouteAddress::Inet(v4) => v4.to_string(),
                        RouteAddress::Inet6(v6) => v6.to_string(),
                        other => format!("{other:?}"),
                    };
                    match a {
                        RouteAttribute::Destination(r) => dest = Some(ip(r)),
                        RouteAttribute::Gateway(r) => via = Some(ip(r)),
                        RouteAttribute::PrefSource(r) => src = Some(ip(r)),
                        RouteAttribute::Oif(i) => dev = Some(name(*i)),
                        _ => {}
                    }
                }
                match dest {
                    Some(d) => s += &format!("{d}/{}", m.header.destination_prefix_length),
                    None => s += "default",
                }
                if let Some(g) = via {
                    s += &format!(" via {g}");
                }
                s += &format!(" dev {}", dev.unwrap_or_default());
                if let Some(src) = src {
                    s += &format!(" src {src}");
                }
                s += &format!(" scope {}", u8::from(m.header.scope));
                routes.insert(s);
            }
        }
        let neighs: Vec<_> = handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .unwrap();
        let neighbors = neighs
            .iter()
            .filter(|m| m.header.state == NeighbourState::Permanent)
            .map(|m| {
                let (mut ip, mut mac) = (String::new(), String::new());
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                            ip = v4.to_string()
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                            ip = v6.to_string()
                        }
                        NeighbourAttribute::LinkLayerAddress(b) => {
                            mac = Mac(<[u8; 6]>::try_from(b.as_slice()).unwrap()).to_string()
                        }
                        _ => {}
                    }
                }
                (name(m.header.ifindex), ip, mac)
            })
            .collect();
        State {
            links,
            addresses,
            routes,
            neighbors,
        }
    }

    fn iface(name: &str, mac: &str, mtu: u32, addresses: &[&str]) -> NetInterface {
        NetInterface {
            name: name.into(),
            mac: mac.into(),
            mtu,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
    }

    fn route(destination: &str, gateway: &str, device: &str, scope: u32) -> NetRoute {
        NetRoute {
            destination: destination.into(),
            gateway: gateway.into(),
            device: device.into(),
            scope,
            ..Default::default()
        }
    }

    fn neighbor(ip: &str, mac: &str, device: &str) -> NetNeighbor {
        NetNeighbor {
            ip: ip.into(),
            mac: mac.into(),
            device: device.into(),
            ..Default::default()
        }
    }

    /// Two interfaces (one MAC in upper case), IPv4 and IPv6, a non-default MTU, default routes
    /// of both families, a route whose gateway is only reachable through a gateway-less route
    /// listed after it, a route with a source, two permanent neighbours.
    fn pod_request() -> ConfigureNetworkRequest {
        ConfigureNetworkRequest {
            interfaces: vec![
                iface("eth0", MAC0, 1400, &["10.200.1.2/24", "fd00:200::2/64"]),
                iface("net1", &MAC1.to_uppercase(), 0, &["10.200.2.2/24"]),
            ],
            routes: vec![
                route("", "10.200.1.1", "eth0", 0),
                route("10.200.50.0/24", "10.200.60.1", "net1", 0),
                route("10.200.60.0/24", "", "net1", 253),
                route("", "fd00:200::1", "eth0", 0),
                NetRoute {
                    source: "10.200.2.2".into(),
                    ..route("10.200.70.0/24", "", "net1", 253)
                },
            ],
            neighbors: vec![
                neighbor("10.200.1.1", "02:00:00:c8:00:aa", "eth0"),
                neighbor("fd00:200::1", "02:00:00:c8:00:bb", "eth0"),
            ],
            ..Default::default()
        }
    }

    fn set<T: Ord + Clone>(items: &[T]) -> BTreeSet<T> {
        items.iter().cloned().collect()
    }

    fn s(x: &str) -> String {
        x.to_string()
    }

    #[test]
    fn configure_sets_exactly_the_request_and_is_idempotent() {
        in_netns(Box::new(|handle| {
            Box::pin(async move {
                let before = state(&handle).await;
                let (pa0, pa1) = (
                    link_named(&handle, "pa0").await,
                    link_named(&handle, "pa1").await,
                );
                configure(&handle, &pod_request()).await.expect("configure");
                let after = state(&handle).await;
                let eth0 = link_named(&handle, "eth0").await;
                assert_eq!(eth0.index, pa0.index, "the link with MAC0 became eth0");
                assert_eq!(link_named(&handle, "net1").await.index, pa1.index);
                let mut links = before.links.clone();
                links.retain(|l| !l.0.starts_with("pa"));
                links.insert((s("eth0"), s(MAC0), 1400, true));
                links.insert((s("net1"), s(MAC1), 1500, true));
                assert_eq!(after.links, links);
                assert_eq!(
                    after.addresses,
                    set(&[
                        (s("eth0"), s("10.200.1.2/24")),
                        (s("eth0"), s("fd00:200::2/64")),
                        (s("net1"), s("10.200.2.2/24")),
                    ])
                );
                assert_eq!(
                    after.routes,
                    set(&[
                        s("default via 10.200.1.1 dev eth0 scope 0"),
                        s("10.200.50.0/24 via 10.200.60.1 dev net1 scope 0"),
                        s("10.200.60.0/24 dev net1 scope 253"),
                        s("10.200.70.0/24 dev net1 src 10.200.2.2 scope 253"),
                        s("default via fd00:200::1 dev eth0 scope 0"),
                    ])
                );
                assert_eq!(
                    after.neighbors,
                    set(&[
                        (s("eth0"), s("10.200.1.1"), s("02:00:00:c8:00:aa")),
                        (s("eth0"), s("fd00:200::1"), s("02:00:00:c8:00:bb")),
                    ])
                );
                // The same request again: fine, same state.
                configure(&handle, &pod_request())
                    .await
                    .expect("configure twice");
                assert_eq!(state(&handle).await, after);
            })
        }));
    }

    #[test]
    fn names_can_be_swapped_between_interfaces_of_the_request() {
        in_netns(Box::new(|handle| {
            Box::pin(async move {
                let first = ConfigureNetworkRequest {
                    interfaces: vec![iface("eth0", MAC0, 0, &[]), iface("eth1", MAC1, 0, &[])],
                    ..Default::default()
                };
                configure(&handle, &first).await.expect("configure");
                let swapped = ConfigureNetworkRequest {
                    interfaces: vec![iface("eth1", MAC0, 0, &[]), iface("eth0", MAC1, 0, &[])],
                    ..Default::default()
                };
                configure(&handle, &swapped).await.expect("swap");
                assert_eq!(
                    link_named(&handle, "eth1").await.mac,
                    Some(MAC0.parse().unwrap())
                );
                assert_eq!(
                    link_named(&handle, "eth0").await.mac,
                    Some(MAC1.parse().unwrap())
                );
                assert!(link_named(&handle, "eth0").await.up);
            })
        }));
    }

    #[test]
    fn bad_requests_name_the_problem_and_change_nothing() {
        in_netns(Box::new(|handle| {
            Box::pin(async move {
                let before = state(&handle).await;
                let good = pod_request();
                let with = |f: &dyn Fn(&mut ConfigureNetworkRequest)| {
                    let mut r = good.clone();
                    f(&mut r);
                    r
                };
                let cases: Vec<(ConfigureNetworkRequest, &str)> = vec![
                    (
                        with(&|r| r.interfaces[1].mac = "02:00:00:c8:00:99".into()),
                        "interface \"net1\": no link of the guest has MAC 02:00:00:c8:00:99",
                    ),
                    (
                        with(&|r| r.interfaces[1].mac = "02:00:00:c8:00".into()),
                        "interface 1 (\"net1\"): malformed MAC \"02:00:00:c8:00\" (want aa:bb:cc:dd:ee:ff)",
                    ),
                    (
                        with(&|r| r.interfaces[0].addresses[1] = "10.200.1.2/33".into()),
                        "interface 0 (\"eth0\"): malformed CIDR \"10.200.1.2/33\": prefix must be 0 to 32",
                    ),
                    (
                        with(&|r| r.interfaces[0].addresses[0] = "10.200.1.2".into()),
                        "interface 0 (\"eth0\"): malformed CIDR \"10.200.1.2\": no /prefix",
                    ),
                    (
                        with(&|r| r.interfaces[0].mtu = 20),
                        "interface 0 (\"eth0\"): MTU 20 is outside 68 to 65535 (0 keeps the link's)",
                    ),
                    (
                        with(&|r| r.interfaces[1].name = "eth0".into()),
                        "interface 1 (\"eth0\"): the name is also another interface's",
                    ),
                    (
                        with(&|r| r.interfaces[1].mac = MAC0.into()),
                        "interface 1 (\"net1\"): MAC 02:00:00:c8:00:01 is also another interface's",
                    ),
                    (
                        with(&|r| r.interfaces[1].name = "pb0".into()),
                        "interface \"pb0\": the name is taken by the guest's link",
                    ),
                    (
                        with(&|r| r.routes[2].device = "eth7".into()),
                        "route 10.200.60.0/24 dev eth7: device \"eth7\" is neither an interface of the request nor a link of the guest",
                    ),
                    (
                        with(&|r| r.routes[0].gateway = "10.200.1.x".into()),
                        "route 0 (default via 10.200.1.x dev eth0): malformed gateway \"10.200.1.x\"",
                    ),
                    (
                        with(&|r| r.routes[1].gateway = "fd00:200::1".into()),
                        "route 1 (10.200.50.0/24 via fd00:200::1 dev net1): destination, gateway and source mix IPv4 and IPv6",
                    ),
                    (
                        with(&|r| r.routes[1].destination = "10.200.50.0/24".replace("/24", "/40")),
                        "route 1 (10.200.50.0/40 via 10.200.60.1 dev net1): malformed CIDR",
                    ),
                    (
                        with(&|r| r.routes[1].destination = "10.200.50.9/24".into()),
                        "route 1 (10.200.50.9/24 via 10.200.60.1 dev net1): destination 10.200.50.9/24 has host bits set (the prefix is 10.200.50.0/24)",
                    ),
                    (
                        with(&|r| r.routes[0].gateway.clear()),
                        "route 0 (default dev eth0): a default route needs a gateway or a source address",
                    ),
                    (
                        with(&|r| r.routes[0].scope = 253),
                        "route 0 (default via 10.200.1.1 dev eth0): a route with a gateway must have scope 0",
                    ),
                    (
                        with(&|r| r.neighbors[1].mac = "zz:00:00:c8:00:bb".into()),
                        "neighbour 1 (\"fd00:200::1\"): malformed MAC \"zz:00:00:c8:00:bb\"",
                    ),
                    (
                        with(&|r| r.neighbors[0].device = "eth9".into()),
                        "neighbour 10.200.1.1: device \"eth9\" is neither",
                    ),
                ];
                for (req, want) in cases {
                    let e = configure(&handle, &req).await.expect_err(want);
                    assert!(e.to_string().starts_with(want), "got {e:?}, want {want}");
                    assert_eq!(state(&handle).await, before, "{want}: nothing may change");
                }
                // A route may use a link of the guest that is not in the request ("lo", down in
                // this namespace: the kernel refuses the route, and the error names it).
                let lo_route = with(&|r| r.routes[2].device = "lo".into());
                let e = configure(&handle, &lo_route).await.unwrap_err();
                assert!(
                    matches!(&e, NetworkError::Netlink { what, op: "add", .. }
                        if what == "route 10.200.60.0/24 dev lo"),
                    "{e:?}"
                );
            })
        }));
    }

    #[test]
    fn parse_checks() {
        assert_eq!(
            "AA:bb:0c:00:00:01".parse::<Mac>(),
            Ok(Mac([0xaa, 0xbb, 0x0c, 0, 0, 1]))
        );
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "a:bb:cc:dd:ee:ff0",
            "+a:bb:cc:dd:ee:ff",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        assert_eq!(
            "fd00:200::2/64".parse::<Cidr>().unwrap().to_string(),
            "fd00:200::2/64"
        );
        assert!("fd00::1/129".parse::<Cidr>().is_err());
        let net = |c: &str| c.parse::<Cidr>().unwrap().network().to_string();
        assert_eq!(net("10.200.50.7/24"), "10.200.50.0/24");
        assert_eq!(net("10.200.50.7/0"), "0.0.0.0/0");
        assert_eq!(net("10.200.50.7/32"), "10.200.50.7/32");
        assert_eq!(net("fd00:200::7/64"), "fd00:200::/64");
        assert_eq!(net("fd00:200::7/0"), "::/0");
        assert!("10.0.0.1/-1".parse::<Cidr>().is_err());
        let req = ConfigureNetworkRequest {
            interfaces: vec![iface("eth0/x", MAC0, 0, &[])],
            ..Default::default()
        };
        assert!(matches!(
            NetworkPlan::parse(&req),
            Err(NetworkError::InvalidInterface { index: 0, .. })
        ));
        let req = ConfigureNetworkRequest {
            interfaces: vec![iface("eth0", "03:00:00:00:00:01", 0, &[])],
            ..Default::default()
        };
        let e = NetworkPlan::parse(&req).unwrap_err();
        assert_eq!(
            e.to_string(),
            "interface 0 (\"eth0\"): MAC 03:00:00:00:00:01 is not a unicast address"
        );
        // Gateway-less routes come first, request order otherwise.
        let plan = NetworkPlan::parse(&pod_request()).unwrap();
        let order: Vec<usize> = plan.routes.iter().map(|r| r.index).collect();
        assert_eq!(order, vec![2, 4, 0, 1, 3]);
        assert_eq!(
            plan.first_ipv6().as_deref(),
            Some("interface \"eth0\" address fd00:200::2/64")
        );
    }
}
