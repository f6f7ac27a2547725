//! skiff-cni driven by a runtime nobody here wrote: containerd's own CRI plugin.
//!
//! The test starts a private containerd (its own root, state, sockets and config, running inside a
//! network namespace of its own that acts as the node) whose CRI plugin has `bin_dir` = skiff-cni
//! plus Debian's plugins and `conf_dir` = a skiff conflist chaining portmap and tuning after
//! skiff-cni. It then calls RunPodSandbox, PodSandboxStatus, StopPodSandbox and RemovePodSandbox
//! over CRI v1 gRPC and checks both sides of the wiring (the pod's /32 and default route, the
//! node's veth and /32 route, the IPAM file, tuning's sysctl, portmap's DNAT, a ping), then that
//! Stop (CNI DEL through the chain) releases the address and removes the veth, route and DNAT.
//!
//! Everything the test makes is its own and named after it (with the test's pid): the node
//! namespace, the containerd directories (root, state, runc's state, the pod network namespace
//! mounts, all under one temporary directory) and the sandbox's cgroup parent; a guard removes
//! them even when an assertion fails.
//!
//! The sandbox ("pause") image is made by the test from Debian's busybox-static as an OCI
//! archive and imported with `ctr`, as there is no registry here.
//!
//! Needs root, containerd 1.6+, runc, ctr, nsenter, iproute2, iptables, busybox-static,
//! containernetworking-plugins.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use ipnetwork::Ipv4Network;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, ListPodSandboxRequest, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxStatusRequest, PortMapping, Protocol, RemovePodSandboxRequest, RunPodSandboxRequest,
    StatusRequest, StopPodSandboxRequest,
};
use serde_json::{Value, json};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";
const PAUSE_IMAGE: &str = "localhost/skiff/cni-test-pause:1";

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_hex(path: &Path) -> String {
    let out = sh(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().expect("digest").to_string()
}

/// Writes an OCI image archive whose only layer holds busybox and whose entrypoint sleeps.
fn build_pause_image(dir: &Path) -> PathBuf {
    let layout = dir.join("pause-oci");
    let blobs = layout.join("blobs/sha256");
    let rootfs = dir.join("pause-rootfs");
    fs::create_dir_all(rootfs.join("bin")).expect("rootfs");
    fs::create_dir_all(&blobs).expect("blobs");
    fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("copy /bin/busybox (install busybox-static)");
    let layer = dir.join("layer.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("--owner=0")
        .arg("--group=0")
        .arg("-cf")
        .arg(&layer)
        .arg("bin"));
    let add_blob = |path: &Path| -> (String, u64) {
        let hex = sha256_hex(path);
        fs::copy(path, blobs.join(&hex)).expect("blob");
        (
            format!("sha256:{hex}"),
            fs::metadata(path).expect("size").len(),
        )
    };
    let (layer_digest, layer_size) = add_blob(&layer);
    let config = dir.join("config.json");
    fs::write(
        &config,
        json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/bin/busybox", "sleep", "3600"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        })
        .to_string(),
    )
    .expect("config");
    let (config_digest, config_size) = add_blob(&config);
    let manifest = dir.join("manifest.json");
    fs::write(
        &manifest,
        json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
        })
        .to_string(),
    )
    .expect("manifest");
    let (manifest_digest, manifest_size) = add_blob(&manifest);
    fs::write(
        layout.join("index.json"),
        json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"io.containerd.image.name": PAUSE_IMAGE, "org.opencontainers.image.ref.name": "1"},
            }],
        })
        .to_string(),
    )
    .expect("index");
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("layout");
    let archive = dir.join("pause.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .args(["oci-layout", "index.json", "blobs"]));
    archive
}

/// Every cgroup directory named `parent` under the mounted hierarchies (v1 controllers, the
/// named systemd hierarchy and the cgroup2 `unified` mount of a hybrid set-up).
fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path().join(parent))
        .filter(|p| p.is_dir())
        .collect()
}

/// `dir` and its sub-directories, deepest first.
fn dirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(dirs_deepest_first(&entry.path()));
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

/// The paths of the unix sockets process `pid` holds under /run/containerd/s (a shim's).
fn shim_sockets(pid: &str) -> Vec<PathBuf> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    // The process's own network namespace's table: the shim runs in the test's node namespace.
    let table = fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    let mut paths: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let path = fields.get(7)?;
            (inodes.iter().any(|i| i == fields[6]) && path.starts_with("/run/containerd/s/"))
                .then(|| PathBuf::from(path))
        })
        .collect();
    paths.dedup();
    paths
}

fn kill_pid(pid: &str) {
    let _ = Command::new("kill")
        .args(["-9", pid])
        .stderr(Stdio::null())
        .status();
}

/// The node namespace, the private containerd, the sandbox cgroups and everything on disk; all
/// removed on drop.
struct Cluster {
    dir: tempfile::TempDir,
    node: String,
    cgroup_parent: String,
    containerd: Option<Child>,
}

impl Cluster {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Kills, by pid, every process whose command line names this cluster's directory (the
    /// shims our containerd started) or that sits in this test's sandbox cgroups.
    fn kill_leftovers(&self) {
        let marker = self.dir.path().to_string_lossy().into_owned();
        if let Ok(entries) = fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.parse::<u32>().is_err() || name == std::process::id().to_string() {
                    continue;
                }
                let cmdline = fs::read(format!("/proc/{name}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&marker) {
                    // A shim removes its socket in /run/containerd/s only when it exits cleanly.
                    let sockets = shim_sockets(&name);
                    kill_pid(&name);
                    for socket in sockets {
                        let _ = fs::remove_file(socket);
                    }
                }
            }
        }
        for top in cgroup_dirs(&self.cgroup_parent) {
            for dir in dirs_deepest_first(&top) {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                procs.split_whitespace().for_each(kill_pid);
            }
        }
    }

    /// Removes this test's cgroup parent in every hierarchy (retrying while killed processes
    /// exit).
    fn remove_cgroups(&self) {
        for _ in 0..50 {
            let mut left = false;
            for top in cgroup_dirs(&self.cgroup_parent) {
                for dir in dirs_deepest_first(&top) {
                    left |= fs::remove_dir(&dir).is_err();
                }
            }
            if !left {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.containerd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.kill_leftovers();
        // Mounts left under the directory (rootfs, shm, pod network namespaces) if the test
        // failed mid-way.
        let root = self.dir.path().to_string_lossy().into_owned();
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|p| p.starts_with(&root))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = Command::new("umount").arg("-l").arg(p).status();
            }
        }
        self.remove_cgroups();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.node])
            .stderr(Stdio::null())
            .status();
    }
}

async fn connect(socket: PathBuf) -> Channel {
    Endpoint::try_from("http://[::]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .expect("connect to containerd's socket")
}

/// Runs `args` inside the network namespace bound at `netns`.
fn in_netns(netns: &str, args: &[&str]) -> String {
    sh(Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(args))
}

/// The private containerd's configuration: its own directories and sockets, runc's state and the
/// pod network namespace mounts in the test's directory, our sandbox image and CNI directories,
/// and `restrict_oom_score_adj`, which this machine needs (see the comment in the TOML).
fn containerd_config(d: &Path, socket: &Path, bin_dir: &Path, conf_dir: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
  # The log is printed when a CRI call fails; at debug level it shows the CNI result CRI parsed.
  level = "debug"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # CRI gives a sandbox oom_score_adj -998; lowering it needs CAP_SYS_RESOURCE, which root does
  # not have in this VM (runc: "failed to update /proc/self/oom_score_adj: Permission denied",
  # surfacing as "can't get final child's PID from pipe: EOF"). With this, CRI clamps it to
  # containerd's own value, as it does in rootless and nested set-ups.
  restrict_oom_score_adj = true
  # Pod network namespaces under our state directory rather than /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    # runc's state in our directory, not the machine-wide /run/containerd/runc.
    Root = "{runc_root}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
"#,
        root = d.join("root").display(),
        state = d.join("state").display(),
        runc_root = d.join("runc").display(),
        sock = socket.display(),
        bin = bin_dir.display(),
        conf = conf_dir.display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: needs root (network namespaces, containerd)"]
async fn containerd_cri_runs_a_sandbox_through_skiff_cni_and_chained_plugins() {
    for tool in [
        "containerd",
        "containerd-shim-runc-v2",
        "ctr",
        "runc",
        "nsenter",
        "iptables-save",
    ] {
        assert!(
            sh(Command::new("sh").args(["-c", &format!("command -v {tool} || true")]))
                .contains(tool),
            "{tool} is not installed (cargo xtask setup installs it)"
        );
    }
    let pid = std::process::id();
    let dir = tempfile::Builder::new()
        .prefix(&format!("skiff-cni-cri-{pid}-"))
        .tempdir()
        .expect("tempdir");
    let node = format!("skiff-cni-cri-{pid}");
    let mut cluster = Cluster {
        dir,
        node: node.clone(),
        cgroup_parent: format!("skiff-cni-cri-{pid}"),
        containerd: None,
    };
    let d = cluster.dir.path().to_path_buf();
    sh(Command::new("ip").args(["netns", "add", &node]));
    sh(Command::new("ip").args(["-n", &node, "link", "set", "lo", "up"]));
    let octet = 100 + pid % 100;
    let cidr: Ipv4Network = format!("10.{octet}.7.0/24").parse().expect("pod CIDR");
    sh(Command::new("ip").args([
        "-n",
        &node,
        "addr",
        "add",
        &format!("10.{octet}.7.1/32"),
        "dev",
        "lo",
    ]));

    // CNI: skiff-cni with tuning and portmap chained after it, loopback for CRI's own lo.
    let bin_dir = d.join("cni-bin");
    let conf_dir = d.join("cni-conf");
    fs::create_dir_all(&bin_dir).expect("bin dir");
    fs::create_dir_all(&conf_dir).expect("conf dir");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_skiff-cni"), bin_dir.join("skiff-cni"))
        .expect("link skiff-cni");
    for plugin in ["loopback", "portmap", "tuning"] {
        std::os::unix::fs::symlink(Path::new(DEBIAN_CNI_DIR).join(plugin), bin_dir.join(plugin))
            .expect("link a Debian plugin");
    }
    let data_dir = d.join("cni-data");
    fs::write(
        conf_dir.join("10-skiff.conflist"),
        json!({
            "cniVersion": "1.0.0",
            "name": "skiff-cri",
            "plugins": [
                {"type": "skiff-cni", "podCIDR": cidr.to_string(), "dataDir": data_dir},
                {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.arp_ignore": "1"}},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            ],
        })
        .to_string(),
    )
    .expect("conflist");

    let config = d.join("config.toml");
    fs::write(
        &config,
        containerd_config(&d, &cluster.socket(), &bin_dir, &conf_dir),
    )
    .expect("containerd config");
    let log = fs::File::create(d.join("containerd.log")).expect("log");
    cluster.containerd = Some(
        // nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup mounts runc
        // needs.
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{node}"))
            .args(["containerd", "--config"])
            .arg(&config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd"),
    );

    // Wait for the socket and for CRI to report the runtime and the network ready.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.socket().exists() {
        assert!(
            Instant::now() < deadline,
            "no containerd socket:\n{}",
            cluster.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut cri = RuntimeServiceClient::new(connect(cluster.socket()).await);
    loop {
        let status = cri.status(StatusRequest { verbose: false }).await;
        let ready = status.as_ref().is_ok_and(|s| {
            s.get_ref().status.as_ref().is_some_and(|st| {
                !st.conditions.is_empty() && st.conditions.iter().all(|c| c.status)
            })
        });
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "CRI not ready: {status:?}\n{}",
            cluster.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let archive = build_pause_image(&d);
    sh(Command::new("ctr")
        .arg("--address")
        .arg(cluster.socket())
        .args(["-n", "k8s.io", "images", "import"])
        .arg(&archive));

    let sandbox_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "cni-test".into(),
            uid: format!("uid-{pid}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "cni-test".into(),
        log_directory: d.join("logs").display().to_string(),
        port_mappings: vec![PortMapping {
            protocol: Protocol::Tcp as i32,
            container_port: 80,
            host_port: 18090,
            host_ip: String::new(),
        }],
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: format!("/{}", cluster.cgroup_parent),
            ..Default::default()
        }),
        ..Default::default()
    };
    let run = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config),
            runtime_handler: String::new(),
        })
        .await;
    let sandbox_id = match run {
        Ok(r) => r.into_inner().pod_sandbox_id,
        Err(e) => panic!(
            "RunPodSandbox failed: {e}\n--- containerd log ---\n{}",
            cluster.log()
        ),
    };
    let status = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: sandbox_id.clone(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner();

    // The address CRI reports is the one skiff-cni allocated, inside the pod CIDR, and the
    // result CRI parsed (after tuning and portmap passed prevResult on) has both veth ends.
    let ip: Ipv4Addr = status
        .status
        .as_ref()
        .and_then(|s| s.network.as_ref())
        .map(|n| n.ip.clone())
        .expect("sandbox status has a network")
        .parse()
        .expect("sandbox IP is IPv4");
    assert!(cidr.contains(ip), "pod IP {ip} outside {cidr}");
    let info: Value =
        serde_json::from_str(status.info.get("info").expect("verbose info")).expect("info JSON");
    let host_veth = skiff_cni::host_veth_name(&sandbox_id, "eth0");
    let interfaces = &info["cniResult"]["Interfaces"];
    assert!(
        interfaces.get("eth0").is_some() && interfaces.get(&host_veth).is_some(),
        "CRI's CNI result lacks eth0 or {host_veth}: {}",
        info["cniResult"]
    );
    let netns = info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .expect("namespaces in the sandbox spec")
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .expect("network namespace path in the sandbox spec")
        .to_string();
    assert!(
        netns.starts_with(&*d.to_string_lossy()),
        "pod netns {netns} not under the test's state dir"
    );

    // The pod's side: the /32 on eth0, the default route via 169.254.1.1, tuning's sysctl.
    let addrs = in_netns(&netns, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        addrs.contains(&format!("inet {ip}/32 ")),
        "pod eth0 lacks {ip}/32:\n{addrs}"
    );
    let pod_routes = in_netns(&netns, &["ip", "-4", "route"]);
    assert!(
        pod_routes
            .lines()
            .any(|l| l.starts_with("default via 169.254.1.1 dev eth0")),
        "pod has no default via 169.254.1.1:\n{pod_routes}"
    );
    let arp_ignore = in_netns(&netns, &["cat", "/proc/sys/net/ipv4/conf/eth0/arp_ignore"]);
    assert_eq!(arp_ignore.trim(), "1", "tuning did not run after skiff-cni");

    // The node's side: the skf veth, the /32 route over it, the IPAM file owned by the sandbox,
    // portmap's DNAT, and the pod answers pings from the node.
    sh(Command::new("ip").args(["-n", &node, "link", "show", "dev", &host_veth]));
    let routes = sh(Command::new("ip").args(["-n", &node, "-4", "route"]));
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with(&format!("{ip} dev {host_veth} ")) && l.contains("scope link")),
        "no host route to {ip} over {host_veth}:\n{routes}"
    );
    let ip_file = data_dir.join("skiff-cri").join(ip.to_string());
    let owner = fs::read_to_string(&ip_file).expect("ip file");
    assert_eq!(owner, format!("{sandbox_id}\neth0\n"));
    let nat = sh(Command::new("ip").args(["netns", "exec", &node, "iptables-save", "-t", "nat"]));
    assert!(
        nat.lines()
            .any(|l| l.contains("--dport 18090") && l.contains(&format!("{ip}:80"))),
        "portmap made no DNAT 18090 -> {ip}:80:\n{nat}"
    );
    sh(Command::new("ip").args([
        "netns",
        "exec",
        &node,
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        &ip.to_string(),
    ]));
    // runc put the sandbox in the cgroup parent we asked for.
    let sandbox_cgroup = Path::new("/sys/fs/cgroup/pids")
        .join(&cluster.cgroup_parent)
        .join(&sandbox_id);
    assert!(
        sandbox_cgroup.is_dir(),
        "no sandbox cgroup {}",
        sandbox_cgroup.display()
    );

    // Stop: CNI DEL through the chain releases the address, the veth, the route and the DNAT.
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: sandbox_id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", cluster.log()));
    let routes = sh(Command::new("ip").args(["-n", &node, "-4", "route"]));
    assert!(
        !routes.contains(&format!("{ip} ")),
        "route left after stop:\n{routes}"
    );
    let links = sh(Command::new("ip").args(["-n", &node, "-o", "link"]));
    assert!(
        !links.contains(&host_veth),
        "{host_veth} left after stop:\n{links}"
    );
    assert!(!ip_file.exists(), "IP {ip} not released");
    let nat = sh(Command::new("ip").args(["netns", "exec", &node, "iptables-save", "-t", "nat"]));
    assert!(
        !nat.contains(&format!("{ip}:80")),
        "DNAT left after stop:\n{nat}"
    );

    // Remove: the sandbox, its network namespace mount and its cgroup are gone.
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: sandbox_id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", cluster.log()));
    let left = cri
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .expect("ListPodSandbox")
        .into_inner();
    assert!(left.items.is_empty(), "sandboxes left: {left:?}");
    assert!(!Path::new(&netns).exists(), "pod netns {netns} left");
    assert!(
        !sandbox_cgroup.exists(),
        "sandbox cgroup {} left",
        sandbox_cgroup.display()
    );
}
