//! nftables over netlink, shared by ferry's plugin and ferryd.
//!
//! Why not a crate that does this already: `rustables` is GPL-3.0, the
//! `nftnl`/`mnl` crates bind libnftnl and libmnl (GPL/LGPL C libraries), and
//! the `nftables` crate drives the `nft` binary, whose start-up alone (~5 ms)
//! is more than a plugin's whole ADD. netlink-packet-netfilter (MIT) gives
//! the message types; this crate adds what ferry needs on top:
//!
//! - [`Table`]: builders of table, chain, set, element and rule requests for
//!   one table — the plugin's `inet ferry`, ferryd's Services table;
//! - [`expr`]: the expressions a proxy needs (payload, meta, cmp, lookup and
//!   verdict maps, concatenated keys, numgen, ct, nat, masquerade, fib,
//!   reject, dynamic set updates with timeouts);
//! - [`Nfnl`]: a synchronous socket that sends a list of requests as one
//!   atomic transaction, asking for an ACK only where it must;
//! - [`reply`]: parsers of what the kernel sends back (dumps, elements).
//!
//! Everything but [`Nfnl`] is pure: the builders are tested against the
//! bytes `nft` itself sends for the same objects.

pub mod expr;
pub mod reply;
mod sock;
mod table;

use nix::errno::Errno;

pub use netlink_packet_netfilter::nftables::NfTablesMessage;
pub use reply::RawMsg;
pub use sock::Nfnl;
pub use table::{Chain, Elem, ElemData, Hook, SetRef, SetSpec, Table, NFT_DATA_VERDICT};

/// One nf_tables request: the message, its NLM_F_* modifiers (REQUEST and,
/// where needed, ACK are added by the sender) and what it does, for error
/// messages.
#[derive(Debug, Clone)]
pub struct Req {
    pub msg: NfTablesMessage,
    pub flags: u16,
    pub what: String,
}

#[derive(thiserror::Error, Debug)]
pub enum NftError {
    #[error("invalid nftables input: {0}")]
    InvalidEntry(String),
    /// Opening or locking the thread's network namespace file.
    #[error("network namespace file: {0}")]
    Netns(#[source] std::io::Error),
    #[error("netfilter netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The kernel refused a request; `errno` is what it said (ENOENT,
    /// EEXIST, EBUSY, EPERM...).
    #[error("nftables: {what}: {errno}")]
    Kernel { what: String, errno: Errno },
    #[error("decoding a netfilter netlink reply: {0}")]
    Decode(String),
}

impl NftError {
    /// The errno behind the error, if there is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NftError::Kernel { errno, .. } => Some(*errno),
            NftError::Netns(e) | NftError::Socket(e) => e.raw_os_error().map(Errno::from_raw),
            _ => None,
        }
    }
}

/// The calling thread's network namespace. `/proc/thread-self`, not
/// `/proc/self`: setns(2) moves only the calling thread, and `/proc/self`
/// names the thread-group leader.
pub const NETNS_FILE: &str = "/proc/thread-self/ns/net";

/// The lock every writer of a namespace's nftables takes (the plugin's
/// processes and ferryd alike), so that their read-modify-write sequences
/// never interleave: an exclusive flock(2) on the namespace's nsfs file,
/// whose inode every process that opens it shares. Held until dropped.
pub fn lock_netns() -> Result<nix::fcntl::Flock<std::fs::File>, NftError> {
    use nix::fcntl::{Flock, FlockArg};
    let mut file = std::fs::File::open(NETNS_FILE).map_err(NftError::Netns)?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusive) {
            Ok(l) => return Ok(l),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, e)) => return Err(NftError::Netns(e.into())),
        }
    }
}

/// 64-bit FNV-1a: stable short names for chains derived from what they
/// serve (a network, a Service port), the same across versions and hosts.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = Fnv64::default();
    std::hash::Hasher::write(&mut h, bytes);
    std::hash::Hasher::finish(&h)
}

/// [`fnv1a64`] as a `Hasher`, for fingerprints of derived-`Hash` values
/// that must not change between runs (std's hashers are seeded).
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv64 {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Longest comment an element can carry: it travels as an nftnl "comment"
/// TLV (u8 length that counts the NUL) and the kernel caps element userdata
/// at 256 bytes.
pub const MAX_COMMENT_LEN: usize = 253;

const UDATA_SET_ELEM_COMMENT: u8 = 0;

/// Element userdata in nftnl's TLV format, as a comment: `nft list` shows
/// `comment "<text>"`.
pub fn comment_udata(text: &str) -> Vec<u8> {
    debug_assert!(text.len() <= MAX_COMMENT_LEN);
    let mut v = Vec::with_capacity(text.len() + 3);
    v.push(UDATA_SET_ELEM_COMMENT);
    v.push((text.len() + 1) as u8);
    v.extend_from_slice(text.as_bytes());
    v.push(0);
    v
}

/// The comment of element userdata, if any.
pub fn parse_comment_udata(mut b: &[u8]) -> Option<String> {
    while b.len() >= 2 {
        let (t, len) = (b[0], usize::from(b[1]));
        let val = b.get(2..2 + len)?;
        if t == UDATA_SET_ELEM_COMMENT {
            let s = val.strip_suffix(&[0]).unwrap_or(val);
            return String::from_utf8(s.to_vec()).ok();
        }
        b = &b[2 + len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_known_vectors() {
        // Published FNV-1a 64-bit test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn comment_udata_round_trip() {
        let u = comment_udata("net/abc/eth0");
        // Exactly what nft writes for `comment "net/abc/eth0"`.
        assert_eq!(&u[..2], &[0, 13]);
        assert_eq!(&u[2..], b"net/abc/eth0\0");
        assert_eq!(parse_comment_udata(&u).as_deref(), Some("net/abc/eth0"));
        assert_eq!(parse_comment_udata(&[]), None);
        assert_eq!(parse_comment_udata(&[0, 9, b'x']), None, "truncated TLV");
        // Another TLV before the comment is skipped.
        let mut v = vec![5, 1, 0];
        v.extend(comment_udata("k"));
        assert_eq!(parse_comment_udata(&v).as_deref(), Some("k"));
    }
}
