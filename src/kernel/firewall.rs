//! [`Firewall`]: what the [`super::Engine`] needs from the kernel, so everything above it can
//! be tested with a recording or failing stand-in. [`Kernel`] is the real one: element
//! changes, reads and conntrack over one netlink socket ([`super::nfnl`]), and `nft` for
//! what is rare, building or rebuilding the table ([`super::nft`]).

use std::net::IpAddr;

use super::nfnl::{NetlinkError, Nfnl, TableDump};
use super::nft::{NftCli, NftError};
use super::wire::{self, Elem, SetChange};
use crate::core::model::ForwardKey;

/// What went wrong in the kernel lane.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("the table read back after a rebuild is not what was sent: {0}")]
    NotConverged(String),
    #[error(
        "rebuilds did not converge; the next one waits {seconds} s more (last difference: {difference})"
    )]
    Held { seconds: u64, difference: String },
}

impl KernelError {
    /// How long the engine holds back, when it does.
    pub fn held_for(&self) -> Option<std::time::Duration> {
        match self {
            KernelError::Held { seconds, .. } => Some(std::time::Duration::from_secs(*seconds)),
            _ => None,
        }
    }
}

pub trait Firewall {
    /// The ruleset's generation now.
    fn generation(&mut self) -> Result<u32, KernelError>;
    /// The inet table `table` (its sets named in `sets` with their elements), at one
    /// generation; `None` when there is no such table.
    fn read(&mut self, table: &str, sets: &[&str]) -> Result<Option<TableDump>, KernelError>;
    /// Commits element changes in one transaction, refused whole unless the ruleset is
    /// still at `generation` (when given). Returns the deleted elements with their counters
    /// at the commit, as far as the kernel echoed them.
    fn commit(
        &mut self,
        table: &str,
        changes: &[SetChange],
        generation: Option<u32>,
    ) -> Result<Vec<(String, Elem)>, KernelError>;
    /// Runs an nft JSON transaction (a rebuild of the table).
    fn run(&mut self, transaction: &str) -> Result<(), KernelError>;
    /// Deletes the conntrack entries of these forwards (flows marked with `mark` to their
    /// external port), all of them or only those to one backend; returns how many went.
    fn close_flows(
        &mut self,
        closing: &[(ForwardKey, Option<IpAddr>)],
        mark: u32,
    ) -> Result<usize, KernelError>;
}

/// The kernel: `nft` for rebuilds, one netlink socket for everything else, opened when first
/// needed and opened again after it failed.
pub struct Kernel {
    nft: NftCli,
    netlink: Option<Nfnl>,
}

impl Kernel {
    pub fn new(nft: NftCli) -> Kernel {
        Kernel { nft, netlink: None }
    }

    fn with_netlink<T>(
        &mut self,
        f: impl FnOnce(&mut Nfnl) -> Result<T, NetlinkError>,
    ) -> Result<T, KernelError> {
        let netlink = match &mut self.netlink {
            Some(netlink) => netlink,
            None => self
                .netlink
                .insert(Nfnl::open().map_err(NetlinkError::from)?),
        };
        let result = f(netlink);
        if let Err(NetlinkError::Io(_) | NetlinkError::Malformed { .. }) = &result {
            // A socket that timed out or lost its place is not trusted again.
            self.netlink = None;
        }
        Ok(result?)
    }
}

impl Firewall for Kernel {
    fn generation(&mut self) -> Result<u32, KernelError> {
        self.with_netlink(Nfnl::generation)
    }

    fn read(&mut self, table: &str, sets: &[&str]) -> Result<Option<TableDump>, KernelError> {
        self.with_netlink(|n| n.read_table(table, sets))
    }

    fn commit(
        &mut self,
        table: &str,
        changes: &[SetChange],
        generation: Option<u32>,
    ) -> Result<Vec<(String, Elem)>, KernelError> {
        self.with_netlink(|n| n.commit(table, changes, generation))
    }

    fn run(&mut self, transaction: &str) -> Result<(), KernelError> {
        Ok(self.nft.run_transaction(transaction)?)
    }

    fn close_flows(
        &mut self,
        closing: &[(ForwardKey, Option<IpAddr>)],
        mark: u32,
    ) -> Result<usize, KernelError> {
        if closing.is_empty() {
            return Ok(0);
        }
        self.with_netlink(|n| {
            n.delete_flows(mark, |flow| {
                closing.iter().any(|(k, to)| flow_matches(k, *to, flow))
            })
        })
    }
}

/// Whether a conntrack entry is a flow of the forward `key` (to backend `to`, if given):
/// same family and protocol, to its external port (the entry already carries the
/// daemon's mark).
fn flow_matches(key: &ForwardKey, to: Option<IpAddr>, flow: &wire::Flow) -> bool {
    key.family == flow.family
        && flow.protocol == Some(key.protocol)
        && flow.port == Some(key.external_port)
        && to.is_none_or(|to| flow.backend == Some(to))
}
