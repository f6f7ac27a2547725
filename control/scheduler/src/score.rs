//! Scores: how well each feasible node suits a pod, upstream's default
//! score plugins with their default weights — least allocated and
//! balanced allocation (1 each), preferred node affinity (2), spreading of
//! pods with the same controller owner (2, where upstream's default
//! topology spreading would act), PreferNoSchedule taints (3) — each
//! normalized to 0..=100, then the best node with ties broken at random.

use rand::Rng;

use super::cache::NodeInfo;
use super::filter::{Candidate, term_matches, tolerates};

/// The most a score plugin gives a node.
pub const MAX_SCORE: i64 = 100;

const WEIGHT_LEAST_ALLOCATED: i64 = 1;
const WEIGHT_BALANCED: i64 = 1;
const WEIGHT_AFFINITY: i64 = 2;
const WEIGHT_SPREAD: i64 = 2;
const WEIGHT_TAINTS: i64 = 3;

/// Upstream's LeastAllocated: the share of cpu and memory left free after
/// placing the pod (requests with defaults), averaged.
pub fn least_allocated(candidate: &Candidate<'_>, node: &NodeInfo) -> i64 {
    let want = candidate.usage.non_zero;
    let used = node.usage.non_zero;
    let share = |requested: i64, allocatable: i64| {
        if allocatable <= 0 || requested > allocatable {
            0
        } else {
            (allocatable - requested) * MAX_SCORE / allocatable
        }
    };
    let cpu = share(used.milli_cpu + want.milli_cpu, node.allocatable.milli_cpu);
    let memory = share(used.memory + want.memory, node.allocatable.memory);
    (cpu + memory) / 2
}

/// Upstream's BalancedAllocation: how evenly cpu and memory would be used
/// (100 when their used fractions are equal).
pub fn balanced_allocation(candidate: &Candidate<'_>, node: &NodeInfo) -> i64 {
    let want = candidate.usage.non_zero;
    let used = node.usage.non_zero;
    let fraction = |requested: i64, allocatable: i64| {
        if allocatable <= 0 {
            1.0
        } else {
            (requested as f64 / allocatable as f64).min(1.0)
        }
    };
    let cpu = fraction(used.milli_cpu + want.milli_cpu, node.allocatable.milli_cpu);
    let memory = fraction(used.memory + want.memory, node.allocatable.memory);
    let deviation = (cpu - memory).abs() / 2.0;
    ((1.0 - deviation) * MAX_SCORE as f64) as i64
}

/// The summed weights of the pod's preferred node affinity terms the node
/// matches (raw, before normalization).
pub fn preferred_affinity(candidate: &Candidate<'_>, node: &NodeInfo) -> i64 {
    candidate
        .preferred
        .iter()
        .filter(|p| p.weight != 0)
        .filter(|p| {
            let term = &p.preference;
            let empty = term
                .match_expressions
                .as_deref()
                .unwrap_or_default()
                .is_empty()
                && term.match_fields.as_deref().unwrap_or_default().is_empty();
            empty || term_matches(term, &node.name, &node.labels)
        })
        .map(|p| i64::from(p.weight))
        .sum()
}

/// How many pods of the candidate's controller owner already run on the
/// node (raw; fewer is better).
pub fn owner_pods(candidate: &Candidate<'_>, node: &NodeInfo) -> i64 {
    candidate
        .usage
        .owner
        .as_deref()
        .map_or(0, |owner| i64::from(node.usage.owned_by(owner)))
}

/// How many PreferNoSchedule taints of the node the pod does not tolerate
/// (raw; fewer is better).
pub fn intolerable_taints(candidate: &Candidate<'_>, node: &NodeInfo) -> i64 {
    let tolerations: Vec<_> = candidate
        .tolerations
        .iter()
        .filter(|t| {
            t.effect
                .as_deref()
                .is_none_or(|e| e.is_empty() || e == "PreferNoSchedule")
        })
        .collect();
    node.taints
        .iter()
        .filter(|t| t.effect == "PreferNoSchedule")
        .filter(|t| !tolerations.iter().any(|tol| tolerates(tol, t)))
        .count() as i64
}

/// Scale raw scores to 0..=100 by the highest, upstream's
/// `DefaultNormalizeScore`; `reverse` makes the lowest raw score best.
pub fn normalize(raw: &mut [i64], reverse: bool) {
    let max = raw.iter().copied().max().unwrap_or(0);
    if max == 0 {
        if reverse {
            raw.iter_mut().for_each(|s| *s = MAX_SCORE);
        }
        return;
    }
    for s in raw.iter_mut() {
        let scaled = MAX_SCORE * *s / max;
        *s = if reverse { MAX_SCORE - scaled } else { scaled };
    }
}

/// The weighted total score of every node in `nodes`, in order.
pub fn score(candidate: &Candidate<'_>, nodes: &[&NodeInfo]) -> Vec<i64> {
    let raw = |f: fn(&Candidate<'_>, &NodeInfo) -> i64| -> Vec<i64> {
        nodes.iter().map(|n| f(candidate, n)).collect()
    };
    let mut totals: Vec<i64> = nodes
        .iter()
        .map(|n| {
            WEIGHT_LEAST_ALLOCATED * least_allocated(candidate, n)
                + WEIGHT_BALANCED * balanced_allocation(candidate, n)
        })
        .collect();
    let mut add = |mut scores: Vec<i64>, reverse: bool, weight: i64| {
        normalize(&mut scores, reverse);
        for (total, s) in totals.iter_mut().zip(scores) {
            *total += weight * s;
        }
    };
    if !candidate.preferred.is_empty() {
        add(raw(preferred_affinity), false, WEIGHT_AFFINITY);
    }
    if candidate.usage.owner.is_some() {
        add(raw(owner_pods), true, WEIGHT_SPREAD);
    }
    add(raw(intolerable_taints), true, WEIGHT_TAINTS);
    totals
}

/// The index of the best score, a uniformly random one among equals (as
/// upstream's `selectHost`); `None` for no scores.
pub fn select(scores: &[i64], rng: &mut impl Rng) -> Option<usize> {
    let mut best: Option<(i64, usize)> = None;
    let mut ties = 0u32;
    for (i, &s) in scores.iter().enumerate() {
        match best {
            Some((b, _)) if s < b => {}
            Some((b, _)) if s == b => {
                ties += 1;
                if rng.random_range(0..ties) == 0 {
                    best = Some((s, i));
                }
            }
            _ => {
                best = Some((s, i));
                ties = 1;
            }
        }
    }
    best.map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Node, Pod};
    use serde_json::json;

    use crate::cache::{Cache, PodUsage};

    fn node(name: &str, cpu: &str, memory: &str, extra: serde_json::Value) -> Node {
        let mut n = json!({
            "metadata": {"name": name},
            "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}});
        json_patch::merge(&mut n, &extra);
        serde_json::from_value(n).expect("node json")
    }

    fn pod(uid: &str, spec: serde_json::Value) -> Pod {
        let mut p = json!({"metadata": {"name": uid, "uid": uid,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "rs-uid", "controller": true}]},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "100m", "memory": "100Mi"}}}]}});
        json_patch::merge(&mut p, &json!({"spec": spec}));
        serde_json::from_value(p).expect("pod json")
    }

    fn best(cache: &Cache, p: &Pod) -> String {
        let candidate = Candidate::new(p);
        let nodes: Vec<&NodeInfo> = cache.nodes().iter().collect();
        let scores = score(&candidate, &nodes);
        let i = select(&scores, &mut rand::rng()).expect("a node");
        nodes[i].name.clone()
    }

    #[test]
    fn normalization_matches_upstream() {
        let mut s = vec![0, 5, 10];
        normalize(&mut s, false);
        assert_eq!(s, vec![0, 50, 100]);
        let mut s = vec![0, 5, 10];
        normalize(&mut s, true);
        assert_eq!(s, vec![100, 50, 0]);
        let mut s = vec![0, 0];
        normalize(&mut s, true);
        assert_eq!(s, vec![100, 100]);
    }

    #[test]
    fn least_allocated_prefers_the_emptier_node() {
        let mut cache = Cache::new();
        cache.set_node(&node("small", "1", "1Gi", json!({})));
        cache.set_node(&node("big", "8", "16Gi", json!({})));
        let p = pod("p", json!({}));
        let candidate = Candidate::new(&p);
        let small = least_allocated(&candidate, cache.node("small").expect("small"));
        let big = least_allocated(&candidate, cache.node("big").expect("big"));
        // small: cpu (1000-100)/1000 = 90, memory (1024-100)/1024 = 90 → 90.
        assert_eq!(small, 90);
        assert!(big > small, "big {big} > small {small}");
        assert_eq!(best(&cache, &p), "big");
    }

    #[test]
    fn preferred_affinity_outweighs_free_space() {
        let mut cache = Cache::new();
        cache.set_node(&node("plain", "8", "16Gi", json!({})));
        cache.set_node(&node(
            "ssd",
            "2",
            "4Gi",
            json!({"metadata": {"labels": {"disk": "ssd"}}}),
        ));
        let p = pod(
            "p",
            json!({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}}]}}}),
        );
        let candidate = Candidate::new(&p);
        assert_eq!(
            preferred_affinity(&candidate, cache.node("ssd").expect("ssd")),
            50
        );
        assert_eq!(
            preferred_affinity(&candidate, cache.node("plain").expect("plain")),
            0
        );
        assert_eq!(best(&cache, &p), "ssd");
    }

    #[test]
    fn prefer_no_schedule_taints_are_avoided() {
        let mut cache = Cache::new();
        cache.set_node(&node(
            "a",
            "4",
            "8Gi",
            json!({"spec": {"taints": [{"key": "k", "effect": "PreferNoSchedule"}]}}),
        ));
        cache.set_node(&node("b", "4", "8Gi", json!({})));
        let p = pod("p", json!({}));
        for _ in 0..20 {
            assert_eq!(best(&cache, &p), "b");
        }
        let tolerant = pod(
            "t",
            json!({"tolerations": [{"key": "k", "operator": "Exists"}]}),
        );
        assert_eq!(
            intolerable_taints(&Candidate::new(&tolerant), cache.node("a").expect("a")),
            0
        );
    }

    #[test]
    fn replicas_spread_two_two_one_over_three_nodes() {
        for _ in 0..50 {
            let mut cache = Cache::new();
            for name in ["n1", "n2", "n3"] {
                cache.set_node(&node(name, "4", "8Gi", json!({})));
            }
            let mut counts = std::collections::BTreeMap::new();
            for i in 0..5 {
                let p = pod(&format!("p{i}"), json!({}));
                let chosen = best(&cache, &p);
                cache.assume(PodUsage::of(&p, &chosen));
                *counts.entry(chosen).or_insert(0) += 1;
            }
            let mut spread: Vec<i32> = counts.values().copied().collect();
            spread.sort();
            assert_eq!(spread, vec![1, 2, 2], "placements {counts:?}");
        }
    }

    #[test]
    fn ties_are_broken_at_random() {
        let scores = [5, 9, 9, 1, 9];
        let mut seen = std::collections::BTreeSet::new();
        let mut rng = rand::rng();
        for _ in 0..200 {
            seen.insert(select(&scores, &mut rng).expect("index"));
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 2, 4]);
        assert_eq!(select(&[], &mut rng), None);
    }
}
