//! Requests for the objects of one `inet` table. Pure: nothing here talks
//! to the kernel.
//!
//! ferry's tables are all `inet`: one table per owner holds the IPv4 and
//! the IPv6 objects side by side (rules pin the family with `meta nfproto`).

use netlink_packet_core::{NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, DataAttribute, Expressions, Hook as HookAttr, HookNumber,
    InetHookNumber, ListAttribute, NfTablesMessage, RuleAttribute, RuleMessage, SetAttribute,
    SetElementAttribute, SetElementList, SetElementMessage, SetFlags, SetMessage, TableAttribute,
    TableMessage, Verdict, VerdictAttribute,
};

use crate::Req;

/// nf_tables' data type of verdict maps (`NFT_DATA_VERDICT`).
pub const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NF_ACCEPT: u32 = 1;
const NF_DROP: u32 = 0;

/// One `inet` table by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
}

/// A base chain's hook: `type <kind> hook <hook> priority <priority>;
/// policy accept;`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    /// "nat" or "filter".
    pub kind: &'static str,
    pub hook: InetHookNumber,
    pub priority: i32,
}

/// A chain, regular or base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub hook: Option<Hook>,
}

/// A set or map. `id` lets rules and elements of the same transaction
/// refer to it before it has a handle (unique within one batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: String,
    pub id: u32,
    pub flags: SetFlags,
    /// nft's datatype id of the key (cosmetic: how `nft list` prints it).
    pub key_type: u32,
    pub key_len: u32,
    /// Data type and length of a map's values; [`NFT_DATA_VERDICT`] and 0
    /// for a verdict map.
    pub data: Option<(u32, u32)>,
    /// Default timeout of elements, in ms.
    pub timeout_ms: Option<u64>,
    /// nftnl userdata (byte order hints for `nft list`).
    pub udata: Vec<u8>,
}

/// What a map element maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElemData {
    None,
    Value(Vec<u8>),
    Goto(String),
    Jump(String),
    /// The `drop` verdict.
    Drop,
}

/// One set or map element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elem {
    pub key: Vec<u8>,
    pub data: ElemData,
    pub comment: Option<String>,
}

impl Elem {
    pub fn key(key: Vec<u8>) -> Elem {
        Elem {
            key,
            data: ElemData::None,
            comment: None,
        }
    }

    fn attrs(&self) -> Vec<SetElementAttribute> {
        let mut a = vec![SetElementAttribute::Key(DataAttribute::Value(
            self.key.clone(),
        ))];
        let verdict = |code, chain: &str| {
            DataAttribute::Verdict(vec![
                VerdictAttribute::Code(code),
                VerdictAttribute::Chain(chain.into()),
            ])
        };
        match &self.data {
            ElemData::None => {}
            ElemData::Value(v) => {
                a.push(SetElementAttribute::Data(DataAttribute::Value(v.clone())))
            }
            ElemData::Goto(c) => a.push(SetElementAttribute::Data(verdict(Verdict::Goto, c))),
            ElemData::Jump(c) => a.push(SetElementAttribute::Data(verdict(Verdict::Jump, c))),
            ElemData::Drop => a.push(SetElementAttribute::Data(DataAttribute::Verdict(vec![
                VerdictAttribute::Code(Verdict::Other(NF_DROP)),
            ]))),
        }
        if let Some(c) = &self.comment {
            a.push(SetElementAttribute::UserData(crate::comment_udata(c)));
        }
        a
    }
}

fn req(msg: NfTablesMessage, flags: u16, what: String) -> Req {
    Req { msg, flags, what }
}

/// Where a set lives in a request: by name, and by id when it was made in
/// the same transaction (anonymous sets have no name yet).
#[derive(Debug, Clone, Copy)]
pub enum SetRef<'a> {
    Name(&'a str),
    New(&'a SetSpec),
}

impl Table {
    pub fn inet(name: &str) -> Table {
        Table { name: name.into() }
    }

    fn t(&self) -> TableAttribute {
        TableAttribute::Name(self.name.clone())
    }

    /// `add table`: no EXCL, an existing table is fine.
    pub fn add(&self) -> Req {
        let msg = NfTablesMessage::NewTable(TableMessage {
            attributes: vec![self.t()],
        });
        req(msg, NLM_F_CREATE, format!("add table inet {}", self.name))
    }

    pub fn get(&self) -> Req {
        let msg = NfTablesMessage::GetTable(TableMessage {
            attributes: vec![self.t()],
        });
        req(msg, 0, format!("get table inet {}", self.name))
    }

    pub fn delete(&self) -> Req {
        let msg = NfTablesMessage::DeleteTable(TableMessage {
            attributes: vec![self.t()],
        });
        req(msg, 0, format!("delete table inet {}", self.name))
    }

    fn chain_attrs(&self, name: &str) -> Vec<ChainAttribute> {
        vec![
            ChainAttribute::Table(self.name.clone()),
            ChainAttribute::Name(name.into()),
        ]
    }

    /// `add chain`. With `excl`, an existing chain aborts the transaction:
    /// callers that add rules in the same batch use it so that a chain
    /// never gets its rules twice.
    pub fn add_chain(&self, c: &Chain, excl: bool) -> Req {
        let mut attributes = self.chain_attrs(&c.name);
        if let Some(h) = c.hook {
            attributes.extend([
                ChainAttribute::Type(h.kind.into()),
                ChainAttribute::Policy(NF_ACCEPT),
                ChainAttribute::Hook(vec![
                    HookAttr::Number(HookNumber::Inet(h.hook)),
                    // The kernel reads the priority as a signed 32-bit value.
                    HookAttr::Priority(h.priority as u32),
                ]),
            ]);
        }
        let msg = NfTablesMessage::NewChain(ChainMessage { attributes });
        let flags = NLM_F_CREATE | if excl { NLM_F_EXCL } else { 0 };
        req(
            msg,
            flags,
            format!("add chain inet {} {}", self.name, c.name),
        )
    }

    pub fn get_chain(&self, name: &str) -> Req {
        let msg = NfTablesMessage::GetChain(ChainMessage {
            attributes: self.chain_attrs(name),
        });
        req(msg, 0, format!("get chain inet {} {name}", self.name))
    }

    /// Dump of every inet chain: the kernel does not filter chain dumps by
    /// table, so callers keep this table's ([`crate::reply::chain_names`]).
    pub fn dump_chains(&self) -> Req {
        let msg = NfTablesMessage::GetChain(ChainMessage { attributes: vec![] });
        req(msg, NLM_F_DUMP, "list chains".into())
    }

    /// Deletes the chain and its rules; the kernel answers EBUSY while a map
    /// element (or a rule) still jumps to it.
    pub fn del_chain(&self, name: &str) -> Req {
        let msg = NfTablesMessage::DeleteChain(ChainMessage {
            attributes: self.chain_attrs(name),
        });
        req(msg, 0, format!("delete chain inet {} {name}", self.name))
    }

    /// `flush chain`: deletes its rules (and the anonymous sets they own).
    pub fn flush_chain(&self, name: &str) -> Req {
        let msg = NfTablesMessage::DeleteRule(RuleMessage {
            attributes: vec![
                RuleAttribute::Table(self.name.clone()),
                RuleAttribute::Chain(name.into()),
            ],
        });
        req(msg, 0, format!("flush chain inet {} {name}", self.name))
    }

    /// Appends a rule to `chain`.
    pub fn add_rule(&self, chain: &str, exprs: Vec<Expressions>, what: &str) -> Req {
        let msg = NfTablesMessage::NewRule(RuleMessage {
            attributes: vec![
                RuleAttribute::Table(self.name.clone()),
                RuleAttribute::Chain(chain.into()),
                RuleAttribute::Expressions(exprs.into_iter().map(Into::into).collect()),
            ],
        });
        req(
            msg,
            NLM_F_CREATE | NLM_F_APPEND,
            format!("add rule inet {} {chain} ({what})", self.name),
        )
    }

    /// Appends a rule that carries `udata` (NFTA_RULE_USERDATA): a tag
    /// that a later dump reads back ([`crate::reply::rule_tags`]).
    pub fn add_rule_tagged(
        &self,
        chain: &str,
        exprs: Vec<Expressions>,
        what: &str,
        udata: Vec<u8>,
    ) -> Req {
        let mut r = self.add_rule(chain, exprs, what);
        if let NfTablesMessage::NewRule(m) = &mut r.msg {
            m.attributes.push(RuleAttribute::UserData(udata));
        }
        r
    }

    /// Dump of every rule of this table.
    pub fn dump_rules(&self) -> Req {
        let msg = NfTablesMessage::GetRule(RuleMessage {
            attributes: vec![RuleAttribute::Table(self.name.clone())],
        });
        req(msg, NLM_F_DUMP, format!("list rules inet {}", self.name))
    }

    /// `add set`/`add map`: no EXCL, an existing identical set is fine.
    pub fn add_set(&self, s: &SetSpec) -> Req {
        let mut attributes = vec![
            SetAttribute::Table(self.name.clone()),
            SetAttribute::Name(s.name.clone()),
            SetAttribute::Flags(s.flags),
            SetAttribute::KeyType(s.key_type),
            SetAttribute::KeyLen(s.key_len),
        ];
        if let Some((ty, len)) = s.data {
            attributes.extend([SetAttribute::DataType(ty), SetAttribute::DataLen(len)]);
        }
        if let Some(t) = s.timeout_ms {
            attributes.push(SetAttribute::Timeout(t));
        }
        attributes.push(SetAttribute::Id(s.id));
        if !s.udata.is_empty() {
            attributes.push(SetAttribute::UserData(s.udata.clone()));
        }
        let msg = NfTablesMessage::NewSet(SetMessage { attributes });
        req(
            msg,
            NLM_F_CREATE,
            format!("add set inet {} {}", self.name, s.name),
        )
    }

    pub fn del_set(&self, name: &str) -> Req {
        let msg = NfTablesMessage::DeleteSet(SetMessage {
            attributes: vec![
                SetAttribute::Table(self.name.clone()),
                SetAttribute::Name(name.into()),
            ],
        });
        req(msg, 0, format!("delete set inet {} {name}", self.name))
    }

    fn elem_list(&self, set: SetRef, elems: &[Elem]) -> SetElementMessage {
        let mut attributes = vec![SetElementList::Table(self.name.clone())];
        match set {
            SetRef::Name(n) => attributes.push(SetElementList::Set(n.into())),
            SetRef::New(s) => attributes.extend([
                SetElementList::Set(s.name.clone()),
                SetElementList::SetId(s.id),
            ]),
        }
        if !elems.is_empty() {
            attributes.push(SetElementList::Elements(
                elems
                    .iter()
                    .map(|e| ListAttribute::Element(e.attrs()))
                    .collect(),
            ));
        }
        SetElementMessage { attributes }
    }

    fn set_name<'a>(set: &SetRef<'a>) -> &'a str {
        match set {
            SetRef::Name(n) => n,
            SetRef::New(s) => &s.name,
        }
    }

    /// Adds elements, all in one message. With `excl`, an element whose key
    /// exists already aborts the transaction instead of being kept.
    pub fn add_elems(&self, set: SetRef, elems: &[Elem], excl: bool) -> Req {
        let what = format!(
            "add element inet {} {} ({} elements)",
            self.name,
            Self::set_name(&set),
            elems.len()
        );
        let msg = NfTablesMessage::NewSetElement(self.elem_list(set, elems));
        req(msg, NLM_F_CREATE | if excl { NLM_F_EXCL } else { 0 }, what)
    }

    /// Deletes elements by key; a missing one fails the transaction
    /// (ENOENT).
    pub fn del_elems(&self, set: &str, elems: &[Elem]) -> Req {
        let msg = NfTablesMessage::DeleteSetElement(self.elem_list(SetRef::Name(set), elems));
        req(
            msg,
            0,
            format!(
                "delete element inet {} {set} ({} elements)",
                self.name,
                elems.len()
            ),
        )
    }

    /// `flush set`: every element goes.
    pub fn flush_set(&self, set: &str) -> Req {
        let msg = NfTablesMessage::DeleteSetElement(self.elem_list(SetRef::Name(set), &[]));
        req(msg, 0, format!("flush set inet {} {set}", self.name))
    }

    pub fn dump_elems(&self, set: &str) -> Req {
        let msg = NfTablesMessage::GetSetElement(self.elem_list(SetRef::Name(set), &[]));
        req(
            msg,
            NLM_F_DUMP,
            format!("list set inet {} {set}", self.name),
        )
    }

    /// Dump of every set of the family (callers filter by table).
    pub fn dump_sets(&self) -> Req {
        let msg = NfTablesMessage::GetSet(SetMessage {
            attributes: vec![SetAttribute::Table(self.name.clone())],
        });
        req(msg, NLM_F_DUMP, format!("list sets inet {}", self.name))
    }
}
