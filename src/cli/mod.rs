//! Command-line interface: the flags, and the commands that need no cluster.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cluster::client::{self, ClientError};
use crate::cluster::finalizer;
use crate::core::health::Thresholds;
use crate::core::plan::{self, Plan, State};
use crate::core::policy::{NodePorts, Policy, PolicyError, PolicyParts};
use crate::daemon::{self, DaemonError};
use crate::kernel::{
    ConfigError, DEFAULT_TABLE, Engine, Kernel, KernelError, NftCli, Ruleset, TableConfig,
};
use crate::router::igd::Url;
use crate::router::links::Addresses;
use crate::router::probe::ProbeSettings;
use crate::router::upstream::UpstreamSettings;
use crate::router::{audit, health, policy_file, sockets};
use manifest::{ManifestError, Manifests};

pub mod manifest;
pub mod output;

/// Exit codes, documented in README.
pub mod exit {
    pub const OK: u8 = 0;
    /// The kernel refused or `nft` could not run.
    pub const FAILED: u8 = 1;
    /// Bad flags, configuration or manifests.
    pub const BAD_INPUT: u8 = 2;
    /// `plan --check`: an entry is invalid or in conflict, or a Service was refused.
    pub const CHECK: u8 = 3;
}

#[derive(Debug, Parser)]
#[command(
    name = "kube-port-forward",
    version,
    about = "Forward router ports to Kubernetes Services"
)]
pub struct Cli {
    /// Log at debug level (the nft commands run, among others).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// The nft program that builds and rebuilds the table (default: `nft` from PATH); changes go over netlink.
    #[arg(long, global = true, value_name = "PROGRAM")]
    pub nft: Option<std::ffi::OsString>,
    /// Seconds one nft run may take before it is killed and counted as a failure.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = crate::kernel::nft::DEFAULT_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub nft_timeout: u64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the forwards and the nft table for Service manifests. No kernel, no cluster, no root.
    Plan {
        /// A manifest file (YAML or JSON), a folder of them, or `-` for standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[arg(short, long, value_enum, default_value_t = Format::Text)]
        output: Format,
        /// Exit with 3 if any entry is invalid, in conflict or refused by policy, or a
        /// Service could not be read.
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        table: TableArgs,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Apply the forwards of Service manifests to the kernel table, once (needs CAP_NET_ADMIN).
    Apply {
        /// A manifest file (YAML or JSON), a folder of them, or `-` for standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        table: TableArgs,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Run the daemon: watch Services and keep the router's forwards in step.
    Run {
        /// Only check the flags, the policy and the kubeconfig, and print `ok` (exit 2 with
        /// the reason otherwise). No kernel, no network, no root.
        #[arg(long)]
        check: bool,
        /// Where the daemon writes each Service's entries, their states and reasons, for
        /// `status`; removed when it stops.
        #[arg(long, default_value = DEFAULT_STATUS_FILE)]
        status_file: PathBuf,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// This router's finalizer; a second router needs its own.
        #[arg(long, default_value = daemon::DEFAULT_FINALIZER)]
        finalizer: String,
        /// This router's condition type on each Service; a second router needs its own.
        #[arg(long, default_value = daemon::DEFAULT_CONDITION)]
        condition_type: String,
        /// This router's name in events (default: the host name).
        #[arg(long)]
        instance: Option<String>,
        /// Seconds a failing cleanup may take before the finalizer is released anyway.
        #[arg(long, default_value_t = 300)]
        cleanup_deadline: u64,
        /// Seconds between full reads of the kernel table.
        #[arg(long, default_value_t = 300)]
        resync: u64,
        /// Serve /healthz, /readyz and /metrics on this address (keep it on loopback).
        #[arg(long, value_name = "ADDRESS:PORT")]
        health: Option<std::net::SocketAddr>,
        #[command(flatten)]
        checks: Box<CheckArgs>,
        #[command(flatten)]
        beyond: Box<BeyondArgs>,
        #[command(flatten)]
        table: TableArgs,
        #[command(flatten)]
        policy: Box<PolicyArgs>,
    },
    /// Remove this router's finalizer from every Service (before uninstalling).
    ReleaseFinalizers {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[arg(long, default_value = daemon::DEFAULT_FINALIZER)]
        finalizer: String,
    },
    /// List what the kernel table holds now: forwards, owners, counters.
    Status {
        /// Name of the inet table.
        #[arg(long, default_value = DEFAULT_TABLE)]
        table: String,
        #[arg(short, long, value_enum, default_value_t = Format::Text)]
        output: Format,
        /// Where the daemon writes what the upstream IGD said.
        #[arg(long, default_value = DEFAULT_STATE_FILE)]
        state_file: PathBuf,
        /// Where the daemon writes its Services' entries (`run --status-file`).
        #[arg(long, default_value = DEFAULT_STATUS_FILE)]
        status_file: PathBuf,
    },
}

/// Where the daemon writes what the upstream IGD said, and `status` reads it.
pub const DEFAULT_STATE_FILE: &str = "/run/kube-port-forward/upstream.json";
/// Where the daemon writes its Services' entries, and `status` reads them.
pub const DEFAULT_STATUS_FILE: &str = "/run/kube-port-forward/status.json";

/// What lies beyond the router's WAN: the IGD of a box in front of it, and DNS.
#[derive(Debug, Args)]
pub struct BeyondArgs {
    /// Behind another router (double NAT): `upnp` maps every IPv4 TCP and UDP forward on its
    /// UPnP IGD too, to this router's WAN address.
    #[arg(long, value_enum, default_value_t = UpstreamKind::Off)]
    upstream: UpstreamKind,
    /// The IGD's description or control URL (default: found by SSDP on the WAN).
    #[arg(long, value_name = "URL")]
    upstream_url: Option<String>,
    /// Seconds each upstream mapping is leased for, renewed at half time (0: permanent).
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    upstream_lease: u32,
    /// Seconds between checks that the IGD is there, has not restarted, and of its address.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    upstream_poll: f64,
    /// Write the router's public address (the IGD's external one behind double NAT) as the
    /// external-dns target of every Service it forwards.
    #[arg(long)]
    dns_targets: bool,
    /// Where the daemon writes what the upstream IGD said, for `status`.
    #[arg(long, default_value = DEFAULT_STATE_FILE)]
    state_file: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UpstreamKind {
    Off,
    Upnp,
}

impl BeyondArgs {
    fn upstream(&self) -> Result<Option<UpstreamSettings>, CommandError> {
        let bad = |text: String| Err(CommandError::Upstream(text));
        if self.upstream == UpstreamKind::Off {
            if let Some(url) = &self.upstream_url {
                return bad(format!("--upstream-url {url} needs --upstream upnp"));
            }
            return Ok(None);
        }
        let url = match &self.upstream_url {
            Some(text) => Some(
                Url::parse(text)
                    .map_err(|e| CommandError::Upstream(format!("--upstream-url {e}")))?,
            ),
            None => None,
        };
        if self.upstream_lease != 0 && !(10..=604_800).contains(&self.upstream_lease) {
            return bad(format!(
                "--upstream-lease {}: give 0 (permanent) or seconds from 10 to 604800",
                self.upstream_lease
            ));
        }
        if !(self.upstream_poll.is_finite() && (1.0..=3600.0).contains(&self.upstream_poll)) {
            return bad(format!(
                "--upstream-poll {}: give seconds from 1 to 3600",
                self.upstream_poll
            ));
        }
        Ok(Some(UpstreamSettings {
            url,
            lease: Duration::from_secs(u64::from(self.upstream_lease)),
            poll: Duration::from_secs_f64(self.upstream_poll),
            ..UpstreamSettings::default()
        }))
    }
}

#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// kubeconfig file (default: KUBECONFIG, then ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig context (default: its current context).
    #[arg(long)]
    pub context: Option<String>,
    /// Watch only this namespace (repeat, or separate with commas); default: all.
    #[arg(long = "namespace", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Watch only Services with these labels (`key=value,...`).
    #[arg(long)]
    pub selector: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Health checks of the backends of forwards with several (a Service can turn its own off
/// with the annotation `kube-port-forward-controller/health-check: "off"`).
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Seconds between two probes of a backend.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    check_interval: f64,
    /// Seconds a probe may take.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    check_timeout: f64,
    /// Failed probes in a row that take a backend out of its forwards.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    check_fall: u32,
    /// Passed probes in a row that bring it back.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    check_rise: u32,
    /// Probes running at once, at most.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    check_concurrency: u32,
}

impl CheckArgs {
    fn settings(&self) -> Result<ProbeSettings, CommandError> {
        let seconds = |flag: &'static str, value: f64, min: f64| {
            if value.is_finite() && (min..=3600.0).contains(&value) {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err(CommandError::Checks(format!(
                    "--{flag} {value}: give seconds from {min} to 3600"
                )))
            }
        };
        let interval = seconds("check-interval", self.check_interval, 0.1)?;
        let timeout = seconds("check-timeout", self.check_timeout, 0.01)?;
        if timeout >= interval {
            return Err(CommandError::Checks(format!(
                "--check-timeout {} is not shorter than --check-interval {}",
                self.check_timeout, self.check_interval
            )));
        }
        Ok(ProbeSettings {
            interval,
            timeout,
            thresholds: Thresholds {
                fall: self.check_fall,
                rise: self.check_rise,
            },
            concurrency: self.check_concurrency as usize,
        })
    }
}

#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// Only Services in these namespaces may open ports (repeat, or separate with commas);
    /// default: every namespace.
    #[arg(
        long = "allow-namespace",
        value_delimiter = ',',
        conflicts_with = "policy"
    )]
    pub allowed_namespaces: Vec<String>,
    /// Also Services in namespaces with these labels (`key=value,...`; `run` watches
    /// Namespaces, `plan` and `apply` read Namespace manifests).
    #[arg(long = "allow-namespace-selector", conflicts_with = "policy")]
    pub namespace_selector: Option<String>,
    /// External ports that may be opened, e.g. `80,443,8000-8999`; default: all but those
    /// the router itself serves on its WAN side, which are opened only when named here.
    #[arg(long = "allow-ports", conflicts_with = "policy")]
    pub allowed_ports: Option<String>,
    /// Networks forwards may point at (repeat, or separate with commas); default: the
    /// private ranges 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7.
    #[arg(
        long = "allow-target",
        value_delimiter = ',',
        conflicts_with = "policy"
    )]
    pub allowed_targets: Vec<String>,
    /// Also forward to `spec.externalIPs` when a Service has no LoadBalancer address. Off by
    /// default: anyone who may create a Service may write any address there
    /// (CVE-2020-8554).
    #[arg(long = "allow-external-ips", conflicts_with = "policy")]
    pub external_ips: bool,
    /// Forward Services without a LoadBalancer address to their node ports on the Ready
    /// nodes: `off`, `annotated` (those annotated
    /// `kube-port-forward-controller/target: nodeports`) or `all`. The daemon then watches
    /// Nodes (RBAC: nodes list and watch).
    #[arg(long = "node-ports", value_parser = ["off", "annotated", "all"], default_value = "off", conflicts_with = "policy")]
    pub node_ports: String,
    /// A YAML file with `namespaces`, `namespace_selector`, `ports`, `targets`,
    /// `external_ips` and `node_ports` instead of the flags; `run` re-reads it on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
}

impl PolicyArgs {
    /// The policy, with `router` as the router's own addresses. An error in a flag names it.
    fn policy(&self, router: impl IntoIterator<Item = IpAddr>) -> Result<Policy, CommandError> {
        let mut policy = match &self.policy {
            Some(file) => policy_file::read(file)?,
            None => Policy::from_parts(&PolicyParts {
                namespaces: Some(self.allowed_namespaces.clone()),
                namespace_selector: self.namespace_selector.clone(),
                ports: self.allowed_ports.clone(),
                targets: Some(self.allowed_targets.clone()),
                external_ips: Some(self.external_ips),
                node_ports: NodePorts::parse(&self.node_ports),
            })
            .map_err(|source| CommandError::PolicyFlag {
                flag: match source {
                    PolicyError::Ports(_) => "--allow-ports",
                    PolicyError::Target(_) => "--allow-target",
                    PolicyError::Namespace(_) => "--allow-namespace",
                    PolicyError::Selector(_) => "--allow-namespace-selector",
                    PolicyError::Read { .. } | PolicyError::Syntax { .. } => "--policy",
                },
                source,
            })?,
        };
        policy.router_addresses.extend(router);
        Ok(policy)
    }
}

#[derive(Debug, Args)]
pub struct TableArgs {
    /// Name of the inet table the daemon owns.
    #[arg(long, default_value = DEFAULT_TABLE)]
    pub table: String,
    /// Forward only packets arriving on this interface (repeat, or separate with commas).
    #[arg(long = "wan-interface", value_delimiter = ',')]
    pub wan_interfaces: Vec<String>,
    /// Forward only packets addressed to this router address (repeat, or separate with
    /// commas). Without any, packets to any local address of the router.
    #[arg(long = "wan-address", value_delimiter = ',')]
    pub wan_addresses: Vec<IpAddr>,
    /// NAT reflection: LAN clients reach forwards through the WAN address too. Needs
    /// --wan-interface, and WAN addresses (`run` follows the interfaces' own).
    #[arg(
        long,
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub reflection: bool,
    /// Conntrack mark bit set on forwarded flows (a firewall accepts them by it); the next
    /// bit up marks reflected flows. One bit, at most 0x40000000.
    #[arg(long, default_value = "0x00200000", value_parser = parse_mark)]
    pub ct_mark: u32,
}

impl TableArgs {
    fn config(&self) -> Result<TableConfig, ConfigError> {
        let mut config = TableConfig::new(
            &self.table,
            self.wan_interfaces.iter().cloned(),
            self.wan_addresses.iter().copied(),
        )?;
        config.reflection = self.reflection;
        config.ct_mark = self.ct_mark;
        Ok(config)
    }
}

/// A conntrack mark bit, in hex (`0x…`) or decimal.
fn parse_mark(text: &str) -> Result<u32, String> {
    let value = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|e| format!("not a number: {e}"))?;
    if value.count_ones() != 1 || value > 0x4000_0000 {
        return Err(
            "one bit, from 0x1 to 0x40000000 (the next bit up marks reflected flows)".into(),
        );
    }
    Ok(value)
}

/// Why a command failed; `main` turns it into a message and an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{flag}")]
    PolicyFlag {
        flag: &'static str,
        #[source]
        source: PolicyError,
    },
    #[error(
        "applying needs --wan-interface or --wan-address: without either, every port of every router address would be forwarded"
    )]
    NoWan,
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("health checks: {0}")]
    Checks(String),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("cannot read the ports the router serves (/proc/net)")]
    Sockets(#[source] std::io::Error),
    #[error("listing Services at {server} failed")]
    Kube {
        server: String,
        #[source]
        source: kube::Error,
    },
    /// `run --check` found this: bad input, whatever it is.
    #[error(transparent)]
    Check(Box<CommandError>),
}

impl CommandError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Kernel(_)
            | CommandError::Runtime(_)
            | CommandError::Kube { .. }
            | CommandError::Sockets(_)
            | CommandError::Client(ClientError::Build(_))
            | CommandError::Daemon(
                DaemonError::Client(ClientError::Build(_)) | DaemonError::Worker,
            ) => exit::FAILED,
            _ => exit::BAD_INPUT,
        }
    }
}

fn read_all(files: &[PathBuf]) -> Result<Manifests, ManifestError> {
    let mut all = Manifests::default();
    for file in files {
        let m = manifest::read(file)?;
        all.services.extend(m.services);
        all.refused.extend(m.refused);
        all.namespaces.extend(m.namespaces);
        all.nodes.extend(m.nodes);
        all.skipped += m.skipped;
    }
    Ok(all)
}

fn planned(
    files: &[PathBuf],
    table: &TableArgs,
    policy: &Policy,
) -> Result<(Manifests, Plan, Ruleset), CommandError> {
    let config = table.config()?;
    let manifests = read_all(files)?;
    // Offline, the namespace selector is matched against the Namespace manifests given.
    let mut policy = policy.clone();
    if let Some(selector) = &policy.namespace_selector {
        policy.selected_namespaces = manifests
            .namespaces
            .iter()
            .filter(|(_, labels)| selector.matches(labels))
            .map(|(name, _)| name.clone())
            .collect();
    }
    // Offline, the nodes are the Node manifests given.
    policy.nodes = manifests.nodes.clone();
    let plan = plan::plan(&manifests.services, &policy);
    let ruleset = Ruleset::new(config, plan.forwards.clone());
    Ok((manifests, plan, ruleset))
}

/// The policy with a WAN named, before the host is read: the WAN addresses given are the
/// router's own.
fn wan_policy(table: &TableArgs, policy: &PolicyArgs) -> Result<Policy, CommandError> {
    if table.wan_interfaces.is_empty() && table.wan_addresses.is_empty() {
        return Err(CommandError::NoWan);
    }
    policy.policy(table.wan_addresses.iter().copied())
}

/// Runs a command; returns the exit code for success paths.
pub fn run(command: Command, nft: NftCli) -> Result<u8, CommandError> {
    match command {
        Command::Plan {
            files,
            output,
            check,
            table,
            policy,
        } => {
            // Offline: the router's own addresses are the WAN addresses given.
            let policy = policy.policy(table.wan_addresses.iter().copied())?;
            let (manifests, plan, ruleset) = planned(&files, &table, &policy)?;
            emit(&match output {
                Format::Text => output::plan_text(&plan, &manifests, &ruleset),
                Format::Json => output::plan_json(&plan, &manifests, &ruleset),
            });
            let problems = plan.count(State::Invalid)
                + plan.count(State::Conflict)
                + plan.count(State::Refused)
                + manifests.refused.len();
            Ok(if check && problems > 0 {
                exit::CHECK
            } else {
                exit::OK
            })
        }
        Command::Apply {
            files,
            table,
            policy,
        } => {
            let policy = on_router(&table, &policy)?;
            let (manifests, plan, ruleset) = planned(&files, &table, &policy)?;
            for refused in &manifests.refused {
                tracing::warn!(%refused, "Service refused");
            }
            for outcome in plan
                .outcomes
                .iter()
                .filter(|o| o.state != State::Forwarding)
            {
                tracing::warn!(
                    namespace = %outcome.namespace,
                    name = %outcome.name,
                    entry = %outcome.entry,
                    reason = outcome.reason.as_deref().unwrap_or(""),
                    "entry not forwarded"
                );
            }
            let (table, count) = (ruleset.config.table.clone(), ruleset.forwards.len());
            let applied = Engine::new(Kernel::new(nft)).apply(ruleset)?;
            audit::record(&table, &applied);
            emit(&format!(
                "{count} forwards in table inet {table}: {} opened, {} closed{}\n",
                applied.added.len(),
                applied.removed.len(),
                if applied.sent {
                    ""
                } else {
                    " (nothing to change)"
                }
            ));
            Ok(exit::OK)
        }
        Command::Run {
            check,
            status_file,
            cluster,
            finalizer,
            condition_type,
            instance,
            cleanup_deadline,
            resync,
            health,
            checks,
            beyond,
            table,
            policy,
        } => {
            let mut config = table.config()?;
            // The daemon fills the WAN sets from the interfaces, even while they are empty.
            config.listed_addresses = true;
            // A check validates, and leaves the host's addresses and sockets, which only add
            // to what the policy refuses, unread: that needs no root and no router.
            let policy_of = if check { wan_policy } else { on_router };
            let settings = daemon::Settings {
                policy: policy_of(&table, &policy)?,
                policy_file: policy.policy.clone(),
                kubeconfig: cluster.kubeconfig,
                context: cluster.context,
                namespaces: cluster.namespaces,
                selector: cluster.selector,
                finalizer,
                condition_type,
                instance: instance.unwrap_or_else(host_name),
                table: config,
                health,
                probes: checks.settings()?,
                upstream: beyond.upstream()?,
                dns_targets: beyond.dns_targets,
                state_file: beyond.state_file.clone(),
                status_file,
                cleanup_deadline: Duration::from_secs(cleanup_deadline),
                resync: Duration::from_secs(resync.max(1)),
                nft,
            };
            if check {
                daemon::check(&settings).map_err(|e| CommandError::Check(Box::new(e.into())))?;
                if let Some(kubeconfig) = settings.kubeconfig.as_deref() {
                    let context = settings.context.as_deref();
                    runtime()?
                        .block_on(client::client(Some(kubeconfig), context))
                        .map_err(|e| CommandError::Check(Box::new(e.into())))?;
                }
                emit("ok\n");
                return Ok(exit::OK);
            }
            runtime()?.block_on(daemon::run(settings, shutdown_signal()))?;
            Ok(exit::OK)
        }
        Command::ReleaseFinalizers { cluster, finalizer } => {
            let released = runtime()?.block_on(release_finalizers(cluster, finalizer))?;
            emit(&format!("released the finalizer of {released} Services\n"));
            Ok(exit::OK)
        }
        Command::Status {
            table,
            output,
            state_file,
            status_file,
        } => {
            TableConfig::new(&table, [], [])?;
            let current = Engine::new(Kernel::new(nft)).read(&table, None)?;
            let upstream = output::Upstream::read(&state_file);
            let written = output::Written::read(&status_file);
            let asked = match written.as_ref().and_then(output::Written::health) {
                Some(address) => Some(runtime()?.block_on(ask(address))),
                None => None,
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let daemon = output::DaemonView::new(written.as_ref(), asked.as_ref(), now);
            let (current, upstream) = (current.as_ref(), upstream.as_ref());
            emit(&match output {
                Format::Text => output::status_text(&table, current, upstream, &daemon),
                Format::Json => output::status_json(&table, current, upstream, &daemon),
            });
            Ok(exit::OK)
        }
    }
}

/// Asks a running daemon's health server whether it is ready, then for its metrics; each
/// question gets at most [`ASK_TIMEOUT`].
async fn ask(address: &str) -> output::Asked {
    let get = |path: &'static str| async move {
        tokio::time::timeout(ASK_TIMEOUT, health::get(address, path))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} s", ASK_TIMEOUT.as_secs())))
    };
    let readyz = get("/readyz").await;
    let metrics = match &readyz {
        Ok(_) => get("/metrics").await,
        Err(why) => Err(why.clone()),
    };
    output::Asked { readyz, metrics }
}

/// How long `status` waits for each answer of the daemon's health server.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// Prints a command's output. A reader that stopped reading (`status | head`) is not an
/// error of the command: the rest is dropped instead of panicking as `print!` does.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(error) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && error.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("cannot write the output: {error}");
    }
}

/// For the commands that change the router: a WAN must be named, and the policy refuses the
/// router's own addresses.
fn on_router(table: &TableArgs, policy: &PolicyArgs) -> Result<Policy, CommandError> {
    let mut policy = wan_policy(table, policy)?;
    // The addresses of this host's interfaces, which forwards may never point at.
    let addresses =
        Addresses::read(&table.wan_interfaces.iter().cloned().collect()).unwrap_or_default();
    policy.router_addresses.extend(addresses.all);
    // And the ports it serves where WAN clients reach, which forwards would take away.
    let wan: BTreeSet<IpAddr> = table
        .wan_addresses
        .iter()
        .copied()
        .chain(addresses.wan)
        .collect();
    policy.router_ports = sockets::served(&wan).map_err(CommandError::Sockets)?;
    Ok(policy)
}

fn runtime() -> Result<tokio::runtime::Runtime, CommandError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CommandError::Runtime)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "router".into())
}

/// Completes on the first SIGTERM or SIGINT; a second one ends the process at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping after the current round; a second signal stops at once");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        std::process::exit(i32::from(exit::FAILED));
    });
}

/// Removes `finalizer` from every Service in scope, each guarded by a JSON Patch `test`.
async fn release_finalizers(
    cluster: ClusterArgs,
    finalizer: String,
) -> Result<usize, CommandError> {
    let (client, server) =
        client::client(cluster.kubeconfig.as_deref(), cluster.context.as_deref()).await?;
    finalizer::release_everywhere(
        &client,
        cluster.namespaces,
        cluster.selector.as_deref(),
        &finalizer,
    )
    .await
    .map_err(|source| CommandError::Kube { server, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
