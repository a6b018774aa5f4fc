//! external-dns targets: on each Service it forwards, the router writes its public address
//! as the Service's DNS target, so external-dns publishes the address the internet reaches
//! instead of the LAN one. Pure: what to write, as a JSON Patch guarded by `test`, and what
//! the Service is told.
//!
//! Ownership: the value written is also kept in [`WRITTEN`]. A target annotation whose value
//! is not that one was set by hand (or by someone else): the router then writes nothing on
//! that Service, gives up what it wrote (its record, and a target key still holding its
//! value) and says so in its condition.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde_json::{Value, json};

use crate::core::model::Family;

/// The keys external-dns reads a Service's target from: before 0.22, and from 0.22 on.
pub const TARGETS: [&str; 2] = [
    "external-dns.alpha.kubernetes.io/target",
    "external-dns.kubernetes.io/target",
];
/// The value this router wrote into the target keys.
pub const WRITTEN: &str = "kube-port-forward-controller/dns-target-written";
/// `off` keeps the router from writing targets on this Service (default `on`).
pub const OPT: &str = "kube-port-forward-controller/dns-target";

/// What a Service carries of those annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Annotations {
    /// The values of [`TARGETS`], in that order.
    pub targets: [Option<String>; 2],
    pub written: Option<String>,
    pub opt: Option<String>,
}

impl Annotations {
    /// Reads them from a Service's `metadata.annotations`.
    pub fn from_metadata(annotations: &Value) -> Annotations {
        let text = |key: &str| annotations[key].as_str().map(str::to_owned);
        Annotations {
            targets: [text(TARGETS[0]), text(TARGETS[1])],
            written: text(WRITTEN),
            opt: text(OPT),
        }
    }

    /// Whether the Service opts in (the default) or out; a value other than `on` or `off`
    /// is a mistake, read as `off` (publishing an address is the less safe way to err).
    pub fn opted_in(&self) -> Result<bool, String> {
        match self.opt.as_deref() {
            None | Some("on") => Ok(true),
            Some("off") => Ok(false),
            Some(other) => Err(format!(
                "annotation {OPT}: \"{other}\" is neither \"on\" nor \"off\"; no DNS target is written"
            )),
        }
    }

    /// A target key holding a value this router did not write, if any.
    pub fn by_hand(&self) -> Option<&str> {
        self.targets
            .iter()
            .flatten()
            .find(|v| self.written.as_deref() != Some(v.as_str()))
            .map(String::as_str)
    }

    /// Whether the router has anything of its own here.
    pub fn has_own(&self) -> bool {
        self.written.is_some()
    }
}

/// The target a Service forwarding on `families` should carry: the public addresses of
/// those families, comma-separated (external-dns makes a record of each), or none.
pub fn target(families: &BTreeSet<Family>, public: &BTreeSet<IpAddr>) -> Option<String> {
    let addresses: Vec<String> = public
        .iter()
        .filter(|a| families.contains(&Family::of(**a)))
        .map(ToString::to_string)
        .collect();
    (!addresses.is_empty()).then(|| addresses.join(","))
}

/// What to do on one Service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    /// JSON Patch operations, each change guarded by a `test` of the value seen; empty:
    /// nothing to change.
    pub patch: Vec<Value>,
    /// What the Service's condition says of its DNS target when the router leaves it alone
    /// (the annotations themselves show what it wrote), and whether that is a warning.
    pub note: Option<(String, bool)>,
}

/// What to change on a Service carrying `current` so it carries `wanted` (`None`: nothing
/// of this router's), without touching a target set by hand.
pub fn step(current: &Annotations, wanted: Option<&str>) -> Step {
    let mut patch = Vec::new();
    if let Some(hand) = current.by_hand() {
        // Someone else's: give up this router's part, leave theirs.
        if let Some(written) = &current.written {
            for (key, value) in TARGETS.iter().zip(&current.targets) {
                if value.as_deref() == Some(written) {
                    remove(&mut patch, key, written);
                }
            }
            remove(&mut patch, WRITTEN, written);
        }
        let note = wanted.map(|w| {
            (
                format!(
                    "DNS target set by hand to {hand}; left as it is (the router's would be {w})"
                ),
                false,
            )
        });
        return Step { patch, note };
    }
    match wanted {
        Some(wanted) => {
            for (key, value) in TARGETS.iter().zip(&current.targets) {
                set(&mut patch, key, value.as_deref(), wanted);
            }
            set(&mut patch, WRITTEN, current.written.as_deref(), wanted);
            Step { patch, note: None }
        }
        None => {
            for (key, value) in TARGETS.iter().zip(&current.targets) {
                if let Some(value) = value {
                    remove(&mut patch, key, value);
                }
            }
            if let Some(written) = &current.written {
                remove(&mut patch, WRITTEN, written);
            }
            Step { patch, note: None }
        }
    }
}

/// The JSON Pointer of an annotation (`/` in keys is `~1`).
fn pointer(key: &str) -> String {
    format!(
        "/metadata/annotations/{}",
        key.replace('~', "~0").replace('/', "~1")
    )
}

fn set(patch: &mut Vec<Value>, key: &str, current: Option<&str>, wanted: &str) {
    if current == Some(wanted) {
        return;
    }
    let path = pointer(key);
    patch.push(json!({"op": "test", "path": path, "value": current}));
    patch.push(json!({"op": "add", "path": path, "value": wanted}));
}

fn remove(patch: &mut Vec<Value>, key: &str, current: &str) {
    let path = pointer(key);
    patch.push(json!({"op": "test", "path": path, "value": current}));
    patch.push(json!({"op": "remove", "path": path}));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(targets: [Option<&str>; 2], written: Option<&str>) -> Annotations {
        Annotations {
            targets: targets.map(|t| t.map(str::to_owned)),
            written: written.map(str::to_owned),
            opt: None,
        }
    }

    #[test]
    fn the_target_is_the_public_addresses_of_the_services_families() {
        let public: BTreeSet<IpAddr> = ["203.0.113.1", "2001:db8::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let v4 = BTreeSet::from([Family::Ipv4]);
        let both = BTreeSet::from([Family::Ipv4, Family::Ipv6]);
        assert_eq!(target(&v4, &public).as_deref(), Some("203.0.113.1"));
        assert_eq!(
            target(&both, &public).as_deref(),
            Some("203.0.113.1,2001:db8::1")
        );
        assert_eq!(target(&v4, &BTreeSet::new()), None);
    }

    #[test]
    fn writes_both_keys_and_its_record_guarded_by_what_it_saw() {
        let step = step(&Annotations::default(), Some("203.0.113.1"));
        assert_eq!(step.patch.len(), 6);
        assert_eq!(
            step.patch[0],
            json!({"op": "test", "path": "/metadata/annotations/external-dns.alpha.kubernetes.io~1target", "value": null})
        );
        assert_eq!(
            step.patch[5],
            json!({"op": "add", "path": "/metadata/annotations/kube-port-forward-controller~1dns-target-written", "value": "203.0.113.1"})
        );
        assert_eq!(step.note, None);
    }

    #[test]
    fn follows_a_change_and_removes_only_its_own() {
        let own = annotations(
            [Some("203.0.113.1"), Some("203.0.113.1")],
            Some("203.0.113.1"),
        );
        let changed = step(&own, Some("203.0.113.9"));
        assert_eq!(changed.patch.len(), 6);
        assert_eq!(changed.patch[0]["value"], "203.0.113.1");
        assert_eq!(changed.patch[1]["value"], "203.0.113.9");
        assert!(step(&own, Some("203.0.113.1")).patch.is_empty());
        let gone = step(&own, None);
        let ops: Vec<&str> = gone
            .patch
            .iter()
            .map(|op| op["op"].as_str().unwrap())
            .collect();
        assert_eq!(ops, ["test", "remove", "test", "remove", "test", "remove"]);
        assert!(step(&Annotations::default(), None).patch.is_empty());
    }

    #[test]
    fn never_overwrites_a_target_set_by_hand() {
        let hand = annotations([Some("home.example.net"), None], None);
        let step1 = step(&hand, Some("203.0.113.1"));
        assert!(step1.patch.is_empty());
        assert_eq!(
            step1.note.unwrap().0,
            "DNS target set by hand to home.example.net; left as it is (the router's would be 203.0.113.1)"
        );
        // Changed by hand after the router wrote it: the router gives up its record and
        // the other key still holding its value, and keeps off.
        let taken = annotations(
            [Some("home.example.net"), Some("203.0.113.1")],
            Some("203.0.113.1"),
        );
        let step2 = step(&taken, Some("203.0.113.1"));
        let paths: Vec<&str> = step2
            .patch
            .iter()
            .filter(|op| op["op"] == "remove")
            .map(|op| op["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                "/metadata/annotations/external-dns.kubernetes.io~1target",
                "/metadata/annotations/kube-port-forward-controller~1dns-target-written"
            ]
        );
    }

    #[test]
    fn opting_out_takes_on_or_off() {
        let mut a = Annotations::default();
        assert_eq!(a.opted_in(), Ok(true));
        a.opt = Some("off".into());
        assert_eq!(a.opted_in(), Ok(false));
        a.opt = Some("no".into());
        assert!(a.opted_in().unwrap_err().contains("neither"));
    }
}
