//! A Kubernetes API server for tests, owned by this project, with the semantics the daemon
//! relies on, matched against `shared/kube-apiserver-1.36-transcripts/`:
//! - Services: list (with `limit`/`continue`, label selectors, namespaced or not) and watch
//!   from a resourceVersion, with bookmarks and `410 Gone` for versions older than the
//!   history it keeps; GET, POST, PATCH (JSON Patch with `test`, merge, strategic merge for
//!   the lists that have merge keys), DELETE; the `/status` subresource.
//! - resourceVersion conflicts (409), finalizers and `deletionTimestamp`, no new finalizer on
//!   a terminating object, qualified-name checks on finalizers and annotation keys (422).
//! - events.k8s.io/v1 Events: create and merge patch.
//! - `metadata.managedFields` on every object, kept per manager (the `fieldManager`
//!   parameter, else the User-Agent's first segment) as the real server keeps them.
//!
//! Not modelled: server-side apply conflicts (an apply is forced, and merged as a strategic
//! merge), list snapshots across pages (pages are read from the current state),
//! authentication.
//!
//! Listeners can be opened inside network namespaces, stopped (connections cut, as when the
//! API server goes down) and reopened; `forget_history` compacts everything seen so far.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::Netns;

mod lists;
mod managed;
mod objects;
mod rules;

use managed::Writer;
use rules::*;

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
    /// Namespaces and Nodes, keyed ("", name) like cluster-scoped objects.
    namespaces: BTreeMap<(String, String), Value>,
    nodes: BTreeMap<(String, String), Value>,
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
        Self::kubeconfig_at(&addr.to_string())
    }

    /// A kubeconfig that names the server `host` (`name:port`), for a resolver to find.
    pub fn kubeconfig_at(host: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{host}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\ncurrent-context: test\nusers:\n- name: test\n  user:\n    token: test-token\n"
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
        let (status, body) = self.create_service(&ns, object, "kubectl-create");
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// Creates or relabels a Namespace (its labels replaced by `labels`).
    pub fn put_namespace(&self, name: &str, labels: Value) {
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        let key = (String::new(), name.to_owned());
        let old = state.namespaces.get(&key).cloned();
        let (kind, mut object, manager) = match &old {
            Some(old) => ("MODIFIED", old.clone(), "kubectl-label"),
            None => {
                state.uid += 1;
                let uid = format!("00000000-0000-4000-a000-{:012x}", state.uid);
                let object = json!({"kind": "Namespace", "apiVersion": "v1",
                    "metadata": {"name": name, "uid": uid, "creationTimestamp": now()},
                    "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
                ("ADDED", object, "kubectl-create")
            }
        };
        object["metadata"]["labels"] = labels;
        managed::record(old.as_ref(), &mut object, &Writer::update(manager), None);
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        state.namespaces.insert(key, object.clone());
        self.record(&mut state, kind, &object);
    }

    /// Creates or replaces a Node, as the kubelet registers and updates it: its InternalIP,
    /// whether it is Ready, and its labels.
    pub fn put_node(&self, name: &str, internal_ip: &str, ready: bool, labels: Value) {
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        let key = (String::new(), name.to_owned());
        let old = state.nodes.get(&key).cloned();
        let (kind, uid, created) = match &old {
            Some(old) => (
                "MODIFIED",
                old["metadata"]["uid"].clone(),
                old["metadata"]["creationTimestamp"].clone(),
            ),
            None => {
                state.uid += 1;
                let uid = format!("00000000-0000-4000-b000-{:012x}", state.uid);
                ("ADDED", json!(uid), json!(now()))
            }
        };
        let ready = if ready { "True" } else { "Unknown" };
        let mut object = json!({"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": name, "uid": uid, "creationTimestamp": created,
                "resourceVersion": state.rv.to_string(), "labels": labels},
            "spec": {"podCIDR": "10.42.0.0/24", "podCIDRs": ["10.42.0.0/24"]},
            "status": {
                "addresses": [{"type": "InternalIP", "address": internal_ip},
                              {"type": "Hostname", "address": name}],
                "conditions": [
                    {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
                    {"type": "Ready", "status": ready, "reason": "KubeletReady"}],
                "nodeInfo": {"kubeletVersion": "v1.36.0", "architecture": "arm64"}}});
        // The kubelet registers the Node, then writes its status through the subresource.
        let mut registered = object.clone();
        registered["status"] = old.as_ref().map_or(json!({}), |o| o["status"].clone());
        managed::record(
            old.as_ref(),
            &mut registered,
            &Writer::update("kubelet"),
            None,
        );
        object["metadata"]["managedFields"] = registered["metadata"]["managedFields"].clone();
        managed::record(
            Some(&registered),
            &mut object,
            &Writer::status("kubelet"),
            None,
        );
        state.nodes.insert(key, object.clone());
        self.record(&mut state, kind, &object);
    }

    /// Deletes a Node: gone at once, or, holding a finalizer (`hold`), marked with a
    /// deletionTimestamp until released, as the API server does.
    pub fn delete_node(&self, name: &str, hold: bool) {
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        let key = (String::new(), name.to_owned());
        let Some(mut object) = state.nodes.remove(&key) else {
            return;
        };
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        if hold {
            object["metadata"]["finalizers"] = json!(["example.com/hold"]);
            object["metadata"]["deletionTimestamp"] = json!(now());
            object["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            state.nodes.insert(key, object.clone());
            self.record(&mut state, "MODIFIED", &object);
        } else {
            self.record(&mut state, "DELETED", &object);
        }
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
            "kubectl-patch",
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
    /// Deletes every Service of a namespace, as the namespace controller does when the
    /// namespace is deleted: those with finalizers stay Terminating until released.
    pub fn delete_namespace(&self, ns: &str) {
        let names: Vec<String> = self
            .state
            .lock()
            .unwrap()
            .services
            .keys()
            .filter(|(n, _)| n == ns)
            .map(|(_, name)| name.clone())
            .collect();
        for name in names {
            self.delete_service(ns, &name);
        }
    }

    /// Every Service stored, Terminating ones included.
    pub fn services(&self) -> Vec<Value> {
        self.state
            .lock()
            .unwrap()
            .services
            .values()
            .cloned()
            .collect()
    }

    pub fn force_remove_finalizers(&self, ns: &str, name: &str) {
        self.merge_patch(ns, name, json!({"metadata": {"finalizers": null}}), false);
    }

    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }

    /// Every version of a Service the watch history holds, oldest first.
    pub fn versions(&self, ns: &str, name: &str) -> Vec<Value> {
        self.state
            .lock()
            .unwrap()
            .history
            .iter()
            .filter(|c| {
                c.object["metadata"]["namespace"] == ns && c.object["metadata"]["name"] == name
            })
            .map(|c| c.object.clone())
            .collect()
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
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let content_type = header("content-type");
        let manager = Writer::manager_of(
            query.get("fieldManager").map(String::as_str),
            &header("user-agent"),
        );
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
            (Method::GET, ["api", "v1", "nodes"]) => {
                return self.list_or_watch("Node", None, &query, partial);
            }
            (Method::POST, ["api", "v1", "namespaces", ns, "services"]) => {
                match serde_json::from_str(&body) {
                    Ok(object) => self.create_service(ns, object, &manager),
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
                let apply = content_type.starts_with("application/apply-patch+yaml");
                let field_manager = query.get("fieldManager").map(String::as_str);
                match check_patch_options(apply, field_manager, query.contains_key("force")) {
                    Ok(()) => self.patch_service(
                        ns,
                        name,
                        &content_type,
                        &body,
                        !rest.is_empty(),
                        &manager,
                    ),
                    Err(refused) => refused,
                }
            }
            (Method::DELETE, ["api", "v1", "namespaces", ns, "services", name]) => {
                self.delete_service(ns, name)
            }
            (Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
                self.create_event(ns, &body, &manager)
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
            ) => self.patch_event(name, &body, &manager),
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
}
