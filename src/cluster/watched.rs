//! The Service type the daemon watches: only what forwarding and the finalizer need, decoded
//! so that no Service can fail the watch.
//!
//! kube-rs decodes a whole list page with one call, so one Service a strict type refuses
//! (transcript 18: a condition with `lastTransitionTime: null`) would stop the daemon from
//! seeing any. Here decoding never fails: a Service that cannot be read is kept as such, with
//! the reason, and reported on.

use std::borrow::Cow;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

use crate::core::node::Node;
use crate::core::tracked::Tracked;

/// A Service as the watch delivers it.
#[derive(Clone, Debug)]
pub struct WatchedService {
    /// Name, namespace, uid, resourceVersion and finalizers only.
    pub metadata: ObjectMeta,
    pub tracked: Tracked,
}

impl WatchedService {
    pub fn from_value(value: serde_json::Value) -> WatchedService {
        let text = |field: &str| value["metadata"][field].as_str().map(str::to_owned);
        let (name, namespace, uid) = (text("name"), text("namespace"), text("uid"));
        let tracked = Tracked::from_value(value);
        let metadata = ObjectMeta {
            name,
            namespace,
            uid,
            resource_version: tracked.resource_version.clone(),
            finalizers: (!tracked.finalizers.is_empty()).then(|| tracked.finalizers.clone()),
            ..ObjectMeta::default()
        };
        WatchedService { metadata, tracked }
    }

    pub fn key(&self) -> (String, String) {
        (
            self.metadata.namespace.clone().unwrap_or_default(),
            self.metadata.name.clone().unwrap_or_default(),
        )
    }
}

/// The reference events about a Service point at: the Service by uid, not one version of
/// it, so repeated events of one reason become one series however often it changed.
pub fn object_ref(uid: &str, key: &(String, String)) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some(key.0.clone()),
        name: Some(key.1.clone()),
        uid: Some(uid.to_owned()),
        ..ObjectReference::default()
    }
}

impl<'de> Deserialize<'de> for WatchedService {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde_json::Value::deserialize(deserializer).map(WatchedService::from_value)
    }
}

impl kube::Resource for WatchedService {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Service")
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("services")
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A Node as the watch delivers it: what node-port forwarding needs, `None` when it cannot
/// be read (it then takes no traffic; the watch goes on).
#[derive(Clone, Debug)]
pub struct WatchedNode {
    pub metadata: ObjectMeta,
    pub node: Option<Node>,
}

impl<'de> Deserialize<'de> for WatchedNode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let text = |field: &str| value["metadata"][field].as_str().map(str::to_owned);
        let metadata = ObjectMeta {
            name: text("name"),
            uid: text("uid"),
            resource_version: text("resourceVersion"),
            ..ObjectMeta::default()
        };
        Ok(WatchedNode {
            metadata,
            node: Node::decode(value),
        })
    }
}

impl kube::Resource for WatchedNode {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Node")
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("nodes")
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn undecodable_services_are_kept_with_their_reason() {
        let list: Vec<WatchedService> = serde_json::from_value(json!([
            {"metadata": {"name": "ok", "namespace": "a", "uid": "1", "resourceVersion": "5",
                "finalizers": ["x/y"], "deletionTimestamp": "2026-01-01T00:00:00Z"},
             "status": {"conditions": [{"type": "T", "status": "Yes", "lastTransitionTime": null}]}},
            {"metadata": {"name": "bad", "namespace": "a"}, "spec": {"ports": "eighty"}}
        ]))
        .unwrap();
        let ok = &list[0].tracked;
        assert!(ok.service.is_ok());
        assert!(ok.terminating && ok.has_finalizer("x/y") && ok.relevant("x/y"));
        assert_eq!(ok.finalizer_index("x/y"), Some(0));
        assert!(!ok.relevant("other/z"));
        assert_eq!(
            list[1].tracked.service.as_ref().unwrap_err().field,
            "spec.ports"
        );
        assert_eq!(list[1].key(), ("a".to_owned(), "bad".to_owned()));
    }
}
