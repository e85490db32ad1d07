//! A test cluster for ferryd: an underlay (a bridge in its own namespace,
//! one veth into each node namespace — this kernel has no dummy links),
//! node namespaces each running `ferryd`, pods added with the `ferry` plugin
//! and the conflist that node's ferryd wrote.
//!
//! Everything lives in namespaces made here (`ferry-t<pid>-<n>`, deleted on
//! drop, also when a test panics) and in a temp dir. The etcd store runs
//! `etcd` inside the underlay namespace, so its traffic never leaves the
//! test's namespaces; it is killed on drop. The Kubernetes store talks to
//! the tests' own API server ([`crate::apiserver`]) listening in the
//! underlay namespace; the test registers the Nodes in it.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::apiserver::ApiServer;
use crate::{bin_dir, plugin_path, run_plugin_in, wait_until, Cni, Netns, TempDir};

/// The underlay network; node i (0-based) is .(11+i), the underlay
/// namespace itself (an "outside world" host, and etcd) is .254.
pub const UNDERLAY_PREFIX: &str = "192.168.77";
pub const OUTSIDE_IP: &str = "192.168.77.254";
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const ETCD_URL: &str = "http://192.168.77.254:2379";
/// Where the Kubernetes store's API server listens (underlay namespace).
pub const APISERVER_ADDR: &str = "192.168.77.254:6443";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    File,
    Etcd,
    /// `--store kubernetes --kubeconfig <file>`, against [`Cluster::api`].
    Kubernetes,
}

#[derive(Debug, Clone)]
pub struct Opts {
    pub direct_routing: bool,
    pub reconcile_interval: Duration,
    pub extra_args: Vec<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            direct_routing: false,
            reconcile_interval: Duration::from_secs(2),
            extra_args: Vec::new(),
        }
    }
}

/// The built `ferryd` (built once per test process, like the plugins).
pub fn ferryd_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = bin_dir().to_path_buf();
        crate::build_bins("ferry-daemon", &dir);
        let bin = dir.join("ferryd");
        assert!(
            bin.is_file(),
            "{} is missing: run `cargo build --workspace`",
            bin.display()
        );
        bin
    })
    .clone()
}

pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub underlay_ip: String,
    pub dir: PathBuf,
    ferryd: Option<Child>,
    starts: usize,
}

impl Node {
    pub fn conflist_path(&self) -> PathBuf {
        self.dir.join("net.d/10-ferry.conflist")
    }
    pub fn ready_file(&self) -> PathBuf {
        self.dir.join("run/ready")
    }
    pub fn is_ready(&self) -> bool {
        self.ready_file().exists()
    }
    pub fn log_path(&self, start: usize) -> PathBuf {
        self.dir.join(format!("ferryd.{start}.log"))
    }
    /// All ferryd logs of this node, for failure messages.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                format!(
                    "--- {} ferryd start {i} ---\n{}",
                    self.name,
                    std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
    /// This node's pod subnet, from the conflist.
    pub fn subnet(&self) -> Option<String> {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(self.conflist_path()).ok()?).ok()?;
        v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"]
            .as_str()
            .map(str::to_string)
    }
    /// `ip route show proto 0xfe` (ferry's routes).
    pub fn routes(&self) -> String {
        self.ns.ok(&["ip", "route", "show", "proto", "0xfe"])
    }
    pub fn neighbours(&self, dev: &str) -> String {
        let o = self.ns.exec(&["ip", "neigh", "show", "dev", dev]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    pub fn fdb(&self, dev: &str) -> String {
        let o = self.ns.exec(&["bridge", "fdb", "show", "dev", dev]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    pub fn ferryd_pid(&self) -> Option<u32> {
        self.ferryd.as_ref().map(|c| c.id())
    }
    /// GET on ferryd's health listener (inside the node namespace).
    /// One sample of a Prometheus metric on `/metrics` (None when absent).
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.http_get("/metrics")
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    pub fn http_get(&self, path: &str) -> String {
        let script = format!(
            "import urllib.request,urllib.error\ntry:\n r=urllib.request.urlopen('http://127.0.0.1:9475{path}',timeout=3);print(r.status);print(r.read().decode())\nexcept urllib.error.HTTPError as e:\n print(e.code);print(e.read().decode())"
        );
        let o = self.ns.exec(&[crate::python3(), "-c", &script]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

pub struct Pod {
    pub ns: Netns,
    pub ip: String,
    pub node: usize,
    pub id: String,
}

/// How the test etcd serves: plain http on [`ETCD_URL`], or TLS.
#[derive(Debug, Clone, Default)]
pub struct EtcdConfig {
    pub tls: Option<EtcdTls>,
    /// More addresses to listen on (already on the underlay's bridge).
    pub also_listen: Vec<String>,
    /// More etcd flags.
    pub args: Vec<String>,
}

/// etcd's `--cert-file`/`--key-file`, and with `client_ca` its
/// `--client-cert-auth --trusted-ca-file`.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub server: crate::pki::Pair,
    pub client_ca: Option<PathBuf>,
}

/// `etcd` inside the underlay namespace.
pub struct Etcd {
    child: Option<Child>,
    dir: TempDir,
    config: EtcdConfig,
}

impl Etcd {
    fn start(underlay: &Netns, config: EtcdConfig) -> Etcd {
        let mut etcd = Etcd {
            child: None,
            dir: TempDir::new(),
            config,
        };
        etcd.spawn(underlay);
        etcd
    }

    fn scheme(&self) -> &'static str {
        if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The client URL on [`OUTSIDE_IP`].
    pub fn url(&self) -> String {
        self.url_on(OUTSIDE_IP)
    }

    pub fn url_on(&self, ip: &str) -> String {
        format!("{}://{ip}:2379", self.scheme())
    }

    /// Starts etcd (again) on its data dir and waits until it listens.
    pub fn spawn(&mut self, underlay: &Netns) {
        assert!(self.child.is_none(), "etcd already running");
        let data = self.dir.path().join("data");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let listen = std::iter::once(OUTSIDE_IP.to_string())
            .chain(self.config.also_listen.iter().cloned())
            .map(|ip| self.url_on(&ip))
            .collect::<Vec<_>>()
            .join(",");
        let url = self.url();
        let mut args: Vec<String> = [
            "etcd",
            "--name",
            "default",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &listen,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "default=http://127.0.0.1:2380",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(tls) = &self.config.tls {
            args.push(format!("--cert-file={}", tls.server.cert.display()));
            args.push(format!("--key-file={}", tls.server.key.display()));
            if let Some(ca) = &tls.client_ca {
                args.push("--client-cert-auth".into());
                args.push(format!("--trusted-ca-file={}", ca.display()));
            }
        }
        args.extend(self.config.args.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = underlay
            .command(&argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd is installed (package etcd-server)");
        self.child = Some(child);
        let up = wait_until(Duration::from_secs(20), || {
            underlay
                .exec(&["bash", "-c", "exec 3<>/dev/tcp/192.168.77.254/2379"])
                .status
                .success()
        });
        assert!(up, "etcd did not come up: {}", self.log());
    }

    /// `etcdctl` against this etcd (plain http only), run in the underlay;
    /// panics unless it succeeds.
    pub fn ctl(&self, underlay: &Netns, args: &[&str]) -> String {
        assert!(self.config.tls.is_none(), "etcdctl here speaks plain http");
        let endpoints = format!("--endpoints={}", self.url());
        let mut argv = vec!["etcdctl", &endpoints];
        argv.extend_from_slice(args);
        let out = underlay
            .command(&argv)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .output()
            .expect("etcdctl is installed (package etcd-client)");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills etcd (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub kind: StoreKind,
    pub opts: Opts,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// The Kubernetes store's API server (before `underlay`: it stops
    /// before its namespace goes).
    pub apiserver: Option<Box<ApiServer>>,
    pub underlay: Netns,
    pub etcd: Option<Etcd>,
    /// Flags that go with `--store` wherever it is given (ferryd run and
    /// leave, ferryctl): etcd's TLS files and user.
    pub store_flags: Vec<String>,
    dir: TempDir,
    pod_counter: usize,
}

impl Cluster {
    /// The underlay, `n` node namespaces wired to it, and the store; no
    /// ferryd started yet.
    pub fn new(kind: StoreKind, n: usize, opts: Opts) -> Cluster {
        Cluster::build(kind, n, opts, EtcdConfig::default())
    }

    /// An etcd cluster whose etcd serves as `etcd` says; `store_flags` go
    /// with every `--store` (see [`Cluster::store_flags`]).
    pub fn with_etcd(n: usize, opts: Opts, etcd: EtcdConfig, store_flags: &[&str]) -> Cluster {
        let mut c = Cluster::build(StoreKind::Etcd, 0, opts, etcd);
        c.store_flags = store_flags.iter().map(|s| s.to_string()).collect();
        for _ in 0..n {
            c.add_node();
        }
        c
    }

    fn build(kind: StoreKind, n: usize, opts: Opts, etcd: EtcdConfig) -> Cluster {
        let dir = TempDir::new();
        let underlay = Netns::new();
        underlay.ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        underlay.ok(&[
            "ip",
            "addr",
            "add",
            &format!("{OUTSIDE_IP}/24"),
            "dev",
            "br0",
        ]);
        underlay.ok(&["ip", "link", "set", "br0", "up"]);
        for ip in &etcd.also_listen {
            underlay.ok(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "br0"]);
        }
        let etcd = (kind == StoreKind::Etcd).then(|| Etcd::start(&underlay, etcd));
        let apiserver = (kind == StoreKind::Kubernetes).then(|| {
            let s = ApiServer::start(&underlay, APISERVER_ADDR);
            std::fs::write(dir.path().join("kubeconfig"), s.kubeconfig()).unwrap();
            Box::new(s)
        });
        let mut c = Cluster {
            kind,
            opts,
            nodes: Vec::new(),
            pods: Vec::new(),
            apiserver,
            underlay,
            etcd,
            store_flags: Vec::new(),
            dir,
            pod_counter: 0,
        };
        for _ in 0..n {
            c.add_node();
        }
        c
    }

    /// One more node namespace on the underlay (ferryd not started).
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let ns = Netns::new();
        let peer = format!("v{i}");
        self.underlay.veth_to(&peer, &ns);
        self.underlay
            .ok(&["ip", "link", "set", &peer, "master", "br0", "up"]);
        let ip = format!("{UNDERLAY_PREFIX}.{}", 11 + i);
        ns.ok(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ok(&["ip", "link", "set", "eth0", "up"]);
        let name = format!("node{}", i + 1);
        let dir = self.dir.path().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        self.nodes.push(Node {
            name,
            ns,
            underlay_ip: ip,
            dir,
            ferryd: None,
            starts: 0,
        });
        i
    }

    pub fn store_arg(&self) -> String {
        match self.kind {
            StoreKind::File => format!("file:{}", self.dir.path().join("store").display()),
            StoreKind::Etcd => format!("etcd:{}", self.etcd.as_ref().expect("etcd").url()),
            StoreKind::Kubernetes => "kubernetes".into(),
        }
    }

    /// The Kubernetes store's API server (panics for other stores).
    pub fn api(&self) -> &ApiServer {
        self.apiserver
            .as_ref()
            .expect("a StoreKind::Kubernetes cluster")
    }

    /// The `ferryd run` arguments for node `i`.
    pub fn ferryd_args(&self, i: usize) -> Vec<String> {
        let flags: Vec<&str> = self.store_flags.iter().map(String::as_str).collect();
        self.ferryd_args_with(i, &self.store_arg(), &flags)
    }

    /// The `ferryd run` arguments for node `i` with another store and
    /// store flags.
    pub fn ferryd_args_with(&self, i: usize, store: &str, store_flags: &[&str]) -> Vec<String> {
        let n = &self.nodes[i];
        let d = |p: &str| n.dir.join(p).display().to_string();
        let mut a: Vec<String> = [
            "run",
            "--node-name",
            &n.name,
            "--underlay-iface",
            "eth0",
            "--store",
            store,
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--cni-conf-dir",
            &d("net.d"),
            "--cni-bin-dir",
            &bin_dir().display().to_string(),
            "--cni-data-dir",
            &d("ferry-data"),
            "--ipam-data-dir",
            &d("ipam"),
            "--run-dir",
            &d("run"),
            "--reconcile-interval",
            &format!("{}ms", self.opts.reconcile_interval.as_millis()),
            "--log-level",
            "debug",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(store_flags.iter().map(|f| f.to_string()));
        if self.opts.direct_routing {
            a.push("--direct-routing".into());
        }
        if self.kind == StoreKind::Kubernetes {
            a.push("--kubeconfig".into());
            a.push(self.dir.path().join("kubeconfig").display().to_string());
        }
        a.extend(self.opts.extra_args.iter().cloned());
        a
    }

    /// Starts ferryd on node `i` (inside its namespace).
    pub fn start_ferryd(&mut self, i: usize) {
        let args = self.ferryd_args(i);
        let n = &mut self.nodes[i];
        assert!(n.ferryd.is_none(), "{}: ferryd already running", n.name);
        n.starts += 1;
        let log = std::fs::File::create(n.log_path(n.starts)).unwrap();
        let bin = ferryd_bin();
        let mut argv: Vec<&str> = vec![bin.to_str().unwrap()];
        argv.extend(args.iter().map(String::as_str));
        let child =
            n.ns.command(&argv)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn ferryd");
        n.ferryd = Some(child);
    }

    /// Starts every node's ferryd at once.
    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start_ferryd(i);
        }
    }

    /// Waits until node `i` wrote its readiness file.
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) {
        let ok = wait_until(timeout, || {
            if let Some(c) = self.nodes[i].ferryd.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "{} ferryd exited ({st}):\n{}",
                        self.nodes[i].name,
                        self.nodes[i].logs()
                    );
                }
            }
            self.nodes[i].is_ready()
        });
        assert!(
            ok,
            "{} not ready after {timeout:?}:\n{}",
            self.nodes[i].name,
            self.nodes[i].logs()
        );
    }

    /// Waits until every node is ready and routes to every other node
    /// (a node can be ready before it has heard of the nodes that started
    /// with it).
    pub fn wait_all_ready(&mut self) {
        for i in 0..self.nodes.len() {
            self.wait_ready(i, Duration::from_secs(30));
        }
        let n = self.nodes.len();
        for node in &self.nodes {
            let ok = wait_until(Duration::from_secs(10), || {
                node.routes().lines().count() == n - 1
            });
            assert!(
                ok,
                "{} has no full mesh: {}\n{}",
                node.name,
                node.routes(),
                self.logs()
            );
        }
    }

    /// Sends `signal` to node `i`'s ferryd and reaps it.
    pub fn stop_ferryd(&mut self, i: usize, signal: i32) -> Option<i32> {
        let mut c = self.nodes[i].ferryd.take()?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, signal) };
        c.wait().ok().and_then(|s| s.code())
    }

    /// `ferryctl --store <this cluster's store> <args>` run in node 0's
    /// namespace (etcd is reachable only from the cluster's namespaces),
    /// with `stdin` on its standard input.
    pub fn ferryctl(&self, args: &[&str], stdin: &str) -> std::process::Output {
        use std::io::Write;
        let bin = crate::ferryctl_bin();
        let store = self.store_arg();
        let mut argv = vec![bin.to_str().unwrap(), "--store", &store];
        argv.extend(self.store_flags.iter().map(String::as_str));
        argv.extend(args);
        let mut child = self.nodes[0]
            .ns
            .command(&argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferryctl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// `ferryctl apply -f -` of `yaml`; panics unless it succeeds.
    pub fn apply(&self, yaml: &str) -> String {
        let out = self.ferryctl(&["apply", "-f", "-"], yaml);
        assert!(
            out.status.success(),
            "ferryctl apply failed: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Gives every node a default route through the underlay's outside
    /// host, as real nodes have: the kernel picks a source for a node's own
    /// connections to a ClusterIP from the route to it.
    pub fn default_routes(&self) {
        for n in &self.nodes {
            n.ns.ok(&["ip", "route", "replace", "default", "via", OUTSIDE_IP]);
        }
    }

    /// `ferryd leave` for node `i`, run from node `j`'s namespace.
    pub fn leave(&self, i: usize, from: usize) {
        let (bin, store) = (ferryd_bin(), self.store_arg());
        let mut argv = vec![
            bin.to_str().unwrap(),
            "leave",
            "--node-name",
            &self.nodes[i].name,
            "--store",
            &store,
        ];
        argv.extend(self.store_flags.iter().map(String::as_str));
        let out = self.nodes[from]
            .ns
            .command(&argv)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ferryd leave: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The `ferry` entry of node `i`'s conflist as a runtime passes it to
    /// the plugin (with `cniVersion` and `name`).
    pub fn plugin_conf(&self, i: usize) -> Value {
        let conflist: Value = serde_json::from_str(
            &std::fs::read_to_string(self.nodes[i].conflist_path()).expect("conflist written"),
        )
        .unwrap();
        let mut conf = conflist["plugins"][0].clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        conf["name"] = conflist["name"].clone();
        conf
    }

    /// `ferry STATUS` with node `i`'s conflist, run in that node.
    pub fn status(&self, i: usize) -> crate::Outcome {
        run_plugin_in(
            &self.nodes[i].ns,
            &plugin_path("ferry"),
            &Cni::bare("STATUS"),
            &self.plugin_conf(i).to_string(),
        )
    }

    /// Adds a pod to node `i` with the ferry plugin and the conflist that
    /// node's ferryd wrote. Returns the pod's index.
    pub fn add_pod(&mut self, i: usize) -> usize {
        let conf = self.plugin_conf(i);
        let node = &self.nodes[i];
        self.pod_counter += 1;
        let id = format!("pod{}", self.pod_counter);
        let ns = Netns::new();
        let out = run_plugin_in(
            &node.ns,
            &plugin_path("ferry"),
            &Cni::add(&id, &ns),
            &conf.to_string(),
        );
        let res = out.ok();
        let ip = res["ips"][0]["address"]
            .as_str()
            .expect("an address")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        self.pods.push(Pod {
            ns,
            ip,
            node: i,
            id,
        });
        self.pods.len() - 1
    }

    /// Every node's logs, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(Node::logs)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Pings every pod from every other pod; returns the failures.
    pub fn ping_matrix(&self) -> Vec<(usize, usize)> {
        let mut failed = Vec::new();
        for (a, pa) in self.pods.iter().enumerate() {
            for (b, pb) in self.pods.iter().enumerate() {
                if a != b && !pa.ns.ping(&pb.ip, Duration::from_secs(3)) {
                    failed.push((a, b));
                }
            }
        }
        failed
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_ferryd(i, libc::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
            if let Some(e) = &self.etcd {
                eprintln!(
                    "--- etcd ---\n{}",
                    e.log()
                        .lines()
                        .rev()
                        .take(30)
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            if let Some(api) = &self.apiserver {
                let log = api.requests();
                eprintln!("--- API server: last of {} requests ---", log.len());
                for r in log.iter().rev().take(40).rev() {
                    eprintln!(
                        "{} {} {} {:?} -> {}",
                        r.peer, r.method, r.path, r.query, r.status
                    );
                }
            }
        }
        // Namespaces (pods, nodes, underlay) and the etcd child go with
        // their own guards.
    }
}

/// A TCP server in `pod` that counts the bytes it receives on one
/// connection and prints "<peer ip> <bytes>" when the client closes.
/// Returns once it listens; [`wait_accepted`] waits for the connection.
pub fn tcp_sink(pod: &Netns, ip: &str, port: u16) -> Child {
    let script = format!(
        "import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{ip}',{port}));s.listen(1)\nprint('listening',flush=True)\nc,a=s.accept();n=0\nwhile True:\n  b=c.recv(1<<16)\n  if not b: break\n  n+=len(b)\nprint(a[0],n,flush=True)"
    );
    let mut child = pod
        .command(&[crate::python3(), "-u", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    expect_line(&mut child, "listening");
    child
}

/// Waits until `pod` holds an established TCP connection on local `port`
/// (the sink accepted its client), at most 10 s.
pub fn wait_accepted(pod: &Netns, port: u16) {
    let filter = format!("sport = :{port}");
    let ok = wait_until(Duration::from_secs(10), || {
        !pod.ok(&["ss", "-Htn", "state", "established", &filter])
            .trim()
            .is_empty()
    });
    assert!(
        ok,
        "no connection accepted on port {port} in {}",
        pod.name()
    );
}

/// Reads one line of the child's stdout byte by byte (no buffering, so the
/// rest stays in the pipe for `finish`) and insists that it is `want`.
fn expect_line(child: &mut Child, want: &str) {
    use std::io::Read;
    let stdout = child.stdout.as_mut().expect("stdout piped");
    let mut line = Vec::new();
    let mut byte = [0u8];
    while stdout.read(&mut byte).expect("read child stdout") == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    assert_eq!(String::from_utf8_lossy(&line), want, "tcp sink said");
}

/// Sends for `secs` seconds (or `bytes` bytes) to ip:port from `pod`;
/// returns (success, bytes sent, stderr).
pub fn tcp_send(pod: &Netns, ip: &str, port: u16, secs: f64) -> Child {
    let script = format!(
        "import socket,time\ns=socket.create_connection(('{ip}',{port}),timeout=5)\nbuf=b'x'*65536;n=0;end=time.time()+{secs}\nwhile time.time()<end:\n  s.sendall(buf);n+=len(buf)\ns.shutdown(socket.SHUT_WR);s.recv(1);s.close();print(n,flush=True)"
    );
    pod.command(&[crate::python3(), "-u", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Output of a finished child (stdout, stderr, success).
pub fn finish(child: Child, timeout: Duration) -> (String, String, bool) {
    let start = Instant::now();
    let mut child = child;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

/// The suite every store runs (`cluster_file.rs`, `cluster_etcd.rs`).
pub mod suite {
    use super::*;

    fn vxlan_ifindex(n: &Node) -> u64 {
        n.ns.link("ferry.1").expect("ferry.1 exists")["ifindex"]
            .as_u64()
            .unwrap()
    }

    /// 3 nodes x 2 pods: full-mesh ping, a TCP transfer across nodes with
    /// the source address preserved, egress masquerade to the outside,
    /// readiness and health endpoints.
    pub fn mesh_transfer_masquerade(kind: StoreKind) {
        let mut c = Cluster::new(kind, 3, Opts::default());
        c.start_all();
        c.wait_all_ready();
        let mut subnets: Vec<String> = c.nodes.iter().map(|n| n.subnet().unwrap()).collect();
        subnets.sort();
        subnets.dedup();
        assert_eq!(subnets.len(), 3, "distinct subnets");
        for n in &c.nodes {
            let r = n.http_get("/readyz");
            assert!(r.starts_with("200"), "{}: /readyz: {r}", n.name);
            assert!(n.http_get("/healthz").starts_with("200"));
            assert_eq!(n.metric("ferryd_ready"), Some(1.0));
            assert_eq!(n.metric("ferryd_peers"), Some(2.0));
            let mtu = n.ns.link("ferry.1").unwrap()["mtu"].as_u64();
            assert_eq!(mtu, Some(1450), "VXLAN MTU = underlay - 50");
        }
        for i in 0..3 {
            c.add_pod(i);
            c.add_pod(i);
        }
        let failed = c.ping_matrix();
        assert!(failed.is_empty(), "pings failed: {failed:?}\n{}", c.logs());

        // TCP across nodes: node1's pod -> node3's pod, source preserved.
        let (src, dst) = (0, 5);
        assert_ne!(c.pods[src].node, c.pods[dst].node);
        let sink = tcp_sink(&c.pods[dst].ns, &c.pods[dst].ip, 5001);
        let sender = tcp_send(&c.pods[src].ns, &c.pods[dst].ip, 5001, 1.0);
        let (sent, err, ok) = finish(sender, Duration::from_secs(20));
        assert!(ok, "sender failed: {err}");
        let (got, err, ok) = finish(sink, Duration::from_secs(10));
        assert!(ok, "sink failed: {err}");
        let mut parts = got.split_whitespace();
        assert_eq!(
            parts.next(),
            Some(c.pods[src].ip.as_str()),
            "pod source address preserved across nodes"
        );
        assert_eq!(parts.next(), Some(sent.trim()), "all bytes arrived");

        // Egress to outside the cluster CIDR: masqueraded to the node address.
        let sink = tcp_sink(&c.underlay, OUTSIDE_IP, 5002);
        let sender = tcp_send(&c.pods[src].ns, OUTSIDE_IP, 5002, 0.2);
        let (_, err, ok) = finish(sender, Duration::from_secs(20));
        assert!(ok, "egress sender failed: {err}");
        let (got, _, _) = finish(sink, Duration::from_secs(10));
        assert_eq!(
            got.split_whitespace().next(),
            Some(c.nodes[c.pods[src].node].underlay_ip.as_str()),
            "egress is masqueraded to the node's address"
        );
        let rules = c.nodes[0].ns.nft_ruleset();
        assert!(rules.contains("chain node-postrouting"), "{rules}");
    }

    /// A node leaves: its routes, neighbours and FDB entries are gone from
    /// every other node within one reconcile period.
    pub fn node_leave_prunes(kind: StoreKind) {
        let mut c = Cluster::new(kind, 3, Opts::default());
        c.start_all();
        c.wait_all_ready();
        let gone = c.nodes[2].subnet().unwrap();
        let gone_vtep = gone.split('/').next().unwrap().to_string();
        let gone_ip = c.nodes[2].underlay_ip.clone();
        for n in &c.nodes[..2] {
            assert!(n.routes().contains(&gone), "{}: {}", n.name, n.routes());
            assert!(n.neighbours("ferry.1").contains(&gone_vtep));
            assert!(n.fdb("ferry.1").contains(&gone_ip));
        }
        c.stop_ferryd(2, libc::SIGKILL);
        let t0 = Instant::now();
        c.leave(2, 0);
        let period = c.opts.reconcile_interval;
        let pruned = wait_until(period + Duration::from_millis(500), || {
            c.nodes[..2].iter().all(|n| {
                !n.routes().contains(&gone)
                    && !n.neighbours("ferry.1").contains(&gone_vtep)
                    && !n.fdb("ferry.1").contains(&gone_ip)
            })
        });
        assert!(
            pruned,
            "node3's entries still present after {:?}:\n{}",
            t0.elapsed(),
            c.logs()
        );
        eprintln!("node leave pruned everywhere after {:?}", t0.elapsed());
        // The others still reach each other.
        let other = c.nodes[1].subnet().unwrap();
        assert!(c.nodes[0].routes().contains(&other));
    }

    /// ferryd killed with -9 and restarted: a running ping and an
    /// established TCP flow lose nothing, and the new ferryd changes
    /// nothing in the kernel. SIGTERM leaves the datapath and drops readiness.
    pub fn restart_adopts_datapath(kind: StoreKind) {
        let mut c = Cluster::new(kind, 2, Opts::default());
        c.start_all();
        c.wait_all_ready();
        c.add_pod(0);
        c.add_pod(1);
        c.pods[0].ns.assert_ping(&c.pods[1].ip);
        let idx: Vec<u64> = c.nodes.iter().map(vxlan_ifindex).collect();
        let routes: Vec<String> = c.nodes.iter().map(Node::routes).collect();

        let ping = c.pods[0]
            .ns
            .command(&[
                "ping",
                "-n",
                "-q",
                "-i",
                "0.02",
                "-c",
                "250",
                "-W",
                "1",
                &c.pods[1].ip,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let sink = tcp_sink(&c.pods[1].ns, &c.pods[1].ip, 5003);
        let sender = tcp_send(&c.pods[0].ns, &c.pods[1].ip, 5003, 5.0);
        wait_accepted(&c.pods[1].ns, 5003);
        for i in 0..2 {
            c.stop_ferryd(i, libc::SIGKILL);
        }
        for i in 0..2 {
            c.start_ferryd(i);
        }
        for i in 0..2 {
            c.wait_ready(i, Duration::from_secs(20));
        }
        let (sent, err, ok) = finish(sender, Duration::from_secs(30));
        assert!(ok, "TCP flow broke across the restart: {err}\n{}", c.logs());
        let (got, _, _) = finish(sink, Duration::from_secs(10));
        assert_eq!(
            got.split_whitespace().nth(1),
            Some(sent.trim()),
            "bytes lost"
        );
        let (out, _, _) = finish(ping, Duration::from_secs(30));
        assert!(
            out.contains(" 0% packet loss"),
            "ping lost packets across the restart:\n{out}"
        );
        for (i, n) in c.nodes.iter().enumerate() {
            assert_eq!(
                vxlan_ifindex(n),
                idx[i],
                "{}: VXLAN device recreated",
                n.name
            );
            assert_eq!(n.routes(), routes[i], "{}: routes changed", n.name);
            assert_eq!(
                n.metric("ferryd_kernel_changes_total"),
                Some(0.0),
                "{}: restarted ferryd changed the kernel:\n{}",
                n.name,
                n.logs()
            );
        }

        // SIGTERM: clean exit, not ready any more, datapath stays.
        assert_eq!(c.stop_ferryd(0, libc::SIGTERM), Some(0));
        assert!(!c.nodes[0].is_ready(), "readiness file removed on SIGTERM");
        assert!(c.nodes[0].conflist_path().exists(), "conflist stays");
        assert_eq!(vxlan_ifindex(&c.nodes[0]), idx[0]);
        c.pods[0].ns.assert_ping(&c.pods[1].ip);
        c.start_ferryd(0);
        c.wait_ready(0, Duration::from_secs(20));
    }

    /// A subnet released by `ferryd leave` stays reserved while its lease
    /// runs and is handed out again only after the lease expired.
    pub fn released_subnet_reused_after_expiry(kind: StoreKind) {
        let ttl = Duration::from_secs(5);
        let opts = Opts {
            extra_args: vec!["--lease-ttl".into(), "5s".into()],
            ..Opts::default()
        };
        let mut c = Cluster::new(kind, 2, opts);
        c.start_all();
        c.wait_all_ready();
        let released = c.nodes[1].subnet().unwrap();
        c.stop_ferryd(1, libc::SIGKILL);
        c.leave(1, 0);
        let t_left = Instant::now();
        let n3 = c.add_node();
        c.start_ferryd(n3);
        c.wait_ready(n3, Duration::from_secs(20));
        let s3 = c.nodes[n3].subnet().unwrap();
        assert!(t_left.elapsed() < ttl, "too slow to test the lease");
        assert_ne!(
            s3, released,
            "a left node's subnet was reused before its lease expired"
        );
        assert_ne!(s3, c.nodes[0].subnet().unwrap());
        // After the lease expired, the next new node may take it.
        std::thread::sleep((ttl + Duration::from_secs(2)).saturating_sub(t_left.elapsed()));
        let n4 = c.add_node();
        c.start_ferryd(n4);
        c.wait_ready(n4, Duration::from_secs(20));
        assert_eq!(
            c.nodes[n4].subnet().unwrap(),
            released,
            "expired subnet is free again"
        );
    }

    /// All nodes started at once get distinct subnets and a full mesh.
    pub fn simultaneous_start(kind: StoreKind) {
        let n = 6;
        let mut c = Cluster::new(kind, n, Opts::default());
        c.start_all();
        c.wait_all_ready();
        let mut subnets: Vec<String> = c.nodes.iter().map(|x| x.subnet().unwrap()).collect();
        subnets.sort();
        subnets.dedup();
        assert_eq!(subnets.len(), n, "subnets: {subnets:?}");
        for node in &c.nodes {
            let ok = wait_until(Duration::from_secs(5), || {
                node.routes().lines().count() == n - 1
            });
            assert!(ok, "{}: {}", node.name, node.routes());
        }
    }
}
