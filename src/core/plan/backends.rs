//! Where a Service's forwards go and who may reach them: the addresses of its LoadBalancer
//! ingress or externalIPs, or its nodes' node ports; the clients its source ranges allow;
//! and how its backends are checked.

use std::net::IpAddr;

use ipnet::IpNet;

use super::validate::printable;
use crate::core::annotation;
use crate::core::model::{Probe, Protocol};
use crate::core::node::Node;
use crate::core::policy::{NodePorts, Policy};
use crate::core::service::Service;

/// Addresses chosen as targets: those the policy allows, those it refuses with the field
/// and the reason, and whether they are nodes (forwards go to the node ports).
type Targets = (Vec<IpAddr>, Vec<(String, String)>, bool);

/// The addresses to forward to: every address of the LoadBalancer ingress, else, where the
/// policy allows it, of `spec.externalIPs`; each checked against the policy on its own, so
/// a refused one is reported and the others serve. Sorted, without repeats.
pub(super) fn targets(service: &Service, policy: &Policy) -> Result<Targets, (String, String)> {
    if service.ingress_ips.is_empty() && !service.external_ips.is_empty() && !policy.external_ips {
        // Anyone who may create a Service may write any address here (CVE-2020-8554): no
        // LoadBalancer controller vouches for it.
        if !wants_node_ports(service, policy)? {
            let reason = "spec.externalIPs is not used as a target unless the router's owner allows it (--allow-external-ips); waiting for a LoadBalancer address";
            return Ok((
                Vec::new(),
                vec![("spec.externalIPs".into(), reason.into())],
                false,
            ));
        }
    }
    if service.ingress_ips.is_empty() && (service.external_ips.is_empty() || !policy.external_ips) {
        if wants_node_ports(service, policy)? {
            return Ok(node_targets(policy));
        }
        if policy.node_ports == NodePorts::Off && service.target.as_deref() == Some("nodeports") {
            let field = format!("metadata.annotations[\"{}\"]", annotation::TARGET);
            let reason = "this router does not forward to node ports (--node-ports off); waiting for a LoadBalancer address";
            return Ok((Vec::new(), vec![(field, reason.into())], false));
        }
    }
    let (field, list) = if service.ingress_ips.is_empty() {
        ("spec.externalIPs", &service.external_ips)
    } else {
        ("status.loadBalancer.ingress", &service.ingress_ips)
    };
    let mut allowed = Vec::new();
    let mut refused = Vec::new();
    for (index, text) in list.iter().enumerate() {
        let field = if field == "spec.externalIPs" {
            format!("{field}[{index}]")
        } else {
            format!("{field}[{index}].ip")
        };
        let addr: IpAddr = text.parse().map_err(|_| {
            (
                field.clone(),
                format!("\"{}\" is not an IP address", printable(text)),
            )
        })?;
        match policy.check_target(addr) {
            Ok(()) => allowed.push(addr),
            Err(reason) => refused.push((field, reason)),
        }
    }
    allowed.sort_unstable();
    allowed.dedup();
    Ok((allowed, refused, false))
}

/// Whether a Service without a LoadBalancer address goes to its node ports: as the router's
/// owner allows (`--node-ports`) and the Service's target annotation asks.
fn wants_node_ports(service: &Service, policy: &Policy) -> Result<bool, (String, String)> {
    let asked = match service.target.as_deref().map(str::trim) {
        None => None,
        Some("nodeports") => Some(true),
        Some("loadbalancer") => Some(false),
        Some(other) => {
            return Err((
                format!("metadata.annotations[\"{}\"]", annotation::TARGET),
                format!("\"{}\" is not nodeports or loadbalancer", printable(other)),
            ));
        }
    };
    Ok(match policy.node_ports {
        NodePorts::Off => false,
        NodePorts::Annotated => asked == Some(true),
        NodePorts::All => asked != Some(false),
    })
}

/// The InternalIP addresses of the nodes that may take traffic (Ready, not excluded from
/// external load balancers, not being deleted), each checked against the policy. When no
/// node is Ready, those not excluded nor being deleted: readiness alone, which a partition
/// between the nodes and the control plane takes from all of them at once, never leaves a
/// forward with nowhere to go (as health checks never do).
fn node_targets(policy: &Policy) -> Targets {
    let ready = policy.nodes.values().any(|n| n.eligible());
    let mut allowed = Vec::new();
    let mut refused = Vec::new();
    let usable = |n: &&Node| n.eligible() || (!ready && !n.excluded && !n.deleting);
    for node in policy.nodes.values().filter(usable) {
        for text in &node.internal_ips {
            let field = format!("node {} InternalIP", printable(&node.name));
            match text.parse::<IpAddr>() {
                Ok(addr) => match policy.check_target(addr) {
                    Ok(()) => allowed.push(addr),
                    Err(reason) => refused.push((field, reason)),
                },
                Err(_) => refused.push((
                    field,
                    format!("\"{}\" is not an IP address", printable(text)),
                )),
            }
        }
    }
    allowed.sort_unstable();
    allowed.dedup();
    (allowed, refused, true)
}

/// `spec.loadBalancerSourceRanges` as canonical, disjoint networks, sorted.
pub(super) fn source_ranges(service: &Service) -> Result<Vec<IpNet>, (String, String)> {
    let mut nets = Vec::new();
    for (index, text) in service.source_ranges.iter().enumerate() {
        let net: IpNet = text.trim().parse().map_err(|_| {
            (
                format!("spec.loadBalancerSourceRanges[{index}]"),
                format!("\"{}\" is not a network in CIDR notation", printable(text)),
            )
        })?;
        nets.push(net.trunc());
    }
    // Overlapping ranges would be overlapping elements of one interval set, which nft
    // refuses; aggregated, they are disjoint, sorted, and cover the same clients.
    Ok(IpNet::aggregate(&nets))
}

/// How a Service's backends may be checked.
pub(super) struct Checks {
    pub(super) on: bool,
    /// `spec.healthCheckNodePort`, valid.
    pub(super) node_port: Option<u16>,
}

pub(super) fn health_checks(service: &Service) -> Result<Checks, (String, String)> {
    let field = || format!("metadata.annotations[\"{}\"]", annotation::HEALTH_CHECK);
    let on = match service.health_check.as_deref().map(str::trim) {
        None | Some("on") => true,
        Some("off") => false,
        Some(other) => {
            return Err((
                field(),
                format!("\"{}\" is not on or off; checking", printable(other)),
            ));
        }
    };
    let node_port = match service.health_check_node_port {
        None => None,
        Some(port) => Some(
            u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    (
                        "spec.healthCheckNodePort".to_owned(),
                        format!("{port} is not a valid port"),
                    )
                })?,
        ),
    };
    Ok(Checks { on, node_port })
}

/// How the backends of a forward of `protocol` to `port` are checked: TCP by a connection,
/// UDP and SCTP by kube-proxy's health check of the node when the Service has one.
pub(super) fn probe_of(protocol: Protocol, port: u16, checks: &Checks) -> Option<Probe> {
    if !checks.on {
        return None;
    }
    match protocol {
        Protocol::Tcp => Some(Probe::Tcp(port)),
        Protocol::Udp | Protocol::Sctp => checks.node_port.map(Probe::Http),
    }
}
