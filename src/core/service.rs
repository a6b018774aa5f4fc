//! The few fields of a Kubernetes Service that forwarding needs, decoded leniently.
//!
//! Only these fields are read, so a Service that carries something a strict client type
//! refuses (a `status.conditions` entry with `lastTransitionTime: null`, which the API server
//! stores as sent) still decodes, and a router keeps per Service only what it forwards.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::core::annotation;

/// A Service as the core sees it. Strings are kept as the API gave them and checked by the
/// planner, so every refusal can name the field at fault.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    /// `metadata.creationTimestamp`, RFC 3339 as the API server writes it.
    pub created: Option<String>,
    /// The mapping annotation's value, if the Service has it.
    pub mapping: Option<String>,
    pub service_type: Option<String>,
    pub ports: Vec<ServicePort>,
    /// `status.loadBalancer.ingress[].ip`, in order; entries with only a hostname are left out.
    pub ingress_ips: Vec<String>,
    pub external_ips: Vec<String>,
    /// `spec.loadBalancerSourceRanges`: the clients allowed; empty: all.
    pub source_ranges: Vec<String>,
    /// `spec.healthCheckNodePort` (externalTrafficPolicy Local).
    pub health_check_node_port: Option<i64>,
    /// The health-check annotation's value, if any.
    pub health_check: Option<String>,
    /// The target annotation's value, if any.
    pub target: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: i64,
    /// `TCP` when the object leaves it out, as the API server defaults it.
    pub protocol: String,
    /// `spec.ports[].nodePort`, for NodePort and LoadBalancer Services.
    pub node_port: Option<i64>,
}

/// Why an object could not be read as a Service.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Service {object}: field {field}: {message}")]
pub struct DecodeError {
    /// `namespace/name` as far as it could be read.
    pub object: String,
    pub field: String,
    pub message: String,
}

#[derive(Deserialize)]
struct ServiceObject {
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: Spec,
    #[serde(default)]
    status: Status,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    creation_timestamp: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(rename = "type")]
    service_type: Option<String>,
    #[serde(default)]
    ports: Option<Vec<Port>>,
    #[serde(default, rename = "externalIPs")]
    external_ips: Option<Vec<String>>,
    #[serde(default)]
    load_balancer_source_ranges: Option<Vec<String>>,
    health_check_node_port: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Port {
    name: Option<String>,
    port: i64,
    protocol: Option<String>,
    node_port: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    #[serde(default)]
    load_balancer: Option<LoadBalancer>,
}

#[derive(Default, Deserialize)]
struct LoadBalancer {
    #[serde(default)]
    ingress: Option<Vec<Ingress>>,
}

#[derive(Deserialize)]
struct Ingress {
    ip: Option<String>,
}

/// `namespace/name` of an undecoded object, for messages; `default` when no namespace is
/// given, as kubectl assumes.
pub fn object_name(value: &serde_json::Value) -> String {
    let meta = &value["metadata"];
    let namespace = meta["namespace"].as_str().unwrap_or("default");
    match meta["name"].as_str() {
        Some(name) => format!("{namespace}/{name}"),
        None => format!("{namespace}/<unnamed>"),
    }
}

impl Service {
    /// Decodes a Service object, naming the field when it is not of the expected shape.
    pub fn decode(value: serde_json::Value) -> Result<Service, DecodeError> {
        let object = object_name(&value);
        let decoded: ServiceObject =
            serde_path_to_error::deserialize(value).map_err(|err| DecodeError {
                object: object.clone(),
                field: err.path().to_string(),
                message: err.inner().to_string(),
            })?;
        let ServiceObject {
            metadata,
            spec,
            status,
        } = decoded;
        let name = metadata.name.ok_or_else(|| DecodeError {
            object,
            field: "metadata.name".into(),
            message: "missing".into(),
        })?;
        let mut annotations = metadata.annotations.unwrap_or_default();
        let mapping = annotations.remove(annotation::MAPPING);
        Ok(Service {
            namespace: metadata.namespace.unwrap_or_else(|| "default".into()),
            name,
            uid: metadata.uid,
            created: metadata.creation_timestamp,
            mapping,
            service_type: spec.service_type,
            ports: spec
                .ports
                .unwrap_or_default()
                .into_iter()
                .map(|port| ServicePort {
                    name: port.name.filter(|name| !name.is_empty()),
                    port: port.port,
                    protocol: port.protocol.unwrap_or_else(|| "TCP".into()),
                    node_port: port.node_port,
                })
                .collect(),
            ingress_ips: status
                .load_balancer
                .and_then(|lb| lb.ingress)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|ingress| ingress.ip)
                .collect(),
            external_ips: spec.external_ips.unwrap_or_default(),
            source_ranges: spec.load_balancer_source_ranges.unwrap_or_default(),
            health_check_node_port: spec.health_check_node_port,
            health_check: annotations.remove(annotation::HEALTH_CHECK),
            target: annotations.remove(annotation::TARGET),
        })
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_what_forwarding_needs() {
        let service = Service::decode(json!({
            "metadata": {"name": "web", "namespace": "apps", "uid": "u-1",
                "creationTimestamp": "2026-11-25T21:50:32Z",
                "annotations": {"kube-port-forward-controller/mapping": "http", "other": "x"}},
            "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80}],
                "externalIPs": ["192.0.2.9"]},
            "status": {"loadBalancer": {"ingress": [{"hostname": "lb.example"}, {"ip": "10.0.0.5"}]}}
        }))
        .unwrap();
        assert_eq!(service.key(), "apps/web");
        assert_eq!(service.mapping.as_deref(), Some("http"));
        assert_eq!(service.ports[0].protocol, "TCP");
        assert_eq!(service.ingress_ips, vec!["10.0.0.5"]);
        assert_eq!(service.external_ips, vec!["192.0.2.9"]);
    }

    #[test]
    fn conditions_a_strict_client_refuses_are_ignored() {
        let service = Service::decode(json!({
            "metadata": {"name": "web"},
            "status": {"conditions": [{"type": "X", "status": "Yes", "lastTransitionTime": null}]}
        }))
        .unwrap();
        assert_eq!(service.namespace, "default");
    }

    #[test]
    fn errors_name_the_object_and_field() {
        let err = Service::decode(json!({
            "metadata": {"name": "web", "namespace": "apps"},
            "spec": {"ports": [{"port": 80}, {"port": "eighty"}]}
        }))
        .unwrap_err();
        assert_eq!(err.object, "apps/web");
        assert_eq!(err.field, "spec.ports[1].port");
        let err = Service::decode(json!({"metadata": {"namespace": "apps"}})).unwrap_err();
        assert_eq!(err.field, "metadata.name");
        assert_eq!(err.object, "apps/<unnamed>");
    }
}
