//! The adapter to the kernel: runs `nft` with JSON, behind [`Firewall`] so everything above
//! it can be tested without a kernel, and [`Engine`], which applies a [`Ruleset`] with as
//! little as possible sent.

use std::ffi::OsString;

use nftables::helper::{self, NftablesError};
use nftables::schema::Nftables;

use std::collections::BTreeSet;

use crate::model::{Forward, ForwardKey};
use crate::ruleset::{Change, KernelTable, Ruleset, TableConfig, Update, owner_comment};

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

/// Up to this many forwards, confirming a removal from `nft --echo` is cheaper than a
/// second `nft` run (about 15 ms here, whatever the table's size).
const ECHO_MAX_FORWARDS: usize = 500;

/// A forward that left the table, as far as the previous state tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removed {
    pub key: ForwardKey,
    /// The uid of the Service that owned it, when known.
    pub uid: Option<String>,
    /// The owner comment and target it had, e.g. `ns/web:http uid=... -> 10.0.0.5:80`.
    pub was: String,
}

/// What one apply did to the router.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// `None`: nothing was sent.
    pub rebuilt: Option<String>,
    pub sent: bool,
    pub added: Vec<Forward>,
    pub removed: Vec<Removed>,
    /// Keys the kernel reported deleted from the address maps in this transaction (its
    /// `--echo`); empty after a rebuild, which is not echoed.
    pub confirmed_removed: BTreeSet<ForwardKey>,
}

/// The state the engine diffs against, for describing what was removed.
enum Previous<'a> {
    Nothing,
    Applied(&'a Ruleset),
    Kernel(&'a KernelTable),
}

impl Previous<'_> {
    fn owner_uid(&self, key: &ForwardKey) -> Option<String> {
        match self {
            Previous::Nothing => None,
            Previous::Applied(ruleset) => ruleset.forwards.get(key)?.owner.uid.clone(),
            Previous::Kernel(table) => {
                let comment = table.addrs.get(key)?.comment.as_deref()?;
                Some(comment.rsplit_once(" uid=")?.1.to_owned())
            }
        }
    }

    fn describe(&self, key: &ForwardKey) -> String {
        let described = match self {
            Previous::Nothing => None,
            Previous::Applied(ruleset) => ruleset
                .forwards
                .get(key)
                .map(|f| format!("{} -> {}", owner_comment(f), f.target)),
            Previous::Kernel(table) => table.addrs.get(key).map(|addr| {
                let port = table.ports.get(key).map(|p| p.value.to_string());
                format!(
                    "{} -> {}:{}",
                    addr.comment.as_deref().unwrap_or("(no owner)"),
                    addr.value,
                    port.as_deref().unwrap_or("?")
                )
            }),
        };
        described.unwrap_or_else(|| "(unknown)".to_owned())
    }
}

/// Applies rulesets to one table. Between applies it remembers what it applied and sends
/// only the elements that differ, so a change costs the same with 10 or 10,000 forwards:
/// every `nft` listing loads the whole table, so the kernel is read in full only on the first
/// apply, after [`Engine::forget`] (a resync, or a change to the table seen from outside),
/// and after a failed transaction. A table deleted from outside makes the next transaction
/// fail and is rebuilt; when nothing changed, an uncommitted check of the table's base chain
/// (`nft -c`) finds a missing table just as well.
pub struct Engine<F> {
    firewall: F,
    applied: Option<Ruleset>,
}

impl<F: Firewall> Engine<F> {
    pub fn new(firewall: F) -> Engine<F> {
        Engine {
            firewall,
            applied: None,
        }
    }

    pub fn firewall(&mut self) -> &mut F {
        &mut self.firewall
    }

    /// The ruleset applied last, if the engine remembers one.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// Whether the kernel confirms that none of `keys` is in the table, without reading it
    /// and without committing anything: `false` when any is there or the check fails.
    pub fn confirmed_absent(&mut self, keys: &[ForwardKey]) -> bool {
        let Some(applied) = &self.applied else {
            return false;
        };
        keys.is_empty() || self.firewall.check(&applied.absence_check(keys)).is_ok()
    }

    /// Drop what the engine remembers; the next apply reads the kernel table in full.
    pub fn forget(&mut self) {
        self.applied = None;
    }

    /// Reads and parses the kernel table, checking its shape against `config` (`None`: any
    /// configuration of this daemon).
    pub fn read(
        &mut self,
        table: &str,
        config: Option<&TableConfig>,
    ) -> Result<Option<KernelTable>, NftError> {
        Ok(self
            .firewall
            .list_table(table)?
            .map(|listing| KernelTable::from_nftables(config, &listing)))
    }

    /// Makes the kernel table hold `desired`, in one transaction, sending nothing when it
    /// already does. On any error the engine forgets, so the next apply reads the kernel.
    pub fn apply(&mut self, desired: Ruleset) -> Result<Applied, NftError> {
        let mut remembered = None;
        if let Some(applied) = self.applied.take() {
            let change = desired.diff_applied(&applied);
            if change != Change::Nothing || self.table_present(&applied) {
                remembered = Some((applied, change));
            }
        }
        let kernel = match remembered {
            Some(_) => None,
            None => self.read(&desired.config.table, Some(&desired.config))?,
        };
        let empty = KernelTable::default();
        // `delta` is what differs element by element, for the report, even when the
        // change is a rebuild.
        let (change, previous) = match (remembered.as_ref(), kernel.as_ref()) {
            (Some((applied, change)), _) => (change.clone(), Previous::Applied(applied)),
            (None, Some(table)) => (desired.diff(Some(table)), Previous::Kernel(table)),
            (None, None) => (desired.diff(None), Previous::Nothing),
        };
        let delta = match (&change, &previous) {
            (Change::Update(update), _) => (**update).clone(),
            (Change::Nothing, _) => Update::default(),
            (Change::Rebuild(_), Previous::Applied(applied)) => desired.delta_applied(applied),
            (Change::Rebuild(_), Previous::Kernel(table)) => desired.delta(table),
            (Change::Rebuild(_), Previous::Nothing) => desired.delta(&empty),
        };
        let (rebuilt, confirmed_removed) = self.send(&desired, &change)?;
        let removed: BTreeSet<&ForwardKey> = delta
            .delete_addrs
            .iter()
            .chain(&delta.delete_ports)
            .filter(|key| !desired.forwards.contains_key(key))
            .collect();
        let applied = Applied {
            sent: change != Change::Nothing,
            rebuilt,
            confirmed_removed,
            added: delta
                .add
                .iter()
                .map(|key| desired.forwards[key].clone())
                .collect(),
            removed: removed
                .into_iter()
                .map(|key| Removed {
                    key: *key,
                    uid: previous.owner_uid(key),
                    was: previous.describe(key),
                })
                .collect(),
        };
        self.applied = Some(desired);
        Ok(applied)
    }

    /// Whether the table and its base chain are still there, checked without committing.
    fn table_present(&mut self, applied: &Ruleset) -> bool {
        match self.firewall.check(&applied.probe()) {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(error = %err, "the table is gone or changed; reading it in full");
                false
            }
        }
    }

    /// Sends the change; returns why the table was rebuilt, if it was, and the keys the
    /// kernel reported deleted.
    fn send(
        &mut self,
        desired: &Ruleset,
        change: &Change,
    ) -> Result<(Option<String>, BTreeSet<ForwardKey>), NftError> {
        let Some(transaction) = desired.transaction(change) else {
            return Ok((None, BTreeSet::new()));
        };
        // The kernel's echo confirms removals in the same run, but `nft --echo` loads the
        // whole table first (about 26 µs a forward here), so it is asked for only when the
        // update removes forwards and the table is small; otherwise a removal is confirmed
        // by `Engine::confirmed_absent`, whose cost does not grow with the table.
        let echo = match change {
            Change::Update(update) => {
                let removes = update
                    .delete_addrs
                    .iter()
                    .any(|k| !desired.forwards.contains_key(k));
                removes && desired.forwards.len() <= ECHO_MAX_FORWARDS
            }
            _ => false,
        };
        match (self.firewall.apply(&transaction, echo), change) {
            (Ok(_), Change::Rebuild(reason)) => Ok((Some(reason.clone()), BTreeSet::new())),
            (Ok(echoed), _) => Ok((None, crate::ruleset::echoed_deletions(&echoed))),
            (Err(err), Change::Update(_)) => {
                // The table changed under us since it was read or remembered. Replace it
                // whole, still in one transaction.
                tracing::warn!(error = %err, "incremental update failed; rebuilding the table");
                let reason = format!("incremental update failed: {err}");
                let rebuild = Change::Rebuild(reason.clone());
                let transaction = desired
                    .transaction(&rebuild)
                    .expect("a rebuild has a transaction");
                self.firewall.apply(&transaction, false)?;
                Ok((Some(reason), BTreeSet::new()))
            }
            (Err(err), _) => Err(err),
        }
    }
}
