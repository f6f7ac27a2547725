//! kube-proxy's role, in eBPF: the agent watches Services and EndpointSlices and keeps its node's
//! load-balancing maps in line with them.
//!
//! - [`model`]: what the maps should hold for a Service (pure),
//! - [`table`]: the reconciler onto the maps, through the map writer [`crate::bpf::lb::LbMaps`],
//! - [`conntrack`]: the collector of idle connections, and the conntrack view,
//! - [`announce`]: the Lease per LoadBalancer Service that picks the node answering ARP for it,
//! - [`health`]: the `healthCheckNodePort` servers of `externalTrafficPolicy: Local` Services,
//! - [`hostpath`]: the uplink and the route that takes the node's own traffic to Services,
//! - [`run`]: the loop: watches, a queue of changed Services, retries, the status file that
//!   `skiffctl service list` reads, and Warning Events on Services that cannot be programmed.

pub mod announce;
pub mod conntrack;
pub mod health;
pub mod hostpath;
pub mod model;
pub mod objects;
pub mod table;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, PostParams};
use serde::{Deserialize, Serialize};
use skiff_common::informer::SharedWatch;
use skiff_common::watch::{Change, key_of};
use skiff_ebpf_common::lb::{CFG_F_ENABLED, NodeConfig};
use tokio_util::sync::CancellationToken;

use crate::bpf::lb::LbMaps;
use crate::bpf::{BpfError, Datapath, Hook};
use model::{ServicePortKey, lb_ips};
use objects::{LbService, LbSlice};
use table::LbTable;

/// The status file's name in the agent's run directory.
pub const STATUS_FILE: &str = "services.json";
/// How often the conntrack collector runs.
pub const CT_GC_INTERVAL: Duration = Duration::from_secs(30);
/// How often it runs while the table is more than a quarter full.
pub const CT_GC_BUSY_INTERVAL: Duration = Duration::from_secs(2);
/// The status file is rewritten at most this often.
pub const STATUS_PERIOD: Duration = Duration::from_secs(1);
/// The first pause before a failed Service is tried again (doubling up to a minute).
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The agent's service load-balancing flags.
#[derive(Clone, Debug, clap::Args)]
pub struct ServiceArgs {
    /// Translate traffic to Services on this node (`--service-lb=false`: leave it to
    /// something else).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub service_lb: bool,
    /// The cluster's service range: the node routes it into the datapath, so that its own
    /// processes reach ClusterIPs.
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cidr: Ipv4Network,
    /// The node's uplink, where NodePorts and LoadBalancer IPs are served (default: the
    /// interface that holds the node's InternalIP).
    #[arg(long)]
    pub uplink: Option<String>,
    /// The load-balancing maps' sizes.
    #[command(flatten)]
    pub limits: crate::bpf::MapLimits,
    /// How long a node's claim to answer ARP for a LoadBalancer IP lasts without renewal (the
    /// longest a dead node's IPs go unanswered).
    #[arg(long, value_parser = skiff_common::duration::parse_duration, default_value = "10s")]
    pub l2_lease_duration: Duration,
}

/// Errors that stop service load balancing from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The node's side (uplink, service route) could not be set up.
    #[error("cannot set up the node's service path")]
    HostPath {
        /// Why.
        #[source]
        source: hostpath::HostPathError,
    },
    /// The datapath refused.
    #[error("cannot program the service datapath")]
    Bpf {
        /// Why.
        #[source]
        source: BpfError,
    },
}

/// One service port's programming status on this node, as `skiffctl service list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStatus {
    /// `namespace/name:port`.
    pub service: String,
    /// The node.
    pub node: String,
    /// The revision in force, when programmed.
    pub revision: Option<u32>,
    /// The last error, when the last pass failed.
    pub error: Option<String>,
    /// Its frontends (`address:port/protocol`).
    pub frontends: Vec<String>,
}

/// What the loop knows of the cluster.
#[derive(Default)]
struct Cache {
    services: HashMap<String, Arc<LbService>>,
    /// Slices by their Service's key, with their own keys (a Service has one or a few: a list
    /// is a tenth of the memory of a map).
    slices: HashMap<String, Vec<(String, Arc<LbSlice>)>>,
    /// Each slice's Service (a relabelled slice moves).
    slice_owner: HashMap<String, String>,
}

impl Cache {
    fn apply_service(&mut self, change: Change<Arc<LbService>>, dirty: &mut BTreeSet<String>) {
        match change {
            Change::Applied(s) => {
                let key = key_of(&s.metadata);
                dirty.insert(key.clone());
                self.services.insert(key, s);
            }
            Change::Deleted(s) => {
                let key = key_of(&s.metadata);
                dirty.insert(key.clone());
                self.services.remove(&key);
            }
            Change::Resynced(list) => {
                dirty.extend(self.services.keys().cloned());
                self.services = list.into_iter().map(|s| (key_of(&s.metadata), s)).collect();
                dirty.extend(self.services.keys().cloned());
            }
        }
    }

    fn put_slice(&mut self, slice: Arc<LbSlice>, dirty: &mut BTreeSet<String>) {
        let key = key_of(&slice.metadata);
        self.drop_slice(&key, dirty);
        if let Some(owner) = model::slice_service(&slice) {
            dirty.insert(owner.clone());
            self.slice_owner.insert(key.clone(), owner.clone());
            self.slices.entry(owner).or_default().push((key, slice));
        }
    }

    fn drop_slice(&mut self, key: &str, dirty: &mut BTreeSet<String>) {
        if let Some(old) = self.slice_owner.remove(key) {
            if let Some(list) = self.slices.get_mut(&old) {
                list.retain(|(k, _)| k != key);
                if list.is_empty() {
                    self.slices.remove(&old);
                }
            }
            dirty.insert(old);
        }
    }

    fn apply_slice(&mut self, change: Change<Arc<LbSlice>>, dirty: &mut BTreeSet<String>) {
        match change {
            Change::Applied(slice) => self.put_slice(slice, dirty),
            Change::Deleted(slice) => self.drop_slice(&key_of(&slice.metadata), dirty),
            Change::Resynced(list) => {
                dirty.extend(self.slices.keys().cloned());
                self.slices.clear();
                self.slice_owner.clear();
                for slice in list {
                    self.put_slice(slice, dirty);
                }
            }
        }
    }

    /// The LoadBalancer Services this node can announce: with ingress IPs, and with a local
    /// endpoint under `externalTrafficPolicy: Local`.
    fn announceable(&self, node: &str) -> BTreeSet<String> {
        self.services
            .iter()
            .filter(|(key, service)| {
                let Some(spec) = &service.spec else {
                    return false;
                };
                if spec.type_.as_deref() != Some("LoadBalancer") || lb_ips(service).is_empty() {
                    return false;
                }
                spec.external_traffic_policy.as_deref() != Some("Local")
                    || self.desired(key, node).iter().any(|p| p.local_count() > 0)
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// The health check ports this node serves: `healthCheckNodePort` of each LoadBalancer
    /// Service with `externalTrafficPolicy: Local`, with its local endpoints.
    fn health_ports(&self, node: &str) -> HashMap<u16, health::Health> {
        let mut ports = HashMap::new();
        for (key, service) in &self.services {
            let Some(spec) = &service.spec else {
                continue;
            };
            let Some(port) = spec
                .health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            if spec.type_.as_deref() != Some("LoadBalancer")
                || spec.external_traffic_policy.as_deref() != Some("Local")
            {
                continue;
            }
            let local: BTreeSet<Ipv4Addr> = self
                .desired(key, node)
                .iter()
                .flat_map(|p| p.backends.iter().filter(|b| !b.remote).map(|b| b.addr))
                .collect();
            let (namespace, name) = skiff_common::watch::split_key(key);
            ports.insert(
                port,
                health::Health {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    local_endpoints: local.len(),
                },
            );
        }
        ports
    }

    /// The desired service ports of the Service `key` (none when it is gone).
    fn desired(&self, key: &str, node: &str) -> Vec<model::ServicePort> {
        let Some(service) = self.services.get(key) else {
            return Vec::new();
        };
        let slices = self.slices.get(key);
        model::desired(
            service,
            slices
                .into_iter()
                .flat_map(|list| list.iter().map(|(_, s)| s.as_ref())),
            node,
        )
    }
}

/// Writes `SKF_L2ANN_V1` so that it holds exactly the IPs of the Services this node holds the
/// Lease of; returns them.
fn sync_announced(
    maps: &mut impl LbMaps,
    cache: &Cache,
    held: &BTreeSet<String>,
    ifindex: u32,
) -> Result<BTreeSet<[u8; 4]>, BpfError> {
    let wanted: BTreeSet<[u8; 4]> = held
        .iter()
        .filter_map(|key| cache.services.get(key))
        .flat_map(|s| lb_ips(s))
        .map(|ip| ip.octets())
        .collect();
    for (addr, _) in maps.announced()? {
        if !wanted.contains(&addr) {
            maps.remove_announced(addr)?;
            tracing::info!(ip = %Ipv4Addr::from(addr), "stopped announcing");
        }
    }
    let value = skiff_ebpf_common::lb::L2AnnounceValue { ifindex, _pad: 0 };
    for addr in &wanted {
        maps.put_announced(*addr, &value)?;
    }
    Ok(wanted)
}

/// Gratuitous ARPs sent for an IP this node starts announcing.
const GARP_TIMES: usize = 5;

/// Sets up the node's side and runs the loop until `shutdown`, on the agent's shared watch of
/// `services`.
#[allow(
    clippy::too_many_arguments,
    reason = "the loop's inputs, each from a different owner"
)]
pub async fn run(
    services: Arc<SharedWatch<LbService>>,
    client: kube::Client,
    node: String,
    node_ip: Ipv4Addr,
    datapath: Arc<Datapath>,
    args: ServiceArgs,
    status_path: PathBuf,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    let uplink = hostpath::find_uplink(node_ip, args.uplink.as_deref())
        .await
        .map_err(|source| ServiceError::HostPath { source })?;
    let far_end = hostpath::ensure(args.service_cidr, node_ip)
        .await
        .map_err(|source| ServiceError::HostPath { source })?;
    let bpf = |source| ServiceError::Bpf { source };
    datapath
        .attach_node(&uplink.name, Hook::Uplink)
        .map_err(bpf)?;
    datapath
        .attach_node(&far_end, Hook::HostService)
        .map_err(bpf)?;
    let maps = datapath.lb_maps().map_err(bpf)?;
    let mut table = LbTable::restore(maps, Instant::now()).map_err(bpf)?;
    table
        .maps_mut()
        .set_config(&NodeConfig {
            node_ip: node_ip.octets(),
            uplink_ifindex: uplink.index,
            uplink_mac: uplink.mac,
            _pad: [0; 2],
            flags: CFG_F_ENABLED,
            _pad2: 0,
        })
        .map_err(bpf)?;
    tracing::info!(uplink = %uplink.name, service_cidr = %args.service_cidr, "service load balancing on");

    let slices: Arc<SharedWatch<LbSlice>> = SharedWatch::new(client.clone(), shutdown.clone());
    let mut service_changes = services.subscribe();
    let mut slice_changes = slices.subscribe();
    let mut cache = Cache::default();
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    let mut retries: HashMap<String, (Instant, Duration)> = HashMap::new();
    let mut status: BTreeMap<ServicePortKey, Arc<PortStatus>> = BTreeMap::new();
    // A Service's ports (a list: a set's node holds room for eleven).
    let mut ports_of: HashMap<String, Vec<ServicePortKey>> = HashMap::new();
    let mut reported: HashMap<String, String> = HashMap::new();
    let mut synced = (false, false);
    let mut retained = false;
    let timing = skiff_common::leader::ElectionTiming {
        lease_duration: args.l2_lease_duration,
        renew_deadline: args.l2_lease_duration * 4 / 5,
        retry_period: args.l2_lease_duration / 5,
    };
    let (mut announcer, mut held_changes) =
        announce::Announcer::new(client.clone(), &node, timing, shutdown.clone());
    let mut health_server = health::HealthServer::new(shutdown.clone());
    let mut held: BTreeSet<String> = BTreeSet::new();
    let mut held_dirty = false;
    let mut announced: BTreeSet<[u8; 4]> = BTreeSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let started = Instant::now();
    let (mut status_dirty, mut next_status) = (false, Instant::now());
    let mut writing: Option<tokio::task::JoinHandle<()>> = None;
    tokio::spawn(collect_conntrack(
        datapath.lb_maps().map_err(bpf)?,
        args.limits.ct,
        shutdown.clone(),
    ));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            change = service_changes.recv() => match change {
                Some(change) => {
                    synced.0 |= matches!(change, Change::Resynced(_));
                    cache.apply_service(change, &mut dirty);
                }
                None => return Ok(()),
            },
            change = slice_changes.recv() => match change {
                Some(change) => {
                    synced.1 |= matches!(change, Change::Resynced(_));
                    cache.apply_slice(change, &mut dirty);
                }
                None => return Ok(()),
            },
            change = held_changes.recv() => {
                if let Some((key, holds)) = change {
                    tracing::info!(service = %key, holds, "LoadBalancer IP announcement");
                    if holds { held.insert(key); } else { held.remove(&key); }
                    held_dirty = true;
                }
            }
            _ = tick.tick() => {}
        }
        // Take every change already queued before programming.
        while let Ok(change) = service_changes.try_recv() {
            synced.0 |= matches!(change, Change::Resynced(_));
            cache.apply_service(change, &mut dirty);
        }
        while let Ok(change) = slice_changes.try_recv() {
            synced.1 |= matches!(change, Change::Resynced(_));
            cache.apply_slice(change, &mut dirty);
        }
        if !(synced.0 && synced.1) {
            continue;
        }
        let now = Instant::now();
        for (key, (at, _)) in &retries {
            if *at <= now {
                dirty.insert(key.clone());
            }
        }
        let changed = !dirty.is_empty();
        for key in std::mem::take(&mut dirty) {
            let desired = cache.desired(&key, &node);
            let wanted: BTreeSet<ServicePortKey> = desired.iter().map(|p| p.key.clone()).collect();
            let mut failure = None;
            for port in &desired {
                let result = table.reconcile(&port.key, Some(port), now);
                // A copy only while the status file's writer still holds this row.
                let entry = Arc::make_mut(status.entry(port.key.clone()).or_insert_with(|| {
                    Arc::new(PortStatus {
                        service: port.key.to_string(),
                        node: node.clone(),
                        revision: None,
                        error: None,
                        frontends: Vec::new(),
                    })
                }));
                entry.frontends = port
                    .frontends
                    .iter()
                    .map(|f| table::frontend_text(&f.key))
                    .collect();
                match result {
                    Ok(rev) => {
                        entry.revision = rev;
                        entry.error = None;
                    }
                    Err(error) => {
                        let message = skiff_common::error::chain(&error).to_string();
                        entry.revision = table.revision(&port.key);
                        entry.error = Some(message.clone());
                        failure = Some(message);
                    }
                }
            }
            for gone in ports_of
                .get(&key)
                .into_iter()
                .flatten()
                .filter(|k| !wanted.contains(k))
            {
                if let Err(error) = table.reconcile(gone, None, now) {
                    failure = Some(skiff_common::error::chain(&error).to_string());
                } else {
                    status.remove(gone);
                }
            }
            if wanted.is_empty() {
                ports_of.remove(&key);
            } else {
                ports_of.insert(key.clone(), wanted.into_iter().collect());
            }
            match failure {
                Some(message) => {
                    let delay = retries
                        .get(&key)
                        .map_or(RETRY_FIRST, |(_, d)| (*d * 2).min(RETRY_MAX));
                    retries.insert(key.clone(), (now + delay, delay));
                    tracing::warn!(service = %key, error = %message, "cannot program a Service; retrying");
                    if reported.get(&key) != Some(&message) {
                        reported.insert(key.clone(), message.clone());
                        if let Some(service) = cache.services.get(&key) {
                            warn_event(&client, service, &node, &message);
                        }
                    }
                }
                None => {
                    retries.remove(&key);
                    reported.remove(&key);
                }
            }
        }
        if changed {
            health_server.update(cache.health_ports(&node));
        }
        if changed || held_dirty {
            announcer.update(&cache.announceable(&node));
            match sync_announced(table.maps_mut(), &cache, &held, uplink.index) {
                Ok(now_announced) => {
                    held_dirty = false;
                    for ip in now_announced.difference(&announced) {
                        let ip = Ipv4Addr::from(*ip);
                        tracing::info!(%ip, uplink = %uplink.name, "announcing");
                        tokio::spawn(hostpath::gratuitous_arp(ip, GARP_TIMES));
                    }
                    announced = now_announced;
                }
                Err(error) => {
                    tracing::warn!(error = %skiff_common::error::chain(&error), "cannot write the announced IPs; retrying")
                }
            }
        }
        if !retained {
            // The first complete lists: what the maps hold beyond them is gone.
            let keep: BTreeSet<ServicePortKey> = ports_of.values().flatten().cloned().collect();
            match table.retain(&keep, now) {
                Ok(()) => {
                    retained = true;
                    tracing::info!(
                        service_ports = keep.len(),
                        after_ms = started.elapsed().as_millis() as u64,
                        "services synced"
                    );
                }
                Err(error) => {
                    tracing::warn!(error = %skiff_common::error::chain(&error), "cannot remove stale services; retrying")
                }
            }
        }
        if let Err(error) = table.collect(now) {
            tracing::warn!(error = %skiff_common::error::chain(&error), "cannot delete retired slots; retrying");
        }
        status_dirty |= changed;
        // The file is written on a blocking thread, one write at a time: at 10,000 service
        // ports it is megabytes of JSON, which the loop does not wait for.
        if status_dirty && now >= next_status && writing.as_ref().is_none_or(|w| w.is_finished()) {
            let rows: Vec<Arc<PortStatus>> = status.values().cloned().collect();
            let path = status_path.clone();
            writing = Some(tokio::task::spawn_blocking(move || {
                write_status(&path, &rows)
            }));
            status_dirty = false;
            next_status = now + STATUS_PERIOD;
        }
    }
}

/// Expires conntrack entries until `shutdown`: every [`CT_GC_INTERVAL`], every
/// [`CT_GC_BUSY_INTERVAL`] while the table (of `ct_max` entries) is more than a quarter full. Its
/// own task, over its own handles of the maps, on a blocking thread: a walk of a full table must
/// not hold up the programming of Services.
async fn collect_conntrack(
    mut maps: crate::bpf::lb::AyaLbMaps,
    ct_max: u32,
    shutdown: CancellationToken,
) {
    let mut pause = CT_GC_INTERVAL;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        // The maps go to the blocking thread and come back with the result.
        let pass = tokio::task::spawn_blocking(move || {
            let collected = conntrack::collect(&mut maps, conntrack::monotonic_ns());
            (maps, collected)
        })
        .await;
        let collected = match pass {
            Ok((returned, collected)) => {
                maps = returned;
                collected
            }
            Err(error) => {
                tracing::error!(%error, "conntrack collection panicked; no more collection");
                return;
            }
        };
        pause = CT_GC_INTERVAL;
        match collected {
            Ok(collected) => {
                if collected.removed > 0 {
                    tracing::debug!(
                        removed = collected.removed,
                        left = collected.remaining,
                        "conntrack entries expired"
                    );
                }
                if collected.remaining > ct_max as usize / 4 {
                    pause = CT_GC_BUSY_INTERVAL;
                }
            }
            Err(error) => {
                tracing::warn!(error = %skiff_common::error::chain(&error), "conntrack collection failed")
            }
        }
    }
}

fn write_status(path: &PathBuf, rows: &[Arc<PortStatus>]) {
    let tmp = path.with_extension("json.tmp");
    let rows: Vec<&PortStatus> = rows.iter().map(Arc::as_ref).collect();
    let written = serde_json::to_vec(&rows)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(error) = written {
        tracing::warn!(path = %path.display(), %error, "cannot write the service status");
    }
}

/// Records a Warning Event on `service` (in the background; best effort).
fn warn_event(client: &kube::Client, service: &LbService, node: &str, message: &str) {
    let namespace = service
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = service.metadata.name.clone().unwrap_or_default();
    let now = jiff::Timestamp::now();
    let event: Result<Event, _> = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{name}.{:x}", now.as_nanosecond()), "namespace": namespace},
        "involvedObject": {"apiVersion": "v1", "kind": "Service", "namespace": namespace,
                           "name": name, "uid": service.metadata.uid},
        "reason": "FailedToProgramService",
        "message": format!("node {node}: {message}"),
        "type": "Warning",
        "source": {"component": "skiff-agent", "host": node},
        "firstTimestamp": Time(now),
        "lastTimestamp": Time(now),
        "eventTime": MicroTime(now),
        "count": 1,
        "reportingComponent": "skiff-agent",
        "reportingInstance": node,
        "action": "Program",
    }));
    let Ok(event) = event else {
        return;
    };
    let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
    tokio::spawn(async move {
        if let Err(error) = api.create(&PostParams::default(), &event).await {
            tracing::debug!(error = %skiff_common::error::chain(&error), "cannot record event");
        }
    });
}

/// Reads every node's status file under `run_root` (`<run_root>/<node>/services.json`).
pub fn read_status(run_root: &std::path::Path) -> Vec<PortStatus> {
    let mut all = Vec::new();
    let Ok(dirs) = std::fs::read_dir(run_root) else {
        return all;
    };
    for dir in dirs.flatten() {
        let path = dir.path().join(STATUS_FILE);
        if let Some(rows) = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Vec<PortStatus>>(&bytes).ok())
        {
            all.extend(rows);
        }
    }
    all.sort_by(|a, b| (&a.service, &a.node).cmp(&(&b.service, &b.node)));
    all
}
