//! The LuCI app in a real browser, against the real LuCI: the LuCI test rig
//! (`../shared/luci-rig`, or `KPF_LUCI_RIG`) runs OpenWrt's ubusd, rpcd and uhttpd in a
//! chroot inside the router's network namespace, with the app's files, the real binary and
//! `nft` laid over it; the daemon runs inside the rig as on a router, against the test API
//! server, with Services in every state; headless Chromium (`tests/luci/driver.py`, run by
//! the Python of `KPF_LUCI_PYTHON`, default `target/luci-venv/bin/python`) logs in and is
//! driven page by page. Screenshots go to `target/luci-shots/`. Needs root, the rig,
//! Debian's `chromium` and `chromium-driver`, and selenium (tests/run.sh installs them).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::apiserver::ApiServer;
use common::*;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kube-port-forward");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// How long any one condition may take to come true, in the browser or in the rig: a busy
/// two-core machine starts Chromium and LuCI slowly, and the status page polls every 5 s.
const PATIENCE: Duration = Duration::from_secs(180);
/// The rig's uhttpd, inside the router namespace: no other test can hold the port there.
const LUCI: &str = "http://127.0.0.1:8080";
/// The two backends of `apps/shop`: the first listens, the second does not, so the
/// daemon's health check (a TCP connection) takes it out.
const SHOP_SERVING: &str = "192.168.50.11";
const SHOP_DOWN: &str = "192.168.50.12";
const CONFIG: &str = "etc/config/kube-port-forward";
const KUBECONFIG: &str = "etc/kube-port-forward/kubeconfig";

#[test]
fn the_pages_show_the_daemon_and_configure_it() {
    let rig_dir = rig_dir();
    let python = browser_python();
    let topology = Topology::new();
    let dir = TempDir::new();
    let api = ApiServer::new();
    let api_addr = api.listen(Some(&topology.router));
    let _web = Server::start(&topology.server, 8080);
    for addr in [SHOP_SERVING, SHOP_DOWN] {
        topology
            .server
            .ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
    }
    let _shop = Backend::start(&topology.server, SHOP_SERVING, 8443, None);
    create_services(&api);

    let overlay = overlay(&dir, &ApiServer::kubeconfig(api_addr));
    let rig = Rig::start(&rig_dir, &dir.path.join("rig"), &overlay, &topology.router);
    let _procd = ServiceEvents::start(&rig, &dir.path.join("service-events.log"));
    let mut daemon = RigDaemon::spawn(
        &rig,
        &dir.path.join("daemon.log"),
        &[
            "--kubeconfig",
            &format!("/{KUBECONFIG}"),
            "--wan-interface",
            "wan",
            "--health",
            "127.0.0.1:9477",
            "--allow-ports",
            "80,443,8000-8999",
            "--check-interval",
            "0.5",
            "--check-timeout",
            "0.4",
            "--table",
            "kube_port_forward",
        ],
    );
    daemon_settled(&rig, &mut daemon);
    // Traffic through apps/web, for its counters.
    wait_until("port 80 to reach apps/web through the router", || {
        let greeting = tcp_greeting(
            &topology.client,
            format!("{ROUTER_WAN4}:80").parse().unwrap(),
        );
        match greeting {
            Ok(g) if g == "hello 8080" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    let shots = shots_dir();
    let mut browser = Browser::start(&python, &topology.router, &dir.path.join("driver.log"));
    let login = browser.call(json!({"cmd": "login", "user": "root", "password": "kpf-test"}));
    // Services > Kubernetes Forwards, whose first page is the status page, with a tab to
    // the settings page.
    let menu = "/cgi-bin/luci/admin/services/kube-port-forward";
    assert!(
        login["links"].as_array().unwrap().iter().any(|l| l == menu),
        "LuCI's menu has no link to {menu}; its links: {}",
        login["links"]
    );
    let opened = browser.call(json!({"cmd": "open", "path": "admin/services/kube-port-forward"}));
    let settings = format!("{menu}/settings");
    assert!(
        opened["links"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| *l == settings),
        "the page has no link to {settings}; its links: {}",
        opened["links"]
    );
    status_page(&mut browser, &rig, &shots);

    daemon.kill();
    let stopped = browser.call(json!({"cmd": "wait_attr", "css": "#kpf-daemon",
        "attr": "data-state", "value": "stopped"}));
    let text = stopped["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("not running"),
        "#kpf-daemon is data-state=stopped but says {text:?}, not \"not running\""
    );
    browser.call(json!({"cmd": "shot", "path": shots.join("status-stopped.png")}));

    settings_page(&mut browser, &rig, &shots);
    kubeconfig_upload(&mut browser, &rig, &dir, api_addr);

    let report = browser.call(json!({"cmd": "report"}));
    for (key, what) in [
        ("console_errors", "SEVERE browser console entries"),
        (
            "ubus_errors",
            "failed ubus calls to objects the rig provides",
        ),
    ] {
        let found = report[key].as_array().cloned().unwrap_or_default();
        assert!(
            found.is_empty(),
            "{} {what}:\n{}",
            found.len(),
            lines(&found)
        );
    }
    eprintln!(
        "{} ubus calls; to services the rig lacks (information): {}",
        report["calls"], report["ubus_absent"]
    );
}

/// The Services, one per state: two forwarding (`apps/shop` with two backends, one
/// failing its health check), a conflict, refused by the port policy, waiting for an
/// address, and an invalid mapping.
fn create_services(api: &ApiServer) {
    let service = |name: &str, mapping: &str, port: (&str, u16), extra: Value| {
        let mut spec = json!({"type": "LoadBalancer",
            "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}]});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        api.create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "apps",
                "annotations": {"kube-port-forward-controller/mapping": mapping}},
            "spec": spec}));
    };
    // apps/web is created first, and sorts first: it holds port 80, whatever the clock.
    service("web", "80:http", ("http", 8080), json!({}));
    api.set_lb_ips("apps", "web", &[SERVER4]);
    service("web-copy", "80:http", ("http", 8080), json!({}));
    api.set_lb_ips("apps", "web-copy", &[SERVER4]);
    service("shop", "443:https", ("https", 8443), json!({}));
    api.set_lb_ips("apps", "shop", &[SHOP_SERVING, SHOP_DOWN]);
    service("games", "9999:game", ("game", 9999), json!({}));
    api.set_lb_ips("apps", "games", &[SERVER4]);
    service("pending", "8080:http", ("http", 8080), json!({}));
    service("broken", "80:nosuch", ("http", 8080), json!({}));
    api.set_lb_ips("apps", "broken", &[SERVER4]);
}

/// What each Service's row must show: state, key and a part of the reason.
const EXPECTED: [(&str, &str, &str, &str); 6] = [
    ("apps/web", "forwarding", "ipv4/TCP/80", ""),
    ("apps/shop", "forwarding", "ipv4/TCP/443", ""),
    (
        "apps/web-copy",
        "conflict",
        "ipv4/TCP/80",
        "held by apps/web",
    ),
    (
        "apps/games",
        "refused",
        "",
        "external port 9999 is not allowed (policy)",
    ),
    (
        "apps/pending",
        "waiting",
        "",
        "waiting for a LoadBalancer address",
    ),
    ("apps/broken", "invalid", "", "no port named \"nosuch\""),
];

/// Waits until the daemon, asked inside the rig, is ready with every Service in its
/// expected state and apps/shop's second backend down.
fn daemon_settled(rig: &Rig, daemon: &mut RigDaemon) {
    wait_until("the daemon in the rig to report every Service", || {
        if let Ok(Some(exit)) = daemon.child.try_wait() {
            panic!("the daemon in the rig exited ({exit})");
        }
        let status = rig.status()?;
        if status["daemon"]["ready"] != true {
            return Err(format!("daemon: {}", status["daemon"]));
        }
        let services = status["services"].as_array().cloned().unwrap_or_default();
        for (service, state, _, _) in EXPECTED {
            if !services
                .iter()
                .any(|s| owner(s) == service && s["state"] == state)
            {
                return Err(format!("no {state} entry of {service} in {services:?}"));
            }
        }
        let down = status["forwards"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| {
                f["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|b| b["target"]["addr"] == SHOP_DOWN && b["health"] == "down")
            });
        if !down {
            return Err(format!(
                "{SHOP_DOWN} is not down yet: {}",
                status["forwards"]
            ));
        }
        Ok(())
    });
}

fn owner(service: &Value) -> String {
    format!(
        "{}/{}",
        service["namespace"].as_str().unwrap_or_default(),
        service["name"].as_str().unwrap_or_default()
    )
}

/// The daemon's reason for each Service's entry, as `status` reports it in the rig.
fn reasons(rig: &Rig) -> Result<BTreeMap<String, String>, String> {
    let status = rig.status()?;
    Ok(status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                owner(s),
                s["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// The status page (open), row by row. Each row's reason is the daemon's own, as it
/// reports it in the rig; the page catches up with a change (a conflict's reason says
/// once the holder holds the port) by its own refresh.
fn status_page(browser: &mut Browser, rig: &Rig, shots: &Path) {
    let mut page = Value::Null;
    wait_until("the page's reasons to be the daemon's", || {
        let before = reasons(rig)?;
        page = browser.call(json!({"cmd": "status", "rows": EXPECTED.len()}))["page"].take();
        if reasons(rig)? != before {
            return Err("the daemon's report changed meanwhile".to_owned());
        }
        for (service, said) in &before {
            let row = page["rows"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["service"] == service.as_str());
            let shown = row.and_then(|r| r["reason"].as_str()).unwrap_or_default();
            if !shown.contains(said.as_str()) {
                return Err(format!(
                    "{service}: the daemon says {said:?}, the page {shown:?}"
                ));
            }
        }
        Ok(())
    });
    let shown = serde_json::to_string_pretty(&page).unwrap();
    assert_eq!(
        page["daemon"]["state"], "ready",
        "#kpf-daemon is not data-state=ready; the page shows {shown}"
    );
    assert!(
        page["wan"]
            .as_str()
            .is_some_and(|w| w.contains(ROUTER_WAN4)),
        "#kpf-wan does not show the WAN address {ROUTER_WAN4}; the page shows {shown}"
    );
    assert!(
        page["last_sync"].as_str().is_some_and(|t| !t.is_empty()),
        "#kpf-last-sync is missing or empty; the page shows {shown}"
    );
    assert!(
        page["upstream"].as_str().is_some_and(|t| t.contains("off")),
        "#kpf-upstream does not say \"off\" (no --upstream); the page shows {shown}"
    );
    assert_eq!(
        page["kubeconfig_missing"], false,
        "#kpf-kubeconfig-missing is shown though the kubeconfig is there; {shown}"
    );
    assert_eq!(
        page["error_boxes"],
        json!([]),
        "the status page shows LuCI error boxes; it shows {shown}"
    );
    let rows = page["rows"].as_array().unwrap();
    for (service, state, key, reason) in EXPECTED {
        let row = rows
            .iter()
            .find(|r| r["service"] == service)
            .unwrap_or_else(|| {
                panic!("no row with data-service={service:?}; the page shows {shown}")
            });
        let row_text = serde_json::to_string_pretty(row).unwrap();
        assert_eq!(
            row["state"], state,
            "{service}: expected data-state={state}; the row is {row_text}"
        );
        assert_eq!(
            row["key"], key,
            "{service}: expected data-key={key:?}; the row is {row_text}"
        );
        let shown_reason = row["reason"].as_str().unwrap_or_default();
        assert!(
            shown_reason.contains(reason),
            "{service}: expected the reason to contain {reason:?}; the row is {row_text}"
        );
        if state == "forwarding" {
            assert!(
                row["counters"].as_str().is_some_and(|c| !c.is_empty()),
                "{service}: no counters; the row is {row_text}"
            );
        }
    }
    let backends = |service: &str| -> Vec<(String, String)> {
        let row = rows.iter().find(|r| r["service"] == service).unwrap();
        row["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["text"].as_str().unwrap_or_default().to_owned(),
                    b["health"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let web = backends("apps/web");
    assert!(
        web.len() == 1 && web[0].0.contains(SERVER4),
        "apps/web: expected one backend {SERVER4}; the page shows {web:?}"
    );
    let shop = backends("apps/shop");
    for (addr, health) in [(SHOP_SERVING, "serving"), (SHOP_DOWN, "down")] {
        assert!(
            shop.iter().any(|(t, h)| t.contains(addr) && h == health),
            "apps/shop: expected backend {addr} with data-health={health}; the page shows {shop:?}"
        );
    }
    assert_eq!(
        shop.len(),
        2,
        "apps/shop: two backends; the page shows {shop:?}"
    );
    // The page refreshes on its own: the packets sent through port 80 show up.
    browser.call(json!({"cmd": "wait_text",
        "css": "tr.kpf-row[data-service=\"apps/web\"][data-state=\"forwarding\"] td.kpf-counters",
        "pattern": "[1-9]"}));
    browser.call(json!({"cmd": "shot", "path": shots.join("status.png")}));
}

/// Values for the settings form, and what `uci show` must then hold for each option.
fn good_settings() -> (Value, Vec<(&'static str, Vec<&'static str>)>) {
    let values = json!({
        "context": "test",
        "instance": "gateway",
        "allow_namespace": ["apps", "media"],
        "allow_ports": ["80", "443", "8000-8999"],
        "allow_target": ["192.168.50.0/24", "fd00:50::/64"],
        "allow_namespace_selector": "port-forward=allowed",
        "node_ports": "annotated",
        "dns_targets": true,
        "upstream_lease": "7200",
        "check_interval": "3",
        "cleanup_deadline": "120",
    });
    let uci = vec![
        ("enabled", vec!["1"]),
        ("context", vec!["test"]),
        ("instance", vec!["gateway"]),
        ("allow_namespace", vec!["apps", "media"]),
        ("allow_ports", vec!["80", "443", "8000-8999"]),
        ("allow_target", vec!["192.168.50.0/24", "fd00:50::/64"]),
        ("allow_namespace_selector", vec!["port-forward=allowed"]),
        ("node_ports", vec!["annotated"]),
        ("dns_targets", vec!["1"]),
        ("upstream_lease", vec!["7200"]),
        ("check_interval", vec!["3"]),
        ("cleanup_deadline", vec!["120"]),
    ];
    (values, uci)
}

/// Bad values: the option, what to type into the form (lists for list options), and the
/// daemon's flags for them. A lease is checked only with the upstream on.
fn bad_settings() -> [(&'static str, Value, Vec<&'static str>); 4] {
    [
        (
            "allow_ports",
            json!({"allow_ports": ["9000-80"]}),
            vec!["--allow-ports", "9000-80"],
        ),
        (
            "allow_target",
            json!({"allow_target": ["10.0.0.0/33"]}),
            vec!["--allow-target", "10.0.0.0/33"],
        ),
        (
            "allow_namespace_selector",
            json!({"allow_namespace_selector": "a b c"}),
            vec!["--allow-namespace-selector", "a b c"],
        ),
        (
            "upstream_lease",
            json!({"upstream": "upnp", "upstream_lease": "5"}),
            vec!["--upstream", "upnp", "--upstream-lease", "5"],
        ),
    ]
}

fn settings_page(browser: &mut Browser, rig: &Rig, shots: &Path) {
    const SETTINGS: &str = "admin/services/kube-port-forward/settings";
    browser.call(json!({"cmd": "open", "path": SETTINGS}));
    let (values, expected) = good_settings();
    browser.call(json!({"cmd": "fill", "values": values}));
    let saved = browser.call(json!({"cmd": "save_apply"}));
    assert_eq!(
        saved["result"], "applied",
        "Save & Apply of valid settings did not apply; the page says {saved}"
    );
    wait_until("the settings in the rig's UCI config", || {
        let uci = rig.uci_show();
        let wrong: Vec<String> = expected
            .iter()
            .filter(|(option, want)| uci.get(*option).is_none_or(|have| have != want))
            .map(|(option, want)| format!("{option}: want {want:?}, have {:?}", uci.get(*option)))
            .collect();
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("; "))
        }
    });
    // Applying told procd (here its stand-in) that the package's config changed: on a router
    // procd then reloads the service through the init script's config trigger.
    let reloads = rig.root().join("tmp/service-events.log");
    wait_until("the config.change event after Save & Apply", || {
        let log = std::fs::read_to_string(&reloads).unwrap_or_default();
        log.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .any(|event| {
                event == json!({"type": "config.change", "data": {"package": "kube-port-forward"}})
            })
            .then_some(())
            .ok_or(log)
    });
    browser.call(json!({"cmd": "open", "path": SETTINGS}));
    browser.call(json!({"cmd": "show", "option": "allow_ports"}));
    browser.call(json!({"cmd": "shot", "path": shots.join("settings.png")}));

    let config = rig.root().join(CONFIG);
    let before = std::fs::read(&config).unwrap();
    let reloaded = std::fs::read(&reloads).unwrap();
    // Each is refused with the daemon's own words, and nothing is saved.
    for (i, (option, values, flags)) in bad_settings().into_iter().enumerate() {
        let text = values[option].to_string();
        let reason = daemon_refusal(&flags);
        browser.call(json!({"cmd": "open", "path": SETTINGS}));
        browser.call(json!({"cmd": "fill", "values": values}));
        let refused = browser.call(json!({"cmd": "save_apply"}));
        let notes = refused["notifications"].to_string();
        assert!(
            refused["result"] == "refused"
                && refused["notifications"].as_array().is_some_and(|n| n
                    .iter()
                    .any(|t| t.as_str().unwrap_or_default().contains(&reason))),
            "{option} = {text}: expected the page to refuse it with the daemon's reason {reason:?}; \
             Save & Apply ended {} with the notifications {notes}",
            refused["result"]
        );
        assert!(
            refused["invalid"].to_string().contains(option),
            "{option} = {text}: the field is not marked invalid; marked: {}",
            refused["invalid"]
        );
        if i == 0 {
            browser.call(json!({"cmd": "shot", "path": shots.join("settings-refused.png")}));
        }
        assert!(
            std::fs::read(&config).unwrap() == before,
            "{option} = {text} was refused, yet {CONFIG} changed:\n{}",
            std::fs::read_to_string(&config).unwrap()
        );
        assert!(
            std::fs::read(&reloads).unwrap() == reloaded,
            "{option} = {text} was refused, yet procd was told of a config change"
        );
    }
}

/// What the daemon says of `flags` (beside a WAN interface, as the page always has one):
/// the first line of `run --check`'s refusal, without clap's "error: ".
fn daemon_refusal(flags: &[&str]) -> String {
    let output = Command::new(BIN)
        .args(["run", "--check", "--wan-interface", "wan"])
        .args(flags)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "kube-port-forward run --check {flags:?} should refuse it (exit 2): {stderr}"
    );
    let line = stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    line.trim().trim_start_matches("error: ").to_owned()
}

/// Without a kubeconfig, the status page says so; a kubeconfig uploaded on the settings
/// page lands in the rig, 0600, and is never shown back.
fn kubeconfig_upload(browser: &mut Browser, rig: &Rig, dir: &TempDir, api: std::net::SocketAddr) {
    let path = rig.root().join(KUBECONFIG);
    std::fs::remove_file(&path).unwrap();
    browser.call(json!({"cmd": "open", "path": "admin/services/kube-port-forward/status"}));
    browser.call(json!({"cmd": "wait_css", "css": "#kpf-kubeconfig-missing"}));
    browser.call(json!({"cmd": "open", "path": "admin/services/kube-port-forward/settings"}));
    browser.call(
        json!({"cmd": "wait_text", "css": "#kpf-kubeconfig-state", "pattern": "(?i)missing"}),
    );

    let secret = format!("kpf-uploaded-token-{}", std::process::id());
    let content = ApiServer::kubeconfig(api).replace("test-token", &secret);
    let upload = dir.write("upload.kubeconfig", &content);
    let uploaded = browser.call(json!({"cmd": "upload", "path": upload, "secret": secret}));
    let state = uploaded["state"].as_str().unwrap_or_default();
    assert!(
        state.to_lowercase().contains("present"),
        "#kpf-kubeconfig-state does not say present after the upload: {uploaded}"
    );
    wait_until(
        "the uploaded kubeconfig in the rig",
        || match std::fs::read_to_string(&path) {
            Ok(text) if text == content => Ok(()),
            Ok(text) => Err(format!("it holds {} bytes of something else", text.len())),
            Err(e) => Err(e.to_string()),
        },
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the uploaded kubeconfig is mode {mode:o}, not 600"
    );
    let leak = browser.call(json!({"cmd": "secret_shown", "secret": secret}));
    assert!(
        leak["in_page"] == false && leak["in_answers"].as_array().is_some_and(Vec::is_empty),
        "the kubeconfig's content was shown back: {leak}"
    );
}

fn lines(items: &[Value]) -> String {
    items
        .iter()
        .map(|i| format!("  {}", i.as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls `condition` (Ok when it holds, Err saying what it saw) until [`PATIENCE`].
fn wait_until(what: &str, mut condition: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match condition() {
            Ok(()) => return,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "timed out after {PATIENCE:?} waiting for {what}; last seen: {seen}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The LuCI rig: `KPF_LUCI_RIG`, or `../shared/luci-rig` beside the repository.
fn rig_dir() -> PathBuf {
    let dir = std::env::var_os("KPF_LUCI_RIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(REPO).join("../shared/luci-rig"));
    assert!(
        dir.join("start.sh").is_file() && dir.join("run-in.sh").is_file(),
        "the LuCI test rig is not at {} (no start.sh): put it at ../shared/luci-rig beside this \
         repository or name it in KPF_LUCI_RIG (its build.sh builds one from OpenWrt's sources)",
        dir.display()
    );
    dir
}

/// The Python with selenium that runs the driver, after checking Chromium is there.
fn browser_python() -> PathBuf {
    for program in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            Path::new(program).exists(),
            "{program} is missing: apt-get install chromium chromium-driver (tests/run.sh does)"
        );
    }
    let python = std::env::var_os("KPF_LUCI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(REPO).join("target/luci-venv/bin/python"));
    let selenium = Command::new(&python)
        .args(["-c", "import selenium"])
        .output();
    assert!(
        selenium.is_ok_and(|o| o.status.success()),
        "{} cannot import selenium: python3 -m venv target/luci-venv && target/luci-venv/bin/pip \
         install selenium (tests/run.sh does), or name another Python in KPF_LUCI_PYTHON",
        python.display()
    );
    python
}

fn shots_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("luci-shots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The app as the rig installs it: the package's `htdocs` under `www`, its `root`, the
/// daemon's binary, its UCI config (enabled, health on), a kubeconfig for `api`, and what
/// a router has that the rig lacks, from this host: `nft` with its libraries, the CA
/// bundle, `/run`.
fn overlay(dir: &TempDir, kubeconfig: &str) -> PathBuf {
    let overlay = dir.path.join("overlay");
    let app = Path::new(REPO).join("openwrt-pkg/luci-app-kube-port-forward");
    std::fs::create_dir_all(overlay.join("www")).unwrap();
    run(
        "cp",
        &[
            "-a",
            &format!("{}/htdocs/.", app.display()),
            &format!("{}/www/", overlay.display()),
        ],
    );
    run(
        "cp",
        &[
            "-a",
            &format!("{}/root/.", app.display()),
            &format!("{}/", overlay.display()),
        ],
    );
    let put = |path: &str, from: &Path, mode: u32| {
        let to = overlay.join(path);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, &to)
            .unwrap_or_else(|e| panic!("copy {} to {path}: {e}", from.display()));
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    put("usr/sbin/kube-port-forward", Path::new(BIN), 0o755);
    put(
        SERVICE_EVENTS,
        &Path::new(REPO).join("tests/luci/service-events.uc"),
        0o644,
    );
    // OpenWrt's ca-bundle, which the package depends on: the Kubernetes client loads it.
    put(
        "etc/ssl/certs/ca-certificates.crt",
        Path::new("/etc/ssl/certs/ca-certificates.crt"),
        0o644,
    );
    put("usr/sbin/nft", Path::new("/usr/sbin/nft"), 0o755);
    for line in run("ldd", &["/usr/sbin/nft"]).lines() {
        let Some((name, rest)) = line.trim().split_once(" => ") else {
            continue;
        };
        // The rig has its own C library (the same glibc as this Debian).
        if ["libc.so.6", "libm.so.6"].contains(&name) {
            continue;
        }
        let lib = rest.split_whitespace().next().unwrap();
        put(
            &format!("lib/x86_64-linux-gnu/{name}"),
            Path::new(lib),
            0o644,
        );
    }
    let config = std::fs::read_to_string(
        Path::new(REPO).join("openwrt-pkg/kube-port-forward/files/kube-port-forward.config"),
    )
    .unwrap();
    assert!(
        config.contains("option health '127.0.0.1:9477'"),
        "{config}"
    );
    let config = config.replace("option enabled '0'", "option enabled '1'");
    assert!(config.contains("option enabled '1'"), "{config}");
    let config_path = dir.write("kube-port-forward.config", &config);
    put(CONFIG, Path::new(&config_path), 0o644);
    let kubeconfig_path = dir.write("rig.kubeconfig", kubeconfig);
    put(KUBECONFIG, Path::new(&kubeconfig_path), 0o600);
    // OpenWrt's /var is /tmp; the daemon's state files are under /run.
    std::os::unix::fs::symlink("/var/run", overlay.join("run")).unwrap();
    overlay
}

/// A running rig, stopped (with everything in its pid namespace) on drop.
struct Rig {
    dir: PathBuf,
    state: PathBuf,
}

impl Rig {
    fn start(dir: &Path, state: &Path, overlay: &Path, netns: &Netns) -> Rig {
        std::fs::create_dir_all(state).unwrap();
        let rig = Rig {
            dir: dir.to_owned(),
            state: state.to_owned(),
        };
        let output = Command::new(dir.join("start.sh"))
            .arg("--state")
            .arg(state)
            .arg("--overlay")
            .arg(overlay)
            .args(["--port", "8080", "--netns", &netns.name, "--timeout", "120"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "the rig did not start: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // A router's /dev has these (nft reads `-f -` from /dev/stdin); the rig's has not.
        for (fd, name) in ["stdin", "stdout", "stderr"].iter().enumerate() {
            let made = rig.run_in(&[
                "ln",
                "-sf",
                &format!("/proc/self/fd/{fd}"),
                &format!("/dev/{name}"),
            ]);
            assert!(made.status.success(), "/dev/{name} in the rig: {made:?}");
        }
        rig
    }

    fn root(&self) -> PathBuf {
        self.state.join("rootfs")
    }

    fn run_in(&self, args: &[&str]) -> Output {
        Command::new(self.dir.join("run-in.sh"))
            .arg("--state")
            .arg(&self.state)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `kube-port-forward status --output json` inside the rig, as the app's plugin runs it.
    fn status(&self) -> Result<Value, String> {
        let output = self.run_in(&["/usr/sbin/kube-port-forward", "status", "--output", "json"]);
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())
    }

    /// The options of `kube-port-forward.main`, as `uci show` prints them, unquoted.
    fn uci_show(&self) -> BTreeMap<String, Vec<String>> {
        let output = self.run_in(&["uci", "show", "kube-port-forward"]);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once('=')?;
                let option = name.strip_prefix("kube-port-forward.main.")?;
                Some((option.to_owned(), uci_values(value)))
            })
            .collect()
    }
}

/// `'a' 'b'` (with `'\''` for a quote inside) as `uci show` prints a value: `[a, b]`.
fn uci_values(text: &str) -> Vec<String> {
    let mut values = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('\'', true) => quoted = false,
            ('\'', false) => quoted = true,
            ('\\', false) if chars.peek() == Some(&'\'') => current.push(chars.next().unwrap()),
            (' ', false) => values.push(std::mem::take(&mut current)),
            (c, _) => current.push(c),
        }
    }
    values.push(current);
    values
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.state.join("logs");
            for log in ["rpcd", "uhttpd", "init"] {
                let text =
                    std::fs::read_to_string(logs.join(format!("{log}.log"))).unwrap_or_default();
                eprintln!("--- rig {log}.log ---\n{}", tail(&text, 40));
            }
        }
        let stopped = Command::new(self.dir.join("stop.sh"))
            .arg("--state")
            .arg(&self.state)
            .output();
        match stopped {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!("stop.sh: {}", String::from_utf8_lossy(&output.stderr)),
            Err(e) => eprintln!("stop.sh: {e}"),
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Where the overlay puts the stand-in of procd's `service` object.
const SERVICE_EVENTS: &str = "usr/share/kpf-test/service-events.uc";

/// The stand-in of procd's `service` ubus object (`tests/luci/service-events.uc`), running
/// in the rig until the test ends; its output goes to `log`.
struct ServiceEvents {
    child: Child,
}

impl ServiceEvents {
    fn start(rig: &Rig, log: &Path) -> ServiceEvents {
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new(rig.dir.join("run-in.sh"))
            .arg("--state")
            .arg(&rig.state)
            .args(["ucode", &format!("/{SERVICE_EVENTS}")])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut events = ServiceEvents { child };
        wait_until("procd's stand-in on ubus", || {
            if let Ok(Some(status)) = events.child.try_wait() {
                panic!(
                    "the service stand-in ended with {status}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            let listed = rig.run_in(&["ubus", "list", "service"]);
            listed
                .status
                .success()
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&listed.stderr).into_owned())
        });
        events
    }
}

impl Drop for ServiceEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kube-port-forward run` inside the rig (`run-in.sh`, as procd would start it on a
/// router); its log is printed if the test fails. The rig's pid namespace ends it at the
/// latest when the rig stops.
struct RigDaemon {
    child: Child,
    log: PathBuf,
}

impl RigDaemon {
    fn spawn(rig: &Rig, log: &Path, args: &[&str]) -> RigDaemon {
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new(rig.dir.join("run-in.sh"))
            .arg("--state")
            .arg(&rig.state)
            .args(["/usr/sbin/kube-port-forward", "run"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        RigDaemon {
            child,
            log: log.to_owned(),
        }
    }

    /// Kills the daemon as a crash would (SIGKILL): `run-in.sh` execs `nsenter`, which
    /// forks the daemon into the rig's pid namespace, so the daemon is its child.
    fn kill(&mut self) {
        let pid = self.child.id();
        let mut daemon = None;
        wait_until("the daemon's host pid", || {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .map_err(|e| e.to_string())?;
            daemon = children.split_whitespace().next().map(str::to_owned);
            daemon.as_ref().map(|_| ()).ok_or(children)
        });
        let daemon: i32 = daemon.unwrap().parse().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for RigDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- daemon log ---\n{}", tail(&text, 60));
        }
    }
}

/// `tests/luci/driver.py` with headless Chromium, in the router namespace (where the rig
/// listens), in a process group of its own: it and its browser end on drop.
struct Browser {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    log: PathBuf,
}

impl Browser {
    fn start(python: &Path, netns: &Netns, log: &Path) -> Browser {
        let driver = Path::new(REPO).join("tests/luci/driver.py");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &netns.name])
            .arg(python)
            .arg(driver)
            .args(["--base", LUCI])
            .env("HOME", log.parent().unwrap())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        Browser {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
            log: log.to_owned(),
        }
    }

    /// Sends one command (with the [`PATIENCE`] deadline) and returns the answer; panics
    /// with what the page showed when the driver could not do it.
    fn call(&mut self, mut command: Value) -> Value {
        command["timeout"] = json!(PATIENCE.as_secs());
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            panic!(
                "the browser driver ended during {command}: {}",
                tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 30)
            )
        });
        assert!(
            answer["ok"] == true,
            "{}: {}\nthe page showed:\n{}",
            command["cmd"],
            answer["error"].as_str().unwrap_or_default(),
            answer["shown"].as_str().unwrap_or_default()
        );
        answer
    }
}

impl Drop for Browser {
    /// Closes the driver's input (it quits Chromium and ends), then ends whatever of its
    /// process group is left.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}
