//! The daemon's side of what lies beyond the router's WAN: the IGD's mappings (the upstream
//! lane does the talking; here, what Services and users are told of them, and the cleanup
//! they hold up) and the external-dns targets written on the Services forwarded.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use kube::runtime::events::EventType;
use serde_json::json;

use super::Daemon;
use crate::cluster::Key;
use crate::cluster::lane::{Round, Work};
use crate::core::dns;
use crate::core::model::Family;
use crate::core::tracked::Tracked;
use crate::core::upstream::{self, Mapping, MappingState, View, Wanted};

/// What a round found of DNS targets and upstream mappings, per Service.
#[derive(Default)]
pub(super) struct Beyond {
    /// Notes for the Services' conditions.
    pub notes: HashMap<Key, Vec<String>>,
    /// Services whose DNS target must be removed before their finalizer is released.
    pub dns_pending: BTreeSet<Key>,
    /// The DNS target written on each Service that has one of this router's.
    pub dns_targets: HashMap<Key, String>,
}

impl Daemon {
    /// The upstream lane's view changed: kept for `status` and the metrics; returns whether
    /// a round should follow (Services are told, cleanups may proceed).
    pub(super) fn upstream_changed(&mut self) -> bool {
        let Some(lane) = &self.upstream else {
            return false;
        };
        let view = lane.view();
        let wanted = lane.wanted();
        if let Err(error) = write_state(&self.settings.state_file, &view, &wanted.mappings) {
            tracing::warn!(%error, file = %self.settings.state_file.display(), "cannot write the upstream state for `status`");
        }
        self.lock_metrics().upstream = Some(view);
        true
    }

    /// Warns once when a WAN address is private or behind carrier-grade NAT and no upstream
    /// is configured: its forwards are not reachable from the internet.
    pub(super) fn warn_private_wan(&mut self) {
        if self.upstream.is_some() || self.warned_private {
            return;
        }
        let Some(addr) = self
            .settings
            .table
            .wan_addresses
            .iter()
            .find(|a| a.is_ipv4() && upstream::not_public(**a))
        else {
            return;
        };
        self.warned_private = true;
        if upstream::is_cgnat(*addr) {
            tracing::warn!(
                wan = %addr,
                "the WAN address is behind carrier-grade NAT (100.64.0.0/10): forwards opened on it are not reachable from the internet, and the ISP's NAT has no IGD to ask; use IPv6 or ask the ISP for a public address"
            );
        } else {
            tracing::warn!(
                wan = %addr,
                "the WAN address is private: forwards opened on it are not reachable from the internet; behind another router, turn on --upstream upnp"
            );
        }
    }

    /// The router's WAN IPv4 addresses, as the upstream lane searches from them.
    pub(super) fn wan_ipv4(&self) -> BTreeSet<Ipv4Addr> {
        self.settings
            .table
            .wan_addresses
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// The public addresses the internet reaches the router's forwards at: per family, the
    /// IGD's external address (behind double NAT) or the WAN's own public ones. A family that
    /// has none for a moment (a DHCP renewal) keeps the last ones known.
    fn public_addresses(&mut self) -> BTreeSet<IpAddr> {
        for family in [Family::Ipv4, Family::Ipv6] {
            let upstream = match (family, &self.upstream) {
                (Family::Ipv4, Some(lane)) => Some(lane.view().external.into_iter().collect()),
                _ => None,
            };
            let now: BTreeSet<IpAddr> = upstream.unwrap_or_else(|| {
                self.settings
                    .table
                    .wan_addresses
                    .iter()
                    .filter(|a| Family::of(**a) == family)
                    .copied()
                    .collect()
            });
            let now: BTreeSet<IpAddr> = now
                .into_iter()
                .filter(|a| !upstream::not_public(*a))
                .collect();
            if !now.is_empty() {
                self.public.insert(family, now);
            }
        }
        self.public.values().flatten().copied().collect()
    }

    /// Hands the upstream lane the mappings the plan asks for, and notes which request
    /// last asked for each Service's; returns them.
    pub(super) fn want_upstream(&mut self) -> Option<BTreeMap<Mapping, Wanted>> {
        let lane = self.upstream.as_ref()?;
        let wanted = upstream::wanted(self.planner.forwards().values());
        let seq = lane.want(wanted.clone());
        for want in wanted.values() {
            if let Some(uid) = &want.uid {
                self.upstream_asked.insert(uid.clone(), seq);
            }
        }
        let uids: HashSet<&str> = self.store.values().map(|t| t.uid()).collect();
        self.upstream_asked
            .retain(|uid, _| uids.contains(uid.as_str()));
        Some(wanted)
    }

    /// Whether a Service released from its forwards may still have mappings open upstream.
    pub(super) fn upstream_open(&self, key: &Key, wanted: &BTreeMap<Mapping, Wanted>) -> bool {
        let (Some(lane), Some(tracked)) = (&self.upstream, self.store.get(key)) else {
            return false;
        };
        let asked = self.upstream_asked.get(tracked.uid()).copied();
        lane.view().still_open(tracked.uid(), asked, wanted)
    }

    /// Whether the IGD answers (a cleanup waiting on it is then only slow).
    pub(super) fn upstream_reachable(&self) -> bool {
        self.upstream.as_ref().is_some_and(|l| l.view().reachable)
    }

    /// The DNS targets and the upstream notes of every Service, for this round: DNS patches
    /// go to the cluster lane, upstream changes become events.
    pub(super) fn beyond(&mut self, round: &mut Round) -> Beyond {
        let mut beyond = Beyond::default();
        // Held apart for this pass, so the mappings may borrow from its forwards while the
        // DNS pass and the notes borrow the rest of the daemon; put back at the end.
        let planner = std::mem::take(&mut self.planner);
        let mut mappings: HashMap<&str, Vec<Mapping>> = HashMap::new();
        self.dns_families.clear();
        // Each costs what the plan holds: worked out only when DNS targets, or the
        // upstream IGD, are on.
        let upstream = self.upstream.is_some();
        for forward in planner.forwards().values() {
            let Some(uid) = forward.owner.uid.as_deref() else {
                continue;
            };
            if self.settings.dns_targets {
                self.dns_families
                    .entry(uid.to_owned())
                    .or_default()
                    .insert(forward.key.family);
            }
            if upstream && let Some(mapping) = Mapping::of(&forward.key) {
                mappings.entry(uid).or_default().push(mapping);
            }
        }
        let public = self.public_addresses();
        let mut pass = DnsPass {
            instance: &self.settings.instance,
            enabled: self.settings.dns_targets,
            public: &public,
            families: &self.dns_families,
            handed: &mut self.dns_handed,
            warned: &mut self.dns_warned,
        };
        for (key, tracked) in &self.store {
            let told = pass.service(key, tracked, round);
            if let Some(note) = told.note {
                beyond.notes.entry(key.clone()).or_default().push(note);
            }
            if told.waits {
                beyond.dns_pending.insert(key.clone());
            }
            if let Some(target) = told.target {
                beyond.dns_targets.insert(key.clone(), target);
            }
        }
        let store = &self.store;
        self.dns_handed.retain(|key, _| store.contains_key(key));
        self.dns_warned.retain(|key, _| store.contains_key(key));
        self.dns_waiting = beyond
            .dns_pending
            .iter()
            .filter_map(|k| self.store.get(k).map(|t| t.uid.clone()))
            .collect();
        self.upstream_notes(&mappings, &mut beyond, round);
        self.planner = planner;
        beyond
    }

    /// What each Service with mappings is told of them: a note for its condition, and an
    /// event when that changed (not before the lane has asked the IGD).
    fn upstream_notes(
        &mut self,
        mappings: &HashMap<&str, Vec<Mapping>>,
        beyond: &mut Beyond,
        round: &mut Round,
    ) {
        let Some(lane) = &self.upstream else {
            return;
        };
        let view = lane.view();
        let mut told = std::mem::take(&mut self.upstream_told);
        for (key, tracked) in &self.store {
            let Some(own) = mappings.get(tracked.uid()) else {
                continue;
            };
            let states: Vec<(Mapping, &MappingState)> = own
                .iter()
                .map(|m| (*m, view.mappings.get(m).unwrap_or(&MappingState::Pending)))
                .collect();
            let Some((text, warning)) = upstream::service_note(&states, &view) else {
                continue;
            };
            beyond
                .notes
                .entry(key.clone())
                .or_default()
                .push(text.clone());
            let asked =
                view.error.is_some() || states.iter().all(|(_, s)| **s != MappingState::Pending);
            if asked && told.get(key) != Some(&text) {
                let refused = states
                    .iter()
                    .any(|(_, s)| matches!(s, MappingState::Refused { .. }));
                let (type_, reason) = match (warning, refused) {
                    (false, _) => (EventType::Normal, "UpstreamMapped"),
                    (true, true) => (EventType::Warning, "UpstreamRefused"),
                    (true, false) => (EventType::Warning, "UpstreamUnreachable"),
                };
                let note = format!("router {}: {text}", self.settings.instance);
                self.event(key, type_, reason, "Upstream", note, round);
                told.insert(key.clone(), text);
            }
        }
        told.retain(|key, _| self.store.contains_key(key));
        self.upstream_told = told;
    }

    /// The DNS targets of Services whose annotations changed between rounds (the lane's own
    /// writes, mostly), against the last round's forwards and addresses.
    pub(super) fn recheck_dns(&mut self, keys: &BTreeSet<Key>, round: &mut Round) {
        if !self.settings.dns_targets && self.dns_handed.is_empty() {
            return;
        }
        let public: BTreeSet<IpAddr> = self.public.values().flatten().copied().collect();
        let mut pass = DnsPass {
            instance: &self.settings.instance,
            enabled: self.settings.dns_targets,
            public: &public,
            families: &self.dns_families,
            handed: &mut self.dns_handed,
            warned: &mut self.dns_warned,
        };
        for key in keys {
            if let Some(tracked) = self.store.get(key) {
                pass.service(key, tracked, round);
            }
        }
    }
}

/// What one pass over Services' DNS targets works with.
struct DnsPass<'a> {
    instance: &'a str,
    enabled: bool,
    public: &'a BTreeSet<IpAddr>,
    /// The families each Service (by uid) forwards on.
    families: &'a HashMap<String, BTreeSet<Family>>,
    /// Patches handed to the cluster lane, and for which annotations and target.
    handed: &'a mut HashMap<Key, (dns::Annotations, Option<String>)>,
    /// Services warned of a bad opt-out annotation, and for which value.
    warned: &'a mut HashMap<Key, String>,
}

/// What one Service's DNS target came to in a pass.
#[derive(Default)]
struct DnsTold {
    /// What its condition says of it.
    note: Option<String>,
    /// Its release waits for the target to go.
    waits: bool,
    /// The target the router writes on it (none when set by hand).
    target: Option<String>,
}

impl DnsPass<'_> {
    /// One Service: hands over the patch its targets need (unless the same one already
    /// was); returns what it is told of them.
    fn service(&mut self, key: &Key, tracked: &Tracked, round: &mut Round) -> DnsTold {
        if !self.enabled && !tracked.dns.has_own() {
            return DnsTold::default();
        }
        let forwarding = self.families.get(tracked.uid());
        let mut note = None;
        let wanted = match (self.enabled && !tracked.terminating, forwarding) {
            (true, Some(families)) => match tracked.dns.opted_in() {
                Ok(true) => dns::target(families, self.public),
                Ok(false) => None,
                Err(error) => {
                    if self.warned.get(key) != Some(&error) {
                        let event = Work::Event {
                            uid: tracked.uid.clone(),
                            type_: EventType::Warning,
                            reason: "InvalidAnnotation",
                            action: "Dns",
                            note: format!("router {}: {error}", self.instance),
                        };
                        round.reports.push((key.clone(), event));
                        self.warned.insert(key.clone(), error.clone());
                    }
                    note = Some(error);
                    None
                }
            },
            _ => None,
        };
        if note.is_none() {
            self.warned.remove(key);
        }
        let step = dns::step(&tracked.dns, wanted.as_deref());
        if let Some((text, _)) = step.note {
            note.get_or_insert(text);
        }
        let target = wanted.clone().filter(|_| tracked.dns.by_hand().is_none());
        if step.patch.is_empty() {
            // A target handed over to be written, not landed yet (the annotations are still
            // as they were then): it would land after the release; the release waits.
            let landing = forwarding.is_none()
                && self
                    .handed
                    .get(key)
                    .is_some_and(|(seen, target)| target.is_some() && *seen == tracked.dns);
            if !landing {
                self.handed.remove(key);
            }
            return DnsTold {
                note,
                waits: landing,
                target,
            };
        }
        let seen = (tracked.dns.clone(), wanted);
        if self.handed.get(key) != Some(&seen) {
            self.handed.insert(key.clone(), seen);
            round.reports.push((key.clone(), Work::Dns(step.patch)));
        }
        DnsTold {
            note,
            waits: forwarding.is_none(),
            target,
        }
    }
}

/// Writes what the upstream lane knows where `status` reads it, whole or not at all.
fn write_state(
    file: &Path,
    view: &View,
    wanted: &BTreeMap<Mapping, Wanted>,
) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mappings: Vec<serde_json::Value> = view
        .mappings
        .iter()
        .map(|(mapping, state)| {
            let mut entry = json!({
                "port": mapping.port,
                "protocol": mapping.protocol,
                "service": wanted.get(mapping).map(|w| w.service.as_str()),
            });
            if let (Some(entry), Ok(serde_json::Value::Object(state))) =
                (entry.as_object_mut(), serde_json::to_value(state))
            {
                entry.extend(state);
            }
            entry
        })
        .collect();
    let state = json!({
        "pid": std::process::id(),
        "igd": view.igd,
        "reachable": view.reachable,
        "error": view.error,
        "external": view.external,
        "internal": view.internal,
        "listed": view.listed,
        "mappings": mappings,
    });
    let temporary = file.with_extension("tmp");
    std::fs::write(&temporary, serde_json::to_vec_pretty(&state)?)?;
    std::fs::rename(&temporary, file)
}
