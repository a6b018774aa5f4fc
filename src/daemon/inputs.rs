//! What the lanes report to the daemon: watch events of Services and Namespaces (cluster),
//! address changes and a reloaded policy file (router). Each returns whether what the plan
//! depends on changed.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, ListParams, PartialObjectMeta};
use kube::runtime::watcher::{self, Event};

use super::Daemon;
use crate::cluster::lane::Done;
use crate::cluster::watch::Input;
use crate::cluster::watched::{WatchedNode, WatchedService};
use crate::core::decide::{Key, Store};
use crate::core::node::Nodes;
use crate::core::policy::NodePorts;
use crate::core::tracked::Tracked;
use crate::kernel::Engine;
use crate::router::health;
use crate::router::links::Addresses;
use crate::router::policy_file;
use crate::router::sockets::{self, Bound};

impl Daemon {
    /// Reads the interfaces' addresses into the WAN sets and the policy's router addresses,
    /// then the ports the router serves on them; returns whether any of it changed. A failed
    /// read keeps what is known.
    pub(super) fn follow_addresses(&mut self) -> bool {
        let addresses_changed = self.follow_interfaces();
        self.follow_served_ports() || addresses_changed
    }

    /// Reads the router's own sockets now: the ports it serves where WAN clients reach,
    /// which forwards may not take unless the owner names them. Returns whether they
    /// changed; a failed read keeps the known ones.
    pub(super) fn follow_served_ports(&mut self) -> bool {
        match self.served.read_now() {
            Ok(sockets) => self.take_sockets(&sockets),
            Err(error) => {
                tracing::error!(%error, "cannot read the ports the router serves; keeping the known ones");
                false
            }
        }
    }

    /// The router's sockets as last read: returns whether the ports it serves on its WAN
    /// side changed. One that a forward holds is said at once; the round that follows closes
    /// the forward and tells its Service.
    pub(super) fn take_sockets(&mut self, sockets: &BTreeSet<Bound>) -> bool {
        let served = sockets::served_on(sockets, &self.settings.table.wan_addresses);
        if served == self.settings.policy.router_ports {
            return false;
        }
        let list: Vec<String> = served.iter().map(|(p, n)| format!("{n}/{p}")).collect();
        tracing::info!(ports = %list.join(","), "ports the router serves on its WAN side");
        if !self.settings.policy.explicit_ports
            && let Some(applied) = self.engine.as_ref().and_then(Engine::applied)
        {
            for key in applied.forwards.keys() {
                let port = (key.protocol, key.external_port);
                if served.contains(&port) && !self.settings.policy.router_ports.contains(&port) {
                    tracing::warn!(
                        action = "router-port",
                        forward = %key,
                        "the router itself now serves this forward's port: the router's service wins, the forward closes"
                    );
                }
            }
        }
        self.settings.policy.router_ports = served;
        true
    }

    pub(super) fn follow_interfaces(&mut self) -> bool {
        let addresses = match Addresses::read(&self.settings.table.wan_interfaces) {
            Ok(addresses) => addresses,
            Err(error) => {
                tracing::error!(%error, "cannot read the interfaces' addresses; keeping the known ones");
                return false;
            }
        };
        let router: BTreeSet<IpAddr> = self.fixed_router.union(&addresses.all).copied().collect();
        let policy_changed = router != self.settings.policy.router_addresses;
        self.settings.policy.router_addresses = router;
        if self.settings.table.wan_interfaces.is_empty() {
            return policy_changed;
        }
        let wan: BTreeSet<IpAddr> = self.fixed_wan.union(&addresses.wan).copied().collect();
        if wan == self.settings.table.wan_addresses {
            return policy_changed;
        }
        let list: Vec<String> = wan.iter().map(ToString::to_string).collect();
        tracing::info!(
            action = "wan",
            interfaces = ?self.settings.table.wan_interfaces,
            addresses = %list.join(","),
            "WAN addresses changed"
        );
        self.lock_metrics().wan_addresses = wan.len();
        self.settings.table.wan_addresses = wan;
        if let Some(lane) = &self.upstream {
            lane.wan_changed(self.wan_ipv4());
        }
        self.warn_private_wan();
        true
    }

    /// Re-reads the policy file on SIGHUP. A policy that cannot be read leaves the one in
    /// force unchanged.
    pub(super) fn reload_policy(&mut self) {
        let Some(file) = &self.settings.policy_file else {
            tracing::info!("SIGHUP: no policy file to re-read");
            return;
        };
        match policy_file::read(file) {
            Ok(mut policy) => {
                let current = &self.settings.policy;
                policy.router_addresses = current.router_addresses.clone();
                policy.router_ports = current.router_ports.clone();
                if policy.namespace_selector != current.namespace_selector {
                    tracing::error!(
                        "the namespace selector cannot change on reload (the Namespace watch is set up at start); keeping the current one: restart to change it"
                    );
                    policy.namespace_selector = current.namespace_selector.clone();
                }
                policy.selected_namespaces = current.selected_namespaces.clone();
                let watching = current.node_ports != NodePorts::Off;
                if (policy.node_ports != NodePorts::Off) != watching {
                    tracing::error!(
                        "node ports cannot be turned on or off on reload (the Node watch is set up at start); keeping them as they are: restart to change it"
                    );
                    policy.node_ports = current.node_ports;
                }
                policy.nodes = current.nodes.clone();
                self.settings.policy = policy;
                tracing::info!(action = "policy", file = %file.display(), "policy reloaded");
            }
            Err(error) => {
                tracing::error!(%error, "policy not reloaded; the previous one stays in force");
            }
        }
    }

    /// Whether a Service changed in nothing a full round depends on: what it asks for and
    /// its state, and whether it holds this router's finalizer without forwarding (a
    /// release needs the kernel checked first).
    fn same_for_the_plan(&self, key: &Key, old: &Tracked, new: &Tracked) -> bool {
        let finalizer = &self.settings.finalizer;
        old.service == new.service
            && old.terminating == new.terminating
            && old.annotated == new.annotated
            && old.out_of_scope == new.out_of_scope
            && old.uid == new.uid
            // A Service waiting for its DNS targets to go before its release: their going
            // lets the release proceed. A target set by hand and the opt-out change what
            // the Service is told. The daemon's own writes are rechecked alone.
            && (old.dns == new.dns || !self.dns_waiting.contains(new.uid()))
            && old.dns.by_hand() == new.dns.by_hand()
            && old.dns.opt == new.dns.opt
            && (old.has_finalizer(finalizer) == new.has_finalizer(finalizer)
                || self.planner.is_forwarding(key, new.uid()))
    }

    /// Takes what the cluster lane did; returns whether the Services changed.
    pub(super) fn lane_done(&mut self, done: Done) -> bool {
        match done {
            Done::Finalizer(key, updated) => {
                self.handed.remove(&key);
                if updated.metadata.name.is_none() {
                    return false;
                }
                let tracked = updated.tracked;
                let ours = tracked.has_finalizer(&self.settings.finalizer);
                match self.store.get(&key).map(|t| t.out_of_scope) {
                    // The watch let it go meanwhile (it left the scope; really deleted, it
                    // could not have been patched). Holding this router's finalizer now, it
                    // is released; otherwise the watch has the last word.
                    None if ours => {
                        self.store.insert(
                            key,
                            Tracked {
                                out_of_scope: true,
                                ..tracked
                            },
                        );
                        true
                    }
                    None => false,
                    // Released: the watch says nothing more of it.
                    Some(true) if !ours => self.store.remove(&key).is_some(),
                    Some(out_of_scope) if tracked.relevant(&self.settings.finalizer) => {
                        self.store.insert(
                            key,
                            Tracked {
                                out_of_scope,
                                ..tracked
                            },
                        );
                        false
                    }
                    Some(_) => self.store.remove(&key).is_some(),
                }
            }
            Done::Gone(key) => {
                self.handed.remove(&key);
                self.store.remove(&key).is_some()
            }
            Done::Idle => {
                self.lock_metrics().bookkeeping_idle = true;
                tracing::debug!("bookkeeping caught up");
                false
            }
        }
    }

    /// Looks once, after the first complete list, for Services outside the watch's scope
    /// that hold this router's finalizer (the scope was narrowed across a restart, or they
    /// left it while the daemon was down), so their finalizers are released too. Metadata
    /// only, a page at a time. Returns whether any was found.
    pub(super) async fn sweep_strays(&mut self) -> bool {
        let api: Api<PartialObjectMeta<Service>> = Api::all(self.client.clone());
        let mut params = ListParams::default().limit(500);
        let mut found = 0;
        loop {
            let page = match api.list_metadata(&params).await {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(%error, "cannot list Services outside the watch that hold this router's finalizer; trying again at the next resync");
                    return found > 0;
                }
            };
            for meta in page.items {
                let holds = meta
                    .metadata
                    .finalizers
                    .as_ref()
                    .is_some_and(|f| f.contains(&self.settings.finalizer));
                let key = (
                    meta.metadata.namespace.clone().unwrap_or_default(),
                    meta.metadata.name.clone().unwrap_or_default(),
                );
                if !holds || self.store.contains_key(&key) {
                    continue;
                }
                tracing::info!(namespace = %key.0, name = %key.1, "a Service outside the watch holds this router's finalizer; releasing it");
                let mut tracked =
                    Tracked::from_value(serde_json::json!({"metadata": meta.metadata}));
                tracked.out_of_scope = true;
                self.store.insert(key, tracked);
                found += 1;
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        self.strays_swept = true;
        found > 0
    }

    /// Takes one watch event; returns whether what the plan depends on changed.
    pub(super) fn take(&mut self, input: Input) -> bool {
        match input {
            Input::Services(index, event) => self.handle(index, *event),
            Input::Namespaces(event) => self.handle_namespace(*event),
            Input::Nodes(event) => self.handle_node(*event),
        }
    }

    /// The cluster's Nodes, for forwards to node ports.
    fn handle_node(&mut self, event: Result<Event<WatchedNode>, watcher::Error>) -> bool {
        let nodes = &mut self.settings.policy.nodes;
        let name = |watched: &WatchedNode| watched.metadata.name.clone().unwrap_or_default();
        match event {
            Ok(Event::Init) => {
                self.node_buffer = Some(Nodes::new());
                false
            }
            Ok(Event::InitApply(watched)) => {
                if let (Some(buffer), Some(node)) = (self.node_buffer.as_mut(), watched.node) {
                    buffer.insert(node.name.clone(), node);
                }
                false
            }
            Ok(Event::InitDone) => {
                *nodes = self.node_buffer.take().unwrap_or_default();
                let eligible = nodes.values().filter(|n| n.eligible()).count();
                tracing::info!(nodes = nodes.len(), eligible, "complete list of Nodes");
                self.nodes_synced = true;
                true
            }
            Ok(Event::Apply(watched)) => {
                let key = name(&watched);
                let node = watched.node;
                let changed = nodes.get(&key) != node.as_ref();
                match node {
                    Some(node) => nodes.insert(key, node),
                    None => nodes.remove(&key),
                };
                changed
            }
            Ok(Event::Delete(watched)) => nodes.remove(&name(&watched)).is_some(),
            Err(error) => {
                health::lock(&self.metrics).watch_errors += 1;
                tracing::warn!(%error, "watching Nodes failed; rules stay, retrying (RBAC: nodes list and watch, see deploy/rbac.yaml)");
                false
            }
        }
    }

    /// Namespaces matching the policy's selector, from their metadata watch.
    fn handle_namespace(
        &mut self,
        event: Result<Event<PartialObjectMeta<Namespace>>, watcher::Error>,
    ) -> bool {
        let name =
            |meta: &PartialObjectMeta<Namespace>| meta.metadata.name.clone().unwrap_or_default();
        let selected = &mut self.settings.policy.selected_namespaces;
        match event {
            Ok(Event::Init) => {
                self.namespace_buffer = Some(BTreeSet::new());
                false
            }
            Ok(Event::InitApply(meta)) => {
                if let Some(buffer) = self.namespace_buffer.as_mut() {
                    buffer.insert(name(&meta));
                }
                false
            }
            Ok(Event::InitDone) => {
                *selected = self.namespace_buffer.take().unwrap_or_default();
                tracing::info!(namespaces = selected.len(), "namespaces the policy selects");
                self.namespaces_synced = true;
                true
            }
            Ok(Event::Apply(meta)) => selected.insert(name(&meta)),
            Ok(Event::Delete(meta)) => selected.remove(&name(&meta)),
            Err(error) => {
                health::lock(&self.metrics).watch_errors += 1;
                tracing::warn!(%error, "watching Namespaces failed; rules stay, retrying");
                false
            }
        }
    }

    /// Takes one watch event of Services; returns whether they changed.
    fn handle(
        &mut self,
        index: usize,
        event: Result<Event<WatchedService>, watcher::Error>,
    ) -> bool {
        match event {
            Ok(Event::Init) => {
                self.buffers[index] = Some(Store::new());
                false
            }
            Ok(Event::InitApply(service)) => {
                let key = service.key();
                if let Some(buffer) = self.buffers[index].as_mut()
                    && service.tracked.relevant(&self.settings.finalizer)
                {
                    buffer.insert(key, service.tracked);
                }
                false
            }
            Ok(Event::InitDone) => {
                let listed = self.buffers[index].take().unwrap_or_default();
                let in_scope = |ns: &str| self.scopes[index].as_deref().is_none_or(|s| s == ns);
                let before: Vec<Key> = self
                    .store
                    .keys()
                    .filter(|(ns, _)| in_scope(ns))
                    .cloned()
                    .collect();
                // A Service that held this router's finalizer and is not listed any more
                // left the scope while the watch was down: it cannot have been deleted, the
                // finalizer holds it. Kept until the finalizer is released.
                for key in before {
                    let Some(mut tracked) = self.store.remove(&key) else {
                        continue;
                    };
                    if !listed.contains_key(&key) && tracked.has_finalizer(&self.settings.finalizer)
                    {
                        tracked.out_of_scope = true;
                        self.store.insert(key, tracked);
                    }
                }
                tracing::info!(services = listed.len(), "complete list of Services");
                self.store.extend(listed);
                self.synced[index] = true;
                true
            }
            Ok(Event::Apply(service)) => {
                let key = service.key();
                if !service.tracked.relevant(&self.settings.finalizer) {
                    return self.store.remove(&key).is_some();
                }
                let unplanned = self
                    .store
                    .get(&key)
                    .is_some_and(|old| self.same_for_the_plan(&key, old, &service.tracked));
                self.store.insert(key.clone(), service.tracked);
                if unplanned {
                    // Finalizers or conditions changed (the lane's own writes, mostly):
                    // nothing to plan again.
                    self.recheck.insert(key);
                }
                !unplanned
            }
            Ok(Event::Delete(service)) => {
                let key = service.key();
                let mut tracked = service.tracked;
                // The watch's last copy may predate the lane's own patch adding the
                // finalizer (the labels changed first): what the lane learnt counts too.
                if !tracked.has_finalizer(&self.settings.finalizer)
                    && let Some(known) = self.store.get(&key).filter(|known| {
                        known.uid == tracked.uid && known.has_finalizer(&self.settings.finalizer)
                    })
                {
                    tracked = known.clone();
                }
                if tracked.has_finalizer(&self.settings.finalizer) {
                    // Deleted, as a filtered watch reports a Service whose labels stopped
                    // matching: while it holds this router's finalizer it cannot really be
                    // gone. Its forwards close, then the finalizer is released.
                    tracing::info!(namespace = %key.0, name = %key.1, "the Service left the watch's scope; closing its forwards, then releasing the finalizer");
                    tracked.out_of_scope = true;
                    self.store.insert(key, tracked);
                    true
                } else {
                    self.store.remove(&key).is_some()
                }
            }
            Err(error) => {
                self.lock_metrics().watch_errors += 1;
                tracing::warn!(%error, "watching Services failed; rules stay, retrying");
                if !self.ready {
                    // systemd shows it (`systemctl status`); the unit waits as long as it
                    // takes (TimeoutStartSec=infinity), the rules staying as they are.
                    let status = format!("waiting for the API server: {error}");
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
                }
                false
            }
        }
    }
}
