//! Issue 2 end to end: the API server under restarts and store outages.
//!
//! - Watches resume across an API server restart from the client's last resourceVersion, with
//!   no event lost or repeated (two API servers on one external etcd, and a single server).
//! - With etcd stopped, requests fail with a 503 ServiceUnavailable Status, the server keeps
//!   running, `/readyz` fails, and everything works again once etcd is back.
//! - Service ClusterIP and NodePort allocations survive a restart.
//!
//! Each test starts its own processes: they stop and restart them.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_tests::{ApiServer, Etcd, python_path};

/// A Python watcher in the style of a client-go reflector: it lists once, then watches from the
/// list's resourceVersion and, whenever the stream ends or fails, watches again from the last
/// resourceVersion it saw. It prints `READY` once listed, `ADDED <name>` per added object,
/// `END <rv>` when a stream ends cleanly and `RECONNECT <error>` when it fails, and stops after `want` ADDED events (or 90 s).
/// A 410 Gone is reported as `GONE` and ends the watch: resuming must not need a re-list.
const WATCHER: &str = r#"
import sys, time, json
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
config.load_kube_config()
core = client.CoreV1Api()
ns, want = sys.argv[1], int(sys.argv[2])
rv = sys.argv[3] if len(sys.argv) > 3 else None
while rv is None:
    try:
        rv = core.list_namespaced_config_map(ns, _request_timeout=5).metadata.resource_version
    except Exception as e:
        print("RECONNECT", repr(e)[:200], flush=True)
        time.sleep(0.2)
print("READY", rv, flush=True)
seen = 0
deadline = time.time() + 90
while seen < want and time.time() < deadline:
    try:
        w = watch.Watch()
        for ev in w.stream(core.list_namespaced_config_map, ns, resource_version=rv,
                           timeout_seconds=60, _request_timeout=(5, 70)):
            rv = ev["object"].metadata.resource_version
            if ev["type"] == "ADDED":
                seen += 1
                print("ADDED", ev["object"].metadata.name, rv, flush=True)
                if seen >= want:
                    w.stop()
                    break
        if seen < want:
            print("END", rv, flush=True)
    except ApiException as e:
        if e.status == 410:
            print("GONE", e.reason, flush=True)
            sys.exit(3)
        print("RECONNECT", e.status, e.reason, flush=True)
        time.sleep(0.2)
    except Exception as e:
        print("RECONNECT", repr(e)[:200], flush=True)
        time.sleep(0.2)
print("DONE", seen, flush=True)
"#;

/// Creates `count` ConfigMaps `prefix-000`… in `ns` one after the other, `pace_ms` apart.
const WRITER: &str = r#"
import sys, time
from kubernetes import client, config
config.load_kube_config()
core = client.CoreV1Api()
ns, prefix, count, pace = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) / 1000
for i in range(count):
    name = "%s-%03d" % (prefix, i)
    core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data={"i": str(i)}))
    print("CREATED", name, flush=True)
    time.sleep(pace)
"#;

/// A Python script running as a child process, its stdout lines arriving on a channel.
struct Script {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Script {
    fn spawn(server: &ApiServer, script: &str, args: &[&str]) -> Script {
        let mut cmd = Command::new(python_path());
        cmd.arg("-c")
            .arg(script)
            .args(args)
            .env("KUBECONFIG", server.kubeconfig())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn python: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Script {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix`; false on timeout or end of output.
    fn wait_for(&mut self, prefix: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.starts_with(prefix);
                    self.seen.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// Waits for the script to exit (killing it after `timeout`) and returns all its stdout lines
    /// and its stderr.
    fn finish(mut self, timeout: Duration) -> (Vec<String>, String) {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let out = self.child.wait_with_output().expect("wait for python");
        // The reader thread ends when stdout closes.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        (self.seen, String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn namespace(server: &ApiServer, name: &str) {
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"),
    );
}

/// Names of the ADDED lines, in order.
fn added(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("ADDED "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn expected_names(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i:03}")).collect()
}

#[test]
fn watch_resumes_across_an_apiserver_restart_with_two_servers() {
    const COUNT: usize = 60;
    let etcd = Etcd::start();
    let mut a = ApiServer::start_with_etcd(&etcd, &[]);
    let b = ApiServer::start_with_etcd(&etcd, &[]);
    namespace(&b, "restart");

    let count = COUNT.to_string();
    let mut watcher = Script::spawn(&a, WATCHER, &["restart", &count]);
    assert!(
        watcher.wait_for("READY", Duration::from_secs(30)),
        "the watcher on A never listed: {:?}",
        watcher.seen
    );
    let mut writer = Script::spawn(&b, WRITER, &["restart", "cm", &count, "150"]);
    // Restart A once a sixth of the objects exist.
    assert!(
        writer.wait_for("CREATED cm-009", Duration::from_secs(60)),
        "the writer on B stalled: {:?}",
        writer.seen
    );
    a.restart();
    assert!(a.is_running(), "A runs again after its restart");
    let (written, writer_err) = writer.finish(Duration::from_secs(60));
    assert_eq!(
        written.iter().filter(|l| l.starts_with("CREATED")).count(),
        COUNT,
        "the writer created every ConfigMap: {written:?}\n{writer_err}"
    );
    let (lines, watcher_err) = watcher.finish(Duration::from_secs(60));
    let names = added(&lines);
    assert_eq!(
        names,
        expected_names("cm", COUNT),
        "the watcher on A saw every ConfigMap once, in creation order\n--- watcher ---\n{}\n{watcher_err}\n--- A log ---\n{}",
        lines.join("\n"),
        a.log_excerpt()
    );
    // The restart really cut the watch: the watcher resumed between two ADDED events.
    let last_added = lines.iter().rposition(|l| l.starts_with("ADDED"));
    let first_added = lines.iter().position(|l| l.starts_with("ADDED"));
    let cut = lines
        .iter()
        .position(|l| l.starts_with("END") || l.starts_with("RECONNECT"));
    assert!(
        matches!((first_added, cut, last_added), (Some(f), Some(c), Some(l)) if f < c && c < l),
        "the watch was interrupted mid-way by the restart: {lines:?}"
    );
}

#[test]
fn watch_from_a_resource_version_survives_a_restart() {
    let mut server = ApiServer::start();
    namespace(&server, "resume");
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: resume\n",
    );
    // kubectl -o jsonpath on a list sees its own List wrapper, so read the list's version raw.
    let raw = server.kubectl_ok(&["get", "--raw", "/api/v1/namespaces/resume/configmaps"]);
    let list: Value =
        serde_json::from_str(&raw).unwrap_or_else(|e| panic!("a JSON list ({e}): {raw}"));
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_else(|| panic!("a list resourceVersion in {list:#}"))
        .to_owned();
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n  namespace: resume\n",
    );
    server.restart();

    // Reconnect from the version taken before the restart, and write while watching.
    let mut watcher = Script::spawn(&server, WATCHER, &["resume", "3", &rv]);
    assert!(
        watcher.wait_for("ADDED b", Duration::from_secs(30)),
        "the watch from {rv} did not replay b: {:?}\n--- log ---\n{}",
        watcher.seen,
        server.log_excerpt()
    );
    for name in ["c", "d"] {
        server.kubectl_stdin_ok(
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: resume\n"
            ),
        );
    }
    let (lines, err) = watcher.finish(Duration::from_secs(30));
    assert_eq!(
        added(&lines),
        ["b", "c", "d"],
        "events after resourceVersion {rv} across the restart\n{}\n{err}\n--- log ---\n{}",
        lines.join("\n"),
        server.log_excerpt()
    );
}

/// Runs the Python client call `call` (an expression on `core`, a `CoreV1Api`, made with
/// `_preload_content=False`) and returns the HTTP status and the parsed body, so that failing
/// responses can be checked.
fn raw_status(server: &ApiServer, call: &str) -> (u16, Value) {
    let out = server.python(&format!(
        r#"
import json
from kubernetes import client, config
config.load_kube_config()
core = client.CoreV1Api()
try:
    resp = {call}
    print(json.dumps([resp.status, resp.data.decode()]))
except client.rest.ApiException as e:
    print(json.dumps([e.status, e.body.decode() if isinstance(e.body, bytes) else e.body]))
"#
    ));
    let pair: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("python printed no JSON ({e}): {out}"));
    let status = pair[0]
        .as_u64()
        .unwrap_or_else(|| panic!("status in {pair}")) as u16;
    let body = pair[1].as_str().unwrap_or_default();
    let parsed = serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()));
    (status, parsed)
}

#[test]
fn etcd_outage_gives_503_and_recovers() {
    let mut etcd = Etcd::start();
    let mut server = ApiServer::start_with_etcd(&etcd, &[]);
    server.kubectl_ok(&["get", "pods", "-n", "default"]);

    etcd.stop();
    let started = Instant::now();
    let out = server.kubectl(&["get", "pods", "-n", "default", "--request-timeout=40s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("Error from server (ServiceUnavailable)"),
        "kubectl get pods with etcd down (after {:?}): {stderr}\n--- log ---\n{}",
        started.elapsed(),
        server.log_excerpt()
    );
    assert!(
        started.elapsed() < Duration::from_secs(35),
        "the failure came after {:?}",
        started.elapsed()
    );
    let (status, body) = raw_status(
        &server,
        r#"core.list_namespaced_pod("default", _preload_content=False, _request_timeout=30)"#,
    );
    assert_eq!(status, 503, "HTTP status with etcd down: {body:#}");
    assert_eq!(body["kind"], "Status", "a Status body: {body:#}");
    assert_eq!(body["code"], 503, "Status code: {body:#}");
    assert_eq!(
        body["reason"], "ServiceUnavailable",
        "Status reason: {body:#}"
    );
    assert_eq!(body["status"], "Failure", "Status status: {body:#}");
    assert!(
        server.is_running(),
        "the server process survives the outage"
    );
    let readyz = server.kubectl(&["get", "--raw", "/readyz", "--request-timeout=20s"]);
    assert!(
        !readyz.status.success(),
        "/readyz fails with etcd down: {}",
        String::from_utf8_lossy(&readyz.stdout)
    );
    let livez = server.kubectl(&["get", "--raw", "/livez", "--request-timeout=20s"]);
    assert!(
        server.is_running(),
        "still running after /livez ({})",
        String::from_utf8_lossy(&livez.stdout)
    );
    etcd.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = server.kubectl(&["get", "pods", "-n", "default", "--request-timeout=5s"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "requests still fail 30 s after etcd came back: {}\n--- log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            server.log_excerpt()
        );
        thread::sleep(Duration::from_millis(500));
    }
    server.kubectl_ok(&["get", "--raw", "/readyz"]);
    let out = server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: after\n  namespace: default\n",
    );
    assert!(
        out.contains("configmap/after created"),
        "a write after recovery: {out}"
    );
    // Watches work again too.
    let (status, body) = raw_status(
        &server,
        r#"core.list_namespaced_config_map("default", watch=True, timeout_seconds=1, _preload_content=False, _request_timeout=30)"#,
    );
    assert_eq!(status, 200, "watch after recovery: {body}");
}

fn service(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: NodePort\n{extra}  ports:\n  - port: 80\n"
    )
}

/// (name, clusterIP, nodePort) of every Service in `default` but the API
/// server's own `kubernetes` Service.
fn allocations(server: &ApiServer) -> Vec<(String, String, u64)> {
    let list = server.kubectl_json(&["get", "svc", "-n", "default"]);
    let items = list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("items in {list:#}"));
    let own = items
        .iter()
        .find(|s| s["metadata"]["name"] == "kubernetes")
        .unwrap_or_else(|| panic!("the bootstrap creates default/kubernetes: {list:#}"));
    assert_eq!(
        own["spec"]["clusterIP"], "10.96.0.1",
        "the kubernetes Service holds the first address of the range: {own:#}"
    );
    items
        .iter()
        .filter(|s| s["metadata"]["name"] != "kubernetes")
        .map(|s| {
            (
                s["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                s["spec"]["clusterIP"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                s["spec"]["ports"][0]["nodePort"]
                    .as_u64()
                    .unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn service_allocations_survive_a_restart() {
    // Small ranges, so that an allocator that forgot its state would collide.
    let mut server = ApiServer::start_with(&[
        "--service-cluster-ip-range",
        "10.96.0.0/28",
        "--service-node-port-range",
        "30000-30011",
    ]);
    for i in 0..5 {
        server.kubectl_stdin_ok(&["apply", "-f", "-"], &service(&format!("s{i}"), ""));
    }
    let before = allocations(&server);
    assert_eq!(before.len(), 5, "five services: {before:?}");
    server.restart();
    for i in 5..10 {
        server.kubectl_stdin_ok(&["apply", "-f", "-"], &service(&format!("s{i}"), ""));
    }
    let all = allocations(&server);
    assert_eq!(all.len(), 10, "ten services: {all:?}");
    for (name, ip, port) in &all {
        assert!(
            ip.starts_with("10.96.0."),
            "{name} has a ClusterIP in the range: {all:?}"
        );
        assert!(
            (30000..=30011).contains(port),
            "{name} has a NodePort in the range: {all:?}"
        );
    }
    let ips: HashSet<&str> = all.iter().map(|(_, ip, _)| ip.as_str()).collect();
    let ports: HashSet<u64> = all.iter().map(|(_, _, p)| *p).collect();
    assert_eq!(ips.len(), 10, "no duplicate ClusterIP: {all:?}");
    assert_eq!(ports.len(), 10, "no duplicate NodePort: {all:?}");
    for entry in &before {
        assert!(
            all.contains(entry),
            "{entry:?} kept its allocations: {all:?}"
        );
    }

    // An IP taken before the restart is still refused.
    let (_, taken_ip, taken_port) = before[0].clone();
    let out = server.kubectl_stdin(
        &["apply", "-f", "-"],
        &service("dup", &format!("  clusterIP: {taken_ip}\n")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already allocated"),
        "an explicit ClusterIP in use is refused: {err}"
    );
    // Deleting a Service frees its ClusterIP and NodePort for an explicit request.
    let (freed_name, freed_ip, freed_port) = before[1].clone();
    server.kubectl_ok(&["delete", "svc", &freed_name, "-n", "default"]);
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: reuse\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: {freed_ip}\n  ports:\n  - port: 80\n    nodePort: {freed_port}\n"
    );
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &manifest);
    let reuse = server.kubectl_json(&["get", "svc", "reuse", "-n", "default"]);
    assert_eq!(
        reuse["spec"]["clusterIP"],
        freed_ip.as_str(),
        "freed IP reused: {reuse:#}"
    );
    assert_eq!(
        reuse["spec"]["ports"][0]["nodePort"], freed_port,
        "freed port reused: {reuse:#}"
    );
    let dup_port = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: dupport\n  namespace: default\nspec:\n  type: NodePort\n  ports:\n  - port: 80\n    nodePort: {taken_port}\n"
    );
    let out = server.kubectl_stdin(&["apply", "-f", "-"], &dup_port);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("provided port is already allocated"),
        "an explicit NodePort in use is refused: {err}"
    );
}
