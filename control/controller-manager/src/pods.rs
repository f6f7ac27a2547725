//! Helpers shared by the workload controllers (ReplicaSet, Deployment):
//! ownership (`ownerReferences` with `controller: true`), label selection,
//! pod readiness and availability, the pod-template hash, upstream's
//! ranking of pods for scale-down, and slow-start batches. Creation and
//! deletion expectations are in [`crate::expectations`]; the work queue, the
//! event rate limiter and selector matching in `skiff-common`.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::future::Future;

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

/// The label a Deployment puts on its ReplicaSets and their pods.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// The `ownerReferences` entry marking `meta` (of `api_version`/`kind`) as
/// the controller of a dependent.
pub fn controller_reference(api_version: &str, kind: &str, meta: &ObjectMeta) -> OwnerReference {
    OwnerReference {
        api_version: api_version.to_string(),
        kind: kind.to_string(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The owner reference with `controller: true`, if any.
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))
}

/// Upstream's `FilterActivePods` test: neither finished nor being deleted.
pub fn is_pod_active(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded") | Some("Failed"))
        && pod.metadata.deletion_timestamp.is_none()
}

/// The pod's `Ready` condition's status and last transition time.
fn ready_condition(pod: &Pod) -> Option<(bool, Option<jiff::Timestamp>)> {
    let condition = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((
        condition.status == "True",
        condition.last_transition_time.as_ref().map(|t| t.0),
    ))
}

/// Whether the pod's `Ready` condition is `True`.
pub fn is_pod_ready(pod: &Pod) -> bool {
    ready_condition(pod).is_some_and(|(ready, _)| ready)
}

/// Whether the pod has been ready for at least `min_ready_seconds` at `now`
/// (upstream's `IsPodAvailable`).
pub fn is_pod_available(pod: &Pod, min_ready_seconds: i32, now: jiff::Timestamp) -> bool {
    match ready_condition(pod) {
        Some((true, since)) => {
            if min_ready_seconds <= 0 {
                return true;
            }
            since.is_some_and(|since| {
                since + jiff::SignedDuration::from_secs(i64::from(min_ready_seconds)) < now
            })
        }
        _ => false,
    }
}

/// When a ready-but-not-yet-available pod becomes available, if it does.
pub fn available_at(pod: &Pod, min_ready_seconds: i32) -> Option<jiff::Timestamp> {
    match ready_condition(pod) {
        Some((true, Some(since))) => {
            Some(since + jiff::SignedDuration::from_secs(i64::from(min_ready_seconds)))
        }
        _ => None,
    }
}

/// 32-bit FNV-1a, the hash upstream's `ComputeHash` uses.
fn fnv1a32(bytes: &[u8], mut hash: u32) -> u32 {
    for &b in bytes {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(16_777_619);
    }
    hash
}

/// Upstream's `rand.SafeEncodeString`: every character mapped onto an
/// alphabet without vowels or confusable digits.
fn safe_encode(text: &str) -> String {
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    text.bytes()
        .map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char)
        .collect()
}

/// The `pod-template-hash` of a template: FNV-1a over its canonical JSON and
/// the collision count, encoded as upstream's `ComputeHash` encodes it.
pub fn compute_hash(template: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let mut value = serde_json::to_value(template).unwrap_or(Value::Null);
    prune(&mut value);
    let canonical = canonical_json(&value);
    let mut hash = fnv1a32(canonical.as_bytes(), 2_166_136_261);
    if let Some(count) = collision_count {
        hash = fnv1a32(&(count as u32).to_le_bytes(), hash);
    }
    safe_encode(&hash.to_string())
}

/// JSON with object keys sorted, whatever the map's insertion order.
fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let body: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical_json(&map[k])))
                .collect();
            format!("{{{}}}", body.join(","))
        }
        Value::Array(items) => {
            let body: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", body.join(","))
        }
        other => other.to_string(),
    }
}

/// Drop nulls, `false`, empty strings and empty lists and maps: Go's
/// zero values, which upstream's semantic equality cannot tell from unset
/// fields.
fn prune(value: &mut Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => {
            items.iter_mut().for_each(|item| {
                prune(item);
            });
            !items.is_empty()
        }
        Value::Object(map) => {
            map.retain(|_, v| prune(v));
            !map.is_empty()
        }
        _ => true,
    }
}

/// Whether two templates are equal apart from the `pod-template-hash` label
/// (upstream's `EqualIgnoreHash`).
pub fn templates_equal_ignoring_hash(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    let normal = |t: &PodTemplateSpec| {
        let mut t = t.clone();
        if let Some(labels) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
            labels.remove(POD_TEMPLATE_HASH);
        }
        let mut value = serde_json::to_value(&t).unwrap_or(Value::Null);
        prune(&mut value);
        value
    };
    normal(a) == normal(b)
}

/// Resolve an int-or-percent against `total`, rounding percentages up or
/// down (upstream's `GetScaledValueFromIntOrPercent`).
pub fn scaled_value(value: Option<&IntOrString>, total: i32, round_up: bool, default: i32) -> i32 {
    match value {
        None => default,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(s)) => {
            let Some(percent) = s
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<i64>().ok())
            else {
                return s.parse().unwrap_or(default);
            };
            let product = percent * i64::from(total);
            let scaled = if round_up {
                (product + 99).div_euclid(100)
            } else {
                product.div_euclid(100)
            };
            i32::try_from(scaled).unwrap_or(i32::MAX)
        }
    }
}

/// A pod built from a controller's template, named `<owner>-<random>` by
/// the API server (upstream's `GetPodFromTemplate`).
pub fn pod_from_template(
    template: &PodTemplateSpec,
    namespace: &str,
    owner: OwnerReference,
) -> Pod {
    let meta = template.metadata.clone().unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", owner.name)),
            namespace: Some(namespace.to_string()),
            labels: meta.labels,
            annotations: meta.annotations,
            finalizers: meta.finalizers,
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: template.spec.clone(),
        status: None,
    }
}

/// What upstream's `ActivePodsWithRanks` compares to pick pods to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRank {
    /// The pod's `(namespace, name)`, the tie breaker.
    pub name: String,
    /// Whether it was scheduled (`spec.nodeName` set).
    pub assigned: bool,
    /// Pending 0, Unknown 1, Running 2.
    pub phase: u8,
    /// Whether it is ready.
    pub ready: bool,
    /// `controller.kubernetes.io/pod-deletion-cost`.
    pub deletion_cost: i64,
    /// How many related pods share its node.
    pub colocated: usize,
    /// When it became ready, if it is.
    pub ready_since: Option<jiff::Timestamp>,
    /// Container restarts.
    pub restarts: i32,
    /// Creation time.
    pub created: Option<jiff::Timestamp>,
}

impl PodRank {
    /// The rank of `pod`, given how many related pods share its node.
    pub fn of(pod: &Pod, colocated: usize) -> PodRank {
        let status = pod.status.as_ref();
        let phase = match status.and_then(|s| s.phase.as_deref()) {
            Some("Running") => 2,
            Some("Unknown") => 1,
            _ => 0,
        };
        let ready = ready_condition(pod);
        PodRank {
            name: pod.metadata.name.clone().unwrap_or_default(),
            assigned: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some_and(|n| !n.is_empty()),
            phase,
            ready: ready.is_some_and(|(r, _)| r),
            deletion_cost: pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("controller.kubernetes.io/pod-deletion-cost"))
                .and_then(|c| c.parse().ok())
                .unwrap_or(0),
            colocated,
            ready_since: ready.and_then(|(r, t)| if r { t } else { None }),
            restarts: status
                .and_then(|s| s.container_statuses.as_ref())
                .map(|cs| cs.iter().map(|c| c.restart_count).max().unwrap_or(0))
                .unwrap_or(0),
            created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        }
    }
}

/// Upstream's deletion order: `Less` means "delete first". Unscheduled
/// before scheduled, Pending before Unknown before Running, not ready
/// before ready, lower deletion cost first, more pods on the same node
/// first, ready for less time first, more restarts first, newer first.
pub fn deletion_order(a: &PodRank, b: &PodRank) -> Ordering {
    a.assigned
        .cmp(&b.assigned)
        .then(a.phase.cmp(&b.phase))
        .then(a.ready.cmp(&b.ready))
        .then(a.deletion_cost.cmp(&b.deletion_cost))
        .then(b.colocated.cmp(&a.colocated))
        .then_with(
            || match (a.ready && b.ready, a.ready_since, b.ready_since) {
                (true, Some(x), Some(y)) => y.cmp(&x),
                (true, None, Some(_)) => Ordering::Less,
                (true, Some(_), None) => Ordering::Greater,
                _ => Ordering::Equal,
            },
        )
        .then(b.restarts.cmp(&a.restarts))
        .then_with(|| match (a.created, b.created) {
            (Some(x), Some(y)) => y.cmp(&x),
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        })
        .then_with(|| a.name.cmp(&b.name))
}

/// Pick `count` of `pods` to delete, by [`deletion_order`]; `related` are
/// the active pods of the same owner (and its siblings) counted per node.
pub fn pods_to_delete<'a>(pods: &[&'a Pod], related: &[&Pod], count: usize) -> Vec<&'a Pod> {
    let mut per_node: HashMap<&str, usize> = HashMap::new();
    for pod in related {
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
            *per_node.entry(node).or_default() += 1;
        }
    }
    let mut ranked: Vec<(PodRank, &'a Pod)> = pods
        .iter()
        .map(|pod| {
            let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
            let colocated = node
                .map(|n| per_node.get(n).copied().unwrap_or(0))
                .unwrap_or(0);
            (PodRank::of(pod, colocated), *pod)
        })
        .collect();
    ranked.sort_by(|a, b| deletion_order(&a.0, &b.0));
    ranked.into_iter().take(count).map(|(_, p)| p).collect()
}

/// Run `count` calls of `make` in batches of 1, 2, 4, … (upstream's
/// `slowStartBatch`), stopping after the first batch with a failure.
/// Returns how many succeeded and the first error.
pub async fn slow_start_batch<F, Fut, E>(
    count: usize,
    initial: usize,
    mut make: F,
) -> (usize, Option<E>)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let mut remaining = count;
    let mut successes = 0;
    let mut batch = initial.max(1).min(count);
    while batch > 0 {
        let results = futures::future::join_all((0..batch).map(|_| make())).await;
        let mut first_error = None;
        for result in results {
            match result {
                Ok(()) => successes += 1,
                Err(e) => {
                    if first_error.is_none() {
                        first_error = Some(e);
                    }
                }
            }
        }
        if first_error.is_some() {
            return (successes, first_error);
        }
        remaining -= batch;
        batch = (batch * 2).min(remaining);
    }
    (successes, None)
}

/// A failed step of a workload controller.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// An API request failed.
    #[error("cannot {action} {object}")]
    Api {
        /// What was attempted (`create pod`, `patch replicaset status`, …).
        action: &'static str,
        /// The object, `namespace/name`.
        object: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A ReplicaSet of the new template's name exists with another template.
    #[error("hash collision: replica set {object} exists with a different template")]
    HashCollision {
        /// The ReplicaSet, `namespace/name`.
        object: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use k8s_openapi::api::core::v1::{Container, PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn template(image: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
                ..ObjectMeta::default()
            }),
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    image: Some(image.into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
        }
    }

    fn pod(name: &str, node: Option<&str>, phase: &str, ready: bool, created_secs: i64) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(Time(
                    jiff::Timestamp::from_second(created_secs).expect("ts"),
                )),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_string),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    last_transition_time: Some(Time(
                        jiff::Timestamp::from_second(created_secs + 5).expect("ts"),
                    )),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn hash_is_stable_and_sensitive() {
        let a = compute_hash(&template("nginx:1"), None);
        assert_eq!(
            a,
            compute_hash(&template("nginx:1"), None),
            "same template, same hash"
        );
        assert_ne!(
            a,
            compute_hash(&template("nginx:2"), None),
            "image changes the hash"
        );
        assert_ne!(
            a,
            compute_hash(&template("nginx:1"), Some(1)),
            "collision count changes the hash"
        );
        assert!(
            a.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)),
            "safe alphabet: {a}"
        );
        // The value is pinned so a change in the encoding is noticed: a
        // different hash would make every Deployment roll after an upgrade.
        assert_eq!(a, "79bfd649dc");
        assert_eq!(safe_encode("0123456789"), "456789bcdf");
        assert_eq!(fnv1a32(b"", 2_166_136_261), 2_166_136_261);
        assert_eq!(
            fnv1a32(b"a", 2_166_136_261),
            0xe40c_292c,
            "FNV-1a test vector"
        );
    }

    #[test]
    fn equality_ignores_the_hash_label_and_empty_fields() {
        let mut with_hash = template("nginx:1");
        with_hash
            .metadata
            .as_mut()
            .expect("meta")
            .labels
            .as_mut()
            .expect("labels")
            .insert(POD_TEMPLATE_HASH.into(), "abc".into());
        assert!(templates_equal_ignoring_hash(
            &with_hash,
            &template("nginx:1")
        ));
        assert!(!templates_equal_ignoring_hash(
            &with_hash,
            &template("nginx:2")
        ));
        let mut empty_annotations = template("nginx:1");
        empty_annotations
            .metadata
            .as_mut()
            .expect("meta")
            .annotations = Some(BTreeMap::new());
        assert!(templates_equal_ignoring_hash(
            &empty_annotations,
            &template("nginx:1")
        ));
        let mut explicit_false = template("nginx:1");
        explicit_false.spec.as_mut().expect("spec").host_network = Some(false);
        explicit_false.spec.as_mut().expect("spec").containers[0].tty = Some(false);
        assert!(
            templates_equal_ignoring_hash(&explicit_false, &template("nginx:1")),
            "false is Go's zero value"
        );
        assert_eq!(
            compute_hash(&explicit_false, None),
            compute_hash(&template("nginx:1"), None)
        );
    }

    #[test]
    fn percentages_round_as_upstream() {
        let pct = IntOrString::String("25%".into());
        assert_eq!(scaled_value(Some(&pct), 5, true, 0), 2, "surge rounds up");
        assert_eq!(
            scaled_value(Some(&pct), 5, false, 0),
            1,
            "unavailable rounds down"
        );
        assert_eq!(scaled_value(Some(&pct), 3, false, 0), 0);
        assert_eq!(scaled_value(Some(&IntOrString::Int(3)), 10, true, 0), 3);
        assert_eq!(scaled_value(None, 10, true, 7), 7);
    }

    #[test]
    fn deletion_prefers_unscheduled_then_not_ready_then_newest() {
        let unscheduled = pod("a-unscheduled", None, "Pending", false, 100);
        let pending = pod("b-pending", Some("n1"), "Pending", false, 100);
        let not_ready = pod("c-not-ready", Some("n1"), "Running", false, 100);
        let old_ready = pod("d-old", Some("n2"), "Running", true, 10);
        let new_ready = pod("e-new", Some("n3"), "Running", true, 50);
        let all = [&old_ready, &new_ready, &not_ready, &pending, &unscheduled];
        let picked: Vec<String> = pods_to_delete(&all, &all, 5)
            .into_iter()
            .map(|p| p.metadata.name.clone().expect("name"))
            .collect();
        assert_eq!(
            picked,
            [
                "a-unscheduled",
                "b-pending",
                "c-not-ready",
                "e-new",
                "d-old"
            ]
        );
        let two = pods_to_delete(&all, &all, 2);
        assert_eq!(two.len(), 2);
    }

    #[test]
    fn doubled_up_pods_go_first() {
        let alone = pod("alone", Some("n1"), "Running", true, 10);
        let crowded1 = pod("crowded1", Some("n2"), "Running", true, 10);
        let crowded2 = pod("crowded2", Some("n2"), "Running", true, 10);
        let all = [&alone, &crowded1, &crowded2];
        let picked = pods_to_delete(&all, &all, 1);
        assert_eq!(picked[0].metadata.name.as_deref(), Some("crowded1"));
    }

    #[test]
    fn availability_waits_min_ready_seconds() {
        let p = pod("p", Some("n"), "Running", true, 0);
        let at = |s| jiff::Timestamp::from_second(s).expect("ts");
        assert!(is_pod_available(&p, 0, at(1)));
        assert!(
            !is_pod_available(&p, 10, at(14)),
            "ready at 5, available after 15"
        );
        assert!(is_pod_available(&p, 10, at(16)));
        let not_ready = pod("q", Some("n"), "Running", false, 0);
        assert!(!is_pod_available(&not_ready, 0, at(100)));
    }

    #[tokio::test]
    async fn slow_start_doubles_and_stops_on_failure() {
        let calls = std::sync::Arc::new(Mutex::new(0usize));
        let c = calls.clone();
        let (ok, err) = slow_start_batch(10, 1, || {
            let c = c.clone();
            async move {
                *c.lock().expect("lock") += 1;
                Ok::<(), ()>(())
            }
        })
        .await;
        assert_eq!((ok, err), (10, None));
        assert_eq!(*calls.lock().expect("lock"), 10);
        // Batches 1, 2, 4: the fourth call fails, so batch 4 runs and then stops.
        let n = std::sync::Arc::new(Mutex::new(0usize));
        let (ok, err) = slow_start_batch(100, 1, || {
            let n = n.clone();
            async move {
                let mut n = n.lock().expect("lock");
                *n += 1;
                if *n == 4 { Err("quota") } else { Ok(()) }
            }
        })
        .await;
        assert_eq!(ok, 6, "1 + 2 + 3 of the third batch");
        assert_eq!(err, Some("quota"));
    }
}
