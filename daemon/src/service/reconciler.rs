//! The Services reconciler task: snapshot → plan → ruleset → one netlink
//! transaction; then stale UDP conntrack entries and the load balancers'
//! health-check node ports. It never gates pod readiness: a failing sync
//! is counted, logged and retried, and the node keeps taking pods.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::datapath::Datapath;
use super::plan::{plan, Ep, HealthCheck, Plan, Targets};
use super::render::render;
use super::Snapshot;
use crate::health::{self, Status};

/// Syncs no closer together than this: a burst of changes is one sync.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Runs until `snapshots` closes. `every`: the full resync against the
/// kernel (drift repair).
pub async fn run(
    node: String,
    every: Duration,
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    status: Arc<Status>,
) {
    let mut dp: Option<Datapath> = None;
    let mut full = true;
    let mut udp = UdpFlows::default();
    let mut checks = HealthChecks::default();
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let snap = snapshots.borrow_and_update().clone();
        if let Some(snap) = snap {
            let t0 = Instant::now();
            let p = plan(&snap, &node);
            let rs = render(&p);
            let was_full = full;
            let (back, result) = tokio::task::spawn_blocking(move || {
                let mut d = match dp {
                    Some(d) => d,
                    None => match Datapath::open() {
                        Ok(d) => d,
                        Err(e) => return (None, Err(e)),
                    },
                };
                let r = d.sync(&rs, full);
                (Some(d), r)
            })
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            dp = back;
            let sv = &status.services;
            sv.syncs.fetch_add(1, Relaxed);
            match result {
                Ok(stats) => {
                    full = false;
                    sv.ports.store(p.ports.len() as u64, Relaxed);
                    sv.endpoints.store(endpoint_count(&p) as u64, Relaxed);
                    sv.last_sync_unix.store(unix_now(), Relaxed);
                    sv.last_sync_micros
                        .store(t0.elapsed().as_micros() as u64, Relaxed);
                    if stats.requests > 0 {
                        tracing::info!(
                            ports = p.ports.len(),
                            chains = stats.chains_written,
                            deleted = stats.chains_deleted,
                            elements = stats.elements_changed,
                            rebuilt = stats.rebuilt,
                            took_ms = t0.elapsed().as_secs_f64() * 1e3,
                            "services synced"
                        );
                    }
                    udp.clean(&p, was_full).await;
                    checks.update(&p.health_checks).await;
                }
                Err(e) => {
                    // Read the kernel back next time: the failed
                    // transaction changed nothing, but we cannot tell what
                    // else did.
                    full = true;
                    if let Some(d) = dp.as_mut() {
                        d.invalidate();
                    }
                    sv.errors.fetch_add(1, Relaxed);
                    if let Ok(mut l) = sv.last_error.lock() {
                        *l = e.to_string();
                    }
                    tracing::warn!("services sync failed: {e}");
                }
            }
        }
        tokio::select! {
            r = snapshots.changed() => if r.is_err() { return },
            _ = timer.tick() => full = true,
        }
        tokio::time::sleep(MIN_INTERVAL).await;
    }
}

fn endpoint_count(p: &Plan) -> usize {
    p.ports
        .iter()
        .map(|pp| match &pp.internal {
            Targets::Endpoints(e) => e.len(),
            _ => 0,
        })
        .sum()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---- UDP conntrack ----------------------------------------------------------

/// UDP has no connection to end: a flow keeps its DNAT to a gone endpoint
/// for as long as the client keeps sending (kubernetes #125467). After each
/// sync, the entries of a UDP Service address whose endpoint is no longer
/// a target are deleted — only those: a restarted ferryd keeps every flow
/// that is still valid (kubernetes #122740).
#[derive(Default)]
struct UdpFlows {
    /// What each UDP virtual address (ClusterIP or external IP : port) was
    /// sent to after the last sync.
    last: BTreeMap<(Ipv4Addr, u16), BTreeSet<Ep>>,
}

impl UdpFlows {
    async fn clean(&mut self, p: &Plan, first: bool) {
        let mut now: BTreeMap<(Ipv4Addr, u16), BTreeSet<Ep>> = BTreeMap::new();
        for pp in p
            .ports
            .iter()
            .filter(|pp| pp.proto == nft::expr::IPPROTO_UDP)
        {
            let eps = |t: &Targets| match t {
                Targets::Endpoints(e) => e.iter().copied().collect(),
                _ => BTreeSet::new(),
            };
            for ip in &pp.cluster_ips {
                now.insert((*ip, pp.port), eps(&pp.internal));
            }
            for ip in &pp.external_ips {
                now.insert((*ip, pp.port), eps(&pp.external));
            }
        }
        // Only addresses whose targets lost a member (or all of them, once,
        // after a start: flows from before it may point anywhere).
        let work: Vec<((Ipv4Addr, u16), BTreeSet<Ep>)> = now
            .iter()
            .filter(|(k, eps)| first || self.last.get(*k).is_some_and(|old| !old.is_subset(eps)))
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        // Addresses that are gone altogether.
        let gone: Vec<(Ipv4Addr, u16)> = self
            .last
            .keys()
            .filter(|k| !now.contains_key(*k))
            .copied()
            .collect();
        self.last = now;
        if work.is_empty() && gone.is_empty() {
            return;
        }
        let r = tokio::task::spawn_blocking(move || -> std::io::Result<usize> {
            let mut n = 0;
            for (dst, eps) in work {
                let keep = eps.iter().map(|e| (e.ip, e.port)).collect();
                n += crate::conntrack::delete_stale_udp(dst, &keep)?;
            }
            for dst in gone {
                n += crate::conntrack::delete_udp_to(dst)?;
            }
            Ok(n)
        })
        .await;
        match r {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(entries = n, "stale UDP conntrack entries deleted"),
            Ok(Err(e)) => tracing::warn!("deleting stale UDP conntrack entries: {e}"),
            Err(e) => tracing::warn!("conntrack cleanup task: {e}"),
        }
    }
}

// ---- health-check node ports ------------------------------------------------

/// A load balancer asks each node, on the Service's `healthCheckNodePort`,
/// whether to send it traffic (`externalTrafficPolicy: Local`): 200 with
/// the count of local endpoints, or 503 when there is none — kube-proxy's
/// answer, so the same load balancers work.
#[derive(Default)]
struct HealthChecks {
    servers: BTreeMap<u16, (JoinHandle<()>, Arc<AtomicUsize>, String)>,
}

impl HealthChecks {
    async fn update(&mut self, checks: &[HealthCheck]) {
        let want: BTreeMap<u16, &HealthCheck> = checks.iter().map(|c| (c.node_port, c)).collect();
        self.servers.retain(|port, (task, _, _)| {
            let keep = want.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, c) in want {
            if let Some((_, count, svc)) = self.servers.get(&port) {
                if *svc == c.service {
                    count.store(c.local_endpoints, Relaxed);
                    continue;
                }
            }
            if let Some((task, _, _)) = self.servers.remove(&port) {
                task.abort();
            }
            let listener = match TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(port, service = %c.service, "health-check node port: {e}");
                    continue;
                }
            };
            let count = Arc::new(AtomicUsize::new(c.local_endpoints));
            let (ns, name) = c.service.split_once('/').unwrap_or(("default", &c.service));
            let (ns, name) = (ns.to_string(), name.to_string());
            let n = count.clone();
            let respond: health::Responder = Arc::new(move |_, _| {
                let local = n.load(Relaxed);
                let body = serde_json::json!({
                    "service": {"namespace": ns, "name": name},
                    "localEndpoints": local,
                })
                .to_string()
                    + "\n";
                let code = if local > 0 {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                (code, "application/json", body)
            });
            let task = tokio::spawn(health::serve_with(listener, respond));
            self.servers.insert(port, (task, count, c.service.clone()));
        }
    }
}
