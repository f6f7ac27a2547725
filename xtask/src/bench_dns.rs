//! `cargo xtask bench dns`: the cluster DNS against Debian's dnsmasq, from a pod, with 10,000
//! Services in the cluster.
//!
//! Builds the release binaries and the busybox image, then `skiffctl up --nodes 1
//! --dns-upstream 10.90.0.200` and, in namespace `bench`, a client pod (busybox `sleep`: only
//! its network namespace is used) and 10,000 Services with an EndpointSlice of 10 endpoints
//! each, through the API. dnsmasq runs in the outside namespace `skiff-ext` (10.90.0.200:53),
//! serving the same 10,000 names (`svc-<i>.bench.svc.cluster.local`, their ClusterIPs) and
//! the external name `external.bench.test` from a hosts file: it is both the cluster DNS's
//! upstream for the external name and the yardstick.
//!
//! From threads in the client pod's network namespace, for each server (the cluster DNS at
//! the `kube-dns` ClusterIP 10.96.0.10; dnsmasq at the ClusterIP of a Service `dnsmasq` whose
//! EndpointSlice is its address: both through the node's datapath)
//! and each kind of name (a cluster name picked at random among the 10,000 for each query; the
//! external name, which the cluster DNS answers from its cache after the first query):
//!
//! - **paced**: [`RATE`] queries a second for [`PACED`], sent on schedule by one thread and
//!   received by another (a slow answer does not delay the next query), each timed from its
//!   send to its answer;
//! - **flat out**: [`THREADS`] threads, each sending a query as soon as it has the answer to
//!   the last, for [`FLAT_OUT`]: the queries per second the server answers.
//!
//! Then the cluster DNS process's VmRSS. The cluster and dnsmasq are removed on exit, on error
//! and on Ctrl-C. The figures go to the `dns` section of BENCHMARKS.md.

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::bench::{BenchArgs, Machine, Samples, Target, client_tls, mib, micros, vm_rss_kib};
use crate::bench_pods::LocalCluster;
use crate::say;

/// Services in the cluster.
const SERVICES: usize = 10_000;
/// The namespace of the bench's objects (the services bench's helpers create them there).
const NAMESPACE: &str = "bench";
/// The cluster DNS Service's address.
const CLUSTER_DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);
/// dnsmasq's address, in `skiff-ext`.
const DNSMASQ: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 90, 0, 200), 53);
/// The external name, and its address in dnsmasq's hosts file.
const EXTERNAL: (&str, Ipv4Addr) = ("external.bench.test", Ipv4Addr::new(192, 0, 2, 80));
/// Queries a second of the paced runs.
const RATE: u32 = 1_000;
/// How long a paced run lasts.
const PACED: Duration = Duration::from_secs(5);
/// Threads of the flat-out runs.
const THREADS: usize = 4;
/// How long a flat-out run lasts.
const FLAT_OUT: Duration = Duration::from_secs(4);
/// A query unanswered after this is lost.
const TIMEOUT: Duration = Duration::from_millis(500);

/// Runs the bench: see the module docs.
pub fn dns(ws: &Path, args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    let (bin, image) = crate::bench_pods::release_cluster_binaries(ws, "dns")?;
    let upstream = DNSMASQ.ip().to_string();
    let cluster = LocalCluster::up_with(
        &bin.join("skiffctl"),
        &image,
        1,
        &["--dns-upstream", &upstream],
    )?;
    let outcome = measure(&cluster);
    drop(cluster);
    let report = outcome?;
    let md = report.markdown(&Machine::describe(ws));
    crate::bench::publish(ws, args, Target::Dns, &md, started, "the cluster is down")
}

/// dnsmasq in the outside namespace; killed when dropped.
struct Dnsmasq {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// dnsmasq on [`DNSMASQ`] in `netns`, answering `hosts` (`address name` lines) and NXDOMAIN
    /// for everything else.
    fn start(netns: &str, hosts: &str) -> Result<Dnsmasq> {
        let dir = tempfile::tempdir().context("a directory for dnsmasq")?;
        let file = dir.path().join("hosts");
        fs::write(&file, hosts).context("dnsmasq's hosts file")?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "dnsmasq", "--keep-in-foreground"])
            .args([
                "--no-resolv",
                "--no-hosts",
                "--local=/#/",
                "--bind-interfaces",
            ])
            .arg(format!("--listen-address={}", DNSMASQ.ip()))
            .arg(format!("--addn-hosts={}", file.display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg("--log-facility=-")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start dnsmasq (cargo xtask setup installs dnsmasq-base)")?;
        Ok(Dnsmasq { child, _dir: dir })
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DNS query for the A record of `name`, with `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend(id.to_be_bytes());
    // Recursion desired; one question.
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).unwrap_or(63));
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    q
}

/// The id of an answer, and whether it is a NOERROR with at least one answer record.
fn answer(bytes: &[u8]) -> Option<(u16, bool)> {
    if bytes.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    let ok = bytes[3] & 0x0f == 0 && u16::from_be_bytes([bytes[6], bytes[7]]) > 0;
    Some((id, ok))
}

/// A name for query `n`: a cluster name picked at random, or the external name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Names {
    Cluster,
    External,
}

impl Names {
    fn pick(self, rng: &mut u64) -> String {
        match self {
            Names::Cluster => {
                *rng ^= *rng << 13;
                *rng ^= *rng >> 7;
                *rng ^= *rng << 17;
                format!(
                    "svc-{}.{NAMESPACE}.svc.cluster.local",
                    *rng % SERVICES as u64
                )
            }
            Names::External => EXTERNAL.0.to_owned(),
        }
    }
}

/// What a run measured.
struct Run {
    /// Answered queries.
    answered: usize,
    /// Queries lost or answered with an error.
    failed: usize,
    wall: Duration,
    latency: Samples,
}

impl Run {
    fn per_second(&self) -> f64 {
        self.answered as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// A UDP socket in the network namespace `netns`, connected to `server`, with the read timeout.
fn socket(netns: &Path, server: SocketAddrV4) -> std::io::Result<UdpSocket> {
    skiff_tests::netns::enter_path(netns)?;
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    Ok(socket)
}

/// [`RATE`] queries a second for [`PACED`]: one thread sends on schedule, another receives.
fn paced(netns: &Path, server: SocketAddrV4, names: Names) -> Result<Run> {
    let (tx, rx) = std::sync::mpsc::channel();
    let netns_owned = netns.to_path_buf();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..=u16::MAX).map(|_| AtomicU64::new(0)).collect());
    let origin = Instant::now();
    let total = (u64::from(RATE) * PACED.as_secs()) as usize;
    let sender = {
        let sent = sent.clone();
        thread::spawn(move || -> std::io::Result<()> {
            let socket = socket(&netns_owned, server)?;
            let _ = tx.send(socket.try_clone()?);
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            let interval = Duration::from_secs(1) / RATE;
            let start = Instant::now() + Duration::from_millis(20);
            for n in 0..total {
                let due = start + interval * u32::try_from(n).unwrap_or(u32::MAX);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
                let id = (n % 65_536) as u16;
                let q = query(id, &names.pick(&mut rng));
                sent[usize::from(id)].store(
                    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX),
                    Ordering::Release,
                );
                let _ = socket.send(&q);
            }
            Ok(())
        })
    };
    let socket = rx.recv().context("the sender could not open its socket")?;
    let begin = Instant::now();
    let mut latencies = Vec::with_capacity(total);
    let mut failed = 0;
    let mut buf = [0u8; 1500];
    let deadline = begin + PACED + Duration::from_secs(1);
    while latencies.len() + failed < total && Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let now = u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
                match answer(&buf[..n]) {
                    Some((id, true)) => {
                        let at = sent[usize::from(id)].load(Ordering::Acquire);
                        latencies.push(
                            i64::try_from(now.saturating_sub(at) / 1_000).unwrap_or(i64::MAX),
                        );
                    }
                    _ => failed += 1,
                }
            }
            Err(_) => continue,
        }
    }
    let wall = begin.elapsed();
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sender panicked"))?
        .context("the sender failed")?;
    failed += total.saturating_sub(latencies.len() + failed);
    Ok(Run {
        answered: latencies.len(),
        failed,
        wall,
        latency: Samples::new(latencies),
    })
}

/// [`THREADS`] threads, each with one query outstanding, for [`FLAT_OUT`].
fn flat_out(netns: &Path, server: SocketAddrV4, names: Names) -> Result<Run> {
    let start = Instant::now();
    let deadline = start + FLAT_OUT;
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let netns = netns.to_path_buf();
            thread::spawn(move || -> std::io::Result<(Vec<i64>, usize)> {
                let socket = socket(&netns, server)?;
                let mut rng = 0x2545_f491_4f6c_dd1d ^ (t as u64 + 1);
                let (mut latencies, mut failed) = (Vec::new(), 0);
                let mut buf = [0u8; 1500];
                let mut id: u16 = 0;
                while Instant::now() < deadline {
                    id = id.wrapping_add(1);
                    let sent = Instant::now();
                    socket.send(&query(id, &names.pick(&mut rng)))?;
                    loop {
                        match socket.recv(&mut buf).map(|n| answer(&buf[..n])) {
                            Ok(Some((got, ok))) if got == id => {
                                if ok {
                                    latencies.push(
                                        i64::try_from(sent.elapsed().as_micros())
                                            .unwrap_or(i64::MAX),
                                    );
                                } else {
                                    failed += 1;
                                }
                                break;
                            }
                            Ok(_) => continue,
                            Err(_) => {
                                failed += 1;
                                break;
                            }
                        }
                    }
                }
                Ok((latencies, failed))
            })
        })
        .collect();
    let (mut all, mut failed) = (Vec::new(), 0);
    for (latencies, lost) in crate::bench::join_threads(threads, "query")? {
        all.extend(latencies);
        failed += lost;
    }
    Ok(Run {
        answered: all.len(),
        failed,
        wall: start.elapsed(),
        latency: Samples::new(all),
    })
}

/// One row: a server, a kind of name, its paced and flat-out runs.
struct Row {
    server: &'static str,
    names: Names,
    paced: Run,
    flat_out: Run,
}

struct Report {
    rows: Vec<Row>,
    rss_kib: u64,
    /// How long after the last Service's creation its name answered.
    synced_after: Duration,
}

fn measure(cluster: &LocalCluster) -> Result<Report> {
    let node = format!("{}-node-1", cluster.name);
    let run_dir = PathBuf::from("/run/skiff").join(&node);
    let tls = client_tls(&cluster.state_dir().join("control").join("pki"))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, cluster.port));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("could not start the tokio runtime")?;
    say(format!(
        "a client pod and {SERVICES} Services of 10 endpoints"
    ));
    let pods = runtime.block_on(crate::bench_services::running_pods(
        &tls,
        addr,
        &["client".to_owned()],
    ))?;
    let uid = pods["client"].0.clone();
    let client = run_dir.join("netns").join(uid);
    let backends: Vec<Ipv4Addr> = (1..=10).map(|i| Ipv4Addr::new(10, 244, 200, i)).collect();
    let ips = runtime.block_on(crate::bench_services::create_services(
        &tls, addr, 0, SERVICES, &backends,
    ))?;
    let created = Instant::now();
    // The cluster DNS has them all once the last one answers.
    let last = format!("svc-{}.{NAMESPACE}.svc.cluster.local", SERVICES - 1);
    let fabric = PathBuf::from("/run/netns").join(format!("skiff-{}-fabric", cluster.name));
    let own = SocketAddrV4::new(Ipv4Addr::new(10, 90, 0, 1), 53);
    let synced_after = loop {
        if ask_once(&fabric, own, last.clone()) {
            break created.elapsed();
        }
        ensure!(
            created.elapsed() < Duration::from_secs(60),
            "the cluster DNS does not answer {last} 60 s after it was created"
        );
        thread::sleep(Duration::from_millis(50));
    };
    let mut hosts = String::new();
    for (i, ip) in &ips {
        let _ = writeln!(hosts, "{ip} svc-{i}.{NAMESPACE}.svc.cluster.local");
    }
    let _ = writeln!(hosts, "{} {}", EXTERNAL.1, EXTERNAL.0);
    let _dnsmasq = Dnsmasq::start(&format!("skiff-{}-ext", cluster.name), &hosts)?;
    // dnsmasq is reached the way the cluster DNS is: through a ClusterIP of the node's datapath
    // (a Service without selector, its EndpointSlice dnsmasq's address), so that both answers
    // take the same path.
    let dnsmasq = runtime.block_on(yardstick_service(&tls, addr))?;
    // Both answer every kind of name before anything is measured (the cluster DNS's first
    // external answer fills its cache).
    for server in [CLUSTER_DNS, dnsmasq] {
        for names in [Names::Cluster, Names::External] {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if ask_once(&client, server, names.pick(&mut 1)) {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "{server} does not answer {names:?} names"
                );
                thread::sleep(Duration::from_millis(200));
            }
        }
    }
    let mut rows = Vec::new();
    for (server, label) in [(CLUSTER_DNS, "skiff"), (dnsmasq, "dnsmasq")] {
        for names in [Names::Cluster, Names::External] {
            crate::bench_services::wait_idle()?;
            say(format!("{label}: {names:?} names, {RATE}/s"));
            let paced = paced(&client, server, names)?;
            crate::bench_services::wait_idle()?;
            say(format!("{label}: {names:?} names, flat out"));
            let flat_out = flat_out(&client, server, names)?;
            println!(
                "{label:>8} {names:?}: paced p50 {} p99 {} ({} lost); flat out {:.0}/s p50 {} p99 {}",
                micros(paced.latency.percentile(50.0)),
                micros(paced.latency.percentile(99.0)),
                paced.failed,
                flat_out.per_second(),
                micros(flat_out.latency.percentile(50.0)),
                micros(flat_out.latency.percentile(99.0)),
            );
            rows.push(Row {
                server: label,
                names,
                paced,
                flat_out,
            });
        }
    }
    let state = cluster.state()?;
    let pid = state["processes"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["role"] == "cluster-dns"))
        .and_then(|p| p["pid"].as_u64())
        .and_then(|p| u32::try_from(p).ok())
        .context("no cluster-dns process in the state file")?;
    let rss_kib = vm_rss_kib(pid)?;
    Ok(Report {
        rows,
        rss_kib,
        synced_after,
    })
}

/// The Service `dnsmasq` (no selector; port 53/UDP; its EndpointSlice [`DNSMASQ`]): its
/// ClusterIP and port.
async fn yardstick_service(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> Result<SocketAddrV4> {
    use http::{Method, StatusCode};
    let mut api = crate::bench::Client::tls(tls, addr).await?;
    let (status, body) = api
        .send(
            Method::POST,
            &format!("/api/v1/namespaces/{NAMESPACE}/services"),
            Some(
                serde_json::json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "dnsmasq", "namespace": NAMESPACE},
                    "spec": {"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}})
                .to_string(),
            ),
        )
        .await?;
    ensure!(status == StatusCode::CREATED, "service dnsmasq: {status}");
    let ip: Ipv4Addr = serde_json::from_slice::<serde_json::Value>(&body)?["spec"]["clusterIP"]
        .as_str()
        .context("no clusterIP")?
        .parse()?;
    api.expect(
        Method::POST,
        &format!("/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"),
        Some(
            serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "dnsmasq-1", "namespace": NAMESPACE,
                             "labels": {"kubernetes.io/service-name": "dnsmasq"}},
                "addressType": "IPv4",
                "ports": [{"name": "dns", "port": DNSMASQ.port(), "protocol": "UDP"}],
                "endpoints": [{"addresses": [DNSMASQ.ip().to_string()], "conditions": {"ready": true}}]})
            .to_string(),
        ),
        StatusCode::CREATED,
    )
    .await?;
    Ok(SocketAddrV4::new(ip, 53))
}

/// Whether `server` answers one query for `name`, asked from the network namespace `netns`.
fn ask_once(netns: &Path, server: SocketAddrV4, name: String) -> bool {
    let netns = netns.to_path_buf();
    thread::spawn(move || {
        let Ok(socket) = socket(&netns, server) else {
            return false;
        };
        let _ = socket.send(&query(1, &name));
        let mut buf = [0u8; 1500];
        socket
            .recv(&mut buf)
            .ok()
            .and_then(|n| answer(&buf[..n]))
            .is_some_and(|(id, ok)| id == 1 && ok)
    })
    .join()
    .unwrap_or(false)
}

/// The goals of issue 16.
const GOAL_P99: Duration = Duration::from_millis(1);
const GOAL_RSS_KIB: u64 = 64 * 1024;

impl Report {
    fn row(&self, server: &str, names: Names) -> &Row {
        self.rows
            .iter()
            .find(|r| r.server == server && r.names == names)
            .expect("every row is measured")
    }

    fn goals(&self) -> Vec<(String, String, bool)> {
        let skiff = self.row("skiff", Names::Cluster);
        let dnsmasq = self.row("dnsmasq", Names::Cluster);
        let p99 = skiff.paced.latency.percentile(99.0);
        vec![
            (
                format!("cluster names p99 < 1 ms at {RATE} queries/s"),
                micros(p99),
                p99 < i64::try_from(GOAL_P99.as_micros()).unwrap_or(i64::MAX),
            ),
            (
                "cluster names answered at least as fast as dnsmasq answers them (flat out)".into(),
                format!(
                    "{:.0}/s vs {:.0}/s",
                    skiff.flat_out.per_second(),
                    dnsmasq.flat_out.per_second()
                ),
                skiff.flat_out.per_second() >= dnsmasq.flat_out.per_second(),
            ),
            (
                format!("the DNS server's RSS < 64 MiB with {SERVICES} Services"),
                mib(self.rss_kib),
                self.rss_kib < GOAL_RSS_KIB,
            ),
        ]
    }

    fn markdown(&self, machine: &Machine) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## DNS (`cargo xtask bench dns`)\n");
        let _ = writeln!(
            md,
            "{} Release build. `skiffctl up \
             --nodes 1 --dns-upstream {}`; {SERVICES} Services of 10 endpoints in the cluster; \
             queries (A, recursion desired, no EDNS) over UDP from threads in a client pod's \
             network namespace: to the cluster DNS at the `kube-dns` ClusterIP {} (through the \
             node's eBPF datapath to `skiff-control dns` in the fabric), and to Debian's dnsmasq \
             at {} in `skiff-ext` through a ClusterIP of its own (the same datapath), serving the same {SERVICES} names and the external name \
             `{}` from a hosts file (and the cluster DNS's upstream for that name). A cluster \
             name is one of the {SERVICES} picked at random per query; the external name is \
             always the same (the cluster DNS answers it from its cache). Paced: {RATE} \
             queries/s for {} s, sent on schedule, each timed from its send to its answer. Flat \
             out: {THREADS} threads, one query outstanding each, for {} s. Each run starts once \
             the machine is idle.\n",
            machine.last_run(),
            DNSMASQ.ip(),
            CLUSTER_DNS.ip(),
            DNSMASQ.ip(),
            EXTERNAL.0,
            PACED.as_secs(),
            FLAT_OUT.as_secs(),
        );
        let _ = writeln!(md, "### Goals\n");
        md.push_str(&crate::bench::goals_table(&self.goals()));
        let _ = writeln!(md, "\n### Queries\n");
        let _ = writeln!(
            md,
            "| server | names | paced p50 | paced p99 | paced lost | flat out queries/s | flat out p50 | flat out p99 | flat out lost |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for row in &self.rows {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} |",
                row.server,
                match row.names {
                    Names::Cluster => "cluster (random of 10,000)",
                    Names::External => "external (cached)",
                },
                micros(row.paced.latency.percentile(50.0)),
                micros(row.paced.latency.percentile(99.0)),
                row.paced.failed,
                row.flat_out.per_second(),
                micros(row.flat_out.latency.percentile(50.0)),
                micros(row.flat_out.latency.percentile(99.0)),
                row.flat_out.failed,
            );
        }
        let _ = writeln!(md, "\n### The server\n");
        let _ = writeln!(md, "| measure | value |\n|---|---|");
        let _ = writeln!(
            md,
            "| `skiff-control dns` VmRSS with {SERVICES} Services | {} |",
            mib(self.rss_kib)
        );
        let _ = writeln!(
            md,
            "| the last Service's name answered after its creation | {:.0} ms |",
            self.synced_after.as_secs_f64() * 1000.0
        );
        md
    }
}
