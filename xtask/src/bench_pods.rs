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
//!   [`PODS`] pods are created *paced* (the next one once the previous is Running: the latency of
//!   one pod on an otherwise idle cluster), deleted, then [`PODS`] more in a *burst* (all POSTs
//!   back to back on one connection). Each pod's latency runs from just before its POST to the
//!   watch event showing `status.phase` Running; the watch also gives when it was bound
//!   (`spec.nodeName`) and when the agent first reported its IP. As a floor for the container
//!   part, `ctr run -d` of the same image on a node's containerd is timed.
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
    BenchArgs, Client, Interrupts, Machine, Sampler, Samples, Target, client_tls, mib, micros,
    verdict, vm_rss_kib, write_section,
};
use crate::{cargo, run, say, target_dir};

/// CNI ADDs (then as many DELs) timed.
pub(crate) const CNI_ITERATIONS: usize = 200;
/// Pods of each create-to-Running phase.
pub(crate) const PODS: usize = 50;
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
    ensure!(
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0"),
        "bench pods needs root (network namespaces, containerd, eBPF)"
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
    println!("{md}");
    if args.no_write {
        say("--no-write: BENCHMARKS.md left as it is");
    } else {
        write_section(ws, Target::Pods, &md)?;
    }
    say(format!(
        "bench finished in {:.0}s; the cluster is down",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
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
struct LocalCluster {
    skiffctl: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl LocalCluster {
    fn up(skiffctl: &Path, image: &Path) -> Result<LocalCluster> {
        let dir = tempfile::Builder::new()
            .prefix("skiff-bench-pods-")
            .tempdir()
            .context("could not create a temporary directory")?;
        let cluster = LocalCluster {
            skiffctl: skiffctl.to_path_buf(),
            dir,
            port: free_port(),
        };
        let name = format!("bench{}", std::process::id());
        say(format!(
            "skiffctl up --nodes {NODES} --name {name} (release binaries)"
        ));
        run(Command::new(skiffctl)
            .args(["up", "--nodes", &NODES.to_string(), "--name", &name])
            .arg("--state-dir")
            .arg(cluster.state_dir())
            .arg("--api-port")
            .arg(cluster.port.to_string())
            .arg("--image")
            .arg(image)
            .args(["--timeout", "180s"]))?;
        Ok(cluster)
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn state(&self) -> Result<Value> {
        let path = self.state_dir().join("state.json");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("could not read {}", path.display()))?;
        serde_json::from_str(&text).context("the state file is not JSON")
    }

    /// (node, pid) of every agent.
    fn agents(&self) -> Result<Vec<(String, u32)>> {
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
        ensure!(agents.len() == NODES, "{} agents recorded", agents.len());
        Ok(agents)
    }

    fn containerd_address(&self) -> Result<String> {
        let state = self.state()?;
        state["nodes"][0]["containerd_address"]
            .as_str()
            .map(str::to_string)
            .context("no containerd address in the state file")
    }

    fn agent_log_tails(&self) -> String {
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
    ip: Option<Instant>,
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
        if pod["status"]["podIP"].is_string() && m.ip.is_none() {
            m.ip = Some(at);
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
            "of {} pods created: {} bound, {} with an IP, {} Running",
            created.len(),
            count(|m| m.bound.is_some()),
            count(|m| m.ip.is_some()),
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

/// Latencies of one phase, in microseconds.
struct Phase {
    /// Create to Running.
    running: Samples,
    /// Create to bound (the scheduler).
    bound: Samples,
    /// Bound to the agent's first status with the pod's IP (sandbox and CNI done).
    ip: Samples,
    /// The agent's first IP report to Running (containers started and reported).
    started: Samples,
}

/// What the cluster part measured.
struct ClusterFigures {
    paced: Phase,
    burst: Phase,
    /// `ctr run -d` of the image on a node's containerd.
    ctr_run: Samples,
    /// (node, idle KiB, peak KiB) per agent.
    agents: Vec<(String, u64, u64)>,
}

fn pod_body(name: &str) -> String {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
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

fn phase(tracker: &Tracker, names: &[String]) -> Phase {
    let all: Vec<Milestones> = names.iter().map(|n| tracker.get(n)).collect();
    let collect = |f: &dyn Fn(&Milestones) -> Option<i64>| -> Samples {
        Samples::new(all.iter().filter_map(f).collect())
    };
    Phase {
        running: collect(&|m| since(m.running, m.created)),
        bound: collect(&|m| since(m.bound, m.created)),
        ip: collect(&|m| since(m.ip, m.bound)),
        started: collect(&|m| since(m.running, m.ip)),
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
    let (paced, burst) = match outcome {
        Ok(result) => result?,
        Err(signal) => bail!("interrupted by {signal}"),
    };
    let ctr_run = ctr_floor(&cluster.containerd_address()?, &cluster.state_dir())?;
    Ok(ClusterFigures {
        paced,
        burst,
        ctr_run,
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
) -> Result<(Phase, Phase)> {
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
    let pods_path = format!("/api/v1/namespaces/{NAMESPACE}/pods");

    say(format!("{PODS} pods, paced (one at a time)"));
    let mut paced = Vec::new();
    for i in 0..PODS {
        let name = format!("paced-{i:02}");
        tracker.set_created(&name, Instant::now());
        api.expect(
            Method::POST,
            &pods_path,
            Some(pod_body(&name)),
            StatusCode::CREATED,
        )
        .await?;
        tracker
            .wait(&format!("{name} Running"), RUNNING_TIMEOUT, |pods| {
                pods.get(&name).is_some_and(|m| m.running.is_some())
            })
            .await?;
        paced.push(name);
    }
    let paced_phase = phase(tracker, &paced);

    say(format!("deleting the {PODS} paced pods"));
    for name in &paced {
        api.expect(
            Method::DELETE,
            &format!("{pods_path}/{name}?gracePeriodSeconds=0"),
            None,
            StatusCode::OK,
        )
        .await?;
    }
    tracker
        .wait("the paced pods gone", RUNNING_TIMEOUT, |pods| {
            paced.iter().all(|n| pods.get(n).is_some_and(|m| m.deleted))
        })
        .await?;
    // Let the agents finish tearing the pods down before the burst.
    tokio::time::sleep(Duration::from_secs(5)).await;

    say(format!("{PODS} pods, in a burst"));
    let burst: Vec<String> = (0..PODS).map(|i| format!("burst-{i:02}")).collect();
    for name in &burst {
        tracker.set_created(name, Instant::now());
        api.expect(
            Method::POST,
            &pods_path,
            Some(pod_body(name)),
            StatusCode::CREATED,
        )
        .await?;
    }
    tracker
        .wait("the burst pods Running", RUNNING_TIMEOUT, |pods| {
            burst
                .iter()
                .all(|n| pods.get(n).is_some_and(|m| m.running.is_some()))
        })
        .await?;
    let burst_phase = phase(tracker, &burst);
    watch.abort();
    Ok((paced_phase, burst_phase))
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

/// `ctr run -d` of the image, [`CTR_RUNS`] times, in a containerd namespace of its own (the
/// agent's namespace is the agent's to clean), each container removed afterwards.
fn ctr_floor(address: &str, state_dir: &Path) -> Result<Samples> {
    let ns = "skiff-bench-floor";
    let image = state_dir.join("floor-image.tar");
    let ctr = |args: &[&str]| -> Result<std::process::Output> {
        Command::new("ctr")
            .args(["-a", address, "-n", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("could not run ctr")
    };
    // The image the cluster imported, exported from the agent namespace and imported here.
    let out = Command::new("ctr")
        .args(["-a", address, "-n", "skiff", "images", "export"])
        .arg(&image)
        .arg(IMAGE)
        .output()?;
    ensure!(
        out.status.success(),
        "ctr images export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctr(&["images", "import", &image.to_string_lossy()])?;
    ensure!(
        out.status.success(),
        "ctr images import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut samples = Vec::new();
    for i in 0..CTR_RUNS {
        let id = format!("floor-{i}");
        let start = Instant::now();
        let out = ctr(&["run", "-d", IMAGE, &id, "sleep", "60"])?;
        let took = start.elapsed();
        ensure!(
            out.status.success(),
            "ctr run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        samples.push(i64::try_from(took.as_micros()).unwrap_or(i64::MAX));
        let _ = ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
        for _ in 0..50 {
            if ctr(&["tasks", "rm", &id])?.status.success() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = ctr(&["containers", "rm", &id]);
    }
    let _ = ctr(&["images", "rm", IMAGE]);
    Ok(Samples::new(samples))
}

// ---- report --------------------------------------------------------------------------------

struct Report {
    cni: CniFigures,
    pods: ClusterFigures,
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
        for (label, phase) in [("paced", &self.pods.paced), ("burst", &self.pods.burst)] {
            let p99 = phase.running.percentile(99.0);
            goals.push((
                format!(
                    "create-to-Running p99 < {} s, {PODS} pods on {NODES} nodes ({label})",
                    GOAL_RUNNING_P99.as_secs()
                ),
                ms(p99),
                p99 < GOAL_RUNNING_P99.as_micros() as i64,
            ));
        }
        goals
    }

    /// Where a pod's time goes, from the medians.
    fn analysis(&self) -> String {
        let mut text = String::new();
        for (label, phase) in [("paced", &self.pods.paced), ("burst", &self.pods.burst)] {
            let _ = writeln!(
                text,
                "- {label}: median create→bound {} (scheduler), bound→IP reported {} (the agent \
                 sees the pod, prepares the sandbox: network namespace, CNI ADD, and posts \
                 status), IP→Running {} (containerd: snapshot, container, task start, then the \
                 status update); p99 of those: {}, {}, {}.",
                ms(phase.bound.percentile(50.0)),
                ms(phase.ip.percentile(50.0)),
                ms(phase.started.percentile(50.0)),
                ms(phase.bound.percentile(99.0)),
                ms(phase.ip.percentile(99.0)),
                ms(phase.started.percentile(99.0)),
            );
        }
        let _ = writeln!(
            text,
            "- floors: one CNI ADD {} (p50; spawning `/bin/true` costs {}), one `ctr run -d` of \
             the image {} (p50, including the start of the `ctr` client itself).",
            ms(self.cni.add.percentile(50.0)),
            ms(self.cni.floor.percentile(50.0)),
            ms(self.pods.ctr_run.percentile(50.0)),
        );
        text
    }

    fn markdown(&self, machine: &Machine) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## Pods (`cargo xtask bench pods`)\n");
        let _ = writeln!(
            md,
            "Last run: {} at commit `{}`, on {} cores ({}), {}, {}. Release build. CNI: the \
             `skiff-cni` binary run as a runtime runs it (exec, `CNI_*` environment, configuration \
             on stdin) from a thread in a node network namespace, {CNI_ITERATIONS} ADDs into \
             fresh pod namespaces, then their DELs, each timed from spawn to exit. Pods: `skiffctl \
             up --nodes {NODES}` (control plane, and containerd plus `skiff-agent` per node, in \
             network namespaces on this machine; the busybox image imported beforehand, nothing \
             pulled), {PODS} `sleep` pods created one at a time (paced), deleted, then {PODS} \
             created back to back (burst); each timed from just before its POST to the watch \
             event with phase Running.\n",
            machine.date,
            machine.commit,
            machine.cores,
            machine.cpu,
            machine.memory,
            machine.kernel,
        );
        let _ = writeln!(md, "### Goals\n");
        let _ = writeln!(md, "| goal | measured | status |\n|---|---|---|");
        for (goal, measured, met) in self.goals() {
            let _ = writeln!(md, "| {goal} | {measured} | {} |", verdict(met));
        }
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
        for (label, phase) in [("paced", &self.pods.paced), ("burst", &self.pods.burst)] {
            for (step, s) in [
                ("create → Running", &phase.running),
                ("create → bound", &phase.bound),
                ("bound → IP reported", &phase.ip),
                ("IP reported → Running", &phase.started),
            ] {
                let _ = writeln!(
                    md,
                    "| {label} | {step} | {} | {} | {} | {} |",
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
             100 ms through both phases.\n",
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
        let pod = |node: bool, ip: bool, running: bool| {
            let mut p = json!({"metadata": {"name": "p"}, "spec": {}, "status": {}});
            if node {
                p["spec"]["nodeName"] = json!("n1");
            }
            if ip {
                p["status"]["podIP"] = json!("10.244.0.2");
            }
            if running {
                p["status"]["phase"] = json!("Running");
            }
            p
        };
        tracker.observe("ADDED", &pod(false, false, false), t0);
        tracker.observe(
            "MODIFIED",
            &pod(true, false, false),
            t0 + Duration::from_millis(5),
        );
        tracker.observe(
            "MODIFIED",
            &pod(true, true, false),
            t0 + Duration::from_millis(50),
        );
        tracker.observe(
            "MODIFIED",
            &pod(true, true, true),
            t0 + Duration::from_millis(200),
        );
        // A later event does not move a milestone.
        tracker.observe(
            "MODIFIED",
            &pod(true, true, true),
            t0 + Duration::from_millis(900),
        );
        let phase = phase(&tracker, &["p".to_string()]);
        assert_eq!(phase.bound.0, vec![5_000]);
        assert_eq!(phase.ip.0, vec![45_000]);
        assert_eq!(phase.started.0, vec![150_000]);
        assert_eq!(phase.running.0, vec![200_000]);
        assert!(!tracker.get("p").deleted);
        tracker.observe(
            "DELETED",
            &pod(true, true, true),
            t0 + Duration::from_secs(1),
        );
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
}
