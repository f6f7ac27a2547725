//! Objects decoded for the controllers' and the scheduler's caches without
//! what they never read.
//!
//! Upstream's scheduler and controller manager drop `metadata.managedFields`
//! from every object their informers cache (a transform on the shared
//! informers): no controller reads them. On a pod they are about as large as
//! the rest of the object, and k8s-openapi decodes each entry's `fieldsV1`
//! into a `serde_json::Value` tree, so decoding them was most of the cost of
//! decoding a pod. [`Trimmed`] skips them while decoding instead of after:
//! the object is first split into its top-level fields as raw JSON, the
//! metadata into its fields without `managedFields`, and the typed object is
//! decoded from those pieces. [`MetadataOnly`] also skips everything but
//! `apiVersion`, `kind` and `metadata`, for the garbage collector, which only
//! reads metadata (upstream's uses metadata-only informers).
//!
//! Both wrap a kube-rs resource type and are resources themselves, so an
//! `Api<Trimmed<Pod>>` lists and watches pods, and `kube::runtime` works on
//! them unchanged. Objects decoded this way are for reading: written back
//! whole, they carry no `managedFields`, which an update treats as "keep the
//! stored ones", as upstream.

use std::borrow::Cow;
use std::fmt;
use std::ops::{Deref, DerefMut};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::Deserialize;
use serde::de::value::MapDeserializer;
use serde::de::{self, DeserializeOwned, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// `K` decoded without `metadata.managedFields`.
#[derive(Debug, Clone, PartialEq)]
pub struct Trimmed<K>(pub K);

/// `K` decoded from its `apiVersion`, `kind` and `metadata` (without
/// `managedFields`) only; everything else is left at its default.
#[derive(Debug, Clone, PartialEq)]
pub struct MetadataOnly<K>(pub K);

/// The wrappers' shared implementation: deref to the object, delegate
/// [`Resource`] to it, decode with [`decode`].
macro_rules! wrapper {
    ($name:ident, $metadata_only:expr) => {
        impl<K> $name<K> {
            /// The decoded object.
            pub fn into_inner(self) -> K {
                self.0
            }
        }

        impl<K> Deref for $name<K> {
            type Target = K;
            fn deref(&self) -> &K {
                &self.0
            }
        }

        impl<K> DerefMut for $name<K> {
            fn deref_mut(&mut self) -> &mut K {
                &mut self.0
            }
        }

        impl<K: Resource> Resource for $name<K> {
            type DynamicType = K::DynamicType;
            type Scope = K::Scope;
            fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
                K::kind(dt)
            }
            fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
                K::group(dt)
            }
            fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
                K::version(dt)
            }
            fn api_version(dt: &Self::DynamicType) -> Cow<'_, str> {
                K::api_version(dt)
            }
            fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
                K::plural(dt)
            }
            fn url_path(dt: &Self::DynamicType, namespace: Option<&str>) -> String {
                K::url_path(dt, namespace)
            }
            fn meta(&self) -> &ObjectMeta {
                self.0.meta()
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                self.0.meta_mut()
            }
        }

        impl<'de, K: DeserializeOwned> Deserialize<'de> for $name<K> {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let fields = deserializer.deserialize_map(TopLevel)?;
                decode(&fields, $metadata_only)
                    .map($name)
                    .map_err(de::Error::custom)
            }
        }
    };
}

wrapper!(Trimmed, false);
wrapper!(MetadataOnly, true);

/// The typed object from its top-level fields, `metadata` without
/// `managedFields`, and nothing but `apiVersion`, `kind` and `metadata` when
/// `metadata_only`.
fn decode<K: DeserializeOwned>(
    fields: &[(String, Box<RawValue>)],
    metadata_only: bool,
) -> Result<K, serde_json::Error> {
    let mut parts: Vec<(&str, Part<'_>)> = Vec::with_capacity(fields.len());
    for (key, raw) in fields {
        match key.as_str() {
            "metadata" => {
                let meta =
                    serde_json::Deserializer::from_str(raw.get()).deserialize_map(Metadata)?;
                parts.push(("metadata", Part::Map(meta)));
            }
            "apiVersion" | "kind" => parts.push((key, Part::Raw(raw))),
            _ if metadata_only => {}
            _ => parts.push((key, Part::Raw(raw))),
        }
    }
    K::deserialize(MapDeserializer::new(parts.into_iter()))
}

/// Collects an object's top-level fields as raw JSON.
struct TopLevel;

impl<'de> Visitor<'de> for TopLevel {
    type Value = Vec<(String, Box<RawValue>)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(key) = map.next_key::<String>()? {
            let value: Box<RawValue> = map.next_value()?;
            fields.push((key, value));
        }
        Ok(fields)
    }
}

/// Collects an object's metadata fields as raw JSON borrowed from the
/// metadata's text, all but `managedFields`.
struct Metadata;

impl<'de> Visitor<'de> for Metadata {
    type Value = Vec<(String, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("object metadata")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(12));
        while let Some(key) = map.next_key::<String>()? {
            if key == "managedFields" {
                map.next_value::<IgnoredAny>()?;
            } else {
                let value: &'de RawValue = map.next_value()?;
                fields.push((key, value));
            }
        }
        Ok(fields)
    }
}

/// One top-level field to decode: raw JSON, or the metadata's fields.
enum Part<'a> {
    Raw(&'a RawValue),
    Map(Vec<(String, &'a RawValue)>),
}

impl<'de> de::IntoDeserializer<'de, serde_json::Error> for Part<'de> {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

/// Deserializer methods that go to the raw JSON, or decode the metadata's
/// fields as a map.
macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*)),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, Self::Error> {
                match self {
                    Part::Raw(raw) => raw.$method($($arg,)* visitor),
                    map @ Part::Map(_) => map.deserialize_any(visitor),
                }
            }
        )*
    };
}

impl<'de> Deserializer<'de> for Part<'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self {
            Part::Raw(raw) => raw.deserialize_any(visitor),
            Part::Map(fields) => MapDeserializer::new(fields.into_iter()).deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self {
            Part::Raw(raw) => raw.deserialize_option(visitor),
            map @ Part::Map(_) => visitor.visit_some(map),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self {
            Part::Raw(raw) => raw.deserialize_newtype_struct(name, visitor),
            map @ Part::Map(_) => visitor.visit_newtype_struct(map),
        }
    }

    forward! {
        deserialize_bool(), deserialize_i8(), deserialize_i16(), deserialize_i32(),
        deserialize_i64(), deserialize_i128(), deserialize_u8(), deserialize_u16(),
        deserialize_u32(), deserialize_u64(), deserialize_u128(), deserialize_f32(),
        deserialize_f64(), deserialize_char(), deserialize_str(), deserialize_string(),
        deserialize_bytes(), deserialize_byte_buf(), deserialize_unit(),
        deserialize_unit_struct(name: &'static str), deserialize_seq(),
        deserialize_tuple(len: usize), deserialize_tuple_struct(name: &'static str, len: usize),
        deserialize_map(), deserialize_struct(name: &'static str, fields: &'static [&'static str]),
        deserialize_enum(name: &'static str, variants: &'static [&'static str]),
        deserialize_identifier(), deserialize_ignored_any(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::DynamicObject;
    use serde_json::json;

    fn pod_json() -> serde_json::Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-1",
                "namespace": "default",
                "uid": "u-1",
                "labels": {"app": "web", "escaped": "a\"b\\c\u{e9}"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web", "uid": "rs-1", "controller": true}],
                "managedFields": [{"manager": "kubectl", "operation": "Update",
                    "apiVersion": "v1", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}}}],
                "deletionTimestamp": null,
                "resourceVersion": "42"
            },
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox",
                "resources": {"requests": {"cpu": "100m"}}}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        })
    }

    #[test]
    fn trimmed_is_the_object_without_managed_fields() {
        let text = pod_json().to_string();
        let trimmed: Trimmed<Pod> = serde_json::from_str(&text).expect("trimmed pod decodes");
        let mut full: Pod = serde_json::from_str(&text).expect("pod decodes");
        assert!(
            full.metadata.managed_fields.is_some(),
            "the fixture has managedFields"
        );
        full.metadata.managed_fields = None;
        assert_eq!(trimmed.0, full, "everything but managedFields is kept");
        assert_eq!(
            trimmed
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("escaped"))
                .map(String::as_str),
            Some("a\"b\\c\u{e9}")
        );
    }

    #[test]
    fn trimmed_decodes_inside_watch_events_and_lists() {
        let event = json!({"type": "MODIFIED", "object": pod_json()}).to_string();
        let event: kube::api::WatchEvent<Trimmed<Pod>> =
            serde_json::from_str(&event).expect("watch event decodes");
        let kube::api::WatchEvent::Modified(pod) = event else {
            panic!("expected a MODIFIED event, got {event:?}");
        };
        assert_eq!(
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some("n1")
        );
        let list =
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7"},
            "items": [pod_json(), pod_json()]})
            .to_string();
        let list: kube::core::ObjectList<Trimmed<Pod>> =
            serde_json::from_str(&list).expect("list decodes");
        assert_eq!(list.items.len(), 2);
        assert!(
            list.items
                .iter()
                .all(|p| p.metadata.managed_fields.is_none())
        );
    }

    #[test]
    fn metadata_only_keeps_type_and_metadata() {
        let text = pod_json().to_string();
        let object: MetadataOnly<DynamicObject> =
            serde_json::from_str(&text).expect("metadata-only object decodes");
        assert_eq!(object.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(
            object.metadata.owner_references.as_ref().map(Vec::len),
            Some(1)
        );
        assert!(object.metadata.managed_fields.is_none());
        assert_eq!(object.types.as_ref().map(|t| t.kind.as_str()), Some("Pod"));
        assert_eq!(object.data, json!({}), "spec and status are skipped");
    }

    #[test]
    fn bad_objects_are_errors() {
        for text in [
            r#"{"metadata": {"name": 1}}"#,
            r#"{"metadata": []}"#,
            r#"{"spec": {"containers": "no"}}"#,
            r#"[]"#,
        ] {
            assert!(
                serde_json::from_str::<Trimmed<Pod>>(text).is_err(),
                "{text} must not decode"
            );
        }
    }

    #[test]
    fn resource_is_the_wrapped_kind() {
        assert_eq!(
            <Trimmed<Pod> as Resource>::url_path(&(), Some("ns")),
            "/api/v1/namespaces/ns/pods"
        );
        assert_eq!(<Trimmed<Pod> as Resource>::kind(&()), "Pod");
    }
}
