//! The cluster lane: this router's bookkeeping on Services (finalizers, conditions, events)
//! runs here, beside the daemon's loop, so a thousand finalizers to write never delay a
//! forward. Shaped like kube-runtime's controller queue: one pending entry per Service and
//! kind of work, the latest wanted state replacing an older one (coalescing), a few requests
//! in flight, and failed requests retried with backoff.
//!
//! Priority, highest first: finalizer releases (a deleted Service waits on them), finalizer
//! additions, conditions, events. The daemon hands over a finalizer change only when the
//! kernel allows it (forwards live before an add, confirmed gone before a release): the
//! contract stays the daemon's, the lane only carries it out.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kube::runtime::events::EventType;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::watched::WatchedService;
use super::{Cluster, Key};
use crate::core::decide::Summary;
use crate::core::tracked::Tracked;

/// Requests in flight at once.
const IN_FLIGHT: usize = 4;
/// Retry delays double from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_LAST: Duration = Duration::from_secs(60);

/// Kinds of work, in priority order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Release,
    AddFinalizer,
    Condition,
    /// An event, by reason: a newer note of the same reason replaces an older one.
    Event(&'static str),
}

/// One piece of work for one Service.
#[derive(Clone, Debug)]
pub enum Work {
    /// Remove this router's finalizer from the Service as last seen.
    Release(Tracked),
    /// Add this router's finalizer to the Service as last seen.
    AddFinalizer(Tracked),
    Condition(Summary),
    Event {
        tracked: Tracked,
        type_: EventType,
        reason: &'static str,
        action: &'static str,
        note: String,
    },
}

impl Work {
    fn kind(&self) -> Kind {
        match self {
            Work::Release(_) => Kind::Release,
            Work::AddFinalizer(_) => Kind::AddFinalizer,
            Work::Condition(_) => Kind::Condition,
            Work::Event { reason, .. } => Kind::Event(reason),
        }
    }
}

/// What the daemon wants done, from one round.
#[derive(Debug, Default)]
pub struct Round {
    /// The finalizer changes this round allows: replace every finalizer change still
    /// pending (one no longer wanted is dropped).
    pub finalizers: Vec<(Key, Work)>,
    /// Conditions and events, added to what is pending.
    pub reports: Vec<(Key, Work)>,
}

/// What the lane tells the daemon.
#[derive(Debug)]
pub enum Done {
    /// The finalizer was added or removed; the Service as the API server now has it.
    Finalizer(Key, Box<WatchedService>),
    /// The Service is gone: nothing more to do for it.
    Gone(Key),
    /// Nothing is pending or in flight any more.
    Idle,
}

struct Pending {
    work: Work,
    ready_at: Instant,
    attempts: u32,
}

/// The daemon's end of the lane.
pub struct Lane {
    rounds: mpsc::UnboundedSender<Round>,
}

impl Lane {
    /// Starts the lane's task; what it did comes back on the receiver.
    pub fn start(cluster: Cluster) -> (Lane, mpsc::UnboundedReceiver<Done>) {
        let (rounds, inbox) = mpsc::unbounded_channel();
        let (done, outbox) = mpsc::unbounded_channel();
        tokio::spawn(run(cluster, inbox, done));
        (Lane { rounds }, outbox)
    }

    pub fn send(&self, round: Round) {
        // The task ends only with the daemon.
        let _ = self.rounds.send(round);
    }
}

/// How a request ended.
enum Outcome {
    Finalizer(Box<WatchedService>),
    /// Done, and nothing to tell.
    Nothing,
    /// 404: the Service is gone.
    Gone,
    Failed(kube::Error),
}

async fn run(
    cluster: Cluster,
    mut inbox: mpsc::UnboundedReceiver<Round>,
    done: mpsc::UnboundedSender<Done>,
) {
    let mut pending: BTreeMap<(Kind, Key), Pending> = BTreeMap::new();
    let mut busy: HashSet<(Kind, Key)> = HashSet::new();
    let mut in_flight = FuturesUnordered::new();
    let mut idle = true;
    loop {
        // Start what is ready, highest priority first, one request per Service and kind.
        let now = Instant::now();
        let ready: Vec<(Kind, Key)> = pending
            .iter()
            .filter(|(slot, p)| p.ready_at <= now && !busy.contains(*slot))
            .map(|(slot, _)| slot.clone())
            .take(IN_FLIGHT.saturating_sub(in_flight.len()))
            .collect();
        for slot in ready {
            let Some(job) = pending.remove(&slot) else {
                continue;
            };
            busy.insert(slot.clone());
            let cluster = &cluster;
            in_flight.push(async move {
                let outcome = execute(cluster, &slot.1, &job.work).await;
                (slot, job, outcome)
            });
        }
        if pending.is_empty() && in_flight.is_empty() && !idle {
            idle = true;
            let _ = done.send(Done::Idle);
        }
        let next_ready = pending
            .iter()
            .filter(|(slot, _)| !busy.contains(*slot))
            .map(|(_, p)| p.ready_at)
            .min();
        tokio::select! {
            round = inbox.recv() => {
                let Some(round) = round else { return };
                idle = false;
                take(&mut pending, round);
            }
            Some((slot, job, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                busy.remove(&slot);
                settle(&mut pending, &done, slot, job, outcome);
            }
            () = sleep_until(next_ready), if next_ready.is_some() => {}
        }
    }
}

/// Takes a round: its finalizer changes replace those pending, its reports join them.
fn take(pending: &mut BTreeMap<(Kind, Key), Pending>, round: Round) {
    let now = Instant::now();
    pending.retain(|(kind, _), _| !matches!(kind, Kind::Release | Kind::AddFinalizer));
    for (key, work) in round.finalizers.into_iter().chain(round.reports) {
        let slot = (work.kind(), key);
        // A newer wanted state starts afresh; a retry's backoff is for the state that failed.
        pending.insert(
            slot,
            Pending {
                work,
                ready_at: now,
                attempts: 0,
            },
        );
    }
}

/// Reports a request's end, or puts it back to be retried.
fn settle(
    pending: &mut BTreeMap<(Kind, Key), Pending>,
    done: &mpsc::UnboundedSender<Done>,
    slot: (Kind, Key),
    job: Pending,
    outcome: Outcome,
) {
    let key = slot.1.clone();
    match outcome {
        Outcome::Finalizer(updated) => {
            let _ = done.send(Done::Finalizer(key, updated));
        }
        Outcome::Nothing => {}
        Outcome::Gone => {
            pending.retain(|(_, k), _| *k != key);
            let _ = done.send(Done::Gone(key));
        }
        Outcome::Failed(error) => {
            let attempts = job.attempts + 1;
            let delay = backoff(attempts);
            if attempts == 3 {
                tracing::warn!(%error, namespace = %key.0, name = %key.1, work = ?slot.0, "a request to the API server keeps failing; retrying with backoff");
            } else {
                tracing::debug!(%error, namespace = %key.0, name = %key.1, work = ?slot.0, retry_in = ?delay, "request to the API server failed; retrying");
            }
            // A newer state of the same work, taken meanwhile, goes first.
            pending.entry(slot).or_insert(Pending {
                work: job.work,
                ready_at: Instant::now() + delay,
                attempts,
            });
        }
    }
}

fn backoff(attempts: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1).min(16)))
        .min(RETRY_LAST)
}

async fn execute(cluster: &Cluster, key: &Key, work: &Work) -> Outcome {
    let result = match work {
        Work::Release(tracked) => match cluster.remove_finalizer(key, tracked).await {
            Some(result) => result.map(|updated| Outcome::Finalizer(Box::new(updated))),
            // It no longer holds the finalizer: nothing to remove.
            None => return Outcome::Nothing,
        },
        Work::AddFinalizer(tracked) => cluster
            .add_finalizer(key, tracked)
            .await
            .map(|updated| Outcome::Finalizer(Box::new(updated))),
        Work::Condition(summary) => cluster
            .condition(key, summary)
            .await
            .map(|()| Outcome::Nothing),
        Work::Event {
            tracked,
            type_,
            reason,
            action,
            note,
        } => cluster
            .event(key, tracked, *type_, reason, action, note)
            .await
            .map(|()| Outcome::Nothing),
    };
    match result {
        Ok(outcome) => outcome,
        Err(kube::Error::Api(status)) if status.code == 404 => Outcome::Gone,
        Err(error) => Outcome::Failed(error),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(reason: &'static str) -> Summary {
        Summary {
            status: "True",
            reason,
            message: String::new(),
            warning: false,
        }
    }

    #[test]
    fn a_round_replaces_finalizer_work_and_adds_reports_in_priority_order() {
        let key = |n: &str| ("ns".to_owned(), n.to_owned());
        let tracked = Tracked::from_value(serde_json::json!({"metadata": {"uid": "u"}}));
        let mut pending = BTreeMap::new();
        take(
            &mut pending,
            Round {
                finalizers: vec![(key("a"), Work::AddFinalizer(tracked.clone()))],
                reports: vec![(key("a"), Work::Condition(summary("Waiting")))],
            },
        );
        take(
            &mut pending,
            Round {
                finalizers: vec![(key("b"), Work::Release(tracked))],
                reports: vec![(key("a"), Work::Condition(summary("Forwarded")))],
            },
        );
        let slots: Vec<(Kind, String)> = pending
            .iter()
            .map(|((kind, k), _)| (*kind, k.1.clone()))
            .collect();
        // The add for `a` is no longer wanted; the newer condition replaced the older.
        assert_eq!(
            slots,
            [(Kind::Release, "b".into()), (Kind::Condition, "a".into())]
        );
        let Work::Condition(latest) = &pending[&(Kind::Condition, key("a"))].work else {
            panic!("a condition");
        };
        assert_eq!(latest.reason, "Forwarded");
    }

    #[test]
    fn retries_back_off_to_a_minute() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(5), Duration::from_secs(8));
        assert_eq!(backoff(40), RETRY_LAST);
    }
}
