//! `ferryd run --store kubernetes` end to end: the namespace cluster's
//! ferryds against the tests' own API server (tests/src/apiserver.rs, in
//! the underlay namespace), which the test drives as the kubelet, the node
//! IPAM controller and the EndpointSlice controller would: Nodes registered
//! with their podCIDRs, Services and EndpointSlices written, Nodes
//! deleted, and the server itself restarted and compacted under ferryd.

use std::time::{Duration, Instant};

use ferry_e2e::apiserver::{endpoint_slice, node, service, Endpoint, Res};
use ferry_e2e::cluster::{Cluster, Opts, StoreKind, OUTSIDE_IP};
use ferry_e2e::traffic::{ask, tally, who_server, Answer, WhoServer};
use ferry_e2e::{json, require_root, wait_until, Netns, Value};

const K: StoreKind = StoreKind::Kubernetes;
const VTEP_MAC: &str = "ferry.dev/vtep-mac";
const UNDERLAY_IP: &str = "ferry.dev/underlay-ip";
const CIP: &str = "10.96.0.10";
const T: Duration = Duration::from_secs(2);

fn pod_cidr(i: usize) -> String {
    format!("10.244.{}.0/24", i + 1)
}

/// Registers node `i` in the API server as its kubelet would, with its
/// podCIDR allocated (or not yet).
fn register(c: &Cluster, i: usize, with_cidr: bool) {
    let n = &c.nodes[i];
    let cidr = pod_cidr(i);
    c.api()
        .put_node(&n.name, with_cidr.then_some(cidr.as_str()), &n.underlay_ip);
}

/// A cluster of `n` nodes registered with podCIDRs, every ferryd ready
/// and meshed.
fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::new(K, n, Opts::default());
    for i in 0..n {
        register(&c, i, true);
    }
    c.start_all();
    c.wait_all_ready();
    c
}

fn condition(node: &Value, ty: &str) -> Option<Value> {
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)
        .cloned()
}

fn network_up(node: &Value) -> bool {
    condition(node, "NetworkUnavailable").is_some_and(|c| c["status"] == "False")
}

fn vtep_mac(c: &Cluster, i: usize) -> String {
    c.nodes[i].ns.link("ferry.1").expect("ferry.1")["address"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn nodes_annotations_condition_mesh_and_node_lifecycle() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(K, 3, Opts::default());
    // node3's subnet is not allocated yet: its ferryd waits for it.
    register(&c, 0, true);
    register(&c, 1, true);
    register(&c, 2, false);
    c.start_all();
    c.wait_ready(0, Duration::from_secs(30));
    c.wait_ready(1, Duration::from_secs(30));
    assert!(!c.nodes[2].is_ready(), "node3 ready without a podCIDR");
    assert!(
        !network_up(&c.api().node("node3")),
        "NetworkUnavailable=False without an overlay"
    );
    c.api().update(Res::Nodes, "", "node3", |n| {
        n["spec"]["podCIDR"] = json!(pod_cidr(2));
        n["spec"]["podCIDRs"] = json!([pod_cidr(2)]);
    });
    c.wait_all_ready();

    // ferryctl status names the API server and how each watch stands.
    let out = c.nodes[0]
        .ns
        .exec(&[ferry_e2e::ferryctl_bin().to_str().unwrap(), "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("API server:") && l.contains(&c.api().url())),
        "{text}"
    );
    for kind in ["Nodes", "Services", "EndpointSlices"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("Watch {kind}:")) && l.contains("watching")),
            "{kind} in\n{text}"
        );
    }

    for (i, n) in c.nodes.iter().enumerate() {
        assert_eq!(
            n.subnet(),
            Some(pod_cidr(i)),
            "{}: subnet from podCIDRs",
            n.name
        );
    }
    // What each ferryd patched, next to what the kubelet wrote.
    for (i, n) in c.nodes.iter().enumerate() {
        let api = c.api();
        let ok = wait_until(Duration::from_secs(10), || network_up(&api.node(&n.name)));
        assert!(
            ok,
            "{}: no NetworkUnavailable=False: {}",
            n.name,
            api.node(&n.name)
        );
        let obj = api.node(&n.name);
        let ann = &obj["metadata"]["annotations"];
        assert_eq!(ann[VTEP_MAC], json!(vtep_mac(&c, i)), "{}: {ann}", n.name);
        assert_eq!(ann[UNDERLAY_IP], json!(n.underlay_ip), "{}: {ann}", n.name);
        assert_eq!(
            ann["node.alpha.kubernetes.io/ttl"], "0",
            "{}: annotations replaced, not patched",
            n.name
        );
        let types: Vec<&str> = obj["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        for t in ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"] {
            assert!(
                types.contains(&t),
                "{}: kubelet's {t} lost: {types:?}",
                n.name
            );
        }
        assert_eq!(obj["spec"]["podCIDR"], json!(pod_cidr(i)), "spec untouched");
    }
    // Each node patched only itself: status through nodes/status.
    let log = c.api().requests();
    for n in &c.nodes {
        let status_patches: Vec<_> = log
            .iter()
            .filter(|r| r.method == "PATCH" && r.path == format!("/api/v1/nodes/{}/status", n.name))
            .collect();
        assert!(
            !status_patches.is_empty(),
            "{}: no nodes/status patch",
            n.name
        );
        assert!(status_patches
            .iter()
            .all(|r| r.peer == n.underlay_ip && r.status == 200));
    }
    assert!(
        log.iter().all(|r| r.method != "PUT"),
        "a Node was replaced, not patched"
    );
    assert!(
        log.iter().any(|r| r.is_watch()
            && r.path == "/api/v1/nodes"
            && r.param("allowWatchBookmarks") == Some("true")),
        "no node watch with bookmarks"
    );

    for i in 0..3 {
        c.add_pod(i);
    }
    let failed = c.ping_matrix();
    assert!(failed.is_empty(), "pings failed: {failed:?}\n{}", c.logs());

    // A Node with unusable annotations: skipped, the rest unaffected.
    let mut bad = node("bad", Some("10.244.99.0/24"), "192.168.77.99");
    bad["metadata"]["annotations"][VTEP_MAC] = json!("not-a-mac");
    c.api().put(bad);

    // A fourth node joins: registered, its ferryd started, and everyone
    // routes to it.
    let n4 = c.add_node();
    register(&c, n4, true);
    c.start_ferryd(n4);
    c.wait_all_ready();
    let p4 = c.add_pod(n4);
    let failed = c.ping_matrix();
    assert!(
        failed.is_empty(),
        "pings with node4: {failed:?}\n{}",
        c.logs()
    );
    for n in &c.nodes {
        assert!(
            !n.routes().contains("10.244.99.0"),
            "{}: bad node routed",
            n.name
        );
    }

    // The node goes away as `kubectl delete node` does: its ferryd dies
    // with it, the Node is deleted, and every other node prunes it.
    let gone = pod_cidr(n4);
    let gone_vtep = gone.split('/').next().unwrap().to_string();
    let gone_ip = c.nodes[n4].underlay_ip.clone();
    c.stop_ferryd(n4, libc::SIGKILL);
    let t0 = Instant::now();
    assert!(c.api().delete_node("node4"));
    let pruned = wait_until(Duration::from_secs(10), || {
        c.nodes[..3].iter().all(|n| {
            !n.routes().contains(&gone)
                && !n.neighbours("ferry.1").contains(&gone_vtep)
                && !n.fdb("ferry.1").contains(&gone_ip)
        })
    });
    assert!(
        pruned,
        "node4 not pruned after {:?}:\n{}",
        t0.elapsed(),
        c.logs()
    );
    eprintln!("deleted Node pruned everywhere after {:?}", t0.elapsed());
    assert!(!c.pods[0].ns.ping(&c.pods[p4].ip, Duration::from_secs(1)));
    for (i, n) in c.nodes[..3].iter().enumerate() {
        let others: Vec<String> = (0..3).filter(|j| *j != i).map(pod_cidr).collect();
        for o in &others {
            assert!(
                n.routes().contains(o),
                "{}: lost {o}: {}",
                n.name,
                n.routes()
            );
        }
    }
    c.pods[0].ns.assert_ping(&c.pods[2].ip);
}

/// Two nodes; pods 0 (node1) and 1 (node2) serve on 8080 as "a" and "b",
/// pods 2 (node1) and 3 (node2) are clients.
struct Fixture {
    c: Cluster,
    _servers: Vec<WhoServer>,
}

impl Fixture {
    fn new() -> Fixture {
        let mut c = cluster(2);
        c.default_routes();
        for node in [0, 1, 0, 1] {
            c.add_pod(node);
        }
        let servers = vec![
            who_server(&c.pods[0].ns, 8080, "a"),
            who_server(&c.pods[1].ns, 8080, "b"),
        ];
        Fixture {
            c,
            _servers: servers,
        }
    }

    /// Service default/web: NodePort, 10.96.0.10:80 → 8080, node port 30080.
    fn put_service(&self) {
        self.c.api().put(service(
            "default",
            "web",
            "NodePort",
            CIP,
            &[("http", "TCP", 80, 8080, Some(30080))],
        ));
    }

    /// The EndpointSlice of web with the server pods `eps` as endpoints.
    fn put_endpoints(&self, eps: &[usize]) {
        let endpoints: Vec<Endpoint> = eps
            .iter()
            .map(|i| {
                let p = &self.c.pods[*i];
                (p.ip.as_str(), self.c.nodes[p.node].name.as_str(), true)
            })
            .collect();
        self.c.api().put(endpoint_slice(
            "default",
            "web",
            "web-x7k2p",
            &endpoints,
            &[("http", "TCP", 8080)],
        ));
    }

    /// Waits until 20 requests from `from` to ip:port are all answered,
    /// exactly by `names`.
    fn wait_served_by(&self, from: &Netns, ip: &str, port: u16, names: &[&str]) {
        let mut last = Default::default();
        let ok = wait_until(Duration::from_secs(20), || {
            last = tally(&ask(from, ip, port, 20, false, 0, T));
            last.keys().map(String::as_str).eq(names.iter().copied())
        });
        assert!(
            ok,
            "{ip}:{port} from {}: {last:?}, want {names:?}\n{}",
            from.name(),
            self.c.logs()
        );
    }
}

#[test]
fn service_by_clusterip_and_nodeport_follows_endpoints() {
    if !require_root() {
        return;
    }
    let f = Fixture::new();
    // Filtered out as kube-proxy filters them: a Service of another proxy
    // and a headless Service's slice on the same address and port.
    let mut other = service(
        "default",
        "other",
        "ClusterIP",
        "10.96.0.20",
        &[("http", "TCP", 80, 8080, None)],
    );
    other["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("someone-else");
    f.c.api().put(other);
    f.put_service();
    f.put_endpoints(&[0, 1]);

    let clients = [&f.c.pods[2].ns, &f.c.pods[3].ns];
    for from in clients {
        f.wait_served_by(from, CIP, 80, &["a", "b"]);
    }
    let me = f.c.pods[2].ip.clone();
    let answers = ask(&f.c.pods[2].ns, CIP, 80, 20, false, 0, T);
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Answer::From(_, p) if *p == me)),
        "pod source not kept: {answers:?}"
    );
    for n in 0..2 {
        let ip = f.c.nodes[n].underlay_ip.clone();
        f.wait_served_by(&f.c.underlay, &ip, 30080, &["a", "b"]);
        let answers = ask(&f.c.underlay, &ip, 30080, 10, false, 0, T);
        assert!(
            answers
                .iter()
                .all(|a| !matches!(a, Answer::From(_, p) if p == OUTSIDE_IP)),
            "NodePort traffic not masqueraded: {answers:?}"
        );
    }
    assert_eq!(
        ask(&f.c.pods[2].ns, "10.96.0.20", 80, 1, false, 0, T),
        [Answer::Timeout],
        "another proxy's Service is served"
    );

    // The `kubernetes` Service as the API server writes it: its endpoint is
    // the API server itself, outside the cluster; a pod reaches the API by
    // its ClusterIP (what no kube-proxy would otherwise provide).
    let mut k = service(
        "default",
        "kubernetes",
        "ClusterIP",
        "10.96.0.1",
        &[("https", "TCP", 443, 6443, None)],
    );
    k["metadata"]["labels"] = json!({"component": "apiserver", "provider": "kubernetes"});
    k["spec"].as_object_mut().unwrap().remove("selector");
    f.c.api().put(k);
    let mut slice = endpoint_slice(
        "default",
        "kubernetes",
        "kubernetes",
        &[(OUTSIDE_IP, "", true)],
        &[("https", "TCP", 6443)],
    );
    slice["endpoints"][0]
        .as_object_mut()
        .unwrap()
        .remove("nodeName");
    slice["endpoints"][0]
        .as_object_mut()
        .unwrap()
        .remove("targetRef");
    slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] =
        json!("endpoint-controller");
    f.c.api().put(slice);
    let script = "import urllib.request,json\nprint(json.load(urllib.request.urlopen('http://10.96.0.1:443/version',timeout=2))['gitVersion'])";
    let mut got = String::new();
    let ok = wait_until(Duration::from_secs(20), || {
        let o = f.c.pods[3].ns.exec(&[ferry_e2e::python3(), "-c", script]);
        got = String::from_utf8_lossy(&o.stdout).trim().to_string();
        got.starts_with("v1.")
    });
    assert!(
        ok,
        "the kubernetes Service from a pod: {got:?}\n{}",
        f.c.logs()
    );

    // An endpoint change reaches the datapath: b only, then a only.
    f.put_endpoints(&[1]);
    f.wait_served_by(&f.c.pods[2].ns, CIP, 80, &["b"]);
    f.wait_served_by(&f.c.underlay, &f.c.nodes[0].underlay_ip, 30080, &["b"]);
    f.put_endpoints(&[0]);
    f.wait_served_by(&f.c.pods[3].ns, CIP, 80, &["a"]);
    // The Service deleted: its ClusterIP stops answering.
    f.c.api().delete(Res::Services, "default", "web");
    let ok = wait_until(Duration::from_secs(20), || {
        !matches!(
            ask(&f.c.pods[2].ns, CIP, 80, 1, false, 0, T)[..],
            [Answer::From(..)]
        )
    });
    assert!(ok, "deleted Service still answers\n{}", f.c.logs());
}

/// Watches (GET ...?watch=true) made after request number `since`.
fn watches_since(c: &Cluster, since: usize, path: &str) -> usize {
    c.api().requests()[since..]
        .iter()
        .filter(|r| r.is_watch() && r.path == path)
        .count()
}

fn lists_since(c: &Cluster, since: usize, path: &str) -> usize {
    c.api().requests()[since..]
        .iter()
        .filter(|r| r.method == "GET" && !r.is_watch() && r.path == path)
        .count()
}

#[test]
fn recovers_from_dropped_watches_restart_and_410() {
    if !require_root() {
        return;
    }
    let f = Fixture::new();
    let c = &f.c;
    let api = c.api();
    api.set_bookmark_interval(Duration::from_millis(500));
    f.put_service();
    f.put_endpoints(&[0]);
    f.wait_served_by(&c.pods[2].ns, CIP, 80, &["a"]);
    let slices = "/apis/discovery.k8s.io/v1/endpointslices";
    // Nodes, Services and EndpointSlices watched by both ferryds.
    let ok = wait_until(Duration::from_secs(10), || api.open_watches() >= 6);
    assert!(ok, "{} watches open, want 6", api.open_watches());
    let all = api.open_watches();

    // Every watch cut mid-stream: ferryd watches again from where it was
    // (no relist needed) and a change made now arrives.
    let mark = api.requests().len();
    api.drop_watches();
    f.put_endpoints(&[1]);
    f.wait_served_by(&c.pods[2].ns, CIP, 80, &["b"]);
    let ok = wait_until(Duration::from_secs(10), || {
        watches_since(c, mark, slices) >= 2 && api.open_watches() >= all
    });
    assert!(
        ok,
        "watches not re-established after the drop\n{}",
        c.logs()
    );

    // The server restarted mid-watch (state kept).
    let mark = api.requests().len();
    api.restart();
    assert_eq!(api.open_watches(), 0, "watches survived the restart");
    let ok = wait_until(Duration::from_secs(30), || {
        api.open_watches() >= all && watches_since(c, mark, slices) >= 2
    });
    assert!(
        ok,
        "{} of {all} watches back after the restart\n{}",
        api.open_watches(),
        c.logs()
    );
    f.put_endpoints(&[0, 1]);
    f.wait_served_by(&c.pods[3].ns, CIP, 80, &["a", "b"]);

    // Down long enough for history to be compacted: the endpoints change
    // and a new Service appears while ferryd cannot see; it comes back to
    // 410 Expired, relists, and catches up.
    api.stop();
    f.put_endpoints(&[1]);
    api.put(service(
        "default",
        "late",
        "ClusterIP",
        "10.96.0.11",
        &[("http", "TCP", 81, 8080, None)],
    ));
    let mut slice = endpoint_slice(
        "default",
        "late",
        "late-q8m4z",
        &[(c.pods[0].ip.as_str(), "node1", true)],
        &[("http", "TCP", 8080)],
    );
    slice["metadata"]["labels"]["extra"] = json!("yes");
    api.put(slice);
    api.compact();
    let mark = api.requests().len();
    api.resume();
    f.wait_served_by(&c.pods[2].ns, CIP, 80, &["b"]);
    f.wait_served_by(&c.pods[3].ns, "10.96.0.11", 81, &["a"]);
    assert!(
        lists_since(c, mark, slices) >= 2,
        "no relist of EndpointSlices after 410: {:?}",
        &api.requests()[mark..]
    );
    let ok = wait_until(Duration::from_secs(30), || api.open_watches() >= all);
    assert!(ok, "watches not back after the 410\n{}", c.logs());

    // Watches that end by their timeout are renewed, and changes after all
    // this still reach the datapath.
    api.set_watch_cap(Some(Duration::from_secs(1)));
    let mark = api.requests().len();
    let ok = wait_until(Duration::from_secs(20), || {
        watches_since(c, mark, slices) >= 4
    });
    assert!(ok, "ended watches not renewed\n{}", c.logs());
    f.put_endpoints(&[0]);
    f.wait_served_by(&c.pods[2].ns, CIP, 80, &["a"]);
    // A Node change made after recovery reaches every node: a peer whose
    // ferryd published its annotations, then deleted.
    let mut peer = node("node9", Some("10.244.9.0/24"), "192.168.77.99");
    peer["metadata"]["annotations"][VTEP_MAC] = json!("02:00:00:00:00:09");
    peer["metadata"]["annotations"][UNDERLAY_IP] = json!("192.168.77.99");
    api.put(peer);
    let routed = |yes: bool| {
        wait_until(Duration::from_secs(15), || {
            c.nodes
                .iter()
                .all(|n| n.routes().contains("10.244.9.0/24") == yes)
        })
    };
    assert!(routed(true), "new Node not routed\n{}", c.logs());
    assert!(c.nodes[0].fdb("ferry.1").contains("192.168.77.99"));
    api.delete_node("node9");
    assert!(routed(false), "deleted Node still routed\n{}", c.logs());
}
