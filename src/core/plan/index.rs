//! The plan kept up to date one change at a time: a change costs what it changes, not what
//! the cluster holds.
//!
//! Two indexes: by Service (what it resolved to, the ports it claims) and by external port
//! (who claims it). A Service's change resolves that Service again and settles only the
//! ports it claimed before or claims now; a holder's change settles its port; a policy
//! change resolves only the Services it can affect; a health check's change settles only
//! the ports whose backends it checks. [`plan_held`](super::plan_held) over the same
//! Services, policy and holders gives the same [`Plan`]: it is the oracle of the tests, and
//! the daemon's periodic resync compares the two.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::{Claim, Holders, Outcome, Plan, Resolved, State, holds, resolve, settle};
use crate::core::model::{Check, Forward, ForwardKey, Protocol};
use crate::core::policy::Policy;
use crate::core::service::Service;

/// A Service by namespace and name.
pub type Name = (String, String);

/// What changed since [`Planner::take_changes`] was last called.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Ports whose forward was added, changed or removed.
    pub forwards: BTreeSet<ForwardKey>,
    /// Services whose outcomes may have changed (or that left the plan).
    pub services: BTreeSet<Name>,
}

/// What the planner keeps of one Service: only what settling its ports and telling what a
/// policy change affects needs, not the Service itself.
#[derive(Debug)]
struct Entry {
    uid: Option<String>,
    created: Option<String>,
    resolved: Resolved,
    /// The addresses it names (LoadBalancer ingress, externalIPs), valid or not yet checked
    /// by the policy: a change of the router's own addresses affects only those naming one.
    addresses: Vec<IpAddr>,
    /// No LoadBalancer address: it may go to node ports, so the Nodes affect it.
    may_use_nodes: bool,
}

impl Entry {
    fn new(service: &Service, policy: &Policy) -> Entry {
        Entry {
            uid: service.uid.clone(),
            created: service.created.clone(),
            resolved: resolve(service, policy),
            addresses: service
                .ingress_ips
                .iter()
                .chain(&service.external_ips)
                .filter_map(|text| text.parse().ok())
                .collect(),
            may_use_nodes: service.ingress_ips.is_empty(),
        }
    }

    fn claim(&self, key: &ForwardKey) -> Option<&Claim> {
        self.resolved.claims.iter().find(|c| c.forward.key == *key)
    }

    fn keys(&self) -> impl Iterator<Item = ForwardKey> + '_ {
        self.resolved.claims.iter().map(|c| c.forward.key)
    }
}

/// The part of a policy change that can affect a Service, so that only those are resolved
/// again.
struct PolicyChange {
    /// A setting of the router's owner changed (they change only on restart): everything.
    everything: bool,
    namespaces: BTreeSet<String>,
    router_ports: BTreeSet<(Protocol, u16)>,
    router_addresses: BTreeSet<IpAddr>,
    nodes: bool,
}

impl PolicyChange {
    fn new(old: &Policy, new: &Policy) -> PolicyChange {
        fn changed<T: Ord + Clone>(a: &BTreeSet<T>, b: &BTreeSet<T>) -> BTreeSet<T> {
            a.symmetric_difference(b).cloned().collect()
        }
        PolicyChange {
            everything: old.namespaces != new.namespaces
                || old.namespace_selector != new.namespace_selector
                || old.ports != new.ports
                || old.targets != new.targets
                || old.external_ips != new.external_ips
                || old.explicit_ports != new.explicit_ports
                || old.node_ports != new.node_ports,
            namespaces: changed(&old.selected_namespaces, &new.selected_namespaces),
            router_ports: changed(&old.router_ports, &new.router_ports),
            router_addresses: changed(&old.router_addresses, &new.router_addresses),
            nodes: old.nodes != new.nodes,
        }
    }

    fn affects(&self, (namespace, _): &Name, entry: &Entry) -> bool {
        self.everything
            || self.namespaces.contains(namespace)
            || entry
                .resolved
                .requested
                .iter()
                .any(|port| self.router_ports.contains(port))
            || entry
                .addresses
                .iter()
                .any(|addr| self.router_addresses.contains(addr))
            || (entry.may_use_nodes && (self.nodes || !self.router_addresses.is_empty()))
    }
}

/// The plan of the Services given to it, kept current change by change, with the backends
/// the health checks hold down marked in its forwards and outcomes.
#[derive(Debug, Default)]
pub struct Planner {
    policy: Policy,
    holders: Holders,
    down: BTreeSet<Check>,
    services: BTreeMap<Name, Entry>,
    /// Who claims each port; the winner is chosen among them when the port is settled.
    claimants: BTreeMap<ForwardKey, BTreeSet<Name>>,
    forwards: BTreeMap<ForwardKey, Forward>,
    changes: Changes,
}

impl Planner {
    pub fn new(policy: Policy) -> Planner {
        Planner {
            policy,
            ..Planner::default()
        }
    }

    /// The forwards the router should carry.
    pub fn forwards(&self) -> &BTreeMap<ForwardKey, Forward> {
        &self.forwards
    }

    /// One Service's outcomes, in entry order; `None` when it is not planned.
    pub fn outcomes_of(&self, name: &Name) -> Option<&[Outcome]> {
        self.services
            .get(name)
            .map(|e| e.resolved.outcomes.as_slice())
    }

    /// Whether the Service, as the object of `uid`, has a forward in the plan.
    pub fn is_forwarding(&self, name: &Name, uid: &str) -> bool {
        self.services.get(name).is_some_and(|e| {
            e.uid.as_deref() == Some(uid)
                && e.resolved
                    .outcomes
                    .iter()
                    .any(|o| o.state == State::Forwarding)
        })
    }

    /// Every outcome, in the order of [`Plan::outcomes`].
    pub fn outcomes(&self) -> impl Iterator<Item = &Outcome> {
        self.services.values().flat_map(|e| &e.resolved.outcomes)
    }

    pub fn count(&self, state: State) -> usize {
        self.outcomes().filter(|o| o.state == state).count()
    }

    /// The whole plan, as [`plan_held`](super::plan_held) gives it with the backends down
    /// marked: costs what the plan holds, for the comparison with the oracle.
    pub fn plan(&self) -> Plan {
        Plan {
            outcomes: self
                .services
                .values()
                .flat_map(|e| e.resolved.outcomes.iter().cloned())
                .collect(),
            forwards: self.forwards.clone(),
        }
    }

    /// What changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// A Service that may forward (decoded, not being deleted, in scope) was added or
    /// changed. One without the mapping annotation is not planned.
    pub fn upsert(&mut self, service: &Service) {
        let name = (service.namespace.clone(), service.name.clone());
        if service.mapping.is_none() {
            self.remove(&name);
            return;
        }
        let entry = Entry::new(service, &self.policy);
        self.replace(name, Some(entry));
    }

    /// A Service may no longer forward (deleted, out of scope, terminating, not decodable).
    pub fn remove(&mut self, name: &Name) {
        if self.services.contains_key(name) {
            self.replace(name.clone(), None);
        }
    }

    /// Who holds each port now changed (an apply, or the kernel read after a restart).
    pub fn set_holders(&mut self, holders: &Holders) {
        if self.holders == *holders {
            return;
        }
        let changed: BTreeSet<ForwardKey> = self
            .holders
            .iter()
            .filter(|(key, uid)| holders.get(key) != Some(uid))
            .chain(
                holders
                    .iter()
                    .filter(|(key, uid)| self.holders.get(key) != Some(uid)),
            )
            .map(|(key, _)| *key)
            .collect();
        self.holders = holders.clone();
        for key in changed {
            self.settle_port(key);
        }
    }

    /// The health checks that find their backend down changed.
    pub fn set_down(&mut self, down: &BTreeSet<Check>) {
        if self.down == *down {
            return;
        }
        let changed: BTreeSet<Check> = self.down.symmetric_difference(down).copied().collect();
        self.down = down.clone();
        let affected: Vec<ForwardKey> = self
            .forwards
            .values()
            .filter(|f| f.checks().any(|check| changed.contains(&check)))
            .map(|f| f.key)
            .collect();
        for key in affected {
            self.settle_port(key);
        }
    }

    /// The policy changed (the router's addresses or ports, the Nodes, the namespaces the
    /// selector matches): the Services it can affect are resolved again, from `lookup`.
    pub fn set_policy<'a>(
        &mut self,
        policy: &Policy,
        lookup: impl Fn(&Name) -> Option<&'a Service>,
    ) {
        if self.policy == *policy {
            return;
        }
        let change = PolicyChange::new(&self.policy, policy);
        self.policy = policy.clone();
        let affected: Vec<Name> = self
            .services
            .iter()
            .filter(|(name, entry)| change.affects(name, entry))
            .map(|(name, _)| name.clone())
            .collect();
        for name in affected {
            match lookup(&name) {
                Some(service) => self.upsert(service),
                None => self.remove(&name),
            }
        }
    }

    /// Puts `entry` in the place of the Service's entry (or removes it), then settles every
    /// port it claimed before or claims now.
    fn replace(&mut self, name: Name, entry: Option<Entry>) {
        let mut ports: BTreeSet<ForwardKey> = BTreeSet::new();
        if let Some(old) = self.services.remove(&name) {
            for key in old.keys() {
                ports.insert(key);
                if let Some(names) = self.claimants.get_mut(&key) {
                    names.remove(&name);
                    if names.is_empty() {
                        self.claimants.remove(&key);
                    }
                }
            }
        }
        if let Some(entry) = entry {
            for key in entry.keys() {
                ports.insert(key);
                self.claimants.entry(key).or_default().insert(name.clone());
            }
            self.services.insert(name.clone(), entry);
        }
        self.changes.services.insert(name);
        for key in ports {
            self.settle_port(key);
        }
    }

    /// Chooses the winner of one port among its claimants, as the whole plan would, and
    /// writes every claimant's outcome and the port's forward.
    fn settle_port(&mut self, key: ForwardKey) {
        let Some(names) = self.claimants.get(&key) else {
            if self.forwards.remove(&key).is_some() {
                self.changes.forwards.insert(key);
            }
            return;
        };
        // The same order as the whole plan's rank: the namespace/name pair stands in for
        // the position in namespace/name order.
        let winner = names
            .iter()
            .min_by_key(|name| {
                let entry = &self.services[*name];
                (
                    !holds(entry.uid.as_ref(), &key, &self.holders),
                    entry.created.is_none(),
                    entry.created.as_deref().unwrap_or_default(),
                    *name,
                )
            })
            .cloned();
        let Some(winner) = winner else {
            return;
        };
        let entry = &self.services[&winner];
        let held = holds(entry.uid.as_ref(), &key, &self.holders);
        let Some(mut forward) = entry.claim(&key).map(|c| c.forward.clone()) else {
            return;
        };
        forward.down = forward
            .checks()
            .filter(|check| self.down.contains(check))
            .map(|(addr, _)| addr)
            .collect();
        for name in names.iter() {
            let Some(entry) = self.services.get_mut(name) else {
                continue;
            };
            let Resolved {
                outcomes, claims, ..
            } = &mut entry.resolved;
            let Some(claim) = claims.iter().find(|c| c.forward.key == key) else {
                continue;
            };
            let outcome = &mut outcomes[claim.outcome];
            let before = (
                outcome.state,
                outcome.reason.clone(),
                std::mem::take(&mut outcome.down),
            );
            let lost = (*name != winner).then_some((&forward.owner, held));
            settle(outcome, claim, lost);
            if lost.is_none() {
                outcome.down.clone_from(&forward.down);
            }
            if before != (outcome.state, outcome.reason.clone(), outcome.down.clone()) {
                self.changes.services.insert(name.clone());
            }
        }
        if self.forwards.get(&key) != Some(&forward) {
            self.forwards.insert(key, forward);
            self.changes.forwards.insert(key);
        }
    }
}
