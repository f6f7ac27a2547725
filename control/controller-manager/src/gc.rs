//! The garbage collector: deletes objects whose owners are gone, and
//! carries out foreground and orphan deletion of owners.
//!
//! It watches every served kind (through kube's dynamic API) into one
//! graph indexed by uid, with an owner uid → dependents index, so that an
//! event only re-examines the objects it concerns:
//!
//! - a dependent all of whose owners (by uid) are gone is deleted in the
//!   background (each owner's absence is confirmed with a live read first);
//! - an owner being deleted with the `foregroundDeletion` finalizer gets its
//!   dependents deleted (in the foreground too) and loses the finalizer once
//!   no dependent with `blockOwnerDeletion` is left;
//! - an owner being deleted with the `orphan` finalizer gets the owner
//!   references to it removed from its dependents, then loses the finalizer.
//!
//! Nothing is decided before every kind has been listed once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{
    Api, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions, PropagationPolicy,
};
use kube::discovery::ApiResource;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Context;
use skiff_common::error::is_status;
use skiff_common::registry::{self, RESOURCES, ResourceInfo};
use skiff_common::trimmed::MetadataOnly;
use skiff_common::watch::{Change, watch_api};
use skiff_common::workqueue::WorkQueue;

/// The finalizer of owners deleted with foreground propagation.
pub const FOREGROUND: &str = "foregroundDeletion";
/// The finalizer of owners deleted with orphan propagation.
pub const ORPHAN: &str = "orphan";

/// What the collector knows of one object.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Its kind, an index into [`RESOURCES`].
    pub resource: usize,
    /// Its namespace, for namespaced kinds.
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
    /// Its owner references.
    pub owners: Vec<OwnerReference>,
    /// Its finalizers.
    pub finalizers: Vec<String>,
    /// Whether it has a deletionTimestamp.
    pub deleting: bool,
}

impl Node {
    /// The node of a dynamic object of kind `resource`, with its uid.
    pub fn of(resource: usize, meta: &ObjectMeta) -> Option<(String, Node)> {
        Some((
            meta.uid.clone()?,
            Node {
                resource,
                namespace: meta.namespace.clone(),
                name: meta.name.clone()?,
                owners: meta.owner_references.clone().unwrap_or_default(),
                finalizers: meta.finalizers.clone().unwrap_or_default(),
                deleting: meta.deletion_timestamp.is_some(),
            },
        ))
    }
}

/// Every object by uid, and the dependents of every owner uid.
#[derive(Debug, Default)]
pub struct Graph {
    nodes: HashMap<String, Node>,
    dependents: HashMap<String, HashSet<String>>,
}

impl Graph {
    /// Insert or replace `uid`; returns the uids to re-examine: the object,
    /// its old and new owners, and its dependents. None if the object is
    /// unchanged in all the graph holds of it (a status or spec update):
    /// decisions read only the graph, so none of them changes. An owner's
    /// status updates would otherwise re-examine each of its dependents,
    /// every time.
    pub fn upsert(&mut self, uid: &str, node: Node) -> Vec<String> {
        let old = self.nodes.get(uid);
        if old == Some(&node) {
            return Vec::new();
        }
        let mut touched = vec![uid.to_string()];
        if let Some(old) = old {
            for owner in &old.owners {
                touched.push(owner.uid.clone());
                if let Some(set) = self.dependents.get_mut(&owner.uid) {
                    set.remove(uid);
                    if set.is_empty() {
                        self.dependents.remove(&owner.uid);
                    }
                }
            }
        }
        for owner in &node.owners {
            touched.push(owner.uid.clone());
            self.dependents
                .entry(owner.uid.clone())
                .or_default()
                .insert(uid.to_string());
        }
        touched.extend(self.dependents.get(uid).into_iter().flatten().cloned());
        self.nodes.insert(uid.to_string(), node);
        touched
    }

    /// Remove `uid`; returns the uids to re-examine: its owners and dependents.
    pub fn remove(&mut self, uid: &str) -> Vec<String> {
        let mut touched = Vec::new();
        if let Some(old) = self.nodes.remove(uid) {
            for owner in &old.owners {
                touched.push(owner.uid.clone());
                if let Some(set) = self.dependents.get_mut(&owner.uid) {
                    set.remove(uid);
                    if set.is_empty() {
                        self.dependents.remove(&owner.uid);
                    }
                }
            }
        }
        touched.extend(self.dependents.get(uid).into_iter().flatten().cloned());
        touched
    }

    /// The object `uid`.
    pub fn get(&self, uid: &str) -> Option<&Node> {
        self.nodes.get(uid)
    }

    /// The uids of the objects of kind `resource`.
    fn uids_of(&self, resource: usize) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.resource == resource)
            .map(|(uid, _)| uid.clone())
            .collect()
    }

    /// The dependents of `owner` (sorted by uid).
    fn dependents_of(&self, owner: &str) -> Vec<(&str, &Node)> {
        let mut deps: Vec<(&str, &Node)> = self
            .dependents
            .get(owner)
            .into_iter()
            .flatten()
            .filter_map(|uid| Some((uid.as_str(), self.nodes.get(uid)?)))
            .collect();
        deps.sort_by(|a, b| a.0.cmp(b.0));
        deps
    }
}

/// What the collector does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcAction {
    /// Delete `uid` with `foreground` (or background) propagation.
    Delete {
        /// The object.
        uid: String,
        /// Foreground propagation (else background).
        foreground: bool,
    },
    /// Remove `finalizer` from `uid`.
    RemoveFinalizer {
        /// The object.
        uid: String,
        /// The finalizer.
        finalizer: String,
    },
    /// Remove the owner reference to `owner` from `dependent`.
    Orphan {
        /// The dependent.
        dependent: String,
        /// The owner.
        owner: String,
    },
}

/// What object `uid` needs, given the graph.
pub fn decide(graph: &Graph, uid: &str) -> Vec<GcAction> {
    let Some(node) = graph.get(uid) else {
        return Vec::new();
    };
    let mut actions = Vec::new();
    let has = |f: &str| node.finalizers.iter().any(|x| x == f);
    if node.deleting && has(ORPHAN) {
        let dependents = graph.dependents_of(uid);
        if dependents.is_empty() {
            actions.push(GcAction::RemoveFinalizer {
                uid: uid.to_string(),
                finalizer: ORPHAN.to_string(),
            });
        }
        actions.extend(
            dependents
                .into_iter()
                .map(|(dependent, _)| GcAction::Orphan {
                    dependent: dependent.to_string(),
                    owner: uid.to_string(),
                }),
        );
    } else if node.deleting && has(FOREGROUND) {
        let dependents = graph.dependents_of(uid);
        let mut blocking = 0;
        for (dependent, dep) in dependents {
            if dep
                .owners
                .iter()
                .any(|o| o.uid == uid && o.block_owner_deletion == Some(true))
            {
                blocking += 1;
            }
            if !dep.deleting {
                actions.push(GcAction::Delete {
                    uid: dependent.to_string(),
                    foreground: true,
                });
            }
        }
        if blocking == 0 {
            actions.push(GcAction::RemoveFinalizer {
                uid: uid.to_string(),
                finalizer: FOREGROUND.to_string(),
            });
        }
    }
    if !node.owners.is_empty()
        && !node.deleting
        && node.owners.iter().all(|o| graph.get(&o.uid).is_none())
    {
        actions.push(GcAction::Delete {
            uid: uid.to_string(),
            foreground: false,
        });
    }
    actions
}

fn api_resource(info: &ResourceInfo) -> ApiResource {
    ApiResource {
        group: info.group.to_string(),
        version: info.version.to_string(),
        api_version: info.api_version(),
        kind: info.kind.to_string(),
        plural: info.plural.to_string(),
    }
}

fn api_for(
    client: &kube::Client,
    info: &ResourceInfo,
    namespace: Option<&str>,
) -> Api<DynamicObject> {
    let resource = api_resource(info);
    match (info.namespaced, namespace) {
        (true, Some(namespace)) => Api::namespaced_with(client.clone(), namespace, &resource),
        _ => Api::all_with(client.clone(), &resource),
    }
}

/// The shared state of the watchers and the worker.
struct State {
    graph: Mutex<Graph>,
    /// The uids to re-examine.
    queue: Arc<WorkQueue>,
    synced: Mutex<Vec<bool>>,
}

impl State {
    /// Fold one change of resource `index`'s watch into the graph, and
    /// queue the objects it concerns.
    fn observe<T>(&self, index: usize, change: Change<T>, meta: impl Fn(&T) -> &ObjectMeta) {
        let touched = {
            let mut graph = self.graph.lock().expect("gc graph lock");
            match change {
                Change::Applied(object) => match Node::of(index, meta(&object)) {
                    Some((uid, node)) => graph.upsert(&uid, node),
                    None => Vec::new(),
                },
                Change::Deleted(object) => match meta(&object).uid.as_deref() {
                    Some(uid) => graph.remove(uid),
                    None => Vec::new(),
                },
                Change::Resynced(objects) => {
                    let mut touched = Vec::new();
                    let mut listed = HashSet::new();
                    for object in &objects {
                        if let Some((uid, node)) = Node::of(index, meta(object)) {
                            listed.insert(uid.clone());
                            touched.extend(graph.upsert(&uid, node));
                        }
                    }
                    touched.extend(self.relisted(&mut graph, index, &listed));
                    touched
                }
            }
        };
        for uid in touched {
            self.queue.add(&uid);
        }
    }

    /// After a complete list of resource `index`, whose uids are `listed`:
    /// the objects gone while its watch was down are removed, and on its
    /// first list every object of it is re-examined. Returns the uids to
    /// re-examine.
    fn relisted(&self, graph: &mut Graph, index: usize, listed: &HashSet<String>) -> Vec<String> {
        let mut touched = Vec::new();
        for uid in graph.uids_of(index) {
            if !listed.contains(&uid) {
                touched.extend(graph.remove(&uid));
            }
        }
        let first = {
            let mut synced = self.synced.lock().expect("gc synced lock");
            !std::mem::replace(&mut synced[index], true)
        };
        if first {
            touched.extend(graph.uids_of(index));
        }
        touched
    }

    fn all_synced(&self) -> bool {
        self.synced
            .lock()
            .expect("gc synced lock")
            .iter()
            .all(|s| *s)
    }
}

/// How many objects are collected at once.
const WORKERS: usize = 16;

/// A collection step that failed; the object is examined again, rate-limited.
#[derive(Debug, thiserror::Error)]
#[error("cannot carry out {action:?}")]
struct CollectError {
    /// What was attempted.
    action: GcAction,
    /// The API's error.
    #[source]
    source: kube::Error,
}

/// Run the collector until `shutdown`: one watch per served kind feeds the
/// graph, and [`WORKERS`] workers of the shared work queue examine the
/// objects each change concerns, once every kind has been listed.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let state = Arc::new(State {
        graph: Mutex::new(Graph::default()),
        queue: Arc::new(WorkQueue::new()),
        synced: Mutex::new(vec![false; RESOURCES.len()]),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (index, info) in RESOURCES.iter().enumerate() {
        let (ctx, state, shutdown) = (ctx.clone(), state.clone(), shutdown.clone());
        if info.group.is_empty() && info.plural == "pods" {
            // Pods come from the process's shared pod watch (as the other
            // controllers' do) rather than a metadata watch of their own:
            // pods change the most, and decoding each change once more cost
            // ~2% of skiff-control's CPU under load.
            tasks.spawn(async move {
                let pods = ctx.pods.clone();
                pods.watch(shutdown, |change| {
                    state.observe(index, change, |pod| &pod.metadata)
                })
                .await;
            });
        } else {
            // Only metadata is read (upstream's collector uses metadata
            // informers).
            let api: Api<MetadataOnly<DynamicObject>> =
                Api::all_with(ctx.client.clone(), &api_resource(info));
            tasks.spawn(async move {
                watch_api(api, shutdown, |change| {
                    state.observe(index, change, |object| &object.metadata)
                })
                .await;
            });
        }
    }
    for _ in 0..WORKERS {
        let (ctx, state, shutdown) = (ctx.clone(), state.clone(), shutdown.clone());
        tasks.spawn(async move {
            let queue = state.queue.clone();
            let synced = || state.all_synced();
            queue
                .run_worker("garbage collection", synced, &shutdown, |uid| {
                    let (ctx, state) = (ctx.clone(), state.clone());
                    async move { collect(&ctx, &state, &uid).await.map(|()| None) }
                })
                .await;
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Carry out what the graph says of `uid`.
async fn collect(ctx: &Context, state: &State, uid: &str) -> Result<(), CollectError> {
    let actions: Vec<(GcAction, Option<Node>)> = {
        let graph = state.graph.lock().expect("gc graph lock");
        decide(&graph, uid)
            .into_iter()
            .map(|action| {
                let target = match &action {
                    GcAction::Delete { uid, .. } | GcAction::RemoveFinalizer { uid, .. } => uid,
                    GcAction::Orphan { dependent, .. } => dependent,
                };
                let node = graph.get(target).cloned();
                (action, node)
            })
            .collect()
    };
    for (action, node) in actions {
        let Some(node) = node else { continue };
        if let Err(source) = execute(ctx, &action, &node).await {
            return Err(CollectError { action, source });
        }
    }
    Ok(())
}

/// Whether the owner `reference` of an object in `namespace` exists (a
/// live read: the graph may lag). Owners of unknown kinds count as present.
async fn owner_exists(
    ctx: &Context,
    namespace: Option<&str>,
    reference: &OwnerReference,
) -> Result<bool, kube::Error> {
    let Some(info) = registry::find_kind(&reference.api_version, &reference.kind) else {
        return Ok(true);
    };
    let api = api_for(&ctx.client, info, namespace);
    let found = api.get_opt(&reference.name).await?;
    Ok(found.is_some_and(|o| o.metadata.uid.as_deref() == Some(reference.uid.as_str())))
}

async fn execute(ctx: &Context, action: &GcAction, node: &Node) -> Result<(), kube::Error> {
    let info = &RESOURCES[node.resource];
    let api = api_for(&ctx.client, info, node.namespace.as_deref());
    match action {
        GcAction::Delete { uid, foreground } => {
            if !foreground {
                for owner in &node.owners {
                    if owner_exists(ctx, node.namespace.as_deref(), owner).await? {
                        return Ok(());
                    }
                }
            }
            let params = DeleteParams {
                propagation_policy: Some(if *foreground {
                    PropagationPolicy::Foreground
                } else {
                    PropagationPolicy::Background
                }),
                preconditions: Some(Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&node.name, &params).await {
                Ok(_) => {
                    tracing::info!(
                        kind = info.kind,
                        namespace = node.namespace,
                        name = node.name,
                        foreground,
                        "garbage collected"
                    );
                    Ok(())
                }
                Err(error) if is_status(&error, 404) || is_status(&error, 409) => Ok(()),
                Err(error) => Err(error),
            }
        }
        GcAction::RemoveFinalizer { uid, finalizer } => {
            let Some(current) = api.get_opt(&node.name).await? else {
                return Ok(());
            };
            if current.metadata.uid.as_deref() != Some(uid.as_str()) {
                return Ok(());
            }
            let finalizers: Vec<String> = current
                .metadata
                .finalizers
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|f| f != finalizer)
                .collect();
            let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": current.metadata.resource_version}});
            ignore_gone(
                api.patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await,
            )
        }
        GcAction::Orphan { dependent, owner } => {
            let Some(current) = api.get_opt(&node.name).await? else {
                return Ok(());
            };
            if current.metadata.uid.as_deref() != Some(dependent.as_str()) {
                return Ok(());
            }
            let owners: Vec<OwnerReference> = current
                .metadata
                .owner_references
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|o| o.uid != *owner)
                .collect();
            let owners = if owners.is_empty() {
                serde_json::Value::Null
            } else {
                json!(owners)
            };
            let patch = json!({"metadata": {"ownerReferences": owners, "resourceVersion": current.metadata.resource_version}});
            ignore_gone(
                api.patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await,
            )
        }
    }
}

fn ignore_gone(result: Result<DynamicObject, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(error) if is_status(&error, 404) => Ok(()),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner_ref(uid: &str, block: bool) -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: format!("cm-{uid}"),
            uid: uid.into(),
            block_owner_deletion: block.then_some(true),
            controller: None,
        }
    }

    fn node(owners: Vec<OwnerReference>, finalizers: &[&str], deleting: bool) -> Node {
        Node {
            resource: 0,
            namespace: Some("ns".into()),
            name: "x".into(),
            owners,
            finalizers: finalizers.iter().map(|f| f.to_string()).collect(),
            deleting,
        }
    }

    fn delete(uid: &str, foreground: bool) -> GcAction {
        GcAction::Delete {
            uid: uid.into(),
            foreground,
        }
    }

    fn remove_finalizer(uid: &str, finalizer: &str) -> GcAction {
        GcAction::RemoveFinalizer {
            uid: uid.into(),
            finalizer: finalizer.into(),
        }
    }

    #[test]
    fn updates_that_leave_the_graph_as_it_was_touch_nothing() {
        let mut graph = Graph::default();
        graph.upsert("owner", node(vec![], &[], false));
        graph.upsert("dep", node(vec![owner_ref("owner", false)], &[], false));
        // A status update of the owner or of the dependent.
        assert!(graph.upsert("owner", node(vec![], &[], false)).is_empty());
        let dep = node(vec![owner_ref("owner", false)], &[], false);
        assert!(graph.upsert("dep", dep).is_empty());
        // What decisions read does touch: the owner being deleted...
        let mut touched = graph.upsert("owner", node(vec![], &[FOREGROUND], true));
        touched.sort();
        assert_eq!(touched, ["dep", "owner"]);
        // ...and the dependent's owner references.
        let mut touched = graph.upsert("dep", node(vec![owner_ref("owner", true)], &[], false));
        touched.sort();
        assert_eq!(touched, ["dep", "owner", "owner"]);
    }

    #[test]
    fn dependents_of_vanished_owners_are_deleted() {
        let mut graph = Graph::default();
        graph.upsert("owner", node(vec![], &[], false));
        graph.upsert("dep", node(vec![owner_ref("owner", false)], &[], false));
        graph.upsert(
            "two",
            node(
                vec![owner_ref("owner", false), owner_ref("other", false)],
                &[],
                false,
            ),
        );
        assert!(decide(&graph, "dep").is_empty(), "owner present");
        // Deleting the owner touches its dependents.
        let mut touched = graph.remove("owner");
        touched.sort();
        assert_eq!(touched, ["dep", "two"]);
        assert_eq!(decide(&graph, "dep"), [delete("dep", false)]);
        // All owners must be gone.
        assert_eq!(decide(&graph, "two"), [delete("two", false)]);
        graph.upsert("other", node(vec![], &[], false));
        assert!(decide(&graph, "two").is_empty(), "one owner left");
        // Objects being deleted or without owners are left alone.
        graph.upsert("going", node(vec![owner_ref("gone", false)], &[], true));
        assert!(decide(&graph, "going").is_empty());
        assert!(decide(&graph, "other").is_empty());
    }

    #[test]
    fn foreground_owners_wait_for_blocking_dependents() {
        let mut graph = Graph::default();
        graph.upsert("owner", node(vec![], &[FOREGROUND], true));
        graph.upsert("blocking", node(vec![owner_ref("owner", true)], &[], false));
        graph.upsert("loose", node(vec![owner_ref("owner", false)], &[], false));
        assert_eq!(
            decide(&graph, "owner"),
            [delete("blocking", true), delete("loose", true)]
        );
        // The blocking dependent is being deleted (itself in the foreground): still wait.
        graph.upsert(
            "blocking",
            node(vec![owner_ref("owner", true)], &[FOREGROUND], true),
        );
        assert_eq!(decide(&graph, "owner"), [delete("loose", true)]);
        // Gone: the owner is released even though a non-blocking one remains.
        let touched = graph.remove("blocking");
        assert_eq!(touched, ["owner"]);
        assert_eq!(
            decide(&graph, "owner"),
            [delete("loose", true), remove_finalizer("owner", FOREGROUND)]
        );
    }

    #[test]
    fn orphaning_strips_references_then_the_finalizer() {
        let mut graph = Graph::default();
        graph.upsert("owner", node(vec![], &[ORPHAN], true));
        graph.upsert("a", node(vec![owner_ref("owner", true)], &[], false));
        assert_eq!(
            decide(&graph, "owner"),
            [GcAction::Orphan {
                dependent: "a".into(),
                owner: "owner".into()
            }]
        );
        // The dependent is not deleted while its owner exists.
        assert!(decide(&graph, "a").is_empty());
        // Its reference removed: the owner is re-examined and released.
        let touched = graph.upsert("a", node(vec![], &[], false));
        assert!(touched.contains(&"owner".to_string()));
        assert_eq!(decide(&graph, "owner"), [remove_finalizer("owner", ORPHAN)]);
        // An owner not being deleted keeps its finalizers.
        graph.upsert("idle", node(vec![], &[ORPHAN, FOREGROUND], false));
        assert!(decide(&graph, "idle").is_empty());
    }

    #[test]
    fn owner_changes_move_the_index() {
        let mut graph = Graph::default();
        graph.upsert("dep", node(vec![owner_ref("a", false)], &[], false));
        graph.upsert("dep", node(vec![owner_ref("b", false)], &[], false));
        assert!(graph.dependents_of("a").is_empty());
        assert_eq!(graph.dependents_of("b").len(), 1);
        graph.remove("dep");
        assert!(graph.dependents.is_empty());
    }
}
