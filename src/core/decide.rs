//! What the daemon should do, given the Services it has seen: which forwards to apply,
//! whose finalizer to add or release, and what to tell each Service. Pure: the daemon does
//! the I/O.

use std::collections::{BTreeMap, BTreeSet};

use crate::core::model::{Check, Target, targets_text};
use crate::core::plan::{self, Holders, Plan, Planner, State};
use crate::core::policy::Policy;
use crate::core::service::Service;
use crate::core::tracked::Tracked;

/// A Service by namespace and name.
pub type Key = (String, String);

/// The Services the daemon keeps, by namespace and name, and which of them changed since
/// the planner last looked: every change goes through [`Store::insert`] and
/// [`Store::remove`], so none is missed.
#[derive(Clone, Debug, Default)]
pub struct Store {
    services: BTreeMap<Key, Tracked>,
    changed: BTreeSet<Key>,
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    pub fn insert(&mut self, key: Key, tracked: Tracked) -> Option<Tracked> {
        self.changed.insert(key.clone());
        self.services.insert(key, tracked)
    }

    pub fn remove(&mut self, key: &Key) -> Option<Tracked> {
        let removed = self.services.remove(key);
        if removed.is_some() {
            self.changed.insert(key.clone());
        }
        removed
    }

    /// The Services changed since the last call.
    pub fn take_changed(&mut self) -> BTreeSet<Key> {
        std::mem::take(&mut self.changed)
    }
}

impl std::ops::Deref for Store {
    type Target = BTreeMap<Key, Tracked>;

    fn deref(&self) -> &Self::Target {
        &self.services
    }
}

impl Extend<(Key, Tracked)> for Store {
    fn extend<I: IntoIterator<Item = (Key, Tracked)>>(&mut self, items: I) {
        for (key, tracked) in items {
            self.insert(key, tracked);
        }
    }
}

impl IntoIterator for Store {
    type Item = (Key, Tracked);
    type IntoIter = std::collections::btree_map::IntoIter<Key, Tracked>;

    fn into_iter(self) -> Self::IntoIter {
        self.services.into_iter()
    }
}

impl<'a> IntoIterator for &'a Store {
    type Item = (&'a Key, &'a Tracked);
    type IntoIter = std::collections::btree_map::Iter<'a, Key, Tracked>;

    fn into_iter(self) -> Self::IntoIter {
        self.services.iter()
    }
}

impl FromIterator<(Key, Tracked)> for Store {
    fn from_iter<I: IntoIterator<Item = (Key, Tracked)>>(items: I) -> Store {
        let mut store = Store::new();
        store.extend(items);
        store
    }
}

/// The Service a tracked one asks to forward, if it may: decoded, not being deleted, still
/// watched.
pub fn eligible(tracked: &Tracked) -> Option<&Service> {
    if tracked.terminating || tracked.out_of_scope {
        return None;
    }
    tracked.service.as_ref().ok()
}

/// The whole plan of the Services in `store` that may forward, the backends down marked:
/// the oracle the daemon's [`Planner`] is checked against.
pub fn plan_of(store: &Store, policy: &Policy, holders: &Holders, down: &Down) -> Plan {
    let mut plan = plan::plan_held(store.values().filter_map(eligible), policy, holders);
    mark_down(&mut plan, down);
    plan
}

/// What one Service is told, in an event and in its condition. Published when it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// `True` when every entry forwards.
    pub status: &'static str,
    /// `Forwarded`, `PartlyForwarded`, `Conflict`, `Invalid` or `Waiting`.
    pub reason: &'static str,
    pub message: String,
    /// Whether the event is a Warning.
    pub warning: bool,
    /// How many backends of its forwards health checks hold down: a change of this alone
    /// is told at a limited rate.
    pub down: usize,
    /// What the Service is told of its upstream mappings and its DNS target, after the
    /// message; a change of these alone changes the condition, and has its own events.
    pub notes: Vec<String>,
}

impl Summary {
    /// The message with its notes, as the condition carries it.
    pub fn full_message(&self) -> String {
        let mut text = self.message.clone();
        for note in &self.notes {
            text.push_str("; ");
            text.push_str(note);
        }
        text
    }
}

/// The decision for one round.
#[derive(Debug, Default)]
pub struct Decision {
    /// Services whose forwards are in the plan and that lack this router's finalizer.
    pub add_finalizer: Vec<(String, String)>,
    /// Services that hold this router's finalizer but have no forward any more (deleted,
    /// annotation removed, no address, lost a conflict, not decodable).
    pub release: Vec<(String, String)>,
    pub summaries: BTreeMap<(String, String), Summary>,
}

/// The health checks that found their backend down.
pub type Down = BTreeSet<Check>;

/// Which Services need this router's finalizer added, and which released: decided again
/// only for the Services that changed, so a round costs what changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Finalizers {
    add: BTreeSet<Key>,
    release: BTreeSet<Key>,
}

impl Finalizers {
    /// Decides again for the Services in `keys` (changed in the store or in the plan).
    pub fn update<'a>(
        &mut self,
        store: &Store,
        finalizer: &str,
        planner: &Planner,
        keys: impl IntoIterator<Item = &'a Key>,
    ) {
        for key in keys {
            self.add.remove(key);
            self.release.remove(key);
            let Some(watched) = store.get(key) else {
                continue;
            };
            let forwards = planner.is_forwarding(key, watched.uid());
            let ours = watched.has_finalizer(finalizer);
            if forwards && !ours && !watched.terminating && !watched.out_of_scope {
                self.add.insert(key.clone());
            }
            if ours && !forwards {
                self.release.insert(key.clone());
            }
        }
    }
}

/// Decides from the plan of the Services that may forward (see [`eligible`]), the backends
/// down marked in it: whose finalizer to add or release (`finalizers`, decided again for
/// the Services in `changed`), and what each Service in `told` is told.
pub fn decide(
    store: &Store,
    finalizer: &str,
    planner: &Planner,
    finalizers: &mut Finalizers,
    changed: &BTreeSet<Key>,
    told: &BTreeSet<Key>,
) -> Decision {
    finalizers.update(store, finalizer, planner, changed);
    let mut decision = Decision {
        add_finalizer: finalizers.add.iter().cloned().collect(),
        release: finalizers.release.iter().cloned().collect(),
        summaries: BTreeMap::new(),
    };
    for key in told {
        if let Some(watched) = store.get(key)
            && let Err(error) = &watched.service
            && watched.annotated
            && !watched.terminating
            && !watched.out_of_scope
        {
            decision.summaries.insert(
                key.clone(),
                Summary {
                    status: "False",
                    reason: "Invalid",
                    message: format!("field {}: {}", error.field, error.message),
                    warning: true,
                    down: 0,
                    notes: Vec::new(),
                },
            );
        }
        if let Some(outcomes) = planner.outcomes_of(key).filter(|o| !o.is_empty()) {
            decision.summaries.insert(key.clone(), summarize(outcomes));
        }
    }
    decision
}

/// A planner holding the Services in `store` that may forward, with `holders` and `down`.
pub fn planner_of(store: &Store, policy: &Policy, holders: &Holders, down: &Down) -> Planner {
    let mut planner = Planner::new(policy.clone());
    planner.set_holders(holders);
    planner.set_down(down);
    for service in store.values().filter_map(eligible) {
        planner.upsert(service);
    }
    planner.take_changes();
    planner
}

/// Marks the backends whose checks are down, in the forwards and their outcomes.
pub fn mark_down(plan: &mut Plan, down: &Down) {
    for forward in plan.forwards.values_mut() {
        forward.down = forward
            .checks()
            .filter(|check| down.contains(check))
            .map(|(addr, _)| addr)
            .collect();
    }
    for outcome in &mut plan.outcomes {
        if outcome.state != State::Forwarding {
            continue;
        }
        if let Some(forward) = outcome.key.and_then(|key| plan.forwards.get(&key)) {
            outcome.down = forward.down.clone();
        }
    }
}

fn summarize(outcomes: &[plan::Outcome]) -> Summary {
    let count = |state| outcomes.iter().filter(|o| o.state == state).count();
    let (forwarding, conflict, invalid, waiting, refused) = (
        count(State::Forwarding),
        count(State::Conflict),
        count(State::Invalid),
        count(State::Waiting),
        count(State::Refused),
    );
    let lines: Vec<String> = outcomes
        .iter()
        .map(|o| match (o.state, o.key) {
            (State::Forwarding, Some(key)) if o.down.is_empty() => {
                format!("{key} -> {}", targets_text(o.backends.iter().copied()))
            }
            (State::Forwarding, Some(key)) => {
                let port = o.backends.first().map_or(0, |t| t.port);
                let down = o.down.iter().map(|&addr| Target { addr, port });
                let all = if o.down.len() == o.backends.len() {
                    ", all down: forwarding to all"
                } else {
                    ""
                };
                format!(
                    "{key} -> {} (down: {}{all})",
                    targets_text(o.backends.iter().copied()),
                    targets_text(down)
                )
            }
            _ => format!(
                "\"{}\": {}",
                o.entry,
                o.reason.as_deref().unwrap_or_default()
            ),
        })
        .collect();
    let (status, reason) = match () {
        _ if refused > 0 && forwarding == 0 => ("False", "Refused"),
        _ if invalid > 0 && forwarding == 0 => ("False", "Invalid"),
        _ if conflict > 0 && forwarding == 0 => ("False", "Conflict"),
        _ if waiting > 0 && forwarding == 0 => ("False", "Waiting"),
        _ if invalid + conflict + waiting + refused > 0 => ("False", "PartlyForwarded"),
        _ if outcomes.iter().any(|o| !o.down.is_empty()) => ("True", "BackendsDown"),
        _ => ("True", "Forwarded"),
    };
    Summary {
        status,
        reason,
        message: lines.join("; "),
        warning: invalid + conflict + refused > 0 || reason == "BackendsDown",
        down: outcomes.iter().map(|o| o.down.len()).sum(),
        notes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn watched(
        name: &str,
        uid: &str,
        mapping: Option<&str>,
        finalizers: &[&str],
        deleting: bool,
    ) -> (String, String, Tracked) {
        let mut annotations = json!({});
        if let Some(mapping) = mapping {
            annotations[crate::core::annotation::MAPPING] = json!(mapping);
        }
        let mut value = json!({
            "metadata": {"name": name, "namespace": "ns", "uid": uid, "finalizers": finalizers,
                "annotations": annotations, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"ports": [{"name": "http", "port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}}
        });
        if deleting {
            value["metadata"]["deletionTimestamp"] = json!("2026-01-02T00:00:00Z");
        }
        ("ns".into(), name.into(), Tracked::from_value(value))
    }

    fn store(services: Vec<(String, String, Tracked)>) -> Store {
        services
            .into_iter()
            .map(|(ns, n, t)| ((ns, n), t))
            .collect()
    }

    const F: &str = "kube-port-forward-controller/finalizer";

    fn decided(s: &Store, down: &Down) -> (Decision, Planner) {
        let planner = planner_of(s, &Policy::default(), &Holders::new(), down);
        let every: BTreeSet<Key> = s.keys().cloned().collect();
        let mut finalizers = Finalizers::default();
        let d = decide(s, F, &planner, &mut finalizers, &every, &every);
        (d, planner)
    }

    #[test]
    fn finalizer_follows_live_forwards() {
        let s = store(vec![
            watched("new", "u1", Some("http"), &[], false),
            watched("kept", "u2", Some("8080:http"), &[F], false),
            watched(
                "gone",
                "u3",
                Some("8081:http"),
                &[F, "other/router-b"],
                true,
            ),
            watched("unannotated", "u4", None, &[F], false),
            watched("plain", "u5", None, &[], false),
        ]);
        let (d, planned) = decided(&s, &Down::new());
        assert_eq!(planned.forwards().len(), 2);
        assert_eq!(d.add_finalizer, vec![("ns".into(), "new".into())]);
        assert_eq!(
            d.release,
            vec![
                ("ns".into(), "gone".into()),
                ("ns".into(), "unannotated".into())
            ]
        );
    }

    #[test]
    fn the_loser_of_a_conflict_releases_and_is_warned() {
        let s = store(vec![
            watched("a", "u1", Some("http"), &[F], false),
            watched("b", "u2", Some("http"), &[F], false),
        ]);
        let (d, _) = decided(&s, &Down::new());
        assert_eq!(d.release, vec![("ns".into(), "b".into())]);
        let summary = &d.summaries[&("ns".into(), "b".into())];
        assert_eq!(
            (summary.status, summary.reason, summary.warning),
            ("False", "Conflict", true)
        );
        assert!(
            summary.message.contains("held by ns/a"),
            "{}",
            summary.message
        );
        assert_eq!(d.summaries[&("ns".into(), "a".into())].reason, "Forwarded");
    }

    #[test]
    fn another_routers_finalizer_is_not_ours() {
        let s = store(vec![watched(
            "x",
            "u1",
            Some("http"),
            &["other/router-b"],
            false,
        )]);
        let (d, _) = decided(&s, &Down::new());
        assert_eq!(d.add_finalizer.len(), 1);
        assert!(d.release.is_empty());
    }

    #[test]
    fn undecodable_annotated_services_are_reported_and_released() {
        let mut bad = watched("bad", "u9", Some("http"), &[F], false);
        bad.2.service = Err(crate::core::service::DecodeError {
            object: "ns/bad".into(),
            field: "spec.ports".into(),
            message: "invalid type".into(),
        });
        let s = store(vec![bad, watched("good", "u1", Some("http"), &[], false)]);
        let (d, planned) = decided(&s, &Down::new());
        assert_eq!(planned.forwards().len(), 1);
        assert_eq!(d.release, vec![("ns".into(), "bad".into())]);
        assert!(d.summaries[&("ns".into(), "bad".into())].warning);
    }

    #[test]
    fn down_backends_are_marked_and_told_and_all_down_keeps_them_all() {
        let mut w = watched("web", "u1", Some("http"), &[], false);
        if let Ok(service) = &mut w.2.service {
            service.ingress_ips = vec!["10.0.0.1".into(), "10.0.0.2".into()];
        }
        let s = store(vec![w]);
        let key = ("ns".to_owned(), "web".to_owned());
        let (healthy, planned) = decided(&s, &Down::new());
        assert_eq!(healthy.summaries[&key].reason, "Forwarded");
        let forward = planned.forwards().values().next().unwrap();
        let checks: Vec<Check> = forward.checks().collect();
        assert_eq!(checks.len(), 2);
        let one: Down = checks[..1].iter().copied().collect();
        let (d, planned) = decided(&s, &one);
        let summary = &d.summaries[&key];
        assert_eq!((summary.status, summary.reason), ("True", "BackendsDown"));
        assert!(summary.warning);
        assert!(
            summary.message.contains("(down: 10.0.0.1:80)"),
            "{}",
            summary.message
        );
        let forward = planned.forwards().values().next().unwrap();
        assert_eq!(forward.down, vec![checks[0].0]);
        assert_eq!(forward.choice(), vec![checks[1].0]);
        let all: Down = checks.iter().copied().collect();
        let (d, planned) = decided(&s, &all);
        assert!(
            d.summaries[&key]
                .message
                .contains("all down: forwarding to all")
        );
        assert_eq!(
            planned.forwards().values().next().unwrap().choice().len(),
            2
        );
    }
}
