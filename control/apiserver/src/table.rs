//! Server-side printing for `kubectl get`: the `meta.k8s.io/v1` `Table`.
//!
//! kubectl asks for a Table in its Accept header ([`wants_table`]) and
//! prints the cells the server chose. The columns and cell formats follow
//! upstream's printers (kubernetes `pkg/printers/internalversion`), which
//! the API server always runs in wide mode: every column is filled, and
//! kubectl hides the `priority: 1` ones unless asked for `-o wide`. Column
//! descriptions come from the OpenAPI documentation of the k8s-openapi
//! types, as upstream takes them from the Go types' swagger docs.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::{apps, coordination, core, discovery};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value, json};

use skiff_common::registry::ResourceInfo;

/// What `includeObject` asks for in each row (default Metadata, as upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IncludeObject {
    /// No object in the rows.
    None,
    /// A `PartialObjectMetadata` holding the object's metadata.
    #[default]
    Metadata,
    /// The full object.
    Object,
}

impl IncludeObject {
    /// Reads the `includeObject` query parameter; a missing or unknown value
    /// means [`IncludeObject::Metadata`], upstream's default.
    pub fn parse(value: Option<&str>) -> IncludeObject {
        match value {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// Whether an Accept header asks for a Table
/// (`application/json;as=Table;v=v1;g=meta.k8s.io`, also v1beta1); returns
/// the Table's apiVersion to answer with (`meta.k8s.io/v1` or
/// `meta.k8s.io/v1beta1`) or `None`.
///
/// Media ranges are taken in the client's order of preference (by `q`,
/// then by position); the first one the server can answer decides: a Table
/// range gives the Table version, a plain JSON (or wildcard) range gives
/// `None`. Ranges that cannot be answered (other `as=` kinds, protobuf)
/// are skipped.
pub fn wants_table(accept: &str) -> Option<&'static str> {
    let mut ranges: Vec<(f32, usize, &str)> = accept
        .split(',')
        .enumerate()
        .map(|(i, range)| (quality(range), i, range))
        .filter(|(q, _, _)| *q > 0.0)
        .collect();
    ranges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, _, range) in ranges {
        let mut parts = range.split(';').map(str::trim);
        let essence = parts.next().unwrap_or_default().to_ascii_lowercase();
        let (mut as_kind, mut version, mut group) = (None, None, None);
        for param in parts {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"');
            match key.trim().to_ascii_lowercase().as_str() {
                "as" => as_kind = Some(value),
                "v" => version = Some(value),
                "g" => group = Some(value),
                _ => {}
            }
        }
        let json_like = matches!(
            essence.as_str(),
            "application/json" | "application/*" | "*/*"
        );
        match as_kind {
            None if json_like => return None,
            Some("Table") if json_like && group == Some("meta.k8s.io") => match version {
                Some("v1") => return Some("meta.k8s.io/v1"),
                Some("v1beta1") => return Some("meta.k8s.io/v1beta1"),
                _ => {}
            },
            _ => {}
        }
    }
    None
}

/// The `q` parameter of one media range, 1 when absent or unreadable.
fn quality(range: &str) -> f32 {
    range
        .split(';')
        .skip(1)
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
        .and_then(|(_, v)| v.trim().parse::<f32>().ok())
        .unwrap_or(1.0)
}

/// A Table of `items` (full Kubernetes JSON objects of kind `info`), `now`
/// used for AGE.
///
/// `metadata` is left empty: the caller fills `resourceVersion` and
/// `continue`.
pub fn table(
    info: &ResourceInfo,
    items: &[Value],
    include: IncludeObject,
    api_version: &str,
    now: Timestamp,
) -> Value {
    let printer = Printer::of(info);
    let rows: Vec<Value> = items
        .iter()
        .map(|item| {
            let mut row = Map::new();
            row.insert("cells".into(), Value::Array(printer.cells(item, now)));
            if let Some(conditions) = printer.row_conditions(item) {
                row.insert("conditions".into(), conditions);
            }
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => {
                    row.insert("object".into(), partial_metadata(item, api_version));
                }
                IncludeObject::Object => {
                    row.insert("object".into(), item.clone());
                }
            }
            Value::Object(row)
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": api_version,
        "metadata": {},
        "columnDefinitions": printer.column_definitions(),
        "rows": rows,
    })
}

/// The `PartialObjectMetadata` of an object, in the Table's group-version
/// as upstream does.
fn partial_metadata(item: &Value, api_version: &str) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": api_version,
        "metadata": item.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

/// Upstream's `duration.HumanDuration`: about two significant figures of
/// a duration, e.g. `45s`, `2m3s`, `15m`, `3h5m`, `10h`, `2d3h`, `45d`,
/// `2y10d`, `9y`; `<invalid>` for more than a second in the future.
pub fn human_duration(d: SignedDuration) -> String {
    let seconds = d.as_secs();
    if seconds < -1 {
        return "<invalid>".to_string();
    }
    if seconds < 0 {
        return "0s".to_string();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let days = (hours / 24) % 365;
        return if days == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{days}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

// ---------------------------------------------------------------------------
// Columns

/// Where a column's description comes from.
#[derive(Clone, Copy)]
enum Doc {
    /// A fixed text, as upstream writes it.
    Text(&'static str),
    /// The OpenAPI description of a field of a k8s-openapi type.
    Field(fn() -> Schema, &'static str),
}

/// One column: name, type, format, priority, description.
#[derive(Clone, Copy)]
struct Column {
    name: &'static str,
    kind: &'static str,
    format: &'static str,
    priority: u8,
    doc: Doc,
}

fn schema_of<T: JsonSchema>() -> Schema {
    SchemaGenerator::default().into_root_schema_for::<T>()
}

impl Doc {
    fn text(self) -> String {
        match self {
            Doc::Text(text) => text.to_string(),
            Doc::Field(schema, field) => schema()
                .as_value()
                .pointer(&format!("/properties/{field}/description"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        }
    }
}

const fn col(name: &'static str, kind: &'static str, doc: Doc) -> Column {
    Column {
        name,
        kind,
        format: "",
        priority: 0,
        doc,
    }
}

const fn wide(name: &'static str, kind: &'static str, doc: Doc) -> Column {
    Column {
        name,
        kind,
        format: "",
        priority: 1,
        doc,
    }
}

const fn meta(field: &'static str) -> Doc {
    Doc::Field(schema_of::<ObjectMeta>, field)
}

const NAME: Column = Column {
    name: "Name",
    kind: "string",
    format: "name",
    priority: 0,
    doc: meta("name"),
};
const AGE: Column = col("Age", "string", meta("creationTimestamp"));
const CONTAINERS: Column = wide(
    "Containers",
    "string",
    Doc::Text("Names of each container in the template."),
);
const IMAGES: Column = wide(
    "Images",
    "string",
    Doc::Text("Images referenced by each container in the template."),
);

/// The printers this server has, one per served kind plus a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Printer {
    Pod,
    Deployment,
    ReplicaSet,
    Service,
    Endpoints,
    EndpointSlice,
    Node,
    Namespace,
    Event,
    ConfigMap,
    Secret,
    ServiceAccount,
    Lease,
    Default,
}

const PRINTERS: usize = 14;

impl Printer {
    fn of(info: &ResourceInfo) -> Printer {
        match (info.group, info.kind) {
            ("", "Pod") => Printer::Pod,
            ("apps", "Deployment") => Printer::Deployment,
            ("apps", "ReplicaSet") => Printer::ReplicaSet,
            ("", "Service") => Printer::Service,
            ("", "Endpoints") => Printer::Endpoints,
            ("discovery.k8s.io", "EndpointSlice") => Printer::EndpointSlice,
            ("", "Node") => Printer::Node,
            ("", "Namespace") => Printer::Namespace,
            ("", "Event") => Printer::Event,
            ("", "ConfigMap") => Printer::ConfigMap,
            ("", "Secret") => Printer::Secret,
            ("", "ServiceAccount") => Printer::ServiceAccount,
            ("coordination.k8s.io", "Lease") => Printer::Lease,
            _ => Printer::Default,
        }
    }

    fn columns(self) -> Vec<Column> {
        use Doc::{Field, Text};
        match self {
            Printer::Pod => vec![
                NAME,
                col(
                    "Ready",
                    "string",
                    Text("The aggregate readiness state of this pod for accepting traffic."),
                ),
                col(
                    "Status",
                    "string",
                    Text("The aggregate status of the containers in this pod."),
                ),
                col(
                    "Restarts",
                    "string",
                    Text(
                        "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
                    ),
                ),
                AGE,
                wide(
                    "IP",
                    "string",
                    Field(schema_of::<core::v1::PodStatus>, "podIP"),
                ),
                wide(
                    "Node",
                    "string",
                    Field(schema_of::<core::v1::PodSpec>, "nodeName"),
                ),
                wide(
                    "Nominated Node",
                    "string",
                    Field(schema_of::<core::v1::PodStatus>, "nominatedNodeName"),
                ),
                wide(
                    "Readiness Gates",
                    "string",
                    Field(schema_of::<core::v1::PodSpec>, "readinessGates"),
                ),
            ],
            Printer::Deployment => vec![
                NAME,
                col(
                    "Ready",
                    "string",
                    Text("Number of the pod with ready state"),
                ),
                col(
                    "Up-to-date",
                    "string",
                    Field(schema_of::<apps::v1::DeploymentStatus>, "updatedReplicas"),
                ),
                col(
                    "Available",
                    "string",
                    Field(schema_of::<apps::v1::DeploymentStatus>, "availableReplicas"),
                ),
                AGE,
                CONTAINERS,
                IMAGES,
                wide(
                    "Selector",
                    "string",
                    Field(schema_of::<apps::v1::DeploymentSpec>, "selector"),
                ),
            ],
            Printer::ReplicaSet => vec![
                NAME,
                col(
                    "Desired",
                    "integer",
                    Field(schema_of::<apps::v1::ReplicaSetSpec>, "replicas"),
                ),
                col(
                    "Current",
                    "integer",
                    Field(schema_of::<apps::v1::ReplicaSetStatus>, "replicas"),
                ),
                col(
                    "Ready",
                    "integer",
                    Field(schema_of::<apps::v1::ReplicaSetStatus>, "readyReplicas"),
                ),
                AGE,
                CONTAINERS,
                IMAGES,
                wide(
                    "Selector",
                    "string",
                    Field(schema_of::<apps::v1::ReplicaSetSpec>, "selector"),
                ),
            ],
            Printer::Service => {
                let spec = schema_of::<core::v1::ServiceSpec>;
                vec![
                    NAME,
                    col("Type", "string", Field(spec, "type")),
                    col("Cluster-IP", "string", Field(spec, "clusterIP")),
                    col("External-IP", "string", Field(spec, "externalIPs")),
                    col("Port(s)", "string", Field(spec, "ports")),
                    AGE,
                    wide("Selector", "string", Field(spec, "selector")),
                ]
            }
            Printer::Endpoints => vec![
                NAME,
                col(
                    "Endpoints",
                    "string",
                    Field(schema_of::<core::v1::Endpoints>, "subsets"),
                ),
                AGE,
            ],
            Printer::EndpointSlice => {
                let slice = schema_of::<discovery::v1::EndpointSlice>;
                vec![
                    NAME,
                    col("AddressType", "string", Field(slice, "addressType")),
                    col("Ports", "string", Field(slice, "ports")),
                    col("Endpoints", "string", Field(slice, "endpoints")),
                    AGE,
                ]
            }
            Printer::Node => {
                let info = schema_of::<core::v1::NodeSystemInfo>;
                let status = schema_of::<core::v1::NodeStatus>;
                vec![
                    NAME,
                    col("Status", "string", Text("The status of the node")),
                    col("Roles", "string", Text("The roles of the node")),
                    AGE,
                    col("Version", "string", Field(info, "kubeletVersion")),
                    wide("Internal-IP", "string", Field(status, "addresses")),
                    wide("External-IP", "string", Field(status, "addresses")),
                    wide("OS-Image", "string", Field(info, "osImage")),
                    wide("Kernel-Version", "string", Field(info, "kernelVersion")),
                    wide(
                        "Container-Runtime",
                        "string",
                        Field(info, "containerRuntimeVersion"),
                    ),
                ]
            }
            Printer::Namespace => vec![
                NAME,
                col("Status", "string", Text("The status of the namespace")),
                AGE,
            ],
            Printer::Event => {
                let event = schema_of::<core::v1::Event>;
                let reference = schema_of::<core::v1::ObjectReference>;
                vec![
                    col("Last Seen", "string", Field(event, "lastTimestamp")),
                    col("Type", "string", Field(event, "type")),
                    col("Reason", "string", Field(event, "reason")),
                    col("Object", "string", Field(event, "involvedObject")),
                    wide("Subobject", "string", Field(reference, "fieldPath")),
                    wide("Source", "string", Field(event, "source")),
                    col("Message", "string", Field(event, "message")),
                    wide("First Seen", "string", Field(event, "firstTimestamp")),
                    wide("Count", "string", Field(event, "count")),
                    Column {
                        priority: 1,
                        ..NAME
                    },
                ]
            }
            Printer::ConfigMap => vec![
                NAME,
                col(
                    "Data",
                    "string",
                    Field(schema_of::<core::v1::ConfigMap>, "data"),
                ),
                AGE,
            ],
            Printer::Secret => {
                let secret = schema_of::<core::v1::Secret>;
                vec![
                    NAME,
                    col("Type", "string", Field(secret, "type")),
                    col("Data", "string", Field(secret, "data")),
                    AGE,
                ]
            }
            Printer::ServiceAccount => vec![
                NAME,
                col(
                    "Secrets",
                    "string",
                    Field(schema_of::<core::v1::ServiceAccount>, "secrets"),
                ),
                AGE,
            ],
            Printer::Lease => vec![
                NAME,
                col(
                    "Holder",
                    "string",
                    Field(schema_of::<coordination::v1::LeaseSpec>, "holderIdentity"),
                ),
                AGE,
            ],
            Printer::Default => vec![NAME, AGE],
        }
    }

    /// The `columnDefinitions` of this printer, built once.
    fn column_definitions(self) -> Value {
        static DEFINITIONS: [OnceLock<Value>; PRINTERS] = [const { OnceLock::new() }; PRINTERS];
        DEFINITIONS[self as usize]
            .get_or_init(|| {
                Value::Array(
                    self.columns()
                        .into_iter()
                        .map(|c| {
                            json!({
                                "name": c.name,
                                "type": c.kind,
                                "format": c.format,
                                "description": c.doc.text(),
                                "priority": c.priority,
                            })
                        })
                        .collect(),
                )
            })
            .clone()
    }

    /// Upstream marks finished pods with a `Completed` row condition.
    fn row_conditions(self, item: &Value) -> Option<Value> {
        if self != Printer::Pod {
            return None;
        }
        let (reason, message) = match text(item, "/status/phase") {
            "Succeeded" => ("Succeeded", "The pod has completed successfully."),
            "Failed" => ("Failed", "The pod failed."),
            _ => return None,
        };
        Some(json!([{
            "type": "Completed",
            "status": "True",
            "reason": reason,
            "message": message,
        }]))
    }

    fn cells(self, item: &Value, now: Timestamp) -> Vec<Value> {
        let name = Value::from(text(item, "/metadata/name"));
        let age = Value::from(age(item, "/metadata/creationTimestamp", now));
        match self {
            Printer::Pod => pod_cells(item, now),
            Printer::Deployment => {
                let (containers, images) = container_cells(item, "/spec/template/spec/containers");
                let selector =
                    match skiff_common::labels::selector_string(item.pointer("/spec/selector")) {
                        Ok(s) => s,
                        Err(skiff_common::labels::InvalidSelector) => "<invalid>".to_string(),
                    };
                vec![
                    name,
                    format!("{}/{}", int(item, "/status/readyReplicas"), replicas(item)).into(),
                    int(item, "/status/updatedReplicas").into(),
                    int(item, "/status/availableReplicas").into(),
                    age,
                    containers.into(),
                    images.into(),
                    selector.into(),
                ]
            }
            Printer::ReplicaSet => {
                let (containers, images) = container_cells(item, "/spec/template/spec/containers");
                let selector =
                    match skiff_common::labels::selector_string(item.pointer("/spec/selector")) {
                        Ok(s) if s.is_empty() => "<none>".to_string(),
                        Ok(s) => s,
                        Err(skiff_common::labels::InvalidSelector) => "<error>".to_string(),
                    };
                vec![
                    name,
                    replicas(item).into(),
                    int(item, "/status/replicas").into(),
                    int(item, "/status/readyReplicas").into(),
                    age,
                    containers.into(),
                    images.into(),
                    selector.into(),
                ]
            }
            Printer::Service => service_cells(item, name, age),
            Printer::Endpoints => vec![name, format_endpoints(item).into(), age],
            Printer::EndpointSlice => vec![
                name,
                text(item, "/addressType").into(),
                slice_ports(item).into(),
                slice_endpoints(item).into(),
                age,
            ],
            Printer::Node => node_cells(item, name, age),
            Printer::Namespace => vec![name, text(item, "/status/phase").into(), age],
            Printer::Event => event_cells(item, name, now),
            Printer::ConfigMap => vec![
                name,
                (len(item, "/data") + len(item, "/binaryData")).into(),
                age,
            ],
            Printer::Secret => vec![
                name,
                text(item, "/type").into(),
                len(item, "/data").into(),
                age,
            ],
            Printer::ServiceAccount => vec![name, len(item, "/secrets").into(), age],
            Printer::Lease => vec![name, text(item, "/spec/holderIdentity").into(), age],
            Printer::Default => vec![name, age],
        }
    }
}

// ---------------------------------------------------------------------------
// Field access

/// The string at `pointer`, `""` when absent.
fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The integer at `pointer`, 0 when absent.
fn int(v: &Value, pointer: &str) -> i64 {
    v.pointer(pointer)
        .and_then(Value::as_i64)
        .unwrap_or_default()
}

/// The number of entries of the array or map at `pointer`.
fn len(v: &Value, pointer: &str) -> i64 {
    let n = match v.pointer(pointer) {
        Some(Value::Array(a)) => a.len(),
        Some(Value::Object(o)) => o.len(),
        _ => 0,
    };
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The array at `pointer`, empty when absent.
fn list<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The timestamp at `pointer`, if present and readable.
fn time(v: &Value, pointer: &str) -> Option<Timestamp> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
}

/// Upstream's `translateTimestampSince`: the age of a timestamp, or
/// `<unknown>` when there is none.
fn since(t: Option<Timestamp>, now: Timestamp) -> String {
    match t {
        Some(t) => human_duration(now.duration_since(t)),
        None => "<unknown>".to_string(),
    }
}

fn age(v: &Value, pointer: &str, now: Timestamp) -> String {
    since(time(v, pointer), now)
}

/// `spec.replicas`, defaulted to 1 as the API server defaults it.
fn replicas(v: &Value) -> i64 {
    v.pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
}

/// Container names and images, each comma-joined.
fn container_cells(v: &Value, pointer: &str) -> (String, String) {
    let containers = list(v, pointer);
    let names: Vec<&str> = containers.iter().map(|c| text(c, "/name")).collect();
    let images: Vec<&str> = containers.iter().map(|c| text(c, "/image")).collect();
    (names.join(","), images.join(","))
}

/// A map of labels as `k=v,k2=v2` sorted by key, `<none>` when empty
/// (upstream's `labels.FormatLabels`).
fn format_labels(v: Option<&Value>) -> String {
    let pairs: BTreeSet<String> = v
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    if pairs.is_empty() {
        "<none>".to_string()
    } else {
        pairs.into_iter().collect::<Vec<_>>().join(",")
    }
}

/// Whether the pod condition `kind` is `True`.
fn pod_condition(pod: &Value, kind: &str) -> bool {
    list(pod, "/status/conditions")
        .iter()
        .find(|c| text(c, "/type") == kind)
        .is_some_and(|c| text(c, "/status") == "True")
}

// ---------------------------------------------------------------------------
// Pods

/// The later of two optional timestamps.
fn latest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// The reason of a terminated container state: its `reason`, else
/// `Signal:N` or `ExitCode:N`.
fn terminated_reason(terminated: &Value) -> String {
    let reason = text(terminated, "/reason");
    if !reason.is_empty() {
        return reason.to_string();
    }
    let signal = int(terminated, "/signal");
    if signal != 0 {
        format!("Signal:{signal}")
    } else {
        format!("ExitCode:{}", int(terminated, "/exitCode"))
    }
}

fn pod_cells(pod: &Value, now: Timestamp) -> Vec<Value> {
    let init_specs = list(pod, "/spec/initContainers");
    let is_sidecar = |name: &str| {
        init_specs
            .iter()
            .any(|c| text(c, "/name") == name && text(c, "/restartPolicy") == "Always")
    };
    let total = list(pod, "/spec/containers").len()
        + init_specs
            .iter()
            .filter(|c| text(c, "/restartPolicy") == "Always")
            .count();
    let mut ready = 0usize;
    let phase = text(pod, "/status/phase");
    let mut reason = match text(pod, "/status/reason") {
        "" => phase.to_string(),
        r => r.to_string(),
    };
    if list(pod, "/status/conditions")
        .iter()
        .any(|c| text(c, "/type") == "PodScheduled" && text(c, "/reason") == "SchedulingGated")
    {
        reason = "SchedulingGated".to_string();
    }

    let mut restarts = 0i64;
    let mut sidecar_restarts = 0i64;
    let mut last_restart: Option<Timestamp> = None;
    let mut last_sidecar_restart: Option<Timestamp> = None;
    let mut initializing = false;
    for (i, status) in list(pod, "/status/initContainerStatuses")
        .iter()
        .enumerate()
    {
        let count = int(status, "/restartCount");
        let finished = time(status, "/lastState/terminated/finishedAt");
        restarts += count;
        last_restart = latest(last_restart, finished);
        let sidecar = is_sidecar(text(status, "/name"));
        if sidecar {
            sidecar_restarts += count;
            last_sidecar_restart = latest(last_sidecar_restart, finished);
        }
        let terminated = status.pointer("/state/terminated").filter(|t| !t.is_null());
        let waiting_reason = text(status, "/state/waiting/reason");
        if terminated.is_some_and(|t| int(t, "/exitCode") == 0) {
            continue;
        }
        if sidecar && status.get("started").and_then(Value::as_bool) == Some(true) {
            if status.get("ready").and_then(Value::as_bool) == Some(true) {
                ready += 1;
            }
            continue;
        }
        reason = if let Some(t) = terminated {
            format!("Init:{}", terminated_reason(t))
        } else if !waiting_reason.is_empty() && waiting_reason != "PodInitializing" {
            format!("Init:{waiting_reason}")
        } else {
            format!("Init:{i}/{}", init_specs.len())
        };
        initializing = true;
        break;
    }

    if !initializing || pod_condition(pod, "Initialized") {
        restarts = sidecar_restarts;
        last_restart = last_sidecar_restart;
        let mut has_running = false;
        let mut error_reason = String::new();
        for status in list(pod, "/status/containerStatuses").iter().rev() {
            restarts += int(status, "/restartCount");
            last_restart = latest(
                last_restart,
                time(status, "/lastState/terminated/finishedAt"),
            );
            let waiting_reason = text(status, "/state/waiting/reason");
            let terminated = status.pointer("/state/terminated").filter(|t| !t.is_null());
            let running = status
                .pointer("/state/running")
                .is_some_and(|r| !r.is_null());
            if !waiting_reason.is_empty() {
                reason = waiting_reason.to_string();
            } else if let Some(t) = terminated {
                reason = terminated_reason(t);
                if int(t, "/exitCode") != 0 {
                    error_reason = reason.clone();
                }
            } else if status.get("ready").and_then(Value::as_bool) == Some(true) && running {
                has_running = true;
                ready += 1;
            }
        }
        if reason == "Completed" {
            if has_running && pod_condition(pod, "Ready") {
                reason = "Running".to_string();
            } else if !error_reason.is_empty() {
                reason = error_reason;
            } else if has_running {
                reason = "NotReady".to_string();
            }
        }
    }

    if pod
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|t| !t.is_null())
    {
        if text(pod, "/status/reason") == "NodeLost" {
            reason = "Unknown".to_string();
        } else if phase != "Failed" && phase != "Succeeded" {
            reason = "Terminating".to_string();
        }
    }

    let restarts_cell = match last_restart {
        Some(t) => format!("{restarts} ({} ago)", since(Some(t), now)),
        None => restarts.to_string(),
    };

    let or_none = |s: &str| {
        if s.is_empty() {
            "<none>".to_string()
        } else {
            s.to_string()
        }
    };
    let ip = match text(pod, "/status/podIPs/0/ip") {
        "" => text(pod, "/status/podIP"),
        ip => ip,
    };
    let gates = list(pod, "/spec/readinessGates");
    let readiness_gates = if gates.is_empty() {
        "<none>".to_string()
    } else {
        let conditions = list(pod, "/status/conditions");
        let true_gates = gates
            .iter()
            .filter(|g| {
                conditions
                    .iter()
                    .find(|c| text(c, "/type") == text(g, "/conditionType"))
                    .is_some_and(|c| text(c, "/status") == "True")
            })
            .count();
        format!("{true_gates}/{}", gates.len())
    };

    vec![
        text(pod, "/metadata/name").into(),
        format!("{ready}/{total}").into(),
        reason.into(),
        restarts_cell.into(),
        age(pod, "/metadata/creationTimestamp", now).into(),
        or_none(ip).into(),
        or_none(text(pod, "/spec/nodeName")).into(),
        or_none(text(pod, "/status/nominatedNodeName")).into(),
        readiness_gates.into(),
    ]
}

// ---------------------------------------------------------------------------
// Services and endpoints

fn service_cells(svc: &Value, name: Value, age: Value) -> Vec<Value> {
    // The API server defaults `type` to ClusterIP and `protocol` to TCP.
    let kind = match text(svc, "/spec/type") {
        "" => "ClusterIP",
        t => t,
    };
    let cluster_ip = match (
        text(svc, "/spec/clusterIPs/0"),
        text(svc, "/spec/clusterIP"),
    ) {
        ("", "") => "<none>",
        ("", ip) | (ip, _) => ip,
    };
    let external_ips: Vec<&str> = list(svc, "/spec/externalIPs")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let external = match kind {
        "ClusterIP" | "NodePort" if external_ips.is_empty() => "<none>".to_string(),
        "ClusterIP" | "NodePort" => external_ips.join(","),
        "LoadBalancer" => {
            // Server-side printing is wide: the ingress list is not clipped.
            let ingress: BTreeSet<&str> = list(svc, "/status/loadBalancer/ingress")
                .iter()
                .filter_map(|i| match (text(i, "/ip"), text(i, "/hostname")) {
                    ("", "") => None,
                    ("", host) => Some(host),
                    (ip, _) => Some(ip),
                })
                .collect();
            let mut all: Vec<&str> = ingress.into_iter().collect();
            all.extend(external_ips);
            if all.is_empty() {
                "<pending>".to_string()
            } else {
                all.join(",")
            }
        }
        "ExternalName" => text(svc, "/spec/externalName").to_string(),
        _ => "<unknown>".to_string(),
    };
    let ports: Vec<String> = list(svc, "/spec/ports")
        .iter()
        .map(|p| {
            let port = int(p, "/port");
            let protocol = match text(p, "/protocol") {
                "" => "TCP",
                proto => proto,
            };
            match int(p, "/nodePort") {
                n if n > 0 => format!("{port}:{n}/{protocol}"),
                _ => format!("{port}/{protocol}"),
            }
        })
        .collect();
    let ports = if ports.is_empty() {
        "<none>".to_string()
    } else {
        ports.join(",")
    };
    vec![
        name,
        kind.into(),
        cluster_ip.into(),
        external.into(),
        ports.into(),
        age,
        format_labels(svc.pointer("/spec/selector")).into(),
    ]
}

/// How many entries the list columns show before `+ N more...`.
const LIST_MAX: usize = 3;

/// Collects up to [`LIST_MAX`] entries and counts the rest.
#[derive(Default)]
struct Shortlist {
    shown: Vec<String>,
    count: usize,
}

impl Shortlist {
    fn push(&mut self, entry: impl FnOnce() -> String) {
        if self.shown.len() < LIST_MAX {
            self.shown.push(entry());
        }
        self.count += 1;
    }

    /// The entries comma-joined, with ` + N more...` when some were left
    /// out, or `empty` when there were none.
    fn finish(self, empty: &str) -> String {
        let joined = self.shown.join(",");
        if self.count > LIST_MAX {
            format!("{joined} + {} more...", self.count - LIST_MAX)
        } else if joined.is_empty() {
            empty.to_string()
        } else {
            joined
        }
    }
}

/// `ip:port` with IPv6 addresses bracketed, as Go's `net.JoinHostPort`.
fn join_host_port(host: &str, port: i64) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Upstream's `formatEndpoints`: every address (with each port) of every
/// subset, the first three shown.
fn format_endpoints(ep: &Value) -> String {
    let subsets = list(ep, "/subsets");
    if subsets.is_empty() {
        return "<none>".to_string();
    }
    let mut out = Shortlist::default();
    for subset in subsets {
        let addresses = list(subset, "/addresses");
        let ports = list(subset, "/ports");
        if ports.is_empty() {
            for address in addresses {
                out.push(|| text(address, "/ip").to_string());
            }
        } else {
            for port in ports {
                for address in addresses {
                    out.push(|| join_host_port(text(address, "/ip"), int(port, "/port")));
                }
            }
        }
    }
    // Subsets without addresses print as an empty cell, as upstream.
    out.finish("")
}

fn slice_ports(slice: &Value) -> String {
    let mut out = Shortlist::default();
    for port in list(slice, "/ports") {
        out.push(|| match port.get("port").and_then(Value::as_i64) {
            Some(n) => n.to_string(),
            None => match port.get("name").and_then(Value::as_str) {
                Some(name) => name.to_string(),
                None => "*".to_string(),
            },
        });
    }
    out.finish("<unset>")
}

fn slice_endpoints(slice: &Value) -> String {
    let mut out = Shortlist::default();
    for endpoint in list(slice, "/endpoints") {
        for address in list(endpoint, "/addresses") {
            out.push(|| address.as_str().unwrap_or_default().to_string());
        }
    }
    out.finish("<unset>")
}

// ---------------------------------------------------------------------------
// Nodes and events

fn node_cells(node: &Value, name: Value, age: Value) -> Vec<Value> {
    let mut status: Vec<&str> = match list(node, "/status/conditions")
        .iter()
        .rev()
        .find(|c| text(c, "/type") == "Ready")
    {
        Some(c) if text(c, "/status") == "True" => vec!["Ready"],
        Some(_) => vec!["NotReady"],
        None => vec!["Unknown"],
    };
    if node.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push("SchedulingDisabled");
    }
    let roles: BTreeSet<&str> = node
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(key, value)| {
            if let Some(role) = key.strip_prefix("node-role.kubernetes.io/") {
                Some(role).filter(|r| !r.is_empty())
            } else if key == "kubernetes.io/role" {
                value.as_str().filter(|r| !r.is_empty())
            } else {
                None
            }
        })
        .collect();
    let roles = if roles.is_empty() {
        "<none>".to_string()
    } else {
        roles.into_iter().collect::<Vec<_>>().join(",")
    };
    let address = |kind: &str| {
        list(node, "/status/addresses")
            .iter()
            .find(|a| text(a, "/type") == kind)
            .map(|a| text(a, "/address"))
            .unwrap_or("<none>")
            .to_string()
    };
    let unknown = |pointer: &str| match text(node, pointer) {
        "" => "<unknown>".to_string(),
        s => s.to_string(),
    };
    vec![
        name,
        status.join(",").into(),
        roles.into(),
        age,
        text(node, "/status/nodeInfo/kubeletVersion").into(),
        address("InternalIP").into(),
        address("ExternalIP").into(),
        unknown("/status/nodeInfo/osImage").into(),
        unknown("/status/nodeInfo/kernelVersion").into(),
        unknown("/status/nodeInfo/containerRuntimeVersion").into(),
    ]
}

fn event_cells(event: &Value, name: Value, now: Timestamp) -> Vec<Value> {
    let first_seen = match time(event, "/firstTimestamp") {
        Some(t) => since(Some(t), now),
        None => age(event, "/eventTime", now),
    };
    let mut last_seen = match time(event, "/lastTimestamp") {
        Some(t) => since(Some(t), now),
        None => first_seen.clone(),
    };
    let mut count = int(event, "/count");
    if event.get("series").is_some_and(|s| !s.is_null()) {
        last_seen = age(event, "/series/lastObservedTime", now);
        count = int(event, "/series/count");
    } else if count == 0 {
        // Singleton events of the new API have no count.
        count = 1;
    }
    let kind = text(event, "/involvedObject/kind").to_lowercase();
    let target = match text(event, "/involvedObject/name") {
        "" => kind,
        object => format!("{kind}/{object}"),
    };
    let component = match text(event, "/source/component") {
        "" => text(event, "/reportingComponent"),
        c => c,
    };
    let host = match text(event, "/source/host") {
        "" => text(event, "/reportingInstance"),
        h => h,
    };
    let source = if host.is_empty() {
        component.to_string()
    } else {
        format!("{component}, {host}")
    };
    vec![
        last_seen.into(),
        text(event, "/type").into(),
        text(event, "/reason").into(),
        target.into(),
        text(event, "/involvedObject/fieldPath").into(),
        source.into(),
        text(event, "/message").trim().into(),
        first_seen.into(),
        count.into(),
        name,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_common::registry::find_kind;

    const NOW: &str = "2024-05-01T12:00:00Z";

    fn now() -> Timestamp {
        NOW.parse().expect("valid test timestamp")
    }

    /// The timestamp `secs` seconds before [`NOW`], as RFC 3339.
    fn ago(secs: i64) -> String {
        (now() - SignedDuration::from_secs(secs)).to_string()
    }

    fn info(api_version: &str, kind: &str) -> &'static ResourceInfo {
        find_kind(api_version, kind).unwrap_or_else(|| panic!("{api_version} {kind} is served"))
    }

    /// The cells of the single row of a Table of `item`.
    fn cells(api_version: &str, kind: &str, item: Value) -> Vec<Value> {
        let t = table(
            info(api_version, kind),
            &[item],
            IncludeObject::None,
            "meta.k8s.io/v1",
            now(),
        );
        let columns = t["columnDefinitions"]
            .as_array()
            .expect("columnDefinitions is an array")
            .len();
        let cells = t["rows"][0]["cells"]
            .as_array()
            .expect("row has cells")
            .clone();
        assert_eq!(cells.len(), columns, "one cell per column for {kind}");
        cells
    }

    #[test]
    fn human_duration_follows_upstream() {
        let cases: &[(i64, &str)] = &[
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (59, "59s"),
            (119, "119s"),
            (120, "2m"),
            (123, "2m3s"),
            (9 * 60 + 59, "9m59s"),
            (10 * 60 + 30, "10m"),
            (179 * 60, "179m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 5 * 60, "3h5m"),
            (8 * 3600 + 59 * 60, "8h"),
            (47 * 3600, "47h"),
            (48 * 3600, "2d"),
            (2 * 86400 + 3 * 3600, "2d3h"),
            (7 * 86400 + 23 * 3600, "7d23h"),
            (45 * 86400, "45d"),
            (729 * 86400, "729d"),
            (730 * 86400, "2y"),
            (740 * 86400, "2y10d"),
            (8 * 365 * 86400 + 100 * 86400, "8y"),
        ];
        for (secs, want) in cases {
            assert_eq!(
                human_duration(SignedDuration::from_secs(*secs)),
                *want,
                "{secs}s"
            );
        }
    }

    #[test]
    fn wants_table_reads_kubectl_accept_headers() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
                Some("meta.k8s.io/v1"),
            ),
            (
                "application/json;as=Table;v=v1beta1;g=meta.k8s.io, application/json",
                Some("meta.k8s.io/v1beta1"),
            ),
            ("application/json", None),
            ("*/*", None),
            ("", None),
            (
                "application/json, application/json;as=Table;v=v1;g=meta.k8s.io",
                None,
            ),
            (
                "application/json;q=0.5, application/json;as=Table;v=v1;g=meta.k8s.io",
                Some("meta.k8s.io/v1"),
            ),
            (
                "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io,application/json",
                None,
            ),
            (
                "application/json;as=Table;v=v2;g=meta.k8s.io,application/json;as=Table;v=v1;g=meta.k8s.io",
                Some("meta.k8s.io/v1"),
            ),
        ];
        for (accept, want) in cases {
            assert_eq!(wants_table(accept), *want, "{accept}");
        }
    }

    #[test]
    fn include_object_parses_with_upstream_default() {
        assert_eq!(IncludeObject::parse(None), IncludeObject::Metadata);
        assert_eq!(IncludeObject::parse(Some("None")), IncludeObject::None);
        assert_eq!(IncludeObject::parse(Some("Object")), IncludeObject::Object);
        assert_eq!(
            IncludeObject::parse(Some("Metadata")),
            IncludeObject::Metadata
        );
    }

    #[test]
    fn table_shape_and_row_objects() {
        let pod = json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": "web", "namespace": "default", "uid": "u1",
                         "resourceVersion": "7", "creationTimestamp": ago(300)},
            "spec": {"containers": [{"name": "c", "image": "nginx"}]},
            "status": {"phase": "Pending"},
        });
        let pods = info("v1", "Pod");
        let t = table(
            pods,
            std::slice::from_ref(&pod),
            IncludeObject::Metadata,
            "meta.k8s.io/v1",
            now(),
        );
        assert_eq!(t["kind"], "Table");
        assert_eq!(t["apiVersion"], "meta.k8s.io/v1");
        assert_eq!(t["metadata"], json!({}));
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .expect("columns")
            .iter()
            .map(|c| c["name"].as_str().expect("column name"))
            .collect();
        assert_eq!(
            names,
            [
                "Name",
                "Ready",
                "Status",
                "Restarts",
                "Age",
                "IP",
                "Node",
                "Nominated Node",
                "Readiness Gates"
            ]
        );
        let first = &t["columnDefinitions"][0];
        assert_eq!(first["format"], "name");
        assert_eq!(first["priority"], 0);
        assert!(
            first["description"]
                .as_str()
                .expect("description")
                .starts_with("Name must be unique within a namespace"),
            "description from the ObjectMeta schema: {first}"
        );
        assert_eq!(t["columnDefinitions"][5]["priority"], 1);
        assert!(
            t["columnDefinitions"][5]["description"]
                .as_str()
                .expect("description")
                .contains("IP address"),
            "podIP description"
        );
        assert_eq!(
            t["rows"][0]["object"],
            json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": pod["metadata"],
            })
        );

        let t = table(
            pods,
            std::slice::from_ref(&pod),
            IncludeObject::Object,
            "meta.k8s.io/v1beta1",
            now(),
        );
        assert_eq!(t["apiVersion"], "meta.k8s.io/v1beta1");
        assert_eq!(t["rows"][0]["object"], pod);

        let t = table(pods, &[pod], IncludeObject::None, "meta.k8s.io/v1", now());
        assert!(t["rows"][0].get("object").is_none());

        let t = table(pods, &[], IncludeObject::Metadata, "meta.k8s.io/v1", now());
        assert_eq!(t["rows"], json!([]));
    }

    #[test]
    fn pod_cells_follow_upstream() {
        let running = json!({
            "metadata": {"name": "web-1", "creationTimestamp": ago(3 * 3600 + 300)},
            "spec": {"nodeName": "node-a", "containers": [{"name": "a"}, {"name": "b"}]},
            "status": {
                "phase": "Running",
                "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}],
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [
                    {"name": "a", "ready": true, "restartCount": 1,
                     "state": {"running": {"startedAt": ago(300)}},
                     "lastState": {"terminated": {"exitCode": 1, "finishedAt": ago(300)}}},
                    {"name": "b", "ready": true, "restartCount": 0,
                     "state": {"running": {"startedAt": ago(3600)}}},
                ],
            },
        });
        let pending = json!({
            "metadata": {"name": "new", "creationTimestamp": ago(5)},
            "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Pending"},
        });
        let creating = json!({
            "metadata": {"name": "creating", "creationTimestamp": ago(30)},
            "spec": {"nodeName": "node-a", "containers": [{"name": "a"}]},
            "status": {"phase": "Pending", "containerStatuses": [
                {"name": "a", "ready": false, "restartCount": 0,
                 "state": {"waiting": {"reason": "ContainerCreating"}}}]},
        });
        let terminating = json!({
            "metadata": {"name": "old", "creationTimestamp": ago(86400 * 3),
                         "deletionTimestamp": ago(-30)},
            "spec": {"nodeName": "node-a", "containers": [{"name": "a"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.9"}],
                       "containerStatuses": [{"name": "a", "ready": true, "restartCount": 0,
                                              "state": {"running": {}}}]},
        });
        let crashing = json!({
            "metadata": {"name": "crash", "creationTimestamp": ago(600)},
            "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "a", "ready": false, "restartCount": 5,
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                 "lastState": {"terminated": {"exitCode": 2, "reason": "Error",
                                              "finishedAt": ago(45)}}}]},
        });
        let completed = json!({
            "metadata": {"name": "job", "creationTimestamp": ago(600)},
            "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Succeeded", "containerStatuses": [
                {"name": "a", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]},
        });
        let init = json!({
            "metadata": {"name": "init", "creationTimestamp": ago(60)},
            "spec": {"initContainers": [{"name": "i1"}, {"name": "i2"}],
                     "containers": [{"name": "a"}],
                     "readinessGates": [{"conditionType": "example.com/gate"}]},
            "status": {"phase": "Pending",
                       "conditions": [{"type": "example.com/gate", "status": "False"}],
                       "initContainerStatuses": [
                {"name": "i1", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
                {"name": "i2", "ready": false, "restartCount": 0,
                 "state": {"running": {}}}]},
        });
        let init_failed = json!({
            "metadata": {"name": "init-failed", "creationTimestamp": ago(60)},
            "spec": {"initContainers": [{"name": "i1"}], "containers": [{"name": "a"}]},
            "status": {"phase": "Pending", "initContainerStatuses": [
                {"name": "i1", "ready": false, "restartCount": 3,
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]},
        });
        let sidecar = json!({
            "metadata": {"name": "sidecar", "creationTimestamp": ago(60)},
            "spec": {"initContainers": [{"name": "proxy", "restartPolicy": "Always"}],
                     "containers": [{"name": "a"}]},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Initialized", "status": "True"}],
                       "initContainerStatuses": [
                {"name": "proxy", "ready": true, "started": true, "restartCount": 0,
                 "state": {"running": {}}}],
                       "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {}}}]},
        });
        let cases: Vec<(Value, Value)> = vec![
            (
                running,
                json!([
                    "web-1",
                    "2/2",
                    "Running",
                    "1 (5m ago)",
                    "3h5m",
                    "10.0.0.5",
                    "node-a",
                    "<none>",
                    "<none>"
                ]),
            ),
            (
                pending,
                json!([
                    "new", "0/1", "Pending", "0", "5s", "<none>", "<none>", "<none>", "<none>"
                ]),
            ),
            (
                creating,
                json!([
                    "creating",
                    "0/1",
                    "ContainerCreating",
                    "0",
                    "30s",
                    "<none>",
                    "node-a",
                    "<none>",
                    "<none>"
                ]),
            ),
            (
                terminating,
                json!([
                    "old",
                    "1/1",
                    "Terminating",
                    "0",
                    "3d",
                    "10.0.0.9",
                    "node-a",
                    "<none>",
                    "<none>"
                ]),
            ),
            (
                crashing,
                json!([
                    "crash",
                    "0/1",
                    "CrashLoopBackOff",
                    "5 (45s ago)",
                    "10m",
                    "<none>",
                    "<none>",
                    "<none>",
                    "<none>"
                ]),
            ),
            (
                completed,
                json!([
                    "job",
                    "0/1",
                    "Completed",
                    "0",
                    "10m",
                    "<none>",
                    "<none>",
                    "<none>",
                    "<none>"
                ]),
            ),
            (
                init,
                json!([
                    "init", "0/1", "Init:1/2", "0", "60s", "<none>", "<none>", "<none>", "0/1"
                ]),
            ),
            (
                init_failed,
                json!([
                    "init-failed",
                    "0/1",
                    "Init:CrashLoopBackOff",
                    "3",
                    "60s",
                    "<none>",
                    "<none>",
                    "<none>",
                    "<none>"
                ]),
            ),
            (
                sidecar,
                json!([
                    "sidecar", "2/2", "Running", "0", "60s", "<none>", "<none>", "<none>", "<none>"
                ]),
            ),
        ];
        for (pod, want) in cases {
            let name = pod["metadata"]["name"].clone();
            assert_eq!(Value::Array(cells("v1", "Pod", pod)), want, "pod {name}");
        }
    }

    #[test]
    fn finished_pods_carry_a_completed_row_condition() {
        let pod = json!({
            "metadata": {"name": "job"},
            "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Failed"},
        });
        let t = table(
            info("v1", "Pod"),
            &[pod],
            IncludeObject::None,
            "meta.k8s.io/v1",
            now(),
        );
        assert_eq!(t["rows"][0]["conditions"][0]["type"], "Completed");
        assert_eq!(t["rows"][0]["conditions"][0]["reason"], "Failed");
        assert_eq!(
            t["rows"][0]["cells"][4], "<unknown>",
            "no creationTimestamp"
        );
    }

    #[test]
    fn workload_cells_follow_upstream() {
        let deployment = json!({
            "metadata": {"name": "web", "creationTimestamp": ago(2 * 86400 + 3 * 3600)},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"},
                             "matchExpressions": [{"key": "tier", "operator": "In",
                                                   "values": ["b", "a"]}]},
                "template": {"spec": {"containers": [
                    {"name": "nginx", "image": "nginx:1.27"},
                    {"name": "log", "image": "busybox"}]}},
            },
            "status": {"replicas": 3, "readyReplicas": 2, "updatedReplicas": 3,
                       "availableReplicas": 2},
        });
        assert_eq!(
            Value::Array(cells("apps/v1", "Deployment", deployment)),
            json!([
                "web",
                "2/3",
                3,
                2,
                "2d3h",
                "nginx,log",
                "nginx:1.27,busybox",
                "app=web,tier in (a,b)"
            ])
        );
        let replicaset = json!({
            "metadata": {"name": "web-abc", "creationTimestamp": ago(45 * 86400)},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}},
            "status": {"replicas": 2, "readyReplicas": 1},
        });
        assert_eq!(
            Value::Array(cells("apps/v1", "ReplicaSet", replicaset)),
            json!(["web-abc", 2, 2, 1, "45d", "nginx", "nginx", "app=web"])
        );
    }

    #[test]
    fn service_cells_follow_upstream() {
        let svc = |spec: Value, status: Value| {
            json!({"metadata": {"name": "svc", "creationTimestamp": ago(90)},
                   "spec": spec, "status": status})
        };
        let cases: Vec<(Value, Value)> = vec![
            (
                svc(
                    json!({"type": "NodePort", "clusterIP": "10.96.0.10",
                           "clusterIPs": ["10.96.0.10"], "selector": {"app": "web", "a": "b"},
                           "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"},
                                     {"port": 443, "protocol": "TCP"}]}),
                    json!({}),
                ),
                json!([
                    "svc",
                    "NodePort",
                    "10.96.0.10",
                    "<none>",
                    "80:30080/TCP,443/TCP",
                    "90s",
                    "a=b,app=web"
                ]),
            ),
            (
                svc(
                    json!({"type": "LoadBalancer", "clusterIPs": ["10.96.0.11"],
                           "ports": [{"port": 80, "nodePort": 31000, "protocol": "TCP"}]}),
                    json!({"loadBalancer": {}}),
                ),
                json!([
                    "svc",
                    "LoadBalancer",
                    "10.96.0.11",
                    "<pending>",
                    "80:31000/TCP",
                    "90s",
                    "<none>"
                ]),
            ),
            (
                svc(
                    json!({"type": "LoadBalancer", "clusterIPs": ["10.96.0.11"],
                           "externalIPs": ["192.0.2.9"],
                           "ports": [{"port": 53, "nodePort": 31000, "protocol": "UDP"}]}),
                    json!({"loadBalancer": {"ingress": [
                        {"hostname": "lb.example.com"}, {"ip": "203.0.113.7"}]}}),
                ),
                json!([
                    "svc",
                    "LoadBalancer",
                    "10.96.0.11",
                    "203.0.113.7,lb.example.com,192.0.2.9",
                    "53:31000/UDP",
                    "90s",
                    "<none>"
                ]),
            ),
            (
                svc(
                    json!({"clusterIP": "None", "clusterIPs": ["None"],
                           "selector": {"app": "db"}, "ports": [{"port": 5432}]}),
                    json!({}),
                ),
                json!([
                    "svc",
                    "ClusterIP",
                    "None",
                    "<none>",
                    "5432/TCP",
                    "90s",
                    "app=db"
                ]),
            ),
            (
                svc(
                    json!({"type": "ExternalName", "externalName": "db.example.com"}),
                    json!({}),
                ),
                json!([
                    "svc",
                    "ExternalName",
                    "<none>",
                    "db.example.com",
                    "<none>",
                    "90s",
                    "<none>"
                ]),
            ),
            (
                svc(
                    json!({"type": "ClusterIP", "clusterIP": "10.96.0.12",
                           "externalIPs": ["192.0.2.1", "192.0.2.2"],
                           "ports": [{"port": 8080, "protocol": "TCP"}]}),
                    json!({}),
                ),
                json!([
                    "svc",
                    "ClusterIP",
                    "10.96.0.12",
                    "192.0.2.1,192.0.2.2",
                    "8080/TCP",
                    "90s",
                    "<none>"
                ]),
            ),
        ];
        for (i, (svc, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                Value::Array(cells("v1", "Service", svc)),
                want,
                "service case {i}"
            );
        }
    }

    #[test]
    fn endpoints_cells_follow_upstream() {
        let ep = json!({
            "metadata": {"name": "web", "creationTimestamp": ago(60)},
            "subsets": [
                {"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}],
                 "ports": [{"name": "http", "port": 80}, {"name": "https", "port": 443}]},
                {"addresses": [{"ip": "fd00::1"}], "ports": [{"port": 8080}]},
            ],
        });
        assert_eq!(
            Value::Array(cells("v1", "Endpoints", ep)),
            json!([
                "web",
                "10.0.0.1:80,10.0.0.2:80,10.0.0.1:443 + 2 more...",
                "60s"
            ])
        );
        let cases: Vec<(Value, &str)> = vec![
            (json!([]), "<none>"),
            (
                json!([{"addresses": [{"ip": "fd00::1"}], "ports": [{"port": 53}]}]),
                "[fd00::1]:53",
            ),
            (
                json!([{"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}]}]),
                "10.0.0.1,10.0.0.2",
            ),
            (
                json!([{"notReadyAddresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}]),
                "",
            ),
        ];
        for (subsets, want) in cases {
            let ep = json!({"metadata": {"name": "e"}, "subsets": subsets});
            assert_eq!(cells("v1", "Endpoints", ep)[1], want, "subsets {subsets}");
        }
    }

    #[test]
    fn endpointslice_cells_follow_upstream() {
        let slice = json!({
            "metadata": {"name": "web-x1", "creationTimestamp": ago(60)},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 80}, {"name": "named"}, {}],
            "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]},
                          {"addresses": ["10.0.0.3"]}, {"addresses": ["10.0.0.4"]}],
        });
        assert_eq!(
            Value::Array(cells("discovery.k8s.io/v1", "EndpointSlice", slice)),
            json!([
                "web-x1",
                "IPv4",
                "80,named,*",
                "10.0.0.1,10.0.0.2,10.0.0.3 + 1 more...",
                "60s"
            ])
        );
        let empty = json!({"metadata": {"name": "e"}, "addressType": "IPv6"});
        let got = cells("discovery.k8s.io/v1", "EndpointSlice", empty);
        assert_eq!(got[2], "<unset>");
        assert_eq!(got[3], "<unset>");
    }

    #[test]
    fn node_cells_follow_upstream() {
        let node = json!({
            "metadata": {"name": "node-a", "creationTimestamp": ago(10 * 86400),
                         "labels": {"node-role.kubernetes.io/control-plane": "",
                                    "kubernetes.io/hostname": "node-a"}},
            "spec": {},
            "status": {
                "conditions": [{"type": "MemoryPressure", "status": "False"},
                               {"type": "Ready", "status": "True"}],
                "addresses": [{"type": "Hostname", "address": "node-a"},
                              {"type": "InternalIP", "address": "192.168.1.10"}],
                "nodeInfo": {"kubeletVersion": "v1.37.0", "osImage": "Debian GNU/Linux 13",
                             "kernelVersion": "6.12.0", "containerRuntimeVersion": "skiff://0.1.0"},
            },
        });
        assert_eq!(
            Value::Array(cells("v1", "Node", node)),
            json!([
                "node-a",
                "Ready",
                "control-plane",
                "10d",
                "v1.37.0",
                "192.168.1.10",
                "<none>",
                "Debian GNU/Linux 13",
                "6.12.0",
                "skiff://0.1.0"
            ])
        );
        let cordoned = json!({
            "metadata": {"name": "node-b", "labels": {"kubernetes.io/role": "worker",
                                                      "node-role.kubernetes.io/infra": ""}},
            "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]},
        });
        assert_eq!(
            Value::Array(cells("v1", "Node", cordoned)),
            json!([
                "node-b",
                "NotReady,SchedulingDisabled",
                "infra,worker",
                "<unknown>",
                "",
                "<none>",
                "<none>",
                "<unknown>",
                "<unknown>",
                "<unknown>"
            ])
        );
        let fresh = json!({"metadata": {"name": "node-c"}});
        let got = cells("v1", "Node", fresh);
        assert_eq!(got[1], "Unknown");
        assert_eq!(got[2], "<none>");
    }

    #[test]
    fn event_cells_follow_upstream() {
        let event = json!({
            "metadata": {"name": "web-1.17a", "creationTimestamp": ago(600)},
            "involvedObject": {"kind": "Pod", "name": "web-1", "fieldPath": "spec.containers{a}"},
            "reason": "BackOff", "type": "Warning",
            "message": "Back-off restarting failed container\n",
            "source": {"component": "kubelet", "host": "node-a"},
            "firstTimestamp": ago(600), "lastTimestamp": ago(30), "count": 4,
        });
        assert_eq!(
            Value::Array(cells("v1", "Event", event)),
            json!([
                "30s",
                "Warning",
                "BackOff",
                "pod/web-1",
                "spec.containers{a}",
                "kubelet, node-a",
                "Back-off restarting failed container",
                "10m",
                4,
                "web-1.17a"
            ])
        );
        let new_api = json!({
            "metadata": {"name": "n"},
            "involvedObject": {"kind": "Deployment", "name": "web"},
            "reason": "ScalingReplicaSet", "type": "Normal", "message": "Scaled up",
            "eventTime": "2024-05-01T11:58:59.999999Z",
            "reportingComponent": "deployment-controller",
        });
        assert_eq!(
            Value::Array(cells("v1", "Event", new_api)),
            json!([
                "60s",
                "Normal",
                "ScalingReplicaSet",
                "deployment/web",
                "",
                "deployment-controller",
                "Scaled up",
                "60s",
                1,
                "n"
            ])
        );
        let columns = table(
            info("v1", "Event"),
            &[],
            IncludeObject::None,
            "meta.k8s.io/v1",
            now(),
        );
        let narrow: Vec<&str> = columns["columnDefinitions"]
            .as_array()
            .expect("columns")
            .iter()
            .filter(|c| c["priority"] == 0)
            .map(|c| c["name"].as_str().expect("name"))
            .collect();
        assert_eq!(narrow, ["Last Seen", "Type", "Reason", "Object", "Message"]);
    }

    #[test]
    fn small_kinds_follow_upstream() {
        let cases: Vec<(&str, &str, Value, Value)> = vec![
            (
                "v1",
                "Namespace",
                json!({"metadata": {"name": "default", "creationTimestamp": ago(100)},
                    "status": {"phase": "Active"}}),
                json!(["default", "Active", "100s"]),
            ),
            (
                "v1",
                "ConfigMap",
                json!({"metadata": {"name": "cfg", "creationTimestamp": ago(100)},
                    "data": {"a": "1", "b": "2"}, "binaryData": {"c": "AA=="}}),
                json!(["cfg", 3, "100s"]),
            ),
            (
                "v1",
                "Secret",
                json!({"metadata": {"name": "tls", "creationTimestamp": ago(100)},
                    "type": "kubernetes.io/tls", "data": {"tls.crt": "", "tls.key": ""}}),
                json!(["tls", "kubernetes.io/tls", 2, "100s"]),
            ),
            (
                "v1",
                "ServiceAccount",
                json!({"metadata": {"name": "default", "creationTimestamp": ago(100)}}),
                json!(["default", 0, "100s"]),
            ),
            (
                "coordination.k8s.io/v1",
                "Lease",
                json!({"metadata": {"name": "kube-scheduler", "creationTimestamp": ago(100)},
                    "spec": {"holderIdentity": "node-a_1234"}}),
                json!(["kube-scheduler", "node-a_1234", "100s"]),
            ),
        ];
        for (api_version, kind, item, want) in cases {
            assert_eq!(Value::Array(cells(api_version, kind, item)), want, "{kind}");
        }
    }

    #[test]
    fn unknown_kinds_print_name_and_age() {
        let other = ResourceInfo {
            group: "example.com",
            version: "v1",
            kind: "Widget",
            plural: "widgets",
            singular: "widget",
            namespaced: true,
            short_names: &[],
            categories: &[],
            subresources: &[],
            has_spec: true,
        };
        let item = json!({"metadata": {"name": "w", "creationTimestamp": ago(7200)}});
        let t = table(
            &other,
            &[item],
            IncludeObject::None,
            "meta.k8s.io/v1",
            now(),
        );
        assert_eq!(t["rows"][0]["cells"], json!(["w", "120m"]));
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .expect("columns")
            .iter()
            .map(|c| c["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, ["Name", "Age"]);
    }

    #[test]
    fn every_served_kind_has_described_columns() {
        for info in skiff_common::registry::RESOURCES {
            let t = table(info, &[], IncludeObject::None, "meta.k8s.io/v1", now());
            for column in t["columnDefinitions"].as_array().expect("columns") {
                assert!(
                    !column["description"]
                        .as_str()
                        .expect("description")
                        .is_empty(),
                    "{} column {} has a description",
                    info.kind,
                    column["name"]
                );
            }
        }
    }
}
