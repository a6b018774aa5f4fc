//! The upstream lane: keeps the IGD of the box in front of the router (double NAT) mapping
//! every IPv4 port the router forwards to the router's WAN address. Runs beside the daemon's
//! loop: the daemon says which mappings it wants ([`Upstream::want`]) and reads what the IGD
//! said ([`Upstream::view`]); a slow or absent IGD never holds up a round.
//!
//! - Found by SSDP from the router's WAN address, or at the URL given.
//! - Each mapping is leased and renewed at half its lease; an IGD that takes only permanent
//!   ones (725) gets those.
//! - Polled every `poll`: its external address, and its uptime, which going back means it
//!   restarted and forgot its mappings: everything is mapped again. An IGD that stops
//!   answering is looked for again, with backoff, and everything is mapped again when it is
//!   back. Mappings are kept in its list meanwhile: the lane never forgets one it opened.
//! - Its list is read once found: mappings an earlier run left to this router's address and
//!   nobody wants now are deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::core::upstream::{Mapping, MappingState, View, Wanted};
use crate::router::igd::{self, Gateway, IgdError, Url};

/// Every mapping's description on the IGD starts with this, then `namespace/name`: how a
/// restarted daemon knows its own.
pub const DESCRIPTION: &str = "kube-port-forward ";
/// Descriptions are cut to this many bytes (miniupnpd keeps 64).
const DESCRIPTION_MAX: usize = 63;
/// At most this many entries of the IGD's list are read.
const LIST_MAX: u32 = 8192;
/// An uptime this many seconds shorter than expected means the IGD restarted (uptimes are
/// whole seconds, polls come a little late).
const UPTIME_SLACK: u64 = 3;
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_LAST: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// The IGD's description or control URL; `None`: search with SSDP.
    pub url: Option<Url>,
    /// Lease of each mapping; renewed at half time. Zero: permanent.
    pub lease: Duration,
    /// How often the IGD is asked whether it is there, restarted, or has a new address.
    pub poll: Duration,
    /// How long one request, or a search, may take.
    pub timeout: Duration,
}

impl Default for UpstreamSettings {
    fn default() -> UpstreamSettings {
        UpstreamSettings {
            url: None,
            lease: Duration::from_secs(3600),
            poll: Duration::from_secs(5),
            timeout: Duration::from_secs(3),
        }
    }
}

/// The daemon's end of the lane.
pub struct Upstream {
    wanted: watch::Sender<Arc<Asked>>,
    wan: watch::Sender<BTreeSet<Ipv4Addr>>,
    view: watch::Receiver<Arc<View>>,
}

impl Upstream {
    /// Starts the lane; `wan`: the router's WAN IPv4 addresses (SSDP searches from them).
    pub fn start(settings: UpstreamSettings, wan: BTreeSet<Ipv4Addr>) -> Upstream {
        let (wanted, wanted_rx) = watch::channel(Arc::new(Asked::default()));
        let (wan, wan_rx) = watch::channel(wan);
        let (view_tx, view) = watch::channel(Arc::new(View::default()));
        tokio::spawn(run(settings, wanted_rx, wan_rx, view_tx));
        Upstream { wanted, wan, view }
    }

    /// The mappings the router's forwards ask for now; returns the number of that request
    /// (a new one for a change), which the view's `pass_done` reaches once the lane has been
    /// through it.
    pub fn want(&self, wanted: BTreeMap<Mapping, Wanted>) -> u64 {
        self.wanted.send_if_modified(|current| {
            let changed = current.mappings != wanted;
            if changed {
                *current = Arc::new(Asked {
                    seq: current.seq + 1,
                    mappings: wanted,
                });
            }
            changed
        });
        self.wanted.borrow().seq
    }

    /// The mappings asked for last.
    pub fn wanted(&self) -> Arc<Asked> {
        self.wanted.borrow().clone()
    }

    /// The router's WAN IPv4 addresses changed.
    pub fn wan_changed(&self, wan: BTreeSet<Ipv4Addr>) {
        self.wan.send_if_modified(|current| {
            let changed = *current != wan;
            if changed {
                *current = wan;
            }
            changed
        });
    }

    /// What the lane knows now.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// Completes when the view changed.
    pub async fn changed(&mut self) {
        if self.view.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What the daemon asked for, numbered.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Asked {
    pub seq: u64,
    pub mappings: BTreeMap<Mapping, Wanted>,
}

/// Which wanted mappings a pass asks the IGD for, besides leases due for renewal and
/// mappings held to an address the router no longer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// After a change of the plan: new ones (not those refused: they wait for a poll).
    Changes,
    /// At a poll: new ones and refused ones.
    Poll,
    /// Found again, restarted, or the router's address changed: every one.
    All,
}

/// A mapping open on the IGD.
struct Held {
    internal: Ipv4Addr,
    renew_at: Instant,
    owner: Option<String>,
}

struct Lane {
    settings: UpstreamSettings,
    gateway: Option<Gateway>,
    local: Option<Ipv4Addr>,
    held: BTreeMap<Mapping, Held>,
    /// Seconds; drops to zero for an IGD that takes only permanent mappings.
    lease: u32,
    /// The IGD's uptime at the last poll, and when that was.
    uptime: Option<(u64, Instant)>,
    view: View,
    failures: u32,
}

async fn run(
    settings: UpstreamSettings,
    mut wanted: watch::Receiver<Arc<Asked>>,
    mut wan: watch::Receiver<BTreeSet<Ipv4Addr>>,
    view: watch::Sender<Arc<View>>,
) {
    let mut lane = Lane {
        lease: u32::try_from(settings.lease.as_secs()).unwrap_or(u32::MAX),
        settings,
        gateway: None,
        local: None,
        held: BTreeMap::new(),
        uptime: None,
        view: View::default(),
        failures: 0,
    };
    let mut poll = tokio::time::interval(lane.settings.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if lane.gateway.is_none() {
            let local = wan.borrow().iter().next().copied();
            let result = lane.find(local).await;
            let current = wanted.borrow_and_update().clone();
            let result = match result {
                Ok(()) => lane.arrive(&current.mappings).await,
                Err(error) => Err(error),
            };
            lane.view.pass_done = current.seq;
            if let Err(error) = result {
                lane.lose(error);
                publish(&view, &mut lane);
                let until = Instant::now() + backoff(lane.failures);
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        Ok(()) = wan.changed() => break,
                        Ok(()) = wanted.changed() => {
                            // Nothing is mapped or deleted meanwhile: what is held stays
                            // what it was, and the daemon may go by it.
                            lane.view.pass_done = wanted.borrow_and_update().seq;
                            publish(&view, &mut lane);
                        }
                    }
                }
                continue;
            }
            lane.failures = 0;
            publish(&view, &mut lane);
            poll.reset();
        }
        let (current, result) = tokio::select! {
            Ok(()) = wanted.changed() => {
                let current = wanted.borrow_and_update().clone();
                let result = lane.sync(&current.mappings, Pass::Changes).await;
                (current, result)
            }
            Ok(()) = wan.changed() => {
                wan.borrow_and_update();
                let current = wanted.borrow().clone();
                let result = lane.follow_local(&current.mappings).await;
                (current, result)
            }
            _ = poll.tick() => {
                let current = wanted.borrow().clone();
                let result = lane.poll(&current.mappings).await;
                (current, result)
            }
        };
        lane.view.pass_done = current.seq;
        if let Err(error) = result {
            lane.lose(error);
        }
        publish(&view, &mut lane);
    }
}

/// Publishes the lane's view, with the mappings held as they are now (a pass that failed
/// half-way made some).
fn publish(view: &watch::Sender<Arc<View>>, lane: &mut Lane) {
    lane.view.held = lane
        .held
        .iter()
        .map(|(m, h)| (*m, h.owner.clone()))
        .collect();
    let current = &lane.view;
    view.send_if_modified(|v| {
        let changed = **v != *current;
        if changed {
            *v = Arc::new(current.clone());
        }
        changed
    });
}

fn backoff(failures: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(8)))
        .min(RETRY_LAST)
}

fn description(service: &str) -> String {
    let mut text = format!("{DESCRIPTION}{service}");
    let mut cut = text.len().min(DESCRIPTION_MAX);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text
}

impl Lane {
    /// Finds the IGD: at the URL given, or by SSDP from `local`.
    async fn find(&mut self, local: Option<Ipv4Addr>) -> Result<(), IgdError> {
        let timeout = self.settings.timeout;
        let url = match &self.settings.url {
            Some(url) => url.clone(),
            None => {
                let local = local.ok_or_else(|| {
                    IgdError::Unreachable(
                        "no IPv4 WAN address to search for an IGD from".to_owned(),
                    )
                })?;
                igd::discover(local, timeout).await?
            }
        };
        let gateway = Gateway::at(&url, timeout).await?;
        self.local = Some(gateway.local_address()?);
        self.gateway = Some(gateway);
        Ok(())
    }

    fn gateway(&self) -> Result<&Gateway, IgdError> {
        self.gateway
            .as_ref()
            .ok_or_else(|| IgdError::Unreachable("no IGD".to_owned()))
    }

    /// The IGD was found (again): reads its address and uptime, adopts or deletes what an
    /// earlier run left, and maps everything.
    async fn arrive(&mut self, wanted: &BTreeMap<Mapping, Wanted>) -> Result<(), IgdError> {
        let gateway = self.gateway()?.clone();
        self.view.igd = Some(gateway.control.to_string());
        self.view.internal = self.local;
        self.refresh().await?;
        if !self.view.listed {
            self.adopt(&gateway, wanted).await?;
        }
        self.view.reachable = true;
        self.view.error = None;
        tracing::info!(
            action = "upstream",
            igd = %gateway.control,
            external = ?self.view.external,
            internal = ?self.local,
            "IGD found; mapping the router's forwards there"
        );
        self.sync(wanted, Pass::All).await
    }

    /// Reads the IGD's list once: mappings to this router's address described as this
    /// daemon's are held, for the Service that wants them or for nobody (then deleted).
    async fn adopt(
        &mut self,
        gateway: &Gateway,
        wanted: &BTreeMap<Mapping, Wanted>,
    ) -> Result<(), IgdError> {
        let local = self.local.map(|l| l.to_string()).unwrap_or_default();
        for index in 0..LIST_MAX {
            let entry = match gateway.entry(index).await {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                // Some IGDs answer past the end with another error: the list ends there.
                Err(IgdError::Refused { .. }) => break,
                Err(error) => return Err(error),
            };
            if entry.internal != local || !entry.description.starts_with(DESCRIPTION) {
                continue;
            }
            let owner = wanted.get(&entry.mapping).and_then(|w| w.uid.clone());
            self.held.entry(entry.mapping).or_insert(Held {
                internal: self.local.unwrap_or(Ipv4Addr::UNSPECIFIED),
                renew_at: Instant::now(),
                owner,
            });
        }
        self.view.listed = true;
        Ok(())
    }

    /// Reads the IGD's external address and uptime; an uptime gone back means it restarted.
    /// Returns whether it did.
    async fn refresh(&mut self) -> Result<bool, IgdError> {
        let gateway = self.gateway()?.clone();
        let external = gateway.external_address().await?;
        if external != self.view.external {
            tracing::info!(
                action = "upstream",
                igd = %gateway.control,
                external = ?external,
                previous = ?self.view.external,
                "the IGD's external address changed"
            );
            self.view.external = external;
        }
        // Not every IGD implements GetStatusInfo: then restarts show at renewal only.
        let uptime = gateway.uptime().await.unwrap_or(None);
        let now = Instant::now();
        let restarted = match (self.uptime, uptime) {
            (Some((before, at)), Some(now_up)) => {
                now_up + UPTIME_SLACK < before + now.duration_since(at).as_secs()
            }
            _ => false,
        };
        self.uptime = uptime.map(|u| (u, now));
        if restarted {
            tracing::warn!(
                action = "upstream",
                igd = %gateway.control,
                "the IGD restarted (its uptime went back); mapping everything again"
            );
        }
        Ok(restarted)
    }

    /// Every poll: is it there, restarted, with a new address; leases due are renewed and
    /// refused mappings asked for again.
    async fn poll(&mut self, wanted: &BTreeMap<Mapping, Wanted>) -> Result<(), IgdError> {
        let pass = if self.refresh().await? {
            Pass::All
        } else {
            Pass::Poll
        };
        self.sync(wanted, pass).await
    }

    /// The router's WAN address may have changed: mappings to the old one are deleted (the
    /// IGD may refuse: then they lapse with their lease) and made again to the new.
    async fn follow_local(&mut self, wanted: &BTreeMap<Mapping, Wanted>) -> Result<(), IgdError> {
        let gateway = self.gateway()?.clone();
        let local = gateway.local_address()?;
        if Some(local) == self.local {
            return Ok(());
        }
        tracing::info!(
            action = "upstream",
            igd = %gateway.control,
            internal = %local,
            previous = ?self.local,
            "the router's address toward the IGD changed; mapping everything to it"
        );
        self.local = Some(local);
        self.view.internal = Some(local);
        let stale: Vec<Mapping> = self.held.keys().copied().collect();
        for mapping in stale {
            match gateway.delete(mapping).await {
                Ok(()) | Err(IgdError::Refused { .. }) => {}
                Err(error) => return Err(error),
            }
            self.held.remove(&mapping);
        }
        self.sync(wanted, Pass::All).await
    }

    /// Brings the IGD in step: maps what the pass asks for (see [`Pass`]), renews leases
    /// due, and deletes what is held and not wanted.
    async fn sync(
        &mut self,
        wanted: &BTreeMap<Mapping, Wanted>,
        pass: Pass,
    ) -> Result<(), IgdError> {
        let gateway = self.gateway()?.clone();
        let local = self
            .local
            .ok_or_else(|| IgdError::Unreachable("no address toward the IGD".to_owned()))?;
        let now = Instant::now();
        self.view.mappings.retain(|m, _| wanted.contains_key(m));
        for (mapping, want) in wanted {
            let refused = matches!(
                self.view.mappings.get(mapping),
                Some(MappingState::Refused { .. })
            );
            let go = match (pass, self.held.get(mapping)) {
                (Pass::All, _) => true,
                (_, Some(held)) => {
                    held.internal != local || (self.lease > 0 && held.renew_at <= now)
                }
                (Pass::Changes, None) => !refused,
                (Pass::Poll, None) => true,
            };
            if !go {
                continue;
            }
            let state = self.map(&gateway, *mapping, local, want).await?;
            self.record(&gateway, *mapping, want, state);
        }
        let unwanted: Vec<Mapping> = self
            .held
            .keys()
            .filter(|m| !wanted.contains_key(m))
            .copied()
            .collect();
        for mapping in unwanted {
            match gateway.delete(mapping).await {
                Ok(()) => tracing::info!(
                    action = "upstream",
                    state = "deleted",
                    mapping = %mapping,
                    igd = %gateway.control,
                    "upstream mapping deleted"
                ),
                // 714: not there any more (expired, or the IGD restarted).
                Err(IgdError::Refused { code: 714, .. }) => {}
                Err(IgdError::Refused { code, reason }) => tracing::warn!(
                    action = "upstream",
                    state = "left",
                    mapping = %mapping,
                    igd = %gateway.control,
                    code,
                    reason = %reason,
                    "the IGD refused to delete an upstream mapping; it lapses with its lease"
                ),
                Err(error) => return Err(error),
            }
            self.held.remove(&mapping);
        }
        Ok(())
    }

    /// Asks for one mapping; an IGD that takes only permanent leases gets one.
    async fn map(
        &mut self,
        gateway: &Gateway,
        mapping: Mapping,
        local: Ipv4Addr,
        want: &Wanted,
    ) -> Result<MappingState, IgdError> {
        let text = description(&want.service);
        let mut result = gateway.add(mapping, local, self.lease, &text).await;
        if let Err(IgdError::Refused { code: 725, .. }) = result {
            tracing::info!(igd = %gateway.control, "the IGD takes only permanent mappings");
            self.lease = 0;
            result = gateway.add(mapping, local, 0, &text).await;
        }
        match result {
            Ok(()) => {
                let renew = Duration::from_secs(u64::from(self.lease / 2).max(1));
                self.held.insert(
                    mapping,
                    Held {
                        internal: local,
                        renew_at: Instant::now() + renew,
                        owner: want.uid.clone(),
                    },
                );
                Ok(MappingState::Mapped)
            }
            Err(IgdError::Refused { code, reason }) => Ok(MappingState::Refused { code, reason }),
            Err(error) => Err(error),
        }
    }

    /// Keeps a mapping's state; a change is an audit line.
    fn record(&mut self, gateway: &Gateway, mapping: Mapping, want: &Wanted, state: MappingState) {
        let previous = self.view.mappings.insert(mapping, state.clone());
        if previous.as_ref() == Some(&state) {
            return;
        }
        match &state {
            MappingState::Mapped => tracing::info!(
                action = "upstream",
                state = "mapped",
                mapping = %mapping,
                service = %want.service,
                internal = ?self.local,
                external = ?self.view.external,
                igd = %gateway.control,
                lease = self.lease,
                "upstream mapping made"
            ),
            MappingState::Refused { code, reason } => tracing::warn!(
                action = "upstream",
                state = "refused",
                mapping = %mapping,
                service = %want.service,
                igd = %gateway.control,
                code,
                reason = %reason,
                "the IGD refused an upstream mapping"
            ),
            MappingState::Pending => {}
        }
    }

    /// The IGD does not answer (or was not found): what was mapped is pending until it is
    /// back, and kept in `held` (it may still be open there).
    fn lose(&mut self, error: IgdError) {
        self.failures += 1;
        let message = error.to_string();
        if self.view.reachable || self.failures == 1 {
            tracing::warn!(
                action = "upstream",
                state = "unreachable",
                igd = ?self.view.igd,
                error = %message,
                "the IGD does not answer; looking for it again, forwards stay"
            );
        }
        self.gateway = None;
        self.uptime = None;
        self.view.reachable = false;
        self.view.error = Some(message);
        for state in self.view.mappings.values_mut() {
            *state = MappingState::Pending;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_name_the_service_and_fit_the_igd() {
        assert_eq!(description("web/site"), "kube-port-forward web/site");
        let long = description(&format!("ns/{}", "é".repeat(60)));
        assert!(long.len() <= DESCRIPTION_MAX && long.starts_with(DESCRIPTION));
    }

    #[test]
    fn searches_back_off_to_half_a_minute() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(20), RETRY_LAST);
    }
}
