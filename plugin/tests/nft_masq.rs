//! ferry::nft against the real kernel, each test in scratch network
//! namespaces it makes and always deletes. Skips itself unless root with
//! `ip` and `nft` available. Never touches the caller's namespace: the
//! operations run on threads that setns(2) into the scratch namespace.

use std::fs::File;
use std::net::IpAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferry::nft::{self, MasqEntry, NftError};
use ipnetwork::IpNetwork;
use nix::sched::{setns, CloneFlags};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A named netns (`ip netns add`), deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!(
            "nfttest-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            tag
        );
        run("ip", &["netns", "add", &name]);
        Netns(name)
    }

    /// Runs `f` on a fresh thread that has entered this namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter();
                f()
            })
            .join()
            .expect("thread panicked")
        })
    }

    /// Moves the calling thread into the namespace (for threads we own).
    fn enter(&self) {
        let f = File::open(format!("/run/netns/{}", self.0)).unwrap();
        setns(f, CloneFlags::CLONE_NEWNET).unwrap();
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut a = vec!["netns", "exec", &self.0];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    fn try_exec(&self, args: &[&str]) -> bool {
        let mut a = vec!["netns", "exec", &self.0];
        a.extend_from_slice(args);
        Command::new("ip")
            .args(&a)
            .output()
            .unwrap()
            .status
            .success()
    }

    fn ruleset(&self) -> String {
        self.exec(&["nft", "list", "ruleset"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn can_run() -> bool {
    let ok = nix::unistd::geteuid().is_root()
        && Command::new("nft").arg("--version").output().is_ok()
        && Command::new("ip").arg("-V").output().is_ok();
    if !ok {
        eprintln!("skipping: needs root, ip and nft");
    }
    ok
}

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
    if !can_run() {
        return;
    }
    let ns = Netns::new("life");
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
    assert_eq!(ns.ruleset(), want);

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
    let rs = ns.ruleset();
    assert!(
        !rs.contains("10.22.0.5") && !rs.contains("fd00:22::5"),
        "{rs}"
    );
    assert!(
        !rs.contains(&n1v6) && rs.contains(&n1) && rs.contains(&n2),
        "{rs}"
    );
    assert_eq!(sorted_keys(&ns).len(), 2);

    // A DEL whose key does not match leaves the element alone (reused IP).
    let impostor = Pod::new("net1", "zzz", "10.22.0.6", "10.22.0.0/16");
    ns.run(|| nft::del_masq(&[impostor.entry()]).unwrap());
    assert!(ns.ruleset().contains("10.22.0.6"));

    // By key, without the IP.
    ns.run(|| nft::del_masq_by_key(&c.key).unwrap());
    let rs = ns.ruleset();
    assert!(!rs.contains("10.33.0.7") && !rs.contains(&n2), "{rs}");

    // The last one takes the table with it.
    ns.run(|| nft::del_masq(&[b.entry()]).unwrap());
    assert_eq!(ns.exec(&["nft", "list", "tables"]), "");
    ns.run(|| {
        nft::del_masq(&[b.entry()]).unwrap();
        nft::del_masq_by_key(&b.key).unwrap();
        assert!(nft::list_masq_keys().unwrap().is_empty());
    });
}

#[test]
fn re_add_replaces() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("readd");
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
    let rs = ns.ruleset();
    assert!(rs.contains(&format!(
        "10.22.0.5 comment \"net3/qqq/eth0\" : goto {}",
        chain("net3", "10.22.0.0/16")
    )));
    // net1's chain lingers (nothing deletes it on replace) until the last
    // element goes, then everything does.
    ns.run(|| nft::del_masq_by_key(&q.key).unwrap());
    assert_eq!(ns.exec(&["nft", "list", "tables"]), "");
}

#[test]
fn shared_table_is_kept() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("shared");
    let p = Pod::new("net1", "aaa", "10.22.0.5", "10.22.0.0/16");
    ns.run(|| nft::add_masq(&[p.entry()]).unwrap());
    // ferryd's objects in the same table.
    ns.exec(&[
        "nft",
        "add chain inet ferry services; add set inet ferry svc { type ipv4_addr; }",
    ]);
    ns.run(|| nft::del_masq(&[p.entry()]).unwrap());
    let rs = ns.ruleset();
    assert!(!rs.contains("cni-"), "{rs}");
    assert!(
        rs.contains("chain services") && rs.contains("set svc"),
        "{rs}"
    );
    // And the plugin builds its part again next to them.
    ns.run(|| nft::add_masq(&[p.entry()]).unwrap());
    assert_eq!(sorted_keys(&ns), vec![(p.key.clone(), p.ip)]);
}

#[test]
fn concurrent_adds() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("conc");
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
    let rs = ns.ruleset();
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
    assert_eq!(ns.exec(&["nft", "list", "tables"]), "");
}

#[test]
fn errors_keep_errno() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("errno");
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
    let rs = ns.ruleset();
    assert!(
        !rs.contains("10.22.0.5") && !rs.contains("cni-masq"),
        "{rs}"
    );
    assert!(!rs.contains("cni-postrouting") && rs.contains(&c), "{rs}");

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
/// reach it only when masqueraded.
#[test]
fn traffic_is_masqueraded() {
    if !can_run() || Command::new("ping").arg("-V").output().is_err() {
        return;
    }
    let host = Netns::new("h");
    let pod = Netns::new("p");
    let out = Netns::new("o");
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let (hp, ho) = (format!("fth{n}p"), format!("fth{n}o"));
    host.exec(&[
        "ip", "link", "add", &hp, "type", "veth", "peer", "name", "eth0", "netns", &pod.0,
    ]);
    host.exec(&[
        "ip", "link", "add", &ho, "type", "veth", "peer", "name", "eth0", "netns", &out.0,
    ]);
    host.exec(&["ip", "addr", "add", "10.22.0.1/16", "dev", &hp]);
    host.exec(&["ip", "addr", "add", "192.168.50.1/24", "dev", &ho]);
    host.exec(&["ip", "link", "set", &hp, "up"]);
    host.exec(&["ip", "link", "set", &ho, "up"]);
    host.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    pod.exec(&["ip", "addr", "add", "10.22.0.5/16", "dev", "eth0"]);
    pod.exec(&["ip", "link", "set", "eth0", "up"]);
    pod.exec(&["ip", "route", "add", "default", "via", "10.22.0.1"]);
    out.exec(&["ip", "addr", "add", "192.168.50.2/24", "dev", "eth0"]);
    out.exec(&["ip", "link", "set", "eth0", "up"]);
    let ping = |to: &str| pod.try_exec(&["ping", "-c1", "-W1", to]);

    // "out" has no route back to 10.22/16: no reply without masquerade.
    assert!(!ping("192.168.50.2"));
    let p = Pod::new("net1", "aaa", "10.22.0.5", "10.22.0.0/16");
    host.run(|| nft::add_masq(&[p.entry()]).unwrap());
    assert!(ping("192.168.50.2"), "{}", host.ruleset());
    // Own subnet: not masqueraded (the host sees the pod's address).
    assert!(ping("10.22.0.1"));
    host.run(|| nft::del_masq(&[p.entry()]).unwrap());
    host.try_exec(&["conntrack", "-F"]);
    assert!(!ping("192.168.50.2"));
}
