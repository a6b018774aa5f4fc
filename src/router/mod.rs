//! The router lane: the router's own state. Its interfaces' addresses (rtnetlink), the
//! owner's policy file, health and metrics, the audit trail of every change to its ports, and
//! the IGD upstream of it ([`upstream`], over [`igd`]).

pub mod audit;
pub mod health;
pub mod igd;
pub mod links;
pub mod policy_file;
pub mod probe;
pub mod served;
pub mod sockets;
pub mod upstream;
