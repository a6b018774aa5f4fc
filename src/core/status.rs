//! What the daemon tells `status` (and, through it, the LuCI page) of its last plan: every
//! annotated Service's entries in every state, with their reasons, and the external-dns
//! target it writes on each. Pure: built from the plan and serialized as the status file.

use std::collections::HashMap;

use serde::Serialize;

use crate::core::plan::Outcome;

/// One entry of a Service's annotation as `plan --output json` shows it, and the DNS target
/// the daemon writes on that Service, when it does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    #[serde(flatten)]
    pub outcome: Outcome,
    pub dns_target: Option<String>,
}

/// The status file: which daemon wrote it, where it serves `/readyz`, and its entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatusFile {
    pub pid: u32,
    /// The `--health` address, where `status` asks whether the daemon is ready.
    pub health: Option<String>,
    /// Unix seconds: when the daemon started, and when it wrote this.
    pub started: u64,
    pub written: u64,
    pub services: Vec<ServiceEntry>,
}

/// The plan's entries, each with the DNS target written on its Service (by namespace and
/// name).
pub fn entries<'a>(
    outcomes: impl Iterator<Item = &'a Outcome>,
    dns_targets: &HashMap<(String, String), String>,
) -> Vec<ServiceEntry> {
    outcomes
        .map(|outcome| ServiceEntry {
            dns_target: dns_targets
                .get(&(outcome.namespace.clone(), outcome.name.clone()))
                .cloned(),
            outcome: outcome.clone(),
        })
        .collect()
}

impl StatusFile {
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the status serializes") + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::Target;
    use crate::core::plan::{Plan, State};
    use serde_json::json;

    fn outcome(name: &str, state: State, reason: Option<&str>) -> Outcome {
        Outcome {
            namespace: "apps".into(),
            name: name.into(),
            entry: "80:http".into(),
            key: None,
            backends: vec![],
            probe: None,
            down: vec![],
            service_port: Some("http".into()),
            state,
            reason: reason.map(str::to_owned),
            winner: None,
        }
    }

    #[test]
    fn each_entry_is_the_plans_outcome_with_its_services_dns_target() {
        let mut forwarding = outcome("web", State::Forwarding, None);
        forwarding.backends = vec![Target {
            addr: "192.168.50.10".parse().unwrap(),
            port: 8080,
        }];
        let plan = Plan {
            outcomes: vec![
                forwarding,
                outcome("idle", State::Waiting, Some("no LoadBalancer address yet")),
            ],
            ..Plan::default()
        };
        let targets = HashMap::from([(("apps".into(), "web".into()), "203.0.113.1".into())]);
        let file = StatusFile {
            pid: 42,
            health: Some("127.0.0.1:9477".into()),
            started: 1_700_000_000,
            written: 1_700_000_005,
            services: entries(plan.outcomes.iter(), &targets),
        };
        let value: serde_json::Value = serde_json::from_str(&file.json()).unwrap();
        assert_eq!(
            value,
            json!({
                "pid": 42,
                "health": "127.0.0.1:9477",
                "started": 1_700_000_000u64,
                "written": 1_700_000_005u64,
                "services": [
                    {"namespace": "apps", "name": "web", "entry": "80:http", "key": null,
                     "backends": [{"addr": "192.168.50.10", "port": 8080}],
                     "service_port": "http", "state": "forwarding", "reason": null,
                     "winner": null, "dns_target": "203.0.113.1"},
                    {"namespace": "apps", "name": "idle", "entry": "80:http", "key": null,
                     "backends": [], "service_port": "http", "state": "waiting",
                     "reason": "no LoadBalancer address yet", "winner": null,
                     "dns_target": null},
                ],
            })
        );
    }
}
