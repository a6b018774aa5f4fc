//! The `kube-port-forward-controller/mapping` annotation: its grammar and parser.
//!
//! `<entry>[,<entry>...]` where an entry is `<servicePort>` or `<externalPort>:<servicePort>`,
//! and `<servicePort>` is a port name from `spec.ports` or a port number. This is the grammar
//! of `unifi-port-forward.fiskhe.st/mapping`, so its users migrate by renaming the key.

use std::fmt;

use crate::core::names::is_port_name;

use serde::Serialize;

/// Prefix of every annotation and of the default finalizer.
pub const PREFIX: &str = "kube-port-forward-controller/";
/// The annotation that asks for forwards.
pub const MAPPING: &str = "kube-port-forward-controller/mapping";
/// `off` turns the health checks of a Service's backends off (default: `on`).
pub const HEALTH_CHECK: &str = "kube-port-forward-controller/health-check";
/// `nodeports`: forward to the Service's nodePorts on the cluster's nodes while it has no
/// LoadBalancer address (default: `loadbalancer`, or as the router's `--target` says).
pub const TARGET: &str = "kube-port-forward-controller/target";
/// At most this many entries are read from one annotation; the rest are refused. A Service
/// has at most a few dozen ports, and the bound keeps a hostile annotation cheap.
pub const MAX_ENTRIES: usize = 256;
/// Entry text longer than this is shortened in messages.
const MAX_SHOWN: usize = 40;

/// How an entry names a Service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PortRef {
    Name(String),
    Number(u16),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Name(name) => f.write_str(name),
            PortRef::Number(number) => write!(f, "{number}"),
        }
    }
}

/// One well-formed entry of the annotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The entry as written (trimmed), for messages.
    pub text: String,
    /// `None`: the external port is the selected Service port's `port`.
    pub external_port: Option<u16>,
    pub service_port: PortRef,
}

/// A malformed entry: what was written and why it is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("entry \"{entry}\": {reason}")]
pub struct EntryError {
    pub entry: String,
    pub reason: String,
}

impl EntryError {
    pub fn new(entry: &str, reason: impl Into<String>) -> EntryError {
        EntryError {
            entry: shown(entry),
            reason: reason.into(),
        }
    }
}

/// Entry text as it may appear in a message: printable ASCII, bounded length.
fn shown(entry: &str) -> String {
    let mut out: String = entry
        .chars()
        .take(MAX_SHOWN)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if entry.chars().count() > MAX_SHOWN {
        out.push_str("...");
    }
    out
}

/// Parses the annotation value into entries, one result per comma-separated entry, so a bad
/// entry never hides the good ones beside it.
pub fn parse(value: &str) -> Vec<Result<Entry, EntryError>> {
    let mut out = Vec::new();
    for (index, raw) in value.split(',').enumerate() {
        if index == MAX_ENTRIES {
            out.push(Err(EntryError::new(
                raw.trim(),
                format!("more than {MAX_ENTRIES} entries; this and the rest are ignored"),
            )));
            break;
        }
        out.push(parse_entry(raw.trim()));
    }
    out
}

fn parse_entry(text: &str) -> Result<Entry, EntryError> {
    if text.is_empty() {
        return Err(EntryError::new(text, "empty entry"));
    }
    let (external, service) = match text.split_once(':') {
        Some((external, service)) => (Some(external.trim()), service.trim()),
        None => (None, text),
    };
    let external_port = match external {
        Some(external) => Some(parse_port_number(external).map_err(|why| {
            EntryError::new(
                text,
                format!("external port \"{}\": {why}", shown(external)),
            )
        })?),
        None => None,
    };
    let service_port = parse_port_ref(service).map_err(|why| {
        EntryError::new(text, format!("service port \"{}\": {why}", shown(service)))
    })?;
    Ok(Entry {
        text: text.to_owned(),
        external_port,
        service_port,
    })
}

fn parse_port_ref(text: &str) -> Result<PortRef, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return parse_port_number(text).map(PortRef::Number);
    }
    if is_port_name(text) {
        Ok(PortRef::Name(text.to_owned()))
    } else {
        Err("not a port number nor a valid port name".to_owned())
    }
}

/// A port number: decimal digits only, 1 to 65535.
pub fn parse_port_number(text: &str) -> Result<u16, String> {
    if text.is_empty() {
        return Err("missing".to_owned());
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a number".to_owned());
    }
    match text.parse::<u32>() {
        Ok(0) => Err("port 0 is not a valid port".to_owned()),
        Ok(n) if n <= u32::from(u16::MAX) => Ok(n as u16),
        _ => Err("above 65535".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(value: &str) -> Vec<Entry> {
        parse(value).into_iter().map(Result::unwrap).collect()
    }

    #[test]
    fn plain_port_name_and_number() {
        let entries = ok("http, 53 ,8443:https");
        assert_eq!(entries[0].service_port, PortRef::Name("http".into()));
        assert_eq!(entries[0].external_port, None);
        assert_eq!(entries[1].service_port, PortRef::Number(53));
        assert_eq!(entries[1].text, "53");
        assert_eq!(entries[2].external_port, Some(8443));
        assert_eq!(entries[2].service_port, PortRef::Name("https".into()));
    }

    #[test]
    fn whitespace_around_colon_is_fine() {
        let entries = ok(" 2222 : ssh ");
        assert_eq!(entries[0].external_port, Some(2222));
        assert_eq!(entries[0].service_port, PortRef::Name("ssh".into()));
    }

    #[test]
    fn bad_entries_do_not_hide_good_ones() {
        let results = parse("80,0,70000:http,,a:b:c,x_y,65535");
        assert!(results[0].is_ok());
        assert!(results[1].as_ref().unwrap_err().reason.contains("port 0"));
        assert!(
            results[2]
                .as_ref()
                .unwrap_err()
                .reason
                .contains("above 65535")
        );
        assert_eq!(results[3].as_ref().unwrap_err().reason, "empty entry");
        assert!(results[4].is_err());
        assert!(results[5].is_err());
        assert_eq!(
            results[6].as_ref().unwrap().service_port,
            PortRef::Number(65535)
        );
    }

    #[test]
    fn numbers_are_digits_only() {
        assert!(parse_port_number("+80").is_err());
        assert!(parse_port_number("-1").is_err());
        assert!(parse_port_number("99999999999999999999").is_err());
        assert_eq!(parse_port_number("00080"), Ok(80));
    }

    #[test]
    fn entry_count_is_bounded() {
        let value = vec!["80"; MAX_ENTRIES + 10].join(",");
        let results = parse(&value);
        assert_eq!(results.len(), MAX_ENTRIES + 1);
        assert!(results[MAX_ENTRIES].is_err());
    }

    #[test]
    fn messages_are_printable_and_bounded() {
        let err = parse("\u{7}\u{1b}[31mred").remove(0).unwrap_err();
        assert!(err.entry.chars().all(|c| c.is_ascii_graphic() || c == ' '));
        let long = "a".repeat(500);
        let err = parse(&format!("1:{long}")).remove(0).unwrap_err();
        assert!(err.to_string().len() < 200);
    }
}
