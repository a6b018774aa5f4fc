//! Plain domain types shared by the core: what a forward is, who owns it, where it goes.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

/// Transport protocol of a forward, as a Kubernetes Service port names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the `spec.ports[].protocol` value; Kubernetes spells these in upper case only.
    pub fn from_kubernetes(value: &str) -> Option<Protocol> {
        match value {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The keyword nft uses for this protocol in an `inet_proto` value.
    pub fn nft_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    pub fn from_nft_name(value: &str) -> Option<Protocol> {
        match value {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "sctp" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// Address family of a forward: the router forwards IPv4 WAN traffic to IPv4 targets and
/// IPv6 WAN traffic to IPv6 targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

/// What identifies a forward on the router: two Services cannot share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ForwardKey {
    pub family: Family,
    pub protocol: Protocol,
    pub external_port: u16,
}

impl fmt::Display for ForwardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} ({})",
            self.external_port, self.protocol, self.family
        )
    }
}

/// Where a forward sends new flows: a Service's LoadBalancer (or external) address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Target {
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// Targets as one word: `10.0.0.1:80,10.0.0.2:80` (no spaces, for log fields and columns).
pub fn targets_text(targets: impl Iterator<Item = Target>) -> String {
    targets.map(|t| t.to_string()).collect::<Vec<_>>().join(",")
}

/// The Service (and which of its ports) a forward belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    /// Absent for Services read from manifests that were never stored in a cluster.
    pub uid: Option<String>,
    /// The Service port's name, or its number when it has no name.
    pub service_port: String,
}

impl Owner {
    pub fn service(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.service_port)
    }
}

/// How many buckets the clients of a forward with several backends are spread over: each
/// new flow's client address is hashed into one, and each bucket names one backend. 12 is
/// shared evenly by 1, 2, 3, 4, 6 and 12 backends (k3s clusters of 3 nodes are the usual
/// case); 5 backends get 3, 3, 2, 2, 2. Fixed, because the hash's modulus is in the rule.
pub const BUCKETS: usize = 12;

/// How the router checks a forward's backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "kind", content = "port", rename_all = "lowercase")]
pub enum Probe {
    /// A TCP connection to this port of the backend is accepted.
    Tcp(u16),
    /// `GET /` on this port of the backend answers 200: kube-proxy's health check of a
    /// Service with `externalTrafficPolicy: Local` (`spec.healthCheckNodePort`), 200 when
    /// the node has a ready endpoint.
    Http(u16),
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Tcp(port) => write!(f, "tcp:{port}"),
            Probe::Http(port) => write!(f, "http:{port}"),
        }
    }
}

/// One health check: a backend's address and how it is probed. Forwards to the same
/// backend the same way share it.
pub type Check = (IpAddr, Probe);

/// One forward the router should carry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Forward {
    pub key: ForwardKey,
    /// Where new flows go: the Service's addresses of this family, sorted, at least one.
    pub backends: Vec<IpAddr>,
    /// The port on every backend.
    pub port: u16,
    /// Backends a health check holds down, sorted: left out of the choice, unless every
    /// backend is down (a probe's word never blackholes a forward).
    pub down: Vec<IpAddr>,
    /// How its backends are checked; `None`: they are not (one backend, checks turned off,
    /// or nothing to probe: UDP without a `healthCheckNodePort`).
    pub probe: Option<Probe>,
    pub owner: Owner,
    /// Clients allowed to use it (`spec.loadBalancerSourceRanges` of its family), sorted,
    /// canonical; empty: every client.
    pub sources: Vec<IpNet>,
}

impl Forward {
    /// The backends new flows may go to: those not down, or all when every one is.
    pub fn choice(&self) -> Vec<IpAddr> {
        let up: Vec<IpAddr> = self
            .backends
            .iter()
            .filter(|b| !self.down.contains(b))
            .copied()
            .collect();
        if up.is_empty() {
            self.backends.clone()
        } else {
            up
        }
    }

    /// The health checks of its backends.
    pub fn checks(&self) -> impl Iterator<Item = Check> + '_ {
        self.probe
            .into_iter()
            .flat_map(|probe| self.backends.iter().map(move |addr| (*addr, probe)))
    }

    /// The backends as `address:port`.
    pub fn targets(&self) -> impl Iterator<Item = Target> + '_ {
        self.backends.iter().map(|&addr| Target {
            addr,
            port: self.port,
        })
    }

    /// The backend of each bucket, for a forward with several backends (`None`: one backend,
    /// no choice to make). Bucket `i` belongs to backend `i mod n`; the buckets of backends
    /// out of the choice go round the others in turn. So a backend going down moves only its
    /// own clients, and the clients of the others stay where their sessions are.
    pub fn buckets(&self) -> Option<[IpAddr; BUCKETS]> {
        if self.backends.len() < 2 {
            return None;
        }
        let choice = self.choice();
        let mut moved = 0;
        Some(std::array::from_fn(|bucket| {
            let base = self.backends[bucket % self.backends.len()];
            if choice.contains(&base) {
                base
            } else {
                moved += 1;
                choice[(moved - 1) % choice.len()]
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(backends: &[&str], down: &[&str]) -> Forward {
        Forward {
            key: ForwardKey {
                family: Family::Ipv4,
                protocol: Protocol::Tcp,
                external_port: 80,
            },
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
            port: 80,
            down: down.iter().map(|b| b.parse().unwrap()).collect(),
            probe: None,
            owner: Owner {
                namespace: "ns".into(),
                name: "web".into(),
                uid: None,
                service_port: "http".into(),
            },
            sources: Vec::new(),
        }
    }

    fn count(buckets: &[IpAddr; BUCKETS], addr: &str) -> usize {
        let addr: IpAddr = addr.parse().unwrap();
        buckets.iter().filter(|b| **b == addr).count()
    }

    #[test]
    fn one_backend_has_no_buckets() {
        assert_eq!(forward(&["10.0.0.1"], &[]).buckets(), None);
        assert_eq!(forward(&["10.0.0.1"], &["10.0.0.1"]).choice().len(), 1);
    }

    #[test]
    fn buckets_are_shared_evenly_and_a_down_backend_moves_only_its_own() {
        let all = forward(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], &[]);
        let before = all.buckets().unwrap();
        for addr in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            assert_eq!(count(&before, addr), 4);
        }
        let one_down = forward(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], &["10.0.0.2"]);
        let after = one_down.buckets().unwrap();
        assert_eq!(count(&after, "10.0.0.2"), 0);
        assert_eq!(count(&after, "10.0.0.1"), 6);
        assert_eq!(count(&after, "10.0.0.3"), 6);
        let down: IpAddr = "10.0.0.2".parse().unwrap();
        for (b, a) in before.iter().zip(after) {
            if *b != down {
                assert_eq!(*b, a, "a client of a healthy backend moved");
            }
        }
    }

    #[test]
    fn every_backend_down_keeps_them_all() {
        let f = forward(&["10.0.0.1", "10.0.0.2"], &["10.0.0.1", "10.0.0.2"]);
        assert_eq!(f.choice().len(), 2);
        let buckets = f.buckets().unwrap();
        assert_eq!(count(&buckets, "10.0.0.1"), 6);
        assert_eq!(count(&buckets, "10.0.0.2"), 6);
    }
}
