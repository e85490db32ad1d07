//! The file store: a directory every ferryd on one machine shares.
//!
//! ```text
//! DIR/.lock                      flock(2)ed around every read-modify-write
//! DIR/subnets/10.244.1.0-24.json {"record": {...}, "expiresMs": 1763780000000}
//! ```
//! Records are written to a temporary file and renamed into place, so a
//! reader never sees half a record. Changes are noticed with inotify.

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

use super::{ClusterState, Membership, Registration, StoreError, StoreResult};
use crate::record::{self, Allocation, NodeRecord, Reservation};

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
        fs::create_dir_all(&subnets).map_err(|e| err("cannot create", e))?;
        let notify = Arc::new(Notify::new());
        watch(&subnets, notify.clone()).map_err(|e| err("cannot watch (inotify)", e))?;
        Ok(FileStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                subnets,
                own: Mutex::new(None),
            }),
            notify,
        })
    }
}

/// A thread that wakes `notify` on every change in `dir`.
fn watch(dir: &Path, notify: Arc<Notify>) -> std::io::Result<()> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let ino = Inotify::init(InitFlags::IN_CLOEXEC)?;
    ino.add_watch(
        dir,
        AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_CLOSE_WRITE,
    )?;
    std::thread::Builder::new()
        .name("ferryd-inotify".into())
        .spawn(move || loop {
            match ino.read_events() {
                Ok(_) => notify.notify_one(),
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => {
                    // Fall back to the reconcile timer.
                    return;
                }
            }
        })?;
    Ok(())
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

    async fn changed(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{reg, TempDir};
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
}
