//! The overlay's I/O edge: read what the kernel holds into an
//! [`Observed`], apply [`Action`]s, and find the underlay. Synchronous
//! netlink (the plugin's client); call from a blocking thread. ferryd runs
//! inside the node's network namespace, so no setns is ever needed.

use std::net::{IpAddr, Ipv4Addr};

use ferry::netlink::{Netlink, NlError, RTPROT_FERRY};
use ipnetwork::{IpNetwork, Ipv4Network};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::errno::Errno;

use crate::config::UnderlaySpec;
use crate::overlay::{Action, Desired, Dev, DeviceSpec, Observed, ObservedDevice, Route};
use crate::record::Mac;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: NlError,
    },
    #[error("underlay interface {0:?} does not exist")]
    NoSuchUnderlay(String),
    #[error("underlay interface {0:?} has no IPv4 address")]
    UnderlayNoAddress(String),
    #[error("underlay address {0} is not assigned to any interface")]
    UnderlayIpNotFound(Ipv4Addr),
    #[error("underlay address {0} is not on interface {1:?}")]
    UnderlayIpNotOnIface(Ipv4Addr, String),
    #[error(
        "no IPv4 default route to pick the underlay from; pass --underlay-iface or --underlay-ip"
    )]
    NoDefaultRoute,
    #[error("VXLAN device {0:?} vanished while being configured")]
    DeviceVanished(String),
}

impl KernelError {
    fn nl(what: impl Into<String>) -> impl FnOnce(NlError) -> KernelError {
        let what = what.into();
        move |source| KernelError::Netlink { what, source }
    }
}

pub type KResult<T> = Result<T, KernelError>;

/// The underlay as found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub name: String,
    pub index: u32,
    pub ip: Ipv4Addr,
    pub mtu: u32,
    pub nets: Vec<Ipv4Network>,
}

fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_mtu(l: &LinkMessage) -> u32 {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0)
}

pub fn links(nl: &mut Netlink) -> KResult<Vec<LinkMessage>> {
    Ok(nl
        .dump(
            "list links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
        )
        .map_err(KernelError::nl("list links"))?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(l),
            _ => None,
        })
        .collect())
}

pub fn find_link(nl: &mut Netlink, name: &str) -> KResult<Option<LinkMessage>> {
    Ok(links(nl)?.into_iter().find(|l| link_name(l) == Some(name)))
}

/// IPv4 addresses with their interface index.
pub fn ipv4_addresses(nl: &mut Netlink) -> KResult<Vec<(u32, Ipv4Network)>> {
    let msgs = nl
        .dump(
            "list addresses",
            RouteNetlinkMessage::GetAddress(Default::default()),
        )
        .map_err(KernelError::nl("list addresses"))?;
    let mut out = Vec::new();
    for m in msgs {
        let RouteNetlinkMessage::NewAddress(a) = m else {
            continue;
        };
        let ip = a
            .attributes
            .iter()
            .find_map(|x| match x {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })
            .or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })
            });
        if let Some(ip) = ip {
            if let Ok(n) = Ipv4Network::new(ip, a.header.prefix_len) {
                out.push((a.header.index, n));
            }
        }
    }
    Ok(out)
}

/// Finds the underlay interface, its address and MTU; changes nothing.
pub fn resolve_underlay(nl: &mut Netlink, spec: &UnderlaySpec) -> KResult<Underlay> {
    let all_links = links(nl)?;
    let addrs = ipv4_addresses(nl)?;
    let by_index = |i: u32| all_links.iter().find(|l| l.header.index == i);
    let by_name = |n: &str| all_links.iter().find(|l| link_name(l) == Some(n));
    let (link, ip) = match spec {
        UnderlaySpec::Iface(name) => {
            let l = by_name(name).ok_or_else(|| KernelError::NoSuchUnderlay(name.clone()))?;
            let ip = addrs
                .iter()
                .find(|(i, _)| *i == l.header.index)
                .map(|(_, n)| n.ip())
                .ok_or_else(|| KernelError::UnderlayNoAddress(name.clone()))?;
            (l, ip)
        }
        UnderlaySpec::Both(name, ip) => {
            let l = by_name(name).ok_or_else(|| KernelError::NoSuchUnderlay(name.clone()))?;
            if !addrs
                .iter()
                .any(|(i, n)| *i == l.header.index && n.ip() == *ip)
            {
                return Err(KernelError::UnderlayIpNotOnIface(*ip, name.clone()));
            }
            (l, *ip)
        }
        UnderlaySpec::Ip(ip) => {
            let (idx, _) = addrs
                .iter()
                .find(|(_, n)| n.ip() == *ip)
                .ok_or(KernelError::UnderlayIpNotFound(*ip))?;
            (
                by_index(*idx).ok_or(KernelError::UnderlayIpNotFound(*ip))?,
                *ip,
            )
        }
        UnderlaySpec::Auto => {
            let routes = nl
                .routes(AddressFamily::Inet)
                .map_err(KernelError::nl("list routes"))?;
            let oif = routes
                .iter()
                .find(|r| r.dst.prefix() == 0 && r.oif.is_some())
                .and_then(|r| r.oif)
                .ok_or(KernelError::NoDefaultRoute)?;
            let l = by_index(oif).ok_or(KernelError::NoDefaultRoute)?;
            let name = link_name(l).unwrap_or_default().to_string();
            let ip = addrs
                .iter()
                .find(|(i, _)| *i == oif)
                .map(|(_, n)| n.ip())
                .ok_or(KernelError::UnderlayNoAddress(name))?;
            (l, ip)
        }
    };
    Ok(Underlay {
        name: link_name(link).unwrap_or_default().to_string(),
        index: link.header.index,
        ip,
        mtu: link_mtu(link),
        nets: addrs
            .iter()
            .filter(|(i, _)| *i == link.header.index)
            .map(|(_, n)| *n)
            .collect(),
    })
}

fn observe_device(l: &LinkMessage) -> ObservedDevice {
    let mut d = ObservedDevice {
        is_vxlan: false,
        vni: None,
        port: None,
        local: None,
        link: None,
        learning: None,
        mtu: link_mtu(l),
        mac: None,
        up: l.header.flags.contains(LinkFlags::Up),
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::Address(m) if m.len() == 6 => {
                d.mac = Some(Mac(m.as_slice().try_into().expect("6 bytes")))
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(InfoKind::Vxlan) => d.is_vxlan = true,
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            for x in v {
                                match x {
                                    InfoVxlan::Id(id) => d.vni = Some(*id),
                                    InfoVxlan::Port(p) => d.port = Some(*p),
                                    InfoVxlan::Local(ip) => d.local = Some(*ip),
                                    InfoVxlan::Link(i) => d.link = Some(*i),
                                    InfoVxlan::Learning(b) => d.learning = Some(*b),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    d
}

/// Everything of the overlay the kernel holds now.
pub fn observe(
    nl: &mut Netlink,
    device: &str,
    underlay_index: u32,
    cluster: Ipv4Network,
    own_subnet: Ipv4Network,
) -> KResult<(Observed, Option<u32>)> {
    let mut o = Observed::default();
    let dev = find_link(nl, device)?;
    let index = dev.as_ref().map(|l| l.header.index);
    if let Some(l) = &dev {
        o.device = Some(observe_device(l));
        let idx = l.header.index;
        o.addrs = ipv4_addresses(nl)?
            .into_iter()
            .filter(|(i, _)| *i == idx)
            .map(|(_, n)| n)
            .collect();
        let mut q = NeighbourMessage::default();
        q.header.family = AddressFamily::Inet;
        for m in nl
            .dump("list neighbours", RouteNetlinkMessage::GetNeighbour(q))
            .map_err(KernelError::nl("list neighbours"))?
        {
            let RouteNetlinkMessage::NewNeighbour(n) = m else {
                continue;
            };
            if n.header.ifindex != idx {
                continue;
            }
            let (ip, mac) = neigh_parts(&n);
            if let Some(ip) = ip {
                o.neighs
                    .push((ip, mac, n.header.state == NeighbourState::Permanent));
            }
        }
        let mut q = NeighbourMessage::default();
        q.header.family = AddressFamily::Bridge;
        for m in nl
            .dump("list fdb", RouteNetlinkMessage::GetNeighbour(q))
            .map_err(KernelError::nl("list fdb"))?
        {
            let RouteNetlinkMessage::NewNeighbour(n) = m else {
                continue;
            };
            if n.header.ifindex != idx {
                continue;
            }
            let (ip, mac) = neigh_parts(&n);
            if let Some(mac) = mac {
                o.fdb.push((mac, ip));
            }
        }
    }
    let mut q = RouteMessage::default();
    q.header.address_family = AddressFamily::Inet;
    for m in nl
        .dump("list routes", RouteNetlinkMessage::GetRoute(q))
        .map_err(KernelError::nl("list routes"))?
    {
        let RouteNetlinkMessage::NewRoute(r) = m else {
            continue;
        };
        if r.header.table != RouteHeader::RT_TABLE_MAIN
            || r.header.protocol != RouteProtocol::from(RTPROT_FERRY)
            || r.header.kind != RouteType::Unicast
        {
            continue;
        }
        let mut dst = None;
        let mut gw = None;
        let mut oif = None;
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        let (Some(dst), Some(gw)) = (dst, gw) else {
            continue;
        };
        let Ok(dst) = Ipv4Network::new(dst, r.header.destination_prefix_length) else {
            continue;
        };
        if !cluster.is_supernet_of(dst) || dst.overlaps(own_subnet) {
            continue;
        }
        let dev = match oif {
            Some(i) if Some(i) == index => Dev::Vxlan,
            Some(i) if i == underlay_index => Dev::Underlay,
            Some(i) => Dev::Other(i),
            None => Dev::Other(0),
        };
        o.routes.push(Route {
            dst,
            gw,
            dev,
            onlink: r.header.flags.contains(RouteFlags::Onlink),
        });
    }
    Ok((o, index))
}

fn neigh_parts(n: &NeighbourMessage) -> (Option<Ipv4Addr>, Option<Mac>) {
    let mut ip = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => ip = Some(*i),
            // FDB entries (AF_BRIDGE) carry the remote as raw bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                ip = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => {
                mac = Some(Mac(m.as_slice().try_into().expect("6 bytes")))
            }
            _ => {}
        }
    }
    (ip, mac)
}

fn create_device(nl: &mut Netlink, s: &DeviceSpec) -> KResult<()> {
    let mut msg = LinkMessage::default();
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg.attributes.push(LinkAttribute::IfName(s.name.clone()));
    msg.attributes
        .push(LinkAttribute::Address(s.mac.0.to_vec()));
    msg.attributes.push(LinkAttribute::Mtu(s.mtu));
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Vxlan),
        LinkInfo::Data(InfoData::Vxlan(vec![
            InfoVxlan::Id(s.vni),
            InfoVxlan::Local(s.local),
            InfoVxlan::Link(s.link),
            InfoVxlan::Port(s.port),
            InfoVxlan::Learning(s.learning),
        ])),
    ]));
    nl.request(
        "create vxlan device",
        RouteNetlinkMessage::NewLink(msg),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map_err(KernelError::nl(format!("create VXLAN device {}", s.name)))
}

fn neigh_msg(
    family: AddressFamily,
    ifindex: u32,
    ip: Option<Ipv4Addr>,
    mac: Option<Mac>,
) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::Permanent;
    if family == AddressFamily::Bridge {
        m.header.flags = NeighbourFlags::Own;
    }
    if let Some(mac) = mac {
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    }
    if let Some(ip) = ip {
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    }
    m
}

fn route_msg(r: &Route, vxlan: u32, underlay: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.destination_prefix_length = r.dst.prefix();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::from(RTPROT_FERRY);
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    if r.onlink {
        m.header.flags = RouteFlags::Onlink;
    }
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(
            r.dst.network(),
        )));
    m.attributes
        .push(RouteAttribute::Gateway(RouteAddress::Inet(r.gw)));
    let oif = match r.dev {
        Dev::Vxlan => Some(vxlan),
        Dev::Underlay => Some(underlay),
        Dev::Other(0) => None,
        Dev::Other(i) => Some(i),
    };
    if let Some(oif) = oif {
        m.attributes.push(RouteAttribute::Oif(oif));
    }
    m
}

fn ignore(r: Result<(), NlError>, ok: &[Errno]) -> Result<(), NlError> {
    match r {
        Err(e) if e.errno().is_some_and(|x| ok.contains(&x)) => Ok(()),
        r => r,
    }
}

/// Applies one action. `index` is the VXLAN device's, once it exists.
fn apply_one(
    nl: &mut Netlink,
    a: &Action,
    device: &str,
    index: Option<u32>,
    underlay: u32,
) -> KResult<()> {
    let idx = || index.ok_or_else(|| KernelError::DeviceVanished(device.to_string()));
    let what = format!("{a:?}");
    let r = match a {
        Action::DeleteDevice => ignore(nl.del_link_by_name(device), &[Errno::ENODEV]),
        Action::CreateDevice(s) => return create_device(nl, s),
        Action::SetMtu(m) => nl.set_link(
            idx()?,
            LinkFlags::empty(),
            LinkFlags::empty(),
            vec![LinkAttribute::Mtu(*m)],
        ),
        Action::SetUp => nl.set_link(idx()?, LinkFlags::Up, LinkFlags::Up, vec![]),
        Action::AddAddr(n) => ignore(
            nl.add_address(idx()?, IpNetwork::V4(*n), false),
            &[Errno::EEXIST],
        ),
        Action::DelAddr(n) => ignore(
            nl.del_address(idx()?, IpNetwork::V4(*n)),
            &[Errno::EADDRNOTAVAIL, Errno::ENOENT],
        ),
        Action::SetNeigh(ip, mac) => nl.request(
            "replace neighbour",
            RouteNetlinkMessage::NewNeighbour(neigh_msg(
                AddressFamily::Inet,
                idx()?,
                Some(*ip),
                Some(*mac),
            )),
            NLM_F_CREATE | NLM_F_REPLACE,
        ),
        Action::DelNeigh(ip) => ignore(
            nl.request(
                "delete neighbour",
                RouteNetlinkMessage::DelNeighbour(neigh_msg(
                    AddressFamily::Inet,
                    idx()?,
                    Some(*ip),
                    None,
                )),
                0,
            ),
            &[Errno::ENOENT],
        ),
        Action::SetFdb(mac, dst) => nl.request(
            "replace fdb",
            RouteNetlinkMessage::NewNeighbour(neigh_msg(
                AddressFamily::Bridge,
                idx()?,
                Some(*dst),
                Some(*mac),
            )),
            NLM_F_CREATE | NLM_F_REPLACE,
        ),
        Action::DelFdb(mac, dst) => ignore(
            nl.request(
                "delete fdb",
                RouteNetlinkMessage::DelNeighbour(neigh_msg(
                    AddressFamily::Bridge,
                    idx()?,
                    *dst,
                    Some(*mac),
                )),
                0,
            ),
            &[Errno::ENOENT],
        ),
        Action::SetRoute(r) => nl.request(
            "replace route",
            RouteNetlinkMessage::NewRoute(route_msg(r, index.unwrap_or(0), underlay)),
            NLM_F_CREATE | NLM_F_REPLACE,
        ),
        Action::DelRoute(r) => ignore(
            nl.request(
                "delete route",
                RouteNetlinkMessage::DelRoute(route_msg(r, index.unwrap_or(0), underlay)),
                0,
            ),
            &[Errno::ESRCH, Errno::ENOENT],
        ),
    };
    r.map_err(KernelError::nl(what))
}

/// Applies `acts` (from [`crate::overlay::delta`]: no device changes) to
/// the VXLAN device `index`, in order.
pub fn apply(
    nl: &mut Netlink,
    acts: &[Action],
    device: &str,
    index: u32,
    underlay_index: u32,
) -> KResult<()> {
    for a in acts {
        apply_one(nl, a, device, Some(index), underlay_index)?;
    }
    Ok(())
}

/// Brings the kernel to `want`: observe (one dump per object kind), diff,
/// apply; after device changes it observes again. Returns the actions
/// applied (empty when converged) and the VXLAN device's index.
pub fn reconcile(
    nl: &mut Netlink,
    want: &Desired,
    underlay_index: u32,
    cluster: Ipv4Network,
    own_subnet: Ipv4Network,
) -> KResult<(Vec<Action>, Option<u32>)> {
    let device = want.device.name.as_str();
    let (have, mut index) = observe(nl, device, underlay_index, cluster, own_subnet)?;
    let mut acts = crate::overlay::diff(want, &have);
    let mut done = Vec::new();
    if acts.iter().any(Action::is_device) {
        for a in acts.iter().filter(|a| a.is_device()) {
            apply_one(nl, a, device, index, underlay_index)?;
        }
        done.extend(acts.iter().filter(|a| a.is_device()).cloned());
        let (have, i) = observe(nl, device, underlay_index, cluster, own_subnet)?;
        index = i;
        acts = crate::overlay::diff(want, &have);
    }
    for a in &acts {
        apply_one(nl, a, device, index, underlay_index)?;
    }
    done.extend(acts);
    Ok((done, index))
}

/// Writes a sysctl of the current network namespace (`/proc/sys/net/...`).
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onlink_route_message() {
        let r = Route {
            dst: "10.244.1.0/24".parse().unwrap(),
            gw: "10.244.1.0".parse().unwrap(),
            dev: Dev::Vxlan,
            onlink: true,
        };
        let m = route_msg(&r, 7, 2);
        assert!(m.header.flags.contains(RouteFlags::Onlink));
        assert_eq!(m.header.protocol, RouteProtocol::from(RTPROT_FERRY));
        assert!(m.attributes.contains(&RouteAttribute::Oif(7)));
    }

    #[test]
    fn fdb_message_is_self_permanent() {
        let m = neigh_msg(
            AddressFamily::Bridge,
            3,
            Some("1.2.3.4".parse().unwrap()),
            Some(Mac([2, 0, 0, 0, 0, 1])),
        );
        assert_eq!(m.header.flags, NeighbourFlags::Own);
        assert_eq!(m.header.state, NeighbourState::Permanent);
    }
}
