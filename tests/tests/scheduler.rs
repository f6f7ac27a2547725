//! The scheduler inside `skiff-control all`, driven with the pinned kubectl: fake Nodes (objects
//! with capacity and a Ready condition; no agent runs), then pods that must be bound, spread,
//! kept off tainted nodes, steered by nodeSelector, and left Pending with upstream's
//! FailedScheduling message until a big enough node appears.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use skiff_tests::ApiServer;

fn now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("run date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Creates a Ready node with `cpu` cores, 8Gi of memory and 110 pod slots.
fn add_node(server: &ApiServer, name: &str, cpu: &str, labels: Value) {
    let mut all_labels = json!({"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"});
    json_merge(&mut all_labels, &labels);
    let node = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": all_labels}});
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &node.to_string());
    let t = now();
    let resources = json!({"cpu": cpu, "memory": "8Gi", "pods": "110"});
    let status = json!({"status": {
        "capacity": resources, "allocatable": resources,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                        "lastHeartbeatTime": t, "lastTransitionTime": t}]}});
    server.kubectl_ok(&[
        "patch",
        "node",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
}

fn json_merge(target: &mut Value, patch: &Value) {
    if let (Some(t), Some(p)) = (target.as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            t.insert(k.clone(), v.clone());
        }
    }
}

/// A pause pod requesting `cpu`, with extra spec fields and metadata.
fn pod(name: &str, cpu: &str, spec: Value, metadata: Value) -> Value {
    let mut meta = json!({"name": name, "namespace": "sched"});
    json_merge(&mut meta, &metadata);
    let mut full_spec = json!({"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10",
        "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}}}]});
    json_merge(&mut full_spec, &spec);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": full_spec})
}

fn create(server: &ApiServer, objects: &[Value]) {
    let stream: Vec<String> = objects.iter().map(Value::to_string).collect();
    server.kubectl_stdin_ok(&["create", "-f", "-"], &stream.join("\n"));
}

fn node_of(server: &ApiServer, name: &str) -> Option<String> {
    let pod = server.kubectl_json(&["get", "pod", "-n", "sched", name]);
    pod["spec"]["nodeName"]
        .as_str()
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

fn wait_bound(server: &ApiServer, name: &str) -> String {
    server.wait_for(&format!("pod {name} to be bound"), || node_of(server, name))
}

/// The message of the FailedScheduling event about pod `name`, once there is one.
fn failed_scheduling(server: &ApiServer, name: &str) -> Option<String> {
    let events = server.kubectl_json(&["get", "events", "-n", "sched"]);
    events["items"]
        .as_array()?
        .iter()
        .filter(|e| e["involvedObject"]["name"] == name && e["reason"] == "FailedScheduling")
        .filter_map(|e| e["message"].as_str())
        .next_back()
        .map(str::to_string)
}

#[test]
fn scheduler_binds_spreads_filters_and_retries() {
    let server = ApiServer::start_all(&["--node-monitor-grace-period", "3600s"]);
    server.kubectl_ok(&["create", "namespace", "sched"]);
    for name in ["n1", "n2", "n3"] {
        add_node(&server, name, "4", json!({}));
    }

    // Five replicas of one owner spread 2/2/1 over three equal nodes.
    server.kubectl_ok(&["create", "configmap", "-n", "sched", "owner"]);
    let owner = server.kubectl_json(&["get", "configmap", "-n", "sched", "owner"]);
    let owner_uid = owner["metadata"]["uid"].as_str().expect("owner uid");
    let owned = json!({"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
        "uid": owner_uid, "controller": true}], "labels": {"app": "web"}});
    let replicas: Vec<Value> = (0..5)
        .map(|i| pod(&format!("web-{i}"), "100m", json!({}), owned.clone()))
        .collect();
    create(&server, &replicas);
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..5 {
        *per_node
            .entry(wait_bound(&server, &format!("web-{i}")))
            .or_default() += 1;
    }
    let mut counts: Vec<usize> = per_node.values().copied().collect();
    counts.sort();
    assert_eq!(counts, vec![1, 2, 2], "replicas per node: {per_node:?}");
    let web0 = server.kubectl_json(&["get", "pod", "-n", "sched", "web-0"]);
    let scheduled = web0["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "PodScheduled"))
        .unwrap_or_else(|| panic!("PodScheduled condition in {web0:#}"));
    assert_eq!(scheduled["status"], "True", "in {web0:#}");
    let node = web0["spec"]["nodeName"].as_str().expect("bound");
    let want = format!("Successfully assigned sched/web-0 to {node}");
    server.wait_for("the Scheduled event", || {
        let events = server.kubectl_json(&["get", "events", "-n", "sched"]);
        events["items"]
            .as_array()?
            .iter()
            .find(|e| {
                e["involvedObject"]["name"] == "web-0"
                    && e["reason"] == "Scheduled"
                    && e["message"] == want.as_str()
                    && e["source"]["component"] == "default-scheduler"
            })
            .map(|_| ())
    });

    // A pod asking for more cpu than any node has stays Pending, with upstream's message in
    // an event and in its PodScheduled condition.
    create(&server, &[pod("big", "100", json!({}), json!({}))]);
    let message = server.wait_for("FailedScheduling for big", || {
        failed_scheduling(&server, "big")
    });
    assert_eq!(
        message,
        "0/3 nodes are available: 3 Insufficient cpu. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling."
    );
    let describe = server.kubectl_ok(&["describe", "pod", "-n", "sched", "big"]);
    assert!(
        describe.contains("FailedScheduling") && describe.contains("3 Insufficient cpu"),
        "kubectl describe shows the event:\n{describe}"
    );
    let condition = server.wait_for("big's PodScheduled=False condition", || {
        let pod = server.kubectl_json(&["get", "pod", "-n", "sched", "big"]);
        pod["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
            .cloned()
    });
    assert_eq!(condition["reason"], "Unschedulable", "{condition:#}");
    assert_eq!(condition["message"], message.as_str(), "{condition:#}");
    assert_eq!(node_of(&server, "big"), None, "big stays Pending");

    // A tainted node is avoided unless tolerated.
    server.kubectl_ok(&["taint", "node", "n3", "dedicated=gpu:NoSchedule"]);
    let on_n3 = json!({"nodeSelector": {"kubernetes.io/hostname": "n3"}});
    let mut tolerating = on_n3.clone();
    tolerating["tolerations"] = json!([{"key": "dedicated", "operator": "Equal", "value": "gpu",
        "effect": "NoSchedule"}]);
    let plain: Vec<Value> = (0..6)
        .map(|i| pod(&format!("plain-{i}"), "10m", json!({}), json!({})))
        .collect();
    let mut batch = plain;
    batch.push(pod("intolerant", "10m", on_n3.clone(), json!({})));
    batch.push(pod("tolerant", "10m", tolerating, json!({})));
    create(&server, &batch);
    for i in 0..6 {
        let node = wait_bound(&server, &format!("plain-{i}"));
        assert_ne!(node, "n3", "plain-{i} landed on the tainted node");
    }
    assert_eq!(wait_bound(&server, "tolerant"), "n3");
    let message = server.wait_for("FailedScheduling for intolerant", || {
        failed_scheduling(&server, "intolerant")
    });
    assert_eq!(
        message,
        "0/3 nodes are available: 1 node(s) had untolerated taint(s), 2 node(s) didn't match Pod's node affinity/selector. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling."
    );

    // A nodeSelector is honoured.
    server.kubectl_ok(&["label", "node", "n2", "disk=ssd"]);
    create(
        &server,
        &[pod(
            "ssd",
            "10m",
            json!({"nodeSelector": {"disk": "ssd"}}),
            json!({}),
        )],
    );
    assert_eq!(wait_bound(&server, "ssd"), "n2");

    // The unschedulable pod is placed once a big enough node joins.
    add_node(&server, "huge", "200", json!({}));
    assert_eq!(wait_bound(&server, "big"), "huge");
    assert_eq!(
        node_of(&server, "intolerant"),
        None,
        "intolerant still cannot go anywhere"
    );

    // The scheduler holds the kube-scheduler lease.
    let lease = server.kubectl_json(&["get", "lease", "-n", "kube-system", "kube-scheduler"]);
    assert!(
        lease["spec"]["holderIdentity"]
            .as_str()
            .is_some_and(|h| !h.is_empty()),
        "lease held: {lease:#}"
    );
}
