//! Defaulting: the fields upstream's `pkg/apis/*/v1/defaults.go`, the
//! registry strategies and the default admission plugins (ServiceAccount,
//! Priority, DefaultTolerationSeconds) fill.

use super::*;

/// Apply upstream's defaults (`pkg/apis/*/v1/defaults.go`, the registry
/// strategies' `PrepareForCreate` and the default admission plugins) to
/// `obj`, a full object of kind `info`, in place. Defaults only fill what is
/// missing, so applying them again (on update) changes nothing. A Pod's
/// `status` gets phase `Pending` and its QoS class when they are missing; the
/// caller resets `status` on create as upstream's strategy does.
pub fn default_object(info: &ResourceInfo, obj: &mut Value) {
    drop_template_server_metadata(obj);
    let Some(root) = obj.as_object_mut() else {
        return;
    };
    match (info.group, info.kind) {
        ("", "Pod") => default_pod(root),
        ("", "Service") => default_service(root),
        ("", "Namespace") => default_namespace(root),
        ("", "Secret") => {
            set_default(root, "type", json!("Opaque"));
        }
        ("", "Endpoints") => {
            for subset in array_mut(root, "subsets") {
                if let Some(subset) = subset.as_object_mut() {
                    for port in array_mut(subset, "ports") {
                        if let Some(port) = port.as_object_mut() {
                            set_default(port, "protocol", json!("TCP"));
                        }
                    }
                }
            }
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            for port in array_mut(root, "ports") {
                if let Some(port) = port.as_object_mut() {
                    set_default(port, "name", json!(""));
                    set_default(port, "protocol", json!("TCP"));
                }
            }
        }
        ("", "Node") => {
            if let Some(status) = child_mut(root, "status")
                && status.get("allocatable").is_none_or(Value::is_null)
                && let Some(capacity) = status.get("capacity").cloned()
                && capacity.is_object()
            {
                status.insert("allocatable".into(), capacity);
            }
        }
        ("apps", "Deployment") => default_deployment(root),
        ("apps", "ReplicaSet") => default_replicaset(root),
        _ => {}
    }
}

/// Where an embedded object template's metadata sits, in every kind that
/// has one (workloads, PodTemplate, CronJob's job and pod templates).
pub(super) const TEMPLATE_METADATA: &[&str] = &[
    "/spec/template/metadata",
    "/template/metadata",
    "/spec/jobTemplate/metadata",
    "/spec/jobTemplate/spec/template/metadata",
];

/// Metadata the server owns, which has no meaning inside a template.
pub(super) const SERVER_OWNED_METADATA: &[&str] = &[
    "generation",
    "resourceVersion",
    "uid",
    "selfLink",
    "managedFields",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// Drops server-owned metadata from the templates of `obj`: upstream never
/// writes it there (a protobuf body carries `generation: 0` for an unset
/// template generation, which upstream's JSON leaves out), and nothing
/// created from a template inherits it.
pub(super) fn drop_template_server_metadata(obj: &mut Value) {
    for pointer in TEMPLATE_METADATA {
        if let Some(Value::Object(meta)) = obj.pointer_mut(pointer) {
            for field in SERVER_OWNED_METADATA {
                meta.shift_remove(*field);
            }
        }
    }
}

/// Insert `value` under `key` unless a non-null value is there.
pub(super) fn set_default(map: &mut Map<String, Value>, key: &str, value: Value) {
    if map.get(key).is_none_or(Value::is_null) {
        map.insert(key.to_string(), value);
    }
}

/// The object under `key`, created empty when missing or null; `None` when
/// something that is not an object is there (validation reports it).
pub(super) fn child_mut<'a>(
    map: &'a mut Map<String, Value>,
    key: &str,
) -> Option<&'a mut Map<String, Value>> {
    if map.get(key).is_none_or(Value::is_null) {
        map.insert(key.to_string(), Value::Object(Map::new()));
    }
    map.get_mut(key).and_then(Value::as_object_mut)
}

/// The items of the array under `key`, or nothing.
pub(super) fn array_mut<'a>(
    map: &'a mut Map<String, Value>,
    key: &str,
) -> std::slice::IterMut<'a, Value> {
    match map.get_mut(key).and_then(Value::as_array_mut) {
        Some(items) => items.iter_mut(),
        None => [].iter_mut(),
    }
}

pub(super) fn default_pod(root: &mut Map<String, Value>) {
    // The QoS class is computed once, when the status has none (a pod's
    // resources cannot change afterwards), not on every status write.
    let has_qos = root
        .get("status")
        .is_some_and(|s| s.get("qosClass").is_some_and(|q| !q.is_null()));
    let Some(spec) = child_mut(root, "spec") else {
        return;
    };
    default_pod_spec(spec);
    // SetDefaults_Pod: requests default to limits, per container.
    for key in ["containers", "initContainers"] {
        for container in array_mut(spec, key) {
            let Some(resources) = container
                .get_mut("resources")
                .and_then(Value::as_object_mut)
            else {
                continue;
            };
            let Some(limits) = resources.get("limits").and_then(Value::as_object).cloned() else {
                continue;
            };
            if let Some(requests) = child_mut(resources, "requests") {
                // An unparsable limit is reported once, on the limit.
                for (name, quantity) in limits {
                    if quantity
                        .as_str()
                        .is_some_and(|q| Quantity::parse(q).is_ok())
                    {
                        requests.entry(name).or_insert(quantity);
                    }
                }
            }
        }
    }
    set_default(spec, "enableServiceLinks", json!(true));
    // The ServiceAccount admission plugin; v1 mirrors the name into the
    // deprecated `serviceAccount`.
    let account = match spec.get("serviceAccountName").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => match spec.get("serviceAccount").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => "default".to_string(),
        },
    };
    spec.insert("serviceAccountName".into(), json!(account));
    spec.insert("serviceAccount".into(), json!(account));
    // The Priority admission plugin, with no PriorityClasses served.
    set_default(spec, "priority", json!(0));
    set_default(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
    // The DefaultTolerationSeconds admission plugin.
    if spec.get("tolerations").is_none_or(Value::is_null) {
        spec.insert("tolerations".into(), json!([]));
    }
    if let Some(tolerations) = spec.get_mut("tolerations").and_then(Value::as_array_mut) {
        for taint in [
            "node.kubernetes.io/not-ready",
            "node.kubernetes.io/unreachable",
        ] {
            let tolerated = tolerations.iter().any(|t| {
                let key = t.get("key").and_then(Value::as_str).unwrap_or("");
                let effect = t.get("effect").and_then(Value::as_str).unwrap_or("");
                let exists_all =
                    key.is_empty() && t.get("operator").and_then(Value::as_str) == Some("Exists");
                exists_all || (key == taint && (effect.is_empty() || effect == "NoExecute"))
            });
            if !tolerated {
                tolerations.push(json!({
                    "key": taint,
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                }));
            }
        }
    }
    let qos = (!has_qos).then(|| skiff_common::qos::pod_qos_class(spec));
    if let Some(status) = child_mut(root, "status") {
        set_default(status, "phase", json!("Pending"));
        if let Some(qos) = qos {
            set_default(status, "qosClass", json!(qos));
        }
    }
}

/// `SetDefaults_PodSpec` and everything below it.
pub(super) fn default_pod_spec(spec: &mut Map<String, Value>) {
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    let host_network = spec.get("hostNetwork").and_then(Value::as_bool) == Some(true);
    for key in ["containers", "initContainers"] {
        for container in array_mut(spec, key) {
            if let Some(container) = container.as_object_mut() {
                default_container(container, host_network);
            }
        }
    }
    for volume in array_mut(spec, "volumes") {
        let Some(volume) = volume.as_object_mut() else {
            continue;
        };
        if volume.keys().all(|k| k == "name") {
            volume.insert("emptyDir".into(), json!({}));
        }
        for source in ["configMap", "secret", "projected", "downwardAPI"] {
            if let Some(source) = volume.get_mut(source).and_then(Value::as_object_mut) {
                set_default(source, "defaultMode", json!(420));
            }
        }
        if let Some(host_path) = volume.get_mut("hostPath").and_then(Value::as_object_mut) {
            set_default(host_path, "type", json!(""));
        }
    }
}

/// `SetDefaults_Container`, its ports, probes and handlers.
pub(super) fn default_container(container: &mut Map<String, Value>, host_network: bool) {
    if container
        .get("imagePullPolicy")
        .is_none_or(|v| v.is_null() || v == "")
    {
        let image = container.get("image").and_then(Value::as_str).unwrap_or("");
        let policy = if image_tag(image).as_deref() == Some("latest") {
            "Always"
        } else {
            "IfNotPresent"
        };
        container.insert("imagePullPolicy".into(), json!(policy));
    }
    set_default(
        container,
        "terminationMessagePath",
        json!("/dev/termination-log"),
    );
    set_default(container, "terminationMessagePolicy", json!("File"));
    for port in array_mut(container, "ports") {
        if let Some(port) = port.as_object_mut() {
            set_default(port, "protocol", json!("TCP"));
            if host_network
                && port.get("hostPort").is_none_or(|v| v.is_null() || v == 0)
                && let Some(cp) = port.get("containerPort").cloned()
            {
                port.insert("hostPort".into(), cp);
            }
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(probe) = container.get_mut(probe).and_then(Value::as_object_mut) {
            set_default(probe, "timeoutSeconds", json!(1));
            set_default(probe, "periodSeconds", json!(10));
            set_default(probe, "successThreshold", json!(1));
            set_default(probe, "failureThreshold", json!(3));
            default_http_get(probe);
        }
    }
    if let Some(lifecycle) = container
        .get_mut("lifecycle")
        .and_then(Value::as_object_mut)
    {
        for hook in ["postStart", "preStop"] {
            if let Some(hook) = lifecycle.get_mut(hook).and_then(Value::as_object_mut) {
                default_http_get(hook);
            }
        }
    }
    for env in array_mut(container, "env") {
        if let Some(field_ref) = env
            .pointer_mut("/valueFrom/fieldRef")
            .and_then(Value::as_object_mut)
        {
            set_default(field_ref, "apiVersion", json!("v1"));
        }
    }
}

pub(super) fn default_http_get(handler: &mut Map<String, Value>) {
    if let Some(get) = handler.get_mut("httpGet").and_then(Value::as_object_mut) {
        if get.get("path").is_none_or(|v| v.is_null() || v == "") {
            get.insert("path".into(), json!("/"));
        }
        set_default(get, "scheme", json!("HTTP"));
    }
}

/// The tag of an image reference as upstream's `ParseImageName` sees it:
/// `latest` when there is neither a tag nor a digest.
pub(super) fn image_tag(image: &str) -> Option<String> {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.split_once(':') {
        Some((_, tag)) => Some(tag.to_string()),
        None if digest.is_none() => Some("latest".to_string()),
        None => None,
    }
}

pub(super) fn default_template(spec: &mut Map<String, Value>) {
    if let Some(template) = child_mut(spec, "template")
        && let Some(pod_spec) = child_mut(template, "spec")
    {
        default_pod_spec(pod_spec);
    }
}

pub(super) fn default_deployment(root: &mut Map<String, Value>) {
    if let Some(spec) = child_mut(root, "spec") {
        set_default(spec, "replicas", json!(1));
        if let Some(strategy) = child_mut(spec, "strategy") {
            set_default(strategy, "type", json!("RollingUpdate"));
            if strategy.get("type").and_then(Value::as_str) == Some("RollingUpdate")
                && let Some(rolling) = child_mut(strategy, "rollingUpdate")
            {
                set_default(rolling, "maxUnavailable", json!("25%"));
                set_default(rolling, "maxSurge", json!("25%"));
            }
        }
        set_default(spec, "revisionHistoryLimit", json!(10));
        set_default(spec, "progressDeadlineSeconds", json!(600));
        default_template(spec);
    }
    set_default(root, "status", json!({}));
}

pub(super) fn default_replicaset(root: &mut Map<String, Value>) {
    if let Some(spec) = child_mut(root, "spec") {
        set_default(spec, "replicas", json!(1));
        default_template(spec);
    }
    set_default(root, "status", json!({}));
}

pub(super) fn default_service(root: &mut Map<String, Value>) {
    if let Some(spec) = child_mut(root, "spec") {
        // An `omitempty` int32: 0 is unset (a protobuf body carries it).
        if spec.get("healthCheckNodePort").is_some_and(|h| h == 0) {
            spec.shift_remove("healthCheckNodePort");
        }
        set_default(spec, "type", json!("ClusterIP"));
        set_default(spec, "sessionAffinity", json!("None"));
        match spec.get("sessionAffinity").and_then(Value::as_str) {
            Some("None") => {
                spec.remove("sessionAffinityConfig");
            }
            Some("ClientIP") => {
                let config =
                    child_mut(spec, "sessionAffinityConfig").and_then(|c| child_mut(c, "clientIP"));
                if let Some(client_ip) = config {
                    set_default(client_ip, "timeoutSeconds", json!(10800));
                }
            }
            _ => {}
        }
        for port in array_mut(spec, "ports") {
            let Some(port) = port.as_object_mut() else {
                continue;
            };
            set_default(port, "protocol", json!("TCP"));
            let unset = port
                .get("targetPort")
                .is_none_or(|t| t.is_null() || t == 0 || t == "");
            if unset && let Some(number) = port.get("port").cloned() {
                port.insert("targetPort".into(), number);
            }
        }
        let kind = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let has_external_ips = spec
            .get("externalIPs")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        let externally_accessible = kind == "NodePort"
            || kind == "LoadBalancer"
            || (kind == "ClusterIP" && has_external_ips);
        if externally_accessible {
            set_default(spec, "externalTrafficPolicy", json!("Cluster"));
        }
        if matches!(kind.as_str(), "ClusterIP" | "NodePort" | "LoadBalancer") {
            set_default(spec, "internalTrafficPolicy", json!("Cluster"));
        }
        if kind == "LoadBalancer" {
            set_default(spec, "allocateLoadBalancerNodePorts", json!(true));
        }
    }
    if let Some(status) = child_mut(root, "status") {
        set_default(status, "loadBalancer", json!({}));
    }
}

pub(super) fn default_namespace(root: &mut Map<String, Value>) {
    let name = root
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    if let (Some(name), Some(meta)) = (name, child_mut(root, "metadata"))
        && !name.is_empty()
        && let Some(labels) = child_mut(meta, "labels")
    {
        labels.insert("kubernetes.io/metadata.name".into(), json!(name));
    }
    if let Some(spec) = child_mut(root, "spec") {
        set_default(spec, "finalizers", json!(["kubernetes"]));
    }
    if let Some(status) = child_mut(root, "status") {
        set_default(status, "phase", json!("Active"));
    }
}
