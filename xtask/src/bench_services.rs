//! `cargo xtask bench services`: skiff's eBPF service datapath against kube-proxy's iptables and
//! nftables rules and against no service at all, on a local one-node cluster.
//!
//! Builds the release binaries and the busybox image, then `skiffctl up --nodes 1` (a bigger
//! conntrack map for the connection churn) and, in namespace `bench`, ten backend pods and one
//! client pod (busybox `sleep`: only their network namespaces are used). The bench runs a small
//! TCP server on port 9000 of every backend pod's network namespace (answering each connection
//! with a fixed response naming the backend, then waiting for the client to close), and the load
//! from threads inside the client pod's network namespace: each connection goes to a target
//! picked at random, is timed from `connect` to the end of the response, then closed. Everything
//! stays inside the cluster's network namespaces.
//!
//! skiff's rows and control-path figures come first, before any kube-proxy table exists in the
//! node's namespace; then, for each level, the baselines. For each level of 10, 1,000 and 10,000
//! Services (10 endpoints each, the ten backends):
//!
//! - **eBPF**: selector-less Services and their EndpointSlices created through the API; the
//!   load waits until the agent's status file shows them all programmed, then targets their
//!   ClusterIPs;
//! - **iptables**: kube-proxy's iptables-mode rules for as many services (`KUBE-SERVICES`,
//!   `KUBE-SVC-*` with the `statistic` probabilities, `KUBE-SEP-*`, `KUBE-MARK-MASQ`,
//!   `KUBE-POSTROUTING`), on addresses of 10.200.0.0/16, loaded into the node's namespace with
//!   one `iptables-restore`, flushed after;
//! - **nftables**: kube-proxy's nftables layout (the `service-ips` verdict map, a chain per
//!   service with `numgen random`, a chain per endpoint), on 10.201.0.0/16, loaded with one
//!   `nft -f`, deleted after;
//! - **direct**: the backends' pod IPs, no service at all.
//!
//! Then, with 10,000 Services programmed: the agent's VmRSS; the latency from an EndpointSlice
//! change (a PUT through the API) to the first connection that reaches the new backend, over
//! 1,000 changes (four paced probe threads with 100 ms timeouts, against a server of their own
//! on port 9001 of the first two backends, a task per connection); and a cold start: the agent
//! killed, the node's pins removed, the agent started again, timed until its status file shows
//! every service port programmed.
//!
//! The cluster is removed on exit, on error and on Ctrl-C (the servers' threads end with the
//! process). The figures go to the `services` section of BENCHMARKS.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::bench::{
    BenchArgs, Client, Machine, Samples, Target, client_tls, mib, micros, vm_rss_kib,
};
use crate::bench_pods::{LocalCluster, pod_body_in};
use crate::{run, say};

/// Service counts measured.
const LEVELS: [usize; 3] = [10, 1_000, 10_000];
/// Backends (and endpoints per Service).
const BACKENDS: usize = 10;
/// The port the bench's servers listen on in the backend pods.
const BACKEND_PORT: u16 = 9000;
/// The port of the change probe's server (on the first two backends).
const PROBE_PORT: u16 = 9001;
/// How long each load runs.
const LOAD: Duration = Duration::from_secs(4);
/// Client threads of the load (the machine has two cores).
const CLIENT_THREADS: usize = 4;
/// EndpointSlice changes timed.
const CHANGES: usize = 1_000;
/// The namespace of the bench's objects.
const NAMESPACE: &str = "bench";
/// The pod network (kube-proxy's rules masquerade what comes from outside it).
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Concurrent API connections creating the Services.
const API_CONNECTIONS: usize = 8;
/// kube-proxy's iptables rules go through the legacy backend: Debian 12's `iptables-restore`
/// (nf_tables backend, 1.8.9) was still loading the 10,000-service rule set (110,000 chains)
/// after 10 minutes at 100% of a CPU.
const IPTABLES_RESTORE: &str = "iptables-legacy-restore";
/// See [`IPTABLES_RESTORE`].
const IPTABLES: &str = "iptables-legacy";
/// Before each load the machine must be this close to idle (busy CPU time per second of wall
/// time, all CPUs), so that what the previous step started (the control plane digesting
/// thousands of new Services, a rule load) is not measured with it.
const IDLE_BUSY: Duration = Duration::from_millis(150);
/// How long the bench waits for that at most.
const IDLE_TIMEOUT: Duration = Duration::from_secs(180);
/// The conntrack map size given to the agent.
const CT_MAX: &str = "1048576";

/// Runs `cargo xtask bench services`.
pub fn services(ws: &Path, args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    let (bin, image) = crate::bench_pods::release_cluster_binaries(ws, "services")?;
    let cluster =
        LocalCluster::up_with(&bin.join("skiffctl"), &image, 1, &["--bpf-ct-max", CT_MAX])?;
    let outcome = measure(&cluster);
    let logs = cluster.agent_log_tails();
    drop(cluster);
    let report =
        outcome.with_context(|| format!("the services bench failed; agent logs:\n{logs}"))?;
    let machine = Machine::describe(ws);
    let md = report.markdown(&machine);
    crate::bench::publish(
        ws,
        args,
        Target::Services,
        &md,
        started,
        "the cluster is down",
    )
}

// ---- servers and load ------------------------------------------------------------------------

/// The fixed response of backend `i`.
fn response(i: usize) -> Vec<u8> {
    format!("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nb{i}").into_bytes()
}

/// Threads accepting connections on each backend.
const SERVER_THREADS: usize = 4;
/// How long a backend's server waits for a request, then for the client to close.
const SERVER_TIMEOUT: Duration = Duration::from_millis(300);

/// Starts [`SERVER_THREADS`] server threads for backend `i` in the network namespace at `netns`.
fn start_server(netns: PathBuf, i: usize, stop: Arc<AtomicBool>) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let listener = skiff_tests::netns::enter_path(&netns)
            .and_then(|()| TcpListener::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)));
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        let serve = move |listener: TcpListener, stop: Arc<AtomicBool>| {
            let answer = response(i);
            let mut buf = [0u8; 512];
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                // A client that vanished must not hold the thread: when a change takes the
                // backend out of the Service, the client's FIN goes to the new backend (the
                // connection moves, as the datapath moves connections whose backend left).
                let _ = stream.set_read_timeout(Some(SERVER_TIMEOUT));
                // The request, then the answer, then wait for the client to close first (so
                // that TIME_WAIT stays on the client, as with a real HTTP/1.0 client).
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(&answer);
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            }
        };
        for _ in 1..SERVER_THREADS {
            if let Ok(more) = listener.try_clone() {
                let stop = stop.clone();
                thread::spawn(move || serve(more, stop));
            }
        }
        serve(listener, stop);
    });
    rx.recv()
        .context("the server thread ended")?
        .with_context(|| format!("backend {i}: cannot listen on :{BACKEND_PORT}"))
}

/// Starts the change probe's server for backend `i` on [`PROBE_PORT`] in the network namespace at
/// `netns`, on the current tokio runtime: a task per connection, so that connections a change
/// leaves waiting (their client's next packets moved to the other backend) hold no thread, and
/// the backend answers the probe the moment the datapath sends it a connection. (The load's
/// threaded servers cost less CPU per connection, but a few such connections, each waiting out
/// its timeout, hold all their threads: the probe then measured the timeouts, not the change.)
async fn start_probe_server(netns: PathBuf, i: usize) -> Result<tokio::task::AbortHandle> {
    let listener = thread::spawn(move || {
        skiff_tests::netns::enter_path(&netns)?;
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, PROBE_PORT))?;
        listener.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(listener)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the probe server's thread panicked"))?
    .with_context(|| format!("backend {i}: cannot listen on :{PROBE_PORT}"))?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let answer: Arc<[u8]> = response(i).into();
    let task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(tokio::time::timeout(SERVER_TIMEOUT, async move {
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(&answer).await;
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            }));
        }
    });
    Ok(task.abort_handle())
}

/// A small xorshift generator (the load needs no more).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The load's connect and read timeout.
const LOAD_TIMEOUT: Duration = Duration::from_secs(2);

/// One request on a new connection, connect and each read bounded by `timeout`: (latency in µs,
/// backend index) or the error.
fn request(target: SocketAddrV4, timeout: Duration) -> std::io::Result<(i64, u8)> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(target), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut answer = Vec::with_capacity(64);
    let mut buf = [0u8; 128];
    while !answer.ends_with(b"\r\n\r\nb0") && answer.len() < 60 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .is_some_and(|p| answer.len() >= p + 6)
        {
            break;
        }
    }
    let latency = i64::try_from(start.elapsed().as_micros()).unwrap_or(i64::MAX);
    let body = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .and_then(|p| answer.get(p + 5))
        .copied()
        .ok_or_else(|| std::io::Error::other("short answer"))?;
    Ok((latency, body.wrapping_sub(b'0')))
}

/// What one load run measured.
struct LoadFigures {
    connections: usize,
    errors: usize,
    wall: Duration,
    latency: Samples,
    /// CPU time the whole machine was busy meanwhile.
    busy: Duration,
}

impl LoadFigures {
    fn per_second(&self) -> f64 {
        self.connections as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Waits until a second passes with the machine busy less than [`IDLE_BUSY`]; after
/// [`IDLE_TIMEOUT`] it says so and goes on (the row's "machine busy" shows the rest).
pub(crate) fn wait_idle() -> Result<()> {
    let start = Instant::now();
    loop {
        let before = crate::bench::machine_busy()?;
        thread::sleep(Duration::from_secs(1));
        let busy = crate::bench::machine_busy()?.saturating_sub(before);
        if busy < IDLE_BUSY {
            return Ok(());
        }
        if start.elapsed() > IDLE_TIMEOUT {
            say(format!(
                "the machine is still busy ({busy:?} of CPU per second) after {IDLE_TIMEOUT:?}; measuring anyway"
            ));
            return Ok(());
        }
    }
}

/// Runs [`CLIENT_THREADS`] threads in the network namespace `netns` for [`LOAD`], each making one
/// connection after the other to a target picked at random (once the machine is idle).
fn load(netns: &Path, targets: &[SocketAddrV4]) -> Result<LoadFigures> {
    ensure!(!targets.is_empty(), "no targets");
    wait_idle()?;
    let targets = Arc::new(targets.to_vec());
    let busy_before = crate::bench::machine_busy()?;
    let start = Instant::now();
    let deadline = start + LOAD;
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            let targets = targets.clone();
            let netns = netns.to_path_buf();
            thread::spawn(move || -> std::io::Result<(Vec<i64>, usize)> {
                skiff_tests::netns::enter_path(&netns)?;
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((t as u64 + 1) * 0x2545_f491_4f6c_dd1d));
                let (mut latencies, mut errors) = (Vec::new(), 0);
                while Instant::now() < deadline {
                    let target = targets[(rng.next() % targets.len() as u64) as usize];
                    match request(target, LOAD_TIMEOUT) {
                        Ok((us, _)) => latencies.push(us),
                        Err(_) => errors += 1,
                    }
                }
                Ok((latencies, errors))
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for (latencies, failed) in crate::bench::join_threads(threads, "load")? {
        all.extend(latencies);
        errors += failed;
    }
    let wall = start.elapsed();
    Ok(LoadFigures {
        connections: all.len(),
        errors,
        wall,
        latency: Samples::new(all),
        busy: crate::bench::machine_busy()?.saturating_sub(busy_before),
    })
}

/// Writes a sysctl of the network namespace at `netns` (from a thread inside it).
fn netns_sysctl(netns: &Path, key: &str, value: &str) -> Result<()> {
    let (path, file) = (
        netns.to_path_buf(),
        format!("/proc/sys/{}", key.replace('.', "/")),
    );
    let value = value.to_owned();
    thread::spawn(move || -> std::io::Result<()> {
        skiff_tests::netns::enter_path(&path)?;
        fs::write(file, value)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the sysctl thread panicked"))?
    .with_context(|| format!("cannot set {key} in {}", netns.display()))
}

// ---- kube-proxy's rules ----------------------------------------------------------------------

/// A chain-name hash (16 base32-like characters), as kube-proxy names its chains.
fn chain_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..16)
        .map(|i| alphabet[((h >> ((i * 4) % 60)) & 31) as usize] as char)
        .collect()
}

/// The address of baseline service `i` in `prefix.0.0/16`.
fn baseline_vip(prefix: [u8; 2], i: usize) -> Ipv4Addr {
    Ipv4Addr::new(prefix[0], prefix[1], (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Port 80 of the first `services` baseline VIPs under `prefix`.
fn baseline_targets(prefix: [u8; 2], services: usize) -> Vec<SocketAddrV4> {
    (0..services)
        .map(|i| SocketAddrV4::new(baseline_vip(prefix, i), 80))
        .collect()
}

/// kube-proxy's iptables-mode `nat` table for `services` services over `backends`, as one
/// `iptables-restore --noflush` input (`first`: also the jumps from the built-in chains).
fn iptables_rules(services: usize, backends: &[Ipv4Addr], first: bool) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    chains.push_str("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
    if first {
        rules.push_str(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        );
        rules.push_str(
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        );
        rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    }
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    let n = backends.len();
    for i in 0..services {
        let vip = baseline_vip([10, 200], i);
        let name = format!("{NAMESPACE}/svc-{i}:http");
        let svc = format!("KUBE-SVC-{}", chain_hash(&format!("{name}tcp")));
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {vip}/32 --dport 80 -j {svc}"
        );
        let _ = writeln!(
            rules,
            "-A {svc} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {vip}/32 --dport 80 ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"
        );
        for (j, backend) in backends.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", chain_hash(&format!("{name}tcp{backend}")));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let endpoint = format!("{backend}:{BACKEND_PORT}");
            if j + 1 < n {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"{name} -> {endpoint}\" -m statistic --mode random --probability {:.10} -j {sep}",
                    1.0 / (n - j) as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"{name} -> {endpoint}\" -j {sep}"
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep} -m comment --comment {name} -s {backend}/32 -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {endpoint}"
            );
        }
    }
    rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    format!("{chains}{rules}COMMIT\n")
}

/// kube-proxy's nftables layout for `services` services over `backends`, for `nft -f`.
fn nftables_rules(services: usize, backends: &[Ipv4Addr]) -> String {
    let mut out = String::from("table ip kube-proxy {\n");
    let mut elements = Vec::with_capacity(services);
    let mut chains = String::new();
    for i in 0..services {
        let vip = baseline_vip([10, 201], i);
        let hash = chain_hash(&format!("{NAMESPACE}/svc-{i}/tcp/http"));
        let service = format!("service-{}-{NAMESPACE}-svc-{i}-tcp-http", &hash[..8]);
        elements.push(format!("{vip} . tcp . 80 : goto {service}"));
        let mut vmap = Vec::new();
        for (j, backend) in backends.iter().enumerate() {
            let endpoint = format!("endpoint-{}-{NAMESPACE}-svc-{i}-tcp-http-{j}", &hash[..8]);
            vmap.push(format!("{j} : goto {endpoint}"));
            let _ = writeln!(
                chains,
                "  chain {endpoint} {{\n    ip saddr {backend} jump mark-for-masquerade\n    meta l4proto tcp dnat to {backend}:{BACKEND_PORT}\n  }}"
            );
        }
        let _ = writeln!(
            chains,
            "  chain {service} {{\n    ip daddr {vip} tcp dport 80 ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n    numgen random mod {} vmap {{ {} }}\n  }}",
            backends.len(),
            vmap.join(", ")
        );
    }
    out.push_str(&chains);
    out.push_str("  chain mark-for-masquerade {\n    mark set mark or 0x4000\n  }\n");
    out.push_str("  chain masquerading {\n    mark and 0x4000 == 0 return\n    mark set mark xor 0x4000\n    masquerade fully-random\n  }\n");
    let _ = writeln!(
        out,
        "  map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {{ {} }}\n  }}",
        elements.join(", ")
    );
    out.push_str(
        "  chain services {\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n",
    );
    // Priorities as numbers: Debian 12's nft 1.0.6 takes `dstnat` only on prerouting.
    out.push_str("  chain nat-prerouting {\n    type nat hook prerouting priority -100; policy accept;\n    jump services\n  }\n");
    out.push_str("  chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n");
    out.push_str("  chain nat-postrouting {\n    type nat hook postrouting priority 100; policy accept;\n    jump masquerading\n  }\n");
    out.push_str("}\n");
    out
}

/// Runs `program args` inside the network namespace `netns` with `input` on stdin; how long it
/// took.
fn run_in(netns: &str, program: &str, args: &[&str], input: &str) -> Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())
        .with_context(|| format!("cannot feed {program}"))?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(start.elapsed())
}

// ---- the API ---------------------------------------------------------------------------------

fn service_body(i: usize) -> String {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": NAMESPACE},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": BACKEND_PORT}]},
    })
    .to_string()
}

fn slice_body(service: &str, backends: &[Ipv4Addr], port: u16) -> String {
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
    .to_string()
}

/// Creates Services `from..to` and their EndpointSlices over [`API_CONNECTIONS`] connections;
/// returns their ClusterIPs by index.
pub(crate) async fn create_services(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    from: usize,
    to: usize,
    backends: &[Ipv4Addr],
) -> Result<BTreeMap<usize, Ipv4Addr>> {
    let mut tasks = Vec::new();
    for c in 0..API_CONNECTIONS {
        let tls = tls.clone();
        let backends = backends.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut api = Client::tls(&tls, addr).await?;
            let mut ips = Vec::new();
            for i in (from..to).filter(|i| i % API_CONNECTIONS == c) {
                let (status, body) = api
                    .send(
                        Method::POST,
                        &format!("/api/v1/namespaces/{NAMESPACE}/services"),
                        Some(service_body(i)),
                    )
                    .await?;
                ensure!(status == StatusCode::CREATED, "service svc-{i}: {status}");
                let svc: Value = serde_json::from_slice(&body)?;
                let ip: Ipv4Addr = svc["spec"]["clusterIP"]
                    .as_str()
                    .context("no clusterIP")?
                    .parse()?;
                ips.push((i, ip));
                api.expect(
                    Method::POST,
                    &format!("/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"),
                    Some(slice_body(&format!("svc-{i}"), &backends, BACKEND_PORT)),
                    StatusCode::CREATED,
                )
                .await?;
            }
            Ok::<_, anyhow::Error>(ips)
        }));
    }
    let mut all = BTreeMap::new();
    for task in tasks {
        all.extend(task.await.context("a create task panicked")??);
    }
    Ok(all)
}

/// Creates namespace [`NAMESPACE`] and a busybox `sleep` pod of each name in it; waits until
/// all run: (uid, pod IP) by name.
pub(crate) async fn running_pods(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    names: &[String],
) -> Result<BTreeMap<String, (String, Ipv4Addr)>> {
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
    for name in names {
        api.expect(
            Method::POST,
            &format!("/api/v1/namespaces/{NAMESPACE}/pods"),
            Some(pod_body_in(NAMESPACE, name)),
            StatusCode::CREATED,
        )
        .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (status, body) = api
            .send(
                Method::GET,
                &format!("/api/v1/namespaces/{NAMESPACE}/pods"),
                None,
            )
            .await?;
        ensure!(status == StatusCode::OK, "list pods: {status}");
        let list: Value = serde_json::from_slice(&body)?;
        let running: BTreeMap<String, (String, Ipv4Addr)> = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["status"]["phase"] == "Running")
            .filter_map(|p| {
                Some((
                    p["metadata"]["name"].as_str()?.to_owned(),
                    (
                        p["metadata"]["uid"].as_str()?.to_owned(),
                        p["status"]["podIP"].as_str()?.parse().ok()?,
                    ),
                ))
            })
            .collect();
        if running.len() == names.len() {
            return Ok(running);
        }
        ensure!(
            Instant::now() < deadline,
            "{} of {} pods Running",
            running.len(),
            names.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The agent's programmed service ports, from its status file.
fn programmed(status: &Path) -> usize {
    fs::read(status)
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<Value>>(&b).ok())
        .map_or(0, |rows| {
            rows.iter()
                .filter(|r| r["revision"].is_u64() && r["error"].is_null())
                .count()
        })
}

/// Waits until the status file shows at least `want` programmed service ports.
fn wait_programmed(status: &Path, want: usize, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if programmed(status) >= want {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < timeout,
            "{} of {want} service ports programmed after {timeout:?}",
            programmed(status)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

// ---- the bench -------------------------------------------------------------------------------

/// One level's four loads.
struct Level {
    services: usize,
    ebpf: LoadFigures,
    iptables: LoadFigures,
    iptables_load: Duration,
    nftables: LoadFigures,
    nftables_load: Duration,
    direct: LoadFigures,
}

struct Report {
    levels: Vec<Level>,
    rss_kib: u64,
    changes: Samples,
    /// Changes whose new backend no connection reached within 10 s.
    missed_changes: usize,
    cold_sync: Duration,
    cold_sync_agent_ms: Option<u64>,
    ports: usize,
}

fn measure(cluster: &LocalCluster) -> Result<Report> {
    let node = format!("{}-node-1", cluster.name);
    let node_netns = format!("skiff-{node}");
    let run_dir = PathBuf::from("/run/skiff").join(&node);
    let status = run_dir.join("services.json");
    let tls = client_tls(&cluster.state_dir().join("control").join("pki"))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, cluster.port));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("could not start the tokio runtime")?;

    // Connections end in TIME_WAIT by the thousand: short conntrack timeouts in the node's
    // namespace (the bench's own), port reuse in the client's.
    for (key, value) in [
        ("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1"),
        ("net.netfilter.nf_conntrack_tcp_timeout_close_wait", "1"),
        ("net.netfilter.nf_conntrack_tcp_timeout_fin_wait", "1"),
    ] {
        netns_sysctl(&PathBuf::from("/run/netns").join(&node_netns), key, value)?;
    }

    say(format!("{BACKENDS} backend pods and a client pod"));
    let names: Vec<String> = (0..BACKENDS)
        .map(|i| format!("b{i}"))
        .chain(["client".to_owned()])
        .collect();
    let pods = runtime.block_on(running_pods(&tls, addr, &names))?;
    let netns_of = |name: &str| run_dir.join("netns").join(&pods[name].0);
    let backends: Vec<Ipv4Addr> = (0..BACKENDS).map(|i| pods[&format!("b{i}")].1).collect();
    let client = netns_of("client");
    let probe_backends: Vec<(PathBuf, Ipv4Addr)> = (0..2)
        .map(|i| (netns_of(&format!("b{i}")), backends[i]))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    for i in 0..BACKENDS {
        start_server(netns_of(&format!("b{i}")), i, stop.clone())?;
    }
    netns_sysctl(&client, "net.ipv4.tcp_tw_reuse", "1")?;
    netns_sysctl(&client, "net.ipv4.ip_local_port_range", "1024 65000")?;
    let direct_targets: Vec<SocketAddrV4> = backends
        .iter()
        .map(|ip| SocketAddrV4::new(*ip, BACKEND_PORT))
        .collect();
    // Every backend answers before anything is measured.
    for target in &direct_targets {
        let netns = client.clone();
        let target = *target;
        thread::spawn(move || {
            skiff_tests::netns::enter_path(&netns)?;
            request(target, LOAD_TIMEOUT)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("probe panicked"))?
        .with_context(|| format!("backend {target} does not answer"))?;
    }

    // skiff first: its rows and control-path figures are taken before any of kube-proxy's
    // tables exist in the node's namespace (a loaded nat table turns netfilter's conntrack on
    // there, and it then tracks every connection, translated ones too; see BENCHMARKS.md).
    let mut vips: BTreeMap<usize, Ipv4Addr> = BTreeMap::new();
    let mut ebpf_rows = Vec::new();
    for &services in &LEVELS {
        say(format!(
            "{services} Services of {BACKENDS} endpoints through the API"
        ));
        let created =
            runtime.block_on(create_services(&tls, addr, vips.len(), services, &backends))?;
        vips.extend(created);
        // The kubernetes Service's port, and every bench Service's.
        wait_programmed(&status, services + 1, Duration::from_secs(120))?;
        let targets: Vec<SocketAddrV4> =
            vips.values().map(|ip| SocketAddrV4::new(*ip, 80)).collect();
        say(format!("eBPF: {services} Services"));
        let ebpf = load(&client, &targets)?;
        report_load("eBPF", services, &ebpf);
        ebpf_rows.push(ebpf);
    }

    let agent_pid = cluster
        .agents()?
        .first()
        .map(|(_, pid)| *pid)
        .context("no agent")?;
    let rss_kib = vm_rss_kib(agent_pid)?;

    wait_idle()?;
    say(format!("{CHANGES} EndpointSlice changes"));
    let (changes, missed_changes) =
        runtime.block_on(change_latency(&tls, addr, &client, &probe_backends))?;
    println!(
        "EndpointSlice change to datapath: p50 {} p99 {}",
        micros(changes.percentile(50.0)),
        micros(changes.percentile(99.0))
    );

    wait_idle()?;
    say("cold start: the agent killed, the node's pins removed, the agent started again");
    let ports = programmed(&status);
    run(Command::new("kill").args(["-9", &agent_pid.to_string()]))?;
    let pins = PathBuf::from("/sys/fs/bpf/skiff").join(&node);
    run(Command::new("rm").arg("-rf").arg(&pins))?;
    let _ = fs::remove_file(&status);
    let start = Instant::now();
    run(Command::new(&cluster.skiffctl)
        .args(["restart-agent", "--node", &node, "--state-dir"])
        .arg(cluster.state_dir()))?;
    wait_programmed(&status, ports, Duration::from_secs(120))?;
    let cold_sync = start.elapsed();
    let log = fs::read_to_string(
        cluster
            .state_dir()
            .join("logs")
            .join(format!("agent-{node}.log")),
    )
    .unwrap_or_default();
    let cold_sync_agent_ms = log
        .lines()
        .rev()
        .find(|l| l.contains("services synced"))
        .and_then(|l| l.split("after_ms=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok());

    // The baselines, level by level.
    let mut levels = Vec::new();
    for ((n, &services), ebpf) in LEVELS.iter().enumerate().zip(ebpf_rows) {
        say(format!("iptables: {services} services"));
        let rules = iptables_rules(services, &backends, n == 0);
        let iptables_load = run_in(&node_netns, IPTABLES_RESTORE, &["--noflush"], &rules)?;
        let targets = baseline_targets([10, 200], services);
        let iptables = load(&client, &targets)?;
        report_load("iptables", services, &iptables);
        run_in(
            &node_netns,
            IPTABLES,
            &["-t", "nat", "-F", "KUBE-SERVICES"],
            "",
        )?;

        say(format!("nftables: {services} services"));
        let rules = nftables_rules(services, &backends);
        let nftables_load = run_in(&node_netns, "nft", &["-f", "-"], &rules)?;
        let targets = baseline_targets([10, 201], services);
        let nftables = load(&client, &targets)?;
        report_load("nftables", services, &nftables);
        run_in(
            &node_netns,
            "nft",
            &["delete", "table", "ip", "kube-proxy"],
            "",
        )?;

        say("direct: the backends' pod IPs");
        let direct = load(&client, &direct_targets)?;
        report_load("direct", services, &direct);
        levels.push(Level {
            services,
            ebpf,
            iptables,
            iptables_load,
            nftables,
            nftables_load,
            direct,
        });
    }
    stop.store(true, Ordering::Relaxed);
    Ok(Report {
        levels,
        rss_kib,
        changes,
        missed_changes,
        cold_sync,
        cold_sync_agent_ms,
        ports,
    })
}

fn report_load(mode: &str, services: usize, figures: &LoadFigures) {
    println!(
        "{mode:>8} {services:>6} services: {:>7.0} conn/s, p50 {}, p99 {}, {} errors, {:.2} s of CPU",
        figures.per_second(),
        micros(figures.latency.percentile(50.0)),
        micros(figures.latency.percentile(99.0)),
        figures.errors,
        figures.busy.as_secs_f64()
    );
}

/// [`CHANGES`] EndpointSlice PUTs switching the Service `probe` between two backends, each timed
/// until a new connection to its ClusterIP reaches the new backend.
async fn change_latency(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    client: &Path,
    backends: &[(PathBuf, Ipv4Addr)],
) -> Result<(Samples, usize)> {
    let mut servers = Vec::new();
    for (i, (netns, _)) in backends.iter().enumerate().take(2) {
        servers.push(start_probe_server(netns.clone(), i).await?);
    }
    let outcome = probe_changes(
        tls,
        addr,
        client,
        &backends.iter().map(|b| b.1).collect::<Vec<_>>(),
    )
    .await;
    for server in servers {
        server.abort();
    }
    outcome
}

/// [`change_latency`] once the probe's servers listen.
async fn probe_changes(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    client: &Path,
    backends: &[Ipv4Addr],
) -> Result<(Samples, usize)> {
    let mut api = Client::tls(tls, addr).await?;
    let (code, body) = api
        .send(
            Method::POST,
            &format!("/api/v1/namespaces/{NAMESPACE}/services"),
            Some(
                json!({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "probe", "namespace": NAMESPACE},
                       "spec": {"ports": [{"name": "http", "port": 80, "targetPort": PROBE_PORT}]}})
                .to_string(),
            ),
        )
        .await?;
    ensure!(code == StatusCode::CREATED, "service probe: {code}");
    let vip: Ipv4Addr = serde_json::from_slice::<Value>(&body)?["spec"]["clusterIP"]
        .as_str()
        .context("no clusterIP")?
        .parse()?;
    let slices = format!("/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices");
    api.expect(
        Method::POST,
        &slices,
        Some(slice_body("probe", &backends[..1], PROBE_PORT)),
        StatusCode::CREATED,
    )
    .await?;
    // The pollers: each makes connections one after the other, short timeouts (a connection
    // caught by a switch does not hold the measurement up); `seen[b]` is when backend `b` was
    // first seen since the main loop cleared it.
    let seen: Arc<Mutex<[Option<Instant>; 2]>> = Arc::new(Mutex::new([None, None]));
    let stop = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = (0..PROBE_THREADS)
        .map(|_| {
            let (seen, stop) = (seen.clone(), stop.clone());
            let client = client.to_path_buf();
            thread::spawn(move || -> std::io::Result<()> {
                skiff_tests::netns::enter_path(&client)?;
                let target = SocketAddrV4::new(vip, 80);
                while !stop.load(Ordering::Relaxed) {
                    // Paced: a probe that kept both cores busy would measure itself.
                    thread::sleep(PROBE_PAUSE);
                    if let Ok((_, backend)) = request(target, PROBE_TIMEOUT) {
                        let now = Instant::now();
                        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(slot) = s.get_mut(usize::from(backend)) {
                            slot.get_or_insert(now);
                        }
                    }
                }
                Ok(())
            })
        })
        .collect();
    // Wait for the first backend.
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap_or_else(|e| e.into_inner())[0].is_none() {
        ensure!(
            Instant::now() < deadline,
            "probe never answered from backend 0"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut latencies = Vec::with_capacity(CHANGES);
    let mut missed = 0;
    for change in 1..=CHANGES {
        if missed >= MAX_MISSED {
            say(format!(
                "{missed} changes missed: stopping after {} changes",
                change - 1
            ));
            break;
        }
        let want = change % 2;
        // Backend `want` has been out of the Service since the change before last.
        seen.lock().unwrap_or_else(|e| e.into_inner())[want] = None;
        let start = Instant::now();
        api.expect(
            Method::PUT,
            &format!("{slices}/probe-1"),
            Some(slice_body("probe", &backends[want..want + 1], PROBE_PORT)),
            StatusCode::OK,
        )
        .await?;
        let deadline = start + Duration::from_secs(10);
        loop {
            if let Some(at) = seen.lock().unwrap_or_else(|e| e.into_inner())[want] {
                latencies.push(i64::try_from((at - start).as_micros()).unwrap_or(i64::MAX));
                break;
            }
            if Instant::now() > deadline {
                say(format!(
                    "change {change}: backend {want} not reached in 10 s"
                ));
                missed += 1;
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for poller in pollers {
        let _ = poller.join();
    }
    Ok((Samples::new(latencies), missed))
}

/// The change probe's threads, each polling the Service's ClusterIP.
const PROBE_THREADS: usize = 4;
/// The pause before each of a probe thread's connections: about 3,000 connections a second in
/// all, one every 0.3 ms, a fifth of what the machine can do.
const PROBE_PAUSE: Duration = Duration::from_millis(1);
/// The change probe's connect and read timeout.
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);
/// Changes not seen within 10 s after which the change bench stops.
const MAX_MISSED: usize = 5;

// ---- the report ------------------------------------------------------------------------------

/// The goals of issue 15.
const GOAL_P99_GROWTH: f64 = 1.10;
const GOAL_VS_IPTABLES: f64 = 2.0;
const GOAL_VS_DIRECT: f64 = 0.90;
const GOAL_SYNC: Duration = Duration::from_secs(1);
const GOAL_CHANGE_P99: Duration = Duration::from_millis(10);
const GOAL_RSS_KIB: u64 = 100 * 1024;

impl Report {
    fn level(&self, services: usize) -> &Level {
        self.levels
            .iter()
            .find(|l| l.services == services)
            .expect("every level is measured")
    }

    fn goals(&self) -> Vec<(String, String, bool)> {
        let (low, high) = (self.level(LEVELS[0]), self.level(LEVELS[2]));
        let p99_low = low.ebpf.latency.percentile(99.0) as f64;
        let p99_high = high.ebpf.latency.percentile(99.0) as f64;
        vec![
            (
                "eBPF p99 at 10,000 Services within 10% of p99 at 10".into(),
                format!(
                    "{} vs {} ({:+.0}%)",
                    micros(p99_high as i64),
                    micros(p99_low as i64),
                    (p99_high / p99_low.max(1.0) - 1.0) * 100.0
                ),
                p99_high <= p99_low * GOAL_P99_GROWTH,
            ),
            (
                "eBPF ≥ 2× iptables connections/s at 10,000".into(),
                format!(
                    "{:.0} vs {:.0} ({:.2}×)",
                    high.ebpf.per_second(),
                    high.iptables.per_second(),
                    high.ebpf.per_second() / high.iptables.per_second().max(1.0)
                ),
                high.ebpf.per_second() >= GOAL_VS_IPTABLES * high.iptables.per_second(),
            ),
            (
                "eBPF ≥ nftables connections/s at 10,000".into(),
                format!(
                    "{:.0} vs {:.0}",
                    high.ebpf.per_second(),
                    high.nftables.per_second()
                ),
                high.ebpf.per_second() >= high.nftables.per_second(),
            ),
            (
                "eBPF ≥ 90% of direct connections/s (at 10,000)".into(),
                format!(
                    "{:.0}%",
                    high.ebpf.per_second() / high.direct.per_second().max(1.0) * 100.0
                ),
                high.ebpf.per_second() >= GOAL_VS_DIRECT * high.direct.per_second(),
            ),
            (
                format!(
                    "full sync of {} service ports from a cold start < 1 s",
                    self.ports
                ),
                match self.cold_sync_agent_ms {
                    Some(ms) => format!(
                        "{:.2} s from the restart command; {ms} ms by the agent's own clock",
                        self.cold_sync.as_secs_f64()
                    ),
                    None => format!("{:.2} s", self.cold_sync.as_secs_f64()),
                },
                self.cold_sync_agent_ms
                    .map_or(self.cold_sync < GOAL_SYNC, |ms| {
                        ms < GOAL_SYNC.as_millis() as u64
                    }),
            ),
            (
                "EndpointSlice change to the datapath p99 < 10 ms".into(),
                format!(
                    "{} over {} changes ({} not seen within 10 s)",
                    micros(self.changes.percentile(99.0)),
                    self.changes.len() + self.missed_changes,
                    self.missed_changes
                ),
                self.missed_changes == 0
                    && self.changes.percentile(99.0) < GOAL_CHANGE_P99.as_micros() as i64,
            ),
            (
                "agent RSS < 100 MiB with 10,000 Services".into(),
                mib(self.rss_kib),
                self.rss_kib < GOAL_RSS_KIB,
            ),
        ]
    }

    fn markdown(&self, machine: &Machine) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## Services (`cargo xtask bench services`)\n");
        let _ = writeln!(
            md,
            "{} Release build. `skiffctl up \
             --nodes 1`; {BACKENDS} backend pods, each with the bench's TCP server on :{BACKEND_PORT} \
             in its network namespace, and a client pod whose network namespace runs \
             {CLIENT_THREADS} load threads: one connection after the other to a target picked at \
             random, timed from `connect` to the end of the response, for {} s per row, each row \
             started once the machine is idle (less than {} ms of CPU busy in a second). Every \
             Service has the {BACKENDS} backends as endpoints. iptables and nftables are kube-proxy's \
             rule layouts loaded into the node's namespace (skiff's programs still run there and \
             miss); iptables through the legacy backend (`{IPTABLES_RESTORE}`: Debian 12's \
             nf_tables-backed `iptables-restore` 1.8.9 was still loading the 10,000-service rule \
             set, 110,000 chains, after 10 minutes at 100% of a CPU). skiff's rows and the \
             control path are measured first, before kube-proxy's tables exist (the cluster runs no \
             hostPort, so netfilter's conntrack is off in the node's namespace then); the baselines' \
             nat tables turn it on for theirs. The change probe: {PROBE_THREADS} threads in the \
             client pod, each connecting to the probe Service every {} ms with {} ms timeouts; its \
             two backends answer on :{PROBE_PORT} from a task per connection.\n",
            machine.last_run(),
            LOAD.as_secs(),
            IDLE_BUSY.as_millis(),
            PROBE_PAUSE.as_millis(),
            PROBE_TIMEOUT.as_millis(),
        );
        let _ = writeln!(md, "### Goals\n");
        md.push_str(&crate::bench::goals_table(&self.goals()));
        let _ = writeln!(md, "\n### Connections through a ClusterIP\n");
        let _ = writeln!(
            md,
            "| services | datapath | connections/s | p50 | p99 | errors | machine busy | CPU µs per connection | rules loaded in |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for level in &self.levels {
            for (mode, figures, loaded) in [
                ("eBPF (skiff)", &level.ebpf, None),
                ("iptables", &level.iptables, Some(level.iptables_load)),
                ("nftables", &level.nftables, Some(level.nftables_load)),
                ("direct pod IP", &level.direct, None),
            ] {
                let _ = writeln!(
                    md,
                    "| {} | {mode} | {:.0} | {} | {} | {} | {:.0}% | {:.0} | {} |",
                    level.services,
                    figures.per_second(),
                    micros(figures.latency.percentile(50.0)),
                    micros(figures.latency.percentile(99.0)),
                    figures.errors,
                    figures.busy.as_secs_f64()
                        / figures.wall.as_secs_f64().max(1e-9)
                        / crate::bench_pods::cpus() as f64
                        * 100.0,
                    figures.busy.as_secs_f64() * 1e6 / figures.connections.max(1) as f64,
                    loaded.map_or("—".to_owned(), |d| format!("{:.2} s", d.as_secs_f64())),
                );
            }
        }
        let _ = writeln!(md, "\n### Control path\n");
        let _ = writeln!(
            md,
            "| measure | value |\n|---|---|\n| EndpointSlice PUT → first connection to the new backend ({} changes, {} not seen within 10 s) | p50 {}, p99 {}, max {} |\n| cold start to {} service ports programmed | {:.2} s from `skiffctl restart-agent`{} |\n| agent VmRSS with {} Services | {} |",
            self.changes.len() + self.missed_changes,
            self.missed_changes,
            micros(self.changes.percentile(50.0)),
            micros(self.changes.percentile(99.0)),
            micros(self.changes.max()),
            self.ports,
            self.cold_sync.as_secs_f64(),
            self.cold_sync_agent_ms.map_or(String::new(), |ms| format!(
                "; {ms} ms from the agent's start of the sync loop"
            )),
            LEVELS[2],
            mib(self.rss_kib),
        );
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_rules_have_kube_proxys_shape() {
        let backends = [Ipv4Addr::new(10, 244, 0, 2), Ipv4Addr::new(10, 244, 0, 3)];
        let rules = iptables_rules(2, &backends, true);
        assert!(rules.starts_with("*nat\n:KUBE-SERVICES - [0:0]\n"));
        assert!(rules.ends_with("COMMIT\n"));
        assert_eq!(rules.matches("-j KUBE-SEP-").count(), 4, "{rules}");
        assert_eq!(
            rules.matches("--probability 0.5000000000").count(),
            2,
            "{rules}"
        );
        assert_eq!(
            rules
                .matches("-j DNAT --to-destination 10.244.0.3:9000")
                .count(),
            2
        );
        assert!(rules.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        assert!(!iptables_rules(2, &backends, false).contains("-A PREROUTING"));
    }

    #[test]
    fn nftables_rules_have_kube_proxys_shape() {
        let backends = [Ipv4Addr::new(10, 244, 0, 2), Ipv4Addr::new(10, 244, 0, 3)];
        let rules = nftables_rules(2, &backends);
        assert!(rules.contains("10.201.0.1 . tcp . 80 : goto service-"));
        assert!(rules.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(rules.contains("meta l4proto tcp dnat to 10.244.0.3:9000"));
        assert!(rules.contains("type nat hook prerouting priority -100"));
    }

    #[test]
    fn baseline_addresses_are_distinct() {
        let all: std::collections::BTreeSet<Ipv4Addr> =
            (0..10_000).map(|i| baseline_vip([10, 200], i)).collect();
        assert_eq!(all.len(), 10_000);
    }
}
