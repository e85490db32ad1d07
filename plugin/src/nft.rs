//! Pod egress masquerade (`ipMasq`) with nftables, spoken over netlink.
//!
//! Spawning `nft` costs ~5 ms, more than the whole ADD budget, so this
//! module sends nf_tables batches itself. It keeps, in the network namespace
//! of the calling thread:
//!
//! ```text
//! table inet ferry {
//!   map cni-masq4 { type ipv4_addr : verdict; }   # pod IP -> goto its network's chain
//!   map cni-masq6 { type ipv6_addr : verdict; }
//!   chain cni-postrouting { type nat hook postrouting priority srcnat; policy accept;
//!     meta nfproto ipv4 ip saddr vmap @cni-masq4
//!     meta nfproto ipv6 ip6 saddr vmap @cni-masq6
//!   }
//!   chain cni-n-<16 hex> {            # one per (network, subnet), see net_chain_name
//!     ip daddr <subnet> return
//!     ip daddr 224.0.0.0/4 return     # ip6 daddr ff00::/8 for v6
//!     masquerade
//!   }
//! }
//! ```
//!
//! Every element carries its attachment key as a comment (element userdata),
//! so DEL and GC find it without the pod's IP. The table is shared with
//! ferryd; the plugin owns only the `cni-*` objects in it.
//!
//! All changes happen under an exclusive flock(2) on the namespace's nsfs
//! file, so parallel plugin processes never interleave their
//! read-modify-write sequences; each write is one atomic kernel transaction.

mod msg;

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs::File;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;

use ipnetwork::IpNetwork;
use nix::errno::Errno;

pub use msg::{net_chain_name, MAX_KEY_LEN, TABLE};
use msg::{Elem, BASE_CHAIN, MAP4, MAP6, NET_CHAIN_PREFIX, OWN_PREFIX};
pub use nfnl::NftError;
use nfnl::{lock_netns, NETNS_FILE};
use nfnl::{Nfnl, Req};

/// One pod IP to masquerade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasqEntry<'a> {
    /// CNI network name; with `subnet` it selects the network chain.
    pub network: &'a str,
    /// Attachment key ("<network>/<containerID>/<ifname>"), stored with the
    /// element.
    pub key: &'a str,
    pub ip: IpAddr,
    /// The subnet of `ip`; traffic to it is not masqueraded.
    pub subnet: IpNetwork,
}

/// Masquerades the entries' traffic. Idempotent: an element already present
/// for an IP is replaced (new chain and key), so re-adding is fine.
pub fn add_masq(entries: &[MasqEntry]) -> Result<(), NftError> {
    let wanted = validate(entries)?;
    if wanted.is_empty() {
        return Ok(());
    }
    let lock = lock_netns()?;
    with_socket(&lock, |nl| {
        // Fast path, one transaction: the ruleset and the network's chain
        // exist and the IPs are new. ENOENT: something is missing;
        // EEXIST/EBUSY: an element for the IP exists already.
        let fast: Vec<Req> = wanted
            .iter()
            .map(|w| msg::new_elem(w.ip, &w.chain, w.key))
            .collect();
        match nl.batch(&fast) {
            Err(e) if is_retryable(&e) => {}
            r => return r,
        }
        retry(|| add_slow(nl, &wanted))
    })
}

/// Removes the entries' elements, matched by IP *and* key: an element that
/// now belongs to another attachment (a reused IP) is left alone. Missing
/// table, map or element is fine. Then drops network chains nothing jumps
/// to any more, and the whole ruleset (the table too, when nothing else
/// lives in it) once no element is left.
pub fn del_masq(entries: &[MasqEntry]) -> Result<(), NftError> {
    del_where(|e| {
        entries
            .iter()
            .any(|x| x.ip == e.ip && e.key.as_deref() == Some(x.key))
    })
}

/// Like [`del_masq`] for every element whose key is `key`.
pub fn del_masq_by_key(key: &str) -> Result<(), NftError> {
    del_where(|e| e.key.as_deref() == Some(key))
}

/// Every element's key and IP, for garbage collection; empty when the
/// table does not exist. Elements without a key are not listed.
pub fn list_masq_keys() -> Result<Vec<(String, IpAddr)>, NftError> {
    let ns = File::open(NETNS_FILE).map_err(NftError::Netns)?;
    let (m4, m6) = with_socket(&ns, |nl| Ok((dump_map(nl, MAP4)?, dump_map(nl, MAP6)?)))?;
    Ok(m4
        .into_iter()
        .chain(m6)
        .flatten()
        .filter_map(|e| Some((e.key?, e.ip)))
        .collect())
}

/// A validated entry with its chain name and canonical subnet.
struct Want<'a> {
    ip: IpAddr,
    key: &'a str,
    chain: String,
    subnet: IpNetwork,
}

fn validate<'a>(entries: &[MasqEntry<'a>]) -> Result<Vec<Want<'a>>, NftError> {
    let mut seen = HashSet::new();
    entries
        .iter()
        .map(|e| {
            let bad = |why: &str| NftError::InvalidEntry(format!("{} ({}): {why}", e.ip, e.key));
            if e.key.is_empty() || e.key.len() > MAX_KEY_LEN || e.key.contains('\0') {
                return Err(bad("key must be 1..=253 bytes without NUL"));
            }
            if !e.subnet.contains(e.ip) {
                return Err(bad(&format!("not in subnet {}", e.subnet)));
            }
            if !seen.insert(e.ip) {
                return Err(bad("IP listed twice"));
            }
            // Canonical form (network address), so "10.22.0.5/16" and
            // "10.22.0.0/16" name the same chain.
            let subnet = IpNetwork::new(e.subnet.network(), e.subnet.prefix())
                .expect("prefix already valid");
            Ok(Want {
                ip: e.ip,
                key: e.key,
                chain: net_chain_name(e.network, &subnet),
                subnet,
            })
        })
        .collect()
}

/// Creates what is missing of the ruleset and puts the elements in place,
/// all in one transaction.
fn add_slow(nl: &mut Nfnl, wanted: &[Want]) -> Result<(), NftError> {
    let (m4, m6) = (dump_map(nl, MAP4)?, dump_map(nl, MAP6)?);
    let mut reqs = Vec::new();
    if m4.is_none() || m6.is_none() {
        // CREATE without EXCL: whichever of them exists stays as it is.
        reqs.extend([msg::new_table(), msg::new_map(false), msg::new_map(true)]);
    }
    // Chains come with their rules, so they are created only when missing,
    // and with EXCL so that a concurrent creator aborts this transaction
    // instead of doubling the rules.
    if !chain_exists(nl, BASE_CHAIN)? {
        reqs.extend([
            msg::new_base_chain(),
            msg::base_rule(false),
            msg::base_rule(true),
        ]);
    }
    let mut checked = HashSet::new();
    for w in wanted {
        if checked.insert(w.chain.as_str()) && !chain_exists(nl, &w.chain)? {
            reqs.push(msg::new_chain(&w.chain));
            reqs.extend(msg::net_rules(&w.chain, w.subnet));
        }
    }
    let existing: Vec<Elem> = m4.into_iter().chain(m6).flatten().collect();
    for w in wanted {
        match existing.iter().find(|e| e.ip == w.ip) {
            Some(e) if e.chain.as_deref() == Some(&w.chain) && e.key.as_deref() == Some(w.key) => {
                continue
            }
            // Replace in the same transaction: the IP is never unmapped.
            Some(_) => reqs.push(msg::del_elem(w.ip)),
            None => {}
        }
        reqs.push(msg::new_elem(w.ip, &w.chain, w.key));
    }
    nl.batch(&reqs)
}

fn del_where(pred: impl Fn(&Elem) -> bool) -> Result<(), NftError> {
    let lock = lock_netns()?;
    with_socket(&lock, |nl| retry(|| del_once(nl, &pred)))
}

fn del_once(nl: &mut Nfnl, pred: &dyn Fn(&Elem) -> bool) -> Result<(), NftError> {
    let (m4, m6) = (dump_map(nl, MAP4)?, dump_map(nl, MAP6)?);
    let present: Vec<&str> = [(MAP4, m4.is_some()), (MAP6, m6.is_some())]
        .into_iter()
        .filter_map(|(m, p)| p.then_some(m))
        .collect();
    let (victims, remaining): (Vec<Elem>, Vec<Elem>) =
        m4.into_iter().chain(m6).flatten().partition(|e| pred(e));
    let drop_elems: Vec<Req> = victims.iter().map(|e| msg::del_elem(e.ip)).collect();
    let mut reqs = drop_elems.clone();
    let unused_chains: Vec<String> = if remaining.is_empty() {
        // Last element: remove the whole ruleset.
        let table_use = match nl.request(&msg::get_table()) {
            Ok(r) => msg::table_use(&r),
            Err(e) if e.errno() == Some(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        let chains = msg::chain_names(&nl.request(&msg::dump_chains())?);
        let ours = chains.iter().filter(|c| c.starts_with(OWN_PREFIX)).count() + present.len();
        if ours == 0 {
            return Ok(());
        }
        if table_use == Some(ours as u32) {
            // Only our objects live in the table: drop it whole.
            return nl.batch(&[msg::del_table()]);
        }
        // ferryd's objects share the table: remove only ours. The base chain
        // goes first: deleting its rules releases the maps.
        if chains.iter().any(|c| c == BASE_CHAIN) {
            reqs.push(msg::del_chain(BASE_CHAIN));
        }
        reqs.extend(present.into_iter().map(msg::del_set));
        chains
            .into_iter()
            .filter(|c| c.starts_with(NET_CHAIN_PREFIX))
            .collect()
    } else {
        // Network chains the victims used and no remaining element uses.
        let used: HashSet<&str> = remaining
            .iter()
            .filter_map(|e| e.chain.as_deref())
            .collect();
        let mut unused: Vec<String> = victims
            .iter()
            .filter_map(|e| e.chain.clone())
            .filter(|c| c.starts_with(NET_CHAIN_PREFIX) && !used.contains(c.as_str()))
            .collect();
        unused.sort_unstable();
        unused.dedup();
        unused
    };
    match nl.batch(&reqs) {
        // Something else still uses the base chain or a map (the transaction
        // did nothing): at least remove the elements.
        Err(e) if e.errno() == Some(Errno::EBUSY) && reqs.len() > drop_elems.len() => {
            nl.batch(&drop_elems)?
        }
        r => r?,
    }
    // One transaction per chain, so that a chain something else still jumps
    // to (EBUSY) does not keep the others.
    for c in unused_chains {
        match nl.batch(&[msg::del_chain(&c)]) {
            Err(e) if matches!(e.errno(), Some(Errno::EBUSY | Errno::ENOENT)) => {}
            r => r?,
        }
    }
    Ok(())
}

/// Elements of a map; `None` when the map (or the table) does not exist.
fn dump_map(nl: &mut Nfnl, map: &str) -> Result<Option<Vec<Elem>>, NftError> {
    match nl.request(&msg::dump_elems(map)) {
        Ok(r) => Ok(Some(msg::parse_elems(&r))),
        Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn chain_exists(nl: &mut Nfnl, name: &str) -> Result<bool, NftError> {
    match nl.request(&msg::get_chain(name)) {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Errors that mean "the ruleset is not what we read": read again, retry.
fn is_retryable(e: &NftError) -> bool {
    matches!(
        e.errno(),
        Some(Errno::ENOENT | Errno::EEXIST | Errno::EBUSY)
    )
}

/// Runs `f` again while it fails with a retryable error, a few times. Under
/// our lock only a foreign writer (ferryd, an admin) can cause that.
fn retry(mut f: impl FnMut() -> Result<(), NftError>) -> Result<(), NftError> {
    let mut attempt = 0;
    loop {
        match f() {
            Err(e) if is_retryable(&e) && attempt < 2 => attempt += 1,
            r => return r,
        }
    }
}

thread_local! {
    /// This thread's nfnetlink socket and the namespace (nsfs dev, inode)
    /// it was opened in. Kept open across calls on purpose: closing an
    /// nfnetlink socket makes the kernel flush nf_tables' deferred
    /// destruction work, which waits out an RCU grace period (10-20 ms
    /// measured here) whenever a delete was committed just before. Left
    /// open, that wait happens at thread or process exit and overlaps with
    /// whatever else the caller does meanwhile.
    static SOCKET: RefCell<Option<((u64, u64), Nfnl)>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's socket for the namespace `ns` (an open nsfs
/// file), opening one if the thread has none there yet.
fn with_socket<T>(
    ns: &File,
    f: impl FnOnce(&mut Nfnl) -> Result<T, NftError>,
) -> Result<T, NftError> {
    let meta = ns.metadata().map_err(NftError::Netns)?;
    let id = (meta.dev(), meta.ino());
    SOCKET.with_borrow_mut(|slot| {
        let nl = match slot {
            Some((sid, nl)) if *sid == id => nl,
            _ => &mut slot.insert((id, Nfnl::open()?)).1,
        };
        let r = f(nl);
        if r.is_err() {
            // Start afresh next time rather than reuse a socket that may
            // hold unread replies.
            *slot = None;
        }
        r
    })
}

/// Hand this thread's nfnetlink socket to a child that outlives the
/// process, so the kernel's flush on its close (an RCU grace period, 10-20
/// ms here, whenever any delete is pending in nf_tables; every commit
/// queues one) is not paid by a plugin the runtime is waiting for. The
/// child keeps only that socket and a pipe whose other end closes when we
/// exit; it has no stdio, so a runtime reading our stdout to EOF does not
/// wait for it either.
pub fn release_socket_in_background() {
    use nix::unistd::pipe2;
    use std::os::fd::AsRawFd;

    let Some((_, nl)) = SOCKET.with_borrow_mut(Option::take) else {
        return;
    };
    let Ok((wait_end, hold_end)) = pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
        return; // closing `nl` here just pays the wait ourselves
    };
    if keeper::spawn(nl.as_raw_fd(), wait_end.as_raw_fd()) {
        // Held open until we exit: that EOF releases the child.
        std::mem::forget(hold_end);
    }
    drop(wait_end);
    drop(nl);
}

/// The keeper child. Where raw syscalls are at hand it is cloned with
/// CLONE_VM: no page tables to copy and no copy-on-write faults for us
/// afterwards, and our exit leaves the address space to the keeper to
/// free. That child shares our memory and TLS, so it runs on its own stack
/// and makes only raw syscalls (no libc wrapper, which would write our
/// errno). Elsewhere it is an ordinary fork.
mod keeper {
    use std::os::fd::RawFd;

    /// Which descriptors the child keeps: the socket and the pipe's read end.
    struct Keep {
        sock: RawFd,
        wait: RawFd,
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn sys3(n: libc::c_long, a: usize, b: usize, c: usize) -> isize {
        let ret: isize;
        // SAFETY: the caller passes a syscall that takes three arguments.
        unsafe {
            core::arch::asm!("syscall", inlateout("rax") n as isize => ret,
                in("rdi") a, in("rsi") b, in("rdx") c,
                lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret
    }

    #[cfg(target_arch = "aarch64")]
    unsafe fn sys3(n: libc::c_long, a: usize, b: usize, c: usize) -> isize {
        let ret: isize;
        // SAFETY: the caller passes a syscall that takes three arguments.
        unsafe {
            core::arch::asm!("svc 0", in("x8") n, inlateout("x0") a as isize => ret,
                in("x1") b, in("x2") c, options(nostack));
        }
        ret
    }

    /// Closes everything but `keep` (stdio too), waits for EOF on the pipe,
    /// returns (the clone wrapper then exits this child).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the Keep the parent leaked for us; raw syscalls
        // only, on descriptors this child owns; failures are harmless.
        unsafe {
            let keep = &*(arg as *const Keep);
            let (lo, hi) = (keep.sock.min(keep.wait), keep.sock.max(keep.wait));
            let (lo, hi) = (lo as usize, hi as usize);
            if lo > 0 {
                sys3(libc::SYS_close_range, 0, lo - 1, 0);
            }
            if hi > lo + 1 {
                sys3(libc::SYS_close_range, lo + 1, hi - 1, 0);
            }
            sys3(libc::SYS_close_range, hi + 1, u32::MAX as usize, 0);
            let mut byte = 0u8;
            while sys3(
                libc::SYS_read,
                keep.wait as usize,
                &mut byte as *mut u8 as usize,
                1,
            ) == -(libc::EINTR as isize)
            {}
        }
        0
    }

    /// Starts the keeper; false when it could not (the caller then closes
    /// the socket itself).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub fn spawn(sock: RawFd, wait: RawFd) -> bool {
        const STACK: usize = 16 * 1024;
        // Leaked: the child runs on them after we are gone.
        let stack: &'static mut [u8] = Box::leak(vec![0u8; STACK].into_boxed_slice());
        let keep: &'static mut Keep = Box::leak(Box::new(Keep { sock, wait }));
        let top = stack.as_mut_ptr_range().end as usize & !15;
        // SAFETY: `child` touches only its own stack and `keep`, both
        // leaked, and makes raw syscalls; no CLONE_FILES, so its descriptor
        // table is its own copy.
        let pid = unsafe {
            libc::clone(
                child,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::SIGCHLD,
                (keep as *mut Keep).cast(),
            )
        };
        pid > 0
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    pub fn spawn(sock: RawFd, wait: RawFd) -> bool {
        use nix::unistd::{fork, ForkResult};
        // SAFETY: the plugin is single-threaded; the child only makes
        // syscalls and leaves with _exit.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => unsafe {
                let (lo, hi) = (sock.min(wait), sock.max(wait));
                if lo > 0 {
                    libc::close_range(0, (lo - 1) as u32, 0);
                }
                if hi > lo + 1 {
                    libc::close_range((lo + 1) as u32, (hi - 1) as u32, 0);
                }
                libc::close_range((hi + 1) as u32, u32::MAX, 0);
                let mut byte = 0u8;
                libc::read(wait, (&mut byte as *mut u8).cast(), 1);
                libc::_exit(0)
            },
            Ok(ForkResult::Parent { .. }) => true,
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(ip: &str, subnet: &str) -> MasqEntry<'a> {
        MasqEntry {
            network: "net",
            key: "net/c1/eth0",
            ip: ip.parse().unwrap(),
            subnet: subnet.parse().unwrap(),
        }
    }

    #[test]
    fn validate_canonicalises_subnet() {
        let a = validate(&[entry("10.22.0.5", "10.22.0.5/16")]).unwrap();
        let b = validate(&[entry("10.22.0.6", "10.22.0.0/16")]).unwrap();
        assert_eq!(a[0].chain, b[0].chain);
        assert_eq!(a[0].subnet.to_string(), "10.22.0.0/16");
    }

    #[test]
    fn validate_rejects_bad_entries() {
        let err = |e: MasqEntry| matches!(validate(&[e]), Err(NftError::InvalidEntry(_)));
        assert!(err(entry("10.23.0.5", "10.22.0.0/16")), "outside subnet");
        assert!(err(entry("fd00::1", "10.22.0.0/16")), "family mismatch");
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert!(err(MasqEntry {
            key: &long,
            ..entry("10.22.0.5", "10.22.0.0/16")
        }));
        assert!(err(MasqEntry {
            key: "",
            ..entry("10.22.0.5", "10.22.0.0/16")
        }));
        let ok = "k".repeat(MAX_KEY_LEN);
        assert!(validate(&[MasqEntry {
            key: &ok,
            ..entry("10.22.0.5", "10.22.0.0/16")
        }])
        .is_ok());
        let dup = [
            entry("10.22.0.5", "10.22.0.0/16"),
            entry("10.22.0.5", "10.22.0.0/16"),
        ];
        assert!(matches!(validate(&dup), Err(NftError::InvalidEntry(_))));
    }

    #[test]
    fn errno_is_matchable() {
        let e = NftError::Kernel {
            what: "x".into(),
            errno: Errno::EBUSY,
        };
        assert_eq!(e.errno(), Some(Errno::EBUSY));
        assert!(matches!(
            e,
            NftError::Kernel {
                errno: Errno::EBUSY,
                ..
            }
        ));
        assert!(e.to_string().contains("EBUSY"), "{e}");
    }
}
