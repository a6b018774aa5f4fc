//! The table as an nft script, for people (`plan`) and golden files.

use std::fmt::Write as _;

use super::layout::*;
use std::net::IpAddr;

use crate::core::model::{BUCKETS, Family, Forward};

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
                .filter(|f| f.buckets().is_none())
                .map(|f| format!("{} : {}", key(f), f.backends[0]))
                .collect();
            let ports: Vec<String> = forwards
                .iter()
                .map(|f| format!("{} : {}", key(f), f.port))
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
            let buckets: Vec<(&Forward, [IpAddr; BUCKETS])> = forwards
                .iter()
                .filter_map(|f| Some((*f, f.buckets()?)))
                .collect();
            for bucket in 0..BUCKETS {
                let picks: Vec<String> = buckets
                    .iter()
                    .map(|(f, b)| {
                        format!(
                            "{} . {} : {}",
                            f.key.protocol.nft_name(),
                            f.key.external_port,
                            b[bucket]
                        )
                    })
                    .collect();
                render_set(
                    &mut out,
                    pick_map(family, bucket),
                    &map_type(addr_type_name(family)),
                    &["counter"],
                    &picks,
                );
            }
            let down: Vec<String> = forwards
                .iter()
                .flat_map(|f| {
                    f.down.iter().map(|addr| {
                        format!(
                            "{} . {} . {addr}",
                            f.key.protocol.nft_name(),
                            f.key.external_port
                        )
                    })
                })
                .collect();
            let down_type = format!("inet_proto . inet_service . {}", addr_type_name(family));
            render_set(&mut out, down_set(family), &down_type, &[], &down);
        }
        let _ = writeln!(out, "\tchain {CHAIN} {{");
        let _ = writeln!(
            out,
            "\t\ttype nat hook prerouting priority dstnat; policy accept;"
        );
        for (family, who, side, pick) in self.config.rules() {
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
            rule.push(match pick {
                Pick::Single => dnat(family, addr_map(family)),
                Pick::Hash => {
                    let gotos: Vec<String> = (0..BUCKETS)
                        .map(|b| format!("{b} : goto {}", bucket_chain(family, b)))
                        .collect();
                    format!(
                        "jhash {nat} saddr mod {BUCKETS} vmap {{ {} }}",
                        gotos.join(", ")
                    )
                }
            });
            rule.push(format!(
                "comment \"{}\"",
                self.config.rule_comment(family, who, side, pick)
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
        for family in FAMILIES {
            for bucket in 0..BUCKETS {
                let _ = writeln!(out, "\tchain {} {{", bucket_chain(family, bucket));
                let _ = writeln!(
                    out,
                    "\t\t{} comment \"{}\"",
                    dnat(family, pick_map(family, bucket)),
                    bucket_comment(family, bucket)
                );
                let _ = writeln!(out, "\t}}");
            }
        }
        let _ = writeln!(out, "}}");
        out
    }
}

/// `dnat ip to meta l4proto . th dport map @addresses : meta l4proto . th dport map @ports`
fn dnat(family: Family, addresses: &str) -> String {
    let nat = if family == Family::Ipv4 { "ip" } else { "ip6" };
    format!(
        "dnat {nat} to meta l4proto . th dport map @{addresses} : meta l4proto . th dport map @{}",
        port_map(family)
    )
}

pub(super) fn addr_type_name(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ipv4_addr",
        Family::Ipv6 => "ipv6_addr",
    }
}

pub(super) fn render_set(
    out: &mut String,
    name: &str,
    set_type: &str,
    extra: &[&str],
    elements: &[String],
) {
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
