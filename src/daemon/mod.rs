//! The daemon: joins the lanes. It takes what the cluster's watches, the router's interfaces
//! and the kernel's notifications report, asks the core what the table and the Services
//! should hold, and has the kernel lane apply it, then the cluster lane tell it.
//!
//! Fail static: nothing is applied before the first complete list, and a watch error, an API
//! outage or a restart never removes a rule; only a complete list or a watch event that says
//! a Service changed or went does.

mod backends;
mod inputs;
mod reconcile;
mod upstream;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::time::Instant;

use crate::cluster::client::{self, ClientError};
use crate::cluster::lane::{Kind, Lane};
use crate::cluster::{Cluster, Key, watch};
use crate::core::decide::{Down, Store, Summary};
use crate::core::dns;
use crate::core::model::{Family, ForwardKey};
use crate::core::names::valid_finalizer;
use crate::core::node::Nodes;
use crate::core::policy::{NodePorts, Policy};
use crate::kernel::monitor::{TableEvents, Touched};
use crate::kernel::{Engine, Kernel, NftCli, TableConfig};
use crate::router::health::{self, Metrics};
use crate::router::links::LinkEvents;
use crate::router::probe::{ProbeSettings, Prober};
use crate::router::upstream::{Upstream, UpstreamSettings};

pub const DEFAULT_FINALIZER: &str = "kube-port-forward-controller/finalizer";
pub const DEFAULT_CONDITION: &str = "kube-port-forward-controller/Forwarded";
/// The loop turns at least this often, to show it is alive (watchdog, `/healthz`).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// `/healthz` fails when the loop has not turned for this long (an apply is stuck).
const STALL: Duration = Duration::from_secs(60);
/// Applies failing this long without one success stop the watchdog's pings.
const FAILING: Duration = Duration::from_secs(600);

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// Watch only these namespaces; empty: all.
    pub namespaces: Vec<String>,
    pub selector: Option<String>,
    pub finalizer: String,
    pub condition_type: String,
    /// This router's name in events (`reportingInstance`).
    pub instance: String,
    pub table: TableConfig,
    /// How long a Service's cleanup may fail before its finalizer is released anyway.
    pub cleanup_deadline: Duration,
    /// How often the kernel table is read in full and compared.
    pub resync: Duration,
    pub nft: NftCli,
    pub policy: Policy,
    /// Where the policy came from, re-read on SIGHUP; `None`: from flags, fixed.
    pub policy_file: Option<PathBuf>,
    /// Serve `/healthz`, `/readyz` and `/metrics` here.
    pub health: Option<SocketAddr>,
    /// How the backends of forwards with several are checked.
    pub probes: ProbeSettings,
    /// Map every IPv4 forward on the IGD in front of the router (double NAT); `None`: off.
    pub upstream: Option<UpstreamSettings>,
    /// Write external-dns targets on the Services forwarded.
    pub dns_targets: bool,
    /// Where what the IGD said is written for `status`.
    pub state_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(
        "finalizer \"{0}\" is not a qualified name (prefix/name, name of letters, digits, '-', '_', '.')"
    )]
    Finalizer(String),
    #[error("the nft worker stopped")]
    Worker,
    #[error("cannot follow the WAN interfaces' addresses (rtnetlink)")]
    Links(#[source] std::io::Error),
    #[error("cannot serve health and metrics on {0}")]
    Health(SocketAddr, #[source] std::io::Error),
}

struct Daemon {
    settings: Settings,
    client: kube::Client,
    /// Finalizers, conditions and events are written there, beside the loop.
    lane: Lane,
    /// Who holds which port was read from the kernel once.
    holders_known: bool,
    /// Finalizer holders outside the watch's scope were looked for once.
    strays_swept: bool,
    /// Finalizer changes handed to the lane and not yet done: which, and for the Service's
    /// finalizer list as it was then.
    handed: HashMap<Key, (Kind, Vec<String>)>,
    /// The uids of the Services with forwards in the last plan.
    forwarding: HashSet<String>,
    /// Services whose finalizers or conditions changed since the last round, and nothing
    /// else the plan depends on.
    recheck: BTreeSet<Key>,
    /// One scope per watch: `None` is every namespace.
    scopes: Vec<Option<String>>,
    store: Store,
    buffers: Vec<Option<Store>>,
    synced: Vec<bool>,
    namespace_buffer: Option<BTreeSet<String>>,
    /// The Namespace watch has listed once (or there is none).
    namespaces_synced: bool,
    /// The Node watch has listed once (or there is none): until then no round runs, so a
    /// forward to node ports is never closed for want of the list.
    nodes_synced: bool,
    node_buffer: Option<Nodes>,
    engine: Option<Engine<Kernel>>,
    published: HashMap<Key, Summary>,
    /// Since when a Service's forwards have refused to leave the kernel.
    cleanup_since: HashMap<String, Instant>,
    ready: bool,
    failures: u32,
    metrics: health::Shared,
    /// WAN and router addresses given as flags, kept whatever the interfaces hold.
    fixed_wan: BTreeSet<IpAddr>,
    fixed_router: BTreeSet<IpAddr>,
    /// The next apply follows a change to the table nf_tables announced from outside.
    verify_outside_change: bool,
    /// The health checks of the backends, and those that found theirs down.
    prober: Prober,
    down: Down,
    /// The backends the table recorded as down when the daemon started, until the first
    /// round takes them.
    kernel_down: Option<BTreeSet<(ForwardKey, IpAddr)>>,
    /// When each Service's condition, and its events, last told of its backends' health.
    health_told: HashMap<Key, Instant>,
    health_events: HashMap<Key, Instant>,
    /// The IGD's lane, when an upstream is configured.
    upstream: Option<Upstream>,
    /// The private-WAN warning was given.
    warned_private: bool,
    /// What each Service was last told of its upstream mappings.
    upstream_told: HashMap<Key, String>,
    /// The number of the last request to the upstream lane that asked for each Service's
    /// mappings (by uid).
    upstream_asked: HashMap<String, u64>,
    /// DNS patches handed to the cluster lane, and for which annotations and target.
    dns_handed: HashMap<Key, (dns::Annotations, Option<String>)>,
    /// The Services warned of a bad `dns-target` annotation, and for which value.
    dns_warned: HashMap<Key, String>,
    /// The last public addresses known, per family.
    public: BTreeMap<Family, BTreeSet<IpAddr>>,
    /// From the last round: the families each Service (by uid) forwards on, for DNS targets
    /// rechecked between rounds; and the uids of the Services whose release waits for their
    /// DNS targets to go.
    dns_families: HashMap<String, BTreeSet<Family>>,
    dns_waiting: BTreeSet<String>,
}

/// Runs until `shutdown` completes; a reconcile in progress finishes first.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    if !valid_finalizer(&settings.finalizer) {
        return Err(DaemonError::Finalizer(settings.finalizer.clone()));
    }
    let client =
        client::client(settings.kubeconfig.as_deref(), settings.context.as_deref()).await?;
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    let mut events = watch::streams(
        &client,
        &scopes,
        settings.selector.as_deref(),
        settings.policy.namespace_selector.as_ref(),
        settings.policy.node_ports != NodePorts::Off,
    );
    let watch_namespaces = settings.policy.namespace_selector.is_some();
    let watch_nodes = settings.policy.node_ports != NodePorts::Off;
    // The interfaces' addresses now, then every change the kernel announces: the WAN sets
    // follow the WAN interfaces, and the policy the router's own addresses. Following WAN
    // interfaces is a promise the daemon cannot keep without the subscription, so failing
    // to subscribe then stops it.
    let follow = !settings.table.wan_interfaces.is_empty();
    let mut links = match LinkEvents::subscribe() {
        Ok(links) => Some(links),
        Err(error) if follow => return Err(DaemonError::Links(error)),
        Err(error) => {
            tracing::warn!(%error, "cannot follow address changes; the router's own addresses are those at start");
            None
        }
    };
    // Self-healing: deletions in the table, as the kernel announces them. Without it the
    // table still comes back at the next resync.
    let mut tables = match TableEvents::subscribe(&settings.table.table) {
        Ok(tables) => Some(tables),
        Err(error) => {
            tracing::warn!(%error, "cannot subscribe to nf_tables changes; a deleted table comes back only at the next resync");
            None
        }
    };
    let metrics = health::Shared::default();
    if let Some(address) = settings.health {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|error| DaemonError::Health(address, error))?;
        tokio::spawn(health::serve(listener, metrics.clone(), STALL));
    }
    let (lane, mut lane_done) = Lane::start(Cluster::new(
        client.clone(),
        settings.finalizer.clone(),
        settings.condition_type.clone(),
        settings.instance.clone(),
    ));
    let mut daemon = Daemon {
        client,
        lane,
        holders_known: false,
        strays_swept: false,
        handed: HashMap::new(),
        forwarding: HashSet::new(),
        recheck: BTreeSet::new(),
        buffers: vec![None; scopes.len()],
        synced: vec![false; scopes.len()],
        namespace_buffer: None,
        namespaces_synced: !watch_namespaces,
        nodes_synced: !watch_nodes,
        node_buffer: None,
        scopes,
        store: Store::new(),
        engine: Some(Engine::new(Kernel::new(settings.nft.clone()))),
        published: HashMap::new(),
        cleanup_since: HashMap::new(),
        ready: false,
        failures: 0,
        fixed_wan: settings.table.wan_addresses.clone(),
        // The WAN flags; the interfaces' addresses are read again at every change.
        fixed_router: settings.table.wan_addresses.clone(),
        verify_outside_change: false,
        prober: Prober::new(settings.probes, metrics.clone()),
        down: Down::new(),
        kernel_down: None,
        health_told: HashMap::new(),
        health_events: HashMap::new(),
        upstream: None,
        warned_private: false,
        upstream_told: HashMap::new(),
        upstream_asked: HashMap::new(),
        dns_handed: HashMap::new(),
        dns_warned: HashMap::new(),
        public: BTreeMap::new(),
        dns_families: HashMap::new(),
        dns_waiting: BTreeSet::new(),
        metrics,
        settings,
    };
    if links.is_some() {
        daemon.follow_addresses();
    }
    match daemon.settings.upstream.clone() {
        Some(upstream) => daemon.upstream = Some(Upstream::start(upstream, daemon.wan_ipv4())),
        // What an earlier run with an upstream wrote would read as this one's.
        None => {
            let _ = std::fs::remove_file(&daemon.settings.state_file);
        }
    }
    daemon.warn_private_wan();
    tracing::info!(
        finalizer = %daemon.settings.finalizer,
        table = %daemon.settings.table.table,
        "starting; the kernel table stays as it is until the first complete list"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(
        "waiting for the first complete list of Services",
    )]);
    let mut resync = tokio::time::interval(daemon.settings.resync);
    resync.tick().await;
    let mut retry_at: Option<Instant> = None;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    if let Some(period) = sd_notify::watchdog_enabled() {
        tokio::spawn(feed_watchdog(daemon.metrics.clone(), period));
    }
    tokio::pin!(shutdown);
    loop {
        let mut dirty = false;
        // Set by a retry or a resync: apply even if the forwards look unchanged.
        let mut force = false;
        tokio::select! {
            _ = &mut shutdown => break,
            input = events.next() => {
                let Some(input) = input else { break };
                dirty |= daemon.take(input);
                // Take what else is ready before reconciling, so a burst costs one apply.
                while let Some(Some(input)) = events.next().now_or_never() {
                    dirty |= daemon.take(input);
                }
            }
            _ = sleep_until(retry_at), if retry_at.is_some() => {
                retry_at = None;
                dirty = true;
                force = true;
            }
            Some(()) = recv(&mut hangup) => {
                daemon.reload_policy();
                dirty = true;
                force = true;
            }
            _ = resync.tick() => {
                if let Some(engine) = daemon.engine.as_mut() {
                    engine.forget();
                }
                daemon.follow_served_ports();
                dirty = true;
                force = true;
            }
            () = changed(&mut links) => {
                dirty |= daemon.follow_addresses();
            }
            () = upstream_changed(&mut daemon.upstream) => {
                dirty |= daemon.upstream_changed();
            }
            touched = touched(&mut tables) => {
                // The engine's own commits are announced too: it knows their generations.
                // Anyone else's change is read and compared, and a difference undone.
                let own = match touched {
                    Touched::At(generation) => daemon.engine.as_ref().is_some_and(|e| e.knows(generation)),
                    Touched::Unknown => false,
                };
                if !own {
                    tracing::debug!(?touched, "nf_tables announced a change in the table; reading it");
                    if let Some(engine) = daemon.engine.as_mut() {
                        engine.forget();
                    }
                    daemon.verify_outside_change = true;
                    dirty = true;
                    force = true;
                }
            }
            Some(done) = lane_done.recv() => {
                dirty |= daemon.lane_done(done);
                while let Ok(done) = lane_done.try_recv() {
                    dirty |= daemon.lane_done(done);
                }
            }
            Some(transition) = daemon.prober.next() => {
                dirty |= daemon.health_changed(transition.check, transition.up, &transition.detail);
                while let Some(Some(t)) = daemon.prober.next().now_or_never() {
                    dirty |= daemon.health_changed(t.check, t.up, &t.detail);
                }
            }
            _ = heartbeat.tick() => daemon.progress(),
        }
        let synced =
            daemon.namespaces_synced && daemon.nodes_synced && daemon.synced.iter().all(|s| *s);
        if dirty && synced {
            // Watching every Service of every namespace, nothing can be outside the scope.
            let scoped =
                daemon.settings.selector.is_some() || !daemon.settings.namespaces.is_empty();
            if scoped && !daemon.strays_swept && (force || !daemon.ready) {
                daemon.sweep_strays().await;
            }
            daemon.recheck.clear();
            match daemon.reconcile(force).await? {
                Some(delay) => retry_at = Some(Instant::now() + delay),
                None => retry_at = None,
            }
        } else if synced && daemon.ready && !daemon.recheck.is_empty() {
            let keys = std::mem::take(&mut daemon.recheck);
            daemon.recheck(keys);
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("stopped; the kernel table stays as it is");
    Ok(())
}

/// Tells systemd the daemon is alive while its loop turns or a round makes progress, and
/// its applies succeed: a loop stuck on a hung API call, or failing to bring the table in
/// step for [`FAILING`], stops the pings, and systemd restarts it.
async fn feed_watchdog(metrics: health::Shared, period: Duration) {
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tick.tick().await;
        let converging =
            health::lock(&metrics).converging(std::time::Instant::now(), period, FAILING);
        if converging {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
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

async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
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

impl Daemon {
    fn lock_metrics(&self) -> std::sync::MutexGuard<'_, Metrics> {
        health::lock(&self.metrics)
    }

    /// The loop turned, or a round got one step further (an apply, an API call): a round
    /// that writes a thousand finalizers is slow, not stuck.
    fn progress(&self) {
        self.lock_metrics().loop_turned = std::time::Instant::now();
    }
}
