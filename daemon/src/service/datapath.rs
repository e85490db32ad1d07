//! The Services ruleset in the kernel: table `inet ferry-svc`, written over
//! netlink in one transaction per sync, read back to adopt what a previous
//! ferryd left and to repair drift.
//!
//! The request builders are pure; [`Datapath`] does the I/O. Fixed part of
//! the table (the skeleton; the rest is in `render`):
//!
//! ```text
//! chain nat-prerouting  { type nat hook prerouting priority dstnat; jump services }
//! chain nat-output      { type nat hook output priority dstnat; jump services }
//! chain nat-postrouting { type nat hook postrouting priority srcnat;
//!   ct mark & 0x4000 != 0 masquerade fully-random       # external traffic, ETP Cluster
//!   ip saddr . ip daddr @hairpin masquerade fully-random }  # a pod through its own Service
//! chain filter-{prerouting,output} { type filter hook ... priority dstnat - 10; ct state new jump reject-services }
//! chain services {
//!   ip daddr . meta l4proto . th dport vmap @service-ips
//!   ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport vmap @service-nodeports }
//! chain reject-services {
//!   ip daddr . meta l4proto . th dport vmap @no-endpoint-services
//!   ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports
//!   ip daddr . meta l4proto . th dport @service-ports return
//!   ip daddr @cluster-ips goto reject }                  # a port the ClusterIP does not have
//! chain reject { meta l4proto tcp reject with tcp reset; reject with icmpx port-unreachable }
//! ```
//!
//! Masquerade is decided by a conntrack mark, not a packet mark: VXLAN
//! keeps the inner packet's mark on the encapsulated one (same netns), so a
//! packet mark would masquerade the tunnel traffic a second time; the
//! tunnel's packet has its own conntrack entry, without the mark.
//!
//! Refusals happen before DNAT and before routing (priority -110), so that
//! a node without a route for the service CIDR still answers with a
//! refusal rather than "network unreachable".

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use netlink_packet_netfilter::nftables::{
    Expressions, InetHookNumber, Operator, SetFlags, Verdict,
};
use nix::errno::Errno;

use nft::expr::{self, reg32, Key, Reg, SetLookup};
use nft::reply;
use nft::{Chain, Elem, ElemData, Hook, Nfnl, NftError, Req, SetRef, SetSpec, Table};

use super::render::{
    ep_from_data, fingerprint, pick_chain, Changes, Key as ElemKey, MapName, Rule, Target, View,
    Written, AFFINITY_PREFIX, EXT_PREFIX, PICK_MAX, REJECT_CHAIN, SVC_PREFIX,
};

pub const TABLE: &str = "ferry-svc";
/// The conntrack mark bit of connections to masquerade.
pub const MASQ_MARK: u32 = 0x4000;
/// The tag of the skeleton's rules: another tag (an older ferryd's layout)
/// means the table is rebuilt.
const SKELETON_TAG: &[u8] = b"ferry-svc skeleton v3";
/// Elements per message: the element list is one netlink attribute, whose
/// length field has 16 bits.
const ELEMS_PER_MSG: usize = 256;

const SERVICES: &str = "services";
const REJECT_SERVICES: &str = "reject-services";

fn table() -> Table {
    Table::inet(TABLE)
}

/// Requests of one transaction, with the set ids it hands out.
struct Batch {
    t: Table,
    reqs: Vec<Req>,
    next_id: u32,
    /// Ids of the named sets created in this batch.
    ids: HashMap<String, u32>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            t: table(),
            reqs: Vec::new(),
            next_id: 1,
            ids: HashMap::new(),
        }
    }

    fn id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    fn set<'a>(&self, name: &'a str) -> SetLookup<'a> {
        SetLookup {
            name,
            id: self.ids.get(name).copied(),
        }
    }

    fn add_set(&mut self, spec: SetSpec) {
        self.ids.insert(spec.name.clone(), spec.id);
        self.reqs.push(self.t.add_set(&spec));
    }

    fn add_elems(&mut self, set: SetRef, elems: &[Elem]) {
        for chunk in elems.chunks(ELEMS_PER_MSG) {
            self.reqs.push(self.t.add_elems(set, chunk, false));
        }
    }

    fn del_elems(&mut self, set: &str, elems: &[Elem]) {
        for chunk in elems.chunks(ELEMS_PER_MSG) {
            self.reqs.push(self.t.del_elems(set, chunk));
        }
    }

    /// A chain's rules, the last one tagged with `tag`.
    fn rules(&mut self, chain: &str, rules: Vec<(Vec<Expressions>, &str)>, tag: &[u8]) {
        let n = rules.len();
        for (i, (exprs, what)) in rules.into_iter().enumerate() {
            let r = if i + 1 == n {
                self.t.add_rule_tagged(chain, exprs, what, tag.to_vec())
            } else {
                self.t.add_rule(chain, exprs, what)
            };
            self.reqs.push(r);
        }
    }
}

// ---- the skeleton -----------------------------------------------------------

fn map_spec(m: MapName, id: u32) -> SetSpec {
    use expr::{concat_type as cat, TYPE_INET_PROTOCOL as P, TYPE_INET_SERVICE as S};
    use expr::{TYPE_IPV4_ADDR as A, TYPE_MARK as M};
    let verdict = Some((nft::NFT_DATA_VERDICT, 0));
    let (key_type, key_len, data) = match m {
        MapName::ServiceIps | MapName::NoEndpointIps => (cat(&[A, P, S]), 12, verdict),
        MapName::ServicePorts => (cat(&[A, P, S]), 12, None),
        MapName::NodePorts | MapName::NoEndpointPorts => (cat(&[P, S]), 8, verdict),
        MapName::ClusterIps => (A, 4, None),
        MapName::Hairpin => (cat(&[A, A]), 8, None),
        // chain key (8 bytes) . index : endpoint; chain key . endpoint.
        // Typed as 32-bit marks: nft can print those (it aborts on a
        // concatenation of plain integers, which have no size of their
        // own), and the index shows right (a mark is in host byte order,
        // as numgen writes it).
        MapName::Endpoints(_) => (cat(&[M, M, M]), 12, Some((cat(&[A, S]), 8))),
        MapName::PickPorts(_) => (cat(&[A, P, S]), 12, None),
        // ClusterIP . proto . port . index : endpoint.
        MapName::PickEndpoints(_) => (cat(&[A, P, S, M]), 16, Some((cat(&[A, S]), 8))),
        MapName::ChainEndpoints => (cat(&[M, M, A, S]), 16, None),
    };
    SetSpec {
        name: m.name().into(),
        id,
        flags: if data.is_some() {
            SetFlags::Map
        } else {
            SetFlags::empty()
        },
        key_type,
        key_len,
        data,
        timeout_ms: None,
        udata: Vec::new(),
    }
}

fn base(name: &str, kind: &'static str, hook: InetHookNumber, priority: i32) -> Chain {
    Chain {
        name: name.into(),
        hook: Some(Hook {
            kind,
            hook,
            priority,
        }),
    }
}

fn regular(name: &str) -> Chain {
    Chain {
        name: name.into(),
        hook: None,
    }
}

/// `ip daddr . meta l4proto . th dport` into Reg32_00..02.
fn daddr_proto_port() -> Vec<Expressions> {
    let mut e = expr::nfproto_is(false).to_vec();
    e.extend([
        expr::ip_daddr(reg32(0)),
        expr::meta(Key::L4Proto, reg32(1)),
        expr::th_dport(reg32(2)),
    ]);
    e
}

/// `ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport`
/// into Reg32_00..01.
fn local_proto_port() -> Vec<Expressions> {
    let mut e = expr::nfproto_is(false).to_vec();
    e.extend([
        expr::payload(expr::BASE_NETWORK, 16, 1, Reg::Reg1),
        expr::cmp(Operator::NotEqual, Reg::Reg1, vec![127]),
        expr::fib_daddr_type(Reg::Reg1),
        expr::cmp_eq(Reg::Reg1, expr::RTN_LOCAL.to_ne_bytes().to_vec()),
        expr::meta(Key::L4Proto, reg32(0)),
        expr::th_dport(reg32(1)),
    ]);
    e
}

fn with(mut e: Vec<Expressions>, more: impl IntoIterator<Item = Expressions>) -> Vec<Expressions> {
    e.extend(more);
    e
}

/// `ct mark & 0x4000 != 0`.
fn ct_marked() -> [Expressions; 3] {
    [
        expr::ct(expr::CT_MARK, Reg::Reg1),
        expr::bitwise(Reg::Reg1, MASQ_MARK.to_ne_bytes().to_vec(), vec![0; 4]),
        expr::cmp(Operator::NotEqual, Reg::Reg1, vec![0; 4]),
    ]
}

fn skeleton(b: &mut Batch) {
    b.reqs.push(b.t.add());
    for m in MapName::all() {
        let id = b.id();
        b.add_set(map_spec(m, id));
    }
    for c in [SERVICES, REJECT_SERVICES, REJECT_CHAIN] {
        b.reqs.push(b.t.add_chain(&regular(c), true));
    }

    let tag = SKELETON_TAG;
    // The shared pick chains: `daddr . l4proto . dport . numgen random
    // mod N` in that count's endpoints map; the `services` chain sends a
    // port there by its membership in the count's set. (The tuple is the
    // key, not a Service's own: the kernel refuses a rule that reads a
    // register it did not write itself, so nothing can be handed over.)
    // The rules of `services`: the pick sets first, then the verdict maps.
    let mut services_rules = Vec::new();
    for n in 1..=PICK_MAX {
        let chain = pick_chain(n);
        b.reqs.push(b.t.add_chain(&regular(&chain), true));
        let eps = b.set(MapName::PickEndpoints(n as u8).name());
        b.rules(
            &chain,
            vec![(
                with(
                    daddr_proto_port(),
                    [
                        expr::numgen_random(n, reg32(3)),
                        expr::lookup_map(eps, reg32(0), reg32(0)),
                        expr::dnat_v4(reg32(0), Some(reg32(1))),
                    ],
                ),
                "dnat to daddr . l4proto . dport . numgen random mod N map @pick-endpoints-N",
            )],
            tag,
        );
        let ports = b.set(MapName::PickPorts(n as u8).name());
        services_rules.push((
            with(
                daddr_proto_port(),
                [expr::lookup(ports, reg32(0)), expr::goto(&chain)],
            ),
            "daddr . l4proto . dport @pick-ports-N goto pick-N",
        ));
    }
    let (si, np) = (
        b.set(MapName::ServiceIps.name()),
        b.set(MapName::NodePorts.name()),
    );
    services_rules.extend([
        (
            with(
                daddr_proto_port(),
                [expr::lookup_map(si, reg32(0), Reg::Verdict)],
            ),
            "daddr . l4proto . dport vmap @service-ips",
        ),
        (
            with(
                local_proto_port(),
                [expr::lookup_map(np, reg32(0), Reg::Verdict)],
            ),
            "fib daddr type local l4proto . dport vmap @service-nodeports",
        ),
    ]);
    b.rules(SERVICES, services_rules, tag);
    let (ni, nn, ci, sp) = (
        b.set(MapName::NoEndpointIps.name()),
        b.set(MapName::NoEndpointPorts.name()),
        b.set(MapName::ClusterIps.name()),
        b.set(MapName::ServicePorts.name()),
    );
    b.rules(
        REJECT_SERVICES,
        vec![
            (
                with(
                    daddr_proto_port(),
                    [expr::lookup_map(ni, reg32(0), Reg::Verdict)],
                ),
                "daddr . l4proto . dport vmap @no-endpoint-services",
            ),
            (
                with(
                    local_proto_port(),
                    [expr::lookup_map(nn, reg32(0), Reg::Verdict)],
                ),
                "fib daddr type local l4proto . dport vmap @no-endpoint-nodeports",
            ),
            (
                with(
                    daddr_proto_port(),
                    [expr::lookup(sp, reg32(0)), expr::verdict(Verdict::Return)],
                ),
                "daddr . l4proto . dport @service-ports return",
            ),
            (
                with(
                    expr::nfproto_is(false).to_vec(),
                    [
                        expr::ip_daddr(Reg::Reg1),
                        expr::lookup(ci, Reg::Reg1),
                        expr::goto(REJECT_CHAIN),
                    ],
                ),
                "daddr @cluster-ips goto reject",
            ),
        ],
        tag,
    );
    b.rules(
        REJECT_CHAIN,
        vec![
            (
                with(
                    expr::l4proto_is(expr::IPPROTO_TCP).to_vec(),
                    [expr::reject_tcp_reset()],
                ),
                "tcp reject with tcp reset",
            ),
            (vec![expr::reject_port_unreachable()], "reject"),
        ],
        tag,
    );
    use InetHookNumber::*;
    for (name, hook) in [("nat-prerouting", PreRouting), ("nat-output", LocalOut)] {
        b.reqs
            .push(b.t.add_chain(&base(name, "nat", hook, -100), true));
        b.rules(
            name,
            vec![(vec![expr::jump(SERVICES)], "jump services")],
            tag,
        );
    }
    b.reqs
        .push(b.t.add_chain(&base("nat-postrouting", "nat", PostRouting, 100), true));
    let hp = b.set(MapName::Hairpin.name());
    b.rules(
        "nat-postrouting",
        vec![
            (
                with(ct_marked().to_vec(), [expr::masquerade(true)]),
                "ct mark & 0x4000 masquerade",
            ),
            (
                with(
                    expr::nfproto_is(false).to_vec(),
                    [
                        expr::ip_saddr(reg32(0)),
                        expr::ip_daddr(reg32(1)),
                        expr::lookup(hp, reg32(0)),
                        expr::masquerade(true),
                    ],
                ),
                "saddr . daddr @hairpin masquerade",
            ),
        ],
        tag,
    );
    for (name, hook) in [
        ("filter-prerouting", PreRouting),
        ("filter-output", LocalOut),
    ] {
        b.reqs
            .push(b.t.add_chain(&base(name, "filter", hook, -110), true));
        b.rules(
            name,
            vec![(
                vec![
                    expr::ct(expr::CT_STATE, Reg::Reg1),
                    expr::bitwise(
                        Reg::Reg1,
                        expr::CT_STATE_NEW.to_ne_bytes().to_vec(),
                        vec![0; 4],
                    ),
                    expr::cmp(Operator::NotEqual, Reg::Reg1, vec![0; 4]),
                    expr::jump(REJECT_SERVICES),
                ],
                "ct state new jump reject-services",
            )],
            tag,
        );
    }
}

/// Chains that carry [`SKELETON_TAG`] on their last rule.
const SKELETON_CHAINS: [&str; 8] = [
    SERVICES,
    REJECT_SERVICES,
    REJECT_CHAIN,
    "nat-prerouting",
    "nat-output",
    "nat-postrouting",
    "filter-prerouting",
    "filter-output",
];

// ---- Service chains ---------------------------------------------------------

fn affinity_spec(name: &str, timeout_s: u32, id: u32) -> SetSpec {
    use expr::{concat_type, TYPE_INET_SERVICE, TYPE_IPV4_ADDR};
    SetSpec {
        name: name.into(),
        id,
        flags: SetFlags::Map | SetFlags::Timeout | SetFlags::Eval,
        key_type: TYPE_IPV4_ADDR,
        key_len: 4,
        data: Some((concat_type(&[TYPE_IPV4_ADDR, TYPE_INET_SERVICE]), 8)),
        timeout_ms: Some(u64::from(timeout_s) * 1000),
        udata: Vec::new(),
    }
}

fn chain_rules(b: &mut Batch, chain: &str, rules: &[Rule]) {
    let mut out: Vec<(Vec<Expressions>, &str)> = Vec::new();
    for r in rules {
        match r {
            Rule::MarkMasquerade => {
                let set = !MASQ_MARK;
                out.push((
                    vec![
                        expr::ct(expr::CT_MARK, Reg::Reg1),
                        expr::bitwise(
                            Reg::Reg1,
                            set.to_ne_bytes().to_vec(),
                            MASQ_MARK.to_ne_bytes().to_vec(),
                        ),
                        expr::ct_set(expr::CT_MARK, Reg::Reg1),
                    ],
                    "ct mark set ct mark | 0x4000",
                ));
            }
            Rule::Dnat {
                key,
                count,
                affinity,
            } => {
                let eps = b.set(MapName::endpoints_of(*key).name());
                let key = key.to_be_bytes().to_vec();
                match affinity {
                    None => out.push((
                        vec![
                            expr::load_immediate(reg32(0), key),
                            expr::numgen_random(*count, reg32(2)),
                            expr::lookup_map(eps, reg32(0), reg32(0)),
                            expr::dnat_v4(reg32(0), Some(reg32(1))),
                        ],
                        "dnat to key . numgen random map @endpoints-NN",
                    )),
                    Some(aff) => {
                        let current = b.set(MapName::ChainEndpoints.name());
                        let aff = SetLookup {
                            name: aff,
                            id: b.ids.get(aff.as_str()).copied(),
                        };
                        // A client already pinned, to an endpoint that is
                        // still current: refresh its timeout, same endpoint.
                        out.push((
                            vec![
                                expr::ip_saddr(reg32(4)),
                                expr::lookup_map(aff, reg32(4), reg32(2)),
                                expr::load_immediate(reg32(0), key.clone()),
                                expr::lookup(current, reg32(0)),
                                expr::dynset_update(aff, reg32(4), Some(reg32(2))),
                                expr::dnat_v4(reg32(2), Some(reg32(3))),
                            ],
                            "saddr map @affinity (current endpoint) dnat",
                        ));
                        // Otherwise choose and pin.
                        out.push((
                            vec![
                                expr::load_immediate(reg32(0), key),
                                expr::numgen_random(*count, reg32(2)),
                                expr::lookup_map(eps, reg32(0), reg32(2)),
                                expr::ip_saddr(reg32(4)),
                                expr::dynset_update(aff, reg32(4), Some(reg32(2))),
                                expr::dnat_v4(reg32(2), Some(reg32(3))),
                            ],
                            "dnat to key . numgen random map @endpoints, pinned in @affinity",
                        ));
                    }
                }
            }
        }
    }
    let tag = fingerprint(rules).to_be_bytes();
    b.rules(chain, out, &tag);
}

fn elem(key: &[u8], t: &Target) -> Elem {
    Elem {
        key: key.to_vec(),
        data: match t {
            Target::Goto(c) => ElemData::Goto(c.clone()),
            Target::Drop => ElemData::Drop,
            Target::Member => ElemData::None,
            Target::Value(v) => ElemData::Value(v.to_vec()),
        },
        comment: None,
    }
}

/// The transaction that applies `c` to reach `new`; with `rebuild`, it
/// first replaces the whole table (skeleton and all), atomically.
fn requests(c: &Changes, new: &impl View, rebuild: Option<bool>) -> Vec<Req> {
    let mut b = Batch::new();
    if let Some(exists) = rebuild {
        if exists {
            b.reqs.push(b.t.delete());
        }
        skeleton(&mut b);
    }
    for name in &c.add_affinity {
        let id = b.id();
        b.add_set(affinity_spec(name, new.affinity(name).timeout_s, id));
    }
    for name in &c.write_chains {
        // CREATE without EXCL, then flush: the same requests create a new
        // chain or rewrite an existing one.
        b.reqs.push(b.t.add_chain(&regular(name), false));
        b.reqs.push(b.t.flush_chain(name));
        chain_rules(&mut b, name, new.rules(name));
    }
    for (map, keys) in &c.del_elems {
        let elems: Vec<Elem> = keys.iter().map(|k| Elem::key(k.to_vec())).collect();
        b.del_elems(map.name(), &elems);
    }
    for (map, adds) in &c.add_elems {
        let elems: Vec<Elem> = adds.iter().map(|(k, t)| elem(k, t)).collect();
        b.add_elems(SetRef::Name(map.name()), &elems);
    }
    for name in &c.del_chains {
        b.reqs.push(b.t.del_chain(name));
    }
    for name in &c.del_affinity {
        b.reqs.push(b.t.del_set(name));
    }
    b.reqs
}

// ---- reading the kernel -----------------------------------------------------

fn missing(e: &NftError) -> bool {
    e.errno() == Some(Errno::ENOENT)
}

/// What the table holds. `Ok(None)`: the table does not exist; `Err` with
/// [`Broken`] inside `Ok(Some(Err))`: it exists but is not a skeleton this
/// ferryd wrote, and must be rebuilt.
fn observe(nl: &mut Nfnl) -> Result<Option<Option<Written>>, NftError> {
    let t = table();
    match nl.request(&t.get()) {
        Ok(_) => {}
        Err(e) if missing(&e) => return Ok(None),
        Err(e) => return Err(e),
    }
    let chains = reply::chain_names(&nl.request(&t.dump_chains())?, TABLE);
    let sets = reply::set_names(&nl.request(&t.dump_sets())?, TABLE);
    let mut last_tag: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    for (chain, tag) in reply::rule_tags(&nl.request(&t.dump_rules())?, TABLE) {
        last_tag.insert(chain, tag);
    }
    let skeleton_ok = SKELETON_CHAINS
        .iter()
        .all(|c| last_tag.get(*c).and_then(|t| t.as_deref()) == Some(SKELETON_TAG))
        && MapName::all().all(|m| sets.iter().any(|s| s == m.name()));
    if !skeleton_ok {
        return Ok(Some(None));
    }
    let mut w = Written::default();
    for c in chains {
        if c.starts_with(SVC_PREFIX) || c.starts_with(EXT_PREFIX) {
            let fp = last_tag
                .get(&c)
                .and_then(|t| t.as_deref())
                .and_then(|t| Some(u64::from_be_bytes(t.try_into().ok()?)))
                .unwrap_or(0);
            w.chains.insert(c, fp);
        }
    }
    for m in MapName::all() {
        let elems = reply::parse_elems(&nl.request(&t.dump_elems(m.name()))?);
        let map = w.elems.entry(m).or_default();
        for e in elems {
            // The kernel holds a set's elements to its key and data
            // lengths, which are ours: anything longer is not our table.
            let Some(key) = ElemKey::new(&e.key) else {
                return Ok(Some(None));
            };
            let target = match (e.chain, e.verdict, e.value) {
                (Some(c), _, _) => Target::Goto(c),
                (None, Some(0), _) => Target::Drop,
                (None, None, Some(v)) => match ElemKey::new(&v) {
                    Some(v) => Target::Value(v),
                    None => return Ok(Some(None)),
                },
                _ => Target::Member,
            };
            map.insert(key, target);
        }
    }
    w.elems.retain(|_, v| !v.is_empty());
    w.affinity = sets
        .into_iter()
        .filter(|s| s.starts_with(AFFINITY_PREFIX))
        .map(|s| (s, None))
        .collect();
    Ok(Some(Some(w)))
}

// ---- the datapath -----------------------------------------------------------

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// The kernel was read first (start, reconcile timer).
    pub full: bool,
    /// The table was (re)built from nothing.
    pub rebuilt: bool,
    pub chains_written: usize,
    pub chains_deleted: usize,
    pub elements_changed: usize,
    pub requests: usize,
    pub took: Duration,
}

/// The Services table of the calling thread's network namespace.
pub struct Datapath {
    nl: Nfnl,
    /// What the kernel holds since our last successful sync; `None` until
    /// the first, after a failure (the next sync reads the kernel), or
    /// when the caller keeps it ([`Datapath::apply`]).
    written: Option<Written>,
    /// The last sync or apply succeeded: the kernel holds what it was given.
    in_sync: bool,
}

impl Datapath {
    pub fn open() -> Result<Datapath, NftError> {
        Ok(Datapath {
            nl: Nfnl::open()?,
            written: None,
            in_sync: false,
        })
    }

    /// Brings the kernel to `new`. With `full`, or when the last sync
    /// failed, reads the kernel first instead of trusting what was written:
    /// that adopts a previous ferryd's table without touching what is right
    /// (established connections keep their NAT in conntrack either way).
    pub fn sync(&mut self, new: &impl View, full: bool) -> Result<SyncStats, NftError> {
        let t0 = Instant::now();
        self.in_sync = false;
        let mut stats = SyncStats::default();
        let (base, rebuild) = match self.written.take() {
            Some(w) if !full => (w, None),
            _ => {
                stats.full = true;
                match observe(&mut self.nl)? {
                    Some(Some(w)) => (w, None),
                    Some(None) => (Written::default(), Some(true)),
                    None => (Written::default(), Some(false)),
                }
            }
        };
        stats.rebuilt = rebuild.is_some();
        let written = new.written();
        let changes = super::render::diff(&base, &written);
        if !changes.is_empty() || rebuild.is_some() {
            let reqs = requests(&changes, new, rebuild);
            stats.requests = reqs.len();
            self.nl.batch(&reqs)?;
        }
        stats.chains_written = changes.write_chains.len();
        stats.chains_deleted = changes.del_chains.len();
        stats.elements_changed = changes.elements();
        self.prune_affinity(&changes, new)?;
        self.written = Some(written);
        self.in_sync = true;
        stats.took = t0.elapsed();
        Ok(stats)
    }

    /// Applies `c`, which the caller computed from what the kernel holds
    /// (the state of the last successful sync or apply) to `new`: a change
    /// costs what it changes, nothing is read or compared. After a failure
    /// (or before any sync) this is a full [`Datapath::sync`] instead.
    pub fn apply(&mut self, c: &Changes, new: &impl View) -> Result<SyncStats, NftError> {
        if !self.in_sync {
            return self.sync(new, true);
        }
        let t0 = Instant::now();
        self.in_sync = false;
        // Stale from now on; the caller keeps the desired state.
        self.written = None;
        let mut stats = SyncStats::default();
        if !c.is_empty() {
            let reqs = requests(c, new, None);
            stats.requests = reqs.len();
            self.nl.batch(&reqs)?;
        }
        stats.chains_written = c.write_chains.len();
        stats.chains_deleted = c.del_chains.len();
        stats.elements_changed = c.elements();
        self.prune_affinity(c, new)?;
        self.in_sync = true;
        stats.took = t0.elapsed();
        Ok(stats)
    }

    /// Frees the copy of what was written, for a caller that keeps the
    /// desired state itself and syncs with [`Datapath::apply`].
    pub fn drop_written(&mut self) {
        self.written = None;
    }

    /// Clients pinned to an endpoint that is gone would keep being sent to
    /// a fresh random choice without being re-pinned (an update keeps an
    /// existing element's value): remove those entries.
    fn prune_affinity(&mut self, c: &Changes, new: &impl View) -> Result<(), NftError> {
        let t = table();
        for set in &c.prune_affinity {
            let current = &new.affinity(set).eps;
            let stale: Vec<Elem> = match self.nl.request(&t.dump_elems(set)) {
                Ok(r) => reply::parse_elems(&r)
                    .into_iter()
                    .filter(|e| {
                        e.value
                            .as_deref()
                            .and_then(ep_from_data)
                            .is_none_or(|ep| !current.contains(&ep))
                    })
                    .map(|e| Elem::key(e.key))
                    .collect(),
                Err(e) if missing(&e) => continue,
                Err(e) => return Err(e),
            };
            if !stale.is_empty() {
                let mut b = Batch::new();
                b.del_elems(set, &stale);
                match self.nl.batch(&b.reqs) {
                    // An entry that timed out meanwhile.
                    Err(e) if missing(&e) => {}
                    r => r?,
                }
            }
        }
        Ok(())
    }

    /// Forget what was written: the next sync reads the kernel.
    pub fn invalidate(&mut self) {
        self.written = None;
        self.in_sync = false;
    }
}

/// Removes the table (`ferryd` never does this on its own; for tests and
/// an explicit cleanup).
pub fn remove_table() -> Result<(), NftError> {
    let mut nl = Nfnl::open()?;
    match nl.batch(&[table().delete()]) {
        Err(e) if missing(&e) => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::plan::{Ep, Plan, PortPlan, Targets};
    use crate::service::render::render;

    fn ep(s: &str, port: u16) -> Ep {
        Ep {
            ip: s.parse().unwrap(),
            port,
        }
    }

    fn plan(affinity: Option<u32>) -> Plan {
        let eps = Targets::Endpoints(vec![ep("10.244.1.5", 8080), ep("10.244.2.5", 8080)]);
        Plan {
            ports: vec![PortPlan {
                id: "default/web:http:TCP".into(),
                proto: 6,
                port: 80,
                cluster_ips: vec!["10.96.0.10".parse().unwrap()],
                external_ips: vec![],
                node_port: Some(30080),
                affinity,
                internal: eps.clone(),
                external: eps,
                external_local: false,
                local: vec![ep("10.244.1.5", 8080)],
            }],
            health_checks: vec![],
        }
    }

    #[test]
    fn full_build_is_one_ordered_transaction() {
        let rs = render(&plan(None));
        let c = super::super::render::diff(&Written::default(), &rs.written());
        let reqs = requests(&c, &rs, Some(false));
        let what: Vec<&str> = reqs.iter().map(|r| r.what.as_str()).collect();
        assert!(what[0].starts_with("add table inet ferry-svc"));
        // Every chain is created before anything jumps to it; map elements
        // come after the chains they point to.
        let pos = |s: &str| {
            what.iter()
                .position(|w| w.contains(s))
                .unwrap_or_else(|| panic!("{s}: {what:#?}"))
        };
        assert!(
            pos("add chain inet ferry-svc ext-")
                < pos("add element inet ferry-svc service-nodeports")
        );
        assert!(pos("add chain inet ferry-svc pick-16") < pos("add rule inet ferry-svc services"));
        assert!(
            pos("add chain inet ferry-svc reject") < pos("add chain inet ferry-svc filter-output")
        );
    }

    #[test]
    fn affinity_adds_its_set_before_the_rules_that_use_it() {
        let rs = render(&plan(Some(30)));
        let c = super::super::render::diff(&Written::default(), &rs.written());
        let reqs = requests(&c, &rs, Some(false));
        let what: Vec<&str> = reqs.iter().map(|r| r.what.as_str()).collect();
        let set = what
            .iter()
            .position(|w| w.contains("add set inet ferry-svc aff-"))
            .unwrap();
        let rule = what
            .iter()
            .position(|w| w.contains("pinned in @affinity"))
            .unwrap();
        assert!(set < rule);
    }

    #[test]
    fn many_elements_are_split_into_messages() {
        let mut b = Batch::new();
        let elems: Vec<Elem> = (0..1000u32)
            .map(|i| Elem::key(i.to_be_bytes().to_vec()))
            .collect();
        b.add_elems(SetRef::Name("cluster-ips"), &elems);
        assert_eq!(b.reqs.len(), 4);
    }
}
