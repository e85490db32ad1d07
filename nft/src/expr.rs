//! Rule expressions, one function per nf_tables expression (as `nft
//! --debug=netlink` prints them), plus the few compositions every caller
//! needs. Expressions netlink-packet-netfilter has no type for are built
//! from their attributes (`include/uapi/linux/netfilter/nf_tables.h`); all
//! their u32 attributes are big-endian on the wire.
//!
//! Registers: the 16-byte `Reg1..Reg4`, or the 4-byte `Reg32_00..15` that
//! concatenated keys use (each field padded to 4 bytes). [`reg32`] names
//! them by index.

use netlink_packet_core::DefaultNla;
use netlink_packet_netfilter::nftables::{
    Bitwise, Cmp, DataAttribute, Expressions, Immediate, Lookup, Meta, MetaKey, Operator, Payload,
    Register, Verdict, VerdictAttribute,
};

pub use netlink_packet_netfilter::nftables::{MetaKey as Key, Register as Reg};

pub const NFPROTO_IPV4: u8 = libc::NFPROTO_IPV4 as u8;
pub const NFPROTO_IPV6: u8 = libc::NFPROTO_IPV6 as u8;
pub const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
pub const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;
pub const IPPROTO_SCTP: u8 = libc::IPPROTO_SCTP as u8;

/// Payload bases.
pub const BASE_NETWORK: u32 = 1;
pub const BASE_TRANSPORT: u32 = 2;

/// nft's datatype ids (`enum datatypes` in nftables' datatype.h), for set
/// key types; a concatenation is the ids shifted by 6 bits each.
pub const TYPE_IPV4_ADDR: u32 = 7;
pub const TYPE_IPV6_ADDR: u32 = 8;
pub const TYPE_INET_PROTOCOL: u32 = 12;
pub const TYPE_INET_SERVICE: u32 = 13;
pub const TYPE_MARK: u32 = 19;

/// The type id of a concatenation of datatypes.
pub fn concat_type(types: &[u32]) -> u32 {
    types.iter().fold(0, |acc, t| (acc << 6) | t)
}

/// The 4-byte register `Reg32_<i>` (i in 0..16).
pub fn reg32(i: u32) -> Register {
    debug_assert!(i < 16);
    Register::Other(8 + i)
}

fn be32(kind: u16, v: u32) -> DefaultNla {
    DefaultNla::new(kind, v.to_be_bytes().to_vec())
}

fn reg_attr(kind: u16, r: Register) -> DefaultNla {
    be32(kind, u32::from(r))
}

fn other(name: &str, attributes: Vec<DefaultNla>) -> Expressions {
    Expressions::Other {
        expression_type: name.into(),
        attributes,
    }
}

// ---- loads ------------------------------------------------------------------

/// `payload load <len>b @ <base> + <offset> => <dreg>`.
pub fn payload(base: u32, offset: u32, len: u32, dreg: Register) -> Expressions {
    Expressions::Payload(vec![
        Payload::DestinationRegister(dreg),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
}

/// `ip saddr` (IPv4 header offset 12) into `dreg`.
pub fn ip_saddr(dreg: Register) -> Expressions {
    payload(BASE_NETWORK, 12, 4, dreg)
}

/// `ip daddr` (IPv4 header offset 16) into `dreg`.
pub fn ip_daddr(dreg: Register) -> Expressions {
    payload(BASE_NETWORK, 16, 4, dreg)
}

/// `th dport`: the destination port of TCP, UDP and SCTP alike.
pub fn th_dport(dreg: Register) -> Expressions {
    payload(BASE_TRANSPORT, 2, 2, dreg)
}

/// `meta <key> => <dreg>`.
pub fn meta(key: MetaKey, dreg: Register) -> Expressions {
    Expressions::Meta(vec![Meta::Key(key), Meta::DestinationRegister(dreg)])
}

/// `meta <key> set <sreg>` (mark, ...).
pub fn meta_set(key: MetaKey, sreg: Register) -> Expressions {
    Expressions::Meta(vec![Meta::Key(key), Meta::SourceRegister(sreg)])
}

/// Conntrack keys (`enum nft_ct_keys`).
pub const CT_STATE: u32 = 0;
pub const CT_STATUS: u32 = 2;
pub const CT_MARK: u32 = 3;
/// `ct state` bits.
pub const CT_STATE_NEW: u32 = 1 << 3;
/// `ct status` bits (`enum ip_conntrack_status`).
pub const IPS_DST_NAT: u32 = 1 << 5;

/// `ct <key> => <dreg>`.
pub fn ct(key: u32, dreg: Register) -> Expressions {
    // NFTA_CT_DREG 1, NFTA_CT_KEY 2.
    other("ct", vec![reg_attr(1, dreg), be32(2, key)])
}

/// `ct <key> set <sreg>`.
pub fn ct_set(key: u32, sreg: Register) -> Expressions {
    // NFTA_CT_KEY 2, NFTA_CT_SREG 4.
    other("ct", vec![be32(2, key), reg_attr(4, sreg)])
}

/// `numgen random mod <modulus> => <dreg>`: uniform over 0..modulus.
pub fn numgen_random(modulus: u32, dreg: Register) -> Expressions {
    // NFTA_NG_DREG 1, NFTA_NG_MODULUS 2, NFTA_NG_TYPE 3 (NFT_NG_RANDOM 1).
    other(
        "numgen",
        vec![reg_attr(1, dreg), be32(2, modulus), be32(3, 1)],
    )
}

/// `fib daddr type => <dreg>`: the route type of the destination address
/// (RTN_LOCAL for the node's own addresses).
pub fn fib_daddr_type(dreg: Register) -> Expressions {
    // NFTA_FIB_DREG 1, NFTA_FIB_RESULT 2 (NFT_FIB_RESULT_ADDRTYPE 3),
    // NFTA_FIB_FLAGS 3 (NFTA_FIB_F_DADDR 2).
    other("fib", vec![reg_attr(1, dreg), be32(2, 3), be32(3, 2)])
}
pub const RTN_LOCAL: u32 = 2;

// ---- comparisons and lookups ------------------------------------------------

pub fn cmp(op: Operator, sreg: Register, data: Vec<u8>) -> Expressions {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(sreg),
        Cmp::Op(op),
        Cmp::Data(DataAttribute::Value(data)),
    ])
}

pub fn cmp_eq(sreg: Register, data: Vec<u8>) -> Expressions {
    cmp(Operator::Equal, sreg, data)
}

/// `sreg = (sreg & mask) ^ xor` over `mask.len()` bytes.
pub fn bitwise(reg: Register, mask: Vec<u8>, xor: Vec<u8>) -> Expressions {
    Expressions::Bitwise(vec![
        Bitwise::SourceRegister(reg),
        Bitwise::DestinationRegister(reg),
        Bitwise::Length(mask.len() as u32),
        Bitwise::Mask(DataAttribute::Value(mask)),
        Bitwise::Xor(DataAttribute::Value(xor)),
    ])
}

/// `meta nfproto ipv4|ipv6`: in an inet table every address match first
/// pins the family.
pub fn nfproto_is(v6: bool) -> [Expressions; 2] {
    let proto = if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
    [
        meta(MetaKey::Nfproto, Register::Reg1),
        cmp_eq(Register::Reg1, vec![proto]),
    ]
}

/// `meta l4proto <proto>`.
pub fn l4proto_is(proto: u8) -> [Expressions; 2] {
    [
        meta(MetaKey::L4Proto, Register::Reg1),
        cmp_eq(Register::Reg1, vec![proto]),
    ]
}

/// Where a lookup finds its set: by name, and by the id it has in this
/// transaction when it is created in the same batch.
#[derive(Debug, Clone, Copy)]
pub struct SetLookup<'a> {
    pub name: &'a str,
    pub id: Option<u32>,
}

fn lookup_attrs(set: SetLookup, sreg: Register) -> Vec<Lookup> {
    let mut a = vec![Lookup::Set(set.name.into()), Lookup::SourceRegister(sreg)];
    if let Some(id) = set.id {
        a.push(Lookup::SetId(id));
    }
    a
}

/// `<sreg> @set`: the rule goes on only if the key is in the set.
pub fn lookup(set: SetLookup, sreg: Register) -> Expressions {
    Expressions::Lookup(lookup_attrs(set, sreg))
}

/// `<sreg> != @set` (NFT_LOOKUP_F_INV).
pub fn lookup_not(set: SetLookup, sreg: Register) -> Expressions {
    let mut a = lookup_attrs(set, sreg);
    a.push(Lookup::Flags(1));
    Expressions::Lookup(a)
}

/// `<sreg> map @set => <dreg>`; with `Register::Verdict` as `dreg`, a
/// verdict map (`vmap`). No match: the rule stops.
pub fn lookup_map(set: SetLookup, sreg: Register, dreg: Register) -> Expressions {
    let mut a = lookup_attrs(set, sreg);
    a.push(Lookup::DestinationRegister(dreg));
    Expressions::Lookup(a)
}

/// `update @set { <sreg_key> [: <sreg_data>] }`: adds the element or, when
/// it exists, restarts its timeout (the set's default timeout).
pub fn dynset_update(
    set: SetLookup,
    sreg_key: Register,
    sreg_data: Option<Register>,
) -> Expressions {
    // NFTA_DYNSET_SET_NAME 1, SET_ID 2, OP 3 (NFT_DYNSET_OP_UPDATE 1),
    // SREG_KEY 4, SREG_DATA 5.
    let mut a = vec![DefaultNla::new(1, nul_terminated(set.name))];
    if let Some(id) = set.id {
        a.push(be32(2, id));
    }
    a.push(be32(3, 1));
    a.push(reg_attr(4, sreg_key));
    if let Some(d) = sreg_data {
        a.push(reg_attr(5, d));
    }
    other("dynset", a)
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

// ---- statements -------------------------------------------------------------

/// `<dreg> = <data>` (immediate data into a register).
pub fn load_immediate(dreg: Register, data: Vec<u8>) -> Expressions {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(dreg),
        Immediate::Data(DataAttribute::Value(data)),
    ])
}

fn verdict_expr(attrs: Vec<VerdictAttribute>) -> Expressions {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(attrs)),
    ])
}

/// `accept`, `drop`, `return`, ...
pub fn verdict(code: Verdict) -> Expressions {
    verdict_expr(vec![VerdictAttribute::Code(code)])
}

/// `goto <chain>`.
pub fn goto(chain: &str) -> Expressions {
    verdict_expr(vec![
        VerdictAttribute::Code(Verdict::Goto),
        VerdictAttribute::Chain(chain.into()),
    ])
}

/// `jump <chain>`.
pub fn jump(chain: &str) -> Expressions {
    verdict_expr(vec![
        VerdictAttribute::Code(Verdict::Jump),
        VerdictAttribute::Chain(chain.into()),
    ])
}

/// `counter`.
pub fn counter() -> Expressions {
    other("counter", vec![])
}

/// NAT range flags (`NF_NAT_RANGE_*`).
pub const NAT_MAP_IPS: u32 = 1;
pub const NAT_PROTO_SPECIFIED: u32 = 2;
pub const NAT_PROTO_RANDOM_FULLY: u32 = 16;

/// `dnat ip to <addr reg>[:<port reg>]`: destination NAT of an IPv4
/// packet to the address in `addr` and, if given, the port in `port`.
pub fn dnat_v4(addr: Register, port: Option<Register>) -> Expressions {
    // NFTA_NAT_TYPE 1 (NFT_NAT_DNAT 1), FAMILY 2, REG_ADDR_MIN 3,
    // REG_PROTO_MIN 5, FLAGS 7.
    let mut a = vec![
        be32(1, 1),
        be32(2, u32::from(NFPROTO_IPV4)),
        reg_attr(3, addr),
    ];
    let mut flags = NAT_MAP_IPS;
    if let Some(p) = port {
        a.push(reg_attr(5, p));
        flags |= NAT_PROTO_SPECIFIED;
    }
    a.push(be32(7, flags));
    other("nat", a)
}

/// `masquerade [fully-random]`.
pub fn masquerade(fully_random: bool) -> Expressions {
    // NFTA_MASQ_FLAGS 1.
    let a = if fully_random {
        vec![be32(1, NAT_PROTO_RANDOM_FULLY)]
    } else {
        vec![]
    };
    other("masq", a)
}

/// `reject with tcp reset`.
pub fn reject_tcp_reset() -> Expressions {
    // NFTA_REJECT_TYPE 1 (NFT_REJECT_TCP_RST 1).
    other("reject", vec![be32(1, 1)])
}

/// `reject with icmpx port-unreachable` (ICMP or ICMPv6 to match the
/// packet).
pub fn reject_port_unreachable() -> Expressions {
    // NFTA_REJECT_TYPE 1 (NFT_REJECT_ICMPX_UNREACH 2), NFTA_REJECT_ICMP_CODE
    // 2 (u8, NFT_REJECT_ICMPX_PORT_UNREACH 1).
    other("reject", vec![be32(1, 2), DefaultNla::new(2, vec![1])])
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Emitable;
    use netlink_packet_netfilter::nftables::{ExpressionAttribute, ListAttribute};

    fn emit(e: Expressions) -> Vec<u8> {
        let l: ListAttribute<ExpressionAttribute> = e.into();
        let mut b = vec![0; l.buffer_len()];
        l.emit(&mut b);
        b
    }

    /// nft 1.0.6 `--debug=netlink` for `numgen random mod 3`:
    /// `[ numgen reg 1 = random mod 3 ]`, attributes in the kernel's order.
    #[test]
    #[cfg(target_endian = "little")]
    fn numgen_encoding() {
        let b = emit(numgen_random(3, Register::Reg1));
        let want: Vec<u8> = [
            &[44, 0, 1, 0x80][..],
            &[11, 0, 1, 0],
            b"numgen\0\0",
            &[28, 0, 2, 0x80],
            &[8, 0, 1, 0, 0, 0, 0, 1],
            &[8, 0, 2, 0, 0, 0, 0, 3],
            &[8, 0, 3, 0, 0, 0, 0, 1],
        ]
        .concat();
        assert_eq!(b, want);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn dnat_with_port_sets_proto_flag() {
        let b = emit(dnat_v4(Register::Reg1, Some(reg32(1))));
        // type dnat, family ipv4, addr reg 1, proto reg 9, flags 3.
        for want in [
            &[8u8, 0, 1, 0, 0, 0, 0, 1][..],
            &[8, 0, 2, 0, 0, 0, 0, 2],
            &[8, 0, 3, 0, 0, 0, 0, 1],
            &[8, 0, 5, 0, 0, 0, 0, 9],
            &[8, 0, 7, 0, 0, 0, 0, 3],
        ] {
            assert!(b.windows(8).any(|w| w == want), "{want:?} in {b:?}");
        }
    }

    #[test]
    fn concat_type_ids() {
        // nft prints `type ipv4_addr . inet_proto . inet_service`.
        assert_eq!(
            concat_type(&[TYPE_IPV4_ADDR, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
            (7 << 12) | (12 << 6) | 13
        );
    }
}
