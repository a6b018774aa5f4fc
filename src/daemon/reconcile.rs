//! One round of the daemon: the kernel lane applies what the core decided, then the cluster
//! lane releases and adds finalizers, reports what changed and publishes conditions.

use std::collections::BTreeSet;
use std::time::Duration;

use kube::runtime::events::EventType;
use tokio::time::Instant;

use super::{Daemon, DaemonError};
use crate::cluster::Key;
use crate::cluster::report::changes_by_service;
use crate::cluster::watched::WatchedService;
use crate::core::decide::{self, Summary};
use crate::core::model::ForwardKey;
use crate::kernel::{Applied, Engine, NftCli, Ruleset};
use crate::router::audit;

impl Daemon {
    /// One round: apply, then finalizers, events and conditions. Returns when to try again
    /// if something is left to do. Unless `force`d, forwards equal to those applied last are
    /// not sent again: most events (the daemon's own finalizer and condition writes among
    /// them) change no forward.
    pub(super) async fn reconcile(&mut self, force: bool) -> Result<Option<Duration>, DaemonError> {
        let decision = decide::decide(&self.store, self.cluster.finalizer(), &self.settings.policy);
        let unchanged = !force
            && self
                .engine
                .as_ref()
                .and_then(Engine::applied)
                .is_some_and(|applied| {
                    applied.forwards == decision.plan.forwards
                        && applied.config == self.settings.table
                });
        let ruleset = Ruleset::new(self.settings.table.clone(), decision.plan.forwards.clone());
        let started = std::time::Instant::now();
        let result = if unchanged {
            Ok(Applied::default())
        } else {
            self.with_engine(move |engine| engine.apply(ruleset))
                .await?
        };
        self.progress();
        let applied = match result {
            Ok(applied) => applied,
            Err(error) => {
                {
                    let mut metrics = self.lock_metrics();
                    metrics.apply_errors += 1;
                    metrics.applying = false;
                }
                self.failures += 1;
                tracing::error!(%error, "applying the table failed; retrying");
                let note = format!("removing this Service's forwards failed: {error}");
                for key in &decision.release {
                    if self.cleanup_overdue(key) {
                        self.release_anyway(key).await;
                    } else {
                        self.warn(key, "CleanupFailed", &note).await;
                    }
                }
                return Ok(Some(self.backoff()));
            }
        };
        self.failures = 0;
        self.lock_metrics()
            .applied(started.elapsed(), applied.sent, &decision.plan);
        if std::mem::take(&mut self.verify_after_deletion) && applied.rebuilt.is_some() {
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
                forwards = decision.plan.forwards.len(),
                "ready: first complete list seen and first apply done"
            );
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
        // Finalizers first: a deleted Service waits on the release, events wait on nobody.
        let mut retry = None;
        if !decision.release.is_empty() {
            retry = self.release(&decision.release, &applied).await?;
        }
        for key in &decision.add_finalizer {
            self.add_finalizer(key).await;
        }
        self.report_changes(&applied).await;
        for (key, summary) in decision.summaries {
            if self.published.get(&key) != Some(&summary) {
                self.publish(&key, &summary).await;
                self.published.insert(key, summary);
            }
        }
        self.published.retain(|key, _| self.store.contains_key(key));
        Ok(retry)
    }

    fn backoff(&self) -> Duration {
        Duration::from_millis(200 * 2u64.pow(self.failures.min(8)))
    }

    /// Runs `f` with the engine on a blocking thread (it spawns `nft`).
    async fn with_engine<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Engine<NftCli>) -> T + Send + 'static,
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
        keys: &[(String, String)],
        applied: &Applied,
    ) -> Result<Option<Duration>, DaemonError> {
        // Fast path: every Service released had its forwards removed by this round's
        // transaction, and the kernel confirms those keys are gone (its echo of the
        // transaction, or an uncommitted create of the same keys). Otherwise, read the table
        // and look for their uids.
        let uids: BTreeSet<String> = keys
            .iter()
            .filter_map(|k| self.store.get(k).map(|t| t.uid.clone()))
            .collect();
        let removed: Vec<ForwardKey> = applied
            .removed
            .iter()
            .filter(|r| r.uid.as_ref().is_some_and(|u| uids.contains(u)))
            .map(|r| r.key)
            .collect();
        let removed_uids: BTreeSet<&str> = applied
            .removed
            .iter()
            .filter_map(|r| r.uid.as_deref())
            .collect();
        let echoed = removed
            .iter()
            .all(|k| applied.confirmed_removed.contains(k));
        if uids.iter().all(|u| removed_uids.contains(u.as_str()))
            && (echoed
                || self
                    .with_engine(move |engine| engine.confirmed_absent(&removed))
                    .await?)
        {
            for key in keys {
                if let Some(uid) = self.store.get(key).map(|t| t.uid.clone()) {
                    self.cleanup_since.remove(&uid);
                }
                self.remove_finalizer(key).await;
            }
            return Ok(None);
        }
        let config = self.settings.table.clone();
        let read = self
            .with_engine(move |engine| engine.read(&config.table.clone(), Some(&config)))
            .await?;
        let present: BTreeSet<String> = match read {
            Ok(table) => table
                .map(|t| {
                    t.addrs
                        .values()
                        .filter_map(|e| e.comment.as_deref())
                        .chain(t.ports.values().filter_map(|e| e.comment.as_deref()))
                        .filter_map(|c| c.rsplit_once(" uid=").map(|(_, uid)| uid.to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
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
                self.cleanup_since.remove(&uid);
                self.remove_finalizer(key).await;
                continue;
            }
            if self.cleanup_overdue(key) {
                self.release_anyway(key).await;
            } else {
                self.warn(
                    key,
                    "CleanupPending",
                    "this Service's forwards are still in the router's table; retrying",
                )
                .await;
                retry = Some(self.backoff());
            }
        }
        Ok(retry)
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

    async fn release_anyway(&mut self, key: &Key) {
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
            "cleanup kept failing past the deadline; the finalizer is released and the router keeps retrying",
        )
        .await;
        self.remove_finalizer(key).await;
    }

    /// Adds this router's finalizer to a Service whose forwards are live.
    async fn add_finalizer(&mut self, key: &Key) {
        let Some(tracked) = self.store.get(key) else {
            return;
        };
        let updated = self.cluster.add_finalizer(key, tracked).await;
        self.progress();
        self.keep(key, updated);
    }

    async fn remove_finalizer(&mut self, key: &Key) {
        let Some(tracked) = self.store.get(key) else {
            return;
        };
        let updated = self.cluster.remove_finalizer(key, tracked).await;
        self.progress();
        self.keep(key, updated);
    }

    /// Keeps what the API server answered to a patch, before its watch event arrives.
    fn keep(&mut self, key: &Key, updated: Option<WatchedService>) {
        if let Some(updated) = updated
            && updated.metadata.name.is_some()
        {
            self.store.insert(key.clone(), updated.tracked);
        }
    }

    /// Normal events for forwards opened and closed, one per Service.
    async fn report_changes(&mut self, applied: &Applied) {
        let instance = self.cluster.instance().to_owned();
        for (key, (opened, closed)) in changes_by_service(applied, &self.store) {
            if !opened.is_empty() {
                let note = format!("opened on router {instance}: {}", opened.join(", "));
                self.event(&key, EventType::Normal, "PortsOpened", "Forward", &note)
                    .await;
            }
            if !closed.is_empty() {
                let note = format!("closed on router {instance}: {}", closed.join(", "));
                self.event(&key, EventType::Normal, "PortsClosed", "Forward", &note)
                    .await;
            }
        }
    }
    async fn warn(&mut self, key: &Key, reason: &str, note: &str) {
        self.event(key, EventType::Warning, reason, "Forward", note)
            .await;
    }

    async fn event(&self, key: &Key, type_: EventType, reason: &str, action: &str, note: &str) {
        let Some(tracked) = self.store.get(key) else {
            return;
        };
        self.cluster
            .event(key, tracked, type_, reason, action, note)
            .await;
        self.progress();
    }

    /// The event and this router's condition for a Service whose summary changed.
    async fn publish(&self, key: &Key, summary: &Summary) {
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
        self.event(key, type_, summary.reason, "Plan", &summary.message)
            .await;
        self.cluster.condition(key, summary).await;
        self.progress();
    }
}
