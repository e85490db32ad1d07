//! The file store: a directory every ferryd on one machine shares.
//!
//! ```text
//! DIR/.lock                      flock(2)ed around every read-modify-write
//! DIR/subnets/10.244.1.0-24.json {"record": {...}, "expiresMs": 1763780000000}
//! DIR/services/NS/NAME.json      a v1 Service, the API's JSON
//! DIR/endpointslices/NS/NAME.json  a discovery.k8s.io/v1 EndpointSlice
//! DIR/ranges.json                {"serviceCIDR": "10.96.0.0/12", "nodePortRange": "30000-32767"}
//! ```
//! Records are written to a temporary file and renamed into place, so a
//! reader never sees half a record. Changes are noticed with inotify (on
//! `subnets/`, on `services/` and `endpointslices/` and on each namespace
//! directory below them, added as they appear).
//!
//! An apply decides everything under the lock, then stages every file it
//! writes as a temporary next to its target and renames them all: an error
//! before the renames writes nothing. A crash between two renames leaves
//! part of the apply in place; applying the same file again completes it.
//! Temporaries left by a crash are removed by the next writer (under the
//! lock no other writer can be staging).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnetwork::Ipv4Network;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{
    decode, decode_ranges, encode, encode_ranges, plan_apply, ranges_to_publish, Applied,
    ClusterState, Membership, Registration, ServiceWrites, StoreError, StoreResult, WarnOnce,
};
use crate::record::{self, Allocation, NodeRecord, Reservation};
use crate::service::alloc::Ranges;
use crate::service::model::{Kind, Object, ObjectRef};
use crate::service::Snapshot;

const KINDS: [Kind; 2] = [Kind::Service, Kind::EndpointSlice];
const TMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub record: NodeRecord,
    pub expires_ms: u64,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct FileStore {
    inner: Arc<Inner>,
    notify: Arc<Notify>,
}

struct Inner {
    dir: PathBuf,
    subnets: PathBuf,
    /// This node's registration and subnet, for renewals.
    own: Mutex<Option<(Registration, Ipv4Network)>>,
    warned: WarnOnce,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl FileStore {
    /// Opens (creating if needed) the store directory and starts watching it.
    pub fn open(dir: &Path) -> StoreResult<FileStore> {
        let subnets = dir.join("subnets");
        let err = |what: &str, source| StoreError::File {
            dir: dir.display().to_string(),
            what: what.to_string(),
            source,
        };
        if let Some(parent) = dir.parent() {
            if !parent.is_dir() {
                return Err(err(
                    "parent directory does not exist",
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                ));
            }
        }
        let trees: Vec<PathBuf> = KINDS.iter().map(|k| dir.join(k.plural())).collect();
        for d in std::iter::once(&subnets).chain(&trees) {
            fs::create_dir_all(d).map_err(|e| err("cannot create", e))?;
        }
        let notify = Arc::new(Notify::new());
        watch(&subnets, &trees, notify.clone()).map_err(|e| err("cannot watch (inotify)", e))?;
        Ok(FileStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                subnets,
                own: Mutex::new(None),
                warned: WarnOnce::default(),
            }),
            notify,
        })
    }
}

/// A thread that wakes `notify` on every change in `subnets` and in the
/// namespace directories of each of `trees`. inotify is not recursive: a
/// namespace directory that appears gets its own watch; the wake-up for its
/// creation comes after that watch is in place, so a reader woken by it
/// sees every file renamed into it before the watch, and the watch reports
/// every one after.
fn watch(subnets: &Path, trees: &[PathBuf], notify: Arc<Notify>) -> std::io::Result<()> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let changes = AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_CLOSE_WRITE;
    let ino = Inotify::init(InitFlags::IN_CLOEXEC)?;
    ino.add_watch(subnets, changes)?;
    let mut roots = HashMap::new();
    for t in trees {
        roots.insert(
            ino.add_watch(t, changes | AddWatchFlags::IN_CREATE)?,
            t.clone(),
        );
        for de in fs::read_dir(t)? {
            let de = de?;
            if de.file_type()?.is_dir() {
                ino.add_watch(&de.path(), changes)?;
            }
        }
    }
    std::thread::Builder::new()
        .name("ferryd-inotify".into())
        .spawn(move || loop {
            match ino.read_events() {
                Ok(events) => {
                    for ev in events {
                        let new_dir = ev.mask.contains(AddWatchFlags::IN_ISDIR)
                            && ev
                                .mask
                                .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO);
                        if let (true, Some(root), Some(name)) =
                            (new_dir, roots.get(&ev.wd), ev.name.as_ref())
                        {
                            // Gone again already: nothing to watch, and the
                            // wake-up below makes the reader look anyway.
                            let _ = ino.add_watch(&root.join(name), changes);
                        }
                    }
                    notify.notify_one();
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => {
                    // Fall back to the reconcile timer.
                    return;
                }
            }
        })?;
    Ok(())
}

fn tmp_name() -> String {
    format!(
        "{TMP_PREFIX}{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Inner {
    fn err(&self, what: impl Into<String>, source: std::io::Error) -> StoreError {
        StoreError::File {
            dir: self.dir.display().to_string(),
            what: what.into(),
            source,
        }
    }

    fn lock(&self) -> StoreResult<Flock<File>> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".lock"))
            .map_err(|e| self.err("cannot open .lock", e))?;
        Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| self.err("cannot lock .lock", e.into()))
    }

    /// All entries, keyed by subnet. Unreadable files are skipped.
    fn read_all(&self) -> StoreResult<Vec<(Ipv4Network, Entry)>> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.subnets).map_err(|e| self.err("cannot list subnets", e))?;
        for de in rd {
            let de = de.map_err(|e| self.err("cannot list subnets", e))?;
            let name = de.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(key) = name.strip_suffix(".json") else {
                continue;
            };
            let Some(subnet) = record::parse_subnet_key(key) else {
                continue;
            };
            let Ok(text) = fs::read(de.path()) else {
                continue; // removed meanwhile
            };
            match serde_json::from_slice::<Entry>(&text) {
                Ok(e) if e.record.subnet == subnet => out.push((subnet, e)),
                _ => tracing::warn!(file = %de.path().display(), "ignoring unreadable record"),
            }
        }
        out.sort_by_key(|(s, _)| *s);
        Ok(out)
    }

    fn path_of(&self, subnet: Ipv4Network) -> PathBuf {
        self.subnets
            .join(format!("{}.json", record::subnet_key(subnet)))
    }

    fn write(&self, entry: &Entry) -> StoreResult<()> {
        let path = self.path_of(entry.record.subnet);
        let tmp = self.subnets.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let data = serde_json::to_vec_pretty(entry).expect("serialisable");
        let res = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(self.err(format!("cannot write {}", path.display()), e));
        }
        Ok(())
    }

    fn register(&self, reg: &Registration) -> StoreResult<NodeRecord> {
        let _lock = self.lock()?;
        let now = now_ms();
        let all = self.read_all()?;
        let reservations: Vec<Reservation> = all
            .iter()
            .map(|(s, e)| Reservation {
                subnet: *s,
                node: e.record.node.clone(),
                expired: e.expires_ms <= now,
            })
            .collect();
        let subnet = match record::allocate(
            reg.cluster,
            reg.subnet_len,
            &reg.node,
            &reservations,
            &[],
            reg.prefer,
        )? {
            Allocation::Keep(s) | Allocation::Take(s) => s,
        };
        let rec = reg.record(subnet);
        self.write(&Entry {
            record: rec.clone(),
            expires_ms: now + reg.ttl.as_millis() as u64,
        })?;
        *self.own.lock().expect("not poisoned") = Some((reg.clone(), subnet));
        Ok(rec)
    }

    fn renew(&self) -> StoreResult<()> {
        self.renew_with(|| {})
    }

    /// [`Inner::renew`], calling `before_lock` just before taking the lock,
    /// where another writer may land: tests use it to force that interleaving.
    fn renew_with(&self, before_lock: impl FnOnce()) -> StoreResult<()> {
        let Some((reg, subnet)) = self.own.lock().expect("not poisoned").clone() else {
            return Ok(());
        };
        // Most ticks find the lease fresh: look without the lock first, so
        // that they neither write nor wait for other nodes' writes.
        if renewal(self.read_entry(subnet), &reg, now_ms())?.is_none() {
            return Ok(());
        }
        before_lock();
        let _lock = self.lock()?;
        // Decide again on what is there now: a `leave` (from any process)
        // may have landed since the first look, and must not be undone.
        match renewal(self.read_entry(subnet), &reg, now_ms())? {
            Some(e) => self.write(&e),
            None => Ok(()),
        }
    }

    fn read_entry(&self, subnet: Ipv4Network) -> Option<Entry> {
        fs::read(self.path_of(subnet))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
    }

    fn leave(&self, node: &str) -> StoreResult<()> {
        let _lock = self.lock()?;
        let mut found = false;
        for (_, mut e) in self.read_all()? {
            if e.record.node == node {
                found = true;
                if !e.record.left {
                    e.record.left = true;
                    self.write(&e)?;
                }
            }
        }
        if !found {
            return Err(StoreError::NotRegistered(node.to_string()));
        }
        Ok(())
    }

    fn nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        let now = now_ms();
        Ok(live(self.read_all()?, now))
    }
}

impl Inner {
    fn object_path(&self, r: &ObjectRef) -> PathBuf {
        self.dir
            .join(r.kind.plural())
            .join(&r.namespace)
            .join(format!("{}.json", r.name))
    }

    fn ranges_path(&self) -> PathBuf {
        self.dir.join("ranges.json")
    }

    fn read_ranges(&self) -> StoreResult<Option<Ranges>> {
        let path = self.ranges_path();
        match fs::read(&path) {
            Ok(data) => decode_ranges(&data)
                .map(Some)
                .map_err(|msg| StoreError::BadRanges {
                    at: path.display().to_string(),
                    msg,
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(format!("cannot read {}", path.display()), e)),
        }
    }

    /// Every Service and EndpointSlice. With `sweep` (only under the lock)
    /// also removes temporaries, which then can only be a crashed writer's.
    fn snapshot(&self, sweep: bool) -> StoreResult<Snapshot> {
        let mut snap = Snapshot::default();
        if sweep {
            self.sweep(&self.dir);
        }
        for kind in KINDS {
            let root = self.dir.join(kind.plural());
            let list = |d: &Path| {
                fs::read_dir(d).map_err(|e| self.err(format!("cannot list {}", d.display()), e))
            };
            for ns in list(&root)? {
                let ns = ns.map_err(|e| self.err(format!("cannot list {}", root.display()), e))?;
                let Some(namespace) = ns.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if !ns.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let Ok(files) = fs::read_dir(ns.path()) else {
                    continue; // removed meanwhile (its last object deleted)
                };
                for f in files.flatten() {
                    let fname = f.file_name();
                    let Some(fname) = fname.to_str() else {
                        continue;
                    };
                    if fname.starts_with(TMP_PREFIX) {
                        if sweep {
                            let _ = fs::remove_file(f.path());
                        }
                        continue;
                    }
                    let Some(name) = fname.strip_suffix(".json") else {
                        continue;
                    };
                    let Ok(data) = fs::read(f.path()) else {
                        continue; // removed meanwhile
                    };
                    match decode(kind, &namespace, name, &data) {
                        Ok(obj) => snap.insert(obj),
                        Err(msg) => {
                            // The version is the file's mtime and size: a
                            // fixed file that breaks again is logged again.
                            let version = f.metadata().ok().map(|m| (m.modified().ok(), m.len()));
                            let id = format!("{}@{version:?}", f.path().display());
                            if self.warned.first(id) {
                                tracing::warn!(file = %f.path().display(), "ignoring unreadable {}: {msg}", kind.singular());
                            }
                        }
                    }
                }
            }
        }
        Ok(snap)
    }

    /// Removes the temporaries directly in `dir` (under the lock only).
    fn sweep(&self, dir: &Path) {
        for f in fs::read_dir(dir).into_iter().flatten().flatten() {
            if f.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(TMP_PREFIX))
            {
                let _ = fs::remove_file(f.path());
            }
        }
    }

    /// Writes all of `files` or, on an error before the renames, none.
    fn write_files(&self, files: Vec<(PathBuf, Vec<u8>)>) -> StoreResult<()> {
        let unstage = |staged: &[(PathBuf, PathBuf)]| {
            for (tmp, _) in staged {
                let _ = fs::remove_file(tmp);
            }
        };
        let mut staged: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(files.len());
        for (path, data) in files {
            let dir = path.parent().expect("a file under the store").to_path_buf();
            let tmp = dir.join(tmp_name());
            let res = (|| {
                fs::create_dir_all(&dir)?;
                let mut f = File::create(&tmp)?;
                f.write_all(&data)?;
                f.sync_all()
            })();
            if let Err(e) = res {
                let _ = fs::remove_file(&tmp);
                unstage(&staged);
                return Err(self.err(format!("cannot write {}", path.display()), e));
            }
            staged.push((tmp, path));
        }
        for (i, (tmp, path)) in staged.iter().enumerate() {
            if let Err(e) = fs::rename(tmp, path) {
                unstage(&staged[i..]);
                return Err(self.err(
                    format!(
                        "cannot write {} ({i} of {} files written; apply again)",
                        path.display(),
                        staged.len()
                    ),
                    e,
                ));
            }
        }
        Ok(())
    }

    fn apply(&self, objects: Vec<Object>, fallback: &Ranges) -> StoreResult<Vec<Applied>> {
        self.apply_with(objects, fallback, || {})
    }

    /// [`Inner::apply`], calling `before_write` under the lock between
    /// deciding and writing, where a second apply must wait: tests use it
    /// to run one there.
    fn apply_with(
        &self,
        objects: Vec<Object>,
        fallback: &Ranges,
        before_write: impl FnOnce(),
    ) -> StoreResult<Vec<Applied>> {
        let _lock = self.lock()?;
        let stored = self.read_ranges()?;
        let ranges = stored.clone().unwrap_or_else(|| fallback.clone());
        let plan = plan_apply(objects, &self.snapshot(true)?, &ranges)?;
        before_write();
        let mut files: Vec<(PathBuf, Vec<u8>)> = plan
            .writes
            .iter()
            .map(|o| (self.object_path(&o.reference()), encode(o, true)))
            .collect();
        if stored.is_none() && !files.is_empty() {
            files.push((self.ranges_path(), encode_ranges(&ranges)));
        }
        self.write_files(files)?;
        Ok(plan.applied)
    }

    fn delete(&self, refs: &[ObjectRef]) -> StoreResult<Vec<bool>> {
        let _lock = self.lock()?;
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            let path = self.object_path(r);
            match fs::remove_file(&path) {
                Ok(()) => out.push(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => out.push(false),
                Err(e) => return Err(self.err(format!("cannot delete {}", path.display()), e)),
            }
            // Only if empty; under the lock no writer is about to use it.
            if let Some(ns) = path.parent() {
                let _ = fs::remove_dir(ns);
            }
        }
        Ok(out)
    }

    fn publish_ranges(&self, given: &Ranges) -> StoreResult<()> {
        let _lock = self.lock()?;
        match ranges_to_publish(self.read_ranges()?, given)? {
            Some(r) => self.write_files(vec![(self.ranges_path(), encode_ranges(&r))]),
            None => Ok(()),
        }
    }
}

/// What renewing `reg`'s lease writes, given the entry stored for its
/// subnet: nothing while more than half of the lease remains. A record that
/// left or is gone is an error, so that the daemon stops or re-registers.
fn renewal(current: Option<Entry>, reg: &Registration, now_ms: u64) -> StoreResult<Option<Entry>> {
    let ttl = reg.ttl.as_millis() as u64;
    match current {
        Some(e) if e.record.node == reg.node && e.record.left => {
            Err(StoreError::Left(reg.node.clone()))
        }
        Some(e) if e.record.node == reg.node => {
            let due = e.expires_ms.saturating_sub(now_ms) <= ttl / 2;
            Ok(due.then(|| Entry {
                record: e.record,
                expires_ms: now_ms + ttl,
            }))
        }
        _ => Err(StoreError::NotRegistered(reg.node.clone())),
    }
}

/// Records that did not leave and whose lease has not expired.
pub fn live(all: Vec<(Ipv4Network, Entry)>, now_ms: u64) -> Vec<NodeRecord> {
    all.into_iter()
        .filter(|(_, e)| !e.record.left && e.expires_ms > now_ms)
        .map(|(_, e)| e.record)
        .collect()
}

async fn blocking<T: Send + 'static>(
    inner: &Arc<Inner>,
    f: impl FnOnce(&Inner) -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    let inner = inner.clone();
    match tokio::task::spawn_blocking(move || f(&inner)).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

impl Membership for FileStore {
    async fn register(&self, reg: &Registration) -> StoreResult<NodeRecord> {
        let reg = reg.clone();
        blocking(&self.inner, move |i| i.register(&reg)).await
    }

    async fn renew(&self) -> StoreResult<()> {
        blocking(&self.inner, |i| i.renew()).await
    }

    async fn leave(&self, node: &str) -> StoreResult<()> {
        let node = node.to_string();
        blocking(&self.inner, move |i| i.leave(&node)).await
    }
}

impl ClusterState for FileStore {
    async fn nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        blocking(&self.inner, |i| i.nodes()).await
    }

    async fn services(&self) -> StoreResult<Snapshot> {
        blocking(&self.inner, |i| i.snapshot(false)).await
    }

    async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl ServiceWrites for FileStore {
    async fn apply(&self, objects: Vec<Object>, fallback: &Ranges) -> StoreResult<Vec<Applied>> {
        let fallback = fallback.clone();
        blocking(&self.inner, move |i| i.apply(objects, &fallback)).await
    }

    async fn delete(&self, refs: &[ObjectRef]) -> StoreResult<Vec<bool>> {
        let refs = refs.to_vec();
        blocking(&self.inner, move |i| i.delete(&refs)).await
    }

    async fn publish_ranges(&self, ranges: &Ranges) -> StoreResult<()> {
        let ranges = ranges.clone();
        blocking(&self.inner, move |i| i.publish_ranges(&ranges)).await
    }

    async fn ranges(&self) -> StoreResult<Option<Ranges>> {
        blocking(&self.inner, |i| i.read_ranges()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{self, cluster_ip, objs, reg, said, small, svc, TempDir};
    use std::time::Duration;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn register_keep_and_leave() {
        let d = TempDir::new("fs1");
        rt().block_on(async {
            let s = FileStore::open(&d.0.join("store")).unwrap();
            let a = s
                .register(&reg("a", Duration::from_secs(60)))
                .await
                .unwrap();
            let b = s
                .register(&reg("b", Duration::from_secs(60)))
                .await
                .unwrap();
            assert_ne!(a.subnet, b.subnet);
            // Restart: same subnet.
            let s2 = FileStore::open(&d.0.join("store")).unwrap();
            let a2 = s2
                .register(&reg("a", Duration::from_secs(60)))
                .await
                .unwrap();
            assert_eq!(a2.subnet, a.subnet);
            assert_eq!(s2.nodes().await.unwrap().len(), 2);
            s2.leave("a").await.unwrap();
            let n = s2.nodes().await.unwrap();
            assert_eq!(n.len(), 1);
            assert_eq!(n[0].node, "b");
            // a left but its lease runs: c must not get a's subnet.
            let c = s2
                .register(&reg("c", Duration::from_secs(60)))
                .await
                .unwrap();
            assert_ne!(c.subnet, a.subnet);
            assert_ne!(c.subnet, b.subnet);
            assert!(matches!(
                s2.leave("zz").await,
                Err(StoreError::NotRegistered(_))
            ));
        });
    }

    #[test]
    fn expired_subnet_is_reused() {
        let d = TempDir::new("fs2");
        let s = FileStore::open(&d.0).unwrap();
        let a = s
            .inner
            .register(&reg("a", Duration::from_secs(60)))
            .unwrap();
        // Age a's record.
        let mut e: Entry =
            serde_json::from_slice(&fs::read(s.inner.path_of(a.subnet)).unwrap()).unwrap();
        e.expires_ms = now_ms() - 1;
        s.inner.write(&e).unwrap();
        assert!(s.inner.nodes().unwrap().is_empty());
        let b = s
            .inner
            .register(&reg("b", Duration::from_secs(60)))
            .unwrap();
        assert_eq!(b.subnet, a.subnet);
    }

    #[test]
    fn concurrent_registrations_get_distinct_subnets() {
        let d = TempDir::new("fs3");
        let dir = d.0.clone();
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let s = FileStore::open(&dir).unwrap();
                    s.inner
                        .register(&reg(&format!("n{i}"), Duration::from_secs(60)))
                        .unwrap()
                        .subnet
                })
            })
            .collect();
        let mut subnets: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        subnets.sort();
        subnets.dedup();
        assert_eq!(subnets.len(), 16);
    }

    /// Shortens the lease of `subnet`'s record so that the next renew writes;
    /// returns the record's path.
    fn make_due(s: &FileStore, subnet: Ipv4Network) -> PathBuf {
        let path = s.inner.path_of(subnet);
        let mut e: Entry = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        e.expires_ms = now_ms() + 1000;
        s.inner.write(&e).unwrap();
        path
    }

    #[test]
    fn renew_extends_and_detects_loss() {
        let d = TempDir::new("fs4");
        let s = FileStore::open(&d.0).unwrap();
        let a = s
            .inner
            .register(&reg("a", Duration::from_secs(10)))
            .unwrap();
        let path = make_due(&s, a.subnet);
        s.inner.renew().unwrap();
        let e: Entry = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert!(e.expires_ms > now_ms() + 9000);
        fs::remove_file(&path).unwrap();
        assert!(matches!(s.inner.renew(), Err(StoreError::NotRegistered(_))));
    }

    /// A `leave` from another handle (another process) that lands between
    /// renew's first look and its write is not undone: the node stays left,
    /// and renew says so, which stops the daemon's renewals.
    #[test]
    fn renew_does_not_undo_a_concurrent_leave() {
        let d = TempDir::new("fs5");
        let s = FileStore::open(&d.0).unwrap();
        let other = FileStore::open(&d.0).unwrap();
        let a = s
            .inner
            .register(&reg("a", Duration::from_secs(10)))
            .unwrap();
        let path = make_due(&s, a.subnet);
        let res = s.inner.renew_with(|| other.inner.leave("a").unwrap());
        let e: Entry = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert!(e.record.left, "renew undid the leave: {e:?}");
        assert!(matches!(res, Err(StoreError::Left(_))), "{res:?}");
    }

    #[test]
    fn missing_parent_is_an_error() {
        let e = FileStore::open(Path::new("/nonexistent-ferry-parent/store"))
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("parent directory does not exist"),
            "{e}"
        );
    }

    /// Every file under `dir` with its bytes.
    fn dump(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
        fn walk(d: &Path, out: &mut std::collections::BTreeMap<PathBuf, Vec<u8>>) {
            for e in fs::read_dir(d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    out.insert(e.path(), Vec::new());
                    walk(&e.path(), out);
                } else {
                    out.insert(e.path(), fs::read(e.path()).unwrap());
                }
            }
        }
        let mut out = Default::default();
        walk(dir, &mut out);
        out
    }

    #[test]
    fn services_round_trip() {
        let d = TempDir::new("fs-svc1");
        rt().block_on(async {
            let s = FileStore::open(&d.0).unwrap();
            testing::round_trip(&s).await;
            // The API's JSON, where the module doc says.
            let text = fs::read_to_string(d.0.join("services/default/web.json")).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["kind"], "Service");
            assert_eq!(v["apiVersion"], "v1");
            assert_eq!(v["spec"]["clusterIP"], "10.96.0.1");
            let ranges = fs::read_to_string(d.0.join("ranges.json")).unwrap();
            let v: serde_json::Value = serde_json::from_str(&ranges).unwrap();
            assert_eq!(
                v,
                serde_json::json!({"serviceCIDR": "10.96.0.0/29", "nodePortRange": "30000-30002"})
            );
        });
    }

    #[test]
    fn refused_applies_write_nothing() {
        let d = TempDir::new("fs-svc2");
        rt().block_on(async {
            let s = FileStore::open(&d.0).unwrap();
            testing::refusals_write_nothing(&s, || async { dump(&d.0) }).await;
        });
    }

    #[test]
    fn deletes() {
        let d = TempDir::new("fs-svc3");
        rt().block_on(async {
            let s = FileStore::open(&d.0).unwrap();
            testing::deletes(&s).await;
            // An emptied namespace directory goes too.
            assert!(!d.0.join("endpointslices/default").exists());
        });
    }

    /// B applies while A holds the lock between deciding and writing: B
    /// must wait, then decide on what A wrote.
    #[test]
    fn concurrent_applies_never_share_an_address() {
        let d = TempDir::new("fs-svc4");
        let a = FileStore::open(&d.0).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = d.0.clone();
        let applied_a = a
            .inner
            .apply_with(objs(&svc("a", "{}")), &small(), || {
                std::thread::spawn(move || {
                    let b = FileStore::open(&dir).unwrap();
                    tx.send(b.inner.apply(objs(&svc("b", "{}")), &small()))
                        .unwrap();
                });
                // Unlocked, B would be done long before this.
                let early = rx.recv_timeout(Duration::from_millis(500));
                assert!(early.is_err(), "B applied while A held the lock: {early:?}");
            })
            .unwrap();
        assert_eq!(said(&applied_a), ["service/default/a created"]);
        rx.recv().unwrap().unwrap();
        let snap = a.inner.snapshot(false).unwrap();
        assert_eq!(cluster_ip(&snap, "default/a"), "10.96.0.1");
        assert_eq!(cluster_ip(&snap, "default/b"), "10.96.0.2");
    }

    /// Half-written, misnamed or invalid objects are left out (and logged
    /// once); the others are read; temporaries are swept by the next apply.
    #[test]
    fn unreadable_objects_are_skipped() {
        let d = TempDir::new("fs-svc5");
        let s = FileStore::open(&d.0).unwrap();
        s.inner.apply(objs(testing::WEB), &small()).unwrap();
        let ns = d.0.join("services/default");
        fs::write(
            ns.join("half.json"),
            br#"{"apiVersion": "v1", "kind": "Serv"#,
        )
        .unwrap();
        fs::copy(ns.join("web.json"), ns.join("misnamed.json")).unwrap();
        fs::write(
            ns.join("bad.json"),
            br#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad", "namespace": "default"}, "spec": {"ports": [{"port": 0}]}}"#,
        )
        .unwrap();
        fs::write(ns.join(".tmp-1-1"), b"crashed writer").unwrap();
        let snap = s.inner.snapshot(false).unwrap();
        assert_eq!(snap.services.keys().collect::<Vec<_>>(), ["default/web"]);
        assert!(ns.join(".tmp-1-1").exists(), "a reader never sweeps");
        s.inner.apply(objs(&svc("more", "{}")), &small()).unwrap();
        assert!(!ns.join(".tmp-1-1").exists(), "the next writer sweeps");
        // The broken files hold no address: `more` got the next free one.
        let snap = s.inner.snapshot(false).unwrap();
        assert_eq!(cluster_ip(&snap, "default/more"), "10.96.0.2");
    }

    /// Writes into a namespace directory that is new, that appeared after
    /// the store was opened, and that existed before, all wake `changed()`.
    #[test]
    fn changed_covers_services_and_slices() {
        let d = TempDir::new("fs-svc6");
        rt().block_on(async {
            let s = FileStore::open(&d.0).unwrap();
            let other = FileStore::open(&d.0).unwrap();
            let ns_svc = |name: &str| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: prod}}\n"
                )
            };
            let apply = |yaml: String| {
                let o = &other;
                async move {
                    o.apply(objs(&yaml), &small()).await.unwrap();
                }
            };
            testing::wakes_on(&s, apply(ns_svc("a"))).await;
            // prod/ exists now; only a watch on it sees this one.
            testing::wakes_on(&s, apply(ns_svc("b"))).await;
            testing::wakes_on(&s, apply(testing::WEB.to_string())).await;
            let fresh = FileStore::open(&d.0).unwrap();
            testing::wakes_on(&fresh, apply(ns_svc("c"))).await;
            let slice = ObjectRef::parse(Kind::EndpointSlice, "web-1").unwrap();
            testing::wakes_on(&fresh, async {
                other.delete(&[slice]).await.unwrap();
            })
            .await;
        });
    }
}
