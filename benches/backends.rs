//! Forwards with several backends, with the real daemon against the test API server and
//! the default health checks (every 2 s, 1 s timeout, down after 2 failures):
//! - failover: a backend's server is stopped; the time until the first new connection
//!   from a client hashed to it succeeds (20 runs, each backend in turn);
//! - the CPU the daemon spends checking 1,000 backends (250 Services of 4), against the
//!   same Services with their checks turned off, over 60 s each.
//!
//! Needs root. `cargo bench --bench backends` (`BENCH=failover` or `BENCH=cpu` runs one).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::apiserver::ApiServer;
use common::daemon::Daemon;
use common::{Backend, TempDir, Topology, tcp_greeting_from, wait_for, wan_client};
use serde_json::json;

const BACKENDS: [&str; 3] = ["192.168.50.11", "192.168.50.12", "192.168.50.13"];
const SOURCES: u8 = 24;

fn wan() -> SocketAddr {
    format!("{}:80", common::ROUTER_WAN4).parse().unwrap()
}

fn percentiles(mut values: Vec<Duration>) -> String {
    values.sort();
    let at = |p: usize| values[(values.len() * p / 100).min(values.len() - 1)].as_secs_f64();
    format!(
        "p50 {:.2} s  p99 {:.2} s  max {:.2} s  min {:.2} s  (n={})",
        at(50),
        at(99),
        at(100),
        values[0].as_secs_f64(),
        values.len()
    )
}

fn failover() {
    let topology = Topology::new();
    topology
        .server
        .add_addresses("eth0", BACKENDS.map(|b| format!("{b}/24")));
    topology.add_wan_clients(SOURCES);
    let start = |addr: &str| Backend::start(&topology.server, addr, 8080, None);
    let mut backends: Vec<Option<Backend>> = BACKENDS.iter().map(|a| Some(start(a))).collect();
    let api = ApiServer::new();
    let addr = api.listen(Some(&topology.router));
    let dir = TempDir::new();
    api.create(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "apps",
            "annotations": {"kube-port-forward-controller/mapping": "80:http"}},
        "spec": {"type": "LoadBalancer",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}}));
    api.set_lb_ips("apps", "web", &BACKENDS);
    let daemon = Daemon::spawn(&topology.router, &dir, addr, "bench", &[]);
    daemon.wait_log("ready");
    let greets = |i: u8| {
        tcp_greeting_from(&topology.client, &wan_client(i), wan())
            .ok()
            .map(|g| g.trim_start_matches("hello ").to_owned())
    };
    wait_for("every backend to take clients", || {
        let seen: std::collections::BTreeSet<String> = (0..SOURCES).filter_map(greets).collect();
        seen.len() == BACKENDS.len()
    });
    // A client of each backend, while all are up.
    let clients: Vec<u8> = BACKENDS
        .iter()
        .map(|b| {
            (0..SOURCES)
                .find(|i| greets(*i).as_deref() == Some(*b))
                .unwrap()
        })
        .collect();
    let mut times = Vec::new();
    for run in 0..20 {
        let k = run % BACKENDS.len();
        let client = clients[k];
        // Up, and its client back on it (its checks rose again after the last run).
        wait_for("the backend to serve its client again", || {
            greets(client).as_deref() == Some(BACKENDS[k])
        });
        let killed = Instant::now();
        backends[k] = None;
        loop {
            if greets(client).is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        times.push(killed.elapsed());
        backends[k] = Some(start(BACKENDS[k]));
    }
    println!(
        "failover, defaults (2 s interval, 1 s timeout, down after 2): backend stopped -> first new connection from its client served: {}",
        percentiles(times)
    );
}

/// The daemon's CPU time (user, system), from /proc.
fn cpu(pid: u32) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // SAFETY: sysconf reads a constant of the C library; no memory is handed over.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) } as u64;
    let time =
        |field: usize| Duration::from_millis(fields[field].parse::<u64>().unwrap() * 1000 / hz);
    (time(11), time(12))
}

fn checks_cpu() {
    const SERVICES: u16 = 250;
    const WINDOW: Duration = Duration::from_secs(60);
    let topology = Topology::new();
    // Every address of 192.168.60.0/22 is the server's (a local route), all served by one
    // listener; the router reaches them through the server.
    topology
        .server
        .ip(&["route", "add", "local", "192.168.60.0/22", "dev", "lo"]);
    topology
        .router
        .ip(&["route", "add", "192.168.60.0/22", "via", common::SERVER4]);
    let _listener = common::Server::start(&topology.server, 8080);
    // On this rig the backends' TCP stack answers inside the daemon's own `connect()`: a
    // veth delivers the SYN to the server namespace inline, on the sending core. Steered,
    // the two veths' receive runs on the other core (RPS) and the daemon is pinned to the
    // first, so its account holds its own work, as on a router whose backends are other
    // machines and whose NIC's receive is not the daemon's.
    let steer = |on: bool| {
        let mask = if on { "2" } else { "0" };
        for (ns, dev) in [(&topology.router, "lan"), (&topology.server, "eth0")] {
            let file = format!("/sys/class/net/{dev}/queues/rx-0/rps_cpus");
            ns.exec("sh", &["-c", &format!("echo {mask} > {file}")]);
        }
    };
    for (checked, steered) in [(true, false), (true, true), (false, false)] {
        steer(steered);
        let api = ApiServer::new();
        let addr = api.listen(Some(&topology.router));
        let dir = TempDir::new();
        for s in 0..SERVICES {
            let mut annotations =
                json!({"kube-port-forward-controller/mapping": format!("{}:http", 10_000 + s)});
            if !checked {
                annotations["kube-port-forward-controller/health-check"] = json!("off");
            }
            api.create(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": format!("svc-{s}"), "namespace": "apps", "annotations": annotations},
                "spec": {"type": "LoadBalancer",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}}));
            let ips: Vec<String> = (0..4)
                .map(|k| {
                    let n = u32::from(s) * 4 + k;
                    format!("192.168.{}.{}", 60 + n / 256, n % 256)
                })
                .collect();
            let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
            api.set_lb_ips("apps", &format!("svc-{s}"), &ips);
        }
        let mut daemon = Daemon::spawn(
            &topology.router,
            &dir,
            addr,
            "bench",
            &["--health", "127.0.0.1:9478"],
        );
        daemon.wait_log("ready");
        if steered {
            common::run("taskset", &["-a", "-p", "1", &daemon.pid().to_string()]);
        }
        // Past the first interval: every check has started.
        std::thread::sleep(Duration::from_secs(5));
        let before = cpu(daemon.pid());
        let started = Instant::now();
        std::thread::sleep(WINDOW);
        let after = cpu(daemon.pid());
        let (user, system) = (after.0 - before.0, after.1 - before.1);
        let elapsed = started.elapsed().as_secs_f64();
        let share = 100.0 * (user + system).as_secs_f64() / elapsed;
        let user_share = 100.0 * user.as_secs_f64() / elapsed;
        let metrics = topology.router.enter(|| {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect("127.0.0.1:9478").unwrap();
            stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).unwrap();
            text
        });
        let up = metrics
            .lines()
            .filter(|l| l.starts_with("kube_port_forward_backend_up{") && l.ends_with(" 1"))
            .count();
        println!(
            "{} backends, checks {}{}: daemon CPU {:.2}% of one core ({:.2}% user) over {} s ({} backends up in /metrics)",
            SERVICES * 4,
            if checked { "on (defaults)" } else { "off" },
            if steered {
                ", receive steered to the other core"
            } else {
                ""
            },
            share,
            user_share,
            WINDOW.as_secs(),
            up
        );
        daemon.kill();
    }
}

fn main() {
    let only = std::env::var("BENCH").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if wanted("failover") {
        failover();
    }
    if wanted("cpu") {
        checks_cpu();
    }
}
