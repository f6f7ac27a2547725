//! The agent's kubelet role against real containerd, real CNI plugins and
//! real kubectl (privileged: run as root).
//!
//! Each test makes one network namespace of its own and runs everything in
//! it: `skiff-control all`, a private containerd with skiff's busybox image,
//! and `skiff-agent` as one real node with its eBPF datapath, wiring pods
//! with skiff-cni (the conflist the agent writes for the node's podCIDR
//! from node IPAM). `kubectl logs` and `kubectl exec` go through the API
//! server to the agent's HTTPS API, which the tests also call directly with
//! curl and client certificates.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_tests::netns::{Containerd, TestNetns, remove_cgroups, unmount_under};
use skiff_tests::{ApiServer, ProcessGroup, bin_path, tail};

const IMAGE: &str = "localhost/skiff/busybox:latest";

/// One real node in its own network namespace. Field order is drop order:
/// agent, API server, containerd, then the namespace.
struct Node {
    agent: Option<ProcessGroup>,
    server: ApiServer,
    containerd: Containerd,
    name: String,
    netns: TestNetns,
}

impl Node {
    fn start() -> Node {
        let netns = TestNetns::create("skiff-kt");
        // A node address for InternalIP detection; nothing leaves the namespace.
        netns.exec_ok(&[
            "ip", "link", "add", "kt0", "type", "veth", "peer", "name", "kt1",
        ]);
        netns.exec_ok(&["ip", "link", "set", "kt1", "up"]);
        netns.exec_ok(&["ip", "addr", "add", "192.168.213.1/24", "dev", "kt0"]);
        netns.exec_ok(&["ip", "link", "set", "kt0", "up"]);
        netns.enter();
        let containerd = Containerd::start();
        let server = ApiServer::start_all(&[]);
        // Unique on the machine: the datapath pins under /sys/fs/bpf/skiff/<name>.
        let name = netns.name().trim_start_matches("skiff-").to_string();
        let mut node = Node {
            agent: None,
            server,
            containerd,
            name,
            netns,
        };
        for dir in ["net.d", "root", "run", "cni-bin"] {
            fs::create_dir_all(node.dir().join(dir)).expect("mkdir");
        }
        // skiff-cni and Debian's loopback, nothing else.
        std::os::unix::fs::symlink(bin_path("skiff-cni"), node.dir().join("cni-bin/skiff-cni"))
            .expect("link skiff-cni");
        std::os::unix::fs::symlink("/usr/lib/cni/loopback", node.dir().join("cni-bin/loopback"))
            .expect("link loopback");
        node.start_agent();
        node.wait_ready();
        node
    }

    fn dir(&self) -> PathBuf {
        self.containerd.dir().join("node")
    }

    fn log(&self) -> PathBuf {
        self.containerd.dir().join("agent.log")
    }

    fn start_agent(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("agent log");
        let mut cmd = Command::new(bin_path("skiff-agent"));
        cmd.args(["--node-name", &self.name])
            .arg("--kubeconfig")
            .arg(self.server.kubeconfig())
            .arg("--containerd-address")
            .arg(self.containerd.socket())
            .arg("--cni-bin-dir")
            .arg(self.dir().join("cni-bin"))
            .arg("--cni-conf-dir")
            .arg(self.dir().join("net.d"))
            .arg("--root-dir")
            .arg(self.dir().join("root"))
            .arg("--run-dir")
            .arg(self.dir().join("run"))
            .args([
                "--bpf=true",
                "--node-lease-renew-interval",
                "1s",
                "--log",
                "info,skiff_agent=debug",
            ])
            .env("RUST_BACKTRACE", "1")
            .stdout(log.try_clone().expect("clone"))
            .stderr(log);
        self.agent = Some(ProcessGroup::spawn(cmd).expect("start skiff-agent"));
    }

    fn kill_agent(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.terminate(Duration::from_secs(5));
        }
    }

    fn logs(&self) -> String {
        format!(
            "--- agent ---\n{}\n--- containerd ---\n{}",
            tail(&fs::read_to_string(self.log()).unwrap_or_default(), 60),
            self.containerd.logs()
        )
    }

    fn pod_cidr(&self) -> Option<String> {
        let node = self
            .server
            .kubectl(&["get", "node", &self.name, "-o", "json"]);
        let node: Value = serde_json::from_slice(&node.stdout).ok()?;
        node["spec"]["podCIDR"].as_str().map(str::to_string)
    }

    /// Wait for the pod CIDR and the agent's skiff-cni conflist for it, then for Ready.
    fn wait_ready(&self) {
        let cidr = self.wait_for("a pod CIDR", Duration::from_secs(60), || self.pod_cidr());
        let conflist = self.wait_for("the agent's conflist", Duration::from_secs(30), || {
            let text = fs::read_to_string(self.dir().join("net.d/10-skiff.conflist")).ok()?;
            serde_json::from_str::<Value>(&text).ok()
        });
        assert_eq!(conflist["plugins"][0]["type"], "skiff-cni");
        assert_eq!(conflist["plugins"][0]["podCIDR"], cidr.as_str());
        assert_eq!(
            conflist["plugins"][0]["dataDir"],
            self.dir().join("root/cni").to_str().expect("utf-8"),
            "the node's own IPAM directory"
        );
        self.wait_for("the node Ready", Duration::from_secs(60), || {
            let out = self
                .server
                .kubectl(&["get", "node", &self.name, "-o", "json"]);
            let node: Value = serde_json::from_slice(&out.stdout).ok()?;
            node["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                .then_some(())
        });
    }

    fn wait_for<T>(&self, what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
        skiff_tests::wait_for(what, timeout, || self.logs(), f)
    }

    /// Create a pod bound to this node (`spec.nodeName`): the kubelet is
    /// under test here, not the scheduler.
    fn apply(&self, yaml: &str) {
        assert!(yaml.contains("\nspec:\n"), "a pod manifest: {yaml}");
        let bound = yaml.replacen(
            "\nspec:\n",
            &format!("\nspec:\n  nodeName: {}\n", self.name),
            1,
        );
        self.server.kubectl_stdin_ok(&["apply", "-f", "-"], &bound);
    }

    fn pod(&self, name: &str) -> Value {
        self.server.kubectl_json(&["get", "pod", name])
    }

    fn wait_pod(&self, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(what, Duration::from_secs(90), || {
            let out = self.server.kubectl(&["get", "pod", name, "-o", "json"]);
            let pod: Value = serde_json::from_slice(&out.stdout).ok()?;
            check(&pod).then_some(pod)
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
        // Containers first: their cgroups go only once they are empty.
        self.containerd.remove_containers();
        // Pod network namespaces and anything else mounted under our files.
        unmount_under(self.containerd.dir());
        remove_cgroups(&format!("skiff/{}", self.name));
        let _ = skiff_agent::bpf::remove_node_pins(Path::new("/sys/fs/bpf"), &self.name);
    }
}

fn condition(pod: &Value, type_: &str) -> String {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn in_cidr(ip: &str, cidr: &str) -> bool {
    let (net, bits) = cidr.split_once('/').expect("cidr");
    let parse = |s: &str| -> u32 {
        s.split('.')
            .fold(0u32, |a, o| (a << 8) | o.parse::<u32>().expect("octet"))
    };
    let bits: u32 = bits.parse().expect("prefix");
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    parse(ip) & mask == parse(net) & mask
}

#[test]
#[ignore = "privileged: needs root (network namespaces, containerd)"]
fn pods_run_restart_turn_unready_share_localhost_and_are_deleted_cleanly() {
    let node = Node::start();
    let cidr = node.pod_cidr().expect("pod CIDR");
    node.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: web
    image: {IMAGE}
    command: ["sh", "-c", "mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 8080 -h /www"]
    readinessProbe:
      exec: {{command: ["test", "!", "-e", "/tmp/unready"]}}
      periodSeconds: 1
      failureThreshold: 1
    livenessProbe:
      tcpSocket: {{port: 8080}}
      periodSeconds: 2
"#
    ));
    let pod = node.wait_pod("web", "web Running and Ready", |p| {
        p["status"]["phase"] == "Running" && condition(p, "Ready") == "True"
    });
    let ip = pod["status"]["podIP"].as_str().expect("podIP").to_string();
    assert!(
        in_cidr(&ip, &cidr),
        "pod IP {ip} outside the node's podCIDR {cidr}"
    );
    assert_eq!(pod["status"]["hostIP"], "192.168.213.1");
    let status = &pod["status"]["containerStatuses"][0];
    assert_eq!(status["restartCount"], 0);
    let first_id = status["containerID"]
        .as_str()
        .expect("containerID")
        .to_string();
    assert!(first_id.starts_with("containerd://"), "{first_id}");
    assert!(
        status["imageID"]
            .as_str()
            .expect("imageID")
            .starts_with("sha256:")
    );
    // The pod answers on its IP from the node's namespace (this thread's).
    let body = node.netns.exec_ok(&[
        "busybox",
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://{ip}:8080/"),
    ]);
    assert_eq!(body.trim(), "hello-from-web");

    // Kill the container's process: the agent restarts it.
    let cid = first_id.trim_start_matches("containerd://");
    let pid = node.containerd.task_pid(cid).expect("the task's pid");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    let pod = node.wait_pod("web", "a restarted web", |p| {
        let s = &p["status"]["containerStatuses"][0];
        s["restartCount"] == 1
            && s["state"]["running"].is_object()
            && condition(p, "Ready") == "True"
    });
    let s = &pod["status"]["containerStatuses"][0];
    assert_ne!(s["containerID"], first_id.as_str());
    assert_eq!(s["lastState"]["terminated"]["exitCode"], 137);
    assert_eq!(
        pod["status"]["podIP"],
        ip.as_str(),
        "the sandbox (and IP) survives a restart"
    );

    // A failing readiness probe: Ready=False, still Running.
    let current = s["containerID"]
        .as_str()
        .expect("id")
        .trim_start_matches("containerd://")
        .to_string();
    node.containerd.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "unready",
        &current,
        "touch",
        "/tmp/unready",
    ]);
    let pod = node.wait_pod("web", "web NotReady", |p| condition(p, "Ready") == "False");
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(pod["status"]["containerStatuses"][0]["ready"], false);
    let events = node.server.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=web",
    ]);
    assert!(events.contains("Unhealthy"), "{events}");
    assert!(events.contains("Started"), "{events}");

    // Two containers: localhost and an emptyDir shared.
    node.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: duo}}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{{name: shared, emptyDir: {{}}}}]
  containers:
  - name: server
    image: {IMAGE}
    command: ["sh", "-c", "mkdir -p /www && echo duo-ok > /www/index.html && exec httpd -f -p 9090 -h /www"]
    volumeMounts: [{{name: shared, mountPath: /shared}}]
  - name: client
    image: {IMAGE}
    command: ["sh", "-c", "until wget -q -O /shared/got http://127.0.0.1:9090/; do sleep 0.2; done; exec sleep 3600"]
    volumeMounts: [{{name: shared, mountPath: /shared}}]
"#
    ));
    let duo = node.wait_pod("duo", "duo Ready", |p| condition(p, "Ready") == "True");
    let duo_uid = duo["metadata"]["uid"].as_str().expect("uid").to_string();
    let shared = node
        .dir()
        .join("root/pods")
        .join(&duo_uid)
        .join("volumes/shared/got");
    let got = node.wait_for(
        "the client's download in the shared emptyDir",
        Duration::from_secs(30),
        || {
            fs::read_to_string(&shared)
                .ok()
                .filter(|t| !t.is_empty())
                .map(|t| t.trim().to_string())
        },
    );
    assert_eq!(got, "duo-ok");

    // A missing image.
    node.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: ghost}\nspec:\n  containers:\n  - {name: c, image: localhost/skiff/nope:1}\n",
    );
    let ghost = node.wait_pod("ghost", "ErrImagePull", |p| {
        let reason = p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"].as_str();
        matches!(reason, Some("ErrImagePull" | "ImagePullBackOff"))
    });
    let message = ghost["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("localhost/skiff/nope:1") && message.contains("not found"),
        "{message}"
    );
    assert_eq!(ghost["status"]["phase"], "Pending");

    // Delete web: its IP, veth and namespace go.
    let web_uid = node.pod("web")["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let netns_file = node.dir().join("run/netns").join(&web_uid);
    assert!(
        netns_file.exists(),
        "the pod's netns file exists while it runs"
    );
    let ipam_file = node.dir().join("root/cni/skiff").join(&ip);
    assert!(ipam_file.exists(), "skiff-cni's IPAM holds {ip}");
    let links_before = node
        .netns
        .exec_ok(&["ip", "-o", "link", "show", "type", "veth"])
        .lines()
        .count();
    assert!(links_before >= 4, "kt0, kt1 and the two pods' veths");
    node.server
        .kubectl_ok(&["delete", "pod", "web", "--wait=true", "--timeout=60s"]);
    assert!(!ipam_file.exists(), "the IP {ip} was released");
    assert!(!netns_file.exists(), "the netns file was removed");
    let links_after = node
        .netns
        .exec_ok(&["ip", "-o", "link", "show", "type", "veth"])
        .lines()
        .count();
    assert_eq!(links_after + 1, links_before, "one veth fewer");
    assert!(
        !node
            .containerd
            .containers()
            .iter()
            .any(|c| c.starts_with(&web_uid.replace('-', "")[..12])),
        "web's containers removed"
    );

    // Agent restart: duo is adopted, not restarted.
    let before = node.pod("duo")["status"]["containerStatuses"].clone();
    let mut node = node;
    node.kill_agent();
    let mark = fs::read_to_string(node.log()).unwrap_or_default().len();
    node.start_agent();
    // The new agent has looked at duo's two containers.
    node.wait_for(
        "the new agent to adopt duo's containers",
        Duration::from_secs(60),
        || {
            let log = fs::read_to_string(node.log()).unwrap_or_default();
            let adopted = log
                .get(mark..)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("adopted running container") && l.contains("duo"))
                .count();
            (adopted >= 2).then_some(())
        },
    );
    let after = node.wait_pod("duo", "duo still Ready", |p| {
        condition(p, "Ready") == "True"
    });
    let after = &after["status"]["containerStatuses"];
    for i in 0..2 {
        assert_eq!(
            after[i]["containerID"], before[i]["containerID"],
            "same container after agent restart"
        );
        assert_eq!(after[i]["restartCount"], 0);
    }
    assert!(node.dir().join("run/netns").join(&duo_uid).exists());
    node.server.kubectl_ok(&[
        "delete",
        "pod",
        "duo",
        "ghost",
        "--wait=true",
        "--timeout=60s",
    ]);
    assert!(
        node.containerd.containers().is_empty(),
        "every container removed"
    );
    assert!(
        fs::read_dir(node.dir().join("run/netns"))
            .expect("netns dir")
            .next()
            .is_none()
    );
}

/// The node's address (kt0) and the agent's default kubelet port.
const AGENT_URL: &str = "https://192.168.213.1:10250";

/// `curl` the agent's API with a client certificate: (HTTP code, body).
/// A failed TLS handshake is code 0.
fn agent_get(path: &str, cert: Option<(&Path, &Path)>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-k",
        "--max-time",
        "20",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ]);
    if let Some((cert, key)) = cert {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let out = cmd
        .arg(format!("{AGENT_URL}{path}"))
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A client certificate for `subject`, signed by the cluster CA (openssl).
fn client_cert(server: &ApiServer, name: &str, subject: &str) -> (PathBuf, PathBuf) {
    let pki = server.data_dir().join("pki");
    let key = server.dir().join(format!("{name}.key"));
    let csr = server.dir().join(format!("{name}.csr"));
    let cert = server.dir().join(format!("{name}.crt"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |p: &Path| p.to_str().expect("utf-8").to_string();
    // An X.509 v3 client certificate (webpki refuses v1).
    let ext = server.dir().join(format!("{name}.ext"));
    fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .expect("write the extensions");
    run(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
        "-subj",
        subject,
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&pki.join("ca.crt")),
        "-CAkey",
        &s(&pki.join("ca.key")),
        "-CAcreateserial",
        "-extfile",
        &s(&ext),
        "-days",
        "1",
        "-out",
        &s(&cert),
    ]);
    (cert, key)
}

/// The value of the sample `name{labels…}` in Prometheus text.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        (series.starts_with(&format!("{name}{{")) && labels.iter().all(|l| series.contains(l)))
            .then(|| value.parse().ok())?
    })
}

#[test]
#[ignore = "privileged: needs root (network namespaces, containerd)"]
fn logs_exec_and_metrics_reach_the_agent() {
    let mut node = Node::start();
    node.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: two}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: {IMAGE}
    env: [{{name: WHO, value: web}}]
    command: ["sh", "-c", "echo hello-from-web; echo err-from-web >&2; mkdir -p /www && echo ok > /www/index.html && httpd -p 8080 -h /www; while true; do if [ -e /tmp/say ]; then cat /tmp/say; rm /tmp/say; fi; sleep 0.2; done"]
  - name: side
    image: {IMAGE}
    env: [{{name: WHO, value: side}}]
    command: ["sh", "-c", "echo side-hello; exec sleep 3600"]
"#
    ));
    let pod = node.wait_pod("two", "two Ready", |p| condition(p, "Ready") == "True");
    let ip = pod["status"]["podIP"].as_str().expect("podIP").to_string();
    let kubectl = |args: &[&str]| node.server.kubectl(args);
    let stdout = |out: &std::process::Output| String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    // Logs of each container: what it printed, stdout and stderr.
    let web_logs = node.wait_for("web's output", Duration::from_secs(30), || {
        let out = kubectl(&["logs", "two", "-c", "web"]);
        let text = stdout(&out);
        (out.status.success() && text.contains("err-from-web")).then_some(text)
    });
    assert!(web_logs.contains("hello-from-web\n"), "{web_logs}");
    let side = kubectl(&["logs", "two", "-c", "side"]);
    assert!(side.status.success(), "{}", stderr(&side));
    assert_eq!(stdout(&side), "side-hello\n");
    let tail = kubectl(&["logs", "two", "-c", "web", "--tail=1"]);
    assert_eq!(stdout(&tail).lines().count(), 1, "{}", stdout(&tail));
    let limited = kubectl(&["logs", "two", "-c", "side", "--limit-bytes=5"]);
    assert_eq!(stdout(&limited), "side-");
    let stamped = kubectl(&["logs", "two", "-c", "side", "--timestamps"]);
    let line = stdout(&stamped);
    let (time, text) = line.trim_end().split_once(' ').expect("a timestamp");
    assert!(time.starts_with("20") && time.ends_with('Z'), "{line}");
    assert_eq!(text, "side-hello");
    // No previous instance yet: the kubelet's 400.
    let previous = kubectl(&["logs", "two", "-c", "side", "--previous"]);
    assert!(!previous.status.success());
    assert!(
        stderr(&previous)
            .contains("previous terminated container \"side\" in pod \"two\" not found"),
        "{}",
        stderr(&previous)
    );
    let unknown = kubectl(&["logs", "two", "-c", "nope"]);
    assert!(!unknown.status.success());

    // Exec: stdout, stderr and the exit code.
    let out = kubectl(&[
        "exec",
        "two",
        "-c",
        "web",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\n{}",
        stderr(&out),
        node.logs()
    );
    assert_eq!(stdout(&out), "out\n");
    assert!(stderr(&out).contains("err\n"), "{}", stderr(&out));
    let ok = kubectl(&["exec", "two", "-c", "web", "--", "true"]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    // -c picks the container (its own environment).
    let who = kubectl(&["exec", "two", "-c", "side", "--", "sh", "-c", "echo $WHO"]);
    assert_eq!(stdout(&who), "side\n", "{}", stderr(&who));
    let who = kubectl(&["exec", "two", "-c", "web", "--", "sh", "-c", "echo $WHO"]);
    assert_eq!(stdout(&who), "web\n", "{}", stderr(&who));
    // -i: stdin goes in, and its end ends `cat`.
    let echoed = node.server.kubectl_stdin(
        &["exec", "-i", "two", "-c", "side", "--", "cat"],
        "piped-input\nsecond line\n",
    );
    assert!(echoed.status.success(), "{}", stderr(&echoed));
    assert_eq!(stdout(&echoed), "piped-input\nsecond line\n");
    let missing = kubectl(&["exec", "two", "-c", "web", "--", "/no/such/binary"]);
    assert!(!missing.status.success());
    // The Python client speaks v4.channel.k8s.io: a terminal and the exit
    // code from the error channel.
    let tty = node.server.python(
        r#"
import json
from kubernetes import client, config
from kubernetes.stream import stream
config.load_kube_config()
r = stream(client.CoreV1Api().connect_get_namespaced_pod_exec, "two", "default",
           container="side", command=["sh", "-c", "tty; exit 4"],
           stdin=True, stdout=True, stderr=True, tty=True, _preload_content=False)
out = ""
while r.is_open():
    r.update(timeout=1)
    if r.peek_stdout():
        out += r.read_stdout()
if r.peek_stdout():
    out += r.read_stdout()
print(json.dumps({"out": out, "code": r.returncode}))
"#,
    );
    let tty: Value = serde_json::from_str(tty.trim()).expect("the script's JSON");
    let out = tty["out"].as_str().expect("output");
    assert!(out.contains("/dev/pts/"), "{tty}");
    assert_eq!(tty["code"], 4, "{tty}");

    // Follow: a line printed later arrives, and the stream ends with the container.
    let mut follow = node
        .server
        .kubectl_command(&["logs", "-f", "two", "-c", "web"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl logs -f");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let reader = BufReader::new(follow.stdout.take().expect("stdout"));
    thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let next_line = |what: &str| {
        lines_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no {what} from kubectl logs -f: {e}"))
    };
    // What was printed before (stdout and stderr in either order).
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l == "hello-from-web") {
        seen.push(next_line("first line"));
    }
    let said = kubectl(&[
        "exec",
        "two",
        "-c",
        "web",
        "--",
        "sh",
        "-c",
        "echo later-line > /tmp/say",
    ]);
    assert!(said.status.success(), "{}", stderr(&said));
    while !seen.iter().any(|l: &String| l == "later-line") {
        seen.push(next_line("later line"));
    }
    // Kill the container: the follow ends, and the agent restarts it.
    let web_id = pod["status"]["containerStatuses"]
        .as_array()
        .expect("statuses")
        .iter()
        .find(|s| s["name"] == "web")
        .and_then(|s| s["containerID"].as_str())
        .expect("web's container ID")
        .trim_start_matches("containerd://")
        .to_string();
    let pid = node.containerd.task_pid(&web_id).expect("web's pid");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = follow.try_wait().expect("wait for kubectl logs -f") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = follow.kill();
            panic!(
                "kubectl logs -f did not end with its container\n{}",
                node.logs()
            );
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "kubectl logs -f: {status}");
    node.wait_pod("two", "web restarted", |p| {
        p["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| {
                s["name"] == "web" && s["restartCount"] == 1 && s["state"]["running"].is_object()
            })
    });
    let previous = kubectl(&["logs", "two", "-c", "web", "--previous"]);
    assert!(previous.status.success(), "{}", stderr(&previous));
    let text = stdout(&previous);
    assert!(
        text.contains("hello-from-web") && text.contains("later-line"),
        "{text}"
    );
    let current = node.wait_for("the new web's output", Duration::from_secs(30), || {
        let text = stdout(&kubectl(&["logs", "two", "-c", "web"]));
        text.contains("hello-from-web").then_some(text)
    });
    assert!(!current.contains("later-line"), "{current}");

    // The agent's own API: client certificates required, masters allowed,
    // others refused; the datapath's counters after traffic.
    for _ in 0..3 {
        let body = node.netns.exec_ok(&[
            "busybox",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{ip}:8080/"),
        ]);
        assert_eq!(body.trim(), "ok");
    }
    let pki = node.server.data_dir().join("pki");
    let admin = (pki.join("admin.crt"), pki.join("admin.key"));
    let admin = Some((admin.0.as_path(), admin.1.as_path()));
    let (code, _) = agent_get("/healthz", None);
    assert_eq!(code, 0, "no client certificate, no TLS session");
    let (code, body) = agent_get("/healthz", admin);
    assert_eq!((code, body.as_str()), (200, "ok"));
    let (code, metrics) = agent_get("/metrics", admin);
    assert_eq!(code, 200, "{metrics}");
    for direction in ["ingress", "egress"] {
        let labels = [
            "namespace=\"default\"",
            "pod=\"two\"",
            &format!("direction=\"{direction}\""),
        ];
        let packets = sample(&metrics, "skiff_pod_packets_total", &labels)
            .unwrap_or_else(|| panic!("no {direction} packets for two in\n{metrics}"));
        assert!(packets >= 3, "{direction}: {packets} packets\n{metrics}");
        let bytes = sample(&metrics, "skiff_pod_bytes_total", &labels).expect("bytes");
        assert!(bytes > packets * 40, "{direction}: {bytes} bytes");
    }
    assert_eq!(
        sample(
            &metrics,
            "skiff_agent_pods",
            &[&format!("node=\"{}\"", node.name)]
        ),
        Some(1),
        "{metrics}"
    );
    let (nobody_cert, nobody_key) =
        client_cert(&node.server, "nobody", "/CN=nobody/O=system:authenticated");
    let (code, body) = agent_get("/metrics", Some((&nobody_cert, &nobody_key)));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("Forbidden"), "{body}");
    let (code, body) = agent_get(
        "/containerLogs/default/two/side",
        Some((&nobody_cert, &nobody_key)),
    );
    assert_eq!(code, 403, "{body}");
    let (code, body) = agent_get("/containerLogs/default/two/side", admin);
    assert_eq!((code, body.as_str()), (200, "side-hello\n"));
    let (code, body) = agent_get("/containerLogs/default/ghost/side", admin);
    assert_eq!(code, 404, "{body}");
    let status: Value = serde_json::from_str(&body).expect("a Status");
    assert_eq!(status["message"], "pod \"ghost\" does not exist");
    assert_eq!(status["reason"], "NotFound");
    let (code, body) = agent_get("/containerLogs/default/two/nope", admin);
    assert_eq!(code, 404, "{body}");
    let status: Value = serde_json::from_str(&body).expect("a Status");
    assert_eq!(
        status["message"],
        "container \"nope\" not found in pod \"two\""
    );

    // The port is published; the agent restarts with the same serving certificate.
    let published = node.server.kubectl_json(&["get", "node", &node.name]);
    assert_eq!(
        published["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"],
        10250
    );
    let cert_file = node.dir().join("root/pki/kubelet.crt");
    let before = fs::read_to_string(&cert_file).expect("serving certificate");
    node.kill_agent();
    node.start_agent();
    node.wait_for("the agent's API back", Duration::from_secs(30), || {
        (agent_get("/healthz", admin).0 == 200).then_some(())
    });
    assert_eq!(
        fs::read_to_string(&cert_file).expect("serving certificate"),
        before
    );
    let (_, metrics) = agent_get("/metrics", admin);
    let labels = ["pod=\"two\"", "direction=\"ingress\""];
    assert!(
        sample(&metrics, "skiff_pod_packets_total", &labels).is_some_and(|p| p >= 3),
        "counters kept across the agent restart\n{metrics}"
    );
    node.server
        .kubectl_ok(&["delete", "pod", "two", "--wait=true", "--timeout=60s"]);
    let _ = std::io::stdout().flush();
}
