//! From Services to forwards: resolve each annotation entry against the Service's ports and
//! addresses, then choose one winner per (family, protocol, external port).
//!
//! Pure: no clock, no I/O. The result is deterministic for a given set of Services, whatever
//! their order, so a restart arrives at the same forwards.

mod backends;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::core::annotation;
use crate::core::model::{Family, Forward, ForwardKey, Owner, Probe, Protocol, Target};
use crate::core::policy::Policy;
use crate::core::service::{Service, ServicePort};
use backends::{Checks, health_checks, probe_of, source_ranges, targets};
use validate::{check_identity, printable, select_ports};

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
