//! Issue 3 end to end: the ReplicaSet and Deployment controllers of
//! `skiff-control all`, driven with real kubectl.
//!
//! Nothing runs the pods, so a helper thread plays the node agent: it marks
//! every pod of the test's namespace Running and Ready through the status
//! subresource. The tests share one server, each in its own namespace.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::Duration;

use serde_json::Value;
use skiff_tests::ApiServer;

static SERVER: Mutex<Weak<ApiServer>> = Mutex::new(Weak::new());

fn server() -> Arc<ApiServer> {
    let mut slot = SERVER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(server) = slot.upgrade() {
        return server;
    }
    let server = Arc::new(ApiServer::start_all(&[]));
    *slot = Arc::downgrade(&server);
    server
}

fn items(server: &ApiServer, kind: &str, ns: &str) -> Vec<Value> {
    let list = server.kubectl_json(&["get", kind, "-n", ns]);
    list["items"].as_array().cloned().unwrap_or_default()
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn terminating(object: &Value) -> bool {
    !object["metadata"]["deletionTimestamp"].is_null()
}

/// Active (not terminating) pods of the namespace.
fn active_pods(server: &ApiServer, ns: &str) -> Vec<Value> {
    items(server, "pods", ns)
        .into_iter()
        .filter(|p| !terminating(p))
        .collect()
}

/// Marks every pod of `ns` Running and Ready until dropped.
struct ReadyMarker {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ReadyMarker {
    fn start(server: Arc<ApiServer>, ns: &str) -> ReadyMarker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ns = ns.to_string();
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                for pod in active_pods(&server, &ns) {
                    if is_ready(&pod) {
                        continue;
                    }
                    let name = pod["metadata"]["name"]
                        .as_str()
                        .expect("pod name")
                        .to_string();
                    // The pod may be deleted meanwhile: failures are fine.
                    let _ = server.kubectl(&[
                        "patch",
                        "pod",
                        &name,
                        "-n",
                        &ns,
                        "--subresource=status",
                        "--type=merge",
                        "-p",
                        r#"{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}]}}"#,
                    ]);
                }
                thread::sleep(Duration::from_millis(200));
            }
        });
        ReadyMarker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ReadyMarker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn deployment_manifest(ns: &str, replicas: i32, image: &str) -> String {
    serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": image}]},
            },
        },
    })
    .to_string()
}

fn image_of(server: &ApiServer, ns: &str) -> String {
    server
        .kubectl_ok(&[
            "get",
            "deploy",
            "web",
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ])
        .trim()
        .to_string()
}

fn revision_of(object: &Value) -> Option<i64> {
    object["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
}

#[test]
fn deployment_rolls_out_rolls_back_restarts_and_scales() {
    let server = server();
    let ns = "rollout";
    server.kubectl_ok(&["create", "namespace", ns]);
    let _marker = ReadyMarker::start(server.clone(), ns);
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &deployment_manifest(ns, 5, "nginx:1"),
    );

    // One ReplicaSet named <deploy>-<hash>, five pods it controls.
    let rs = server.wait_for("a ReplicaSet with 5 ready pods", || {
        let sets = items(&server, "rs", ns);
        let pods = active_pods(&server, ns);
        (sets.len() == 1 && pods.len() == 5 && sets[0]["status"]["readyReplicas"] == 5)
            .then(|| sets[0].clone())
    });
    let hash = rs["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .expect("pod-template-hash label");
    assert_eq!(rs["metadata"]["name"], format!("web-{hash}"));
    assert_eq!(revision_of(&rs), Some(1));
    let owner = &rs["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["controller"].as_bool()),
        (Some("Deployment"), Some(true))
    );
    for pod in active_pods(&server, ns) {
        let owner = &pod["metadata"]["ownerReferences"][0];
        assert_eq!(
            owner["name"], rs["metadata"]["name"],
            "pod owned by the ReplicaSet: {pod}"
        );
        assert_eq!(owner["blockOwnerDeletion"], true);
        assert_eq!(pod["metadata"]["labels"]["pod-template-hash"], hash);
    }
    server.kubectl_ok(&["rollout", "status", "deploy/web", "-n", ns, "--timeout=60s"]);

    // A rolling update, watched: never more than 5+1 pods, never fewer than 5-1 ready.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (server, watching) = (server.clone(), watching.clone());
        thread::spawn(move || {
            let mut violations = Vec::new();
            let mut samples = 0;
            while watching.load(Ordering::Relaxed) {
                let pods = active_pods(&server, ns);
                let ready = pods.iter().filter(|p| is_ready(p)).count();
                if pods.len() > 6 {
                    violations.push(format!("{} pods", pods.len()));
                }
                if ready < 4 {
                    violations.push(format!("{ready} ready pods"));
                }
                let sets = items(&server, "rs", ns);
                let spec_total: i64 = sets
                    .iter()
                    .map(|s| s["spec"]["replicas"].as_i64().unwrap_or(0))
                    .sum();
                if spec_total > 6 {
                    violations.push(format!("ReplicaSets sized {spec_total} in all"));
                }
                samples += 1;
            }
            (violations, samples)
        })
    };
    server.kubectl_ok(&["set", "image", "deploy/web", "web=nginx:2", "-n", ns]);
    server.kubectl_ok(&["rollout", "status", "deploy/web", "-n", ns, "--timeout=90s"]);
    watching.store(false, Ordering::Relaxed);
    let (violations, samples) = watcher.join().expect("watcher thread");
    assert!(samples > 0, "the rollout was sampled");
    assert!(
        violations.is_empty(),
        "maxSurge/maxUnavailable violated: {violations:?}"
    );
    let sets = items(&server, "rs", ns);
    assert_eq!(sets.len(), 2, "old and new ReplicaSet: {sets:?}");
    let new = sets
        .iter()
        .find(|s| revision_of(s) == Some(2))
        .expect("a revision 2 ReplicaSet");
    assert_eq!(new["spec"]["replicas"], 5);
    assert_eq!(
        new["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:2"
    );
    let old = sets
        .iter()
        .find(|s| revision_of(s) == Some(1))
        .expect("the revision 1 ReplicaSet stays");
    assert_eq!(old["spec"]["replicas"], 0);
    let deploy = server.kubectl_json(&["get", "deploy", "web", "-n", ns]);
    let status = &deploy["status"];
    assert_eq!(
        (
            status["replicas"].as_i64(),
            status["updatedReplicas"].as_i64(),
            status["availableReplicas"].as_i64()
        ),
        (Some(5), Some(5), Some(5))
    );
    assert_eq!(
        status["observedGeneration"],
        deploy["metadata"]["generation"]
    );
    let conditions = status["conditions"].as_array().expect("conditions");
    let reason = |t: &str| {
        conditions
            .iter()
            .find(|c| c["type"] == t)
            .map(|c| c["reason"].clone())
    };
    assert_eq!(
        reason("Progressing"),
        Some(Value::from("NewReplicaSetAvailable"))
    );
    assert_eq!(
        reason("Available"),
        Some(Value::from("MinimumReplicasAvailable"))
    );

    let history = server.kubectl_ok(&["rollout", "history", "deploy/web", "-n", ns]);
    let revisions: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.parse::<u32>().is_ok())
        .collect();
    assert_eq!(revisions, ["1", "2"], "history:\n{history}");

    // Undo: the first template comes back as revision 3, on its old ReplicaSet.
    server.kubectl_ok(&["rollout", "undo", "deploy/web", "-n", ns]);
    server.kubectl_ok(&["rollout", "status", "deploy/web", "-n", ns, "--timeout=90s"]);
    assert_eq!(image_of(&server, ns), "nginx:1");
    let sets = items(&server, "rs", ns);
    assert_eq!(sets.len(), 2, "undo reuses the old ReplicaSet: {sets:?}");
    let back = sets
        .iter()
        .find(|s| s["spec"]["replicas"] == 5)
        .expect("an active ReplicaSet");
    assert_eq!(back["metadata"]["name"], rs["metadata"]["name"]);
    assert_eq!(revision_of(back), Some(3));
    assert_eq!(
        back["metadata"]["annotations"]["deployment.kubernetes.io/revision-history"],
        "1"
    );
    let deploy = server.kubectl_json(&["get", "deploy", "web", "-n", ns]);
    assert_eq!(revision_of(&deploy), Some(3));

    // Restart: a new template annotation, so a new ReplicaSet.
    server.kubectl_ok(&["rollout", "restart", "deploy/web", "-n", ns]);
    server.kubectl_ok(&["rollout", "status", "deploy/web", "-n", ns, "--timeout=90s"]);
    let sets = items(&server, "rs", ns);
    assert_eq!(sets.len(), 3, "restart made a ReplicaSet: {sets:?}");
    let restarted = sets
        .iter()
        .find(|s| revision_of(s) == Some(4))
        .expect("revision 4");
    assert!(restarted["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"].is_string());
    assert_eq!(restarted["spec"]["replicas"], 5);

    // Scale: the new ReplicaSet follows, and so do the pods.
    server.kubectl_ok(&["scale", "deploy/web", "--replicas=2", "-n", ns]);
    server.wait_for("2 pods after scaling down", || {
        let pods = active_pods(&server, ns);
        let deploy = server.kubectl_json(&["get", "deploy", "web", "-n", ns]);
        (pods.len() == 2 && deploy["status"]["availableReplicas"] == 2).then_some(())
    });
    let sets = items(&server, "rs", ns);
    let total: i64 = sets
        .iter()
        .map(|s| s["spec"]["replicas"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(total, 2);
}

#[test]
fn replicaset_replaces_deleted_pods_and_adopts_orphans() {
    let server = server();
    let ns = "replicas";
    server.kubectl_ok(&["create", "namespace", ns]);
    let _marker = ReadyMarker::start(server.clone(), ns);
    // An orphan matching the selector exists before the ReplicaSet.
    server.kubectl_ok(&[
        "run",
        "orphan",
        "-n",
        ns,
        "--image=nginx",
        "--labels=app=cache",
    ]);
    let manifest = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"name": "cache", "namespace": ns},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "cache"}},
            "template": {
                "metadata": {"labels": {"app": "cache"}},
                "spec": {"containers": [{"name": "c", "image": "redis"}]},
            },
        },
    });
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &manifest.to_string());
    let uid = server.kubectl_ok(&[
        "get",
        "rs",
        "cache",
        "-n",
        ns,
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    server.wait_for("3 ready replicas, the orphan adopted", || {
        let rs = server.kubectl_json(&["get", "rs", "cache", "-n", ns]);
        let pods = active_pods(&server, ns);
        let owned = pods
            .iter()
            .filter(|p| p["metadata"]["ownerReferences"][0]["uid"] == uid.as_str())
            .count();
        (owned == 3
            && pods.len() == 3
            && rs["status"]["readyReplicas"] == 3
            && rs["status"]["availableReplicas"] == 3)
            .then_some(())
    });
    let orphan = server.kubectl_json(&["get", "pod", "orphan", "-n", ns]);
    assert_eq!(
        orphan["metadata"]["ownerReferences"][0]["controller"], true,
        "adopted: {orphan}"
    );
    let rs = server.kubectl_json(&["get", "rs", "cache", "-n", ns]);
    assert_eq!(rs["status"]["fullyLabeledReplicas"], 3);
    assert_eq!(
        rs["status"]["observedGeneration"],
        rs["metadata"]["generation"]
    );
    let generated = active_pods(&server, ns)
        .into_iter()
        .filter(|p| p["metadata"]["name"] != "orphan")
        .all(|p| p["metadata"]["generateName"] == "cache-");
    assert!(generated, "pods are named cache-xxxxx");

    // A deleted pod is replaced.
    let victim = active_pods(&server, ns)[0]["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    server.kubectl_ok(&["delete", "pod", &victim, "-n", ns, "--wait=false"]);
    server.wait_for("a replacement pod", || {
        let pods = active_pods(&server, ns);
        (pods.len() == 3
            && pods
                .iter()
                .all(|p| p["metadata"]["name"] != victim.as_str()))
        .then_some(())
    });

    // A pod relabelled out of the selector is released and replaced.
    let leaver = active_pods(&server, ns)[0]["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    server.kubectl_ok(&["label", "pod", &leaver, "-n", ns, "app=gone", "--overwrite"]);
    server.wait_for("the relabelled pod released and replaced", || {
        let released = server.kubectl_json(&["get", "pod", &leaver, "-n", ns]);
        let owned = active_pods(&server, ns)
            .iter()
            .filter(|p| p["metadata"]["ownerReferences"][0]["uid"] == uid.as_str())
            .count();
        (released["metadata"]["ownerReferences"].is_null() && owned == 3).then_some(())
    });

    // Scale down: surplus pods go.
    server.kubectl_ok(&["scale", "rs", "cache", "--replicas=1", "-n", ns]);
    server.wait_for("1 replica", || {
        let rs = server.kubectl_json(&["get", "rs", "cache", "-n", ns]);
        let owned = active_pods(&server, ns)
            .iter()
            .filter(|p| p["metadata"]["ownerReferences"][0]["uid"] == uid.as_str())
            .count();
        (owned == 1 && rs["status"]["replicas"] == 1).then_some(())
    });
}

#[test]
fn recreate_and_paused_deployments() {
    let server = server();
    let ns = "recreate";
    server.kubectl_ok(&["create", "namespace", ns]);
    let _marker = ReadyMarker::start(server.clone(), ns);
    let mut manifest: Value =
        serde_json::from_str(&deployment_manifest(ns, 3, "nginx:1")).expect("manifest");
    manifest["spec"]["strategy"] = serde_json::json!({"type": "Recreate"});
    manifest["spec"]["revisionHistoryLimit"] = Value::from(1);
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &manifest.to_string());
    server.kubectl_ok(&["rollout", "status", "deploy/web", "-n", ns, "--timeout=60s"]);

    // Paused: a template change makes no ReplicaSet; resuming rolls out.
    server.kubectl_ok(&["rollout", "pause", "deploy/web", "-n", ns]);
    server.kubectl_ok(&["set", "image", "deploy/web", "web=nginx:2", "-n", ns]);
    server.wait_for("the Progressing condition to say paused", || {
        let deploy = server.kubectl_json(&["get", "deploy", "web", "-n", ns]);
        deploy["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Progressing" && c["reason"] == "DeploymentPaused")
            })
            .then_some(())
    });
    assert_eq!(items(&server, "rs", ns).len(), 1, "no rollout while paused");

    // Recreate: the old pods all go before any new one exists.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (server, watching) = (server.clone(), watching.clone());
        thread::spawn(move || {
            let mut mixed = Vec::new();
            while watching.load(Ordering::Relaxed) {
                let images: std::collections::BTreeSet<String> = active_pods(&server, ns)
                    .iter()
                    .map(|p| {
                        p["spec"]["containers"][0]["image"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string()
                    })
                    .collect();
                if images.len() > 1 {
                    mixed.push(images);
                }
            }
            mixed
        })
    };
    server.kubectl_ok(&["rollout", "resume", "deploy/web", "-n", ns]);
    server.kubectl_ok(&["rollout", "status", "deploy/web", "-n", ns, "--timeout=90s"]);
    watching.store(false, Ordering::Relaxed);
    let mixed = watcher.join().expect("watcher thread");
    assert!(
        mixed.is_empty(),
        "old and new pods at once under Recreate: {mixed:?}"
    );
    let pods = active_pods(&server, ns);
    assert_eq!(pods.len(), 3);
    assert!(
        pods.iter()
            .all(|p| p["spec"]["containers"][0]["image"] == "nginx:2")
    );

    // revisionHistoryLimit 1: after a third template only one old set stays.
    server.kubectl_ok(&["set", "image", "deploy/web", "web=nginx:3", "-n", ns]);
    server.kubectl_ok(&["rollout", "status", "deploy/web", "-n", ns, "--timeout=90s"]);
    server.wait_for("old ReplicaSets beyond the history limit deleted", || {
        let sets = items(&server, "rs", ns);
        let mut revisions: Vec<i64> = sets.iter().filter_map(revision_of).collect();
        revisions.sort();
        (revisions == [2, 3]).then_some(())
    });
}

#[test]
fn deleting_a_deployment_cascades_to_its_replicasets_and_pods() {
    let server = server();
    let ns = "cascade";
    server.kubectl_ok(&["create", "namespace", ns]);
    let _marker = ReadyMarker::start(server.clone(), ns);
    // Deploy 3 replicas, then delete the Deployment with `cascade`.
    let deploy_and_delete = |cascade: &str| {
        server.kubectl_stdin_ok(
            &["apply", "-f", "-"],
            &deployment_manifest(ns, 3, "nginx:1"),
        );
        server.wait_for("a ReplicaSet with 3 pods", || {
            (items(&server, "rs", ns).len() == 1 && active_pods(&server, ns).len() == 3)
                .then_some(())
        });
        let cascade = format!("--cascade={cascade}");
        let args = [
            "delete",
            "deployment",
            "web",
            "-n",
            ns,
            &cascade,
            "--timeout=60s",
        ];
        server.kubectl_ok(&args);
    };

    // Background (kubectl's default): the Deployment goes at once, then the
    // collector deletes its ReplicaSet, then the set's pods.
    deploy_and_delete("background");
    server.wait_for("the ReplicaSet and its pods collected", || {
        (items(&server, "rs", ns).is_empty() && items(&server, "pods", ns).is_empty()).then_some(())
    });

    // Foreground: kubectl waits for the Deployment, which goes only after
    // its ReplicaSet, which goes only after its pods (blockOwnerDeletion).
    deploy_and_delete("foreground");
    let sets = items(&server, "rs", ns);
    let pods = items(&server, "pods", ns);
    assert!(
        sets.is_empty() && pods.is_empty(),
        "the Deployment went before its dependents: sets {sets:?}, pods {pods:?}"
    );

    // Orphan: the ReplicaSet and its pods stay, the set without its owner.
    deploy_and_delete("orphan");
    server.wait_gc_caught_up(ns);
    let sets = items(&server, "rs", ns);
    assert_eq!(sets.len(), 1, "the orphaned ReplicaSet stays: {sets:?}");
    assert!(
        sets[0]["metadata"].get("ownerReferences").is_none(),
        "the orphan keeps its reference: {}",
        sets[0]
    );
    assert_eq!(active_pods(&server, ns).len(), 3, "the set's pods stay");
}
