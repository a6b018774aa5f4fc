//! The ctnetlink messages: a dump of the entries that carry a mark, each entry read back,
//! and the delete that names one entry.

use std::net::IpAddr;

use super::message::{
    Attrs, Message, NFPROTO_UNSPEC, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, Received,
    SUBSYS_CTNETLINK,
};
use super::values::{protocol_of, read_addr};
use crate::core::model::{Family, Protocol};

/// ctnetlink message kinds.
pub const IPCTNL_MSG_CT_NEW: u8 = 0;
pub const IPCTNL_MSG_CT_GET: u8 = 1;
pub const IPCTNL_MSG_CT_DELETE: u8 = 2;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

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
    pub(super) tuple: Vec<u8>,
    pub(super) zone: Option<Vec<u8>>,
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
    use crate::kernel::wire::{NLM_F_MULTI, messages};

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
}
