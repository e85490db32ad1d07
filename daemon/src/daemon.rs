//! `ferryd run`: preflight (nothing changed yet), register, then reconcile
//! on store events and on a timer until SIGTERM/SIGINT. Stopping leaves
//! the datapath in place; a restarted ferryd computes the same desired state
//! and finds nothing to change.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::netlink::Netlink;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Settings;
use crate::conflist::{self, ConflistParams};
use crate::health::{self, Status};
use crate::kernel::{self, KernelError, Underlay};
use crate::overlay::{self, Local, Params};
use crate::record::{Mac, NodeRecord};
use crate::store::{Registration, Store, StoreError};

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
}

/// One reconcile pass of the kernel side.
async fn reconcile_kernel(
    s: &Settings,
    rec: &NodeRecord,
    nodes: Vec<NodeRecord>,
) -> Result<Pass, DaemonError> {
    let s = s.clone();
    let rec = rec.clone();
    blocking(move || {
        let mut nl = Netlink::open()?;
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
        let params = Params {
            device: s.vxlan_device(),
            vni: s.vni,
            port: s.vxlan_port,
            mtu: s.mtu,
            direct_routing: s.direct_routing,
            cluster: s.cluster_cidr,
        };
        let want = overlay::desired(&local, &params, &nodes);
        let acts = kernel::reconcile(&mut nl, &want, underlay.index, s.cluster_cidr, rec.subnet)?;
        for a in &acts {
            tracing::info!(action = ?a, "overlay");
        }
        let masq = crate::masq::ensure(s.masquerade, rec.subnet, s.cluster_cidr)?;
        if masq {
            tracing::info!(subnet = %rec.subnet, cluster = %s.cluster_cidr, enabled = s.masquerade, "egress masquerade rules written");
        }
        Ok(Pass {
            changes: acts.len() + masq as usize,
            peers: want.peers.len(),
            mtu: want.device.mtu,
            underlay,
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
fn publish(
    s: &Settings,
    rec: &NodeRecord,
    mtu: u32,
    ready_file: &std::path::Path,
    status: &Status,
) {
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

/// Runs until SIGTERM/SIGINT.
pub async fn run<S: Store>(
    s: Settings,
    store: S,
    underlay: Underlay,
    listener: Option<TcpListener>,
) -> Result<(), DaemonError> {
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
    let mut rec = store.register(&reg).await?;
    reg.prefer = Some(rec.subnet);
    tracing::info!(node = %rec.node, subnet = %rec.subnet, underlay = %format!("{} ({})", underlay.ip, underlay.name), vtep_mac = %rec.vtep_mac, "registered");

    if let Some(l) = listener {
        tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /healthz /readyz /metrics");
        tokio::spawn(health::serve(l, status.clone()));
    }
    // Pods on this node route through it.
    if let Err(e) = ferry::sysctl::set_net("ipv4/ip_forward", "1") {
        tracing::warn!("cannot enable ipv4 forwarding: {e}");
    }

    let renew_every = (s.lease_ttl / 3).min(Duration::from_secs(5));
    let mut renew =
        tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
    let mut full = tokio::time::interval(s.reconcile_interval);
    full.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned_bins = false;
    let mut left = false;
    let mut last_nodes: Option<Vec<NodeRecord>> = None;
    loop {
        // Reconcile.
        let t0 = Instant::now();
        // An unreachable store does not make the node unready: the kernel
        // keeps (and ferryd keeps enforcing) the last known overlay.
        let nodes = match store.nodes().await {
            Ok(n) => {
                last_nodes = Some(n.clone());
                Some(n)
            }
            Err(e) => {
                status.store_errors.fetch_add(1, Relaxed);
                tracing::warn!("reading the store: {e}; using the last known nodes");
                last_nodes.clone()
            }
        };
        let result = match nodes {
            Some(nodes) => reconcile_kernel(&s, &rec, nodes).await,
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
                if pass.changes > 0 {
                    tracing::info!(
                        changes = pass.changes,
                        peers = pass.peers,
                        took_ms = t0.elapsed().as_millis() as u64,
                        "reconciled"
                    );
                }
                if pass.underlay.ip != reg.underlay_ip {
                    tracing::warn!(old = %reg.underlay_ip, new = %pass.underlay.ip, "underlay address changed; re-registering");
                    reg.underlay_ip = pass.underlay.ip;
                    match store.register(&reg).await {
                        Ok(r) => rec = r,
                        Err(e) => tracing::warn!("re-register: {e}"),
                    }
                    continue;
                }
                let installed = plugins_installed(&s);
                if !installed && !warned_bins {
                    tracing::warn!(dir = %s.cni_bin_dir.display(), "ferry and ferry-ipam are not installed in the CNI bin dir; not ready");
                    warned_bins = true;
                }
                if installed && !left {
                    publish(&s, &rec, pass.mtu, &ready_file, &status);
                }
            }
            Err(e) => {
                status.reconcile_errors.fetch_add(1, Relaxed);
                tracing::warn!("reconcile failed: {e}");
                if status.ready.swap(false, Relaxed) {
                    tracing::warn!("node not ready");
                }
                let _ = conflist::remove_if_exists(&ready_file);
            }
        }

        // Wait for the next reason to reconcile.
        loop {
            tokio::select! {
                _ = store.changed() => {
                    // Let a burst of store writes settle into one pass.
                    // (Outside the select: a wake-up is never lost.)
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    break;
                }
                _ = full.tick() => break,
                _ = renew.tick() => {
                    if left { continue; }
                    match store.renew().await {
                        Ok(()) => continue,
                        Err(StoreError::Left(_)) => {
                            tracing::warn!("this node was marked as left in the store; no longer renewing its lease (restart ferryd to rejoin)");
                            left = true;
                            status.ready.store(false, Relaxed);
                            let _ = conflist::remove_if_exists(&ready_file);
                            continue;
                        }
                        Err(StoreError::NotRegistered(_)) => {
                            tracing::warn!("own record vanished from the store; registering again");
                            match store.register(&reg).await {
                                Ok(r) => { rec = r; break; }
                                Err(e) => { status.store_errors.fetch_add(1, Relaxed); tracing::warn!("register: {e}"); continue; }
                            }
                        }
                        Err(e) => {
                            status.store_errors.fetch_add(1, Relaxed);
                            tracing::warn!("renewing lease: {e}");
                            continue;
                        }
                    }
                }
                _ = sigterm.recv() => return stop(&ready_file, "SIGTERM"),
                _ = sigint.recv() => return stop(&ready_file, "SIGINT"),
            }
        }
    }
}

fn stop(ready_file: &std::path::Path, why: &str) -> Result<(), DaemonError> {
    let _ = conflist::remove_if_exists(ready_file);
    tracing::info!("{why}: stopping; the datapath stays in place for the next ferryd to adopt");
    Ok(())
}
