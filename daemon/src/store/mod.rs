//! Cluster state: what a node publishes ([`Membership`]), what the cluster
//! holds ([`ClusterState`]) and what `ferryctl` changes ([`ServiceWrites`]),
//! a store per backend.
//!
//! Each store holds one record per allocated subnet ([`NodeRecord`]) under
//! a lease. `register` finds or allocates this node's subnet and publishes
//! the record; `nodes` lists the live records; `changed` resolves when the
//! set may have changed (spurious wake-ups are fine: the daemon reconciles
//! against the kernel anyway).
//!
//! Services and EndpointSlices are kept as the Kubernetes API's own JSON,
//! one object per file or key (layouts in [`file`] and [`etcd`]), next to
//! the service CIDR and node-port range they were allocated from. Only
//! [`ServiceWrites::apply`] allocates, and it does so against everything
//! the store holds, atomically, so that the store never holds one address
//! or node port twice.

pub mod etcd;
pub mod etcd_conn;
pub mod file;
pub mod kube;
mod snapshot;

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::record::{self, AllocError, Mac, NodeRecord};
use crate::service::alloc::{self, Ranges};
use crate::service::model::{self, Kind, Object, ObjectRef};
use crate::service::state::{Shards, State};
use crate::service::Snapshot;

/// Live node records by a key that stays the record's from one read to
/// the next (file and etcd: its subnet key), in pieces that successive
/// reads share: the overlay asks it what changed since the last one it
/// applied, for the cost of what changed.
pub type NodeSet = Shards<NodeRecord>;

/// The records of `set`, in subnet order.
pub fn records_of(set: &NodeSet) -> Vec<NodeRecord> {
    let mut v: Vec<NodeRecord> = set.iter().map(|(_, r)| (**r).clone()).collect();
    v.sort_by_key(|r| r.subnet);
    v
}

/// A [`NodeSet`] of `records`, keyed by node name and subnet.
pub fn node_set_of(records: impl IntoIterator<Item = NodeRecord>) -> NodeSet {
    let mut set = NodeSet::default();
    for r in records {
        set.insert(format!("{}/{}", r.node, record::subnet_key(r.subnet)), r);
    }
    set
}

/// What a node asks for when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub node: String,
    pub underlay_ip: Ipv4Addr,
    pub vtep_mac: Mac,
    pub cluster: Ipv4Network,
    pub subnet_len: u8,
    pub ttl: Duration,
    /// The subnet this node's pods already use (from the conflist it wrote
    /// earlier), tried first when the store has no record of the node.
    pub prefer: Option<Ipv4Network>,
}

impl Registration {
    pub fn record(&self, subnet: Ipv4Network) -> NodeRecord {
        NodeRecord {
            node: self.node.clone(),
            subnet,
            underlay_ip: self.underlay_ip,
            vtep_mac: self.vtep_mac,
            left: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error("file store {dir}: {what}: {source}")]
    File {
        dir: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd {endpoints}: {what}: {}", etcd_conn::describe(.source))]
    Etcd {
        endpoints: String,
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    /// A flag or file for reaching etcd (TLS, user), checked before
    /// connecting; the message names the flag.
    #[error("{0}")]
    EtcdAccess(String),
    #[error("etcd {endpoints}: {what}: timed out after {secs}s")]
    EtcdTimeout {
        endpoints: String,
        what: String,
        secs: u64,
    },
    #[error("could not reserve a subnet after {0} attempts (too much contention)")]
    Contention(u32),
    #[error(
        "could not mark node {node:?} as left after {attempts} attempts: its record kept changing"
    )]
    LeaveContention { node: String, attempts: u32 },
    #[error("node {0:?} was marked as left in the store (ferryd leave)")]
    Left(String),
    #[error("node {0:?} is not registered in the store")]
    NotRegistered(String),
    #[error(transparent)]
    ServiceAlloc(#[from] alloc::AllocError),
    #[error("{0} appears more than once in one apply")]
    Duplicate(ObjectRef),
    #[error(
        "the store holds {stored}, but this ferryd was given {given}: the store's Services \
         were allocated from its ranges; start ferryd with --service-cidr {} --nodeport-range {}, \
         or use another store",
        stored.service_cidr,
        stored.node_ports_text()
    )]
    RangesDiffer { stored: Ranges, given: Ranges },
    #[error("{at}: unreadable service ranges record: {msg}")]
    BadRanges { at: String, msg: String },
    #[error("could not apply after {0} attempts: the store's Services kept changing")]
    ApplyContention(u32),
    /// A call to the Kubernetes API failed. Boxed: kube's error is large and
    /// every store result would carry its size.
    #[error("Kubernetes API {server}: {what}: {source}")]
    Kube {
        server: String,
        what: String,
        #[source]
        source: Box<::kube::Error>,
    },
    /// Kubernetes mode, anything but a failed call: no client
    /// configuration, a node that cannot be used, a write ferry does not do.
    #[error("Kubernetes mode: {0}")]
    KubeMode(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What a node publishes about itself: its registration under a lease.
/// In the Kubernetes API the kubelet registers the Node and
/// kube-controller-manager allocates its subnet, so there registering
/// means waiting for the subnet and publishing the overlay's annotations
/// ([`kube`]).
pub trait Membership: Send + Sync + 'static {
    /// Finds or allocates this node's subnet and publishes its record.
    fn register(&self, reg: &Registration) -> impl Future<Output = StoreResult<NodeRecord>> + Send;
    /// Keeps this node's lease alive; called about every few seconds.
    fn renew(&self) -> impl Future<Output = StoreResult<()>> + Send;
    /// Marks `node` as left: it drops out of `nodes` at once; its subnet is
    /// free again only once its lease expired.
    fn leave(&self, node: &str) -> impl Future<Output = StoreResult<()>> + Send;
    /// This node's overlay is up and it is ready for pods. Called on every
    /// pass in which the node is ready, so it must be cheap when there is
    /// nothing to do. The Kubernetes store sets the Node's
    /// `NetworkUnavailable` condition to False (the kubelet keeps a node
    /// NotReady for pods until a network plugin does); the others have no
    /// such flag.
    fn network_up(&self) -> impl Future<Output = StoreResult<()>> + Send {
        std::future::ready(Ok(()))
    }
}

/// What the cluster holds, as a source of snapshots reads it.
pub trait ClusterState: Send + Sync + 'static {
    /// Live records of all nodes (this one included), without those that
    /// left or whose lease expired.
    fn nodes(&self) -> impl Future<Output = StoreResult<Vec<NodeRecord>>> + Send;
    /// The same records as a [`NodeSet`]: the file and etcd stores answer
    /// from memory for the cost of a few reference counts.
    fn node_set(&self) -> impl Future<Output = StoreResult<NodeSet>> + Send {
        async { Ok(node_set_of(self.nodes().await?)) }
    }
    /// All Services and EndpointSlices as the API's objects, read at one
    /// point in time (etcd: one revision) from the backend: what `ferryctl
    /// get` shows. An object that cannot be read or is not valid is left
    /// out and logged once.
    fn services(&self) -> impl Future<Output = StoreResult<Snapshot>> + Send;
    /// What ferryd programs of them ([`State`]): the file and etcd stores
    /// answer from memory, kept current by events, for the cost of a few
    /// reference counts.
    fn state(&self) -> impl Future<Output = StoreResult<State>> + Send {
        async { Ok(State::of(&self.services().await?)) }
    }
    /// Resolves when the records, the Services or the EndpointSlices may
    /// have changed.
    fn changed(&self) -> impl Future<Output = ()> + Send;
    /// A number that moves whenever `state()` may answer differently,
    /// for a source to skip re-reading and comparing 10k Services when only
    /// a node changed; `None`: not known, read them every time.
    fn services_version(&self) -> Option<u64> {
        None
    }
    /// Called on the reconcile timer: a store that answers from memory reads
    /// its backend again here, to repair what its events missed.
    fn resync(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// What this source reads from and how its watches stand, for
    /// `/status` (`ferryctl status`); `null` when there is nothing to add.
    fn describe(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// What [`ServiceWrites::apply`] did to one object, as kubectl says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Configured,
    Unchanged,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Change::Created => "created",
            Change::Configured => "configured",
            Change::Unchanged => "unchanged",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub object: ObjectRef,
    pub change: Change,
}

/// What `ferryctl` changes (and the ranges ferryd publishes at start).
pub trait ServiceWrites: Send + Sync + 'static {
    /// Writes `objects`, all of them or — on any error — none: fills in
    /// missing clusterIPs, node ports and health-check node ports
    /// ([`alloc::assign`]) against everything the store holds, keeping what
    /// a stored Service of the same name was given. Allocates from the
    /// store's ranges; from `fallback` when the store has none, which it
    /// then records, so that a ferryd started later with other ranges
    /// refuses to start rather than program Services outside them.
    /// Returns one [`Applied`] per object, in order; unchanged objects are
    /// not rewritten.
    fn apply(
        &self,
        objects: Vec<Object>,
        fallback: &Ranges,
    ) -> impl Future<Output = StoreResult<Vec<Applied>>> + Send;
    /// Deletes the objects named; per object, whether it existed. Deleting a
    /// Service deletes nothing else (its EndpointSlices stay, as in
    /// Kubernetes without a garbage collector).
    fn delete(&self, refs: &[ObjectRef]) -> impl Future<Output = StoreResult<Vec<bool>>> + Send;
    /// Records `ranges` if the store has none; [`StoreError::RangesDiffer`]
    /// if it holds others. ferryd calls this at start.
    fn publish_ranges(&self, ranges: &Ranges) -> impl Future<Output = StoreResult<()>> + Send;
    /// The ranges the store holds, if any.
    fn ranges(&self) -> impl Future<Output = StoreResult<Option<Ranges>>> + Send;
}

/// A backend that is all three: the file store and etcd.
pub trait Store: Membership + ClusterState + ServiceWrites {}

impl<T: Membership + ClusterState + ServiceWrites> Store for T {}

/// What one apply writes, decided against what the store holds (pure, so
/// both stores decide alike).
#[derive(Debug)]
struct Plan {
    /// One per object given, in order.
    applied: Vec<Applied>,
    /// The objects created or configured, allocations filled in, in order.
    writes: Vec<Object>,
}

fn plan_apply(objects: Vec<Object>, current: &Snapshot, ranges: &Ranges) -> StoreResult<Plan> {
    plan_apply_with(
        objects,
        current,
        alloc::Taken::of(&current.services),
        ranges,
    )
}

/// [`plan_apply`] given what every stored Service holds (`taken`) and the
/// stored versions of (at least) the objects given (`current`).
fn plan_apply_with(
    objects: Vec<Object>,
    current: &Snapshot,
    taken: alloc::Taken,
    ranges: &Ranges,
) -> StoreResult<Plan> {
    let mut seen = BTreeSet::new();
    for o in &objects {
        let r = o.reference();
        if !seen.insert(r.clone()) {
            // Allocation would give both documents one address, and which
            // one wins would be an accident of order.
            return Err(StoreError::Duplicate(r));
        }
    }
    let mut objects = objects;
    let mut services = Vec::new();
    let mut at = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        if let Object::Service(s) = o {
            services.push((**s).clone());
            at.push(i);
        }
    }
    alloc::assign_with(&mut services, &current.services, taken, ranges)?;
    for (i, s) in at.into_iter().zip(services) {
        objects[i] = Object::Service(Box::new(s));
    }
    let mut plan = Plan {
        applied: Vec::with_capacity(objects.len()),
        writes: Vec::new(),
    };
    for o in objects {
        let object = o.reference();
        let key = object.key();
        // Compared as the JSON they are stored as, and only where one is
        // stored: encoding every new object too was a tenth of an apply
        // of 10k Services.
        let same = match &o {
            Object::Service(s) => current
                .services
                .get(&key)
                .map(|c| to_value(c) == to_value(s)),
            Object::EndpointSlice(e) => {
                current.slices.get(&key).map(|c| to_value(c) == to_value(e))
            }
        };
        let change = match same {
            None => Change::Created,
            Some(true) => Change::Unchanged,
            Some(false) => Change::Configured,
        };
        if change != Change::Unchanged {
            plan.writes.push(o);
        }
        plan.applied.push(Applied { object, change });
    }
    Ok(plan)
}

fn to_value(v: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).expect("k8s-openapi objects serialise")
}

/// The JSON an object is stored as: the API's own.
fn encode(o: &Object, pretty: bool) -> Vec<u8> {
    let v = match o {
        Object::Service(s) => to_value(s),
        Object::EndpointSlice(e) => to_value(e),
    };
    if pretty {
        let mut out = serde_json::to_vec_pretty(&v).expect("serialisable");
        out.push(b'\n');
        out
    } else {
        serde_json::to_vec(&v).expect("serialisable")
    }
}

/// [`encode`], compact, as one item of a list (straight from the object,
/// in its fields' order, not through a sorted `Value`).
fn encode_raw(o: &Object) -> Box<serde_json::value::RawValue> {
    match o {
        Object::Service(s) => serde_json::value::to_raw_value(s),
        Object::EndpointSlice(e) => serde_json::value::to_raw_value(e),
    }
    .expect("k8s-openapi objects serialise")
}

/// A stored object: the API's JSON for `kind`, named as its file or key
/// says, and valid — what `apply` would have written. Anything else was
/// written by hand or is half-written, and is left out.
fn decode(kind: Kind, namespace: &str, name: &str, data: &[u8]) -> Result<Object, String> {
    checked(parse_object(kind, data)?, kind, namespace, name)
}

/// The API's JSON for `kind`, not yet checked.
fn parse_object(kind: Kind, data: &[u8]) -> Result<Object, String> {
    match kind {
        Kind::Service => serde_json::from_slice(data).map(|s| Object::Service(Box::new(s))),
        Kind::EndpointSlice => {
            serde_json::from_slice(data).map(|e| Object::EndpointSlice(Box::new(e)))
        }
    }
    .map_err(|e| e.to_string())
}

/// `obj` if it is named as its file or key says and valid ([`decode`]).
fn checked(obj: Object, kind: Kind, namespace: &str, name: &str) -> Result<Object, String> {
    let r = obj.reference();
    if r.namespace != namespace || r.name != name {
        return Err(format!(
            "holds {}, not {}/{namespace}/{name}",
            r,
            kind.singular()
        ));
    }
    model::validate(&obj).map_err(|e| e.to_string())?;
    Ok(obj)
}

/// The service ranges as stored: `{"serviceCIDR": "10.96.0.0/12",
/// "nodePortRange": "30000-32767"}`, spelled like the flags' values.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RangesRecord {
    #[serde(rename = "serviceCIDR")]
    service_cidr: Ipv4Network,
    #[serde(rename = "nodePortRange")]
    node_port_range: String,
}

fn encode_ranges(r: &Ranges) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(&RangesRecord {
        service_cidr: r.service_cidr,
        node_port_range: r.node_ports_text(),
    })
    .expect("serialisable");
    out.push(b'\n');
    out
}

fn decode_ranges(data: &[u8]) -> Result<Ranges, String> {
    let rec: RangesRecord = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    Ranges::new(rec.service_cidr, &rec.node_port_range)
}

/// What `publish_ranges` does given what the store holds: `Some` to write.
fn ranges_to_publish(stored: Option<Ranges>, given: &Ranges) -> StoreResult<Option<Ranges>> {
    match stored {
        None => Ok(Some(given.clone())),
        Some(s) if s == *given => Ok(None),
        Some(stored) => Err(StoreError::RangesDiffer {
            stored,
            given: given.clone(),
        }),
    }
}

/// Remembers what was already logged as unreadable, so that a bad file or
/// key is logged once per version, not on every read (every reconcile).
#[derive(Default)]
struct WarnOnce(std::sync::Mutex<HashSet<String>>);

impl WarnOnce {
    /// True the first time `id` (a path or key with its version) is seen.
    fn first(&self, id: String) -> bool {
        let mut seen = self.0.lock().expect("not poisoned");
        // Bounded: a store rewritten badly forever must not grow memory.
        if seen.len() >= 10_000 {
            seen.clear();
        }
        seen.insert(id)
    }
}

/// What the stores' unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use std::fmt::Debug;
    use std::future::Future;

    use super::Registration;
    use super::{Applied, ClusterState, ServiceWrites, StoreError};
    use crate::record::Mac;
    use crate::service::alloc::{AllocError, Ranges};
    use crate::service::model::{self, Kind, Object, ObjectRef};
    use crate::service::Snapshot;

    /// A fresh directory, removed on drop.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "ferryd-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub fn reg(node: &str, ttl: Duration) -> Registration {
        Registration {
            node: node.into(),
            underlay_ip: "192.168.0.1".parse().unwrap(),
            vtep_mac: Mac::for_vtep(node, 1),
            cluster: "10.244.0.0/16".parse().unwrap(),
            subnet_len: 24,
            ttl,
            prefer: None,
        }
    }

    /// A small xorshift generator for randomised tests: the same sequence
    /// on every run.
    pub struct Rng(pub u64);

    impl Rng {
        /// The next number below `n`.
        pub fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// The running test cannot run here because of `why`: prints
    /// "skipped: <test>: <why>", or panics when FERRY_REQUIRE_ALL is set (as the
    /// end-to-end tests do), so that a skip never reads as a pass in CI.
    pub fn skip(why: &str) {
        let test = std::thread::current()
            .name()
            .unwrap_or("<unnamed test>")
            .to_string();
        if std::env::var_os("FERRY_REQUIRE_ALL").is_some_and(|v| !v.is_empty() && v != "0") {
            panic!("{test} cannot run here ({why}) and FERRY_REQUIRE_ALL forbids skipping");
        }
        println!("skipped: {test}: {why}");
    }

    /// A NodePort Service and its slice.
    pub const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.5], conditions: {ready: true}}]
ports: [{name: http, port: 8080}]
"#;

    pub fn objs(yaml: &str) -> Vec<Object> {
        model::parse(yaml).unwrap()
    }

    /// `metadata.name` `name`, `spec` as given (YAML flow).
    pub fn svc(name: &str, spec: &str) -> String {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n")
    }

    /// Room for six Services and three node ports.
    pub fn small() -> Ranges {
        Ranges {
            service_cidr: "10.96.0.0/29".parse().unwrap(),
            node_ports: 30000..=30002,
        }
    }

    pub fn said(applied: &[Applied]) -> Vec<String> {
        applied
            .iter()
            .map(|a| format!("{} {}", a.object, a.change))
            .collect()
    }

    pub fn service_ref(key: &str) -> ObjectRef {
        ObjectRef::parse(Kind::Service, key).unwrap()
    }

    pub fn cluster_ip(snap: &Snapshot, key: &str) -> String {
        let spec = snap.services[key].spec.as_ref().unwrap();
        spec.cluster_ip.clone().unwrap()
    }

    pub fn node_ports(snap: &Snapshot, key: &str) -> Vec<i32> {
        let spec = snap.services[key].spec.as_ref().unwrap();
        spec.ports
            .iter()
            .flatten()
            .filter_map(|p| p.node_port)
            .collect()
    }

    /// Apply, re-apply, reconfigure, ranges: what both stores must do alike.
    pub async fn round_trip(s: &(impl ClusterState + ServiceWrites)) {
        assert_eq!(s.ranges().await.unwrap(), None);
        assert_eq!(s.services().await.unwrap(), Snapshot::default());
        let applied = s.apply(objs(WEB), &small()).await.unwrap();
        assert_eq!(
            said(&applied),
            [
                "service/default/web created",
                "endpointslice/default/web-1 created"
            ]
        );
        assert_eq!(
            s.ranges().await.unwrap(),
            Some(small()),
            "an apply records the ranges it allocated from"
        );
        let first = s.services().await.unwrap();
        assert_eq!(cluster_ip(&first, "default/web"), "10.96.0.1");
        assert_eq!(node_ports(&first, "default/web"), [30000]);
        let slice = &first.slices["default/web-1"];
        assert_eq!(
            slice.endpoints.as_ref().unwrap()[0].addresses,
            ["10.244.1.5"]
        );

        // The same documents again: nothing changes, allocations are kept.
        let again = s.apply(objs(WEB), &small()).await.unwrap();
        assert_eq!(
            said(&again),
            [
                "service/default/web unchanged",
                "endpointslice/default/web-1 unchanged"
            ]
        );
        assert_eq!(s.services().await.unwrap(), first);

        // A port more: configured, the clusterIP and the first node port kept.
        let two = svc(
            "web",
            "{type: NodePort, ports: [{name: http, port: 80}, {name: https, port: 443}]}",
        );
        let applied = s.apply(objs(&two), &small()).await.unwrap();
        assert_eq!(said(&applied), ["service/default/web configured"]);
        let now = s.services().await.unwrap();
        assert_eq!(cluster_ip(&now, "default/web"), "10.96.0.1");
        assert_eq!(node_ports(&now, "default/web"), [30000, 30001]);

        // The stored ranges win over a fallback: 10.100.0.1 is inside the
        // default /12 but outside the stored /29.
        let outside = s
            .apply(
                objs(&svc("b", "{clusterIP: 10.100.0.1}")),
                &Ranges::default(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                outside,
                StoreError::ServiceAlloc(AllocError::OutsideCidr { .. })
            ),
            "{outside}"
        );

        // Ranges: the same again is fine, others are refused naming both.
        s.publish_ranges(&small()).await.unwrap();
        let e = s.publish_ranges(&Ranges::default()).await.unwrap_err();
        let msg = e.to_string();
        for part in ["10.96.0.0/29", "30000-30002", "10.96.0.0/12", "30000-32767"] {
            assert!(msg.contains(part), "{part} missing in: {msg}");
        }
        assert_eq!(s.ranges().await.unwrap(), Some(small()));
    }

    /// Every refused apply leaves the store as it was, byte for byte
    /// (`dump` reads all of it).
    pub async fn refusals_write_nothing<S, F, D>(s: &S, dump: impl Fn() -> F)
    where
        S: ClusterState + ServiceWrites,
        F: Future<Output = D>,
        D: PartialEq + Debug,
    {
        s.apply(objs(WEB), &small()).await.unwrap();
        let before = dump().await;
        let fresh = svc("fresh", "{ports: [{port: 80}]}");
        let cases: Vec<(String, &str)> = vec![
            (
                fresh.clone() + &svc("b", "{clusterIP: 10.96.0.1}"),
                "spec.clusterIP 10.96.0.1 is already taken by Service default/web",
            ),
            (
                fresh.clone() + &svc("b", "{clusterIP: 10.97.0.1}"),
                "spec.clusterIP 10.97.0.1 is outside the service CIDR 10.96.0.0/29",
            ),
            (
                fresh.clone() + &svc("b", "{type: NodePort, ports: [{port: 1, nodePort: 30000}]}"),
                "spec.ports[0].nodePort 30000 is already taken by Service default/web",
            ),
            (
                fresh.clone() + &svc("b", "{type: NodePort, ports: [{port: 1, nodePort: 31000}]}"),
                "spec.ports[0].nodePort 31000 is outside the node-port range 30000-30002",
            ),
            (
                fresh.clone() + &fresh,
                "service/default/fresh appears more than once",
            ),
            (
                (0..6).map(|i| svc(&format!("n{i}"), "{}")).collect(),
                "no free address left",
            ),
            (
                svc("web", "{clusterIP: 10.96.0.5}"),
                "spec.clusterIP is immutable",
            ),
        ];
        for (yaml, want) in cases {
            let e = s.apply(objs(&yaml), &small()).await.unwrap_err();
            assert!(e.to_string().contains(want), "{e}, wanted {want:?}");
            assert_eq!(dump().await, before, "after {want:?}");
        }
    }

    /// Deleting a Service deletes nothing else; a missing one is reported.
    pub async fn deletes(s: &(impl ClusterState + ServiceWrites)) {
        s.apply(objs(WEB), &small()).await.unwrap();
        let slice = ObjectRef::parse(Kind::EndpointSlice, "web-1").unwrap();
        let gone = s
            .delete(&[service_ref("web"), service_ref("prod/nope")])
            .await
            .unwrap();
        assert_eq!(gone, [true, false]);
        let snap = s.services().await.unwrap();
        assert!(snap.services.is_empty());
        assert_eq!(snap.slices.keys().collect::<Vec<_>>(), ["default/web-1"]);
        assert_eq!(
            s.delete(std::slice::from_ref(&slice)).await.unwrap(),
            [true]
        );
        assert_eq!(s.delete(&[slice]).await.unwrap(), [false]);
        assert_eq!(s.services().await.unwrap(), Snapshot::default());
        // The address is free again.
        s.apply(objs(&svc("other", "{}")), &small()).await.unwrap();
        let snap = s.services().await.unwrap();
        assert_eq!(cluster_ip(&snap, "default/other"), "10.96.0.1");
    }

    /// `changed()` stays quiet without writes, then resolves after one.
    pub async fn wakes_on(s: &impl ClusterState, write: impl Future<Output = ()>) {
        use std::time::Duration;
        use tokio::time::timeout;
        // Drain what earlier writes (and a watch start) left.
        while timeout(Duration::from_millis(300), s.changed())
            .await
            .is_ok()
        {}
        write.await;
        timeout(Duration::from_secs(5), s.changed())
            .await
            .expect("changed() did not resolve after a write");
    }
}
