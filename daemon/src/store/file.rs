//! The file store: a directory every ferryd on one machine shares.
//!
//! ```text
//! DIR/.lock                      flock(2)ed around every read-modify-write
//! DIR/subnets/10.244.1.0-24.json {"record": {...}, "expiresMs": 1763780000000}
//! DIR/services/NS/_3f.json       a v1 List of the Services of NS whose names fall in bucket 3f
//! DIR/endpointslices/NS/_a0.json   the same for EndpointSlices
//! DIR/ranges.json                {"serviceCIDR": "10.96.0.0/12", "nodePortRange": "30000-32767"}
//! DIR/allocations                ip 10.96.0.10 NS/NAME, port 30080 NS/NAME (a line each)
//! DIR/.allocations-stamp         {"index": <hash of allocations>, "dirs": [...]}
//! ```
//! Services and slices are kept in buckets, 256 per namespace and kind,
//! by a hash of the name ([`bucket_file`]): each a `v1 List` of the API's
//! JSON, one object per line, in name order (`ferryctl apply -f` takes one
//! back). Not a file per object: creating 20k files was most of the time
//! `ferryctl apply` took for 10k Services, and on a filesystem without a
//! journal each new inode costs a scan past every one deleted recently.
//! A file per object, `NS/NAME.json` (how ferry stored them before, or
//! written by hand), is still read; its object's bucket wins over it, and a
//! write or delete of the object removes it.
//!
//! `allocations` is an index of what the Services hold, kept by
//! every apply and delete under the lock, so that an apply allocates
//! without reading every Service. It counts only while its stamp matches:
//! the stamp holds the index's hash and the modification times of
//! `services/` and its namespace directories after the last write, so a
//! Service file that another hand added, removed or renamed into place
//! makes the next apply read every Service again (and rebuild the index).
//! Records are written to a temporary file and renamed into place, so a
//! reader never sees half a record. Changes are noticed with inotify (on
//! `subnets/`, on `services/` and `endpointslices/` and on each namespace
//! directory below them, added as they appear).
//!
//! What `nodes()` and `state()` answer is held in memory (not so for
//! `ferryctl`'s store, [`FileStore::open_client`]): the directory is read
//! whole at start, then each inotify event names the one file to
//! read again. It is read whole again only when inotify's queue overflowed
//! (`IN_Q_OVERFLOW`: events were lost) and on the reconcile timer
//! ([`ClusterState::resync`]), which repairs anything else missed. A write
//! through this store updates the snapshot itself, so that its own next
//! read sees the write.
//!
//! An apply decides everything under the lock, then stages every file it
//! writes as a temporary next to its target and renames them all: an error
//! before the renames writes nothing. A crash between two renames leaves
//! part of the apply in place; applying the same file again completes it.
//! Temporaries left by a crash are removed by the next writer (under the
//! lock no other writer can be staging).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Service;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::Notify;

use super::snapshot::{self, Cache, Slot, Value};
use super::{
    checked, decode, decode_ranges, encode_ranges, encode_raw, parse_object, plan_apply_with,
    ranges_to_publish, Applied, ClusterState, Membership, Registration, ServiceWrites, StoreError,
    StoreResult, WarnOnce,
};
use crate::parallel::{map_runs, runs};
use crate::record::{self, Allocation, NodeRecord, Reservation};
use crate::service::alloc::{Ranges, Taken};
use crate::service::model::{Kind, Object, ObjectRef};
use crate::service::state::State;
use crate::service::Snapshot;

const KINDS: [Kind; 2] = [Kind::Service, Kind::EndpointSlice];
const TMP_PREFIX: &str = ".tmp-";
/// Up to this many files an apply fsyncs each ([`Inner::write_files`]).
const FSYNC_EACH: usize = 8;
const INDEX: &str = "allocations";
const STAMP: &str = ".allocations-stamp";
/// The first line of the index: another one (an older layout) is rebuilt.
const INDEX_HEADER: &str = "ferry allocations v1";

/// `allocations`: [`Taken`] as lines of `ip ADDRESS NS/NAME` and `port
/// PORT NS/NAME`, in order. Plain lines, not JSON: at 10k Services reading
/// the JSON took an apply 7 ms, most of its time.
fn encode_index(t: &Taken) -> Vec<u8> {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(40 * (t.ips.len() + t.ports.len()) + 32);
    out.push_str(INDEX_HEADER);
    out.push('\n');
    for (ip, k) in &t.ips {
        let _ = writeln!(out, "ip {ip} {k}");
    }
    for (port, k) in &t.ports {
        let _ = writeln!(out, "port {port} {k}");
    }
    out.into_bytes()
}

fn decode_index(data: &[u8]) -> Option<Taken> {
    let text = std::str::from_utf8(data).ok()?;
    let mut lines = text.lines();
    if lines.next()? != INDEX_HEADER {
        return None;
    }
    let (mut ips, mut ports) = (Vec::new(), Vec::new());
    for line in lines {
        let (what, rest) = line.split_once(' ')?;
        let (v, owner) = rest.split_once(' ')?;
        match what {
            "ip" => ips.push((v.parse().ok()?, owner.to_string())),
            "port" => ports.push((v.parse().ok()?, owner.to_string())),
            _ => return None,
        }
    }
    // Written in order: the maps are built in bulk.
    Some(Taken {
        ips: ips.into_iter().collect(),
        ports: ports.into_iter().collect(),
    })
}

/// The paths in directory `d` (none if it cannot be listed).
fn list(d: &Path) -> Vec<PathBuf> {
    fs::read_dir(d)
        .into_iter()
        .flatten()
        .flatten()
        .map(|de| de.path())
        .collect()
}

/// Buckets per namespace and kind.
const BUCKETS: u64 = 256;

/// The file of the bucket that holds the objects named `name`: `_HH.json`.
/// No Kubernetes name has an underscore, so a bucket is never taken for
/// the file of one object.
fn bucket_file(name: &str) -> String {
    format!("_{:02x}.json", nft::fnv1a64(name.as_bytes()) % BUCKETS)
}

fn is_bucket(file: &str) -> bool {
    let hex = |c: u8| matches!(c, b'0'..=b'9' | b'a'..=b'f');
    let b = file.as_bytes();
    b.len() == 8 && b[0] == b'_' && hex(b[1]) && hex(b[2]) && &b[3..] == b".json"
}

/// The items of a bucket file, which must be a `v1 List`.
fn bucket_items(data: &[u8]) -> Result<Vec<&RawValue>, String> {
    #[derive(Deserialize)]
    struct List<'a> {
        kind: String,
        #[serde(borrow)]
        items: Vec<&'a RawValue>,
    }
    let list: List = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    if list.kind != "List" {
        return Err(format!("kind {}, not List", list.kind));
    }
    Ok(list.items)
}

/// A bucket file of `items`, one a line.
fn encode_bucket<'a>(items: impl IntoIterator<Item = &'a RawValue>) -> Vec<u8> {
    let mut out = br#"{"apiVersion":"v1","kind":"List","items":["#.to_vec();
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'\n');
        out.extend_from_slice(item.get().as_bytes());
    }
    out.extend_from_slice(b"\n]}\n");
    out
}

/// The name an item of a bucket carries.
fn item_name(item: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct Meta {
        name: Option<String>,
    }
    #[derive(Deserialize)]
    struct Item {
        metadata: Option<Meta>,
    }
    serde_json::from_str::<Item>(item.get())
        .ok()?
        .metadata?
        .name
}

/// An object of the bucket `file` of `namespace`, checked as the object of
/// a file is ([`decode`]) and in the bucket its name gives.
fn decode_item(kind: Kind, namespace: &str, file: &str, item: &RawValue) -> Result<Object, String> {
    let obj = parse_object(kind, item.get().as_bytes())?;
    let name = obj.reference().name;
    let home = bucket_file(&name);
    if home != file {
        return Err(format!("{} {name} belongs in {home}", kind.singular()));
    }
    checked(obj, kind, namespace, &name)
}

/// A bucket as a writer reads it: every item, by the name it carries.
type Items = BTreeMap<String, Box<RawValue>>;

/// What a writer reads of the store for the objects it writes or deletes.
#[derive(Default)]
struct Stored {
    /// Their stored versions (those that exist and are readable).
    snap: Snapshot,
    /// Every item of the buckets they fall in (empty: no such file yet).
    buckets: BTreeMap<PathBuf, Items>,
    /// Files of one object among them.
    loose: BTreeSet<PathBuf>,
}

/// What a file under the store holds.
#[derive(Debug, PartialEq)]
enum FileKind {
    /// A node's record.
    Record(Slot),
    /// One object (how ferry stored them before buckets, or by hand).
    Loose(Slot),
    Bucket {
        kind: Kind,
        namespace: String,
    },
}

/// What makes `allocations` count (module doc).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Stamp {
    index: u64,
    /// `services/` (named "") and each namespace directory below it, with
    /// its modification time (seconds, nanoseconds).
    dirs: Vec<(String, i64, i64)>,
}

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
    cache: Mutex<Cache>,
    /// Held by a full rescan and by each batch of per-file reads: a file
    /// read for an event is read after a rescan that may have read it
    /// before its change, never overwritten by it. Holds what each bucket
    /// held when last read, so that a read of it again knows what left.
    scan: Mutex<HashMap<PathBuf, BTreeSet<Slot>>>,
    /// Full rescans since open (the first one included).
    rescans: AtomicU64,
    /// Watched and held in memory (ferryd); otherwise every read goes to
    /// the directory (ferryctl, [`FileStore::open_client`]).
    watched: bool,
    /// Tests hold the inotify reader here, so that events pile up in the
    /// kernel's queue.
    #[cfg(test)]
    hold: (Mutex<Hold>, std::sync::Condvar),
}

#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    Run,
    Wanted,
    Held,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl FileStore {
    /// Opens (creating if needed) the store directory and starts watching it.
    pub fn open(dir: &Path) -> StoreResult<FileStore> {
        FileStore::open_with(dir, true)
    }

    /// Opens the store for a one-shot client (`ferryctl`): nothing is
    /// watched or held in memory, every read goes to the directory. Reading
    /// 10k Services into a snapshot first cost an apply more than its work.
    pub fn open_client(dir: &Path) -> StoreResult<FileStore> {
        FileStore::open_with(dir, false)
    }

    fn open_with(dir: &Path, watch: bool) -> StoreResult<FileStore> {
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
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            subnets,
            own: Mutex::new(None),
            warned: WarnOnce::default(),
            cache: Mutex::default(),
            scan: Mutex::default(),
            rescans: AtomicU64::new(0),
            watched: watch,
            #[cfg(test)]
            hold: (Mutex::new(Hold::Run), std::sync::Condvar::new()),
        });
        // Watches first, then the first read: a change between the two is
        // both read and reported.
        if watch {
            Reader::start(inner.clone(), notify.clone())
                .map_err(|e| err("cannot watch (inotify)", e))?;
        }
        Ok(FileStore { inner, notify })
    }
}

/// A directory inotify watches.
enum Dir {
    Subnets,
    /// `services/` or `endpointslices/`: namespace directories appear here.
    Root(Kind),
    Namespace(Kind, String),
}

/// The thread that reads inotify's events and, per file they name, reads
/// that file again into the snapshot (a bucket: each object it holds or
/// held); wakes `notify` on every change.
/// inotify is not recursive: a namespace directory that appears gets its
/// own watch, then is read, so that files renamed into it before the watch
/// are read and every one after is reported.
struct Reader {
    ino: nix::sys::inotify::Inotify,
    dirs: HashMap<nix::sys::inotify::WatchDescriptor, Dir>,
    inner: Arc<Inner>,
    notify: Arc<Notify>,
}

const CHANGES: nix::sys::inotify::AddWatchFlags = nix::sys::inotify::AddWatchFlags::IN_MOVED_TO
    .union(nix::sys::inotify::AddWatchFlags::IN_MOVED_FROM)
    .union(nix::sys::inotify::AddWatchFlags::IN_DELETE)
    .union(nix::sys::inotify::AddWatchFlags::IN_CLOSE_WRITE);

impl Reader {
    fn start(inner: Arc<Inner>, notify: Arc<Notify>) -> std::io::Result<()> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let ino = Inotify::init(InitFlags::IN_CLOEXEC)?;
        let mut dirs = HashMap::new();
        dirs.insert(ino.add_watch(&inner.subnets, CHANGES)?, Dir::Subnets);
        for kind in KINDS {
            let root = inner.dir.join(kind.plural());
            let wd = ino.add_watch(&root, CHANGES | AddWatchFlags::IN_CREATE)?;
            dirs.insert(wd, Dir::Root(kind));
        }
        let mut r = Reader {
            ino,
            dirs,
            inner,
            notify,
        };
        r.rescan();
        std::thread::Builder::new()
            .name("ferryd-inotify".into())
            .spawn(move || r.run())?;
        Ok(())
    }

    /// Watches every namespace directory (again: inotify gives a watched
    /// directory its existing descriptor), then reads everything.
    fn rescan(&mut self) {
        for kind in KINDS {
            let root = self.inner.dir.join(kind.plural());
            for de in fs::read_dir(&root).into_iter().flatten().flatten() {
                let Some(ns) = de.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if de.file_type().is_ok_and(|t| t.is_dir()) {
                    if let Ok(wd) = self.ino.add_watch(&de.path(), CHANGES) {
                        self.dirs.insert(wd, Dir::Namespace(kind, ns));
                    }
                }
            }
        }
        if self.inner.rescan() {
            self.notify.notify_one();
        }
    }

    fn run(mut self) {
        use nix::sys::inotify::AddWatchFlags as F;
        loop {
            #[cfg(test)]
            self.inner.wait_if_held();
            let events = match self.ino.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    // The reconcile timer's rescans still repair.
                    tracing::warn!(
                        "file store: reading inotify events: {e}; rescanning on the timer only"
                    );
                    return;
                }
            };
            let mut overflow = false;
            let mut touched = BTreeSet::new();
            for ev in events {
                if ev.mask.contains(F::IN_Q_OVERFLOW) {
                    overflow = true;
                    continue;
                }
                if ev.mask.contains(F::IN_IGNORED) {
                    self.dirs.remove(&ev.wd);
                    continue;
                }
                let (Some(dir), Some(name)) = (self.dirs.get(&ev.wd), ev.name.as_ref()) else {
                    continue;
                };
                let Some(name) = name.to_str() else { continue };
                let is_dir = ev.mask.contains(F::IN_ISDIR);
                match dir {
                    Dir::Root(kind) if is_dir => {
                        let kind = *kind;
                        if ev.mask.intersects(F::IN_CREATE | F::IN_MOVED_TO) {
                            self.namespace_appeared(kind, name, &mut touched);
                        } else if ev.mask.contains(F::IN_MOVED_FROM) {
                            // Its files went with it, unreported.
                            overflow = true;
                        }
                        // Deleted: only once emptied, its files' deletes came first.
                    }
                    Dir::Root(_) => {}
                    Dir::Subnets => {
                        touched.insert(self.inner.subnets.join(name));
                    }
                    Dir::Namespace(kind, ns) => {
                        touched.insert(self.inner.dir.join(kind.plural()).join(ns).join(name));
                    }
                }
            }
            if overflow {
                tracing::info!("file store: inotify's queue overflowed; reading everything again");
                self.rescan();
                continue;
            }
            if self.inner.refresh(touched) {
                self.notify.notify_one();
            }
        }
    }

    fn namespace_appeared(&mut self, kind: Kind, ns: &str, touched: &mut BTreeSet<PathBuf>) {
        let path = self.inner.dir.join(kind.plural()).join(ns);
        // Gone again already: nothing to watch or read.
        let Ok(wd) = self.ino.add_watch(&path, CHANGES) else {
            return;
        };
        self.dirs.insert(wd, Dir::Namespace(kind, ns.to_string()));
        touched.extend(
            fs::read_dir(&path)
                .into_iter()
                .flatten()
                .flatten()
                .map(|f| f.path()),
        );
    }
}

/// Below this many files an apply stages and renames them on one thread.
const PARALLEL_FROM: usize = 512;

/// How many threads stage or rename `n` files: the cores, up to 4. Most of
/// an apply of 10k Services was system time spent on 20k creates and 20k
/// renames, which the kernel runs on as many cores as call it.
fn workers(n: usize) -> usize {
    if n < PARALLEL_FROM {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |c| c.get().min(4))
}

/// Writes each file to a temporary next to it (synced with `sync_each`):
/// (temporary, target) in the order given. On an error, every temporary
/// made is removed and the file that failed is named.
fn stage_all(
    files: Vec<(PathBuf, Vec<u8>)>,
    sync_each: bool,
) -> Result<Vec<(PathBuf, PathBuf)>, (PathBuf, std::io::Error)> {
    let failed = std::sync::atomic::AtomicBool::new(false);
    let stage = |part: &[(PathBuf, Vec<u8>)]| {
        let mut staged = Vec::with_capacity(part.len());
        for (path, data) in part {
            if failed.load(Ordering::Relaxed) {
                break;
            }
            let tmp = path.with_file_name(tmp_name());
            let res = File::create(&tmp).and_then(|mut f| {
                f.write_all(data)?;
                if sync_each {
                    f.sync_all()?;
                }
                Ok(())
            });
            if let Err(e) = res {
                failed.store(true, Ordering::Relaxed);
                let _ = fs::remove_file(&tmp);
                return (staged, Some((path.clone(), e)));
            }
            staged.push((tmp, path.clone()));
        }
        (staged, None)
    };
    let parts = map_runs(&files, workers(files.len()), stage);
    let mut staged = Vec::with_capacity(files.len());
    let mut error = None;
    for (part, e) in parts {
        staged.extend(part);
        error = error.or(e);
    }
    match error {
        None => Ok(staged),
        Some(e) => {
            unstage(&staged);
            Err(e)
        }
    }
}

fn unstage(staged: &[(PathBuf, PathBuf)]) {
    for (tmp, _) in staged {
        let _ = fs::remove_file(tmp);
    }
}

/// Renames every temporary of `staged` to its target, directory by
/// directory in the order given (those of one directory on several
/// threads). On an error nothing more is renamed, the temporaries left are
/// removed, and the answer is how many files were renamed before and the
/// one that failed.
fn rename_all(staged: &[(PathBuf, PathBuf)]) -> Result<(), (usize, PathBuf, std::io::Error)> {
    let (mut done, mut at) = (0, 0);
    for group in staged.chunk_by(|a, b| a.1.parent() == b.1.parent()) {
        at += group.len();
        let failed = std::sync::atomic::AtomicBool::new(false);
        let rename = |part: &[(PathBuf, PathBuf)]| {
            for (i, (tmp, path)) in part.iter().enumerate() {
                if failed.load(Ordering::Relaxed) {
                    return (i, None);
                }
                if let Err(e) = fs::rename(tmp, path) {
                    failed.store(true, Ordering::Relaxed);
                    return (i, Some((path.clone(), e)));
                }
            }
            (part.len(), None)
        };
        let k = workers(group.len());
        let parts = map_runs(group, k, rename);
        let mut error = None;
        for (part, (renamed, e)) in runs(group, k).zip(parts) {
            // A part stops short only once another failed.
            done += renamed;
            unstage(&part[renamed..]);
            error = error.or(e);
        }
        if let Some((path, e)) = error {
            // The directories after this one were not started.
            unstage(&staged[at..]);
            return Err((done, path, e));
        }
    }
    Ok(())
}

fn tmp_name() -> String {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    format!(
        "{TMP_PREFIX}{}-{}",
        PID.get_or_init(std::process::id),
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
        self.refresh([path]);
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
        if !self.watched {
            return Ok(live(self.read_all()?, now_ms()));
        }
        Ok(super::records_of(&self.node_set()?))
    }

    fn node_set(&self) -> StoreResult<super::NodeSet> {
        if !self.watched {
            return Ok(super::node_set_of(self.nodes()?));
        }
        let mut cache = self.cache.lock().expect("not poisoned");
        Ok(cache.live_nodes(now_ms()))
    }

    fn file_of(&self, slot: &Slot) -> PathBuf {
        match slot {
            Slot::Node(subnet) => self.path_of(*subnet),
            Slot::Object {
                kind,
                namespace,
                name,
            } => self
                .dir
                .join(kind.plural())
                .join(namespace)
                .join(format!("{name}.json")),
        }
    }

    /// What the file of `slot` (its own: a record's, or an object's file of
    /// one object) holds now, as the snapshot keeps it: `None` when it is
    /// gone or unreadable.
    fn read_slot(&self, slot: &Slot) -> Option<Value> {
        let path = self.file_of(slot);
        let data = fs::read(&path).ok()?;
        let res = match slot {
            Slot::Node(subnet) => match serde_json::from_slice::<Entry>(&data) {
                Ok(e) if e.record.subnet == *subnet => Ok(Value::Node(snapshot::Node {
                    record: e.record,
                    expires_ms: e.expires_ms,
                })),
                Ok(e) => Err(format!("holds subnet {}", e.record.subnet)),
                Err(e) => Err(e.to_string()),
            },
            Slot::Object {
                kind,
                namespace,
                name,
            } => decode(*kind, namespace, name, &data).map(Value::Object),
        };
        res.map_err(|msg| self.unreadable(&path, &msg)).ok()
    }

    /// Logs that `path` holds something unreadable, once per version of the
    /// file (its mtime and size: a fixed file that breaks again is logged
    /// again).
    fn unreadable(&self, path: &Path, msg: &str) {
        let version = fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()));
        if self.warned.first(format!("{}@{version:?}", path.display())) {
            tracing::warn!(file = %path.display(), "ignoring unreadable record: {msg}");
        }
    }

    /// The objects of the bucket at `path`, of `kind` in `namespace`; what
    /// is unreadable in it is logged and left out.
    fn read_bucket(&self, kind: Kind, namespace: &str, path: &Path) -> Vec<Object> {
        let Ok(data) = fs::read(path) else {
            return Vec::new();
        };
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
        let mut objects = Vec::new();
        let mut bad = Vec::new();
        match bucket_items(&data) {
            Ok(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    match decode_item(kind, namespace, file, item) {
                        Ok(o) => objects.push(o),
                        Err(msg) => bad.push(format!("item {i}: {msg}")),
                    }
                }
            }
            Err(msg) => bad.push(format!("not a v1 List: {msg}")),
        }
        if !bad.is_empty() {
            self.unreadable(path, &bad.join("; "));
        }
        objects
    }

    /// The bucket of an object's slot.
    fn bucket_of(&self, kind: Kind, namespace: &str, name: &str) -> PathBuf {
        self.dir
            .join(kind.plural())
            .join(namespace)
            .join(bucket_file(name))
    }

    /// What the file at `path` holds now, slot by slot; `held`: what each
    /// bucket held when last read, kept here. A bucket gives each object it
    /// holds and, for each it no longer holds, that object's file of one
    /// object (if any); such a file counts only while its bucket does not
    /// hold the object.
    fn read_file(
        &self,
        path: &Path,
        held: &mut HashMap<PathBuf, BTreeSet<Slot>>,
    ) -> Vec<(Slot, Option<Value>)> {
        match self.file_kind(path) {
            None => Vec::new(),
            Some(FileKind::Record(slot)) => vec![(slot.clone(), self.read_slot(&slot))],
            Some(FileKind::Loose(slot)) => {
                let Slot::Object {
                    kind,
                    namespace,
                    name,
                } = &slot
                else {
                    return Vec::new();
                };
                let bucket = self.bucket_of(*kind, namespace, name);
                if held.get(&bucket).is_some_and(|h| h.contains(&slot)) {
                    return Vec::new();
                }
                vec![(slot.clone(), self.read_slot(&slot))]
            }
            Some(FileKind::Bucket { kind, namespace }) => {
                let mut now = BTreeSet::new();
                let mut out = Vec::new();
                for o in self.read_bucket(kind, &namespace, path) {
                    let slot = Slot::Object {
                        kind,
                        namespace: namespace.clone(),
                        name: o.reference().name,
                    };
                    now.insert(slot.clone());
                    out.push((slot, Some(Value::Object(o))));
                }
                for slot in held.remove(path).unwrap_or_default().difference(&now) {
                    out.push((slot.clone(), self.read_slot(slot)));
                }
                if !now.is_empty() {
                    held.insert(path.to_path_buf(), now);
                }
                out
            }
        }
    }

    /// Reads the files at `paths` again into the snapshot; true if that
    /// changed it.
    fn refresh(&self, paths: impl IntoIterator<Item = PathBuf>) -> bool {
        if !self.watched {
            return false;
        }
        let mut held = self.scan.lock().expect("not poisoned");
        let mut changed = false;
        for path in paths {
            for (slot, v) in self.read_file(&path, &mut held) {
                changed |= self.cache.lock().expect("not poisoned").set(slot, v);
            }
        }
        changed
    }

    /// What the file at `path` under the store is, if it may hold records.
    fn file_kind(&self, path: &Path) -> Option<FileKind> {
        let rel = path.strip_prefix(&self.dir).ok()?.to_str()?;
        let (dir, file) = rel.rsplit_once('/')?;
        if file.starts_with(TMP_PREFIX) {
            return None;
        }
        if is_bucket(file) {
            let (kind, namespace) = dir.split_once('/')?;
            let kind = KINDS.into_iter().find(|k| k.plural() == kind)?;
            if namespace.is_empty() || namespace.contains('/') {
                return None;
            }
            return Some(FileKind::Bucket {
                kind,
                namespace: namespace.to_string(),
            });
        }
        let slot = Slot::of(rel.strip_suffix(".json")?)?;
        Some(match slot {
            Slot::Node(_) => FileKind::Record(slot),
            Slot::Object { .. } => FileKind::Loose(slot),
        })
    }

    /// Reads everything into a fresh snapshot and takes it; true if that
    /// changed anything.
    ///
    /// File by file into the snapshot itself, then what is no longer there
    /// goes: building a second snapshot to swap in cost 10 MiB at 10k
    /// Services on every reconcile interval, and kept ferryd's heap that
    /// large.
    fn rescan(&self) -> bool {
        let mut held = self.scan.lock().expect("not poisoned");
        held.clear();
        let mut seen = BTreeSet::new();
        let mut changed = false;
        for path in self.files() {
            for (slot, v) in self.read_file(&path, &mut held) {
                seen.insert(slot.clone());
                changed |= self.cache.lock().expect("not poisoned").set(slot, v);
            }
        }
        changed |= self.cache.lock().expect("not poisoned").retain(&seen);
        self.rescans.fetch_add(1, Ordering::Relaxed);
        changed
    }

    /// Every file of the directory that may hold records (a directory that
    /// cannot be listed holds none).
    fn files(&self) -> Vec<PathBuf> {
        let mut files = list(&self.subnets);
        files.extend(self.object_files().unwrap_or_default());
        files
    }

    /// Every file in the namespace directories of Services and slices; an
    /// error if `services/` or `endpointslices/` cannot be listed.
    fn object_files(&self) -> StoreResult<Vec<PathBuf>> {
        let mut files = Vec::new();
        for kind in KINDS {
            let root = self.dir.join(kind.plural());
            let namespaces = fs::read_dir(&root)
                .map_err(|e| self.err(format!("cannot list {}", root.display()), e))?;
            for ns in namespaces.flatten() {
                // Removed meanwhile (its last object deleted): nothing.
                files.extend(list(&ns.path()));
            }
        }
        Ok(files)
    }

    /// Everything the directory holds, read now into a fresh snapshot.
    #[cfg(test)]
    fn scanned(&self) -> Cache {
        let mut fresh = Cache::default();
        let mut held = HashMap::new();
        for path in self.files() {
            for (slot, v) in self.read_file(&path, &mut held) {
                fresh.set(slot, v);
            }
        }
        fresh
    }

    #[cfg(test)]
    fn wait_if_held(&self) {
        let (m, cv) = &self.hold;
        let mut h = m.lock().unwrap();
        if *h == Hold::Wanted {
            *h = Hold::Held;
            cv.notify_all();
            while *h != Hold::Run {
                h = cv.wait(h).unwrap();
            }
        }
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

    /// Every Service and EndpointSlice, read as ferryd reads them
    /// ([`Inner::read_file`]). With `sweep` (only under the lock) also
    /// removes temporaries, which then can only be a crashed writer's.
    fn snapshot(&self, sweep: bool) -> StoreResult<Snapshot> {
        if sweep {
            self.sweep(&self.dir);
        }
        let mut snap = Snapshot::default();
        let mut held = HashMap::new();
        for path in self.object_files()? {
            let tmp = path
                .file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(TMP_PREFIX));
            if tmp && sweep {
                let _ = fs::remove_file(&path);
            }
            // A file of one object read before its bucket is replaced by the
            // bucket's version; read after it, it is not read at all.
            for (_, v) in self.read_file(&path, &mut held) {
                if let Some(Value::Object(o)) = v {
                    snap.insert(o);
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
    /// They are renamed into place in their order, one directory after the
    /// other: a directory's files only once those of the directories before
    /// it are all in place.
    fn write_files(&self, files: Vec<(PathBuf, Vec<u8>)>) -> StoreResult<()> {
        // Each directory is made once, before anything is staged: a
        // create_dir_all per file was two system calls of 20k extra.
        let mut made = BTreeSet::new();
        for (path, _) in &files {
            let dir = path.parent().expect("a file under the store");
            if made.insert(dir) {
                fs::create_dir_all(dir)
                    .map_err(|e| self.err(format!("cannot write {}", path.display()), e))?;
            }
        }
        drop(made);
        // A few files are synced each on its own; many are synced together
        // with one syncfs(2) before any rename: an fsync per file made
        // applying 10k Services take half a minute, and a syncfs waits for
        // whatever else the filesystem has dirty (30 ms for a two-file
        // apply while a build ran).
        let one = files.len() <= FSYNC_EACH;
        let n = files.len();
        let staged = match stage_all(files, one) {
            Ok(staged) => staged,
            Err((path, e)) => return Err(self.err(format!("cannot write {}", path.display()), e)),
        };
        if let Some((tmp, _)) = staged.first().filter(|_| !one) {
            let synced =
                File::open(tmp).and_then(|f| nix::unistd::syncfs(&f).map_err(std::io::Error::from));
            if let Err(e) = synced {
                unstage(&staged);
                return Err(self.err("cannot sync the store's files", e));
            }
        }
        if let Err((written, path, e)) = rename_all(&staged) {
            return Err(self.err(
                format!(
                    "cannot write {} ({written} of {n} files written; apply again)",
                    path.display()
                ),
                e,
            ));
        }
        Ok(())
    }

    fn apply(&self, objects: Vec<Object>, fallback: &Ranges) -> StoreResult<Vec<Applied>> {
        self.apply_with(objects, fallback, || {})
    }

    /// The modification times of `services/` and its namespace directories.
    fn services_dirs(&self) -> Option<Vec<(String, i64, i64)>> {
        use std::os::unix::fs::MetadataExt;
        let root = self.dir.join(Kind::Service.plural());
        let md = fs::metadata(&root).ok()?;
        let mut dirs = vec![(String::new(), md.mtime(), md.mtime_nsec())];
        for de in fs::read_dir(&root).ok()? {
            let de = de.ok()?;
            let md = de.metadata().ok()?;
            if md.is_dir() {
                dirs.push((
                    de.file_name().to_str()?.to_string(),
                    md.mtime(),
                    md.mtime_nsec(),
                ));
            }
        }
        dirs.sort();
        Some(dirs)
    }

    /// The index of what the Services hold, if it still counts (under the
    /// lock only).
    fn read_index(&self) -> Option<Taken> {
        let stamp: Stamp = serde_json::from_slice(&fs::read(self.dir.join(STAMP)).ok()?).ok()?;
        if Some(&stamp.dirs) != self.services_dirs().as_ref() {
            return None;
        }
        let data = fs::read(self.dir.join(INDEX)).ok()?;
        if nft::fnv1a64(&data) != stamp.index {
            return None;
        }
        decode_index(&data)
    }

    /// Writes `t` as the index, stamped as matching the directories as
    /// they are now (under the lock, after the objects' renames). Best
    /// effort and not synced: an index without its stamp is rebuilt.
    fn write_index(&self, t: &Taken) {
        let stamp_path = self.dir.join(STAMP);
        let data = encode_index(t);
        let put = |path: &Path, data: &[u8]| {
            let tmp = self.dir.join(tmp_name());
            let r = fs::write(&tmp, data).and_then(|()| fs::rename(&tmp, path));
            if r.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            r
        };
        // The stamp goes first: a crash between the two leaves a stamp
        // that the old index does not match.
        let written = self.services_dirs().is_some_and(|dirs| {
            let stamp = Stamp {
                index: nft::fnv1a64(&data),
                dirs,
            };
            let s = serde_json::to_vec(&stamp).expect("serialisable");
            put(&stamp_path, &s).is_ok() && put(&self.dir.join(INDEX), &data).is_ok()
        });
        if !written {
            let _ = fs::remove_file(&stamp_path);
        }
    }

    /// The items of the bucket at `path`, for a writer (under the lock): a
    /// file that is not a `v1 List`, or holds an item without a name, is
    /// refused rather than written over.
    fn read_items(&self, path: &Path) -> StoreResult<Items> {
        let data = match fs::read(path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Items::new()),
            Err(e) => return Err(self.err(format!("cannot read {}", path.display()), e)),
        };
        let refuse = |msg: String| {
            self.err(
                format!("cannot update {}: {msg}; fix or remove it", path.display()),
                std::io::Error::from(std::io::ErrorKind::InvalidData),
            )
        };
        let mut items = Items::new();
        for (i, item) in bucket_items(&data)
            .map_err(|m| refuse(format!("not a v1 List ({m})")))?
            .into_iter()
            .enumerate()
        {
            let name = item_name(item).ok_or_else(|| refuse(format!("item {i} has no name")))?;
            items.insert(name, item.to_owned());
        }
        Ok(items)
    }

    /// What a writer needs of the store for `refs` (under the lock): their
    /// stored versions, every item of their buckets, their files of one
    /// object. Each namespace directory is listed once, and only the files
    /// it holds are read: a first apply of 10k Services tried 20k files
    /// that were not there.
    fn read_stored(&self, refs: impl IntoIterator<Item = ObjectRef>) -> StoreResult<Stored> {
        let mut listed: HashMap<PathBuf, HashSet<OsString>> = HashMap::new();
        let mut st = Stored::default();
        for r in refs {
            let dir = self.dir.join(r.kind.plural()).join(&r.namespace);
            if !listed.contains_key(&dir) {
                let names = match fs::read_dir(&dir) {
                    Ok(rd) => rd.flatten().map(|de| de.file_name()).collect(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
                    Err(e) => return Err(self.err(format!("cannot list {}", dir.display()), e)),
                };
                listed.insert(dir.clone(), names);
            }
            let names = &listed[&dir];
            let file = bucket_file(&r.name);
            let bucket = dir.join(&file);
            if !st.buckets.contains_key(&bucket) {
                let items = if names.contains(bucket.file_name().expect("a file")) {
                    self.read_items(&bucket)?
                } else {
                    Items::new()
                };
                st.buckets.insert(bucket.clone(), items);
            }
            let in_bucket = st.buckets[&bucket]
                .get(&r.name)
                .and_then(|item| decode_item(r.kind, &r.namespace, &file, item).ok());
            let loose = self.object_path(&r);
            let has_loose = names.contains(loose.file_name().expect("a file"));
            let stored = match in_bucket {
                Some(obj) => Some(obj),
                None if has_loose => fs::read(&loose)
                    .ok()
                    .and_then(|d| decode(r.kind, &r.namespace, &r.name, &d).ok()),
                None => None,
            };
            if let Some(obj) = stored {
                st.snap.insert(obj);
            }
            if has_loose {
                st.loose.insert(loose);
            }
        }
        Ok(st)
    }

    /// Writes the buckets of `touched` as `buckets` holds them (one left
    /// empty is removed), slices' before Services', then removes the files
    /// of one object in `loose` (their objects are in their buckets now, or
    /// deleted). Answers the files to read again.
    fn write_buckets(
        &self,
        buckets: &BTreeMap<PathBuf, Items>,
        touched: &BTreeSet<PathBuf>,
        loose: &BTreeSet<PathBuf>,
        extra: Option<(PathBuf, Vec<u8>)>,
    ) -> StoreResult<Vec<PathBuf>> {
        let slices_first =
            |p: &&PathBuf| !p.starts_with(self.dir.join(Kind::EndpointSlice.plural()));
        let mut order: Vec<&PathBuf> = touched.iter().collect();
        order.sort_by_key(slices_first);
        let (full, empty): (Vec<&PathBuf>, Vec<&PathBuf>) =
            order.into_iter().partition(|p| !buckets[*p].is_empty());
        let mut files: Vec<(PathBuf, Vec<u8>)> = full
            .into_iter()
            .map(|p| (p.clone(), encode_bucket(buckets[p].values().map(|b| &**b))))
            .collect();
        files.extend(extra);
        self.write_files(files)?;
        for p in empty.iter().copied().chain(loose) {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.err(format!("cannot delete {}", p.display()), e)),
            }
        }
        Ok(touched.iter().chain(loose).cloned().collect())
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
        let Stored {
            snap: given,
            mut buckets,
            loose,
        } = self.read_stored(objects.iter().map(Object::reference))?;
        // With the index, only the objects given are read; without it,
        // every Service and slice (and the index is written anew).
        let (current, taken, rebuilt) = match self.read_index() {
            Some(t) => (given, t, false),
            None => {
                let snap = self.snapshot(true)?;
                let t = Taken::of(&snap.services);
                (snap, t, true)
            }
        };
        let mut index = taken.clone();
        let plan = plan_apply_with(objects, &current, taken, &ranges)?;
        before_write();
        let encode_all = |part: &[Object]| -> Vec<(ObjectRef, Box<RawValue>)> {
            part.iter()
                .map(|o| (o.reference(), encode_raw(o)))
                .collect()
        };
        let mut touched = BTreeSet::new();
        let mut moved = BTreeSet::new();
        for (r, item) in map_runs(&plan.writes, workers(plan.writes.len()), encode_all)
            .into_iter()
            .flatten()
        {
            let bucket = self.bucket_of(r.kind, &r.namespace, &r.name);
            let path = self.object_path(&r);
            if loose.contains(&path) {
                moved.insert(path);
            }
            buckets
                .get_mut(&bucket)
                .expect("read for every object given")
                .insert(r.name, item);
            touched.insert(bucket);
        }
        let ranges_file = (stored.is_none() && !touched.is_empty())
            .then(|| (self.ranges_path(), encode_ranges(&ranges)));
        let services: Vec<(String, &Service)> = plan
            .writes
            .iter()
            .filter_map(|o| match o {
                Object::Service(s) => Some((o.key(), &**s)),
                Object::EndpointSlice(_) => None,
            })
            .collect();
        let services_written = !services.is_empty();
        index.replace(services);
        // Slices are renamed into place before Services: a watcher that
        // sees a new Service sees it with its endpoints, in one sync,
        // instead of refusing connections to it until the slice lands.
        let written = self.write_buckets(&buckets, &touched, &moved, ranges_file)?;
        if rebuilt || services_written {
            // After the objects, not synced: an index lost or stale after
            // a crash does not match its stamp, and is rebuilt.
            self.write_index(&index);
        }
        self.refresh(written);
        Ok(plan.applied)
    }

    fn delete(&self, refs: &[ObjectRef]) -> StoreResult<Vec<bool>> {
        let _lock = self.lock()?;
        let index = self.read_index();
        let res = self.delete_files(refs);
        // Released only after the files went; on an error, whatever went
        // is found by the next apply's full read.
        match (index, &res) {
            (Some(mut t), Ok(_)) => {
                let gone = refs
                    .iter()
                    .filter(|r| r.kind == Kind::Service)
                    .map(ObjectRef::key)
                    .collect();
                t.release(&gone);
                self.write_index(&t);
            }
            _ => {
                let _ = fs::remove_file(self.dir.join(STAMP));
            }
        }
        res
    }

    fn delete_files(&self, refs: &[ObjectRef]) -> StoreResult<Vec<bool>> {
        let Stored {
            mut buckets, loose, ..
        } = self.read_stored(refs.iter().cloned())?;
        let mut touched = BTreeSet::new();
        let mut gone = BTreeSet::new();
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            let bucket = self.bucket_of(r.kind, &r.namespace, &r.name);
            let in_bucket = buckets
                .get_mut(&bucket)
                .and_then(|items| items.remove(&r.name))
                .is_some();
            if in_bucket {
                touched.insert(bucket);
            }
            let path = self.object_path(r);
            let was_loose = loose.contains(&path);
            if was_loose {
                gone.insert(path);
            }
            out.push(in_bucket || was_loose);
        }
        let written = self.write_buckets(&buckets, &touched, &gone, None)?;
        for path in &written {
            // Only if empty; under the lock no writer is about to use it.
            if let Some(ns) = path.parent() {
                let _ = fs::remove_dir(ns);
            }
        }
        self.refresh(written);
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
        self.inner.nodes()
    }

    async fn node_set(&self) -> StoreResult<super::NodeSet> {
        self.inner.node_set()
    }

    async fn services(&self) -> StoreResult<Snapshot> {
        blocking(&self.inner, |i| i.snapshot(false)).await
    }

    async fn state(&self) -> StoreResult<State> {
        if !self.inner.watched {
            return Ok(State::of(&self.services().await?));
        }
        Ok(self.inner.cache.lock().expect("not poisoned").state())
    }

    async fn changed(&self) {
        self.notify.notified().await;
    }

    fn services_version(&self) -> Option<u64> {
        Some(self.inner.cache.lock().expect("not poisoned").version())
    }

    async fn resync(&self) {
        let notify = self.notify.clone();
        let changed = blocking(&self.inner, |i| Ok(i.rescan())).await;
        if changed.unwrap_or(false) {
            notify.notify_one();
        }
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
    use crate::store::encode;
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
            // The API's JSON, in a List where the module doc says.
            let text =
                fs::read_to_string(d.0.join("services/default").join(bucket_file("web"))).unwrap();
            let list: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(list["kind"], "List");
            let v = &list["items"][0];
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

    /// ferryctl's store (nothing watched, nothing held) reads and writes
    /// alike, and a watching store sees its writes.
    #[test]
    fn client_store_round_trip() {
        let d = TempDir::new("fs-client");
        rt().block_on(async {
            let watching = FileStore::open(&d.0).unwrap();
            let c = FileStore::open_client(&d.0).unwrap();
            testing::round_trip(&c).await;
            assert_eq!(c.inner.rescans.load(Ordering::Relaxed), 0);
            let want = State::of(&c.services().await.unwrap());
            assert_eq!(c.state().await.unwrap(), want);
            until("the watcher to see the client's writes", || {
                watching.inner.cache.lock().unwrap().state() == want
            });
            testing::deletes(&FileStore::open_client(&d.0.join("other")).unwrap()).await;
        });
    }

    /// The allocation index follows applies and deletes, and a Service
    /// file written by another hand makes the next apply read everything.
    #[test]
    fn allocation_index_is_kept_and_counts_only_while_stamped() {
        let d = TempDir::new("fs-index");
        let s = FileStore::open_client(&d.0).unwrap();
        let held = || Taken::of(&s.inner.snapshot(false).unwrap().services);
        let ip_of = |name: &str| cluster_ip(&s.inner.snapshot(false).unwrap(), name);
        s.inner.apply(objs(testing::WEB), &small()).unwrap();
        assert_eq!(s.inner.read_index(), Some(held()));
        assert!(!held().ports.is_empty());
        assert_eq!(decode_index(&encode_index(&held())), Some(held()));
        assert_eq!(decode_index(b"{}"), None, "another layout");
        s.inner.apply(objs(&svc("b", "{}")), &small()).unwrap();
        assert_eq!(s.inner.read_index(), Some(held()));
        assert_eq!(ip_of("default/b"), "10.96.0.2");
        // By hand: 10.96.0.3, the next free address, renamed into place
        // (past the clock tick of the last write).
        std::thread::sleep(Duration::from_millis(20));
        let hand = &objs(&svc("hand", "{clusterIP: 10.96.0.3}"))[0];
        let tmp = d.0.join("services/default/.hand");
        fs::write(&tmp, encode(hand, true)).unwrap();
        fs::rename(&tmp, d.0.join("services/default/hand.json")).unwrap();
        assert_eq!(s.inner.read_index(), None);
        s.inner.apply(objs(&svc("c", "{}")), &small()).unwrap();
        assert_eq!(ip_of("default/c"), "10.96.0.4");
        assert_eq!(s.inner.read_index(), Some(held()));
        // A delete releases what the Service held.
        s.inner.delete(&[testing::service_ref("b")]).unwrap();
        assert_eq!(s.inner.read_index(), Some(held()));
        s.inner.apply(objs(&svc("d", "{}")), &small()).unwrap();
        assert_eq!(ip_of("default/d"), "10.96.0.2");
        // An index that does not match its stamp does not count.
        fs::write(d.0.join(INDEX), b"{\"ips\": {}, \"ports\": {}}").unwrap();
        assert_eq!(s.inner.read_index(), None);
        s.inner.apply(objs(&svc("e", "{}")), &small()).unwrap();
        assert_eq!(ip_of("default/e"), "10.96.0.5");
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
        let web = &objs(testing::WEB)[0];
        fs::write(ns.join("misnamed.json"), encode(web, true)).unwrap();
        // In a bucket: a half-written one, one of another namespace, one
        // whose name belongs in another bucket, an invalid one.
        let other = |name: &str| loop {
            let n = format!("{name}{}", TMP_COUNTER.fetch_add(1, Ordering::Relaxed));
            if bucket_file(&n) != bucket_file("web") {
                return n;
            }
        };
        let raw = |yaml: String| encode_raw(&objs(&yaml)[0]);
        fs::write(
            ns.join(bucket_file("half")),
            br#"{"kind": "List", "items": [{"#,
        )
        .unwrap();
        let lost = other("lost");
        let items = [
            raw(format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {lost}, namespace: prod}}\n"
            )),
            raw(svc(&other("elsewhere"), "{}")),
        ];
        let lost_bucket = ns.join(bucket_file(&lost));
        fs::write(&lost_bucket, encode_bucket(items.iter().map(|b| &**b))).unwrap();
        fs::write(
            ns.join("bad.json"),
            br#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad", "namespace": "default"}, "spec": {"ports": [{"port": 0}]}}"#,
        )
        .unwrap();
        fs::write(ns.join(".tmp-1-1"), b"crashed writer").unwrap();
        let snap = s.inner.snapshot(false).unwrap();
        assert_eq!(snap.services.keys().collect::<Vec<_>>(), ["default/web"]);
        assert_eq!(
            s.inner.scanned().state(),
            State::of(&snap),
            "ferryd reads alike"
        );
        assert!(ns.join(".tmp-1-1").exists(), "a reader never sweeps");
        // A bucket a writer cannot read is not written over.
        let err = s
            .inner
            .apply(objs(&svc("half", "{}")), &small())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a v1 List"), "{err}");
        s.inner.apply(objs(&svc("more", "{}")), &small()).unwrap();
        assert!(!ns.join(".tmp-1-1").exists(), "the next writer sweeps");
        // The broken files hold no address: `more` got the next free one.
        let snap = s.inner.snapshot(false).unwrap();
        assert_eq!(cluster_ip(&snap, "default/more"), "10.96.0.2");
    }

    /// A file of one object (ferry's layout before buckets) is read, loses
    /// to its bucket, and goes when the object is written or deleted.
    #[test]
    fn files_of_one_object_are_read_and_moved_into_buckets() {
        let d = TempDir::new("fs-loose");
        let s = FileStore::open(&d.0).unwrap();
        let ns = d.0.join("services/default");
        fs::create_dir_all(&ns).unwrap();
        let old = |ip: &str| encode(&objs(&svc("old", &format!("{{clusterIP: {ip}}}")))[0], true);
        fs::write(ns.join("old.json"), old("10.96.0.3")).unwrap();
        let ip = || cluster_ip(&s.inner.snapshot(false).unwrap(), "default/old");
        assert_eq!(ip(), "10.96.0.3");
        until("ferryd to read it", || {
            *s.inner.cache.lock().unwrap() == s.inner.scanned()
                && !s.inner.cache.lock().unwrap().state().services.is_empty()
        });
        // Applied again: into its bucket, the file of one object gone.
        let applied = s
            .inner
            .apply(
                objs(&svc("old", "{clusterIP: 10.96.0.3, ports: [{port: 81}]}")),
                &small(),
            )
            .unwrap();
        assert_eq!(said(&applied), ["service/default/old configured"]);
        assert!(!ns.join("old.json").exists());
        assert!(ns.join(bucket_file("old")).exists());
        // Written by hand again, stale: the bucket wins, for ferryd too.
        fs::write(ns.join("old.json"), old("10.96.0.4")).unwrap();
        assert_eq!(ip(), "10.96.0.3");
        until("ferryd to agree", || {
            *s.inner.cache.lock().unwrap() == s.inner.scanned()
        });
        let port = |c: &Cache| {
            c.state()
                .services
                .get("default/old")
                .map(|x| format!("{x:?}"))
        };
        assert!(port(&s.inner.scanned()).is_some_and(|p| p.contains("81")));
        // Deleted: both go.
        assert_eq!(
            s.inner.delete(&[testing::service_ref("old")]).unwrap(),
            [true]
        );
        assert!(!ns.exists(), "the emptied namespace directory goes");
        until("ferryd to see it go", || {
            s.inner.cache.lock().unwrap().state().services.is_empty()
        });
    }

    /// Holds `s`'s inotify reader (after it read the event of a write made
    /// for that) while `write` runs, then lets it go on.
    fn away_while(s: &FileStore, write: impl FnOnce()) {
        let (m, cv) = &s.inner.hold;
        *m.lock().unwrap() = Hold::Wanted;
        let wake = s.inner.subnets.join("wake-up.json");
        fs::write(&wake, b"not a record").unwrap();
        let held = cv
            .wait_timeout_while(m.lock().unwrap(), Duration::from_secs(10), |h| {
                *h != Hold::Held
            })
            .unwrap();
        assert_eq!(*held.0, Hold::Held, "the reader did not stop");
        drop(held);
        write();
        *m.lock().unwrap() = Hold::Run;
        cv.notify_all();
    }

    /// Until `f` holds (30 s at most).
    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn entry(i: usize) -> Entry {
        let subnet = Ipv4Network::new(
            std::net::Ipv4Addr::new(10, (i / 256) as u8, (i % 256) as u8, 0),
            24,
        )
        .unwrap();
        let mut r = reg(&format!("n{i}"), Duration::from_secs(60)).record(subnet);
        r.underlay_ip = std::net::Ipv4Addr::from(0xc0a8_0000 + i as u32);
        Entry {
            record: r,
            expires_ms: now_ms() + 600_000,
        }
    }

    /// More events than inotify's queue holds arrive while the reader is
    /// away: the kernel drops the rest and says so (IN_Q_OVERFLOW); the
    /// store reads everything again and holds every record.
    #[test]
    fn inotify_overflow_rescans_and_converges() {
        let d = TempDir::new("fs-overflow");
        let s = FileStore::open(&d.0).unwrap();
        let queue: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .map(|t| t.trim().parse().unwrap())
            .unwrap_or(16384);
        let n = queue + 1000;
        let before = s.inner.rescans.load(Ordering::Relaxed);
        away_while(&s, || {
            // One event per file (a write into place, closed), each naming
            // another file, so that inotify cannot merge them.
            for i in 0..n {
                let e = entry(i);
                fs::write(
                    s.inner.path_of(e.record.subnet),
                    serde_json::to_vec(&e).unwrap(),
                )
                .unwrap();
            }
        });
        until("every record", || s.inner.nodes().unwrap().len() == n);
        assert!(
            s.inner.rescans.load(Ordering::Relaxed) > before,
            "converged without a rescan: the queue did not overflow"
        );
    }

    /// For a random sequence of writes (readable or not), renames into place
    /// and deletes, the events alone bring the snapshot to what reading the
    /// whole directory gives.
    #[test]
    fn file_events_give_the_rescanned_state() {
        let d = TempDir::new("fs-events");
        let s = FileStore::open(&d.0).unwrap();
        let mut rng = crate::store::testing::Rng(0x2545_f491_4f6c_dd1d);
        let mut below = |n: u64| rng.below(n as usize) as u64;
        let svc_dir = d.0.join("services");
        let before = s.inner.rescans.load(Ordering::Relaxed);
        // Eight names in two buckets: a bucket holds several, gains and
        // loses them, and competes with their files of one object.
        let names: Vec<String> = ["_00.json", "_01.json"]
            .iter()
            .flat_map(|b| {
                (0..)
                    .map(|k| format!("s{k}"))
                    .filter(|n| bucket_file(n) == *b)
                    .take(4)
            })
            .collect();
        let service = |ns: &str, i: usize, port: u64| {
            serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": names[i], "namespace": ns},
                "spec": {"ports": [{"port": port}]}})
        };
        for step in 0..900 {
            let i = below(8) as usize;
            let ns = ["default", "prod"][below(2) as usize];
            let (path, good) = match below(3) {
                0 => {
                    let e = entry(i);
                    (
                        s.inner.path_of(e.record.subnet),
                        serde_json::to_vec(&e).unwrap(),
                    )
                }
                1 => (
                    svc_dir.join(ns).join(format!("{}.json", names[i])),
                    serde_json::to_vec(&service(ns, i, 80 + below(3))).unwrap(),
                ),
                _ => {
                    let file = bucket_file(&names[i]);
                    let mut items: Vec<Box<RawValue>> = Vec::new();
                    for (j, name) in names.iter().enumerate() {
                        if bucket_file(name) == file && below(2) == 0 {
                            let v = service(ns, j, 80 + below(3));
                            items.push(serde_json::value::to_raw_value(&v).unwrap());
                        }
                    }
                    (
                        svc_dir.join(ns).join(file),
                        encode_bucket(items.iter().map(|b| &**b)),
                    )
                }
            };
            match below(4) {
                0 => {
                    let _ = fs::remove_file(&path);
                    // As the store's delete does: an emptied namespace goes.
                    if let Some(dir) = path.parent().filter(|p| p.starts_with(&svc_dir)) {
                        let _ = fs::remove_dir(dir);
                    }
                }
                1 => {
                    fs::create_dir_all(path.parent().unwrap()).unwrap();
                    fs::write(&path, &good[..good.len() / 2]).unwrap(); // half-written
                }
                _ => {
                    let dir = path.parent().unwrap();
                    fs::create_dir_all(dir).unwrap();
                    let tmp = dir.join(format!("{TMP_PREFIX}{step}"));
                    fs::write(&tmp, &good).unwrap();
                    fs::rename(&tmp, &path).unwrap();
                }
            }
        }
        until("the events to be read", || {
            *s.inner.cache.lock().unwrap() == s.inner.scanned()
        });
        assert_eq!(
            s.inner.rescans.load(Ordering::Relaxed),
            before,
            "a rescan, not the events, converged"
        );
        assert!(!s.inner.nodes().unwrap().is_empty());
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
