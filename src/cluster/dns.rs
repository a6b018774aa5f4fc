//! The external-dns targets this router writes on Services: one JSON Patch per change, each
//! value guarded by a `test` of what the daemon saw (a Service changed meanwhile fails with
//! 422 and its watch event brings the next word).

use kube::api::Patch;

use super::{Cluster, Key, patch_params};

impl Cluster {
    /// Applies the operations `core::dns::step` made for a Service.
    pub async fn write_dns(&self, key: &Key, ops: &[serde_json::Value]) -> Result<(), kube::Error> {
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::Value::Array(ops.to_vec()))
                .map_err(kube::Error::SerdeError)?;
        self.api(&key.0)
            .patch(&key.1, &patch_params(), &Patch::Json::<()>(patch))
            .await?;
        tracing::info!(
            action = "dns",
            namespace = %key.0,
            name = %key.1,
            target = %target_of(ops).unwrap_or("(removed)"),
            "external-dns target written"
        );
        Ok(())
    }
}

/// The target value a patch writes, if it writes one.
fn target_of(ops: &[serde_json::Value]) -> Option<&str> {
    ops.iter()
        .find(|op| op["op"] == "add")
        .and_then(|op| op["value"].as_str())
}
