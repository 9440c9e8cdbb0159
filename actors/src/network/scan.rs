//! Reading the pod netns: its interfaces (with MAC, MTU, addresses), routes and permanent
//! neighbours, as CNI (or the user) set them up.
//!
//! Chosen interfaces: not loopback, not one of joey's own taps, and either a veth or one with
//! an address (fallback tunnel devices such as `sit0`, down and without address, are left out).
//! Link-local IPv6 addresses (fe80::/10) are left out: the guest kernel makes its own. Routes:
//! main table, unicast, not kernel-protocol (the guest makes those when it adds the
//! addresses), through a chosen interface. Neighbours: `NUD_PERMANENT` on a chosen interface.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use joey_vmm_core::devices::net::MacAddr;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::RouteMessageBuilder;

use super::netlink::Netlink;
use super::{tap_name, InterfaceInfo, IpCidr, NeighborInfo, NetworkError, NetworkInfo, RouteInfo};

/// Whether `name` is one of joey's taps (`tap<N>_joey`).
pub fn is_joey_tap(name: &str) -> bool {
    name.strip_prefix("tap")
        .and_then(|r| r.strip_suffix("_joey"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn mac_of(bytes: &[u8]) -> Option<MacAddr> {
    <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
}

fn is_ipv6_link_local(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A link as far as the choice goes.
struct Link {
    index: u32,
    name: String,
    mac: Option<MacAddr>,
    mtu: u32,
    veth: bool,
    loopback: bool,
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: None,
        mtu: 1500,
        veth: false,
        loopback: m.header.flags.contains(LinkFlags::Loopback),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(b) => l.mac = mac_of(b),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::LinkInfo(infos) => {
                l.veth |= infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    l
}

/// Reads the netns; the interfaces get their taps' names in order (`tap0_joey`, ...).
pub async fn scan(nl: &Netlink) -> Result<NetworkInfo, NetworkError> {
    let links = nl
        .dump("dump links", nl.handle.link().get().execute())
        .await?;
    let addrs = nl
        .dump("dump addresses", nl.handle.address().get().execute())
        .await?;
    let mut by_index: HashMap<u32, Vec<IpCidr>> = HashMap::new();
    for a in &addrs {
        // IPv4: IFA_LOCAL is the address (IFA_ADDRESS is the peer on point-to-point links).
        let local = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = local.or(address).filter(|ip| !is_ipv6_link_local(ip)) {
            by_index.entry(a.header.index).or_default().push(IpCidr {
                addr: ip,
                prefix_len: a.header.prefix_len,
            });
        }
    }

    let mut links: Vec<Link> = links.iter().map(link_of).collect();
    links.sort_by_key(|l| l.index);
    let mut info = NetworkInfo {
        netns: nl.netns.clone(),
        ..NetworkInfo::default()
    };
    for l in links {
        let addresses = by_index.remove(&l.index).unwrap_or_default();
        if l.loopback || l.name == "lo" || is_joey_tap(&l.name) {
            continue;
        }
        if !l.veth && addresses.is_empty() {
            continue;
        }
        let Some(mac) = l.mac else {
            return Err(NetworkError::NotEthernet {
                netns: nl.netns.clone(),
                interface: l.name,
            });
        };
        info.interfaces.push(InterfaceInfo {
            tap: tap_name(info.interfaces.len()),
            name: l.name,
            index: l.index,
            mac,
            mtu: l.mtu,
            addresses,
        });
    }
    if info.interfaces.is_empty() {
        return Ok(info);
    }
    let names: HashMap<u32, String> = info
        .interfaces
        .iter()
        .map(|i| (i.index, i.name.clone()))
        .collect();

    let v4 = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let v6 = RouteMessageBuilder::<Ipv6Addr>::new().build();
    for query in [v4, v6] {
        let routes = nl
            .dump("dump routes", nl.handle.route().get(query).execute())
            .await?;
        info.routes
            .extend(routes.iter().filter_map(|r| route_of(r, &names)));
    }

    let neighbours = nl
        .dump("dump neighbours", nl.handle.neighbours().get().execute())
        .await?;
    for n in &neighbours {
        if n.header.state != NeighbourState::Permanent {
            continue;
        }
        let Some(device) = names.get(&n.header.ifindex) else {
            continue;
        };
        let mut ip = None;
        let mut mac = None;
        for a in &n.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    ip = Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    ip = Some(IpAddr::V6(*v6))
                }
                NeighbourAttribute::LinkLayerAddress(b) => mac = mac_of(b),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            info.neighbors.push(NeighborInfo {
                ip,
                mac,
                device: device.clone(),
            });
        }
    }
    Ok(info)
}

/// The route, if it is one to carry into the guest.
fn route_of(r: &RouteMessage, names: &HashMap<u32, String>) -> Option<RouteInfo> {
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || r.header.protocol == RouteProtocol::Kernel
        || r.header.kind != RouteType::Unicast
    {
        return None;
    }
    let mut route = RouteInfo {
        destination: None,
        gateway: None,
        device: String::new(),
        source: None,
        scope: u8::from(r.header.scope),
    };
    let mut oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => {
                route.destination = route_ip(d).map(|addr| IpCidr {
                    addr,
                    prefix_len: r.header.destination_prefix_length,
                })
            }
            RouteAttribute::Gateway(g) => route.gateway = route_ip(g),
            RouteAttribute::PrefSource(s) => route.source = route_ip(s),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    route.device = names.get(&oif?)?.clone();
    if route.destination.is_none() && route.gateway.is_none() {
        // A default route through a device only (`default dev eth0`): nothing else says its
        // family, so it is written out as 0.0.0.0/0 or ::/0 from the route header.
        let addr = match r.header.address_family {
            netlink_packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        route.destination = Some(IpCidr { addr, prefix_len: 0 });
    }
    Some(route)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_only_default_route_keeps_its_family() {
        let names = HashMap::from([(2u32, "eth0".to_string())]);
        for (family, want) in [
            (netlink_packet_route::AddressFamily::Inet, "0.0.0.0/0"),
            (netlink_packet_route::AddressFamily::Inet6, "::/0"),
        ] {
            let mut r = RouteMessage::default();
            r.header.address_family = family;
            r.header.table = RouteHeader::RT_TABLE_MAIN;
            r.header.protocol = RouteProtocol::Boot;
            r.header.kind = RouteType::Unicast;
            r.attributes.push(RouteAttribute::Oif(2));
            let route = route_of(&r, &names).expect("a route to carry");
            assert_eq!(route.destination.map(|d| d.to_string()).as_deref(), Some(want));
            assert_eq!((route.gateway, route.device.as_str()), (None, "eth0"));
        }
    }

    #[test]
    fn joey_tap_names() {
        for yes in ["tap0_joey", "tap12_joey"] {
            assert!(is_joey_tap(yes), "{yes}");
        }
        for no in [
            "tap_joey",
            "tapx_joey",
            "tap0",
            "eth0",
            "tap0_joey0",
            "xtap0_joey",
        ] {
            assert!(!is_joey_tap(no), "{no}");
        }
    }

    #[test]
    fn link_local_ipv6_is_fe80_slash_10() {
        let ll: IpAddr = "fe80::1".parse().unwrap();
        let ll2: IpAddr = "febf::1".parse().unwrap();
        let not: IpAddr = "fec0::1".parse().unwrap();
        let v4: IpAddr = "10.200.0.1".parse().unwrap();
        assert!(is_ipv6_link_local(&ll) && is_ipv6_link_local(&ll2));
        assert!(!is_ipv6_link_local(&not) && !is_ipv6_link_local(&v4));
    }
}
