//! The Deployment controller, as upstream's `pkg/controller/deployment`.
//!
//! A Deployment owns ReplicaSets named `<deployment>-<pod-template-hash>`;
//! the one whose template equals the Deployment's (ignoring the hash label)
//! is the new one, the others are old. A rollout moves replicas from old
//! to new: RollingUpdate never exceeds `replicas + maxSurge` pods and never
//! drops below `replicas - maxUnavailable` available ones (surge rounded
//! up, unavailability down), Recreate scales the old ones to zero and waits
//! for their pods to go before scaling the new one up. The
//! `deployment.kubernetes.io/revision` annotation numbers the templates
//! (a template rolled back to gets a new number and keeps its old ones in
//! `revision-history`), `desired-replicas` and `max-replicas` record the
//! size each ReplicaSet was scaled for, so that scaling a Deployment
//! mid-rollout spreads the change proportionally. Old ReplicaSets scaled to
//! zero beyond `revisionHistoryLimit` are deleted. Paused Deployments only
//! scale. Status carries replica counts and the Available and Progressing
//! conditions (with `progressDeadlineSeconds`) that `kubectl rollout
//! status` reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Context;
use skiff_common::error::api_code;
use skiff_common::watch::{Change, key_of};
use skiff_common::workqueue::WorkQueue;

use super::pods::{self, WorkloadError, controller_of};
use skiff_common::events::{EventType, reference};

/// The revision annotation, on Deployments and their ReplicaSets.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// Earlier revisions of a ReplicaSet whose template was rolled back to.
pub const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
/// The Deployment's `spec.replicas` when the ReplicaSet was last scaled.
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
/// `replicas + maxSurge` when the ReplicaSet was last scaled.
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";

/// Deployment annotations never copied onto ReplicaSets.
const SKIPPED_ANNOTATIONS: [&str; 6] = [
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    REVISION_HISTORY,
    DESIRED_REPLICAS,
    MAX_REPLICAS,
    "deprecated.deployment.rollback.to",
];

/// Concurrent syncs (upstream's `--concurrent-deployment-syncs`).
const WORKERS: usize = 5;

/// The Progressing condition's reasons, as upstream names them.
pub mod reason {
    /// A new ReplicaSet was created.
    pub const NEW_RS_CREATED: &str = "NewReplicaSetCreated";
    /// The new ReplicaSet exists already.
    pub const FOUND_NEW_RS: &str = "FoundNewReplicaSet";
    /// Replicas moved since the last look.
    pub const RS_UPDATED: &str = "ReplicaSetUpdated";
    /// The rollout completed.
    pub const NEW_RS_AVAILABLE: &str = "NewReplicaSetAvailable";
    /// No progress within `progressDeadlineSeconds`.
    pub const TIMED_OUT: &str = "ProgressDeadlineExceeded";
    /// The new ReplicaSet could not be created.
    pub const RS_CREATE_ERROR: &str = "ReplicaSetCreateError";
    /// `spec.paused` was set.
    pub const PAUSED: &str = "DeploymentPaused";
    /// `spec.paused` was cleared.
    pub const RESUMED: &str = "DeploymentResumed";
    /// Available: enough replicas are available.
    pub const MIN_AVAILABLE: &str = "MinimumReplicasAvailable";
    /// Available: too few replicas are available.
    pub const MIN_UNAVAILABLE: &str = "MinimumReplicasUnavailable";
}

#[derive(Default)]
struct Cache {
    deployments: RwLock<HashMap<String, Arc<Deployment>>>,
    sets: RwLock<HashMap<String, Arc<ReplicaSet>>>,
}

struct Controller {
    ctx: Arc<Context>,
    cache: Cache,
    queue: Arc<WorkQueue>,
    deployments_synced: AtomicBool,
    sets_synced: AtomicBool,
}

/// Run the Deployment controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let controller = Arc::new(Controller {
        ctx: ctx.clone(),
        cache: Cache::default(),
        queue: Arc::new(WorkQueue::new()),
        deployments_synced: AtomicBool::new(false),
        sets_synced: AtomicBool::new(false),
    });
    let mut tasks = tokio::task::JoinSet::new();
    {
        let c = controller.clone();
        tasks.spawn(skiff_common::watch::watch_changes::<Deployment, _>(
            ctx.client.clone(),
            shutdown.clone(),
            move |change| c.deployment_changed(change),
        ));
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
        let synced = || {
            self.deployments_synced.load(Ordering::Acquire)
                && self.sets_synced.load(Ordering::Acquire)
        };
        self.queue
            .run_worker("deployment", synced, &shutdown, |key| {
                let this = self.clone();
                async move { this.sync(&key).await }
            })
            .await;
    }

    fn deployment_changed(&self, change: Change<Deployment>) {
        match change {
            Change::Applied(d) => {
                let key = key_of(&d.metadata);
                self.cache
                    .deployments
                    .write()
                    .expect("cache lock")
                    .insert(key.clone(), Arc::new(d));
                self.queue.add(&key);
            }
            Change::Deleted(d) => {
                let key = key_of(&d.metadata);
                self.cache
                    .deployments
                    .write()
                    .expect("cache lock")
                    .remove(&key);
            }
            Change::Resynced(list) => {
                let fresh: HashMap<String, Arc<Deployment>> = list
                    .into_iter()
                    .map(|d| (key_of(&d.metadata), Arc::new(d)))
                    .collect();
                for key in fresh.keys() {
                    self.queue.add(key);
                }
                *self.cache.deployments.write().expect("cache lock") = fresh;
                self.deployments_synced.store(true, Ordering::Release);
            }
        }
    }

    /// Queue the Deployment controlling `rs`, or for an orphan every
    /// Deployment of its namespace that selects it.
    fn queue_for_set(&self, rs: &ReplicaSet) {
        let namespace = rs.metadata.namespace.as_deref().unwrap_or_default();
        match controller_of(&rs.metadata) {
            Some(owner) if owner.kind == "Deployment" => {
                self.queue.add(&format!("{namespace}/{}", owner.name))
            }
            Some(_) => {}
            None => {
                let deployments = self.cache.deployments.read().expect("cache lock");
                for (key, d) in deployments.iter() {
                    if d.metadata.namespace.as_deref() == Some(namespace)
                        && !skiff_common::labels::selector_is_empty(&d.spec.selector)
                        && skiff_common::labels::selector_matches(
                            &d.spec.selector,
                            rs.metadata.labels.as_ref(),
                        )
                    {
                        self.queue.add(key);
                    }
                }
            }
        }
    }

    /// Keep `rs` in the cache unless the cache has a newer version (our
    /// own writes go in at once, ahead of the watch); the replaced one.
    fn remember(&self, rs: &ReplicaSet) -> Option<Arc<ReplicaSet>> {
        let version = |rs: &ReplicaSet| {
            rs.metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
        };
        let key = key_of(&rs.metadata);
        let mut sets = self.cache.sets.write().expect("cache lock");
        let old = sets.get(&key).cloned();
        let stale = match (&old, version(rs)) {
            (Some(old), Some(new)) => {
                old.metadata.uid == rs.metadata.uid && version(old).is_some_and(|o| o > new)
            }
            _ => false,
        };
        if !stale {
            sets.insert(key, Arc::new(rs.clone()));
        }
        old
    }

    fn set_changed(&self, change: Change<ReplicaSet>) {
        match change {
            Change::Applied(rs) => {
                let old = self.remember(&rs);
                if let Some(old) = old
                    && controller_of(&old.metadata) != controller_of(&rs.metadata)
                {
                    self.queue_for_set(&old);
                }
                self.queue_for_set(&rs);
            }
            Change::Deleted(rs) => {
                self.cache
                    .sets
                    .write()
                    .expect("cache lock")
                    .remove(&key_of(&rs.metadata));
                self.queue_for_set(&rs);
            }
            Change::Resynced(list) => {
                let fresh: HashMap<String, Arc<ReplicaSet>> = list
                    .into_iter()
                    .map(|rs| (key_of(&rs.metadata), Arc::new(rs)))
                    .collect();
                *self.cache.sets.write().expect("cache lock") = fresh;
                let keys: Vec<String> = self
                    .cache
                    .deployments
                    .read()
                    .expect("cache lock")
                    .keys()
                    .cloned()
                    .collect();
                for key in keys {
                    self.queue.add(&key);
                }
                self.sets_synced.store(true, Ordering::Release);
            }
        }
    }

    /// Reconcile one Deployment.
    async fn sync(&self, key: &str) -> Result<Option<Duration>, WorkloadError> {
        let Some(d) = self
            .cache
            .deployments
            .read()
            .expect("cache lock")
            .get(key)
            .cloned()
        else {
            return Ok(None);
        };
        let mut d = (*d).clone();
        let spec = d.spec.clone();
        if skiff_common::labels::selector_is_empty(&spec.selector) {
            let object = reference("apps/v1", "Deployment", &d.metadata);
            self.ctx
                .events
                .record(
                    &object,
                    EventType::Warning,
                    "SelectingAll",
                    "This deployment is selecting all pods. A non-empty selector is required.",
                )
                .await;
            if d.status.as_ref().and_then(|s| s.observed_generation) != d.metadata.generation {
                let mut status = d.status.clone().unwrap_or_default();
                status.observed_generation = d.metadata.generation;
                self.write_status(&mut d, status).await?;
            }
            return Ok(None);
        }
        let mut sets = self.claim_sets(&d).await?;
        if d.metadata.deletion_timestamp.is_some() {
            let (new_rs, old) = self
                .all_sets_and_sync_revision(&mut d, &mut sets, false)
                .await?;
            self.sync_deployment_status(&mut d, new_rs.as_ref(), &old)
                .await?;
            return Ok(None);
        }
        self.check_paused_conditions(&mut d).await?;
        if spec.paused == Some(true) || is_scaling_event(&d, &sets) {
            return self.sync_scale(&mut d, sets).await;
        }
        match spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) {
            Some("Recreate") => self.rollout_recreate(&mut d, sets).await,
            _ => self.rollout_rolling(&mut d, sets).await,
        }
    }

    /// The ReplicaSets this Deployment controls, adopting matching orphans
    /// and releasing its own that no longer match.
    async fn claim_sets(&self, d: &Deployment) -> Result<Vec<ReplicaSet>, WorkloadError> {
        let namespace = d.metadata.namespace.clone().unwrap_or_default();
        let uid = d.metadata.uid.clone().unwrap_or_default();
        let selector = skiff_common::labels::parse_selector(&d.spec.clone().selector);
        let candidates: Vec<Arc<ReplicaSet>> = self
            .cache
            .sets
            .read()
            .expect("cache lock")
            .values()
            .filter(|rs| rs.metadata.namespace.as_deref() == Some(namespace.as_str()))
            .cloned()
            .collect();
        let deleting = d.metadata.deletion_timestamp.is_some();
        let api: Api<ReplicaSet> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let mut owned = Vec::new();
        for rs in candidates {
            let matches = skiff_common::labels::parsed_matches(
                selector.as_ref(),
                rs.metadata.labels.as_ref(),
            );
            let name = rs.metadata.name.clone().unwrap_or_default();
            match controller_of(&rs.metadata) {
                Some(owner) if owner.uid == uid => {
                    if matches {
                        owned.push((*rs).clone());
                    } else if !deleting {
                        let refs: Vec<_> = rs
                            .metadata
                            .owner_references
                            .clone()
                            .unwrap_or_default()
                            .into_iter()
                            .filter(|r| r.uid != uid)
                            .collect();
                        let patch = json!({"metadata": {
                            "ownerReferences": if refs.is_empty() { serde_json::Value::Null } else { json!(refs) },
                            "resourceVersion": rs.metadata.resource_version,
                        }});
                        ignore_gone(
                            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                                .await,
                            "release replicaset",
                            &namespace,
                            &name,
                        )?;
                    }
                }
                Some(_) => {}
                None if matches && !deleting && rs.metadata.deletion_timestamp.is_none() => {
                    let mut refs = rs.metadata.owner_references.clone().unwrap_or_default();
                    refs.push(pods::controller_reference(
                        "apps/v1",
                        "Deployment",
                        &d.metadata,
                    ));
                    let patch = json!({"metadata": {
                        "ownerReferences": refs,
                        "resourceVersion": rs.metadata.resource_version,
                    }});
                    if let Some(adopted) = ignore_gone(
                        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                            .await,
                        "adopt replicaset",
                        &namespace,
                        &name,
                    )? {
                        owned.push(adopted);
                    }
                }
                None => {}
            }
        }
        Ok(owned)
    }

    /// Split `sets` into the new ReplicaSet (created if `create` and
    /// missing) and the old ones, bringing revision annotations up to date.
    async fn all_sets_and_sync_revision(
        &self,
        d: &mut Deployment,
        sets: &mut [ReplicaSet],
        create: bool,
    ) -> Result<(Option<ReplicaSet>, Vec<ReplicaSet>), WorkloadError> {
        sort_by_creation(sets);
        let new_index = find_new_set(d, sets);
        let mut old: Vec<ReplicaSet> = sets
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != new_index)
            .map(|(_, rs)| rs.clone())
            .collect();
        sort_by_creation(&mut old);
        let new_revision = max_revision(&old) + 1;
        let namespace = d.metadata.namespace.clone().unwrap_or_default();
        let api: Api<ReplicaSet> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let min_ready = d.spec.min_ready_seconds;
        let new_rs = match new_index {
            Some(i) => {
                let mut rs = sets[i].clone();
                let annotations_changed = set_new_set_annotations(d, &mut rs, new_revision);
                let spec = &mut rs.spec;
                let min_ready_changed =
                    spec.min_ready_seconds.unwrap_or(0) != min_ready.unwrap_or(0);
                if annotations_changed || min_ready_changed {
                    spec.min_ready_seconds = min_ready;
                    let name = rs.metadata.name.clone().unwrap_or_default();
                    let patch = json!({
                        "metadata": {"annotations": rs.metadata.annotations},
                        "spec": {"minReadySeconds": min_ready},
                    });
                    rs = api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map_err(|source| WorkloadError::Api {
                            action: "update replicaset",
                            object: format!("{namespace}/{name}"),
                            source,
                        })?;
                    self.remember(&rs);
                }
                let revision = annotation(&rs.metadata, REVISION)
                    .unwrap_or_default()
                    .to_string();
                self.set_deployment_revision(d, &revision).await?;
                if condition(d, "Progressing").is_none() {
                    let message = format!(
                        "Found new replica set {:?}",
                        rs.metadata.name.as_deref().unwrap_or_default()
                    );
                    let mut status = d.status.clone().unwrap_or_default();
                    set_condition(
                        &mut status,
                        new_condition("Progressing", "True", reason::FOUND_NEW_RS, &message),
                    );
                    self.write_status(d, status).await?;
                }
                Some(rs)
            }
            None if create => Some(self.create_new_set(d, &old, new_revision).await?),
            None => None,
        };
        Ok((new_rs, old))
    }

    /// Create the new ReplicaSet for the Deployment's template.
    async fn create_new_set(
        &self,
        d: &mut Deployment,
        old: &[ReplicaSet],
        revision: i64,
    ) -> Result<ReplicaSet, WorkloadError> {
        let namespace = d.metadata.namespace.clone().unwrap_or_default();
        let api: Api<ReplicaSet> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let rs = new_set_for(d, old, revision);
        let name = rs.metadata.name.clone().unwrap_or_default();
        let replicas = rs.spec.replicas.unwrap_or(0);
        let object = reference("apps/v1", "Deployment", &d.metadata);
        let created = match api.create(&PostParams::default(), &rs).await {
            Ok(created) => {
                self.remember(&created);
                created
            }
            Err(source) if api_code(&source) == Some(409) => {
                let existing = api.get(&name).await.map_err(|source| WorkloadError::Api {
                    action: "get replicaset",
                    object: format!("{namespace}/{name}"),
                    source,
                })?;
                let ours = controller_of(&existing.metadata)
                    .is_some_and(|r| Some(&r.uid) == d.metadata.uid.as_ref());
                let same = match (existing.spec.template.as_ref(), Some(&d.spec.template)) {
                    (Some(a), Some(b)) => pods::templates_equal_ignoring_hash(a, b),
                    _ => false,
                };
                if ours && same {
                    return Ok(existing);
                }
                let mut status = d.status.clone().unwrap_or_default();
                status.collision_count = Some(status.collision_count.unwrap_or(0) + 1);
                self.write_status(d, status).await?;
                return Err(WorkloadError::HashCollision {
                    object: format!("{namespace}/{name}"),
                });
            }
            Err(source) => {
                let message = format!("Failed to create new replica set {name:?}: {source}");
                let mut status = d.status.clone().unwrap_or_default();
                set_condition(
                    &mut status,
                    new_condition("Progressing", "False", reason::RS_CREATE_ERROR, &message),
                );
                self.write_status(d, status).await?;
                return Err(WorkloadError::Api {
                    action: "create replicaset",
                    object: format!("{namespace}/{name}"),
                    source,
                });
            }
        };
        if replicas > 0 {
            self.ctx
                .events
                .record(
                    &object,
                    EventType::Normal,
                    "ScalingReplicaSet",
                    &format!("Scaled up replica set {name} from 0 to {replicas}"),
                )
                .await;
        }
        self.set_deployment_revision(d, &revision.to_string())
            .await?;
        let mut status = d.status.clone().unwrap_or_default();
        set_condition(
            &mut status,
            new_condition(
                "Progressing",
                "True",
                reason::NEW_RS_CREATED,
                &format!("Created new replica set {name:?}"),
            ),
        );
        self.write_status(d, status).await?;
        Ok(created)
    }

    /// Put `revision` on the Deployment's annotations.
    async fn set_deployment_revision(
        &self,
        d: &mut Deployment,
        revision: &str,
    ) -> Result<(), WorkloadError> {
        if revision.is_empty() || annotation(&d.metadata, REVISION) == Some(revision) {
            return Ok(());
        }
        let namespace = d.metadata.namespace.clone().unwrap_or_default();
        let name = d.metadata.name.clone().unwrap_or_default();
        let api: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let patch = json!({"metadata": {"annotations": {REVISION: revision}}});
        let updated = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| WorkloadError::Api {
                action: "annotate deployment",
                object: format!("{namespace}/{name}"),
                source,
            })?;
        d.metadata.annotations = updated.metadata.annotations;
        d.metadata.resource_version = updated.metadata.resource_version;
        Ok(())
    }

    /// Write `status` (whole) and keep it in `d`.
    async fn write_status(
        &self,
        d: &mut Deployment,
        status: DeploymentStatus,
    ) -> Result<(), WorkloadError> {
        let namespace = d.metadata.namespace.clone().unwrap_or_default();
        let name = d.metadata.name.clone().unwrap_or_default();
        let api: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let mut body = serde_json::to_value(&status).unwrap_or_default();
        if let Some(map) = body.as_object_mut() {
            for field in [
                "conditions",
                "collisionCount",
                "unavailableReplicas",
                "readyReplicas",
                "availableReplicas",
                "updatedReplicas",
                "replicas",
            ] {
                map.entry(field).or_insert(serde_json::Value::Null);
            }
        }
        match api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": body})),
            )
            .await
        {
            Ok(_) => {
                d.status = Some(status);
                Ok(())
            }
            Err(source) => Err(WorkloadError::Api {
                action: "update status of deployment",
                object: format!("{namespace}/{name}"),
                source,
            }),
        }
    }

    /// Set or change the ReplicaSet's size (and its replica annotations).
    async fn scale_set(
        &self,
        d: &Deployment,
        rs: &mut ReplicaSet,
        replicas: i32,
    ) -> Result<bool, WorkloadError> {
        let current = rs.spec.replicas.unwrap_or(0);
        let desired = d.spec.replicas.unwrap_or(1);
        let max = desired + max_surge(d);
        let size_changed = current != replicas;
        let annotations_stale = annotation(&rs.metadata, DESIRED_REPLICAS)
            != Some(desired.to_string().as_str())
            || annotation(&rs.metadata, MAX_REPLICAS) != Some(max.to_string().as_str());
        if !size_changed && !annotations_stale {
            return Ok(false);
        }
        let namespace = rs.metadata.namespace.clone().unwrap_or_default();
        let name = rs.metadata.name.clone().unwrap_or_default();
        let api: Api<ReplicaSet> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let patch = json!({
            "metadata": {
                "annotations": {DESIRED_REPLICAS: desired.to_string(), MAX_REPLICAS: max.to_string()},
            },
            "spec": {"replicas": replicas},
        });
        *rs = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| WorkloadError::Api {
                action: "scale replicaset",
                object: format!("{namespace}/{name}"),
                source,
            })?;
        self.remember(rs);
        if size_changed {
            let direction = if replicas > current { "up" } else { "down" };
            let object = reference("apps/v1", "Deployment", &d.metadata);
            self.ctx
                .events
                .record(
                    &object,
                    EventType::Normal,
                    "ScalingReplicaSet",
                    &format!("Scaled {direction} replica set {name} from {current} to {replicas}"),
                )
                .await;
        }
        Ok(size_changed)
    }

    /// Scale to a target only if the size differs (the rollout steps).
    async fn scale_if_needed(
        &self,
        d: &Deployment,
        rs: &mut ReplicaSet,
        replicas: i32,
    ) -> Result<bool, WorkloadError> {
        if rs.spec.replicas.unwrap_or(0) == replicas {
            return Ok(false);
        }
        self.scale_set(d, rs, replicas).await
    }

    /// Paused or resized: scale proportionally, no rollout.
    async fn sync_scale(
        &self,
        d: &mut Deployment,
        mut sets: Vec<ReplicaSet>,
    ) -> Result<Option<Duration>, WorkloadError> {
        let (mut new_rs, mut old) = self.all_sets_and_sync_revision(d, &mut sets, false).await?;
        let targets = plan_scale(d, new_rs.as_ref(), &old);
        for (name, target) in targets {
            if let Some(rs) = new_rs
                .as_mut()
                .filter(|rs| rs.metadata.name.as_deref() == Some(name.as_str()))
            {
                self.scale_set(d, rs, target).await?;
            } else if let Some(rs) = old
                .iter_mut()
                .find(|rs| rs.metadata.name.as_deref() == Some(name.as_str()))
            {
                self.scale_set(d, rs, target).await?;
            }
        }
        if d.spec.paused == Some(true) {
            self.cleanup(d, &old).await?;
        }
        self.sync_deployment_status(d, new_rs.as_ref(), &old)
            .await?;
        Ok(None)
    }

    async fn rollout_rolling(
        &self,
        d: &mut Deployment,
        mut sets: Vec<ReplicaSet>,
    ) -> Result<Option<Duration>, WorkloadError> {
        let (new_rs, mut old) = self.all_sets_and_sync_revision(d, &mut sets, true).await?;
        let mut new_rs = new_rs.expect("created when missing");
        // Scale up the new ReplicaSet as far as maxSurge allows.
        let desired = d.spec.replicas.unwrap_or(1);
        let new_size = new_rs.spec.replicas.unwrap_or(0);
        let target = if new_size > desired {
            desired
        } else {
            new_set_replicas(d, &old, Some(&new_rs))
        };
        if self.scale_if_needed(d, &mut new_rs, target).await? {
            return self.sync_rollout_status(d, Some(&new_rs), &old).await;
        }
        // Scale down old ones as far as maxUnavailable allows.
        let targets = plan_old_scale_down(d, &new_rs, &old);
        let mut scaled = false;
        for (rs, target) in old.iter_mut().zip(targets) {
            scaled |= self.scale_if_needed(d, rs, target).await?;
        }
        if scaled {
            return self.sync_rollout_status(d, Some(&new_rs), &old).await;
        }
        if deployment_complete(d, &calculate_status(d, Some(&new_rs), &old)) {
            self.cleanup(d, &old).await?;
        }
        self.sync_rollout_status(d, Some(&new_rs), &old).await
    }

    async fn rollout_recreate(
        &self,
        d: &mut Deployment,
        mut sets: Vec<ReplicaSet>,
    ) -> Result<Option<Duration>, WorkloadError> {
        let (new_rs, mut old) = self.all_sets_and_sync_revision(d, &mut sets, false).await?;
        let mut scaled = false;
        for rs in old.iter_mut() {
            scaled |= self.scale_if_needed(d, rs, 0).await?;
        }
        if scaled {
            return self.sync_rollout_status(d, new_rs.as_ref(), &old).await;
        }
        if self.old_pods_running(d, &old).await? {
            return self.sync_rollout_status(d, new_rs.as_ref(), &old).await;
        }
        let mut new_rs = match new_rs {
            Some(rs) => rs,
            None => {
                let (created, again) = self.all_sets_and_sync_revision(d, &mut sets, true).await?;
                old = again;
                created.expect("created when missing")
            }
        };
        let desired = d.spec.replicas.unwrap_or(1);
        self.scale_if_needed(d, &mut new_rs, desired).await?;
        if deployment_complete(d, &calculate_status(d, Some(&new_rs), &old)) {
            self.cleanup(d, &old).await?;
        }
        self.sync_rollout_status(d, Some(&new_rs), &old).await
    }

    /// Whether pods of the old ReplicaSets still exist (Recreate waits for
    /// them to go, terminating ones included).
    async fn old_pods_running(
        &self,
        d: &Deployment,
        old: &[ReplicaSet],
    ) -> Result<bool, WorkloadError> {
        if old
            .iter()
            .any(|rs| rs.status.as_ref().is_some_and(|s| s.replicas > 0))
        {
            return Ok(true);
        }
        let namespace = d.metadata.namespace.clone().unwrap_or_default();
        let Some(selector) = skiff_common::labels::parse_selector(&d.spec.clone().selector) else {
            return Ok(false);
        };
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let list = api
            .list(&ListParams::default().labels_from(&selector))
            .await
            .map_err(|source| WorkloadError::Api {
                action: "list pods of",
                object: key_of(&d.metadata),
                source,
            })?;
        let old_uids: Vec<&str> = old
            .iter()
            .filter_map(|rs| rs.metadata.uid.as_deref())
            .collect();
        Ok(list.items.iter().any(|pod| {
            controller_of(&pod.metadata).is_some_and(|r| old_uids.contains(&r.uid.as_str()))
                && !matches!(
                    pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded") | Some("Failed")
                )
        }))
    }

    /// Delete old ReplicaSets at zero beyond `revisionHistoryLimit`.
    async fn cleanup(&self, d: &Deployment, old: &[ReplicaSet]) -> Result<(), WorkloadError> {
        let namespace = d.metadata.namespace.clone().unwrap_or_default();
        let api: Api<ReplicaSet> = Api::namespaced(self.ctx.client.clone(), &namespace);
        for name in sets_to_clean_up(d, old) {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(source) if api_code(&source) == Some(404) => {}
                Err(source) => {
                    return Err(WorkloadError::Api {
                        action: "delete old replicaset",
                        object: format!("{namespace}/{name}"),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Progressing reports DeploymentPaused / DeploymentResumed.
    async fn check_paused_conditions(&self, d: &mut Deployment) -> Result<(), WorkloadError> {
        if !has_progress_deadline(d) {
            return Ok(());
        }
        let current = condition(d, "Progressing");
        if current
            .as_ref()
            .is_some_and(|c| c.reason.as_deref() == Some(reason::TIMED_OUT))
        {
            return Ok(());
        }
        let paused_condition = current
            .as_ref()
            .is_some_and(|c| c.reason.as_deref() == Some(reason::PAUSED));
        let paused = d.spec.paused == Some(true);
        let mut status = d.status.clone().unwrap_or_default();
        if paused && !paused_condition {
            set_condition(
                &mut status,
                new_condition(
                    "Progressing",
                    "Unknown",
                    reason::PAUSED,
                    "Deployment is paused",
                ),
            );
        } else if !paused && paused_condition {
            set_condition(
                &mut status,
                new_condition(
                    "Progressing",
                    "Unknown",
                    reason::RESUMED,
                    "Deployment is resumed",
                ),
            );
        } else {
            return Ok(());
        }
        self.write_status(d, status).await
    }

    /// Status without judging progress (paused, scaling, deleting).
    async fn sync_deployment_status(
        &self,
        d: &mut Deployment,
        new_rs: Option<&ReplicaSet>,
        old: &[ReplicaSet],
    ) -> Result<(), WorkloadError> {
        let status = calculate_status(d, new_rs, old);
        if d.status.as_ref() != Some(&status) {
            self.write_status(d, status).await?;
        }
        Ok(())
    }

    /// Status with the Progressing condition; asks to look again when the
    /// progress deadline would pass.
    async fn sync_rollout_status(
        &self,
        d: &mut Deployment,
        new_rs: Option<&ReplicaSet>,
        old: &[ReplicaSet],
    ) -> Result<Option<Duration>, WorkloadError> {
        let now = jiff::Timestamp::now();
        let status = rollout_status(d, new_rs, old, now);
        let requeue = stuck_requeue(d, &status, now);
        if d.status.as_ref() != Some(&status) {
            self.write_status(d, status).await?;
        }
        Ok(requeue)
    }
}

/// Turn 404 and 409 into `None` (the object changed; the next sync sees it).
fn ignore_gone(
    result: Result<ReplicaSet, kube::Error>,
    action: &'static str,
    namespace: &str,
    name: &str,
) -> Result<Option<ReplicaSet>, WorkloadError> {
    match result {
        Ok(rs) => Ok(Some(rs)),
        Err(source) if matches!(api_code(&source), Some(404) | Some(409)) => Ok(None),
        Err(source) => Err(WorkloadError::Api {
            action,
            object: format!("{namespace}/{name}"),
            source,
        }),
    }
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// A ReplicaSet's revision (0 if none).
pub fn revision_of(rs: &ReplicaSet) -> i64 {
    annotation(&rs.metadata, REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn max_revision(sets: &[ReplicaSet]) -> i64 {
    sets.iter().map(revision_of).max().unwrap_or(0)
}

fn replicas_of(rs: &ReplicaSet) -> i32 {
    rs.spec.replicas.unwrap_or(0)
}

fn available_of(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

/// Available replicas, counting none beyond `spec.replicas`. Right after a
/// ReplicaSet is scaled down, its status still counts the pods about to be
/// deleted until its controller catches up; counted, they would let the next
/// step take away pods that are no longer there.
fn available_within_size(rs: &ReplicaSet) -> i32 {
    available_of(rs).min(replicas_of(rs))
}

/// The pods a ReplicaSet has or is about to have: `spec.replicas`, or more
/// while its status still counts pods a scale-down is deleting.
fn pods_within_reach(rs: &ReplicaSet) -> i32 {
    replicas_of(rs).max(rs.status.as_ref().map_or(0, |s| s.replicas))
}

fn created_of(rs: &ReplicaSet) -> Option<jiff::Timestamp> {
    rs.metadata.creation_timestamp.as_ref().map(|t| t.0)
}

/// Oldest first, then by name.
fn sort_by_creation(sets: &mut [ReplicaSet]) {
    sets.sort_by(|a, b| {
        created_of(a)
            .cmp(&created_of(b))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
}

/// The oldest ReplicaSet whose template equals the Deployment's.
pub fn find_new_set(d: &Deployment, sets: &[ReplicaSet]) -> Option<usize> {
    let template = d.spec.template.clone();
    let mut candidates: Vec<usize> = (0..sets.len())
        .filter(|&i| {
            sets[i]
                .spec
                .template
                .as_ref()
                .is_some_and(|t| pods::templates_equal_ignoring_hash(t, &template))
        })
        .collect();
    candidates.sort_by(|&a, &b| {
        created_of(&sets[a])
            .cmp(&created_of(&sets[b]))
            .then_with(|| sets[a].metadata.name.cmp(&sets[b].metadata.name))
    });
    candidates.first().copied()
}

/// Give the new ReplicaSet the Deployment's annotations and `revision`
/// (keeping earlier revisions in `revision-history`); whether it changed.
pub fn set_new_set_annotations(d: &Deployment, rs: &mut ReplicaSet, revision: i64) -> bool {
    let annotations = rs.metadata.annotations.get_or_insert_with(BTreeMap::new);
    let mut changed = false;
    for (key, value) in d.metadata.annotations.iter().flatten() {
        if SKIPPED_ANNOTATIONS.contains(&key.as_str()) {
            continue;
        }
        if annotations.get(key) != Some(value) {
            annotations.insert(key.clone(), value.clone());
            changed = true;
        }
    }
    let old = annotations.get(REVISION).cloned();
    let old_number = old
        .as_deref()
        .and_then(|r| r.parse::<i64>().ok())
        .unwrap_or(0);
    if old_number < revision {
        annotations.insert(REVISION.to_string(), revision.to_string());
        changed = true;
        if let Some(old) = old.filter(|o| !o.is_empty()) {
            let history = match annotations.get(REVISION_HISTORY) {
                Some(h) if !h.is_empty() => format!("{h},{old}"),
                _ => old,
            };
            annotations.insert(REVISION_HISTORY.to_string(), history);
        }
    }
    changed
}

/// The new ReplicaSet for the Deployment's current template.
pub fn new_set_for(d: &Deployment, old: &[ReplicaSet], revision: i64) -> ReplicaSet {
    let spec = d.spec.clone();
    let collision = d.status.as_ref().and_then(|s| s.collision_count);
    let hash = pods::compute_hash(&spec.template, collision);
    let mut template = spec.template.clone();
    template
        .metadata
        .get_or_insert_with(ObjectMeta::default)
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(pods::POD_TEMPLATE_HASH.to_string(), hash.clone());
    let mut selector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(BTreeMap::new)
        .insert(pods::POD_TEMPLATE_HASH.to_string(), hash.clone());
    let desired = spec.replicas.unwrap_or(1);
    let mut rs = ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}-{hash}",
                d.metadata.name.as_deref().unwrap_or_default()
            )),
            namespace: d.metadata.namespace.clone(),
            labels: template.metadata.as_ref().and_then(|m| m.labels.clone()),
            owner_references: Some(vec![pods::controller_reference(
                "apps/v1",
                "Deployment",
                &d.metadata,
            )]),
            ..ObjectMeta::default()
        },
        spec: ReplicaSetSpec {
            replicas: Some(0),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(template),
        },
        status: None,
    };
    let replicas = new_set_replicas(d, old, None);
    rs.spec.replicas = Some(replicas);
    set_new_set_annotations(d, &mut rs, revision);
    let annotations = rs.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(DESIRED_REPLICAS.to_string(), desired.to_string());
    annotations.insert(
        MAX_REPLICAS.to_string(),
        (desired + max_surge(d)).to_string(),
    );
    rs
}

fn is_rolling(d: &Deployment) -> bool {
    d.spec
        .strategy
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .is_none_or(|t| t == "RollingUpdate")
}

/// `(maxSurge, maxUnavailable)` resolved against `spec.replicas`: surge
/// rounded up, unavailability down, and never both zero (upstream's
/// `ResolveFenceposts`).
pub fn resolve_fenceposts(d: &Deployment) -> (i32, i32) {
    let spec = d.spec.clone();
    let desired = spec.replicas.unwrap_or(1);
    let rolling = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let quarter = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("25%".into());
    let surge = pods::scaled_value(
        Some(
            rolling
                .and_then(|r| r.max_surge.as_ref())
                .unwrap_or(&quarter),
        ),
        desired,
        true,
        0,
    );
    let unavailable = pods::scaled_value(
        Some(
            rolling
                .and_then(|r| r.max_unavailable.as_ref())
                .unwrap_or(&quarter),
        ),
        desired,
        false,
        0,
    );
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

/// maxSurge as a count (0 unless RollingUpdate).
pub fn max_surge(d: &Deployment) -> i32 {
    if !is_rolling(d) {
        return 0;
    }
    resolve_fenceposts(d).0
}

/// maxUnavailable as a count, at most `spec.replicas` (0 unless RollingUpdate).
pub fn max_unavailable(d: &Deployment) -> i32 {
    let desired = d.spec.replicas.unwrap_or(1);
    if !is_rolling(d) || desired == 0 {
        return 0;
    }
    resolve_fenceposts(d).1.min(desired)
}

/// The size the new ReplicaSet may grow to now: up to `replicas +
/// maxSurge` pods in all (upstream's `NewRSNewReplicas`). An old set just
/// scaled down counts the pods its status still reports until its
/// controller has deleted them, so the pods that exist never exceed the
/// bound (upstream counts only `spec.replicas`).
pub fn new_set_replicas(d: &Deployment, old: &[ReplicaSet], new_rs: Option<&ReplicaSet>) -> i32 {
    let desired = d.spec.replicas.unwrap_or(1);
    if !is_rolling(d) {
        return desired;
    }
    let new_size = new_rs.map(replicas_of).unwrap_or(0);
    let current: i32 = old.iter().map(pods_within_reach).sum::<i32>() + new_size;
    let max_total = desired + max_surge(d);
    if current >= max_total {
        return new_size;
    }
    let up = (max_total - current).min(desired - new_size).max(0);
    new_size + up
}

/// Target sizes of the old ReplicaSets (same order) for one RollingUpdate
/// step: unhealthy replicas first, then as many as keeps `replicas -
/// maxUnavailable` available (upstream's `reconcileOldReplicaSets`).
pub fn plan_old_scale_down(d: &Deployment, new_rs: &ReplicaSet, old: &[ReplicaSet]) -> Vec<i32> {
    let mut targets: Vec<i32> = old.iter().map(replicas_of).collect();
    let old_pods: i32 = targets.iter().sum();
    if old_pods == 0 {
        return targets;
    }
    let desired = d.spec.replicas.unwrap_or(1);
    let all_pods = old_pods + replicas_of(new_rs);
    let min_available = desired - max_unavailable(d);
    let new_unavailable = replicas_of(new_rs) - available_within_size(new_rs);
    let max_scaled_down = all_pods - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return targets;
    }
    let mut order: Vec<usize> = (0..old.len()).collect();
    order.sort_by(|&a, &b| {
        created_of(&old[a])
            .cmp(&created_of(&old[b]))
            .then_with(|| old[a].metadata.name.cmp(&old[b].metadata.name))
    });
    // Unhealthy replicas first: they do not count toward availability.
    let mut cleaned = 0;
    for &i in &order {
        if cleaned >= max_scaled_down {
            break;
        }
        let unhealthy = targets[i] - available_within_size(&old[i]);
        if targets[i] == 0 || unhealthy <= 0 {
            continue;
        }
        let down = unhealthy.min(max_scaled_down - cleaned);
        targets[i] -= down;
        cleaned += down;
    }
    // Then available ones, while enough stay available.
    let available: i32 =
        old.iter().map(available_within_size).sum::<i32>() + available_within_size(new_rs);
    if available <= min_available {
        return targets;
    }
    let allowed = available - min_available;
    let mut scaled = 0;
    for &i in &order {
        if scaled >= allowed {
            break;
        }
        if targets[i] == 0 {
            continue;
        }
        let down = targets[i].min(allowed - scaled);
        targets[i] -= down;
        scaled += down;
    }
    targets
}

/// Whether `spec.replicas` changed since the active ReplicaSets were last
/// scaled (their `desired-replicas` annotation).
pub fn is_scaling_event(d: &Deployment, sets: &[ReplicaSet]) -> bool {
    let desired = d.spec.replicas.unwrap_or(1);
    sets.iter().filter(|rs| replicas_of(rs) > 0).any(|rs| {
        annotation(&rs.metadata, DESIRED_REPLICAS)
            .and_then(|v| v.parse::<i32>().ok())
            .is_some_and(|v| v != desired)
    })
}

/// Target sizes `(name, replicas)` when the Deployment is resized (or
/// paused): the only active ReplicaSet takes the new size; mid-rollout the
/// change is spread in proportion to each ReplicaSet's size (upstream's
/// `scale`).
pub fn plan_scale(
    d: &Deployment,
    new_rs: Option<&ReplicaSet>,
    old: &[ReplicaSet],
) -> Vec<(String, i32)> {
    let desired = d.spec.replicas.unwrap_or(1);
    let name = |rs: &ReplicaSet| rs.metadata.name.clone().unwrap_or_default();
    let mut all: Vec<&ReplicaSet> = old.iter().collect();
    if let Some(n) = new_rs {
        all.push(n);
    }
    let active: Vec<&ReplicaSet> = all
        .iter()
        .copied()
        .filter(|rs| replicas_of(rs) > 0)
        .collect();
    if active.len() <= 1 {
        let target = match active.first() {
            Some(rs) => Some(*rs),
            None => new_rs.or_else(|| {
                all.iter()
                    .copied()
                    .max_by(|a, b| created_of(a).cmp(&created_of(b)))
            }),
        };
        return target
            .map(|rs| vec![(name(rs), desired)])
            .unwrap_or_default();
    }
    if let Some(n) = new_rs
        && replicas_of(n) == desired
        && available_of(n) == desired
    {
        return old.iter().map(|rs| (name(rs), 0)).collect();
    }
    if !is_rolling(d) {
        return Vec::new();
    }
    let total: i32 = all.iter().map(|rs| replicas_of(rs)).sum();
    let allowed = desired + max_surge(d);
    let to_add = allowed - total;
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| {
        let by_size = replicas_of(b).cmp(&replicas_of(a));
        let by_age = if to_add > 0 {
            created_of(b).cmp(&created_of(a))
        } else {
            created_of(a).cmp(&created_of(b))
        };
        by_size.then(by_age)
    });
    let mut sizes: Vec<(String, i32)> = Vec::new();
    let mut added = 0;
    for rs in &sorted {
        let proportion = if to_add == 0 {
            0
        } else {
            proportion(d, rs, to_add, added)
        };
        sizes.push((name(rs), replicas_of(rs) + proportion));
        added += proportion;
    }
    let leftover = to_add - added;
    if leftover != 0
        && let Some(first) = sizes.first_mut()
    {
        first.1 = (first.1 + leftover).max(0);
    }
    sizes
}

fn proportion(d: &Deployment, rs: &ReplicaSet, to_add: i32, added: i32) -> i32 {
    if replicas_of(rs) == 0 || to_add == added {
        return 0;
    }
    let fraction = set_fraction(d, rs);
    let allowed = to_add - added;
    if to_add > 0 {
        fraction.min(allowed)
    } else {
        fraction.max(allowed)
    }
}

fn set_fraction(d: &Deployment, rs: &ReplicaSet) -> i32 {
    let desired = d.spec.replicas.unwrap_or(1);
    if desired == 0 {
        return -replicas_of(rs);
    }
    let deployment_replicas = desired + max_surge(d);
    let annotated = annotation(&rs.metadata, MAX_REPLICAS)
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or_else(|| {
            d.status
                .as_ref()
                .map(|s| s.replicas.unwrap_or(0))
                .unwrap_or(0)
        });
    if annotated == 0 {
        return 0;
    }
    let size = f64::from(replicas_of(rs)) * f64::from(deployment_replicas) / f64::from(annotated);
    size.round() as i32 - replicas_of(rs)
}

/// Old ReplicaSets to delete beyond `revisionHistoryLimit`: the lowest
/// revisions first, only those fully scaled down.
pub fn sets_to_clean_up(d: &Deployment, old: &[ReplicaSet]) -> Vec<String> {
    let Some(limit) = d.spec.revision_history_limit else {
        return Vec::new();
    };
    let mut alive: Vec<&ReplicaSet> = old
        .iter()
        .filter(|rs| rs.metadata.deletion_timestamp.is_none())
        .collect();
    let excess = alive.len() as i64 - i64::from(limit);
    if excess <= 0 {
        return Vec::new();
    }
    alive.sort_by(|a, b| {
        revision_of(a)
            .cmp(&revision_of(b))
            .then_with(|| created_of(a).cmp(&created_of(b)))
    });
    alive
        .into_iter()
        .take(usize::try_from(excess).unwrap_or(0))
        .filter(|rs| {
            rs.status.as_ref().is_none_or(|s| s.replicas == 0)
                && replicas_of(rs) == 0
                && rs.metadata.generation <= rs.status.as_ref().and_then(|s| s.observed_generation)
        })
        .map(|rs| rs.metadata.name.clone().unwrap_or_default())
        .collect()
}

fn has_progress_deadline(d: &Deployment) -> bool {
    d.spec
        .progress_deadline_seconds
        .is_some_and(|s| s != i32::MAX)
}

fn condition(d: &Deployment, type_: &str) -> Option<DeploymentCondition> {
    d.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_.as_deref() == Some(type_))
        .cloned()
}

fn new_condition(type_: &str, status: &str, reason: &str, message: &str) -> DeploymentCondition {
    let now = Time(jiff::Timestamp::now());
    DeploymentCondition {
        type_: Some(type_.to_string()),
        status: Some(status.to_string()),
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

/// Upstream's `SetDeploymentCondition`: same status and reason is no
/// change; same status keeps the transition time.
fn set_condition(status: &mut DeploymentStatus, mut new: DeploymentCondition) {
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    if let Some(current) = conditions.iter().find(|c| c.type_ == new.type_) {
        if current.status == new.status && current.reason == new.reason {
            return;
        }
        if current.status == new.status {
            new.last_transition_time = current.last_transition_time.clone();
        }
    }
    conditions.retain(|c| c.type_ != new.type_);
    conditions.push(new);
}

/// Counts from the ReplicaSets, and the Available condition.
pub fn calculate_status(
    d: &Deployment,
    new_rs: Option<&ReplicaSet>,
    old: &[ReplicaSet],
) -> DeploymentStatus {
    let mut all: Vec<&ReplicaSet> = old.iter().collect();
    if let Some(n) = new_rs {
        all.push(n);
    }
    let status_of = |rs: &ReplicaSet| rs.status.clone().unwrap_or_default();
    let available: i32 = all.iter().map(|rs| available_of(rs)).sum();
    let spec_total: i32 = all.iter().map(|rs| replicas_of(rs)).sum();
    let actual: i32 = all.iter().map(|rs| status_of(rs).replicas).sum();
    let ready: i32 = all
        .iter()
        .map(|rs| status_of(rs).ready_replicas.unwrap_or(0))
        .sum();
    let updated = new_rs.map(|n| status_of(n).replicas).unwrap_or(0);
    let old_status = d.status.clone().unwrap_or_default();
    let mut status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(actual),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        unavailable_replicas: Some((spec_total - available).max(0)),
        collision_count: old_status.collision_count,
        conditions: old_status.conditions.clone(),
        terminating_replicas: old_status.terminating_replicas,
    };
    let desired = d.spec.replicas.unwrap_or(1);
    if available >= desired - max_unavailable(d) {
        set_condition(
            &mut status,
            new_condition(
                "Available",
                "True",
                reason::MIN_AVAILABLE,
                "Deployment has minimum availability.",
            ),
        );
    } else {
        set_condition(
            &mut status,
            new_condition(
                "Available",
                "False",
                reason::MIN_UNAVAILABLE,
                "Deployment does not have minimum availability.",
            ),
        );
    }
    status
}

/// Upstream's `DeploymentComplete`.
pub fn deployment_complete(d: &Deployment, status: &DeploymentStatus) -> bool {
    let desired = d.spec.replicas.unwrap_or(1);
    status.updated_replicas == Some(desired)
        && status.replicas == Some(desired)
        && status.available_replicas == Some(desired)
        && status.observed_generation >= d.metadata.generation
}

/// Upstream's `DeploymentProgressing`: more updated, ready or available
/// replicas, or fewer old ones, than the last status.
fn deployment_progressing(d: &Deployment, new: &DeploymentStatus) -> bool {
    let old = d.status.clone().unwrap_or_default();
    let n = |v: Option<i32>| v.unwrap_or(0);
    let old_old = n(old.replicas) - n(old.updated_replicas);
    let new_old = n(new.replicas) - n(new.updated_replicas);
    n(new.updated_replicas) > n(old.updated_replicas)
        || new_old < old_old
        || n(new.ready_replicas) > n(old.ready_replicas)
        || n(new.available_replicas) > n(old.available_replicas)
}

/// Upstream's `DeploymentTimedOut`.
fn deployment_timed_out(d: &Deployment, status: &DeploymentStatus, now: jiff::Timestamp) -> bool {
    if !has_progress_deadline(d) {
        return false;
    }
    let Some(cond) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_.as_deref() == Some("Progressing"))
    else {
        return false;
    };
    match cond.reason.as_deref() {
        Some(reason::NEW_RS_AVAILABLE) => false,
        Some(reason::TIMED_OUT) => true,
        _ => {
            let deadline = i64::from(d.spec.progress_deadline_seconds.unwrap_or(600));
            cond.last_update_time
                .as_ref()
                .is_some_and(|from| from.0 + jiff::SignedDuration::from_secs(deadline) < now)
        }
    }
}

/// The full status after a rollout step, with the Progressing condition
/// (upstream's `syncRolloutStatus`).
pub fn rollout_status(
    d: &Deployment,
    new_rs: Option<&ReplicaSet>,
    old: &[ReplicaSet],
    now: jiff::Timestamp,
) -> DeploymentStatus {
    let mut status = calculate_status(d, new_rs, old);
    if !has_progress_deadline(d)
        && let Some(c) = status.conditions.as_mut()
    {
        c.retain(|c| c.type_.as_deref() != Some("Progressing"));
    }
    let current = condition(d, "Progressing");
    let complete_before = status.replicas == status.updated_replicas
        && current
            .as_ref()
            .is_some_and(|c| c.reason.as_deref() == Some(reason::NEW_RS_AVAILABLE));
    let rs_name = new_rs.and_then(|n| n.metadata.name.clone());
    let subject = match &rs_name {
        Some(name) => format!("ReplicaSet {name:?}"),
        None => format!(
            "Deployment {:?}",
            d.metadata.name.as_deref().unwrap_or_default()
        ),
    };
    if has_progress_deadline(d) && !complete_before {
        if deployment_complete(d, &status) {
            set_condition(
                &mut status,
                new_condition(
                    "Progressing",
                    "True",
                    reason::NEW_RS_AVAILABLE,
                    &format!("{subject} has successfully progressed."),
                ),
            );
        } else if deployment_progressing(d, &status) {
            let mut cond = new_condition(
                "Progressing",
                "True",
                reason::RS_UPDATED,
                &format!("{subject} is progressing."),
            );
            cond.last_update_time = Some(Time(now));
            if let Some(current) = &current {
                if current.status.as_deref() == Some("True") {
                    cond.last_transition_time = current.last_transition_time.clone();
                }
                if let Some(c) = status.conditions.as_mut() {
                    c.retain(|c| c.type_.as_deref() != Some("Progressing"));
                }
            }
            set_condition(&mut status, cond);
        } else if deployment_timed_out(d, &status, now) {
            set_condition(
                &mut status,
                new_condition(
                    "Progressing",
                    "False",
                    reason::TIMED_OUT,
                    &format!("{subject} has timed out progressing."),
                ),
            );
        }
    }
    // Carry a ReplicaSet's ReplicaFailure over.
    let mut all: Vec<&ReplicaSet> = old.iter().collect();
    if let Some(n) = new_rs {
        all.insert(0, n);
    }
    let failure = all.iter().find_map(|rs| {
        rs.status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_.as_deref() == Some("ReplicaFailure"))
            .cloned()
    });
    match failure {
        Some(f) => set_condition(
            &mut status,
            DeploymentCondition {
                type_: Some("ReplicaFailure".into()),
                status: f.status,
                reason: f.reason,
                message: f.message,
                last_update_time: f.last_transition_time.clone(),
                last_transition_time: f.last_transition_time,
            },
        ),
        None => {
            if let Some(c) = status.conditions.as_mut() {
                c.retain(|c| c.type_.as_deref() != Some("ReplicaFailure"));
            }
        }
    }
    if status.conditions.as_ref().is_some_and(Vec::is_empty) {
        status.conditions = None;
    }
    status
}

/// When to look again at a rollout that is neither complete nor timed out:
/// when its progress deadline would pass.
fn stuck_requeue(
    d: &Deployment,
    status: &DeploymentStatus,
    now: jiff::Timestamp,
) -> Option<Duration> {
    if !has_progress_deadline(d) {
        return None;
    }
    let cond = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_.as_deref() == Some("Progressing"))?;
    if deployment_complete(d, status) || cond.reason.as_deref() == Some(reason::TIMED_OUT) {
        return None;
    }
    let deadline = i64::from(d.spec.progress_deadline_seconds.unwrap_or(600));
    let from = cond.last_update_time.as_ref()?.0;
    let secs = (from + jiff::SignedDuration::from_secs(deadline))
        .duration_since(now)
        .as_secs()
        .max(0);
    Some(Duration::from_secs(u64::try_from(secs).unwrap_or(0) + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{
        DeploymentSpec, DeploymentStrategy, ReplicaSetStatus, RollingUpdateDeployment,
    };
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use std::collections::VecDeque;

    fn template(image: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
                ..ObjectMeta::default()
            }),
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    image: Some(image.into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
        }
    }

    fn deployment(replicas: i32, surge: IntOrString, unavailable: IntOrString) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("d-uid".into()),
                generation: Some(1),
                ..ObjectMeta::default()
            },
            spec: DeploymentSpec {
                replicas: Some(replicas),
                selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
                    ..LabelSelector::default()
                },
                template: template("nginx:2"),
                strategy: Some(DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(surge),
                        max_unavailable: Some(unavailable),
                    }),
                }),
                revision_history_limit: Some(10),
                progress_deadline_seconds: Some(600),
                ..DeploymentSpec::default()
            },
            status: None,
        }
    }

    fn set(
        name: &str,
        image: &str,
        replicas: i32,
        available: i32,
        revision: i64,
        created: i64,
    ) -> ReplicaSet {
        ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                generation: Some(1),
                creation_timestamp: Some(Time(jiff::Timestamp::from_second(created).expect("ts"))),
                annotations: Some(BTreeMap::from([(
                    REVISION.to_string(),
                    revision.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            spec: ReplicaSetSpec {
                replicas: Some(replicas),
                template: Some(template(image)),
                ..ReplicaSetSpec::default()
            },
            status: Some(ReplicaSetStatus {
                replicas,
                ready_replicas: Some(available),
                available_replicas: Some(available),
                observed_generation: Some(1),
                ..ReplicaSetStatus::default()
            }),
        }
    }

    fn pct(s: &str) -> IntOrString {
        IntOrString::String(s.into())
    }

    #[test]
    fn fenceposts_round_surge_up_and_unavailable_down() {
        assert_eq!(
            resolve_fenceposts(&deployment(10, pct("25%"), pct("25%"))),
            (3, 2)
        );
        assert_eq!(
            resolve_fenceposts(&deployment(1, pct("25%"), pct("25%"))),
            (1, 0)
        );
        assert_eq!(
            resolve_fenceposts(&deployment(5, IntOrString::Int(0), IntOrString::Int(0))),
            (0, 1)
        );
        assert_eq!(
            max_unavailable(&deployment(2, IntOrString::Int(0), IntOrString::Int(5))),
            2,
            "capped at replicas"
        );
        let mut recreate = deployment(4, pct("25%"), pct("25%"));
        recreate.spec.strategy = Some(DeploymentStrategy {
            type_: Some("Recreate".into()),
            rolling_update: None,
        });
        assert_eq!((max_surge(&recreate), max_unavailable(&recreate)), (0, 0));
        assert_eq!(
            new_set_replicas(&recreate, &[set("a", "nginx:1", 4, 4, 1, 1)], None),
            4
        );
    }

    #[test]
    fn the_new_set_grows_within_max_surge() {
        let d = deployment(10, pct("25%"), pct("25%"));
        let old = [set("old", "nginx:1", 10, 10, 1, 1)];
        assert_eq!(new_set_replicas(&d, &old, None), 3);
        let new = set("new", "nginx:2", 3, 0, 2, 2);
        assert_eq!(
            new_set_replicas(&d, &old, Some(&new)),
            3,
            "already at 13 pods"
        );
        let old = [set("old", "nginx:1", 2, 2, 1, 1)];
        let new = set("new", "nginx:2", 9, 9, 2, 2);
        assert_eq!(
            new_set_replicas(&d, &old, Some(&new)),
            10,
            "never beyond spec.replicas"
        );
    }

    #[test]
    fn old_sets_shrink_within_max_unavailable() {
        let d = deployment(10, pct("25%"), pct("25%"));
        // 10 old available, 3 new not yet available: 13 pods, may lose 2.
        let old = [set("old", "nginx:1", 10, 10, 1, 1)];
        let new = set("new", "nginx:2", 3, 0, 2, 2);
        assert_eq!(plan_old_scale_down(&d, &new, &old), vec![8]);
        // Unhealthy old replicas go first and do not count against availability.
        let old = [
            set("older", "nginx:0", 2, 0, 1, 1),
            set("old", "nginx:1", 8, 8, 2, 2),
        ];
        let new = set("new", "nginx:2", 3, 3, 3, 3);
        assert_eq!(plan_old_scale_down(&d, &new, &old), vec![0, 5]);
        // Nothing may go while the new pods are unavailable and the old ones are at the floor.
        let old = [set("old", "nginx:1", 8, 8, 1, 1)];
        let new = set("new", "nginx:2", 5, 0, 2, 2);
        assert_eq!(plan_old_scale_down(&d, &new, &old), vec![8]);
        // Just scaled from 5 to 4, its status still counting 5: only as many
        // go as the new ReplicaSet has made available since (one).
        let d = deployment(5, IntOrString::Int(1), IntOrString::Int(1));
        let old = [set("old", "nginx:1", 4, 5, 1, 1)];
        let new = set("new", "nginx:2", 2, 1, 2, 2);
        assert_eq!(plan_old_scale_down(&d, &new, &old), vec![3]);
    }

    /// A whole rollout with pods that become available one step after
    /// they are created: at no step are there more than replicas+maxSurge
    /// pods or fewer than replicas-maxUnavailable available ones. The old
    /// ReplicaSets' status lags by `lag` steps, as a busy ReplicaSet
    /// controller's does: a scale-down shows there only later, and until
    /// then the status counts pods that are already gone (or, worse for
    /// the surge, still there).
    #[test]
    fn a_simulated_rollout_respects_both_bounds_at_every_step() {
        for lag in 0..4 {
            for (replicas, surge, unavailable) in [
                (10, pct("25%"), pct("25%")),
                (5, IntOrString::Int(1), IntOrString::Int(0)),
                (5, IntOrString::Int(0), IntOrString::Int(1)),
                (5, IntOrString::Int(1), IntOrString::Int(1)),
                (7, pct("50%"), pct("10%")),
            ] {
                let d = deployment(replicas, surge, unavailable);
                simulate_rollout(&d, lag);
            }
        }
    }

    fn simulate_rollout(d: &Deployment, lag: usize) {
        let replicas = d.spec.replicas.expect("replicas");
        let (max_surge, max_unavailable) = (max_surge(d), max_unavailable(d));
        let mut old = vec![set("old", "nginx:1", replicas, replicas, 1, 1)];
        // What the old pods really are, and the reports still on their way.
        // Worst cases: a scale-down makes pods unavailable at once, but
        // deletes them only when its report comes.
        let mut old_available = vec![replicas];
        let mut old_pods = vec![replicas];
        let mut reports: VecDeque<(Vec<i32>, Vec<i32>)> = VecDeque::new();
        let mut new = set("new", "nginx:2", 0, 0, 2, 2);
        for step in 0..200 {
            let target = new_set_replicas(d, &old, Some(&new));
            if target != replicas_of(&new) {
                new.spec.replicas = Some(target);
            } else {
                let targets = plan_old_scale_down(d, &new, &old);
                for ((rs, t), really) in old.iter_mut().zip(targets).zip(&mut old_available) {
                    rs.spec.replicas = Some(t);
                    *really = (*really).min(t);
                }
            }
            let total: i32 = old_pods.iter().sum::<i32>() + replicas_of(&new);
            let available: i32 = old_available.iter().sum::<i32>() + available_of(&new);
            assert!(
                total <= replicas + max_surge,
                "lag {lag}, step {step}: {total} pods > {replicas}+{max_surge}"
            );
            assert!(
                available >= replicas - max_unavailable,
                "lag {lag}, step {step}: {available} available < {replicas}-{max_unavailable}"
            );
            reports.push_back((old_available.clone(), old.iter().map(replicas_of).collect()));
            if reports.len() > lag {
                let (available, pods) = reports.pop_front().expect("a report");
                for ((rs, available), pods) in old.iter_mut().zip(available).zip(&pods) {
                    let status = rs.status.as_mut().expect("status");
                    status.available_replicas = Some(available);
                    status.replicas = *pods;
                }
                old_pods = pods;
            }
            // The new ReplicaSet's pods become available a step later.
            let size = replicas_of(&new);
            let status = new.status.as_mut().expect("status");
            status.available_replicas = Some(size);
            status.replicas = size;
            if replicas_of(&new) == replicas && old.iter().all(|rs| replicas_of(rs) == 0) {
                return;
            }
        }
        panic!("lag {lag}: the rollout of {replicas} did not finish");
    }

    #[test]
    fn revisions_follow_rollbacks() {
        let mut d = deployment(3, pct("25%"), pct("25%"));
        d.spec.template = template("nginx:1");
        d.metadata.annotations = Some(BTreeMap::from([
            ("kubernetes.io/change-cause".to_string(), "undo".to_string()),
            (
                "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                "{}".to_string(),
            ),
        ]));
        let sets = vec![
            set("web-one", "nginx:1", 0, 0, 1, 1),
            set("web-two", "nginx:2", 3, 3, 2, 2),
        ];
        let new_index = find_new_set(&d, &sets).expect("the rolled-back-to template has a set");
        assert_eq!(new_index, 0);
        let old: Vec<ReplicaSet> = vec![sets[1].clone()];
        let mut rs = sets[0].clone();
        assert!(set_new_set_annotations(&d, &mut rs, max_revision(&old) + 1));
        let annotations = rs.metadata.annotations.clone().expect("annotations");
        assert_eq!(annotations.get(REVISION).map(String::as_str), Some("3"));
        assert_eq!(
            annotations.get(REVISION_HISTORY).map(String::as_str),
            Some("1")
        );
        assert_eq!(
            annotations
                .get("kubernetes.io/change-cause")
                .map(String::as_str),
            Some("undo")
        );
        assert!(!annotations.contains_key("kubectl.kubernetes.io/last-applied-configuration"));
        assert!(
            !set_new_set_annotations(&d, &mut rs, 3),
            "nothing changes the second time"
        );
    }

    #[test]
    fn a_new_set_carries_the_hash_and_annotations() {
        let d = deployment(4, pct("25%"), pct("25%"));
        let old = [set("web-old", "nginx:1", 4, 4, 1, 1)];
        let rs = new_set_for(&d, &old, 2);
        let hash = pods::compute_hash(&d.spec.template, None);
        assert_eq!(
            rs.metadata.name.as_deref(),
            Some(format!("web-{hash}").as_str())
        );
        assert_eq!(
            rs.spec
                .selector
                .match_labels
                .as_ref()
                .and_then(|m| m.get(pods::POD_TEMPLATE_HASH)),
            Some(&hash)
        );
        let labels = rs
            .spec
            .template
            .as_ref()
            .and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .expect("labels");
        assert_eq!(labels.get(pods::POD_TEMPLATE_HASH), Some(&hash));
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(rs.spec.replicas, Some(1), "4 + surge 1 - 4 old");
        let annotations = rs.metadata.annotations.clone().expect("annotations");
        assert_eq!(annotations.get(REVISION).map(String::as_str), Some("2"));
        assert_eq!(
            annotations.get(DESIRED_REPLICAS).map(String::as_str),
            Some("4")
        );
        assert_eq!(annotations.get(MAX_REPLICAS).map(String::as_str), Some("5"));
        assert_eq!(
            controller_of(&rs.metadata).map(|r| r.uid.as_str()),
            Some("d-uid")
        );
        assert!(pods::templates_equal_ignoring_hash(
            rs.spec.template.as_ref().expect("template"),
            &d.spec.template
        ));
    }

    #[test]
    fn resizing_mid_rollout_is_proportional() {
        let mut d = deployment(20, pct("25%"), pct("25%"));
        let mut old = set("old", "nginx:1", 8, 8, 1, 1);
        let mut new = set("new", "nginx:2", 5, 0, 2, 2);
        for rs in [&mut old, &mut new] {
            let a = rs.metadata.annotations.as_mut().expect("annotations");
            a.insert(DESIRED_REPLICAS.into(), "10".into());
            a.insert(MAX_REPLICAS.into(), "13".into());
        }
        assert!(is_scaling_event(&d, &[old.clone(), new.clone()]));
        let mut plan = plan_scale(&d, Some(&new), std::slice::from_ref(&old));
        plan.sort();
        assert_eq!(plan, vec![("new".to_string(), 10), ("old".to_string(), 15)]);
        // A single active set simply takes the new size.
        d.spec.replicas = Some(2);
        let only = set("only", "nginx:2", 5, 5, 1, 1);
        assert_eq!(
            plan_scale(&d, Some(&only), &[]),
            vec![("only".to_string(), 2)]
        );
    }

    #[test]
    fn history_beyond_the_limit_is_cleaned_lowest_revision_first() {
        let mut d = deployment(3, pct("25%"), pct("25%"));
        d.spec.revision_history_limit = Some(1);
        let old = [
            set("r2", "a", 0, 0, 2, 2),
            set("r1", "b", 0, 0, 1, 1),
            set("r3", "c", 0, 0, 3, 3),
            set("r4", "d", 1, 1, 4, 4),
        ];
        assert_eq!(
            sets_to_clean_up(&d, &old),
            vec!["r1".to_string(), "r2".to_string(), "r3".to_string()]
        );
        d.spec.revision_history_limit = Some(3);
        assert_eq!(sets_to_clean_up(&d, &old), vec!["r1".to_string()]);
        d.spec.revision_history_limit = Some(0);
        assert_eq!(
            sets_to_clean_up(&d, &old).len(),
            3,
            "r4 still has a replica"
        );
    }

    #[test]
    fn progressing_and_available_conditions() {
        let now = jiff::Timestamp::now();
        let mut d = deployment(3, pct("25%"), pct("25%"));
        let new = set("web-new", "nginx:2", 3, 3, 2, 2);
        let status = rollout_status(&d, Some(&new), &[], now);
        let get = |s: &DeploymentStatus, t: &str| {
            s.conditions
                .iter()
                .flatten()
                .find(|c| c.type_.as_deref() == Some(t))
                .cloned()
                .expect("condition")
        };
        assert_eq!(
            get(&status, "Progressing").reason.as_deref(),
            Some(reason::NEW_RS_AVAILABLE)
        );
        assert_eq!(
            get(&status, "Available").reason.as_deref(),
            Some(reason::MIN_AVAILABLE)
        );
        assert_eq!(
            (
                status.replicas,
                status.updated_replicas,
                status.available_replicas
            ),
            (Some(3), Some(3), Some(3))
        );
        assert_eq!(status.unavailable_replicas, Some(0));

        // Mid-rollout with progress: ReplicaSetUpdated.
        let old = set("web-old", "nginx:1", 2, 2, 1, 1);
        let partial = set("web-new", "nginx:2", 2, 0, 2, 2);
        let status = rollout_status(&d, Some(&partial), std::slice::from_ref(&old), now);
        assert_eq!(
            get(&status, "Progressing").reason.as_deref(),
            Some(reason::RS_UPDATED)
        );
        assert_eq!(
            get(&status, "Available").reason.as_deref(),
            Some(reason::MIN_UNAVAILABLE),
            "2 of 3 available, 0 may be missing"
        );
        assert!(stuck_requeue(&d, &status, now).is_some_and(|d| d > Duration::from_secs(590)));

        // No progress since the condition was last updated 601 s ago: timed out.
        d.status = Some(status.clone());
        let later = now + jiff::SignedDuration::from_secs(601);
        let stalled = rollout_status(&d, Some(&partial), std::slice::from_ref(&old), later);
        let progressing = get(&stalled, "Progressing");
        assert_eq!(progressing.reason.as_deref(), Some(reason::TIMED_OUT));
        assert_eq!(progressing.status.as_deref(), Some("False"));
    }
}
