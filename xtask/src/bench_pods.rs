//! `cargo xtask bench pods`: real pods on a local 3-node cluster, and the CNI plugin alone.
//!
//! Builds `skiff-control`, `skiff-agent` (with `skiffctl`) and `skiff-cni` in release, writes the
//! busybox image archive, then:
//!
//! - **CNI**: the release `skiff-cni` is run as a container runtime runs it — a fresh process per
//!   call, the `CNI_*` environment, the network configuration on stdin, the result read from
//!   stdout — from a thread inside a node network namespace the bench creates, for
//!   [`CNI_ITERATIONS`] pods (each with a network namespace of its own, made beforehand): every
//!   ADD, then every DEL. Each call is timed from spawn to exit. As a floor, the same thread times
//!   the spawn and exit of `/bin/true`.
//! - **create-to-Running**: `skiffctl up --nodes 3` (release binaries; the image is imported into
//!   every node's containerd, so nothing is pulled) and one watch on the bench namespace's pods.
//!   Three phases of [`PODS`] pods each, the pods deleted between phases: *paced* (the next one
//!   once the previous is Running: the latency of one pod on an otherwise idle cluster),
//!   *steady* (one POST every `1/`[`STEADY_RATE`] s, as Kubernetes measures its pod start-up SLO
//!   under a set creation rate), and *burst* (all POSTs back to back on one connection). Each
//!   pod's latency runs from just before its POST to the watch event showing `status.phase`
//!   Running; the watch also gives when it was bound (`spec.nodeName`). The machine's busy CPU
//!   time through each phase is read from `/proc/stat`. As floors for the container part,
//!   `ctr run -d` of the same image is timed on a node's containerd one at a time, and
//!   [`PODS`] of them at once spread over the nodes' containerds (no agent, no CNI, no API).
//! - **memory**: VmRSS of every `skiff-agent`, idle (a few seconds after `up`) and the peak
//!   through both phases (sampled every 100 ms).
//!
//! The cluster is removed (`skiffctl down`) on exit, on error and on Ctrl-C. The figures go to
//! the `pods` section of BENCHMARKS.md.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use skiff_tests::free_port;
use skiff_tests::netns::TestNetns;
use tokio::sync::Notify;

use crate::bench::{
    BenchArgs, Client, Interrupts, Machine, Sampler, Samples, Target, client_tls, machine_busy,
    mib, micros, vm_rss_kib,
};
use crate::{cargo, run, say, target_dir};

/// CNI ADDs (then as many DELs) timed.
pub(crate) const CNI_ITERATIONS: usize = 200;
/// Pods of each create-to-Running phase.
pub(crate) const PODS: usize = 50;
/// Pods created per second in the steady phase: about half the rate at which this 2-core
/// machine can start pods at all (the burst phase's figures give that rate).
const STEADY_RATE: u32 = 10;
/// Nodes of the cluster.
const NODES: usize = 3;
/// The namespace the pods live in.
const NAMESPACE: &str = "bench";
/// The image, imported by `skiffctl up`.
const IMAGE: &str = "localhost/skiff/busybox:latest";
/// The goal for CNI ADD p99.
const GOAL_CNI_ADD_P99: Duration = Duration::from_millis(20);
/// The goal for create-to-Running p99.
const GOAL_RUNNING_P99: Duration = Duration::from_secs(1);
/// How long one pod may take to be Running (paced) or all of them (burst).
const RUNNING_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the agents are left alone after `up` before their idle memory is read.
const IDLE_SETTLE: Duration = Duration::from_secs(3);
/// `ctr run -d` samples of the containerd floor.
const CTR_RUNS: usize = 10;

/// Runs `cargo xtask bench pods`.
pub fn pods(ws: &Path, args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    let (bin, image) = release_cluster_binaries(ws, "pods")?;

    say(format!(
        "CNI: {CNI_ITERATIONS} ADDs then DELs of {}",
        bin.join("skiff-cni").display()
    ));
    let cni = cni_bench(&bin.join("skiff-cni"))?;
    println!(
        "CNI ADD p50 {} p99 {}; DEL p50 {} p99 {}",
        micros(cni.add.percentile(50.0)),
        micros(cni.add.percentile(99.0)),
        micros(cni.del.percentile(50.0)),
        micros(cni.del.percentile(99.0))
    );

    let cluster = LocalCluster::up(&bin.join("skiffctl"), &image)?;
    let outcome = cluster_bench(&cluster);
    let logs = cluster.agent_log_tails();
    drop(cluster);
    let pods = outcome.with_context(|| format!("the cluster bench failed; agent logs:\n{logs}"))?;

    let report = Report { cni, pods };
    let machine = Machine::describe(ws);
    let md = report.markdown(&machine);
    crate::bench::publish(ws, args, Target::Pods, &md, started, "the cluster is down")
}

/// Checks for root, builds `skiff-control`, `skiff-agent` (with `skiffctl`) and `skiff-cni` in
/// release and writes the busybox image: the release binaries' directory and the image archive.
pub(crate) fn release_cluster_binaries(ws: &Path, bench: &str) -> Result<(PathBuf, PathBuf)> {
    ensure!(
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0"),
        "bench {bench} needs root (network namespaces, containerd, eBPF)"
    );
    say("cargo build --release -p skiff-control -p skiff-agent -p skiff-cni --bins");
    run(cargo().current_dir(ws).args([
        "build",
        "--release",
        "-p",
        "skiff-control",
        "-p",
        "skiff-agent",
        "-p",
        "skiff-cni",
        "--bins",
    ]))?;
    let target = target_dir(ws)?;
    let bin = target.join("release");
    for name in ["skiff-control", "skiff-agent", "skiff-cni", "skiffctl"] {
        ensure!(
            bin.join(name).exists(),
            "{} was not built",
            bin.join(name).display()
        );
    }
    let image = crate::image::image(
        ws,
        &crate::image::ImageArgs {
            out: Some(target.join("skiff-busybox.oci.tar")),
            busybox: PathBuf::from(skiff_image::DEFAULT_BUSYBOX),
        },
    )?;
    Ok((bin, image))
}

// ---- CNI -----------------------------------------------------------------------------------

/// CNI call latencies, in microseconds.
struct CniFigures {
    add: Samples,
    del: Samples,
    /// Spawn to exit of `/bin/true` from the same thread: the process floor.
    floor: Samples,
}

fn cni_bench(plugin: &Path) -> Result<CniFigures> {
    let data = tempfile::Builder::new()
        .prefix("skiff-bench-cni-")
        .tempdir()
        .context("could not create a temporary directory")?;
    let config = json!({
        "cniVersion": "1.1.0",
        "name": "bench",
        "type": "skiff-cni",
        "podCIDR": "10.250.0.0/24",
        "dataDir": data.path().join("ipam"),
    })
    .to_string();
    let node = TestNetns::create("skiff-bench-node");
    say(format!("making {CNI_ITERATIONS} pod network namespaces"));
    let pods: Vec<TestNetns> = (0..CNI_ITERATIONS)
        .map(|_| TestNetns::create("skiff-bench-pod"))
        .collect();
    let plugin_dir = plugin
        .parent()
        .context("the plugin has a directory")?
        .to_path_buf();
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<CniFigures> {
                // Everything this thread starts runs in the node namespace.
                node.enter();
                let call = |command: &str, i: usize, netns: &TestNetns| -> Result<i64> {
                    let id = format!("bench{i:04}");
                    let start = Instant::now();
                    let mut child = Command::new(plugin)
                        .env_clear()
                        .env("CNI_COMMAND", command)
                        .env("CNI_CONTAINERID", &id)
                        .env("CNI_NETNS", netns.path())
                        .env("CNI_IFNAME", "eth0")
                        .env("CNI_PATH", &plugin_dir)
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .with_context(|| format!("could not run {}", plugin.display()))?;
                    child
                        .stdin
                        .take()
                        .context("stdin")?
                        .write_all(config.as_bytes())
                        .context("could not write the network configuration")?;
                    let out = child.wait_with_output()?;
                    let took = start.elapsed();
                    ensure!(
                        out.status.success(),
                        "CNI {command} of {id} failed ({}): {}{}",
                        out.status,
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    if command == "ADD" {
                        let result: Value = serde_json::from_slice(&out.stdout)
                            .with_context(|| format!("the ADD result of {id} is not JSON"))?;
                        ensure!(
                            result["ips"][0]["address"].is_string(),
                            "the ADD result of {id} has no address: {result}"
                        );
                    }
                    Ok(i64::try_from(took.as_micros()).unwrap_or(i64::MAX))
                };
                let mut add = Vec::with_capacity(CNI_ITERATIONS);
                for (i, netns) in pods.iter().enumerate() {
                    add.push(call("ADD", i, netns)?);
                }
                let mut del = Vec::with_capacity(CNI_ITERATIONS);
                for (i, netns) in pods.iter().enumerate() {
                    del.push(call("DEL", i, netns)?);
                }
                let mut floor = Vec::with_capacity(CNI_ITERATIONS);
                for _ in 0..CNI_ITERATIONS {
                    let start = Instant::now();
                    let status = Command::new("/bin/true").status()?;
                    ensure!(status.success(), "/bin/true failed");
                    floor.push(i64::try_from(start.elapsed().as_micros()).unwrap_or(i64::MAX));
                }
                // Every DEL removed its host veth.
                let links = Command::new("ip").args(["-o", "link", "show"]).output()?;
                let left = String::from_utf8_lossy(&links.stdout)
                    .lines()
                    .filter(|l| l.contains(": skf"))
                    .count();
                ensure!(left == 0, "{left} host veths are left after the DELs");
                Ok(CniFigures {
                    add: Samples::new(add),
                    del: Samples::new(del),
                    floor: Samples::new(floor),
                })
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the CNI bench thread panicked"))?
    })
}

// ---- the local cluster ---------------------------------------------------------------------

/// A `skiffctl up` cluster; `skiffctl down` when dropped.
pub(crate) struct LocalCluster {
    pub(crate) skiffctl: PathBuf,
    dir: tempfile::TempDir,
    pub(crate) port: u16,
    /// The cluster name (`bench<pid>`).
    pub(crate) name: String,
    nodes: usize,
}

impl LocalCluster {
    fn up(skiffctl: &Path, image: &Path) -> Result<LocalCluster> {
        LocalCluster::up_with(skiffctl, image, NODES, &[])
    }

    /// `skiffctl up --nodes <nodes> <extra>` with the release binaries.
    pub(crate) fn up_with(
        skiffctl: &Path,
        image: &Path,
        nodes: usize,
        extra: &[&str],
    ) -> Result<LocalCluster> {
        let dir = tempfile::Builder::new()
            .prefix("skiff-bench-")
            .tempdir()
            .context("could not create a temporary directory")?;
        let cluster = LocalCluster {
            skiffctl: skiffctl.to_path_buf(),
            dir,
            port: free_port(),
            name: format!("bench{}", std::process::id()),
            nodes,
        };
        say(format!(
            "skiffctl up --nodes {nodes} --name {} {} (release binaries)",
            cluster.name,
            extra.join(" ")
        ));
        run(Command::new(skiffctl)
            .args(["up", "--nodes", &nodes.to_string(), "--name", &cluster.name])
            .arg("--state-dir")
            .arg(cluster.state_dir())
            .arg("--api-port")
            .arg(cluster.port.to_string())
            .arg("--image")
            .arg(image)
            .args(["--timeout", "180s"])
            .args(extra))?;
        Ok(cluster)
    }

    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub(crate) fn state(&self) -> Result<Value> {
        let path = self.state_dir().join("state.json");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("could not read {}", path.display()))?;
        serde_json::from_str(&text).context("the state file is not JSON")
    }

    /// (node, pid) of every agent.
    pub(crate) fn agents(&self) -> Result<Vec<(String, u32)>> {
        let state = self.state()?;
        let agents: Vec<(String, u32)> = state["processes"]
            .as_array()
            .context("no processes in the state file")?
            .iter()
            .filter(|p| p["role"] == "agent")
            .filter_map(|p| {
                Some((
                    p["node"].as_str()?.to_string(),
                    u32::try_from(p["pid"].as_u64()?).ok()?,
                ))
            })
            .collect();
        ensure!(
            agents.len() == self.nodes,
            "{} agents recorded",
            agents.len()
        );
        Ok(agents)
    }

    /// Every node's containerd socket.
    fn containerd_addresses(&self) -> Result<Vec<String>> {
        let state = self.state()?;
        let addresses: Vec<String> = state["nodes"]
            .as_array()
            .context("no nodes in the state file")?
            .iter()
            .filter_map(|n| n["containerd_address"].as_str().map(str::to_string))
            .collect();
        ensure!(
            addresses.len() == self.nodes,
            "{} containerd addresses recorded",
            addresses.len()
        );
        Ok(addresses)
    }

    pub(crate) fn agent_log_tails(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = fs::read_dir(self.state_dir().join("logs")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("agent-") {
                    let text = fs::read_to_string(entry.path()).unwrap_or_default();
                    let _ = writeln!(all, "--- {name}\n{}", skiff_tests::tail(&text, 15));
                }
            }
        }
        all
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        say("skiffctl down");
        let out = Command::new(&self.skiffctl)
            .arg("down")
            .arg("--state-dir")
            .arg(self.state_dir())
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => say(format!(
                "skiffctl down failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(e) => say(format!("could not run skiffctl down: {e}")),
        }
    }
}

// ---- create-to-Running ---------------------------------------------------------------------

/// What the watch saw of one pod.
#[derive(Debug, Default, Clone)]
struct Milestones {
    created: Option<Instant>,
    bound: Option<Instant>,
    running: Option<Instant>,
    deleted: bool,
}

/// Pods by name, filled by the watch.
#[derive(Default)]
struct Tracker {
    pods: Mutex<HashMap<String, Milestones>>,
    changed: Notify,
}

impl Tracker {
    fn observe(&self, kind: &str, pod: &Value, at: Instant) {
        let Some(name) = pod["metadata"]["name"].as_str() else {
            return;
        };
        let mut pods = self.pods.lock().expect("tracker lock");
        let m = pods.entry(name.to_string()).or_default();
        if pod["spec"]["nodeName"].is_string() && m.bound.is_none() {
            m.bound = Some(at);
        }
        if pod["status"]["phase"] == "Running" && m.running.is_none() {
            m.running = Some(at);
        }
        if kind == "DELETED" {
            m.deleted = true;
        }
        drop(pods);
        self.changed.notify_waiters();
    }

    fn set_created(&self, name: &str, at: Instant) {
        let mut pods = self.pods.lock().expect("tracker lock");
        pods.entry(name.to_string()).or_default().created = Some(at);
    }

    fn get(&self, name: &str) -> Milestones {
        self.pods
            .lock()
            .expect("tracker lock")
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// How many of the pods the bench created reached each milestone.
    fn summary(&self) -> String {
        let pods = self.pods.lock().expect("tracker lock");
        let created: Vec<&Milestones> = pods.values().filter(|m| m.created.is_some()).collect();
        let count = |f: fn(&Milestones) -> bool| created.iter().filter(|m| f(m)).count();
        format!(
            "of {} pods created: {} bound, {} Running",
            created.len(),
            count(|m| m.bound.is_some()),
            count(|m| m.running.is_some())
        )
    }

    /// Waits until `done` holds for the pods, or fails after `timeout`.
    async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&HashMap<String, Milestones>) -> bool,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if done(&self.pods.lock().expect("tracker lock")) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!(
                    "timed out after {timeout:?} waiting for {what} ({})",
                    self.summary()
                );
            }
        }
    }
}

/// How the pods of a phase are created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pace {
    /// The next pod once the previous one is Running.
    OneAtATime,
    /// One POST every `1 / rate` seconds, whatever the cluster does.
    Rate(u32),
    /// All POSTs back to back.
    Burst,
}

impl Pace {
    fn label(self) -> String {
        match self {
            Pace::OneAtATime => "paced".to_string(),
            Pace::Rate(rate) => format!("steady {rate}/s"),
            Pace::Burst => "burst".to_string(),
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Pace::OneAtATime => "paced",
            Pace::Rate(_) => "steady",
            Pace::Burst => "burst",
        }
    }
}

/// Latencies of one phase, in microseconds.
struct Phase {
    pace: Pace,
    /// Create to Running.
    running: Samples,
    /// Create to bound (the scheduler).
    bound: Samples,
    /// Bound to Running: the agent's part (it sees the pod, makes the network namespace, runs
    /// CNI ADD, creates and starts the containers, and posts the status with the IP and phase
    /// Running in one write).
    agent: Samples,
    /// First POST to the last pod Running.
    wall: Duration,
    /// CPU time the whole machine was busy over `wall`.
    busy: Duration,
}

/// What the cluster part measured.
struct ClusterFigures {
    phases: Vec<Phase>,
    /// `ctr run -d` of the image on a node's containerd, one at a time.
    ctr_run: Samples,
    /// [`PODS`] `ctr run -d` at once over the nodes' containerds.
    ctr_burst: CtrBurst,
    /// (node, idle KiB, peak KiB) per agent.
    agents: Vec<(String, u64, u64)>,
}

/// [`PODS`] `ctr run -d` started at once, spread over the nodes.
struct CtrBurst {
    /// Start of the first to exit of the last.
    wall: Duration,
    /// CPU time the whole machine was busy meanwhile.
    busy: Duration,
}

fn pod_body(name: &str) -> String {
    pod_body_in(NAMESPACE, name)
}

/// A `sleep` pod of the busybox image, `namespace/name`.
pub(crate) fn pod_body_in(namespace: &str, name: &str) -> String {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "main",
                "image": IMAGE,
                "command": ["sleep", "3600"],
            }],
        },
    })
    .to_string()
}

fn since(later: Option<Instant>, earlier: Option<Instant>) -> Option<i64> {
    let d = later?.checked_duration_since(earlier?)?;
    i64::try_from(d.as_micros()).ok()
}

fn phase(tracker: &Tracker, names: &[String], pace: Pace, wall: Duration, busy: Duration) -> Phase {
    let all: Vec<Milestones> = names.iter().map(|n| tracker.get(n)).collect();
    let collect = |f: &dyn Fn(&Milestones) -> Option<i64>| -> Samples {
        Samples::new(all.iter().filter_map(f).collect())
    };
    Phase {
        pace,
        running: collect(&|m| since(m.running, m.created)),
        bound: collect(&|m| since(m.bound, m.created)),
        agent: collect(&|m| since(m.running, m.bound)),
        wall,
        busy,
    }
}

fn cluster_bench(cluster: &LocalCluster) -> Result<ClusterFigures> {
    let tls = client_tls(&cluster.state_dir().join("control").join("pki"))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, cluster.port));
    let agents = cluster.agents()?;
    std::thread::sleep(IDLE_SETTLE);
    let idle: Vec<u64> = agents
        .iter()
        .map(|(_, pid)| vm_rss_kib(*pid))
        .collect::<Result<_>>()?;
    let sampler = Sampler::start(agents.iter().map(|(_, pid)| *pid).collect());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("could not start the tokio runtime")?;
    let mut interrupts = {
        let _context = runtime.enter();
        Interrupts::install()?
    };
    let tracker = Arc::new(Tracker::default());
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = phases(&tls, addr, &tracker) => Ok(result),
            signal = interrupts.recv() => Err(signal),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    let peaks = sampler.stop();
    let phases = match outcome {
        Ok(result) => result?,
        Err(signal) => bail!("interrupted by {signal}"),
    };
    let (ctr_run, ctr_burst) = ctr_floor(&cluster.containerd_addresses()?, &cluster.state_dir())?;
    Ok(ClusterFigures {
        phases,
        ctr_run,
        ctr_burst,
        agents: agents
            .into_iter()
            .zip(idle)
            .zip(peaks)
            .map(|(((node, _), idle), peak)| (node, idle, peak.max(idle)))
            .collect(),
    })
}

async fn phases(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    tracker: &Arc<Tracker>,
) -> Result<Vec<Phase>> {
    let mut api = Client::tls(tls, addr).await?;
    api.expect(
        Method::POST,
        "/api/v1/namespaces",
        Some(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
                .to_string(),
        ),
        StatusCode::CREATED,
    )
    .await?;
    let watch = tokio::spawn(watch_pods(tls.clone(), addr, tracker.clone()));
    // A watch without resourceVersion starts with the pods that exist as ADDED events, so a
    // slow start loses nothing; the pause only keeps its connection set-up out of the first
    // pod's latency.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(!watch.is_finished(), "the pod watch ended at once");
    let paces = [Pace::OneAtATime, Pace::Rate(STEADY_RATE), Pace::Burst];
    let mut phases = Vec::new();
    for (i, pace) in paces.into_iter().enumerate() {
        phases.push(run_phase(&mut api, tracker, pace).await?);
        if i + 1 < paces.len() {
            delete_phase(&mut api, tracker, pace).await?;
        }
    }
    watch.abort();
    Ok(phases)
}

fn pods_path() -> String {
    format!("/api/v1/namespaces/{NAMESPACE}/pods")
}

fn phase_names(pace: Pace) -> Vec<String> {
    (0..PODS)
        .map(|i| format!("{}-{i:02}", pace.prefix()))
        .collect()
}

/// Creates the phase's [`PODS`] pods at its pace and waits until all are Running.
async fn run_phase(api: &mut Client, tracker: &Arc<Tracker>, pace: Pace) -> Result<Phase> {
    say(format!("{PODS} pods, {}", pace.label()));
    let names = phase_names(pace);
    let path = pods_path();
    let busy_before = machine_busy()?;
    let start = Instant::now();
    for (i, name) in names.iter().enumerate() {
        if let Pace::Rate(rate) = pace {
            let due = start + Duration::from_secs(1) * u32::try_from(i)? / rate;
            tokio::time::sleep_until(due.into()).await;
        }
        tracker.set_created(name, Instant::now());
        api.expect(
            Method::POST,
            &path,
            Some(pod_body(name)),
            StatusCode::CREATED,
        )
        .await?;
        if pace == Pace::OneAtATime {
            tracker
                .wait(&format!("{name} Running"), RUNNING_TIMEOUT, |pods| {
                    pods.get(name).is_some_and(|m| m.running.is_some())
                })
                .await?;
        }
    }
    tracker
        .wait(
            &format!("the {} pods Running", pace.label()),
            RUNNING_TIMEOUT,
            |pods| {
                names
                    .iter()
                    .all(|n| pods.get(n).is_some_and(|m| m.running.is_some()))
            },
        )
        .await?;
    let wall = start.elapsed();
    let busy = machine_busy()?.saturating_sub(busy_before);
    Ok(phase(tracker, &names, pace, wall, busy))
}

/// Deletes the phase's pods and lets the agents finish tearing them down.
async fn delete_phase(api: &mut Client, tracker: &Arc<Tracker>, pace: Pace) -> Result<()> {
    say(format!("deleting the {PODS} {} pods", pace.label()));
    let names = phase_names(pace);
    let path = pods_path();
    for name in &names {
        api.expect(
            Method::DELETE,
            &format!("{path}/{name}?gracePeriodSeconds=0"),
            None,
            StatusCode::OK,
        )
        .await?;
    }
    tracker
        .wait(
            &format!("the {} pods gone", pace.label()),
            RUNNING_TIMEOUT,
            |pods| names.iter().all(|n| pods.get(n).is_some_and(|m| m.deleted)),
        )
        .await?;
    // Let the agents finish tearing the pods down before the next phase.
    tokio::time::sleep(Duration::from_secs(5)).await;
    Ok(())
}

/// Watches the bench namespace's pods into `tracker` (reconnecting from the last
/// resourceVersion when the stream ends).
async fn watch_pods(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    tracker: Arc<Tracker>,
) -> Result<()> {
    let mut resource_version: Option<String> = None;
    loop {
        let path = match &resource_version {
            None => format!("/api/v1/namespaces/{NAMESPACE}/pods?watch=1"),
            Some(rv) => {
                format!("/api/v1/namespaces/{NAMESPACE}/pods?watch=1&resourceVersion={rv}")
            }
        };
        let mut client = Client::tls(&tls, addr).await?;
        let request = client.request(Method::GET, &path, None)?;
        client.sender.ready().await.context("the watch closed")?;
        let response = client
            .sender
            .send_request(request)
            .await
            .context("the pod watch request failed")?;
        ensure!(
            response.status() == StatusCode::OK,
            "the pod watch answered {}",
            response.status()
        );
        let mut body = response.into_body();
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the pod watch broke")?;
            let at = Instant::now();
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buffer.extend_from_slice(&data);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                let event: Value =
                    serde_json::from_slice(line).context("a watch event is not JSON")?;
                let kind = event["type"].as_str().unwrap_or_default();
                match kind {
                    "ADDED" | "MODIFIED" | "DELETED" => {
                        tracker.observe(kind, &event["object"], at);
                        if let Some(rv) = event["object"]["metadata"]["resourceVersion"].as_str() {
                            resource_version = Some(rv.to_string());
                        }
                    }
                    "ERROR" => resource_version = None,
                    _ => {}
                }
            }
        }
    }
}

/// `ctr` against one node's containerd, in a containerd namespace of its own (the agent's
/// namespace is the agent's to clean).
struct Ctr<'a> {
    address: &'a str,
}

impl Ctr<'_> {
    const NAMESPACE: &'static str = "skiff-bench-floor";

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.args(["-a", self.address, "-n", Self::NAMESPACE])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<std::process::Output> {
        self.command(args).output().context("could not run ctr")
    }

    /// Imports the image the cluster imported (exported from the agent's namespace).
    fn import_image(&self, archive: &Path) -> Result<()> {
        let out = Command::new("ctr")
            .args(["-a", self.address, "-n", "skiff", "images", "export"])
            .arg(archive)
            .arg(IMAGE)
            .output()?;
        ensure!(
            out.status.success(),
            "ctr images export: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = self.run(&["images", "import", &archive.to_string_lossy()])?;
        ensure!(
            out.status.success(),
            "ctr images import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Kills and removes container `id` and its task.
    fn remove(&self, id: &str) {
        let _ = self.run(&["tasks", "kill", "-s", "SIGKILL", id]);
        for _ in 0..50 {
            if self
                .run(&["tasks", "rm", id])
                .is_ok_and(|o| o.status.success())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.run(&["containers", "rm", id]);
    }
}

/// `ctr run -d` of the image: [`CTR_RUNS`] times one after another on the first node, then
/// [`PODS`] at once spread over all the nodes. Container ids are unique across the nodes: their
/// containerds share the runc state directory of the namespace.
fn ctr_floor(addresses: &[String], state_dir: &Path) -> Result<(Samples, CtrBurst)> {
    let nodes: Vec<Ctr> = addresses.iter().map(|a| Ctr { address: a }).collect();
    for (i, node) in nodes.iter().enumerate() {
        node.import_image(&state_dir.join(format!("floor-image-{i}.tar")))?;
    }
    let first = &nodes[0];
    let mut samples = Vec::new();
    for i in 0..CTR_RUNS {
        let id = format!("floor-{i}");
        let start = Instant::now();
        let out = first.run(&["run", "-d", IMAGE, &id, "sleep", "60"])?;
        let took = start.elapsed();
        ensure!(
            out.status.success(),
            "ctr run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        samples.push(i64::try_from(took.as_micros()).unwrap_or(i64::MAX));
        first.remove(&id);
    }

    say(format!(
        "{PODS} `ctr run -d` at once over {} nodes",
        nodes.len()
    ));
    let ids: Vec<(usize, String)> = (0..PODS)
        .map(|i| (i % nodes.len(), format!("floor-burst-{i:02}")))
        .collect();
    let busy_before = machine_busy()?;
    let start = Instant::now();
    let children = ids
        .iter()
        .map(|(node, id)| {
            nodes[*node]
                .command(&["run", "-d", IMAGE, id, "sleep", "60"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("could not run ctr")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut failures = Vec::new();
    for child in children {
        let out = child.wait_with_output().context("ctr run")?;
        if !out.status.success() {
            failures.push(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
    }
    let burst = CtrBurst {
        wall: start.elapsed(),
        busy: machine_busy()?.saturating_sub(busy_before),
    };
    for (node, id) in &ids {
        nodes[*node].remove(id);
    }
    for node in &nodes {
        let _ = node.run(&["images", "rm", IMAGE]);
    }
    ensure!(
        failures.is_empty(),
        "ctr run failed: {}",
        failures.join("; ")
    );
    Ok((Samples::new(samples), burst))
}

// ---- report --------------------------------------------------------------------------------

struct Report {
    cni: CniFigures,
    pods: ClusterFigures,
}

/// CPUs of this machine.
pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn ms(us: i64) -> String {
    if us >= 10_000 {
        format!("{:.0} ms", us as f64 / 1000.0)
    } else {
        micros(us)
    }
}

impl Report {
    fn goals(&self) -> Vec<(String, String, bool)> {
        let add = self.cni.add.percentile(99.0);
        let mut goals = vec![(
            format!("CNI ADD p99 < {} ms", GOAL_CNI_ADD_P99.as_millis()),
            ms(add),
            add < GOAL_CNI_ADD_P99.as_micros() as i64,
        )];
        for phase in &self.pods.phases {
            let p99 = phase.running.percentile(99.0);
            goals.push((
                format!(
                    "create-to-Running p99 < {} s, {PODS} pods on {NODES} nodes ({})",
                    GOAL_RUNNING_P99.as_secs(),
                    phase.pace.label()
                ),
                ms(p99),
                p99 < GOAL_RUNNING_P99.as_micros() as i64,
            ));
        }
        goals
    }

    /// Where a pod's time goes, from the medians, and what the machine spent.
    fn analysis(&self) -> String {
        let mut text = String::new();
        for phase in &self.pods.phases {
            let _ = writeln!(
                text,
                "- {}: median create→bound {} (scheduler), bound→Running {} (the agent: network \
                 namespace, CNI ADD, snapshot, container and task through containerd and runc, \
                 then one status write with the IP and phase Running); p99 {} and {}. The {PODS} \
                 pods took {:.2} s from the first POST to the last Running, and the machine was \
                 busy {:.2} s of CPU meanwhile ({:.0} ms per pod, {:.2} of the {} CPUs).",
                phase.pace.label(),
                ms(phase.bound.percentile(50.0)),
                ms(phase.agent.percentile(50.0)),
                ms(phase.bound.percentile(99.0)),
                ms(phase.agent.percentile(99.0)),
                phase.wall.as_secs_f64(),
                phase.busy.as_secs_f64(),
                phase.busy.as_secs_f64() * 1000.0 / PODS as f64,
                phase.busy.as_secs_f64() / phase.wall.as_secs_f64().max(1e-9),
                cpus(),
            );
        }
        let burst = &self.pods.ctr_burst;
        let _ = writeln!(
            text,
            "- floors: one CNI ADD {} (p50; spawning `/bin/true` costs {}); one `ctr run -d` of \
             the image {} (p50, including the start of the `ctr` client itself); {PODS} `ctr run \
             -d` at once over the {NODES} nodes' containerds (no API server, agent or CNI) took \
             {:.2} s until the last returned, the machine busy {:.2} s of CPU ({:.0} ms per \
             container). A burst of {PODS} pods cannot be Running within 1 s on this machine when \
             starting their containers alone takes longer.",
            ms(self.cni.add.percentile(50.0)),
            ms(self.cni.floor.percentile(50.0)),
            ms(self.pods.ctr_run.percentile(50.0)),
            burst.wall.as_secs_f64(),
            burst.busy.as_secs_f64(),
            burst.busy.as_secs_f64() * 1000.0 / PODS as f64,
        );
        text
    }

    fn markdown(&self, machine: &Machine) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## Pods (`cargo xtask bench pods`)\n");
        let _ = writeln!(
            md,
            "{} Release build. CNI: the \
             `skiff-cni` binary run as a runtime runs it (exec, `CNI_*` environment, configuration \
             on stdin) from a thread in a node network namespace, {CNI_ITERATIONS} ADDs into \
             fresh pod namespaces, then their DELs, each timed from spawn to exit. Pods: `skiffctl \
             up --nodes {NODES}` (control plane, and containerd plus `skiff-agent` per node, in \
             network namespaces on this machine; the busybox image imported beforehand, nothing \
             pulled), three phases of {PODS} `sleep` pods, deleted between phases: created one at a \
             time (paced), at {STEADY_RATE} pods/s (steady), and back to back (burst); each pod \
             timed from just before its POST to the watch event with phase Running.\n",
            machine.last_run(),
        );
        let _ = writeln!(md, "### Goals\n");
        md.push_str(&crate::bench::goals_table(&self.goals()));
        let _ = writeln!(md, "\n### CNI plugin\n");
        let _ = writeln!(
            md,
            "| call | n | p50 | p99 | max |\n|---|---:|---:|---:|---:|"
        );
        for (label, s) in [
            ("ADD", &self.cni.add),
            ("DEL", &self.cni.del),
            ("`/bin/true` (process floor)", &self.cni.floor),
        ] {
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} |",
                s.len(),
                micros(s.percentile(50.0)),
                micros(s.percentile(99.0)),
                micros(s.max())
            );
        }
        let _ = writeln!(md, "\n### Create to Running\n");
        let _ = writeln!(
            md,
            "| phase | step | n | p50 | p99 | max |\n|---|---|---:|---:|---:|---:|"
        );
        for phase in &self.pods.phases {
            for (step, s) in [
                ("create → Running", &phase.running),
                ("create → bound", &phase.bound),
                ("bound → Running", &phase.agent),
            ] {
                let _ = writeln!(
                    md,
                    "| {} | {step} | {} | {} | {} | {} |",
                    phase.pace.label(),
                    s.len(),
                    ms(s.percentile(50.0)),
                    ms(s.percentile(99.0)),
                    ms(s.max())
                );
            }
        }
        let s = &self.pods.ctr_run;
        let _ = writeln!(
            md,
            "| floor | `ctr run -d` (no CNI, no agent) | {} | {} | {} | {} |",
            s.len(),
            ms(s.percentile(50.0)),
            ms(s.percentile(99.0)),
            ms(s.max())
        );
        let _ = writeln!(md, "\n### Where the time goes\n\n{}", self.analysis());
        let _ = writeln!(
            md,
            "### Agent memory (VmRSS)\n\nIdle: {} s after `skiffctl up`. Peak: sampled every \
             100 ms through the three phases.\n",
            IDLE_SETTLE.as_secs()
        );
        let _ = writeln!(md, "| node | idle | peak |\n|---|---:|---:|");
        for (node, idle, peak) in &self.pods.agents {
            let _ = writeln!(md, "| {node} | {} | {} |", mib(*idle), mib(*peak));
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestones_give_the_phase_latencies() {
        let tracker = Tracker::default();
        let t0 = Instant::now();
        tracker.set_created("p", t0);
        let pod = |node: bool, running: bool| {
            let mut p = json!({"metadata": {"name": "p"}, "spec": {}, "status": {}});
            if node {
                p["spec"]["nodeName"] = json!("n1");
            }
            if running {
                p["status"]["phase"] = json!("Running");
                p["status"]["podIP"] = json!("10.244.0.2");
            }
            p
        };
        tracker.observe("ADDED", &pod(false, false), t0);
        tracker.observe("MODIFIED", &pod(true, false), t0 + Duration::from_millis(5));
        tracker.observe(
            "MODIFIED",
            &pod(true, true),
            t0 + Duration::from_millis(200),
        );
        // A later event does not move a milestone.
        tracker.observe(
            "MODIFIED",
            &pod(true, true),
            t0 + Duration::from_millis(900),
        );
        let phase = phase(
            &tracker,
            &["p".to_string()],
            Pace::Burst,
            Duration::from_secs(1),
            Duration::from_millis(500),
        );
        assert_eq!(phase.bound.0, vec![5_000]);
        assert_eq!(phase.agent.0, vec![195_000]);
        assert_eq!(phase.running.0, vec![200_000]);
        assert!(!tracker.get("p").deleted);
        tracker.observe("DELETED", &pod(true, true), t0 + Duration::from_secs(1));
        assert!(tracker.get("p").deleted);
    }

    #[test]
    fn pod_bodies_name_the_local_image() {
        let pod: Value = serde_json::from_str(&pod_body("x-1")).expect("JSON");
        assert_eq!(pod["metadata"]["name"], "x-1");
        assert_eq!(pod["metadata"]["namespace"], NAMESPACE);
        assert_eq!(pod["spec"]["containers"][0]["image"], IMAGE);
        assert_eq!(ms(1_500), "1.50 ms");
        assert_eq!(ms(250_000), "250 ms");
    }

    #[test]
    fn phases_have_distinct_pod_names_and_labels() {
        let paces = [Pace::OneAtATime, Pace::Rate(STEADY_RATE), Pace::Burst];
        let mut names: Vec<String> = paces.iter().flat_map(|p| phase_names(*p)).collect();
        assert_eq!(names.len(), 3 * PODS);
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 3 * PODS, "pod names repeat across phases");
        assert_eq!(Pace::Rate(10).label(), "steady 10/s");
    }
}
