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
use std::path::Path;

use ipnet::IpNet;
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
    /// `None`: every namespace.
    pub namespaces: Option<BTreeSet<String>>,
    pub ports: Vec<RangeInclusive<u16>>,
    pub targets: Vec<IpNet>,
    /// Addresses of the router itself, never a target.
    pub router_addresses: BTreeSet<IpAddr>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            namespaces: None,
            ports: vec![1..=65535],
            targets: DEFAULT_TARGETS
                .iter()
                .map(|t| t.parse().expect("the default targets are networks"))
                .collect(),
            router_addresses: BTreeSet::new(),
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
    #[error("{file}: cannot read")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
}

/// The policy file: the same settings as the flags, re-read on SIGHUP.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub namespaces: Option<Vec<String>>,
    pub ports: Option<String>,
    pub targets: Option<Vec<String>>,
}

impl Policy {
    /// Builds a policy from its parts as flags or the file give them; `None` keeps the
    /// default.
    pub fn from_parts(
        namespaces: Option<&[String]>,
        ports: Option<&str>,
        targets: Option<&[String]>,
    ) -> Result<Policy, PolicyError> {
        let mut policy = Policy::default();
        if let Some(namespaces) = namespaces.filter(|n| !n.is_empty()) {
            for namespace in namespaces {
                if !crate::plan::is_dns_label(namespace) {
                    return Err(PolicyError::Namespace(namespace.clone()));
                }
            }
            policy.namespaces = Some(namespaces.iter().cloned().collect());
        }
        if let Some(ports) = ports {
            policy.ports = parse_ports(ports)?;
        }
        if let Some(targets) = targets.filter(|t| !t.is_empty()) {
            policy.targets = targets
                .iter()
                .map(|t| t.parse().map_err(|_| PolicyError::Target(t.clone())))
                .collect::<Result<_, _>>()?;
        }
        Ok(policy)
    }

    /// Reads a policy file (YAML).
    pub fn read(path: &Path) -> Result<Policy, PolicyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            file: file.clone(),
            source,
        })?;
        let parts: PolicyFile = if text.trim().is_empty() {
            PolicyFile::default()
        } else {
            serde_saphyr::from_str(&text).map_err(|e| PolicyError::Syntax {
                file,
                message: e.to_string(),
            })?
        };
        Policy::from_parts(
            parts.namespaces.as_deref(),
            parts.ports.as_deref(),
            parts.targets.as_deref(),
        )
    }

    pub fn check_namespace(&self, namespace: &str) -> Result<(), String> {
        match &self.namespaces {
            Some(allowed) if !allowed.contains(namespace) => Err(format!(
                "namespace {namespace} may not open router ports (policy)"
            )),
            _ => Ok(()),
        }
    }

    pub fn check_port(&self, port: u16) -> Result<(), String> {
        if self.ports.iter().any(|r| r.contains(&port)) {
            Ok(())
        } else {
            Err(format!("external port {port} is not allowed (policy)"))
        }
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
    let number = |t: &str| crate::annotation::parse_port_number(t.trim()).map_err(|_| error());
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
        let mut policy = Policy::from_parts(None, None, Some(&["0.0.0.0/0".into()])).unwrap();
        policy
            .router_addresses
            .insert("192.168.1.1".parse().unwrap());
        assert!(policy.check_target("192.168.1.1".parse().unwrap()).is_err());
        assert!(policy.check_target("8.8.8.8".parse().unwrap()).is_ok());
    }

    #[test]
    fn ports_and_namespaces() {
        let policy = Policy::from_parts(
            Some(&["games".into(), "media".into()]),
            Some("80, 443,25000-25999"),
            None,
        )
        .unwrap();
        assert!(policy.check_port(443).is_ok() && policy.check_port(25565).is_ok());
        assert!(policy.check_port(22).is_err());
        assert!(policy.check_namespace("games").is_ok());
        assert!(policy.check_namespace("kube-system").is_err());
        assert!(parse_ports("90-80").is_err());
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("http").is_err());
        assert!(Policy::from_parts(None, None, Some(&["10.0.0.0/33".into()])).is_err());
        assert!(Policy::from_parts(Some(&["Bad_NS".into()]), None, None).is_err());
    }
}
