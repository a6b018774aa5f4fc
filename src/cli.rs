//! Command-line interface: the flags, and the commands that need no cluster.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::manifest::{self, ManifestError, Manifests};
use crate::nft::{Engine, NftCli, NftError};
use crate::plan::{self, Plan, State};
use crate::ruleset::{ConfigError, DEFAULT_TABLE, Ruleset, TableConfig};
use crate::{audit, output};

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
        /// Exit with 3 if any entry is invalid or in conflict, or a Service was refused.
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        table: TableArgs,
    },
    /// Apply the forwards of Service manifests to the kernel table, once (needs CAP_NET_ADMIN).
    Apply {
        /// A manifest file (YAML or JSON), a folder of them, or `-` for standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        table: TableArgs,
    },
    /// List what the kernel table holds now: forwards, owners, counters.
    Status {
        /// Name of the inet table.
        #[arg(long, default_value = DEFAULT_TABLE)]
        table: String,
        #[arg(short, long, value_enum, default_value_t = Format::Text)]
        output: Format,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
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
}

impl TableArgs {
    fn config(&self) -> Result<TableConfig, ConfigError> {
        TableConfig::new(
            &self.table,
            self.wan_interfaces.iter().cloned(),
            self.wan_addresses.iter().copied(),
        )
    }
}

/// Why a command failed; `main` turns it into a message and an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "applying needs --wan-interface or --wan-address: without either, every port of every router address would be forwarded"
    )]
    NoWan,
    #[error(transparent)]
    Nft(#[from] NftError),
}

impl CommandError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Nft(_) => exit::FAILED,
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
        all.skipped += m.skipped;
    }
    Ok(all)
}

fn planned(
    files: &[PathBuf],
    table: &TableArgs,
) -> Result<(Manifests, Plan, Ruleset), CommandError> {
    let config = table.config()?;
    let manifests = read_all(files)?;
    let plan = plan::plan(&manifests.services);
    let ruleset = Ruleset::new(config, plan.forwards.clone());
    Ok((manifests, plan, ruleset))
}

/// Runs a command; returns the exit code for success paths.
pub fn run(command: Command) -> Result<u8, CommandError> {
    match command {
        Command::Plan {
            files,
            output,
            check,
            table,
        } => {
            let (manifests, plan, ruleset) = planned(&files, &table)?;
            print!(
                "{}",
                match output {
                    Format::Text => output::plan_text(&plan, &manifests, &ruleset),
                    Format::Json => output::plan_json(&plan, &manifests, &ruleset),
                }
            );
            let problems =
                plan.count(State::Invalid) + plan.count(State::Conflict) + manifests.refused.len();
            Ok(if check && problems > 0 {
                exit::CHECK
            } else {
                exit::OK
            })
        }
        Command::Apply { files, table } => {
            if table.wan_interfaces.is_empty() && table.wan_addresses.is_empty() {
                return Err(CommandError::NoWan);
            }
            let (manifests, plan, ruleset) = planned(&files, &table)?;
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
            let applied = Engine::new(NftCli::default()).apply(ruleset)?;
            audit::record(&table, &applied);
            println!(
                "{count} forwards in table inet {table}: {} opened, {} closed{}",
                applied.added.len(),
                applied.removed.len(),
                if applied.sent {
                    ""
                } else {
                    " (nothing to change)"
                }
            );
            Ok(exit::OK)
        }
        Command::Status { table, output } => {
            TableConfig::new(&table, [], [])?;
            let current = Engine::new(NftCli::default()).read(&table, None)?;
            print!(
                "{}",
                match output {
                    Format::Text => output::status_text(&table, current.as_ref()),
                    Format::Json => output::status_json(&table, current.as_ref()),
                }
            );
            Ok(exit::OK)
        }
    }
}
