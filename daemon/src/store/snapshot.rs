//! What a store knows, held in memory and kept current one key at a time
//! (etcd: its watch events; the file store: inotify naming the file), so
//! that `nodes()` and `state()` answer without reading the backend and
//! a change costs the one record it changes, not the whole cluster.
//!
//! Keys are the store's own, relative to its root and without a file
//! suffix: `subnets/<subnet key>`, `services/NS/NAME`,
//! `endpointslices/NS/NAME`. How a value is decoded is the store's (the
//! file store keeps an expiry next to a record, etcd a lease); what a key
//! holds afterwards is decided here, the same for an event and a relist.

use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::Ipv4Network;

use super::NodeSet;
use crate::record::{self, NodeRecord};
use crate::service::model::{Kind, Object};
use crate::service::state::State;

/// What one key names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Slot {
    Node(Ipv4Network),
    Object {
        kind: Kind,
        namespace: String,
        name: String,
    },
}

impl Slot {
    /// The slot of a key relative to the store's root; `None` for keys that
    /// hold neither (the ranges, anything else found there).
    pub(crate) fn of(rel: &str) -> Option<Slot> {
        if let Some(k) = rel.strip_prefix("subnets/") {
            return record::parse_subnet_key(k).map(Slot::Node);
        }
        let (kind, rest) = rel.split_once('/')?;
        let kind = [Kind::Service, Kind::EndpointSlice]
            .into_iter()
            .find(|k| k.plural() == kind)?;
        let (namespace, name) = rest.split_once('/')?;
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return None;
        }
        Some(Slot::Object {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        })
    }
}

/// A live or expiring node record; `expires_ms` is `u64::MAX` where the
/// backend expires records itself (etcd's leases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub record: NodeRecord,
    pub expires_ms: u64,
}

/// What a slot holds once decoded.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    Node(Node),
    Object(Object),
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Cache {
    nodes: BTreeMap<Ipv4Network, Node>,
    /// The records of `nodes` that have not left, as [`Cache::live_nodes`]
    /// answers (minus those that expired since it last did), kept with
    /// each change: a reader gets them for the cost of 64 reference counts.
    live: NodeSet,
    /// The records of `live` that expire, by when.
    expiring: BTreeSet<(u64, Ipv4Network)>,
    /// What the datapath reads of the Services and slices (not the API's
    /// objects), in pieces shared with readers until a change copies one:
    /// a reader gets it for the cost of 128 reference counts.
    services: State,
    /// Moves on every change to `services`, so that a source can skip
    /// re-reading (and comparing) them when only nodes changed.
    version: u64,
}

/// Equal when they hold the same: what a relist would give. The version
/// counts changes and is no part of it.
impl PartialEq for Cache {
    fn eq(&self, o: &Cache) -> bool {
        self.nodes == o.nodes && self.services == o.services
    }
}

impl Cache {
    /// Sets what `slot` holds: `None` when the key is gone or its value is
    /// unreadable (a relist would leave it out too). True if that changed
    /// anything.
    pub(crate) fn set(&mut self, slot: Slot, value: Option<Value>) -> bool {
        match (slot, value) {
            (Slot::Node(subnet), Some(Value::Node(n))) => {
                if self.nodes.get(&subnet) == Some(&n) {
                    return false;
                }
                let old = self.nodes.insert(subnet, n);
                self.relive(subnet, old.as_ref());
                true
            }
            (Slot::Node(subnet), _) => {
                let Some(old) = self.nodes.remove(&subnet) else {
                    return false;
                };
                self.relive(subnet, Some(&old));
                true
            }
            (Slot::Object { kind, .. }, Some(Value::Object(o))) if o.reference().kind == kind => {
                // A change the datapath does not read (labels, a selector)
                // is no change here.
                if !self.services.insert(&o) {
                    return false;
                }
                self.version += 1;
                true
            }
            (
                Slot::Object {
                    kind,
                    namespace,
                    name,
                },
                _,
            ) => {
                let key = format!("{namespace}/{name}");
                if !self.services.remove(kind, &key) {
                    return false;
                }
                self.version += 1;
                true
            }
        }
    }

    /// Takes what `fresh` (a full relist) holds; the version moves only if
    /// the Services or slices differ. True if anything changed.
    pub(crate) fn replace(&mut self, fresh: Cache) -> bool {
        let services_differ = self.services != fresh.services;
        let changed = services_differ || self.nodes != fresh.nodes;
        let old = std::mem::replace(&mut self.nodes, fresh.nodes);
        let moved: BTreeSet<Ipv4Network> = old
            .iter()
            .filter(|(k, n)| self.nodes.get(k) != Some(n))
            .map(|(k, _)| *k)
            .chain(self.nodes.keys().filter(|k| !old.contains_key(k)).copied())
            .collect();
        for subnet in moved {
            self.relive(subnet, old.get(&subnet));
        }
        if services_differ {
            self.services = fresh.services;
            self.version += 1;
        }
        changed
    }

    /// Drops every slot that `keep` does not name; true if that changed
    /// anything.
    pub(crate) fn retain(&mut self, keep: &std::collections::BTreeSet<Slot>) -> bool {
        let nodes = self.nodes.len();
        let (kept, dropped) = std::mem::take(&mut self.nodes)
            .into_iter()
            .partition(|(s, _)| keep.contains(&Slot::Node(*s)));
        self.nodes = kept;
        for (subnet, old) in dropped {
            self.relive(subnet, Some(&old));
        }
        let mut gone = Vec::new();
        let keys = self
            .services
            .services
            .keys()
            .map(|k| (Kind::Service, k))
            .chain(
                self.services
                    .slices
                    .keys()
                    .map(|k| (Kind::EndpointSlice, k)),
            );
        for (kind, k) in keys {
            let held = k.split_once('/').is_some_and(|(ns, name)| {
                keep.contains(&Slot::Object {
                    kind,
                    namespace: ns.into(),
                    name: name.into(),
                })
            });
            if !held {
                gone.push((kind, k.clone()));
            }
        }
        for (kind, k) in &gone {
            self.services.remove(*kind, k);
        }
        if !gone.is_empty() {
            self.version += 1;
        }
        nodes != self.nodes.len() || !gone.is_empty()
    }

    /// Brings `live` and `expiring` up to what `nodes` holds for `subnet`,
    /// which held `old` before.
    fn relive(&mut self, subnet: Ipv4Network, old: Option<&Node>) {
        if let Some(o) = old {
            self.expiring.remove(&(o.expires_ms, subnet));
        }
        let key = record::subnet_key(subnet);
        match self.nodes.get(&subnet).filter(|n| !n.record.left) {
            Some(n) => {
                if n.expires_ms != u64::MAX {
                    self.expiring.insert((n.expires_ms, subnet));
                }
                // No copy of its piece when only the expiry moved.
                self.live.insert(key, n.record.clone());
            }
            None => {
                self.live.remove(&key);
            }
        }
    }

    /// Records that did not leave and whose lease has not expired at
    /// `now_ms`, by subnet key. Costs what expired since the last call.
    pub(crate) fn live_nodes(&mut self, now_ms: u64) -> NodeSet {
        while let Some(&(at, subnet)) = self.expiring.first() {
            if at > now_ms {
                break;
            }
            self.expiring.pop_first();
            self.live.remove(&record::subnet_key(subnet));
        }
        self.live.clone()
    }

    pub(crate) fn state(&self) -> State {
        self.services.clone()
    }

    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    #[cfg(test)]
    pub(crate) fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rescan sets what it finds and drops the rest: the same as a
    /// snapshot built from what it found.
    #[test]
    fn retain_drops_what_was_not_found() {
        let objs = crate::service::model::parse(
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: []\n",
        )
        .unwrap();
        let slot = |o: &Object| {
            let r = o.reference();
            Slot::Object {
                kind: r.kind,
                namespace: r.namespace,
                name: r.name,
            }
        };
        let mut all = Cache::default();
        for o in &objs {
            assert!(all.set(slot(o), Some(Value::Object(o.clone()))));
        }
        let v = all.version();
        // Found again: a only.
        let keep: std::collections::BTreeSet<Slot> = [slot(&objs[0])].into();
        assert!(all.retain(&keep));
        assert!(all.version() > v);
        let mut only = Cache::default();
        only.set(slot(&objs[0]), Some(Value::Object(objs[0].clone())));
        assert_eq!(all, only);
        assert!(!all.retain(&keep), "nothing more to drop");
    }

    /// For random puts, renewals, leaves and deletes of records with
    /// leases, relists and rescans, and a clock that moves on: the live set kept with each
    /// change holds exactly the records a filter of all of them at that
    /// time gives, and a renewal that moves only the expiry changes none.
    #[test]
    fn live_nodes_follow_changes_and_expiry() {
        let mut rng = crate::store::testing::Rng(0x853c_49e6_748f_ea9b);
        let mut below = |n: u64| rng.below(n as usize) as u64;
        let mut c = Cache::default();
        let mut now = 1_000;
        let mut seen = 0;
        for step in 0..5000 {
            let subnet: Ipv4Network = format!("10.244.{}.0/24", below(20)).parse().unwrap();
            let record = NodeRecord {
                node: format!("n{}", below(3)),
                subnet,
                underlay_ip: std::net::Ipv4Addr::new(192, 168, 0, below(3) as u8),
                vtep_mac: record::Mac::for_vtep("n", 1),
                left: below(10) == 0,
            };
            let expires_ms = [u64::MAX, now + below(50)][below(2) as usize];
            let value = (below(5) != 0).then_some(Value::Node(Node { record, expires_ms }));
            c.set(Slot::Node(subnet), value);
            // Now and then a relist (some records gone) or a rescan.
            if step % 97 == 0 {
                let mut fresh = Cache::default();
                for (s, n) in c.nodes.clone() {
                    if below(3) != 0 {
                        fresh.set(Slot::Node(s), Some(Value::Node(n)));
                    }
                }
                c.replace(fresh);
            } else if step % 89 == 0 {
                let keep = c.nodes.keys().filter(|_| below(3) != 0);
                let keep = keep.map(|s| Slot::Node(*s)).collect();
                c.retain(&keep);
            }
            now += below(10);
            let live = c.live_nodes(now);
            let want: Vec<NodeRecord> = c
                .nodes
                .values()
                .filter(|n| !n.record.left && n.expires_ms > now)
                .map(|n| n.record.clone())
                .collect();
            assert_eq!(super::super::records_of(&live), want, "step {step}");
            seen += want.len();
            // The same record, a later expiry: nothing to tell anyone.
            if let Some(n) = c.nodes.get(&subnet).cloned().filter(|n| n.expires_ms > now) {
                let later = Node {
                    expires_ms: n.expires_ms.saturating_add(100),
                    ..n
                };
                let live = c.live_nodes(now);
                c.set(Slot::Node(subnet), Some(Value::Node(later)));
                assert!(live == c.live_nodes(now), "step {step}");
            }
        }
        assert!(seen > 5000, "not vacuous: {seen}");
    }

    #[test]
    fn slots() {
        let s = |k: &str| Slot::of(k);
        assert_eq!(
            s("subnets/10.244.1.0-24"),
            Some(Slot::Node("10.244.1.0/24".parse().unwrap()))
        );
        assert_eq!(s("subnets/10.244.1.1-24"), None, "not a network address");
        assert_eq!(
            s("endpointslices/prod/web-1"),
            Some(Slot::Object {
                kind: Kind::EndpointSlice,
                namespace: "prod".into(),
                name: "web-1".into()
            })
        );
        for bad in [
            "ranges",
            "services/web",
            "services//x",
            "services/a/b/c",
            "pods/a/b",
        ] {
            assert_eq!(s(bad), None, "{bad}");
        }
    }
}
