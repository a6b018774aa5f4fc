//! nf_tables notifications, to notice the daemon's table being changed from outside
//! (`fw4 flush`, `nft flush ruleset`, an element added or deleted by hand) and restore it.
//!
//! Every commit is announced as the objects it changed, then `NFT_MSG_NEWGEN` with the new
//! generation. The monitor reports the generation of each commit that touched the table, so
//! the daemon can tell its own commits (the engine already knows that generation) from
//! someone else's. Parsed with [`super::wire`], down to the attributes needed.

use std::io;

use netlink_sys::{AsyncSocketExt, TokioSocket, protocols};

use super::wire::{self, NFPROTO_INET, SUBSYS_NFTABLES};
use crate::netlink::{drain, subscribe};

/// nfnetlink's nf_tables group (linux/netfilter/nfnetlink.h).
const NFNLGRP_NFTABLES: u32 = 7;

/// A subscription to nf_tables changes, filtered to those of one table.
pub struct TableEvents {
    socket: TokioSocket,
    table: String,
    /// A change to the table was announced; its commit's generation comes next.
    pending: bool,
}

/// Something changed in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Touched {
    /// By the commit that made this generation.
    At(u32),
    /// Notifications were lost: anything may have changed.
    Unknown,
}

impl TableEvents {
    pub fn subscribe(table: &str) -> io::Result<TableEvents> {
        let socket = subscribe(protocols::NETLINK_NETFILTER, &[NFNLGRP_NFTABLES])?;
        Ok(TableEvents {
            socket,
            table: table.to_owned(),
            pending: false,
        })
    }

    /// Waits until a commit changed something in the table.
    pub async fn table_touched(&mut self) -> Touched {
        loop {
            let buffer = match self.socket.recv_from_full().await {
                Ok((buffer, _)) => buffer,
                Err(_) => {
                    drain(&mut self.socket);
                    self.pending = false;
                    return Touched::Unknown;
                }
            };
            if let Some(generation) =
                commits_touching(&buffer, &self.table, &mut self.pending).last()
            {
                return Touched::At(*generation);
            }
        }
    }
}

/// The generations of the commits in a datagram that changed something of the inet table
/// `table`; `pending` carries a change announced at the end of one datagram whose
/// generation comes in the next.
pub fn commits_touching(datagram: &[u8], table: &str, pending: &mut bool) -> Vec<u32> {
    let mut generations = Vec::new();
    for m in wire::messages(datagram) {
        if m.kind >> 8 != SUBSYS_NFTABLES {
            continue;
        }
        if let Some(generation) = wire::generation_of(&m) {
            if std::mem::take(pending) {
                generations.push(generation);
            }
            continue;
        }
        if m.family() == NFPROTO_INET && m.attrs().table().as_deref() == Some(table) {
            *pending = true;
        }
    }
    generations
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::wire::Message;

    const DELTABLE: u8 = 2;
    const DELRULE: u8 = 8;
    const NEWSETELEM: u8 = 12;

    fn about(kind: u8, family: u8, table: &str) -> Vec<u8> {
        let mut m = Message::nft(kind, 0, 0, family);
        m.put_str(1, table);
        m.finish()
    }

    fn newgen(generation: u32) -> Vec<u8> {
        let mut m = Message::nft(wire::NFT_MSG_NEWGEN, 0, 0, 0);
        m.put_be32(1, generation);
        m.put_be32(2, 4242);
        m.finish()
    }

    #[test]
    fn commits_touching_the_table_are_reported_with_their_generation() {
        let mut pending = false;
        let mut datagram = about(DELTABLE, NFPROTO_INET, "fw4");
        datagram.extend(newgen(7));
        assert!(commits_touching(&datagram, "kube_port_forward", &mut pending).is_empty());
        datagram.extend(about(DELRULE, NFPROTO_INET, "kube_port_forward"));
        datagram.extend(newgen(8));
        datagram.extend(about(NEWSETELEM, NFPROTO_INET, "kube_port_forward"));
        datagram.extend(newgen(9));
        assert_eq!(
            commits_touching(&datagram, "kube_port_forward", &mut pending),
            vec![8, 9]
        );
        // Another family, another subsystem, a name that only starts alike.
        for other in [
            about(DELTABLE, 2, "kube_port_forward"),
            about(DELTABLE, NFPROTO_INET, "kube_port_forward2"),
            {
                let mut m = Message::new((1 << 8) | 2, 0, 0, NFPROTO_INET, 0);
                m.put_str(1, "kube_port_forward");
                m.finish()
            },
        ] {
            let mut datagram = other;
            datagram.extend(newgen(10));
            assert!(commits_touching(&datagram, "kube_port_forward", &mut pending).is_empty());
        }
    }

    #[test]
    fn a_commit_split_across_datagrams_is_reported_once() {
        let mut pending = false;
        let first = about(DELTABLE, NFPROTO_INET, "t");
        assert!(commits_touching(&first, "t", &mut pending).is_empty());
        assert!(pending);
        assert_eq!(commits_touching(&newgen(3), "t", &mut pending), vec![3]);
        assert!(!pending);
    }

    #[test]
    fn truncated_messages_are_not_read_past_their_end() {
        let mut whole = about(DELTABLE, NFPROTO_INET, "t");
        whole.extend(newgen(5));
        for cut in 0..whole.len() {
            let mut pending = false;
            assert!(
                commits_touching(&whole[..cut], "t", &mut pending).is_empty(),
                "cut at {cut}"
            );
        }
        assert_eq!(commits_touching(&whole, "t", &mut false), vec![5]);
    }
}
