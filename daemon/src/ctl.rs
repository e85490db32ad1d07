//! `ferryctl`: the client for the stores. It speaks Kubernetes' own
//! objects — `v1 Service`, `discovery.k8s.io/v1 EndpointSlice` — so that the
//! same YAML works with the file store, etcd and (later) a real cluster.
//!
//! The input is read and validated completely before the store is opened,
//! and written by one [`ServiceWrites::apply`], so a file with one bad
//! document writes nothing. Every failure is one line on stderr and exit
//! code 1 (usage errors: clap's exit code 2).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

use crate::config::{ConfigError, StoreSpec};
use crate::service::alloc::Ranges;
use crate::service::model::{self, Kind, Object, ObjectRef, SERVICE_NAME_LABEL};
use crate::service::Snapshot;
use crate::store::etcd::EtcdStore;
use crate::store::etcd_conn::EtcdAccess;
use crate::store::file::FileStore;
use crate::store::{ClusterState, ServiceWrites, StoreError};

#[derive(Parser, Debug)]
#[command(
    name = "ferryctl",
    version,
    about = "ferry's client: Kubernetes Services and EndpointSlices in ferry's store",
    long_about = "ferry's client: Kubernetes Services and EndpointSlices in ferry's store.\n\n\
        Documents are v1 Service and discovery.k8s.io/v1 EndpointSlice objects, in YAML or \
        JSON, one or many per file, or a v1 List. The namespace defaults to `default`. \
        `apply` allocates missing clusterIPs and node ports from the service CIDR and \
        node-port range kept in the store (ferryd's --service-cidr and --nodeport-range)."
)]
pub struct Cli {
    /// Cluster state, as ferryd's --store: `file:DIR` or `etcd:URL[,URL...]`.
    #[arg(
        long,
        env = "FERRY_STORE",
        default_value = "file:/var/lib/ferry/store",
        global = true
    )]
    pub store: String,
    /// Key prefix in etcd, as ferryd's --etcd-prefix.
    #[arg(
        long,
        env = "FERRY_ETCD_PREFIX",
        default_value = "/ferry",
        global = true
    )]
    pub etcd_prefix: String,
    /// With an `https://` etcd: the CA of etcd's server certificate, as
    /// ferryd's --etcd-ca-file [default: the system's CAs].
    #[arg(long, env = "FERRY_ETCD_CA_FILE", global = true)]
    pub etcd_ca_file: Option<PathBuf>,
    /// With an `https://` etcd: a client certificate (PEM).
    #[arg(long, env = "FERRY_ETCD_CERT_FILE", global = true)]
    pub etcd_cert_file: Option<PathBuf>,
    /// The private key of --etcd-cert-file (PEM).
    #[arg(long, env = "FERRY_ETCD_KEY_FILE", global = true)]
    pub etcd_key_file: Option<PathBuf>,
    /// An etcd user (etcd's own authentication).
    #[arg(long, env = "FERRY_ETCD_USERNAME", global = true)]
    pub etcd_username: Option<String>,
    /// A file holding --etcd-username's password.
    #[arg(long, env = "FERRY_ETCD_PASSWORD_FILE", global = true)]
    pub etcd_password_file: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create or update the objects of a file, all of them or none.
    Apply(ApplyArgs),
    /// Delete the objects a file names, or one: `delete service NS/NAME`.
    Delete(DeleteArgs),
    /// List Services or EndpointSlices.
    Get(GetArgs),
    /// This node's ferryd: subnet, peers, Services programmed, last sync.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// ferryd's health address (its --health-addr).
    #[arg(long, env = "FERRYD_HEALTH_ADDR", default_value = "127.0.0.1:9475")]
    pub ferryd: String,
    /// Print ferryd's JSON as it is.
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<StatusFormat>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusFormat {
    Json,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// YAML or JSON file; `-` reads standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: String,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Delete every object this file holds; `-` reads standard input.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        conflicts_with_all = ["kind", "name"],
        required_unless_present = "kind"
    )]
    pub file: Option<String>,
    /// What to delete: service or endpointslice.
    #[arg(value_enum, requires = "name")]
    pub kind: Option<Resource>,
    /// NS/NAME, or NAME in namespace default.
    pub name: Option<String>,
    /// A missing object is not an error.
    #[arg(long)]
    pub ignore_not_found: bool,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// services or endpointslices.
    #[arg(value_enum)]
    pub resource: Resource,
    /// Output format [default: a table].
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<Format>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    #[value(name = "services", aliases = ["service", "svc"])]
    Services,
    #[value(name = "endpointslices", aliases = ["endpointslice"])]
    EndpointSlices,
}

impl Resource {
    fn kind(self) -> Kind {
        match self {
            Resource::Services => Kind::Service,
            Resource::EndpointSlices => Kind::EndpointSlice,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

/// One line for the user; `ferryctl` exits 1.
#[derive(Debug, PartialEq, Eq)]
pub struct CtlError(pub String);

impl std::fmt::Display for CtlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // One line, whatever a parser put into its message.
        let one: Vec<&str> = self.0.split_whitespace().collect();
        f.write_str(&one.join(" "))
    }
}

impl From<StoreError> for CtlError {
    fn from(e: StoreError) -> Self {
        CtlError(error_chain(&e))
    }
}

impl From<ConfigError> for CtlError {
    fn from(e: ConfigError) -> Self {
        CtlError(e.0)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let m = s.to_string();
        if !msg.contains(&m) {
            msg = format!("{msg}: {m}");
        }
        src = s.source();
    }
    msg
}

fn io_err(e: std::io::Error) -> CtlError {
    CtlError(format!("cannot write output: {e}"))
}

/// What a command does, its input read and checked, before any store is
/// opened: a bad file fails even when the store is unreachable.
#[derive(Debug)]
pub enum Job {
    Apply {
        /// The file's name as the user gave it (`<stdin>` for `-`).
        source: String,
        objects: Vec<Object>,
    },
    Delete {
        refs: Vec<ObjectRef>,
        ignore_not_found: bool,
    },
    Get {
        kind: Kind,
        output: Option<Format>,
    },
    Status {
        ferryd: String,
        json: bool,
    },
}

fn read_source(file: &str, stdin: &mut dyn Read) -> Result<(String, String), CtlError> {
    if file == "-" {
        let mut text = String::new();
        stdin
            .read_to_string(&mut text)
            .map_err(|e| CtlError(format!("<stdin>: cannot read: {e}")))?;
        return Ok(("<stdin>".into(), text));
    }
    let text =
        std::fs::read_to_string(file).map_err(|e| CtlError(format!("{file}: cannot read: {e}")))?;
    Ok((file.into(), text))
}

fn parse_source(file: &str, stdin: &mut dyn Read) -> Result<(String, Vec<Object>), CtlError> {
    let (source, text) = read_source(file, stdin)?;
    let objects = model::parse(&text).map_err(|e| CtlError(format!("{source}: {e}")))?;
    if objects.is_empty() {
        return Err(CtlError(format!("{source}: no objects in it")));
    }
    Ok((source, objects))
}

impl Job {
    pub fn prepare(cmd: Cmd, stdin: &mut dyn Read) -> Result<Job, CtlError> {
        Ok(match cmd {
            Cmd::Apply(a) => {
                let (source, objects) = parse_source(&a.file, stdin)?;
                Job::Apply { source, objects }
            }
            Cmd::Delete(d) => {
                let refs = match (d.file, d.kind, d.name) {
                    (Some(f), _, _) => parse_source(&f, stdin)?
                        .1
                        .iter()
                        .map(Object::reference)
                        .collect(),
                    (None, Some(kind), Some(name)) => {
                        vec![ObjectRef::parse(kind.kind(), &name).map_err(CtlError)?]
                    }
                    // clap requires one or the other.
                    _ => return Err(CtlError("delete needs -f FILE or KIND NAME".into())),
                };
                Job::Delete {
                    refs,
                    ignore_not_found: d.ignore_not_found,
                }
            }
            Cmd::Get(g) => Job::Get {
                kind: g.resource.kind(),
                output: g.output,
            },
            Cmd::Status(a) => Job::Status {
                ferryd: a.ferryd,
                json: a.output.is_some(),
            },
        })
    }
}

/// Runs `job` against `store`: results on `out`, notes on `err`.
pub async fn exec<S: ClusterState + ServiceWrites>(
    store: &S,
    job: Job,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), CtlError> {
    match job {
        Job::Apply { source, objects } => {
            let ranges = match store.ranges().await? {
                Some(r) => r,
                None => {
                    let d = Ranges::default();
                    writeln!(
                        err,
                        "ferryctl: the store holds no service ranges yet (no ferryd has started \
                         on it): allocating from the defaults, {d}, which the store keeps from now on"
                    )
                    .map_err(io_err)?;
                    d
                }
            };
            let applied = store
                .apply(objects, &ranges)
                .await
                .map_err(|e| CtlError(format!("{source}: {}", error_chain(&e))))?;
            for a in applied {
                writeln!(out, "{} {}", a.object, a.change).map_err(io_err)?;
            }
        }
        Job::Delete {
            refs,
            ignore_not_found,
        } => {
            let existed = store.delete(&refs).await?;
            let mut missing = Vec::new();
            for (r, e) in refs.iter().zip(existed) {
                if e {
                    writeln!(out, "{r} deleted").map_err(io_err)?;
                } else if !ignore_not_found {
                    missing.push(r.to_string());
                }
            }
            if !missing.is_empty() {
                return Err(CtlError(format!("{} not found", missing.join(", "))));
            }
        }
        Job::Status { .. } => unreachable!("status does not use the store"),
        Job::Get { kind, output } => {
            let snap = store.services().await?;
            let empty = match kind {
                Kind::Service => snap.services.is_empty(),
                Kind::EndpointSlice => snap.slices.is_empty(),
            };
            match output {
                None if empty => writeln!(err, "No resources found.").map_err(io_err)?,
                None => out
                    .write_all(render_table(kind, &snap).as_bytes())
                    .map_err(io_err)?,
                Some(f) => out
                    .write_all(render_list(kind, &snap, f).as_bytes())
                    .map_err(io_err)?,
            }
        }
    }
    Ok(())
}

const KUBECTL: &str = "--store kubernetes: Services and EndpointSlices live in the \
                       Kubernetes API; use kubectl (e.g. kubectl apply -f FILE, kubectl get services)";

/// The command line, end to end: input, store, job.
pub async fn run(
    cli: Cli,
    stdin: &mut dyn Read,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), CtlError> {
    let job = Job::prepare(cli.cmd, stdin)?;
    if let Job::Status { ferryd, json } = &job {
        let body = fetch_status(ferryd).await?;
        let text = if *json {
            body
        } else {
            status_text(&body).map_err(|e| CtlError(format!("{ferryd}/status: {e}")))?
        };
        return out.write_all(text.as_bytes()).map_err(io_err);
    }
    let spec = StoreSpec::parse(&cli.store)?;
    let access = EtcdAccess {
        ca_file: cli.etcd_ca_file,
        cert_file: cli.etcd_cert_file,
        key_file: cli.etcd_key_file,
        username: cli.etcd_username,
        password_file: cli.etcd_password_file,
    };
    access.check(spec.etcd_urls()).map_err(CtlError)?;
    match spec {
        StoreSpec::File(dir) => exec(&FileStore::open_client(&dir)?, job, out, err).await,
        StoreSpec::Etcd(urls) => {
            let store = EtcdStore::open_client(&urls, &access, &cli.etcd_prefix).await?;
            exec(&store, job, out, err).await
        }
        // The API server allocates and validates Services itself, and
        // kubectl already speaks it: ferryctl would be a worse kubectl.
        StoreSpec::Kubernetes => Err(CtlError(KUBECTL.into())),
    }
}

/// GET /status from ferryd's health server (HTTP/1.1, one request).
async fn fetch_status(addr: &str) -> Result<String, CtlError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fail = |e: &dyn std::fmt::Display| {
        CtlError(format!("cannot reach ferryd at {addr} (--ferryd): {e}"))
    };
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /status HTTP/1.1\r\nHost: ferryd\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    let resp = tokio::time::timeout(std::time::Duration::from_secs(5), io)
        .await
        .map_err(|_| fail(&"no answer in 5 s"))?
        .map_err(|e| fail(&e))?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        Some((head, _)) => Err(fail(&head.lines().next().unwrap_or(""))),
        None => Err(fail(&"not an HTTP answer")),
    }
}

/// ferryd's /status JSON for people.
pub fn status_text(body: &str) -> Result<String, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let sv = &v["services"];
    let when = |t: &Value| match t.as_u64() {
        Some(0) | None => "never".to_string(),
        Some(t) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(t);
            format!("{}s ago", now.saturating_sub(t))
        }
    };
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<20}{v}\n"));
    line("Ready:", v["ready"].to_string());
    line("Subnet:", v["subnet"].as_str().unwrap_or("").to_string());
    line("Peers:", v["peers"].to_string());
    line(
        "Overlay:",
        format!(
            "last reconciled {}, {} errors, {} store errors",
            when(&v["lastReconcileUnix"]),
            v["reconcileErrors"],
            v["storeErrors"]
        ),
    );
    line(
        "Services:",
        format!("{} ports, {} endpoints", sv["ports"], sv["endpoints"]),
    );
    line(
        "Last Services sync:",
        format!(
            "{}, took {:.1} ms ({} syncs, {} errors)",
            when(&sv["lastSyncUnix"]),
            sv["lastSyncSeconds"].as_f64().unwrap_or(0.0) * 1e3,
            sv["syncs"],
            sv["errors"]
        ),
    );
    if let Some(e) = sv["lastError"].as_str().filter(|e| !e.is_empty()) {
        line("Last error:", e.to_string());
    }
    let src = &v["source"];
    if let Some(api) = src["apiServer"].as_str() {
        line("API server:", api.to_string());
    }
    if let Some(w) = src["watches"].as_object() {
        for (kind, st) in w {
            line(
                &format!("Watch {kind}:"),
                format!(
                    "{}, last event {}",
                    st["state"].as_str().unwrap_or("?"),
                    when(&st["lastEventUnix"])
                ),
            );
        }
    }
    Ok(out)
}

/// `ferryctl`'s `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The stores log what they skip (an unreadable object) as warnings.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let res = rt.block_on(run(
        cli,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr(),
    ));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryctl: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `get -o json|yaml`: a `v1 List`, as kubectl prints one (and as `apply`
/// takes it back).
pub fn render_list(kind: Kind, snap: &Snapshot, f: Format) -> String {
    let items: Vec<Value> = match kind {
        Kind::Service => snap.services.values().map(to_value).collect(),
        Kind::EndpointSlice => snap.slices.values().map(to_value).collect(),
    };
    let list = json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": items,
        "metadata": {"resourceVersion": ""},
    });
    match f {
        Format::Json => serde_json::to_string_pretty(&list).expect("serialisable") + "\n",
        Format::Yaml => serde_norway::to_string(&list).expect("serialisable"),
    }
}

fn to_value(v: &impl serde::Serialize) -> Value {
    serde_json::to_value(v).expect("serialisable")
}

/// kubectl's table: NAMESPACE NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S) for
/// Services, NAMESPACE NAME SERVICE ENDPOINTS for slices.
pub fn render_table(kind: Kind, snap: &Snapshot) -> String {
    match kind {
        Kind::Service => table(
            &[
                "NAMESPACE",
                "NAME",
                "TYPE",
                "CLUSTER-IP",
                "EXTERNAL-IP",
                "PORT(S)",
            ],
            snap.services.values().map(service_row).collect(),
        ),
        Kind::EndpointSlice => table(
            &["NAMESPACE", "NAME", "SERVICE", "ENDPOINTS"],
            snap.slices.values().map(slice_row).collect(),
        ),
    }
}

fn or(s: String, none: &str) -> String {
    if s.is_empty() {
        none.to_string()
    } else {
        s
    }
}

fn service_row(s: &Service) -> Vec<String> {
    let spec = s.spec.clone().unwrap_or_default();
    let ty = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
    let external: Vec<String> = spec.external_ips.clone().unwrap_or_default();
    // kubectl: a LoadBalancer shows its ingress addresses, or <pending>.
    let external = match ty.as_str() {
        "ExternalName" => or(spec.external_name.clone().unwrap_or_default(), "<none>"),
        "LoadBalancer" => {
            let ingress = s
                .status
                .iter()
                .filter_map(|st| st.load_balancer.as_ref())
                .flat_map(|lb| lb.ingress.iter().flatten())
                .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()));
            or(
                ingress.chain(external).collect::<Vec<_>>().join(","),
                "<pending>",
            )
        }
        _ => or(external.join(","), "<none>"),
    };
    let ports: Vec<String> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let proto = model::protocol(p);
            match p.node_port {
                Some(n) => format!("{}:{n}/{proto}", p.port),
                None => format!("{}/{proto}", p.port),
            }
        })
        .collect();
    vec![
        s.metadata.namespace.clone().unwrap_or_default(),
        s.metadata.name.clone().unwrap_or_default(),
        ty,
        or(spec.cluster_ip.clone().unwrap_or_default(), "<none>"),
        external,
        or(ports.join(","), "<none>"),
    ]
}

fn slice_row(e: &EndpointSlice) -> Vec<String> {
    let service = e
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .unwrap_or_default();
    let addrs: Vec<&str> = e
        .endpoints
        .iter()
        .flatten()
        .flat_map(|ep| ep.addresses.iter().map(String::as_str))
        .collect();
    // kubectl shows three and counts the rest.
    let endpoints = match addrs.len() {
        0 => "<unset>".to_string(),
        1..=3 => addrs.join(","),
        n => format!("{} + {} more...", addrs[..3].join(","), n - 3),
    };
    vec![
        e.metadata.namespace.clone().unwrap_or_default(),
        e.metadata.name.clone().unwrap_or_default(),
        or(service, "<none>"),
        endpoints,
    ]
}

/// Columns padded to their widest cell plus three spaces, as kubectl's
/// tabwriter does; no trailing blanks.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for r in std::iter::once(&head).chain(&rows) {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            line.push_str(c);
            if i + 1 < r.len() {
                let pad = widths[i] - c.chars().count() + 3;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{small, TempDir};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["ferryctl"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
    }

    /// Runs `args` (with `--store file:DIR`) on `stdin`: (result, stdout, stderr).
    fn ctl(dir: &TempDir, args: &[&str], stdin: &str) -> (Result<(), CtlError>, String, String) {
        let store = format!("file:{}", dir.0.display());
        let mut full = vec!["--store", &store];
        full.extend_from_slice(args);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let res = rt().block_on(run(cli(&full), &mut stdin.as_bytes(), &mut out, &mut err));
        let s = |v: Vec<u8>| String::from_utf8(v).unwrap();
        (res, s(out), s(err))
    }

    const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
  externalIPs: [192.0.2.10]
---
apiVersion: v1
kind: Service
metadata: {name: np, namespace: prod}
spec: {type: NodePort, ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: lb}
spec: {type: LoadBalancer, ports: [{port: 443}]}
status: {loadBalancer: {ingress: [{ip: 198.51.100.7}]}}
---
apiVersion: v1
kind: Service
metadata: {name: pending}
spec: {type: LoadBalancer, allocateLoadBalancerNodePorts: false}
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- addresses: [10.244.1.5]
- addresses: [10.244.1.6]
- addresses: [10.244.2.5]
- addresses: [10.244.2.6]
- addresses: [10.244.3.5]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-1, namespace: prod, labels: {kubernetes.io/service-name: np}}
addressType: IPv4
"#;

    #[test]
    fn apply_get_delete() {
        let d = TempDir::new("ctl1");
        let (res, out, err) = ctl(&d, &["apply", "-f", "-"], SERVICES);
        res.unwrap();
        assert_eq!(
            out,
            "service/default/web created\nservice/prod/np created\nservice/default/lb created\n\
             service/default/pending created\nservice/default/headless created\n\
             service/default/ext created\nendpointslice/default/web-1 created\n\
             endpointslice/prod/np-1 created\n"
        );
        assert!(err.contains("no service ranges yet"), "{err}");
        assert!(err.contains("10.96.0.0/12"), "{err}");

        let (res, out, _) = ctl(&d, &["get", "services"], "");
        res.unwrap();
        assert_eq!(
            out,
            "\
NAMESPACE   NAME       TYPE           CLUSTER-IP   EXTERNAL-IP    PORT(S)
default     ext        ExternalName   <none>       example.com    <none>
default     headless   ClusterIP      None         <none>         <none>
default     lb         LoadBalancer   10.96.0.3    198.51.100.7   443:30001/TCP
default     pending    LoadBalancer   10.96.0.4    <pending>      <none>
default     web        ClusterIP      10.96.0.1    192.0.2.10     80/TCP,53/UDP
prod        np         NodePort       10.96.0.2    <none>         8080:30000/TCP
"
        );
        let (res, out, _) = ctl(&d, &["get", "endpointslices"], "");
        res.unwrap();
        assert_eq!(
            out,
            "\
NAMESPACE   NAME    SERVICE   ENDPOINTS
default     web-1   web       10.244.1.5,10.244.1.6,10.244.2.5 + 2 more...
prod        np-1    np        <unset>
"
        );

        // The store now holds ranges: no note; the same file is unchanged.
        let (res, out, err) = ctl(&d, &["apply", "-f", "-"], SERVICES);
        res.unwrap();
        assert!(out.lines().all(|l| l.ends_with(" unchanged")), "{out}");
        assert_eq!(err, "");

        let (res, out, _) = ctl(&d, &["delete", "svc", "prod/np"], "");
        res.unwrap();
        assert_eq!(out, "service/prod/np deleted\n");
        // Its slice stays; the same delete again is an error.
        let (res, out, _) = ctl(&d, &["get", "endpointslices", "-o", "json"], "");
        res.unwrap();
        assert!(out.contains("\"np-1\""), "{out}");
        let (res, _, _) = ctl(&d, &["delete", "service", "prod/np"], "");
        assert_eq!(res, Err(CtlError("service/prod/np not found".into())));
        let (res, _, _) = ctl(
            &d,
            &["delete", "service", "prod/np", "--ignore-not-found"],
            "",
        );
        res.unwrap();

        let (res, out, _) = ctl(&d, &["delete", "-f", "-"], SERVICES);
        assert_eq!(res, Err(CtlError("service/prod/np not found".into())));
        assert_eq!(out.lines().count(), 7, "{out}");
        let (res, out, err) = ctl(&d, &["get", "services"], "");
        res.unwrap();
        assert_eq!((out.as_str(), err.as_str()), ("", "No resources found.\n"));
    }

    /// `get -o json|yaml` prints a v1 List that `apply` takes back as is.
    #[test]
    fn get_output_applies_back_unchanged() {
        let d = TempDir::new("ctl2");
        ctl(&d, &["apply", "-f", "-"], SERVICES).0.unwrap();
        for f in ["json", "yaml"] {
            for kind in ["services", "endpointslices"] {
                let (res, listed, _) = ctl(&d, &["get", kind, "-o", f], "");
                res.unwrap();
                let v: Value = if f == "json" {
                    serde_json::from_str(&listed).unwrap()
                } else {
                    serde_norway::from_str(&listed).unwrap()
                };
                assert_eq!(v["kind"], "List");
                let (res, out, _) = ctl(&d, &["apply", "-f", "-"], &listed);
                res.unwrap();
                assert!(
                    !out.is_empty() && out.lines().all(|l| l.ends_with(" unchanged")),
                    "{f} {kind}: {out}"
                );
            }
        }
    }

    #[test]
    fn errors_are_one_line_and_name_the_file() {
        let d = TempDir::new("ctl3");
        let file = d.0.join("bad.yaml");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{port: 0}]\n",
        )
        .unwrap();
        let (res, out, _) = ctl(&d, &["apply", "-f", file.to_str().unwrap()], "");
        assert_eq!(
            res.unwrap_err().to_string(),
            format!(
                "{}: Service default/s: spec.ports[0]: port 0 is not in 1..=65535",
                file.display()
            )
        );
        assert_eq!(out, "");
        let (res, _, _) = ctl(&d, &["apply", "-f", "-"], "a: [1,\n  2\nb: {");
        let e = res.unwrap_err().to_string();
        assert!(
            e.starts_with("<stdin>: document 1: not valid YAML or JSON"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        let (res, _, _) = ctl(&d, &["apply", "-f", "-"], "---\n");
        assert_eq!(res.unwrap_err().to_string(), "<stdin>: no objects in it");
        let (res, _, _) = ctl(&d, &["apply", "-f", "/nonexistent/x.yaml"], "");
        assert!(res
            .unwrap_err()
            .0
            .starts_with("/nonexistent/x.yaml: cannot read"));
        let (res, _, _) = ctl(&d, &["delete", "service", "Bad_Name"], "");
        assert!(res.unwrap_err().0.contains("must be a DNS label"));
        // The store is checked after the input: a bad file fails first.
        let mut out = Vec::new();
        let res = rt().block_on(run(
            cli(&["--store", "s3:x", "get", "services"]),
            &mut "".as_bytes(),
            &mut out,
            &mut Vec::new(),
        ));
        assert!(res.unwrap_err().0.contains("expected file:DIR, etcd:URL"));
    }

    #[test]
    fn kubernetes_store_points_to_kubectl() {
        for args in [
            &["--store", "kubernetes", "get", "services"][..],
            &["--store", "kubernetes", "apply", "-f", "-"][..],
        ] {
            let res = rt().block_on(run(
                cli(args),
                &mut SERVICES.as_bytes(),
                &mut Vec::new(),
                &mut Vec::new(),
            ));
            assert!(res.unwrap_err().0.contains("use kubectl"), "{args:?}");
        }
    }

    #[test]
    fn store_errors_name_the_file() {
        let d = TempDir::new("ctl4");
        ctl(&d, &["apply", "-f", "-"], SERVICES).0.unwrap();
        let taken = "apiVersion: v1\nkind: Service\nmetadata: {name: other}\nspec: {clusterIP: 10.96.0.1}\n";
        let (res, out, _) = ctl(&d, &["apply", "-f", "-"], taken);
        assert_eq!(
            res.unwrap_err().to_string(),
            "<stdin>: Service default/other: spec.clusterIP 10.96.0.1 is already taken by Service default/web"
        );
        assert_eq!(out, "");
    }

    #[test]
    fn status_for_people() {
        let body = r#"{"ready":true,"subnet":"10.244.1.0/24","peers":2,"reconciles":5,
            "reconcileErrors":0,"storeErrors":1,"lastReconcileUnix":0,
            "services":{"ports":3,"endpoints":7,"syncs":4,"errors":1,"lastSyncUnix":0,
            "lastSyncSeconds":0.0021,"lastError":"nftables: boom"}}"#;
        let t = status_text(body).unwrap();
        for want in [
            "Subnet:             10.244.1.0/24\n",
            "Peers:              2\n",
            "Services:           3 ports, 7 endpoints\n",
            "took 2.1 ms (4 syncs, 1 errors)",
            "Last error:         nftables: boom\n",
        ] {
            assert!(t.contains(want), "{want:?} in\n{t}");
        }
        assert!(status_text("nope").is_err());
        let kube = r#"{"services":{},"source":{"apiServer":"https://cp:6443",
            "watches":{"nodes":{"synced":true,"state":"watching","lastEventUnix":0}}}}"#;
        let t = status_text(kube).unwrap();
        assert!(t.contains("API server:         https://cp:6443\n"), "{t}");
        assert!(
            t.contains("Watch nodes:        watching, last event never\n"),
            "{t}"
        );
    }

    #[test]
    fn command_line() {
        let e = |args: &[&str]| {
            let mut v = vec!["ferryctl"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v).unwrap_err().to_string()
        };
        assert!(e(&["delete"]).contains("required"));
        assert!(e(&["delete", "service"]).contains("required"));
        assert!(e(&["delete", "-f", "x", "service", "a"]).contains("cannot be used with"));
        assert!(e(&["get", "pods"]).contains("invalid value"));
        assert!(e(&["get", "services", "-o", "wide"]).contains("invalid value"));
        assert!(matches!(
            cli(&["get", "svc"]).cmd,
            Cmd::Get(GetArgs {
                resource: Resource::Services,
                output: None
            })
        ));
        let c = cli(&["apply", "-f", "x.yaml", "--store", "etcd:h:1"]);
        assert_eq!(c.store, "etcd:h:1");
        assert_eq!(c.etcd_prefix, "/ferry");
        let cmd = <Cli as clap::CommandFactory>::command();
        let env = |id: &str| {
            cmd.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        assert_eq!(env("store").as_deref(), Some("FERRY_STORE"));
        assert_eq!(env("etcd_prefix").as_deref(), Some("FERRY_ETCD_PREFIX"));
    }

    /// `exec` works on any store: the ranges it reads are the store's.
    #[test]
    fn apply_uses_the_stores_ranges() {
        let d = TempDir::new("ctl5");
        rt().block_on(async {
            let s = FileStore::open(&d.0).unwrap();
            s.publish_ranges(&small()).await.unwrap();
            let objects = model::parse("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {type: NodePort, ports: [{port: 1}]}\n").unwrap();
            let job = Job::Apply { source: "f".into(), objects };
            let (mut out, mut err) = (Vec::new(), Vec::new());
            exec(&s, job, &mut out, &mut err).await.unwrap();
            assert!(err.is_empty());
            let table = render_table(Kind::Service, &s.services().await.unwrap());
            assert!(table.contains("10.96.0.1"), "{table}");
            assert!(table.contains("1:30000/TCP"), "{table}");
        });
    }
}
