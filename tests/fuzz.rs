//! Hostile input: the annotation parser, the manifest reader and the planner never panic on
//! arbitrary input, stay bounded, and nothing from a Service reaches nft unchecked.
//! CI runs proptest's default number of cases; `bench/fuzz.sh` runs a million of each.

use kube_port_forward::cli::manifest;
use kube_port_forward::core::annotation;
use kube_port_forward::core::plan;
use kube_port_forward::core::policy::Policy;
use kube_port_forward::core::service::Service;
use kube_port_forward::kernel::{DEFAULT_TABLE, Ruleset, TableConfig};
use proptest::prelude::*;
use serde_json::json;

/// Characters that may appear inside a quoted nft comment in what the planner builds.
fn safe_comment(text: &str) -> bool {
    text.len() <= 128
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-./:~= ".contains(&b))
}

/// Text with the characters that break parsers and quoting.
fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,80}",
        "[a-z0-9-]{0,70}",
        "[ ,:0-9a-z\"'{};\\\\\n\t-]{0,80}",
        Just(String::new()),
        Just("80:http".to_owned()),
    ]
}

proptest! {
    #[test]
    fn the_annotation_parser_never_panics_and_stays_bounded(value in ".{0,2000}") {
        let results = annotation::parse(&value);
        prop_assert!(results.len() <= annotation::MAX_ENTRIES + 1);
        for result in results {
            match result {
                Ok(entry) => prop_assert!(!entry.text.is_empty() && entry.text.trim() == entry.text),
                Err(err) => prop_assert!(err.entry.chars().all(|c| c.is_ascii_graphic() || c == ' ' || c == '.')),
            }
        }
    }

    #[test]
    fn the_manifest_reader_never_panics(text in "[ -~\n\t]{0,600}") {
        let _ = manifest::parse("fuzz.yaml", &text);
    }

    #[test]
    fn nothing_from_a_service_reaches_nft_unchecked(
        namespace in nasty(),
        name in nasty(),
        uid in nasty(),
        mapping in nasty(),
        port_name in nasty(),
        port in prop_oneof![any::<i64>(), 1i64..=65535],
        protocol in prop_oneof![Just("TCP".to_owned()), Just("UDP".to_owned()), nasty()],
        ip in prop_oneof![nasty(), Just("10.1.2.3".to_owned()), Just("fd00::1".to_owned())],
    ) {
        let value = json!({
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "uid": uid,
                "annotations": {"kube-port-forward-controller/mapping": mapping}},
            "spec": {"ports": [{"name": port_name, "port": port, "protocol": protocol},
                {"name": "http", "port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": ip}]}}
        });
        let Ok(service) = Service::decode(value) else { return Ok(()) };
        let plan = plan::plan([&service], &Policy::default());
        let config = TableConfig::new(DEFAULT_TABLE, ["wan".to_owned()], []).unwrap();
        let ruleset = Ruleset::new(config, plan.forwards);
        let script = ruleset.render();
        for line in script.lines().filter(|l| l.contains("comment \"")) {
            let comment = line.split('"').nth(1).unwrap_or_default();
            prop_assert!(safe_comment(comment), "unsafe comment in {line:?}");
            prop_assert_eq!(line.matches('"').count(), 2, "{}", line);
        }
        let transaction = ruleset
            .transaction(&kube_port_forward::kernel::Change::Rebuild(String::new()))
            .unwrap();
        prop_assert!(serde_json::from_str::<serde_json::Value>(&transaction).is_ok());
    }
}

#[test]
fn a_huge_annotation_is_cut_at_the_entry_limit() {
    let value = "1,".repeat(500_000);
    let results = annotation::parse(&value);
    assert_eq!(results.len(), annotation::MAX_ENTRIES + 1);
}
