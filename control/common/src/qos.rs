//! A pod's QoS class (`status.qosClass`), as upstream's `GetPodQOS`
//! computes it: quantities compared by value, so `cpu: "1"` and
//! `cpu: 1000m` are the same.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::quantity::Quantity;

/// Upstream's `GetPodQOS` over the regular and init containers.
pub fn pod_qos_class(spec: &Map<String, Value>) -> &'static str {
    let containers = ["containers", "initContainers"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(Value::as_array))
        .flatten();
    let mut any = false;
    let mut guaranteed = true;
    for container in containers {
        let resources = container.get("resources");
        let requests = resources
            .and_then(|r| r.get("requests"))
            .and_then(Value::as_object);
        let limits = resources
            .and_then(|r| r.get("limits"))
            .and_then(Value::as_object);
        let relevant = |m: Option<&Map<String, Value>>| {
            m.map(|m| {
                m.iter()
                    .filter(|(k, v)| {
                        (k.as_str() == "cpu" || k.as_str() == "memory")
                            && v.as_str()
                                .and_then(|q| Quantity::parse(q).ok())
                                .is_some_and(|q| q.nanos != 0)
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<BTreeMap<_, _>>()
            })
            .unwrap_or_default()
        };
        let req = relevant(requests);
        let lim = relevant(limits);
        if !req.is_empty() || !lim.is_empty() {
            any = true;
        }
        if lim.len() != 2 {
            guaranteed = false;
        }
        for (name, quantity) in &req {
            let same = match (lim.get(name).and_then(Value::as_str), quantity.as_str()) {
                (Some(l), Some(r)) => match (Quantity::parse(l), Quantity::parse(r)) {
                    (Ok(l), Ok(r)) => l.nanos == r.nanos,
                    _ => false,
                },
                _ => false,
            };
            if !same {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn qos(pod: Value) -> &'static str {
        pod_qos_class(pod["spec"].as_object().expect("spec"))
    }

    #[test]
    fn qos_follows_requests_and_limits() {
        let best = json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(qos(best), "BestEffort");
        let burst = json!({"spec": {"containers": [{"name": "a", "resources": {"requests": {"cpu": "100m"}}}]}});
        assert_eq!(qos(burst), "Burstable");
        let guaranteed = json!({"spec": {"containers": [{"name": "a", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}});
        assert_eq!(qos(guaranteed), "Guaranteed");
    }

    #[test]
    fn quantities_compare_by_value() {
        let same = json!({"spec": {"containers": [{"name": "a", "resources": {
            "requests": {"cpu": "1", "memory": "1Gi"},
            "limits": {"cpu": "1000m", "memory": "1073741824"},
        }}]}});
        assert_eq!(qos(same), "Guaranteed");
        let init_burstable = json!({"spec": {
            "containers": [{"name": "a", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}],
            "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "1"}}}],
        }});
        assert_eq!(qos(init_burstable), "Burstable");
        let zero = json!({"spec": {"containers": [{"name": "a", "resources": {"requests": {"cpu": "0"}}}]}});
        assert_eq!(qos(zero), "BestEffort", "zero quantities do not count");
    }
}
