//! The node: registration with capacity from the machine, addresses
//! (InternalIP, Hostname) and nodeInfo; Lease heartbeats; node status whose
//! Ready condition is True only while containerd answers and the CNI
//! network is ready; and the conflist for skiff-cni once node IPAM gave the
//! node its pod CIDR.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::Kubelet;
use skiff_common::node::{KUBELET_VERSION, LEASE_NAMESPACE, pod_cidr};

/// The first global IPv4 address of the network namespace the agent runs
/// in (not loopback, not link-local).
pub fn first_global_ipv4() -> Option<Ipv4Addr> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    addrs
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .find(|ip| !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified())
}

/// The machine's memory in bytes (`MemTotal` of /proc/meminfo).
pub fn machine_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The node conditions with Ready as given.
pub fn conditions(now: Timestamp, ready: bool, ready_since: Timestamp, message: &str) -> Value {
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": Time(now), "lastTransitionTime": Time(ready_since),
        })
    };
    json!([
        condition(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available"
        ),
        condition(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure"
        ),
        condition(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available"
        ),
        if ready {
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "kubelet is posting ready status",
            )
        } else {
            condition("Ready", "False", "KubeletNotReady", message)
        },
    ])
}

impl Kubelet {
    fn node_status(
        &self,
        ready: bool,
        ready_since: Timestamp,
        message: &str,
        runtime_version: &str,
    ) -> Value {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let resources = json!({
            "cpu": cpus.to_string(),
            "memory": format!("{}Ki", machine_memory() / 1024),
            "pods": self.node_args.max_pods.to_string(),
            "ephemeral-storage": "100Gi",
        });
        json!({"status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": self.host_ip.to_string()},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": read_trimmed("/etc/machine-id"),
                "systemUUID": read_trimmed("/etc/machine-id"),
                "bootID": read_trimmed("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": read_trimmed("/proc/sys/kernel/osrelease"),
                "osImage": "skiff",
                "containerRuntimeVersion": format!("containerd://{runtime_version}"),
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "conditions": conditions(Timestamp::now(), ready, ready_since, message),
        }})
    }

    /// Whether the node can run pods: containerd's version, or why not.
    async fn readiness(&self) -> Result<String, NotReady> {
        let version = self
            .runtime
            .version()
            .await
            .map_err(|source| NotReady::Runtime { source })?;
        self.cni.status().await.map_err(|e| NotReady::Network {
            message: skiff_common::error::chain(&e),
        })?;
        Ok(version)
    }

    async fn register(&self) -> Result<Node, kube::Error> {
        let api: Api<Node> = Api::all(self.client.clone());
        let mut labels = serde_json::Map::new();
        labels.insert("kubernetes.io/hostname".into(), json!(self.node_name));
        labels.insert("kubernetes.io/os".into(), json!("linux"));
        labels.insert("kubernetes.io/arch".into(), json!("amd64"));
        for (key, value) in &self.node_args.node_labels {
            labels.insert(key.clone(), json!(value));
        }
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node_name, "labels": labels},
            "spec": {},
        }))
        .expect("a Node is well-formed");
        match api.create(&PostParams::default(), &node).await {
            Ok(node) => Ok(node),
            Err(kube::Error::Api(s)) if s.code == 409 => api.get(&self.node_name).await,
            Err(e) => Err(e),
        }
    }

    async fn renew_lease(&self, node_uid: Option<&str>) -> Result<(), kube::Error> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), LEASE_NAMESPACE);
        let spec = json!({
            "holderIdentity": self.node_name,
            "leaseDurationSeconds": self.node_args.node_lease_duration_seconds,
            "renewTime": MicroTime(Timestamp::now()),
        });
        match api
            .patch(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": spec})),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                let mut metadata = json!({"name": self.node_name, "namespace": LEASE_NAMESPACE});
                if let Some(uid) = node_uid {
                    metadata["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": uid}]);
                }
                let lease: Lease = serde_json::from_value(json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": metadata, "spec": spec,
                }))
                .expect("a Lease is well-formed");
                match api.create(&PostParams::default(), &lease).await {
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                    other => other.map(drop),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Register the node, then keep its Lease, status and conflist up to
    /// date until shutdown.
    pub(super) async fn node_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(200);
        let node = loop {
            match self.register().await {
                Ok(node) => break node,
                Err(error) => {
                    tracing::warn!(error = %skiff_common::error::chain(&error), "cannot register node; retrying");
                    if !self.pause(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        };
        tracing::info!(node = %self.node_name, ip = %self.host_ip, "registered");
        let uid = node.metadata.uid.clone();
        let api: Api<Node> = Api::all(self.client.clone());
        let mut ready: Option<bool> = None;
        let mut ready_since = Timestamp::now();
        let mut last_status = Instant::now() - Duration::from_secs(3600);
        let mut last_lease = last_status;
        let mut runtime_version = String::new();
        let mut conflist_done = false;
        let tick = self
            .node_args
            .node_lease_renew_interval
            .min(Duration::from_secs(2));
        loop {
            if !conflist_done
                && let Ok(node) = api.get(&self.node_name).await
                && let Some(cidr) = pod_cidr(&node)
            {
                match super::cni::ensure_conflist(
                    &self.cni.conf_dir,
                    &self.cni.bin_dir,
                    &cidr.to_string(),
                    &self.root_dir.join("cni"),
                ) {
                    Ok(wrote) => {
                        if wrote {
                            tracing::info!(%cidr, dir = %self.cni.conf_dir.display(), "wrote the skiff-cni conflist");
                        }
                        conflist_done = true;
                        *self.pod_cidr.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(cidr.to_string());
                    }
                    Err(error) => {
                        tracing::warn!(error = %skiff_common::error::chain(&error), "cannot write the CNI conflist")
                    }
                }
            }
            let (now_ready, message) = match self.readiness().await {
                Ok(version) => {
                    runtime_version = version;
                    (true, String::new())
                }
                Err(error) => (false, skiff_common::error::chain(&error)),
            };
            if ready != Some(now_ready) {
                ready_since = Timestamp::now();
                if now_ready {
                    tracing::info!("node ready");
                } else {
                    tracing::warn!(%message, "node not ready");
                }
            }
            let changed = ready != Some(now_ready);
            ready = Some(now_ready);
            self.ready
                .store(now_ready, std::sync::atomic::Ordering::Relaxed);
            if changed || last_status.elapsed() >= self.node_args.node_status_report_frequency {
                let patch = self.node_status(now_ready, ready_since, &message, &runtime_version);
                match api
                    .patch_status(
                        &self.node_name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                {
                    Ok(_) => last_status = Instant::now(),
                    Err(error) => {
                        tracing::warn!(error = %skiff_common::error::chain(&error), "cannot post node status");
                        ready = None;
                    }
                }
            }
            if last_lease.elapsed() >= self.node_args.node_lease_renew_interval {
                match self.renew_lease(uid.as_deref()).await {
                    Ok(()) => last_lease = Instant::now(),
                    Err(error) => {
                        tracing::warn!(error = %skiff_common::error::chain(&error), "cannot renew lease")
                    }
                }
            }
            if !self.pause(tick).await {
                return;
            }
        }
    }
}

/// Why a node is not Ready: the reason its Ready condition shows, worded
/// as upstream's kubelet words it.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// containerd does not answer.
    #[error("container runtime is down")]
    Runtime {
        /// The runtime's error.
        #[source]
        source: super::runtime::RuntimeError,
    },
    /// The CNI network's STATUS (or VERSION) fails.
    #[error(
        "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:{message}"
    )]
    Network {
        /// The network's error, with its causes.
        message: String,
    },
}
