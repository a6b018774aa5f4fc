//! What the kernel holds: the table read back by netlink dump ([`super::nfnl`]), checked
//! against the shape this daemon builds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::layout::*;
use super::nfnl::TableDump;
use super::wire::{self, ChainInfo, Elem, SetInfo};
use crate::core::model::{BUCKETS, Family, ForwardKey};
use crate::core::plan::Holders;

/// The table as read from the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelTable {
    /// Why the table is not of the shape this configuration needs, if it is not.
    pub shape_problem: Option<String>,
    pub wan_interfaces: BTreeSet<String>,
    pub wan_addresses: BTreeSet<IpAddr>,
    pub addrs: BTreeMap<ForwardKey, Element<IpAddr>>,
    pub ports: BTreeMap<ForwardKey, Element<u16>>,
    /// The bucket maps: the backend of each bucket of forwards with several backends.
    pub picks: BTreeMap<PickElem, IpAddr>,
    /// Backends held down by health checks.
    pub down: BTreeSet<Down>,
    pub sources: BTreeSet<Source>,
    pub open: BTreeSet<ForwardKey>,
    /// `(packets, bytes)` counted per forward (address and bucket map counters, summed).
    pub counters: BTreeMap<ForwardKey, (u64, u64)>,
}

/// The smallest address, where the down set's range of a key starts.
const UNSPECIFIED: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// nf_tables set flags (linux/netfilter/nf_tables.h) that make up a set's kind.
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
/// nft's data type ids (nftables `enum datatypes`); a concatenation packs them 6 bits each.
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_IFNAME: u32 = 41;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_POST_ROUTING: u32 = 4;

fn concat(types: &[u32]) -> u32 {
    types.iter().fold(0, |acc, t| (acc << 6) | t)
}

fn addr_type_id(family: Family) -> (u32, u32) {
    match family {
        Family::Ipv4 => (TYPE_IPADDR, 4),
        Family::Ipv6 => (TYPE_IP6ADDR, 16),
    }
}

/// What one of the daemon's sets must be.
struct SetKind {
    key_type: u32,
    key_len: u32,
    /// Of the kind flags: map, interval.
    flags: u32,
    /// `(type, length)` of a map's values.
    data: Option<(u32, u32)>,
}

fn expected_set(name: &str) -> Option<SetKind> {
    let proto_port = concat(&[TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]);
    let kind = |key_type, key_len, flags, data| SetKind {
        key_type,
        key_len,
        flags,
        data,
    };
    if name == WAN_IFACES {
        return Some(kind(TYPE_IFNAME, 16, 0, None));
    }
    FAMILIES.into_iter().find_map(|family| {
        let (addr, len) = addr_type_id(family);
        if name == wan_set(family) {
            Some(kind(addr, len, 0, None))
        } else if name == open_set(family) {
            Some(kind(proto_port, 8, 0, None))
        } else if name == src_set(family) {
            let key = concat(&[addr, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]);
            Some(kind(key, len + 8, NFT_SET_INTERVAL, None))
        } else if name == addr_map(family) || bucket_of(family, name).is_some() {
            Some(kind(proto_port, 8, NFT_SET_MAP, Some((addr, len))))
        } else if name == down_set(family) {
            let key = concat(&[TYPE_INET_PROTOCOL, TYPE_INET_SERVICE, addr]);
            Some(kind(key, 8 + len, 0, None))
        } else if name == port_map(family) {
            Some(kind(
                proto_port,
                8,
                NFT_SET_MAP,
                Some((TYPE_INET_SERVICE, 2)),
            ))
        } else {
            None
        }
    })
}

fn set_problem(set: &SetInfo) -> Option<String> {
    let expected = expected_set(&set.name)?;
    let flags = set.flags & (NFT_SET_INTERVAL | NFT_SET_MAP);
    let ok = set.key_type == expected.key_type
        && set.key_len == expected.key_len
        && flags == expected.flags
        && set.data_type.zip(set.data_len) == expected.data;
    (!ok).then(|| format!("set {} is not of the type this daemon creates", set.name))
}

/// Every set and map of the table, by name.
pub fn set_names() -> Vec<&'static str> {
    let mut names = vec![WAN_IFACES];
    for family in FAMILIES {
        names.extend([
            wan_set(family),
            open_set(family),
            src_set(family),
            addr_map(family),
            port_map(family),
            down_set(family),
        ]);
        names.extend((0..BUCKETS).map(|bucket| pick_map(family, bucket)));
    }
    names
}

/// The bucket whose pick map is `name`, if it is one of `family`'s.
fn bucket_of(family: Family, name: &str) -> Option<usize> {
    (0..BUCKETS).find(|bucket| pick_map(family, *bucket) == name)
}

/// Every chain of the table, in the order they are created.
pub(super) fn chain_names(config: &TableConfig) -> Vec<&'static str> {
    let mut chains = vec![CHAIN];
    if config.reflects() {
        chains.push(REFLECT_CHAIN);
    }
    for family in FAMILIES {
        chains.extend((0..BUCKETS).map(|bucket| bucket_chain(family, bucket)));
    }
    chains
}

impl KernelTable {
    /// The uid in the owner comment of a forward's port element, if any.
    pub fn owner_uid(&self, key: &ForwardKey) -> Option<&str> {
        let comment = self.ports.get(key)?.comment.as_deref()?;
        Some(comment.rsplit_once(" uid=")?.1)
    }

    /// The backends of a forward the down set records, sorted.
    pub fn down_of(&self, key: &ForwardKey) -> Vec<IpAddr> {
        self.down
            .range((*key, UNSPECIFIED)..)
            .take_while(|(k, _)| k == key)
            .map(|(_, addr)| *addr)
            .collect()
    }

    /// Every backend of a forward the table knows: those in its choice and those it records
    /// as down, sorted.
    pub fn backends(&self, key: &ForwardKey) -> Vec<IpAddr> {
        let mut backends = self.choice(key);
        backends.extend(self.down_of(key));
        backends.sort_unstable();
        backends.dedup();
        backends
    }

    /// Where a forward's new flows go now: its address element's backend, or the backends
    /// of its buckets.
    pub fn choice(&self, key: &ForwardKey) -> Vec<IpAddr> {
        if let Some(addr) = self.addrs.get(key) {
            return vec![addr.value];
        }
        let mut choice: Vec<IpAddr> = self
            .picks
            .range((*key, 0)..=(*key, BUCKETS))
            .map(|(_, addr)| *addr)
            .collect();
        choice.sort_unstable();
        choice.dedup();
        choice
    }

    /// Every key with a forward's elements in the table.
    pub fn keys(&self) -> BTreeSet<ForwardKey> {
        self.addrs
            .keys()
            .chain(self.ports.keys())
            .copied()
            .chain(self.picks.keys().map(|(k, _)| *k))
            .collect()
    }

    /// Who holds each port, by the owner comments.
    pub fn holders(&self) -> Holders {
        self.ports
            .keys()
            .filter_map(|key| Some((*key, self.owner_uid(key)?.to_owned())))
            .collect()
    }

    /// Every owner uid in the address and port maps.
    pub fn owner_uids(&self) -> BTreeSet<String> {
        self.addrs
            .values()
            .filter_map(|e| e.comment.as_deref())
            .chain(self.ports.values().filter_map(|e| e.comment.as_deref()))
            .filter_map(|c| c.rsplit_once(" uid=").map(|(_, uid)| uid.to_owned()))
            .collect()
    }

    /// Reads a dump of the table, checking that it has the shape this daemon creates and
    /// nothing else: the sets, maps, chains, and the rules of `config` (`None`: of any
    /// configuration). It takes the dump: the owner comments of 10,000 forwards move into
    /// the table rather than being copied.
    pub fn from_dump(config: Option<&TableConfig>, dump: TableDump) -> KernelTable {
        let mut reading = Reading::default();
        let mut problems = Vec::new();
        // The hash rules' verdict maps are anonymous sets, part of their rules.
        let sets: BTreeSet<&str> = dump
            .sets
            .iter()
            .filter(|s| s.flags & NFT_SET_ANONYMOUS == 0)
            .map(|s| s.name.as_str())
            .collect();
        let expected_sets: BTreeSet<&str> = set_names().into_iter().collect();
        if sets != expected_sets {
            problems.push(format!(
                "sets and maps are {sets:?}, expected {expected_sets:?}"
            ));
        }
        problems.extend(dump.sets.iter().filter_map(set_problem));
        let mut chains = Vec::new();
        for chain in &dump.chains {
            chains.push(chain.name.clone());
            let expected = if chain.name == CHAIN {
                chain.kind.as_deref() == Some("nat")
                    && chain.hook == Some((NF_INET_PRE_ROUTING, DSTNAT_PRIORITY))
            } else if chain.name == REFLECT_CHAIN {
                chain.kind.as_deref() == Some("nat")
                    && chain.hook == Some((NF_INET_POST_ROUTING, SRCNAT_PRIORITY))
            } else {
                chain.hook.is_none()
                    && FAMILIES.into_iter().any(|family| {
                        (0..BUCKETS).any(|bucket| bucket_chain(family, bucket) == chain.name)
                    })
            };
            if !expected {
                problems.push(format!(
                    "chain {} is not one of the expected chains",
                    chain.name
                ));
            }
        }
        let rules: Vec<String> = dump
            .rules
            .iter()
            .map(|(_, comment)| comment.clone().unwrap_or_default())
            .collect();
        let (rules_ok, chains_ok) = match config {
            Some(config) => {
                let expected: Vec<String> =
                    chain_names(config).into_iter().map(str::to_owned).collect();
                (rules == config.rule_comments(), chains == expected)
            }
            None => {
                let daemons = rules.iter().all(|r| r.starts_with("kube-port-forward "));
                (
                    daemons && !rules.is_empty(),
                    chains.first().map(String::as_str) == Some(CHAIN),
                )
            }
        };
        if !chains_ok || !rules_ok {
            let expected_rules = config.map(TableConfig::rule_comments);
            problems.push(format!("rules are {rules:?}, expected {expected_rules:?}"));
        }
        for (name, elems) in dump.elements {
            // Sets not of this daemon's are reported above; their elements are not read.
            let Some(set) = Held::named(&name) else {
                continue;
            };
            if !elems.into_iter().all(|elem| reading.read_elem(set, elem)) {
                problems.push(format!("set {name} holds an element of unexpected form"));
            }
        }
        let mut table = reading.finish();
        table.shape_problem = (!problems.is_empty()).then(|| problems.join("; "));
        table
    }
}

/// A table being read. The elements of its big maps and sets wait in lists, and each tree is
/// built from its list in one go, sorted once: inserting 10,000 keys one by one, in the
/// kernel's hash order, cost three times as much.
#[derive(Default)]
struct Reading {
    table: KernelTable,
    addrs: Vec<(ForwardKey, Element<IpAddr>)>,
    ports: Vec<(ForwardKey, Element<u16>)>,
    open: Vec<ForwardKey>,
    counters: Vec<(ForwardKey, (u64, u64))>,
}

impl Reading {
    fn finish(self) -> KernelTable {
        let mut counters = self.counters;
        counters.sort_unstable_by_key(|(key, _)| *key);
        // A forward with several backends counts in each of its buckets' elements.
        counters.dedup_by(|next, sum| {
            let same = next.0 == sum.0;
            if same {
                sum.1 = (sum.1.0 + next.1.0, sum.1.1 + next.1.1);
            }
            same
        });
        KernelTable {
            addrs: self.addrs.into_iter().collect(),
            ports: self.ports.into_iter().collect(),
            open: self.open.into_iter().collect(),
            counters: counters.into_iter().collect(),
            ..self.table
        }
    }

    /// Takes one element of `set`; `false` when it is not of the set's form.
    fn read_elem(&mut self, set: Held, elem: Elem) -> bool {
        let key = |family| {
            let (protocol, external_port) = wire::read_proto_port(&elem.key)?;
            Some(ForwardKey {
                family,
                protocol,
                external_port,
            })
        };
        let data = elem.data.as_deref().unwrap_or_default();
        match set {
            Held::Interfaces => took(wire::read_ifname(&elem.key), |n| {
                self.table.wan_interfaces.insert(n)
            }),
            Held::Wan(family) => took(wire::read_addr(family, &elem.key), |a| {
                self.table.wan_addresses.insert(a)
            }),
            Held::Open(family) => key(family).map(|k| self.open.push(k)).is_some(),
            Held::Sources(family) => {
                took(source_of(family, &elem), |s| self.table.sources.insert(s))
            }
            Held::Down(family) => {
                let down = elem.key.split_at_checked(8).and_then(|(key, addr)| {
                    let (protocol, external_port) = wire::read_proto_port(key)?;
                    let key = ForwardKey {
                        family,
                        protocol,
                        external_port,
                    };
                    Some((key, wire::read_addr(family, addr)?))
                });
                took(down, |d| self.table.down.insert(d))
            }
            Held::Picks(family, bucket) => {
                let (Some(key), Some(addr)) = (key(family), wire::read_addr(family, data)) else {
                    return false;
                };
                self.count(key, &elem);
                self.table.picks.insert((key, bucket), addr);
                true
            }
            Held::Addrs(family) => {
                let (Some(key), Some(addr)) = (key(family), wire::read_addr(family, data)) else {
                    return false;
                };
                self.count(key, &elem);
                let comment = elem.comment;
                self.addrs.push((
                    key,
                    Element {
                        value: addr,
                        comment,
                    },
                ));
                true
            }
            Held::Ports(family) => {
                let (Some(key), Ok(port)) = (key(family), <[u8; 2]>::try_from(data)) else {
                    return false;
                };
                let value = u16::from_be_bytes(port);
                let comment = elem.comment;
                self.ports.push((key, Element { value, comment }));
                true
            }
        }
    }

    /// Adds an element's packet and byte counts to its forward's.
    fn count(&mut self, key: ForwardKey, elem: &Elem) {
        if let Some(counter) = elem.counter {
            self.counters.push((key, counter));
        }
    }
}

/// Which of the table's sets a dumped one is, decided once per set rather than for each of
/// its elements.
#[derive(Clone, Copy)]
enum Held {
    Interfaces,
    Wan(Family),
    Open(Family),
    Sources(Family),
    Addrs(Family),
    Ports(Family),
    Picks(Family, usize),
    Down(Family),
}

impl Held {
    fn named(name: &str) -> Option<Held> {
        if name == WAN_IFACES {
            return Some(Held::Interfaces);
        }
        FAMILIES.into_iter().find_map(|family| {
            let held = if name == wan_set(family) {
                Held::Wan(family)
            } else if name == open_set(family) {
                Held::Open(family)
            } else if name == src_set(family) {
                Held::Sources(family)
            } else if name == addr_map(family) {
                Held::Addrs(family)
            } else if name == port_map(family) {
                Held::Ports(family)
            } else if name == down_set(family) {
                Held::Down(family)
            } else {
                Held::Picks(family, bucket_of(family, name)?)
            };
            Some(held)
        })
    }
}

/// Hands a decoded value to `insert`; whether there was one.
fn took<T>(value: Option<T>, insert: impl FnOnce(T) -> bool) -> bool {
    value.map(insert).is_some()
}

/// A source set element: the range from `key` to `key_end` must be one network, with the
/// same protocol and port at both ends.
fn source_of(family: Family, elem: &Elem) -> Option<Source> {
    let len = addr_type_id(family).1 as usize;
    let end = elem.key_end.as_deref().unwrap_or(&elem.key);
    if elem.key.len() != len + 8 || end.len() != len + 8 || elem.key[len..] != end[len..] {
        return None;
    }
    let first = wire::read_addr(family, &elem.key[..len])?;
    let last = wire::read_addr(family, &end[..len])?;
    let (first_bits, last_bits, width) = match (first, last) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return None,
    };
    let host = first_bits ^ last_bits;
    // A network: the differing bits are all the low ones, and the first address has none.
    if host & host.wrapping_add(1) != 0 || first_bits & host != 0 {
        return None;
    }
    let prefix = width - (128 - host.leading_zeros()) as u8;
    let (protocol, external_port) = wire::read_proto_port(&elem.key[len..])?;
    Some(Source {
        key: ForwardKey {
            family,
            protocol,
            external_port,
        },
        net: IpNet::new(first, prefix).ok()?,
    })
}

impl Ruleset {
    /// The table this ruleset builds as a read of the kernel returns it right after the
    /// build (no packet counted yet): what a firewall in memory holds, in tests and benches.
    pub fn as_dump(&self, generation: u32) -> TableDump {
        let config = &self.config;
        let mut elements: BTreeMap<String, Vec<Elem>> = set_names()
            .into_iter()
            .map(|n| (n.to_owned(), Vec::new()))
            .collect();
        for change in self.element_changes(&self.delta(&KernelTable::default())) {
            let counted = FAMILIES.into_iter().any(|family| {
                change.set == addr_map(family) || bucket_of(family, change.set).is_some()
            });
            let elems = elements.entry(change.set.to_owned()).or_default();
            elems.extend(change.elems.into_iter().map(|elem| Elem {
                counter: counted.then_some((0, 0)),
                ..elem
            }));
        }
        let sets = set_names()
            .into_iter()
            .filter_map(|name| {
                let kind = expected_set(name)?;
                Some(SetInfo {
                    name: name.to_owned(),
                    flags: kind.flags,
                    key_type: kind.key_type,
                    key_len: kind.key_len,
                    data_type: kind.data.map(|d| d.0),
                    data_len: kind.data.map(|d| d.1),
                })
            })
            .collect();
        let chains = chain_names(config)
            .into_iter()
            .map(|name| {
                let hook = match name {
                    CHAIN => Some((NF_INET_PRE_ROUTING, DSTNAT_PRIORITY)),
                    REFLECT_CHAIN => Some((NF_INET_POST_ROUTING, SRCNAT_PRIORITY)),
                    _ => None,
                };
                ChainInfo {
                    name: name.to_owned(),
                    hook,
                    kind: hook.map(|_| "nat".to_owned()),
                }
            })
            .collect();
        let mut rules: Vec<(&str, String)> = config
            .rules()
            .into_iter()
            .map(|(f, w, side, pick)| (CHAIN, config.rule_comment(f, w, side, pick)))
            .collect();
        if config.reflects() {
            rules.push((REFLECT_CHAIN, config.reflect_comment()));
        }
        for family in FAMILIES {
            for bucket in 0..BUCKETS {
                rules.push((bucket_chain(family, bucket), bucket_comment(family, bucket)));
            }
        }
        TableDump {
            generation,
            sets,
            chains,
            rules: rules
                .into_iter()
                .map(|(chain, comment)| (chain.to_owned(), Some(comment)))
                .collect(),
            elements,
            attempts: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::Change;
    use crate::kernel::fixtures::{forward, ruleset};

    #[test]
    fn dumps_round_trip_the_batch_encoding() {
        let mut limited = forward(80, "10.0.0.1", "a");
        limited.sources = vec![
            "10.0.0.0/8".parse().unwrap(),
            "203.0.113.2/32".parse().unwrap(),
        ];
        let mut several = forward(8443, "fd00::5", "d");
        several.backends.push("fd00::6".parse().unwrap());
        several.down = vec!["fd00::6".parse().unwrap()];
        let r = ruleset(&[
            limited,
            forward(443, "fd00::5", "b"),
            forward(53, "10.0.0.2", "c"),
            several,
        ]);
        let mut dump = r.as_dump(1);
        dump.elements.get_mut("fwd_ipv4_addr").unwrap()[0].counter = Some((3, 180));
        let kernel = KernelTable::from_dump(Some(&r.config), dump.clone());
        assert_eq!(kernel.shape_problem, None);
        assert_eq!(kernel.counters.values().next(), Some(&(3, 180)));
        assert_eq!(r.diff(Some(&kernel)), Change::Nothing);

        let other = TableConfig::new(DEFAULT_TABLE, [], []).unwrap();
        let kernel = KernelTable::from_dump(Some(&other), dump.clone());
        assert!(kernel.shape_problem.unwrap().contains("rules are"));
        assert_eq!(KernelTable::from_dump(None, dump).shape_problem, None);
    }

    #[test]
    fn foreign_shapes_and_elements_are_problems() {
        let r = ruleset(&[forward(80, "10.0.0.1", "a")]);
        let mut dump = r.as_dump(1);
        dump.sets[0].key_type = TYPE_IP6ADDR;
        let problem = KernelTable::from_dump(Some(&r.config), dump.clone())
            .shape_problem
            .unwrap();
        assert!(
            problem.contains("set wan_ifaces is not of the type"),
            "{problem}"
        );

        let mut dump = r.as_dump(1);
        dump.elements.get_mut("src_ipv4").unwrap().push(Elem {
            key: [
                &[10, 0, 0, 1][..],
                &wire::proto_port(crate::core::model::Protocol::Tcp, 80),
            ]
            .concat(),
            key_end: Some(
                [
                    &[10, 0, 0, 6][..],
                    &wire::proto_port(crate::core::model::Protocol::Tcp, 80),
                ]
                .concat(),
            ),
            ..Elem::default()
        });
        let problem = KernelTable::from_dump(Some(&r.config), dump.clone())
            .shape_problem
            .unwrap();
        assert!(
            problem.contains("set src_ipv4 holds an element of unexpected form"),
            "{problem}"
        );
    }
}
