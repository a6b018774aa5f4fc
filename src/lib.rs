//! kube-port-forward: forwards router ports to Kubernetes Services' LoadBalancer addresses.
//!
//! The core ([`annotation`], [`service`], [`plan`], [`ruleset`]) is pure and synchronous;
//! [`nft`] is the adapter to the kernel and [`manifest`] reads Service manifests from files.
#![forbid(unsafe_code)]

pub mod annotation;
pub mod audit;
pub mod cli;
pub mod controller;
pub mod daemon;
pub mod health;
pub mod manifest;
pub mod model;
pub mod netlink;
pub mod nft;
pub mod output;
pub mod plan;
pub mod policy;
pub mod ruleset;
pub mod service;
pub mod watched;
