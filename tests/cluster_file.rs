//! ferryd on the file store: the shared suite plus file-store-only checks
//! (drift repair, DirectRouting, clear errors).

use std::time::Duration;

use ferry_e2e::cluster::{suite, Cluster, Opts, StoreKind};
use ferry_e2e::{require_root, wait_until, Netns};

const K: StoreKind = StoreKind::File;

#[test]
fn file_mesh_transfer_masquerade() {
    if require_root() {
        suite::mesh_transfer_masquerade(K);
    }
}

#[test]
fn file_node_leave_prunes() {
    if require_root() {
        suite::node_leave_prunes(K);
    }
}

#[test]
fn file_restart_adopts_datapath() {
    if require_root() {
        suite::restart_adopts_datapath(K);
    }
}

#[test]
fn file_released_subnet_reused_after_expiry() {
    if require_root() {
        suite::released_subnet_reused_after_expiry(K);
    }
}

#[test]
fn file_simultaneous_start() {
    if require_root() {
        suite::simultaneous_start(K);
    }
}

/// A deleted device, route or FDB entry comes back within a reconcile period.
#[test]
fn file_drift_is_repaired() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(K, 2, Opts::default());
    c.start_all();
    c.wait_all_ready();
    c.add_pod(0);
    c.add_pod(1);
    c.pods[0].ns.assert_ping(&c.pods[1].ip);
    let before = c.nodes[0].routes();
    c.nodes[0].ns.ok(&["ip", "link", "del", "ferry.1"]);
    let sub0 = c.nodes[0].subnet().unwrap();
    c.nodes[1].ns.ok(&["ip", "route", "del", &sub0]);
    let period = c.opts.reconcile_interval + Duration::from_secs(1);
    assert!(
        wait_until(period, || c.nodes[0].routes() == before
            && c.nodes[1].routes().lines().count() == 1),
        "not repaired:\n{}\n{}",
        c.nodes[0].routes(),
        c.logs()
    );
    c.pods[0].ns.assert_ping(&c.pods[1].ip);
    // A drifted setting (learning on) makes ferryd recreate the device.
    c.nodes[1]
        .ns
        .ok(&["ip", "link", "set", "ferry.1", "type", "vxlan", "learning"]);
    assert!(wait_until(period, || {
        let l = c.nodes[1].ns.link("ferry.1");
        l.is_some_and(|l| l["linkinfo"]["info_data"]["learning"] == false)
    }));
    c.pods[1].ns.assert_ping(&c.pods[0].ip);
}

/// DirectRouting: peers on the same L2 get a plain route via the underlay.
#[test]
fn file_direct_routing() {
    if !require_root() {
        return;
    }
    let opts = Opts {
        direct_routing: true,
        ..Opts::default()
    };
    let mut c = Cluster::new(K, 3, opts);
    c.start_all();
    c.wait_all_ready();
    for i in 0..3 {
        c.add_pod(i);
    }
    for n in &c.nodes {
        let r = n.routes();
        assert_eq!(r.lines().count(), 2, "{r}");
        assert!(
            r.lines()
                .all(|l| l.contains("dev eth0") && l.contains("via 192.168.77.")),
            "{r}"
        );
        assert!(n.fdb("ferry.1").trim().is_empty());
    }
    assert!(c.ping_matrix().is_empty(), "{}", c.logs());
}

/// `ferry STATUS` answers 50 while ferryd is not ready (the conflist's
/// `ferrydReadyFile` is missing) and succeeds while it is.
#[test]
fn file_status_follows_readiness() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(K, 1, Opts::default());
    c.start_all();
    c.wait_all_ready();
    let out = c.status(0);
    assert!(out.success(), "{}", out.describe());
    c.stop_ferryd(0, libc::SIGTERM);
    c.status(0).expect_code(50);
    c.start_ferryd(0);
    c.wait_ready(0, Duration::from_secs(20));
    let out = c.status(0);
    assert!(out.success(), "{}", out.describe());
}

fn ferryd(ns: &Netns, args: &[&str]) -> (i32, String) {
    let bin = ferry_e2e::cluster::ferryd_bin();
    let mut a = vec![bin.to_str().unwrap()];
    a.extend_from_slice(args);
    let out = ns.exec(&a);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Bad flags, a missing underlay, an unreachable store: a clear message,
/// a non-zero exit, and nothing changed in the namespace or on disk.
#[test]
fn file_errors_are_clear_and_change_nothing() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    let dir = ferry_e2e::TempDir::new();
    let d = |p: &str| dir.path().join(p).display().to_string();
    let links = ns.link_names();
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "run",
            "--node-name",
            "n1",
            "--cni-conf-dir",
            &d("net.d"),
            "--cni-bin-dir",
            &d("bin"),
            "--cni-data-dir",
            &d("data"),
            "--ipam-data-dir",
            &d("ipam"),
            "--run-dir",
            &d("run"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str]| {
        let v = common(extra);
        let a: Vec<&str> = v.iter().map(String::as_str).collect();
        ferryd(&ns, &a)
    };
    let store = format!("file:{}", d("store"));

    let (code, err) = run(&["--store", "nope:x"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("expected file:DIR, etcd:URL[,URL...] or kubernetes"),
        "{err}"
    );
    let (code, err) = run(&["--cluster-cidr", "10.244.1.0/16"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("host bits"), "{err}");
    let (code, err) = run(&["--underlay-iface", "nope0", "--store", &store]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("underlay interface \"nope0\" does not exist"),
        "{err}"
    );
    let (code, err) = run(&["--store", &store]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("default route"), "{err}");
    ns.ok(&[
        "ip", "link", "add", "u0", "type", "veth", "peer", "name", "u1",
    ]);
    let links = {
        let mut l = links;
        l.extend(["u1".to_string(), "u0".to_string()]);
        l.sort();
        l
    };
    let (code, err) = run(&["--underlay-iface", "u0", "--store", &store]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("has no IPv4 address"), "{err}");
    ns.ok(&["ip", "addr", "add", "192.168.9.1/24", "dev", "u0"]);
    let t0 = std::time::Instant::now();
    let (code, err) = run(&[
        "--underlay-iface",
        "u0",
        "--store",
        "etcd:http://127.0.0.1:1",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("etcd http://127.0.0.1:1"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t0.elapsed()
    );
    // Nothing changed: no new links, no nft table, no files.
    let mut now = ns.link_names();
    now.sort();
    assert_eq!(now, links);
    assert!(ns.nft_ruleset().trim().is_empty());
    for p in ["net.d", "run", "store"] {
        assert!(!dir.path().join(p).exists(), "{p} created");
    }
}
