//! Label selectors (`matchLabels` and `matchExpressions`): matched
//! against labels, typed (the controllers' and the scheduler's caches) or
//! as JSON (the API server's admission), and printed in upstream's string
//! form (`kubectl get -o wide`, the scale subresource).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};
use serde_json::{Map, Value};

/// Whether `selector` selects `labels`: an empty selector selects
/// everything; an invalid one nothing.
pub fn selector_matches(
    selector: &LabelSelector,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let Ok(parsed) = Selector::try_from(selector.clone()) else {
        return false;
    };
    let empty = BTreeMap::new();
    parsed.matches(labels.unwrap_or(&empty))
}

/// Whether a selector selects everything (upstream refuses to act on those
/// for Deployments).
pub fn selector_is_empty(selector: &LabelSelector) -> bool {
    selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty)
}

/// Parse a selector once for many matches; `None` if invalid (selects nothing).
pub fn parse_selector(selector: &LabelSelector) -> Option<Selector> {
    Selector::try_from(selector.clone()).ok()
}

/// Whether a parsed selector selects `labels`.
pub fn parsed_matches(
    selector: Option<&Selector>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let empty = BTreeMap::new();
    selector.is_some_and(|s| s.matches(labels.unwrap_or(&empty)))
}

/// A label selector (`matchLabels` and `matchExpressions`) matched against
/// labels, as `metav1.LabelSelectorAsSelector(...).Matches`.
pub fn json_selector_matches(selector: &Value, labels: &Map<String, Value>) -> bool {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    if let Some(match_labels) = selector.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in match_labels {
            if label(k) != v.as_str() {
                return false;
            }
        }
    }
    for (key, operator, values) in expressions(selector) {
        let ok = match operator {
            "In" => label(key).is_some_and(|v| values.contains(v)),
            "NotIn" => label(key).is_none_or(|v| !values.contains(v)),
            "Exists" => label(key).is_some(),
            "DoesNotExist" => label(key).is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// The `matchExpressions` of a JSON selector: key, operator and values.
fn expressions(selector: &Value) -> impl Iterator<Item = (&str, &str, BTreeSet<&str>)> {
    selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|expr| {
            let text = |field| expr.get(field).and_then(Value::as_str).unwrap_or_default();
            let values = expr
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            (text("key"), text("operator"), values)
        })
}

/// A label selector that upstream refuses to convert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid label selector")]
pub struct InvalidSelector;

/// A `LabelSelector` in upstream's selector string form: requirements
/// sorted by key, e.g. `app=web,tier in (a,b),!canary`; `""` for a
/// missing or empty selector.
pub fn selector_string(v: Option<&Value>) -> Result<String, InvalidSelector> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(String::new());
    };
    let mut requirements: Vec<(String, String)> = Vec::new();
    if let Some(labels) = v.get("matchLabels").and_then(Value::as_object) {
        for (key, value) in labels {
            let value = value.as_str().unwrap_or_default();
            requirements.push((key.clone(), format!("{key}={value}")));
        }
    }
    for (key, operator, values) in expressions(v) {
        let joined = values.into_iter().collect::<Vec<_>>().join(",");
        let requirement = match operator {
            "In" if !joined.is_empty() => format!("{key} in ({joined})"),
            "NotIn" if !joined.is_empty() => format!("{key} notin ({joined})"),
            "Exists" => key.to_string(),
            "DoesNotExist" => format!("!{key}"),
            _ => return Err(InvalidSelector),
        };
        requirements.push((key.to_string(), requirement));
    }
    requirements.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(requirements
        .into_iter()
        .map(|(_, r)| r)
        .collect::<Vec<_>>()
        .join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_format_as_upstream() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"matchLabels": {"b": "2", "a": "1"}}), "a=1,b=2"),
            (
                json!({"matchExpressions": [
                    {"key": "z", "operator": "DoesNotExist"},
                    {"key": "env", "operator": "NotIn", "values": ["prod", "dev"]},
                    {"key": "k", "operator": "Exists"}]}),
                "env notin (dev,prod),k,!z",
            ),
            (json!({}), ""),
        ];
        for (selector, want) in cases {
            assert_eq!(
                selector_string(Some(&selector)).ok().as_deref(),
                Some(want),
                "{selector}"
            );
        }
        assert!(
            selector_string(Some(
                &json!({"matchExpressions": [{"key": "a", "operator": "In"}]})
            ))
            .is_err()
        );
    }

    #[test]
    fn typed_and_json_selectors_agree() {
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        let json_labels = json!({"app": "web"});
        let json_labels = json_labels.as_object().expect("labels");
        for (selector, want) in [
            (json!({"matchLabels": {"app": "web"}}), true),
            (json!({"matchLabels": {"app": "db"}}), false),
            (
                json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "x"]}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}),
                false,
            ),
            (
                json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}),
                false,
            ),
            (json!({}), true),
        ] {
            let typed: LabelSelector = serde_json::from_value(selector.clone()).expect("selector");
            assert_eq!(selector_matches(&typed, Some(&labels)), want, "{selector}");
            assert_eq!(
                json_selector_matches(&selector, json_labels),
                want,
                "{selector}"
            );
            let parsed = parse_selector(&typed);
            assert_eq!(
                parsed_matches(parsed.as_ref(), Some(&labels)),
                want,
                "{selector}"
            );
        }
        assert!(selector_is_empty(&LabelSelector::default()));
    }
}
