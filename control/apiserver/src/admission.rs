//! Admission: upstream's defaulting and validation of objects, and the
//! allocation of Service ClusterIPs and NodePorts.
//!
//! [`default_object`] fills the fields `k8s.io/kubernetes`'
//! `pkg/apis/*/v1/defaults.go`, the registry strategies and the default
//! admission plugins (ServiceAccount, Priority, DefaultTolerationSeconds)
//! fill, so that `kubectl get -o yaml` shows what a real cluster shows.
//!
//! [`validate`] checks the essentials of upstream's `validation.go` and
//! reports every problem as a [`Cause`] worded as upstream words it, e.g.
//! `spec.template.spec.containers[0].name: Invalid value: "Web": a lowercase
//! RFC 1123 label must consist of …`. Bad values print as upstream's
//! `field.Error` prints them: strings quoted, numbers bare, maps and lists as
//! JSON.
//!
//! [`ServiceAllocator`] hands out ClusterIPs and NodePorts. An allocated value
//! is an etcd side key (`/registry/ranges/serviceips/<ip>`,
//! `/registry/ranges/servicenodeports/<port>`) claimed in the same
//! transaction that writes the Service, so values never leak and are never
//! handed out twice, even across API server replicas.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use ipnetwork::IpNetwork;
use rand::Rng;
use serde_json::{Map, Value, json};
use skiff_common::quantity::{Quantity, QuantityError};
use skiff_common::validation::{
    is_dns1035_label, is_dns1123_label, is_dns1123_subdomain, is_label_value, is_qualified_name,
    lower_alnum, max_len_error, regex_error,
};

use crate::status::{ApiError, Cause};
use crate::storage::{StorageError, Store};
use skiff_common::registry::ResourceInfo;

/// The etcd prefix of claimed ClusterIPs.
pub const SERVICE_IP_PREFIX: &str = "/registry/ranges/serviceips/";
/// The etcd prefix of claimed NodePorts.
pub const NODE_PORT_PREFIX: &str = "/registry/ranges/servicenodeports/";

/// Upstream's limit on the total size of an object's annotations.
const TOTAL_ANNOTATION_SIZE_LIMIT: usize = 256 * 1024;
/// Upstream's limit on the total size of a Secret's or ConfigMap's data.
const MAX_SECRET_SIZE: usize = 1024 * 1024;

// ---------------------------------------------------------------------------
// Defaulting
// ---------------------------------------------------------------------------

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
const TEMPLATE_METADATA: &[&str] = &[
    "/spec/template/metadata",
    "/template/metadata",
    "/spec/jobTemplate/metadata",
    "/spec/jobTemplate/spec/template/metadata",
];

/// Metadata the server owns, which has no meaning inside a template.
const SERVER_OWNED_METADATA: &[&str] = &[
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
fn drop_template_server_metadata(obj: &mut Value) {
    for pointer in TEMPLATE_METADATA {
        if let Some(Value::Object(meta)) = obj.pointer_mut(pointer) {
            for field in SERVER_OWNED_METADATA {
                meta.shift_remove(*field);
            }
        }
    }
}

/// Insert `value` under `key` unless a non-null value is there.
fn set_default(map: &mut Map<String, Value>, key: &str, value: Value) {
    if map.get(key).is_none_or(Value::is_null) {
        map.insert(key.to_string(), value);
    }
}

/// The object under `key`, created empty when missing or null; `None` when
/// something that is not an object is there (validation reports it).
fn child_mut<'a>(map: &'a mut Map<String, Value>, key: &str) -> Option<&'a mut Map<String, Value>> {
    if map.get(key).is_none_or(Value::is_null) {
        map.insert(key.to_string(), Value::Object(Map::new()));
    }
    map.get_mut(key).and_then(Value::as_object_mut)
}

/// The items of the array under `key`, or nothing.
fn array_mut<'a>(map: &'a mut Map<String, Value>, key: &str) -> std::slice::IterMut<'a, Value> {
    match map.get_mut(key).and_then(Value::as_array_mut) {
        Some(items) => items.iter_mut(),
        None => [].iter_mut(),
    }
}

fn default_pod(root: &mut Map<String, Value>) {
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
    let qos = skiff_common::qos::pod_qos_class(spec);
    if let Some(status) = child_mut(root, "status") {
        set_default(status, "phase", json!("Pending"));
        set_default(status, "qosClass", json!(qos));
    }
}

/// `SetDefaults_PodSpec` and everything below it.
fn default_pod_spec(spec: &mut Map<String, Value>) {
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
fn default_container(container: &mut Map<String, Value>, host_network: bool) {
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

fn default_http_get(handler: &mut Map<String, Value>) {
    if let Some(get) = handler.get_mut("httpGet").and_then(Value::as_object_mut) {
        if get.get("path").is_none_or(|v| v.is_null() || v == "") {
            get.insert("path".into(), json!("/"));
        }
        set_default(get, "scheme", json!("HTTP"));
    }
}

/// The tag of an image reference as upstream's `ParseImageName` sees it:
/// `latest` when there is neither a tag nor a digest.
fn image_tag(image: &str) -> Option<String> {
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

fn default_template(spec: &mut Map<String, Value>) {
    if let Some(template) = child_mut(spec, "template")
        && let Some(pod_spec) = child_mut(template, "spec")
    {
        default_pod_spec(pod_spec);
    }
}

fn default_deployment(root: &mut Map<String, Value>) {
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

fn default_replicaset(root: &mut Map<String, Value>) {
    if let Some(spec) = child_mut(root, "spec") {
        set_default(spec, "replicas", json!(1));
        default_template(spec);
    }
    set_default(root, "status", json!({}));
}

fn default_service(root: &mut Map<String, Value>) {
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

fn default_namespace(root: &mut Map<String, Value>) {
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

// ---------------------------------------------------------------------------
// Field errors, worded as apimachinery's `field.Error`
// ---------------------------------------------------------------------------

/// A bad value as upstream prints it: strings quoted, numbers bare, maps and
/// lists as JSON, and `IntOrString` (a `fmt.Stringer`) bare.
fn show(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Object(map) => {
            // Go marshals maps with sorted keys.
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            serde_json::to_string(&sorted).unwrap_or_default()
        }
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

/// An `IntOrString` printed through its `String()`.
fn show_int_or_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => show(other),
    }
}

fn required(field: impl Into<String>, detail: &str) -> Cause {
    let message = if detail.is_empty() {
        "Required value".to_string()
    } else {
        format!("Required value: {detail}")
    };
    Cause::new("FieldValueRequired", field, message)
}

fn invalid(field: impl Into<String>, shown: &str, detail: &str) -> Cause {
    Cause::new(
        "FieldValueInvalid",
        field,
        format!("Invalid value: {shown}: {detail}"),
    )
}

fn invalid_str(field: impl Into<String>, value: &str, detail: &str) -> Cause {
    invalid(field, &show(&json!(value)), detail)
}

fn not_supported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Cause {
    let list = supported
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    Cause::new(
        "FieldValueNotSupported",
        field,
        format!(
            "Unsupported value: {}: supported values: {list}",
            show(value)
        ),
    )
}

fn duplicate(field: impl Into<String>, value: &Value) -> Cause {
    Cause::new(
        "FieldValueDuplicate",
        field,
        format!("Duplicate value: {}", show(value)),
    )
}

fn forbidden(field: impl Into<String>, detail: &str) -> Cause {
    Cause::new("FieldValueForbidden", field, format!("Forbidden: {detail}"))
}

fn too_long(field: impl Into<String>, max: usize) -> Cause {
    Cause::new(
        "FieldValueTooLong",
        field,
        format!("Too long: must have at most {max} bytes"),
    )
}

fn not_found(field: impl Into<String>, value: &Value) -> Cause {
    Cause::new(
        "FieldValueNotFound",
        field,
        format!("Not found: {}", show(value)),
    )
}

// ---------------------------------------------------------------------------
// Formats (apimachinery's util/validation), returning upstream's messages
// ---------------------------------------------------------------------------

const CONFIG_KEY_FMT: &str = "[-._a-zA-Z0-9]+";
const PERCENT_FMT: &str = "[0-9]+%";

fn is_config_map_key(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > 253 {
        errs.push(max_len_error(253));
    }
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !ok {
        errs.push(regex_error(
            "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
            CONFIG_KEY_FMT,
            &["key.name", "KEY_NAME", "key-name"],
        ));
    }
    if value == "." {
        errs.push("must not be '.'".to_string());
    } else if value == ".." {
        errs.push("must not be '..'".to_string());
    } else if value.starts_with("..") {
        errs.push("must not start with '..'".to_string());
    }
    errs
}

fn is_valid_port_name(port: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if port.len() > 15 {
        errs.push(max_len_error(15));
    }
    if port.is_empty() || !port.chars().all(|c| lower_alnum(c) || c == '-') {
        errs.push(
            "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".to_string(),
        );
    }
    if !port.chars().any(|c| c.is_ascii_lowercase()) {
        errs.push("must contain at least one letter (a-z)".to_string());
    }
    if port.contains("--") {
        errs.push("must not contain consecutive hyphens".to_string());
    }
    if port.starts_with('-') || port.ends_with('-') {
        errs.push("must not begin or end with a hyphen".to_string());
    }
    errs
}

const PORT_RANGE_ERROR: &str = "must be between 1 and 65535, inclusive";
const NEGATIVE_ERROR: &str = "must be greater than or equal to 0";

fn is_valid_port_num(port: i64) -> bool {
    (1..=65535).contains(&port)
}

// ---------------------------------------------------------------------------
// Quantities
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// Validate `obj`, a full object of kind `info`, as upstream's
/// `validation.go` does (the essentials), after defaulting; `old` is the
/// stored object on update. Returns every field error; empty means valid.
/// A missing `metadata.name` is accepted when `generateName` is set (the
/// caller generates the name).
pub fn validate(info: &ResourceInfo, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut errs = Vec::new();
    validate_object_meta(info, obj, &mut errs);
    match (info.group, info.kind) {
        ("", "Pod") => {
            if let Some(spec) = obj.get("spec") {
                validate_pod_spec(spec, "spec", &mut errs);
            } else {
                errs.push(required("spec.containers", ""));
            }
            if let (Some(old), Some(new)) = (old.and_then(|o| o.get("spec")), obj.get("spec")) {
                validate_pod_spec_update(new, old, &mut errs);
            }
        }
        ("", "Service") => validate_service(obj, &mut errs),
        ("", "ConfigMap") => validate_config_map(obj, old, &mut errs),
        ("", "Secret") => validate_secret(obj, old, &mut errs),
        ("", "Event") => validate_event(obj, &mut errs),
        ("", "Namespace") => {
            for (i, f) in array(obj.pointer("/spec/finalizers")).iter().enumerate() {
                validate_finalizer(f, &format!("spec.finalizers[{i}]"), true, &mut errs);
            }
        }
        ("coordination.k8s.io", "Lease") => {
            if let Some(d) = obj
                .pointer("/spec/leaseDurationSeconds")
                .and_then(Value::as_i64)
                && d <= 0
            {
                errs.push(invalid(
                    "spec.leaseDurationSeconds",
                    &d.to_string(),
                    "must be greater than 0",
                ));
            }
            if let Some(t) = obj
                .pointer("/spec/leaseTransitions")
                .and_then(Value::as_i64)
                && t < 0
            {
                errs.push(invalid(
                    "spec.leaseTransitions",
                    &t.to_string(),
                    NEGATIVE_ERROR,
                ));
            }
        }
        ("apps", "Deployment") => validate_workload(obj, old, true, &mut errs),
        ("apps", "ReplicaSet") => validate_workload(obj, old, false, &mut errs),
        _ => {}
    }
    errs
}

fn array(value: Option<&Value>) -> &[Value] {
    value
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn validate_object_meta(info: &ResourceInfo, obj: &Value, errs: &mut Vec<Cause>) {
    let name_fn: fn(&str) -> Vec<String> = match (info.group, info.kind) {
        ("", "Namespace") => is_dns1123_label,
        ("", "Service") => is_dns1035_label,
        _ => is_dns1123_subdomain,
    };
    let name = str_at(obj, "/metadata/name");
    let generate_name = str_at(obj, "/metadata/generateName");
    if !generate_name.is_empty() {
        // A prefix may end in '-': upstream masks the trailing dash.
        let masked = match generate_name.strip_suffix('-') {
            Some(head) => format!("{head}a"),
            None => generate_name.to_string(),
        };
        for msg in name_fn(&masked) {
            errs.push(invalid_str("metadata.generateName", generate_name, &msg));
        }
    }
    if name.is_empty() {
        if generate_name.is_empty() {
            errs.push(required(
                "metadata.name",
                "name or generateName is required",
            ));
        }
    } else {
        for msg in name_fn(name) {
            errs.push(invalid_str("metadata.name", name, &msg));
        }
    }
    let namespace = str_at(obj, "/metadata/namespace");
    if info.namespaced {
        if namespace.is_empty() {
            errs.push(required("metadata.namespace", ""));
        } else {
            for msg in is_dns1123_label(namespace) {
                errs.push(invalid_str("metadata.namespace", namespace, &msg));
            }
        }
    } else if !namespace.is_empty() {
        errs.push(forbidden("metadata.namespace", "not allowed on this type"));
    }
    if let Some(generation) = obj.pointer("/metadata/generation").and_then(Value::as_i64)
        && generation < 0
    {
        errs.push(invalid(
            "metadata.generation",
            &generation.to_string(),
            NEGATIVE_ERROR,
        ));
    }
    validate_labels(obj.pointer("/metadata/labels"), "metadata.labels", errs);
    validate_annotations(
        obj.pointer("/metadata/annotations"),
        "metadata.annotations",
        errs,
    );
    for f in array(obj.pointer("/metadata/finalizers")) {
        validate_finalizer(f, "metadata.finalizers", false, errs);
    }
}

fn validate_finalizer(value: &Value, field: &str, kube: bool, errs: &mut Vec<Cause>) {
    let name = value.as_str().unwrap_or("");
    for msg in is_qualified_name(name) {
        errs.push(invalid_str(field, name, &msg));
    }
    let standard = ["kubernetes", "orphan", "foregroundDeletion"];
    if kube && !name.contains('/') && !standard.contains(&name) {
        errs.push(invalid_str(
            field,
            name,
            "name is neither a standard finalizer name nor is it fully qualified",
        ));
    }
}

/// Label keys and values, in key order (upstream iterates a Go map).
fn validate_labels(labels: Option<&Value>, field: &str, errs: &mut Vec<Cause>) {
    let Some(labels) = labels.and_then(Value::as_object) else {
        return;
    };
    let sorted: BTreeMap<&String, &Value> = labels.iter().collect();
    for (key, value) in sorted {
        for msg in is_qualified_name(key) {
            errs.push(invalid_str(field, key, &msg));
        }
        let value = value.as_str().unwrap_or("");
        for msg in is_label_value(value) {
            errs.push(invalid_str(field, value, &msg));
        }
    }
}

fn validate_annotations(annotations: Option<&Value>, field: &str, errs: &mut Vec<Cause>) {
    let Some(annotations) = annotations.and_then(Value::as_object) else {
        return;
    };
    let sorted: BTreeMap<&String, &Value> = annotations.iter().collect();
    let mut total = 0;
    for (key, value) in sorted {
        for msg in is_qualified_name(&key.to_lowercase()) {
            errs.push(invalid_str(field, key, &msg));
        }
        total += key.len() + value.as_str().map_or(0, str::len);
    }
    if total > TOTAL_ANNOTATION_SIZE_LIMIT {
        errs.push(too_long(field, TOTAL_ANNOTATION_SIZE_LIMIT));
    }
}

/// Check `value` is one of `supported`: missing is `Required`, anything
/// else `NotSupported`.
fn validate_enum(value: Option<&Value>, field: &str, supported: &[&str], errs: &mut Vec<Cause>) {
    match value {
        None | Some(Value::Null) => errs.push(required(field, "")),
        Some(Value::String(s)) if s.is_empty() => errs.push(required(field, "")),
        Some(Value::String(s)) if supported.contains(&s.as_str()) => {}
        Some(other) => errs.push(not_supported(field, other, supported)),
    }
}

fn validate_pod_spec(spec: &Value, path: &str, errs: &mut Vec<Cause>) {
    // Volumes: names are unique DNS labels with exactly one source.
    let mut volumes = HashSet::new();
    for (i, volume) in array(spec.get("volumes")).iter().enumerate() {
        let vpath = format!("{path}.volumes[{i}]");
        let name = str_at(volume, "/name");
        if name.is_empty() {
            errs.push(required(format!("{vpath}.name"), ""));
        } else {
            for msg in is_dns1123_label(name) {
                errs.push(invalid_str(format!("{vpath}.name"), name, &msg));
            }
            if !volumes.insert(name.to_string()) {
                errs.push(duplicate(format!("{vpath}.name"), &json!(name)));
            }
        }
        let sources = volume
            .as_object()
            .map_or(0, |v| v.keys().filter(|k| k.as_str() != "name").count());
        if sources == 0 {
            errs.push(required(vpath, "must specify a volume type"));
        } else if sources > 1 {
            errs.push(forbidden(vpath, "may not specify more than 1 volume type"));
        }
    }

    let containers = array(spec.get("containers"));
    if containers.is_empty() {
        errs.push(required(format!("{path}.containers"), ""));
    }
    let mut names = HashSet::new();
    for key in ["initContainers", "containers"] {
        for (i, container) in array(spec.get(key)).iter().enumerate() {
            validate_container(
                container,
                &format!("{path}.{key}[{i}]"),
                &volumes,
                &mut names,
                errs,
            );
        }
    }

    validate_enum(
        spec.get("restartPolicy"),
        &format!("{path}.restartPolicy"),
        &["Always", "OnFailure", "Never"],
        errs,
    );
    validate_enum(
        spec.get("dnsPolicy"),
        &format!("{path}.dnsPolicy"),
        &["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"],
        errs,
    );
    validate_labels(
        spec.get("nodeSelector"),
        &format!("{path}.nodeSelector"),
        errs,
    );
    for key in ["serviceAccountName", "nodeName"] {
        let value = str_at(spec, &format!("/{key}"));
        if !value.is_empty() {
            for msg in is_dns1123_subdomain(value) {
                errs.push(invalid_str(format!("{path}.{key}"), value, &msg));
            }
        }
    }
    for key in ["hostname", "subdomain"] {
        let value = str_at(spec, &format!("/{key}"));
        if !value.is_empty() {
            for msg in is_dns1123_label(value) {
                errs.push(invalid_str(format!("{path}.{key}"), value, &msg));
            }
        }
    }
    if let Some(seconds) = spec.get("activeDeadlineSeconds").and_then(Value::as_i64)
        && seconds <= 0
    {
        errs.push(invalid(
            format!("{path}.activeDeadlineSeconds"),
            &seconds.to_string(),
            "must be between 1 and 2147483647, inclusive",
        ));
    }
}

fn validate_container(
    container: &Value,
    path: &str,
    volumes: &HashSet<String>,
    names: &mut HashSet<String>,
    errs: &mut Vec<Cause>,
) {
    let name = str_at(container, "/name");
    if name.is_empty() {
        errs.push(required(format!("{path}.name"), ""));
    } else {
        for msg in is_dns1123_label(name) {
            errs.push(invalid_str(format!("{path}.name"), name, &msg));
        }
        if !names.insert(name.to_string()) {
            errs.push(duplicate(format!("{path}.name"), &json!(name)));
        }
    }
    let image = str_at(container, "/image");
    if image.is_empty() {
        errs.push(required(format!("{path}.image"), ""));
    } else if image.trim() != image {
        errs.push(invalid_str(
            format!("{path}.image"),
            image,
            "must not have leading or trailing whitespace",
        ));
    }
    validate_enum(
        container.get("imagePullPolicy"),
        &format!("{path}.imagePullPolicy"),
        &["Always", "IfNotPresent", "Never"],
        errs,
    );
    validate_enum(
        container.get("terminationMessagePolicy"),
        &format!("{path}.terminationMessagePolicy"),
        &["File", "FallbackToLogsOnError"],
        errs,
    );

    let mut port_names = HashSet::new();
    for (i, port) in array(container.get("ports")).iter().enumerate() {
        let ppath = format!("{path}.ports[{i}]");
        let port_name = str_at(port, "/name");
        if !port_name.is_empty() {
            for msg in is_valid_port_name(port_name) {
                errs.push(invalid_str(format!("{ppath}.name"), port_name, &msg));
            }
            if !port_names.insert(port_name.to_string()) {
                errs.push(duplicate(format!("{ppath}.name"), &json!(port_name)));
            }
        }
        match port.get("containerPort").and_then(Value::as_i64) {
            None | Some(0) => errs.push(required(format!("{ppath}.containerPort"), "")),
            Some(p) if !is_valid_port_num(p) => {
                errs.push(invalid(
                    format!("{ppath}.containerPort"),
                    &p.to_string(),
                    PORT_RANGE_ERROR,
                ));
            }
            Some(_) => {}
        }
        if let Some(host) = port.get("hostPort").and_then(Value::as_i64)
            && host != 0
            && !is_valid_port_num(host)
        {
            errs.push(invalid(
                format!("{ppath}.hostPort"),
                &host.to_string(),
                PORT_RANGE_ERROR,
            ));
        }
        validate_enum(
            port.get("protocol"),
            &format!("{ppath}.protocol"),
            &["SCTP", "TCP", "UDP"],
            errs,
        );
    }

    for (i, env) in array(container.get("env")).iter().enumerate() {
        let field = format!("{path}.env[{i}].name");
        let env_name = str_at(env, "/name");
        if env_name.is_empty() {
            errs.push(required(field, ""));
        } else if env_name
            .chars()
            .any(|c| !c.is_ascii() || c.is_ascii_control() || c == '=')
        {
            errs.push(invalid_str(
                field,
                env_name,
                "a valid environment variable name must consist only of printable ASCII characters other than '='",
            ));
        }
    }

    for (i, mount) in array(container.get("volumeMounts")).iter().enumerate() {
        let mpath = format!("{path}.volumeMounts[{i}]");
        let mount_name = str_at(mount, "/name");
        if mount_name.is_empty() {
            errs.push(required(format!("{mpath}.name"), ""));
        } else if !volumes.contains(mount_name) {
            errs.push(not_found(format!("{mpath}.name"), &json!(mount_name)));
        }
        if str_at(mount, "/mountPath").is_empty() {
            errs.push(required(format!("{mpath}.mountPath"), ""));
        }
    }

    validate_resources(
        container.get("resources"),
        &format!("{path}.resources"),
        errs,
    );
}

fn is_standard_container_resource(name: &str) -> bool {
    matches!(name, "cpu" | "memory" | "ephemeral-storage") || name.starts_with("hugepages-")
}

fn validate_resources(resources: Option<&Value>, path: &str, errs: &mut Vec<Cause>) {
    let Some(resources) = resources else {
        return;
    };
    let mut parsed: [BTreeMap<String, Quantity>; 2] = [BTreeMap::new(), BTreeMap::new()];
    for (slot, key) in ["limits", "requests"].iter().enumerate() {
        let Some(list) = resources.get(*key).and_then(Value::as_object) else {
            continue;
        };
        for (name, value) in list {
            let field = format!("{path}.{key}[{name}]");
            for msg in is_qualified_name(name) {
                errs.push(invalid_str(&field, name, &msg));
            }
            if !name.contains('/') && !is_standard_container_resource(name) {
                errs.push(invalid_str(
                    &field,
                    name,
                    "must be a standard resource for containers",
                ));
            }
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => {
                    errs.push(invalid(
                        &field,
                        &show(other),
                        &QuantityError::Syntax.to_string(),
                    ));
                    continue;
                }
            };
            match Quantity::parse(&text) {
                Ok(q) if q.nanos < 0 => {
                    errs.push(invalid_str(&field, &q.canonical(), NEGATIVE_ERROR));
                }
                Ok(q) => {
                    parsed[slot].insert(name.clone(), q);
                }
                Err(error) => errs.push(invalid_str(&field, &text, &error.to_string())),
            }
        }
    }
    let [limits, requests] = parsed;
    for (name, request) in &requests {
        if let Some(limit) = limits.get(name)
            && request.nanos > limit.nanos
        {
            errs.push(invalid_str(
                format!("{path}.requests"),
                &request.canonical(),
                &format!(
                    "must be less than or equal to {name} limit of {}",
                    limit.canonical()
                ),
            ));
        }
    }
}

/// Pod spec updates: only images, `activeDeadlineSeconds`, added
/// tolerations and `terminationGracePeriodSeconds` may change. Setting
/// `nodeName` where it was empty is let through, since the binding
/// subresource writes it through the same path here.
fn validate_pod_spec_update(new: &Value, old: &Value, errs: &mut Vec<Cause>) {
    let mut masked_new = new.clone();
    let mut masked_old = old.clone();
    for spec in [&mut masked_new, &mut masked_old] {
        let Some(map) = spec.as_object_mut() else {
            return;
        };
        for key in [
            "activeDeadlineSeconds",
            "terminationGracePeriodSeconds",
            "tolerations",
        ] {
            map.remove(key);
        }
        if str_at(old, "/nodeName").is_empty() {
            map.remove("nodeName");
        }
        for key in ["containers", "initContainers"] {
            for container in array_mut(map, key) {
                if let Some(c) = container.as_object_mut() {
                    c.remove("image");
                }
            }
        }
    }
    // Tolerations may only be added to.
    let old_tolerations = array(old.get("tolerations"));
    let new_tolerations = array(new.get("tolerations"));
    let removed = old_tolerations.iter().any(|t| !new_tolerations.contains(t));
    if masked_new != masked_old || removed {
        errs.push(forbidden(
            "spec",
            "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
        ));
    }
}

fn validate_label_selector(selector: &Value, path: &str, errs: &mut Vec<Cause>) {
    validate_labels(
        selector.get("matchLabels"),
        &format!("{path}.matchLabels"),
        errs,
    );
    for (i, expr) in array(selector.get("matchExpressions")).iter().enumerate() {
        let epath = format!("{path}.matchExpressions[{i}]");
        let has_values = !array(expr.get("values")).is_empty();
        match str_at(expr, "/operator") {
            "In" | "NotIn" => {
                if !has_values {
                    errs.push(required(
                        format!("{epath}.values"),
                        "must be specified when `operator` is 'In' or 'NotIn'",
                    ));
                }
            }
            "Exists" | "DoesNotExist" => {
                if has_values {
                    errs.push(forbidden(
                        format!("{epath}.values"),
                        "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                    ));
                }
            }
            _ => errs.push(not_supported(
                format!("{epath}.operator"),
                expr.get("operator").unwrap_or(&Value::Null),
                &["In", "NotIn", "Exists", "DoesNotExist"],
            )),
        }
        let key = str_at(expr, "/key");
        for msg in is_qualified_name(key) {
            errs.push(invalid_str(format!("{epath}.key"), key, &msg));
        }
        for value in array(expr.get("values")) {
            let value = value.as_str().unwrap_or("");
            for msg in is_label_value(value) {
                errs.push(invalid_str(format!("{epath}.values"), value, &msg));
            }
        }
    }
}

fn validate_nonnegative(obj: &Value, pointer: &str, field: &str, errs: &mut Vec<Cause>) {
    if let Some(n) = obj.pointer(pointer).and_then(Value::as_i64)
        && n < 0
    {
        errs.push(invalid(field, &n.to_string(), NEGATIVE_ERROR));
    }
}

/// Deployments (`deployment`) and ReplicaSets, as apps/v1 validates them.
fn validate_workload(obj: &Value, old: Option<&Value>, deployment: bool, errs: &mut Vec<Cause>) {
    let empty = json!({});
    let spec = obj.get("spec").unwrap_or(&empty);
    validate_nonnegative(spec, "/replicas", "spec.replicas", errs);
    validate_nonnegative(spec, "/minReadySeconds", "spec.minReadySeconds", errs);
    let kind = if deployment {
        "deployment"
    } else {
        "replicaset"
    };
    let selector = spec.get("selector").filter(|s| !s.is_null());
    match selector {
        None => errs.push(required("spec.selector", "")),
        Some(selector) => {
            validate_label_selector(selector, "spec.selector", errs);
            let count = selector
                .get("matchLabels")
                .and_then(Value::as_object)
                .map_or(0, Map::len)
                + array(selector.get("matchExpressions")).len();
            if count == 0 {
                errs.push(invalid(
                    "spec.selector",
                    &show(selector),
                    &format!("empty selector is invalid for {kind}"),
                ));
            }
        }
    }
    match spec.get("template").filter(|t| !t.is_null()) {
        None => errs.push(required("spec.template", "")),
        Some(template) => {
            let labels = template.pointer("/metadata/labels");
            if let Some(selector) = selector {
                let count = selector
                    .get("matchLabels")
                    .and_then(Value::as_object)
                    .map_or(0, Map::len)
                    + array(selector.get("matchExpressions")).len();
                let empty_labels = Map::new();
                let label_map = labels.and_then(Value::as_object).unwrap_or(&empty_labels);
                if count > 0 && !skiff_common::labels::json_selector_matches(selector, label_map) {
                    errs.push(invalid(
                        "spec.template.metadata.labels",
                        &show(labels.unwrap_or(&Value::Null)),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
            validate_labels(labels, "spec.template.metadata.labels", errs);
            validate_annotations(
                template.pointer("/metadata/annotations"),
                "spec.template.metadata.annotations",
                errs,
            );
            let pod_spec = template.get("spec").unwrap_or(&empty);
            validate_pod_spec(pod_spec, "spec.template.spec", errs);
            if let Some(policy) = pod_spec
                .get("restartPolicy")
                .filter(|p| p.as_str().is_some_and(|p| p != "Always" && !p.is_empty()))
            {
                errs.push(not_supported(
                    "spec.template.spec.restartPolicy",
                    policy,
                    &["Always"],
                ));
            }
            if pod_spec
                .get("activeDeadlineSeconds")
                .is_some_and(|v| !v.is_null())
            {
                errs.push(forbidden(
                    "spec.template.spec.activeDeadlineSeconds",
                    "activeDeadlineSeconds in ReplicaSet is not Supported",
                ));
            }
        }
    }
    if deployment {
        validate_deployment_strategy(spec, errs);
        validate_nonnegative(
            spec,
            "/revisionHistoryLimit",
            "spec.revisionHistoryLimit",
            errs,
        );
        if let Some(deadline) = spec.get("progressDeadlineSeconds").and_then(Value::as_i64) {
            if deadline < 0 {
                errs.push(invalid(
                    "spec.progressDeadlineSeconds",
                    &deadline.to_string(),
                    NEGATIVE_ERROR,
                ));
            }
            let min_ready = spec
                .get("minReadySeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if deadline <= min_ready {
                errs.push(invalid(
                    "spec.progressDeadlineSeconds",
                    &deadline.to_string(),
                    "must be greater than minReadySeconds",
                ));
            }
        }
    }
    if let Some(old) = old
        && let (Some(new_sel), Some(old_sel)) =
            (obj.pointer("/spec/selector"), old.pointer("/spec/selector"))
        && new_sel != old_sel
    {
        errs.push(invalid(
            "spec.selector",
            &show(new_sel),
            "field is immutable",
        ));
    }
}

/// An `IntOrString` as `getIntOrPercentValue` reads it: `(value, percent)`.
fn int_or_percent(value: &Value) -> Option<(i64, bool)> {
    match value {
        Value::Number(n) => n.as_i64().map(|n| (n, false)),
        Value::String(s) => s
            .strip_suffix('%')
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
            .map(|n| (n, true)),
        _ => None,
    }
}

fn validate_deployment_strategy(spec: &Value, errs: &mut Vec<Cause>) {
    let Some(strategy) = spec.get("strategy") else {
        return;
    };
    let kind = strategy.get("type");
    validate_enum(
        kind,
        "spec.strategy.type",
        &["Recreate", "RollingUpdate"],
        errs,
    );
    let rolling = strategy.get("rollingUpdate").filter(|r| !r.is_null());
    match kind.and_then(Value::as_str) {
        Some("Recreate") if rolling.is_some() => errs.push(forbidden(
            "spec.strategy.rollingUpdate",
            "may not be specified when strategy `type` is 'Recreate'",
        )),
        Some("RollingUpdate") => match rolling {
            None => errs.push(required(
                "spec.strategy.rollingUpdate",
                "this should be defaulted and never be nil",
            )),
            Some(rolling) => {
                let mut values = [0i64; 2];
                for (slot, key) in ["maxUnavailable", "maxSurge"].iter().enumerate() {
                    let field = format!("spec.strategy.rollingUpdate.{key}");
                    let Some(value) = rolling.get(*key).filter(|v| !v.is_null()) else {
                        continue;
                    };
                    match (value, int_or_percent(value)) {
                        (Value::String(s), None) => errs.push(invalid(
                            &field,
                            s,
                            &regex_error(
                                "a valid percent string must be a numeric string followed by an ending '%'",
                                PERCENT_FMT,
                                &["1%", "93%"],
                            ),
                        )),
                        (_, Some((n, _))) if n < 0 => errs.push(invalid(&field, &n.to_string(), NEGATIVE_ERROR)),
                        (_, Some((n, percent))) => {
                            values[slot] = n;
                            if slot == 0 && percent && n > 100 {
                                errs.push(invalid(&field, &show_int_or_string(value), "must not be greater than 100%"));
                            }
                        }
                        (other, None) => errs.push(invalid(&field, &show(other), "must be an integer or percentage (e.g '5%')")),
                    }
                }
                if values == [0, 0] {
                    let shown =
                        show_int_or_string(rolling.get("maxUnavailable").unwrap_or(&json!(0)));
                    errs.push(invalid(
                        "spec.strategy.rollingUpdate.maxUnavailable",
                        &shown,
                        "may not be 0 when `maxSurge` is 0",
                    ));
                }
            }
        },
        _ => {}
    }
}

fn validate_service(obj: &Value, errs: &mut Vec<Cause>) {
    let empty = json!({});
    let spec = obj.get("spec").unwrap_or(&empty);
    let kind = str_at(spec, "/type");
    let headless = str_at(spec, "/clusterIP") == "None";
    validate_enum(
        spec.get("type"),
        "spec.type",
        &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
        errs,
    );
    validate_enum(
        spec.get("sessionAffinity"),
        "spec.sessionAffinity",
        &["ClientIP", "None"],
        errs,
    );
    let ports = array(spec.get("ports"));
    if ports.is_empty() && !headless && kind != "ExternalName" {
        errs.push(required("spec.ports", ""));
    }
    let require_name = ports.len() > 1;
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    let mut node_ports = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let ppath = format!("spec.ports[{i}]");
        let name = str_at(port, "/name");
        if name.is_empty() {
            if require_name {
                errs.push(required(format!("{ppath}.name"), ""));
            }
        } else {
            for msg in is_dns1123_label(name) {
                errs.push(invalid_str(format!("{ppath}.name"), name, &msg));
            }
            if !names.insert(name.to_string()) {
                errs.push(duplicate(format!("{ppath}.name"), &json!(name)));
            }
        }
        let number = port.get("port").and_then(Value::as_i64).unwrap_or(0);
        if !is_valid_port_num(number) {
            errs.push(invalid(
                format!("{ppath}.port"),
                &number.to_string(),
                PORT_RANGE_ERROR,
            ));
        }
        validate_enum(
            port.get("protocol"),
            &format!("{ppath}.protocol"),
            &["SCTP", "TCP", "UDP"],
            errs,
        );
        match port.get("targetPort") {
            Some(Value::Number(n)) => {
                let n = n.as_i64().unwrap_or(0);
                if !is_valid_port_num(n) {
                    errs.push(invalid(
                        format!("{ppath}.targetPort"),
                        &n.to_string(),
                        PORT_RANGE_ERROR,
                    ));
                }
            }
            Some(Value::String(s)) => {
                for msg in is_valid_port_name(s) {
                    errs.push(invalid_str(format!("{ppath}.targetPort"), s, &msg));
                }
            }
            _ => {}
        }
        let protocol = str_at(port, "/protocol").to_string();
        if !keys.insert((number, protocol.clone())) {
            errs.push(duplicate(
                ppath.clone(),
                &json!({"port": number, "protocol": protocol}),
            ));
        }
        let node_port = port.get("nodePort").and_then(Value::as_i64).unwrap_or(0);
        if node_port != 0 {
            if kind == "ClusterIP" {
                errs.push(forbidden(
                    format!("{ppath}.nodePort"),
                    "may not be used when `type` is 'ClusterIP'",
                ));
            }
            if !node_ports.insert((node_port, protocol)) {
                errs.push(duplicate(format!("{ppath}.nodePort"), &json!(node_port)));
            }
        }
    }
    validate_labels(spec.get("selector"), "spec.selector", errs);
    for (i, ip) in array(spec.get("clusterIPs")).iter().enumerate() {
        let ip = ip.as_str().unwrap_or("");
        if ip != "None" && ip.parse::<IpAddr>().is_err() {
            errs.push(invalid_str(
                format!("spec.clusterIPs[{i}]"),
                ip,
                "must be a valid IP address (e.g. 10.9.8.7 or 2001:db8::ffff)",
            ));
        }
    }
    if let Some(policy) = spec.get("ipFamilyPolicy").filter(|p| !p.is_null()) {
        validate_enum(
            Some(policy),
            "spec.ipFamilyPolicy",
            &["PreferDualStack", "RequireDualStack", "SingleStack"],
            errs,
        );
    }
    for (i, family) in array(spec.get("ipFamilies")).iter().enumerate() {
        validate_enum(
            Some(family),
            &format!("spec.ipFamilies[{i}]"),
            &["IPv4", "IPv6"],
            errs,
        );
    }
    if kind == "ExternalName" {
        let ips = array(spec.get("clusterIPs"));
        if !ips.is_empty() || !str_at(spec, "/clusterIP").is_empty() {
            errs.push(forbidden(
                "spec.clusterIPs",
                "may not be set for ExternalName services",
            ));
        }
        if !array(spec.get("ipFamilies")).is_empty() {
            errs.push(forbidden(
                "spec.ipFamilies",
                "may not be set for ExternalName services",
            ));
        }
        if spec.get("ipFamilyPolicy").is_some_and(|p| !p.is_null()) {
            errs.push(forbidden(
                "spec.ipFamilyPolicy",
                "may not be set for ExternalName services",
            ));
        }
        let external = str_at(spec, "/externalName");
        let cname = external.strip_suffix('.').unwrap_or(external);
        if cname.is_empty() {
            errs.push(required("spec.externalName", ""));
        } else {
            for msg in is_dns1123_subdomain(cname) {
                errs.push(invalid_str("spec.externalName", cname, &msg));
            }
        }
    }
}

fn validate_data_keys(obj: &Value, key: &str, errs: &mut Vec<Cause>) -> usize {
    let mut total = 0;
    if let Some(data) = obj.get(key).and_then(Value::as_object) {
        let sorted: BTreeMap<&String, &Value> = data.iter().collect();
        for (k, v) in sorted {
            for msg in is_config_map_key(k) {
                errs.push(invalid_str(format!("{key}[{k}]"), k, &msg));
            }
            total += v.as_str().map_or(0, str::len);
        }
    }
    total
}

fn validate_immutable_data(obj: &Value, old: Option<&Value>, keys: &[&str], errs: &mut Vec<Cause>) {
    let Some(old) = old else {
        return;
    };
    if old.get("immutable").and_then(Value::as_bool) != Some(true) {
        return;
    }
    if obj.get("immutable").and_then(Value::as_bool) != Some(true) {
        errs.push(forbidden(
            "immutable",
            "field is immutable when `immutable` is set",
        ));
    }
    for key in keys {
        if obj.get(*key) != old.get(*key) {
            errs.push(forbidden(
                *key,
                "field is immutable when `immutable` is set",
            ));
        }
    }
}

fn validate_config_map(obj: &Value, old: Option<&Value>, errs: &mut Vec<Cause>) {
    let size = validate_data_keys(obj, "data", errs) + validate_data_keys(obj, "binaryData", errs);
    if let (Some(data), Some(binary)) = (
        obj.get("data").and_then(Value::as_object),
        obj.get("binaryData").and_then(Value::as_object),
    ) {
        for key in data.keys().filter(|k| binary.contains_key(*k)) {
            errs.push(invalid_str(
                format!("data[{key}]"),
                key,
                "duplicate of key present in binaryData",
            ));
        }
    }
    if size > MAX_SECRET_SIZE {
        errs.push(too_long("", MAX_SECRET_SIZE));
    }
    validate_immutable_data(obj, old, &["data", "binaryData"], errs);
}

fn validate_secret(obj: &Value, old: Option<&Value>, errs: &mut Vec<Cause>) {
    let mut size = validate_data_keys(obj, "data", errs);
    // stringData is merged into data when the object is decoded; its keys
    // follow the same rule.
    size += validate_data_keys(obj, "stringData", errs);
    if size > MAX_SECRET_SIZE {
        errs.push(too_long("data", MAX_SECRET_SIZE));
    }
    let has = |key: &str| {
        obj.pointer(&format!(
            "/data/{}",
            key.replace('~', "~0").replace('/', "~1")
        ))
        .is_some()
            || obj.pointer(&format!("/stringData/{key}")).is_some()
    };
    let kind = str_at(obj, "/type");
    let required_keys: &[&str] = match kind {
        "kubernetes.io/dockercfg" => &[".dockercfg"],
        "kubernetes.io/dockerconfigjson" => &[".dockerconfigjson"],
        "kubernetes.io/ssh-auth" => &["ssh-privatekey"],
        "kubernetes.io/tls" => &["tls.crt", "tls.key"],
        _ => &[],
    };
    for key in required_keys {
        if !has(key) {
            errs.push(required(format!("data[{key}]"), ""));
        }
    }
    if kind == "kubernetes.io/service-account-token"
        && str_at(
            obj,
            "/metadata/annotations/kubernetes.io~1service-account.name",
        )
        .is_empty()
    {
        errs.push(required(
            "metadata.annotations[kubernetes.io/service-account.name]",
            "",
        ));
    }
    if let Some(old) = old {
        let old_kind = str_at(old, "/type");
        if old_kind != kind {
            errs.push(invalid_str("type", kind, "field is immutable"));
        }
    }
    validate_immutable_data(obj, old, &["data"], errs);
}

fn validate_event(obj: &Value, errs: &mut Vec<Cause>) {
    let namespace = str_at(obj, "/metadata/namespace");
    let involved = str_at(obj, "/involvedObject/namespace");
    let ok = if involved.is_empty() {
        namespace.is_empty() || namespace == "default" || namespace == "kube-system"
    } else {
        involved == namespace
    };
    if !ok {
        errs.push(invalid_str(
            "involvedObject.namespace",
            involved,
            "does not match event.namespace",
        ));
    }
    let kind = str_at(obj, "/type");
    if !kind.is_empty() && kind != "Normal" && kind != "Warning" {
        errs.push(invalid_str(
            "type",
            kind,
            &format!("has invalid value: {kind}"),
        ));
    }
}

// ---------------------------------------------------------------------------
// Service ClusterIP and NodePort allocation
// ---------------------------------------------------------------------------

/// The side keys a Service write claims and releases, written in the same
/// etcd transaction as the Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Keys to create; the write fails with [`StorageError::ClaimTaken`]
    /// when another writer holds one.
    pub claims: Vec<String>,
    /// Keys to delete.
    pub releases: Vec<String>,
}

/// Allocates ClusterIPs from the service CIDR and NodePorts from the node
/// port range, as upstream's `ipallocator` and `portallocator` do: values
/// are picked at random, first from the upper part of each range, keeping
/// the lower part for values asked for explicitly (upstream's static
/// subranges).
///
/// Allocation reads the claimed keys and picks a free value; the claim
/// itself happens in the Service's etcd write, guarded by
/// `create_revision == 0`. When two writers pick the same value the second
/// write fails with [`StorageError::ClaimTaken`]: the caller then calls
/// [`ServiceAllocator::allocate`] again on a fresh copy of the Service and
/// retries the write.
#[derive(Debug, Clone)]
pub struct ServiceAllocator {
    range: IpNetwork,
    node_ports: RangeInclusive<u16>,
}

/// Whether a Service of this type gets NodePorts.
fn needs_node_ports(spec: &Value) -> bool {
    match str_at(spec, "/type") {
        "NodePort" => true,
        "LoadBalancer" => {
            spec.get("allocateLoadBalancerNodePorts")
                .and_then(Value::as_bool)
                != Some(false)
        }
        _ => false,
    }
}

fn service_type(spec: &Value) -> &str {
    match str_at(spec, "/type") {
        "" => "ClusterIP",
        other => other,
    }
}

/// `clusterIPs`, or `[clusterIP]` when only that is set.
fn cluster_ips(spec: &Value) -> Vec<String> {
    let ips: Vec<String> = array(spec.get("clusterIPs"))
        .iter()
        .filter_map(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if !ips.is_empty() {
        return ips;
    }
    match str_at(spec, "/clusterIP") {
        "" => Vec::new(),
        ip => vec![ip.to_string()],
    }
}

/// The NodePorts a Service holds, including its health check port.
fn held_node_ports(spec: &Value) -> Vec<u16> {
    let mut ports: Vec<u16> = array(spec.get("ports"))
        .iter()
        .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
        .filter_map(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .collect();
    if let Some(hc) = spec
        .get("healthCheckNodePort")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
    {
        ports.push(hc);
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Where claimed side keys are looked up: etcd, or a set in tests.
trait Claims {
    /// The claimed keys under `prefix`.
    async fn claimed(&self, prefix: &str) -> Result<Vec<String>, ApiError>;
}

impl Claims for Store {
    async fn claimed(&self, prefix: &str) -> Result<Vec<String>, ApiError> {
        self.keys(prefix).await.map_err(storage_error)
    }
}

/// Whether the side key `key` is held. Side keys hold the owner's key, not
/// JSON, so they are read as keys only.
async fn is_claimed(store: &impl Claims, key: &str) -> Result<bool, ApiError> {
    let keys = store.claimed(key).await?;
    Ok(keys.iter().any(|k| k == key))
}

fn port_range_full() -> ApiError {
    ApiError::internal("failed to allocate a nodePort: range is full")
}

fn storage_error(err: StorageError) -> ApiError {
    match err {
        StorageError::Unavailable { .. } => ApiError::unavailable(err.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}

impl ServiceAllocator {
    /// An allocator for ClusterIPs in `cluster_ip_range` (normalised to its
    /// network address) and NodePorts in `node_ports`.
    pub fn new(cluster_ip_range: IpNetwork, node_ports: RangeInclusive<u16>) -> ServiceAllocator {
        let range = IpNetwork::new(cluster_ip_range.network(), cluster_ip_range.prefix())
            .unwrap_or(cluster_ip_range);
        ServiceAllocator { range, node_ports }
    }

    /// The side key of a claimed ClusterIP.
    pub fn ip_key(ip: &IpAddr) -> String {
        format!("{SERVICE_IP_PREFIX}{ip}")
    }

    /// The side key of a claimed NodePort.
    pub fn port_key(port: u16) -> String {
        format!("{NODE_PORT_PREFIX}{port}")
    }

    /// The address family of the range, as `spec.ipFamilies` names it.
    fn family(&self) -> &'static str {
        match self.range {
            IpNetwork::V4(_) => "IPv4",
            IpNetwork::V6(_) => "IPv6",
        }
    }

    /// The offsets (from the network address) that may be handed out: the
    /// network address and, for IPv4, the broadcast address are not.
    fn ip_offsets(&self) -> (u128, u128) {
        match self.range {
            IpNetwork::V4(n) => {
                let size = 1u128 << (32 - u32::from(n.prefix()));
                if size <= 2 {
                    (0, size - 1)
                } else {
                    (1, size - 2)
                }
            }
            IpNetwork::V6(n) => {
                // Large IPv6 ranges are capped as upstream caps them.
                let host_bits = 128 - u32::from(n.prefix());
                let last = if host_bits > 16 {
                    1u128 << 16
                } else {
                    (1u128 << host_bits) - 1
                };
                (1.min(last), last)
            }
        }
    }

    fn ip_at(&self, offset: u128) -> IpAddr {
        match self.range {
            IpNetwork::V4(n) => IpAddr::V4(Ipv4Addr::from(
                u32::from(n.network()).wrapping_add(offset as u32),
            )),
            IpNetwork::V6(n) => {
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()).wrapping_add(offset)))
            }
        }
    }

    fn offset_of(&self, ip: &IpAddr) -> Option<u128> {
        match (self.range, ip) {
            (IpNetwork::V4(n), IpAddr::V4(ip)) if n.contains(*ip) => {
                Some(u128::from(u32::from(*ip) - u32::from(n.network())))
            }
            (IpNetwork::V6(n), IpAddr::V6(ip)) if n.contains(*ip) => {
                Some(u128::from(*ip) - u128::from(n.network()))
            }
            _ => None,
        }
    }

    /// Whether `ip` may be allocated at all (in the range, and neither the
    /// network nor the broadcast address).
    pub fn ip_in_range(&self, ip: &IpAddr) -> bool {
        let (first, last) = self.ip_offsets();
        self.offset_of(ip).is_some_and(|o| o >= first && o <= last)
    }

    /// Whether `port` is in the NodePort range.
    pub fn port_in_range(&self, port: i64) -> bool {
        u16::try_from(port).is_ok_and(|p| self.node_ports.contains(&p))
    }

    /// Pick a random free value in `first..=last`, trying the upper band
    /// (above `first + reserved`) first, then the whole range.
    fn pick(first: u128, last: u128, reserved: u128, taken: impl Fn(u128) -> bool) -> Option<u128> {
        if last < first {
            return None;
        }
        let mut rng = rand::rng();
        let split = (first + reserved).min(last);
        let bands = if split < last {
            vec![(split + 1, last), (first, last)]
        } else {
            vec![(first, last)]
        };
        for (lo, hi) in bands {
            let span = hi - lo + 1;
            let start = rng.random_range(0..span);
            // Probe from a random start; bounded so huge ranges stay cheap.
            let tries = span.min(1 << 20);
            for step in 0..tries {
                let candidate = lo + (start + step) % span;
                if !taken(candidate) {
                    return Some(candidate);
                }
            }
        }
        None
    }

    fn range_error(&self, ip: &str) -> String {
        format!(
            "failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {}",
            self.range
        )
    }

    fn ports_text(&self) -> String {
        format!("{}-{}", self.node_ports.start(), self.node_ports.end())
    }

    /// On create (`old` is `None`) or update of a Service: fill
    /// `spec.clusterIP`/`clusterIPs` (unless headless or ExternalName),
    /// `spec.ipFamilies`/`ipFamilyPolicy`, and `nodePort`s (and a
    /// `healthCheckNodePort` for a LoadBalancer with
    /// `externalTrafficPolicy: Local`) for NodePort and LoadBalancer
    /// Services; check explicit values are in range and free. On update the
    /// ClusterIP is immutable except when changing to or from ExternalName,
    /// NodePorts are kept, a type change away from NodePort/LoadBalancer
    /// clears and releases the NodePorts, and a change to ExternalName
    /// releases the ClusterIP.
    ///
    /// Returns the side keys to claim and release in the Service's etcd
    /// write. If that write fails with [`StorageError::ClaimTaken`], another
    /// writer won a race for a value: allocate again and retry.
    pub async fn allocate(
        &self,
        store: &Store,
        svc: &mut Value,
        old: Option<&Value>,
    ) -> Result<Allocation, ApiError> {
        self.allocate_in(store, svc, old).await
    }

    async fn allocate_in(
        &self,
        store: &impl Claims,
        svc: &mut Value,
        old: Option<&Value>,
    ) -> Result<Allocation, ApiError> {
        let name = str_at(svc, "/metadata/name").to_string();
        let invalid_err = |causes: Vec<Cause>| ApiError::invalid("", "Service", &name, causes);
        let mut allocation = Allocation::default();
        let empty = json!({});
        let old_spec = old.and_then(|o| o.get("spec")).unwrap_or(&empty).clone();
        if !svc.get("spec").is_some_and(Value::is_object) {
            svc["spec"] = json!({});
        }
        let spec = svc["spec"]
            .as_object_mut()
            .expect("spec was just made an object");
        let spec_value = Value::Object(spec.clone());
        let kind = service_type(&spec_value).to_string();
        let old_kind = old.map(|_| service_type(&old_spec).to_string());
        let old_ips: Vec<String> = if old.is_some() {
            cluster_ips(&old_spec)
        } else {
            Vec::new()
        };

        // --- ClusterIPs ---
        if kind == "ExternalName" {
            for ip in old_ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                allocation.releases.push(Self::ip_key(&ip));
            }
            // Upstream drops the IP fields when they were only carried over.
            if old.is_some() {
                if cluster_ips(&spec_value) == old_ips {
                    spec.remove("clusterIP");
                    spec.remove("clusterIPs");
                }
                if spec.get("ipFamilies") == old_spec.get("ipFamilies") {
                    spec.remove("ipFamilies");
                }
                if spec.get("ipFamilyPolicy") == old_spec.get("ipFamilyPolicy") {
                    spec.remove("ipFamilyPolicy");
                }
            }
        } else {
            let mut wanted = cluster_ips(&spec_value);
            let carried =
                old.is_some() && old_kind.as_deref() != Some("ExternalName") && !old_ips.is_empty();
            if carried {
                if wanted.is_empty() {
                    wanted = old_ips.clone();
                } else if wanted.first() != old_ips.first() {
                    return Err(invalid_err(vec![invalid(
                        "spec.clusterIPs[0]",
                        &show(&json!(wanted)),
                        "may not change once set",
                    )]));
                }
            }
            let family = self.family();
            for (i, requested) in array(spec.get("ipFamilies")).iter().enumerate() {
                if requested.as_str().is_some_and(|f| f != family) {
                    return Err(invalid_err(vec![invalid(
                        format!("spec.ipFamilies[{i}]"),
                        &show(requested),
                        "not configured on this cluster",
                    )]));
                }
            }
            let primary = wanted.first().cloned();
            let ip = match primary.as_deref() {
                Some("None") => "None".to_string(),
                Some(ip) if carried => ip.to_string(),
                Some(text) => {
                    let parsed: IpAddr = text.parse().map_err(|_| {
                        invalid_err(vec![invalid_str(
                            "spec.clusterIPs[0]",
                            text,
                            "must be a valid IP address (e.g. 10.9.8.7 or 2001:db8::ffff)",
                        )])
                    })?;
                    if !self.ip_in_range(&parsed) {
                        return Err(invalid_err(vec![invalid(
                            "spec.clusterIPs",
                            &show(&json!(wanted)),
                            &self.range_error(text),
                        )]));
                    }
                    let taken = is_claimed(store, &Self::ip_key(&parsed)).await?;
                    if taken {
                        return Err(invalid_err(vec![invalid(
                            "spec.clusterIPs",
                            &show(&json!(wanted)),
                            &format!(
                                "failed to allocate IP {text}: provided IP is already allocated"
                            ),
                        )]));
                    }
                    allocation.claims.push(Self::ip_key(&parsed));
                    parsed.to_string()
                }
                None => {
                    let claimed: HashSet<String> = store
                        .claimed(SERVICE_IP_PREFIX)
                        .await?
                        .into_iter()
                        .filter_map(|k| k.strip_prefix(SERVICE_IP_PREFIX).map(str::to_string))
                        .collect();
                    let (first, last) = self.ip_offsets();
                    let size = last - first + 1;
                    let reserved = (size / 16).clamp(16, 256).min(size);
                    let offset = Self::pick(first, last, reserved, |o| {
                        claimed.contains(&self.ip_at(o).to_string())
                    })
                    .ok_or_else(|| {
                        ApiError::internal(format!(
                            "failed to allocate a serviceIP: range is full ({})",
                            self.range
                        ))
                    })?;
                    let ip = self.ip_at(offset);
                    allocation.claims.push(Self::ip_key(&ip));
                    ip.to_string()
                }
            };
            spec.insert("clusterIP".into(), json!(ip));
            spec.insert("clusterIPs".into(), json!([ip]));
            if spec
                .get("ipFamilies")
                .is_none_or(|f| f.as_array().is_none_or(Vec::is_empty))
            {
                spec.insert("ipFamilies".into(), json!([family]));
            }
            set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
        }

        // --- NodePorts ---
        let old_ports = held_node_ports(&old_spec);
        let spec_value = Value::Object(spec.clone());
        let mut kept: Vec<u16> = Vec::new();
        if needs_node_ports(&spec_value) {
            let mut claimed_cache: Option<HashSet<u16>> = None;
            let mut used_here: HashSet<u16> = HashSet::new();
            let old_port_list = array(old_spec.get("ports")).to_vec();
            let ports = spec
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .map(std::mem::take)
                .unwrap_or_default();
            let mut new_ports = Vec::with_capacity(ports.len());
            let mut errors = Vec::new();
            for (i, mut port) in ports.into_iter().enumerate() {
                let mut node_port = port.get("nodePort").and_then(Value::as_i64).unwrap_or(0);
                if node_port == 0 && old.is_some() {
                    // Keep the port the same entry had before.
                    let same = |p: &Value| {
                        p.get("port") == port.get("port")
                            && p.get("protocol") == port.get("protocol")
                    };
                    let by_name = |p: &Value| {
                        !str_at(&port, "/name").is_empty() && p.get("name") == port.get("name")
                    };
                    node_port = old_port_list
                        .iter()
                        .find(|p| same(p))
                        .or_else(|| old_port_list.iter().find(|p| by_name(p)))
                        .and_then(|p| p.get("nodePort").and_then(Value::as_i64))
                        .unwrap_or(0);
                }
                let field = format!("spec.ports[{i}].nodePort");
                if node_port != 0 {
                    let Ok(number) = u16::try_from(node_port) else {
                        errors.push(invalid(&field, &node_port.to_string(), &format!("provided port is not in the valid range. The range of valid ports is {}", self.ports_text())));
                        new_ports.push(port);
                        continue;
                    };
                    if old_ports.contains(&number) || used_here.contains(&number) {
                        // Held by this Service already.
                    } else if !self.port_in_range(node_port) {
                        errors.push(invalid(&field, &node_port.to_string(), &format!("provided port is not in the valid range. The range of valid ports is {}", self.ports_text())));
                    } else {
                        let taken = is_claimed(store, &Self::port_key(number)).await?;
                        if taken {
                            errors.push(invalid(
                                &field,
                                &node_port.to_string(),
                                "provided port is already allocated",
                            ));
                        } else {
                            allocation.claims.push(Self::port_key(number));
                        }
                    }
                    used_here.insert(number);
                    kept.push(number);
                } else {
                    let claimed = match &claimed_cache {
                        Some(c) => c,
                        None => {
                            let keys = store.claimed(NODE_PORT_PREFIX).await?;
                            let set = keys
                                .iter()
                                .filter_map(|k| k.strip_prefix(NODE_PORT_PREFIX))
                                .filter_map(|p| p.parse().ok())
                                .collect();
                            claimed_cache.insert(set)
                        }
                    };
                    let number = self
                        .pick_port(|p| claimed.contains(&p) || used_here.contains(&p))
                        .ok_or_else(port_range_full)?;
                    allocation.claims.push(Self::port_key(number));
                    used_here.insert(number);
                    kept.push(number);
                    node_port = i64::from(number);
                }
                if let Some(map) = port.as_object_mut() {
                    map.insert("nodePort".into(), json!(node_port));
                }
                new_ports.push(port);
            }
            spec.insert("ports".into(), Value::Array(new_ports));
            // A LoadBalancer keeping traffic node-local gets a health check port.
            let local = str_at(&spec_value, "/type") == "LoadBalancer"
                && str_at(&spec_value, "/externalTrafficPolicy") == "Local";
            if local {
                let mut hc = spec
                    .get("healthCheckNodePort")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                if hc == 0 {
                    hc = old_spec
                        .get("healthCheckNodePort")
                        .and_then(Value::as_i64)
                        .unwrap_or(0);
                }
                if hc == 0 {
                    let keys = store.claimed(NODE_PORT_PREFIX).await?;
                    let claimed: HashSet<u16> = keys
                        .iter()
                        .filter_map(|k| k.strip_prefix(NODE_PORT_PREFIX))
                        .filter_map(|p| p.parse().ok())
                        .collect();
                    let number = self
                        .pick_port(|p| claimed.contains(&p) || used_here.contains(&p))
                        .ok_or_else(port_range_full)?;
                    allocation.claims.push(Self::port_key(number));
                    kept.push(number);
                    hc = i64::from(number);
                } else if let Ok(number) = u16::try_from(hc) {
                    if !old_ports.contains(&number) && !used_here.contains(&number) {
                        if !self.port_in_range(hc) {
                            errors.push(invalid("spec.healthCheckNodePort", &hc.to_string(), &format!("provided port is not in the valid range. The range of valid ports is {}", self.ports_text())));
                        } else if is_claimed(store, &Self::port_key(number)).await? {
                            errors.push(invalid(
                                "spec.healthCheckNodePort",
                                &hc.to_string(),
                                "provided port is already allocated",
                            ));
                        } else {
                            allocation.claims.push(Self::port_key(number));
                        }
                    }
                    kept.push(number);
                }
                spec.insert("healthCheckNodePort".into(), json!(hc));
            }
            if !errors.is_empty() {
                return Err(invalid_err(errors));
            }
        } else {
            // Upstream clears NodePorts that were only carried over when the
            // type no longer uses them.
            let old_list = array(old_spec.get("ports")).to_vec();
            for port in array_mut(spec, "ports") {
                let Some(map) = port.as_object_mut() else {
                    continue;
                };
                let node_port = map.get("nodePort").and_then(Value::as_i64).unwrap_or(0);
                let carried = node_port == 0
                    || old_list
                        .iter()
                        .any(|p| p.get("nodePort").and_then(Value::as_i64) == Some(node_port));
                if carried {
                    map.remove("nodePort");
                }
            }
            if spec
                .get("healthCheckNodePort")
                .is_some_and(|h| Some(h) == old_spec.get("healthCheckNodePort"))
            {
                spec.remove("healthCheckNodePort");
            }
            // Anything left (an explicit nodePort on ClusterIP) is rejected
            // by validation; nothing is claimed for it.
        }
        for port in old_ports {
            if !kept.contains(&port) {
                allocation.releases.push(Self::port_key(port));
            }
        }
        Ok(allocation)
    }

    fn pick_port(&self, taken: impl Fn(u16) -> bool) -> Option<u16> {
        let first = u128::from(*self.node_ports.start());
        let last = u128::from(*self.node_ports.end());
        let size = last.saturating_sub(first) + 1;
        let reserved = (size / 32).clamp(16, 128).min(size);
        Self::pick(first, last, reserved, |p| taken(p as u16)).map(|p| p as u16)
    }

    /// The side keys to release when `svc` is deleted: its ClusterIPs and
    /// NodePorts.
    pub fn releases_for(&self, svc: &Value) -> Vec<String> {
        let empty = json!({});
        let spec = svc.get("spec").unwrap_or(&empty);
        let mut keys: Vec<String> = cluster_ips(spec)
            .iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| Self::ip_key(&ip))
            .collect();
        keys.extend(held_node_ports(spec).into_iter().map(Self::port_key));
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_common::registry::find_kind;

    fn info(api_version: &str, kind: &str) -> &'static ResourceInfo {
        find_kind(api_version, kind).expect("kind is served")
    }

    fn defaulted(api_version: &str, kind: &str, mut obj: Value) -> Value {
        default_object(info(api_version, kind), &mut obj);
        obj
    }

    /// Claimed keys held in memory, standing in for etcd.
    impl Claims for HashSet<String> {
        async fn claimed(&self, prefix: &str) -> Result<Vec<String>, ApiError> {
            Ok(self
                .iter()
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect())
        }
    }

    fn allocator() -> ServiceAllocator {
        ServiceAllocator::new("10.96.0.0/12".parse().expect("cidr"), 30000..=32767)
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn protobuf_zero_values_are_unset() {
        // What `kubectl create deployment` sends as protobuf, decoded.
        let deploy = defaulted(
            "apps/v1",
            "Deployment",
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "dd", "namespace": "default", "generation": 0},
                "spec": {
                    "selector": {"matchLabels": {"app": "dd"}},
                    "template": {
                        "metadata": {"labels": {"app": "dd"}, "generation": 0, "resourceVersion": "",
                            "uid": "", "annotations": {"a": "b"}},
                        "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}
                    }
                }
            }),
        );
        assert_eq!(
            deploy["spec"]["template"]["metadata"],
            json!({"labels": {"app": "dd"}, "annotations": {"a": "b"}})
        );
        // Every template location is cleaned, whatever the kind.
        let mut cron = json!({"spec": {"jobTemplate": {"metadata": {"generation": 0},
            "spec": {"template": {"metadata": {"uid": "x", "labels": {"a": "b"}}}}}}});
        drop_template_server_metadata(&mut cron);
        assert_eq!(cron["spec"]["jobTemplate"]["metadata"], json!({}));
        assert_eq!(
            cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"],
            json!({"labels": {"a": "b"}})
        );

        // What `kubectl create service nodeport np --tcp=80:8080` sends.
        let mut svc = defaulted(
            "v1",
            "Service",
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "np", "namespace": "default"},
                "spec": {"type": "NodePort", "healthCheckNodePort": 0,
                    "ports": [{"name": "80-8080", "port": 80, "targetPort": 8080, "nodePort": 0}],
                    "selector": {"app": "np"}}
            }),
        );
        assert!(svc["spec"].get("healthCheckNodePort").is_none(), "{svc:#}");
        let claims = HashSet::new();
        let allocation = run(allocator().allocate_in(&claims, &mut svc, None)).expect("allocates");
        assert!(svc["spec"].get("healthCheckNodePort").is_none(), "{svc:#}");
        let node_port = svc["spec"]["ports"][0]["nodePort"]
            .as_u64()
            .expect("a node port was allocated");
        assert!((30000..=32767).contains(&node_port), "{svc:#}");
        assert_eq!(
            allocation.claims.len(),
            2,
            "one cluster IP and one node port"
        );
        assert!(validate(info("v1", "Service"), &svc, None).is_empty());
    }

    #[test]
    fn bare_deployment_gets_upstream_defaults() {
        let deploy = defaulted(
            "apps/v1",
            "Deployment",
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}]}
                    }
                }
            }),
        );
        // What `kubectl get deploy web -o json` shows on a real cluster.
        let spec = &deploy["spec"];
        assert_eq!(spec["replicas"], 1);
        assert_eq!(spec["revisionHistoryLimit"], 10);
        assert_eq!(spec["progressDeadlineSeconds"], 600);
        assert_eq!(
            spec["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
        );
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Always");
        assert_eq!(pod["dnsPolicy"], "ClusterFirst");
        assert_eq!(pod["terminationGracePeriodSeconds"], 30);
        assert_eq!(pod["schedulerName"], "default-scheduler");
        assert_eq!(pod["securityContext"], json!({}));
        // Pod-only defaults stay off templates.
        assert!(pod.get("serviceAccountName").is_none(), "{pod}");
        assert!(pod.get("enableServiceLinks").is_none(), "{pod}");
        assert_eq!(
            pod["containers"][0],
            json!({
                "name": "nginx", "image": "nginx:1.27",
                "ports": [{"containerPort": 80, "protocol": "TCP"}],
                "imagePullPolicy": "IfNotPresent",
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
            })
        );
        assert_eq!(deploy["status"], json!({}));
        // Defaulting twice changes nothing.
        assert_eq!(defaulted("apps/v1", "Deployment", deploy.clone()), deploy);
        assert!(validate(info("apps/v1", "Deployment"), &deploy, None).is_empty());
    }

    #[test]
    fn bare_pod_gets_upstream_and_admission_defaults() {
        let pod = defaulted(
            "v1",
            "Pod",
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "default"},
                "spec": {"containers": [{
                    "name": "app", "image": "busybox",
                    "readinessProbe": {"httpGet": {"port": 8080}},
                    "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}}
                }]}
            }),
        );
        let spec = &pod["spec"];
        assert_eq!(spec["serviceAccountName"], "default");
        assert_eq!(spec["serviceAccount"], "default");
        assert_eq!(spec["enableServiceLinks"], true);
        assert_eq!(spec["priority"], 0);
        assert_eq!(spec["preemptionPolicy"], "PreemptLowerPriority");
        assert_eq!(spec["restartPolicy"], "Always");
        assert_eq!(spec["tolerations"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            spec["tolerations"][0]["key"],
            "node.kubernetes.io/not-ready"
        );
        assert_eq!(spec["tolerations"][1]["tolerationSeconds"], 300);
        let container = &spec["containers"][0];
        // No tag means `latest`, which is always pulled.
        assert_eq!(container["imagePullPolicy"], "Always");
        assert_eq!(
            container["readinessProbe"],
            json!({
                "httpGet": {"port": 8080, "path": "/", "scheme": "HTTP"},
                "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3,
            })
        );
        // Requests default to limits, which makes the pod Guaranteed.
        assert_eq!(
            container["resources"]["requests"],
            json!({"cpu": "500m", "memory": "128Mi"})
        );
        assert_eq!(
            pod["status"],
            json!({"phase": "Pending", "qosClass": "Guaranteed"})
        );
        assert!(validate(info("v1", "Pod"), &pod, None).is_empty());
    }

    #[test]
    fn pull_policy_follows_the_tag() {
        for (image, policy) in [
            ("nginx", "Always"),
            ("nginx:latest", "Always"),
            ("nginx:1.27", "IfNotPresent"),
            ("registry:5000/team/app", "Always"),
            ("registry:5000/team/app:v2", "IfNotPresent"),
            ("nginx@sha256:0123", "IfNotPresent"),
        ] {
            let mut c = Map::new();
            c.insert("image".into(), json!(image));
            default_container(&mut c, false);
            assert_eq!(c["imagePullPolicy"], policy, "{image}");
        }
    }

    #[test]
    fn service_namespace_and_secret_defaults() {
        let svc = defaulted(
            "v1",
            "Service",
            json!({"metadata": {"name": "s", "namespace": "default"},
                   "spec": {"type": "NodePort", "ports": [{"port": 80}]}}),
        );
        assert_eq!(
            svc["spec"]["ports"][0],
            json!({"port": 80, "protocol": "TCP", "targetPort": 80})
        );
        assert_eq!(svc["spec"]["sessionAffinity"], "None");
        assert_eq!(svc["spec"]["externalTrafficPolicy"], "Cluster");
        assert_eq!(svc["spec"]["internalTrafficPolicy"], "Cluster");
        assert_eq!(svc["status"], json!({"loadBalancer": {}}));
        let plain = defaulted(
            "v1",
            "Service",
            json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80, "targetPort": "http"}]}}),
        );
        assert_eq!(plain["spec"]["type"], "ClusterIP");
        assert_eq!(plain["spec"]["ports"][0]["targetPort"], "http");
        assert!(plain["spec"].get("externalTrafficPolicy").is_none());

        let ns = defaulted("v1", "Namespace", json!({"metadata": {"name": "team"}}));
        assert_eq!(ns["spec"]["finalizers"], json!(["kubernetes"]));
        assert_eq!(ns["status"]["phase"], "Active");
        assert_eq!(
            ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "team"
        );

        let secret = defaulted("v1", "Secret", json!({"metadata": {"name": "s"}}));
        assert_eq!(secret["type"], "Opaque");
    }

    fn causes(api_version: &str, kind: &str, obj: Value) -> Vec<(String, String, String)> {
        let obj = defaulted(api_version, kind, obj);
        validate(info(api_version, kind), &obj, None)
            .into_iter()
            .map(|c| (c.reason, c.field, c.message))
            .collect()
    }

    fn deployment(labels: Value, containers: Value) -> Value {
        json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": containers}}
            }
        })
    }

    #[test]
    fn invalid_objects_report_upstream_causes() {
        let label_msg = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
        let subdomain_msg = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
        /// (case, apiVersion, kind, object, expected (reason, field, message)).
        type Case = (
            &'static str,
            &'static str,
            &'static str,
            Value,
            Vec<(&'static str, &'static str, String)>,
        );
        let cases: Vec<Case> = vec![
            (
                "bad pod name, no containers",
                "v1", "Pod",
                json!({"metadata": {"name": "Foo", "namespace": "default"}, "spec": {}}),
                vec![
                    ("FieldValueInvalid", "metadata.name", format!("Invalid value: \"Foo\": {subdomain_msg}")),
                    ("FieldValueRequired", "spec.containers", "Required value".into()),
                ],
            ),
            (
                "missing name and namespace",
                "v1", "ConfigMap",
                json!({"metadata": {}}),
                vec![
                    ("FieldValueRequired", "metadata.name", "Required value: name or generateName is required".into()),
                    ("FieldValueRequired", "metadata.namespace", "Required value".into()),
                ],
            ),
            (
                "template container name, image, duplicate, enum",
                "apps/v1", "Deployment",
                deployment(json!({"app": "web"}), json!([
                    {"name": "Web", "image": "nginx"},
                    {"name": "side", "image": "", "imagePullPolicy": "Sometimes"},
                    {"name": "side", "image": "x", "ports": [{"containerPort": 70000}]}
                ])),
                vec![
                    ("FieldValueInvalid", "spec.template.spec.containers[0].name", format!("Invalid value: \"Web\": {label_msg}")),
                    ("FieldValueRequired", "spec.template.spec.containers[1].image", "Required value".into()),
                    ("FieldValueNotSupported", "spec.template.spec.containers[1].imagePullPolicy", "Unsupported value: \"Sometimes\": supported values: \"Always\", \"IfNotPresent\", \"Never\"".into()),
                    ("FieldValueDuplicate", "spec.template.spec.containers[2].name", "Duplicate value: \"side\"".into()),
                    ("FieldValueInvalid", "spec.template.spec.containers[2].ports[0].containerPort", "Invalid value: 70000: must be between 1 and 65535, inclusive".into()),
                ],
            ),
            (
                "selector does not match the template",
                "apps/v1", "Deployment",
                deployment(json!({"app": "api", "tier": "be"}), json!([{"name": "a", "image": "a"}])),
                vec![(
                    "FieldValueInvalid", "spec.template.metadata.labels",
                    "Invalid value: {\"app\":\"api\",\"tier\":\"be\"}: `selector` does not match template `labels`".into(),
                )],
            ),
            (
                "pod restart policy, requests above limits, bad quantity",
                "v1", "Pod",
                json!({"metadata": {"name": "p", "namespace": "default"}, "spec": {
                    "restartPolicy": "Sometimes",
                    "containers": [{"name": "a", "image": "a", "resources": {
                        "limits": {"cpu": "0.5", "memory": "lots"},
                        "requests": {"cpu": "1"}
                    }}]
                }}),
                vec![
                    ("FieldValueInvalid", "spec.containers[0].resources.limits[memory]", "Invalid value: \"lots\": quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'".into()),
                    ("FieldValueInvalid", "spec.containers[0].resources.requests", "Invalid value: \"1\": must be less than or equal to cpu limit of 500m".into()),
                    ("FieldValueNotSupported", "spec.restartPolicy", "Unsupported value: \"Sometimes\": supported values: \"Always\", \"OnFailure\", \"Never\"".into()),
                ],
            ),
            (
                "labels and annotations",
                "v1", "ConfigMap",
                json!({"metadata": {"name": "c", "namespace": "default",
                    "labels": {"bad key!": "ok", "good": "-bad-"},
                    "annotations": {"big": "x".repeat(TOTAL_ANNOTATION_SIZE_LIMIT)}},
                    "data": {"ok.key": "v", "bad/key": "v"}}),
                vec![
                    ("FieldValueInvalid", "metadata.labels", "Invalid value: \"bad key!\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')".into()),
                    ("FieldValueInvalid", "metadata.labels", "Invalid value: \"-bad-\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')".into()),
                    ("FieldValueTooLong", "metadata.annotations", "Too long: must have at most 262144 bytes".into()),
                    ("FieldValueInvalid", "data[bad/key]", "Invalid value: \"bad/key\": a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')".into()),
                ],
            ),
            (
                "service ports and type",
                "v1", "Service",
                json!({"metadata": {"name": "1svc", "namespace": "default"}, "spec": {
                    "type": "Magic",
                    "ports": [{"port": 80}, {"name": "b", "port": 0}, {"name": "b", "port": 81}]
                }}),
                vec![
                    ("FieldValueInvalid", "metadata.name", "Invalid value: \"1svc\": a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')".into()),
                    ("FieldValueNotSupported", "spec.type", "Unsupported value: \"Magic\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\"".into()),
                    ("FieldValueRequired", "spec.ports[0].name", "Required value".into()),
                    ("FieldValueInvalid", "spec.ports[1].port", "Invalid value: 0: must be between 1 and 65535, inclusive".into()),
                    (
                        "FieldValueInvalid",
                        "spec.ports[1].targetPort",
                        "Invalid value: 0: must be between 1 and 65535, inclusive".into(),
                    ),
                    ("FieldValueDuplicate", "spec.ports[2].name", "Duplicate value: \"b\"".into()),
                ],
            ),
            (
                "service without ports, external name",
                "v1", "Service",
                json!({"metadata": {"name": "s", "namespace": "default"}, "spec": {"type": "ExternalName", "externalName": "Bad_Name"}}),
                vec![("FieldValueInvalid", "spec.externalName", format!("Invalid value: \"Bad_Name\": {subdomain_msg}"))],
            ),
            (
                "deployment strategy and replicas",
                "apps/v1", "Deployment",
                {
                    let mut d = deployment(json!({"app": "web"}), json!([{"name": "a", "image": "a"}]));
                    d["spec"]["replicas"] = json!(-1);
                    d["spec"]["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}});
                    d
                },
                vec![
                    ("FieldValueInvalid", "spec.replicas", "Invalid value: -1: must be greater than or equal to 0".into()),
                    ("FieldValueInvalid", "spec.strategy.rollingUpdate.maxUnavailable", "Invalid value: 0%: may not be 0 when `maxSurge` is 0".into()),
                ],
            ),
            (
                "empty selector",
                "apps/v1", "ReplicaSet",
                json!({"metadata": {"name": "r", "namespace": "default"}, "spec": {"selector": {},
                    "template": {"spec": {"containers": [{"name": "a", "image": "a"}]}}}}),
                vec![("FieldValueInvalid", "spec.selector", "Invalid value: {}: empty selector is invalid for replicaset".into())],
            ),
            (
                "event namespace",
                "v1", "Event",
                json!({"metadata": {"name": "e", "namespace": "default"}, "involvedObject": {"kind": "Pod", "namespace": "other"}}),
                vec![("FieldValueInvalid", "involvedObject.namespace", "Invalid value: \"other\": does not match event.namespace".into())],
            ),
            (
                "namespaces are labels and cluster-scoped",
                "v1", "Namespace",
                json!({"metadata": {"name": "a.b", "namespace": "x"}}),
                vec![
                    ("FieldValueInvalid", "metadata.name", "Invalid value: \"a.b\": must not contain dots".into()),
                    ("FieldValueForbidden", "metadata.namespace", "Forbidden: not allowed on this type".into()),
                ],
            ),
        ];
        for (name, api_version, kind, obj, expected) in cases {
            let got = causes(api_version, kind, obj);
            let expected: Vec<(String, String, String)> = expected
                .into_iter()
                .map(|(r, f, m)| (r.to_string(), f.to_string(), m))
                .collect();
            assert_eq!(got, expected, "case {name}");
        }
    }

    #[test]
    fn selectors_are_immutable_on_update() {
        let old = defaulted(
            "apps/v1",
            "Deployment",
            deployment(json!({"app": "web"}), json!([{"name": "a", "image": "a"}])),
        );
        let mut new = old.clone();
        new["spec"]["selector"] = json!({"matchLabels": {"app": "web", "v": "2"}});
        new["spec"]["template"]["metadata"]["labels"] = json!({"app": "web", "v": "2"});
        let got = validate(info("apps/v1", "Deployment"), &new, Some(&old));
        assert_eq!(
            got,
            vec![Cause::new(
                "FieldValueInvalid",
                "spec.selector",
                "Invalid value: {\"matchLabels\":{\"app\":\"web\",\"v\":\"2\"}}: field is immutable"
            )]
        );
        assert!(validate(info("apps/v1", "Deployment"), &old, Some(&old)).is_empty());
    }

    #[test]
    fn pod_spec_updates_are_limited() {
        let old = defaulted(
            "v1",
            "Pod",
            json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": [{"name": "a", "image": "a:1"}]}}),
        );
        let mut image = old.clone();
        image["spec"]["containers"][0]["image"] = json!("a:2");
        image["spec"]["nodeName"] = json!("node-1");
        assert!(validate(info("v1", "Pod"), &image, Some(&old)).is_empty());
        let mut env = old.clone();
        env["spec"]["containers"][0]["env"] = json!([{"name": "X", "value": "1"}]);
        let got = validate(info("v1", "Pod"), &env, Some(&old));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].reason, "FieldValueForbidden");
        assert!(
            got[0]
                .message
                .starts_with("Forbidden: pod updates may not change fields other than")
        );
    }

    #[test]
    fn ranges_exclude_network_and_broadcast() {
        let a = allocator();
        assert!(a.ip_in_range(&"10.96.0.1".parse().expect("ip")));
        assert!(a.ip_in_range(&"10.111.255.254".parse().expect("ip")));
        assert!(!a.ip_in_range(&"10.96.0.0".parse().expect("ip")));
        assert!(!a.ip_in_range(&"10.111.255.255".parse().expect("ip")));
        assert!(!a.ip_in_range(&"10.112.0.1".parse().expect("ip")));
        assert!(!a.ip_in_range(&"fd00::1".parse().expect("ip")));
        assert!(a.port_in_range(30000) && a.port_in_range(32767));
        assert!(!a.port_in_range(80) && !a.port_in_range(70000));
        // The configured range prints as a network.
        let b = ServiceAllocator::new("10.96.0.7/12".parse().expect("cidr"), 30000..=32767);
        assert_eq!(b.range.to_string(), "10.96.0.0/12");
    }

    #[test]
    fn random_picks_prefer_the_upper_band_and_find_the_last_free_value() {
        let mut seen = HashSet::new();
        for _ in 0..50 {
            let v = ServiceAllocator::pick(1, 1000, 62, |_| false).expect("free");
            assert!((64..=1000).contains(&v), "{v}");
            seen.insert(v);
        }
        assert!(seen.len() > 10, "picks are random: {seen:?}");
        assert_eq!(ServiceAllocator::pick(1, 1000, 62, |v| v != 7), Some(7));
        assert_eq!(ServiceAllocator::pick(1, 1000, 62, |_| true), None);
    }

    #[test]
    fn explicit_values_out_of_range_are_invalid() {
        let a = allocator();
        let claims = HashSet::new();
        let mut svc = json!({"metadata": {"name": "s"}, "spec": {"clusterIP": "1.2.3.4", "ports": [{"port": 80}]}});
        let err = run(a.allocate_in(&claims, &mut svc, None)).expect_err("out of range");
        assert_eq!(err.code, 422);
        assert_eq!(
            err.message,
            "Service \"s\" is invalid: spec.clusterIPs: Invalid value: [\"1.2.3.4\"]: failed to allocate IP 1.2.3.4: the provided IP (1.2.3.4) is not in the valid range. The range of valid IPs is 10.96.0.0/12"
        );
        let mut svc = json!({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}});
        let err = run(a.allocate_in(&claims, &mut svc, None)).expect_err("out of range");
        assert_eq!(
            err.message,
            "Service \"s\" is invalid: spec.ports[0].nodePort: Invalid value: 80: provided port is not in the valid range. The range of valid ports is 30000-32767"
        );
        assert_eq!(err.details.causes[0].field, "spec.ports[0].nodePort");
        let taken: HashSet<String> =
            [ServiceAllocator::ip_key(&"10.96.0.10".parse().expect("ip"))].into();
        let mut svc = json!({"metadata": {"name": "s"}, "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 53}]}});
        let err = run(a.allocate_in(&taken, &mut svc, None)).expect_err("taken");
        assert!(
            err.message
                .ends_with("failed to allocate IP 10.96.0.10: provided IP is already allocated"),
            "{}",
            err.message
        );
    }

    #[test]
    fn type_changes_keep_or_release_values() {
        let a = allocator();
        let claims = HashSet::new();
        let mut svc = json!({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}});
        let created = run(a.allocate_in(&claims, &mut svc, None)).expect("allocates");
        let ip = svc["spec"]["clusterIP"].as_str().expect("ip").to_string();
        let node_port = svc["spec"]["ports"][0]["nodePort"]
            .as_u64()
            .expect("nodePort") as u16;
        assert!((30000..=32767).contains(&node_port));
        assert_eq!(svc["spec"]["clusterIPs"], json!([ip]));
        assert_eq!(svc["spec"]["ipFamilies"], json!(["IPv4"]));
        assert_eq!(svc["spec"]["ipFamilyPolicy"], "SingleStack");
        let ip_key = format!("{SERVICE_IP_PREFIX}{ip}");
        let port_key = format!("{NODE_PORT_PREFIX}{node_port}");
        assert_eq!(created.claims, vec![ip_key.clone(), port_key.clone()]);
        assert_eq!(a.releases_for(&svc), vec![ip_key.clone(), port_key.clone()]);

        // An update that leaves the values out keeps them.
        let old = svc.clone();
        let mut same = json!({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}});
        let kept = run(a.allocate_in(&claims, &mut same, Some(&old))).expect("keeps");
        assert_eq!(kept, Allocation::default());
        assert_eq!(same["spec"]["clusterIP"], ip.as_str());
        assert_eq!(same["spec"]["ports"][0]["nodePort"], node_port);

        // To ClusterIP: the IP stays, the nodePort goes.
        let mut cluster = old.clone();
        cluster["spec"]["type"] = json!("ClusterIP");
        let changed = run(a.allocate_in(&claims, &mut cluster, Some(&old))).expect("to ClusterIP");
        assert_eq!(
            changed,
            Allocation {
                claims: vec![],
                releases: vec![port_key.clone()]
            }
        );
        assert!(cluster["spec"]["ports"][0].get("nodePort").is_none());
        assert_eq!(cluster["spec"]["clusterIP"], ip.as_str());

        // To ExternalName: the IP goes too.
        let mut external = old.clone();
        external["spec"]["type"] = json!("ExternalName");
        external["spec"]["externalName"] = json!("example.com");
        let changed =
            run(a.allocate_in(&claims, &mut external, Some(&old))).expect("to ExternalName");
        assert_eq!(changed.releases, vec![ip_key, port_key]);
        assert!(external["spec"].get("clusterIP").is_none());
        assert!(external["spec"].get("ipFamilies").is_none());

        // The ClusterIP may not change.
        let mut moved = old.clone();
        moved["spec"]["clusterIP"] = json!("10.96.0.99");
        moved["spec"]["clusterIPs"] = json!(["10.96.0.99"]);
        let err = run(a.allocate_in(&claims, &mut moved, Some(&old))).expect_err("immutable");
        assert_eq!(
            err.message,
            "Service \"s\" is invalid: spec.clusterIPs[0]: Invalid value: [\"10.96.0.99\"]: may not change once set"
        );

        // Headless services get no IP and claim nothing.
        let mut headless = json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None"}});
        let none = run(a.allocate_in(&claims, &mut headless, None)).expect("headless");
        assert_eq!(none, Allocation::default());
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
        assert!(a.releases_for(&headless).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn allocations_against_real_etcd() {
        let etcd = crate::testing::Etcd::start();
        let store = crate::testing::store(&etcd).await;
        let allocator = std::sync::Arc::new(allocator());

        // Three concurrent creates, each retrying when it loses a race.
        let mut tasks = Vec::new();
        for i in 0..3 {
            let (store, allocator) = (store.clone(), allocator.clone());
            tasks.push(tokio::spawn(async move {
                let kind = if i == 0 { "NodePort" } else { "ClusterIP" };
                let key = format!("/registry/core/services/default/svc{i}");
                loop {
                    let mut svc = json!({"metadata": {"name": format!("svc{i}"), "namespace": "default"},
                        "spec": {"type": kind, "ports": [{"port": 80, "protocol": "TCP"}]}});
                    let allocation = allocator.allocate(&store, &mut svc, None).await.expect("allocates");
                    match store.create(&key, &svc, &allocation.claims).await {
                        Ok(_) => return svc,
                        Err(StorageError::ClaimTaken { .. }) => continue,
                        Err(e) => panic!("create svc{i}: {e}"),
                    }
                }
            }));
        }
        let mut ips = HashSet::new();
        let mut services = Vec::new();
        for task in tasks {
            let svc = task.await.expect("task finishes");
            let ip: IpAddr = svc["spec"]["clusterIP"]
                .as_str()
                .expect("ip")
                .parse()
                .expect("an ip");
            assert!(allocator.ip_in_range(&ip), "{ip}");
            ips.insert(ip);
            services.push(svc);
        }
        assert_eq!(ips.len(), 3, "distinct IPs: {ips:?}");
        let node_port = services[0]["spec"]["ports"][0]["nodePort"]
            .as_i64()
            .expect("nodePort");
        assert!((30000..=32767).contains(&node_port), "{node_port}");
        let claimed = store.keys(SERVICE_IP_PREFIX).await.expect("keys");
        assert_eq!(claimed.len(), 3, "{claimed:?}");
        assert_eq!(store.keys(NODE_PORT_PREFIX).await.expect("keys").len(), 1);

        // An explicitly requested IP that is claimed already is a 422.
        let taken = services[1]["spec"]["clusterIP"]
            .as_str()
            .expect("ip")
            .to_string();
        let mut svc = json!({"metadata": {"name": "dup", "namespace": "default"},
            "spec": {"clusterIP": taken, "ports": [{"port": 80}]}});
        let err = allocator
            .allocate(&store, &mut svc, None)
            .await
            .expect_err("already allocated");
        assert_eq!(err.code, 422);
        assert_eq!(
            err.message,
            format!(
                "Service \"dup\" is invalid: spec.clusterIPs: Invalid value: [\"{taken}\"]: failed to allocate IP {taken}: provided IP is already allocated"
            )
        );
        // So is an explicit nodePort held by another Service.
        let mut svc = json!({"metadata": {"name": "dup", "namespace": "default"},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": node_port}]}});
        let err = allocator
            .allocate(&store, &mut svc, None)
            .await
            .expect_err("port taken");
        assert!(err.message.ends_with(&format!("spec.ports[0].nodePort: Invalid value: {node_port}: provided port is already allocated")), "{}", err.message);

        // Deleting releases everything the Service held.
        let key = "/registry/core/services/default/svc0";
        let stored = store.get(key).await.expect("get").expect("svc0 stored");
        store
            .delete(key, stored.revision, &allocator.releases_for(&stored.value))
            .await
            .expect("delete");
        assert_eq!(store.keys(SERVICE_IP_PREFIX).await.expect("keys").len(), 2);
        assert!(store.keys(NODE_PORT_PREFIX).await.expect("keys").is_empty());
        drop(etcd);
    }
}
