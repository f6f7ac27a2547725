//! Filters: whether a pod fits a node, in upstream's plugin order
//! (NodeUnschedulable, TaintToleration, NodeAffinity, NodePorts,
//! NodeResourcesFit), with upstream's reason strings, and the
//! `FailedScheduling` message that sums them up.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{
    NodeSelector, NodeSelectorTerm, Pod, PreferredSchedulingTerm, Taint, Toleration,
};

use super::cache::{NodeInfo, PodUsage, UNSCHEDULABLE_TAINT};

/// NodeUnschedulable's reason.
pub const ERR_UNSCHEDULABLE: &str = "node(s) were unschedulable";
/// TaintToleration's reason (upstream no longer names the taint).
pub const ERR_TAINT: &str = "node(s) had untolerated taint(s)";
/// NodeAffinity's reason, for nodeSelector and required affinity alike.
pub const ERR_AFFINITY: &str = "node(s) didn't match Pod's node affinity/selector";
/// NodePorts' reason.
pub const ERR_PORTS: &str = "node(s) didn't have free ports for the requested pod ports";
/// NodeResourcesFit's reason when the node's pod slots are used up.
pub const ERR_PODS: &str = "Too many pods";
/// NodeResourcesFit's reason for cpu.
pub const ERR_CPU: &str = "Insufficient cpu";
/// NodeResourcesFit's reason for memory.
pub const ERR_MEMORY: &str = "Insufficient memory";
/// The message when the cluster has no nodes at all.
pub const ERR_NO_NODES: &str = "no nodes available to schedule pods";

/// A pod being scheduled, with what the filters and scores need from it
/// worked out once.
#[derive(Debug)]
pub struct Candidate<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// What it would take from a node.
    pub usage: PodUsage,
    /// Its tolerations.
    pub tolerations: &'a [Toleration],
    /// `spec.nodeSelector`.
    pub node_selector: Option<&'a BTreeMap<String, String>>,
    /// Required node affinity.
    pub required: Option<&'a NodeSelector>,
    /// Preferred node affinity.
    pub preferred: &'a [PreferredSchedulingTerm],
    /// `spec.preemptionPolicy: Never`.
    pub never_preempts: bool,
}

impl<'a> Candidate<'a> {
    /// Work out `pod`'s scheduling facts.
    pub fn new(pod: &'a Pod) -> Candidate<'a> {
        let spec = pod.spec.as_ref();
        let node_affinity = spec
            .and_then(|s| s.affinity.as_ref())
            .and_then(|a| a.node_affinity.as_ref());
        Candidate {
            pod,
            usage: PodUsage::of(pod, ""),
            tolerations: spec
                .and_then(|s| s.tolerations.as_deref())
                .unwrap_or_default(),
            node_selector: spec.and_then(|s| s.node_selector.as_ref()),
            required: node_affinity.and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            }),
            preferred: node_affinity
                .and_then(|a| {
                    a.preferred_during_scheduling_ignored_during_execution
                        .as_deref()
                })
                .unwrap_or_default(),
            never_preempts: spec.and_then(|s| s.preemption_policy.as_deref()) == Some("Never"),
        }
    }
}

/// Why a node does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Upstream's reason strings (several only for resources).
    pub reasons: Vec<&'static str>,
    /// Whether evicting pods could not help (upstream's
    /// UnschedulableAndUnresolvable), which changes the preemption summary.
    pub unresolvable: bool,
}

impl Failure {
    fn unresolvable(reason: &'static str) -> Failure {
        Failure {
            reasons: vec![reason],
            unresolvable: true,
        }
    }
}

/// Whether `toleration` tolerates `taint`, as upstream's `ToleratesTaint`.
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = toleration.effect.as_deref().filter(|e| !e.is_empty())
        && effect != taint.effect
    {
        return false;
    }
    if let Some(key) = toleration.key.as_deref().filter(|k| !k.is_empty())
        && key != taint.key
    {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "" | "Equal" => {
            toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
        _ => false,
    }
}

fn tolerated(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| tolerates(t, taint))
}

/// Whether one node selector term matches a node (expressions and fields
/// ANDed; an empty term matches nothing).
pub fn term_matches(
    term: &NodeSelectorTerm,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    let expressions_match = expressions.iter().all(|r| {
        let values = r.values.as_deref().unwrap_or_default();
        let label = labels.get(&r.key);
        match r.operator.as_str() {
            "In" => label.is_some_and(|v| values.contains(v)),
            "NotIn" => label.is_none_or(|v| !values.contains(v)),
            "Exists" => label.is_some(),
            "DoesNotExist" => label.is_none(),
            op @ ("Gt" | "Lt") => {
                let [bound] = values else {
                    return false;
                };
                let (Some(have), Ok(bound)) = (
                    label.and_then(|v| v.parse::<i64>().ok()),
                    bound.parse::<i64>(),
                ) else {
                    return false;
                };
                if op == "Gt" {
                    have > bound
                } else {
                    have < bound
                }
            }
            _ => false,
        }
    });
    let fields_match = fields.iter().all(|r| {
        let values = r.values.as_deref().unwrap_or_default();
        if r.key != "metadata.name" {
            return false;
        }
        match r.operator.as_str() {
            "In" => values.len() == 1 && values[0] == name,
            "NotIn" => values.len() == 1 && values[0] != name,
            _ => false,
        }
    });
    expressions_match && fields_match
}

/// Whether a node satisfies the pod's nodeSelector and required node
/// affinity (terms ORed).
pub fn affinity_matches(candidate: &Candidate<'_>, node: &NodeInfo) -> bool {
    if let Some(selector) = candidate.node_selector
        && !selector.iter().all(|(k, v)| node.labels.get(k) == Some(v))
    {
        return false;
    }
    match candidate.required {
        Some(required) => required
            .node_selector_terms
            .iter()
            .any(|term| term_matches(term, &node.name, &node.labels)),
        None => true,
    }
}

/// Run every filter on one node; the first failing filter decides, as
/// upstream stops at the first failing plugin.
pub fn filter(candidate: &Candidate<'_>, node: &NodeInfo) -> Result<(), Failure> {
    if node.unschedulable {
        let taint = Taint {
            key: UNSCHEDULABLE_TAINT.to_string(),
            effect: "NoSchedule".to_string(),
            value: None,
            time_added: None,
        };
        if !tolerated(candidate.tolerations, &taint) {
            return Err(Failure::unresolvable(ERR_UNSCHEDULABLE));
        }
    }
    let untolerated = node
        .taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .any(|t| !tolerated(candidate.tolerations, t));
    if untolerated {
        return Err(Failure::unresolvable(ERR_TAINT));
    }
    if !affinity_matches(candidate, node) {
        return Err(Failure::unresolvable(ERR_AFFINITY));
    }
    let ports_taken = candidate
        .usage
        .ports
        .iter()
        .any(|want| node.usage.ports.keys().any(|have| want.conflicts(have)));
    if ports_taken {
        return Err(Failure {
            reasons: vec![ERR_PORTS],
            unresolvable: false,
        });
    }
    fits_resources(candidate, node)
}

fn fits_resources(candidate: &Candidate<'_>, node: &NodeInfo) -> Result<(), Failure> {
    let want = candidate.usage.requests;
    let used = node.usage.requested;
    let allocatable = node.allocatable;
    let mut failure = Failure {
        reasons: Vec::new(),
        unresolvable: false,
    };
    if used.pods + 1 > allocatable.pods {
        failure.reasons.push(ERR_PODS);
    }
    if want.milli_cpu > 0 && want.milli_cpu > allocatable.milli_cpu - used.milli_cpu {
        failure.reasons.push(ERR_CPU);
        failure.unresolvable |= want.milli_cpu > allocatable.milli_cpu;
    }
    if want.memory > 0 && want.memory > allocatable.memory - used.memory {
        failure.reasons.push(ERR_MEMORY);
        failure.unresolvable |= want.memory > allocatable.memory;
    }
    if failure.reasons.is_empty() {
        Ok(())
    } else {
        Err(failure)
    }
}

/// The `FailedScheduling` message for a pod that fits none of
/// `total_nodes`: upstream's FitError text, a histogram of reasons sorted
/// as strings, then the preemption summary (this scheduler never finds
/// victims, as with no PriorityClasses, where upstream's would not either).
pub fn fit_error(total_nodes: usize, failures: &[Failure], never_preempts: bool) -> String {
    if total_nodes == 0 {
        return ERR_NO_NODES.to_string();
    }
    let mut message = format!("0/{total_nodes} nodes are available:");
    let histogram = |counts: HashMap<&str, usize>| {
        let mut parts: Vec<String> = counts
            .into_iter()
            .map(|(reason, n)| format!("{n} {reason}"))
            .collect();
        parts.sort();
        parts.join(", ")
    };
    let mut reasons: HashMap<&str, usize> = HashMap::new();
    for failure in failures {
        for reason in &failure.reasons {
            *reasons.entry(reason).or_default() += 1;
        }
    }
    if !reasons.is_empty() {
        message.push_str(&format!(" {}.", histogram(reasons)));
    }
    if never_preempts {
        message.push_str(" preemption: not eligible due to preemptionPolicy=Never.");
        return message;
    }
    let mut preemption: HashMap<&str, usize> = HashMap::new();
    for failure in failures {
        let reason = if failure.unresolvable {
            "Preemption is not helpful for scheduling"
        } else {
            "No preemption victims found for incoming pod"
        };
        *preemption.entry(reason).or_default() += 1;
    }
    message.push_str(&format!(
        " preemption: 0/{total_nodes} nodes are available: {}.",
        histogram(preemption)
    ));
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;
    use serde_json::json;

    use crate::cache::Cache;

    fn pod(spec: serde_json::Value) -> Pod {
        let mut spec = spec;
        if spec.get("containers").is_none() {
            spec["containers"] = json!([{"name": "c"}]);
        }
        serde_json::from_value(json!({"metadata": {"name": "p", "uid": "u"}, "spec": spec}))
            .expect("pod json")
    }

    fn node(name: &str, extra: serde_json::Value) -> Node {
        let mut n = json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {},
            "status": {"allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}});
        json_merge(&mut n, extra);
        serde_json::from_value(n).expect("node json")
    }

    fn json_merge(target: &mut serde_json::Value, patch: serde_json::Value) {
        json_patch::merge(target, &patch);
    }

    fn check(
        pod_spec: serde_json::Value,
        node_extra: serde_json::Value,
        existing: &[serde_json::Value],
    ) -> Result<(), Failure> {
        let mut cache = Cache::new();
        cache.set_node(&node("n1", node_extra));
        for (i, spec) in existing.iter().enumerate() {
            let mut p = pod(spec.clone());
            p.metadata.uid = Some(format!("existing-{i}"));
            cache.set_pod(PodUsage::of(&p, "n1"));
        }
        let p = pod(pod_spec);
        let candidate = Candidate::new(&p);
        filter(&candidate, cache.node("n1").expect("n1"))
    }

    fn fail(reasons: &[&'static str], unresolvable: bool) -> Result<(), Failure> {
        Err(Failure {
            reasons: reasons.to_vec(),
            unresolvable,
        })
    }

    fn requests(cpu: &str, memory: &str) -> serde_json::Value {
        json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu, "memory": memory}}}]})
    }

    /// (what, pod spec, node overrides, pods already on the node, verdict).
    type Case = (
        &'static str,
        serde_json::Value,
        serde_json::Value,
        Vec<serde_json::Value>,
        Result<(), Failure>,
    );

    #[test]
    fn filters_decide_like_upstream() {
        let cases: Vec<Case> = vec![
            ("plain pod fits", json!({}), json!({}), vec![], Ok(())),
            (
                "cordoned node",
                json!({}),
                json!({"spec": {"unschedulable": true}}),
                vec![],
                fail(&[ERR_UNSCHEDULABLE], true),
            ),
            (
                "cordoned node tolerated",
                json!({"tolerations": [{"key": UNSCHEDULABLE_TAINT, "operator": "Exists", "effect": "NoSchedule"}]}),
                json!({"spec": {"unschedulable": true}}),
                vec![],
                Ok(()),
            ),
            (
                "not ready node",
                json!({}),
                json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
                vec![],
                fail(&[ERR_TAINT], true),
            ),
            (
                "NoSchedule taint",
                json!({}),
                json!({"spec": {"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]}}),
                vec![],
                fail(&[ERR_TAINT], true),
            ),
            (
                "NoExecute taint",
                json!({}),
                json!({"spec": {"taints": [{"key": "k", "effect": "NoExecute"}]}}),
                vec![],
                fail(&[ERR_TAINT], true),
            ),
            (
                "PreferNoSchedule taint does not filter",
                json!({}),
                json!({"spec": {"taints": [{"key": "k", "effect": "PreferNoSchedule"}]}}),
                vec![],
                Ok(()),
            ),
            (
                "Equal toleration",
                json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]}),
                json!({"spec": {"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]}}),
                vec![],
                Ok(()),
            ),
            (
                "Equal toleration with another value",
                json!({"tolerations": [{"key": "dedicated", "value": "cpu"}]}),
                json!({"spec": {"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]}}),
                vec![],
                fail(&[ERR_TAINT], true),
            ),
            (
                "toleration for another effect",
                json!({"tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}]}),
                json!({"spec": {"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]}}),
                vec![],
                fail(&[ERR_TAINT], true),
            ),
            (
                "empty key Exists tolerates everything",
                json!({"tolerations": [{"operator": "Exists"}]}),
                json!({"spec": {"taints": [{"key": "a", "effect": "NoSchedule"}, {"key": "b", "value": "x", "effect": "NoExecute"}]}}),
                vec![],
                Ok(()),
            ),
            (
                "nodeSelector matches",
                json!({"nodeSelector": {"kubernetes.io/hostname": "n1"}}),
                json!({}),
                vec![],
                Ok(()),
            ),
            (
                "nodeSelector misses",
                json!({"nodeSelector": {"disk": "ssd"}}),
                json!({}),
                vec![],
                fail(&[ERR_AFFINITY], true),
            ),
            (
                "required affinity In/Gt",
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}, {"key": "cores", "operator": "Gt", "values": ["4"]}]}]}}}}),
                json!({"metadata": {"labels": {"zone": "b", "cores": "8"}}}),
                vec![],
                Ok(()),
            ),
            (
                "required affinity Lt fails",
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "cores", "operator": "Lt", "values": ["4"]}]}]}}}}),
                json!({"metadata": {"labels": {"cores": "8"}}}),
                vec![],
                fail(&[ERR_AFFINITY], true),
            ),
            (
                "terms are ORed; NotIn and DoesNotExist",
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "Exists"}]},
                    {"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}, {"key": "disk", "operator": "NotIn", "values": ["hdd"]}]}]}}}}),
                json!({}),
                vec![],
                Ok(()),
            ),
            (
                "matchFields metadata.name",
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]}]}}}}),
                json!({}),
                vec![],
                fail(&[ERR_AFFINITY], true),
            ),
            (
                "host port conflict",
                json!({"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}),
                json!({}),
                vec![
                    json!({"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080, "hostIP": "10.0.0.1"}]}]}),
                ],
                fail(&[ERR_PORTS], false),
            ),
            (
                "same host port, other protocol",
                json!({"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080, "protocol": "UDP"}]}]}),
                json!({}),
                vec![
                    json!({"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}),
                ],
                Ok(()),
            ),
            (
                "cpu more than the node has",
                requests("3", "1Mi"),
                json!({}),
                vec![],
                fail(&[ERR_CPU], true),
            ),
            (
                "cpu taken by others",
                requests("1500m", "1Mi"),
                json!({}),
                vec![requests("1", "0")],
                fail(&[ERR_CPU], false),
            ),
            (
                "cpu and memory both short",
                requests("1500m", "3Gi"),
                json!({}),
                vec![requests("1", "2Gi")],
                fail(&[ERR_CPU, ERR_MEMORY], false),
            ),
            (
                "exactly full fits",
                requests("1", "2Gi"),
                json!({}),
                vec![requests("1", "2Gi")],
                Ok(()),
            ),
            (
                "a pod without requests needs a pod slot only",
                json!({}),
                json!({"status": {"allocatable": {"pods": "1"}}}),
                vec![json!({})],
                fail(&[ERR_PODS], false),
            ),
        ];
        for (what, pod_spec, node_extra, existing, want) in cases {
            assert_eq!(check(pod_spec, node_extra, &existing), want, "{what}");
        }
    }

    #[test]
    fn failed_scheduling_messages_match_upstream() {
        let taint = Failure::unresolvable(ERR_TAINT);
        let cpu_short = Failure {
            reasons: vec![ERR_CPU],
            unresolvable: false,
        };
        let cpu_too_big = Failure {
            reasons: vec![ERR_CPU],
            unresolvable: true,
        };
        let cases = [
            (
                3,
                vec![taint.clone(), cpu_short.clone(), cpu_short.clone()],
                false,
                "0/3 nodes are available: 1 node(s) had untolerated taint(s), 2 Insufficient cpu. preemption: 0/3 nodes are available: 1 Preemption is not helpful for scheduling, 2 No preemption victims found for incoming pod.",
            ),
            (
                3,
                vec![
                    cpu_too_big.clone(),
                    cpu_too_big.clone(),
                    cpu_too_big.clone(),
                ],
                false,
                "0/3 nodes are available: 3 Insufficient cpu. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling.",
            ),
            (
                1,
                vec![cpu_short.clone()],
                false,
                "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.",
            ),
            (
                5,
                vec![
                    Failure {
                        reasons: vec![ERR_CPU, ERR_MEMORY],
                        unresolvable: false,
                    },
                    Failure {
                        reasons: vec![ERR_MEMORY],
                        unresolvable: false,
                    },
                    Failure::unresolvable(ERR_AFFINITY),
                    Failure::unresolvable(ERR_UNSCHEDULABLE),
                    Failure::unresolvable(ERR_AFFINITY),
                ],
                false,
                "0/5 nodes are available: 1 Insufficient cpu, 1 node(s) were unschedulable, 2 Insufficient memory, 2 node(s) didn't match Pod's node affinity/selector. preemption: 0/5 nodes are available: 2 No preemption victims found for incoming pod, 3 Preemption is not helpful for scheduling.",
            ),
            (
                2,
                vec![cpu_short.clone(), taint.clone()],
                true,
                "0/2 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint(s). preemption: not eligible due to preemptionPolicy=Never.",
            ),
            (0, vec![], false, ERR_NO_NODES),
        ];
        for (total, failures, never, want) in cases {
            assert_eq!(fit_error(total, &failures, never), want);
        }
    }
}
