//! One watch of a resource shared by every consumer in the process
//! (upstream's shared informers).
//!
//! In `skiff-control all` the scheduler and the ReplicaSet controller each
//! watched every pod and decoded every pod change for themselves: at scale,
//! decoding the same pod twice was the largest single cost of the control
//! plane. A [`SharedWatch`] runs one watch, decodes each change once, keeps
//! the objects it has seen, and hands every subscriber the same
//! `Arc`-shared objects, in the order the watch saw them.
//!
//! The watch starts with the first subscriber (a standby replica, which
//! subscribes only once it leads, watches nothing) and runs until the
//! process's shutdown. A subscriber that joins after the first list gets
//! the objects known then as one [`Change::Resynced`], then every later
//! change; one that leaves (its receiver dropped, e.g. on losing a Lease)
//! is forgotten. Each subscriber has its own unbounded queue, as upstream's
//! informer listeners do, so a slow consumer never holds up the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::watch::{self, Change, key_of};

/// One watch of every `K` in the cluster, fanned out to subscribers.
pub struct SharedWatch<K> {
    client: kube::Client,
    shutdown: CancellationToken,
    state: Arc<Mutex<State<K>>>,
}

/// What the watch knows, and who listens.
struct State<K> {
    /// Whether the watch task runs.
    started: bool,
    /// Whether the first complete list has been seen (and its watchers).
    synced: bool,
    synced_tx: tokio::sync::watch::Sender<bool>,
    /// Every object by `namespace/name`, as last seen.
    objects: HashMap<String, Arc<K>>,
    /// The subscribers' queues.
    subscribers: Vec<mpsc::UnboundedSender<Change<Arc<K>>>>,
}

impl<K> State<K> {
    /// Record `change` and hand it to every subscriber still listening.
    fn publish(&mut self, change: Change<Arc<K>>)
    where
        K: kube::Resource,
    {
        match &change {
            Change::Applied(object) => {
                self.objects.insert(key_of(object.meta()), object.clone());
            }
            Change::Deleted(object) => {
                self.objects.remove(&key_of(object.meta()));
            }
            Change::Resynced(list) => {
                self.objects = list
                    .iter()
                    .map(|object| (key_of(object.meta()), object.clone()))
                    .collect();
                self.synced = true;
                self.synced_tx.send_replace(true);
            }
        }
        self.subscribers
            .retain(|subscriber| subscriber.send(change.clone()).is_ok());
    }
}

impl<K> State<K> {
    /// A new subscriber's queue, holding the objects known now if the first
    /// list is done.
    fn subscribe(&mut self) -> mpsc::UnboundedReceiver<Change<Arc<K>>> {
        let (tx, rx) = mpsc::unbounded_channel();
        if self.synced {
            let known = self.objects.values().cloned().collect();
            // The receiver is in hand: this cannot fail.
            let _ = tx.send(Change::Resynced(known));
        }
        self.subscribers.push(tx);
        rx
    }
}

impl<K> Clone for Change<Arc<K>> {
    fn clone(&self) -> Self {
        match self {
            Change::Applied(object) => Change::Applied(object.clone()),
            Change::Deleted(object) => Change::Deleted(object.clone()),
            Change::Resynced(list) => Change::Resynced(list.clone()),
        }
    }
}

impl<K> SharedWatch<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    /// A shared watch over `client`, which stops at `shutdown` once started.
    pub fn new(client: kube::Client, shutdown: CancellationToken) -> Arc<SharedWatch<K>> {
        Arc::new(SharedWatch {
            client,
            shutdown,
            state: Arc::new(Mutex::new(State {
                started: false,
                synced: false,
                synced_tx: tokio::sync::watch::Sender::new(false),
                objects: HashMap::new(),
                subscribers: Vec::new(),
            })),
        })
    }

    fn state(&self) -> MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A queue of every change from now on, starting with the objects known
    /// now (as one [`Change::Resynced`]) if the first list is done; starts
    /// the watch if it is not running.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Change<Arc<K>>> {
        let mut state = self.state();
        let rx = state.subscribe();
        if !state.started {
            state.started = true;
            let shared = self.state.clone();
            tokio::spawn(watch::watch_changes::<K, _>(
                self.client.clone(),
                self.shutdown.clone(),
                move |change| {
                    let change = match change {
                        Change::Applied(object) => Change::Applied(Arc::new(object)),
                        Change::Deleted(object) => Change::Deleted(Arc::new(object)),
                        Change::Resynced(list) => {
                            Change::Resynced(list.into_iter().map(Arc::new).collect())
                        }
                    };
                    shared
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .publish(change);
                },
            ));
        }
        rx
    }

    /// The objects known now; empty before the first list is done.
    pub fn snapshot(&self) -> Vec<Arc<K>> {
        self.state().objects.values().cloned().collect()
    }

    /// Keep the watch running until `shutdown`, for a consumer that reads
    /// [`snapshot`](Self::snapshot)s rather than changes.
    pub async fn hold(&self, shutdown: CancellationToken) {
        self.watch(shutdown, |_| {}).await;
    }

    /// Wait until the first list is done (forever if nobody subscribes).
    pub async fn synced(&self) {
        let mut synced = self.state().synced_tx.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = synced.wait_for(|synced| *synced).await;
    }

    /// Every object touched from now on (applied, deleted, or listed again,
    /// starting with those known now): a trigger stream for
    /// `kube::runtime::Controller::watches_shared_stream`, which only needs
    /// to know what changed.
    pub fn touched(&self) -> impl futures::Stream<Item = Arc<K>> + Send + 'static {
        use futures::StreamExt;
        let changes = self.subscribe();
        futures::stream::unfold(changes, |mut changes| async move {
            let change = changes.recv().await?;
            let objects = match change {
                Change::Applied(object) | Change::Deleted(object) => vec![object],
                Change::Resynced(list) => list,
            };
            Some((futures::stream::iter(objects), changes))
        })
        .flatten()
    }

    /// Hand every change to `handle` until `shutdown` (or the process's):
    /// the drop-in for [`watch::watch_changes`] on a shared watch.
    pub async fn watch<F>(&self, shutdown: CancellationToken, mut handle: F)
    where
        F: FnMut(Change<Arc<K>>),
    {
        let mut changes = self.subscribe();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                next = changes.recv() => match next {
                    Some(change) => handle(change),
                    None => return,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn cm(name: &str, value: &str) -> Arc<ConfigMap> {
        Arc::new(ConfigMap {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some([("v".to_string(), value.to_string())].into()),
            ..ConfigMap::default()
        })
    }

    fn names(change: &Change<Arc<ConfigMap>>) -> (&'static str, Vec<String>) {
        let name = |o: &Arc<ConfigMap>| {
            format!(
                "{}={}",
                o.metadata.name.as_deref().unwrap_or_default(),
                o.data.as_ref().and_then(|d| d.get("v")).map_or("", |v| v)
            )
        };
        match change {
            Change::Applied(o) => ("applied", vec![name(o)]),
            Change::Deleted(o) => ("deleted", vec![name(o)]),
            Change::Resynced(list) => {
                let mut all: Vec<String> = list.iter().map(name).collect();
                all.sort();
                ("resynced", all)
            }
        }
    }

    fn drain(
        rx: &mut mpsc::UnboundedReceiver<Change<Arc<ConfigMap>>>,
    ) -> Vec<(&'static str, Vec<String>)> {
        let mut out = Vec::new();
        while let Ok(change) = rx.try_recv() {
            out.push(names(&change));
        }
        out
    }

    #[test]
    fn subscribers_see_every_change_and_late_ones_start_from_what_is_known() {
        let mut state = State {
            started: true,
            synced: false,
            synced_tx: tokio::sync::watch::Sender::new(false),
            objects: HashMap::new(),
            subscribers: Vec::new(),
        };
        let mut early = state.subscribe();
        assert!(
            drain(&mut early).is_empty(),
            "nothing is known before the first list"
        );
        state.publish(Change::Resynced(vec![cm("a", "1"), cm("b", "1")]));
        state.publish(Change::Applied(cm("a", "2")));
        state.publish(Change::Deleted(cm("b", "1")));
        state.publish(Change::Applied(cm("c", "1")));
        assert_eq!(
            drain(&mut early),
            vec![
                ("resynced", vec!["a=1".into(), "b=1".into()]),
                ("applied", vec!["a=2".into()]),
                ("deleted", vec!["b=1".into()]),
                ("applied", vec!["c=1".into()]),
            ],
            "an early subscriber sees the list, then every change in order"
        );
        let mut known: Vec<String> = state
            .objects
            .values()
            .map(|o| names(&Change::Applied(o.clone())).1.remove(0))
            .collect();
        known.sort();
        assert_eq!(known, vec!["a=2", "c=1"], "the state follows the changes");

        // A late subscriber starts from what is known; one that left is
        // forgotten while the others still hear.
        let mut late = state.subscribe();
        drop(early);
        state.publish(Change::Applied(cm("d", "1")));
        assert_eq!(state.subscribers.len(), 1, "a dropped receiver is removed");
        assert_eq!(
            drain(&mut late),
            vec![
                ("resynced", vec!["a=2".into(), "c=1".into()]),
                ("applied", vec!["d=1".into()]),
            ]
        );
    }
}
