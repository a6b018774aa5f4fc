//! The watches the daemon follows: Services in each scope (every namespace, or each one
//! named), and, when the policy selects namespaces by label, Namespaces' metadata.

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use super::watched::{WatchedNode, WatchedService};
use crate::core::policy::LabelSelector;

/// What the watches deliver.
pub enum Input {
    /// An event of the Service watch of scope `.0`.
    Services(usize, Box<Result<Event<WatchedService>, watcher::Error>>),
    Namespaces(Box<Result<Event<PartialObjectMeta<Namespace>>, watcher::Error>>),
    Nodes(Box<Result<Event<WatchedNode>, watcher::Error>>),
}

/// One Service watch per scope (`None`: every namespace), each retried with backoff; with a
/// namespace selector, a metadata-only watch of the Namespaces it selects; with node ports
/// on, a watch of the Nodes.
pub fn streams(
    client: &kube::Client,
    scopes: &[Option<String>],
    selector: Option<&str>,
    namespace_selector: Option<&LabelSelector>,
    nodes: bool,
) -> BoxStream<'static, Input> {
    let mut streams: Vec<BoxStream<'static, Input>> = scopes
        .iter()
        .enumerate()
        .map(|(index, scope)| {
            let api: Api<WatchedService> = match scope {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let mut config = watcher::Config::default();
            if let Some(selector) = selector {
                config = config.labels(selector);
            }
            watcher::watcher(api, config)
                .default_backoff()
                .map(move |event| Input::Services(index, Box::new(event)))
                .boxed()
        })
        .collect();
    if let Some(selector) = namespace_selector {
        // Metadata only: labels are all the selector needs.
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        let config = watcher::Config::default().labels(selector.as_str());
        streams.push(
            watcher::watcher(api, config)
                .default_backoff()
                .map(|event| Input::Namespaces(Box::new(event)))
                .boxed(),
        );
    }
    if nodes {
        let api: Api<WatchedNode> = Api::all(client.clone());
        streams.push(
            watcher::watcher(api, watcher::Config::default())
                .default_backoff()
                .map(|event| Input::Nodes(Box::new(event)))
                .boxed(),
        );
    }
    futures::stream::select_all(streams).boxed()
}
