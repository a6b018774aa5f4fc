//! Test hosts in network namespaces: a client on the WAN side, the router that runs the
//! daemon's rules, and a server on the LAN side. Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN).
#![allow(dead_code)] // Each test binary uses its own part of this module.

pub mod apiserver;
pub mod daemon;
pub mod recording;
pub mod scenario;
pub mod upnp;

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const ROUTER_WAN4: &str = "203.0.113.1";
pub const CLIENT4: &str = "203.0.113.2";
pub const ROUTER_WAN6: &str = "2001:db8:1::1";
pub const CLIENT6: &str = "2001:db8:1::2";
pub const SERVER4: &str = "192.168.50.10";
pub const SERVER6: &str = "fd00:50::10";

/// Runs a command and returns its output, panicking with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    check(program, args, &output);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `command` and returns its standard output, panicking with its stderr when it fails.
pub fn output_ok(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A client, router and server, the servers listening on `ports`, and the API server
/// listening in the router namespace.
pub struct Setup {
    pub topology: Topology,
    pub api: apiserver::ApiServer,
    pub addr: SocketAddr,
    pub dir: TempDir,
    pub _servers: Vec<Server>,
}

pub fn setup(ports: &[u16]) -> Setup {
    let topology = Topology::new();
    let servers = ports
        .iter()
        .map(|p| Server::start(&topology.server, *p))
        .collect();
    let api = apiserver::ApiServer::new();
    let addr = api.listen(Some(&topology.router));
    Setup {
        topology,
        api,
        addr,
        dir: TempDir::new(),
        _servers: servers,
    }
}

/// Runs a command line split on whitespace (no quoting), panicking when it fails.
pub fn run_line(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    run(words[0], &words[1..])
}

fn check(program: &str, args: &[&str], output: &Output) {
    assert!(
        output.status.success(),
        "{program} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
}

/// Waits for `condition` to hold, polling; panics after a generous deadline.
pub fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "kpf{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs a program inside the namespace and returns its output, whatever its status.
    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .expect("ip netns exec runs")
    }

    /// Runs a program inside the namespace, panicking when it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let output = self.output(program, args);
        check(program, args, &output);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub fn ip(&self, args: &[&str]) -> String {
        run("ip", &[&["-n", &self.name], args].concat())
    }

    pub fn nft(&self, args: &[&str]) -> String {
        self.exec("nft", args)
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates and
    /// processes it starts live there.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).expect("the namespace file opens");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the test namespace");
            f()
        })
        .join()
        .expect("the thread in the namespace finishes")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// client --(WAN 203.0.113.0/24, 2001:db8:1::/64)-- router --(LAN 192.168.50.0/24,
/// fd00:50::/64)-- server. The router forwards but has no rules of its own.
pub struct Topology {
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
}

impl Topology {
    pub fn new() -> Topology {
        let client = Netns::new("c");
        let router = Netns::new("r");
        let server = Netns::new("s");
        let (r, c, s) = (&router.name, &client.name, &server.name);
        run_line(&format!(
            "ip link add wan netns {r} type veth peer name eth0 netns {c}"
        ));
        run_line(&format!(
            "ip link add lan netns {r} type veth peer name eth0 netns {s}"
        ));
        router.add_addresses("wan", ["203.0.113.1/24", "2001:db8:1::1/64"]);
        router.add_addresses("lan", ["192.168.50.1/24", "fd00:50::1/64"]);
        client.add_addresses("eth0", ["203.0.113.2/24", "2001:db8:1::2/64"]);
        server.add_addresses("eth0", ["192.168.50.10/24", "fd00:50::10/64"]);
        for (ns, dev) in [
            (&router, "wan"),
            (&router, "lan"),
            (&client, "eth0"),
            (&server, "eth0"),
        ] {
            ns.ip(&["link", "set", dev, "up"]);
        }
        server.ip(&["route", "add", "default", "via", "192.168.50.1"]);
        server.ip(&["-6", "route", "add", "default", "via", "fd00:50::1"]);
        router.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        router.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        Topology {
            client,
            router,
            server,
        }
    }
}

/// A TCP server that greets each connection with `hello <port>` and counts them; a UDP
/// server that echoes. Both stop when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    pub accepted: Arc<AtomicUsize>,
    /// Addresses TCP connections came from.
    peers: Arc<std::sync::Mutex<Vec<std::net::IpAddr>>>,
}

impl Server {
    pub fn start(ns: &Netns, port: u16) -> Server {
        let (tcp, udp) = ns.enter(move || {
            let tcp = TcpListener::bind(("::", port)).expect("TCP listener binds");
            let udp = UdpSocket::bind(("::", port)).expect("UDP socket binds");
            (tcp, udp)
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
        tcp.set_nonblocking(true).unwrap();
        let (tcp_stop, counter, seen) = (stop.clone(), accepted.clone(), peers.clone());
        std::thread::spawn(move || {
            while !tcp_stop.load(Ordering::SeqCst) {
                match tcp.accept() {
                    Ok((mut stream, peer)) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                        seen.lock().unwrap().push(peer.ip().to_canonical());
                        use std::io::Write;
                        let _ = stream.set_nonblocking(false);
                        let _ = writeln!(stream, "hello {port}");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        udp_echo_server(udp, port.to_string(), stop.clone());
        Server {
            stop,
            accepted,
            peers,
        }
    }

    pub fn peers(&self) -> Vec<std::net::IpAddr> {
        self.peers.lock().unwrap().clone()
    }
}

/// Answers each datagram on `udp` with `echo <label> <payload>` until `stop` is set; the
/// socket closes when the thread ends.
fn udp_echo_server(
    udp: UdpSocket,
    label: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    udp.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::SeqCst) {
            if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                let mut reply = format!("echo {label} ").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = udp.send_to(&reply, peer);
            }
        }
    })
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Connects from `ns` to `addr` over TCP and returns the greeting line.
pub fn tcp_greeting(ns: &Netns, addr: SocketAddr) -> std::io::Result<String> {
    ns.enter(move || {
        use std::io::Read;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text.trim().to_owned())
    })
}

/// Sends one datagram from a fresh socket in `ns` to `addr` and returns the reply.
pub fn udp_echo(ns: &Netns, addr: SocketAddr, payload: &str) -> std::io::Result<String> {
    let payload = payload.to_owned();
    ns.enter(move || {
        let local: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let socket = UdpSocket::bind(local)?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(Duration::from_secs(10)))?;
        socket.send(payload.as_bytes())?;
        let mut buf = [0u8; 1500];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// A Service manifest, LoadBalancer type, with the given mapping, ports and addresses.
pub fn service_yaml(
    namespace: &str,
    name: &str,
    mapping: &str,
    ports: &[(&str, u16, &str)],
    ips: &[&str],
) -> String {
    let ports: String = ports
        .iter()
        .map(|(n, p, proto)| format!("    - {{name: {n}, port: {p}, protocol: {proto}}}\n"))
        .collect();
    let ingress: String = ips
        .iter()
        .map(|ip| format!("      - ip: \"{ip}\"\n"))
        .collect();
    let status = if ips.is_empty() {
        String::new()
    } else {
        format!("status:\n  loadBalancer:\n    ingress:\n{ingress}")
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  uid: 00000000-0000-4000-8000-{:012x}\n  annotations:\n    kube-port-forward-controller/mapping: \"{mapping}\"\nspec:\n  type: LoadBalancer\n  ports:\n{ports}{status}---\n",
        name.bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
            & 0xffff_ffff_ffff
    )
}

/// `apps/web` forwarding port 80 to the server's TCP 8080 over IPv4, written into `dir`.
pub fn web_manifest(dir: &TempDir) -> String {
    dir.write(
        "web.yaml",
        &service_yaml(
            "apps",
            "web",
            "80:http",
            &[("http", 8080, "TCP")],
            &[SERVER4],
        ),
    )
}

/// `apps/web` forwarding TCP 80 and UDP 5353 to the server's 8080 over IPv4 and IPv6.
pub fn dual_stack_manifest(dir: &TempDir) -> String {
    dir.write(
        "web.yaml",
        &service_yaml(
            "apps",
            "web",
            "80:http,5353:dns",
            &[("http", 8080, "TCP"), ("dns", 8080, "UDP")],
            &[SERVER4, SERVER6],
        ),
    )
}

/// The WAN flags for both of the router's WAN addresses.
pub const DUAL_STACK_WAN: [&str; 4] = [
    "--wan-interface",
    "wan",
    "--wan-address",
    "203.0.113.1,2001:db8:1::1",
];

/// A fresh temporary folder, removed on drop.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "kpf-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }

    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.path.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The Kubernetes verb and resource (`group/resource`, core group empty) of a request line
/// as the test API server records it (`METHOD URI`).
pub fn rbac_of(request: &str) -> Option<(String, String)> {
    let (method, uri) = request.split_once(' ')?;
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let rest: Vec<&str> = match rest {
        ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail.to_vec(),
        other => other.to_vec(),
    };
    let (resource, named) = match rest.as_slice() {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => return None,
    };
    let verb = match (method, named) {
        ("GET", true) => "get",
        ("GET", false) if query.split('&').any(|p| p == "watch=true") => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("DELETE", _) => "delete",
        _ => return None,
    };
    Some((verb.to_owned(), format!("{group}/{resource}")))
}

/// Panics unless `deploy/rbac.yaml` grants every request the daemon made.
pub fn assert_rbac_covers(requests: &[String]) {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/rbac.yaml")).unwrap();
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
    let mut granted = std::collections::BTreeSet::new();
    for role in documents.iter().filter(|d| d["kind"] == "ClusterRole") {
        for rule in role["rules"].as_array().unwrap() {
            let list = |key: &str| -> Vec<String> {
                serde_json::from_value(rule[key].clone()).unwrap_or_default()
            };
            for group in list("apiGroups") {
                for resource in list("resources") {
                    for verb in list("verbs") {
                        granted.insert((verb.clone(), format!("{group}/{resource}")));
                    }
                }
            }
        }
    }
    for request in requests {
        if let Some(needed) = rbac_of(request) {
            assert!(
                granted.contains(&needed),
                "deploy/rbac.yaml does not grant {needed:?}, needed by {request}"
            );
        }
    }
}

/// One backend of a forward with several: on `addr`, a TCP server greeting
/// `hello <addr>`, a UDP server echoing `echo <addr> <payload>`, both on `port`, and, when
/// `health_port` is given, an HTTP health endpoint answering 200 (kube-proxy's
/// healthCheckNodePort). All stop when dropped.
pub struct Backend {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Backend {
    pub fn start(ns: &Netns, addr: &str, port: u16, health_port: Option<u16>) -> Backend {
        let ip: std::net::IpAddr = addr.parse().unwrap();
        let (tcp, udp, health) = ns.enter(move || {
            let tcp = TcpListener::bind((ip, port)).expect("backend TCP binds");
            let udp = UdpSocket::bind((ip, port)).expect("backend UDP binds");
            let health =
                health_port.map(|p| TcpListener::bind((ip, p)).expect("health port binds"));
            (tcp, udp, health)
        });
        let stop = Arc::new(AtomicBool::new(false));
        let serve = |listener: TcpListener, answer: String, stop: Arc<AtomicBool>| {
            listener.set_nonblocking(true).unwrap();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            use std::io::{Read, Write};
                            let _ = stream.set_nonblocking(false);
                            if answer.starts_with("HTTP") {
                                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                                let _ = stream.read(&mut [0u8; 512]);
                            }
                            let _ = stream.write_all(answer.as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        let mut threads = vec![serve(tcp, format!("hello {addr}\n"), stop.clone())];
        if let Some(health) = health {
            let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_owned();
            threads.push(serve(health, ok, stop.clone()));
        }
        threads.push(udp_echo_server(udp, addr.to_owned(), stop.clone()));
        Backend { stop, threads }
    }
}

impl Drop for Backend {
    /// Returns once every socket is closed: each thread owns its socket and ends when it
    /// sees the flag.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The `i`-th extra WAN client address: 203.0.113.100 and up.
pub fn wan_client(i: u8) -> String {
    format!("203.0.113.{}", 100 + i)
}

impl Topology {
    /// Gives the client `n` more WAN addresses ([`wan_client`]), to connect from.
    pub fn add_wan_clients(&self, n: u8) {
        self.client
            .add_addresses("eth0", (0..n).map(|i| format!("{}/24", wan_client(i))));
    }
}

impl Netns {
    /// Adds addresses (with their prefix length) to `dev`; IPv6 ones without duplicate
    /// address detection, so they are usable at once.
    pub fn add_addresses<S: AsRef<str>>(&self, dev: &str, cidrs: impl IntoIterator<Item = S>) {
        for cidr in cidrs {
            let cidr = cidr.as_ref();
            let mut args = vec!["addr", "add", cidr, "dev", dev];
            if cidr.contains(':') {
                args.push("nodad");
            }
            self.ip(&args);
        }
    }
}

/// A TCP connection from `source` (an address of the calling thread's namespace) to
/// `target`; gives up after 10 s.
pub fn connect_from(source: std::net::IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage, sockopt};
    let family = if source.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // connect(2) gives up after the send timeout.
    socket::setsockopt(
        &fd,
        sockopt::SendTimeout,
        &nix::sys::time::TimeVal::new(10, 0),
    )?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    socket::bind(raw, &SockaddrStorage::from(SocketAddr::new(source, 0)))?;
    socket::connect(raw, &SockaddrStorage::from(target))?;
    Ok(TcpStream::from(fd))
}

/// Connects over TCP from `source` (an address of `ns`) and returns the greeting.
pub fn tcp_greeting_from(ns: &Netns, source: &str, addr: SocketAddr) -> std::io::Result<String> {
    let source: std::net::IpAddr = source.parse().unwrap();
    ns.enter(move || {
        use std::io::Read;
        let mut stream = connect_from(source, addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text.trim().to_owned())
    })
}

/// A UDP socket of `ns` bound to `source` (address and port), kept open: datagrams it sends
/// to a forward belong to one conntrack entry until that entry is deleted.
pub struct UdpClient {
    socket: UdpSocket,
}

impl UdpClient {
    pub fn bind(ns: &Netns, source: SocketAddr) -> UdpClient {
        let socket = ns.enter(move || UdpSocket::bind(source).expect("UDP client binds"));
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        UdpClient { socket }
    }

    /// Sends `payload` to `addr` and returns the reply, if one comes within half a second.
    pub fn echo(&self, addr: SocketAddr, payload: &str) -> Option<String> {
        self.socket.send_to(payload.as_bytes(), addr).ok()?;
        let mut buf = [0u8; 1500];
        let (n, _) = self.socket.recv_from(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}
