//! `cargo xtask bench <target>`: performance figures, printed and written to `BENCHMARKS.md`.
//!
//! `apiserver` builds `skiff-control` in release, starts it with its own etcd child on a free
//! loopback port and a fresh temporary data dir, and drives it over HTTPS with the admin client
//! certificate from an async load generator (one HTTP/1.1 keep-alive connection per client):
//!
//! - ConfigMap creates, then gets by name, at 1, 10 and 50 concurrent clients (each level stops
//!   after `--requests` requests or `--seconds`, whichever comes first): throughput, latency
//!   percentiles, and the CPU time each process spent per request;
//! - watch fan-out: 100 watchers of one namespace's ConfigMaps from a resourceVersion, then 200
//!   creates; per-event delivery latency, and the bench fails unless every watcher saw every event
//!   exactly once;
//! - memory: VmRSS of `skiff-control` and, separately, of its etcd child, idle after start and at
//!   the peak of the load (sampled every 100 ms);
//! - baselines without skiff, straight into the same etcd with the client library skiff uses:
//!   plain puts, and a create's etcd work (a read, then a create-if-absent transaction).
//!
//! The server and the temporary directory are removed on exit, on error and on Ctrl-C.
//!
//! `scheduler` is in [`crate::bench_scheduler`]: pods from Deployments onto hollow nodes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use http::header::{ACCEPT, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use skiff_tests::{ProcessGroup, free_port, tail};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::{cargo, run, say, target_dir};

/// Concurrent clients of the create, get and etcd-put levels.
const CLIENT_LEVELS: [usize; 3] = [1, 10, 50];
/// Watchers of the fan-out test.
const WATCHERS: usize = 100;
/// Objects created while the watchers watch.
const WATCH_EVENTS: usize = 200;
/// How long the watchers get, after the last create, to deliver every event.
const WATCH_GRACE: Duration = Duration::from_secs(10);
/// How long the server gets to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the server is left alone after `/readyz` before its idle memory is read.
const IDLE_SETTLE: Duration = Duration::from_secs(2);
/// Memory sampling period during the load.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Between SIGTERM and SIGKILL when the server is stopped.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(10);
/// Namespace of the create and get levels.
const NAMESPACE: &str = "bench";
/// What the etcd baselines store: a ConfigMap as skiff-control stores it (same size).
#[cfg(feature = "etcd-baseline")]
const STORED_CONFIG_MAP: &str = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c1-0","namespace":"bench","uid":"189d4275-1b88-4ebf-833e-daf6d991b566","creationTimestamp":"2026-01-01T00:00:00Z","labels":{"app":"bench"},"managedFields":[{"manager":"xtask","operation":"Update","apiVersion":"v1","time":"2026-01-01T00:00:00Z","fieldsType":"FieldsV1","fieldsV1":{"f:data":{".":{},"f:key":{},"f:other":{}},"f:metadata":{"f:labels":{".":{},"f:app":{}}}}}]},"data":{"key":"value","other":"a somewhat longer value"}}"#;
/// Namespace of the watch fan-out.
const WATCH_NAMESPACE: &str = "bench-watch";
/// The issue's goal for the p99 create latency at 50 clients.
const GOAL_CREATE_P99: Duration = Duration::from_millis(20);
/// The issue's goal for `skiff-control`'s idle RSS, in KiB.
const GOAL_IDLE_RSS_KIB: u64 = 50 * 1024;
/// Rusternetes' reported idle RSS, in MiB, for comparison.
const RUSTERNETES_IDLE_MIB: u64 = 194;
/// The file the results go to, at the workspace root.
pub(crate) const BENCHMARKS_FILE: &str = "BENCHMARKS.md";

/// `cargo xtask bench` arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to benchmark.
    #[arg(value_enum)]
    pub target: Target,
    /// Scheduler bench options (`bench scheduler` only).
    #[command(flatten)]
    pub scheduler: crate::bench_scheduler::SchedulerBenchArgs,
    /// Requests per concurrency level (a level also stops after --seconds).
    #[arg(long, default_value_t = 3000)]
    pub requests: usize,
    /// Longest a concurrency level runs, in seconds.
    #[arg(long, default_value_t = 8)]
    pub seconds: u64,
    /// Print the results without updating BENCHMARKS.md.
    #[arg(long)]
    pub no_write: bool,
    /// Drive the load from this (debug) build instead of re-running in a release build; the load
    /// generator then takes several times more of the CPUs it shares with the server.
    #[arg(long)]
    pub debug_client: bool,
}

/// What `cargo xtask bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// `skiff-control apiserver`: create/get throughput and latency, watch fan-out, memory.
    Apiserver,
    /// `skiff-control all` and hollow nodes: pods from Deployments to bound and Running.
    Scheduler,
    /// `skiffctl up` with real agents: CNI ADD/DEL, create-to-Running, agent memory.
    Pods,
    /// Connections through Services: skiff's eBPF datapath against kube-proxy's iptables and
    /// nftables rules and direct pod IPs; programming latency; agent memory.
    Services,
    /// The cluster DNS against dnsmasq, from a pod, with 10,000 Services: latency, queries per
    /// second, memory.
    Dns,
}

impl Target {
    /// The target's name on the command line and in BENCHMARKS.md's section markers.
    fn name(self) -> &'static str {
        match self {
            Target::Apiserver => "apiserver",
            Target::Scheduler => "scheduler",
            Target::Pods => "pods",
            Target::Services => "services",
            Target::Dns => "dns",
        }
    }
}

/// Runs the benchmark `args.target`.
pub fn bench(ws: &Path, args: &BenchArgs) -> Result<()> {
    ensure!(args.requests > 0, "--requests must be at least 1");
    ensure!(args.seconds > 0, "--seconds must be at least 1");
    // protoc, the eBPF toolchain: what building the benched binaries (and the etcd baselines)
    // needs on a fresh machine.
    crate::setup(ws)?;
    reexec_for_bench(ws, args)?;
    match args.target {
        Target::Apiserver => apiserver(ws, args),
        Target::Scheduler => crate::bench_scheduler::scheduler(ws, args),
        Target::Pods => crate::bench_pods::pods(ws, args),
        Target::Services => crate::bench_services::services(ws, args),
        Target::Dns => crate::bench_dns::dns(ws, args),
    }
}

/// Unless this process is already one, builds the load generator (xtask in release, or in debug
/// with `--debug-client`, with the `etcd-baseline` feature) and replaces this process with it,
/// same arguments: the load generator shares the machine with what it measures, so it must be
/// cheap. `cargo xtask` is a debug build without the feature (which needs protoc, so that `setup`
/// builds on a fresh machine). Returns only if nothing was to be done.
fn reexec_for_bench(ws: &Path, args: &BenchArgs) -> Result<()> {
    let release = !args.debug_client;
    if cfg!(feature = "etcd-baseline") && cfg!(debug_assertions) != release {
        return Ok(());
    }
    let mut build = cargo();
    build.current_dir(ws).arg("build");
    if release {
        build.arg("--release");
    }
    build.args(["-p", "xtask", "--features", "etcd-baseline"]);
    say(format!(
        "cargo build{} -p xtask --features etcd-baseline (the load generator{})",
        if release { " --release" } else { "" },
        if release {
            "; --debug-client skips the release build"
        } else {
            ""
        },
    ));
    run(&mut build)?;
    let exe = target_dir(ws)?
        .join(if release { "release" } else { "debug" })
        .join("xtask");
    let error = std::os::unix::process::CommandExt::exec(
        Command::new(&exe).args(std::env::args_os().skip(1)),
    );
    Err(error).with_context(|| format!("could not run {}", exe.display()))
}

// ---- the apiserver bench -------------------------------------------------------------------

/// The running server; stopped (with its etcd) when dropped.
pub(crate) struct Server {
    pub(crate) group: Option<ProcessGroup>,
    pub(crate) log: PathBuf,
}

impl Server {
    pub(crate) fn log_tail(&self) -> String {
        tail(&fs::read_to_string(&self.log).unwrap_or_default(), 40)
    }

    pub(crate) fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.group.as_mut().and_then(ProcessGroup::exited) {
            bail!("skiff-control exited with {status}");
        }
        Ok(())
    }

    pub(crate) fn stop(&mut self) {
        if let Some(group) = self.group.take() {
            group.terminate(STOP_GRACE);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn apiserver(ws: &Path, args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    say("cargo build --release -p skiff-control");
    run(cargo()
        .current_dir(ws)
        .args(["build", "--release", "-p", "skiff-control"]))?;
    let bin = target_dir(ws)?.join("release").join("skiff-control");
    ensure!(bin.exists(), "{} was not built", bin.display());

    let dir = tempfile::Builder::new()
        .prefix("skiff-bench-")
        .tempdir()
        .context("could not create a temporary directory")?;
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    let port = free_port();
    let log_file = fs::File::create(&log).context("could not create the server log")?;
    let mut cmd = Command::new(&bin);
    cmd.arg("apiserver")
        .arg("--data-dir")
        .arg(&data)
        .args(["--bind-address", "127.0.0.1"])
        .arg("--secure-port")
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    say(format!(
        "starting {} apiserver on https://127.0.0.1:{port} (data in {})",
        bin.display(),
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
    let group =
        ProcessGroup::spawn(cmd).with_context(|| format!("could not start {}", bin.display()))?;
    let mut server = Server {
        group: Some(group),
        log,
    };

    let outcome = runtime.block_on(async {
        tokio::select! {
            result = measure(&mut server, &data, port, args) => Ok(result),
            signal = interrupts.recv() => Err(signal),
        }
    });
    // Watch connections may still be open: drop every task before the server goes.
    runtime.shutdown_timeout(Duration::from_secs(1));
    let tail = server.log_tail();
    say("stopping skiff-control");
    server.stop();
    drop(dir);
    let report = match outcome {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => bail!("{e:#}\n--- server log (last lines) ---\n{tail}"),
        Err(signal) => {
            bail!("interrupted by {signal}; the server is stopped and its files removed")
        }
    };

    let machine = Machine::describe(ws);
    println!("{}", report.table(&machine));
    if args.no_write {
        say("--no-write: BENCHMARKS.md left as it is");
    } else {
        write_section(ws, Target::Apiserver, &report.markdown(&machine))?;
    }
    say(format!(
        "bench finished in {:.0}s; the server is stopped and its files removed",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// SIGINT, SIGTERM and SIGHUP handlers, installed before the server starts so that none of
/// them can kill us (the default action) and leave the server running.
pub(crate) struct Interrupts(
    tokio::signal::unix::Signal,
    tokio::signal::unix::Signal,
    tokio::signal::unix::Signal,
);

impl Interrupts {
    /// Installs the handlers; needs a runtime context.
    pub(crate) fn install() -> Result<Interrupts> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind: SignalKind| signal(kind).context("could not install a signal handler");
        Ok(Interrupts(
            install(SignalKind::interrupt())?,
            install(SignalKind::terminate())?,
            install(SignalKind::hangup())?,
        ))
    }

    /// Resolves on the next signal, with its name.
    pub(crate) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.0.recv() => "SIGINT",
            _ = self.1.recv() => "SIGTERM",
            _ = self.2.recv() => "SIGHUP",
        }
    }
}

/// Everything the apiserver bench measured.
struct Report {
    /// `--requests` and `--seconds`: the bounds of each level.
    requests: usize,
    seconds: u64,
    creates: Vec<Level>,
    gets: Vec<Level>,
    etcd_puts: Vec<Level>,
    etcd_creates: Vec<Level>,
    watch: WatchResult,
    memory: Memory,
}

/// Waits for the server, then runs every measurement.
async fn measure(server: &mut Server, data: &Path, port: u16, args: &BenchArgs) -> Result<Report> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let pki = data.join("pki");
    let tls = wait_ready(server, &pki, addr).await?;
    let server_pid = server.group.as_ref().map_or(0, ProcessGroup::id);
    let etcd_pid = child_named(server_pid, "etcd")
        .with_context(|| format!("found no etcd child of skiff-control (pid {server_pid})"))?;
    let pids = Pids {
        server: server_pid,
        etcd: etcd_pid,
    };
    say(format!(
        "ready (skiff-control pid {server_pid}, etcd pid {etcd_pid}); idle for {IDLE_SETTLE:?}"
    ));
    tokio::time::sleep(IDLE_SETTLE).await;
    let idle_server = vm_rss_kib(pids.server).context("could not read skiff-control's VmRSS")?;
    let idle_etcd = vm_rss_kib(pids.etcd).context("could not read etcd's VmRSS")?;

    let sampler = Sampler::start(vec![pids.server, pids.etcd]);
    let limit = Duration::from_secs(args.seconds);
    let mut setup = Client::tls(&tls, addr).await?;
    for ns in [NAMESPACE, WATCH_NAMESPACE] {
        let body =
            format!(r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{ns}"}}}}"#);
        setup
            .expect(
                Method::POST,
                "/api/v1/namespaces",
                Some(body),
                StatusCode::CREATED,
            )
            .await
            .with_context(|| format!("could not create namespace {ns}"))?;
    }

    let mut creates = Vec::new();
    for clients in CLIENT_LEVELS {
        server.check_running()?;
        let op = Op::Create {
            namespace: NAMESPACE,
            prefix: format!("c{clients}"),
        };
        let level = run_level(&tls, addr, clients, op, args.requests, limit, pids).await?;
        say(format!("create x{clients}: {}", level.summary()));
        creates.push(level);
    }

    let mut gets = Vec::new();
    let get_path = format!("/api/v1/namespaces/{NAMESPACE}/configmaps/c1-0");
    for clients in CLIENT_LEVELS {
        server.check_running()?;
        let op = Op::Get {
            path: get_path.clone(),
        };
        let level = run_level(&tls, addr, clients, op, args.requests, limit, pids).await?;
        say(format!("get x{clients}: {}", level.summary()));
        gets.push(level);
    }

    server.check_running()?;
    let watch = watch_fan_out(&tls, addr).await?;
    say(format!(
        "watch: {} watchers x {} events, ack->event p50 {} p99 {}",
        watch.watchers,
        watch.events,
        micros(watch.after_ack.percentile(50.0)),
        micros(watch.after_ack.percentile(99.0)),
    ));
    let peaks = sampler.stop();
    let (peak_server, peak_etcd) = (
        peaks.first().copied().unwrap_or(0),
        peaks.get(1).copied().unwrap_or(0),
    );
    server.check_running()?;

    // The baselines go last, outside the memory sampling: they load etcd alone, through one
    // gRPC connection shared by every task as skiff-control does, with the same client library.
    let (etcd_puts, etcd_creates) = etcd_baselines(data, args.requests, limit, pids).await?;

    Ok(Report {
        requests: args.requests,
        seconds: args.seconds,
        creates,
        gets,
        etcd_puts,
        etcd_creates,
        watch,
        memory: Memory {
            idle_server,
            idle_etcd,
            peak_server: peak_server.max(idle_server),
            peak_etcd: peak_etcd.max(idle_etcd),
        },
    })
}

/// The etcd baselines: plain puts, then a create's etcd work, at each client level.
#[cfg(feature = "etcd-baseline")]
async fn etcd_baselines(
    data: &Path,
    requests: usize,
    limit: Duration,
    pids: Pids,
) -> Result<(Vec<Level>, Vec<Level>)> {
    let etcd_port = etcd_client_port(data)?;
    let endpoint = format!("http://127.0.0.1:{etcd_port}");
    let etcd = etcd_client::Client::connect([endpoint.as_str()], None)
        .await
        .with_context(|| format!("could not connect to etcd at {endpoint}"))?;
    let kv = etcd.kv_client();
    let mut etcd_puts = Vec::new();
    let mut etcd_creates = Vec::new();
    for clients in CLIENT_LEVELS {
        let conns = (0..clients)
            .map(|_| Conn::Etcd(Box::new(kv.clone())))
            .collect();
        let op = Op::EtcdPut {
            prefix: format!("/skiff-bench-baseline/put{clients}/"),
        };
        let level = drive(conns, clients, op, requests, limit, pids).await?;
        say(format!("etcd put x{clients}: {}", level.summary()));
        etcd_puts.push(level);
    }
    for clients in CLIENT_LEVELS {
        let conns = (0..clients)
            .map(|_| Conn::Etcd(Box::new(kv.clone())))
            .collect();
        let op = Op::EtcdCreate {
            prefix: format!("/skiff-bench-baseline/create{clients}/"),
        };
        let level = drive(conns, clients, op, requests, limit, pids).await?;
        say(format!("etcd create txn x{clients}: {}", level.summary()));
        etcd_creates.push(level);
    }
    Ok((etcd_puts, etcd_creates))
}

/// Without the etcd client built in there are no baselines: `bench` re-runs itself from a build
/// with `etcd-baseline`, so this is reached only by a build that skipped that.
#[cfg(not(feature = "etcd-baseline"))]
async fn etcd_baselines(
    _data: &Path,
    _requests: usize,
    _limit: Duration,
    _pids: Pids,
) -> Result<(Vec<Level>, Vec<Level>)> {
    bail!("the etcd baselines need xtask built with --features etcd-baseline")
}

/// Waits until the server's certificates exist and `GET /readyz` answers 200; returns the
/// client TLS configuration (trusting the server's CA, presenting the admin certificate).
pub(crate) async fn wait_ready(
    server: &mut Server,
    pki: &Path,
    addr: SocketAddr,
) -> Result<Arc<rustls::ClientConfig>> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("the admin certificate was not written yet");
    let mut tls = None;
    loop {
        server.check_running()?;
        if tls.is_none() && pki.join("admin.key").exists() {
            // The files may be half-written: retry until they parse.
            match client_tls(pki) {
                Ok(config) => tls = Some(config),
                Err(e) => last = format!("{e:#}"),
            }
        }
        if let Some(config) = &tls {
            match readyz(config, addr).await {
                Ok(()) => return Ok(config.clone()),
                Err(e) => last = format!("{e:#}"),
            }
        }
        if Instant::now() >= deadline {
            bail!("skiff-control was not ready after {READY_TIMEOUT:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn readyz(tls: &Arc<rustls::ClientConfig>, addr: SocketAddr) -> Result<()> {
    let mut client = Client::tls(tls, addr).await?;
    client
        .expect(Method::GET, "/readyz", None, StatusCode::OK)
        .await?;
    Ok(())
}

/// The client TLS configuration from the server's `pki/` directory.
pub(crate) fn client_tls(pki: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let read = |name: &str| {
        let path = pki.join(name);
        fs::read(&path).with_context(|| format!("could not read {}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read("ca.crt")?) {
        roots
            .add(ca.context("ca.crt holds a bad certificate")?)
            .context("ca.crt is not a usable root")?;
    }
    let chain = CertificateDer::pem_slice_iter(&read("admin.crt")?)
        .collect::<Result<Vec<_>, _>>()
        .context("admin.crt holds a bad certificate")?;
    ensure!(!chain.is_empty(), "admin.crt holds no certificate");
    let key =
        PrivateKeyDer::from_pem_slice(&read("admin.key")?).context("admin.key holds no key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("no TLS protocol version")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("the admin certificate and key do not fit")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

// ---- HTTP client -----------------------------------------------------------------------------

/// One HTTP/1.1 keep-alive connection.
pub(crate) struct Client {
    pub(crate) sender: SendRequest<Full<Bytes>>,
    pub(crate) host: String,
}

impl Client {
    /// Connects over TLS (server name 127.0.0.1, which the serving certificate holds).
    pub(crate) async fn tls(
        config: &Arc<rustls::ClientConfig>,
        addr: SocketAddr,
    ) -> Result<Client> {
        let tcp = connect_tcp(addr).await?;
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS handshake with {addr} failed"))?;
        Client::handshake(TokioIo::new(tls), addr).await
    }

    async fn handshake<T>(io: TokioIo<T>, addr: SocketAddr) -> Result<Client>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::handshake(io)
            .await
            .with_context(|| format!("HTTP/1.1 handshake with {addr} failed"))?;
        tokio::spawn(async move {
            // Errors show up on the requests; a closed connection is normal at the end.
            let _ = conn.await;
        });
        Ok(Client {
            sender,
            host: addr.to_string(),
        })
    }

    pub(crate) fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.host)
            .header(ACCEPT, "application/json");
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        builder
            .body(Full::new(body.map(Bytes::from).unwrap_or_default()))
            .context("could not build a request")
    }

    /// Sends a request and reads the whole answer: (status, body).
    pub(crate) async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Bytes)> {
        let request = self.request(method.clone(), path, body)?;
        self.sender
            .ready()
            .await
            .with_context(|| format!("{method} {path}: the connection closed"))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .with_context(|| format!("{method} {path} failed"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("{method} {path}: reading the answer failed"))?
            .to_bytes();
        Ok((status, body))
    }

    /// Like [`Client::send`], failing unless the status is `want`.
    pub(crate) async fn expect(
        &mut self,
        method: Method,
        path: &str,
        body: Option<String>,
        want: StatusCode,
    ) -> Result<Bytes> {
        let (status, answer) = self.send(method.clone(), path, body).await?;
        ensure!(
            status == want,
            "{method} {path} answered {status}, expected {want}: {}",
            String::from_utf8_lossy(&answer[..answer.len().min(500)])
        );
        Ok(answer)
    }
}

/// A load generator's connection: to skiff-control, or a handle on the shared etcd channel.
enum Conn {
    Http(Client),
    #[cfg(feature = "etcd-baseline")]
    Etcd(Box<etcd_client::KvClient>),
}

impl Conn {
    /// Performs request number `i` of `op`.
    async fn perform(&mut self, op: &Op, i: usize) -> Result<()> {
        match (self, op) {
            (Conn::Http(client), Op::Create { namespace, prefix }) => {
                let path = format!("/api/v1/namespaces/{namespace}/configmaps");
                let body = config_map(&format!("{prefix}-{i}"));
                client
                    .expect(Method::POST, &path, Some(body), StatusCode::CREATED)
                    .await?;
            }
            (Conn::Http(client), Op::Get { path }) => {
                client
                    .expect(Method::GET, path, None, StatusCode::OK)
                    .await?;
            }
            #[cfg(feature = "etcd-baseline")]
            (Conn::Etcd(kv), Op::EtcdPut { prefix }) => {
                kv.put(format!("{prefix}{i}"), STORED_CONFIG_MAP, None)
                    .await
                    .context("etcd put failed")?;
            }
            #[cfg(feature = "etcd-baseline")]
            (Conn::Etcd(kv), Op::EtcdCreate { prefix }) => {
                use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                let key = format!("{prefix}{i}");
                let txn = Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), STORED_CONFIG_MAP, None)])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                let answer = kv.txn(txn).await.context("etcd txn failed")?;
                ensure!(answer.succeeded(), "etcd txn found {key} already there");
            }
            #[cfg(feature = "etcd-baseline")]
            _ => bail!("this operation needs another kind of connection"),
        }
        Ok(())
    }
}

async fn connect_tcp(addr: SocketAddr) -> Result<TcpStream> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("could not connect to {addr}"))?;
    tcp.set_nodelay(true).context("could not set TCP_NODELAY")?;
    Ok(tcp)
}

/// A small ConfigMap named `name`.
fn config_map(name: &str) -> String {
    format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}","labels":{{"app":"bench"}}}},"data":{{"key":"value","other":"a somewhat longer value"}}}}"#
    )
}

// ---- load levels ---------------------------------------------------------------------------

/// What each request of a level does.
enum Op {
    /// POST a ConfigMap named `<prefix>-<i>` into `namespace`.
    Create {
        namespace: &'static str,
        prefix: String,
    },
    /// GET `path`.
    Get { path: String },
    /// Put key `<prefix><i>` into etcd.
    #[cfg(feature = "etcd-baseline")]
    EtcdPut { prefix: String },
    /// What a create costs in etcd alone: create `<prefix><i>` in a transaction that checks it
    /// is absent (skiff-control checks the namespace in its watch-fed cache, not in etcd).
    #[cfg(feature = "etcd-baseline")]
    EtcdCreate { prefix: String },
}

/// The processes whose CPU time and memory are measured.
#[derive(Debug, Clone, Copy)]
struct Pids {
    server: u32,
    etcd: u32,
}

/// One concurrency level's results.
struct Level {
    clients: usize,
    elapsed: Duration,
    latencies: Samples,
    /// CPU time (user + system) of skiff-control, etcd and this process during the level.
    cpu_server: Duration,
    cpu_etcd: Duration,
    cpu_client: Duration,
    /// CPU time the whole machine was busy (all processes, kernel included).
    cpu_machine: Duration,
}

impl Level {
    fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// CPU time per request, in microseconds.
    fn per_request(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.latencies.len().max(1) as f64
    }

    /// CPUs kept busy by everything else (other processes, interrupts) during the level.
    fn other_cores(&self) -> f64 {
        let ours = self.cpu_server + self.cpu_etcd + self.cpu_client;
        self.cpu_machine.saturating_sub(ours).as_secs_f64() / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn summary(&self) -> String {
        format!(
            "{} requests in {:.1}s, {:.0}/s, p50 {} p90 {} p99 {}",
            self.latencies.len(),
            self.elapsed.as_secs_f64(),
            self.throughput(),
            micros(self.latencies.percentile(50.0)),
            micros(self.latencies.percentile(90.0)),
            micros(self.latencies.percentile(99.0)),
        )
    }
}

/// Opens `clients` TLS connections and runs `op` on them.
async fn run_level(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    clients: usize,
    op: Op,
    total: usize,
    limit: Duration,
    pids: Pids,
) -> Result<Level> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(Conn::Http(Client::tls(tls, addr).await?));
    }
    drive(conns, clients, op, total, limit, pids).await
}

/// Runs `op` on every connection at once until `total` requests are done or `limit` passed.
async fn drive(
    conns: Vec<Conn>,
    clients: usize,
    op: Op,
    total: usize,
    limit: Duration,
    pids: Pids,
) -> Result<Level> {
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = (
        cpu_time(pids.server)?,
        cpu_time(pids.etcd)?,
        cpu_time(std::process::id())?,
        machine_busy()?,
    );
    let start = Instant::now();
    let deadline = start + limit;
    let mut tasks = Vec::with_capacity(conns.len());
    for mut client in conns {
        let op = op.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() >= deadline {
                    break;
                }
                let sent = Instant::now();
                client.perform(&op, i).await?;
                latencies.push(sent.elapsed().as_micros() as i64);
            }
            anyhow::Ok((latencies, Instant::now()))
        }));
    }
    let mut all = Vec::new();
    let mut end = start;
    for task in tasks {
        let (latencies, finished) = task.await.context("a load task panicked")??;
        all.extend(latencies);
        end = end.max(finished);
    }
    let cpu_after = (
        cpu_time(pids.server)?,
        cpu_time(pids.etcd)?,
        cpu_time(std::process::id())?,
        machine_busy()?,
    );
    ensure!(!all.is_empty(), "no request completed in {limit:?}");
    Ok(Level {
        clients,
        elapsed: end - start,
        latencies: Samples::new(all),
        cpu_server: cpu_after.0.saturating_sub(cpu_before.0),
        cpu_etcd: cpu_after.1.saturating_sub(cpu_before.1),
        cpu_client: cpu_after.2.saturating_sub(cpu_before.2),
        cpu_machine: cpu_after.3.saturating_sub(cpu_before.3),
    })
}

// ---- watch fan-out -------------------------------------------------------------------------

/// The watch fan-out's results.
struct WatchResult {
    watchers: usize,
    events: usize,
    /// Event received by a watcher minus create acknowledged, per (watcher, event); negative
    /// when the event arrived before the create's answer.
    after_ack: Samples,
    /// Event received minus create request sent, per (watcher, event).
    after_send: Samples,
    /// From the first create sent to the last event received.
    elapsed: Duration,
}

/// What a watcher task reports.
enum WatchMsg {
    /// The watch's response headers arrived: it is established.
    Started,
    /// An ADDED event for `name` arrived at `at`.
    Added {
        watcher: usize,
        name: String,
        at: Instant,
    },
    /// The watch failed.
    Failed(anyhow::Error),
}

/// 100 watchers on one namespace's ConfigMaps, then 200 creates; checks every watcher got every
/// event exactly once.
async fn watch_fan_out(tls: &Arc<rustls::ClientConfig>, addr: SocketAddr) -> Result<WatchResult> {
    let list_path = format!("/api/v1/namespaces/{WATCH_NAMESPACE}/configmaps");
    let mut creator = Client::tls(tls, addr).await?;
    let list = creator
        .expect(Method::GET, &list_path, None, StatusCode::OK)
        .await?;
    let list: serde_json::Value = serde_json::from_slice(&list).context("the list is not JSON")?;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .context("the list has no metadata.resourceVersion")?
        .to_owned();
    let watch_path = format!("{list_path}?watch=1&resourceVersion={rv}");

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::with_capacity(WATCHERS);
    for watcher in 0..WATCHERS {
        let client = Client::tls(tls, addr).await?;
        let tx = tx.clone();
        let path = watch_path.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = watch_events(client, watcher, &path, &tx).await {
                let _ = tx.send(WatchMsg::Failed(e));
            }
        }));
    }
    drop(tx);
    let aborter = AbortOnDrop(tasks);

    let mut seen = Seen {
        started: 0,
        received: vec![HashMap::new(); WATCHERS],
        total: 0,
        duplicates: 0,
    };
    let ready_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.started < WATCHERS {
        let msg = tokio::time::timeout_at(ready_deadline, rx.recv())
            .await
            .with_context(|| format!("only {} of {WATCHERS} watches started in 30s", seen.started))?
            .context("every watcher ended before starting")?;
        seen.take(msg)?;
    }

    // Create sequentially so that each event's latency is delivery, not queueing.
    let mut sent_at = HashMap::with_capacity(WATCH_EVENTS);
    let mut acked_at = HashMap::with_capacity(WATCH_EVENTS);
    let first_sent = Instant::now();
    let create_path = format!("/api/v1/namespaces/{WATCH_NAMESPACE}/configmaps");
    for i in 0..WATCH_EVENTS {
        let name = format!("w-{i}");
        let sent = Instant::now();
        creator
            .expect(
                Method::POST,
                &create_path,
                Some(config_map(&name)),
                StatusCode::CREATED,
            )
            .await?;
        acked_at.insert(name.clone(), Instant::now());
        sent_at.insert(name, sent);
        // Fail early if a watcher broke (arrival times are taken by the watchers themselves).
        while let Ok(msg) = rx.try_recv() {
            seen.take(msg)?;
        }
    }
    let expected = WATCHERS * WATCH_EVENTS;
    let deadline = tokio::time::Instant::now() + WATCH_GRACE;
    while seen.total < expected {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(msg)) => seen.take(msg)?,
            Ok(None) | Err(_) => break,
        }
    }
    drop(aborter);
    let Seen {
        received,
        duplicates,
        ..
    } = seen;

    let mut after_ack = Vec::with_capacity(expected);
    let mut after_send = Vec::with_capacity(expected);
    let mut last = first_sent;
    let mut missing = Vec::new();
    let mut unexpected = 0;
    for (watcher, events) in received.iter().enumerate() {
        for (name, at) in events {
            let (Some(sent), Some(acked)) = (sent_at.get(name), acked_at.get(name)) else {
                unexpected += 1;
                continue;
            };
            after_send.push(signed_micros(*at, *sent));
            after_ack.push(signed_micros(*at, *acked));
            last = last.max(*at);
        }
        let lost = WATCH_EVENTS - events.keys().filter(|n| sent_at.contains_key(*n)).count();
        if lost > 0 {
            missing.push(format!("watcher {watcher} missed {lost}"));
        }
    }
    ensure!(
        missing.is_empty() && duplicates == 0 && unexpected == 0,
        "watch fan-out lost events: {} of {expected} delivered, {duplicates} duplicates, {unexpected} unexpected; {}",
        after_ack.len(),
        missing
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(WatchResult {
        watchers: WATCHERS,
        events: WATCH_EVENTS,
        after_ack: Samples::new(after_ack),
        after_send: Samples::new(after_send),
        elapsed: last - first_sent,
    })
}

/// What the watchers reported so far.
struct Seen {
    /// Watches established.
    started: usize,
    /// Per watcher: object name → when its ADDED event arrived.
    received: Vec<HashMap<String, Instant>>,
    /// First deliveries, all watchers.
    total: usize,
    /// Events a watcher received more than once.
    duplicates: usize,
}

impl Seen {
    fn take(&mut self, msg: WatchMsg) -> Result<()> {
        match msg {
            WatchMsg::Started => self.started += 1,
            WatchMsg::Added { watcher, name, at } => {
                if self.received[watcher].insert(name, at).is_some() {
                    self.duplicates += 1;
                } else {
                    self.total += 1;
                }
            }
            WatchMsg::Failed(e) => return Err(e.context("a watcher failed")),
        }
        Ok(())
    }
}

/// Aborts its tasks when dropped (so that no watcher outlives the fan-out, even on error).
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// One watcher: sends the watch request, then reports each ADDED event as it arrives.
async fn watch_events(
    mut client: Client,
    watcher: usize,
    path: &str,
    tx: &mpsc::UnboundedSender<WatchMsg>,
) -> Result<()> {
    let request = client.request(Method::GET, path, None)?;
    client
        .sender
        .ready()
        .await
        .context("the watch connection closed")?;
    let response = client
        .sender
        .send_request(request)
        .await
        .context("the watch request failed")?;
    ensure!(
        response.status() == StatusCode::OK,
        "the watch answered {}",
        response.status()
    );
    if tx.send(WatchMsg::Started).is_err() {
        return Ok(());
    }
    let mut body = response.into_body();
    let mut buffer = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the watch stream broke")?;
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
            let event: serde_json::Value =
                serde_json::from_slice(line).context("a watch event is not JSON")?;
            match event["type"].as_str() {
                Some("ADDED") => {
                    let name = event["object"]["metadata"]["name"]
                        .as_str()
                        .context("an ADDED event has no object.metadata.name")?
                        .to_owned();
                    if tx.send(WatchMsg::Added { watcher, name, at }).is_err() {
                        return Ok(());
                    }
                }
                Some("ERROR") => bail!("the watch sent an error: {event}"),
                _ => {}
            }
        }
    }
    bail!("watcher {watcher}: the server ended the watch")
}

fn signed_micros(at: Instant, since: Instant) -> i64 {
    match at.checked_duration_since(since) {
        Some(d) => d.as_micros() as i64,
        None => -((since - at).as_micros() as i64),
    }
}

// ---- processes and memory ------------------------------------------------------------------

/// Idle and peak VmRSS, in KiB.
struct Memory {
    idle_server: u64,
    idle_etcd: u64,
    peak_server: u64,
    peak_etcd: u64,
}

/// Samples processes' VmRSS every [`SAMPLE_EVERY`] on a thread of its own (so that a busy
/// runtime cannot delay it), keeping the peaks.
pub(crate) struct Sampler {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Vec<u64>>,
}

impl Sampler {
    /// Starts sampling `pids`.
    pub(crate) fn start(pids: Vec<u32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut peaks = vec![0; pids.len()];
            while !flag.load(Ordering::Relaxed) {
                for (peak, pid) in peaks.iter_mut().zip(&pids) {
                    *peak = (*peak).max(vm_rss_kib(*pid).unwrap_or(0));
                }
                thread::sleep(SAMPLE_EVERY);
            }
            peaks
        });
        Sampler { stop, thread }
    }

    /// Stops sampling; returns the peaks in KiB, in the order of the pids given to `start`.
    pub(crate) fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// `VmRSS` of `pid` from `/proc/<pid>/status`, in KiB.
pub(crate) fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("could not read /proc/{pid}/status"))?;
    parse_vm_rss(&status).with_context(|| format!("/proc/{pid}/status has no VmRSS"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let kib = fields.next()?.parse().ok()?;
    (fields.next()? == "kB").then_some(kib)
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces).
fn stat_fields(pid: u32) -> Option<(String, Vec<String>)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let rest = stat[close + 1..]
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    Some((comm, rest))
}

/// The first live child of `parent` whose command name is `name`.
pub(crate) fn child_named(parent: u32, name: &str) -> Option<u32> {
    let parent = parent.to_string();
    fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            // After the name: state, ppid, …
            stat_fields(*pid).is_some_and(|(comm, rest)| {
                comm == name
                    && rest.get(1) == Some(&parent)
                    && rest.first().is_some_and(|s| s != "Z")
            })
        })
}

/// User plus system CPU time of `pid` so far.
pub(crate) fn cpu_time(pid: u32) -> Result<Duration> {
    let (_, rest) = stat_fields(pid).with_context(|| format!("could not read /proc/{pid}/stat"))?;
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .map(|i| {
            rest.get(*i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// CPU time the machine was busy so far, all CPUs: the non-idle fields of `/proc/stat`'s `cpu`
/// line (user, nice, system, irq, softirq, steal).
pub(crate) fn machine_busy() -> Result<Duration> {
    let stat = fs::read_to_string("/proc/stat").context("could not read /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal …
    let ticks: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|i| fields.get(*i).copied().unwrap_or(0))
        .sum();
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// `sysconf(_SC_CLK_TCK)`, asked from `getconf` once (100 on every Linux we run on).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

/// The client port of the server's etcd child, from `<data>/etcd.ports` ("client peer").
#[cfg(feature = "etcd-baseline")]
fn etcd_client_port(data: &Path) -> Result<u16> {
    let path = data.join("etcd.ports");
    let text =
        fs::read_to_string(&path).with_context(|| format!("could not read {}", path.display()))?;
    text.split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("{} holds no port: {text:?}", path.display()))
}

// ---- statistics and output -----------------------------------------------------------------

/// Sorted latency samples in microseconds (signed: watch events may beat the create's answer).
pub(crate) struct Samples(pub(crate) Vec<i64>);

impl Samples {
    pub(crate) fn new(mut values: Vec<i64>) -> Samples {
        values.sort_unstable();
        Samples(values)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The nearest-rank percentile `p` (0–100); 0 when empty.
    pub(crate) fn percentile(&self, p: f64) -> i64 {
        if self.0.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    pub(crate) fn max(&self) -> i64 {
        self.0.last().copied().unwrap_or(0)
    }
}

/// Microseconds shown as milliseconds with two decimals.
pub(crate) fn micros(us: i64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

pub(crate) fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Where and when the bench ran.
pub(crate) struct Machine {
    pub(crate) date: String,
    pub(crate) commit: String,
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) memory: String,
    pub(crate) kernel: String,
}

impl Machine {
    /// The opening of every bench section: `Last run: <date> at commit `<commit>`, on <n> cores
    /// (<cpu>), <memory>, <kernel>.`
    pub(crate) fn last_run(&self) -> String {
        format!(
            "Last run: {} at commit `{}`, on {} cores ({}), {}, {}.",
            self.date, self.commit, self.cores, self.cpu, self.memory, self.kernel
        )
    }

    pub(crate) fn describe(ws: &Path) -> Machine {
        let git = |args: &[&str]| {
            Command::new("git")
                .current_dir(ws)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        let mut commit =
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
        if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
            commit.push_str(" (with uncommitted changes)");
        }
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .trim()
                    .strip_suffix(" kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or_else(
                || "unknown".into(),
                |kib| format!("{:.0} GiB RAM", kib as f64 / 1024.0 / 1024.0),
            );
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| format!("Linux {}", s.trim()))
            .unwrap_or_else(|_| "unknown kernel".into());
        Machine {
            date: jiff::Timestamp::now()
                .strftime("%Y-%m-%d %H:%M UTC")
                .to_string(),
            commit,
            cpu,
            cores: thread::available_parallelism().map_or(0, |n| n.get()),
            memory,
            kernel,
        }
    }
}

/// Met/missed, for the goals table.
/// The goals as a markdown table: goal, measured, status.
/// The results of load threads, in order; the first that panicked or failed is the error
/// (`what` names the threads).
pub(crate) fn join_threads<T>(
    threads: Vec<std::thread::JoinHandle<std::io::Result<T>>>,
    what: &str,
) -> Result<Vec<T>> {
    threads
        .into_iter()
        .map(|thread| {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("a {what} thread panicked"))?
                .with_context(|| format!("a {what} thread failed"))
        })
        .collect()
}

pub(crate) fn goals_table(goals: &[(String, String, bool)]) -> String {
    let mut md = String::from("| goal | measured | status |\n|---|---|---|\n");
    for (goal, measured, met) in goals {
        let _ = writeln!(md, "| {goal} | {measured} | {} |", verdict(*met));
    }
    md
}

pub(crate) fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

impl Report {
    fn create_p99_at_50(&self) -> Option<i64> {
        self.creates
            .iter()
            .find(|l| l.clients == 50)
            .map(|l| l.latencies.percentile(99.0))
    }

    /// The goals: (goal, measured, met).
    fn goals(&self) -> Vec<(String, String, bool)> {
        let p99 = self.create_p99_at_50();
        vec![
            (
                format!(
                    "create p99 at 50 clients < {} ms",
                    GOAL_CREATE_P99.as_millis()
                ),
                p99.map_or_else(|| "not measured".into(), micros),
                p99.is_some_and(|p| p < GOAL_CREATE_P99.as_micros() as i64),
            ),
            (
                format!("skiff-control idle RSS < {} MiB", GOAL_IDLE_RSS_KIB / 1024),
                format!(
                    "{} (Rusternetes reports ~{RUSTERNETES_IDLE_MIB} MiB)",
                    mib(self.memory.idle_server)
                ),
                self.memory.idle_server < GOAL_IDLE_RSS_KIB,
            ),
        ]
    }

    /// The terminal table.
    fn table(&self, machine: &Machine) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nskiff-control apiserver bench, {} at {} ({} cores, {})\n",
            machine.date, machine.commit, machine.cores, machine.cpu
        );
        let _ = writeln!(
            out,
            "{:<12} {:>7} {:>9} {:>10} {:>10} {:>10} {:>10} {:>11} {:>10} {:>11} {:>6}",
            "test",
            "clients",
            "requests",
            "req/s",
            "p50",
            "p90",
            "p99",
            "skiff µs/req",
            "etcd µs/req",
            "client µs/req",
            "other"
        );
        for (name, levels) in [
            ("create", &self.creates),
            ("get", &self.gets),
            ("etcd put", &self.etcd_puts),
            ("etcd txn", &self.etcd_creates),
        ] {
            for l in levels {
                let _ = writeln!(
                    out,
                    "{:<12} {:>7} {:>9} {:>10.0} {:>10} {:>10} {:>10} {:>11.0} {:>10.0} {:>11.0} {:>6.2}",
                    name,
                    l.clients,
                    l.latencies.len(),
                    l.throughput(),
                    micros(l.latencies.percentile(50.0)),
                    micros(l.latencies.percentile(90.0)),
                    micros(l.latencies.percentile(99.0)),
                    l.per_request(l.cpu_server),
                    l.per_request(l.cpu_etcd),
                    l.per_request(l.cpu_client),
                    l.other_cores(),
                );
            }
        }
        let w = &self.watch;
        let _ = writeln!(
            out,
            "\nwatch: {} watchers x {} events, all delivered once; ack->event p50 {} p99 {} max {}; send->event p50 {} p99 {}",
            w.watchers,
            w.events,
            micros(w.after_ack.percentile(50.0)),
            micros(w.after_ack.percentile(99.0)),
            micros(w.after_ack.max()),
            micros(w.after_send.percentile(50.0)),
            micros(w.after_send.percentile(99.0)),
        );
        let m = &self.memory;
        let _ = writeln!(
            out,
            "memory (VmRSS): skiff-control idle {} peak {}; etcd idle {} peak {}\n",
            mib(m.idle_server),
            mib(m.peak_server),
            mib(m.idle_etcd),
            mib(m.peak_etcd)
        );
        for (goal, measured, met) in self.goals() {
            let _ = writeln!(
                out,
                "goal {goal}: {measured}: {}",
                if met { "met" } else { "MISSED" }
            );
        }
        out
    }

    /// The BENCHMARKS.md section (between the markers).
    fn markdown(&self, machine: &Machine) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## API server (`cargo xtask bench apiserver`)\n");
        let _ = writeln!(
            md,
            "{} Release build; \
             `skiff-control apiserver` with its own etcd child (Debian etcd 3.4, data in a fresh \
             temporary directory on the local disk); the load generator runs on the same machine \
             and talks HTTPS over loopback with the admin client certificate, one HTTP/1.1 \
             keep-alive connection per client. Each level runs up to {} requests or {} s.\n",
            machine.last_run(),
            self.requests,
            self.seconds,
        );
        let _ = writeln!(md, "### Goals\n");
        md.push_str(&crate::bench::goals_table(&self.goals()));
        let _ = writeln!(md);
        let _ = writeln!(
            md,
            "### Requests\n\nCPU columns: CPU time (user + system) each process spent during the \
             level, per request; `client` is the load generator ({} build). `other` is \
             how many CPUs everything else on the machine kept busy meanwhile (0 on an idle \
             machine; more means the figures are pessimistic).\n",
            if cfg!(debug_assertions) {
                "an unoptimised debug"
            } else {
                "a release"
            }
        );
        let _ = writeln!(
            md,
            "| test | clients | requests | req/s | p50 | p90 | p99 | max | skiff-control CPU/req | etcd CPU/req | client CPU/req | other |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (name, levels) in [
            ("create ConfigMap", &self.creates),
            ("get ConfigMap", &self.gets),
            ("etcd put (baseline)", &self.etcd_puts),
            ("etcd create txn (baseline)", &self.etcd_creates),
        ] {
            for l in levels {
                let cpu = |d: Duration| format!("{:.0} µs", l.per_request(d));
                let _ = writeln!(
                    md,
                    "| {name} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.2} |",
                    l.clients,
                    l.latencies.len(),
                    l.throughput(),
                    micros(l.latencies.percentile(50.0)),
                    micros(l.latencies.percentile(90.0)),
                    micros(l.latencies.percentile(99.0)),
                    micros(l.latencies.max()),
                    if name.starts_with("etcd") {
                        "–".to_owned()
                    } else {
                        cpu(l.cpu_server)
                    },
                    cpu(l.cpu_etcd),
                    cpu(l.cpu_client),
                    l.other_cores(),
                );
            }
        }
        let _ = writeln!(
            md,
            "\nThe etcd baselines skip skiff-control: the load generator talks gRPC to the same etcd \
             with `etcd-client` (the library skiff-control uses), one channel shared by all tasks as \
             in skiff-control, storing values of the size of a stored ConfigMap. `etcd put` is one \
             put; `etcd create txn` is the etcd work of one create in skiff-control (a transaction \
             that creates the key if absent; the namespace is checked in a watch-fed cache), so \
             the gap between it and `create ConfigMap` is skiff-control's own cost (HTTPS, JSON, \
             admission, managedFields), and its latency at a level is what any API server storing \
             in this etcd on this machine would at least add. etcd fsyncs its WAL on every commit \
             (batched under concurrency).\n"
        );
        let w = &self.watch;
        let _ = writeln!(
            md,
            "### Watch fan-out\n\n{} watchers of one namespace's ConfigMaps (`?watch=1&resourceVersion=<rv>`, \
             one connection each), then {} creates one after another: every watcher received every \
             event exactly once ({} deliveries, the last {:.2} s after the first create was sent).\n",
            w.watchers,
            w.events,
            w.after_ack.len(),
            w.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            md,
            "| delivery latency | p50 | p99 | max |\n|---|---:|---:|---:|"
        );
        let _ = writeln!(
            md,
            "| create acknowledged → event received | {} | {} | {} |",
            micros(w.after_ack.percentile(50.0)),
            micros(w.after_ack.percentile(99.0)),
            micros(w.after_ack.max())
        );
        let _ = writeln!(
            md,
            "| create sent → event received | {} | {} | {} |\n",
            micros(w.after_send.percentile(50.0)),
            micros(w.after_send.percentile(99.0)),
            micros(w.after_send.max())
        );
        let early = w.after_ack.0.iter().filter(|v| **v < 0).count();
        if early > 0 {
            let _ = writeln!(
                md,
                "{early} deliveries arrived before the create's own answer (negative latencies).\n"
            );
        }
        let m = &self.memory;
        let _ = writeln!(
            md,
            "### Memory (VmRSS)\n\nIdle: {} s after `/readyz` first answered, before any load. \
             Peak: sampled every {} ms through the create, get and watch tests.\n",
            IDLE_SETTLE.as_secs(),
            SAMPLE_EVERY.as_millis()
        );
        let _ = writeln!(md, "| process | idle | peak under load |\n|---|---:|---:|");
        let _ = writeln!(
            md,
            "| skiff-control | {} | {} |",
            mib(m.idle_server),
            mib(m.peak_server)
        );
        let _ = writeln!(
            md,
            "| etcd (child) | {} | {} |",
            mib(m.idle_etcd),
            mib(m.peak_etcd)
        );
        md
    }
}

// ---- BENCHMARKS.md -------------------------------------------------------------------------

/// The header of a new BENCHMARKS.md.
const BENCHMARKS_HEADER: &str = "# Benchmarks\n\n\
Each section is written by `cargo xtask bench <target>` (between its `bench:<target>` markers) \
and replaced by the next run of that target; text outside the markers is kept. Run the benches \
on an otherwise idle machine: the load generator shares the CPUs with what it measures.\n";

/// Replaces (or adds) the section of `target` in the workspace's BENCHMARKS.md with `body`.
pub(crate) fn write_section(ws: &Path, target: Target, body: &str) -> Result<()> {
    let path = ws.join(BENCHMARKS_FILE);
    let old = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("could not read {}", path.display())),
    };
    let new = update_section(&old, target.name(), body);
    fs::write(&path, new).with_context(|| format!("could not write {}", path.display()))?;
    say(format!("updated {}", path.display()));
    Ok(())
}

/// Prints a bench's markdown, writes it to BENCHMARKS.md unless `--no-write`, and says how long
/// the bench took and what `cleaned` up.
pub(crate) fn publish(
    ws: &Path,
    args: &BenchArgs,
    target: Target,
    markdown: &str,
    started: Instant,
    cleaned: &str,
) -> Result<()> {
    println!("{markdown}");
    if args.no_write {
        say("--no-write: BENCHMARKS.md left as it is");
    } else {
        write_section(ws, target, markdown)?;
    }
    say(format!(
        "bench finished in {:.0}s; {cleaned}",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// `text` with the section of `target` replaced by `body` (appended when absent; a new file gets
/// a header).
pub(crate) fn update_section(text: &str, target: &str, body: &str) -> String {
    let begin = format!("<!-- bench:{target}:begin -->");
    let end = format!("<!-- bench:{target}:end -->");
    let section = format!("{begin}\n{}\n{end}", body.trim_end());
    if let Some(start) = text.find(&begin)
        && let Some(stop) = text[start..].find(&end).map(|i| start + i + end.len())
    {
        return format!("{}{section}{}", &text[..start], &text[stop..]);
    }
    let mut out = if text.trim().is_empty() {
        BENCHMARKS_HEADER.to_owned()
    } else {
        text.trim_end().to_owned() + "\n"
    };
    out.push('\n');
    out.push_str(&section);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let s = Samples::new((1..=100).rev().collect());
        assert_eq!(s.percentile(50.0), 50);
        assert_eq!(s.percentile(90.0), 90);
        assert_eq!(s.percentile(99.0), 99);
        assert_eq!(s.percentile(100.0), 100);
        assert_eq!(s.percentile(0.0), 1);
        assert_eq!(s.max(), 100);
        let one = Samples::new(vec![-7]);
        assert_eq!(one.percentile(99.0), -7);
        assert_eq!(Samples::new(Vec::new()).percentile(50.0), 0);
    }

    #[test]
    fn vm_rss_is_parsed_in_kib() {
        let status = "Name:\tskiff\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        let own = vm_rss_kib(std::process::id()).expect("own VmRSS");
        assert!(own > 0, "a running process has resident memory");
    }

    #[test]
    fn own_cpu_time_and_children_are_found() {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let found = (0..50).find_map(|_| {
            let pid = child_named(std::process::id(), "sleep");
            if pid.is_none() {
                thread::sleep(Duration::from_millis(20));
            }
            pid
        });
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            found,
            Some(child.id()),
            "the sleep child is found by parent pid and name"
        );
        assert_eq!(child_named(std::process::id(), "no-such-command"), None);
        cpu_time(std::process::id()).expect("own CPU time");
    }

    #[test]
    fn machine_busy_time_grows() {
        let before = machine_busy().expect("busy time from /proc/stat");
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(1);
        }
        let after = machine_busy().expect("busy time from /proc/stat");
        assert!(x > 0);
        assert!(before > Duration::ZERO, "a running machine has been busy");
        assert!(
            after >= before,
            "busy time never decreases: {before:?} then {after:?}"
        );
    }

    #[test]
    fn sections_are_added_then_replaced() {
        let first = update_section("", "apiserver", "## A\n\none\n");
        assert!(
            first.starts_with("# Benchmarks\n"),
            "new file gets the header: {first}"
        );
        assert!(first.contains(
            "<!-- bench:apiserver:begin -->\n## A\n\none\n<!-- bench:apiserver:end -->\n"
        ));

        let with_notes = format!("{first}\nHand-written notes.\n");
        let second = update_section(&with_notes, "scheduler", "## S\n");
        assert!(
            second.contains("## A\n\none"),
            "other sections are kept: {second}"
        );
        assert!(
            second.contains("Hand-written notes."),
            "notes are kept: {second}"
        );
        assert!(second.ends_with("<!-- bench:scheduler:end -->\n"));

        let third = update_section(&second, "apiserver", "## A\n\ntwo\n");
        assert!(
            !third.contains("one"),
            "the old section is replaced: {third}"
        );
        assert!(third.contains("## A\n\ntwo\n<!-- bench:apiserver:end -->"));
        assert!(
            third.contains("## S\n"),
            "the scheduler section stays: {third}"
        );
        assert!(third.contains("Hand-written notes."));
        assert_eq!(third.matches("bench:apiserver:begin").count(), 1);
    }
}
