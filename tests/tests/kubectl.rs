//! Issue 2 end to end: the real kubectl 1.37, with its default flags, against `skiff-control
//! apiserver`.
//!
//! The tests share one server (it stops when the last of them finishes); each works in a
//! namespace of its own, and cluster-scoped objects carry the test's name.

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_tests::ApiServer;

static SERVER: Mutex<Weak<ApiServer>> = Mutex::new(Weak::new());

/// The server shared by this file's tests.
fn server() -> Arc<ApiServer> {
    ApiServer::shared(&SERVER)
}

/// Creates namespace `name` from a manifest (so that it does not depend on protobuf bodies).
fn namespace(server: &ApiServer, name: &str) {
    let out = server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"),
    );
    assert!(
        out.contains(&format!("namespace/{name} created")),
        "apply of namespace {name} printed: {out}"
    );
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs kubectl (with `stdin` if given), expects it to fail, and returns its stderr; panics with
/// the output and the server log if it succeeded.
fn kubectl_fails(server: &ApiServer, args: &[&str], stdin: Option<&str>) -> String {
    let out = match stdin {
        Some(input) => server.kubectl_stdin(args, input),
        None => server.kubectl(args),
    };
    assert!(
        !out.status.success(),
        "kubectl {args:?} should fail but succeeded\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- server log ---\n{}",
        stdout(&out),
        stderr(&out),
        server.log_excerpt()
    );
    stderr(&out)
}

/// Splits a kubectl table line into its cells (columns are separated by two or more spaces;
/// single spaces belong to a header such as `NOMINATED NODE`).
fn cells(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One section of a `kubectl get` table: its header cells and its rows' cells.
struct Section {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// Splits `kubectl get a,b,c` output into its sections (separated by blank lines).
fn sections(table: &str) -> Vec<Section> {
    table
        .split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut lines = block.lines().filter(|l| !l.trim().is_empty());
            let header = cells(lines.next().unwrap_or_default());
            Section {
                header,
                rows: lines.map(cells).collect(),
            }
        })
        .collect()
}

/// The section whose rows are named `prefix/…`, and the row named `name`, as a map header → cell.
fn row(table: &str, name: &str) -> Vec<(String, String)> {
    for section in sections(table) {
        if let Some(r) = section
            .rows
            .iter()
            .find(|r| r.first().map(String::as_str) == Some(name))
        {
            assert_eq!(
                r.len(),
                section.header.len(),
                "row {name} has as many cells as the header {:?}: {r:?}\n{table}",
                section.header
            );
            return section.header.into_iter().zip(r.iter().cloned()).collect();
        }
    }
    panic!("no row named {name} in:\n{table}")
}

fn header_of(table: &str, name: &str) -> Vec<String> {
    row(table, name).into_iter().map(|(h, _)| h).collect()
}

fn cell(row: &[(String, String)], column: &str) -> String {
    row.iter()
        .find(|(h, _)| h == column)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no column {column} in {row:?}"))
}

fn deployment_yaml(ns: &str, replicas: u32, mode: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: {ns}
  labels: {{app: web}}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
      - name: web
        image: nginx:1.27
        env:
        - name: MODE
          value: {mode}
        - name: KEEP
          value: same
        ports:
        - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: {ns}
spec:
  type: NodePort
  selector: {{app: web}}
  ports:
  - port: 80
    targetPort: 80
"#
    )
}

fn configmap_yaml(ns: &str, name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n  key: \"{value}\"\n"
    )
}

/// `kubectl create` sends its object as protobuf: the server must decode it.
#[test]
fn create_namespace_and_configmap_imperatively() {
    let server = server();
    let out = server.kubectl_ok(&["create", "namespace", "k-create"]);
    assert!(
        out.contains("namespace/k-create created"),
        "create namespace printed: {out}"
    );
    let out = server.kubectl_ok(&[
        "create",
        "configmap",
        "c",
        "-n",
        "k-create",
        "--from-literal=a=b",
    ]);
    assert!(
        out.contains("configmap/c created"),
        "create configmap printed: {out}"
    );
    let cm = server.kubectl_json(&["get", "cm", "c", "-n", "k-create"]);
    assert_eq!(cm["data"]["a"], "b", "configmap data in {cm:#}");
}

/// kubectl lists in chunks (`limit` and `continue`): every object once, over several pages read
/// at one revision; a token that is not the server's is refused.
#[test]
fn lists_come_in_pages() {
    let server = server();
    server.kubectl_ok(&["create", "namespace", "k-pages"]);
    for i in 0..5 {
        server.kubectl_ok(&[
            "create",
            "configmap",
            &format!("c{i}"),
            "-n",
            "k-pages",
            "--from-literal=a=b",
        ]);
    }
    let out = server.kubectl(&[
        "get",
        "configmaps",
        "-n",
        "k-pages",
        "--chunk-size=2",
        "-o",
        "name",
        "-v=6",
    ]);
    assert!(out.status.success(), "kubectl get: {}", stderr(&out));
    let listed = stdout(&out);
    let names: Vec<&str> = listed.lines().filter(|l| l.contains("/c")).collect();
    assert_eq!(
        names,
        (0..5)
            .map(|i| format!("configmap/c{i}"))
            .collect::<Vec<_>>(),
        "every configmap once, in order:\n{listed}"
    );
    let log = stderr(&out);
    let pages = log
        .lines()
        .filter(|l| l.contains("limit=2") && l.contains("200 OK"))
        .count();
    let continued = log.lines().filter(|l| l.contains("continue=")).count();
    assert!(
        pages >= 3 && continued >= 2,
        "three pages of two, the later ones continued:\n{log}"
    );
    let refused = kubectl_fails(
        &server,
        &[
            "get",
            "--raw",
            "/api/v1/namespaces/k-pages/configmaps?limit=2&continue=bm90LW91cnM=",
        ],
        None,
    );
    assert!(
        refused.contains("continue key is not valid"),
        "a foreign token is refused: {refused}"
    );
}

#[test]
fn pod_qos_class_compares_quantities_by_value() {
    let server = server();
    namespace(&server, "k-qos");
    // `1` and `1000m` are the same quantity: upstream's GetPodQOS says
    // Guaranteed; comparing the strings would say Burstable.
    let out = server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1
kind: Pod
metadata: {name: q, namespace: k-qos}
spec:
  containers:
  - name: c
    image: busybox
    resources:
      requests: {cpu: \"1\", memory: 64Mi}
      limits: {cpu: 1000m, memory: 64Mi}
",
    );
    assert!(out.contains("pod/q created"), "apply printed: {out}");
    let pod = server.kubectl_json(&["get", "pod", "q", "-n", "k-qos"]);
    assert_eq!(pod["status"]["qosClass"], "Guaranteed", "status of {pod:#}");
}

#[test]
fn apply_creates_then_updates_keeping_untouched_fields() {
    let server = server();
    namespace(&server, "k-apply");
    let out = server.kubectl_stdin_ok(&["apply", "-f", "-"], &deployment_yaml("k-apply", 2, "one"));
    assert!(
        out.contains("deployment.apps/web created") && out.contains("service/web created"),
        "first apply printed: {out}"
    );
    let before = server.kubectl_json(&["get", "deploy", "web", "-n", "k-apply"]);
    assert_eq!(
        before["metadata"]["generation"], 1,
        "generation in {before:#}"
    );
    let svc_before = server.kubectl_json(&["get", "svc", "web", "-n", "k-apply"]);
    // A label set out of band must survive the next apply (it is not in the manifest).
    server.kubectl_ok(&["label", "deploy", "web", "-n", "k-apply", "extra=kept"]);

    let out = server.kubectl_stdin_ok(&["apply", "-f", "-"], &deployment_yaml("k-apply", 3, "two"));
    assert!(
        out.contains("deployment.apps/web configured"),
        "second apply printed: {out}"
    );
    let after = server.kubectl_json(&["get", "deploy", "web", "-n", "k-apply"]);
    assert_eq!(after["spec"]["replicas"], 3, "replicas in {after:#}");
    assert_eq!(
        after["metadata"]["generation"], 2,
        "generation bumped by the spec change in {after:#}"
    );
    let container = &after["spec"]["template"]["spec"]["containers"][0];
    let env = container["env"].as_array().expect("env is a list");
    let value = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
            .unwrap_or_else(|| panic!("env {name} in {after:#}"))
    };
    assert_eq!(value("MODE"), "two", "changed env var in {after:#}");
    assert_eq!(value("KEEP"), "same", "untouched env var in {after:#}");
    assert_eq!(container["image"], "nginx:1.27", "image in {after:#}");
    assert_eq!(
        container["ports"][0]["protocol"], "TCP",
        "defaulted port protocol kept in {after:#}"
    );
    assert_eq!(
        after["metadata"]["labels"]["extra"], "kept",
        "out-of-band label kept in {after:#}"
    );
    assert_eq!(
        after["metadata"]["uid"], before["metadata"]["uid"],
        "same object (uid) after apply"
    );
    let last_applied =
        after["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .as_str()
            .unwrap_or_else(|| panic!("last-applied annotation in {after:#}"));
    assert!(
        last_applied.contains(r#""replicas":3"#),
        "last-applied records the new manifest: {last_applied}"
    );

    let svc_after = server.kubectl_json(&["get", "svc", "web", "-n", "k-apply"]);
    for field in ["clusterIP", "ports"] {
        assert_eq!(
            svc_after["spec"][field], svc_before["spec"][field],
            "service spec.{field} kept across applies"
        );
    }
}

/// Re-applying an unchanged manifest sends no patch and says "unchanged": kubectl computes the
/// three-way patch with the list merge keys of the OpenAPI v3 documents.
#[test]
fn apply_of_an_unchanged_manifest_is_unchanged() {
    let server = server();
    namespace(&server, "k-unchanged");
    let manifest = deployment_yaml("k-unchanged", 1, "one");
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &manifest);
    let out = server.kubectl_stdin_ok(&["apply", "-f", "-"], &manifest);
    assert!(
        out.contains("deployment.apps/web unchanged") && out.contains("service/web unchanged"),
        "re-apply of the same manifest printed: {out}"
    );
}

#[test]
fn server_side_apply_conflicts_then_forces() {
    let server = server();
    namespace(&server, "k-ssa");
    let out = server.kubectl_stdin_ok(
        &["apply", "--server-side", "-f", "-"],
        &configmap_yaml("k-ssa", "ssa", "one"),
    );
    assert!(
        out.contains("configmap/ssa serverside-applied"),
        "ssa printed: {out}"
    );

    let args = [
        "apply",
        "--server-side",
        "--field-manager=other",
        "-v=6",
        "-f",
        "-",
    ];
    let err = kubectl_fails(&server, &args, Some(&configmap_yaml("k-ssa", "ssa", "two")));
    assert!(
        err.contains("409 Conflict"),
        "the conflicting apply got a 409: {err}"
    );
    assert!(
        err.contains(r#"conflict with "kubectl""#) && err.contains(".data.key"),
        "the conflict names the manager and the field: {err}"
    );
    let cm = server.kubectl_json(&["get", "cm", "ssa", "-n", "k-ssa"]);
    assert_eq!(
        cm["data"]["key"], "one",
        "the conflict changed nothing: {cm:#}"
    );

    server.kubectl_stdin_ok(
        &[
            "apply",
            "--server-side",
            "--field-manager=other",
            "--force-conflicts",
            "-f",
            "-",
        ],
        &configmap_yaml("k-ssa", "ssa", "two"),
    );
    let cm = server.kubectl_json(&["get", "cm", "ssa", "-n", "k-ssa", "--show-managed-fields"]);
    assert_eq!(cm["data"]["key"], "two", "forced apply took effect: {cm:#}");
    let managers = cm["metadata"]["managedFields"]
        .as_array()
        .unwrap_or_else(|| panic!("managedFields in {cm:#}"));
    let owner = managers
        .iter()
        .find(|m| m["fieldsV1"]["f:data"]["f:key"].is_object())
        .unwrap_or_else(|| panic!("some manager owns data.key in {cm:#}"));
    assert_eq!(owner["manager"], "other", "data.key moved to other: {cm:#}");
    assert_eq!(owner["operation"], "Apply", "by an Apply: {cm:#}");
}

#[test]
fn get_prints_upstream_columns() {
    let server = server();
    let ns = "k-columns";
    namespace(&server, ns);
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &deployment_yaml(ns, 2, "one"));
    let objects = format!(
        r#"apiVersion: v1
kind: Node
metadata:
  name: k-columns-node
  labels: {{node-role.kubernetes.io/control-plane: ""}}
status:
  nodeInfo: {{kubeletVersion: v1.37.0}}
  conditions:
  - type: Ready
    status: "True"
---
apiVersion: v1
kind: Pod
metadata:
  name: p1
  namespace: {ns}
spec:
  nodeName: k-columns-node
  containers:
  - name: c
    image: nginx
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: rs1
  namespace: {ns}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: rs}}
  template:
    metadata:
      labels: {{app: rs}}
    spec:
      containers:
      - name: c
        image: nginx
"#
    );
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &objects);

    let table = server.kubectl_ok(&["get", "pods,deploy,rs,svc,nodes", "-n", ns]);
    assert_eq!(
        header_of(&table, "pod/p1"),
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "pod columns in:\n{table}"
    );
    let pod = row(&table, "pod/p1");
    assert_eq!(cell(&pod, "READY"), "0/1", "pod READY in:\n{table}");
    assert_eq!(cell(&pod, "STATUS"), "Pending", "pod STATUS in:\n{table}");
    assert_eq!(cell(&pod, "RESTARTS"), "0", "pod RESTARTS in:\n{table}");

    assert_eq!(
        header_of(&table, "deployment.apps/web"),
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        "deployment columns in:\n{table}"
    );
    assert_eq!(
        cell(&row(&table, "deployment.apps/web"), "READY"),
        "0/2",
        "deployment READY in:\n{table}"
    );
    assert_eq!(
        header_of(&table, "replicaset.apps/rs1"),
        ["NAME", "DESIRED", "CURRENT", "READY", "AGE"],
        "replicaset columns in:\n{table}"
    );
    assert_eq!(
        header_of(&table, "service/web"),
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ],
        "service columns in:\n{table}"
    );
    let svc = row(&table, "service/web");
    let svc_json = server.kubectl_json(&["get", "svc", "web", "-n", ns]);
    let node_port = svc_json["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .unwrap_or_else(|| panic!("a nodePort was allocated: {svc_json:#}"));
    assert!(
        (30000..=32767).contains(&node_port),
        "nodePort {node_port} in the default range"
    );
    assert_eq!(cell(&svc, "TYPE"), "NodePort", "service TYPE in:\n{table}");
    assert_eq!(
        cell(&svc, "PORT(S)"),
        format!("80:{node_port}/TCP"),
        "service PORT(S) in:\n{table}"
    );
    assert_eq!(
        cell(&svc, "CLUSTER-IP"),
        svc_json["spec"]["clusterIP"].as_str().expect("clusterIP"),
        "service CLUSTER-IP in:\n{table}"
    );
    assert_eq!(
        cell(&svc, "EXTERNAL-IP"),
        "<none>",
        "EXTERNAL-IP in:\n{table}"
    );
    assert_eq!(
        header_of(&table, "node/k-columns-node"),
        ["NAME", "STATUS", "ROLES", "AGE", "VERSION"],
        "node columns in:\n{table}"
    );
    let node = row(&table, "node/k-columns-node");
    assert_eq!(cell(&node, "STATUS"), "Ready", "node STATUS in:\n{table}");
    assert_eq!(
        cell(&node, "ROLES"),
        "control-plane",
        "node ROLES in:\n{table}"
    );
    assert_eq!(
        cell(&node, "VERSION"),
        "v1.37.0",
        "node VERSION in:\n{table}"
    );

    let wide = server.kubectl_ok(&["get", "pods", "-n", ns, "-o", "wide"]);
    assert_eq!(
        header_of(&wide, "p1"),
        [
            "NAME",
            "READY",
            "STATUS",
            "RESTARTS",
            "AGE",
            "IP",
            "NODE",
            "NOMINATED NODE",
            "READINESS GATES"
        ],
        "pod -o wide columns in:\n{wide}"
    );
    let pod = row(&wide, "p1");
    assert_eq!(cell(&pod, "NODE"), "k-columns-node", "pod NODE in:\n{wide}");
    assert_eq!(cell(&pod, "IP"), "<none>", "pod IP in:\n{wide}");
}

#[test]
fn yaml_and_json_output_parse_back_to_the_same_object() {
    let server = server();
    namespace(&server, "k-output");
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &deployment_yaml("k-output", 1, "one"),
    );
    let json = server.kubectl_json(&["get", "deploy", "web", "-n", "k-output"]);
    assert_eq!(json["kind"], "Deployment", "kind in {json:#}");
    assert_eq!(json["apiVersion"], "apps/v1", "apiVersion in {json:#}");
    let yaml = server.kubectl_ok(&["get", "deploy", "web", "-n", "k-output", "-o", "yaml"]);
    let file = server.dir().join("k-output.yaml");
    std::fs::write(&file, &yaml).expect("write the yaml output");
    // PyYAML comes with the kubernetes client.
    let from_yaml = server.python(&format!(
        "import json, yaml\nprint(json.dumps(yaml.safe_load(open({:?}))))",
        file.display().to_string()
    ));
    let from_yaml: Value = serde_json::from_str(&from_yaml)
        .unwrap_or_else(|e| panic!("yaml converted to JSON ({e}): {from_yaml}\nyaml:\n{yaml}"));
    assert_eq!(
        from_yaml, json,
        "-o yaml and -o json describe the same object\nyaml:\n{yaml}"
    );

    let list = server.kubectl_json(&["get", "deploy,svc", "-n", "k-output"]);
    assert_eq!(list["kind"], "List", "a multi-kind get is a List: {list:#}");
    let kinds: Vec<&str> = list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("items in {list:#}"))
        .iter()
        .filter_map(|i| i["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["Deployment", "Service"],
        "kinds of items in {list:#}"
    );
}

/// Spawns `kubectl args` and collects its stdout lines through a channel; the caller kills it.
fn spawn_lines(server: &ApiServer, args: &[&str]) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut cmd = server.kubectl_command(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn kubectl {args:?}: {e}"));
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Like [`spawn_lines`], with stderr's lines sent on the same channel (for
/// kubectl's `-v=6` request log).
fn spawn_merged(
    server: &ApiServer,
    args: &[&str],
) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut cmd = server.kubectl_command(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn kubectl {args:?}: {e}"));
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("piped stdout");
    let err = child.stderr.take().expect("piped stderr");
    for stream in [
        Box::new(out) as Box<dyn std::io::Read + Send>,
        Box::new(err),
    ] {
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    (child, rx)
}

/// Waits until a line satisfying `want` arrives (collecting all lines into `seen`).
fn wait_line(
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    timeout: Duration,
    want: impl Fn(&str) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = want(&line);
                seen.push(line);
                if hit {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

fn kill(mut child: std::process::Child) -> String {
    let _ = child.kill();
    let out = child.wait_with_output().expect("wait for kubectl");
    stderr(&out)
}

#[test]
fn get_watch_sees_added_modified_deleted() {
    let server = server();
    let ns = "k-watch";
    namespace(&server, ns);
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &configmap_yaml(ns, "seed", "0"));
    let (child, rx) = spawn_lines(
        &server,
        &["get", "cm", "-n", ns, "-w", "--output-watch-events"],
    );
    let mut seen = Vec::new();
    let listed = wait_line(&rx, &mut seen, Duration::from_secs(20), |l| {
        l.contains("seed")
    });
    if !listed {
        let err = kill(child);
        panic!("kubectl get -w listed nothing: {seen:?}\n{err}");
    }
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &configmap_yaml(ns, "w1", "1"));
    server.kubectl_ok(&["label", "cm", "w1", "-n", ns, "x=y"]);
    server.kubectl_ok(&["delete", "cm", "w1", "-n", ns]);
    let done = wait_line(&rx, &mut seen, Duration::from_secs(20), |l| {
        l.starts_with("DELETED") && l.contains("w1")
    });
    let err = kill(child);
    assert!(done, "no DELETED w1 event in {seen:#?}\nstderr: {err}");
    let events: Vec<(String, String)> = seen
        .iter()
        .map(|l| cells(l))
        .filter(|c| c.len() >= 2 && c[0] != "EVENT")
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect();
    let expected: Vec<(String, String)> = [
        ("ADDED", "seed"),
        ("ADDED", "w1"),
        ("MODIFIED", "w1"),
        ("DELETED", "w1"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(events, expected, "watch events in {seen:#?}");
    assert_eq!(
        cells(&seen[0]),
        ["EVENT", "NAME", "DATA", "AGE"],
        "watch table header"
    );

    // Watching one object: a synthetic ADDED first, then the change.
    let (child, rx) = spawn_lines(
        &server,
        &["get", "cm", "seed", "-n", ns, "-w", "--output-watch-events"],
    );
    let mut seen = Vec::new();
    let first = wait_line(&rx, &mut seen, Duration::from_secs(20), |l| {
        l.starts_with("ADDED")
    });
    if !first {
        let err = kill(child);
        panic!("kubectl get cm seed -w showed no ADDED: {seen:?}\n{err}");
    }
    server.kubectl_ok(&["annotate", "cm", "seed", "-n", ns, "touched=yes"]);
    let modified = wait_line(&rx, &mut seen, Duration::from_secs(20), |l| {
        l.starts_with("MODIFIED") && l.contains("seed")
    });
    let err = kill(child);
    assert!(modified, "no MODIFIED seed in {seen:#?}\nstderr: {err}");
}

#[test]
fn scale_then_read_replicas() {
    let server = server();
    namespace(&server, "k-scale");
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &deployment_yaml("k-scale", 1, "one"));
    let out = server.kubectl_ok(&["scale", "deploy", "web", "-n", "k-scale", "--replicas=4"]);
    assert!(
        out.contains("deployment.apps/web scaled"),
        "scale printed: {out}"
    );
    let replicas = server.kubectl_ok(&[
        "get",
        "deploy",
        "web",
        "-n",
        "k-scale",
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(replicas, "4", "replicas after scale");
    let raw = server.kubectl_ok(&[
        "get",
        "--raw",
        "/apis/apps/v1/namespaces/k-scale/deployments/web/scale",
    ]);
    let scale: Value =
        serde_json::from_str(&raw).unwrap_or_else(|e| panic!("scale is JSON ({e}): {raw}"));
    assert_eq!(scale["kind"], "Scale", "scale subresource kind: {scale:#}");
    assert_eq!(scale["spec"]["replicas"], 4, "scale spec: {scale:#}");
    assert_eq!(
        scale["status"]["selector"], "app=web",
        "scale selector: {scale:#}"
    );
}

/// `kubectl scale` prints no warning (upstream's Scale has `status.selector`).
#[test]
fn scale_prints_no_warning() {
    let server = server();
    namespace(&server, "k-scale-warn");
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &deployment_yaml("k-scale-warn", 1, "one"),
    );
    let out = server.kubectl(&[
        "scale",
        "deploy",
        "web",
        "-n",
        "k-scale-warn",
        "--replicas=2",
    ]);
    assert!(out.status.success(), "scale failed: {}", stderr(&out));
    assert_eq!(stderr(&out), "", "kubectl scale printed on stderr");
}

#[test]
fn label_annotate_and_remove_label() {
    let server = server();
    let ns = "k-label";
    namespace(&server, ns);
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &configmap_yaml(ns, "c", "v"));
    let out = server.kubectl_ok(&["label", "cm", "c", "-n", ns, "tier=fe", "team=a"]);
    assert!(out.contains("configmap/c labeled"), "label printed: {out}");
    let out = server.kubectl_ok(&["annotate", "cm", "c", "-n", ns, "note=hello world"]);
    assert!(
        out.contains("configmap/c annotated"),
        "annotate printed: {out}"
    );
    let cm = server.kubectl_json(&["get", "cm", "c", "-n", ns]);
    assert_eq!(cm["metadata"]["labels"]["tier"], "fe", "label in {cm:#}");
    assert_eq!(cm["metadata"]["labels"]["team"], "a", "label in {cm:#}");
    assert_eq!(
        cm["metadata"]["annotations"]["note"], "hello world",
        "annotation in {cm:#}"
    );

    let selected = server.kubectl_ok(&["get", "cm", "-n", ns, "-l", "tier=fe", "-o", "name"]);
    assert_eq!(selected.trim(), "configmap/c", "label selector finds it");

    // Changing a label needs --overwrite.
    let err = kubectl_fails(&server, &["label", "cm", "c", "-n", ns, "tier=be"], None);
    assert!(
        err.contains("already has a value"),
        "label without --overwrite: {err}"
    );
    server.kubectl_ok(&["label", "cm", "c", "-n", ns, "tier=be", "--overwrite"]);

    let out = server.kubectl_ok(&["label", "cm", "c", "-n", ns, "tier-"]);
    assert!(
        out.contains("configmap/c unlabeled"),
        "label removal printed: {out}"
    );
    server.kubectl_ok(&["annotate", "cm", "c", "-n", ns, "note-"]);
    let cm = server.kubectl_json(&["get", "cm", "c", "-n", ns]);
    assert!(
        cm["metadata"]["labels"].get("tier").is_none(),
        "tier removed: {cm:#}"
    );
    assert_eq!(
        cm["metadata"]["labels"]["team"], "a",
        "other label kept: {cm:#}"
    );
    let annotations = &cm["metadata"]["annotations"];
    assert!(
        annotations.is_null() || annotations.get("note").is_none(),
        "annotation removed: {cm:#}"
    );
    let none = server.kubectl_ok(&["get", "cm", "-n", ns, "-l", "tier", "-o", "name"]);
    assert_eq!(none.trim(), "", "no configmap has label tier any more");
}

#[test]
fn explain_prints_field_docs() {
    let server = server();
    let out = server.kubectl_ok(&["explain", "deployment.spec"]);
    for want in [
        "GROUP:      apps",
        "KIND:       Deployment",
        "VERSION:    v1",
        "FIELD: spec <DeploymentSpec>",
        "DESCRIPTION:",
        "FIELDS:",
    ] {
        assert!(
            out.contains(want),
            "explain deployment.spec lacks {want:?}:\n{out}"
        );
    }
    let fields: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   ") && l.contains('<'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for field in [
        "replicas",
        "selector",
        "strategy",
        "template",
        "minReadySeconds",
    ] {
        assert!(
            fields.contains(&field),
            "field {field} listed in {fields:?}:\n{out}"
        );
    }
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("selector") && l.contains("-required-")),
        "selector is marked required:\n{out}"
    );
    let replicas = server.kubectl_ok(&["explain", "deployment.spec.replicas"]);
    assert!(
        replicas.contains("FIELD: replicas <integer>")
            && replicas.contains("Number of desired pods"),
        "explain deployment.spec.replicas:\n{replicas}"
    );
    let err = kubectl_fails(&server, &["explain", "deployment.spec.nosuchfield"], None);
    assert!(
        err.contains("nosuchfield"),
        "explain of an unknown field: {err}"
    );
}

#[test]
fn api_resources_lists_every_kind_with_short_names() {
    let server = server();
    let out = server.kubectl_ok(&["api-resources"]);
    assert_eq!(
        cells(out.lines().next().unwrap_or_default()),
        ["NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND"],
        "api-resources header:\n{out}"
    );
    let expected = [
        ("configmaps", Some("cm"), "v1", "true", "ConfigMap"),
        ("endpoints", Some("ep"), "v1", "true", "Endpoints"),
        ("events", Some("ev"), "v1", "true", "Event"),
        ("namespaces", Some("ns"), "v1", "false", "Namespace"),
        ("nodes", Some("no"), "v1", "false", "Node"),
        ("pods", Some("po"), "v1", "true", "Pod"),
        ("secrets", None, "v1", "true", "Secret"),
        (
            "serviceaccounts",
            Some("sa"),
            "v1",
            "true",
            "ServiceAccount",
        ),
        ("services", Some("svc"), "v1", "true", "Service"),
        (
            "deployments",
            Some("deploy"),
            "apps/v1",
            "true",
            "Deployment",
        ),
        ("replicasets", Some("rs"), "apps/v1", "true", "ReplicaSet"),
        ("leases", None, "coordination.k8s.io/v1", "true", "Lease"),
        (
            "endpointslices",
            None,
            "discovery.k8s.io/v1",
            "true",
            "EndpointSlice",
        ),
    ];
    for (name, short, version, namespaced, kind) in expected {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("api-resources lists {name}:\n{out}"));
        let mut want: Vec<&str> = vec![name];
        want.extend(short);
        want.extend([version, namespaced, kind]);
        assert_eq!(cells(line), want, "api-resources row for {name}:\n{out}");
    }
    // Short names and the `all` category resolve.
    let ns = "k-resources";
    namespace(&server, ns);
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &deployment_yaml(ns, 1, "one"));
    let all = server.kubectl_ok(&["get", "all", "-n", ns, "-o", "name"]);
    let mut names: Vec<&str> = all.lines().collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["deployment.apps/web", "service/web"],
        "kubectl get all:\n{all}"
    );
    let namespaced = server.kubectl_ok(&["api-resources", "--namespaced=false", "-o", "name"]);
    assert!(
        namespaced.lines().any(|l| l == "nodes") && !namespaced.lines().any(|l| l == "pods"),
        "cluster-scoped resources:\n{namespaced}"
    );
}

#[test]
fn delete_f_removes_objects() {
    let server = server();
    let ns = "k-delete";
    namespace(&server, ns);
    let manifest = deployment_yaml(ns, 1, "one");
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &manifest);
    let out = server.kubectl_stdin_ok(&["delete", "-f", "-"], &manifest);
    assert!(
        out.contains(r#"deployment.apps "web" deleted"#)
            && out.contains(r#"service "web" deleted"#),
        "delete -f printed: {out}"
    );
    let err = kubectl_fails(&server, &["get", "deploy", "web", "-n", ns], None);
    assert!(
        err.contains(r#"Error from server (NotFound): deployments.apps "web" not found"#),
        "get after delete: {err}"
    );
    let err = kubectl_fails(&server, &["get", "svc", "web", "-n", ns], None);
    assert!(
        err.contains(r#"Error from server (NotFound): services "web" not found"#),
        "get after delete: {err}"
    );
    let err = kubectl_fails(&server, &["delete", "-f", "-"], Some(&manifest));
    assert!(err.contains("NotFound"), "deleting again: {err}");
    let out = server.kubectl_stdin_ok(&["delete", "--ignore-not-found", "-f", "-"], &manifest);
    assert_eq!(out.trim(), "", "--ignore-not-found prints nothing");
}

#[test]
fn replace_with_a_stale_resource_version_conflicts() {
    let server = server();
    let ns = "k-replace";
    namespace(&server, ns);
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &configmap_yaml(ns, "c", "one"));
    let stale = server.kubectl_ok(&["get", "cm", "c", "-n", ns, "-o", "yaml"]);
    assert!(
        stale.contains("resourceVersion:"),
        "yaml has a resourceVersion:\n{stale}"
    );
    server.kubectl_ok(&["label", "cm", "c", "-n", ns, "bump=1"]);
    let err = kubectl_fails(&server, &["replace", "-f", "-"], Some(&stale));
    assert!(
        err.contains(r#"Error from server (Conflict)"#)
            && err.contains(
                r#"Operation cannot be fulfilled on configmaps "c": the object has been modified"#
            ),
        "replace with a stale resourceVersion: {err}"
    );
    // With the current version, replace works.
    let fresh = server.kubectl_ok(&["get", "cm", "c", "-n", ns, "-o", "yaml"]);
    assert!(fresh.contains("key: one"), "yaml has the data:\n{fresh}");
    let out = server.kubectl_stdin_ok(
        &["replace", "-f", "-"],
        &fresh.replace("key: one", "key: two"),
    );
    assert!(
        out.contains("configmap/c replaced"),
        "replace printed: {out}"
    );
    let value = server.kubectl_ok(&["get", "cm", "c", "-n", ns, "-o", "jsonpath={.data.key}"]);
    assert_eq!(value, "two", "replaced data");
}

#[test]
fn invalid_deployment_is_refused_naming_the_field() {
    let server = server();
    let ns = "k-invalid";
    namespace(&server, ns);
    let bad = format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: bad
  namespace: {ns}
spec:
  selector:
    matchLabels: {{app: x}}
  template:
    metadata:
      labels: {{app: "y"}}
    spec:
      containers:
      - name: c
        image: nginx
"#
    );
    let err = kubectl_fails(&server, &["apply", "-f", "-"], Some(&bad));
    assert!(
        err.contains(r#"The Deployment "bad" is invalid"#)
            && err.contains("spec.template.metadata.labels: Invalid value")
            && err.contains("`selector` does not match template `labels`"),
        "invalid deployment: {err}"
    );
    let err = kubectl_fails(&server, &["get", "deploy", "bad", "-n", ns], None);
    assert!(err.contains("NotFound"), "nothing was created: {err}");

    // A missing required field: the container image.
    let no_image = bad
        .replace("app: y", "app: x")
        .replace("        image: nginx\n", "");
    let err = kubectl_fails(&server, &["apply", "-f", "-"], Some(&no_image));
    assert!(
        err.contains(r#"The Deployment "bad" is invalid"#)
            && err.contains("spec.template.spec.containers[0].image: Required value"),
        "deployment without an image: {err}"
    );
}

/// The Invalid value quoted in the message is the template's labels, as upstream prints them.
/// An unquoted `y` is a YAML 1.1 boolean to kubectl, which sends `true`: upstream's typed
/// decoding refuses that before validation, naming the Go field.
#[test]
fn invalid_value_quotes_the_labels() {
    let server = server();
    let ns = "k-invalid-value";
    namespace(&server, ns);
    let quoted = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: bad\n  namespace: {ns}\nspec:\n  selector:\n    matchLabels: {{app: x}}\n  template:\n    metadata:\n      labels: {{app: \"y\"}}\n    spec:\n      containers:\n      - name: c\n        image: nginx\n"
    );
    let err = kubectl_fails(&server, &["apply", "-f", "-"], Some(&quoted));
    assert!(
        err.contains(r#"Invalid value: {"app":"y"}"#)
            && err.contains("`selector` does not match template `labels`"),
        "the invalid value shows the labels: {err}"
    );
    let boolean = quoted.replace(r#"{app: "y"}"#, "{app: y}");
    let err = kubectl_fails(&server, &["apply", "-f", "-"], Some(&boolean));
    assert!(
        err.contains("Error from server (BadRequest)")
            && err.contains(r#"Deployment in version "v1" cannot be handled as a Deployment"#)
            && err.contains(
                "json: cannot unmarshal bool into Go struct field ObjectMeta.spec.template.metadata.labels of type string"
            ),
        "a boolean label value is refused by decoding: {err}"
    );
}

#[test]
fn unknown_fields_are_refused_by_strict_validation() {
    let server = server();
    let ns = "k-strict";
    namespace(&server, ns);
    let top = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: unk\n  namespace: {ns}\nbogus: 1\ndata:\n  a: b\n"
    );
    let err = kubectl_fails(&server, &["apply", "-f", "-"], Some(&top));
    assert!(
        err.contains("Error from server (BadRequest)")
            && err.contains(r#"strict decoding error: unknown field "bogus""#),
        "unknown top-level field: {err}"
    );
    let nested = deployment_yaml(ns, 1, "one").replace(
        "        image: nginx:1.27\n",
        "        image: nginx:1.27\n        imagePullPolicyy: Always\n",
    );
    let err = kubectl_fails(&server, &["apply", "-f", "-"], Some(&nested));
    assert!(
        err.contains(r#"unknown field "spec.template.spec.containers[0].imagePullPolicyy""#),
        "unknown nested field: {err}"
    );
    let err = kubectl_fails(&server, &["get", "cm", "unk", "-n", ns], None);
    assert!(err.contains("NotFound"), "nothing was created: {err}");
}

/// `--validate=false` (fieldValidation=Ignore) lets an unknown field through and the server drops
/// it, as upstream's typed decoding does.
#[test]
fn validate_false_drops_unknown_fields() {
    let server = server();
    let ns = "k-ignore";
    namespace(&server, ns);
    let top = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: unk\n  namespace: {ns}\nbogus: 1\ndata:\n  a: b\n"
    );
    server.kubectl_stdin_ok(&["apply", "--validate=false", "-f", "-"], &top);
    let cm = server.kubectl_json(&["get", "cm", "unk", "-n", ns]);
    assert!(cm.get("bogus").is_none(), "unknown field dropped: {cm:#}");
    assert_eq!(cm["data"]["a"], "b", "data kept: {cm:#}");
}

#[test]
fn cluster_ip_outside_the_range_is_refused() {
    let server = server();
    let ns = "k-ip";
    namespace(&server, ns);
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: out\n  namespace: {ns}\nspec:\n  clusterIP: 192.168.1.1\n  ports:\n  - port: 80\n"
    );
    let err = kubectl_fails(&server, &["apply", "-f", "-"], Some(&svc));
    assert!(
        err.contains(r#"The Service "out" is invalid"#)
            && err.contains("spec.clusterIPs")
            && err.contains("192.168.1.1")
            && err.contains("not in the valid range")
            && err.contains("10.96.0.0/12"),
        "clusterIP outside the range: {err}"
    );
    let inside = svc.replace("192.168.1.1", "10.96.200.7");
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &inside);
    let ip = server.kubectl_ok(&[
        "get",
        "svc",
        "out",
        "-n",
        ns,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert_eq!(ip, "10.96.200.7", "explicit clusterIP in the range");
    let taken = inside.replace("name: out", "name: out2");
    let err = kubectl_fails(&server, &["apply", "-f", "-"], Some(&taken));
    assert!(
        err.contains("spec.clusterIPs") && err.contains("already allocated"),
        "a clusterIP already in use: {err}"
    );
}

#[test]
fn raw_metrics_and_health_endpoints() {
    let server = server();
    // Make at least one request that is counted.
    server.kubectl_ok(&["get", "ns"]);
    let metrics = server.kubectl_ok(&["get", "--raw", "/metrics"]);
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("apiserver_request_total{") && l.contains(r#"resource="namespaces""#)
        })
        .unwrap_or_else(|| {
            panic!(
                "/metrics has apiserver_request_total for namespaces:\n{}",
                skiff_tests::tail(&metrics, 40)
            )
        });
    assert!(
        line.contains(r#"verb="LIST""#) || metrics.contains(r#"verb="LIST",resource="namespaces""#),
        "namespace LIST counted: {line}"
    );
    for path in ["/healthz", "/readyz", "/livez"] {
        let out = server.kubectl_ok(&["get", "--raw", path]);
        assert_eq!(out.trim(), "ok", "GET {path}");
    }
}

#[test]
fn delete_wait_and_wait_for_delete_return() {
    let server = server();
    let ns = "k-wait";
    namespace(&server, ns);
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &configmap_yaml(ns, "a", "1"));
    let started = Instant::now();
    let out = server.kubectl_ok(&["delete", "cm", "a", "-n", ns, "--wait", "--timeout=20s"]);
    assert!(
        out.contains(r#"configmap "a" deleted"#),
        "delete --wait printed: {out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "delete --wait took {:?}",
        started.elapsed()
    );

    server.kubectl_stdin_ok(&["apply", "-f", "-"], &configmap_yaml(ns, "b", "1"));
    let (child, rx) = spawn_merged(
        &server,
        &[
            "wait",
            "--for=delete",
            "cm/b",
            "-n",
            ns,
            "--timeout=30s",
            "-v=6",
        ],
    );
    // Delete once the waiter watches: its informer's cache is populated
    // (the -v=6 log).
    let mut seen = Vec::new();
    let watching = wait_line(&rx, &mut seen, Duration::from_secs(20), |l| {
        l.contains("Caches populated")
    });
    assert!(watching, "kubectl wait never watched: {seen:?}");
    server.kubectl_ok(&["delete", "cm", "b", "-n", ns, "--wait=false"]);
    let met = wait_line(&rx, &mut seen, Duration::from_secs(20), |l| {
        l.contains("condition met")
    });
    let err = kill(child);
    assert!(
        met,
        "kubectl wait --for=delete never returned: {seen:?}\nstderr: {err}"
    );

    // Waiting for something already gone returns at once.
    let started = Instant::now();
    server.kubectl_ok(&["wait", "--for=delete", "cm/b", "-n", ns, "--timeout=20s"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "wait on a gone object took {:?}",
        started.elapsed()
    );
}

#[test]
fn events_expire_after_the_event_ttl_and_nothing_else_does() {
    // Its own server: the shared one keeps events for the default hour.
    let server = ApiServer::start_with(&["--event-ttl", "2s"]);
    let ns = "event-ttl";
    namespace(&server, ns);
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: Event\nmetadata:\n  name: ev\n  namespace: {ns}\n\
             involvedObject:\n  kind: ConfigMap\n  name: cm\n  namespace: {ns}\n\
             reason: Tested\nmessage: short-lived\ntype: Normal\n---\n{}",
            configmap_yaml(ns, "cm", "kept")
        ),
    );
    let created = Instant::now();
    assert_eq!(
        server
            .kubectl_ok(&["-n", ns, "get", "event", "ev", "-o", "name"])
            .trim(),
        "event/ev"
    );
    loop {
        let out = server.kubectl(&["-n", ns, "get", "event", "ev", "-o", "name"]);
        if !out.status.success() {
            assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));
            break;
        }
        assert!(
            created.elapsed() < Duration::from_secs(20),
            "event/ev still there {:?} after its 2 s TTL",
            created.elapsed()
        );
        thread::sleep(Duration::from_millis(250));
    }
    assert!(
        created.elapsed() >= Duration::from_millis(1500),
        "event/ev went after {:?}, before its TTL",
        created.elapsed()
    );
    assert_eq!(
        server
            .kubectl_ok(&["-n", ns, "get", "configmap", "cm", "-o", "name"])
            .trim(),
        "configmap/cm",
        "objects other than events do not expire"
    );
}
