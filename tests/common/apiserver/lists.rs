//! Lists and watches: pages, label selectors, resourceVersions, bookmarks and 410 Gone.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

use super::rules::*;
use super::{ApiServer, Body, Change, State};

impl ApiServer {
    /// Lists or watches objects of `kind` (`Service`, `Namespace` or `Node`).
    pub(super) fn list_or_watch(
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
            return self.watch(kind, rv.unwrap_or(0), query, matches, partial);
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
        let objects = match kind {
            "Namespace" => &state.namespaces,
            "Node" => &state.nodes,
            _ => &state.services,
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

    pub(super) fn watch(
        &self,
        kind: &'static str,
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
                    .chain(state.nodes.values())
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
                    .chain(state.nodes.values())
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
                        // A bookmark carries the watched kind and only a resourceVersion.
                        let bookmark = json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}});
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
    pub(super) fn record(&self, state: &mut State, kind: &'static str, object: &Value) {
        let change = Change {
            rv: state.rv,
            kind,
            object: object.clone(),
        };
        state.history.push(change.clone());
        let _ = self.changes.send(change);
    }
}
