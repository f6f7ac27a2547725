//! Which namespaces exist and which are terminating, kept from an etcd
//! watch, so that creating an object need not read its namespace from etcd
//! first (upstream's NamespaceLifecycle admission uses an informer the same
//! way). The cache only ever answers "exists and active"; anything else
//! (unknown, terminating, not yet synced) falls back to an etcd read.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::meta;
use crate::storage::{ChangeKind, Store, WatchItem};
use skiff_common::registry;

/// Namespace name → whether it is terminating; `None` while not synced.
#[derive(Default)]
pub struct NamespaceCache {
    state: RwLock<Option<HashMap<String, bool>>>,
}

impl NamespaceCache {
    /// Start keeping the cache from `store` until `shutdown`.
    pub fn spawn(store: Store, shutdown: CancellationToken) -> Arc<NamespaceCache> {
        let cache = Arc::new(NamespaceCache::default());
        let keeper = cache.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = keeper.keep(store) => {}
            }
        });
        cache
    }

    /// Whether `name` is known to exist and not be terminating.
    pub fn is_active(&self, name: &str) -> bool {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .as_ref()
            .and_then(|m| m.get(name))
            .is_some_and(|terminating| !terminating)
    }

    fn set(&self, state: Option<HashMap<String, bool>>) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = state;
    }

    fn apply(&self, name: String, terminating: Option<bool>) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if let Some(map) = state.as_mut() {
            match terminating {
                Some(t) => map.insert(name, t),
                None => map.remove(&name),
            };
        }
    }

    async fn keep(&self, store: Store) {
        let info = registry::find("", "v1", "namespaces").expect("namespaces are served");
        let prefix = info.key_prefix();
        loop {
            if let Ok((items, revision)) = store.list(&prefix).await
                && let Ok(mut changes) = store.watch(&prefix, revision).await
            {
                let map = items.iter().filter_map(|s| entry(&s.value)).collect();
                self.set(Some(map));
                while let Some(Ok(item)) = changes.next().await {
                    if let WatchItem::Change(change) = item
                        && let Some((name, terminating)) = entry(change.object())
                    {
                        let gone = change.kind == ChangeKind::Deleted;
                        self.apply(name, (!gone).then_some(terminating));
                    }
                }
            }
            // Out of sync: answer nothing from the cache until re-listed.
            self.set(None);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn entry(namespace: &Value) -> Option<(String, bool)> {
    Some((
        meta::name(namespace)?.to_string(),
        meta::is_deleting(namespace),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_known_active_namespaces_are_answered() {
        let cache = NamespaceCache::default();
        assert!(!cache.is_active("default"), "not synced answers nothing");
        cache.set(Some(HashMap::new()));
        cache.apply("default".into(), Some(false));
        cache.apply("old".into(), Some(true));
        assert!(cache.is_active("default"));
        assert!(!cache.is_active("old"), "terminating is checked in etcd");
        assert!(!cache.is_active("missing"));
        cache.apply("default".into(), None);
        assert!(!cache.is_active("default"));
        let terminating =
            json!({"metadata": {"name": "x", "deletionTimestamp": "2026-01-01T00:00:00Z"}});
        assert_eq!(entry(&terminating), Some(("x".to_string(), true)));
    }
}
