//! The lease store on disk, in host-local's layout so either plugin reads what
//! the other wrote. Thin I/O: which address to take is decided in alloc.rs.
//!
//! `<dataDir>/<network>/` holds:
//! - `lock`: flock(2)ed around every change. host-local locks the same file,
//!   so the two may even run side by side. The kernel drops a flock when its
//!   holder dies: a SIGKILLed process never leaves the store locked.
//! - `<ip>` (`10.9.0.5`, `fd00::5`): one lease, content
//!   `<containerID>\r\n<ifname>`; older host-local wrote only `<containerID>`.
//! - `last_reserved_ip.<range set index>`: the round-robin cursor, a hint.
//! - `.ferry-tmp.<pid>.<n>.<pidns>`: a file being written. A lease is written
//!   to a temp file and then link(2)ed to its IP name, so it exists whole or
//!   not at all, and link's EEXIST guards against handing an address out twice
//!   even if something wrote behind the lock's back. Temps a killed process
//!   left are swept by later listings (ADD's, DEL's, GC's) as soon as their
//!   writer is dead, and in any case once older than a minute; see
//!   [`abandoned`].
//! - `.ferry-owner:<containerID>:<ifname>:<ip>`: a second hard link of a lease
//!   we wrote (neither ID nor ifname may contain ':'). An index: finding an
//!   attachment's leases needs only the directory listing instead of reading
//!   every lease (~3 µs each, 1 ms at 250 pods). Only leases without such a
//!   link (host-local's, or ours if a crash came between the two links) are
//!   read. host-local ignores these names, and its DEL removes them with the
//!   lease because their content matches. Order keeps crashes harmless: link
//!   the lease before the index, unlink the index before the lease, so a crash
//!   leaves at worst an unindexed lease, which is then read. A stale index
//!   entry (lease gone or re-owned) is only a hint: callers verify the lease
//!   under the lock, and GC removes such entries.
//!
//! No fsync, deliberately: what must be survived is a process dying at any
//! instant, and the page cache outlives processes. After a machine crash the
//! pods are gone anyway; the worst left behind is a lease whose content never
//! reached the disk (an empty file), which keeps its address blocked, owned by
//! nobody, until GC removes it, or a stale `last_reserved_ip` (round-robin
//! starts elsewhere). host-local does not fsync either, and two fsyncs would
//! cost more than the whole ~2 ms ADD budget on many disks.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::kill;
use nix::unistd::Pid;

const LOCK_FILE: &str = "lock";
const LAST_RESERVED: &str = "last_reserved_ip.";
const TEMP_PREFIX: &str = ".ferry-tmp.";
const INDEX_PREFIX: &str = ".ferry-owner:";
const STALE_TEMP: Duration = Duration::from_secs(60);

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub id: String,
    /// None in host-local's old id-only format.
    pub ifname: Option<String>,
}

impl Owner {
    pub fn new(id: &str, ifname: &str) -> Owner {
        Owner {
            id: id.to_string(),
            ifname: Some(ifname.to_string()),
        }
    }

    /// Lease file content; `\r\n` (host-local) and `\n` both separate.
    pub fn parse(content: &str) -> Owner {
        let mut lines = content.trim().lines().map(str::trim);
        Owner {
            id: lines.next().unwrap_or("").to_string(),
            ifname: lines.next().filter(|s| !s.is_empty()).map(String::from),
        }
    }

    fn encode(&self) -> String {
        format!("{}\r\n{}", self.id, self.ifname.as_deref().unwrap_or(""))
    }

    /// Is a lease held by `lease` ours? An old id-only lease belongs to every
    /// interface of its container, as host-local reads it.
    pub fn claims(&self, lease: &Owner) -> bool {
        lease.id == self.id && (lease.ifname.is_none() || lease.ifname == self.ifname)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: IpAddr,
    pub owner: Owner,
}

/// The addresses `owner` holds, with host-local's fallback: old id-only
/// leases count only when no lease names the interface.
pub fn owned_by(leases: &[Lease], owner: &Owner) -> Vec<IpAddr> {
    let pick = |f: &dyn Fn(&Owner) -> bool| -> Vec<IpAddr> {
        leases
            .iter()
            .filter(|l| f(&l.owner))
            .map(|l| l.ip)
            .collect()
    };
    let exact = pick(&|o| o == owner);
    if exact.is_empty() {
        pick(&|o| o.ifname.is_none() && o.id == owner.id)
    } else {
        exact
    }
}

/// `.ferry-owner:<id>:<ifname>:<ip>`; None when it cannot be a safe name
/// (such a lease simply stays unindexed).
fn index_name(owner: &Owner, ip: IpAddr) -> Option<String> {
    let ifname = owner.ifname.as_deref()?;
    let name = format!("{INDEX_PREFIX}{}:{ifname}:{ip}", owner.id);
    let clean = !owner.id.contains([':', '/']) && !ifname.contains([':', '/']);
    (clean && name.len() <= 255).then_some(name)
}

fn parse_index_name(name: &str) -> Option<(Owner, IpAddr)> {
    let mut parts = name.strip_prefix(INDEX_PREFIX)?.splitn(3, ':');
    let (id, ifname, ip) = (parts.next()?, parts.next()?, parts.next()?);
    Some((Owner::new(id, ifname), ip.parse().ok()?))
}

/// One read of the directory.
#[derive(Debug, Default)]
pub struct Listing {
    /// Addresses with a lease file, whoever owns them.
    pub leases: HashSet<IpAddr>,
    /// Index entries: who holds which address, according to the names.
    pub index: Vec<(Owner, IpAddr)>,
}

/// One network's lease directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Create `<data_dir>/<network>` if needed.
    pub fn open(data_dir: &Path, network: &str) -> io::Result<Store> {
        let dir = data_dir.join(network);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)?;
        Ok(Store { dir })
    }

    /// The store if its directory exists (DEL, CHECK and GC create nothing).
    pub fn existing(data_dir: &Path, network: &str) -> Option<Store> {
        let dir = data_dir.join(network);
        dir.is_dir().then_some(Store { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Names only (cheap). Safe without the lock: leases appear by link and
    /// vanish by unlink. Sweeps abandoned temp files on the way: a syscall
    /// or two per temp, and there are only as many as ADDs in flight.
    pub fn list(&self) -> io::Result<Listing> {
        let mut out = Listing::default();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Ok(ip) = name.parse::<IpAddr>() {
                out.leases.insert(ip);
            } else if let Some(pair) = parse_index_name(name) {
                out.index.push(pair);
            } else if let Some(writer) = name.strip_prefix(TEMP_PREFIX) {
                sweep_temp(&entry.path(), writer);
            }
        }
        Ok(out)
    }

    /// Enough leases to find any attachment's: indexed ones by their index
    /// name, the rest by content. Callers that act on it re-check under the
    /// lock.
    pub fn lookup(&self, listing: &Listing) -> io::Result<Vec<Lease>> {
        let indexed: HashSet<IpAddr> = listing.index.iter().map(|(_, ip)| *ip).collect();
        let mut out: Vec<Lease> = listing
            .index
            .iter()
            .filter(|(_, ip)| listing.leases.contains(ip))
            .map(|(owner, ip)| Lease {
                ip: *ip,
                owner: owner.clone(),
            })
            .collect();
        for &ip in listing.leases.difference(&indexed) {
            if let Some(owner) = self.read_lease(ip)? {
                out.push(Lease { ip, owner });
            }
        }
        Ok(out)
    }

    /// Every lease, by content (GC).
    pub fn read_all(&self, listing: &Listing) -> io::Result<Vec<Lease>> {
        let mut out = Vec::new();
        for &ip in &listing.leases {
            if let Some(owner) = self.read_lease(ip)? {
                out.push(Lease { ip, owner });
            }
        }
        Ok(out)
    }

    /// None when the lease vanished (released concurrently).
    pub fn read_lease(&self, ip: IpAddr) -> io::Result<Option<Owner>> {
        // One open and one read: lease files are a few dozen bytes.
        let mut f = match File::open(self.lease_path(ip)) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = vec![0u8; 512];
        let n = f.read(&mut buf)?;
        buf.truncate(n);
        if n == 512 {
            f.read_to_end(&mut buf)?;
        }
        Ok(Some(Owner::parse(&String::from_utf8_lossy(&buf))))
    }

    /// A temp file holding `owner`'s lease content, written before taking the
    /// lock so the critical section only links it.
    pub fn prepare(&self, owner: &Owner) -> io::Result<TempFile> {
        TempFile::create(&self.dir, owner.encode().into_bytes())
    }

    /// Wait for the store's lock.
    pub fn lock(&self) -> io::Result<Locked<'_>> {
        let mut file = self.lock_file()?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(flock) => {
                    return Ok(Locked {
                        store: self,
                        _flock: flock,
                    })
                }
                Err((f, Errno::EINTR)) => file = f,
                Err((_, errno)) => return Err(errno.into()),
            }
        }
    }

    /// The lock if it can be had within `wait` (STATUS must not hang).
    pub fn try_lock_for(&self, wait: Duration) -> io::Result<Option<Locked<'_>>> {
        let deadline = Instant::now() + wait;
        let mut file = self.lock_file()?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => {
                    return Ok(Some(Locked {
                        store: self,
                        _flock: flock,
                    }))
                }
                Err((f, Errno::EWOULDBLOCK | Errno::EINTR)) if Instant::now() < deadline => {
                    file = f;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, errno)) => return Err(errno.into()),
            }
        }
    }

    fn lock_file(&self) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(self.dir.join(LOCK_FILE))
    }

    fn lease_path(&self, ip: IpAddr) -> PathBuf {
        // IpAddr's Display is RFC 5952, the same text Go's net.IP.String() gives.
        self.dir.join(ip.to_string())
    }
}

/// The store with its lock held; dropping it unlocks.
pub struct Locked<'a> {
    store: &'a Store,
    _flock: Flock<File>,
}

impl Locked<'_> {
    /// Addresses with a lease file, whoever owns them, as of now.
    pub fn in_use(&self) -> io::Result<HashSet<IpAddr>> {
        Ok(self.store.list()?.leases)
    }

    pub fn owner(&self, ip: IpAddr) -> io::Result<Option<Owner>> {
        self.store.read_lease(ip)
    }

    /// Make `tmp` (holding `owner`) the lease for `ip`, then index it.
    /// Ok(false) when the address is taken.
    pub fn commit(&self, tmp: &mut TempFile, owner: &Owner, ip: IpAddr) -> io::Result<bool> {
        let dst = self.store.lease_path(ip);
        let link = |tmp: &TempFile| match fs::hard_link(&tmp.path, &dst) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        };
        let linked = match link(tmp) {
            // Our temp is never judged dead (we are alive), but it is swept as
            // stale once we waited over a minute for the lock: write it again.
            // The new one is fresh, so losing it too is an error, not a loop.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                *tmp = TempFile::create(&self.store.dir, std::mem::take(&mut tmp.content))?;
                link(tmp)
            }
            other => other,
        }?;
        if linked {
            if let Some(name) = index_name(owner, ip) {
                // Best effort: without an entry the lease is merely read
                // instead of named (also when the temp was swept just now).
                // A stale entry of the same name is replaced.
                let index = self.store.dir.join(name);
                if let Err(e) = fs::hard_link(&tmp.path, &index) {
                    if e.kind() == ErrorKind::AlreadyExists && fs::remove_file(&index).is_ok() {
                        let _ = fs::hard_link(&tmp.path, &index);
                    }
                }
            }
        }
        Ok(linked)
    }

    /// Remove `owner`'s index entry for `ip` (before its lease, or when stale).
    pub fn unindex(&self, owner: &Owner, ip: IpAddr) -> io::Result<()> {
        match index_name(owner, ip) {
            Some(name) => remove_if_present(&self.store.dir.join(name)),
            None => Ok(()),
        }
    }

    /// Remove the lease for `ip`, held by `owner`, index entry first.
    pub fn release(&self, owner: &Owner, ip: IpAddr) -> io::Result<()> {
        self.unindex(owner, ip)?;
        remove_if_present(&self.store.lease_path(ip))
    }

    /// Only a round-robin hint: unreadable means "start at the beginning".
    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        let path = self.store.dir.join(format!("{LAST_RESERVED}{set}"));
        fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Overwritten in place, not via temp file + rename: on ext4 a rename
    /// over an existing file forces writeback of the new one (auto_da_alloc),
    /// measured at 0.4-1.6 ms here, inside the lock, on a ~2 ms ADD budget.
    /// Truncating only to the new non-zero length avoids the same flush that
    /// O_TRUNC triggers. A process killed between write and truncate leaves
    /// a wrong but harmless hint (e.g. "10.9.0.90"): the value only picks where
    /// the round-robin walk starts, and every candidate is checked anyway.
    pub fn set_last_reserved(&self, set: usize, ip: IpAddr) -> io::Result<()> {
        let text = ip.to_string();
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(self.store.dir.join(format!("{LAST_RESERVED}{set}")))?;
        f.write_all_at(text.as_bytes(), 0)?;
        f.set_len(text.len() as u64)
    }
}

/// A uniquely named file in the store's directory, removed when dropped (the
/// lease and index names linked from it keep the content).
pub struct TempFile {
    path: PathBuf,
    /// Kept to write the file again if a sweep removed it.
    content: Vec<u8>,
}

impl TempFile {
    fn create(dir: &Path, content: Vec<u8>) -> io::Result<TempFile> {
        // A file a dead process with a recycled pid left behind is simply
        // skipped.
        loop {
            let path = dir.join(temp_name(TEMP_PREFIX));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path)
            {
                Ok(mut f) => {
                    let tmp = TempFile { path, content };
                    f.write_all(&tmp.content)?;
                    return Ok(tmp);
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A name for a temp file, `<prefix><pid>.<n>.<pidns>`: unique among live
/// processes and threads (pid + counter), and telling a later sweep who
/// writes it. Shared with ferry's attachment records.
pub(crate) fn temp_name(prefix: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    writer_name(
        prefix,
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
    )
}

/// The temp name process `pid` of our pid namespace gives its `n`th temp.
pub(crate) fn writer_name(prefix: &str, pid: u32, n: u64) -> String {
    match own_pid_ns() {
        Some(ns) => format!("{prefix}{pid}.{n}.{ns}"),
        // Without /proc nobody can judge our pid: the age rule alone applies.
        None => format!("{prefix}{pid}.{n}"),
    }
}

/// Remove the temp file at `path` if it is [`abandoned`]. Best effort, like
/// every sweep: a failure only leaves it for the next one.
pub(crate) fn sweep_temp(path: &Path, writer: &str) {
    if abandoned(path, writer) {
        let _ = fs::remove_file(path);
    }
}

/// Is a temp file (`writer` is its name after the prefix, see [`temp_name`])
/// left by a dead process? Yes when its writer is gone, or when it is older
/// than a minute.
///
/// A dead writer (kill(pid, 0) gives ESRCH) is final: it cannot come back to
/// finish the file, so the sweep need not wait. But a pid only names a
/// process in the pid namespace it was taken in, and pids are recycled: a GC
/// run from another namespace (a containerised runtime, say) must not judge
/// our pids at all, hence the namespace in the name, and a recycled pid makes
/// a dead writer look alive. The age bound catches both, and old names
/// without a namespace (`.ferry-tmp.<pid>.<n>`, `.tmp.<pid>`). It is far
/// above any real write (microseconds) and still safe for a writer that
/// waited longer for the lock: commit writes its temp again.
pub(crate) fn abandoned(path: &Path, writer: &str) -> bool {
    writer_dead(writer) || older_than(path, STALE_TEMP)
}

fn writer_dead(writer: &str) -> bool {
    let mut fields = writer.split('.');
    // > 0: kill(0 or -n) would address process groups.
    let pid = fields.next().and_then(|p| p.parse::<i32>().ok());
    let Some(pid) = pid.filter(|&p| p > 0) else {
        return false;
    };
    let ns = fields.nth(1).and_then(|n| n.parse::<u64>().ok());
    // EPERM means the process exists (someone else's): alive.
    ns.is_some() && ns == own_pid_ns() && kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH)
}

fn older_than(path: &Path, bound: Duration) -> bool {
    fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > bound)
}

/// The inode of our pid namespace, which identifies it: one stat per process.
fn own_pid_ns() -> Option<u64> {
    static NS: OnceLock<Option<u64>> = OnceLock::new();
    *NS.get_or_init(|| fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino()))
}

/// For tests of the sweeps, here and in attachment.rs.
#[cfg(test)]
pub(crate) mod testing {
    use std::fs::File;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, SystemTime};

    /// The pid of a process that has exited and been reaped: dead, until the
    /// kernel hands the pid out again (after a full cycle through pid_max).
    pub fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    /// The three kinds of temp a sweep meets, named with `prefix` in `dir`:
    /// (dead writer, fresh), (live writer, old), (live writer, fresh). The
    /// first two must go; `n` keeps the names of several plantings apart.
    pub fn plant_temps(dir: &Path, prefix: &str, n: u64) -> [PathBuf; 3] {
        let name = |pid, k| dir.join(super::writer_name(prefix, pid, n + k));
        let temps = [
            name(dead_pid(), 0),
            name(std::process::id(), 1),
            name(std::process::id(), 2),
        ];
        write_aged(&temps[0], Duration::ZERO);
        write_aged(&temps[1], Duration::from_secs(120));
        write_aged(&temps[2], Duration::ZERO);
        temps
    }

    /// What a sweep must have done to [`plant_temps`]' files.
    pub fn assert_swept(temps: &[PathBuf; 3], after: &str) {
        assert!(!temps[0].exists(), "{after}: dead writer's fresh temp kept");
        assert!(!temps[1].exists(), "{after}: live writer's old temp kept");
        assert!(
            temps[2].exists(),
            "{after}: live writer's fresh temp removed"
        );
    }

    /// Write a file last modified `age` ago.
    pub fn write_aged(path: &Path, age: Duration) {
        std::fs::write(path, "x\r\neth0").unwrap();
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(SystemTime::now() - age)
            .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{dead_pid, write_aged};
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn owner_formats() {
        let o = Owner::parse("abc\r\neth0");
        assert_eq!(o, Owner::new("abc", "eth0"));
        assert_eq!(Owner::parse(&o.encode()), o);
        assert_eq!(Owner::parse("abc\neth1\n"), Owner::new("abc", "eth1"));
        let old = Owner::parse("abc\n");
        assert_eq!(old.ifname, None);
        assert!(Owner::new("abc", "eth0").claims(&old));
        assert!(!Owner::new("abd", "eth0").claims(&old));
        assert!(!Owner::new("abc", "eth1").claims(&o));
        assert_eq!(Owner::parse("").id, "");
    }

    #[test]
    fn index_names_round_trip() {
        let o = Owner::new("c.1-x", "eth0.5");
        for a in ["10.9.0.5", "fd00::5"] {
            let name = index_name(&o, ip(a)).unwrap();
            assert_eq!(parse_index_name(&name), Some((o.clone(), ip(a))));
        }
        assert_eq!(index_name(&Owner::parse("old"), ip("10.0.0.1")), None);
        assert_eq!(
            index_name(&Owner::new(&"x".repeat(250), "eth0"), ip("10.0.0.1")),
            None
        );
        assert_eq!(parse_index_name(".ferry-owner:a:b:junk"), None);
        assert_eq!(parse_index_name("10.0.0.1"), None);
    }

    #[test]
    fn owned_by_falls_back_to_old_leases_only_when_needed() {
        let lease = |a: &str, c: &str| Lease {
            ip: ip(a),
            owner: Owner::parse(c),
        };
        let leases = [
            lease("10.0.0.2", "c1\r\neth0"),
            lease("10.0.0.3", "c1"),
            lease("10.0.0.4", "c2\r\neth0"),
            lease("10.0.0.5", "c1\r\nnet1"),
        ];
        assert_eq!(
            owned_by(&leases, &Owner::new("c1", "eth0")),
            [ip("10.0.0.2")]
        );
        assert_eq!(
            owned_by(&leases, &Owner::new("c1", "eth9")),
            [ip("10.0.0.3")]
        );
        assert!(owned_by(&leases, &Owner::new("c3", "eth0")).is_empty());
    }

    #[test]
    fn abandoned_means_dead_writer_or_old_file() {
        let dir = std::env::temp_dir().join(format!("ferry-abandoned-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (live, dead) = (std::process::id(), dead_pid());
        let ns = own_pid_ns().expect("tests run with /proc");
        let old = Duration::from_secs(120);
        let fresh = Duration::ZERO;
        for (writer, age, want) in [
            (writer_name("", dead, 7), fresh, true),
            (writer_name("", live, 7), fresh, false),
            (writer_name("", live, 7), old, true),
            // A dead writer of our namespace is judged at once, one of
            // another namespace or of an older name by age only.
            (format!("{dead}.7.{}", ns + 1), fresh, false),
            (format!("{dead}.7.{}", ns + 1), old, true),
            (format!("{dead}.7"), fresh, false),
            (format!("{dead}"), fresh, false),
            (format!("{dead}"), old, true),
            // kill(0) and kill(-1) address groups: never a writer.
            (format!("0.7.{ns}"), fresh, false),
            (format!("-1.7.{ns}"), fresh, false),
            (format!("junk.7.{ns}"), fresh, false),
        ] {
            let path = dir.join(format!("{TEMP_PREFIX}{writer}"));
            write_aged(&path, age);
            assert_eq!(abandoned(&path, &writer), want, "{writer} aged {age:?}");
            sweep_temp(&path, &writer);
            assert_eq!(path.exists(), !want, "{writer} aged {age:?}");
            let _ = fs::remove_file(&path);
        }
        let ours = temp_name(TEMP_PREFIX);
        let writer = ours.strip_prefix(TEMP_PREFIX).unwrap();
        assert_eq!(
            writer,
            format!("{live}.{}.{ns}", writer.split('.').nth(1).unwrap())
        );
        write_aged(&dir.join(&ours), fresh);
        assert!(!abandoned(&dir.join(&ours), writer));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn commit_writes_a_swept_temp_again() {
        let dir = std::env::temp_dir().join(format!("ferry-reswept-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::open(&dir, "net").unwrap();
        let owner = Owner::new("c1", "eth0");
        let mut tmp = store.prepare(&owner).unwrap();
        // As if swept while we waited for the lock.
        fs::remove_file(&tmp.path).unwrap();
        let locked = store.lock().unwrap();
        assert!(locked.commit(&mut tmp, &owner, ip("10.0.0.2")).unwrap());
        assert_eq!(locked.owner(ip("10.0.0.2")).unwrap(), Some(owner.clone()));
        assert!(store.dir().join(".ferry-owner:c1:eth0:10.0.0.2").exists());
        drop(tmp);
        let mut names: Vec<String> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [".ferry-owner:c1:eth0:10.0.0.2", "10.0.0.2", "lock"]);
        drop(locked);
        fs::remove_dir_all(&dir).unwrap();
    }
}
