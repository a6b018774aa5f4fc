//! This router's finalizer on Services: added and removed by JSON Patches guarded with
//! `test`, so no other finalizer (another router's, another controller's) is ever rewritten.

use kube::api::{Api, ListParams, Patch};
use serde_json::json;

use super::watched::WatchedService;
use super::{Cluster, Key, patch_params};

/// Adds `finalizer` to a Service holding `current`, on the condition that the list is still
/// `current`.
fn add_patch(current: &[String], finalizer: &str) -> json_patch::Patch {
    let patch = match current {
        [] => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [finalizer]},
        ]),
        list => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": list},
            {"op": "add", "path": "/metadata/finalizers/-", "value": finalizer},
        ]),
    };
    serde_json::from_value(patch).expect("a valid JSON Patch")
}

/// Removes `finalizer` at `index`, on the condition that it is still there.
fn remove_patch(index: usize, finalizer: &str) -> json_patch::Patch {
    let path = format!("/metadata/finalizers/{index}");
    serde_json::from_value(json!([
        {"op": "test", "path": path, "value": finalizer},
        {"op": "remove", "path": path},
    ]))
    .expect("a valid JSON Patch")
}

impl Cluster {
    /// Adds this router's finalizer to a Service whose finalizers were last seen as
    /// `finalizers`; returns it as updated. A Service changed meanwhile fails the guard (422).
    pub async fn add_finalizer(
        &self,
        key: &Key,
        finalizers: &[String],
    ) -> Result<WatchedService, kube::Error> {
        let patch = add_patch(finalizers, &self.finalizer);
        self.patch_finalizers(key, patch, "added").await
    }

    /// Removes this router's finalizer, if the Service as last seen holds it.
    pub async fn remove_finalizer(
        &self,
        key: &Key,
        finalizers: &[String],
    ) -> Option<Result<WatchedService, kube::Error>> {
        let index = finalizers.iter().position(|f| *f == self.finalizer)?;
        let patch = remove_patch(index, &self.finalizer);
        Some(self.patch_finalizers(key, patch, "removed").await)
    }

    async fn patch_finalizers(
        &self,
        key: &Key,
        patch: json_patch::Patch,
        what: &str,
    ) -> Result<WatchedService, kube::Error> {
        let updated = self
            .api(&key.0)
            .patch(&key.1, &patch_params(), &Patch::Json::<()>(patch))
            .await?;
        tracing::info!(
            action = "finalizer",
            namespace = %key.0,
            name = %key.1,
            finalizer = %self.finalizer,
            "finalizer {what}"
        );
        Ok(updated)
    }
}

/// Removes `finalizer` from every Service in scope (`release-finalizers`); returns how many
/// were released. Stops at the first failure.
pub async fn release_everywhere(
    client: &kube::Client,
    namespaces: Vec<String>,
    selector: Option<&str>,
    finalizer: &str,
) -> Result<usize, kube::Error> {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let mut released = 0;
    for scope in scopes {
        let api: Api<WatchedService> = match &scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let mut params = ListParams::default();
        if let Some(selector) = selector {
            params = params.labels(selector);
        }
        for service in api.list(&params).await?.items {
            let Some(index) = service.tracked.finalizer_index(finalizer) else {
                continue;
            };
            let (ns, name) = service.key();
            Api::<WatchedService>::namespaced(client.clone(), &ns)
                .patch(
                    &name,
                    &patch_params(),
                    &Patch::Json::<()>(remove_patch(index, finalizer)),
                )
                .await?;
            tracing::info!(action = "finalizer", namespace = %ns, name = %name, "finalizer released");
            released += 1;
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_are_guarded_by_the_list_they_change() {
        let f = "kube-port-forward-controller/finalizer";
        let first = serde_json::to_value(add_patch(&[], f)).unwrap();
        assert_eq!(
            first[0],
            json!({"op": "test", "path": "/metadata/finalizers", "value": null})
        );
        let others = vec!["other/router-b".to_owned()];
        let next = serde_json::to_value(add_patch(&others, f)).unwrap();
        assert_eq!(next[0]["value"], json!(["other/router-b"]));
        assert_eq!(next[1]["path"], "/metadata/finalizers/-");
        let remove = serde_json::to_value(remove_patch(1, f)).unwrap();
        assert_eq!(
            remove[0],
            json!({"op": "test", "path": "/metadata/finalizers/1", "value": f})
        );
        assert_eq!(
            remove[1],
            json!({"op": "remove", "path": "/metadata/finalizers/1"})
        );
    }
}
