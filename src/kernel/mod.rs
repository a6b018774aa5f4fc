//! The kernel lane: the nf_tables table this daemon owns. [`layout`] names its parts and
//! says what it should hold, [`build`] turns that into transactions, [`read`] reads the
//! kernel's copy back, [`diff`] compares the two, [`render`] prints it for people. [`wire`]
//! writes and reads the netlink messages, [`nfnl`] sends them on one long-lived socket,
//! [`nft`] runs `nft` for rebuilds, [`firewall`] joins the two behind one trait, [`engine`]
//! applies with as little sent as possible, and [`monitor`] hears the kernel announce
//! changes to the table.
//!
//! [`layout`], [`build`], [`read`], [`diff`], [`render`] and [`wire`] are pure: building,
//! encoding and diffing never touch the kernel.

pub mod build;
pub mod diff;
pub mod engine;
#[cfg(test)]
mod engine_tests;
pub mod firewall;
#[cfg(test)]
mod fixtures;
pub mod layout;
pub mod monitor;
pub mod nfnl;
pub mod nft;
pub mod read;
pub mod render;
pub mod wire;

pub use diff::{Change, Update};
pub use engine::{Applied, Engine, Removed};
pub use firewall::{Firewall, Kernel, KernelError};
pub use layout::{
    COMMENT_MAX, ConfigError, DEFAULT_CT_MARK, DEFAULT_TABLE, Element, Ruleset, Source,
    TableConfig, owner_comment,
};
pub use nfnl::{NetlinkError, TableDump};
pub use nft::{NftCli, NftError};
pub use read::KernelTable;
