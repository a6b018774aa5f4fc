//! [`Engine`]: applies a [`Ruleset`] to one table through a [`Firewall`], sending as little
//! as possible, and says what changed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::firewall::{Firewall, KernelError};
use super::layout::{Down, FAMILIES, addr_map, pick_map};
use super::nfnl::NetlinkError;
use super::read::set_names;
use super::wire::{self, Elem};
use super::{Change, KernelTable, Ruleset, TableConfig, Update, owner_comment};
use crate::core::model::{BUCKETS, Forward, ForwardKey, targets_text};
use crate::core::plan::Holders;

/// A rebuild whose read-back differs waits this long before the next, doubling each time.
const REBUILD_BACKOFF_FIRST: Duration = Duration::from_secs(1);
const REBUILD_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Reads and guarded commits tried while the ruleset keeps changing underneath; the last
/// commit goes unguarded.
const COMMIT_ATTEMPTS: usize = 3;

/// A forward that left the table, as far as the previous state tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removed {
    pub key: ForwardKey,
    /// The uid of the Service that owned it, when known.
    pub uid: Option<String>,
    /// The owner comment and target it had, e.g. `ns/web:http uid=... -> 10.0.0.5:80`.
    pub was: String,
}

/// What one apply did to the router. A successful apply is the kernel's word: the batch was
/// acknowledged whole, or a rebuild was read back equal to what was sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// `None`: no rebuild.
    pub rebuilt: Option<String>,
    pub sent: bool,
    pub added: Vec<Forward>,
    pub removed: Vec<Removed>,
    /// Conntrack entries deleted for removed or re-targeted forwards.
    pub flows_closed: usize,
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

    /// A forward's backends (in the choice or held down), where new flows went (the
    /// choice) and its port, if it was in the table.
    fn forward(&self, key: &ForwardKey) -> Option<Was> {
        match self {
            Previous::Nothing => None,
            Previous::Applied(ruleset) => ruleset.forwards.get(key).map(|f| Was {
                backends: f.backends.clone(),
                choice: f.choice(),
                port: Some(f.port),
            }),
            Previous::Kernel(table) => {
                let choice = table.choice(key);
                let backends = table.backends(key);
                let port = table.ports.get(key).map(|p| p.value);
                (!choice.is_empty() || port.is_some()).then_some(Was {
                    backends,
                    choice,
                    port,
                })
            }
        }
    }

    fn describe(&self, key: &ForwardKey) -> String {
        let described = match self {
            Previous::Nothing => None,
            Previous::Applied(ruleset) => ruleset
                .forwards
                .get(key)
                .map(|f| format!("{} -> {}", owner_comment(f), targets_text(f.targets()))),
            Previous::Kernel(table) => self.forward(key).map(|was| {
                let port = was.port.map_or("?".to_owned(), |p| p.to_string());
                let targets: Vec<String> = was
                    .backends
                    .iter()
                    .map(|addr| match addr {
                        IpAddr::V4(a) => format!("{a}:{port}"),
                        IpAddr::V6(a) => format!("[{a}]:{port}"),
                    })
                    .collect();
                let owner = table.ports.get(key).and_then(|p| p.comment.as_deref());
                format!("{} -> {}", owner.unwrap_or("(no owner)"), targets.join(","))
            }),
        };
        described.unwrap_or_else(|| "(unknown)".to_owned())
    }
}

/// What a forward was before an apply.
struct Was {
    backends: Vec<IpAddr>,
    choice: Vec<IpAddr>,
    port: Option<u16>,
}

/// Rebuilds that did not converge: how many in a row, and when the next may run.
#[derive(Default)]
struct RebuildBackoff {
    failures: u32,
    until: Option<Instant>,
    difference: String,
}

impl RebuildBackoff {
    fn failed(&mut self, now: Instant, difference: String) {
        let wait = REBUILD_BACKOFF_FIRST
            .saturating_mul(1 << self.failures.min(9))
            .min(REBUILD_BACKOFF_MAX);
        if self.failures == 0 {
            tracing::error!(
                %difference,
                "the table read back after a rebuild is not what was sent; rebuilding again in {} s, then less often (this is logged once)",
                wait.as_secs()
            );
        } else {
            tracing::debug!(%difference, failures = self.failures + 1, "the rebuild did not converge again");
        }
        self.failures += 1;
        self.until = Some(now + wait);
        self.difference = difference;
    }

    fn held(&self, now: Instant) -> Option<KernelError> {
        let until = self.until?;
        (now < until).then(|| KernelError::Held {
            seconds: until.duration_since(now).as_secs().max(1),
            difference: self.difference.clone(),
        })
    }

    fn converged(&mut self) {
        if self.failures > 0 {
            tracing::info!(
                failed = self.failures,
                "the table read back equals what was sent again"
            );
        }
        *self = RebuildBackoff::default();
    }
}

/// Applies rulesets to one table. Between applies it remembers what it applied and the
/// ruleset generation at which that was true, and sends only the elements that differ, as
/// one netlink batch valid only at that generation: a change costs the same with 10 or
/// 10,000 forwards, and nothing changed underneath is overwritten blind. When the generation
/// moved (someone committed), after [`Engine::forget`] and after a refused batch, it reads
/// the table by dump and diffs against what the kernel holds. A rebuild (`nft`) is read back
/// and must equal what was sent; one that does not is retried with backoff.
pub struct Engine<F> {
    firewall: F,
    applied: Option<Ruleset>,
    /// The generation at which `applied` was what the kernel held.
    generation: Option<u32>,
    /// Who holds which port, as far as the engine knows: from the kernel's owner comments,
    /// then from every apply. While `applied` is remembered, these are its forwards' owners.
    holders: Holders,
    /// A read of the kernel taken ahead of the next apply ([`Engine::learn_holders`]), which
    /// uses it instead of reading again if it applies the configuration the read was
    /// checked against.
    read_ahead: Option<(TableConfig, Option<KernelTable>, u32)>,
    rebuilds: RebuildBackoff,
}

impl<F: Firewall> Engine<F> {
    pub fn new(firewall: F) -> Engine<F> {
        Engine {
            firewall,
            applied: None,
            generation: None,
            holders: Holders::new(),
            read_ahead: None,
            rebuilds: RebuildBackoff::default(),
        }
    }

    pub fn firewall(&mut self) -> &mut F {
        &mut self.firewall
    }

    /// The ruleset applied last, if the engine remembers one.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// Whether what the engine remembers already accounts for the commit that made
    /// `generation`: its own commits, and any commit before its last read.
    pub fn knows(&self, generation: u32) -> bool {
        self.applied.is_some()
            && self
                .generation
                .is_some_and(|known| generation.wrapping_sub(known) as i32 <= 0)
    }

    /// Drop what the engine remembers; the next apply reads the kernel table in full.
    pub fn forget(&mut self) {
        self.applied = None;
        self.generation = None;
        self.read_ahead = None;
    }

    /// Who holds which port: the Services whose forwards the kernel holds.
    pub fn holders(&self) -> &Holders {
        &self.holders
    }

    /// Reads the kernel table to learn who holds which port (after a restart, from the owner
    /// comments); the next apply starts from this read, not from what the engine applied
    /// before, which it forgets: the holders then follow the applied forwards again from
    /// the next apply on, which [`Engine::apply_changed`] relies on to update them key by key.
    /// Also returns the backends the table records as down, for the health checks to
    /// start from.
    pub fn learn_holders(&mut self, config: &TableConfig) -> Result<BTreeSet<Down>, KernelError> {
        self.forget();
        let (table, generation) = self.read_at(config)?;
        self.holders = table.as_ref().map(KernelTable::holders).unwrap_or_default();
        let down = table.as_ref().map(|t| t.down.clone()).unwrap_or_default();
        self.read_ahead = Some((config.clone(), table, generation));
        Ok(down)
    }

    /// Reads the kernel table, checking its shape against `config` (`None`: any
    /// configuration of this daemon).
    pub fn read(
        &mut self,
        table: &str,
        config: Option<&TableConfig>,
    ) -> Result<Option<KernelTable>, KernelError> {
        Ok(self
            .firewall
            .read(table, &set_names())?
            .map(|dump| KernelTable::from_dump(config, dump)))
    }

    fn read_at(&mut self, config: &TableConfig) -> Result<(Option<KernelTable>, u32), KernelError> {
        match self.firewall.read(&config.table, &set_names())? {
            Some(dump) => {
                let generation = dump.generation;
                Ok((Some(KernelTable::from_dump(Some(config), dump)), generation))
            }
            None => Ok((None, self.firewall.generation()?)),
        }
    }

    /// Makes the kernel table hold `desired`, in one transaction, sending nothing when it
    /// already does. On any error the engine forgets, so the next apply reads the kernel.
    pub fn apply(&mut self, desired: Ruleset) -> Result<Applied, KernelError> {
        match self.apply_from(&desired) {
            Ok(applied) => {
                self.holders = desired
                    .forwards
                    .iter()
                    .filter_map(|(key, f)| Some((*key, f.owner.uid.clone()?)))
                    .collect();
                self.applied = Some(desired);
                Ok(applied)
            }
            Err(error) => {
                self.forget();
                Err(error)
            }
        }
    }

    /// [`Engine::apply`] of `forwards` under `config`, at the cost of the forwards in
    /// `changed` alone, whatever the size of the table: the result and what is sent are
    /// those of `apply(Ruleset::new(config.clone(), forwards.clone()))` as long as `changed`
    /// holds every key whose forward was added, removed or changed since the last
    /// successful apply. With nothing changed it asks the kernel only whether the ruleset's
    /// generation is still the one it applied at. When the engine remembers nothing, or
    /// applied another configuration, or must read the table (the generation moved, the
    /// batch was refused), it applies the whole ruleset.
    pub fn apply_changed(
        &mut self,
        config: &TableConfig,
        forwards: &BTreeMap<ForwardKey, Forward>,
        changed: &BTreeSet<ForwardKey>,
    ) -> Result<Applied, KernelError> {
        let whole = || Ruleset::new(config.clone(), forwards.clone());
        let (mut applied, generation) = match (self.applied.take(), self.generation.take()) {
            (Some(applied), Some(generation)) if applied.config == *config => (applied, generation),
            (applied, generation) => {
                (self.applied, self.generation) = (applied, generation);
                return self.apply(whole());
            }
        };
        // The commit and its report look up only the forwards the update names, all of them
        // among the changed ones.
        let mut desired = Ruleset::new(
            config.clone(),
            changed
                .iter()
                .filter_map(|key| Some((*key, forwards.get(key)?.clone())))
                .collect(),
        );
        let delta = desired.delta_at(&applied, changed);
        match self.apply_known(&desired, &delta, &applied, generation) {
            Some(Ok(done)) => {
                for key in changed {
                    match desired.forwards.remove(key) {
                        Some(forward) => {
                            match &forward.owner.uid {
                                Some(uid) => self.holders.insert(*key, uid.clone()),
                                None => self.holders.remove(key),
                            };
                            applied.forwards.insert(*key, forward);
                        }
                        None => {
                            self.holders.remove(key);
                            applied.forwards.remove(key);
                        }
                    }
                }
                self.applied = Some(applied);
                Ok(done)
            }
            Some(Err(error)) => {
                self.forget();
                Err(error)
            }
            // What was applied no longer tells what the kernel holds: the whole apply
            // forgets it too, and reads.
            None => self.apply(whole()),
        }
    }

    /// Whether `forwards` under `config` is what the engine applied last, knowing that only
    /// the forwards in `changed` may differ from it (as for [`Engine::apply_changed`]): a
    /// look at those keys alone, nothing asked of the kernel.
    pub fn unchanged(
        &self,
        config: &TableConfig,
        forwards: &BTreeMap<ForwardKey, Forward>,
        changed: &BTreeSet<ForwardKey>,
    ) -> bool {
        self.applied.as_ref().is_some_and(|applied| {
            applied.config == *config
                && changed
                    .iter()
                    .all(|key| applied.forwards.get(key) == forwards.get(key))
        })
    }

    fn apply_from(&mut self, desired: &Ruleset) -> Result<Applied, KernelError> {
        let remembered = self.applied.take().zip(self.generation.take());
        if let Some((applied, generation)) = remembered {
            let delta = desired.delta_applied(&applied);
            if let Some(reason) = desired.reshaped(&applied) {
                return self.rebuild(desired, reason, &delta, &Previous::Applied(&applied));
            }
            if let Some(done) = self.apply_known(desired, &delta, &applied, generation) {
                return done;
            }
        }
        self.apply_read(desired)
    }

    /// Sends `delta`, what turns `applied` (what the kernel held at `generation`) into
    /// `desired`, as one batch valid only at that generation; with nothing to send, checks
    /// that the generation has not moved. `None`: the table must be read first, because
    /// the generation moved or the batch was refused.
    fn apply_known(
        &mut self,
        desired: &Ruleset,
        delta: &Update,
        applied: &Ruleset,
        generation: u32,
    ) -> Option<Result<Applied, KernelError>> {
        if delta.is_empty() {
            return match self.firewall.generation() {
                Ok(now) if now == generation => {
                    self.generation = Some(generation);
                    Some(Ok(Applied::default()))
                }
                Ok(_) => {
                    tracing::debug!("the ruleset changed since the last apply; reading the table");
                    None
                }
                Err(error) => Some(Err(error)),
            };
        }
        match self.commit(
            desired,
            delta,
            Some(generation),
            &Previous::Applied(applied),
        ) {
            Err(KernelError::Netlink(
                error @ (NetlinkError::Changed(_) | NetlinkError::Refused { .. }),
            )) => {
                tracing::debug!(%error, "the batch was refused; reading the table");
                None
            }
            done => Some(done),
        }
    }

    /// Reads the table and brings it to `desired`.
    fn apply_read(&mut self, desired: &Ruleset) -> Result<Applied, KernelError> {
        let empty = KernelTable::default();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (table, generation, ahead) = match self.read_ahead.take() {
                Some((config, table, generation)) if config == desired.config => {
                    (table, generation, true)
                }
                _ => {
                    let (table, generation) = self.read_at(&desired.config)?;
                    (table, generation, false)
                }
            };
            let previous = table.as_ref().map_or(Previous::Nothing, Previous::Kernel);
            match desired.diff(table.as_ref()) {
                Change::Nothing => {
                    // A read taken ahead may be out of date by now: a batch would be refused
                    // if it were, but sending nothing proves nothing.
                    if ahead && self.firewall.generation()? != generation {
                        continue;
                    }
                    self.generation = Some(generation);
                    return Ok(Applied::default());
                }
                Change::Rebuild(reason) => {
                    let delta = desired.delta(table.as_ref().unwrap_or(&empty));
                    return self.rebuild(desired, reason, &delta, &previous);
                }
                Change::Update(update) => {
                    let guard = (attempt < COMMIT_ATTEMPTS).then_some(generation);
                    if guard.is_none() {
                        // Other tables' commits keep moving the generation between each
                        // read and commit: send this update unguarded. A change to this table
                        // meanwhile is announced by nf_tables, and the monitor has the table
                        // read again.
                        tracing::info!(
                            attempts = attempt,
                            "the ruleset changed between every read and commit; committing without the generation guard"
                        );
                    }
                    match self.commit(desired, &update, guard, &previous) {
                        Err(KernelError::Netlink(NetlinkError::Changed(_))) => continue,
                        Err(KernelError::Netlink(error @ NetlinkError::Refused { .. })) => {
                            // The table holds what its dump did not show: replace it whole,
                            // still in one transaction.
                            tracing::warn!(%error, "the element update was refused; rebuilding the table");
                            let reason = format!("element update refused: {error}");
                            let delta = desired.delta(table.as_ref().unwrap_or(&empty));
                            return self.rebuild(desired, reason, &delta, &previous);
                        }
                        done => return done,
                    }
                }
            }
        }
    }

    /// Commits an element update valid at `generation` (unguarded: `None`), then closes the
    /// flows of what it removed or re-targeted.
    fn commit(
        &mut self,
        desired: &Ruleset,
        update: &Update,
        generation: Option<u32>,
        previous: &Previous<'_>,
    ) -> Result<Applied, KernelError> {
        let changes = desired.element_changes(update);
        let deleted = self
            .firewall
            .commit(&desired.config.table, &changes, generation)?;
        // A guarded batch is one commit right after `generation`; after an unguarded one the
        // generation is not known, and the next apply reads.
        self.generation = generation.map(|g| g.wrapping_add(1));
        Ok(self.report(desired, update, None, previous, &idle(&deleted)))
    }

    /// Replaces the whole table, reads it back and checks it holds `desired`.
    fn rebuild(
        &mut self,
        desired: &Ruleset,
        reason: String,
        delta: &Update,
        previous: &Previous<'_>,
    ) -> Result<Applied, KernelError> {
        if let Some(held) = self.rebuilds.held(Instant::now()) {
            return Err(held);
        }
        let rebuild = Change::Rebuild(reason.clone());
        let transaction = desired
            .transaction(&rebuild)
            .expect("a rebuild has a transaction");
        let before = self.firewall.generation()?;
        self.firewall.run(&transaction)?;
        let (table, generation) = self.read_at(&desired.config)?;
        match desired.diff(table.as_ref()) {
            Change::Nothing => {
                self.rebuilds.converged();
                self.generation = Some(generation);
                Ok(self.report(desired, delta, Some(reason), previous, &BTreeSet::new()))
            }
            other if generation.wrapping_sub(before) != 1 => {
                // Someone else committed between the rebuild and its read-back (a second
                // `nft flush ruleset`): the difference may be theirs, not a rebuild that does
                // not hold. The rebuild counts as done; with the generation unknown, the
                // monitor's report of that commit has the table read again.
                tracing::debug!(
                    difference = %describe(&other),
                    "the table changed again right after the rebuild"
                );
                self.generation = None;
                Ok(self.report(desired, delta, Some(reason), previous, &BTreeSet::new()))
            }
            other => {
                let difference = describe(&other);
                self.rebuilds.failed(Instant::now(), difference.clone());
                Err(KernelError::NotConverged(difference))
            }
        }
    }

    /// What an apply did, from the update and the state before it. Flows of forwards that
    /// went or point elsewhere now are closed here: the kernel has confirmed the elements
    /// are gone, and the finalizer is released only after this returns. Forwards in `idle`
    /// never carried a flow (their counter was 0 when deleted): nothing to close, and the
    /// walk of the kernel's whole conntrack table is spared.
    fn report(
        &mut self,
        desired: &Ruleset,
        delta: &Update,
        rebuilt: Option<String>,
        previous: &Previous<'_>,
        idle: &BTreeSet<ForwardKey>,
    ) -> Applied {
        let removed: BTreeSet<ForwardKey> = delta
            .deleted_keys()
            .into_iter()
            .filter(|key| !desired.forwards.contains_key(key))
            .collect();
        // Flows end where a forward's new flows can no longer go: all of a removed forward's,
        // or of one whose port changed; else those of the backends that left its choice (a
        // backend down, or gone from the Service), and no other: the clients of the
        // backends that stay keep their sessions.
        let mut closing: Vec<(ForwardKey, Option<IpAddr>)> =
            removed.iter().map(|key| (*key, None)).collect();
        let mut added = Vec::new();
        for key in delta.added_keys().union(&delta.deleted_keys()) {
            let (Some(now), Some(was)) = (desired.forwards.get(key), previous.forward(key)) else {
                if let Some(now) = desired.forwards.get(key) {
                    added.push(now.clone());
                }
                continue;
            };
            if was.backends != now.backends
                || was.port != Some(now.port)
                || previous.owner_uid(key) != now.owner.uid
            {
                added.push(now.clone());
            }
            if was.port.is_some_and(|p| p != now.port) {
                closing.push((*key, None));
                continue;
            }
            let choice = now.choice();
            closing.extend(
                was.choice
                    .iter()
                    .filter(|addr| !choice.contains(addr))
                    .map(|addr| (*key, Some(*addr))),
            );
        }
        closing.retain(|(key, _)| !idle.contains(key));
        let flows_closed = match self.firewall.close_flows(&closing, desired.config.ct_mark) {
            Ok(closed) => closed,
            Err(error) => {
                tracing::warn!(%error, "cannot delete the conntrack entries of closed forwards; their flows last until they time out");
                0
            }
        };
        Applied {
            sent: true,
            rebuilt,
            flows_closed,
            added,
            removed: removed
                .into_iter()
                .map(|key| Removed {
                    key,
                    uid: previous.owner_uid(&key),
                    was: previous.describe(&key),
                })
                .collect(),
        }
    }
}

/// The forwards whose address or bucket elements the kernel reported deleted, every one
/// with no packet counted.
fn idle(deleted: &[(String, Elem)]) -> BTreeSet<ForwardKey> {
    let mut idle = BTreeSet::new();
    let mut busy = BTreeSet::new();
    for (set, elem) in deleted {
        let Some(family) = FAMILIES.into_iter().find(|f| {
            *set == addr_map(*f) || (0..BUCKETS).any(|bucket| *set == pick_map(*f, bucket))
        }) else {
            continue;
        };
        let Some((protocol, external_port)) = wire::read_proto_port(&elem.key) else {
            continue;
        };
        let key = ForwardKey {
            family,
            protocol,
            external_port,
        };
        match elem.counter {
            Some((0, _)) => idle.insert(key),
            _ => busy.insert(key),
        };
    }
    idle.difference(&busy).copied().collect()
}

/// A difference left after a rebuild, in a line.
fn describe(change: &Change) -> String {
    match change {
        Change::Nothing => "none".to_owned(),
        Change::Rebuild(reason) => reason.clone(),
        Change::Update(update) => update.summary(),
    }
}
