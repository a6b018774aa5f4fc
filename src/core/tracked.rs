//! What the daemon keeps of a Service between events, read from the object the API server
//! sends. Reading never fails: a Service that cannot be decoded is kept with the reason.

use crate::core::annotation;
use crate::core::dns;
use crate::core::service::{DecodeError, Service};

/// What the daemon keeps of a Service between events: no more than forwarding and the
/// finalizer need.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub uid: String,
    pub resource_version: Option<String>,
    pub finalizers: Vec<String>,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// The mapping annotation is present (known even when the rest cannot be decoded).
    pub annotated: bool,
    /// The Service left the daemon's watch (its labels no longer match `--selector`, or it
    /// is outside the namespaces watched) while it still held this router's finalizer: it
    /// forwards nothing, and is kept only until the finalizer is released.
    pub out_of_scope: bool,
    /// Its conditions as the API server holds them (those with a domain-qualified type,
    /// where routers write theirs), so a condition already as wanted is not written again.
    pub conditions: Vec<Condition>,
    /// The external-dns targets and this router's record of what it wrote there.
    pub dns: dns::Annotations,
    pub service: Result<Service, DecodeError>,
}

/// One entry of `status.conditions`, as far as deciding whether to write it goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Condition {
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

impl Tracked {
    pub fn uid(&self) -> &str {
        &self.uid
    }

    pub fn has_finalizer(&self, finalizer: &str) -> bool {
        self.finalizers.iter().any(|f| f == finalizer)
    }

    /// Position of `finalizer` in the list, for a JSON Patch that removes exactly it.
    pub fn finalizer_index(&self, finalizer: &str) -> Option<usize> {
        self.finalizers.iter().position(|f| f == finalizer)
    }

    /// Whether this router has any business with the Service: it asks for forwards, or it
    /// still carries this router's finalizer. Others are not kept.
    pub fn relevant(&self, finalizer: &str) -> bool {
        self.annotated || self.has_finalizer(finalizer)
    }

    /// The condition of `type_`, if the Service has one.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Reads what is kept from a Service object as the API server sends it.
    pub fn from_value(value: serde_json::Value) -> Tracked {
        let meta = &value["metadata"];
        let text = |field: &str| meta[field].as_str().map(str::to_owned);
        Tracked {
            uid: text("uid").unwrap_or_default(),
            resource_version: text("resourceVersion"),
            finalizers: meta["finalizers"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .filter_map(|f| f.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            terminating: !meta["deletionTimestamp"].is_null(),
            annotated: !meta["annotations"][annotation::MAPPING].is_null(),
            out_of_scope: false,
            conditions: value["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| {
                    let text = |field: &str| c[field].as_str().unwrap_or_default().to_owned();
                    let type_ = c["type"].as_str().filter(|t| t.contains('/'))?;
                    Some(Condition {
                        type_: type_.to_owned(),
                        status: text("status"),
                        reason: text("reason"),
                        message: text("message"),
                    })
                })
                .collect(),
            dns: dns::Annotations::from_metadata(&meta["annotations"]),
            service: Service::decode(value),
        }
    }
}
