//! The incremental planner against its oracle: random sequences of events go through both,
//! and after every step the planner's plan equals the whole plan of the same Services,
//! policy and holders.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::core::decide::mark_down;
use crate::core::model::Check;
use crate::core::node::Node;
use crate::core::policy::{LabelSelector, NodePorts};
use crate::core::service::ServicePort;

/// Few names, few ports, few timestamps: conflicts, ties and re-creations are common.
const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const NAMES: [&str; 4] = ["s0", "s1", "s2", "s3"];
const ENTRIES: [&str; 8] = [
    "http",
    "dns",
    "8080:http",
    "80",
    "53",
    "8080:dns",
    "dns-tcp",
    "nonsense entry",
];
const CHECKED: [&str; 6] = [
    "10.0.0.1", "10.0.0.2", "fd00::1", "10.0.1.1", "10.0.3.0", "10.0.3.1",
];
const ADDRESSES: [&str; 5] = [
    "10.0.0.1",
    "10.0.0.2",
    "fd00::1",
    "192.168.1.1",
    "not-an-ip",
];

#[derive(Clone, Debug)]
enum Event {
    /// Creates, re-maps or changes the status of the Service at this index.
    Upsert(Box<Service>),
    /// Deleted, out of scope or terminating: it may no longer forward.
    Remove(usize),
    /// The router's addresses, its own ports, the Nodes or the selected namespaces.
    Policy(PolicyEvent),
    /// A port's holder changes to the Service at this index (an apply), or goes.
    Holder(usize, u16, Option<usize>),
    /// A restart: every port is held by whoever the planner forwards it to now.
    HoldersFromPlan,
    /// A health check finds its backend down, or up again.
    Health(usize, u16),
}

#[derive(Clone, Debug)]
enum PolicyEvent {
    RouterAddress(usize),
    RouterPort(bool, u16),
    Node(usize, bool, bool),
    NodeGone(usize),
    Namespace(usize),
    /// A setting of the owner's: everything is resolved again.
    Ports(bool),
}

fn name(index: usize) -> Name {
    let ns = NAMESPACES[index / NAMES.len() % NAMESPACES.len()];
    let name = NAMES[index % NAMES.len()];
    (ns.to_owned(), name.to_owned())
}

fn service() -> impl Strategy<Value = Service> {
    (
        0..NAMESPACES.len() * NAMES.len(),
        0..2u8,
        proptest::option::of(0..3u8),
        proptest::option::of(proptest::collection::vec(0..ENTRIES.len(), 1..4)),
        proptest::collection::vec(0..ADDRESSES.len(), 0..3),
        any::<bool>(),
        proptest::option::of(prop_oneof![Just("nodeports"), Just("loadbalancer")]),
        proptest::option::of(prop_oneof![Just("192.0.2.0/24"), Just("2001:db8::/32")]),
        proptest::option::of(prop_oneof![Just("on"), Just("off")]),
    )
        .prop_map(
            |(index, generation, created, entries, addresses, external, target, range, check)| {
                let (namespace, name) = name(index);
                let port = |name: &str, number: i64, protocol: &str, node_port: i64| ServicePort {
                    name: Some(name.into()),
                    port: number,
                    protocol: protocol.into(),
                    node_port: Some(node_port),
                };
                Service {
                    uid: Some(format!("{namespace}-{name}-{generation}")),
                    created: created.map(|s| format!("2026-01-01T00:00:0{s}Z")),
                    mapping: entries
                        .map(|e| e.iter().map(|&i| ENTRIES[i]).collect::<Vec<_>>().join(", ")),
                    service_type: Some("LoadBalancer".into()),
                    ports: vec![
                        port("http", 80, "TCP", 30080),
                        port("dns", 53, "UDP", 30053),
                        port("dns-tcp", 53, "TCP", 30054),
                    ],
                    ingress_ips: addresses.iter().map(|&i| ADDRESSES[i].into()).collect(),
                    external_ips: if external {
                        vec!["10.0.1.1".into()]
                    } else {
                        Vec::new()
                    },
                    source_ranges: range.into_iter().map(Into::into).collect(),
                    health_check: check.map(Into::into),
                    target: target.map(Into::into),
                    namespace,
                    name,
                    ..Service::default()
                }
            },
        )
}

fn event() -> impl Strategy<Value = Event> {
    let services = NAMESPACES.len() * NAMES.len();
    prop_oneof![
        6 => service().prop_map(|s| Event::Upsert(Box::new(s))),
        2 => (0..services).prop_map(Event::Remove),
        1 => (0..4usize).prop_map(|i| Event::Policy(PolicyEvent::RouterAddress(i))),
        1 => (any::<bool>(), prop_oneof![Just(53u16), Just(80), Just(8080)])
            .prop_map(|(tcp, port)| Event::Policy(PolicyEvent::RouterPort(tcp, port))),
        1 => (0..3usize, any::<bool>(), any::<bool>())
            .prop_map(|(i, ready, own)| Event::Policy(PolicyEvent::Node(i, ready, own))),
        1 => (0..3usize).prop_map(|i| Event::Policy(PolicyEvent::NodeGone(i))),
        1 => (0..NAMESPACES.len()).prop_map(|i| Event::Policy(PolicyEvent::Namespace(i))),
        1 => any::<bool>().prop_map(|b| Event::Policy(PolicyEvent::Ports(b))),
        2 => (
            0..services,
            prop_oneof![Just(53u16), Just(80), Just(8080)],
            proptest::option::of(0..services)
        )
            .prop_map(|(i, port, holder)| Event::Holder(i, port, holder)),
        1 => Just(Event::HoldersFromPlan),
        2 => (0..CHECKED.len(), prop_oneof![Just(80u16), Just(53), Just(30080)])
            .prop_map(|(i, port)| Event::Health(i, port)),
    ]
}

/// The world as the oracle sees it.
struct World {
    services: BTreeMap<Name, Service>,
    policy: Policy,
    holders: Holders,
    down: BTreeSet<Check>,
}

fn change_policy(policy: &mut Policy, event: &PolicyEvent) {
    fn toggle<T: Ord>(set: &mut BTreeSet<T>, value: T) {
        if !set.remove(&value) {
            set.insert(value);
        }
    }
    match *event {
        PolicyEvent::RouterAddress(i) => {
            let addr = ["10.0.0.2", "192.168.1.1", "fd00::1", "10.0.2.1"][i];
            toggle(&mut policy.router_addresses, addr.parse().unwrap());
        }
        PolicyEvent::RouterPort(tcp, port) => {
            let protocol = if tcp { Protocol::Tcp } else { Protocol::Udp };
            toggle(&mut policy.router_ports, (protocol, port));
        }
        PolicyEvent::Node(i, ready, own) => {
            let name = format!("node-{i}");
            let ip = if own {
                "10.0.2.1".to_owned()
            } else {
                format!("10.0.3.{i}")
            };
            policy.nodes.insert(
                name.clone(),
                Node {
                    name,
                    internal_ips: vec![ip],
                    ready,
                    ..Node::default()
                },
            );
        }
        PolicyEvent::NodeGone(i) => {
            policy.nodes.remove(&format!("node-{i}"));
        }
        PolicyEvent::Namespace(i) => {
            toggle(&mut policy.selected_namespaces, NAMESPACES[i].to_owned())
        }
        PolicyEvent::Ports(narrow) => {
            policy.ports = if narrow {
                vec![1..=1000]
            } else {
                vec![1..=65535]
            };
            policy.explicit_ports = narrow;
        }
    }
}

fn base_policy(node_ports: NodePorts, selector: bool, external_ips: bool) -> Policy {
    Policy {
        node_ports,
        external_ips,
        namespace_selector: selector.then(|| LabelSelector::parse("open").unwrap()),
        selected_namespaces: ["a".to_owned()].into(),
        ..Policy::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_planner_agrees_with_the_whole_plan_after_every_event(
        node_ports in prop_oneof![Just(NodePorts::Off), Just(NodePorts::Annotated), Just(NodePorts::All)],
        selector in any::<bool>(),
        external_ips in any::<bool>(),
        events in proptest::collection::vec(event(), 1..60),
    ) {
        let mut world = World {
            services: BTreeMap::new(),
            policy: base_policy(node_ports, selector, external_ips),
            holders: Holders::new(),
            down: BTreeSet::new(),
        };
        let mut planner = Planner::new(world.policy.clone());
        for (step, event) in events.iter().enumerate() {
            match event {
                Event::Upsert(service) => {
                    let name = (service.namespace.clone(), service.name.clone());
                    world.services.insert(name, (**service).clone());
                    planner.upsert(service);
                }
                Event::Remove(i) => {
                    world.services.remove(&name(*i));
                    planner.remove(&name(*i));
                }
                Event::Policy(change) => {
                    change_policy(&mut world.policy, change);
                    planner.set_policy(&world.policy, |name| world.services.get(name));
                }
                Event::Holder(i, port, holder) => {
                    let key = ForwardKey {
                        family: Family::Ipv4,
                        protocol: if i % 2 == 0 { Protocol::Tcp } else { Protocol::Udp },
                        external_port: *port,
                    };
                    let uid = holder.and_then(|h| {
                        world.services.get(&name(h)).and_then(|s| s.uid.clone())
                    });
                    match uid {
                        Some(uid) => world.holders.insert(key, uid),
                        None => world.holders.remove(&key),
                    };
                    planner.set_holders(&world.holders);
                }
                Event::HoldersFromPlan => {
                    world.holders = planner
                        .forwards()
                        .iter()
                        .filter_map(|(key, f)| f.owner.uid.clone().map(|uid| (*key, uid)))
                        .collect();
                    planner.set_holders(&world.holders);
                }
                Event::Health(i, port) => {
                    let check = (CHECKED[*i].parse().unwrap(), Probe::Tcp(*port));
                    if !world.down.remove(&check) {
                        world.down.insert(check);
                    }
                    planner.set_down(&world.down);
                }
            }
            let mut whole = plan_held(world.services.values(), &world.policy, &world.holders);
            mark_down(&mut whole, &world.down);
            prop_assert_eq!(&planner.plan(), &whole, "after step {}: {:?}", step, event);
        }
    }

    /// Every change the plan shows is among the changes the planner reports, so a daemon
    /// that follows only those misses nothing.
    #[test]
    fn the_planner_reports_every_forward_and_service_that_changed(
        events in proptest::collection::vec(service(), 1..40),
        removals in proptest::collection::vec(0..NAMESPACES.len() * NAMES.len(), 0..10),
    ) {
        let mut planner = Planner::new(Policy::default());
        let mut before = planner.plan();
        let removals = removals.into_iter().map(|i| Err(name(i)));
        for event in events.into_iter().map(Ok).chain(removals) {
            match &event {
                Ok(service) => planner.upsert(service),
                Err(name) => planner.remove(name),
            }
            let changes = planner.take_changes();
            let after = planner.plan();
            let keys: BTreeSet<ForwardKey> =
                before.forwards.keys().chain(after.forwards.keys()).copied().collect();
            for key in keys {
                if before.forwards.get(&key) != after.forwards.get(&key) {
                    prop_assert!(changes.forwards.contains(&key), "{} not reported", key);
                }
            }
            let of = |plan: &Plan, name: &Name| -> Vec<Outcome> {
                plan.outcomes
                    .iter()
                    .filter(|o| o.namespace == name.0 && o.name == name.1)
                    .cloned()
                    .collect()
            };
            let names: BTreeSet<Name> = before
                .outcomes
                .iter()
                .chain(&after.outcomes)
                .map(|o| (o.namespace.clone(), o.name.clone()))
                .collect();
            for name in names {
                if of(&before, &name) != of(&after, &name) {
                    prop_assert!(changes.services.contains(&name), "{:?} not reported", name);
                }
            }
            before = after;
        }
    }
}
