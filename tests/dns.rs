//! external-dns targets, end to end: the daemon in the router namespace writes the router's
//! public WAN address on the Services it forwards, follows the address when it changes,
//! never overwrites a target set by hand, and removes its own before it releases a Service.
//! Needs root.

mod common;

use common::apiserver::ApiServer;
use common::daemon::Daemon;
use common::scenario::*;
use common::*;
use serde_json::{Value, json};

const ALPHA: &str = "external-dns.alpha.kubernetes.io/target";
const CURRENT: &str = "external-dns.kubernetes.io/target";
const WRITTEN: &str = "kube-port-forward-controller/dns-target-written";
const OPT: &str = "kube-port-forward-controller/dns-target";

fn annotation(api: &ApiServer, name: &str, key: &str) -> Option<String> {
    api.get("apps", name)?["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_owned)
}

/// Both target keys hold `value` (`None`: neither is there).
fn targets_are(api: &ApiServer, name: &str, value: Option<&str>) -> bool {
    [ALPHA, CURRENT]
        .iter()
        .all(|key| annotation(api, name, key).as_deref() == value)
}

fn condition(api: &ApiServer, name: &str) -> String {
    condition_message(api, name, "router-a")
}

fn annotate(api: &ApiServer, name: &str, annotations: Value) {
    api.merge_patch(
        "apps",
        name,
        json!({"metadata": {"annotations": annotations}}),
        false,
    );
}

/// The daemon following the WAN interface only (no fixed WAN address), with `extra` flags.
fn daemon(setup: &Setup, extra: &[&str]) -> Daemon {
    let args = [&["--cleanup-deadline", "60"], extra].concat();
    Daemon::on_wan_interface(
        &setup.topology.router,
        &setup.dir,
        setup.addr,
        "router-a",
        &args,
    )
}

#[test]
fn targets_follow_the_wan_are_left_when_set_by_hand_and_go_before_the_finalizer() {
    let setup = setup(&[8080]);
    let api = &setup.api;
    let router = &setup.topology.router;
    let mut first = daemon(&setup, &["--dns-targets"]);

    // The router's public address on the Service it forwards, in both keys.
    create_with_address(api, "web", "8080:http", 8080);
    wait_for("web's DNS target", || {
        targets_are(api, "web", Some(ROUTER_WAN4))
    });
    assert_eq!(
        annotation(api, "web", WRITTEN).as_deref(),
        Some(ROUTER_WAN4)
    );
    // A dual-stack Service gets an address of each family.
    api.create(service("dual", "8081:http", 8081));
    api.set_lb_ips("apps", "dual", &[SERVER4, SERVER6]);
    let both = format!("{ROUTER_WAN4},{ROUTER_WAN6}");
    wait_for("dual's targets", || targets_are(api, "dual", Some(&both)));

    // The WAN address changes (a moment without one keeps the last known): every target
    // follows.
    router.ip(&["addr", "del", "203.0.113.1/24", "dev", "wan"]);
    router.add_addresses("wan", ["203.0.113.9/24"]);
    wait_for("web's target to follow", || {
        targets_are(api, "web", Some("203.0.113.9"))
    });
    let both = format!("203.0.113.9,{ROUTER_WAN6}");
    wait_for("dual's targets to follow", || {
        targets_are(api, "dual", Some(&both))
    });
    first.wait_log("external-dns target written");

    // A target set by hand is left as it is, and the Service is told.
    let mut hand = service("hand", "8082:http", 8082);
    hand["metadata"]["annotations"][ALPHA] = json!("home.example.net");
    api.create(hand);
    api.set_lb_ips("apps", "hand", &[SERVER4]);
    wait_for("hand's condition", || {
        condition(api, "hand").contains("DNS target set by hand to home.example.net")
    });
    assert_eq!(
        annotation(api, "hand", ALPHA).as_deref(),
        Some("home.example.net")
    );
    assert_eq!(annotation(api, "hand", CURRENT), None);
    assert_eq!(annotation(api, "hand", WRITTEN), None);

    // Changed by hand after the router wrote it: the router gives up what is still its own
    // (its record, the other key) and leaves the user's value.
    annotate(api, "web", json!({CURRENT: "web.example.net"}));
    wait_for("the router to give web's target up", || {
        annotation(api, "web", WRITTEN).is_none() && annotation(api, "web", ALPHA).is_none()
    });
    assert_eq!(
        annotation(api, "web", CURRENT).as_deref(),
        Some("web.example.net")
    );
    wait_for("web's condition to say so", || {
        condition(api, "web").contains("DNS target set by hand to web.example.net")
    });

    // Opting out removes the router's targets; a value other than on/off is refused with a
    // Warning and writes none.
    annotate(api, "dual", json!({OPT: "off"}));
    wait_for("dual's targets to go", || targets_are(api, "dual", None));
    annotate(api, "dual", json!({OPT: "maybe"}));
    wait_for("a warning about dual's annotation", || {
        api.events().iter().any(|e| {
            e["reason"] == "InvalidAnnotation"
                && e["regarding"]["name"] == "dual"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains(OPT) && n.contains("maybe"))
        })
    });
    assert!(targets_are(api, "dual", None));
    annotate(api, "dual", json!({OPT: null}));
    wait_for("dual's targets back", || {
        targets_are(api, "dual", Some(&both))
    });

    // A deleted Service: its targets are removed first, then its finalizer released.
    api.create(service("gone", "8083:http", 8083));
    api.set_lb_ips("apps", "gone", &[SERVER4]);
    wait_for("gone's target", || {
        targets_are(api, "gone", Some("203.0.113.9"))
    });
    api.delete("apps", "gone");
    wait_for("gone to be gone", || api.get("apps", "gone").is_none());
    let versions = api.versions("apps", "gone");
    let holds = |v: &Value| {
        v["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
    };
    let targeted = |v: &Value| !v["metadata"]["annotations"][ALPHA].is_null();
    let released = versions
        .iter()
        .position(|v| !v["metadata"]["deletionTimestamp"].is_null() && !holds(v))
        .expect("a version without the finalizer");
    assert!(!targeted(&versions[released]));
    assert!(
        versions[..released]
            .iter()
            .any(|v| holds(v) && !targeted(v) && !v["metadata"]["deletionTimestamp"].is_null()),
        "the target was removed in a step of its own before the release: {versions:#?}"
    );

    // Its mapping annotation removed: the same, and the Service stays.
    annotate(
        api,
        "dual",
        json!({"kube-port-forward-controller/mapping": null}),
    );
    wait_for("dual released", || finalizers(api, "dual").is_empty());
    assert!(targets_are(api, "dual", None));
    assert_eq!(annotation(api, "dual", WRITTEN), None);
    assert_rbac_covers(&api.requests());

    // Turned off: a restarted daemon takes back the targets it wrote, and only those.
    api.create(service("late", "8084:http", 8084));
    api.set_lb_ips("apps", "late", &[SERVER4]);
    wait_for("late's target", || {
        targets_are(api, "late", Some("203.0.113.9"))
    });
    first.kill();
    let _second = daemon(&setup, &[]);
    wait_for("late's target to go", || targets_are(api, "late", None));
    assert_eq!(
        annotation(api, "hand", ALPHA).as_deref(),
        Some("home.example.net")
    );
    assert_eq!(
        annotation(api, "web", CURRENT).as_deref(),
        Some("web.example.net")
    );
    assert_eq!(finalizers(api, "late"), [FINALIZER]);
}
