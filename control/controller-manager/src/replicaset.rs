//! The ReplicaSet controller, as upstream's `pkg/controller/replicaset`:
//! keeps `spec.replicas` active pods that match the selector and carry the
//! ReplicaSet as their controller owner. It adopts matching orphans,
//! releases owned pods that stopped matching, creates missing pods from the
//! template in slow-start batches (1, 2, 4, … up to 500 per sync) and
//! deletes surplus ones by upstream's ranking (unscheduled, pending, not
//! ready, … newest first). Expectations keep it from creating or deleting
//! twice while its pod watch lags. Status: replicas, fullyLabeledReplicas,
//! readyReplicas, availableReplicas (after `minReadySeconds`),
//! observedGeneration and the ReplicaFailure condition.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetCondition, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Context;
use skiff_common::error::api_code;
use skiff_common::events::{EventLimiter, EventType, reference};
use skiff_common::watch::{Change, key_of};
use skiff_common::workqueue::WorkQueue;

use super::expectations::Expectations;
use super::pods::{self, WorkloadError, controller_of};

/// Most pods created or deleted in one sync (upstream's `BurstReplicas`).
pub const BURST_REPLICAS: usize = 500;

/// Concurrent syncs of different ReplicaSets (upstream's
/// `--concurrent-replicaset-syncs`).
const WORKERS: usize = 5;

/// How long changes to a set's pods that can only change its status are
/// gathered into one sync. A sync goes over every pod of the set, and while
/// a 1,000-pod set's pods are scheduled and start, they change hundreds of
/// times a second: syncing on each change spent more CPU than scheduling
/// them. Creations that complete the set's expectations, deletions, and
/// changes of ownership or labels are synced at once.
const STATUS_BATCH: Duration = Duration::from_millis(100);

/// One namespace's pods, indexed as upstream's informer indexes them
/// (`controllerUIDIndex`), so that a sync looks only at the pods its
/// ReplicaSet may claim instead of the whole namespace.
#[derive(Default)]
struct NamespacePods {
    /// name → pod.
    all: HashMap<String, Arc<Pod>>,
    /// controller uid → its pods by name. The pods themselves, not their
    /// names: a sync walks a set's every pod, and a second lookup per pod
    /// in `all` was most of the sync's time for 1,000-pod sets.
    by_controller: HashMap<String, HashMap<String, Arc<Pod>>>,
    /// The pods without a controller (candidates for adoption), by name.
    orphans: HashMap<String, Arc<Pod>>,
}

impl NamespacePods {
    /// Store `pod` under `name`; returns the pod it replaces.
    fn insert(&mut self, name: String, pod: Arc<Pod>) -> Option<Arc<Pod>> {
        let old = self.remove(&name);
        match controller_of(&pod.metadata) {
            Some(owner) => {
                self.by_controller
                    .entry(owner.uid.clone())
                    .or_default()
                    .insert(name.clone(), pod.clone());
            }
            None => {
                self.orphans.insert(name.clone(), pod.clone());
            }
        }
        self.all.insert(name, pod);
        old
    }

    /// Forget the pod named `name`; returns it.
    fn remove(&mut self, name: &str) -> Option<Arc<Pod>> {
        let old = self.all.remove(name)?;
        match controller_of(&old.metadata) {
            Some(owner) => {
                if let Some(pods) = self.by_controller.get_mut(&owner.uid) {
                    pods.remove(name);
                    if pods.is_empty() {
                        self.by_controller.remove(&owner.uid);
                    }
                }
            }
            None => {
                self.orphans.remove(name);
            }
        }
        Some(old)
    }

    /// The pods controlled by any of `owners`.
    fn controlled_by<'a>(&'a self, owners: impl IntoIterator<Item = &'a str>) -> Vec<Arc<Pod>> {
        owners
            .into_iter()
            .filter_map(|uid| self.by_controller.get(uid))
            .flat_map(HashMap::values)
            .cloned()
            .collect()
    }

    /// The pods without a controller.
    fn orphans(&self) -> Vec<Arc<Pod>> {
        self.orphans.values().cloned().collect()
    }
}

/// What the controller knows from its watches.
#[derive(Default)]
struct Cache {
    /// namespace → its pods.
    pods: RwLock<HashMap<String, NamespacePods>>,
    /// `namespace/name` → ReplicaSet.
    sets: RwLock<HashMap<String, Arc<ReplicaSet>>>,
}

/// The controller's state.
struct Controller {
    ctx: Arc<Context>,
    cache: Cache,
    expectations: Expectations,
    queue: Arc<WorkQueue>,
    limiter: EventLimiter,
    pods_synced: AtomicBool,
    sets_synced: AtomicBool,
}

/// Run the ReplicaSet controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let controller = Arc::new(Controller {
        ctx: ctx.clone(),
        cache: Cache::default(),
        expectations: Expectations::new(),
        queue: Arc::new(WorkQueue::new()),
        limiter: EventLimiter::new(),
        pods_synced: AtomicBool::new(false),
        sets_synced: AtomicBool::new(false),
    });
    let mut tasks = tokio::task::JoinSet::new();
    {
        let c = controller.clone();
        let shared = ctx.pods.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            shared
                .watch(shutdown, move |change| c.pod_changed(change))
                .await;
        });
    }
    {
        let c = controller.clone();
        tasks.spawn(skiff_common::watch::watch_changes::<ReplicaSet, _>(
            ctx.client.clone(),
            shutdown.clone(),
            move |change| c.set_changed(change),
        ));
    }
    for _ in 0..WORKERS {
        let c = controller.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move { c.work(shutdown).await });
    }
    shutdown.cancelled().await;
    while tasks.join_next().await.is_some() {}
}

impl Controller {
    /// Process queued keys until `shutdown`, once both caches are filled.
    async fn work(self: Arc<Self>, shutdown: CancellationToken) {
        let synced =
            || self.pods_synced.load(Ordering::Acquire) && self.sets_synced.load(Ordering::Acquire);
        self.queue
            .run_worker("replicaset", synced, &shutdown, |key| {
                let this = self.clone();
                async move { this.sync(&key).await }
            })
            .await;
    }

    /// The ReplicaSet key a pod belongs to, if its controller is one.
    fn owner_key(pod: &Pod) -> Option<String> {
        let owner = controller_of(&pod.metadata)?;
        (owner.kind == "ReplicaSet").then(|| {
            format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                owner.name
            )
        })
    }

    /// Queue every ReplicaSet of the pod's namespace that selects it (for
    /// orphans, which may be adopted).
    fn queue_selecting(&self, pod: &Pod) {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let sets = self.cache.sets.read().expect("cache lock");
        for (key, rs) in sets.iter() {
            if rs.metadata.namespace.as_deref() == Some(namespace)
                && skiff_common::labels::selector_matches(
                    &rs.spec.selector,
                    pod.metadata.labels.as_ref(),
                )
            {
                self.queue.add(key);
            }
        }
    }

    /// A pod was created or changed.
    fn pod_applied(&self, pod: Arc<Pod>) {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let old = self
            .cache
            .pods
            .write()
            .expect("cache lock")
            .entry(namespace)
            .or_default()
            .insert(name, pod.clone());
        let old = old.filter(|o| o.metadata.uid == pod.metadata.uid);
        let key = Self::owner_key(&pod);
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        // Whether the change can only change the set's status: then it
        // waits for the batch.
        let mut status_only = false;
        match &old {
            None => {
                if let Some(key) = &key {
                    if pod.metadata.deletion_timestamp.is_some() {
                        self.expectations.deletion_observed(key, uid);
                    } else {
                        self.expectations.creation_observed(key);
                        // Until the last expected creation is seen, a sync
                        // would only count pods.
                        status_only = !self.expectations.satisfied(key);
                    }
                }
            }
            Some(old) => {
                if old.metadata.deletion_timestamp.is_none()
                    && pod.metadata.deletion_timestamp.is_some()
                    && let Some(key) = &key
                {
                    self.expectations.deletion_observed(key, uid);
                }
                let old_key = Self::owner_key(old);
                if old_key != key
                    && let Some(old_key) = &old_key
                {
                    self.queue.add(old_key);
                }
                let same_owner_and_labels = old.metadata.labels == pod.metadata.labels
                    && old_key == key
                    && old.metadata.deletion_timestamp == pod.metadata.deletion_timestamp;
                if same_owner_and_labels
                    && old.status == pod.status
                    && old.spec.as_ref().and_then(|s| s.node_name.as_ref())
                        == pod.spec.as_ref().and_then(|s| s.node_name.as_ref())
                {
                    return;
                }
                // Its status or node changed: the set's counts may, and
                // if it just finished, its replacement is due at once.
                status_only =
                    same_owner_and_labels && pods::is_pod_active(old) == pods::is_pod_active(&pod);
            }
        }
        match key {
            Some(key) if status_only => self.queue.add_batched(&key, STATUS_BATCH),
            Some(key) => self.queue.add(&key),
            None => self.queue_selecting(&pod),
        }
    }

    /// A pod is gone.
    fn pod_deleted(&self, pod: &Pod) {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        if let Some(pods) = self
            .cache
            .pods
            .write()
            .expect("cache lock")
            .get_mut(namespace)
            && pods
                .all
                .get(name)
                .is_some_and(|p| p.metadata.uid == pod.metadata.uid)
        {
            pods.remove(name);
        }
        if let Some(key) = Self::owner_key(pod) {
            self.expectations
                .deletion_observed(&key, pod.metadata.uid.as_deref().unwrap_or_default());
            self.queue.add(&key);
        }
    }

    fn pod_changed(&self, change: Change<Arc<Pod>>) {
        match change {
            Change::Applied(pod) => self.pod_applied(pod),
            Change::Deleted(pod) => self.pod_deleted(&pod),
            Change::Resynced(list) => {
                let listed: HashSet<(String, String)> = list
                    .iter()
                    .map(|p| {
                        (
                            p.metadata.namespace.clone().unwrap_or_default(),
                            p.metadata.name.clone().unwrap_or_default(),
                        )
                    })
                    .collect();
                let gone: Vec<Arc<Pod>> = self
                    .cache
                    .pods
                    .read()
                    .expect("cache lock")
                    .iter()
                    .flat_map(|(ns, pods)| {
                        pods.all
                            .iter()
                            .filter(|(name, _)| !listed.contains(&(ns.clone(), (*name).clone())))
                            .map(|(_, p)| p.clone())
                    })
                    .collect();
                for pod in gone {
                    self.pod_deleted(&pod);
                }
                for pod in list {
                    self.pod_applied(pod);
                }
                self.pods_synced.store(true, Ordering::Release);
            }
        }
    }

    fn set_changed(&self, change: Change<ReplicaSet>) {
        match change {
            Change::Applied(rs) => {
                let key = key_of(&rs.metadata);
                self.cache
                    .sets
                    .write()
                    .expect("cache lock")
                    .insert(key.clone(), Arc::new(rs));
                self.queue.add(&key);
            }
            Change::Deleted(rs) => {
                let key = key_of(&rs.metadata);
                self.cache.sets.write().expect("cache lock").remove(&key);
                self.queue.add(&key);
            }
            Change::Resynced(list) => {
                let fresh: HashMap<String, Arc<ReplicaSet>> = list
                    .into_iter()
                    .map(|rs| (key_of(&rs.metadata), Arc::new(rs)))
                    .collect();
                let mut sets = self.cache.sets.write().expect("cache lock");
                for key in sets.keys().chain(fresh.keys()) {
                    self.queue.add(key);
                }
                *sets = fresh;
                drop(sets);
                self.sets_synced.store(true, Ordering::Release);
            }
        }
    }

    /// Reconcile one ReplicaSet; `Some(d)` asks to look again after `d`.
    async fn sync(&self, key: &str) -> Result<Option<Duration>, WorkloadError> {
        let Some(rs) = self
            .cache
            .sets
            .read()
            .expect("cache lock")
            .get(key)
            .cloned()
        else {
            self.expectations.forget(key);
            return Ok(None);
        };
        let needs_sync = self.expectations.satisfied(key);
        let namespace = rs.metadata.namespace.clone().unwrap_or_default();
        let spec = rs.spec.clone();
        let selector = skiff_common::labels::parse_selector(&spec.selector);
        let rs_uid = rs.metadata.uid.clone().unwrap_or_default();
        let deleting = rs.metadata.deletion_timestamp.is_some();
        // The pods this ReplicaSet may claim: those it controls and the
        // orphans; pods of other controllers are never touched.
        let candidates: Vec<Arc<Pod>> = self
            .cache
            .pods
            .read()
            .expect("cache lock")
            .get(&namespace)
            .map(|pods| {
                let mut candidates = pods.controlled_by([rs_uid.as_str()]);
                candidates.extend(pods.orphans());
                candidates
            })
            .unwrap_or_default();

        // Claim: keep owned matching pods, adopt matching orphans, release
        // owned pods that no longer match.
        let mut owned: Vec<Arc<Pod>> = Vec::new();
        for pod in candidates.iter().filter(|p| pods::is_pod_active(p)) {
            let matches = skiff_common::labels::parsed_matches(
                selector.as_ref(),
                pod.metadata.labels.as_ref(),
            );
            match controller_of(&pod.metadata) {
                Some(owner) if owner.uid == rs_uid => {
                    if matches {
                        owned.push(pod.clone());
                    } else if !deleting {
                        self.release(pod).await?;
                    }
                }
                Some(_) => {}
                None => {
                    if matches
                        && !deleting
                        && let Some(adopted) = self.adopt(&rs, pod).await?
                    {
                        owned.push(Arc::new(adopted));
                    }
                }
            }
        }

        let mut failure = None;
        if needs_sync && !deleting {
            let related: Vec<Arc<Pod>> = self.related_pods(&rs, &namespace);
            if let Err(error) = self.manage(&rs, key, &owned, &related).await {
                failure = Some(error);
            }
        }

        let now = jiff::Timestamp::now();
        let min_ready = spec.min_ready_seconds.unwrap_or(0);
        let owned_refs: Vec<&Pod> = owned.iter().map(|p| p.as_ref()).collect();
        let status = calculate_status(
            &rs,
            &owned_refs,
            failure.as_ref().map(|(reason, e)| (*reason, e)),
            now,
        );
        if Some(&status) != rs.status.as_ref() {
            self.write_status(&rs, &status).await?;
        }
        if let Some((_, error)) = failure {
            return Err(error);
        }
        // Look again when a ready pod becomes available.
        if min_ready > 0 {
            let next = owned
                .iter()
                .filter(|p| !pods::is_pod_available(p, min_ready, now))
                .filter_map(|p| pods::available_at(p, min_ready))
                .min();
            if let Some(at) = next {
                let wait = at.duration_since(now).unsigned_abs() + Duration::from_millis(500);
                return Ok(Some(wait.min(Duration::from_secs(3600))));
            }
        }
        Ok(None)
    }

    /// Active pods of this ReplicaSet and of its siblings (same controller),
    /// to rank pods by how crowded their node is.
    fn related_pods(&self, rs: &ReplicaSet, namespace: &str) -> Vec<Arc<Pod>> {
        let mut owners: HashSet<String> = HashSet::new();
        owners.insert(rs.metadata.uid.clone().unwrap_or_default());
        if let Some(parent) = controller_of(&rs.metadata) {
            let sets = self.cache.sets.read().expect("cache lock");
            for sibling in sets.values() {
                if controller_of(&sibling.metadata).is_some_and(|r| r.uid == parent.uid) {
                    owners.insert(sibling.metadata.uid.clone().unwrap_or_default());
                }
            }
        }
        let mut related = self
            .cache
            .pods
            .read()
            .expect("cache lock")
            .get(namespace)
            .map(|pods| pods.controlled_by(owners.iter().map(String::as_str)))
            .unwrap_or_default();
        related.retain(|p| pods::is_pod_active(p));
        related
    }

    /// Create or delete pods toward `spec.replicas`.
    async fn manage(
        &self,
        rs: &ReplicaSet,
        key: &str,
        owned: &[Arc<Pod>],
        related: &[Arc<Pod>],
    ) -> Result<(), (&'static str, WorkloadError)> {
        let spec = rs.spec.clone();
        let want = usize::try_from(spec.replicas.unwrap_or(1).max(0)).unwrap_or(0);
        let namespace = rs.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let object = reference("apps/v1", "ReplicaSet", &rs.metadata);
        let rs_uid = rs.metadata.uid.clone().unwrap_or_default();
        match plan(owned.len(), want) {
            Plan::Nothing => Ok(()),
            Plan::Create(count) => {
                let Some(template) = spec.template.as_ref() else {
                    return Ok(());
                };
                let owner = pods::controller_reference("apps/v1", "ReplicaSet", &rs.metadata);
                let pod = pods::pod_from_template(template, &namespace, owner);
                self.expectations.expect_creations(key, count);
                let created = std::sync::Mutex::new(Vec::new());
                let (successes, error) = pods::slow_start_batch(count, 1, || {
                    let api = api.clone();
                    let pod = pod.clone();
                    let created = &created;
                    async move {
                        match api.create(&PostParams::default(), &pod).await {
                            Ok(pod) => {
                                created
                                    .lock()
                                    .expect("created lock")
                                    .push(pod.metadata.name.unwrap_or_default());
                                Ok(())
                            }
                            Err(source) => Err(source),
                        }
                    }
                })
                .await;
                for _ in successes..count {
                    self.expectations.creation_observed(key);
                }
                for name in created.into_inner().expect("created lock") {
                    if self.limiter.allow(&rs_uid) {
                        self.record(
                            &object,
                            EventType::Normal,
                            "SuccessfulCreate",
                            format!("Created pod: {name}"),
                        );
                    }
                }
                match error {
                    None => Ok(()),
                    Some(source) => {
                        if self.limiter.allow(&rs_uid) {
                            self.record(
                                &object,
                                EventType::Warning,
                                "FailedCreate",
                                format!("Error creating: {source}"),
                            );
                        }
                        Err((
                            "FailedCreate",
                            WorkloadError::Api {
                                action: "create pod for",
                                object: key.to_string(),
                                source,
                            },
                        ))
                    }
                }
            }
            Plan::Delete(count) => {
                let candidates: Vec<&Pod> = owned.iter().map(|p| p.as_ref()).collect();
                let related: Vec<&Pod> = related.iter().map(|p| p.as_ref()).collect();
                let victims = pods::pods_to_delete(&candidates, &related, count);
                self.expectations.expect_deletions(
                    key,
                    victims
                        .iter()
                        .map(|p| p.metadata.uid.clone().unwrap_or_default()),
                );
                let results = futures::future::join_all(victims.iter().map(|pod| {
                    let api = api.clone();
                    async move {
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        (pod, api.delete(&name, &DeleteParams::default()).await)
                    }
                }))
                .await;
                let mut first_error = None;
                for (pod, result) in results {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    match result {
                        Ok(_) => {
                            if self.limiter.allow(&rs_uid) {
                                self.record(
                                    &object,
                                    EventType::Normal,
                                    "SuccessfulDelete",
                                    format!("Deleted pod: {name}"),
                                );
                            }
                        }
                        Err(source) => {
                            self.expectations.deletion_observed(
                                key,
                                pod.metadata.uid.as_deref().unwrap_or_default(),
                            );
                            if api_code(&source) != Some(404) && first_error.is_none() {
                                if self.limiter.allow(&rs_uid) {
                                    self.record(
                                        &object,
                                        EventType::Warning,
                                        "FailedDelete",
                                        format!("Error deleting: {source}"),
                                    );
                                }
                                first_error = Some(WorkloadError::Api {
                                    action: "delete pod",
                                    object: format!("{namespace}/{name}"),
                                    source,
                                });
                            }
                        }
                    }
                }
                first_error.map_or(Ok(()), |e| Err(("FailedDelete", e)))
            }
        }
    }

    /// Write an event without waiting for it.
    fn record(
        &self,
        object: &k8s_openapi::api::core::v1::ObjectReference,
        kind: EventType,
        reason: &'static str,
        message: String,
    ) {
        let ctx = self.ctx.clone();
        let object = object.clone();
        tokio::spawn(async move { ctx.events.record(&object, kind, reason, &message).await });
    }

    /// Make `rs` the controller of the orphan `pod`; `None` if the pod
    /// changed or vanished meanwhile (the next sync sees it again).
    async fn adopt(&self, rs: &ReplicaSet, pod: &Pod) -> Result<Option<Pod>, WorkloadError> {
        let mut refs = pod.metadata.owner_references.clone().unwrap_or_default();
        refs.push(pods::controller_reference(
            "apps/v1",
            "ReplicaSet",
            &rs.metadata,
        ));
        let patch = json!({"metadata": {
            "ownerReferences": refs,
            "resourceVersion": pod.metadata.resource_version,
        }});
        self.patch_pod(pod, &patch, "adopt pod").await
    }

    /// Drop `pod`'s owner reference to this ReplicaSet.
    async fn release(&self, pod: &Pod) -> Result<Option<Pod>, WorkloadError> {
        let refs: Vec<_> = pod
            .metadata
            .owner_references
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.controller != Some(true))
            .collect();
        let patch = json!({"metadata": {
            "ownerReferences": if refs.is_empty() { serde_json::Value::Null } else { json!(refs) },
            "resourceVersion": pod.metadata.resource_version,
        }});
        self.patch_pod(pod, &patch, "release pod").await
    }

    async fn patch_pod(
        &self,
        pod: &Pod,
        patch: &serde_json::Value,
        action: &'static str,
    ) -> Result<Option<Pod>, WorkloadError> {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), namespace);
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(pod) => Ok(Some(pod)),
            Err(source) if matches!(api_code(&source), Some(404) | Some(409)) => Ok(None),
            Err(source) => Err(WorkloadError::Api {
                action,
                object: format!("{namespace}/{name}"),
                source,
            }),
        }
    }

    async fn write_status(
        &self,
        rs: &ReplicaSet,
        status: &ReplicaSetStatus,
    ) -> Result<(), WorkloadError> {
        let namespace = rs.metadata.namespace.as_deref().unwrap_or_default();
        let name = rs.metadata.name.as_deref().unwrap_or_default();
        let api: Api<ReplicaSet> = Api::namespaced(self.ctx.client.clone(), namespace);
        let mut body = serde_json::to_value(status).unwrap_or_default();
        if let Some(map) = body.as_object_mut() {
            map.entry("conditions").or_insert(serde_json::Value::Null);
        }
        match api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": body})),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(source) if api_code(&source) == Some(404) => Ok(()),
            Err(source) => Err(WorkloadError::Api {
                action: "update status of replicaset",
                object: format!("{namespace}/{name}"),
                source,
            }),
        }
    }
}

/// What one sync does about the number of pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// The count is right.
    Nothing,
    /// Create this many pods.
    Create(usize),
    /// Delete this many pods.
    Delete(usize),
}

/// How to go from `active` pods to `want`, at most [`BURST_REPLICAS`] at a
/// time.
pub fn plan(active: usize, want: usize) -> Plan {
    use std::cmp::Ordering::*;
    match active.cmp(&want) {
        Equal => Plan::Nothing,
        Less => Plan::Create((want - active).min(BURST_REPLICAS)),
        Greater => Plan::Delete((active - want).min(BURST_REPLICAS)),
    }
}

/// The status a ReplicaSet should report for its `owned` active pods;
/// `failure` is the reason and error of a failed create or delete.
pub fn calculate_status(
    rs: &ReplicaSet,
    owned: &[&Pod],
    failure: Option<(&str, &WorkloadError)>,
    now: jiff::Timestamp,
) -> ReplicaSetStatus {
    let min_ready = rs.spec.min_ready_seconds.unwrap_or(0);
    let template_labels = rs
        .spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.as_ref());
    // One pass over the pods: this runs on every sync, over every pod of
    // the ReplicaSet.
    let (mut fully_labeled, mut ready, mut available) = (0usize, 0usize, 0usize);
    for pod in owned {
        let labels = pod.metadata.labels.as_ref();
        if template_labels.is_none_or(|want| {
            want.iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        }) {
            fully_labeled += 1;
        }
        if pods::is_pod_ready(pod) {
            ready += 1;
            if pods::is_pod_available(pod, min_ready, now) {
                available += 1;
            }
        }
    }
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let old = rs.status.clone().unwrap_or_default();
    let mut conditions: Vec<ReplicaSetCondition> = old.conditions.clone().unwrap_or_default();
    match failure {
        Some((reason, error)) => {
            let message = match error {
                WorkloadError::Api { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            let existing = conditions
                .iter_mut()
                .find(|c| c.type_.as_deref() == Some("ReplicaFailure"));
            match existing {
                Some(c)
                    if c.status.as_deref() == Some("True")
                        && c.reason.as_deref() == Some(reason) =>
                {
                    c.message = Some(message);
                }
                _ => {
                    conditions.retain(|c| c.type_.as_deref() != Some("ReplicaFailure"));
                    conditions.push(ReplicaSetCondition {
                        type_: Some("ReplicaFailure".into()),
                        status: Some("True".into()),
                        reason: Some(reason.to_string()),
                        message: Some(message),
                        last_transition_time: Some(Time(now)),
                    });
                }
            }
        }
        None => conditions.retain(|c| c.type_.as_deref() != Some("ReplicaFailure")),
    }
    ReplicaSetStatus {
        replicas: count(owned.len()),
        fully_labeled_replicas: Some(count(fully_labeled)),
        ready_replicas: Some(count(ready)),
        available_replicas: Some(count(available)),
        observed_generation: rs.metadata.generation,
        conditions: (!conditions.is_empty()).then_some(conditions),
        terminating_replicas: old.terminating_replicas,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::ReplicaSetSpec;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus, PodTemplateSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
    use std::collections::BTreeMap;

    fn rs(replicas: i32, min_ready: i32) -> ReplicaSet {
        let labels = BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            ("tier".to_string(), "fe".to_string()),
        ]);
        ReplicaSet {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("rs-uid".into()),
                generation: Some(3),
                ..ObjectMeta::default()
            },
            spec: ReplicaSetSpec {
                replicas: Some(replicas),
                min_ready_seconds: Some(min_ready),
                selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
                    ..LabelSelector::default()
                },
                template: Some(PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        ..ObjectMeta::default()
                    }),
                    spec: None,
                }),
            },
            status: None,
        }
    }

    fn pod(labels: &[(&str, &str)], ready_at: Option<i64>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some("Running".into()),
                conditions: ready_at.map(|at| {
                    vec![PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        last_transition_time: Some(Time(
                            jiff::Timestamp::from_second(at).expect("ts"),
                        )),
                        ..PodCondition::default()
                    }]
                }),
                ..PodStatus::default()
            }),
        }
    }

    fn owned(name: &str, owner: Option<&str>) -> Arc<Pod> {
        let mut meta = json!({"name": name, "namespace": "ns", "uid": format!("uid-{name}")});
        if let Some(owner) = owner {
            meta["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": owner,
                "uid": owner, "controller": true,
            }]);
        }
        Arc::new(serde_json::from_value(json!({"metadata": meta})).expect("pod json"))
    }

    fn names(pods: Vec<Arc<Pod>>) -> Vec<String> {
        let mut names: Vec<String> = pods
            .iter()
            .map(|p| p.metadata.name.clone().unwrap_or_default())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn namespace_pods_are_indexed_by_controller_and_orphans() {
        let mut pods = NamespacePods::default();
        pods.insert("a".into(), owned("a", Some("rs1")));
        pods.insert("b".into(), owned("b", Some("rs1")));
        pods.insert("c".into(), owned("c", Some("rs2")));
        pods.insert("d".into(), owned("d", None));
        assert_eq!(names(pods.controlled_by(["rs1"])), vec!["a", "b"]);
        assert_eq!(
            names(pods.controlled_by(["rs1", "rs2"])),
            vec!["a", "b", "c"]
        );
        assert_eq!(names(pods.orphans()), vec!["d"]);
        assert!(pods.controlled_by(["rs3"]).is_empty());

        // Released by rs1, then adopted by rs2: the index follows.
        let old = pods.insert("b".into(), owned("b", None));
        assert!(old.is_some(), "the replaced pod is returned");
        assert_eq!(names(pods.controlled_by(["rs1"])), vec!["a"]);
        assert_eq!(names(pods.orphans()), vec!["b", "d"]);
        pods.insert("b".into(), owned("b", Some("rs2")));
        assert_eq!(names(pods.controlled_by(["rs2"])), vec!["b", "c"]);
        assert_eq!(names(pods.orphans()), vec!["d"]);

        assert!(pods.remove("a").is_some());
        assert!(pods.remove("a").is_none(), "already gone");
        assert!(pods.controlled_by(["rs1"]).is_empty());
        assert!(
            !pods.by_controller.contains_key("rs1"),
            "empty sets are dropped"
        );
        pods.remove("d");
        assert!(pods.orphans().is_empty());
        assert_eq!(pods.all.len(), 2);
    }

    #[test]
    fn plans_are_bounded_by_the_burst() {
        assert_eq!(plan(3, 3), Plan::Nothing);
        assert_eq!(plan(0, 5), Plan::Create(5));
        assert_eq!(plan(0, 10_000), Plan::Create(BURST_REPLICAS));
        assert_eq!(plan(7, 2), Plan::Delete(5));
        assert_eq!(plan(10_000, 0), Plan::Delete(BURST_REPLICAS));
    }

    #[test]
    fn status_counts_labels_readiness_and_availability() {
        let set = rs(4, 10);
        let full = pod(&[("app", "web"), ("tier", "fe")], Some(100));
        let partial = pod(&[("app", "web")], Some(100));
        let recent = pod(&[("app", "web"), ("tier", "fe")], Some(195));
        let not_ready = pod(&[("app", "web"), ("tier", "fe")], None);
        let now = jiff::Timestamp::from_second(200).expect("ts");
        let status = calculate_status(&set, &[&full, &partial, &recent, &not_ready], None, now);
        assert_eq!(status.replicas, 4);
        assert_eq!(status.fully_labeled_replicas, Some(3));
        assert_eq!(status.ready_replicas, Some(3));
        assert_eq!(
            status.available_replicas,
            Some(2),
            "the pod ready 5s ago is not available with minReadySeconds 10"
        );
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.conditions, None);
    }

    #[test]
    fn failures_set_and_clear_the_replica_failure_condition() {
        let mut set = rs(1, 0);
        let now = jiff::Timestamp::from_second(200).expect("ts");
        let error = WorkloadError::HashCollision { object: "x".into() };
        let status = calculate_status(&set, &[], Some(("FailedCreate", &error)), now);
        let conditions = status.conditions.clone().expect("a condition");
        assert_eq!(conditions[0].type_.as_deref(), Some("ReplicaFailure"));
        assert_eq!(conditions[0].reason.as_deref(), Some("FailedCreate"));
        set.status = Some(status);
        let cleared = calculate_status(&set, &[], None, now);
        assert_eq!(cleared.conditions, None);
    }
}
