//! The verbs against a real lease directory under the system temp dir.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use super::store::testing::{assert_swept, plant_temps, write_aged};
use super::*;

/// A fresh directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ferry-ipam-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn conf(dir: &Path, ipam: Value, extra: Value) -> NetConf {
    let mut ipam = ipam;
    ipam["type"] = "ferry-ipam".into();
    ipam["dataDir"] = dir.to_str().unwrap().into();
    let mut raw = json!({"cniVersion": "1.1.0", "name": "net1", "type": "ferry", "ipam": ipam});
    for (k, v) in extra.as_object().into_iter().flatten() {
        raw[k] = v.clone();
    }
    NetConf::parse(raw.to_string().as_bytes()).unwrap()
}

fn v4(dir: &Path) -> NetConf {
    conf(dir, json!({"subnet": "10.9.0.0/24"}), json!({}))
}

fn env(cmd: &str, id: &str, ifname: &str, args: &str) -> CniEnv {
    let vars: HashMap<String, String> = [
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", "/proc/self/ns/net"),
        ("CNI_IFNAME", ifname),
        ("CNI_ARGS", args),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    CniEnv::from_vars(&vars).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addrs(out: &CniOutput) -> Vec<String> {
    out.ips.iter().map(|c| c.address.to_string()).collect()
}

/// Lease file names in the network's directory.
fn lease_files(dir: &Path) -> HashSet<String> {
    fs::read_dir(dir.join("net1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.parse::<IpAddr>().is_ok())
        .collect()
}

#[test]
fn add_gives_address_gateway_routes_and_host_local_files() {
    let d = TempDir::new("add");
    let c = conf(
        &d.0,
        json!({"subnet": "10.9.0.0/24", "routes": [{"dst": "0.0.0.0/0"}]}),
        json!({}),
    );
    let out = add(&c, &env("ADD", "c1", "eth0", "")).unwrap();
    assert_eq!(addrs(&out), ["10.9.0.2/24"]);
    assert_eq!(out.ips[0].gateway, Some(ip("10.9.0.1")));
    assert_eq!(out.ips[0].interface, None);
    assert!(out.interfaces.is_empty());
    assert_eq!(out.routes.len(), 1);
    let net = d.0.join("net1");
    assert_eq!(
        fs::read_to_string(net.join("10.9.0.2")).unwrap(),
        "c1\r\neth0"
    );
    assert_eq!(
        fs::read_to_string(net.join("last_reserved_ip.0")).unwrap(),
        "10.9.0.2"
    );
    assert!(net.join("lock").exists());
    assert!(net.join(".ferry-owner:c1:eth0:10.9.0.2").exists());
    // Nothing but those four: temps are gone.
    assert_eq!(fs::read_dir(&net).unwrap().count(), 4);
    // Round robin: the next container gets the next address.
    let out = add(&c, &env("ADD", "c2", "eth0", "")).unwrap();
    assert_eq!(addrs(&out), ["10.9.0.3/24"]);
}

#[test]
fn repeated_add_returns_the_existing_lease() {
    let d = TempDir::new("again");
    let c = v4(&d.0);
    let first = add(&c, &env("ADD", "c1", "eth0", "")).unwrap();
    let again = add(&c, &env("ADD", "c1", "eth0", "")).unwrap();
    assert_eq!(first, again);
    assert_eq!(lease_files(&d.0).len(), 1);
    // Same container, other interface: a new address.
    let net1 = add(&c, &env("ADD", "c1", "net1", "")).unwrap();
    assert_ne!(addrs(&net1), addrs(&first));
    // Asking again for a different address than the one held is refused.
    let e = add(&c, &env("ADD", "c1", "eth0", "IP=10.9.0.100")).unwrap_err();
    assert_eq!(e.code, 101);
}

#[test]
fn dual_stack_gives_one_address_per_range_set() {
    let d = TempDir::new("dual");
    let c = conf(
        &d.0,
        json!({"ranges": [[{"subnet": "10.9.0.0/24"}], [{"subnet": "fd00:9::/64"}]]}),
        json!({}),
    );
    let out = add(&c, &env("ADD", "c1", "eth0", "")).unwrap();
    assert_eq!(addrs(&out), ["10.9.0.2/24", "fd00:9::2/64"]);
    assert_eq!(out.ips[1].gateway, Some(ip("fd00:9::1")));
    assert_eq!(
        fs::read_to_string(d.0.join("net1/fd00:9::2")).unwrap(),
        "c1\r\neth0"
    );
    assert!(d.0.join("net1/last_reserved_ip.1").exists());
}

#[test]
fn requested_addresses_are_honoured_or_refused() {
    let d = TempDir::new("req");
    let c = conf(
        &d.0,
        json!({"subnet": "10.9.0.0/24"}),
        json!({"runtimeConfig": {"ips": ["10.9.0.50/24"]}}),
    );
    let out = add(&c, &env("ADD", "c1", "eth0", "")).unwrap();
    assert_eq!(addrs(&out), ["10.9.0.50/24"]);
    // Taken by c1: c2 may not have it.
    let e = add(&c, &env("ADD", "c2", "eth0", "")).unwrap_err();
    assert_eq!(e.code, 101);
    assert!(
        e.msg.contains("10.9.0.50") && e.msg.contains("in use"),
        "{e}"
    );
    // CNI_ARGS IP= and args.cni.ips work too.
    let plain = v4(&d.0);
    let out = add(
        &plain,
        &env("ADD", "c3", "eth0", "IgnoreUnknown=1;IP=10.9.0.60"),
    )
    .unwrap();
    assert_eq!(addrs(&out), ["10.9.0.60/24"]);
    let c4 = conf(
        &d.0,
        json!({"subnet": "10.9.0.0/24"}),
        json!({"args": {"cni": {"ips": ["10.9.0.61"]}}}),
    );
    assert_eq!(
        addrs(&add(&c4, &env("ADD", "c4", "eth0", "")).unwrap()),
        ["10.9.0.61/24"]
    );
    // Outside every range, or the gateway: refused before disk.
    for bad in ["IP=10.8.0.5", "IP=10.9.0.1", "IP=10.9.0.70,10.9.0.71"] {
        assert_eq!(
            add(&plain, &env("ADD", "c5", "eth0", bad))
                .unwrap_err()
                .code,
            101,
            "{bad}"
        );
    }
    assert_eq!(
        add(&plain, &env("ADD", "c5", "eth0", "IP=junk"))
            .unwrap_err()
            .code,
        7
    );
}

#[test]
fn a_failed_add_gives_back_what_it_took() {
    let d = TempDir::new("rollback");
    // The v6 set is a single address that c0 takes first.
    let c = conf(
        &d.0,
        json!({"ranges": [[{"subnet": "10.9.0.0/24"}],
                          [{"subnet": "fd00::/120", "rangeStart": "fd00::5", "rangeEnd": "fd00::5"}]]}),
        json!({}),
    );
    add(&c, &env("ADD", "c0", "eth0", "")).unwrap();
    let e = add(&c, &env("ADD", "c1", "eth0", "")).unwrap_err();
    assert_eq!(e.code, 101);
    assert!(e.msg.contains("range set 1"), "{e}");
    assert_eq!(
        lease_files(&d.0),
        HashSet::from(["10.9.0.2".into(), "fd00::5".into()])
    );
}

#[test]
fn exhaustion_is_101_and_status_50() {
    let d = TempDir::new("full");
    let c = conf(&d.0, json!({"subnet": "10.9.0.0/29"}), json!({}));
    assert_eq!(status(&c), Ok(()));
    for i in 0..5 {
        add(&c, &env("ADD", &format!("c{i}"), "eth0", "")).unwrap();
    }
    let e = add(&c, &env("ADD", "c9", "eth0", "")).unwrap_err();
    assert_eq!(e.code, 101);
    assert!(e.msg.contains("no free address"), "{e}");
    let e = status(&c).unwrap_err();
    assert_eq!(e.code, 50);
    assert!(e.msg.contains("exhausted"), "{e}");
    del(&c, &env("DEL", "c3", "eth0", "")).unwrap();
    assert_eq!(status(&c), Ok(()));
    // And the freed address is found again, after a wrap.
    assert_eq!(
        addrs(&add(&c, &env("ADD", "c9", "eth0", "")).unwrap()),
        ["10.9.0.5/29"]
    );
}

#[test]
fn status_reports_an_unusable_store() {
    let d = TempDir::new("status");
    fs::write(d.0.join("file"), "").unwrap();
    let c = conf(
        &d.0.join("file"),
        json!({"subnet": "10.9.0.0/24"}),
        json!({}),
    );
    let e = status(&c).unwrap_err();
    assert_eq!(e.code, 50);
    assert_eq!(
        status(&conf(&d.0, json!({"subnet": "x"}), json!({})))
            .unwrap_err()
            .code,
        7
    );
}

#[test]
fn del_is_idempotent_and_leaves_others_alone() {
    let d = TempDir::new("del");
    let c = v4(&d.0);
    // No directory at all yet.
    del(&c, &env("DEL", "c1", "eth0", "")).unwrap();
    add(&c, &env("ADD", "c1", "eth0", "")).unwrap();
    add(&c, &env("ADD", "c1", "net1", "")).unwrap();
    add(&c, &env("ADD", "c2", "eth0", "")).unwrap();
    del(&c, &env("DEL", "c1", "eth0", "")).unwrap();
    del(&c, &env("DEL", "c1", "eth0", "")).unwrap();
    assert_eq!(
        lease_files(&d.0),
        HashSet::from(["10.9.0.3".into(), "10.9.0.4".into()])
    );
    // DEL works even when the ranges in the config went bad.
    let broken = conf(&d.0, json!({"subnet": "nonsense"}), json!({}));
    del(&broken, &env("DEL", "c2", "eth0", "")).unwrap();
    assert_eq!(lease_files(&d.0), HashSet::from(["10.9.0.3".into()]));
}

#[test]
fn old_id_only_leases_are_understood() {
    let d = TempDir::new("old");
    let c = v4(&d.0);
    let net = d.0.join("net1");
    fs::create_dir_all(&net).unwrap();
    fs::write(net.join("10.9.0.7"), "old-c\n").unwrap();
    fs::write(net.join("10.9.0.8"), "other\r\neth0").unwrap();
    // Counted as in use ...
    let out = add(&c, &env("ADD", "new", "eth0", "IP=10.9.0.7")).unwrap_err();
    assert_eq!(out.code, 101);
    // ... found by ADD (idempotent), CHECK and DEL of its container.
    let again = add(&c, &env("ADD", "old-c", "eth0", "")).unwrap();
    assert_eq!(addrs(&again), ["10.9.0.7/24"]);
    check(&c, &env("CHECK", "old-c", "eth0", "")).unwrap();
    del(&c, &env("DEL", "old-c", "eth0", "")).unwrap();
    assert_eq!(lease_files(&d.0), HashSet::from(["10.9.0.8".into()]));
}

#[test]
fn check_compares_the_lease_with_prev_result() {
    let d = TempDir::new("check");
    let c = v4(&d.0);
    let e = check(&c, &env("CHECK", "c1", "eth0", "")).unwrap_err();
    assert_eq!(e.code, 3);
    let out = add(&c, &env("ADD", "c1", "eth0", "")).unwrap();
    check(&c, &env("CHECK", "c1", "eth0", "")).unwrap();
    let with_prev = |prev: Value| {
        conf(
            &d.0,
            json!({"subnet": "10.9.0.0/24"}),
            json!({"prevResult": prev}),
        )
    };
    // prevResult may carry addresses of other plugins (outside our ranges).
    let mut prev = out.to_value(crate::cni::Version::V1_1_0);
    prev["ips"]
        .as_array_mut()
        .unwrap()
        .push(json!({"address": "192.168.5.5/24"}));
    check(&with_prev(prev), &env("CHECK", "c1", "eth0", "")).unwrap();
    let wrong = json!({"cniVersion": "1.1.0", "ips": [{"address": "10.9.0.99/24"}]});
    assert_eq!(
        check(&with_prev(wrong), &env("CHECK", "c1", "eth0", ""))
            .unwrap_err()
            .code,
        103
    );
    let none = json!({"cniVersion": "1.1.0", "ips": [{"address": "192.168.5.5/24"}]});
    assert_eq!(
        check(&with_prev(none), &env("CHECK", "c1", "eth0", ""))
            .unwrap_err()
            .code,
        103
    );
    del(&c, &env("DEL", "c1", "eth0", "")).unwrap();
    assert_eq!(
        check(&c, &env("CHECK", "c1", "eth0", "")).unwrap_err().code,
        3
    );
}

#[test]
fn gc_keeps_valid_attachments_only() {
    let d = TempDir::new("gc");
    let c = v4(&d.0);
    for (id, ifname) in [("a", "eth0"), ("a", "net1"), ("b", "eth0"), ("c", "eth0")] {
        add(&c, &env("ADD", id, ifname, "")).unwrap();
    }
    let net = d.0.join("net1");
    fs::write(net.join("10.9.0.50"), "b").unwrap(); // old format, container b
    fs::write(net.join("10.9.0.51"), "gone").unwrap();
    // A temp file of a killed process (whose pid now names a live one) two
    // minutes old, and a fresh one of a live writer.
    let stale = net.join(store::writer_name(
        ".ferry-tmp.",
        std::process::id(),
        1_000_001,
    ));
    write_aged(&stale, Duration::from_secs(120));
    let fresh = net.join(store::writer_name(
        ".ferry-tmp.",
        std::process::id(),
        1_000_002,
    ));
    write_aged(&fresh, Duration::ZERO);

    // Without the list nothing is released.
    gc(&c).unwrap();
    assert_eq!(lease_files(&d.0).len(), 6);

    let valid = json!({"cni.dev/valid-attachments": [
        {"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "eth0"}]});
    gc(&conf(&d.0, json!({"subnet": "10.9.0.0/24"}), valid)).unwrap();
    let left: HashSet<String> = lease_files(&d.0);
    assert_eq!(
        left,
        HashSet::from(["10.9.0.2".into(), "10.9.0.4".into(), "10.9.0.50".into()])
    );
    assert!(!stale.exists() && fresh.exists());

    // An empty list releases everything; a missing directory is fine.
    let none = json!({"cni.dev/valid-attachments": []});
    gc(&conf(&d.0, json!({"subnet": "10.9.0.0/24"}), none.clone())).unwrap();
    assert!(lease_files(&d.0).is_empty());
    gc(&conf(
        &d.0.join("nope"),
        json!({"subnet": "10.9.0.0/24"}),
        none,
    ))
    .unwrap();
}

#[test]
fn fifty_concurrent_adds_get_fifty_distinct_addresses() {
    let d = TempDir::new("race");
    let c = v4(&d.0);
    let got: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let c = &c;
                s.spawn(move || add(c, &env("ADD", &format!("pod{i}"), "eth0", "")).unwrap())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| addrs(&h.join().unwrap()))
            .collect()
    });
    let distinct: HashSet<&String> = got.iter().collect();
    assert_eq!(distinct.len(), 50);
    assert_eq!(lease_files(&d.0).len(), 50);
    // Every lease names its own pod.
    let store = Store::existing(&d.0, "net1").unwrap();
    let leases = store.read_all(&store.list().unwrap()).unwrap();
    let owners: HashSet<String> = leases.iter().map(|l| l.owner.id.clone()).collect();
    assert_eq!(owners.len(), 50);
    // Concurrent DELs then leave nothing behind, temps included.
    std::thread::scope(|s| {
        for i in 0..50 {
            let c = &c;
            s.spawn(move || del(c, &env("DEL", &format!("pod{i}"), "eth0", "")).unwrap());
        }
    });
    let names: Vec<String> = fs::read_dir(d.0.join("net1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n == "lock" || n == "last_reserved_ip.0"),
        "{names:?}"
    );
}

#[test]
fn run_dispatches_and_gates_verbs_by_version() {
    let d = TempDir::new("run");
    let stdin = v4(&d.0).raw.to_string();
    let out = run(&env("ADD", "c1", "eth0", ""), stdin.as_bytes())
        .unwrap()
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(v["ips"][0]["address"], "10.9.0.2/24");
    assert_eq!(
        run(&env("DEL", "c1", "eth0", ""), stdin.as_bytes()),
        Ok(None)
    );
    let mut old = v4(&d.0).raw;
    old["cniVersion"] = "0.4.0".into();
    let e = run(&env("GC", "", "", ""), old.to_string().as_bytes()).unwrap_err();
    assert_eq!(e.code, 1);
    old["cniVersion"] = "0.3.1".into();
    let e = run(&env("CHECK", "c1", "eth0", ""), old.to_string().as_bytes()).unwrap_err();
    assert_eq!(e.code, 1);
    let out = run(&env("ADD", "c2", "eth0", ""), old.to_string().as_bytes())
        .unwrap()
        .unwrap();
    assert!(out.contains(r#""version":"4""#), "{out}");
}

#[test]
fn the_index_is_only_a_hint() {
    let d = TempDir::new("index");
    let c = v4(&d.0);
    let net = d.0.join("net1");
    add(&c, &env("ADD", "a", "eth0", "")).unwrap(); // 10.9.0.2
                                                    // A crash between the lease link and the index link: unindexed lease.
    add(&c, &env("ADD", "b", "eth0", "")).unwrap(); // 10.9.0.3
    fs::remove_file(net.join(".ferry-owner:b:eth0:10.9.0.3")).unwrap();
    // A stale entry: c's lease was released by someone who ignores the index,
    // and the address went to x.
    fs::write(net.join("10.9.0.4"), "x\r\neth0").unwrap();
    fs::hard_link(
        net.join("10.9.0.4"),
        net.join(".ferry-owner:c:eth0:10.9.0.4"),
    )
    .unwrap();

    // b is still found by content; c is not fooled by its stale entry.
    assert_eq!(
        addrs(&add(&c, &env("ADD", "b", "eth0", "")).unwrap()),
        ["10.9.0.3/24"]
    );
    check(&c, &env("CHECK", "b", "eth0", "")).unwrap();
    assert_eq!(
        check(&c, &env("CHECK", "c", "eth0", "")).unwrap_err().code,
        3
    );
    assert_eq!(
        addrs(&add(&c, &env("ADD", "c", "eth0", "")).unwrap()),
        ["10.9.0.5/24"]
    );
    assert!(!net.join(".ferry-owner:c:eth0:10.9.0.4").exists());
    assert_eq!(
        fs::read_to_string(net.join("10.9.0.4")).unwrap(),
        "x\r\neth0"
    );

    // DEL with a stale entry removes the entry, never x's lease.
    fs::hard_link(
        net.join("10.9.0.4"),
        net.join(".ferry-owner:y:eth0:10.9.0.4"),
    )
    .unwrap();
    del(&c, &env("DEL", "y", "eth0", "")).unwrap();
    assert!(!net.join(".ferry-owner:y:eth0:10.9.0.4").exists());
    assert!(net.join("10.9.0.4").exists());

    // GC removes stale entries and keeps the rest consistent.
    fs::hard_link(
        net.join("10.9.0.4"),
        net.join(".ferry-owner:z:eth0:10.9.0.4"),
    )
    .unwrap();
    let valid = json!({"cni.dev/valid-attachments": [
        {"containerID": "a", "ifname": "eth0"}, {"containerID": "x", "ifname": "eth0"}]});
    gc(&conf(&d.0, json!({"subnet": "10.9.0.0/24"}), valid)).unwrap();
    let mut names: Vec<String> = fs::read_dir(&net)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ".ferry-owner:a:eth0:10.9.0.2",
            "10.9.0.2",
            "10.9.0.4",
            "last_reserved_ip.0",
            "lock"
        ]
    );
}

#[test]
fn gc_and_add_sweep_temps_of_dead_writers() {
    let d = TempDir::new("sweep");
    let c = v4(&d.0);
    add(&c, &env("ADD", "a", "eth0", "")).unwrap();
    let net = d.0.join("net1");

    let temps = plant_temps(&net, ".ferry-tmp.", 1_000_000);
    let valid = json!({"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]});
    gc(&conf(&d.0, json!({"subnet": "10.9.0.0/24"}), valid)).unwrap();
    assert_swept(&temps, "GC");
    assert_eq!(lease_files(&d.0), HashSet::from(["10.9.0.2".into()]));

    // A GC without the list releases no lease, but temps are nobody's.
    let temps = plant_temps(&net, ".ferry-tmp.", 1_000_010);
    gc(&c).unwrap();
    assert_swept(&temps, "GC without a list");

    let temps = plant_temps(&net, ".ferry-tmp.", 1_000_020);
    add(&c, &env("ADD", "b", "eth0", "")).unwrap();
    assert_swept(&temps, "ADD");
    // A repeated ADD (nothing to write) lists the directory too.
    let temps = plant_temps(&net, ".ferry-tmp.", 1_000_030);
    add(&c, &env("ADD", "b", "eth0", "")).unwrap();
    assert_swept(&temps, "repeated ADD");
}

/// After GC, every file in the lease directory is accounted for: the lock,
/// a round-robin hint, a lease of a valid attachment, that lease's index
/// entry, or a temp of a live writer; nothing of the attachments GC removed.
#[test]
fn after_gc_every_file_belongs_to_a_live_attachment() {
    let d = TempDir::new("accounted");
    let c = conf(
        &d.0,
        json!({"ranges": [[{"subnet": "10.9.0.0/24"}], [{"subnet": "fd00:9::/64"}]]}),
        json!({}),
    );
    for (id, ifname) in [("a", "eth0"), ("a", "net1"), ("b", "eth0"), ("c", "eth0")] {
        add(&c, &env("ADD", id, ifname, "")).unwrap();
    }
    let net = d.0.join("net1");
    // What crashes and older plugins leave: an empty lease (content lost in
    // a machine crash), old-format leases, an unindexed lease of a removed
    // attachment, a stale index entry, temps of dead and live writers.
    fs::write(net.join("10.9.0.40"), "").unwrap();
    fs::write(net.join("10.9.0.41"), "b\n").unwrap();
    fs::write(net.join("10.9.0.42"), "gone\n").unwrap();
    fs::write(net.join("10.9.0.43"), "c\r\neth0").unwrap();
    fs::hard_link(
        net.join("10.9.0.2"),
        net.join(".ferry-owner:x:eth0:10.9.0.2"),
    )
    .unwrap();
    let temps = plant_temps(&net, ".ferry-tmp.", 1_000_000);

    let valid = json!({"cni.dev/valid-attachments": [
        {"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "eth0"}]});
    let valid_conf = conf(
        &d.0,
        json!({"ranges": [[{"subnet": "10.9.0.0/24"}], [{"subnet": "fd00:9::/64"}]]}),
        valid,
    );
    gc(&valid_conf).unwrap();

    let live = [Owner::new("a", "eth0"), Owner::new("b", "eth0")];
    let store = Store::existing(&d.0, "net1").unwrap();
    let mut leases = HashSet::new();
    for entry in fs::read_dir(&net).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let path = net.join(&name);
        if name == "lock" || name.starts_with("last_reserved_ip.") {
            continue;
        }
        if let Ok(addr) = name.parse::<IpAddr>() {
            let owner = store.read_lease(addr).unwrap().unwrap();
            assert!(live.iter().any(|o| o.claims(&owner)), "{name}: {owner:?}");
            leases.insert(name);
        } else if let Some(rest) = name.strip_prefix(".ferry-owner:") {
            let mut parts = rest.splitn(3, ':');
            let (id, ifname, lease) = (parts.next(), parts.next(), parts.next().unwrap());
            let owner = Owner::new(id.unwrap(), ifname.unwrap());
            assert!(live.contains(&owner), "{name}");
            // Another name of the lease it names, by an owner it names.
            let ino = |p: &Path| fs::metadata(p).unwrap().ino();
            assert_eq!(ino(&path), ino(&net.join(lease)), "{name}");
            assert_eq!(
                store.read_lease(lease.parse().unwrap()).unwrap(),
                Some(owner)
            );
        } else if name.starts_with(".ferry-tmp.") {
            assert_eq!(path, temps[2], "only a live writer's fresh temp stays");
        } else {
            panic!("{name}: unaccounted for after GC");
        }
    }
    assert_eq!(
        leases,
        HashSet::from([
            "10.9.0.2".into(),
            "fd00:9::2".into(),
            "10.9.0.4".into(),
            "fd00:9::4".into(),
            "10.9.0.41".into(),
        ])
    );
}
