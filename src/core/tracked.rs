//! What the daemon keeps of a Service between events, read from the object the API server
//! sends. Reading never fails: a Service that cannot be decoded is kept with the reason.

use crate::core::annotation;
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
    pub service: Result<Service, DecodeError>,
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
            service: Service::decode(value),
        }
    }
}
