//! What this router tells Services: events (Normal for ports opened and closed, Warning for
//! refusals and failed cleanups) and its own condition in `status.conditions`.

use std::collections::{BTreeMap, HashMap};

use kube::api::Patch;
use kube::runtime::events::{Event as KubeEvent, EventType};
use serde_json::json;

use super::watched::object_ref;
use super::{Cluster, Key, patch_params};
use crate::core::decide::{Store, Summary};
use crate::core::model::targets_text;
use crate::core::tracked::Condition;
use crate::kernel::Applied;

/// Event notes longer than this are cut; the API server refuses notes over 1 kB.
const NOTE_MAX: usize = 1000;

impl Cluster {
    /// Publishes an event about a Service; repeated ones become a series (kube-runtime's
    /// recorder counts them, as client-go's correlator does).
    pub async fn event(
        &self,
        key: &Key,
        uid: &str,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let mut note = note.to_owned();
        if note.len() > NOTE_MAX {
            let mut cut = NOTE_MAX;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let event = KubeEvent {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        self.recorder.publish(&event, &object_ref(uid, key)).await
    }

    /// Writes this router's condition on a Service. A strategic merge keys conditions by
    /// type, so each router's stays its own.
    pub async fn condition(&self, key: &Key, summary: &Summary) -> Result<(), kube::Error> {
        let now = k8s_openapi::jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let wanted = condition_of(&self.condition_type, &self.instance, summary);
        let condition = json!({"status": {"conditions": [{
            "type": wanted.type_,
            "status": wanted.status,
            "reason": wanted.reason,
            "message": wanted.message,
            "lastTransitionTime": now,
        }]}});
        self.api(&key.0)
            .patch_status(&key.1, &patch_params(), &Patch::Strategic(condition))
            .await
            .map(drop)
    }
}

/// This router's condition for a summary, as it is written.
pub fn condition_of(condition_type: &str, instance: &str, summary: &Summary) -> Condition {
    Condition {
        type_: condition_type.to_owned(),
        status: summary.status.to_owned(),
        reason: summary.reason.to_owned(),
        message: format!("router {instance}: {}", summary.full_message()),
    }
}

/// The forwards an apply opened and closed, by the Service that owns them: the notes of
/// `PortsOpened` and `PortsClosed` events.
pub fn changes_by_service(
    applied: &Applied,
    store: &Store,
) -> BTreeMap<Key, (Vec<String>, Vec<String>)> {
    let by_uid: HashMap<&str, &Key> = store.iter().map(|(k, w)| (w.uid(), k)).collect();
    let mut notes: BTreeMap<Key, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for forward in &applied.added {
        if let Some(key) = forward.owner.uid.as_deref().and_then(|u| by_uid.get(u)) {
            notes.entry((*key).clone()).or_default().0.push(format!(
                "{} -> {}",
                forward.key,
                targets_text(forward.targets())
            ));
        }
    }
    for removed in &applied.removed {
        if let Some(key) = removed.uid.as_deref().and_then(|u| by_uid.get(u)) {
            notes
                .entry((*key).clone())
                .or_default()
                .1
                .push(removed.key.to_string());
        }
    }
    notes
}
