//! Field errors, worded as apimachinery's `field.Error` prints them.

use super::*;

/// A bad value as upstream prints it: strings quoted, numbers bare, maps and
/// lists as JSON, and `IntOrString` (a `fmt.Stringer`) bare.
pub(super) fn show(value: &Value) -> String {
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
pub(super) fn show_int_or_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => show(other),
    }
}

pub(super) fn required(field: impl Into<String>, detail: &str) -> Cause {
    let message = if detail.is_empty() {
        "Required value".to_string()
    } else {
        format!("Required value: {detail}")
    };
    Cause::new("FieldValueRequired", field, message)
}

pub(super) fn invalid(field: impl Into<String>, shown: &str, detail: &str) -> Cause {
    Cause::new(
        "FieldValueInvalid",
        field,
        format!("Invalid value: {shown}: {detail}"),
    )
}

pub(super) fn invalid_str(field: impl Into<String>, value: &str, detail: &str) -> Cause {
    invalid(field, &show(&json!(value)), detail)
}

pub(super) fn not_supported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Cause {
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

pub(super) fn duplicate(field: impl Into<String>, value: &Value) -> Cause {
    Cause::new(
        "FieldValueDuplicate",
        field,
        format!("Duplicate value: {}", show(value)),
    )
}

pub(super) fn forbidden(field: impl Into<String>, detail: &str) -> Cause {
    Cause::new("FieldValueForbidden", field, format!("Forbidden: {detail}"))
}

pub(super) fn too_long(field: impl Into<String>, max: usize) -> Cause {
    Cause::new(
        "FieldValueTooLong",
        field,
        format!("Too long: must have at most {max} bytes"),
    )
}

pub(super) fn not_found(field: impl Into<String>, value: &Value) -> Cause {
    Cause::new(
        "FieldValueNotFound",
        field,
        format!("Not found: {}", show(value)),
    )
}
