//! The daemon end to end against the test API server: how fast a new Service's port opens
//! and a deleted Service is let go (200 Services, with 10, 1,000 and 10,000 forwards present
//! among 10,000 Services, beside the API server's own time for the same requests), and how many `nft` runs that
//! takes; with 1,000 forwarded Services, new ports
//! while the first start's bookkeeping is written, how long that takes, and what a restart
//! with nothing changed writes; the memory and start-up time with 10,000 Services of which
//! 1,000 are annotated; and how fast it restores its table after a `nft flush ruleset` and
//! follows a new WAN address (both on kernel notifications, with resync an hour away).
//! Needs root. `cargo bench --bench daemon` (`BENCH=NAME` runs one part).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::apiserver::ApiServer;
use common::daemon::Daemon;
use common::scenario::{bookkeeping_idle, events_about, writes};
use common::{Netns, Server, TempDir, Topology, wait_for};
use serde_json::json;

fn service(name: &str, annotated: bool, port: u16) -> serde_json::Value {
    let mut metadata = json!({"name": name, "namespace": format!("ns-{}", port % 20)});
    if annotated {
        metadata["annotations"] =
            json!({"kube-port-forward-controller/mapping": format!("{port}:http")});
    }
    json!({"metadata": metadata, "spec": {"type": "LoadBalancer",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}})
}

/// Creates `name` (see [`service`]); returns its namespace.
fn create(api: &ApiServer, name: &str, annotated: bool, port: u16) -> String {
    let created = api.create(service(name, annotated, port));
    created["metadata"]["namespace"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Whether the Service holds a finalizer.
fn finalized(api: &ApiServer, port: u16, name: &str) -> bool {
    api.get(&format!("ns-{}", port % 20), name)
        .is_some_and(|s| !s["metadata"]["finalizers"].is_null())
}

fn percentiles(mut values: Vec<Duration>) -> String {
    values.sort();
    let at = |p: usize| values[(values.len() * p / 100).min(values.len() - 1)].as_secs_f64() * 1e3;
    format!(
        "p50 {:6.1} ms  p99 {:6.1} ms  max {:6.1} ms  (n={})",
        at(50),
        at(99),
        at(100),
        values.len()
    )
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Lines in the counting `nft` wrapper's file: how many times the daemon ran `nft`.
fn nft_runs(file: &std::path::Path) -> usize {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .count()
}

/// Services in the cluster for the latency figures: those not forwarded are unannotated.
const CLUSTER: u16 = 10_000;

/// With `present` forwards in place among 10,000 Services: 200 Services given a
/// LoadBalancer address (until the WAN port answers) and deleted (until the API server has
/// let them go), each beside the same request for a Service the daemon does not forward
/// (the API server's own round trip). Counts the `nft` runs meanwhile through a wrapper.
fn latency_with(present: u16) {
    let topology = Topology::new();
    let _server = Server::start(&topology.server, 8080);
    let api = ApiServer::new();
    for i in 0..CLUSTER - present {
        create(&api, &format!("other-{i}"), false, 40_000 + i);
    }
    for i in 0..present {
        let name = format!("old-{i}");
        let ns = create(&api, &name, true, 30_000 + i);
        api.set_lb_ips(&ns, &name, &[common::SERVER4]);
    }
    let addr = api.listen(Some(&topology.router));
    let dir = TempDir::new();
    let (wrapper, runs) = common::scenario::nft_counting(&dir);
    let mut daemon = Daemon::spawn(
        &topology.router,
        &dir,
        addr,
        "bench",
        &["--nft", &wrapper, "--health", "127.0.0.1:9477"],
    );
    daemon.wait_log("ready");
    // The first start's bookkeeping (a finalizer, a condition and events per forwarded
    // Service) is written before the figures are taken.
    let start = Instant::now();
    while !((0..present).all(|i| finalized(&api, 30_000 + i, &format!("old-{i}")))
        && bookkeeping_idle(&topology.router, 9477))
    {
        assert!(
            start.elapsed() < Duration::from_secs(900),
            "the first start's bookkeeping was not done in 15 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let runs_before = nft_runs(&runs);
    let opened = open_new(&api, &topology, 20_000, 200);
    let plain_address: Vec<Duration> = (0..200u16)
        .map(|i| {
            let name = format!("plain-{i}");
            let ns = create(&api, &name, false, 21_000 + i);
            let start = Instant::now();
            api.set_lb_ips(&ns, &name, &[common::SERVER4]);
            start.elapsed()
        })
        .collect();
    wait_for("200 finalizers", || {
        (20_000..20_200u16).all(|port| finalized(&api, port, &format!("new-{port}")))
    });
    let deleted = |prefix: &str, first: u16| -> Vec<Duration> {
        (0..200u16)
            .map(|i| {
                let port = first + i;
                let ns = format!("ns-{}", port % 20);
                let name = if prefix == "new" {
                    format!("new-{port}")
                } else {
                    format!("{prefix}-{i}")
                };
                let start = Instant::now();
                api.delete(&ns, &name);
                while api.get(&ns, &name).is_some() {
                    std::thread::sleep(Duration::from_micros(200));
                }
                start.elapsed()
            })
            .collect()
    };
    let released = deleted("new", 20_000);
    let plain_deleted = deleted("plain", 21_000);
    let runs_during = nft_runs(&runs) - runs_before;
    daemon.kill();
    println!("with {present} forwards present, {CLUSTER} Services in all:");
    println!(
        "  LoadBalancer address set -> port open on the WAN:       {}",
        percentiles(opened)
    );
    println!(
        "  the same request, a Service not forwarded (API only):  {}",
        percentiles(plain_address)
    );
    println!(
        "  deletion requested -> finalizer released, Service gone: {}",
        percentiles(released)
    );
    println!(
        "  the same deletion, a Service without the finalizer:    {}",
        percentiles(plain_deleted)
    );
    println!("  nft runs during these 600 changes after start: {runs_during}");
}

fn latency() {
    for present in [10, 1_000, 10_000] {
        latency_with(present);
    }
}

fn scale() {
    let router = Netns::new("bench");
    let api = ApiServer::new();
    for i in 0..10_000u16 {
        let annotated = i % 10 == 0;
        let name = format!("svc-{i}");
        let ns = create(&api, &name, annotated, 10_000 + i);
        if annotated {
            let ip = format!("10.{}.{}.{}", i / 62_500, (i / 250) % 250, i % 250 + 1);
            api.set_lb_ips(&ns, &name, &[&ip]);
        }
    }
    let addr = api.listen(Some(&router));
    let dir = TempDir::new();
    let begin = Instant::now();
    let mut daemon = Daemon::spawn(&router, &dir, addr, "bench", &[]);
    daemon.wait_log("ready");
    let ready = begin.elapsed();
    let rss_ready = status_field(daemon.pid(), "VmRSS");
    let settle = Instant::now();
    wait_for("1,000 finalizers", || {
        (0..10_000u16)
            .step_by(10)
            .all(|i| finalized(&api, 10_000 + i, &format!("svc-{i}")))
    });
    let settled = settle.elapsed();
    let pid = daemon.pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert!(comm.starts_with("kube-port-forw"), "measuring {comm}");
    println!(
        "10,000 Services (1,000 annotated): start -> ready {:.2} s; then 1,000 finalizers and conditions written in {:.2} s",
        ready.as_secs_f64(),
        settled.as_secs_f64()
    );
    println!(
        "daemon memory: VmRSS at ready {rss_ready}, after settling {}, peak (VmHWM) {}",
        status_field(pid, "VmRSS"),
        status_field(pid, "VmHWM")
    );
    daemon.kill();
}

/// Waits, polling every 200 µs, until `done`; returns how long it took.
fn time_until(start: Instant, mut done: impl FnMut() -> bool) -> Duration {
    let deadline = start + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "not within 30 s");
        std::thread::sleep(Duration::from_micros(200));
    }
    start.elapsed()
}

fn router() {
    let topology = Topology::new();
    let _server = Server::start(&topology.server, 8080);
    let api = ApiServer::new();
    let addr = api.listen(Some(&topology.router));
    let dir = TempDir::new();
    let args = ["--wan-interface", "wan", "--resync", "3600"];
    let mut daemon = Daemon::spawn_with(&topology.router, &dir, addr, "bench", &args, &[]);
    daemon.wait_log("ready");
    for i in 0..100u16 {
        let name = format!("svc-{i}");
        let ns = create(&api, &name, true, 20_000 + i);
        api.set_lb_ips(&ns, &name, &[common::SERVER4]);
    }
    let target: SocketAddr = format!("{}:20099", common::ROUTER_WAN4).parse().unwrap();
    let connects = |to: SocketAddr| {
        topology
            .client
            .enter(move || TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok())
    };
    wait_for("the forwards", || connects(target));
    let mut restored = Vec::new();
    for _ in 0..30 {
        let start = Instant::now();
        topology.router.nft(&["flush", "ruleset"]);
        restored.push(time_until(start, || connects(target)));
    }
    topology.router.exec(
        "sysctl",
        &["-qw", "net.ipv4.conf.wan.promote_secondaries=1"],
    );
    let mut followed = Vec::new();
    for i in 0..30u8 {
        let address = format!("203.0.113.{}", 100 + i);
        let to: SocketAddr = format!("{address}:20099").parse().unwrap();
        let start = Instant::now();
        topology
            .router
            .ip(&["addr", "add", &format!("{address}/24"), "dev", "wan"]);
        followed.push(time_until(start, || connects(to)));
    }
    daemon.kill();
    println!(
        "nft flush ruleset -> forwards work again (100 forwards): {}",
        percentiles(restored)
    );
    println!(
        "WAN address added -> forward works on it:               {}",
        percentiles(followed)
    );
}

/// Address set -> the WAN port reaches the server, for `count` new Services.
fn open_new(api: &ApiServer, topology: &Topology, first: u16, count: u16) -> Vec<Duration> {
    (first..first + count)
        .map(|port| {
            let name = format!("new-{port}");
            let ns = create(api, &name, true, port);
            let target: SocketAddr = format!("{}:{port}", common::ROUTER_WAN4).parse().unwrap();
            let start = Instant::now();
            api.set_lb_ips(&ns, &name, &[common::SERVER4]);
            topology.client.enter(move || {
                while TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_err() {
                    std::thread::sleep(Duration::from_micros(200));
                }
                start.elapsed()
            })
        })
        .collect()
}

/// Writes about the Services named `svc-*`: patches to them, and events about them (an
/// event's path names its namespace only; repeats count in its series).
fn writes_about_old(api: &ApiServer) -> u64 {
    let patches = writes(api)
        .iter()
        .filter(|r| r.contains("/services/svc-"))
        .count() as u64;
    patches + events_about(api, "svc-")
}

/// 1,000 forwarded Services: new Services' ports while the first start's bookkeeping (1,000
/// finalizers, conditions, events) is written, how long that takes; then a restart with
/// nothing changed: the writes it makes and new Services' ports.
fn restart() {
    let topology = Topology::new();
    let _server = Server::start(&topology.server, 8080);
    let api = ApiServer::new();
    for i in 0..1_000u16 {
        let name = format!("svc-{i}");
        let ns = create(&api, &name, true, 30_000 + i);
        api.set_lb_ips(&ns, &name, &[common::SERVER4]);
    }
    let addr = api.listen(Some(&topology.router));
    let dir = TempDir::new();
    let verbose = if std::env::var_os("BENCH_LOG").is_some() {
        "-v"
    } else {
        "--resync=300"
    };
    let args = ["--health", "127.0.0.1:9477", verbose];
    let mut daemon = Daemon::spawn(&topology.router, &dir, addr, "bench", &args);
    daemon.wait_log("ready");
    let ready = Instant::now();
    let during = open_new(&api, &topology, 40_000, 50);
    wait_for("the bookkeeping", || {
        bookkeeping_idle(&topology.router, 9477)
    });
    let caught_up = ready.elapsed();
    let first_writes = writes(&api).len();
    let old_before = writes_about_old(&api);
    daemon.kill();

    let mut daemon = Daemon::spawn(&topology.router, &dir, addr, "bench", &args);
    daemon.wait_log("ready");
    let after_restart = open_new(&api, &topology, 41_000, 50);
    wait_for("the bookkeeping", || {
        bookkeeping_idle(&topology.router, 9477)
    });
    let restart_writes = writes_about_old(&api) - old_before;
    if std::env::var_os("BENCH_LOG").is_some() {
        eprintln!("first start: {during:?}\nrestart: {after_restart:?}");
        std::fs::write("/tmp/bench-restart.log", daemon.log()).unwrap();
    }
    daemon.kill();
    println!(
        "first start, 1,000 forwarded Services: new Service -> port live while the bookkeeping is written: {}",
        percentiles(during)
    );
    println!(
        "first start: ready -> bookkeeping written (1,050 finalizers, conditions, events): {:.2} s, {first_writes} writes",
        caught_up.as_secs_f64()
    );
    println!(
        "restart, nothing changed: new Service -> port live: {}",
        percentiles(after_restart)
    );
    println!("restart, nothing changed: API writes for the 1,000 Services: {restart_writes}");
}

fn main() {
    // `BENCH=restart cargo bench --bench daemon` runs one part.
    let only = std::env::var("BENCH").ok();
    let parts: [(&str, fn()); 4] = [
        ("latency", latency),
        ("restart", restart),
        ("scale", scale),
        ("router", router),
    ];
    for (name, part) in parts {
        if only.as_deref().is_none_or(|o| o == name) {
            part();
        }
    }
}
