//! The router lane: the router's own state. Its interfaces' addresses (rtnetlink), the
//! owner's policy file, health and metrics, and the audit trail of every change to its ports.

pub mod audit;
pub mod health;
pub mod links;
pub mod policy_file;
pub mod probe;
pub mod sockets;
