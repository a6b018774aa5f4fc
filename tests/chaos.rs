//! Chaos: random operations on Services (create, re-annotate, change or remove the address,
//! remove the annotation, label changes under `--selector`, delete, delete the namespace),
//! with the daemon SIGKILLed and restarted and the API server restarted with its history
//! lost (410), then the invariant: the kernel holds exactly what the cluster asks for, each
//! port reaches the server it should and no other port is open, the finalizer is on exactly
//! the Services with a live forward, and nothing is left Terminating. Seeded: the seed is
//! printed, and `CHAOS_SEED=N` replays it; `CHAOS_OPS=N` sets the length (`bench/chaos.sh`
//! runs thousands). Needs root.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::apiserver::ApiServer;
use common::daemon::Daemon;
use common::scenario::*;
use common::*;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kube-port-forward");

const NAMESPACES: [&str; 2] = ["apps", "team"];
const NAMES: [&str; 4] = ["svc-0", "svc-1", "svc-2", "svc-3"];
/// External ports asked for: few, so Services collide.
const PORTS: [u16; 4] = [80, 81, 82, 83];
/// Service ports, each served by the server namespace with its own greeting.
const TARGETS: [u16; 2] = [8080, 8081];

/// xorshift64*: a few lines, reproducible from the seed on any machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn chaos_service(rng: &mut Rng, ns: &str, name: &str) -> Value {
    let port = rng.pick(&TARGETS);
    let mut annotations = json!({});
    if rng.below(4) > 0 {
        annotations["kube-port-forward-controller/mapping"] =
            json!(format!("{}:http", rng.pick(&PORTS)));
    }
    let labels = if rng.below(4) > 0 {
        json!({"expose": "yes"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": annotations},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}})
}

/// One random operation.
fn operate(rng: &mut Rng, api: &ApiServer) -> String {
    let ns = rng.pick(&NAMESPACES);
    let name = rng.pick(&NAMES);
    let exists = api.get(ns, name).is_some();
    match rng.below(9) {
        0 | 1 if !exists => {
            let service = chaos_service(rng, ns, name);
            api.create(service);
            if rng.below(3) > 0 {
                api.set_lb_ips(ns, name, &[SERVER4]);
            }
            format!("create {ns}/{name}")
        }
        2 if exists => {
            let port = rng.pick(&PORTS);
            let patch = json!({"metadata": {"annotations": {"kube-port-forward-controller/mapping": format!("{port}:http")}}});
            api.merge_patch(ns, name, patch, false);
            format!("annotate {ns}/{name} {port}")
        }
        3 if exists => {
            let patch = json!({"metadata": {"annotations": {"kube-port-forward-controller/mapping": null}}});
            api.merge_patch(ns, name, patch, false);
            format!("unannotate {ns}/{name}")
        }
        4 if exists => {
            if rng.below(2) == 0 {
                api.set_lb_ips(ns, name, &[SERVER4]);
                format!("address {ns}/{name}")
            } else {
                api.set_lb_ips(ns, name, &[]);
                format!("no address {ns}/{name}")
            }
        }
        5 if exists => {
            let value = if rng.below(2) == 0 {
                json!("yes")
            } else {
                json!(null)
            };
            let patch = json!({"metadata": {"labels": {"expose": value}}});
            api.merge_patch(ns, name, patch, false);
            format!("label {ns}/{name} {value}")
        }
        6 if exists => {
            api.delete(ns, name);
            format!("delete {ns}/{name}")
        }
        7 if rng.below(4) == 0 => {
            api.delete_namespace(ns);
            format!("delete namespace {ns}")
        }
        _ => "nothing".to_owned(),
    }
}

/// What the cluster asks for: external port → the Services asking, with their target.
fn asked(api: &ApiServer) -> BTreeMap<u16, Vec<(String, u16)>> {
    let mut asked: BTreeMap<u16, Vec<(String, u16)>> = BTreeMap::new();
    for s in api.services() {
        let meta = &s["metadata"];
        let mapping = meta["annotations"]["kube-port-forward-controller/mapping"].as_str();
        let selected = meta["labels"]["expose"] == "yes";
        let addressed = s["status"]["loadBalancer"]["ingress"]
            .as_array()
            .is_some_and(|i| !i.is_empty());
        let (Some(mapping), true, true, true) = (
            mapping,
            selected,
            addressed,
            meta["deletionTimestamp"].is_null(),
        ) else {
            continue;
        };
        let external: u16 = mapping.split(':').next().unwrap().parse().unwrap();
        let target = s["spec"]["ports"][0]["port"].as_u64().unwrap() as u16;
        let owner = format!(
            "{}/{}",
            meta["namespace"].as_str().unwrap(),
            meta["name"].as_str().unwrap()
        );
        asked.entry(external).or_default().push((owner, target));
    }
    asked
}

/// The invariant, or what breaks it.
fn check(topology: &Topology, api: &ApiServer) -> Result<(), String> {
    let asked = asked(api);
    let status = topology.router.exec(BIN, &["status", "--output", "json"]);
    let status: Value = serde_json::from_str(&status).map_err(|e| e.to_string())?;
    let mut owners: BTreeSet<String> = BTreeSet::new();
    let mut forwarded: BTreeSet<u16> = BTreeSet::new();
    for forward in status["forwards"].as_array().into_iter().flatten() {
        let port = forward["external_port"].as_u64().unwrap() as u16;
        let owner = forward["owner"].as_str().unwrap_or_default();
        let service = owner.split(':').next().unwrap_or_default().to_owned();
        let Some(askers) = asked.get(&port) else {
            return Err(format!(
                "port {port} is open for {owner}, which nobody asks for"
            ));
        };
        let Some((_, target)) = askers.iter().find(|(s, _)| *s == service) else {
            return Err(format!(
                "port {port} is held by {owner}, not among {askers:?}"
            ));
        };
        let greeting = format!("hello {target}");
        if !greets(topology, port, &greeting) {
            return Err(format!("port {port} does not reach {greeting}"));
        }
        owners.insert(service);
        forwarded.insert(port);
    }
    let wanted: BTreeSet<u16> = asked.keys().copied().collect();
    if forwarded != wanted {
        return Err(format!("forwarded {forwarded:?}, asked for {wanted:?}"));
    }
    for port in PORTS.iter().filter(|p| !wanted.contains(p)) {
        if !refused(topology, *port) {
            return Err(format!("port {port} is open though nobody asks for it"));
        }
    }
    for s in api.services() {
        let meta = &s["metadata"];
        let key = format!(
            "{}/{}",
            meta["namespace"].as_str().unwrap(),
            meta["name"].as_str().unwrap()
        );
        if !meta["deletionTimestamp"].is_null() {
            return Err(format!("{key} is left Terminating"));
        }
        let ours = meta["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER));
        if ours != owners.contains(&key) {
            return Err(format!(
                "{key}: finalizer {ours}, forwarding {}",
                owners.contains(&key)
            ));
        }
    }
    Ok(())
}

#[test]
fn random_operations_with_kills_and_lost_history_converge() {
    let seed = env_number("CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    });
    let ops = env_number("CHAOS_OPS").unwrap_or(150);
    eprintln!("chaos: CHAOS_SEED={seed} CHAOS_OPS={ops}");
    let mut rng = Rng(seed);
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&TARGETS);
    let extra = [
        "--selector",
        "expose=yes",
        "--cleanup-deadline",
        "60",
        "--health",
        "127.0.0.1:9477",
    ];
    let spawn = || start_daemon(&topology.router, &dir, addr, "chaos", FINALIZER, &extra);
    let mut daemon: Option<Daemon> = Some(spawn());
    let mut log = Vec::new();
    for step in 0..ops {
        let what = match rng.below(20) {
            0 => {
                // SIGKILL, and back now or after some more operations.
                if let Some(mut d) = daemon.take() {
                    d.kill();
                }
                if rng.below(2) == 0 {
                    daemon = Some(spawn());
                }
                "kill the daemon".to_owned()
            }
            1 => {
                api.stop();
                api.forget_history();
                api.listen_at(Some(&topology.router), addr.port());
                "restart the API server, history lost".to_owned()
            }
            2 => {
                if daemon.is_none() {
                    daemon = Some(spawn());
                }
                // A checkpoint: let everything settle and check the invariant here too.
                wait_for_invariant(&topology, &api, seed, &log);
                "checkpoint".to_owned()
            }
            _ => operate(&mut rng, &api),
        };
        log.push(format!("{step}: {what}"));
    }
    if daemon.is_none() {
        daemon = Some(spawn());
    }
    wait_for_invariant(&topology, &api, seed, &log);
    // The daemon plans change by change; every resync (5 s here) compares that plan with
    // the whole plan worked out afresh. After all this, the two never differed.
    let daemon = daemon.expect("a daemon runs");
    let metric = |name: &str| -> Option<u64> {
        let (_, body) = get(&topology.router, 9477, "/metrics")?;
        body.lines()
            .find_map(|line| line.strip_prefix(&format!("kube_port_forward_{name} ")))
            .and_then(|value| value.parse().ok())
    };
    wait_for("a resync that compares the plans", || {
        metric("plan_checks_total").is_some_and(|n| n > 0)
    });
    assert_eq!(metric("plan_repairs_total"), Some(0), "CHAOS_SEED={seed}");
    assert!(
        !daemon.log().contains("incremental plan differed"),
        "CHAOS_SEED={seed}: {}",
        daemon.log()
    );
}

fn wait_for_invariant(topology: &Topology, api: &ApiServer, seed: u64, log: &[String]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut last = Ok(());
    while std::time::Instant::now() < deadline {
        last = check(topology, api);
        if last.is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let tail = log[log.len().saturating_sub(30)..].join("\n");
    panic!(
        "CHAOS_SEED={seed}: {}\nlast operations:\n{tail}",
        last.unwrap_err()
    );
}
