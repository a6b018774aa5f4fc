//! The daemon as a router component: it follows the WAN interfaces' addresses, restores its
//! table when something outside deletes it, and reports to systemd and on its health
//! endpoints. The real binary in the router namespace, the test API server, the real kernel.
//! Needs root.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::daemon::Daemon;
use common::scenario::{self, get};
use common::*;
use serde_json::json;

fn service(name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "apps",
            "annotations": {"kube-port-forward-controller/mapping": "80:http"}},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}})
}

fn greets(topology: &Topology, address: &str) -> bool {
    let to: SocketAddr = format!("{address}:80").parse().unwrap();
    tcp_greeting(&topology.client, to).is_ok_and(|g| g == "hello 8080")
}

fn setup() -> Setup {
    common::setup(&[8080])
}

/// A resync an hour away: whatever the test sees restored was restored by notification.
const NO_RESYNC: [&str; 2] = ["--resync", "3600"];

#[test]
fn a_table_deleted_from_outside_comes_back_and_forwards_again() {
    let s = setup();
    let daemon = Daemon::spawn(&s.topology.router, &s.dir, s.addr, "r", &NO_RESYNC);
    daemon.wait_log("ready");
    s.api.create(service("web"));
    s.api.set_lb_ips("apps", "web", &[SERVER4]);
    wait_for("the forward", || greets(&s.topology, ROUTER_WAN4));

    // What `/etc/init.d/firewall stop` (fw4 flush) and an admin's flush do.
    s.topology.router.nft(&["flush", "ruleset"]);
    wait_for("the forward after a flush", || {
        greets(&s.topology, ROUTER_WAN4)
    });
    s.topology
        .router
        .nft(&["delete", "table", "inet", "kube_port_forward"]);
    wait_for("the forward after the table's deletion", || {
        greets(&s.topology, ROUTER_WAN4)
    });
    s.topology
        .router
        .nft(&["flush", "chain", "inet", "kube_port_forward", "prerouting"]);
    wait_for("the forward after the chain's rules were deleted", || {
        greets(&s.topology, ROUTER_WAN4)
    });
    assert!(daemon.log().contains("action=\"restore\""));
}

#[test]
fn wan_addresses_are_followed_without_a_restart() {
    let s = setup();
    let args = [&["--wan-interface", "wan"], &NO_RESYNC[..]].concat();
    let daemon = Daemon::spawn_with(&s.topology.router, &s.dir, s.addr, "r", &args, &[]);
    daemon.wait_log("ready");
    s.api.create(service("web"));
    s.api.set_lb_ips("apps", "web", &[SERVER4]);
    wait_for("the forward on the first address", || {
        greets(&s.topology, ROUTER_WAN4)
    });

    // A new lease: a second address, then the first one goes (promoted, not taken along).
    s.topology.router.exec(
        "sysctl",
        &["-qw", "net.ipv4.conf.wan.promote_secondaries=1"],
    );
    s.topology
        .router
        .ip(&["addr", "add", "203.0.113.7/24", "dev", "wan"]);
    wait_for("the forward on the new address", || {
        greets(&s.topology, "203.0.113.7")
    });
    s.topology
        .router
        .ip(&["addr", "del", "203.0.113.1/24", "dev", "wan"]);
    let wan_set = || {
        s.topology
            .router
            .nft(&["list", "set", "inet", "kube_port_forward", "wan_ipv4"])
    };
    wait_for("the old address to leave the WAN set", || {
        !wan_set().contains("203.0.113.1")
    });
    // The interface goes down and up (PPPoE reconnect): still forwarded.
    s.topology.router.ip(&["link", "set", "wan", "down"]);
    s.topology.router.ip(&["link", "set", "wan", "up"]);
    wait_for("the forward after the link came back", || {
        greets(&s.topology, "203.0.113.7")
    });
    assert!(daemon.log().contains("WAN addresses changed"));
    // LAN addresses are never WAN addresses.
    assert!(!wan_set().contains("192.168.50.1"));
}

#[test]
fn health_metrics_and_systemd_notifications() {
    let s = setup();
    let socket_path = s.dir.path.join("notify");
    let notify = UnixDatagram::bind(&socket_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let socket_text = socket_path.display().to_string();
    let args = [
        "--wan-interface",
        "wan",
        "--health",
        "127.0.0.1:9477",
        "--resync",
        "3600",
    ];
    let env = [
        ("NOTIFY_SOCKET", socket_text.as_str()),
        ("WATCHDOG_USEC", "1000000"),
    ];
    // At boot with the cluster away: the daemon says it waits, and is not ready.
    s.api.stop();
    let daemon = Daemon::spawn_with(&s.topology.router, &s.dir, s.addr, "r", &args, &env);
    let mut seen = Vec::new();
    let mut buffer = [0u8; 512];
    while !seen
        .iter()
        .any(|m: &String| m.contains("STATUS=waiting for the API server"))
    {
        let n = notify.recv(&mut buffer).expect("a notification in time");
        seen.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
    }
    assert!(!seen.iter().any(|m| m.contains("READY=1")), "{seen:?}");
    s.api.listen_at(Some(&s.topology.router), s.addr.port());

    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().any(|m| m.contains("WATCHDOG=1")))
    {
        let n = notify.recv(&mut buffer).expect("a notification in time");
        seen.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
    }
    wait_for("/readyz", || {
        get(&s.topology.router, 9477, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    let (code, _) = get(&s.topology.router, 9477, "/healthz").unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        get(&s.topology.router, 9477, "/nothing").map(|(c, _)| c),
        Some(404)
    );

    s.api.create(service("web"));
    s.api.set_lb_ips("apps", "web", &[SERVER4]);
    wait_for("the forward in the metrics", || {
        get(&s.topology.router, 9477, "/metrics").is_some_and(|(_, body)| {
            body.contains("kube_port_forward_forwards{state=\"forwarding\"} 1\n")
        })
    });
    let (_, metrics) = get(&s.topology.router, 9477, "/metrics").unwrap();
    for line in [
        "kube_port_forward_ready 1\n",
        "kube_port_forward_wan_addresses 2\n",
        "# TYPE kube_port_forward_apply_duration_seconds histogram\n",
        "# TYPE kube_port_forward_seconds_since_last_sync gauge\n",
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }
    // The watchdog keeps being fed while the loop turns.
    let fed = (0..3).all(|_| {
        notify
            .recv(&mut buffer)
            .is_ok_and(|n| String::from_utf8_lossy(&buffer[..n]).contains("WATCHDOG=1"))
    });
    assert!(fed, "the watchdog stopped being fed:\n{}", daemon.log());
}

/// Under systemd with stderr on the journal, audit lines reach journald as fields. The
/// journal here is a socket the test binds, mounted where journald's would be, inside the
/// router namespace's own mount namespace (so the host's `/run` is left alone).
/// The router's own services win over forwards, also those started after the daemon: a
/// listener started before a Service asks for its port keeps it (the sockets are read
/// right before a port opens), and one that starts on a port already forwarded takes it
/// back within a poll, told to the Service; when it stops, the forward comes back. The
/// resync is an hour away, so none of it waits for one.
#[test]
fn the_routers_own_late_listeners_win_over_forwards() {
    let s = setup();
    let condition = ["--condition-type", "kube-port-forward-controller/r"];
    let daemon = Daemon::spawn(
        &s.topology.router,
        &s.dir,
        s.addr,
        "r",
        &[&NO_RESYNC[..], &condition].concat(),
    );
    daemon.wait_log("ready");
    let on_wan = |port: u16| {
        let to: SocketAddr = format!("{ROUTER_WAN4}:{port}").parse().unwrap();
        tcp_greeting(&s.topology.client, to).ok()
    };
    let mapped = |name: &str, port: u16| {
        let mut service = service(name);
        service["metadata"]["annotations"]["kube-port-forward-controller/mapping"] =
            json!(format!("{port}:http"));
        s.api.create(service);
        s.api.set_lb_ips("apps", name, &[SERVER4]);
    };
    let warned = |name: &str, port: u16| {
        s.api.events().iter().any(|e| {
            e["type"] == "Warning"
                && e["regarding"]["name"] == name
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains(&format!("router itself serves {port}/TCP")))
        })
    };

    // Address changes also make the daemon read the sockets: once IPv6 has finished its
    // duplicate address detection, none come, and only the reads under test are left.
    wait_for("the router's addresses to settle", || {
        s.topology
            .router
            .ip(&["-6", "addr", "show", "tentative"])
            .trim()
            .is_empty()
    });

    // Started after the daemon, before the Service: never forwarded, not even for a moment.
    let early = Server::start(&s.topology.router, 2222);
    mapped("late", 2222);
    wait_for("a Warning on late naming the router's port", || {
        warned("late", 2222)
    });
    let log = daemon.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("action=\"open\"") && l.contains("external_port=2222")),
        "2222 was opened over the router's listener:\n{log}"
    );
    assert_eq!(on_wan(2222).as_deref(), Some("hello 2222"));
    assert!(
        !s.topology
            .router
            .nft(&["list", "table", "inet", "kube_port_forward"])
            .contains("2222"),
        "no element for 2222"
    );

    // Started on a port already forwarded: the router's service takes it back.
    mapped("web", 3333);
    wait_for("web forwarded", || {
        on_wan(3333).as_deref() == Some("hello 8080")
    });
    let router_service = Server::start(&s.topology.router, 3333);
    wait_for("the router's own service to answer on 3333", || {
        on_wan(3333).as_deref() == Some("hello 3333")
    });
    wait_for("a Warning on web naming the router's port", || {
        warned("web", 3333)
    });
    wait_for("web's condition to say why", || {
        scenario::condition_message(&s.api, "web", "r").contains("router itself serves 3333/TCP")
    });
    daemon.wait_log("action=\"router-port\"");

    // The router's service stops: the forward comes back.
    drop(router_service);
    wait_for("web forwarded again", || {
        on_wan(3333).as_deref() == Some("hello 8080")
    });
    assert_eq!(on_wan(2222).as_deref(), Some("hello 2222"));
    drop(early);
}

#[test]
fn audit_lines_go_to_journald_as_fields() {
    use std::os::unix::fs::MetadataExt;
    let topology = Topology::new();
    let dir = TempDir::new();
    let journal_dir = dir.path.join("journal");
    std::fs::create_dir(&journal_dir).unwrap();
    let journal = UnixDatagram::bind(journal_dir.join("socket")).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let manifest = web_manifest(&dir);
    let log = dir.path.join("stderr.log");
    let stderr = std::fs::File::create(&log).unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    let script = format!(
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal \
         && mount --bind {} /run/systemd/journal \
         && exec {} apply -f {manifest} --wan-interface wan --wan-address {ROUTER_WAN4}",
        journal_dir.display(),
        env!("CARGO_BIN_EXE_kube-port-forward"),
    );
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &topology.router.name, "sh", "-c", &script])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(stderr)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let mut entries: Vec<BTreeMap<String, String>> = Vec::new();
    let mut buffer = vec![0u8; 65536];
    while !entries
        .iter()
        .any(|e| e.get("ACTION").is_some_and(|a| a == "open"))
    {
        let n = journal.recv(&mut buffer).expect("journal entries in time");
        entries.push(journal_fields(&buffer[..n]));
    }
    let open = entries
        .iter()
        .find(|e| e.get("ACTION").is_some_and(|a| a == "open"))
        .unwrap();
    for (field, value) in [
        ("SYSLOG_IDENTIFIER", "kube-port-forward"),
        ("MESSAGE", "forward opened"),
        ("NAMESPACE", "apps"),
        ("NAME", "web"),
        ("PROTOCOL", "TCP"),
        ("EXTERNAL_PORT", "80"),
        ("FORWARD_TO", "192.168.50.10:8080"),
    ] {
        assert_eq!(open.get(field).map(String::as_str), Some(value), "{open:?}");
    }
    assert!(open["UID"].len() == 36, "{open:?}");
    // Nothing went to stderr as plain lines meanwhile.
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap()
            .contains("forward opened")
    );
}

/// One entry of journald's native protocol: `KEY=value` lines, or `KEY`, a newline, the
/// value's length (u64, little-endian), the value and a newline for values of any bytes.
fn journal_fields(mut entry: &[u8]) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    while let Some(end) = entry.iter().position(|b| *b == b'\n' || *b == b'=') {
        let key = String::from_utf8_lossy(&entry[..end]).into_owned();
        let value;
        if entry[end] == b'=' {
            let rest = &entry[end + 1..];
            let stop = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
            value = &rest[..stop];
            entry = &rest[(stop + 1).min(rest.len())..];
        } else {
            let len = u64::from_le_bytes(entry[end + 1..end + 9].try_into().unwrap()) as usize;
            value = &entry[end + 9..end + 9 + len];
            entry = &entry[(end + 10 + len).min(entry.len())..];
        }
        fields.insert(key, String::from_utf8_lossy(value).into_owned());
    }
    fields
}
