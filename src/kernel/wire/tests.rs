//! The exact bytes of the requests, nf_tables and ctnetlink alike. Where nft sends the same
//! request, the bytes are nft's.

use super::*;
use crate::core::model::{Family, Protocol};

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
