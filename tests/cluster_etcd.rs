//! ferryd on etcd (a real `etcd` started inside the test's underlay
//! namespace): the same suite as on the file store.

use ferry_e2e::cluster::{suite, StoreKind};
use ferry_e2e::require_root;

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
