//! `ferryctl` end to end, the built binary against both stores: the file
//! store in a temp dir (no root needed) and a real etcd inside a test
//! namespace (root). Round trips through YAML, JSON, stdin and a v1 List;
//! every refused input exits 1 with its message and leaves the store byte
//! for byte as it was (etcd: not even its revision moves).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ferry_e2e::cluster::{Cluster, Opts, StoreKind, ETCD_URL};
use ferry_e2e::{ferryctl_bin, python3, require_root, TempDir, Value};

enum Backend {
    File(PathBuf),
    Etcd(Box<Cluster>),
}

/// One store and the way to run `ferryctl` on it.
struct Ctl {
    backend: Backend,
    dir: TempDir,
}

/// The outcome of one `ferryctl` run.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Run {
        assert_eq!(
            self.code,
            Some(0),
            "ferryctl failed:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }
}

impl Ctl {
    fn file() -> Ctl {
        let dir = TempDir::new();
        let store = dir.path().join("store");
        std::fs::create_dir(&store).unwrap();
        Ctl {
            backend: Backend::File(store),
            dir,
        }
    }

    /// etcd in the underlay namespace of a cluster without nodes.
    fn etcd() -> Ctl {
        Ctl {
            backend: Backend::Etcd(Box::new(Cluster::new(StoreKind::Etcd, 0, Opts::default()))),
            dir: TempDir::new(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let bin = ferryctl_bin();
        match &self.backend {
            // The file store through FERRY_STORE, etcd through --store:
            // both ways of naming the store are used.
            Backend::File(dir) => {
                let mut c = Command::new(bin);
                c.args(args)
                    .env("FERRY_STORE", format!("file:{}", dir.display()));
                c
            }
            Backend::Etcd(c) => {
                let store = format!("--store=etcd:{ETCD_URL}");
                let mut full = vec![bin.to_str().unwrap(), &store];
                full.extend_from_slice(args);
                let mut cmd = c.underlay.command(&full);
                cmd.env_remove("FERRY_STORE");
                cmd
            }
        }
    }

    /// `ferryctl ARGS`, `stdin` on its standard input.
    fn run(&self, args: &[&str], stdin: &str) -> Run {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ferryctl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let Output {
            status,
            stdout,
            stderr,
        } = child.wait_with_output().unwrap();
        Run {
            code: status.code(),
            stdout: String::from_utf8(stdout).unwrap(),
            stderr: String::from_utf8(stderr).unwrap(),
        }
    }

    /// `ferryctl apply -f FILE` with `text` written to a file first.
    fn apply_file(&self, name: &str, text: &str) -> Run {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        self.run(&["apply", "-f", path.to_str().unwrap()], "")
    }

    /// etcd's JSON gateway (v3 API over HTTP), from inside the namespace.
    fn etcd_http(&self, path: &str, body: &Value) -> Value {
        let Backend::Etcd(c) = &self.backend else {
            unreachable!()
        };
        let script = "import sys, urllib.request\n\
            req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), \
            headers={'Content-Type': 'application/json'})\n\
            sys.stdout.write(urllib.request.urlopen(req).read().decode())";
        let url = format!("{ETCD_URL}{path}");
        let out = c
            .underlay
            .ok(&[python3(), "-c", script, &url, &body.to_string()]);
        serde_json::from_str(&out).unwrap()
    }

    /// Everything the store holds. File store: every file and directory
    /// with its bytes. etcd: every key with value and revisions, and the
    /// store's revision, so that even a rewrite of equal bytes shows.
    fn dump(&self) -> String {
        match &self.backend {
            Backend::File(dir) => {
                let mut out = BTreeMap::new();
                walk(dir, dir, &mut out);
                format!("{out:?}")
            }
            Backend::Etcd(_) => {
                // key "\0" to range_end "\0": all keys.
                let v = self.etcd_http(
                    "/v3/kv/range",
                    &ferry_e2e::json!({"key": "AA==", "range_end": "AA=="}),
                );
                format!("{} {}", v["header"]["revision"], v["kvs"])
            }
        }
    }

    /// Stores `{serviceCIDR, nodePortRange}` as ferryd would at its start.
    fn preset_ranges(&self, cidr: &str, ports: &str) {
        let rec = format!(r#"{{"serviceCIDR": "{cidr}", "nodePortRange": "{ports}"}}"#);
        match &self.backend {
            Backend::File(dir) => std::fs::write(dir.join("ranges.json"), rec).unwrap(),
            Backend::Etcd(_) => {
                let b64 = |s: &str| base64(s.as_bytes());
                self.etcd_http(
                    "/v3/kv/put",
                    &ferry_e2e::json!({"key": b64("/ferry/ranges"), "value": b64(&rec)}),
                );
            }
        }
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        if p.is_dir() {
            out.insert(rel + "/", Vec::new());
            walk(root, &p, out);
        } else {
            out.insert(rel, std::fs::read(&p).unwrap());
        }
    }
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

const WEB_YAML: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.244.1.5]
  nodeName: node1
  conditions: {ready: true}
- addresses: [10.244.2.5]
  nodeName: node2
  conditions: {ready: true}
ports:
- {name: http, port: 8080, protocol: TCP}
";

const PROD_LIST_JSON: &str = r#"{
  "apiVersion": "v1",
  "kind": "List",
  "items": [
    {"apiVersion": "v1", "kind": "Service",
     "metadata": {"name": "api", "namespace": "prod"},
     "spec": {"type": "NodePort", "ports": [{"port": 443, "targetPort": "https"}]}},
    {"apiVersion": "v1", "kind": "Service",
     "metadata": {"name": "dns", "namespace": "prod"},
     "spec": {"ports": [{"name": "udp", "port": 53, "protocol": "UDP"},
                        {"name": "tcp", "port": 53}]}}
  ]
}"#;

fn items(json: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["kind"], "List", "{json}");
    v["items"].as_array().unwrap().clone()
}

fn round_trip(ctl: &Ctl) {
    // A fresh store: the defaults, and a note that they are used.
    let r = ctl.apply_file("web.yaml", WEB_YAML).ok();
    assert_eq!(
        r.stdout,
        "service/default/web created\nendpointslice/default/web-1 created\n"
    );
    assert!(r.stderr.contains("no service ranges yet"), "{}", r.stderr);
    assert!(r.stderr.contains("10.96.0.0/12"), "{}", r.stderr);

    // JSON, a v1 List, on stdin.
    let r = ctl.run(&["apply", "-f", "-"], PROD_LIST_JSON).ok();
    assert_eq!(
        r.stdout,
        "service/prod/api created\nservice/prod/dns created\n"
    );
    assert_eq!(r.stderr, "", "the store holds ranges now");

    let r = ctl.run(&["get", "services"], "").ok();
    assert_eq!(
        r.stdout,
        "\
NAMESPACE   NAME   TYPE        CLUSTER-IP   EXTERNAL-IP   PORT(S)
default     web    ClusterIP   10.96.0.1    <none>        80/TCP
prod        api    NodePort    10.96.0.2    <none>        443:30000/TCP
prod        dns    ClusterIP   10.96.0.3    <none>        53/UDP,53/TCP
"
    );
    let r = ctl.run(&["get", "endpointslices"], "").ok();
    assert_eq!(
        r.stdout,
        "\
NAMESPACE   NAME    SERVICE   ENDPOINTS
default     web-1   web       10.244.1.5,10.244.2.5
"
    );

    // -o json: the API's objects, allocations filled in.
    let svcs = items(&ctl.run(&["get", "svc", "-o", "json"], "").ok().stdout);
    assert_eq!(svcs.len(), 3);
    assert_eq!(
        svcs[0]["spec"]["clusterIPs"],
        ferry_e2e::json!(["10.96.0.1"])
    );
    assert_eq!(svcs[0]["spec"]["ipFamilies"], ferry_e2e::json!(["IPv4"]));
    assert_eq!(svcs[1]["spec"]["ports"][0]["nodePort"], 30000);
    assert_eq!(svcs[1]["spec"]["ports"][0]["targetPort"], "https");
    let yaml = ctl
        .run(&["get", "endpointslices", "-o", "yaml"], "")
        .ok()
        .stdout;
    assert!(yaml.contains("kind: List"), "{yaml}");
    assert!(yaml.contains("kubernetes.io/service-name: web"), "{yaml}");

    // Again: unchanged. `get -o yaml` output applies back unchanged too.
    let r = ctl.apply_file("web.yaml", WEB_YAML).ok();
    assert_eq!(
        r.stdout,
        "service/default/web unchanged\nendpointslice/default/web-1 unchanged\n"
    );
    let listed = ctl.run(&["get", "services", "-o", "yaml"], "").ok().stdout;
    let r = ctl.run(&["apply", "-f", "-"], &listed).ok();
    assert_eq!(
        r.stdout
            .lines()
            .filter(|l| l.ends_with(" unchanged"))
            .count(),
        3,
        "{}",
        r.stdout
    );

    // A port more, the document still without clusterIP or nodePort:
    // configured, and what was allocated stays.
    let api2 = PROD_LIST_JSON.replace(
        r#"[{"port": 443, "targetPort": "https"}]"#,
        r#"[{"name": "https", "port": 443, "targetPort": "https"}, {"name": "http", "port": 80}]"#,
    );
    let r = ctl.run(&["apply", "-f", "-"], &api2).ok();
    assert_eq!(
        r.stdout,
        "service/prod/api configured\nservice/prod/dns unchanged\n"
    );
    let svcs = items(&ctl.run(&["get", "services", "-o", "json"], "").ok().stdout);
    assert_eq!(svcs[1]["spec"]["clusterIP"], "10.96.0.2");
    assert_eq!(svcs[1]["spec"]["ports"][0]["nodePort"], 30000);
    assert_eq!(svcs[1]["spec"]["ports"][1]["nodePort"], 30001);

    // delete service removes the Service only, not its slice.
    let r = ctl.run(&["delete", "service", "web"], "").ok();
    assert_eq!(r.stdout, "service/default/web deleted\n");
    let r = ctl.run(&["get", "endpointslices"], "").ok();
    assert!(r.stdout.contains("web-1"), "{}", r.stdout);
    let r = ctl
        .run(&["delete", "endpointslice", "default/web-1"], "")
        .ok();
    assert_eq!(r.stdout, "endpointslice/default/web-1 deleted\n");
    let r = ctl.run(&["delete", "service", "default/web"], "");
    assert_eq!(r.code, Some(1));
    assert_eq!(r.stderr, "ferryctl: error: service/default/web not found\n");

    // delete -f from stdin: everything the file names.
    let r = ctl.run(&["delete", "-f", "-"], PROD_LIST_JSON).ok();
    assert_eq!(
        r.stdout,
        "service/prod/api deleted\nservice/prod/dns deleted\n"
    );
    let r = ctl.run(&["get", "services"], "").ok();
    assert_eq!(
        (r.stdout.as_str(), r.stderr.as_str()),
        ("", "No resources found.\n")
    );
    // The freed address is handed out again.
    let r = ctl.run(&["apply", "-f", "-"], WEB_YAML).ok();
    assert!(r.stdout.starts_with("service/default/web created"));
    let svcs = items(&ctl.run(&["get", "services", "-o", "json"], "").ok().stdout);
    assert_eq!(svcs[0]["spec"]["clusterIP"], "10.96.0.1");
}

/// A good new Service first in every bad file: "nothing of that file" is
/// checked, not only the bad document.
const GOOD_FIRST: &str = "\
apiVersion: v1
kind: Service
metadata: {name: innocent, namespace: fresh}
spec: {ports: [{port: 80}]}
---
";

fn svc(spec: &str) -> String {
    format!("{GOOD_FIRST}apiVersion: v1\nkind: Service\nmetadata: {{name: bad}}\nspec: {spec}\n")
}

fn refusals(ctl: &Ctl) {
    // Ranges as a ferryd started with --service-cidr 10.100.0.0/16
    // --nodeport-range 31000-31999 would have stored them.
    ctl.preset_ranges("10.100.0.0/16", "31000-31999");
    let base = "\
apiVersion: v1
kind: Service
metadata: {name: np}
spec: {type: NodePort, clusterIP: 10.100.0.10, ports: [{port: 80, nodePort: 31080}]}
";
    let r = ctl.apply_file("base.yaml", base).ok();
    assert_eq!(r.stderr, "", "the store's ranges are used, no note");
    let before = ctl.dump();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad YAML",
            format!("{GOOD_FIRST}apiVersion: v1\nkind: Service\nmetadata: {{name: [oops\n"),
            "document 2: not valid YAML or JSON",
        ),
        (
            "bad JSON",
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},"#.into(),
            "document 1: not valid YAML or JSON",
        ),
        (
            "clusterIP outside the CIDR",
            svc("{clusterIP: 10.96.0.1}"),
            "Service default/bad: spec.clusterIP 10.96.0.1 is outside the service CIDR 10.100.0.0/16",
        ),
        (
            "clusterIP taken",
            svc("{clusterIP: 10.100.0.10}"),
            "Service default/bad: spec.clusterIP 10.100.0.10 is already taken by Service default/np",
        ),
        (
            "nodePort outside the range",
            svc("{type: NodePort, ports: [{port: 80, nodePort: 30080}]}"),
            "Service default/bad: spec.ports[0].nodePort 30080 is outside the node-port range 31000-31999",
        ),
        (
            "nodePort taken",
            svc("{type: NodePort, ports: [{port: 80, nodePort: 31080}]}"),
            "Service default/bad: spec.ports[0].nodePort 31080 is already taken by Service default/np",
        ),
        (
            "port 0",
            svc("{ports: [{port: 0}]}"),
            "Service default/bad: spec.ports[0]: port 0 is not in 1..=65535",
        ),
        (
            "port 65536",
            svc("{ports: [{port: 65536}]}"),
            "Service default/bad: spec.ports[0]: port 65536 is not in 1..=65535",
        ),
        (
            "unknown protocol",
            svc("{ports: [{port: 80, protocol: ICMP}]}"),
            "Service default/bad: spec.ports[0]: protocol \"ICMP\" is not TCP, UDP or SCTP",
        ),
        (
            "slice without its Service label",
            format!(
                "{GOOD_FIRST}apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: orphan, labels: {{app: web}}}}\naddressType: IPv4\n\
                 endpoints: [{{addresses: [10.244.1.5]}}]\n"
            ),
            "EndpointSlice default/orphan: metadata.labels[\"kubernetes.io/service-name\"] must name its Service",
        ),
    ];
    for (what, text, want) in cases {
        let file = format!("{}.yaml", what.replace(' ', "-"));
        let r = ctl.apply_file(&file, &text);
        let path = ctl.dir.path().join(&file);
        assert_eq!(r.code, Some(1), "{what}: {}", r.stderr);
        assert_eq!(
            r.stderr.lines().count(),
            1,
            "{what}: one line wanted: {}",
            r.stderr
        );
        let line = r.stderr.trim_end();
        let prefix = format!("ferryctl: error: {}: ", path.display());
        assert!(
            line.starts_with(&prefix) && line.contains(want),
            "{what}: got {line:?}, wanted {prefix}…{want}"
        );
        assert_eq!(r.stdout, "", "{what}");
        assert_eq!(ctl.dump(), before, "{what}: the store changed");
        // The same through stdin: named as such.
        let r = ctl.run(&["apply", "-f", "-"], &text);
        assert_eq!(r.code, Some(1), "{what}");
        assert!(
            r.stderr.starts_with("ferryctl: error: <stdin>: "),
            "{what}: {}",
            r.stderr
        );
        assert_eq!(ctl.dump(), before, "{what} (stdin): the store changed");
    }
    // The good document alone is fine, from the store's range.
    let r = ctl.run(&["apply", "-f", "-"], GOOD_FIRST).ok();
    assert_eq!(r.stdout, "service/fresh/innocent created\n");
    let svcs = items(&ctl.run(&["get", "services", "-o", "json"], "").ok().stdout);
    let innocent = svcs
        .iter()
        .find(|s| s["metadata"]["name"] == "innocent")
        .unwrap();
    assert_eq!(innocent["spec"]["clusterIP"], "10.100.0.1");
}

#[test]
fn file_round_trip() {
    round_trip(&Ctl::file());
}

#[test]
fn file_refusals_leave_the_store_unchanged() {
    refusals(&Ctl::file());
}

#[test]
fn etcd_round_trip() {
    if require_root() {
        round_trip(&Ctl::etcd());
    }
}

#[test]
fn etcd_refusals_leave_the_store_unchanged() {
    if require_root() {
        refusals(&Ctl::etcd());
    }
}

#[test]
fn usage_errors() {
    let ctl = Ctl::file();
    let r = ctl.run(&["get", "pods"], "");
    assert_eq!(r.code, Some(2), "clap's usage error: {}", r.stderr);
    let r = ctl.run(&["--help"], "").ok();
    for cmd in ["apply", "delete", "get"] {
        assert!(r.stdout.contains(cmd), "{}", r.stdout);
    }
    let r = ctl.run(&["get", "services", "--store", "file:relative"], "");
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("absolute"), "{}", r.stderr);
}

#[test]
fn base64_is_right() {
    assert_eq!(base64(b"\0"), "AA==");
    assert_eq!(base64(b"/ferry/ranges"), "L2ZlcnJ5L3Jhbmdlcw==");
    assert_eq!(base64(b"abc"), "YWJj");
}
