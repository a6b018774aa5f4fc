//! What is shipped around the binary: the .ipk and its scripts, the LuCI app's .ipk, the procd
//! init script's mapping of UCI options to flags, the systemd unit, and the kubeconfig minting
//! script.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TempDir, output_ok, run};

const BIN: &str = env!("CARGO_BIN_EXE_kube-port-forward");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn repo(path: &str) -> PathBuf {
    Path::new(ROOT).join(path)
}

fn shellcheck(path: &Path) {
    let output = Command::new("shellcheck")
        .arg(path)
        .output()
        .expect("shellcheck is installed (.ci/run installs it)");
    assert!(
        output.status.success(),
        "shellcheck {}:\n{}",
        path.display(),
        String::from_utf8_lossy(&output.stdout)
    );
}

fn syntax_ok(path: &Path) {
    let status = Command::new("sh").arg("-n").arg(path).status().unwrap();
    assert!(status.success(), "sh -n {}", path.display());
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The `define Package/kube-port-forward/NAME` block of the feed Makefile.
fn makefile_block(name: &str) -> Vec<String> {
    package_block("kube-port-forward", name)
}

/// The `define Package/PACKAGE/NAME` block of that package's feed Makefile.
fn package_block(package: &str, name: &str) -> Vec<String> {
    let makefile =
        std::fs::read_to_string(repo(&format!("openwrt-pkg/{package}/Makefile"))).unwrap();
    let start = format!("define Package/{package}/{name}");
    makefile
        .lines()
        .skip_while(|l| *l != start)
        .skip(1)
        .take_while(|l| *l != "endef")
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_ipk_has_opkgs_layout_fields_conffiles_and_clean_scripts() {
    let dir = TempDir::new();
    let out = dir.path.join("out");
    let ipk = run(
        "sh",
        &[
            repo("openwrt-pkg/build-ipk.sh").to_str().unwrap(),
            "--arch",
            "x86_64",
            "--binary",
            BIN,
            out.to_str().unwrap(),
        ],
    );
    let ipk = PathBuf::from(ipk.trim());
    assert!(
        ipk.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("_x86_64.ipk")
    );

    let x = dir.path.join("x");
    let (fields, control, data) = unpack_ipk(&ipk, &x);
    assert_eq!(fields["Package"], "kube-port-forward");
    assert_eq!(fields["Architecture"], "x86_64");
    assert!(fields["Version"].starts_with(env!("CARGO_PKG_VERSION")));
    let depends: Vec<&str> = fields["Depends"].split(", ").collect();
    assert_eq!(
        depends,
        [
            "nftables-json",
            "kmod-nft-nat",
            "kmod-nf-conntrack-netlink",
            "ca-bundle"
        ]
    );
    assert!(fields["Installed-Size"].parse::<u64>().unwrap() > 0);

    // Conffiles and the scripts are the feed Makefile's, so opkg and the SDK build agree.
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(
        conffiles.lines().collect::<Vec<_>>(),
        makefile_block("conffiles")
    );
    assert!(conffiles.contains("/etc/config/kube-port-forward"));
    // The kubeconfig is not the package's file (opkg would complain of a missing conffile):
    // sysupgrade keeps the folder it lives in.
    assert_eq!(
        std::fs::read_to_string(data.join("lib/upgrade/keep.d/kube-port-forward")).unwrap(),
        "/etc/kube-port-forward/\n"
    );
    let prerm = std::fs::read_to_string(control.join("prerm")).unwrap();
    let from_makefile: Vec<String> = makefile_block("prerm")
        .iter()
        .map(|l| l.replace("$$", "$"))
        .collect();
    assert_eq!(prerm.lines().collect::<Vec<_>>(), from_makefile);
    assert!(prerm.contains("kube-port-forward uninstall"));
    // firewall4 reloads its includes after install and removal, never while building an
    // image; the .ipk's postinst also enables the service, as the SDK's default_postinst does.
    let script_of = |name: &str| -> Vec<String> {
        makefile_block(name)
            .iter()
            .map(|l| l.replace("$$", "$"))
            .collect()
    };
    let postrm = std::fs::read_to_string(control.join("postrm")).unwrap();
    assert_eq!(postrm.lines().collect::<Vec<_>>(), script_of("postrm"));
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    let feed_postinst = script_of("postinst");
    assert!(
        postinst.ends_with(&(feed_postinst[1..].join("\n") + "\n")),
        "{postinst}"
    );
    assert!(postinst.contains("/etc/init.d/kube-port-forward enable"));
    // An upgrade keeps the Services' finalizers and the table, and an enabled daemon is
    // restarted onto the new binary; a removal releases, then disables.
    let upgrade = "[ \"${PKG_UPGRADE}\" = 1 ] && exit 0";
    let uninstall = prerm.find("kube-port-forward uninstall").unwrap();
    assert!(
        prerm.find(upgrade).is_some_and(|i| i < uninstall),
        "{prerm}"
    );
    assert!(
        prerm.ends_with("/etc/init.d/kube-port-forward disable\n"),
        "{prerm}"
    );
    assert!(
        postinst.contains("enabled && /etc/init.d/kube-port-forward restart"),
        "{postinst}"
    );
    for script in [&postinst, &postrm] {
        let reload = script
            .find("/etc/init.d/firewall reload")
            .expect("a firewall reload");
        let guard = script
            .find("[ -n \"${IPKG_INSTROOT}\" ] && exit 0")
            .expect("no reload while building an image");
        assert!(guard < reload, "{script}");
    }

    for (path, expected) in [
        ("usr/sbin/kube-port-forward", 0o755),
        ("etc/init.d/kube-port-forward", 0o755),
        ("etc/config/kube-port-forward", 0o600),
        ("etc/kube-port-forward", 0o700),
        (
            "usr/share/nftables.d/chain-pre/forward/30-kube-port-forward.nft",
            0o644,
        ),
        ("lib/upgrade/keep.d/kube-port-forward", 0o644),
    ] {
        assert_eq!(mode(&data.join(path)), expected, "{path}");
    }
    for script in [
        control.join("prerm"),
        control.join("postinst"),
        control.join("postrm"),
        data.join("etc/init.d/kube-port-forward"),
        repo("openwrt-pkg/build-ipk.sh"),
        repo("openwrt-pkg/build-all.sh"),
        repo("openwrt-pkg/cross-toolchain.sh"),
        repo("deploy/mint-kubeconfig.sh"),
    ] {
        assert_eq!(
            mode(&script) & 0o111,
            0o111,
            "{} executable",
            script.display()
        );
        syntax_ok(&script);
        shellcheck(&script);
    }
}

/// An .ipk's control fields and its unpacked control and data folders.
fn unpack_ipk(ipk: &Path, into: &Path) -> (BTreeMap<String, String>, PathBuf, PathBuf) {
    // The outer archive: exactly these three members, debian-binary first.
    let members = run("tar", &["-tzf", ipk.to_str().unwrap()]);
    assert_eq!(
        members.lines().collect::<Vec<_>>(),
        ["./debian-binary", "./control.tar.gz", "./data.tar.gz"]
    );
    let (control, data) = (into.join("control"), into.join("data"));
    std::fs::create_dir_all(&control).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    run(
        "tar",
        &["-xzf", ipk.to_str().unwrap(), "-C", into.to_str().unwrap()],
    );
    assert_eq!(
        std::fs::read_to_string(into.join("debian-binary")).unwrap(),
        "2.0\n"
    );
    for (archive, dir) in [("control.tar.gz", &control), ("data.tar.gz", &data)] {
        let archive = into.join(archive);
        run(
            "tar",
            &[
                "-xzf",
                archive.to_str().unwrap(),
                "-C",
                dir.to_str().unwrap(),
            ],
        );
        // Owned by root, whoever built it.
        let listing = run("tar", &["-tzvf", archive.to_str().unwrap()]);
        assert!(listing.lines().all(|l| l.contains(" 0/0 ")), "{listing}");
    }
    let fields = std::fs::read_to_string(control.join("control"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (fields, control, data)
}

/// Every file under `dir`, as paths relative to it, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let listing = run("find", &[dir.to_str().unwrap(), "-type", "f"]);
    let mut files: Vec<String> = listing
        .lines()
        .map(|l| {
            l.strip_prefix(dir.to_str().unwrap())
                .unwrap()
                .trim_start_matches('/')
                .to_owned()
        })
        .collect();
    files.sort();
    files
}

#[test]
fn the_luci_ipk_has_the_apps_files_fields_and_clean_scripts() {
    let dir = TempDir::new();
    let out = dir.path.join("out");
    let ipk = run(
        "sh",
        &[
            repo("openwrt-pkg/build-luci-ipk.sh").to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let ipk = PathBuf::from(ipk.trim());
    assert_eq!(
        ipk.file_name().unwrap().to_str().unwrap(),
        format!(
            "luci-app-kube-port-forward_{}-r1_all.ipk",
            env!("CARGO_PKG_VERSION")
        )
    );
    let (fields, control, data) = unpack_ipk(&ipk, &dir.path.join("x"));
    assert_eq!(fields["Package"], "luci-app-kube-port-forward");
    assert_eq!(fields["Architecture"], "all");
    assert_eq!(fields["Section"], "luci");
    assert!(fields["Version"].starts_with(env!("CARGO_PKG_VERSION")));
    let depends: Vec<&str> = fields["Depends"].split(", ").collect();
    for needed in [
        "kube-port-forward",
        "luci-base",
        "rpcd-mod-ucode",
        "ucode-mod-fs",
        "ucode-mod-uci",
    ] {
        assert!(depends.contains(&needed), "{needed} not in {depends:?}");
    }

    // Where luci.mk puts them, and nothing else; all plain files, readable by all.
    let files = files_under(&data);
    assert_eq!(
        files,
        [
            "usr/share/luci/menu.d/luci-app-kube-port-forward.json",
            "usr/share/rpcd/acl.d/luci-app-kube-port-forward.json",
            "usr/share/rpcd/ucode/kube-port-forward.uc",
            "www/luci-static/resources/view/kube-port-forward/settings.js",
            "www/luci-static/resources/view/kube-port-forward/status.js",
        ]
    );
    for file in &files {
        assert_eq!(mode(&data.join(file)), 0o644, "{file}");
    }

    // The ACL grants the status to readers, the checks and the upload to writers, this
    // package's UCI config to both, and nothing else.
    let acl: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data.join("usr/share/rpcd/acl.d/luci-app-kube-port-forward.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        acl,
        serde_json::json!({"luci-app-kube-port-forward": {
            "description": acl["luci-app-kube-port-forward"]["description"],
            "read": {"ubus": {"kube-port-forward": ["status"]}, "uci": ["kube-port-forward"]},
            "write": {"ubus": {"kube-port-forward": ["validate", "set_kubeconfig"]},
                      "uci": ["kube-port-forward"]}}})
    );
    let menu: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            data.join("usr/share/luci/menu.d/luci-app-kube-port-forward.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        menu["admin/services/kube-port-forward"]["action"]["type"],
        "firstchild"
    );
    for page in ["status", "settings"] {
        assert_eq!(
            menu[format!("admin/services/kube-port-forward/{page}")]["action"]["path"],
            format!("kube-port-forward/{page}")
        );
    }

    // The feed Makefile's scripts: LuCI's caches dropped and rpcd reloaded, never while
    // building an image.
    for name in ["postinst", "postrm"] {
        let script = std::fs::read_to_string(control.join(name)).unwrap();
        let from_makefile: Vec<String> = package_block("luci-app-kube-port-forward", name)
            .iter()
            .map(|l| l.replace("$$", "$"))
            .collect();
        assert_eq!(script.lines().collect::<Vec<_>>(), from_makefile);
        let guard = script
            .find("[ -n \"${IPKG_INSTROOT}\" ] && exit 0")
            .expect(name);
        for step in [
            "rm -f /tmp/luci-indexcache*",
            "rm -rf /tmp/luci-modulecache/",
            "/etc/init.d/rpcd reload",
        ] {
            assert!(
                script.find(step).is_some_and(|i| guard < i),
                "{name}: {script}"
            );
        }
    }
    for script in [
        control.join("postinst"),
        control.join("postrm"),
        repo("openwrt-pkg/build-luci-ipk.sh"),
    ] {
        assert_eq!(
            mode(&script) & 0o111,
            0o111,
            "{} executable",
            script.display()
        );
        syntax_ok(&script);
        shellcheck(&script);
    }

    // One version for both packages.
    let version = |package: &str| {
        std::fs::read_to_string(repo(&format!("openwrt-pkg/{package}/Makefile")))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("PKG_VERSION:=").map(str::to_owned))
            .unwrap()
    };
    assert_eq!(
        version("luci-app-kube-port-forward"),
        version("kube-port-forward")
    );
}

#[test]
fn the_luci_app_knows_every_uci_option() {
    let config = std::fs::read_to_string(repo(
        "openwrt-pkg/kube-port-forward/files/kube-port-forward.config",
    ))
    .unwrap();
    let app = "openwrt-pkg/luci-app-kube-port-forward";
    let plugin = std::fs::read_to_string(repo(&format!(
        "{app}/root/usr/share/rpcd/ucode/kube-port-forward.uc"
    )))
    .unwrap();
    let settings = std::fs::read_to_string(repo(&format!(
        "{app}/htdocs/luci-static/resources/view/kube-port-forward/settings.js"
    )))
    .unwrap();
    let options: std::collections::BTreeSet<&str> = config
        .lines()
        .map(|l| l.trim_start_matches('\t').trim_start_matches('#'))
        .filter_map(|l| {
            l.strip_prefix("option ")
                .or_else(|| l.strip_prefix("list "))
        })
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(options.len() > 30, "{options:?}");
    for option in options {
        // The settings page's form and the list it sends to `validate`.
        assert!(
            settings.contains(&format!("'{option}'")),
            "settings.js lacks {option}"
        );
        // The plugin's UCI-to-flag table (enabled only decides whether the daemon starts).
        if option != "enabled" {
            assert!(
                plugin.contains(&format!("{{ option: '{option}', flag: '--")),
                "the plugin's FLAGS lack {option}"
            );
        }
    }
}

#[test]
fn the_uci_config_ships_disabled_with_a_comment_per_option() {
    let config = std::fs::read_to_string(repo(
        "openwrt-pkg/kube-port-forward/files/kube-port-forward.config",
    ))
    .unwrap();
    assert!(config.contains("\toption enabled '0'\n"));
    let lines: Vec<&str> = config.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let setting = line.trim_start_matches('\t').trim_start_matches('#');
        if setting.starts_with("option ") || setting.starts_with("list ") {
            // The option, or the block of options it belongs to, has a comment above it.
            let above = lines[..i]
                .iter()
                .rev()
                .find(|l| {
                    let l = l.trim_start_matches('\t');
                    !(l.starts_with("list ") || l.starts_with("#list "))
                })
                .unwrap();
            assert!(
                above.trim_start().starts_with("# "),
                "no comment above {line:?}"
            );
        }
    }
}

/// The init script with procd, rc.common and UCI stubbed, the UCI options of `uci` set,
/// then `tail` (the function to run); written into `dir`. The procd stubs print what procd
/// would be told: `<open>`, the command's words, `<close>`, and the triggers.
fn init_harness(uci: &[(&str, &str)], dir: &TempDir, tail: &str) -> String {
    let functions = dir.path.join("lib/functions");
    std::fs::create_dir_all(&functions).unwrap();
    // network.sh: the logical networks' devices, as netifd would report them.
    std::fs::write(
        functions.join("network.sh"),
        "network_get_device() { case \"$2\" in wan) eval \"$1=eth1\";; wan6) eval \"$1=eth1\";; *) return 1;; esac; }\n\
         network_get_physdev() { return 1; }\n",
    )
    .unwrap();
    let mut harness = String::from(
        "\
         extra_command() { :; }\n\
         stop() { :; }\n\
         config_load() { :; }\n\
         config_get() { eval \"$1=\\${UCI_$2_$3:-$4}\"; }\n\
         config_get_bool() { config_get \"$@\"; }\n\
         logger() { echo \"<logd $*>\"; }\n\
         procd_open_instance() { echo '<open>'; }\n\
         procd_close_instance() { echo '<close>'; }\n\
         procd_add_reload_trigger() { echo \"<reload-trigger $*>\"; }\n\
         procd_add_interface_trigger() { echo \"<interface-trigger $*>\"; }\n\
         procd_set_param() { [ \"$1\" = file ] && echo \"<file $2>\"; [ \"$1\" = command ] && shift && for a; do printf '%s\\n' \"$a\"; done; return 0; }\n\
         procd_append_param() { [ \"$1\" = command ] && shift && for a; do printf '%s\\n' \"$a\"; done; return 0; }\n",
    );
    for (option, value) in uci {
        harness.push_str(&format!("UCI_main_{option}='{value}'\n"));
    }
    let init = std::fs::read_to_string(repo(
        "openwrt-pkg/kube-port-forward/files/kube-port-forward.init",
    ))
    .unwrap();
    harness.push_str(init.split_once('\n').unwrap().1);
    harness.push('\n');
    harness.push_str(tail);
    harness.push('\n');
    dir.write("harness.sh", &harness)
}

/// Runs a function of the init script; returns what it printed and its stderr.
fn init_run(uci: &[(&str, &str)], dir: &TempDir, function: &str) -> (Vec<String>, String) {
    let script = init_harness(uci, dir, function);
    let output = Command::new("sh")
        .arg(&script)
        .env("IPKG_INSTROOT", &dir.path)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines = stdout.lines().map(str::to_owned).collect();
    (lines, String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Runs the init script's `start_service` and returns the command line procd would run:
/// that of an instance opened and closed, as procd starts only those; empty when none was.
fn init_command(uci: &[(&str, &str)], dir: &TempDir) -> Vec<String> {
    let (lines, _) = init_run(uci, dir, "start_service");
    let Some(open) = lines.iter().position(|l| l == "<open>") else {
        return Vec::new();
    };
    let close = lines
        .iter()
        .position(|l| l == "<close>")
        .expect("an opened instance is closed");
    lines[open + 1..close]
        .iter()
        .filter(|l| !l.starts_with('<'))
        .cloned()
        .collect()
}

/// The daemon takes every flag of `command` and stops only at `kubeconfig`, which is not one.
fn flags_accepted(command: &[String], kubeconfig: &str) {
    let output = Command::new(BIN).args(&command[1..]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot read kubeconfig {kubeconfig}")),
        "the flags were not all accepted:\n{stderr}"
    );
}

#[test]
fn every_uci_option_becomes_a_flag_the_daemon_accepts() {
    let dir = TempDir::new();
    // A kubeconfig that exists but is not one: the daemon gets past its flags and stops at it.
    let kubeconfig = dir.write("kubeconfig", "not: [a kubeconfig");
    let uci = [
        ("enabled", "1"),
        ("kubeconfig", kubeconfig.as_str()),
        ("context", "homelab"),
        ("namespace", "apps web"),
        ("selector", "expose=internet"),
        ("wan_network", "wan wan6"),
        ("wan_device", "pppoe-wan"),
        ("wan_address", "198.51.100.7"),
        ("reflection", "off"),
        ("ct_mark", "0x00100000"),
        ("health", "127.0.0.1:9477"),
        ("allow_namespace", "apps"),
        ("allow_ports", "443 8000-8999"),
        ("allow_target", "192.168.1.0/24"),
        ("finalizer", "kube-port-forward-controller/gateway"),
        ("instance", "gateway"),
        ("cleanup_deadline", "120"),
        ("resync", "600"),
        ("node_ports", "annotated"),
        ("check_interval", "5"),
        ("check_timeout", "0.5"),
        ("check_fall", "3"),
        ("check_rise", "1"),
        ("check_concurrency", "16"),
        ("upstream", "upnp"),
        ("upstream_url", "http://192.168.1.1:5000/rootDesc.xml"),
        ("upstream_lease", "600"),
        ("upstream_poll", "10"),
        ("dns_targets", "1"),
        ("verbose", "1"),
    ];
    let command = init_command(&uci, &dir);
    let line = command.join(" ");
    for expected in [
        "--wan-interface eth1",
        "--wan-interface pppoe-wan",
        "--namespace apps --namespace web",
        "--allow-ports 443,8000-8999",
        "--reflection false",
        "--ct-mark 0x00100000",
        "--node-ports annotated",
        "--check-interval 5 --check-timeout 0.5 --check-fall 3 --check-rise 1",
        "--check-concurrency 16",
        "--upstream upnp --upstream-url http://192.168.1.1:5000/rootDesc.xml",
        "--upstream-lease 600 --upstream-poll 10 --dns-targets",
        "--table kube_port_forward",
    ] {
        assert!(line.contains(expected), "{expected:?} not in {line}");
    }
    assert_eq!(line.matches("--wan-interface eth1").count(), 1, "{line}");
    assert_eq!(command[0], "/usr/sbin/kube-port-forward");

    flags_accepted(&command, &kubeconfig);
}

#[test]
fn a_disabled_or_unconfigured_service_does_not_start_and_says_why() {
    let dir = TempDir::new();
    let kubeconfig = dir.write("kubeconfig", "");
    let cases = [
        (vec![("enabled", "0")], "disabled"),
        (
            vec![("enabled", "1"), ("kubeconfig", "/nonexistent")],
            "kubeconfig /nonexistent is missing",
        ),
        // The WAN network is not up (boot, a PPPoE drop): no instance at all, rather than a
        // daemon started with half its flags.
        (
            vec![
                ("enabled", "1"),
                ("kubeconfig", kubeconfig.as_str()),
                ("wan_network", "wanb"),
            ],
            "no WAN device is up",
        ),
    ];
    for (uci, reason) in cases {
        let (lines, stderr) = init_run(&uci, &dir, "start_service");
        assert!(!lines.iter().any(|l| l == "<open>"), "{uci:?}: {lines:?}");
        assert!(stderr.contains(reason), "{uci:?}: {stderr}");
        // Also in logd: from a trigger, procd discards the script's stderr.
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("<logd -t kube-port-forward") && l.contains(reason)),
            "{uci:?}: {lines:?}"
        );
    }
    // The same with a device named directly starts it.
    let uci = [
        ("enabled", "1"),
        ("kubeconfig", kubeconfig.as_str()),
        ("wan_network", "wanb"),
        ("wan_device", "eth9"),
    ];
    let command = init_command(&uci, &dir).join(" ");
    assert!(command.contains("--wan-interface eth9 "), "{command}");
    assert!(command.contains("--table kube_port_forward"), "{command}");
}

#[test]
fn a_policy_file_replaces_the_policy_options_and_reload_follows_it_and_the_kubeconfig() {
    let dir = TempDir::new();
    let kubeconfig = dir.write("kubeconfig", "not: [a kubeconfig");
    let policy = dir.write("policy.yaml", "ports: 80,443\n");
    // The shipped config's own policy options stay set beside the file.
    let uci = [
        ("enabled", "1"),
        ("kubeconfig", kubeconfig.as_str()),
        ("wan_device", "eth1"),
        ("policy_file", policy.as_str()),
        ("node_ports", "off"),
        ("allow_ports", "443"),
        ("allow_target", "192.168.1.0/24"),
        ("allow_external_ips", "1"),
    ];
    let command = init_command(&uci, &dir);
    let line = command.join(" ");
    assert!(line.contains(&format!("--policy {policy}")), "{line}");
    for flag in ["--node-ports", "--allow-"] {
        assert!(!line.contains(flag), "{flag} beside --policy: {line}");
    }
    flags_accepted(&command, &kubeconfig);
    // procd restarts the instance on `reload` when either file changed.
    let (lines, _) = init_run(&uci, &dir, "start_service");
    for file in [&kubeconfig, &policy] {
        assert!(lines.contains(&format!("<file {file}>")), "{lines:?}");
    }
}

#[test]
fn every_wan_network_coming_up_reloads_the_service() {
    let dir = TempDir::new();
    let (lines, _) = init_run(
        &[("wan_network", "wan wan6 wanb")],
        &dir,
        "service_triggers",
    );
    assert_eq!(
        lines,
        [
            "<reload-trigger kube-port-forward>",
            "<interface-trigger interface.*.up wan /etc/init.d/kube-port-forward reload>",
            "<interface-trigger interface.*.up wan6 /etc/init.d/kube-port-forward reload>",
            "<interface-trigger interface.*.up wanb /etc/init.d/kube-port-forward reload>",
        ]
    );
}

#[test]
fn uninstall_releases_on_the_daemons_context() {
    let dir = TempDir::new();
    let kubeconfig = dir.write("kubeconfig", "");
    // `PROG` prints its arguments; `nft` is a no-op here, not the host's.
    let tail = "PROG=echo\nnft() { :; }\nuninstall";
    for (context, expected) in [
        (Some("homelab"), "--context homelab --finalizer"),
        (None, "--kubeconfig"),
    ] {
        let mut uci = vec![("kubeconfig", kubeconfig.as_str())];
        uci.extend(context.map(|c| ("context", c)));
        let (lines, stderr) = init_run(&uci, &dir, tail);
        let line = lines.join(" ");
        assert!(line.starts_with("release-finalizers"), "{line} {stderr}");
        assert!(line.contains(expected), "{line}");
        assert_eq!(line.contains("--context"), context.is_some(), "{line}");
    }
    // The cluster cannot be reached: the package stays, and so does a running daemon.
    let tail = "PROG=false\nnft() { :; }\nenable() { echo '<enable>'; }\nstart() { echo '<start>'; }\nuninstall";
    let (lines, stderr) = init_run(&[("kubeconfig", kubeconfig.as_str())], &dir, tail);
    assert!(stderr.contains("cannot release the finalizers"), "{stderr}");
    assert!(
        lines.ends_with(&["<enable>".to_owned(), "<start>".to_owned()]),
        "{lines:?}"
    );
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(repo("systemd/kube-port-forward.service")).unwrap();
    for directive in [
        "Type=notify",
        "WatchdogSec=",
        "TimeoutStartSec=infinity\n",
        "CapabilityBoundingSet=CAP_NET_ADMIN\n",
        "AmbientCapabilities=CAP_NET_ADMIN\n",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "LoadCredential=kubeconfig:",
        "--kubeconfig ${CREDENTIALS_DIRECTORY}/kubeconfig",
    ] {
        assert!(unit.contains(directive), "no {directive}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: verify skipped");
        return;
    }
    // Verified against the binary just built, where the unit will find it once installed.
    let dir = TempDir::new();
    let path = dir.write(
        "kube-port-forward.service",
        &unit.replace("/usr/sbin/kube-port-forward", BIN),
    );
    let output = Command::new("systemd-analyze")
        .args(["verify", &path])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "{stderr}"
    );
}

/// The install steps at the top of the unit, which README repeats word for word.
fn systemd_steps() -> Vec<String> {
    let unit = std::fs::read_to_string(repo("systemd/kube-port-forward.service")).unwrap();
    unit.lines()
        .filter_map(|l| l.strip_prefix("#   "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_systemd_steps_let_the_dynamic_user_read_the_policy_and_not_the_kubeconfig() {
    let steps = systemd_steps();
    assert!(steps.len() >= 6, "{steps:?}");
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    for step in &steps {
        assert!(readme.contains(step.as_str()), "README lacks {step:?}");
    }
    // The steps, into a root of the test's own, with the kubeconfig and policy to install.
    let dir = TempDir::new();
    let root = dir.path.join("root");
    for sub in ["usr/sbin", "etc/systemd/system", "etc/default"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let kubeconfig = dir.write("router.kubeconfig", "apiVersion: v1\nkind: Config\n");
    let policy = dir.write("policy.yaml", "ports: 80,443,8080\n");
    let root = root.display().to_string();
    for step in steps.iter().filter(|s| !s.starts_with("systemctl")) {
        let line = step
            .replace(" /etc/", &format!(" {root}/etc/"))
            .replace("/usr/sbin/", &format!("{root}/usr/sbin/"))
            .replace("target/release/kube-port-forward", BIN)
            .replace("router.kubeconfig", &kubeconfig)
            .replace(" policy.yaml ", &format!(" {policy} "));
        output_ok(Command::new("sh").args(["-c", &line]).current_dir(repo("")));
    }
    let defaults =
        std::fs::read_to_string(format!("{root}/etc/default/kube-port-forward")).unwrap();
    let args = defaults
        .trim()
        .strip_prefix("KUBE_PORT_FORWARD_ARGS=")
        .unwrap();
    // A user of systemd's dynamic range, as the unit's DynamicUser= gets.
    let dynamic = 61_184;
    let output = Command::new(format!("{root}/usr/sbin/kube-port-forward"))
        .args(["plan", "-f", "examples/"])
        .args(args.split_whitespace())
        .current_dir(repo(""))
        .uid(dynamic)
        .gid(dynamic)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let installed = format!("{root}/etc/kube-port-forward/kubeconfig");
    assert_eq!(mode(Path::new(&installed)), 0o600);
    let cat = Command::new("cat")
        .arg(&installed)
        .uid(dynamic)
        .gid(dynamic)
        .output()
        .unwrap();
    assert!(
        !cat.status.success(),
        "the kubeconfig is readable by others"
    );
}

#[test]
fn the_minted_kubeconfig_is_private_and_reads_as_a_kubeconfig() {
    let dir = TempDir::new();
    let bin = dir.path.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // kubectl as the cluster would answer the script's three questions.
    let kubectl = bin.join("kubectl");
    std::fs::write(
        &kubectl,
        "#!/bin/sh\n\
         case \"$*\" in\n\
         *'{.data.token}'*) printf %s c2VjcmV0LXRva2Vu ;;\n\
         *'{.data.ca\\.crt}'*) printf %s Q0EtREFUQQ== ;;\n\
         *'{.clusters[0].cluster.server}'*) printf %s https://127.0.0.1:6443 ;;\n\
         *) exit 1 ;;\n\
         esac\n",
    )
    .unwrap();
    std::fs::set_permissions(&kubectl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.path.join("router.kubeconfig");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    output_ok(
        Command::new("sh")
            .arg(repo("deploy/mint-kubeconfig.sh"))
            .args([
                "-o",
                out.to_str().unwrap(),
                "-s",
                "https://192.168.1.5:6443",
            ])
            .env("PATH", path),
    );
    assert_eq!(mode(&out), 0o600);
    let config = kube::config::Kubeconfig::read_from(&out).unwrap();
    let cluster = config.clusters[0].cluster.as_ref().unwrap();
    assert_eq!(cluster.server.as_deref(), Some("https://192.168.1.5:6443"));
    assert_eq!(
        cluster.certificate_authority_data.as_deref(),
        Some("Q0EtREFUQQ==")
    );
    let user = config.auth_infos[0].auth_info.as_ref().unwrap();
    let token = user.token.as_ref().unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(token.expose_secret(), "secret-token");
    assert_eq!(config.current_context.as_deref(), Some("router"));
}

#[test]
fn uninstall_releases_the_finalizers_and_the_table_or_fails_and_keeps_both() {
    let router = common::Netns::new("un");
    let api = common::apiserver::ApiServer::new();
    let addr = api.listen(Some(&router));
    let finalizers = ["kube-port-forward-controller/finalizer", "example.com/keep"];
    api.create(serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "apps", "finalizers": finalizers},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 80}]}}));
    let dir = TempDir::new();
    let kubeconfig = dir.write(
        "kubeconfig",
        &common::apiserver::ApiServer::kubeconfig(addr),
    );
    let uci = [("kubeconfig", kubeconfig.as_str())];
    // The package's binary is this build's; `uninstall`'s exit status is the prerm's. The
    // daemon started again after a failed release is rc.common's business, stubbed here.
    let script = init_harness(
        &uci,
        &dir,
        &format!("PROG={BIN}\nenable() {{ :; }}\nstart() {{ :; }}\nuninstall"),
    );
    let uninstall = || {
        Command::new("ip")
            .args(["netns", "exec", &router.name, "sh", &script])
            .output()
            .unwrap()
    };
    let table_present = || {
        router
            .output("nft", &["list", "table", "inet", "kube_port_forward"])
            .status
            .success()
    };
    let ours_present = || {
        api.get("apps", "web").unwrap()["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == finalizers[0])
    };

    // The cluster cannot be reached: uninstall fails, the table and the finalizer stay.
    router.nft(&["add", "table", "inet", "kube_port_forward"]);
    api.stop();
    let failed = uninstall();
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("cannot release the finalizers"));
    assert!(table_present());
    assert!(ours_present());

    // Back: this router's finalizer is released (the other stays) and the table removed.
    api.listen_at(Some(&router), addr.port());
    let done = uninstall();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(!table_present());
    assert!(!ours_present());
    assert_eq!(
        api.get("apps", "web").unwrap()["metadata"]["finalizers"],
        serde_json::json!(["example.com/keep"])
    );
}

#[test]
fn the_admission_policy_names_the_routers_account_finalizer_and_condition() {
    let policy = std::fs::read_to_string(repo("deploy/admission-policy.yaml")).unwrap();
    let rbac = std::fs::read_to_string(repo("deploy/rbac.yaml")).unwrap();
    // The ServiceAccount of deploy/rbac.yaml, and the daemon's defaults.
    assert!(rbac.contains(
        "kind: ServiceAccount\nmetadata:\n  name: router\n  namespace: kube-port-forward"
    ));
    for expected in [
        "request.userInfo.username == \"system:serviceaccount:kube-port-forward:router\"",
        &format!(
            "expression: \"'{}'\"",
            kube_port_forward::daemon::DEFAULT_FINALIZER
        ),
        &format!(
            "expression: \"'{}'\"",
            kube_port_forward::daemon::DEFAULT_CONDITION
        ),
        "apiVersion: admissionregistration.k8s.io/v1",
        "validationActions: [Deny]",
        "policyName: kube-port-forward-router",
    ] {
        assert!(policy.contains(expected), "{expected:?} not in the policy");
    }
    // It covers what RBAC lets the router patch.
    assert!(policy.contains("resources: [\"services\", \"services/status\"]"));
}
