//! `conf/kubernetes/` checked against ferryd itself: every document of
//! `ferry.yaml` is its Kubernetes type with no field that type does not know,
//! the ClusterRole grants exactly [`API_CALLS`], the ConfigMap is a config
//! file ferryd's own parser accepts, the DaemonSet mounts, probes and
//! addresses what those settings say, and `kind.yaml` makes the cluster the
//! manifest is written for.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount, Volume};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{Cli, Cmd, Settings, StoreSpec};
use crate::store::kube::API_CALLS;

fn conf_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../conf/kubernetes")
        .join(name)
}

fn read(name: &str) -> String {
    let p = conf_file(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The documents of a YAML stream, as JSON (empty documents dropped, as
/// kubectl does).
fn documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `doc` as `T`, and `T` written back is `doc` again: a field the type does
/// not know (a typo, a field at the wrong level) would be dropped silently by
/// deserialising alone, and by the API server too.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let what = format!("{} {}", doc["kind"], doc["metadata"]["name"]);
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what}: not its Kubernetes type: {e}"));
    let back = serde_json::to_value(&t).expect("serialisable");
    if back != *doc {
        panic!(
            "{what}: fields its Kubernetes type does not know (or wrongly typed): {}",
            unknown_fields(doc, &back, "").join(", ")
        );
    }
    t
}

/// The paths of `orig` that `back` lost or changed.
fn unknown_fields(orig: &Value, back: &Value, at: &str) -> Vec<String> {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => o
            .iter()
            .flat_map(|(k, v)| match b.get(k) {
                Some(bv) => unknown_fields(v, bv, &format!("{at}.{k}")),
                None => vec![format!("{at}.{k}")],
            })
            .collect(),
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => o
            .iter()
            .zip(b)
            .enumerate()
            .flat_map(|(i, (v, bv))| unknown_fields(v, bv, &format!("{at}[{i}]")))
            .collect(),
        _ if orig == back => vec![],
        _ => vec![format!("{at} ({orig} became {back})")],
    }
}

struct Manifest {
    account: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    config: ConfigMap,
    daemonset: DaemonSet,
}

fn manifest() -> Manifest {
    let docs = documents(&read("ferry.yaml"));
    let kinds: Vec<String> = docs
        .iter()
        .map(|d| format!("{}/{}", d["apiVersion"], d["kind"]).replace('"', ""))
        .collect();
    assert_eq!(
        kinds,
        [
            "v1/ServiceAccount",
            "rbac.authorization.k8s.io/v1/ClusterRole",
            "rbac.authorization.k8s.io/v1/ClusterRoleBinding",
            "v1/ConfigMap",
            "apps/v1/DaemonSet",
        ],
        "the documents of ferry.yaml"
    );
    Manifest {
        account: strict(&docs[0]),
        role: strict(&docs[1]),
        binding: strict(&docs[2]),
        config: strict(&docs[3]),
        daemonset: strict(&docs[4]),
    }
}

impl Manifest {
    fn pod(&self) -> &PodSpec {
        let spec = self.daemonset.spec.as_ref().expect("DaemonSet spec");
        spec.template.spec.as_ref().expect("pod spec")
    }

    fn ferryd(&self) -> &Container {
        let c = &self.pod().containers;
        assert_eq!(c.len(), 1, "one container");
        &c[0]
    }

    fn init(&self, name: &str) -> &Container {
        self.pod()
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no init container {name}"))
    }

    fn volume(&self, name: &str) -> &Volume {
        self.pod()
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    /// The host directory mounted at `path` in `c`.
    fn host_dir_at(&self, c: &Container, path: &Path) -> Option<String> {
        let m = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| Path::new(&m.mount_path) == path)?;
        Some(self.volume(&m.name).host_path.as_ref()?.path.clone())
    }

    fn env(&self, name: &str) -> &k8s_openapi::api::core::v1::EnvVar {
        self.ferryd()
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("ferryd has no env {name}"))
    }

    /// ferryd's settings as the DaemonSet's container resolves them: its
    /// command line, with `--config` read from the ConfigMap through the
    /// volume it is mounted from, parsed by ferryd's own parser.
    fn settings(&self) -> Settings {
        let cmd = self.ferryd().command.clone().expect("ferryd's command");
        assert_eq!(cmd[0], "/usr/local/bin/ferryd", "where the image puts it");
        let at = cmd.iter().position(|a| a == "--config").expect("--config");
        let path = Path::new(&cmd[at + 1]);
        let mount = self
            .ferryd()
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| Some(Path::new(&m.mount_path)) == path.parent())
            .unwrap_or_else(|| panic!("nothing mounted where {} is", path.display()));
        let source = self.volume(&mount.name).config_map.as_ref();
        let config_name = self.config.metadata.name.as_deref();
        assert_eq!(
            source.map(|c| c.name.as_str()),
            config_name,
            "the config comes from the ConfigMap"
        );
        let key = path.file_name().unwrap().to_str().unwrap();
        let text = self
            .config
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .unwrap_or_else(|| panic!("the ConfigMap has no key {key}"));

        // One file per call: the tests run at once.
        static N: AtomicUsize = AtomicUsize::new(0);
        let file = std::env::temp_dir().join(format!(
            "ferry-manifest-{}-{}.json",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&file, text).unwrap();
        let mut argv = cmd.clone();
        argv[at + 1] = file.to_str().unwrap().into();
        let args = match Cli::try_parse_from(argv)
            .expect("ferryd's command line")
            .cmd
        {
            Cmd::Run(a) => *a,
            other => panic!("ferryd {other:?}: not run"),
        };
        let args = args.with_config_file();
        std::fs::remove_file(&file).unwrap();
        let args = args.expect("the ConfigMap's config file");
        assert_eq!(args.node_name, None, "the node name comes from the pod");
        Settings::resolve(args, "ferry-worker").expect("ferryd accepts the config")
    }
}

#[test]
fn every_document_is_its_kubernetes_type() {
    let m = manifest();
    for (what, ns) in [
        ("ServiceAccount", &m.account.metadata.namespace),
        ("ConfigMap", &m.config.metadata.namespace),
        ("DaemonSet", &m.daemonset.metadata.namespace),
    ] {
        assert_eq!(ns.as_deref(), Some("kube-system"), "{what}'s namespace");
    }
}

/// `(group, resource[/subresource], verb)`.
type Grant = (String, String, String);

#[test]
fn cluster_role_grants_exactly_the_api_calls() {
    let m = manifest();
    let mut granted: BTreeSet<Grant> = BTreeSet::new();
    for r in m.role.rules.iter().flatten() {
        assert!(
            r.resource_names.is_none() && r.non_resource_urls.is_none(),
            "{r:?}: resourceNames / nonResourceURLs are not used"
        );
        let groups = r.api_groups.clone().unwrap_or_default();
        let resources = r.resources.clone().unwrap_or_default();
        for g in &groups {
            for res in &resources {
                for v in &r.verbs {
                    for s in [g, res, v] {
                        assert!(!s.contains('*'), "{r:?}: no wildcards");
                    }
                    granted.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    let needed: BTreeSet<Grant> = API_CALLS
        .iter()
        .flat_map(|c| {
            let res = match c.subresource {
                Some(s) => format!("{}/{s}", c.resource),
                None => c.resource.to_string(),
            };
            c.verbs
                .iter()
                .map(move |v| (c.group.to_string(), res.clone(), v.to_string()))
        })
        .collect();
    let missing: Vec<_> = needed.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&needed).collect();
    assert!(
        missing.is_empty(),
        "the ClusterRole lacks calls ferryd makes: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "the ClusterRole grants calls ferryd never makes: {extra:?}"
    );
}

#[test]
fn the_daemonset_runs_as_the_bound_account() {
    let m = manifest();
    let b = &m.binding;
    assert_eq!(
        b.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&b.role_ref.name), m.role.metadata.name.as_ref());
    let subjects: Vec<_> = b
        .subjects
        .iter()
        .flatten()
        .map(|s| (s.kind.as_str(), Some(&s.name), s.namespace.as_ref()))
        .collect();
    assert_eq!(
        subjects,
        [(
            "ServiceAccount",
            m.account.metadata.name.as_ref(),
            m.account.metadata.namespace.as_ref()
        )]
    );
    let pod = m.pod();
    assert_eq!(
        pod.service_account_name.as_ref(),
        m.account.metadata.name.as_ref()
    );
    assert_ne!(
        pod.automount_service_account_token,
        Some(false),
        "ferryd reads its token"
    );
    assert_ne!(m.account.automount_service_account_token, Some(false));
}

#[test]
fn the_configmap_is_a_config_ferryd_accepts() {
    let m = manifest();
    let s = m.settings();
    assert_eq!(s.store, StoreSpec::Kubernetes);
    assert_eq!(
        s.listen,
        Some("127.0.0.1:9475".parse().unwrap()),
        "loopback only (see the probes)"
    );
    let node = m.env("FERRYD_NODE_NAME");
    let field = node.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
    assert_eq!(field.map(|f| f.field_path.as_str()), Some("spec.nodeName"));
}

#[test]
fn the_daemonset_fits_ferryds_settings() {
    let m = manifest();
    let s = m.settings();
    let pod = m.pod();
    let ferryd = m.ferryd();

    // The conflist, the plugins it names and the readiness file the plugin
    // checks are read by the node's runtime at the paths ferryd writes into
    // the conflist: each is the same host directory at the same path.
    for dir in [&s.cni_conf_dir, &s.cni_bin_dir, &s.run_dir] {
        assert_eq!(
            m.host_dir_at(ferryd, dir).as_deref().map(Path::new),
            Some(dir.as_path()),
            "ferryd's {} is the host's",
            dir.display()
        );
    }
    // The init container installs both plugins into that same bin dir.
    let install = m.init("install-cni");
    let script = install
        .command
        .iter()
        .flatten()
        .cloned()
        .collect::<String>();
    let into = install
        .volume_mounts
        .iter()
        .flatten()
        .find(|vm| {
            m.volume(&vm.name)
                .host_path
                .as_ref()
                .map(|h| Path::new(&h.path))
                == Some(&s.cni_bin_dir)
        })
        .expect("install-cni mounts the host's CNI bin dir");
    assert!(script.contains(&into.mount_path), "{script}");
    for p in ["ferry ", "ferry-ipam"] {
        assert!(script.contains(p), "install-cni installs {p}: {script}");
    }

    // Probes hit what ferryd listens on, on the host network.
    assert_eq!(pod.host_network, Some(true));
    let listen = s.listen.expect("ferryd serves /readyz");
    for (probe, path) in [
        (&ferryd.readiness_probe, "/readyz"),
        (&ferryd.liveness_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        let port = match &get.port {
            IntOrString::Int(p) => *p,
            IntOrString::String(n) => panic!("port by name {n}"),
        };
        let at: SocketAddr = format!("{}:{port}", get.host.as_deref().unwrap_or("<pod IP>"))
            .parse()
            .expect("probe host is an address");
        assert_eq!((at, get.path.as_deref()), (listen, Some(path)));
    }
    let ports: Vec<_> = ferryd
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    assert_eq!(ports, [i32::from(listen.port())], "the port is declared");

    // The node's network is ferryd's to manage, with one capability and
    // no more; the one sysctl it needs is set by a privileged one-shot.
    let sc = ferryd.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(caps.add.as_deref(), Some(&["NET_ADMIN".to_string()][..]));
    let sysctls = m.init("sysctls");
    assert_eq!(
        sysctls.security_context.as_ref().and_then(|c| c.privileged),
        Some(true)
    );
    assert!(sysctls
        .command
        .iter()
        .flatten()
        .any(|c| c.contains("/proc/sys/net/ipv4/ip_forward")));

    // Everywhere, first, and one node at a time.
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint"
    );
    let strategy = m.daemonset.spec.as_ref().unwrap().update_strategy.as_ref();
    assert_eq!(
        strategy.and_then(|u| u.type_.as_deref()),
        Some("RollingUpdate")
    );
    let rolling = strategy.and_then(|u| u.rolling_update.as_ref()).unwrap();
    assert_eq!(
        rolling.max_surge,
        Some(IntOrString::Int(0)),
        "never two ferryds on a node"
    );
    let requests = ferryd.resources.as_ref().and_then(|r| r.requests.as_ref());
    assert!(requests.is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")));

    // One image, with the workspace's version as its tag (never `latest`,
    // which the kubelet would pull from a registry instead of using the
    // image `kind load` put on the node).
    let all: Vec<&Container> = pod
        .init_containers
        .iter()
        .flatten()
        .chain(&pod.containers)
        .collect();
    let want = format!("ferry:{}", env!("CARGO_PKG_VERSION"));
    for c in all {
        assert_eq!(
            c.image.as_deref(),
            Some(want.as_str()),
            "{}'s image",
            c.name
        );
        assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    }
}

#[test]
fn the_image_holds_what_the_pods_run() {
    let docker = read("Dockerfile");
    let copy = docker
        .lines()
        .find(|l| l.starts_with("COPY --from=build"))
        .expect("the runtime stage copies the binaries");
    let dest = copy.split_whitespace().last().unwrap();
    assert_eq!(dest, "/usr/local/bin/");
    for bin in ["ferryd", "ferryctl", "ferry", "ferry-ipam"] {
        assert!(
            copy.split_whitespace()
                .any(|w| w.ends_with(&format!("/{bin}"))),
            "the image has {bin}: {copy}"
        );
    }
    assert!(
        docker.contains("protobuf-compiler"),
        "etcd-client's build needs protoc"
    );
    let m = manifest();
    let script = m
        .init("install-cni")
        .command
        .iter()
        .flatten()
        .cloned()
        .collect::<String>();
    assert!(script.contains("/usr/local/bin/$p"), "{script}");
}

/// The part of kind's `kind.x-k8s.io/v1alpha4` Cluster that kind.yaml uses.
/// Unknown fields are refused, as kind itself does.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KindCluster {
    kind: String,
    api_version: String,
    name: String,
    networking: KindNetworking,
    nodes: Vec<KindNode>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KindNetworking {
    #[serde(rename = "disableDefaultCNI")]
    disable_default_cni: bool,
    kube_proxy_mode: String,
    pod_subnet: String,
    service_subnet: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KindNode {
    role: String,
}

#[test]
fn kind_makes_the_cluster_the_manifest_is_for() {
    let k: KindCluster = serde_norway::from_str(&read("kind.yaml")).expect("kind.yaml");
    assert_eq!(
        (k.kind.as_str(), k.api_version.as_str()),
        ("Cluster", "kind.x-k8s.io/v1alpha4")
    );
    // ferry is the network and the Services proxy.
    assert!(k.networking.disable_default_cni);
    assert_eq!(k.networking.kube_proxy_mode, "none");
    let roles: Vec<_> = k.nodes.iter().map(|n| n.role.as_str()).collect();
    assert_eq!(roles, ["control-plane", "worker", "worker"]);

    // The ConfigMap's subnets are the cluster's.
    let m = manifest();
    let s = m.settings();
    assert_eq!(k.networking.pod_subnet, s.cluster_cidr.to_string());
    assert_eq!(
        k.networking.service_subnet,
        s.service_ranges.service_cidr.to_string()
    );
    // ferryd reaches the API server at kind's control-plane node.
    let host = m.env("KUBERNETES_SERVICE_HOST").value.as_deref();
    let port = m.env("KUBERNETES_SERVICE_PORT").value.as_deref();
    let cp = format!("{}-control-plane", k.name);
    assert_eq!((host, port), (Some(cp.as_str()), Some("6443")));
}
