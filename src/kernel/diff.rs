//! The difference between what the table holds and what it should hold: nothing, a few
//! elements, or a rebuild of the whole table.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::layout::*;
use super::read::KernelTable;
#[cfg(test)]
use crate::core::model::BUCKETS;
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
    /// Keys of desired forwards with one backend whose address element is (re)added.
    pub add_addrs: Vec<ForwardKey>,
    /// Keys of desired forwards whose port element is (re)added.
    pub add_ports: Vec<ForwardKey>,
    pub delete_picks: Vec<PickElem>,
    /// Buckets of desired forwards with several backends to (re)add.
    pub add_picks: Vec<PickElem>,
    pub add_down: Vec<Down>,
    pub delete_down: Vec<Down>,
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
            ("address elements to add", self.add_addrs.len()),
            ("port elements to add", self.add_ports.len()),
            ("buckets to delete", self.delete_picks.len()),
            ("buckets to add", self.add_picks.len()),
            ("down backends to add", self.add_down.len()),
            ("down backends to delete", self.delete_down.len()),
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
        let first = self
            .add_ports
            .first()
            .or(self.delete_ports.first())
            .or(self.add_picks.first().map(|(k, _)| k))
            .or(self.delete_picks.first().map(|(k, _)| k));
        if let Some(key) = first {
            text.push(format!("first: {key}"));
        }
        text.join(", ")
    }

    /// The keys whose forwarding elements (address, port, buckets) this update adds.
    pub fn added_keys(&self) -> BTreeSet<ForwardKey> {
        self.add_addrs
            .iter()
            .chain(&self.add_ports)
            .copied()
            .chain(self.add_picks.iter().map(|(k, _)| *k))
            .collect()
    }

    /// The keys whose forwarding elements this update deletes.
    pub fn deleted_keys(&self) -> BTreeSet<ForwardKey> {
        self.delete_addrs
            .iter()
            .chain(&self.delete_ports)
            .copied()
            .chain(self.delete_picks.iter().map(|(k, _)| *k))
            .collect()
    }
}

/// Elements of a map whose value or comment differs, or that one side lacks: delete what
/// the current side has, add what the desired side has.
fn map_delta<K: Ord + Copy, V: PartialEq>(
    desired: &BTreeMap<K, V>,
    current: &BTreeMap<K, V>,
    delete: &mut Vec<K>,
    add: &mut Vec<K>,
) {
    for (key, value) in desired {
        match current.get(key) {
            Some(now) if now == value => {}
            Some(_) => {
                delete.push(*key);
                add.push(*key);
            }
            None => add.push(*key),
        }
    }
    delete.extend(current.keys().filter(|k| !desired.contains_key(k)));
    delete.sort_unstable();
}

fn set_delta<T: Ord + Clone>(desired: &BTreeSet<T>, current: &BTreeSet<T>) -> (Vec<T>, Vec<T>) {
    (
        desired.difference(current).cloned().collect(),
        current.difference(desired).cloned().collect(),
    )
}

impl KernelTable {
    /// Adds the elements of one forward, as this daemon writes them.
    pub(super) fn insert_forward(&mut self, forward: &Forward) {
        let key = forward.key;
        let comment = Some(owner_comment(forward));
        match forward.buckets() {
            None => {
                self.addrs.insert(
                    key,
                    Element {
                        value: forward.backends[0],
                        comment: comment.clone(),
                    },
                );
            }
            Some(buckets) => {
                for (bucket, addr) in buckets.into_iter().enumerate() {
                    self.picks.insert((key, bucket), addr);
                }
            }
        }
        self.ports.insert(
            key,
            Element {
                value: forward.port,
                comment,
            },
        );
        self.down
            .extend(forward.down.iter().map(|addr| (key, *addr)));
        self.sources.extend(sources_of(forward));
        self.open.extend(open_of(forward));
    }

    /// The update that turns `current` into this table, element by element.
    fn delta_from(&self, current: &KernelTable) -> Update {
        let mut update = Update::default();
        map_delta(
            &self.addrs,
            &current.addrs,
            &mut update.delete_addrs,
            &mut update.add_addrs,
        );
        map_delta(
            &self.ports,
            &current.ports,
            &mut update.delete_ports,
            &mut update.add_ports,
        );
        map_delta(
            &self.picks,
            &current.picks,
            &mut update.delete_picks,
            &mut update.add_picks,
        );
        (update.add_down, update.delete_down) = set_delta(&self.down, &current.down);
        (update.add_sources, update.delete_sources) = set_delta(&self.sources, &current.sources);
        (update.add_open, update.delete_open) = set_delta(&self.open, &current.open);
        (update.add_interfaces, update.delete_interfaces) =
            set_delta(&self.wan_interfaces, &current.wan_interfaces);
        (update.add_addresses, update.delete_addresses) =
            set_delta(&self.wan_addresses, &current.wan_addresses);
        update
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
        for forward in self.forwards.values() {
            table.insert_forward(forward);
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
        Change::new(self.reshaped(previous), self.delta_applied(previous))
    }

    /// Why the table applied for `previous` cannot simply have its elements changed into
    /// this ruleset, if it cannot: its structure differs.
    pub(super) fn reshaped(&self, previous: &Ruleset) -> Option<String> {
        (self.config.shape() != previous.config.shape())
            .then(|| "the table's configuration changed".to_owned())
    }

    /// The elements that differ between `current` and this ruleset, whatever its shape.
    pub fn delta(&self, current: &KernelTable) -> Update {
        self.as_kernel().delta_from(current)
    }

    /// [`Ruleset::delta`] against a ruleset known to be applied: only the forwards that
    /// differ are turned into elements, so its cost is a walk of two sorted maps.
    pub fn delta_applied(&self, previous: &Ruleset) -> Update {
        let mut old = previous.forwards.iter().peekable();
        let mut new = self.forwards.iter().peekable();
        let pairs = std::iter::from_fn(|| {
            let order = match (old.peek(), new.peek()) {
                (None, None) => return None,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((ko, _)), Some((kn, _))) => ko.cmp(kn),
            };
            Some(match order {
                Ordering::Less => (old.next().map(|e| e.1), None),
                Ordering::Greater => (None, new.next().map(|e| e.1)),
                Ordering::Equal => (old.next().map(|e| e.1), new.next().map(|e| e.1)),
            })
        });
        self.delta_between(previous, pairs)
    }

    /// [`Ruleset::delta_applied`] when no forward outside `keys` differs between
    /// `previous` and this ruleset: its cost is that of those keys alone, however many
    /// forwards either holds (this ruleset may hold only those keys' forwards).
    pub fn delta_at(&self, previous: &Ruleset, keys: &BTreeSet<ForwardKey>) -> Update {
        let pairs = keys
            .iter()
            .map(|key| (previous.forwards.get(key), self.forwards.get(key)));
        self.delta_between(previous, pairs)
    }

    /// The update from `previous` to this ruleset, given their forwards paired by key
    /// (before, after): only the pairs that differ are turned into elements.
    fn delta_between<'a>(
        &self,
        previous: &Ruleset,
        pairs: impl Iterator<Item = (Option<&'a Forward>, Option<&'a Forward>)>,
    ) -> Update {
        let mut before = KernelTable {
            wan_interfaces: previous.config.wan_interfaces.clone(),
            wan_addresses: previous.config.wan_addresses.clone(),
            ..KernelTable::default()
        };
        let mut after = KernelTable {
            wan_interfaces: self.config.wan_interfaces.clone(),
            wan_addresses: self.config.wan_addresses.clone(),
            ..KernelTable::default()
        };
        for (was, now) in pairs.filter(|(was, now)| was != now) {
            if let Some(forward) = was {
                before.insert_forward(forward);
            }
            if let Some(forward) = now {
                after.insert_forward(forward);
            }
        }
        after.delta_from(&before)
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
        changed[50].backends = vec!["10.0.0.2".parse().unwrap()];
        changed.remove(10);
        changed.push(forward(2000, "10.0.0.3", "c"));
        let after = ruleset(&changed);
        let expected = Update {
            delete_addrs: vec![many[10].key, many[50].key],
            delete_ports: vec![many[10].key],
            add_addrs: vec![many[50].key, changed.last().unwrap().key],
            add_ports: vec![changed.last().unwrap().key],
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
        assert!(update.delete_addrs.is_empty());
        assert!(update.delete_ports.is_empty());
        assert_eq!(update.add_ports, vec![key]);
        assert!(update.add_addrs.is_empty());
    }

    #[test]
    fn several_backends_fill_buckets_and_a_down_one_changes_only_its_own() {
        let mut f = forward(80, "10.0.0.1", "a");
        f.backends = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .map(|a| a.parse().unwrap())
            .to_vec();
        let before = ruleset(std::slice::from_ref(&f));
        let kernel = before.as_kernel();
        assert!(
            kernel.addrs.is_empty(),
            "no address element: the hash rule takes it"
        );
        assert_eq!(kernel.picks.len(), BUCKETS);
        assert_eq!(kernel.choice(&f.key), f.backends);
        f.down = vec!["10.0.0.2".parse().unwrap()];
        let after = ruleset(std::slice::from_ref(&f));
        let Change::Update(update) = after.diff_applied(&before) else {
            panic!("expected an update")
        };
        assert_eq!(update.delete_picks.len(), BUCKETS / 3);
        assert_eq!(update.add_picks, update.delete_picks);
        assert_eq!(update.add_down, vec![(f.key, f.down[0])]);
        assert!(update.add_ports.is_empty() && update.delete_ports.is_empty());
        assert_eq!(
            after.diff(Some(&before.as_kernel())),
            Change::Update(update)
        );
        // From several backends to one: the buckets go, the address element comes.
        f.backends.truncate(1);
        f.down.clear();
        let single = ruleset(std::slice::from_ref(&f));
        let Change::Update(update) = single.diff_applied(&after) else {
            panic!("expected an update")
        };
        assert_eq!(update.delete_picks.len(), BUCKETS);
        assert_eq!(update.add_addrs, vec![f.key]);
        assert_eq!(update.delete_down.len(), 1);
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
