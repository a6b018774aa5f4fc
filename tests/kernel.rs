//! The nft adapter against the real kernel, in network namespaces the tests create. Needs
//! root.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use common::*;
use kube_port_forward::core::model::{Family, Forward, ForwardKey, Owner, Protocol, Target};
use kube_port_forward::kernel::{Change, DEFAULT_TABLE, Ruleset, TableConfig};
use kube_port_forward::kernel::{Engine, Firewall, NftCli, NftError};
use nftables::schema::Nftables;

/// The real adapter, recording every transaction it sends.
#[derive(Default)]
struct Recording {
    inner: NftCli,
    sent: Vec<String>,
}

impl Firewall for Recording {
    fn list_table(&mut self, table: &str) -> Result<Option<Nftables<'static>>, NftError> {
        self.inner.list_table(table)
    }
    fn apply(&mut self, transaction: &str, echo: bool) -> Result<String, NftError> {
        self.sent.push(transaction.to_owned());
        self.inner.apply(transaction, echo)
    }
    fn check(&mut self, transaction: &str) -> Result<(), NftError> {
        self.inner.check(transaction)
    }
}

fn forward(port: u16, target: &str) -> Forward {
    let addr: IpAddr = target.parse().unwrap();
    Forward {
        key: ForwardKey {
            family: Family::of(addr),
            protocol: if port.is_multiple_of(2) {
                Protocol::Tcp
            } else {
                Protocol::Udp
            },
            external_port: port,
        },
        target: Target {
            addr,
            port: 8000 + port % 1000,
        },
        owner: Owner {
            namespace: "ns".into(),
            name: format!("svc-{port}"),
            uid: Some(format!("uid-{port}")),
            service_port: "http".into(),
        },
        // Every fifth forward is limited to some clients; a /32 or /128 reads back from
        // the kernel as a plain address, so one of those too.
        sources: match (port % 5, addr) {
            (0, IpAddr::V4(_)) => vec![
                "10.0.0.0/8".parse().unwrap(),
                "203.0.113.2/32".parse().unwrap(),
            ],
            (0, IpAddr::V6(_)) => vec!["fd00::/8".parse().unwrap()],
            _ => Vec::new(),
        },
    }
}

fn ruleset(forwards: impl IntoIterator<Item = Forward>) -> Ruleset {
    let config = TableConfig::new(
        DEFAULT_TABLE,
        ["wan".to_owned()],
        [
            "203.0.113.1".parse().unwrap(),
            "2001:db8:1::1".parse().unwrap(),
        ],
    )
    .unwrap();
    let forwards: BTreeMap<ForwardKey, Forward> =
        forwards.into_iter().map(|f| (f.key, f)).collect();
    Ruleset::new(config, forwards)
}

fn many(n: u16) -> Vec<Forward> {
    (1..=n)
        .map(|i| {
            let target = if i.is_multiple_of(3) {
                format!("fd00:50::{:x}", i)
            } else {
                format!("192.168.{}.{}", i / 250, i % 250 + 1)
            };
            forward(10_000 + i, &target)
        })
        .collect()
}

/// What a fresh engine, reading the kernel in full, would still change.
fn kernel_diff(desired: &Ruleset) -> Change {
    let desired = desired.clone();
    let mut engine = Engine::new(NftCli::default());
    let current = engine
        .read(&desired.config.table, Some(&desired.config))
        .unwrap();
    desired.diff(current.as_ref())
}

#[test]
fn first_apply_creates_and_an_unchanged_reapply_sends_nothing() {
    let ns = Netns::new("k1");
    ns.enter(|| {
        let desired = ruleset(many(50));
        let mut engine = Engine::new(Recording::default());
        let first = engine.apply(desired.clone()).unwrap();
        assert!(first.rebuilt.is_some() && first.sent);
        assert_eq!(first.added.len(), 50);
        assert_eq!(kernel_diff(&desired), Change::Nothing);
        // Same engine (remembers), then a new one (reads the kernel): nothing sent either way.
        let again = engine.apply(desired.clone()).unwrap();
        assert!(!again.sent && again.added.is_empty() && again.removed.is_empty());
        let mut fresh = Engine::new(Recording::default());
        assert!(!fresh.apply(desired.clone()).unwrap().sent);
        assert_eq!(engine.firewall().sent.len(), 1);
        assert!(fresh.firewall().sent.is_empty());
    });
    let listing = ns.nft(&["list", "table", "inet", DEFAULT_TABLE]);
    assert!(
        listing.contains("comment \"ns/svc-10001:http uid=uid-10001\""),
        "{listing}"
    );
    assert!(listing.contains("counter packets 0 bytes 0"), "{listing}");
}

#[test]
fn one_change_among_many_sends_only_that_change() {
    let ns = Netns::new("k2");
    ns.enter(|| {
        let forwards = many(300);
        let mut engine = Engine::new(Recording::default());
        engine.apply(ruleset(forwards.clone())).unwrap();
        let mut changed = forwards.clone();
        changed[150].target.port = 9999;
        let desired = ruleset(changed);
        let applied = engine.apply(desired.clone()).unwrap();
        assert!(applied.rebuilt.is_none());
        assert_eq!(
            applied.added,
            vec![desired.forwards[&forwards[150].key].clone()]
        );
        assert!(applied.removed.is_empty());
        let sent: serde_json::Value =
            serde_json::from_str(engine.firewall().sent.last().unwrap()).unwrap();
        let commands = sent["nftables"].as_array().unwrap();
        // Delete and add in both maps of one family: four commands, one element each.
        assert_eq!(commands.len(), 4, "{sent}");
        for command in commands {
            let element = command
                .get("add")
                .or_else(|| command.get("delete"))
                .unwrap()["element"]
                .clone();
            assert_eq!(element["elem"].as_array().unwrap().len(), 1, "{sent}");
        }
        assert_eq!(kernel_diff(&desired), Change::Nothing);
    });
}

#[test]
fn removed_forwards_leave_the_kernel() {
    let ns = Netns::new("k3");
    ns.enter(|| {
        let forwards = many(40);
        let mut engine = Engine::new(NftCli::default());
        engine.apply(ruleset(forwards.clone())).unwrap();
        let kept: Vec<Forward> = forwards.iter().step_by(2).cloned().collect();
        let desired = ruleset(kept);
        let applied = engine.apply(desired.clone()).unwrap();
        assert_eq!(applied.removed.len(), 20);
        // The kernel's echo of the transaction reports each removed key deleted.
        let removed: std::collections::BTreeSet<ForwardKey> =
            applied.removed.iter().map(|r| r.key).collect();
        assert_eq!(applied.confirmed_removed, removed);
        // The other confirmation, an uncommitted `create` of the same keys, agrees, and
        // refuses a key that is still there.
        let removed: Vec<ForwardKey> = removed.into_iter().collect();
        assert!(engine.confirmed_absent(&removed));
        let present = *desired.forwards.keys().next().unwrap();
        assert!(!engine.confirmed_absent(&[removed[0], present]));
        assert!(
            applied.removed[0].was.contains("uid="),
            "{:?}",
            applied.removed[0]
        );
        assert_eq!(kernel_diff(&desired), Change::Nothing);
        let empty = ruleset([]);
        engine.apply(empty.clone()).unwrap();
        assert_eq!(kernel_diff(&empty), Change::Nothing);
    });
    let listing = ns.nft(&["list", "table", "inet", DEFAULT_TABLE]);
    assert!(
        !listing.contains("elements = { tcp") && !listing.contains("udp ."),
        "{listing}"
    );
}

#[test]
fn a_table_deleted_from_outside_is_rebuilt_on_the_next_apply() {
    let ns = Netns::new("k4");
    let name = ns.name.clone();
    ns.enter(move || {
        let desired = ruleset(many(20));
        let mut engine = Engine::new(NftCli::default());
        engine.apply(desired.clone()).unwrap();
        run("ip", &["netns", "exec", &name, "nft", "flush", "ruleset"]);
        assert!(matches!(kernel_diff(&desired), Change::Rebuild(_)));
        let applied = engine.apply(desired.clone()).unwrap();
        assert!(applied.rebuilt.unwrap().contains("missing"));
        assert_eq!(applied.added.len(), 20);
        assert_eq!(kernel_diff(&desired), Change::Nothing);

        // Deleted again, and this time the next apply has a change to send: the incremental
        // transaction fails and the table is rebuilt whole.
        run_line(&format!(
            "ip netns exec {name} nft delete table inet {DEFAULT_TABLE}"
        ));
        let changed = ruleset(many(21));
        let applied = engine.apply(changed.clone()).unwrap();
        assert!(
            applied
                .rebuilt
                .unwrap()
                .contains("incremental update failed")
        );
        assert_eq!(kernel_diff(&changed), Change::Nothing);
    });
}

#[test]
fn a_rule_added_to_our_chain_from_outside_is_removed() {
    let ns = Netns::new("k5");
    let name = ns.name.clone();
    ns.enter(move || {
        let desired = ruleset(many(5));
        let mut engine = Engine::new(NftCli::default());
        engine.apply(desired.clone()).unwrap();
        run_line(&format!(
            "ip netns exec {name} nft add rule inet {DEFAULT_TABLE} prerouting tcp dport 22 dnat ip to 10.9.9.9"
        ));
        // A resync (or, later, a netlink notification) makes the engine read the table.
        engine.forget();
        let applied = engine.apply(desired.clone()).unwrap();
        assert!(applied.rebuilt.is_some());
        assert!(applied.added.is_empty(), "nothing new was opened: {:?}", applied.added);
        assert_eq!(kernel_diff(&desired), Change::Nothing);
    });
    assert!(
        !ns.nft(&["list", "table", "inet", DEFAULT_TABLE])
            .contains("10.9.9.9")
    );
}

#[test]
fn foreign_tables_in_the_same_namespace_are_untouched() {
    let ns = Netns::new("k6");
    let foreign = "table inet fw4 {
    set banned {
        type ipv4_addr
        elements = { 198.51.100.7 }
    }
    chain dstnat {
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport 2222 counter dnat ip to 192.168.1.5:22
    }
}
table ip nat {
    chain pre {
        type nat hook prerouting priority -150;
    }
}
";
    let dir = TempDir::new();
    let file = dir.write("foreign.nft", foreign);
    ns.nft(&["-f", &file]);
    let before = (
        ns.nft(&["-a", "list", "table", "inet", "fw4"]),
        ns.nft(&["-a", "list", "table", "ip", "nat"]),
    );
    ns.enter(|| {
        let mut engine = Engine::new(NftCli::default());
        engine.apply(ruleset(many(30))).unwrap();
        engine.apply(ruleset(many(10))).unwrap();
        engine.forget();
        let mut other = ruleset(many(3));
        other.config = TableConfig::new(DEFAULT_TABLE, [], []).unwrap();
        assert!(engine.apply(other.clone()).unwrap().rebuilt.is_some());
    });
    let after = (
        ns.nft(&["-a", "list", "table", "inet", "fw4"]),
        ns.nft(&["-a", "list", "table", "ip", "nat"]),
    );
    assert_eq!(before, after);
}

#[test]
fn the_rendered_script_loads_into_the_same_table_as_the_transaction() {
    let plain = ruleset(many(25));
    let mut reflecting = plain.clone();
    reflecting.config.reflection = true;
    reflecting.config.ct_mark = 0x100;
    assert!(reflecting.config.reflects());
    for (desired, names) in [(plain, ["k7", "k8"]), (reflecting, ["k9", "k10"])] {
        loads_the_same(desired, names);
    }
}

fn loads_the_same(desired: Ruleset, [text, json]: [&str; 2]) {
    let from_text = Netns::new(text);
    let from_json = Netns::new(json);
    let dir = TempDir::new();
    let script = dir.write("plan.nft", &desired.render());
    from_text.nft(&["-f", &script]);
    let json_desired = desired.clone();
    from_json.enter(move || {
        Engine::new(NftCli::default())
            .apply(json_desired.clone())
            .unwrap();
        // Read back whole, the table has the shape asked for.
        assert_eq!(kernel_diff(&json_desired), Change::Nothing);
    });
    assert_eq!(
        from_text.nft(&["list", "ruleset"]),
        from_json.nft(&["list", "ruleset"])
    );
}
