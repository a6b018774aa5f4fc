//! One round of the daemon: the kernel lane applies what the core decided; the finalizer
//! changes the kernel now allows, the conditions that changed and the events go to the
//! cluster lane, which writes them without holding up the next round.

use std::collections::BTreeSet;
use std::time::Duration;

use kube::runtime::events::EventType;
use tokio::time::Instant;

use super::{Daemon, DaemonError};
use crate::cluster::Key;
use crate::cluster::lane::{Kind, Round, Work};
use crate::cluster::report::{changes_by_service, condition_of};
use crate::core::decide::{self, Decision, Summary};
use crate::core::plan::Holders;
use crate::core::status;
use crate::kernel::{Applied, Engine, Kernel, Ruleset};
use crate::router::audit;

/// A Service is told of its backends' health at most this often, in its condition and in
/// events each.
pub(super) const HEALTH_EVENTS: Duration = Duration::from_secs(30);

/// The status file is built again at most this often while changes keep coming.
const STATUS_EVERY: Duration = Duration::from_secs(1);

impl Daemon {
    /// One round: apply, then hand finalizers, events and conditions to the cluster lane.
    /// Returns when to try again if something is left to do. Unless `force`d, forwards equal
    /// to those applied last are not sent again: most events (the daemon's own finalizer and
    /// condition writes among them) change no forward.
    pub(super) async fn reconcile(&mut self, force: bool) -> Result<Option<Duration>, DaemonError> {
        if !self.holders_known {
            self.learn_holders().await?;
        }
        let holders = self
            .engine
            .as_ref()
            .map(|e| e.holders().clone())
            .unwrap_or_default();
        if let Some(recorded) = self.kernel_down.take() {
            // The backends the table recorded as down before a restart stay down until their
            // checks pass, so a restart does not send clients to a dead backend.
            self.decide(&holders);
            for forward in self.planner.forwards().values() {
                self.down.extend(
                    forward
                        .checks()
                        .filter(|(addr, _)| recorded.contains(&(forward.key, *addr))),
                );
            }
        }
        let mut decision = self.decide(&holders);
        // A port is never opened over a socket the router listens on: its sockets are read
        // again right before, and a service started since the last read wins.
        if self.opens_ports() && self.follow_served_ports() {
            decision = self.decide(&holders);
        }
        self.follow_checks();
        // A cleanup deadline runs only while the Service waits for its release: one that is
        // asked for again, or was released, starts afresh next time.
        let releasing: BTreeSet<&str> = decision
            .release
            .iter()
            .filter_map(|k| self.store.get(k).map(|t| t.uid()))
            .collect();
        self.cleanup_since
            .retain(|uid, _| releasing.contains(uid.as_str()));
        let unchanged = !force
            && self
                .engine
                .as_ref()
                .and_then(Engine::applied)
                .is_some_and(|applied| {
                    applied.forwards == *self.planner.forwards()
                        && applied.config == self.settings.table
                });
        let ruleset = Ruleset::new(self.settings.table.clone(), self.planner.forwards().clone());
        let started = std::time::Instant::now();
        let result = if unchanged {
            Ok(Applied::default())
        } else {
            self.with_engine(move |engine| engine.apply(ruleset))
                .await?
        };
        self.progress();
        let mut round = Round::default();
        let applied = match result {
            Ok(applied) => applied,
            Err(error) => {
                {
                    let mut metrics = self.lock_metrics();
                    metrics.apply_errors += 1;
                    metrics.applying = false;
                    metrics
                        .failing_since
                        .get_or_insert_with(std::time::Instant::now);
                }
                self.failures += 1;
                tracing::error!(%error, "applying the table failed; retrying");
                let note = format!("removing this Service's forwards failed: {error}");
                for key in &decision.release {
                    if self.cleanup_overdue(key) {
                        self.release_anyway(key, &mut round);
                    } else {
                        self.warn(key, "CleanupFailed", note.clone(), &mut round);
                    }
                }
                self.send(round);
                let wait = self.backoff();
                return Ok(Some(error.held_for().map_or(wait, |held| held.max(wait))));
            }
        };
        if self.failures > 0 {
            tracing::info!(
                failed = self.failures,
                "the table is in step again after failed applies"
            );
        }
        self.failures = 0;
        {
            let mut metrics = self.lock_metrics();
            metrics.applied(started.elapsed(), applied.sent, |state| {
                self.planner.count(state)
            });
            metrics.flows_closed += applied.flows_closed as u64;
        }
        if std::mem::take(&mut self.verify_outside_change) && applied.sent {
            self.lock_metrics().table_restores += 1;
            tracing::warn!(
                action = "restore",
                table = %self.settings.table.table,
                "the table was changed from outside (firewall restart, nft flush?); restored"
            );
        }
        audit::record(&self.settings.table.table, &applied);
        if !self.ready {
            self.ready = true;
            tracing::info!(
                services = self.store.len(),
                forwards = self.planner.forwards().len(),
                "ready: first complete list seen and first apply done"
            );
            let _ = sd_notify::notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status("forwarding"),
            ]);
        }
        // Upstream mappings follow the forwards; DNS targets and what the IGD said are
        // worked out for each Service.
        let upstream_wanted = self.want_upstream();
        let mut beyond = self.beyond(&mut round);
        // The status file follows the outcomes and the DNS targets. Building it costs what
        // the plan holds, so it is built only when one of them changed, and during a burst
        // of changes at most every STATUS_EVERY: the round comes back for the rest.
        let mut retry: Option<Duration> = None;
        if let Some(writer) = self.status.as_mut() {
            self.status_stale |=
                writer.empty() || !self.untold.is_empty() || beyond.dns_targets != self.status_dns;
            let since = self.status_built.map(|at| at.elapsed());
            match since {
                Some(since) if self.status_stale && since < STATUS_EVERY => {
                    retry = Some(STATUS_EVERY - since);
                }
                _ if self.status_stale => {
                    writer.update(status::entries(
                        self.planner.outcomes(),
                        &beyond.dns_targets,
                    ));
                    self.status_dns.clone_from(&beyond.dns_targets);
                    self.status_stale = false;
                    self.status_built = Some(Instant::now());
                }
                _ => {}
            }
        }
        // Finalizers first: a deleted Service waits on the release, events wait on nobody.
        // A Service whose DNS target or upstream mappings are still there waits for them
        // (up to the cleanup deadline).
        let mut releasable = Vec::new();
        for key in &decision.release {
            let upstream = upstream_wanted
                .as_ref()
                .is_some_and(|wanted| self.upstream_open(key, wanted));
            if !upstream && !beyond.dns_pending.contains(key) {
                releasable.push(key.clone());
                continue;
            }
            if self.cleanup_overdue(key) {
                self.release_anyway(key, &mut round);
                continue;
            }
            if upstream && !self.upstream_reachable() {
                self.warn(
                    key,
                    "CleanupPending",
                    "the IGD in front of the router does not answer: this Service's upstream mappings are deleted when it does, and its finalizer released then or at the cleanup deadline".into(),
                    &mut round,
                );
            }
            let left = self.cleanup_left(key);
            retry = Some(retry.map_or(left, |r| r.min(left)));
        }
        if !releasable.is_empty() {
            let wait = self.release(&releasable, &applied, &mut round).await?;
            retry = match (retry, wait) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        for key in &decision.add_finalizer {
            self.hand_over(key, Kind::AddFinalizer, &mut round);
        }
        // Changes handed over earlier that no Service needs any more.
        let needed: BTreeSet<&Key> = decision
            .add_finalizer
            .iter()
            .chain(&decision.release)
            .collect();
        let unneeded: Vec<Key> = self
            .handed
            .keys()
            .filter(|k| !needed.contains(k))
            .cloned()
            .collect();
        for key in unneeded {
            self.handed.remove(&key);
            round.finalizers.push((key, None));
        }
        self.report_changes(&applied, &mut round);
        let now = Instant::now();
        let mut summaries = decision.summaries;
        // A Service whose outcomes did not change may still have new notes (its upstream
        // mappings, its DNS target): told from what it was told last.
        for (key, previous) in &self.published {
            let notes = beyond.notes.get(key).map_or(&[][..], Vec::as_slice);
            if previous.notes != notes && !summaries.contains_key(key) {
                summaries.insert(key.clone(), previous.clone());
            }
        }
        // Told below, or held back and told again next time.
        self.untold.clear();
        for (key, mut summary) in summaries {
            summary.notes = beyond.notes.remove(&key).unwrap_or_default();
            let Some(previous) = self.published.get(&key) else {
                self.publish(&key, &summary, true, &mut round);
                self.published.insert(key, summary);
                continue;
            };
            if *previous == summary {
                continue;
            }
            // A backend going down or coming back changes the forwards at once, and the
            // condition at most every HEALTH_EVENTS per Service, with the state of that
            // moment: a flapping backend does not patch the Service at every probe. Its
            // events are the health checks' own (`BackendDown`, `BackendUp`).
            let health_only = summary.down != previous.down;
            // Notes (upstream mappings, DNS target) changed alone: the condition follows;
            // their events are their own.
            let notes_only = !health_only
                && Summary {
                    notes: previous.notes.clone(),
                    ..summary.clone()
                } == *previous;
            if notes_only {
                self.publish(&key, &summary, false, &mut round);
                self.published.insert(key, summary);
                continue;
            }
            if health_only {
                if let Some(at) = self.health_told.get(&key)
                    && now < *at + HEALTH_EVENTS
                {
                    let wait = *at + HEALTH_EVENTS - now;
                    retry = Some(retry.map_or(wait, |r: Duration| r.min(wait)));
                    self.untold.insert(key);
                    continue;
                }
                self.health_told.insert(key.clone(), now);
            }
            self.publish(&key, &summary, !health_only, &mut round);
            self.published.insert(key, summary);
        }
        self.health_told
            .retain(|key, at| self.store.contains_key(key) && now < *at + HEALTH_EVENTS);
        for key in std::mem::take(&mut self.gone) {
            if !self.store.contains_key(&key) {
                self.published.remove(&key);
            }
        }
        self.send(round);
        Ok(retry)
    }

    /// What the core decides from the Services, the policy, who holds which port and which
    /// backends are down.
    /// Brings the planner up to date with what changed (Services, policy, holders, the
    /// backends down), then decides from its plan. At a resync, the planner's plan is
    /// compared with the whole plan worked out afresh; a difference would be a bug, and is
    /// logged and repaired.
    fn decide(&mut self, holders: &Holders) -> Decision {
        let store = &self.store;
        self.planner.set_policy(&self.settings.policy, |key| {
            store.get(key).and_then(decide::eligible)
        });
        let mut changed = self.store.take_changed();
        for key in &changed {
            match self.store.get(key) {
                Some(tracked) => match decide::eligible(tracked) {
                    Some(service) => self.planner.upsert(service),
                    None => self.planner.remove(key),
                },
                None => {
                    self.planner.remove(key);
                    self.gone.insert(key.clone());
                }
            }
        }
        self.planner.set_holders(holders);
        self.planner.set_down(&self.down);
        changed.extend(self.planner.take_changes().services);
        self.untold.extend(changed.iter().cloned());
        if std::mem::take(&mut self.audit_plan) {
            self.lock_metrics().plan_checks += 1;
            let policy = &self.settings.policy;
            let whole = decide::plan_of(&self.store, policy, holders, &self.down);
            let planned = self.planner.plan();
            if whole != planned {
                let forwards = whole
                    .forwards
                    .keys()
                    .chain(planned.forwards.keys())
                    .filter(|key| whole.forwards.get(key) != planned.forwards.get(key))
                    .collect::<BTreeSet<_>>()
                    .len();
                tracing::warn!(
                    forwards,
                    outcomes_planned = planned.outcomes.len(),
                    outcomes_whole = whole.outcomes.len(),
                    "the incremental plan differed from the whole plan; planning afresh (a bug: please report it)"
                );
                self.lock_metrics().plan_repairs += 1;
                self.planner = decide::planner_of(&self.store, policy, holders, &self.down);
                changed.extend(self.store.keys().cloned());
                self.untold.extend(self.store.keys().cloned());
            }
        }
        decide::decide(
            &self.store,
            &self.settings.finalizer,
            &self.planner,
            &mut self.finalizers,
            &changed,
            &self.untold,
        )
    }

    /// Whether the plan has a forward on a port the table does not forward now (or the
    /// table is not known).
    fn opens_ports(&self) -> bool {
        let applied = self.engine.as_ref().and_then(Engine::applied);
        self.planner
            .forwards()
            .keys()
            .any(|key| applied.is_none_or(|applied| !applied.forwards.contains_key(key)))
    }

    /// Hands a round to the cluster lane.
    pub(super) fn send(&mut self, round: Round) {
        if round.is_empty() {
            return;
        }
        {
            let mut metrics = self.lock_metrics();
            metrics.bookkeeping_queued += round.finalizers.len() + round.reports.len();
            metrics.bookkeeping_idle = false;
        }
        self.lane.send(round);
    }

    /// Hands a finalizer change for a Service to the lane, unless the same change, for the
    /// Service as it is now, already was.
    pub(super) fn hand_over(&mut self, key: &Key, kind: Kind, round: &mut Round) {
        let Some(tracked) = self.store.get(key) else {
            return;
        };
        let handed = (kind, tracked.finalizers.clone());
        if self.handed.get(key) == Some(&handed) {
            return;
        }
        let work = match kind {
            Kind::Release => Work::Release(tracked.finalizers.clone()),
            _ => Work::AddFinalizer(tracked.finalizers.clone()),
        };
        self.handed.insert(key.clone(), handed);
        round.finalizers.push((key.clone(), Some(work)));
    }

    /// Services whose finalizers or conditions changed, nothing the plan depends on: adds
    /// this router's finalizer where it forwards and lacks it (someone removed it, or a
    /// guarded add met a list changed meanwhile). One held without forwarding waits for the
    /// next full round, which checks the kernel first.
    pub(super) fn recheck(&mut self, keys: BTreeSet<Key>) {
        let mut round = Round::default();
        self.recheck_dns(&keys, &mut round);
        for key in keys {
            let Some(tracked) = self.store.get(&key) else {
                continue;
            };
            let wants = self.planner.is_forwarding(&key, tracked.uid())
                && !tracked.has_finalizer(&self.settings.finalizer)
                && !tracked.terminating
                && !tracked.out_of_scope;
            if wants {
                self.hand_over(&key, Kind::AddFinalizer, &mut round);
            } else if tracked.has_finalizer(&self.settings.finalizer)
                && self
                    .handed
                    .get(&key)
                    .is_some_and(|(k, _)| *k == Kind::AddFinalizer)
            {
                self.handed.remove(&key);
            }
        }
        self.send(round);
    }

    /// Who holds which port, from the kernel's owner comments: read once, before the first
    /// decision; the engine keeps it current from then on. A failed read is retried.
    async fn learn_holders(&mut self) -> Result<(), DaemonError> {
        let config = self.settings.table.clone();
        match self
            .with_engine(move |engine| engine.learn_holders(&config))
            .await?
        {
            Ok(down) => {
                self.holders_known = true;
                self.kernel_down = Some(down);
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read who holds which port; the apply will say more")
            }
        }
        Ok(())
    }

    fn backoff(&self) -> Duration {
        Duration::from_millis(200 * 2u64.pow(self.failures.min(8)))
    }

    /// Runs `f` with the engine on a blocking thread (it spawns `nft`).
    async fn with_engine<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Engine<Kernel>) -> T + Send + 'static,
    ) -> Result<T, DaemonError> {
        let mut engine = self.engine.take().ok_or(DaemonError::Worker)?;
        let (engine, result) = tokio::task::spawn_blocking(move || {
            let result = f(&mut engine);
            (engine, result)
        })
        .await
        .map_err(|_| DaemonError::Worker)?;
        self.engine = Some(engine);
        Ok(result)
    }

    /// Releases finalizers of Services whose forwards are verified gone from the kernel.
    async fn release(
        &mut self,
        keys: &[Key],
        applied: &Applied,
        round: &mut Round,
    ) -> Result<Option<Duration>, DaemonError> {
        // Fast path: every Service released had its forwards removed by this round's
        // transaction, which the kernel acknowledged whole (or read back, after a rebuild).
        // Otherwise, read the table and look for their uids.
        let uids: BTreeSet<String> = keys
            .iter()
            .filter_map(|k| self.store.get(k).map(|t| t.uid.clone()))
            .collect();
        let removed_uids: BTreeSet<&str> = applied
            .removed
            .iter()
            .filter_map(|r| r.uid.as_deref())
            .collect();
        if uids.iter().all(|u| removed_uids.contains(u.as_str())) {
            for key in keys {
                self.release_now(key, round);
            }
            return Ok(None);
        }
        let config = self.settings.table.clone();
        let read = self
            .with_engine(move |engine| engine.read(&config.table.clone(), Some(&config)))
            .await?;
        let present: BTreeSet<String> = match read {
            Ok(table) => table.map(|t| t.owner_uids()).unwrap_or_default(),
            Err(error) => {
                tracing::error!(%error, "cannot read the table to verify cleanup");
                return Ok(Some(self.backoff()));
            }
        };
        let mut retry = None;
        for key in keys {
            let Some(uid) = self.store.get(key).map(|w| w.uid().to_owned()) else {
                continue;
            };
            if !present.contains(&uid) {
                self.release_now(key, round);
                continue;
            }
            if self.cleanup_overdue(key) {
                self.release_anyway(key, round);
            } else {
                self.warn(
                    key,
                    "CleanupPending",
                    "this Service's forwards are still in the router's table; retrying".into(),
                    round,
                );
                retry = Some(self.backoff());
            }
        }
        Ok(retry)
    }

    fn release_now(&mut self, key: &Key, round: &mut Round) {
        if let Some(tracked) = self.store.get(key) {
            self.cleanup_since.remove(tracked.uid());
            self.hand_over(key, Kind::Release, round);
        }
    }

    /// Whether a Service's cleanup has been failing for longer than the deadline, counted
    /// from the first failure seen.
    fn cleanup_overdue(&mut self, key: &Key) -> bool {
        let Some(uid) = self.store.get(key).map(|t| t.uid.clone()) else {
            return false;
        };
        let since = *self.cleanup_since.entry(uid).or_insert_with(Instant::now);
        since.elapsed() >= self.settings.cleanup_deadline
    }

    /// How long until a Service's cleanup is overdue (counted from the first wait seen).
    fn cleanup_left(&mut self, key: &Key) -> Duration {
        let Some(uid) = self.store.get(key).map(|t| t.uid.clone()) else {
            return self.settings.cleanup_deadline;
        };
        let since = *self.cleanup_since.entry(uid).or_insert_with(Instant::now);
        self.settings
            .cleanup_deadline
            .saturating_sub(since.elapsed())
            .max(Duration::from_millis(100))
    }

    fn release_anyway(&mut self, key: &Key, round: &mut Round) {
        let uid = self
            .store
            .get(key)
            .map(|t| t.uid.clone())
            .unwrap_or_default();
        tracing::error!(
            action = "release-anyway",
            namespace = %key.0,
            name = %key.1,
            uid = %uid,
            "cleanup kept failing past the deadline; releasing the finalizer anyway: forwards owned by this uid may remain until an apply succeeds"
        );
        self.warn(
            key,
            "CleanupAbandoned",
            "cleanup kept failing past the deadline; the finalizer is released and the router keeps retrying".into(),
            round,
        );
        self.release_now(key, round);
    }

    /// Normal events for forwards opened and closed, one per Service.
    fn report_changes(&self, applied: &Applied, round: &mut Round) {
        let instance = &self.settings.instance;
        for (key, (opened, closed)) in changes_by_service(applied, &self.store) {
            if !opened.is_empty() {
                let note = format!("opened on router {instance}: {}", opened.join(", "));
                self.event(
                    &key,
                    EventType::Normal,
                    "PortsOpened",
                    "Forward",
                    note,
                    round,
                );
            }
            if !closed.is_empty() {
                let note = format!("closed on router {instance}: {}", closed.join(", "));
                self.event(
                    &key,
                    EventType::Normal,
                    "PortsClosed",
                    "Forward",
                    note,
                    round,
                );
            }
        }
    }

    fn warn(&self, key: &Key, reason: &'static str, note: String, round: &mut Round) {
        self.event(key, EventType::Warning, reason, "Forward", note, round);
    }

    pub(super) fn event(
        &self,
        key: &Key,
        type_: EventType,
        reason: &'static str,
        action: &'static str,
        note: String,
        round: &mut Round,
    ) {
        let Some(tracked) = self.store.get(key) else {
            return;
        };
        let event = Work::Event {
            uid: tracked.uid.clone(),
            type_,
            reason,
            action,
            note,
        };
        round.reports.push((key.clone(), event));
    }

    /// The event and this router's condition for a Service whose summary changed. Nothing
    /// when the Service already carries that condition (after a restart, say): events say
    /// what changed, not that nothing did.
    /// `event`: false for a change of backends' health alone, told by its own events.
    fn publish(&self, key: &Key, summary: &Summary, event: bool, round: &mut Round) {
        let Some(tracked) = self.store.get(key) else {
            return;
        };
        let wanted = condition_of(
            &self.settings.condition_type,
            &self.settings.instance,
            summary,
        );
        if tracked.condition(&wanted.type_) == Some(&wanted) {
            return;
        }
        if !event {
            round
                .reports
                .push((key.clone(), Work::Condition(summary.clone())));
            return;
        }
        let type_ = if summary.warning {
            // Refusals, conflicts and bad entries are part of the audit trail too.
            tracing::warn!(
                action = "refuse",
                namespace = %key.0,
                name = %key.1,
                reason = summary.reason,
                detail = %summary.message,
                "entries not forwarded"
            );
            EventType::Warning
        } else {
            EventType::Normal
        };
        self.event(
            key,
            type_,
            summary.reason,
            "Plan",
            summary.message.clone(),
            round,
        );
        round
            .reports
            .push((key.clone(), Work::Condition(summary.clone())));
    }
}
