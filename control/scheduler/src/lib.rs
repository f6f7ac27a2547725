//! The scheduler: places unscheduled pods on nodes, as kube-scheduler does.
//!
//! Watches of nodes and pods feed an in-memory [`cache::Cache`] of every
//! node's allocatable and requested resources; pending pods of this
//! scheduler's `schedulerName` wait in a [`queue::SchedulingQueue`]. One loop
//! takes pods from the queue, [`filter`]s the nodes (searching an
//! adaptive share of them from a rotating start on large clusters, as
//! upstream's `percentageOfNodesToScore`), [`score`]s the feasible ones,
//! assumes the best placement in the cache at once and hands the binding
//! (`pods/binding`) to a task, so up to [`MAX_BINDS_IN_FLIGHT`] bindings run
//! while the loop goes on. A failed binding forgets the assumption and backs
//! the pod off. A pod that fits nowhere gets a `FailedScheduling` event and
//! its `PodScheduled` condition set False with reason Unschedulable, both
//! with upstream's message, and waits for a cluster change. Events and status
//! writes go through a bounded channel that drops on overflow, as upstream's
//! event broadcaster does, so they never slow scheduling down.
//!
//! Only the holder of the `kube-system/kube-scheduler` Lease schedules when
//! leader election is on.

pub mod cache;
pub mod filter;
pub mod queue;
pub mod resources;
pub mod score;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use cache::{Cache, NodeChange, PodUsage};
use filter::Candidate;
use queue::{QueuedPod, SchedulingQueue};
use skiff_common::daemon::DaemonArgs;
use skiff_common::events::{EventRecorder, EventType};
use skiff_common::informer::SharedWatch;
use skiff_common::leader;
use skiff_common::watch::{Change, watch_changes};

/// The component name on events, and the default `spec.schedulerName`.
pub const COMPONENT: &str = "default-scheduler";

/// Bindings in flight at once. Upstream binds each pod in a goroutine of
/// its own; a bound is kept so that a stalled API server cannot pile up
/// unlimited requests, but it is high enough that the binding round trip
/// (tens of milliseconds under load) does not cap the rate: 64 bindings of
/// 40 ms each still allow 1,600 pods/s.
pub const MAX_BINDS_IN_FLIGHT: usize = 64;

/// Events and status writes queued before new ones are dropped.
const REPORT_BUFFER: usize = 1024;

/// Events and status writes in flight at once.
const REPORTS_IN_FLIGHT: usize = 8;

/// How often unschedulable pods are checked for the five-minute retry.
const FLUSH_PERIOD: Duration = Duration::from_secs(30);

/// Flags of `skiff-control scheduler`.
#[derive(Debug, Clone, clap::Args)]
pub struct SchedulerArgs {
    /// Connection and election.
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Scheduler options.
    #[command(flatten)]
    pub options: SchedulerOptions,
}

/// The scheduler's configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct SchedulerOptions {
    /// The `spec.schedulerName` this scheduler serves.
    #[arg(long, default_value = "default-scheduler")]
    pub scheduler_name: String,
}

/// Why a binding failed.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The API refused or could not be reached.
    #[error("cannot bind pod {namespace}/{name} to node {node}")]
    Api {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The chosen node.
        node: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
}

impl BindError {
    /// Whether retrying cannot help: the pod is gone (404) or already bound
    /// or being deleted (409); the watch brings the truth.
    pub fn is_final(&self) -> bool {
        let BindError::Api { source, .. } = self;
        matches!(skiff_common::error::api_code(source), Some(404 | 409))
    }
}

/// `skiff-control scheduler`: the scheduler as its own process, a client
/// of the API server named by its kubeconfig.
pub async fn run_daemon(
    args: SchedulerArgs,
    shutdown: CancellationToken,
) -> Result<(), skiff_common::daemon::ClientError> {
    skiff_common::daemon::run_client_daemon(args.daemon, args.options, shutdown, run).await
}

/// Run the scheduler until `shutdown`: while this process holds the
/// `kube-system/kube-scheduler` Lease, or always with election off. Pods
/// come from `pods`.
pub async fn run(
    client: kube::Client,
    options: SchedulerOptions,
    pods: Arc<SharedWatch<Pod>>,
    election: leader::ElectionArgs,
    shutdown: CancellationToken,
) {
    let scheduler_client = client.clone();
    leader::run_elected(
        client,
        "kube-scheduler",
        election,
        shutdown,
        move |leading| {
            Scheduler::new(scheduler_client.clone(), options.clone(), pods.clone()).run(leading)
        },
    )
    .await;
}

/// Something to tell the API about a scheduling outcome.
enum Report {
    Scheduled { pod: Arc<Pod>, node: String },
    Failed { pod: Arc<Pod>, message: String },
}

/// How many nodes to find feasible before scoring, upstream's adaptive
/// `percentageOfNodesToScore`: all below 100 nodes, else 50 % minus 1 %
/// per 125 nodes (at least 5 %), never fewer than 100.
pub fn feasible_nodes_to_find(nodes: usize) -> usize {
    if nodes < 100 {
        return nodes;
    }
    let percent = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * percent / 100).max(100)
}

/// A pod that fits on no node, with upstream's `FailedScheduling` message
/// (what its event and its `PodScheduled` condition say).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Unschedulable {
    /// The message.
    pub message: String,
}

/// Choose a node for `candidate` among the cache's nodes, searching from
/// `*start` and advancing it past the nodes looked at.
pub fn find_node(
    cache: &Cache,
    candidate: &Candidate<'_>,
    start: &mut usize,
    rng: &mut impl rand::Rng,
) -> Result<String, Unschedulable> {
    let nodes = cache.nodes();
    let total = nodes.len();
    if total == 0 {
        return Err(Unschedulable {
            message: filter::fit_error(0, &[], candidate.never_preempts),
        });
    }
    let wanted = feasible_nodes_to_find(total);
    let mut feasible = Vec::with_capacity(wanted.min(total));
    let mut failures = Vec::new();
    let mut looked = 0;
    for k in 0..total {
        let node = &nodes[(*start + k) % total];
        looked += 1;
        match filter::filter(candidate, node) {
            Ok(()) => {
                feasible.push(node);
                if feasible.len() >= wanted {
                    break;
                }
            }
            Err(failure) => failures.push(failure),
        }
    }
    *start = (*start + looked) % total;
    if feasible.is_empty() {
        return Err(Unschedulable {
            message: filter::fit_error(total, &failures, candidate.never_preempts),
        });
    }
    let scores = score::score(candidate, &feasible);
    let best = score::select(&scores, rng).unwrap_or(0);
    Ok(feasible[best].name.clone())
}

struct Scheduler {
    client: kube::Client,
    options: SchedulerOptions,
    pods: Arc<SharedWatch<Pod>>,
    cache: Mutex<Cache>,
    queue: SchedulingQueue,
    binds: Arc<Semaphore>,
    next_start: AtomicUsize,
}

impl Scheduler {
    fn new(
        client: kube::Client,
        options: SchedulerOptions,
        pods: Arc<SharedWatch<Pod>>,
    ) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            client,
            options,
            pods,
            cache: Mutex::new(Cache::new()),
            queue: SchedulingQueue::new(),
            binds: Arc::new(Semaphore::new(MAX_BINDS_IN_FLIGHT)),
            next_start: AtomicUsize::new(0),
        })
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tracing::info!(scheduler = %self.options.scheduler_name, "scheduler starting");
        let (report_tx, report_rx) = mpsc::channel(REPORT_BUFFER);
        let mut tasks = tokio::task::JoinSet::new();
        let (nodes_synced_tx, nodes_synced) = tokio::sync::oneshot::channel();
        let (pods_synced_tx, pods_synced) = tokio::sync::oneshot::channel();
        tasks.spawn(self.clone().watch_nodes(shutdown.clone(), nodes_synced_tx));
        tasks.spawn(self.clone().watch_pods(shutdown.clone(), pods_synced_tx));
        tasks.spawn(self.clone().report(report_rx));
        tasks.spawn(self.clone().flush(shutdown.clone()));
        let synced = async {
            let _ = nodes_synced.await;
            let _ = pods_synced.await;
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = synced => self.schedule_loop(&shutdown, &report_tx).await,
        }
        drop(report_tx);
        shutdown.cancelled().await;
        // Let bindings in flight finish before leadership is handed over.
        let _ = self.binds.acquire_many(MAX_BINDS_IN_FLIGHT as u32).await;
        while tasks.join_next().await.is_some() {}
        tracing::info!("scheduler stopped");
    }

    async fn schedule_loop(
        self: &Arc<Self>,
        shutdown: &CancellationToken,
        reports: &mpsc::Sender<Report>,
    ) {
        while let Some(queued) = self.queue.pop(shutdown).await {
            self.schedule_one(queued, reports).await;
        }
    }

    async fn schedule_one(self: &Arc<Self>, queued: QueuedPod, reports: &mpsc::Sender<Report>) {
        let pod = queued.pod.clone();
        let candidate = Candidate::new(&pod);
        let decision = {
            let mut cache = self.cache();
            if cache.pod_state(&queued.uid).is_some() {
                // Bound or being bound already (a stale watch event requeued it).
                drop(cache);
                self.queue.remove(&queued.uid);
                return;
            }
            let mut start = self.next_start.load(Ordering::Relaxed);
            let decision = find_node(&cache, &candidate, &mut start, &mut rand::rng());
            self.next_start.store(start, Ordering::Relaxed);
            if let Ok(node) = &decision {
                let mut usage = candidate.usage.clone();
                usage.node = node.clone();
                cache.assume(usage);
            }
            decision
        };
        match decision {
            Ok(node) => {
                let Ok(permit) = self.binds.clone().acquire_owned().await else {
                    return;
                };
                let this = self.clone();
                let reports = reports.clone();
                tokio::spawn(async move {
                    let result = this.bind(&pod, &node).await;
                    drop(permit);
                    match result {
                        Ok(()) => {
                            this.queue.remove(&queued.uid);
                            send(&reports, Report::Scheduled { pod, node });
                        }
                        Err(error) => {
                            this.cache().forget(&queued.uid);
                            tracing::info!(error = %skiff_common::error::chain(&error), "binding failed");
                            if error.is_final() {
                                this.queue.remove(&queued.uid);
                            } else {
                                this.queue.backoff(&queued.uid, Instant::now());
                            }
                        }
                    }
                });
            }
            Err(Unschedulable { message }) => {
                tracing::debug!(pod = %key(&pod), %message, attempts = queued.attempts, "pod is unschedulable");
                self.queue.unschedulable(&queued.uid, Instant::now());
                send(reports, Report::Failed { pod, message });
            }
        }
    }

    async fn bind(&self, pod: &Pod, node: &str) -> Result<(), BindError> {
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                uid: pod.metadata.uid.clone(),
                ..ObjectMeta::default()
            },
            target: ObjectReference {
                api_version: Some("v1".to_string()),
                kind: Some("Node".to_string()),
                name: Some(node.to_string()),
                ..ObjectReference::default()
            },
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        api.create_subresource::<_, serde_json::Value>(
            "binding",
            &name,
            &PostParams::default(),
            &binding,
        )
        .await
        .map(|_| ())
        .map_err(|source| BindError::Api {
            namespace,
            name,
            node: node.to_string(),
            source,
        })
    }

    /// Keep the cache's nodes in step with the API; `synced` fires after
    /// the first complete list.
    async fn watch_nodes(
        self: Arc<Self>,
        shutdown: CancellationToken,
        synced: tokio::sync::oneshot::Sender<()>,
    ) {
        let mut synced = Some(synced);
        watch_changes::<Node, _>(self.client.clone(), shutdown, |change| match change {
            Change::Resynced(nodes) => {
                {
                    let mut cache = self.cache();
                    let listed: HashSet<String> = nodes
                        .iter()
                        .map(|n| n.metadata.name.clone().unwrap_or_default())
                        .collect();
                    for node in &nodes {
                        cache.set_node(node);
                    }
                    for name in cache.node_names() {
                        if !listed.contains(&name) {
                            cache.remove_node(&name);
                        }
                    }
                }
                self.queue.move_all_unschedulable(Instant::now());
                if let Some(tx) = synced.take() {
                    let _ = tx.send(());
                }
            }
            Change::Applied(node) => {
                let change = self.cache().set_node(&node);
                if change != NodeChange::Unchanged {
                    self.queue.move_all_unschedulable(Instant::now());
                }
            }
            Change::Deleted(node) => {
                self.cache()
                    .remove_node(node.metadata.name.as_deref().unwrap_or_default());
            }
        })
        .await;
    }

    /// Keep the cache's bound pods and the queue's pending pods in step
    /// with the API; `synced` fires after the first complete list.
    async fn watch_pods(
        self: Arc<Self>,
        shutdown: CancellationToken,
        synced: tokio::sync::oneshot::Sender<()>,
    ) {
        let mut synced = Some(synced);
        let pods = self.pods.clone();
        pods.watch(shutdown, |change| match change {
            Change::Resynced(pods) => {
                let listed: HashSet<String> = pods
                    .iter()
                    .map(|p| p.metadata.uid.clone().unwrap_or_default())
                    .collect();
                for pod in pods {
                    self.apply_pod(pod);
                }
                let mut freed = false;
                {
                    let mut cache = self.cache();
                    for uid in cache.confirmed_pods() {
                        if !listed.contains(&uid) {
                            freed |= cache.remove_pod(&uid);
                        }
                    }
                }
                self.queue.retain(|uid| listed.contains(uid));
                if freed {
                    self.queue.move_all_unschedulable(Instant::now());
                }
                if let Some(tx) = synced.take() {
                    let _ = tx.send(());
                }
            }
            Change::Applied(pod) => self.apply_pod(pod),
            Change::Deleted(pod) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                self.queue.remove(&uid);
                if self.cache().remove_pod(&uid) {
                    self.queue.move_all_unschedulable(Instant::now());
                }
            }
        })
        .await;
    }

    /// Route one pod from the watch: bound pods into the cache, pending pods
    /// of this scheduler into the queue, finished pods out of both.
    fn apply_pod(&self, pod: Arc<Pod>) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            self.queue.remove(&uid);
            if self.cache().remove_pod(&uid) {
                self.queue.move_all_unschedulable(Instant::now());
            }
            return;
        }
        let spec = pod.spec.as_ref();
        if let Some(node) = spec
            .and_then(|s| s.node_name.as_deref())
            .filter(|n| !n.is_empty())
        {
            let usage = PodUsage::of(&pod, node);
            self.cache().set_pod(usage);
            self.queue.remove(&uid);
            return;
        }
        let ours = spec
            .and_then(|s| s.scheduler_name.as_deref())
            .unwrap_or(COMPONENT)
            == self.options.scheduler_name;
        if ours && pod.metadata.deletion_timestamp.is_none() {
            self.queue.add_or_update(pod, Instant::now());
        } else {
            self.queue.remove(&uid);
        }
    }

    async fn flush(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(FLUSH_PERIOD) => self.queue.flush_stale(Instant::now()),
            }
        }
    }

    /// Write events and pod conditions, a few at a time.
    async fn report(self: Arc<Self>, reports: mpsc::Receiver<Report>) {
        let recorder = EventRecorder::new(self.client.clone(), COMPONENT);
        let recorder = &recorder;
        let this = &self;
        tokio_stream::wrappers::ReceiverStream::new(reports)
            .for_each_concurrent(REPORTS_IN_FLIGHT, |report| async move {
                match report {
                    Report::Scheduled { pod, node } => {
                        let message = format!("Successfully assigned {} to {node}", key(&pod));
                        recorder
                            .record(
                                &pod_reference(&pod),
                                EventType::Normal,
                                "Scheduled",
                                &message,
                            )
                            .await;
                    }
                    Report::Failed { pod, message } => {
                        recorder
                            .record(
                                &pod_reference(&pod),
                                EventType::Warning,
                                "FailedScheduling",
                                &message,
                            )
                            .await;
                        this.mark_unschedulable(&pod, &message).await;
                    }
                }
            })
            .await;
    }

    /// Set the pod's PodScheduled condition False/Unschedulable with
    /// `message`, unless it already says so.
    async fn mark_unschedulable(&self, pod: &Pod, message: &str) {
        let current = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"));
        if current.is_some_and(|c| {
            c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
                && c.message.as_deref() == Some(message)
        }) {
            return;
        }
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let patch = json!({"status": {"conditions": [{
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastProbeTime": null,
            "lastTransitionTime": Time(jiff::Timestamp::now()),
        }]}});
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        if let Err(error) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            tracing::debug!(error = %skiff_common::error::chain(&error), pod = %key(pod), "cannot set PodScheduled condition");
        }
    }
}

/// Queue a report, dropping it when the writers are too far behind.
fn send(reports: &mpsc::Sender<Report>, report: Report) {
    if let Err(mpsc::error::TrySendError::Full(_)) = reports.try_send(report) {
        tracing::debug!("report queue full; dropping an event");
    }
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn pod_reference(pod: &Pod) -> ObjectReference {
    skiff_common::events::reference("v1", "Pod", &pod.metadata)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn feasible_node_counts_follow_percentage_of_nodes_to_score() {
        let cases = [
            (3, 3),
            (99, 99),
            (100, 100),
            (1000, 420),
            (5000, 500),
            (6000, 300),
            (20000, 1000),
        ];
        for (nodes, want) in cases {
            assert_eq!(feasible_nodes_to_find(nodes), want, "{nodes} nodes");
        }
    }

    fn node(name: &str, cpu: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {"allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}))
        .expect("node json")
    }

    fn pod(name: &str, cpu: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "uid": name},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}}))
        .expect("pod json")
    }

    #[test]
    fn consecutive_decisions_see_assumed_pods() {
        let mut cache = Cache::new();
        cache.set_node(&node("a", "1"));
        cache.set_node(&node("b", "1"));
        let mut start = 0;
        let mut placed = Vec::new();
        for i in 0..2 {
            let p = pod(&format!("p{i}"), "600m");
            let candidate = Candidate::new(&p);
            let chosen = find_node(&cache, &candidate, &mut start, &mut rand::rng()).expect("fits");
            let mut usage = candidate.usage.clone();
            usage.node = chosen.clone();
            cache.assume(usage);
            placed.push(chosen);
        }
        placed.sort();
        assert_eq!(
            placed,
            vec!["a", "b"],
            "the second pod must not land on the first's node"
        );
        let p = pod("p2", "600m");
        let err =
            find_node(&cache, &Candidate::new(&p), &mut start, &mut rand::rng()).expect_err("full");
        assert_eq!(
            err.message,
            "0/2 nodes are available: 2 Insufficient cpu. preemption: 0/2 nodes are available: 2 No preemption victims found for incoming pod."
        );
    }

    #[test]
    fn large_clusters_are_searched_round_robin() {
        let mut cache = Cache::new();
        for i in 0..1000 {
            cache.set_node(&node(&format!("n{i:04}"), "4"));
        }
        let p = pod("p", "100m");
        let mut start = 0;
        find_node(&cache, &Candidate::new(&p), &mut start, &mut rand::rng()).expect("fits");
        assert_eq!(start, 420, "stops after finding 420 feasible nodes");
        find_node(&cache, &Candidate::new(&p), &mut start, &mut rand::rng()).expect("fits");
        assert_eq!(start, 840);
        find_node(&cache, &Candidate::new(&p), &mut start, &mut rand::rng()).expect("fits");
        assert_eq!(start, 260, "wraps around");
        let empty = Cache::new();
        assert_eq!(
            find_node(&empty, &Candidate::new(&p), &mut start, &mut rand::rng()),
            Err(Unschedulable {
                message: filter::ERR_NO_NODES.to_string()
            })
        );
    }

    #[test]
    fn scheduling_a_thousand_pods_on_a_thousand_nodes_is_fast() {
        let mut cache = Cache::new();
        for i in 0..1000 {
            cache.set_node(&node(&format!("n{i:04}"), "8"));
        }
        let pods: Vec<Pod> = (0..1000).map(|i| pod(&format!("p{i}"), "100m")).collect();
        let mut start = 0;
        let began = Instant::now();
        for p in &pods {
            let candidate = Candidate::new(p);
            let chosen = find_node(&cache, &candidate, &mut start, &mut rand::rng()).expect("fits");
            let mut usage = candidate.usage.clone();
            usage.node = chosen;
            cache.assume(usage);
        }
        let elapsed = began.elapsed();
        // Generous for debug builds on a busy 2-core machine; release is far faster.
        assert!(
            elapsed < Duration::from_secs(20),
            "1000 decisions took {elapsed:?}"
        );
        let busiest = cache
            .nodes()
            .iter()
            .map(|n| n.usage.requested.pods)
            .max()
            .unwrap_or(0);
        assert!(busiest <= 2, "pods spread out, busiest node has {busiest}");
    }
}
