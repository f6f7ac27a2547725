//! Stored objects handled as JSON text, where decoding them is not needed.
//!
//! Every change a watch delivers used to be decoded from etcd's bytes into
//! a [`serde_json::Value`] and encoded again for the wire, although all the
//! API server changes on its way out is `metadata.resourceVersion`. Here the
//! object's text is split into its top-level fields (borrowed raw JSON, no
//! tree is built), and the metadata into its fields, and the text is put
//! back together with the resourceVersion spliced in. Splitting checks the
//! text as a full parse does (syntax, escapes, UTF-8), so a stored value
//! that would not decode is still refused here.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// An object's fields in their order: each key, and its value as raw JSON
/// borrowed from the object's text.
#[derive(Debug)]
pub struct Fields<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Fields<'a> {
    /// Split the JSON object `text` into its fields; an error if `text` is
    /// not one (or not valid JSON).
    pub fn parse(text: &'a [u8]) -> Result<Fields<'a>, serde_json::Error> {
        serde_json::from_slice(text)
    }

    /// Split the raw JSON object `raw` into its fields.
    pub fn of(raw: &'a RawValue) -> Result<Fields<'a>, serde_json::Error> {
        serde_json::from_str(raw.get())
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value: &'de RawValue = map.next_value()?;
            fields.push((key, value));
        }
        Ok(Fields(fields))
    }
}

/// A key borrowed from the text when it has no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(key))
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(key.to_string()))
    }

    fn visit_string<E: de::Error>(self, key: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(key))
    }
}

/// Append `"key":` to `out`, escaped as JSON.
#[allow(
    clippy::ptr_arg,
    reason = "whether the key is borrowed tells whether it had escapes"
)]
fn push_key(out: &mut Vec<u8>, key: &Cow<'_, str>) {
    match key {
        // Borrowed from the text means it had no escapes there, so it has
        // nothing to escape now.
        Cow::Borrowed(key) => {
            out.push(b'"');
            out.extend_from_slice(key.as_bytes());
            out.push(b'"');
        }
        Cow::Owned(key) => {
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, key);
        }
    }
    out.push(b':');
}

/// The JSON object `text` with `metadata.resourceVersion` set to `revision`
/// (replaced if present, appended to the metadata otherwise), the rest as
/// it is; an object without a metadata object is returned unchanged. The
/// same object as decoding `text` and setting the field on the value would
/// give.
pub fn with_resource_version(text: &[u8], revision: i64) -> Result<Vec<u8>, serde_json::Error> {
    let top = Fields::parse(text)?;
    let mut out = Vec::with_capacity(text.len() + 40);
    out.push(b'{');
    for (i, (key, raw)) in top.0.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_key(&mut out, key);
        if key == "metadata" && raw.get().starts_with('{') {
            let metadata = Fields::of(raw)?;
            out.push(b'{');
            // Each field is followed by a comma: resourceVersion comes last.
            for (key, raw) in metadata
                .0
                .iter()
                .filter(|(key, _)| key != "resourceVersion")
            {
                push_key(&mut out, key);
                out.extend_from_slice(raw.get().as_bytes());
                out.push(b',');
            }
            out.extend_from_slice(b"\"resourceVersion\":\"");
            out.extend_from_slice(revision.to_string().as_bytes());
            out.extend_from_slice(b"\"}");
        } else {
            out.extend_from_slice(raw.get().as_bytes());
        }
    }
    out.push(b'}');
    Ok(out)
}

/// A watch event line, `{"type":KIND,"object":OBJECT}` and a newline, from
/// the object's JSON text.
pub fn watch_event_line(kind: &str, object: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(object.len() + kind.len() + 24);
    line.extend_from_slice(b"{\"type\":");
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut line, kind);
    line.extend_from_slice(b",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// What decoding and setting the field gives.
    fn decoded_way(text: &[u8], revision: i64) -> Value {
        let mut value: Value = serde_json::from_slice(text).expect("fixture decodes");
        crate::storage::set_resource_version(&mut value, revision);
        value
    }

    fn spliced(text: &[u8], revision: i64) -> Value {
        let out = with_resource_version(text, revision).expect("splices");
        serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "spliced text is not JSON ({e}): {}",
                String::from_utf8_lossy(&out)
            )
        })
    }

    #[test]
    fn the_resource_version_is_spliced_as_decoding_would_set_it() {
        for text in [
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "labels": {"x": "y"}},
                "spec": {"containers": [{"name": "c"}]}})
            .to_string(),
            json!({"metadata": {}}).to_string(),
            json!({"metadata": {"name": "a", "resourceVersion": "3"}}).to_string(),
            json!({"metadata": null, "spec": {}}).to_string(),
            json!({"kind": "NoMetadata"}).to_string(),
            json!({"metadata": {"name": "esc\"aped\\ \u{e9}\u{1}", "k\"ey": [1, 2.5, true, null]},
                "we\\ird": "\u{2028}"})
            .to_string(),
            // Whitespace and the key order as a client may have sent them.
            "{ \"spec\" : { \"a\" : 1 } ,\n \"metadata\" : { \"name\" : \"b\" } }".to_string(),
            "{}".to_string(),
        ] {
            assert_eq!(
                spliced(text.as_bytes(), 42),
                decoded_way(text.as_bytes(), 42),
                "{text}"
            );
        }
    }

    #[test]
    fn the_object_keeps_its_field_order() {
        let out = with_resource_version(br#"{"kind":"Pod","metadata":{"name":"a"},"spec":{}}"#, 7)
            .expect("splices");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            r#"{"kind":"Pod","metadata":{"name":"a","resourceVersion":"7"},"spec":{}}"#
        );
        let out = with_resource_version(br#"{"metadata":{}}"#, 7).expect("splices");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            r#"{"metadata":{"resourceVersion":"7"}}"#
        );
    }

    #[test]
    fn what_would_not_decode_is_refused() {
        for text in [
            &b"[1]"[..],
            b"\"text\"",
            b"{\"metadata\":{\"name\":}}",
            b"{\"a\":\"\\q\"}",
            b"{\"a\":\"\xff\"}",
            b"{\"a\":1} trailing",
            b"{\"metadata\":{\"name\":\"a\"}",
            b"",
        ] {
            assert!(
                with_resource_version(text, 1).is_err(),
                "{} must be refused",
                String::from_utf8_lossy(text)
            );
            assert!(
                serde_json::from_slice::<Value>(text).is_err()
                    || !serde_json::from_slice::<Value>(text)
                        .expect("checked")
                        .is_object(),
                "the fixture {} is bad for a full parse too",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn a_watch_event_line_is_the_serialized_event() {
        let object = br#"{"metadata":{"name":"a"}}"#;
        let line = watch_event_line("MODIFIED", object);
        assert_eq!(line.last(), Some(&b'\n'));
        let event: Value = serde_json::from_slice(&line).expect("line is JSON");
        assert_eq!(
            event,
            json!({"type": "MODIFIED", "object": {"metadata": {"name": "a"}}})
        );
    }
}
