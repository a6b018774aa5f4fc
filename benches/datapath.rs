//! New TCP connections per second through the router to the most recently added forward:
//! the daemon's map lookup with 1 and with 10,000 forwards, against one nft rule per
//! forward (how OpenWrt's fw4 redirects and miniupnpd do it) with 1 and 10,000 rules.
//! Client, router and server are network namespaces on this machine: needs root.
//! `cargo bench --bench datapath [-- SECONDS]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
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
    Rules(usize),
}

impl Variant {
    fn label(self) -> String {
        match self {
            Variant::Map(n) => format!("map lookup, {n:>5} forwards"),
            Variant::Rules(n) => format!("one rule per forward, {n:>5} rules"),
        }
    }
}

/// The other forwards: external ports 10000 and up, to other LAN addresses.
fn other_target(i: usize) -> String {
    format!("192.168.50.{}", 100 + i % 100)
}

fn map_ruleset(n: usize) -> Ruleset {
    let mut forwards = BTreeMap::new();
    let mut add = |port: u16, addr: String, port_to: u16, name: String| {
        let key = ForwardKey {
            family: Family::Ipv4,
            protocol: Protocol::Tcp,
            external_port: port,
        };
        let forward = Forward {
            key,
            backends: vec![addr.parse().unwrap()],
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
        Variant::Map(n) => {
            let desired = map_ruleset(n);
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

/// Opens and resets connections for `seconds`; returns connections per second.
fn connection_rate(client: &Netns, seconds: f64) -> f64 {
    let target: SocketAddr = format!("{}:{MEASURED_PORT}", common::ROUTER_WAN4)
        .parse()
        .unwrap();
    client.enter(move || {
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let start = Instant::now();
        let mut count = 0u64;
        while Instant::now() < deadline {
            let stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
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
    let listener: TcpListener = topology
        .server
        .enter(|| TcpListener::bind(("0.0.0.0", SERVER_PORT)).unwrap());
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
}
