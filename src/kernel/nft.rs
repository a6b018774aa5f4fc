//! The `nft` runner: runs `nft` with JSON, behind [`Firewall`] so everything above it (the
//! [`super::Engine`]) can be tested without a kernel.

use std::ffi::OsString;

use nftables::helper::{self, NftablesError};
use nftables::schema::Nftables;

/// A failed `nft` run.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("could not run {program:?}")]
    Spawn {
        program: OsString,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("{command} printed JSON this program cannot read")]
    Output {
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

/// What the engine needs from the kernel.
pub trait Firewall {
    /// `nft -j list table inet NAME`, or `None` when there is no such table.
    fn list_table(&mut self, table: &str) -> Result<Option<Nftables<'static>>, NftError>;
    /// Runs one JSON transaction with `nft -j -f -`; with `echo`, returns what the kernel
    /// reported it did (`nft --echo`), else nothing.
    fn apply(&mut self, transaction: &str, echo: bool) -> Result<String, NftError>;
    /// Has the kernel check a transaction without committing it (`nft -c -j -f -`).
    fn check(&mut self, transaction: &str) -> Result<(), NftError>;
}

/// [`Firewall`] through the `nft` program, found in `PATH` unless named.
#[derive(Clone, Debug, Default)]
pub struct NftCli {
    program: Option<OsString>,
}

impl NftCli {
    pub fn new(program: Option<OsString>) -> NftCli {
        NftCli { program }
    }

    fn program(&self) -> OsString {
        self.program.clone().unwrap_or_else(|| "nft".into())
    }

    fn list(&mut self, args: &[&str]) -> Result<Option<Nftables<'static>>, NftError> {
        let command = format!("{} -j {}", self.program().to_string_lossy(), args.join(" "));
        tracing::debug!(%command, "reading the kernel table");
        match helper::get_current_ruleset_raw(self.program.as_ref(), args) {
            Ok(output) => serde_json::from_str(&output)
                .map(Some)
                .map_err(|source| NftError::Output { command, source }),
            // nft says "No such file or directory" for a missing table or chain.
            Err(NftablesError::NftFailed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(err) => Err(self.error(command, err)),
        }
    }

    fn error(&self, command: String, err: NftablesError) -> NftError {
        match err {
            NftablesError::NftExecution { program, inner } => NftError::Spawn {
                program,
                source: inner,
            },
            NftablesError::NftFailed { stderr, .. } => NftError::Failed {
                command,
                stderr: stderr.trim().to_owned(),
            },
            NftablesError::NftInvalidJson(source) => NftError::Output { command, source },
            NftablesError::NftOutputEncoding { inner, .. } => NftError::Failed {
                command,
                stderr: inner.to_string(),
            },
        }
    }
}

impl Firewall for NftCli {
    fn list_table(&mut self, table: &str) -> Result<Option<Nftables<'static>>, NftError> {
        self.list(&["list", "table", "inet", table])
    }

    fn apply(&mut self, transaction: &str, echo: bool) -> Result<String, NftError> {
        self.send(transaction, if echo { &["--echo"] } else { &[] })
    }

    fn check(&mut self, transaction: &str) -> Result<(), NftError> {
        self.send(transaction, &["-c"]).map(drop)
    }
}

impl NftCli {
    fn send(&mut self, transaction: &str, args: &[&str]) -> Result<String, NftError> {
        let mut command = self.program().to_string_lossy().into_owned();
        for arg in args.iter().chain(&["-j", "-f", "-"]) {
            command.push(' ');
            command.push_str(arg);
        }
        tracing::debug!(%command, bytes = transaction.len(), "sending a transaction");
        helper::apply_ruleset_raw(transaction, self.program.as_ref(), args)
            .map_err(|err| self.error(command, err))
    }
}
