//! Object metadata as the API server keeps it: names, uid,
//! creationTimestamp, generation, deletion and finalizers.

use serde_json::{Map, Value, json};

use crate::status::{ApiError, Cause};
use skiff_common::registry::ResourceInfo;

/// The current time as upstream writes timestamps (RFC 3339, seconds).
pub fn now() -> String {
    let now = jiff::Timestamp::now();
    now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// `metadata.name`.
pub fn name(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/name").and_then(Value::as_str)
}

/// `metadata.namespace`.
pub fn namespace(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/namespace").and_then(Value::as_str)
}

/// `metadata.uid`.
pub fn uid(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/uid").and_then(Value::as_str)
}

/// `metadata.finalizers`, empty when absent.
pub fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `metadata.deletionTimestamp` is set.
pub fn is_deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

/// `metadata` as a mutable map, created when missing.
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata was just made an object")
}

/// The etcd key of an object.
pub fn key(info: &ResourceInfo, namespace: Option<&str>, name: &str) -> String {
    match (info.namespaced, namespace) {
        (true, Some(ns)) => format!("{}{ns}/{name}", info.key_prefix()),
        _ => format!("{}{name}", info.key_prefix()),
    }
}

/// The etcd prefix of a collection: one namespace, or all of them.
pub fn collection_prefix(info: &ResourceInfo, namespace: Option<&str>) -> String {
    match (info.namespaced, namespace) {
        (true, Some(ns)) => format!("{}{ns}/", info.key_prefix()),
        _ => info.key_prefix(),
    }
}

/// Check the body's kind, apiVersion, name and namespace against the
/// request, filling what the body leaves out, then set what the server owns
/// on create: uid, creationTimestamp, generation, and a name from
/// generateName.
pub fn prepare_create(
    info: &ResourceInfo,
    obj: &mut Value,
    path_namespace: Option<&str>,
) -> Result<(), ApiError> {
    check_type(info, obj)?;
    let namespaced = info.namespaced;
    let meta = metadata_mut(obj);
    if namespaced {
        match (
            meta.get("namespace").and_then(Value::as_str),
            path_namespace,
        ) {
            (Some(body), Some(path)) if !body.is_empty() && body != path => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (_, Some(path)) => {
                meta.insert("namespace".into(), json!(path));
            }
            (Some(body), None) if !body.is_empty() => {}
            _ => {
                return Err(ApiError::bad_request(
                    "the namespace of the object is required",
                ));
            }
        }
    } else {
        meta.remove("namespace");
    }
    let has_name = meta
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if !has_name {
        match meta.get("generateName").and_then(Value::as_str) {
            Some(prefix) if !prefix.is_empty() => {
                let name = format!("{prefix}{}", random_suffix());
                meta.insert("name".into(), json!(name));
            }
            _ => {
                return Err(ApiError::invalid(
                    info.group,
                    info.kind,
                    "",
                    vec![Cause::new(
                        "FieldValueRequired",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    )],
                ));
            }
        }
    }
    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    meta.insert("creationTimestamp".into(), json!(now()));
    meta.remove("resourceVersion");
    meta.remove("deletionTimestamp");
    meta.remove("deletionGracePeriodSeconds");
    meta.remove("selfLink");
    if info.has_spec {
        meta.insert("generation".into(), json!(1));
    } else {
        meta.remove("generation");
    }
    Ok(())
}

/// Carry what the server owns from `old` into `new` on update, and bump
/// `generation` when the spec changed.
pub fn prepare_update(info: &ResourceInfo, old: &Value, new: &mut Value) -> Result<(), ApiError> {
    check_type(info, new)?;
    let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
    let spec_changed = info.has_spec && old.get("spec") != new.get("spec");
    let meta = metadata_mut(new);
    for owned in [
        "uid",
        "creationTimestamp",
        "namespace",
        "name",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match old_meta.get(owned) {
            Some(v) => {
                meta.insert(owned.into(), v.clone());
            }
            None => {
                meta.remove(owned);
            }
        }
    }
    meta.remove("selfLink");
    if info.has_spec {
        let generation = old_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let generation = if spec_changed {
            generation + 1
        } else {
            generation
        };
        meta.insert("generation".into(), json!(generation));
    }
    Ok(())
}

fn check_type(info: &ResourceInfo, obj: &mut Value) -> Result<(), ApiError> {
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the body of the request is not a json object",
        ));
    };
    let api_version = info.api_version();
    match map.get("kind").and_then(Value::as_str) {
        Some(kind) if kind != info.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind of the provided object ({kind}) does not match the resource ({})",
                info.kind
            )));
        }
        Some(_) => {}
        None => {
            map.insert("kind".into(), json!(info.kind));
        }
    }
    match map.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v != api_version => {
            return Err(ApiError::bad_request(format!(
                "the apiVersion of the provided object ({v}) does not match the resource ({api_version})"
            )));
        }
        Some(_) => {}
        None => {
            map.insert("apiVersion".into(), json!(api_version));
        }
    }
    Ok(())
}

fn random_suffix() -> String {
    // Upstream's alphabet: no vowels nor look-alikes.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_common::registry::find;

    #[test]
    fn create_fills_server_owned_fields() {
        let deploy = find("apps", "v1", "deployments").expect("served");
        let mut obj =
            json!({"metadata": {"generateName": "web-", "resourceVersion": "9"}, "spec": {}});
        prepare_create(deploy, &mut obj, Some("default")).expect("valid");
        let name = name(&obj).expect("named");
        assert!(name.starts_with("web-") && name.len() == 9, "{name}");
        assert_eq!(obj["kind"], "Deployment");
        assert_eq!(obj["apiVersion"], "apps/v1");
        assert_eq!(obj["metadata"]["namespace"], "default");
        assert_eq!(obj["metadata"]["generation"], 1);
        assert!(obj["metadata"].get("resourceVersion").is_none());
        assert!(uid(&obj).is_some());
    }

    #[test]
    fn create_refuses_a_mismatched_namespace_or_kind() {
        let pods = find("", "v1", "pods").expect("served");
        let mut obj = json!({"metadata": {"name": "a", "namespace": "x"}});
        let err = prepare_create(pods, &mut obj, Some("y")).expect_err("mismatch");
        assert_eq!(err.code, 400);
        let mut obj = json!({"kind": "Service", "metadata": {"name": "a"}});
        assert_eq!(
            prepare_create(pods, &mut obj, Some("y"))
                .expect_err("kind")
                .code,
            400
        );
        let mut obj = json!({"metadata": {}});
        assert_eq!(
            prepare_create(pods, &mut obj, Some("y"))
                .expect_err("name")
                .code,
            422
        );
    }

    #[test]
    fn update_bumps_generation_only_on_spec_change() {
        let deploy = find("apps", "v1", "deployments").expect("served");
        let old = json!({"metadata": {"name": "w", "uid": "u", "generation": 3, "creationTimestamp": "t"}, "spec": {"replicas": 1}});
        let mut same =
            json!({"metadata": {"name": "w", "labels": {"a": "b"}}, "spec": {"replicas": 1}});
        prepare_update(deploy, &old, &mut same).expect("valid");
        assert_eq!(same["metadata"]["generation"], 3);
        assert_eq!(same["metadata"]["uid"], "u");
        let mut changed = json!({"metadata": {"name": "w"}, "spec": {"replicas": 2}});
        prepare_update(deploy, &old, &mut changed).expect("valid");
        assert_eq!(changed["metadata"]["generation"], 4);
    }
}
