//! What the commands print: the plan and the kernel table, as text for people and as JSON
//! for scripts. Pure: each function returns the text.

use serde::Serialize;

use crate::cli::manifest::Manifests;
use crate::core::model::{ForwardKey, Target, targets_text};
use crate::core::plan::{Outcome, Plan, State};
use crate::core::upstream::Mapping;
use crate::kernel::{KernelTable, Ruleset};

/// `plan` as text: the forwards with their states, then the nft table.
pub fn plan_text(plan: &Plan, manifests: &Manifests, ruleset: &Ruleset) -> String {
    let mut rows = vec![[
        "STATE".to_owned(),
        "EXTERNAL".to_owned(),
        "TARGET".to_owned(),
        "CHECK".to_owned(),
        "OWNER".to_owned(),
        "REASON".to_owned(),
    ]];
    for outcome in &plan.outcomes {
        rows.push([
            state_word(outcome.state).to_owned(),
            outcome
                .key
                .map(|k| k.to_string())
                .unwrap_or_else(|| "-".into()),
            if outcome.backends.is_empty() {
                "-".into()
            } else {
                targets_text(outcome.backends.iter().copied())
            },
            outcome
                .probe
                .map_or_else(|| "-".to_owned(), |p| p.to_string()),
            owner_text(outcome),
            outcome.reason.clone().unwrap_or_default(),
        ]);
    }
    let mut out = format!(
        "Forwards: {} forwarding, {} conflict, {} invalid, {} waiting, {} refused; {} objects unreadable, {} of other kinds skipped\n\n",
        plan.count(State::Forwarding),
        plan.count(State::Conflict),
        plan.count(State::Invalid),
        plan.count(State::Waiting),
        plan.count(State::Refused),
        manifests.refused.len(),
        manifests.skipped
    );
    out.push_str(&columns(&rows));
    for refused in &manifests.refused {
        out.push_str(&format!("unreadable: {refused}\n"));
    }
    if ruleset.config.wan_interfaces.is_empty() && ruleset.config.wan_addresses.is_empty() {
        out.push_str(
            "\nnote: no --wan-interface or --wan-address given, so this table matches packets to any\naddress of the router on any interface; `apply` and the daemon require one of them.\n",
        );
    }
    out.push_str(
        "\nnote: plan cannot see the ports a router itself serves on its WAN side (SSH, WireGuard, its web\ninterface); `apply` and the daemon refuse forwards on those unless --allow-ports names them.\n",
    );
    out.push_str(&format!(
        "\nThe nft table it would apply (`nft -f` syntax):\n\n{}",
        ruleset.render()
    ));
    out
}

fn state_word(state: State) -> &'static str {
    match state {
        State::Forwarding => "forwarding",
        State::Conflict => "conflict",
        State::Invalid => "invalid",
        State::Waiting => "waiting",
        State::Refused => "refused",
    }
}

fn owner_text(outcome: &Outcome) -> String {
    let entry = match &outcome.service_port {
        Some(port) => port.clone(),
        None => format!("\"{}\"", outcome.entry),
    };
    format!("{}/{}:{}", outcome.namespace, outcome.name, entry)
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn columns<R: AsRef<[String]>>(rows: &[R]) -> String {
    let count = rows.first().map_or(0, |r| r.as_ref().len());
    let mut widths = vec![0; count];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row.as_ref()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (index, cell) in row.as_ref().iter().enumerate() {
            if index + 1 == count {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[index]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[derive(Serialize)]
struct PlanJson<'a> {
    forwards: &'a [Outcome],
    refused: Vec<RefusedJson>,
    skipped: usize,
    ruleset: String,
    nft_json: serde_json::Value,
}

#[derive(Serialize)]
struct RefusedJson {
    file: String,
    object: String,
    field: String,
    message: String,
}

/// `plan --output json`.
pub fn plan_json(plan: &Plan, manifests: &Manifests, ruleset: &Ruleset) -> String {
    let transaction = ruleset
        .transaction(&crate::kernel::Change::Rebuild(String::new()))
        .expect("a rebuild has a transaction");
    let value = PlanJson {
        forwards: &plan.outcomes,
        refused: manifests
            .refused
            .iter()
            .map(|r| RefusedJson {
                file: r.file.clone(),
                object: r.error.object.clone(),
                field: r.error.field.clone(),
                message: r.error.message.clone(),
            })
            .collect(),
        skipped: manifests.skipped,
        ruleset: ruleset.render(),
        nft_json: serde_json::from_str(&transaction).expect("the transaction is JSON"),
    };
    serde_json::to_string_pretty(&value).expect("the plan serializes") + "\n"
}

#[derive(Serialize)]
struct StatusForward {
    #[serde(flatten)]
    key: ForwardKey,
    /// Every backend, `None` when the table lacks the forward's port or address.
    backends: Option<Vec<StatusBackend>>,
    owner: Option<String>,
    packets: Option<u64>,
    bytes: Option<u64>,
    /// What the upstream IGD said of this forward's mapping, when the daemon maps them.
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct StatusBackend {
    target: Target,
    /// `down` when a health check took it out of the choice; else `serving`.
    health: &'static str,
    /// Of the forward's buckets, how many send new flows here (forwards with several).
    #[serde(skip_serializing_if = "Option::is_none")]
    buckets: Option<usize>,
}

fn status_forwards(table: &KernelTable, upstream: Option<&Upstream>) -> Vec<StatusForward> {
    table
        .keys()
        .into_iter()
        .map(|key| {
            let port = table.ports.get(&key);
            let choice = table.choice(&key);
            let down = table.down_of(&key);
            let several = !table.addrs.contains_key(&key);
            let addrs = table.backends(&key);
            let backends = port.filter(|_| !addrs.is_empty()).map(|port| {
                addrs
                    .iter()
                    .map(|&addr| StatusBackend {
                        target: Target {
                            addr,
                            port: port.value,
                        },
                        health: if down.contains(&addr) && !choice.contains(&addr) {
                            "down"
                        } else if down.contains(&addr) {
                            "down, kept: all are down"
                        } else {
                            "serving"
                        },
                        buckets: several.then(|| {
                            table
                                .picks
                                .iter()
                                .filter(|((k, _), a)| *k == key && **a == addr)
                                .count()
                        }),
                    })
                    .collect()
            });
            let counter = table.counters.get(&key);
            StatusForward {
                key,
                backends,
                owner: port.and_then(|p| p.comment.clone()),
                packets: counter.map(|c| c.0),
                bytes: counter.map(|c| c.1),
                upstream: upstream.and_then(|u| u.mapping(&key)),
            }
        })
        .collect()
}

/// A forward's backends in a column: `10.0.0.1:80,10.0.0.2:80(down)`.
fn backends_text(backends: &[StatusBackend]) -> String {
    backends
        .iter()
        .map(|b| match b.health {
            "serving" => b.target.to_string(),
            _ => format!("{}(down)", b.target),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `status` as text: the daemon, the table, then the entries not forwarded and why.
pub fn status_text(
    name: &str,
    table: Option<&KernelTable>,
    upstream: Option<&Upstream>,
    daemon: &DaemonView,
) -> String {
    let mut out = daemon.summary();
    out.push('\n');
    out.push_str(&table_text(name, table, upstream));
    out.push_str(&daemon.not_forwarded());
    out
}

fn table_text(name: &str, table: Option<&KernelTable>, upstream: Option<&Upstream>) -> String {
    let Some(table) = table else {
        return format!("table inet {name} is not present: no forwards\n");
    };
    let mut out = format!(
        "table inet {name}: {} forwards; WAN interfaces: {}; WAN addresses: {}\n",
        table.keys().len(),
        list_or_any(table.wan_interfaces.iter().map(ToString::to_string)),
        list_or_any(table.wan_addresses.iter().map(ToString::to_string)),
    );
    if let Some(upstream) = upstream {
        out.push_str(&upstream.summary());
        out.push('\n');
    }
    if let Some(problem) = &table.shape_problem {
        out.push_str(&format!(
            "warning: the table is not of the expected shape ({problem}); the next apply rebuilds it\n"
        ));
    }
    let mut header = ["EXTERNAL", "TARGET", "PACKETS", "BYTES", "OWNER"]
        .map(str::to_owned)
        .to_vec();
    if upstream.is_some() {
        header.push("UPSTREAM".to_owned());
    }
    let mut rows = vec![header];
    for forward in status_forwards(table, upstream) {
        let mut row = vec![
            forward.key.to_string(),
            forward
                .backends
                .as_deref()
                .map_or_else(|| "(incomplete)".into(), backends_text),
            forward.packets.map(|p| p.to_string()).unwrap_or_default(),
            forward.bytes.map(|b| b.to_string()).unwrap_or_default(),
            forward.owner.unwrap_or_default(),
        ];
        if upstream.is_some() {
            row.push(
                forward
                    .upstream
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), mapping_word),
            );
        }
        rows.push(row);
    }
    out.push('\n');
    out.push_str(&columns(&rows));
    out
}

/// A mapping's state in a column: `mapped`, `refused 718 ConflictInMappingEntry`, `pending`.
fn mapping_word(state: &serde_json::Value) -> String {
    let word = state["state"].as_str().unwrap_or("unknown");
    match (state["code"].as_u64(), state["reason"].as_str()) {
        (Some(code), Some(reason)) => format!("{word} {code} {reason}"),
        _ => word.to_owned(),
    }
}

/// What the daemon last wrote of the upstream IGD (`run --upstream`), read by `status`.
pub struct Upstream {
    state: serde_json::Value,
    /// The daemon that wrote it still runs.
    running: bool,
}

/// A file the daemon writes for `status`, and whether the process that wrote it still runs.
fn read_written(path: &std::path::Path) -> Option<(serde_json::Value, bool)> {
    let text = std::fs::read_to_string(path).ok()?;
    let state: serde_json::Value = serde_json::from_str(&text).ok()?;
    let running = state["pid"]
        .as_u64()
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
    Some((state, running))
}

impl Upstream {
    /// The state file, if the daemon wrote one.
    pub fn read(path: &std::path::Path) -> Option<Upstream> {
        let (state, running) = read_written(path)?;
        Some(Upstream { state, running })
    }

    /// One line: where the IGD is, whether it answers, its external address.
    fn summary(&self) -> String {
        let s = &self.state;
        let igd = s["igd"].as_str().unwrap_or("(not found)");
        let mut line = format!("upstream IGD {igd}: ");
        if s["reachable"].as_bool() == Some(true) {
            line.push_str("answering");
        } else {
            line.push_str(&format!(
                "not answering ({})",
                s["error"].as_str().unwrap_or("not asked yet")
            ));
        }
        if let Some(external) = s["external"].as_str() {
            line.push_str(&format!("; external address {external}"));
        }
        if let Some(internal) = s["internal"].as_str() {
            line.push_str(&format!("; maps to {internal}"));
        }
        if !self.running {
            line.push_str(" (as last written: the daemon is not running)");
        }
        line
    }

    /// What the IGD said of a forward's mapping.
    fn mapping(&self, key: &ForwardKey) -> Option<serde_json::Value> {
        let mapping = Mapping::of(key)?;
        self.state["mappings"]
            .as_array()?
            .iter()
            .find(|m| {
                m["port"].as_u64() == Some(u64::from(mapping.port))
                    && m["protocol"] == serde_json::json!(mapping.protocol)
            })
            .cloned()
            .or_else(|| Some(serde_json::json!({"state": "pending"})))
    }

    fn json(&self) -> serde_json::Value {
        let mut state = self.state.clone();
        if let Some(map) = state.as_object_mut() {
            map.remove("mappings");
            map.remove("pid");
            map.insert("running".into(), self.running.into());
        }
        state
    }
}

/// The daemon's status file (`run --status-file`), as `status` found it.
pub struct Written {
    state: serde_json::Value,
    /// The daemon that wrote it still runs.
    running: bool,
}

impl Written {
    /// The status file, if a daemon wrote one.
    pub fn read(path: &std::path::Path) -> Option<Written> {
        let (state, running) = read_written(path)?;
        Some(Written { state, running })
    }

    /// Where the daemon serves `/readyz` and `/metrics`, if it runs and serves them.
    pub fn health(&self) -> Option<&str> {
        self.state["health"].as_str().filter(|_| self.running)
    }
}

/// What `status` asked the daemon's health server: its answer to `/readyz`, then to
/// `/metrics`, each a status code and body, or why there is none.
pub struct Asked {
    pub readyz: Result<(u16, String), String>,
    pub metrics: Result<(u16, String), String>,
}

/// `status --output json`'s `daemon`.
#[derive(Debug, Default, PartialEq, Serialize)]
pub struct DaemonJson {
    /// The status file exists and the process that wrote it runs.
    running: bool,
    pid: Option<u32>,
    health: Option<String>,
    /// `/readyz` answered 200 (true) or 503 (false); null when it could not be asked.
    ready: Option<bool>,
    /// The first line of `/readyz`'s answer, or why it could not be asked.
    readyz: Option<String>,
    /// Unix seconds: when the table was last in step with the cluster.
    last_sync: Option<u64>,
    started: Option<u64>,
}

const NOT_RUNNING: &str = "the daemon is not running";

/// What `status` knows of the daemon: its status file and its health server's answers.
pub struct DaemonView {
    daemon: DaemonJson,
    /// Unix seconds, when `status` asked.
    now: u64,
    /// Every annotated Service's entries, as the daemon last wrote them.
    services: Vec<serde_json::Value>,
}

impl DaemonView {
    /// From the status file, what was asked of the daemon (`None`: nothing, it runs no
    /// health server or does not run) and the time now, in Unix seconds.
    pub fn new(written: Option<&Written>, asked: Option<&Asked>, now: u64) -> DaemonView {
        let Some(written) = written else {
            return DaemonView {
                daemon: DaemonJson {
                    readyz: Some(NOT_RUNNING.into()),
                    ..DaemonJson::default()
                },
                now,
                services: Vec::new(),
            };
        };
        let state = &written.state;
        let (ready, readyz) = match asked.map(|a| &a.readyz) {
            Some(Ok((200, body))) => (Some(true), first_line(body)),
            Some(Ok((503, body))) => (Some(false), first_line(body)),
            Some(Ok((code, _))) => (None, Some(format!("answered HTTP {code}"))),
            Some(Err(why)) => (None, Some(why.clone())),
            None if !written.running => (None, Some(NOT_RUNNING.into())),
            None => (None, Some("the daemon serves no --health address".into())),
        };
        let last_sync = match asked.map(|a| &a.metrics) {
            Some(Ok((200, body))) => {
                seconds_since_sync(body).map(|seconds| now.saturating_sub(seconds.round() as u64))
            }
            _ => None,
        };
        DaemonView {
            daemon: DaemonJson {
                running: written.running,
                pid: state["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
                health: state["health"].as_str().map(str::to_owned),
                ready,
                readyz,
                last_sync,
                started: state["started"].as_u64(),
            },
            now,
            services: state["services"].as_array().cloned().unwrap_or_default(),
        }
    }

    /// One line: whether the daemon runs and is ready, and when the table was in step.
    fn summary(&self) -> String {
        let d = &self.daemon;
        let pid = d.pid.map_or_else(String::new, |p| format!(" (pid {p})"));
        if !d.running {
            return match d.pid {
                Some(_) => {
                    format!("daemon: not running{pid}; the entries below are as it last wrote them")
                }
                None => "daemon: not running".to_owned(),
            };
        }
        let readiness = match (d.ready, &d.readyz) {
            (Some(true), _) => "ready".to_owned(),
            (Some(false), why) => format!("not ready ({})", why.as_deref().unwrap_or("")),
            (None, why) => format!("readiness unknown ({})", why.as_deref().unwrap_or("")),
        };
        let mut line = format!("daemon: running{pid}, {readiness}");
        if let Some(at) = d.last_sync {
            let ago = self.now.saturating_sub(at);
            line.push_str(&format!("; the table was in step {ago} s ago"));
        }
        line
    }

    /// The entries not forwarded, with their reasons; nothing when all are.
    fn not_forwarded(&self) -> String {
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
        let mut rows = vec![["STATE", "SERVICE", "ENTRY", "REASON"].map(str::to_owned)];
        for entry in &self.services {
            if entry["state"] == "forwarding" {
                continue;
            }
            rows.push([
                text(&entry["state"]),
                format!("{}/{}", text(&entry["namespace"]), text(&entry["name"])),
                text(&entry["entry"]),
                text(&entry["reason"]),
            ]);
        }
        if rows.len() == 1 {
            return String::new();
        }
        format!("\nNot forwarded:\n{}", columns(&rows))
    }
}

fn first_line(body: &str) -> Option<String> {
    Some(body.lines().next().unwrap_or_default().to_owned())
}

/// `kube_port_forward_seconds_since_last_sync` from the metrics, when the daemon has synced.
fn seconds_since_sync(metrics: &str) -> Option<f64> {
    let value = |name: &str| {
        metrics.lines().find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
    };
    if value("kube_port_forward_synced") != Some(1.0) {
        return None;
    }
    value("kube_port_forward_seconds_since_last_sync").filter(|s| s.is_finite() && *s >= 0.0)
}

fn list_or_any(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        "(any)".into()
    } else {
        items.join(", ")
    }
}

#[derive(Serialize)]
struct StatusJson<'a> {
    table: String,
    present: bool,
    shape_problem: Option<String>,
    wan_interfaces: Vec<String>,
    wan_addresses: Vec<String>,
    forwards: Vec<StatusForward>,
    /// The upstream IGD, as the daemon last wrote: where, whether it answers, its external
    /// address.
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<serde_json::Value>,
    daemon: &'a DaemonJson,
    /// Every annotated Service's entries, from the daemon's status file.
    services: &'a [serde_json::Value],
}

/// `status --output json`.
pub fn status_json(
    name: &str,
    table: Option<&KernelTable>,
    upstream: Option<&Upstream>,
    daemon: &DaemonView,
) -> String {
    let value = StatusJson {
        table: name.to_owned(),
        present: table.is_some(),
        shape_problem: table.and_then(|t| t.shape_problem.clone()),
        wan_interfaces: table
            .map(|t| t.wan_interfaces.iter().cloned().collect())
            .unwrap_or_default(),
        wan_addresses: table
            .map(|t| t.wan_addresses.iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        forwards: table
            .map(|t| status_forwards(t, upstream))
            .unwrap_or_default(),
        upstream: upstream.map(Upstream::json),
        daemon: &daemon.daemon,
        services: &daemon.services,
    };
    serde_json::to_string_pretty(&value).expect("the status serializes") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn written(running: bool) -> Written {
        Written {
            state: json!({"pid": 7, "health": "127.0.0.1:9477", "started": 1000, "written": 1010,
                "services": [{"namespace": "apps", "name": "ssh", "entry": "2222:ssh",
                    "state": "refused", "reason": "port 2222 is not allowed (policy)"}]}),
            running,
        }
    }

    #[test]
    fn a_ready_daemon_with_its_last_sync_from_the_metrics() {
        let asked = Asked {
            readyz: Ok((200, "ready\n".into())),
            metrics: Ok((
                200,
                "kube_port_forward_synced 1\nkube_port_forward_seconds_since_last_sync 4.6\n"
                    .into(),
            )),
        };
        let view = DaemonView::new(Some(&written(true)), Some(&asked), 2000);
        assert_eq!(
            serde_json::to_value(&view.daemon).unwrap(),
            json!({"running": true, "pid": 7, "health": "127.0.0.1:9477", "ready": true,
                "readyz": "ready", "last_sync": 1995, "started": 1000})
        );
        assert_eq!(view.services.len(), 1);
        let text = view.summary() + &view.not_forwarded();
        assert!(text.starts_with("daemon: running (pid 7), ready; the table was in step 5 s ago"));
        assert!(text.contains("refused  apps/ssh  2222:ssh  port 2222 is not allowed (policy)"));
    }

    #[test]
    fn not_ready_never_synced_unreachable_or_stopped() {
        let never = Asked {
            readyz: Ok((503, "not synced, or the last apply failed\n".into())),
            metrics: Ok((
                200,
                "kube_port_forward_synced 0\nkube_port_forward_seconds_since_last_sync 9\n".into(),
            )),
        };
        let view = DaemonView::new(Some(&written(true)), Some(&never), 2000);
        assert_eq!(view.daemon.ready, Some(false));
        assert_eq!(view.daemon.last_sync, None);
        let refused = Asked {
            readyz: Err("connection refused".into()),
            metrics: Err("connection refused".into()),
        };
        let view = DaemonView::new(Some(&written(true)), Some(&refused), 2000);
        assert_eq!(view.daemon.ready, None);
        assert_eq!(view.daemon.readyz.as_deref(), Some("connection refused"));
        let stopped = DaemonView::new(Some(&written(false)), None, 2000);
        assert!(!stopped.daemon.running);
        assert_eq!(stopped.services.len(), 1, "as last written");
        let none = DaemonView::new(None, None, 2000);
        assert_eq!(none.daemon.pid, None);
        assert!(none.services.is_empty());
    }
}
