//! The Services ruleset as data: [`render`] turns a [`Plan`] into the
//! chains and elements the kernel should hold, [`diff`] compares that with
//! what was last written (or what a dump of the kernel shows). Pure; the
//! encoding into nf_tables requests is in `datapath`.
//!
//! Layout (table `inet ferry-svc`; kube-proxy's nftables design, with maps
//! instead of a chain per endpoint so that 10k Services load in one short
//! transaction):
//!
//! ```text
//! set pick-ports-<N>        { ipv4_addr . inet_proto . inet_service }   # ClusterIP ports with N endpoints: goto pick-<N>
//! map service-ips           { ipv4_addr . inet_proto . inet_service : verdict }  # the other ClusterIPs, externalIP, LB IP
//! map service-nodeports     { inet_proto . inet_service : verdict }              # on the node's own addresses
//! map no-endpoint-services  { ipv4_addr . inet_proto . inet_service : verdict }  # -> goto reject
//! map no-endpoint-nodeports { inet_proto . inet_service : verdict }
//! set cluster-ips           { ipv4_addr }            # any port of a ClusterIP not in
//! set service-ports         { ipv4_addr . inet_proto . inet_service }  # is rejected
//! set hairpin               { ipv4_addr . ipv4_addr } # (endpoint, endpoint) of local endpoints
//! chain pick-<N>   { dnat to daddr . l4proto . dport . numgen random mod N map @pick-endpoints-<N> }  # shared
//! chain svc-<hash>  { dnat to numgen random mod N map { 0 : ep0 . port, ... } }   # internal traffic
//! chain ext-<hash>  { [ct mark set ct mark | 0x4000]; dnat ... }                  # external traffic
//! set aff-<hash>-<timeout> { ipv4_addr : ipv4_addr . inet_service; timeout }     # ClientIP affinity
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use super::plan::{Ep, Plan, PortPlan, Targets};

/// The named maps and sets of the skeleton.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapName {
    ServiceIps,
    NodePorts,
    NoEndpointIps,
    NoEndpointPorts,
    ClusterIps,
    /// Every `ClusterIP . proto . port` a Service has: any other port of a
    /// ClusterIP is refused.
    ServicePorts,
    Hairpin,
    /// `chain key . index : endpoint`: what `numgen` picks from, in one of
    /// [`ENDPOINT_SHARDS`] maps by chain key. Not one map for all: the
    /// kernel checks every element added to a data map against every rule
    /// that binds the map (10k chains binding one map made a full load
    /// take seconds), and walks the whole map each time a new chain's rule
    /// binds it (64 maps of ~800 elements at 10k Services made the kernel
    /// half of an incremental sync); not one per chain: it finds sets by
    /// name with a walk over all of the table's sets.
    Endpoints(u8),
    /// `chain key . endpoint`: the current endpoints of chains with
    /// affinity (a pinned endpoint that is gone does not count).
    ChainEndpoints,
    /// `ClusterIP . proto . port` of the ports whose ClusterIP traffic is a
    /// plain pick among N endpoints (N up to [`PICK_MAX`]): a rule of the
    /// `services` chain per N sends them to the shared chain `pick-<N>`.
    /// Such a Service has no chain and no verdict element of its own, so
    /// adding one is not a transaction that makes the kernel validate the
    /// whole table (a walk over every chain, ~7 ms at 10k Services).
    PickPorts(u8),
    /// `ClusterIP . proto . port . index : endpoint` for `pick-<N>`: one
    /// map per N, each bound by that chain's rule alone.
    PickEndpoints(u8),
}

impl MapName {
    /// Every map and set of the skeleton.
    pub fn all() -> impl Iterator<Item = MapName> {
        [
            MapName::ServiceIps,
            MapName::NodePorts,
            MapName::NoEndpointIps,
            MapName::NoEndpointPorts,
            MapName::ClusterIps,
            MapName::ServicePorts,
            MapName::Hairpin,
            MapName::ChainEndpoints,
        ]
        .into_iter()
        .chain((0..ENDPOINT_SHARDS).map(|i| MapName::Endpoints(i as u8)))
        .chain((1..=PICK_MAX).map(|n| MapName::PickPorts(n as u8)))
        .chain((1..=PICK_MAX).map(|n| MapName::PickEndpoints(n as u8)))
    }

    /// The shard of `endpoints` that holds a chain's endpoints.
    pub fn endpoints_of(key: u64) -> MapName {
        MapName::Endpoints((key % u64::from(ENDPOINT_SHARDS)) as u8)
    }

    pub fn name(self) -> &'static str {
        match self {
            MapName::ServiceIps => "service-ips",
            MapName::NodePorts => "service-nodeports",
            MapName::NoEndpointIps => "no-endpoint-services",
            MapName::NoEndpointPorts => "no-endpoint-nodeports",
            MapName::ClusterIps => "cluster-ips",
            MapName::ServicePorts => "service-ports",
            MapName::Hairpin => "hairpin",
            MapName::ChainEndpoints => "chain-endpoints",
            MapName::Endpoints(i) => &SHARD_NAMES[usize::from(i)],
            MapName::PickPorts(n) => &PICK_NAMES[usize::from(n)].0,
            MapName::PickEndpoints(n) => &PICK_NAMES[usize::from(n)].1,
        }
    }
}

/// What an element maps to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Goto(String),
    Drop,
    /// A plain set's element.
    Member,
    /// A data map's value.
    Value(Key),
}

/// The chain that refuses connections at once (TCP RST, ICMP port
/// unreachable).
pub const REJECT_CHAIN: &str = "reject";
pub const SVC_PREFIX: &str = "svc-";
pub const EXT_PREFIX: &str = "ext-";
pub const AFFINITY_PREFIX: &str = "aff-";
/// How many maps the endpoints are spread over ([`MapName::Endpoints`]).
pub const ENDPOINT_SHARDS: u16 = 256;
/// The largest endpoint count a shared `pick-<N>` chain serves; a Service
/// port with more endpoints (or with affinity) gets a chain of its own.
pub const PICK_MAX: u32 = 16;
/// The shared chain for `count` endpoints.
pub fn pick_chain(count: u32) -> String {
    format!("pick-{count}")
}

static SHARD_NAMES: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    (0..ENDPOINT_SHARDS)
        .map(|i| format!("endpoints-{i:02x}"))
        .collect()
});

/// The names of [`MapName::PickPorts`] and [`MapName::PickEndpoints`],
/// indexed by count; 0 is never used.
static PICK_NAMES: std::sync::LazyLock<Vec<(String, String)>> = std::sync::LazyLock::new(|| {
    (0..=PICK_MAX)
        .map(|n| (format!("pick-ports-{n}"), format!("pick-endpoints-{n}")))
        .collect()
});

/// One rule of a Service chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Mark the connection for masquerade on its way out (external traffic
    /// under `externalTrafficPolicy: Cluster`; the reply must come back
    /// through this node).
    MarkMasquerade,
    /// DNAT to one of the `count` endpoints the `endpoints` map holds
    /// under `key` (the chain's own), each with the same chance; with an
    /// affinity set, a client already in it goes to its endpoint again.
    ///
    /// The endpoints live in one map for all chains, not in a map per
    /// chain: the kernel names anonymous sets and finds sets by name with
    /// a walk over all of the table's sets, which made 10k per-chain maps
    /// cost seconds in one transaction.
    Dnat {
        key: u64,
        count: u32,
        affinity: Option<String>,
    },
}

/// The whole desired state below the fixed skeleton.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub chains: BTreeMap<String, Vec<Rule>>,
    pub elems: BTreeMap<MapName, BTreeMap<Key, Target>>,
    /// Affinity sets by name.
    pub affinity: BTreeMap<String, Affinity>,
}

/// A ClientIP affinity set: its timeout and the endpoints it may pin to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Affinity {
    pub timeout_s: u32,
    pub eps: BTreeSet<Ep>,
}

/// What the kernel holds (or was last given), as far as a diff needs it:
/// chains by the fingerprint of their rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    pub chains: BTreeMap<String, u64>,
    pub elems: BTreeMap<MapName, BTreeMap<Key, Target>>,
    /// Affinity sets by the fingerprint of their endpoints; `None` when
    /// read from the kernel (unknown: its stale entries are looked for).
    pub affinity: BTreeMap<String, Option<u64>>,
}

/// A fingerprint of `v`: FNV-1a over its `Hash` feed, stable for a given
/// ferryd version. A chain's is stored with its last rule (rule userdata)
/// so that a dump tells whether the chain is what we would write.
pub fn fingerprint<T: std::hash::Hash + ?Sized>(v: &T) -> u64 {
    let mut h = nft::Fnv64::default();
    v.hash(&mut h);
    std::hash::Hasher::finish(&h)
}

impl Ruleset {
    pub fn written(&self) -> Written {
        Written {
            chains: self
                .chains
                .iter()
                .map(|(n, r)| (n.clone(), fingerprint(r)))
                .collect(),
            elems: self.elems.clone(),
            affinity: self
                .affinity
                .iter()
                .map(|(n, a)| (n.clone(), Some(fingerprint(&a.eps))))
                .collect(),
        }
    }

    fn put(&mut self, map: MapName, key: Key, t: Target) {
        self.elems.entry(map).or_default().insert(key, t);
    }
}

/// What a sync reads of the desired state: the rules of the chains it
/// writes, the affinity sets it creates or prunes, and (for a full sync
/// against the kernel) all of it as [`Written`].
pub trait View {
    fn rules(&self, chain: &str) -> &[Rule];
    fn affinity(&self, name: &str) -> &Affinity;
    fn written(&self) -> Written;
}

impl View for Ruleset {
    fn rules(&self, chain: &str) -> &[Rule] {
        &self.chains[chain]
    }

    fn affinity(&self, name: &str) -> &Affinity {
        &self.affinity[name]
    }

    fn written(&self) -> Written {
        Ruleset::written(self)
    }
}

/// Who puts an element, and what each of them maps it to. Most elements
/// have one owner; a hairpin pair has every Service of its endpoint.
#[derive(Debug, Clone)]
enum Owners {
    One(Arc<str>, Target),
    Many(BTreeMap<Arc<str>, Target>),
}

impl Owners {
    /// The target that counts: the greatest owner's, as in [`render`] of a
    /// whole plan, where a later Service overwrites an earlier one.
    fn target(&self) -> &Target {
        match self {
            Owners::One(_, t) => t,
            Owners::Many(m) => m.last_key_value().expect("never empty").1,
        }
    }

    fn add(&mut self, o: &Arc<str>, t: &Target) {
        match self {
            Owners::One(x, xt) if x == o => *xt = t.clone(),
            Owners::One(x, xt) => {
                let m = [(x.clone(), xt.clone()), (o.clone(), t.clone())].into();
                *self = Owners::Many(m);
            }
            Owners::Many(m) => {
                m.insert(o.clone(), t.clone());
            }
        }
    }

    /// False when no owner is left.
    fn remove(&mut self, o: &Arc<str>) -> bool {
        match self {
            Owners::One(x, _) => x != o,
            Owners::Many(m) => {
                m.remove(o);
                if m.len() == 1 {
                    let (x, t) = m.pop_first().expect("one");
                    *self = Owners::One(x, t);
                }
                true
            }
        }
    }
}

/// The desired ruleset, changed one Service at a time: given what a
/// Service contributed before and what it contributes now ([`render`] of
/// its ports), [`Desired::update`] yields the kernel's changes for it
/// alone. Its chains and affinity sets are its own; an element two
/// Services put (a hairpin pair, an external IP) stays while one of them
/// does. What each Service contributed is not kept: the caller renders it
/// again from what it planned before, which costs less memory than 10k
/// rulesets.
#[derive(Debug, Default)]
pub struct Desired {
    /// The elements of the maps that Services may share, with their owners.
    elems: BTreeMap<MapName, BTreeMap<Key, Owners>>,
    /// Each chain with the endpoints its DNAT picks from: the elements of
    /// the per-chain maps ([`per_chain`]) follow from these, five of them
    /// in one small vector instead of five map entries.
    chains: HashMap<String, Chain>,
    affinity: HashMap<String, Affinity>,
}

#[derive(Debug)]
struct Chain {
    rules: Vec<Rule>,
    eps: Vec<Ep>,
}

/// Maps whose keys start with a chain's key: no two chains (so no two
/// Services) share an element.
fn per_chain(m: MapName) -> bool {
    matches!(m, MapName::Endpoints(_) | MapName::ChainEndpoints)
}

impl Chain {
    /// The chain `rules` of `rs`, with the endpoints `rs` maps its slots to.
    fn of(rules: Vec<Rule>, rs: &Ruleset) -> Chain {
        let mut eps = Vec::new();
        for r in &rules {
            if let Rule::Dnat { key, count, .. } = r {
                let slots = rs.elems.get(&MapName::endpoints_of(*key));
                eps = (0..*count)
                    .filter_map(|i| match slots?.get(&endpoint_slot(*key, i))? {
                        Target::Value(v) => ep_from_data(v),
                        _ => None,
                    })
                    .collect();
            }
        }
        Chain { rules, eps }
    }

    /// Its elements of the per-chain maps.
    fn elems(&self, out: &mut BTreeMap<MapName, BTreeMap<Key, Target>>) {
        for r in &self.rules {
            if let Rule::Dnat { key, affinity, .. } = r {
                let slots = out.entry(MapName::endpoints_of(*key)).or_default();
                for (i, ep) in self.eps.iter().enumerate() {
                    slots.insert(endpoint_slot(*key, i as u32), Target::Value(ep_data(*ep)));
                }
                if affinity.is_some() {
                    let current = out.entry(MapName::ChainEndpoints).or_default();
                    for ep in &self.eps {
                        current.insert(chain_endpoint(*key, *ep), Target::Member);
                    }
                }
            }
        }
    }
}

impl Desired {
    fn target(&self, map: MapName, key: &Key) -> Option<&Target> {
        Some(self.elems.get(&map)?.get(key)?.target())
    }

    /// For each Service of `batch` (each at most once): what it contributed
    /// until now and what it contributes from now on (empty: nothing, it is
    /// gone). Returns the changes that bring a kernel holding what this
    /// held before to what it holds now.
    pub fn update(
        &mut self,
        batch: impl IntoIterator<Item = (String, Ruleset, Ruleset)>,
    ) -> Changes {
        let mut c = Changes::default();
        // Each shared element touched, with the target it had before.
        let mut before: BTreeMap<(MapName, Key), Option<Target>> = BTreeMap::new();
        let empty = BTreeMap::new();
        for (svc, old, new) in batch {
            let svc: Arc<str> = Arc::from(svc);
            for rs in [&old, &new] {
                for (map, elems) in rs.elems.iter().filter(|(m, _)| !per_chain(**m)) {
                    for k in elems.keys() {
                        if let std::collections::btree_map::Entry::Vacant(e) =
                            before.entry((*map, *k))
                        {
                            e.insert(self.target(*map, k).cloned());
                        }
                    }
                }
            }
            // The per-chain maps: straight from old to new.
            for (map, elems) in old.elems.iter().filter(|(m, _)| per_chain(**m)) {
                let now = new.elems.get(map).unwrap_or(&empty);
                for (k, t) in elems {
                    if now.get(k) != Some(t) {
                        c.del_elems.entry(*map).or_default().push(*k);
                    }
                }
            }
            for (map, elems) in new.elems.iter().filter(|(m, _)| per_chain(**m)) {
                let was = old.elems.get(map).unwrap_or(&empty);
                for (k, t) in elems {
                    if was.get(k) != Some(t) {
                        c.add_elems.entry(*map).or_default().push((*k, t.clone()));
                    }
                }
            }
            for (map, elems) in old.elems.iter().filter(|(m, _)| !per_chain(**m)) {
                let kept = new.elems.get(map);
                for k in elems
                    .keys()
                    .filter(|k| !kept.is_some_and(|m| m.contains_key(*k)))
                {
                    let owners = self.elems.get_mut(map).expect("owned");
                    if !owners.get_mut(k).expect("owned").remove(&svc) {
                        owners.remove(k);
                    }
                }
            }
            for (map, elems) in new.elems.iter().filter(|(m, _)| !per_chain(**m)) {
                let owners = self.elems.entry(*map).or_default();
                for (k, t) in elems {
                    match owners.get_mut(k) {
                        Some(o) => o.add(&svc, t),
                        None => {
                            owners.insert(*k, Owners::One(svc.clone(), t.clone()));
                        }
                    }
                }
            }
            for name in old.chains.keys().filter(|n| !new.chains.contains_key(*n)) {
                c.del_chains.push(name.clone());
                self.chains.remove(name);
            }
            for (name, rules) in &new.chains {
                if old.chains.get(name) != Some(rules) {
                    c.write_chains.push(name.clone());
                }
                self.chains
                    .insert(name.clone(), Chain::of(rules.clone(), &new));
            }
            for name in old
                .affinity
                .keys()
                .filter(|n| !new.affinity.contains_key(*n))
            {
                c.del_affinity.push(name.clone());
                self.affinity.remove(name);
            }
            for (name, a) in new.affinity {
                match old.affinity.get(&name) {
                    None => c.add_affinity.push(name.clone()),
                    Some(o) if o.eps != a.eps => c.prune_affinity.push(name.clone()),
                    Some(_) => {}
                }
                self.affinity.insert(name, a);
            }
        }
        for ((map, k), was) in before {
            let now = self.target(map, &k);
            if was.as_ref() == now {
                continue;
            }
            let now = now.cloned();
            if was.is_some() {
                c.del_elems.entry(map).or_default().push(k);
            }
            if let Some(t) = now {
                c.add_elems.entry(map).or_default().push((k, t));
            }
        }
        self.elems.retain(|_, m| !m.is_empty());
        c
    }
}

impl View for Desired {
    fn rules(&self, chain: &str) -> &[Rule] {
        &self.chains[chain].rules
    }

    fn affinity(&self, name: &str) -> &Affinity {
        &self.affinity[name]
    }

    fn written(&self) -> Written {
        let mut elems: BTreeMap<MapName, BTreeMap<Key, Target>> = self
            .elems
            .iter()
            .map(|(map, m)| {
                let m = m.iter().map(|(k, o)| (*k, o.target().clone()));
                (*map, m.collect())
            })
            .collect();
        for c in self.chains.values() {
            c.elems(&mut elems);
        }
        elems.retain(|_, m| !m.is_empty());
        Written {
            chains: self
                .chains
                .iter()
                .map(|(n, c)| (n.clone(), fingerprint(&c.rules)))
                .collect(),
            elems,
            affinity: self
                .affinity
                .iter()
                .map(|(n, a)| (n.clone(), Some(fingerprint(&a.eps))))
                .collect(),
        }
    }
}

// ---- keys -------------------------------------------------------------------

/// A set element's key or a map element's data, inline: at most 16 bytes
/// (the longest of ferry's is `chain key . endpoint`; the kernel holds
/// every element of a set to the set's own lengths). 80k elements at 10k
/// Services are 80k heap allocations fewer, and a diff copies no heap.
/// Ordered and compared as its bytes.
#[derive(Clone, Copy)]
pub struct Key {
    len: u8,
    b: [u8; Key::MAX],
}

impl Key {
    pub const MAX: usize = 16;

    /// `None` when `bytes` is longer than [`Key::MAX`].
    pub fn new(bytes: &[u8]) -> Option<Key> {
        let mut b = [0; Key::MAX];
        b.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(Key {
            len: bytes.len() as u8,
            b,
        })
    }

    fn of(parts: &[&[u8]]) -> Key {
        let mut k = Key {
            len: 0,
            b: [0; Key::MAX],
        };
        for p in parts {
            let at = usize::from(k.len);
            k.b[at..at + p.len()].copy_from_slice(p);
            k.len += p.len() as u8;
        }
        k
    }
}

impl std::ops::Deref for Key {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.b[..usize::from(self.len)]
    }
}

impl PartialEq for Key {
    fn eq(&self, o: &Key) -> bool {
        **self == **o
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Key) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Key {
    fn cmp(&self, o: &Key) -> std::cmp::Ordering {
        (**self).cmp(&**o)
    }
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (**self).hash(h)
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// `ipv4_addr . inet_proto . inet_service`: each field padded to 4 bytes.
pub fn ip_proto_port(ip: Ipv4Addr, proto: u8, port: u16) -> Key {
    Key::of(&[
        &ip.octets(),
        &[proto, 0, 0, 0],
        &port.to_be_bytes(),
        &[0, 0],
    ])
}

/// `inet_proto . inet_service`.
pub fn proto_port(proto: u8, port: u16) -> Key {
    Key::of(&[&[proto, 0, 0, 0], &port.to_be_bytes(), &[0, 0]])
}

/// The key of a chain's endpoints in the shared maps.
pub fn chain_key(chain: &str) -> u64 {
    nft::fnv1a64(chain.as_bytes())
}

/// `chain key . index` of the `endpoints` map; the index in host byte
/// order, as `numgen` writes it.
pub fn endpoint_slot(key: u64, i: u32) -> Key {
    Key::of(&[&key.to_be_bytes(), &i.to_ne_bytes()])
}

/// `ClusterIP . proto . port . index` of a `pick-endpoints-<N>` map; the
/// index in host byte order, as `numgen` writes it.
pub fn pick_slot(at: Key, i: u32) -> Key {
    Key::of(&[&at, &i.to_ne_bytes()])
}

/// `chain key . endpoint` of the `chain-endpoints` set.
pub fn chain_endpoint(key: u64, ep: Ep) -> Key {
    Key::of(&[&key.to_be_bytes(), &ep_data(ep)])
}

/// `ipv4_addr . inet_service`: a DNAT target as map data.
pub fn ep_data(ep: Ep) -> Key {
    Key::of(&[&ep.ip.octets(), &ep.port.to_be_bytes(), &[0, 0]])
}

pub fn ep_from_data(d: &[u8]) -> Option<Ep> {
    let ip: [u8; 4] = d.get(0..4)?.try_into().ok()?;
    let port: [u8; 2] = d.get(4..6)?.try_into().ok()?;
    Some(Ep {
        ip: ip.into(),
        port: u16::from_be_bytes(port),
    })
}

fn hash_of(id: &str) -> String {
    format!("{:016x}", nft::fnv1a64(id.as_bytes()))
}

// ---- render -----------------------------------------------------------------

/// The ruleset for `plan`.
pub fn render(plan: &Plan) -> Ruleset {
    let mut rs = Ruleset::default();
    for p in &plan.ports {
        render_port(p, &mut rs);
    }
    rs
}

fn render_port(p: &PortPlan, rs: &mut Ruleset) {
    let h = hash_of(&p.id);
    // Each kind of traffic: where its elements point.
    let path = |rs: &mut Ruleset, chain: String, targets: &Targets, masq: bool| match targets {
        Targets::Endpoints(eps) => {
            let key = chain_key(&chain);
            for (i, ep) in eps.iter().enumerate() {
                let slot = endpoint_slot(key, i as u32);
                rs.put(
                    MapName::endpoints_of(key),
                    slot,
                    Target::Value(ep_data(*ep)),
                );
            }
            let affinity = p.affinity.map(|timeout_s| {
                let name = format!("{AFFINITY_PREFIX}{}-{timeout_s}-{h}", &chain[..3]);
                for ep in eps {
                    rs.put(
                        MapName::ChainEndpoints,
                        chain_endpoint(key, *ep),
                        Target::Member,
                    );
                }
                let eps = eps.iter().copied().collect();
                rs.affinity
                    .insert(name.clone(), Affinity { timeout_s, eps });
                name
            });
            let mut rules = Vec::new();
            if masq {
                rules.push(Rule::MarkMasquerade);
            }
            rules.push(Rule::Dnat {
                key,
                count: eps.len() as u32,
                affinity,
            });
            rs.chains.insert(chain.clone(), rules);
            Some(Target::Goto(chain))
        }
        Targets::Drop => Some(Target::Drop),
        Targets::Reject => None,
    };
    // ClusterIP traffic that is a plain pick goes to the shared chain for
    // its count, through the count's set of ports.
    let pick = match &p.internal {
        Targets::Endpoints(eps)
            if p.affinity.is_none()
                && p.cluster_ips.len() == 1
                && (1..=PICK_MAX as usize).contains(&eps.len()) =>
        {
            let at = ip_proto_port(p.cluster_ips[0], p.proto, p.port);
            let n = eps.len() as u8;
            for (i, ep) in eps.iter().enumerate() {
                let slot = pick_slot(at, i as u32);
                rs.put(MapName::PickEndpoints(n), slot, Target::Value(ep_data(*ep)));
            }
            Some(MapName::PickPorts(n))
        }
        _ => None,
    };
    let internal = match pick {
        Some(_) => None,
        None => path(rs, format!("{SVC_PREFIX}{h}"), &p.internal, false),
    };
    let has_external = !p.external_ips.is_empty() || p.node_port.is_some();
    let external = if has_external {
        path(
            rs,
            format!("{EXT_PREFIX}{h}"),
            &p.external,
            !p.external_local,
        )
    } else {
        None
    };
    let reject = Target::Goto(REJECT_CHAIN.into());
    for ip in &p.cluster_ips {
        rs.put(
            MapName::ClusterIps,
            Key::of(&[&ip.octets()]),
            Target::Member,
        );
        let key = ip_proto_port(*ip, p.proto, p.port);
        rs.put(MapName::ServicePorts, key, Target::Member);
        match (pick, &internal) {
            (Some(set), _) => rs.put(set, key, Target::Member),
            (None, Some(t)) => rs.put(MapName::ServiceIps, key, t.clone()),
            (None, None) => rs.put(MapName::NoEndpointIps, key, reject.clone()),
        }
    }
    if has_external {
        for ip in &p.external_ips {
            let key = ip_proto_port(*ip, p.proto, p.port);
            match &external {
                Some(t) => rs.put(MapName::ServiceIps, key, t.clone()),
                None => rs.put(MapName::NoEndpointIps, key, reject.clone()),
            }
        }
        if let Some(np) = p.node_port {
            let key = proto_port(p.proto, np);
            match &external {
                Some(t) => rs.put(MapName::NodePorts, key, t.clone()),
                None => rs.put(MapName::NoEndpointPorts, key, reject.clone()),
            }
        }
    }
    for ep in &p.local {
        let k = Key::of(&[&ep.ip.octets(), &ep.ip.octets()]);
        rs.put(MapName::Hairpin, k, Target::Member);
    }
}

// ---- diff -------------------------------------------------------------------

/// What one sync changes, in the order the transaction applies it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub add_affinity: Vec<String>,
    /// Chains created or rewritten (flushed, then their rules added).
    pub write_chains: Vec<String>,
    pub del_elems: BTreeMap<MapName, Vec<Key>>,
    pub add_elems: BTreeMap<MapName, Vec<(Key, Target)>>,
    pub del_chains: Vec<String>,
    pub del_affinity: Vec<String>,
    /// Affinity sets whose endpoints changed (or are unknown): entries
    /// pinned to an endpoint that is gone are removed after the sync.
    pub prune_affinity: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }

    /// Element changes (adds plus deletes), for metrics.
    pub fn elements(&self) -> usize {
        self.del_elems.values().map(Vec::len).sum::<usize>()
            + self.add_elems.values().map(Vec::len).sum::<usize>()
    }
}

/// From `old` to `new`: chains whose fingerprint differs are rewritten,
/// elements whose target differs are deleted and added again, and what
/// `new` does not have goes.
pub fn diff(old: &Written, new: &Written) -> Changes {
    let mut c = Changes::default();
    for (name, fp) in &new.chains {
        if old.chains.get(name) != Some(fp) {
            c.write_chains.push(name.clone());
        }
    }
    c.del_chains = old
        .chains
        .keys()
        .filter(|n| !new.chains.contains_key(*n))
        .cloned()
        .collect();
    for (name, eps) in &new.affinity {
        match old.affinity.get(name) {
            None => c.add_affinity.push(name.clone()),
            Some(old_eps) if old_eps != eps => c.prune_affinity.push(name.clone()),
            Some(_) => {}
        }
    }
    c.del_affinity = old
        .affinity
        .keys()
        .filter(|n| !new.affinity.contains_key(*n))
        .cloned()
        .collect();
    let empty = BTreeMap::new();
    for map in MapName::all() {
        let (o, n) = (
            old.elems.get(&map).unwrap_or(&empty),
            new.elems.get(&map).unwrap_or(&empty),
        );
        let dels: Vec<Key> = o
            .iter()
            .filter(|(k, t)| n.get(*k) != Some(*t))
            .map(|(k, _)| *k)
            .collect();
        let adds: Vec<(Key, Target)> = n
            .iter()
            .filter(|(k, t)| o.get(*k) != Some(*t))
            .map(|(k, t)| (*k, t.clone()))
            .collect();
        if !dels.is_empty() {
            c.del_elems.insert(map, dels);
        }
        if !adds.is_empty() {
            c.add_elems.insert(map, adds);
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::plan::{plan, Ep};
    use crate::service::Snapshot;

    fn ep(s: &str, port: u16) -> Ep {
        Ep {
            ip: s.parse().unwrap(),
            port,
        }
    }

    fn port(id: &str, internal: Targets, external: Targets) -> PortPlan {
        PortPlan {
            id: id.into(),
            proto: 6,
            port: 80,
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            external_ips: vec![],
            node_port: Some(30080),
            affinity: None,
            internal,
            external,
            external_local: false,
            local: vec![ep("10.244.1.5", 8080)],
        }
    }

    fn key_text(map: MapName, k: &[u8]) -> String {
        let ip = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string();
        let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]).to_string();
        match map {
            MapName::ServiceIps
            | MapName::NoEndpointIps
            | MapName::ServicePorts
            | MapName::PickPorts(_) => {
                format!("{} . {} . {}", ip(&k[0..4]), k[4], port(&k[8..10]))
            }
            MapName::NodePorts | MapName::NoEndpointPorts => {
                format!("{} . {}", k[0], port(&k[4..6]))
            }
            MapName::ClusterIps => ip(k),
            MapName::Hairpin => format!("{} . {}", ip(&k[0..4]), ip(&k[4..8])),
            MapName::Endpoints(_) => format!(
                "{:016x} . {}",
                u64::from_be_bytes(k[0..8].try_into().unwrap()),
                u32::from_ne_bytes(k[8..12].try_into().unwrap())
            ),
            MapName::PickEndpoints(_) => format!(
                "{} . {} . {} . {}",
                ip(&k[0..4]),
                k[4],
                port(&k[8..10]),
                u32::from_ne_bytes(k[12..16].try_into().unwrap())
            ),
            MapName::ChainEndpoints => format!(
                "{:016x} . {}",
                u64::from_be_bytes(k[0..8].try_into().unwrap()),
                target_text(&Target::Value(Key::new(&k[8..]).unwrap()))
            ),
        }
    }

    fn target_text(t: &Target) -> String {
        match t {
            Target::Value(v) => {
                let e = ep_from_data(v).unwrap();
                format!("{}:{}", e.ip, e.port)
            }
            t => format!("{t:?}"),
        }
    }

    /// A readable listing of a ruleset, for golden comparisons.
    fn listing(rs: &Ruleset) -> String {
        let mut out = String::new();
        for (name, rules) in &rs.chains {
            out += &format!("chain {name}\n");
            for r in rules {
                out += &format!("  {r:?}\n");
            }
        }
        for (map, elems) in &rs.elems {
            out += &format!("{}\n", map.name());
            for (k, t) in elems {
                out += &format!("  {} -> {}\n", key_text(*map, k), target_text(t));
            }
        }
        for (name, a) in &rs.affinity {
            out += &format!("affinity {name} timeout {}s {:?}\n", a.timeout_s, a.eps);
        }
        out
    }

    #[test]
    fn golden_render() {
        let yaml = include_str!("../testdata/services.yaml");
        let snap = Snapshot::from_documents(yaml).unwrap();
        let got = listing(&render(&plan(&snap, "node1")));
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/testdata/services.golden");
        if std::env::var_os("FERRY_BLESS").is_some() {
            std::fs::write(path, &got).unwrap();
        }
        let want = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            got, want,
            "render changed; FERRY_BLESS=1 rewrites the golden file"
        );
    }

    #[test]
    fn no_endpoints_rejects_and_drop_stays_in_nat() {
        let rs = render(&Plan {
            ports: vec![port("a", Targets::Reject, Targets::Reject)],
            health_checks: vec![],
        });
        assert!(rs.chains.is_empty());
        assert_eq!(rs.elems[&MapName::NoEndpointIps].len(), 1);
        assert_eq!(rs.elems[&MapName::NoEndpointPorts].len(), 1);
        assert!(!rs.elems.contains_key(&MapName::ServiceIps));
        let rs = render(&Plan {
            ports: vec![port("a", Targets::Drop, Targets::Drop)],
            health_checks: vec![],
        });
        assert!(rs.elems[&MapName::ServiceIps]
            .values()
            .all(|t| *t == Target::Drop));
    }

    #[test]
    fn external_cluster_policy_masquerades() {
        let eps = Targets::Endpoints(vec![ep("10.244.1.5", 8080)]);
        let rs = render(&Plan {
            ports: vec![port("a", eps.clone(), eps)],
            health_checks: vec![],
        });
        let ext = rs
            .chains
            .iter()
            .find(|(n, _)| n.starts_with(EXT_PREFIX))
            .unwrap()
            .1;
        assert_eq!(ext[0], Rule::MarkMasquerade);
        // ClusterIP traffic: a shared pick chain, which never masquerades.
        assert_eq!(rs.chains.len(), 1, "{rs:?}");
        assert_eq!(rs.elems[&MapName::PickPorts(1)].len(), 1);
    }

    #[test]
    fn diff_is_minimal_and_complete() {
        let one = Targets::Endpoints(vec![ep("10.244.1.5", 8080)]);
        let two = Targets::Endpoints(vec![ep("10.244.1.5", 8080), ep("10.244.2.5", 8080)]);
        // b at a ClusterIP of its own.
        let port_b = |eps: &Targets| {
            let mut p = port("b", eps.clone(), eps.clone());
            p.cluster_ips = vec!["10.96.0.11".parse().unwrap()];
            p
        };
        let a = render(&Plan {
            ports: vec![port("a", one.clone(), one.clone()), port_b(&one)],
            health_checks: vec![],
        });
        // Same state: nothing to do.
        assert!(diff(&a.written(), &a.written()).is_empty());
        // From nothing: everything. The kernel chains are the two external
        // ones: ClusterIP traffic goes through the shared pick chains.
        let full = diff(&Written::default(), &a.written());
        assert_eq!(full.write_chains.len(), 2, "{full:?}");
        assert!(full.write_chains.iter().all(|c| c.starts_with(EXT_PREFIX)));
        // One endpoint added to "b": only b's external chain is rewritten
        // and gets its second slot; b's ClusterIP moves from the pick chain
        // for one endpoint to the one for two.
        let b = render(&Plan {
            ports: vec![port("a", one.clone(), one.clone()), port_b(&two)],
            health_checks: vec![],
        });
        let d = diff(&a.written(), &b.written());
        assert_eq!(d.write_chains.len(), 1, "{d:?}");
        assert!(d.del_chains.is_empty(), "{d:?}");
        fn count<T>(m: &BTreeMap<MapName, Vec<T>>, f: fn(&MapName) -> bool) -> usize {
            m.iter().filter(|(k, _)| f(k)).map(|(_, v)| v.len()).sum()
        }
        let ext_slots = |m: &MapName| matches!(m, MapName::Endpoints(_));
        let one_pick = |m: &MapName| *m == MapName::PickEndpoints(1);
        let two_pick = |m: &MapName| *m == MapName::PickEndpoints(2);
        let one_port = |m: &MapName| *m == MapName::PickPorts(1);
        let two_ports = |m: &MapName| *m == MapName::PickPorts(2);
        assert_eq!(count(&d.add_elems, ext_slots), 1, "{d:?}");
        assert_eq!(count(&d.del_elems, one_pick), 1, "{d:?}");
        assert_eq!(count(&d.add_elems, two_pick), 2, "{d:?}");
        assert_eq!(count(&d.del_elems, one_port), 1, "{d:?}");
        assert_eq!(count(&d.add_elems, two_ports), 1, "{d:?}");
        assert_eq!(d.elements(), 6, "{d:?}");
        // The same count of endpoints, one replaced: no chain is written,
        // only the two slots change (a delete and an add each).
        let three = Targets::Endpoints(vec![ep("10.244.1.5", 8080), ep("10.244.3.5", 8080)]);
        let c = render(&Plan {
            ports: vec![port("a", one.clone(), one.clone()), port_b(&three)],
            health_checks: vec![],
        });
        let d = diff(&b.written(), &c.written());
        assert!(d.write_chains.is_empty(), "{d:?}");
        assert_eq!(d.elements(), 4, "{d:?}");
        // "b" removed: its chains go, and elements that pointed to them.
        let c = render(&Plan {
            ports: vec![],
            health_checks: vec![],
        });
        let d = diff(&b.written(), &c.written());
        assert_eq!(d.del_chains.len(), 2);
        assert!(d.add_elems.is_empty());
        assert_eq!(
            d.elements(),
            b.elems.values().map(BTreeMap::len).sum::<usize>()
        );
    }

    #[test]
    fn element_with_new_target_is_replaced() {
        let one = Targets::Endpoints(vec![ep("10.244.1.5", 8080)]);
        let a = render(&Plan {
            ports: vec![port("a", one.clone(), one)],
            health_checks: vec![],
        });
        let b = render(&Plan {
            ports: vec![port("a", Targets::Drop, Targets::Drop)],
            health_checks: vec![],
        });
        let d = diff(&a.written(), &b.written());
        // The ClusterIP leaves the pick chains' map for the verdict map.
        let key = ip_proto_port("10.96.0.10".parse().unwrap(), 6, 80);
        assert!(d.del_elems[&MapName::PickPorts(1)].contains(&key));
        assert!(d.add_elems[&MapName::ServiceIps].contains(&(key, Target::Drop)));
    }

    /// `w` after the kernel applied `c` (what `Datapath::apply` does), with
    /// the rules and affinity sets of `v`.
    fn applied(mut w: Written, c: &Changes, v: &impl View) -> Written {
        for (map, keys) in &c.del_elems {
            let m = w.elems.get_mut(map).expect("deletes what is there");
            for k in keys {
                assert!(m.remove(k).is_some(), "delete of a missing element");
            }
        }
        for (map, adds) in &c.add_elems {
            let m = w.elems.entry(*map).or_default();
            for (k, t) in adds {
                assert!(m.insert(*k, t.clone()).is_none(), "add over an element");
            }
        }
        w.elems.retain(|_, m| !m.is_empty());
        for n in &c.write_chains {
            w.chains.insert(n.clone(), fingerprint(v.rules(n)));
        }
        for n in &c.del_chains {
            assert!(w.chains.remove(n).is_some());
        }
        for n in c.add_affinity.iter().chain(&c.prune_affinity) {
            w.affinity
                .insert(n.clone(), Some(fingerprint(&v.affinity(n).eps)));
        }
        for n in &c.del_affinity {
            assert!(w.affinity.remove(n).is_some());
        }
        w
    }

    #[test]
    fn desired_per_service_is_the_whole_render_and_its_changes_get_there() {
        // Services that share hairpin pairs and an external IP, one with
        // affinity; states chosen from them at random, one Service changed
        // at a time and several at once.
        let eps = |ips: &[&str]| Targets::Endpoints(ips.iter().map(|i| ep(i, 8080)).collect());
        let variants = |name: &str| -> Vec<Option<PortPlan>> {
            let mut a = port(
                &format!("{name}:http:TCP"),
                eps(&["10.244.1.5"]),
                eps(&["10.244.1.5"]),
            );
            a.external_ips = vec!["192.0.2.1".parse().unwrap()];
            let mut b = port(
                &format!("{name}:http:TCP"),
                eps(&["10.244.1.5", "10.244.2.5"]),
                Targets::Drop,
            );
            b.affinity = Some(60);
            b.local = vec![ep("10.244.1.5", 8080), ep("10.244.1.6", 8080)];
            let mut c = port(
                &format!("{name}:http:TCP"),
                Targets::Reject,
                Targets::Reject,
            );
            c.local = vec![];
            vec![None, Some(a), Some(b), Some(c)]
        };
        let names = ["ns/a", "ns/b", "ns/c", "ns/d"];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let frag = |p: &Option<PortPlan>| {
            render(&Plan {
                ports: p.iter().cloned().collect(),
                health_checks: vec![],
            })
        };
        let mut desired = Desired::default();
        let mut kernel = Written::default();
        let mut now: BTreeMap<&str, Option<PortPlan>> = BTreeMap::new();
        for round in 0..300 {
            let mut changed = BTreeMap::new();
            for _ in 0..1 + next(3) {
                let name = names[next(names.len())];
                changed.insert(name, variants(name)[next(4)].clone());
            }
            let batch: Vec<_> = changed
                .into_iter()
                .map(|(name, v)| {
                    let old = now.insert(name, v.clone()).flatten();
                    (name.to_string(), frag(&old), frag(&v))
                })
                .collect();
            let c = desired.update(batch);
            kernel = applied(kernel, &c, &desired);
            let whole = render(&Plan {
                ports: now.values().flatten().cloned().collect(),
                health_checks: vec![],
            });
            assert_eq!(desired.written(), whole.written(), "round {round}");
            assert_eq!(kernel, whole.written(), "round {round}: {c:?}");
            assert!(diff(&kernel, &desired.written()).is_empty());
        }
    }

    #[test]
    fn key_layouts() {
        assert_eq!(
            *ip_proto_port("10.96.0.1".parse().unwrap(), 6, 443),
            [10, 96, 0, 1, 6, 0, 0, 0, 1, 187, 0, 0]
        );
        assert_eq!(*proto_port(17, 30053), [17, 0, 0, 0, 0x75, 0x65, 0, 0]);
        let k = chain_endpoint(u64::MAX, ep("10.244.1.5", 8080));
        assert_eq!(k.len(), Key::MAX);
        assert_eq!(Key::new(&k), Some(k));
        assert_eq!(Key::new(&[0; 17]), None);
        // Ordered as bytes, whatever the length.
        assert!(Key::new(&[1]).unwrap() < Key::new(&[1, 0]).unwrap());
        assert!(Key::new(&[1, 0]).unwrap() < Key::new(&[2]).unwrap());
        let e = ep("10.244.1.5", 8080);
        assert_eq!(ep_from_data(&ep_data(e)), Some(e));
    }
}
