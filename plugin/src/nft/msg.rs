//! Pure builders of the nf_tables messages for the masquerade ruleset, and
//! parsers of the kernel's replies. No I/O here.
//!
//! The encodings mirror what `nft` 1.0.6 sends for the same ruleset (checked
//! with `nft --debug=mnl`), so `nft list ruleset` prints exactly the
//! ruleset documented in `nft.rs`, comments on the elements included.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use netlink_packet_core::{NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, Expressions, Hook, HookNumber,
    Immediate, InetHookNumber, ListAttribute, Lookup, Meta, MetaKey, NfTablesMessage, Operator,
    Payload, Register, RuleAttribute, RuleMessage, SetAttribute, SetElementAttribute,
    SetElementList, SetElementMessage, SetFlags, SetMessage, TableAttribute, TableMessage, Verdict,
    VerdictAttribute,
};

pub const TABLE: &str = "ferry";
pub const MAP4: &str = "cni-masq4";
pub const MAP6: &str = "cni-masq6";
pub const BASE_CHAIN: &str = "cni-postrouting";
/// Every object the plugin owns in the shared table starts with this.
pub const OWN_PREFIX: &str = "cni-";
pub const NET_CHAIN_PREFIX: &str = "cni-n-";

/// Longest attachment key: it travels as an nftnl "comment" TLV (u8 length
/// that counts the NUL) and the kernel caps element userdata at 256 bytes.
pub const MAX_KEY_LEN: usize = 253;

const NFPROTO_IPV4: u8 = libc::NFPROTO_IPV4 as u8;
const NFPROTO_IPV6: u8 = libc::NFPROTO_IPV6 as u8;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
/// nft's datatype ids (`enum datatypes` in nftables' datatype.h).
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;
const NF_ACCEPT: u32 = 1;
/// `priority srcnat`.
const NF_IP_PRI_NAT_SRC: u32 = 100;
/// nftnl udata types: set key byte order / data byte order / data interval,
/// and the element comment.
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const UDATA_SET_DATA_INTERVAL: u8 = 6;
const UDATA_SET_ELEM_COMMENT: u8 = 0;
/// nft's `BYTEORDER_BIG_ENDIAN`.
const BYTEORDER_BIG_ENDIAN: u32 = 2;

/// One nf_tables request: the message, its NLM_F_* modifiers (REQUEST and
/// ACK are added by the sender) and what it does, for error messages.
#[derive(Debug, Clone)]
pub struct Req {
    pub msg: NfTablesMessage,
    pub flags: u16,
    pub what: String,
}

fn req(msg: NfTablesMessage, flags: u16, what: String) -> Req {
    Req { msg, flags, what }
}

/// The map holding the elements of `ip`'s family.
pub fn map_for(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        MAP4
    } else {
        MAP6
    }
}

/// The chain of one (network, subnet): `cni-n-` and the 64-bit FNV-1a hash
/// of `"<network>|<subnet>"` in 16 hex digits. Stable across versions and
/// hosts; `subnet` is used as given (callers pass it canonical).
pub fn net_chain_name(network: &str, subnet: &IpNetwork) -> String {
    let h = fnv1a64(format!("{network}|{subnet}").as_bytes());
    format!("{NET_CHAIN_PREFIX}{h:016x}")
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

// ---- tables, sets, chains -------------------------------------------------

pub fn new_table() -> Req {
    let msg = NfTablesMessage::NewTable(TableMessage {
        attributes: vec![TableAttribute::Name(TABLE.into())],
    });
    // No EXCL: the table may exist (ours, or made by ferryd).
    req(msg, NLM_F_CREATE, format!("add table inet {TABLE}"))
}

pub fn get_table() -> Req {
    let msg = NfTablesMessage::GetTable(TableMessage {
        attributes: vec![TableAttribute::Name(TABLE.into())],
    });
    req(msg, 0, format!("get table inet {TABLE}"))
}

pub fn del_table() -> Req {
    let msg = NfTablesMessage::DeleteTable(TableMessage {
        attributes: vec![TableAttribute::Name(TABLE.into())],
    });
    req(msg, 0, format!("delete table inet {TABLE}"))
}

/// `map cni-masq4 { type ipv4_addr : verdict; }` (or the v6 one).
pub fn new_map(v6: bool) -> Req {
    let (name, key_type, key_len, id) = if v6 {
        (MAP6, TYPE_IPV6_ADDR, 16, 2)
    } else {
        (MAP4, TYPE_IPV4_ADDR, 4, 1)
    };
    // Same userdata as nft writes, so `nft list` renders the map as its own.
    let mut udata = Vec::with_capacity(18);
    for (t, v) in [
        (UDATA_SET_KEYBYTEORDER, BYTEORDER_BIG_ENDIAN),
        (UDATA_SET_DATABYTEORDER, 0),
        (UDATA_SET_DATA_INTERVAL, 0),
    ] {
        udata.extend_from_slice(&[t, 4]);
        udata.extend_from_slice(&v.to_ne_bytes());
    }
    let msg = NfTablesMessage::NewSet(SetMessage {
        attributes: vec![
            SetAttribute::Table(TABLE.into()),
            SetAttribute::Name(name.into()),
            SetAttribute::Flags(SetFlags::Map),
            SetAttribute::KeyType(key_type),
            SetAttribute::KeyLen(key_len),
            SetAttribute::DataType(NFT_DATA_VERDICT),
            // Verdict maps carry no fixed data length (nft sends 0 too).
            SetAttribute::DataLen(0),
            // Lets a rule of the same batch find the set by id as well.
            SetAttribute::Id(id),
            SetAttribute::UserData(udata),
        ],
    });
    // No EXCL: an existing identical map is fine.
    req(msg, NLM_F_CREATE, format!("add map inet {TABLE} {name}"))
}

pub fn del_set(name: &str) -> Req {
    let msg = NfTablesMessage::DeleteSet(SetMessage {
        attributes: vec![
            SetAttribute::Table(TABLE.into()),
            SetAttribute::Name(name.into()),
        ],
    });
    req(msg, 0, format!("delete map inet {TABLE} {name}"))
}

/// `chain cni-postrouting { type nat hook postrouting priority srcnat; policy accept; }`
pub fn new_base_chain() -> Req {
    let msg = NfTablesMessage::NewChain(ChainMessage {
        attributes: vec![
            ChainAttribute::Table(TABLE.into()),
            ChainAttribute::Name(BASE_CHAIN.into()),
            ChainAttribute::Type("nat".into()),
            ChainAttribute::Policy(NF_ACCEPT),
            ChainAttribute::Hook(vec![
                Hook::Number(HookNumber::Inet(InetHookNumber::PostRouting)),
                Hook::Priority(NF_IP_PRI_NAT_SRC),
            ]),
        ],
    });
    // EXCL: the rules follow in the same batch, so an existing chain must
    // abort the batch rather than get its rules twice.
    req(
        msg,
        NLM_F_CREATE | NLM_F_EXCL,
        format!("add chain inet {TABLE} {BASE_CHAIN}"),
    )
}

/// A regular chain; EXCL for the same reason as the base chain.
pub fn new_chain(name: &str) -> Req {
    let msg = NfTablesMessage::NewChain(ChainMessage {
        attributes: vec![
            ChainAttribute::Table(TABLE.into()),
            ChainAttribute::Name(name.into()),
        ],
    });
    req(
        msg,
        NLM_F_CREATE | NLM_F_EXCL,
        format!("add chain inet {TABLE} {name}"),
    )
}

pub fn get_chain(name: &str) -> Req {
    let msg = NfTablesMessage::GetChain(ChainMessage {
        attributes: vec![
            ChainAttribute::Table(TABLE.into()),
            ChainAttribute::Name(name.into()),
        ],
    });
    req(msg, 0, format!("get chain inet {TABLE} {name}"))
}

/// Dump of every inet chain: the kernel does not filter chain dumps by
/// table, so callers keep those of [`TABLE`] ([`chain_names`]).
pub fn dump_chains() -> Req {
    let msg = NfTablesMessage::GetChain(ChainMessage { attributes: vec![] });
    req(msg, NLM_F_DUMP, "list chains".into())
}

/// Deletes the chain and its rules; the kernel answers EBUSY while a map
/// element (or a rule) still jumps to it.
pub fn del_chain(name: &str) -> Req {
    let msg = NfTablesMessage::DeleteChain(ChainMessage {
        attributes: vec![
            ChainAttribute::Table(TABLE.into()),
            ChainAttribute::Name(name.into()),
        ],
    });
    req(msg, 0, format!("delete chain inet {TABLE} {name}"))
}

// ---- rules ----------------------------------------------------------------

fn rule(chain: &str, exprs: Vec<Expressions>, what: String) -> Req {
    let msg = NfTablesMessage::NewRule(RuleMessage {
        attributes: vec![
            RuleAttribute::Table(TABLE.into()),
            RuleAttribute::Chain(chain.into()),
            RuleAttribute::Expressions(exprs.into_iter().map(Into::into).collect()),
        ],
    });
    req(msg, NLM_F_CREATE | NLM_F_APPEND, what)
}

/// `meta nfproto ipv4|ipv6`: the table is inet, so every address match
/// first pins the family.
fn nfproto_is(v6: bool) -> [Expressions; 2] {
    let proto = if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
    [
        Expressions::Meta(vec![
            Meta::Key(MetaKey::Nfproto),
            Meta::DestinationRegister(Register::Reg1),
        ]),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::Equal),
            Cmp::Data(DataAttribute::Value(vec![proto])),
        ]),
    ]
}

fn load_network_header(offset: u32, len: u32) -> Expressions {
    Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(NFT_PAYLOAD_NETWORK_HEADER),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
}

/// `meta nfproto ipv4 ip saddr vmap @cni-masq4` (or the ip6 one).
pub fn base_rule(v6: bool) -> Req {
    // saddr: IPv4 header offset 12, IPv6 header offset 8.
    let (map, saddr) = if v6 {
        (MAP6, load_network_header(8, 16))
    } else {
        (MAP4, load_network_header(12, 4))
    };
    let mut exprs = nfproto_is(v6).to_vec();
    exprs.push(saddr);
    exprs.push(Expressions::Lookup(vec![
        Lookup::Set(map.into()),
        Lookup::SourceRegister(Register::Reg1),
        // dreg = verdict register: the lookup is a vmap.
        Lookup::DestinationRegister(Register::Verdict),
        Lookup::SetId(if v6 { 2 } else { 1 }),
    ]));
    rule(
        BASE_CHAIN,
        exprs,
        format!("add rule inet {TABLE} {BASE_CHAIN} (saddr vmap @{map})"),
    )
}

/// `ip daddr <net> return` / `ip6 daddr <net> return`, encoded exactly as
/// nft does so that it lists back as a prefix: a byte-aligned prefix loads
/// and compares only its bytes; any other loads the whole address and masks
/// it.
fn daddr_return(net: IpNetwork) -> Vec<Expressions> {
    let v6 = net.is_ipv6();
    let offset = if v6 { 24 } else { 16 };
    let prefix = usize::from(net.prefix());
    let mut addr = ip_bytes(net.network());
    let mut exprs = nfproto_is(v6).to_vec();
    if prefix > 0 && prefix % 8 == 0 {
        addr.truncate(prefix / 8);
        exprs.push(load_network_header(offset, addr.len() as u32));
    } else {
        let len = addr.len();
        let mask: Vec<u8> = (0..len)
            .map(|i| {
                let bits = prefix.saturating_sub(i * 8).min(8);
                (0xff00u16 >> bits) as u8
            })
            .collect();
        exprs.push(load_network_header(offset, len as u32));
        exprs.push(Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(len as u32),
            Bitwise::Mask(DataAttribute::Value(mask)),
            Bitwise::Xor(DataAttribute::Value(vec![0; len])),
        ]));
    }
    exprs.push(Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(Operator::Equal),
        Cmp::Data(DataAttribute::Value(addr)),
    ]));
    exprs.push(Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
            Verdict::Return,
        )])),
    ]));
    exprs
}

/// The rules of a network chain: no masquerade towards the pod's own
/// subnet nor multicast, masquerade everything else (the reference bridge
/// plugin's ipMasq).
pub fn net_rules(chain: &str, subnet: IpNetwork) -> [Req; 3] {
    let multicast: IpNetwork = if subnet.is_ipv6() {
        "ff00::/8".parse().expect("valid literal")
    } else {
        "224.0.0.0/4".parse().expect("valid literal")
    };
    let masq = Expressions::Other {
        expression_type: "masq".into(),
        attributes: vec![],
    };
    [
        rule(
            chain,
            daddr_return(subnet),
            format!("add rule inet {TABLE} {chain} (daddr {subnet} return)"),
        ),
        rule(
            chain,
            daddr_return(multicast),
            format!("add rule inet {TABLE} {chain} (daddr {multicast} return)"),
        ),
        rule(
            chain,
            vec![masq],
            format!("add rule inet {TABLE} {chain} (masquerade)"),
        ),
    ]
}

// ---- map elements ---------------------------------------------------------

fn elem_msg(ip: IpAddr, mut attrs: Vec<SetElementAttribute>) -> NfTablesMessage {
    attrs.insert(
        0,
        SetElementAttribute::Key(DataAttribute::Value(ip_bytes(ip))),
    );
    NfTablesMessage::NewSetElement(SetElementMessage {
        attributes: vec![
            SetElementList::Table(TABLE.into()),
            SetElementList::Set(map_for(ip).into()),
            SetElementList::Elements(vec![ListAttribute::Element(attrs)]),
        ],
    })
}

/// `<ip> comment "<key>" : goto <chain>`. EXCL so that an existing element
/// (maybe with another key) is reported rather than silently kept.
pub fn new_elem(ip: IpAddr, chain: &str, key: &str) -> Req {
    let msg = elem_msg(
        ip,
        vec![
            SetElementAttribute::Data(DataAttribute::Verdict(vec![
                VerdictAttribute::Code(Verdict::Goto),
                VerdictAttribute::Chain(chain.into()),
            ])),
            SetElementAttribute::UserData(key_udata(key)),
        ],
    );
    req(
        msg,
        NLM_F_CREATE | NLM_F_EXCL,
        format!("add element inet {TABLE} {} {ip} ({key})", map_for(ip)),
    )
}

pub fn del_elem(ip: IpAddr) -> Req {
    let NfTablesMessage::NewSetElement(m) = elem_msg(ip, vec![]) else {
        unreachable!("elem_msg builds NewSetElement")
    };
    req(
        NfTablesMessage::DeleteSetElement(m),
        0,
        format!("delete element inet {TABLE} {} {ip}", map_for(ip)),
    )
}

pub fn dump_elems(map: &str) -> Req {
    let msg = NfTablesMessage::GetSetElement(SetElementMessage {
        attributes: vec![
            SetElementList::Table(TABLE.into()),
            SetElementList::Set(map.into()),
        ],
    });
    req(msg, NLM_F_DUMP, format!("list map inet {TABLE} {map}"))
}

/// Element userdata in nftnl's TLV format, as a comment: `nft list` shows
/// `comment "<key>"`.
pub fn key_udata(key: &str) -> Vec<u8> {
    debug_assert!(key.len() <= MAX_KEY_LEN);
    let mut v = Vec::with_capacity(key.len() + 3);
    v.push(UDATA_SET_ELEM_COMMENT);
    v.push((key.len() + 1) as u8);
    v.extend_from_slice(key.as_bytes());
    v.push(0);
    v
}

/// The comment of element userdata, if any.
pub fn parse_key_udata(mut b: &[u8]) -> Option<String> {
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

// ---- reply parsers ---------------------------------------------------------

/// An nf_tables message from the kernel: its NFT_MSG_* type and its
/// attributes (after the nfgenmsg header), parsed lazily by the functions
/// below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMsg {
    pub kind: u8,
    pub attrs: Vec<u8>,
}

// include/uapi/linux/netfilter/nf_tables.h
const NFT_MSG_NEWTABLE: u8 = 0;
const NFT_MSG_NEWCHAIN: u8 = 3;
const NFT_MSG_NEWSETELEM: u8 = 12;
const NFTA_TABLE_USE: u16 = 3;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// The attributes in `b` as (type without flags, value); stops at the first
/// malformed one.
fn nlas(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = &b[((len + 3) & !3).min(b.len())..];
        Some((kind, value))
    })
}

fn nla(b: &[u8], kind: u16) -> Option<&[u8]> {
    nlas(b).find_map(|(k, v)| (k == kind).then_some(v))
}

fn nla_str(b: &[u8]) -> Option<String> {
    let b = b.strip_suffix(&[0]).unwrap_or(b);
    String::from_utf8(b.to_vec()).ok()
}

/// A map element as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elem {
    pub ip: IpAddr,
    /// The chain the element jumps to (`goto`).
    pub chain: Option<String>,
    /// The attachment key from the userdata comment.
    pub key: Option<String>,
}

/// Elements of a GETSETELEM dump.
pub fn parse_elems(msgs: &[RawMsg]) -> Vec<Elem> {
    msgs.iter()
        .filter(|m| m.kind == NFT_MSG_NEWSETELEM)
        .filter_map(|m| nla(&m.attrs, NFTA_SET_ELEM_LIST_ELEMENTS))
        .flat_map(|list| nlas(list).filter(|(k, _)| *k == NFTA_LIST_ELEM))
        .filter_map(|(_, e)| parse_elem(e))
        .collect()
}

fn parse_elem(e: &[u8]) -> Option<Elem> {
    let key = nla(e, NFTA_SET_ELEM_KEY).and_then(|k| nla(k, NFTA_DATA_VALUE))?;
    let ip = match key.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(key).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(key).ok()?),
        _ => return None,
    };
    let chain = nla(e, NFTA_SET_ELEM_DATA)
        .and_then(|d| nla(d, NFTA_DATA_VERDICT))
        .and_then(|v| nla(v, NFTA_VERDICT_CHAIN))
        .and_then(nla_str);
    let key = nla(e, NFTA_SET_ELEM_USERDATA).and_then(parse_key_udata);
    Some(Elem { ip, chain, key })
}

/// Names of the chains of [`TABLE`] in a chain dump.
pub fn chain_names(msgs: &[RawMsg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.kind == NFT_MSG_NEWCHAIN)
        .filter(|m| nla(&m.attrs, NFTA_CHAIN_TABLE).and_then(nla_str).as_deref() == Some(TABLE))
        .filter_map(|m| nla(&m.attrs, NFTA_CHAIN_NAME).and_then(nla_str))
        .collect()
}

/// NFTA_TABLE_USE of a GETTABLE reply: how many chains, sets, objects and
/// flowtables the table holds.
pub fn table_use(msgs: &[RawMsg]) -> Option<u32> {
    msgs.iter()
        .filter(|m| m.kind == NFT_MSG_NEWTABLE)
        .find_map(|m| nla(&m.attrs, NFTA_TABLE_USE))
        .and_then(|v| Some(u32::from_be_bytes(v.try_into().ok()?)))
}

/// The expression list of a rule, for tests.
#[cfg(test)]
fn rule_exprs(
    r: &Req,
) -> &[ListAttribute<netlink_packet_netfilter::nftables::ExpressionAttribute>] {
    let NfTablesMessage::NewRule(m) = &r.msg else {
        panic!("not a rule")
    };
    m.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Expressions(e) => Some(e.as_slice()),
            _ => None,
        })
        .expect("rule has expressions")
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Emitable;

    fn emit(m: &NfTablesMessage) -> Vec<u8> {
        let mut b = vec![0; m.buffer_len()];
        m.emit(&mut b);
        b
    }

    #[test]
    fn fnv1a64_known_vectors() {
        // Published FNV-1a 64-bit test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn chain_name_is_stable_and_distinct() {
        let s: IpNetwork = "10.22.0.0/16".parse().unwrap();
        let a = net_chain_name("mynet", &s);
        assert_eq!(a, format!("cni-n-{:016x}", fnv1a64(b"mynet|10.22.0.0/16")));
        assert_eq!(a.len(), 6 + 16);
        assert_eq!(a, net_chain_name("mynet", &s));
        assert_ne!(a, net_chain_name("other", &s));
        let s2: IpNetwork = "10.23.0.0/16".parse().unwrap();
        assert_ne!(a, net_chain_name("mynet", &s2));
    }

    #[test]
    fn key_udata_round_trip() {
        let u = key_udata("net/abc/eth0");
        // Exactly what nft writes for `comment "net/abc/eth0"`.
        assert_eq!(&u[..2], &[0, 13]);
        assert_eq!(&u[2..], b"net/abc/eth0\0");
        assert_eq!(parse_key_udata(&u).as_deref(), Some("net/abc/eth0"));
        assert_eq!(parse_key_udata(&[]), None);
        assert_eq!(parse_key_udata(&[0, 9, b'x']), None, "truncated TLV");
        // Another TLV before the comment is skipped.
        let mut v = vec![5, 1, 0];
        v.extend(key_udata("k"));
        assert_eq!(parse_key_udata(&v).as_deref(), Some("k"));
    }

    #[test]
    fn map_matches_nft_encoding() {
        // Attribute payload of nft 1.0.6's NEWSET for
        // `map cni-masq4 { type ipv4_addr : verdict; }` (from --debug=mnl).
        let want: Vec<u8> = [
            &[10, 0, 1, 0][..],
            b"ferry\0\0\0",
            &[14, 0, 2, 0],
            b"cni-masq4\0\0\0",
            &[8, 0, 3, 0, 0, 0, 0, 8],
            &[8, 0, 4, 0, 0, 0, 0, 7],
            &[8, 0, 5, 0, 0, 0, 0, 4],
            &[8, 0, 6, 0, 0xff, 0xff, 0xff, 0],
            &[8, 0, 7, 0, 0, 0, 0, 0],
            &[8, 0, 10, 0, 0, 0, 0, 1],
            &[22, 0, 13, 0],
            &[0, 4, 2, 0, 0, 0, 1, 4, 0, 0, 0, 0, 6, 4, 0, 0, 0, 0, 0, 0],
        ]
        .concat();
        if cfg!(target_endian = "little") {
            assert_eq!(emit(&new_map(false).msg), want);
        }
    }

    #[test]
    fn element_matches_nft_encoding() {
        // nft: add element inet ferry cni-masq4
        //      { 10.22.0.5 comment "net/abc/eth0" : goto c }
        // minus nft's NFTA_SET_ELEM_LIST_SET_ID.
        let r = new_elem("10.22.0.5".parse().unwrap(), "c", "net/abc/eth0");
        let b = emit(&r.msg);
        let elements: Vec<u8> = [
            &[64, 0, 3, 0x80][..],
            &[60, 0, 1, 0x80],
            &[12, 0, 1, 0x80, 8, 0, 1, 0, 10, 22, 0, 5],
            &[24, 0, 2, 0x80, 20, 0, 2, 0x80],
            &[8, 0, 1, 0, 0xff, 0xff, 0xff, 0xfc],
            &[6, 0, 2, 0, b'c', 0, 0, 0],
            &[19, 0, 6, 0, 0, 13],
            b"net/abc/eth0\0\0",
        ]
        .concat();
        assert!(b.ends_with(&elements), "{b:02x?}");
        assert_eq!(r.flags, NLM_F_CREATE | NLM_F_EXCL);
    }

    /// Expression payloads of nft 1.0.6 for the same matches (from
    /// `nft --debug=netlink`): (payload len, bitwise mask, cmp data).
    #[test]
    fn prefix_rules_match_nft() {
        type Case<'a> = (&'a str, u32, Option<&'a [u8]>, &'a [u8]);
        let cases: [Case; 7] = [
            ("10.22.0.0/16", 2, None, &[10, 22]),
            ("224.0.0.0/4", 4, Some(&[0xf0, 0, 0, 0]), &[224, 0, 0, 0]),
            (
                "10.22.16.0/20",
                4,
                Some(&[0xff, 0xff, 0xf0, 0]),
                &[10, 22, 16, 0],
            ),
            ("0.0.0.0/0", 4, Some(&[0, 0, 0, 0]), &[0, 0, 0, 0]),
            ("ff00::/8", 1, None, &[0xff]),
            ("fd00:10::/64", 8, None, &[0xfd, 0, 0, 0x10, 0, 0, 0, 0]),
            (
                "fd00:1:2::/52",
                16,
                Some(&[
                    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xf0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ]),
                &[0xfd, 0, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
        ];
        for (net, len, mask, data) in cases {
            let net: IpNetwork = net.parse().unwrap();
            let e = daddr_return(net);
            let want_len = if mask.is_some() { 6 } else { 5 };
            assert_eq!(e.len(), want_len, "{net}");
            let offset = if net.is_ipv6() { 24 } else { 16 };
            assert_eq!(e[2], load_network_header(offset, len), "{net}");
            if let Some(mask) = mask {
                let Expressions::Bitwise(b) = &e[3] else {
                    panic!("{net}: no bitwise")
                };
                assert!(
                    b.contains(&Bitwise::Mask(DataAttribute::Value(mask.to_vec()))),
                    "{net}"
                );
                assert!(b.contains(&Bitwise::Length(len)), "{net}");
            }
            let Expressions::Cmp(c) = &e[want_len - 2] else {
                panic!("{net}: no cmp")
            };
            assert!(
                c.contains(&Cmp::Data(DataAttribute::Value(data.to_vec()))),
                "{net}"
            );
        }
        let [_, _, masq] = net_rules("c", "10.22.0.0/16".parse().unwrap());
        assert_eq!(rule_exprs(&masq).len(), 1);
    }

    /// The kernel answers with the same attribute layout we send, so
    /// our own messages, emitted, exercise the parsers.
    fn raw(r: &Req) -> RawMsg {
        RawMsg {
            kind: u8::from(r.msg.message_type()),
            attrs: emit(&r.msg),
        }
    }

    #[test]
    fn parses_elements_back() {
        let ip: IpAddr = "fd00::5".parse().unwrap();
        let e4: IpAddr = "10.1.2.3".parse().unwrap();
        let mut m = raw(&new_elem(ip, "cni-n-x", "k/1/eth0"));
        let plain = raw(&new_elem(e4, "cni-n-y", "k/2/eth0"));
        m.attrs.extend(plain.attrs); // a second element list attribute is ignored
        let deleted = raw(&del_elem(e4)); // not a NEWSETELEM
        assert_eq!(
            parse_elems(&[m, deleted, raw(&new_elem(e4, "cni-n-y", "k/2/eth0"))]),
            vec![
                Elem {
                    ip,
                    chain: Some("cni-n-x".into()),
                    key: Some("k/1/eth0".into())
                },
                Elem {
                    ip: e4,
                    chain: Some("cni-n-y".into()),
                    key: Some("k/2/eth0".into())
                }
            ]
        );
    }

    #[test]
    fn parses_chains_and_table_use() {
        let other = NfTablesMessage::NewChain(ChainMessage {
            attributes: vec![
                ChainAttribute::Table("other".into()),
                ChainAttribute::Name("x".into()),
            ],
        });
        let other = RawMsg {
            kind: 3,
            attrs: emit(&other),
        };
        let (ours, net) = (raw(&new_base_chain()), raw(&new_chain("cni-n-1")));
        assert_eq!(
            chain_names(&[ours, other, net]),
            vec![BASE_CHAIN, "cni-n-1"]
        );

        let t = NfTablesMessage::NewTable(TableMessage {
            attributes: vec![TableAttribute::Name(TABLE.into()), TableAttribute::Use(5)],
        });
        assert_eq!(
            table_use(&[RawMsg {
                kind: 0,
                attrs: emit(&t)
            }]),
            Some(5)
        );
        assert_eq!(table_use(&[]), None);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn nlas_stop_at_garbage() {
        assert_eq!(nlas(&[8, 0, 1, 0, 1, 2, 3, 4, 99, 0, 2, 0]).count(), 1);
        assert_eq!(nlas(&[2, 0, 1, 0]).count(), 0);
    }
}
