//! The difference between what the table holds and what it should hold: nothing, a few
//! elements, or a rebuild of the whole table.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::layout::*;
use super::read::KernelTable;
use crate::core::model::{Forward, ForwardKey};

/// What the next transaction must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The kernel already holds the desired table.
    Nothing,
    /// Replace the whole table in one transaction, for this reason.
    Rebuild(String),
    /// Change only what differs.
    Update(Box<Update>),
}

/// Elements to delete and add, all in one transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub delete_addrs: Vec<ForwardKey>,
    pub delete_ports: Vec<ForwardKey>,
    /// Keys of the desired forwards to (re)add to both maps.
    pub add: Vec<ForwardKey>,
    pub add_interfaces: Vec<String>,
    pub delete_interfaces: Vec<String>,
    pub add_addresses: Vec<IpAddr>,
    pub delete_addresses: Vec<IpAddr>,
    pub add_sources: Vec<Source>,
    pub delete_sources: Vec<Source>,
    pub add_open: Vec<ForwardKey>,
    pub delete_open: Vec<ForwardKey>,
}

impl Change {
    pub(super) fn new(shape_problem: Option<String>, delta: Update) -> Change {
        match shape_problem {
            Some(problem) => Change::Rebuild(problem),
            None if delta.is_empty() => Change::Nothing,
            None => Change::Update(Box::new(delta)),
        }
    }
}

impl Update {
    pub fn is_empty(&self) -> bool {
        *self == Update::default()
    }

    /// What differs, in a line: how many elements of each kind, and the first key.
    pub fn summary(&self) -> String {
        let parts = [
            ("address elements to delete", self.delete_addrs.len()),
            ("port elements to delete", self.delete_ports.len()),
            ("forwards to add", self.add.len()),
            ("interfaces to add", self.add_interfaces.len()),
            ("interfaces to delete", self.delete_interfaces.len()),
            ("addresses to add", self.add_addresses.len()),
            ("addresses to delete", self.delete_addresses.len()),
            ("source ranges to add", self.add_sources.len()),
            ("source ranges to delete", self.delete_sources.len()),
            ("open keys to add", self.add_open.len()),
            ("open keys to delete", self.delete_open.len()),
        ];
        let mut text: Vec<String> = parts
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(what, n)| format!("{n} {what}"))
            .collect();
        if let Some(key) = self.add.first().or(self.delete_addrs.first()) {
            text.push(format!("first: {key}"));
        }
        text.join(", ")
    }

    pub(super) fn remove_forward(&mut self, forward: &Forward) {
        self.delete_addrs.push(forward.key);
        self.delete_ports.push(forward.key);
        self.delete_sources.extend(sources_of(forward));
        self.delete_open.extend(open_of(forward));
    }

    pub(super) fn add_forward(&mut self, forward: &Forward) {
        self.add.push(forward.key);
        self.add_sources.extend(sources_of(forward));
        self.add_open.extend(open_of(forward));
    }

    pub(super) fn set_wan(
        &mut self,
        config: &TableConfig,
        interfaces: &BTreeSet<String>,
        addresses: &BTreeSet<IpAddr>,
    ) {
        self.add_interfaces = config
            .wan_interfaces
            .difference(interfaces)
            .cloned()
            .collect();
        self.delete_interfaces = interfaces
            .difference(&config.wan_interfaces)
            .cloned()
            .collect();
        self.add_addresses = config
            .wan_addresses
            .difference(addresses)
            .copied()
            .collect();
        self.delete_addresses = addresses
            .difference(&config.wan_addresses)
            .copied()
            .collect();
    }
}

impl Ruleset {
    pub fn new(config: TableConfig, forwards: BTreeMap<ForwardKey, Forward>) -> Ruleset {
        Ruleset { config, forwards }
    }

    /// The kernel table this ruleset is, once applied.
    pub fn as_kernel(&self) -> KernelTable {
        let mut table = KernelTable {
            wan_interfaces: self.config.wan_interfaces.clone(),
            wan_addresses: self.config.wan_addresses.clone(),
            ..KernelTable::default()
        };
        for (key, forward) in &self.forwards {
            let comment = Some(owner_comment(forward));
            table.addrs.insert(
                *key,
                Element {
                    value: forward.target.addr,
                    comment: comment.clone(),
                },
            );
            table.ports.insert(
                *key,
                Element {
                    value: forward.target.port,
                    comment,
                },
            );
            table.sources.extend(sources_of(forward));
            table.open.extend(open_of(forward));
        }
        table
    }

    /// What it takes to turn `current` (`None`: no table) into this ruleset.
    pub fn diff(&self, current: Option<&KernelTable>) -> Change {
        let problem = match current {
            None => Some(format!("table inet {} is missing", self.config.table)),
            Some(table) => table.shape_problem.clone(),
        };
        let empty = KernelTable::default();
        Change::new(problem, self.delta(current.unwrap_or(&empty)))
    }

    /// What it takes to go from `previous`, applied before, to this ruleset.
    pub fn diff_applied(&self, previous: &Ruleset) -> Change {
        let problem = (self.config.shape() != previous.config.shape())
            .then(|| "the table's configuration changed".to_owned());
        Change::new(problem, self.delta_applied(previous))
    }

    /// The elements that differ between `current` and this ruleset, whatever its shape.
    pub fn delta(&self, current: &KernelTable) -> Update {
        let mut update = Update::default();
        for (key, forward) in &self.forwards {
            let comment = Some(owner_comment(forward));
            let addr = current.addrs.get(key);
            let port = current.ports.get(key);
            let addr_same =
                addr.is_some_and(|a| a.value == forward.target.addr && a.comment == comment);
            let port_same =
                port.is_some_and(|p| p.value == forward.target.port && p.comment == comment);
            if addr_same && port_same {
                continue;
            }
            if addr.is_some() {
                update.delete_addrs.push(*key);
            }
            if port.is_some() {
                update.delete_ports.push(*key);
            }
            update.add.push(*key);
        }
        let stale = |key: &&ForwardKey| !self.forwards.contains_key(key);
        update
            .delete_addrs
            .extend(current.addrs.keys().filter(stale));
        update
            .delete_ports
            .extend(current.ports.keys().filter(stale));
        update.delete_addrs.sort_unstable();
        update.delete_ports.sort_unstable();
        let desired: BTreeSet<Source> = self.forwards.values().flat_map(sources_of).collect();
        update.add_sources = desired.difference(&current.sources).copied().collect();
        update.delete_sources = current.sources.difference(&desired).copied().collect();
        let open: BTreeSet<ForwardKey> = self.forwards.values().filter_map(open_of).collect();
        update.add_open = open.difference(&current.open).copied().collect();
        update.delete_open = current.open.difference(&open).copied().collect();
        update.set_wan(
            &self.config,
            &current.wan_interfaces,
            &current.wan_addresses,
        );
        update
    }

    /// [`Ruleset::delta`] against a ruleset known to be applied: compares forwards directly,
    /// with no element built, so its cost is a walk of two sorted maps.
    pub fn delta_applied(&self, previous: &Ruleset) -> Update {
        let mut update = Update::default();
        let mut old = previous.forwards.iter().peekable();
        let mut new = self.forwards.iter().peekable();
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some((_, fo)), None) => {
                    update.remove_forward(fo);
                    old.next();
                }
                (None, Some((_, fnew))) => {
                    update.add_forward(fnew);
                    new.next();
                }
                (Some((ko, fo)), Some((kn, fnew))) => {
                    if ko < kn {
                        update.remove_forward(fo);
                        old.next();
                    } else if kn < ko {
                        update.add_forward(fnew);
                        new.next();
                    } else {
                        if fo != fnew {
                            update.delete_addrs.push(**ko);
                            update.delete_ports.push(**ko);
                            update.add.push(**kn);
                            let (before, after) = (sources_of(fo), sources_of(fnew));
                            let gone = before.iter().filter(|s| !after.contains(s));
                            update.delete_sources.extend(gone);
                            let new_sources = after.iter().filter(|s| !before.contains(s));
                            update.add_sources.extend(new_sources);
                            if open_of(fo) != open_of(fnew) {
                                update.delete_open.extend(open_of(fo));
                                update.add_open.extend(open_of(fnew));
                            }
                        }
                        old.next();
                        new.next();
                    }
                }
            }
        }
        update.set_wan(
            &self.config,
            &previous.config.wan_interfaces,
            &previous.config.wan_addresses,
        );
        update
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::fixtures::{forward, ruleset};

    #[test]
    fn missing_table_and_shape_problems_rebuild() {
        let r = ruleset(&[forward(80, "10.0.0.1", "a")]);
        assert!(matches!(r.diff(None), Change::Rebuild(_)));
        let broken = KernelTable {
            shape_problem: Some("chain flushed".into()),
            ..r.as_kernel()
        };
        assert_eq!(
            r.diff(Some(&broken)),
            Change::Rebuild("chain flushed".into())
        );
    }

    #[test]
    fn same_table_is_nothing() {
        let r = ruleset(&[forward(80, "10.0.0.1", "a"), forward(81, "fd00::1", "b")]);
        assert_eq!(r.diff(Some(&r.as_kernel())), Change::Nothing);
        assert_eq!(r.diff_applied(&r), Change::Nothing);
        assert_eq!(r.transaction(&Change::Nothing), None);
    }

    #[test]
    fn one_change_touches_one_key() {
        let many: Vec<Forward> = (1000..1100).map(|p| forward(p, "10.0.0.1", "a")).collect();
        let before = ruleset(&many);
        let mut changed = many.clone();
        changed[50].target.addr = "10.0.0.2".parse().unwrap();
        changed.remove(10);
        changed.push(forward(2000, "10.0.0.3", "c"));
        let after = ruleset(&changed);
        let expected = Update {
            delete_addrs: vec![many[10].key, many[50].key],
            delete_ports: vec![many[10].key, many[50].key],
            add: vec![many[50].key, changed.last().unwrap().key],
            add_open: vec![changed.last().unwrap().key],
            delete_open: vec![many[10].key],
            ..Update::default()
        };
        assert_eq!(
            after.diff(Some(&before.as_kernel())),
            Change::Update(Box::new(expected.clone()))
        );
        assert_eq!(
            after.diff_applied(&before),
            Change::Update(Box::new(expected))
        );
    }

    #[test]
    fn owner_change_with_same_target_is_a_change() {
        let before = ruleset(&[forward(80, "10.0.0.1", "a")]);
        let after = ruleset(&[forward(80, "10.0.0.1", "b")]);
        assert!(matches!(
            after.diff(Some(&before.as_kernel())),
            Change::Update(_)
        ));
        assert!(matches!(after.diff_applied(&before), Change::Update(_)));
    }

    #[test]
    fn half_present_elements_are_replaced() {
        let r = ruleset(&[forward(80, "10.0.0.1", "a")]);
        let mut kernel = r.as_kernel();
        let key = *kernel.ports.keys().next().unwrap();
        kernel.ports.clear();
        let Change::Update(update) = r.diff(Some(&kernel)) else {
            panic!("expected an update")
        };
        assert_eq!(update.delete_addrs, vec![key]);
        assert!(update.delete_ports.is_empty());
        assert_eq!(update.add, vec![key]);
    }

    #[test]
    fn wan_set_changes_are_elements_not_rebuilds() {
        let before = ruleset(&[]);
        let mut after = before.clone();
        after
            .config
            .wan_addresses
            .insert("203.0.113.9".parse().unwrap());
        let Change::Update(update) = after.diff_applied(&before) else {
            panic!("expected an update")
        };
        assert_eq!(
            update.add_addresses,
            vec!["203.0.113.9".parse::<IpAddr>().unwrap()]
        );
        let mut other_shape = before.clone();
        other_shape.config.wan_interfaces.clear();
        assert!(matches!(
            other_shape.diff_applied(&before),
            Change::Rebuild(_)
        ));
    }
}
