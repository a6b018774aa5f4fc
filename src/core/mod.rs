//! The pure core: what Services ask for ([`annotation`], [`service`]), what the router's
//! owner allows ([`policy`]), who wins a port ([`plan`]) and what the daemon does next
//! ([`decide`]). No I/O, no clock, no tokio, no kube client, no processes: plain functions
//! over plain data, unit-tested beside them.

pub mod annotation;
pub mod decide;
pub mod dns;
pub mod health;
pub mod model;
pub mod names;
pub mod node;
pub mod plan;
pub mod policy;
pub mod service;
pub mod status;
pub mod tracked;
pub mod upstream;
