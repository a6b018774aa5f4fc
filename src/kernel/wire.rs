//! nf_tables and ctnetlink messages, byte for byte: the element changes of the daemon's sets
//! and maps, the dumps that read the table back, the generation, and conntrack entries.
//!
//! Written by hand on purpose. No maintained crate covers what is needed here: set elements
//! with map data, user data (comments) and counters, in batches and dumps.
//! `netlink-packet-netfilter` has no element data or counters and parses dumps in quadratic
//! time, `rustables` has no map data, `nftnl` links libnftnl. What this module writes and
//! reads is small and fixed: the messages of linux/netfilter/nf_tables.h and
//! nfnetlink_conntrack.h that the daemon uses, nothing else.
//!
//! Byte order is explicit everywhere, for big-endian MIPS routers as much as for x86:
//! netlink headers and attribute headers are in host order; nf_tables values (u32 attributes,
//! ports, addresses) in network order. A concatenated key pads each field to 4 bytes; a map
//! value of type `inet_service` is 2 bytes, unpadded. Pure: no socket here ([`super::nfnl`]
//! sends and receives).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::core::model::{Family, Protocol};

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_ECHO: u16 = 0x8;
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const NFGEN_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// nfnetlink subsystems (the upper byte of a message type).
pub const SUBSYS_CTNETLINK: u16 = 1;
pub const SUBSYS_NFTABLES: u16 = 10;
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
/// ctnetlink message kinds.
pub const IPCTNL_MSG_CT_NEW: u8 = 0;
pub const IPCTNL_MSG_CT_GET: u8 = 1;
pub const IPCTNL_MSG_CT_DELETE: u8 = 2;

pub const NFPROTO_UNSPEC: u8 = 0;
pub const NFPROTO_INET: u8 = 1;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Attributes shared by tables, chains, rules, sets and element lists: the table name is 1.
const ATTR_TABLE: u16 = 1;
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
/// The comment in a rule's or an element's user data (`NFTNL_UDATA_*_COMMENT`).
const UDATA_COMMENT: u8 = 0;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_MARK: u16 = 8;
const CTA_ZONE: u16 = 18;
const CTA_MARK_MASK: u16 = 21;

/// Element lists are split into messages of about this size, all in one batch.
pub const MESSAGE_BUDGET: usize = 64 * 1024;

/// A netlink message being written: header, `nfgenmsg`, attributes.
pub struct Message {
    buf: Vec<u8>,
}

impl Message {
    /// `kind` is the whole 16-bit type (subsystem << 8 | message); `res_id` is the
    /// `nfgenmsg` resource id (the subsystem, for batch delimiters).
    pub fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Message {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.push(family);
        buf.push(0);
        buf.extend_from_slice(&res_id.to_be_bytes());
        Message { buf }
    }

    pub fn nft(kind: u8, flags: u16, seq: u32, family: u8) -> Message {
        Message::new(
            (SUBSYS_NFTABLES << 8) | u16::from(kind),
            flags,
            seq,
            family,
            0,
        )
    }

    fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn put(&mut self, kind: u16, value: &[u8]) {
        let len = 4 + value.len();
        let len16 = u16::try_from(len).expect("a netlink attribute fits in 64 KiB");
        self.buf.extend_from_slice(&len16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align(self.buf.len()), 0);
    }

    /// A NUL-terminated string attribute.
    pub fn put_str(&mut self, kind: u16, value: &str) {
        let mut bytes = Vec::with_capacity(value.len() + 1);
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
        self.put(kind, &bytes);
    }

    pub fn put_be32(&mut self, kind: u16, value: u32) {
        self.put(kind, &value.to_be_bytes());
    }

    /// Opens a nested attribute; [`Message::end`] closes it.
    pub fn begin(&mut self, kind: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        start
    }

    pub fn end(&mut self, start: usize) {
        let len = u16::try_from(self.buf.len() - start).expect("a nest fits in 64 KiB");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).expect("a netlink message fits in 4 GiB");
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// One received message: its header fields and what follows the header.
#[derive(Clone, Copy, Debug)]
pub struct Received<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
    pub body: &'a [u8],
}

impl Received<'_> {
    /// For `NLMSG_ERROR`: the error number (0 is an acknowledgement).
    pub fn error(&self) -> Option<i32> {
        (self.kind == NLMSG_ERROR && self.body.len() >= 4).then(|| {
            let code = i32::from_ne_bytes([self.body[0], self.body[1], self.body[2], self.body[3]]);
            -code
        })
    }

    /// The sequence number of the request an `NLMSG_ERROR` answers.
    pub fn error_seq(&self) -> Option<u32> {
        let b = self.body.get(12..16)?;
        Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The `nfgenmsg` family.
    pub fn family(&self) -> u8 {
        self.body.first().copied().unwrap_or_default()
    }

    /// The attributes after the `nfgenmsg` header.
    pub fn attrs(&self) -> Attrs<'_> {
        Attrs(self.body.get(NFGEN_HDRLEN..).unwrap_or_default())
    }
}

/// The messages of a datagram, stopping at the first malformed one.
pub fn messages(datagram: &[u8]) -> impl Iterator<Item = Received<'_>> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            rest = &[];
            return None;
        }
        let word =
            |at: usize| u32::from_ne_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]);
        let message = Received {
            kind: u16::from_ne_bytes([rest[4], rest[5]]),
            flags: u16::from_ne_bytes([rest[6], rest[7]]),
            seq: word(8),
            pid: word(12),
            body: &rest[NLMSG_HDRLEN..len],
        };
        rest = &rest[align(len).min(rest.len())..];
        Some(message)
    })
}

/// The attributes of a message or a nest: `(type without flags, payload)`.
#[derive(Clone, Copy)]
pub struct Attrs<'a>(pub &'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<(u16, &'a [u8])> {
        let rest = self.0;
        if rest.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            self.0 = &[];
            return None;
        }
        self.0 = &rest[align(len).min(rest.len())..];
        Some((kind, &rest[4..len]))
    }
}

impl<'a> Attrs<'a> {
    pub fn get(self, kind: u16) -> Option<&'a [u8]> {
        self.into_iter().find(|(k, _)| *k == kind).map(|(_, v)| v)
    }

    fn string(self, kind: u16) -> Option<String> {
        let value = self.get(kind)?;
        let value = value.split(|b| *b == 0).next().unwrap_or_default();
        Some(String::from_utf8_lossy(value).into_owned())
    }

    fn be32(self, kind: u16) -> Option<u32> {
        let v = self.get(kind)?;
        Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
    }

    /// The table a message is about (every nf_tables object names it as attribute 1).
    pub fn table(self) -> Option<String> {
        self.string(ATTR_TABLE)
    }
}

/// `protocol . port` as a concatenated key: each field padded to 4 bytes, the port in
/// network order.
pub fn proto_port(protocol: Protocol, port: u16) -> [u8; 8] {
    let p = port.to_be_bytes();
    [protocol_number(protocol), 0, 0, 0, p[0], p[1], 0, 0]
}

pub fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

pub fn protocol_of(number: u8) -> Option<Protocol> {
    match number {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    }
}

/// Reads `protocol . port` back.
pub fn read_proto_port(bytes: &[u8]) -> Option<(Protocol, u16)> {
    let [proto, 0, 0, 0, hi, lo, 0, 0] = *bytes else {
        return None;
    };
    Some((protocol_of(proto)?, u16::from_be_bytes([hi, lo])))
}

/// An `ifname` key: the name NUL-padded to `IFNAMSIZ` (16) bytes.
pub fn ifname(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let len = name.len().min(15);
    out[..len].copy_from_slice(&name.as_bytes()[..len]);
    out
}

pub fn read_ifname(bytes: &[u8]) -> Option<String> {
    if bytes.len() != 16 {
        return None;
    }
    let name = bytes.split(|b| *b == 0).next()?;
    (!name.is_empty())
        .then(|| std::str::from_utf8(name).ok().map(str::to_owned))
        .flatten()
}

pub fn addr(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

pub fn read_addr(family: Family, bytes: &[u8]) -> Option<IpAddr> {
    match family {
        Family::Ipv4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))),
        Family::Ipv6 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes).ok()?,
        ))),
    }
}

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

/// A comment as libnftnl's user data TLV: type, length (with the NUL), text, NUL.
fn comment_tlv(comment: &str) -> Vec<u8> {
    let text = &comment.as_bytes()[..comment.len().min(254)];
    let mut out = Vec::with_capacity(text.len() + 3);
    out.push(UDATA_COMMENT);
    out.push(u8::try_from(text.len() + 1).expect("comment is at most 254 bytes"));
    out.extend_from_slice(text);
    out.push(0);
    out
}

fn read_comment_tlv(mut udata: &[u8]) -> Option<String> {
    while udata.len() >= 2 {
        let (kind, len) = (udata[0], usize::from(udata[1]));
        let value = udata.get(2..2 + len)?;
        if kind == UDATA_COMMENT {
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        udata = &udata[2 + len..];
    }
    None
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
    let mut elems = Vec::new();
    for (kind, elem) in Attrs(a.get(NFTA_SET_ELEM_LIST_ELEMENTS).unwrap_or_default()) {
        if kind != NFTA_LIST_ELEM {
            continue;
        }
        let e = Attrs(elem);
        let value = |kind| {
            e.get(kind)
                .and_then(|nest| Attrs(nest).get(NFTA_DATA_VALUE))
                .map(<[u8]>::to_vec)
        };
        let counter = e
            .get(NFTA_SET_ELEM_EXPR)
            .and_then(read_counter)
            .or_else(|| {
                Attrs(e.get(NFTA_SET_ELEM_EXPRESSIONS)?)
                    .filter(|(k, _)| *k == NFTA_LIST_ELEM)
                    .find_map(|(_, expr)| read_counter(expr))
            });
        elems.push(Elem {
            key: value(NFTA_SET_ELEM_KEY)?,
            key_end: value(NFTA_SET_ELEM_KEY_END),
            data: value(NFTA_SET_ELEM_DATA),
            comment: e.get(NFTA_SET_ELEM_USERDATA).and_then(read_comment_tlv),
            counter,
        });
    }
    Some((set, elems))
}

/// `(packets, bytes)` of a `counter` expression.
fn read_counter(expr: &[u8]) -> Option<(u64, u64)> {
    let a = Attrs(expr);
    if a.string(NFTA_EXPR_NAME)? != "counter" {
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

/// A conntrack dump of the entries whose mark has all of `mark`'s bits.
pub fn conntrack_dump(seq: u32, mark: u32) -> Vec<u8> {
    let mut m = Message::new(
        (SUBSYS_CTNETLINK << 8) | u16::from(IPCTNL_MSG_CT_GET),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        NFPROTO_UNSPEC,
        0,
    );
    m.put_be32(CTA_MARK, mark);
    m.put_be32(CTA_MARK_MASK, mark);
    m.finish()
}

/// A conntrack entry as dumped: what identifies it, and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub family: Family,
    pub protocol: Option<Protocol>,
    /// The destination port the client used (before DNAT).
    pub port: Option<u16>,
    /// Where the flow went: the reply direction's source, the backend after DNAT.
    pub backend: Option<IpAddr>,
    /// `CTA_TUPLE_ORIG` as the kernel sent it, to name the entry when deleting it.
    tuple: Vec<u8>,
    zone: Option<Vec<u8>>,
}

pub fn read_flow(message: &Received<'_>) -> Option<Flow> {
    if message.kind != (SUBSYS_CTNETLINK << 8) | u16::from(IPCTNL_MSG_CT_NEW) {
        return None;
    }
    let family = match message.family() {
        AF_INET => Family::Ipv4,
        AF_INET6 => Family::Ipv6,
        _ => return None,
    };
    let a = message.attrs();
    let tuple = a.get(CTA_TUPLE_ORIG)?;
    let proto = Attrs(Attrs(tuple).get(CTA_TUPLE_PROTO).unwrap_or_default());
    Some(Flow {
        family,
        protocol: proto
            .get(CTA_PROTO_NUM)
            .and_then(|b| protocol_of(*b.first()?)),
        port: proto
            .get(CTA_PROTO_DST_PORT)
            .and_then(|b| Some(u16::from_be_bytes(b.get(..2)?.try_into().ok()?))),
        backend: a.get(CTA_TUPLE_REPLY).and_then(|reply| {
            let ip = Attrs(Attrs(reply).get(CTA_TUPLE_IP)?);
            match family {
                Family::Ipv4 => read_addr(family, ip.get(CTA_IP_V4_SRC)?),
                Family::Ipv6 => read_addr(family, ip.get(CTA_IP_V6_SRC)?),
            }
        }),
        tuple: tuple.to_vec(),
        zone: a.get(CTA_ZONE).map(<[u8]>::to_vec),
    })
}

/// Deletes one conntrack entry, named by its original tuple (and zone).
pub fn conntrack_delete(seq: u32, flow: &Flow) -> Vec<u8> {
    let family = match flow.family {
        Family::Ipv4 => AF_INET,
        Family::Ipv6 => AF_INET6,
    };
    let mut m = Message::new(
        (SUBSYS_CTNETLINK << 8) | u16::from(IPCTNL_MSG_CT_DELETE),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family,
        0,
    );
    let nest = m.begin(CTA_TUPLE_ORIG);
    m.buf.extend_from_slice(&flow.tuple);
    m.end(nest);
    if let Some(zone) = &flow.zone {
        m.put(CTA_ZONE, zone);
    }
    m.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds expected bytes from (host-order u16/u32, raw) pieces, so the tests hold on
    /// either byte order.
    enum B<'a> {
        U16(u16),
        U32(u32),
        Raw(&'a [u8]),
    }

    fn bytes(parts: &[B<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in parts {
            match p {
                B::U16(v) => out.extend_from_slice(&v.to_ne_bytes()),
                B::U32(v) => out.extend_from_slice(&v.to_ne_bytes()),
                B::Raw(r) => out.extend_from_slice(r),
            }
        }
        out
    }

    #[test]
    fn values_have_network_order_and_padding() {
        assert_eq!(proto_port(Protocol::Tcp, 80), [6, 0, 0, 0, 0, 0x50, 0, 0]);
        assert_eq!(
            proto_port(Protocol::Udp, 0x1f90),
            [17, 0, 0, 0, 0x1f, 0x90, 0, 0]
        );
        assert_eq!(
            read_proto_port(&proto_port(Protocol::Sctp, 65535)),
            Some((Protocol::Sctp, 65535))
        );
        assert_eq!(read_proto_port(&[6, 1, 0, 0, 0, 80, 0, 0]), None);
        assert_eq!(&ifname("eth1")[..], b"eth1\0\0\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(
            read_ifname(&ifname("pppoe-wan")).as_deref(),
            Some("pppoe-wan")
        );
        assert_eq!(addr("192.168.1.10".parse().unwrap()), [192, 168, 1, 10]);
        assert_eq!(comment_tlv("c"), [0, 2, b'c', 0]);
    }

    /// The exact bytes nft 1.0.6 sends for
    /// `add element inet kube_port_forward fwd_ipv4_addr { tcp . 81 comment "c" : 192.168.1.10 }`
    /// (seen with `nft --debug=mnl`), but for nft's set id attribute, which names a set by
    /// its id within a batch and is not needed for a set that exists.
    #[test]
    fn element_add_matches_nft() {
        let change = SetChange {
            set: "fwd_ipv4_addr",
            op: Op::Add,
            elems: vec![Elem {
                key: proto_port(Protocol::Tcp, 81).to_vec(),
                data: Some(vec![192, 168, 1, 10]),
                comment: Some("c".into()),
                ..Elem::default()
            }],
        };
        let mut seq = 1;
        let messages = element_messages("kube_port_forward", &change, &mut seq);
        assert_eq!(seq, 2);
        let expected = bytes(&[
            B::U32(108),
            B::U16(0x0a0c),
            B::U16(NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK),
            B::U32(1),
            B::U32(0),
            B::Raw(&[1, 0, 0, 0]),
            B::U16(22),
            B::U16(1),
            B::Raw(b"kube_port_forward\0\0\0"),
            B::U16(18),
            B::U16(2),
            B::Raw(b"fwd_ipv4_addr\0\0\0"),
            B::U16(44),
            B::U16(0x8003),
            B::U16(40),
            B::U16(0x8001),
            B::U16(16),
            B::U16(0x8001),
            B::U16(12),
            B::U16(1),
            B::Raw(&[6, 0, 0, 0, 0, 81, 0, 0]),
            B::U16(12),
            B::U16(0x8002),
            B::U16(8),
            B::U16(1),
            B::Raw(&[192, 168, 1, 10]),
            B::U16(8),
            B::U16(6),
            B::Raw(&[0, 2, b'c', 0]),
        ]);
        assert_eq!(messages, vec![expected]);
    }

    /// `add element ... src_ipv4 { 10.0.0.0/8 . tcp . 80 }` as nft sends it: the range as
    /// key and key end.
    #[test]
    fn interval_element_carries_its_end() {
        let change = SetChange {
            set: "src_ipv4",
            op: Op::Delete,
            elems: vec![Elem {
                key: [&[10, 0, 0, 0][..], &proto_port(Protocol::Tcp, 80)].concat(),
                key_end: Some([&[10, 255, 255, 255][..], &proto_port(Protocol::Tcp, 80)].concat()),
                ..Elem::default()
            }],
        };
        let messages = element_messages("t", &change, &mut 7);
        let expected = bytes(&[
            B::U32(92),
            B::U16(0x0a0e),
            B::U16(NLM_F_REQUEST | NLM_F_ACK | NLM_F_ECHO),
            B::U32(7),
            B::U32(0),
            B::Raw(&[1, 0, 0, 0]),
            B::U16(6),
            B::U16(1),
            B::Raw(b"t\0\0\0"),
            B::U16(13),
            B::U16(2),
            B::Raw(b"src_ipv4\0\0\0\0"),
            B::U16(48),
            B::U16(0x8003),
            B::U16(44),
            B::U16(0x8001),
            B::U16(20),
            B::U16(0x8001),
            B::U16(16),
            B::U16(1),
            B::Raw(&[10, 0, 0, 0, 6, 0, 0, 0, 0, 80, 0, 0]),
            B::U16(20),
            B::U16(0x800a),
            B::U16(16),
            B::U16(1),
            B::Raw(&[10, 255, 255, 255, 6, 0, 0, 0, 0, 80, 0, 0]),
        ]);
        assert_eq!(messages, vec![expected]);
    }

    #[test]
    fn batch_is_guarded_by_the_generation() {
        let got = batch(Some(0x01020304), 5, &[vec![9; 4]], 6);
        let expected = bytes(&[
            B::U32(28),
            B::U16(16),
            B::U16(NLM_F_REQUEST),
            B::U32(5),
            B::U32(0),
            B::Raw(&[0, 0, 0, 10]),
            B::U16(8),
            B::U16(1),
            B::Raw(&[1, 2, 3, 4]),
            B::Raw(&[9; 4]),
            B::U32(20),
            B::U16(17),
            B::U16(NLM_F_REQUEST),
            B::U32(6),
            B::U32(0),
            B::Raw(&[0, 0, 0, 10]),
        ]);
        assert_eq!(got, expected);
    }

    #[test]
    fn requests_have_their_exact_bytes() {
        assert_eq!(
            get_generation(3),
            bytes(&[
                B::U32(20),
                B::U16(0x0a10),
                B::U16(1),
                B::U32(3),
                B::U32(0),
                B::Raw(&[0; 4])
            ])
        );
        assert_eq!(
            dump_request(NFT_MSG_GETSETELEM, 4, "t", Some("s")),
            bytes(&[
                B::U32(36),
                B::U16(0x0a0d),
                B::U16(NLM_F_REQUEST | NLM_F_DUMP),
                B::U32(4),
                B::U32(0),
                B::Raw(&[1, 0, 0, 0]),
                B::U16(6),
                B::U16(1),
                B::Raw(b"t\0\0\0"),
                B::U16(6),
                B::U16(2),
                B::Raw(b"s\0\0\0"),
            ])
        );
        assert_eq!(
            conntrack_dump(8, 0x0020_0000),
            bytes(&[
                B::U32(36),
                B::U16(0x0101),
                B::U16(NLM_F_REQUEST | NLM_F_DUMP),
                B::U32(8),
                B::U32(0),
                B::Raw(&[0; 4]),
                B::U16(8),
                B::U16(8),
                B::Raw(&[0, 0x20, 0, 0]),
                B::U16(8),
                B::U16(21),
                B::Raw(&[0, 0x20, 0, 0]),
            ])
        );
    }

    #[test]
    fn table_and_conntrack_requests_have_their_exact_bytes() {
        assert_eq!(
            get_table(2, "t"),
            bytes(&[
                B::U32(28),
                B::U16(0x0a01),
                B::U16(NLM_F_REQUEST | NLM_F_ACK),
                B::U32(2),
                B::U32(0),
                B::Raw(&[1, 0, 0, 0]),
                B::U16(6),
                B::U16(1),
                B::Raw(b"t\0\0\0"),
            ])
        );
        // A dumped entry comes back as the delete's tuple, byte for byte, with its zone.
        let tuple = [9u8, 9, 9, 9, 7, 7, 7, 7];
        let flow = Flow {
            family: Family::Ipv6,
            protocol: Some(Protocol::Udp),
            port: Some(53),
            backend: None,
            tuple: tuple.to_vec(),
            zone: Some(vec![0, 5]),
        };
        assert_eq!(
            conntrack_delete(3, &flow),
            bytes(&[
                B::U32(40),
                B::U16(0x0102),
                B::U16(NLM_F_REQUEST | NLM_F_ACK),
                B::U32(3),
                B::U32(0),
                B::Raw(&[10, 0, 0, 0]),
                B::U16(12),
                B::U16(0x8001),
                B::Raw(&tuple),
                B::U16(6),
                B::U16(18),
                B::Raw(&[0, 5, 0, 0]),
            ])
        );
    }

    #[test]
    fn conntrack_entries_are_read_from_their_original_tuple() {
        // IPCTNL_MSG_CT_NEW for 203.0.113.2:40000 -> 203.0.113.1:5353/udp, as dumped.
        let mut m = Message::new(
            (SUBSYS_CTNETLINK << 8) | u16::from(IPCTNL_MSG_CT_NEW),
            NLM_F_MULTI,
            1,
            AF_INET,
            0,
        );
        let orig = m.begin(CTA_TUPLE_ORIG);
        let ip = m.begin(1);
        m.put(1, &[203, 0, 113, 2]);
        m.put(2, &[203, 0, 113, 1]);
        m.end(ip);
        let proto = m.begin(CTA_TUPLE_PROTO);
        m.put(CTA_PROTO_NUM, &[17]);
        m.put(2, &40000u16.to_be_bytes());
        m.put(CTA_PROTO_DST_PORT, &5353u16.to_be_bytes());
        m.end(proto);
        m.end(orig);
        // The reply comes from the backend the flow was DNATed to.
        let reply = m.begin(CTA_TUPLE_REPLY);
        let ip = m.begin(CTA_TUPLE_IP);
        m.put(CTA_IP_V4_SRC, &[10, 0, 0, 7]);
        m.put(2, &[203, 0, 113, 2]);
        m.end(ip);
        m.end(reply);
        m.put_be32(CTA_MARK, 0x0020_0000);
        let whole = m.finish();
        let received: Vec<Received<'_>> = messages(&whole).collect();
        let flow = read_flow(&received[0]).unwrap();
        assert_eq!(flow.family, Family::Ipv4);
        assert_eq!(flow.protocol, Some(Protocol::Udp));
        assert_eq!(flow.port, Some(5353));
        assert_eq!(flow.zone, None);
        assert_eq!(flow.backend, Some("10.0.0.7".parse().unwrap()));
        // The delete names the entry by the tuple exactly as dumped.
        let delete = conntrack_delete(2, &flow);
        let tuple = &whole[20..20 + usize::from(u16::from_ne_bytes([whole[20], whole[21]]))];
        assert_eq!(&delete[20..20 + tuple.len()], tuple);
    }

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
            let received: Vec<Received<'_>> = super::messages(m).collect();
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
