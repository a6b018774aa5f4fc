//! The engine's delta path against its whole apply: [`Engine::apply_changed`] must answer,
//! send and remember exactly what [`Engine::apply`] of the whole ruleset does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use proptest::prelude::*;

use super::fixtures::{Call, Fake, forward, ruleset};
use super::{Applied, Change, Engine, KernelError, KernelTable, Ruleset, TableConfig};
use crate::core::model::{Family, Forward, ForwardKey, Probe, Protocol};

/// Two engines on two identical firewalls: one applies whole rulesets, the other the keys
/// that changed since its last successful apply.
struct Pair {
    whole: Engine<Fake>,
    delta: Engine<Fake>,
    changed: BTreeSet<ForwardKey>,
}

impl Pair {
    fn holding(r: &Ruleset) -> Pair {
        Pair {
            whole: Engine::new(Fake::holding(r)),
            delta: Engine::new(Fake::holding(r)),
            changed: BTreeSet::new(),
        }
    }

    fn fakes(&mut self) -> [&mut Fake; 2] {
        [self.whole.firewall(), self.delta.firewall()]
    }

    fn forget_calls(&mut self) {
        for fake in self.fakes() {
            fake.calls.clear();
        }
    }

    /// Applies `desired` both ways; panics unless both agree in every respect.
    fn apply(&mut self, desired: &Ruleset) -> Result<Applied, String> {
        for fake in self.fakes() {
            fake.rebuilds_to = Some(desired.as_dump(1));
        }
        let unchanged = self
            .delta
            .unchanged(&desired.config, &desired.forwards, &self.changed);
        assert_eq!(unchanged, self.delta.applied() == Some(desired));
        let whole = self.whole.apply(desired.clone()).map_err(text);
        let delta = self
            .delta
            .apply_changed(&desired.config, &desired.forwards, &self.changed)
            .map_err(text);
        assert_eq!(whole, delta);
        if delta.is_ok() {
            self.changed.clear();
        }
        assert_eq!(self.whole.applied(), self.delta.applied());
        assert_eq!(self.whole.holders(), self.delta.holders());
        let [w, d] = self.fakes();
        assert_eq!(w.calls, d.calls);
        assert_eq!(w.table, d.table);
        assert_eq!(w.generation, d.generation);
        if whole.is_ok() {
            let table = w.table.as_ref().expect("an applied table");
            let read = KernelTable::from_dump(Some(&desired.config), table.clone());
            assert_eq!(desired.diff(Some(&read)), Change::Nothing);
            assert_eq!(self.whole.applied(), Some(desired));
        }
        whole
    }
}

fn text(error: KernelError) -> String {
    error.to_string()
}

fn many(n: u16) -> Vec<Forward> {
    (0..n)
        .map(|i| forward(1000 + i, &format!("10.0.{}.{}", i / 200, i % 200 + 1), "a"))
        .collect()
}

#[test]
fn one_changed_forward_sends_only_its_elements() {
    let forwards = many(200);
    let mut pair = Pair::holding(&ruleset(&forwards));
    let mut desired = ruleset(&forwards);
    pair.apply(&desired).unwrap();
    let key = forwards[100].key;
    desired.forwards.get_mut(&key).unwrap().backends = vec!["10.9.9.9".parse().unwrap()];
    pair.changed.insert(key);
    pair.forget_calls();
    let applied = pair.apply(&desired).unwrap();
    assert_eq!(applied.added, vec![desired.forwards[&key].clone()]);
    let calls = &pair.delta.firewall().calls;
    let [Call::Commit(changes, Some(_)), Call::Close(closing, _)] = &calls[..] else {
        panic!("one guarded batch, then the flows of the old backend: {calls:?}")
    };
    assert_eq!(
        changes.len(),
        2,
        "the address element out and in: {changes:?}"
    );
    assert_eq!(
        closing,
        &[(key, Some("10.0.0.101".parse::<IpAddr>().unwrap()))]
    );
}

#[test]
fn nothing_changed_asks_only_the_generation() {
    let desired = ruleset(&many(20));
    let mut pair = Pair::holding(&desired);
    pair.apply(&desired).unwrap();
    pair.forget_calls();
    assert_eq!(pair.apply(&desired), Ok(Applied::default()));
    assert_eq!(pair.delta.firewall().calls, [Call::Generation]);
}

#[test]
fn a_change_from_outside_is_read_and_undone() {
    let desired = ruleset(&many(20));
    let mut pair = Pair::holding(&desired);
    pair.apply(&desired).unwrap();
    for fake in pair.fakes() {
        fake.outside(|table| {
            let table = table.as_mut().unwrap();
            table.elements.get_mut("fwd_ipv4_port").unwrap().pop();
        });
    }
    let applied = pair.apply(&desired).unwrap();
    assert!(applied.sent && applied.removed.is_empty());
    assert_eq!(
        applied.added.len(),
        1,
        "the forward whose port element went"
    );
    assert!(pair.delta.firewall().calls.contains(&Call::Read));
}

#[test]
fn another_configuration_is_applied_whole() {
    let forwards = many(20);
    let mut desired = ruleset(&forwards);
    let mut pair = Pair::holding(&desired);
    pair.apply(&desired).unwrap();
    desired.config.wan_interfaces.clear();
    pair.forget_calls();
    let applied = pair.apply(&desired).unwrap();
    assert!(applied.rebuilt.is_some());
    let calls = &pair.delta.firewall().calls;
    assert!(
        matches!(calls[..], [Call::Generation, Call::Run(_), ..]),
        "{calls:?}"
    );
}

/// Few keys, few values: forwards come, go, change and come back often.
const PORTS: [u16; 3] = [80, 443, 8080];
const V4: [&str; 3] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];
const V6: [&str; 3] = ["fd00::1", "fd00::2", "fd00::3"];

fn key(index: usize) -> ForwardKey {
    ForwardKey {
        family: [Family::Ipv4, Family::Ipv6][index % 2],
        protocol: [Protocol::Tcp, Protocol::Udp][index / 2 % 2],
        external_port: PORTS[index / 4 % PORTS.len()],
    }
}

/// A forward at key `index`: which of its family's addresses are backends (a bit each, at
/// least one) and which are down, its target port, owner and source range.
#[derive(Clone, Debug)]
struct Spec {
    backends: u8,
    down: u8,
    port: u16,
    owner: usize,
    limited: bool,
    probe: bool,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        1..8u8,
        0..8u8,
        prop_oneof![Just(80u16), Just(8080)],
        0..3usize,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(backends, down, port, owner, limited, probe)| Spec {
            backends,
            down,
            port,
            owner,
            limited,
            probe,
        })
}

fn build(index: usize, spec: &Spec) -> Forward {
    let key = key(index);
    let pool = match key.family {
        Family::Ipv4 => V4,
        Family::Ipv6 => V6,
    };
    let pick = |bits: u8| -> Vec<IpAddr> {
        (0..pool.len())
            .filter(|i| bits & (1 << i) != 0)
            .map(|i| pool[i].parse().unwrap())
            .collect()
    };
    let backends = pick(spec.backends);
    let down = pick(spec.down & spec.backends);
    let mut forward = forward(key.external_port, pool[0], ["a", "b", "c"][spec.owner]);
    forward.key = key;
    forward.backends = backends;
    forward.down = down;
    forward.port = spec.port;
    forward.owner.uid = (spec.owner < 2).then(|| format!("uid-{}", spec.owner));
    forward.probe = spec.probe.then_some(Probe::Tcp(spec.port));
    forward.sources = match (spec.limited, key.family) {
        (false, _) => Vec::new(),
        (true, Family::Ipv4) => vec!["198.51.100.0/24".parse().unwrap()],
        (true, Family::Ipv6) => vec!["2001:db8::/32".parse().unwrap()],
    };
    forward
}

/// The table's configurations: the usual one, one with another WAN address (its elements
/// change) and one without WAN interfaces (its rules change: a rebuild).
fn table_config(index: usize) -> TableConfig {
    let mut config = ruleset(&[]).config;
    match index {
        0 => {}
        1 => {
            config
                .wan_addresses
                .insert("2001:db8:1::1".parse().unwrap());
        }
        _ => config.wan_interfaces.clear(),
    }
    config
}

#[derive(Clone, Debug)]
enum Step {
    /// The forward at a key is added or changed, or goes.
    Set(usize, Option<Spec>),
    Apply,
    /// Another program commits, changing nothing of the table.
    Bump,
    /// Another program deletes an element of a set of the table.
    Drop(usize),
    /// Another program deletes the table.
    Delete,
    /// The next batches are refused.
    Refuse(usize),
    Reconfigure(usize),
    Forget,
    Learn,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        10 => (0..4 * PORTS.len(), proptest::option::weighted(0.8, spec()))
            .prop_map(|(key, spec)| Step::Set(key, spec)),
        8 => Just(Step::Apply),
        1 => Just(Step::Bump),
        1 => (0..usize::MAX).prop_map(Step::Drop),
        1 => Just(Step::Delete),
        1 => (1..3usize).prop_map(Step::Refuse),
        1 => (0..3usize).prop_map(Step::Reconfigure),
        1 => Just(Step::Forget),
        1 => Just(Step::Learn),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_delta_apply_agrees_with_the_whole_apply(
        initial in proptest::collection::btree_map(0..4 * PORTS.len(), spec(), 0..8),
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        let mut forwards: BTreeMap<ForwardKey, Forward> = initial
            .iter()
            .map(|(index, spec)| (key(*index), build(*index, spec)))
            .collect();
        let mut config = table_config(0);
        let mut pair = Pair::holding(&Ruleset::new(config.clone(), forwards.clone()));
        for step in &steps {
            match step {
                Step::Set(index, spec) => {
                    match spec {
                        Some(spec) => forwards.insert(key(*index), build(*index, spec)),
                        None => forwards.remove(&key(*index)),
                    };
                    pair.changed.insert(key(*index));
                }
                Step::Apply => {
                    let _ = pair.apply(&Ruleset::new(config.clone(), forwards.clone()));
                }
                Step::Bump => pair.fakes().into_iter().for_each(|fake| fake.outside(|_| {})),
                Step::Drop(pick) => {
                    for fake in pair.fakes() {
                        fake.outside(|table| {
                            let Some(table) = table else { return };
                            let full: Vec<String> = table
                                .elements
                                .iter()
                                .filter(|(_, elems)| !elems.is_empty())
                                .map(|(set, _)| set.clone())
                                .collect();
                            if let Some(set) = full.get(pick % full.len().max(1)) {
                                let elems = table.elements.get_mut(set).unwrap();
                                elems.remove(pick % elems.len());
                            }
                        });
                    }
                }
                Step::Delete => pair.fakes().into_iter().for_each(|fake| fake.outside(|t| *t = None)),
                Step::Refuse(n) => pair.fakes().into_iter().for_each(|fake| fake.refusals = *n),
                Step::Reconfigure(index) => config = table_config(*index),
                Step::Forget => {
                    pair.whole.forget();
                    pair.delta.forget();
                }
                Step::Learn => {
                    let whole = pair.whole.learn_holders(&config).map_err(text);
                    let delta = pair.delta.learn_holders(&config).map_err(text);
                    prop_assert_eq!(whole, delta);
                    prop_assert_eq!(pair.whole.holders(), pair.delta.holders());
                }
            }
        }
        pair.apply(&Ruleset::new(config.clone(), forwards.clone())).unwrap();
    }
}
