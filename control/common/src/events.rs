//! Core `v1` Events, as `kubectl describe` lists them (by
//! `involvedObject.*` field selectors): one recorder per component, with
//! upstream's aggregation of repeats into `count`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

/// Normal or Warning, as upstream's event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Routine.
    Normal,
    /// Something went wrong.
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// An event already written: (object uid, reason, message).
type EventKey = (String, String, String);

/// Where that event lives and how often it was seen: (namespace, name, count).
type EventSeen = (String, String, i32);

/// Writes Events for one component (e.g. `default-scheduler`).
pub struct EventRecorder {
    client: kube::Client,
    component: String,
    /// Events already written.
    seen: Mutex<HashMap<EventKey, EventSeen>>,
}

impl EventRecorder {
    /// A recorder writing as `component`.
    pub fn new(client: kube::Client, component: &str) -> EventRecorder {
        EventRecorder {
            client,
            component: component.to_string(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Record an event about `object`. A repeat of the same reason and
    /// message bumps `count` and `lastTimestamp` of the first event instead
    /// of writing a new one. Failures are logged, never returned: an event
    /// is never worth failing a reconcile for.
    pub async fn record(
        &self,
        object: &ObjectReference,
        kind: EventType,
        reason: &str,
        message: &str,
    ) {
        let namespace = object
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let key = (
            object.uid.clone().unwrap_or_default(),
            reason.to_string(),
            message.to_string(),
        );
        let now = jiff::Timestamp::now();
        let repeat = {
            let seen = self.seen.lock().expect("event cache lock");
            seen.get(&key).cloned()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        if let Some((ns, name, count)) = repeat {
            let patch = json!({"count": count + 1, "lastTimestamp": Time(now)});
            let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
            if api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .is_ok()
            {
                self.seen
                    .lock()
                    .expect("event cache lock")
                    .insert(key, (ns, name, count + 1));
                return;
            }
        }
        let object_name = object.name.clone().unwrap_or_default();
        let event = Event {
            metadata: ObjectMeta {
                // client-go's event names: the object's name and the time
                // in hexadecimal nanoseconds.
                name: Some(format!("{object_name}.{:x}", now.as_nanosecond())),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: object.clone(),
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            type_: Some(kind.as_str().to_string()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: None,
            }),
            reporting_component: Some(self.component.clone()),
            reporting_instance: Some(self.component.clone()),
            action: Some(reason.to_string()),
            ..Event::default()
        };
        match api.create(&PostParams::default(), &event).await {
            Ok(created) => {
                let name = created.metadata.name.unwrap_or_default();
                let mut seen = self.seen.lock().expect("event cache lock");
                if seen.len() > 4096 {
                    seen.clear();
                }
                seen.insert(key, (namespace, name, 1));
            }
            Err(error) => {
                tracing::warn!(error = %crate::error::chain(&error), reason, "cannot record event")
            }
        }
    }
}

/// An `ObjectReference` to a namespaced or cluster-scoped object.
pub fn reference(api_version: &str, kind: &str, meta: &ObjectMeta) -> ObjectReference {
    ObjectReference {
        api_version: Some(api_version.to_string()),
        kind: Some(kind.to_string()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        field_path: None,
    }
}

/// Upstream's event spam filter: per object, a burst of 25 events, then one
/// every five minutes.
#[derive(Debug, Default)]
pub struct EventLimiter {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl EventLimiter {
    /// A limiter with full buckets.
    pub fn new() -> EventLimiter {
        EventLimiter::default()
    }

    /// Whether an event about object `uid` may be written now.
    pub fn allow(&self, uid: &str) -> bool {
        const BURST: f64 = 25.0;
        const REFILL_PER_SEC: f64 = 1.0 / 300.0;
        let mut buckets = self.buckets.lock().expect("limiter lock");
        if buckets.len() > 10_000 {
            buckets.retain(|_, (tokens, _)| *tokens < BURST - 1.0);
        }
        let now = Instant::now();
        let (tokens, last) = buckets.entry(uid.to_string()).or_insert((BURST, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * REFILL_PER_SEC).min(BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_a_burst() {
        let l = EventLimiter::new();
        let allowed = (0..30).filter(|_| l.allow("uid")).count();
        assert_eq!(allowed, 25);
        assert!(l.allow("other"));
    }
}
