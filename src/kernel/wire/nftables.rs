//! The nf_tables messages: set and map element changes in batches, the generation, and the
//! dumps of the table's sets, chains, rules and elements.

use super::message::{
    Attrs, Message, NFPROTO_INET, NFPROTO_UNSPEC, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_ECHO,
    NLM_F_REQUEST, Received, SUBSYS_NFTABLES, align,
};
use super::values::{comment_tlv, read_comment_tlv};

/// `NFNL_MSG_BATCH_BEGIN` and `END`.
pub const BATCH_BEGIN: u16 = 16;
pub const BATCH_END: u16 = 17;
/// `NFNL_BATCH_GENID`: the generation a batch is valid for.
const BATCH_GENID: u16 = 1;

/// nf_tables message kinds (lower byte).
pub const NFT_MSG_GETTABLE: u8 = 1;
pub const NFT_MSG_GETCHAIN: u8 = 4;
pub const NFT_MSG_GETRULE: u8 = 7;
pub const NFT_MSG_GETSET: u8 = 10;
pub const NFT_MSG_NEWSETELEM: u8 = 12;
pub const NFT_MSG_GETSETELEM: u8 = 13;
pub const NFT_MSG_DELSETELEM: u8 = 14;
pub const NFT_MSG_NEWGEN: u8 = 15;
pub const NFT_MSG_GETGEN: u8 = 16;

/// Attributes shared by tables, chains, rules, sets and element lists: the table name is 1.
pub(super) const ATTR_TABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_SET_ELEM_EXPR: u16 = 7;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_SET_ELEM_EXPRESSIONS: u16 = 11;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTA_GEN_ID: u16 = 1;

/// Element lists are split into messages of about this size, all in one batch.
pub const MESSAGE_BUDGET: usize = 64 * 1024;

/// One set or map element, as sent or as dumped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Elem {
    pub key: Vec<u8>,
    /// The end of the range, in an interval set of concatenations.
    pub key_end: Option<Vec<u8>>,
    pub data: Option<Vec<u8>>,
    pub comment: Option<String>,
    /// `(packets, bytes)`, when the element has a counter (dumps only).
    pub counter: Option<(u64, u64)>,
}

impl Elem {
    pub fn key(key: impl Into<Vec<u8>>) -> Elem {
        Elem {
            key: key.into(),
            ..Elem::default()
        }
    }

    fn write(&self, m: &mut Message) {
        let elem = m.begin(NFTA_LIST_ELEM);
        data_attr(m, NFTA_SET_ELEM_KEY, &self.key);
        if let Some(end) = &self.key_end {
            data_attr(m, NFTA_SET_ELEM_KEY_END, end);
        }
        if let Some(data) = &self.data {
            data_attr(m, NFTA_SET_ELEM_DATA, data);
        }
        if let Some(comment) = &self.comment {
            m.put(NFTA_SET_ELEM_USERDATA, &comment_tlv(comment));
        }
        m.end(elem);
    }

    /// An upper bound of what [`Elem::write`] adds to a message.
    fn size(&self) -> usize {
        let value = |v: &[u8]| 8 + align(4 + v.len());
        4 + value(&self.key)
            + self.key_end.as_deref().map_or(0, value)
            + self.data.as_deref().map_or(0, value)
            + self
                .comment
                .as_deref()
                .map_or(0, |c| align(4 + 3 + c.len()))
    }
}

/// `NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE bytes }` and the like.
fn data_attr(m: &mut Message, kind: u16, value: &[u8]) {
    let nest = m.begin(kind);
    m.put(NFTA_DATA_VALUE, value);
    m.end(nest);
}

/// Whether a change adds or deletes the elements it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Add,
    Delete,
}

/// Elements to add to or delete from one set of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetChange {
    pub set: &'static str,
    pub op: Op,
    pub elems: Vec<Elem>,
}

/// The messages of one change, each within [`MESSAGE_BUDGET`], sequence numbers from `seq`.
pub fn element_messages(table: &str, change: &SetChange, seq: &mut u32) -> Vec<Vec<u8>> {
    let (kind, flags) = match change.op {
        Op::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK),
        // Echoed: the kernel reports each deleted element with its counter at the commit.
        Op::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_ECHO),
    };
    let mut out = Vec::new();
    let mut elems = change.elems.iter().peekable();
    while elems.peek().is_some() {
        let mut m = Message::nft(kind, flags, *seq, NFPROTO_INET);
        *seq = seq.wrapping_add(1);
        m.put_str(ATTR_TABLE, table);
        m.put_str(NFTA_SET_ELEM_LIST_SET, change.set);
        let list = m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
        // At least one element per message; a nest's length is 16 bits, hence the budget.
        while let Some(elem) = elems
            .next_if(|e| m.len() - list + e.size() <= MESSAGE_BUDGET - 4 || m.len() - list == 4)
        {
            elem.write(&mut m);
        }
        m.end(list);
        out.push(m.finish());
    }
    out
}

/// `messages` wrapped in one batch: one kernel transaction, refused whole (`ERESTART`)
/// when the ruleset's generation is no longer `generation` (if one is given).
pub fn batch(
    generation: Option<u32>,
    begin_seq: u32,
    messages: &[Vec<u8>],
    end_seq: u32,
) -> Vec<u8> {
    let mut begin = Message::new(
        BATCH_BEGIN,
        NLM_F_REQUEST,
        begin_seq,
        NFPROTO_UNSPEC,
        SUBSYS_NFTABLES,
    );
    if let Some(generation) = generation {
        begin.put_be32(BATCH_GENID, generation);
    }
    let end = Message::new(
        BATCH_END,
        NLM_F_REQUEST,
        end_seq,
        NFPROTO_UNSPEC,
        SUBSYS_NFTABLES,
    );
    let mut out = begin.finish();
    for m in messages {
        out.extend_from_slice(m);
    }
    out.extend_from_slice(&end.finish());
    out
}

/// `NFT_MSG_GETGEN`: asks for the ruleset's generation.
pub fn get_generation(seq: u32) -> Vec<u8> {
    Message::nft(NFT_MSG_GETGEN, NLM_F_REQUEST, seq, NFPROTO_UNSPEC).finish()
}

/// The generation of an `NFT_MSG_NEWGEN` message.
pub fn generation_of(message: &Received<'_>) -> Option<u32> {
    (message.kind == (SUBSYS_NFTABLES << 8) | u16::from(NFT_MSG_NEWGEN))
        .then(|| message.attrs().be32(NFTA_GEN_ID))
        .flatten()
}

/// `NFT_MSG_GETTABLE` for one inet table (answered with the table, or `ENOENT`).
pub fn get_table(seq: u32, table: &str) -> Vec<u8> {
    let mut m = Message::nft(
        NFT_MSG_GETTABLE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NFPROTO_INET,
    );
    m.put_str(NFTA_TABLE_NAME, table);
    m.finish()
}

/// A dump of the sets, chains or rules (`kind`) of one inet table, or of one set's
/// elements (`NFT_MSG_GETSETELEM` with `set`).
pub fn dump_request(kind: u8, seq: u32, table: &str, set: Option<&str>) -> Vec<u8> {
    let mut m = Message::nft(kind, NLM_F_REQUEST | NLM_F_DUMP, seq, NFPROTO_INET);
    m.put_str(ATTR_TABLE, table);
    if let Some(set) = set {
        m.put_str(NFTA_SET_ELEM_LIST_SET, set);
    }
    m.finish()
}

/// A set as dumped: what the shape check needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetInfo {
    pub name: String,
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
    pub data_type: Option<u32>,
    pub data_len: Option<u32>,
}

pub fn read_set(message: &Received<'_>) -> Option<SetInfo> {
    let a = message.attrs();
    Some(SetInfo {
        name: a.string(NFTA_SET_NAME)?,
        flags: a.be32(NFTA_SET_FLAGS).unwrap_or_default(),
        key_type: a.be32(NFTA_SET_KEY_TYPE).unwrap_or_default(),
        key_len: a.be32(NFTA_SET_KEY_LEN).unwrap_or_default(),
        data_type: a.be32(NFTA_SET_DATA_TYPE),
        data_len: a.be32(NFTA_SET_DATA_LEN),
    })
}

/// A chain as dumped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainInfo {
    pub name: String,
    /// `(hook number, priority)` of a base chain.
    pub hook: Option<(u32, i32)>,
    pub kind: Option<String>,
}

pub fn read_chain(message: &Received<'_>) -> Option<ChainInfo> {
    let a = message.attrs();
    let hook = a.get(NFTA_CHAIN_HOOK).and_then(|nest| {
        let h = Attrs(nest);
        Some((
            h.be32(NFTA_HOOK_HOOKNUM)?,
            h.be32(NFTA_HOOK_PRIORITY)? as i32,
        ))
    });
    Some(ChainInfo {
        name: a.string(NFTA_CHAIN_NAME)?,
        hook,
        kind: a.string(NFTA_CHAIN_TYPE),
    })
}

/// A rule as dumped: its chain and comment.
pub fn read_rule(message: &Received<'_>) -> Option<(String, Option<String>)> {
    let a = message.attrs();
    Some((
        a.string(NFTA_RULE_CHAIN)?,
        a.get(NFTA_RULE_USERDATA).and_then(read_comment_tlv),
    ))
}

/// The elements of an element dump message, with the set they belong to.
pub fn read_elements(message: &Received<'_>) -> Option<(String, Vec<Elem>)> {
    let a = message.attrs();
    let set = a.string(NFTA_SET_ELEM_LIST_SET)?;
    let elems = Attrs(a.get(NFTA_SET_ELEM_LIST_ELEMENTS).unwrap_or_default())
        .filter(|(kind, _)| *kind == NFTA_LIST_ELEM)
        .map(|(_, elem)| read_element(elem))
        .collect::<Option<Vec<Elem>>>()?;
    Some((set, elems))
}

/// One element of a dump, its attributes read in one pass: a read of 10,000 forwards
/// decodes 30,000 of them.
fn read_element(elem: &[u8]) -> Option<Elem> {
    let value = |nest: &[u8]| Attrs(nest).get(NFTA_DATA_VALUE).map(<[u8]>::to_vec);
    let mut key = None;
    let mut read = Elem::default();
    // A counter is the element's one expression, or one of its list of them.
    let (mut expr, mut exprs) = (None, None);
    for (kind, attr) in Attrs(elem) {
        match kind {
            NFTA_SET_ELEM_KEY => key = value(attr),
            NFTA_SET_ELEM_KEY_END => read.key_end = value(attr),
            NFTA_SET_ELEM_DATA => read.data = value(attr),
            NFTA_SET_ELEM_USERDATA => read.comment = read_comment_tlv(attr),
            NFTA_SET_ELEM_EXPR => expr = read_counter(attr),
            NFTA_SET_ELEM_EXPRESSIONS => {
                exprs = Attrs(attr)
                    .filter(|(k, _)| *k == NFTA_LIST_ELEM)
                    .find_map(|(_, expr)| read_counter(expr));
            }
            _ => {}
        }
    }
    Some(Elem {
        key: key?,
        counter: expr.or(exprs),
        ..read
    })
}

/// `(packets, bytes)` of a `counter` expression.
fn read_counter(expr: &[u8]) -> Option<(u64, u64)> {
    let a = Attrs(expr);
    let name = a.get(NFTA_EXPR_NAME)?;
    if name.split(|b| *b == 0).next() != Some(b"counter") {
        return None;
    }
    let data = Attrs(a.get(NFTA_EXPR_DATA)?);
    let be64 = |kind| {
        Some(u64::from_be_bytes(
            data.get(kind)?.get(..8)?.try_into().ok()?,
        ))
    };
    Some((be64(NFTA_COUNTER_PACKETS)?, be64(NFTA_COUNTER_BYTES)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::Protocol;
    use crate::kernel::wire::{self, NLM_F_MULTI, messages, proto_port};

    #[test]
    fn large_lists_are_split_within_the_budget() {
        let elems: Vec<Elem> = (0..5000u16)
            .map(|p| Elem {
                key: proto_port(Protocol::Tcp, p).to_vec(),
                data: Some(vec![10, 0, 0, 1]),
                comment: Some(format!(
                    "ns/svc-{p}:http uid=6f1c2a8e-1d7b-4c33-9a52-0d3f8c1e2b47"
                )),
                ..Elem::default()
            })
            .collect();
        let change = SetChange {
            set: "fwd_ipv4_addr",
            op: Op::Add,
            elems: elems.clone(),
        };
        let messages = element_messages("t", &change, &mut 0);
        assert!(messages.len() > 1);
        let mut back = Vec::new();
        for m in &messages {
            assert!(m.len() <= MESSAGE_BUDGET + 64, "{}", m.len());
            let received: Vec<Received<'_>> = wire::messages(m).collect();
            assert_eq!(received.len(), 1);
            let (set, got) = read_elements(&received[0]).unwrap();
            assert_eq!(set, "fwd_ipv4_addr");
            back.extend(got);
        }
        assert_eq!(back, elems);
    }

    #[test]
    fn dumps_are_read_with_counters_and_nothing_past_their_end() {
        // An element dump as the kernel sends it: one element with a counter expression.
        let mut m = Message::nft(NFT_MSG_NEWSETELEM, NLM_F_MULTI, 9, NFPROTO_INET);
        m.put_str(ATTR_TABLE, "t");
        m.put_str(NFTA_SET_ELEM_LIST_SET, "fwd_ipv6_port");
        let list = m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
        let elem = m.begin(NFTA_LIST_ELEM);
        data_attr(&mut m, NFTA_SET_ELEM_KEY, &proto_port(Protocol::Udp, 53));
        data_attr(&mut m, NFTA_SET_ELEM_DATA, &5353u16.to_be_bytes());
        let expr = m.begin(NFTA_SET_ELEM_EXPR);
        m.put_str(NFTA_EXPR_NAME, "counter");
        let data = m.begin(NFTA_EXPR_DATA);
        m.put(NFTA_COUNTER_BYTES, &180u64.to_be_bytes());
        m.put(NFTA_COUNTER_PACKETS, &3u64.to_be_bytes());
        m.end(data);
        m.end(expr);
        m.put(NFTA_SET_ELEM_USERDATA, &comment_tlv("ns/a:dns uid=1"));
        m.end(elem);
        m.end(list);
        let whole = m.finish();
        let received: Vec<Received<'_>> = messages(&whole).collect();
        let (set, elems) = read_elements(&received[0]).unwrap();
        assert_eq!(set, "fwd_ipv6_port");
        assert_eq!(
            elems,
            vec![Elem {
                key: proto_port(Protocol::Udp, 53).to_vec(),
                key_end: None,
                data: Some(vec![0x14, 0xe9]),
                comment: Some("ns/a:dns uid=1".into()),
                counter: Some((3, 180)),
            }]
        );
        for cut in 0..whole.len() {
            // A truncated datagram yields no message, never a panic.
            assert_eq!(messages(&whole[..cut]).count(), 0, "cut at {cut}");
        }
    }
}
