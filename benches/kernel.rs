//! The kernel side of applying: one element change (a forward added, a forward removed)
//! with 10 and with 10,000 forwards present, by the engine's whole apply and by its apply of
//! the changed key (the cost must not grow with the table), reading 10,000 forwards back,
//! building 10,000 from nothing and restoring them after `nft flush ruleset`. Runs in a
//! network namespace it creates: needs root.
//! `cargo bench --bench kernel`; `-- apply` measures only the one change, `-- table` only
//! the reads, builds and restores of the whole table.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::Netns;
use common::recording::Recording;
use kube_port_forward::core::model::{Family, Forward, ForwardKey, Owner, Protocol};
use kube_port_forward::kernel::{DEFAULT_TABLE, Ruleset, TableConfig};
use kube_port_forward::kernel::{Engine, Firewall, Kernel, NftCli};

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
                backends: vec![
                    format!("10.{}.{}.{}", i / 62_500, (i / 250) % 250, i % 250 + 1)
                        .parse()
                        .unwrap(),
                ],
                port: 8080,
                down: Vec::new(),
                probe: None,
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

/// Median, minimum and 99th percentile, in milliseconds.
fn stats(mut times: Vec<Duration>) -> (f64, f64, f64) {
    times.sort();
    let p99 = ((times.len() * 99).div_ceil(100)).saturating_sub(1);
    (ms(times[times.len() / 2]), ms(times[0]), ms(times[p99]))
}

fn engine() -> Engine<Kernel> {
    Engine::new(Kernel::new(NftCli::default()))
}

/// Applies `ruleset(n)`, then times `rounds` removals and as many additions of one forward,
/// alternating, with the same engine: each is one netlink batch. The engine applies the
/// whole ruleset (the clone handed over is made untimed) or, with `delta`, the changed key
/// alone ([`Engine::apply_changed`]). Returns the whole applies (removals, additions), the
/// commits alone, and the conntrack clean-up a removal costs when the forward carried flows.
fn one_change(n: usize, rounds: usize, delta: bool) -> [(f64, f64, f64); 4] {
    let ns = Netns::new("bench");
    ns.enter(move || {
        let desired = ruleset(n);
        let mut engine = Engine::new(Recording::default());
        engine.apply(desired.clone()).unwrap();
        let key = *desired.forwards.keys().nth(n / 2).unwrap();
        let changed = BTreeSet::from([key]);
        let mut without = desired.clone();
        without.forwards.remove(&key);
        let (mut removes, mut adds) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            for (next, times) in [(&without, &mut removes), (&desired, &mut adds)] {
                let whole = (!delta).then(|| next.clone());
                let start = Instant::now();
                let applied = match whole {
                    Some(whole) => engine.apply(whole),
                    None => engine.apply_changed(&next.config, &next.forwards, &changed),
                }
                .unwrap();
                times.push(start.elapsed());
                assert!(applied.sent && applied.rebuilt.is_none());
                assert_eq!(applied.added.len() + applied.removed.len(), 1);
            }
        }
        let timed = engine.firewall();
        let commits = std::mem::take(&mut timed.commit_times);
        // The removed forward never carried a flow, so the engine did not look for its
        // conntrack entries: what that walk costs when a forward did, measured apart.
        assert!(timed.closings.iter().all(Vec::is_empty));
        let mut flows = Vec::new();
        for _ in 0..rounds {
            let start = Instant::now();
            timed
                .inner
                .close_flows(&[(key, None)], 0x0020_0000)
                .unwrap();
            flows.push(start.elapsed());
        }
        assert_eq!(commits.len(), 2 * rounds);
        [stats(removes), stats(adds), stats(commits), stats(flows)]
    })
}

/// Whether the measurements of `part` run: all of them, or those named on the command line.
fn runs(part: &str) -> bool {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .is_none_or(|wanted| wanted == part)
}

fn main() {
    println!("nft: {}", common::run("nft", &["--version"]).trim());
    if runs("apply") {
        one_changes();
    }
    if runs("table") {
        whole_table();
    }
}

fn one_changes() {
    for n in [10, 10_000] {
        let [remove, add, commit, flows] = one_change(n, 1000, false);
        let [delta_remove, delta_add, delta_commit, _] = one_change(n, 1000, true);
        for (what, runs, (m, lo, p99)) in [
            ("apply, one forward added:   ", 1000, add),
            ("apply, one forward removed: ", 1000, remove),
            ("  of which the batch commit:", 2000, commit),
            ("apply_changed, one forward added:  ", 1000, delta_add),
            ("apply_changed, one forward removed:", 1000, delta_remove),
            ("  of which the batch commit:       ", 2000, delta_commit),
            ("conntrack walk, if it carried flows:", 1000, flows),
        ] {
            println!(
                "{what} {n:>6} present: median {m:8.3} ms  min {lo:8.3} ms  p99 {p99:8.3} ms  ({runs} runs)"
            );
        }
    }
}

fn whole_table() {
    let ns = Netns::new("bench");
    let name = ns.name.clone();
    let (build, read, restore) = ns.enter(move || {
        let desired = ruleset(10_000);
        let (mut build, mut read, mut restore) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            common::run("ip", &["netns", "exec", &name, "nft", "flush", "ruleset"]);
            let mut engine = engine();
            let start = Instant::now();
            let applied = engine.apply(desired.clone()).unwrap();
            build.push(start.elapsed());
            assert_eq!(applied.added.len(), 10_000);
        }
        let mut engine = engine();
        let mut dumps = Vec::new();
        let sets = kube_port_forward::kernel::read::set_names();
        for _ in 0..20 {
            let start = Instant::now();
            let table = engine
                .read(&desired.config.table, Some(&desired.config))
                .unwrap()
                .unwrap();
            read.push(start.elapsed());
            assert_eq!(table.addrs.len(), 10_000);
            let start = Instant::now();
            let dump = engine.firewall().read(&desired.config.table, &sets).unwrap();
            dumps.push(start.elapsed());
            assert!(dump.is_some());
        }
        let (m, lo, hi) = stats(dumps);
        println!("of which the dumps alone (no decoding): median {m:8.1} ms  min {lo:8.1} ms  max {hi:8.1} ms  (20 runs)");
        engine.apply(desired.clone()).unwrap();
        for _ in 0..5 {
            common::run("ip", &["netns", "exec", &name, "nft", "flush", "ruleset"]);
            // What the daemon does when the monitor reports the flush: forget, apply.
            engine.forget();
            let start = Instant::now();
            let applied = engine.apply(desired.clone()).unwrap();
            restore.push(start.elapsed());
            assert!(applied.rebuilt.is_some());
        }
        (stats(build), stats(read), stats(restore))
    });
    for (what, runs, (m, lo, p99)) in [
        ("read 10,000 forwards (netlink dump):  ", 20, read),
        ("build 10,000 forwards from nothing:    ", 5, build),
        ("restore 10,000 after nft flush ruleset:", 5, restore),
    ] {
        println!("{what} median {m:8.1} ms  min {lo:8.1} ms  max {p99:8.1} ms  ({runs} runs)");
    }
}
