//! Services end to end, as a user runs them: `ferryctl apply` of real YAML
//! into the store, ferryd on every node of the namespace cluster programs
//! them, and traffic from pods, from node namespaces and from an "outside"
//! host on the underlay.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_e2e::cluster::{
    finish, tcp_send, tcp_sink, wait_accepted, Cluster, Opts, StoreKind, OUTSIDE_IP,
};
use ferry_e2e::traffic::{ask, assert_fair, tally, web_yaml, who_server, Answer, WhoServer};
use ferry_e2e::{require_root, wait_until, Netns};

const CIP: &str = "10.96.0.10";
const T: Duration = Duration::from_secs(2);

/// Two nodes; pods 0 (node1) and 1 (node2) serve on 8080 as "a" and "b",
/// pods 2 (node1) and 3 (node2) are clients.
struct Fixture {
    c: Cluster,
    _servers: Vec<WhoServer>,
}

impl Fixture {
    fn new(kind: StoreKind) -> Fixture {
        let mut c = Cluster::new(kind, 2, Opts::default());
        c.start_all();
        c.wait_all_ready();
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

    fn pod(&self, i: usize) -> &Netns {
        &self.c.pods[i].ns
    }

    fn node_ip(&self, i: usize) -> String {
        self.c.nodes[i].underlay_ip.clone()
    }

    /// Service `web` (ClusterIP 10.96.0.10, port 80 → 8080, `spec` lines
    /// added) with the server pods `eps` as endpoints, each with the
    /// `conditions` given.
    fn web(&self, spec: &str, eps: &[(usize, &str)]) -> String {
        let endpoints: String = eps
            .iter()
            .map(|(i, cond)| {
                let p = &self.c.pods[*i];
                format!(
                    "- {{addresses: [{}], nodeName: {}, conditions: {{{cond}}}}}\n",
                    p.ip, self.c.nodes[p.node].name
                )
            })
            .collect();
        web_yaml(CIP, spec, &endpoints)
    }

    /// Waits until `from` gets an answer matching `want` from ip:port.
    fn wait_answer(&self, from: &Netns, ip: &str, port: u16, want: impl Fn(&Answer) -> bool) {
        let mut last = Vec::new();
        let ok = wait_until(Duration::from_secs(15), || {
            last = ask(from, ip, port, 1, false, 0, T);
            last.first().is_some_and(&want)
        });
        assert!(
            ok,
            "{ip}:{port} from {}: {last:?}\n{}",
            from.name(),
            self.c.logs()
        );
    }
}

fn from(name: &str) -> impl Fn(&Answer) -> bool + '_ {
    move |a| matches!(a, Answer::From(n, _) if n == name)
}

fn answered(a: &Answer) -> bool {
    matches!(a, Answer::From(..))
}

fn names(answers: &[Answer]) -> BTreeMap<String, usize> {
    tally(answers)
}

#[test]
fn clusterip_from_pods_and_nodes_nodeport_from_outside() {
    if !require_root() {
        return;
    }
    let f = Fixture::new(StoreKind::File);
    let spec =
        "  type: NodePort\n  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]";
    let yaml = f.web(spec, &[(0, ""), (1, "")]).replace(
        "  ports: [{name: http, port: 80, targetPort: 8080}]\n  type: NodePort",
        "  type: NodePort",
    );
    let out = f.c.apply(&yaml);
    assert!(out.contains("service/default/web created"), "{out}");
    f.wait_answer(f.pod(2), CIP, 80, answered);

    // From pods on both nodes: spread over endpoints on both nodes, fair
    // within ±35 %, the pod's own address kept.
    for client in [2, 3] {
        let answers = ask(f.pod(client), CIP, 80, 300, false, 0, T);
        assert_fair(&names(&answers), &["a", "b"], 300, 0.35);
        let me = &f.c.pods[client].ip;
        assert!(
            answers
                .iter()
                .all(|a| matches!(a, Answer::From(_, peer) if peer == me)),
            "source not kept: {:?}",
            answers
                .iter()
                .find(|a| !matches!(a, Answer::From(_, p) if p == me))
        );
    }
    // From the node namespaces themselves.
    for n in 0..2 {
        let t = names(&ask(&f.c.nodes[n].ns, CIP, 80, 40, false, 0, T));
        assert_eq!(
            t.keys().cloned().collect::<Vec<_>>(),
            ["a", "b"],
            "node{n}: {t:?}"
        );
    }
    // NodePort from outside, on every node: both endpoints answer; the
    // traffic is masqueraded (the reply of an endpoint on the other node
    // must come back through the node the client chose).
    for n in 0..2 {
        let answers = ask(&f.c.underlay, &f.node_ip(n), 30080, 40, false, 0, T);
        let t = names(&answers);
        assert_eq!(
            t.keys().cloned().collect::<Vec<_>>(),
            ["a", "b"],
            "node{n}: {t:?}"
        );
        assert!(answers
            .iter()
            .all(|a| !matches!(a, Answer::From(_, p) if p == OUTSIDE_IP)));
    }

    // externalTrafficPolicy: Local: only the node's own endpoint, and the
    // client address is kept.
    let local = yaml.replace(
        "  type: NodePort",
        "  type: NodePort\n  externalTrafficPolicy: Local",
    );
    f.c.apply(&local);
    f.wait_answer(
        &f.c.underlay,
        &f.node_ip(1),
        30080,
        |a| matches!(a, Answer::From(n, p) if n == "b" && p == OUTSIDE_IP),
    );
    for (n, want) in [(0, "a"), (1, "b")] {
        let answers = ask(&f.c.underlay, &f.node_ip(n), 30080, 20, false, 0, T);
        assert_eq!(
            answers,
            vec![Answer::From(want.into(), OUTSIDE_IP.into()); 20],
            "node{n}"
        );
    }
    // ClusterIP traffic still goes to both.
    let t = names(&ask(f.pod(2), CIP, 80, 40, false, 0, T));
    assert_eq!(t.keys().cloned().collect::<Vec<_>>(), ["a", "b"], "{t:?}");

    // What the node says it programmed.
    let out = f.c.nodes[0]
        .ns
        .exec(&[ferry_e2e::ferryctl_bin().to_str().unwrap(), "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Services:           1 ports, 2 endpoints"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "Subnet:             {}",
            f.c.nodes[0].subnet().unwrap()
        )),
        "{text}"
    );
}

#[test]
fn endpoints_ports_protocols_and_policies_follow_the_store() {
    if !require_root() {
        return;
    }
    let f = Fixture::new(StoreKind::File);
    f.c.apply(&f.web("", &[(0, ""), (1, "")]));
    f.wait_answer(f.pod(2), CIP, 80, answered);

    // A removed endpoint gets no new connections.
    f.c.apply(&f.web("", &[(1, "")]));
    f.wait_answer(f.pod(2), CIP, 80, from("b"));
    assert_eq!(
        names(&ask(f.pod(2), CIP, 80, 30, false, 0, T)),
        BTreeMap::from([("b".into(), 30)])
    );

    // Not ready: the terminating but serving endpoint takes over, never
    // the one that is not serving.
    f.c.apply(&f.web(
        "",
        &[
            (0, "ready: false, serving: true, terminating: true"),
            (1, "ready: false, serving: false, terminating: true"),
        ],
    ));
    f.wait_answer(f.pod(3), CIP, 80, from("a"));
    assert_eq!(
        names(&ask(f.pod(3), CIP, 80, 30, false, 0, T)),
        BTreeMap::from([("a".into(), 30)])
    );

    // No endpoints: refused at once, TCP and UDP.
    f.c.apply(&f.web("", &[]));
    f.wait_answer(f.pod(2), CIP, 80, |a| *a == Answer::Refused);
    assert_eq!(ask(f.pod(2), CIP, 80, 1, true, 0, T), vec![Answer::Refused]);

    // A port added, then removed; the same port over TCP and UDP.
    let two = f
        .web("", &[(0, "")])
        .replace(
            "  ports: [{name: http, port: 80, targetPort: 8080}]",
            "  ports: [{name: http, port: 80, targetPort: 8080}, {name: alt, port: 81, targetPort: 8080}, {name: udp, port: 81, protocol: UDP, targetPort: 8080}]",
        )
        .replace(
            "ports: [{name: http, port: 8080}]",
            "ports: [{name: http, port: 8080}, {name: alt, port: 8080}, {name: udp, port: 8080, protocol: UDP}]",
        );
    f.c.apply(&two);
    f.wait_answer(f.pod(3), CIP, 81, from("a"));
    assert!(
        ask(f.pod(3), CIP, 81, 1, true, 0, T)[0]
            == Answer::From("a".into(), f.c.pods[3].ip.clone())
    );
    f.c.apply(&f.web("", &[(0, "")]));
    f.wait_answer(f.pod(3), CIP, 81, |a| *a == Answer::Refused);

    // externalIPs: reachable from outside through any node that the
    // outside routes it to.
    let ext = "192.168.77.100";
    f.c.apply(&f.web(&format!("  externalIPs: [{ext}]"), &[(0, ""), (1, "")]));
    f.c.underlay
        .ok(&["ip", "route", "replace", ext, "via", &f.node_ip(1)]);
    f.wait_answer(&f.c.underlay, ext, 80, answered);

    // internalTrafficPolicy: Local: each client only reaches its node's
    // endpoint.
    f.c.apply(&f.web("  internalTrafficPolicy: Local", &[(0, ""), (1, "")]));
    f.wait_answer(f.pod(3), CIP, 80, from("b"));
    assert_eq!(
        names(&ask(f.pod(3), CIP, 80, 30, false, 0, T)),
        BTreeMap::from([("b".into(), 30)])
    );
    assert_eq!(
        names(&ask(f.pod(2), CIP, 80, 30, false, 0, T)),
        BTreeMap::from([("a".into(), 30)])
    );

    // ClientIP affinity pins a client; switched off, it spreads again.
    f.c.apply(&f.web("  sessionAffinity: ClientIP", &[(0, ""), (1, "")]));
    assert!(
        wait_until(Duration::from_secs(10), || {
            names(&ask(f.pod(2), CIP, 80, 20, false, 0, T)).len() == 1
        }),
        "affinity never pinned:\n{}",
        f.c.logs()
    );
    f.c.apply(&f.web("", &[(0, ""), (1, "")]));
    assert!(wait_until(Duration::from_secs(10), || {
        names(&ask(f.pod(2), CIP, 80, 40, false, 0, T)).len() == 2
    }));
}

#[test]
fn hairpin_and_udp_flow_follows_its_endpoint() {
    if !require_root() {
        return;
    }
    let f = Fixture::new(StoreKind::File);
    f.c.apply(&f.web("", &[(0, "")]));
    f.wait_answer(f.pod(0), CIP, 80, answered);
    // A pod reaches itself through its Service.
    let got = ask(f.pod(0), CIP, 80, 3, false, 0, T);
    assert!(
        got.iter()
            .all(|a| matches!(a, Answer::From(n, _) if n == "a")),
        "{got:?}"
    );

    // A UDP client with a fixed source port: when the endpoint changes, the
    // flow (one conntrack entry) follows it instead of black-holing.
    let udp = f
        .web("", &[(0, "")])
        .replace(
            "  ports: [{name: http, port: 80, targetPort: 8080}]",
            "  ports: [{name: http, port: 80, protocol: UDP, targetPort: 8080}]",
        )
        .replace(
            "ports: [{name: http, port: 8080}]",
            "ports: [{name: http, port: 8080, protocol: UDP}]",
        );
    f.c.apply(&udp);
    let ask_udp = || ask(f.pod(3), CIP, 80, 1, true, 40000, T);
    assert!(wait_until(
        Duration::from_secs(10),
        || matches!(&ask_udp()[0], Answer::From(n, _) if n == "a")
    ));
    f.c.apply(
        &udp.replace(&f.c.pods[0].ip, &f.c.pods[1].ip)
            .replace("node1", "node2"),
    );
    assert!(
        wait_until(
            Duration::from_secs(10),
            || matches!(&ask_udp()[0], Answer::From(n, _) if n == "b")
        ),
        "the UDP flow stayed on the gone endpoint: {:?}\n{}",
        ask_udp(),
        f.c.logs()
    );
}

#[test]
fn ferryd_kill_and_restart_keeps_an_established_connection() {
    if !require_root() {
        return;
    }
    let mut f = Fixture::new(StoreKind::Etcd);
    let sink = tcp_sink(f.pod(1), "0.0.0.0", 9000);
    let yaml = f
        .web("", &[(1, "")])
        .replace("targetPort: 8080", "targetPort: 9000")
        .replace("port: 8080", "port: 9000");
    f.c.apply(&yaml);
    // The sink takes one connection only: wait for the rule, not for an
    // answer.
    let node = &f.c.nodes[0].ns;
    // One endpoint, no affinity: the port is in the shared pick chain's set.
    assert!(
        wait_until(Duration::from_secs(15), || node
            .nft_keys("pick-ports-1")
            .iter()
            .any(|k| k.contains(CIP))),
        "never programmed:\n{}",
        f.c.logs()
    );
    let sender = tcp_send(f.pod(2), CIP, 80, 6.0);
    wait_accepted(f.pod(1), 9000);
    f.c.stop_ferryd(0, libc::SIGKILL);
    f.c.start_ferryd(0);
    f.c.wait_ready(0, Duration::from_secs(30));
    let (sent, err, ok) = finish(sender, Duration::from_secs(20));
    let (got, _, _) = finish(sink, Duration::from_secs(5));
    assert!(
        ok,
        "the connection broke across the restart: {err}\n{}",
        f.c.logs()
    );
    let bytes: u64 = got
        .split_whitespace()
        .nth(1)
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    assert_eq!(bytes.to_string(), sent.trim(), "sink: {got}");
    // The restarted ferryd adopted the table: it did not rebuild it (the
    // first start did: there was no table).
    let n = &f.c.nodes[0];
    let first = std::fs::read_to_string(n.log_path(1)).unwrap();
    let second = std::fs::read_to_string(n.log_path(2)).unwrap();
    assert!(first.contains("rebuilt=true"), "{first}");
    assert!(!second.contains("rebuilt=true"), "{second}");
}

#[test]
fn load_balancer_with_local_policy_answers_health_checks() {
    if !require_root() {
        return;
    }
    let f = Fixture::new(StoreKind::File);
    let spec = "  type: LoadBalancer\n  externalTrafficPolicy: Local";
    f.c.apply(&f.web(spec, &[(0, "")]));
    // ferryctl allocated the health-check node port, as the API server does.
    let out = f.c.ferryctl(&["get", "services", "-o", "json"], "");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hc = list["items"][0]["spec"]["healthCheckNodePort"]
        .as_u64()
        .expect("healthCheckNodePort allocated");
    let get = |node: usize| {
        let url = format!("http://{}:{hc}/", f.node_ip(node));
        let script = format!(
            "import urllib.request,urllib.error\ntry:\n r=urllib.request.urlopen('{url}',timeout=2);print(r.status, r.read().decode().strip())\nexcept urllib.error.HTTPError as e:\n print(e.code, e.read().decode().strip())\nexcept OSError as e:\n print('error', e)"
        );
        let o = f.c.underlay.exec(&[ferry_e2e::python3(), "-c", &script]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    // node1 has the endpoint, node2 has none.
    let mut last = (String::new(), String::new());
    let ok = wait_until(Duration::from_secs(15), || {
        last = (get(0), get(1));
        last.0.starts_with("200 ") && last.1.starts_with("503 ")
    });
    assert!(ok, "{last:?}\n{}", f.c.logs());
    assert!(last.0.contains(r#""localEndpoints":1"#), "{}", last.0);
    assert!(last.1.contains(r#""localEndpoints":0"#), "{}", last.1);
    // The endpoint moves to node2: the answers swap.
    f.c.apply(&f.web(spec, &[(1, "")]));
    let ok = wait_until(Duration::from_secs(15), || {
        last = (get(0), get(1));
        last.0.starts_with("503 ") && last.1.starts_with("200 ")
    });
    assert!(ok, "{last:?}");
}
