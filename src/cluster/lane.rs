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

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kube::runtime::events::EventType;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::watched::WatchedService;
use super::{Cluster, Key};
use crate::core::decide::Summary;

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
    /// The external-dns targets.
    Dns,
    Condition,
    /// An event, by reason: a newer note of the same reason replaces an older one.
    Event(&'static str),
}

/// One piece of work for one Service.
#[derive(Clone, Debug)]
pub enum Work {
    /// Remove this router's finalizer; the Service's finalizers as last seen.
    Release(Vec<String>),
    /// Add this router's finalizer; the Service's finalizers as last seen.
    AddFinalizer(Vec<String>),
    /// Change the DNS target annotations: JSON Patch operations guarded by `test`.
    Dns(Vec<serde_json::Value>),
    Condition(Summary),
    Event {
        uid: String,
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
            Work::Dns(_) => Kind::Dns,
            Work::Condition(_) => Kind::Condition,
            Work::Event { reason, .. } => Kind::Event(reason),
        }
    }
}

/// What the daemon wants done, from one round: only what changed since the last.
#[derive(Debug, Default)]
pub struct Round {
    /// Finalizer changes for these Services, replacing any still pending for them; `None`:
    /// no change is wanted any more (one still pending is dropped).
    pub finalizers: Vec<(Key, Option<Work>)>,
    /// Conditions and events, added to what is pending.
    pub reports: Vec<(Key, Work)>,
}

impl Round {
    pub fn is_empty(&self) -> bool {
        self.finalizers.is_empty() && self.reports.is_empty()
    }
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

#[cfg_attr(test, derive(Clone))]
struct Pending {
    work: Work,
    attempts: u32,
    /// The round that asked for it.
    round: u64,
}

type Slot = (Kind, Key);

/// What is waiting: ready now by priority, or in backoff by time. Each slot remembers the
/// last round that said what it wants, so a retry of older work never overtakes newer.
#[derive(Default)]
struct Queue {
    ready: BTreeMap<Slot, Pending>,
    /// By due time, then by a number that keeps equal times apart.
    delayed: BTreeMap<(Instant, u64), (Slot, Pending)>,
    delays: u64,
    round: u64,
    said: HashMap<Slot, u64>,
}

impl Queue {
    fn superseded(&self, slot: &Slot, job: &Pending) -> bool {
        self.said.get(slot).is_some_and(|r| *r > job.round)
    }

    /// Moves what is due out of backoff, unless newer work for its slot came meanwhile.
    fn promote(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (slot, job) = entry.remove();
            if !self.superseded(&slot, &job) && !self.ready.contains_key(&slot) {
                self.ready.insert(slot, job);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.delayed.is_empty()
    }
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
    /// 409 or 422: the Service is not as this work saw it (a guard failed, it is being
    /// deleted); its watch event brings the daemon's next round.
    Stale(kube::Error),
    Failed(kube::Error),
}

async fn run(
    cluster: Cluster,
    mut inbox: mpsc::UnboundedReceiver<Round>,
    done: mpsc::UnboundedSender<Done>,
) {
    let mut queue = Queue::default();
    // At most IN_FLIGHT slots: a list is quicker to look through than a hash set.
    let mut busy: Vec<Slot> = Vec::new();
    let mut in_flight = FuturesUnordered::new();
    let mut idle = true;
    loop {
        // Start what is ready, highest priority first, one request per slot.
        queue.promote(Instant::now());
        let room = IN_FLIGHT.saturating_sub(in_flight.len());
        let starting: Vec<Slot> = queue
            .ready
            .keys()
            .filter(|slot| !busy.contains(slot))
            .take(room)
            .cloned()
            .collect();
        for slot in starting {
            let Some(job) = queue.ready.remove(&slot) else {
                continue;
            };
            busy.push(slot.clone());
            let cluster = &cluster;
            in_flight.push(async move {
                let outcome = execute(cluster, &slot.1, &job.work).await;
                (slot, job, outcome)
            });
        }
        if queue.is_empty() && in_flight.is_empty() && !idle {
            idle = true;
            let _ = done.send(Done::Idle);
        }
        let next_due = queue.delayed.keys().next().map(|(at, _)| *at);
        tokio::select! {
            round = inbox.recv() => {
                let Some(round) = round else { return };
                idle = false;
                take(&mut queue, round);
            }
            Some((slot, job, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                busy.retain(|s| *s != slot);
                settle(&mut queue, &done, slot, job, outcome);
            }
            () = sleep_until(next_due), if next_due.is_some() => {}
        }
    }
}

/// Takes a round: its finalizer changes replace those pending for the same Service, its
/// reports join what is pending (a newer one of the same slot replacing the older).
fn take(queue: &mut Queue, round: Round) {
    queue.round += 1;
    let mut works = round.reports;
    for (key, work) in round.finalizers {
        for kind in [Kind::Release, Kind::AddFinalizer] {
            let slot = (kind, key.clone());
            queue.ready.remove(&slot);
            queue.said.insert(slot, queue.round);
        }
        works.extend(work.map(|w| (key, w)));
    }
    for (key, work) in works {
        let slot = (work.kind(), key);
        queue.said.insert(slot.clone(), queue.round);
        queue.ready.insert(
            slot,
            Pending {
                work,
                attempts: 0,
                round: queue.round,
            },
        );
    }
}

/// Work guarded by what the daemon saw of the Service: when the guard fails, the
/// Service's next watch event brings the daemon's next word, not a retry.
fn guarded(kind: Kind) -> bool {
    matches!(kind, Kind::Release | Kind::AddFinalizer | Kind::Dns)
}

/// Reports a request's end, or puts it back to be retried. Work is retried only while no
/// newer round has said what it wants of that slot (a finalizer change: of that Service's
/// finalizer), and a finalizer change not when the Service turned out to be other than it
/// saw: the Service's watch event brings the daemon's next word on it.
fn settle(
    queue: &mut Queue,
    done: &mpsc::UnboundedSender<Done>,
    slot: Slot,
    job: Pending,
    outcome: Outcome,
) {
    let key = slot.1.clone();
    let finished = |queue: &mut Queue| {
        if !queue.superseded(&slot, &job) {
            queue.said.remove(&slot);
        }
    };
    match outcome {
        Outcome::Finalizer(updated) => {
            finished(queue);
            let _ = done.send(Done::Finalizer(key, updated));
        }
        Outcome::Nothing => finished(queue),
        Outcome::Gone => {
            queue.ready.retain(|(_, k), _| *k != key);
            queue.said.retain(|(_, k), _| *k != key);
            let _ = done.send(Done::Gone(key));
        }
        Outcome::Stale(error) if guarded(slot.0) => {
            finished(queue);
            tracing::debug!(%error, namespace = %key.0, name = %key.1, work = ?slot.0, "the Service changed meanwhile; waiting for its next state");
        }
        Outcome::Failed(_) | Outcome::Stale(_) if queue.superseded(&slot, &job) => {}
        Outcome::Stale(error) | Outcome::Failed(error) => {
            let attempts = job.attempts + 1;
            let delay = backoff(attempts);
            if attempts == 3 {
                tracing::warn!(%error, namespace = %key.0, name = %key.1, work = ?slot.0, "a request to the API server keeps failing; retrying with backoff");
            } else {
                tracing::debug!(%error, namespace = %key.0, name = %key.1, work = ?slot.0, retry_in = ?delay, "request to the API server failed; retrying");
            }
            queue.delays += 1;
            let at = (Instant::now() + delay, queue.delays);
            queue.delayed.insert(
                at,
                (
                    slot,
                    Pending {
                        work: job.work,
                        attempts,
                        round: job.round,
                    },
                ),
            );
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
        Work::Release(finalizers) => match cluster.remove_finalizer(key, finalizers).await {
            Some(result) => result.map(|updated| Outcome::Finalizer(Box::new(updated))),
            // It no longer holds the finalizer: nothing to remove.
            None => return Outcome::Nothing,
        },
        Work::AddFinalizer(finalizers) => cluster
            .add_finalizer(key, finalizers)
            .await
            .map(|updated| Outcome::Finalizer(Box::new(updated))),
        Work::Dns(ops) => cluster.write_dns(key, ops).await.map(|()| Outcome::Nothing),
        Work::Condition(summary) => cluster
            .condition(key, summary)
            .await
            .map(|()| Outcome::Nothing),
        Work::Event {
            uid,
            type_,
            reason,
            action,
            note,
        } => cluster
            .event(key, uid, *type_, reason, action, note)
            .await
            .map(|()| Outcome::Nothing),
    };
    match result {
        Ok(outcome) => outcome,
        Err(kube::Error::Api(status)) if status.code == 404 => Outcome::Gone,
        Err(kube::Error::Api(status)) if status.code == 409 || status.code == 422 => {
            Outcome::Stale(kube::Error::Api(status))
        }
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
            down: 0,
            notes: Vec::new(),
        }
    }

    #[test]
    fn a_round_replaces_finalizer_work_and_adds_reports_in_priority_order() {
        let key = |n: &str| ("ns".to_owned(), n.to_owned());
        let tracked: Vec<String> = Vec::new();
        let mut queue = Queue::default();
        take(
            &mut queue,
            Round {
                finalizers: vec![
                    (key("a"), Some(Work::AddFinalizer(tracked.clone()))),
                    (key("c"), Some(Work::AddFinalizer(tracked.clone()))),
                ],
                reports: vec![(key("a"), Work::Condition(summary("Waiting")))],
            },
        );
        take(
            &mut queue,
            Round {
                finalizers: vec![(key("b"), Some(Work::Release(tracked))), (key("a"), None)],
                reports: vec![(key("a"), Work::Condition(summary("Forwarded")))],
            },
        );
        let slots: Vec<(Kind, String)> = queue
            .ready
            .iter()
            .map(|((kind, k), _)| (*kind, k.1.clone()))
            .collect();
        // The add for `a` is no longer wanted, that for `c` still is; the newer condition
        // replaced the older.
        assert_eq!(
            slots,
            [
                (Kind::Release, "b".into()),
                (Kind::AddFinalizer, "c".into()),
                (Kind::Condition, "a".into())
            ]
        );
        let Work::Condition(latest) = &queue.ready[&(Kind::Condition, key("a"))].work else {
            panic!("a condition");
        };
        assert_eq!(latest.reason, "Forwarded");
    }

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure("refused", "Test").with_code(code),
        ))
    }

    #[test]
    fn failures_are_retried_unless_a_newer_round_or_the_service_says_otherwise() {
        let key = ("ns".to_owned(), "a".to_owned());
        let tracked: Vec<String> = Vec::new();
        let (done, _reports) = mpsc::unbounded_channel();
        let job = |work: Work, round: u64| Pending {
            work,
            attempts: 0,
            round,
        };
        let add = Work::AddFinalizer(tracked.clone());
        let condition = Work::Condition(summary("Forwarded"));
        let add_slot = (Kind::AddFinalizer, key.clone());
        let mut queue = Queue {
            round: 2,
            said: HashMap::from([(add_slot.clone(), 2)]),
            ..Queue::default()
        };
        let delayed = |queue: &Queue, slot: &Slot| {
            queue
                .delayed
                .values()
                .filter(|(s, _)| s == slot)
                .map(|(_, p)| p.attempts)
                .collect::<Vec<u32>>()
        };
        // A server error in the newest round's finalizer change: retried.
        let slot = add_slot;
        settle(
            &mut queue,
            &done,
            slot.clone(),
            job(add.clone(), 2),
            Outcome::Failed(api_error(500)),
        );
        assert_eq!(delayed(&queue, &slot), [1]);
        queue.delayed.clear();
        // Said again since (an older round's), or a guard that failed (422): left to the
        // daemon's next word.
        settle(
            &mut queue,
            &done,
            slot.clone(),
            job(add.clone(), 1),
            Outcome::Failed(api_error(500)),
        );
        settle(
            &mut queue,
            &done,
            slot.clone(),
            job(add, 2),
            Outcome::Stale(api_error(422)),
        );
        assert!(queue.is_empty());
        // A condition is retried, unless a newer one was asked for meanwhile.
        let slot = (Kind::Condition, key);
        settle(
            &mut queue,
            &done,
            slot.clone(),
            job(condition, 1),
            Outcome::Stale(api_error(422)),
        );
        assert_eq!(delayed(&queue, &slot), [1]);
        let later = Instant::now() + RETRY_LAST;
        let mut newer = Queue {
            said: HashMap::from([(slot.clone(), 5)]),
            delayed: queue.delayed.clone(),
            ..Queue::default()
        };
        newer.promote(later);
        assert!(newer.is_empty());
        queue.promote(later);
        assert!(queue.ready.contains_key(&slot));
    }

    #[test]
    fn retries_back_off_to_a_minute() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(5), Duration::from_secs(8));
        assert_eq!(backoff(40), RETRY_LAST);
    }
}
