//! Server-side apply (`application/apply-patch+yaml`) and field ownership in
//! `metadata.managedFields`, after upstream's
//! `sigs.k8s.io/structured-merge-diff` as the API server runs it.
//!
//! Ownership is tracked as field sets serialized as `FieldsV1`: `f:<name>`
//! for an object field, `k:{"name":"web"}` for an element of a keyed list
//! (keys from [`crate::patch::apply_list_strategy`]), `v:<json>` for an item
//! of a set, and `.` for a node that is itself owned while having owned
//! children. Every manager + operation (+ subresource) has one entry.
//!
//! * An apply owns exactly the fields of its configuration; it conflicts
//!   when it changes a field another manager owns (unless forced, which
//!   takes the field over), and fields the applier owned before and now
//!   omits are removed unless another manager owns them too.
//! * Any other write (create, update, patch) gives its manager the fields it
//!   set or changed, and other managers lose the fields whose values changed.
//!
//! `apiVersion`, `kind`, the server-set metadata (`name`, `namespace`,
//! `uid`, `resourceVersion`, `generation`, `creationTimestamp`, `selfLink`,
//! `managedFields`) are never owned; writes to the main resource of a kind
//! with a `/status` subresource own nothing under `status`, writes to
//! `/status` own only `status`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use serde_json::{Map, Value};

use crate::patch::{ListStrategy, apply_list_strategy};
use skiff_common::registry::{ResourceInfo, Subresource};

/// One element path, e.g. `["f:spec", "f:containers", "k:{\"name\":\"web\"}"]`.
type Path = Vec<String>;
/// A set of owned paths.
type FieldSet = BTreeSet<Path>;

/// Upstream's longest field manager name.
pub const FIELD_MANAGER_MAX_LENGTH: usize = 128;

/// The manager an unnamed field set is attributed to when an object without
/// `managedFields` is first applied to, as upstream.
pub const BEFORE_FIRST_APPLY: &str = "before-first-apply";

/// The field manager of a request: the `fieldManager` query parameter, or
/// else the user agent up to its first `/` (printable characters, at most
/// [`FIELD_MANAGER_MAX_LENGTH`] bytes), as upstream.
pub fn manager_or_user_agent(field_manager: Option<&str>, user_agent: Option<&str>) -> String {
    if let Some(manager) = field_manager.filter(|m| !m.is_empty()) {
        return manager.to_string();
    }
    let prefix = user_agent.unwrap_or_default().split('/').next();
    let mut out = String::new();
    for c in prefix
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
    {
        if out.len() + c.len_utf8() > FIELD_MANAGER_MAX_LENGTH {
            break;
        }
        out.push(c);
    }
    out
}

/// One field another manager owns that an apply would change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager's name, e.g. `kubectl-scale`.
    pub manager: String,
    /// The manager as upstream prints it, e.g.
    /// `"kubectl-scale" with subresource "scale" using apps/v1`.
    pub description: String,
    /// The field, e.g. `.spec.replicas` or
    /// `.spec.template.spec.containers[name="web"].image`.
    pub field: String,
}

impl Conflict {
    /// The message of this conflict's `FieldManagerConflict` status cause,
    /// e.g. `conflict with "kubectl-scale" using apps/v1`.
    pub fn cause_message(&self) -> String {
        format!("conflict with {}", self.description)
    }
}

fn conflict_message(conflicts: &[Conflict]) -> String {
    if let [only] = conflicts {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            only.description, only.field
        );
    }
    let mut by_manager: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for c in conflicts {
        by_manager.entry(&c.description).or_default().push(&c.field);
    }
    let mut lines = Vec::new();
    for (manager, fields) in by_manager {
        lines.push(format!("conflicts with {manager}:"));
        lines.extend(fields.into_iter().map(|f| format!("- {f}")));
    }
    format!(
        "Apply failed with {} conflicts: {}",
        conflicts.len(),
        lines.join("\n")
    )
}

/// Why a server-side apply was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Other managers own fields the apply would change (409 Conflict).
    /// The text is upstream's, which starts with a capital.
    #[error("{}", conflict_message(conflicts))]
    Conflicts {
        /// Each conflicting field with its owner.
        conflicts: Vec<Conflict>,
    },
    /// The body is not an apply configuration of this kind (400 BadRequest).
    #[error("{message}")]
    BadRequest {
        /// Upstream's text, e.g. `metadata.managedFields must be nil`.
        message: String,
    },
    /// The configuration does not fit the kind's list types, e.g. a keyed
    /// list element without its key (422 Invalid).
    #[error("{message}")]
    Invalid {
        /// What is wrong and where.
        message: String,
    },
    /// The body is neither YAML nor JSON (400 BadRequest).
    #[error("error decoding YAML")]
    Decode {
        /// The parse error.
        #[source]
        source: serde_yaml::Error,
    },
}

impl ApplyError {
    /// The message of the failure Status, upstream's wording.
    pub fn message(&self) -> String {
        skiff_common::error::chain(self)
    }

    /// The HTTP status upstream answers with.
    pub fn http_code(&self) -> u16 {
        match self {
            ApplyError::Conflicts { .. } => 409,
            ApplyError::BadRequest { .. } | ApplyError::Decode { .. } => 400,
            ApplyError::Invalid { .. } => 422,
        }
    }

    fn bad(message: String) -> ApplyError {
        ApplyError::BadRequest { message }
    }
}

/// Parse an `application/apply-patch+yaml` body (YAML or JSON).
pub fn parse_apply_body(body: &[u8]) -> Result<Value, ApplyError> {
    serde_yaml::from_slice(body).map_err(|source| ApplyError::Decode { source })
}

/// Server-side apply of `applied` (the parsed YAML/JSON body) by `manager`
/// onto `live` (`None` = create). `now` is the RFC 3339 time recorded in
/// `managedFields`. Returns the new object with `metadata.managedFields`
/// updated (operation `Apply`).
pub fn server_side_apply(
    info: &ResourceInfo,
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    now: &str,
) -> Result<Value, ApplyError> {
    let Value::Object(body) = applied else {
        return Err(ApplyError::bad(
            "error decoding YAML: the apply configuration is not an object".to_string(),
        ));
    };
    let want = info.api_version();
    match body.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v == want => {}
        other => {
            return Err(ApplyError::bad(format!(
                "Incorrect version specified in apply patch. Specified patch version: {}, expected: {want}",
                other.unwrap_or_default()
            )));
        }
    }
    match body.get("kind").and_then(Value::as_str) {
        Some(k) if k == info.kind => {}
        other => {
            return Err(ApplyError::bad(format!(
                "Incorrect kind specified in apply patch. Specified patch kind: {}, expected: {}",
                other.unwrap_or_default(),
                info.kind
            )));
        }
    }
    if body
        .get("metadata")
        .and_then(|m| m.get("managedFields"))
        .is_some_and(|mf| !mf.is_null() && mf.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApplyError::bad(
            "metadata.managedFields must be nil".to_string(),
        ));
    }

    let scope = Scope::of(info, None);
    let mut config = body.clone();
    if let Some(Value::Object(meta)) = config.get_mut("metadata") {
        // Name and namespace identify the object; the rest is the server's.
        for field in SERVER_METADATA
            .iter()
            .filter(|f| !matches!(**f, "name" | "namespace"))
        {
            meta.shift_remove(*field);
        }
    }
    config.retain(|k, _| k == "apiVersion" || k == "kind" || scope.includes(k));
    let config = Value::Object(config);

    let strict = Walker {
        info,
        maps_are_members: false,
        strict: true,
    };
    let config_set = strict
        .object_set(&strip_nulls(&config), scope)
        .map_err(|detail| {
            let meta = body.get("metadata");
            let name = |f: &str| meta.and_then(|m| m.get(f)).and_then(Value::as_str);
            ApplyError::Invalid {
                message: format!(
                    "failed to create typed patch object ({}/{}; {want}, Kind={}): {detail}",
                    name("namespace").unwrap_or_default(),
                    name("name").unwrap_or_default(),
                    info.kind
                ),
            }
        })?;

    let updates = Walker {
        info,
        maps_are_members: true,
        strict: false,
    };
    let live_value = live.cloned().unwrap_or_else(|| Value::Object(Map::new()));
    let mut entries = live.map(decode_managed).unwrap_or_default();
    if let Some(live) = live
        && entries.is_empty()
    {
        let fields = updates.object_set(live, scope).unwrap_or_default();
        entries.push(Entry {
            manager: BEFORE_FIRST_APPLY.to_string(),
            operation: UPDATE.to_string(),
            api_version: want.clone(),
            time: None,
            subresource: None,
            fields,
        });
    }

    let mut merged = merge_applied(info, live_value.clone(), &config, &mut Vec::new());
    let live_set = updates.object_set(&live_value, scope).unwrap_or_default();
    let merged_set = updates.object_set(&merged, scope).unwrap_or_default();
    let diff = compare(&live_value, &live_set, &merged, &merged_set);
    let changed: FieldSet = diff
        .modified
        .union(&diff.added)
        .chain(diff.removed.iter())
        .cloned()
        .collect();

    let mine = entries
        .iter()
        .position(|e| e.is(manager, APPLY, None, &want));
    let mut conflicts = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        if Some(i) == mine {
            continue;
        }
        for path in entry.fields.intersection(&changed) {
            conflicts.push(Conflict {
                manager: entry.manager.clone(),
                description: entry.describe(),
                field: display_path(path),
            });
        }
    }
    if !conflicts.is_empty() && !force && !csa_upgrade(info, manager, live, &conflicts) {
        conflicts.sort_by(|a, b| (&a.description, &a.field).cmp(&(&b.description, &b.field)));
        return Err(ApplyError::Conflicts { conflicts });
    }
    // Forced (or upgraded from client-side apply): the others lose the
    // fields this apply changes.
    for (i, entry) in entries.iter_mut().enumerate() {
        if Some(i) != mine {
            entry.fields.retain(|p| !changed.contains(p));
        }
    }

    // Remove what this manager applied before, omits now, and nobody else owns.
    let previous = mine.map(|i| entries[i].fields.clone()).unwrap_or_default();
    let others: FieldSet = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != mine)
        .flat_map(|(_, e)| e.fields.iter().cloned())
        .collect();
    for path in previous.difference(&config_set) {
        let kept = others.contains(path)
            || has_descendant(&others, path)
            || has_descendant(&config_set, path);
        if !kept {
            remove_path(&mut merged, path);
        }
    }
    let final_set = updates.object_set(&merged, scope).unwrap_or_default();
    let gone: FieldSet = live_set.difference(&final_set).cloned().collect();
    for entry in &mut entries {
        entry.fields.retain(|p| !gone.contains(p));
    }

    match mine {
        Some(i) => {
            if previous != config_set {
                entries[i].time = Some(now.to_string());
            }
            entries[i].fields = config_set;
        }
        None => entries.push(Entry {
            manager: manager.to_string(),
            operation: APPLY.to_string(),
            api_version: want,
            time: Some(now.to_string()),
            subresource: None,
            fields: config_set,
        }),
    }
    if manager == KUBECTL {
        sync_last_applied(&mut merged, body);
    }
    store_managed(&mut merged, entries);
    Ok(merged)
}

/// kubectl's client-side apply annotation.
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The manager of `kubectl apply --server-side`, which upstream lets take
/// over from client-side apply.
const KUBECTL: &str = "kubectl";

/// Upstream's upgrade path from client-side to server-side apply: for the
/// `kubectl` manager, conflicts are forgiven when every one of them is a
/// field of the last-applied configuration and the live object still holds
/// the last-applied values.
fn csa_upgrade(
    info: &ResourceInfo,
    manager: &str,
    live: Option<&Value>,
    conflicts: &[Conflict],
) -> bool {
    if manager != KUBECTL {
        return false;
    }
    let Some(live) = live else { return false };
    let Some(last) = live
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(LAST_APPLIED_ANNOTATION))
        .and_then(Value::as_str)
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
    else {
        return false;
    };
    let walker = Walker {
        info,
        maps_are_members: false,
        strict: false,
    };
    let Ok(last_set) = walker.object_set(&last, Scope::of(info, None)) else {
        return false;
    };
    let unchanged = last_set
        .iter()
        .filter(|p| !has_descendant(&last_set, p))
        .all(|p| get_path(&last, p) == get_path(live, p));
    let fields: BTreeSet<String> = last_set.iter().map(|p| display_path(p)).collect();
    unchanged && conflicts.iter().all(|c| fields.contains(&c.field))
}

/// Keep an existing last-applied annotation in step with what `kubectl`
/// applies server-side, as upstream does.
fn sync_last_applied(obj: &mut Value, applied: &Map<String, Value>) {
    let Some(Value::Object(annotations)) = obj
        .get_mut("metadata")
        .and_then(|m| m.get_mut("annotations"))
    else {
        return;
    };
    if !annotations.contains_key(LAST_APPLIED_ANNOTATION) {
        return;
    }
    let mut config = applied.clone();
    if let Some(Value::Object(a)) = config
        .get_mut("metadata")
        .and_then(|m| m.get_mut("annotations"))
    {
        a.shift_remove(LAST_APPLIED_ANNOTATION);
    }
    annotations.insert(
        LAST_APPLIED_ANNOTATION.to_string(),
        Value::String(Value::Object(config).to_string()),
    );
}

/// Record a non-apply write (create, update, patch) by `manager` in
/// `new.metadata.managedFields` (operation `Update`, `subresource` e.g.
/// `Some("status")`): the manager takes ownership of the fields it set or
/// changed, other managers lose the fields whose values changed, and
/// everybody loses the fields that were removed.
///
/// As upstream, the live (`old`) `managedFields` are used unless the request
/// to the main resource carries its own; `managedFields: [{}]` resets them.
pub fn record_update(
    info: &ResourceInfo,
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    subresource: Option<&str>,
    now: &str,
) {
    let subresource = subresource.filter(|s| !s.is_empty());
    let requested = new
        .get("metadata")
        .and_then(|m| m.get("managedFields"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if subresource.is_none() && requested.len() == 1 && requested[0] == Value::Object(Map::new()) {
        store_managed(new, Vec::new());
        return;
    }
    let mut entries = if subresource.is_none() && !requested.is_empty() {
        decode_managed(new)
    } else {
        old.map(decode_managed).unwrap_or_default()
    };

    let scope = Scope::of(info, subresource);
    let walker = Walker {
        info,
        maps_are_members: true,
        strict: false,
    };
    let new_set = walker.object_set(new, scope).unwrap_or_default();
    let (diff, changed) = match old {
        // A create adds every field it sets.
        None => (Diff::default(), new_set),
        Some(old) => {
            let old_set = walker.object_set(old, scope).unwrap_or_default();
            let diff = compare(old, &old_set, new, &new_set);
            let changed: FieldSet = diff.modified.union(&diff.added).cloned().collect();
            (diff, changed)
        }
    };

    let api_version = info.api_version();
    let mine = entries
        .iter()
        .position(|e| e.is(manager, UPDATE, subresource, &api_version));
    for (i, entry) in entries.iter_mut().enumerate() {
        entry
            .fields
            .retain(|p| !diff.removed.contains(p) && (Some(i) == mine || !changed.contains(p)));
    }
    match mine {
        Some(i) => {
            let before = entries[i].fields.clone();
            entries[i].fields.extend(changed);
            if entries[i].fields != before {
                entries[i].time = Some(now.to_string());
            }
        }
        None => entries.push(Entry {
            manager: manager.to_string(),
            operation: UPDATE.to_string(),
            api_version,
            time: Some(now.to_string()),
            subresource: subresource.map(str::to_string),
            fields: changed,
        }),
    }
    store_managed(new, entries);
}

const APPLY: &str = "Apply";
const UPDATE: &str = "Update";

/// Metadata the server sets, never owned.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "selfLink",
    "managedFields",
];

/// Which top-level fields a write may own.
#[derive(Debug, Clone, Copy)]
enum Scope {
    All,
    NoStatus,
    StatusOnly,
}

impl Scope {
    fn of(info: &ResourceInfo, subresource: Option<&str>) -> Scope {
        match subresource {
            Some("status") => Scope::StatusOnly,
            _ if info.has(Subresource::Status) => Scope::NoStatus,
            _ => Scope::All,
        }
    }

    fn includes(self, field: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::NoStatus => field != "status",
            Scope::StatusOnly => field == "status",
        }
    }
}

/// Maps of free-form keys (`map[string]…`): owned as a whole (`.`) by the
/// write that creates them, besides their keys.
fn granular_map(names: &[String]) -> bool {
    names.last().is_some_and(|n| {
        matches!(
            n.as_str(),
            "labels"
                | "annotations"
                | "data"
                | "binaryData"
                | "stringData"
                | "limits"
                | "requests"
                | "capacity"
                | "allocatable"
                | "overhead"
        )
    })
}

/// Maps and structs replaced as a whole (`+mapType=atomic`,
/// `+structType=atomic`): label selectors and node selectors.
fn atomic_map(info: &ResourceInfo, names: &[String]) -> bool {
    match names {
        [spec, selector] if spec == "spec" && selector == "selector" => {
            matches!(info.kind, "Deployment" | "ReplicaSet" | "Service")
        }
        [.., last] => matches!(
            last.as_str(),
            "nodeSelector" | "labelSelector" | "namespaceSelector"
        ),
        [] => false,
    }
}

/// Computes the field set of an object.
struct Walker<'a> {
    info: &'a ResourceInfo,
    /// Whether free-form maps are members themselves (writes other than
    /// apply, which own the maps they create).
    maps_are_members: bool,
    /// Whether a keyed list element without its keys, or a duplicate key,
    /// is an error (apply) rather than making the list atomic.
    strict: bool,
}

impl Walker<'_> {
    fn object_set(&self, obj: &Value, scope: Scope) -> Result<FieldSet, ListError> {
        let mut out = FieldSet::new();
        let Value::Object(root) = obj else {
            return Ok(out);
        };
        let mut names = Vec::new();
        let mut path = Vec::new();
        for (k, v) in root {
            if k == "apiVersion" || k == "kind" || !scope.includes(k) {
                continue;
            }
            if k == "metadata" {
                let Value::Object(meta) = v else { continue };
                for (mk, mv) in meta {
                    if SERVER_METADATA.contains(&mk.as_str()) {
                        continue;
                    }
                    names.extend(["metadata".to_string(), mk.clone()]);
                    path.extend(["f:metadata".to_string(), format!("f:{mk}")]);
                    self.walk(mv, &mut names, &mut path, &mut out)?;
                    names.clear();
                    path.clear();
                }
                continue;
            }
            names.push(k.clone());
            path.push(format!("f:{k}"));
            self.walk(v, &mut names, &mut path, &mut out)?;
            names.pop();
            path.pop();
        }
        Ok(out)
    }

    fn walk(
        &self,
        value: &Value,
        names: &mut Vec<String>,
        path: &mut Path,
        out: &mut FieldSet,
    ) -> Result<(), ListError> {
        match value {
            Value::Object(map) if !map.is_empty() && !atomic_map(self.info, names) => {
                if self.maps_are_members && granular_map(names) {
                    out.insert(path.clone());
                }
                self.walk_fields(map, names, path, out)
            }
            Value::Array(items) if !items.is_empty() => {
                match apply_list_strategy(self.info, names) {
                    ListStrategy::Atomic => {
                        out.insert(path.clone());
                    }
                    ListStrategy::Set => {
                        for item in items {
                            let mut p = path.clone();
                            p.push(format!("v:{item}"));
                            out.insert(p);
                        }
                    }
                    ListStrategy::MergeByKey(keys) => match element_keys(items, keys) {
                        Ok(elements) => {
                            for (item, element) in items.iter().zip(elements) {
                                path.push(element);
                                out.insert(path.clone());
                                if let Value::Object(map) = item {
                                    self.walk_fields(map, names, path, out)?;
                                }
                                path.pop();
                            }
                        }
                        Err(e) if self.strict => {
                            return Err(ListError::At {
                                path: display_path(path),
                                error: Box::new(e),
                            });
                        }
                        Err(_) => {
                            out.insert(path.clone());
                        }
                    },
                }
                Ok(())
            }
            _ => {
                out.insert(path.clone());
                Ok(())
            }
        }
    }

    fn walk_fields(
        &self,
        map: &Map<String, Value>,
        names: &mut Vec<String>,
        path: &mut Path,
        out: &mut FieldSet,
    ) -> Result<(), ListError> {
        for (k, v) in map {
            names.push(k.clone());
            path.push(format!("f:{k}"));
            let walked = self.walk(v, names, path, out);
            names.pop();
            path.pop();
            walked?;
        }
        Ok(())
    }
}

/// A key field's value in a list element; `protocol` defaults to `TCP` as
/// upstream's list-map keys allow.
fn key_value(item: &Value, key: &str) -> Option<Value> {
    match item.get(key) {
        Some(v) if !v.is_null() => Some(v.clone()),
        _ if key == "protocol" => Some(Value::String("TCP".to_string())),
        _ => None,
    }
}

/// The `k:{…}` path element of every element of a keyed list.
/// Why a keyed list has no field set, with upstream's structured-merge-diff
/// messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// An element that is not an object.
    #[error("element {element}: expected an object")]
    NotObject {
        /// The element's index.
        element: usize,
    },
    /// An element without one of the list's key fields.
    #[error(
        "element {element}: associative list with keys has an element that omits key field {key:?} (and doesn't have default value)"
    )]
    MissingKey {
        /// The element's index.
        element: usize,
        /// The key field.
        key: String,
    },
    /// Two elements with the same key.
    #[error("duplicate entries for key {key}")]
    Duplicate {
        /// The key, as upstream prints a path.
        key: String,
    },
    /// The same, somewhere inside an object (the strict walk of an apply
    /// configuration).
    #[error("{path}: {error}")]
    At {
        /// Where, as upstream prints a path.
        path: String,
        /// What (printed on the same line, as upstream does, so not a
        /// `#[source]`).
        error: Box<ListError>,
    },
}

fn element_keys(items: &[Value], keys: &[&str]) -> Result<Vec<String>, ListError> {
    let mut sorted: Vec<&str> = keys.to_vec();
    sorted.sort_unstable();
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if !item.is_object() {
            return Err(ListError::NotObject { element: i });
        }
        let mut key = Map::new();
        for k in &sorted {
            let Some(v) = key_value(item, k) else {
                return Err(ListError::MissingKey {
                    element: i,
                    key: k.to_string(),
                });
            };
            key.insert(k.to_string(), v);
        }
        let element = format!("k:{}", Value::Object(key));
        if !seen.insert(element.clone()) {
            return Err(ListError::Duplicate {
                key: display_path(&[element]),
            });
        }
        out.push(element);
    }
    Ok(out)
}

fn same_key(a: &Value, b: &Value, keys: &[&str]) -> bool {
    keys.iter().all(|k| key_value(a, k) == key_value(b, k))
}

/// Merge an apply configuration into the live object: maps merge, keyed
/// lists merge by key, sets are unions, everything else is replaced; a
/// `null` removes the field.
fn merge_applied(
    info: &ResourceInfo,
    live: Value,
    applied: &Value,
    names: &mut Vec<String>,
) -> Value {
    match (live, applied) {
        (Value::Object(mut live), Value::Object(applied)) if !atomic_map(info, names) => {
            for (k, v) in applied {
                if v.is_null() {
                    live.shift_remove(k);
                    continue;
                }
                names.push(k.clone());
                let base = live.get_mut(k).map(std::mem::take).unwrap_or(Value::Null);
                let merged = merge_applied(info, base, v, names);
                names.pop();
                live.insert(k.clone(), merged);
            }
            Value::Object(live)
        }
        (Value::Array(mut live), Value::Array(applied)) => match apply_list_strategy(info, names) {
            ListStrategy::Atomic => strip_nulls(&Value::Array(applied.clone())),
            ListStrategy::Set => {
                for item in applied {
                    if !live.contains(item) {
                        live.push(item.clone());
                    }
                }
                Value::Array(live)
            }
            ListStrategy::MergeByKey(keys) => {
                for item in applied {
                    match live.iter().position(|l| same_key(l, item, keys)) {
                        Some(i) => {
                            let base = std::mem::take(&mut live[i]);
                            live[i] = merge_applied(info, base, item, names);
                        }
                        None => live.push(strip_nulls(item)),
                    }
                }
                Value::Array(live)
            }
        },
        (_, applied) => strip_nulls(applied),
    }
}

/// The value without `null` object fields.
fn strip_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_nulls).collect()),
        other => other.clone(),
    }
}

/// What changed between two objects, by path.
#[derive(Default)]
struct Diff {
    added: FieldSet,
    removed: FieldSet,
    modified: FieldSet,
}

fn compare(old: &Value, old_set: &FieldSet, new: &Value, new_set: &FieldSet) -> Diff {
    let modified = old_set
        .intersection(new_set)
        .filter(|p| {
            !has_descendant(old_set, p)
                && !has_descendant(new_set, p)
                && get_path(old, p) != get_path(new, p)
        })
        .cloned()
        .collect();
    // A path that only changed shape (an empty `{}` leaf that gained
    // children, or the reverse) is neither added nor removed.
    Diff {
        added: new_set
            .difference(old_set)
            .filter(|p| get_path(old, p).is_none())
            .cloned()
            .collect(),
        removed: old_set
            .difference(new_set)
            .filter(|p| get_path(new, p).is_none())
            .cloned()
            .collect(),
        modified,
    }
}

fn has_descendant(set: &FieldSet, path: &Path) -> bool {
    set.range::<Path, _>((Bound::Excluded(path), Bound::Unbounded))
        .next()
        .is_some_and(|p| p.starts_with(path))
}

/// Whether a list element matches a `k:{…}` key.
fn matches_key(item: &Value, key: &Map<String, Value>) -> bool {
    key.iter()
        .all(|(k, want)| key_value(item, k).as_ref() == Some(want))
}

/// The position of the child a path element names, in a list.
fn list_position(items: &[Value], element: &str) -> Option<usize> {
    if let Some(key) = element.strip_prefix("k:") {
        let key: Map<String, Value> = serde_json::from_str(key).ok()?;
        items.iter().position(|i| matches_key(i, &key))
    } else if let Some(value) = element.strip_prefix("v:") {
        let value: Value = serde_json::from_str(value).ok()?;
        items.iter().position(|i| *i == value)
    } else {
        element.strip_prefix("i:")?.parse().ok()
    }
}

fn get_path<'v>(mut value: &'v Value, path: &[String]) -> Option<&'v Value> {
    for element in path {
        value = match element.strip_prefix("f:") {
            Some(field) => value.get(field)?,
            None => {
                let items = value.as_array()?;
                items.get(list_position(items, element)?)?
            }
        };
    }
    Some(value)
}

fn remove_path(root: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut value = root;
    for element in parents {
        let next = match element.strip_prefix("f:") {
            Some(field) => value.get_mut(field),
            None => match value.as_array_mut() {
                Some(items) => match list_position(items, element) {
                    Some(i) => items.get_mut(i),
                    None => None,
                },
                None => None,
            },
        };
        match next {
            Some(v) => value = v,
            None => return,
        }
    }
    match (last.strip_prefix("f:"), value) {
        (Some(field), Value::Object(map)) => {
            map.shift_remove(field);
        }
        (None, Value::Array(items)) => {
            if let Some(i) = list_position(items, last) {
                items.remove(i);
            }
        }
        _ => {}
    }
}

/// A path as upstream prints it: `.spec.containers[name="web"].image`.
fn display_path(path: &[String]) -> String {
    let mut out = String::new();
    for element in path {
        if let Some(field) = element.strip_prefix("f:") {
            out.push('.');
            out.push_str(field);
        } else if let Some(key) = element.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(value) = element.strip_prefix("v:") {
            out.push_str(&format!("[={value}]"));
        } else if let Some(index) = element.strip_prefix("i:") {
            out.push_str(&format!("[{index}]"));
        }
    }
    out
}

/// One `managedFields` entry.
#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: Option<String>,
    subresource: Option<String>,
    fields: FieldSet,
}

impl Entry {
    /// Whether this is the entry of `manager` doing `operation`; updates are
    /// told apart by apiVersion too, applies are not (as upstream).
    fn is(
        &self,
        manager: &str,
        operation: &str,
        subresource: Option<&str>,
        api_version: &str,
    ) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
            && (operation == APPLY || self.api_version == api_version)
    }

    /// The manager as upstream prints it in conflicts.
    fn describe(&self) -> String {
        let mut out = Value::String(self.manager.clone()).to_string();
        if let Some(sub) = &self.subresource {
            out.push_str(&format!(" with subresource {}", Value::String(sub.clone())));
        }
        if self.operation == UPDATE {
            out.push_str(&format!(" using {}", self.api_version));
        }
        out
    }

    fn from_json(value: &Value) -> Option<Entry> {
        let text = |k: &str| value.get(k).and_then(Value::as_str).map(str::to_string);
        let mut fields = FieldSet::new();
        if let Some(v1) = value.get("fieldsV1") {
            decode_fields(v1, &mut Vec::new(), &mut fields);
        }
        Some(Entry {
            manager: text("manager").unwrap_or_default(),
            operation: text("operation")?,
            api_version: text("apiVersion").unwrap_or_default(),
            time: text("time"),
            subresource: text("subresource").filter(|s| !s.is_empty()),
            fields,
        })
    }

    fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("manager".into(), Value::String(self.manager.clone()));
        out.insert("operation".into(), Value::String(self.operation.clone()));
        out.insert("apiVersion".into(), Value::String(self.api_version.clone()));
        if let Some(time) = &self.time {
            out.insert("time".into(), Value::String(time.clone()));
        }
        out.insert("fieldsType".into(), Value::String("FieldsV1".into()));
        out.insert("fieldsV1".into(), encode_fields(&self.fields));
        if let Some(sub) = &self.subresource {
            out.insert("subresource".into(), Value::String(sub.clone()));
        }
        Value::Object(out)
    }
}

fn decode_managed(obj: &Value) -> Vec<Entry> {
    obj.get("metadata")
        .and_then(|m| m.get("managedFields"))
        .and_then(Value::as_array)
        .map(|entries| entries.iter().filter_map(Entry::from_json).collect())
        .unwrap_or_default()
}

/// Write the entries, sorted as upstream (operation, time, manager,
/// apiVersion, subresource), dropping empty ones.
fn store_managed(obj: &mut Value, mut entries: Vec<Entry>) {
    entries.retain(|e| !e.fields.is_empty());
    entries.sort_by(|a, b| {
        (
            &a.operation,
            &a.time,
            &a.manager,
            &a.api_version,
            &a.subresource,
        )
            .cmp(&(
                &b.operation,
                &b.time,
                &b.manager,
                &b.api_version,
                &b.subresource,
            ))
    });
    let Some(Value::Object(meta)) = obj.as_object_mut().map(|o| {
        o.entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()))
    }) else {
        return;
    };
    if entries.is_empty() {
        meta.shift_remove("managedFields");
    } else {
        let list = entries.iter().map(Entry::to_json).collect();
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

fn decode_fields(value: &Value, prefix: &mut Path, out: &mut FieldSet) {
    let Value::Object(map) = value else { return };
    for (k, child) in map {
        if k == "." {
            out.insert(prefix.clone());
            continue;
        }
        prefix.push(k.clone());
        match child {
            Value::Object(c) if !c.is_empty() => decode_fields(child, prefix, out),
            _ => {
                out.insert(prefix.clone());
            }
        }
        prefix.pop();
    }
}

/// A field set as a `FieldsV1` tree: each node's children in order, and
/// `"."` first in a node that is a member itself and has children.
///
/// The set is sorted, so a path comes before its descendants and siblings
/// in order: the tree is built in one pass, in its final key order. A node
/// is created empty (`{}`) either as a member leaf or on the way to a
/// descendant; an empty node that gains its first child while it is a
/// member (it was the previous path's end) gets its `"."` then.
fn encode_fields(set: &FieldSet) -> Value {
    let mut root = Map::new();
    // The empty path (the object itself), if there, sorts first.
    if set.first().is_some_and(Vec::is_empty) && set.len() > 1 {
        root.insert(".".into(), Value::Object(Map::new()));
    }
    for path in set.iter().filter(|p| !p.is_empty()) {
        let mut node = &mut root;
        for (i, element) in path.iter().enumerate() {
            let last = i + 1 == path.len();
            if !node.contains_key(element.as_str()) {
                node.insert(element.clone(), Value::Object(Map::new()));
            } else if !last {
                // Descending into an existing node: if it is still an
                // empty member leaf, it becomes a member with children.
                if let Some(Value::Object(child)) = node.get_mut(element.as_str())
                    && child.is_empty()
                {
                    child.insert(".".into(), Value::Object(Map::new()));
                }
            }
            let Some(Value::Object(child)) = node.get_mut(element.as_str()) else {
                unreachable!("every node is an object");
            };
            node = child;
        }
    }
    Value::Object(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use skiff_common::registry::find_kind;

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-01-01T00:01:00Z";
    const T2: &str = "2026-01-01T00:02:00Z";

    fn deploy() -> &'static ResourceInfo {
        find_kind("apps/v1", "Deployment").expect("deployments served")
    }

    fn config(replicas: Option<i64>, image: &str, labels: Value) -> Value {
        let mut spec = json!({
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": image,
                    "ports": [{"containerPort": 80}]}]}
            }
        });
        if let Some(r) = replicas {
            spec["replicas"] = json!(r);
        }
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "labels": labels},
            "spec": spec
        })
    }

    /// What the store would add on create.
    fn stored(mut obj: Value) -> Value {
        obj["metadata"]["uid"] = json!("u-1");
        obj["metadata"]["resourceVersion"] = json!("5");
        obj["metadata"]["creationTimestamp"] = json!(T0);
        obj["status"] = json!({"replicas": 0});
        obj
    }

    fn entry<'a>(obj: &'a Value, manager: &str) -> Option<&'a Value> {
        obj["metadata"]["managedFields"]
            .as_array()
            .expect("managedFields present")
            .iter()
            .find(|e| e["manager"] == manager)
    }

    #[test]
    fn manager_defaults_to_the_user_agent_prefix() {
        assert_eq!(
            manager_or_user_agent(Some("helm"), Some("kubectl/v1")),
            "helm"
        );
        assert_eq!(
            manager_or_user_agent(
                Some(""),
                Some("kubectl/v1.37.0 (linux/amd64) kubernetes/abc")
            ),
            "kubectl"
        );
        assert_eq!(manager_or_user_agent(None, None), "");
        assert_eq!(
            manager_or_user_agent(None, Some(&"x".repeat(300))).len(),
            FIELD_MANAGER_MAX_LENGTH
        );
    }

    #[test]
    fn apply_create_records_managed_fields_for_kubectl() {
        let applied = config(Some(2), "nginx:1", json!({"app": "web"}));
        let out = server_side_apply(deploy(), None, &applied, "kubectl", false, T0)
            .expect("apply creates");
        assert_eq!(out["spec"]["replicas"], 2);
        assert_eq!(out["metadata"]["name"], "web");
        let managed = out["metadata"]["managedFields"]
            .as_array()
            .expect("managedFields");
        assert_eq!(managed.len(), 1);
        let port = r#"k:{"containerPort":80,"protocol":"TCP"}"#;
        assert_eq!(
            managed[0],
            json!({
                "manager": "kubectl", "operation": "Apply", "apiVersion": "apps/v1",
                "time": T0, "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:metadata": {"f:labels": {"f:app": {}}},
                    "f:spec": {
                        "f:replicas": {},
                        "f:selector": {},
                        "f:template": {
                            "f:metadata": {"f:labels": {"f:app": {}}},
                            "f:spec": {"f:containers": {r#"k:{"name":"web"}"#: {
                                ".": {}, "f:image": {}, "f:name": {},
                                "f:ports": {port: {".": {}, "f:containerPort": {}}}
                            }}}
                        }
                    }
                }
            })
        );
    }

    #[test]
    fn second_apply_omitting_a_field_removes_it() {
        let first = config(Some(2), "nginx:1", json!({"app": "web", "tier": "front"}));
        let live = stored(
            server_side_apply(deploy(), None, &first, "kubectl", false, T0).expect("create"),
        );
        let second = config(None, "nginx:1", json!({"app": "web"}));
        let out = server_side_apply(deploy(), Some(&live), &second, "kubectl", false, T1)
            .expect("second apply");
        assert!(out["spec"].get("replicas").is_none(), "{out:#}");
        assert_eq!(out["metadata"]["labels"], json!({"app": "web"}));
        assert_eq!(out["status"], json!({"replicas": 0}), "status untouched");
        assert_eq!(out["metadata"]["uid"], "u-1");
        let fields = &entry(&out, "kubectl").expect("kubectl entry")["fieldsV1"];
        assert!(fields["f:spec"].get("f:replicas").is_none());
        assert_eq!(entry(&out, "kubectl").expect("entry")["time"], T1);
    }

    #[test]
    fn omitted_field_owned_by_another_manager_stays() {
        let first = config(Some(2), "nginx:1", json!({"app": "web"}));
        let live =
            stored(server_side_apply(deploy(), None, &first, "a", false, T0).expect("create"));
        let live = stored(
            server_side_apply(deploy(), Some(&live), &first, "b", false, T1).expect("co-own"),
        );
        let without = config(None, "nginx:1", json!({"app": "web"}));
        let out = server_side_apply(deploy(), Some(&live), &without, "a", false, T2)
            .expect("apply without replicas");
        assert_eq!(out["spec"]["replicas"], 2, "b still owns replicas");
    }

    #[test]
    fn conflicting_apply_names_the_owner_and_force_takes_over() {
        let a = config(Some(2), "nginx:1", json!({"app": "web"}));
        let live = stored(server_side_apply(deploy(), None, &a, "a", false, T0).expect("create"));
        let b = config(Some(2), "nginx:2", json!({"app": "web"}));
        let err = server_side_apply(deploy(), Some(&live), &b, "b", false, T1)
            .expect_err("b changes a's image");
        let ApplyError::Conflicts { conflicts } = &err else {
            panic!("want conflicts, got {err}");
        };
        assert_eq!(
            conflicts,
            &[Conflict {
                manager: "a".into(),
                description: "\"a\"".into(),
                field: ".spec.template.spec.containers[name=\"web\"].image".into(),
            }]
        );
        assert_eq!(err.http_code(), 409);
        assert_eq!(
            err.message(),
            "Apply failed with 1 conflict: conflict with \"a\": .spec.template.spec.containers[name=\"web\"].image"
        );

        let out = server_side_apply(deploy(), Some(&live), &b, "b", true, T1).expect("forced");
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"][0]["image"],
            "nginx:2"
        );
        let a_fields = &entry(&out, "a").expect("a keeps other fields")["fieldsV1"];
        let a_web =
            &a_fields["f:spec"]["f:template"]["f:spec"]["f:containers"][r#"k:{"name":"web"}"#];
        assert!(
            a_web.get("f:image").is_none(),
            "a lost the image: {a_fields:#}"
        );
        assert!(a_web.get("f:name").is_some(), "a still co-owns the name");
        let b_web = &entry(&out, "b").expect("b entry")["fieldsV1"]["f:spec"]["f:template"]["f:spec"]
            ["f:containers"][r#"k:{"name":"web"}"#];
        assert!(b_web.get("f:image").is_some());
    }

    #[test]
    fn scale_then_server_side_apply_conflicts_on_replicas() {
        // Client-side `kubectl apply` creates the object…
        let created = config(Some(2), "nginx:1", json!({"app": "web"}));
        let mut live = stored(created.clone());
        record_update(
            deploy(),
            None,
            &mut live,
            "kubectl-client-side-apply",
            None,
            T0,
        );
        let csa = entry(&live, "kubectl-client-side-apply").expect("csa entry");
        assert_eq!(csa["operation"], "Update");
        assert_eq!(
            csa["fieldsV1"]["f:metadata"]["f:labels"],
            json!({".": {}, "f:app": {}})
        );
        assert!(csa["fieldsV1"].get("f:status").is_none());
        // …`kubectl scale` changes the replicas through /scale…
        let mut scaled = live.clone();
        scaled["spec"]["replicas"] = json!(5);
        record_update(
            deploy(),
            Some(&live),
            &mut scaled,
            "kubectl-scale",
            Some("scale"),
            T1,
        );
        let csa = entry(&scaled, "kubectl-client-side-apply").expect("csa entry");
        assert!(
            csa["fieldsV1"]["f:spec"].get("f:replicas").is_none(),
            "csa lost replicas"
        );
        let scale = entry(&scaled, "kubectl-scale").expect("scale entry");
        assert_eq!(scale["subresource"], "scale");
        assert_eq!(scale["fieldsV1"], json!({"f:spec": {"f:replicas": {}}}));

        // …and `kubectl apply --server-side` with the old count conflicts.
        let err = server_side_apply(deploy(), Some(&scaled), &created, "kubectl", false, T2)
            .expect_err("replicas owned by kubectl-scale");
        assert_eq!(
            err.message(),
            "Apply failed with 1 conflict: conflict with \"kubectl-scale\" with subresource \"scale\" using apps/v1: .spec.replicas"
        );
        let ApplyError::Conflicts { conflicts } = &err else {
            panic!("want conflicts, got {err}");
        };
        assert_eq!(conflicts[0].manager, "kubectl-scale");
        assert_eq!(
            conflicts[0].cause_message(),
            "conflict with \"kubectl-scale\" with subresource \"scale\" using apps/v1"
        );
        // Applying the live count is no conflict: ownership is shared.
        let same = config(Some(5), "nginx:1", json!({"app": "web"}));
        let out = server_side_apply(deploy(), Some(&scaled), &same, "kubectl", false, T2)
            .expect("same value does not conflict");
        assert!(entry(&out, "kubectl-scale").is_some());
    }

    #[test]
    fn several_conflicts_are_grouped_by_manager() {
        let conflicts = vec![
            Conflict {
                manager: "b".into(),
                description: "\"b\"".into(),
                field: ".spec.replicas".into(),
            },
            Conflict {
                manager: "a".into(),
                description: "\"a\" using v1".into(),
                field: ".data.x".into(),
            },
        ];
        let err = ApplyError::Conflicts { conflicts };
        assert_eq!(
            err.message(),
            "Apply failed with 2 conflicts: conflicts with \"a\" using v1:\n- .data.x\nconflicts with \"b\":\n- .spec.replicas"
        );
    }

    #[test]
    fn update_by_other_manager_takes_changed_fields_only() {
        let mut live = stored(config(Some(2), "nginx:1", json!({"app": "web"})));
        record_update(deploy(), None, &mut live, "creator", None, T0);
        let mut edited = live.clone();
        edited["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:2");
        edited["metadata"]["labels"]["extra"] = json!("1");
        edited["status"] = json!({"replicas": 7});
        record_update(deploy(), Some(&live), &mut edited, "kubectl-edit", None, T1);
        let edit = entry(&edited, "kubectl-edit").expect("edit entry");
        assert_eq!(
            edit["fieldsV1"],
            json!({
                "f:metadata": {"f:labels": {"f:extra": {}}},
                "f:spec": {"f:template": {"f:spec": {"f:containers": {
                    r#"k:{"name":"web"}"#: {"f:image": {}}}}}}
            })
        );
        let creator = &entry(&edited, "creator").expect("creator entry")["fieldsV1"];
        let web = &creator["f:spec"]["f:template"]["f:spec"]["f:containers"][r#"k:{"name":"web"}"#];
        assert!(web.get("f:image").is_none());
        assert!(web.get("f:name").is_some());
        // Entries stay sorted by operation, then time.
        let managers: Vec<&Value> = edited["metadata"]["managedFields"]
            .as_array()
            .expect("list")
            .iter()
            .map(|e| &e["manager"])
            .collect();
        assert_eq!(managers, ["creator", "kubectl-edit"]);

        // A status write owns only status.
        let mut status = edited.clone();
        status["status"]["replicas"] = json!(2);
        record_update(
            deploy(),
            Some(&edited),
            &mut status,
            "controller",
            Some("status"),
            T2,
        );
        let ctrl = entry(&status, "controller").expect("controller entry");
        assert_eq!(ctrl["fieldsV1"], json!({"f:status": {"f:replicas": {}}}));
    }

    #[test]
    fn invalid_apply_configurations_are_refused() {
        let good = config(Some(1), "nginx:1", json!({"app": "web"}));
        let mut wrong_version = good.clone();
        wrong_version["apiVersion"] = json!("apps/v1beta1");
        let mut managed = good.clone();
        managed["metadata"]["managedFields"] = json!([{"manager": "x"}]);
        let mut keyless = good.clone();
        keyless["spec"]["template"]["spec"]["containers"] = json!([{"image": "x"}]);
        let mut duplicate = good.clone();
        duplicate["spec"]["template"]["spec"]["containers"] = json!([{"name": "a"}, {"name": "a"}]);
        let cases = [
            (
                wrong_version,
                400,
                "Incorrect version specified in apply patch",
            ),
            (managed, 400, "metadata.managedFields must be nil"),
            (keyless, 422, "omits key field \"name\""),
            (duplicate, 422, "duplicate entries for key [name=\"a\"]"),
            (json!([1]), 400, "not an object"),
        ];
        for (body, code, text) in cases {
            let err = server_side_apply(deploy(), None, &body, "kubectl", false, T0)
                .expect_err("invalid configuration");
            assert_eq!(err.http_code(), code, "{err}");
            assert!(err.message().contains(text), "{err}");
        }
    }

    #[test]
    fn object_without_managed_fields_is_owned_before_first_apply() {
        let live = stored(config(Some(3), "nginx:1", json!({"app": "web"})));
        let applied = config(Some(4), "nginx:1", json!({"app": "web"}));
        let err = server_side_apply(deploy(), Some(&live), &applied, "kubectl", false, T1)
            .expect_err("replicas belong to before-first-apply");
        assert!(
            err.message()
                .contains("\"before-first-apply\" using apps/v1"),
            "{err}"
        );
    }

    #[test]
    fn fields_v1_roundtrips() {
        let v1 = json!({
            "f:metadata": {"f:finalizers": {".": {}, "v:\"a\"": {}}},
            "f:spec": {"f:ports": {r#"k:{"port":80,"protocol":"TCP"}"#: {".": {}, "f:port": {}}}}
        });
        let mut set = FieldSet::new();
        decode_fields(&v1, &mut Vec::new(), &mut set);
        assert_eq!(set.len(), 4);
        assert_eq!(encode_fields(&set), v1);
        let paths: Vec<String> = set.iter().map(|p| display_path(p)).collect();
        assert!(paths.contains(&".spec.ports[port=80,protocol=\"TCP\"].port".to_string()));
        assert!(paths.contains(&".metadata.finalizers[=\"a\"]".to_string()));
    }

    #[test]
    fn fields_v1_is_written_in_upstream_key_order() {
        let paths: &[&[&str]] = &[
            &["f:spec", "f:template", "f:spec", "f:containers"],
            &["f:metadata", "f:labels"],
            &["f:metadata", "f:labels", "f:b"],
            &["f:metadata", "f:labels", "f:a"],
            &["f:metadata", "f:annotations", "f:x"],
            &["f:spec", "f:replicas"],
            &["f:spec", "f:template", "f:metadata", "f:labels", "f:app"],
            &["f:spec", "f:template", "f:metadata", "f:labels"],
        ];
        let set: FieldSet = paths
            .iter()
            .map(|p| p.iter().map(|e| e.to_string()).collect())
            .collect();
        assert_eq!(
            encode_fields(&set).to_string(),
            concat!(
                r#"{"f:metadata":{"f:annotations":{"f:x":{}},"f:labels":{".":{},"f:a":{},"f:b":{}}},"#,
                r#""f:spec":{"f:replicas":{},"f:template":{"f:metadata":{"f:labels":{".":{},"f:app":{}}},"#,
                r#""f:spec":{"f:containers":{}}}}}"#
            ),
            "children sorted, \".\" first in a member that has children"
        );
        let mut with_root = set.clone();
        with_root.insert(Vec::new());
        assert!(
            encode_fields(&with_root)
                .to_string()
                .starts_with(r#"{".":{},"f:metadata":"#)
        );
    }

    #[test]
    fn apply_body_parses_yaml_and_json() {
        let yaml = parse_apply_body(b"apiVersion: v1\nkind: ConfigMap\ndata:\n  a: \"1\"\n")
            .expect("yaml parses");
        assert_eq!(yaml["data"]["a"], "1");
        let json = parse_apply_body(br#"{"kind":"ConfigMap"}"#).expect("json parses");
        assert_eq!(json["kind"], "ConfigMap");
        let err = parse_apply_body(b"a: [").expect_err("broken yaml");
        assert_eq!(err.http_code(), 400);
    }

    #[test]
    fn omitted_list_items_are_removed_and_shape_changes_do_not_conflict() {
        let mut two = config(Some(1), "nginx:1", json!({"app": "web"}));
        two["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .expect("containers")
            .push(json!({"name": "sidecar", "image": "envoy"}));
        two["spec"]["template"]["spec"]["securityContext"] = json!({});
        two["metadata"]["finalizers"] = json!(["a", "b"]);
        let live = stored(server_side_apply(deploy(), None, &two, "a", false, T0).expect("create"));

        let mut one = config(Some(1), "nginx:1", json!({"app": "web"}));
        one["metadata"]["finalizers"] = json!(["a"]);
        let out = server_side_apply(deploy(), Some(&live), &one, "a", false, T1).expect("apply");
        let names: Vec<&Value> = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .map(|c| &c["name"])
            .collect();
        assert_eq!(names, ["web"]);
        assert_eq!(out["metadata"]["finalizers"], json!(["a"]));
        assert!(
            out["spec"]["template"]["spec"]
                .get("securityContext")
                .is_none()
        );

        // b filling in a's empty securityContext is no conflict.
        let mut filled = two.clone();
        filled["spec"]["template"]["spec"]["securityContext"] = json!({"runAsUser": 1});
        let out = server_side_apply(deploy(), Some(&live), &filled, "b", false, T1)
            .expect("no conflict on a shape change");
        assert_eq!(
            out["spec"]["template"]["spec"]["securityContext"]["runAsUser"],
            1
        );
    }

    #[test]
    fn kubectl_upgrades_from_client_side_apply_without_conflicts() {
        let old = config(Some(2), "nginx:1", json!({"app": "web"}));
        let mut live = old.clone();
        live["metadata"]["annotations"] = json!({LAST_APPLIED_ANNOTATION: old.to_string()});
        let mut live = stored(live);
        record_update(
            deploy(),
            None,
            &mut live,
            "kubectl-client-side-apply",
            None,
            T0,
        );

        let new = config(Some(3), "nginx:1", json!({"app": "web"}));
        let err = server_side_apply(deploy(), Some(&live), &new, "helm", false, T1)
            .expect_err("other managers still conflict");
        assert!(err.message().contains("kubectl-client-side-apply"), "{err}");

        let out = server_side_apply(deploy(), Some(&live), &new, "kubectl", false, T1)
            .expect("kubectl takes over from client-side apply");
        assert_eq!(out["spec"]["replicas"], 3);
        let csa = &entry(&out, "kubectl-client-side-apply").expect("csa entry")["fieldsV1"];
        assert!(csa["f:spec"].get("f:replicas").is_none());
        let last: Value = serde_json::from_str(
            out["metadata"]["annotations"][LAST_APPLIED_ANNOTATION]
                .as_str()
                .expect("annotation kept"),
        )
        .expect("annotation is json");
        assert_eq!(last["spec"]["replicas"], 3);
    }
}
