//! What wakes the daemon: the cluster's watches and its lane's answers, the router's address
//! changes, sockets, health checks and IGD, nf_tables' notifications, signals and timers.
//! Each is subscribed here, once, and [`Sources::next`] waits for the first of them.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tokio::signal::unix::{Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval};

use super::{DaemonError, HEARTBEAT, Settings};
use crate::cluster::lane::Done;
use crate::cluster::watch::{self, Input};
use crate::core::policy::NodePorts;
use crate::kernel::monitor::{TableEvents, Touched};
use crate::router::links::LinkEvents;
use crate::router::probe::{Prober, Transition};
use crate::router::served::ServedPorts;
use crate::router::sockets::Bound;
use crate::router::upstream::Upstream;

/// What woke the daemon, with everything of that kind that was ready.
pub(super) enum Wake {
    /// Shutdown was asked for, or the watches ended.
    Stop,
    Watch(Vec<Input>),
    /// The retry a failed or unfinished round asked for is due.
    Retry,
    Hangup,
    Resync,
    Links,
    Upstream,
    Table(Touched),
    Lane(Vec<Done>),
    Health(Vec<Transition>),
    Sockets(BTreeSet<Bound>),
    Heartbeat,
}

pub(super) struct Sources {
    events: BoxStream<'static, Input>,
    /// `None` when rtnetlink could not be subscribed to and no WAN interface is followed.
    pub links: Option<LinkEvents>,
    tables: Option<TableEvents>,
    hangup: Option<Signal>,
    resync: Interval,
    heartbeat: Interval,
    lane_done: mpsc::UnboundedReceiver<Done>,
    /// When to run a round again, asked for by the last one.
    pub retry_at: Option<Instant>,
}

impl Sources {
    /// Subscribes to everything; following WAN interfaces is a promise the daemon cannot
    /// keep without rtnetlink, so failing to subscribe then stops it.
    pub fn subscribe(
        client: &kube::Client,
        settings: &Settings,
        scopes: &[Option<String>],
        lane_done: mpsc::UnboundedReceiver<Done>,
    ) -> Result<Sources, DaemonError> {
        let events = watch::streams(
            client,
            scopes,
            settings.selector.as_deref(),
            settings.policy.namespace_selector.as_ref(),
            settings.policy.node_ports != NodePorts::Off,
        );
        let follow = !settings.table.wan_interfaces.is_empty();
        let links = match LinkEvents::subscribe() {
            Ok(links) => Some(links),
            Err(error) if follow => return Err(DaemonError::Links(error)),
            Err(error) => {
                tracing::warn!(%error, "cannot follow address changes; the router's own addresses are those at start");
                None
            }
        };
        // Self-healing: deletions in the table, as the kernel announces them. Without it the
        // table still comes back at the next resync.
        let tables = match TableEvents::subscribe(&settings.table.table) {
            Ok(tables) => Some(tables),
            Err(error) => {
                tracing::warn!(%error, "cannot subscribe to nf_tables changes; a deleted table comes back only at the next resync");
                None
            }
        };
        let mut resync = tokio::time::interval(settings.resync);
        // The first tick is at once: the first round needs no resync.
        resync.reset();
        Ok(Sources {
            events,
            links,
            tables,
            hangup: tokio::signal::unix::signal(SignalKind::hangup()).ok(),
            resync,
            heartbeat: tokio::time::interval(HEARTBEAT),
            lane_done,
            retry_at: None,
        })
    }

    /// Waits for the first thing that wakes the daemon, and takes what else of its kind is
    /// ready, so a burst costs one round.
    pub async fn next(
        &mut self,
        shutdown: Pin<&mut impl Future<Output = ()>>,
        prober: &mut Prober,
        upstream: &mut Option<Upstream>,
        served: &mut ServedPorts,
    ) -> Wake {
        tokio::select! {
            () = shutdown => Wake::Stop,
            input = self.events.next() => match input {
                Some(input) => {
                    let mut inputs = vec![input];
                    while let Some(Some(input)) = self.events.next().now_or_never() {
                        inputs.push(input);
                    }
                    Wake::Watch(inputs)
                }
                None => Wake::Stop,
            },
            () = sleep_until(self.retry_at), if self.retry_at.is_some() => {
                self.retry_at = None;
                Wake::Retry
            }
            Some(()) = recv(&mut self.hangup) => Wake::Hangup,
            _ = self.resync.tick() => Wake::Resync,
            () = changed(&mut self.links) => Wake::Links,
            () = upstream_changed(upstream) => Wake::Upstream,
            touched = touched(&mut self.tables) => Wake::Table(touched),
            Some(done) = self.lane_done.recv() => {
                let mut all = vec![done];
                while let Ok(done) = self.lane_done.try_recv() {
                    all.push(done);
                }
                Wake::Lane(all)
            }
            Some(transition) = prober.next() => {
                let mut all = vec![transition];
                while let Some(Some(t)) = prober.next().now_or_never() {
                    all.push(t);
                }
                Wake::Health(all)
            }
            sockets = served.changed() => Wake::Sockets(sockets),
            _ = self.heartbeat.tick() => Wake::Heartbeat,
        }
    }
}

async fn changed(links: &mut Option<LinkEvents>) {
    match links {
        Some(links) => links.changed().await,
        None => std::future::pending().await,
    }
}

async fn upstream_changed(upstream: &mut Option<Upstream>) {
    match upstream {
        Some(upstream) => upstream.changed().await,
        None => std::future::pending().await,
    }
}

async fn touched(tables: &mut Option<TableEvents>) -> Touched {
    match tables {
        Some(tables) => tables.table_touched().await,
        None => std::future::pending().await,
    }
}

async fn recv(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
