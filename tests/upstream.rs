//! Double NAT with a real IGD: the router sits behind an ISP box running miniupnpd, the
//! daemon maps each forward on it, and an internet-side client reaches the Service through
//! both NATs. Leases renewed, a conflict reported and resolved, the mapping deleted before
//! the finalizer goes, the IGD going away, restarting and coming back, the router's WAN
//! address changing. Needs root and miniupnpd (`tests/run.sh` installs it).

mod common;

use common::daemon::Daemon;
use common::scenario::*;
use common::upnp::*;
use common::*;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kube-port-forward");
const HEALTH: &str = "127.0.0.1:9911";

impl Rig {
    fn state_file(&self) -> String {
        self.dir.path.join("upstream.json").display().to_string()
    }

    /// The daemon on the router's WAN interface, with `extra` flags.
    fn daemon(&self, extra: &[&str]) -> Daemon {
        let state = self.state_file();
        let args = [&["--state-file", &state, "--health", HEALTH], extra].concat();
        Daemon::on_wan_interface(&self.nat.router, &self.dir, self.addr, "router-a", &args)
    }

    /// A Service in `apps` on the server, TCP and UDP on `port`, forwarded on the same port.
    fn create(&self, name: &str, port: u16) {
        let metadata = json!({"name": name, "namespace": "apps",
            "annotations": {"kube-port-forward-controller/mapping": "http, echo"}});
        self.api.create(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": metadata,
            "spec": {"type": "LoadBalancer", "ports": [
                {"name": "http", "port": port, "protocol": "TCP"},
                {"name": "echo", "port": port, "protocol": "UDP"}]}}),
        );
        self.api.set_lb_ips("apps", name, &[SERVER4]);
    }

    /// What the internet client gets on the box's `port`.
    fn internet_greeting(&self, port: u16) -> Option<String> {
        tcp_greeting(&self.nat.internet, self.nat.box_port(port)).ok()
    }

    /// What the internet client's datagram to the box's `port` gets back.
    fn internet_echo(&self, port: u16) -> Option<String> {
        udp_echo(&self.nat.internet, self.nat.box_port(port), "ping").ok()
    }

    fn condition(&self, name: &str) -> String {
        condition_message(&self.api, name, "router-a")
    }

    fn status(&self, format: &str) -> String {
        let state = self.state_file();
        self.nat
            .router
            .exec(BIN, &["status", "--output", format, "--state-file", &state])
    }

    fn has_event(&self, reason: &str, name: &str, text: &str) -> bool {
        self.api.events().iter().any(|e| {
            e["reason"] == reason
                && e["regarding"]["name"] == name
                && e["note"].as_str().is_some_and(|n| n.contains(text))
        })
    }
}

#[test]
fn through_both_nats_leases_renewed_conflicts_told_and_mappings_gone_before_release() {
    let rig = rig(&[8080, 9000]);
    // The router's firewall lets in from outside only what answers something it sent, as
    // OpenWrt's does: the IGD is found by the answer to the unicast search.
    rig.nat.router.nft(&[
        "-f",
        &rig.dir.write(
            "router-input.nft",
            "table inet fw {\n chain input {\n  type filter hook input priority 0; policy drop;\n  ct state established,related accept\n  iif lo accept\n }\n}\n",
        ),
    ]);
    let daemon = rig.daemon(&[
        "--upstream",
        "upnp",
        "--upstream-poll",
        "1",
        "--upstream-lease",
        "10",
        "--dns-targets",
    ]);
    daemon.wait_log("IGD found");
    rig.create("web", 8080);

    // The internet reaches the Service through the box and the router, TCP and UDP: the two
    // mappings are made one after the other, and the IGD installs each one's rules in turn,
    // so each path is waited for on its own.
    wait_for(
        "the internet client to reach web over TCP through both NATs",
        || rig.internet_greeting(8080).as_deref() == Some("hello 8080"),
    );
    wait_for(
        "the internet client to reach web over UDP through both NATs",
        || rig.internet_echo(8080).as_deref() == Some("echo 8080 ping"),
    );
    assert!(rig.nat.maps("TCP", 8080, ROUTER_WAN) && rig.nat.maps("UDP", 8080, ROUTER_WAN));

    // What the IGD said: condition, event, audit line, status, metrics, DNS target.
    let mapped = format!("upstream IGD maps 8080/TCP, 8080/UDP at {EXTERNAL}");
    wait_for("web's condition to tell the mapping", || {
        rig.condition("web").contains(&mapped)
    });
    wait_for("an UpstreamMapped event", || {
        rig.has_event("UpstreamMapped", "web", &mapped)
    });
    let log = daemon.log();
    assert!(log.contains("upstream mapping made") && log.contains("mapping=8080/TCP"));
    // The state file and the metrics follow the lane's report, which may come a moment
    // after the IGD made the mapping.
    let both_mapped = |status: &Value| {
        status["forwards"].as_array().is_some_and(|forwards| {
            forwards.len() == 2 && forwards.iter().all(|f| f["upstream"]["state"] == "mapped")
        })
    };
    wait_for("status to show both mappings", || {
        serde_json::from_str(&rig.status("json")).is_ok_and(|s: Value| both_mapped(&s))
    });
    let text = rig.status("text");
    assert!(
        text.contains(&format!("external address {EXTERNAL}")) && text.contains("UPSTREAM"),
        "{text}"
    );
    let status: Value = serde_json::from_str(&rig.status("json")).unwrap();
    assert_eq!(status["upstream"]["external"], EXTERNAL);
    let metrics = || {
        get(&rig.nat.router, 9911, "/metrics")
            .map(|m| m.1)
            .unwrap_or_default()
    };
    wait_for("the metrics to count both mappings", || {
        metrics().contains("kube_port_forward_upstream_mappings{state=\"mapped\"} 2")
    });
    let metrics = metrics();
    assert!(metrics.contains("kube_port_forward_upstream_up 1"));
    assert!(metrics.contains(&format!(
        "kube_port_forward_upstream_external_address_info{{address=\"{EXTERNAL}\"}} 1"
    )));
    wait_for("the IGD's external address as web's DNS target", || {
        rig.api.get("apps", "web").unwrap()["metadata"]["annotations"]["external-dns.alpha.kubernetes.io/target"]
            == EXTERNAL
    });

    // Leases of 10 s are renewed at half time: the remaining lease goes down past 5 s,
    // then back up, and the mapping never lapses.
    let lease = || {
        rig.nat
            .mappings()
            .iter()
            .find(|(p, e, _, _)| p == "TCP" && *e == 8080)
            .map(|m| m.3)
    };
    wait_for("the lease to run down past half", || {
        lease().is_some_and(|l| l <= 5)
    });
    wait_for("the lease to be renewed", || {
        lease().is_some_and(|l| l >= 7)
    });

    // A port another host behind the box holds: refused (718), told, and mapped once free.
    rig.nat
        .router
        .add_addresses("wan", [format!("{NEIGHBOUR}/24")]);
    assert!(rig.nat.neighbour_maps(9000));
    rig.create("game", 9000);
    let refused = "upstream IGD refused 9000/TCP: 718 ConflictInMappingEntry";
    wait_for("game's condition to tell the refusal", || {
        rig.condition("game").contains(refused)
    });
    wait_for("an UpstreamRefused event", || {
        rig.has_event("UpstreamRefused", "game", refused)
    });
    daemon.wait_log("the IGD refused an upstream mapping");
    wait_for("status to show the refusal", || {
        rig.status("text")
            .contains("refused 718 ConflictInMappingEntry")
    });
    assert!(rig.nat.neighbour_unmaps(9000));
    wait_for("game to be mapped once the port is free", || {
        rig.internet_greeting(9000).as_deref() == Some("hello 9000")
    });
    wait_for("game's condition to tell the mapping", || {
        rig.condition("game")
            .contains("upstream IGD maps 9000/TCP, 9000/UDP")
    });

    // Deleted: the mappings go from the IGD before the finalizer is released.
    rig.api.delete("apps", "web");
    wait_for("web to be gone", || rig.api.get("apps", "web").is_none());
    assert!(!rig.nat.maps("TCP", 8080, ROUTER_WAN) && !rig.nat.maps("UDP", 8080, ROUTER_WAN));
    assert!(rig.internet_greeting(8080).is_none());
    let log = daemon.log();
    let line_of = |words: &[&str]| {
        log.lines()
            .position(|l| words.iter().all(|w| l.contains(w)))
            .unwrap_or_else(|| panic!("{words:?} in the log:\n{log}"))
    };
    let deleted = line_of(&["upstream mapping deleted", "mapping=8080/TCP"]);
    let released = line_of(&["finalizer removed", "name=web "]);
    assert!(deleted < released, "{log}");
    assert!(rig.nat.maps("TCP", 9000, ROUTER_WAN));
}

#[test]
fn the_igd_going_away_restarting_and_the_wan_address_changing() {
    let mut rig = rig(&[8080, 9000]);
    // Without an upstream, a private WAN address is worth a warning.
    let mut plain = rig.daemon(&[]);
    plain.wait_log("the WAN address is private");
    plain.kill();

    let daemon = rig.daemon(&[
        "--upstream",
        "upnp",
        "--upstream-url",
        DESCRIPTION_URL,
        "--upstream-poll",
        "1",
        "--upstream-lease",
        "10",
        "--cleanup-deadline",
        "5",
    ]);
    rig.create("web", 8080);
    rig.create("old", 9000);
    wait_for("both reachable through both NATs", || {
        rig.internet_greeting(8080).as_deref() == Some("hello 8080")
            && rig.internet_greeting(9000).as_deref() == Some("hello 9000")
    });

    // The IGD goes away (its mappings stay in the box): Services are told, forwards stay,
    // and a Service deleted meanwhile is released at the cleanup deadline.
    rig.nat.stop_igd(false);
    wait_for("web's condition to tell the IGD is gone", || {
        rig.condition("web").contains("upstream not mapped")
    });
    wait_for("an UpstreamUnreachable event", || {
        rig.has_event("UpstreamUnreachable", "web", "upstream not mapped")
    });
    daemon.wait_log("the IGD does not answer");
    assert!(table_forwards_in(&rig.nat.router) >= 2);
    rig.api.delete("apps", "old");
    wait_for("a CleanupPending warning naming the IGD", || {
        rig.has_event("CleanupPending", "old", "IGD")
    });
    wait_for("old released at the deadline", || {
        rig.api.get("apps", "old").is_none()
    });

    // Back: everything is mapped again, and the mapping nobody wants any more is deleted.
    rig.nat.start_igd();
    wait_for("old's mapping deleted once the IGD is back", || {
        !rig.nat.maps("TCP", 9000, ROUTER_WAN)
    });
    wait_for("web mapped again", || {
        rig.condition("web").contains("upstream IGD maps 8080/TCP")
    });
    wait_for("web reachable through both NATs again", || {
        rig.internet_greeting(8080).as_deref() == Some("hello 8080")
    });

    // The box reboots (its mappings are lost) between two polls: its uptime going back
    // tells (or, if a poll fell in the gap, its not answering); everything is mapped again.
    wait_for("the IGD to be up a few seconds", || {
        rig.nat.uptime().is_some_and(|u| u >= 5)
    });
    let found = daemon.log().matches("IGD found").count();
    rig.nat.stop_igd(true);
    rig.nat.start_igd();
    wait_for("the daemon to notice the restart", || {
        let log = daemon.log();
        log.contains("the IGD restarted") || log.matches("IGD found").count() > found
    });
    wait_for("web reachable after the box restarted", || {
        rig.internet_greeting(8080).as_deref() == Some("hello 8080")
    });

    // The router's WAN address changes: the old mapping cannot be deleted from the new
    // address (secure mode) and lapses with its lease; then the new one is made.
    rig.nat
        .router
        .ip(&["addr", "del", &format!("{ROUTER_WAN}/24"), "dev", "wan"]);
    rig.nat.router.add_addresses("wan", ["192.168.1.4/24"]);
    rig.nat
        .router
        .ip(&["route", "replace", "default", "via", BOX_LAN]);
    wait_for("web mapped to the new address", || {
        rig.nat.maps("TCP", 8080, "192.168.1.4")
    });
    wait_for("web reachable again", || {
        rig.internet_greeting(8080).as_deref() == Some("hello 8080")
    });
    wait_for("status to show the new internal address", || {
        serde_json::from_str(&rig.status("json"))
            .is_ok_and(|s: Value| s["upstream"]["internal"] == "192.168.1.4")
    });
}

fn table_forwards_in(router: &Netns) -> usize {
    let status: Value =
        serde_json::from_str(&router.exec(BIN, &["status", "--output", "json"])).unwrap();
    status["forwards"].as_array().map_or(0, Vec::len)
}
