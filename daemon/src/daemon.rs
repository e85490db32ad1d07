//! `ferryd run`: preflight (nothing changed yet), register, then tasks that
//! run until SIGTERM/SIGINT (DESIGN.md, "Daemon shape"):
//!
//! - **membership**: registration and lease renewal; publishes this node's
//!   record (and whether it left) on a `watch` channel;
//! - **sources**: the latest snapshot of what the store knows (nodes, and
//!   Services with their EndpointSlices), on `watch` channels: the latest
//!   value wins, a burst of writes is one pass;
//! - **reconcilers** (overlay, masquerade, Services): each turns the snapshots into
//!   desired state, diffs against the kernel, applies, on changes and on its
//!   own timer, and reports its gate; one failing never stalls another;
//! - **readiness**: the composition of the gates that matter for pods (the
//!   overlay and masquerade; never Services); it writes the conflist and
//!   the readiness file `ferry STATUS` checks.
//!
//! Stopping leaves the datapath in place; a restarted ferryd computes the
//! same desired state and finds nothing to change.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::netlink::Netlink;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::time::{interval_at, Interval, MissedTickBehavior};

use crate::config::Settings;
use crate::conflist::{self, ConflistParams};
use crate::health::{self, Status};
use crate::kernel::{self, KernelError, Underlay};
use crate::overlay::{Local, Overlay, Params};
use crate::record::{Mac, NodeRecord};
use crate::service::state::State;
use crate::store::{ClusterState, Membership, NodeSet, Registration, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Kernel(#[from] KernelError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Masq(#[from] crate::masq::MasqError),
    #[error("netlink: {0}")]
    Netlink(#[from] ferry::netlink::NlError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DaemonError> + Send + 'static,
) -> Result<T, DaemonError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Checks that touch nothing: the underlay exists and has an address, the
/// health address can be bound.
pub async fn preflight(s: &Settings) -> Result<(Underlay, Option<TcpListener>), DaemonError> {
    let spec = s.underlay.clone();
    let underlay = blocking(move || {
        let mut nl = Netlink::open()?;
        Ok(kernel::resolve_underlay(&mut nl, &spec)?)
    })
    .await?;
    let listener = match s.listen {
        Some(addr) => {
            Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| DaemonError::Listen {
                        addr: addr.to_string(),
                        source,
                    })?,
            )
        }
        None => None,
    };
    Ok((underlay, listener))
}

struct Pass {
    changes: usize,
    peers: usize,
    mtu: u32,
    underlay: Underlay,
    /// A full reconcile against the kernel, not a delta.
    full: bool,
    applied: Applied,
}

/// What the overlay reconciler last brought into the kernel: the next
/// change is applied as the delta from it.
#[derive(Clone)]
struct Applied {
    overlay: Overlay,
    /// The records `overlay` was last brought to.
    nodes: NodeSet,
    rec: NodeRecord,
    underlay: Underlay,
    index: u32,
}

/// One pass of the overlay: VXLAN device, neighbours, FDB, routes. With
/// `last` (and `full` false) only the records that changed since it, and
/// without reading the kernel: a change of one peer costs that peer.
/// Otherwise, or when the steps cannot be applied, a full reconcile
/// against what the kernel holds (one dump per object kind), which also
/// repairs drift.
async fn reconcile_overlay(
    s: &Settings,
    rec: &NodeRecord,
    nodes: NodeSet,
    last: Option<Applied>,
    full: bool,
) -> Result<Pass, DaemonError> {
    let s = s.clone();
    let rec = rec.clone();
    blocking(move || {
        let mut nl = Netlink::open()?;
        let params = Params {
            device: s.vxlan_device(),
            vni: s.vni,
            port: s.vxlan_port,
            mtu: s.mtu,
            direct_routing: s.direct_routing,
            cluster: s.cluster_cidr,
        };
        let all = || nodes.iter().map(|(k, r)| (k.clone(), &**r));
        if let Some(mut last) = last.filter(|l| !full && l.rec == rec) {
            let changed = nodes.changed_since(&last.nodes);
            let (acts, rebuilt) = last.overlay.update(
                changed
                    .iter()
                    .map(|k| (k.as_str(), nodes.get(k).map(|r| &**r))),
                all,
            );
            if rebuilt {
                tracing::debug!("records clash: the overlay was rebuilt from all of them");
            }
            let u = last.underlay.index;
            match kernel::apply(&mut nl, &acts, &params.device, last.index, u) {
                Ok(()) => {
                    for a in &acts {
                        tracing::info!(action = ?a, "overlay");
                    }
                    let want = last.overlay.desired();
                    return Ok(Pass {
                        changes: acts.len(),
                        peers: want.peers(),
                        mtu: want.device.mtu,
                        underlay: last.underlay.clone(),
                        full: false,
                        applied: Applied { nodes, ..last },
                    });
                }
                // The kernel is not what we last left it as: look.
                Err(e) => tracing::info!("overlay delta: {e}; reconciling in full"),
            }
        }
        let underlay = kernel::resolve_underlay(&mut nl, &s.underlay)?;
        let local = Local {
            node: rec.node.clone(),
            subnet: rec.subnet,
            underlay_ip: underlay.ip,
            underlay_index: underlay.index,
            underlay_mtu: underlay.mtu,
            underlay_nets: underlay.nets.clone(),
            vtep_mac: rec.vtep_mac,
        };
        let overlay = Overlay::new(&local, &params, all());
        let want = overlay.desired();
        let (acts, index) =
            kernel::reconcile(&mut nl, want, underlay.index, s.cluster_cidr, rec.subnet)?;
        for a in &acts {
            tracing::info!(action = ?a, "overlay");
        }
        let index = index.ok_or_else(|| KernelError::DeviceVanished(params.device.clone()))?;
        Ok(Pass {
            changes: acts.len(),
            peers: want.peers(),
            mtu: want.device.mtu,
            underlay: underlay.clone(),
            full: true,
            applied: Applied {
                overlay,
                nodes,
                rec,
                underlay,
                index,
            },
        })
    })
    .await
}

fn plugins_installed(s: &Settings) -> bool {
    ["ferry", "ferry-ipam"]
        .iter()
        .all(|b| s.cni_bin_dir.join(b).is_file())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Tell the node's runtime that ferryd is ready: the conflist for this
/// node's subnet and MTU, then the readiness file `ferry STATUS` checks.
fn publish(s: &Settings, rec: &NodeRecord, mtu: u32, ready_file: &Path, status: &Status) {
    let text = conflist::render(&ConflistParams {
        network: &s.network_name,
        bridge: &s.bridge,
        subnet: rec.subnet,
        mtu,
        data_dir: &s.cni_data_dir,
        ipam_data_dir: &s.ipam_data_dir,
        ready_file,
    });
    let path = s.cni_conf_dir.join(conflist::FILE_NAME);
    match conflist::write_atomic(&path, &text) {
        Ok(true) => tracing::info!(path = %path.display(), "CNI conflist written"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot write CNI conflist: {e}")
        }
    }
    let info = serde_json::json!({
        "node": rec.node, "subnet": rec.subnet.to_string(), "mtu": mtu,
        "pid": std::process::id(),
    });
    match conflist::write_atomic(ready_file, &format!("{info}\n")) {
        Ok(w) => {
            if w && !status.ready.load(Relaxed) {
                tracing::info!(file = %ready_file.display(), "node ready");
            }
            status.ready.store(true, Relaxed);
        }
        Err(e) => {
            tracing::warn!(file = %ready_file.display(), "cannot write readiness file: {e}")
        }
    }
}

/// A timer whose first tick is one period from now (each task has just done
/// its work once when it starts waiting); late ticks do not pile up.
fn ticker(period: Duration) -> Interval {
    let mut t = interval_at(tokio::time::Instant::now() + period, period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

/// This node as the store knows it.
#[derive(Debug, Clone)]
struct Member {
    rec: NodeRecord,
    /// Marked as left (`ferryd leave`): no renewals, not ready, until restart.
    left: bool,
}

/// What each reconciler that gates pods last reported.
#[derive(Debug, Clone, Default)]
struct Gates {
    /// The overlay is up; pods get this MTU.
    overlay_mtu: Option<u32>,
    /// Egress masquerade holds what it should.
    masquerade: bool,
}

/// Runs until SIGTERM/SIGINT.
pub async fn run<S: Store>(
    s: Settings,
    store: S,
    underlay: Underlay,
    listener: Option<TcpListener>,
) -> Result<(), DaemonError> {
    tune_allocator();
    let status = Arc::new(Status::default());
    let ready_file = s.ready_file();
    conflist::remove_if_exists(&ready_file)
        .map_err(io(format!("cannot remove {}", ready_file.display())))?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(io("cannot handle SIGTERM"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(io("cannot handle SIGINT"))?;

    let mut reg = Registration {
        node: s.node_name.clone(),
        underlay_ip: underlay.ip,
        vtep_mac: Mac::for_vtep(&s.node_name, s.vni),
        cluster: s.cluster_cidr,
        subnet_len: s.subnet_len,
        ttl: s.lease_ttl,
        prefer: std::fs::read_to_string(s.cni_conf_dir.join(conflist::FILE_NAME))
            .ok()
            .and_then(|t| conflist::subnet_of(&t)),
    };
    // The first registration is not retried: a store that refuses it is a
    // configuration error the user must see.
    let rec = store.register(&reg).await?;
    reg.prefer = Some(rec.subnet);
    // The service CIDR and node-port range live in the store, so that
    // ferryctl allocates from what ferryd programs; a store that holds
    // others is a configuration error.
    store.publish_ranges(&s.service_ranges).await?;
    if let Ok(mut sn) = status.subnet.lock() {
        *sn = rec.subnet.to_string();
    }
    tracing::info!(node = %rec.node, subnet = %rec.subnet, underlay = %format!("{} ({})", underlay.ip, underlay.name), vtep_mac = %rec.vtep_mac, "registered");

    if let Some(l) = listener {
        tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /healthz /readyz /metrics");
        tokio::spawn(health::serve(l, status.clone()));
    }
    // Pods on this node route through it.
    if let Err(e) = ferry::sysctl::set_net("ipv4/ip_forward", "1") {
        tracing::warn!("cannot enable ipv4 forwarding: {e}");
    }

    let store = Arc::new(store);
    let up = store.clone();
    let (member_tx, member) = watch::channel(Member { rec, left: false });
    let (nodes_tx, nodes) = watch::channel(None);
    let (services_tx, services) = watch::channel(None);
    let (gates_tx, gates) = watch::channel(Gates::default());
    let (reregister_tx, reregister) = mpsc::channel(1);
    tokio::spawn(membership(
        store.clone(),
        reg,
        s.lease_ttl,
        member_tx,
        reregister,
        status.clone(),
    ));
    tokio::spawn(cluster_source(
        store,
        s.reconcile_interval,
        nodes_tx,
        services_tx,
        status.clone(),
    ));
    tokio::spawn(crate::service::reconciler::run(
        s.node_name.clone(),
        s.reconcile_interval,
        services,
        status.clone(),
    ));
    tokio::spawn(overlay_reconciler(
        s.clone(),
        nodes,
        member.clone(),
        reregister_tx,
        gates_tx.clone(),
        status.clone(),
    ));
    tokio::spawn(masquerade_reconciler(
        s.clone(),
        member.clone(),
        gates_tx,
        status.clone(),
    ));
    let readiness = tokio::spawn(readiness(s, up, gates, member, ready_file.clone(), status));

    let why = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    // No readiness write may land after the file is removed.
    readiness.abort();
    let _ = readiness.await;
    let _ = conflist::remove_if_exists(&ready_file);
    tracing::info!("{why}: stopping; the datapath stays in place for the next ferryd to adopt");
    Ok(())
}

/// glibc raises its mmap threshold each time a large block is freed; from
/// then on the large, short-lived buffers of a full Services sync (the
/// transaction, the table read back) come from the heap and leave it
/// fragmented: at 10k Services, megabytes that stay resident. A fixed
/// threshold keeps them in mappings of their own, returned when freed.
/// And glibc gives each new thread an arena of its own, up to 8 per core:
/// the long-lived state (the store's snapshot, the reconcilers' desired
/// state) ended up spread over as many arenas as blocking-pool threads
/// had touched it, each kept half-full by it (VmRSS 63–80 MiB at 10k
/// Services; 52 MiB with two arenas).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Registration and lease renewal. Re-registers when the record vanished
/// from the store or the overlay saw the underlay address change.
async fn membership<S: Membership>(
    store: Arc<S>,
    mut reg: Registration,
    ttl: Duration,
    member: watch::Sender<Member>,
    mut reregister: mpsc::Receiver<Ipv4Addr>,
    status: Arc<Status>,
) {
    let mut renew = ticker((ttl / 3).min(Duration::from_secs(5)));
    loop {
        tokio::select! {
            _ = renew.tick() => {
                if member.borrow().left {
                    continue;
                }
                match store.renew().await {
                    Ok(()) => {}
                    Err(StoreError::Left(_)) => {
                        tracing::warn!("this node was marked as left in the store; no longer renewing its lease (restart ferryd to rejoin)");
                        member.send_modify(|m| m.left = true);
                    }
                    Err(StoreError::NotRegistered(_)) => {
                        tracing::warn!("own record vanished from the store; registering again");
                        register(&*store, &mut reg, &member, &status).await;
                    }
                    Err(e) => {
                        status.store_errors.fetch_add(1, Relaxed);
                        tracing::warn!("renewing lease: {e}");
                    }
                }
            }
            Some(ip) = reregister.recv() => {
                tracing::warn!(old = %reg.underlay_ip, new = %ip, "underlay address changed; re-registering");
                reg.underlay_ip = ip;
                register(&*store, &mut reg, &member, &status).await;
            }
        }
    }
}

async fn register<S: Membership>(
    store: &S,
    reg: &mut Registration,
    member: &watch::Sender<Member>,
    status: &Status,
) {
    match store.register(reg).await {
        Ok(rec) => {
            reg.prefer = Some(rec.subnet);
            member.send_modify(|m| m.rec = rec);
        }
        Err(e) => {
            status.store_errors.fetch_add(1, Relaxed);
            tracing::warn!("register: {e}");
        }
    }
}

/// Publishes the live node records and the Services with their slices:
/// after every store change and on the reconcile timer, on which the store
/// also reads its backend again (`resync`: it answers from memory, kept
/// current by events). One task reads both: a store's change signal wakes
/// one waiter. A list equal to the last is not sent again, so a lease
/// renewal wakes no reconciler; the Services are not even read again
/// while the store's version of them has not moved (10k of them take
/// milliseconds to copy and compare, a node change must not). An
/// unreachable store keeps the last snapshots: the kernel keeps the last
/// known state.
async fn cluster_source<S: ClusterState>(
    store: Arc<S>,
    every: Duration,
    nodes: watch::Sender<Option<NodeSet>>,
    services: watch::Sender<Option<State>>,
    status: Arc<Status>,
) {
    let mut resync = ticker(every);
    let mut services_seen = None;
    loop {
        match store.node_set().await {
            Ok(n) => {
                // Cheap: pieces the two share are not compared.
                nodes.send_if_modified(|cur| {
                    if cur.as_ref() == Some(&n) {
                        return false;
                    }
                    *cur = Some(n);
                    true
                });
            }
            Err(e) => {
                status.store_errors.fetch_add(1, Relaxed);
                tracing::warn!("reading the store: {e}; keeping the last known nodes");
            }
        }
        // Read before the Services: a change landing in between moves it
        // again, and the next pass reads them again.
        let version = store.services_version();
        if version.is_none() || version != services_seen {
            match store.state().await {
                Ok(snap) => {
                    services_seen = version;
                    // Cheap: pieces the two share are not compared.
                    services.send_if_modified(|cur| {
                        if cur.as_ref() == Some(&snap) {
                            return false;
                        }
                        *cur = Some(snap);
                        true
                    });
                }
                Err(e) => {
                    status.store_errors.fetch_add(1, Relaxed);
                    tracing::warn!(
                        "reading Services from the store: {e}; keeping the last known ones"
                    );
                }
            }
        }
        if let Ok(mut s) = status.source.lock() {
            *s = store.describe();
        }
        // A change that lands while the store is read is seen by the next
        // read: `changed` only has to wake us, not carry the change. No
        // settling delay: reads are from memory, and a burst of events
        // while we read is one wake-up.
        tokio::select! {
            _ = store.changed() => {}
            _ = resync.tick() => store.resync().await,
        }
    }
}

/// Keeps the overlay to every other node: on node or membership changes
/// the delta from what it applied last; on its own timer (and after any
/// failure) a full reconcile against the kernel, which repairs drift.
async fn overlay_reconciler(
    s: Settings,
    mut nodes: watch::Receiver<Option<NodeSet>>,
    mut member: watch::Receiver<Member>,
    reregister: mpsc::Sender<Ipv4Addr>,
    gates: watch::Sender<Gates>,
    status: Arc<Status>,
) {
    let mut timer = ticker(s.reconcile_interval);
    let mut last: Option<Applied> = None;
    let mut full = true;
    loop {
        let t0 = Instant::now();
        let snapshot = nodes.borrow_and_update().clone();
        let rec = member.borrow_and_update().rec.clone();
        let result = match snapshot {
            Some(n) => reconcile_overlay(&s, &rec, n, last.take(), full).await,
            None => Err(DaemonError::Io {
                what: "no node list read from the store yet".into(),
                source: std::io::Error::other("store unavailable"),
            }),
        };
        status.reconciles.fetch_add(1, Relaxed);
        status
            .last_reconcile_micros
            .store(t0.elapsed().as_micros() as u64, Relaxed);
        match result {
            Ok(pass) => {
                status
                    .kernel_changes
                    .fetch_add(pass.changes as u64, Relaxed);
                status.peers.store(pass.peers as u64, Relaxed);
                status.last_success_unix.store(unix_now(), Relaxed);
                if pass.full {
                    // What scripts/bench-stores.sh reads: the cost of a
                    // full pass at this many peers.
                    tracing::debug!(
                        peers = pass.peers,
                        took_us = t0.elapsed().as_micros() as u64,
                        "full overlay reconcile"
                    );
                }
                if pass.changes > 0 {
                    tracing::info!(
                        changes = pass.changes,
                        peers = pass.peers,
                        full = pass.full,
                        took_ms = t0.elapsed().as_millis() as u64,
                        "reconciled"
                    );
                }
                if pass.underlay.ip != rec.underlay_ip {
                    // Full channel: a request is already pending.
                    let _ = reregister.try_send(pass.underlay.ip);
                }
                gates.send_modify(|g| g.overlay_mtu = Some(pass.mtu));
                last = Some(pass.applied);
            }
            Err(e) => {
                status.reconcile_errors.fetch_add(1, Relaxed);
                tracing::warn!("overlay reconcile failed: {e}");
                gates.send_modify(|g| g.overlay_mtu = None);
            }
        }
        full = tokio::select! {
            r = nodes.changed() => if r.is_err() { return } else { false },
            r = member.changed() => if r.is_err() { return } else { false },
            _ = timer.tick() => true,
        };
    }
}

/// Keeps the node's egress masquerade, on membership changes (a new subnet)
/// and on its own timer.
async fn masquerade_reconciler(
    s: Settings,
    mut member: watch::Receiver<Member>,
    gates: watch::Sender<Gates>,
    status: Arc<Status>,
) {
    let mut timer = ticker(s.reconcile_interval);
    loop {
        let subnet = member.borrow_and_update().rec.subnet;
        let (enabled, cluster) = (s.masquerade, s.cluster_cidr);
        let result = blocking(move || Ok(crate::masq::ensure(enabled, subnet, cluster)?)).await;
        match result {
            Ok(changed) => {
                if changed {
                    status.kernel_changes.fetch_add(1, Relaxed);
                    tracing::info!(%subnet, %cluster, enabled, "egress masquerade rules written");
                }
                gates.send_modify(|g| g.masquerade = true);
            }
            Err(e) => {
                status.reconcile_errors.fetch_add(1, Relaxed);
                tracing::warn!("masquerade reconcile failed: {e}");
                gates.send_modify(|g| g.masquerade = false);
            }
        }
        tokio::select! {
            r = member.changed() => if r.is_err() { return },
            _ = timer.tick() => {}
        }
    }
}

/// The node is ready for pods when every gate is open, ferry's plugins are
/// installed and the node has not left; then the conflist and the readiness
/// file are (re)written, otherwise the readiness file is removed.
async fn readiness<S: Membership>(
    s: Settings,
    store: Arc<S>,
    mut gates: watch::Receiver<Gates>,
    mut member: watch::Receiver<Member>,
    ready_file: PathBuf,
    status: Arc<Status>,
) {
    let mut warned_bins = false;
    loop {
        let g = gates.borrow_and_update().clone();
        let m = member.borrow_and_update().clone();
        let installed = plugins_installed(&s);
        if !installed && !warned_bins {
            tracing::warn!(dir = %s.cni_bin_dir.display(), "ferry and ferry-ipam are not installed in the CNI bin dir; not ready");
            warned_bins = true;
        }
        match g.overlay_mtu {
            Some(mtu) if g.masquerade && installed && !m.left => {
                publish(&s, &m.rec, mtu, &ready_file, &status);
                // Every ready pass: cheap when the store already says so,
                // and a failed attempt is retried on the next.
                if let Err(e) = store.network_up().await {
                    status.store_errors.fetch_add(1, Relaxed);
                    tracing::warn!("telling the store this node's network is up: {e}");
                }
            }
            _ => unready(&ready_file, &status),
        }
        tokio::select! {
            r = gates.changed() => if r.is_err() { return },
            r = member.changed() => if r.is_err() { return },
        }
    }
}

fn unready(ready_file: &Path, status: &Status) {
    if status.ready.swap(false, Relaxed) {
        tracing::warn!("node not ready");
    }
    let _ = conflist::remove_if_exists(ready_file);
}
