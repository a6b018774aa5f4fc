//! What the lanes report to the daemon: watch events of Services and Namespaces (cluster),
//! address changes and a reloaded policy file (router). Each returns whether what the plan
//! depends on changed.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};

use super::Daemon;
use crate::cluster::watch::Input;
use crate::cluster::watched::WatchedService;
use crate::core::decide::Store;
use crate::router::health;
use crate::router::links::Addresses;
use crate::router::{policy_file, sockets};

impl Daemon {
    /// Reads the interfaces' addresses into the WAN sets and the policy's router addresses,
    /// then the ports the router serves on them; returns whether any of it changed. A failed
    /// read keeps what is known.
    pub(super) fn follow_addresses(&mut self) -> bool {
        let addresses_changed = self.follow_interfaces();
        self.follow_served_ports() || addresses_changed
    }

    /// The ports the router itself serves where WAN clients reach: forwards may not take
    /// them unless the owner names them.
    pub(super) fn follow_served_ports(&mut self) -> bool {
        let served = match sockets::served(&self.settings.table.wan_addresses) {
            Ok(served) => served,
            Err(error) => {
                tracing::error!(%error, "cannot read the ports the router serves; keeping the known ones");
                return false;
            }
        };
        if served == self.settings.policy.router_ports {
            return false;
        }
        let list: Vec<String> = served.iter().map(|(p, n)| format!("{n}/{p}")).collect();
        tracing::info!(ports = %list.join(","), "ports the router serves on its WAN side");
        self.settings.policy.router_ports = served;
        true
    }

    fn follow_interfaces(&mut self) -> bool {
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
                self.settings.policy = policy;
                tracing::info!(action = "policy", file = %file.display(), "policy reloaded");
            }
            Err(error) => {
                tracing::error!(%error, "policy not reloaded; the previous one stays in force");
            }
        }
    }

    /// Takes one watch event; returns whether what the plan depends on changed.
    pub(super) fn take(&mut self, input: Input) -> bool {
        match input {
            Input::Services(index, event) => self.handle(index, *event),
            Input::Namespaces(event) => self.handle_namespace(*event),
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
                match &self.scopes[index] {
                    Some(ns) => self.store.retain(|(n, _), _| n != ns),
                    None => self.store.clear(),
                }
                tracing::info!(services = listed.len(), "complete list of Services");
                self.store.extend(listed);
                self.synced[index] = true;
                true
            }
            Ok(Event::Apply(service)) => {
                let key = service.key();
                if service.tracked.relevant(&self.settings.finalizer) {
                    self.store.insert(key, service.tracked);
                    true
                } else {
                    self.store.remove(&key).is_some()
                }
            }
            Ok(Event::Delete(service)) => self.store.remove(&service.key()).is_some(),
            Err(error) => {
                self.lock_metrics().watch_errors += 1;
                tracing::warn!(%error, "watching Services failed; rules stay, retrying");
                false
            }
        }
    }
}
