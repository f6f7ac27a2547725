//! Node IPAM: every Node gets a pod CIDR (`spec.podCIDR` and
//! `spec.podCIDRs`) of `--node-cidr-mask-size` from `--cluster-cidr`, as
//! upstream's range allocator does.
//!
//! The allocator's state is rebuilt from the CIDRs the Nodes already carry
//! each time the node watch (re)lists, so a restarted or newly elected
//! controller manager never hands a range out twice. A deleted Node's range
//! is free again at once. When the cluster CIDR is exhausted the Node gets a
//! `CIDRNotAvailable` event and waits until a range is released. Unlike
//! upstream (which continues after the last range handed out) the lowest
//! free range is always taken, so a released range is the next one given.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Context;
use skiff_common::events::{EventType, reference};
use skiff_common::watch::{Change, watch_changes};
use skiff_common::workqueue::WorkQueue;

/// The most subnets the allocator manages (a /8 into /24s is 65,536).
const MAX_SUBNETS: u32 = 24;

/// How long new Nodes are gathered before their CIDRs are written.
const BATCH_DELAY: Duration = Duration::from_millis(100);

/// How many Nodes' CIDRs are written at once.
const CONCURRENT_WRITES: usize = 16;

/// How long a Node whose CIDR could not be written waits before a retry.
const RETRY: Duration = Duration::from_secs(5);

/// Errors in the allocator's configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    /// The mask size does not fit the cluster CIDR.
    #[error(
        "node CIDR mask size /{mask} does not fit cluster CIDR {cluster} (it must be at least its prefix and at most {max})"
    )]
    Mask {
        /// The cluster CIDR.
        cluster: IpNetwork,
        /// The node mask size.
        mask: u8,
        /// The largest allowed.
        max: u8,
    },
}

/// Hands out the node-sized subnets of a cluster CIDR, lowest free first.
#[derive(Debug, Clone)]
pub struct CidrAllocator {
    cluster: IpNetwork,
    mask: u8,
    /// Indexes of the subnets in use.
    used: BTreeSet<u128>,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl CidrAllocator {
    /// An allocator of `/mask` subnets of `cluster`.
    pub fn new(cluster: IpNetwork, mask: u8) -> Result<CidrAllocator, IpamError> {
        let bits = if cluster.is_ipv4() { 32 } else { 128 };
        let max = bits.min(cluster.prefix() + MAX_SUBNETS as u8);
        if mask < cluster.prefix() || mask > max {
            return Err(IpamError::Mask { cluster, mask, max });
        }
        Ok(CidrAllocator {
            cluster,
            mask,
            used: BTreeSet::new(),
        })
    }

    fn bits(&self) -> u32 {
        if self.cluster.is_ipv4() { 32 } else { 128 }
    }

    /// How many subnets there are.
    pub fn capacity(&self) -> u128 {
        1u128 << (self.mask - self.cluster.prefix())
    }

    fn index(&self, cidr: IpNetwork) -> Option<u128> {
        if cidr.prefix() != self.mask
            || cidr.is_ipv4() != self.cluster.is_ipv4()
            || !self.cluster.contains(cidr.network())
        {
            return None;
        }
        let offset = to_u128(cidr.network()) - to_u128(self.cluster.network());
        let shift = self.bits() - u32::from(self.mask);
        if offset & ((1u128 << shift) - 1) != 0 {
            return None;
        }
        Some(offset >> shift)
    }

    fn subnet(&self, index: u128) -> IpNetwork {
        let shift = self.bits() - u32::from(self.mask);
        let n = to_u128(self.cluster.network()) + (index << shift);
        let ip = if self.cluster.is_ipv4() {
            IpAddr::V4(Ipv4Addr::from(n as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(n))
        };
        IpNetwork::new(ip, self.mask).expect("a prefix within the address family")
    }

    /// Record `cidr` as taken (a Node already has it). False when it is not
    /// one of this allocator's subnets or is taken already.
    pub fn occupy(&mut self, cidr: IpNetwork) -> bool {
        match self.index(cidr) {
            Some(index) => self.used.insert(index),
            None => false,
        }
    }

    /// The lowest free subnet, now taken; `None` when all are taken.
    pub fn allocate(&mut self) -> Option<IpNetwork> {
        let mut candidate = 0u128;
        for &used in &self.used {
            if used != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate >= self.capacity() {
            return None;
        }
        self.used.insert(candidate);
        Some(self.subnet(candidate))
    }

    /// Free `cidr`.
    pub fn release(&mut self, cidr: IpNetwork) {
        if let Some(index) = self.index(cidr) {
            self.used.remove(&index);
        }
    }

    /// How many subnets are taken.
    pub fn used(&self) -> usize {
        self.used.len()
    }
}

/// A Node's pod CIDR, from `spec.podCIDR` or the first of `spec.podCIDRs`.
pub fn node_cidr(node: &Node) -> Option<IpNetwork> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidr
        .as_deref()
        .or_else(|| spec.pod_cidrs.as_ref()?.first().map(String::as_str))?
        .parse()
        .ok()
}

/// What the controller knows.
struct Ipam {
    allocator: CidrAllocator,
    /// Node name → the CIDR it has or is being given.
    assigned: HashMap<String, IpNetwork>,
    /// Nodes that still need a CIDR (none free, or the write failed), with
    /// whether their exhaustion event was written.
    waiting: HashMap<String, bool>,
}

impl Ipam {
    /// State rebuilt from every Node (a fresh list).
    fn rebuild(allocator: &CidrAllocator, nodes: &[Node]) -> Ipam {
        let mut ipam = Ipam {
            allocator: allocator.clone(),
            assigned: HashMap::new(),
            waiting: HashMap::new(),
        };
        for node in nodes {
            let name = node.metadata.name.clone().unwrap_or_default();
            match node_cidr(node) {
                Some(cidr) => {
                    if !ipam.allocator.occupy(cidr) {
                        tracing::warn!(node = %name, %cidr, "node's pod CIDR is outside the cluster CIDR or shared with another node");
                    }
                    ipam.assigned.insert(name, cidr);
                }
                None => {
                    ipam.waiting.insert(name, false);
                }
            }
        }
        ipam
    }

    /// A Node was added or changed: whether it needs a CIDR now.
    fn observe(&mut self, node: &Node) -> bool {
        let name = node.metadata.name.clone().unwrap_or_default();
        match node_cidr(node) {
            Some(cidr) => {
                self.waiting.remove(&name);
                match self.assigned.get(&name) {
                    Some(had) if *had == cidr => {}
                    had => {
                        // Set by someone else (or changed): follow the Node.
                        if let Some(had) = had.copied() {
                            self.allocator.release(had);
                        }
                        self.allocator.occupy(cidr);
                        self.assigned.insert(name, cidr);
                    }
                }
                false
            }
            None if self.assigned.contains_key(&name) => false,
            None => {
                self.waiting.entry(name).or_insert(false);
                true
            }
        }
    }

    /// A Node is gone: free its CIDR.
    fn forget(&mut self, name: &str) {
        self.waiting.remove(name);
        if let Some(cidr) = self.assigned.remove(name) {
            self.allocator.release(cidr);
            tracing::info!(node = name, %cidr, "released pod CIDR");
        }
    }
}

/// The one key of node IPAM's work queue: every waiting Node is assigned
/// in one sync, in name order, so ranges go out lowest first.
const WAITING: &str = "waiting";

/// A CIDR assignment that did not go through; retried, rate-limited.
#[derive(Debug, thiserror::Error)]
#[error("cannot assign a pod CIDR to node {node}")]
struct AssignError {
    /// The Node.
    node: String,
    /// The API's error.
    #[source]
    source: kube::Error,
}

/// Run node IPAM until `shutdown`: the node watch keeps the allocator's
/// state, and one worker of the shared work queue assigns the waiting Nodes
/// in batches, at most [`BATCH_DELAY`] after the first of a batch was seen,
/// so that a burst of new Nodes is written concurrently.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let allocator = match CidrAllocator::new(
        ctx.options.cluster_cidr,
        ctx.options.node_cidr_mask_size,
    ) {
        Ok(allocator) => allocator,
        Err(error) => {
            tracing::error!(error = %skiff_common::error::chain(&error), "node IPAM is disabled");
            shutdown.cancelled().await;
            return;
        }
    };
    let ipam: Arc<Mutex<Option<Ipam>>> = Arc::new(Mutex::new(None));
    let queue = Arc::new(WorkQueue::new());
    let watch = {
        let (ipam, queue) = (ipam.clone(), queue.clone());
        watch_changes::<Node, _>(ctx.client.clone(), shutdown.clone(), move |change| {
            let mut ipam = ipam.lock().expect("ipam lock");
            let waiting = match change {
                Change::Resynced(nodes) => {
                    let fresh = Ipam::rebuild(&allocator, &nodes);
                    tracing::info!(used = fresh.allocator.used(), capacity = %fresh.allocator.capacity(), "node IPAM state rebuilt");
                    let waiting = !fresh.waiting.is_empty();
                    *ipam = Some(fresh);
                    waiting
                }
                Change::Applied(node) => ipam.as_mut().is_some_and(|ipam| ipam.observe(&node)),
                Change::Deleted(node) => ipam.as_mut().is_some_and(|ipam| {
                    ipam.forget(node.metadata.name.as_deref().unwrap_or_default());
                    !ipam.waiting.is_empty()
                }),
            };
            if waiting {
                queue.add_batched(WAITING, BATCH_DELAY);
            }
        })
    };
    let api: Api<Node> = Api::all(ctx.client.clone());
    let synced = || ipam.lock().expect("ipam lock").is_some();
    let work = queue.run_worker("node IPAM", synced, &shutdown, |_| {
        assign_waiting(&ctx, &api, &ipam)
    });
    tokio::join!(watch, work);
}

/// Give every waiting Node a CIDR, in name order; asks to run again after
/// [`RETRY`] while some still wait.
async fn assign_waiting(
    ctx: &Context,
    api: &Api<Node>,
    ipam: &Mutex<Option<Ipam>>,
) -> Result<Option<Duration>, AssignError> {
    // Ranges are taken in memory first, then written concurrently.
    let batch = {
        let mut guard = ipam.lock().expect("ipam lock");
        let Some(ipam) = guard.as_mut() else {
            return Ok(None);
        };
        let mut names: Vec<String> = ipam.waiting.keys().cloned().collect();
        names.sort();
        let mut batch = Vec::new();
        for name in names {
            match ipam.allocator.allocate() {
                Some(cidr) => batch.push((name, cidr)),
                None => break,
            }
        }
        batch
    };
    let writes = futures::stream::iter(batch)
        .map(|(name, cidr)| async move {
            let patch =
                json!({"spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]}});
            let result = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            (name, cidr, result)
        })
        .buffer_unordered(CONCURRENT_WRITES)
        .collect::<Vec<_>>()
        .await;
    let mut failed = None;
    let exhausted = {
        let mut guard = ipam.lock().expect("ipam lock");
        let Some(ipam) = guard.as_mut() else {
            return Ok(None);
        };
        for (name, cidr, result) in writes {
            match result {
                Ok(node) => {
                    tracing::info!(node = %name, %cidr, "assigned pod CIDR");
                    ipam.waiting.remove(&name);
                    // The watch may have relisted meanwhile: the range is taken.
                    ipam.allocator.occupy(cidr);
                    ipam.assigned.insert(name.clone(), cidr);
                    // Someone else may have set a different one first.
                    if let Some(actual) = node_cidr(&node)
                        && actual != cidr
                    {
                        ipam.allocator.release(cidr);
                        ipam.allocator.occupy(actual);
                        ipam.assigned.insert(name, actual);
                    }
                }
                Err(error) => {
                    ipam.allocator.release(cidr);
                    if skiff_common::error::is_status(&error, 404) {
                        ipam.waiting.remove(&name);
                    } else {
                        failed = Some(AssignError {
                            node: name,
                            source: error,
                        });
                    }
                }
            }
        }
        // Once the cluster CIDR is full, each waiting Node is reported once.
        let full = ipam.allocator.used() as u128 >= ipam.allocator.capacity();
        let mut unreported = Vec::new();
        for (name, reported) in ipam.waiting.iter_mut().filter(|_| full) {
            if !std::mem::replace(reported, true) {
                unreported.push(name.clone());
            }
        }
        (ipam.allocator.cluster, unreported)
    };
    let (cluster, exhausted) = exhausted;
    for name in exhausted {
        tracing::warn!(node = %name, %cluster, "no pod CIDR left for node");
        let meta = match api.get(&name).await {
            Ok(node) => node.metadata,
            Err(error) => {
                tracing::debug!(node = %name, error = %skiff_common::error::chain(&error), "cannot read node for its event");
                continue;
            }
        };
        ctx.events
            .record(
                &reference("v1", "Node", &meta),
                EventType::Normal,
                "CIDRNotAvailable",
                &format!("Node {name} status is now: CIDRNotAvailable"),
            )
            .await;
    }
    if let Some(error) = failed {
        return Err(error);
    }
    let waiting = ipam
        .lock()
        .expect("ipam lock")
        .as_ref()
        .is_some_and(|ipam| !ipam.waiting.is_empty());
    Ok(waiting.then_some(RETRY))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().expect("a cidr")
    }

    fn node(name: &str, cidr: Option<&str>) -> Node {
        let spec = match cidr {
            Some(c) => json!({"podCIDR": c, "podCIDRs": [c]}),
            None => json!({}),
        };
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("a node")
    }

    #[test]
    fn allocator_hands_out_lowest_free_subnets() {
        let mut a = CidrAllocator::new(net("10.244.0.0/16"), 24).expect("valid");
        assert_eq!(a.capacity(), 256);
        assert_eq!(a.allocate(), Some(net("10.244.0.0/24")));
        assert_eq!(a.allocate(), Some(net("10.244.1.0/24")));
        assert_eq!(a.allocate(), Some(net("10.244.2.0/24")));
        a.release(net("10.244.1.0/24"));
        assert_eq!(
            a.allocate(),
            Some(net("10.244.1.0/24")),
            "a released range is reused"
        );
        assert_eq!(a.allocate(), Some(net("10.244.3.0/24")));
        assert_eq!(a.used(), 4);
    }

    #[test]
    fn allocator_is_exhausted_and_recovers() {
        let mut a = CidrAllocator::new(net("10.10.0.0/23"), 24).expect("valid");
        assert_eq!(a.allocate(), Some(net("10.10.0.0/24")));
        assert_eq!(a.allocate(), Some(net("10.10.1.0/24")));
        assert_eq!(a.allocate(), None);
        a.release(net("10.10.0.0/24"));
        assert_eq!(a.allocate(), Some(net("10.10.0.0/24")));
    }

    #[test]
    fn allocator_occupies_only_its_own_subnets() {
        let mut a = CidrAllocator::new(net("10.244.0.0/16"), 24).expect("valid");
        assert!(a.occupy(net("10.244.0.0/24")));
        assert!(!a.occupy(net("10.244.0.0/24")), "taken twice");
        assert!(!a.occupy(net("10.245.0.0/24")), "outside");
        assert!(!a.occupy(net("10.244.0.0/25")), "wrong size");
        assert!(!a.occupy(net("fd00::/120")), "wrong family");
        assert_eq!(a.allocate(), Some(net("10.244.1.0/24")));
        let mut v6 = CidrAllocator::new(net("fd00:10:244::/56"), 64).expect("valid");
        assert_eq!(v6.allocate(), Some(net("fd00:10:244::/64")));
        assert_eq!(v6.allocate(), Some(net("fd00:10:244:1::/64")));
    }

    #[test]
    fn allocator_rejects_bad_masks() {
        assert!(CidrAllocator::new(net("10.244.0.0/16"), 15).is_err());
        assert!(CidrAllocator::new(net("10.244.0.0/16"), 33).is_err());
        assert!(CidrAllocator::new(net("10.0.0.0/8"), 32).is_ok());
        assert!(
            CidrAllocator::new(net("10.0.0.0/4"), 32).is_err(),
            "too many subnets to track"
        );
    }

    #[test]
    fn rebuilt_state_never_hands_out_a_range_twice() {
        let allocator = CidrAllocator::new(net("10.244.0.0/16"), 24).expect("valid");
        let nodes = [
            node("a", Some("10.244.0.0/24")),
            node("b", Some("10.244.2.0/24")),
            node("c", None),
        ];
        let mut ipam = Ipam::rebuild(&allocator, &nodes);
        assert_eq!(ipam.waiting.keys().collect::<Vec<_>>(), ["c"]);
        assert_eq!(ipam.allocator.allocate(), Some(net("10.244.1.0/24")));
        assert_eq!(ipam.allocator.allocate(), Some(net("10.244.3.0/24")));
    }

    #[test]
    fn observed_nodes_are_tracked_and_released() {
        let allocator = CidrAllocator::new(net("10.244.0.0/16"), 24).expect("valid");
        let mut ipam = Ipam::rebuild(&allocator, &[]);
        assert!(
            ipam.observe(&node("new", None)),
            "a node without a CIDR needs one"
        );
        ipam.waiting.clear();
        // A node that got its CIDR elsewhere (or from our patch) is recorded.
        assert!(!ipam.observe(&node("x", Some("10.244.5.0/24"))));
        assert_eq!(ipam.assigned["x"], net("10.244.5.0/24"));
        assert!(
            !ipam.allocator.occupy(net("10.244.5.0/24")),
            "recorded as taken"
        );
        // An event older than our own write does not ask again.
        assert!(!ipam.observe(&node("x", None)));
        ipam.forget("x");
        assert!(
            ipam.allocator.occupy(net("10.244.5.0/24")),
            "released on delete"
        );
    }

    #[test]
    fn node_cidr_reads_either_field() {
        assert_eq!(
            node_cidr(&node("a", Some("10.244.9.0/24"))),
            Some(net("10.244.9.0/24"))
        );
        let only_list: Node = serde_json::from_value(
            json!({"metadata": {"name": "a"}, "spec": {"podCIDRs": ["10.244.8.0/24"]}}),
        )
        .expect("a node");
        assert_eq!(node_cidr(&only_list), Some(net("10.244.8.0/24")));
        assert_eq!(node_cidr(&node("a", None)), None);
    }
}
