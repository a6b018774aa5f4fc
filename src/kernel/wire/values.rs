//! The values inside attributes: `protocol . port` keys, interface names, addresses, and
//! comments as user data. Ports and addresses are in network order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::core::model::{Family, Protocol};

/// The comment in a rule's or an element's user data (`NFTNL_UDATA_*_COMMENT`).
const UDATA_COMMENT: u8 = 0;

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

/// A comment as libnftnl's user data TLV: type, length (with the NUL), text, NUL.
pub(super) fn comment_tlv(comment: &str) -> Vec<u8> {
    let text = &comment.as_bytes()[..comment.len().min(254)];
    let mut out = Vec::with_capacity(text.len() + 3);
    out.push(UDATA_COMMENT);
    out.push(u8::try_from(text.len() + 1).expect("comment is at most 254 bytes"));
    out.extend_from_slice(text);
    out.push(0);
    out
}

pub(super) fn read_comment_tlv(mut udata: &[u8]) -> Option<String> {
    while udata.len() >= 2 {
        let (kind, len) = (udata[0], usize::from(udata[1]));
        let value = udata.get(2..2 + len)?;
        if kind == UDATA_COMMENT {
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            return Some(
                String::from_utf8(text.to_vec())
                    .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned()),
            );
        }
        udata = &udata[2 + len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
