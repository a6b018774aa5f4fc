//! Double NAT with a real UPnP IGD: an internet-side client, an ISP box running Debian's
//! miniupnpd (nftables flavour), the router behind it on a private address, and a server
//! behind the router.
//!
//! internet (198.51.100.2) --ext-- box (198.51.100.1 | 192.168.1.1) --lan/wan--
//! router (192.168.1.2 | 192.168.50.1) --lan-- server (192.168.50.10)
//!
//! miniupnpd 2.3.1 refuses reserved addresses as the external address it reports, so the box
//! reports [`EXTERNAL`], an address no namespace has: it is only reported, never contacted.
//! The internet client reaches the box at its own address, [`BOX_EXT`].

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::apiserver::ApiServer;
use super::{Netns, SERVER4, Server, TempDir, connect_from, run_line, wait_for};

pub const BOX_EXT: &str = "198.51.100.1";
pub const INTERNET: &str = "198.51.100.2";
pub const BOX_LAN: &str = "192.168.1.1";
pub const ROUTER_WAN: &str = "192.168.1.2";
/// A second address of the router's WAN: another host of the box's LAN, in effect.
pub const NEIGHBOUR: &str = "192.168.1.3";
pub const EXTERNAL: &str = "100.128.0.1";
pub const DESCRIPTION_URL: &str = "http://192.168.1.1:5000/rootDesc.xml";
pub const CONTROL_URL: &str = "http://192.168.1.1:5000/ctl/IPConn";
const CONTROL: &str = "/ctl/IPConn";
const SERVICE: &str = "urn:schemas-upnp-org:service:WANIPConnection:2";

/// The box's firewall: the chains miniupnpd fills, and a forward policy that lets through
/// only what it maps (and the replies).
const BOX_RULES: &str = "table inet filter {
  chain forward { type filter hook forward priority 0; policy drop; ct state established,related accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
";

pub struct DoubleNat {
    pub internet: Netns,
    pub isp: Netns,
    pub router: Netns,
    pub server: Netns,
    dir: TempDir,
    igd: Option<Child>,
}

impl DoubleNat {
    /// The namespaces, links and the box's firewall; the IGD is started by [`start_igd`].
    pub fn new() -> DoubleNat {
        let internet = Netns::new("i");
        let isp = Netns::new("b");
        let router = Netns::new("r");
        let server = Netns::new("s");
        let (i, b, r, s) = (&internet.name, &isp.name, &router.name, &server.name);
        run_line(&format!(
            "ip link add ext netns {b} type veth peer name eth0 netns {i}"
        ));
        run_line(&format!(
            "ip link add lan netns {b} type veth peer name wan netns {r}"
        ));
        run_line(&format!(
            "ip link add lan netns {r} type veth peer name eth0 netns {s}"
        ));
        isp.add_addresses("ext", [format!("{BOX_EXT}/24")]);
        isp.add_addresses("lan", [format!("{BOX_LAN}/24")]);
        internet.add_addresses("eth0", [format!("{INTERNET}/24")]);
        router.add_addresses("wan", [format!("{ROUTER_WAN}/24")]);
        router.add_addresses("lan", ["192.168.50.1/24"]);
        server.add_addresses("eth0", [format!("{SERVER4}/24")]);
        for (ns, dev) in [
            (&isp, "ext"),
            (&isp, "lan"),
            (&internet, "eth0"),
            (&router, "wan"),
            (&router, "lan"),
            (&server, "eth0"),
        ] {
            ns.ip(&["link", "set", dev, "up"]);
        }
        router.ip(&["route", "add", "default", "via", BOX_LAN]);
        server.ip(&["route", "add", "default", "via", "192.168.50.1"]);
        router.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        isp.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        let dir = TempDir::new();
        let rules = dir.write("box.nft", BOX_RULES);
        isp.nft(&["-f", &rules]);
        dir.write(
            "miniupnpd.conf",
            &format!(
                "ext_ifname=ext\nlistening_ip=lan\nhttp_port=5000\nenable_upnp=yes\nenable_natpmp=no\n\
                 secure_mode=yes\nuuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\next_ip={EXTERNAL}\n\
                 upnp_table_name=filter\nupnp_nat_table_name=filter\n\
                 allow 1024-65535 192.168.1.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
            ),
        );
        DoubleNat {
            internet,
            isp,
            router,
            server,
            dir,
            igd: None,
        }
    }

    /// Starts miniupnpd in the box in the foreground with its debug log (kept, and printed
    /// when a test fails), and waits until it answers.
    pub fn start_igd(&mut self) {
        self.start_igd_with(true);
    }

    /// The same as a daemon, without the debug log: miniupnpd writes a line per existing
    /// mapping at each request, so with hundreds of mappings its debug log is what limits
    /// it (300 mappings: 71 s with it, 1.3 s without). For benchmarks.
    pub fn start_igd_quiet(&mut self) {
        self.start_igd_with(false);
    }

    fn start_igd_with(&mut self, debug: bool) {
        let conf = self.dir.path.join("miniupnpd.conf");
        let pid = self.dir.path.join("miniupnpd.pid");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path.join("miniupnpd.log"))
            .unwrap();
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.isp.name, "miniupnpd", "-f"]);
        command.arg(&conf).arg("-P").arg(&pid);
        if debug {
            command.arg("-d");
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("miniupnpd starts (package miniupnpd-nftables)");
        if !debug {
            // It forks and the parent exits; the pid file names the daemon.
            let _ = child.wait();
        }
        self.igd = Some(child);
        wait_for("miniupnpd to answer", || {
            self.soap("GetStatusInfo", "").is_some()
        });
    }

    /// Stops miniupnpd; `reboot`: its mappings go too, as when the box restarts.
    pub fn stop_igd(&mut self, reboot: bool) {
        if let Some(mut child) = self.igd.take() {
            let _ = child.kill();
            let _ = child.wait();
            // A daemonized one (or one that outlived `ip netns exec`): by its pid file.
            let file = self.dir.path.join("miniupnpd.pid");
            if let Some(pid) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                wait_for("miniupnpd to end", || {
                    nix::sys::signal::kill(pid, None).is_err()
                });
            }
            let _ = std::fs::remove_file(file);
        }
        if reboot {
            for chain in ["miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"] {
                self.isp.nft(&["flush", "chain", "inet", "filter", chain]);
            }
        }
    }

    /// What miniupnpd logged.
    pub fn igd_log(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("miniupnpd.log")).unwrap_or_default()
    }

    /// A SOAP call to the IGD from the router namespace; the whole answer, or `None` when
    /// it does not answer.
    pub fn soap(&self, action: &str, arguments: &str) -> Option<String> {
        self.soap_from(None, action, arguments)
    }

    /// The same from `source`, an address of the router namespace (default: the kernel's
    /// choice).
    pub fn soap_from(&self, source: Option<&str>, action: &str, arguments: &str) -> Option<String> {
        let source: Option<std::net::IpAddr> = source.map(|s| s.parse().unwrap());
        let body = format!(
            "<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><u:{action} xmlns:u=\"{SERVICE}\">{arguments}</u:{action}></s:Body></s:Envelope>"
        );
        let request = format!(
            "POST {CONTROL} HTTP/1.1\r\nHost: {BOX_LAN}:5000\r\nContent-Type: text/xml\r\nSOAPAction: \"{SERVICE}#{action}\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let target: SocketAddr = format!("{BOX_LAN}:5000").parse().unwrap();
        self.router.enter(move || {
            use std::io::{Read, Write};
            let mut stream = match source {
                Some(source) => connect_from(source, target).ok()?,
                None => TcpStream::connect_timeout(&target, Duration::from_secs(5)).ok()?,
            };
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            stream.write_all(request.as_bytes()).ok()?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).ok()?;
            Some(answer)
        })
    }

    /// Seconds since the IGD started, as it says.
    pub fn uptime(&self) -> Option<u64> {
        let answer = self.soap("GetStatusInfo", "")?;
        element(&answer, "NewUptime")?.parse().ok()
    }

    /// The IGD's mappings: (protocol, external port, internal client, remaining lease).
    pub fn mappings(&self) -> Vec<(String, u16, String, u64)> {
        let mut found = Vec::new();
        for index in 0..64 {
            let Some(answer) = self.soap(
                "GetGenericPortMappingEntry",
                &format!("<NewPortMappingIndex>{index}</NewPortMappingIndex>"),
            ) else {
                break;
            };
            if !answer.starts_with("HTTP/1.1 200") {
                break;
            }
            let field = |name: &str| element(&answer, name);
            found.push((
                field("NewProtocol").unwrap_or_default(),
                field("NewExternalPort")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0),
                field("NewInternalClient").unwrap_or_default(),
                field("NewLeaseDuration")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0),
            ));
        }
        found
    }

    /// Whether the IGD maps `port`/`protocol` to `internal`.
    pub fn maps(&self, protocol: &str, port: u16, internal: &str) -> bool {
        self.mappings()
            .iter()
            .any(|(p, e, i, _)| p == protocol && *e == port && i == internal)
    }

    /// Maps `port`/TCP to the neighbour (another host behind the box) with its own request.
    pub fn neighbour_maps(&self, port: u16) -> bool {
        self.soap_from(
            Some(NEIGHBOUR),
            "AddPortMapping",
            &format!(
                "<NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort><NewProtocol>TCP</NewProtocol><NewInternalPort>{port}</NewInternalPort><NewInternalClient>{NEIGHBOUR}</NewInternalClient><NewEnabled>1</NewEnabled><NewPortMappingDescription>neighbour</NewPortMappingDescription><NewLeaseDuration>0</NewLeaseDuration>"
            ),
        )
        .is_some_and(|a| a.starts_with("HTTP/1.1 200"))
    }

    /// The neighbour deletes its mapping of `port`/TCP.
    pub fn neighbour_unmaps(&self, port: u16) -> bool {
        self.soap_from(
            Some(NEIGHBOUR),
            "DeletePortMapping",
            &format!(
                "<NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort><NewProtocol>TCP</NewProtocol>"
            ),
        )
        .is_some_and(|a| a.starts_with("HTTP/1.1 200"))
    }

    /// The internet client's view: the box's address on `port`.
    pub fn box_port(&self, port: u16) -> SocketAddr {
        format!("{BOX_EXT}:{port}").parse().unwrap()
    }
}

/// The text of `<name>…</name>` in a SOAP answer (the tests read the IGD on their own, not
/// through the daemon's client).
fn element(answer: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = answer.find(&open)? + open.len();
    let end = answer[start..].find('<')? + start;
    Some(answer[start..end].to_owned())
}

impl Drop for DoubleNat {
    fn drop(&mut self) {
        self.stop_igd(false);
        if std::thread::panicking() {
            eprintln!("--- miniupnpd log ---\n{}", self.igd_log());
        }
    }
}

/// The double NAT with its IGD running, servers on `ports` behind the router, and the test
/// API server listening in the router namespace.
pub struct Rig {
    pub nat: DoubleNat,
    pub api: ApiServer,
    pub addr: SocketAddr,
    pub dir: TempDir,
    pub servers: Vec<Server>,
}

pub fn rig(ports: &[u16]) -> Rig {
    let mut nat = DoubleNat::new();
    nat.start_igd();
    let servers = ports
        .iter()
        .map(|p| Server::start(&nat.server, *p))
        .collect();
    let api = ApiServer::new();
    let addr = api.listen(Some(&nat.router));
    Rig {
        nat,
        api,
        addr,
        dir: TempDir::new(),
        servers,
    }
}
