//! nf_tables notifications, to notice the daemon's table being deleted from outside
//! (`fw4 flush`, `nft flush ruleset`) and restore it.
//!
//! Parsed here by hand, down to the one attribute needed (the table name): no maintained
//! crate decodes nf_tables messages, and the rest of the message is not needed.

use std::io;

use netlink_sys::{AsyncSocketExt, TokioSocket, protocols};

use crate::netlink::{drain, subscribe};

/// nfnetlink's nf_tables group (linux/netfilter/nfnetlink.h).
const NFNLGRP_NFTABLES: u32 = 7;
/// nf_tables' subsystem id in the upper byte of a message type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// Messages that take part of a table away: `NFT_MSG_DELTABLE`, `DELCHAIN`, `DELRULE`,
/// `DELSET` (linux/netfilter/nf_tables.h). Element deletions are not among them: the daemon
/// makes those itself all the time, and a full read at each resync catches stray ones.
const DELETIONS: [u8; 4] = [2, 5, 8, 11];
/// `NFPROTO_INET`, the family of the daemon's table.
const NFPROTO_INET: u8 = 1;
/// The table name is attribute 1 of tables, chains, rules and sets alike.
const ATTR_TABLE: u16 = 1;

/// A subscription to nf_tables changes, filtered to deletions in one table.
pub struct TableEvents {
    socket: TokioSocket,
    table: String,
}

impl TableEvents {
    pub fn subscribe(table: &str) -> io::Result<TableEvents> {
        let socket = subscribe(protocols::NETLINK_NETFILTER, &[NFNLGRP_NFTABLES])?;
        Ok(TableEvents {
            socket,
            table: table.to_owned(),
        })
    }

    /// Waits until something of the table may have been deleted: a deletion message naming
    /// it, or an overrun (notifications were lost, so any of them might have).
    pub async fn table_touched(&mut self) {
        loop {
            let hit = match self.socket.recv_from_full().await {
                Ok((buffer, _)) => deletes_from(&buffer, &self.table),
                Err(_) => true,
            };
            if hit {
                drain(&mut self.socket);
                return;
            }
        }
    }
}

/// Whether a datagram of nf_tables notifications holds a deletion from the inet table
/// `table`: the table itself, or one of its chains, rules or sets.
pub fn deletes_from(datagram: &[u8], table: &str) -> bool {
    let mut rest = datagram;
    // struct nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid } in host order.
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            return false;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let message = &rest[16..len];
        let deletion = kind >> 8 == NFNL_SUBSYS_NFTABLES && DELETIONS.contains(&(kind as u8));
        // struct nfgenmsg { u8 family; u8 version; u16 res_id }, then attributes.
        if deletion
            && message.len() >= 4
            && message[0] == NFPROTO_INET
            && table_name(&message[4..]) == Some(table.as_bytes())
        {
            return true;
        }
        rest = &rest[align(len).min(rest.len())..];
    }
    false
}

/// The table-name attribute, without its NUL.
fn table_name(mut attributes: &[u8]) -> Option<&[u8]> {
    // struct nlattr { u16 len; u16 type }, each padded to 4 bytes.
    while attributes.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        // The top two bits are flags (nested, network byte order).
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]) & 0x3fff;
        if len < 4 || len > attributes.len() {
            return None;
        }
        if kind == ATTR_TABLE {
            let value = &attributes[4..len];
            return Some(value.strip_suffix(&[0]).unwrap_or(value));
        }
        attributes = &attributes[align(len).min(attributes.len())..];
    }
    None
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = 4 + value.len();
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(align(len), 0);
        out
    }

    fn message(kind: u16, family: u8, attributes: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 0];
        for a in attributes {
            body.extend_from_slice(a);
        }
        let len = 16 + body.len();
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(&body);
        out
    }

    const DELTABLE: u16 = (10 << 8) | 2;
    const DELRULE: u16 = (10 << 8) | 8;
    const NEWSETELEM: u16 = (10 << 8) | 12;

    #[test]
    fn deletions_of_our_table_are_seen_among_others() {
        let ours = attribute(1, b"kube_port_forward\0");
        let theirs = attribute(1, b"fw4\0");
        let handle = attribute(3, &[0; 8]);
        let mut datagram = message(DELTABLE, NFPROTO_INET, std::slice::from_ref(&theirs));
        assert!(!deletes_from(&datagram, "kube_port_forward"));
        datagram.extend(message(DELRULE, NFPROTO_INET, &[ours.clone(), handle]));
        assert!(deletes_from(&datagram, "kube_port_forward"));
        // Not a deletion, another family, another subsystem, a name that only starts alike.
        assert!(!deletes_from(
            &message(NEWSETELEM, NFPROTO_INET, std::slice::from_ref(&ours)),
            "kube_port_forward"
        ));
        assert!(!deletes_from(
            &message(DELTABLE, 2, std::slice::from_ref(&ours)),
            "kube_port_forward"
        ));
        assert!(!deletes_from(
            &message((1 << 8) | 2, NFPROTO_INET, &[ours]),
            "kube_port_forward"
        ));
        assert!(!deletes_from(
            &message(
                DELTABLE,
                NFPROTO_INET,
                &[attribute(1, b"kube_port_forward2\0")]
            ),
            "kube_port_forward"
        ));
    }

    #[test]
    fn truncated_messages_are_not_read_past_their_end() {
        let whole = message(DELTABLE, NFPROTO_INET, &[attribute(1, b"t\0")]);
        for cut in 0..whole.len() {
            assert!(!deletes_from(&whole[..cut], "t"), "cut at {cut}");
        }
        assert!(deletes_from(&whole, "t"));
    }
}
