//! The daemon: watches Services through a kubeconfig, keeps the kernel table in step, and
//! owns this router's finalizer on every Service it forwards.
//!
//! Fail static: nothing is applied before the first complete list, and a watch error, an API
//! outage or a restart never removes a rule; only a complete list or a watch event that says
//! a Service changed or went does.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio::time::Instant;

use crate::audit;
use crate::controller::{self, Store, Summary};
use crate::health::{self, Metrics};
use crate::model::ForwardKey;
use crate::netlink::{Addresses, LinkEvents, TableEvents};
use crate::nft::{Applied, Engine, NftCli};
use crate::policy::Policy;
use crate::ruleset::{Ruleset, TableConfig};
use crate::watched::WatchedService;

pub const DEFAULT_FINALIZER: &str = "kube-port-forward-controller/finalizer";
pub const DEFAULT_CONDITION: &str = "kube-port-forward-controller/Forwarded";
/// Event notes longer than this are cut; the API server refuses notes over 1 kB.
const NOTE_MAX: usize = 1000;
/// The loop turns at least this often, to show it is alive (watchdog, `/healthz`).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// `/healthz` fails when the loop has not turned for this long (an apply is stuck).
const STALL: Duration = Duration::from_secs(60);

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
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot read kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot find a kubeconfig (give --kubeconfig or set KUBECONFIG)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot set up the Kubernetes client")]
    Client(#[source] kube::Error),
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

/// Builds the Kubernetes client from the kubeconfig named, or the usual places.
pub async fn client(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> Result<kube::Client, DaemonError> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let named = kubeconfig
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("KUBECONFIG").map(PathBuf::from));
    if let Some(path) = named {
        warn_if_readable_by_others(&path);
    }
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                DaemonError::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|source| DaemonError::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                })?
        }
        None if context.is_some() => {
            kube::Config::from_kubeconfig(&options)
                .await
                .map_err(|source| DaemonError::Kubeconfig {
                    path: "(KUBECONFIG)".into(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(DaemonError::Infer)?,
    };
    kube::Client::try_from(config).map_err(DaemonError::Client)
}

/// A kubeconfig holds credentials: say so when other users can read it. Only the path and
/// the mode are logged, never the contents.
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:04o}"),
                "the kubeconfig is readable by other users and holds credentials: chmod 600 it"
            );
        }
    }
}

/// Whether `finalizer` is a name the API server accepts (transcript 06).
pub fn valid_finalizer(finalizer: &str) -> bool {
    let Some((prefix, name)) = finalizer.split_once('/') else {
        return false;
    };
    let prefix_ok = !prefix.is_empty()
        && prefix.len() <= 253
        && prefix.split('.').all(crate::plan::is_dns_label);
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    prefix_ok && name_ok
}

struct Daemon {
    settings: Settings,
    client: kube::Client,
    recorder: Recorder,
    /// One scope per watch: `None` is every namespace.
    scopes: Vec<Option<String>>,
    store: Store,
    buffers: Vec<Option<Store>>,
    synced: Vec<bool>,
    namespace_buffer: Option<BTreeSet<String>>,
    /// The Namespace watch has listed once (or there is none).
    namespaces_synced: bool,
    engine: Option<Engine<NftCli>>,
    published: HashMap<(String, String), Summary>,
    /// Since when a Service's forwards have refused to leave the kernel.
    cleanup_since: HashMap<String, Instant>,
    ready: bool,
    failures: u32,
    metrics: health::Shared,
    /// WAN and router addresses given as flags, kept whatever the interfaces hold.
    fixed_wan: BTreeSet<IpAddr>,
    fixed_router: BTreeSet<IpAddr>,
    /// The next apply follows a deletion nf_tables announced in the table.
    verify_after_deletion: bool,
}

/// Runs until `shutdown` completes; a reconcile in progress finishes first.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    if !valid_finalizer(&settings.finalizer) {
        return Err(DaemonError::Finalizer(settings.finalizer.clone()));
    }
    let client = client(settings.kubeconfig.as_deref(), settings.context.as_deref()).await?;
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    let streams = scopes.iter().enumerate().map(|(index, scope)| {
        let api: Api<WatchedService> = match scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let mut config = watcher::Config::default();
        if let Some(selector) = &settings.selector {
            config = config.labels(selector);
        }
        watcher::watcher(api, config)
            .default_backoff()
            .map(move |event| Input::Services(index, Box::new(event)))
            .boxed()
    });
    let mut streams: Vec<futures::stream::BoxStream<'static, Input>> = streams.collect();
    let watch_namespaces = settings.policy.namespace_selector.is_some();
    if let Some(selector) = &settings.policy.namespace_selector {
        // Metadata only: labels are all the selector needs.
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        let config = watcher::Config::default().labels(selector.as_str());
        streams.push(
            watcher::watcher(api, config)
                .default_backoff()
                .map(|event| Input::Namespaces(Box::new(event)))
                .boxed(),
        );
    }
    let mut events = futures::stream::select_all(streams);
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
    let reporter = Reporter {
        controller: "kube-port-forward-controller".into(),
        instance: Some(settings.instance.clone()),
    };
    let mut daemon = Daemon {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        buffers: vec![None; scopes.len()],
        synced: vec![false; scopes.len()],
        namespace_buffer: None,
        namespaces_synced: !watch_namespaces,
        scopes,
        store: Store::new(),
        engine: Some(Engine::new(settings.nft.clone())),
        published: HashMap::new(),
        cleanup_since: HashMap::new(),
        ready: false,
        failures: 0,
        metrics,
        fixed_wan: settings.table.wan_addresses.clone(),
        // The WAN flags; the interfaces' addresses are read again at every change.
        fixed_router: settings.table.wan_addresses.clone(),
        verify_after_deletion: false,
        settings,
    };
    if links.is_some() {
        daemon.follow_addresses();
    }
    tracing::info!(
        finalizer = %daemon.settings.finalizer,
        table = %daemon.settings.table.table,
        "starting; the kernel table stays as it is until the first complete list"
    );
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
                dirty = true;
                force = true;
            }
            () = changed(&mut links) => {
                dirty |= daemon.follow_addresses();
            }
            () = touched(&mut tables) => {
                // Our own rebuilds are announced too: read the table whole and compare, and
                // only a difference (someone else's deletion) brings a rebuild.
                tracing::debug!("nf_tables announced a deletion in the table; reading it");
                if let Some(engine) = daemon.engine.as_mut() {
                    engine.forget();
                }
                daemon.verify_after_deletion = true;
                dirty = true;
                force = true;
            }
            _ = heartbeat.tick() => daemon.progress(),
        }
        if dirty && daemon.namespaces_synced && daemon.synced.iter().all(|s| *s) {
            match daemon.reconcile(force).await? {
                Some(delay) => retry_at = Some(Instant::now() + delay),
                None => retry_at = None,
            }
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("stopped; the kernel table stays as it is");
    Ok(())
}

/// Tells systemd the daemon is alive while its loop turns or a round makes progress: a
/// loop stuck on a hung `nft` or API call stops the pings, and systemd restarts it.
async fn feed_watchdog(metrics: health::Shared, period: Duration) {
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tick.tick().await;
        let alive = health::lock(&metrics).alive(std::time::Instant::now(), period);
        if alive {
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

async fn touched(tables: &mut Option<TableEvents>) {
    match tables {
        Some(tables) => tables.table_touched().await,
        None => std::future::pending().await,
    }
}

/// What the watches deliver.
enum Input {
    Services(usize, Box<Result<Event<WatchedService>, watcher::Error>>),
    Namespaces(Box<Result<Event<PartialObjectMeta<Namespace>>, watcher::Error>>),
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

    /// Reads the interfaces' addresses into the WAN sets and the policy's router addresses;
    /// returns whether either changed. A failed read keeps the addresses known.
    fn follow_addresses(&mut self) -> bool {
        let addresses = match Addresses::read(&self.settings.table.wan_interfaces) {
            Ok(addresses) => addresses,
            Err(error) => {
                tracing::error!(%error, "cannot read the interfaces' addresses; keeping the known ones");
                return false;
            }
        };
        let router: BTreeSet<IpAddr> = self.fixed_router.union(&addresses.all).copied().collect();
        let policy_changed = router != self.settings.policy.router_addresses;
        self.settings.policy.router_addresses = router;
        if self.settings.table.wan_interfaces.is_empty() {
            return policy_changed;
        }
        let wan: BTreeSet<IpAddr> = self.fixed_wan.union(&addresses.wan).copied().collect();
        if wan == self.settings.table.wan_addresses {
            return policy_changed;
        }
        let list: Vec<String> = wan.iter().map(ToString::to_string).collect();
        tracing::info!(
            action = "wan",
            interfaces = ?self.settings.table.wan_interfaces,
            addresses = %list.join(","),
            "WAN addresses changed"
        );
        self.lock_metrics().wan_addresses = wan.len();
        self.settings.table.wan_addresses = wan;
        true
    }

    /// Re-reads the policy file on SIGHUP. A policy that cannot be read leaves the one in
    /// force unchanged.
    fn reload_policy(&mut self) {
        let Some(file) = &self.settings.policy_file else {
            tracing::info!("SIGHUP: no policy file to re-read");
            return;
        };
        match Policy::read(file) {
            Ok(mut policy) => {
                let current = &self.settings.policy;
                policy.router_addresses = current.router_addresses.clone();
                if policy.namespace_selector != current.namespace_selector {
                    tracing::error!(
                        "the namespace selector cannot change on reload (the Namespace watch is set up at start); keeping the current one: restart to change it"
                    );
                    policy.namespace_selector = current.namespace_selector.clone();
                }
                policy.selected_namespaces = current.selected_namespaces.clone();
                self.settings.policy = policy;
                tracing::info!(action = "policy", file = %file.display(), "policy reloaded");
            }
            Err(error) => {
                tracing::error!(%error, "policy not reloaded; the previous one stays in force");
            }
        }
    }

    /// Takes one watch event; returns whether what the plan depends on changed.
    fn take(&mut self, input: Input) -> bool {
        match input {
            Input::Services(index, event) => self.handle(index, *event),
            Input::Namespaces(event) => self.handle_namespace(*event),
        }
    }

    /// Namespaces matching the policy's selector, from their metadata watch.
    fn handle_namespace(
        &mut self,
        event: Result<Event<PartialObjectMeta<Namespace>>, watcher::Error>,
    ) -> bool {
        let name =
            |meta: &PartialObjectMeta<Namespace>| meta.metadata.name.clone().unwrap_or_default();
        let selected = &mut self.settings.policy.selected_namespaces;
        match event {
            Ok(Event::Init) => {
                self.namespace_buffer = Some(BTreeSet::new());
                false
            }
            Ok(Event::InitApply(meta)) => {
                if let Some(buffer) = self.namespace_buffer.as_mut() {
                    buffer.insert(name(&meta));
                }
                false
            }
            Ok(Event::InitDone) => {
                *selected = self.namespace_buffer.take().unwrap_or_default();
                tracing::info!(namespaces = selected.len(), "namespaces the policy selects");
                self.namespaces_synced = true;
                true
            }
            Ok(Event::Apply(meta)) => selected.insert(name(&meta)),
            Ok(Event::Delete(meta)) => selected.remove(&name(&meta)),
            Err(error) => {
                health::lock(&self.metrics).watch_errors += 1;
                tracing::warn!(%error, "watching Namespaces failed; rules stay, retrying");
                false
            }
        }
    }

    /// Takes one watch event of Services; returns whether they changed.
    fn handle(
        &mut self,
        index: usize,
        event: Result<Event<WatchedService>, watcher::Error>,
    ) -> bool {
        match event {
            Ok(Event::Init) => {
                self.buffers[index] = Some(Store::new());
                false
            }
            Ok(Event::InitApply(service)) => {
                let key = service.key();
                if let Some(buffer) = self.buffers[index].as_mut()
                    && service.tracked.relevant(&self.settings.finalizer)
                {
                    buffer.insert(key, service.tracked);
                }
                false
            }
            Ok(Event::InitDone) => {
                let listed = self.buffers[index].take().unwrap_or_default();
                match &self.scopes[index] {
                    Some(ns) => self.store.retain(|(n, _), _| n != ns),
                    None => self.store.clear(),
                }
                tracing::info!(services = listed.len(), "complete list of Services");
                self.store.extend(listed);
                self.synced[index] = true;
                true
            }
            Ok(Event::Apply(service)) => {
                let key = service.key();
                if service.tracked.relevant(&self.settings.finalizer) {
                    self.store.insert(key, service.tracked);
                    true
                } else {
                    self.store.remove(&key).is_some()
                }
            }
            Ok(Event::Delete(service)) => self.store.remove(&service.key()).is_some(),
            Err(error) => {
                self.lock_metrics().watch_errors += 1;
                tracing::warn!(%error, "watching Services failed; rules stay, retrying");
                false
            }
        }
    }

    /// One round: apply, then finalizers, events and conditions. Returns when to try again
    /// if something is left to do. Unless `force`d, forwards equal to those applied last are
    /// not sent again: most events (the daemon's own finalizer and condition writes among
    /// them) change no forward.
    async fn reconcile(&mut self, force: bool) -> Result<Option<Duration>, DaemonError> {
        let finalizer = self.settings.finalizer.clone();
        let decision = controller::decide(&self.store, &finalizer, &self.settings.policy);
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

    fn api(&self, ns: &str) -> Api<WatchedService> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Adds this router's finalizer, guarded so no other finalizer is rewritten.
    async fn add_finalizer(&mut self, key: &(String, String)) {
        let Some(watched) = self.store.get(key) else {
            return;
        };
        let patch = match watched.finalizers.as_slice() {
            [] => json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [self.settings.finalizer]},
            ]),
            list => json!([
                {"op": "test", "path": "/metadata/finalizers", "value": list},
                {"op": "add", "path": "/metadata/finalizers/-", "value": self.settings.finalizer},
            ]),
        };
        self.patch_finalizers(key, patch, "added").await;
    }

    async fn remove_finalizer(&mut self, key: &(String, String)) -> bool {
        let Some(index) = self
            .store
            .get(key)
            .and_then(|w| w.finalizer_index(&self.settings.finalizer))
        else {
            return false;
        };
        let path = format!("/metadata/finalizers/{index}");
        let patch = json!([
            {"op": "test", "path": path, "value": self.settings.finalizer},
            {"op": "remove", "path": path},
        ]);
        self.patch_finalizers(key, patch, "removed").await
    }

    async fn patch_finalizers(
        &mut self,
        key: &(String, String),
        patch: serde_json::Value,
        what: &str,
    ) -> bool {
        let patch: json_patch::Patch = serde_json::from_value(patch).expect("a valid JSON Patch");
        let result = self
            .api(&key.0)
            .patch(&key.1, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await;
        self.progress();
        match result {
            Ok(updated) => {
                tracing::info!(
                    action = "finalizer",
                    namespace = %key.0,
                    name = %key.1,
                    finalizer = %self.settings.finalizer,
                    "finalizer {what}"
                );
                if updated.metadata.name.is_some() {
                    self.store.insert(key.clone(), updated.tracked);
                }
                true
            }
            // The Service changed meanwhile (the guard failed, it is being deleted, or it is
            // gone); its watch event brings the next round.
            Err(error) => {
                tracing::debug!(%error, namespace = %key.0, name = %key.1, "finalizer not {what}");
                false
            }
        }
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
    fn cleanup_overdue(&mut self, key: &(String, String)) -> bool {
        let Some(uid) = self.store.get(key).map(|t| t.uid.clone()) else {
            return false;
        };
        let since = *self.cleanup_since.entry(uid).or_insert_with(Instant::now);
        since.elapsed() >= self.settings.cleanup_deadline
    }

    async fn release_anyway(&mut self, key: &(String, String)) {
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

    /// Normal events for forwards opened and closed, one per Service.
    async fn report_changes(&mut self, applied: &Applied) {
        let by_uid: HashMap<&str, &(String, String)> =
            self.store.iter().map(|(k, w)| (w.uid(), k)).collect();
        let mut notes: BTreeMap<(String, String), (Vec<String>, Vec<String>)> = BTreeMap::new();
        for forward in &applied.added {
            if let Some(key) = forward.owner.uid.as_deref().and_then(|u| by_uid.get(u)) {
                notes
                    .entry((*key).clone())
                    .or_default()
                    .0
                    .push(format!("{} -> {}", forward.key, forward.target));
            }
        }
        for removed in &applied.removed {
            if let Some(key) = removed.uid.as_deref().and_then(|u| by_uid.get(u)) {
                notes
                    .entry((*key).clone())
                    .or_default()
                    .1
                    .push(removed.key.to_string());
            }
        }
        for (key, (opened, closed)) in notes {
            if !opened.is_empty() {
                let note = format!(
                    "opened on router {}: {}",
                    self.settings.instance,
                    opened.join(", ")
                );
                self.event(&key, EventType::Normal, "PortsOpened", "Forward", &note)
                    .await;
            }
            if !closed.is_empty() {
                let note = format!(
                    "closed on router {}: {}",
                    self.settings.instance,
                    closed.join(", ")
                );
                self.event(&key, EventType::Normal, "PortsClosed", "Forward", &note)
                    .await;
            }
        }
    }

    async fn warn(&mut self, key: &(String, String), reason: &str, note: &str) {
        self.event(key, EventType::Warning, reason, "Forward", note)
            .await;
    }

    async fn event(
        &self,
        key: &(String, String),
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        let Some(watched) = self.store.get(key) else {
            return;
        };
        let mut note = note.to_owned();
        if note.len() > NOTE_MAX {
            let mut cut = NOTE_MAX;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let event = KubeEvent {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        let result = self
            .recorder
            .publish(&event, &watched.object_ref(key))
            .await;
        self.progress();
        if let Err(error) = result {
            tracing::warn!(%error, namespace = %key.0, name = %key.1, "cannot publish an event");
        }
    }

    /// The event and this router's condition for a Service whose summary changed.
    async fn publish(&self, key: &(String, String), summary: &Summary) {
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
        let now = k8s_openapi::jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let condition = json!({"status": {"conditions": [{
            "type": self.settings.condition_type,
            "status": summary.status,
            "reason": summary.reason,
            "message": format!("router {}: {}", self.settings.instance, summary.message),
            "lastTransitionTime": now,
        }]}});
        // A strategic merge keys conditions by type, so each router's stays its own.
        let result = self
            .api(&key.0)
            .patch_status(
                &key.1,
                &PatchParams::default(),
                &Patch::Strategic(condition),
            )
            .await;
        self.progress();
        if let Err(error) = result {
            tracing::debug!(%error, namespace = %key.0, name = %key.1, "condition not written");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finalizer_names_are_qualified() {
        assert!(valid_finalizer(DEFAULT_FINALIZER));
        assert!(valid_finalizer("kube-port-forward-controller/router-b"));
        assert!(!valid_finalizer(
            "kube-port-forward-controller/finalizer:port1=80"
        ));
        assert!(!valid_finalizer("no-prefix"));
        assert!(!valid_finalizer("Upper.Case/x"));
    }
}
