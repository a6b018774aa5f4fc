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
//!
//! `message` frames netlink messages and reads them back, `nftables` and `conntrack` write
//! and read the messages of each subsystem, and `values` encodes what goes inside them.

mod conntrack;
mod message;
mod nftables;
#[cfg(test)]
mod tests;
mod values;

pub use conntrack::{
    Flow, IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_NEW, conntrack_delete,
    conntrack_dump, read_flow,
};
pub use message::{
    Attrs, Message, NFPROTO_INET, NFPROTO_UNSPEC, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_ECHO, NLM_F_MULTI, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, Received,
    SUBSYS_CTNETLINK, SUBSYS_NFTABLES, messages,
};
pub use nftables::{
    BATCH_BEGIN, BATCH_END, ChainInfo, Elem, MESSAGE_BUDGET, NFT_MSG_DELSETELEM, NFT_MSG_GETCHAIN,
    NFT_MSG_GETGEN, NFT_MSG_GETRULE, NFT_MSG_GETSET, NFT_MSG_GETSETELEM, NFT_MSG_GETTABLE,
    NFT_MSG_NEWGEN, NFT_MSG_NEWSETELEM, Op, SetChange, SetInfo, batch, dump_request,
    element_messages, generation_of, get_generation, get_table, read_chain, read_elements,
    read_rule, read_set,
};
pub use values::{
    addr, ifname, proto_port, protocol_number, protocol_of, read_addr, read_ifname, read_proto_port,
};
