//! ClusterIP and NodePort allocation, as the API server does it, against
//! what the store already holds. Pure: the store calls it under its lock (file
//! store) or inside a compare-and-swap loop (etcd), so two `ferryctl apply`
//! at once can never hand out one address twice.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Service;

use super::model::{key, protocol};

/// Where addresses and ports come from (`--service-cidr`, `--nodeport-range`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranges {
    pub service_cidr: Ipv4Network,
    pub node_ports: RangeInclusive<u16>,
}

impl Default for Ranges {
    fn default() -> Self {
        Ranges {
            service_cidr: "10.96.0.0/12".parse().expect("valid"),
            node_ports: 30000..=32767,
        }
    }
}

impl Ranges {
    /// Checked ranges: `service_cidr` without host bits and with room for at
    /// least two Services (the network and broadcast addresses are never
    /// handed out), `node_ports` as `A-B` with 1 <= A <= B <= 65535.
    /// The message names the offending value, not a flag: the caller knows
    /// whether it came from a flag or from the store.
    pub fn new(service_cidr: Ipv4Network, node_ports: &str) -> Result<Ranges, String> {
        if service_cidr.ip() != service_cidr.network() {
            return Err(format!(
                "service CIDR {service_cidr}: host bits set (did you mean {}/{}?)",
                service_cidr.network(),
                service_cidr.prefix()
            ));
        }
        if service_cidr.prefix() > 30 {
            return Err(format!(
                "service CIDR {service_cidr}: too small, at most /30"
            ));
        }
        Ok(Ranges {
            service_cidr,
            node_ports: parse_node_ports(node_ports)?,
        })
    }

    /// `30000-32767`, as `--nodeport-range` spells it.
    pub fn node_ports_text(&self) -> String {
        format!("{}-{}", self.node_ports.start(), self.node_ports.end())
    }
}

impl fmt::Display for Ranges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "service CIDR {}, node-port range {}",
            self.service_cidr,
            self.node_ports_text()
        )
    }
}

/// `A-B` → `A..=B`; both within 1..=65535 and A <= B.
pub fn parse_node_ports(s: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || format!("node-port range {s:?}: expected FIRST-LAST, e.g. 30000-32767");
    let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
    // Parsed wider than u16 so that 70000 is "outside 1..=65535", not "bad".
    let a: u32 = a.trim().parse().map_err(|_| bad())?;
    let b: u32 = b.trim().parse().map_err(|_| bad())?;
    for n in [a, b] {
        if !(1..=65535).contains(&n) {
            return Err(format!(
                "node-port range {s:?}: port {n} is outside 1..=65535"
            ));
        }
    }
    if a > b {
        return Err(format!(
            "node-port range {s:?}: {a} is above {b} (the range is inverted)"
        ));
    }
    Ok(a as u16..=b as u16)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("Service {svc}: spec.clusterIP {ip} is outside the service CIDR {cidr}")]
    OutsideCidr {
        svc: String,
        ip: String,
        cidr: Ipv4Network,
    },
    #[error("Service {svc}: spec.clusterIP {ip} is already taken by Service {owner}")]
    IpTaken {
        svc: String,
        ip: IpAddr,
        owner: String,
    },
    #[error("Service {svc}: spec.clusterIP is immutable ({old} cannot become {new})")]
    Immutable {
        svc: String,
        old: String,
        new: String,
    },
    #[error("Service {svc}: {field} {port} is outside the node-port range {lo}-{hi}")]
    OutsideRange {
        svc: String,
        /// `spec.ports[i].nodePort` or `spec.healthCheckNodePort`.
        field: String,
        port: i32,
        lo: u16,
        hi: u16,
    },
    #[error("Service {svc}: {field} {port} is already taken by Service {owner}")]
    PortTaken {
        svc: String,
        field: String,
        port: i32,
        owner: String,
    },
    #[error("the service CIDR {0} has no free address left")]
    NoAddress(Ipv4Network),
    #[error("the node-port range {lo}-{hi} has no free port left")]
    NoPort { lo: u16, hi: u16 },
}

fn svc_key(s: &Service) -> String {
    key(
        s.metadata.namespace.as_deref(),
        s.metadata.name.as_deref().unwrap_or(""),
    )
}

/// The ClusterIP the API would serve, if any ("None" = headless).
fn cluster_ip(s: &Service) -> Option<&str> {
    let spec = s.spec.as_ref()?;
    spec.cluster_ip
        .as_deref()
        .or_else(|| spec.cluster_ips.as_ref()?.first().map(String::as_str))
        .filter(|ip| !ip.is_empty())
}

fn wants_cluster_ip(s: &Service) -> bool {
    let spec = s.spec.as_ref();
    spec.and_then(|s| s.type_.as_deref()) != Some("ExternalName") && cluster_ip(s) != Some("None")
}

/// Whether missing node ports are allocated: NodePort always, LoadBalancer
/// unless `allocateLoadBalancerNodePorts: false` (as the API server does).
fn wants_node_ports(s: &Service) -> bool {
    let spec = s.spec.as_ref();
    match spec.and_then(|s| s.type_.as_deref()) {
        Some("NodePort") => true,
        Some("LoadBalancer") => {
            spec.and_then(|s| s.allocate_load_balancer_node_ports) != Some(false)
        }
        _ => false,
    }
}

/// A LoadBalancer with `externalTrafficPolicy: Local` gets a health-check
/// node port, where load balancers ask which nodes have local endpoints.
pub fn wants_health_check_port(s: &Service) -> bool {
    let spec = s.spec.as_ref();
    spec.and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
        && spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local")
}

fn health_check_port(s: &Service) -> Option<i32> {
    s.spec.as_ref()?.health_check_node_port
}

/// Which addresses and node ports the stored Services hold, and which
/// Service holds each: all that allocation needs of the Services it is not
/// given, so that a store can keep it as an index instead of reading every
/// Service for every apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Taken {
    pub ips: BTreeMap<IpAddr, String>,
    /// Node ports and health-check node ports.
    pub ports: BTreeMap<i32, String>,
}

impl Taken {
    /// What `services` (keyed by `namespace/name`) hold.
    pub fn of(services: &BTreeMap<String, Service>) -> Taken {
        let mut t = Taken::default();
        for (k, s) in services {
            t.add(k, s);
        }
        t
    }

    fn add(&mut self, k: &str, s: &Service) {
        if let Some(ip) = cluster_ip(s).and_then(|ip| ip.parse().ok()) {
            self.ips.insert(ip, k.to_string());
        }
        for p in s.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            if let Some(n) = p.node_port {
                self.ports.insert(n, k.to_string());
            }
        }
        if let Some(n) = health_check_port(s) {
            self.ports.insert(n, k.to_string());
        }
    }

    /// Drops what the Services `keys` hold.
    pub fn release(&mut self, keys: &BTreeSet<String>) {
        self.ips.retain(|_, k| !keys.contains(k));
        self.ports.retain(|_, k| !keys.contains(k));
    }

    /// Records that each Service of `services` (keyed by `namespace/name`)
    /// is now as given: what it held before is released first. One pass
    /// over what is held, however many Services.
    pub fn replace<'a>(&mut self, services: impl IntoIterator<Item = (String, &'a Service)>) {
        let services: Vec<(String, &Service)> = services.into_iter().collect();
        self.release(&services.iter().map(|(k, _)| k.clone()).collect());
        for (k, s) in services {
            self.add(&k, s);
        }
    }
}

/// Fills in a missing `clusterIP` (and `clusterIPs`, `ipFamilies`) and missing
/// `nodePort`s of `incoming`, refusing what the API server refuses. A Service
/// that exists already keeps what it was given; `existing` is keyed by
/// `namespace/name`. On error nothing of `incoming` is to be written.
pub fn assign(
    incoming: &mut [Service],
    existing: &BTreeMap<String, Service>,
    r: &Ranges,
) -> Result<(), AllocError> {
    assign_with(incoming, existing, Taken::of(existing), r)
}

/// [`assign`] given what every stored Service holds (`taken`) and the
/// stored versions of (at least) the `incoming` Services (`existing`).
pub fn assign_with(
    incoming: &mut [Service],
    existing: &BTreeMap<String, Service>,
    mut taken: Taken,
    r: &Ranges,
) -> Result<(), AllocError> {
    let replaced: BTreeSet<String> = incoming.iter().map(svc_key).collect();
    // Held by Services that stay as they are.
    taken.release(&replaced);
    let Taken { mut ips, mut ports } = taken;
    let in_range =
        |n: i32| (i32::from(*r.node_ports.start())..=i32::from(*r.node_ports.end())).contains(&n);
    let outside = |svc: &str, field: String, port: i32| AllocError::OutsideRange {
        svc: svc.to_string(),
        field,
        port,
        lo: *r.node_ports.start(),
        hi: *r.node_ports.end(),
    };
    // Explicit values first, so that an automatic pick of an earlier Service
    // in the file never takes what a later one asks for.
    for s in incoming.iter() {
        let k = svc_key(s);
        if let Some(ip) = cluster_ip(s).filter(|_| wants_cluster_ip(s)) {
            let parsed: IpAddr = ip.parse().map_err(|_| AllocError::OutsideCidr {
                svc: k.clone(),
                ip: ip.into(),
                cidr: r.service_cidr,
            })?;
            let old = existing.get(&k).and_then(cluster_ip);
            if let Some(old) = old.filter(|o| *o != ip) {
                return Err(AllocError::Immutable {
                    svc: k,
                    old: old.into(),
                    new: ip.into(),
                });
            }
            let inside = matches!(parsed, IpAddr::V4(v4) if r.service_cidr.contains(v4));
            if !inside {
                return Err(AllocError::OutsideCidr {
                    svc: k,
                    ip: ip.into(),
                    cidr: r.service_cidr,
                });
            }
            if let Some(owner) = ips.insert(parsed, k.clone()) {
                return Err(AllocError::IpTaken {
                    svc: k,
                    ip: parsed,
                    owner,
                });
            }
        }
        for (i, p) in s
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .enumerate()
        {
            let Some(n) = p.node_port else { continue };
            let field = format!("spec.ports[{i}].nodePort");
            if !in_range(n) {
                return Err(outside(&k, field, n));
            }
            match ports.insert(n, k.clone()) {
                // One Service may use one node port for TCP and UDP.
                Some(owner) if owner != k => {
                    return Err(AllocError::PortTaken {
                        svc: k,
                        field,
                        port: n,
                        owner,
                    })
                }
                _ => {}
            }
        }
        if let Some(n) = health_check_port(s) {
            let field = "spec.healthCheckNodePort".to_string();
            if !in_range(n) {
                return Err(outside(&k, field, n));
            }
            // Never shared, not even with the Service's own node ports: it
            // answers HTTP, they forward traffic.
            if let Some(owner) = ports.insert(n, k.clone()) {
                return Err(AllocError::PortTaken {
                    svc: k,
                    field,
                    port: n,
                    owner,
                });
            }
        }
    }
    for s in incoming.iter_mut() {
        let k = svc_key(s);
        let old = existing.get(&k);
        if wants_cluster_ip(s) && cluster_ip(s).is_none() {
            let ip = match old.and_then(cluster_ip).and_then(|ip| ip.parse().ok()) {
                Some(ip) => ip,
                None => {
                    free_ip(r.service_cidr, &ips).ok_or(AllocError::NoAddress(r.service_cidr))?
                }
            };
            ips.insert(ip, k.clone());
            let spec = s.spec.get_or_insert_with(Default::default);
            spec.cluster_ip = Some(ip.to_string());
            spec.cluster_ips = Some(vec![ip.to_string()]);
            spec.ip_families = Some(vec!["IPv4".into()]);
        }
        let no_port = || AllocError::NoPort {
            lo: *r.node_ports.start(),
            hi: *r.node_ports.end(),
        };
        if wants_node_ports(s) {
            let old_ports: Vec<_> = old
                .and_then(|o| o.spec.as_ref())
                .and_then(|s| s.ports.clone())
                .unwrap_or_default();
            let own_health = health_check_port(s);
            let spec = s.spec.get_or_insert_with(Default::default);
            for p in spec.ports.iter_mut().flatten() {
                if p.node_port.is_some() {
                    continue;
                }
                // The same port of the same Service keeps its node port,
                // unless this document gives it to the health check.
                let kept = old_ports
                    .iter()
                    .find(|o| o.port == p.port && protocol(o) == protocol(p))
                    .and_then(|o| o.node_port)
                    .filter(|n| ports.get(n).is_none_or(|owner| *owner == k))
                    .filter(|n| own_health != Some(*n));
                let n = match kept {
                    Some(n) => n,
                    None => free_port(&r.node_ports, &ports).ok_or_else(no_port)?,
                };
                ports.insert(n, k.clone());
                p.node_port = Some(n);
            }
        }
        // After the node ports, so that a node port kept from the stored
        // Service is never handed to the health check first.
        if wants_health_check_port(s) && health_check_port(s).is_none() {
            let kept = old
                .and_then(health_check_port)
                .filter(|n| in_range(*n) && !ports.contains_key(n));
            let n = match kept {
                Some(n) => n,
                None => free_port(&r.node_ports, &ports).ok_or_else(no_port)?,
            };
            ports.insert(n, k.clone());
            s.spec
                .get_or_insert_with(Default::default)
                .health_check_node_port = Some(n);
        }
    }
    Ok(())
}

/// The lowest free host address of `cidr` (not the network address, nor the
/// broadcast address).
fn free_ip(cidr: Ipv4Network, taken: &BTreeMap<IpAddr, String>) -> Option<IpAddr> {
    let first = u32::from(cidr.network()).checked_add(1)?;
    let last = u32::from(cidr.broadcast()).checked_sub(1)?;
    (first..=last)
        .map(|n| IpAddr::V4(Ipv4Addr::from(n)))
        .find(|ip| !taken.contains_key(ip))
}

fn free_port(range: &RangeInclusive<u16>, taken: &BTreeMap<i32, String>) -> Option<i32> {
    range
        .clone()
        .map(i32::from)
        .find(|n| !taken.contains_key(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::model::{parse, Object};

    fn services(yaml: &str) -> Vec<Service> {
        parse(yaml)
            .unwrap()
            .into_iter()
            .map(|o| match o {
                Object::Service(s) => *s,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn svc(name: &str, spec: &str) -> String {
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n")
    }

    fn small() -> Ranges {
        Ranges {
            service_cidr: "10.96.0.0/29".parse().unwrap(),
            node_ports: 30000..=30002,
        }
    }

    fn store(list: Vec<Service>) -> BTreeMap<String, Service> {
        list.into_iter().map(|s| (svc_key(&s), s)).collect()
    }

    fn ip(s: &Service) -> &str {
        cluster_ip(s).unwrap()
    }

    #[test]
    fn allocates_lowest_free_and_never_twice() {
        let mut batch = services(
            &(svc("a", "{ports: [{port: 80}]}")
                + &svc("b", "{clusterIP: 10.96.0.1, ports: [{port: 80}]}")
                + &svc("h", "{clusterIP: None}")
                + &svc("x", "{type: ExternalName, externalName: example.com}")),
        );
        assign(&mut batch, &BTreeMap::new(), &small()).unwrap();
        // b asked for .1 explicitly; a gets the next free one.
        assert_eq!((ip(&batch[0]), ip(&batch[1])), ("10.96.0.2", "10.96.0.1"));
        let spec = batch[0].spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ips, Some(vec!["10.96.0.2".to_string()]));
        assert_eq!(spec.ip_families, Some(vec!["IPv4".to_string()]));
        assert_eq!(ip(&batch[2]), "None");
        assert_eq!(cluster_ip(&batch[3]), None);

        // Re-applying a without its IP keeps it; a new c gets .3.
        let existing = store(batch);
        let mut again = services(&(svc("a", "{ports: [{port: 80}]}") + &svc("c", "{}")));
        assign(&mut again, &existing, &small()).unwrap();
        assert_eq!((ip(&again[0]), ip(&again[1])), ("10.96.0.2", "10.96.0.3"));
    }

    #[test]
    fn refuses_outside_taken_immutable_and_full() {
        let existing = store(services(&svc("a", "{clusterIP: 10.96.0.1}")));
        let try_ = |yaml: String| assign(&mut services(&yaml), &existing, &small()).unwrap_err();
        assert!(matches!(
            try_(svc("b", "{clusterIP: 10.97.0.1}")),
            AllocError::OutsideCidr { .. }
        ));
        assert!(matches!(
            try_(svc("b", "{clusterIP: 'fd00::1'}")),
            AllocError::OutsideCidr { .. }
        ));
        assert_eq!(
            try_(svc("b", "{clusterIP: 10.96.0.1}")).to_string(),
            "Service default/b: spec.clusterIP 10.96.0.1 is already taken by Service default/a"
        );
        assert!(matches!(
            try_(svc("a", "{clusterIP: 10.96.0.2}")),
            AllocError::Immutable { .. }
        ));
        // /29: .1 to .6 are usable; .1 is taken, so six new ones do not fit.
        let many: String = (0..6).map(|i| svc(&format!("n{i}"), "{}")).collect();
        assert_eq!(try_(many), AllocError::NoAddress(small().service_cidr));
    }

    #[test]
    fn node_ports() {
        let np =
            |name: &str, ports: &str| svc(name, &format!("{{type: NodePort, ports: {ports}}}"));
        let mut batch = services(
            &(np("a", "[{name: x, port: 80}, {name: y, port: 81}]")
                + &np("b", "[{port: 80, nodePort: 30000}]")),
        );
        assign(&mut batch, &BTreeMap::new(), &small()).unwrap();
        let node_ports = |s: &Service| -> Vec<i32> {
            s.spec
                .as_ref()
                .unwrap()
                .ports
                .iter()
                .flatten()
                .filter_map(|p| p.node_port)
                .collect()
        };
        // b's explicit 30000 is honoured even though a comes first.
        assert_eq!(node_ports(&batch[0]), [30001, 30002]);
        assert_eq!(node_ports(&batch[1]), [30000]);

        let existing = store(batch);
        let try_ = |yaml: String| assign(&mut services(&yaml), &existing, &small());
        assert_eq!(
            try_(np("c", "[{port: 80, nodePort: 30001}]"))
                .unwrap_err()
                .to_string(),
            "Service default/c: spec.ports[0].nodePort 30001 is already taken by Service default/a"
        );
        assert!(matches!(
            try_(np("c", "[{port: 80, nodePort: 29999}]")).unwrap_err(),
            AllocError::OutsideRange { .. }
        ));
        assert!(matches!(
            try_(np("c", "[{port: 80}]")).unwrap_err(),
            AllocError::NoPort { .. }
        ));
        // One Service, one node port for TCP and UDP.
        try_(np("b", "[{name: t, port: 53, nodePort: 30000}, {name: u, port: 53, protocol: UDP, nodePort: 30000}]"))
            .unwrap();
        // Re-applying a keeps its node ports.
        let mut again = services(&np("a", "[{name: x, port: 80}, {name: y, port: 81}]"));
        assign(&mut again, &existing, &small()).unwrap();
        assert_eq!(node_ports(&again[0]), [30001, 30002]);
    }

    fn health(s: &Service) -> Option<i32> {
        s.spec.as_ref().unwrap().health_check_node_port
    }

    fn first_node_port(s: &Service) -> Option<i32> {
        s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].node_port
    }

    #[test]
    fn health_check_port_for_local_load_balancers_only() {
        let lb = |name: &str, etp: &str, extra: &str| {
            svc(
                name,
                &format!("{{type: LoadBalancer, externalTrafficPolicy: {etp}, ports: [{{port: 80}}]{extra}}}"),
            )
        };
        let mut batch = services(&(lb("l", "Local", "") + &lb("c", "Cluster", "")));
        assign(&mut batch, &BTreeMap::new(), &small()).unwrap();
        // l: node port first, then the health check; c: no health check.
        assert_eq!(first_node_port(&batch[0]), Some(30000));
        assert_eq!(health(&batch[0]), Some(30001));
        assert_eq!(first_node_port(&batch[1]), Some(30002));
        assert_eq!(health(&batch[1]), None);

        // Re-applied without them, l keeps both.
        let existing = store(batch);
        let mut again = services(&lb("l", "Local", ""));
        assign(&mut again, &existing, &small()).unwrap();
        assert_eq!(
            (first_node_port(&again[0]), health(&again[0])),
            (Some(30000), Some(30001))
        );

        // An explicit health-check port is checked like a node port, and is
        // never shared with a node port, not even the Service's own.
        let try_ = |yaml: String| assign(&mut services(&yaml), &BTreeMap::new(), &small());
        let own = try_(svc(
            "o",
            "{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 30000, ports: [{port: 80, nodePort: 30000}]}",
        ))
        .unwrap_err();
        assert_eq!(
            own.to_string(),
            "Service default/o: spec.healthCheckNodePort 30000 is already taken by Service default/o"
        );
        assert!(matches!(
            try_(lb("o", "Local", ", healthCheckNodePort: 40000")).unwrap_err(),
            AllocError::OutsideRange { ref field, .. } if field == "spec.healthCheckNodePort"
        ));
        // A stored node port the new document gives to the health check is
        // not kept for the port: it gets a fresh one.
        let mut moved = services(&lb("l", "Local", ", healthCheckNodePort: 30000"));
        assign(&mut moved, &existing, &small()).unwrap();
        assert_eq!(
            (first_node_port(&moved[0]), health(&moved[0])),
            (Some(30001), Some(30000))
        );
    }

    #[test]
    fn load_balancer_without_node_ports() {
        let mut batch = services(&svc(
            "l",
            "{type: LoadBalancer, allocateLoadBalancerNodePorts: false, ports: [{port: 80}]}",
        ));
        assign(&mut batch, &BTreeMap::new(), &small()).unwrap();
        assert_eq!(first_node_port(&batch[0]), None);
        assert_eq!(ip(&batch[0]), "10.96.0.1");
    }

    #[test]
    fn ranges_are_checked() {
        let cidr = |s: &str| s.parse::<Ipv4Network>().unwrap();
        let r = Ranges::new(cidr("10.96.0.0/12"), "30000-32767").unwrap();
        assert_eq!(r, Ranges::default());
        assert_eq!(
            r.to_string(),
            "service CIDR 10.96.0.0/12, node-port range 30000-32767"
        );
        assert_eq!(parse_node_ports("8080-8080").unwrap(), 8080..=8080);
        let err = |c: &str, p: &str| Ranges::new(cidr(c), p).unwrap_err();
        assert!(err("10.96.0.1/12", "1-2").contains("host bits"));
        assert!(err("10.96.0.0/31", "1-2").contains("too small"));
        assert!(err("10.96.0.0/12", "32767-30000").contains("inverted"));
        assert!(err("10.96.0.0/12", "0-100").contains("outside 1..=65535"));
        assert!(err("10.96.0.0/12", "30000-70000").contains("port 70000 is outside"));
        assert!(err("10.96.0.0/12", "30000").contains("FIRST-LAST"));
        assert!(err("10.96.0.0/12", "a-b").contains("FIRST-LAST"));
    }
}
