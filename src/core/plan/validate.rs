//! What is checked before a Service is trusted: the names, uid and creationTimestamp the
//! API server would take, and the ports an entry selects. Text from a Service is made
//! printable before it goes into a message.

use crate::core::annotation::PortRef;
use crate::core::model::Protocol;
use crate::core::names::{is_dns_label, is_kubernetes_time};
use crate::core::service::{Service, ServicePort};

/// Namespace, name, uid, port names and creationTimestamp reach the kernel (in element
/// comments) and the logs, so they must be what the API server allows, whatever a manifest
/// says.
pub(super) fn check_identity(service: &Service) -> Result<(), (String, String)> {
    if !is_dns_label(&service.namespace) {
        return Err((
            "metadata.namespace".to_owned(),
            format!(
                "\"{}\" is not a valid namespace",
                printable(&service.namespace)
            ),
        ));
    }
    if !is_dns_label(&service.name) {
        return Err((
            "metadata.name".to_owned(),
            format!(
                "\"{}\" is not a valid Service name",
                printable(&service.name)
            ),
        ));
    }
    if let Some(uid) = &service.uid {
        let ok = !uid.is_empty()
            && uid.len() <= 64
            && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err((
                "metadata.uid".to_owned(),
                format!("\"{}\" is not a valid uid", printable(uid)),
            ));
        }
    }
    // Port names reach element comments too; the API server takes only lowercase RFC 1123
    // labels, so anything else is a manifest it would have refused.
    for (index, port) in service.ports.iter().enumerate() {
        if let Some(name) = &port.name
            && !is_dns_label(name)
        {
            return Err((
                format!("spec.ports[{index}].name"),
                format!(
                    "\"{}\" is not a valid port name (lowercase letters, digits and '-', at most 63)",
                    printable(name)
                ),
            ));
        }
    }
    if let Some(created) = &service.created
        && !is_kubernetes_time(created)
    {
        return Err((
            "metadata.creationTimestamp".to_owned(),
            format!(
                "\"{}\" is not of the form 2006-01-02T15:04:05Z",
                printable(created)
            ),
        ));
    }
    Ok(())
}

/// The Service ports an entry selects, with their validated number and protocol.
pub(super) fn select_ports<'s>(
    service: &'s Service,
    wanted: &PortRef,
) -> Result<Vec<(&'s ServicePort, u16, Protocol)>, String> {
    let mut selected = Vec::new();
    for (index, port) in service.ports.iter().enumerate() {
        let matches = match wanted {
            PortRef::Name(name) => port.name.as_deref() == Some(name.as_str()),
            PortRef::Number(number) => port.port == i64::from(*number),
        };
        if !matches {
            continue;
        }
        let number = u16::try_from(port.port)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| {
                format!(
                    "spec.ports[{index}].port: {} is not a valid port",
                    port.port
                )
            })?;
        let protocol = Protocol::from_kubernetes(&port.protocol).ok_or_else(|| {
            format!(
                "spec.ports[{index}].protocol: \"{}\" is not TCP, UDP or SCTP",
                printable(&port.protocol)
            )
        })?;
        selected.push((port, number, protocol));
    }
    if selected.is_empty() {
        return Err(match wanted {
            PortRef::Name(name) => format!("no port named \"{name}\" in spec.ports"),
            PortRef::Number(number) => format!("no port {number} in spec.ports"),
        });
    }
    Ok(selected)
}

/// Text from a Service as it may appear in a message: printable ASCII, at most 64 chars.
pub(super) fn printable(text: &str) -> String {
    text.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}
