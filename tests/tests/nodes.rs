//! Nodes end to end: `skiff-control all` with hollow nodes from `skiff-agent --hollow`. Node
//! IPAM gives each node a pod CIDR, the agents report their pods Running with addresses from it,
//! and the node lifecycle controller marks a node whose agent was killed Unknown, taints it
//! unreachable and evicts its pods after their tolerationSeconds, so their ReplicaSet replaces
//! them on the other nodes.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_tests::{ApiServer, HollowNodes};

/// The grace period the tests give the node lifecycle controller.
const GRACE: &str = "8s";

/// Agent flags that heartbeat well within [`GRACE`].
const FAST: [&str; 4] = [
    "--node-lease-renew-interval",
    "1s",
    "--node-status-report-frequency",
    "4s",
];

fn start_server() -> ApiServer {
    ApiServer::start_all(&["--node-monitor-grace-period", GRACE])
}

fn agent(server: &ApiServer, count: u32, prefix: &str) -> HollowNodes {
    let mut args = vec!["--name-prefix", prefix];
    args.extend(FAST);
    HollowNodes::start(server, count, &args)
}

fn node(server: &ApiServer, name: &str) -> Value {
    server.kubectl_json(&["get", "node", name])
}

fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Whether `ip` lies in `cidr` (`a.b.c.d/n`).
fn in_cidr(ip: &str, cidr: &str) -> bool {
    let (net, bits) = cidr.split_once('/').expect("a CIDR");
    let net: Ipv4Addr = net.parse().expect("a network address");
    let bits: u32 = bits.parse().expect("a prefix length");
    let ip: Ipv4Addr = ip.parse().expect("an IPv4 address");
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    u32::from(ip) & mask == u32::from(net) & mask
}

fn pod_manifest(name: &str, node: &str) -> String {
    format!(
        r#"{{"apiVersion": "v1", "kind": "Pod",
            "metadata": {{"name": "{name}", "labels": {{"test": "bound"}}}},
            "spec": {{"nodeName": "{node}", "terminationGracePeriodSeconds": 1,
                      "tolerations": [{{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}}],
                      "containers": [{{"name": "app", "image": "nginx"}}, {{"name": "side", "image": "busybox"}}]}}}}"#
    )
}

const REPLICASET: &str = r#"{"apiVersion": "apps/v1", "kind": "ReplicaSet",
  "metadata": {"name": "web"},
  "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
    "template": {"metadata": {"labels": {"app": "web"}},
      "spec": {"terminationGracePeriodSeconds": 1,
        "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}],
        "containers": [{"name": "app", "image": "nginx"}]}}}}"#;

/// The pods matching `selector`, as JSON items.
fn pods(server: &ApiServer, selector: &str) -> Vec<Value> {
    server.kubectl_json(&["get", "pods", "-l", selector])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn is_running_ready(pod: &Value) -> bool {
    pod["status"]["phase"] == "Running"
        && pod["metadata"]["deletionTimestamp"].is_null()
        && condition(pod, "Ready").is_some_and(|c| c["status"] == "True")
}

#[test]
fn hollow_nodes_run_pods_and_lost_nodes_are_evicted() {
    let server = start_server();
    // One agent per node, so that one node can be stopped alone.
    let mut agents: Vec<HollowNodes> = ["a-", "b-", "c-"]
        .iter()
        .map(|p| agent(&server, 1, p))
        .collect();
    for a in &mut agents {
        a.wait_ready(&server, Duration::from_secs(60));
    }
    let names: Vec<String> = agents.iter().map(|a| a.names()[0].clone()).collect();

    // Registration: distinct pod CIDRs in the cluster CIDR, what a kubelet reports, leases.
    let mut cidrs = Vec::new();
    for name in &names {
        let n = node(&server, name);
        let cidr = n["spec"]["podCIDR"].as_str().expect("podCIDR").to_string();
        assert!(
            in_cidr(cidr.split('/').next().expect("address"), "10.244.0.0/16"),
            "{cidr} outside the cluster CIDR"
        );
        assert!(cidr.ends_with("/24"), "{cidr} is not a /24");
        assert_eq!(n["spec"]["podCIDRs"][0], cidr.as_str());
        assert!(!cidrs.contains(&cidr), "{cidr} handed out twice");
        cidrs.push(cidr);
        assert_eq!(n["status"]["nodeInfo"]["kubeletVersion"], "v1.37.0-skiff");
        assert_eq!(
            n["status"]["nodeInfo"]["containerRuntimeVersion"],
            "hollow://"
        );
        assert_eq!(
            n["metadata"]["labels"]["kubernetes.io/hostname"],
            name.as_str()
        );
        assert_eq!(
            n["metadata"]["labels"]["node.kubernetes.io/instance-type"],
            "hollow"
        );
        assert_eq!(n["status"]["capacity"]["pods"], "110");
        assert_eq!(n["status"]["addresses"][0]["type"], "InternalIP");
        let lease = server.kubectl_json(&["get", "lease", "-n", "kube-node-lease", name]);
        assert_eq!(lease["spec"]["holderIdentity"], name.as_str());
        assert!(lease["spec"]["renewTime"].is_string());
    }

    // Pods bound straight to the nodes run, with addresses from their node's range.
    for name in &names {
        server.kubectl_stdin_ok(
            &["apply", "-f", "-"],
            &pod_manifest(&format!("pod-{name}"), name),
        );
    }
    for (name, cidr) in names.iter().zip(&cidrs) {
        let pod = server.wait_within(
            Duration::from_secs(30),
            &format!("pod-{name} Running"),
            || {
                let pod = server.kubectl_json(&["get", "pod", &format!("pod-{name}")]);
                is_running_ready(&pod).then_some(pod)
            },
        );
        let ip = pod["status"]["podIP"].as_str().expect("podIP");
        assert!(in_cidr(ip, cidr), "pod IP {ip} outside its node's {cidr}");
        let host = node(&server, name)["status"]["addresses"][0]["address"].clone();
        assert_eq!(pod["status"]["hostIP"], host);
        assert!(pod["status"]["startTime"].is_string());
        let statuses = pod["status"]["containerStatuses"]
            .as_array()
            .expect("container statuses");
        assert_eq!(statuses.len(), 2);
        for s in statuses {
            assert_eq!(s["ready"], true);
            assert_eq!(s["restartCount"], 0);
            assert!(s["state"]["running"].is_object());
        }
        for type_ in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
            assert_eq!(
                condition(&pod, type_).expect("condition")["status"],
                "True",
                "{type_}"
            );
        }
    }

    // The agent finishes graceful deletions on live nodes.
    let first = format!("pod-{}", names[0]);
    server.kubectl_ok(&["delete", "pod", &first, "--timeout=30s"]);
    let gone = server.kubectl(&["get", "pod", &first]);
    assert!(!gone.status.success(), "{first} still exists after delete");

    // A ReplicaSet spread over the nodes by the scheduler.
    server.kubectl_stdin_ok(&["apply", "-f", "-"], REPLICASET);
    server.wait_within(Duration::from_secs(60), "3 web pods Running", || {
        let running = pods(&server, "app=web")
            .iter()
            .filter(|p| is_running_ready(p))
            .count();
        (running == 3).then_some(())
    });

    // Stop the last node's agent: it stops heartbeating.
    let lost = names[2].clone();
    let lost_pod = format!("pod-{lost}");
    let web_on_lost: Vec<String> = pods(&server, "app=web")
        .iter()
        .filter(|p| p["spec"]["nodeName"] == lost.as_str())
        .map(|p| p["metadata"]["name"].as_str().expect("name").to_string())
        .collect();
    agents[2].kill();
    let stopped = Instant::now();

    let n = server.wait_within(
        Duration::from_secs(30),
        "the lost node Unknown and tainted",
        || {
            let n = node(&server, &lost);
            let unknown = condition(&n, "Ready").is_some_and(|c| c["status"] == "Unknown");
            let tainted = n["spec"]["taints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| {
                    t["key"] == "node.kubernetes.io/unreachable"
                        && t["effect"] == "NoExecute"
                        && t["timeAdded"].is_string()
                });
            (unknown && tainted).then_some(n)
        },
    );
    let elapsed = stopped.elapsed();
    assert!(
        elapsed >= Duration::from_secs(5),
        "marked Unknown after only {elapsed:?} (grace {GRACE})"
    );
    let ready = condition(&n, "Ready").expect("Ready");
    assert_eq!(ready["reason"], "NodeStatusUnknown");
    assert_eq!(ready["message"], "Kubelet stopped posting node status.");

    // Its pods go after their 5 s toleration (evicted, then force-deleted since nobody finishes them).
    server.wait_within(Duration::from_secs(60), "the lost node's pods gone", || {
        let left = pods(&server, "test=bound,app!=web")
            .iter()
            .chain(pods(&server, "app=web").iter())
            .filter(|p| p["spec"]["nodeName"] == lost.as_str())
            .count();
        (left == 0).then_some(())
    });
    let evicted_at = Instant::now();
    assert!(
        evicted_at.duration_since(stopped) >= Duration::from_secs(10),
        "pods evicted before grace + toleration"
    );
    assert!(
        !server.kubectl(&["get", "pod", &lost_pod]).status.success(),
        "{lost_pod} still exists"
    );

    // The ReplicaSet replaced them on the nodes that are left.
    server.wait_within(
        Duration::from_secs(60),
        "3 web pods Running elsewhere",
        || {
            let all = pods(&server, "app=web");
            let running: Vec<&Value> = all.iter().filter(|p| is_running_ready(p)).collect();
            (running.len() == 3
                && running
                    .iter()
                    .all(|p| p["spec"]["nodeName"] != lost.as_str()))
            .then_some(())
        },
    );
    for name in &web_on_lost {
        assert!(
            !server.kubectl(&["get", "pod", name]).status.success(),
            "{name} still exists"
        );
    }

    // The others stay Ready and untainted.
    for name in &names[..2] {
        let n = node(&server, name);
        assert_eq!(
            condition(&n, "Ready").expect("Ready")["status"],
            "True",
            "{name}"
        );
        assert!(
            n["spec"]["taints"].is_null() || n["spec"]["taints"] == serde_json::json!([]),
            "{name} tainted: {}",
            n["spec"]["taints"]
        );
    }
}

#[test]
fn a_deleted_node_releases_its_pod_cidr() {
    let server = start_server();
    let mut first = agent(&server, 2, "x-");
    first.wait_ready(&server, Duration::from_secs(60));
    let x0 = node(&server, "x-0")["spec"]["podCIDR"]
        .as_str()
        .expect("podCIDR")
        .to_string();
    let x1 = node(&server, "x-1")["spec"]["podCIDR"]
        .as_str()
        .expect("podCIDR")
        .to_string();
    assert_ne!(x0, x1);
    first.kill();
    server.kubectl_ok(&["delete", "node", "x-0", "--timeout=30s"]);

    let mut second = agent(&server, 1, "y-");
    second.wait_ready(&server, Duration::from_secs(60));
    let y0 = node(&server, "y-0")["spec"]["podCIDR"]
        .as_str()
        .expect("podCIDR")
        .to_string();
    assert_eq!(y0, x0, "the released range is handed out again");
    assert_eq!(
        node(&server, "x-1")["spec"]["podCIDR"],
        x1.as_str(),
        "x-1 keeps its range"
    );
}
