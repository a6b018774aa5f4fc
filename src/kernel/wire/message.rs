//! The netlink framing: a message being written ([`Message`]), the messages of a received
//! datagram ([`messages`]) and the attributes inside them ([`Attrs`]). Netlink and attribute
//! headers are in host order.

use super::nftables::ATTR_TABLE;

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

pub const NFPROTO_UNSPEC: u8 = 0;
pub const NFPROTO_INET: u8 = 1;

/// A netlink message being written: header, `nfgenmsg`, attributes.
pub struct Message {
    pub(super) buf: Vec<u8>,
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

    pub(super) fn len(&self) -> usize {
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

pub(super) fn align(len: usize) -> usize {
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

    pub(super) fn string(self, kind: u16) -> Option<String> {
        let value = self.get(kind)?;
        let value = value.split(|b| *b == 0).next().unwrap_or_default();
        Some(String::from_utf8_lossy(value).into_owned())
    }

    pub(super) fn be32(self, kind: u16) -> Option<u32> {
        let v = self.get(kind)?;
        Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
    }

    /// The table a message is about (every nf_tables object names it as attribute 1).
    pub fn table(self) -> Option<String> {
        self.string(ATTR_TABLE)
    }
}
