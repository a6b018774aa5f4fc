//! The cluster lane end to end: finalizers released from Services the daemon stops
//! watching, who keeps a port, and a restart that writes nothing when nothing changed. The
//! real binary runs `run` in the router namespace against the test API server. Needs root.

mod common;

use common::scenario::*;
use common::*;
use serde_json::json;

const HEALTH: &str = "127.0.0.1:9477";

fn labelled(name: &str, labels: serde_json::Value) -> serde_json::Value {
    let mut object = service(name, "80:http", 8080);
    object["metadata"]["labels"] = labels;
    object
}

#[test]
fn a_service_that_leaves_the_selector_is_released_and_can_be_deleted() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    let extra = ["--selector", "expose=yes", "--cleanup-deadline", "60"];
    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &extra);
    daemon.wait_log("ready");
    api.create(labelled("web", json!({"expose": "yes"})));
    api.set_lb_ips("apps", "web", &[SERVER4]);
    wait_for("the forward", || greets(&topology, 80, "hello 8080"));
    wait_for("the finalizer", || finalizers(&api, "web") == [FINALIZER]);

    // The label goes: the watch reports the Service deleted; it is not, and must not keep
    // this router's finalizer, nor its port.
    api.merge_patch(
        "apps",
        "web",
        json!({"metadata": {"labels": {"expose": null}}}),
        false,
    );
    wait_for("the finalizer to be released", || {
        finalizers(&api, "web").is_empty()
    });
    assert!(refused(&topology, 80));
    assert_eq!(table_forwards(&topology), 0);
    assert_eq!(api.delete("apps", "web"), http::StatusCode::OK);
    assert!(
        api.get("apps", "web").is_none(),
        "the Service stays Terminating"
    );
}

#[test]
fn a_narrower_scope_after_a_restart_releases_what_it_no_longer_watches() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    let mut daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    daemon.wait_log("ready");
    api.create(labelled("web", json!({"team": "a"})));
    api.set_lb_ips("apps", "web", &[SERVER4]);
    wait_for("the forward", || greets(&topology, 80, "hello 8080"));
    wait_for("the finalizer", || finalizers(&api, "web") == [FINALIZER]);
    daemon.kill();

    // Back with a selector the Service does not match: its forward closes and the
    // finalizer found by the start-up sweep is released.
    let extra = ["--selector", "team=b", "--cleanup-deadline", "60"];
    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &extra);
    wait_for("the finalizer to be released", || {
        finalizers(&api, "web").is_empty()
    });
    assert!(refused(&topology, 80));
    assert!(
        daemon
            .log()
            .contains("outside the watch holds this router's finalizer")
    );
    assert_eq!(api.delete("apps", "web"), http::StatusCode::OK);
    assert!(api.get("apps", "web").is_none());
    assert_rbac_covers(&api.requests());
}

#[test]
fn the_service_holding_a_port_keeps_it_against_an_older_one_across_restarts() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080, 8081]);
    let mut daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    daemon.wait_log("ready");
    // `a-old` is older (and first by name), but does not ask for a port yet.
    let mut old = service("a-old", "80:http", 8081);
    old["metadata"]["annotations"] = json!({});
    api.create(old);
    api.set_lb_ips("apps", "a-old", &[SERVER4]);
    create_with_address(&api, "b-new", "80:http", 8080);
    wait_for("b-new on port 80", || greets(&topology, 80, "hello 8080"));

    // Now the older one asks for the same port: the holder keeps it.
    api.merge_patch(
        "apps",
        "a-old",
        json!({"metadata": {"annotations": {"kube-port-forward-controller/mapping": "80:http"}}}),
        false,
    );
    wait_for("a-old's Conflict condition naming the holder", || {
        let c = &api.get("apps", "a-old").unwrap()["status"]["conditions"][0];
        c["reason"] == "Conflict"
            && c["message"]
                .as_str()
                .is_some_and(|m| m.contains("held by apps/b-new (it holds the port now)"))
    });
    assert!(greets(&topology, 80, "hello 8080"));

    // After a restart the kernel's owner comment says who holds it.
    daemon.kill();
    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    daemon.wait_log("ready");
    assert!(greets(&topology, 80, "hello 8080"));
    assert_eq!(finalizers(&api, "a-old"), Vec::<String>::new());

    // The holder goes: the port is free, and the one asking takes it.
    assert_eq!(api.delete("apps", "b-new"), http::StatusCode::OK);
    wait_for("a-old on port 80", || greets(&topology, 80, "hello 8081"));
    wait_for("b-new gone", || api.get("apps", "b-new").is_none());
}

#[test]
fn a_restart_with_nothing_changed_writes_nothing() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    let extra = ["--health", HEALTH, "--cleanup-deadline", "60"];
    let mut daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &extra);
    daemon.wait_log("ready");
    for (name, port) in [("web-1", 81), ("web-2", 82), ("web-3", 83)] {
        create_with_address(&api, name, &format!("{port}:http"), 8080);
    }
    wait_for("three conditions and finalizers", || {
        ["web-1", "web-2", "web-3"].iter().all(|n| {
            let s = api.get("apps", n).unwrap();
            finalizers(&api, n) == [FINALIZER]
                && s["status"]["conditions"][0]["reason"] == "Forwarded"
        })
    });
    wait_for("the bookkeeping to catch up", || {
        bookkeeping_idle(&topology.router, 9477)
    });
    daemon.kill();
    let before = writes(&api).len();
    let events_before = events_about(&api, "web-");

    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &extra);
    daemon.wait_log("ready");
    // A change after the restart, and its own bookkeeping done: whatever the restart would
    // have written was queued before it and is written by then.
    create_with_address(&api, "zz-probe", "84:http", 8080);
    wait_for("the probe's finalizer and condition", || {
        finalizers(&api, "zz-probe") == [FINALIZER]
            && api.get("apps", "zz-probe").unwrap()["status"]["conditions"][0]["reason"]
                == "Forwarded"
    });
    wait_for("the bookkeeping to catch up", || {
        bookkeeping_idle(&topology.router, 9477)
    });
    let after: Vec<String> = writes(&api).split_off(before);
    let about_old: Vec<&String> = after.iter().filter(|r| r.contains("web-")).collect();
    assert!(
        about_old.is_empty(),
        "written again after a restart: {about_old:?}"
    );
    // Events are posted to the namespace, not the Service's path: none may be about the
    // three old Services either (repeats count in a series).
    assert!(
        events_before >= 6,
        "PortsOpened and Forwarded for each: {events_before}"
    );
    assert_eq!(
        events_about(&api, "web-"),
        events_before,
        "events again after a restart"
    );
    assert!(greets(&topology, 81, "hello 8080"));
}

#[test]
fn a_cleanup_deadline_starts_afresh_when_the_service_asks_again() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    let (wrapper, marker) = nft_failing(&dir);
    let extra = ["--cleanup-deadline", "3", "--nft", &wrapper];
    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &extra);
    create_with_address(&api, "web", "80:http", 8080);
    wait_for("port 80", || greets(&topology, 80, "hello 8080"));
    wait_for("the finalizer", || finalizers(&api, "web") == [FINALIZER]);
    let mapping = |value: serde_json::Value| json!({"metadata": {"annotations": {"kube-port-forward-controller/mapping": value}}});

    // The forward cannot be removed (the table needs a rebuild, which fails): the cleanup
    // deadline starts...
    std::fs::write(&marker, "").unwrap();
    stray_set(&topology.router, true);
    daemon.wait_log("injected failure");
    api.merge_patch("apps", "web", mapping(json!(null)), false);
    wait_for("a CleanupFailed warning", || {
        event_count(&api, "CleanupFailed") > 0
    });
    // ...and stops when the Service asks for the port again and the table is whole again:
    // nothing to change, the apply succeeds.
    api.merge_patch("apps", "web", mapping(json!("80:http")), false);
    stray_set(&topology.router, false);
    daemon.wait_log("the table is in step again after failed applies");
    let asked_again = std::time::Instant::now();
    wait_for("more than the deadline to pass", || {
        asked_again.elapsed() > std::time::Duration::from_secs(4)
    });

    // A new cleanup gets a deadline of its own: warned again, not released at once.
    let failed = event_count(&api, "CleanupFailed");
    stray_set(&topology.router, true);
    api.merge_patch("apps", "web", mapping(json!(null)), false);
    wait_for("a new CleanupFailed warning", || {
        event_count(&api, "CleanupFailed") > failed
    });
    assert_eq!(event_count(&api, "CleanupAbandoned"), 0);
    assert_eq!(finalizers(&api, "web"), [FINALIZER]);
    // Every CleanupFailed is one Event object, counted in its series.
    let objects = api
        .events()
        .iter()
        .filter(|e| e["reason"] == "CleanupFailed")
        .count();
    assert_eq!(objects, 1, "{:?}", api.events());

    // Once nft works, the forward goes and the finalizer with it.
    std::fs::remove_file(&marker).unwrap();
    wait_for("the release", || finalizers(&api, "web").is_empty());
    assert!(refused(&topology, 80));
}
