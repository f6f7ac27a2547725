//! Watching every object of a kind: the changes a watch reports, and the
//! `namespace/name` keys that caches and work queues use.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::trimmed::Trimmed;

/// A change seen by [`watch_changes`].
#[derive(Debug)]
pub enum Change<K> {
    /// Created or modified.
    Applied(K),
    /// Deleted.
    Deleted(K),
    /// A complete (re)list: every object that exists now.
    Resynced(Vec<K>),
}

/// Watch every `K` in the cluster until `shutdown`, handing every change to
/// `handle`; a (re)list is handed over whole, after it completes. Errors are
/// retried with backoff. Objects come without `managedFields`
/// ([`Trimmed`]), as upstream's informers keep them.
pub async fn watch_changes<K, F>(
    client: kube::Client,
    shutdown: tokio_util::sync::CancellationToken,
    mut handle: F,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
    F: FnMut(Change<K>),
{
    let api: kube::Api<Trimmed<K>> = kube::Api::all(client);
    watch_api(api, shutdown, |change| {
        handle(match change {
            Change::Applied(object) => Change::Applied(object.0),
            Change::Deleted(object) => Change::Deleted(object.0),
            Change::Resynced(objects) => {
                Change::Resynced(objects.into_iter().map(|o| o.0).collect())
            }
        })
    })
    .await;
}

/// Watch what `api` names until `shutdown`, as [`watch_changes`] does, for
/// any resource type, dynamic ones included (the garbage collector's
/// metadata-only watches of every served kind).
pub async fn watch_api<K, F>(
    api: kube::Api<K>,
    shutdown: tokio_util::sync::CancellationToken,
    mut handle: F,
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    F: FnMut(Change<K>),
{
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    use kube::runtime::watcher::{self, Event};
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut buffer = Vec::new();
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            next = stream.next() => next,
        };
        match next {
            None => return,
            Some(Err(error)) => {
                tracing::debug!(error = %crate::error::chain(&error), "watch failed, retrying")
            }
            Some(Ok(Event::Init)) => buffer.clear(),
            Some(Ok(Event::InitApply(object))) => buffer.push(object),
            Some(Ok(Event::InitDone)) => handle(Change::Resynced(std::mem::take(&mut buffer))),
            Some(Ok(Event::Apply(object))) => handle(Change::Applied(object)),
            Some(Ok(Event::Delete(object))) => handle(Change::Deleted(object)),
        }
    }
}

/// Drive a reflector's watch stream (kube-runtime's `reflect`, which fills
/// a `Store` as a side effect) until `shutdown` or its end.
pub async fn reflect<S: futures::Stream + Send + 'static>(
    stream: S,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use futures::StreamExt;
    let mut stream = std::pin::pin!(stream);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            item = stream.next() => if item.is_none() { return },
        }
    }
}

/// `namespace/name`.
pub fn key_of(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// Split `namespace/name`.
pub fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}
