//! The kernel side of applying: 10,000 forwards from an empty table, then one change with
//! 10,000 present against one change with 10 present (the cost must not grow with the
//! table). Runs `nft` in a network namespace it creates: needs root.
//! `cargo bench --bench kernel`

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::Netns;
use kube_port_forward::core::model::{Family, Forward, ForwardKey, Owner, Protocol, Target};
use kube_port_forward::kernel::{DEFAULT_TABLE, Ruleset, TableConfig};
use kube_port_forward::kernel::{Engine, NftCli};

fn ruleset(n: usize) -> Ruleset {
    let forwards: BTreeMap<ForwardKey, Forward> = (0..n)
        .map(|i| {
            let key = ForwardKey {
                family: Family::Ipv4,
                protocol: if i % 2 == 0 {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                },
                external_port: 10_000 + (i / 2) as u16,
            };
            let forward = Forward {
                key,
                target: Target {
                    addr: format!("10.{}.{}.{}", i / 62_500, (i / 250) % 250, i % 250 + 1)
                        .parse()
                        .unwrap(),
                    port: 8080,
                },
                owner: Owner {
                    namespace: format!("ns-{}", i % 50),
                    name: format!("svc-{}", i / 2),
                    uid: Some(format!("00000000-0000-4000-8000-{i:012}")),
                    service_port: if i % 2 == 0 { "http" } else { "dns" }.into(),
                },
                sources: Vec::new(),
            };
            (key, forward)
        })
        .collect();
    let config = TableConfig::new(
        DEFAULT_TABLE,
        ["wan".to_owned()],
        ["203.0.113.1".parse().unwrap()],
    )
    .unwrap();
    Ruleset::new(config, forwards)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut times: Vec<Duration>) -> (f64, f64, f64) {
    times.sort();
    (
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() * 9 / 10]),
    )
}

/// Applies `ruleset(n)`, then times `rounds` single-forward changes with the same engine.
fn one_change(n: usize, rounds: usize) -> (f64, f64, f64) {
    let ns = Netns::new("bench");
    ns.enter(move || {
        let mut desired = ruleset(n);
        let mut engine = Engine::new(NftCli::default());
        engine.apply(desired.clone()).unwrap();
        let key = *desired.forwards.keys().nth(n / 2).unwrap();
        let mut times = Vec::new();
        for round in 0..rounds {
            let forward = desired.forwards.get_mut(&key).unwrap();
            forward.target.port = 9000 + (round % 2) as u16;
            let next = desired.clone();
            let start = Instant::now();
            let applied = engine.apply(next).unwrap();
            times.push(start.elapsed());
            assert!(applied.sent && applied.rebuilt.is_none() && applied.added.len() == 1);
        }
        median(times)
    })
}

fn main() {
    println!("nft: {}", common::run("nft", &["--version"]).trim());
    let mut full = Vec::new();
    let mut reads = Vec::new();
    for _ in 0..5 {
        let ns = Netns::new("bench");
        let (apply, read) = ns.enter(|| {
            let desired = ruleset(10_000);
            let mut engine = Engine::new(NftCli::default());
            let next = desired.clone();
            let start = Instant::now();
            let applied = engine.apply(next).unwrap();
            let apply = start.elapsed();
            assert_eq!(applied.added.len(), 10_000);
            let mut fresh = Engine::new(NftCli::default());
            let start = Instant::now();
            assert!(!fresh.apply(desired).unwrap().sent);
            (apply, start.elapsed())
        });
        full.push(apply);
        reads.push(read);
    }
    let (m, lo, _) = median(full);
    println!(
        "apply 10,000 forwards to an empty table:           median {m:8.1} ms  min {lo:8.1} ms  (5 runs)"
    );
    let (m, lo, _) = median(reads);
    println!(
        "re-apply unchanged, reading the table in full:     median {m:8.1} ms  min {lo:8.1} ms  (5 runs)"
    );
    for n in [10, 10_000] {
        let (m, lo, p90) = one_change(n, 41);
        println!(
            "one changed forward with {n:>6} present:          median {m:8.1} ms  min {lo:8.1} ms  p90 {p90:8.1} ms  (41 runs)"
        );
    }
}
