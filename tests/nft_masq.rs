//! ferry::nft (the plugin's masquerade over netlink) against the real
//! kernel, each test in scratch network namespaces it makes and always
//! deletes. Never touches the caller's namespace: the library runs on
//! threads that setns(2) into the scratch namespace (`Netns::run`).

use std::net::IpAddr;

use ferry::nft::{self, MasqEntry, NftError};
use ferry_e2e::{require_root, Netns};
use ipnetwork::IpNetwork;

struct Pod {
    network: &'static str,
    key: String,
    ip: IpAddr,
    subnet: IpNetwork,
}

impl Pod {
    fn new(network: &'static str, id: &str, ip: &str, subnet: &str) -> Pod {
        Pod {
            network,
            key: format!("{network}/{id}/eth0"),
            ip: ip.parse().unwrap(),
            subnet: subnet.parse().unwrap(),
        }
    }
    fn entry(&self) -> MasqEntry<'_> {
        MasqEntry {
            network: self.network,
            key: &self.key,
            ip: self.ip,
            subnet: self.subnet,
        }
    }
}

fn chain(network: &str, subnet: &str) -> String {
    nft::net_chain_name(network, &subnet.parse().unwrap())
}

fn sorted_keys(ns: &Netns) -> Vec<(String, IpAddr)> {
    let mut k = ns.run(|| nft::list_masq_keys().unwrap());
    k.sort();
    k
}

#[test]
fn add_list_delete() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let a4 = Pod::new("net1", "aaa", "10.22.0.5", "10.22.0.0/16");
    let a6 = Pod::new("net1", "aaa", "fd00:22::5", "fd00:22::/64");
    let b = Pod::new("net1", "bbb", "10.22.0.6", "10.22.0.0/16");
    let c = Pod::new("net2", "ccc", "10.33.0.7", "10.33.0.0/24");
    let (n1, n1v6, n2) = (
        chain("net1", "10.22.0.0/16"),
        chain("net1", "fd00:22::/64"),
        chain("net2", "10.33.0.0/24"),
    );

    ns.run(|| {
        // Nothing there yet: every read and delete is fine.
        assert!(nft::list_masq_keys().unwrap().is_empty());
        nft::del_masq(&[a4.entry()]).unwrap();
        nft::del_masq_by_key("nope").unwrap();
        nft::add_masq(&[a4.entry(), a6.entry()]).unwrap();
        nft::add_masq(&[b.entry()]).unwrap();
        nft::add_masq(&[c.entry()]).unwrap();
    });
    // Exactly the documented ruleset, in creation order.
    let want = format!(
        "table inet ferry {{
\tmap cni-masq4 {{
\t\ttype ipv4_addr : verdict
\t\telements = {{ 10.22.0.5 comment \"net1/aaa/eth0\" : goto {n1}, 10.22.0.6 comment \"net1/bbb/eth0\" : goto {n1},
\t\t\t     10.33.0.7 comment \"net2/ccc/eth0\" : goto {n2} }}
\t}}

\tmap cni-masq6 {{
\t\ttype ipv6_addr : verdict
\t\telements = {{ fd00:22::5 comment \"net1/aaa/eth0\" : goto {n1v6} }}
\t}}

\tchain cni-postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr vmap @cni-masq4
\t\tip6 saddr vmap @cni-masq6
\t}}

\tchain {n1} {{
\t\tip daddr 10.22.0.0/16 return
\t\tip daddr 224.0.0.0/4 return
\t\tmasquerade
\t}}

\tchain {n1v6} {{
\t\tip6 daddr fd00:22::/64 return
\t\tip6 daddr ff00::/8 return
\t\tmasquerade
\t}}

\tchain {n2} {{
\t\tip daddr 10.33.0.0/24 return
\t\tip daddr 224.0.0.0/4 return
\t\tmasquerade
\t}}
}}
"
    );
    assert_eq!(ns.nft_ruleset(), want);

    let mut all = vec![
        (a4.key.clone(), a4.ip),
        (a6.key.clone(), a6.ip),
        (b.key.clone(), b.ip),
        (c.key.clone(), c.ip),
    ];
    all.sort();
    assert_eq!(sorted_keys(&ns), all);

    // Pod a goes (both families): its v6 chain goes with it, net1's v4
    // chain stays for b.
    ns.run(|| nft::del_masq(&[a4.entry(), a6.entry()]).unwrap());
    assert_eq!(ns.nft_keys("cni-masq4"), ["10.22.0.6", "10.33.0.7"]);
    assert!(ns.nft_keys("cni-masq6").is_empty());
    let chains = ns.nft_names("chain", Some("ferry"));
    assert!(
        !chains.contains(&n1v6) && chains.contains(&n1) && chains.contains(&n2),
        "{chains:?}"
    );
    assert_eq!(sorted_keys(&ns).len(), 2);

    // A DEL whose key does not match leaves the element alone (reused IP).
    let impostor = Pod::new("net1", "zzz", "10.22.0.6", "10.22.0.0/16");
    ns.run(|| nft::del_masq(&[impostor.entry()]).unwrap());
    assert_eq!(ns.nft_keys("cni-masq4"), ["10.22.0.6", "10.33.0.7"]);

    // By key, without the IP.
    ns.run(|| nft::del_masq_by_key(&c.key).unwrap());
    assert_eq!(ns.nft_keys("cni-masq4"), ["10.22.0.6"]);
    let chains = ns.nft_names("chain", Some("ferry"));
    assert!(!chains.contains(&n2) && chains.contains(&n1), "{chains:?}");

    // The last one takes the table with it.
    ns.run(|| nft::del_masq(&[b.entry()]).unwrap());
    assert!(
        ns.nft_names("table", None).is_empty(),
        "{}",
        ns.nft_ruleset()
    );
    ns.run(|| {
        nft::del_masq(&[b.entry()]).unwrap();
        nft::del_masq_by_key(&b.key).unwrap();
        assert!(nft::list_masq_keys().unwrap().is_empty());
    });
}

#[test]
fn re_add_replaces() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let p = Pod::new("net1", "aaa", "10.22.0.5", "10.22.0.0/16");
    // Same IP, now another attachment on another network.
    let q = Pod::new("net3", "qqq", "10.22.0.5", "10.22.0.0/16");
    ns.run(|| {
        nft::add_masq(&[p.entry()]).unwrap();
        nft::add_masq(&[p.entry()]).unwrap();
    });
    assert_eq!(sorted_keys(&ns), vec![(p.key.clone(), p.ip)]);
    ns.run(|| nft::add_masq(&[q.entry()]).unwrap());
    assert_eq!(sorted_keys(&ns), vec![(q.key.clone(), q.ip)]);
    let rs = ns.nft_ruleset();
    assert!(rs.contains(&format!(
        "10.22.0.5 comment \"net3/qqq/eth0\" : goto {}",
        chain("net3", "10.22.0.0/16")
    )));
    // net1's chain lingers (nothing deletes it on replace) until the last
    // element goes, then everything does.
    ns.run(|| nft::del_masq_by_key(&q.key).unwrap());
    assert!(
        ns.nft_names("table", None).is_empty(),
        "{}",
        ns.nft_ruleset()
    );
}

#[test]
fn shared_table_is_kept() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let p = Pod::new("net1", "aaa", "10.22.0.5", "10.22.0.0/16");
    ns.run(|| nft::add_masq(&[p.entry()]).unwrap());
    // ferryd's objects in the same table.
    ns.exec(&[
        "nft",
        "add chain inet ferry services; add set inet ferry svc { type ipv4_addr; }",
    ]);
    ns.run(|| nft::del_masq(&[p.entry()]).unwrap());
    let chains = ns.nft_names("chain", Some("ferry"));
    let sets = ns.nft_names("set", Some("ferry"));
    let maps = ns.nft_names("map", Some("ferry"));
    assert_eq!(chains, ["services"], "only ferryd's chain is left");
    assert_eq!(sets, ["svc"]);
    assert!(maps.is_empty(), "{maps:?}");
    // And the plugin builds its part again next to them.
    ns.run(|| nft::add_masq(&[p.entry()]).unwrap());
    assert_eq!(sorted_keys(&ns), vec![(p.key.clone(), p.ip)]);
}

#[test]
fn concurrent_adds() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let nets = ["net1", "net2", "net3"];
    let pods: Vec<Pod> = (0..8)
        .map(|i| {
            let net = nets[i % 3];
            let n = i % 3 + 1;
            Pod::new(
                net,
                &format!("c{i}"),
                &format!("10.{n}.0.{}", i + 10),
                &format!("10.{n}.0.0/16"),
            )
        })
        .collect();
    std::thread::scope(|s| {
        for p in &pods {
            let ns = &ns;
            s.spawn(move || {
                ns.enter();
                nft::add_masq(&[p.entry()]).unwrap();
            });
        }
    });
    let mut want: Vec<_> = pods.iter().map(|p| (p.key.clone(), p.ip)).collect();
    want.sort();
    assert_eq!(sorted_keys(&ns), want);
    let rs = ns.nft_ruleset();
    assert_eq!(rs.matches("masquerade").count(), 3, "{rs}");
    assert_eq!(rs.matches("saddr vmap").count(), 2, "{rs}");
    assert_eq!(rs.matches("chain cni-n-").count(), 3, "{rs}");

    // And concurrent deletes leave nothing behind.
    std::thread::scope(|s| {
        for p in &pods {
            let ns = &ns;
            s.spawn(move || {
                ns.enter();
                nft::del_masq_by_key(&p.key).unwrap();
            });
        }
    });
    assert!(
        ns.nft_names("table", None).is_empty(),
        "{}",
        ns.nft_ruleset()
    );
}

#[test]
fn errors_keep_errno() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let p = Pod::new("net1", "aaa", "10.22.0.5", "10.22.0.0/16");
    let c = chain("net1", "10.22.0.0/16");
    ns.run(|| nft::add_masq(&[p.entry()]).unwrap());
    // A foreign chain jumping to the network chain keeps it busy (EBUSY):
    // the last DEL still removes the element, the base chain and the maps.
    ns.exec(&[
        "nft",
        &format!("add chain inet ferry other; add rule inet ferry other jump {c}"),
    ]);
    ns.run(|| nft::del_masq(&[p.entry()]).unwrap());
    assert!(ns.nft_names("map", Some("ferry")).is_empty());
    let chains = ns.nft_names("chain", Some("ferry"));
    assert!(
        !chains.iter().any(|c| c == "cni-postrouting") && chains.contains(&c),
        "{chains:?}"
    );

    // A map of our name but another type: the kernel's errno comes through,
    // matchable.
    ns.exec(&[
        "nft",
        "add map inet ferry cni-masq4 { type ipv4_addr : ipv4_addr; }",
    ]);
    let err = ns.run(|| nft::add_masq(&[p.entry()])).unwrap_err();
    assert!(matches!(err, NftError::Kernel { .. }), "{err:?}");
    assert_eq!(err.errno(), Some(nix::errno::Errno::EINVAL), "{err:?}");
}

/// Traffic check: a pod whose subnet the outside world has no route to can
/// reach it only when masqueraded; traffic to another pod of its own subnet
/// crosses the same postrouting rule and keeps its source address.
#[test]
fn traffic_is_masqueraded() {
    if !require_root() {
        return;
    }
    let host = Netns::new();
    let (pod, peer, out) = (Netns::new(), Netns::new(), Netns::new());
    for (ns, hostdev, hostaddr, addr) in [
        (&pod, "fthp", "10.22.0.1/24", "10.22.0.5/24"),
        (&peer, "fthq", "10.22.1.1/24", "10.22.1.5/24"),
        (&out, "fthout", "192.168.50.1/24", "192.168.50.2/24"),
    ] {
        host.veth_to(hostdev, ns);
        host.ok(&["ip", "addr", "add", hostaddr, "dev", hostdev]);
        host.ok(&["ip", "link", "set", hostdev, "up"]);
        ns.ok(&["ip", "addr", "add", addr, "dev", "eth0"]);
        ns.ok(&["ip", "link", "set", "eth0", "up"]);
    }
    host.ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    pod.ok(&["ip", "route", "add", "default", "via", "10.22.0.1"]);
    peer.ok(&["ip", "route", "add", "default", "via", "10.22.1.1"]);
    // The peer counts what arrives by source: the pod's own address, or the
    // host's (masqueraded).
    peer.ok(&[
        "nft",
        "add table ip seen; add chain ip seen in { type filter hook input priority 0; }; \
         add rule ip seen in ip saddr 10.22.0.5 counter; \
         add rule ip seen in ip saddr 10.22.1.1 counter",
    ]);
    let seen_from = |src: &str| -> u64 {
        peer.nft_objects()
            .iter()
            .filter_map(|o| o.get("rule"))
            .filter(|r| r["expr"][0]["match"]["right"] == src)
            .map(|r| r["expr"][1]["counter"]["packets"].as_u64().unwrap())
            .sum()
    };
    let ping = |to: &str| pod.ping_once(to);

    // "out" has no route back to 10.22/16: no reply without masquerade.
    assert!(!ping("192.168.50.2"));
    // The pod's network is 10.22.0.0/16: 10.22.1.5 is in it.
    let p = Pod::new("net1", "aaa", "10.22.0.5", "10.22.0.0/16");
    host.run(|| nft::add_masq(&[p.entry()]).unwrap());
    assert!(ping("192.168.50.2"), "{}", host.nft_ruleset());
    // Own subnet, forwarded through postrouting: not masqueraded.
    assert!(ping("10.22.1.5"));
    assert_eq!(
        (seen_from("10.22.0.5"), seen_from("10.22.1.1")),
        (1, 0),
        "the peer must see the pod's own address\n{}",
        host.nft_ruleset()
    );
    host.run(|| nft::del_masq(&[p.entry()]).unwrap());
    host.exec(&["conntrack", "-F"]);
    assert!(!ping("192.168.50.2"));
}
