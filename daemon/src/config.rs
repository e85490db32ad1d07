//! Command line and config file. Every `run` flag can also be set in a JSON
//! config file (`--config`, keys spelled like the flags) or through an
//! environment variable `FERRYD_<FLAG>`; the command line wins over the
//! environment, which wins over the file, which wins over the defaults.
//!
//! `Settings::resolve` is pure: it validates everything before ferryd
//! touches the store or the kernel.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnetwork::Ipv4Network;
use serde::Deserialize;

use crate::service::alloc::Ranges;
use crate::store::etcd_conn::EtcdAccess;

#[derive(Parser, Debug)]
#[command(
    name = "ferryd",
    version,
    about = "ferry node daemon: pod subnets, VXLAN overlay, egress masquerade"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the node daemon.
    Run(Box<RunArgs>),
    /// Mark a node as gone: peers remove its routes at once; its subnet
    /// stays reserved until its lease expires.
    Leave(Box<LeaveArgs>),
}

#[derive(Args, Debug)]
pub struct LeaveArgs {
    /// Node to remove (default: this host's name).
    #[arg(long, env = "FERRYD_NODE_NAME")]
    pub node_name: Option<String>,
    /// `file:DIR`, `etcd:URL[,URL...]` or `kubernetes`.
    #[arg(long, env = "FERRYD_STORE")]
    pub store: Option<String>,
    #[arg(long, env = "FERRYD_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    #[arg(long, env = "FERRYD_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    #[arg(long, env = "FERRYD_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,
    #[arg(long, env = "FERRYD_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,
    #[arg(long, env = "FERRYD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    #[arg(long, env = "FERRYD_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
    /// With `--store kubernetes`: the kubeconfig to use.
    #[arg(long, env = "FERRYD_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// With `--store kubernetes`: the API server's URL, replacing the
    /// kubeconfig's or the in-cluster one.
    #[arg(long, env = "FERRYD_API_SERVER")]
    pub api_server: Option<String>,
    /// Read node name and store from this config file.
    #[arg(long, env = "FERRYD_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Flags of `ferryd run`. All optional here so that the command line, the
/// environment and the config file can be layered; defaults come last.
#[derive(Args, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunArgs {
    /// JSON config file with any of these flags as keys.
    #[arg(long, env = "FERRYD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's name in the store [default: the host name].
    #[arg(long, env = "FERRYD_NODE_NAME")]
    pub node_name: Option<String>,
    /// Underlay interface; its first IPv4 address is the VTEP address.
    #[arg(long, env = "FERRYD_UNDERLAY_IFACE")]
    pub underlay_iface: Option<String>,
    /// Underlay address (instead of, or to pick one of, the interface's).
    #[arg(long, env = "FERRYD_UNDERLAY_IP")]
    pub underlay_ip: Option<Ipv4Addr>,
    /// The pod network of the whole cluster [default: 10.244.0.0/16].
    #[arg(long, env = "FERRYD_CLUSTER_CIDR")]
    pub cluster_cidr: Option<Ipv4Network>,
    /// Prefix length of each node's pod subnet [default: 24].
    #[arg(long, env = "FERRYD_SUBNET_LEN")]
    pub subnet_len: Option<u8>,
    /// Cluster state: `file:DIR`, `etcd:URL[,URL...]` or `kubernetes` [default: file:/var/lib/ferry/store].
    #[arg(long, env = "FERRYD_STORE")]
    pub store: Option<String>,
    /// Key prefix in etcd [default: /ferry].
    #[arg(long, env = "FERRYD_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    /// With an `https://` etcd: the CA that signed etcd's server
    /// certificate [default: the system's CAs].
    #[arg(long, env = "FERRYD_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// With an `https://` etcd: this node's client certificate (PEM), for
    /// etcd's --client-cert-auth.
    #[arg(long, env = "FERRYD_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,
    /// The private key of --etcd-cert-file (PEM).
    #[arg(long, env = "FERRYD_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,
    /// An etcd user (etcd's own authentication).
    #[arg(long, env = "FERRYD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    /// A file holding --etcd-username's password (never on the command line).
    #[arg(long, env = "FERRYD_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
    /// With `--store kubernetes`: the kubeconfig to use [default: in-cluster
    /// configuration, else $KUBECONFIG or ~/.kube/config].
    #[arg(long, env = "FERRYD_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// With `--store kubernetes`: the API server's URL, replacing the
    /// kubeconfig's or the in-cluster one (without kube-proxy, the
    /// `kubernetes` Service's ClusterIP is served by ferryd itself).
    #[arg(long, env = "FERRYD_API_SERVER")]
    pub api_server: Option<String>,
    /// Where the CNI conflist is written [default: /etc/cni/net.d].
    #[arg(long, env = "FERRYD_CNI_CONF_DIR")]
    pub cni_conf_dir: Option<PathBuf>,
    /// Where `ferry` and `ferry-ipam` are installed [default: /opt/cni/bin].
    #[arg(long, env = "FERRYD_CNI_BIN_DIR")]
    pub cni_bin_dir: Option<PathBuf>,
    /// The plugin's `dataDir` [default: /var/lib/cni/ferry].
    #[arg(long, env = "FERRYD_CNI_DATA_DIR")]
    pub cni_data_dir: Option<PathBuf>,
    /// `ipam.dataDir` of ferry-ipam [default: /var/lib/cni/networks].
    #[arg(long, env = "FERRYD_IPAM_DATA_DIR")]
    pub ipam_data_dir: Option<PathBuf>,
    /// CNI network name [default: ferry].
    #[arg(long, env = "FERRYD_NETWORK_NAME")]
    pub network_name: Option<String>,
    /// Node bridge the pods attach to [default: ferry0].
    #[arg(long, env = "FERRYD_BRIDGE")]
    pub bridge: Option<String>,
    /// VXLAN network identifier; the device is `ferry.<vni>` [default: 1].
    #[arg(long, env = "FERRYD_VNI")]
    pub vni: Option<u32>,
    /// VXLAN UDP port [default: 8472].
    #[arg(long, env = "FERRYD_VXLAN_PORT")]
    pub vxlan_port: Option<u16>,
    /// Pod and VXLAN MTU [default: underlay MTU - 50].
    #[arg(long, env = "FERRYD_MTU")]
    pub mtu: Option<u32>,
    /// Peers on the same L2 segment get a plain route, no encapsulation.
    #[arg(long, env = "FERRYD_DIRECT_ROUTING", num_args = 0..=1, default_missing_value = "true")]
    pub direct_routing: Option<bool>,
    /// Masquerade pod traffic leaving the cluster CIDR [default: true].
    #[arg(long, env = "FERRYD_MASQUERADE", num_args = 0..=1, default_missing_value = "true")]
    pub masquerade: Option<bool>,
    /// Address for /healthz, /readyz and /metrics, or `off` [default: 127.0.0.1:9475].
    #[arg(long, env = "FERRYD_LISTEN")]
    pub listen: Option<String>,
    /// Runtime directory; holds the readiness file `ready` [default: /run/ferry].
    #[arg(long, env = "FERRYD_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// Full reconcile period, e.g. `10s`, `500ms` [default: 10s].
    #[arg(long, env = "FERRYD_RECONCILE_INTERVAL")]
    pub reconcile_interval: Option<String>,
    /// Lifetime of this node's subnet lease without renewal, e.g. `24h` [default: 24h].
    #[arg(long, env = "FERRYD_LEASE_TTL")]
    pub lease_ttl: Option<String>,
    /// error, warn, info, debug or trace [default: info].
    #[arg(long, env = "FERRYD_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Where Services' clusterIPs come from; kept in the store, which
    /// refuses another one [default: 10.96.0.0/12].
    #[arg(long, env = "FERRYD_SERVICE_CIDR")]
    pub service_cidr: Option<Ipv4Network>,
    /// Where Services' node ports come from, FIRST-LAST; kept in the
    /// store like the service CIDR [default: 30000-32767].
    #[arg(long, env = "FERRYD_NODEPORT_RANGE")]
    pub nodeport_range: Option<String>,
}

macro_rules! layer {
    ($hi:expr, $lo:expr, $($f:ident),*) => {
        RunArgs { config: $hi.config.take(), $($f: $hi.$f.take().or($lo.$f.take())),* }
    };
}

impl RunArgs {
    /// Fills flags not given on the command line from the config file.
    pub fn with_config_file(mut self) -> Result<RunArgs, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        let mut file: RunArgs = serde_json::from_str(&text)
            .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
        Ok(layer!(
            self,
            file,
            node_name,
            underlay_iface,
            underlay_ip,
            cluster_cidr,
            subnet_len,
            store,
            etcd_prefix,
            etcd_ca_file,
            etcd_cert_file,
            etcd_key_file,
            etcd_username,
            etcd_password_file,
            kubeconfig,
            api_server,
            cni_conf_dir,
            cni_bin_dir,
            cni_data_dir,
            ipam_data_dir,
            network_name,
            bridge,
            vni,
            vxlan_port,
            mtu,
            direct_routing,
            masquerade,
            listen,
            run_dir,
            reconcile_interval,
            lease_ttl,
            log_level,
            service_cidr,
            nodeport_range
        ))
    }
}

impl RunArgs {
    /// The etcd flags, checked against the store they go with.
    pub fn etcd_access(&self, store: &StoreSpec) -> Result<EtcdAccess, ConfigError> {
        let access = EtcdAccess {
            ca_file: self.etcd_ca_file.clone(),
            cert_file: self.etcd_cert_file.clone(),
            key_file: self.etcd_key_file.clone(),
            username: self.etcd_username.clone(),
            password_file: self.etcd_password_file.clone(),
        };
        access.check(store.etcd_urls()).map_err(bad)?;
        Ok(access)
    }
}

impl LeaveArgs {
    /// As `run` flags, to be layered over the config file the same way.
    pub fn into_run_args(self) -> RunArgs {
        RunArgs {
            config: self.config,
            node_name: self.node_name,
            store: self.store,
            etcd_prefix: self.etcd_prefix,
            etcd_ca_file: self.etcd_ca_file,
            etcd_cert_file: self.etcd_cert_file,
            etcd_key_file: self.etcd_key_file,
            etcd_username: self.etcd_username,
            etcd_password_file: self.etcd_password_file,
            kubeconfig: self.kubeconfig,
            api_server: self.api_server,
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    File(PathBuf),
    Etcd(Vec<String>),
    /// The Kubernetes API ([`crate::store::kube`]).
    Kubernetes,
}

impl StoreSpec {
    pub fn parse(s: &str) -> Result<StoreSpec, ConfigError> {
        if s == "kubernetes" {
            return Ok(StoreSpec::Kubernetes);
        }
        if let Some(dir) = s.strip_prefix("file:") {
            if dir.is_empty() || !Path::new(dir).is_absolute() {
                return Err(bad(format!(
                    "--store {s:?}: the file store needs an absolute directory, e.g. file:/var/lib/ferry/store"
                )));
            }
            return Ok(StoreSpec::File(dir.into()));
        }
        if let Some(urls) = s.strip_prefix("etcd:") {
            let urls: Vec<String> = urls
                .split(',')
                .filter(|u| !u.is_empty())
                .map(|u| {
                    if u.contains("://") {
                        u.to_string()
                    } else {
                        format!("http://{u}")
                    }
                })
                .collect();
            if urls.is_empty() {
                return Err(bad(format!(
                    "--store {s:?}: no etcd endpoint given, e.g. etcd:http://127.0.0.1:2379"
                )));
            }
            if let Some(u) = urls
                .iter()
                .find(|u| !u.starts_with("http://") && !u.starts_with("https://"))
            {
                return Err(bad(format!(
                    "--store: etcd endpoint {u:?}: only http:// and https:// are supported"
                )));
            }
            return Ok(StoreSpec::Etcd(urls));
        }
        Err(bad(format!(
            "--store {s:?}: expected file:DIR, etcd:URL[,URL...] or kubernetes"
        )))
    }
}

impl StoreSpec {
    /// The endpoints of an etcd store.
    pub fn etcd_urls(&self) -> Option<&[String]> {
        match self {
            StoreSpec::Etcd(urls) => Some(urls),
            _ => None,
        }
    }
}

/// Parses `500ms`, `10s`, `5m`, `24h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| bad(format!("bad duration {s:?} (e.g. 500ms, 10s, 5m, 24h)")))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad(format!("bad duration unit in {s:?} (ms, s, m, h)"))),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(bad(format!("duration {s:?} must be positive")));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnderlaySpec {
    /// The interface of the default route.
    Auto,
    Iface(String),
    Ip(Ipv4Addr),
    Both(String, Ipv4Addr),
}

/// Validated settings of `ferryd run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub node_name: String,
    pub underlay: UnderlaySpec,
    pub cluster_cidr: Ipv4Network,
    pub subnet_len: u8,
    pub store: StoreSpec,
    pub etcd_prefix: String,
    /// `--etcd-ca-file` and the other ways of reaching etcd.
    pub etcd_access: EtcdAccess,
    /// `--kubeconfig`, `--api-server` (used with `--store kubernetes`).
    pub kubeconfig: Option<PathBuf>,
    pub api_server: Option<String>,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_data_dir: PathBuf,
    pub ipam_data_dir: PathBuf,
    pub network_name: String,
    pub bridge: String,
    pub vni: u32,
    pub vxlan_port: u16,
    pub mtu: Option<u32>,
    pub direct_routing: bool,
    pub masquerade: bool,
    pub listen: Option<SocketAddr>,
    pub run_dir: PathBuf,
    pub reconcile_interval: Duration,
    pub lease_ttl: Duration,
    pub log_level: tracing::Level,
    /// `--service-cidr` and `--nodeport-range`.
    pub service_ranges: Ranges,
}

pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

fn abs_dir(flag: &str, p: Option<PathBuf>, default: &str) -> Result<PathBuf, ConfigError> {
    let p = p.unwrap_or_else(|| default.into());
    if !p.is_absolute() {
        return Err(bad(format!(
            "--{flag} {}: must be an absolute path",
            p.display()
        )));
    }
    Ok(p)
}

pub fn default_node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

impl Settings {
    /// Validates the layered flags; `hostname` is the default node name.
    pub fn resolve(a: RunArgs, hostname: &str) -> Result<Settings, ConfigError> {
        let store = StoreSpec::parse(a.store.as_deref().unwrap_or("file:/var/lib/ferry/store"))?;
        let etcd_access = a.etcd_access(&store)?;
        let node_name = a.node_name.unwrap_or_else(|| hostname.to_string());
        if !valid_name(&node_name) {
            return Err(bad(format!(
                "--node-name {node_name:?}: must be 1-253 characters of [A-Za-z0-9._-], starting with a letter or digit"
            )));
        }
        let underlay = match (a.underlay_iface, a.underlay_ip) {
            (None, None) => UnderlaySpec::Auto,
            (Some(i), ip) => {
                if !valid_ifname(&i) {
                    return Err(bad(format!(
                        "--underlay-iface {i:?}: not a valid interface name"
                    )));
                }
                match ip {
                    Some(ip) => UnderlaySpec::Both(i, ip),
                    None => UnderlaySpec::Iface(i),
                }
            }
            (None, Some(ip)) => UnderlaySpec::Ip(ip),
        };
        let cluster_cidr = a
            .cluster_cidr
            .unwrap_or_else(|| "10.244.0.0/16".parse().expect("valid"));
        if cluster_cidr.ip() != cluster_cidr.network() {
            return Err(bad(format!(
                "--cluster-cidr {cluster_cidr}: host bits set (did you mean {}/{}?)",
                cluster_cidr.network(),
                cluster_cidr.prefix()
            )));
        }
        let subnet_len = a.subnet_len.unwrap_or(24);
        if subnet_len < cluster_cidr.prefix() || subnet_len > 30 {
            return Err(bad(format!(
                "--subnet-len {subnet_len}: must be between the cluster prefix /{} and /30",
                cluster_cidr.prefix()
            )));
        }
        let etcd_prefix = a.etcd_prefix.unwrap_or_else(|| "/ferry".into());
        if !etcd_prefix.starts_with('/') {
            return Err(bad(format!(
                "--etcd-prefix {etcd_prefix:?}: must start with /"
            )));
        }
        if let Some(url) = &a.api_server {
            crate::store::kube::parse_api_server(url).map_err(bad)?;
        }
        let network_name = a.network_name.unwrap_or_else(|| "ferry".into());
        if !valid_name(&network_name) {
            return Err(bad(format!(
                "--network-name {network_name:?}: invalid CNI network name"
            )));
        }
        let bridge = a.bridge.unwrap_or_else(|| "ferry0".into());
        if !valid_ifname(&bridge) {
            return Err(bad(format!(
                "--bridge {bridge:?}: not a valid interface name"
            )));
        }
        let vni = a.vni.unwrap_or(1);
        if vni == 0 || vni >= 1 << 24 {
            return Err(bad(format!("--vni {vni}: must be 1..16777215")));
        }
        let vxlan_port = a.vxlan_port.unwrap_or(8472);
        if vxlan_port == 0 {
            return Err(bad("--vxlan-port must not be 0"));
        }
        if let Some(mtu) = a.mtu {
            if !(576..=65485).contains(&mtu) {
                return Err(bad(format!("--mtu {mtu}: must be 576..65485")));
            }
        }
        let listen = match a.listen.as_deref().unwrap_or("127.0.0.1:9475") {
            "off" | "none" | "" => None,
            s => Some(
                s.parse()
                    .map_err(|_| bad(format!("--listen {s:?}: expected ADDRESS:PORT or off")))?,
            ),
        };
        let reconcile_interval = parse_duration(a.reconcile_interval.as_deref().unwrap_or("10s"))
            .map_err(|e| bad(format!("--reconcile-interval: {e}")))?;
        let lease_ttl = parse_duration(a.lease_ttl.as_deref().unwrap_or("24h"))
            .map_err(|e| bad(format!("--lease-ttl: {e}")))?;
        if lease_ttl < Duration::from_secs(5) {
            return Err(bad("--lease-ttl must be at least 5s"));
        }
        let log_level = match a.log_level.as_deref().unwrap_or("info") {
            "error" => tracing::Level::ERROR,
            "warn" => tracing::Level::WARN,
            "info" => tracing::Level::INFO,
            "debug" => tracing::Level::DEBUG,
            "trace" => tracing::Level::TRACE,
            l => {
                return Err(bad(format!(
                    "--log-level {l:?}: error, warn, info, debug or trace"
                )))
            }
        };
        let defaults = Ranges::default();
        let service_cidr = a.service_cidr.unwrap_or(defaults.service_cidr);
        let nodeport_range = a
            .nodeport_range
            .unwrap_or_else(|| defaults.node_ports_text());
        let service_ranges = Ranges::new(service_cidr, &nodeport_range).map_err(|e| {
            let flag = if e.starts_with("service CIDR") {
                "--service-cidr"
            } else {
                "--nodeport-range"
            };
            bad(format!("{flag}: {e}"))
        })?;
        // Overlapping, a ClusterIP could be a pod's address.
        if service_cidr.overlaps(cluster_cidr) {
            return Err(bad(format!(
                "--service-cidr {service_cidr} overlaps --cluster-cidr {cluster_cidr}"
            )));
        }
        Ok(Settings {
            node_name,
            underlay,
            cluster_cidr,
            subnet_len,
            store,
            etcd_prefix,
            etcd_access,
            kubeconfig: a.kubeconfig,
            api_server: a.api_server,
            cni_conf_dir: abs_dir("cni-conf-dir", a.cni_conf_dir, "/etc/cni/net.d")?,
            cni_bin_dir: abs_dir("cni-bin-dir", a.cni_bin_dir, "/opt/cni/bin")?,
            cni_data_dir: abs_dir("cni-data-dir", a.cni_data_dir, "/var/lib/cni/ferry")?,
            ipam_data_dir: abs_dir("ipam-data-dir", a.ipam_data_dir, "/var/lib/cni/networks")?,
            network_name,
            bridge,
            vni,
            vxlan_port,
            mtu: a.mtu,
            direct_routing: a.direct_routing.unwrap_or(false),
            masquerade: a.masquerade.unwrap_or(true),
            listen,
            run_dir: abs_dir("run-dir", a.run_dir, "/run/ferry")?,
            reconcile_interval,
            lease_ttl,
            log_level,
            service_ranges,
        })
    }

    pub fn vxlan_device(&self) -> String {
        format!("ferry.{}", self.vni)
    }

    pub fn ready_file(&self) -> PathBuf {
        self.run_dir.join("ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RunArgs {
        let mut v = vec!["ferryd", "run"];
        v.extend_from_slice(extra);
        match Cli::try_parse_from(v).unwrap().cmd {
            Cmd::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults() {
        let s = Settings::resolve(args(&[]), "host1").unwrap();
        assert_eq!(s.node_name, "host1");
        assert_eq!(s.cluster_cidr.to_string(), "10.244.0.0/16");
        assert_eq!(s.subnet_len, 24);
        assert_eq!(s.store, StoreSpec::File("/var/lib/ferry/store".into()));
        assert_eq!(s.vni, 1);
        assert_eq!(s.vxlan_port, 8472);
        assert_eq!(s.vxlan_device(), "ferry.1");
        assert_eq!(s.listen, Some("127.0.0.1:9475".parse().unwrap()));
        assert!(s.masquerade && !s.direct_routing);
        assert_eq!(s.underlay, UnderlaySpec::Auto);
        assert_eq!(s.ready_file(), PathBuf::from("/run/ferry/ready"));
        assert_eq!(s.service_ranges, Ranges::default());
    }

    #[test]
    fn service_ranges_from_flags_env_and_file() {
        let s = Settings::resolve(
            args(&[
                "--service-cidr",
                "10.100.0.0/16",
                "--nodeport-range",
                "31000-31999",
            ]),
            "h",
        )
        .unwrap();
        assert_eq!(s.service_ranges.service_cidr.to_string(), "10.100.0.0/16");
        assert_eq!(s.service_ranges.node_ports, 31000..=31999);

        let dir = std::env::temp_dir().join(format!("ferryd-cfg-ranges-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.json");
        std::fs::write(
            &f,
            r#"{"service-cidr": "10.101.0.0/16", "nodeport-range": "1000-2000"}"#,
        )
        .unwrap();
        let a = args(&[
            "--config",
            f.to_str().unwrap(),
            "--nodeport-range",
            "3000-4000",
        ])
        .with_config_file()
        .unwrap();
        let s = Settings::resolve(a, "h").unwrap();
        assert_eq!(s.service_ranges.service_cidr.to_string(), "10.101.0.0/16");
        assert_eq!(
            s.service_ranges.node_ports,
            3000..=4000,
            "the flag wins over the file"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn service_ranges_env() {
        // Through clap's env handling, as FERRYD_* variables are read. A
        // variable no other test sets, so that tests running at once do
        // not see it.
        let cmd = <Cli as clap::CommandFactory>::command();
        let run = cmd.find_subcommand("run").unwrap();
        let envs: Vec<_> = run
            .get_arguments()
            .filter(|a| ["service_cidr", "nodeport_range"].contains(&a.get_id().as_str()))
            .map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            envs,
            [
                Some("FERRYD_SERVICE_CIDR".into()),
                Some("FERRYD_NODEPORT_RANGE".into())
            ]
        );
    }

    #[test]
    fn bad_service_ranges_are_clear() {
        let err = |a: &[&str]| Settings::resolve(args(a), "h").unwrap_err().0;
        assert_eq!(
            err(&["--service-cidr", "10.96.0.1/12"]),
            "--service-cidr: service CIDR 10.96.0.1/12: host bits set (did you mean 10.96.0.0/12?)"
        );
        assert!(err(&["--service-cidr", "10.96.0.0/31"]).contains("too small"));
        assert!(err(&["--service-cidr", "10.244.0.0/20"]).contains("overlaps --cluster-cidr"));
        assert_eq!(
            err(&["--nodeport-range", "32767-30000"]),
            "--nodeport-range: node-port range \"32767-30000\": 32767 is above 30000 (the range is inverted)"
        );
        assert!(err(&["--nodeport-range", "0-10"]).contains("outside 1..=65535"));
        assert!(err(&["--nodeport-range", "30000-65536"]).contains("port 65536 is outside"));
        assert!(err(&["--nodeport-range", "30000"]).starts_with("--nodeport-range:"));
        // Not a CIDR at all: clap refuses it, naming the flag.
        let e = Cli::try_parse_from(["ferryd", "run", "--service-cidr", "10.96.0.0/33"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--service-cidr"), "{e}");
    }

    #[test]
    fn flags() {
        let s = Settings::resolve(
            args(&[
                "--node-name",
                "n1",
                "--underlay-iface",
                "eth1",
                "--store",
                "etcd:127.0.0.1:2379,http://h:1",
                "--direct-routing",
                "--vni",
                "42",
                "--reconcile-interval",
                "500ms",
                "--listen",
                "off",
                "--masquerade",
                "false",
            ]),
            "x",
        )
        .unwrap();
        assert_eq!(s.node_name, "n1");
        assert_eq!(s.underlay, UnderlaySpec::Iface("eth1".into()));
        assert_eq!(
            s.store,
            StoreSpec::Etcd(vec!["http://127.0.0.1:2379".into(), "http://h:1".into()])
        );
        assert!(s.direct_routing && !s.masquerade);
        assert_eq!(s.vxlan_device(), "ferry.42");
        assert_eq!(s.reconcile_interval, Duration::from_millis(500));
        assert_eq!(s.listen, None);
    }

    #[test]
    fn bad_values_are_clear() {
        let err = |a: &[&str]| Settings::resolve(args(a), "h").unwrap_err().0;
        assert!(err(&["--store", "s3:x"]).contains("file:DIR, etcd:URL[,URL...] or kubernetes"));
        assert!(err(&["--store", "kubernetes:x"]).contains("or kubernetes"));
        assert!(err(&["--api-server", "kind-control-plane:6443"]).contains("--api-server"));
        assert!(err(&["--api-server", "ftp://h"]).contains("http:// or https://"));
        assert!(err(&["--store", "file:rel"]).contains("absolute"));
        assert!(err(&["--cluster-cidr", "10.244.1.0/16"]).contains("host bits"));
        assert!(err(&["--subnet-len", "8"]).contains("--subnet-len"));
        assert!(err(&["--vni", "0"]).contains("--vni"));
        assert!(err(&["--node-name=-x"]).contains("--node-name"));
        assert!(err(&["--underlay-iface", "a/b"]).contains("--underlay-iface"));
        assert!(err(&["--reconcile-interval", "10y"]).contains("unit"));
        assert!(err(&["--cni-conf-dir", "etc"]).contains("absolute"));
        assert!(err(&["--mtu", "70"]).contains("--mtu"));
        assert!(
            Settings::resolve(args(&[]), "").is_err(),
            "no hostname, no name"
        );
    }

    #[test]
    fn example_config_files_resolve() {
        for name in ["ferryd.json", "ferryd-etcd-tls.json"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../conf")
                .join(name);
            let a = args(&["--config", path.to_str().unwrap()])
                .with_config_file()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            Settings::resolve(a, "h").unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn config_file_is_layered_under_flags() {
        let dir = std::env::temp_dir().join(format!("ferryd-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.json");
        std::fs::write(
            &f,
            r#"{"node-name": "fromfile", "vni": 7, "cluster-cidr": "10.50.0.0/16", "direct-routing": true}"#,
        )
        .unwrap();
        let a = args(&["--config", f.to_str().unwrap(), "--vni", "9"])
            .with_config_file()
            .unwrap();
        let s = Settings::resolve(a, "h").unwrap();
        assert_eq!(s.node_name, "fromfile");
        assert_eq!(s.vni, 9);
        assert_eq!(s.cluster_cidr.to_string(), "10.50.0.0/16");
        assert!(s.direct_routing);
        std::fs::write(&f, r#"{"no-such-flag": 1}"#).unwrap();
        let e = args(&["--config", f.to_str().unwrap()])
            .with_config_file()
            .unwrap_err();
        assert!(e.0.contains("no-such-flag"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kubernetes_store_flags_env_and_file() {
        let s = Settings::resolve(
            args(&[
                "--store",
                "kubernetes",
                "--kubeconfig",
                "/etc/k.conf",
                "--api-server",
                "https://kind-control-plane:6443",
            ]),
            "h",
        )
        .unwrap();
        assert_eq!(s.store, StoreSpec::Kubernetes);
        assert_eq!(s.kubeconfig, Some(PathBuf::from("/etc/k.conf")));
        assert_eq!(
            s.api_server.as_deref(),
            Some("https://kind-control-plane:6443")
        );
        let d = Settings::resolve(args(&[]), "h").unwrap();
        assert_eq!((d.kubeconfig, d.api_server), (None, None));

        let dir = std::env::temp_dir().join(format!("ferryd-cfg-kube-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.json");
        std::fs::write(
            &f,
            r#"{"store": "kubernetes", "kubeconfig": "/k", "api-server": "http://10.0.0.1:6443"}"#,
        )
        .unwrap();
        let a = args(&["--config", f.to_str().unwrap()])
            .with_config_file()
            .unwrap();
        let s = Settings::resolve(a, "h").unwrap();
        assert_eq!(s.store, StoreSpec::Kubernetes);
        assert_eq!(s.kubeconfig, Some(PathBuf::from("/k")));
        assert_eq!(s.api_server.as_deref(), Some("http://10.0.0.1:6443"));
        std::fs::remove_dir_all(&dir).unwrap();

        let cmd = <Cli as clap::CommandFactory>::command();
        let run = cmd.find_subcommand("run").unwrap();
        let envs: Vec<_> = run
            .get_arguments()
            .filter(|a| ["kubeconfig", "api_server"].contains(&a.get_id().as_str()))
            .map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            envs,
            [
                Some("FERRYD_KUBECONFIG".into()),
                Some("FERRYD_API_SERVER".into())
            ]
        );
    }

    #[test]
    fn etcd_tls_and_user_flags_env_and_file() {
        let s = Settings::resolve(
            args(&[
                "--store",
                "etcd:https://10.0.0.5:2379",
                "--etcd-ca-file",
                "/pki/ca.pem",
                "--etcd-cert-file",
                "/pki/node.pem",
                "--etcd-key-file",
                "/pki/node-key.pem",
                "--etcd-username",
                "ferry",
                "--etcd-password-file",
                "/pki/pw",
            ]),
            "h",
        )
        .unwrap();
        assert_eq!(
            s.etcd_access,
            EtcdAccess {
                ca_file: Some("/pki/ca.pem".into()),
                cert_file: Some("/pki/node.pem".into()),
                key_file: Some("/pki/node-key.pem".into()),
                username: Some("ferry".into()),
                password_file: Some("/pki/pw".into()),
            }
        );
        // A typo in the scheme must not quietly drop TLS.
        let e = Settings::resolve(
            args(&[
                "--store",
                "etcd:http://10.0.0.5:2379",
                "--etcd-ca-file",
                "/ca",
            ]),
            "h",
        )
        .unwrap_err();
        assert!(e.0.contains("plain http://"), "{e}");
        let e = Settings::resolve(args(&["--etcd-username", "ferry"]), "h").unwrap_err();
        assert!(e.0.contains("only for an etcd store"), "{e}");

        let dir = std::env::temp_dir().join(format!("ferryd-cfg-etcd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.json");
        std::fs::write(
            &f,
            r#"{"store": "etcd:https://e:2379", "etcd-ca-file": "/ca", "etcd-username": "u", "etcd-password-file": "/pw"}"#,
        )
        .unwrap();
        let a = args(&["--config", f.to_str().unwrap()])
            .with_config_file()
            .unwrap();
        let s = Settings::resolve(a, "h").unwrap();
        assert_eq!(s.etcd_access.ca_file, Some(PathBuf::from("/ca")));
        assert_eq!(s.etcd_access.username.as_deref(), Some("u"));
        std::fs::remove_dir_all(&dir).unwrap();

        let cmd = <Cli as clap::CommandFactory>::command();
        for sub in ["run", "leave"] {
            let envs: Vec<_> = cmd
                .find_subcommand(sub)
                .unwrap()
                .get_arguments()
                .filter(|a| a.get_id().as_str().starts_with("etcd_") && a.get_id() != "etcd_prefix")
                .map(|a| a.get_env().unwrap().to_string_lossy().into_owned())
                .collect();
            assert_eq!(
                envs,
                [
                    "FERRYD_ETCD_CA_FILE",
                    "FERRYD_ETCD_CERT_FILE",
                    "FERRYD_ETCD_KEY_FILE",
                    "FERRYD_ETCD_USERNAME",
                    "FERRYD_ETCD_PASSWORD_FILE"
                ],
                "{sub}"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("x").is_err());
    }
}
