//! ferryd's UDP conntrack cleanup (`ferryd::conntrack`, over ctnetlink)
//! against real conntrack entries: UDP flows from a client namespace through
//! a "node" namespace that DNATs a Service address to endpoints in a server
//! namespace, all made by the test and deleted after it. The cleanup runs
//! on a thread inside the node namespace; `conntrack -L` there checks the
//! outcome.

use std::collections::HashSet;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_e2e::{require_root, Netns};
use ferryd::conntrack;

const SVC: &str = "10.96.0.10";
const OTHER_SVC: &str = "10.96.0.11";
const EP_A: &str = "10.2.0.2";
const EP_B: &str = "10.2.0.3";

/// client (10.1.0.2) -- node (10.1.0.1 | 10.2.0.1) -- server (10.2.0.2, .3)
struct Topo {
    client: Netns,
    node: Netns,
    server: Netns,
}

impl Topo {
    fn new() -> Topo {
        let (client, node, server) = (Netns::new(), Netns::new(), Netns::new());
        node.veth_to("to-client", &client);
        node.veth_to("to-server", &server);
        for (ns, cmds) in [
            (
                &node,
                &[
                    "ip addr add 10.1.0.1/24 dev to-client",
                    "ip addr add 10.2.0.1/24 dev to-server",
                    "ip link set to-client up",
                    "ip link set to-server up",
                    "sysctl -qw net.ipv4.ip_forward=1",
                ][..],
            ),
            (
                &client,
                &[
                    "ip addr add 10.1.0.2/24 dev eth0",
                    "ip link set eth0 up",
                    "ip route add default via 10.1.0.1",
                ][..],
            ),
            (
                &server,
                &[
                    "ip addr add 10.2.0.2/24 dev eth0",
                    "ip addr add 10.2.0.3/24 dev eth0",
                    "ip link set eth0 up",
                    "ip route add default via 10.2.0.1",
                ][..],
            ),
        ] {
            for c in cmds {
                ns.ok(&c.split(' ').collect::<Vec<_>>());
            }
        }
        // The Services: the endpoint is chosen by the client's source port,
        // so that each test flow lands where the test wants it.
        let rules = format!(
            "table ip svc {{
  map ep {{ type ipv4_addr . inet_service . inet_service : ipv4_addr . inet_service; }}
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    dnat ip to ip daddr . udp dport . udp sport map @ep
  }}
}}
add element ip svc ep {{
  {SVC} . 53 . 40001 : {EP_A} . 5353,
  {SVC} . 53 . 40002 : {EP_B} . 5353,
  {SVC} . 53 . 40003 : {EP_A} . 5354,
  {OTHER_SVC} . 53 . 40004 : {EP_B} . 5353,
  {SVC} . 54 . 40005 : {EP_B} . 5353,
}}
"
        );
        let path = std::env::temp_dir().join(format!("ferry-ct-{}.nft", node.name()));
        std::fs::write(&path, rules).unwrap();
        node.ok(&["nft", "-f", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(&path);
        Topo {
            client,
            node,
            server,
        }
    }
}

/// One UDP round trip from `client`'s source port `sport` to `dst`;
/// returns what answered ("<addr>:<port>" of the endpoint).
fn ask(client: &Netns, sport: u16, dst: &str, dport: u16) -> String {
    let sock = client.run(|| UdpSocket::bind(("0.0.0.0", sport)).unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(b"who", (dst, dport)).unwrap();
    let mut buf = [0; 64];
    let (n, _) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no answer from {dst}:{dport} to sport {sport}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// (orig sport, orig dst, orig dport, reply src, reply sport) of the UDP
/// entries in `ns`, from `conntrack -L`.
fn entries(ns: &Netns) -> HashSet<(u16, String, u16, String, u16)> {
    let out = ns.exec(&["conntrack", "-L", "-p", "udp"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let kv: Vec<(&str, &str)> = l
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .collect();
            let all = |k: &str| -> Vec<&str> {
                kv.iter()
                    .filter(|(key, _)| *key == k)
                    .map(|(_, v)| *v)
                    .collect()
            };
            let (src, dst, sport, dport) = (all("src"), all("dst"), all("sport"), all("dport"));
            Some((
                sport.first()?.parse().ok()?,
                dst.first()?.to_string(),
                dport.first()?.parse().ok()?,
                src.get(1)?.to_string(),
                sport.get(1)?.parse().ok()?,
            ))
        })
        .collect()
}

fn flow(
    sport: u16,
    dst: &str,
    dport: u16,
    ep: &str,
    ep_port: u16,
) -> (u16, String, u16, String, u16) {
    (sport, dst.into(), dport, ep.into(), ep_port)
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn deletes_exactly_the_stale_udp_entries() {
    if !require_root() {
        return;
    }
    if std::process::Command::new("conntrack")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("`conntrack` is not installed (package conntrack)");
    }
    let t = Topo::new();
    // Echo servers on the endpoints: each answers with its own address.
    let servers: Vec<UdpSocket> = [(EP_A, 5353), (EP_B, 5353), (EP_A, 5354)]
        .into_iter()
        .map(|a| t.server.run(|| UdpSocket::bind(a).unwrap()))
        .collect();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for srv in &servers {
            let stop = &stop;
            s.spawn(move || {
                srv.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let me = srv.local_addr().unwrap().to_string();
                let mut buf = [0; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = srv.recv_from(&mut buf) {
                        let _ = srv.send_to(me.as_bytes(), from);
                    }
                }
            });
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&t)));
        stop.store(true, Ordering::Relaxed);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    });
}

fn run(t: &Topo) {
    assert_eq!(ask(&t.client, 40001, SVC, 53), "10.2.0.2:5353");
    assert_eq!(ask(&t.client, 40002, SVC, 53), "10.2.0.3:5353");
    assert_eq!(ask(&t.client, 40003, SVC, 53), "10.2.0.2:5354");
    assert_eq!(ask(&t.client, 40004, OTHER_SVC, 53), "10.2.0.3:5353");
    assert_eq!(ask(&t.client, 40005, SVC, 54), "10.2.0.3:5353");
    let all: HashSet<_> = [
        flow(40001, SVC, 53, EP_A, 5353),
        flow(40002, SVC, 53, EP_B, 5353),
        flow(40003, SVC, 53, EP_A, 5354),
        flow(40004, OTHER_SVC, 53, EP_B, 5353),
        flow(40005, SVC, 54, EP_B, 5353),
    ]
    .into();
    assert_eq!(entries(&t.node), all, "the five flows are tracked");

    // SVC:53 keeps only EP_A:5353: the flows to EP_B:5353 and to EP_A's
    // other port go; other Services and other ports are untouched.
    let keep: HashSet<(Ipv4Addr, u16)> = [(v4(EP_A), 5353)].into();
    let n = t
        .node
        .run(|| conntrack::delete_stale_udp((v4(SVC), 53), &keep).unwrap());
    assert_eq!(n, 2);
    let mut want = all.clone();
    want.remove(&flow(40002, SVC, 53, EP_B, 5353));
    want.remove(&flow(40003, SVC, 53, EP_A, 5354));
    assert_eq!(entries(&t.node), want);
    // Nothing stale left: a second pass deletes nothing.
    let n = t
        .node
        .run(|| conntrack::delete_stale_udp((v4(SVC), 53), &keep).unwrap());
    assert_eq!(n, 0);

    // Why it matters: the client's flow follows its new endpoint at once.
    // (A map element's value changes by delete and add, in one transaction.)
    t.node.ok(&[
        "nft",
        &format!(
            "delete element ip svc ep {{ {SVC} . 53 . 40002 }}; add element ip svc ep {{ {SVC} . 53 . 40002 : {EP_A} . 5353 }}"
        ),
    ]);
    assert_eq!(ask(&t.client, 40002, SVC, 53), "10.2.0.2:5353");

    // SVC:53 loses every endpoint: all its UDP entries go, nothing else.
    let n = t
        .node
        .run(|| conntrack::delete_udp_to((v4(SVC), 53)).unwrap());
    assert_eq!(n, 2, "40001 and the new 40002");
    assert_eq!(
        entries(&t.node),
        [
            flow(40004, OTHER_SVC, 53, EP_B, 5353),
            flow(40005, SVC, 54, EP_B, 5353),
        ]
        .into()
    );
    assert_eq!(
        t.node
            .run(|| conntrack::delete_udp_to((v4(SVC), 53)).unwrap()),
        0
    );
}
