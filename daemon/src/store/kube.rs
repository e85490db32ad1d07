//! The Kubernetes store: cluster state from the Kubernetes API (DESIGN.md,
//! "Kubernetes mode").
//!
//! - **Nodes**: the kubelet registers the Node and kube-controller-manager
//!   allocates its subnet (`spec.podCIDRs`, else `spec.podCIDR`), so
//!   [`Membership::register`] only waits for that subnet and publishes the
//!   overlay's data as annotations on the Node ([`VTEP_MAC`],
//!   [`UNDERLAY_IP`]; flannel does the same). Every other Node becomes a
//!   peer from its annotations; its underlay address falls back to its
//!   InternalIP.
//! - **Services and EndpointSlices**: read, with kube-proxy's own filters;
//!   the API server allocates and validates them, so ferry writes none
//!   ([`ServiceWrites`] refuses: use kubectl).
//!
//! Reads come from watchers with reflectors (kube-runtime): one list, then
//! a watch that resumes from the last resourceVersion after a dropped
//! connection and lists again after `410 Gone`, with backoff. A reflector
//! swaps in the complete list at `InitDone`, so a relist is a full resync
//! and never shows a half-listed cache. Until a kind has been listed once,
//! reads of it fail (after a short wait) rather than hand out a partial
//! view, which the reconcilers would take as "everything else is gone".
//!
//! Every API call this module makes is listed in [`API_CALLS`], which the
//! RBAC manifest is checked against.

use std::collections::HashMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::Path;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::{watch, Notify};

use super::{
    Applied, ClusterState, Membership, Registration, ServiceWrites, StoreError, StoreResult,
};
use crate::record::{Mac, NodeRecord};
use crate::service::alloc::Ranges;
use crate::service::model::{self, Object, ObjectRef};
use crate::service::Snapshot;

/// The annotation holding a node's VTEP MAC, `aa:bb:cc:dd:ee:ff`.
pub const VTEP_MAC: &str = "ferry.dev/vtep-mac";
/// The annotation holding a node's underlay (VXLAN) address.
pub const UNDERLAY_IP: &str = "ferry.dev/underlay-ip";

/// One kind of request to the API server, as RBAC names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiCall {
    /// API group; `""` is the core group.
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    pub verbs: &'static [&'static str],
}

/// Every API call the Kubernetes store makes: the ClusterRole must grant
/// each (the unit tests check that every request made is listed here).
pub const API_CALLS: &[ApiCall] = &[
    // get: register waits for the node's podCIDR; list/watch: the peers;
    // patch: this node's annotations.
    ApiCall {
        group: "",
        resource: "nodes",
        subresource: None,
        verbs: &["get", "list", "watch", "patch"],
    },
    // NetworkUnavailable=False once the overlay is up.
    ApiCall {
        group: "",
        resource: "nodes",
        subresource: Some("status"),
        verbs: &["patch"],
    },
    ApiCall {
        group: "",
        resource: "services",
        subresource: None,
        verbs: &["list", "watch"],
    },
    ApiCall {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        subresource: None,
        verbs: &["list", "watch"],
    },
];

/// kube-proxy's filters: Services another proxy claims and headless
/// Services (no ClusterIP to program) are not ours.
pub const SERVICE_LABELS: &str = "!service.kubernetes.io/service-proxy-name";
pub const SERVICE_FIELDS: &str = "spec.clusterIP!=None";
pub const SLICE_LABELS: &str = "!service.kubernetes.io/headless";

/// How long one request may take; kube's client has no read timeout, and a
/// hung call must not hang registration or readiness.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest pause between retries of a failing call.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The client's configuration: `kubeconfig` if given; else in-cluster
/// (`KUBERNETES_SERVICE_HOST`/`_PORT` and the service account); else
/// `$KUBECONFIG` or `~/.kube/config`. `api_server` replaces the server
/// address: without kube-proxy the `kubernetes` Service's ClusterIP is
/// served by ferryd itself, so ferryd must not depend on it.
pub async fn client_config(
    kubeconfig: Option<&Path>,
    api_server: Option<&str>,
) -> StoreResult<kube::Config> {
    let mode = |m: String| StoreError::KubeMode(m);
    let mut config = if let Some(path) = kubeconfig {
        let kc = Kubeconfig::read_from(path)
            .map_err(|e| mode(format!("--kubeconfig {}: {e}", path.display())))?;
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| mode(format!("--kubeconfig {}: {e}", path.display())))?
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        kube::Config::incluster_env().map_err(|e| {
            mode(format!(
                "in-cluster configuration (KUBERNETES_SERVICE_HOST is set): {e}"
            ))
        })?
    } else {
        kube::Config::from_kubeconfig(&KubeConfigOptions::default())
            .await
            .map_err(|e| {
                mode(format!(
                    "no --kubeconfig, not in a cluster (KUBERNETES_SERVICE_HOST is unset), \
                     and no usable $KUBECONFIG or ~/.kube/config: {e}"
                ))
            })?
    };
    if let Some(url) = api_server {
        config.cluster_url = parse_api_server(url).map_err(mode)?;
    }
    Ok(config)
}

/// `--api-server`: an `http://` or `https://` URL with a host.
pub fn parse_api_server(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("--api-server {url:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(format!(
            "--api-server {url:?}: expected an http:// or https:// URL, e.g. https://kind-control-plane:6443"
        ));
    }
    Ok(uri)
}

// ---------------------------------------------------------------------------
// Node conversion (pure)

/// This node's pod subnet: the first IPv4 range of `spec.podCIDRs`, else
/// `spec.podCIDR`. `Ok(None)`: not allocated yet. `Err`: allocated, but
/// nothing ferry can use (the overlay is IPv4 only).
pub fn pod_subnet(node: &Node) -> Result<Option<Ipv4Network>, String> {
    let spec = node.spec.as_ref();
    let mut cidrs: Vec<&str> = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .map(|v| v.iter().map(String::as_str).collect())
        .unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(spec.and_then(|s| s.pod_cidr.as_deref()));
    }
    if cidrs.is_empty() {
        return Ok(None);
    }
    for c in &cidrs {
        if let Ok(net) = c.parse::<Ipv4Network>() {
            if net.ip() != net.network() {
                return Err(format!("spec.podCIDRs: {c} has host bits set"));
            }
            return Ok(Some(net));
        }
    }
    Err(format!(
        "spec.podCIDRs {cidrs:?} holds no IPv4 range (ferry's overlay is IPv4 only)"
    ))
}

/// The node's first IPv4 `InternalIP` in `status.addresses`.
pub fn internal_ip(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// Why a Node is not a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// Not ready yet, nothing wrong: no subnet yet, or no ferryd has
    /// published its annotations yet.
    NotYet(String),
    /// Something is wrong with what the node holds.
    Invalid(String),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::NotYet(m) | Unusable::Invalid(m) => f.write_str(m),
        }
    }
}

/// A Node as a peer of the overlay.
pub fn node_record(node: &Node) -> Result<NodeRecord, Unusable> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let subnet = pod_subnet(node)
        .map_err(Unusable::Invalid)?
        .ok_or_else(|| Unusable::NotYet("no spec.podCIDR yet".into()))?;
    let vtep_mac = annotation(node, VTEP_MAC)
        .ok_or_else(|| {
            Unusable::NotYet(format!(
                "no {VTEP_MAC} annotation yet (ferryd has not registered it)"
            ))
        })?
        .parse::<Mac>()
        .map_err(|e| Unusable::Invalid(format!("annotation {VTEP_MAC}: {e}")))?;
    let underlay_ip = match annotation(node, UNDERLAY_IP) {
        Some(a) => a.parse().map_err(|_| {
            Unusable::Invalid(format!("annotation {UNDERLAY_IP}: bad IPv4 address {a:?}"))
        })?,
        None => internal_ip(node).ok_or_else(|| {
            Unusable::Invalid(format!(
                "no {UNDERLAY_IP} annotation and no IPv4 InternalIP in status.addresses"
            ))
        })?,
    };
    Ok(NodeRecord {
        node: name,
        subnet,
        underlay_ip,
        vtep_mac,
        left: false,
    })
}

/// The annotations this node publishes, as a JSON merge patch: only these
/// keys change, every other annotation stays.
pub fn annotations_patch(mac: Mac, underlay: Ipv4Addr) -> serde_json::Value {
    json!({"metadata": {"annotations": {
        VTEP_MAC: mac.to_string(),
        UNDERLAY_IP: underlay.to_string(),
    }}})
}

/// A merge patch that removes this node's annotations (null deletes a key).
pub fn remove_annotations_patch() -> serde_json::Value {
    json!({"metadata": {"annotations": {VTEP_MAC: null, UNDERLAY_IP: null}}})
}

/// `NetworkUnavailable=False` as a strategic merge patch of `nodes/status`:
/// conditions merge by `type`, so the kubelet's own stay (a JSON merge
/// patch would replace the whole list).
pub fn network_up_patch(now: SystemTime) -> serde_json::Value {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let t = k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(Time)
        .expect("the clock is within jiff's range");
    let cond = k8s_openapi::api::core::v1::NodeCondition {
        type_: "NetworkUnavailable".into(),
        status: "False".into(),
        reason: Some("FerryIsUp".into()),
        message: Some("ferry's overlay is up on this node".into()),
        last_heartbeat_time: Some(t.clone()),
        last_transition_time: Some(t),
    };
    json!({"status": {"conditions": [cond]}})
}

/// Whether the Node says `NetworkUnavailable=False`.
fn network_marked_up(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "NetworkUnavailable" && c.status == "False")
        })
}

fn published(node: &Node, mac: Mac, underlay: Ipv4Addr) -> bool {
    annotation(node, VTEP_MAC) == Some(mac.to_string().as_str())
        && annotation(node, UNDERLAY_IP) == Some(underlay.to_string().as_str())
}

// ---------------------------------------------------------------------------
// The watches

/// The three kinds watched, as indices into [`Shared`]'s arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Nodes = 0,
    Services = 1,
    Slices = 2,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Nodes => "Nodes",
            Which::Services => "Services",
            Which::Slices => "EndpointSlices",
        }
    }
}

/// What one watch is doing, for logs and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchState {
    /// Listed at least once: reads of this kind are served.
    pub synced: bool,
    /// `listing` (the first list or a relist), `watching`, or the last error.
    pub state: String,
    /// When the last event arrived (seconds since the epoch).
    pub last_event_unix: u64,
}

/// What the watch tasks and the store share.
struct Shared {
    server: String,
    /// Wakes `changed()`. `notify_one` keeps a permit when nobody waits, so
    /// an event between two waits is not lost (daemon.rs's cluster source
    /// is the one waiter).
    changed: Notify,
    /// Per kind: listed at least once.
    synced: watch::Sender<[bool; 3]>,
    state: Mutex<[WatchState; 3]>,
    /// Object → the problem last logged about it, so that each problem is
    /// logged once, not on every read.
    warned: Mutex<HashMap<String, String>>,
}

impl Shared {
    fn on_event<K>(&self, which: Which, ev: &Result<watcher::Event<K>, watcher::Error>) {
        let now = unix_now();
        let mut st = self.state.lock().expect("not poisoned");
        let w = &mut st[which as usize];
        match ev {
            Ok(watcher::Event::Init) => {
                if w.synced {
                    tracing::info!(kind = which.name(), "listing again (full resync)");
                }
                w.state = "listing".into();
            }
            // The reflector buffers these until InitDone: nothing visible
            // changed yet.
            Ok(watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone) => {
                if !w.synced {
                    tracing::info!(kind = which.name(), server = %self.server, "listed; watching");
                }
                w.synced = true;
                w.state = "watching".into();
                w.last_event_unix = now;
                self.synced.send_modify(|s| s[which as usize] = true);
                self.changed.notify_one();
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                w.state = "watching".into();
                w.last_event_unix = now;
                self.changed.notify_one();
            }
            Err(e) => {
                let gone = matches!(e, watcher::Error::WatchError(s) if s.code == 410);
                if gone {
                    // Expected after a long disconnection: the watcher lists
                    // again.
                    tracing::info!(
                        kind = which.name(),
                        "watch expired (410 Gone); listing again"
                    );
                } else {
                    tracing::warn!(kind = which.name(), server = %self.server, "watch failed: {e}; retrying with backoff");
                }
                w.state = format!("error: {e}");
            }
        }
    }

    /// Logs `problem` about `id` unless it was the last one logged for it.
    fn warn_once(&self, id: &str, problem: &Unusable) {
        let text = problem.to_string();
        let mut warned = self.warned.lock().expect("not poisoned");
        if warned.get(id) == Some(&text) {
            return;
        }
        match problem {
            Unusable::NotYet(m) => tracing::info!(node = id, "not a peer yet: {m}"),
            Unusable::Invalid(m) => tracing::warn!(object = id, "skipped: {m}"),
        }
        // Bounded: a cluster churning bad objects forever must not grow it.
        if warned.len() >= 10_000 {
            warned.clear();
        }
        warned.insert(id.to_string(), text);
    }

    fn forget(&self, id: &str) {
        self.warned.lock().expect("not poisoned").remove(id);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs one watcher into its reflector until the store is dropped. The
/// stream never ends: errors come back as items and are retried with
/// kube's default backoff (0.8 s doubling to 30 s).
async fn run_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    which: Which,
    shared: Arc<Shared>,
) where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut events = pin!(watcher(api, config).default_backoff().reflect(writer));
    while let Some(ev) = events.next().await {
        shared.on_event(which, &ev);
    }
}

struct Watches {
    nodes: reflector::Store<Node>,
    services: reflector::Store<Service>,
    slices: reflector::Store<EndpointSlice>,
    tasks: Vec<tokio::task::AbortHandle>,
}

// ---------------------------------------------------------------------------
// The store

/// What `register` published, for `renew` and `network_up`.
#[derive(Debug, Clone)]
struct Own {
    node: String,
    mac: Mac,
    underlay: Ipv4Addr,
}

/// The Kubernetes store. Its watches start on the first read, so that
/// `ferryd leave` (which only patches) watches nothing.
pub struct KubeStore {
    client: Client,
    shared: Arc<Shared>,
    watches: OnceLock<Watches>,
    own: Mutex<Option<Own>>,
    /// NetworkUnavailable=False was patched once.
    marked_up: AtomicBool,
    /// Pause while waiting for the node's subnet, and the first pause
    /// after a failed call.
    retry: Duration,
    /// How long a read waits for a kind's first list before failing.
    sync_wait: Duration,
}

impl Drop for KubeStore {
    fn drop(&mut self) {
        if let Some(w) = self.watches.get() {
            for t in &w.tasks {
                t.abort();
            }
        }
    }
}

impl KubeStore {
    /// A client from [`client_config`]; nothing is contacted yet.
    pub async fn open(kubeconfig: Option<&Path>, api_server: Option<&str>) -> StoreResult<Self> {
        let config = client_config(kubeconfig, api_server).await?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).map_err(|e| StoreError::Kube {
            server: server.clone(),
            what: "building the client".into(),
            source: Box::new(e),
        })?;
        Ok(Self::with_client(client, server))
    }

    /// A store over `client` (tests pass a mock); `server` names the API
    /// server in logs and errors.
    pub fn with_client(client: Client, server: String) -> Self {
        KubeStore {
            client,
            shared: Arc::new(Shared {
                server,
                changed: Notify::new(),
                synced: watch::channel([false; 3]).0,
                state: Mutex::new(Default::default()),
                warned: Mutex::new(HashMap::new()),
            }),
            watches: OnceLock::new(),
            own: Mutex::new(None),
            marked_up: AtomicBool::new(false),
            retry: Duration::from_secs(2),
            sync_wait: Duration::from_secs(5),
        }
    }

    /// Shorter pauses, for tests.
    pub fn with_timings(mut self, retry: Duration, sync_wait: Duration) -> Self {
        self.retry = retry;
        self.sync_wait = sync_wait;
        self
    }

    pub fn server(&self) -> &str {
        &self.shared.server
    }

    /// Each watch's state: Nodes, Services, EndpointSlices.
    pub fn watch_states(&self) -> [(&'static str, WatchState); 3] {
        let st = self.shared.state.lock().expect("not poisoned").clone();
        let [n, s, e] = st;
        [
            (Which::Nodes.name(), n),
            (Which::Services.name(), s),
            (Which::Slices.name(), e),
        ]
    }

    fn nodes_api(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    fn watches(&self) -> &Watches {
        self.watches.get_or_init(|| {
            let (nodes, nw) = reflector::store::<Node>();
            let (services, sw) = reflector::store::<Service>();
            let (slices, ew) = reflector::store::<EndpointSlice>();
            let sh = &self.shared;
            let tasks = vec![
                tokio::spawn(run_watch(
                    self.nodes_api(),
                    watcher::Config::default(),
                    nw,
                    Which::Nodes,
                    sh.clone(),
                ))
                .abort_handle(),
                tokio::spawn(run_watch(
                    Api::<Service>::all(self.client.clone()),
                    watcher::Config::default()
                        .labels(SERVICE_LABELS)
                        .fields(SERVICE_FIELDS),
                    sw,
                    Which::Services,
                    sh.clone(),
                ))
                .abort_handle(),
                tokio::spawn(run_watch(
                    Api::<EndpointSlice>::all(self.client.clone()),
                    watcher::Config::default().labels(SLICE_LABELS),
                    ew,
                    Which::Slices,
                    sh.clone(),
                ))
                .abort_handle(),
            ];
            Watches {
                nodes,
                services,
                slices,
                tasks,
            }
        })
    }

    /// Waits (up to `sync_wait`) until `which` has been listed once.
    async fn synced(&self, which: &[Which]) -> StoreResult<()> {
        let _ = self.watches();
        let mut rx = self.shared.synced.subscribe();
        let all = |s: &[bool; 3]| which.iter().all(|w| s[*w as usize]);
        if tokio::time::timeout(self.sync_wait, rx.wait_for(all))
            .await
            .is_ok()
        {
            return Ok(());
        }
        let st = self.shared.state.lock().expect("not poisoned");
        let pending: Vec<String> = which
            .iter()
            .filter(|w| !st[**w as usize].synced)
            .map(|w| {
                let s = &st[*w as usize].state;
                format!(
                    "{} ({})",
                    w.name(),
                    if s.is_empty() { "not started" } else { s }
                )
            })
            .collect();
        Err(StoreError::KubeMode(format!(
            "{}: not listed yet: {}",
            self.shared.server,
            pending.join(", ")
        )))
    }

    /// One API call, bounded in time.
    async fn call<T>(
        &self,
        what: impl Into<String>,
        f: impl Future<Output = kube::Result<T>>,
    ) -> StoreResult<T> {
        let what = what.into();
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(r) => r.map_err(|e| StoreError::Kube {
                server: self.shared.server.clone(),
                what,
                source: Box::new(e),
            }),
            Err(_) => Err(StoreError::KubeMode(format!(
                "{}: {what}: no answer within {}s",
                self.shared.server,
                CALL_TIMEOUT.as_secs()
            ))),
        }
    }

    fn own(&self) -> Option<Own> {
        self.own.lock().expect("not poisoned").clone()
    }

    /// This node in the watch cache: `None` when Nodes are not listed yet
    /// or nothing registered; `Some(None)` when the node is not there.
    fn cached_own(&self) -> Option<(Own, Option<Arc<Node>>)> {
        let own = self.own()?;
        let w = self.watches();
        if !self.shared.synced.borrow()[Which::Nodes as usize] {
            return None;
        }
        let node = w.nodes.get(&reflector::ObjectRef::new(&own.node));
        Some((own, node))
    }
}

impl Membership for KubeStore {
    /// Waits until the Node exists and has a subnet (the kubelet creates
    /// it, kube-controller-manager allocates the subnet; ferry allocates
    /// nothing), then publishes this node's annotations. Failing calls are
    /// retried; only a subnet ferry cannot use is an error.
    async fn register(&self, reg: &Registration) -> StoreResult<NodeRecord> {
        *self.own.lock().expect("not poisoned") = Some(Own {
            node: reg.node.clone(),
            mac: reg.vtep_mac,
            underlay: reg.underlay_ip,
        });
        let api = self.nodes_api();
        let name = reg.node.as_str();
        let mut backoff = self.retry;
        let mut waiting = String::new();
        // Logs each new reason to wait once, then waits.
        let mut wait = |why: String, pause: Duration| {
            if why != waiting {
                tracing::info!(node = name, "{why}");
                waiting = why;
            }
            tokio::time::sleep(pause)
        };
        loop {
            let node = match self
                .call(format!("get node {name}"), api.get_opt(name))
                .await
            {
                Ok(Some(n)) => n,
                Ok(None) => {
                    wait(format!("waiting for Node {name} to exist in the API (the kubelet registers it; is --node-name the Node's name?)"), self.retry).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(node = name, "{e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_RETRY);
                    continue;
                }
            };
            let subnet = match pod_subnet(&node) {
                Ok(Some(s)) => s,
                Ok(None) => {
                    wait(format!("waiting for spec.podCIDR of Node {name} (kube-controller-manager sets it with --allocate-node-cidrs)"), self.retry).await;
                    continue;
                }
                Err(e) => return Err(StoreError::KubeMode(format!("Node {name}: {e}"))),
            };
            if !reg.cluster.is_supernet_of(subnet) {
                return Err(StoreError::KubeMode(format!(
                    "Node {name} has spec.podCIDR {subnet}, outside --cluster-cidr {}: \
                     set --cluster-cidr to the cluster's pod network",
                    reg.cluster
                )));
            }
            let patch = annotations_patch(reg.vtep_mac, reg.underlay_ip);
            let pp = PatchParams {
                field_manager: Some("ferryd".into()),
                ..Default::default()
            };
            match self
                .call(
                    format!("annotate node {name}"),
                    api.patch(name, &pp, &Patch::Merge(&patch)),
                )
                .await
            {
                Ok(_) => {
                    return Ok(NodeRecord {
                        node: reg.node.clone(),
                        subnet,
                        underlay_ip: reg.underlay_ip,
                        vtep_mac: reg.vtep_mac,
                        left: false,
                    })
                }
                Err(e) => {
                    tracing::warn!(node = name, "{e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// The kubelet owns the Node; there is no lease. This checks, in the
    /// watch cache (no request), that the node still exists and holds the
    /// annotations published, and asks for a new registration otherwise.
    async fn renew(&self) -> StoreResult<()> {
        let Some((own, node)) = self.cached_own() else {
            return Ok(());
        };
        match node {
            None => Err(StoreError::NotRegistered(own.node)),
            Some(n) if !published(&n, own.mac, own.underlay) => {
                Err(StoreError::NotRegistered(own.node))
            }
            Some(_) => Ok(()),
        }
    }

    /// Removes this node's annotations: its peers drop it at once.
    async fn leave(&self, node: &str) -> StoreResult<()> {
        let api = self.nodes_api();
        let patch = remove_annotations_patch();
        let r = self
            .call(
                format!("remove ferry's annotations from node {node}"),
                api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await;
        match r {
            Err(StoreError::Kube { source, .. }) if matches!(&*source, kube::Error::Api(s) if s.is_not_found()) => {
                Err(StoreError::NotRegistered(node.to_string()))
            }
            r => r.map(|_| ()),
        }
    }

    /// Patches `NetworkUnavailable=False` unless the watch cache shows it
    /// already (a recreated Node, or someone else's write, gets it again).
    async fn network_up(&self) -> StoreResult<()> {
        let Some(own) = self.own() else {
            return Ok(());
        };
        let need = match self.cached_own() {
            Some((_, Some(n))) => !network_marked_up(&n),
            _ => !self.marked_up.load(Relaxed),
        };
        if !need {
            return Ok(());
        }
        let patch = network_up_patch(SystemTime::now());
        let pp = PatchParams {
            field_manager: Some("ferryd".into()),
            ..Default::default()
        };
        self.call(
            format!("set NetworkUnavailable=False on node {}", own.node),
            self.nodes_api()
                .patch_status(&own.node, &pp, &Patch::Strategic(&patch)),
        )
        .await?;
        if !self.marked_up.swap(true, Relaxed) {
            tracing::info!(node = %own.node, "NetworkUnavailable=False set on the Node");
        }
        Ok(())
    }
}

impl ClusterState for KubeStore {
    fn describe(&self) -> serde_json::Value {
        let watches: serde_json::Map<String, serde_json::Value> = self
            .watch_states()
            .into_iter()
            .map(|(kind, w)| {
                (
                    kind.to_string(),
                    serde_json::json!({
                        "synced": w.synced,
                        "state": w.state,
                        "lastEventUnix": w.last_event_unix,
                    }),
                )
            })
            .collect();
        serde_json::json!({"apiServer": self.server(), "watches": watches})
    }

    async fn nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        self.synced(&[Which::Nodes]).await?;
        let mut out = Vec::new();
        for n in self.watches().nodes.state() {
            let name = n.metadata.name.clone().unwrap_or_default();
            let id = format!("node/{name}");
            match node_record(&n) {
                Ok(r) => {
                    self.shared.forget(&id);
                    out.push(r);
                }
                Err(why) => self.shared.warn_once(&id, &why),
            }
        }
        out.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(out)
    }

    async fn services(&self) -> StoreResult<Snapshot> {
        self.synced(&[Which::Services, Which::Slices]).await?;
        let w = self.watches();
        let objects = w
            .services
            .state()
            .into_iter()
            .map(|s| Object::Service(Box::new((*s).clone())))
            .chain(
                w.slices
                    .state()
                    .into_iter()
                    .map(|e| Object::EndpointSlice(Box::new((*e).clone()))),
            );
        let mut snap = Snapshot::default();
        for o in objects {
            // The API server validated these, but by its rules: what ferry's
            // model cannot program is left out, as the other stores do.
            let id = o.reference().to_string();
            match model::validate(&o) {
                Ok(()) => {
                    self.shared.forget(&id);
                    snap.insert(o);
                }
                Err(e) => self
                    .shared
                    .warn_once(&id, &Unusable::Invalid(e.to_string())),
            }
        }
        Ok(snap)
    }

    async fn changed(&self) {
        let _ = self.watches();
        self.shared.changed.notified().await
    }
}

const USE_KUBECTL: &str = "Services and EndpointSlices live in the Kubernetes API here: \
                           change them with kubectl, not ferryctl";

impl ServiceWrites for KubeStore {
    async fn apply(&self, _: Vec<Object>, _: &Ranges) -> StoreResult<Vec<Applied>> {
        Err(StoreError::KubeMode(USE_KUBECTL.into()))
    }

    async fn delete(&self, _: &[ObjectRef]) -> StoreResult<Vec<bool>> {
        Err(StoreError::KubeMode(USE_KUBECTL.into()))
    }

    /// The API server owns the service CIDR and node-port range
    /// (kube-apiserver `--service-cluster-ip-range`,
    /// `--service-node-port-range`); ferryd's flags must match them.
    async fn publish_ranges(&self, _: &Ranges) -> StoreResult<()> {
        Ok(())
    }

    async fn ranges(&self) -> StoreResult<Option<Ranges>> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::Value;
    use tokio::sync::mpsc;
    use tower_test::mock::{self, SendResponse};

    use crate::store::testing::reg;

    /// One request as the fake API server saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        path: String,
        query: String,
        content_type: String,
        body: String,
    }

    impl Seen {
        fn param(&self, key: &str) -> Option<String> {
            self.query.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == key).then(|| percent_decode(v))
            })
        }
        fn is_watch(&self) -> bool {
            self.param("watch").as_deref() == Some("true")
        }
        /// The RBAC terms of this request: (group, resource, subresource, verb).
        fn rbac(&self) -> (String, String, Option<String>, String) {
            let parts: Vec<&str> = self.path.trim_start_matches('/').split('/').collect();
            let (group, rest) = match parts.as_slice() {
                ["api", "v1", rest @ ..] => ("", rest),
                ["apis", g, _v, rest @ ..] => (*g, rest),
                _ => panic!("unexpected path {}", self.path),
            };
            let rest = match rest {
                ["namespaces", _, r @ ..] => r,
                r => r,
            };
            let (resource, named, sub) = match rest {
                [r] => (*r, false, None),
                [r, _] => (*r, true, None),
                [r, _, s] => (*r, true, Some(s.to_string())),
                _ => panic!("unexpected path {}", self.path),
            };
            let verb = match (self.method.as_str(), named) {
                ("GET", true) => "get",
                ("GET", false) if self.is_watch() => "watch",
                ("GET", false) => "list",
                ("PATCH", _) => "patch",
                (m, _) => panic!("unexpected method {m}"),
            };
            (group.into(), resource.into(), sub, verb.into())
        }
    }

    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                let h = u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap();
                out.push(h);
                i += 3;
            } else {
                out.push(if b[i] == b'+' { b' ' } else { b[i] });
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    /// Every request made is one [`API_CALLS`] lists, so the ClusterRole
    /// checked against it grants what the store does.
    fn assert_covered(seen: &[Seen]) {
        for s in seen {
            let (g, r, sub, verb) = s.rbac();
            assert!(
                API_CALLS.iter().any(|c| c.group == g
                    && c.resource == r
                    && c.subresource == sub.as_deref()
                    && c.verbs.contains(&verb.as_str())),
                "{verb} {g}/{r}/{sub:?} ({} {}) is not in API_CALLS",
                s.method,
                s.path
            );
        }
    }

    /// What the fake answers: a status and a body, or `Hold` to keep the
    /// request open (a watch with nothing to say yet) and hand it to the
    /// test.
    enum Answer {
        Json(u16, String),
        Hold,
    }

    type Held = (Seen, SendResponse<Response<Body>>);

    struct Fake {
        seen: Arc<Mutex<Vec<Seen>>>,
        held: mpsc::UnboundedReceiver<Held>,
        /// Requests held and not handed out, kept open.
        _task: tokio::task::JoinHandle<()>,
    }

    impl Fake {
        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
        /// The next held request that `pick` accepts; others stay open.
        async fn next_held(&mut self, pick: impl Fn(&Seen) -> bool) -> Held {
            let mut keep = Vec::new();
            let found = loop {
                let h = tokio::time::timeout(Duration::from_secs(5), self.held.recv())
                    .await
                    .expect("no such request within 5s")
                    .expect("fake stopped");
                if pick(&h.0) {
                    break h;
                }
                keep.push(h);
            };
            // Held requests not wanted stay held (dropping one would fail it).
            std::mem::forget(keep);
            found
        }
    }

    /// kube's mock pattern: a `Client` over `tower_test::mock::pair`, with
    /// a task answering each request from `answer`.
    fn fake(mut answer: impl FnMut(&Seen) -> Answer + Send + 'static) -> (KubeStore, Fake) {
        let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, held) = mpsc::unbounded_channel();
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let body = body.collect_bytes().await.unwrap();
                let s = Seen {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or("").to_string(),
                    content_type: parts
                        .headers
                        .get("content-type")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default(),
                    body: String::from_utf8(body.to_vec()).unwrap(),
                };
                log.lock().unwrap().push(s.clone());
                match answer(&s) {
                    Answer::Json(code, body) => send.send_response(json_response(code, body)),
                    Answer::Hold => {
                        let _ = tx.send((s, send));
                    }
                }
            }
        });
        let store = KubeStore::with_client(client, "fake".into())
            .with_timings(Duration::from_millis(20), Duration::from_millis(300));
        (
            store,
            Fake {
                seen,
                held,
                _task: task,
            },
        )
    }

    fn json_response(code: u16, body: String) -> Response<Body> {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(body.into_bytes()))
            .unwrap()
    }

    fn not_found(what: &str) -> Answer {
        Answer::Json(
            404,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": format!("{what} not found"), "reason": "NotFound", "code": 404})
            .to_string(),
        )
    }

    /// A Node as the API returns it.
    fn node(name: &str, spec: Value, annotations: Value, internal: Option<&str>) -> Value {
        let mut addresses = vec![json!({"type": "Hostname", "address": name})];
        if let Some(ip) = internal {
            addresses.insert(0, json!({"type": "InternalIP", "address": ip}));
        }
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "7",
                         "labels": {"kubernetes.io/hostname": name},
                         "annotations": annotations},
            "spec": spec,
            "status": {"addresses": addresses, "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "lastHeartbeatTime": "2025-01-01T00:00:00Z",
                 "lastTransitionTime": "2025-01-01T00:00:00Z"}]}
        })
    }

    fn peer(name: &str, cidr: &str, mac: &str, ip: &str) -> Value {
        node(
            name,
            json!({"podCIDR": cidr, "podCIDRs": [cidr]}),
            json!({VTEP_MAC: mac, UNDERLAY_IP: ip}),
            Some("172.18.0.9"),
        )
    }

    fn parse(v: Value) -> Node {
        serde_json::from_value(v).unwrap()
    }

    fn list(kind: &str, rv: &str, items: Vec<Value>) -> Answer {
        let api = if kind == "EndpointSliceList" {
            "discovery.k8s.io/v1"
        } else {
            "v1"
        };
        Answer::Json(
            200,
            json!({"apiVersion": api, "kind": kind, "metadata": {"resourceVersion": rv},
                   "items": items})
            .to_string(),
        )
    }

    fn events(evs: &[(&str, Value)]) -> Response<Body> {
        let mut body = String::new();
        for (t, o) in evs {
            body += &json!({"type": t, "object": o}).to_string();
            body.push('\n');
        }
        json_response(200, body)
    }

    #[test]
    fn node_conversion() {
        let mac = "02:00:00:00:00:01";
        // podCIDRs wins; the first IPv4 range of a dual-stack node.
        let n = parse(node(
            "a",
            json!({"podCIDR": "fd00::/64", "podCIDRs": ["fd00::/64", "10.244.1.0/24"]}),
            json!({VTEP_MAC: mac, UNDERLAY_IP: "192.168.5.1"}),
            Some("172.18.0.2"),
        ));
        let r = node_record(&n).unwrap();
        assert_eq!(r.subnet.to_string(), "10.244.1.0/24");
        assert_eq!(
            r.underlay_ip.to_string(),
            "192.168.5.1",
            "the annotation wins"
        );
        assert_eq!(r.vtep_mac.to_string(), mac);
        assert_eq!(r.node, "a");
        // Only spec.podCIDR (older clusters); no underlay annotation: the
        // InternalIP.
        let n = parse(node(
            "b",
            json!({"podCIDR": "10.244.2.0/24"}),
            json!({VTEP_MAC: mac}),
            Some("172.18.0.3"),
        ));
        let r = node_record(&n).unwrap();
        assert_eq!(r.subnet.to_string(), "10.244.2.0/24");
        assert_eq!(r.underlay_ip.to_string(), "172.18.0.3");

        let bad = |spec: Value, ann: Value, internal: Option<&str>| {
            node_record(&parse(node("x", spec, ann, internal))).unwrap_err()
        };
        let cidr = json!({"podCIDR": "10.244.3.0/24"});
        assert!(matches!(
            bad(json!({}), json!({VTEP_MAC: mac}), Some("1.2.3.4")),
            Unusable::NotYet(m) if m.contains("podCIDR")
        ));
        assert!(matches!(
            bad(cidr.clone(), json!({}), Some("1.2.3.4")),
            Unusable::NotYet(m) if m.contains(VTEP_MAC)
        ));
        assert!(matches!(
            bad(cidr.clone(), json!({VTEP_MAC: "nonsense"}), Some("1.2.3.4")),
            Unusable::Invalid(m) if m.contains(VTEP_MAC)
        ));
        assert!(matches!(
            bad(cidr.clone(), json!({VTEP_MAC: mac, UNDERLAY_IP: "300.1.1.1"}), None),
            Unusable::Invalid(m) if m.contains(UNDERLAY_IP)
        ));
        assert!(matches!(
            bad(cidr, json!({VTEP_MAC: mac}), None),
            Unusable::Invalid(m) if m.contains("InternalIP")
        ));
        assert!(matches!(
            bad(json!({"podCIDRs": ["fd00::/64"]}), json!({VTEP_MAC: mac}), Some("1.2.3.4")),
            Unusable::Invalid(m) if m.contains("IPv4 only")
        ));
        assert!(matches!(
            bad(json!({"podCIDR": "10.244.3.1/24"}), json!({VTEP_MAC: mac}), Some("1.2.3.4")),
            Unusable::Invalid(m) if m.contains("host bits")
        ));
    }

    #[test]
    fn patches() {
        let mac: Mac = "02:aa:00:00:00:01".parse().unwrap();
        assert_eq!(
            annotations_patch(mac, "10.0.0.1".parse().unwrap()),
            json!({"metadata": {"annotations": {
                "ferry.dev/vtep-mac": "02:aa:00:00:00:01",
                "ferry.dev/underlay-ip": "10.0.0.1"}}})
        );
        assert_eq!(
            remove_annotations_patch(),
            json!({"metadata": {"annotations": {
                "ferry.dev/vtep-mac": null, "ferry.dev/underlay-ip": null}}})
        );
        let p = network_up_patch(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert_eq!(
            p,
            json!({"status": {"conditions": [{
                "type": "NetworkUnavailable", "status": "False", "reason": "FerryIsUp",
                "message": "ferry's overlay is up on this node",
                "lastHeartbeatTime": "2023-11-14T22:13:20Z",
                "lastTransitionTime": "2023-11-14T22:13:20Z"}]}})
        );
    }

    #[tokio::test]
    async fn register_waits_for_the_node_and_its_pod_cidr_then_annotates_it() {
        let mut gets = 0;
        let (store, fake) = fake(move |s| match (s.method.as_str(), s.path.as_str()) {
            ("GET", "/api/v1/nodes/n1") => {
                gets += 1;
                match gets {
                    1 => not_found("nodes \"n1\""),
                    2 => Answer::Json(200, node("n1", json!({}), json!({}), None).to_string()),
                    _ => Answer::Json(
                        200,
                        node(
                            "n1",
                            json!({"podCIDR": "10.244.7.0/24", "podCIDRs": ["10.244.7.0/24"]}),
                            json!({"other.io/keep": "x"}),
                            Some("172.18.0.4"),
                        )
                        .to_string(),
                    ),
                }
            }
            ("PATCH", "/api/v1/nodes/n1") => Answer::Json(
                200,
                peer("n1", "10.244.7.0/24", "02:00:00:00:00:07", "192.168.0.1").to_string(),
            ),
            _ => Answer::Hold,
        });
        let r = reg("n1", Duration::from_secs(60));
        let rec = store.register(&r).await.unwrap();
        assert_eq!(rec.subnet.to_string(), "10.244.7.0/24");
        assert_eq!(rec.vtep_mac, r.vtep_mac);
        assert_eq!(rec.underlay_ip, r.underlay_ip);
        let seen = fake.seen();
        let calls: Vec<_> = seen.iter().map(|s| s.method.as_str()).collect();
        assert_eq!(calls, ["GET", "GET", "GET", "PATCH"], "{seen:#?}");
        let patch = &seen[3];
        assert_eq!(patch.content_type, "application/merge-patch+json");
        assert_eq!(patch.param("fieldManager").as_deref(), Some("ferryd"));
        assert_eq!(
            serde_json::from_str::<Value>(&patch.body).unwrap(),
            annotations_patch(r.vtep_mac, r.underlay_ip),
            "only ferry's annotations, merged"
        );
        assert_covered(&seen);
    }

    #[tokio::test]
    async fn register_refuses_a_subnet_ferry_cannot_use() {
        for (spec, want) in [
            (json!({"podCIDR": "10.99.0.0/24"}), "outside --cluster-cidr"),
            (json!({"podCIDRs": ["fd00:1::/64"]}), "IPv4 only"),
        ] {
            let body = node("n1", spec, json!({}), None).to_string();
            let (store, fake) = fake(move |_| Answer::Json(200, body.clone()));
            let e = store
                .register(&reg("n1", Duration::from_secs(60)))
                .await
                .unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
            assert!(
                fake.seen().iter().all(|s| s.method == "GET"),
                "nothing patched"
            );
        }
    }

    fn service() -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "default", "resourceVersion": "3",
                            "uid": "u1", "creationTimestamp": "2025-01-01T00:00:00Z"},
               "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10",
                        "clusterIPs": ["10.96.0.10"], "ipFamilies": ["IPv4"],
                        "ipFamilyPolicy": "SingleStack", "sessionAffinity": "None",
                        "internalTrafficPolicy": "Cluster",
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                                   "targetPort": 8080}],
                        "selector": {"app": "web"}},
               "status": {"loadBalancer": {}}})
    }

    fn slice() -> Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "web-x1", "namespace": "default", "resourceVersion": "4",
                            "labels": {"kubernetes.io/service-name": "web",
                                       "endpointslice.kubernetes.io/managed-by":
                                           "endpointslice-controller.k8s.io"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "n2",
                              "conditions": {"ready": true, "serving": true,
                                             "terminating": false}}],
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
    }

    /// Lists of nodes, one Service and one slice; watches held for the test.
    fn cluster(nodes: Vec<Value>) -> impl FnMut(&Seen) -> Answer + Send + 'static {
        move |s| {
            if s.is_watch() {
                return Answer::Hold;
            }
            match s.path.as_str() {
                "/api/v1/nodes" => list("NodeList", "10", nodes.clone()),
                "/api/v1/services" => list("ServiceList", "11", vec![service()]),
                "/apis/discovery.k8s.io/v1/endpointslices" => {
                    list("EndpointSliceList", "12", vec![slice()])
                }
                _ => not_found(&s.path),
            }
        }
    }

    fn names(recs: &[NodeRecord]) -> Vec<&str> {
        recs.iter().map(|r| r.node.as_str()).collect()
    }

    #[tokio::test]
    async fn watches_feed_nodes_and_services_with_kube_proxys_filters() {
        let (store, mut fake) = fake(cluster(vec![
            peer("n3", "10.244.3.0/24", "02:00:00:00:00:03", "192.168.0.3"),
            peer("n2", "10.244.2.0/24", "02:00:00:00:00:02", "192.168.0.2"),
            // Logged and skipped; the others are fine.
            node(
                "bad",
                json!({"podCIDR": "10.244.9.0/24"}),
                json!({VTEP_MAC: "zz"}),
                Some("172.18.0.9"),
            ),
            node("fresh", json!({}), json!({}), Some("172.18.0.8")),
        ]));
        let nodes = store.nodes().await.unwrap();
        assert_eq!(names(&nodes), ["n2", "n3"]);
        assert_eq!(nodes[0].underlay_ip.to_string(), "192.168.0.2");
        let snap = store.services().await.unwrap();
        assert_eq!(snap.services.keys().collect::<Vec<_>>(), ["default/web"]);
        assert_eq!(snap.slices.keys().collect::<Vec<_>>(), ["default/web-x1"]);

        let seen = fake.seen();
        let by_path = |p: &str| -> Vec<&Seen> { seen.iter().filter(|s| s.path == p).collect() };
        for s in by_path("/api/v1/services") {
            assert_eq!(
                s.param("labelSelector").as_deref(),
                Some(SERVICE_LABELS),
                "{s:?}"
            );
            assert_eq!(
                s.param("fieldSelector").as_deref(),
                Some(SERVICE_FIELDS),
                "{s:?}"
            );
        }
        for s in by_path("/apis/discovery.k8s.io/v1/endpointslices") {
            assert_eq!(
                s.param("labelSelector").as_deref(),
                Some(SLICE_LABELS),
                "{s:?}"
            );
        }
        for s in by_path("/api/v1/nodes") {
            assert_eq!(s.param("labelSelector"), None);
        }
        assert!(
            [
                "/api/v1/services",
                "/apis/discovery.k8s.io/v1/endpointslices"
            ]
            .iter()
            .all(|p| by_path(p).iter().any(|s| s.is_watch())),
            "both are watched: {seen:#?}"
        );

        // A watch event reaches nodes() and wakes changed().
        let (w, send) = fake
            .next_held(|s| s.path == "/api/v1/nodes" && s.is_watch())
            .await;
        assert_eq!(w.param("resourceVersion").as_deref(), Some("10"));
        assert_eq!(w.param("allowWatchBookmarks").as_deref(), Some("true"));
        // Drain the wake-up the lists left.
        while tokio::time::timeout(Duration::from_millis(100), store.changed())
            .await
            .is_ok()
        {}
        send.send_response(events(&[
            (
                "ADDED",
                peer("n4", "10.244.4.0/24", "02:00:00:00:00:04", "192.168.0.4"),
            ),
            (
                "DELETED",
                peer("n3", "10.244.3.0/24", "02:00:00:00:00:03", "192.168.0.3"),
            ),
        ]));
        tokio::time::timeout(Duration::from_secs(5), store.changed())
            .await
            .expect("changed() after a watch event");
        let mut got = Vec::new();
        for _ in 0..50 {
            got = names(&store.nodes().await.unwrap())
                .into_iter()
                .map(String::from)
                .collect();
            if got == ["n2", "n4"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(got, ["n2", "n4"]);
        assert_covered(&fake.seen());
    }

    #[tokio::test]
    async fn a_410_relists_and_the_new_list_replaces_the_old() {
        let mut lists = 0;
        let (store, mut fake) = fake(move |s| {
            if s.is_watch() || s.path != "/api/v1/nodes" {
                return Answer::Hold;
            }
            lists += 1;
            let n = if lists == 1 { "old" } else { "new" };
            list(
                "NodeList",
                &format!("{lists}0"),
                vec![peer(n, "10.244.5.0/24", "02:00:00:00:00:05", "192.168.0.5")],
            )
        });
        assert_eq!(names(&store.nodes().await.unwrap()), ["old"]);
        let (_, send) = fake
            .next_held(|s| s.path == "/api/v1/nodes" && s.is_watch())
            .await;
        send.send_response(events(&[(
            "ERROR",
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "too old resource version: 10 (20)", "reason": "Expired",
                   "code": 410}),
        )]));
        let mut got = Vec::new();
        for _ in 0..100 {
            got = names(&store.nodes().await.unwrap())
                .into_iter()
                .map(String::from)
                .collect();
            if got == ["new"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(got, ["new"], "the relist is a full resync");
        let (w, _send) = fake
            .next_held(|s| s.path == "/api/v1/nodes" && s.is_watch())
            .await;
        assert_eq!(w.param("resourceVersion").as_deref(), Some("20"));
    }

    #[tokio::test]
    async fn reads_before_the_first_list_fail_rather_than_look_empty() {
        let (store, _fake) = fake(|_| Answer::Hold);
        let e = store.nodes().await.unwrap_err().to_string();
        assert!(e.contains("not listed yet") && e.contains("Nodes"), "{e}");
        let e = store.services().await.unwrap_err().to_string();
        assert!(
            e.contains("Services") && e.contains("EndpointSlices"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn renew_checks_the_node_in_the_cache() {
        let r = reg("n1", Duration::from_secs(60));
        let own = peer(
            "n1",
            "10.244.7.0/24",
            &r.vtep_mac.to_string(),
            "192.168.0.1",
        );
        for (nodes, ok) in [
            (vec![own.clone()], true),
            (vec![], false),
            (
                vec![peer(
                    "n1",
                    "10.244.7.0/24",
                    "02:00:00:00:00:99",
                    "192.168.0.1",
                )],
                false,
            ),
        ] {
            let get = own.to_string();
            let mut answer = cluster(nodes);
            let (store, _fake) = fake(move |s| match s.method.as_str() {
                "GET" if s.path == "/api/v1/nodes/n1" => Answer::Json(200, get.clone()),
                "PATCH" => Answer::Json(200, get.clone()),
                _ => answer(s),
            });
            store.register(&r).await.unwrap();
            store.nodes().await.unwrap();
            let got = store.renew().await;
            if ok {
                got.unwrap();
            } else {
                assert!(matches!(got, Err(StoreError::NotRegistered(n)) if n == "n1"));
            }
        }
    }

    #[tokio::test]
    async fn network_up_patches_the_condition_once() {
        let r = reg("n1", Duration::from_secs(60));
        let own = peer(
            "n1",
            "10.244.7.0/24",
            &r.vtep_mac.to_string(),
            "192.168.0.1",
        );
        let body = own.to_string();
        // The watches never list: network_up falls back on what it did.
        let (store, fake) = fake(move |s| match s.method.as_str() {
            "GET" if !s.is_watch() && s.path == "/api/v1/nodes/n1" => {
                Answer::Json(200, body.clone())
            }
            "PATCH" => Answer::Json(200, body.clone()),
            _ => Answer::Hold,
        });
        store.network_up().await.unwrap();
        assert!(
            fake.seen().iter().all(|s| s.method != "PATCH"),
            "nothing before registering"
        );
        store.register(&r).await.unwrap();
        store.network_up().await.unwrap();
        store.network_up().await.unwrap();
        let seen = fake.seen();
        let status: Vec<_> = seen
            .iter()
            .filter(|s| s.path == "/api/v1/nodes/n1/status")
            .collect();
        assert_eq!(status.len(), 1, "{seen:#?}");
        assert_eq!(status[0].method, "PATCH");
        assert_eq!(
            status[0].content_type,
            "application/strategic-merge-patch+json"
        );
        let body: Value = serde_json::from_str(&status[0].body).unwrap();
        let cond = &body["status"]["conditions"][0];
        assert_eq!(cond["type"], "NetworkUnavailable");
        assert_eq!(cond["status"], "False");
        assert_covered(&seen);
    }

    #[tokio::test]
    async fn network_up_follows_the_cache() {
        let r = reg("n1", Duration::from_secs(60));
        let mut marked = peer(
            "n1",
            "10.244.7.0/24",
            &r.vtep_mac.to_string(),
            "192.168.0.1",
        );
        marked["status"]["conditions"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "NetworkUnavailable", "status": "False"}));
        let get = marked.to_string();
        let mut answer = cluster(vec![marked]);
        let (store, fake) = fake(move |s| match s.method.as_str() {
            "GET" if s.path == "/api/v1/nodes/n1" => Answer::Json(200, get.clone()),
            "PATCH" => Answer::Json(200, get.clone()),
            _ => answer(s),
        });
        store.register(&r).await.unwrap();
        store.nodes().await.unwrap();
        store.network_up().await.unwrap();
        assert!(
            !fake.seen().iter().any(|s| s.path.ends_with("/status")),
            "the Node says so already"
        );
    }

    #[tokio::test]
    async fn leave_removes_the_annotations() {
        let (store, fake) = fake(|s| match s.path.as_str() {
            "/api/v1/nodes/n1" => Answer::Json(
                200,
                peer("n1", "10.244.1.0/24", "02:00:00:00:00:01", "1.1.1.1").to_string(),
            ),
            _ => not_found("nodes \"gone\""),
        });
        store.leave("n1").await.unwrap();
        let seen = fake.seen();
        assert_eq!(seen[0].method, "PATCH");
        assert_eq!(seen[0].content_type, "application/merge-patch+json");
        assert_eq!(
            serde_json::from_str::<Value>(&seen[0].body).unwrap(),
            remove_annotations_patch()
        );
        assert!(matches!(
            store.leave("gone").await,
            Err(StoreError::NotRegistered(n)) if n == "gone"
        ));
        assert_covered(&fake.seen());
    }

    #[tokio::test]
    async fn service_writes_point_to_kubectl() {
        let (store, fake) = fake(|_| Answer::Hold);
        let e = store.apply(vec![], &Ranges::default()).await.unwrap_err();
        assert!(e.to_string().contains("kubectl"), "{e}");
        let e = store.delete(&[]).await.unwrap_err();
        assert!(e.to_string().contains("kubectl"), "{e}");
        store.publish_ranges(&Ranges::default()).await.unwrap();
        assert_eq!(store.ranges().await.unwrap(), None);
        assert!(fake.seen().is_empty());
    }

    /// A plain-HTTP API server on 127.0.0.1 that answers every request with
    /// `node` and records the request lines: what the end-to-end fake does.
    async fn http_server(node: Value) -> (String, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let log = lines.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // The head, then as much body as Content-Length says.
                let (head_end, len) = loop {
                    let n = c.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "connection closed mid-request");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse::<usize>().unwrap())
                            .unwrap_or(0);
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let n = c.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                log.lock()
                    .unwrap()
                    .push(head.lines().next().unwrap_or("").to_string());
                let body = node.to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                c.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        (url, lines)
    }

    fn kubeconfig(dir: &Path, server: &str) -> std::path::PathBuf {
        let p = dir.join("kubeconfig");
        std::fs::write(
            &p,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters: [{{name: fake, cluster: {{server: \"{server}\"}}}}]\n\
                 users: [{{name: u, user: {{}}}}]\n\
                 contexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\n\
                 current-context: c\n"
            ),
        )
        .unwrap();
        p
    }

    /// `ferryd run --store kubernetes --kubeconfig FILE` with a plain
    /// http:// server, and `--api-server` replacing the kubeconfig's: the
    /// real client stack (no mock), as the end-to-end tests use it.
    #[tokio::test]
    async fn a_kubeconfig_with_a_plain_http_server_and_the_override() {
        let r = reg("n1", Duration::from_secs(60));
        let own = peer(
            "n1",
            "10.244.7.0/24",
            &r.vtep_mac.to_string(),
            "192.168.0.1",
        );
        let dir = crate::store::testing::TempDir::new("kubecfg");
        let (url, lines) = http_server(own.clone()).await;
        let store = KubeStore::open(Some(&kubeconfig(&dir.0, &url)), None)
            .await
            .unwrap();
        assert_eq!(store.server(), format!("{url}/"));
        let rec = store.register(&r).await.unwrap();
        assert_eq!(rec.subnet.to_string(), "10.244.7.0/24");
        let seen = lines.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0].starts_with("GET /api/v1/nodes/n1 "), "{seen:?}");
        assert!(seen[1].starts_with("PATCH /api/v1/nodes/n1?"), "{seen:?}");

        // The kubeconfig names a port nothing listens on; --api-server wins.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_url = format!("http://{}", dead.local_addr().unwrap());
        drop(dead);
        let (url, lines) = http_server(own).await;
        let store = KubeStore::open(Some(&kubeconfig(&dir.0, &dead_url)), Some(&url))
            .await
            .unwrap()
            .with_timings(Duration::from_millis(20), Duration::from_millis(300));
        store.register(&r).await.unwrap();
        assert_eq!(lines.lock().unwrap().len(), 2);

        let e = KubeStore::open(Some(&dir.0.join("missing")), None)
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("--kubeconfig"), "{e}");
    }

    #[test]
    fn api_server_urls() {
        assert_eq!(
            parse_api_server("https://kind-control-plane:6443")
                .unwrap()
                .to_string(),
            "https://kind-control-plane:6443/"
        );
        assert!(parse_api_server("http://127.0.0.1:8080").is_ok());
        assert!(parse_api_server("kind-control-plane:6443").is_err());
        assert!(parse_api_server("ftp://h").is_err());
        assert!(parse_api_server("").is_err());
    }
}
