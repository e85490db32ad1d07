//! Which endpoints serve which traffic on this node: Services and
//! EndpointSlices in, one [`PortPlan`] per Service port out. Pure.
//!
//! The rules are kube-proxy's:
//! - an endpoint counts when it is ready; when none is, the serving ones
//!   that are terminating take over (so a rolling update drops nothing);
//!   never one that is not serving;
//! - `internalTrafficPolicy: Local` limits traffic to ClusterIPs to this
//!   node's endpoints, `externalTrafficPolicy: Local` does the same for
//!   NodePorts, externalIPs and load-balancer IPs (and keeps the client
//!   address: no masquerade);
//! - headless Services (`clusterIP: None`) and `type: ExternalName` get
//!   nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::state::{EndpointSpec, SliceSpec, State, SvcPort, SvcSpec};
use super::Snapshot;

/// One endpoint address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ep {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// Which endpoints a kind of traffic goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// Spread over these (never empty).
    Endpoints(Vec<Ep>),
    /// The Service has no usable endpoint at all: refuse at once.
    Reject,
    /// Endpoints exist, but a Local policy leaves none on this node.
    Drop,
}

/// Everything the datapath needs about one port of one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    /// `<namespace>/<name>:<port name>:<protocol>`: what chain names hash.
    pub id: String,
    /// IPPROTO_TCP, _UDP or _SCTP.
    pub proto: u8,
    pub port: u16,
    pub cluster_ips: Vec<Ipv4Addr>,
    /// `spec.externalIPs` and `status.loadBalancer.ingress[].ip`.
    pub external_ips: Vec<Ipv4Addr>,
    pub node_port: Option<u16>,
    /// ClientIP affinity and its timeout in seconds.
    pub affinity: Option<u32>,
    /// Traffic to the ClusterIPs.
    pub internal: Targets,
    /// Traffic to node ports and external addresses.
    pub external: Targets,
    /// `externalTrafficPolicy: Local`: external traffic keeps its source.
    pub external_local: bool,
    /// Endpoints on this node (hairpin candidates), whatever the policy.
    pub local: Vec<Ep>,
}

/// A load balancer's health check: a node port answering with the count of
/// this node's endpoints (`externalTrafficPolicy: Local`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: String,
    pub node_port: u16,
    pub local_endpoints: usize,
}

/// The whole plan for this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub ports: Vec<PortPlan>,
    pub health_checks: Vec<HealthCheck>,
}

/// Kubernetes' default ClientIP affinity timeout: 3 hours.
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

pub fn proto_number(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(nft::expr::IPPROTO_TCP),
        "UDP" => Some(nft::expr::IPPROTO_UDP),
        "SCTP" => Some(nft::expr::IPPROTO_SCTP),
        _ => None,
    }
}

/// The plan of `node` for everything in `snap` (tests and tools; ferryd
/// plans one Service at a time, [`plan_service`]).
pub fn plan(snap: &Snapshot, node: &str) -> Plan {
    plan_state(&State::of(snap), node)
}

/// The plan of `node` for everything in `state`, Services in key order.
pub fn plan_state(state: &State, node: &str) -> Plan {
    let mut slices: BTreeMap<&str, Vec<&SliceSpec>> = BTreeMap::new();
    for (_, s) in state.slices.iter() {
        if let Some(svc) = &s.service {
            slices.entry(svc).or_default().push(s);
        }
    }
    let mut services: Vec<(&String, &SvcSpec)> =
        state.services.iter().map(|(k, v)| (k, &**v)).collect();
    services.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = Plan::default();
    for (key, svc) in services {
        let own = slices.get(key.as_str()).map_or(&[][..], Vec::as_slice);
        let (ports, hc) = plan_service(key, svc, own, node);
        out.ports.extend(ports);
        out.health_checks.extend(hc);
    }
    out
}

/// The plan of `node` for one Service (`key` is its `namespace/name`) and
/// the slices that name it: its ports, and its health check if it has one.
pub fn plan_service(
    key: &str,
    svc: &SvcSpec,
    slices: &[&SliceSpec],
    node: &str,
) -> (Vec<PortPlan>, Option<HealthCheck>) {
    let mut ports = Vec::new();
    if svc.external_name || svc.cluster_ips.is_empty() {
        // ExternalName, or headless (or not yet allocated): no virtual IP
        // to program.
        return (ports, None);
    }
    let mut local_total = BTreeSet::new();
    for p in &svc.ports {
        let eps = endpoints_for(p, slices);
        let all = usable(&eps, |_| true);
        let local = usable(&eps, |e| e.node.as_deref() == Some(node));
        local_total.extend(local.iter().copied());
        let targets = |local_only: bool| {
            let chosen = if local_only { &local } else { &all };
            match (chosen.is_empty(), all.is_empty()) {
                (false, _) => Targets::Endpoints(chosen.clone()),
                (true, true) => Targets::Reject,
                (true, false) => Targets::Drop,
            }
        };
        ports.push(PortPlan {
            id: format!("{key}:{}:{}", p.name, proto_name(p.proto)),
            proto: p.proto,
            port: p.port,
            cluster_ips: svc.cluster_ips.clone(),
            external_ips: svc.external_ips.clone(),
            node_port: p.node_port.filter(|_| svc.node_ports),
            affinity: svc.affinity,
            internal: targets(svc.itp_local),
            external: targets(svc.etp_local),
            external_local: svc.etp_local,
            local: eps
                .iter()
                .filter(|(e, _)| e.node.as_deref() == Some(node))
                .map(|(_, ep)| *ep)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        });
    }
    let hc = svc.health_check.map(|node_port| HealthCheck {
        service: key.to_string(),
        node_port,
        local_endpoints: local_total
            .iter()
            .map(|e: &Ep| e.ip)
            .collect::<BTreeSet<_>>()
            .len(),
    });
    (ports, hc)
}

fn proto_name(p: u8) -> &'static str {
    match p {
        nft::expr::IPPROTO_UDP => "UDP",
        nft::expr::IPPROTO_SCTP => "SCTP",
        _ => "TCP",
    }
}

/// The endpoints of the slices for Service port `p`, each with the slice
/// entry it came from. The slice port is the one with the Service port's
/// name and protocol (the endpoints controller resolved `targetPort`); a
/// slice without ports uses a numeric `targetPort`, or the port itself.
fn endpoints_for<'a>(p: &SvcPort, slices: &[&'a SliceSpec]) -> Vec<(&'a EndpointSpec, Ep)> {
    let mut out = Vec::new();
    for s in slices {
        let port = if s.ports.is_empty() {
            p.fallback
        } else {
            s.ports
                .iter()
                .find(|sp| sp.name == p.name && sp.proto == Some(p.proto))
                .and_then(|sp| sp.port)
        };
        let Some(port) = port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0) else {
            continue;
        };
        for e in &s.endpoints {
            out.push((e, Ep { ip: e.ip, port }));
        }
    }
    out
}

/// Ready endpoints passing `keep`; if none, the serving terminating ones.
/// Sorted and without duplicates (an address may be in two slices).
fn usable(eps: &[(&EndpointSpec, Ep)], keep: impl Fn(&EndpointSpec) -> bool) -> Vec<Ep> {
    let cond = |e: &EndpointSpec| (e.ready && !e.terminating, e.serving && e.terminating);
    let pick = |want: fn((bool, bool)) -> bool| -> Vec<Ep> {
        eps.iter()
            .filter(|(e, _)| keep(e) && want(cond(e)))
            .map(|(_, ep)| *ep)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let ready = pick(|(r, _)| r);
    if ready.is_empty() {
        pick(|(_, t)| t)
    } else {
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(yaml: &str) -> Snapshot {
        Snapshot::from_documents(yaml).unwrap()
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
  externalTrafficPolicy: Local
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node1}
- {addresses: [10.244.2.5], nodeName: node2}
- {addresses: [10.244.2.6], nodeName: node2, conditions: {ready: false}}
- {addresses: [10.244.2.7], nodeName: node2, conditions: {ready: false, serving: true, terminating: true}}
"#;

    fn ep(s: &str, port: u16) -> Ep {
        Ep {
            ip: s.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn ready_endpoints_and_local_policy() {
        let p = plan(&snap(WEB), "node1");
        assert_eq!(p.ports.len(), 1);
        let web = &p.ports[0];
        assert_eq!(web.id, "default/web:http:TCP");
        assert_eq!(web.node_port, Some(30080));
        assert_eq!(
            web.internal,
            Targets::Endpoints(vec![ep("10.244.1.5", 8080), ep("10.244.2.5", 8080)])
        );
        assert_eq!(
            web.external,
            Targets::Endpoints(vec![ep("10.244.1.5", 8080)])
        );
        assert!(web.external_local);
        // node3 has none of its own: external traffic is dropped there.
        assert_eq!(plan(&snap(WEB), "node3").ports[0].external, Targets::Drop);
    }

    #[test]
    fn terminating_serving_endpoints_take_over_when_none_is_ready() {
        let yaml = WEB
            .replace("- {addresses: [10.244.1.5], nodeName: node1}\n", "")
            .replace("- {addresses: [10.244.2.5], nodeName: node2}\n", "");
        let p = plan(&snap(&yaml), "node1");
        assert_eq!(
            p.ports[0].internal,
            Targets::Endpoints(vec![ep("10.244.2.7", 8080)])
        );
        // Not serving at all: nothing left, refuse.
        let yaml = yaml.replace("serving: true", "serving: false");
        assert_eq!(
            plan(&snap(&yaml), "node1").ports[0].internal,
            Targets::Reject
        );
    }

    #[test]
    fn no_slice_means_reject_and_headless_means_nothing() {
        let svc_only = WEB.split("---").next().unwrap();
        let p = plan(&snap(svc_only), "node1");
        assert_eq!(p.ports[0].internal, Targets::Reject);
        assert_eq!(p.ports[0].external, Targets::Reject);
        let headless = svc_only.replace("clusterIP: 10.96.0.10", "clusterIP: None");
        assert!(plan(&snap(&headless), "node1").ports.is_empty());
    }

    #[test]
    fn slice_port_by_name_and_fallback_to_target_port() {
        let yaml = WEB.replace("ports: [{name: http, port: 8080}]\n", "");
        let p = plan(&snap(&yaml), "node1");
        // No slice ports: the numeric targetPort.
        assert_eq!(
            p.ports[0].internal,
            Targets::Endpoints(vec![ep("10.244.1.5", 8080), ep("10.244.2.5", 8080)])
        );
        let other = WEB.replace(
            "ports: [{name: http, port: 8080}]",
            "ports: [{name: metrics, port: 9090}]",
        );
        assert_eq!(
            plan(&snap(&other), "node1").ports[0].internal,
            Targets::Reject
        );
    }

    #[test]
    fn affinity_timeout_default_and_explicit() {
        let a = WEB.replace(
            "  externalTrafficPolicy: Local\n",
            "  sessionAffinity: ClientIP\n",
        );
        assert_eq!(
            plan(&snap(&a), "n").ports[0].affinity,
            Some(DEFAULT_AFFINITY_SECONDS)
        );
        let b = a.replace(
            "  sessionAffinity: ClientIP\n",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
        );
        assert_eq!(plan(&snap(&b), "n").ports[0].affinity, Some(60));
        assert_eq!(plan(&snap(WEB), "n").ports[0].affinity, None);
    }
}
