//! UDP conntrack cleanup over ctnetlink, for Services.
//!
//! A UDP "connection" has no end the kernel can see: once a client's flow
//! to a ClusterIP (or a node port) is DNATed to an endpoint, every later
//! datagram of that flow follows the conntrack entry, not the rules. When
//! the endpoint goes, the flow is black-holed until the entry times out —
//! which for a client that keeps sending is never (kubernetes #125467,
//! #139628). So after a sync, entries whose original destination is a
//! Service but whose reply source is no longer one of its endpoints are
//! deleted, and only those: a flow to an endpoint that still serves keeps
//! its entry (a restart must not break valid flows, kubernetes #122740).
//!
//! Spoken over NETLINK_NETFILTER (subsystem NFNL_SUBSYS_CTNETLINK) in the
//! calling thread's network namespace: one dump of the UDP entries to the
//! destination, filtered in the kernel (CTA_FILTER, Linux ≥ 5.10; older
//! kernels dump all IPv4 entries and the filter is applied here), then one
//! IPCTNL_MSG_CT_DELETE per entry by its original tuple and id. Messages
//! are encoded by hand here (pure, unit-tested): the layout is a handful of
//! attributes, and parsing by hand keeps a dump of many entries cheap.

use std::collections::HashSet;
use std::io;
use std::net::Ipv4Addr;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// Deletes, in the calling thread's network namespace, the conntrack
/// entries of UDP flows whose original destination is `service` (a
/// ClusterIP:port or a node address:nodePort) and whose reply source is not
/// one of the endpoints in `keep`. Returns how many went.
pub fn delete_stale_udp(
    service: (Ipv4Addr, u16),
    keep: &HashSet<(Ipv4Addr, u16)>,
) -> io::Result<usize> {
    delete_udp_where(service, |e| !keep.contains(&(e.reply.src, e.reply.sport)))
}

/// Deletes every UDP entry whose original destination is exactly `dst`
/// (a Service that lost all its endpoints). Returns how many went.
pub fn delete_udp_to(dst: (Ipv4Addr, u16)) -> io::Result<usize> {
    delete_udp_where(dst, |_| true)
}

fn delete_udp_where(dst: (Ipv4Addr, u16), pred: impl Fn(&Entry) -> bool) -> io::Result<usize> {
    let mut ct = Ctnl::open()?;
    let entries = ct.dump_udp_to(dst)?;
    let victims: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.orig.is_udp_to(dst) && pred(e))
        .collect();
    ct.delete(&victims)
}

// ---- the pure part: tuples, entries, messages -------------------------------

/// One direction of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

impl Tuple {
    fn is_udp_to(&self, (ip, port): (Ipv4Addr, u16)) -> bool {
        self.proto == IPPROTO_UDP && self.dst == ip && self.dport == port
    }
}

/// A conntrack entry as a dump reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub orig: Tuple,
    pub reply: Tuple,
    /// The entry's id: a delete that names it spares a new entry that
    /// reused the tuple after the dump.
    pub id: Option<u32>,
    pub zone: Option<u16>,
}

const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;
const AF_INET: u8 = libc::AF_INET as u8;

// include/uapi/linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NFNETLINK_V0: u8 = 0;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
/// Which fields of the filter's CTA_TUPLE_ORIG must match
/// (CTA_FILTER_F_* in net/netfilter/nf_conntrack_netlink.c).
const CTA_FILTER_F_CTA_IP_DST: u32 = 1 << 1;
const CTA_FILTER_F_CTA_PROTO_NUM: u32 = 1 << 3;
const CTA_FILTER_F_CTA_PROTO_DST_PORT: u32 = 1 << 5;

const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends one attribute (and its padding).
fn put(b: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    b.extend_from_slice(&(len as u16).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(value);
    b.resize(align4(b.len()), 0);
}

/// Appends a nested attribute whose content `f` writes.
fn nest(b: &mut Vec<u8>, kind: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = b.len();
    b.extend_from_slice(&[0; 4]);
    f(b);
    let len = (b.len() - start) as u16;
    b[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    b[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

/// One netlink message of the ctnetlink subsystem: nlmsghdr, nfgenmsg, and
/// the attributes.
pub fn message(msg: u16, flags: u16, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    let mut b = Vec::with_capacity(align4(len));
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg).to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
                                              // nfgenmsg: IPv4 only, so that the kernel filters on the family too;
                                              // res_id is big-endian and unused here.
    b.extend_from_slice(&[AF_INET, NFNETLINK_V0, 0, 0]);
    b.extend_from_slice(attrs);
    b.resize(align4(b.len()), 0);
    b
}

/// The attributes of a dump of the UDP entries whose original destination
/// is `dst`: the tuple to match and which of its fields count.
pub fn dump_filter(dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut b = Vec::new();
    nest(&mut b, CTA_TUPLE_ORIG, |b| {
        nest(b, CTA_TUPLE_IP, |b| put(b, CTA_IP_V4_DST, &dst.0.octets()));
        nest(b, CTA_TUPLE_PROTO, |b| {
            put(b, CTA_PROTO_NUM, &[IPPROTO_UDP]);
            put(b, CTA_PROTO_DST_PORT, &dst.1.to_be_bytes());
        });
    });
    nest(&mut b, CTA_FILTER, |b| {
        let orig =
            CTA_FILTER_F_CTA_IP_DST | CTA_FILTER_F_CTA_PROTO_NUM | CTA_FILTER_F_CTA_PROTO_DST_PORT;
        // Host byte order: the kernel reads these with nla_get_u32.
        put(b, CTA_FILTER_ORIG_FLAGS, &orig.to_ne_bytes());
        put(b, CTA_FILTER_REPLY_FLAGS, &0u32.to_ne_bytes());
    });
    b
}

fn put_tuple(b: &mut Vec<u8>, kind: u16, t: &Tuple) {
    nest(b, kind, |b| {
        nest(b, CTA_TUPLE_IP, |b| {
            put(b, CTA_IP_V4_SRC, &t.src.octets());
            put(b, CTA_IP_V4_DST, &t.dst.octets());
        });
        nest(b, CTA_TUPLE_PROTO, |b| {
            put(b, CTA_PROTO_NUM, &[t.proto]);
            put(b, CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
            put(b, CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
        });
    });
}

/// The attributes of the delete of one entry: its original tuple (always:
/// a CT_DELETE without a tuple flushes the whole table), its zone and its
/// id.
pub fn delete_attrs(e: &Entry) -> Vec<u8> {
    let mut b = Vec::new();
    put_tuple(&mut b, CTA_TUPLE_ORIG, &e.orig);
    if let Some(z) = e.zone {
        put(&mut b, CTA_ZONE, &z.to_be_bytes());
    }
    if let Some(id) = e.id {
        put(&mut b, CTA_ID, &id.to_be_bytes());
    }
    b
}

/// The attributes in `b` as (type without flags, value); stops at the
/// first malformed one.
fn nlas(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = &b[align4(len).min(b.len())..];
        Some((kind, value))
    })
}

fn nla(b: &[u8], kind: u16) -> Option<&[u8]> {
    nlas(b).find_map(|(k, v)| (k == kind).then_some(v))
}

fn parse_tuple(b: &[u8]) -> Option<Tuple> {
    let ip = nla(b, CTA_TUPLE_IP)?;
    let proto = nla(b, CTA_TUPLE_PROTO)?;
    let v4 = |k| Some(Ipv4Addr::from(<[u8; 4]>::try_from(nla(ip, k)?).ok()?));
    let port = |k| Some(u16::from_be_bytes(nla(proto, k)?.try_into().ok()?));
    Some(Tuple {
        // IPv6 entries carry CTA_IP_V6_*: not ours, skipped.
        src: v4(CTA_IP_V4_SRC)?,
        dst: v4(CTA_IP_V4_DST)?,
        proto: *nla(proto, CTA_PROTO_NUM)?.first()?,
        sport: port(CTA_PROTO_SRC_PORT)?,
        dport: port(CTA_PROTO_DST_PORT)?,
    })
}

/// An entry from the attributes of an IPCTNL_MSG_CT_NEW (after nfgenmsg);
/// `None` for what is not an IPv4 entry with ports.
pub fn parse_entry(attrs: &[u8]) -> Option<Entry> {
    Some(Entry {
        orig: parse_tuple(nla(attrs, CTA_TUPLE_ORIG)?)?,
        reply: parse_tuple(nla(attrs, CTA_TUPLE_REPLY)?)?,
        id: nla(attrs, CTA_ID).and_then(|v| Some(u32::from_be_bytes(v.try_into().ok()?))),
        zone: nla(attrs, CTA_ZONE).and_then(|v| Some(u16::from_be_bytes(v.try_into().ok()?))),
    })
}

// ---- the I/O edge -----------------------------------------------------------

/// What one netlink message from the kernel says.
enum Reply<'a> {
    Entry(&'a [u8]),
    Done,
    /// Ack (0) or -errno.
    Status(i32),
    Other,
}

struct Ctnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// Enough for any datagram: the kernel sizes dump skbs at most 32 KiB.
const RECV_BUF: usize = 64 * 1024;
/// Deletes sent per datagram: their acks must fit the receive buffer.
const DELETES_PER_SEND: usize = 128;

impl Ctnl {
    fn open() -> io::Result<Ctnl> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Errors need not echo our requests back.
        let _ = sock.set_cap_ack(true);
        Ok(Ctnl {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Reads one datagram and hands each message in it, with its sequence
    /// number and whether a dump was interrupted, to `f`.
    fn recv(&mut self, mut f: impl FnMut(u32, bool, Reply)) -> io::Result<()> {
        self.buf.clear();
        let n = loop {
            match self.sock.recv(&mut self.buf, libc::MSG_TRUNC) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        if n > self.buf.len() {
            return Err(io::Error::other(format!(
                "ctnetlink datagram of {n} bytes truncated"
            )));
        }
        let mut rest = &self.buf[..];
        while rest.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(io::Error::other(format!(
                    "bad netlink message length {len}"
                )));
            }
            let ty = u16::from_ne_bytes([rest[4], rest[5]]);
            let flags = u16::from_ne_bytes([rest[6], rest[7]]);
            let seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
            let payload = &rest[NLMSG_HDRLEN..len];
            let reply = match ty {
                NLMSG_ERROR => match payload.get(0..4) {
                    Some(c) => Reply::Status(i32::from_ne_bytes(c.try_into().expect("4 bytes"))),
                    None => return Err(io::Error::other("short NLMSG_ERROR")),
                },
                NLMSG_DONE => Reply::Done,
                t if t == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
                    && payload.len() >= NFGENMSG_LEN =>
                {
                    Reply::Entry(&payload[NFGENMSG_LEN..])
                }
                _ => Reply::Other,
            };
            f(seq, flags & NLM_F_DUMP_INTR != 0, reply);
            rest = &rest[align4(len).min(rest.len())..];
        }
        Ok(())
    }

    /// The UDP entries to `dst` (more, on kernels that cannot filter).
    fn dump_udp_to(&mut self, dst: (Ipv4Addr, u16)) -> io::Result<Vec<Entry>> {
        let mut attempt = 0;
        let mut filter = dump_filter(dst);
        loop {
            match self.dump_once(&filter) {
                // The table changed during the dump: its view may be torn.
                Err(e) if e.raw_os_error() == Some(libc::EINTR) && attempt < 5 => attempt += 1,
                // Before CTA_FILTER (Linux 5.10): an unfiltered dump; the
                // caller's own filter decides.
                Err(e)
                    if !filter.is_empty()
                        && matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) =>
                {
                    filter.clear()
                }
                r => return r,
            }
        }
    }

    fn dump_once(&mut self, filter: &[u8]) -> io::Result<Vec<Entry>> {
        let seq = self.next_seq();
        let req = message(
            IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_DUMP,
            seq,
            filter,
        );
        self.sock.send(&req, 0)?;
        let mut entries = Vec::new();
        let (mut done, mut status, mut interrupted) = (false, 0, false);
        while !done {
            self.recv(|s, intr, reply| {
                if s != seq || done {
                    return;
                }
                interrupted |= intr;
                match reply {
                    Reply::Entry(attrs) => entries.extend(parse_entry(attrs)),
                    Reply::Done => done = true,
                    Reply::Status(code) => {
                        status = code;
                        done = true;
                    }
                    Reply::Other => {}
                }
            })?;
        }
        if status != 0 {
            return Err(io::Error::from_raw_os_error(-status));
        }
        if interrupted {
            return Err(io::Error::from_raw_os_error(libc::EINTR));
        }
        Ok(entries)
    }

    /// Deletes the entries; one already gone (ENOENT: expired, or deleted
    /// by someone else, or its tuple now belongs to a newer entry) is not
    /// counted and not an error. Returns how many this call deleted.
    fn delete(&mut self, entries: &[&Entry]) -> io::Result<usize> {
        let mut deleted = 0;
        let mut first_err = None;
        for chunk in entries.chunks(DELETES_PER_SEND) {
            let mut out = Vec::new();
            let first = self.seq.wrapping_add(1);
            for e in chunk {
                let seq = self.next_seq();
                out.extend(message(
                    IPCTNL_MSG_CT_DELETE,
                    NLM_F_REQUEST | NLM_F_ACK,
                    seq,
                    &delete_attrs(e),
                ));
            }
            self.sock.send(&out, 0)?;
            let mut answered = 0;
            while answered < chunk.len() {
                self.recv(|s, _, reply| {
                    let Reply::Status(code) = reply else { return };
                    if s.wrapping_sub(first) as usize >= chunk.len() {
                        return;
                    }
                    answered += 1;
                    match -code {
                        0 => deleted += 1,
                        libc::ENOENT => {}
                        errno => {
                            first_err.get_or_insert(errno);
                        }
                    }
                })?;
            }
        }
        match first_err {
            None => Ok(deleted),
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: IPPROTO_UDP,
            sport,
            dport,
        }
    }

    /// conntrack-tools 1.4.7's `conntrack -D -p udp -s 10.0.0.2 -d
    /// 10.96.0.10 --sport 5353 --dport 53` sends this CTA_TUPLE_ORIG byte
    /// for byte (seen with `strace -e sendto -xx`); zone and id follow.
    #[test]
    #[cfg(target_endian = "little")]
    fn delete_encoding() {
        let e = Entry {
            orig: t("10.0.0.2", 5353, "10.96.0.10", 53),
            reply: t("10.244.1.5", 5353, "10.0.0.2", 5353),
            id: Some(0x0102_0304),
            zone: Some(7),
        };
        let want: Vec<u8> = [
            &[52, 0, 1, 0x80][..], // CTA_TUPLE_ORIG
            &[20, 0, 1, 0x80],     // CTA_TUPLE_IP
            &[8, 0, 1, 0, 10, 0, 0, 2],
            &[8, 0, 2, 0, 10, 96, 0, 10],
            &[28, 0, 2, 0x80], // CTA_TUPLE_PROTO
            &[5, 0, 1, 0, 17, 0, 0, 0],
            &[6, 0, 2, 0, 0x14, 0xe9, 0, 0],
            &[6, 0, 3, 0, 0, 53, 0, 0],
            &[6, 0, 18, 0, 0, 7, 0, 0], // CTA_ZONE
            &[8, 0, 12, 0, 1, 2, 3, 4], // CTA_ID
        ]
        .concat();
        assert_eq!(delete_attrs(&e), want);
        let without = delete_attrs(&Entry {
            id: None,
            zone: None,
            ..e
        });
        assert_eq!(without, want[..52]);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn dump_filter_encoding() {
        let b = dump_filter(("10.96.0.10".parse().unwrap(), 53));
        let want: Vec<u8> = [
            &[36, 0, 1, 0x80][..],
            &[12, 0, 1, 0x80, 8, 0, 2, 0, 10, 96, 0, 10],
            &[20, 0, 2, 0x80],
            &[5, 0, 1, 0, 17, 0, 0, 0],
            &[6, 0, 3, 0, 0, 53, 0, 0],
            &[20, 0, 25, 0x80], // CTA_FILTER
            &[8, 0, 1, 0, 0x2a, 0, 0, 0],
            &[8, 0, 2, 0, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(b, want);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn message_header() {
        let m = message(
            IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            9,
            &[1, 2, 3],
        );
        assert_eq!(m.len(), 24, "padded to 4 bytes");
        assert_eq!(&m[0..4], &23u32.to_ne_bytes(), "length without padding");
        assert_eq!(&m[4..6], &[2, 1], "type: subsystem 1, message 2");
        assert_eq!(&m[6..8], &5u16.to_ne_bytes());
        assert_eq!(&m[8..12], &9u32.to_ne_bytes());
        assert_eq!(&m[16..20], &[libc::AF_INET as u8, 0, 0, 0]);
        assert_eq!(&m[20..], &[1, 2, 3, 0]);
    }

    /// The kernel reports an entry with the same tuple layout, plus other
    /// attributes (status, timeout, counters...) in between.
    #[test]
    fn parses_entries() {
        let e = Entry {
            orig: t("10.0.0.2", 40000, "10.96.0.10", 53),
            reply: t("10.244.1.5", 5353, "10.0.0.2", 40000),
            id: Some(77),
            zone: None,
        };
        let mut attrs = Vec::new();
        put_tuple(&mut attrs, CTA_TUPLE_ORIG, &e.orig);
        put(&mut attrs, 3, &0x188u32.to_be_bytes()); // CTA_STATUS
        put_tuple(&mut attrs, CTA_TUPLE_REPLY, &e.reply);
        put(&mut attrs, CTA_ID, &77u32.to_be_bytes());
        assert_eq!(parse_entry(&attrs), Some(e));
        // An IPv6 entry (CTA_IP_V6_SRC 3 / DST 4) is not ours.
        let mut v6 = Vec::new();
        for kind in [CTA_TUPLE_ORIG, CTA_TUPLE_REPLY] {
            nest(&mut v6, kind, |b| {
                nest(b, CTA_TUPLE_IP, |b| {
                    put(b, 3, &[0; 16]);
                    put(b, 4, &[0; 16]);
                });
                nest(b, CTA_TUPLE_PROTO, |b| {
                    put(b, CTA_PROTO_NUM, &[IPPROTO_UDP]);
                    put(b, CTA_PROTO_SRC_PORT, &[0, 1]);
                    put(b, CTA_PROTO_DST_PORT, &[0, 2]);
                });
            });
        }
        assert_eq!(parse_entry(&v6), None);
        // Cut inside the reply tuple: no entry rather than half of one.
        assert_eq!(parse_entry(&attrs[..52 + 8 + 30]), None, "truncated");
    }

    #[test]
    fn only_udp_to_the_exact_destination() {
        let svc = ("10.96.0.10".parse().unwrap(), 53);
        assert!(t("10.0.0.2", 1, "10.96.0.10", 53).is_udp_to(svc));
        assert!(!t("10.0.0.2", 1, "10.96.0.10", 54).is_udp_to(svc));
        assert!(!t("10.0.0.2", 1, "10.96.0.11", 53).is_udp_to(svc));
        let tcp = Tuple {
            proto: libc::IPPROTO_TCP as u8,
            ..t("10.0.0.2", 1, "10.96.0.10", 53)
        };
        assert!(!tcp.is_udp_to(svc));
    }
}
