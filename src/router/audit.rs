//! The audit trail: one structured log line per change to the router, so "who opened this
//! port and when" is answered by `journalctl` or `logread`.

use crate::core::model::targets_text;
use crate::kernel::Applied;

/// Logs every forward an apply added or removed, a rebuild with its reason, and the flows
/// of closed forwards that were ended.
pub fn record(table: &str, applied: &Applied) {
    if let Some(reason) = &applied.rebuilt {
        tracing::info!(action = "rebuild", table, reason = %reason, "rebuilt the table");
    }
    for forward in &applied.added {
        tracing::info!(
            action = "open",
            namespace = %forward.owner.namespace,
            name = %forward.owner.name,
            uid = forward.owner.uid.as_deref().unwrap_or(""),
            service_port = %forward.owner.service_port,
            family = %forward.key.family,
            protocol = %forward.key.protocol,
            external_port = forward.key.external_port,
            forward_to = %targets_text(forward.targets()),
            "forward opened"
        );
    }
    for removed in &applied.removed {
        tracing::info!(
            action = "close",
            family = %removed.key.family,
            protocol = %removed.key.protocol,
            external_port = removed.key.external_port,
            was = %removed.was,
            "forward closed"
        );
    }
    if applied.flows_closed > 0 {
        tracing::info!(
            action = "flows",
            table,
            flows = applied.flows_closed,
            "ended the running flows of closed or re-targeted forwards"
        );
    }
}
