//! The node lifecycle controller: notices Nodes that stopped heartbeating,
//! taints unhealthy Nodes and evicts their pods, as upstream's node
//! lifecycle controller, taint-based eviction and pod GC do together.
//!
//! Every monitor period it looks at each Node: a heartbeat is a newer
//! `renewTime` of the Node's Lease in `kube-node-lease` or a newer
//! `lastHeartbeatTime` of its Ready condition, timed by this controller's
//! clock when it sees it (as upstream's probe timestamps, so clock skew
//! between nodes and control plane does not matter). A Node without one for
//! `--node-monitor-grace-period` gets its conditions set to Unknown
//! (`NodeStatusUnknown`, "Kubelet stopped posting node status."). A Node whose
//! Ready condition is Unknown is tainted `node.kubernetes.io/unreachable`,
//! one reporting False `node.kubernetes.io/not-ready` (NoExecute and
//! NoSchedule each); the taints go when it is Ready again.
//!
//! Pods on a Node with NoExecute taints are evicted (deleted, gracefully)
//! at once when they do not tolerate one of them, else when the shortest
//! matching `tolerationSeconds` since the taint was added has passed (the API
//! server gives every pod 300 s tolerations of both taints). Pods on a Node
//! that is not Ready get their Ready condition set False. A pod whose
//! graceful deletion has expired on a Node that is not Ready is force-deleted
//! (nobody is left to finish it), and so is a pod bound to a Node that no
//! longer exists after the grace period, as upstream's pod GC does; their
//! ReplicaSets then replace them elsewhere.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use skiff_common::error::api_code;

use super::Context;
use skiff_common::events::{EventType, reference};
use skiff_common::informer::SharedWatch;
use skiff_common::trimmed::Trimmed;
use skiff_common::watch::reflect;

/// The taint of Nodes whose Ready condition is Unknown.
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// The taint of Nodes whose Ready condition is False.
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
/// Where node heartbeat Leases live.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

/// The conditions a kubelet posts, set to Unknown together.
const NODE_CONDITIONS: [&str; 4] = ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"];

/// A Node's health as its Ready condition says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Ready is True.
    Ready,
    /// Ready is False.
    NotReady,
    /// Ready is Unknown or missing.
    Unknown,
}

fn ready_condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

/// The Node's readiness.
pub fn readiness(node: &Node) -> Readiness {
    match ready_condition(node).map(|c| c.status.as_str()) {
        Some("True") => Readiness::Ready,
        Some("False") => Readiness::NotReady,
        _ => Readiness::Unknown,
    }
}

/// The last heartbeats seen of one Node, and when this controller saw the
/// latest of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The Lease's `renewTime`.
    pub lease_renew: Option<Timestamp>,
    /// The Ready condition's `lastHeartbeatTime`.
    pub heartbeat: Option<Timestamp>,
    /// When this controller last saw either move forward (or first saw the Node).
    pub observed_at: Timestamp,
}

/// The probe after seeing `lease_renew` and `heartbeat` at `now`.
pub fn observe(
    previous: Option<&Probe>,
    lease_renew: Option<Timestamp>,
    heartbeat: Option<Timestamp>,
    now: Timestamp,
) -> Probe {
    let observed_at = match previous {
        None => now,
        Some(p) if lease_renew > p.lease_renew || heartbeat > p.heartbeat => now,
        Some(p) => p.observed_at,
    };
    Probe {
        lease_renew: lease_renew.max(previous.and_then(|p| p.lease_renew)),
        heartbeat: heartbeat.max(previous.and_then(|p| p.heartbeat)),
        observed_at,
    }
}

/// Whether the Node has gone `grace` without a heartbeat.
pub fn is_stale(probe: &Probe, grace: Duration, now: Timestamp) -> bool {
    now.duration_since(probe.observed_at)
        > SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX)
}

/// The conditions of a Node that stopped posting its status: every
/// kubelet condition Unknown (those already Unknown are left alone). `None`
/// when nothing changes.
pub fn unknown_conditions(node: &Node, now: Timestamp) -> Option<Vec<NodeCondition>> {
    let mut conditions = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut changed = false;
    for type_ in NODE_CONDITIONS {
        match conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) if c.status == "Unknown" => {}
            Some(c) => {
                c.status = "Unknown".into();
                c.reason = Some("NodeStatusUnknown".into());
                c.message = Some("Kubelet stopped posting node status.".into());
                c.last_transition_time = Some(Time(now));
                changed = true;
            }
            None => {
                conditions.push(NodeCondition {
                    type_: type_.into(),
                    status: "Unknown".into(),
                    reason: Some("NodeStatusNeverUpdated".into()),
                    message: Some("Kubelet never posted node status.".into()),
                    last_heartbeat_time: node.metadata.creation_timestamp.clone(),
                    last_transition_time: Some(Time(now)),
                });
                changed = true;
            }
        }
    }
    changed.then_some(conditions)
}

/// The taints a Node should carry for its readiness: the other taints as
/// they are, plus `not-ready` or `unreachable` (NoExecute and NoSchedule),
/// keeping `timeAdded` of those already there. `None` when nothing changes.
pub fn desired_taints(
    current: &[Taint],
    readiness: Readiness,
    now: Timestamp,
) -> Option<Vec<Taint>> {
    let wanted: &[&str] = match readiness {
        Readiness::Ready => &[],
        Readiness::NotReady => &[TAINT_NOT_READY],
        Readiness::Unknown => &[TAINT_UNREACHABLE],
    };
    let ours = |t: &Taint| {
        (t.key == TAINT_NOT_READY || t.key == TAINT_UNREACHABLE)
            && (t.effect == "NoExecute" || t.effect == "NoSchedule")
    };
    let mut taints: Vec<Taint> = current
        .iter()
        .filter(|t| !ours(t) || wanted.contains(&t.key.as_str()))
        .cloned()
        .collect();
    for key in wanted {
        for effect in ["NoSchedule", "NoExecute"] {
            if !taints.iter().any(|t| t.key == *key && t.effect == effect) {
                taints.push(Taint {
                    key: (*key).to_string(),
                    effect: effect.to_string(),
                    value: None,
                    time_added: (effect == "NoExecute").then_some(Time(now)),
                });
            }
        }
    }
    (taints != current).then_some(taints)
}

/// Whether `toleration` tolerates `taint` (upstream's `ToleratesTaint`).
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect = toleration.effect.as_deref().unwrap_or_default();
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "Equal" => {
            !key.is_empty()
                && toleration.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

/// When a pod is to be evicted from a Node with `taints`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction {
    /// Never: no NoExecute taint, or tolerated forever.
    Never,
    /// At this time (now or earlier: at once).
    At(Timestamp),
}

/// When a pod with `tolerations` is evicted from a Node with `taints`: at
/// once if some NoExecute taint is not tolerated, else the shortest
/// `tolerationSeconds` of the matching tolerations after the latest taint
/// was added; never if none of them has a limit.
pub fn eviction_time(tolerations: &[Toleration], taints: &[Taint], now: Timestamp) -> Eviction {
    let no_execute: Vec<&Taint> = taints.iter().filter(|t| t.effect == "NoExecute").collect();
    if no_execute.is_empty() {
        return Eviction::Never;
    }
    let mut shortest: Option<i64> = None;
    for taint in &no_execute {
        let matching: Vec<&Toleration> =
            tolerations.iter().filter(|t| tolerates(t, taint)).collect();
        if matching.is_empty() {
            return Eviction::At(now);
        }
        for seconds in matching.iter().filter_map(|t| t.toleration_seconds) {
            shortest = Some(shortest.map_or(seconds, |s| s.min(seconds)));
        }
    }
    let Some(seconds) = shortest else {
        return Eviction::Never;
    };
    let since = no_execute
        .iter()
        .filter_map(|t| t.time_added.as_ref().map(|t| t.0))
        .max()
        .unwrap_or(now);
    Eviction::At(since + SignedDuration::from_secs(seconds.max(0)))
}

/// What to do to one pod on an unhealthy or NoExecute-tainted Node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PodStep {
    /// Set its Ready condition False.
    MarkNotReady,
    /// Delete it (gracefully).
    Evict,
    /// Delete it with grace period 0: its graceful deletion expired and no
    /// kubelet will finish it.
    ForceDelete,
}

fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// The steps for `pod` on a Node of `readiness` whose taints evict it as `eviction` says.
pub fn pod_steps(
    pod: &Pod,
    readiness: Readiness,
    eviction: &Eviction,
    now: Timestamp,
) -> Vec<PodStep> {
    if let Some(deleting) = &pod.metadata.deletion_timestamp {
        return if readiness != Readiness::Ready && deleting.0 <= now {
            vec![PodStep::ForceDelete]
        } else {
            Vec::new()
        };
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let mut steps = Vec::new();
    if readiness != Readiness::Ready
        && pod_is_ready(pod)
        && !matches!(phase, Some("Succeeded" | "Failed"))
    {
        steps.push(PodStep::MarkNotReady);
    }
    if matches!(eviction, Eviction::At(at) if *at <= now) {
        steps.push(PodStep::Evict);
    }
    steps
}

/// How often Nodes are looked at: an eighth of the grace period, between
/// 250 ms and upstream's 5 s.
pub fn monitor_period(grace: Duration) -> Duration {
    (grace / 8).clamp(Duration::from_millis(250), Duration::from_secs(5))
}

/// Run the node lifecycle controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let (nodes, nodes_writer) = reflector::store::<Trimmed<Node>>();
    let (leases, leases_writer) = reflector::store::<Trimmed<Lease>>();
    let mut watches = tokio::task::JoinSet::new();
    let token = shutdown.clone();
    let stream = watcher(
        Api::<Trimmed<Node>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(nodes_writer);
    watches.spawn(reflect(stream, token.clone()));
    let stream = watcher(
        Api::<Trimmed<Lease>>::namespaced(client.clone(), LEASE_NAMESPACE),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(leases_writer);
    watches.spawn(reflect(stream, token.clone()));
    // Pods come from the watch the other controllers share.
    let pods = ctx.pods.clone();
    {
        let pods = pods.clone();
        let token = token.clone();
        watches.spawn(async move { pods.hold(token).await });
    }

    let ready = async {
        let _ = nodes.wait_until_ready().await;
        let _ = leases.wait_until_ready().await;
        pods.synced().await;
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = ready => {
            let mut monitor = Monitor {
                ctx: ctx.clone(),
                nodes,
                leases,
                pods,
                probes: HashMap::new(),
                acted_nodes: HashMap::new(),
                acted_pods: HashMap::new(),
                orphans: HashMap::new(),
            };
            let period = monitor_period(ctx.options.node_monitor_grace_period);
            tracing::info!(?period, grace = ?ctx.options.node_monitor_grace_period, "node lifecycle controller started");
            loop {
                monitor.tick().await;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(period) => {}
                }
            }
        }
    }
    while watches.join_next().await.is_some() {}
}

struct Monitor {
    ctx: Arc<Context>,
    nodes: Store<Trimmed<Node>>,
    leases: Store<Trimmed<Lease>>,
    pods: Arc<SharedWatch<Pod>>,
    probes: HashMap<String, Probe>,
    /// Node name → the resourceVersion last acted on: while the store still
    /// shows it (it lags behind our own write), the Node is not acted on again.
    acted_nodes: HashMap<String, String>,
    /// Pod uid → the resourceVersion last acted on.
    acted_pods: HashMap<String, String>,
    /// Pod uid → when it was first seen bound to a Node that does not exist.
    orphans: HashMap<String, Timestamp>,
}

fn rv(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.resource_version.clone().unwrap_or_default()
}

impl Monitor {
    async fn tick(&mut self) {
        let now = Timestamp::now();
        let grace = self.ctx.options.node_monitor_grace_period;
        let pods = self.pods.snapshot();
        let known: HashSet<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        let mut by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
        for pod in pods {
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            if !node.is_empty() {
                by_node.entry(node).or_default().push(pod);
            }
        }
        let nodes = self.nodes.state();
        let names: HashSet<String> = nodes
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        for node in nodes {
            let name = node.metadata.name.clone().unwrap_or_default();
            let lease = self
                .leases
                .get(&ObjectRef::new(&name).within(LEASE_NAMESPACE));
            let renew = lease
                .as_ref()
                .and_then(|l| l.spec.as_ref())
                .and_then(|s| s.renew_time.as_ref())
                .map(|t| t.0);
            let heartbeat = ready_condition(&node)
                .and_then(|c| c.last_heartbeat_time.as_ref())
                .map(|t| t.0);
            let probe = observe(self.probes.get(&name), renew, heartbeat, now);
            let stale = is_stale(&probe, grace, now);
            self.probes.insert(name.clone(), probe);
            let pods = by_node.remove(&name).unwrap_or_default();
            self.node(&node, stale, &pods, now).await;
        }
        self.probes.retain(|name, _| names.contains(name));
        self.acted_nodes.retain(|name, _| names.contains(name));
        // Pods bound to Nodes that are gone.
        let mut live = HashSet::new();
        for pod in by_node.into_values().flatten() {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            live.insert(uid.clone());
            let since = *self.orphans.entry(uid).or_insert(now);
            if is_stale(
                &Probe {
                    lease_renew: None,
                    heartbeat: None,
                    observed_at: since,
                },
                grace,
                now,
            ) {
                self.act(&pod, PodStep::ForceDelete, "its node is gone")
                    .await;
            }
        }
        self.orphans.retain(|uid, _| live.contains(uid));
        self.acted_pods.retain(|uid, _| known.contains(uid));
    }

    async fn node(&mut self, node: &Node, stale: bool, pods: &[Arc<Pod>], now: Timestamp) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut node = node.clone();
        let seen = rv(&node.metadata);
        let acted = self.acted_nodes.get(&name).is_some_and(|r| *r == seen);
        if !acted {
            let api: Api<Node> = Api::all(self.ctx.client.clone());
            let mut wrote = false;
            if stale && let Some(conditions) = unknown_conditions(&node, now) {
                let patch = json!({
                    "metadata": {"resourceVersion": rv(&node.metadata)},
                    "status": {"conditions": conditions},
                });
                match api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(updated) => {
                        tracing::info!(node = %name, "node stopped posting status: conditions Unknown");
                        self.ctx
                            .events
                            .record(
                                &reference("v1", "Node", &node.metadata),
                                EventType::Normal,
                                "NodeNotReady",
                                &format!("Node {name} status is now: NodeNotReady"),
                            )
                            .await;
                        node = updated;
                        wrote = true;
                    }
                    Err(error) => {
                        tracing::debug!(node = %name, error = %skiff_common::error::chain(&error), "cannot mark node Unknown; next period");
                        return;
                    }
                }
            }
            let taints = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default();
            if let Some(taints) = desired_taints(&taints, readiness(&node), now) {
                let patch = json!({
                    "metadata": {"resourceVersion": rv(&node.metadata)},
                    "spec": {"taints": taints},
                });
                match api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(updated) => {
                        tracing::info!(node = %name, readiness = ?readiness(&updated), "node taints updated");
                        node = updated;
                        wrote = true;
                    }
                    Err(error) => {
                        tracing::debug!(node = %name, error = %skiff_common::error::chain(&error), "cannot taint node; next period")
                    }
                }
            }
            if wrote {
                self.acted_nodes.insert(name.clone(), seen);
            }
        }
        let ready = readiness(&node);
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        if ready == Readiness::Ready && !taints.iter().any(|t| t.effect == "NoExecute") {
            return;
        }
        for pod in pods {
            let tolerations = pod
                .spec
                .as_ref()
                .and_then(|s| s.tolerations.clone())
                .unwrap_or_default();
            let eviction = eviction_time(&tolerations, &taints, now);
            for step in pod_steps(pod, ready, &eviction, now) {
                let why = match step {
                    PodStep::ForceDelete => {
                        "its graceful deletion expired on a node that is not ready"
                    }
                    _ => "its node is not ready or tainted",
                };
                if !self.act(pod, step, why).await {
                    break;
                }
            }
        }
    }

    /// Take one step on `pod`; false when it failed or was skipped.
    async fn act(&mut self, pod: &Pod, step: PodStep, why: &str) -> bool {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let version = rv(&pod.metadata);
        if self.acted_pods.get(&uid).is_some_and(|r| *r == version) {
            return false;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let object = reference("v1", "Pod", &pod.metadata);
        let result = match step {
            PodStep::MarkNotReady => {
                let mut conditions = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .unwrap_or_default();
                for c in conditions.iter_mut().filter(|c| c.type_ == "Ready") {
                    c.status = "False".into();
                    c.last_transition_time = Some(Time(Timestamp::now()));
                }
                let patch = json!({
                    "metadata": {"resourceVersion": version},
                    "status": {"conditions": conditions},
                });
                let result = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(drop);
                if result.is_ok() {
                    self.ctx
                        .events
                        .record(
                            &object,
                            EventType::Warning,
                            "NodeNotReady",
                            "Node is not ready",
                        )
                        .await;
                }
                result
            }
            PodStep::Evict => {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                let result = api.delete(&name, &params).await.map(drop);
                if result.is_ok() {
                    tracing::info!(pod = %format!("{namespace}/{name}"), "evicting pod: {why}");
                    self.ctx
                        .events
                        .record(
                            &object,
                            EventType::Normal,
                            "TaintManagerEviction",
                            &format!("Marking for deletion Pod {namespace}/{name}"),
                        )
                        .await;
                }
                result
            }
            PodStep::ForceDelete => {
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                let result = api.delete(&name, &params).await.map(drop);
                if result.is_ok() {
                    tracing::info!(pod = %format!("{namespace}/{name}"), "force-deleting pod: {why}");
                }
                result
            }
        };
        match result {
            Ok(()) => {
                self.acted_pods.insert(uid, version);
                true
            }
            Err(error) if matches!(api_code(&error), Some(404)) => false,
            Err(error) => {
                tracing::debug!(pod = %format!("{namespace}/{name}"), ?step, error = %skiff_common::error::chain(&error), "pod step failed; next period");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("a timestamp")
    }

    fn node(value: serde_json::Value) -> Node {
        serde_json::from_value(value).expect("a node")
    }

    fn taint(key: &str, effect: &str, added: Option<&str>) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            value: None,
            time_added: added.map(|a| Time(ts(a))),
        }
    }

    fn toleration(value: serde_json::Value) -> Toleration {
        serde_json::from_value(value).expect("a toleration")
    }

    fn default_tolerations() -> Vec<Toleration> {
        vec![
            toleration(
                json!({"key": TAINT_NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}),
            ),
            toleration(
                json!({"key": TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}),
            ),
        ]
    }

    #[test]
    fn probes_move_only_on_newer_heartbeats() {
        let t0 = ts("2025-01-01T00:00:00Z");
        let t1 = ts("2025-01-01T00:00:10Z");
        let t2 = ts("2025-01-01T00:00:50Z");
        let first = observe(None, Some(t0), None, t0);
        assert_eq!(first.observed_at, t0);
        let same = observe(Some(&first), Some(t0), None, t1);
        assert_eq!(same.observed_at, t0, "an unchanged lease is no heartbeat");
        assert!(is_stale(&same, Duration::from_secs(40), t2));
        assert!(!is_stale(&same, Duration::from_secs(60), t2));
        let renewed = observe(Some(&same), Some(t1), None, t2);
        assert_eq!(renewed.observed_at, t2);
        let status = observe(
            Some(&renewed),
            Some(t1),
            Some(t2),
            t2 + SignedDuration::from_secs(5),
        );
        assert_eq!(
            status.observed_at,
            t2 + SignedDuration::from_secs(5),
            "a status heartbeat counts too"
        );
        // An older value (a lagging cache) does not count.
        let older = observe(
            Some(&status),
            Some(t0),
            Some(t1),
            t2 + SignedDuration::from_secs(9),
        );
        assert_eq!(older.observed_at, status.observed_at);
    }

    #[test]
    fn stale_nodes_get_unknown_conditions() {
        let now = ts("2025-01-01T00:01:00Z");
        let n = node(json!({
            "metadata": {"name": "a"},
            "status": {"conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": "2025-01-01T00:00:00Z", "lastTransitionTime": "2024-12-31T00:00:00Z"},
                {"type": "MemoryPressure", "status": "False"},
            ]},
        }));
        let conditions = unknown_conditions(&n, now).expect("changes");
        let ready = conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("ready");
        assert_eq!(ready.status, "Unknown");
        assert_eq!(ready.reason.as_deref(), Some("NodeStatusUnknown"));
        assert_eq!(
            ready.message.as_deref(),
            Some("Kubelet stopped posting node status.")
        );
        assert_eq!(ready.last_transition_time, Some(Time(now)));
        assert_eq!(
            ready.last_heartbeat_time,
            Some(Time(ts("2025-01-01T00:00:00Z"))),
            "heartbeat kept"
        );
        assert_eq!(conditions.len(), 4);
        let never = conditions
            .iter()
            .find(|c| c.type_ == "DiskPressure")
            .expect("added");
        assert_eq!(never.reason.as_deref(), Some("NodeStatusNeverUpdated"));
        let mut again = n.clone();
        again.status.as_mut().expect("status").conditions = Some(conditions);
        assert_eq!(unknown_conditions(&again, now), None, "already Unknown");
        assert_eq!(readiness(&again), Readiness::Unknown);
    }

    #[test]
    fn taints_follow_readiness() {
        let now = ts("2025-01-01T00:01:00Z");
        let other = taint("dedicated", "NoSchedule", None);
        let unknown =
            desired_taints(std::slice::from_ref(&other), Readiness::Unknown, now).expect("tainted");
        assert_eq!(unknown.len(), 3);
        assert!(unknown.contains(&other));
        let exec = unknown
            .iter()
            .find(|t| t.effect == "NoExecute")
            .expect("NoExecute");
        assert_eq!(exec.key, TAINT_UNREACHABLE);
        assert_eq!(exec.time_added, Some(Time(now)));
        assert!(
            unknown
                .iter()
                .any(|t| t.key == TAINT_UNREACHABLE && t.effect == "NoSchedule")
        );
        // Stable: a later pass keeps timeAdded and changes nothing.
        assert_eq!(
            desired_taints(
                &unknown,
                Readiness::Unknown,
                now + SignedDuration::from_secs(9)
            ),
            None
        );
        // Unknown → False swaps unreachable for not-ready.
        let not_ready = desired_taints(&unknown, Readiness::NotReady, now).expect("changed");
        assert!(not_ready.iter().all(|t| t.key != TAINT_UNREACHABLE));
        assert!(
            not_ready
                .iter()
                .any(|t| t.key == TAINT_NOT_READY && t.effect == "NoExecute")
        );
        // Ready again: only the others remain.
        assert_eq!(
            desired_taints(&not_ready, Readiness::Ready, now),
            Some(vec![other.clone()])
        );
        assert_eq!(desired_taints(&[other], Readiness::Ready, now), None);
    }

    #[test]
    fn tolerations_match_as_upstream() {
        let t = taint(TAINT_UNREACHABLE, "NoExecute", None);
        assert!(
            tolerates(&toleration(json!({"operator": "Exists"})), &t),
            "tolerate everything"
        );
        assert!(tolerates(
            &toleration(json!({"key": TAINT_UNREACHABLE, "operator": "Exists"})),
            &t
        ));
        assert!(!tolerates(
            &toleration(
                json!({"key": TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoSchedule"})
            ),
            &t
        ));
        assert!(!tolerates(
            &toleration(json!({"key": TAINT_NOT_READY, "operator": "Exists"})),
            &t
        ));
        assert!(
            tolerates(
                &toleration(json!({"key": TAINT_UNREACHABLE, "value": ""})),
                &t
            ),
            "Equal with empty value"
        );
        assert!(!tolerates(
            &toleration(json!({"key": TAINT_UNREACHABLE, "value": "x"})),
            &t
        ));
        assert!(
            !tolerates(&toleration(json!({"value": ""})), &t),
            "Equal needs a key"
        );
    }

    #[test]
    fn eviction_honours_toleration_seconds() {
        let now = ts("2025-01-01T00:01:00Z");
        let taints = vec![
            taint(TAINT_UNREACHABLE, "NoExecute", Some("2025-01-01T00:00:30Z")),
            taint(TAINT_UNREACHABLE, "NoSchedule", None),
        ];
        // The API server's defaults: 300 s after the taint was added.
        assert_eq!(
            eviction_time(&default_tolerations(), &taints, now),
            Eviction::At(ts("2025-01-01T00:05:30Z"))
        );
        // The shortest matching toleration wins.
        let mut short = default_tolerations();
        short.push(toleration(json!({"key": TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5})));
        assert_eq!(
            eviction_time(&short, &taints, now),
            Eviction::At(ts("2025-01-01T00:00:35Z"))
        );
        // No matching toleration: at once.
        assert_eq!(eviction_time(&[], &taints, now), Eviction::At(now));
        // Tolerated without a limit: never.
        let forever = vec![toleration(json!({"operator": "Exists"}))];
        assert_eq!(eviction_time(&forever, &taints, now), Eviction::Never);
        // No NoExecute taint: never.
        assert_eq!(eviction_time(&[], &taints[1..], now), Eviction::Never);
    }

    #[test]
    fn pod_steps_mark_evict_and_force_delete() {
        let now = ts("2025-01-01T00:01:00Z");
        let ready_pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {"containers": []},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .expect("pod");
        let due = Eviction::At(now - SignedDuration::from_secs(1));
        let later = Eviction::At(now + SignedDuration::from_secs(1));
        assert_eq!(
            pod_steps(&ready_pod, Readiness::Unknown, &later, now),
            vec![PodStep::MarkNotReady]
        );
        assert_eq!(
            pod_steps(&ready_pod, Readiness::Unknown, &due, now),
            vec![PodStep::MarkNotReady, PodStep::Evict]
        );
        assert_eq!(
            pod_steps(&ready_pod, Readiness::Ready, &Eviction::Never, now),
            Vec::<PodStep>::new()
        );
        // A user NoExecute taint evicts from a Ready node too.
        assert_eq!(
            pod_steps(&ready_pod, Readiness::Ready, &due, now),
            vec![PodStep::Evict]
        );
        let mut deleting = ready_pod.clone();
        deleting.metadata.deletion_timestamp = Some(Time(now - SignedDuration::from_secs(1)));
        assert_eq!(
            pod_steps(&deleting, Readiness::Unknown, &due, now),
            vec![PodStep::ForceDelete]
        );
        assert_eq!(
            pod_steps(&deleting, Readiness::Ready, &due, now),
            Vec::<PodStep>::new(),
            "its kubelet finishes it"
        );
        deleting.metadata.deletion_timestamp = Some(Time(now + SignedDuration::from_secs(1)));
        assert_eq!(
            pod_steps(&deleting, Readiness::NotReady, &due, now),
            Vec::<PodStep>::new(),
            "grace not over"
        );
    }

    #[test]
    fn monitor_period_is_bounded() {
        assert_eq!(
            monitor_period(Duration::from_secs(40)),
            Duration::from_secs(5)
        );
        assert_eq!(
            monitor_period(Duration::from_secs(8)),
            Duration::from_secs(1)
        );
        assert_eq!(
            monitor_period(Duration::from_secs(1)),
            Duration::from_millis(250)
        );
    }
}
