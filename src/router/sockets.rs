//! The ports the router itself serves on its WAN side: TCP sockets listening and UDP sockets
//! bound, on any address or on a WAN address, read from `/proc/net/{tcp,tcp6,udp,udp6}` (of
//! the network namespace the daemon runs in). A forward on such a port would take the
//! service (WireGuard, SSH, the web interface) away from the router's owner.
//!
//! Read by hand: the files are four fixed-format tables, and no maintained crate reads them
//! without pulling in a process-inspection library several times this module's size.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::core::model::Protocol;

/// `TCP_LISTEN` in the `st` column.
const TCP_LISTEN: &str = "0A";
/// `TCP_CLOSE`, which unconnected UDP sockets report.
const UDP_UNCONNECTED: &str = "07";

/// The ports served on the WAN side: listening on an unspecified address or on one of `wan`.
pub fn served(wan: &BTreeSet<IpAddr>) -> io::Result<BTreeSet<(Protocol, u16)>> {
    let mut ports = BTreeSet::new();
    for (file, protocol, state) in [
        ("/proc/net/tcp", Protocol::Tcp, TCP_LISTEN),
        ("/proc/net/tcp6", Protocol::Tcp, TCP_LISTEN),
        ("/proc/net/udp", Protocol::Udp, UDP_UNCONNECTED),
        ("/proc/net/udp6", Protocol::Udp, UDP_UNCONNECTED),
    ] {
        match std::fs::read_to_string(file) {
            Ok(text) => ports.extend(parse(&text, protocol, state, wan)),
            // A kernel without IPv6 has no tcp6/udp6.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(ports)
}

/// The ports of one table whose sockets are in `state` and bound where WAN clients reach.
pub fn parse(
    text: &str,
    protocol: Protocol,
    state: &str,
    wan: &BTreeSet<IpAddr>,
) -> Vec<(Protocol, u16)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut columns = line.split_whitespace();
            let local = columns.nth(1)?;
            let st = columns.nth(1)?;
            let (address, port) = local.split_once(':')?;
            let address = address_of(address)?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let reachable = address.is_unspecified() || wan.contains(&address);
            (st == state && reachable && port != 0).then_some((protocol, port))
        })
        .collect()
}

/// An address as the kernel prints it: the bytes of each 32-bit word of the address in
/// network order, printed as a host-order number (`%08X`). Reading the number back in host
/// order gives the network bytes again on either byte order.
fn address_of(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let text = hex.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(text, 16).ok()?.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How this host prints an address's network bytes (the kernel's `%08X` of the word).
    fn printed(bytes: [u8; 4]) -> String {
        format!("{:08X}", u32::from_ne_bytes(bytes))
    }

    #[test]
    fn listening_on_any_or_wan_counts_and_lan_or_loopback_does_not() {
        let wan = BTreeSet::from(["203.0.113.1".parse().unwrap()]);
        let any = printed([0, 0, 0, 0]);
        let wan_addr = printed([203, 0, 113, 1]);
        let lan = printed([192, 168, 1, 1]);
        let lo = printed([127, 0, 0, 1]);
        let text = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {any}:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1\n\
             1: {wan_addr}:01BB 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 2 1\n\
             2: {lan}:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 3 1\n\
             3: {lo}:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 4 1\n\
             4: {wan_addr}:C350 {lan}:0016 01 00000000:00000000 00:00000000 00000000 0 0 5 1\n"
        );
        let ports = parse(&text, Protocol::Tcp, TCP_LISTEN, &wan);
        assert_eq!(ports, [(Protocol::Tcp, 22), (Protocol::Tcp, 443)]);
    }

    #[test]
    fn ipv6_words_are_read_in_host_order() {
        let v6: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
        let b = v6.octets();
        let hex: String = (0..4)
            .map(|i| printed([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]))
            .collect();
        assert_eq!(address_of(&hex), Some(IpAddr::V6(v6)));
        assert_eq!(address_of("0000"), None);
        assert_eq!(address_of("zzzzzzzz"), None);
    }

    #[test]
    fn this_hosts_own_sockets_are_read() {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let served = served(&BTreeSet::new()).unwrap();
        assert!(
            served.contains(&(Protocol::Udp, port)),
            "{port} in {served:?}"
        );
    }
}
