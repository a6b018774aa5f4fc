//! What the commands print: the plan and the kernel table, as text for people and as JSON
//! for scripts. Pure: each function returns the text.

use serde::Serialize;

use crate::cli::manifest::Manifests;
use crate::core::model::{ForwardKey, Target, targets_text};
use crate::core::plan::{Outcome, Plan, State};
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
fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (index, cell) in row.iter().enumerate() {
            if index + 1 == N {
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

fn status_forwards(table: &KernelTable) -> Vec<StatusForward> {
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
pub fn status_text(name: &str, table: Option<&KernelTable>) -> String {
    let Some(table) = table else {
        return format!("table inet {name} is not present: no forwards\n");
    };
    let mut out = format!(
        "table inet {name}: {} forwards; WAN interfaces: {}; WAN addresses: {}\n",
        table.keys().len(),
        list_or_any(table.wan_interfaces.iter().map(ToString::to_string)),
        list_or_any(table.wan_addresses.iter().map(ToString::to_string)),
    );
    if let Some(problem) = &table.shape_problem {
        out.push_str(&format!(
            "warning: the table is not of the expected shape ({problem}); the next apply rebuilds it\n"
        ));
    }
    let mut rows = vec![[
        "EXTERNAL".to_owned(),
        "TARGET".to_owned(),
        "PACKETS".to_owned(),
        "BYTES".to_owned(),
        "OWNER".to_owned(),
    ]];
    for forward in status_forwards(table) {
        rows.push([
            forward.key.to_string(),
            forward
                .backends
                .as_deref()
                .map_or_else(|| "(incomplete)".into(), backends_text),
            forward.packets.map(|p| p.to_string()).unwrap_or_default(),
            forward.bytes.map(|b| b.to_string()).unwrap_or_default(),
            forward.owner.unwrap_or_default(),
        ]);
    }
    out.push('\n');
    out.push_str(&columns(&rows));
    out
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
}

/// `status --output json`.
pub fn status_json(name: &str, table: Option<&KernelTable>) -> String {
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
        forwards: table.map(status_forwards).unwrap_or_default(),
    };
    serde_json::to_string_pretty(&value).expect("the status serializes") + "\n"
}
