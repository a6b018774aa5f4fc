//! The daemon's side of the health checks: which checks run (those of the forwards in the
//! plan), which backends are down, and what a change of state does: the next round takes
//! the backend out of (or back into) its forwards' choice, and the audit trail says so.

use std::collections::BTreeMap;

use kube::runtime::events::EventType;
use tokio::time::Instant;

use super::Daemon;
use super::reconcile::HEALTH_EVENTS;
use crate::cluster::Key;
use crate::cluster::lane::Round;
use crate::core::model::Check;

impl Daemon {
    /// Runs the checks of the planned forwards, each new one starting in the state the
    /// daemon knows (down if recorded so), and forgets the state of checks no longer run.
    pub(super) fn follow_checks(&mut self) {
        let wanted: BTreeMap<Check, bool> = self
            .planner
            .forwards()
            .values()
            .flat_map(|f| f.checks())
            .map(|check| (check, !self.down.contains(&check)))
            .collect();
        self.down.retain(|check| wanted.contains_key(check));
        self.prober.set(wanted);
    }

    /// A backend changed state: recorded, logged for the audit trail; `true` when a forward
    /// uses it, so the caller reconciles.
    pub(super) fn health_changed(&mut self, check: Check, up: bool, detail: &str) -> bool {
        let changed = if up {
            self.down.remove(&check)
        } else {
            self.down.insert(check)
        };
        if !changed {
            return false;
        }
        let (addr, probe) = check;
        let users: Vec<(Key, String)> = self
            .engine
            .as_ref()
            .and_then(|e| e.applied())
            .map(|applied| {
                applied
                    .forwards
                    .values()
                    .filter(|f| f.checks().any(|c| c == check))
                    .map(|f| {
                        let service = (f.owner.namespace.clone(), f.owner.name.clone());
                        (service, format!("{} of {}", f.key, f.owner))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let forwards: Vec<&str> = users.iter().map(|(_, f)| f.as_str()).collect();
        let state = if up { "up" } else { "down" };
        tracing::warn!(
            action = "backend",
            state,
            backend = %addr,
            probe = %probe,
            detail,
            forwards = %forwards.join(", "),
            "backend {state}"
        );
        // One event per Service, at most every HEALTH_EVENTS; repeats of one reason become
        // a series of one event.
        let now = Instant::now();
        let mut told: BTreeMap<Key, Vec<&str>> = BTreeMap::new();
        for (service, forward) in &users {
            told.entry(service.clone()).or_default().push(forward);
        }
        let mut round = Round::default();
        for (service, forwards) in told {
            if self
                .health_events
                .get(&service)
                .is_some_and(|at| now < *at + HEALTH_EVENTS)
            {
                continue;
            }
            self.health_events.insert(service.clone(), now);
            let (type_, reason) = if up {
                (EventType::Normal, "BackendUp")
            } else {
                (EventType::Warning, "BackendDown")
            };
            let note = format!(
                "backend {addr} ({probe}) of {} is {state} on router {}: {detail}",
                forwards.join(", "),
                self.settings.instance
            );
            self.event(&service, type_, reason, "Check", note, &mut round);
        }
        self.health_events.retain(|_, at| now < *at + HEALTH_EVENTS);
        self.send(round);
        true
    }
}
