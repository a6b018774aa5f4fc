//! The daemon end to end: the real binary runs `run` in the router namespace with a
//! kubeconfig pointing at the test API server (listening in that namespace too), and a
//! client on the WAN side connects through the forwards to the server on the LAN side.
//! Needs root.

mod common;

use common::apiserver::ApiServer;
use common::daemon::Daemon;
use common::scenario::*;
use common::*;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_kube-port-forward");
#[test]
fn lifecycle_create_address_remap_delete() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    daemon.wait_log("ready");

    api.create(service("web", "80:http", 8080));
    // No address yet: waiting, no forward, no finalizer; the condition says so.
    wait_for("the Waiting condition", || {
        api.get("apps", "web").unwrap()["status"]["conditions"][0]["reason"] == "Waiting"
    });
    assert!(finalizers(&api, "web").is_empty());

    api.set_lb_ips("apps", "web", &[SERVER4]);
    wait_for("port 80 to reach the server", || {
        greets(&topology, 80, "hello 8080")
    });
    wait_for("the finalizer", || finalizers(&api, "web") == [FINALIZER]);
    wait_for("the Forwarded condition", || {
        let s = api.get("apps", "web").unwrap();
        let c = &s["status"]["conditions"][0];
        c["type"] == "kube-port-forward-controller/router-a" && c["status"] == "True"
    });

    api.merge_patch(
        "apps",
        "web",
        json!({"metadata": {"annotations": {"kube-port-forward-controller/mapping": "81:http"}}}),
        false,
    );
    wait_for("port 81 to reach the server", || {
        greets(&topology, 81, "hello 8080")
    });
    assert!(refused(&topology, 80));

    assert_eq!(api.delete("apps", "web"), http::StatusCode::OK);
    wait_for("the Service to go", || api.get("apps", "web").is_none());
    // The finalizer was released only after the rule left the kernel.
    assert_eq!(table_forwards(&topology), 0);
    assert!(refused(&topology, 81));
    let reasons: Vec<String> = api
        .events()
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    for reason in ["Waiting", "PortsOpened", "PortsClosed", "Forwarded"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} event in {reasons:?}"
        );
    }
    assert!(daemon.log().contains("action=\"open\""), "no audit line");
    // The ClusterRole shipped in deploy/ grants every request the daemon made.
    assert_rbac_covers(&api.requests());
}

#[test]
fn killed_and_restarted_the_daemon_keeps_rules_and_finishes_cleanup() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    create_with_address(&api, "web", "80:http", 8080);
    create_with_address(&api, "kept", "82:http", 8080);
    let mut daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    wait_for("the finalizers", || {
        finalizers(&api, "web") == [FINALIZER] && finalizers(&api, "kept") == [FINALIZER]
    });
    assert!(greets(&topology, 80, "hello 8080"));

    daemon.kill();
    // While the daemon is down, the rules stay and the Service cannot go.
    assert_eq!(api.delete("apps", "web"), http::StatusCode::OK);
    assert!(greets(&topology, 80, "hello 8080"));
    assert_eq!(finalizers(&api, "web"), [FINALIZER]);

    // A restart changes nothing until the list is complete, then finishes the cleanup.
    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    wait_for("the Service to go", || api.get("apps", "web").is_none());
    assert!(refused(&topology, 80));
    assert!(greets(&topology, 82, "hello 8080"));
    assert_eq!(table_forwards(&topology), 1);
    drop(daemon);
}

#[test]
fn a_service_deleted_and_force_released_while_down_is_swept_at_start() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    create_with_address(&api, "web", "80:http", 8080);
    let mut daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    wait_for("port 80 to reach the server", || {
        greets(&topology, 80, "hello 8080")
    });
    wait_for("the finalizer", || finalizers(&api, "web") == [FINALIZER]);
    daemon.kill();

    api.delete("apps", "web");
    api.force_remove_finalizers("apps", "web");
    assert!(api.get("apps", "web").is_none());
    assert!(
        greets(&topology, 80, "hello 8080"),
        "the orphan is still there while down"
    );

    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    wait_for("the orphan to be swept", || refused(&topology, 80));
    daemon.wait_log("action=\"close\"");
}

#[test]
fn an_api_outage_keeps_the_rules_and_a_fresh_history_recovers() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    create_with_address(&api, "web", "80:http", 8080);
    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    wait_for("port 80 to reach the server", || {
        greets(&topology, 80, "hello 8080")
    });

    api.stop();
    daemon.wait_log("watching Services failed");
    assert!(
        greets(&topology, 80, "hello 8080"),
        "rules stay while the API is away"
    );

    // The API server comes back having forgotten its history: the daemon's version is too
    // old (410), it lists again, and carries on.
    api.forget_history();
    api.listen_at(Some(&topology.router), addr.port());
    create_with_address(&api, "new", "83:http", 8080);
    wait_for("port 83 to reach the server", || {
        greets(&topology, 83, "hello 8080")
    });
    assert!(greets(&topology, 80, "hello 8080"));
}

#[test]
fn two_routers_each_clean_their_own_and_the_service_waits_for_both() {
    let a = Topology::new();
    let b = Topology::new();
    let _sa = Server::start(&a.server, 8080);
    let _sb = Server::start(&b.server, 8080);
    let api = ApiServer::new();
    let addr_a = api.listen(Some(&a.router));
    let addr_b = api.listen(Some(&b.router));
    let dir = TempDir::new();
    const FINALIZER_B: &str = "kube-port-forward-controller/router-b";
    let _da = start_daemon(&a.router, &dir, addr_a, "router-a", FINALIZER, &[]);
    let mut db = start_daemon(&b.router, &dir, addr_b, "router-b", FINALIZER_B, &[]);
    create_with_address(&api, "web", "80:http", 8080);
    wait_for("both finalizers", || {
        let f = finalizers(&api, "web");
        f.len() == 2 && f.iter().any(|x| x == FINALIZER) && f.iter().any(|x| x == FINALIZER_B)
    });
    assert!(greets(&a, 80, "hello 8080") && greets(&b, 80, "hello 8080"));
    wait_for("both conditions", || {
        api.get("apps", "web").unwrap()["status"]["conditions"]
            .as_array()
            .is_some_and(|c| c.len() == 2)
    });

    db.kill();
    api.delete("apps", "web");
    wait_for("router a to clean up and release", || {
        finalizers(&api, "web") == [FINALIZER_B]
    });
    assert!(refused(&a, 80));
    assert!(
        greets(&b, 80, "hello 8080"),
        "router b has not cleaned up yet"
    );
    assert!(api.get("apps", "web").is_some());

    let _db = start_daemon(&b.router, &dir, addr_b, "router-b", FINALIZER_B, &[]);
    wait_for("the Service to go", || api.get("apps", "web").is_none());
    assert!(refused(&b, 80));
}

#[test]
fn the_older_service_wins_and_the_next_takes_over_when_it_goes() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080, 9090]);
    let _daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    // The API server sets creationTimestamp itself, to the second. "z-older" sorts after
    // "a-newer" by name, so only its age can make it win.
    let older = api.create(service("z-older", "80:http", 8080));
    api.set_lb_ips("apps", "z-older", &[SERVER4]);
    wait_for("the older Service on port 80", || {
        greets(&topology, 80, "hello 8080")
    });
    let created = older["metadata"]["creationTimestamp"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for("the clock to pass the older Service's second", || {
        jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
            > created
    });
    create_with_address(&api, "a-newer", "80:http", 9090);
    wait_for("the Conflict condition naming the winner", || {
        let s = api.get("apps", "a-newer").unwrap();
        let c = &s["status"]["conditions"][0];
        c["reason"] == "Conflict"
            && c["message"]
                .as_str()
                .unwrap_or_default()
                .contains("apps/z-older")
    });
    assert!(finalizers(&api, "a-newer").is_empty());
    assert!(greets(&topology, 80, "hello 8080"));
    assert!(
        api.events()
            .iter()
            .any(|e| e["type"] == "Warning" && e["reason"] == "Conflict")
    );

    api.delete("apps", "z-older");
    wait_for("the newer Service to take over", || {
        greets(&topology, 80, "hello 9090")
    });
    wait_for("the older Service to go", || {
        api.get("apps", "z-older").is_none()
    });
    wait_for("the newer Service's finalizer", || {
        finalizers(&api, "a-newer") == [FINALIZER]
    });
}

#[test]
fn a_service_the_api_server_stored_oddly_does_not_stop_the_others() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    // Transcript 18: a condition a strict client cannot decode, stored as sent.
    api.create(service("odd", "84:http", 8080));
    api.merge_patch(
        "apps",
        "odd",
        json!({"status": {"conditions": [{"type": "Forwarded on router a", "status": "Yes", "reason": "", "message": "x"}],
            "loadBalancer": {"ingress": [{"ip": SERVER4}]}}}),
        true,
    );
    create_with_address(&api, "web", "80:http", 8080);
    let _daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    wait_for("both ports to reach the server", || {
        greets(&topology, 80, "hello 8080") && greets(&topology, 84, "hello 8080")
    });
}

#[test]
fn killed_between_any_two_steps_nothing_is_lost_or_orphaned() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080, 9090]);
    let mut daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    let restart = |daemon: &mut Daemon| {
        daemon.kill();
        *daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    };
    api.create(service("web", "80:http", 8080));
    restart(&mut daemon);
    api.set_lb_ips("apps", "web", &[SERVER4]);
    wait_for("port 80", || greets(&topology, 80, "hello 8080"));
    restart(&mut daemon);
    assert!(
        greets(&topology, 80, "hello 8080"),
        "a restart keeps the rule"
    );
    wait_for("the finalizer", || finalizers(&api, "web") == [FINALIZER]);
    daemon.kill();
    api.merge_patch(
        "apps",
        "web",
        json!({"spec": {"ports": [{"name": "http", "port": 9090, "protocol": "TCP"}]},
            "metadata": {"annotations": {"kube-port-forward-controller/mapping": "81:http"}}}),
        false,
    );
    restart(&mut daemon);
    wait_for("port 81 to the new port", || {
        greets(&topology, 81, "hello 9090")
    });
    wait_for("port 80 to close", || refused(&topology, 80));
    restart(&mut daemon);
    assert!(greets(&topology, 81, "hello 9090"));
    daemon.kill();
    api.delete("apps", "web");
    restart(&mut daemon);
    wait_for("the Service to go", || api.get("apps", "web").is_none());
    assert!(refused(&topology, 81));
    assert_eq!(table_forwards(&topology), 0);
}

#[test]
fn release_finalizers_frees_every_service_for_uninstall() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[]);
    for name in ["a", "b"] {
        api.create(service(
            name,
            &format!("{}:http", if name == "a" { 80 } else { 81 }),
            8080,
        ));
        api.set_lb_ips("apps", name, &[SERVER4]);
    }
    let mut daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &[]);
    wait_for("the finalizers", || {
        finalizers(&api, "a") == [FINALIZER] && finalizers(&api, "b") == [FINALIZER]
    });
    daemon.kill();
    let kubeconfig = dir.write("release.kubeconfig", &ApiServer::kubeconfig(addr));
    let out = topology
        .router
        .exec(BIN, &["release-finalizers", "--kubeconfig", &kubeconfig]);
    assert!(
        out.contains("released the finalizer of 2 Services"),
        "{out}"
    );
    assert!(finalizers(&api, "a").is_empty() && finalizers(&api, "b").is_empty());
}

/// The daemon's writes and `release-finalizers`' are recorded as the daemon's: its
/// finalizer, DNS target and events by an update, its condition on the status subresource,
/// all under the manager `kube-port-forward`.
#[test]
fn managed_fields_name_the_daemon_as_the_manager_of_its_writes() {
    const MANAGER: &str = "kube-port-forward";
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    let extra = ["--cleanup-deadline", "60", "--dns-targets"];
    let mut daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &extra);
    create_with_address(&api, "web", "80:http", 8080);
    let target = "external-dns.alpha.kubernetes.io/target";
    wait_for("the finalizer, the condition and the DNS target", || {
        let web = api.get("apps", "web").unwrap();
        finalizers(&api, "web") == [FINALIZER]
            && web["status"]["conditions"][0]["reason"] == "Forwarded"
            && web["metadata"]["annotations"][target] == ROUTER_WAN4
    });
    let web = api.get("apps", "web").unwrap();
    let fields_of = |subresource: Option<&str>| -> serde_json::Value {
        let entries = &web["metadata"]["managedFields"];
        entries
            .as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["manager"] == MANAGER
                    && e["operation"] == "Update"
                    && e["subresource"].as_str() == subresource
            })
            .unwrap_or_else(|| panic!("no entry of {MANAGER} for {subresource:?}: {entries:#}"))
            ["fieldsV1"]
            .clone()
    };
    let update = fields_of(None);
    let finalizer = format!("v:{}", json!(FINALIZER));
    assert!(
        update["f:metadata"]["f:finalizers"][&finalizer].is_object(),
        "{update:#}"
    );
    assert!(
        update["f:metadata"]["f:annotations"][format!("f:{target}")].is_object(),
        "{update:#}"
    );
    let status = fields_of(Some("status"));
    let condition = format!(
        "k:{}",
        json!({"type": "kube-port-forward-controller/router-a"})
    );
    assert!(
        status["f:status"]["f:conditions"][&condition].is_object(),
        "{status:#}"
    );
    let events = api.events();
    assert!(!events.is_empty());
    for event in &events {
        assert_eq!(
            event["metadata"]["managedFields"][0]["manager"], MANAGER,
            "{event:#}"
        );
    }

    // `release-finalizers` only removes, which leaves no entry of its own: its request names
    // the manager.
    daemon.kill();
    let before = api.requests().len();
    let kubeconfig = dir.write("release.kubeconfig", &ApiServer::kubeconfig(addr));
    let out = topology
        .router
        .exec(BIN, &["release-finalizers", "--kubeconfig", &kubeconfig]);
    assert!(out.contains("released the finalizer of 1 Service"), "{out}");
    assert!(finalizers(&api, "web").is_empty());
    let patches: Vec<String> = api.requests()[before..]
        .iter()
        .filter(|r| r.starts_with("PATCH "))
        .cloned()
        .collect();
    assert!(
        !patches.is_empty()
            && patches
                .iter()
                .all(|r| r.contains(&format!("fieldManager={MANAGER}"))),
        "{patches:?}"
    );
}

#[test]
fn a_cleanup_that_keeps_failing_is_retried_warned_then_released_and_swept_later() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    let (wrapper, marker) = nft_failing(&dir);
    let daemon = start_daemon(
        &topology.router,
        &dir,
        addr,
        "router-a",
        FINALIZER,
        &["--cleanup-deadline", "3", "--nft", &wrapper],
    );
    create_with_address(&api, "web", "80:http", 8080);
    wait_for("port 80", || greets(&topology, 80, "hello 8080"));
    wait_for("the finalizer", || finalizers(&api, "web") == [FINALIZER]);

    // Removing the forward now needs a rebuild, and every rebuild fails.
    std::fs::write(&marker, "").unwrap();
    stray_set(&topology.router, true);
    daemon.wait_log("injected failure");
    api.delete("apps", "web");
    let warned = |reason: &str| {
        api.events()
            .iter()
            .any(|e| e["type"] == "Warning" && e["reason"] == reason)
    };
    wait_for("a CleanupFailed warning", || warned("CleanupFailed"));
    // nft's own words are in the event.
    assert!(
        api.events().iter().any(|e| e["reason"] == "CleanupFailed"
            && e["note"]
                .as_str()
                .is_some_and(|n| n.contains("injected failure"))),
        "{:?}",
        api.events()
    );
    // CleanupFailed is only sent while the deadline has not passed, so the finalizer was
    // holding the Service then.
    wait_for("the release past the deadline", || {
        api.get("apps", "web").is_none()
    });
    // The event and the release are written side by side: either may land first.
    wait_for("a CleanupAbandoned warning", || warned("CleanupAbandoned"));
    daemon.wait_log("release-anyway");
    assert!(
        greets(&topology, 80, "hello 8080"),
        "the rule could not be removed yet"
    );

    std::fs::remove_file(&marker).unwrap();
    wait_for("the orphan to be swept once nft works", || {
        refused(&topology, 80)
    });
}

#[test]
fn the_policy_refuses_with_a_warning_and_a_reload_closes_what_it_no_longer_allows() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    let policy = dir.write("policy.yaml", "namespaces: [apps]\nports: \"80-90\"\n");
    let daemon = start_daemon(
        &topology.router,
        &dir,
        addr,
        "router-a",
        FINALIZER,
        &["--cleanup-deadline", "60", "--policy", &policy],
    );
    create_with_address(&api, "web", "80:http", 8080);
    create_with_address(&api, "ssh", "2222:http", 8080);
    wait_for("port 80", || greets(&topology, 80, "hello 8080"));
    wait_for("the Refused warning for port 2222", || {
        api.events().iter().any(|e| {
            e["type"] == "Warning"
                && e["reason"] == "Refused"
                && e["note"].as_str().unwrap_or_default().contains("2222")
        })
    });
    assert!(refused(&topology, 2222));
    daemon.wait_log("action=\"refuse\"");
    assert!(finalizers(&api, "ssh").is_empty());
    wait_for("the finalizer on web", || {
        finalizers(&api, "web") == [FINALIZER]
    });

    // The owner narrows the policy and reloads: the forward it no longer allows closes
    // and its finalizer is released, without a restart.
    std::fs::write(&policy, "namespaces: [games]\n").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for("port 80 to close", || refused(&topology, 80));
    wait_for("the finalizer to be released", || {
        finalizers(&api, "web").is_empty()
    });
    daemon.wait_log("policy reloaded");
    // The kubeconfig the tests write is world-readable: warned about, token not logged.
    assert!(
        daemon
            .log()
            .contains("kubeconfig is readable by other users")
    );
    assert!(!daemon.log().contains("test-token"));
}

#[test]
fn a_namespace_selector_follows_the_labels_of_namespaces() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    api.put_namespace("apps", json!({}));
    let _daemon = start_daemon(
        &topology.router,
        &dir,
        addr,
        "router-a",
        FINALIZER,
        &["--allow-namespace-selector", "router-access=yes"],
    );
    create_with_address(&api, "web", "80:http", 8080);
    wait_for("the Refused condition", || {
        api.get("apps", "web").unwrap()["status"]["conditions"][0]["reason"] == "Refused"
    });
    assert!(refused(&topology, 80));

    api.put_namespace("apps", json!({"router-access": "yes"}));
    wait_for("port 80 once the namespace is labelled", || {
        greets(&topology, 80, "hello 8080")
    });
    wait_for("the finalizer", || finalizers(&api, "web") == [FINALIZER]);

    api.put_namespace("apps", json!({"router-access": "no"}));
    wait_for("port 80 to close with the label", || refused(&topology, 80));
    wait_for("the finalizer to go", || finalizers(&api, "web").is_empty());
    // The Namespace watch asked for metadata only.
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces?")
                && r.contains("labelSelector=router-access"))
    );
    assert_rbac_covers(&api.requests());
}

#[test]
fn an_nft_that_hangs_is_killed_and_the_forward_comes_once_it_works() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    let (wrapper, marker) = nft_hanging(&dir);
    std::fs::write(&marker, "").unwrap();
    let extra = ["--nft", &wrapper, "--nft-timeout", "1"];
    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &extra);
    create_with_address(&api, "web", "80:http", 8080);
    daemon.wait_log("did not finish within 1 s and was killed");
    assert!(
        finalizers(&api, "web").is_empty(),
        "no finalizer before the forward is live"
    );
    std::fs::remove_file(&marker).unwrap();
    wait_for("port 80 once nft works", || {
        greets(&topology, 80, "hello 8080")
    });
    wait_for("the finalizer", || finalizers(&api, "web") == [FINALIZER]);
}

/// In steady state the daemon starts no process: forwards come and go as netlink batches,
/// reads are netlink dumps, and its own commits announced by nf_tables are not answered with
/// a rebuild. `nft` runs once, to build the table.
#[test]
fn a_hundred_changes_after_start_run_no_nft() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080]);
    let (wrapper, runs) = nft_counting(&dir);
    let extra = ["--nft", &wrapper];
    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &extra);
    daemon.wait_log("ready");
    let count = || {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(count(), 1, "the table is built once");
    for i in 0..50u16 {
        create_with_address(
            &api,
            &format!("web-{i}"),
            &format!("{}:http", 1000 + i),
            8080,
        );
    }
    for i in 0..50u16 {
        wait_for("each port", || greets(&topology, 1000 + i, "hello 8080"));
    }
    for i in 0..50u16 {
        api.delete("apps", &format!("web-{i}"));
    }
    wait_for("every Service gone", || {
        (0..50u16).all(|i| api.get("apps", &format!("web-{i}")).is_none())
    });
    assert!(refused(&topology, 1049));
    assert_eq!(count(), 1, "nft ran again after start");
}

/// `status` shows what the daemon wrote of every entry, in each state with its reason, and
/// asks its health server whether it is ready; a killed daemon shows as not running, and
/// one that stops cleanly removes its status file.
#[test]
fn status_shows_every_entry_and_whether_the_daemon_runs_and_is_ready() {
    let Setup {
        topology,
        api,
        addr,
        dir,
        _servers,
    } = setup(&[8080, 9090]);
    let extra = [
        "--cleanup-deadline",
        "60",
        "--allow-ports",
        "80-90",
        "--health",
        "127.0.0.1:9477",
        "--dns-targets",
    ];
    let mut daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &extra);
    let status = |daemon: &Daemon| -> serde_json::Value {
        let args = [
            "status",
            "--output",
            "json",
            "--status-file",
            &daemon.status_file,
        ];
        serde_json::from_str(&topology.router.exec(BIN, &args)).unwrap()
    };
    // The port's holder wins a conflict: web holds port 80 before its rival comes.
    create_with_address(&api, "web", "80:http", 8080);
    wait_for("port 80", || greets(&topology, 80, "hello 8080"));
    create_with_address(&api, "rival", "80:http", 9090);
    create_with_address(&api, "ssh", "2222:http", 8080);
    api.create(service("idle", "83:http", 8080));
    create_with_address(&api, "bad", "70000:http", 8080);
    let expected = [
        ("bad", "invalid"),
        ("idle", "waiting"),
        ("rival", "conflict"),
        ("ssh", "refused"),
        ("web", "forwarding"),
    ];
    let states = |status: &serde_json::Value| -> Vec<(String, String)> {
        let mut states: Vec<(String, String)> = status["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let text = |key: &str| s[key].as_str().unwrap_or_default().to_owned();
                (text("name"), text("state"))
            })
            .collect();
        states.sort();
        states
    };
    wait_for("every state in the status, the daemon ready", || {
        let status = status(&daemon);
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect();
        states(&status) == expected
            && status["daemon"]["ready"] == true
            && status["services"][4]["dns_target"] == ROUTER_WAN4
    });
    let now = status(&daemon);
    let d = &now["daemon"];
    assert_eq!(d["running"], true, "{now:#}");
    assert_eq!(d["pid"], daemon.pid(), "{now:#}");
    assert_eq!(d["health"], "127.0.0.1:9477", "{now:#}");
    assert_eq!(d["readyz"], "ready", "{now:#}");
    assert!(d["last_sync"].as_u64().is_some_and(|t| t > 0), "{now:#}");
    assert!(d["started"].as_u64().is_some_and(|t| t > 0), "{now:#}");
    let entry = |name: &str| {
        now["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    let web = entry("web");
    assert_eq!(web["namespace"], "apps");
    assert_eq!(web["key"]["external_port"], 80, "{web:#}");
    assert_eq!(web["backends"][0]["addr"], SERVER4, "{web:#}");
    assert_eq!(web["reason"], serde_json::Value::Null, "{web:#}");
    assert_eq!(entry("rival")["winner"], "apps/web");
    for (name, said) in [
        ("rival", "held by apps/web"),
        ("ssh", "2222"),
        ("idle", "LoadBalancer address"),
        ("bad", "70000"),
    ] {
        let entry = entry(name);
        assert!(
            entry["reason"].as_str().is_some_and(|r| r.contains(said)),
            "{entry:#}"
        );
        assert_eq!(entry["dns_target"], serde_json::Value::Null, "{entry:#}");
    }
    let text = topology
        .router
        .exec(BIN, &["status", "--status-file", &daemon.status_file]);
    assert!(
        text.starts_with(&format!("daemon: running (pid {}), ready", daemon.pid())),
        "{text}"
    );
    assert!(text.contains("Not forwarded:"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("refused") && l.contains("apps/ssh")),
        "{text}"
    );

    daemon.kill();
    let gone = status(&daemon);
    assert_eq!(gone["daemon"]["running"], false, "{gone:#}");
    assert_eq!(gone["daemon"]["ready"], serde_json::Value::Null, "{gone:#}");
    assert_eq!(gone["services"].as_array().map(Vec::len), Some(5));

    // A clean stop removes the file.
    let daemon = start_daemon(&topology.router, &dir, addr, "router-a", FINALIZER, &extra);
    wait_for("the restarted daemon in the status", || {
        status(&daemon)["daemon"]["running"] == true
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for("the status file to go", || {
        !std::path::Path::new(&daemon.status_file).exists()
    });
    daemon.wait_log("stopped");
}
