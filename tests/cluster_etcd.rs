//! ferryd on etcd (a real `etcd` started inside the test's underlay
//! namespace): the same suite as on the file store.

use std::time::Duration;

use ferry_e2e::cluster::{suite, Cluster, Opts, StoreKind};
use ferry_e2e::{require_root, wait_until};

const K: StoreKind = StoreKind::Etcd;

#[test]
fn etcd_mesh_transfer_masquerade() {
    if require_root() {
        suite::mesh_transfer_masquerade(K);
    }
}

#[test]
fn etcd_node_leave_prunes() {
    if require_root() {
        suite::node_leave_prunes(K);
    }
}

#[test]
fn etcd_restart_adopts_datapath() {
    if require_root() {
        suite::restart_adopts_datapath(K);
    }
}

#[test]
fn etcd_released_subnet_reused_after_expiry() {
    if require_root() {
        suite::released_subnet_reused_after_expiry(K);
    }
}

#[test]
fn etcd_simultaneous_start() {
    if require_root() {
        suite::simultaneous_start(K);
    }
}

/// etcd goes away: nodes stay ready and pods keep talking on the last known
/// overlay; when etcd is back, a new node joins and everyone learns of it.
#[test]
fn etcd_outage_keeps_datapath_and_readiness() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(K, 2, Opts::default());
    c.start_all();
    c.wait_all_ready();
    c.add_pod(0);
    c.add_pod(1);
    c.pods[0].ns.assert_ping(&c.pods[1].ip);
    c.etcd.as_mut().unwrap().kill();
    // Several reconcile periods and lease renewals without a store.
    std::thread::sleep(c.opts.reconcile_interval * 3);
    for n in &c.nodes {
        assert!(
            n.is_ready(),
            "{} lost readiness while etcd was down:\n{}",
            n.name,
            n.logs()
        );
        assert_eq!(n.routes().lines().count(), 1, "{}: {}", n.name, n.routes());
    }
    c.pods[0].ns.assert_ping(&c.pods[1].ip);
    let underlay = &c.underlay;
    c.etcd.as_mut().unwrap().spawn(underlay);
    let n3 = c.add_node();
    c.start_ferryd(n3);
    c.wait_ready(n3, Duration::from_secs(30));
    let new = c.nodes[n3].subnet().unwrap();
    for n in &c.nodes[..2] {
        let ok = wait_until(Duration::from_secs(15), || n.routes().contains(&new));
        assert!(
            ok,
            "{} did not learn of the new node after etcd returned:\n{}",
            n.name,
            c.logs()
        );
    }
    let p3 = c.add_pod(n3);
    c.pods[0].ns.assert_ping(&c.pods[p3].ip);
    // Lease renewals work again (a new keep-alive stream): the store error
    // count stops growing.
    let errors = |i: usize| {
        let n = &c.nodes[i];
        n.metric("ferryd_store_errors_total")
            .unwrap_or_else(|| panic!("{}: no ferryd_store_errors_total in /metrics", n.name))
    };
    std::thread::sleep(Duration::from_secs(6));
    let before = errors(0);
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        errors(0),
        before,
        "lease renewal still failing:\n{}",
        c.nodes[0].logs()
    );
}
