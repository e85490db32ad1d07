//! The Services datapath (`ferryd::service::datapath`) against the kernel,
//! on one node namespace with pods on a bridge: ferryd's library is called
//! in-process inside the node; the store and ferryd are not involved (the
//! cluster tests in `services.rs` cover them).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_e2e::traffic::{ask, assert_fair, tally, web_yaml, who_server, Answer};
use ferry_e2e::{require_root, Netns};
use ferryd::service::datapath::{Datapath, SyncStats};
use ferryd::service::plan::plan;
use ferryd::service::render::render;
use ferryd::service::Snapshot;

const NODE: &str = "node1";

/// A node with a bridge (10.244.1.1/24, bridge netfilter on, as ferry's
/// plugin sets it) and pods on it.
struct Node {
    ns: Netns,
    pods: Vec<Netns>,
}

impl Node {
    fn new(pods: usize) -> Node {
        let ns = Netns::new();
        ns.ok(&[
            "ip",
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "nf_call_iptables",
            "1",
        ]);
        ns.ok(&["ip", "addr", "add", "10.244.1.1/24", "dev", "br0"]);
        ns.ok(&["ip", "link", "set", "br0", "up"]);
        ns.ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let mut node = Node {
            ns,
            pods: Vec::new(),
        };
        for _ in 0..pods {
            node.add_pod();
        }
        node
    }

    /// Pod i has 10.244.1.(10+i).
    fn add_pod(&mut self) {
        let i = self.pods.len();
        let pod = Netns::new();
        let dev = format!("veth{i}");
        self.ns.veth_to(&dev, &pod);
        self.ns
            .ok(&["ip", "link", "set", &dev, "master", "br0", "up"]);
        // As ferryd's conflist asks of the plugin (hairpinMode).
        self.ns.ok(&[
            "ip",
            "link",
            "set",
            &dev,
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ]);
        pod.ok(&[
            "ip",
            "addr",
            "add",
            &format!("10.244.1.{}/24", 10 + i),
            "dev",
            "eth0",
        ]);
        pod.ok(&["ip", "link", "set", "eth0", "up"]);
        pod.ok(&["ip", "route", "add", "default", "via", "10.244.1.1"]);
        self.pods.push(pod);
    }

    fn sync(&self, yaml: &str, full: bool) -> SyncStats {
        let snap = snapshot(yaml);
        self.ns.run(move || {
            let mut dp = Datapath::open().expect("nfnetlink socket");
            dp.sync(&render(&plan(&snap, NODE)), full)
                .expect("sync accepted by the kernel")
        })
    }
}

fn snapshot(yaml: &str) -> Snapshot {
    Snapshot::from_documents(yaml).expect("valid test YAML")
}

/// Service `web` on 10.96.0.10:80 → port 8080 of the given pods, with
/// extra spec lines.
fn web(eps: &[usize], spec_extra: &str) -> String {
    let endpoints: String = eps
        .iter()
        .map(|i| format!("- {{addresses: [10.244.1.{}], nodeName: {NODE}}}\n", 10 + i))
        .collect();
    web_yaml("10.96.0.10", spec_extra, &endpoints)
}

const T: Duration = Duration::from_secs(2);

#[test]
fn clusterip_spreads_keeps_source_and_follows_endpoints() {
    if !require_root() {
        return;
    }
    let node = Node::new(3);
    let _a = who_server(&node.pods[0], 8080, "a");
    let _b = who_server(&node.pods[1], 8080, "b");
    let client = &node.pods[2];
    // A plain ClusterIP: no chain of its own, the shared pick chain for two
    // endpoints serves it.
    let s = node.sync(&web(&[0, 1], ""), true);
    assert!(s.rebuilt && s.chains_written == 0, "{s:?}");
    assert_eq!(node.ns.nft_keys("pick-ports-2").len(), 1);

    let answers = ask(client, "10.96.0.10", 80, 300, false, 0, T);
    assert_fair(&tally(&answers), &["a", "b"], 300, 0.35);
    // The endpoint sees the pod's own address: no masquerade inside the
    // cluster.
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Answer::From(_, peer) if peer == "10.244.1.12")),
        "{:?}",
        &answers[..3]
    );

    // nft, the tool users debug with, can print the table (it aborted on
    // a key typed as a concatenation of plain integers once).
    let listing = node.ns.nft_ruleset();
    assert!(listing.contains("dnat ip to"), "{listing}");
    assert!(!node.ns.nft_names("map", Some("ferry-svc")).is_empty());

    // The same state again, read from the kernel: nothing to write.
    let s = node.sync(&web(&[0, 1], ""), true);
    assert!(
        !s.rebuilt && s.requests == 0,
        "adopting our own table changed it: {s:?}"
    );

    // One endpoint removed: it gets no new connections.
    let s = node.sync(&web(&[1], ""), true);
    assert_eq!((s.chains_written, s.requests > 0), (0, true), "{s:?}");
    let t = tally(&ask(client, "10.96.0.10", 80, 50, false, 0, T));
    assert_eq!(t, BTreeMap::from([("b".to_string(), 50)]));
}

#[test]
fn no_endpoints_and_unknown_ports_are_refused_at_once() {
    if !require_root() {
        return;
    }
    let node = Node::new(2);
    let _a = who_server(&node.pods[0], 8080, "a");
    let client = &node.pods[1];
    node.sync(&web(&[], ""), true);
    for (port, udp) in [(80, false), (80, true), (81, false)] {
        let t0 = Instant::now();
        let got = ask(
            client,
            "10.96.0.10",
            port,
            1,
            udp,
            0,
            Duration::from_secs(5),
        );
        assert_eq!(got, vec![Answer::Refused], "port {port} udp {udp}");
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "refusal took {:?}",
            t0.elapsed()
        );
    }
    // With an endpoint, port 80 answers and 81 is still refused.
    node.sync(&web(&[0], ""), false);
    assert!(
        matches!(&ask(client, "10.96.0.10", 80, 1, false, 0, T)[0], Answer::From(n, _) if n == "a")
    );
    assert_eq!(
        ask(client, "10.96.0.10", 81, 1, false, 0, T),
        vec![Answer::Refused]
    );
}

#[test]
fn hairpin_pod_reaches_itself_through_its_service() {
    if !require_root() {
        return;
    }
    let node = Node::new(1);
    let _a = who_server(&node.pods[0], 8080, "a");
    node.sync(&web(&[0], ""), true);
    let got = ask(&node.pods[0], "10.96.0.10", 80, 5, false, 0, T);
    // Masqueraded to the bridge address, or the reply would never leave
    // the pod.
    assert_eq!(got, vec![Answer::From("a".into(), "10.244.1.1".into()); 5]);
}

#[test]
fn client_ip_affinity_pins_and_releases() {
    if !require_root() {
        return;
    }
    let node = Node::new(3);
    let _a = who_server(&node.pods[0], 8080, "a");
    let _b = who_server(&node.pods[1], 8080, "b");
    let client = &node.pods[2];
    let pinned = web(&[0, 1], "  sessionAffinity: ClientIP\n");
    node.sync(&pinned, true);
    let t = tally(&ask(client, "10.96.0.10", 80, 40, false, 0, T));
    assert_eq!(t.len(), 1, "affinity must pin the client: {t:?}");
    assert_eq!(t.values().sum::<usize>(), 40);
    // Its endpoint goes: the client is pinned again, to the other one.
    let gone = t.keys().next().unwrap().clone();
    let rest = if gone == "a" { 1 } else { 0 };
    node.sync(&web(&[rest], "  sessionAffinity: ClientIP\n"), false);
    let t = tally(&ask(client, "10.96.0.10", 80, 10, false, 0, T));
    assert_eq!(t.len(), 1, "{t:?}");
    assert_ne!(t.keys().next().unwrap(), &gone);
    // Affinity off: spread again.
    node.sync(&web(&[0, 1], ""), false);
    assert_fair(
        &tally(&ask(client, "10.96.0.10", 80, 100, false, 0, T)),
        &["a", "b"],
        100,
        0.35,
    );
}
