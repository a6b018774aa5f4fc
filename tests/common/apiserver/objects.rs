//! Services and Events: create, patch (JSON Patch with `test`, merge, strategic merge), delete
//! with finalizers, each checked as the real API server checks it.

use hyper::StatusCode;
use serde_json::{Value, json};

use super::ApiServer;
use super::managed::{self, Writer};
use super::rules::*;

impl ApiServer {
    pub(super) fn create_service(
        &self,
        ns: &str,
        mut object: Value,
        manager: &str,
    ) -> (StatusCode, Value) {
        let mut state = self.state.lock().unwrap();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if name.is_empty() {
            return invalid(
                &name,
                "metadata.name",
                "Required value: name or generateName is required",
            );
        }
        let key = (ns.to_owned(), name.clone());
        if state.services.contains_key(&key) {
            let body = status_body(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("services \"{name}\" already exists"),
                json!({"name": name, "kind": "services"}),
            );
            return (StatusCode::CONFLICT, body);
        }
        if let Err(err) = validate(&name, &object, None) {
            return err;
        }
        state.rv += 1;
        state.uid += 1;
        let meta = &mut object["metadata"];
        meta["namespace"] = json!(ns);
        meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", state.uid));
        meta["resourceVersion"] = json!(state.rv.to_string());
        meta["creationTimestamp"] = json!(now());
        if let Some(map) = meta.as_object_mut() {
            map.remove("deletionTimestamp");
        }
        object["kind"] = json!("Service");
        object["apiVersion"] = json!("v1");
        default_service(&mut object);
        // Status is the controllers' to write: a create starts with an empty one.
        object["status"] = json!({"loadBalancer": {}});
        managed::record(None, &mut object, &Writer::update(manager), None);
        state.services.insert(key, object.clone());
        self.record(&mut state, "ADDED", &object);
        (StatusCode::CREATED, object)
    }

    pub(super) fn patch_service(
        &self,
        ns: &str,
        name: &str,
        content_type: &str,
        body: &str,
        status: bool,
        manager: &str,
    ) -> (StatusCode, Value) {
        let mut state = self.state.lock().unwrap();
        let key = (ns.to_owned(), name.to_owned());
        let Some(old) = state.services.get(&key).cloned() else {
            return not_found(name);
        };
        let mut new = old.clone();
        let patch: Value = match serde_json::from_str(body) {
            Ok(patch) => patch,
            Err(e) => return bad_request(&e.to_string()),
        };
        let media = content_type.split(';').next().unwrap_or_default().trim();
        let writer = match (media, status) {
            ("application/apply-patch+yaml", false) => Writer::apply(manager),
            ("application/apply-patch+yaml", true) => Writer {
                subresource: Some("status"),
                ..Writer::apply(manager)
            },
            (_, false) => Writer::update(manager),
            (_, true) => Writer::status(manager),
        };
        match media {
            "application/json-patch+json" => {
                let mut ops: json_patch::Patch = match serde_json::from_value(patch.clone()) {
                    Ok(ops) => ops,
                    Err(e) => return bad_request(&e.to_string()),
                };
                // The API server's JSON Patch reads a missing field as null, so a `test`
                // for null passes when the field is absent (transcript 04).
                ops.0.retain(|op| match op {
                    json_patch::PatchOperation::Test(test) => {
                        !(test.value.is_null() && new.pointer(test.path.as_str()).is_none())
                    }
                    _ => true,
                });
                // A failed `test` is 422 with this exact body (transcript 05).
                if json_patch::patch(&mut new, &ops).is_err() {
                    return (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        status_body(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            "the server rejected our request due to an error in our request",
                            json!({}),
                        ),
                    );
                }
            }
            "application/merge-patch+json" => json_patch::merge(&mut new, &patch),
            "application/strategic-merge-patch+json" | "application/apply-patch+yaml" => {
                strategic_merge(&mut new, &patch, "")
            }
            other => {
                let body = status_body(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    &format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {other}"
                    ),
                    json!({}),
                );
                return (StatusCode::UNSUPPORTED_MEDIA_TYPE, body);
            }
        }
        // An explicit, stale resourceVersion is a conflict (transcript 08).
        let sent_rv = new["metadata"]["resourceVersion"].clone();
        if sent_rv != old["metadata"]["resourceVersion"] && !sent_rv.is_null() {
            let body = status_body(
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on services \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                ),
                json!({"name": name, "kind": "services"}),
            );
            return (StatusCode::CONFLICT, body);
        }
        // Empty finalizers, annotations and labels are omitted, as Go's `omitempty` does.
        if let Some(meta) = new["metadata"].as_object_mut() {
            for field in ["finalizers", "annotations", "labels"] {
                let empty = match meta.get(field) {
                    Some(Value::Array(a)) => a.is_empty(),
                    Some(Value::Object(o)) => o.is_empty(),
                    Some(Value::Null) => true,
                    _ => false,
                };
                if empty {
                    meta.remove(field);
                }
            }
        }
        // Go's Condition type has no `omitempty` on lastTransitionTime: an absent one is
        // stored and served as null (transcript 18).
        if let Some(conditions) = new
            .pointer_mut("/status/conditions")
            .and_then(Value::as_array_mut)
        {
            for condition in conditions {
                if let Some(map) = condition.as_object_mut() {
                    map.entry("lastTransitionTime").or_insert(Value::Null);
                }
            }
        }
        // The main resource ignores status; the status subresource takes only status.
        if status {
            let status = new["status"].clone();
            new = old.clone();
            new["status"] = status;
        } else {
            new["status"] = old["status"].clone();
        }
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            match old["metadata"].get(field) {
                Some(value) => new["metadata"][field] = value.clone(),
                None => {
                    if let Some(meta) = new["metadata"].as_object_mut() {
                        meta.remove(field);
                    }
                }
            }
        }
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        // managedFields are the server's to keep, whatever the patch says of them.
        match old["metadata"].get("managedFields") {
            Some(entries) => new["metadata"]["managedFields"] = entries.clone(),
            None => {
                if let Some(meta) = new["metadata"].as_object_mut() {
                    meta.remove("managedFields");
                }
            }
        }
        if !status {
            default_service(&mut new);
        }
        if let Err(err) = validate(name, &new, Some(&old)) {
            return err;
        }
        if new == old {
            return (StatusCode::OK, old);
        }
        let applied = (writer.operation == "Apply").then_some(&patch);
        managed::record(Some(&old), &mut new, &writer, applied);
        state.rv += 1;
        new["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        let terminating = !new["metadata"]["deletionTimestamp"].is_null();
        let finalizers_left = new["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if terminating && !finalizers_left {
            // The last finalizer is gone: the object goes (transcripts 13, 14). The response
            // still carries it.
            state.services.remove(&key);
            self.record(&mut state, "DELETED", &new);
        } else {
            state.services.insert(key, new.clone());
            self.record(&mut state, "MODIFIED", &new);
        }
        (StatusCode::OK, new)
    }

    pub(super) fn delete_service(&self, ns: &str, name: &str) -> (StatusCode, Value) {
        let mut state = self.state.lock().unwrap();
        let key = (ns.to_owned(), name.to_owned());
        let Some(mut object) = state.services.get(&key).cloned() else {
            return not_found(name);
        };
        let has_finalizers = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        state.rv += 1;
        if has_finalizers {
            if object["metadata"]["deletionTimestamp"].is_null() {
                object["metadata"]["deletionTimestamp"] = json!(now());
                object["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
                state.services.insert(key, object.clone());
                self.record(&mut state, "MODIFIED", &object);
            }
            return (StatusCode::OK, object);
        }
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        state.services.remove(&key);
        self.record(&mut state, "DELETED", &object);
        (StatusCode::OK, object)
    }

    pub(super) fn create_event(&self, ns: &str, body: &str, manager: &str) -> (StatusCode, Value) {
        let Ok(mut event) = serde_json::from_str::<Value>(body) else {
            return bad_request("not JSON");
        };
        for field in [
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
            "type",
        ] {
            if event[field].as_str().is_none_or(str::is_empty) {
                return invalid(
                    event["metadata"]["name"].as_str().unwrap_or_default(),
                    field,
                    "Required value",
                );
            }
        }
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        state.uid += 1;
        if event["metadata"]["name"].is_null() {
            let prefix = event["metadata"]["generateName"]
                .as_str()
                .unwrap_or_default();
            event["metadata"]["name"] = json!(format!("{prefix}{:05x}", state.uid));
        }
        event["metadata"]["namespace"] = json!(ns);
        event["metadata"]["uid"] = json!(format!("00000000-0000-4000-9000-{:012x}", state.uid));
        event["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        event["metadata"]["creationTimestamp"] = json!(now());
        managed::record(None, &mut event, &Writer::update(manager), None);
        state.events.push(event.clone());
        (StatusCode::CREATED, event)
    }

    pub(super) fn patch_event(&self, name: &str, body: &str, manager: &str) -> (StatusCode, Value) {
        let Ok(patch) = serde_json::from_str::<Value>(body) else {
            return bad_request("not JSON");
        };
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        let rv = state.rv;
        match state
            .events
            .iter_mut()
            .find(|e| e["metadata"]["name"] == name)
        {
            Some(event) => {
                let old = event.clone();
                json_patch::merge(event, &patch);
                event["metadata"]["managedFields"] = old["metadata"]["managedFields"].clone();
                managed::record(Some(&old), event, &Writer::update(manager), None);
                event["metadata"]["resourceVersion"] = json!(rv.to_string());
                (StatusCode::OK, event.clone())
            }
            None => not_found(name),
        }
    }
}
