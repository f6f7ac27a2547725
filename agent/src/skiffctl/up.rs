//! `skiffctl up`: build the fabric, start the control plane, containerd and
//! an agent per node, wait until every node is Ready, route pod CIDRs.
//!
//! Every step prints a progress line and records what it made in the state
//! file before going on, so a failed `up` leaves a state that `down`
//! cleans. Running `up` on a healthy cluster only shows its status.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Node;

use super::fabric::{self, CONTROL_IP, EXT_IP, Layout, MAX_NODES};
use super::procs::{self, Spawned};
use super::state::{NodeRecord, State};
use super::{ClusterArgs, SkiffctlError, log_tail};

/// The API server's port on the fabric.
pub const FABRIC_API_PORT: u16 = 6443;
/// The pod network node IPAM carves the nodes' pod CIDRs from.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The default service range (kube-apiserver's `--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The containerd namespace the agents and the image import use.
pub const CONTAINERD_NAMESPACE: &str = "skiff";
/// The image file `cargo xtask image` writes, relative to the target dir.
pub const IMAGE_FILE: &str = "skiff-busybox.oci.tar";

/// Flags of `skiffctl up`.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// The cluster's state directory and name.
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// How many nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Where to write the admin kubeconfig for the host (default
    /// `<state-dir>/kubeconfig`); an existing file is never overwritten.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The host port (on 127.0.0.1) kubectl reaches the API server on.
    #[arg(long, default_value_t = 6443)]
    pub api_port: u16,
    /// The OCI image archive imported into every node's containerd
    /// (default `<target>/skiff-busybox.oci.tar` beside the binaries, as
    /// `cargo xtask image` writes it).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Where `skiff-control`, `skiff-agent` and `skiff-cni` are (default:
    /// beside `skiffctl`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// How long to wait for the API server and for every node to be Ready.
    #[arg(long, value_parser = skiff_common::duration::parse_duration, default_value = "120s")]
    pub timeout: Duration,
    /// The pod network every node's pod CIDR comes from.
    #[arg(long, default_value = CLUSTER_CIDR)]
    pub cluster_cidr: Ipv4Network,
    /// The range ClusterIPs come from.
    #[arg(long, default_value = SERVICE_CIDR)]
    pub service_cidr: Ipv4Network,
    /// Run hollow agents (no containers) instead of real ones.
    #[arg(long, hide = true)]
    pub hollow: bool,
    /// Entries of each agent's conntrack map (`skiff-agent --bpf-ct-max`; default the agent's).
    #[arg(long)]
    pub bpf_ct_max: Option<u32>,
    /// A resolver the cluster DNS forwards names outside the cluster to (`ip` or `ip:port`;
    /// repeat for more). The fabric has no way out of the machine: without one, such names
    /// fail (SERVFAIL once the host's resolvers time out); a resolver in `skiff-ext`
    /// (10.90.0.200) is one the fabric reaches.
    #[arg(long = "dns-upstream")]
    pub dns_upstreams: Vec<String>,
}

/// Refuse ranges that overlap: the fabric (nodes, the control plane and
/// LoadBalancer IPs), the pod network and the service range must be apart,
/// or a ClusterIP or pod IP could equal a node's address.
pub fn check_ranges(
    fabric: Ipv4Network,
    cluster: Ipv4Network,
    service: Ipv4Network,
) -> Result<(), SkiffctlError> {
    let named = [
        ("the fabric", fabric),
        ("the pod network (--cluster-cidr)", cluster),
        ("the service range (--service-cidr)", service),
    ];
    for (i, (a_name, a)) in named.iter().enumerate() {
        for (b_name, b) in &named[i + 1..] {
            if a.overlaps(*b) {
                return Err(SkiffctlError::cluster(format!(
                    "{a_name} {a} overlaps {b_name} {b}: choose ranges that do not overlap"
                )));
            }
        }
    }
    Ok(())
}

/// The programs a cluster runs.
struct Binaries {
    control: PathBuf,
    agent: PathBuf,
    cni: Option<PathBuf>,
}

impl Binaries {
    fn find(args: &UpArgs) -> Result<Binaries, SkiffctlError> {
        let dir = match &args.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(Path::to_path_buf))
                .unwrap_or_default(),
        };
        let find = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(SkiffctlError::cluster(format!(
                    "{name} is not in {} (build it with `cargo build --workspace`, or pass --bin-dir)",
                    dir.display()
                )))
            }
        };
        let cni = if args.hollow {
            None
        } else {
            Some(find("skiff-cni")?)
        };
        Ok(Binaries {
            control: find("skiff-control")?,
            agent: find("skiff-agent")?,
            cni,
        })
    }
}

/// A system program that must be on `PATH`.
fn require_on_path(name: &str, package: &str) -> Result<(), SkiffctlError> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(name).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(SkiffctlError::cluster(format!(
            "{name} is not on PATH (install {package}, e.g. with `cargo xtask setup`)"
        )))
    }
}

/// Progress lines: `[3/9] starting containerd on node-1 … ok`.
struct Progress {
    step: usize,
    total: usize,
}

impl Progress {
    fn begin(&mut self, what: &str) {
        self.step += 1;
        print!("[{}/{}] {what} … ", self.step, self.total);
        let _ = std::io::stdout().flush();
    }

    fn end<T>(&self, result: &Result<T, SkiffctlError>) {
        match result {
            Ok(_) => println!("ok"),
            Err(_) => println!("failed"),
        }
    }
}

/// A started process and where it logs, to notice an early death.
struct Watched {
    label: String,
    child: Child,
    log: PathBuf,
}

/// An `up` in progress.
struct Up<'a> {
    args: &'a UpArgs,
    dir: PathBuf,
    layout: Layout,
    state: State,
    progress: Progress,
    watched: Vec<Watched>,
    runtime: tokio::runtime::Runtime,
    /// The host listener, bound before anything is made (a busy port fails
    /// at once), handed to the forwarder.
    listener: Option<std::net::TcpListener>,
}

/// Run `skiffctl up`.
pub fn up(args: &UpArgs) -> Result<(), SkiffctlError> {
    let dir = args.cluster.state_dir();
    if args.nodes == 0 || args.nodes > MAX_NODES {
        return Err(SkiffctlError::cluster(format!(
            "--nodes must be between 1 and {MAX_NODES}"
        )));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(SkiffctlError::cluster(
            "skiffctl up needs root (network namespaces, mounts, containerd)",
        ));
    }
    if let Some(state) = State::load(&dir)? {
        return already_up(args, &dir, &state);
    }
    check_ranges(fabric::fabric_cidr(), args.cluster_cidr, args.service_cidr)?;
    let layout = Layout::new(&args.cluster.name, args.nodes);
    let clashing: Vec<String> = fabric::list_netns()
        .into_iter()
        .filter(|n| layout.owns_netns(n))
        .collect();
    if !clashing.is_empty() {
        return Err(SkiffctlError::cluster(format!(
            "network namespaces {} exist but {} holds no cluster state; remove them with `skiffctl down --state-dir {} --name '{}'`",
            clashing.join(", "),
            dir.display(),
            dir.display(),
            args.cluster.name
        )));
    }
    let kubeconfig = args
        .kubeconfig
        .as_deref()
        .map(super::absolute)
        .unwrap_or_else(|| dir.join("kubeconfig"));
    if kubeconfig.exists() {
        return Err(SkiffctlError::cluster(format!(
            "kubeconfig {} already exists; remove it or pass another --kubeconfig",
            kubeconfig.display()
        )));
    }
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, args.api_port));
    let listener = std::net::TcpListener::bind(listen).map_err(|source| SkiffctlError::Io {
        what: "cannot listen for the API forwarder (is the port taken? pass --api-port)",
        path: PathBuf::from(listen.to_string()),
        source,
    })?;
    let binaries = Binaries::find(args)?;
    require_on_path("ip", "iproute2")?;
    require_on_path("etcd", "etcd-server")?;
    require_on_path("containerd", "containerd")?;
    require_on_path("ctr", "containerd")?;
    if !args.hollow && !agent_has_real_mode(&binaries.agent) {
        return Err(SkiffctlError::cluster(format!(
            "{} has no real node mode yet (no --node-name); pass --hollow for simulated nodes",
            binaries.agent.display()
        )));
    }
    let created_state_dir = !dir.exists();
    std::fs::create_dir_all(&dir).map_err(|source| SkiffctlError::Io {
        what: "cannot create the state directory",
        path: dir.clone(),
        source,
    })?;
    let state = State {
        name: args.cluster.name.clone(),
        created_state_dir,
        kubeconfig: Some(kubeconfig),
        api_port: args.api_port,
        hollow: args.hollow,
        ..State::default()
    };
    state.save(&dir)?;
    let n = args.nodes;
    let mut up = Up {
        args,
        dir: dir.clone(),
        layout,
        state,
        // fabric, control plane, forwarder, cluster DNS, containerd ×n,
        // image ×n, agent ×n, ready, routes
        progress: Progress {
            step: 0,
            total: 6 + 3 * n,
        },
        watched: Vec::new(),
        runtime: super::runtime()?,
        listener: Some(listener),
    };
    match up.run(&binaries) {
        Ok(()) => Ok(()),
        Err(error) => {
            eprintln!(
                "\nthe cluster is partial; see the logs under {}, then remove it with `skiffctl down --state-dir {}`",
                dir.join("logs").display(),
                dir.display()
            );
            Err(error)
        }
    }
}

/// `up` on a directory that already holds a cluster.
fn already_up(args: &UpArgs, dir: &Path, state: &State) -> Result<(), SkiffctlError> {
    let problems = super::status::problems(state);
    if state.complete && problems.is_empty() {
        if args.nodes != state.nodes.len() {
            println!(
                "note: the running cluster has {} nodes; --nodes {} is ignored (run `skiffctl down` first to change it)",
                state.nodes.len(),
                args.nodes
            );
        }
        println!("a cluster is already up in {}", dir.display());
        return super::status::print(dir, state);
    }
    let mut why = problems;
    if !state.complete {
        why.insert(0, "its `up` did not finish".to_string());
    }
    Err(SkiffctlError::cluster(format!(
        "the cluster in {} is partial ({}); remove it with `skiffctl down --state-dir {}` and run `up` again",
        dir.display(),
        why.join("; "),
        dir.display()
    )))
}

/// Whether `skiff-agent --help` shows the real node mode.
fn agent_has_real_mode(agent: &Path) -> bool {
    Command::new(agent)
        .arg("--help")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("--node-name"))
}

impl Up<'_> {
    fn save(&self) -> Result<(), SkiffctlError> {
        self.state.save(&self.dir)
    }

    fn step<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Self) -> Result<T, SkiffctlError>,
    ) -> Result<T, SkiffctlError> {
        self.progress.begin(what);
        let result = f(self);
        self.progress.end(&result);
        let saved = self.save();
        let value = result?;
        saved?;
        Ok(value)
    }

    fn run(&mut self, binaries: &Binaries) -> Result<(), SkiffctlError> {
        let n = self.args.nodes;
        let image = self.image()?;
        self.step("creating the fabric network namespaces", |up| up.fabric())?;
        let control_kubeconfig = self.step(
            "starting the control plane (etcd, API server, controllers, scheduler)",
            |up| up.control_plane(binaries),
        )?;
        self.step(
            &format!(
                "forwarding 127.0.0.1:{} to the API server",
                self.args.api_port
            ),
            |up| up.forwarder(&control_kubeconfig),
        )?;
        self.step(
            &format!("starting the cluster DNS on {CONTROL_IP}:53"),
            |up| up.cluster_dns(binaries, &control_kubeconfig),
        )?;
        let cni_bin = match &binaries.cni {
            Some(cni) => Some(self.cni_bin_dir(cni)?),
            None => None,
        };
        for i in 1..=n {
            let node = self.layout.node_name(i);
            self.step(&format!("starting containerd on {node}"), |up| {
                up.containerd(i)
            })?;
        }
        for i in 1..=n {
            let node = self.layout.node_name(i);
            match &image {
                Some(image) => self.step(
                    &format!("importing {} into {node}", image.display()),
                    |up| up.import(i, image),
                )?,
                None => {
                    self.progress
                        .begin(&format!("importing the busybox image into {node}"));
                    println!(
                        "skipped (no image: build it with `cargo xtask image` or pass --image)"
                    );
                }
            }
        }
        for i in 1..=n {
            let node = self.layout.node_name(i);
            let agent = binaries.agent.clone();
            self.step(&format!("starting the agent on {node}"), |up| {
                up.agent(i, &agent, &control_kubeconfig, cni_bin.as_deref())
            })?;
        }
        self.step(&format!("waiting until {n} nodes are Ready"), |up| {
            up.wait_ready()
        })?;
        self.step("routing the pod CIDRs between nodes", |up| up.routes())?;
        self.state.complete = true;
        self.save()?;
        let kubeconfig = self.state.kubeconfig.clone().unwrap_or_default();
        println!(
            "\ncluster up: {n} node(s){}\nkubeconfig: {}\n  export KUBECONFIG={}\n  kubectl get nodes -o wide",
            if self.args.hollow { " (hollow)" } else { "" },
            kubeconfig.display(),
            kubeconfig.display()
        );
        Ok(())
    }

    fn fabric(&mut self) -> Result<(), SkiffctlError> {
        let fabric_ns = self.layout.fabric_netns();
        self.add_netns(&fabric_ns)?;
        fabric::create_bridge(&fabric_ns)?;
        for i in 1..=self.args.nodes {
            let netns = self.layout.node_netns(i);
            let ip = self.layout.node_ip(i);
            self.add_netns(&netns)?;
            fabric::plug(&fabric_ns, &format!("veth-{i}"), &netns, ip)?;
            fabric::enable_forwarding(&netns)?;
            let node = self.layout.node_name(i);
            let containerd_address = self
                .node_dir(&node)
                .join("containerd")
                .join("containerd.sock");
            self.state.nodes.push(NodeRecord {
                name: node,
                netns,
                ip,
                containerd_address,
                pod_cidr: None,
            });
        }
        let ext = self.layout.ext_netns();
        self.add_netns(&ext)?;
        fabric::plug(&fabric_ns, "veth-ext", &ext, EXT_IP)?;
        Ok(())
    }

    fn add_netns(&mut self, netns: &str) -> Result<(), SkiffctlError> {
        self.state.namespaces.push(netns.to_string());
        self.save()?;
        fabric::add_netns(netns)
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    fn spawn(
        &mut self,
        role: &str,
        node: Option<&str>,
        netns: Option<&str>,
        command: Vec<String>,
    ) -> Result<(), SkiffctlError> {
        let log = self.log(&match node {
            Some(node) => format!("{role}-{node}"),
            None => role.to_string(),
        });
        let Spawned { record, child } = procs::spawn_detached(role, node, netns, &command, &log)?;
        self.watch(record, child);
        Ok(())
    }

    fn watch(&mut self, record: super::state::ProcessRecord, child: Child) {
        self.watched.push(Watched {
            label: record.label(),
            child,
            log: record.log.clone(),
        });
        self.state.processes.push(record);
    }

    /// An error if a process `up` started has exited.
    fn check_children(&mut self) -> Result<(), SkiffctlError> {
        for w in &mut self.watched {
            if let Ok(Some(status)) = w.child.try_wait() {
                return Err(SkiffctlError::cluster(format!(
                    "{} exited ({status}); its log {} ends with:\n{}",
                    w.label,
                    w.log.display(),
                    log_tail(&w.log, 15)
                )));
            }
        }
        Ok(())
    }

    /// Poll `ready` every 200 ms until it answers, a child dies or the
    /// timeout passes (then `timeout_message`).
    fn wait_for<T>(
        &mut self,
        mut ready: impl FnMut(&mut Self) -> Option<T>,
        timeout_message: impl FnOnce(&mut Self) -> String,
    ) -> Result<T, SkiffctlError> {
        let deadline = Instant::now() + self.args.timeout;
        loop {
            if let Some(value) = ready(self) {
                return Ok(value);
            }
            self.check_children()?;
            if Instant::now() > deadline {
                return Err(SkiffctlError::cluster(timeout_message(self)));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn control_plane(&mut self, binaries: &Binaries) -> Result<PathBuf, SkiffctlError> {
        let data = self.dir.join("control");
        let kubeconfig = data.join("admin-fabric.kubeconfig");
        let command = [
            binaries.control.to_string_lossy().as_ref(),
            "all",
            "--data-dir",
            data.to_string_lossy().as_ref(),
            "--bind-address",
            &CONTROL_IP.to_string(),
            "--secure-port",
            &FABRIC_API_PORT.to_string(),
            "--write-kubeconfig",
            kubeconfig.to_string_lossy().as_ref(),
            "--cluster-cidr",
            &self.args.cluster_cidr.to_string(),
            "--service-cluster-ip-range",
            &self.args.service_cidr.to_string(),
            "--lb-ip-pool",
            &format!("{}-{}", fabric::LB_POOL.0, fabric::LB_POOL.1),
        ]
        .map(str::to_string)
        .to_vec();
        let fabric_ns = self.layout.fabric_netns();
        self.spawn("control-plane", None, Some(&fabric_ns), command)?;
        let log = self.log("control-plane");
        let upstream = SocketAddr::from((CONTROL_IP, FABRIC_API_PORT));
        self.wait_for(
            |_| {
                let listening = fabric::in_netns(&fabric_ns, move || {
                    std::net::TcpStream::connect_timeout(&upstream, Duration::from_millis(500))
                        .is_ok()
                })
                .unwrap_or(false);
                (listening && kubeconfig.is_file()).then(|| kubeconfig.clone())
            },
            |_| {
                format!(
                    "the API server does not listen on {upstream}; its log {} ends with:\n{}",
                    log.display(),
                    log_tail(&log, 15)
                )
            },
        )
    }

    /// `skiff-control dns` in the fabric's namespace, beside the API server: reached by the
    /// pods as the `kube-dns` Service (it creates it), through the nodes' datapath.
    fn cluster_dns(&mut self, binaries: &Binaries, kubeconfig: &Path) -> Result<(), SkiffctlError> {
        let mut command: Vec<String> = [
            binaries.control.to_string_lossy().as_ref(),
            "dns",
            "--kubeconfig",
            kubeconfig.to_string_lossy().as_ref(),
            "--bind-address",
            &CONTROL_IP.to_string(),
            "--cluster-cidr",
            &self.args.cluster_cidr.to_string(),
            "--service-cluster-ip-range",
            &self.args.service_cidr.to_string(),
        ]
        .map(str::to_string)
        .to_vec();
        for upstream in &self.args.dns_upstreams {
            command.extend(["--upstream".to_owned(), upstream.clone()]);
        }
        let fabric_ns = self.layout.fabric_netns();
        self.spawn("cluster-dns", None, Some(&fabric_ns), command)?;
        let log = self.log("cluster-dns");
        let addr = SocketAddr::from((CONTROL_IP, 53));
        self.wait_for(
            |_| {
                fabric::in_netns(&fabric_ns, move || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
                })
                .unwrap_or(false)
                .then_some(())
            },
            |_| {
                format!(
                    "the cluster DNS does not listen on {addr}; its log {} ends with:\n{}",
                    log.display(),
                    log_tail(&log, 15)
                )
            },
        )
    }

    fn forwarder(&mut self, control_kubeconfig: &Path) -> Result<(), SkiffctlError> {
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, self.args.api_port));
        let listener = self.listener.take().expect("bound once, used once");
        let exe = std::env::current_exe().map_err(|source| SkiffctlError::Io {
            what: "cannot find the skiffctl executable",
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?;
        let upstream = SocketAddr::from((CONTROL_IP, FABRIC_API_PORT));
        let command: Vec<String> = vec![
            exe.to_string_lossy().into_owned(),
            "forward".into(),
            "--netns".into(),
            self.layout.fabric_netns(),
            "--connect".into(),
            upstream.to_string(),
        ];
        let mut cmd = Command::new(&exe);
        cmd.args(&command[1..]);
        let stdin = Stdio::from(std::os::fd::OwnedFd::from(listener));
        let log = self.log("api-forwarder");
        let Spawned { record, child } =
            procs::spawn_logged("api-forwarder", None, cmd, stdin, &command, &log)?;
        self.watch(record, child);

        // The host kubeconfig: the control plane's, served on 127.0.0.1.
        let text =
            std::fs::read_to_string(control_kubeconfig).map_err(|source| SkiffctlError::Io {
                what: "cannot read the control plane's kubeconfig",
                path: control_kubeconfig.to_path_buf(),
                source,
            })?;
        let fabric_url = format!("https://{upstream}");
        if !text.contains(&fabric_url) {
            return Err(SkiffctlError::cluster(format!(
                "the control plane's kubeconfig {} does not name {fabric_url}",
                control_kubeconfig.display()
            )));
        }
        let host = text.replace(&fabric_url, &format!("https://{listen}"));
        let path = self.state.kubeconfig.clone().expect("set by up");
        write_private(&path, &host)?;
        if !path.starts_with(&self.dir) {
            self.state.files.push(path.clone());
        }

        // Wait until the API answers through the forwarder.
        let client = self
            .runtime
            .block_on(skiff_common::daemon::client(Some(&path)))
            .map_err(|e| {
                SkiffctlError::cluster(format!(
                    "the kubeconfig {} is unusable: {}",
                    path.display(),
                    skiff_common::error::chain(&e)
                ))
            })?;
        let log = self.log("control-plane");
        self.wait_for(
            |up| {
                up.runtime
                    .block_on(async {
                        tokio::time::timeout(Duration::from_secs(2), client.apiserver_version())
                            .await
                    })
                    .ok()
                    .and_then(Result::ok)
            },
            |_| {
                format!(
                    "the API server does not answer on {listen}; its log {} ends with:\n{}",
                    log.display(),
                    log_tail(&log, 15)
                )
            },
        )?;
        Ok(())
    }

    /// A CNI plugin directory: `skiff-cni` plus the reference plugins
    /// (loopback, portmap, tuning) for chains, as symlinks.
    fn cni_bin_dir(&mut self, skiff_cni: &Path) -> Result<PathBuf, SkiffctlError> {
        let dir = self.dir.join("cni").join("bin");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SkiffctlError::Io {
                what: "cannot prepare the CNI plugin directory",
                path,
                source,
            }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut links = vec![(skiff_cni.to_path_buf(), dir.join("skiff-cni"))];
        if let Ok(entries) = std::fs::read_dir("/usr/lib/cni") {
            for entry in entries.flatten() {
                links.push((entry.path(), dir.join(entry.file_name())));
            }
        }
        for (target, link) in links {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link).map_err(io(&link))?;
        }
        Ok(dir)
    }

    fn containerd(&mut self, i: usize) -> Result<(), SkiffctlError> {
        let record = self.state.nodes[i - 1].clone();
        let dir = self.node_dir(&record.name).join("containerd");
        let config = dir.join("config.toml");
        let text = containerd_config(&dir, &record.containerd_address);
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&config, text))
            .map_err(|source| SkiffctlError::Io {
                what: "cannot write the containerd configuration",
                path: config.clone(),
                source,
            })?;
        let command = vec![
            "containerd".to_string(),
            "--config".to_string(),
            config.to_string_lossy().into_owned(),
        ];
        self.spawn(
            "containerd",
            Some(&record.name),
            Some(&record.netns),
            command,
        )?;
        let address = record.containerd_address.to_string_lossy().into_owned();
        let log = self.log(&format!("containerd-{}", record.name));
        self.wait_for(
            |_| {
                (record.containerd_address.exists()
                    && fabric::run("ctr", &["-a", &address, "version"]).is_ok())
                .then_some(())
            },
            |_| {
                format!(
                    "containerd on {} does not answer on {address}; its log {} ends with:\n{}",
                    record.name,
                    log.display(),
                    log_tail(&log, 15)
                )
            },
        )
    }

    /// The image archive to import: `--image`, else the one `cargo xtask
    /// image` wrote beside the binaries, else one built now into the state
    /// directory from the machine's busybox-static; `None` (a warning) when
    /// there is no busybox either.
    fn image(&mut self) -> Result<Option<PathBuf>, SkiffctlError> {
        if let Some(image) = &self.args.image {
            if !image.is_file() {
                return Err(SkiffctlError::cluster(format!(
                    "--image {} does not exist",
                    image.display()
                )));
            }
            return Ok(Some(image.clone()));
        }
        // <target>/debug/skiffctl → <target>/skiff-busybox.oci.tar
        let built = std::env::current_exe().ok().and_then(|exe| {
            let image = exe.parent()?.parent()?.join(IMAGE_FILE);
            image.is_file().then_some(image)
        });
        if built.is_some() {
            return Ok(built);
        }
        let busybox = Path::new(skiff_image::DEFAULT_BUSYBOX);
        if !busybox.is_file() {
            return Ok(None);
        }
        let out = self.dir.join("images").join(IMAGE_FILE);
        self.progress.total += 1;
        self.step(
            &format!(
                "building {} from {}",
                skiff_image::IMAGE_NAME,
                busybox.display()
            ),
            |_| {
                skiff_image::build_image(busybox, &out)
                    .map(|built| Some(built.path))
                    .map_err(|e| {
                        SkiffctlError::cluster(format!(
                            "cannot build the image: {}",
                            skiff_common::error::chain(&e)
                        ))
                    })
            },
        )
    }

    fn import(&mut self, i: usize, image: &Path) -> Result<(), SkiffctlError> {
        let address = self.state.nodes[i - 1]
            .containerd_address
            .to_string_lossy()
            .into_owned();
        fabric::run(
            "ctr",
            &[
                "-a",
                &address,
                "-n",
                CONTAINERD_NAMESPACE,
                "images",
                "import",
                &image.to_string_lossy(),
            ],
        )?;
        Ok(())
    }

    fn agent(
        &mut self,
        i: usize,
        agent: &Path,
        kubeconfig: &Path,
        cni_bin: Option<&Path>,
    ) -> Result<(), SkiffctlError> {
        let record = self.state.nodes[i - 1].clone();
        let mut command = vec![
            agent.to_string_lossy().into_owned(),
            "--kubeconfig".into(),
            kubeconfig.to_string_lossy().into_owned(),
        ];
        if self.args.hollow {
            let prefix = record.name.trim_end_matches(|c: char| c.is_ascii_digit());
            command.extend([
                "--hollow".into(),
                "--count".into(),
                "1".into(),
                "--name-prefix".into(),
                prefix.to_string(),
                "--first-index".into(),
                i.to_string(),
            ]);
        } else {
            let conf_dir = self.node_dir(&record.name).join("cni").join("net.d");
            std::fs::create_dir_all(&conf_dir).map_err(|source| SkiffctlError::Io {
                what: "cannot create the CNI configuration directory",
                path: conf_dir.clone(),
                source,
            })?;
            command.extend([
                "--node-name".into(),
                record.name.clone(),
                "--node-ip".into(),
                record.ip.to_string(),
                "--containerd-address".into(),
                record.containerd_address.to_string_lossy().into_owned(),
                "--cni-bin-dir".into(),
                cni_bin
                    .expect("real agents have a CNI dir")
                    .to_string_lossy()
                    .into_owned(),
                "--cni-conf-dir".into(),
                conf_dir.to_string_lossy().into_owned(),
                "--root-dir".into(),
                self.node_dir(&record.name)
                    .join("agent")
                    .to_string_lossy()
                    .into_owned(),
                "--service-cidr".into(),
                self.args.service_cidr.to_string(),
            ]);
            if let Some(ct) = self.args.bpf_ct_max {
                command.extend(["--bpf-ct-max".into(), ct.to_string()]);
            }
        }
        self.spawn("agent", Some(&record.name), Some(&record.netns), command)
    }

    fn nodes(&self) -> Option<Vec<Node>> {
        let path = self.state.kubeconfig.clone()?;
        self.runtime.block_on(async {
            let client = skiff_common::daemon::client(Some(&path)).await.ok()?;
            let api: kube::Api<Node> = kube::Api::all(client);
            tokio::time::timeout(Duration::from_secs(5), api.list(&Default::default()))
                .await
                .ok()?
                .ok()
                .map(|list| list.items)
        })
    }

    fn wait_ready(&mut self) -> Result<(), SkiffctlError> {
        let names: Vec<String> = self.state.nodes.iter().map(|n| n.name.clone()).collect();
        let not_ready = |nodes: &[Node]| -> Vec<String> {
            names
                .iter()
                .filter(|name| {
                    !nodes
                        .iter()
                        .any(|n| n.metadata.name.as_deref() == Some(name.as_str()) && node_ready(n))
                })
                .cloned()
                .collect()
        };
        let mut last: Vec<String> = names.clone();
        let result = self.wait_for(
            |up| {
                let nodes = up.nodes()?;
                last = not_ready(&nodes);
                last.is_empty().then_some(())
            },
            |_| String::new(),
        );
        match result {
            Err(SkiffctlError::Cluster { message }) if message.is_empty() => {
                let details: Vec<String> = last
                    .iter()
                    .map(|node| {
                        let log = self.log(&format!("agent-{node}"));
                        format!(
                            "{node} is not Ready after {:?}; its agent log {} ends with:\n{}",
                            self.args.timeout,
                            log.display(),
                            log_tail(&log, 10)
                        )
                    })
                    .collect();
                Err(SkiffctlError::cluster(details.join("\n")))
            }
            other => other,
        }
    }

    fn routes(&mut self) -> Result<(), SkiffctlError> {
        let names: Vec<String> = self.state.nodes.iter().map(|n| n.name.clone()).collect();
        let cidrs = self.wait_for(
            |up| {
                let nodes = up.nodes()?;
                names
                    .iter()
                    .map(|name| {
                        nodes
                            .iter()
                            .find(|n| n.metadata.name.as_deref() == Some(name.as_str()))?
                            .spec
                            .as_ref()?
                            .pod_cidr
                            .clone()
                    })
                    .collect::<Option<Vec<String>>>()
            },
            |_| "the nodes got no spec.podCIDR from node IPAM (see the control-plane log)".into(),
        )?;
        for (record, cidr) in self.state.nodes.iter_mut().zip(&cidrs) {
            record.pod_cidr = Some(cidr.clone());
        }
        let nodes = self.state.nodes.clone();
        for target in &nodes {
            let cidr = target.pod_cidr.as_deref().expect("set above");
            for from in nodes.iter().filter(|n| n.name != target.name) {
                fabric::route(&from.netns, cidr, target.ip)?;
            }
            fabric::route(&self.layout.ext_netns(), cidr, target.ip)?;
            fabric::route(&self.layout.fabric_netns(), cidr, target.ip)?;
        }
        Ok(())
    }
}

/// Whether `node` has condition Ready=True.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A containerd configuration keeping everything under `dir`, without the
/// CRI plugin.
pub fn containerd_config(dir: &Path, address: &Path) -> String {
    let q = |p: &Path| serde_json::to_string(&p.to_string_lossy()).expect("a string serializes");
    format!(
        "version = 2\n\
         root = {root}\n\
         state = {state}\n\
         disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
         \n\
         [grpc]\n  address = {address}\n\
         \n\
         [debug]\n  address = \"\"\n\
         \n\
         [metrics]\n  address = \"\"\n\
         \n\
         [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt}\n",
        root = q(&dir.join("root")),
        state = q(&dir.join("state")),
        address = q(address),
        opt = q(&dir.join("opt")),
    )
}

/// Write `text` to `path` with mode 0600, creating parent directories.
fn write_private(path: &Path, text: &str) -> Result<(), SkiffctlError> {
    let io = |source| SkiffctlError::Io {
        what: "cannot write the kubeconfig",
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_are_refused_naming_both() {
        let net = |s: &str| s.parse::<Ipv4Network>().expect("cidr");
        let (cluster, service) = (net(CLUSTER_CIDR), net(SERVICE_CIDR));
        check_ranges(fabric::fabric_cidr(), cluster, service).expect("the defaults are apart");
        // The fabric skiffctl used before sat inside the default service range.
        let error = check_ranges(net("10.99.0.0/24"), cluster, service)
            .expect_err("10.99.0.0/24 is in 10.96.0.0/12")
            .to_string();
        assert!(
            error.contains("the fabric 10.99.0.0/24") && error.contains("10.96.0.0/12"),
            "{error}"
        );
        let error = check_ranges(fabric::fabric_cidr(), net("10.96.0.0/16"), service)
            .expect_err("pods in the service range")
            .to_string();
        assert!(
            error.contains("10.96.0.0/16") && error.contains("10.96.0.0/12"),
            "{error}"
        );
        assert!(
            check_ranges(
                fabric::fabric_cidr(),
                net("10.0.0.0/8"),
                net("172.16.0.0/16")
            )
            .is_err()
        );
    }

    #[test]
    fn containerd_config_keeps_everything_under_the_node_dir() {
        let text = containerd_config(Path::new("/s/n1/containerd"), Path::new("/s/n1/c.sock"));
        assert!(text.starts_with("version = 2\n"));
        assert!(text.contains("root = \"/s/n1/containerd/root\""));
        assert!(text.contains("state = \"/s/n1/containerd/state\""));
        assert!(text.contains("address = \"/s/n1/c.sock\""));
        assert!(text.contains("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]"));
        assert!(text.contains("path = \"/s/n1/containerd/opt\""));
    }

    #[test]
    fn ready_needs_a_true_ready_condition() {
        let mut node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node-1"},
            "status": {"conditions": [{"type": "Ready", "status": "False"}]}
        }))
        .expect("node");
        assert!(!node_ready(&node));
        node.status
            .as_mut()
            .expect("status")
            .conditions
            .as_mut()
            .expect("conditions")[0]
            .status = "True".into();
        assert!(node_ready(&node));
        assert!(!node_ready(&Node::default()));
    }
}
