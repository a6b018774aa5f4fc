//! Beyond the WAN: how fast external-dns targets follow a new WAN address (1 and 1,000
//! forwarded Services), and, behind a real IGD (miniupnpd in a namespace), how long a new
//! Service takes to be reachable from the internet through both NATs, a deleted one to be
//! let go (its mapping deleted first), 200 forwards to be mapped, and the forwards to be
//! reachable again after the box reboots (default poll). Needs root and miniupnpd.
//! `cargo bench --bench beyond` (`BENCH=dns` or `BENCH=upstream` runs one part).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::apiserver::ApiServer;
use common::daemon::Daemon;
use common::upnp::*;
use common::*;
use serde_json::{Value, json};

const ALPHA: &str = "external-dns.alpha.kubernetes.io/target";

fn percentiles(mut values: Vec<Duration>) -> String {
    values.sort();
    let at = |p: usize| values[(values.len() * p / 100).min(values.len() - 1)].as_secs_f64() * 1e3;
    format!(
        "p50 {:7.1} ms  p99 {:7.1} ms  max {:7.1} ms  (n={})",
        at(50),
        at(99),
        at(100),
        values.len()
    )
}

fn time_until(start: Instant, mut done: impl FnMut() -> bool) -> Duration {
    let deadline = start + Duration::from_secs(300);
    while !done() {
        assert!(Instant::now() < deadline, "gave up after 300 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    start.elapsed()
}

fn service(name: &str, port: u16, udp: bool) -> Value {
    let mut ports = vec![json!({"name": "http", "port": port, "protocol": "TCP"})];
    let mut mapping = "http".to_owned();
    if udp {
        ports.push(json!({"name": "echo", "port": port, "protocol": "UDP"}));
        mapping.push_str(", echo");
    }
    json!({"metadata": {"name": name, "namespace": "apps",
            "annotations": {"kube-port-forward-controller/mapping": mapping}},
        "spec": {"type": "LoadBalancer", "ports": ports}})
}

fn create(api: &ApiServer, name: &str, port: u16, udp: bool) {
    api.create(service(name, port, udp));
    api.set_lb_ips("apps", name, &[SERVER4]);
}

fn target(api: &ApiServer, name: &str) -> Option<String> {
    api.get("apps", name)?["metadata"]["annotations"][ALPHA]
        .as_str()
        .map(str::to_owned)
}

/// `count` forwarded Services; the WAN address swapped `rounds` times between two: how
/// long until the first Service's target and every Service's target follow.
fn dns_with(count: u16, rounds: usize) {
    let topology = Topology::new();
    let api = ApiServer::new();
    let addr = api.listen(Some(&topology.router));
    let dir = TempDir::new();
    let _daemon =
        Daemon::on_wan_interface(&topology.router, &dir, addr, "bench", &["--dns-targets"]);
    for i in 0..count {
        create(&api, &format!("s{i}"), 10_000 + i, false);
    }
    let names: Vec<String> = (0..count).map(|i| format!("s{i}")).collect();
    let all_are = |value: &str| {
        names
            .iter()
            .all(|n| target(&api, n).as_deref() == Some(value))
    };
    time_until(Instant::now(), || all_are(ROUTER_WAN4));
    let (mut first, mut every) = (Vec::new(), Vec::new());
    let mut current = ROUTER_WAN4.to_owned();
    for round in 0..rounds {
        let next = if round % 2 == 0 {
            "203.0.113.9"
        } else {
            ROUTER_WAN4
        };
        // Removed, then the new one added (as a DHCP lease change does): removing the
        // primary address would take a secondary with it.
        let start = Instant::now();
        topology
            .router
            .ip(&["addr", "del", &format!("{current}/24"), "dev", "wan"]);
        topology.router.add_addresses("wan", [format!("{next}/24")]);
        first.push(time_until(start, || {
            target(&api, &names[0]).as_deref() == Some(next)
        }));
        every.push(time_until(start, || all_are(next)));
        current = next.to_owned();
    }
    println!(
        "dns targets, {count:5} Services: first   {}",
        percentiles(first)
    );
    println!(
        "dns targets, {count:5} Services: every   {}",
        percentiles(every)
    );
}

fn dns() {
    dns_with(1, 20);
    dns_with(1000, 5);
}

fn upstream() {
    let mut rig = rig(&[8080]);
    // miniupnpd's debug log would be the limit with hundreds of mappings.
    rig.nat.stop_igd(false);
    rig.nat.start_igd_quiet();
    let state = rig.dir.path.join("upstream.json").display().to_string();
    let daemon = Daemon::on_wan_interface(
        &rig.nat.router,
        &rig.dir,
        rig.addr,
        "bench",
        &["--upstream", "upnp", "--state-file", &state],
    );
    daemon.wait_log("IGD found");
    let reachable = |rig: &Rig| {
        tcp_greeting(&rig.nat.internet, rig.nat.box_port(8080)).is_ok_and(|g| g == "hello 8080")
    };
    let (mut open, mut gone) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let start = Instant::now();
        create(&rig.api, "web", 8080, true);
        open.push(time_until(start, || reachable(&rig)));
        // The finalizer comes after the forward is live: a Service deleted before it has
        // nothing holding it (not measured).
        time_until(Instant::now(), || {
            rig.api
                .get("apps", "web")
                .is_some_and(|s| !s["metadata"]["finalizers"].is_null())
        });
        let start = Instant::now();
        rig.api.delete("apps", "web");
        gone.push(time_until(start, || rig.api.get("apps", "web").is_none()));
        assert!(!rig.nat.maps("TCP", 8080, ROUTER_WAN));
    }
    println!(
        "new Service reachable through both NATs:      {}",
        percentiles(open)
    );
    println!(
        "deleted Service let go (mappings deleted):     {}",
        percentiles(gone)
    );

    // 200 Services of TCP and UDP: 400 mappings.
    let start = Instant::now();
    for i in 0..200 {
        create(&rig.api, &format!("m{i}"), 20_000 + i, true);
    }
    let mapped = |want: usize| {
        std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|s| {
                Some(
                    s["mappings"]
                        .as_array()?
                        .iter()
                        .filter(|m| m["state"] == "mapped")
                        .count(),
                )
            })
            == Some(want)
    };
    let took = time_until(start, || mapped(400));
    println!(
        "400 mappings (200 Services) made:              {:7.1} ms ({:.0} mappings/s)",
        took.as_secs_f64() * 1e3,
        400.0 / took.as_secs_f64()
    );
    for i in 0..200 {
        rig.api.delete("apps", &format!("m{i}"));
    }
    time_until(Instant::now(), || rig.api.services().is_empty());

    // The box reboots: how long until the internet reaches the Service again, at the
    // default poll (5 s).
    create(&rig.api, "web", 8080, true);
    time_until(Instant::now(), || reachable(&rig));
    let mut back = Vec::new();
    for i in 0..10 {
        // A box up for a few seconds, as a real one is before it reboots; the wait varies
        // so the restarts do not all fall at one phase of the daemon's polls.
        std::thread::sleep(Duration::from_millis(3000 + i * 537 % 3000));
        rig.nat.stop_igd(true);
        let start = Instant::now();
        rig.nat.start_igd_quiet();
        back.push(time_until(start, || reachable(&rig)));
    }
    println!(
        "reachable again after the box restarted:      {}",
        percentiles(back)
    );
}

fn main() {
    let only = std::env::var("BENCH").ok();
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if run("dns") {
        dns();
    }
    if run("upstream") {
        upstream();
    }
}
