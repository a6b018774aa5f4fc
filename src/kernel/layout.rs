//! How the table this daemon owns is laid out: its name and shape ([`TableConfig`]), the
//! names of its sets, maps and chains, and what it should hold ([`Ruleset`]).
//!
//! DNAT is a map lookup keyed on `meta l4proto . th dport`: one lookup per new flow however
//! many forwards exist. nft 1.0.6 (Debian 12) cannot create a map whose value is
//! `addr . port` from JSON, so each family has two maps with the same key, one for the
//! address and one for the port. Owners travel as element comments, and the address maps
//! count packets per element (NAT chains see only a flow's first packet, so the count is of
//! new flows).
//!
//! Pure, like the rest of the table's description: [`super::build`] turns it into a
//! transaction, [`super::read`] reads the kernel's copy back, [`super::diff`] compares them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use nftables::schema::SetType;
use serde::Serialize;

use crate::core::model::{BUCKETS, Family, Forward, ForwardKey};

pub const DEFAULT_TABLE: &str = "kube_port_forward";
pub(super) const CHAIN: &str = "prerouting";
/// The chain that masquerades reflected flows, when NAT reflection is on.
pub(super) const REFLECT_CHAIN: &str = "postrouting";
pub(super) const WAN_IFACES: &str = "wan_ifaces";
/// nft refuses comments longer than this (NFTNL_UDATA_COMMENT_MAXLEN).
pub const COMMENT_MAX: usize = 128;
/// The `dstnat` priority of a NAT prerouting chain.
pub(super) const DSTNAT_PRIORITY: i32 = -100;
/// The `srcnat` priority of a NAT postrouting chain.
pub(super) const SRCNAT_PRIORITY: i32 = 100;
/// The conntrack mark bit set on every flow this table DNATs, so a firewall's forward chain
/// (firewall4's, through the shipped include) can accept exactly those flows. Bit 21: not
/// used by firewall4, mwan3 (0x3f00) or SQM/qosify's DSCP bits (0xfc000000, 0x7f).
pub const DEFAULT_CT_MARK: u32 = 0x0020_0000;

/// How the table is shaped: which packets it considers for DNAT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TableConfig {
    /// Name of the `inet` table the daemon owns.
    pub table: String,
    /// Packets must arrive on one of these interfaces; empty: any interface.
    pub wan_interfaces: BTreeSet<String>,
    /// Packets must be addressed to one of these; empty (unless `listed_addresses`): to any
    /// local address of the router (`fib daddr type local`).
    pub wan_addresses: BTreeSet<IpAddr>,
    /// Match destinations against the WAN address sets even while they are empty: the daemon
    /// fills them from the WAN interfaces' addresses, which come and go.
    pub listed_addresses: bool,
    /// NAT reflection: LAN clients reach forwards through the WAN address too, masqueraded
    /// so replies come back through the router. Needs WAN interfaces and listed addresses
    /// (without them a LAN client cannot be told from a WAN one).
    pub reflection: bool,
    /// Bits OR-ed into the conntrack mark of every flow this table DNATs.
    pub ct_mark: u32,
}

/// Why a [`TableConfig`] is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "table name \"{0}\": use 1 to 64 letters, digits and underscores, starting with a letter"
    )]
    TableName(String),
    #[error(
        "WAN interface \"{0}\": an interface name has 1 to 15 characters, none of them '/', ':', space or quote"
    )]
    Interface(String),
}

impl TableConfig {
    pub fn new(
        table: &str,
        wan_interfaces: impl IntoIterator<Item = String>,
        wan_addresses: impl IntoIterator<Item = IpAddr>,
    ) -> Result<TableConfig, ConfigError> {
        let table_ok = table.len() <= 64
            && table.starts_with(|c: char| c.is_ascii_alphabetic())
            && table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !table_ok {
            return Err(ConfigError::TableName(table.to_owned()));
        }
        let wan_interfaces: BTreeSet<String> = wan_interfaces.into_iter().collect();
        for name in &wan_interfaces {
            let ok = !name.is_empty()
                && name.len() <= 15
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"/:\"'\\".contains(&b));
            if !ok {
                return Err(ConfigError::Interface(name.clone()));
            }
        }
        Ok(TableConfig {
            table: table.to_owned(),
            wan_interfaces,
            wan_addresses: wan_addresses.into_iter().collect(),
            listed_addresses: false,
            reflection: false,
            ct_mark: DEFAULT_CT_MARK,
        })
    }

    /// What decides the table's structure (as opposed to its elements).
    pub(super) fn shape(&self) -> (&str, bool, bool, bool, u32) {
        (
            &self.table,
            self.match_interfaces(),
            self.match_addresses(),
            self.reflects(),
            self.ct_mark,
        )
    }

    /// The comments of this daemon's rules, in chain order.
    pub fn rule_comments(&self) -> Vec<String> {
        let mut comments: Vec<String> = self
            .rules()
            .into_iter()
            .map(|(f, w, side, pick)| self.rule_comment(f, w, side, pick))
            .collect();
        if self.reflects() {
            comments.push(self.reflect_comment());
        }
        for family in FAMILIES {
            for bucket in 0..BUCKETS {
                comments.push(bucket_comment(family, bucket));
            }
        }
        comments
    }

    pub(super) fn match_interfaces(&self) -> bool {
        !self.wan_interfaces.is_empty()
    }

    /// The prerouting rules, in chain order.
    pub(super) fn rules(&self) -> Vec<(Family, Who, Side, Pick)> {
        let sides: &[Side] = if self.reflects() {
            &[Side::Wan, Side::Lan]
        } else if self.match_interfaces() {
            &[Side::Wan]
        } else {
            &[Side::Any]
        };
        let mut rules = Vec::new();
        for side in sides {
            for (family, who) in RULES {
                for pick in [Pick::Single, Pick::Hash] {
                    rules.push((family, who, *side, pick));
                }
            }
        }
        rules
    }

    /// The conntrack mark bits a rule sets: reflected flows also carry the next bit up, which
    /// the postrouting chain masquerades (it cannot see the input interface itself).
    pub(super) fn mark_of(&self, side: Side) -> u32 {
        match side {
            Side::Lan => self.ct_mark | self.reflect_mark(),
            Side::Wan | Side::Any => self.ct_mark,
        }
    }

    pub(super) fn reflect_mark(&self) -> u32 {
        self.ct_mark << 1
    }

    pub(super) fn match_addresses(&self) -> bool {
        self.listed_addresses || !self.wan_addresses.is_empty()
    }

    /// Whether NAT reflection is in effect: asked for, and the table can tell LAN from WAN.
    pub fn reflects(&self) -> bool {
        self.reflection && self.match_interfaces() && self.match_addresses()
    }

    pub(super) fn reflect_comment(&self) -> String {
        format!(
            "kube-port-forward reflection mark=0x{:08x}",
            self.reflect_mark()
        )
    }

    /// The comment that marks this daemon's rule for a family. It records the shape, so a
    /// table built for another configuration is recognised and rebuilt.
    pub(super) fn rule_comment(&self, family: Family, who: Who, side: Side, pick: Pick) -> String {
        format!(
            "kube-port-forward {} {} iif={} daddr={} {} mark=0x{:08x}",
            family_word(family),
            who.word(),
            side.word(),
            if self.match_addresses() {
                "set"
            } else {
                "local"
            },
            pick.word(),
            self.mark_of(side)
        )
    }
}

/// The comment of a bucket chain's rule.
pub(super) fn bucket_comment(family: Family, bucket: usize) -> String {
    format!(
        "kube-port-forward {} bucket {bucket} of {BUCKETS}",
        family_word(family)
    )
}

/// How a rule chooses the backend: the forward's one backend from the address map, or by
/// the client address's hash, for forwards with several (their keys are not in the address
/// map, so the first rule's lookup fails and the second takes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pick {
    Single,
    Hash,
}

impl Pick {
    pub(super) fn word(self) -> &'static str {
        match self {
            Pick::Single => "single",
            Pick::Hash => "hash",
        }
    }
}

pub(super) fn family_word(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

pub(super) fn wan_set(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "wan_ipv4",
        Family::Ipv6 => "wan_ipv6",
    }
}

pub(super) fn addr_map(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "fwd_ipv4_addr",
        Family::Ipv6 => "fwd_ipv6_addr",
    }
}

pub(super) fn port_map(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "fwd_ipv4_port",
        Family::Ipv6 => "fwd_ipv6_port",
    }
}

/// The maps of the buckets of forwards with several backends, one per bucket: `proto . port`
/// to the backend's address. A rule hashes the client address into a bucket and goes to
/// that bucket's chain, which looks the forward up in that bucket's map: a constant number
/// of lookups per new flow, whatever the number of forwards. (nft 1.0.6 can neither type a
/// hash inside a concatenated key, nor list a `typeof jhash` map without crashing: hence
/// a map per bucket instead of one map keyed by `proto . port . bucket`.)
pub(super) fn pick_map(family: Family, bucket: usize) -> &'static str {
    match family {
        Family::Ipv4 => PICK_IPV4[bucket],
        Family::Ipv6 => PICK_IPV6[bucket],
    }
}

/// The chain of a bucket: one rule, DNAT by the bucket's map.
pub(super) fn bucket_chain(family: Family, bucket: usize) -> &'static str {
    match family {
        Family::Ipv4 => BUCKET_IPV4[bucket],
        Family::Ipv6 => BUCKET_IPV6[bucket],
    }
}

const PICK_IPV4: [&str; BUCKETS] = [
    "pick_ipv4_0",
    "pick_ipv4_1",
    "pick_ipv4_2",
    "pick_ipv4_3",
    "pick_ipv4_4",
    "pick_ipv4_5",
    "pick_ipv4_6",
    "pick_ipv4_7",
    "pick_ipv4_8",
    "pick_ipv4_9",
    "pick_ipv4_10",
    "pick_ipv4_11",
];
const PICK_IPV6: [&str; BUCKETS] = [
    "pick_ipv6_0",
    "pick_ipv6_1",
    "pick_ipv6_2",
    "pick_ipv6_3",
    "pick_ipv6_4",
    "pick_ipv6_5",
    "pick_ipv6_6",
    "pick_ipv6_7",
    "pick_ipv6_8",
    "pick_ipv6_9",
    "pick_ipv6_10",
    "pick_ipv6_11",
];
const BUCKET_IPV4: [&str; BUCKETS] = [
    "bucket_ipv4_0",
    "bucket_ipv4_1",
    "bucket_ipv4_2",
    "bucket_ipv4_3",
    "bucket_ipv4_4",
    "bucket_ipv4_5",
    "bucket_ipv4_6",
    "bucket_ipv4_7",
    "bucket_ipv4_8",
    "bucket_ipv4_9",
    "bucket_ipv4_10",
    "bucket_ipv4_11",
];
const BUCKET_IPV6: [&str; BUCKETS] = [
    "bucket_ipv6_0",
    "bucket_ipv6_1",
    "bucket_ipv6_2",
    "bucket_ipv6_3",
    "bucket_ipv6_4",
    "bucket_ipv6_5",
    "bucket_ipv6_6",
    "bucket_ipv6_7",
    "bucket_ipv6_8",
    "bucket_ipv6_9",
    "bucket_ipv6_10",
    "bucket_ipv6_11",
];

/// The set of `proto . port . address` of backends a health check holds down. Not on the
/// data path: it records in the kernel, beside the forwards, what `status` reports and
/// what a restarted daemon starts from.
pub(super) fn down_set(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "down_ipv4",
        Family::Ipv6 => "down_ipv6",
    }
}

/// One element of a pick map: bucket `bucket` of forward `key`.
pub type PickElem = (ForwardKey, usize);

/// One element of a down set: backend `addr` of forward `key` is down.
pub type Down = (ForwardKey, IpAddr);

/// Which forwards a rule serves: those open to every client, whose keys are in a hash set,
/// or those limited by source ranges, in an interval set. Kept apart because nft reads an
/// interval set whole on every change to it: forwards without ranges, the usual case, must
/// not pay for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Who {
    Open,
    Ranges,
}

impl Who {
    pub(super) fn word(self) -> &'static str {
        match self {
            Who::Open => "open",
            Who::Ranges => "ranges",
        }
    }
}

/// Which input interfaces a prerouting rule takes: the WAN ones, the others (LAN clients
/// reaching a forward through the WAN address: NAT reflection), or any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    Wan,
    Lan,
    Any,
}

impl Side {
    pub(super) fn word(self) -> &'static str {
        match self {
            Side::Wan => "wan",
            Side::Lan => "lan",
            Side::Any => "any",
        }
    }
}

/// The rules of one side of the chain, in order.
pub(super) const RULES: [(Family, Who); 4] = [
    (Family::Ipv4, Who::Open),
    (Family::Ipv4, Who::Ranges),
    (Family::Ipv6, Who::Open),
    (Family::Ipv6, Who::Ranges),
];

/// The hash set of `protocol . port` of forwards open to every client.
pub(super) fn open_set(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "open_ipv4",
        Family::Ipv6 => "open_ipv6",
    }
}

/// The interval set of `source network . protocol . port` of forwards limited to some
/// clients: one lookup per new flow, however many forwards and ranges.
pub(super) fn src_set(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "src_ipv4",
        Family::Ipv6 => "src_ipv6",
    }
}

/// One element of a source set: clients in `net` may use the forward `key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source {
    pub key: ForwardKey,
    pub net: IpNet,
}

/// The source set elements of a forward: one per range; none when it is open to all.
pub(super) fn sources_of(forward: &Forward) -> Vec<Source> {
    forward
        .sources
        .iter()
        .map(|net| Source {
            key: forward.key,
            net: *net,
        })
        .collect()
}

/// The open set element of a forward open to every client.
pub(super) fn open_of(forward: &Forward) -> Option<ForwardKey> {
    forward.sources.is_empty().then_some(forward.key)
}

pub(super) fn addr_type(family: Family) -> SetType {
    match family {
        Family::Ipv4 => SetType::Ipv4Addr,
        Family::Ipv6 => SetType::Ipv6Addr,
    }
}

pub(super) const FAMILIES: [Family; 2] = [Family::Ipv4, Family::Ipv6];

/// The element comment that records a forward's owner in the kernel:
/// `namespace/name:port uid=UID`, the human part shortened with `~` when the whole would
/// pass nft's limit, so the uid always survives.
pub fn owner_comment(forward: &Forward) -> String {
    let human = forward.owner.to_string();
    let uid = match &forward.owner.uid {
        Some(uid) => format!(" uid={uid}"),
        None => String::new(),
    };
    if human.len() + uid.len() <= COMMENT_MAX {
        return format!("{human}{uid}");
    }
    // Owner text is ASCII (checked by the planner), so byte slicing is safe.
    let keep = COMMENT_MAX - uid.len() - 1;
    format!("{}~{uid}", &human[..keep])
}

/// What the table should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub config: TableConfig,
    pub forwards: BTreeMap<ForwardKey, Forward>,
}

/// One map element as the kernel holds it (or should hold it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element<V> {
    pub value: V,
    pub comment: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::fixtures::forward;

    #[test]
    fn owner_comment_keeps_uid_within_nft_limit() {
        let mut f = forward(80, "10.0.0.1", &"n".repeat(63));
        f.owner.namespace = "s".repeat(63);
        f.owner.uid = Some("6f1c2a8e-1d7b-4c33-9a52-0d3f8c1e2b47".into());
        let comment = owner_comment(&f);
        assert_eq!(comment.len(), COMMENT_MAX);
        assert!(comment.ends_with("~ uid=6f1c2a8e-1d7b-4c33-9a52-0d3f8c1e2b47"));
        let short = forward(80, "10.0.0.1", "web");
        assert_eq!(owner_comment(&short), "ns/web:http uid=0000-1111");
    }

    #[test]
    fn config_refuses_bad_names() {
        assert!(TableConfig::new("1table", [], []).is_err());
        assert!(TableConfig::new("t; flush ruleset", [], []).is_err());
        assert!(TableConfig::new("t", ["eth0\"".to_owned()], []).is_err());
        assert!(TableConfig::new("t", ["a-very-long-ifname".to_owned()], []).is_err());
        assert!(TableConfig::new("t", ["pppoe-wan".to_owned()], []).is_ok());
    }
}
