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
mod sources;
mod status;
mod upstream;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::client::{self, ClientError};
use crate::cluster::lane::{Kind, Lane};
use crate::cluster::{Cluster, Key};
use crate::core::decide::{Down, Finalizers, Store, Summary};
use crate::core::dns;
use crate::core::model::{Family, ForwardKey};
use crate::core::names::valid_finalizer;
use crate::core::node::Nodes;
use crate::core::plan::Planner;
use crate::core::policy::{NodePorts, Policy};
use crate::kernel::monitor::Touched;
use crate::kernel::{Engine, Kernel, NftCli, TableConfig};
use crate::router::health::{self, Metrics};
use crate::router::probe::{ProbeSettings, Prober};
use crate::router::served::ServedPorts;
use crate::router::upstream::{Upstream, UpstreamSettings};
use sources::{Sources, Wake};
use status::StatusWriter;

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
    /// Where the plan's entries are written for `status`.
    pub status_file: PathBuf,
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
    /// Services whose finalizers or conditions changed since the last round, and nothing
    /// else the plan depends on.
    recheck: BTreeSet<Key>,
    /// One scope per watch: `None` is every namespace.
    scopes: Vec<Option<String>>,
    store: Store,
    /// The plan of the Services in `store`, kept current one change at a time.
    planner: Planner,
    /// The next round compares the planner's plan with the whole plan (set at a resync).
    audit_plan: bool,
    /// Services whose outcomes changed since they were last told (in their condition and
    /// events); only these are summarized again.
    untold: BTreeSet<Key>,
    /// Which Services need this router's finalizer added or released.
    finalizers: Finalizers,
    /// Services that left the store since what they were told was last forgotten.
    gone: BTreeSet<Key>,
    /// The DNS targets the status file was last written with.
    status_dns: HashMap<Key, String>,
    /// The status file's entries changed since they were last built, and when that was.
    status_stale: bool,
    status_built: Option<Instant>,
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
    /// The router's own sockets, followed: their ports are not forwarded.
    served: ServedPorts,
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
    /// Writes the plan's entries for `status`; taken at a clean exit.
    status: Option<StatusWriter>,
}

/// What `run` refuses before it connects anywhere, beyond what the settings' own types hold.
pub fn check(settings: &Settings) -> Result<(), DaemonError> {
    if !valid_finalizer(&settings.finalizer) {
        return Err(DaemonError::Finalizer(settings.finalizer.clone()));
    }
    Ok(())
}

/// Runs until `shutdown` completes; a reconcile in progress finishes first.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    check(&settings)?;
    let (client, server) =
        client::client(settings.kubeconfig.as_deref(), settings.context.as_deref()).await?;
    tracing::info!(%server, "watching the cluster");
    let metrics = health::Shared::default();
    if let Some(address) = settings.health {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|error| DaemonError::Health(address, error))?;
        tokio::spawn(health::serve(listener, metrics.clone(), STALL));
    }
    let (lane, lane_done) = Lane::start(Cluster::new(
        client.clone(),
        settings.finalizer.clone(),
        settings.condition_type.clone(),
        settings.instance.clone(),
    ));
    let mut daemon = Daemon::new(settings, client, lane, metrics);
    let sources = Sources::subscribe(&daemon.client, &daemon.settings, &daemon.scopes, lane_done)?;
    daemon.start(sources.links.is_some());
    daemon.serve(sources, shutdown).await
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

impl Daemon {
    fn new(
        settings: Settings,
        client: kube::Client,
        lane: Lane,
        metrics: health::Shared,
    ) -> Daemon {
        let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
            vec![None]
        } else {
            settings.namespaces.iter().cloned().map(Some).collect()
        };
        Daemon {
            client,
            lane,
            holders_known: false,
            strays_swept: false,
            handed: HashMap::new(),
            recheck: BTreeSet::new(),
            buffers: vec![None; scopes.len()],
            synced: vec![false; scopes.len()],
            namespace_buffer: None,
            namespaces_synced: settings.policy.namespace_selector.is_none(),
            nodes_synced: settings.policy.node_ports == NodePorts::Off,
            node_buffer: None,
            scopes,
            store: Store::new(),
            planner: Planner::new(settings.policy.clone()),
            audit_plan: false,
            untold: BTreeSet::new(),
            status_dns: HashMap::new(),
            status_stale: false,
            status_built: None,
            gone: BTreeSet::new(),
            finalizers: Finalizers::default(),
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
            served: ServedPorts::start(),
            warned_private: false,
            upstream_told: HashMap::new(),
            upstream_asked: HashMap::new(),
            dns_handed: HashMap::new(),
            dns_warned: HashMap::new(),
            public: BTreeMap::new(),
            dns_families: HashMap::new(),
            dns_waiting: BTreeSet::new(),
            status: Some(StatusWriter::start(
                settings.status_file.clone(),
                settings.health.map(|a| a.to_string()),
            )),
            metrics,
            settings,
        }
    }

    /// What the daemon knows before the first list: the interfaces' addresses (when they are
    /// followed), the ports the router serves, the IGD's lane.
    fn start(&mut self, following_links: bool) {
        if following_links {
            self.follow_interfaces();
        }
        self.follow_served_ports();
        match self.settings.upstream.clone() {
            Some(upstream) => self.upstream = Some(Upstream::start(upstream, self.wan_ipv4())),
            // What an earlier run with an upstream wrote would read as this one's.
            None => {
                let _ = std::fs::remove_file(&self.settings.state_file);
            }
        }
        self.warn_private_wan();
        // Running, with nothing planned yet: `status` tells it apart from a stopped daemon.
        if let Some(status) = self.status.as_mut() {
            status.update(Vec::new());
        }
        tracing::info!(
            finalizer = %self.settings.finalizer,
            table = %self.settings.table.table,
            "starting; the kernel table stays as it is until the first complete list"
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(
            "waiting for the first complete list of Services",
        )]);
        if let Some(period) = sd_notify::watchdog_enabled() {
            tokio::spawn(feed_watchdog(self.metrics.clone(), period));
        }
    }

    /// The loop: takes what woke it, then runs a round if the plan's inputs changed.
    async fn serve(
        mut self,
        mut sources: Sources,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), DaemonError> {
        tokio::pin!(shutdown);
        loop {
            let wake = sources
                .next(
                    shutdown.as_mut(),
                    &mut self.prober,
                    &mut self.upstream,
                    &mut self.served,
                )
                .await;
            // `force`, set by a retry, a reload or a resync: apply even if the forwards
            // look unchanged.
            let (dirty, force) = match wake {
                Wake::Stop => break,
                Wake::Watch(inputs) => (
                    inputs.into_iter().fold(false, |d, i| self.take(i) | d),
                    false,
                ),
                Wake::Retry => (true, true),
                Wake::Hangup => {
                    self.reload_policy();
                    (true, true)
                }
                Wake::Resync => {
                    self.audit_plan = true;
                    // The round reads the router's sockets before it opens a port.
                    if let Some(engine) = self.engine.as_mut() {
                        engine.forget();
                    }
                    (true, true)
                }
                Wake::Links => (self.follow_addresses(), false),
                Wake::Upstream => (self.upstream_changed(), false),
                Wake::Table(touched) => self.table_touched(touched),
                Wake::Lane(all) => (
                    all.into_iter()
                        .fold(false, |d, done| self.lane_done(done) | d),
                    false,
                ),
                Wake::Health(all) => {
                    let dirty = all.into_iter().fold(false, |d, t| {
                        self.health_changed(t.check, t.up, &t.detail) | d
                    });
                    (dirty, false)
                }
                Wake::Sockets(sockets) => (self.take_sockets(&sockets), false),
                Wake::Heartbeat => {
                    self.progress();
                    (false, false)
                }
            };
            if let Some(retry) = self.settle(dirty, force).await? {
                sources.retry_at = retry.map(|delay| Instant::now() + delay);
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        if let Some(status) = self.status.take() {
            let _ = tokio::task::spawn_blocking(move || status.finish()).await;
        }
        tracing::info!("stopped; the kernel table stays as it is");
        Ok(())
    }

    /// nf_tables announced a change in the table. The engine's own commits are announced
    /// too: it knows their generations. Anyone else's change is read and compared, and a
    /// difference undone.
    fn table_touched(&mut self, touched: Touched) -> (bool, bool) {
        let own = match touched {
            Touched::At(generation) => self.engine.as_ref().is_some_and(|e| e.knows(generation)),
            Touched::Unknown => false,
        };
        if own {
            return (false, false);
        }
        tracing::debug!(
            ?touched,
            "nf_tables announced a change in the table; reading it"
        );
        if let Some(engine) = self.engine.as_mut() {
            engine.forget();
        }
        self.verify_outside_change = true;
        (true, true)
    }

    /// After what woke the loop: a round once every watch has listed, if the plan's inputs
    /// changed; else the Services whose finalizers or conditions alone changed are checked.
    /// Returns, for a round that ran, when to run again.
    async fn settle(
        &mut self,
        dirty: bool,
        force: bool,
    ) -> Result<Option<Option<Duration>>, DaemonError> {
        let synced = self.namespaces_synced && self.nodes_synced && self.synced.iter().all(|s| *s);
        if dirty && synced {
            // Watching every Service of every namespace, nothing can be outside the scope.
            let scoped = self.settings.selector.is_some() || !self.settings.namespaces.is_empty();
            if scoped && !self.strays_swept && (force || !self.ready) {
                self.sweep_strays().await;
            }
            self.recheck.clear();
            return self.reconcile(force).await.map(Some);
        }
        if synced && self.ready && !self.recheck.is_empty() {
            let keys = std::mem::take(&mut self.recheck);
            self.recheck(keys);
        }
        Ok(None)
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
