//! Tests of the whole plan: entries, targets, the policy and who wins a port.

use super::*;
use crate::core::node::Node;
use crate::core::policy::{NodePorts, PolicyParts};
use crate::core::service::ServicePort;

fn port(name: Option<&str>, port: i64, protocol: &str) -> ServicePort {
    ServicePort {
        name: name.map(Into::into),
        port,
        protocol: protocol.into(),
        node_port: None,
    }
}

fn svc(ns: &str, name: &str, mapping: &str, ip: &str) -> Service {
    Service {
        namespace: ns.into(),
        name: name.into(),
        mapping: Some(mapping.into()),
        ports: vec![
            port(Some("http"), 80, "TCP"),
            port(Some("dns-tcp"), 53, "TCP"),
            port(Some("dns"), 53, "UDP"),
        ],
        ingress_ips: if ip.is_empty() {
            vec![]
        } else {
            vec![ip.into()]
        },
        ..Service::default()
    }
}

fn key(external_port: u16, protocol: Protocol) -> ForwardKey {
    ForwardKey {
        family: Family::Ipv4,
        protocol,
        external_port,
    }
}

#[test]
fn name_number_and_external_port() {
    let plan = plan(
        [&svc("a", "web", "http, 53, 8080:http", "10.0.0.1")],
        &Policy::default(),
    );
    assert_eq!(plan.count(State::Forwarding), 4);
    let fwd = &plan.forwards[&key(8080, Protocol::Tcp)];
    assert_eq!(fwd.port, 80);
    assert!(plan.forwards.contains_key(&key(53, Protocol::Udp)));
    assert!(plan.forwards.contains_key(&key(53, Protocol::Tcp)));
    assert_eq!(
        plan.forwards[&key(53, Protocol::Udp)].owner.service_port,
        "dns"
    );
}

#[test]
fn bad_entries_refused_others_forward() {
    let plan = plan(
        [&svc("a", "web", "http,nope,99,80:dns-tcp,0", "10.0.0.1")],
        &Policy::default(),
    );
    assert_eq!(plan.count(State::Forwarding), 1);
    assert_eq!(plan.count(State::Invalid), 4);
    let reasons: Vec<_> = plan
        .outcomes
        .iter()
        .filter_map(|o| o.reason.clone())
        .collect();
    assert!(reasons[0].contains("no port named \"nope\""));
    assert!(reasons[1].contains("no port 99"));
    assert!(reasons[2].contains("already used by entry \"http\""));
    assert!(reasons[3].contains("port 0"));
}

#[test]
fn oldest_wins_then_name_and_loser_names_winner() {
    let mut old = svc("z", "old", "http", "10.0.0.2");
    old.created = Some("2020-01-01T00:00:00Z".into());
    let mut new = svc("a", "new", "http", "10.0.0.1");
    new.created = Some("2024-01-01T00:00:00Z".into());
    let undated = svc("a", "aaa", "http", "10.0.0.3");
    for order in [[&new, &old, &undated], [&undated, &old, &new]] {
        let plan = plan(order, &Policy::default());
        assert_eq!(plan.forwards[&key(80, Protocol::Tcp)].owner.name, "old");
        let losers: Vec<_> = plan
            .outcomes
            .iter()
            .filter(|o| o.state == State::Conflict)
            .collect();
        assert_eq!(losers.len(), 2);
        assert!(losers.iter().all(|o| o.winner.as_deref() == Some("z/old")));
    }
    let plan = plan([&new, &undated], &Policy::default());
    assert_eq!(plan.forwards[&key(80, Protocol::Tcp)].owner.name, "new");
    let plan_tie = super::plan(
        [
            &svc("b", "x", "http", "10.0.0.1"),
            &svc("a", "y", "http", "10.0.0.2"),
        ],
        &Policy::default(),
    );
    assert_eq!(
        plan_tie.forwards[&key(80, Protocol::Tcp)].owner.namespace,
        "a"
    );
}

#[test]
fn the_holder_keeps_its_port_against_an_older_service() {
    let mut new = svc("a", "new", "http", "10.0.0.1");
    new.uid = Some("u-new".into());
    new.created = Some("2026-02-01T00:00:00Z".into());
    let mut old = svc("b", "old", "http", "10.0.0.2");
    old.uid = Some("u-old".into());
    old.created = Some("2020-01-01T00:00:00Z".into());
    // Free port: the oldest wins.
    let free = plan([&new, &old], &Policy::default());
    assert_eq!(free.forwards[&key(80, Protocol::Tcp)].owner.name, "old");
    // Held by the newer one: it keeps it, and the older one is told who holds it.
    let holders = Holders::from([(key(80, Protocol::Tcp), "u-new".to_owned())]);
    let held = plan_held([&new, &old], &Policy::default(), &holders);
    assert_eq!(held.forwards[&key(80, Protocol::Tcp)].owner.name, "new");
    let loser = held.outcomes.iter().find(|o| o.name == "old").unwrap();
    assert_eq!(loser.state, State::Conflict);
    assert!(
        loser
            .reason
            .as_deref()
            .unwrap()
            .contains("held by a/new (it holds the port now)"),
        "{loser:?}"
    );
    // A holder that stops asking loses nothing to anyone else but the port itself.
    let gone = plan_held([&old], &Policy::default(), &holders);
    assert_eq!(gone.forwards[&key(80, Protocol::Tcp)].owner.name, "old");
}

#[test]
fn next_in_line_takes_over() {
    let first = svc("a", "first", "http", "10.0.0.1");
    let second = svc("b", "second", "http", "10.0.0.2");
    assert_eq!(
        plan([&first, &second], &Policy::default()).forwards[&key(80, Protocol::Tcp)]
            .owner
            .name,
        "first"
    );
    assert_eq!(
        plan([&second], &Policy::default()).forwards[&key(80, Protocol::Tcp)]
            .owner
            .name,
        "second"
    );
}

#[test]
fn waiting_without_address() {
    let plan = plan([&svc("a", "web", "http", "")], &Policy::default());
    assert_eq!(plan.count(State::Waiting), 1);
    assert!(plan.forwards.is_empty());
}

#[test]
fn dual_stack_forwards_each_family_to_every_address() {
    let mut s = svc("a", "web", "http", "10.0.0.9");
    s.ingress_ips.push("fd00::1".into());
    s.ingress_ips.push("10.0.0.1".into());
    s.ingress_ips.push("10.0.0.9".into());
    let plan = plan([&s], &Policy::default());
    assert_eq!(plan.forwards.len(), 2);
    let v6 = ForwardKey {
        family: Family::Ipv6,
        ..key(80, Protocol::Tcp)
    };
    let text = |f: &Forward| -> Vec<String> { f.backends.iter().map(|a| a.to_string()).collect() };
    assert_eq!(text(&plan.forwards[&v6]), ["fd00::1"]);
    assert_eq!(
        text(&plan.forwards[&key(80, Protocol::Tcp)]),
        ["10.0.0.1", "10.0.0.9"]
    );
}

#[test]
fn a_refused_backend_is_reported_and_the_others_serve() {
    let mut s = svc("a", "web", "http", "10.0.0.1");
    s.ingress_ips.push("8.8.8.8".into());
    s.ingress_ips.push("10.0.0.2".into());
    let plan = plan([&s], &Policy::default());
    assert_eq!(plan.count(State::Refused), 1);
    let refused = plan
        .outcomes
        .iter()
        .find(|o| o.state == State::Refused)
        .unwrap();
    assert_eq!(refused.entry, "status.loadBalancer.ingress[1].ip");
    let forward = &plan.forwards[&key(80, Protocol::Tcp)];
    assert_eq!(forward.backends.len(), 2);
    assert!(!forward.backends.contains(&"8.8.8.8".parse().unwrap()));
}

#[test]
fn node_ports_of_ready_nodes_when_asked_and_allowed() {
    let mut s = svc("a", "web", "80:http", "");
    s.ports[0].node_port = Some(30080);
    s.target = Some("nodeports".into());
    let node = |name: &str, ip: &str, ready: bool, excluded: bool| Node {
        name: name.into(),
        internal_ips: vec![ip.into()],
        ready,
        excluded,
        deleting: false,
    };
    let mut policy = Policy {
        node_ports: NodePorts::Annotated,
        ..Policy::default()
    };
    for n in [
        node("n1", "192.168.1.21", true, false),
        node("n2", "192.168.1.22", true, false),
        node("n3", "192.168.1.23", false, false),
        node("n4", "192.168.1.24", true, true),
        node("n5", "8.8.4.4", true, false),
    ] {
        policy.nodes.insert(n.name.clone(), n);
    }
    let p = plan([&s], &policy);
    let forward = &p.forwards[&key(80, Protocol::Tcp)];
    assert_eq!(forward.port, 30080);
    let backends: Vec<String> = forward.backends.iter().map(|b| b.to_string()).collect();
    assert_eq!(backends, ["192.168.1.21", "192.168.1.22"]);
    assert_eq!(forward.probe, Some(Probe::Tcp(30080)));
    assert_eq!(p.count(State::Refused), 1, "the public node address");
    // Not annotated: waits for its LoadBalancer address, unless every Service goes.
    s.target = None;
    assert_eq!(plan([&s], &policy).count(State::Waiting), 1);
    policy.node_ports = NodePorts::All;
    assert_eq!(plan([&s], &policy).count(State::Forwarding), 1);
    // No Ready node: those not excluded stay; no node at all: waiting; the router not
    // allowing node ports: refused, said why.
    for n in policy.nodes.values_mut() {
        n.ready = false;
    }
    let not_ready = plan([&s], &policy);
    let kept: Vec<String> = not_ready.forwards[&key(80, Protocol::Tcp)]
        .backends
        .iter()
        .map(|b| b.to_string())
        .collect();
    assert_eq!(kept, ["192.168.1.21", "192.168.1.22", "192.168.1.23"]);
    policy.nodes.clear();
    let waiting = plan([&s], &policy);
    assert!(
        waiting.outcomes[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("Ready node")
    );
    policy.node_ports = NodePorts::Off;
    s.target = Some("nodeports".into());
    let refused = plan([&s], &policy);
    assert_eq!(refused.count(State::Refused), 1);
    assert!(
        refused.outcomes[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("--node-ports off")
    );
    s.target = Some("nodes".into());
    policy.node_ports = NodePorts::All;
    let invalid = plan([&s], &policy);
    assert_eq!(invalid.count(State::Invalid), 1);
    assert!(invalid.outcomes[0].entry.contains("target"));
}

#[test]
fn external_ips_only_when_the_owner_allows_them() {
    let mut s = svc("a", "web", "http", "");
    s.external_ips = vec!["192.168.5.5".into()];
    let refused = plan([&s], &Policy::default());
    assert_eq!(refused.count(State::Refused), 1);
    let outcome = &refused.outcomes[0];
    assert_eq!(outcome.entry, "spec.externalIPs");
    assert!(
        outcome
            .reason
            .as_deref()
            .unwrap()
            .contains("--allow-external-ips")
    );
    let allowing = Policy {
        external_ips: true,
        ..Policy::default()
    };
    assert_eq!(plan([&s], &allowing).count(State::Forwarding), 1);
    // A LoadBalancer address is used whatever the policy says of externalIPs.
    let mut both = svc("a", "web", "http", "10.0.0.1");
    both.external_ips = vec!["192.168.5.5".into()];
    assert_eq!(
        plan([&both], &Policy::default()).count(State::Forwarding),
        1
    );
}

#[test]
fn port_names_are_checked_as_the_api_server_does() {
    for name in [
        "é".repeat(60),
        "x\" } ; flush ruleset ; #".into(),
        "Web".into(),
    ] {
        let mut s = svc("a", "web", "8080", "10.0.0.1");
        s.ports[0].name = Some(name.clone());
        let p = plan([&s], &Policy::default());
        assert_eq!(p.count(State::Invalid), 1, "{name}");
        assert!(p.forwards.is_empty());
        let outcome = &p.outcomes[0];
        assert_eq!(outcome.entry, "spec.ports[0].name");
        assert!(outcome.reason.as_deref().unwrap().is_ascii());
    }
}

#[test]
fn service_wide_refusals_name_the_field() {
    let mut bad_ip = svc("a", "web", "http", "not-an-ip");
    bad_ip.name = "web".into();
    let mut bad_name = svc("a", "Web\"; flush ruleset", "http", "10.0.0.1");
    bad_name.namespace = "a".into();
    let mut loopback = svc("a", "lo", "http", "127.0.0.1");
    loopback.namespace = "a".into();
    let mut bad_time = svc("a", "t", "http", "10.0.0.1");
    bad_time.created = Some("yesterday".into());
    let plan = plan(
        [&bad_ip, &bad_name, &loopback, &bad_time],
        &Policy::default(),
    );
    assert!(plan.forwards.is_empty());
    let fields: Vec<_> = plan.outcomes.iter().map(|o| o.entry.as_str()).collect();
    assert!(fields.contains(&"status.loadBalancer.ingress[0].ip"));
    assert!(fields.contains(&"metadata.name"));
    assert!(fields.contains(&"metadata.creationTimestamp"));
}

#[test]
fn bad_port_and_protocol_only_hurt_their_entries() {
    let mut s = svc("a", "web", "http,odd,53", "10.0.0.1");
    s.ports.push(port(Some("odd"), 70000, "TCP"));
    s.ports[2].protocol = "ICMP".into();
    let plan = plan([&s], &Policy::default());
    assert_eq!(plan.forwards.len(), 1);
    let reasons: Vec<_> = plan
        .outcomes
        .iter()
        .filter_map(|o| o.reason.clone())
        .collect();
    assert!(reasons.iter().any(|r| r.contains("spec.ports[3].port")));
    assert!(reasons.iter().any(|r| r.contains("spec.ports[2].protocol")));
}

#[test]
fn policy_refuses_namespaces_ports_and_targets_and_nothing_else() {
    let policy = Policy::from_parts(&PolicyParts {
        namespaces: Some(vec!["a".into()]),
        ports: Some("1-1023".into()),
        targets: Some(vec!["10.0.0.0/8".into(), "fd00::/8".into()]),
        ..PolicyParts::default()
    })
    .unwrap();
    let other_ns = svc("b", "web", "http", "10.0.0.1");
    let high_port = svc("a", "dns", "8053:dns, http", "10.0.0.2");
    let mut public_v4 = svc("a", "dual", "http", "203.0.113.5");
    public_v4.ingress_ips.push("fd00::5".into());
    let plan = plan([&other_ns, &high_port, &public_v4], &policy);
    let refused: Vec<(&str, &str)> = plan
        .outcomes
        .iter()
        .filter(|o| o.state == State::Refused)
        .map(|o| (o.name.as_str(), o.reason.as_deref().unwrap()))
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(refused[0].1.contains("8053 is not allowed"));
    assert!(refused[1].1.contains("203.0.113.5 is outside"));
    assert!(refused[2].1.contains("namespace b"));
    // What the policy allows still forwards: http of a/dns, and a/dual over IPv6.
    assert_eq!(plan.forwards.len(), 2);
    assert!(plan.forwards.values().any(|f| f.key.family == Family::Ipv6));
}

#[test]
fn unannotated_services_are_not_planned() {
    let mut s = svc("a", "web", "http", "10.0.0.1");
    s.mapping = None;
    assert!(plan([&s], &Policy::default()).outcomes.is_empty());
}
