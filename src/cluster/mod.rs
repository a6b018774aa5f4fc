//! The cluster lane: the Kubernetes API. The client ([`client`]), the watches of Services
//! and Namespaces ([`watch`], [`watched`]), this router's finalizer ([`finalizer`]), what it
//! tells Services: events and its condition ([`report`]), and the DNS targets it writes
//! ([`dns`]). Every write names this daemon as its field manager ([`FIELD_MANAGER`]), so
//! `metadata.managedFields` tells the router's fields from everyone else's.

pub mod client;
pub mod dns;
pub mod finalizer;
pub mod lane;
pub mod report;
pub mod watch;
pub mod watched;

use kube::Api;
use kube::api::PatchParams;
use kube::runtime::events::{Recorder, Reporter};

use watched::WatchedService;

/// Services by namespace and name.
pub type Key = (String, String);

/// The manager of every field this daemon writes: the `fieldManager` of its patches, and the
/// first word of its User-Agent, which names the manager of the writes that cannot carry one
/// (kube-runtime's event recorder posts with default parameters).
pub const FIELD_MANAGER: &str = "kube-port-forward";

/// Patch parameters naming this daemon as the field manager.
pub fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

/// This router's account on the cluster: who it is in events, which finalizer and which
/// condition type are its own.
pub struct Cluster {
    client: kube::Client,
    recorder: Recorder,
    finalizer: String,
    condition_type: String,
    instance: String,
}

impl Cluster {
    pub fn new(
        client: kube::Client,
        finalizer: String,
        condition_type: String,
        instance: String,
    ) -> Cluster {
        let reporter = Reporter {
            controller: "kube-port-forward-controller".into(),
            instance: Some(instance.clone()),
        };
        Cluster {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            finalizer,
            condition_type,
            instance,
        }
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    pub fn finalizer(&self) -> &str {
        &self.finalizer
    }

    /// This router's name in events and conditions.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn api(&self, namespace: &str) -> Api<WatchedService> {
        Api::namespaced(self.client.clone(), namespace)
    }
}
