//! The masquerade ruleset's requests, composed from the shared nftables
//! crate, and the plugin's view of the kernel's replies. No I/O here.
//!
//! The encodings mirror what `nft` 1.0.6 sends for the same ruleset (checked
//! with `nft --debug=mnl`), so `nft list ruleset` prints exactly the
//! ruleset documented in `nft.rs`, comments on the elements included.

use std::net::IpAddr;
use std::sync::LazyLock;

use ipnetwork::IpNetwork;
use netlink_packet_netfilter::nftables::{Expressions, InetHookNumber, SetFlags, Verdict};
use nfnl::expr::{self, Reg, SetLookup};
use nfnl::reply::{self, RawMsg};
use nfnl::{Chain, ElemData, Hook, Req, SetRef, SetSpec, Table, NFT_DATA_VERDICT};

pub const TABLE: &str = "ferry";
pub const MAP4: &str = "cni-masq4";
pub const MAP6: &str = "cni-masq6";
pub const BASE_CHAIN: &str = "cni-postrouting";
/// Every object the plugin owns in the shared table starts with this.
pub const OWN_PREFIX: &str = "cni-";
pub const NET_CHAIN_PREFIX: &str = "cni-n-";

/// Longest attachment key: it travels as the element's comment.
pub const MAX_KEY_LEN: usize = nfnl::MAX_COMMENT_LEN;

/// `priority srcnat`.
const NF_IP_PRI_NAT_SRC: i32 = 100;
/// nftnl udata types: set key byte order / data byte order / data interval.
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const UDATA_SET_DATA_INTERVAL: u8 = 6;
/// nft's `BYTEORDER_BIG_ENDIAN`.
const BYTEORDER_BIG_ENDIAN: u32 = 2;

static T: LazyLock<Table> = LazyLock::new(|| Table::inet(TABLE));

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
    let h = nfnl::fnv1a64(format!("{network}|{subnet}").as_bytes());
    format!("{NET_CHAIN_PREFIX}{h:016x}")
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

// ---- tables, sets, chains -------------------------------------------------

/// No EXCL: the table may exist (ours, or made by ferryd).
pub fn new_table() -> Req {
    T.add()
}

pub fn get_table() -> Req {
    T.get()
}

pub fn del_table() -> Req {
    T.delete()
}

fn map_spec(v6: bool) -> SetSpec {
    let (name, key_type, key_len, id) = if v6 {
        (MAP6, expr::TYPE_IPV6_ADDR, 16, 2)
    } else {
        (MAP4, expr::TYPE_IPV4_ADDR, 4, 1)
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
    SetSpec {
        name: name.into(),
        // Lets a rule of the same batch find the set by id as well.
        id,
        flags: SetFlags::Map,
        key_type,
        key_len,
        // Verdict maps carry no fixed data length (nft sends 0 too).
        data: Some((NFT_DATA_VERDICT, 0)),
        timeout_ms: None,
        udata,
    }
}

/// `map cni-masq4 { type ipv4_addr : verdict; }` (or the v6 one).
pub fn new_map(v6: bool) -> Req {
    T.add_set(&map_spec(v6))
}

pub fn del_set(name: &str) -> Req {
    T.del_set(name)
}

/// `chain cni-postrouting { type nat hook postrouting priority srcnat; policy accept; }`
/// EXCL: the rules follow in the same batch, so an existing chain must
/// abort the batch rather than get its rules twice.
pub fn new_base_chain() -> Req {
    let hook = Hook {
        kind: "nat",
        hook: InetHookNumber::PostRouting,
        priority: NF_IP_PRI_NAT_SRC,
    };
    T.add_chain(
        &Chain {
            name: BASE_CHAIN.into(),
            hook: Some(hook),
        },
        true,
    )
}

/// A regular chain; EXCL for the same reason as the base chain.
pub fn new_chain(name: &str) -> Req {
    T.add_chain(
        &Chain {
            name: name.into(),
            hook: None,
        },
        true,
    )
}

pub fn get_chain(name: &str) -> Req {
    T.get_chain(name)
}

pub fn dump_chains() -> Req {
    T.dump_chains()
}

pub fn del_chain(name: &str) -> Req {
    T.del_chain(name)
}

// ---- rules ----------------------------------------------------------------

fn load_network_header(offset: u32, len: u32) -> Expressions {
    expr::payload(expr::BASE_NETWORK, offset, len, Reg::Reg1)
}

/// `meta nfproto ipv4 ip saddr vmap @cni-masq4` (or the ip6 one).
pub fn base_rule(v6: bool) -> Req {
    // saddr: IPv4 header offset 12, IPv6 header offset 8.
    let (map, saddr) = if v6 {
        (MAP6, load_network_header(8, 16))
    } else {
        (MAP4, load_network_header(12, 4))
    };
    let mut exprs = expr::nfproto_is(v6).to_vec();
    exprs.push(saddr);
    let set = SetLookup {
        name: map,
        id: Some(if v6 { 2 } else { 1 }),
    };
    exprs.push(expr::lookup_map(set, Reg::Reg1, Reg::Verdict));
    T.add_rule(BASE_CHAIN, exprs, &format!("saddr vmap @{map}"))
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
    let mut exprs = expr::nfproto_is(v6).to_vec();
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
        exprs.push(expr::bitwise(Reg::Reg1, mask, vec![0; len]));
    }
    exprs.push(expr::cmp_eq(Reg::Reg1, addr));
    exprs.push(expr::verdict(Verdict::Return));
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
    [
        T.add_rule(
            chain,
            daddr_return(subnet),
            &format!("daddr {subnet} return"),
        ),
        T.add_rule(
            chain,
            daddr_return(multicast),
            &format!("daddr {multicast} return"),
        ),
        T.add_rule(chain, vec![expr::masquerade(false)], "masquerade"),
    ]
}

// ---- map elements ---------------------------------------------------------

/// `<ip> comment "<key>" : goto <chain>`. EXCL so that an existing element
/// (maybe with another key) is reported rather than silently kept.
pub fn new_elem(ip: IpAddr, chain: &str, key: &str) -> Req {
    let e = nfnl::Elem {
        key: ip_bytes(ip),
        data: ElemData::Goto(chain.into()),
        comment: Some(key.into()),
    };
    let mut r = T.add_elems(SetRef::Name(map_for(ip)), &[e], true);
    r.what = format!("add element inet {TABLE} {} {ip} ({key})", map_for(ip));
    r
}

pub fn del_elem(ip: IpAddr) -> Req {
    let mut r = T.del_elems(map_for(ip), &[nfnl::Elem::key(ip_bytes(ip))]);
    r.what = format!("delete element inet {TABLE} {} {ip}", map_for(ip));
    r
}

pub fn dump_elems(map: &str) -> Req {
    T.dump_elems(map)
}

// ---- reply parsers ---------------------------------------------------------

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
    reply::parse_elems(msgs)
        .into_iter()
        .filter_map(|e| {
            let ip = match e.key.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(e.key.as_slice()).ok()?),
                16 => IpAddr::from(<[u8; 16]>::try_from(e.key.as_slice()).ok()?),
                _ => return None,
            };
            Some(Elem {
                ip,
                chain: e.chain,
                key: e.comment,
            })
        })
        .collect()
}

/// Names of the chains of [`TABLE`] in a chain dump.
pub fn chain_names(msgs: &[RawMsg]) -> Vec<String> {
    reply::chain_names(msgs, TABLE)
}

pub use reply::table_use;

/// The expression list of a rule, for tests.
#[cfg(test)]
fn rule_exprs(
    r: &Req,
) -> &[netlink_packet_netfilter::nftables::ListAttribute<
    netlink_packet_netfilter::nftables::ExpressionAttribute,
>] {
    use netlink_packet_netfilter::nftables::{NfTablesMessage, RuleAttribute};
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
    use netlink_packet_core::{Emitable, NLM_F_CREATE, NLM_F_EXCL};
    use netlink_packet_netfilter::nftables::{
        Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, NfTablesMessage, TableAttribute,
        TableMessage,
    };

    fn emit(m: &NfTablesMessage) -> Vec<u8> {
        let mut b = vec![0; m.buffer_len()];
        m.emit(&mut b);
        b
    }

    #[test]
    fn chain_name_is_stable_and_distinct() {
        let s: IpNetwork = "10.22.0.0/16".parse().unwrap();
        let a = net_chain_name("mynet", &s);
        assert_eq!(
            a,
            format!("cni-n-{:016x}", nfnl::fnv1a64(b"mynet|10.22.0.0/16"))
        );
        assert_eq!(a.len(), 6 + 16);
        assert_eq!(a, net_chain_name("mynet", &s));
        assert_ne!(a, net_chain_name("other", &s));
        let s2: IpNetwork = "10.23.0.0/16".parse().unwrap();
        assert_ne!(a, net_chain_name("mynet", &s2));
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
}
