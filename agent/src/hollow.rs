//! Hollow nodes: Node objects that behave like a kubelet's towards the API
//! server without running anything.
//!
//! Each node is registered with capacity, addresses and nodeInfo, renews
//! its Lease in `kube-node-lease` every `--node-lease-renew-interval` and
//! posts its conditions every `--node-status-report-frequency` (and at once
//! when someone else changed its Ready condition). Pods bound to the nodes
//! are reported Running through `pods/status`, with an IP from their node's
//! `spec.podCIDR` (set by the controller manager's node IPAM, which the agent
//! waits for); pods being deleted are removed with `gracePeriodSeconds=0`,
//! as a kubelet does once their containers stopped.
//!
//! One process runs many nodes: one pod watch (a `spec.nodeName` field
//! selector; field selectors cannot OR, so with several nodes every bound pod
//! is watched and filtered by name), one node watch, one task per node for
//! its heartbeats, and a bound on the writes in flight.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use ipnetwork::IpNetwork;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use skiff_common::error::api_code;
use skiff_common::node::{
    InvalidNodeName, KUBELET_VERSION, LEASE_NAMESPACE, pod_cidr, validate_name,
};

use crate::cli::NodeArgs;

/// The container runtime hollow nodes report.
pub const RUNTIME_VERSION: &str = "hollow://";
/// The label every hollow node carries (`node.kubernetes.io/instance-type=hollow`).
pub const INSTANCE_TYPE_LABEL: &str = "node.kubernetes.io/instance-type";

/// Errors that stop the agent before it starts.
#[derive(Debug, thiserror::Error)]
pub enum HollowError {
    /// A node name would not be a valid object name.
    #[error(transparent)]
    InvalidName(#[from] InvalidNodeName),
    /// `--count 0`.
    #[error("--count must be at least 1")]
    NoNodes,
}

/// The name of node `index`.
pub fn node_name(prefix: &str, index: u32) -> String {
    format!("{prefix}{index}")
}

/// The InternalIP of node `index` of those named `prefix…`: a loopback
/// address, so nothing is ever routed to it, `127.P.x.y` with `P` from a
/// hash of the prefix (so that processes with different prefixes rarely
/// share addresses) and `x.y` the index plus one.
pub fn node_ip(prefix: &str, index: u32) -> Ipv4Addr {
    // FNV-1a.
    let hash = prefix.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let n = index.wrapping_add(1);
    let second = (1 + hash % 254 + (n >> 16)) % 256;
    Ipv4Addr::from((127 << 24) | (second << 16) | (n & 0xffff))
}

/// The Node object a hollow node registers (its status is posted right
/// after, see [`node_status`]).
pub fn node_object(args: &NodeArgs, name: &str) -> Node {
    let mut labels = serde_json::Map::new();
    labels.insert("kubernetes.io/hostname".into(), json!(name));
    labels.insert("kubernetes.io/os".into(), json!("linux"));
    labels.insert("kubernetes.io/arch".into(), json!("amd64"));
    labels.insert(INSTANCE_TYPE_LABEL.into(), json!("hollow"));
    for (key, value) in &args.node_labels {
        labels.insert(key.clone(), json!(value));
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {},
    }))
    .expect("a hollow Node is well-formed")
}

/// The node conditions a healthy node posts: Ready since `ready_since`, no
/// pressure, heartbeat `now`.
pub fn node_conditions(now: Timestamp, ready_since: Timestamp) -> Value {
    crate::kubelet::node::conditions(now, true, ready_since, "")
}

/// The full status of a hollow node, as a `nodes/status` merge patch.
pub fn node_status(
    args: &NodeArgs,
    name: &str,
    ip: Ipv4Addr,
    now: Timestamp,
    ready_since: Timestamp,
) -> Value {
    let resources = json!({
        "cpu": args.cpu,
        "memory": args.memory,
        "pods": args.max_pods.to_string(),
        "ephemeral-storage": "100Gi",
    });
    json!({
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": ip.to_string()},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": format!("hollow-{name}"),
                "systemUUID": format!("hollow-{name}"),
                "bootID": format!("hollow-{name}"),
                "kernelVersion": "hollow",
                "osImage": "skiff hollow node",
                "containerRuntimeVersion": RUNTIME_VERSION,
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "conditions": node_conditions(now, ready_since),
        }
    })
}

/// Whether a Node's Ready condition is True.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Pod addresses handed out within one node's pod CIDR: the lowest free
/// one first, never the network address, the first address (the node's
/// gateway) or the IPv4 broadcast address.
#[derive(Debug, Clone)]
pub struct PodIps {
    cidr: IpNetwork,
    used: BTreeSet<u128>,
}

impl PodIps {
    /// An empty pool over `cidr`.
    pub fn new(cidr: IpNetwork) -> PodIps {
        PodIps {
            cidr,
            used: BTreeSet::new(),
        }
    }

    /// The pool's range.
    pub fn cidr(&self) -> IpNetwork {
        self.cidr
    }

    fn base(&self) -> u128 {
        match self.cidr.network() {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        }
    }

    /// The usable offsets, first and last inclusive.
    fn bounds(&self) -> (u128, u128) {
        let bits = match self.cidr {
            IpNetwork::V4(_) => 32,
            IpNetwork::V6(_) => 128,
        };
        let host_bits = u32::from(bits - self.cidr.prefix());
        let size_minus_one = if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        if size_minus_one < 3 {
            return (0, size_minus_one);
        }
        let last = if bits == 32 {
            size_minus_one - 1
        } else {
            size_minus_one
        };
        (2, last)
    }

    fn offset(&self, ip: IpAddr) -> Option<u128> {
        if !self.cidr.contains(ip) {
            return None;
        }
        let n = match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        };
        Some(n - self.base())
    }

    fn address(&self, offset: u128) -> IpAddr {
        let n = self.base() + offset;
        match self.cidr {
            IpNetwork::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
            IpNetwork::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
        }
    }

    /// Mark `ip` as taken (a pod that already has it); false when it is
    /// outside the range or taken already.
    pub fn occupy(&mut self, ip: IpAddr) -> bool {
        match self.offset(ip) {
            Some(offset) => self.used.insert(offset),
            None => false,
        }
    }

    /// The lowest free address, now taken; `None` when all are taken.
    pub fn allocate(&mut self) -> Option<IpAddr> {
        let (first, last) = self.bounds();
        let mut candidate = first;
        for &used in self.used.range(first..) {
            if used != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate > last {
            return None;
        }
        self.used.insert(candidate);
        Some(self.address(candidate))
    }

    /// Give `ip` back.
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(offset) = self.offset(ip) {
            self.used.remove(&offset);
        }
    }

    /// How many addresses are taken.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// Whether no address is taken.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

/// Where the agent is with one pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for its node's pod CIDR (or for a free address in it).
    Parked,
    /// Its Running status is being written.
    Starting,
    /// Reported Running.
    Running,
    /// Being deleted with grace period 0.
    Deleting,
}

/// What to do about a pod bound to one of the agent's nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodAction {
    /// Nothing (done, in progress, or finished).
    Ignore,
    /// Its deletion began: remove it with grace period 0.
    Delete,
    /// Its node has no pod CIDR yet: wait.
    Park,
    /// It already runs with this address from the node's range (a restarted
    /// agent): take the address and report nothing.
    Adopt(IpAddr),
    /// Give it an address and report it Running.
    Start,
}

/// Decide what to do about `pod`, given where the agent is with it and its
/// node's pod CIDR.
pub fn pod_action(pod: &Pod, progress: Option<Progress>, cidr: Option<IpNetwork>) -> PodAction {
    if pod.metadata.deletion_timestamp.is_some() {
        return if progress == Some(Progress::Deleting) {
            PodAction::Ignore
        } else {
            PodAction::Delete
        };
    }
    if matches!(
        progress,
        Some(Progress::Starting | Progress::Running | Progress::Deleting)
    ) {
        return PodAction::Ignore;
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    if matches!(phase, "Succeeded" | "Failed") {
        return PodAction::Ignore;
    }
    let Some(cidr) = cidr else {
        return PodAction::Park;
    };
    if phase == "Running"
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
        && cidr.contains(ip)
    {
        return PodAction::Adopt(ip);
    }
    PodAction::Start
}

/// The `pods/status` merge patch that reports `pod` Running at `pod_ip` on
/// a node at `host_ip`, its containers started `now`.
pub fn running_status(pod: &Pod, pod_ip: IpAddr, host_ip: Ipv4Addr, now: Timestamp) -> Value {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let short = &uid[..uid.len().min(8)];
    let spec = pod.spec.as_ref();
    let started = json!({"running": {"startedAt": Time(now)}});
    let status_of = |name: &str, image: &str, state: &Value, ready: bool| {
        json!({
            "name": name,
            "image": image,
            "imageID": format!("{RUNTIME_VERSION}{image}"),
            "containerID": format!("{RUNTIME_VERSION}{short}-{name}"),
            "ready": ready,
            "started": state.get("running").is_some(),
            "restartCount": 0,
            "state": state,
            "lastState": {},
        })
    };
    let containers: Vec<Value> = spec
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            status_of(
                &c.name,
                c.image.as_deref().unwrap_or_default(),
                &started,
                true,
            )
        })
        .collect();
    let init: Vec<Value> = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let image = c.image.as_deref().unwrap_or_default();
            if c.restart_policy.as_deref() == Some("Always") {
                // A sidecar: it keeps running.
                status_of(&c.name, image, &started, true)
            } else {
                let done = json!({"terminated": {
                    "exitCode": 0,
                    "reason": "Completed",
                    "startedAt": Time(now),
                    "finishedAt": Time(now),
                    "containerID": format!("{RUNTIME_VERSION}{short}-{}", c.name),
                }});
                status_of(&c.name, image, &done, false)
            }
        })
        .collect();
    let scheduled_since = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    let condition = |type_: &str, since: &Time| json!({"type": type_, "status": "True", "lastProbeTime": null, "lastTransitionTime": since});
    let mut status = json!({
        "phase": "Running",
        "hostIP": host_ip.to_string(),
        "hostIPs": [{"ip": host_ip.to_string()}],
        "podIP": pod_ip.to_string(),
        "podIPs": [{"ip": pod_ip.to_string()}],
        "startTime": Time(now),
        "conditions": [
            condition("PodReadyToStartContainers", &Time(now)),
            condition("Initialized", &Time(now)),
            condition("Ready", &Time(now)),
            condition("ContainersReady", &Time(now)),
            condition("PodScheduled", &scheduled_since),
        ],
        "containerStatuses": containers,
    });
    if !init.is_empty() {
        status["initContainerStatuses"] = Value::Array(init);
    }
    json!({"status": status})
}

/// One node of this process.
struct NodeState {
    index: u32,
    ip: Ipv4Addr,
    uid: Option<String>,
    ips: Option<PodIps>,
    ready_since: Timestamp,
    deleted: bool,
    /// Wakes the node's task to post its status now (or to stop).
    refresh: Arc<Notify>,
    /// Pods waiting for the pod CIDR, in arrival order.
    parked: Vec<Pod>,
}

/// The agent's record of one pod.
struct PodRecord {
    node: String,
    ip: Option<IpAddr>,
    progress: Progress,
}

#[derive(Default)]
struct State {
    nodes: HashMap<String, NodeState>,
    /// By pod uid.
    pods: HashMap<String, PodRecord>,
}

/// A running set of hollow nodes.
struct Agent {
    client: kube::Client,
    args: NodeArgs,
    state: Mutex<State>,
    writes: Semaphore,
    shutdown: CancellationToken,
}

/// Run `args.count` hollow nodes until `shutdown`.
pub async fn run(
    client: kube::Client,
    args: NodeArgs,
    shutdown: CancellationToken,
) -> Result<(), HollowError> {
    if args.count == 0 {
        return Err(HollowError::NoNodes);
    }
    let mut state = State::default();
    for index in args.first_index..args.first_index.saturating_add(args.count) {
        let name = node_name(&args.name_prefix, index);
        validate_name(&name)?;
        state.nodes.insert(
            name,
            NodeState {
                index,
                ip: node_ip(&args.name_prefix, index),
                uid: None,
                ips: None,
                ready_since: Timestamp::now(),
                deleted: false,
                refresh: Arc::new(Notify::new()),
                parked: Vec::new(),
            },
        );
    }
    let agent = Arc::new(Agent {
        client,
        writes: Semaphore::new(args.concurrency.max(1)),
        args,
        state: Mutex::new(state),
        shutdown: shutdown.clone(),
    });
    tracing::info!(count = agent.args.count, prefix = %agent.args.name_prefix, "starting hollow nodes");
    let mut tasks = tokio::task::JoinSet::new();
    let names: Vec<String> = agent.lock().nodes.keys().cloned().collect();
    for name in names {
        tasks.spawn(agent.clone().node_loop(name));
    }
    tasks.spawn(agent.clone().watch_nodes());
    tasks.spawn(agent.clone().watch_pods());
    shutdown.cancelled().await;
    while tasks.join_next().await.is_some() {}
    Ok(())
}

impl Agent {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleep, or return false on shutdown.
    async fn pause(&self, duration: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(duration) => true,
        }
    }

    /// Register one node, then heartbeat it until shutdown or its deletion.
    async fn node_loop(self: Arc<Self>, name: String) {
        let (index, refresh) = {
            let state = self.lock();
            let node = &state.nodes[&name];
            (node.index, node.refresh.clone())
        };
        let mut backoff = Duration::from_millis(200);
        while let Err(error) = self.register(&name).await {
            tracing::warn!(node = %name, error = %skiff_common::error::chain(&error), "cannot register node; retrying");
            if !self.pause(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        tracing::info!(node = %name, "registered");
        // Spread the nodes' heartbeats over the interval.
        let spread = |period: Duration| {
            let slot = u64::from(index - self.args.first_index);
            let nanos = period.as_nanos() as u64 * slot / u64::from(self.args.count);
            tokio::time::Instant::now() + Duration::from_nanos(nanos)
        };
        let lease_period = self.args.node_lease_renew_interval;
        let status_period = self.args.node_status_report_frequency;
        let mut lease_tick =
            tokio::time::interval_at(spread(lease_period) + lease_period, lease_period);
        let mut status_tick =
            tokio::time::interval_at(spread(status_period) + status_period, status_period);
        for tick in [&mut lease_tick, &mut status_tick] {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = lease_tick.tick() => {
                    if let Err(error) = self.renew_lease(&name).await {
                        tracing::warn!(node = %name, error = %skiff_common::error::chain(&error), "cannot renew lease");
                    }
                }
                _ = status_tick.tick() => {
                    if let Err(error) = self.post_status(&name).await {
                        tracing::warn!(node = %name, error = %skiff_common::error::chain(&error), "cannot post node status");
                    }
                }
                _ = refresh.notified() => {
                    if self.lock().nodes.get(&name).is_none_or(|n| n.deleted) {
                        tracing::warn!(node = %name, "node was deleted; it stops heartbeating");
                        return;
                    }
                    if let Err(error) = self.post_status(&name).await {
                        tracing::warn!(node = %name, error = %skiff_common::error::chain(&error), "cannot post node status");
                    }
                }
            }
        }
    }

    /// Create the Node (or adopt an existing one), post its status, renew its Lease.
    async fn register(&self, name: &str) -> Result<(), kube::Error> {
        let api: Api<Node> = Api::all(self.client.clone());
        let node = node_object(&self.args, name);
        let created = {
            let _permit = self.writes.acquire().await;
            match api.create(&PostParams::default(), &node).await {
                Ok(created) => created,
                Err(error) if api_code(&error) == Some(409) => api.get(name).await?,
                Err(error) => return Err(error),
            }
        };
        if let Some(state) = self.lock().nodes.get_mut(name) {
            state.uid = created.metadata.uid.clone();
        }
        self.post_status(name).await?;
        self.renew_lease(name).await
    }

    async fn post_status(&self, name: &str) -> Result<(), kube::Error> {
        let (ip, ready_since) = {
            let state = self.lock();
            let Some(node) = state.nodes.get(name) else {
                return Ok(());
            };
            (node.ip, node.ready_since)
        };
        let patch = node_status(&self.args, name, ip, Timestamp::now(), ready_since);
        let api: Api<Node> = Api::all(self.client.clone());
        let _permit = self.writes.acquire().await;
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
    }

    async fn renew_lease(&self, name: &str) -> Result<(), kube::Error> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), LEASE_NAMESPACE);
        let spec = json!({
            "holderIdentity": name,
            "leaseDurationSeconds": self.args.node_lease_duration_seconds,
            "renewTime": MicroTime(Timestamp::now()),
        });
        let _permit = self.writes.acquire().await;
        match api
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": spec})),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if api_code(&error) == Some(404) => {
                let uid = self.lock().nodes.get(name).and_then(|n| n.uid.clone());
                let mut metadata = json!({"name": name, "namespace": LEASE_NAMESPACE});
                if let Some(uid) = uid {
                    metadata["ownerReferences"] = json!([{
                        "apiVersion": "v1", "kind": "Node", "name": name, "uid": uid,
                    }]);
                }
                let lease: Lease = serde_json::from_value(json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": metadata,
                    "spec": spec,
                }))
                .expect("a node Lease is well-formed");
                match api.create(&PostParams::default(), &lease).await {
                    Err(error) if api_code(&error) != Some(409) => Err(error),
                    _ => Ok(()),
                }
            }
            Err(error) => Err(error),
        }
    }

    /// Follow the agent's Nodes: their pod CIDRs, their deletion, and Ready
    /// conditions others changed.
    async fn watch_nodes(self: Arc<Self>) {
        let api: Api<Node> = Api::all(self.client.clone());
        let config = watcher::Config::default().labels(&format!("{INSTANCE_TYPE_LABEL}=hollow"));
        let mut stream = watcher(api, config).default_backoff().boxed();
        let mut seen = HashSet::new();
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                event = stream.next() => event,
            };
            match event {
                None => return,
                Some(Err(error)) => {
                    tracing::warn!(error = %skiff_common::error::chain(&error), "node watch failed; retrying")
                }
                Some(Ok(watcher::Event::Init)) => seen.clear(),
                Some(Ok(watcher::Event::InitApply(node))) => {
                    seen.insert(node.metadata.name.clone().unwrap_or_default());
                    self.on_node(&node, false);
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    // Nodes of ours that were registered before and are gone now.
                    let gone: Vec<String> = {
                        let state = self.lock();
                        state
                            .nodes
                            .iter()
                            .filter(|(name, n)| {
                                n.uid.is_some() && !n.deleted && !seen.contains(*name)
                            })
                            .map(|(name, _)| name.clone())
                            .collect()
                    };
                    // Registered after the list began, or really gone: ask.
                    for name in gone {
                        tokio::spawn(self.clone().confirm_gone(name));
                    }
                }
                Some(Ok(watcher::Event::Apply(node))) => self.on_node(&node, false),
                Some(Ok(watcher::Event::Delete(node))) => self.on_node(&node, true),
            }
        }
    }

    /// Forget a node missing from a relist if the API server says it is
    /// gone (or was replaced by another of the same name).
    async fn confirm_gone(self: Arc<Self>, name: String) {
        let api: Api<Node> = Api::all(self.client.clone());
        let uid = self.lock().nodes.get(&name).and_then(|n| n.uid.clone());
        match api.get_opt(&name).await {
            Ok(None) => self.forget_node(&name),
            Ok(Some(node)) if node.metadata.uid != uid => self.forget_node(&name),
            Ok(Some(_)) => {}
            Err(error) => {
                tracing::debug!(node = %name, error = %skiff_common::error::chain(&error), "cannot check node")
            }
        }
    }

    fn forget_node(&self, name: &str) {
        let mut state = self.lock();
        if let Some(node) = state.nodes.get_mut(name) {
            node.deleted = true;
            node.refresh.notify_one();
        }
    }

    fn on_node(self: &Arc<Self>, node: &Node, deleted: bool) {
        let name = node.metadata.name.clone().unwrap_or_default();
        if deleted {
            let ours = self
                .lock()
                .nodes
                .get(&name)
                .is_some_and(|n| n.uid == node.metadata.uid);
            if ours {
                self.forget_node(&name);
            }
            return;
        }
        let cidr = pod_cidr(node);
        let ready = node_ready(node);
        let parked = {
            let mut state = self.lock();
            let Some(ours) = state.nodes.get_mut(&name) else {
                return;
            };
            if ours.deleted || ours.uid.is_none() || ours.uid != node.metadata.uid {
                return;
            }
            if !ready
                && node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some()
            {
                // Someone (the node lifecycle controller) marked it not
                // Ready: a live node says otherwise at once.
                ours.ready_since = Timestamp::now();
                ours.refresh.notify_one();
            }
            match (cidr, &ours.ips) {
                (Some(cidr), None) => {
                    tracing::info!(node = %name, %cidr, "got pod CIDR");
                    ours.ips = Some(PodIps::new(cidr));
                    std::mem::take(&mut ours.parked)
                }
                _ => Vec::new(),
            }
        };
        // Running pods first, so that they keep their addresses.
        let (running, others): (Vec<Pod>, Vec<Pod>) = parked.into_iter().partition(is_running);
        for pod in running.into_iter().chain(others) {
            self.lock()
                .pods
                .remove(pod.metadata.uid.as_deref().unwrap_or_default());
            self.on_pod(pod);
        }
    }

    /// Follow the pods bound to the agent's nodes.
    async fn watch_pods(self: Arc<Self>) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let selector = if self.args.count == 1 {
            format!(
                "spec.nodeName={}",
                node_name(&self.args.name_prefix, self.args.first_index)
            )
        } else {
            "spec.nodeName!=".to_string()
        };
        let config = watcher::Config::default().fields(&selector);
        let mut stream = watcher(api, config).default_backoff().boxed();
        let mut initial: Vec<Pod> = Vec::new();
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                event = stream.next() => event,
            };
            match event {
                None => return,
                Some(Err(error)) => {
                    tracing::warn!(error = %skiff_common::error::chain(&error), "pod watch failed; retrying")
                }
                Some(Ok(watcher::Event::Init)) => initial.clear(),
                Some(Ok(watcher::Event::InitApply(pod))) => {
                    if self.is_ours(&pod) {
                        initial.push(pod);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    let listed: HashSet<String> = initial
                        .iter()
                        .filter_map(|p| p.metadata.uid.clone())
                        .collect();
                    let gone: Vec<String> = self
                        .lock()
                        .pods
                        .keys()
                        .filter(|uid| !listed.contains(*uid))
                        .cloned()
                        .collect();
                    for uid in gone {
                        self.forget_pod(&uid);
                    }
                    let (running, others): (Vec<Pod>, Vec<Pod>) = std::mem::take(&mut initial)
                        .into_iter()
                        .partition(is_running);
                    for pod in running.into_iter().chain(others) {
                        self.on_pod(pod);
                    }
                }
                Some(Ok(watcher::Event::Apply(pod))) => {
                    if self.is_ours(&pod) {
                        self.on_pod(pod);
                    }
                }
                Some(Ok(watcher::Event::Delete(pod))) => {
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        self.forget_pod(uid);
                    }
                }
            }
        }
    }

    fn is_ours(&self, pod: &Pod) -> bool {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or_default();
        self.lock().nodes.contains_key(node)
    }

    /// A pod is gone: free its address.
    fn forget_pod(&self, uid: &str) {
        let mut state = self.lock();
        let Some(record) = state.pods.remove(uid) else {
            return;
        };
        if let Some(node) = state.nodes.get_mut(&record.node) {
            node.parked
                .retain(|p| p.metadata.uid.as_deref() != Some(uid));
            if let (Some(ip), Some(ips)) = (record.ip, node.ips.as_mut()) {
                ips.release(ip);
            }
        }
    }

    fn on_pod(self: &Arc<Self>, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let node_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let mut state = self.lock();
        let progress = state.pods.get(&uid).map(|r| r.progress);
        let State { nodes, pods } = &mut *state;
        let Some(node) = nodes.get_mut(&node_name) else {
            return;
        };
        let cidr = node.ips.as_ref().map(PodIps::cidr);
        match pod_action(&pod, progress, cidr) {
            PodAction::Ignore => {}
            PodAction::Park => {
                node.parked
                    .retain(|p| p.metadata.uid.as_deref() != Some(uid.as_str()));
                node.parked.push(pod);
                pods.insert(
                    uid,
                    PodRecord {
                        node: node_name,
                        ip: None,
                        progress: Progress::Parked,
                    },
                );
            }
            PodAction::Adopt(ip) => {
                if let Some(ips) = node.ips.as_mut() {
                    ips.occupy(ip);
                }
                pods.insert(
                    uid,
                    PodRecord {
                        node: node_name,
                        ip: Some(ip),
                        progress: Progress::Running,
                    },
                );
            }
            PodAction::Start => {
                let Some(ip) = node.ips.as_mut().and_then(PodIps::allocate) else {
                    tracing::warn!(node = %node_name, pod = ?pod.metadata.name, "no free pod address; the pod waits");
                    node.parked.push(pod);
                    pods.insert(
                        uid,
                        PodRecord {
                            node: node_name,
                            ip: None,
                            progress: Progress::Parked,
                        },
                    );
                    return;
                };
                let host_ip = node.ip;
                pods.insert(
                    uid.clone(),
                    PodRecord {
                        node: node_name,
                        ip: Some(ip),
                        progress: Progress::Starting,
                    },
                );
                drop(state);
                tokio::spawn(self.clone().start_pod(pod, uid, ip, host_ip));
            }
            PodAction::Delete => {
                let ip = pods.get(&uid).and_then(|r| r.ip);
                node.parked
                    .retain(|p| p.metadata.uid.as_deref() != Some(uid.as_str()));
                pods.insert(
                    uid.clone(),
                    PodRecord {
                        node: node_name,
                        ip,
                        progress: Progress::Deleting,
                    },
                );
                drop(state);
                tokio::spawn(self.clone().delete_pod(pod, uid));
            }
        }
    }

    /// Report the pod Running, retrying while it is still ours to start.
    async fn start_pod(self: Arc<Self>, pod: Pod, uid: String, ip: IpAddr, host_ip: Ipv4Addr) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let mut backoff = Duration::from_millis(200);
        loop {
            let still_starting = self
                .lock()
                .pods
                .get(&uid)
                .is_some_and(|r| r.progress == Progress::Starting);
            if !still_starting {
                return;
            }
            let patch = running_status(&pod, ip, host_ip, Timestamp::now());
            let result = {
                let _permit = self.writes.acquire().await;
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
            };
            match result {
                Ok(_) => {
                    if let Some(record) = self.lock().pods.get_mut(&uid)
                        && record.progress == Progress::Starting
                    {
                        record.progress = Progress::Running;
                    }
                    tracing::debug!(pod = %format!("{namespace}/{name}"), %ip, "pod running");
                    return;
                }
                // Gone: its Delete event frees the address.
                Err(error) if api_code(&error) == Some(404) => return,
                Err(error) => {
                    tracing::warn!(pod = %format!("{namespace}/{name}"), error = %skiff_common::error::chain(&error), "cannot report pod running; retrying");
                    if !self.pause(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Finish a pod's deletion, as a kubelet does once its containers stopped.
    async fn delete_pod(self: Arc<Self>, pod: Pod, uid: String) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let mut backoff = Duration::from_millis(200);
        for _ in 0..10 {
            let result = {
                let _permit = self.writes.acquire().await;
                api.delete(&name, &params).await
            };
            match result {
                Ok(_) => return,
                Err(error) if matches!(api_code(&error), Some(404 | 409)) => return,
                Err(error) => {
                    tracing::warn!(pod = %format!("{namespace}/{name}"), error = %skiff_common::error::chain(&error), "cannot delete pod; retrying");
                    if !self.pause(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        // Let the next event about it try again.
        if let Some(record) = self.lock().pods.get_mut(&uid) {
            record.progress = Progress::Parked;
        }
    }
}

fn is_running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args() -> NodeArgs {
        crate::cli::Cli::try_parse_from([
            "skiff-agent",
            "--hollow",
            "--cpu",
            "8",
            "--node-labels",
            "zone=a",
        ])
        .expect("parses")
        .node
    }

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).expect("a pod")
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().expect("a cidr")
    }

    #[test]
    fn names_are_numbered() {
        assert_eq!(node_name("hollow-", 7), "hollow-7");
    }

    #[test]
    fn node_ips_are_loopback_and_distinct() {
        let ips: HashSet<Ipv4Addr> = (0..1000).map(|i| node_ip("hollow-", i)).collect();
        assert_eq!(ips.len(), 1000);
        assert!(ips.iter().all(|ip| ip.is_loopback()));
        assert_eq!(node_ip("hollow-", 0).octets()[3], 1);
        assert_eq!(node_ip("hollow-", 256).octets()[2..], [1, 1]);
        assert_ne!(
            node_ip("a-", 0),
            node_ip("b-", 0),
            "prefixes spread over 127.0.0.0/8"
        );
    }

    #[test]
    fn node_object_and_status_carry_what_a_kubelet_posts() {
        let args = args();
        let node = node_object(&args, "hollow-0");
        let labels = node.metadata.labels.expect("labels");
        assert_eq!(labels["kubernetes.io/hostname"], "hollow-0");
        assert_eq!(labels[INSTANCE_TYPE_LABEL], "hollow");
        assert_eq!(labels["zone"], "a");
        let now = Timestamp::now();
        let patch = node_status(&args, "hollow-0", Ipv4Addr::new(127, 1, 0, 1), now, now);
        let status = &patch["status"];
        assert_eq!(status["capacity"]["cpu"], "8");
        assert_eq!(status["allocatable"]["memory"], "16Gi");
        assert_eq!(status["capacity"]["pods"], "110");
        assert_eq!(
            status["addresses"][0],
            json!({"type": "InternalIP", "address": "127.1.0.1"})
        );
        assert_eq!(status["nodeInfo"]["kubeletVersion"], KUBELET_VERSION);
        assert_eq!(status["nodeInfo"]["containerRuntimeVersion"], "hollow://");
        let ready = status["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .find(|c| c["type"] == "Ready")
            .expect("a Ready condition");
        assert_eq!(ready["status"], "True");
        // The patch deserializes as a Node whose Ready condition is True.
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": "x"}, "status": status}))
                .expect("node");
        assert!(node_ready(&node));
    }

    #[test]
    fn pod_ips_skip_network_gateway_and_broadcast() {
        let mut ips = PodIps::new(net("10.244.1.0/30"));
        assert_eq!(ips.allocate(), Some("10.244.1.2".parse().expect("ip")));
        assert_eq!(ips.allocate(), None, "a /30 has one pod address");
        let mut ips = PodIps::new(net("10.244.1.0/24"));
        let all: Vec<IpAddr> = std::iter::from_fn(|| ips.allocate()).collect();
        assert_eq!(all.len(), 253);
        assert_eq!(all[0], "10.244.1.2".parse::<IpAddr>().expect("ip"));
        assert_eq!(all[252], "10.244.1.254".parse::<IpAddr>().expect("ip"));
        ips.release("10.244.1.7".parse().expect("ip"));
        assert_eq!(ips.allocate(), Some("10.244.1.7".parse().expect("ip")));
        assert_eq!(ips.allocate(), None);
    }

    #[test]
    fn pod_ips_adopt_addresses_in_use() {
        let mut ips = PodIps::new(net("10.244.1.0/24"));
        assert!(ips.occupy("10.244.1.2".parse().expect("ip")));
        assert!(
            !ips.occupy("10.244.1.2".parse().expect("ip")),
            "taken twice"
        );
        assert!(!ips.occupy("10.244.2.2".parse().expect("ip")), "outside");
        assert_eq!(ips.allocate(), Some("10.244.1.3".parse().expect("ip")));
        assert_eq!(ips.len(), 2);
        let mut v6 = PodIps::new(net("fd00::/120"));
        assert_eq!(v6.allocate(), Some("fd00::2".parse().expect("ip")));
    }

    #[test]
    fn pod_actions_follow_the_pods_lifecycle() {
        let cidr = Some(net("10.244.1.0/24"));
        let pending = pod(
            json!({"metadata": {"name": "p", "uid": "u"}, "spec": {"nodeName": "n", "containers": []}, "status": {"phase": "Pending"}}),
        );
        assert_eq!(pod_action(&pending, None, None), PodAction::Park);
        assert_eq!(
            pod_action(&pending, Some(Progress::Parked), cidr),
            PodAction::Start
        );
        assert_eq!(
            pod_action(&pending, Some(Progress::Starting), cidr),
            PodAction::Ignore
        );
        assert_eq!(
            pod_action(&pending, Some(Progress::Running), cidr),
            PodAction::Ignore
        );
        let running = pod(
            json!({"metadata": {"name": "p", "uid": "u"}, "spec": {"containers": []}, "status": {"phase": "Running", "podIP": "10.244.1.9"}}),
        );
        assert_eq!(
            pod_action(&running, None, cidr),
            PodAction::Adopt("10.244.1.9".parse().expect("ip"))
        );
        assert_eq!(
            pod_action(&running, None, Some(net("10.244.2.0/24"))),
            PodAction::Start
        );
        let deleting = pod(
            json!({"metadata": {"name": "p", "uid": "u", "deletionTimestamp": "2025-01-01T00:00:00Z"}, "spec": {"containers": []}}),
        );
        assert_eq!(
            pod_action(&deleting, Some(Progress::Running), cidr),
            PodAction::Delete
        );
        assert_eq!(pod_action(&deleting, None, None), PodAction::Delete);
        assert_eq!(
            pod_action(&deleting, Some(Progress::Deleting), cidr),
            PodAction::Ignore
        );
        let done = pod(
            json!({"metadata": {"name": "p", "uid": "u"}, "spec": {"containers": []}, "status": {"phase": "Succeeded"}}),
        );
        assert_eq!(pod_action(&done, None, cidr), PodAction::Ignore);
    }

    #[test]
    fn running_status_reports_every_container_ready() {
        let p = pod(json!({
            "metadata": {"name": "p", "uid": "0123456789abcdef"},
            "spec": {
                "nodeName": "n",
                "initContainers": [{"name": "init", "image": "busybox"}, {"name": "side", "image": "envoy", "restartPolicy": "Always"}],
                "containers": [{"name": "web", "image": "nginx"}, {"name": "log", "image": "fluentd"}],
            },
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "2025-01-01T00:00:00Z"}]},
        }));
        let patch = running_status(
            &p,
            "10.244.1.2".parse().expect("ip"),
            Ipv4Addr::new(127, 1, 0, 1),
            Timestamp::now(),
        );
        let status = &patch["status"];
        assert_eq!(status["phase"], "Running");
        assert_eq!(status["podIP"], "10.244.1.2");
        assert_eq!(status["podIPs"], json!([{"ip": "10.244.1.2"}]));
        assert_eq!(status["hostIP"], "127.1.0.1");
        assert!(status["startTime"].is_string());
        let containers = status["containerStatuses"].as_array().expect("statuses");
        assert_eq!(containers.len(), 2);
        for c in containers {
            assert_eq!(c["ready"], true);
            assert_eq!(c["restartCount"], 0);
            assert!(c["state"]["running"]["startedAt"].is_string());
        }
        assert_eq!(containers[0]["name"], "web");
        assert_eq!(containers[0]["image"], "nginx");
        let init = status["initContainerStatuses"]
            .as_array()
            .expect("init statuses");
        assert_eq!(init[0]["state"]["terminated"]["reason"], "Completed");
        assert!(
            init[1]["state"]["running"].is_object(),
            "sidecars keep running"
        );
        let conditions = status["conditions"].as_array().expect("conditions");
        for type_ in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
            let c = conditions
                .iter()
                .find(|c| c["type"] == type_)
                .expect("condition present");
            assert_eq!(c["status"], "True", "{type_}");
        }
        let scheduled = conditions
            .iter()
            .find(|c| c["type"] == "PodScheduled")
            .expect("scheduled");
        assert_eq!(scheduled["lastTransitionTime"], "2025-01-01T00:00:00Z");
        // The patch is a valid PodStatus.
        let _: k8s_openapi::api::core::v1::PodStatus =
            serde_json::from_value(status.clone()).expect("a PodStatus");
    }
}
