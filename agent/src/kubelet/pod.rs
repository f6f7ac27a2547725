//! The pod worker: one task per pod bound to the node.
//!
//! It makes the pod's sandbox (a network namespace wired by the CNI
//! plugin), runs the init containers to completion and then the app
//! containers, watches their exits and restarts them per `restartPolicy`
//! with upstream's back-off (immediately the first time, then 10 s doubling
//! to 5 min: `CrashLoopBackOff`), runs their probes, posts the pod's status
//! whenever it changes, records Events, and on deletion stops the
//! containers (SIGTERM, the grace period, SIGKILL), tears the network down
//! (CNI DEL, namespace removed) and finishes the deletion with
//! `gracePeriodSeconds=0`. A worker started by a restarted agent adopts the
//! pod's running containers and network instead of starting new ones.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::cni::{Attachment, pod_args};
use super::probe::{ProbeKind, ProbeTarget, ProbeVerdict, probe_loop};
use super::runtime::{
    ImageInfo, LABEL_CONTAINER, LABEL_NODE, LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID,
    LABEL_RESTART, LABEL_STARTED, RuntimeError,
};
use super::spec::{SpecInput, environment, oci_spec};
use super::status::{CState, ContainerView, PodView, Terminated, pod_status};
use super::{Kubelet, PodIdentity, netns};

/// The first restart back-off after the immediate one.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(10);
/// The longest restart back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How often projected volumes without a token are written again (their ConfigMaps and
/// Secrets read again).
pub const PROJECTED_RESYNC: Duration = Duration::from_secs(60);
/// The pause before a failed renewal of a projected volume is tried again.
pub const PROJECTED_RETRY: Duration = Duration::from_secs(10);
/// How long a container's start waits for the first list of Services (its environment).
pub const SERVICES_SYNC_WAIT: Duration = Duration::from_secs(30);

/// The delay before restart number `restarts + 1`, as upstream: none for
/// the first, then 10 s doubling up to 5 min.
pub fn restart_delay(restarts: i32) -> Duration {
    if restarts <= 0 {
        return Duration::ZERO;
    }
    let exp = (restarts - 1).min(10) as u32;
    (BACKOFF_INITIAL * 2u32.pow(exp)).min(BACKOFF_MAX)
}

/// Whether a container that exited with `code` is restarted under `policy`.
pub fn should_restart(policy: &str, code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => true,
    }
}

/// The containerd ID of instance `restart` of container `name` of pod `uid`.
pub fn container_id(uid: &str, name: &str, restart: i32) -> String {
    let short: String = uid.chars().filter(|c| *c != '-').take(12).collect();
    let name: String = name.chars().take(50).collect();
    format!("{short}-{name}-{restart}")
}

/// The pod's network as CNI left it.
#[derive(Debug, Clone)]
pub(super) struct Sandbox {
    netns: PathBuf,
    ip: Ipv4Addr,
    host_ifname: Option<String>,
    result: Value,
}

/// One container of the pod.
struct Ctr {
    spec: Container,
    init: bool,
    image_id: String,
    /// The current (or last) containerd instance.
    id: Option<String>,
    restart_count: i32,
    state: CState,
    last: Option<Terminated>,
    ready: bool,
    started: bool,
    /// No (re)start before this.
    next_start: Option<Instant>,
    /// Consecutive pull failures (for ImagePullBackOff).
    pull_failures: u32,
    probes: Option<CancellationToken>,
    env: Value,
}

impl Ctr {
    fn new(spec: Container, init: bool) -> Ctr {
        Ctr {
            spec,
            init,
            image_id: String::new(),
            id: None,
            restart_count: 0,
            state: CState::Waiting {
                reason: if init {
                    "PodInitializing"
                } else {
                    "ContainerCreating"
                }
                .into(),
                message: String::new(),
            },
            last: None,
            ready: false,
            started: false,
            next_start: None,
            pull_failures: 0,
            probes: None,
            env: json!([]),
        }
    }

    fn name(&self) -> &str {
        &self.spec.name
    }

    fn view(&self) -> ContainerView {
        ContainerView {
            name: self.spec.name.clone(),
            image: self.spec.image.clone().unwrap_or_default(),
            image_id: self.image_id.clone(),
            container_id: self.id.as_ref().map(|id| format!("containerd://{id}")),
            state: self.state.clone(),
            last_state: self.last.clone(),
            restart_count: self.restart_count,
            ready: self.ready,
            started: self.started,
        }
    }

    fn stop_probes(&mut self) {
        if let Some(token) = self.probes.take() {
            token.cancel();
        }
    }
}

/// A task exit reported by a waiter.
struct Exit {
    id: String,
    code: u32,
    at: Option<Timestamp>,
}

/// The worker of one pod.
pub struct Worker {
    k: Arc<Kubelet>,
    uid: String,
    rx: watch::Receiver<Option<Pod>>,
    pod: Pod,
    sandbox: Option<Sandbox>,
    sandbox_next: Option<Instant>,
    sandbox_failures: u32,
    network_done: bool,
    last_ip: Option<Ipv4Addr>,
    ctrs: Vec<Ctr>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits_rx: mpsc::UnboundedReceiver<Exit>,
    probes_tx: mpsc::UnboundedSender<ProbeVerdict>,
    probes_rx: mpsc::UnboundedReceiver<ProbeVerdict>,
    last_status: Option<Value>,
    start_time: Timestamp,
    /// When the projected volumes are written again (the token renewed): `None` until they are
    /// first written.
    projected_due: Option<Instant>,
}

impl Worker {
    /// A worker for pod `uid`, fed by `rx`.
    pub(super) fn new(k: Arc<Kubelet>, uid: String, rx: watch::Receiver<Option<Pod>>) -> Worker {
        let pod = rx.borrow().clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let mut ctrs: Vec<Ctr> = spec
            .init_containers
            .unwrap_or_default()
            .into_iter()
            .map(|c| Ctr::new(c, true))
            .collect();
        ctrs.extend(spec.containers.into_iter().map(|c| Ctr::new(c, false)));
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map_or_else(Timestamp::now, |t| t.0);
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        let (probes_tx, probes_rx) = mpsc::unbounded_channel();
        Worker {
            k,
            uid,
            rx,
            pod,
            sandbox: None,
            sandbox_next: None,
            sandbox_failures: 0,
            network_done: false,
            last_ip: None,
            ctrs,
            exits_tx,
            exits_rx,
            probes_tx,
            probes_rx,
            last_status: None,
            start_time,
            projected_due: None,
        }
    }

    fn policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn full_name(&self) -> String {
        format!(
            "{}/{}",
            self.pod.metadata.namespace.as_deref().unwrap_or_default(),
            self.pod.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// Run until the pod is gone (or the agent stops).
    pub async fn run(mut self) {
        let phase = self.pod.status.as_ref().and_then(|s| s.phase.clone());
        let finished = matches!(phase.as_deref(), Some("Succeeded" | "Failed"));
        self.adopt().await;
        if finished && self.sandbox.is_none() && self.ctrs.iter().all(|c| c.id.is_none()) {
            // Done before this agent started: only its deletion is left to do.
            self.network_done = true;
            self.last_status = self
                .pod
                .status
                .as_ref()
                .and_then(|s| serde_json::to_value(s).ok());
        }
        loop {
            let current = self.rx.borrow_and_update().clone();
            let Some(pod) = current else {
                self.terminate(false).await;
                return;
            };
            self.pod = pod;
            if self.pod.metadata.deletion_timestamp.is_some() {
                self.terminate(true).await;
                return;
            }
            if !(self.network_done
                && self.last_status.is_some()
                && self.ctrs.iter().all(|c| c.id.is_none()))
            {
                self.sync().await;
                self.report().await;
            }
            let wake = self
                .ctrs
                .iter()
                .filter_map(|c| c.next_start)
                .chain(self.sandbox_next)
                .map(|t| t.saturating_duration_since(Instant::now()))
                .min()
                .unwrap_or(Duration::from_secs(5))
                .clamp(Duration::from_millis(50), Duration::from_secs(5));
            tokio::select! {
                _ = self.k.shutdown.cancelled() => {
                    for c in &mut self.ctrs {
                        c.stop_probes();
                    }
                    return;
                }
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                Some(exit) = self.exits_rx.recv() => self.on_exit(exit),
                Some(verdict) = self.probes_rx.recv() => self.on_probe(verdict),
                _ = tokio::time::sleep(wake) => {}
            }
        }
    }

    fn network_file(&self) -> PathBuf {
        self.k.pod_dir(&self.uid).join("network.json")
    }

    /// Take over what a previous agent left for this pod.
    async fn adopt(&mut self) {
        let path = netns::netns_path(&self.k.run_dir, &self.uid);
        if netns::is_mounted(&path)
            && let Ok(text) = std::fs::read_to_string(self.network_file())
            && let Ok(saved) = serde_json::from_str::<Value>(&text)
            && let Ok(result) = super::cni::parse_add_result("saved", saved["result"].clone())
        {
            tracing::info!(pod = %self.full_name(), ip = %result.ip, "adopted the pod's network");
            // Idempotent: keeps the counters of a pod attached before, and
            // attaches one wired while the datapath was off.
            self.attach_datapath(result.host_ifname.as_deref(), result.ip);
            self.last_ip = Some(result.ip);
            self.sandbox = Some(Sandbox {
                netns: path,
                ip: result.ip,
                host_ifname: result.host_ifname,
                result: result.raw,
            });
        }
        let found = match self.k.runtime.list(LABEL_POD_UID, &self.uid).await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(pod = %self.full_name(), error = %skiff_common::error::chain(&error), "cannot list the pod's containers");
                return;
            }
        };
        let mut newest: HashMap<String, (i32, String, HashMap<String, String>)> = HashMap::new();
        let mut stale = Vec::new();
        for c in found {
            let name = c.labels.get(LABEL_CONTAINER).cloned().unwrap_or_default();
            let restart: i32 = c
                .labels
                .get(LABEL_RESTART)
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            match newest.get(&name) {
                Some((r, _, _)) if *r >= restart => stale.push(c.id),
                _ => {
                    if let Some((_, old, _)) = newest.insert(name, (restart, c.id, c.labels)) {
                        stale.push(old);
                    }
                }
            }
        }
        for id in stale {
            let _ = self.k.runtime.remove(&id).await;
        }
        for i in 0..self.ctrs.len() {
            let Some((restart, id, labels)) = newest.remove(self.ctrs[i].name()) else {
                continue;
            };
            let Some(sandbox) = self.sandbox.clone() else {
                // No network to run in: start over.
                let _ = self.k.runtime.remove(&id).await;
                continue;
            };
            let task = self.k.runtime.task(&id).await.ok().flatten();
            let started_at = labels
                .get(LABEL_STARTED)
                .and_then(|s| s.parse::<Timestamp>().ok())
                .unwrap_or_else(Timestamp::now);
            let image = self.ctrs[i].spec.image.clone().unwrap_or_default();
            if let Ok(info) = self.k.runtime.image(&image).await {
                self.ctrs[i].image_id = info.id.clone();
                let service_env = self.service_env().await;
                let env = environment(
                    &self.pod,
                    &self.ctrs[i].spec,
                    &info.config,
                    &service_env,
                    Some(&sandbox.ip.to_string()),
                    &self.k.host_ip.to_string(),
                );
                self.ctrs[i].env = json!(env);
            }
            let pod_name = self.full_name();
            let c = &mut self.ctrs[i];
            c.id = Some(id.clone());
            c.restart_count = restart;
            match task {
                Some(t) if t.running => {
                    tracing::info!(pod = %pod_name, container = %id, "adopted running container");
                    c.state = CState::Running { started_at };
                    c.started = c.spec.startup_probe.is_none();
                    c.ready = c.started && c.spec.readiness_probe.is_none();
                    self.spawn_waiter(id.clone());
                    self.start_probes(i, &sandbox);
                }
                Some(t) => {
                    c.state = CState::Running { started_at };
                    let _ = self.exits_tx.send(Exit {
                        id,
                        code: t.exit_status,
                        at: t.exited_at,
                    });
                }
                None => {
                    c.state = CState::Running { started_at };
                    let _ = self.exits_tx.send(Exit {
                        id,
                        code: 255,
                        at: None,
                    });
                }
            }
        }
        // Containers adopted still mount the projected volumes a previous agent wrote: their
        // token is renewed at the first sync (this agent does not know when it was written).
        if self.ctrs.iter().any(|c| c.id.is_some()) {
            self.projected_due = Some(Instant::now());
        }
    }

    /// Move the pod towards its spec: sandbox, volumes, init containers,
    /// app containers.
    async fn sync(&mut self) {
        if self.network_done {
            return;
        }
        if self.projected_due.is_some_and(|due| Instant::now() >= due)
            && let Err(error) = self.write_projected().await
        {
            tracing::warn!(pod = %self.full_name(), error = %skiff_common::error::chain(&error), "cannot renew the projected volumes; retrying in 10 s");
            self.projected_due = Some(Instant::now() + PROJECTED_RETRY);
        }
        let phase = self.current_phase();
        if matches!(phase, "Succeeded" | "Failed") {
            if self
                .ctrs
                .iter()
                .all(|c| !matches!(c.state, CState::Running { .. }))
            {
                // Upstream stops a finished pod's sandbox: its IP goes back.
                teardown_network(&self.k, &self.uid, self.sandbox.take().as_ref()).await;
                self.network_done = true;
            }
            return;
        }
        if self.sandbox.is_none() {
            if self.sandbox_next.is_some_and(|t| t > Instant::now()) {
                return;
            }
            match self.create_sandbox().await {
                Ok(sandbox) => {
                    self.sandbox_failures = 0;
                    self.sandbox_next = None;
                    self.last_ip = Some(sandbox.ip);
                    self.sandbox = Some(sandbox);
                }
                Err(error) => {
                    let message = skiff_common::error::chain(&error);
                    self.sandbox_failures += 1;
                    self.sandbox_next = Some(
                        Instant::now()
                            + restart_delay(self.sandbox_failures as i32)
                                .max(Duration::from_secs(1)),
                    );
                    self.k.event(
                        &self.pod,
                        None,
                        "Warning",
                        "FailedCreatePodSandBox",
                        format!("Failed to create pod sandbox: {message}"),
                    );
                    for c in &mut self.ctrs {
                        if c.id.is_none() {
                            c.state = CState::Waiting {
                                reason: "ContainerCreating".into(),
                                message: String::new(),
                            };
                        }
                    }
                    return;
                }
            }
        }
        let Some(sandbox) = self.sandbox.clone() else {
            return;
        };
        let policy = self.policy();
        // Init containers, in order: each must succeed before the next.
        for i in 0..self.ctrs.len() {
            if !self.ctrs[i].init {
                continue;
            }
            let sidecar = self.ctrs[i].spec.restart_policy.as_deref() == Some("Always");
            match &self.ctrs[i].state {
                CState::Terminated(t) if t.exit_code == 0 && !sidecar => continue,
                CState::Running { .. } if sidecar => continue,
                CState::Running { .. } => return,
                _ => {}
            }
            if self.ctrs[i].next_start.is_some_and(|t| t > Instant::now()) {
                return;
            }
            if let CState::Terminated(t) = &self.ctrs[i].state
                && !sidecar
                && policy == "Never"
                && t.exit_code != 0
            {
                return;
            }
            self.start_container(i, &sandbox).await;
            if !sidecar {
                return;
            }
        }
        for i in 0..self.ctrs.len() {
            if self.ctrs[i].init {
                continue;
            }
            let due = self.ctrs[i].next_start.is_none_or(|t| t <= Instant::now());
            let wants = match &self.ctrs[i].state {
                CState::Running { .. } => false,
                CState::Terminated(t) => should_restart(&policy, t.exit_code),
                CState::Waiting { .. } => true,
            };
            if wants && due {
                self.start_container(i, &sandbox).await;
            }
        }
    }

    fn initialized(&self) -> bool {
        self.ctrs.iter().filter(|c| c.init).all(|c| match &c.state {
            CState::Terminated(t) => t.exit_code == 0,
            CState::Running { .. } => c.spec.restart_policy.as_deref() == Some("Always"),
            CState::Waiting { .. } => false,
        })
    }

    fn current_phase(&self) -> &'static str {
        let views: Vec<ContainerView> = self
            .ctrs
            .iter()
            .filter(|c| !c.init)
            .map(Ctr::view)
            .collect();
        let policy = self.policy();
        let init_failed = self.ctrs.iter().any(|c| {
            c.init
                && policy == "Never"
                && matches!(&c.state, CState::Terminated(t) if t.exit_code != 0)
        });
        if init_failed {
            return "Failed";
        }
        super::status::phase(&views, &policy, self.initialized())
    }

    async fn create_sandbox(&mut self) -> Result<Sandbox, SandboxError> {
        let path = netns::netns_path(&self.k.run_dir, &self.uid);
        let netns_path = path.clone();
        tokio::task::spawn_blocking(move || netns::create(&netns_path))
            .await
            .map_err(|source| SandboxError::Task { source })??;
        let namespace = self.pod.metadata.namespace.clone().unwrap_or_default();
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let mut capability_args = serde_json::Map::new();
        if let Some(mappings) = self.pod.spec.as_ref().and_then(super::cni::port_mappings) {
            capability_args.insert("portMappings".into(), mappings);
        }
        let attachment = Attachment {
            container_id: self.uid.clone(),
            netns: path.clone(),
            ifname: "eth0".into(),
            args: pod_args(&namespace, &name, &self.uid),
            capability_args,
        };
        let result = match self.k.cni.add(&attachment).await {
            Ok(r) => r,
            Err(error) => {
                let _ = self.k.cni.del(&attachment, None).await;
                let _ = netns::remove(&path);
                return Err(error.into());
            }
        };
        let dir = self.k.pod_dir(&self.uid);
        let _ = std::fs::create_dir_all(&dir);
        // DEL needs the same capability arguments (portmap removes nothing
        // without its mappings), also after an agent restart.
        let saved = json!({
            "namespace": namespace,
            "name": name,
            "result": result.raw,
            "capabilityArgs": attachment.capability_args,
        });
        if let Err(error) = std::fs::write(self.network_file(), saved.to_string()) {
            tracing::warn!(error = %skiff_common::error::chain(&error), "cannot save the CNI result");
        }
        let hosts = super::dns::hosts_file(&self.pod, result.ip, &self.k.dns.domain);
        let _ = std::fs::write(dir.join("etc-hosts"), hosts);
        let resolv = super::dns::resolv_conf(&self.pod, &self.k.dns);
        let _ = std::fs::write(dir.join("resolv.conf"), resolv.render());
        self.attach_datapath(result.host_ifname.as_deref(), result.ip);
        tracing::info!(pod = %self.full_name(), ip = %result.ip, "pod network ready");
        Ok(Sandbox {
            netns: path,
            ip: result.ip,
            host_ifname: result.host_ifname,
            result: result.raw,
        })
    }

    /// Attach the datapath (the hook) to the pod's host-side veth. A failure
    /// does not fail the pod: it is a warning Event on it.
    fn attach_datapath(&self, host_ifname: Option<&str>, ip: Ipv4Addr) {
        let Some(hook) = &self.k.hook else {
            return;
        };
        let Some(ifname) = host_ifname else {
            tracing::warn!(pod = %self.full_name(), "the CNI result names no host-side interface; the datapath is not attached");
            return;
        };
        let ident = PodIdentity {
            namespace: self.pod.metadata.namespace.clone().unwrap_or_default(),
            name: self.pod.metadata.name.clone().unwrap_or_default(),
            uid: self.uid.clone(),
            ip,
        };
        if let Err(error) = hook.attach(ifname, &ident) {
            let error = skiff_common::error::chain(&error);
            tracing::warn!(pod = %self.full_name(), %error, %ifname, "cannot attach the datapath to the pod");
            self.k.event(
                &self.pod,
                None,
                "Warning",
                "DatapathAttachFailed",
                format!("Failed to attach the eBPF datapath to {ifname}: {error}"),
            );
        }
    }

    /// The pod's service environment variables, once the agent knows the Services (as the
    /// kubelet, it waits for the first list, here at most [`SERVICES_SYNC_WAIT`]).
    async fn service_env(&self) -> Vec<(String, String)> {
        let synced = tokio::time::timeout(SERVICES_SYNC_WAIT, self.k.services.synced()).await;
        if synced.is_err() {
            tracing::warn!(pod = %self.full_name(), "the Services are not listed yet; the container starts without their variables");
        }
        super::dns::service_env(&self.pod, &self.k.services.snapshot())
    }

    /// Writes every projected volume of the pod (its token renewed); the next time is set at
    /// 80% of the shortest token's lifetime, or [`PROJECTED_RESYNC`] without a token.
    async fn write_projected(&mut self) -> Result<(), super::projected::ProjectedError> {
        let dir = self.k.pod_dir(&self.uid).join("volumes");
        let mut renew: Option<Duration> = None;
        let volumes: Vec<_> = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for volume in volumes.iter().filter(|v| v.projected.is_some()) {
            let due =
                super::projected::write(&self.k.client, &self.pod, volume, &dir.join(&volume.name))
                    .await?;
            renew = match (renew, due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        self.projected_due = Some(Instant::now() + renew.unwrap_or(PROJECTED_RESYNC));
        Ok(())
    }

    fn volumes(&self) -> HashMap<String, PathBuf> {
        let dir = self.k.pod_dir(&self.uid).join("volumes");
        let mut out = HashMap::new();
        for v in self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .into_iter()
            .flatten()
        {
            if v.empty_dir.is_some() || v.projected.is_some() {
                let path = dir.join(&v.name);
                if std::fs::create_dir_all(&path).is_ok() {
                    out.insert(v.name.clone(), path);
                }
            }
        }
        out
    }

    fn backoff_wait(&mut self, i: usize, reason: &str, message: String) {
        let c = &mut self.ctrs[i];
        c.pull_failures += 1;
        c.next_start = Some(Instant::now() + restart_delay(c.pull_failures as i32));
        c.state = CState::Waiting {
            reason: reason.into(),
            message,
        };
    }

    async fn start_container(&mut self, i: usize, sandbox: &Sandbox) {
        let name = self.ctrs[i].name().to_string();
        let image_name = self.ctrs[i].spec.image.clone().unwrap_or_default();
        let image: ImageInfo = match self.k.runtime.image(&image_name).await {
            Ok(info) => info,
            Err(error) => {
                let not_found = matches!(error, RuntimeError::ImageNotFound { .. });
                let reason = if self.ctrs[i].pull_failures == 0 || !not_found {
                    "ErrImagePull"
                } else {
                    "ImagePullBackOff"
                };
                let message = skiff_common::error::chain(&error);
                self.k.event(
                    &self.pod,
                    Some(&name),
                    "Warning",
                    "Failed",
                    format!("Failed to pull image \"{image_name}\": {message}"),
                );
                if reason == "ImagePullBackOff" {
                    self.k.event(
                        &self.pod,
                        Some(&name),
                        "Normal",
                        "BackOff",
                        format!("Back-off pulling image \"{image_name}\""),
                    );
                }
                self.backoff_wait(i, reason, message);
                return;
            }
        };
        self.ctrs[i].pull_failures = 0;
        self.k.event(
            &self.pod,
            Some(&name),
            "Normal",
            "Pulled",
            format!("Container image \"{image_name}\" already present on machine"),
        );
        if let Some(old) = self.ctrs[i].id.take() {
            if let Err(error) = self.k.runtime.remove(&old).await {
                tracing::warn!(container = %old, error = %skiff_common::error::chain(&error), "cannot remove the previous instance");
            }
            self.ctrs[i].restart_count += 1;
        }
        let restart = self.ctrs[i].restart_count;
        let id = container_id(&self.uid, &name, restart);
        let _ = self.k.runtime.remove(&id).await;
        if self.projected_due.is_none()
            && let Err(error) = self.write_projected().await
        {
            let message = skiff_common::error::chain(&error).to_string();
            self.k.event(
                &self.pod,
                None,
                "Warning",
                "FailedMount",
                format!("MountVolume.SetUp failed: {message}"),
            );
            self.backoff_wait(i, "CreateContainerConfigError", message);
            return;
        }
        let volumes = self.volumes();
        let hosts = self.k.pod_dir(&self.uid).join("etc-hosts");
        let resolv = self.k.pod_dir(&self.uid).join("resolv.conf");
        let (hostname, _) = super::dns::hostname(&self.pod, &self.k.dns.domain);
        let service_env = self.service_env().await;
        let ip = sandbox.ip.to_string();
        let host_ip = self.k.host_ip.to_string();
        let cgroups = format!("/skiff/{}/pod{}/{}", self.k.node_name, self.uid, id);
        let spec = oci_spec(&SpecInput {
            pod: &self.pod,
            container: &self.ctrs[i].spec,
            image: &image.config,
            netns: &sandbox.netns,
            pod_ip: Some(&ip),
            host_ip: &host_ip,
            volumes: &volumes,
            hosts_file: hosts.exists().then_some(hosts.as_path()),
            resolv_file: resolv.exists().then_some(resolv.as_path()),
            hostname: &hostname,
            service_env: &service_env,
            cgroups_path: &cgroups,
        });
        let now = Timestamp::now();
        let labels = HashMap::from([
            (LABEL_NODE.to_string(), self.k.node_name.clone()),
            (LABEL_POD_UID.to_string(), self.uid.clone()),
            (
                LABEL_POD_NAMESPACE.to_string(),
                self.pod.metadata.namespace.clone().unwrap_or_default(),
            ),
            (
                LABEL_POD_NAME.to_string(),
                self.pod.metadata.name.clone().unwrap_or_default(),
            ),
            (LABEL_CONTAINER.to_string(), name.clone()),
            (LABEL_RESTART.to_string(), restart.to_string()),
            (LABEL_STARTED.to_string(), now.to_string()),
        ]);
        let log_dir = self.k.pod_dir(&self.uid).join("logs").join(&name);
        // Upstream keeps the current and the previous instance's logs.
        super::logs::prune_logs(&log_dir, restart - 1);
        let log = log_dir.join(format!("{restart}.log"));
        self.ctrs[i].image_id = image.id.clone();
        self.ctrs[i].env = spec["process"]["env"].clone();
        if let Err(error) = self
            .k
            .runtime
            .create(&id, &image, &spec, labels, &log)
            .await
        {
            let message = skiff_common::error::chain(&error);
            self.k.event(
                &self.pod,
                Some(&name),
                "Warning",
                "Failed",
                format!("Error: {message}"),
            );
            self.backoff_wait(i, "CreateContainerError", message);
            return;
        }
        self.k.event(
            &self.pod,
            Some(&name),
            "Normal",
            "Created",
            format!("Created container {name}"),
        );
        if let Err(error) = self.k.runtime.start(&id, "").await {
            let message = skiff_common::error::chain(&error);
            let _ = self.k.runtime.remove(&id).await;
            self.k.event(
                &self.pod,
                Some(&name),
                "Warning",
                "Failed",
                format!("Error: {message}"),
            );
            self.backoff_wait(i, "RunContainerError", message);
            return;
        }
        self.k.event(
            &self.pod,
            Some(&name),
            "Normal",
            "Started",
            format!("Started container {name}"),
        );
        tracing::info!(pod = %self.full_name(), container = %id, "container started");
        let c = &mut self.ctrs[i];
        c.id = Some(id.clone());
        c.state = CState::Running { started_at: now };
        c.next_start = None;
        c.started = c.spec.startup_probe.is_none();
        c.ready = c.started && c.spec.readiness_probe.is_none();
        self.spawn_waiter(id);
        self.start_probes(i, sandbox);
    }

    fn spawn_waiter(&self, id: String) {
        let runtime = self.k.runtime.clone();
        let tx = self.exits_tx.clone();
        let shutdown = self.k.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let result = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = runtime.wait(&id, "") => r,
                };
                match result {
                    Ok((code, at)) => {
                        let _ = tx.send(Exit { id, code, at });
                        return;
                    }
                    Err(error) if error.is_not_found() => {
                        let _ = tx.send(Exit {
                            id,
                            code: 255,
                            at: None,
                        });
                        return;
                    }
                    Err(error) => {
                        tracing::debug!(error = %skiff_common::error::chain(&error), "wait failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    fn start_probes(&mut self, i: usize, sandbox: &Sandbox) {
        let c = &mut self.ctrs[i];
        c.stop_probes();
        let Some(id) = c.id.clone() else {
            return;
        };
        let token = CancellationToken::new();
        c.probes = Some(token.clone());
        let target = Arc::new(ProbeTarget {
            pod_ip: Some(sandbox.ip.to_string()),
            runtime: self.k.runtime.clone(),
            container_id: id,
            env: c.env.clone(),
            ports: c
                .spec
                .ports
                .iter()
                .flatten()
                .filter_map(|p| Some((p.name.clone()?, p.container_port)))
                .collect(),
        });
        let name = c.spec.name.clone();
        let spawn = |kind: ProbeKind, probe: &Option<k8s_openapi::api::core::v1::Probe>| {
            if let Some(probe) = probe.clone() {
                tokio::spawn(probe_loop(
                    name.clone(),
                    kind,
                    probe,
                    target.clone(),
                    self.probes_tx.clone(),
                    token.clone(),
                ));
            }
        };
        if c.spec.startup_probe.is_some() && !c.started {
            spawn(ProbeKind::Startup, &c.spec.startup_probe);
        } else {
            spawn(ProbeKind::Liveness, &c.spec.liveness_probe);
            spawn(ProbeKind::Readiness, &c.spec.readiness_probe);
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        let policy = self.policy();
        let pod_name = self.pod.metadata.name.clone().unwrap_or_default();
        let Some(i) = self
            .ctrs
            .iter()
            .position(|c| c.id.as_deref() == Some(exit.id.as_str()))
        else {
            return;
        };
        let c = &mut self.ctrs[i];
        c.stop_probes();
        let code = exit.code as i32;
        let started_at = match &c.state {
            CState::Running { started_at } => Some(*started_at),
            _ => None,
        };
        let terminated = Terminated {
            exit_code: code,
            reason: if code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            },
            started_at,
            finished_at: exit.at.unwrap_or_else(Timestamp::now),
            container_id: format!("containerd://{}", exit.id),
        };
        tracing::info!(pod = %pod_name, container = %exit.id, code, "container exited");
        c.ready = false;
        let restart = if c.init {
            code != 0 && policy != "Never" || c.spec.restart_policy.as_deref() == Some("Always")
        } else {
            should_restart(&policy, code)
        };
        if !restart {
            c.state = CState::Terminated(terminated);
            return;
        }
        let delay = restart_delay(c.restart_count);
        c.last = Some(terminated.clone());
        if delay.is_zero() {
            c.state = CState::Terminated(terminated);
            c.next_start = None;
        } else {
            c.next_start = Some(Instant::now() + delay);
            let name = c.spec.name.clone();
            c.state = CState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: format!(
                    "back-off {}s restarting failed container={name} pod={pod_name}_{}({})",
                    delay.as_secs(),
                    self.pod.metadata.namespace.as_deref().unwrap_or_default(),
                    self.uid
                ),
            };
            self.k.event(
                &self.pod,
                Some(&name),
                "Warning",
                "BackOff",
                format!("Back-off restarting failed container {name} in pod {pod_name}"),
            );
        }
    }

    fn on_probe(&mut self, verdict: ProbeVerdict) {
        let Some(i) = self
            .ctrs
            .iter()
            .position(|c| c.id.as_deref() == Some(verdict.container_id.as_str()))
        else {
            return;
        };
        if !matches!(self.ctrs[i].state, CState::Running { .. }) {
            return;
        }
        let name = verdict.container.clone();
        if let Some(error) = &verdict.error {
            self.k.event(
                &self.pod,
                Some(&name),
                "Warning",
                "Unhealthy",
                format!("{} probe failed: {error}", verdict.kind.label()),
            );
        }
        match verdict.kind {
            ProbeKind::Readiness => {
                if let Some(v) = verdict.verdict {
                    self.ctrs[i].ready = v && self.ctrs[i].started;
                }
            }
            ProbeKind::Startup if verdict.verdict == Some(true) => {
                self.ctrs[i].started = true;
                self.ctrs[i].ready = self.ctrs[i].spec.readiness_probe.is_none();
                if let Some(sandbox) = self.sandbox.clone() {
                    // Liveness and readiness begin once started.
                    let token = self.ctrs[i].probes.take();
                    self.start_probes(i, &sandbox);
                    drop(token);
                }
            }
            ProbeKind::Liveness | ProbeKind::Startup if verdict.verdict == Some(false) => {
                let why = if verdict.kind == ProbeKind::Liveness {
                    "liveness"
                } else {
                    "startup"
                };
                self.k.event(
                    &self.pod,
                    Some(&name),
                    "Normal",
                    "Killing",
                    format!("Container {name} failed {why} probe, will be restarted"),
                );
                self.ctrs[i].stop_probes();
                let grace = self.grace();
                let runtime = self.k.runtime.clone();
                let id = verdict.container_id.clone();
                tokio::spawn(async move { stop_container(&runtime, &id, grace).await });
            }
            _ => {}
        }
    }

    fn grace(&self) -> Duration {
        let seconds = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0);
        Duration::from_secs(seconds as u64)
    }

    /// Post the status if it changed.
    async fn report(&mut self) {
        let apps: Vec<ContainerView> = self
            .ctrs
            .iter()
            .filter(|c| !c.init)
            .map(Ctr::view)
            .collect();
        let inits: Vec<ContainerView> =
            self.ctrs.iter().filter(|c| c.init).map(Ctr::view).collect();
        let mut status = pod_status(&PodView {
            pod: &self.pod,
            containers: &apps,
            init_containers: &inits,
            initialized: self.initialized(),
            sandbox_ready: self.sandbox.is_some(),
            pod_ip: self.last_ip.map(|ip| ip.to_string()),
            host_ip: self.k.host_ip.to_string(),
            start_time: self.start_time,
            now: Timestamp::now(),
        });
        let phase = self.current_phase();
        status["phase"] = json!(phase);
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(
            self.k.client.clone(),
            self.pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        match api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
        {
            Ok(_) => self.last_status = Some(status),
            Err(error) => {
                tracing::warn!(pod = %self.full_name(), error = %skiff_common::error::chain(&error), "cannot post pod status")
            }
        }
    }

    /// Stop everything of the pod; finish its deletion when `in_api`.
    async fn terminate(&mut self, in_api: bool) {
        let grace = self.grace();
        tracing::info!(pod = %self.full_name(), grace = grace.as_secs(), "stopping the pod");
        let mut stops = Vec::new();
        for c in &mut self.ctrs {
            c.stop_probes();
            if let (Some(id), CState::Running { .. }) = (&c.id, &c.state) {
                self.k.event(
                    &self.pod,
                    Some(c.name()),
                    "Normal",
                    "Killing",
                    format!("Stopping container {}", c.name()),
                );
                let runtime = self.k.runtime.clone();
                let id = id.clone();
                stops.push(async move { stop_container(&runtime, &id, grace).await });
            }
        }
        futures::future::join_all(stops).await;
        if let Ok(found) = self.k.runtime.list(LABEL_POD_UID, &self.uid).await {
            for c in found {
                if let Err(error) = self.k.runtime.remove(&c.id).await {
                    tracing::warn!(container = %c.id, error = %skiff_common::error::chain(&error), "cannot remove container");
                }
            }
        }
        teardown_network(&self.k, &self.uid, self.sandbox.take().as_ref()).await;
        remove_pod_files(&self.k, &self.uid);
        if !in_api {
            return;
        }
        let namespace = self.pod.metadata.namespace.clone().unwrap_or_default();
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.k.client.clone(), &namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        for attempt in 0..10u32 {
            match api.delete(&name, &params).await {
                Ok(_) => return,
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => return,
                Err(error) => {
                    tracing::warn!(pod = %self.full_name(), error = %skiff_common::error::chain(&error), "cannot finish the pod's deletion; retrying");
                    if !self
                        .k
                        .pause(Duration::from_millis(200 * 2u64.pow(attempt.min(5))))
                        .await
                    {
                        return;
                    }
                }
            }
        }
    }
}

/// SIGTERM, up to `grace` for the task to exit, then SIGKILL.
async fn stop_container(runtime: &super::runtime::Runtime, id: &str, grace: Duration) {
    match runtime.task(id).await {
        Ok(Some(t)) if t.running => {}
        _ => return,
    }
    let _ = runtime.kill(id, 15, false).await;
    if tokio::time::timeout(grace, runtime.wait(id, ""))
        .await
        .is_err()
    {
        let _ = runtime.kill(id, 9, true).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), runtime.wait(id, "")).await;
    }
}

/// CNI DEL and namespace removal for pod `uid` (the saved ADD result as
/// `prevResult`), with the datapath detached first.
pub(super) async fn teardown_network(k: &Kubelet, uid: &str, sandbox: Option<&Sandbox>) {
    let path = netns::netns_path(&k.run_dir, uid);
    let saved: Value = std::fs::read_to_string(k.pod_dir(uid).join("network.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let result = sandbox
        .map(|s| s.result.clone())
        .unwrap_or_else(|| saved["result"].clone());
    let host_ifname = sandbox.and_then(|s| s.host_ifname.clone()).or_else(|| {
        super::cni::parse_add_result("saved", result.clone())
            .ok()
            .and_then(|r| r.host_ifname)
    });
    if let (Some(hook), Some(ifname)) = (&k.hook, &host_ifname)
        && let Err(error) = hook.detach(ifname)
    {
        let error = skiff_common::error::chain(&error);
        tracing::warn!(%error, %ifname, "cannot detach the datapath from the pod");
    }
    let attachment = Attachment {
        container_id: uid.to_string(),
        netns: path.clone(),
        ifname: "eth0".into(),
        args: pod_args(
            saved["namespace"].as_str().unwrap_or_default(),
            saved["name"].as_str().unwrap_or_default(),
            uid,
        ),
        capability_args: saved["capabilityArgs"]
            .as_object()
            .cloned()
            .unwrap_or_default(),
    };
    if let Err(error) = k.cni.del(&attachment, Some(&result)).await {
        tracing::warn!(pod_uid = %uid, error = %skiff_common::error::chain(&error), "CNI DEL failed");
    }
    if let Err(error) = netns::remove(&path) {
        tracing::warn!(pod_uid = %uid, error = %skiff_common::error::chain(&error), "cannot remove the pod's network namespace");
    }
}

/// Remove the pod's directory (volumes, logs, saved network) and its
/// cgroup directories.
pub(super) fn remove_pod_files(k: &Kubelet, uid: &str) {
    let _ = std::fs::remove_dir_all(k.pod_dir(uid));
    let relative = format!("skiff/{}/pod{uid}", k.node_name);
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = hierarchy.path().join(&relative);
        if dir.is_dir() {
            // Leaf cgroups runc left (it removes those of deleted containers).
            for leaf in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if leaf.path().is_dir() {
                    let _ = std::fs::remove_dir(leaf.path());
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// Why a pod's sandbox (its network namespace and CNI ADD) could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The thread that makes the namespace failed.
    #[error("the namespace task failed")]
    Task {
        /// Its join error.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The namespace could not be made.
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    /// CNI ADD failed.
    #[error(transparent)]
    Cni(#[from] super::cni::CniError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_from_ten_seconds_to_five_minutes() {
        assert_eq!(restart_delay(0), Duration::ZERO);
        assert_eq!(restart_delay(1), Duration::from_secs(10));
        assert_eq!(restart_delay(2), Duration::from_secs(20));
        assert_eq!(restart_delay(5), Duration::from_secs(160));
        assert_eq!(restart_delay(6), Duration::from_secs(300));
        assert_eq!(restart_delay(60), Duration::from_secs(300));
    }

    #[test]
    fn restart_policies() {
        assert!(should_restart("Always", 0));
        assert!(should_restart("OnFailure", 1));
        assert!(!should_restart("OnFailure", 0));
        assert!(!should_restart("Never", 1));
    }

    #[test]
    fn container_ids_are_valid_and_bounded() {
        let id = container_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "web", 3);
        assert_eq!(id, "0f1e2d3c4b5a-web-3");
        let long = container_id(
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
            &"x".repeat(63),
            12345,
        );
        assert!(long.len() <= 76);
    }
}
