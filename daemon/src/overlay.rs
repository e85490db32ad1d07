//! The overlay as data: what the kernel should hold ([`desired`]), and the
//! steps from what it holds to that ([`diff`]). Both pure; `kernel` reads
//! and writes the kernel.
//!
//! Per remote node (flannel's VXLAN layout):
//! ```text
//! neigh  <peer subnet>.0 lladdr <peer vtep mac> dev ferry.<vni> nud permanent
//! fdb    <peer vtep mac> dst <peer underlay ip> dev ferry.<vni> self permanent
//! route  <peer subnet> via <peer subnet>.0 dev ferry.<vni> onlink proto 0xfe
//! ```
//! or, with DirectRouting and a peer on the same L2 segment, just
//! `route <peer subnet> via <peer underlay ip> dev <underlay> proto 0xfe`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::record::{Mac, NodeRecord};

/// This node, as the overlay needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub node: String,
    pub subnet: Ipv4Network,
    pub underlay_ip: Ipv4Addr,
    pub underlay_index: u32,
    pub underlay_mtu: u32,
    /// Networks directly connected on the underlay interface.
    pub underlay_nets: Vec<Ipv4Network>,
    pub vtep_mac: Mac,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub device: String,
    pub vni: u32,
    pub port: u16,
    pub mtu: Option<u32>,
    pub direct_routing: bool,
    pub cluster: Ipv4Network,
}

/// VXLAN overhead over IPv4: outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;

impl Params {
    pub fn mtu(&self, underlay_mtu: u32) -> u32 {
        self.mtu
            .unwrap_or_else(|| underlay_mtu.saturating_sub(VXLAN_OVERHEAD))
    }
}

/// The VXLAN device's settings; any difference but the MTU means recreate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    pub link: u32,
    pub mtu: u32,
    pub mac: Mac,
    pub learning: bool,
}

/// Which device a route leaves through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dev {
    Vxlan,
    Underlay,
    Other(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub dst: Ipv4Network,
    pub gw: Ipv4Addr,
    pub dev: Dev,
    pub onlink: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub device: DeviceSpec,
    /// `<own subnet>.0/32` on the VXLAN device: the source of packets the
    /// node itself sends into the overlay.
    pub vtep_addr: Ipv4Network,
    pub neighs: BTreeMap<Ipv4Addr, Mac>,
    pub fdb: BTreeMap<Mac, Ipv4Addr>,
    pub routes: BTreeMap<Ipv4Network, Route>,
    /// Peers by name, for logging and metrics.
    pub peers: Vec<String>,
}

/// Whether `ip` is on one of the directly connected `nets`.
fn on_link(ip: Ipv4Addr, nets: &[Ipv4Network]) -> bool {
    nets.iter().any(|n| n.prefix() < 32 && n.contains(ip))
}

/// What the kernel should hold, given the live records of the store.
///
/// Skips this node, records of another node claiming our subnet or our VTEP
/// MAC, subnets outside the cluster CIDR and overlapping duplicates (the
/// first, in name order, wins) — a bad record must not break the others.
pub fn desired(local: &Local, p: &Params, nodes: &[NodeRecord]) -> Desired {
    let mut d = Desired {
        device: DeviceSpec {
            name: p.device.clone(),
            vni: p.vni,
            port: p.port,
            local: local.underlay_ip,
            link: local.underlay_index,
            mtu: p.mtu(local.underlay_mtu),
            mac: local.vtep_mac,
            learning: false,
        },
        vtep_addr: Ipv4Network::new(local.subnet.network(), 32).expect("valid"),
        neighs: BTreeMap::new(),
        fdb: BTreeMap::new(),
        routes: BTreeMap::new(),
        peers: Vec::new(),
    };
    let mut sorted: Vec<&NodeRecord> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.node.cmp(&b.node));
    let mut taken: Vec<Ipv4Network> = vec![local.subnet];
    for n in sorted {
        if n.node == local.node
            || n.left
            || !p.cluster.is_supernet_of(n.subnet)
            || taken.iter().any(|t| t.overlaps(n.subnet))
            || n.vtep_mac == local.vtep_mac
            || n.underlay_ip == local.underlay_ip
            || d.fdb.contains_key(&n.vtep_mac)
        {
            continue;
        }
        taken.push(n.subnet);
        d.peers.push(n.node.clone());
        if p.direct_routing && on_link(n.underlay_ip, &local.underlay_nets) {
            d.routes.insert(
                n.subnet,
                Route {
                    dst: n.subnet,
                    gw: n.underlay_ip,
                    dev: Dev::Underlay,
                    onlink: false,
                },
            );
            continue;
        }
        let vtep = n.subnet.network();
        d.neighs.insert(vtep, n.vtep_mac);
        d.fdb.insert(n.vtep_mac, n.underlay_ip);
        d.routes.insert(
            n.subnet,
            Route {
                dst: n.subnet,
                gw: vtep,
                dev: Dev::Vxlan,
                onlink: true,
            },
        );
    }
    d
}

/// The VXLAN device as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedDevice {
    pub is_vxlan: bool,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<Ipv4Addr>,
    pub link: Option<u32>,
    pub learning: Option<bool>,
    pub mtu: u32,
    pub mac: Option<Mac>,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub device: Option<ObservedDevice>,
    /// IPv4 addresses on the device.
    pub addrs: Vec<Ipv4Network>,
    /// Neighbours on the device: IP, MAC, permanent.
    pub neighs: Vec<(Ipv4Addr, Option<Mac>, bool)>,
    /// FDB entries on the device: MAC, remote.
    pub fdb: Vec<(Mac, Option<Ipv4Addr>)>,
    /// ferry's routes (protocol 0xfe) into the cluster CIDR, own subnet excluded.
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    DeleteDevice,
    CreateDevice(DeviceSpec),
    SetMtu(u32),
    SetUp,
    AddAddr(Ipv4Network),
    DelAddr(Ipv4Network),
    DelRoute(Route),
    DelNeigh(Ipv4Addr),
    DelFdb(Mac, Option<Ipv4Addr>),
    SetNeigh(Ipv4Addr, Mac),
    SetFdb(Mac, Ipv4Addr),
    SetRoute(Route),
}

impl Action {
    pub fn is_device(&self) -> bool {
        matches!(self, Action::DeleteDevice | Action::CreateDevice(_))
    }
}

fn device_drifted(want: &DeviceSpec, have: &ObservedDevice) -> bool {
    !have.is_vxlan
        || have.vni != Some(want.vni)
        || have.port != Some(want.port)
        || have.local != Some(want.local)
        || have.link != Some(want.link)
        || have.learning != Some(want.learning)
        || have.mac != Some(want.mac)
}

/// The steps that turn `have` into `want`, in a safe order: the device
/// first; then stale routes, neighbours and FDB entries; then, per peer,
/// neighbour, FDB and route (a route never points at a missing neighbour).
/// Empty when the kernel already holds exactly the desired state.
pub fn diff(want: &Desired, have: &Observed) -> Vec<Action> {
    let mut out = Vec::new();
    // A device (re)created from scratch holds nothing yet; only routes via
    // the underlay survive it.
    let fresh = Observed {
        routes: have
            .routes
            .iter()
            .filter(|r| r.dev != Dev::Vxlan)
            .copied()
            .collect(),
        ..Observed::default()
    };
    let have = match &have.device {
        None => {
            out.push(Action::CreateDevice(want.device.clone()));
            &fresh
        }
        Some(dev) if device_drifted(&want.device, dev) => {
            out.push(Action::DeleteDevice);
            out.push(Action::CreateDevice(want.device.clone()));
            &fresh
        }
        Some(dev) => {
            if dev.mtu != want.device.mtu {
                out.push(Action::SetMtu(want.device.mtu));
            }
            if !dev.up {
                out.push(Action::SetUp);
            }
            have
        }
    };
    if !have.addrs.contains(&want.vtep_addr) {
        out.push(Action::AddAddr(want.vtep_addr));
    }
    for a in &have.addrs {
        if *a != want.vtep_addr {
            out.push(Action::DelAddr(*a));
        }
    }
    // Stale first.
    for r in &have.routes {
        if !want.routes.contains_key(&r.dst) {
            out.push(Action::DelRoute(*r));
        }
    }
    for (ip, _, _) in &have.neighs {
        if !want.neighs.contains_key(ip) {
            out.push(Action::DelNeigh(*ip));
        }
    }
    for (mac, dst) in &have.fdb {
        if !want.fdb.contains_key(mac) {
            out.push(Action::DelFdb(*mac, *dst));
        }
    }
    // Then what is missing or wrong, per peer in order.
    let mut by_route: Vec<&Route> = want.routes.values().collect();
    by_route.sort_by_key(|r| r.dst);
    for r in by_route {
        if r.dev == Dev::Vxlan {
            let mac = want.neighs[&r.gw];
            if !have
                .neighs
                .iter()
                .any(|(ip, m, perm)| *ip == r.gw && *m == Some(mac) && *perm)
            {
                out.push(Action::SetNeigh(r.gw, mac));
            }
            let dst = want.fdb[&mac];
            let fdb_for_mac: Vec<_> = have.fdb.iter().filter(|(m, _)| *m == mac).collect();
            match fdb_for_mac.as_slice() {
                [(_, d)] if *d == Some(dst) => {}
                // Replace semantics: one remote, rewritten in place.
                [] | [_] => out.push(Action::SetFdb(mac, dst)),
                many => {
                    for (m, d) in many.iter().filter(|(_, d)| *d != Some(dst)) {
                        out.push(Action::DelFdb(*m, *d));
                    }
                    if !many.iter().any(|(_, d)| *d == Some(dst)) {
                        out.push(Action::SetFdb(mac, dst));
                    }
                }
            }
        }
        let present: Vec<&Route> = have.routes.iter().filter(|h| h.dst == r.dst).collect();
        if present.len() != 1 || present[0] != r {
            out.push(Action::SetRoute(*r));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn local() -> Local {
        Local {
            node: "a".into(),
            subnet: net("10.244.0.0/24"),
            underlay_ip: ip("192.168.50.1"),
            underlay_index: 2,
            underlay_mtu: 1500,
            underlay_nets: vec![net("192.168.50.0/24")],
            vtep_mac: Mac::for_vtep("a", 1),
        }
    }

    fn params(direct: bool) -> Params {
        Params {
            device: "ferry.1".into(),
            vni: 1,
            port: 8472,
            mtu: None,
            direct_routing: direct,
            cluster: net("10.244.0.0/16"),
        }
    }

    fn rec(name: &str, subnet: &str, underlay: &str) -> NodeRecord {
        NodeRecord {
            node: name.into(),
            subnet: net(subnet),
            underlay_ip: ip(underlay),
            vtep_mac: Mac::for_vtep(name, 1),
            left: false,
        }
    }

    fn cluster() -> Vec<NodeRecord> {
        vec![
            rec("a", "10.244.0.0/24", "192.168.50.1"),
            rec("b", "10.244.1.0/24", "192.168.50.2"),
            rec("c", "10.244.2.0/24", "10.9.9.9"),
        ]
    }

    /// What the kernel would hold after applying `want` to nothing.
    fn observed_of(want: &Desired) -> Observed {
        Observed {
            device: Some(ObservedDevice {
                is_vxlan: true,
                vni: Some(want.device.vni),
                port: Some(want.device.port),
                local: Some(want.device.local),
                link: Some(want.device.link),
                learning: Some(false),
                mtu: want.device.mtu,
                mac: Some(want.device.mac),
                up: true,
            }),
            addrs: vec![want.vtep_addr],
            neighs: want
                .neighs
                .iter()
                .map(|(i, m)| (*i, Some(*m), true))
                .collect(),
            fdb: want.fdb.iter().map(|(m, i)| (*m, Some(*i))).collect(),
            routes: want.routes.values().copied().collect(),
        }
    }

    #[test]
    fn desired_vxlan_full_mesh() {
        let d = desired(&local(), &params(false), &cluster());
        assert_eq!(d.device.mtu, 1450);
        assert_eq!(d.vtep_addr, net("10.244.0.0/32"));
        assert_eq!(d.peers, vec!["b", "c"]);
        assert_eq!(d.neighs[&ip("10.244.1.0")], Mac::for_vtep("b", 1));
        assert_eq!(d.fdb[&Mac::for_vtep("c", 1)], ip("10.9.9.9"));
        let r = d.routes[&net("10.244.2.0/24")];
        assert_eq!(
            (r.gw, r.dev, r.onlink),
            (ip("10.244.2.0"), Dev::Vxlan, true)
        );
    }

    #[test]
    fn desired_direct_routing_only_on_link() {
        let d = desired(&local(), &params(true), &cluster());
        let b = d.routes[&net("10.244.1.0/24")];
        assert_eq!(
            (b.gw, b.dev, b.onlink),
            (ip("192.168.50.2"), Dev::Underlay, false)
        );
        assert!(!d.neighs.contains_key(&ip("10.244.1.0")));
        // c is behind a router: still VXLAN.
        assert_eq!(d.routes[&net("10.244.2.0/24")].dev, Dev::Vxlan);
    }

    #[test]
    fn desired_skips_bad_records() {
        let mut nodes = cluster();
        nodes.push(rec("d", "10.244.1.0/24", "192.168.50.4")); // b's subnet
        nodes.push(rec("e", "10.99.0.0/24", "192.168.50.5")); // outside cluster
        nodes.push(rec("f", "10.244.0.0/24", "192.168.50.6")); // our subnet
        let mut left = rec("g", "10.244.7.0/24", "192.168.50.7");
        left.left = true;
        nodes.push(left);
        let d = desired(&local(), &params(false), &nodes);
        assert_eq!(d.peers, vec!["b", "c"]);
        assert_eq!(d.routes.len(), 2);
    }

    #[test]
    fn mtu_override() {
        let mut p = params(false);
        p.mtu = Some(1400);
        assert_eq!(desired(&local(), &p, &[]).device.mtu, 1400);
    }

    #[test]
    fn diff_from_nothing_orders_device_neigh_fdb_route() {
        let d = desired(&local(), &params(false), &cluster());
        let acts = diff(&d, &Observed::default());
        assert!(matches!(acts[0], Action::CreateDevice(_)));
        assert_eq!(acts[1], Action::AddAddr(net("10.244.0.0/32")));
        let kinds: Vec<&str> = acts[2..]
            .iter()
            .map(|a| match a {
                Action::SetNeigh(..) => "neigh",
                Action::SetFdb(..) => "fdb",
                Action::SetRoute(..) => "route",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["neigh", "fdb", "route", "neigh", "fdb", "route"]);
    }

    #[test]
    fn diff_of_converged_state_is_empty() {
        for direct in [false, true] {
            let d = desired(&local(), &params(direct), &cluster());
            assert_eq!(diff(&d, &observed_of(&d)), vec![]);
        }
    }

    #[test]
    fn node_leaving_removes_route_then_neigh_then_fdb() {
        let before = desired(&local(), &params(false), &cluster());
        let after = desired(&local(), &params(false), &cluster()[..2]);
        let acts = diff(&after, &observed_of(&before));
        assert_eq!(
            acts,
            vec![
                Action::DelRoute(before.routes[&net("10.244.2.0/24")]),
                Action::DelNeigh(ip("10.244.2.0")),
                Action::DelFdb(Mac::for_vtep("c", 1), Some(ip("10.9.9.9"))),
            ]
        );
    }

    #[test]
    fn drift_recreates_device_and_repopulates() {
        let d = desired(&local(), &params(false), &cluster());
        let mut o = observed_of(&d);
        o.device.as_mut().unwrap().learning = Some(true);
        let acts = diff(&d, &o);
        assert_eq!(acts[0], Action::DeleteDevice);
        assert!(matches!(acts[1], Action::CreateDevice(_)));
        assert_eq!(
            acts.iter()
                .filter(|a| matches!(a, Action::SetRoute(_)))
                .count(),
            2
        );
        // MTU and down-ness are fixed in place.
        let mut o = observed_of(&d);
        o.device.as_mut().unwrap().mtu = 1500;
        o.device.as_mut().unwrap().up = false;
        assert_eq!(diff(&d, &o), vec![Action::SetMtu(1450), Action::SetUp]);
    }

    #[test]
    fn changed_peer_is_replaced_not_deleted() {
        let before = desired(&local(), &params(false), &cluster());
        let mut nodes = cluster();
        nodes[1].underlay_ip = ip("192.168.50.22");
        let after = desired(&local(), &params(false), &nodes);
        let acts = diff(&after, &observed_of(&before));
        assert_eq!(
            acts,
            vec![Action::SetFdb(Mac::for_vtep("b", 1), ip("192.168.50.22"))]
        );
    }

    #[test]
    fn missing_entries_are_restored() {
        let d = desired(&local(), &params(false), &cluster());
        let mut o = observed_of(&d);
        o.neighs.clear();
        o.routes.retain(|r| r.dst != net("10.244.1.0/24"));
        o.neighs
            .push((ip("10.244.1.0"), Some(Mac::for_vtep("b", 1)), false)); // not permanent
        let acts = diff(&d, &o);
        assert_eq!(
            acts,
            vec![
                Action::SetNeigh(ip("10.244.1.0"), Mac::for_vtep("b", 1)),
                Action::SetRoute(d.routes[&net("10.244.1.0/24")]),
                Action::SetNeigh(ip("10.244.2.0"), Mac::for_vtep("c", 1)),
            ]
        );
    }
}
