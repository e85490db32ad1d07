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

use std::collections::BTreeMap;

use ipnetwork::Ipv4Network;

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
                self.nodes.insert(subnet, n);
                true
            }
            (Slot::Node(subnet), _) => self.nodes.remove(&subnet).is_some(),
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
        self.nodes = fresh.nodes;
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
        self.nodes.retain(|s, _| keep.contains(&Slot::Node(*s)));
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

    /// Records that did not leave and whose lease has not expired at `now_ms`.
    pub(crate) fn live_nodes(&self, now_ms: u64) -> Vec<NodeRecord> {
        self.nodes
            .values()
            .filter(|n| !n.record.left && n.expires_ms > now_ms)
            .map(|n| n.record.clone())
            .collect()
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
