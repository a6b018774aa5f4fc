//! Plan and diff at scale: 10,000 Services, 20,000 forwards. Pure CPU, no kernel: the
//! engine applies to a firewall in memory.
//! `cargo bench --bench plan`

use std::collections::BTreeSet;
use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use kube_port_forward::cli::manifest;
use kube_port_forward::core::decide::{self, Store};
use kube_port_forward::core::model::ForwardKey;
use kube_port_forward::core::plan::{self, Plan, Planner};
use kube_port_forward::core::policy::Policy;
use kube_port_forward::core::service::Service;
use kube_port_forward::core::status;
use kube_port_forward::core::tracked::Tracked;
use kube_port_forward::kernel::wire::{Elem, SetChange};
use kube_port_forward::kernel::{Change, DEFAULT_TABLE, Ruleset, TableConfig};
use kube_port_forward::kernel::{Engine, Firewall, KernelError, TableDump};

const SERVICES: usize = 10_000;
const FINALIZER: &str = "kube-port-forward-controller/finalizer";

fn manifest_yaml() -> String {
    (0..SERVICES)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: ns-{}\n  uid: 00000000-0000-4000-8000-{i:012}\n  creationTimestamp: \"2026-01-01T00:00:00Z\"\n  annotations:\n    kube-port-forward-controller/mapping: \"{}:http, {}:dns\"\nspec:\n  type: LoadBalancer\n  ports:\n    - {{name: http, port: 80, protocol: TCP}}\n    - {{name: dns, port: 53, protocol: UDP}}\nstatus:\n  loadBalancer:\n    ingress:\n      - ip: 10.{}.{}.{}\n---\n",
                i % 50,
                10_000 + i,
                30_000 + i,
                i / 65536,
                (i / 256) % 256,
                i % 256
            )
        })
        .collect()
}

/// Median and minimum of `runs` timings of `f`.
fn measure<T>(name: &str, runs: usize, mut f: impl FnMut() -> T) {
    measure_prepared(name, runs, || (), |()| f());
}

/// Median and minimum of `runs` timings of `f`, each handed what `prepare` made for it
/// untimed.
fn measure_prepared<P, T>(
    name: &str,
    runs: usize,
    mut prepare: impl FnMut() -> P,
    mut f: impl FnMut(P) -> T,
) {
    // `cargo bench --bench plan -- WORD` runs only the measurements whose name has WORD.
    if let Some(filter) = std::env::args().skip(1).find(|a| !a.starts_with('-'))
        && !name.contains(&filter)
    {
        return;
    }
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let prepared = prepare();
            let start = Instant::now();
            black_box(f(prepared));
            start.elapsed()
        })
        .collect();
    times.sort();
    println!(
        "{name:<60} median {:>9.3} ms   min {:>9.3} ms   ({runs} runs)",
        times[runs / 2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3
    );
}

fn main() {
    let yaml = manifest_yaml();
    println!(
        "{SERVICES} Services, {} forwards; manifest {} KiB",
        2 * SERVICES,
        yaml.len() / 1024
    );
    measure("read manifests (YAML, 10,000 documents)", 5, || {
        manifest::parse("bench.yaml", &yaml).unwrap()
    });
    let services: Vec<Service> = manifest::parse("bench.yaml", &yaml).unwrap().services;
    measure(
        "plan: parse annotations, resolve, choose winners",
        11,
        || plan::plan(&services, &Policy::default()),
    );
    let planned = plan::plan(&services, &Policy::default());
    assert_eq!(planned.forwards.len(), 2 * SERVICES);
    incremental(&services, &planned);
    let config = TableConfig::new(
        DEFAULT_TABLE,
        ["wan".to_owned()],
        ["203.0.113.1".parse().unwrap()],
    )
    .unwrap();
    let desired = Ruleset::new(config, planned.forwards.clone());
    let kernel = desired.as_kernel();
    measure("diff against a full kernel read (no change)", 11, || {
        assert_eq!(desired.diff(Some(&kernel)), Change::Nothing)
    });
    let mut changed_services = services.clone();
    changed_services[SERVICES / 2].ingress_ips = vec!["10.200.0.1".into()];
    let changed = Ruleset::new(
        desired.config.clone(),
        plan::plan(&changed_services, &Policy::default()).forwards,
    );
    measure(
        "diff against the applied ruleset (one Service changed)",
        11,
        || {
            let Change::Update(update) = changed.diff_applied(&desired) else {
                panic!("expected an update")
            };
            assert_eq!(update.add_addrs.len(), 2);
        },
    );
    measure("build the transaction for one changed Service", 11, || {
        changed.transaction(&changed.diff_applied(&desired))
    });
    measure(
        "build the full transaction (JSON, 20,000 elements)",
        5,
        || desired.transaction(&Change::Rebuild(String::new())),
    );
    measure("render the nft script (20,000 elements)", 5, || {
        desired.render()
    });
    engine(&desired);
}

/// A firewall that holds the table it starts with and takes every batch: what the engine
/// costs in user space, without the kernel's part.
struct Memory {
    table: TableDump,
    generation: u32,
}

impl Firewall for Memory {
    fn generation(&mut self) -> Result<u32, KernelError> {
        Ok(self.generation)
    }

    fn read(&mut self, _table: &str, _sets: &[&str]) -> Result<Option<TableDump>, KernelError> {
        Ok(Some(self.table.clone()))
    }

    fn commit(
        &mut self,
        _table: &str,
        _changes: &[SetChange],
        _generation: Option<u32>,
    ) -> Result<Vec<(String, Elem)>, KernelError> {
        self.generation += 1;
        Ok(Vec::new())
    }

    fn run(&mut self, _transaction: &str) -> Result<(), KernelError> {
        unreachable!("the table it holds is the one applied: nothing is rebuilt")
    }

    fn close_flows(
        &mut self,
        _closing: &[(ForwardKey, Option<IpAddr>)],
        _mark: u32,
    ) -> Result<usize, KernelError> {
        Ok(0)
    }
}

/// One forward's backend changes and changes back, over and over, at 20,000 forwards: the
/// engine's whole apply (the ruleset handed over is built untimed) against its apply of
/// the changed key alone.
fn engine(desired: &Ruleset) {
    let engine = || {
        let mut engine = Engine::new(Memory {
            table: desired.as_dump(1),
            generation: 1,
        });
        engine.apply(desired.clone()).unwrap();
        engine
    };
    let key = *desired
        .forwards
        .keys()
        .nth(desired.forwards.len() / 2)
        .unwrap();
    let mut moved = desired.clone();
    moved.forwards.get_mut(&key).unwrap().backends = vec!["10.200.0.1".parse().unwrap()];
    let rounds = [desired, &moved];
    let mut whole = engine();
    let mut turn = 0;
    measure_prepared(
        "engine: apply one changed forward at 20,000 (apply)",
        1001,
        || {
            turn += 1;
            rounds[turn % 2].clone()
        },
        |next| assert_eq!(whole.apply(next).unwrap().added.len(), 1),
    );
    let mut delta = engine();
    let changed = BTreeSet::from([key]);
    let mut turn = 0;
    measure(
        "engine: apply one changed forward at 20,000 (apply_changed)",
        1001,
        || {
            turn += 1;
            let next = rounds[turn % 2];
            let applied = delta.apply_changed(&next.config, &next.forwards, &changed);
            assert_eq!(applied.unwrap().added.len(), 1);
        },
    );
    let now = delta.applied().unwrap().clone();
    let nothing = BTreeSet::new();
    measure(
        "engine: nothing changed at 20,000 (apply_changed)",
        1001,
        || {
            let applied = delta.apply_changed(&now.config, &now.forwards, &nothing);
            assert!(!applied.unwrap().sent);
        },
    );
}

/// The planner kept up to date one event at a time, at 10,000 Services: what one watch
/// event costs the core, whether it moves a forward or not.
fn incremental(services: &[Service], whole: &Plan) {
    let mut planner = Planner::new(Policy::default());
    measure("planner: take in 10,000 Services one by one", 5, || {
        let mut planner = Planner::new(Policy::default());
        for service in services {
            planner.upsert(service);
        }
        planner
    });
    for service in services {
        planner.upsert(service);
    }
    assert_eq!(planner.plan(), *whole);
    planner.take_changes();
    let mut moved = services[SERVICES / 2].clone();
    let addresses = [moved.ingress_ips.clone(), vec!["10.200.0.1".to_owned()]];
    let mut turn = 0;
    measure(
        "planner: one Service's address changes (2 forwards move)",
        1001,
        || {
            turn += 1;
            moved.ingress_ips = addresses[turn % 2].clone();
            planner.upsert(&moved);
            let changes = planner.take_changes();
            assert_eq!(changes.forwards.len(), 2);
        },
    );
    let mut quiet = services[SERVICES / 3].clone();
    measure(
        "planner: one Service changes nothing the router forwards",
        1001,
        || {
            quiet.created = quiet.created.take();
            planner.upsert(&quiet);
            let changes = planner.take_changes();
            assert!(changes.forwards.is_empty());
        },
    );
    let taken = services[SERVICES / 4].clone();
    let name = (taken.namespace.clone(), taken.name.clone());
    measure(
        "planner: one Service deleted and created again",
        1001,
        || {
            planner.remove(&name);
            planner.upsert(&taken);
            planner.take_changes()
        },
    );
    measure("planner: the whole plan out of the planner", 11, || {
        planner.plan()
    });
    let store: Store = services
        .iter()
        .map(|service| {
            let key = (service.namespace.clone(), service.name.clone());
            let tracked = Tracked {
                uid: service.uid.clone().unwrap_or_default(),
                resource_version: None,
                finalizers: vec![FINALIZER.to_owned()],
                terminating: false,
                annotated: true,
                out_of_scope: false,
                conditions: Vec::new(),
                dns: Default::default(),
                service: Ok(service.clone()),
            };
            (key, tracked)
        })
        .collect();
    let every: BTreeSet<(String, String)> = store.keys().cloned().collect();
    let mut finalizers = decide::Finalizers::default();
    measure("decide: every one of 10,000 (a first round)", 11, || {
        decide::decide(&store, FINALIZER, &planner, &mut finalizers, &every, &every)
    });
    let one: BTreeSet<(String, String)> = every.iter().take(1).cloned().collect();
    measure("decide: one changed Service among 10,000", 1001, || {
        decide::decide(&store, FINALIZER, &planner, &mut finalizers, &one, &one)
    });
    measure("status entries of 20,000 outcomes", 11, || {
        status::entries(planner.outcomes(), &Default::default())
    });
}
