//! PATCH semantics of the API server: JSON patch (RFC 6902), JSON merge
//! patch (RFC 7396) and Kubernetes strategic merge patch, plus the table of
//! list merge strategies the strategic merge patch and server-side apply
//! ([`crate::apply`]) share.
//!
//! Strategic merge patch follows upstream's
//! `k8s.io/apimachinery/pkg/util/strategicpatch` as the API server runs it
//! (parallel lists merged, nulls for absent keys ignored): maps merge
//! recursively and `null` deletes a key; lists with a patch merge key merge
//! element-wise by that key (new elements appended in patch order);
//! primitive lists with the merge strategy are sets; every other list is
//! replaced. The directives `$patch: replace|delete` (on maps and list
//! elements), `$retainKeys`, `$setElementOrder/<field>` and
//! `$deleteFromPrimitiveList/<field>` are honoured.
//!
//! The merge keys come from the `patchStrategy`/`patchMergeKey` struct tags
//! and the `+listType`/`+listMapKey` markers of `k8s.io/api` for the kinds in
//! [`crate::registry`]; pod-spec and container rules apply wherever a pod
//! spec appears (a Pod's `spec`, a workload's `spec.template.spec`).

use serde_json::{Map, Value};

use skiff_common::registry::ResourceInfo;

/// The four PATCH body formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// RFC 6902 JSON patch, `application/json-patch+json`.
    Json,
    /// RFC 7396 JSON merge patch, `application/merge-patch+json`.
    Merge,
    /// Kubernetes strategic merge patch, `application/strategic-merge-patch+json`.
    StrategicMerge,
    /// Server-side apply, `application/apply-patch+yaml` (see [`crate::apply`]).
    Apply,
}

impl PatchType {
    /// The patch type of a request `Content-Type`; parameters such as
    /// `;charset=utf-8` are ignored. `None` for an unsupported media type.
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        let media = ct.split(';').next().unwrap_or_default().trim();
        [
            ("application/json-patch+json", PatchType::Json),
            ("application/merge-patch+json", PatchType::Merge),
            (
                "application/strategic-merge-patch+json",
                PatchType::StrategicMerge,
            ),
            ("application/apply-patch+yaml", PatchType::Apply),
        ]
        .into_iter()
        .find(|(name, _)| media.eq_ignore_ascii_case(name))
        .map(|(_, ty)| ty)
    }

    /// The media type of this patch format.
    pub fn content_type(self) -> &'static str {
        match self {
            PatchType::Json => "application/json-patch+json",
            PatchType::Merge => "application/merge-patch+json",
            PatchType::StrategicMerge => "application/strategic-merge-patch+json",
            PatchType::Apply => "application/apply-patch+yaml",
        }
    }
}

/// Upstream's limit on the operations of one JSON patch.
pub const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

/// Why a patch could not be applied. [`PatchError::http_code`] gives the
/// status upstream answers with.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The body is not valid JSON of the expected shape (400).
    #[error("error decoding patch")]
    Decode {
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A malformed strategic merge patch directive (400), with upstream's text.
    #[error("{message}")]
    BadRequest {
        /// What is wrong, e.g. `invalid patch format of retainKeys`.
        message: String,
    },
    /// A JSON patch with more operations than upstream allows (413).
    #[error("the allowed maximum operations in a JSON patch is {max}, got {got}")]
    TooManyOperations {
        /// The limit.
        max: usize,
        /// The operations in the request.
        got: usize,
    },
    /// A JSON patch operation failed: a `test` mismatch or a missing path (422).
    #[error(transparent)]
    JsonPatch {
        /// The failed operation.
        source: json_patch::PatchError,
    },
    /// A strategic merge patch upstream rejects as unprocessable (422), e.g.
    /// lists of lists.
    #[error("{message}")]
    Unprocessable {
        /// Upstream's text.
        message: String,
    },
    /// A strategic merge patch that fails while merging (upstream answers
    /// 500), e.g. a list element without its merge key.
    #[error("{message}")]
    Merge {
        /// Upstream's text.
        message: String,
    },
    /// The patch type is not handled here (server-side apply is [`crate::apply`]).
    #[error("patch type {content_type} is not a plain patch")]
    Unsupported {
        /// The media type of the patch.
        content_type: &'static str,
    },
}

impl PatchError {
    /// The HTTP status upstream answers this failure with.
    pub fn http_code(&self) -> u16 {
        match self {
            PatchError::Decode { .. } | PatchError::BadRequest { .. } => 400,
            PatchError::TooManyOperations { .. } => 413,
            PatchError::Unsupported { .. } => 415,
            PatchError::JsonPatch { .. } | PatchError::Unprocessable { .. } => 422,
            PatchError::Merge { .. } => 500,
        }
    }

    fn bad(message: &str) -> PatchError {
        PatchError::BadRequest {
            message: message.to_string(),
        }
    }
}

/// Apply a JSON, merge or strategic merge patch `body` to `original` (a full
/// object of kind `info`), returning the patched object.
pub fn apply_patch(
    info: &ResourceInfo,
    ty: PatchType,
    original: &Value,
    body: &[u8],
) -> Result<Value, PatchError> {
    match ty {
        PatchType::Json => {
            let patch: json_patch::Patch =
                serde_json::from_slice(body).map_err(|source| PatchError::Decode { source })?;
            if patch.0.len() > MAX_JSON_PATCH_OPERATIONS {
                return Err(PatchError::TooManyOperations {
                    max: MAX_JSON_PATCH_OPERATIONS,
                    got: patch.0.len(),
                });
            }
            let mut doc = original.clone();
            json_patch::patch(&mut doc, &patch.0)
                .map_err(|source| PatchError::JsonPatch { source })?;
            Ok(doc)
        }
        PatchType::Merge => {
            let patch: Value =
                serde_json::from_slice(body).map_err(|source| PatchError::Decode { source })?;
            let mut doc = original.clone();
            json_patch::merge(&mut doc, &patch);
            Ok(doc)
        }
        PatchType::StrategicMerge => {
            let patch: Map<String, Value> =
                serde_json::from_slice(body).map_err(|source| PatchError::Decode { source })?;
            strategic_merge(info, original, &Value::Object(patch))
        }
        PatchType::Apply => Err(PatchError::Unsupported {
            content_type: ty.content_type(),
        }),
    }
}

/// Strategic merge of `patch` into `original` for kind `info`.
pub fn strategic_merge(
    info: &ResourceInfo,
    original: &Value,
    patch: &Value,
) -> Result<Value, PatchError> {
    let Value::Object(patch) = patch else {
        return Err(PatchError::bad("invalid JSON document"));
    };
    let original = match original {
        Value::Object(map) => map.clone(),
        Value::Null => Map::new(),
        _ => return Err(PatchError::bad("invalid JSON document")),
    };
    let mut path = Vec::new();
    let merged = Smp { info }.merge_map(original, patch.clone(), &mut path)?;
    Ok(Value::Object(merged))
}

/// How a list at a JSON path is merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListStrategy {
    /// The list is replaced as a whole.
    Atomic,
    /// Elements are objects merged by these key fields. For strategic merge
    /// the first key is upstream's `patchMergeKey`; server-side apply uses
    /// all of them (`+listMapKey`).
    MergeByKey(&'static [&'static str]),
    /// A set of primitives, merged by value (e.g. `metadata.finalizers`).
    Set,
}

/// One row of the merge table: a path relative to its scope and the list's
/// strategy for strategic merge patch (`patchStrategy`/`patchMergeKey`) and
/// for server-side apply (`+listType`/`+listMapKey`).
struct ListRule {
    path: &'static [&'static str],
    smp: ListStrategy,
    ssa: ListStrategy,
}

const fn rule(path: &'static [&'static str], both: ListStrategy) -> ListRule {
    ListRule {
        path,
        smp: both,
        ssa: both,
    }
}

use ListStrategy::{Atomic, MergeByKey, Set};

const NAME: ListStrategy = MergeByKey(&["name"]);
const TYPE: ListStrategy = MergeByKey(&["type"]);
const IP: ListStrategy = MergeByKey(&["ip"]);

/// ObjectMeta, relative to `metadata` (also a pod template's metadata).
static META_RULES: &[ListRule] = &[
    rule(&["finalizers"], Set),
    rule(&["ownerReferences"], MergeByKey(&["uid"])),
    rule(&["managedFields"], Atomic),
];

/// PodSpec, relative to the pod spec.
static POD_SPEC_RULES: &[ListRule] = &[
    rule(&["containers"], NAME),
    rule(&["initContainers"], NAME),
    rule(&["ephemeralContainers"], NAME),
    ListRule {
        path: &["volumes"],
        smp: NAME,
        ssa: NAME,
    },
    rule(&["imagePullSecrets"], NAME),
    rule(&["hostAliases"], IP),
    rule(&["tolerations"], Atomic),
    rule(&["readinessGates"], Atomic),
    rule(&["resourceClaims"], NAME),
    rule(&["schedulingGates"], NAME),
    ListRule {
        path: &["topologySpreadConstraints"],
        smp: MergeByKey(&["topologyKey"]),
        ssa: MergeByKey(&["topologyKey", "whenUnsatisfiable"]),
    },
];

/// Container (and ephemeral container), relative to one container.
static CONTAINER_RULES: &[ListRule] = &[
    rule(&["env"], NAME),
    rule(&["envFrom"], Atomic),
    ListRule {
        path: &["ports"],
        smp: MergeByKey(&["containerPort"]),
        ssa: MergeByKey(&["containerPort", "protocol"]),
    },
    rule(&["volumeMounts"], MergeByKey(&["mountPath"])),
    rule(&["volumeDevices"], MergeByKey(&["devicePath"])),
    rule(&["resizePolicy"], Atomic),
    ListRule {
        path: &["resources", "claims"],
        smp: Atomic,
        ssa: NAME,
    },
];

/// Kind-specific lists, relative to the object root.
static KIND_RULES: &[(&str, ListRule)] = &[
    ("Pod", rule(&["status", "conditions"], TYPE)),
    ("Pod", rule(&["status", "podIPs"], IP)),
    ("Pod", rule(&["status", "hostIPs"], IP)),
    ("Pod", rule(&["status", "containerStatuses"], Atomic)),
    ("Pod", rule(&["status", "initContainerStatuses"], Atomic)),
    (
        "Pod",
        rule(&["status", "ephemeralContainerStatuses"], Atomic),
    ),
    ("Pod", rule(&["status", "resourceClaimStatuses"], NAME)),
    (
        "Service",
        ListRule {
            path: &["spec", "ports"],
            smp: MergeByKey(&["port"]),
            ssa: MergeByKey(&["port", "protocol"]),
        },
    ),
    ("Service", rule(&["status", "conditions"], TYPE)),
    ("Node", rule(&["spec", "podCIDRs"], Set)),
    ("Node", rule(&["spec", "taints"], Atomic)),
    ("Node", rule(&["status", "conditions"], TYPE)),
    ("Node", rule(&["status", "addresses"], TYPE)),
    ("Namespace", rule(&["spec", "finalizers"], Atomic)),
    ("Namespace", rule(&["status", "conditions"], TYPE)),
    ("ServiceAccount", rule(&["secrets"], NAME)),
    ("Deployment", rule(&["status", "conditions"], TYPE)),
    ("ReplicaSet", rule(&["status", "conditions"], TYPE)),
];

/// Where a pod spec sits in objects of this kind.
fn pod_spec_prefix(info: &ResourceInfo) -> Option<&'static [&'static str]> {
    match info.kind {
        "Pod" => Some(&["spec"]),
        "Deployment" | "ReplicaSet" => Some(&["spec", "template", "spec"]),
        _ => None,
    }
}

/// Where object metadata sits in objects of this kind.
fn meta_prefixes(info: &ResourceInfo) -> &'static [&'static [&'static str]] {
    match info.kind {
        "Deployment" | "ReplicaSet" => &[&["metadata"], &["spec", "template", "metadata"]],
        _ => &[&["metadata"]],
    }
}

fn find_rule(rules: &'static [ListRule], path: &[&str]) -> Option<&'static ListRule> {
    rules.iter().find(|r| r.path == path)
}

fn lookup<S: AsRef<str>>(info: &ResourceInfo, path: &[S]) -> Option<&'static ListRule> {
    let path: Vec<&str> = path.iter().map(AsRef::as_ref).collect();
    for prefix in meta_prefixes(info) {
        if let Some(rest) = path.strip_prefix(*prefix)
            && let Some(found) = find_rule(META_RULES, rest)
        {
            return Some(found);
        }
    }
    if let Some(rest) = pod_spec_prefix(info).and_then(|p| path.strip_prefix(p)) {
        if let Some(found) = find_rule(POD_SPEC_RULES, rest) {
            return Some(found);
        }
        if let [first, within @ ..] = rest
            && matches!(
                *first,
                "containers" | "initContainers" | "ephemeralContainers"
            )
            && let Some(found) = find_rule(CONTAINER_RULES, within)
        {
            return Some(found);
        }
    }
    KIND_RULES
        .iter()
        .find(|(kind, r)| *kind == info.kind && r.path == path.as_slice())
        .map(|(_, r)| r)
}

/// How strategic merge patch merges the list at `path` (object field names
/// from the root, list indices omitted, e.g.
/// `["spec","template","spec","containers"]`). Unlisted lists are atomic.
pub fn list_strategy(info: &ResourceInfo, path: &[&str]) -> ListStrategy {
    lookup(info, path).map_or(Atomic, |r| r.smp)
}

/// How server-side apply treats the list at `path` (`+listType` and
/// `+listMapKey`); like [`list_strategy`] but with every list-map key.
pub fn apply_list_strategy<S: AsRef<str>>(info: &ResourceInfo, path: &[S]) -> ListStrategy {
    lookup(info, path).map_or(Atomic, |r| r.ssa)
}

const DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ELEMENT_ORDER: &str = "$setElementOrder/";
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList/";

/// The strategic merge of one object kind.
struct Smp<'a> {
    info: &'a ResourceInfo,
}

/// What identifies a list element: its merge key value, or the value itself
/// for primitive lists.
fn identity<'v>(item: &'v Value, key: Option<&str>) -> Option<&'v Value> {
    match key {
        Some(key) => item.get(key),
        None => Some(item),
    }
}

fn merge_key_missing(item: &Value, key: &str) -> PatchError {
    PatchError::Merge {
        message: format!("map: {item} does not contain declared merge key: {key}"),
    }
}

impl Smp<'_> {
    fn merge_map(
        &self,
        mut original: Map<String, Value>,
        mut patch: Map<String, Value>,
        path: &mut Vec<String>,
    ) -> Result<Map<String, Value>, PatchError> {
        if let Some(directive) = patch.shift_remove(DIRECTIVE) {
            return match directive.as_str() {
                // Replace: the patch itself, with its own directives applied.
                Some("replace") => self.merge_map(Map::new(), patch, path),
                Some("delete") => Ok(Map::new()),
                _ => Err(PatchError::Merge {
                    message: format!("unknown patch type: {directive} in map: {patch:?}"),
                }),
            };
        }
        if let Some(retain) = patch.shift_remove(RETAIN_KEYS) {
            let Value::Array(retain) = retain else {
                return Err(PatchError::bad("invalid patch format of retainKeys"));
            };
            let kept = |k: &str| retain.iter().any(|r| r.as_str() == Some(k));
            let unlisted = patch.iter().any(|(k, v)| {
                !v.is_null()
                    && !k.starts_with(DELETE_FROM_PRIMITIVE_LIST)
                    && !k.starts_with(SET_ELEMENT_ORDER)
                    && !kept(k)
            });
            if unlisted {
                return Err(PatchError::bad("invalid patch format of retainKeys"));
            }
            original.retain(|k, _| kept(k));
        }

        let deletes: Vec<String> = patch
            .keys()
            .filter(|k| k.starts_with(DELETE_FROM_PRIMITIVE_LIST))
            .cloned()
            .collect();
        for directive in deletes {
            let field = &directive[DELETE_FROM_PRIMITIVE_LIST.len()..];
            let Some(Value::Array(gone)) = patch.shift_remove(&directive) else {
                return Err(PatchError::bad("invalid patch format of primitive list"));
            };
            if let Some(Value::Array(items)) = original.get_mut(field) {
                items.retain(|item| !gone.contains(item));
            }
        }

        let orders: Vec<String> = patch
            .keys()
            .filter(|k| k.starts_with(SET_ELEMENT_ORDER))
            .cloned()
            .collect();
        for directive in orders {
            let field = directive[SET_ELEMENT_ORDER.len()..].to_string();
            let Some(Value::Array(order)) = patch.shift_remove(&directive) else {
                return Err(PatchError::bad(
                    "invalid patch format of setElementOrder list",
                ));
            };
            let patch_items = match patch.shift_remove(&field) {
                Some(Value::Array(items)) => items,
                None | Some(Value::Null) => Vec::new(),
                Some(_) => {
                    return Err(PatchError::bad(
                        "invalid patch format of setElementOrder list",
                    ));
                }
            };
            let server: Vec<Value> = match original.get(&field) {
                Some(Value::Array(items)) => items.clone(),
                _ => Vec::new(),
            };
            path.push(field.clone());
            let strategy = list_strategy(self.info, &path_strs(path));
            let merged = self.merge_list(server.clone(), patch_items, strategy, path);
            path.pop();
            let merged = merged?;
            let key = match strategy {
                MergeByKey(keys) => keys.first().copied(),
                _ => None,
            };
            let ordered = reorder(merged, &order, &server, key)?;
            if !ordered.is_empty() || original.contains_key(&field) {
                original.insert(field, Value::Array(ordered));
            }
        }

        for (k, v) in patch {
            if v.is_null() {
                original.shift_remove(&k);
                continue;
            }
            path.push(k.clone());
            // Inserting an existing key keeps its position.
            let base = original.get_mut(&k).map(std::mem::take);
            let merged = self.merge_value(base, v, path);
            path.pop();
            original.insert(k, merged?);
        }
        Ok(original)
    }

    /// Merge one patch value (not null) into the original value, if any.
    fn merge_value(
        &self,
        original: Option<Value>,
        patch: Value,
        path: &mut Vec<String>,
    ) -> Result<Value, PatchError> {
        Ok(match (original, patch) {
            (Some(Value::Object(o)), Value::Object(p)) => {
                Value::Object(self.merge_map(o, p, path)?)
            }
            (_, Value::Object(p)) => Value::Object(self.merge_map(Map::new(), p, path)?),
            (original, Value::Array(p)) => {
                let strategy = list_strategy(self.info, &path_strs(path));
                let base = match original {
                    Some(Value::Array(o)) => o,
                    _ => Vec::new(),
                };
                Value::Array(self.merge_list(base, p, strategy, path)?)
            }
            (_, scalar) => scalar,
        })
    }

    fn merge_list(
        &self,
        mut original: Vec<Value>,
        patch: Vec<Value>,
        strategy: ListStrategy,
        path: &mut Vec<String>,
    ) -> Result<Vec<Value>, PatchError> {
        let key = match strategy {
            Atomic => return Ok(patch),
            MergeByKey(keys) => keys.first().copied(),
            Set => None,
        };
        if patch.iter().any(Value::is_array) {
            return Err(PatchError::Unprocessable {
                message: "lists of lists are not supported".to_string(),
            });
        }
        // Split off the directive elements.
        let mut replace = false;
        let mut items = Vec::with_capacity(patch.len());
        for item in patch {
            let directive = item.get(DIRECTIVE).cloned();
            match directive {
                None => items.push(item),
                Some(d) if d == "replace" => replace = true,
                Some(d) if d == "delete" => {
                    let key = key.unwrap_or_default();
                    let Some(value) = item.get(key) else {
                        return Err(merge_key_missing(&item, key));
                    };
                    original.retain(|o| o.get(key) != Some(value));
                }
                Some(d) if d == "merge" => {
                    return Err(PatchError::Merge {
                        message: "merging lists cannot yet be specified in the patch".to_string(),
                    });
                }
                Some(d) => {
                    return Err(PatchError::Merge {
                        message: format!("unknown patch type: {d} in map: {item}"),
                    });
                }
            }
        }
        let primitive = items.first().is_some_and(|i| !i.is_object());
        if replace {
            return items
                .into_iter()
                .map(|item| match item {
                    Value::Object(map) => {
                        Ok(Value::Object(self.merge_map(Map::new(), map, path)?))
                    }
                    other => Ok(other),
                })
                .collect();
        }
        match key {
            Some(key) if !primitive => {
                for item in items {
                    let Value::Object(map) = item else {
                        return Err(merge_key_missing(&item, key));
                    };
                    let Some(value) = map.get(key).cloned() else {
                        return Err(merge_key_missing(&Value::Object(map), key));
                    };
                    match original.iter().position(|o| o.get(key) == Some(&value)) {
                        Some(at) => {
                            let base = match std::mem::take(&mut original[at]) {
                                Value::Object(o) => o,
                                _ => Map::new(),
                            };
                            original[at] = Value::Object(self.merge_map(base, map, path)?);
                        }
                        None => {
                            original.push(Value::Object(self.merge_map(Map::new(), map, path)?));
                        }
                    }
                }
                Ok(original)
            }
            _ => {
                for item in items {
                    if !original.contains(&item) {
                        original.push(item);
                    }
                }
                Ok(original)
            }
        }
    }
}

fn path_strs(path: &[String]) -> Vec<&str> {
    path.iter().map(String::as_str).collect()
}

/// Order a merged list by a `$setElementOrder` list: the elements named in
/// `order` take its order, the server-only ones keep their relative server
/// order and are interleaved where the server had them (upstream's
/// `normalizeElementOrder`).
fn reorder(
    merged: Vec<Value>,
    order: &[Value],
    server: &[Value],
    key: Option<&str>,
) -> Result<Vec<Value>, PatchError> {
    let position = |list: &[Value], item: &Value| -> Option<usize> {
        let id = identity(item, key)?;
        list.iter()
            .position(|o| identity(o, key).is_some_and(|oid| oid == id))
    };
    for o in order {
        if key.is_some_and(|k| o.get(k).is_none()) {
            return Err(PatchError::bad(
                "invalid patch format of setElementOrder list",
            ));
        }
    }
    let (mut patched, mut server_only): (Vec<Value>, Vec<Value>) = merged
        .into_iter()
        .partition(|item| position(order, item).is_some());
    patched.sort_by_key(|item| position(order, item));
    server_only.sort_by_key(|item| position(server, item).unwrap_or(usize::MAX));

    let mut out = Vec::with_capacity(patched.len() + server_only.len());
    let mut left = server_only.into_iter().peekable();
    let mut right = patched.into_iter().peekable();
    loop {
        let take_left = match (left.peek(), right.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(l), Some(r)) => match (position(server, l), position(server, r)) {
                (Some(li), Some(ri)) => li < ri,
                _ => false,
            },
        };
        let next = if take_left { left.next() } else { right.next() };
        out.extend(next);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use skiff_common::registry::find_kind;

    fn deploy() -> &'static ResourceInfo {
        find_kind("apps/v1", "Deployment").expect("deployments served")
    }

    fn pod() -> &'static ResourceInfo {
        find_kind("v1", "Pod").expect("pods served")
    }

    fn smp(info: &ResourceInfo, original: Value, patch: Value) -> Value {
        strategic_merge(info, &original, &patch).expect("strategic merge succeeds")
    }

    #[test]
    fn content_types_map_to_patch_types() {
        let cases = [
            ("application/json-patch+json", Some(PatchType::Json)),
            ("application/merge-patch+json", Some(PatchType::Merge)),
            (
                "application/strategic-merge-patch+json; charset=utf-8",
                Some(PatchType::StrategicMerge),
            ),
            ("application/apply-patch+yaml", Some(PatchType::Apply)),
            ("application/json", None),
        ];
        for (ct, want) in cases {
            assert_eq!(PatchType::from_content_type(ct), want, "{ct}");
        }
    }

    #[test]
    fn merge_table_follows_upstream_tags() {
        let d = deploy();
        let cases: &[(&ResourceInfo, &[&str], ListStrategy)] = &[
            (d, &["spec", "template", "spec", "containers"], NAME),
            (d, &["spec", "template", "spec", "containers", "env"], NAME),
            (
                d,
                &["spec", "template", "spec", "initContainers", "ports"],
                MergeByKey(&["containerPort"]),
            ),
            (
                d,
                &["spec", "template", "spec", "containers", "volumeMounts"],
                MergeByKey(&["mountPath"]),
            ),
            (d, &["spec", "template", "spec", "tolerations"], Atomic),
            (d, &["spec", "template", "metadata", "finalizers"], Set),
            (d, &["metadata", "ownerReferences"], MergeByKey(&["uid"])),
            (d, &["status", "conditions"], TYPE),
            (pod(), &["spec", "volumes"], NAME),
            (pod(), &["spec", "hostAliases"], IP),
            (pod(), &["status", "containerStatuses"], Atomic),
            (pod(), &["spec", "containers", "args"], Atomic),
            // A pod spec path only applies where the kind has a pod spec.
            (d, &["spec", "containers"], Atomic),
        ];
        for (info, path, want) in cases {
            assert_eq!(list_strategy(info, path), *want, "{} {path:?}", info.kind);
        }
        let svc = find_kind("v1", "Service").expect("services served");
        assert_eq!(
            list_strategy(svc, &["spec", "ports"]),
            MergeByKey(&["port"])
        );
        assert_eq!(
            apply_list_strategy(svc, &["spec", "ports"]),
            MergeByKey(&["port", "protocol"])
        );
        let node = find_kind("v1", "Node").expect("nodes served");
        assert_eq!(list_strategy(node, &["status", "addresses"]), TYPE);
    }

    #[test]
    fn container_image_change_and_new_env_leave_other_container_alone() {
        let original = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [
                {"name": "web", "image": "nginx:1", "env": [{"name": "A", "value": "1"}]},
                {"name": "sidecar", "image": "envoy:1", "args": ["--x"]}
            ]}}}
        });
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "nginx:2", "env": [{"name": "B", "value": "2"}]}
        ]}}}});
        let out = smp(deploy(), original, patch);
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"],
            json!([
                {"name": "web", "image": "nginx:2",
                 "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                {"name": "sidecar", "image": "envoy:1", "args": ["--x"]}
            ])
        );
        assert_eq!(out["spec"]["replicas"], 2);
    }

    #[test]
    fn directives_and_nulls() {
        struct Case {
            name: &'static str,
            original: Value,
            patch: Value,
            want: Value,
        }
        let cases = [
            Case {
                name: "$patch delete removes a keyed element",
                original: json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}}),
                patch: json!({"spec": {"containers": [{"name": "a", "$patch": "delete"}]}}),
                want: json!({"spec": {"containers": [{"name": "b"}]}}),
            },
            Case {
                name: "null removes a map key",
                original: json!({"metadata": {"labels": {"a": "1", "b": "2"}}}),
                patch: json!({"metadata": {"labels": {"a": null, "c": null}}}),
                want: json!({"metadata": {"labels": {"b": "2"}}}),
            },
            Case {
                name: "$patch replace on a map",
                original: json!({"metadata": {"labels": {"a": "1", "b": "2"}}}),
                patch: json!({"metadata": {"labels": {"$patch": "replace", "c": "3"}}}),
                want: json!({"metadata": {"labels": {"c": "3"}}}),
            },
            Case {
                name: "$patch replace in a keyed list",
                original: json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}}),
                patch: json!({"spec": {"containers": [{"$patch": "replace"}, {"name": "c"}]}}),
                want: json!({"spec": {"containers": [{"name": "c"}]}}),
            },
            Case {
                name: "$patch delete on a map empties it",
                original: json!({"spec": {"securityContext": {"runAsUser": 1}}}),
                patch: json!({"spec": {"securityContext": {"$patch": "delete"}}}),
                want: json!({"spec": {"securityContext": {}}}),
            },
            Case {
                name: "finalizers merge as a set",
                original: json!({"metadata": {"finalizers": ["a", "b"]}}),
                patch: json!({"metadata": {"finalizers": ["b", "c"]}}),
                want: json!({"metadata": {"finalizers": ["a", "b", "c"]}}),
            },
            Case {
                name: "$deleteFromPrimitiveList",
                original: json!({"metadata": {"finalizers": ["a", "b", "c"]}}),
                patch: json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["b"]}}),
                want: json!({"metadata": {"finalizers": ["a", "c"]}}),
            },
            Case {
                name: "atomic lists are replaced",
                original: json!({"spec": {"tolerations": [{"key": "a"}], "containers": [
                    {"name": "x", "args": ["1", "2"]}]}}),
                patch: json!({"spec": {"tolerations": [{"key": "b"}], "containers": [
                    {"name": "x", "args": ["3"]}]}}),
                want: json!({"spec": {"tolerations": [{"key": "b"}], "containers": [
                    {"name": "x", "args": ["3"]}]}}),
            },
            Case {
                name: "$retainKeys drops unlisted fields",
                original: json!({"spec": {"volumes": [
                    {"name": "v", "hostPath": {"path": "/x"}}]}}),
                patch: json!({"spec": {"volumes": [
                    {"name": "v", "$retainKeys": ["name", "emptyDir"], "emptyDir": {}}]}}),
                want: json!({"spec": {"volumes": [{"name": "v", "emptyDir": {}}]}}),
            },
            Case {
                name: "$setElementOrder reorders and keeps server-only items in place",
                original: json!({"spec": {"containers": [
                    {"name": "a"}, {"name": "b"}, {"name": "s"}, {"name": "c"}]}}),
                patch: json!({"spec": {
                    "$setElementOrder/containers": [{"name": "c"}, {"name": "a"}, {"name": "b"}],
                    "containers": [{"name": "a", "image": "i"}]}}),
                // `s` sat before `c` on the server, so it stays in front of it.
                want: json!({"spec": {"containers": [
                    {"name": "s"}, {"name": "c"}, {"name": "a", "image": "i"}, {"name": "b"}]}}),
            },
            Case {
                name: "$setElementOrder on a primitive list",
                original: json!({"metadata": {"finalizers": ["a", "b", "c"]}}),
                patch: json!({"metadata": {
                    "$setElementOrder/finalizers": ["c", "b", "a"], "finalizers": ["c"]}}),
                want: json!({"metadata": {"finalizers": ["c", "b", "a"]}}),
            },
            Case {
                name: "$retainKeys switches a strategy type",
                original: json!({"spec": {"strategy": {"type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": 1}}}}),
                patch: json!({"spec": {"strategy": {"$retainKeys": ["type"],
                    "type": "Recreate", "rollingUpdate": null}}}),
                want: json!({"spec": {"strategy": {"type": "Recreate"}}}),
            },
            Case {
                name: "new fields keep directives out",
                original: json!({"metadata": {"name": "p"}}),
                patch: json!({"spec": {"containers": [{"name": "a", "env": null}], "x": {"y": null}}}),
                want: json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}], "x": {}}}),
            },
        ];
        for case in cases {
            let out = strategic_merge(pod(), &case.original, &case.patch)
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!(out, case.want, "{}", case.name);
        }
    }

    #[test]
    fn field_order_is_kept_when_merging() {
        let out = smp(
            pod(),
            json!({"a": 1, "b": {"x": 1}, "c": 3}),
            json!({"b": {"y": 2}}),
        );
        let keys: Vec<&String> = out.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["a", "b", "c"]);
    }

    #[test]
    fn malformed_strategic_patches_are_rejected_with_upstream_codes() {
        let original = json!({"spec": {"containers": [{"name": "a"}]}});
        let cases = [
            (json!({"spec": {"containers": [{"image": "x"}]}}), 500),
            (json!({"spec": {"$retainKeys": "x"}}), 400),
            (json!({"spec": {"$retainKeys": ["a"], "b": 1}}), 400),
            (json!({"spec": {"$setElementOrder/containers": {}}}), 400),
            (json!({"spec": {"$deleteFromPrimitiveList/x": 1}}), 400),
            (json!({"spec": {"containers": [[1]]}}), 422),
            (json!({"spec": {"$patch": "bogus"}}), 500),
        ];
        for (patch, code) in cases {
            let err = strategic_merge(pod(), &original, &patch)
                .expect_err(&format!("patch {patch} must fail"));
            assert_eq!(err.http_code(), code, "{patch}: {err}");
        }
        let err = apply_patch(pod(), PatchType::StrategicMerge, &original, b"[1]")
            .expect_err("a list is not a strategic merge patch");
        assert_eq!(err.http_code(), 400);
    }

    #[test]
    fn json_and_merge_patch_roundtrip() {
        let original =
            json!({"metadata": {"name": "a", "labels": {"x": "1"}}, "spec": {"replicas": 1}});
        let merged = apply_patch(
            deploy(),
            PatchType::Merge,
            &original,
            br#"{"metadata":{"labels":{"x":null,"y":"2"}},"spec":{"replicas":3}}"#,
        )
        .expect("merge patch applies");
        assert_eq!(
            merged,
            json!({"metadata": {"name": "a", "labels": {"y": "2"}}, "spec": {"replicas": 3}})
        );
        let patched = apply_patch(
            deploy(),
            PatchType::Json,
            &merged,
            br#"[{"op":"test","path":"/spec/replicas","value":3},
                {"op":"replace","path":"/spec/replicas","value":1},
                {"op":"remove","path":"/metadata/labels/y"},
                {"op":"add","path":"/metadata/labels/x","value":"1"}]"#,
        )
        .expect("json patch applies");
        assert_eq!(patched, original);

        let failed = apply_patch(
            deploy(),
            PatchType::Json,
            &original,
            br#"[{"op":"test","path":"/spec/replicas","value":9}]"#,
        )
        .expect_err("test op mismatch fails");
        assert_eq!(failed.http_code(), 422);
        let bad = apply_patch(deploy(), PatchType::Json, &original, b"{}")
            .expect_err("an object is not a json patch");
        assert_eq!(bad.http_code(), 400);
        let apply = apply_patch(deploy(), PatchType::Apply, &original, b"{}")
            .expect_err("apply is not a plain patch");
        assert_eq!(apply.http_code(), 415);
    }
}
