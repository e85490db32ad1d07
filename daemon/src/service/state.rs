//! What ferryd keeps of Services and EndpointSlices: only what the
//! datapath's plan reads ([`SvcSpec`], [`SliceSpec`]), not the API's whole
//! objects (a k8s-openapi Service or slice is kilobytes; 10k of each made
//! ferryd's memory hundreds of MiB), in maps that are cheap to share and to
//! compare ([`Shards`]). Pure.
//!
//! A [`State`] is copied on every change published to the reconciler, and
//! the reconciler asks it what changed since the last one it saw: both
//! cost the shards that changed, not the whole cluster. `ferryctl get`
//! needs the full objects and reads them from the store itself.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::model::{Kind, Object, SERVICE_NAME_LABEL};
use super::plan::{proto_number, DEFAULT_AFFINITY_SECONDS};
use super::Snapshot;

/// How many pieces a [`Shards`] map is cut into: a change copies one piece
/// (~1/64 of the map), a comparison skips the pieces two maps share.
pub const SHARDS: usize = 64;

/// A map from `namespace/name` to a shared value, cut into [`SHARDS`]
/// pieces by a hash of the key, each piece shared until it is changed. A
/// clone costs 64 reference counts; changing a key copies its piece only.
/// Not sorted as a whole: iterate and sort where order matters.
#[derive(Debug, Clone)]
pub struct Shards<V> {
    shards: Vec<Arc<BTreeMap<String, Arc<V>>>>,
}

impl<V> Default for Shards<V> {
    fn default() -> Self {
        Shards {
            shards: (0..SHARDS).map(|_| Arc::default()).collect(),
        }
    }
}

/// Equal when they hold equal values under the same keys; pieces two maps
/// share are not walked.
impl<V: Eq> PartialEq for Shards<V> {
    fn eq(&self, o: &Self) -> bool {
        self.shards
            .iter()
            .zip(&o.shards)
            .all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
}

impl<V: Eq> Eq for Shards<V> {}

fn shard_of(key: &str) -> usize {
    (nft::fnv1a64(key.as_bytes()) % SHARDS as u64) as usize
}

impl<V: Eq> Shards<V> {
    pub fn get(&self, key: &str) -> Option<&Arc<V>> {
        self.shards[shard_of(key)].get(key)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `v`; false (and nothing copied) if it held an equal
    /// value already.
    pub fn insert(&mut self, key: String, v: V) -> bool {
        let i = shard_of(&key);
        if self.shards[i].get(&key).is_some_and(|old| **old == v) {
            return false;
        }
        Arc::make_mut(&mut self.shards[i]).insert(key, Arc::new(v));
        true
    }

    /// Removes `key`; false (and nothing copied) if it was not there.
    pub fn remove(&mut self, key: &str) -> bool {
        let i = shard_of(key);
        if !self.shards[i].contains_key(key) {
            return false;
        }
        Arc::make_mut(&mut self.shards[i]).remove(key);
        true
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.is_empty())
    }

    /// Every key, piece by piece (not in key order).
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.shards.iter().flat_map(|s| s.keys())
    }

    /// Every entry, piece by piece (not in key order).
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<V>)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// The keys whose value differs between `old` and `self` (added,
    /// removed or changed). Costs the pieces that differ.
    pub fn changed_since(&self, old: &Shards<V>) -> Vec<String> {
        let mut out = Vec::new();
        for (new, old) in self.shards.iter().zip(&old.shards) {
            if Arc::ptr_eq(new, old) {
                continue;
            }
            for (k, v) in new.iter() {
                if old.get(k).is_none_or(|o| !Arc::ptr_eq(o, v) && o != v) {
                    out.push(k.clone());
                }
            }
            out.extend(old.keys().filter(|k| !new.contains_key(*k)).cloned());
        }
        out
    }
}

/// One shared copy of each node and port name: 50k endpoints name a few
/// nodes. Never shrinks, which bounds it by the names a cluster ever had.
fn intern(s: &str) -> Arc<str> {
    static NAMES: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<Arc<str>>>> =
        std::sync::LazyLock::new(Default::default);
    let mut names = NAMES.lock().expect("not poisoned");
    if let Some(n) = names.get(s) {
        return n.clone();
    }
    let n: Arc<str> = Arc::from(s);
    names.insert(n.clone());
    n
}

/// What one Service port is, as far as the plan needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcPort {
    pub name: Arc<str>,
    /// IPPROTO_TCP, _UDP or _SCTP (a port with another protocol is left
    /// out: validation refuses it).
    pub proto: u8,
    pub port: u16,
    /// The endpoint port when a slice lists no ports: a numeric
    /// `targetPort`, or the port itself when there is none; `None` for a
    /// named `targetPort` (only a slice can resolve that).
    pub fallback: Option<i32>,
    pub node_port: Option<u16>,
}

/// What the datapath needs of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SvcSpec {
    /// `type: ExternalName`: no rules at all.
    pub external_name: bool,
    /// `clusterIP` and `clusterIPs`, IPv4, sorted, without duplicates;
    /// empty for a headless Service (no rules either).
    pub cluster_ips: Vec<Ipv4Addr>,
    /// `externalIPs` and, for a LoadBalancer, its ingress IPs; sorted.
    pub external_ips: Vec<Ipv4Addr>,
    /// NodePort or LoadBalancer: the ports' node ports count.
    pub node_ports: bool,
    pub etp_local: bool,
    pub itp_local: bool,
    /// ClientIP affinity's timeout in seconds.
    pub affinity: Option<u32>,
    pub ports: Vec<SvcPort>,
    /// A LoadBalancer's health-check node port under
    /// `externalTrafficPolicy: Local`.
    pub health_check: Option<u16>,
}

impl SvcSpec {
    pub fn of(svc: &Service) -> SvcSpec {
        let Some(spec) = &svc.spec else {
            return SvcSpec::default();
        };
        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        let v4 = |it: &mut dyn Iterator<Item = &str>| -> Vec<Ipv4Addr> {
            let mut v: Vec<Ipv4Addr> = it.filter_map(|s| s.parse().ok()).collect();
            v.sort();
            v.dedup();
            v
        };
        let cluster_ips = v4(&mut spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .map(String::as_str));
        let lb_ips = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref())
            .filter(|_| kind == "LoadBalancer");
        let external_ips = v4(&mut spec
            .external_ips
            .iter()
            .flatten()
            .map(String::as_str)
            .chain(lb_ips));
        let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(DEFAULT_AFFINITY_SECONDS)
        });
        let node_ports = matches!(kind, "NodePort" | "LoadBalancer");
        let port16 = |n: i32| u16::try_from(n).ok().filter(|n| *n > 0);
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(SvcPort {
                    name: intern(p.name.as_deref().unwrap_or("")),
                    proto: proto_number(p.protocol.as_deref())?,
                    port: u16::try_from(p.port).ok()?,
                    fallback: match &p.target_port {
                        Some(IntOrString::Int(n)) => Some(*n),
                        Some(IntOrString::String(_)) => None,
                        None => Some(p.port),
                    },
                    node_port: p.node_port.and_then(port16),
                })
            })
            .collect();
        SvcSpec {
            external_name: kind == "ExternalName",
            cluster_ips,
            external_ips,
            node_ports,
            etp_local,
            itp_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            affinity,
            ports,
            health_check: spec
                .health_check_node_port
                .filter(|_| etp_local && kind == "LoadBalancer")
                .and_then(port16),
        }
    }
}

/// One port of a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Arc<str>,
    /// `None`: a protocol no Service port can have.
    pub proto: Option<u8>,
    pub port: Option<i32>,
}

/// One address of an endpoint of a slice, with the endpoint's node and
/// conditions, the API's defaults applied (unset `ready` is ready, unset
/// `serving` is as ready, unset `terminating` is not terminating). An
/// endpoint with two addresses is two of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub ip: Ipv4Addr,
    pub node: Option<Arc<str>>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// What the datapath needs of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SliceSpec {
    /// `namespace/name` of the Service its label names; `None` without the
    /// label or for another address type than IPv4 (then it counts for
    /// nothing).
    pub service: Option<String>,
    /// Empty: the slice lists no ports (each Service port's fallback).
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointSpec>,
}

impl SliceSpec {
    pub fn of(s: &EndpointSlice) -> SliceSpec {
        let ns = s.metadata.namespace.as_deref().unwrap_or("default");
        let service = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .filter(|_| s.address_type == "IPv4")
            .map(|svc| super::model::key(Some(ns), svc));
        let ports = s
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePort {
                name: intern(p.name.as_deref().unwrap_or("")),
                proto: proto_number(p.protocol.as_deref()),
                port: p.port,
            })
            .collect();
        let endpoints = s
            .endpoints
            .iter()
            .flatten()
            .flat_map(|e| {
                let c = e.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let node = e.node_name.as_deref().map(intern);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                e.addresses
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .map(move |ip| EndpointSpec {
                        ip,
                        node: node.clone(),
                        ready,
                        serving,
                        terminating,
                    })
            })
            .collect();
        SliceSpec {
            service,
            ports,
            endpoints,
        }
    }
}

/// Everything a source knows about load balancing, as the Services
/// reconciler consumes it. Keys are `"<namespace>/<name>"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub services: Shards<SvcSpec>,
    pub slices: Shards<SliceSpec>,
}

impl State {
    /// The state of `snap`'s objects.
    pub fn of(snap: &Snapshot) -> State {
        let mut s = State::default();
        for (k, svc) in &snap.services {
            s.services.insert(k.clone(), SvcSpec::of(svc));
        }
        for (k, e) in &snap.slices {
            s.slices.insert(k.clone(), SliceSpec::of(e));
        }
        s
    }

    /// Adds (or replaces) `obj` under its `namespace/name`; true if that
    /// changed anything the datapath reads.
    pub fn insert(&mut self, obj: &Object) -> bool {
        let key = obj.key();
        match obj {
            Object::Service(s) => self.services.insert(key, SvcSpec::of(s)),
            Object::EndpointSlice(e) => self.slices.insert(key, SliceSpec::of(e)),
        }
    }

    /// Removes the object of `kind` under `key`; true if it was there.
    pub fn remove(&mut self, kind: Kind, key: &str) -> bool {
        match kind {
            Kind::Service => self.services.remove(key),
            Kind::EndpointSlice => self.slices.remove(key),
        }
    }

    pub fn contains(&self, kind: Kind, key: &str) -> bool {
        match kind {
            Kind::Service => self.services.contains_key(key),
            Kind::EndpointSlice => self.slices.contains_key(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(yaml: &str) -> State {
        State::of(&Snapshot::from_documents(yaml).unwrap())
    }

    #[test]
    fn shards_share_what_did_not_change() {
        let mut a: Shards<u32> = Shards::default();
        for i in 0..1000 {
            a.insert(format!("ns/s{i}"), i);
        }
        let mut b = a.clone();
        assert_eq!(a, b);
        assert!(b.changed_since(&a).is_empty());
        assert!(!b.insert("ns/s7".into(), 7), "same value: no change");
        assert!(b.insert("ns/s7".into(), 70));
        assert!(b.insert("ns/new".into(), 1));
        assert!(b.remove("ns/s9"));
        assert!(!b.remove("ns/s9"));
        let mut changed = b.changed_since(&a);
        changed.sort();
        assert_eq!(changed, ["ns/new", "ns/s7", "ns/s9"]);
        assert_ne!(a, b);
        // Pieces not touched are still the same allocation.
        let shared = a
            .shards
            .iter()
            .zip(&b.shards)
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        assert!(shared >= SHARDS - 3, "{shared}");
        assert_eq!(b.len(), 1000);
        // Equal values in different allocations are equal.
        let mut c: Shards<u32> = Shards::default();
        for (k, v) in b.iter() {
            c.insert(k.clone(), **v);
        }
        assert_eq!(b, c);
        assert!(c.changed_since(&b).is_empty());
    }

    #[test]
    fn specs_keep_what_the_plan_reads() {
        let s = state(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, labels: {app: web}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  externalIPs: [192.0.2.9, 192.0.2.1]
  externalTrafficPolicy: Local
  healthCheckNodePort: 31000
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: dns}
status: {loadBalancer: {ingress: [{ip: 198.51.100.1}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.5], nodeName: n1}
- {addresses: [10.244.1.6], conditions: {ready: false, serving: true, terminating: true}}
"#,
        );
        let web = s.services.get("default/web").unwrap();
        assert_eq!(web.cluster_ips, ["10.96.0.10".parse::<Ipv4Addr>().unwrap()]);
        let ext: Vec<String> = web.external_ips.iter().map(|i| i.to_string()).collect();
        assert_eq!(ext, ["192.0.2.1", "192.0.2.9", "198.51.100.1"]);
        assert!(web.node_ports && web.etp_local && !web.itp_local);
        assert_eq!(web.affinity, Some(DEFAULT_AFFINITY_SECONDS));
        assert_eq!(web.health_check, Some(31000));
        assert_eq!(web.ports[0].fallback, Some(8080));
        assert_eq!(web.ports[0].node_port, Some(30080));
        assert_eq!(web.ports[1].fallback, None, "a named targetPort");
        assert_eq!(web.ports[1].proto, nft::expr::IPPROTO_UDP);
        let slice = s.slices.get("default/web-1").unwrap();
        assert_eq!(slice.service.as_deref(), Some("default/web"));
        assert!(slice.endpoints[0].ready && slice.endpoints[0].serving);
        let t = &slice.endpoints[1];
        assert!(!t.ready && t.serving && t.terminating && t.node.is_none());
        assert!(Arc::ptr_eq(&slice.ports[0].name, &web.ports[0].name));
    }
}
