//! The router's interface addresses: read whole with `getifaddrs` (nix) after each burst of
//! rtnetlink notifications, to keep the WAN address sets and the policy's "never the
//! router's own addresses" current. A dump after each burst is simpler than following deltas
//! and cannot drift.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;

use netlink_sys::{AsyncSocketExt, TokioSocket, protocols};

use crate::netlink::{drain, subscribe};

/// rtnetlink multicast groups (linux/rtnetlink.h `RTNLGRP_*`).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV6_IFADDR: u32 = 9;

/// Addresses of the router's interfaces, read at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Addresses {
    /// Addresses of the WAN interfaces that outside clients can reach (no IPv6 link-local).
    pub wan: BTreeSet<IpAddr>,
    /// Every address of every interface: forwards must never point at the router itself.
    pub all: BTreeSet<IpAddr>,
}

impl Addresses {
    /// Sorts `(interface, address)` pairs into WAN and all.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, IpAddr)>,
        wan_interfaces: &BTreeSet<String>,
    ) -> Addresses {
        let mut addresses = Addresses::default();
        for (interface, address) in pairs {
            addresses.all.insert(address);
            let link_local = matches!(address, IpAddr::V6(v6) if v6.is_unicast_link_local());
            if wan_interfaces.contains(interface) && !link_local {
                addresses.wan.insert(address);
            }
        }
        addresses
    }

    /// Reads the interfaces' addresses now.
    pub fn read(wan_interfaces: &BTreeSet<String>) -> io::Result<Addresses> {
        let list: Vec<(String, IpAddr)> = nix::ifaddrs::getifaddrs()?
            .filter_map(|entry| {
                let address = entry.address?;
                let ip = address
                    .as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| address.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))?;
                Some((entry.interface_name, ip))
            })
            .collect();
        Ok(Addresses::from_pairs(
            list.iter().map(|(i, a)| (i.as_str(), *a)),
            wan_interfaces,
        ))
    }
}

/// A subscription to link and address changes.
pub struct LinkEvents {
    socket: TokioSocket,
}

impl LinkEvents {
    pub fn subscribe() -> io::Result<LinkEvents> {
        let socket = subscribe(
            protocols::NETLINK_ROUTE,
            &[RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR],
        )?;
        Ok(LinkEvents { socket })
    }

    /// Waits for the next change, then takes every notification already queued, so a burst
    /// (an interface going down drops all its addresses) costs one read. An overrun receive
    /// buffer also counts as a change.
    pub async fn changed(&mut self) {
        let _ = self.socket.recv_from_full().await;
        drain(&mut self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan_addresses_leave_out_link_local_and_other_interfaces() {
        let wan = BTreeSet::from(["wan".to_owned()]);
        let pairs = [
            ("wan", "203.0.113.1".parse().unwrap()),
            ("wan", "2001:db8::1".parse().unwrap()),
            ("wan", "fe80::1".parse().unwrap()),
            ("lan", "192.168.1.1".parse().unwrap()),
        ];
        let addresses = Addresses::from_pairs(pairs, &wan);
        let wan_list: Vec<String> = addresses.wan.iter().map(ToString::to_string).collect();
        assert_eq!(wan_list, ["203.0.113.1", "2001:db8::1"]);
        assert_eq!(addresses.all.len(), 4);
    }
}
