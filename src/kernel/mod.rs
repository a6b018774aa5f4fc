//! The kernel lane: the nf_tables table this daemon owns. [`layout`] names its parts and
//! says what it should hold, [`build`] turns that into transactions, [`read`] reads the
//! kernel's copy back, [`diff`] compares the two, [`render`] prints it for people; [`nft`]
//! runs `nft`, [`engine`] applies with as little sent as possible, and [`monitor`] hears
//! the kernel announce changes to the table.
//!
//! Everything but [`nft`], [`engine`] and [`monitor`] is pure: building and diffing never
//! touch the kernel.

pub mod build;
pub mod diff;
pub mod engine;
#[cfg(test)]
mod fixtures;
pub mod layout;
pub mod monitor;
pub mod nft;
pub mod read;
pub mod render;

pub use diff::{Change, Update};
pub use engine::{Applied, Engine, Removed};
pub use layout::{
    COMMENT_MAX, ConfigError, DEFAULT_CT_MARK, DEFAULT_TABLE, Element, Ruleset, Source,
    TableConfig, owner_comment,
};
pub use nft::{Firewall, NftCli, NftError};
pub use read::KernelTable;
