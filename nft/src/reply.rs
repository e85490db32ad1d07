//! Parsers of the kernel's nf_tables messages. Replies are parsed by hand:
//! netlink-packet-netfilter's parsers format the whole remaining buffer into
//! an error context for every attribute, which makes a 100-element dump take
//! tens of ms.

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
const NFT_MSG_NEWSET: u8 = 9;
const NFT_MSG_NEWSETELEM: u8 = 12;
const NFTA_TABLE_USE: u16 = 3;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_MSG_NEWRULE: u8 = 6;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_USERDATA: u16 = 7;

/// The attributes in `b` as (type without flags, value); stops at the first
/// malformed one.
pub fn nlas(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
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

pub fn nla(b: &[u8], kind: u16) -> Option<&[u8]> {
    nlas(b).find_map(|(k, v)| (k == kind).then_some(v))
}

fn nla_str(b: &[u8]) -> Option<String> {
    let b = b.strip_suffix(&[0]).unwrap_or(b);
    String::from_utf8(b.to_vec()).ok()
}

/// A set or map element as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpedElem {
    pub key: Vec<u8>,
    /// A map's value, for data maps.
    pub value: Option<Vec<u8>>,
    /// The chain a verdict map's element jumps or goes to.
    pub chain: Option<String>,
    /// A verdict map's verdict code (NF_DROP 0, NF_ACCEPT 1, NFT_GOTO -4...).
    pub verdict: Option<i32>,
    /// The userdata comment.
    pub comment: Option<String>,
}

/// Elements of a GETSETELEM dump.
pub fn parse_elems(msgs: &[RawMsg]) -> Vec<DumpedElem> {
    msgs.iter()
        .filter(|m| m.kind == NFT_MSG_NEWSETELEM)
        .filter_map(|m| nla(&m.attrs, NFTA_SET_ELEM_LIST_ELEMENTS))
        .flat_map(|list| nlas(list).filter(|(k, _)| *k == NFTA_LIST_ELEM))
        .filter_map(|(_, e)| parse_elem(e))
        .collect()
}

fn parse_elem(e: &[u8]) -> Option<DumpedElem> {
    let key = nla(e, NFTA_SET_ELEM_KEY).and_then(|k| nla(k, NFTA_DATA_VALUE))?;
    let data = nla(e, NFTA_SET_ELEM_DATA);
    let value = data
        .and_then(|d| nla(d, NFTA_DATA_VALUE))
        .map(<[u8]>::to_vec);
    let verdict_attrs = data.and_then(|d| nla(d, NFTA_DATA_VERDICT));
    let chain = verdict_attrs
        .and_then(|v| nla(v, NFTA_VERDICT_CHAIN))
        .and_then(nla_str);
    let verdict = verdict_attrs
        .and_then(|v| nla(v, NFTA_VERDICT_CODE))
        .and_then(|c| Some(i32::from_be_bytes(c.try_into().ok()?)));
    let comment = nla(e, NFTA_SET_ELEM_USERDATA).and_then(crate::parse_comment_udata);
    Some(DumpedElem {
        key: key.to_vec(),
        value,
        chain,
        verdict,
        comment,
    })
}

fn names(msgs: &[RawMsg], kind: u8, table_attr: u16, name_attr: u16, table: &str) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.kind == kind)
        .filter(|m| nla(&m.attrs, table_attr).and_then(nla_str).as_deref() == Some(table))
        .filter_map(|m| nla(&m.attrs, name_attr).and_then(nla_str))
        .collect()
}

/// Names of the chains of `table` in a chain dump.
pub fn chain_names(msgs: &[RawMsg], table: &str) -> Vec<String> {
    names(
        msgs,
        NFT_MSG_NEWCHAIN,
        NFTA_CHAIN_TABLE,
        NFTA_CHAIN_NAME,
        table,
    )
}

/// Names of the sets of `table` in a set dump (anonymous ones included).
pub fn set_names(msgs: &[RawMsg], table: &str) -> Vec<String> {
    names(msgs, NFT_MSG_NEWSET, NFTA_SET_TABLE, NFTA_SET_NAME, table)
}

/// Every rule of `table` in a rule dump, in order: its chain and its
/// userdata, if any.
pub fn rule_tags(msgs: &[RawMsg], table: &str) -> Vec<(String, Option<Vec<u8>>)> {
    msgs.iter()
        .filter(|m| m.kind == NFT_MSG_NEWRULE)
        .filter(|m| nla(&m.attrs, NFTA_RULE_TABLE).and_then(nla_str).as_deref() == Some(table))
        .filter_map(|m| {
            let chain = nla(&m.attrs, NFTA_RULE_CHAIN).and_then(nla_str)?;
            Some((chain, nla(&m.attrs, NFTA_RULE_USERDATA).map(<[u8]>::to_vec)))
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn nlas_stop_at_garbage() {
        assert_eq!(nlas(&[8, 0, 1, 0, 1, 2, 3, 4, 99, 0, 2, 0]).count(), 1);
        assert_eq!(nlas(&[2, 0, 1, 0]).count(), 0);
    }
}
