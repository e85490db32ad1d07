//! The etcd v3 store.
//!
//! ```text
//! <prefix>/subnets/10.244.1.0-24 = {"node": ..., "subnet": ..., ...}   (attached to the node's lease)
//! ```
//! A subnet is reserved with a transaction that creates its key only if it
//! does not exist (`create_revision == 0`); a node that restarts takes its
//! own key over with a transaction on its `mod_revision`. Keys vanish when
//! their lease expires, which frees the subnet. A watch on the prefix wakes
//! the daemon.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp, WatchOptions,
};
use ipnetwork::Ipv4Network;
use tokio::sync::{Mutex, Notify};

use super::{ClusterState, Membership, Registration, StoreError, StoreResult};
use crate::record::{self, Allocation, NodeRecord, Reservation};

const OP_TIMEOUT: Duration = Duration::from_secs(5);

pub struct EtcdStore {
    client: Client,
    endpoints: String,
    prefix: String,
    notify: Arc<Notify>,
    own: Mutex<Option<Own>>,
}

struct Own {
    subnet: Ipv4Network,
    lease: i64,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

/// One record as read from etcd.
struct Kv {
    subnet: Ipv4Network,
    record: NodeRecord,
    lease: i64,
    mod_revision: i64,
}

impl EtcdStore {
    /// Connects and checks that etcd answers; starts the watch.
    pub async fn open(endpoints: &[String], prefix: &str) -> StoreResult<EtcdStore> {
        let joined = endpoints.join(",");
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(OP_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = timed(&joined, "connect", Client::connect(endpoints, Some(opts))).await?;
        let store = EtcdStore {
            client,
            endpoints: joined,
            prefix: format!("{}/subnets/", prefix.trim_end_matches('/')),
            notify: Arc::new(Notify::new()),
            own: Mutex::new(None),
        };
        // Connecting is lazy: make one real request so that an unreachable
        // etcd is an error now, not later.
        store.list().await?;
        store.start_watch();
        Ok(store)
    }

    fn key(&self, subnet: Ipv4Network) -> String {
        format!("{}{}", self.prefix, record::subnet_key(subnet))
    }

    async fn list(&self) -> StoreResult<Vec<Kv>> {
        let mut c = self.client.clone();
        let resp = timed(
            &self.endpoints,
            "list subnets",
            c.get(self.prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let Some(subnet) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(&self.prefix))
                .and_then(record::parse_subnet_key)
            else {
                continue;
            };
            match serde_json::from_slice::<NodeRecord>(kv.value()) {
                Ok(r) if r.subnet == subnet => out.push(Kv {
                    subnet,
                    record: r,
                    lease: kv.lease(),
                    mod_revision: kv.mod_revision(),
                }),
                _ => {
                    tracing::warn!(key = ?String::from_utf8_lossy(kv.key()), "ignoring unreadable record")
                }
            }
        }
        Ok(out)
    }

    fn start_watch(&self) {
        let mut client = self.client.clone();
        let prefix = self.prefix.clone();
        let notify = self.notify.clone();
        tokio::spawn(async move {
            loop {
                match client
                    .watch(prefix.clone(), Some(WatchOptions::new().with_prefix()))
                    .await
                {
                    Ok((_watcher, mut stream)) => {
                        // A (re)started watch may have missed events.
                        notify.notify_one();
                        while let Ok(Some(_)) = stream.message().await {
                            notify.notify_one();
                        }
                    }
                    Err(e) => tracing::debug!("etcd watch: {e}"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn grant(&self, ttl: Duration) -> StoreResult<i64> {
        let mut c = self.client.clone();
        let ttl = ttl.as_secs().max(5) as i64;
        let r = timed(&self.endpoints, "grant lease", c.lease_grant(ttl, None)).await?;
        Ok(r.id())
    }

    async fn put_if(
        &self,
        cmp: Compare,
        key: String,
        rec: &NodeRecord,
        lease: i64,
    ) -> StoreResult<bool> {
        let mut c = self.client.clone();
        let val = serde_json::to_vec(rec).expect("serialisable");
        let txn = Txn::new().when([cmp]).and_then([TxnOp::put(
            key,
            val,
            Some(PutOptions::new().with_lease(lease)),
        )]);
        let r = timed(&self.endpoints, "reserve subnet", c.txn(txn)).await?;
        Ok(r.succeeded())
    }

    /// [`Store::leave`], awaiting `before_write()` between reading the
    /// records and writing them, where another writer may land: tests use it
    /// to force that interleaving.
    async fn leave_with<F: Future<Output = ()>>(
        &self,
        node: &str,
        mut before_write: impl FnMut() -> F,
    ) -> StoreResult<()> {
        // Only a read reports success: each round reads the node's records
        // and compare-and-swaps those not yet left. A swap fails when the
        // record changed since the read (the node registered again: a
        // restart, a new underlay address); the next round reads again.
        let mut rounds = 0;
        loop {
            let mine: Vec<Kv> = self
                .list()
                .await?
                .into_iter()
                .filter(|kv| kv.record.node == node)
                .collect();
            if rounds == 0 && mine.is_empty() {
                return Err(StoreError::NotRegistered(node.to_string()));
            }
            let pending: Vec<Kv> = mine.into_iter().filter(|kv| !kv.record.left).collect();
            if pending.is_empty() {
                break;
            }
            if rounds == ATTEMPTS {
                return Err(StoreError::LeaveContention {
                    node: node.to_string(),
                    attempts: ATTEMPTS,
                });
            }
            rounds += 1;
            before_write().await;
            for kv in pending {
                let mut rec = kv.record;
                rec.left = true;
                let key = self.key(kv.subnet);
                let cmp = Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision);
                // Keep the lease: the subnet stays reserved until it expires.
                self.put_if(cmp, key, &rec, kv.lease).await?;
            }
        }
        let mut own = self.own.lock().await;
        if let Some(o) = own.as_mut() {
            o.keeper = None;
        }
        Ok(())
    }
}

async fn timed<T>(
    endpoints: &str,
    what: &str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> StoreResult<T> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(source)) => Err(StoreError::Etcd {
            endpoints: endpoints.to_string(),
            what: what.to_string(),
            source,
        }),
        Err(_) => Err(StoreError::EtcdTimeout {
            endpoints: endpoints.to_string(),
            what: what.to_string(),
            secs: OP_TIMEOUT.as_secs(),
        }),
    }
}

const ATTEMPTS: u32 = 32;

impl Membership for EtcdStore {
    async fn register(&self, reg: &Registration) -> StoreResult<NodeRecord> {
        let lease = self.grant(reg.ttl).await?;
        let mut skip = Vec::new();
        for _ in 0..ATTEMPTS {
            let kvs = self.list().await?;
            let reservations: Vec<Reservation> = kvs
                .iter()
                .map(|kv| Reservation {
                    subnet: kv.subnet,
                    node: kv.record.node.clone(),
                    expired: false, // etcd deletes expired keys itself
                })
                .collect();
            let (subnet, cmp, old_lease) = match record::allocate(
                reg.cluster,
                reg.subnet_len,
                &reg.node,
                &reservations,
                &skip,
                reg.prefer,
            )? {
                Allocation::Keep(s) => {
                    let kv = kvs.iter().find(|kv| kv.subnet == s).expect("listed");
                    let cmp = Compare::mod_revision(self.key(s), CompareOp::Equal, kv.mod_revision);
                    (s, cmp, Some(kv.lease))
                }
                Allocation::Take(s) => (
                    s,
                    Compare::create_revision(self.key(s), CompareOp::Equal, 0),
                    None,
                ),
            };
            let rec = reg.record(subnet);
            if self.put_if(cmp, self.key(subnet), &rec, lease).await? {
                if let Some(old) = old_lease.filter(|l| *l != 0 && *l != lease) {
                    // The key moved to the new lease; the old one holds nothing.
                    let mut c = self.client.clone();
                    let _ = timed(&self.endpoints, "revoke old lease", c.lease_revoke(old)).await;
                }
                let mut c = self.client.clone();
                let keeper = timed(
                    &self.endpoints,
                    "keep lease alive",
                    c.lease_keep_alive(lease),
                )
                .await?;
                *self.own.lock().await = Some(Own {
                    subnet,
                    lease,
                    keeper: Some(keeper),
                });
                return Ok(rec);
            }
            // Lost a race for this subnet: try the next one.
            if old_lease.is_none() {
                skip.push(subnet);
            }
        }
        let mut c = self.client.clone();
        let _ = c.lease_revoke(lease).await;
        Err(StoreError::Contention(ATTEMPTS))
    }

    async fn renew(&self) -> StoreResult<()> {
        let mut own = self.own.lock().await;
        let Some(o) = own.as_mut() else {
            return Ok(());
        };
        // The keep-alive stream dies with the connection (an etcd restart):
        // open a new one on the same lease when needed.
        if o.keeper.is_none() {
            let mut c = self.client.clone();
            o.keeper = Some(
                timed(
                    &self.endpoints,
                    "keep lease alive",
                    c.lease_keep_alive(o.lease),
                )
                .await?,
            );
        }
        let (keeper, stream) = o.keeper.as_mut().expect("set above");
        let answer = async {
            timed(&self.endpoints, "keep lease alive", keeper.keep_alive()).await?;
            timed(&self.endpoints, "keep lease alive", stream.message()).await
        }
        .await;
        let alive = match answer {
            Ok(Some(r)) => r.ttl() > 0,
            Ok(None) => {
                o.keeper = None;
                false
            }
            Err(e) => {
                o.keeper = None;
                return Err(e);
            }
        };
        let lease = o.lease;
        let subnet = o.subnet;
        drop(own);
        // Still ours and attached to our lease? One key, not the prefix:
        // this runs every few seconds on every node.
        let mut c = self.client.clone();
        let resp = timed(
            &self.endpoints,
            "read own record",
            c.get(self.key(subnet), None),
        )
        .await?;
        let kv = resp.kvs().first();
        let rec = kv.and_then(|kv| serde_json::from_slice::<NodeRecord>(kv.value()).ok());
        match (kv, rec) {
            (Some(kv), Some(r)) if alive && kv.lease() == lease && !r.left => Ok(()),
            (Some(_), Some(r)) if r.left => Err(StoreError::Left(r.node)),
            _ => Err(StoreError::NotRegistered(String::new())),
        }
    }

    async fn leave(&self, node: &str) -> StoreResult<()> {
        self.leave_with(node, || async {}).await
    }
}

impl ClusterState for EtcdStore {
    async fn nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|kv| !kv.record.left)
            .map(|kv| kv.record)
            .collect())
    }

    async fn changed(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{reg, skip, TempDir};
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};

    /// An etcd of the test's own: free ports on the loopback, a temp data
    /// dir; killed on drop.
    struct TestEtcd {
        child: Child,
        url: String,
        dir: TempDir,
    }

    impl TestEtcd {
        /// None, after [`skip`]ping, when etcd is not installed.
        fn start() -> Option<TestEtcd> {
            // Both listeners stay open until both ports are known, so they
            // differ; then they close for etcd to take the ports.
            let listeners = [free_port(), free_port()];
            let [client, peer] = listeners.map(|l| l.local_addr().unwrap());
            let url = format!("http://{client}");
            let peer_url = format!("http://{peer}");
            let dir = TempDir::new("etcd");
            let log = std::fs::File::create(dir.0.join("etcd.log")).unwrap();
            let spawned = Command::new("etcd")
                .args(["--name", "default", "--data-dir"])
                .arg(dir.0.join("data"))
                .args([
                    "--listen-client-urls",
                    &url,
                    "--advertise-client-urls",
                    &url,
                ])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("default={peer_url}")])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn();
            let child = match spawned {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    skip("needs etcd");
                    return None;
                }
                Err(e) => panic!("cannot start etcd: {e}"),
            };
            let mut etcd = TestEtcd { child, url, dir };
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while TcpStream::connect(client).is_err() {
                let exited = etcd.child.try_wait().unwrap();
                if exited.is_some() || std::time::Instant::now() > deadline {
                    panic!("etcd did not come up ({exited:?}):\n{}", etcd.log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(etcd)
        }

        async fn open(&self) -> EtcdStore {
            match EtcdStore::open(std::slice::from_ref(&self.url), "/ferry-test").await {
                Ok(s) => s,
                Err(e) => panic!("{e}\n{}", self.log()),
            }
        }

        fn log(&self) -> String {
            std::fs::read_to_string(self.dir.0.join("etcd.log")).unwrap_or_default()
        }
    }

    impl Drop for TestEtcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").unwrap()
    }

    /// Registers node "a" through `node`; returns its record as etcd holds it.
    async fn registered(node: &EtcdStore) -> Kv {
        node.register(&reg("a", Duration::from_secs(60)))
            .await
            .unwrap();
        let mut kvs = node.list().await.unwrap();
        assert_eq!(kvs.len(), 1);
        kvs.pop().unwrap()
    }

    /// Rewrites `rec` unchanged through `client`: a new mod_revision, as when
    /// the node registers again, so a compare-and-swap on the old one fails.
    async fn touch(mut client: Client, key: String, rec: &NodeRecord, lease: i64) {
        let val = serde_json::to_vec(rec).unwrap();
        client
            .put(key, val, Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap();
    }

    /// The record changes once between leave's read and its write: leave
    /// must read again and really mark the node as left.
    #[tokio::test]
    async fn leave_retries_when_the_record_changed() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let node = etcd.open().await;
        let cli = etcd.open().await;
        let kv = registered(&node).await;
        let mut touched = false;
        let res = cli
            .leave_with("a", || {
                let first = !std::mem::replace(&mut touched, true);
                let (client, key) = (node.client.clone(), node.key(kv.subnet));
                let (rec, lease) = (&kv.record, kv.lease);
                async move {
                    if first {
                        touch(client, key, rec, lease).await;
                    }
                }
            })
            .await;
        let now = cli.list().await.unwrap();
        assert!(
            now[0].record.left,
            "leave returned {res:?}, but the record is {:?}",
            now[0].record
        );
        res.unwrap();
        assert!(cli.nodes().await.unwrap().is_empty());
    }

    /// The record changes before every write: leave must give up with an
    /// error, never report the node as left.
    #[tokio::test]
    async fn leave_fails_when_the_record_keeps_changing() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let node = etcd.open().await;
        let cli = etcd.open().await;
        let kv = registered(&node).await;
        let res = cli
            .leave_with("a", || {
                touch(
                    node.client.clone(),
                    node.key(kv.subnet),
                    &kv.record,
                    kv.lease,
                )
            })
            .await;
        let now = cli.list().await.unwrap();
        assert!(!now[0].record.left);
        assert!(
            matches!(res, Err(StoreError::LeaveContention { .. })),
            "leave returned {res:?}, but the record is {:?}",
            now[0].record
        );
    }
}
