//! Cluster state: what a node publishes ([`Membership`]) and what the
//! cluster holds ([`ClusterState`]), a store per backend.
//!
//! Each store holds one record per allocated subnet ([`NodeRecord`]) under
//! a lease. `register` finds or allocates this node's subnet and publishes
//! the record; `nodes` lists the live records; `changed` resolves when the
//! set may have changed (spurious wake-ups are fine: the daemon reconciles
//! against the kernel anyway).

pub mod etcd;
pub mod file;

use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use crate::record::{AllocError, Mac, NodeRecord};

/// What a node asks for when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub node: String,
    pub underlay_ip: Ipv4Addr,
    pub vtep_mac: Mac,
    pub cluster: Ipv4Network,
    pub subnet_len: u8,
    pub ttl: Duration,
    /// The subnet this node's pods already use (from the conflist it wrote
    /// earlier), tried first when the store has no record of the node.
    pub prefer: Option<Ipv4Network>,
}

impl Registration {
    pub fn record(&self, subnet: Ipv4Network) -> NodeRecord {
        NodeRecord {
            node: self.node.clone(),
            subnet,
            underlay_ip: self.underlay_ip,
            vtep_mac: self.vtep_mac,
            left: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error("file store {dir}: {what}: {source}")]
    File {
        dir: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd {endpoints}: {what}: {source}")]
    Etcd {
        endpoints: String,
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {endpoints}: {what}: timed out after {secs}s")]
    EtcdTimeout {
        endpoints: String,
        what: String,
        secs: u64,
    },
    #[error("could not reserve a subnet after {0} attempts (too much contention)")]
    Contention(u32),
    #[error(
        "could not mark node {node:?} as left after {attempts} attempts: its record kept changing"
    )]
    LeaveContention { node: String, attempts: u32 },
    #[error("node {0:?} was marked as left in the store (ferryd leave)")]
    Left(String),
    #[error("node {0:?} is not registered in the store")]
    NotRegistered(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What a node publishes about itself: its registration under a lease.
/// The Kubernetes API has its own (the kubelet registers the Node), so a
/// Kubernetes source does not implement this.
pub trait Membership: Send + Sync + 'static {
    /// Finds or allocates this node's subnet and publishes its record.
    fn register(&self, reg: &Registration) -> impl Future<Output = StoreResult<NodeRecord>> + Send;
    /// Keeps this node's lease alive; called about every few seconds.
    fn renew(&self) -> impl Future<Output = StoreResult<()>> + Send;
    /// Marks `node` as left: it drops out of `nodes` at once; its subnet is
    /// free again only once its lease expired.
    fn leave(&self, node: &str) -> impl Future<Output = StoreResult<()>> + Send;
}

/// What the cluster holds, as a source of snapshots reads it.
pub trait ClusterState: Send + Sync + 'static {
    /// Live records of all nodes (this one included), without those that
    /// left or whose lease expired.
    fn nodes(&self) -> impl Future<Output = StoreResult<Vec<NodeRecord>>> + Send;
    /// Resolves when the records may have changed.
    fn changed(&self) -> impl Future<Output = ()> + Send;
}

/// A backend that is both: the file store and etcd.
pub trait Store: Membership + ClusterState {}

impl<T: Membership + ClusterState> Store for T {}

/// What the stores' unit tests share.
#[cfg(test)]
mod testing {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::Registration;
    use crate::record::Mac;

    /// A fresh directory, removed on drop.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "ferryd-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub fn reg(node: &str, ttl: Duration) -> Registration {
        Registration {
            node: node.into(),
            underlay_ip: "192.168.0.1".parse().unwrap(),
            vtep_mac: Mac::for_vtep(node, 1),
            cluster: "10.244.0.0/16".parse().unwrap(),
            subnet_len: 24,
            ttl,
            prefer: None,
        }
    }

    /// The running test cannot run here because of `why`: prints
    /// "skipped: <test>: <why>", or panics when FERRY_REQUIRE_ALL is set (as the
    /// end-to-end tests do), so that a skip never reads as a pass in CI.
    pub fn skip(why: &str) {
        let test = std::thread::current()
            .name()
            .unwrap_or("<unnamed test>")
            .to_string();
        if std::env::var_os("FERRY_REQUIRE_ALL").is_some_and(|v| !v.is_empty() && v != "0") {
            panic!("{test} cannot run here ({why}) and FERRY_REQUIRE_ALL forbids skipping");
        }
        println!("skipped: {test}: {why}");
    }
}
