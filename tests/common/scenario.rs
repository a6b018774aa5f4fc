//! Scenarios of the daemon against the test API server: Services, a daemon per router, and
//! what a WAN client sees.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use super::apiserver::ApiServer;
use super::daemon::Daemon;
use super::{Netns, ROUTER_WAN4, SERVER4, TempDir, Topology, tcp_greeting};

const BIN: &str = env!("CARGO_BIN_EXE_kube-port-forward");

pub const FINALIZER: &str = "kube-port-forward-controller/finalizer";

/// Starts the daemon as router `name` with its own finalizer and condition type, resyncing
/// every 5 s, plus `extra` flags (default: a 60 s cleanup deadline).
pub fn start_daemon(
    router: &Netns,
    dir: &TempDir,
    api: SocketAddr,
    name: &str,
    finalizer: &str,
    extra: &[&str],
) -> Daemon {
    let condition = format!("kube-port-forward-controller/{name}");
    let mut args = vec![
        "--finalizer",
        finalizer,
        "--condition-type",
        &condition,
        "--resync",
        "5",
    ];
    args.extend_from_slice(if extra.is_empty() {
        &["--cleanup-deadline", "60"]
    } else {
        extra
    });
    Daemon::spawn(router, dir, api, name, &args)
}

pub fn service(name: &str, mapping: &str, port: u16) -> Value {
    let metadata = json!({"name": name, "namespace": "apps",
        "annotations": {"kube-port-forward-controller/mapping": mapping}});
    json!({"apiVersion": "v1", "kind": "Service", "metadata": metadata,
        "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}})
}

/// Creates a Service in `apps` and gives it the server's address, as MetalLB would.
pub fn create_with_address(api: &ApiServer, name: &str, mapping: &str, port: u16) {
    api.create(service(name, mapping, port));
    api.set_lb_ips("apps", name, &[SERVER4]);
}

pub fn wan(port: u16) -> SocketAddr {
    format!("{ROUTER_WAN4}:{port}").parse().unwrap()
}

pub fn greets(topology: &Topology, port: u16, greeting: &str) -> bool {
    tcp_greeting(&topology.client, wan(port)).is_ok_and(|g| g == greeting)
}

pub fn refused(topology: &Topology, port: u16) -> bool {
    tcp_greeting(&topology.client, wan(port))
        .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused)
}

/// The message of router `router`'s condition on `apps/name` (empty when it has none).
pub fn condition_message(api: &ApiServer, name: &str, router: &str) -> String {
    let type_ = format!("kube-port-forward-controller/{router}");
    api.get("apps", name)
        .and_then(|s| {
            s["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == type_)
                .map(|c| c["message"].as_str().unwrap_or_default().to_owned())
        })
        .unwrap_or_default()
}

pub fn finalizers(api: &ApiServer, name: &str) -> Vec<String> {
    api.get("apps", name)
        .and_then(|s| serde_json::from_value(s["metadata"]["finalizers"].clone()).ok())
        .unwrap_or_default()
}

pub fn table_forwards(topology: &Topology) -> usize {
    let status = topology.router.exec(BIN, &["status", "--output", "json"]);
    let status: Value = serde_json::from_str(&status).unwrap();
    status["forwards"].as_array().map_or(0, Vec::len)
}

/// `GET path` over HTTP/1.0 from inside `ns`: status code and body.
pub fn get(ns: &Netns, port: u16, path: &str) -> Option<(u16, String)> {
    let path = path.to_owned();
    ns.enter(move || {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split(' ').nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n")?.1.to_owned();
        Some((status, body))
    })
}

/// An executable `nft` stand-in named `name` in `dir`: `transaction` (shell, with `$M` the
/// marker file) handles `-f -` runs, everything else goes to the real nft:
/// `(wrapper, marker)`.
fn nft_wrapper(dir: &TempDir, name: &str, transaction: &str) -> (String, std::path::PathBuf) {
    let marker = dir.path.join(format!("{name}.marker"));
    let wrapper = dir.write(
        name,
        &format!(
            "#!/bin/sh\nM={m}\ncase \" $* \" in\n*\" -f - \"*)\n{transaction}\n;;\nesac\nexec nft \"$@\"\n",
            m = marker.display()
        ),
    );
    super::run("chmod", &["+x", &wrapper]);
    (wrapper, marker)
}

/// An nft that refuses every transaction while the marker exists. The daemon runs `nft` only
/// to build or rebuild its table (elements go by netlink): see [`stray_set`].
pub fn nft_failing(dir: &TempDir) -> (String, std::path::PathBuf) {
    nft_wrapper(
        dir,
        "nft-fails",
        "  if [ -e \"$M\" ]; then echo injected failure >&2; exit 1; fi\n  exec nft \"$@\"",
    )
}

/// Adds (or removes) a set the daemon does not create to its table: harmless to traffic,
/// but the table no longer has the daemon's shape, so every apply must rebuild it with
/// `nft` until the set is gone.
pub fn stray_set(ns: &Netns, present: bool) {
    if present {
        ns.nft(&[
            "add",
            "set",
            "inet",
            "kube_port_forward",
            "stray",
            "{ type inet_service; }",
        ]);
    } else {
        ns.nft(&["delete", "set", "inet", "kube_port_forward", "stray"]);
    }
}

/// An nft that counts its runs: one line in the returned file per run.
pub fn nft_counting(dir: &TempDir) -> (String, std::path::PathBuf) {
    nft_wrapper(dir, "nft-counts", "  echo run >> \"$M\"")
}

/// An nft that hangs on every transaction while the marker exists.
pub fn nft_hanging(dir: &TempDir) -> (String, std::path::PathBuf) {
    nft_wrapper(dir, "nft-hangs", "  [ -e \"$M\" ] && exec sleep 3600")
}

/// How many times events matching `select` were published: one object per Service and
/// reason, its `series.count` once repeated.
fn events_where(api: &ApiServer, select: impl Fn(&Value) -> bool) -> u64 {
    api.events()
        .iter()
        .filter(|e| select(e))
        .map(|e| e["series"]["count"].as_u64().unwrap_or(1))
        .sum()
}

/// How many times an event of `reason` was published.
pub fn event_count(api: &ApiServer, reason: &str) -> u64 {
    events_where(api, |e| e["reason"] == reason)
}

/// How many times events about Services whose names start with `prefix` were published.
pub fn events_about(api: &ApiServer, prefix: &str) -> u64 {
    events_where(api, |e| {
        e["regarding"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with(prefix))
    })
}

/// The requests that changed something on the API server, in order.
pub fn writes(api: &ApiServer) -> Vec<String> {
    api.requests()
        .into_iter()
        .filter(|r| !r.starts_with("GET "))
        .collect()
}

/// Whether the daemon serving health on `port` inside `ns` has written every finalizer
/// change, condition and event handed to its cluster lane.
pub fn bookkeeping_idle(ns: &Netns, port: u16) -> bool {
    get(ns, port, "/metrics")
        .is_some_and(|(_, body)| body.contains("kube_port_forward_bookkeeping_idle 1"))
}
