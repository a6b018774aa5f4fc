//! The transactions that bring the kernel's table to a [`Ruleset`]: a rebuild of the whole
//! table as one `nft -j -f -` transaction, and an update of its elements as the set changes
//! of one netlink batch ([`super::wire`]). Both are one kernel transaction.

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::IpAddr;

use nftables::expr::{BinaryOperation, CT, Map as MapExpr, Payload, PayloadField};
use nftables::expr::{Elem, Expression, Fib, FibFlag, FibResult, JHash, Meta, MetaKey};
use nftables::expr::{NamedExpression, SetItem, Verdict};
use nftables::schema::{self, NfCmd, NfListObject, NfObject, SetType, SetTypeValue};
use nftables::stmt::{JumpTarget, Mangle, Match, NAT, NATFamily, Operator, Statement, VerdictMap};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::diff::{Change, Update};
use super::layout::*;
use super::read::KernelTable;
use super::wire::{self, Op, SetChange};
use crate::core::model::{BUCKETS, Family, ForwardKey};

impl Ruleset {
    /// The nft JSON transaction for a change. `None` for [`Change::Nothing`].
    pub fn transaction(&self, change: &Change) -> Option<String> {
        let commands = match change {
            Change::Nothing => return None,
            Change::Rebuild(_) => self.rebuild_commands(),
            Change::Update(update) => self.update_commands(update),
        };
        Some(to_json(commands))
    }

    pub(super) fn table(&self) -> schema::Table<'_> {
        schema::Table {
            family: NfFamily::INet,
            name: Cow::Borrowed(&self.config.table),
            handle: None,
        }
    }

    pub(super) fn element<'a>(
        &'a self,
        set: &'static str,
        elem: Vec<Expression<'a>>,
    ) -> NfListObject<'a> {
        NfListObject::Element(schema::Element {
            family: NfFamily::INet,
            table: Cow::Borrowed(&self.config.table),
            name: Cow::Borrowed(set),
            elem: Cow::Owned(elem),
        })
    }

    pub(super) fn set_decl(&self, name: &'static str, set_type: SetType) -> NfListObject<'_> {
        self.set_of(name, SetTypeValue::Single(set_type), None)
    }

    /// `src_ipv4 { type ipv4_addr . inet_proto . inet_service; flags interval; }`
    pub(super) fn source_set_decl(&self, family: Family) -> NfListObject<'_> {
        let types = vec![addr_type(family), SetType::InetProto, SetType::InetService];
        let flags = HashSet::from([nftables::schema::SetFlag::Interval]);
        self.set_of(
            src_set(family),
            SetTypeValue::Concatenated(Cow::Owned(types)),
            Some(flags),
        )
    }

    pub(super) fn set_of(
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

    pub(super) fn map_decl(&self, name: &'static str, value: SetType) -> NfListObject<'_> {
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

    pub(super) fn rule(
        &self,
        family: Family,
        who: Who,
        side: Side,
        pick: Pick,
    ) -> NfListObject<'_> {
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
        expr.push(match pick {
            Pick::Single => dnat(family, addr_map(family)),
            // `jhash ip saddr mod 12 vmap { 0 : goto bucket_ipv4_0, ... }`
            Pick::Hash => Statement::VerdictMap(VerdictMap {
                key: Expression::Named(NamedExpression::JHash(JHash {
                    hash_mod: BUCKETS as u32,
                    offset: None,
                    expr: Box::new(payload(nat_proto(family), "saddr")),
                    seed: None,
                })),
                data: Expression::Named(NamedExpression::Set(
                    (0..BUCKETS)
                        .map(|bucket| {
                            SetItem::Mapping(
                                Expression::Number(bucket as u32),
                                Expression::Verdict(Verdict::Goto(JumpTarget {
                                    target: Cow::Borrowed(bucket_chain(family, bucket)),
                                })),
                            )
                        })
                        .collect(),
                )),
            }),
        });
        self.rule_in(
            CHAIN,
            expr,
            self.config.rule_comment(family, who, side, pick),
        )
    }

    /// The rule of a bucket chain: DNAT by the bucket's map.
    pub(super) fn bucket_rule(&self, family: Family, bucket: usize) -> NfListObject<'_> {
        self.rule_in(
            bucket_chain(family, bucket),
            vec![dnat(family, pick_map(family, bucket))],
            bucket_comment(family, bucket),
        )
    }

    /// A rule of this table's chain `chain`, recognised by its comment.
    fn rule_in(
        &self,
        chain: &'static str,
        expr: Vec<Statement<'static>>,
        comment: String,
    ) -> NfListObject<'_> {
        NfListObject::Rule(schema::Rule {
            family: NfFamily::INet,
            table: Cow::Borrowed(&self.config.table),
            chain: Cow::Borrowed(chain),
            expr: Cow::Owned(expr),
            handle: None,
            index: None,
            comment: Some(Cow::Owned(comment)),
        })
    }

    /// A regular chain, the target of a `goto`.
    pub(super) fn plain_chain(&self, name: &'static str) -> NfListObject<'_> {
        NfListObject::Chain(self.chain_named(name))
    }

    fn chain_named(&self, name: &'static str) -> schema::Chain<'_> {
        schema::Chain {
            family: NfFamily::INet,
            table: Cow::Borrowed(&self.config.table),
            name: Cow::Borrowed(name),
            ..schema::Chain::default()
        }
    }

    /// The reflection rule: flows DNATed for LAN clients leave masqueraded, so the server
    /// answers the router, which un-NATs both ways.
    pub(super) fn reflect_rule(&self) -> NfListObject<'_> {
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
        self.rule_in(REFLECT_CHAIN, expr, self.config.reflect_comment())
    }

    pub(super) fn chain(&self) -> NfListObject<'_> {
        self.nat_chain(CHAIN, NfHook::Prerouting, DSTNAT_PRIORITY)
    }

    pub(super) fn reflect_chain(&self) -> NfListObject<'_> {
        self.nat_chain(REFLECT_CHAIN, NfHook::Postrouting, SRCNAT_PRIORITY)
    }

    pub(super) fn nat_chain(
        &self,
        name: &'static str,
        hook: NfHook,
        prio: i32,
    ) -> NfListObject<'_> {
        NfListObject::Chain(schema::Chain {
            _type: Some(NfChainType::NAT),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(NfChainPolicy::Accept),
            ..self.chain_named(name)
        })
    }

    pub(super) fn rebuild_commands(&self) -> Vec<NfCmd<'_>> {
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
            for bucket in 0..BUCKETS {
                cmds.push(NfCmd::Add(
                    self.map_decl(pick_map(family, bucket), addr_type(family)),
                ));
            }
            let down = vec![SetType::InetProto, SetType::InetService, addr_type(family)];
            let down = SetTypeValue::Concatenated(Cow::Owned(down));
            cmds.push(NfCmd::Add(self.set_of(down_set(family), down, None)));
        }
        cmds.push(NfCmd::Add(self.chain()));
        if self.config.reflects() {
            cmds.push(NfCmd::Add(self.reflect_chain()));
        }
        for family in FAMILIES {
            for bucket in 0..BUCKETS {
                cmds.push(NfCmd::Add(self.plain_chain(bucket_chain(family, bucket))));
            }
        }
        for (family, who, side, pick) in self.config.rules() {
            cmds.push(NfCmd::Add(self.rule(family, who, side, pick)));
        }
        if self.config.reflects() {
            cmds.push(NfCmd::Add(self.reflect_rule()));
        }
        for family in FAMILIES {
            for bucket in 0..BUCKETS {
                cmds.push(NfCmd::Add(self.bucket_rule(family, bucket)));
            }
        }
        let all = self.delta(&KernelTable::default());
        cmds.extend(self.update_commands(&all));
        cmds
    }

    pub(super) fn update_commands(&self, update: &Update) -> Vec<NfCmd<'_>> {
        update
            .by_set()
            .into_iter()
            .filter_map(|(set, op, items)| {
                let elems = self.expressions(&items);
                if elems.is_empty() {
                    return None;
                }
                let object = self.element(set, elems);
                Some(match op {
                    Op::Delete => NfCmd::Delete(object),
                    Op::Add => NfCmd::Add(object),
                })
            })
            .collect()
    }

    /// The items of one set as nft JSON elements.
    fn expressions(&self, items: &Items<'_>) -> Vec<Expression<'_>> {
        match *items {
            Items::Interfaces(names) => names
                .iter()
                .map(|n| Expression::String(Cow::Owned(n.clone())))
                .collect(),
            Items::Addresses(family, addrs) => of_family(addrs, family, |a| Family::of(*a))
                .map(|a| Expression::String(Cow::Owned(a.to_string())))
                .collect(),
            Items::Sources(family, sources) => of_family(sources, family, |s| s.key.family)
                .map(source_elem)
                .collect(),
            Items::Keys(family, keys) => of_family(keys, family, |k| k.family)
                .map(|k| elem(k, None))
                .collect(),
            Items::Targets(family, keys, value) => of_family(keys, family, |k| k.family)
                .map(|key| {
                    let forward = &self.forwards[key];
                    let target = match value {
                        Value::Addr => {
                            Expression::String(Cow::Owned(forward.backends[0].to_string()))
                        }
                        Value::Port => Expression::Number(u32::from(forward.port)),
                    };
                    Expression::List(vec![elem(key, Some(owner_comment(forward))), target])
                })
                .collect(),
            Items::Picks(family, bucket, picks, with_value) => of_pick(picks, family, bucket)
                .map(|key| match with_value {
                    false => elem(key, None),
                    true => Expression::List(vec![
                        elem(key, None),
                        Expression::String(Cow::Owned(self.pick(key, bucket).to_string())),
                    ]),
                })
                .collect(),
            Items::Down(family, down) => of_family(down, family, |d| d.0.family)
                .map(|(key, addr)| {
                    Expression::Named(NamedExpression::Concat(vec![
                        Expression::String(Cow::Borrowed(key.protocol.nft_name())),
                        Expression::Number(u32::from(key.external_port)),
                        Expression::String(Cow::Owned(addr.to_string())),
                    ]))
                })
                .collect(),
        }
    }

    /// The backend of bucket `bucket` of the desired forward `key`.
    fn pick(&self, key: &ForwardKey, bucket: usize) -> IpAddr {
        let forward = &self.forwards[key];
        forward.buckets().map_or(forward.backends[0], |b| b[bucket])
    }

    /// The element changes of an update, for the netlink batch: the same sets in the same
    /// order as [`Ruleset::transaction`]'s.
    pub fn element_changes(&self, update: &Update) -> Vec<SetChange> {
        update
            .by_set()
            .into_iter()
            .map(|(set, op, items)| SetChange {
                set,
                op,
                elems: self.wire_elements(&items),
            })
            .filter(|change| !change.elems.is_empty())
            .collect()
    }

    /// The items of one set as netlink elements.
    fn wire_elements(&self, items: &Items<'_>) -> Vec<wire::Elem> {
        let key = |k: &ForwardKey| wire::proto_port(k.protocol, k.external_port);
        match *items {
            Items::Interfaces(names) => names
                .iter()
                .map(|n| wire::Elem::key(wire::ifname(n)))
                .collect(),
            Items::Addresses(family, addrs) => of_family(addrs, family, |a| Family::of(*a))
                .map(|a| wire::Elem::key(wire::addr(*a)))
                .collect(),
            Items::Sources(family, sources) => of_family(sources, family, |s| s.key.family)
                .map(source_range)
                .collect(),
            Items::Keys(family, keys) => of_family(keys, family, |k| k.family)
                .map(|k| wire::Elem::key(key(k)))
                .collect(),
            Items::Picks(family, bucket, picks, with_value) => of_pick(picks, family, bucket)
                .map(|k| wire::Elem {
                    data: with_value.then(|| wire::addr(self.pick(k, bucket))),
                    ..wire::Elem::key(key(k))
                })
                .collect(),
            Items::Down(family, down) => of_family(down, family, |d| d.0.family)
                .map(|(k, addr)| wire::Elem::key([key(k).to_vec(), wire::addr(*addr)].concat()))
                .collect(),
            Items::Targets(family, keys, value) => of_family(keys, family, |k| k.family)
                .map(|k| {
                    let forward = &self.forwards[k];
                    let data = match value {
                        Value::Addr => wire::addr(forward.backends[0]),
                        Value::Port => forward.port.to_be_bytes().to_vec(),
                    };
                    wire::Elem {
                        data: Some(data),
                        comment: Some(owner_comment(forward)),
                        ..wire::Elem::key(key(k))
                    }
                })
                .collect(),
        }
    }
}

/// What an update changes in one set.
enum Items<'u> {
    Interfaces(&'u [String]),
    Addresses(Family, &'u [IpAddr]),
    Sources(Family, &'u [Source]),
    Keys(Family, &'u [ForwardKey]),
    /// The desired forwards of these keys, as address or port map elements.
    Targets(Family, &'u [ForwardKey], Value),
    /// The elements of one bucket's map among these, with their backend when adding.
    Picks(Family, usize, &'u [PickElem], bool),
    Down(Family, &'u [Down]),
}

fn of_pick(
    picks: &[PickElem],
    family: Family,
    bucket: usize,
) -> impl Iterator<Item = &ForwardKey> + '_ {
    picks
        .iter()
        .filter(move |(key, b)| key.family == family && *b == bucket)
        .map(|(key, _)| key)
}

#[derive(Clone, Copy)]
enum Value {
    Addr,
    Port,
}

fn of_family<'a, T>(
    items: &'a [T],
    family: Family,
    of: impl Fn(&T) -> Family + 'a,
) -> impl Iterator<Item = &'a T> + 'a {
    items.iter().filter(move |item| of(item) == family)
}

impl Update {
    /// Set by set, in the order a transaction sends them: deletions first, so a changed
    /// forward is deleted and re-added under the same key in the same transaction.
    fn by_set(&self) -> Vec<(&'static str, Op, Items<'_>)> {
        let mut deletes = vec![(WAN_IFACES, Items::Interfaces(&self.delete_interfaces))];
        let mut adds = vec![(WAN_IFACES, Items::Interfaces(&self.add_interfaces))];
        for family in FAMILIES {
            deletes.push((addr_map(family), Items::Keys(family, &self.delete_addrs)));
            deletes.push((port_map(family), Items::Keys(family, &self.delete_ports)));
            deletes.push((
                wan_set(family),
                Items::Addresses(family, &self.delete_addresses),
            ));
            deletes.push((
                src_set(family),
                Items::Sources(family, &self.delete_sources),
            ));
            deletes.push((open_set(family), Items::Keys(family, &self.delete_open)));
            deletes.push((down_set(family), Items::Down(family, &self.delete_down)));
            for bucket in 0..BUCKETS {
                deletes.push((
                    pick_map(family, bucket),
                    Items::Picks(family, bucket, &self.delete_picks, false),
                ));
                adds.push((
                    pick_map(family, bucket),
                    Items::Picks(family, bucket, &self.add_picks, true),
                ));
            }
            adds.push((down_set(family), Items::Down(family, &self.add_down)));
            adds.push((
                wan_set(family),
                Items::Addresses(family, &self.add_addresses),
            ));
            adds.push((src_set(family), Items::Sources(family, &self.add_sources)));
            adds.push((open_set(family), Items::Keys(family, &self.add_open)));
            adds.push((
                addr_map(family),
                Items::Targets(family, &self.add_addrs, Value::Addr),
            ));
            adds.push((
                port_map(family),
                Items::Targets(family, &self.add_ports, Value::Port),
            ));
        }
        let deletes = deletes
            .into_iter()
            .map(|(set, items)| (set, Op::Delete, items));
        let adds = adds.into_iter().map(|(set, items)| (set, Op::Add, items));
        deletes.chain(adds).collect()
    }
}

/// A source set element as a range of concatenations: from `network . proto . port` to
/// `broadcast . proto . port`, as nft sends a prefix in an interval set.
pub(super) fn source_range(source: &Source) -> wire::Elem {
    let tail = wire::proto_port(source.key.protocol, source.key.external_port);
    wire::Elem {
        key_end: Some([wire::addr(source.net.broadcast()), tail.to_vec()].concat()),
        ..wire::Elem::key([wire::addr(source.net.network()), tail.to_vec()].concat())
    }
}

/// A source set element `net . proto . port`.
pub(super) fn source_elem(source: &Source) -> Expression<'static> {
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

/// `dnat ip to meta l4proto . th dport map @addresses : meta l4proto . th dport map @ports`
fn dnat(family: Family, addresses: &'static str) -> Statement<'static> {
    Statement::DNAT(Some(NAT {
        addr: Some(map_lookup(addresses)),
        family: Some(match family {
            Family::Ipv4 => NATFamily::IP,
            Family::Ipv6 => NATFamily::IP6,
        }),
        port: Some(map_lookup(port_map(family))),
        flags: None,
    }))
}

fn nat_proto(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ip",
        Family::Ipv6 => "ip6",
    }
}

/// A map key `proto . port`, with the owner comment when adding.
pub(super) fn elem(key: &ForwardKey, comment: Option<String>) -> Expression<'static> {
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

pub(super) fn matches<'a>(left: Expression<'a>, right: Expression<'a>) -> Statement<'a> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

pub(super) fn ct_mark() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: Cow::Borrowed("mark"),
        family: None,
        dir: None,
    }))
}

pub(super) fn set_ref(name: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(format!("@{name}")))
}

pub(super) fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

/// `meta l4proto . th dport map @name`
pub(super) fn map_lookup(name: &'static str) -> Expression<'static> {
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
pub(super) fn to_json(commands: Vec<NfCmd<'_>>) -> String {
    let mut out = String::from("{\"nftables\":[");
    for (index, command) in commands.into_iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        let counted_map = match &command {
            NfCmd::Add(NfListObject::Map(map)) => FAMILIES.iter().any(|f| {
                map.name == addr_map(*f)
                    || (0..BUCKETS).any(|bucket| map.name == pick_map(*f, bucket))
            }),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::fixtures::{forward, ruleset};

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
        assert_eq!(maps.len(), 4 + 2 * BUCKETS);
        for map in maps {
            let counted = map.get("stmt").is_some();
            let name = map["name"].as_str().unwrap();
            assert_eq!(
                counted,
                name.ends_with("_addr") || name.starts_with("pick_"),
                "{map}"
            );
        }
        assert!(
            cmds.iter()
                .all(|c| c.get("add").is_none_or(|a| !a.is_null()))
        );
    }
}
