//! Leader election across processes: two `skiff-control controller-manager` and two
//! `skiff-control scheduler` replicas against one `skiff-control apiserver`. Only the holder of
//! each Lease acts; when the leaders are killed with SIGKILL (no chance to release their Leases),
//! the standbys take over within 15 s, as the issue asks: a ReplicaSet created after the kill gets
//! its pods created (controller manager) and bound (scheduler).

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skiff_tests::wait_for;
use skiff_tests::{ApiServer, HollowNodes, ProcessGroup, bin_path, tail};

/// The takeover bound the issue sets.
const TAKEOVER: Duration = Duration::from_secs(15);

/// One replica of a daemon, logging to its own file.
struct Replica {
    name: String,
    log: PathBuf,
    process: Option<ProcessGroup>,
}

impl Replica {
    fn start(server: &ApiServer, daemon: &str, n: u32) -> Replica {
        let name = format!("{daemon}-{n}");
        let log = server.dir().join(format!("{name}.log"));
        let file =
            fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = file.try_clone().expect("clone the log handle");
        let mut cmd = Command::new(bin_path("skiff-control"));
        cmd.arg(daemon)
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .env("SKIFF_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        let process = ProcessGroup::spawn(cmd).unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Replica {
            name,
            log,
            process: Some(process),
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn is_leader(&self) -> bool {
        self.log().contains("became leader")
    }

    /// SIGKILL to the whole process group: the replica gets no chance to release its Lease.
    fn kill_hard(&mut self) {
        let process = self.process.take().expect("the replica runs");
        let status = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", process.id())])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -KILL {} failed", self.name);
        // Reaps the killed group.
        drop(process);
    }
}

/// The one replica of `pair` that logged "became leader"; panics if both did.
fn leader_index(pair: &[Replica; 2]) -> Option<usize> {
    match (pair[0].is_leader(), pair[1].is_leader()) {
        (true, false) => Some(0),
        (false, true) => Some(1),
        (false, false) => None,
        (true, true) => panic!(
            "both {} and {} claim leadership\n--- {} ---\n{}\n--- {} ---\n{}",
            pair[0].name,
            pair[1].name,
            pair[0].name,
            tail(&pair[0].log(), 30),
            pair[1].name,
            tail(&pair[1].log(), 30)
        ),
    }
}

fn lease_holder(server: &ApiServer, name: &str) -> Option<String> {
    let out = server.kubectl(&["get", "lease", "-n", "kube-system", name, "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    let lease: Value = serde_json::from_slice(&out.stdout).expect("kubectl printed JSON");
    lease["spec"]["holderIdentity"].as_str().map(str::to_string)
}

/// The identity a replica logged when it became leader.
fn logged_identity(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("became leader"))?;
    let rest = line.split("identity=").nth(1)?;
    Some(rest.split_whitespace().next()?.to_string())
}

fn replica_set(server: &ApiServer, name: &str, replicas: u32) {
    let rs = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "localhost/skiff/busybox:latest"}]}}}});
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &rs.to_string());
}

/// (pods of the ReplicaSet `app`, how many of them are bound to a node).
fn pods(server: &ApiServer, app: &str) -> (usize, usize) {
    let list: Value =
        server.kubectl_json(&["get", "pods", "-n", "default", "-l", &format!("app={app}")]);
    let items = list["items"].as_array().cloned().unwrap_or_default();
    let bound = items
        .iter()
        .filter(|p| p["spec"]["nodeName"].is_string())
        .count();
    (items.len(), bound)
}

fn all_logs(server: &ApiServer, replicas: &[&Replica]) -> String {
    let mut text = String::new();
    for r in replicas {
        text.push_str(&format!("--- {} ---\n{}\n", r.name, tail(&r.log(), 40)));
    }
    text.push_str(&format!("--- apiserver ---\n{}", server.log_excerpt()));
    text
}

#[test]
fn killing_the_leaders_hands_over_to_the_standbys_within_15s() {
    let server = ApiServer::start();
    let managers = [
        Replica::start(&server, "controller-manager", 1),
        Replica::start(&server, "controller-manager", 2),
    ];
    let schedulers = [
        Replica::start(&server, "scheduler", 1),
        Replica::start(&server, "scheduler", 2),
    ];
    let mut nodes = HollowNodes::start(&server, 2, &["--name-prefix", "leader-"]);
    let logs = || {
        all_logs(
            &server,
            &[&managers[0], &managers[1], &schedulers[0], &schedulers[1]],
        )
    };
    // Node IPAM (a controller) gives the nodes their pod CIDRs: the managers elected a leader.
    nodes.wait_ready(&server, Duration::from_secs(60));

    let first_manager = wait_for(
        "a controller-manager leader",
        Duration::from_secs(30),
        logs,
        || leader_index(&managers),
    );
    let first_scheduler = wait_for("a scheduler leader", Duration::from_secs(30), logs, || {
        leader_index(&schedulers)
    });
    for (pair, lease, leader) in [
        (&managers, "kube-controller-manager", first_manager),
        (&schedulers, "kube-scheduler", first_scheduler),
    ] {
        let identity =
            logged_identity(&pair[leader].log()).expect("the leader logged its identity");
        assert_eq!(
            lease_holder(&server, lease).as_deref(),
            Some(identity.as_str()),
            "the {lease} Lease names the replica that logged \"became leader\""
        );
    }

    // The leaders act.
    replica_set(&server, "before", 2);
    wait_for(
        "2 bound pods of ReplicaSet before",
        Duration::from_secs(30),
        logs,
        || (pods(&server, "before") == (2, 2)).then_some(()),
    );

    // Kill both leaders without letting them release their Leases.
    let [mut m0, mut m1] = managers;
    let [mut s0, mut s1] = schedulers;
    let (dead_manager, standby_manager) = if first_manager == 0 {
        (&mut m0, &m1)
    } else {
        (&mut m1, &m0)
    };
    let (dead_scheduler, standby_scheduler) = if first_scheduler == 0 {
        (&mut s0, &s1)
    } else {
        (&mut s1, &s0)
    };
    dead_manager.kill_hard();
    dead_scheduler.kill_hard();
    let killed = Instant::now();
    assert!(
        !standby_manager.is_leader(),
        "the standby controller manager did not lead before the kill"
    );
    assert!(
        !standby_scheduler.is_leader(),
        "the standby scheduler did not lead before the kill"
    );

    // Work created right after the kill is done by the standbys within the bound.
    replica_set(&server, "after", 3);
    let logs = || all_logs(&server, &[&m0, &m1, &s0, &s1]);
    wait_for(
        "3 pods of ReplicaSet after, all bound",
        TAKEOVER,
        logs,
        || (pods(&server, "after") == (3, 3)).then_some(()),
    );
    let took = killed.elapsed();
    assert!(
        took <= TAKEOVER,
        "the standbys took {took:?} to take over (bound: {TAKEOVER:?})"
    );
    for (standby, lease) in [
        (standby_manager, "kube-controller-manager"),
        (standby_scheduler, "kube-scheduler"),
    ] {
        assert!(
            standby.is_leader(),
            "{} logged \"became leader\"\n{}",
            standby.name,
            logs()
        );
        let identity = logged_identity(&standby.log()).expect("the standby logged its identity");
        assert_eq!(
            lease_holder(&server, lease).as_deref(),
            Some(identity.as_str()),
            "the {lease} Lease moved to the standby"
        );
    }
    eprintln!("standbys took over {took:?} after the leaders were killed");
}
