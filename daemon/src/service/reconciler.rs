//! The Services reconciler task: snapshot → plan → ruleset → one netlink
//! transaction; then stale UDP conntrack entries and the load balancers'
//! health-check node ports. It never gates pod readiness: a failing sync
//! is counted, logged and retried, and the node keeps taking pods.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::datapath::Datapath;
use super::plan::{plan_service, Ep, HealthCheck, Plan, Targets};
use super::render::{render, Changes, Desired, Ruleset};
use super::state::State;
use crate::health::{self, Status};

/// A sync that changed more elements than this (a full one, or a load of
/// thousands of Services) gives the memory it freed back to the kernel.
const TRIM_AFTER: usize = 10_000;

/// Syncs no closer together than this: a burst of changes is one sync.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// A UDP virtual address (ClusterIP or external IP : port) and the
/// endpoints it is sent to.
type UdpTargets = Vec<((Ipv4Addr, u16), BTreeSet<Ep>)>;

/// What the reconciler counts of one Service's plan.
#[derive(Debug, Default)]
struct Planned {
    ports: usize,
    endpoints: usize,
    udp: UdpTargets,
    health: Option<HealthCheck>,
}

/// The incremental half of the reconciler (pure): from the last state it
/// planned to the next, which Services changed (themselves or a slice
/// naming them), what they contributed before and contribute now, and the
/// kernel's changes. What a Service contributed before is planned and
/// rendered again from the state it was planned from: cheaper in memory
/// than keeping 10k rulesets, and the same by construction.
#[derive(Default)]
struct Planner {
    node: String,
    seen: State,
    /// Service key → the slices whose label names it (the Service may not
    /// exist yet).
    slices_of: HashMap<String, Vec<String>>,
    desired: Desired,
    ports: usize,
    endpoints: usize,
    /// The Services with UDP ports, and where their addresses are sent.
    udp_of: HashMap<String, UdpTargets>,
    health: BTreeMap<String, HealthCheck>,
}

/// What one step changed beyond the ruleset.
#[derive(Debug, Default)]
struct Step {
    changes: Changes,
    /// UDP addresses whose targets lost a member.
    udp_changed: UdpTargets,
    /// UDP addresses no Service has any more.
    udp_gone: Vec<(Ipv4Addr, u16)>,
    health_changed: bool,
}

impl Planner {
    fn new(node: String) -> Planner {
        Planner {
            node,
            ..Planner::default()
        }
    }

    /// Service `key` as planned from `state` with the slice index as it is.
    fn render(&self, state: &State, key: &str) -> (Ruleset, Planned) {
        let Some(svc) = state.services.get(key) else {
            return Default::default();
        };
        let slices: Vec<_> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|s| state.slices.get(s).map(|s| &**s))
            .collect();
        let (ports, health) = plan_service(key, svc, &slices, &self.node);
        let plan = Plan {
            ports,
            health_checks: Vec::new(),
        };
        let p = Planned {
            ports: plan.ports.len(),
            endpoints: endpoint_count(&plan),
            udp: udp_targets(&plan),
            health,
        };
        (render(&plan), p)
    }

    fn step(&mut self, state: &State) -> Step {
        let mut affected: BTreeSet<String> = state
            .services
            .changed_since(&self.seen.services)
            .into_iter()
            .collect();
        let mut moves = Vec::new();
        for k in state.slices.changed_since(&self.seen.slices) {
            let old = self.seen.slices.get(&k).and_then(|s| s.service.clone());
            let new = state.slices.get(&k).and_then(|s| s.service.clone());
            affected.extend(old.iter().chain(&new).cloned());
            moves.push((k, old, new));
        }
        let seen = std::mem::replace(&mut self.seen, state.clone());
        let olds: Vec<(Ruleset, Planned)> =
            affected.iter().map(|k| self.render(&seen, k)).collect();
        for (k, old, new) in moves {
            if let Some(o) = old {
                if let Some(v) = self.slices_of.get_mut(&o) {
                    v.retain(|s| *s != k);
                    if v.is_empty() {
                        self.slices_of.remove(&o);
                    }
                }
            }
            if let Some(n) = new {
                let v = self.slices_of.entry(n).or_default();
                if !v.contains(&k) {
                    v.push(k);
                }
            }
        }
        let mut step = Step::default();
        let mut batch = Vec::with_capacity(affected.len());
        let mut udp_before: BTreeMap<(Ipv4Addr, u16), BTreeSet<Ep>> = BTreeMap::new();
        let mut udp_after: BTreeMap<(Ipv4Addr, u16), BTreeSet<Ep>> = BTreeMap::new();
        for (key, (old_rs, old)) in affected.into_iter().zip(olds) {
            let (new_rs, new) = self.render(state, &key);
            self.ports = self.ports + new.ports - old.ports;
            self.endpoints = self.endpoints + new.endpoints - old.endpoints;
            udp_before.extend(old.udp);
            udp_after.extend(new.udp.iter().cloned());
            if new.udp.is_empty() {
                self.udp_of.remove(&key);
            } else {
                self.udp_of.insert(key.clone(), new.udp);
            }
            if old.health != new.health {
                step.health_changed = true;
                match new.health {
                    Some(h) => self.health.insert(key.clone(), h),
                    None => self.health.remove(&key),
                };
            }
            batch.push((key, old_rs, new_rs));
        }
        step.changes = self.desired.update(batch);
        for (addr, eps) in &udp_after {
            if udp_before.get(addr).is_some_and(|old| !old.is_subset(eps)) {
                step.udp_changed.push((*addr, eps.clone()));
            }
        }
        step.udp_gone = udp_before
            .keys()
            .filter(|a| !udp_after.contains_key(*a))
            .copied()
            .collect();
        self.drop_held(&mut step.udp_gone);
        step
    }

    /// Keeps of `gone` the UDP addresses no Service has now: another
    /// Service may still send one somewhere (an external IP two Services
    /// share), and its flows stay.
    fn drop_held(&self, gone: &mut Vec<(Ipv4Addr, u16)>) {
        if gone.is_empty() {
            return;
        }
        let held: BTreeSet<(Ipv4Addr, u16)> = self
            .udp_of
            .values()
            .flat_map(|u| u.iter().map(|(a, _)| *a))
            .collect();
        gone.retain(|a| !held.contains(a));
        gone.sort_unstable();
        gone.dedup();
    }

    /// Every UDP address and its targets (after a start or a full sync:
    /// flows from before it may point anywhere).
    fn all_udp(&self) -> UdpTargets {
        self.udp_of.values().flatten().cloned().collect()
    }
}

/// Runs until `snapshots` closes. `every`: the full resync against the
/// kernel (drift repair). A change is planned and rendered for the
/// Services it touches only, and applied as the element-level changes it
/// makes; at start, on the timer and after a failure the kernel is read
/// and compared with the whole desired state.
pub async fn run(
    node: String,
    every: Duration,
    mut snapshots: watch::Receiver<Option<State>>,
    status: Arc<Status>,
) {
    let mut dp: Option<Datapath> = None;
    let mut full = true;
    let mut planner = Some(Planner::new(node));
    let mut checks = HealthChecks::default();
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the last sync that wrote anything started.
    let mut last_write = tokio::time::Instant::now();
    // UDP addresses that went in steps whose sync failed: the full sync
    // after a failure cleans the addresses that remain, not these.
    let mut gone_unsynced: Vec<(Ipv4Addr, u16)> = Vec::new();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        if let Some(snap) = snap {
            let started = tokio::time::Instant::now();
            let t0 = Instant::now();
            let was_full = full;
            let mut pl = planner.take().expect("returned after each sync");
            // Planning is CPU work on the whole state at start (10k
            // Services): off the runtime's threads, with the sync.
            let (back, pl_back, step, result) = tokio::task::spawn_blocking(move || {
                let step = pl.step(&snap);
                let mut d = match dp {
                    Some(d) => d,
                    None => match Datapath::open() {
                        Ok(d) => d,
                        Err(e) => return (None, pl, step, Err(e)),
                    },
                };
                let r = if full {
                    let r = d.sync(&pl.desired, true);
                    // The planner keeps the desired state; a copy of it
                    // in the datapath would double ferryd's memory.
                    d.drop_written();
                    r
                } else {
                    d.apply(&step.changes, &pl.desired)
                };
                if full || step.changes.elements() > TRIM_AFTER {
                    release_free_memory();
                }
                (Some(d), pl, step, r)
            })
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            dp = back;
            planner = Some(pl_back);
            let pl = planner.as_ref().expect("just set");
            let sv = &status.services;
            sv.syncs.fetch_add(1, Relaxed);
            gone_unsynced.extend(step.udp_gone);
            match result {
                Ok(stats) => {
                    full = false;
                    sv.ports.store(pl.ports as u64, Relaxed);
                    sv.endpoints.store(pl.endpoints as u64, Relaxed);
                    sv.last_sync_unix.store(unix_now(), Relaxed);
                    sv.last_sync_micros
                        .store(t0.elapsed().as_micros() as u64, Relaxed);
                    if stats.requests > 0 {
                        last_write = started;
                        tracing::info!(
                            ports = pl.ports,
                            chains = stats.chains_written,
                            deleted = stats.chains_deleted,
                            elements = stats.elements_changed,
                            rebuilt = stats.rebuilt,
                            took_ms = t0.elapsed().as_secs_f64() * 1e3,
                            "services synced"
                        );
                    }
                    let work = if was_full {
                        pl.all_udp()
                    } else {
                        step.udp_changed
                    };
                    let mut gone = std::mem::take(&mut gone_unsynced);
                    pl.drop_held(&mut gone);
                    clean_udp(work, gone).await;
                    if step.health_changed || was_full {
                        let all: Vec<HealthCheck> = pl.health.values().cloned().collect();
                        checks.update(&all).await;
                    }
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
        // A burst of changes is one sync; a change after a quiet spell, or
        // after a step that wrote nothing (a slice that lands before its
        // Service), is synced at once.
        tokio::time::sleep_until(last_write + MIN_INTERVAL).await;
    }
}

/// A full sync at 10k Services allocates and frees tens of MiB (the
/// kernel's state read back, the transaction's messages); the allocator
/// keeps freed pages in its arenas. Give them back.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
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

/// The UDP virtual addresses of `p` and where each is sent.
fn udp_targets(p: &Plan) -> UdpTargets {
    let mut out = Vec::new();
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
            out.push(((*ip, pp.port), eps(&pp.internal)));
        }
        for ip in &pp.external_ips {
            out.push(((*ip, pp.port), eps(&pp.external)));
        }
    }
    out
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
/// that is still valid (kubernetes #122740). `work`: the addresses whose
/// targets lost a member (all of them after a full sync); `gone`: the
/// addresses no Service has any more.
async fn clean_udp(work: UdpTargets, gone: Vec<(Ipv4Addr, u16)>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::plan::plan_state;
    use crate::service::render::View;
    use crate::service::Snapshot;

    fn state(yaml: &str) -> State {
        State::of(&Snapshot::from_documents(yaml).unwrap())
    }

    fn svc(name: &str, ip: &str, proto: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{clusterIP: {ip}, ports: [{{name: p, port: 53, protocol: {proto}, targetPort: 5353}}]}}\n"
        )
    }

    fn slice(name: &str, svc: &str, ips: &[&str]) -> String {
        let eps: Vec<String> = ips
            .iter()
            .map(|i| format!("{{addresses: [{i}], nodeName: n1}}"))
            .collect();
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
             addressType: IPv4\nendpoints: [{}]\n",
            eps.join(", ")
        )
    }

    /// Whatever order states come in, the planner holds what planning the
    /// whole state would give, and touches only the Services that changed.
    #[test]
    fn steps_give_the_whole_plan() {
        let steps = [
            svc("a", "10.96.0.1", "UDP") + &slice("a-1", "a", &["10.244.1.5"]),
            // A slice for a Service that does not exist yet, then the Service.
            svc("a", "10.96.0.1", "UDP")
                + &slice("a-1", "a", &["10.244.1.5"])
                + &slice("b-1", "b", &["10.244.1.6"]),
            svc("a", "10.96.0.1", "UDP")
                + &svc("b", "10.96.0.2", "TCP")
                + &slice("a-1", "a", &["10.244.1.5"])
                + &slice("b-1", "b", &["10.244.1.6"]),
            // An endpoint of a replaced: UDP flows to the old one go.
            svc("a", "10.96.0.1", "UDP")
                + &svc("b", "10.96.0.2", "TCP")
                + &slice("a-1", "a", &["10.244.1.7"])
                + &slice("b-1", "b", &["10.244.1.6"]),
            // The slice moves to b; a has none.
            svc("a", "10.96.0.1", "UDP")
                + &svc("b", "10.96.0.2", "TCP")
                + &slice("a-1", "b", &["10.244.1.7"])
                + &slice("b-1", "b", &["10.244.1.6"]),
            // a goes.
            svc("b", "10.96.0.2", "TCP") + &slice("b-1", "b", &["10.244.1.6"]),
        ];
        let mut pl = Planner::new("n1".into());
        let mut touched = Vec::new();
        let mut udp = Vec::new();
        for yaml in &steps {
            let s = state(yaml);
            let step = pl.step(&s);
            let whole = render(&plan_state(&s, "n1"));
            assert_eq!(pl.desired.written(), whole.written(), "{yaml}");
            touched.push(step.changes.elements() + step.changes.write_chains.len());
            udp.push((step.udp_changed.len(), step.udp_gone.len()));
            assert_eq!(pl.ports, plan_state(&s, "n1").ports.len());
            // The same state again: nothing to do.
            let again = pl.step(&s);
            assert!(again.changes.is_empty(), "{again:?}");
        }
        // Step 2 only added a slice of a Service not there: nothing.
        assert_eq!(touched[1], 0);
        assert_eq!(udp[3], (1, 0), "a's endpoint replaced");
        assert_eq!(udp[5], (0, 1), "a's address gone");
    }

    /// An address that went in a step whose sync failed is cleaned after
    /// the next sync that works, unless a Service has it again by then.
    #[test]
    fn gone_addresses_wait_for_a_sync_and_stay_when_held_again() {
        let with_a = svc("a", "10.96.0.1", "UDP") + &slice("a-1", "a", &["10.244.1.5"]);
        let without_a = svc("b", "10.96.0.2", "UDP");
        let addr = (Ipv4Addr::new(10, 96, 0, 1), 53);
        let mut pl = Planner::new("n1".into());
        pl.step(&state(&with_a));
        let gone = pl.step(&state(&without_a)).udp_gone;
        assert_eq!(gone, vec![addr]);
        let mut later = gone.clone();
        pl.step(&state(&(without_a.clone() + &svc("c", "10.96.0.3", "TCP"))));
        pl.drop_held(&mut later);
        assert_eq!(later, vec![addr], "still gone after an unrelated step");
        pl.step(&state(&with_a));
        let mut back = gone;
        pl.drop_held(&mut back);
        assert!(back.is_empty(), "a has its address again: {back:?}");
    }
}
