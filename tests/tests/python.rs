//! Issue 2 end to end: the official Python `kubernetes` client (PyPI) against `skiff-control
//! apiserver`: list, create, patch, watch, errors and watch resumption.
//!
//! The tests share one server (it stops when the last of them finishes), each in a namespace of
//! its own. Each Python script prints one JSON document on its last line, which the test checks.

use std::sync::{Arc, Mutex, Weak};

use serde_json::Value;
use skiff_tests::ApiServer;

static SERVER: Mutex<Weak<ApiServer>> = Mutex::new(Weak::new());

fn server() -> Arc<ApiServer> {
    ApiServer::shared(&SERVER)
}

/// Common prelude: clients, and `ns(name)` creating a namespace.
const PRELUDE: &str = r#"
import json, threading, time
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
config.load_kube_config()
core = client.CoreV1Api()
apps = client.AppsV1Api()
def ns(name):
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
def cm(name, data):
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data=data)
"#;

/// Runs `body` after [`PRELUDE`] and parses the JSON on the last line of its output.
fn run(server: &ApiServer, body: &str) -> Value {
    let script = format!("{PRELUDE}\n{body}");
    let out = server.python(&script);
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("the script's last line is JSON ({e}):\n{out}"))
}

#[test]
fn lists_creates_and_patches() {
    let server = server();
    let result = run(
        &server,
        r#"
ns("py-crud")
created = core.create_namespaced_config_map("py-crud", cm("settings", {"a": "1"}))
dep = client.V1Deployment(
    metadata=client.V1ObjectMeta(name="web", labels={"app": "web"}),
    spec=client.V1DeploymentSpec(
        replicas=1,
        selector=client.V1LabelSelector(match_labels={"app": "web"}),
        template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels={"app": "web"}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="nginx:1.27")]))))
d1 = apps.create_namespaced_deployment("py-crud", dep)
d2 = apps.patch_namespaced_deployment("web", "py-crud", {"spec": {"replicas": 3}})
c2 = core.patch_namespaced_config_map("settings", "py-crud", {"data": {"b": "2"}})
cms = core.list_namespaced_config_map("py-crud")
deps = apps.list_namespaced_deployment("py-crud", label_selector="app=web")
none = apps.list_namespaced_deployment("py-crud", label_selector="app=other")
nss = [n.metadata.name for n in core.list_namespace().items]
print(json.dumps({
    "created_rv": created.metadata.resource_version,
    "created_uid": created.metadata.uid,
    "gen1": d1.metadata.generation, "gen2": d2.metadata.generation,
    "replicas": d2.spec.replicas,
    "image": d2.spec.template.spec.containers[0].image,
    "strategy": d2.spec.strategy.type,
    "cm_data": c2.data,
    "cm_rv": c2.metadata.resource_version,
    "cm_names": [c.metadata.name for c in cms.items],
    "list_rv": cms.metadata.resource_version,
    "deps": [d.metadata.name for d in deps.items],
    "none": len(none.items),
    "has_ns": "py-crud" in nss,
}))
"#,
    );
    assert!(
        result["created_uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty()),
        "uid: {result:#}"
    );
    assert_eq!(result["gen1"], 1, "generation at create: {result:#}");
    assert_eq!(
        result["gen2"], 2,
        "generation after a spec patch: {result:#}"
    );
    assert_eq!(result["replicas"], 3, "patched replicas: {result:#}");
    assert_eq!(
        result["image"], "nginx:1.27",
        "image kept by the patch: {result:#}"
    );
    assert_eq!(
        result["strategy"], "RollingUpdate",
        "defaulted strategy: {result:#}"
    );
    assert_eq!(
        result["cm_data"],
        serde_json::json!({"a": "1", "b": "2"}),
        "merged configmap data: {result:#}"
    );
    assert_ne!(
        result["cm_rv"], result["created_rv"],
        "resourceVersion changed: {result:#}"
    );
    assert!(
        result["cm_names"]
            .as_array()
            .is_some_and(|n| n.contains(&Value::from("settings"))),
        "configmap listed: {result:#}"
    );
    assert!(
        result["list_rv"].as_str().is_some_and(|r| !r.is_empty()),
        "list resourceVersion: {result:#}"
    );
    assert_eq!(
        result["deps"],
        serde_json::json!(["web"]),
        "label selector: {result:#}"
    );
    assert_eq!(result["none"], 0, "non-matching selector: {result:#}");
    assert_eq!(result["has_ns"], true, "namespace listed: {result:#}");
}

#[test]
fn watch_receives_added_then_modified() {
    let server = server();
    let result = run(
        &server,
        r#"
ns("py-watch")
def writer():
    time.sleep(1.0)
    core.create_namespaced_config_map("py-watch", cm("live", {"v": "1"}))
    time.sleep(0.3)
    core.patch_namespaced_config_map("live", "py-watch", {"data": {"v": "2"}})
threading.Thread(target=writer).start()
events = []
w = watch.Watch()
for ev in w.stream(core.list_namespaced_config_map, "py-watch", timeout_seconds=20):
    events.append([ev["type"], ev["object"].metadata.name, (ev["object"].data or {}).get("v")])
    if ev["type"] == "MODIFIED":
        w.stop()
print(json.dumps(events))
"#,
    );
    assert_eq!(
        result,
        serde_json::json!([["ADDED", "live", "1"], ["MODIFIED", "live", "2"]]),
        "watch events"
    );
}

/// Writes start from the watch cache's state of an object (sparing etcd a
/// read), which may be behind etcd's. Concurrent patches of one object all
/// land, and a patch whose resourceVersion precondition is the one the last
/// write returned succeeds, however far behind the cache is; a precondition
/// that is really stale is still refused with 409. Other writers flood the
/// collection meanwhile so that the cache lags behind etcd.
#[test]
fn writes_from_the_watch_cache_never_lose_or_refuse_wrongly() {
    let server = server();
    let result = run(
        &server,
        r#"
ns("py-cache")
# A watch keeps the ConfigMaps' watch cache running while the writes go on.
w = watch.Watch()
def watcher():
    for _ in w.stream(core.list_namespaced_config_map, "py-cache", timeout_seconds=60):
        pass
threading.Thread(target=watcher, daemon=True).start()
time.sleep(0.5)
core.create_namespaced_config_map("py-cache", cm("shared", {"start": "1"}))
errors = []
def patcher(i):
    for j in range(5):
        try:
            core.patch_namespaced_config_map("shared", "py-cache", {"data": {f"k{i}-{j}": "v"}})
        except ApiException as e:
            errors.append(f"patch {i}-{j}: {e.status}")
threads = [threading.Thread(target=patcher, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
# Other writers to the collection keep its watch cache busy, so it lags
# behind etcd while the preconditions are checked.
busy = True
def flooder(i):
    n = 0
    while busy:
        core.create_namespaced_config_map("py-cache", cm(f"flood-{i}-{n}", {"a": "b"}))
        n += 1
floods = [threading.Thread(target=flooder, args=(i,)) for i in range(4)]
for t in floods: t.start()
refused = 0
for n in range(200):
    rv = core.patch_namespaced_config_map("shared", "py-cache", {"data": {"n": str(n)}}).metadata.resource_version
    try:
        core.patch_namespaced_config_map("shared", "py-cache",
            {"metadata": {"resourceVersion": rv}, "data": {"m": str(n)}})
    except ApiException as e:
        errors.append(f"precondition {rv}: {e.status}")
    try:
        core.patch_namespaced_config_map("shared", "py-cache",
            {"metadata": {"resourceVersion": rv}, "data": {"stale": str(n)}})
    except ApiException as e:
        refused += e.status == 409
busy = False
for t in floods: t.join()
w.stop()
data = core.read_namespaced_config_map("shared", "py-cache").data
print(json.dumps({"errors": errors, "keys": len([k for k in data if k.startswith("k")]),
    "m": data.get("m"), "stale": data.get("stale"), "refused": refused}))
"#,
    );
    assert_eq!(
        result,
        serde_json::json!({"errors": [], "keys": 40, "m": "199", "stale": null, "refused": 200}),
        "every concurrent patch and every fresh precondition lands; stale ones are refused"
    );
}

/// Bindings refuse a pod that is already bound or being deleted, with
/// upstream's messages, and only those: a pod deleted and created again
/// under the same name binds at once, while a watch keeps the pods' watch
/// cache (which bindings start from) running.
#[test]
fn bindings_refuse_bound_and_deleting_pods_only() {
    let server = server();
    let result = run(
        &server,
        r#"
ns("py-bind")
w = watch.Watch()
def watcher():
    for _ in w.stream(core.list_namespaced_pod, "py-bind", timeout_seconds=60):
        pass
threading.Thread(target=watcher, daemon=True).start()
time.sleep(0.5)
def pod(name, finalizers=None):
    return client.V1Pod(metadata=client.V1ObjectMeta(name=name, finalizers=finalizers),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]))
def bind(name, node):
    body = client.V1Binding(metadata=client.V1ObjectMeta(name=name),
        target=client.V1ObjectReference(kind="Node", name=node))
    try:
        core.create_namespaced_pod_binding(name, "py-bind", body, _preload_content=False)
        return "bound"
    except ApiException as e:
        return f"{e.status}: {json.loads(e.body)['message']}"
out = {}
core.create_namespaced_pod("py-bind", pod("a"))
out["first"] = bind("a", "node-a")
out["again"] = bind("a", "node-b")
core.create_namespaced_pod("py-bind", pod("held", ["example.com/hold"]))
core.delete_namespaced_pod("held", "py-bind", grace_period_seconds=0)
out["deleting"] = bind("held", "node-a")
core.patch_namespaced_pod("held", "py-bind", {"metadata": {"finalizers": None}})
recreated = []
for n in range(10):
    core.create_namespaced_pod("py-bind", pod("re"))
    recreated.append(bind("re", "node-a"))
    core.delete_namespaced_pod("re", "py-bind", grace_period_seconds=0)
    while True:
        try:
            core.read_namespaced_pod("re", "py-bind")
        except ApiException as e:
            if e.status == 404: break
out["recreated"] = sorted(set(recreated))
w.stop()
print(json.dumps(out))
"#,
    );
    assert_eq!(
        result,
        serde_json::json!({
            "first": "bound",
            "again": "409: pod a is already assigned to node \"node-a\"",
            "deleting": "409: pod held is being deleted, cannot be assigned to a host",
            "recreated": ["bound"],
        }),
        "only a pod really bound or being deleted is refused"
    );
}

/// A watch with a label selector sees an object that starts to match as
/// ADDED, one that stops matching as DELETED, and a matching one deleted
/// as DELETED; changes to objects that never match are not sent.
#[test]
fn selector_watch_sees_objects_enter_and_leave() {
    let server = server();
    let result = run(
        &server,
        r#"
ns("py-sel")
def writer():
    time.sleep(1.0)
    core.create_namespaced_config_map("py-sel", cm("other", {"v": "0"}))
    core.create_namespaced_config_map("py-sel", cm("mover", {"v": "1"}))
    core.patch_namespaced_config_map("mover", "py-sel", {"metadata": {"labels": {"tier": "web"}}})
    core.patch_namespaced_config_map("other", "py-sel", {"data": {"v": "00"}})
    core.patch_namespaced_config_map("mover", "py-sel", {"data": {"v": "2"}})
    core.patch_namespaced_config_map("mover", "py-sel", {"metadata": {"labels": {"tier": "db"}}})
    core.patch_namespaced_config_map("mover", "py-sel", {"metadata": {"labels": {"tier": "web"}}})
    core.delete_namespaced_config_map("mover", "py-sel")
threading.Thread(target=writer).start()
events = []
w = watch.Watch()
for ev in w.stream(core.list_namespaced_config_map, "py-sel", label_selector="tier=web", timeout_seconds=20):
    events.append([ev["type"], ev["object"].metadata.name, (ev["object"].data or {}).get("v")])
    if len(events) == 5:
        w.stop()
print(json.dumps(events))
"#,
    );
    assert_eq!(
        result,
        serde_json::json!([
            ["ADDED", "mover", "1"],
            ["MODIFIED", "mover", "2"],
            ["DELETED", "mover", "2"],
            ["ADDED", "mover", "2"],
            ["DELETED", "mover", "2"]
        ]),
        "selector watch events"
    );
}

#[test]
fn not_found_is_an_api_exception_404() {
    let server = server();
    let result = run(
        &server,
        r#"
ns("py-404")
out = {}
try:
    core.read_namespaced_config_map("nope", "py-404")
    out["read"] = "no exception"
except ApiException as e:
    body = json.loads(e.body)
    out["read"] = [e.status, body["kind"], body["reason"], body["code"], body["details"]["name"], body["message"]]
try:
    core.delete_namespaced_config_map("nope", "py-404")
    out["delete"] = "no exception"
except ApiException as e:
    out["delete"] = e.status
try:
    core.create_namespaced_config_map("py-404", cm("dup", {}))
    core.create_namespaced_config_map("py-404", cm("dup", {}))
    out["dup"] = "no exception"
except ApiException as e:
    out["dup"] = [e.status, json.loads(e.body)["reason"]]
print(json.dumps(out))
"#,
    );
    assert_eq!(
        result["read"],
        serde_json::json!([
            404,
            "Status",
            "NotFound",
            404,
            "nope",
            "configmaps \"nope\" not found"
        ]),
        "read of a missing configmap: {result:#}"
    );
    assert_eq!(
        result["delete"], 404,
        "delete of a missing configmap: {result:#}"
    );
    assert_eq!(
        result["dup"],
        serde_json::json!([409, "AlreadyExists"]),
        "second create: {result:#}"
    );
}

#[test]
fn watch_resumes_from_a_resource_version() {
    let server = server();
    let result = run(
        &server,
        r#"
ns("py-resume")
core.create_namespaced_config_map("py-resume", cm("before", {"v": "1"}))
rv = core.list_namespaced_config_map("py-resume").metadata.resource_version
core.create_namespaced_config_map("py-resume", cm("after", {"v": "1"}))
core.patch_namespaced_config_map("before", "py-resume", {"data": {"v": "2"}})
core.delete_namespaced_config_map("after", "py-resume")
events = []
w = watch.Watch()
for ev in w.stream(core.list_namespaced_config_map, "py-resume", resource_version=rv, timeout_seconds=20):
    events.append([ev["type"], ev["object"].metadata.name])
    if ev["type"] == "DELETED":
        w.stop()
# A second watch from the version of the first event sees only what came after it.
first_rv = None
w = watch.Watch()
for ev in w.stream(core.list_namespaced_config_map, "py-resume", resource_version=rv, timeout_seconds=20):
    first_rv = ev["object"].metadata.resource_version
    w.stop()
later = []
w = watch.Watch()
for ev in w.stream(core.list_namespaced_config_map, "py-resume", resource_version=first_rv, timeout_seconds=20):
    later.append([ev["type"], ev["object"].metadata.name])
    if ev["type"] == "DELETED":
        w.stop()
print(json.dumps({"events": events, "later": later}))
"#,
    );
    assert_eq!(
        result["events"],
        serde_json::json!([
            ["ADDED", "after"],
            ["MODIFIED", "before"],
            ["DELETED", "after"]
        ]),
        "events after the listed resourceVersion: {result:#}"
    );
    assert_eq!(
        result["later"],
        serde_json::json!([["MODIFIED", "before"], ["DELETED", "after"]]),
        "events after the first event's resourceVersion: {result:#}"
    );
}
