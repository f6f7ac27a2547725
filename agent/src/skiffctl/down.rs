//! `skiffctl down`: remove every process, container, mount, namespace and
//! file of the local cluster.
//!
//! It trusts the state file where it can and `/proc` where it must: the
//! recorded processes are stopped by pid and start time, then any process
//! still naming the state directory or a node's containerd socket, or
//! living in one of the cluster's namespaces, is stopped with its
//! descendants (containers under shims). A missing or unreadable state file
//! falls back to the names derived from `--name`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::fabric::{self, Layout};
use super::procs;
use super::state::{STATE_FILE, State};
use super::{ClusterArgs, SkiffctlError};

/// How long daemons get between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(10);
/// Where the agents keep per-node runtime files (pod netns bind mounts).
pub const RUN_DIR: &str = "/run/skiff";
/// Where the agents pin their eBPF maps and links.
pub const BPF_DIR: &str = "/sys/fs/bpf/skiff";
/// Where containerd's runc shims keep runc's state, per containerd namespace.
pub const RUNC_ROOT: &str = "/run/containerd/runc";
/// What `up` creates inside the state directory.
const STATE_ENTRIES: &[&str] = &["control", "nodes", "cni", "images", "logs", "kubeconfig"];

/// Run `skiffctl down`.
pub fn down(args: &ClusterArgs) -> Result<(), SkiffctlError> {
    let dir = args.state_dir();
    let state = match State::load(&dir) {
        Ok(state) => state,
        Err(error) => {
            println!(
                "warning: {}; cleaning up by name",
                skiff_common::error::chain(&error)
            );
            None
        }
    };
    let name = state.as_ref().map_or(args.name.clone(), |s| s.name.clone());
    let layout = Layout::new(&name, 0);
    let state = state.unwrap_or_default();

    let mut namespaces: Vec<String> = state.namespaces.clone();
    for netns in fabric::list_netns() {
        if layout.owns_netns(&netns) && !namespaces.contains(&netns) {
            namespaces.push(netns);
        }
    }
    let mut nodes: BTreeSet<String> = state.nodes.iter().map(|n| n.name.clone()).collect();
    nodes.extend(
        namespaces
            .iter()
            .filter(|n| **n != layout.fabric_netns() && **n != layout.ext_netns())
            .filter_map(|n| n.strip_prefix("skiff-").map(str::to_string)),
    );
    let has_state_dir =
        STATE_ENTRIES.iter().any(|e| dir.join(e).exists()) || State::path(&dir).exists();
    if namespaces.is_empty() && state.processes.is_empty() && !has_state_dir {
        println!("no cluster in {}", dir.display());
        return Ok(());
    }
    let mut failures: Vec<String> = Vec::new();
    let mut step = 0;
    let total = 7;
    let mut begin = |what: &str| {
        step += 1;
        print!("[{step}/{total}] {what} … ");
        let _ = std::io::stdout().flush();
    };

    begin("stopping the agents");
    let agents: Vec<_> = state
        .processes
        .iter()
        .filter(|p| p.role == "agent")
        .cloned()
        .collect();
    report_killed(procs::terminate(&procs::live_pids(&agents), GRACE));

    begin("removing the containers");
    let mut removed = 0;
    for node in &state.nodes {
        let containerd_alive = state.processes.iter().any(|p| {
            p.role == "containerd" && p.node.as_deref() == Some(&node.name) && p.is_alive()
        });
        if containerd_alive {
            removed += remove_containers(&node.containerd_address.to_string_lossy());
        }
    }
    println!("ok ({removed} removed)");

    begin("stopping containerd, the API forwarder and the control plane");
    let rest: Vec<_> = state
        .processes
        .iter()
        .rev()
        .filter(|p| p.role != "agent")
        .cloned()
        .collect();
    report_killed(procs::terminate(&procs::live_pids(&rest), GRACE));

    begin("stopping leftover processes (shims, containers, etcd)");
    let markers: Vec<String> = state
        .nodes
        .iter()
        .map(|n| n.containerd_address.to_string_lossy().into_owned())
        .collect();
    let strays = procs::strays(&dir, &markers, &namespaces);
    let count = strays.len();
    let killed = procs::terminate(&strays, Duration::from_secs(5));
    println!("ok ({count} stopped, {} killed)", killed.len());

    // The containers' cgroups: the agents' (`skiff/<node>/…`) and those of
    // tasks containerd knew (`<namespace>/<id>`, its default path).
    let mut cgroups: Vec<PathBuf> = nodes.iter().map(|n| Path::new("skiff").join(n)).collect();
    let mut runc_states: Vec<PathBuf> = Vec::new();
    for node in &nodes {
        let tasks = dir
            .join("nodes")
            .join(node)
            .join("containerd/state/io.containerd.runtime.v2.task");
        for ns in read_dir_names(&tasks) {
            for id in read_dir_names(&tasks.join(&ns)) {
                cgroups.push(Path::new(&ns).join(&id));
                runc_states.push(Path::new(RUNC_ROOT).join(&ns).join(&id));
            }
        }
    }

    begin("unmounting and removing cgroups");
    let mut roots: Vec<PathBuf> = vec![dir.clone()];
    roots.extend(nodes.iter().map(|n| Path::new(RUN_DIR).join(n)));
    let left = procs::unmount_all(&roots);
    if left.is_empty() {
        println!("ok");
    } else {
        println!("failed");
        failures.push(format!("still mounted: {left:?}"));
    }

    let cgroups_left = procs::remove_cgroups(&cgroups);
    if !cgroups_left.is_empty() {
        failures.push(format!("cgroups still in use: {cgroups_left:?}"));
    }

    begin("deleting the network namespaces");
    let mut deleted = 0;
    for netns in namespaces.iter().rev() {
        match fabric::delete_netns(netns) {
            Ok(()) => deleted += 1,
            Err(error) => failures.push(format!(
                "network namespace {netns}: {}",
                skiff_common::error::chain(&error)
            )),
        }
    }
    println!("ok ({deleted})");

    begin("removing files");
    let mut paths: Vec<PathBuf> = state.files.iter().rev().cloned().collect();
    // runc's state of those tasks (the shims' runc root is shared by every
    // containerd of the machine: only the cluster's container ids go).
    paths.extend(runc_states);
    for node in &nodes {
        paths.push(Path::new(RUN_DIR).join(node));
        paths.push(Path::new(BPF_DIR).join(node));
    }
    if left.is_empty() {
        paths.extend(STATE_ENTRIES.iter().map(|e| dir.join(e)));
    }
    for path in &paths {
        if let Err(error) = remove_path(path) {
            failures.push(format!(
                "{}: {}",
                path.display(),
                skiff_common::error::chain(&error)
            ));
        }
    }
    // The shared parents go too once no cluster uses them (only if empty).
    let _ = std::fs::remove_dir(RUN_DIR);
    let _ = std::fs::remove_dir(BPF_DIR);
    let _ = procs::remove_cgroups_if_empty(Path::new("skiff"));
    if failures.is_empty() {
        let _ = std::fs::remove_file(dir.join(STATE_FILE));
        let _ = std::fs::remove_file(dir.join(format!("{STATE_FILE}.tmp")));
        if state.created_state_dir || dir.read_dir().is_ok_and(|mut d| d.next().is_none()) {
            let _ = std::fs::remove_dir(&dir);
        }
        println!("ok");
        println!("cluster removed");
        Ok(())
    } else {
        println!("failed");
        Err(SkiffctlError::cluster(format!(
            "the cluster is partly removed (state kept in {}; run `skiffctl down` again):\n  {}",
            dir.display(),
            failures.join("\n  ")
        )))
    }
}

/// The entry names of directory `dir` (none if it is absent).
fn read_dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn report_killed(killed: Vec<u32>) {
    if killed.is_empty() {
        println!("ok");
    } else {
        println!("ok (killed {killed:?} after {GRACE:?})");
    }
}

/// Remove a file or directory tree; absent is fine.
fn remove_path(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    }
}

/// Kill and delete every task and container of a live containerd (every
/// containerd namespace); how many containers went.
fn remove_containers(address: &str) -> usize {
    let ctr = |args: &[&str]| -> Option<String> {
        let mut full = vec!["-a", address, "--timeout", "10s"];
        full.extend_from_slice(args);
        run_timeout("ctr", &full, Duration::from_secs(15))
    };
    let mut removed = 0;
    let namespaces = ctr(&["namespaces", "ls", "-q"]).unwrap_or_default();
    for ns in namespaces.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let tasks = ctr(&["-n", ns, "tasks", "ls", "-q"]).unwrap_or_default();
        for task in tasks.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let _ = ctr(&["-n", ns, "tasks", "kill", "-a", "-s", "SIGKILL", task]);
            let _ = ctr(&["-n", ns, "tasks", "delete", "-f", task]);
        }
        let containers = ctr(&["-n", ns, "containers", "ls", "-q"]).unwrap_or_default();
        for container in containers.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if ctr(&["-n", ns, "containers", "delete", container]).is_some() {
                removed += 1;
            }
        }
    }
    removed
}

/// Run a command with a time limit; its stdout if it succeeded.
fn run_timeout(program: &str, args: &[&str], limit: Duration) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let out = child.wait_with_output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_path_handles_files_trees_and_absence() {
        let base = std::env::temp_dir().join(format!("skiffctl-rm-{}", std::process::id()));
        std::fs::create_dir_all(base.join("a/b")).expect("tree");
        std::fs::write(base.join("a/b/f"), "x").expect("file");
        std::fs::write(base.join("g"), "x").expect("file");
        remove_path(&base.join("g")).expect("file removed");
        remove_path(&base.join("a")).expect("tree removed");
        remove_path(&base.join("absent")).expect("absent is fine");
        assert!(!base.join("a").exists() && !base.join("g").exists());
        std::fs::remove_dir(&base).expect("cleanup");
    }

    #[test]
    fn run_timeout_returns_output_and_stops_slow_commands() {
        assert_eq!(
            run_timeout("echo", &["hi"], Duration::from_secs(5)).as_deref(),
            Some("hi\n")
        );
        assert_eq!(run_timeout("false", &[], Duration::from_secs(5)), None);
        let start = Instant::now();
        assert_eq!(
            run_timeout("sleep", &["10"], Duration::from_millis(200)),
            None
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
