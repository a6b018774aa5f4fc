//! A Kubernetes API server for tests, owned by this project, with the semantics the daemon
//! relies on, matched against `shared/kube-apiserver-1.36-transcripts/`:
//! - Services: list (with `limit`/`continue`, label selectors, namespaced or not) and watch
//!   from a resourceVersion, with bookmarks and `410 Gone` for versions older than the
//!   history it keeps; GET, POST, PATCH (JSON Patch with `test`, merge, strategic merge for
//!   the lists that have merge keys), DELETE; the `/status` subresource.
//! - resourceVersion conflicts (409), finalizers and `deletionTimestamp`, no new finalizer on
//!   a terminating object, qualified-name checks on finalizers and annotation keys (422).
//! - events.k8s.io/v1 Events: create and merge patch.
//!
//! Not modelled: server-side apply field ownership (apply is treated as a strategic merge),
//! list snapshots across pages (pages are read from the current state), authentication.
//!
//! Listeners can be opened inside network namespaces, stopped (connections cut, as when the
//! API server goes down) and reopened; `forget_history` compacts everything seen so far.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::Netns;

type Body = BoxBody<Bytes, Infallible>;

/// One change to a Service, as a watch reports it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    uid: u64,
    services: BTreeMap<(String, String), Value>,
    /// Namespaces, keyed ("", name) like cluster-scoped objects.
    namespaces: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    /// Versions at or below this are compacted: too old to list or watch from.
    compacted: u64,
    events: Vec<Value>,
    requests: Vec<String>,
}

/// Handle to the server; cheap to clone.
#[derive(Clone)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Change>,
    runtime: Arc<tokio::runtime::Runtime>,
    /// Bumped to cut every open connection and stop the listeners.
    generation: Arc<watch::Sender<u64>>,
}

impl ApiServer {
    pub fn new() -> ApiServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        ApiServer {
            state: Arc::default(),
            changes: broadcast::channel(4096).0,
            runtime: Arc::new(runtime),
            generation: Arc::new(watch::channel(0).0),
        }
    }

    /// Listens on 127.0.0.1 inside `ns` (or the test's own namespace) until [`stop`].
    pub fn listen(&self, ns: Option<&Netns>) -> SocketAddr {
        self.listen_at(ns, 0)
    }

    /// Listens on a given port (0: any), waiting for a previous listener on it to close.
    pub fn listen_at(&self, ns: Option<&Netns>, port: u16) -> SocketAddr {
        let bind = move || {
            let mut listener = None;
            super::wait_for("the API server's port to be free", || {
                listener = std::net::TcpListener::bind(("127.0.0.1", port)).ok();
                listener.is_some()
            });
            listener.unwrap()
        };
        let listener = match ns {
            Some(ns) => ns.enter(bind),
            None => bind(),
        };
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = self.clone();
        let mut stop = self.generation.subscribe();
        self.runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let server = server.clone();
                        let mut stop = server.generation.subscribe();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                let server = server.clone();
                                async move { Ok::<_, Infallible>(server.handle(req).await) }
                            });
                            let conn = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                            tokio::select! {
                                _ = conn => {}
                                _ = stop.changed() => {}
                            }
                        });
                    }
                    _ = stop.changed() => break,
                }
            }
        });
        addr
    }

    /// Closes the listeners and every open connection, watches included.
    pub fn stop(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// A kubeconfig that points at `addr`.
    pub fn kubeconfig(addr: SocketAddr) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\ncurrent-context: test\nusers:\n- name: test\n  user:\n    token: test-token\n"
        )
    }

    /// Forgets the history: every resourceVersion seen so far is now too old (410).
    pub fn forget_history(&self) {
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        state.compacted = state.rv;
        state.history.clear();
    }

    pub fn create(&self, object: Value) -> Value {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let (status, body) = self.create_service(&ns, object);
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// Creates or relabels a Namespace (its labels replaced by `labels`).
    pub fn put_namespace(&self, name: &str, labels: Value) {
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        let key = (String::new(), name.to_owned());
        let (kind, mut object) = match state.namespaces.get(&key) {
            Some(old) => ("MODIFIED", old.clone()),
            None => {
                state.uid += 1;
                let uid = format!("00000000-0000-4000-a000-{:012x}", state.uid);
                let object = json!({"kind": "Namespace", "apiVersion": "v1",
                    "metadata": {"name": name, "uid": uid, "creationTimestamp": now()},
                    "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
                ("ADDED", object)
            }
        };
        object["metadata"]["labels"] = labels;
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        state.namespaces.insert(key, object.clone());
        self.record(&mut state, kind, &object);
    }

    pub fn get(&self, ns: &str, name: &str) -> Option<Value> {
        let state = self.state.lock().unwrap();
        state
            .services
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// A merge patch, as `kubectl patch --type merge` (or `--subresource status`) sends.
    pub fn merge_patch(&self, ns: &str, name: &str, patch: Value, status: bool) -> Value {
        let (code, body) = self.patch_service(
            ns,
            name,
            "application/merge-patch+json",
            &patch.to_string(),
            status,
        );
        assert_eq!(code, StatusCode::OK, "{body}");
        body
    }

    pub fn set_lb_ips(&self, ns: &str, name: &str, ips: &[&str]) {
        let ingress: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        self.merge_patch(
            ns,
            name,
            json!({"status": {"loadBalancer": {"ingress": ingress}}}),
            true,
        );
    }

    pub fn delete(&self, ns: &str, name: &str) -> StatusCode {
        self.delete_service(ns, name).0
    }

    /// Removes every finalizer, as an admin's `kubectl patch` does to force a deletion.
    pub fn force_remove_finalizers(&self, ns: &str, name: &str) {
        self.merge_patch(ns, name, json!({"metadata": {"finalizers": null}}), false);
    }

    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }

    /// `METHOD path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_owned(), decode(v))
            })
            .collect();
        self.state
            .lock()
            .unwrap()
            .requests
            .push(format!("{method} {}", req.uri()));
        // kube-rs asks for metadata only (`Api<PartialObjectMeta<K>>`) with this Accept.
        let partial = req
            .headers()
            .get("accept")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = match req.into_body().collect().await {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            Err(_) => String::new(),
        };
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (status, value) = match (method.clone(), parts.as_slice()) {
            (Method::GET, ["api", "v1", "services"]) => {
                return self.list_or_watch("Service", None, &query, partial);
            }
            (Method::GET, ["api", "v1", "namespaces", ns, "services"]) => {
                return self.list_or_watch("Service", Some(ns), &query, partial);
            }
            (Method::GET, ["api", "v1", "namespaces"]) => {
                return self.list_or_watch("Namespace", None, &query, partial);
            }
            (Method::POST, ["api", "v1", "namespaces", ns, "services"]) => {
                match serde_json::from_str(&body) {
                    Ok(object) => self.create_service(ns, object),
                    Err(e) => bad_request(&e.to_string()),
                }
            }
            (Method::GET, ["api", "v1", "namespaces", ns, "services", name, rest @ ..])
                if rest.is_empty() || rest == ["status"] =>
            {
                match self.get(ns, name) {
                    Some(object) => (StatusCode::OK, object),
                    None => not_found(name),
                }
            }
            (Method::PATCH, ["api", "v1", "namespaces", ns, "services", name, rest @ ..])
                if rest.is_empty() || rest == ["status"] =>
            {
                self.patch_service(ns, name, &content_type, &body, !rest.is_empty())
            }
            (Method::DELETE, ["api", "v1", "namespaces", ns, "services", name]) => {
                self.delete_service(ns, name)
            }
            (Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
                self.create_event(ns, &body)
            }
            (
                Method::PATCH,
                [
                    "apis",
                    "events.k8s.io",
                    "v1",
                    "namespaces",
                    _,
                    "events",
                    name,
                ],
            ) => self.patch_event(name, &body),
            _ => (
                StatusCode::NOT_FOUND,
                status_body(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the server could not find the requested resource",
                    json!({}),
                ),
            ),
        };
        json_response(status, &value)
    }

    /// Lists or watches objects of `kind` (`Service` or `Namespace`).
    fn list_or_watch(
        &self,
        kind: &'static str,
        ns: Option<&str>,
        query: &BTreeMap<String, String>,
        partial: bool,
    ) -> Response<Body> {
        let selector = query.get("labelSelector").cloned().unwrap_or_default();
        let matches = {
            let ns = ns.map(str::to_owned);
            move |object: &Value| {
                object["kind"] == kind
                    && ns
                        .as_deref()
                        .is_none_or(|ns| object["metadata"]["namespace"] == ns)
                    && selects(&selector, &object["metadata"]["labels"])
            }
        };
        let rv: Option<u64> = query
            .get("resourceVersion")
            .filter(|v| !v.is_empty())
            .map(|v| v.parse().unwrap_or(0));
        if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
            return self.watch(rv.unwrap_or(0), query, matches, partial);
        }
        let state = self.state.lock().unwrap();
        // A list at a specific, compacted version is 410 (transcript 16); "0" means any.
        if let Some(rv) = rv
            && rv != 0
            && rv < state.compacted
        {
            return json_response(StatusCode::GONE, &gone(rv));
        }
        let limit: usize = query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => {
                let mut parts = token.splitn(3, '/');
                let rv: u64 = parts.next().and_then(|r| r.parse().ok()).unwrap_or(0);
                if rv < state.compacted {
                    let body = status_body(
                        StatusCode::GONE,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result.",
                        json!({}),
                    );
                    return json_response(StatusCode::GONE, &body);
                }
                let key = (
                    parts.next().unwrap_or_default().to_owned(),
                    parts.next().unwrap_or_default().to_owned(),
                );
                (rv, Some(key))
            }
            None => (state.rv, None),
        };
        let mut items = Vec::new();
        let mut next = None;
        let objects = if kind == "Namespace" {
            &state.namespaces
        } else {
            &state.services
        };
        let range = objects
            .iter()
            .filter(|(key, _)| after.as_ref().is_none_or(|after| *key > after));
        for (key, object) in range.filter(|(_, o)| matches(o)) {
            if items.len() == limit {
                next = Some(format!("{list_rv}/{}/{}", key.0, key.1));
                break;
            }
            let mut item = if partial {
                metadata_only(object)
            } else {
                object.clone()
            };
            if let Some(map) = item.as_object_mut().filter(|_| !partial) {
                map.remove("kind");
                map.remove("apiVersion");
            }
            items.push(item);
        }
        // The token names the last item returned; the next page starts after it.
        let next = next.map(|_| {
            let last = &items.last().unwrap()["metadata"];
            format!(
                "{list_rv}/{}/{}",
                last["namespace"].as_str().unwrap_or_default(),
                last["name"].as_str().unwrap_or_default()
            )
        });
        let mut metadata = json!({"resourceVersion": list_rv.to_string()});
        if let Some(next) = next {
            metadata["continue"] = json!(next);
        }
        json_response(
            StatusCode::OK,
            &if partial {
                json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": metadata, "items": items})
            } else {
                json!({"kind": format!("{kind}List"), "apiVersion": "v1", "metadata": metadata, "items": items})
            },
        )
    }

    fn watch(
        &self,
        from: u64,
        query: &BTreeMap<String, String>,
        matches: impl Fn(&Value) -> bool + Send + 'static,
        partial: bool,
    ) -> Response<Body> {
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true");
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(300u64);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
        let line = move |kind: &str, object: &Value| {
            let object = if partial && kind != "ERROR" && kind != "BOOKMARK" {
                metadata_only(object)
            } else {
                object.clone()
            };
            Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
        };
        let mut live = self.changes.subscribe();
        let (backlog, current, mut visible) = {
            let state = self.state.lock().unwrap();
            if from < state.compacted {
                let _ = tx.try_send(line("ERROR", &gone(from)));
                drop(tx);
                return stream_response(rx);
            }
            // From "0" (any version): the current objects as ADDED, then what follows.
            let backlog: Vec<Change> = if from == 0 {
                state
                    .services
                    .values()
                    .chain(state.namespaces.values())
                    .map(|object| Change {
                        rv: state.rv,
                        kind: "ADDED",
                        object: object.clone(),
                    })
                    .collect()
            } else {
                state
                    .history
                    .iter()
                    .filter(|c| c.rv > from)
                    .cloned()
                    .collect()
            };
            // What this watch's client holds: the objects that match now (from "0", none
            // yet: the backlog adds them).
            let visible: BTreeSet<String> = if from == 0 {
                BTreeSet::new()
            } else {
                state
                    .services
                    .values()
                    .chain(state.namespaces.values())
                    .filter(|o| matches(o))
                    .map(object_key)
                    .collect()
            };
            (backlog, state.rv, visible)
        };
        // A filtered watch reports an object that stops matching as DELETED and one that
        // starts matching as ADDED, as the API server's watch cache does.
        let mut event = move |change: &Change| -> Option<&'static str> {
            let key = object_key(&change.object);
            let now = change.kind != "DELETED" && matches(&change.object);
            let before = visible.contains(&key);
            match (before, now) {
                (false, true) => {
                    visible.insert(key);
                    Some("ADDED")
                }
                (true, true) => Some(change.kind),
                (true, false) => {
                    visible.remove(&key);
                    Some("DELETED")
                }
                (false, false) => None,
            }
        };
        let state = self.state.clone();
        let mut stop = self.generation.subscribe();
        self.runtime.spawn(async move {
            let mut last = if from == 0 { current } else { from };
            for change in backlog {
                last = last.max(change.rv);
                if let Some(kind) = event(&change)
                    && tx.send(line(kind, &change.object)).await.is_err()
                {
                    return;
                }
            }
            let deadline = tokio::time::sleep(Duration::from_secs(timeout));
            tokio::pin!(deadline);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    change = live.recv() => match change {
                        Ok(change) if change.rv > last => {
                            last = change.rv;
                            if let Some(kind) = event(&change)
                                && tx.send(line(kind, &change.object)).await.is_err()
                            {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                    _ = tick.tick(), if bookmarks => {
                        let rv = state.lock().unwrap().rv.max(last);
                        let bookmark = json!({"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}});
                        if tx.send(line("BOOKMARK", &bookmark)).await.is_err() {
                            return;
                        }
                    }
                    _ = &mut deadline => return,
                    _ = stop.changed() => return,
                }
            }
        });
        stream_response(rx)
    }

    /// Records a change and tells the watches; the caller holds the lock.
    fn record(&self, state: &mut State, kind: &'static str, object: &Value) {
        let change = Change {
            rv: state.rv,
            kind,
            object: object.clone(),
        };
        state.history.push(change.clone());
        let _ = self.changes.send(change);
    }

    fn create_service(&self, ns: &str, mut object: Value) -> (StatusCode, Value) {
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
        if object["spec"]["type"].is_null() {
            object["spec"]["type"] = json!("ClusterIP");
        }
        if let Some(ports) = object["spec"]["ports"].as_array_mut() {
            for port in ports {
                if port["protocol"].is_null() {
                    port["protocol"] = json!("TCP");
                }
            }
        }
        // Status is the controllers' to write: a create starts with an empty one.
        object["status"] = json!({"loadBalancer": {}});
        state.services.insert(key, object.clone());
        self.record(&mut state, "ADDED", &object);
        (StatusCode::CREATED, object)
    }

    fn patch_service(
        &self,
        ns: &str,
        name: &str,
        content_type: &str,
        body: &str,
        status: bool,
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
        match media {
            "application/json-patch+json" => {
                let mut ops: json_patch::Patch = match serde_json::from_value(patch) {
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
        if let Some(conditions) = new["status"]["conditions"].as_array_mut() {
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
        if let Err(err) = validate(name, &new, Some(&old)) {
            return err;
        }
        if new == old {
            return (StatusCode::OK, old);
        }
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

    fn delete_service(&self, ns: &str, name: &str) -> (StatusCode, Value) {
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

    fn create_event(&self, ns: &str, body: &str) -> (StatusCode, Value) {
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
        state.events.push(event.clone());
        (StatusCode::CREATED, event)
    }

    fn patch_event(&self, name: &str, body: &str) -> (StatusCode, Value) {
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
                json_patch::merge(event, &patch);
                event["metadata"]["resourceVersion"] = json!(rv.to_string());
                (StatusCode::OK, event.clone())
            }
            None => not_found(name),
        }
    }
}

/// `namespace/name` of an object.
fn object_key(object: &Value) -> String {
    let meta = &object["metadata"];
    format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or_default(),
        meta["name"].as_str().unwrap_or_default()
    )
}

/// An object as a metadata-only request returns it.
fn metadata_only(object: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]})
}

/// Strategic merge for the lists the daemon and tests patch: `finalizers` (a set),
/// `status.conditions` (by `type`), `spec.ports` (by `port`); other lists are replaced.
fn strategic_merge(target: &mut Value, patch: &Value, path: &str) {
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

fn merge_by(slot: &mut Value, items: &[Value], key: &str) {
    let mut merged = slot.as_array().cloned().unwrap_or_default();
    for item in items {
        match merged.iter_mut().find(|m| m[key] == item[key]) {
            Some(existing) => strategic_merge(existing, item, ""),
            None => merged.push(item.clone()),
        }
    }
    *slot = Value::Array(merged);
}

/// The checks the API server makes on the metadata the daemon writes.
fn validate(name: &str, new: &Value, old: Option<&Value>) -> Result<(), (StatusCode, Value)> {
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
fn qualified_name(text: &str) -> bool {
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
fn selects(selector: &str, labels: &Value) -> bool {
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

fn decode(text: &str) -> String {
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

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn status_body(code: StatusCode, reason: &str, message: &str, details: Value) -> Value {
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

fn gone(rv: u64) -> Value {
    status_body(
        StatusCode::GONE,
        "Expired",
        &format!("too old resource version: {rv}"),
        json!({}),
    )
}

fn not_found(name: &str) -> (StatusCode, Value) {
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

fn bad_request(message: &str) -> (StatusCode, Value) {
    (
        StatusCode::BAD_REQUEST,
        status_body(StatusCode::BAD_REQUEST, "BadRequest", message, json!({})),
    )
}

fn invalid(name: &str, field: &str, message: &str) -> (StatusCode, Value) {
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

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

fn stream_response(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response<Body> {
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
