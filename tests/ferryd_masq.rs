//! ferryd's egress masquerade (`ferryd::masq`, nftables over netlink)
//! against the real kernel, in scratch network namespaces the tests make and
//! always delete. The library runs on threads that entered the namespace
//! (`Netns::run`); the caller's namespace is never touched.

use std::fs::File;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry::nft::MasqEntry;
use ferry_e2e::{require_root, Netns};
use ferryd::masq;
use ipnetwork::Ipv4Network;
use nix::fcntl::{Flock, FlockArg};

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn ensure(ns: &Netns, enabled: bool, subnet: &str, cluster: &str) -> bool {
    let (s, c) = (net(subnet), net(cluster));
    ns.run(move || masq::ensure(enabled, s, c).unwrap())
}

/// The lines of ferryd's chain in `nft list ruleset`, trimmed; empty when
/// the chain does not exist.
fn chain_lines(ns: &Netns) -> Vec<String> {
    let rs = ns.nft_ruleset();
    let Some(start) = rs.find("chain node-postrouting {") else {
        return vec![];
    };
    rs[start..]
        .lines()
        .skip(1)
        .map(str::trim)
        .take_while(|l| *l != "}")
        .map(str::to_string)
        .collect()
}

fn marker(subnet: &str, cluster: &str) -> String {
    masq::render(true, net(subnet), net(cluster))
        .unwrap()
        .comment
}

#[test]
fn writes_adopts_and_repairs() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    assert!(!ensure(&ns, false, "10.244.3.0/24", "10.244.0.0/16"));
    assert!(
        ns.nft_ruleset().trim().is_empty(),
        "disabled writes nothing"
    );

    let t0 = Instant::now();
    assert!(ensure(&ns, true, "10.244.3.7/24", "10.244.0.0/16"));
    let first = t0.elapsed();
    let m = marker("10.244.3.0/24", "10.244.0.0/16");
    assert_eq!(
        chain_lines(&ns),
        [
            "type nat hook postrouting priority srcnat; policy accept;".to_string(),
            format!(
                "ip saddr 10.244.3.0/24 ip daddr != 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade comment \"{m}\""
            ),
        ]
    );
    let t0 = Instant::now();
    for _ in 0..20 {
        assert!(!ensure(&ns, true, "10.244.3.0/24", "10.244.0.0/16"));
    }
    println!(
        "ensure: first write {first:?}, unchanged {:?} each (incl. a thread per call)",
        t0.elapsed() / 20
    );

    // New inputs: the rule is replaced, never doubled.
    assert!(ensure(&ns, true, "10.244.3.0/24", "10.0.0.0/8"));
    let lines = chain_lines(&ns);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].contains("ip daddr != 10.0.0.0/8"), "{lines:?}");
    assert!(lines[1].contains(&marker("10.244.3.0/24", "10.0.0.0/8")));

    // Someone added a rule to ferryd's chain: it goes.
    ns.ok(&[
        "nft",
        "add rule inet ferry node-postrouting ip saddr 10.9.0.0/16 masquerade",
    ]);
    assert!(ensure(&ns, true, "10.244.3.0/24", "10.0.0.0/8"));
    assert_eq!(chain_lines(&ns).len(), 2, "{:?}", chain_lines(&ns));
    // A look-alike without ferryd's comment is not ferryd's rule: rewritten.
    ns.ok(&["nft", "flush chain inet ferry node-postrouting"]);
    ns.ok(&[
        "nft",
        "add rule inet ferry node-postrouting ip saddr 10.244.3.0/24 masquerade",
    ]);
    assert!(ensure(&ns, true, "10.244.3.0/24", "10.0.0.0/8"));
    assert!(chain_lines(&ns)[1].contains("comment"));

    // A chain of the wrong type is replaced in one transaction.
    ns.ok(&["nft", "delete chain inet ferry node-postrouting"]);
    ns.ok(&[
        "nft",
        "add chain inet ferry node-postrouting { type filter hook postrouting priority 0; }",
    ]);
    assert!(ensure(&ns, true, "10.244.3.0/24", "10.0.0.0/8"));
    let lines = chain_lines(&ns);
    assert_eq!(
        lines[0], "type nat hook postrouting priority srcnat; policy accept;",
        "{lines:?}"
    );
    assert_eq!(lines.len(), 2, "{lines:?}");

    // Off: the chain goes, the (shared) table stays.
    assert!(ensure(&ns, false, "10.244.3.0/24", "10.0.0.0/8"));
    assert!(chain_lines(&ns).is_empty());
    assert_eq!(ns.nft_names("table", None), ["ferry"]);
    assert!(!ensure(&ns, false, "10.244.3.0/24", "10.0.0.0/8"));
}

/// ferryd and the plugin share `inet ferry`: each adds and removes only its
/// own objects, whatever the order.
#[test]
fn shares_the_table_with_the_plugin() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let pod = MasqEntry {
        network: "net1",
        key: "net1/c1/eth0",
        ip: "10.244.3.5".parse().unwrap(),
        subnet: "10.244.3.0/24".parse().unwrap(),
    };
    ns.run(|| ferry::nft::add_masq(&[pod]).unwrap());
    assert!(ensure(&ns, true, "10.244.3.0/24", "10.244.0.0/16"));
    let chains = ns.nft_names("chain", Some("ferry"));
    assert!(
        chains.contains(&"cni-postrouting".to_string()),
        "{chains:?}"
    );
    assert!(
        chains.contains(&"node-postrouting".to_string()),
        "{chains:?}"
    );
    assert_eq!(ns.nft_keys("cni-masq4"), ["10.244.3.5"]);

    // The plugin's last pod goes: its objects go, ferryd's chain stays.
    ns.run(|| ferry::nft::del_masq(&[pod]).unwrap());
    assert_eq!(ns.nft_names("chain", Some("ferry")), ["node-postrouting"]);
    assert!(!ensure(&ns, true, "10.244.3.0/24", "10.244.0.0/16"));

    // And the other way round: ferryd turns off under a live pod.
    ns.run(|| ferry::nft::add_masq(&[pod]).unwrap());
    assert!(ensure(&ns, false, "10.244.3.0/24", "10.244.0.0/16"));
    let chains = ns.nft_names("chain", Some("ferry"));
    assert!(
        !chains.contains(&"node-postrouting".to_string()),
        "{chains:?}"
    );
    assert_eq!(ns.nft_keys("cni-masq4"), ["10.244.3.5"]);
    ns.run(|| ferry::nft::del_masq(&[pod]).unwrap());
    assert!(
        ns.nft_names("table", None).is_empty(),
        "plugin dropped the table"
    );
}

/// ensure waits for the plugin's lock (an exclusive flock on the
/// namespace's nsfs inode), so the two never interleave read and write.
#[test]
fn takes_the_plugins_lock() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    // /run/netns/<name> is a bind mount of the same nsfs inode as
    // /proc/thread-self/ns/net of a thread inside it.
    let f = File::open(ns.path()).unwrap();
    let lock = Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            let r = masq::ensure(true, net("10.244.3.0/24"), net("10.244.0.0/16"));
            tx.send(r.map_err(|e| e.to_string())).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(500)).is_err(),
            "ensure ran while the lock was held"
        );
        assert!(ns.nft_ruleset().trim().is_empty(), "wrote under the lock");
        drop(lock);
        let r = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("ensure done");
        assert_eq!(r, Ok(true));
    });
    assert_eq!(chain_lines(&ns).len(), 2);
}
