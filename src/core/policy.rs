//! Who may open a port on the router, decided by its owner: which namespaces may ask, which
//! external ports may be opened, and which addresses forwards may point at.
//!
//! The defaults are safe for a device that guards a network: any namespace and port, but
//! targets only in private ranges (RFC 1918, RFC 6598 shared space, ULA), and never an
//! address that cannot be a host (loopback, link-local, multicast, unspecified, broadcast)
//! nor the router's own.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use ipnet::IpNet;

use crate::core::model::Protocol;
use crate::core::node::Nodes;
use serde::Deserialize;

/// The private ranges allowed as targets by default.
pub const DEFAULT_TARGETS: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Namespaces allowed by name; with no selector either, `None` allows every namespace.
    pub namespaces: Option<BTreeSet<String>>,
    /// Namespaces allowed by their labels.
    pub namespace_selector: Option<LabelSelector>,
    /// The namespaces the selector matches now: kept current by the daemon's watch of
    /// Namespaces, or read from Namespace manifests by `plan` and `apply`.
    pub selected_namespaces: BTreeSet<String>,
    pub ports: Vec<RangeInclusive<u16>>,
    pub targets: Vec<IpNet>,
    /// Addresses of the router itself, never a target.
    pub router_addresses: BTreeSet<IpAddr>,
    /// Whether `spec.externalIPs` may be a target. Off by default: any Service may set it
    /// (CVE-2020-8554), while a LoadBalancer address comes from a controller.
    pub external_ips: bool,
    /// Whether the owner named the allowed ports; only then may a forward take a port the
    /// router itself serves on its WAN side.
    pub explicit_ports: bool,
    /// Ports the router itself serves on its WAN side (listening on any address or a WAN
    /// one), read from the kernel by the daemon and `apply`.
    pub router_ports: BTreeSet<(Protocol, u16)>,
    /// Which Services without a LoadBalancer address go to their node ports.
    pub node_ports: NodePorts,
    /// The cluster's Nodes: kept current by the daemon's watch of Nodes (when node ports
    /// are on), or read from Node manifests by `plan` and `apply`.
    pub nodes: Nodes,
}

/// Which Services without a LoadBalancer address are forwarded to their node ports on the
/// cluster's Ready nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodePorts {
    /// None: the Nodes are not watched.
    #[default]
    Off,
    /// Those annotated `kube-port-forward-controller/target: nodeports`.
    Annotated,
    /// Every one (a Service annotated `target: loadbalancer` still waits for its address).
    All,
}

impl NodePorts {
    pub fn parse(text: &str) -> Option<NodePorts> {
        match text {
            "off" => Some(NodePorts::Off),
            "annotated" => Some(NodePorts::Annotated),
            "all" => Some(NodePorts::All),
            _ => None,
        }
    }
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            namespaces: None,
            namespace_selector: None,
            selected_namespaces: BTreeSet::new(),
            ports: vec![1..=65535],
            targets: DEFAULT_TARGETS
                .iter()
                .map(|t| t.parse().expect("the default targets are networks"))
                .collect(),
            router_addresses: BTreeSet::new(),
            external_ips: false,
            explicit_ports: false,
            router_ports: BTreeSet::new(),
            node_ports: NodePorts::Off,
            nodes: Nodes::new(),
        }
    }
}

/// A policy that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("ports \"{0}\": use port numbers and ranges such as 80,443,8000-8999 (1 to 65535)")]
    Ports(String),
    #[error("target network \"{0}\": use CIDR notation such as 192.168.0.0/16 or fd00::/8")]
    Target(String),
    #[error("namespace \"{0}\" is not a valid namespace name")]
    Namespace(String),
    #[error(
        "namespace selector \"{0}\": use key=value, key!=value, key or !key, separated by commas"
    )]
    Selector(String),
    #[error("{file}: cannot read")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
}

/// What the owner sets, from the flags or the policy file (the same settings, re-read on
/// SIGHUP); `None` keeps the default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyParts {
    pub namespaces: Option<Vec<String>>,
    pub namespace_selector: Option<String>,
    pub ports: Option<String>,
    pub targets: Option<Vec<String>>,
    pub external_ips: Option<bool>,
    pub node_ports: Option<NodePorts>,
}

impl Policy {
    /// Builds a policy from its parts as flags or the file give them.
    pub fn from_parts(parts: &PolicyParts) -> Result<Policy, PolicyError> {
        let mut policy = Policy {
            namespace_selector: parts
                .namespace_selector
                .as_deref()
                .map(LabelSelector::parse)
                .transpose()?,
            external_ips: parts.external_ips.unwrap_or(false),
            node_ports: parts.node_ports.unwrap_or_default(),
            ..Policy::default()
        };
        if let Some(namespaces) = parts.namespaces.as_ref().filter(|n| !n.is_empty()) {
            for namespace in namespaces {
                if !crate::core::names::is_dns_label(namespace) {
                    return Err(PolicyError::Namespace(namespace.clone()));
                }
            }
            policy.namespaces = Some(namespaces.iter().cloned().collect());
        }
        if let Some(ports) = &parts.ports {
            policy.ports = parse_ports(ports)?;
            policy.explicit_ports = true;
        }
        if let Some(targets) = parts.targets.as_ref().filter(|t| !t.is_empty()) {
            policy.targets = targets
                .iter()
                .map(|t| t.parse().map_err(|_| PolicyError::Target(t.clone())))
                .collect::<Result<_, _>>()?;
        }
        Ok(policy)
    }

    /// Reads the text of a policy file (YAML) named `file` in errors.
    pub fn parse_file(file: &str, text: &str) -> Result<Policy, PolicyError> {
        let parts: PolicyParts = if text.trim().is_empty() {
            PolicyParts::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| PolicyError::Syntax {
                file: file.to_owned(),
                message: e.to_string(),
            })?
        };
        Policy::from_parts(&parts).map_err(|e| PolicyError::Syntax {
            file: file.to_owned(),
            message: e.to_string(),
        })
    }

    pub fn check_namespace(&self, namespace: &str) -> Result<(), String> {
        if self.namespaces.is_none() && self.namespace_selector.is_none() {
            return Ok(());
        }
        let listed = self
            .namespaces
            .as_ref()
            .is_some_and(|allowed| allowed.contains(namespace));
        let selected =
            self.namespace_selector.is_some() && self.selected_namespaces.contains(namespace);
        if listed || selected {
            Ok(())
        } else {
            Err(format!(
                "namespace {namespace} may not open router ports (policy)"
            ))
        }
    }

    pub fn check_port(&self, protocol: Protocol, port: u16) -> Result<(), String> {
        if !self.ports.iter().any(|r| r.contains(&port)) {
            return Err(format!("external port {port} is not allowed (policy)"));
        }
        if self.router_ports.contains(&(protocol, port)) && !self.explicit_ports {
            return Err(format!(
                "the router itself serves {port}/{protocol} on its WAN side; name the port in the allowed ports (--allow-ports) to forward it anyway"
            ));
        }
        Ok(())
    }

    pub fn check_target(&self, addr: IpAddr) -> Result<(), String> {
        if !host_address(addr) {
            return Err(format!("{addr} cannot be a forward target"));
        }
        if self.router_addresses.contains(&addr) {
            return Err(format!("{addr} is the router's own address"));
        }
        if !self.targets.iter().any(|net| net.contains(&addr)) {
            return Err(format!(
                "{addr} is outside the allowed target networks (policy)"
            ));
        }
        Ok(())
    }
}

/// An equality-based label selector: `key=value`, `key==value`, `key!=value`, `key`,
/// `!key`, comma-separated; all terms must hold. Set-based terms (`in`, `notin`) are refused
/// rather than misread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSelector {
    text: String,
    terms: Vec<(String, Term)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Term {
    Equals(String),
    NotEquals(String),
    Exists,
    Absent,
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<LabelSelector, PolicyError> {
        let error = || PolicyError::Selector(text.to_owned());
        let key_ok = |k: &str| {
            !k.is_empty()
                && k.len() <= 317
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        };
        let value_ok = |v: &str| {
            v.len() <= 63
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        let mut terms = Vec::new();
        for raw in text.split(',') {
            let term = raw.trim();
            let (key, term) = if let Some((k, v)) = term.split_once("!=") {
                (k, Term::NotEquals(v.trim().to_owned()))
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, Term::Equals(v.trim().to_owned()))
            } else if let Some(k) = term.strip_prefix('!') {
                (k, Term::Absent)
            } else {
                (term, Term::Exists)
            };
            let key = key.trim();
            let value = match &term {
                Term::Equals(v) | Term::NotEquals(v) => v.as_str(),
                _ => "",
            };
            if !key_ok(key) || !value_ok(value) {
                return Err(error());
            }
            terms.push((key.to_owned(), term));
        }
        Ok(LabelSelector {
            text: text.trim().to_owned(),
            terms,
        })
    }

    /// The selector as the API server takes it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|(key, term)| match term {
            Term::Equals(v) => labels.get(key) == Some(v),
            Term::NotEquals(v) => labels.get(key) != Some(v),
            Term::Exists => labels.contains_key(key),
            Term::Absent => !labels.contains_key(key),
        })
    }
}

/// Addresses that can be a host: not loopback, link-local, multicast, unspecified or
/// broadcast.
fn host_address(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast())
        }
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_unicast_link_local()
                || a.is_multicast()
                || a.to_ipv4_mapped().is_some())
        }
    }
}

/// `80,443,8000-8999`
pub fn parse_ports(text: &str) -> Result<Vec<RangeInclusive<u16>>, PolicyError> {
    let error = || PolicyError::Ports(text.to_owned());
    let number =
        |t: &str| crate::core::annotation::parse_port_number(t.trim()).map_err(|_| error());
    text.split(',')
        .map(|part| match part.split_once('-') {
            Some((low, high)) => {
                let (low, high) = (number(low)?, number(high)?);
                if low <= high {
                    Ok(low..=high)
                } else {
                    Err(error())
                }
            }
            None => number(part).map(|p| p..=p),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_allow_private_targets_only() {
        let policy = Policy::default();
        for ok in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.240",
            "100.64.0.9",
            "fd00::1",
        ] {
            assert_eq!(policy.check_target(ok.parse().unwrap()), Ok(()), "{ok}");
        }
        for refused in [
            "8.8.8.8",
            "127.0.0.1",
            "169.254.1.1",
            "224.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "2001:db8::1",
            "fe80::1",
            "::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(
                policy.check_target(refused.parse().unwrap()).is_err(),
                "{refused}"
            );
        }
    }

    #[test]
    fn the_routers_own_addresses_are_never_targets() {
        let mut policy = Policy::from_parts(&PolicyParts {
            targets: Some(vec!["0.0.0.0/0".into()]),
            ..PolicyParts::default()
        })
        .unwrap();
        policy
            .router_addresses
            .insert("192.168.1.1".parse().unwrap());
        assert!(policy.check_target("192.168.1.1".parse().unwrap()).is_err());
        assert!(policy.check_target("8.8.8.8".parse().unwrap()).is_ok());
    }

    #[test]
    fn ports_and_namespaces() {
        let mut policy = Policy::from_parts(&PolicyParts {
            namespaces: Some(vec!["games".into(), "media".into()]),
            ports: Some("80, 443,25000-25999".into()),
            ..PolicyParts::default()
        })
        .unwrap();
        let tcp = Protocol::Tcp;
        assert!(policy.check_port(tcp, 443).is_ok() && policy.check_port(tcp, 25565).is_ok());
        assert!(policy.check_port(tcp, 22).is_err());
        // A port the router serves is taken only when the owner names it.
        policy.router_ports.insert((tcp, 443));
        assert!(policy.check_port(tcp, 443).is_ok());
        let mut default = Policy::default();
        default.router_ports.insert((Protocol::Udp, 51820));
        let refused = default.check_port(Protocol::Udp, 51820).unwrap_err();
        assert!(
            refused.contains("router itself serves 51820/UDP"),
            "{refused}"
        );
        assert!(default.check_port(tcp, 51820).is_ok());
        assert!(policy.check_namespace("games").is_ok());
        assert!(policy.check_namespace("kube-system").is_err());
        assert!(parse_ports("90-80").is_err());
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("http").is_err());
        let targets = PolicyParts {
            targets: Some(vec!["10.0.0.0/33".into()]),
            ..PolicyParts::default()
        };
        assert!(Policy::from_parts(&targets).is_err());
        let namespaces = PolicyParts {
            namespaces: Some(vec!["Bad_NS".into()]),
            ..PolicyParts::default()
        };
        assert!(Policy::from_parts(&namespaces).is_err());
    }

    #[test]
    fn namespaces_by_label_selector_and_by_name() {
        let mut policy = Policy::from_parts(&PolicyParts {
            namespaces: Some(vec!["infra".into()]),
            namespace_selector: Some("router-access=yes,!blocked".into()),
            ..PolicyParts::default()
        })
        .unwrap();
        let labels = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let selector = policy.namespace_selector.clone().unwrap();
        assert!(selector.matches(&labels(&[("router-access", "yes")])));
        assert!(!selector.matches(&labels(&[("router-access", "yes"), ("blocked", "")])));
        assert!(!selector.matches(&labels(&[("router-access", "no")])));
        assert!(policy.check_namespace("games").is_err());
        policy.selected_namespaces.insert("games".into());
        assert!(policy.check_namespace("games").is_ok());
        assert!(policy.check_namespace("infra").is_ok());
        assert!(LabelSelector::parse("env in (a,b)").is_err());
        assert!(LabelSelector::parse("").is_err());
        assert_eq!(selector.as_str(), "router-access=yes,!blocked");
    }
}
