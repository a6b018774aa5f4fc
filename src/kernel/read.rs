//! What the kernel holds: the table read back from `nft -j list`, checked against the shape
//! this daemon builds, and the kernel's echo of a transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use nftables::expr::{Expression, NamedExpression};
use nftables::schema::{NfListObject, NfObject, Nftables};
use nftables::stmt::Counter;
use nftables::types::{NfChainType, NfHook};

use super::layout::*;
use crate::core::model::{Family, ForwardKey, Protocol};
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
    pub sources: BTreeSet<Source>,
    pub open: BTreeSet<ForwardKey>,
    /// Packets counted per forward (address map counters).
    pub counters: BTreeMap<ForwardKey, (u64, u64)>,
}

/// The keys deleted from the address maps, as `nft --echo` reports a transaction: the
/// kernel's own account of what it committed.
pub fn echoed_deletions(echo: &str) -> BTreeSet<ForwardKey> {
    let mut keys = BTreeSet::new();
    let Ok(value) = serde_json::from_str::<serde_json::Value>(echo) else {
        return keys;
    };
    for object in value["nftables"].as_array().into_iter().flatten() {
        let element = &object["delete"]["element"];
        let Some(family) = FAMILIES
            .into_iter()
            .find(|f| element["name"].as_str() == Some(addr_map(*f)))
        else {
            continue;
        };
        for item in element["elem"].as_array().into_iter().flatten() {
            let parts = &item["concat"];
            let protocol = parts[0].as_str().and_then(Protocol::from_nft_name);
            let port = parts[1].as_u64().and_then(|p| u16::try_from(p).ok());
            if let (Some(protocol), Some(external_port)) = (protocol, port) {
                keys.insert(ForwardKey {
                    family,
                    protocol,
                    external_port,
                });
            }
        }
    }
    keys
}

impl KernelTable {
    /// The uid in the owner comment of a forward's address element, if any.
    pub fn owner_uid(&self, key: &ForwardKey) -> Option<&str> {
        let comment = self.addrs.get(key)?.comment.as_deref()?;
        Some(comment.rsplit_once(" uid=")?.1)
    }

    /// Who holds each port, by the owner comments.
    pub fn holders(&self) -> Holders {
        self.addrs
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

    /// Reads the output of `nft -j list table inet NAME`, checking that the table has the
    /// shape this daemon creates and nothing else: the sets, maps, chain, and the rules of
    /// `config` (`None`: of any configuration).
    pub fn from_nftables(config: Option<&TableConfig>, listing: &Nftables) -> KernelTable {
        let mut table = KernelTable::default();
        let mut problems = Vec::new();
        let mut sets = BTreeSet::new();
        let mut rules = Vec::new();
        let mut chains = Vec::new();
        for object in listing.objects.iter() {
            let NfObject::ListObject(object) = object else {
                continue;
            };
            match object {
                NfListObject::Set(set) => {
                    sets.insert(set.name.to_string());
                    table.read_set(
                        &set.name,
                        set.elem.as_deref().unwrap_or_default(),
                        &mut problems,
                    );
                }
                NfListObject::Map(map) => {
                    sets.insert(map.name.to_string());
                    table.read_map(
                        &map.name,
                        map.elem.as_deref().unwrap_or_default(),
                        &mut problems,
                    );
                }
                NfListObject::Chain(chain) => {
                    chains.push(chain.name.to_string());
                    let expected = chain._type == Some(NfChainType::NAT)
                        && if chain.name == CHAIN {
                            chain.hook == Some(NfHook::Prerouting)
                                && chain.prio == Some(DSTNAT_PRIORITY)
                        } else {
                            chain.name == REFLECT_CHAIN
                                && chain.hook == Some(NfHook::Postrouting)
                                && chain.prio == Some(SRCNAT_PRIORITY)
                        };
                    if !expected {
                        problems.push(format!(
                            "chain {} is not one of the expected NAT chains",
                            chain.name
                        ));
                    }
                }
                NfListObject::Rule(rule) => {
                    rules.push(rule.comment.as_deref().unwrap_or_default().to_owned());
                }
                NfListObject::Table(_) | NfListObject::MetainfoObject(_) => {}
                _ => problems.push("the table holds objects this daemon does not create".into()),
            }
        }
        let mut expected_sets: BTreeSet<String> = BTreeSet::from([WAN_IFACES.to_owned()]);
        for family in FAMILIES {
            for name in [
                wan_set(family),
                open_set(family),
                src_set(family),
                addr_map(family),
                port_map(family),
            ] {
                expected_sets.insert(name.to_owned());
            }
        }
        if sets != expected_sets {
            problems.push(format!(
                "sets and maps are {sets:?}, expected {expected_sets:?}"
            ));
        }
        let (rules_ok, chains_ok) = match config {
            Some(config) => {
                let mut expected = vec![CHAIN.to_owned()];
                if config.reflects() {
                    expected.push(REFLECT_CHAIN.to_owned());
                }
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
        table.shape_problem = (!problems.is_empty()).then(|| problems.join("; "));
        table
    }

    pub(super) fn read_set(
        &mut self,
        name: &str,
        elems: &[Expression<'_>],
        problems: &mut Vec<String>,
    ) {
        if let Some(family) = FAMILIES.into_iter().find(|f| name == open_set(*f)) {
            for item in elems {
                match key_item(family, item) {
                    Some(key) => {
                        self.open.insert(key);
                    }
                    None => {
                        problems.push(format!("set {name} holds an element of unexpected form"))
                    }
                }
            }
            return;
        }
        if let Some(family) = FAMILIES.into_iter().find(|f| name == src_set(*f)) {
            for item in elems {
                match source_item(family, item) {
                    Some(source) => {
                        self.sources.insert(source);
                    }
                    None => {
                        problems.push(format!("set {name} holds an element of unexpected form"))
                    }
                }
            }
            return;
        }
        for item in elems {
            let Some(text) = plain_string(item) else {
                problems.push(format!("set {name} holds an element of unexpected form"));
                continue;
            };
            if name == WAN_IFACES {
                self.wan_interfaces.insert(text.to_owned());
            } else {
                match text.parse::<IpAddr>() {
                    Ok(addr) => {
                        self.wan_addresses.insert(addr);
                    }
                    Err(_) => problems.push(format!("set {name} holds \"{text}\"")),
                }
            }
        }
    }

    pub(super) fn read_map(
        &mut self,
        name: &str,
        elems: &[Expression<'_>],
        problems: &mut Vec<String>,
    ) {
        let Some((family, is_addr)) = FAMILIES.iter().find_map(|f| {
            if name == addr_map(*f) {
                Some((*f, true))
            } else if name == port_map(*f) {
                Some((*f, false))
            } else {
                None
            }
        }) else {
            return;
        };
        for item in elems {
            let Some((key, comment, counter, value)) = map_item(family, item) else {
                problems.push(format!("map {name} holds an element of unexpected form"));
                continue;
            };
            if is_addr {
                match value.as_str().and_then(|v| v.parse::<IpAddr>().ok()) {
                    Some(addr) if Family::of(addr) == family => {
                        self.addrs.insert(
                            key,
                            Element {
                                value: addr,
                                comment,
                            },
                        );
                        if let Some(counter) = counter {
                            self.counters.insert(key, counter);
                        }
                    }
                    _ => problems.push(format!("map {name} holds a value that is not an address")),
                }
            } else {
                match value.as_u64().and_then(|v| u16::try_from(v).ok()) {
                    Some(port) => {
                        self.ports.insert(
                            key,
                            Element {
                                value: port,
                                comment,
                            },
                        );
                    }
                    None => problems.push(format!("map {name} holds a value that is not a port")),
                }
            }
        }
    }
}

/// `["tcp", 80]` as `nft -j` lists an open set element or a map key.
pub(super) fn key_item(family: Family, item: &Expression<'_>) -> Option<ForwardKey> {
    let Expression::Named(NamedExpression::Concat(parts)) = item else {
        return None;
    };
    let [Expression::String(protocol), Expression::Number(port)] = parts.as_slice() else {
        return None;
    };
    forward_key(family, protocol, *port)
}

/// A key from the protocol name and port number nft lists.
pub(super) fn forward_key(family: Family, protocol: &str, port: u32) -> Option<ForwardKey> {
    Some(ForwardKey {
        family,
        protocol: Protocol::from_nft_name(protocol)?,
        external_port: u16::try_from(port).ok()?,
    })
}

/// `[prefix or address, "tcp", 80]` as `nft -j` lists a source set element (a /32 or /128
/// comes back as a plain address).
pub(super) fn source_item(family: Family, item: &Expression<'_>) -> Option<Source> {
    let item = match item {
        Expression::Named(NamedExpression::Elem(elem)) => &*elem.val,
        other => other,
    };
    let Expression::Named(NamedExpression::Concat(parts)) = item else {
        return None;
    };
    let [addr, Expression::String(protocol), Expression::Number(port)] = parts.as_slice() else {
        return None;
    };
    let net: IpNet = match addr {
        Expression::String(text) => IpNet::from(text.parse::<IpAddr>().ok()?),
        Expression::Named(NamedExpression::Prefix(prefix)) => {
            let Expression::String(text) = &*prefix.addr else {
                return None;
            };
            IpNet::new(text.parse().ok()?, u8::try_from(prefix.len).ok()?).ok()?
        }
        _ => return None,
    };
    (Family::of(net.addr()) == family).then_some(())?;
    Some(Source {
        key: forward_key(family, protocol, *port)?,
        net,
    })
}

pub(super) fn plain_string<'e>(item: &'e Expression<'_>) -> Option<&'e str> {
    match item {
        Expression::String(text) => Some(text),
        Expression::Named(NamedExpression::Elem(elem)) => plain_string(&elem.val),
        _ => None,
    }
}

/// A map element value as JSON, whatever form the crate parsed it into.
pub(super) enum Value {
    Text(String),
    Number(u64),
}

impl Value {
    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(text) => Some(text),
            Value::Number(_) => None,
        }
    }

    pub(super) fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(n) => Some(*n),
            Value::Text(text) => text.parse().ok(),
        }
    }
}

type MapItem = (ForwardKey, Option<String>, Option<(u64, u64)>, Value);

/// `[{"elem": {"val": {"concat": ["tcp", 80]}, "comment": ..., "counter": ...}}, value]`
pub(super) fn map_item(family: Family, item: &Expression<'_>) -> Option<MapItem> {
    let Expression::List(pair) = item else {
        return None;
    };
    let [key, value] = pair.as_slice() else {
        return None;
    };
    let (val, comment, counter) = match key {
        Expression::Named(NamedExpression::Elem(elem)) => {
            let counter = match &elem.counter {
                Some(Counter::Anonymous(Some(c))) => Some((
                    c.packets.unwrap_or_default() as u64,
                    c.bytes.unwrap_or_default() as u64,
                )),
                _ => None,
            };
            (
                &*elem.val,
                elem.comment.as_deref().map(str::to_owned),
                counter,
            )
        }
        other => (other, None, None),
    };
    let key = key_item(family, val)?;
    let value = match value {
        Expression::String(text) => Value::Text(text.to_string()),
        Expression::Number(n) => Value::Number(u64::from(*n)),
        _ => return None,
    };
    Some((key, comment, counter, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::Change;
    use crate::kernel::fixtures::{forward, ruleset};

    #[test]
    fn kernel_listing_round_trips() {
        let r = ruleset(&[forward(80, "10.0.0.1", "a"), forward(443, "fd00::5", "b")]);
        // What `nft -j list table` prints for that table, trimmed to what is read.
        let listing = serde_json::json!({"nftables": [
            {"metainfo": {"version": "1.0.6", "release_name": "x", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": DEFAULT_TABLE, "handle": 1}},
            {"set": {"family": "inet", "name": "wan_ifaces", "table": DEFAULT_TABLE, "type": "ifname", "handle": 2, "elem": ["wan"]}},
            {"set": {"family": "inet", "name": "wan_ipv4", "table": DEFAULT_TABLE, "type": "ipv4_addr", "handle": 3, "elem": ["203.0.113.1"]}},
            {"set": {"family": "inet", "name": "wan_ipv6", "table": DEFAULT_TABLE, "type": "ipv6_addr", "handle": 4}},
            {"set": {"family": "inet", "name": "open_ipv4", "table": DEFAULT_TABLE, "type": ["inet_proto", "inet_service"], "handle": 12,
                "elem": [{"concat": ["tcp", 80]}]}},
            {"set": {"family": "inet", "name": "src_ipv4", "table": DEFAULT_TABLE, "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 13, "flags": ["interval"]}},
            {"set": {"family": "inet", "name": "open_ipv6", "table": DEFAULT_TABLE, "type": ["inet_proto", "inet_service"], "handle": 14,
                "elem": [{"concat": ["tcp", 443]}]}},
            {"set": {"family": "inet", "name": "src_ipv6", "table": DEFAULT_TABLE, "type": ["ipv6_addr", "inet_proto", "inet_service"], "handle": 15, "flags": ["interval"]}},
            {"map": {"family": "inet", "name": "fwd_ipv4_addr", "table": DEFAULT_TABLE, "type": ["inet_proto", "inet_service"], "handle": 5, "map": "ipv4_addr",
                "elem": [[{"elem": {"val": {"concat": ["tcp", 80]}, "comment": "ns/a:http uid=0000-1111", "counter": {"packets": 3, "bytes": 180}}}, "10.0.0.1"]],
                "stmt": [{"counter": null}]}},
            {"map": {"family": "inet", "name": "fwd_ipv4_port", "table": DEFAULT_TABLE, "type": ["inet_proto", "inet_service"], "handle": 6, "map": "inet_service",
                "elem": [[{"elem": {"val": {"concat": ["tcp", 80]}, "comment": "ns/a:http uid=0000-1111"}}, 8080]]}},
            {"map": {"family": "inet", "name": "fwd_ipv6_addr", "table": DEFAULT_TABLE, "type": ["inet_proto", "inet_service"], "handle": 7, "map": "ipv6_addr",
                "elem": [[{"elem": {"val": {"concat": ["tcp", 443]}, "comment": "ns/b:http uid=0000-1111"}}, "fd00::5"]]}},
            {"map": {"family": "inet", "name": "fwd_ipv6_port", "table": DEFAULT_TABLE, "type": ["inet_proto", "inet_service"], "handle": 8, "map": "inet_service",
                "elem": [[{"elem": {"val": {"concat": ["tcp", 443]}, "comment": "ns/b:http uid=0000-1111"}}, 8080]]}},
            {"chain": {"family": "inet", "table": DEFAULT_TABLE, "name": "prerouting", "handle": 9, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
            {"rule": {"family": "inet", "table": DEFAULT_TABLE, "chain": "prerouting", "handle": 10, "comment": "kube-port-forward ipv4 open iif=wan daddr=set mark=0x00200000", "expr": []}},
            {"rule": {"family": "inet", "table": DEFAULT_TABLE, "chain": "prerouting", "handle": 16, "comment": "kube-port-forward ipv4 ranges iif=wan daddr=set mark=0x00200000", "expr": []}},
            {"rule": {"family": "inet", "table": DEFAULT_TABLE, "chain": "prerouting", "handle": 11, "comment": "kube-port-forward ipv6 open iif=wan daddr=set mark=0x00200000", "expr": []}},
            {"rule": {"family": "inet", "table": DEFAULT_TABLE, "chain": "prerouting", "handle": 17, "comment": "kube-port-forward ipv6 ranges iif=wan daddr=set mark=0x00200000", "expr": []}}
        ]});
        let listing: Nftables = serde_json::from_value(listing).unwrap();
        let kernel = KernelTable::from_nftables(Some(&r.config), &listing);
        assert_eq!(kernel.shape_problem, None);
        assert_eq!(kernel.counters.values().next(), Some(&(3, 180)));
        assert_eq!(r.diff(Some(&kernel)), Change::Nothing);

        let other = TableConfig::new(DEFAULT_TABLE, [], []).unwrap();
        let kernel = KernelTable::from_nftables(Some(&other), &listing);
        assert!(kernel.shape_problem.unwrap().contains("rules are"));
        assert_eq!(
            KernelTable::from_nftables(None, &listing).shape_problem,
            None
        );
    }

    #[test]
    fn echoed_deletions_are_read_from_address_maps_only() {
        let echo = r#"{"nftables": [
            {"delete": {"element": {"family": "inet", "table": "t", "name": "fwd_ipv4_addr",
                "elem": [{"concat": ["tcp", 80]}, {"concat": ["udp", 53]}]}}},
            {"delete": {"element": {"family": "inet", "table": "t", "name": "fwd_ipv4_port",
                "elem": [{"concat": ["tcp", 81]}]}}},
            {"delete": {"element": {"family": "inet", "table": "t", "name": "fwd_ipv6_addr",
                "elem": [{"concat": ["tcp", 443]}]}}},
            {"add": {"element": {"family": "inet", "table": "t", "name": "fwd_ipv4_addr",
                "elem": [[{"concat": ["tcp", 8080]}, "10.0.0.1"]]}}}
        ]}"#;
        let keys = echoed_deletions(echo);
        let key = |family, protocol, external_port| ForwardKey {
            family,
            protocol,
            external_port,
        };
        assert_eq!(
            keys,
            BTreeSet::from([
                key(Family::Ipv4, Protocol::Tcp, 80),
                key(Family::Ipv4, Protocol::Udp, 53),
                key(Family::Ipv6, Protocol::Tcp, 443),
            ])
        );
        assert!(echoed_deletions("").is_empty());
    }
}
