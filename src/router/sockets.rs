//! The ports the router itself serves on its WAN side: TCP sockets listening and UDP sockets
//! bound and unconnected, on any address or on a WAN address (of the network namespace the
//! daemon runs in). A forward on such a port would take the service (WireGuard, SSH, the web
//! interface) away from the router's owner.
//!
//! Asked of the kernel with a `NETLINK_SOCK_DIAG` dump, which filters by socket state in the
//! kernel: only listening and unconnected sockets come back, however many connections the
//! router carries (`cargo bench --bench sockets` compares it with `/proc/net`). A kernel
//! without `inet_diag` (OpenWrt's `kmod-inet-diag` is a package of its own) is read through
//! `/proc/net/{tcp,tcp6,udp,udp6}` instead.
//!
//! Both read by hand: the request is one fixed 56-byte structure and the answer's first 24
//! bytes name the address and port, on top of the netlink framing `kernel::wire` already
//! reads; `/proc/net` is four fixed-format tables. No maintained crate reads either without
//! pulling in a process-inspection library or a netlink packet family several times this
//! module's size.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};

use netlink_sys::{Socket, SocketAddr, protocols};
use nix::libc;

use crate::core::model::Protocol;
use crate::kernel::wire;

/// `TCP_LISTEN`, the state of a listening TCP socket.
const TCP_LISTEN: u8 = 10;
/// `TCP_CLOSE`, which unconnected UDP sockets report.
const TCP_CLOSE: u8 = 7;
/// `SOCK_DIAG_BY_FAMILY`, the request and answer type of inet sockets.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// `struct inet_diag_req_v2`: family, protocol, extensions, pad, states, and a socket id
/// (ports, addresses, interface, cookie) left zero for a dump.
const REQUEST_LEN: usize = 56;
/// Where the source port (network order) and address start in `struct inet_diag_msg`.
const ANSWER_PORT: usize = 4;
const ANSWER_ADDRESS: usize = 8;

/// A socket WAN clients could reach if nothing took its port first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bound {
    pub protocol: Protocol,
    pub address: IpAddr,
    pub port: u16,
}

/// The ports served on the WAN side: listening on an unspecified address or on one of `wan`.
pub fn served(wan: &BTreeSet<IpAddr>) -> io::Result<BTreeSet<(Protocol, u16)>> {
    Ok(served_on(&listening()?, wan))
}

/// The ports of `sockets` bound where WAN clients reach: any address, or one of `wan`.
pub fn served_on(sockets: &BTreeSet<Bound>, wan: &BTreeSet<IpAddr>) -> BTreeSet<(Protocol, u16)> {
    sockets
        .iter()
        .filter(|s| s.address.is_unspecified() || wan.contains(&s.address))
        .map(|s| (s.protocol, s.port))
        .collect()
}

/// Set once a dump was refused: this kernel has no `inet_diag`, `/proc/net` is read from
/// then on (and said once).
static NO_DIAG: AtomicBool = AtomicBool::new(false);

/// Every listening TCP socket and unconnected UDP socket of this network namespace.
pub fn listening() -> io::Result<BTreeSet<Bound>> {
    Reader::new().listening()
}

/// Reads the sockets again and again through one netlink socket.
pub struct Reader {
    diag: Option<Diag>,
}

impl Default for Reader {
    fn default() -> Self {
        Reader::new()
    }
}

impl Reader {
    pub fn new() -> Reader {
        let diag = if NO_DIAG.load(Ordering::Relaxed) {
            None
        } else {
            Diag::open().map_err(|error| no_diag(&error)).ok()
        };
        Reader { diag }
    }

    /// Every listening TCP socket and unconnected UDP socket of this network namespace.
    pub fn listening(&mut self) -> io::Result<BTreeSet<Bound>> {
        if let Some(diag) = &mut self.diag {
            match diag.listening() {
                Ok(sockets) => return Ok(sockets),
                Err(error) if unsupported(&error) => {
                    no_diag(&error);
                    self.diag = None;
                }
                Err(error) => return Err(error),
            }
        }
        from_proc()
    }
}

/// Says once that `/proc/net` is read instead.
fn no_diag(error: &io::Error) {
    if !NO_DIAG.swap(true, Ordering::Relaxed) {
        tracing::info!(%error, "no sock_diag in this kernel (kmod-inet-diag); reading /proc/net for the ports the router serves");
    }
}

/// Whether a dump failed because the kernel has no diag module for it.
fn unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOENT | libc::EOPNOTSUPP | libc::EPROTONOSUPPORT | libc::EINVAL)
    )
}

/// A `NETLINK_SOCK_DIAG` socket.
struct Diag {
    socket: Socket,
    buffer: Vec<u8>,
    seq: u32,
}

impl Diag {
    fn open() -> io::Result<Diag> {
        let mut socket = Socket::new(protocols::NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Diag {
            socket,
            buffer: vec![0; 32 * 1024],
            seq: 0,
        })
    }

    /// Every listening TCP socket and unconnected UDP socket, both families.
    fn listening(&mut self) -> io::Result<BTreeSet<Bound>> {
        let mut sockets = BTreeSet::new();
        for family in [AF_INET, AF_INET6] {
            self.dump(family, Protocol::Tcp, TCP_LISTEN, &mut sockets)?;
            self.dump(family, Protocol::Udp, TCP_CLOSE, &mut sockets)?;
        }
        Ok(sockets)
    }

    fn dump(
        &mut self,
        family: u8,
        protocol: Protocol,
        state: u8,
        into: &mut BTreeSet<Bound>,
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let number = match protocol {
            Protocol::Udp => IPPROTO_UDP,
            _ => IPPROTO_TCP,
        };
        let sent = self
            .socket
            .send(&request(self.seq, family, number, state), 0)?;
        if sent != 16 + REQUEST_LEN {
            return Err(io::Error::other("sock_diag request cut short"));
        }
        loop {
            let len = {
                let mut buffer = &mut self.buffer[..];
                self.socket.recv(&mut buffer, 0)?
            };
            for message in wire::messages(&self.buffer[..len]) {
                if message.seq != self.seq {
                    continue;
                }
                match message.kind {
                    wire::NLMSG_DONE => return Ok(()),
                    wire::NLMSG_ERROR => {
                        let code = message.error().unwrap_or(libc::EIO);
                        return Err(io::Error::from_raw_os_error(code));
                    }
                    SOCK_DIAG_BY_FAMILY => into.extend(answer(message.body, protocol)),
                    _ => {}
                }
            }
        }
    }
}

/// A dump request for the sockets of `family` and `protocol` in `state`.
fn request(seq: u32, family: u8, protocol: u8, state: u8) -> Vec<u8> {
    let len = 16 + REQUEST_LEN;
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(&(len as u32).to_ne_bytes());
    bytes.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    bytes.extend_from_slice(&(wire::NLM_F_REQUEST | wire::NLM_F_DUMP).to_ne_bytes());
    bytes.extend_from_slice(&seq.to_ne_bytes());
    bytes.extend_from_slice(&0u32.to_ne_bytes());
    bytes.extend_from_slice(&[family, protocol, 0, 0]);
    bytes.extend_from_slice(&(1u32 << state).to_ne_bytes());
    bytes.resize(len, 0);
    bytes
}

/// The address and port of one `inet_diag_msg`.
fn answer(body: &[u8], protocol: Protocol) -> Option<Bound> {
    let family = *body.first()?;
    let port = u16::from_be_bytes(body.get(ANSWER_PORT..ANSWER_PORT + 2)?.try_into().ok()?);
    let address = match family {
        AF_INET => {
            let b: [u8; 4] = body
                .get(ANSWER_ADDRESS..ANSWER_ADDRESS + 4)?
                .try_into()
                .ok()?;
            IpAddr::V4(Ipv4Addr::from(b))
        }
        AF_INET6 => {
            let b: [u8; 16] = body
                .get(ANSWER_ADDRESS..ANSWER_ADDRESS + 16)?
                .try_into()
                .ok()?;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    (port != 0).then_some(Bound {
        protocol,
        // An IPv6 socket bound to an IPv4-mapped address serves that IPv4 address.
        address: address.to_canonical(),
        port,
    })
}

/// The same from `/proc/net`, for kernels without `inet_diag`: the calling thread's, which is
/// in the namespace its sockets are (`/proc/self` is the process's first thread's).
pub fn from_proc() -> io::Result<BTreeSet<Bound>> {
    let mut sockets = BTreeSet::new();
    for (file, protocol, state) in [
        ("/proc/thread-self/net/tcp", Protocol::Tcp, TCP_LISTEN),
        ("/proc/thread-self/net/tcp6", Protocol::Tcp, TCP_LISTEN),
        ("/proc/thread-self/net/udp", Protocol::Udp, TCP_CLOSE),
        ("/proc/thread-self/net/udp6", Protocol::Udp, TCP_CLOSE),
    ] {
        match std::fs::read_to_string(file) {
            Ok(text) => sockets.extend(parse(&text, protocol, state)),
            // A kernel without IPv6 has no tcp6/udp6.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(sockets)
}

/// The sockets of one `/proc/net` table in `state`.
pub fn parse(text: &str, protocol: Protocol, state: u8) -> Vec<Bound> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut columns = line.split_whitespace();
            let local = columns.nth(1)?;
            let st = u8::from_str_radix(columns.nth(1)?, 16).ok()?;
            let (address, port) = local.split_once(':')?;
            let address = address_of(address)?.to_canonical();
            let port = u16::from_str_radix(port, 16).ok()?;
            (st == state && port != 0).then_some(Bound {
                protocol,
                address,
                port,
            })
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

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn listening_on_any_or_wan_counts_and_lan_or_loopback_does_not() {
        let wan = BTreeSet::from([ip("203.0.113.1")]);
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
        let sockets: BTreeSet<Bound> = parse(&text, Protocol::Tcp, TCP_LISTEN)
            .into_iter()
            .collect();
        assert_eq!(sockets.len(), 4, "{sockets:?}");
        let ports = served_on(&sockets, &wan);
        assert_eq!(
            ports,
            BTreeSet::from([(Protocol::Tcp, 22), (Protocol::Tcp, 443)])
        );
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
    fn diag_answers_are_read_and_mapped_addresses_count_as_ipv4() {
        let mut body = vec![AF_INET6, TCP_LISTEN, 0, 0];
        body.extend_from_slice(&2222u16.to_be_bytes());
        body.extend_from_slice(&0u16.to_be_bytes());
        let mapped: Ipv6Addr = "::ffff:203.0.113.1".parse().unwrap();
        body.extend_from_slice(&mapped.octets());
        body.resize(72, 0);
        assert_eq!(
            answer(&body, Protocol::Tcp),
            Some(Bound {
                protocol: Protocol::Tcp,
                address: ip("203.0.113.1"),
                port: 2222
            })
        );
        assert_eq!(answer(&body[..10], Protocol::Tcp), None);
        let request = request(7, AF_INET, IPPROTO_UDP, TCP_CLOSE);
        assert_eq!(request.len(), 72);
        assert_eq!(request[16..20], [AF_INET, IPPROTO_UDP, 0, 0]);
        assert_eq!(request[20..24], (1u32 << 7).to_ne_bytes());
    }

    #[test]
    fn this_hosts_own_sockets_are_read_both_ways() {
        let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let tcp = std::net::TcpListener::bind("[::]:0").unwrap();
        let udp = Bound {
            protocol: Protocol::Udp,
            address: ip("0.0.0.0"),
            port: udp.local_addr().unwrap().port(),
        };
        let tcp = Bound {
            protocol: Protocol::Tcp,
            address: ip("::"),
            port: tcp.local_addr().unwrap().port(),
        };
        for sockets in [listening().unwrap(), from_proc().unwrap()] {
            assert!(sockets.contains(&udp), "{udp:?} in {sockets:?}");
            assert!(sockets.contains(&tcp), "{tcp:?} in {sockets:?}");
        }
    }
}
