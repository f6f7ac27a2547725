//! The kubelet role of `skiff-agent`: one real node running its pods on
//! containerd.
//!
//! - [`node`]: registration, Lease heartbeats, node status (Ready only
//!   while containerd and the CNI network answer), the skiff-cni conflist.
//! - [`pod`]: one worker task per pod bound to the node: sandbox (a network
//!   namespace of its own wired by the CNI plugin), containers, restarts with
//!   back-off, probes, status, events, graceful deletion.
//! - [`runtime`]: containerd; [`spec`]: OCI specs; [`cni`]: CNI exec;
//!   [`netns`]: namespace files; [`probe`]: probes; [`status`]: pod status.
//! - [`server`]: the kubelet API over HTTPS (`/containerLogs` from [`logs`],
//!   `/exec` over WebSocket from [`exec`], `/metrics`, `/healthz`) that the
//!   API server proxies `kubectl logs` and `kubectl exec` to.
//! - [`datapath`]: the eBPF datapath as the [`PodNetworkHook`].
//!
//! State on the host, per node: `<root-dir>/pods/<uid>/` (emptyDir volumes,
//! container logs, `/etc/hosts`, the CNI result) and `<run-dir>/netns/<uid>`
//! (the pod's network namespace); in containerd, containers labelled with
//! the node and pod. After a restart the agent adopts what belongs to pods
//! still bound to it and removes the rest.

pub mod cni;
pub mod datapath;
pub mod dns;
pub mod exec;
pub mod logs;
pub mod netns;
pub mod node;
pub mod pod;
pub mod portforward;
pub mod probe;
pub mod projected;
pub mod query;
pub mod runtime;
pub mod server;
pub mod spdy;
pub mod spec;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{ArgAction, Args};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use skiff_common::informer::SharedWatch;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bpf::{BpfError, PodIdentity};
use crate::cli::NodeArgs;
use crate::services::objects::LbService;

/// Flags of the real node mode.
#[derive(Debug, Clone, Args)]
pub struct KubeletArgs {
    /// This node's name (required without --hollow).
    #[arg(long)]
    pub node_name: Option<String>,
    /// The node's InternalIP (default: the first global IPv4 address of the
    /// network namespace the agent runs in).
    #[arg(long)]
    pub node_ip: Option<Ipv4Addr>,
    /// containerd's gRPC socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub containerd_address: PathBuf,
    /// The containerd namespace the agent's containers live in.
    #[arg(long, default_value = "skiff")]
    pub containerd_namespace: String,
    /// Where the CNI plugin binaries are (`CNI_PATH`).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Where the network configuration list is (the first `*.conflist`;
    /// the agent writes `10-skiff.conflist` for skiff-cni when none is there).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Per-node state: pod volumes, logs, CNI results (default
    /// `/var/lib/skiff/<node-name>`).
    #[arg(long)]
    pub root_dir: Option<PathBuf>,
    /// Per-node runtime state: pod network namespaces (default
    /// `/run/skiff/<node-name>`).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Attach the eBPF datapath to each pod's host-side veth (`--bpf=false`
    /// to run without it).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub bpf: bool,
    /// The port of the agent's HTTPS API (logs, exec, metrics), published in
    /// the Node's `status.daemonEndpoints.kubeletEndpoint.Port`; 0 serves none.
    #[arg(long, default_value_t = server::DEFAULT_KUBELET_PORT)]
    pub kubelet_port: u16,
    /// The address the agent's HTTPS API listens on.
    #[arg(long, default_value = "0.0.0.0")]
    pub kubelet_address: IpAddr,
    /// The CA (PEM) client certificates of the agent's HTTPS API must be
    /// signed by (default: the cluster CA of the kubeconfig).
    #[arg(long)]
    pub client_ca_file: Option<PathBuf>,
    /// Service load balancing.
    #[command(flatten)]
    pub services: crate::services::ServiceArgs,
    /// The pods' DNS.
    #[command(flatten)]
    pub dns: dns::DnsArgs,
}

/// What the agent calls when a pod's network comes and goes: the eBPF
/// datapath's attach/detach on the host-side veth.
pub trait PodNetworkHook: Send + Sync {
    /// After CNI ADD.
    fn attach(&self, host_ifname: &str, pod: &PodIdentity) -> Result<(), BpfError>;
    /// Before CNI DEL.
    fn detach(&self, host_ifname: &str) -> Result<(), BpfError>;
    /// Once the pods that run here are known (after the first list and the
    /// clean-up): forget the pods whose host-side veth is gone; returns their
    /// veth names.
    fn prune(&self) -> Result<Vec<String>, BpfError> {
        Ok(Vec::new())
    }
    /// The datapath's metrics in the Prometheus text format, for `/metrics`.
    fn metrics(&self) -> Result<String, BpfError> {
        Ok(String::new())
    }
    /// Brings every attached pod's datapath back to what was asked (a failed attach is tried
    /// again, a link that went missing is attached again); returns the pods still failing, by
    /// host-side veth.
    fn reconcile(&self) -> Vec<(String, BpfError)> {
        Vec::new()
    }
}

/// How often the pods' datapath attachments are reconciled.
pub const DATAPATH_RECONCILE_PERIOD: Duration = Duration::from_secs(2);

/// Errors that stop the node before it starts.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// `--node-name` missing or invalid.
    #[error("invalid --node-name: {message}")]
    NodeName {
        /// What is wrong.
        message: String,
    },
    /// No `--node-ip` and no global IPv4 address to take.
    #[error("no --node-ip given and no global IPv4 address in this network namespace")]
    NoNodeIp,
    /// A state directory could not be made.
    #[error("cannot create {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One pod's worker, seen from the watch loop.
struct PodHandle {
    /// The latest pod object; `None` once it is gone from the API.
    tx: watch::Sender<Option<Pod>>,
}

/// The running node.
pub struct Kubelet {
    client: kube::Client,
    node_name: String,
    host_ip: Ipv4Addr,
    node_args: NodeArgs,
    runtime: runtime::Runtime,
    cni: cni::Cni,
    root_dir: PathBuf,
    run_dir: PathBuf,
    hook: Option<Arc<dyn PodNetworkHook>>,
    /// The port of the HTTPS API (0: none), for the node status.
    kubelet_port: u16,
    pods: Mutex<HashMap<String, PodHandle>>,
    pod_cidr: Mutex<Option<String>>,
    ready: AtomicBool,
    /// The pods' DNS settings.
    dns: dns::NodeDns,
    /// Every Service (the service environment variables; shared with the load balancer).
    services: Arc<SharedWatch<LbService>>,
    shutdown: CancellationToken,
}

/// Run the node until `shutdown`; pods keep running when the agent stops
/// (a restarted agent adopts them). `client_ca` (DER certificates) signs the
/// client certificates the HTTPS API accepts (see [`server::client_ca`]).
pub async fn run(
    client: kube::Client,
    args: KubeletArgs,
    node_args: NodeArgs,
    hook: Option<Arc<dyn PodNetworkHook>>,
    datapath: Option<Arc<crate::bpf::Datapath>>,
    client_ca: Vec<Vec<u8>>,
    shutdown: CancellationToken,
) -> Result<(), anyhow::Error> {
    let node_name = args
        .node_name
        .clone()
        .ok_or_else(|| KubeletError::NodeName {
            message: "required without --hollow".into(),
        })?;
    skiff_common::node::validate_name(&node_name).map_err(|e| KubeletError::NodeName {
        message: e.to_string(),
    })?;
    let host_ip = args
        .node_ip
        .or_else(node::first_global_ipv4)
        .ok_or(KubeletError::NoNodeIp)?;
    let root_dir = args
        .root_dir
        .clone()
        .unwrap_or_else(|| Path::new("/var/lib/skiff").join(&node_name));
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| Path::new("/run/skiff").join(&node_name));
    for dir in [root_dir.join("pods"), run_dir.join("netns")] {
        std::fs::create_dir_all(&dir).map_err(|source| KubeletError::Dir {
            path: dir.clone(),
            source,
        })?;
    }
    // The HTTPS API: its certificate and port first, so that a port in use
    // stops the agent before it touches anything.
    let listener = if args.kubelet_port == 0 {
        None
    } else {
        let tls = server::tls_config(&root_dir, &node_name, IpAddr::V4(host_ip), &client_ca)?;
        let addr = std::net::SocketAddr::new(args.kubelet_address, args.kubelet_port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| server::ServerError::Bind { addr, source })?;
        Some((listener, tls))
    };
    let runtime = loop {
        match runtime::Runtime::connect(&args.containerd_address, &args.containerd_namespace).await
        {
            Ok(r) => break r,
            Err(error) => {
                tracing::warn!(error = %skiff_common::error::chain(&error), "containerd not reachable yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let dns = node_dns(&args);
    let services: Arc<SharedWatch<LbService>> = SharedWatch::new(client.clone(), shutdown.clone());
    let kubelet = Arc::new(Kubelet {
        client,
        node_name,
        host_ip,
        node_args,
        runtime,
        cni: cni::Cni {
            bin_dir: args.cni_bin_dir.clone(),
            conf_dir: args.cni_conf_dir.clone(),
            versions_checked: Default::default(),
        },
        root_dir,
        run_dir,
        hook,
        kubelet_port: args.kubelet_port,
        pods: Mutex::new(HashMap::new()),
        pod_cidr: Mutex::new(None),
        ready: AtomicBool::new(false),
        dns,
        services: services.clone(),
        shutdown: shutdown.clone(),
    });
    tracing::info!(node = %kubelet.node_name, ip = %kubelet.host_ip, containerd = %args.containerd_address.display(), namespace = %args.containerd_namespace, "starting the node");
    let mut tasks = tokio::task::JoinSet::new();
    // The Services stay watched for the pods' environment, load balancing or not.
    {
        let services = services.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move { services.hold(shutdown).await });
    }
    if let (Some(datapath), true) = (datapath, args.services.service_lb) {
        tasks.spawn(run_services(
            services.clone(),
            kubelet.client.clone(),
            kubelet.node_name.clone(),
            kubelet.host_ip,
            datapath,
            args.services.clone(),
            kubelet.run_dir.join(crate::services::STATUS_FILE),
            shutdown.clone(),
        ));
    }
    if let Some(hook) = kubelet.hook.clone() {
        tasks.spawn(reconcile_datapath(hook, shutdown.clone()));
    }
    tasks.spawn(kubelet.clone().node_loop());
    tasks.spawn(kubelet.clone().watch_pods());
    if let Some((listener, tls)) = listener {
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving the kubelet API");
        tasks.spawn(server::serve(
            kubelet.clone(),
            listener,
            tls,
            shutdown.clone(),
        ));
    }
    shutdown.cancelled().await;
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// The pods' DNS settings from the flags: the cluster DNS servers (default: the tenth address
/// of the service range), the domain, and the node's resolv.conf (empty, with a warning, when
/// it cannot be read).
fn node_dns(args: &KubeletArgs) -> dns::NodeDns {
    let cluster_dns = if args.dns.cluster_dns.is_empty() {
        skiff_common::service::cluster_dns_ip(args.services.service_cidr)
            .into_iter()
            .collect()
    } else {
        args.dns.cluster_dns.clone()
    };
    let host = match std::fs::read_to_string(&args.dns.resolv_conf) {
        Ok(text) => dns::ResolvConf::parse(&text),
        Err(error) => {
            tracing::warn!(path = %args.dns.resolv_conf.display(), error = %skiff_common::error::chain(&error), "cannot read the node's resolver configuration; dnsPolicy Default pods get an empty one");
            dns::ResolvConf::default()
        }
    };
    dns::NodeDns {
        cluster_dns,
        domain: args.dns.cluster_domain.trim_end_matches('.').to_owned(),
        host,
    }
}

/// Reconciles the pods' datapath attachments every [`DATAPATH_RECONCILE_PERIOD`] until
/// `shutdown`, logging each failure when it changes and each recovery.
async fn reconcile_datapath(hook: Arc<dyn PodNetworkHook>, shutdown: CancellationToken) {
    let mut failing: HashMap<String, String> = HashMap::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(DATAPATH_RECONCILE_PERIOD) => {}
        }
        let hook = hook.clone();
        let Ok(errors) = tokio::task::spawn_blocking(move || hook.reconcile()).await else {
            continue;
        };
        let now: HashMap<String, String> = errors
            .into_iter()
            .map(|(ifname, e)| (ifname, skiff_common::error::chain(&e).to_string()))
            .collect();
        for (ifname, error) in &now {
            if failing.get(ifname) != Some(error) {
                tracing::warn!(%ifname, %error, "cannot attach the datapath to a pod; retrying");
            }
        }
        for ifname in failing.keys().filter(|i| !now.contains_key(*i)) {
            tracing::info!(%ifname, "the pod's datapath is attached");
        }
        failing = now;
    }
}

/// Service load balancing until `shutdown`; a failure to start is logged and tried again every
/// five seconds (the node keeps running its pods meanwhile).
#[allow(
    clippy::too_many_arguments,
    reason = "the loop's inputs, handed through to services::run"
)]
async fn run_services(
    services: Arc<SharedWatch<LbService>>,
    client: kube::Client,
    node: String,
    node_ip: Ipv4Addr,
    datapath: Arc<crate::bpf::Datapath>,
    args: crate::services::ServiceArgs,
    status: PathBuf,
    shutdown: CancellationToken,
) {
    loop {
        let result = crate::services::run(
            services.clone(),
            client.clone(),
            node.clone(),
            node_ip,
            datapath.clone(),
            args.clone(),
            status.clone(),
            shutdown.clone(),
        )
        .await;
        match result {
            Ok(()) => return,
            Err(error) => {
                tracing::error!(error = %skiff_common::error::chain(&error), "service load balancing cannot start; retrying in 5 s")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

impl Kubelet {
    /// Sleep, or return false on shutdown.
    async fn pause(&self, duration: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(duration) => true,
        }
    }

    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root_dir.join("pods").join(uid)
    }

    /// Follow the pods bound to this node; one worker each.
    async fn watch_pods(self: Arc<Self>) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let config =
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node_name));
        let mut stream = watcher(api, config).default_backoff().boxed();
        let mut listed: HashSet<String> = HashSet::new();
        let mut cleaned = false;
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
                Some(Ok(watcher::Event::Init)) => listed.clear(),
                Some(Ok(watcher::Event::InitApply(pod))) => {
                    listed.insert(pod.metadata.uid.clone().unwrap_or_default());
                    self.on_pod(pod);
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    // Pods that went away while the watch was down.
                    let gone: Vec<String> = {
                        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
                        pods.keys()
                            .filter(|u| !listed.contains(*u))
                            .cloned()
                            .collect()
                    };
                    for uid in gone {
                        self.on_gone(&uid);
                    }
                    if !cleaned {
                        cleaned = true;
                        tokio::spawn(self.clone().clean_orphans(listed.clone()));
                    }
                }
                Some(Ok(watcher::Event::Apply(pod))) => self.on_pod(pod),
                Some(Ok(watcher::Event::Delete(pod))) => {
                    self.on_gone(pod.metadata.uid.as_deref().unwrap_or_default());
                }
            }
        }
    }

    fn on_pod(self: &Arc<Self>, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = pods.get(&uid) {
            let _ = handle.tx.send(Some(pod));
            return;
        }
        let (tx, rx) = watch::channel(Some(pod));
        pods.insert(uid.clone(), PodHandle { tx });
        drop(pods);
        let kubelet = self.clone();
        tokio::spawn(async move {
            pod::Worker::new(kubelet.clone(), uid.clone(), rx)
                .run()
                .await;
            kubelet
                .pods
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&uid);
        });
    }

    fn on_gone(&self, uid: &str) {
        if let Some(handle) = self.pods.lock().unwrap_or_else(|e| e.into_inner()).get(uid) {
            let _ = handle.tx.send(None);
        }
    }

    /// After the first list: remove containers and network namespaces of
    /// pods that are no longer bound to this node.
    async fn clean_orphans(self: Arc<Self>, listed: HashSet<String>) {
        match self
            .runtime
            .list(runtime::LABEL_NODE, &self.node_name)
            .await
        {
            Ok(containers) => {
                for c in containers {
                    let uid = c
                        .labels
                        .get(runtime::LABEL_POD_UID)
                        .cloned()
                        .unwrap_or_default();
                    if listed.contains(&uid) {
                        continue;
                    }
                    tracing::info!(container = %c.id, pod_uid = %uid, "removing the container of a pod no longer bound here");
                    if let Err(error) = self.runtime.remove(&c.id).await {
                        tracing::warn!(container = %c.id, error = %skiff_common::error::chain(&error), "cannot remove orphaned container");
                    }
                }
            }
            Err(error) => {
                tracing::warn!(error = %skiff_common::error::chain(&error), "cannot list containers to clean up")
            }
        }
        for uid in netns::list(&self.run_dir) {
            if listed.contains(&uid) {
                continue;
            }
            tracing::info!(pod_uid = %uid, "removing the network of a pod no longer bound here");
            pod::teardown_network(&self, &uid, None).await;
            pod::remove_pod_files(&self, &uid);
        }
        if let Some(hook) = &self.hook {
            match hook.prune() {
                Ok(gone) if !gone.is_empty() => {
                    tracing::info!(?gone, "forgot the datapath entries of veths that are gone");
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %skiff_common::error::chain(&error), "cannot prune the datapath")
                }
            }
        }
    }

    /// The pod `namespace`/`name` among those bound here: its uid and object.
    fn find_pod(&self, namespace: &str, name: &str) -> Option<(String, Pod)> {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        pods.iter().find_map(|(uid, handle)| {
            let pod = handle.tx.borrow().clone()?;
            (pod.metadata.namespace.as_deref().unwrap_or("default") == namespace
                && pod.metadata.name.as_deref() == Some(name))
            .then(|| (uid.clone(), pod))
        })
    }

    /// How many pods have a worker here.
    fn pod_count(&self) -> usize {
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Record a core/v1 Event about `pod` (best effort, in the background).
    fn event(
        &self,
        pod: &Pod,
        container: Option<&str>,
        type_: &str,
        reason: &str,
        message: String,
    ) {
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let now = Timestamp::now();
        let mut involved = json!({
            "apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": name,
            "uid": pod.metadata.uid, "resourceVersion": pod.metadata.resource_version,
        });
        if let Some(c) = container {
            involved["fieldPath"] = json!(format!("spec.containers{{{c}}}"));
        }
        let event: Result<Event, _> = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {
                "name": format!("{name}.{:x}", now.as_nanosecond()),
                "namespace": namespace,
            },
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": "kubelet", "host": self.node_name},
            "firstTimestamp": Time(now),
            "lastTimestamp": Time(now),
            "eventTime": MicroTime(now),
            "count": 1,
            "reportingComponent": "kubelet",
            "reportingInstance": self.node_name,
            "action": reason,
        }));
        let Ok(event) = event else {
            return;
        };
        tracing::info!(pod = %format!("{namespace}/{name}"), %reason, %message, "event");
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        tokio::spawn(async move {
            if let Err(error) = api.create(&PostParams::default(), &event).await {
                tracing::debug!(error = %skiff_common::error::chain(&error), "cannot record event");
            }
        });
    }
}
