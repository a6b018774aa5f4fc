//! kube-port-forward: forwards router ports to Kubernetes Services' LoadBalancer addresses.
//!
//! A pure [`core`] (what Services ask for, who wins, what the daemon does next) and lanes
//! around it that each own one outside system: [`kernel`] (the nf_tables table), [`cluster`]
//! (the Kubernetes API: watches, finalizers, events, conditions) and [`router`] (addresses,
//! policy file, health, audit). [`daemon`] joins the lanes; [`cli`] is the commands.
#![forbid(unsafe_code)]

pub mod cli;
pub mod cluster;
pub mod core;
pub mod daemon;
pub mod kernel;
mod netlink;
pub mod router;
