//! Upstream mappings: behind another NAT (the ISP's box), the router asks the box's UPnP IGD
//! to send each port it forwards on to the router's own WAN address. Here: which mappings
//! the plan asks for, what each Service is told of them, and which addresses are private.
//! Pure; the IGD's lane (`router::upstream`) does the talking.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;

use crate::core::model::{Family, Forward, ForwardKey, Protocol};

/// One mapping on the IGD: the same external port and protocol as the router's forward, to
/// the router's WAN address. IGDs map IPv4 TCP and UDP only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Mapping {
    pub protocol: Protocol,
    pub port: u16,
}

impl Mapping {
    /// The mapping for a forward, when an IGD can hold one.
    pub fn of(key: &ForwardKey) -> Option<Mapping> {
        let mappable = key.family == Family::Ipv4 && key.protocol != Protocol::Sctp;
        mappable.then_some(Mapping {
            protocol: key.protocol,
            port: key.external_port,
        })
    }

    /// The protocol as the IGD spells it (`NewProtocol`).
    pub fn igd_protocol(&self) -> &'static str {
        match self.protocol {
            Protocol::Udp => "UDP",
            _ => "TCP",
        }
    }
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// Whose a mapping is: the Service that owns the forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub uid: Option<String>,
    /// `namespace/name`, the mapping's description on the IGD.
    pub service: String,
}

/// The mappings a plan asks for.
pub fn wanted<'a>(forwards: impl Iterator<Item = &'a Forward>) -> BTreeMap<Mapping, Wanted> {
    forwards
        .filter_map(|forward| {
            let mapping = Mapping::of(&forward.key)?;
            let wanted = Wanted {
                uid: forward.owner.uid.clone(),
                service: forward.owner.service(),
            };
            Some((mapping, wanted))
        })
        .collect()
}

/// What the IGD said of one mapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum MappingState {
    /// Mapped to the router's WAN address.
    Mapped,
    /// The IGD answered with an error (`code` is its UPnP error code, 0 for none).
    Refused { code: u16, reason: String },
    /// Not (yet) asked: no IGD found, or it does not answer.
    Pending,
}

/// What the upstream lane knows, as the daemon shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// The IGD's control URL, once found.
    pub igd: Option<String>,
    /// Whether it answered the last request.
    pub reachable: bool,
    /// Why it is not reachable, or was not found.
    pub error: Option<String>,
    /// Its external address (`GetExternalIPAddress`): the address the internet sees.
    pub external: Option<IpAddr>,
    /// The router's address the IGD maps to.
    pub internal: Option<Ipv4Addr>,
    /// What the IGD said of each mapping the plan asks for.
    pub mappings: BTreeMap<Mapping, MappingState>,
    /// The mappings open on the IGD now, by the uid of the Service they were made for
    /// (`None`: found in the IGD's list, left by an earlier run).
    pub held: BTreeMap<Mapping, Option<String>>,
    /// Whether the IGD's own list was read since the daemon started: until then mappings
    /// left by an earlier run may still be open upstream.
    pub listed: bool,
    /// The number of the daemon's last request the lane has been through: mappings asked
    /// for in a later one may be being made.
    pub pass_done: u64,
}

impl View {
    /// Whether a Service's mappings may still be open upstream: one not asked for any more
    /// is held for it (or for nobody known), the lane has not yet been through the last
    /// request that asked for its mappings (`asked`: that request's number), or the IGD's
    /// list was never read. Its finalizer waits for that (up to the cleanup deadline).
    pub fn still_open(
        &self,
        uid: &str,
        asked: Option<u64>,
        wanted: &BTreeMap<Mapping, Wanted>,
    ) -> bool {
        !self.listed
            || asked.is_some_and(|seq| seq > self.pass_done)
            || self.held.iter().any(|(mapping, owner)| {
                !wanted.contains_key(mapping) && owner.as_deref().is_none_or(|o| o == uid)
            })
    }
}

/// What one Service is told of its upstream mappings: a line for its condition, whether it
/// is a warning.
pub fn service_note(mappings: &[(Mapping, &MappingState)], view: &View) -> Option<(String, bool)> {
    if mappings.is_empty() {
        return None;
    }
    let ports = |state: fn(&MappingState) -> bool| -> Vec<String> {
        mappings
            .iter()
            .filter(|(_, s)| state(s))
            .map(|(m, _)| m.to_string())
            .collect()
    };
    let mapped = ports(|s| *s == MappingState::Mapped);
    let pending = ports(|s| *s == MappingState::Pending);
    let mut parts = Vec::new();
    if !mapped.is_empty() {
        let at = view
            .external
            .map_or_else(String::new, |a| format!(" at {a}"));
        parts.push(format!("upstream IGD maps {}{at}", mapped.join(", ")));
    }
    for (mapping, state) in mappings {
        if let MappingState::Refused { code, reason } = state {
            parts.push(format!("upstream IGD refused {mapping}: {code} {reason}"));
        }
    }
    if !pending.is_empty() {
        let why = view.error.as_deref().unwrap_or("not asked yet");
        parts.push(format!(
            "upstream not mapped ({why}): {}",
            pending.join(", ")
        ));
    }
    let warning = mapped.len() < mappings.len();
    Some((parts.join("; "), warning))
}

/// Whether the internet cannot reach this address directly: private (RFC 1918), shared
/// (carrier-grade NAT, 100.64/10), link-local, loopback or unspecified; for IPv6 unique
/// local (fc00::/7) and link-local. Ports opened on such an address need an upstream
/// mapping, and it is never published in DNS. (Documentation ranges count as public: no
/// router is given one, and test rigs use them as the internet.)
pub fn not_public(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || is_cgnat(addr)
        }
        IpAddr::V6(a) => {
            let first = a.segments()[0];
            a.is_loopback()
                || a.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || a.to_ipv4_mapped().is_some()
        }
    }
}

/// Whether the address is a carrier-grade NAT one (100.64/10).
pub fn is_cgnat(addr: IpAddr) -> bool {
    matches!(addr, IpAddr::V4(a) if a.octets()[0] == 100 && (64..128).contains(&a.octets()[1]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::Owner;

    fn forward(family: Family, protocol: Protocol, port: u16, name: &str) -> Forward {
        let addr: IpAddr = match family {
            Family::Ipv4 => "10.0.0.1".parse().unwrap(),
            Family::Ipv6 => "fd00::1".parse().unwrap(),
        };
        Forward {
            key: ForwardKey {
                family,
                protocol,
                external_port: port,
            },
            backends: vec![addr],
            port,
            down: Vec::new(),
            probe: None,
            owner: Owner {
                namespace: "ns".into(),
                name: name.into(),
                uid: Some(format!("uid-{name}")),
                service_port: "p".into(),
            },
            sources: Vec::new(),
        }
    }

    #[test]
    fn ipv4_tcp_and_udp_forwards_are_mapped_upstream() {
        let forwards = [
            forward(Family::Ipv4, Protocol::Tcp, 8080, "web"),
            forward(Family::Ipv4, Protocol::Udp, 8080, "dns"),
            forward(Family::Ipv6, Protocol::Tcp, 8443, "web"),
            forward(Family::Ipv4, Protocol::Sctp, 9000, "sig"),
        ];
        let wanted = wanted(forwards.iter());
        let keys: Vec<String> = wanted.keys().map(ToString::to_string).collect();
        assert_eq!(keys, ["8080/TCP", "8080/UDP"]);
        let udp = &wanted[&Mapping {
            protocol: Protocol::Udp,
            port: 8080,
        }];
        assert_eq!(udp.service, "ns/dns");
        assert_eq!(udp.uid.as_deref(), Some("uid-dns"));
    }

    #[test]
    fn services_are_told_what_the_igd_said() {
        let tcp = Mapping {
            protocol: Protocol::Tcp,
            port: 8080,
        };
        let udp = Mapping {
            protocol: Protocol::Udp,
            port: 5353,
        };
        let view = View {
            external: Some("198.51.100.7".parse().unwrap()),
            reachable: true,
            ..View::default()
        };
        let mapped = MappingState::Mapped;
        let (text, warning) = service_note(&[(tcp, &mapped)], &view).unwrap();
        assert_eq!(text, "upstream IGD maps 8080/TCP at 198.51.100.7");
        assert!(!warning);
        let refused = MappingState::Refused {
            code: 718,
            reason: "ConflictInMappingEntry".into(),
        };
        let (text, warning) = service_note(&[(tcp, &mapped), (udp, &refused)], &view).unwrap();
        assert_eq!(
            text,
            "upstream IGD maps 8080/TCP at 198.51.100.7; upstream IGD refused 5353/UDP: 718 ConflictInMappingEntry"
        );
        assert!(warning);
        let gone = View {
            error: Some("no answer from http://192.168.1.1:5000/ctl/IPConn".into()),
            ..View::default()
        };
        let (text, warning) = service_note(&[(tcp, &MappingState::Pending)], &gone).unwrap();
        assert_eq!(
            text,
            "upstream not mapped (no answer from http://192.168.1.1:5000/ctl/IPConn): 8080/TCP"
        );
        assert!(warning);
        assert_eq!(service_note(&[], &view), None);
    }

    #[test]
    fn a_release_waits_for_the_mappings_held_for_it_or_for_nobody_known() {
        let tcp = |port| Mapping {
            protocol: Protocol::Tcp,
            port,
        };
        let web = Wanted {
            uid: Some("uid-web".into()),
            service: "ns/web".into(),
        };
        let wanted = BTreeMap::from([(tcp(80), web)]);
        let mut view = View {
            listed: true,
            held: BTreeMap::from([(tcp(80), Some("uid-web".into()))]),
            ..View::default()
        };
        // Only what is held and no longer wanted counts, for its owner.
        assert!(!view.still_open("uid-old", None, &wanted));
        view.held.insert(tcp(9000), Some("uid-old".into()));
        assert!(view.still_open("uid-old", None, &wanted));
        assert!(!view.still_open("uid-other", None, &wanted));
        // Asked for in a request the lane has not been through: it may be being made.
        view.pass_done = 3;
        assert!(view.still_open("uid-other", Some(4), &wanted));
        assert!(!view.still_open("uid-other", Some(3), &wanted));
        // Left by an earlier run: anybody's, until deleted.
        view.held.insert(tcp(9001), None);
        assert!(view.still_open("uid-other", None, &wanted));
        // The IGD's list not read yet: nobody knows.
        let unread = View::default();
        assert!(unread.still_open("uid-other", None, &BTreeMap::new()));
    }

    #[test]
    fn private_and_shared_addresses_are_not_public() {
        for private in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.2",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.1.1",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(not_public(private.parse().unwrap()), "{private}");
        }
        for public in ["100.128.0.1", "2.3.4.5", "203.0.113.1", "2001:db8::1"] {
            assert!(!not_public(public.parse().unwrap()), "{public}");
        }
        assert!(is_cgnat("100.100.1.1".parse().unwrap()));
        assert!(!is_cgnat("192.168.1.1".parse().unwrap()));
    }
}
