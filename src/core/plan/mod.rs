//! From Services to forwards: resolve each annotation entry against the Service's ports and
//! addresses, then choose one winner per (family, protocol, external port).
//!
//! Pure: no clock, no I/O. The result is deterministic for a given set of Services, whatever
//! their order, so a restart arrives at the same forwards.

mod backends;
mod index;
#[cfg(test)]
mod index_tests;
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
pub use index::{Changes, Name, Planner};
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

/// What one Service asks for, resolved against the policy on its own: its outcomes as if
/// it won every port it claims, and those claims. Who wins a port is settled afterwards,
/// over the claims of every Service.
#[derive(Clone, Debug, Default)]
struct Resolved {
    outcomes: Vec<Outcome>,
    claims: Vec<Claim>,
    /// Every (protocol, external port) the Service's entries asked the policy for.
    requested: Vec<(Protocol, u16)>,
}

/// One port a Service claims: the forward it gets if it wins, and its outcome.
#[derive(Clone, Debug)]
struct Claim {
    outcome: usize,
    forward: Forward,
}

/// Whether a Service holds the port of `key` now.
fn holds(uid: Option<&String>, key: &ForwardKey, holders: &Holders) -> bool {
    uid.is_some_and(|uid| holders.get(key) == Some(uid))
}

/// Writes the winner's or a loser's outcome for a claim once its port is settled: `winner`
/// is `None` for the winner itself, else the owner that won and whether it held the port.
fn settle(outcome: &mut Outcome, claim: &Claim, winner: Option<(&Owner, bool)>) {
    match winner {
        None => {
            outcome.state = State::Forwarding;
            outcome.probe = claim.forward.probe;
            outcome.winner = None;
            outcome.reason = None;
        }
        Some((owner, held)) => {
            let why = if held {
                "it holds the port now"
            } else {
                "older, or first by namespace/name"
            };
            outcome.state = State::Conflict;
            outcome.probe = None;
            outcome.winner = Some(owner.service());
            outcome.reason = Some(format!(
                "external port {} is held by {} ({why})",
                claim.forward.key,
                owner.service()
            ));
        }
    }
}

/// Plans the forwards for a set of Services, no port held by anyone yet (offline).
pub fn plan<'a>(services: impl IntoIterator<Item = &'a Service>, policy: &Policy) -> Plan {
    plan_held(services, policy, &Holders::new())
}

/// Plans the forwards for a set of Services, the ports in `holders` staying with the
/// Services that hold them. Services without the mapping annotation are not part of the
/// plan. The whole plan at once: [`Planner`] keeps the same answer up to date one change
/// at a time, and this is its oracle.
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
    let mut resolved: Vec<Resolved> = services.iter().map(|s| resolve(s, policy)).collect();

    let mut candidates: Vec<(Rank, usize, usize)> = Vec::new();
    for (position, (service, resolved)) in services.iter().zip(&resolved).enumerate() {
        for (index, claim) in resolved.claims.iter().enumerate() {
            let rank = (
                !holds(service.uid.as_ref(), &claim.forward.key, holders),
                service.created.is_none(),
                service.created.as_deref().unwrap_or_default(),
                position,
            );
            candidates.push((rank, position, index));
        }
    }
    candidates.sort_unstable_by_key(|c| c.0);
    let mut forwards: BTreeMap<ForwardKey, Forward> = BTreeMap::new();
    let mut held: BTreeSet<ForwardKey> = BTreeSet::new();
    for (rank, position, index) in candidates {
        let Resolved {
            outcomes, claims, ..
        } = &mut resolved[position];
        let claim = &claims[index];
        let key = claim.forward.key;
        match forwards.get(&key) {
            Some(winner) => {
                let winner = (&winner.owner, held.contains(&key));
                settle(&mut outcomes[claim.outcome], claim, Some(winner));
            }
            None => {
                if !rank.0 {
                    held.insert(key);
                }
                settle(&mut outcomes[claim.outcome], claim, None);
                forwards.insert(key, claim.forward.clone());
            }
        }
    }
    let outcomes = resolved.into_iter().flat_map(|r| r.outcomes).collect();
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

/// Resolves one Service's entries against the policy, each claim as if it won its port.
fn resolve(service: &Service, policy: &Policy) -> Resolved {
    let mut resolved = Resolved::default();
    let Resolved {
        outcomes,
        claims,
        requested,
    } = &mut resolved;
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
        return resolved;
    }
    if service.service_type.as_deref() == Some("ExternalName") {
        let reason = "an ExternalName Service has no address to forward to";
        outcomes.push(outcome("spec.type", State::Invalid, Some(reason.into())));
        return resolved;
    }
    if let Err(reason) = policy.check_namespace(&service.namespace) {
        outcomes.push(outcome("metadata.namespace", State::Refused, Some(reason)));
        return resolved;
    }
    let (targets, node_ports) = match targets(service, policy) {
        Ok((allowed, refused, node_ports)) => {
            let all_refused = allowed.is_empty() && !refused.is_empty();
            for (field, reason) in refused {
                outcomes.push(outcome(&field, State::Refused, Some(reason)));
            }
            if all_refused {
                return resolved;
            }
            (allowed, node_ports)
        }
        Err((field, reason)) => {
            outcomes.push(outcome(&field, State::Invalid, Some(reason)));
            return resolved;
        }
    };
    let sources = match source_ranges(service) {
        Ok(sources) => sources,
        Err((field, reason)) => {
            // Fail closed: forwarding to every client is not what the Service asked for.
            outcomes.push(outcome(&field, State::Invalid, Some(reason)));
            return resolved;
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
            requested.push((protocol, external_port));
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
                claims.push(Claim {
                    outcome: outcomes.len(),
                    forward: Forward {
                        key,
                        probe: (backends.len() > 1)
                            .then(|| probe_of(protocol, number, &checks))
                            .flatten(),
                        backends,
                        port: number,
                        down: Vec::new(),
                        owner: owner(service, port),
                        sources: family_sources,
                    },
                });
                outcomes.push(Outcome {
                    key: Some(key),
                    backends: shown,
                    ..described(State::Forwarding, None)
                });
            }
        }
    }
    resolved
}
