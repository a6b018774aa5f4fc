//! From Services to forwards: resolve each annotation entry against the Service's ports and
//! addresses, then choose one winner per (family, protocol, external port).
//!
//! Pure: no clock, no I/O. The result is deterministic for a given set of Services, whatever
//! their order, so a restart arrives at the same forwards.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::Serialize;

use crate::core::annotation::{self, PortRef};
use crate::core::names::{is_dns_label, is_kubernetes_time};
use ipnet::IpNet;

use crate::core::model::{Family, Forward, ForwardKey, Owner, Probe, Protocol, Target};
use crate::core::node::Node;
use crate::core::policy::{NodePorts, Policy};
use crate::core::service::{Service, ServicePort};

/// What happens to one annotation entry (for one Service port and family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The forward is (or would be) in the router's table.
    Forwarding,
    /// Another Service holds the same external port; `reason` names it.
    Conflict,
    /// The entry or the Service is at fault; `reason` says how.
    Invalid,
    /// The Service has no address to forward to yet.
    Waiting,
    /// The router's policy does not allow it; `reason` says which rule.
    Refused,
}

/// One line of the plan: an entry, what it resolved to, and its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub namespace: String,
    pub name: String,
    /// The annotation entry as written, or the field at fault for a Service-wide refusal.
    pub entry: String,
    pub key: Option<ForwardKey>,
    /// Where the forward goes: every backend of its family, each as `address:port`.
    pub backends: Vec<Target>,
    /// How the backends are checked, for a forward with several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
    /// The backends a health check found down.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub down: Vec<IpAddr>,
    pub service_port: Option<String>,
    pub state: State,
    pub reason: Option<String>,
    /// For a conflict: the `namespace/name` of the Service that holds the port.
    pub winner: Option<String>,
}

/// The planner's answer: every outcome for the user, and the forwards for the router.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Sorted by namespace, name, then entry order.
    pub outcomes: Vec<Outcome>,
    pub forwards: BTreeMap<ForwardKey, Forward>,
}

impl Plan {
    pub fn count(&self, state: State) -> usize {
        self.outcomes.iter().filter(|o| o.state == state).count()
    }
}

/// Rank for conflicts, lowest first: the Service that holds the port now, then a Service
/// with a creationTimestamp before one without, older before newer, then by position in
/// namespace/name order. Borrowed, so ranking 20,000 candidates allocates nothing.
type Rank<'a> = (bool, bool, &'a str, usize);

/// Who holds each port now: the uid of the Service whose forward the kernel holds (from the
/// element's owner comment after a restart). The holder keeps its port as long as it asks
/// for it; only a free port goes to the oldest.
pub type Holders = BTreeMap<ForwardKey, String>;

struct Candidate<'a> {
    rank: Rank<'a>,
    outcome: usize,
    key: ForwardKey,
    backends: Vec<IpAddr>,
    port: u16,
    probe: Option<Probe>,
    service: &'a Service,
    port_ref: &'a ServicePort,
    sources: Vec<IpNet>,
}

/// Plans the forwards for a set of Services, no port held by anyone yet (offline).
pub fn plan<'a>(services: impl IntoIterator<Item = &'a Service>, policy: &Policy) -> Plan {
    plan_held(services, policy, &Holders::new())
}

/// Plans the forwards for a set of Services, the ports in `holders` staying with the
/// Services that hold them. Services without the mapping annotation are not part of the
/// plan.
pub fn plan_held<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    policy: &Policy,
    holders: &Holders,
) -> Plan {
    let mut services: Vec<&Service> = services
        .into_iter()
        .filter(|s| s.mapping.is_some())
        .collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let mut outcomes = Vec::new();
    let mut candidates = Vec::new();
    for (position, service) in services.into_iter().enumerate() {
        resolve_service(position, service, policy, &mut outcomes, &mut candidates);
    }

    for candidate in &mut candidates {
        let holds = candidate.service.uid.as_ref().is_some_and(|uid| {
            holders
                .get(&candidate.key)
                .is_some_and(|holder| holder == uid)
        });
        candidate.rank.0 = !holds;
    }
    candidates.sort_unstable_by_key(|c| c.rank);
    let mut forwards: BTreeMap<ForwardKey, Forward> = BTreeMap::new();
    let mut held: BTreeSet<ForwardKey> = BTreeSet::new();
    for candidate in candidates {
        match forwards.get(&candidate.key) {
            Some(winner) => {
                let why = if held.contains(&candidate.key) {
                    "it holds the port now"
                } else {
                    "older, or first by namespace/name"
                };
                let outcome = &mut outcomes[candidate.outcome];
                outcome.state = State::Conflict;
                outcome.winner = Some(winner.owner.service());
                outcome.reason = Some(format!(
                    "external port {} is held by {} ({why})",
                    candidate.key,
                    winner.owner.service()
                ));
            }
            None => {
                if !candidate.rank.0 {
                    held.insert(candidate.key);
                }
                outcomes[candidate.outcome].probe = candidate.probe;
                let forward = Forward {
                    key: candidate.key,
                    backends: candidate.backends,
                    port: candidate.port,
                    down: Vec::new(),
                    probe: candidate.probe,
                    owner: owner(candidate.service, candidate.port_ref),
                    sources: candidate.sources,
                };
                forwards.insert(candidate.key, forward);
            }
        }
    }
    Plan { outcomes, forwards }
}

fn owner(service: &Service, port: &ServicePort) -> Owner {
    Owner {
        namespace: service.namespace.clone(),
        name: service.name.clone(),
        uid: service.uid.clone(),
        service_port: port_label(port),
    }
}

/// A Service port's name, or its number when it has none.
fn port_label(port: &ServicePort) -> String {
    port.name.clone().unwrap_or_else(|| port.port.to_string())
}

fn resolve_service<'a>(
    position: usize,
    service: &'a Service,
    policy: &Policy,
    outcomes: &mut Vec<Outcome>,
    candidates: &mut Vec<Candidate<'a>>,
) {
    // Names are checked below; until then they may hold anything, so only printable text
    // goes into the outcomes that report them.
    let outcome = |entry: &str, state: State, reason: Option<String>| Outcome {
        namespace: printable(&service.namespace),
        name: printable(&service.name),
        entry: entry.to_owned(),
        key: None,
        backends: Vec::new(),
        probe: None,
        down: Vec::new(),
        service_port: None,
        state,
        reason,
        winner: None,
    };
    if let Err((field, reason)) = check_identity(service) {
        outcomes.push(outcome(&field, State::Invalid, Some(reason)));
        return;
    }
    if service.service_type.as_deref() == Some("ExternalName") {
        let reason = "an ExternalName Service has no address to forward to";
        outcomes.push(outcome("spec.type", State::Invalid, Some(reason.into())));
        return;
    }
    if let Err(reason) = policy.check_namespace(&service.namespace) {
        outcomes.push(outcome("metadata.namespace", State::Refused, Some(reason)));
        return;
    }
    let (targets, node_ports) = match targets(service, policy) {
        Ok((allowed, refused, node_ports)) => {
            let all_refused = allowed.is_empty() && !refused.is_empty();
            for (field, reason) in refused {
                outcomes.push(outcome(&field, State::Refused, Some(reason)));
            }
            if all_refused {
                return;
            }
            (allowed, node_ports)
        }
        Err((field, reason)) => {
            outcomes.push(outcome(&field, State::Invalid, Some(reason)));
            return;
        }
    };
    let sources = match source_ranges(service) {
        Ok(sources) => sources,
        Err((field, reason)) => {
            // Fail closed: forwarding to every client is not what the Service asked for.
            outcomes.push(outcome(&field, State::Invalid, Some(reason)));
            return;
        }
    };
    let checks = match health_checks(service) {
        Ok(checks) => checks,
        Err((field, reason)) => {
            // The checks stay on: the forwards are as asked, the annotation is reported.
            outcomes.push(outcome(&field, State::Invalid, Some(reason)));
            Checks {
                on: true,
                node_port: None,
            }
        }
    };
    // Whether it holds the port is known per forward key, below.
    let rank = (
        true,
        service.created.is_none(),
        service.created.as_deref().unwrap_or_default(),
        position,
    );

    // (protocol, external port) → the entry that took it first within this Service.
    let mut taken: Vec<(Protocol, u16, &str)> = Vec::new();
    let mapping = service.mapping.as_deref().unwrap_or_default();
    let parsed: Vec<_> = annotation::parse(mapping);
    for parsed in &parsed {
        let entry = match parsed {
            Ok(entry) => entry,
            Err(err) => {
                outcomes.push(outcome(
                    &err.entry,
                    State::Invalid,
                    Some(err.reason.clone()),
                ));
                continue;
            }
        };
        let selected = match select_ports(service, &entry.service_port) {
            Ok(selected) => selected,
            Err(reason) => {
                outcomes.push(outcome(&entry.text, State::Invalid, Some(reason)));
                continue;
            }
        };
        for (port, number, protocol) in selected {
            let external_port = entry.external_port.unwrap_or(number);
            let described = |state: State, reason: Option<String>| Outcome {
                service_port: Some(port_label(port)),
                ..outcome(&entry.text, state, reason)
            };
            if let Some((_, _, first)) = taken
                .iter()
                .find(|(p, e, _)| *p == protocol && *e == external_port)
            {
                outcomes.push(described(
                    State::Invalid,
                    Some(format!(
                        "external port {external_port}/{protocol} is already used by entry \"{first}\" of this Service"
                    )),
                ));
                continue;
            }
            taken.push((protocol, external_port, &entry.text));
            if let Err(reason) = policy.check_port(protocol, external_port) {
                outcomes.push(described(State::Refused, Some(reason)));
                continue;
            }
            if targets.is_empty() {
                let reason = if node_ports {
                    "waiting for a Ready node to forward to its node port"
                } else {
                    "waiting for a LoadBalancer address"
                };
                outcomes.push(described(State::Waiting, Some(reason.into())));
                continue;
            }
            // To node ports: the port is the Service port's nodePort on every node.
            let number = if node_ports {
                match port
                    .node_port
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                {
                    Some(node_port) => node_port,
                    None => {
                        let index = service
                            .ports
                            .iter()
                            .position(|p| std::ptr::eq(p, port))
                            .unwrap_or_default();
                        outcomes.push(described(
                            State::Waiting,
                            Some(format!(
                                "spec.ports[{index}].nodePort: none allocated yet (not a NodePort or LoadBalancer Service?)"
                            )),
                        ));
                        continue;
                    }
                }
            } else {
                number
            };
            for family in [Family::Ipv4, Family::Ipv6] {
                let backends: Vec<IpAddr> = targets
                    .iter()
                    .filter(|a| Family::of(**a) == family)
                    .copied()
                    .collect();
                if backends.is_empty() {
                    continue;
                }
                let key = ForwardKey {
                    family,
                    protocol,
                    external_port,
                };
                let shown: Vec<Target> = backends
                    .iter()
                    .map(|&addr| Target { addr, port: number })
                    .collect();
                let family_sources: Vec<IpNet> = sources
                    .iter()
                    .filter(|net| Family::of(net.addr()) == family)
                    .copied()
                    .collect();
                if !sources.is_empty() && family_sources.is_empty() {
                    // Source ranges of the other family only: no client of this one may
                    // connect, so nothing is opened for it.
                    outcomes.push(Outcome {
                        key: Some(key),
                        backends: shown,
                        ..described(
                            State::Refused,
                            Some(format!(
                                "spec.loadBalancerSourceRanges allows no {family} client"
                            )),
                        )
                    });
                    continue;
                }
                candidates.push(Candidate {
                    sources: family_sources,
                    rank,
                    outcome: outcomes.len(),
                    key,
                    probe: (backends.len() > 1)
                        .then(|| probe_of(protocol, number, &checks))
                        .flatten(),
                    backends,
                    port: number,
                    service,
                    port_ref: port,
                });
                outcomes.push(Outcome {
                    key: Some(key),
                    backends: shown,
                    ..described(State::Forwarding, None)
                });
            }
        }
    }
}

/// How a Service's backends may be checked.
struct Checks {
    on: bool,
    /// `spec.healthCheckNodePort`, valid.
    node_port: Option<u16>,
}

fn health_checks(service: &Service) -> Result<Checks, (String, String)> {
    let field = || format!("metadata.annotations[\"{}\"]", annotation::HEALTH_CHECK);
    let on = match service.health_check.as_deref().map(str::trim) {
        None | Some("on") => true,
        Some("off") => false,
        Some(other) => {
            return Err((
                field(),
                format!("\"{}\" is not on or off; checking", printable(other)),
            ));
        }
    };
    let node_port = match service.health_check_node_port {
        None => None,
        Some(port) => Some(
            u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    (
                        "spec.healthCheckNodePort".to_owned(),
                        format!("{port} is not a valid port"),
                    )
                })?,
        ),
    };
    Ok(Checks { on, node_port })
}

/// How the backends of a forward of `protocol` to `port` are checked: TCP by a connection,
/// UDP and SCTP by kube-proxy's health check of the node when the Service has one.
fn probe_of(protocol: Protocol, port: u16, checks: &Checks) -> Option<Probe> {
    if !checks.on {
        return None;
    }
    match protocol {
        Protocol::Tcp => Some(Probe::Tcp(port)),
        Protocol::Udp | Protocol::Sctp => checks.node_port.map(Probe::Http),
    }
}

/// The Service ports an entry selects, with their validated number and protocol.
fn select_ports<'s>(
    service: &'s Service,
    wanted: &PortRef,
) -> Result<Vec<(&'s ServicePort, u16, Protocol)>, String> {
    let mut selected = Vec::new();
    for (index, port) in service.ports.iter().enumerate() {
        let matches = match wanted {
            PortRef::Name(name) => port.name.as_deref() == Some(name.as_str()),
            PortRef::Number(number) => port.port == i64::from(*number),
        };
        if !matches {
            continue;
        }
        let number = u16::try_from(port.port)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| {
                format!(
                    "spec.ports[{index}].port: {} is not a valid port",
                    port.port
                )
            })?;
        let protocol = Protocol::from_kubernetes(&port.protocol).ok_or_else(|| {
            format!(
                "spec.ports[{index}].protocol: \"{}\" is not TCP, UDP or SCTP",
                printable(&port.protocol)
            )
        })?;
        selected.push((port, number, protocol));
    }
    if selected.is_empty() {
        return Err(match wanted {
            PortRef::Name(name) => format!("no port named \"{name}\" in spec.ports"),
            PortRef::Number(number) => format!("no port {number} in spec.ports"),
        });
    }
    Ok(selected)
}

/// `spec.loadBalancerSourceRanges` as canonical, disjoint networks, sorted.
fn source_ranges(service: &Service) -> Result<Vec<IpNet>, (String, String)> {
    let mut nets = Vec::new();
    for (index, text) in service.source_ranges.iter().enumerate() {
        let net: IpNet = text.trim().parse().map_err(|_| {
            (
                format!("spec.loadBalancerSourceRanges[{index}]"),
                format!("\"{}\" is not a network in CIDR notation", printable(text)),
            )
        })?;
        nets.push(net.trunc());
    }
    // Overlapping ranges would be overlapping elements of one interval set, which nft
    // refuses; aggregated, they are disjoint, sorted, and cover the same clients.
    Ok(IpNet::aggregate(&nets))
}

/// Addresses chosen as targets: those the policy allows, those it refuses with the field
/// and the reason, and whether they are nodes (forwards go to the node ports).
type Targets = (Vec<IpAddr>, Vec<(String, String)>, bool);

/// The addresses to forward to: every address of the LoadBalancer ingress, else, where the
/// policy allows it, of `spec.externalIPs`; each checked against the policy on its own, so
/// a refused one is reported and the others serve. Sorted, without repeats.
fn targets(service: &Service, policy: &Policy) -> Result<Targets, (String, String)> {
    if service.ingress_ips.is_empty() && !service.external_ips.is_empty() && !policy.external_ips {
        // Anyone who may create a Service may write any address here (CVE-2020-8554): no
        // LoadBalancer controller vouches for it.
        if !wants_node_ports(service, policy)? {
            let reason = "spec.externalIPs is not used as a target unless the router's owner allows it (--allow-external-ips); waiting for a LoadBalancer address";
            return Ok((
                Vec::new(),
                vec![("spec.externalIPs".into(), reason.into())],
                false,
            ));
        }
    }
    if service.ingress_ips.is_empty() && (service.external_ips.is_empty() || !policy.external_ips) {
        if wants_node_ports(service, policy)? {
            return Ok(node_targets(policy));
        }
        if policy.node_ports == NodePorts::Off && service.target.as_deref() == Some("nodeports") {
            let field = format!("metadata.annotations[\"{}\"]", annotation::TARGET);
            let reason = "this router does not forward to node ports (--node-ports off); waiting for a LoadBalancer address";
            return Ok((Vec::new(), vec![(field, reason.into())], false));
        }
    }
    let (field, list) = if service.ingress_ips.is_empty() {
        ("spec.externalIPs", &service.external_ips)
    } else {
        ("status.loadBalancer.ingress", &service.ingress_ips)
    };
    let mut allowed = Vec::new();
    let mut refused = Vec::new();
    for (index, text) in list.iter().enumerate() {
        let field = if field == "spec.externalIPs" {
            format!("{field}[{index}]")
        } else {
            format!("{field}[{index}].ip")
        };
        let addr: IpAddr = text.parse().map_err(|_| {
            (
                field.clone(),
                format!("\"{}\" is not an IP address", printable(text)),
            )
        })?;
        match policy.check_target(addr) {
            Ok(()) => allowed.push(addr),
            Err(reason) => refused.push((field, reason)),
        }
    }
    allowed.sort_unstable();
    allowed.dedup();
    Ok((allowed, refused, false))
}

/// Whether a Service without a LoadBalancer address goes to its node ports: as the router's
/// owner allows (`--node-ports`) and the Service's target annotation asks.
fn wants_node_ports(service: &Service, policy: &Policy) -> Result<bool, (String, String)> {
    let asked = match service.target.as_deref().map(str::trim) {
        None => None,
        Some("nodeports") => Some(true),
        Some("loadbalancer") => Some(false),
        Some(other) => {
            return Err((
                format!("metadata.annotations[\"{}\"]", annotation::TARGET),
                format!("\"{}\" is not nodeports or loadbalancer", printable(other)),
            ));
        }
    };
    Ok(match policy.node_ports {
        NodePorts::Off => false,
        NodePorts::Annotated => asked == Some(true),
        NodePorts::All => asked != Some(false),
    })
}

/// The InternalIP addresses of the nodes that may take traffic (Ready, not excluded from
/// external load balancers, not being deleted), each checked against the policy. When no
/// node is Ready, those not excluded nor being deleted: readiness alone, which a partition
/// between the nodes and the control plane takes from all of them at once, never leaves a
/// forward with nowhere to go (as health checks never do).
fn node_targets(policy: &Policy) -> Targets {
    let ready = policy.nodes.values().any(|n| n.eligible());
    let mut allowed = Vec::new();
    let mut refused = Vec::new();
    let usable = |n: &&Node| n.eligible() || (!ready && !n.excluded && !n.deleting);
    for node in policy.nodes.values().filter(usable) {
        for text in &node.internal_ips {
            let field = format!("node {} InternalIP", printable(&node.name));
            match text.parse::<IpAddr>() {
                Ok(addr) => match policy.check_target(addr) {
                    Ok(()) => allowed.push(addr),
                    Err(reason) => refused.push((field, reason)),
                },
                Err(_) => refused.push((
                    field,
                    format!("\"{}\" is not an IP address", printable(text)),
                )),
            }
        }
    }
    allowed.sort_unstable();
    allowed.dedup();
    (allowed, refused, true)
}

/// Namespace, name, uid, port names and creationTimestamp reach the kernel (in element comments) and
/// the logs, so they must be what the API server allows, whatever a manifest says.
fn check_identity(service: &Service) -> Result<(), (String, String)> {
    if !is_dns_label(&service.namespace) {
        return Err((
            "metadata.namespace".to_owned(),
            format!(
                "\"{}\" is not a valid namespace",
                printable(&service.namespace)
            ),
        ));
    }
    if !is_dns_label(&service.name) {
        return Err((
            "metadata.name".to_owned(),
            format!(
                "\"{}\" is not a valid Service name",
                printable(&service.name)
            ),
        ));
    }
    if let Some(uid) = &service.uid {
        let ok = !uid.is_empty()
            && uid.len() <= 64
            && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err((
                "metadata.uid".to_owned(),
                format!("\"{}\" is not a valid uid", printable(uid)),
            ));
        }
    }
    // Port names reach element comments too; the API server takes only lowercase RFC 1123
    // labels, so anything else is a manifest it would have refused.
    for (index, port) in service.ports.iter().enumerate() {
        if let Some(name) = &port.name
            && !is_dns_label(name)
        {
            return Err((
                format!("spec.ports[{index}].name"),
                format!(
                    "\"{}\" is not a valid port name (lowercase letters, digits and '-', at most 63)",
                    printable(name)
                ),
            ));
        }
    }
    if let Some(created) = &service.created
        && !is_kubernetes_time(created)
    {
        return Err((
            "metadata.creationTimestamp".to_owned(),
            format!(
                "\"{}\" is not of the form 2006-01-02T15:04:05Z",
                printable(created)
            ),
        ));
    }
    Ok(())
}

/// Text from a Service as it may appear in a message: printable ASCII, at most 64 chars.
fn printable(text: &str) -> String {
    text.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::PolicyParts;
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
        let text =
            |f: &Forward| -> Vec<String> { f.backends.iter().map(|a| a.to_string()).collect() };
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
}
