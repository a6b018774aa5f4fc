//! [`Engine`]: applies a [`Ruleset`] to one table through a [`Firewall`], sending as little
//! as possible, and says what changed.

use std::collections::BTreeSet;

use super::nft::{Firewall, NftError};
use super::{Change, KernelTable, Ruleset, TableConfig, Update, owner_comment};
use crate::core::model::{Forward, ForwardKey};
use crate::core::plan::Holders;

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
            Previous::Kernel(table) => table.owner_uid(key).map(str::to_owned),
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
    /// Who holds which port, as far as the engine knows: from the kernel's owner comments,
    /// then from every apply.
    holders: Holders,
    /// A read of the kernel taken ahead of the next apply ([`Engine::learn_holders`]), which
    /// uses it instead of reading again.
    read_ahead: Option<Option<KernelTable>>,
}

impl<F: Firewall> Engine<F> {
    pub fn new(firewall: F) -> Engine<F> {
        Engine {
            firewall,
            applied: None,
            holders: Holders::new(),
            read_ahead: None,
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
        self.read_ahead = None;
    }

    /// Who holds which port: the Services whose forwards the kernel holds.
    pub fn holders(&self) -> &Holders {
        &self.holders
    }

    /// Reads the kernel table to learn who holds which port (after a restart, from the owner
    /// comments); the next apply starts from this read.
    pub fn learn_holders(&mut self, config: &TableConfig) -> Result<(), NftError> {
        let table = self.read(&config.table, Some(config))?;
        self.holders = table.as_ref().map(KernelTable::holders).unwrap_or_default();
        self.read_ahead = Some(table);
        Ok(())
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
        let kernel = match (remembered.as_ref(), self.read_ahead.take()) {
            (Some(_), _) => None,
            (None, Some(read)) => read,
            (None, None) => self.read(&desired.config.table, Some(&desired.config))?,
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
        self.holders = desired
            .forwards
            .iter()
            .filter_map(|(key, f)| Some((*key, f.owner.uid.clone()?)))
            .collect();
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
            (Ok(echoed), _) => Ok((None, super::read::echoed_deletions(&echoed))),
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
