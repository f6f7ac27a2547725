//! `cargo xtask bench scheduler`: pods from Deployments onto hollow nodes, end to end.
//!
//! Builds `skiff-control` and `skiff-agent` in release, starts `skiff-control all` (API server
//! with its own etcd child, controller manager and scheduler in one process) on a free loopback
//! port with `--cluster-cidr 10.128.0.0/10` (room for 16,384 /24 node ranges), then
//! `skiff-agent --hollow` processes running `--nodes` hollow nodes, and waits until every node is
//! Ready with a pod CIDR. Then:
//!
//! - **load**: one watch on the bench namespace's pods is opened, then `--deployments`
//!   Deployments totalling `--pods` replicas are created at once. For each pod the watch records
//!   when it first saw the pod (ADDED: the precise creation time, `creationTimestamp` having
//!   1 s resolution), its first event with `spec.nodeName` set (bound) and its first with
//!   `status.phase` Running. Reported: pods/s from the first Deployment POST to the last pod
//!   bound and Running, the 10 %–90 % window rates of creation, binding (the scheduler's own
//!   rate) and Running, create→bound and create→Running percentiles, and the CPU time and peak
//!   RSS of every process;
//! - **churn**, once per step of `--churn-steps`: four more Deployments are scaled between 0 and
//!   the step in turn, one up and one down every `--churn-period-ms`, so that many pods are
//!   created and as many deleted per period on top of the loaded cluster, each pod living two
//!   periods. Reported per offered rate: the create→bound percentiles of those pods (a pod
//!   deleted before it was bound counts with its lifetime, a lower bound, and is reported), and
//!   whether the cluster kept up (every pod bound before it was deleted). Between two rates
//!   every churn pod is gone, so each rate's pods are those created after it started. The
//!   churn goal is judged at the highest offered rate the cluster kept up with: above it there
//!   is no steady state, the queue of pending pods grows for as long as the phase lasts.
//!
//! Every process is stopped and the temporary directory removed on exit, on error and on
//! Ctrl-C. The figures go to the `scheduler` section of BENCHMARKS.md.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::Args;
use http::header::{ACCEPT, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use skiff_tests::{ProcessGroup, free_port, tail};
use tokio::sync::oneshot;

use crate::bench::{
    BenchArgs, Client, Interrupts, Machine, STOP_GRACE, Sampler, Samples, Server, Target,
    child_named, cpu_time, machine_busy, mib, micros, wait_ready, write_section,
};
use crate::{cargo, run, say, target_dir};

/// The namespace the bench's Deployments and pods live in.
const NAMESPACE: &str = "bench";
/// The label telling the bench's two pod groups apart.
const GROUP_LABEL: &str = "skiff-bench/group";
/// The pod network: a /10 holds 16,384 /24 node ranges (the default /16 only 256).
const CLUSTER_CIDR: &str = "10.128.0.0/10";
/// Deployments the churn phase rotates through: one is scaled up and another (scaled up two
/// periods before) down each period.
const CHURN_DEPLOYMENTS: usize = 4;
/// How long the nodes get to register and become Ready with a pod CIDR.
const NODES_TIMEOUT: Duration = Duration::from_secs(300);
/// The load phase fails if no pod makes progress for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// After the last churn period, how long the churn pods get to be bound or deleted.
const CHURN_DRAIN: Duration = Duration::from_secs(30);
/// The goal: pods scheduled per second, first create to last bound.
const GOAL_PODS_PER_SECOND: f64 = 1000.0;
/// The goal: p99 create→bound under steady churn.
const GOAL_CHURN_P99: Duration = Duration::from_secs(1);

/// `cargo xtask bench scheduler` options.
#[derive(Debug, Clone, Args)]
pub struct SchedulerBenchArgs {
    /// Hollow nodes (scheduler bench).
    #[arg(long, default_value_t = 1000)]
    pub nodes: u32,
    /// skiff-agent processes the hollow nodes are split over (scheduler bench).
    #[arg(long, default_value_t = 1)]
    pub agents: u32,
    /// Pods of the load phase (scheduler bench).
    #[arg(long, default_value_t = 10_000)]
    pub pods: u32,
    /// Deployments the load phase's pods are split over (scheduler bench).
    #[arg(long, default_value_t = 10)]
    pub deployments: u32,
    /// Pods created (and as many deleted) per churn period, one churn phase per value, in
    /// this order (scheduler bench).
    #[arg(long, value_delimiter = ',', default_values_t = [100, 250, 500])]
    pub churn_steps: Vec<u32>,
    /// The churn period, in milliseconds (scheduler bench).
    #[arg(long, default_value_t = 1000)]
    pub churn_period_ms: u64,
    /// Churn periods; 0 skips the churn phase (scheduler bench).
    #[arg(long, default_value_t = 20)]
    pub churn_periods: u32,
    /// Longest the load phase may take, in seconds (scheduler bench).
    #[arg(long, default_value_t = 600)]
    pub load_timeout: u64,
}

/// Runs the scheduler bench.
pub fn scheduler(ws: &Path, args: &BenchArgs) -> Result<()> {
    let options = &args.scheduler;
    ensure!(options.nodes > 0, "--nodes must be at least 1");
    ensure!(
        (1..=options.nodes).contains(&options.agents),
        "--agents must be between 1 and --nodes"
    );
    ensure!(options.pods > 0, "--pods must be at least 1");
    ensure!(
        (1..=options.pods).contains(&options.deployments),
        "--deployments must be between 1 and --pods"
    );
    ensure!(
        options.churn_steps.iter().all(|&step| step > 0),
        "--churn-steps must each be at least 1"
    );
    ensure!(
        options.churn_period_ms > 0,
        "--churn-period-ms must be at least 1"
    );
    let started = Instant::now();
    say("cargo build --release -p skiff-control -p skiff-agent");
    run(cargo().current_dir(ws).args([
        "build",
        "--release",
        "-p",
        "skiff-control",
        "-p",
        "skiff-agent",
    ]))?;
    let release = target_dir(ws)?.join("release");
    let control_bin = release.join("skiff-control");
    let agent_bin = release.join("skiff-agent");
    for bin in [&control_bin, &agent_bin] {
        ensure!(bin.exists(), "{} was not built", bin.display());
    }
    let load_before = fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let dir = tempfile::Builder::new()
        .prefix("skiff-bench-scheduler-")
        .tempdir()
        .context("could not create a temporary directory")?;
    let data = dir.path().join("data");
    let kubeconfig = dir.path().join("admin.kubeconfig");
    let log = dir.path().join("control.log");
    let port = free_port();
    let log_file = fs::File::create(&log).context("could not create the server log")?;
    let mut cmd = Command::new(&control_bin);
    cmd.arg("all")
        .arg("--data-dir")
        .arg(&data)
        .args(["--bind-address", "127.0.0.1"])
        .arg("--secure-port")
        .arg(port.to_string())
        .arg("--write-kubeconfig")
        .arg(&kubeconfig)
        .args(["--cluster-cidr", CLUSTER_CIDR])
        .args(["--leader-elect", "false"])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    say(format!(
        "starting {} all on https://127.0.0.1:{port} (data in {})",
        control_bin.display(),
        data.display()
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the tokio runtime")?;
    let mut interrupts = {
        let _context = runtime.enter();
        Interrupts::install()?
    };
    let group = ProcessGroup::spawn(cmd)
        .with_context(|| format!("could not start {}", control_bin.display()))?;
    let mut server = Server {
        group: Some(group),
        log,
    };
    let mut agents = Agents {
        groups: Vec::new(),
        logs: Vec::new(),
    };
    let setup = Setup {
        data: &data,
        dir: dir.path(),
        kubeconfig: &kubeconfig,
        agent_bin: &agent_bin,
        port,
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = measure(&mut server, &mut agents, &setup, options) => Ok(result),
            signal = interrupts.recv() => Err(signal),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    let server_tail = server.log_tail();
    let agent_tail = agents.log_tail();
    say("stopping the hollow nodes and skiff-control");
    agents.stop();
    server.stop();
    drop(dir);
    let mut report = match outcome {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => bail!(
            "{e:#}\n--- skiff-control log (last lines) ---\n{server_tail}\n--- skiff-agent log (last lines) ---\n{agent_tail}"
        ),
        Err(signal) => {
            bail!("interrupted by {signal}; every process is stopped and its files removed")
        }
    };
    report.load_before = load_before
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");

    let machine = Machine::describe(ws);
    let markdown = report.markdown(&machine, options);
    println!("\n{markdown}");
    for (goal, measured, met) in report.goals() {
        say(format!(
            "goal {goal}: {measured}: {}",
            if met { "met" } else { "MISSED" }
        ));
    }
    if args.no_write {
        say("--no-write: BENCHMARKS.md left as it is");
    } else {
        write_section(ws, Target::Scheduler, &markdown)?;
    }
    say(format!(
        "bench finished in {:.0}s; every process is stopped and its files removed",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// What `measure` needs to start the agents and reach the server.
struct Setup<'a> {
    data: &'a Path,
    dir: &'a Path,
    kubeconfig: &'a Path,
    agent_bin: &'a Path,
    port: u16,
}

/// The hollow-node processes; stopped when dropped.
struct Agents {
    groups: Vec<ProcessGroup>,
    logs: Vec<PathBuf>,
}

impl Agents {
    fn log_tail(&self) -> String {
        self.logs
            .iter()
            .map(|log| tail(&fs::read_to_string(log).unwrap_or_default(), 20))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn check_running(&mut self) -> Result<()> {
        for (i, group) in self.groups.iter_mut().enumerate() {
            if let Some(status) = group.exited() {
                bail!("skiff-agent {i} exited with {status}");
            }
        }
        Ok(())
    }

    fn stop(&mut self) {
        for group in self.groups.drain(..) {
            group.terminate(STOP_GRACE);
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process whose CPU time and memory are measured.
#[derive(Debug, Clone)]
struct Proc {
    name: String,
    pid: u32,
}

/// CPU time and peak RSS of each measured process over one phase.
struct Usage {
    elapsed: Duration,
    /// Per process, in the order of the `Proc` list: CPU time and peak VmRSS (KiB).
    cpu: Vec<Duration>,
    peak_rss: Vec<u64>,
    /// The whole machine's busy CPU time.
    machine: Duration,
}

/// Measures CPU and memory of `procs` from `start` until `finish`.
struct Meter {
    procs: Vec<Proc>,
    cpu_before: Vec<Duration>,
    machine_before: Duration,
    started: Instant,
    sampler: Sampler,
}

impl Meter {
    fn start(procs: &[Proc]) -> Result<Meter> {
        let cpu_before = procs
            .iter()
            .map(|p| cpu_time(p.pid))
            .collect::<Result<Vec<_>>>()?;
        Ok(Meter {
            procs: procs.to_vec(),
            cpu_before,
            machine_before: machine_busy()?,
            started: Instant::now(),
            sampler: Sampler::start(procs.iter().map(|p| p.pid).collect()),
        })
    }

    fn finish(self) -> Result<Usage> {
        let elapsed = self.started.elapsed();
        let peak_rss = self.sampler.stop();
        let mut cpu = Vec::with_capacity(self.procs.len());
        for (p, before) in self.procs.iter().zip(&self.cpu_before) {
            cpu.push(cpu_time(p.pid)?.saturating_sub(*before));
        }
        Ok(Usage {
            elapsed,
            cpu,
            peak_rss,
            machine: machine_busy()?.saturating_sub(self.machine_before),
        })
    }
}

/// Everything the scheduler bench measured.
struct Report {
    nodes: u32,
    agents: u32,
    nodes_ready_after: Duration,
    procs: Vec<Proc>,
    load: LoadResult,
    /// One per `--churn-steps` value, in order.
    churn: Vec<ChurnResult>,
    /// `/proc/loadavg` before the bench started.
    load_before: String,
}

/// The load phase's figures.
struct LoadResult {
    deployments: u32,
    pods: u32,
    /// Pods seen, bound and Running by the end of the phase.
    seen: usize,
    bound: usize,
    running: usize,
    /// From the first Deployment POST to the last pod bound / Running.
    to_last_bound: Duration,
    to_last_running: Duration,
    /// 10 %–90 % window rates (pods/s): pods seen created, bound, Running.
    window_created: f64,
    window_bound: f64,
    window_running: f64,
    /// Latencies in µs from the ADDED event.
    create_to_bound: Samples,
    create_to_running: Samples,
    /// bound wall-clock time minus `creationTimestamp` (1 s resolution), in µs.
    timestamp_to_bound: Samples,
    usage: Usage,
}

/// The churn phase's figures.
struct ChurnResult {
    step: u32,
    period: Duration,
    periods: u32,
    created: usize,
    bound: usize,
    /// Pods deleted before they were bound (their lifetime is in `create_to_bound`).
    deleted_unbound: usize,
    /// Pods neither bound nor deleted when the drain ended (their wait so far is in
    /// `create_to_bound`).
    pending: usize,
    create_to_bound: Samples,
    create_to_running: Samples,
    usage: Usage,
}

/// Waits for the server and the nodes, then runs both phases.
async fn measure(
    server: &mut Server,
    agents: &mut Agents,
    setup: &Setup<'_>,
    options: &SchedulerBenchArgs,
) -> Result<Report> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, setup.port));
    let tls = wait_ready(server, &setup.data.join("pki"), addr).await?;
    let control_pid = server.group.as_ref().map_or(0, ProcessGroup::id);
    let etcd_pid = child_named(control_pid, "etcd")
        .with_context(|| format!("found no etcd child of skiff-control (pid {control_pid})"))?;
    // The kubeconfig is written once the server listens; the agents need it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !setup.kubeconfig.exists() {
        ensure!(
            Instant::now() < deadline,
            "{} was not written",
            setup.kubeconfig.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let node_started = Instant::now();
    let per_agent = options.nodes / options.agents;
    let mut procs = vec![
        Proc {
            name: "skiff-control".into(),
            pid: control_pid,
        },
        Proc {
            name: "etcd (child)".into(),
            pid: etcd_pid,
        },
    ];
    for i in 0..options.agents {
        let first = i * per_agent;
        let count = if i + 1 == options.agents {
            options.nodes - first
        } else {
            per_agent
        };
        let log = setup.dir.join(format!("agent-{i}.log"));
        let log_file = fs::File::create(&log).context("could not create an agent log")?;
        let mut cmd = Command::new(setup.agent_bin);
        cmd.arg("--hollow")
            .arg("--kubeconfig")
            .arg(setup.kubeconfig)
            .arg("--count")
            .arg(count.to_string())
            .arg("--first-index")
            .arg(first.to_string())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let group = ProcessGroup::spawn(cmd)
            .with_context(|| format!("could not start {}", setup.agent_bin.display()))?;
        procs.push(Proc {
            name: if options.agents == 1 {
                "skiff-agent".into()
            } else {
                format!("skiff-agent {i}")
            },
            pid: group.id(),
        });
        agents.groups.push(group);
        agents.logs.push(log);
    }
    procs.push(Proc {
        name: "load generator (xtask)".into(),
        pid: std::process::id(),
    });
    say(format!(
        "skiff-control pid {control_pid}, etcd pid {etcd_pid}; waiting for {} hollow nodes in {} agent(s)",
        options.nodes, options.agents
    ));

    let mut api = Client::tls(&tls, addr).await?;
    wait_nodes(&mut api, server, agents, options.nodes).await?;
    let nodes_ready_after = node_started.elapsed();
    say(format!(
        "{} nodes Ready with a pod CIDR after {:.1}s",
        options.nodes,
        nodes_ready_after.as_secs_f64()
    ));

    let body =
        format!(r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{NAMESPACE}"}}}}"#);
    api.expect(
        Method::POST,
        "/api/v1/namespaces",
        Some(body),
        StatusCode::CREATED,
    )
    .await
    .context("could not create the bench namespace")?;

    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let (started_tx, started_rx) = oneshot::channel();
    let watch = {
        let tracker = tracker.clone();
        let tls = tls.clone();
        tokio::spawn(async move { watch_pods(&tls, addr, &tracker, started_tx).await })
    };
    let watch = AbortOnDrop(watch);
    tokio::time::timeout(Duration::from_secs(30), started_rx)
        .await
        .context("the pod watch did not start in 30s")?
        .context("the pod watch failed to start")?;

    let load = load_phase(&mut api, server, agents, &tracker, &watch, &procs, options).await?;
    let mut churn = Vec::new();
    if options.churn_periods > 0 && !options.churn_steps.is_empty() {
        // The server closes keep-alive connections left idle through the load phase.
        api = Client::tls(&tls, addr).await?;
        create_churn_deployments(&mut api).await?;
        for &step in &options.churn_steps {
            let phase = Phase {
                tracker: &tracker,
                watch: &watch,
                procs: &procs,
            };
            churn.push(churn_phase(&mut api, server, agents, &phase, step, options).await?);
        }
    }
    Ok(Report {
        nodes: options.nodes,
        agents: options.agents,
        nodes_ready_after,
        procs,
        load,
        churn,
        load_before: String::new(),
    })
}

/// Polls the node list until `want` nodes are Ready and have a pod CIDR.
async fn wait_nodes(
    api: &mut Client,
    server: &mut Server,
    agents: &mut Agents,
    want: u32,
) -> Result<()> {
    let deadline = Instant::now() + NODES_TIMEOUT;
    let mut last = (0, 0);
    loop {
        server.check_running()?;
        agents.check_running()?;
        let list = api
            .expect(Method::GET, "/api/v1/nodes", None, StatusCode::OK)
            .await?;
        let list: NodeList = serde_json::from_slice(&list).context("the node list is not JSON")?;
        let registered = list.items.len();
        let ready = list.items.iter().filter(|n| n.usable()).count();
        if ready >= want as usize {
            return Ok(());
        }
        if (registered, ready) != last {
            say(format!(
                "nodes: {registered} registered, {ready} Ready with a pod CIDR"
            ));
            last = (registered, ready);
        }
        ensure!(
            Instant::now() < deadline,
            "only {ready} of {want} nodes were Ready with a pod CIDR after {NODES_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Creates the load Deployments and waits until every pod runs.
async fn load_phase(
    api: &mut Client,
    server: &mut Server,
    agents: &mut Agents,
    tracker: &Mutex<Tracker>,
    watch: &AbortOnDrop,
    procs: &[Proc],
    options: &SchedulerBenchArgs,
) -> Result<LoadResult> {
    let meter = Meter::start(procs)?;
    let first_post = Instant::now();
    let base = options.pods / options.deployments;
    for i in 0..options.deployments {
        let replicas = if i + 1 == options.deployments {
            options.pods - base * (options.deployments - 1)
        } else {
            base
        };
        api.expect(
            Method::POST,
            &format!("/apis/apps/v1/namespaces/{NAMESPACE}/deployments"),
            Some(deployment(&format!("load-{i}"), Group::Load, replicas)),
            StatusCode::CREATED,
        )
        .await
        .with_context(|| format!("could not create Deployment load-{i}"))?;
    }
    say(format!(
        "created {} Deployments, {} pods in all",
        options.deployments, options.pods
    ));
    let want = options.pods as usize;
    let deadline = first_post + Duration::from_secs(options.load_timeout);
    let mut last_progress = (Instant::now(), 0);
    let mut last_said = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.check_running()?;
        agents.check_running()?;
        watch.check()?;
        let (seen, bound, running) = tracker.lock().expect("tracker lock").counts(Group::Load);
        if running >= want {
            break;
        }
        let progress = seen + bound + running;
        if progress != last_progress.1 {
            last_progress = (Instant::now(), progress);
        }
        if last_said.elapsed() >= Duration::from_secs(2) {
            say(format!(
                "load: {seen} created, {bound} bound, {running} Running after {:.1}s",
                first_post.elapsed().as_secs_f64()
            ));
            last_said = Instant::now();
        }
        if last_progress.0.elapsed() >= STALL_TIMEOUT || Instant::now() >= deadline {
            say(format!(
                "load: gave up with {seen} created, {bound} bound, {running} Running"
            ));
            break;
        }
    }
    let usage = meter.finish()?;
    let tracker = tracker.lock().expect("tracker lock");
    let pods: Vec<&PodTimes> = tracker
        .pods
        .values()
        .filter(|p| p.group == Group::Load)
        .collect();
    let mut added: Vec<Instant> = pods.iter().map(|p| p.added).collect();
    let mut bound: Vec<Instant> = pods.iter().filter_map(|p| p.bound).collect();
    let mut running: Vec<Instant> = pods.iter().filter_map(|p| p.running).collect();
    let to_bound = pods
        .iter()
        .filter_map(|p| Some(micros_between(p.bound?, p.added)))
        .collect();
    let to_running = pods
        .iter()
        .filter_map(|p| Some(micros_between(p.running?, p.added)))
        .collect();
    let timestamp_to_bound = pods
        .iter()
        .filter_map(|p| {
            let wall = p.bound_wall?;
            let created = p.created?;
            Some(wall.duration_since(created).unwrap_or_default().as_micros() as i64)
        })
        .collect();
    let last = |times: &[Instant]| {
        times
            .iter()
            .max()
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(first_post))
    };
    Ok(LoadResult {
        deployments: options.deployments,
        pods: options.pods,
        seen: added.len(),
        bound: bound.len(),
        running: running.len(),
        to_last_bound: last(&bound),
        to_last_running: last(&running),
        window_created: window_rate(&mut added),
        window_bound: window_rate(&mut bound),
        window_running: window_rate(&mut running),
        create_to_bound: Samples::new(to_bound),
        create_to_running: Samples::new(to_running),
        timestamp_to_bound: Samples::new(timestamp_to_bound),
        usage,
    })
}

/// What a churn phase observes the cluster with.
struct Phase<'a> {
    tracker: &'a Mutex<Tracker>,
    watch: &'a AbortOnDrop,
    procs: &'a [Proc],
}

/// Creates the churn Deployments with no replicas.
async fn create_churn_deployments(api: &mut Client) -> Result<()> {
    for i in 0..CHURN_DEPLOYMENTS {
        api.expect(
            Method::POST,
            &format!("/apis/apps/v1/namespaces/{NAMESPACE}/deployments"),
            Some(deployment(&format!("churn-{i}"), Group::Churn, 0)),
            StatusCode::CREATED,
        )
        .await
        .with_context(|| format!("could not create Deployment churn-{i}"))?;
    }
    // Let the empty ReplicaSets appear before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

/// Scales the churn Deployments between 0 and `step` in turn, then measures the pods created
/// meanwhile, once every churn pod is gone again.
async fn churn_phase(
    api: &mut Client,
    server: &mut Server,
    agents: &mut Agents,
    phase: &Phase<'_>,
    step: u32,
    options: &SchedulerBenchArgs,
) -> Result<ChurnResult> {
    let Phase {
        tracker,
        watch,
        procs,
    } = *phase;
    let period = Duration::from_millis(options.churn_period_ms);
    say(format!(
        "churn: {} periods of {period:?}, {step} pods up and {step} down each",
        options.churn_periods
    ));
    let phase_started = Instant::now();
    let meter = Meter::start(procs)?;
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for k in 0..options.churn_periods as usize {
        ticks.tick().await;
        server.check_running()?;
        agents.check_running()?;
        watch.check()?;
        scale(api, &format!("churn-{}", k % CHURN_DEPLOYMENTS), step).await?;
        if k >= 2 {
            scale(api, &format!("churn-{}", (k + 2) % CHURN_DEPLOYMENTS), 0).await?;
        }
        if k % 5 == 4 {
            let (seen, bound, running) = tracker
                .lock()
                .expect("tracker lock")
                .counts_since(Group::Churn, phase_started);
            say(format!(
                "churn: period {}: {seen} created, {bound} bound, {running} Running so far",
                k + 1
            ));
        }
    }
    ticks.tick().await;
    for i in 0..CHURN_DEPLOYMENTS {
        scale(api, &format!("churn-{i}"), 0).await?;
    }
    let usage = meter.finish()?;
    // Wait until every churn pod is gone (all were scaled away), so that the next phase's pods
    // are exactly those created after it started.
    let deadline = Instant::now() + CHURN_DRAIN;
    while Instant::now() < deadline {
        let open = tracker
            .lock()
            .expect("tracker lock")
            .pods
            .values()
            .filter(|p| p.group == Group::Churn && p.gone.is_none())
            .count();
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tracker = tracker.lock().expect("tracker lock");
    let pods: Vec<&PodTimes> = tracker
        .pods
        .values()
        .filter(|p| p.group == Group::Churn && p.added >= phase_started)
        .collect();
    let mut to_bound = Vec::with_capacity(pods.len());
    let mut deleted_unbound = 0;
    let mut pending = 0;
    for p in &pods {
        match (p.bound, p.gone) {
            (Some(bound), _) => to_bound.push(micros_between(bound, p.added)),
            (None, Some(gone)) => {
                deleted_unbound += 1;
                to_bound.push(micros_between(gone, p.added));
            }
            // Still pending after the drain: counted with the time waited so far.
            (None, None) => {
                pending += 1;
                to_bound.push(micros_between(Instant::now(), p.added));
            }
        }
    }
    let to_running = pods
        .iter()
        .filter_map(|p| Some(micros_between(p.running?, p.added)))
        .collect();
    Ok(ChurnResult {
        step,
        period,
        periods: options.churn_periods,
        created: pods.len(),
        bound: pods.iter().filter(|p| p.bound.is_some()).count(),
        deleted_unbound,
        pending,
        create_to_bound: Samples::new(to_bound),
        create_to_running: Samples::new(to_running),
        usage,
    })
}

/// Sets a Deployment's replicas with a merge patch.
async fn scale(api: &mut Client, name: &str, replicas: u32) -> Result<()> {
    let path = format!("/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{name}");
    let request = Request::builder()
        .method(Method::PATCH)
        .uri(&path)
        .header(HOST, &api.host)
        .header(ACCEPT, "application/json")
        .header(CONTENT_TYPE, "application/merge-patch+json")
        .body(Full::new(Bytes::from(format!(
            r#"{{"spec":{{"replicas":{replicas}}}}}"#
        ))))
        .context("could not build a request")?;
    api.sender
        .ready()
        .await
        .with_context(|| format!("PATCH {path}: the connection closed"))?;
    let response = api
        .sender
        .send_request(request)
        .await
        .with_context(|| format!("PATCH {path} failed"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("PATCH {path}: reading the answer failed"))?
        .to_bytes();
    ensure!(
        status == StatusCode::OK,
        "PATCH {path} answered {status}: {}",
        String::from_utf8_lossy(&body[..body.len().min(500)])
    );
    Ok(())
}

/// A Deployment of `replicas` pause pods with small requests, labelled with `group`.
fn deployment(name: &str, group: Group, replicas: u32) -> String {
    serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, GROUP_LABEL: group.label()}},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{
                        "name": "pause",
                        "image": "registry.k8s.io/pause:3.10",
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                    }],
                },
            },
        },
    })
    .to_string()
}

/// Microseconds from `since` to `at` (0 if `at` is earlier).
fn micros_between(at: Instant, since: Instant) -> i64 {
    at.saturating_duration_since(since).as_micros() as i64
}

/// Events per second between the 10th and the 90th percentile of `times` (sorted in place).
fn window_rate(times: &mut [Instant]) -> f64 {
    times.sort_unstable();
    let n = times.len();
    if n < 10 {
        return 0.0;
    }
    let (low, high) = (n / 10, n * 9 / 10 - 1);
    let span = times[high]
        .saturating_duration_since(times[low])
        .as_secs_f64();
    if span <= 0.0 {
        return 0.0;
    }
    (high - low) as f64 / span
}

// ---- the pod watch -------------------------------------------------------------------------

/// Which phase a pod belongs to, from its [`GROUP_LABEL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Load,
    Churn,
}

impl Group {
    fn label(self) -> &'static str {
        match self {
            Group::Load => "load",
            Group::Churn => "churn",
        }
    }

    fn from_label(label: &str) -> Option<Group> {
        match label {
            "load" => Some(Group::Load),
            "churn" => Some(Group::Churn),
            _ => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// When the watch saw one pod's milestones.
struct PodTimes {
    group: Group,
    /// First event about the pod (ADDED): its creation, precisely.
    added: Instant,
    /// `metadata.creationTimestamp` (1 s resolution).
    created: Option<std::time::SystemTime>,
    /// First event with `spec.nodeName` set, and the wall-clock time then.
    bound: Option<Instant>,
    bound_wall: Option<std::time::SystemTime>,
    /// First event with `status.phase` Running.
    running: Option<Instant>,
    /// First event with `deletionTimestamp`, or DELETED.
    gone: Option<Instant>,
}

/// What the watch saw, by pod uid.
#[derive(Default)]
struct Tracker {
    pods: HashMap<String, PodTimes>,
    /// Per group: pods seen, bound, Running.
    seen: [usize; 2],
    bound: [usize; 2],
    running: [usize; 2],
}

impl Tracker {
    fn counts(&self, group: Group) -> (usize, usize, usize) {
        let i = group.index();
        (self.seen[i], self.bound[i], self.running[i])
    }

    /// Pods of `group` first seen at `since` or later: seen, bound, Running.
    fn counts_since(&self, group: Group, since: Instant) -> (usize, usize, usize) {
        self.pods
            .values()
            .filter(|p| p.group == group && p.added >= since)
            .fold((0, 0, 0), |(seen, bound, running), p| {
                (
                    seen + 1,
                    bound + usize::from(p.bound.is_some()),
                    running + usize::from(p.running.is_some()),
                )
            })
    }

    fn observe(
        &mut self,
        kind: &str,
        pod: &WatchPod<'_>,
        at: Instant,
        wall: std::time::SystemTime,
    ) {
        let Some(group) = pod
            .metadata
            .labels
            .get(GROUP_LABEL)
            .and_then(|g| Group::from_label(g))
        else {
            return;
        };
        let Some(uid) = pod.metadata.uid else {
            return;
        };
        let i = group.index();
        let entry = self.pods.entry(uid.to_owned()).or_insert_with(|| {
            self.seen[i] += 1;
            PodTimes {
                group,
                added: at,
                created: pod
                    .metadata
                    .creation_timestamp
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .map(std::time::SystemTime::from),
                bound: None,
                bound_wall: None,
                running: None,
                gone: None,
            }
        });
        if entry.bound.is_none() && pod.spec.node_name.is_some_and(|n| !n.is_empty()) {
            entry.bound = Some(at);
            entry.bound_wall = Some(wall);
            self.bound[i] += 1;
        }
        if entry.running.is_none() && pod.status.phase == Some("Running") {
            entry.running = Some(at);
            self.running[i] += 1;
        }
        if entry.gone.is_none() && (kind == "DELETED" || pod.metadata.deletion_timestamp.is_some())
        {
            entry.gone = Some(at);
        }
    }
}

/// A watch event, only the fields the bench reads.
#[derive(Deserialize)]
struct WatchEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    object: WatchPod<'a>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WatchPod<'a> {
    #[serde(borrow)]
    metadata: WatchMeta<'a>,
    #[serde(borrow)]
    spec: WatchSpec<'a>,
    #[serde(borrow)]
    status: WatchStatus<'a>,
    /// Of an ERROR event's Status.
    code: Option<u16>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct WatchMeta<'a> {
    #[serde(borrow)]
    uid: Option<&'a str>,
    #[serde(borrow)]
    resource_version: Option<&'a str>,
    #[serde(borrow)]
    creation_timestamp: Option<&'a str>,
    #[serde(borrow)]
    deletion_timestamp: Option<&'a str>,
    #[serde(borrow)]
    labels: HashMap<&'a str, &'a str>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct WatchSpec<'a> {
    #[serde(borrow)]
    node_name: Option<&'a str>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WatchStatus<'a> {
    #[serde(borrow)]
    phase: Option<&'a str>,
}

/// The node list, only what readiness needs.
#[derive(Deserialize)]
struct NodeList {
    items: Vec<NodeItem>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NodeItem {
    spec: NodeSpec,
    status: NodeStatus,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NodeSpec {
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NodeStatus {
    conditions: Vec<NodeCondition>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NodeCondition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

impl NodeItem {
    /// Ready, with a pod CIDR (hollow nodes start their pods only then).
    fn usable(&self) -> bool {
        self.spec.pod_cidr.as_deref().is_some_and(|c| !c.is_empty())
            && self
                .status
                .conditions
                .iter()
                .any(|c| c.kind == "Ready" && c.status == "True")
    }
}

/// The watch task; aborted when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<Result<()>>);

impl AbortOnDrop {
    /// Fails if the watch task ended (it only ends on an error).
    fn check(&self) -> Result<()> {
        ensure!(!self.0.is_finished(), "the pod watch stopped");
        Ok(())
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches the bench namespace's pods, recording each pod's milestones in `tracker`; reconnects
/// from the last resourceVersion when the server ends the watch.
async fn watch_pods(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    tracker: &Mutex<Tracker>,
    started: oneshot::Sender<()>,
) -> Result<()> {
    let mut started = Some(started);
    let mut resource_version: Option<String> = None;
    loop {
        let path = match &resource_version {
            // No resourceVersion: the current pods first (none yet), then changes.
            None => format!("/api/v1/namespaces/{NAMESPACE}/pods?watch=1"),
            Some(rv) => format!("/api/v1/namespaces/{NAMESPACE}/pods?watch=1&resourceVersion={rv}"),
        };
        let mut client = Client::tls(tls, addr).await?;
        let request = client.request(Method::GET, &path, None)?;
        client
            .sender
            .ready()
            .await
            .context("the watch connection closed")?;
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
        if let Some(tx) = started.take() {
            let _ = tx.send(());
        }
        let mut body = response.into_body();
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the pod watch broke")?;
            let at = Instant::now();
            let wall = std::time::SystemTime::now();
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buffer.extend_from_slice(&data);
            let mut consumed = 0;
            {
                let mut tracker = tracker.lock().expect("tracker lock");
                while let Some(end) = buffer[consumed..].iter().position(|b| *b == b'\n') {
                    let line = buffer[consumed..consumed + end].trim_ascii();
                    consumed += end + 1;
                    if line.is_empty() {
                        continue;
                    }
                    let event: WatchEvent<'_> =
                        serde_json::from_slice(line).with_context(|| {
                            format!(
                                "a pod watch event is not what was expected: {}",
                                String::from_utf8_lossy(&line[..line.len().min(300)])
                            )
                        })?;
                    match event.kind {
                        "ADDED" | "MODIFIED" | "DELETED" => {
                            tracker.observe(event.kind, &event.object, at, wall);
                        }
                        "BOOKMARK" => {}
                        "ERROR" if event.object.code == Some(410) => {
                            // Too old: start over from the current state.
                            resource_version = None;
                            continue;
                        }
                        _ => bail!(
                            "the pod watch sent {}",
                            String::from_utf8_lossy(&line[..line.len().min(300)])
                        ),
                    }
                    if let Some(rv) = event.object.metadata.resource_version {
                        resource_version = Some(rv.to_owned());
                    }
                }
            }
            buffer.drain(..consumed);
        }
        say("the pod watch ended; watching again from the last resourceVersion");
    }
}

// ---- output --------------------------------------------------------------------------------

impl Report {
    /// Pods per second from the first Deployment POST to the last pod bound.
    fn scheduled_per_second(&self) -> f64 {
        self.load.bound as f64 / self.load.to_last_bound.as_secs_f64().max(1e-9)
    }

    /// The goals: (goal, measured, met).
    fn goals(&self) -> Vec<(String, String, bool)> {
        let load = &self.load;
        let complete = load.bound == load.pods as usize;
        let mut goals = vec![(
            format!(
                "scheduled pods/s (first Deployment created → last pod bound) ≥ {GOAL_PODS_PER_SECOND:.0}"
            ),
            format!(
                "{:.0} pods/s ({} of {} pods bound in {:.1} s; kube-scheduler publishes 100–300)",
                self.scheduled_per_second(),
                load.bound,
                load.pods,
                load.to_last_bound.as_secs_f64()
            ),
            complete && self.scheduled_per_second() >= GOAL_PODS_PER_SECOND,
        )];
        if !self.churn.is_empty() {
            let goal = format!(
                "p99 create→bound at steady churn < {} s (at the highest offered rate the \
                 cluster kept up with)",
                GOAL_CHURN_P99.as_secs()
            );
            let others = |judged: Option<&ChurnResult>| {
                self.churn
                    .iter()
                    .filter(|c| judged.is_none_or(|j| !std::ptr::eq(*c, j)))
                    .map(|c| {
                        format!(
                            "{} at {}/s{}",
                            micros(c.create_to_bound.percentile(99.0)),
                            c.offered_per_second(),
                            if c.kept_up() { "" } else { ", not kept up" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            match judged_churn(&self.churn) {
                Some(churn) => {
                    let p99 = churn.create_to_bound.percentile(99.0);
                    let rest = others(Some(churn));
                    goals.push((
                        goal,
                        format!(
                            "{} at {} pods/s offered{}",
                            micros(p99),
                            churn.offered_per_second(),
                            if rest.is_empty() {
                                String::new()
                            } else {
                                format!(" (other rates: {rest})")
                            }
                        ),
                        p99 < GOAL_CHURN_P99.as_micros() as i64,
                    ));
                }
                None => goals.push((
                    goal,
                    format!(
                        "the cluster kept up with no offered rate ({})",
                        others(None)
                    ),
                    false,
                )),
            }
        }
        goals
    }

    /// The BENCHMARKS.md section (between the markers).
    fn markdown(&self, machine: &Machine, options: &SchedulerBenchArgs) -> String {
        let mut md = String::new();
        let load = &self.load;
        let _ = writeln!(md, "## Scheduler (`cargo xtask bench scheduler`)\n");
        let _ = writeln!(
            md,
            "{} Load average before the \
             run {}. Release build; `skiff-control all` (API server with its own etcd child, \
             controller manager and scheduler in one process, `--cluster-cidr {CLUSTER_CIDR}`) \
             and {} hollow nodes in {} `skiff-agent --hollow` process(es) (4 CPU, 16 GiB, 110 \
             pods each; Leases renewed every 10 s), all on this machine together with the load \
             generator, which watches the bench namespace's pods over one HTTPS connection. The \
             nodes were Ready with a pod CIDR {:.1} s after the agent started.\n",
            machine.last_run(),
            self.load_before,
            self.nodes,
            self.agents,
            self.nodes_ready_after.as_secs_f64(),
        );
        let _ = writeln!(md, "### Goals\n");
        md.push_str(&crate::bench::goals_table(&self.goals()));
        let _ = writeln!(
            md,
            "\n### Load: {} pods from {} Deployments at once\n\n\
             Create = when the watch first saw the pod (its ADDED event). Overall rates run from \
             the first Deployment POST to the last pod bound / Running; window rates between the \
             10th and the 90th percentile of the milestone (the binding window rate is the \
             scheduler's own).\n",
            load.pods, load.deployments
        );
        let _ = writeln!(
            md,
            "| pods | created | bound | Running | overall → bound | overall → Running | window created/s | window bound/s | window Running/s |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0}/s ({:.1} s) | {:.0}/s ({:.1} s) | {:.0} | {:.0} | {:.0} |\n",
            load.pods,
            load.seen,
            load.bound,
            load.running,
            load.bound as f64 / load.to_last_bound.as_secs_f64().max(1e-9),
            load.to_last_bound.as_secs_f64(),
            load.running as f64 / load.to_last_running.as_secs_f64().max(1e-9),
            load.to_last_running.as_secs_f64(),
            load.window_created,
            load.window_bound,
            load.window_running,
        );
        let _ = writeln!(
            md,
            "| latency | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|"
        );
        let row = |md: &mut String, name: &str, s: &Samples| {
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {} |",
                micros(s.percentile(50.0)),
                micros(s.percentile(90.0)),
                micros(s.percentile(99.0)),
                micros(s.max())
            );
        };
        row(&mut md, "create → bound", &load.create_to_bound);
        row(&mut md, "create → Running", &load.create_to_running);
        row(
            &mut md,
            "creationTimestamp → bound (1 s resolution)",
            &load.timestamp_to_bound,
        );
        let _ = writeln!(md);
        usage_table(&mut md, &self.procs, &load.usage);
        for churn in &self.churn {
            let _ = writeln!(
                md,
                "\n### Steady churn: {} pods/s offered\n\n\
                 On top of the {} load pods, {} Deployments are scaled between 0 and {} in turn: \
                 every {} ms one goes up and the one scaled up two periods before goes down, for \
                 {} periods ({} pods created and as many deleted per period, each living about \
                 two periods). {} churn pods were created, {} bound; {} were deleted before being \
                 bound (they count with their lifetime, a lower bound) and {} were still pending \
                 {} s after the last period. The cluster {}.\n",
                churn.offered_per_second(),
                load.pods,
                CHURN_DEPLOYMENTS,
                churn.step,
                churn.period.as_millis(),
                churn.periods,
                churn.step,
                churn.created,
                churn.bound,
                churn.deleted_unbound,
                churn.pending,
                CHURN_DRAIN.as_secs(),
                if churn.kept_up() {
                    "kept up: every pod was bound before it was deleted"
                } else {
                    "did not keep up: pods were still pending when they were deleted"
                },
            );
            let _ = writeln!(
                md,
                "| latency | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|"
            );
            row(&mut md, "create → bound", &churn.create_to_bound);
            row(&mut md, "create → Running", &churn.create_to_running);
            let _ = writeln!(md);
            usage_table(&mut md, &self.procs, &churn.usage);
        }
        let _ = writeln!(
            md,
            "\nOptions: `--nodes {} --agents {} --pods {} --deployments {} --churn-steps {} \
             --churn-period-ms {} --churn-periods {}`.",
            options.nodes,
            options.agents,
            options.pods,
            options.deployments,
            options
                .churn_steps
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            options.churn_period_ms,
            options.churn_periods
        );
        md
    }
}

/// The churn phase the goal is judged on: the highest offered rate the cluster kept up with.
fn judged_churn(churn: &[ChurnResult]) -> Option<&ChurnResult> {
    churn
        .iter()
        .filter(|c| c.kept_up())
        .max_by(|a, b| a.offered().total_cmp(&b.offered()))
}

impl ChurnResult {
    /// Pods created (and as many deleted) per second.
    fn offered(&self) -> f64 {
        f64::from(self.step) / self.period.as_secs_f64().max(1e-9)
    }

    fn offered_per_second(&self) -> String {
        format!("{:.0}", self.offered())
    }

    /// Whether the scheduler kept up: every pod created was bound before it was deleted.
    fn kept_up(&self) -> bool {
        self.created > 0 && self.deleted_unbound == 0 && self.pending == 0
    }
}

/// CPU and memory per process over a phase.
fn usage_table(md: &mut String, procs: &[Proc], usage: &Usage) {
    let elapsed = usage.elapsed.as_secs_f64().max(1e-9);
    let _ = writeln!(
        md,
        "Resources over the phase ({:.1} s; the machine was busy {:.2} CPUs on average):\n",
        elapsed,
        usage.machine.as_secs_f64() / elapsed
    );
    let _ = writeln!(
        md,
        "| process | CPU time | CPUs (average) | peak RSS |\n|---|---:|---:|---:|"
    );
    for (i, p) in procs.iter().enumerate() {
        let cpu = usage.cpu.get(i).copied().unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {:.1} s | {:.2} | {} |",
            p.name,
            cpu.as_secs_f64(),
            cpu.as_secs_f64() / elapsed,
            mib(usage.peak_rss.get(i).copied().unwrap_or(0))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn churn(step: u32, deleted_unbound: usize, pending: usize) -> ChurnResult {
        ChurnResult {
            step,
            period: Duration::from_secs(1),
            periods: 20,
            created: 20 * step as usize,
            bound: 20 * step as usize - deleted_unbound - pending,
            deleted_unbound,
            pending,
            create_to_bound: Samples::new(vec![1000]),
            create_to_running: Samples::new(vec![2000]),
            usage: Usage {
                elapsed: Duration::from_secs(20),
                cpu: Vec::new(),
                peak_rss: Vec::new(),
                machine: Duration::ZERO,
            },
        }
    }

    #[test]
    fn the_churn_goal_is_judged_at_the_highest_rate_kept_up_with() {
        let phases = [churn(100, 0, 0), churn(250, 0, 0), churn(500, 12, 0)];
        let judged = judged_churn(&phases).expect("two rates were kept up with");
        assert_eq!(judged.step, 250, "500/s lost pods, so 250/s is judged");
        let phases = [churn(100, 0, 3), churn(250, 4, 0)];
        assert!(
            judged_churn(&phases).is_none(),
            "pods still pending after the drain, or deleted unbound: not kept up"
        );
        assert!(!churn(0, 0, 0).kept_up(), "no pods: nothing was shown");
    }

    #[test]
    fn window_rate_counts_between_the_deciles() {
        let start = Instant::now();
        // 100 events 10 ms apart: 100/s.
        let mut times: Vec<Instant> = (0..100)
            .rev()
            .map(|i| start + Duration::from_millis(10 * i))
            .collect();
        let rate = window_rate(&mut times);
        assert!((rate - 100.0).abs() < 0.5, "rate {rate}");
        assert_eq!(window_rate(&mut [start; 3]), 0.0, "too few samples");
        assert_eq!(window_rate(&mut [start; 20]), 0.0, "no time span");
    }

    #[test]
    fn the_tracker_records_each_milestone_once() {
        let mut tracker = Tracker::default();
        let t0 = Instant::now();
        let wall = std::time::SystemTime::now();
        let event = |json: &str| json.to_owned();
        let added = event(
            r#"{"type":"ADDED","object":{"kind":"Pod","metadata":{"name":"a","uid":"u1","resourceVersion":"5","creationTimestamp":"2026-01-01T00:00:00Z","labels":{"skiff-bench/group":"load"}},"spec":{"containers":[]},"status":{"phase":"Pending"}}}"#,
        );
        let bound = event(
            r#"{"type":"MODIFIED","object":{"metadata":{"uid":"u1","labels":{"skiff-bench/group":"load"}},"spec":{"nodeName":"hollow-1"},"status":{"phase":"Pending"}}}"#,
        );
        let running = event(
            r#"{"type":"MODIFIED","object":{"metadata":{"uid":"u1","labels":{"skiff-bench/group":"load"}},"spec":{"nodeName":"hollow-1"},"status":{"phase":"Running"}}}"#,
        );
        let other = event(
            r#"{"type":"ADDED","object":{"metadata":{"uid":"u2","labels":{"app":"x"}},"spec":{},"status":{}}}"#,
        );
        for (i, line) in [&added, &bound, &running, &running, &other]
            .into_iter()
            .enumerate()
        {
            let e: WatchEvent<'_> = serde_json::from_str(line).expect("event parses");
            tracker.observe(
                e.kind,
                &e.object,
                t0 + Duration::from_millis(i as u64),
                wall,
            );
        }
        assert_eq!(tracker.counts(Group::Load), (1, 1, 1));
        assert_eq!(tracker.counts(Group::Churn), (0, 0, 0));
        assert_eq!(
            tracker.pods.len(),
            1,
            "pods without the group label are ignored"
        );
        let pod = &tracker.pods["u1"];
        assert_eq!(pod.added, t0);
        assert_eq!(pod.bound, Some(t0 + Duration::from_millis(1)));
        assert_eq!(pod.running, Some(t0 + Duration::from_millis(2)));
        assert!(pod.created.is_some(), "creationTimestamp parsed");
        assert!(pod.gone.is_none());

        let deleted = r#"{"type":"DELETED","object":{"metadata":{"uid":"u1","labels":{"skiff-bench/group":"load"}},"spec":{"nodeName":"hollow-1"},"status":{"phase":"Running"}}}"#;
        let e: WatchEvent<'_> = serde_json::from_str(deleted).expect("event parses");
        tracker.observe(e.kind, &e.object, t0 + Duration::from_millis(9), wall);
        assert_eq!(tracker.pods["u1"].gone, Some(t0 + Duration::from_millis(9)));
        let error = r#"{"type":"ERROR","object":{"kind":"Status","code":410,"metadata":{}}}"#;
        let e: WatchEvent<'_> = serde_json::from_str(error).expect("error event parses");
        assert_eq!(e.object.code, Some(410));
    }

    #[test]
    fn nodes_are_usable_when_ready_with_a_pod_cidr() {
        let list: NodeList = serde_json::from_str(
            r#"{"items":[
                {"spec":{"podCIDR":"10.128.0.0/24"},"status":{"conditions":[{"type":"Ready","status":"True"}]}},
                {"spec":{},"status":{"conditions":[{"type":"Ready","status":"True"}]}},
                {"spec":{"podCIDR":"10.128.1.0/24"},"status":{"conditions":[{"type":"Ready","status":"False"}]}},
                {"metadata":{"name":"x"}}
            ]}"#,
        )
        .expect("node list parses");
        let usable: Vec<bool> = list.items.iter().map(NodeItem::usable).collect();
        assert_eq!(usable, vec![true, false, false, false]);
    }

    #[test]
    fn deployments_carry_the_group_label_and_replicas() {
        let d: serde_json::Value =
            serde_json::from_str(&deployment("load-3", Group::Load, 250)).expect("json");
        assert_eq!(d["spec"]["replicas"], 250);
        assert_eq!(d["spec"]["selector"]["matchLabels"]["app"], "load-3");
        assert_eq!(
            d["spec"]["template"]["metadata"]["labels"][GROUP_LABEL],
            "load"
        );
    }
}
