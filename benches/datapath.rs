//! New TCP connections per second through the router to the most recently added forward:
//! the daemon's map lookup with 1 and with 10,000 forwards, the same with three backends
//! per forward (the client-address hash and the bucket maps), against one nft rule per
//! forward (how OpenWrt's fw4 redirects and miniupnpd do it) with 1 and 10,000 rules.
//! Client, router and server are network namespaces on this machine: needs root.
//! `cargo bench --bench datapath [-- SECONDS]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::{Netns, TempDir, Topology};
use kube_port_forward::core::model::{Family, Forward, ForwardKey, Owner, Protocol};
use kube_port_forward::kernel::{DEFAULT_TABLE, Ruleset, TableConfig};
use kube_port_forward::kernel::{Engine, Kernel, NftCli};

const SERVER_PORT: u16 = 8080;
/// The forward under test is added last, on this external port.
const MEASURED_PORT: u16 = 80;

#[derive(Clone, Copy, Debug)]
enum Variant {
    Map(usize),
    /// Every forward with three backends.
    Hash(usize),
    Rules(usize),
}

impl Variant {
    fn label(self) -> String {
        match self {
            Variant::Map(n) => format!("map lookup, {n:>5} forwards"),
            Variant::Hash(n) => format!("3 backends each, {n:>5} forwards"),
            Variant::Rules(n) => format!("one rule per forward, {n:>5} rules"),
        }
    }
}

/// The other forwards: external ports 10000 and up, to other LAN addresses.
fn other_target(i: usize) -> String {
    format!("192.168.50.{}", 100 + i % 100)
}

/// The measured forward's backends when it has three: the server's three addresses.
const SERVER_ADDRESSES: [&str; 3] = [common::SERVER4, "192.168.50.11", "192.168.50.12"];

/// `n` forwards with `backends` backends each (the others: the next addresses up).
fn map_ruleset(n: usize, backends: u8) -> Ruleset {
    let mut forwards = BTreeMap::new();
    let mut add = |port: u16, addr: String, port_to: u16, name: String| {
        let first: std::net::Ipv4Addr = addr.parse().unwrap();
        let backends = (0..backends)
            .map(|k| {
                let mut o = first.octets();
                o[3] = if port == MEASURED_PORT {
                    SERVER_ADDRESSES[usize::from(k)]
                        .parse::<std::net::Ipv4Addr>()
                        .unwrap()
                        .octets()[3]
                } else {
                    o[3].wrapping_add(k)
                };
                std::net::IpAddr::from(o)
            })
            .collect();
        let key = ForwardKey {
            family: Family::Ipv4,
            protocol: Protocol::Tcp,
            external_port: port,
        };
        let forward = Forward {
            key,
            backends,
            port: port_to,
            down: Vec::new(),
            probe: None,
            owner: Owner {
                namespace: "bench".into(),
                name,
                uid: None,
                service_port: "http".into(),
            },
            sources: Vec::new(),
        };
        forwards.insert(key, forward);
    };
    for i in 0..n - 1 {
        add(10_000 + i as u16, other_target(i), 8000, format!("svc-{i}"));
    }
    add(
        MEASURED_PORT,
        common::SERVER4.into(),
        SERVER_PORT,
        "measured".into(),
    );
    let config = TableConfig::new(
        DEFAULT_TABLE,
        ["wan".to_owned()],
        [common::ROUTER_WAN4.parse().unwrap()],
    )
    .unwrap();
    Ruleset::new(config, forwards)
}

/// fw4's shape for a redirect: `iifname "wan" meta nfproto ipv4 tcp dport P counter dnat`.
fn rules_script(n: usize) -> String {
    let mut script = String::from(
        "table inet perrule {\n  chain dstnat {\n    type nat hook prerouting priority dstnat; policy accept;\n",
    );
    let rule = |port: u16, target: &str, to: u16| {
        format!(
            "    iifname \"wan\" meta nfproto ipv4 tcp dport {port} counter dnat ip to {target}:{to}\n"
        )
    };
    for i in 0..n - 1 {
        script.push_str(&rule(10_000 + i as u16, &other_target(i), 8000));
    }
    script.push_str(&rule(MEASURED_PORT, common::SERVER4, SERVER_PORT));
    script.push_str("  }\n}\n");
    script
}

fn configure(router: &Netns, variant: Variant, dir: &TempDir) {
    router.nft(&["flush", "ruleset"]);
    match variant {
        Variant::Map(n) | Variant::Hash(n) => {
            let backends = if matches!(variant, Variant::Hash(_)) {
                3
            } else {
                1
            };
            let desired = map_ruleset(n, backends);
            router.enter(move || {
                Engine::new(Kernel::new(NftCli::default()))
                    .apply(desired)
                    .unwrap();
            });
        }
        Variant::Rules(n) => {
            let file = dir.write("rules.nft", &rules_script(n));
            router.nft(&["-f", &file]);
        }
    }
}

/// The client's source addresses, used in turn: at 30,000 connections a second one address
/// runs through its ephemeral ports in a second, and a new SYN on the tuple of a flow whose
/// conntrack entry is still closing waits for a retransmission (a 1 s stall that made
/// single-address rounds swing between 1,000 and 30,000 a second).
const SOURCES: u8 = 32;

/// Opens and resets connections for `seconds`, from each source address in turn; returns
/// connections per second.
fn connection_rate(client: &Netns, seconds: f64) -> f64 {
    let target: SocketAddr = format!("{}:{MEASURED_PORT}", common::ROUTER_WAN4)
        .parse()
        .unwrap();
    client.enter(move || {
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let start = Instant::now();
        let mut count = 0u64;
        while Instant::now() < deadline {
            let source = common::wan_client((count % u64::from(SOURCES)) as u8);
            let stream = common::connect_from(source.parse().unwrap(), target)
                .expect("the connection reaches the server");
            // Reset rather than close, so no TIME_WAIT state piles up.
            let linger = nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger)
                .unwrap();
            drop(stream);
            count += 1;
        }
        count as f64 / start.elapsed().as_secs_f64()
    })
}

fn main() {
    let seconds: f64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(2.0);
    let topology = Topology::new();
    topology.add_wan_clients(SOURCES);
    topology.server.add_addresses(
        "eth0",
        SERVER_ADDRESSES[1..].iter().map(|a| format!("{a}/24")),
    );
    // A deep accept queue: with std's 128, a server thread descheduled for a moment (client,
    // router and server share the cores) drops handshakes, and each drop costs the client
    // a 1 s retransmission.
    let listener: TcpListener = topology.server.enter(|| {
        use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn};
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::setsockopt(&fd, socket::sockopt::ReuseAddr, &true).unwrap();
        let any = SockaddrIn::new(0, 0, 0, 0, SERVER_PORT);
        socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &any).unwrap();
        socket::listen(&fd, Backlog::new(4096).unwrap()).unwrap();
        TcpListener::from(fd)
    });
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let dir = TempDir::new();
    let variants = [
        Variant::Map(1),
        Variant::Map(10_000),
        Variant::Rules(1),
        Variant::Rules(10_000),
        Variant::Hash(1),
        Variant::Hash(10_000),
    ];
    let rounds = 9;
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (index, variant) in variants.iter().enumerate() {
            configure(&topology.router, *variant, &dir);
            // A short warm-up, not counted.
            connection_rate(&topology.client, 0.3);
            results[index].push(connection_rate(&topology.client, seconds));
        }
    }
    let counters = |ns: &Netns| {
        ns.exec(
            "nstat",
            &[
                "-az",
                "TcpExtListenOverflows",
                "TcpRetransSegs",
                "TcpExtTCPSynRetrans",
            ],
        )
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join("="))
        .collect::<Vec<_>>()
        .join(" ")
    };
    println!(
        "client: {}; server: {}",
        counters(&topology.client),
        counters(&topology.server)
    );
    println!("new TCP connections per second, {rounds} rounds of {seconds} s, median (min..max)");
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        (
            values[values.len() / 2],
            values[0],
            values[values.len() - 1],
        )
    };
    for (variant, rates) in variants.iter().zip(&results) {
        let (m, lo, hi) = median(rates.clone());
        println!("{:<36} {m:>9.0}  ({lo:.0}..{hi:.0})", variant.label());
    }
    // The machine's speed drifts between rounds; the ratio within a round, where the two
    // runs follow each other, is steadier than the ratio of medians.
    let ratio = |a: usize, b: usize| {
        median(
            results[b]
                .iter()
                .zip(&results[a])
                .map(|(x, y)| 100.0 * x / y)
                .collect(),
        )
        .0
    };
    println!(
        "median ratio within a round: map with 10,000 forwards {:.1}% of 1 forward; 10,000 rules {:.1}% of 1 rule",
        ratio(0, 1),
        ratio(2, 3)
    );
    println!(
        "median ratio within a round: 10,000 forwards of 3 backends {:.1}% of 1 forward of 1 backend; 1 forward of 3 backends {:.1}%",
        ratio(0, 5),
        ratio(0, 4)
    );
}
