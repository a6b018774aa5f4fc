//! The router builds (`openwrt-pkg/build-all.sh`): every static musl binary in
//! `target/openwrt` (or `KPF_ROUTER_BUILDS`) prints the same plan as the native build, and
//! reaches an API server named by host name in its kubeconfig, resolved through /etc/hosts
//! and through DNS by musl's own resolver. Foreign CPUs run under qemu-user
//! (`qemu-<cpu>-static`), which cannot open the netfilter netlink sockets the kernel lane
//! uses: those are checked on an emulated machine (`bench/aarch64-vm.sh`).
//!
//! Ignored by a plain `cargo test`: they need the router builds first. `tests/run.sh` makes
//! one (big-endian MIPS) and runs them.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::apiserver::ApiServer;
use common::{Netns, TempDir, wait_for};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_kube-port-forward");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const FINALIZER: &str = "kube-port-forward-controller/finalizer";
const API_HOST: &str = "apiserver.kpf.test";

/// A router build: the binary and the emulator that runs it here (none for x86_64).
struct Build {
    triple: String,
    binary: PathBuf,
    runner: Option<&'static str>,
}

impl Build {
    fn command(&self) -> Command {
        match self.runner {
            Some(qemu) => {
                let mut command = Command::new(qemu);
                command.arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        }
    }

    /// The same command line run inside `ns` (`ip netns exec`, which also puts the
    /// namespace's /etc/netns/NAME files over /etc).
    fn in_netns(&self, ns: &Netns, args: &[&str]) -> Output {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &ns.name]);
        command.args(self.runner);
        command.arg(&self.binary).args(args);
        command.output().unwrap()
    }
}

fn builds() -> Vec<Build> {
    let dir = std::env::var_os("KPF_ROUTER_BUILDS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(ROOT).join("target/openwrt"));
    let mut builds: Vec<Build> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; openwrt-pkg/build-all.sh makes the router builds",
                dir.display()
            )
        })
        .filter_map(|entry| {
            let binary = entry.unwrap().path();
            let name = binary.file_name()?.to_str()?;
            let triple = name.strip_prefix("kube-port-forward.")?.to_owned();
            let runner = match triple.split('-').next()? {
                "x86_64" => None,
                "aarch64" => Some("qemu-aarch64-static"),
                "armv7" => Some("qemu-arm-static"),
                "mipsel" => Some("qemu-mipsel-static"),
                "mips" => Some("qemu-mips-static"),
                cpu => panic!("{name}: no emulator known for {cpu}"),
            };
            Some(Build {
                triple,
                binary,
                runner,
            })
        })
        .collect();
    builds.sort_by(|a, b| a.triple.cmp(&b.triple));
    assert!(!builds.is_empty(), "no router build in {}", dir.display());
    builds
}

fn stdout_of(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
#[ignore = "needs the router builds (openwrt-pkg/build-all.sh); tests/run.sh makes one and runs this"]
fn every_router_build_plans_the_examples_as_the_native_build_does() {
    let examples = Path::new(ROOT).join("examples");
    let examples = examples.to_str().unwrap();
    let cases: [&[&str]; 3] = [
        &["plan", "-f", examples],
        &["plan", "-f", examples, "--output", "json"],
        &[
            "plan",
            "-f",
            examples,
            "--wan-interface",
            "eth1",
            "--wan-address",
            "198.51.100.7",
            "--allow-ports",
            "53,80,2222,8000-8999",
        ],
    ];
    for build in builds() {
        for args in cases {
            let native = stdout_of(
                &Command::new(BIN).args(args).output().unwrap(),
                "native plan",
            );
            let theirs = stdout_of(&build.command().args(args).output().unwrap(), &build.triple);
            assert!(native.contains("forwarding"), "{native}");
            assert_eq!(theirs, native, "{} {args:?}", build.triple);
        }
        // The same verdict for the same refusals: --check exits 3 on both.
        let check = ["plan", "-f", examples, "--check"];
        let native = Command::new(BIN).args(check).output().unwrap().status;
        let theirs = build.command().args(check).output().unwrap().status;
        assert_eq!(native.code(), Some(3));
        assert_eq!(theirs.code(), native.code(), "{}", build.triple);
    }
}

/// Files under /etc/netns/NAME, which `ip netns exec NAME` mounts over /etc's; removed on drop.
struct NetnsEtc(PathBuf);

impl NetnsEtc {
    fn new(ns: &Netns, files: &[(&str, &str)]) -> NetnsEtc {
        let dir = Path::new("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir).unwrap();
        let etc = NetnsEtc(dir);
        for (name, text) in files {
            std::fs::write(etc.0.join(name), text).unwrap();
        }
        etc
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A DNS server on 127.0.0.1:53 in `ns` that answers A queries for `name` with 127.0.0.1
/// and every other query with NXDOMAIN, until dropped. Written here because the test needs
/// only these two answers: a DNS server crate would be far more than that.
struct Dns {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Dns {
    fn start(ns: &Netns, name: &'static str) -> Dns {
        let socket = ns.enter(|| UdpSocket::bind((Ipv4Addr::LOCALHOST, 53)).unwrap());
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stopped.load(Ordering::SeqCst) {
                let Ok((len, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(answer) = dns_answer(&buf[..len], name) {
                    let _ = socket.send_to(&answer, peer);
                }
            }
        });
        Dns {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The response to one DNS query (RFC 1035 4.1): the question echoed, and for an A query
/// of `name` one answer of 127.0.0.1; NXDOMAIN for any other name, no answer for other types.
fn dns_answer(query: &[u8], name: &str) -> Option<Vec<u8>> {
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let known = labels.join(".") == name;
    let answers = u16::from(known && qtype == 1);
    let mut response = query.get(..2)?.to_vec(); // the query's id
    // QR, the query's RD; RA; RCODE 3 (NXDOMAIN) for unknown names.
    response.extend([0x80 | (query[2] & 0x01), if known { 0x80 } else { 0x83 }]);
    response.extend([0, 1, 0, answers as u8, 0, 0, 0, 0]);
    response.extend(query.get(12..question_end)?);
    if answers == 1 {
        // The name by pointer to the question, type A, class IN, TTL 60, 127.0.0.1.
        response.extend([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
    }
    Some(response)
}

#[test]
#[ignore = "needs the router builds (openwrt-pkg/build-all.sh); tests/run.sh makes one and runs this"]
fn every_router_build_finds_its_api_server_by_host_name() {
    for build in builds() {
        for resolution in ["/etc/hosts", "DNS"] {
            let ns = Netns::new("name");
            let _etc = match resolution {
                "/etc/hosts" => NetnsEtc::new(
                    &ns,
                    &[
                        ("hosts", "127.0.0.1 apiserver.kpf.test\n"),
                        // Nothing answers there: no query leaves the namespace.
                        ("resolv.conf", "nameserver 127.0.0.1\n"),
                    ],
                ),
                _ => NetnsEtc::new(
                    &ns,
                    &[
                        ("hosts", "127.0.0.1 localhost\n"),
                        ("resolv.conf", "nameserver 127.0.0.1\n"),
                    ],
                ),
            };
            let _dns = (resolution == "DNS").then(|| Dns::start(&ns, API_HOST));
            let api = ApiServer::new();
            let addr = api.listen(Some(&ns));
            let dir = TempDir::new();
            let kubeconfig = ApiServer::kubeconfig_at(&format!("{API_HOST}:{}", addr.port()));
            let kubeconfig = dir.write("kubeconfig", &kubeconfig);
            api.create(json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "default", "finalizers": [FINALIZER]},
                "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
            }));

            let what = format!("{} via {resolution}", build.triple);
            let output = build.in_netns(&ns, &["release-finalizers", "--kubeconfig", &kubeconfig]);
            stdout_of(&output, &what);
            wait_for("the finalizer to be released", || {
                api.get("default", "web").is_some_and(|service| {
                    service["metadata"]["finalizers"]
                        .as_array()
                        .is_none_or(|f| f.is_empty())
                })
            });

            if resolution != "DNS" {
                continue;
            }
            // A name the DNS server does not know: a clear error naming the server.
            let unknown = dir.write(
                "unknown",
                &std::fs::read_to_string(&kubeconfig)
                    .unwrap()
                    .replace(API_HOST, "nowhere.kpf.test"),
            );
            let output = build.in_netns(&ns, &["release-finalizers", "--kubeconfig", &unknown]);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{what}: {stderr}");
            assert!(stderr.contains("nowhere.kpf.test"), "{what}: {stderr}");
        }
    }
}
