//! The API server's rules and answers: merges, validation, selectors, status bodies.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

use super::Body;

/// `namespace/name` of an object.
pub(super) fn object_key(object: &Value) -> String {
    let meta = &object["metadata"];
    format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or_default(),
        meta["name"].as_str().unwrap_or_default()
    )
}

/// An object as a metadata-only request returns it.
pub(super) fn metadata_only(object: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]})
}

/// Strategic merge for the lists the daemon and tests patch: `finalizers` (a set),
/// `status.conditions` (by `type`), `spec.ports` (by `port`); other lists are replaced.
pub(super) fn strategic_merge(target: &mut Value, patch: &Value, path: &str) {
    let Some(patch_map) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in patch_map {
        let child = format!("{path}/{key}");
        if value.is_null() {
            target.as_object_mut().unwrap().remove(key);
            continue;
        }
        let slot = &mut target[key.as_str()];
        match (child.as_str(), value) {
            ("/metadata/finalizers", Value::Array(items)) => {
                let mut merged = slot.as_array().cloned().unwrap_or_default();
                for item in items {
                    if !merged.contains(item) {
                        merged.push(item.clone());
                    }
                }
                *slot = Value::Array(merged);
            }
            ("/status/conditions", Value::Array(items)) => merge_by(slot, items, "type"),
            ("/spec/ports", Value::Array(items)) => merge_by(slot, items, "port"),
            (_, Value::Object(_)) => strategic_merge(slot, value, &child),
            _ => *slot = value.clone(),
        }
    }
}

pub(super) fn merge_by(slot: &mut Value, items: &[Value], key: &str) {
    let mut merged = slot.as_array().cloned().unwrap_or_default();
    for item in items {
        match merged.iter_mut().find(|m| m[key] == item[key]) {
            Some(existing) => strategic_merge(existing, item, ""),
            None => merged.push(item.clone()),
        }
    }
    *slot = Value::Array(merged);
}

/// The defaults the API server fills in a Service's spec before it is stored (and before
/// managedFields are worked out, so the writer owns them: transcript 01). Addresses and node
/// ports, which it allocates afterwards, are not modelled.
pub(super) fn default_service(object: &mut Value) {
    let spec = &mut object["spec"];
    if spec["type"].is_null() {
        spec["type"] = json!("ClusterIP");
    }
    let kind = spec["type"].as_str().unwrap_or_default().to_owned();
    let mut defaults = vec![("sessionAffinity", json!("None"))];
    if kind != "ExternalName" {
        defaults.push(("internalTrafficPolicy", json!("Cluster")));
    }
    if kind == "LoadBalancer" || kind == "NodePort" {
        defaults.push(("externalTrafficPolicy", json!("Cluster")));
    }
    if kind == "LoadBalancer" {
        defaults.push(("allocateLoadBalancerNodePorts", json!(true)));
    }
    for (field, value) in defaults {
        if spec[field].is_null() {
            spec[field] = value;
        }
    }
    if let Some(ports) = spec["ports"].as_array_mut() {
        for port in ports {
            if port["protocol"].is_null() {
                port["protocol"] = json!("TCP");
            }
            if port["targetPort"].is_null() {
                port["targetPort"] = port["port"].clone();
            }
        }
    }
}

/// The checks the API server makes on the metadata the daemon writes.
pub(super) fn validate(
    name: &str,
    new: &Value,
    old: Option<&Value>,
) -> Result<(), (StatusCode, Value)> {
    let finalizers: Vec<&str> = new["metadata"]["finalizers"]
        .as_array()
        .map(|f| f.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for finalizer in &finalizers {
        if !qualified_name(finalizer) {
            return Err(invalid(
                name,
                "metadata.finalizers",
                &format!(
                    "Invalid value: \"{finalizer}\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
                ),
            ));
        }
    }
    if let Some(old) = old
        && !old["metadata"]["deletionTimestamp"].is_null()
    {
        let before: Vec<&str> = old["metadata"]["finalizers"]
            .as_array()
            .map(|f| f.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let added: Vec<&&str> = finalizers.iter().filter(|f| !before.contains(f)).collect();
        if !added.is_empty() {
            return Err(invalid(
                name,
                "metadata.finalizers",
                &format!(
                    "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                    added
                        .iter()
                        .map(|f| format!("{f:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    if let Some(annotations) = new["metadata"]["annotations"].as_object() {
        for key in annotations.keys() {
            if !qualified_name(key) {
                return Err(invalid(
                    name,
                    "metadata.annotations",
                    &format!(
                        "Invalid value: \"{key}\": name part must be no more than 63 characters"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `[prefix/]name`: prefix a DNS subdomain, name 1 to 63 characters of alphanumerics, `-`,
/// `_` and `.`, starting and ending with an alphanumeric.
pub(super) fn qualified_name(text: &str) -> bool {
    let (prefix, name) = match text.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, text),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    });
    name_ok && prefix_ok
}

/// Equality-based label selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated.
pub(super) fn selects(selector: &str, labels: &Value) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k] != v
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels[k] == v
        } else if let Some(k) = term.strip_prefix('!') {
            labels.get(k).is_none()
        } else {
            labels.get(term).is_some()
        }
    })
}

pub(super) fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

pub(super) fn status_body(code: StatusCode, reason: &str, message: &str, details: Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code.as_u16(),
    })
}

pub(super) fn gone(rv: u64) -> Value {
    status_body(
        StatusCode::GONE,
        "Expired",
        &format!("too old resource version: {rv}"),
        json!({}),
    )
}

pub(super) fn not_found(name: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        status_body(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("services \"{name}\" not found"),
            json!({"name": name, "kind": "services"}),
        ),
    )
}

pub(super) fn bad_request(message: &str) -> (StatusCode, Value) {
    (
        StatusCode::BAD_REQUEST,
        status_body(StatusCode::BAD_REQUEST, "BadRequest", message, json!({})),
    )
}

pub(super) fn invalid(name: &str, field: &str, message: &str) -> (StatusCode, Value) {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        status_body(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            &format!("Service \"{name}\" is invalid: {field}: {message}"),
            json!({"name": name, "kind": "Service", "causes": [
                {"reason": "FieldValueInvalid", "message": message, "field": field}
            ]}),
        ),
    )
}

/// A patch's options refused: an apply names its field manager itself (the User-Agent does
/// not count), and only an apply may force.
pub(super) fn check_patch_options(
    apply: bool,
    field_manager: Option<&str>,
    force: bool,
) -> Result<(), (StatusCode, Value)> {
    let named = field_manager.is_some_and(|m| !m.is_empty());
    let (field, reason, message) = match (apply, named, force) {
        (true, false, _) => (
            "fieldManager",
            "FieldValueRequired",
            "Required value: is required for apply patch",
        ),
        (false, _, true) => (
            "force",
            "FieldValueForbidden",
            "Forbidden: may not be specified for non-apply patch",
        ),
        _ => return Ok(()),
    };
    Err((
        StatusCode::UNPROCESSABLE_ENTITY,
        status_body(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            &format!("PatchOptions.meta.k8s.io \"\" is invalid: {field}: {message}"),
            json!({"group": "meta.k8s.io", "kind": "PatchOptions", "causes": [
                {"reason": reason, "message": message, "field": field}
            ]}),
        ),
    ))
}

pub(super) fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

pub(super) fn stream_response(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}
