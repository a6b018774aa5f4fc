//! The data path through the real kernel: a client on the WAN side connects to the router's
//! WAN address, the daemon's table DNATs the flow, and it arrives at the server on the LAN.
//! Runs the real binary's `apply` inside the router namespace. Needs root.

mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_kube-port-forward");

fn apply(topology: &Topology, files: &str, wan_args: &[&str]) {
    topology
        .router
        .exec(BIN, &[&["apply", "-f", files], wan_args].concat());
}

fn sock(addr: &str, port: u16) -> SocketAddr {
    format!(
        "{}:{port}",
        if addr.contains(':') {
            format!("[{addr}]")
        } else {
            addr.to_owned()
        }
    )
    .parse()
    .unwrap()
}

/// Client, router, server (on 8080) and `apps/web` applied on both WAN addresses.
fn dual_stack_applied() -> (Topology, Server, TempDir, String) {
    let topology = Topology::new();
    let server = Server::start(&topology.server, 8080);
    let dir = TempDir::new();
    let file = dual_stack_manifest(&dir);
    apply(&topology, &file, &DUAL_STACK_WAN);
    (topology, server, dir, file)
}

/// TCP 80 and UDP 5353 of both WAN addresses, from `from`, reach the server's 8080.
fn both_forwards_reach_the_server(from: &Netns) {
    for router in [ROUTER_WAN4, ROUTER_WAN6] {
        assert_eq!(tcp_greeting(from, sock(router, 80)).unwrap(), "hello 8080");
        assert_eq!(
            udp_echo(from, sock(router, 5353), "ping").unwrap(),
            "echo 8080 ping"
        );
    }
}

#[test]
fn tcp_and_udp_over_ipv4_and_ipv6_reach_the_server_until_removed() {
    let (topology, server, dir, _file) = dual_stack_applied();
    both_forwards_reach_the_server(&topology.client);
    assert_eq!(server.accepted.load(std::sync::atomic::Ordering::SeqCst), 2);

    // The counters in the kernel saw the new flows.
    let status = topology.router.exec(BIN, &["status", "--output", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let forwards = status["forwards"].as_array().unwrap();
    assert_eq!(forwards.len(), 4);
    assert!(
        forwards.iter().all(|f| f["packets"].as_u64().unwrap() >= 1),
        "{status}"
    );
    assert!(
        forwards
            .iter()
            .all(|f| f["owner"].as_str().unwrap().starts_with("apps/web:"))
    );

    // Remove the forwards: the same connections are now refused by the router itself.
    let empty = dir.write("empty.yaml", "");
    apply(&topology, &empty, &DUAL_STACK_WAN);
    for router in [ROUTER_WAN4, ROUTER_WAN6] {
        let err = tcp_greeting(&topology.client, sock(router, 80)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
        let err = udp_echo(&topology.client, sock(router, 5353), "ping").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    }
    assert_eq!(server.accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[test]
fn only_the_wan_side_is_forwarded() {
    let topology = Topology::new();
    let _server = Server::start(&topology.server, 8080);
    let dir = TempDir::new();
    let file = web_manifest(&dir);
    // Interface only: packets to any router address arriving on `wan`.
    apply(&topology, &file, &["--wan-interface", "wan"]);
    assert_eq!(
        tcp_greeting(&topology.client, sock(ROUTER_WAN4, 80)).unwrap(),
        "hello 8080"
    );
    // The server itself is on the LAN side: port 80 of the router's LAN address is not
    // forwarded for it, so the router refuses the connection.
    let err = tcp_greeting(&topology.server, sock("192.168.50.1", 80)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn a_changed_target_port_takes_effect_and_the_old_external_port_closes() {
    let topology = Topology::new();
    let _a = Server::start(&topology.server, 8080);
    let _b = Server::start(&topology.server, 9090);
    let dir = TempDir::new();
    let wan = ["--wan-address", ROUTER_WAN4];
    let first = web_manifest(&dir);
    apply(&topology, &first, &wan);
    assert_eq!(
        tcp_greeting(&topology.client, sock(ROUTER_WAN4, 80)).unwrap(),
        "hello 8080"
    );
    let second = dir.write(
        "b.yaml",
        &service_yaml(
            "apps",
            "web",
            "81:http",
            &[("http", 9090, "TCP")],
            &[SERVER4],
        ),
    );
    apply(&topology, &second, &wan);
    assert_eq!(
        tcp_greeting(&topology.client, sock(ROUTER_WAN4, 81)).unwrap(),
        "hello 9090"
    );
    let err = tcp_greeting(&topology.client, sock(ROUTER_WAN4, 80)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

/// `udp_echo` from a chosen source address of the client.
fn udp_echo_from(ns: &Netns, source: &str, addr: SocketAddr) -> std::io::Result<String> {
    let source: SocketAddr = sock(source, 0);
    ns.enter(move || {
        let socket = std::net::UdpSocket::bind(source)?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        socket.send(b"ping")?;
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

#[test]
fn source_ranges_let_only_the_allowed_clients_through() {
    let topology = Topology::new();
    let _server = Server::start(&topology.server, 8080);
    // A second client address on each family, outside the Service's ranges.
    topology
        .client
        .ip(&["addr", "add", "203.0.113.3/24", "dev", "eth0"]);
    topology
        .client
        .ip(&["addr", "add", "2001:db8:1::3/64", "dev", "eth0", "nodad"]);
    let dir = TempDir::new();
    let manifest = format!(
        "kind: Service\n\
         metadata:\n  name: game\n  namespace: apps\n  annotations:\n    kube-port-forward-controller/mapping: \"5353:dns\"\n\
         spec:\n  loadBalancerSourceRanges: [\"{CLIENT4}/32\", \"2001:db8:1::2/128\"]\n  ports: [{{name: dns, port: 8080, protocol: UDP}}]\n\
         status: {{loadBalancer: {{ingress: [{{ip: \"{SERVER4}\"}}, {{ip: \"{SERVER6}\"}}]}}}}\n"
    );
    let file = dir.write("game.yaml", &manifest);
    apply(
        &topology,
        &file,
        &[
            "--wan-interface",
            "wan",
            "--wan-address",
            "203.0.113.1,2001:db8:1::1",
        ],
    );
    for (allowed, other, router) in [
        (CLIENT4, "203.0.113.3", ROUTER_WAN4),
        (CLIENT6, "2001:db8:1::3", ROUTER_WAN6),
    ] {
        assert_eq!(
            udp_echo_from(&topology.client, allowed, sock(router, 5353)).unwrap(),
            "echo 8080 ping"
        );
        let err = udp_echo_from(&topology.client, other, sock(router, 5353)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{other}: {err}");
    }
}

#[test]
fn nat_reflection_lets_lan_clients_use_the_wan_address_and_can_be_turned_off() {
    // On by default. The server connecting to the router's WAN address is the hardest case
    // of hairpin: without the masquerade its reply would go straight back to itself, from
    // the wrong address, and the connection would never complete.
    let (topology, server, _dir, file) = dual_stack_applied();
    both_forwards_reach_the_server(&topology.server);
    // WAN clients are not masqueraded: the server sees the client's own address.
    both_forwards_reach_the_server(&topology.client);
    let peers = server.peers();
    assert!(peers.contains(&CLIENT4.parse().unwrap()), "{peers:?}");
    assert!(
        peers.contains(&"192.168.50.1".parse().unwrap()),
        "{peers:?}"
    );

    apply(
        &topology,
        &file,
        &[&DUAL_STACK_WAN[..], &["--reflection", "false"]].concat(),
    );
    let err = tcp_greeting(&topology.server, sock(ROUTER_WAN4, 80)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert_eq!(
        tcp_greeting(&topology.client, sock(ROUTER_WAN4, 80)).unwrap(),
        "hello 8080"
    );
}

/// A forward chain shaped like firewall4's: drop by default, established flows accepted,
/// everything else from the WAN rejected, and the shipped include where fw4 puts
/// `/usr/share/nftables.d/chain-pre/forward/*.nft` (or nothing there).
fn fw4_like(include: Option<&str>) -> String {
    let include = include.map_or(String::new(), |path| format!("include \"{path}\"\n"));
    format!(
        "table inet fw4 {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        {include}
        ct state vmap {{ established : accept, related : accept }}
        iifname \"wan\" meta l4proto tcp reject with tcp reset
        iifname \"wan\" reject
        accept
    }}
}}
"
    )
}

#[test]
fn the_firewall4_include_accepts_exactly_the_forwarded_flows() {
    let topology = Topology::new();
    let _server = Server::start(&topology.server, 8080);
    let dir = TempDir::new();
    let file = web_manifest(&dir);
    apply(
        &topology,
        &file,
        &["--wan-interface", "wan", "--wan-address", ROUTER_WAN4],
    );
    // The client may route to the LAN directly: that flow is not forwarded by the daemon.
    topology
        .client
        .ip(&["route", "add", "192.168.50.0/24", "via", ROUTER_WAN4]);
    let forwarded = || tcp_greeting(&topology.client, sock(ROUTER_WAN4, 80));
    let direct = || tcp_greeting(&topology.client, sock(SERVER4, 8080));
    assert_eq!(direct().unwrap(), "hello 8080");

    let without = dir.write("fw4-without.nft", &fw4_like(None));
    topology.router.nft(&["-f", &without]);
    assert_eq!(
        forwarded().unwrap_err().kind(),
        ErrorKind::ConnectionRefused
    );

    let shipped = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/openwrt-pkg/kube-port-forward/files/30-kube-port-forward.nft"
    );
    topology.router.nft(&["delete", "table", "inet", "fw4"]);
    let with = dir.write("fw4-with.nft", &fw4_like(Some(shipped)));
    topology.router.nft(&["-f", &with]);
    assert_eq!(forwarded().unwrap(), "hello 8080");
    assert_eq!(direct().unwrap_err().kind(), ErrorKind::ConnectionRefused);
}

#[test]
fn a_port_the_router_serves_is_taken_only_when_the_allowed_ports_name_it() {
    let topology = Topology::new();
    let _server = Server::start(&topology.server, 8080);
    let dir = TempDir::new();
    let file = web_manifest(&dir);
    // The router's own service on TCP 80 of every address (its web interface, say).
    let _own = topology
        .router
        .enter(|| std::net::TcpListener::bind("0.0.0.0:80").unwrap());
    let wan = ["--wan-address", ROUTER_WAN4];
    let refused = topology
        .router
        .exec(BIN, &[&["apply", "-f", &file], &wan[..]].concat());
    assert!(refused.starts_with("0 forwards"), "{refused}");
    let status = topology.router.exec(BIN, &["status"]);
    assert!(!status.contains("apps/web"), "{status}");

    // Named by the owner: forwarded, and WAN clients reach the Service, not the router.
    let allowed = topology.router.exec(
        BIN,
        &[&["apply", "-f", &file, "--allow-ports", "80,443"], &wan[..]].concat(),
    );
    assert!(allowed.starts_with("1 forwards"), "{allowed}");
    assert_eq!(
        tcp_greeting(&topology.client, sock(ROUTER_WAN4, 80)).unwrap(),
        "hello 8080"
    );
}

/// Flows that exist when a forward closes end with it: the kernel's conntrack entries of the
/// forward are deleted after its elements, so neither a UDP stream nor an established TCP
/// connection keeps reaching the old target (firewall4 accepts marked flows, and an entry
/// left in place keeps its DNAT). The router answers the next packet of each itself.
#[test]
fn closing_a_forward_ends_its_running_udp_and_tcp_flows() {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::time::Duration;

    let topology = Topology::new();
    let dir = TempDir::new();
    let file = dual_stack_manifest(&dir);
    // Echo servers on the server's 8080: TCP line by line, UDP datagram by datagram.
    let (tcp, udp) = topology.server.enter(|| {
        (
            TcpListener::bind(("0.0.0.0", 8080)).unwrap(),
            UdpSocket::bind(("0.0.0.0", 8080)).unwrap(),
        )
    });
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = writeln!(writer, "echo {line}");
                }
            });
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], peer);
        }
    });
    apply(&topology, &file, &DUAL_STACK_WAN);
    let (stream, socket) = topology.client.enter(|| {
        let stream =
            TcpStream::connect_timeout(&sock(ROUTER_WAN4, 80), Duration::from_secs(10)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect(sock(ROUTER_WAN4, 5353)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (stream, socket)
    });
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    writeln!(writer, "one").unwrap();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "echo one\n");
    let mut buf = [0u8; 64];
    socket.send(b"one").unwrap();
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"one");

    // The Service goes: the forwards close, and with them the flows.
    let empty = dir.write("empty.yaml", "");
    apply(&topology, &empty, &DUAL_STACK_WAN);

    // The same UDP socket: the router has no flow for it any more and refuses the datagram
    // (ICMP port unreachable); a flow left in place would bring the echo back.
    socket.send(b"two").unwrap();
    let err = socket.recv(&mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    // The same TCP connection: the router answers the next segment with a reset.
    writeln!(writer, "two").unwrap();
    line.clear();
    match reader.read_line(&mut line) {
        Ok(0) => {}
        Ok(_) => panic!("the closed forward still carried the connection: {line:?}"),
        Err(err) => assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}"),
    }
}
