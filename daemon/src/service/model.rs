//! User documents → validated `v1 Service` / `discovery.k8s.io/v1
//! EndpointSlice` objects. Everything here is pure: `ferryctl apply`
//! validates a whole file before it writes any of it.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde_json::Value;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("document {doc}: not valid YAML or JSON: {msg}")]
    Syntax { doc: usize, msg: String },
    #[error("document {doc}: {msg}")]
    Shape { doc: usize, msg: String },
    #[error("{kind} {key}: {msg}")]
    Invalid {
        kind: &'static str,
        key: String,
        msg: String,
    },
}

/// One object ferry understands.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
}

/// The two kinds of object ferry stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    /// The API's resource name: `services`, `endpointslices` (also the
    /// stores' directory and key segment).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
        }
    }

    /// `service`, `endpointslice`: how kubectl names one in its output.
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::EndpointSlice => "endpointslice",
        }
    }
}

/// Which object: kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    /// `NS/NAME` or `NAME` (namespace `default`), as `ferryctl delete
    /// service` takes it; both parts must be DNS labels.
    pub fn parse(kind: Kind, s: &str) -> Result<ObjectRef, String> {
        let (ns, name) = match s.split_once('/') {
            Some((ns, name)) => (ns, name),
            None => (DEFAULT_NAMESPACE, s),
        };
        for (what, v) in [("namespace", ns), ("name", name)] {
            if !is_dns_label(v) {
                return Err(format!(
                    "{} {s:?}: {what} {v:?} must be a DNS label (lower-case letters, digits, '-')",
                    kind.singular()
                ));
            }
        }
        Ok(ObjectRef {
            kind,
            namespace: ns.into(),
            name: name.into(),
        })
    }

    /// `namespace/name`, the key of [`crate::service::Snapshot`]'s maps.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl std::fmt::Display for ObjectRef {
    /// `service/default/web`: kubectl's `kind/name` with the namespace.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.kind.singular(),
            self.namespace,
            self.name
        )
    }
}

impl Object {
    pub fn reference(&self) -> ObjectRef {
        let (kind, meta) = match self {
            Object::Service(s) => (Kind::Service, &s.metadata),
            Object::EndpointSlice(e) => (Kind::EndpointSlice, &e.metadata),
        };
        ObjectRef {
            kind,
            namespace: meta
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
        }
    }

    /// `namespace/name`, the namespace defaulted.
    pub fn key(&self) -> String {
        let meta = match self {
            Object::Service(s) => &s.metadata,
            Object::EndpointSlice(e) => &e.metadata,
        };
        key(
            meta.namespace.as_deref(),
            meta.name.as_deref().unwrap_or(""),
        )
    }
}

pub fn key(namespace: Option<&str>, name: &str) -> String {
    format!("{}/{name}", namespace.unwrap_or(DEFAULT_NAMESPACE))
}

/// Every object of `text`: YAML (one or many `---` documents) or JSON, each
/// document a Service, an EndpointSlice or a `v1 List` of them. Objects come
/// back with the namespace defaulted and validated ([`validate`]).
pub fn parse(text: &str) -> Result<Vec<Object>, ModelError> {
    parse_in(text, PIECE_BYTES)
}

/// [`parse`], a YAML stream cut into pieces of about `piece` bytes.
fn parse_in(text: &str, piece: usize) -> Result<Vec<Object>, ModelError> {
    let pieces = pieces(text, piece);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if pieces.len() < 2 || threads < 2 {
        return parse_whole(text);
    }
    // A long YAML stream is cut between documents and its pieces parsed
    // on every core: parsing a file of 10k Services and their slices
    // (7 MB) was most of an apply's user time. An error anywhere is found
    // again in the whole text, so that its message (document number,
    // line) is the one the whole text gives.
    let parsed: Vec<Result<Vec<Object>, ModelError>> =
        crate::parallel::map_runs(&pieces, threads, |run| {
            let mut out = Vec::new();
            for p in run {
                out.extend(parse_whole(p)?);
            }
            Ok(out)
        });
    let mut out = Vec::new();
    for p in parsed {
        match p {
            Ok(objects) => out.extend(objects),
            Err(_) => return parse_whole(text),
        }
    }
    Ok(out)
}

/// A YAML stream longer than this is parsed in pieces of about this size.
const PIECE_BYTES: usize = 256 * 1024;

/// `text` cut into pieces of about `size` bytes, each cut just before a
/// line that starts a document (`---` and a blank or the end): YAML
/// forbids such a line inside any scalar, so every piece holds whole
/// documents, and the pieces hold the documents of `text`, in order. A
/// JSON text, and a stream with directives (`%YAML`, `%TAG`: they belong
/// to the document after them) stay whole.
fn pieces(text: &str, size: usize) -> Vec<&str> {
    let trimmed = text.trim_start();
    if text.len() <= size
        || trimmed.starts_with('{')
        || trimmed.starts_with('[')
        || text.starts_with('%')
        || text.contains("\n%")
    {
        return vec![text];
    }
    let bytes = text.as_bytes();
    let starts_document = |at: usize| {
        bytes[at..].starts_with(b"---")
            && matches!(bytes.get(at + 3), None | Some(b' ' | b'\t' | b'\n' | b'\r'))
    };
    let mut out = Vec::new();
    let mut from = 0;
    let mut at = size;
    while at < text.len() {
        // The next line start at or after `at` that starts a document.
        let mut cut = None;
        let mut i = at;
        while let Some(nl) = text[i..].find('\n') {
            let line = i + nl + 1;
            if line < text.len() && starts_document(line) {
                cut = Some(line);
                break;
            }
            i = line;
        }
        let Some(cut) = cut else { break };
        out.push(&text[from..cut]);
        from = cut;
        at = cut + size;
    }
    out.push(&text[from..]);
    out
}

fn parse_whole(text: &str) -> Result<Vec<Object>, ModelError> {
    let mut out = Vec::new();
    for (i, doc) in documents(text)?.into_iter().enumerate() {
        let doc_no = i + 1;
        let shape = |msg: String| ModelError::Shape { doc: doc_no, msg };
        if doc.is_null() {
            continue; // an empty document (a trailing `---`)
        }
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
        let items = if kind == "List" {
            match doc.get("items") {
                Some(Value::Array(items)) => items.clone(),
                Some(Value::Null) | None => Vec::new(),
                Some(_) => return Err(shape("List.items is not a list".into())),
            }
        } else {
            vec![doc]
        };
        for item in items {
            let mut obj = object(item).map_err(shape)?;
            default_namespace(&mut obj);
            validate(&obj)?;
            out.push(obj);
        }
    }
    Ok(out)
}

/// The documents of a YAML stream (JSON is YAML; a JSON text is parsed as
/// JSON for exact error positions).
fn documents(text: &str) -> Result<Vec<Value>, ModelError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        return serde_json::from_str(text)
            .map(|v| vec![v])
            .map_err(|e| ModelError::Syntax {
                doc: 1,
                msg: e.to_string(),
            });
    }
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        docs.push(Value::deserialize(de).map_err(|e| ModelError::Syntax {
            doc: i + 1,
            msg: e.to_string(),
        })?);
    }
    Ok(docs)
}

fn object(v: Value) -> Result<Object, String> {
    let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    match (api, kind) {
        ("v1", "Service") => serde_json::from_value(v)
            .map(|s| Object::Service(Box::new(s)))
            .map_err(|e| format!("Service: {e}")),
        ("discovery.k8s.io/v1", "EndpointSlice") => serde_json::from_value(v)
            .map(|e| Object::EndpointSlice(Box::new(e)))
            .map_err(|e| format!("EndpointSlice: {e}")),
        ("", _) | (_, "") => Err("apiVersion and kind are required".into()),
        _ => Err(format!(
            "{api} {kind} is not supported (v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 List)"
        )),
    }
}

fn default_namespace(obj: &mut Object) {
    let meta = match obj {
        Object::Service(s) => &mut s.metadata,
        Object::EndpointSlice(e) => &mut e.metadata,
    };
    meta.namespace
        .get_or_insert_with(|| DEFAULT_NAMESPACE.into());
}

/// What the API server would refuse, and what ferry cannot program.
pub fn validate(obj: &Object) -> Result<(), ModelError> {
    let invalid = |msg: String| ModelError::Invalid {
        kind: obj.kind(),
        key: obj.key(),
        msg,
    };
    let meta = match obj {
        Object::Service(s) => &s.metadata,
        Object::EndpointSlice(e) => &e.metadata,
    };
    let name = meta.name.as_deref().unwrap_or("");
    if !is_dns_label(name) {
        return Err(invalid(format!(
            "metadata.name {name:?} must be a DNS label (lower-case letters, digits, '-')"
        )));
    }
    let ns = meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    if !is_dns_label(ns) {
        return Err(invalid(format!(
            "metadata.namespace {ns:?} must be a DNS label"
        )));
    }
    match obj {
        Object::Service(s) => validate_service(s).map_err(invalid),
        Object::EndpointSlice(e) => validate_slice(e).map_err(invalid),
    }
}

fn validate_service(s: &Service) -> Result<(), String> {
    let spec = s.spec.clone().unwrap_or_default();
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !matches!(
        ty,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        return Err(format!(
            "spec.type {ty:?} is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"
        ));
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.len() > 1
        && ports
            .iter()
            .any(|p| p.name.as_deref().unwrap_or("").is_empty())
    {
        return Err("spec.ports: every port needs a name when there are several".into());
    }
    for (i, p) in ports.iter().enumerate() {
        validate_port(p).map_err(|m| format!("spec.ports[{i}]: {m}"))?;
        for (j, q) in ports.iter().enumerate().take(i) {
            if q.port == p.port && protocol(q) == protocol(p) {
                return Err(format!(
                    "spec.ports[{i}]: port {} {} repeats spec.ports[{j}]",
                    p.port,
                    protocol(p)
                ));
            }
            if p.name.is_some() && q.name == p.name {
                return Err(format!("spec.ports[{i}]: name {:?} repeats", p.name));
            }
        }
        if p.node_port.is_some() && !matches!(ty, "NodePort" | "LoadBalancer") {
            return Err(format!(
                "spec.ports[{i}].nodePort is only allowed for type NodePort or LoadBalancer"
            ));
        }
    }
    let ips = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter());
    for ip in ips {
        if ip != "None" && !ip.is_empty() && ip.parse::<IpAddr>().is_err() {
            return Err(format!("spec.clusterIP {ip:?} is not an IP address"));
        }
    }
    if let (Some(a), Some(list)) = (&spec.cluster_ip, &spec.cluster_ips) {
        if list.first().is_some_and(|f| f != a) {
            return Err("spec.clusterIPs[0] must equal spec.clusterIP".into());
        }
    }
    if let Some(n) = spec.health_check_node_port {
        if ty != "LoadBalancer" || spec.external_traffic_policy.as_deref() != Some("Local") {
            return Err("spec.healthCheckNodePort is only allowed for type LoadBalancer with externalTrafficPolicy Local".into());
        }
        if !(1..=65535).contains(&n) {
            return Err(format!("spec.healthCheckNodePort {n} is not in 1..=65535"));
        }
    }
    if spec.allocate_load_balancer_node_ports.is_some() && ty != "LoadBalancer" {
        return Err(
            "spec.allocateLoadBalancerNodePorts is only allowed for type LoadBalancer".into(),
        );
    }
    for ip in spec.external_ips.iter().flatten() {
        ip.parse::<IpAddr>()
            .map_err(|_| format!("spec.externalIPs: {ip:?} is not an IP address"))?;
    }
    for p in [
        ("externalTrafficPolicy", &spec.external_traffic_policy),
        ("internalTrafficPolicy", &spec.internal_traffic_policy),
    ] {
        if let Some(v) = p.1 {
            if v != "Cluster" && v != "Local" {
                return Err(format!("spec.{} {v:?} is not Cluster or Local", p.0));
            }
        }
    }
    match spec.session_affinity.as_deref() {
        None | Some("None") | Some("ClientIP") => {}
        Some(v) => {
            return Err(format!(
                "spec.sessionAffinity {v:?} is not None or ClientIP"
            ))
        }
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    if let Some(t) = timeout {
        if !(1..=86_400).contains(&t) {
            return Err(format!(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds {t} is not in 1..=86400"
            ));
        }
    }
    Ok(())
}

fn validate_port(p: &ServicePort) -> Result<(), String> {
    if !(1..=65535).contains(&p.port) {
        return Err(format!("port {} is not in 1..=65535", p.port));
    }
    let proto = protocol(p);
    if !matches!(proto, "TCP" | "UDP" | "SCTP") {
        return Err(format!("protocol {proto:?} is not TCP, UDP or SCTP"));
    }
    match &p.target_port {
        Some(IntOrString::Int(n)) if !(1..=65535).contains(n) => {
            Err(format!("targetPort {n} is not in 1..=65535"))
        }
        Some(IntOrString::String(s)) if !is_port_name(s) => Err(format!(
            "targetPort {s:?} is neither a number nor a port name"
        )),
        _ => Ok(()),
    }?;
    if let Some(n) = p.node_port {
        if !(1..=65535).contains(&n) {
            return Err(format!("nodePort {n} is not in 1..=65535"));
        }
    }
    Ok(())
}

fn validate_slice(e: &EndpointSlice) -> Result<(), String> {
    let labels = e.metadata.labels.as_ref();
    let svc = labels.and_then(|l| l.get(SERVICE_NAME_LABEL));
    if !svc.is_some_and(|s| is_dns_label(s)) {
        return Err(format!(
            "metadata.labels[{SERVICE_NAME_LABEL:?}] must name its Service"
        ));
    }
    let want_v6 = match e.address_type.as_str() {
        "IPv4" => Some(false),
        "IPv6" => Some(true),
        "FQDN" => None,
        other => return Err(format!("addressType {other:?} is not IPv4, IPv6 or FQDN")),
    };
    for (i, ep) in e.endpoints.iter().flatten().enumerate() {
        if ep.addresses.is_empty() {
            return Err(format!("endpoints[{i}].addresses is empty"));
        }
        let Some(v6) = want_v6 else { continue };
        for a in &ep.addresses {
            match a.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv6() == v6 => {}
                _ => {
                    return Err(format!(
                        "endpoints[{i}].addresses: {a:?} is not an {} address",
                        e.address_type
                    ))
                }
            }
        }
    }
    for (i, p) in e.ports.iter().flatten().enumerate() {
        if let Some(n) = p.port {
            if !(1..=65535).contains(&n) {
                return Err(format!("ports[{i}].port {n} is not in 1..=65535"));
            }
        }
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if !matches!(proto, "TCP" | "UDP" | "SCTP") {
            return Err(format!(
                "ports[{i}].protocol {proto:?} is not TCP, UDP or SCTP"
            ));
        }
    }
    Ok(())
}

/// The port's protocol, TCP when unset (the API's default).
pub fn protocol(p: &ServicePort) -> &str {
    p.protocol.as_deref().unwrap_or("TCP")
}

/// RFC 1123 label as the API checks names: ≤ 63, `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// IANA service name, as a named targetPort: ≤ 15, letters, digits and
/// inner '-', at least one letter.
fn is_port_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(u8::is_ascii_lowercase)
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: dns}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: prod
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.244.1.5]
  nodeName: n1
  conditions: {ready: true}
ports:
- {name: http, port: 8080, protocol: TCP}
---
"#;

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    /// Cut into pieces, a stream parses as it does whole: the same
    /// objects, and the same error message for a bad document anywhere.
    #[test]
    fn pieces_parse_as_the_whole() {
        let mut text = String::new();
        for i in 0..40 {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s-{i}}}\n\
                 spec:\n  ports: [{{port: 80}}]\n---\n# a comment\n----not-a-marker: 1\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: s-{i}-1, labels: {{kubernetes.io/service-name: s-{i}}}}}\n\
                 addressType: IPv4\nendpoints:\n- addresses: [10.244.1.{i}]\n...\n"
            ));
        }
        let cut = pieces(&text, 300);
        assert!(cut.len() > 20, "{}", cut.len());
        assert_eq!(cut.concat(), text);
        assert!(cut.iter().skip(1).all(|p| p.starts_with("---\n")));
        let whole = parse_whole(&text).unwrap();
        assert_eq!(whole.len(), 80);
        let mut joined = Vec::new();
        for p in &cut {
            joined.extend(parse_whole(p).unwrap());
        }
        assert_eq!(joined, whole);
        assert_eq!(parse_in(&text, 300).unwrap(), whole);

        // Not cut: short, JSON, directives.
        assert_eq!(pieces("---\na: 1\n---\nb: 2\n", 1024).len(), 1);
        assert_eq!(
            pieces(&format!("{{\"x\": \"{}\"}}", "---\n".repeat(300)), 8).len(),
            1
        );
        assert_eq!(pieces(&format!("%YAML 1.2\n{text}"), 300).len(), 1);

        // A bad document in a late piece: the message of the whole text.
        let bad = format!(
            "{text}---\napiVersion: v1\nkind: Service\nmetadata: {{name: x}}\nspec: {{ports: [{{port: 0}}]}}\n"
        );
        assert_eq!(
            parse_in(&bad, 300).unwrap_err().to_string(),
            "Service default/x: spec.ports[0]: port 0 is not in 1..=65535"
        );
        let tail = format!("{text}---\na: [1,\n  2\nb: {{\n");
        let e = parse_in(&tail, 300).unwrap_err();
        assert_eq!(e, parse_whole(&tail).unwrap_err());
        assert!(
            e.to_string().starts_with("document 81: not valid YAML"),
            "{e}"
        );
    }

    #[test]
    fn yaml_documents_default_namespace() {
        let objs = parse(WEB).unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[0].key(), "default/web");
        assert_eq!(objs[1].key(), "prod/web-1");
        let Object::Service(s) = &objs[0] else {
            panic!()
        };
        let ports = s.spec.as_ref().unwrap().ports.as_ref().unwrap();
        assert_eq!(
            ports[1].target_port,
            Some(IntOrString::String("dns".into()))
        );
        assert_eq!(protocol(&ports[0]), "TCP");
    }

    #[test]
    fn json_and_list() {
        let list = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"a","namespace":"x"},
             "spec":{"ports":[{"port":1}]}},
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"b"},"spec":{}}]}"#;
        let keys: Vec<String> = parse(list).unwrap().iter().map(Object::key).collect();
        assert_eq!(keys, ["x/a", "default/b"]);
    }

    #[test]
    fn refuses_bad_input_naming_the_cause() {
        assert!(err("a: [1, 2").contains("document 1: not valid YAML"));
        assert!(err("{\"kind\": ").contains("not valid YAML or JSON"));
        assert!(err("apiVersion: v1\nkind: Pod\nmetadata: {name: p}")
            .contains("v1 Pod is not supported"));
        assert!(err("kind: Service").contains("apiVersion and kind are required"));
        let svc = |ports: &str| {
            err(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  ports: {ports}"
            ))
        };
        assert!(
            svc("[{port: 0}]").contains("port 0 is not in 1..=65535"),
            "{}",
            svc("[{port: 0}]")
        );
        assert!(svc("[{port: 65536}]").contains("port 65536"));
        assert!(svc("[{port: 80, protocol: ICMP}]").contains("protocol \"ICMP\""));
        assert!(svc("[{port: 80, targetPort: 70000}]").contains("targetPort 70000"));
        assert!(svc("[{port: 80, targetPort: \"no way\"}]").contains("neither a number"));
        assert!(svc("[{port: 80, nodePort: 30001}]").contains("only allowed for type NodePort"));
        assert!(svc("[{name: a, port: 80}, {name: b, port: 80}]").contains("repeats"));
        assert!(svc("[{port: 80}, {port: 81}]").contains("needs a name"));
        // Same port over TCP and UDP is fine.
        parse("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{name: a, port: 53}, {name: b, port: 53, protocol: UDP}]").unwrap();
        assert!(
            err("apiVersion: v1\nkind: Service\nmetadata: {name: Bad_Name}").contains("DNS label")
        );
        assert!(err(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.0.0.300}"
        )
        .contains("not an IP"));
        assert!(
            err("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {type: Magic}")
                .contains("spec.type")
        );
    }

    #[test]
    fn slices_need_their_service_label_and_valid_addresses() {
        let slice = |labels: &str, addr: &str| {
            parse(&format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: e, labels: {labels}}}\naddressType: IPv4\nendpoints: [{{addresses: [{addr}]}}]"
            ))
        };
        assert!(slice("{}", "10.0.0.1")
            .unwrap_err()
            .to_string()
            .contains("must name its Service"));
        assert!(slice("{kubernetes.io/service-name: s}", "fd00::1")
            .unwrap_err()
            .to_string()
            .contains("not an IPv4"));
        slice("{kubernetes.io/service-name: s}", "10.0.0.1").unwrap();
    }

    #[test]
    fn health_check_port_needs_a_local_load_balancer() {
        let svc = |spec: &str| {
            parse(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec: {spec}"
            ))
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        let lb = "type: LoadBalancer, externalTrafficPolicy: Local";
        svc(&format!("{{{lb}, healthCheckNodePort: 30000}}")).unwrap();
        assert!(svc("{type: LoadBalancer, healthCheckNodePort: 30000}")
            .unwrap_err()
            .contains("externalTrafficPolicy Local"));
        assert!(svc(&format!("{{{lb}, healthCheckNodePort: 70000}}"))
            .unwrap_err()
            .contains("healthCheckNodePort 70000"));
        assert!(
            svc("{type: NodePort, allocateLoadBalancerNodePorts: false}")
                .unwrap_err()
                .contains("allocateLoadBalancerNodePorts")
        );
    }

    #[test]
    fn references() {
        let r = ObjectRef::parse(Kind::Service, "web").unwrap();
        assert_eq!(
            (r.key(), r.to_string()),
            ("default/web".into(), "service/default/web".into())
        );
        let r = ObjectRef::parse(Kind::EndpointSlice, "prod/web-1").unwrap();
        assert_eq!(r.to_string(), "endpointslice/prod/web-1");
        assert!(ObjectRef::parse(Kind::Service, "a/b/c")
            .unwrap_err()
            .contains("name \"b/c\""));
        assert!(ObjectRef::parse(Kind::Service, "/x").is_err());
        let objs = parse(WEB).unwrap();
        assert_eq!(objs[1].reference().to_string(), "endpointslice/prod/web-1");
    }
}
