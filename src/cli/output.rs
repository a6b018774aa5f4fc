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

/// `status` as text.
pub fn status_text(name: &str, table: Option<&KernelTable>, upstream: Option<&Upstream>) -> String {
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

impl Upstream {
    /// The state file, if the daemon wrote one.
    pub fn read(path: &std::path::Path) -> Option<Upstream> {
        let text = std::fs::read_to_string(path).ok()?;
        let state: serde_json::Value = serde_json::from_str(&text).ok()?;
        let running = state["pid"]
            .as_u64()
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
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

fn list_or_any(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        "(any)".into()
    } else {
        items.join(", ")
    }
}

#[derive(Serialize)]
struct StatusJson {
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
}

/// `status --output json`.
pub fn status_json(name: &str, table: Option<&KernelTable>, upstream: Option<&Upstream>) -> String {
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
    };
    serde_json::to_string_pretty(&value).expect("the status serializes") + "\n"
}
