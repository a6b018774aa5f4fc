//! The few fields of a Kubernetes Node that NodePort forwarding needs, decoded leniently:
//! its name, its InternalIP addresses, whether it is Ready, excluded from external load
//! balancers, or being deleted.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `node.kubernetes.io/exclude-from-external-load-balancers`: a node with this label (any
/// value) takes no traffic from external load balancers, as the service controller has it.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// A Node as the core sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// `status.addresses[]` of type InternalIP, as given (checked by the planner).
    pub internal_ips: Vec<String>,
    /// The Ready condition is `True`.
    pub ready: bool,
    pub excluded: bool,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

/// Nodes by name.
pub type Nodes = BTreeMap<String, Node>;

#[derive(Default, Deserialize)]
struct NodeObject {
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    status: Status,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    name: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    deletion_timestamp: Option<String>,
}

#[derive(Default, Deserialize)]
struct Status {
    #[serde(default)]
    addresses: Option<Vec<Address>>,
    #[serde(default)]
    conditions: Option<Vec<Condition>>,
}

#[derive(Deserialize)]
struct Address {
    #[serde(rename = "type")]
    kind: Option<String>,
    address: Option<String>,
}

#[derive(Deserialize)]
struct Condition {
    #[serde(rename = "type")]
    kind: Option<String>,
    status: Option<String>,
}

impl Node {
    /// Reads a Node object; what cannot be read makes it ineligible, never an error: a Node
    /// the daemon does not understand takes no traffic.
    pub fn decode(value: serde_json::Value) -> Option<Node> {
        let object: NodeObject = serde_json::from_value(value).ok()?;
        let status = object.status;
        Some(Node {
            name: object.metadata.name?,
            internal_ips: status
                .addresses
                .unwrap_or_default()
                .into_iter()
                .filter(|a| a.kind.as_deref() == Some("InternalIP"))
                .filter_map(|a| a.address)
                .collect(),
            ready: status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.kind.as_deref() == Some("Ready") && c.status.as_deref() == Some("True")),
            excluded: object
                .metadata
                .labels
                .is_some_and(|labels| labels.contains_key(EXCLUDE_LABEL)),
            deleting: object.metadata.deletion_timestamp.is_some(),
        })
    }

    /// Whether forwards may go to this node's node ports.
    pub fn eligible(&self) -> bool {
        self.ready && !self.excluded && !self.deleting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ready_internal_addresses_of_nodes_not_excluded_or_deleted() {
        let node = |labels: serde_json::Value, ready: &str, deleting: bool| {
            let mut metadata = json!({"name": "n1", "labels": labels});
            if deleting {
                metadata["deletionTimestamp"] = json!("2026-11-29T12:00:00Z");
            }
            Node::decode(json!({"kind": "Node", "metadata": metadata, "status": {
                "addresses": [{"type": "InternalIP", "address": "192.168.1.21"},
                              {"type": "Hostname", "address": "n1"},
                              {"type": "InternalIP", "address": "fd00::21"},
                              {"type": "ExternalIP", "address": "203.0.113.9"}],
                "conditions": [{"type": "MemoryPressure", "status": "False"},
                               {"type": "Ready", "status": ready}]}}))
            .unwrap()
        };
        let ok = node(json!({}), "True", false);
        assert_eq!(ok.internal_ips, ["192.168.1.21", "fd00::21"]);
        assert!(ok.eligible());
        assert!(!node(json!({}), "Unknown", false).eligible());
        assert!(!node(json!({EXCLUDE_LABEL: ""}), "True", false).eligible());
        assert!(!node(json!({}), "True", true).eligible());
        // Odd shapes make a node ineligible or unreadable, never a panic.
        assert_eq!(Node::decode(json!({"metadata": {}})), None);
        let odd = Node::decode(json!({"metadata": {"name": "x"}, "status": {"conditions": "no"}}));
        assert_eq!(odd, None);
    }
}
