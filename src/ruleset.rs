//! The nftables table this daemon owns: its desired content, how it reads back from the
//! kernel, the difference between the two, and the one transaction that closes it.
//!
//! DNAT is a map lookup keyed on `meta l4proto . th dport`: one lookup per new flow however
//! many forwards exist. nft 1.0.6 (Debian 12) cannot create a map whose value is
//! `addr . port` from JSON, so each family has two maps with the same key, one for the
//! address and one for the port. Owners travel as element comments, and the address maps
//! count packets per element (NAT chains see only a flow's first packet, so the count is of
//! new flows).
//!
//! Pure: building and diffing never touch the kernel; [`crate::nft`] sends what is built here.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use nftables::expr::{BinaryOperation, CT, Map as MapExpr, Payload, PayloadField};
use nftables::expr::{Elem, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression};
use nftables::schema::{self, NfCmd, NfListObject, NfObject, Nftables, SetType, SetTypeValue};
use nftables::stmt::{Counter, Mangle, Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::Serialize;

use crate::model::{Family, Forward, ForwardKey, Protocol};

pub const DEFAULT_TABLE: &str = "kube_port_forward";
const CHAIN: &str = "prerouting";
/// The chain that masquerades reflected flows, when NAT reflection is on.
const REFLECT_CHAIN: &str = "postrouting";
const WAN_IFACES: &str = "wan_ifaces";
/// nft refuses comments longer than this (NFTNL_UDATA_COMMENT_MAXLEN).
pub const COMMENT_MAX: usize = 128;
/// The `dstnat` priority of a NAT prerouting chain.
const DSTNAT_PRIORITY: i32 = -100;
/// The `srcnat` priority of a NAT postrouting chain.
const SRCNAT_PRIORITY: i32 = 100;
/// The conntrack mark bit set on every flow this table DNATs, so a firewall's forward chain
/// (firewall4's, through the shipped include) can accept exactly those flows. Bit 21: not
/// used by firewall4, mwan3 (0x3f00) or SQM/qosify's DSCP bits (0xfc000000, 0x7f).
pub const DEFAULT_CT_MARK: u32 = 0x0020_0000;

/// How the table is shaped: which packets it considers for DNAT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TableConfig {
    /// Name of the `inet` table the daemon owns.
    pub table: String,
    /// Packets must arrive on one of these interfaces; empty: any interface.
    pub wan_interfaces: BTreeSet<String>,
    /// Packets must be addressed to one of these; empty (unless `listed_addresses`): to any
    /// local address of the router (`fib daddr type local`).
    pub wan_addresses: BTreeSet<IpAddr>,
    /// Match destinations against the WAN address sets even while they are empty: the daemon
    /// fills them from the WAN interfaces' addresses, which come and go.
    pub listed_addresses: bool,
    /// NAT reflection: LAN clients reach forwards through the WAN address too, masqueraded
    /// so replies come back through the router. Needs WAN interfaces and listed addresses
    /// (without them a LAN client cannot be told from a WAN one).
    pub reflection: bool,
    /// Bits OR-ed into the conntrack mark of every flow this table DNATs.
    pub ct_mark: u32,
}

/// Why a [`TableConfig`] is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "table name \"{0}\": use 1 to 64 letters, digits and underscores, starting with a letter"
    )]
    TableName(String),
    #[error(
        "WAN interface \"{0}\": an interface name has 1 to 15 characters, none of them '/', ':', space or quote"
    )]
    Interface(String),
}

impl TableConfig {
    pub fn new(
        table: &str,
        wan_interfaces: impl IntoIterator<Item = String>,
        wan_addresses: impl IntoIterator<Item = IpAddr>,
    ) -> Result<TableConfig, ConfigError> {
        let table_ok = table.len() <= 64
            && table.starts_with(|c: char| c.is_ascii_alphabetic())
            && table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !table_ok {
            return Err(ConfigError::TableName(table.to_owned()));
        }
        let wan_interfaces: BTreeSet<String> = wan_interfaces.into_iter().collect();
        for name in &wan_interfaces {
            let ok = !name.is_empty()
                && name.len() <= 15
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"/:\"'\\".contains(&b));
            if !ok {
                return Err(ConfigError::Interface(name.clone()));
            }
        }
        Ok(TableConfig {
            table: table.to_owned(),
            wan_interfaces,
            wan_addresses: wan_addresses.into_iter().collect(),
            listed_addresses: false,
            reflection: false,
            ct_mark: DEFAULT_CT_MARK,
        })
    }

    /// What decides the table's structure (as opposed to its elements).
    fn shape(&self) -> (&str, bool, bool, bool, u32) {
        (
            &self.table,
            self.match_interfaces(),
            self.match_addresses(),
            self.reflects(),
            self.ct_mark,
        )
    }

    /// The comments of this daemon's rules, in chain order.
    pub fn rule_comments(&self) -> Vec<String> {
        let mut comments: Vec<String> = self
            .rules()
            .into_iter()
            .map(|(f, w, side)| self.rule_comment(f, w, side))
            .collect();
        if self.reflects() {
            comments.push(self.reflect_comment());
        }
        comments
    }

    fn match_interfaces(&self) -> bool {
        !self.wan_interfaces.is_empty()
    }

    /// The prerouting rules, in chain order.
    fn rules(&self) -> Vec<(Family, Who, Side)> {
        let sides: &[Side] = if self.reflects() {
            &[Side::Wan, Side::Lan]
        } else if self.match_interfaces() {
            &[Side::Wan]
        } else {
            &[Side::Any]
        };
        let mut rules = Vec::new();
        for side in sides {
            for (family, who) in RULES {
                rules.push((family, who, *side));
            }
        }
        rules
    }

    /// The conntrack mark bits a rule sets: reflected flows also carry the next bit up, which
    /// the postrouting chain masquerades (it cannot see the input interface itself).
    fn mark_of(&self, side: Side) -> u32 {
        match side {
            Side::Lan => self.ct_mark | self.reflect_mark(),
            Side::Wan | Side::Any => self.ct_mark,
        }
    }

    fn reflect_mark(&self) -> u32 {
        self.ct_mark << 1
    }

    fn match_addresses(&self) -> bool {
        self.listed_addresses || !self.wan_addresses.is_empty()
    }

    /// Whether NAT reflection is in effect: asked for, and the table can tell LAN from WAN.
    pub fn reflects(&self) -> bool {
        self.reflection && self.match_interfaces() && self.match_addresses()
    }

    fn reflect_comment(&self) -> String {
        format!(
            "kube-port-forward reflection mark=0x{:08x}",
            self.reflect_mark()
        )
    }

    /// The comment that marks this daemon's rule for a family. It records the shape, so a
    /// table built for another configuration is recognised and rebuilt.
    fn rule_comment(&self, family: Family, who: Who, side: Side) -> String {
        format!(
            "kube-port-forward {} {} iif={} daddr={} mark=0x{:08x}",
            family_word(family),
            who.word(),
            side.word(),
            if self.match_addresses() {
                "set"
            } else {
                "local"
            },
            self.mark_of(side)
        )
    }
}

fn family_word(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

fn wan_set(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "wan_ipv4",
        Family::Ipv6 => "wan_ipv6",
    }
}

fn addr_map(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "fwd_ipv4_addr",
        Family::Ipv6 => "fwd_ipv6_addr",
    }
}

fn port_map(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "fwd_ipv4_port",
        Family::Ipv6 => "fwd_ipv6_port",
    }
}

/// Which forwards a rule serves: those open to every client, whose keys are in a hash set,
/// or those limited by source ranges, in an interval set. Kept apart because nft reads an
/// interval set whole on every change to it: forwards without ranges, the usual case, must
/// not pay for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Open,
    Ranges,
}

impl Who {
    fn word(self) -> &'static str {
        match self {
            Who::Open => "open",
            Who::Ranges => "ranges",
        }
    }
}

/// Which input interfaces a prerouting rule takes: the WAN ones, the others (LAN clients
/// reaching a forward through the WAN address: NAT reflection), or any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Wan,
    Lan,
    Any,
}

impl Side {
    fn word(self) -> &'static str {
        match self {
            Side::Wan => "wan",
            Side::Lan => "lan",
            Side::Any => "any",
        }
    }
}

/// The rules of one side of the chain, in order.
const RULES: [(Family, Who); 4] = [
    (Family::Ipv4, Who::Open),
    (Family::Ipv4, Who::Ranges),
    (Family::Ipv6, Who::Open),
    (Family::Ipv6, Who::Ranges),
];

/// The hash set of `protocol . port` of forwards open to every client.
fn open_set(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "open_ipv4",
        Family::Ipv6 => "open_ipv6",
    }
}

/// The interval set of `source network . protocol . port` of forwards limited to some
/// clients: one lookup per new flow, however many forwards and ranges.
fn src_set(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "src_ipv4",
        Family::Ipv6 => "src_ipv6",
    }
}

/// One element of a source set: clients in `net` may use the forward `key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source {
    pub key: ForwardKey,
    pub net: IpNet,
}

/// The source set elements of a forward: one per range; none when it is open to all.
fn sources_of(forward: &Forward) -> Vec<Source> {
    forward
        .sources
        .iter()
        .map(|net| Source {
            key: forward.key,
            net: *net,
        })
        .collect()
}

/// The open set element of a forward open to every client.
fn open_of(forward: &Forward) -> Option<ForwardKey> {
    forward.sources.is_empty().then_some(forward.key)
}

fn addr_type(family: Family) -> SetType {
    match family {
        Family::Ipv4 => SetType::Ipv4Addr,
        Family::Ipv6 => SetType::Ipv6Addr,
    }
}

const FAMILIES: [Family; 2] = [Family::Ipv4, Family::Ipv6];

/// The element comment that records a forward's owner in the kernel:
/// `namespace/name:port uid=UID`, the human part shortened with `~` when the whole would
/// pass nft's limit, so the uid always survives.
pub fn owner_comment(forward: &Forward) -> String {
    let human = forward.owner.to_string();
    let uid = match &forward.owner.uid {
        Some(uid) => format!(" uid={uid}"),
        None => String::new(),
    };
    if human.len() + uid.len() <= COMMENT_MAX {
        return format!("{human}{uid}");
    }
    // Owner text is ASCII (checked by the planner), so byte slicing is safe.
    let keep = COMMENT_MAX - uid.len() - 1;
    format!("{}~{uid}", &human[..keep])
}

/// What the table should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub config: TableConfig,
    pub forwards: BTreeMap<ForwardKey, Forward>,
}

/// One map element as the kernel holds it (or should hold it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element<V> {
    pub value: V,
    pub comment: Option<String>,
}

/// The table as read from the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelTable {
    /// Why the table is not of the shape this configuration needs, if it is not.
    pub shape_problem: Option<String>,
    pub wan_interfaces: BTreeSet<String>,
    pub wan_addresses: BTreeSet<IpAddr>,
    pub addrs: BTreeMap<ForwardKey, Element<IpAddr>>,
    pub ports: BTreeMap<ForwardKey, Element<u16>>,
    pub sources: BTreeSet<Source>,
    pub open: BTreeSet<ForwardKey>,
    /// Packets counted per forward (address map counters).
    pub counters: BTreeMap<ForwardKey, (u64, u64)>,
}

/// What the next transaction must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The kernel already holds the desired table.
    Nothing,
    /// Replace the whole table in one transaction, for this reason.
    Rebuild(String),
    /// Change only what differs.
    Update(Box<Update>),
}

/// Elements to delete and add, all in one transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub delete_addrs: Vec<ForwardKey>,
    pub delete_ports: Vec<ForwardKey>,
    /// Keys of the desired forwards to (re)add to both maps.
    pub add: Vec<ForwardKey>,
    pub add_interfaces: Vec<String>,
    pub delete_interfaces: Vec<String>,
    pub add_addresses: Vec<IpAddr>,
    pub delete_addresses: Vec<IpAddr>,
    pub add_sources: Vec<Source>,
    pub delete_sources: Vec<Source>,
    pub add_open: Vec<ForwardKey>,
    pub delete_open: Vec<ForwardKey>,
}

impl Change {
    fn new(shape_problem: Option<String>, delta: Update) -> Change {
        match shape_problem {
            Some(problem) => Change::Rebuild(problem),
            None if delta.is_empty() => Change::Nothing,
            None => Change::Update(Box::new(delta)),
        }
    }
}

impl Update {
    pub fn is_empty(&self) -> bool {
        *self == Update::default()
    }

    fn remove_forward(&mut self, forward: &Forward) {
        self.delete_addrs.push(forward.key);
        self.delete_ports.push(forward.key);
        self.delete_sources.extend(sources_of(forward));
        self.delete_open.extend(open_of(forward));
    }

    fn add_forward(&mut self, forward: &Forward) {
        self.add.push(forward.key);
        self.add_sources.extend(sources_of(forward));
        self.add_open.extend(open_of(forward));
    }

    fn set_wan(
        &mut self,
        config: &TableConfig,
        interfaces: &BTreeSet<String>,
        addresses: &BTreeSet<IpAddr>,
    ) {
        self.add_interfaces = config
            .wan_interfaces
            .difference(interfaces)
            .cloned()
            .collect();
        self.delete_interfaces = interfaces
            .difference(&config.wan_interfaces)
            .cloned()
            .collect();
        self.add_addresses = config
            .wan_addresses
            .difference(addresses)
            .copied()
            .collect();
        self.delete_addresses = addresses
            .difference(&config.wan_addresses)
            .copied()
            .collect();
    }
}

impl Ruleset {
    pub fn new(config: TableConfig, forwards: BTreeMap<ForwardKey, Forward>) -> Ruleset {
        Ruleset { config, forwards }
    }

    /// The kernel table this ruleset is, once applied.
    pub fn as_kernel(&self) -> KernelTable {
        let mut table = KernelTable {
            wan_interfaces: self.config.wan_interfaces.clone(),
            wan_addresses: self.config.wan_addresses.clone(),
            ..KernelTable::default()
        };
        for (key, forward) in &self.forwards {
            let comment = Some(owner_comment(forward));
            table.addrs.insert(
                *key,
                Element {
                    value: forward.target.addr,
                    comment: comment.clone(),
                },
            );
            table.ports.insert(
                *key,
                Element {
                    value: forward.target.port,
                    comment,
                },
            );
            table.sources.extend(sources_of(forward));
            table.open.extend(open_of(forward));
        }
        table
    }

    /// What it takes to turn `current` (`None`: no table) into this ruleset.
    pub fn diff(&self, current: Option<&KernelTable>) -> Change {
        let problem = match current {
            None => Some(format!("table inet {} is missing", self.config.table)),
            Some(table) => table.shape_problem.clone(),
        };
        let empty = KernelTable::default();
        Change::new(problem, self.delta(current.unwrap_or(&empty)))
    }

    /// What it takes to go from `previous`, applied before, to this ruleset.
    pub fn diff_applied(&self, previous: &Ruleset) -> Change {
        let problem = (self.config.shape() != previous.config.shape())
            .then(|| "the table's configuration changed".to_owned());
        Change::new(problem, self.delta_applied(previous))
    }

    /// The elements that differ between `current` and this ruleset, whatever its shape.
    pub fn delta(&self, current: &KernelTable) -> Update {
        let mut update = Update::default();
        for (key, forward) in &self.forwards {
            let comment = Some(owner_comment(forward));
            let addr = current.addrs.get(key);
            let port = current.ports.get(key);
            let addr_same =
                addr.is_some_and(|a| a.value == forward.target.addr && a.comment == comment);
            let port_same =
                port.is_some_and(|p| p.value == forward.target.port && p.comment == comment);
            if addr_same && port_same {
                continue;
            }
            if addr.is_some() {
                update.delete_addrs.push(*key);
            }
            if port.is_some() {
                update.delete_ports.push(*key);
            }
            update.add.push(*key);
        }
        let stale = |key: &&ForwardKey| !self.forwards.contains_key(key);
        update
            .delete_addrs
            .extend(current.addrs.keys().filter(stale));
        update
            .delete_ports
            .extend(current.ports.keys().filter(stale));
        update.delete_addrs.sort_unstable();
        update.delete_ports.sort_unstable();
        let desired: BTreeSet<Source> = self.forwards.values().flat_map(sources_of).collect();
        update.add_sources = desired.difference(&current.sources).copied().collect();
        update.delete_sources = current.sources.difference(&desired).copied().collect();
        let open: BTreeSet<ForwardKey> = self.forwards.values().filter_map(open_of).collect();
        update.add_open = open.difference(&current.open).copied().collect();
        update.delete_open = current.open.difference(&open).copied().collect();
        update.set_wan(
            &self.config,
            &current.wan_interfaces,
            &current.wan_addresses,
        );
        update
    }

    /// [`Ruleset::delta`] against a ruleset known to be applied: compares forwards directly,
    /// with no element built, so its cost is a walk of two sorted maps.
    pub fn delta_applied(&self, previous: &Ruleset) -> Update {
        let mut update = Update::default();
        let mut old = previous.forwards.iter().peekable();
        let mut new = self.forwards.iter().peekable();
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some((_, fo)), None) => {
                    update.remove_forward(fo);
                    old.next();
                }
                (None, Some((_, fnew))) => {
                    update.add_forward(fnew);
                    new.next();
                }
                (Some((ko, fo)), Some((kn, fnew))) => {
                    if ko < kn {
                        update.remove_forward(fo);
                        old.next();
                    } else if kn < ko {
                        update.add_forward(fnew);
                        new.next();
                    } else {
                        if fo != fnew {
                            update.delete_addrs.push(**ko);
                            update.delete_ports.push(**ko);
                            update.add.push(**kn);
                            let (before, after) = (sources_of(fo), sources_of(fnew));
                            let gone = before.iter().filter(|s| !after.contains(s));
                            update.delete_sources.extend(gone);
                            let new_sources = after.iter().filter(|s| !before.contains(s));
                            update.add_sources.extend(new_sources);
                            if open_of(fo) != open_of(fnew) {
                                update.delete_open.extend(open_of(fo));
                                update.add_open.extend(open_of(fnew));
                            }
                        }
                        old.next();
                        new.next();
                    }
                }
            }
        }
        update.set_wan(
            &self.config,
            &previous.config.wan_interfaces,
            &previous.config.wan_addresses,
        );
        update
    }

    /// The nft JSON transaction for a change. `None` for [`Change::Nothing`].
    pub fn transaction(&self, change: &Change) -> Option<String> {
        let commands = match change {
            Change::Nothing => return None,
            Change::Rebuild(_) => self.rebuild_commands(),
            Change::Update(update) => self.update_commands(update),
        };
        Some(to_json(commands))
    }

    fn table(&self) -> schema::Table<'_> {
        schema::Table {
            family: NfFamily::INet,
            name: Cow::Borrowed(&self.config.table),
            handle: None,
        }
    }

    fn element<'a>(&'a self, set: &'static str, elem: Vec<Expression<'a>>) -> NfListObject<'a> {
        NfListObject::Element(schema::Element {
            family: NfFamily::INet,
            table: Cow::Borrowed(&self.config.table),
            name: Cow::Borrowed(set),
            elem: Cow::Owned(elem),
        })
    }

    fn set_decl(&self, name: &'static str, set_type: SetType) -> NfListObject<'_> {
        self.set_of(name, SetTypeValue::Single(set_type), None)
    }

    /// `src_ipv4 { type ipv4_addr . inet_proto . inet_service; flags interval; }`
    fn source_set_decl(&self, family: Family) -> NfListObject<'_> {
        let types = vec![addr_type(family), SetType::InetProto, SetType::InetService];
        let flags = HashSet::from([nftables::schema::SetFlag::Interval]);
        self.set_of(
            src_set(family),
            SetTypeValue::Concatenated(Cow::Owned(types)),
            Some(flags),
        )
    }

    fn set_of(
        &self,
        name: &'static str,
        set_type: SetTypeValue<'static>,
        flags: Option<HashSet<nftables::schema::SetFlag>>,
    ) -> NfListObject<'_> {
        NfListObject::Set(Box::new(schema::Set {
            family: NfFamily::INet,
            table: Cow::Borrowed(&self.config.table),
            name: Cow::Borrowed(name),
            handle: None,
            set_type,
            policy: None,
            flags,
            elem: None,
            timeout: None,
            gc_interval: None,
            size: None,
            comment: None,
        }))
    }

    fn map_decl(&self, name: &'static str, value: SetType) -> NfListObject<'_> {
        NfListObject::Map(Box::new(schema::Map {
            family: NfFamily::INet,
            table: Cow::Borrowed(&self.config.table),
            name: Cow::Borrowed(name),
            handle: None,
            set_type: SetTypeValue::Concatenated(Cow::Borrowed(&[
                SetType::InetProto,
                SetType::InetService,
            ])),
            map: SetTypeValue::Single(value),
            policy: None,
            flags: None,
            elem: None,
            timeout: None,
            gc_interval: None,
            size: None,
            comment: None,
        }))
    }

    fn rule(&self, family: Family, who: Who, side: Side) -> NfListObject<'_> {
        let mut expr = Vec::new();
        let iifname = || {
            Expression::Named(NamedExpression::Meta(Meta {
                key: MetaKey::Iifname,
            }))
        };
        match side {
            Side::Wan => expr.push(matches(iifname(), set_ref(WAN_IFACES))),
            Side::Lan => expr.push(Statement::Match(Match {
                left: iifname(),
                right: set_ref(WAN_IFACES),
                op: Operator::NEQ,
            })),
            Side::Any => {}
        }
        if self.config.match_addresses() {
            expr.push(matches(
                payload(
                    match family {
                        Family::Ipv4 => "ip",
                        Family::Ipv6 => "ip6",
                    },
                    "daddr",
                ),
                set_ref(wan_set(family)),
            ));
        } else {
            expr.push(matches(
                Expression::Named(NamedExpression::Meta(Meta {
                    key: MetaKey::Nfproto,
                })),
                Expression::String(Cow::Borrowed(family_word(family))),
            ));
            expr.push(matches(
                Expression::Named(NamedExpression::Fib(Fib {
                    result: FibResult::Type,
                    flags: HashSet::from([FibFlag::Daddr]),
                })),
                Expression::String(Cow::Borrowed("local")),
            ));
        }
        let proto_port = vec![
            Expression::Named(NamedExpression::Meta(Meta {
                key: MetaKey::L4proto,
            })),
            payload("th", "dport"),
        ];
        expr.push(match who {
            // Forwards open to every client.
            Who::Open => matches(
                Expression::Named(NamedExpression::Concat(proto_port)),
                set_ref(open_set(family)),
            ),
            // Forwards limited to the clients of their source ranges.
            Who::Ranges => {
                let source = payload(
                    match family {
                        Family::Ipv4 => "ip",
                        Family::Ipv6 => "ip6",
                    },
                    "saddr",
                );
                let key = std::iter::once(source).chain(proto_port).collect();
                matches(
                    Expression::Named(NamedExpression::Concat(key)),
                    set_ref(src_set(family)),
                )
            }
        });
        expr.push(Statement::Mangle(Mangle {
            key: ct_mark(),
            value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
                ct_mark(),
                Expression::Number(self.config.mark_of(side)),
            ]))),
        }));
        expr.push(Statement::DNAT(Some(NAT {
            addr: Some(map_lookup(addr_map(family))),
            family: Some(match family {
                Family::Ipv4 => NATFamily::IP,
                Family::Ipv6 => NATFamily::IP6,
            }),
            port: Some(map_lookup(port_map(family))),
            flags: None,
        })));
        NfListObject::Rule(schema::Rule {
            family: NfFamily::INet,
            table: Cow::Borrowed(&self.config.table),
            chain: Cow::Borrowed(CHAIN),
            expr: Cow::Owned(expr),
            handle: None,
            index: None,
            comment: Some(Cow::Owned(self.config.rule_comment(family, who, side))),
        })
    }

    /// The reflection rule: flows DNATed for LAN clients leave masqueraded, so the server
    /// answers the router, which un-NATs both ways.
    fn reflect_rule(&self) -> NfListObject<'_> {
        let bit = self.config.reflect_mark();
        let expr = vec![
            matches(
                Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                    ct_mark(),
                    Expression::Number(bit),
                ))),
                Expression::Number(bit),
            ),
            Statement::Masquerade(None),
        ];
        NfListObject::Rule(schema::Rule {
            family: NfFamily::INet,
            table: Cow::Borrowed(&self.config.table),
            chain: Cow::Borrowed(REFLECT_CHAIN),
            expr: Cow::Owned(expr),
            handle: None,
            index: None,
            comment: Some(Cow::Owned(self.config.reflect_comment())),
        })
    }

    fn forward_elements(&self, family: Family, keys: &[ForwardKey]) -> [Vec<Expression<'_>>; 2] {
        let mut addrs = Vec::new();
        let mut ports = Vec::new();
        for key in keys.iter().filter(|k| k.family == family) {
            let forward = &self.forwards[key];
            let comment = owner_comment(forward);
            addrs.push(Expression::List(vec![
                elem(key, Some(comment.clone())),
                Expression::String(Cow::Owned(forward.target.addr.to_string())),
            ]));
            ports.push(Expression::List(vec![
                elem(key, Some(comment)),
                Expression::Number(u32::from(forward.target.port)),
            ]));
        }
        [addrs, ports]
    }

    /// A transaction that only re-declares the base chain: `nft -c` accepts it exactly when
    /// the table and chain exist, and it changes nothing even if committed.
    pub fn probe(&self) -> String {
        to_json(vec![NfCmd::Add(self.chain())])
    }

    /// A transaction that `nft -c` accepts exactly when none of `keys` is in the address
    /// maps: `create` fails on an element that exists. Nothing is committed.
    pub fn absence_check(&self, keys: &[ForwardKey]) -> String {
        let mut cmds = Vec::new();
        for family in FAMILIES {
            let unspecified = match family {
                Family::Ipv4 => "0.0.0.0",
                Family::Ipv6 => "::",
            };
            let elems: Vec<Expression<'_>> = keys
                .iter()
                .filter(|k| k.family == family)
                .map(|k| {
                    let value = Expression::String(Cow::Borrowed(unspecified));
                    Expression::List(vec![elem(k, None), value])
                })
                .collect();
            if !elems.is_empty() {
                cmds.push(NfCmd::Create(self.element(addr_map(family), elems)));
            }
        }
        to_json(cmds)
    }

    fn chain(&self) -> NfListObject<'_> {
        self.nat_chain(CHAIN, NfHook::Prerouting, DSTNAT_PRIORITY)
    }

    fn reflect_chain(&self) -> NfListObject<'_> {
        self.nat_chain(REFLECT_CHAIN, NfHook::Postrouting, SRCNAT_PRIORITY)
    }

    fn nat_chain(&self, name: &'static str, hook: NfHook, prio: i32) -> NfListObject<'_> {
        NfListObject::Chain(schema::Chain {
            family: NfFamily::INet,
            table: Cow::Borrowed(&self.config.table),
            name: Cow::Borrowed(name),
            newname: None,
            handle: None,
            _type: Some(NfChainType::NAT),
            hook: Some(hook),
            prio: Some(prio),
            dev: None,
            policy: Some(NfChainPolicy::Accept),
        })
    }

    fn rebuild_commands(&self) -> Vec<NfCmd<'_>> {
        let table = || NfListObject::Table(self.table());
        // `add` then `delete` makes the delete valid whether or not the table exists; the
        // kernel applies the whole batch at once, so no packet sees the table absent.
        let mut cmds = vec![
            NfCmd::Add(table()),
            NfCmd::Delete(table()),
            NfCmd::Add(table()),
        ];
        cmds.push(NfCmd::Add(self.set_decl(WAN_IFACES, SetType::Ifname)));
        for family in FAMILIES {
            cmds.push(NfCmd::Add(
                self.set_decl(wan_set(family), addr_type(family)),
            ));
        }
        for family in FAMILIES {
            let key = vec![SetType::InetProto, SetType::InetService];
            let open = SetTypeValue::Concatenated(Cow::Owned(key));
            cmds.push(NfCmd::Add(self.set_of(open_set(family), open, None)));
            cmds.push(NfCmd::Add(self.source_set_decl(family)));
        }
        for family in FAMILIES {
            cmds.push(NfCmd::Add(
                self.map_decl(addr_map(family), addr_type(family)),
            ));
            cmds.push(NfCmd::Add(
                self.map_decl(port_map(family), SetType::InetService),
            ));
        }
        cmds.push(NfCmd::Add(self.chain()));
        if self.config.reflects() {
            cmds.push(NfCmd::Add(self.reflect_chain()));
        }
        for (family, who, side) in self.config.rules() {
            cmds.push(NfCmd::Add(self.rule(family, who, side)));
        }
        if self.config.reflects() {
            cmds.push(NfCmd::Add(self.reflect_rule()));
        }
        let all = Update {
            add: self.forwards.keys().copied().collect(),
            add_sources: self.forwards.values().flat_map(sources_of).collect(),
            add_open: self.forwards.values().filter_map(open_of).collect(),
            add_interfaces: self.config.wan_interfaces.iter().cloned().collect(),
            add_addresses: self.config.wan_addresses.iter().copied().collect(),
            ..Update::default()
        };
        cmds.extend(self.update_commands(&all));
        cmds
    }

    fn update_commands(&self, update: &Update) -> Vec<NfCmd<'_>> {
        let keys = |list: &[ForwardKey], family: Family| -> Vec<Expression<'_>> {
            list.iter()
                .filter(|k| k.family == family)
                .map(|k| elem(k, None))
                .collect()
        };
        let addrs = |list: &[IpAddr], family: Family| -> Vec<Expression<'_>> {
            list.iter()
                .filter(|a| Family::of(**a) == family)
                .map(|a| Expression::String(Cow::Owned(a.to_string())))
                .collect()
        };
        let sources = |list: &[Source], family: Family| -> Vec<Expression<'_>> {
            list.iter()
                .filter(|s| s.key.family == family)
                .map(source_elem)
                .collect()
        };
        let names = |list: &[String]| -> Vec<Expression<'_>> {
            list.iter()
                .map(|n| Expression::String(Cow::Owned(n.clone())))
                .collect()
        };
        // Deletions first: a changed forward is deleted and re-added under the same key.
        let mut deletes = vec![(WAN_IFACES, names(&update.delete_interfaces))];
        let mut adds = vec![(WAN_IFACES, names(&update.add_interfaces))];
        for family in FAMILIES {
            deletes.push((addr_map(family), keys(&update.delete_addrs, family)));
            deletes.push((port_map(family), keys(&update.delete_ports, family)));
            deletes.push((wan_set(family), addrs(&update.delete_addresses, family)));
            deletes.push((src_set(family), sources(&update.delete_sources, family)));
            deletes.push((open_set(family), keys(&update.delete_open, family)));
            adds.push((wan_set(family), addrs(&update.add_addresses, family)));
            adds.push((src_set(family), sources(&update.add_sources, family)));
            adds.push((open_set(family), keys(&update.add_open, family)));
            let [addr_elems, port_elems] = self.forward_elements(family, &update.add);
            adds.push((addr_map(family), addr_elems));
            adds.push((port_map(family), port_elems));
        }
        let deletes = deletes
            .into_iter()
            .filter(|(_, elems)| !elems.is_empty())
            .map(|(set, elems)| NfCmd::Delete(self.element(set, elems)));
        let adds = adds
            .into_iter()
            .filter(|(_, elems)| !elems.is_empty())
            .map(|(set, elems)| NfCmd::Add(self.element(set, elems)));
        deletes.chain(adds).collect()
    }
}

/// A source set element `net . proto . port`.
fn source_elem(source: &Source) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        Expression::Named(NamedExpression::Prefix(nftables::expr::Prefix {
            addr: Box::new(Expression::String(Cow::Owned(
                source.net.network().to_string(),
            ))),
            len: u32::from(source.net.prefix_len()),
        })),
        Expression::String(Cow::Borrowed(source.key.protocol.nft_name())),
        Expression::Number(u32::from(source.key.external_port)),
    ]))
}

/// A map key `proto . port`, with the owner comment when adding.
fn elem(key: &ForwardKey, comment: Option<String>) -> Expression<'static> {
    let concat = Expression::Named(NamedExpression::Concat(vec![
        Expression::String(Cow::Borrowed(key.protocol.nft_name())),
        Expression::Number(u32::from(key.external_port)),
    ]));
    match comment {
        None => concat,
        Some(comment) => Expression::Named(NamedExpression::Elem(Elem {
            val: Box::new(concat),
            timeout: None,
            expires: None,
            comment: Some(Cow::Owned(comment)),
            counter: None,
        })),
    }
}

fn matches<'a>(left: Expression<'a>, right: Expression<'a>) -> Statement<'a> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn ct_mark() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: Cow::Borrowed("mark"),
        family: None,
        dir: None,
    }))
}

fn set_ref(name: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(format!("@{name}")))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

/// `meta l4proto . th dport map @name`
fn map_lookup(name: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Map(Box::new(MapExpr {
        key: Expression::Named(NamedExpression::Concat(vec![
            Expression::Named(NamedExpression::Meta(Meta {
                key: MetaKey::L4proto,
            })),
            payload("th", "dport"),
        ])),
        data: set_ref(name),
    })))
}

/// Serializes commands for `nft -j -f -`, one command at a time so no JSON tree of the
/// whole batch is built. The `nftables` crate has no field for a map's statements, so the
/// per-element `counter` of the address maps is added to their declarations here.
fn to_json(commands: Vec<NfCmd<'_>>) -> String {
    let mut out = String::from("{\"nftables\":[");
    for (index, command) in commands.into_iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        let counted_map = match &command {
            NfCmd::Add(NfListObject::Map(map)) => FAMILIES.iter().any(|f| map.name == addr_map(*f)),
            _ => false,
        };
        let object = NfObject::CmdObject(command);
        let text = if counted_map {
            let mut value = serde_json::to_value(&object).expect("nft commands serialize");
            value["add"]["map"]["stmt"] = serde_json::json!([{ "counter": null }]);
            value.to_string()
        } else {
            serde_json::to_string(&object).expect("nft commands serialize")
        };
        out.push_str(&text);
    }
    out.push_str("]}");
    out
}

/// The keys deleted from the address maps, as `nft --echo` reports a transaction: the
/// kernel's own account of what it committed.
pub fn echoed_deletions(echo: &str) -> BTreeSet<ForwardKey> {
    let mut keys = BTreeSet::new();
    let Ok(value) = serde_json::from_str::<serde_json::Value>(echo) else {
        return keys;
    };
    for object in value["nftables"].as_array().into_iter().flatten() {
        let element = &object["delete"]["element"];
        let Some(family) = FAMILIES
            .into_iter()
            .find(|f| element["name"].as_str() == Some(addr_map(*f)))
        else {
            continue;
        };
        for item in element["elem"].as_array().into_iter().flatten() {
            let parts = &item["concat"];
            let protocol = parts[0].as_str().and_then(Protocol::from_nft_name);
            let port = parts[1].as_u64().and_then(|p| u16::try_from(p).ok());
            if let (Some(protocol), Some(external_port)) = (protocol, port) {
                keys.insert(ForwardKey {
                    family,
                    protocol,
                    external_port,
                });
            }
        }
    }
    keys
}

impl KernelTable {
    /// Reads the output of `nft -j list table inet NAME`, checking that the table has the
    /// shape this daemon creates and nothing else: the sets, maps, chain, and the rules of
    /// `config` (`None`: of any configuration).
    pub fn from_nftables(config: Option<&TableConfig>, listing: &Nftables) -> KernelTable {
        let mut table = KernelTable::default();
        let mut problems = Vec::new();
        let mut sets = BTreeSet::new();
        let mut rules = Vec::new();
        let mut chains = Vec::new();
        for object in listing.objects.iter() {
            let NfObject::ListObject(object) = object else {
                continue;
            };
            match object {
                NfListObject::Set(set) => {
                    sets.insert(set.name.to_string());
                    table.read_set(
                        &set.name,
                        set.elem.as_deref().unwrap_or_default(),
                        &mut problems,
                    );
                }
                NfListObject::Map(map) => {
                    sets.insert(map.name.to_string());
                    table.read_map(
                        &map.name,
                        map.elem.as_deref().unwrap_or_default(),
                        &mut problems,
                    );
                }
                NfListObject::Chain(chain) => {
                    chains.push(chain.name.to_string());
                    let expected = chain._type == Some(NfChainType::NAT)
                        && if chain.name == CHAIN {
                            chain.hook == Some(NfHook::Prerouting)
                                && chain.prio == Some(DSTNAT_PRIORITY)
                        } else {
                            chain.name == REFLECT_CHAIN
                                && chain.hook == Some(NfHook::Postrouting)
                                && chain.prio == Some(SRCNAT_PRIORITY)
                        };
                    if !expected {
                        problems.push(format!(
                            "chain {} is not one of the expected NAT chains",
                            chain.name
                        ));
                    }
                }
                NfListObject::Rule(rule) => {
                    rules.push(rule.comment.as_deref().unwrap_or_default().to_owned());
                }
                NfListObject::Table(_) | NfListObject::MetainfoObject(_) => {}
                _ => problems.push("the table holds objects this daemon does not create".into()),
            }
        }
        let mut expected_sets: BTreeSet<String> = BTreeSet::from([WAN_IFACES.to_owned()]);
        for family in FAMILIES {
            for name in [
                wan_set(family),
                open_set(family),
                src_set(family),
                addr_map(family),
                port_map(family),
            ] {
                expected_sets.insert(name.to_owned());
            }
        }
        if sets != expected_sets {
            problems.push(format!(
                "sets and maps are {sets:?}, expected {expected_sets:?}"
            ));
        }
        let (rules_ok, chains_ok) = match config {
            Some(config) => {
                let mut expected = vec![CHAIN.to_owned()];
                if config.reflects() {
                    expected.push(REFLECT_CHAIN.to_owned());
                }
                (rules == config.rule_comments(), chains == expected)
            }
            None => {
                let daemons = rules.iter().all(|r| r.starts_with("kube-port-forward "));
                (
                    daemons && !rules.is_empty(),
                    chains.first().map(String::as_str) == Some(CHAIN),
                )
            }
        };
        if !chains_ok || !rules_ok {
            let expected_rules = config.map(TableConfig::rule_comments);
            problems.push(format!("rules are {rules:?}, expected {expected_rules:?}"));
        }
        table.shape_problem = (!problems.is_empty()).then(|| problems.join("; "));
        table
    }

    fn read_set(&mut self, name: &str, elems: &[Expression<'_>], problems: &mut Vec<String>) {
        if let Some(family) = FAMILIES.into_iter().find(|f| name == open_set(*f)) {
            for item in elems {
                match key_item(family, item) {
                    Some(key) => {
                        self.open.insert(key);
                    }
                    None => {
                        problems.push(format!("set {name} holds an element of unexpected form"))
                    }
                }
            }
            return;
        }
        if let Some(family) = FAMILIES.into_iter().find(|f| name == src_set(*f)) {
            for item in elems {
                match source_item(family, item) {
                    Some(source) => {
                        self.sources.insert(source);
                    }
                    None => {
                        problems.push(format!("set {name} holds an element of unexpected form"))
                    }
                }
            }
            return;
        }
        for item in elems {
            let Some(text) = plain_string(item) else {
                problems.push(format!("set {name} holds an element of unexpected form"));
                continue;
            };
            if name == WAN_IFACES {
                self.wan_interfaces.insert(text.to_owned());
            } else {
                match text.parse::<IpAddr>() {
                    Ok(addr) => {
                        self.wan_addresses.insert(addr);
                    }
                    Err(_) => problems.push(format!("set {name} holds \"{text}\"")),
                }
            }
        }
    }

    fn read_map(&mut self, name: &str, elems: &[Expression<'_>], problems: &mut Vec<String>) {
        let Some((family, is_addr)) = FAMILIES.iter().find_map(|f| {
            if name == addr_map(*f) {
                Some((*f, true))
            } else if name == port_map(*f) {
                Some((*f, false))
            } else {
                None
            }
        }) else {
            return;
        };
        for item in elems {
            let Some((key, comment, counter, value)) = map_item(family, item) else {
                problems.push(format!("map {name} holds an element of unexpected form"));
                continue;
            };
            if is_addr {
                match value.as_str().and_then(|v| v.parse::<IpAddr>().ok()) {
                    Some(addr) if Family::of(addr) == family => {
                        self.addrs.insert(
                            key,
                            Element {
                                value: addr,
                                comment,
                            },
                        );
                        if let Some(counter) = counter {
                            self.counters.insert(key, counter);
                        }
                    }
                    _ => problems.push(format!("map {name} holds a value that is not an address")),
                }
            } else {
                match value.as_u64().and_then(|v| u16::try_from(v).ok()) {
                    Some(port) => {
                        self.ports.insert(
                            key,
                            Element {
                                value: port,
                                comment,
                            },
                        );
                    }
                    None => problems.push(format!("map {name} holds a value that is not a port")),
                }
            }
        }
    }
}

/// `["tcp", 80]` as `nft -j` lists an open set element or a map key.
fn key_item(family: Family, item: &Expression<'_>) -> Option<ForwardKey> {
    let Expression::Named(NamedExpression::Concat(parts)) = item else {
        return None;
    };
    let [Expression::String(protocol), Expression::Number(port)] = parts.as_slice() else {
        return None;
    };
    forward_key(family, protocol, *port)
}

/// A key from the protocol name and port number nft lists.
fn forward_key(family: Family, protocol: &str, port: u32) -> Option<ForwardKey> {
    Some(ForwardKey {
        family,
        protocol: Protocol::from_nft_name(protocol)?,
        external_port: u16::try_from(port).ok()?,
    })
}

/// `[prefix or address, "tcp", 80]` as `nft -j` lists a source set element (a /32 or /128
/// comes back as a plain address).
fn source_item(family: Family, item: &Expression<'_>) -> Option<Source> {
    let item = match item {
        Expression::Named(NamedExpression::Elem(elem)) => &*elem.val,
        other => other,
    };
    let Expression::Named(NamedExpression::Concat(parts)) = item else {
        return None;
    };
    let [addr, Expression::String(protocol), Expression::Number(port)] = parts.as_slice() else {
        return None;
    };
    let net: IpNet = match addr {
        Expression::String(text) => IpNet::from(text.parse::<IpAddr>().ok()?),
        Expression::Named(NamedExpression::Prefix(prefix)) => {
            let Expression::String(text) = &*prefix.addr else {
                return None;
            };
            IpNet::new(text.parse().ok()?, u8::try_from(prefix.len).ok()?).ok()?
        }
        _ => return None,
    };
    (Family::of(net.addr()) == family).then_some(())?;
    Some(Source {
        key: forward_key(family, protocol, *port)?,
        net,
    })
}

fn plain_string<'e>(item: &'e Expression<'_>) -> Option<&'e str> {
    match item {
        Expression::String(text) => Some(text),
        Expression::Named(NamedExpression::Elem(elem)) => plain_string(&elem.val),
        _ => None,
    }
}

/// A map element value as JSON, whatever form the crate parsed it into.
enum Value {
    Text(String),
    Number(u64),
}

impl Value {
    fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(text) => Some(text),
            Value::Number(_) => None,
        }
    }

    fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(n) => Some(*n),
            Value::Text(text) => text.parse().ok(),
        }
    }
}

type MapItem = (ForwardKey, Option<String>, Option<(u64, u64)>, Value);

/// `[{"elem": {"val": {"concat": ["tcp", 80]}, "comment": ..., "counter": ...}}, value]`
fn map_item(family: Family, item: &Expression<'_>) -> Option<MapItem> {
    let Expression::List(pair) = item else {
        return None;
    };
    let [key, value] = pair.as_slice() else {
        return None;
    };
    let (val, comment, counter) = match key {
        Expression::Named(NamedExpression::Elem(elem)) => {
            let counter = match &elem.counter {
                Some(Counter::Anonymous(Some(c))) => Some((
                    c.packets.unwrap_or_default() as u64,
                    c.bytes.unwrap_or_default() as u64,
                )),
                _ => None,
            };
            (
                &*elem.val,
                elem.comment.as_deref().map(str::to_owned),
                counter,
            )
        }
        other => (other, None, None),
    };
    let key = key_item(family, val)?;
    let value = match value {
        Expression::String(text) => Value::Text(text.to_string()),
        Expression::Number(n) => Value::Number(u64::from(*n)),
        _ => return None,
    };
    Some((key, comment, counter, value))
}

impl Ruleset {
    /// The table as an nft script (`nft -f`), for people and golden files. It loads into the
    /// same table that [`Ruleset::transaction`] builds; a kernel test holds the two together.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let t = &self.config.table;
        let _ = writeln!(out, "table inet {t} {{");
        let ifaces: Vec<String> = self
            .config
            .wan_interfaces
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect();
        render_set(&mut out, WAN_IFACES, "ifname", &[], &ifaces);
        for family in FAMILIES {
            let addrs: Vec<String> = self
                .config
                .wan_addresses
                .iter()
                .filter(|a| Family::of(**a) == family)
                .map(ToString::to_string)
                .collect();
            render_set(
                &mut out,
                wan_set(family),
                addr_type_name(family),
                &[],
                &addrs,
            );
        }
        for family in FAMILIES {
            let open: Vec<String> = self
                .forwards
                .values()
                .filter(|f| f.key.family == family)
                .filter_map(open_of)
                .map(|k| format!("{} . {}", k.protocol.nft_name(), k.external_port))
                .collect();
            render_set(
                &mut out,
                open_set(family),
                "inet_proto . inet_service",
                &[],
                &open,
            );
            let sources: Vec<String> = self
                .forwards
                .values()
                .filter(|f| f.key.family == family)
                .flat_map(sources_of)
                .map(|s| {
                    format!(
                        "{} . {} . {}",
                        s.net,
                        s.key.protocol.nft_name(),
                        s.key.external_port
                    )
                })
                .collect();
            let set_type = format!("{} . inet_proto . inet_service", addr_type_name(family));
            render_set(
                &mut out,
                src_set(family),
                &set_type,
                &["flags interval"],
                &sources,
            );
        }
        for family in FAMILIES {
            let forwards: Vec<&Forward> = self
                .forwards
                .values()
                .filter(|f| f.key.family == family)
                .collect();
            let key = |f: &Forward| {
                format!(
                    "{} . {} comment \"{}\"",
                    f.key.protocol.nft_name(),
                    f.key.external_port,
                    owner_comment(f)
                )
            };
            let addrs: Vec<String> = forwards
                .iter()
                .map(|f| format!("{} : {}", key(f), f.target.addr))
                .collect();
            let ports: Vec<String> = forwards
                .iter()
                .map(|f| format!("{} : {}", key(f), f.target.port))
                .collect();
            let map_type = |value: &str| format!("inet_proto . inet_service : {value}");
            render_set(
                &mut out,
                addr_map(family),
                &map_type(addr_type_name(family)),
                &["counter"],
                &addrs,
            );
            render_set(
                &mut out,
                port_map(family),
                &map_type("inet_service"),
                &[],
                &ports,
            );
        }
        let _ = writeln!(out, "\tchain {CHAIN} {{");
        let _ = writeln!(
            out,
            "\t\ttype nat hook prerouting priority dstnat; policy accept;"
        );
        for (family, who, side) in self.config.rules() {
            let mut rule = Vec::new();
            match side {
                Side::Wan => rule.push(format!("iifname @{WAN_IFACES}")),
                Side::Lan => rule.push(format!("iifname != @{WAN_IFACES}")),
                Side::Any => {}
            }
            if self.config.match_addresses() {
                let proto = if family == Family::Ipv4 { "ip" } else { "ip6" };
                rule.push(format!("{proto} daddr @{}", wan_set(family)));
            } else {
                rule.push(format!(
                    "meta nfproto {} fib daddr type local",
                    family_word(family)
                ));
            }
            let nat = if family == Family::Ipv4 { "ip" } else { "ip6" };
            rule.push(match who {
                Who::Open => format!("meta l4proto . th dport @{}", open_set(family)),
                Who::Ranges => {
                    format!("{nat} saddr . meta l4proto . th dport @{}", src_set(family))
                }
            });
            rule.push(format!(
                "ct mark set ct mark | 0x{:08x}",
                self.config.mark_of(side)
            ));
            rule.push(format!(
                "dnat {nat} to meta l4proto . th dport map @{} : meta l4proto . th dport map @{}",
                addr_map(family),
                port_map(family)
            ));
            rule.push(format!(
                "comment \"{}\"",
                self.config.rule_comment(family, who, side)
            ));
            let _ = writeln!(out, "\t\t{}", rule.join(" "));
        }
        let _ = writeln!(out, "\t}}");
        if self.config.reflects() {
            let bit = self.config.reflect_mark();
            let _ = writeln!(out, "\tchain {REFLECT_CHAIN} {{");
            let _ = writeln!(
                out,
                "\t\ttype nat hook postrouting priority srcnat; policy accept;"
            );
            let _ = writeln!(
                out,
                "\t\tct mark & 0x{bit:08x} == 0x{bit:08x} masquerade comment \"{}\"",
                self.config.reflect_comment()
            );
            let _ = writeln!(out, "\t}}");
        }
        let _ = writeln!(out, "}}");
        out
    }
}

fn addr_type_name(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ipv4_addr",
        Family::Ipv6 => "ipv6_addr",
    }
}

fn render_set(out: &mut String, name: &str, set_type: &str, extra: &[&str], elements: &[String]) {
    let kind = if set_type.contains(" : ") {
        "map"
    } else {
        "set"
    };
    let _ = writeln!(out, "\t{kind} {name} {{");
    let _ = writeln!(out, "\t\ttype {set_type}");
    for line in extra {
        let _ = writeln!(out, "\t\t{line}");
    }
    if !elements.is_empty() {
        let _ = writeln!(out, "\t\telements = {{");
        for (index, element) in elements.iter().enumerate() {
            let sep = if index + 1 < elements.len() { "," } else { "" };
            let _ = writeln!(out, "\t\t\t{element}{sep}");
        }
        let _ = writeln!(out, "\t\t}}");
    }
    let _ = writeln!(out, "\t}}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Owner, Target};

    fn forward(port: u16, addr: &str, name: &str) -> Forward {
        let addr: IpAddr = addr.parse().unwrap();
        Forward {
            key: ForwardKey {
                family: Family::of(addr),
                protocol: Protocol::Tcp,
                external_port: port,
            },
            target: Target { addr, port: 8080 },
            owner: Owner {
                namespace: "ns".into(),
                name: name.into(),
                uid: Some("0000-1111".into()),
                service_port: "http".into(),
            },
            sources: Vec::new(),
        }
    }

    fn ruleset(forwards: &[Forward]) -> Ruleset {
        let config = TableConfig::new(
            DEFAULT_TABLE,
            ["wan".to_owned()],
            ["203.0.113.1".parse().unwrap()],
        )
        .unwrap();
        Ruleset::new(
            config,
            forwards.iter().map(|f| (f.key, f.clone())).collect(),
        )
    }

    #[test]
    fn missing_table_and_shape_problems_rebuild() {
        let r = ruleset(&[forward(80, "10.0.0.1", "a")]);
        assert!(matches!(r.diff(None), Change::Rebuild(_)));
        let broken = KernelTable {
            shape_problem: Some("chain flushed".into()),
            ..r.as_kernel()
        };
        assert_eq!(
            r.diff(Some(&broken)),
            Change::Rebuild("chain flushed".into())
        );
    }

    #[test]
    fn same_table_is_nothing() {
        let r = ruleset(&[forward(80, "10.0.0.1", "a"), forward(81, "fd00::1", "b")]);
        assert_eq!(r.diff(Some(&r.as_kernel())), Change::Nothing);
        assert_eq!(r.diff_applied(&r), Change::Nothing);
        assert_eq!(r.transaction(&Change::Nothing), None);
    }

    #[test]
    fn one_change_touches_one_key() {
        let many: Vec<Forward> = (1000..1100).map(|p| forward(p, "10.0.0.1", "a")).collect();
        let before = ruleset(&many);
        let mut changed = many.clone();
        changed[50].target.addr = "10.0.0.2".parse().unwrap();
        changed.remove(10);
        changed.push(forward(2000, "10.0.0.3", "c"));
        let after = ruleset(&changed);
        let expected = Update {
            delete_addrs: vec![many[10].key, many[50].key],
            delete_ports: vec![many[10].key, many[50].key],
            add: vec![many[50].key, changed.last().unwrap().key],
            add_open: vec![changed.last().unwrap().key],
            delete_open: vec![many[10].key],
            ..Update::default()
        };
        assert_eq!(
            after.diff(Some(&before.as_kernel())),
            Change::Update(Box::new(expected.clone()))
        );
        assert_eq!(
            after.diff_applied(&before),
            Change::Update(Box::new(expected))
        );
    }

    #[test]
    fn owner_change_with_same_target_is_a_change() {
        let before = ruleset(&[forward(80, "10.0.0.1", "a")]);
        let after = ruleset(&[forward(80, "10.0.0.1", "b")]);
        assert!(matches!(
            after.diff(Some(&before.as_kernel())),
            Change::Update(_)
        ));
        assert!(matches!(after.diff_applied(&before), Change::Update(_)));
    }

    #[test]
    fn half_present_elements_are_replaced() {
        let r = ruleset(&[forward(80, "10.0.0.1", "a")]);
        let mut kernel = r.as_kernel();
        let key = *kernel.ports.keys().next().unwrap();
        kernel.ports.clear();
        let Change::Update(update) = r.diff(Some(&kernel)) else {
            panic!("expected an update")
        };
        assert_eq!(update.delete_addrs, vec![key]);
        assert!(update.delete_ports.is_empty());
        assert_eq!(update.add, vec![key]);
    }

    #[test]
    fn wan_set_changes_are_elements_not_rebuilds() {
        let before = ruleset(&[]);
        let mut after = before.clone();
        after
            .config
            .wan_addresses
            .insert("203.0.113.9".parse().unwrap());
        let Change::Update(update) = after.diff_applied(&before) else {
            panic!("expected an update")
        };
        assert_eq!(
            update.add_addresses,
            vec!["203.0.113.9".parse::<IpAddr>().unwrap()]
        );
        let mut other_shape = before.clone();
        other_shape.config.wan_interfaces.clear();
        assert!(matches!(
            other_shape.diff_applied(&before),
            Change::Rebuild(_)
        ));
    }

    #[test]
    fn owner_comment_keeps_uid_within_nft_limit() {
        let mut f = forward(80, "10.0.0.1", &"n".repeat(63));
        f.owner.namespace = "s".repeat(63);
        f.owner.uid = Some("6f1c2a8e-1d7b-4c33-9a52-0d3f8c1e2b47".into());
        let comment = owner_comment(&f);
        assert_eq!(comment.len(), COMMENT_MAX);
        assert!(comment.ends_with("~ uid=6f1c2a8e-1d7b-4c33-9a52-0d3f8c1e2b47"));
        let short = forward(80, "10.0.0.1", "web");
        assert_eq!(owner_comment(&short), "ns/web:http uid=0000-1111");
    }

    #[test]
    fn transactions_are_one_batch_with_counters_on_address_maps() {
        let r = ruleset(&[forward(80, "10.0.0.1", "a")]);
        let json: serde_json::Value =
            serde_json::from_str(&r.transaction(&Change::Rebuild(String::new())).unwrap()).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        assert_eq!(cmds[0]["add"]["table"]["name"], DEFAULT_TABLE);
        assert_eq!(cmds[1]["delete"]["table"]["name"], DEFAULT_TABLE);
        let maps: Vec<&serde_json::Value> =
            cmds.iter().filter_map(|c| c["add"].get("map")).collect();
        assert_eq!(maps.len(), 4);
        for map in maps {
            let counted = map.get("stmt").is_some();
            assert_eq!(
                counted,
                map["name"].as_str().unwrap().ends_with("_addr"),
                "{map}"
            );
        }
        assert!(
            cmds.iter()
                .all(|c| c.get("add").is_none_or(|a| !a.is_null()))
        );
    }

    #[test]
    fn kernel_listing_round_trips() {
        let r = ruleset(&[forward(80, "10.0.0.1", "a"), forward(443, "fd00::5", "b")]);
        // What `nft -j list table` prints for that table, trimmed to what is read.
        let listing = serde_json::json!({"nftables": [
            {"metainfo": {"version": "1.0.6", "release_name": "x", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": DEFAULT_TABLE, "handle": 1}},
            {"set": {"family": "inet", "name": "wan_ifaces", "table": DEFAULT_TABLE, "type": "ifname", "handle": 2, "elem": ["wan"]}},
            {"set": {"family": "inet", "name": "wan_ipv4", "table": DEFAULT_TABLE, "type": "ipv4_addr", "handle": 3, "elem": ["203.0.113.1"]}},
            {"set": {"family": "inet", "name": "wan_ipv6", "table": DEFAULT_TABLE, "type": "ipv6_addr", "handle": 4}},
            {"set": {"family": "inet", "name": "open_ipv4", "table": DEFAULT_TABLE, "type": ["inet_proto", "inet_service"], "handle": 12,
                "elem": [{"concat": ["tcp", 80]}]}},
            {"set": {"family": "inet", "name": "src_ipv4", "table": DEFAULT_TABLE, "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 13, "flags": ["interval"]}},
            {"set": {"family": "inet", "name": "open_ipv6", "table": DEFAULT_TABLE, "type": ["inet_proto", "inet_service"], "handle": 14,
                "elem": [{"concat": ["tcp", 443]}]}},
            {"set": {"family": "inet", "name": "src_ipv6", "table": DEFAULT_TABLE, "type": ["ipv6_addr", "inet_proto", "inet_service"], "handle": 15, "flags": ["interval"]}},
            {"map": {"family": "inet", "name": "fwd_ipv4_addr", "table": DEFAULT_TABLE, "type": ["inet_proto", "inet_service"], "handle": 5, "map": "ipv4_addr",
                "elem": [[{"elem": {"val": {"concat": ["tcp", 80]}, "comment": "ns/a:http uid=0000-1111", "counter": {"packets": 3, "bytes": 180}}}, "10.0.0.1"]],
                "stmt": [{"counter": null}]}},
            {"map": {"family": "inet", "name": "fwd_ipv4_port", "table": DEFAULT_TABLE, "type": ["inet_proto", "inet_service"], "handle": 6, "map": "inet_service",
                "elem": [[{"elem": {"val": {"concat": ["tcp", 80]}, "comment": "ns/a:http uid=0000-1111"}}, 8080]]}},
            {"map": {"family": "inet", "name": "fwd_ipv6_addr", "table": DEFAULT_TABLE, "type": ["inet_proto", "inet_service"], "handle": 7, "map": "ipv6_addr",
                "elem": [[{"elem": {"val": {"concat": ["tcp", 443]}, "comment": "ns/b:http uid=0000-1111"}}, "fd00::5"]]}},
            {"map": {"family": "inet", "name": "fwd_ipv6_port", "table": DEFAULT_TABLE, "type": ["inet_proto", "inet_service"], "handle": 8, "map": "inet_service",
                "elem": [[{"elem": {"val": {"concat": ["tcp", 443]}, "comment": "ns/b:http uid=0000-1111"}}, 8080]]}},
            {"chain": {"family": "inet", "table": DEFAULT_TABLE, "name": "prerouting", "handle": 9, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
            {"rule": {"family": "inet", "table": DEFAULT_TABLE, "chain": "prerouting", "handle": 10, "comment": "kube-port-forward ipv4 open iif=wan daddr=set mark=0x00200000", "expr": []}},
            {"rule": {"family": "inet", "table": DEFAULT_TABLE, "chain": "prerouting", "handle": 16, "comment": "kube-port-forward ipv4 ranges iif=wan daddr=set mark=0x00200000", "expr": []}},
            {"rule": {"family": "inet", "table": DEFAULT_TABLE, "chain": "prerouting", "handle": 11, "comment": "kube-port-forward ipv6 open iif=wan daddr=set mark=0x00200000", "expr": []}},
            {"rule": {"family": "inet", "table": DEFAULT_TABLE, "chain": "prerouting", "handle": 17, "comment": "kube-port-forward ipv6 ranges iif=wan daddr=set mark=0x00200000", "expr": []}}
        ]});
        let listing: Nftables = serde_json::from_value(listing).unwrap();
        let kernel = KernelTable::from_nftables(Some(&r.config), &listing);
        assert_eq!(kernel.shape_problem, None);
        assert_eq!(kernel.counters.values().next(), Some(&(3, 180)));
        assert_eq!(r.diff(Some(&kernel)), Change::Nothing);

        let other = TableConfig::new(DEFAULT_TABLE, [], []).unwrap();
        let kernel = KernelTable::from_nftables(Some(&other), &listing);
        assert!(kernel.shape_problem.unwrap().contains("rules are"));
        assert_eq!(
            KernelTable::from_nftables(None, &listing).shape_problem,
            None
        );
    }

    #[test]
    fn echoed_deletions_are_read_from_address_maps_only() {
        let echo = r#"{"nftables": [
            {"delete": {"element": {"family": "inet", "table": "t", "name": "fwd_ipv4_addr",
                "elem": [{"concat": ["tcp", 80]}, {"concat": ["udp", 53]}]}}},
            {"delete": {"element": {"family": "inet", "table": "t", "name": "fwd_ipv4_port",
                "elem": [{"concat": ["tcp", 81]}]}}},
            {"delete": {"element": {"family": "inet", "table": "t", "name": "fwd_ipv6_addr",
                "elem": [{"concat": ["tcp", 443]}]}}},
            {"add": {"element": {"family": "inet", "table": "t", "name": "fwd_ipv4_addr",
                "elem": [[{"concat": ["tcp", 8080]}, "10.0.0.1"]]}}}
        ]}"#;
        let keys = echoed_deletions(echo);
        let key = |family, protocol, external_port| ForwardKey {
            family,
            protocol,
            external_port,
        };
        assert_eq!(
            keys,
            BTreeSet::from([
                key(Family::Ipv4, Protocol::Tcp, 80),
                key(Family::Ipv4, Protocol::Udp, 53),
                key(Family::Ipv6, Protocol::Tcp, 443),
            ])
        );
        assert!(echoed_deletions("").is_empty());
    }

    #[test]
    fn config_refuses_bad_names() {
        assert!(TableConfig::new("1table", [], []).is_err());
        assert!(TableConfig::new("t; flush ruleset", [], []).is_err());
        assert!(TableConfig::new("t", ["eth0\"".to_owned()], []).is_err());
        assert!(TableConfig::new("t", ["a-very-long-ifname".to_owned()], []).is_err());
        assert!(TableConfig::new("t", ["pppoe-wan".to_owned()], []).is_ok());
    }
}
