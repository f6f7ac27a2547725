//! OpenAPI v3 documents (`/openapi/v3`), generated at start-up from the
//! k8s-openapi types' `schemars` schemas for every group-version in
//! [`crate::registry`], plus the unknown-field check that server-side
//! field validation (`fieldValidation=Strict|Warn`) runs against them.
//!
//! The documents follow upstream's shape closely enough for kubectl:
//! `kubectl apply --validate=strict` looks for a PATCH operation carrying
//! the kind's `x-kubernetes-group-version-kind` with a `fieldValidation`
//! parameter (cli-runtime query_param_verifier_v3.go), and `kubectl explain`
//! finds the kind's schema in `components.schemas` by the same extension.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::{apps, autoscaling, batch, coordination, core, discovery};
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha512};

use crate::patch::{self, ListStrategy};
use skiff_common::registry::{self, ResourceInfo, Subresource};

/// Where the documents' schemas live, as `$ref` prefixes.
const SCHEMA_REF: &str = "#/components/schemas/";

/// A Rust type with a schema and a group-version-kind.
struct KnownType {
    api_version: &'static str,
    kind: &'static str,
    name: fn() -> Cow<'static, str>,
    generate: fn(&mut SchemaGenerator) -> Schema,
}

fn known<T: k8s_openapi::Resource + JsonSchema>() -> KnownType {
    KnownType {
        api_version: T::API_VERSION,
        kind: T::KIND,
        name: T::schema_name,
        generate: SchemaGenerator::subschema_for::<T>,
    }
}

/// The catalogue of k8s-openapi types a served kind can be backed by:
/// Rust needs a type to generate a schema from, so this maps
/// `apiVersion`/`kind` (taken from each type's own `Resource` impl) to it.
/// Which kinds are served is decided by the registry alone.
fn known_types() -> Vec<KnownType> {
    vec![
        known::<core::v1::Binding>(),
        known::<k8s_openapi::api::authentication::v1::TokenRequest>(),
        known::<core::v1::ConfigMap>(),
        known::<core::v1::Endpoints>(),
        known::<core::v1::Event>(),
        known::<core::v1::LimitRange>(),
        known::<core::v1::Namespace>(),
        known::<core::v1::Node>(),
        known::<core::v1::PersistentVolume>(),
        known::<core::v1::PersistentVolumeClaim>(),
        known::<core::v1::Pod>(),
        known::<core::v1::PodTemplate>(),
        known::<core::v1::ReplicationController>(),
        known::<core::v1::ResourceQuota>(),
        known::<core::v1::Secret>(),
        known::<core::v1::Service>(),
        known::<core::v1::ServiceAccount>(),
        known::<apps::v1::ControllerRevision>(),
        known::<apps::v1::DaemonSet>(),
        known::<apps::v1::Deployment>(),
        known::<apps::v1::ReplicaSet>(),
        known::<apps::v1::StatefulSet>(),
        known::<autoscaling::v1::Scale>(),
        known::<batch::v1::Job>(),
        known::<batch::v1::CronJob>(),
        known::<coordination::v1::Lease>(),
        known::<discovery::v1::EndpointSlice>(),
    ]
}

fn find_known<'a>(types: &'a [KnownType], api_version: &str, kind: &str) -> Option<&'a KnownType> {
    types
        .iter()
        .find(|t| t.api_version == api_version && t.kind == kind)
}

/// The schema name of a served kind: `(apiVersion, kind, schema name)`.
type KindSchema = (String, &'static str, String);

/// One served group-version document.
struct Document {
    /// `api/v1` or `apis/<group>/<version>`.
    gv_path: String,
    bytes: Vec<u8>,
    /// Upper-case hex SHA-512 of `bytes`, as upstream's `?hash=`.
    hash: String,
}

/// The OpenAPI v3 index and documents, serialized once at start-up, and
/// the schemas used for unknown-field checks.
pub struct OpenApi {
    index: Vec<u8>,
    documents: Vec<Document>,
    /// Every component schema of every document, by upstream name.
    schemas: Map<String, Value>,
    /// The schema name of each served kind, by `(apiVersion, kind)`.
    kind_schemas: Vec<KindSchema>,
}

impl std::fmt::Debug for OpenApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenApi")
            .field("documents", &self.documents.len())
            .field("schemas", &self.schemas.len())
            .finish_non_exhaustive()
    }
}

/// The `group/version` path of a document, e.g. `apis/apps/v1`.
fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// Upstream's operation-id infix for a group-version: `CoreV1`,
/// `AppsV1`, `DiscoveryV1`, `RbacAuthorizationV1`.
fn op_infix(group: &str, version: &str) -> String {
    let group = if group.is_empty() { "core" } else { group };
    let group = group.strip_suffix(".k8s.io").unwrap_or(group);
    let mut out: String = group.split('.').map(capitalize).collect();
    out.push_str(&capitalize(version));
    out
}

/// Upstream's operation tag for a group-version: `core_v1`, `apps_v1`,
/// `rbacAuthorization_v1`.
fn tag(group: &str, version: &str) -> String {
    let group = if group.is_empty() { "core" } else { group };
    let group = group.strip_suffix(".k8s.io").unwrap_or(group);
    let mut parts = group.split('.');
    let mut out = parts.next().unwrap_or_default().to_string();
    out.extend(parts.map(capitalize));
    format!("{out}_{version}")
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("{SCHEMA_REF}{name}") })
}

fn gvk(group: &str, version: &str, kind: &str) -> Value {
    json!({ "group": group, "kind": kind, "version": version })
}

/// A query parameter by name, with its type and a short description.
fn query_param(name: &str) -> Value {
    let (ty, description) = match name {
        "allowWatchBookmarks" => (
            "boolean",
            "ask for BOOKMARK watch events; servers may ignore the request",
        ),
        "continue" => (
            "string",
            "the continue token of a previous paginated list call",
        ),
        "dryRun" => (
            "string",
            "when present, the modification is not persisted; the only valid value is All",
        ),
        "fieldManager" => (
            "string",
            "the name of the actor making the change, recorded in managedFields",
        ),
        "fieldSelector" => ("string", "restrict the returned objects by their fields"),
        "fieldValidation" => (
            "string",
            "how to treat unknown or duplicate fields in the request body: Ignore drops them silently, Warn drops them with a warning per field, Strict fails the request",
        ),
        "force" => (
            "boolean",
            "force an apply request, taking ownership of conflicting fields; only for apply patches",
        ),
        "gracePeriodSeconds" => (
            "integer",
            "seconds before the object is deleted; zero deletes immediately",
        ),
        "ignoreStoreReadErrorWithClusterBreakingPotential" => (
            "boolean",
            "delete an object that cannot be read from storage; may break the cluster",
        ),
        "labelSelector" => ("string", "restrict the returned objects by their labels"),
        "limit" => (
            "integer",
            "the maximum number of objects to return in a list call",
        ),
        "orphanDependents" => (
            "boolean",
            "deprecated: use propagationPolicy; whether dependents are orphaned",
        ),
        "pretty" => ("string", "pretty-print the output when 'true'"),
        "propagationPolicy" => (
            "string",
            "how garbage collection treats dependents: Orphan, Background or Foreground",
        ),
        "resourceVersion" => (
            "string",
            "which resource version a read or watch may be served from",
        ),
        "resourceVersionMatch" => (
            "string",
            "how resourceVersion applies to a list call: Exact or NotOlderThan",
        ),
        "sendInitialEvents" => (
            "boolean",
            "with watch, start with synthetic events for the current state, then a bookmark",
        ),
        "timeoutSeconds" => ("integer", "a timeout for a list or watch call"),
        "watch" => (
            "boolean",
            "watch for changes to the described resources instead of listing them",
        ),
        other => ("string", other),
    };
    let mut schema = json!({ "type": ty });
    if ty == "string" {
        schema["uniqueItems"] = json!(true);
    }
    json!({ "name": name, "in": "query", "description": description, "schema": schema })
}

fn query_params(names: &[&str]) -> Vec<Value> {
    names.iter().map(|n| query_param(n)).collect()
}

fn path_param(name: &str, description: &str) -> Value {
    json!({
        "name": name,
        "in": "path",
        "description": description,
        "required": true,
        "schema": { "type": "string", "uniqueItems": true },
    })
}

const LIST_PARAMS: &[&str] = &[
    "allowWatchBookmarks",
    "continue",
    "fieldSelector",
    "labelSelector",
    "limit",
    "resourceVersion",
    "resourceVersionMatch",
    "sendInitialEvents",
    "timeoutSeconds",
    "watch",
];
const WRITE_PARAMS: &[&str] = &["dryRun", "fieldManager", "fieldValidation"];
const PATCH_PARAMS: &[&str] = &["dryRun", "fieldManager", "fieldValidation", "force"];
const DELETE_PARAMS: &[&str] = &[
    "dryRun",
    "gracePeriodSeconds",
    "ignoreStoreReadErrorWithClusterBreakingPotential",
    "orphanDependents",
    "propagationPolicy",
];
const DELETE_COLLECTION_PARAMS: &[&str] = &[
    "continue",
    "dryRun",
    "fieldSelector",
    "gracePeriodSeconds",
    "ignoreStoreReadErrorWithClusterBreakingPotential",
    "labelSelector",
    "limit",
    "orphanDependents",
    "propagationPolicy",
    "resourceVersion",
    "resourceVersionMatch",
    "sendInitialEvents",
    "timeoutSeconds",
];

/// The PATCH body content types the server accepts.
const PATCH_TYPES: &[&str] = &[
    "application/apply-patch+yaml",
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
];

/// What one operation looks like, before it becomes JSON.
struct Op<'a> {
    action: &'a str,
    id: String,
    description: String,
    gvk: Value,
    params: &'a [&'a str],
    /// Content types of the body, and its schema name.
    body: Option<(&'a [&'a str], &'a str)>,
    /// Response codes and the schema name of their body.
    responses: &'a [(&'a str, &'a str)],
}

impl Op<'_> {
    fn to_value(&self, tag: &str) -> Value {
        let mut responses = Map::new();
        for (code, schema) in self.responses {
            let content: Map<String, Value> = ["application/json", "application/yaml"]
                .iter()
                .map(|ct| ((*ct).to_string(), json!({ "schema": schema_ref(schema) })))
                .collect();
            let description = match *code {
                "201" => "Created",
                "202" => "Accepted",
                _ => "OK",
            };
            responses.insert(
                (*code).to_string(),
                json!({ "description": description, "content": content }),
            );
        }
        responses.insert("401".into(), json!({ "description": "Unauthorized" }));
        let mut op = json!({
            "tags": [tag],
            "description": self.description,
            "operationId": self.id,
        });
        if !self.params.is_empty() {
            op["parameters"] = Value::Array(query_params(self.params));
        }
        if let Some((types, schema)) = self.body {
            let content: Map<String, Value> = types
                .iter()
                .map(|ct| ((*ct).to_string(), json!({ "schema": schema_ref(schema) })))
                .collect();
            let required = self.action != "delete" && self.action != "deletecollection";
            op["requestBody"] = json!({ "content": content, "required": required });
        }
        op["responses"] = Value::Object(responses);
        op["x-kubernetes-action"] = json!(self.action);
        op["x-kubernetes-group-version-kind"] = self.gvk.clone();
        op
    }
}

const STATUS: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Status";
const DELETE_OPTIONS: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions";
const PATCH: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.Patch";
const LIST_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta";
const API_RESOURCE_LIST: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.APIResourceList";

/// Adds the paths of one served kind to `paths`.
fn kind_paths(
    info: &ResourceInfo,
    schema: &str,
    sub_schemas: &BTreeMap<&'static str, (Value, String)>,
    paths: &mut BTreeMap<String, Value>,
) {
    let prefix = format!("/{}", gv_path(info.group, info.version));
    let infix = op_infix(info.group, info.version);
    let tag = tag(info.group, info.version);
    let scope = if info.namespaced { "Namespaced" } else { "" };
    let kind = info.kind;
    let kind_gvk = gvk(info.group, info.version, kind);
    let list_schema = format!("{schema}List");
    let collection = if info.namespaced {
        format!("{prefix}/namespaces/{{namespace}}/{}", info.plural)
    } else {
        format!("{prefix}/{}", info.plural)
    };
    let item = format!("{collection}/{{name}}");
    let mut common = Vec::new();
    if info.namespaced {
        common.push(path_param(
            "namespace",
            "object name and auth scope, such as for teams and projects",
        ));
    }
    common.push(query_param("pretty"));
    let with_name = |what: &str| {
        let mut params = vec![path_param("name", &format!("name of the {what}"))];
        params.extend(common.iter().cloned());
        Value::Array(params)
    };

    let ops = [
        Op {
            action: "list",
            id: format!("list{infix}{scope}{kind}"),
            description: format!("list or watch objects of kind {kind}"),
            gvk: kind_gvk.clone(),
            params: LIST_PARAMS,
            body: None,
            responses: &[("200", &list_schema)],
        },
        Op {
            action: "post",
            id: format!("create{infix}{scope}{kind}"),
            description: format!("create a {kind}"),
            gvk: kind_gvk.clone(),
            params: WRITE_PARAMS,
            body: Some((&["*/*"], schema)),
            responses: &[("200", schema), ("201", schema), ("202", schema)],
        },
        Op {
            action: "deletecollection",
            id: format!("delete{infix}Collection{scope}{kind}"),
            description: format!("delete collection of {kind}"),
            gvk: kind_gvk.clone(),
            params: DELETE_COLLECTION_PARAMS,
            body: Some((&["*/*"], DELETE_OPTIONS)),
            responses: &[("200", STATUS)],
        },
    ];
    let [list, create, delete_collection] = ops.map(|op| op.to_value(&tag));
    let mut path = json!({ "get": list, "post": create, "delete": delete_collection });
    path["parameters"] = Value::Array(common.clone());
    paths.insert(collection.clone(), path);

    if info.namespaced {
        let op = Op {
            action: "list",
            id: format!("list{infix}{kind}ForAllNamespaces"),
            description: format!("list or watch objects of kind {kind}"),
            gvk: kind_gvk.clone(),
            params: LIST_PARAMS,
            body: None,
            responses: &[("200", &list_schema)],
        };
        let mut path = json!({ "get": op.to_value(&tag) });
        path["parameters"] = json!([query_param("pretty")]);
        paths.insert(format!("{prefix}/{}", info.plural), path);
    }

    let item_ops = |suffix: &str, gvk: &Value, schema: &str| {
        let what = if suffix.is_empty() {
            format!("the specified {kind}")
        } else {
            format!("{} of the specified {kind}", suffix.to_lowercase())
        };
        let op = |action, verb: &str, description: String, params, body| Op {
            action,
            id: format!("{verb}{infix}{scope}{kind}{suffix}"),
            description,
            gvk: gvk.clone(),
            params,
            body,
            responses: &[],
        };
        let read = Op {
            responses: &[("200", schema)],
            ..op("get", "read", format!("read {what}"), &[], None)
        };
        let replace = Op {
            responses: &[("200", schema), ("201", schema)],
            ..op(
                "put",
                "replace",
                format!("replace {what}"),
                WRITE_PARAMS,
                Some((&["*/*"][..], schema)),
            )
        };
        let patch = Op {
            responses: &[("200", schema), ("201", schema)],
            ..op(
                "patch",
                "patch",
                format!("partially update {what}"),
                PATCH_PARAMS,
                Some((PATCH_TYPES, PATCH)),
            )
        };
        json!({
            "get": read.to_value(&tag),
            "put": replace.to_value(&tag),
            "patch": patch.to_value(&tag),
        })
    };

    let mut path = item_ops("", &kind_gvk, schema);
    let delete = Op {
        action: "delete",
        id: format!("delete{infix}{scope}{kind}"),
        description: format!("delete a {kind}"),
        gvk: kind_gvk.clone(),
        params: DELETE_PARAMS,
        body: Some((&["*/*"], DELETE_OPTIONS)),
        responses: &[("200", STATUS), ("202", STATUS)],
    };
    path["delete"] = delete.to_value(&tag);
    path["parameters"] = with_name(kind);
    paths.insert(item.clone(), path);

    for sub in info.subresources {
        let suffix = capitalize(sub.name());
        let mut path = match sub {
            Subresource::Status => item_ops(&suffix, &kind_gvk, schema),
            Subresource::Scale => {
                let Some((sub_gvk, name)) = sub_schemas.get(sub.name()) else {
                    continue;
                };
                item_ops(&suffix, sub_gvk, name)
            }
            Subresource::Binding | Subresource::Token => {
                let Some((sub_gvk, name)) = sub_schemas.get(sub.name()) else {
                    continue;
                };
                let create = Op {
                    action: "post",
                    id: format!("create{infix}{scope}{kind}{suffix}"),
                    description: format!("create {} of a {kind}", sub.name()),
                    gvk: sub_gvk.clone(),
                    params: WRITE_PARAMS,
                    body: Some((&["*/*"], name)),
                    responses: &[("200", name), ("201", name), ("202", name)],
                };
                json!({ "post": create.to_value(&tag) })
            }
        };
        let what = match sub {
            Subresource::Binding => "Binding".to_string(),
            Subresource::Token => "TokenRequest".to_string(),
            _ => format!("the {kind}"),
        };
        path["parameters"] = with_name(&what);
        paths.insert(format!("{item}/{}", sub.name()), path);
    }
}

/// The schema of a list of `kind`.
fn list_schema(info: &ResourceInfo, item_schema: &str) -> Value {
    json!({
        "description": format!("{}List is a list of {}.", info.kind, info.kind),
        "type": "object",
        "properties": {
            "apiVersion": {
                "description": "the versioned schema of this representation of an object",
                "type": "string",
            },
            "items": {
                "description": format!("the list of {}", info.kind),
                "type": "array",
                "items": { "allOf": [schema_ref(item_schema)], "default": {} },
            },
            "kind": {
                "description": "the REST resource this object represents",
                "type": "string",
            },
            "metadata": {
                "description": "Standard list metadata.",
                "allOf": [schema_ref(LIST_META)],
                "default": {},
            },
        },
        "required": ["items"],
        "x-kubernetes-group-version-kind": [gvk(info.group, info.version, &info.list_kind())],
    })
}

fn set_gvk(schemas: &mut Map<String, Value>, name: &str, gvks: Vec<Value>) {
    if let Some(Value::Object(schema)) = schemas.get_mut(name) {
        schema.insert("x-kubernetes-group-version-kind".into(), Value::Array(gvks));
    }
}

/// k8s-openapi lists `metadata` (and `spec` where its Rust field is not
/// an `Option`) as required; upstream marks both optional on every served
/// kind, and `kubectl explain` shows the difference.
fn optional_metadata_and_spec(schemas: &mut Map<String, Value>, name: &str) {
    let Some(Value::Object(schema)) = schemas.get_mut(name) else {
        return;
    };
    let Some(Value::Array(required)) = schema.get_mut("required") else {
        return;
    };
    required.retain(|r| r != "metadata" && r != "spec");
    if required.is_empty() {
        schema.remove("required");
    }
}

/// Fields upstream tags `patchStrategy:"retainKeys"` (a union whose
/// unset members a client-side patch clears with `$retainKeys`), as
/// `(component schema, property)`. List merging is not here: that comes
/// from [`patch`]'s merge table.
const RETAIN_KEYS: &[(&str, &str)] = &[
    ("io.k8s.api.apps.v1.DeploymentSpec", "strategy"),
    ("io.k8s.api.core.v1.PodSpec", "volumes"),
];

/// How deep [`annotate_lists`] follows nested schemas; deeper than any
/// list in the merge table, and a guard against reference cycles.
const MAX_ANNOTATE_DEPTH: usize = 16;

/// The component a property schema stands for: its `$ref`, or the
/// `$ref` of its single `allOf` wrapper.
fn component_name(schema: &Value) -> Option<&str> {
    let target = match schema.get("$ref") {
        Some(r) => r,
        None => match schema
            .get("allOf")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
        {
            Some([only]) => only.get("$ref")?,
            _ => return None,
        },
    };
    target.as_str()?.strip_prefix(SCHEMA_REF)
}

/// The list extensions of one array property, as upstream publishes them:
/// `x-kubernetes-patch-strategy`/`x-kubernetes-patch-merge-key` for
/// strategic merge patch, `x-kubernetes-list-type`/`x-kubernetes-list-map-keys`
/// for server-side apply. Empty for a list that is atomic for both (such
/// lists carry no extension here, which clients read as "replace").
fn list_extensions(smp: ListStrategy, ssa: ListStrategy) -> Map<String, Value> {
    let mut ext = Map::new();
    if smp == ListStrategy::Atomic && ssa == ListStrategy::Atomic {
        return ext;
    }
    match smp {
        ListStrategy::MergeByKey(keys) => {
            ext.insert("x-kubernetes-patch-strategy".into(), json!("merge"));
            if let Some(key) = keys.first() {
                ext.insert("x-kubernetes-patch-merge-key".into(), json!(key));
            }
        }
        ListStrategy::Set => {
            ext.insert("x-kubernetes-patch-strategy".into(), json!("merge"));
        }
        ListStrategy::Atomic => {}
    }
    match ssa {
        ListStrategy::MergeByKey(keys) => {
            ext.insert("x-kubernetes-list-type".into(), json!("map"));
            ext.insert("x-kubernetes-list-map-keys".into(), json!(keys));
        }
        ListStrategy::Set => {
            ext.insert("x-kubernetes-list-type".into(), json!("set"));
        }
        ListStrategy::Atomic => {
            ext.insert("x-kubernetes-list-type".into(), json!("atomic"));
        }
    }
    ext
}

/// Walks the schema of kind `info` from component `name` (at object path
/// `path`) and collects, per `(component, property)`, the extensions the
/// merge table of [`patch`] gives the lists below it.
fn collect_list_extensions(
    schemas: &Map<String, Value>,
    info: &ResourceInfo,
    name: &str,
    path: &mut Vec<String>,
    out: &mut BTreeMap<(String, String), Map<String, Value>>,
) {
    if path.len() > MAX_ANNOTATE_DEPTH {
        return;
    }
    let Some(properties) = schemas
        .get(name)
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
    else {
        return;
    };
    for (field, schema) in properties {
        path.push(field.clone());
        let nested = if schema.get("type").and_then(Value::as_str) == Some("array") {
            let ext = list_extensions(
                patch::list_strategy(info, &path.iter().map(String::as_str).collect::<Vec<_>>()),
                patch::apply_list_strategy(info, path),
            );
            if !ext.is_empty() {
                // The first kind to reach a shared component decides; the
                // table gives the same answer wherever it has a rule.
                out.entry((name.to_string(), field.clone())).or_insert(ext);
            }
            schema.get("items").and_then(component_name)
        } else {
            component_name(schema)
        };
        if let Some(nested) = nested {
            collect_list_extensions(schemas, info, nested, path, out);
        }
        path.pop();
    }
}

/// Adds upstream's list-merge and `retainKeys` extensions to the
/// properties of `schemas`, for the served kinds `kinds`.
fn annotate_lists(schemas: &mut Map<String, Value>, kinds: &[(&ResourceInfo, String)]) {
    let mut found = BTreeMap::new();
    for (info, name) in kinds {
        collect_list_extensions(schemas, info, name, &mut Vec::new(), &mut found);
    }
    for (schema, field) in RETAIN_KEYS {
        let ext = found
            .entry(((*schema).to_string(), (*field).to_string()))
            .or_default();
        let strategy = match ext
            .get("x-kubernetes-patch-strategy")
            .and_then(Value::as_str)
        {
            Some("merge") => "merge,retainKeys",
            _ => "retainKeys",
        };
        ext.insert("x-kubernetes-patch-strategy".into(), json!(strategy));
    }
    for ((schema, field), ext) in found {
        if let Some(Value::Object(property)) = schemas
            .get_mut(&schema)
            .and_then(|s| s.get_mut("properties"))
            .and_then(|p| p.get_mut(&field))
        {
            property.extend(ext);
        }
    }
}

/// Builds the document of one group-version: its JSON and its schemas.
fn build_document(
    types: &[KnownType],
    group: &str,
    version: &str,
) -> (Value, Map<String, Value>, Vec<KindSchema>) {
    let mut generator = SchemaSettings::openapi3().into_generator();
    generator.subschema_for::<meta::Status>();
    generator.subschema_for::<meta::DeleteOptions>();
    generator.subschema_for::<meta::Patch>();
    generator.subschema_for::<meta::ListMeta>();
    generator.subschema_for::<meta::APIResourceList>();

    let infos: Vec<&ResourceInfo> = registry::in_group_version(group, version).collect();
    let mut kinds = Vec::new();
    let mut sub_schemas: BTreeMap<&'static str, (Value, String)> = BTreeMap::new();
    for info in &infos {
        let Some(t) = find_known(types, &info.api_version(), info.kind) else {
            continue;
        };
        (t.generate)(&mut generator);
        kinds.push((info.api_version(), info.kind, (t.name)().into_owned()));
        for sub in info.subresources {
            let (api_version, kind) = match sub {
                Subresource::Status => continue,
                Subresource::Scale => ("autoscaling/v1", "Scale"),
                Subresource::Binding => ("v1", "Binding"),
                Subresource::Token => ("authentication.k8s.io/v1", "TokenRequest"),
            };
            if let Some(t) = find_known(types, api_version, kind) {
                (t.generate)(&mut generator);
                let (g, v) = api_version.split_once('/').unwrap_or(("", api_version));
                sub_schemas.insert(sub.name(), (gvk(g, v, kind), (t.name)().into_owned()));
            }
        }
    }
    let mut schemas = generator.take_definitions(true);
    let annotated: Vec<(&ResourceInfo, String)> = infos
        .iter()
        .filter_map(|info| {
            let (_, _, name) = kinds.iter().find(|(_, k, _)| k == &info.kind)?;
            Some((*info, name.clone()))
        })
        .collect();
    annotate_lists(&mut schemas, &annotated);

    let mut paths = BTreeMap::new();
    let root = format!("/{}/", gv_path(group, version));
    let infix = op_infix(group, version);
    let tag = tag(group, version);
    paths.insert(
        root,
        json!({ "get": {
            "tags": [tag],
            "description": "get available resources",
            "operationId": format!("get{infix}APIResources"),
            "responses": {
                "200": {
                    "description": "OK",
                    "content": { "application/json": { "schema": schema_ref(API_RESOURCE_LIST) } },
                },
                "401": { "description": "Unauthorized" },
            },
        }}),
    );
    for info in &infos {
        let Some((_, _, name)) = kinds.iter().find(|(_, k, _)| k == &info.kind) else {
            continue;
        };
        kind_paths(info, name, &sub_schemas, &mut paths);
        set_gvk(
            &mut schemas,
            name,
            vec![gvk(info.group, info.version, info.kind)],
        );
        optional_metadata_and_spec(&mut schemas, name);
        schemas.insert(format!("{name}List"), list_schema(info, name));
    }
    for (sub_gvk, name) in sub_schemas.values() {
        set_gvk(&mut schemas, name, vec![sub_gvk.clone()]);
    }
    set_gvk(&mut schemas, STATUS, vec![gvk("", "v1", "Status")]);
    let mut delete_gvks = vec![gvk("", "v1", "DeleteOptions")];
    if !group.is_empty() {
        delete_gvks.push(gvk(group, version, "DeleteOptions"));
    }
    set_gvk(&mut schemas, DELETE_OPTIONS, delete_gvks);

    let mut sorted: Vec<_> = std::mem::take(&mut schemas).into_iter().collect();
    sorted.sort_by(|(a, _), (b, _)| a.cmp(b));
    let schemas: Map<String, Value> = sorted.into_iter().collect();

    let doc = json!({
        "openapi": "3.0.0",
        "info": {
            "title": "Kubernetes",
            "version": format!("v1.37.0-skiff.{}", env!("CARGO_PKG_VERSION")),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "BearerToken": {
                    "type": "apiKey",
                    "description": "Bearer Token authentication",
                    "name": "authorization",
                    "in": "header",
                },
            },
        },
    });
    (doc, schemas, kinds)
}

impl OpenApi {
    /// Builds the index and one document per served group-version
    /// (`api/v1`, `apis/<group>/<version>`), each serialized once.
    pub fn build() -> OpenApi {
        let types = known_types();
        let mut gvs: Vec<(&str, &str)> = vec![("", "v1")];
        for (group, versions) in registry::groups() {
            gvs.extend(versions.into_iter().map(|v| (group, v)));
        }
        let mut documents = Vec::new();
        let mut all_schemas = Map::new();
        let mut kind_schemas = Vec::new();
        for (group, version) in gvs {
            let (doc, schemas, kinds) = build_document(&types, group, version);
            let bytes = doc.to_string().into_bytes();
            let hash = format!("{:X}", Sha512::digest(&bytes));
            documents.push(Document {
                gv_path: gv_path(group, version),
                bytes,
                hash,
            });
            all_schemas.extend(schemas);
            kind_schemas.extend(kinds);
        }
        documents.sort_by(|a, b| a.gv_path.cmp(&b.gv_path));
        let paths: Map<String, Value> = documents
            .iter()
            .map(|d| {
                let url = format!("/openapi/v3/{}?hash={}", d.gv_path, d.hash);
                (d.gv_path.clone(), json!({ "serverRelativeURL": url }))
            })
            .collect();
        let index = json!({ "paths": paths }).to_string().into_bytes();
        OpenApi {
            index,
            documents,
            schemas: all_schemas,
            kind_schemas,
        }
    }

    /// `/openapi/v3`: the index of documents, each with its
    /// `serverRelativeURL` carrying `?hash=`.
    pub fn index(&self) -> &[u8] {
        &self.index
    }

    /// `/openapi/v3/<gv path>` (e.g. `apis/apps/v1`): the document's JSON
    /// bytes and its hash (upper-case hex SHA-512, the value of `?hash=`
    /// and of the quoted ETag), or `None` for an unknown path.
    pub fn document(&self, gv_path: &str) -> Option<(&[u8], &str)> {
        self.documents
            .iter()
            .find(|d| d.gv_path == gv_path)
            .map(|d| (d.bytes.as_slice(), d.hash.as_str()))
    }

    /// The paths of fields of `obj` (a full object of kind `info`) that its
    /// schema does not declare, in document order and in the format of
    /// upstream's strict decoding errors, e.g. `spec.foo` or
    /// `spec.template.spec.containers[0].bogus` (upstream reports each as
    /// `unknown field "<path>"`). Maps (labels, annotations, data) and
    /// free-form fields never count. Empty for a kind without a schema.
    pub fn unknown_fields(&self, info: &ResourceInfo, obj: &Value) -> Vec<String> {
        let findings = self.check(info, obj);
        findings.unknown.iter().map(|f| display(f)).collect()
    }

    /// Removes from `obj` every field [`OpenApi::unknown_fields`] reports,
    /// as upstream's typed decoding drops them in every `fieldValidation`
    /// mode, and returns their paths (in the same format). Fields under
    /// `x-kubernetes-preserve-unknown-fields` and free-form fields such as
    /// `managedFields[].fieldsV1` are kept.
    pub fn prune_unknown_fields(&self, info: &ResourceInfo, obj: &mut Value) -> Vec<String> {
        let findings = self.check(info, obj);
        // Deepest and last first, so earlier locations stay valid.
        for location in findings.unknown.iter().rev() {
            remove_at(obj, location);
        }
        findings.unknown.iter().map(|f| display(f)).collect()
    }

    /// The first value of `obj` whose JSON type upstream's typed decoding
    /// cannot take, e.g. a boolean label value that YAML 1.1 read from
    /// `app: y`, as upstream's decoding error: `json: cannot unmarshal bool
    /// into Go struct field ObjectMeta.metadata.labels of type string`.
    /// Only plain string fields are checked (quantities, times and
    /// int-or-string fields accept more than strings). `None` when every
    /// checked field is well typed.
    pub fn type_error(&self, info: &ResourceInfo, obj: &Value) -> Option<String> {
        self.check(info, obj).mistyped
    }

    /// Upstream's typed decoding in one walk of `obj`: `Err` with the first
    /// [`type_error`](Self::type_error), else the
    /// [`unknown_fields`](Self::unknown_fields), which are also removed from
    /// `obj` when `prune` (as [`prune_unknown_fields`](Self::prune_unknown_fields)).
    pub fn decode_check(
        &self,
        info: &ResourceInfo,
        obj: &mut Value,
        prune: bool,
    ) -> Result<Vec<String>, TypeError> {
        let findings = self.check(info, obj);
        if let Some(message) = findings.mistyped {
            return Err(TypeError { message });
        }
        if prune {
            for location in findings.unknown.iter().rev() {
                remove_at(obj, location);
            }
        }
        Ok(findings.unknown.iter().map(|f| display(f)).collect())
    }

    fn check(&self, info: &ResourceInfo, obj: &Value) -> Findings {
        let api_version = info.api_version();
        let mut findings = Findings::default();
        if let Some((_, _, name)) = self
            .kind_schemas
            .iter()
            .find(|(v, k, _)| *v == api_version && *k == info.kind)
            && let Some(schema) = self.schemas.get(name)
        {
            let mut walk = Walk {
                api: self,
                location: Vec::new(),
                fields: Vec::new(),
                findings: &mut findings,
            };
            walk.value(schema, obj, info.kind);
        }
        findings
    }

    /// Follows `$ref` and single-element `allOf` wrappers to the schema
    /// they stand for, and the name of the last component on the way.
    fn resolve<'a>(&'a self, mut schema: &'a Value) -> (&'a Value, Option<&'a str>) {
        let mut component = None;
        // A bound on the hops guards against a reference cycle.
        for _ in 0..32 {
            if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
                match target
                    .strip_prefix(SCHEMA_REF)
                    .and_then(|name| Some((name, self.schemas.get(name)?)))
                {
                    Some((name, next)) => {
                        component = Some(name);
                        schema = next;
                    }
                    None => break,
                }
            } else if schema.get("properties").is_none()
                && let Some([only]) = schema
                    .get("allOf")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
            {
                schema = only;
            } else {
                break;
            }
        }
        (schema, component)
    }
}

/// One step into a JSON value.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

/// What a schema walk found.
#[derive(Debug, Default)]
struct Findings {
    /// The locations of undeclared fields, in document order.
    unknown: Vec<Vec<Step>>,
    /// The first type mismatch, as upstream's decoding error.
    mistyped: Option<String>,
}

/// A location as upstream prints it: `spec.containers[0].bogus`.
fn display(location: &[Step]) -> String {
    let mut out = String::new();
    for step in location {
        match step {
            Step::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Removes the field at `location` (whose last step is a key) from `obj`.
fn remove_at(obj: &mut Value, location: &[Step]) {
    let Some((Step::Key(last), parents)) = location.split_last() else {
        return;
    };
    let mut node = obj;
    for step in parents {
        let next = match (step, node) {
            (Step::Key(k), Value::Object(map)) => map.get_mut(k),
            (Step::Index(i), Value::Array(items)) => items.get_mut(*i),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return,
        }
    }
    if let Value::Object(map) = node {
        map.shift_remove(last);
    }
}

/// The JSON type name Go's decoder reports for a value.
fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// One walk of a value against its schema.
struct Walk<'a, 'f> {
    api: &'a OpenApi,
    /// Where the walk is, map keys and list indices included.
    location: Vec<Step>,
    /// The struct field names on the way, as Go's decoder reports them.
    fields: Vec<String>,
    findings: &'f mut Findings,
}

impl Walk<'_, '_> {
    /// Walks `value` against `schema`; `owner` is the Go struct the value
    /// is a field (or map value, or list item) of.
    fn value(&mut self, schema: &Value, value: &Value, owner: &str) {
        if self.findings.mistyped.is_none()
            && schema.get("type").and_then(Value::as_str) == Some("string")
            && !matches!(value, Value::String(_) | Value::Null)
        {
            self.findings.mistyped = Some(format!(
                "json: cannot unmarshal {} into Go struct field {owner}.{} of type string",
                json_type(value),
                self.fields.join(".")
            ));
        }
        let (schema, component) = self.api.resolve(schema);
        if schema
            .get("x-kubernetes-preserve-unknown-fields")
            .and_then(Value::as_bool)
            == Some(true)
        {
            return;
        }
        match value {
            Value::Object(fields) => {
                let properties = schema.get("properties").and_then(Value::as_object);
                let additional = schema.get("additionalProperties").filter(|a| a.is_object());
                if properties.is_none() && additional.is_none() {
                    // A free-form object such as FieldsV1 or RawExtension.
                    return;
                }
                // A struct's fields are reported against that struct.
                let struct_name = match (properties, component) {
                    (Some(_), Some(c)) => c.rsplit('.').next().unwrap_or(c),
                    _ => owner,
                };
                for (key, field) in fields {
                    self.location.push(Step::Key(key.clone()));
                    match properties.and_then(|p| p.get(key)) {
                        Some(sub) => {
                            self.fields.push(key.clone());
                            self.value(sub, field, struct_name);
                            self.fields.pop();
                        }
                        None => match additional {
                            Some(sub) => self.value(sub, field, struct_name),
                            None => self.findings.unknown.push(self.location.clone()),
                        },
                    }
                    self.location.pop();
                }
            }
            Value::Array(items) => {
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        self.location.push(Step::Index(i));
                        self.value(item_schema, item, owner);
                        self.location.pop();
                    }
                }
            }
            _ => {}
        }
    }
}

/// A field of the wrong JSON type, with the message Go's decoder gives,
/// which upstream's API server answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TypeError {
    /// The decoder's message.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::LazyLock;

    static API: LazyLock<OpenApi> = LazyLock::new(OpenApi::build);

    fn doc(path: &str) -> Value {
        let (bytes, _) = API
            .document(path)
            .unwrap_or_else(|| panic!("{path} served"));
        serde_json::from_slice(bytes).expect("document is json")
    }

    fn info(api_version: &str, kind: &str) -> &'static ResourceInfo {
        registry::find_kind(api_version, kind).unwrap_or_else(|| panic!("{kind} served"))
    }

    #[test]
    fn every_served_kind_has_a_schema_type() {
        let types = known_types();
        for info in registry::RESOURCES {
            assert!(
                find_known(&types, &info.api_version(), info.kind).is_some(),
                "no k8s-openapi type for {} {}",
                info.api_version(),
                info.kind
            );
        }
    }

    #[test]
    fn index_lists_every_group_version_with_matching_hash() {
        let index: Value = serde_json::from_slice(API.index()).expect("index is json");
        let paths = index["paths"].as_object().expect("paths");
        let mut expected = vec!["api/v1".to_string()];
        for (g, versions) in registry::groups() {
            expected.extend(versions.iter().map(|v| format!("apis/{g}/{v}")));
        }
        expected.sort();
        let listed: Vec<_> = paths.keys().cloned().collect();
        assert_eq!(listed, expected);
        for gv in [
            "api/v1",
            "apis/apps/v1",
            "apis/discovery.k8s.io/v1",
            "apis/coordination.k8s.io/v1",
        ] {
            let (bytes, hash) = API.document(gv).expect("document served");
            assert_eq!(hash, format!("{:X}", Sha512::digest(bytes)));
            assert_eq!(hash.len(), 128);
            assert_eq!(
                paths[gv]["serverRelativeURL"],
                format!("/openapi/v3/{gv}?hash={hash}")
            );
        }
        assert!(API.document("apis/batch/v1").is_none());
    }

    /// What kubectl's query_param_verifier_v3 does: the first PATCH
    /// operation carrying the GVK must list the parameter.
    fn patch_supports(doc: &Value, group: &str, version: &str, kind: &str, param: &str) -> bool {
        let want = gvk(group, version, kind);
        for path in doc["paths"].as_object().expect("paths").values() {
            let Some(op) = path.get("patch") else {
                continue;
            };
            if op["x-kubernetes-group-version-kind"] != want {
                continue;
            }
            return op["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["name"] == param));
        }
        false
    }

    #[test]
    fn apps_document_has_patch_with_field_validation_and_gvk_schema() {
        let apps = doc("apis/apps/v1");
        assert_eq!(apps["openapi"], "3.0.0");
        let item = &apps["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"];
        let patch = &item["patch"];
        assert_eq!(patch["operationId"], "patchAppsV1NamespacedDeployment");
        assert_eq!(patch["x-kubernetes-action"], "patch");
        let params = patch["parameters"].as_array().expect("patch parameters");
        for name in ["fieldValidation", "dryRun", "fieldManager", "force"] {
            let p = params
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("{name} parameter"));
            assert_eq!(p["in"], "query");
        }
        let content = patch["requestBody"]["content"]
            .as_object()
            .expect("content");
        for ct in PATCH_TYPES {
            assert!(content.contains_key(*ct), "{ct}");
        }
        assert_eq!(item["get"]["operationId"], "readAppsV1NamespacedDeployment");
        assert!(
            apps["paths"]["/apis/apps/v1/deployments"]["get"]["operationId"]
                == "listAppsV1DeploymentForAllNamespaces"
        );
        let scale = &apps["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"];
        assert_eq!(
            scale["patch"]["x-kubernetes-group-version-kind"],
            gvk("autoscaling", "v1", "Scale")
        );
        for kind in ["Deployment", "ReplicaSet"] {
            assert!(
                patch_supports(&apps, "apps", "v1", kind, "fieldValidation"),
                "{kind}"
            );
        }

        let schemas = &apps["components"]["schemas"];
        let deploy = &schemas["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            deploy["x-kubernetes-group-version-kind"],
            json!([gvk("apps", "v1", "Deployment")])
        );
        assert!(
            deploy["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
        );
        let spec = &deploy["properties"]["spec"];
        assert_eq!(
            spec["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.api.apps.v1.DeploymentSpec"
        );
        assert!(
            schemas["io.k8s.api.apps.v1.DeploymentSpec"]["properties"]["replicas"]["description"]
                .is_string()
        );
        assert!(schemas["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"].is_object());
        assert_eq!(
            schemas["io.k8s.api.apps.v1.DeploymentList"]["x-kubernetes-group-version-kind"],
            json!([gvk("apps", "v1", "DeploymentList")])
        );
        // Every reference resolves inside the document.
        let text = apps.to_string();
        for (i, _) in text.match_indices(SCHEMA_REF) {
            let rest = &text[i + SCHEMA_REF.len()..];
            let name = &rest[..rest.find('"').expect("ref ends")];
            assert!(schemas.get(name).is_some(), "dangling ref {name}");
        }
    }

    #[test]
    fn core_document_covers_pods_and_cluster_scoped_kinds() {
        let core = doc("api/v1");
        let paths = &core["paths"];
        assert_eq!(
            paths["/api/v1/namespaces/{namespace}/pods"]["post"]["operationId"],
            "createCoreV1NamespacedPod"
        );
        assert_eq!(
            paths["/api/v1/namespaces/{namespace}/pods/{name}/binding"]["post"]["operationId"],
            "createCoreV1NamespacedPodBinding"
        );
        assert_eq!(
            paths["/api/v1/namespaces/{name}/status"]["patch"]["operationId"],
            "patchCoreV1NamespaceStatus"
        );
        assert_eq!(
            paths["/api/v1/namespaces"]["delete"]["operationId"],
            "deleteCoreV1CollectionNamespace"
        );
        for info in registry::in_group_version("", "v1") {
            assert!(
                patch_supports(&core, "", "v1", info.kind, "fieldValidation"),
                "{}",
                info.kind
            );
        }
        let lease = doc("apis/coordination.k8s.io/v1");
        assert!(patch_supports(
            &lease,
            "coordination.k8s.io",
            "v1",
            "Lease",
            "fieldValidation"
        ));
        assert_eq!(
            lease["paths"]["/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"]["patch"]
                ["operationId"],
            "patchCoordinationV1NamespacedLease"
        );
    }

    fn deployment() -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "web",
                "namespace": "default",
                "labels": {"app": "web", "any-key.example.com/x": "y"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {"f:replicas": {}}}}],
            },
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [{
                            "name": "web",
                            "image": "nginx",
                            "env": [{"name": "A", "value": "b"},
                                    {"name": "C", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                            "ports": [{"containerPort": 80, "protocol": "TCP"}],
                            "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}},
                        }],
                        "nodeSelector": {"disk": "ssd"},
                    },
                },
            },
            "status": {"replicas": 2, "conditions": [{"type": "Available", "status": "True"}]},
        })
    }

    #[test]
    fn unknown_fields_reports_upstream_paths() {
        let info = info("apps/v1", "Deployment");
        assert_eq!(
            API.unknown_fields(info, &deployment()),
            Vec::<String>::new()
        );
        let mut bad = deployment();
        bad["spec"]["replicaz"] = json!(3);
        bad["spec"]["template"]["spec"]["containers"][0]["imagez"] = json!("x");
        bad["metadata"]["bogus"] = json!(true);
        assert_eq!(
            API.unknown_fields(info, &bad),
            // Document order: replicaz was added after template.
            [
                "metadata.bogus",
                "spec.template.spec.containers[0].imagez",
                "spec.replicaz"
            ]
        );
        let mut top = deployment();
        top["extra"] = json!({"x": 1});
        assert_eq!(API.unknown_fields(info, &top), ["extra"]);
    }

    #[test]
    fn valid_core_objects_have_no_unknown_fields() {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "default", "labels": {"a": "b"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs",
                    "uid": "1", "controller": true}]},
            "spec": {
                "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "sleep 1"],
                    "readinessProbe": {"httpGet": {"path": "/", "port": "http"}},
                    "volumeMounts": [{"name": "v", "mountPath": "/data"}]}],
                "volumes": [{"name": "v", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "cm"}}],
                "tolerations": [{"key": "k", "operator": "Exists"}],
                "restartPolicy": "Always", "nodeName": "n1",
            },
            "status": {"phase": "Running", "podIP": "10.0.0.2", "podIPs": [{"ip": "10.0.0.2"}],
                "containerStatuses": [{"name": "c", "ready": true, "restartCount": 0, "image": "busybox",
                    "imageID": "", "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}]},
        });
        let service = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "s", "annotations": {"x": "y"}},
            "spec": {"selector": {"app": "web"}, "type": "ClusterIP", "clusterIP": "10.96.0.10",
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
            "status": {"loadBalancer": {}},
        });
        let config_map = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cm"},
            "data": {"any.key": "value", "other": "x"},
            "binaryData": {"bin": "AAEC"},
        });
        for (kind, obj) in [
            ("Pod", pod),
            ("Service", service),
            ("ConfigMap", config_map),
        ] {
            assert_eq!(
                API.unknown_fields(info("v1", kind), &obj),
                Vec::<String>::new(),
                "{kind}"
            );
        }
        let bad_cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"},
            "date": {"a": "b"}});
        assert_eq!(
            API.unknown_fields(info("v1", "ConfigMap"), &bad_cm),
            ["date"]
        );
    }

    #[test]
    fn schemas_carry_list_merge_extensions_from_the_merge_table() {
        let apps = doc("apis/apps/v1");
        let schemas = &apps["components"]["schemas"];
        let pod_spec = &schemas["io.k8s.api.core.v1.PodSpec"]["properties"];
        assert_eq!(
            pod_spec["containers"]["x-kubernetes-patch-strategy"],
            "merge"
        );
        assert_eq!(
            pod_spec["containers"]["x-kubernetes-patch-merge-key"],
            "name"
        );
        assert_eq!(pod_spec["containers"]["x-kubernetes-list-type"], "map");
        assert_eq!(
            pod_spec["containers"]["x-kubernetes-list-map-keys"],
            json!(["name"])
        );
        assert_eq!(
            pod_spec["volumes"]["x-kubernetes-patch-strategy"],
            "merge,retainKeys"
        );
        assert_eq!(pod_spec["volumes"]["x-kubernetes-patch-merge-key"], "name");
        assert!(
            pod_spec["tolerations"]
                .get("x-kubernetes-patch-strategy")
                .is_none()
        );
        let container = &schemas["io.k8s.api.core.v1.Container"]["properties"];
        assert_eq!(
            container["ports"]["x-kubernetes-patch-merge-key"],
            "containerPort"
        );
        assert_eq!(
            container["ports"]["x-kubernetes-list-map-keys"],
            json!(["containerPort", "protocol"])
        );
        assert_eq!(container["env"]["x-kubernetes-patch-merge-key"], "name");
        let meta = &schemas["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"]["properties"];
        assert_eq!(meta["finalizers"]["x-kubernetes-patch-strategy"], "merge");
        assert_eq!(meta["finalizers"]["x-kubernetes-list-type"], "set");
        assert_eq!(
            meta["ownerReferences"]["x-kubernetes-patch-merge-key"],
            "uid"
        );
        assert_eq!(
            schemas["io.k8s.api.apps.v1.DeploymentSpec"]["properties"]["strategy"]["x-kubernetes-patch-strategy"],
            "retainKeys"
        );
        assert_eq!(
            schemas["io.k8s.api.apps.v1.DeploymentStatus"]["properties"]["conditions"]["x-kubernetes-patch-merge-key"],
            "type"
        );
        let core = doc("api/v1");
        let service =
            &core["components"]["schemas"]["io.k8s.api.core.v1.ServiceSpec"]["properties"];
        assert_eq!(service["ports"]["x-kubernetes-patch-merge-key"], "port");
        assert_eq!(
            service["ports"]["x-kubernetes-list-map-keys"],
            json!(["port", "protocol"])
        );
        // Every annotated list agrees with the merge table for a kind that reaches it.
        let deploy = info("apps/v1", "Deployment");
        assert_eq!(
            patch::list_strategy(deploy, &["spec", "template", "spec", "containers", "env"]),
            ListStrategy::MergeByKey(&["name"])
        );
    }

    #[test]
    fn prune_drops_unknown_fields_and_keeps_free_form_ones() {
        let info = info("apps/v1", "Deployment");
        let mut bad = deployment();
        bad["spec"]["replicaz"] = json!(3);
        bad["spec"]["template"]["spec"]["containers"][0]["imagez"] = json!("x");
        bad["metadata"]["bogus"] = json!(true);
        bad["extra"] = json!({"x": 1});
        let removed = API.prune_unknown_fields(info, &mut bad);
        assert_eq!(
            removed,
            [
                "metadata.bogus",
                "spec.template.spec.containers[0].imagez",
                "spec.replicaz",
                "extra"
            ]
        );
        // What is left is the valid object, managedFields' free-form fieldsV1 included.
        assert_eq!(bad, deployment());
        let mut clean = deployment();
        assert!(API.prune_unknown_fields(info, &mut clean).is_empty());
        assert_eq!(clean, deployment());
    }

    #[test]
    fn type_error_reports_non_string_labels_like_go() {
        let info = info("apps/v1", "Deployment");
        assert_eq!(API.type_error(info, &deployment()), None);
        let mut bad = deployment();
        bad["spec"]["template"]["metadata"]["labels"]["app"] = json!(true);
        assert_eq!(
            API.type_error(info, &bad).as_deref(),
            Some(
                "json: cannot unmarshal bool into Go struct field ObjectMeta.spec.template.metadata.labels of type string"
            )
        );
        let mut image = deployment();
        image["spec"]["template"]["spec"]["containers"][0]["image"] = json!(5);
        assert_eq!(
            API.type_error(info, &image).as_deref(),
            Some(
                "json: cannot unmarshal number into Go struct field Container.spec.template.spec.containers.image of type string"
            )
        );
        // Quantities and int-or-strings take numbers.
        let mut numbers = deployment();
        numbers["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] =
            json!(1);
        numbers["spec"]["strategy"]["rollingUpdate"]["maxSurge"] = json!(2);
        assert_eq!(API.type_error(info, &numbers), None);
    }

    #[test]
    fn decode_check_finds_type_errors_and_unknown_fields_in_one_walk() {
        let info = info("apps/v1", "Deployment");
        let mut bad = deployment();
        bad["spec"]["template"]["metadata"]["labels"]["app"] = json!(true);
        bad["spec"]["bogus"] = json!(1);
        let before = bad.clone();
        assert_eq!(
            API.decode_check(info, &mut bad, true),
            Err(TypeError {
                message: API.type_error(info, &before).expect("mistyped")
            }),
            "a type error wins over unknown fields"
        );
        assert_eq!(bad, before, "nothing is pruned from a refused object");

        let mut unknown = deployment();
        unknown["spec"]["bogus"] = json!(1);
        unknown["spec"]["template"]["spec"]["containers"][0]["nope"] = json!("x");
        let mut kept = unknown.clone();
        let expected = API.unknown_fields(info, &unknown);
        assert_eq!(expected.len(), 2);
        assert_eq!(
            API.decode_check(info, &mut kept, false),
            Ok(expected.clone())
        );
        assert_eq!(kept, unknown, "without prune the object is left as it is");
        assert_eq!(API.decode_check(info, &mut unknown, true), Ok(expected));
        assert_eq!(
            unknown,
            deployment(),
            "with prune the unknown fields are gone"
        );
    }

    #[test]
    fn operation_names_follow_upstream() {
        assert_eq!(op_infix("", "v1"), "CoreV1");
        assert_eq!(op_infix("apps", "v1"), "AppsV1");
        assert_eq!(op_infix("discovery.k8s.io", "v1"), "DiscoveryV1");
        assert_eq!(
            op_infix("rbac.authorization.k8s.io", "v1"),
            "RbacAuthorizationV1"
        );
        assert_eq!(
            tag("rbac.authorization.k8s.io", "v1"),
            "rbacAuthorization_v1"
        );
        assert_eq!(tag("", "v1"), "core_v1");
    }

    #[test]
    fn build_time_and_sizes() {
        let start = std::time::Instant::now();
        let api = OpenApi::build();
        let elapsed = start.elapsed();
        let sizes: Vec<_> = api
            .documents
            .iter()
            .map(|d| format!("{} {} bytes", d.gv_path, d.bytes.len()))
            .collect();
        eprintln!("openapi build took {elapsed:?}: {}", sizes.join(", "));
        assert!(api.documents.iter().all(|d| d.bytes.len() > 1000));
    }
}
