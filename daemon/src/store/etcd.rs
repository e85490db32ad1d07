//! The etcd v3 store.
//!
//! ```text
//! <prefix>/subnets/10.244.1.0-24 = {"node": ..., "subnet": ..., ...}   (attached to the node's lease)
//! <prefix>/services/NS/NAME      = a v1 Service, the API's JSON
//! <prefix>/endpointslices/NS/NAME = a discovery.k8s.io/v1 EndpointSlice
//! <prefix>/ranges                = {"serviceCIDR": "10.96.0.0/12", "nodePortRange": "30000-32767"}
//! ```
//! A subnet is reserved with a transaction that creates its key only if it
//! does not exist (`create_revision == 0`); a node that restarts takes its
//! own key over with a transaction on its `mod_revision`. Keys vanish when
//! their lease expires, which frees the subnet.
//!
//! What `nodes()` and `state()` answer is held in memory: listed once at
//! start, then kept current by a watch on the whole prefix, one event (a put
//! or a delete, with its revision) at a time; a peer whose lease expires
//! arrives as the delete of its key. A broken watch resumes from the
//! revision after the last one seen; only when etcd has compacted that
//! revision away (`ErrCompacted`) is the prefix listed again.
//!
//! An apply reads Services, EndpointSlices and ranges at one revision R,
//! decides (allocation included), and writes in a transaction guarded by
//! "no key under `services/` or `endpointslices/`, nor `ranges`, has
//! changed since R" (a compare over the key range), retrying on conflict:
//! two applies can never both allocate from the same view. Objects are read
//! a page at a time (gRPC answers are limited to 4 MiB). A transaction
//! holds at most 100 writes and 1 MiB (etcd's defaults: 128 operations,
//! 1.5 MiB); a larger apply is written in several, each guarded by the
//! revision of the one before, and re-decided for what is left when another
//! writer comes between — allocations stay unique, but such an apply is
//! no longer all-or-nothing once its first transaction is in.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use ipnetwork::Ipv4Network;
use tokio::sync::{Mutex, Notify};

use super::etcd_conn::{self, Conn, EtcdAccess, OP_TIMEOUT};
use super::snapshot::{self, Cache, Slot, Value};
use super::{
    decode, decode_ranges, encode, encode_ranges, plan_apply, ranges_to_publish, Applied, Change,
    ClusterState, Membership, Registration, ServiceWrites, StoreError, StoreResult, WarnOnce,
};
use crate::record::{self, Allocation, NodeRecord, Reservation};
use crate::service::alloc::Ranges;
use crate::service::model::{Kind, Object, ObjectRef};
use crate::service::state::State;
use crate::service::Snapshot;

/// Keys per read: a page of Services stays far below gRPC's 4 MiB.
const PAGE: i64 = 500;
/// Writes per transaction, below etcd's default --max-txn-ops 128.
const TXN_OPS: usize = 100;
/// Bytes per transaction, below etcd's default --max-request-bytes 1.5 MiB.
const TXN_BYTES: usize = 1 << 20;

pub struct EtcdStore {
    conn: Conn,
    /// `<prefix>/`: everything ferry keeps.
    root: String,
    /// `<prefix>/subnets/`.
    prefix: String,
    shared: Arc<Shared>,
    /// Whether `shared` is kept by a watch ([`EtcdStore::open`]); if not
    /// ([`EtcdStore::open_client`]), reads go to etcd.
    watched: bool,
    own: Mutex<Option<Own>>,
}

/// What the watch task keeps and the store answers from.
struct Shared {
    cache: std::sync::Mutex<Cache>,
    notify: Notify,
    warned: WarnOnce,
    /// Full listings of the prefix since start (the first one included).
    relists: AtomicU64,
    /// The latest revision the snapshot holds: a write through this store
    /// waits for it, so that its own next read sees the write.
    seen: tokio::sync::watch::Sender<i64>,
    /// Tests hold the watch here: it drops its stream, as a ferryd cut off
    /// from etcd would, until released.
    #[cfg(test)]
    hold: tokio::sync::watch::Sender<Hold>,
}

#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    Run,
    Wanted,
    Held,
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
    /// Connects (TLS and login as `access` says) and checks that etcd
    /// answers; lists ferry's keys into memory and starts the watch that
    /// keeps them (what ferryd reads).
    pub async fn open(
        endpoints: &[String],
        access: &EtcdAccess,
        prefix: &str,
    ) -> StoreResult<EtcdStore> {
        Self::connect(endpoints, access, prefix, true).await
    }

    /// [`EtcdStore::open`] for a client that reads or writes once and exits
    /// (`ferryctl`): no listing into memory, no watch; reads go to etcd.
    /// At 10k Services the listing was a second full read of them per
    /// command.
    pub async fn open_client(
        endpoints: &[String],
        access: &EtcdAccess,
        prefix: &str,
    ) -> StoreResult<EtcdStore> {
        Self::connect(endpoints, access, prefix, false).await
    }

    async fn connect(
        endpoints: &[String],
        access: &EtcdAccess,
        prefix: &str,
        watched: bool,
    ) -> StoreResult<EtcdStore> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(OP_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let conn = Conn::open(endpoints, access, opts).await?;
        let root = format!("{}/", prefix.trim_end_matches('/'));
        let shared = Arc::new(Shared {
            cache: Default::default(),
            notify: Notify::new(),
            warned: WarnOnce::default(),
            relists: AtomicU64::new(0),
            seen: tokio::sync::watch::channel(0).0,
            #[cfg(test)]
            hold: tokio::sync::watch::channel(Hold::Run).0,
        });
        // Connecting is lazy: this first read is also what makes an
        // unreachable etcd (or a user without permission) an error now.
        if watched {
            let watch = Watch {
                conn: conn.clone(),
                root: root.clone(),
                shared: shared.clone(),
            };
            let rev = watch.relist().await?;
            tokio::spawn(watch.run(rev + 1));
        } else {
            let mut c = conn.client();
            let opts = GetOptions::new().with_prefix().with_count_only();
            conn.timed("read", c.get(root.clone(), Some(opts))).await?;
        }
        Ok(EtcdStore {
            conn,
            prefix: format!("{root}subnets/"),
            root,
            shared,
            watched,
            own: Mutex::new(None),
        })
    }

    /// Waits (a while at most) until the snapshot holds the write answered
    /// with `header`: the event of a write under the prefix always comes.
    async fn caught_up(&self, header: Option<&etcd_client::ResponseHeader>) {
        if let Some(h) = header {
            self.caught_up_to(h.revision()).await;
        }
    }

    async fn caught_up_to(&self, rev: i64) {
        if !self.watched {
            return;
        }
        let mut rx = self.shared.seen.subscribe();
        if tokio::time::timeout(OP_TIMEOUT, rx.wait_for(|r| *r >= rev))
            .await
            .is_err()
        {
            tracing::debug!(rev, "etcd: the watch has not caught up with our own write");
        }
    }

    fn key(&self, subnet: Ipv4Network) -> String {
        format!("{}{}", self.prefix, record::subnet_key(subnet))
    }

    async fn list(&self) -> StoreResult<Vec<Kv>> {
        let mut c = self.conn.client();
        let resp = self
            .conn
            .timed(
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

    async fn grant(&self, ttl: Duration) -> StoreResult<i64> {
        let mut c = self.conn.client();
        let ttl = ttl.as_secs().max(5) as i64;
        let r = self
            .conn
            .timed("grant lease", c.lease_grant(ttl, None))
            .await?;
        Ok(r.id())
    }

    async fn put_if(
        &self,
        cmp: Compare,
        key: String,
        rec: &NodeRecord,
        lease: i64,
    ) -> StoreResult<bool> {
        let mut c = self.conn.client();
        let val = serde_json::to_vec(rec).expect("serialisable");
        let txn = Txn::new().when([cmp]).and_then([TxnOp::put(
            key,
            val,
            Some(PutOptions::new().with_lease(lease)),
        )]);
        let r = self.conn.timed("reserve subnet", c.txn(txn)).await?;
        if r.succeeded() {
            self.caught_up(r.header()).await;
        }
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

/// Services, EndpointSlices and ranges.
impl EtcdStore {
    fn kind_prefix(&self, kind: Kind) -> String {
        format!("{}{}/", self.root, kind.plural())
    }

    fn object_key(&self, r: &ObjectRef) -> String {
        format!("{}{}/{}", self.kind_prefix(r.kind), r.namespace, r.name)
    }

    fn ranges_key(&self) -> String {
        format!("{}ranges", self.root)
    }

    async fn range(&self, prefix: &str, revision: i64) -> StoreResult<(i64, Vec<KeyValue>)> {
        range(&self.conn, prefix, revision).await
    }

    /// All Services and EndpointSlices at one revision, which it returns.
    async fn read_objects(&self) -> StoreResult<(i64, Snapshot)> {
        let mut snap = Snapshot::default();
        let mut rev = 0;
        for kind in [Kind::Service, Kind::EndpointSlice] {
            let prefix = self.kind_prefix(kind);
            let (r, kvs) = self.range(&prefix, rev).await?;
            rev = r;
            for kv in kvs {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let named = key.strip_prefix(&prefix).and_then(|k| k.split_once('/'));
                let res = match named {
                    Some((ns, name)) => decode(kind, ns, name, kv.value()),
                    None => Err("not a NAMESPACE/NAME key".into()),
                };
                match res {
                    Ok(obj) => snap.insert(obj),
                    Err(msg) => {
                        if self
                            .shared
                            .warned
                            .first(format!("{key}@{}", kv.mod_revision()))
                        {
                            tracing::warn!(key, "ignoring unreadable {}: {msg}", kind.singular());
                        }
                    }
                }
            }
        }
        Ok((rev, snap))
    }

    async fn read_ranges(&self, revision: i64) -> StoreResult<Option<Ranges>> {
        let mut c = self.conn.client();
        let key = self.ranges_key();
        let opts = GetOptions::new().with_revision(revision);
        let resp = self
            .conn
            .timed("read ranges", c.get(key.clone(), Some(opts)))
            .await?;
        resp.kvs()
            .first()
            .map(|kv| decode_ranges(kv.value()))
            .transpose()
            .map_err(|msg| StoreError::BadRanges {
                at: format!("etcd {} key {key}", self.conn.endpoints()),
                msg,
            })
    }

    /// [`ServiceWrites::apply`], awaiting `before_commit()` between deciding
    /// and writing, where another writer may land: tests use it to force
    /// that interleaving.
    async fn apply_with<F: Future<Output = ()>>(
        &self,
        objects: Vec<Object>,
        fallback: &Ranges,
        mut before_commit: impl FnMut() -> F,
    ) -> StoreResult<Vec<Applied>> {
        let mut results: Vec<Option<Applied>> = vec![None; objects.len()];
        // Indices of the objects not yet written.
        let mut pending: Vec<usize> = (0..objects.len()).collect();
        for _ in 0..ATTEMPTS {
            let (rev, current) = self.read_objects().await?;
            let stored = self.read_ranges(rev).await?;
            let ranges = stored.clone().unwrap_or_else(|| fallback.clone());
            let batch = pending.iter().map(|&i| objects[i].clone()).collect();
            let plan = plan_apply(batch, &current, &ranges)?;
            before_commit().await;
            // (index into `pending`, key, value); the ranges go first.
            let mut writes: Vec<(Option<usize>, String, Vec<u8>)> = Vec::new();
            let mut objs = plan.writes.iter();
            for (j, a) in plan.applied.iter().enumerate() {
                if a.change != Change::Unchanged {
                    let o = objs.next().expect("one write per change");
                    writes.push((Some(j), self.object_key(&a.object), encode(o, false)));
                }
            }
            if stored.is_none() && !writes.is_empty() {
                writes.insert(0, (None, self.ranges_key(), encode_ranges(&ranges)));
            }
            let mut last = rev;
            let mut conflict = false;
            for chunk in chunks(&writes) {
                // Nothing under these keys changed since `last`: a compare
                // over the range also covers keys created since.
                let guards = vec![
                    Compare::mod_revision(
                        self.kind_prefix(Kind::Service),
                        CompareOp::Less,
                        last + 1,
                    )
                    .with_prefix(),
                    Compare::mod_revision(
                        self.kind_prefix(Kind::EndpointSlice),
                        CompareOp::Less,
                        last + 1,
                    )
                    .with_prefix(),
                    Compare::mod_revision(self.ranges_key(), CompareOp::Less, last + 1),
                ];
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .map(|(_, k, v)| TxnOp::put(k.clone(), v.clone(), None))
                    .collect();
                let mut c = self.conn.client();
                let txn = Txn::new().when(guards).and_then(ops);
                let resp = self.conn.timed("apply", c.txn(txn)).await?;
                if !resp.succeeded() {
                    conflict = true;
                    break;
                }
                last = resp.header().map(|h| h.revision()).unwrap_or(last);
                for (j, _, _) in chunk {
                    if let Some(j) = j {
                        results[pending[*j]] = Some(plan.applied[*j].clone());
                    }
                }
            }
            if !conflict {
                if last > rev {
                    self.caught_up_to(last).await;
                }
                for (j, a) in plan.applied.into_iter().enumerate() {
                    results[pending[j]].get_or_insert(a);
                }
                return Ok(results.into_iter().map(|r| r.expect("decided")).collect());
            }
            // Another writer came between: decide again on what it wrote,
            // for what is not written yet.
            pending.retain(|&i| results[i].is_none());
        }
        Err(StoreError::ApplyContention(ATTEMPTS))
    }
}

/// Every key under `prefix` at `revision` (0: the latest), a page at a
/// time; returns the revision read, so that further reads can be made at
/// the same one.
async fn range(conn: &Conn, prefix: &str, revision: i64) -> StoreResult<(i64, Vec<KeyValue>)> {
    let end = prefix_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    let mut rev = revision;
    let mut out = Vec::new();
    loop {
        let mut c = conn.client();
        let opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(PAGE)
            .with_revision(rev);
        let what = format!("list {prefix}");
        let mut resp = conn.timed(&what, c.get(from.clone(), Some(opts))).await?;
        if rev == 0 {
            rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        let more = resp.more();
        let kvs = resp.take_kvs();
        let Some(last) = kvs.last() else { break };
        from = last.key().to_vec();
        from.push(0); // the next key after it
        out.extend(kvs);
        if !more {
            break;
        }
    }
    Ok((rev, out))
}

/// What key `rel` (relative to the root) holds given its value (`None`:
/// deleted), as the snapshot keeps it: unreadable values are left out,
/// logged once per revision.
fn decoded(
    rel: &str,
    value: Option<&[u8]>,
    mod_revision: i64,
    warned: &WarnOnce,
) -> Option<(Slot, Option<Value>)> {
    let slot = Slot::of(rel)?;
    let Some(data) = value else {
        return Some((slot, None));
    };
    let res = match &slot {
        Slot::Node(subnet) => match serde_json::from_slice::<NodeRecord>(data) {
            Ok(r) if r.subnet == *subnet => Ok(Value::Node(snapshot::Node {
                record: r,
                // etcd expires the key itself: its delete is the expiry.
                expires_ms: u64::MAX,
            })),
            Ok(r) => Err(format!("holds subnet {}", r.subnet)),
            Err(e) => Err(e.to_string()),
        },
        Slot::Object {
            kind,
            namespace,
            name,
        } => decode(*kind, namespace, name, data).map(Value::Object),
    };
    match res {
        Ok(v) => Some((slot, Some(v))),
        Err(msg) => {
            if warned.first(format!("{rel}@{mod_revision}")) {
                tracing::warn!(key = rel, "ignoring unreadable record: {msg}");
            }
            Some((slot, None))
        }
    }
}

/// The snapshot of everything listed (`(key relative to the root, value,
/// mod revision)`): what applying every event since the beginning gives.
fn listed<'a>(kvs: impl IntoIterator<Item = (&'a str, &'a [u8], i64)>, warned: &WarnOnce) -> Cache {
    let mut c = Cache::default();
    for (rel, value, rev) in kvs {
        apply_event(&mut c, rel, Some(value), rev, warned);
    }
    c
}

/// Applies a put (`Some` value) or delete of key `rel` at `rev`; true if
/// the snapshot changed.
fn apply_event(
    cache: &mut Cache,
    rel: &str,
    value: Option<&[u8]>,
    rev: i64,
    warned: &WarnOnce,
) -> bool {
    match decoded(rel, value, rev, warned) {
        Some((slot, v)) => cache.set(slot, v),
        None => false,
    }
}

/// The task that keeps the snapshot current.
struct Watch {
    conn: Conn,
    root: String,
    shared: Arc<Shared>,
}

impl Watch {
    /// Lists the whole prefix and takes it as the snapshot; returns the
    /// revision listed, to watch from the one after.
    async fn relist(&self) -> StoreResult<i64> {
        let (rev, kvs) = range(&self.conn, &self.root, 0).await?;
        let fresh = listed(
            kvs.iter().filter_map(|kv| {
                let key = std::str::from_utf8(kv.key()).ok()?;
                Some((key.strip_prefix(&self.root)?, kv.value(), kv.mod_revision()))
            }),
            &self.shared.warned,
        );
        self.shared.relists.fetch_add(1, Ordering::Relaxed);
        let changed = self
            .shared
            .cache
            .lock()
            .expect("not poisoned")
            .replace(fresh);
        self.shared.seen.send_modify(|r| *r = (*r).max(rev));
        if changed {
            self.shared.notify.notify_one();
        }
        Ok(rev)
    }

    /// Applies one watch response; false when it says the watch fell behind
    /// a compaction (nothing is applied then).
    fn apply(&self, resp: &etcd_client::WatchResponse, next: &mut i64) -> bool {
        if resp.compact_revision() > 0 {
            return false;
        }
        let mut changed = false;
        let mut cache = self.shared.cache.lock().expect("not poisoned");
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            *next = (*next).max(kv.mod_revision() + 1);
            let Some(rel) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(&self.root))
            else {
                continue;
            };
            let value = match ev.event_type() {
                EventType::Put => Some(kv.value()),
                EventType::Delete => None,
            };
            changed |= apply_event(
                &mut cache,
                rel,
                value,
                kv.mod_revision(),
                &self.shared.warned,
            );
        }
        drop(cache);
        self.shared.seen.send_if_modified(|r| {
            let moved = *next - 1 > *r;
            *r = (*r).max(*next - 1);
            moved
        });
        if changed {
            self.shared.notify.notify_one();
        }
        true
    }

    /// Watches from revision `next` on, forever: resumes a broken watch
    /// from the revision after the last event applied, lists again only
    /// when etcd no longer has that revision.
    async fn run(self, mut next: i64) {
        let mut relist = false;
        loop {
            if relist {
                match self.relist().await {
                    Ok(rev) => {
                        next = rev + 1;
                        relist = false;
                    }
                    Err(e) => {
                        tracing::warn!("etcd: listing again after a compaction: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            let opts = WatchOptions::new().with_prefix().with_start_revision(next);
            let mut c = self.conn.client();
            let logins = self.conn.logins();
            match c.watch(self.root.clone(), Some(opts)).await {
                // etcd cancels a watch it does not permit (a token it has
                // forgotten, a role without the prefix) in its first answer,
                // which etcd-client takes as the creation: only the id (-1)
                // tells. A plain request says why, and logs in again if
                // that is it.
                Ok((watcher, _)) if watcher.watch_id() < 0 => {
                    let mut c = self.conn.client();
                    let check = c.get(
                        self.root.clone(),
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    );
                    if let Err(e) = self.conn.timed("watch", check).await {
                        tracing::warn!("etcd refused the watch: {e}");
                    }
                }
                Ok((_watcher, mut stream)) => loop {
                    tokio::select! {
                        m = stream.message() => match m {
                            Ok(Some(resp)) => {
                                if !self.apply(&resp, &mut next) {
                                    tracing::warn!(
                                        from = next,
                                        compacted = resp.compact_revision(),
                                        "etcd watch fell behind a compaction; listing again"
                                    );
                                    relist = true;
                                    break;
                                }
                                if resp.canceled() {
                                    let why = resp.cancel_reason();
                                    tracing::debug!("etcd watch canceled: {why}");
                                    if etcd_conn::rejects_token(why) {
                                        self.conn.relogin(logins).await;
                                    }
                                    break;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!("etcd watch: {e}");
                                self.conn.after_error(&e, logins).await;
                                break;
                            }
                        },
                        _ = self.shared.held() => break,
                    }
                },
                Err(e) => {
                    tracing::debug!("etcd watch: {e}");
                    self.conn.after_error(&e, logins).await;
                }
            }
            if self.shared.wait_released().await {
                continue;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

impl Shared {
    /// Resolves when a test asks to hold the watch; never otherwise.
    async fn held(&self) {
        #[cfg(test)]
        {
            let mut rx = self.hold.subscribe();
            let _ = rx.wait_for(|h| *h == Hold::Wanted).await;
        }
        #[cfg(not(test))]
        std::future::pending::<()>().await
    }

    /// If a test holds the watch: says it is held (its stream dropped),
    /// waits until released and returns true.
    async fn wait_released(&self) -> bool {
        #[cfg(test)]
        if *self.hold.borrow() == Hold::Wanted {
            self.hold.send_replace(Hold::Held);
            let mut rx = self.hold.subscribe();
            let _ = rx.wait_for(|h| *h == Hold::Run).await;
            return true;
        }
        false
    }
}

/// The end of the key range of `prefix` (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// `writes` in transactions of at most [`TXN_OPS`] and about [`TXN_BYTES`]
/// (one write larger than that gets a transaction of its own).
fn chunks<T>(writes: &[(T, String, Vec<u8>)]) -> Vec<&[(T, String, Vec<u8>)]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, k, v)) in writes.iter().enumerate() {
        let size = k.len() + v.len();
        if i > start && (i - start == TXN_OPS || bytes + size > TXN_BYTES) {
            out.push(&writes[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < writes.len() {
        out.push(&writes[start..]);
    }
    out
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
                    let mut c = self.conn.client();
                    let _ = self
                        .conn
                        .timed("revoke old lease", c.lease_revoke(old))
                        .await;
                }
                let mut c = self.conn.client();
                let keeper = self
                    .conn
                    .timed("keep lease alive", c.lease_keep_alive(lease))
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
        let mut c = self.conn.client();
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
            let mut c = self.conn.client();
            o.keeper = Some(
                self.conn
                    .timed("keep lease alive", c.lease_keep_alive(o.lease))
                    .await?,
            );
        }
        let (keeper, stream) = o.keeper.as_mut().expect("set above");
        let answer = async {
            self.conn
                .timed("keep lease alive", keeper.keep_alive())
                .await?;
            self.conn.timed("keep lease alive", stream.message()).await
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
        let mut c = self.conn.client();
        let resp = self
            .conn
            .timed("read own record", c.get(self.key(subnet), None))
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
        Ok(super::records_of(&self.node_set().await?))
    }

    async fn node_set(&self) -> StoreResult<super::NodeSet> {
        if !self.watched {
            let live = self.list().await?.into_iter().map(|kv| kv.record);
            return Ok(super::node_set_of(live.filter(|r| !r.left)));
        }
        let mut cache = self.shared.cache.lock().expect("not poisoned");
        Ok(cache.live_nodes(0))
    }

    async fn services(&self) -> StoreResult<Snapshot> {
        Ok(self.read_objects().await?.1)
    }

    async fn state(&self) -> StoreResult<State> {
        if !self.watched {
            return Ok(State::of(&self.services().await?));
        }
        Ok(self.shared.cache.lock().expect("not poisoned").state())
    }

    async fn changed(&self) {
        self.shared.notify.notified().await;
    }

    fn services_version(&self) -> Option<u64> {
        self.watched
            .then(|| self.shared.cache.lock().expect("not poisoned").version())
    }
}

impl ServiceWrites for EtcdStore {
    async fn apply(&self, objects: Vec<Object>, fallback: &Ranges) -> StoreResult<Vec<Applied>> {
        self.apply_with(objects, fallback, || async {}).await
    }

    async fn delete(&self, refs: &[ObjectRef]) -> StoreResult<Vec<bool>> {
        let mut out = Vec::with_capacity(refs.len());
        for chunk in refs.chunks(TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|r| TxnOp::delete(self.object_key(r), None))
                .collect();
            let mut c = self.conn.client();
            let resp = self
                .conn
                .timed("delete", c.txn(Txn::new().and_then(ops)))
                .await?;
            let gone: Vec<bool> = resp
                .op_responses()
                .iter()
                .map(|r| match r {
                    TxnOpResponse::Delete(d) => d.deleted() > 0,
                    _ => false,
                })
                .collect();
            // Only a delete that deleted something has an event to wait for.
            if gone.contains(&true) {
                self.caught_up(resp.header()).await;
            }
            out.extend(gone);
        }
        Ok(out)
    }

    async fn publish_ranges(&self, given: &Ranges) -> StoreResult<()> {
        let key = self.ranges_key();
        // Create it if absent, else read what is there, in one transaction:
        // what is read is what made the create fail.
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), encode_ranges(given), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut c = self.conn.client();
        let resp = self.conn.timed("publish ranges", c.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(());
        }
        let stored = match resp.op_responses().first() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        }
        .unwrap_or_default();
        let stored = decode_ranges(&stored).map_err(|msg| StoreError::BadRanges {
            at: format!("etcd {} key {key}", self.conn.endpoints()),
            msg,
        })?;
        ranges_to_publish(Some(stored), given).map(|_| ())
    }

    async fn ranges(&self) -> StoreResult<Option<Ranges>> {
        self.read_ranges(0).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{
        self, cluster_ip, objs, reg, said, skip, small, svc, Rng, TempDir,
    };
    use etcd_client::Client;
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
            match EtcdStore::open(
                std::slice::from_ref(&self.url),
                &EtcdAccess::default(),
                "/ferry-test",
            )
            .await
            {
                Ok(s) => s,
                Err(e) => panic!("{e}\n{}", self.log()),
            }
        }

        async fn open_client(&self) -> EtcdStore {
            let url = std::slice::from_ref(&self.url);
            match EtcdStore::open_client(url, &EtcdAccess::default(), "/ferry-test").await {
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
                let (client, key) = (node.conn.client(), node.key(kv.subnet));
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
                    node.conn.client(),
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

    /// Every key under the test prefix with value and mod revision, and the
    /// store's revision: equal dumps mean nothing was written at all.
    async fn dump(s: &EtcdStore) -> (i64, Vec<(Vec<u8>, Vec<u8>, i64)>) {
        let (rev, kvs) = s.range(&s.root, 0).await.unwrap();
        let kvs = kvs
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision()))
            .collect();
        (rev, kvs)
    }

    #[tokio::test]
    async fn services_round_trip() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let s = etcd.open().await;
        testing::round_trip(&s).await;
        let mut c = s.conn.client();
        let got = c
            .get("/ferry-test/services/default/web", None)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(got.kvs()[0].value()).unwrap();
        assert_eq!(
            (v["kind"].as_str(), v["spec"]["clusterIP"].as_str()),
            (Some("Service"), Some("10.96.0.1"))
        );
        let got = c.get("/ferry-test/ranges", None).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(got.kvs()[0].value()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"serviceCIDR": "10.96.0.0/29", "nodePortRange": "30000-30002"})
        );
    }

    /// ferryctl's store reads etcd itself: the same answers with no
    /// listing into memory and no watch (a write does not wait for one).
    #[tokio::test]
    async fn client_store_reads_etcd_itself() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let cli = etcd.open_client().await;
        testing::round_trip(&cli).await;
        assert_eq!(cli.shared.relists.load(Ordering::Relaxed), 0);
        assert_eq!(cli.services_version(), None);
        let node = etcd.open().await;
        let a = registered(&node).await;
        assert_eq!(cli.nodes().await.unwrap(), vec![a.record]);
        assert_eq!(cli.state().await.unwrap(), node.state().await.unwrap());
        // An etcd that is not there is an error at once.
        let port = free_port().local_addr().unwrap().port();
        let gone = [format!("http://127.0.0.1:{port}")];
        assert!(
            EtcdStore::open_client(&gone, &EtcdAccess::default(), "/ferry-test")
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn refused_applies_write_nothing() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let s = etcd.open().await;
        testing::refusals_write_nothing(&s, || dump(&s)).await;
    }

    #[tokio::test]
    async fn deletes() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        testing::deletes(&etcd.open().await).await;
    }

    /// B's whole apply lands between A's read and A's write: A's
    /// transaction must fail, and A decide again on what B wrote.
    #[tokio::test]
    async fn concurrent_applies_never_share_an_address() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let a = etcd.open().await;
        let b = etcd.open().await;
        let mut rounds = 0;
        let applied = a
            .apply_with(objs(&svc("a", "{}")), &small(), || {
                rounds += 1;
                let (first, b) = (rounds == 1, &b);
                async move {
                    if first {
                        b.apply(objs(&svc("b", "{}")), &small()).await.unwrap();
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(said(&applied), ["service/default/a created"]);
        let snap = a.services().await.unwrap();
        assert_eq!(cluster_ip(&snap, "default/b"), "10.96.0.1");
        assert_eq!(cluster_ip(&snap, "default/a"), "10.96.0.2");
        assert_eq!(rounds, 2, "A did not decide again after B's write");
    }

    /// An apply larger than one transaction and than one page of reads:
    /// all of it lands, every address once.
    #[tokio::test]
    async fn large_apply_is_chunked_and_paged() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let s = etcd.open().await;
        let n = PAGE as usize + TXN_OPS + 7;
        let yaml: String = (0..n)
            .map(|i| svc(&format!("s{i}"), "{ports: [{port: 80}]}"))
            .collect();
        let applied = s.apply(objs(&yaml), &Ranges::default()).await.unwrap();
        assert_eq!(applied.len(), n);
        let snap = s.services().await.unwrap();
        assert_eq!(snap.services.len(), n);
        let mut ips: Vec<String> = snap.services.keys().map(|k| cluster_ip(&snap, k)).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), n);
        let again = s.apply(objs(&yaml), &Ranges::default()).await.unwrap();
        assert!(again.iter().all(|a| a.change == Change::Unchanged));
    }

    /// A key that is not an object `apply` would write is left out.
    #[tokio::test]
    async fn unreadable_objects_are_skipped() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let s = etcd.open().await;
        s.apply(objs(testing::WEB), &small()).await.unwrap();
        let mut c = s.conn.client();
        let web = c
            .get("/ferry-test/services/default/web", None)
            .await
            .unwrap();
        let web = web.kvs()[0].value().to_vec();
        c.put(
            "/ferry-test/services/default/half",
            &b"{\"apiVersion\": \"v1\", \"ki"[..],
            None,
        )
        .await
        .unwrap();
        c.put("/ferry-test/services/default/misnamed", web, None)
            .await
            .unwrap();
        c.put("/ferry-test/services/no-namespace", &b"{}"[..], None)
            .await
            .unwrap();
        let snap = s.services().await.unwrap();
        assert_eq!(snap.services.keys().collect::<Vec<_>>(), ["default/web"]);
        assert_eq!(snap.slices.len(), 1);
    }

    #[tokio::test]
    async fn changed_covers_services_and_slices() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let s = etcd.open().await;
        let other = etcd.open().await;
        testing::wakes_on(&s, async {
            other.apply(objs(testing::WEB), &small()).await.unwrap();
        })
        .await;
        let slice = ObjectRef::parse(Kind::EndpointSlice, "web-1").unwrap();
        testing::wakes_on(&s, async {
            other.delete(&[slice]).await.unwrap();
        })
        .await;
    }

    /// A value for `key`: readable or not, and one of a few versions.
    fn value_for(key: &str, rng: &mut Rng) -> Vec<u8> {
        let version = rng.below(3);
        if rng.below(5) == 0 {
            return b"{\"half\": ".to_vec(); // unreadable
        }
        if Slot::of(key).is_none() {
            return format!("{{\"any\": {version}}}").into_bytes();
        }
        if let Some(k) = key.strip_prefix("subnets/") {
            let subnet = record::parse_subnet_key(k).unwrap();
            // Now and then a record naming another subnet than its key.
            let subnet = if rng.below(6) == 0 {
                "10.99.0.0/24".parse().unwrap()
            } else {
                subnet
            };
            let rec = NodeRecord {
                node: format!("n{version}"),
                subnet,
                underlay_ip: std::net::Ipv4Addr::new(192, 168, 0, version as u8),
                vtep_mac: crate::record::Mac::for_vtep("n", version as u32),
                left: rng.below(4) == 0,
            };
            return serde_json::to_vec(&rec).unwrap();
        }
        let mut parts = key.splitn(3, '/');
        let (kind, ns, name) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        // Now and then an object misnamed for its key.
        let name = if rng.below(6) == 0 { "other" } else { name };
        let v = if kind == "services" {
            serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"ports": [{"port": 80 + version}]}})
        } else {
            serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": ns,
                    "labels": {"kubernetes.io/service-name": "x"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [format!("10.244.1.{version}")]}]})
        };
        serde_json::to_vec(&v).unwrap()
    }

    /// For a random sequence of puts and deletes, applying each event to the
    /// snapshot gives exactly what listing the keys afterwards gives, at
    /// every step: no event's effect depends on what came before it.
    #[test]
    fn events_give_the_relisted_state() {
        let mut keys: Vec<String> = (0..6).map(|i| format!("subnets/10.244.{i}.0-24")).collect();
        for ns in ["default", "prod"] {
            for name in ["web", "db"] {
                keys.push(format!("services/{ns}/{name}"));
                keys.push(format!("endpointslices/{ns}/{name}"));
            }
        }
        keys.extend([
            "ranges".into(),
            "subnets/garbage".into(),
            "services/no-ns".into(),
        ]);
        let warned = WarnOnce::default();
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut held: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
            let mut cache = Cache::default();
            let (mut nodes_seen, mut objects_seen) = (false, false);
            for rev in 1..=400 {
                let key = keys[rng.below(keys.len())].clone();
                if rng.below(3) == 0 {
                    held.remove(&key);
                    apply_event(&mut cache, &key, None, rev, &warned);
                } else {
                    let v = value_for(&key, &mut rng);
                    apply_event(&mut cache, &key, Some(&v), rev, &warned);
                    held.insert(key, v);
                }
                let relisted = listed(held.iter().map(|(k, v)| (k.as_str(), &v[..], 0)), &warned);
                assert_eq!(cache, relisted, "seed {seed}, after event {rev}");
                nodes_seen |= !cache.live_nodes(0).is_empty();
                let snap = cache.state();
                objects_seen |= !snap.services.is_empty() && !snap.slices.is_empty();
            }
            // Not vacuous: readable values of every kind were among them.
            assert!(nodes_seen && objects_seen, "seed {seed}");
        }
    }

    /// Until `f` holds (10 s at most).
    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn node_kv(i: u8, node: &str) -> (String, Vec<u8>) {
        let subnet: Ipv4Network = format!("10.244.{i}.0/24").parse().unwrap();
        let rec = NodeRecord {
            node: node.into(),
            subnet,
            underlay_ip: std::net::Ipv4Addr::new(192, 168, 0, i),
            vtep_mac: crate::record::Mac::for_vtep(node, 1),
            left: false,
        };
        (
            format!("/ferry-test/subnets/{}", record::subnet_key(subnet)),
            serde_json::to_vec(&rec).unwrap(),
        )
    }

    /// Holds `s`'s watch (its stream dropped) while `write` runs, then lets
    /// it go on; returns once the snapshot equals a fresh listing.
    async fn away_while(s: &EtcdStore, write: impl Future<Output = ()>) {
        s.shared.hold.send_replace(Hold::Wanted);
        let mut rx = s.shared.hold.subscribe();
        rx.wait_for(|h| *h == Hold::Held).await.unwrap();
        write.await;
        s.shared.hold.send_replace(Hold::Run);
        let (_, kvs) = s.range(&s.root, 0).await.unwrap();
        let fresh = listed(
            kvs.iter().map(|kv| {
                let k = std::str::from_utf8(kv.key()).unwrap();
                (
                    k.strip_prefix(&s.root).unwrap(),
                    kv.value(),
                    kv.mod_revision(),
                )
            }),
            &WarnOnce::default(),
        );
        until("the snapshot to converge", || {
            *s.shared.cache.lock().unwrap() == fresh
        })
        .await;
    }

    /// Writes that delete, add and change records and add a Service.
    async fn changes(mut c: Client) -> i64 {
        for i in 1..=2u8 {
            c.delete(node_kv(i, "x").0, None).await.unwrap();
        }
        for i in 10..=12u8 {
            let (k, v) = node_kv(i, &format!("new{i}"));
            c.put(k, v, None).await.unwrap();
        }
        let (k, v) = node_kv(3, "renamed");
        c.put(k, v, None).await.unwrap();
        let svc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"ports": [{"port": 80}]}});
        let r = c
            .put(
                "/ferry-test/services/default/web",
                serde_json::to_vec(&svc).unwrap(),
                None,
            )
            .await
            .unwrap();
        r.header().unwrap().revision()
    }

    async fn with_records(etcd: &TestEtcd) -> EtcdStore {
        let s = etcd.open().await;
        let mut c = s.conn.client();
        for i in 1..=5u8 {
            let (k, v) = node_kv(i, &format!("n{i}"));
            c.put(k, v, None).await.unwrap();
        }
        until("five nodes", || {
            s.shared.cache.lock().unwrap().node_count() == 5
        })
        .await;
        s
    }

    /// A watch cut off while records change resumes from the revision after
    /// the last it saw: it converges without listing again.
    #[tokio::test]
    async fn broken_watch_resumes_without_relisting() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let s = with_records(&etcd).await;
        let before = s.shared.relists.load(Ordering::Relaxed);
        away_while(&s, async {
            changes(s.conn.client()).await;
        })
        .await;
        assert_eq!(s.shared.relists.load(Ordering::Relaxed), before);
        let names: Vec<String> = s
            .nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.node)
            .collect();
        assert_eq!(names, ["renamed", "n4", "n5", "new10", "new11", "new12"]);
        assert!(s
            .state()
            .await
            .unwrap()
            .services
            .contains_key("default/web"));
    }

    /// A watch that fell behind a compaction (etcd no longer has the
    /// revisions it missed) lists again, and converges.
    #[tokio::test]
    async fn watch_behind_a_compaction_relists_and_converges() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let s = with_records(&etcd).await;
        let before = s.shared.relists.load(Ordering::Relaxed);
        away_while(&s, async {
            let rev = changes(s.conn.client()).await;
            let mut c = s.conn.client();
            c.compact(
                rev,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
            .unwrap();
        })
        .await;
        assert_eq!(s.shared.relists.load(Ordering::Relaxed), before + 1);
        let names: Vec<String> = s
            .nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.node)
            .collect();
        assert_eq!(names, ["renamed", "n4", "n5", "new10", "new11", "new12"]);
        assert!(s
            .state()
            .await
            .unwrap()
            .services
            .contains_key("default/web"));
    }

    /// A peer's lease expiring arrives as the delete of its key.
    #[tokio::test]
    async fn expired_lease_drops_the_peer() {
        let Some(etcd) = TestEtcd::start() else {
            return;
        };
        let s = etcd.open().await;
        let mut c = s.conn.client();
        let lease = c.lease_grant(1, None).await.unwrap().id();
        let (k, v) = node_kv(7, "short");
        c.put(k, v, Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap();
        until("the peer", || {
            s.shared.cache.lock().unwrap().node_count() == 1
        })
        .await;
        until("its expiry", || {
            s.shared.cache.lock().unwrap().node_count() == 0
        })
        .await;
    }

    #[test]
    fn chunks_respect_ops_and_bytes() {
        let w = |n: usize, size: usize| -> Vec<((), String, Vec<u8>)> {
            (0..n).map(|_| ((), String::new(), vec![0; size])).collect()
        };
        let lens =
            |w: &[((), String, Vec<u8>)]| chunks(w).iter().map(|c| c.len()).collect::<Vec<_>>();
        assert_eq!(lens(&w(250, 10)), [100, 100, 50]);
        assert_eq!(lens(&w(5, TXN_BYTES / 2)), [2, 2, 1]);
        assert_eq!(lens(&w(2, TXN_BYTES * 2)), [1, 1], "a big one alone");
        assert!(lens(&w(0, 1)).is_empty());
        assert_eq!(prefix_end("/ferry/services/"), b"/ferry/services0");
    }
}
