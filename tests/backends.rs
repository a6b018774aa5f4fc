//! Forwards with several backends, end to end: the daemon runs in the router namespace
//! against the test API server, three backends listen on three LAN addresses of the server
//! namespace, and clients from many WAN source addresses connect through the router. The
//! health checks run for real (short intervals; every wait is for a condition). Needs root.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use common::apiserver::ApiServer;
use common::scenario::*;
use common::*;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kube-port-forward");
const BACKENDS4: [&str; 3] = ["192.168.50.11", "192.168.50.12", "192.168.50.13"];
const BACKENDS6: [&str; 3] = ["fd00:50::11", "fd00:50::12", "fd00:50::13"];
const HEALTH_PORT: u16 = 10256;
/// WAN clients ([`wan_client`]).
const SOURCES: u8 = 24;

/// `apps/web`: TCP 8080 as external 80, UDP 8080 as external 5353, kube-proxy's health
/// check on `HEALTH_PORT`, every backend address (and a public one the policy refuses).
fn create_web(api: &ApiServer) {
    let metadata = json!({"name": "web", "namespace": "apps",
        "annotations": {"kube-port-forward-controller/mapping": "80:http, 5353:echo"}});
    api.create(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": metadata,
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": HEALTH_PORT,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "echo", "port": 8080, "protocol": "UDP"}]}}),
    );
    let mut ips: Vec<&str> = BACKENDS4.to_vec();
    ips.insert(1, "198.51.100.7");
    ips.extend(BACKENDS6);
    api.set_lb_ips("apps", "web", &ips);
}

fn status(topology: &Topology) -> Value {
    serde_json::from_str(&topology.router.exec(BIN, &["status", "--output", "json"])).unwrap()
}

/// The health of each backend of the forward on `port`/`protocol` (IPv4), from `status`.
fn health(topology: &Topology, port: u16, protocol: &str) -> BTreeMap<String, String> {
    let status = status(topology);
    let forward = status["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["external_port"] == port && f["protocol"] == protocol && f["family"] == "ipv4")
        .cloned()
        .unwrap_or_default();
    forward["backends"]
        .as_array()
        .map(|backends| {
            backends
                .iter()
                .map(|b| {
                    (
                        b["target"]["addr"].as_str().unwrap_or_default().to_owned(),
                        b["health"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Which backend each WAN source reaches on port 80, for the sources that get an answer.
fn greetings(topology: &Topology) -> BTreeMap<u8, String> {
    (0..SOURCES)
        .filter_map(|i| {
            tcp_greeting_from(&topology.client, &wan_client(i), wan(80))
                .ok()
                .map(|g| (i, g.trim_start_matches("hello ").to_owned()))
        })
        .collect()
}

fn udp_target() -> SocketAddr {
    format!("{ROUTER_WAN4}:5353").parse().unwrap()
}

#[test]
fn three_backends_share_clients_fail_over_come_back_and_all_down_keeps_them_all() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[]);
    for backend in BACKENDS4 {
        topology
            .server
            .ip(&["addr", "add", &format!("{backend}/24"), "dev", "eth0"]);
    }
    for backend in BACKENDS6 {
        topology.server.ip(&[
            "addr",
            "add",
            &format!("{backend}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
    }
    topology.add_wan_clients(SOURCES);
    let start = |addr: &str| Backend::start(&topology.server, addr, 8080, Some(HEALTH_PORT));
    let mut backends: Vec<Option<Backend>> = BACKENDS4.iter().map(|a| Some(start(a))).collect();
    let _backends6: Vec<Backend> = BACKENDS6.iter().map(|a| start(a)).collect();
    create_web(&api);
    let checks = [
        "--check-interval",
        "0.2",
        "--check-timeout",
        "0.1",
        "--cleanup-deadline",
        "60",
    ];
    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &checks);
    daemon.wait_log("ready");
    wait_for("every source to be forwarded", || {
        greetings(&topology).len() == usize::from(SOURCES)
    });

    // Spread over the three, and each client sticks to its backend.
    let first = greetings(&topology);
    let used: BTreeSet<&String> = first.values().collect();
    assert_eq!(used.len(), 3, "{first:?}");
    assert_eq!(
        greetings(&topology),
        first,
        "a client moved while all were up"
    );
    // IPv6 clients reach one of the IPv6 backends.
    let six: SocketAddr = format!("[{ROUTER_WAN6}]:80").parse().unwrap();
    let greeting = tcp_greeting(&topology.client, six).unwrap();
    assert!(
        BACKENDS6.iter().any(|b| greeting == format!("hello {b}")),
        "{greeting}"
    );
    // The public address is refused, the others serve.
    wait_for("the refused backend to be reported", || {
        let c = &api.get("apps", "web").unwrap()["status"]["conditions"][0];
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("198.51.100.7"))
    });

    // A UDP client of the backend about to stop, on one conntrack entry.
    let (victim_source, victim) = first
        .iter()
        .find(|(_, b)| b.as_str() == BACKENDS4[1])
        .map(|(i, b)| (*i, b.clone()))
        .unwrap();
    let udp = UdpClient::bind(
        &topology.client,
        format!("{}:40000", wan_client(victim_source))
            .parse()
            .unwrap(),
    );
    assert_eq!(
        udp.echo(udp_target(), "a").as_deref(),
        Some(format!("echo {victim} a").as_str())
    );

    // The middle backend stops: its clients move to the others, the others stay.
    backends[1] = None;
    wait_for(
        "the stopped backend's clients to be served by the others",
        || {
            let now = greetings(&topology);
            now.len() == usize::from(SOURCES) && now.values().all(|b| b != &victim)
        },
    );
    let moved = greetings(&topology);
    for (i, backend) in &first {
        if backend != &victim {
            assert_eq!(
                &moved[i], backend,
                "source {i} moved though its backend is up"
            );
        }
    }
    assert_eq!(health(&topology, 80, "TCP")[BACKENDS4[1]], "down");
    // Its conntrack entry was deleted, so the same UDP flow moves too.
    wait_for("the UDP flow to move to a running backend", || {
        udp.echo(udp_target(), "b")
            .is_some_and(|reply| !reply.contains(&victim))
    });
    assert!(
        daemon.log().contains("action=\"backend\" state=\"down\""),
        "no audit line"
    );
    // The Service is told, in its condition (the first change of health is told at once,
    // later ones at a limited rate) and by an event.
    let down = format!("(down: {victim}:8080)");
    wait_for("the condition to name the backend down", || {
        api.get("apps", "web").unwrap()["status"]["conditions"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&down))
    });
    let told = format!("backend {victim} (");
    wait_for("a BackendDown warning", || {
        api.events().iter().any(|e| {
            e["type"] == "Warning"
                && e["reason"] == "BackendDown"
                && e["note"].as_str().is_some_and(|n| n.contains(&told))
        })
    });

    // It comes back: its buckets return to it.
    backends[1] = Some(start(BACKENDS4[1]));
    wait_for("the backend's clients to return", || {
        greetings(&topology).get(&victim_source) == Some(&victim)
    });
    wait_for("the status to say it serves", || {
        health(&topology, 80, "TCP")[BACKENDS4[1]] == "serving"
    });

    // Every backend down: every one is kept, never a blackhole.
    backends.iter_mut().for_each(|b| *b = None);
    wait_for(
        "every backend of the UDP forward to be down and kept",
        || {
            let h = health(&topology, 5353, "UDP");
            h.len() == 3 && h.values().all(|s| s.starts_with("down, kept"))
        },
    );
    // One backend serves again, but its health check still fails: the forward still sends
    // its share of clients there.
    let (kept_source, kept) = first
        .iter()
        .find(|(_, b)| b.as_str() == BACKENDS4[0])
        .map(|(i, b)| (*i, b.clone()))
        .unwrap();
    let _back = Backend::start(&topology.server, &kept, 8080, None);
    let probe = UdpClient::bind(
        &topology.client,
        format!("{}:40001", wan_client(kept_source))
            .parse()
            .unwrap(),
    );
    wait_for(
        "a client of the serving backend to be answered while all are down",
        || {
            probe
                .echo(udp_target(), "c")
                .is_some_and(|reply| reply == format!("echo {kept} c"))
        },
    );
    assert!(
        health(&topology, 5353, "UDP")
            .values()
            .all(|s| s.starts_with("down, kept"))
    );
}

#[test]
fn a_thousand_backends_are_probed_within_the_concurrency_bound() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use kube_port_forward::core::model::Probe;
    use kube_port_forward::router::health::{self, Shared};
    use kube_port_forward::router::probe::{ProbeSettings, Prober};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const CHECKS: u32 = 1000;
    const BOUND: usize = 16;
    let ns = Netns::new("p");
    ns.ip(&["link", "set", "lo", "up"]);
    let (most, probed) = ns.enter(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // Every check's backend is this one health endpoint (on 1,000 loopback
            // addresses), which answers after 20 ms and counts the probes open at once: from
            // accepting a connection to just before answering it, a span within which its
            // probe surely holds a permit (it connected with one, and cannot finish before
            // the answer).
            let listener = tokio::net::TcpListener::bind("0.0.0.0:18080")
                .await
                .unwrap();
            let open = Arc::new(AtomicUsize::new(0));
            let most = Arc::new(AtomicUsize::new(0));
            let (o, m) = (open.clone(), most.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    let o = o.clone();
                    tokio::spawn(async move {
                        let _ = stream.read(&mut [0u8; 512]).await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        o.fetch_sub(1, Ordering::SeqCst);
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
                    });
                }
            });
            let metrics = Shared::default();
            let settings = ProbeSettings {
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                concurrency: BOUND,
                ..ProbeSettings::default()
            };
            let mut prober = Prober::new(settings, metrics.clone());
            prober.set((0..CHECKS).map(|i| {
                let addr = std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
                ((addr.into(), Probe::Http(18080)), true)
            }));
            assert_eq!(prober.len(), CHECKS as usize);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let probed = {
                    let m = health::lock(&metrics);
                    m.backends.values().filter(|b| b.probes >= 2).count()
                };
                if probed == CHECKS as usize {
                    break (most.load(Ordering::SeqCst), probed);
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{probed} of {CHECKS} probed twice"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    });
    assert_eq!(probed, CHECKS as usize);
    assert!(most <= BOUND, "{most} probes at once, bound {BOUND}");
    assert!(most > 1, "the probes ran one at a time");
}

const NODES: [(&str, &str); 3] = [
    ("n1", "192.168.50.21"),
    ("n2", "192.168.50.22"),
    ("n3", "192.168.50.23"),
];

/// The node addresses clients reach on port 80, from every source.
fn reached(topology: &Topology) -> BTreeSet<String> {
    greetings(topology).into_values().collect()
}

#[test]
fn node_port_fallback_follows_ready_excluded_and_deleted_nodes() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[]);
    topology
        .server
        .add_addresses("eth0", NODES.map(|(_, ip)| format!("{ip}/24")));
    topology.add_wan_clients(SOURCES);
    let _nodes: Vec<Backend> = NODES
        .iter()
        .map(|(_, ip)| Backend::start(&topology.server, ip, 30080, None))
        .collect();
    for (name, ip) in NODES {
        api.put_node(name, ip, true, json!({}));
    }
    // No LoadBalancer address: asks for its node ports instead.
    let metadata = json!({"name": "web", "namespace": "apps", "annotations": {
        "kube-port-forward-controller/mapping": "80:http",
        "kube-port-forward-controller/target": "nodeports"}});
    api.create(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": metadata,
        "spec": {"type": "LoadBalancer", "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP", "nodePort": 30080}]}}),
    );
    let flags = [
        "--node-ports",
        "annotated",
        "--check-interval",
        "0.2",
        "--check-timeout",
        "0.1",
        "--cleanup-deadline",
        "60",
    ];
    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &flags);
    daemon.wait_log("ready");
    let all: BTreeSet<String> = NODES.iter().map(|(_, ip)| ip.to_string()).collect();
    wait_for("every node to take clients", || reached(&topology) == all);
    wait_for("the finalizer", || finalizers(&api, "web") == [FINALIZER]);

    // n2 NotReady: out; n3 excluded from external load balancers: out.
    api.put_node("n2", NODES[1].1, false, json!({}));
    let two: BTreeSet<String> = [NODES[0].1, NODES[2].1].map(String::from).into();
    wait_for("the NotReady node to leave", || reached(&topology) == two);
    api.put_node(
        "n3",
        NODES[2].1,
        true,
        json!({"node.kubernetes.io/exclude-from-external-load-balancers": "true"}),
    );
    let one: BTreeSet<String> = [NODES[0].1.to_owned()].into();
    wait_for("the excluded node to leave", || reached(&topology) == one);
    // n2 Ready again: back.
    api.put_node("n2", NODES[1].1, true, json!({}));
    let back: BTreeSet<String> = [NODES[0].1, NODES[1].1].map(String::from).into();
    wait_for("the Ready node to come back", || reached(&topology) == back);

    // n1 being deleted (a finalizer holds it), n2 deleted: only the excluded n3 is left, and
    // excluded it takes no traffic: the forward waits, closes, and the Service is released.
    api.delete_node("n1", true);
    let only_n2: BTreeSet<String> = [NODES[1].1.to_owned()].into();
    wait_for("the node being deleted to leave", || {
        reached(&topology) == only_n2
    });
    api.delete_node("n2", false);
    wait_for("the forward to close", || refused(&topology, 80));
    wait_for("the finalizer to be released", || {
        finalizers(&api, "web").is_empty()
    });
    wait_for("the Waiting condition", || {
        api.get("apps", "web").unwrap()["status"]["conditions"][0]["reason"] == "Waiting"
    });
    assert!(
        daemon.log().contains("complete list of Nodes"),
        "{}",
        daemon.log()
    );
    assert_rbac_covers(&api.requests());
}
