//! The scheduler's in-memory view of the cluster: every node's facts and
//! what the pods on it already use, fed by the node and pod watches and
//! updated at once when the scheduler decides ("assumes") a placement, so
//! the next decision sees it before the binding shows up in the watch.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::{Node, Pod, Taint};

use super::resources::{self, HostPort, Resources};

/// The taint upstream's node lifecycle controller puts on nodes whose Ready
/// condition is False (or missing).
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
/// The taint for nodes whose Ready condition is Unknown.
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
/// The taint that stands for `spec.unschedulable`.
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// What a pod takes from the node it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodUsage {
    /// The pod's uid.
    pub uid: String,
    /// The node it is bound (or assumed) to.
    pub node: String,
    /// Actual requests (one pod slot included).
    pub requests: Resources,
    /// Requests with upstream's defaults for unset cpu/memory, for scoring.
    pub non_zero: Resources,
    /// Host ports it claims.
    pub ports: Vec<HostPort>,
    /// The uid of its controller owner, for spreading.
    pub owner: Option<String>,
}

impl PodUsage {
    /// The usage of `pod` on `node`.
    pub fn of(pod: &Pod, node: &str) -> PodUsage {
        let (requests, non_zero) = resources::pod_requests(pod);
        PodUsage {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node: node.to_string(),
            requests,
            non_zero,
            ports: resources::host_ports(pod),
            owner: controller_uid(pod),
        }
    }
}

/// The uid of a pod's controller owner reference (the first owner when none
/// is marked controller).
pub fn controller_uid(pod: &Pod) -> Option<String> {
    let owners = pod.metadata.owner_references.as_ref()?;
    owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())
        .map(|o| o.uid.clone())
}

/// The sum of what the pods on one node use.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// Actual requests, with the pod count.
    pub requested: Resources,
    /// Requests with defaults, for scoring.
    pub non_zero: Resources,
    /// Host ports claimed, with how many pods claim each.
    pub ports: HashMap<HostPort, u32>,
    /// Pods per controller owner uid.
    pub owners: HashMap<String, u32>,
}

impl Usage {
    fn add(&mut self, pod: &PodUsage) {
        self.requested = self.requested.plus(pod.requests);
        self.non_zero = self.non_zero.plus(pod.non_zero);
        for port in &pod.ports {
            *self.ports.entry(port.clone()).or_default() += 1;
        }
        if let Some(owner) = &pod.owner {
            *self.owners.entry(owner.clone()).or_default() += 1;
        }
    }

    fn remove(&mut self, pod: &PodUsage) {
        self.requested = self.requested.minus(pod.requests);
        self.non_zero = self.non_zero.minus(pod.non_zero);
        for port in &pod.ports {
            if let Some(n) = self.ports.get_mut(port) {
                *n -= 1;
                if *n == 0 {
                    self.ports.remove(port);
                }
            }
        }
        if let Some(owner) = &pod.owner
            && let Some(n) = self.owners.get_mut(owner)
        {
            *n -= 1;
            if *n == 0 {
                self.owners.remove(owner);
            }
        }
    }

    /// How many pods of `owner` run here.
    pub fn owned_by(&self, owner: &str) -> u32 {
        self.owners.get(owner).copied().unwrap_or(0)
    }
}

/// One node as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its taints, plus the not-ready/unreachable taint its Ready
    /// condition implies (as upstream's lifecycle controller adds).
    pub taints: Vec<Taint>,
    /// `spec.unschedulable`.
    pub unschedulable: bool,
    /// What pods may use in total.
    pub allocatable: Resources,
    /// What the pods bound or assumed here use.
    pub usage: Usage,
    /// A hash of everything above but usage, to tell relevant updates from
    /// heartbeats.
    pub fingerprint: u64,
}

impl NodeInfo {
    /// The scheduler's facts about `node`, with no usage yet.
    pub fn from_node(node: &Node) -> NodeInfo {
        let spec = node.spec.as_ref();
        let mut taints: Vec<Taint> = spec.and_then(|s| s.taints.clone()).unwrap_or_default();
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.as_str());
        let implied = match ready {
            Some("True") => None,
            Some("Unknown") => Some(UNREACHABLE_TAINT),
            _ => Some(NOT_READY_TAINT),
        };
        if let Some(key) = implied
            && !taints
                .iter()
                .any(|t| t.key == key && t.effect == "NoSchedule")
        {
            taints.push(Taint {
                key: key.to_string(),
                effect: "NoSchedule".to_string(),
                value: None,
                time_added: None,
            });
        }
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let unschedulable = spec.and_then(|s| s.unschedulable).unwrap_or(false);
        let allocatable = resources::node_allocatable(node);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        labels.hash(&mut hasher);
        for t in &taints {
            (&t.key, &t.value, &t.effect).hash(&mut hasher);
        }
        unschedulable.hash(&mut hasher);
        (allocatable.milli_cpu, allocatable.memory, allocatable.pods).hash(&mut hasher);
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels,
            taints,
            unschedulable,
            allocatable,
            usage: Usage::default(),
            fingerprint: hasher.finish(),
        }
    }
}

/// What a node update meant to the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeChange {
    /// A node it did not know.
    Added,
    /// A known node whose labels, taints, readiness, schedulability or
    /// allocatable changed.
    Changed,
    /// Nothing that matters to scheduling (e.g. a heartbeat).
    Unchanged,
}

/// The cache: nodes in a stable order (for round-robin search) and every
/// pod bound or assumed to a node.
#[derive(Debug, Default)]
pub struct Cache {
    nodes: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    pods: HashMap<String, (PodUsage, bool)>,
    /// Usage of pods bound to nodes the cache does not hold (yet).
    orphans: HashMap<String, Usage>,
}

impl Cache {
    /// An empty cache.
    pub fn new() -> Cache {
        Cache::default()
    }

    /// Every node, in the cache's order.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// One node by name.
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.index.get(name).map(|&i| &self.nodes[i])
    }

    /// Add or update a node.
    pub fn set_node(&mut self, node: &Node) -> NodeChange {
        let mut info = NodeInfo::from_node(node);
        match self.index.get(&info.name) {
            Some(&i) => {
                let old = &mut self.nodes[i];
                let changed = old.fingerprint != info.fingerprint;
                info.usage = std::mem::take(&mut old.usage);
                *old = info;
                if changed {
                    NodeChange::Changed
                } else {
                    NodeChange::Unchanged
                }
            }
            None => {
                info.usage = self.orphans.remove(&info.name).unwrap_or_default();
                self.index.insert(info.name.clone(), self.nodes.len());
                self.nodes.push(info);
                NodeChange::Added
            }
        }
    }

    /// Forget a node; the pods still bound to it keep their usage aside in
    /// case it comes back.
    pub fn remove_node(&mut self, name: &str) {
        let Some(i) = self.index.remove(name) else {
            return;
        };
        let removed = self.nodes.swap_remove(i);
        if let Some(moved) = self.nodes.get(i) {
            self.index.insert(moved.name.clone(), i);
        }
        if removed.usage.requested.pods != 0 {
            self.orphans.insert(removed.name, removed.usage);
        }
    }

    /// The names of every node, for re-list bookkeeping.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    fn usage_mut(&mut self, node: &str) -> &mut Usage {
        match self.index.get(node) {
            Some(&i) => &mut self.nodes[i].usage,
            None => self.orphans.entry(node.to_string()).or_default(),
        }
    }

    fn insert(&mut self, pod: PodUsage, assumed: bool) {
        if let Some((old, _)) = self.pods.remove(&pod.uid) {
            self.usage_mut(&old.node).remove(&old);
        }
        self.usage_mut(&pod.node).add(&pod);
        self.pods.insert(pod.uid.clone(), (pod, assumed));
    }

    /// Record a pod the API shows bound to a node (confirming an assumed
    /// placement, or correcting it).
    pub fn set_pod(&mut self, pod: PodUsage) {
        if let Some((old, _)) = self.pods.get(&pod.uid)
            && *old == pod
        {
            self.pods.get_mut(&pod.uid).expect("present").1 = false;
            return;
        }
        self.insert(pod, false);
    }

    /// Count a placement the scheduler decided before the API confirms it.
    pub fn assume(&mut self, pod: PodUsage) {
        self.insert(pod, true);
    }

    /// Undo an assumed placement whose binding failed; a confirmed one stays.
    pub fn forget(&mut self, uid: &str) {
        if self.pods.get(uid).is_some_and(|(_, assumed)| *assumed) {
            self.remove_pod(uid);
        }
    }

    /// Drop a pod (deleted, or finished); `true` if it used a node.
    pub fn remove_pod(&mut self, uid: &str) -> bool {
        let Some((old, _)) = self.pods.remove(uid) else {
            return false;
        };
        let node = old.node.clone();
        self.usage_mut(&node).remove(&old);
        if !self.index.contains_key(&node)
            && self
                .orphans
                .get(&node)
                .is_some_and(|u| u.requested.pods <= 0)
        {
            self.orphans.remove(&node);
        }
        true
    }

    /// Whether a pod is counted, and if so whether only assumed.
    pub fn pod_state(&self, uid: &str) -> Option<bool> {
        self.pods.get(uid).map(|(_, assumed)| *assumed)
    }

    /// The uids of confirmed (not assumed) pods, for re-list bookkeeping.
    pub fn confirmed_pods(&self) -> Vec<String> {
        self.pods
            .iter()
            .filter(|(_, (_, assumed))| !assumed)
            .map(|(uid, _)| uid.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).expect("node json")
    }

    fn ready_node(name: &str, cpu: &str) -> Node {
        node(serde_json::json!({
            "metadata": {"name": name},
            "status": {"allocatable": {"cpu": cpu, "memory": "1Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}))
    }

    fn usage(uid: &str, node: &str, cpu: i64, owner: Option<&str>) -> PodUsage {
        PodUsage {
            uid: uid.into(),
            node: node.into(),
            requests: Resources {
                milli_cpu: cpu,
                memory: 0,
                pods: 1,
            },
            non_zero: Resources {
                milli_cpu: cpu.max(100),
                memory: 0,
                pods: 1,
            },
            ports: vec![],
            owner: owner.map(str::to_string),
        }
    }

    #[test]
    fn readiness_implies_taints() {
        let cases = [
            (
                serde_json::json!([{"type": "Ready", "status": "True"}]),
                None,
            ),
            (
                serde_json::json!([{"type": "Ready", "status": "False"}]),
                Some(NOT_READY_TAINT),
            ),
            (
                serde_json::json!([{"type": "Ready", "status": "Unknown"}]),
                Some(UNREACHABLE_TAINT),
            ),
            (serde_json::json!([]), Some(NOT_READY_TAINT)),
        ];
        for (conditions, want) in cases {
            let info = NodeInfo::from_node(&node(serde_json::json!({
                "metadata": {"name": "n"}, "status": {"conditions": conditions}})));
            assert_eq!(
                info.taints.first().map(|t| t.key.as_str()),
                want,
                "conditions {conditions}"
            );
        }
    }

    #[test]
    fn assumed_pods_count_until_forgotten_and_confirmed_ones_stay() {
        let mut cache = Cache::new();
        assert_eq!(cache.set_node(&ready_node("a", "2")), NodeChange::Added);
        cache.assume(usage("p1", "a", 500, Some("rs")));
        let a = cache.node("a").expect("node a");
        assert_eq!(a.usage.requested.milli_cpu, 500);
        assert_eq!(a.usage.owned_by("rs"), 1);
        cache.forget("p1");
        assert_eq!(
            cache.node("a").expect("a").usage.requested,
            Resources::default()
        );
        cache.assume(usage("p2", "a", 300, None));
        cache.set_pod(usage("p2", "a", 300, None));
        assert_eq!(cache.pod_state("p2"), Some(false), "confirmed");
        cache.forget("p2");
        assert_eq!(
            cache.node("a").expect("a").usage.requested.milli_cpu,
            300,
            "a confirmed pod is not forgotten"
        );
        assert!(cache.remove_pod("p2"));
        assert_eq!(cache.node("a").expect("a").usage.requested.pods, 0);
    }

    #[test]
    fn pods_on_unknown_nodes_count_once_the_node_appears() {
        let mut cache = Cache::new();
        cache.set_pod(usage("p1", "late", 700, None));
        cache.set_node(&ready_node("late", "2"));
        assert_eq!(
            cache.node("late").expect("late").usage.requested.milli_cpu,
            700
        );
        assert_eq!(
            cache.set_node(&ready_node("late", "2")),
            NodeChange::Unchanged
        );
        assert_eq!(
            cache.set_node(&ready_node("late", "4")),
            NodeChange::Changed
        );
        assert_eq!(
            cache.node("late").expect("late").usage.requested.milli_cpu,
            700,
            "usage survives updates"
        );
        cache.set_node(&ready_node("other", "1"));
        cache.remove_node("late");
        assert_eq!(cache.nodes().len(), 1);
        assert!(
            cache.node("other").is_some(),
            "index fixed after swap_remove"
        );
        cache.set_node(&ready_node("late", "2"));
        assert_eq!(
            cache.node("late").expect("late").usage.requested.milli_cpu,
            700,
            "usage kept across delete/re-add"
        );
        // A pod moved between nodes leaves the first.
        cache.set_pod(usage("p1", "other", 700, None));
        assert_eq!(
            cache.node("late").expect("late").usage.requested.milli_cpu,
            0
        );
        assert_eq!(
            cache
                .node("other")
                .expect("other")
                .usage
                .requested
                .milli_cpu,
            700
        );
    }
}
