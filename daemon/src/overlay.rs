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

use std::collections::{BTreeMap, HashMap};
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
}

impl Desired {
    /// One route per peer.
    pub fn peers(&self) -> usize {
        self.routes.len()
    }
}

/// Whether `ip` is on one of the directly connected `nets`.
fn on_link(ip: Ipv4Addr, nets: &[Ipv4Network]) -> bool {
    nets.iter().any(|n| n.prefix() < 32 && n.contains(ip))
}

fn overlap(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// What the kernel should hold, given the live records of the store.
///
/// Skips this node, records of another node claiming our subnet, our VTEP
/// MAC or our underlay address, subnets outside the cluster CIDR, and of
/// records that clash with each other (overlapping subnets, one VTEP MAC)
/// all but the first in name order — a bad record must not break the
/// others.
pub fn desired(local: &Local, p: &Params, nodes: &[NodeRecord]) -> Desired {
    let keyed = nodes
        .iter()
        .map(|n| (crate::record::subnet_key(n.subnet), n));
    Overlay::new(local, p, keyed).desired
}

/// [`desired`], kept current one record at a time: a change of one peer
/// costs that peer's entries, not a walk over every record (at 5,000 peers
/// the walk and the comparison after it were most of a change's cost).
///
/// A change is its own only while no two records clash: then every usable
/// record is a peer whatever the order. On a change that would make a
/// clash, and on any change while one exists, [`Overlay::update`] rebuilds
/// from every record, since which of two clashing records wins depends on
/// all of them.
#[derive(Debug, Clone)]
pub struct Overlay {
    local: Local,
    params: Params,
    desired: Desired,
    /// The record behind each peer, by the key the store holds it under.
    peers: HashMap<String, NodeRecord>,
    subnets: Taken,
    macs: HashMap<Mac, String>,
    clash_free: bool,
}

impl Overlay {
    /// From every record, keyed as the store keys them; ties in name order
    /// are broken by subnet, so that any order of `nodes` gives one answer.
    pub fn new<'a>(
        local: &Local,
        p: &Params,
        nodes: impl IntoIterator<Item = (String, &'a NodeRecord)>,
    ) -> Overlay {
        let mut o = Overlay {
            local: local.clone(),
            params: p.clone(),
            desired: Desired {
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
            },
            peers: HashMap::new(),
            subnets: Taken::default(),
            macs: HashMap::new(),
            clash_free: true,
        };
        let mut sorted: Vec<(String, &NodeRecord)> = nodes.into_iter().collect();
        sorted.sort_by(|a, b| (&a.1.node, a.1.subnet).cmp(&(&b.1.node, b.1.subnet)));
        for (key, n) in sorted {
            if !o.usable(n) {
                continue;
            }
            if o.subnets.overlapping(n.subnet).next().is_some() || o.macs.contains_key(&n.vtep_mac)
            {
                o.clash_free = false;
                continue;
            }
            o.add(key, n);
        }
        o
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Whether a record can be a peer at all, whatever the others hold.
    fn usable(&self, n: &NodeRecord) -> bool {
        let l = &self.local;
        n.node != l.node
            && !n.left
            && self.params.cluster.is_supernet_of(n.subnet)
            && !overlap(n.subnet, l.subnet)
            && n.vtep_mac != l.vtep_mac
            && n.underlay_ip != l.underlay_ip
    }

    /// The kernel entries of one peer: its neighbour and FDB entry (VXLAN
    /// only) and its route.
    fn entries_of(&self, n: &NodeRecord) -> Entries {
        let mut e = Entries::default();
        if self.params.direct_routing && on_link(n.underlay_ip, &self.local.underlay_nets) {
            e.routes.insert(
                n.subnet,
                Route {
                    dst: n.subnet,
                    gw: n.underlay_ip,
                    dev: Dev::Underlay,
                    onlink: false,
                },
            );
            return e;
        }
        let vtep = n.subnet.network();
        e.neighs.insert(vtep, n.vtep_mac);
        e.fdb.insert(n.vtep_mac, n.underlay_ip);
        e.routes.insert(
            n.subnet,
            Route {
                dst: n.subnet,
                gw: vtep,
                dev: Dev::Vxlan,
                onlink: true,
            },
        );
        e
    }

    fn add(&mut self, key: String, n: &NodeRecord) {
        let e = self.entries_of(n);
        self.desired.neighs.extend(e.neighs);
        self.desired.fdb.extend(e.fdb);
        self.desired.routes.extend(e.routes);
        self.subnets.insert(n.subnet, key.clone());
        self.macs.insert(n.vtep_mac, key.clone());
        self.peers.insert(key, n.clone());
    }

    /// Removes the peer under `key`; its entries, if it was one.
    fn remove(&mut self, key: &str) -> Entries {
        let Some(n) = self.peers.remove(key) else {
            return Entries::default();
        };
        self.subnets.remove(n.subnet);
        self.macs.remove(&n.vtep_mac);
        let e = self.entries_of(&n);
        for ip in e.neighs.keys() {
            self.desired.neighs.remove(ip);
        }
        for mac in e.fdb.keys() {
            self.desired.fdb.remove(mac);
        }
        for dst in e.routes.keys() {
            self.desired.routes.remove(dst);
        }
        e
    }

    /// Takes the records under the keys that changed (`None`: gone, left
    /// or expired) and returns the kernel steps from what [`desired`] was
    /// to what it is now. One peer after another, each in [`delta`]'s
    /// order; or, when a change clashes with another record or a clash
    /// already exists, rebuilt from `all` (every record now, as for
    /// [`Overlay::new`]) and the [`delta`] to that. True: rebuilt.
    pub fn update<'a, 'b, I>(
        &mut self,
        changed: impl IntoIterator<Item = (&'a str, Option<&'a NodeRecord>)>,
        all: impl FnOnce() -> I,
    ) -> (Vec<Action>, bool)
    where
        I: IntoIterator<Item = (String, &'b NodeRecord)>,
    {
        let mut steps = Vec::new();
        if self.clash_free && self.update_each(changed, &mut steps) {
            return (steps, false);
        }
        let fresh = Overlay::new(&self.local, &self.params, all());
        steps.extend(delta(&self.desired, &fresh.desired).expect("same device"));
        *self = fresh;
        (steps, true)
    }

    /// [`Overlay::update`] one change at a time, each checked before it is
    /// made; false at the first that clashes, with those before it made.
    fn update_each<'a>(
        &mut self,
        changed: impl IntoIterator<Item = (&'a str, Option<&'a NodeRecord>)>,
        steps: &mut Vec<Action>,
    ) -> bool {
        for (key, new) in changed {
            let new = new.filter(|n| self.usable(n));
            if let Some(n) = new {
                let clash = self.subnets.overlapping(n.subnet).any(|k| k != key)
                    || self.macs.get(&n.vtep_mac).is_some_and(|k| k != key);
                if clash {
                    return false;
                }
            }
            let old = self.remove(key);
            let new = match new {
                Some(n) => {
                    self.add(key.to_string(), n);
                    self.entries_of(n)
                }
                None => Entries::default(),
            };
            steps.extend(old.steps_to(&new));
        }
        true
    }
}

/// Neighbours, FDB entries and routes: all of a [`Desired`]'s or one
/// peer's.
#[derive(Debug, Default)]
struct Entries {
    neighs: BTreeMap<Ipv4Addr, Mac>,
    fdb: BTreeMap<Mac, Ipv4Addr>,
    routes: BTreeMap<Ipv4Network, Route>,
}

impl Entries {
    /// Stale routes, neighbours and FDB entries first; then per route its
    /// neighbour, FDB entry and the route itself.
    fn steps_to(&self, new: &Entries) -> Vec<Action> {
        steps(
            (&self.neighs, &self.fdb, &self.routes),
            (&new.neighs, &new.fdb, &new.routes),
        )
    }
}

type EntryMaps<'a> = (
    &'a BTreeMap<Ipv4Addr, Mac>,
    &'a BTreeMap<Mac, Ipv4Addr>,
    &'a BTreeMap<Ipv4Network, Route>,
);

/// The steps from one set of entries to another (see [`delta`]).
fn steps(old: EntryMaps, new: EntryMaps) -> Vec<Action> {
    let ((old_neighs, old_fdb, old_routes), (neighs, fdb, routes)) = (old, new);
    let mut out = Vec::new();
    for (dst, r) in old_routes {
        if !routes.contains_key(dst) {
            out.push(Action::DelRoute(*r));
        }
    }
    for ip in old_neighs.keys() {
        if !neighs.contains_key(ip) {
            out.push(Action::DelNeigh(*ip));
        }
    }
    for (mac, dst) in old_fdb {
        if !fdb.contains_key(mac) {
            out.push(Action::DelFdb(*mac, Some(*dst)));
        }
    }
    for (dst, r) in routes {
        if r.dev == Dev::Vxlan {
            let mac = neighs[&r.gw];
            if old_neighs.get(&r.gw) != Some(&mac) {
                out.push(Action::SetNeigh(r.gw, mac));
            }
            let remote = fdb[&mac];
            if old_fdb.get(&mac) != Some(&remote) {
                out.push(Action::SetFdb(mac, remote));
            }
        }
        if old_routes.get(dst) != Some(r) {
            out.push(Action::SetRoute(*r));
        }
    }
    out
}

/// The peers' subnets (disjoint) by first address, with the key of the
/// record holding each: what a subnet overlaps is two lookups, not one
/// comparison per peer (5,000 peers: 12.5M).
#[derive(Debug, Clone, Default)]
struct Taken(BTreeMap<u32, (u32, String)>);

impl Taken {
    fn range(n: Ipv4Network) -> (u32, u32) {
        let first = u32::from(n.network());
        (first, first | !u32::from(n.mask()))
    }

    /// The keys of the subnets that overlap `n`.
    fn overlapping(&self, n: Ipv4Network) -> impl Iterator<Item = &str> {
        let (first, last) = Self::range(n);
        // The one starting before `first` may reach into it; any other
        // starts inside it.
        let before = self
            .0
            .range(..first)
            .next_back()
            .filter(|(_, (end, _))| *end >= first);
        before
            .into_iter()
            .chain(self.0.range(first..=last))
            .map(|(_, (_, key))| key.as_str())
    }

    fn insert(&mut self, n: Ipv4Network, key: String) {
        let (first, last) = Self::range(n);
        self.0.insert(first, (last, key));
    }

    fn remove(&mut self, n: Ipv4Network) {
        self.0.remove(&Self::range(n).0);
    }
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
    // Then what is missing or wrong, per peer in order. What the kernel
    // holds is indexed once: a scan per peer is quadratic at 5,000 peers.
    let mut neighs: HashMap<Ipv4Addr, Vec<(Option<Mac>, bool)>> = HashMap::new();
    for (ip, m, perm) in &have.neighs {
        neighs.entry(*ip).or_default().push((*m, *perm));
    }
    let mut fdb: HashMap<Mac, Vec<&(Mac, Option<Ipv4Addr>)>> = HashMap::new();
    for e in &have.fdb {
        fdb.entry(e.0).or_default().push(e);
    }
    let mut routes: HashMap<Ipv4Network, Vec<&Route>> = HashMap::new();
    for r in &have.routes {
        routes.entry(r.dst).or_default().push(r);
    }
    // `want.routes` is keyed by destination: already in order.
    for r in want.routes.values() {
        if r.dev == Dev::Vxlan {
            let mac = want.neighs[&r.gw];
            if !neighs
                .get(&r.gw)
                .is_some_and(|v| v.iter().any(|(m, perm)| *m == Some(mac) && *perm))
            {
                out.push(Action::SetNeigh(r.gw, mac));
            }
            let dst = want.fdb[&mac];
            let fdb_for_mac: Vec<&(Mac, Option<Ipv4Addr>)> =
                fdb.get(&mac).cloned().unwrap_or_default();
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
        let present = routes.get(&r.dst).map(Vec::as_slice).unwrap_or_default();
        if present.len() != 1 || present[0] != r {
            out.push(Action::SetRoute(*r));
        }
    }
    out
}

/// The steps from `old` — what was last brought into the kernel — to
/// `new`, without looking at the kernel: what a change of one peer costs
/// is that peer's entries. `None` when the device or its address differ
/// (that takes a full [`diff`] against the kernel). Same order as `diff`:
/// stale routes, neighbours, FDB entries first; then per peer neighbour,
/// FDB entry, route.
pub fn delta(old: &Desired, new: &Desired) -> Option<Vec<Action>> {
    if old.device != new.device || old.vtep_addr != new.vtep_addr {
        return None;
    }
    Some(steps(
        (&old.neighs, &old.fdb, &old.routes),
        (&new.neighs, &new.fdb, &new.routes),
    ))
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
        assert_eq!(d.peers(), 2);
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
        let dsts: Vec<_> = d.routes.keys().copied().collect();
        assert_eq!(dsts, [net("10.244.1.0/24"), net("10.244.2.0/24")]);
        assert_eq!(d.neighs[&ip("10.244.1.0")], Mac::for_vtep("b", 1));
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

    /// What the kernel holds after `acts` (replace semantics for neighbours,
    /// FDB entries and routes, as `kernel` sends them).
    fn simulate(o: &mut Observed, acts: &[Action]) {
        for a in acts {
            match a {
                Action::SetNeigh(ip, mac) => {
                    o.neighs.retain(|(i, _, _)| i != ip);
                    o.neighs.push((*ip, Some(*mac), true));
                }
                Action::DelNeigh(ip) => o.neighs.retain(|(i, _, _)| i != ip),
                Action::SetFdb(mac, dst) => {
                    o.fdb.retain(|(m, _)| m != mac);
                    o.fdb.push((*mac, Some(*dst)));
                }
                Action::DelFdb(mac, dst) => o.fdb.retain(|e| *e != (*mac, *dst)),
                Action::SetRoute(r) => {
                    o.routes.retain(|h| h.dst != r.dst);
                    o.routes.push(*r);
                }
                Action::DelRoute(r) => o.routes.retain(|h| h != r),
                other => panic!("delta sent {other:?}"),
            }
        }
    }

    /// For random changes of random clusters (peers added, gone, left,
    /// moved, re-addressed, clashing), the delta from the last desired
    /// state brings a kernel holding that state to exactly the new one.
    #[test]
    fn delta_reaches_what_a_full_diff_reaches() {
        let mut rng = crate::store::testing::Rng(0x9e37_79b9_7f4a_7c15);
        let mut below = |n: u64| rng.below(n as usize) as u64;
        for direct in [false, true] {
            let mut nodes = cluster();
            let mut kernel = observed_of(&desired(&local(), &params(direct), &nodes));
            let mut last = desired(&local(), &params(direct), &nodes);
            for step in 0..2000 {
                let i = below(12);
                let name = format!("p{i}");
                let subnet = format!("10.244.{}.0/{}", below(10), [24, 23][below(2) as usize]);
                let Ok(subnet) = subnet.parse::<Ipv4Network>() else {
                    continue;
                };
                let subnet = Ipv4Network::new(subnet.network(), subnet.prefix()).unwrap();
                let under = ["192.168.50.", "10.9.9."][below(2) as usize];
                let mut r = rec(&name, "10.244.0.0/24", &format!("{under}{}", 10 + below(5)));
                r.subnet = subnet;
                r.vtep_mac = Mac::for_vtep(&format!("p{}", below(14)), 1);
                r.left = below(8) == 0;
                nodes.retain(|n| n.node != name);
                if below(4) != 0 {
                    nodes.push(r);
                }
                let want = desired(&local(), &params(direct), &nodes);
                let acts = delta(&last, &want).unwrap();
                simulate(&mut kernel, &acts);
                assert_eq!(diff(&want, &kernel), vec![], "step {step}: {acts:?}");
                last = want;
            }
            assert!(last.peers() > 2, "not vacuous");
        }
    }

    /// For random changes of a few records at a time (added, gone, left,
    /// moved, re-addressed, clashing), under store keys that need not be
    /// their subnets: the overlay kept by `update` is exactly the one built
    /// from every record, and its steps bring a kernel holding the old
    /// state to exactly the new one. Both paths (one peer at a time, and
    /// rebuilt on a clash) are taken.
    #[test]
    fn update_equals_a_rebuild_from_every_record() {
        let mut rng = crate::store::testing::Rng(0x2545_f491_4f6c_dd1d);
        let mut below = |n: u64| rng.below(n as usize) as u64;
        // (direct routing, subnets, names): clashes all the time; mostly
        // none; VTEP MACs clashing now and then.
        for (direct, subnets, names) in [
            (false, 10, 14),
            (true, 10, 14),
            (false, 4000, 100_000),
            (true, 4000, 40),
        ] {
            let mut records: BTreeMap<String, NodeRecord> = BTreeMap::new();
            let all = |r: &BTreeMap<String, NodeRecord>| {
                r.iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Vec<_>>()
            };
            let mut o = Overlay::new(&local(), &params(direct), std::iter::empty());
            let mut kernel = observed_of(o.desired());
            let (mut one_by_one, mut rebuilt) = (0, 0);
            for step in 0..3000 {
                let mut changed: Vec<(String, Option<NodeRecord>)> = Vec::new();
                for _ in 0..1 + below(3) {
                    let key = format!("k{}", below(16));
                    let name = format!("p{}", below(names));
                    let under = ["192.168.50.", "10.9.9."][below(2) as usize];
                    let mut r = rec(&name, "10.244.0.0/24", &format!("{under}{}", 10 + below(5)));
                    // /28s, now and then a /27 over two of them.
                    let prefix = if below(10) == 0 { 27 } else { 28 };
                    let first =
                        u32::from(Ipv4Addr::new(10, 244, 1, 0)) + 16 * below(subnets) as u32;
                    let net = Ipv4Network::new(first.into(), prefix).unwrap();
                    r.subnet = Ipv4Network::new(net.network(), prefix).unwrap();
                    r.vtep_mac = Mac::for_vtep(&format!("p{}", below(names)), 1);
                    r.left = below(8) == 0;
                    let new = (below(4) != 0).then_some(r);
                    match &new {
                        Some(r) => records.insert(key.clone(), r.clone()),
                        None => records.remove(&key),
                    };
                    changed.push((key, new));
                }
                let now = all(&records);
                let (steps, full) = o.update(
                    changed.iter().map(|(k, r)| (k.as_str(), r.as_ref())),
                    || now.iter().map(|(k, r)| (k.clone(), r)),
                );
                if full {
                    rebuilt += 1;
                } else {
                    one_by_one += 1;
                }
                let want = Overlay::new(
                    &local(),
                    &params(direct),
                    now.iter().map(|(k, r)| (k.clone(), r)),
                );
                assert_eq!(o.desired(), want.desired(), "step {step}: {changed:?}");
                simulate(&mut kernel, &steps);
                assert_eq!(diff(o.desired(), &kernel), vec![], "step {step}: {steps:?}");
            }
            eprintln!("{subnets} subnets: {one_by_one} one by one, {rebuilt} rebuilt");
            assert!(rebuilt > 10 && one_by_one > 0, "{one_by_one} / {rebuilt}");
            if names > 1000 {
                assert!(one_by_one > 2000, "{one_by_one} / {rebuilt}");
            }
        }
    }

    #[test]
    fn delta_of_one_peer_touches_that_peer() {
        let before = desired(&local(), &params(false), &cluster());
        let mut nodes = cluster();
        nodes[1].underlay_ip = ip("192.168.50.22");
        let after = desired(&local(), &params(false), &nodes);
        assert_eq!(
            delta(&before, &after).unwrap(),
            vec![Action::SetFdb(Mac::for_vtep("b", 1), ip("192.168.50.22"))]
        );
        let mut p = params(false);
        p.mtu = Some(1400);
        assert_eq!(delta(&before, &desired(&local(), &p, &nodes)), None);
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
