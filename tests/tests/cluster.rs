//! `skiffctl up` / `status` / `down`: a local multi-node cluster in network
//! namespaces, checked with the pinned kubectl, `ip` and `/proc`.
//!
//! Privileged (root: namespaces, mounts, containerd). Each test names its
//! cluster `t<pid>x` (namespaces `skiff-t<pid>x-…`), keeps its state in a
//! temporary directory and its API on a free port, so it collides neither
//! with another run nor with a developer's cluster; a guard runs
//! `skiffctl down` even when the test fails. Tests run one at a time (two
//! clusters at once would only compete for the two cores).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use serde_json::Value;
use skiff_tests::{bin_path, free_port, kubectl_path, tail};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A cluster under test; dropping it runs `skiffctl down`.
struct Cluster {
    _tmp: tempfile::TempDir,
    name: String,
    state_dir: PathBuf,
    kubeconfig: PathBuf,
    port: u16,
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let name = format!("t{}{tag}", std::process::id());
        Cluster {
            state_dir: tmp.path().join("state"),
            kubeconfig: tmp.path().join("kube").join("config"),
            port: free_port(),
            name,
            _tmp: tmp,
        }
    }

    fn skiffctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin_path("skiffctl"));
        cmd.args(args);
        if !matches!(args.first(), Some(&"bpf")) {
            cmd.arg("--state-dir").arg(&self.state_dir);
        }
        cmd.output().expect("skiffctl runs")
    }

    fn up(&self, extra: &[&str]) -> Output {
        let port = self.port.to_string();
        let mut args = vec![
            "up",
            "--nodes",
            "3",
            "--name",
            &self.name,
            "--api-port",
            &port,
            "--kubeconfig",
            self.kubeconfig.to_str().expect("utf-8 path"),
            "--timeout",
            "120s",
        ];
        args.extend_from_slice(extra);
        self.skiffctl(&args)
    }

    fn node(&self, i: usize) -> String {
        format!("{}-node-{i}", self.name)
    }

    fn kubectl_json(&self, args: &[&str]) -> Value {
        let out = Command::new(kubectl_path())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .args(["-o", "json"])
            .output()
            .expect("kubectl runs");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            text(&out)
        );
        serde_json::from_slice(&out.stdout).expect("kubectl prints JSON")
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(self.state_dir.join("logs")) {
            for entry in entries.flatten() {
                let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
                all += &format!("--- {}\n{}\n", entry.path().display(), tail(&log, 20));
            }
        }
        all
    }

    fn state(&self) -> Value {
        let text = std::fs::read_to_string(self.state_dir.join("state.json")).expect("state file");
        serde_json::from_str(&text).expect("state file is JSON")
    }

    /// The three nodes are registered and Ready with distinct pod CIDRs;
    /// their names and CIDRs.
    fn assert_nodes_ready(&self) -> Vec<(String, String)> {
        let nodes = self.kubectl_json(&["get", "nodes"]);
        let items = nodes["items"].as_array().expect("items");
        let mut found: Vec<(String, String)> = Vec::new();
        for i in 1..=3 {
            let name = self.node(i);
            let node = items
                .iter()
                .find(|n| n["metadata"]["name"] == name.as_str())
                .unwrap_or_else(|| panic!("node {name} is registered: {nodes}"));
            let ready = node["status"]["conditions"]
                .as_array()
                .expect("conditions")
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            assert!(ready, "node {name} is Ready: {node}");
            let cidr = node["spec"]["podCIDR"]
                .as_str()
                .expect("podCIDR")
                .to_string();
            assert!(
                cidr.starts_with("10.244."),
                "{name} has a pod CIDR in the cluster CIDR: {cidr}"
            );
            found.push((name, cidr));
        }
        let mut cidrs: Vec<&String> = found.iter().map(|(_, c)| c).collect();
        cidrs.sort();
        cidrs.dedup();
        assert_eq!(cidrs.len(), 3, "pod CIDRs are distinct: {found:?}");
        found
    }

    /// The fabric: namespaces exist, the outside client reaches every node,
    /// and each node routes the others' pod CIDRs via their addresses.
    fn assert_fabric(&self, nodes: &[(String, String)]) {
        let list = run("ip", &["netns", "list"]);
        for ns in [
            format!("skiff-{}-fabric", self.name),
            format!("skiff-{}-ext", self.name),
        ]
        .into_iter()
        .chain(nodes.iter().map(|(n, _)| format!("skiff-{n}")))
        {
            assert!(list.contains(&ns), "namespace {ns} exists: {list}");
        }
        let ext = format!("skiff-{}-ext", self.name);
        for i in 1..=3 {
            let ip = format!("10.90.0.{}", 10 + i);
            run(
                "ip",
                &["netns", "exec", &ext, "ping", "-c", "1", "-W", "2", &ip],
            );
        }
        for (i, (name, _)) in nodes.iter().enumerate() {
            let routes = run("ip", &["-n", &format!("skiff-{name}"), "route", "show"]);
            for (j, (_, cidr)) in nodes.iter().enumerate() {
                if i != j {
                    let want = format!("{cidr} via 10.90.0.{}", 11 + j);
                    assert!(routes.contains(&want), "{name} routes {want}: {routes}");
                }
            }
            let forwarding = run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &format!("skiff-{name}"),
                    "cat",
                    "/proc/sys/net/ipv4/ip_forward",
                ],
            );
            assert_eq!(forwarding.trim(), "1", "{name} forwards");
        }
        let ext_routes = run("ip", &["-n", &ext, "route", "show"]);
        for (_, cidr) in nodes {
            assert!(
                ext_routes.contains(cidr.as_str()),
                "ext routes {cidr}: {ext_routes}"
            );
        }
    }

    /// After `down`: no namespace, process, mount or file of the cluster.
    fn assert_nothing_left(&self) {
        let list = run("ip", &["netns", "list"]);
        let prefix = format!("skiff-{}-", self.name);
        assert!(!list.contains(&prefix), "namespaces left: {list}");
        let state_dir = self.state_dir.to_string_lossy().into_owned();
        let me = std::process::id().to_string();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(
                !cmdline.contains(&state_dir) && !cmdline.contains(&prefix),
                "process {pid} left: {cmdline}"
            );
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        for line in mounts.lines() {
            assert!(
                !line.contains(&state_dir) && !line.contains(&format!("/run/skiff/{}-", self.name)),
                "mount left: {line}"
            );
        }
        assert!(!self.state_dir.exists(), "state directory left");
        assert!(!self.kubeconfig.exists(), "kubeconfig left");
        for i in 1..=3 {
            let run_dir = Path::new("/run/skiff").join(self.node(i));
            assert!(!run_dir.exists(), "{} left", run_dir.display());
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.state_dir.exists() || run("ip", &["netns", "list"]).contains(&self.name) {
            let out = self.skiffctl(&["down", "--name", &self.name]);
            if !out.status.success() {
                eprintln!("cleanup: skiffctl down failed: {}", text(&out));
            }
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run a command; its stdout, panicking with its output on failure.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .expect("command runs");
    assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_ok(out: &Output, what: &str, cluster: &Cluster) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        text(out),
        cluster.logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "privileged: needs root (network namespaces, containerd)"]
fn hollow_cluster_up_twice_status_partial_and_down() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = Cluster::new("h");

    let out = cluster.up(&["--hollow"]);
    let stdout = assert_ok(&out, "skiffctl up --hollow", &cluster);
    assert!(stdout.contains("[1/"), "progress lines: {stdout}");
    assert!(
        stdout.contains(&format!("starting containerd on {}", cluster.node(2))),
        "{stdout}"
    );
    assert!(
        stdout.contains(&cluster.kubeconfig.display().to_string()),
        "kubeconfig path printed: {stdout}"
    );
    let nodes = cluster.assert_nodes_ready();
    cluster.assert_fabric(&nodes);

    // `up` again is harmless: it shows the running cluster.
    let again = cluster.up(&["--hollow"]);
    let again = assert_ok(&again, "second skiffctl up", &cluster);
    assert!(again.contains("already up"), "{again}");
    assert_eq!(cluster.assert_nodes_ready(), nodes, "nothing changed");

    let status = cluster.skiffctl(&["status"]);
    let status = assert_ok(&status, "skiffctl status", &cluster);
    for (name, cidr) in &nodes {
        let line = status
            .lines()
            .find(|l| l.starts_with(name.as_str()))
            .unwrap_or_else(|| panic!("status lists {name}: {status}"));
        assert!(
            line.contains(cidr.as_str()) && line.ends_with("True"),
            "{line}"
        );
    }
    assert!(
        status.contains(&cluster.kubeconfig.display().to_string()),
        "{status}"
    );
    assert!(!status.contains(" dead "), "every process runs: {status}");

    // A dead containerd makes the cluster partial: status and up say so.
    let state = cluster.state();
    let containerd = state["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["role"] == "containerd" && p["node"] == cluster.node(2).as_str())
        .expect("containerd of node 2 is recorded");
    let pid = containerd["pid"].as_u64().expect("pid").to_string();
    run("kill", &["-KILL", &pid]);
    // Status fails once the process is gone.
    let status = skiff_tests::wait_for(
        "skiffctl status to fail on a partial cluster",
        std::time::Duration::from_secs(20),
        || text(&cluster.skiffctl(&["status"])),
        || {
            let status = cluster.skiffctl(&["status"]);
            (!status.status.success()).then_some(status)
        },
    );
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(
        stderr.contains(&format!("containerd on {}", cluster.node(2)))
            && stderr.contains("skiffctl down"),
        "{stderr}"
    );
    let partial = cluster.up(&["--hollow"]);
    assert!(
        !partial.status.success(),
        "up refuses a partial cluster: {}",
        text(&partial)
    );
    assert!(
        String::from_utf8_lossy(&partial.stderr).contains("partial"),
        "{}",
        text(&partial)
    );

    let down = cluster.skiffctl(&["down"]);
    let down = assert_ok(&down, "skiffctl down", &cluster);
    assert!(down.contains("cluster removed"), "{down}");
    cluster.assert_nothing_left();
    let again = cluster.skiffctl(&["down"]);
    let again = assert_ok(&again, "second skiffctl down", &cluster);
    assert!(again.contains("no cluster"), "{again}");
}

#[test]
#[ignore = "privileged: needs root (network namespaces, containerd)"]
fn real_cluster_imports_the_image_and_down_works_without_a_state_file() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = Cluster::new("r");

    let out = cluster.up(&[]);
    assert_ok(&out, "skiffctl up", &cluster);
    let nodes = cluster.assert_nodes_ready();
    cluster.assert_fabric(&nodes);
    let state = cluster.state();
    for node in state["nodes"].as_array().expect("nodes") {
        let address = node["containerd_address"].as_str().expect("address");
        let images = run("ctr", &["-a", address, "-n", "skiff", "images", "ls", "-q"]);
        assert!(
            images.contains("localhost/skiff/busybox:latest"),
            "the image is in {}'s containerd: {images}",
            node["name"]
        );
    }

    // A lost state file: down still finds everything by name and in /proc.
    std::fs::remove_file(cluster.state_dir.join("state.json")).expect("state file removed");
    let down = cluster.skiffctl(&["down", "--name", &cluster.name]);
    assert_ok(&down, "skiffctl down without a state file", &cluster);
    // The kubeconfig outside the state dir was recorded only in the lost
    // state file: that one file is the operator's to remove.
    std::fs::remove_file(&cluster.kubeconfig).expect("kubeconfig is there");
    cluster.assert_nothing_left();
}
