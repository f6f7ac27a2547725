//! Pod status as upstream's kubelet reports it, from the agent's record of
//! each container: phase, conditions (PodReadyToStartContainers,
//! Initialized, ContainersReady, Ready, PodScheduled), pod and host IPs,
//! and containerStatuses with state, lastState, restartCount, image,
//! imageID, containerID, ready and started. Pure: [`pod_status`] is what
//! the worker patches into `pods/status`.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

/// A container's state, as in `containerStatuses[].state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CState {
    /// Not running: why (ContainerCreating, ErrImagePull, ImagePullBackOff,
    /// CrashLoopBackOff, CreateContainerError…).
    Waiting {
        /// The reason.
        reason: String,
        /// A message, possibly empty.
        message: String,
    },
    /// Running since `started_at`.
    Running {
        /// When it started.
        started_at: Timestamp,
    },
    /// Exited.
    Terminated(Terminated),
}

/// A terminated container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminated {
    /// Its exit code.
    pub exit_code: i32,
    /// Completed, Error, OOMKilled…
    pub reason: String,
    /// When it started.
    pub started_at: Option<Timestamp>,
    /// When it exited.
    pub finished_at: Timestamp,
    /// `containerd://<id>`.
    pub container_id: String,
}

/// Everything the status needs about one container.
#[derive(Debug, Clone)]
pub struct ContainerView {
    /// Its name.
    pub name: String,
    /// The image as written in the spec.
    pub image: String,
    /// The image's config digest, once known.
    pub image_id: String,
    /// `containerd://<id>` of the current (or last) instance, if any.
    pub container_id: Option<String>,
    /// The state.
    pub state: CState,
    /// The previous instance's termination.
    pub last_state: Option<Terminated>,
    /// How many times it was restarted.
    pub restart_count: i32,
    /// Ready (readiness probe passing, or running without one).
    pub ready: bool,
    /// Started (startup probe passed, or running without one).
    pub started: bool,
}

fn time(t: Timestamp) -> Value {
    json!(Time(t))
}

fn terminated_json(t: &Terminated) -> Value {
    let mut v = json!({
        "exitCode": t.exit_code,
        "reason": t.reason,
        "finishedAt": time(t.finished_at),
        "containerID": t.container_id,
    });
    if let Some(started) = t.started_at {
        v["startedAt"] = time(started);
    }
    v
}

/// One `containerStatuses` entry.
pub fn container_status(c: &ContainerView) -> Value {
    let state = match &c.state {
        CState::Waiting { reason, message } => {
            let mut w = json!({"reason": reason});
            if !message.is_empty() {
                w["message"] = json!(message);
            }
            json!({"waiting": w})
        }
        CState::Running { started_at } => json!({"running": {"startedAt": time(*started_at)}}),
        CState::Terminated(t) => json!({"terminated": terminated_json(t)}),
    };
    let last = c
        .last_state
        .as_ref()
        .map_or(json!({}), |t| json!({"terminated": terminated_json(t)}));
    let mut v = json!({
        "name": c.name,
        "image": c.image,
        "imageID": c.image_id,
        "ready": c.ready,
        "started": c.started,
        "restartCount": c.restart_count,
        "state": state,
        "lastState": last,
    });
    if let Some(id) = &c.container_id {
        v["containerID"] = json!(id);
    }
    v
}

/// The pod's phase from its containers and restart policy (upstream's
/// `getPhase`, without init containers: `initialized` says whether they
/// are done).
pub fn phase(
    containers: &[ContainerView],
    restart_policy: &str,
    initialized: bool,
) -> &'static str {
    if !initialized {
        return "Pending";
    }
    let total = containers.len();
    let mut running = 0;
    let mut waiting_fresh = 0;
    let mut waiting_restarting = 0;
    let mut stopped = 0;
    let mut succeeded = 0;
    for c in containers {
        match &c.state {
            CState::Running { .. } => running += 1,
            CState::Terminated(t) => {
                stopped += 1;
                if t.exit_code == 0 {
                    succeeded += 1;
                }
            }
            CState::Waiting { .. } => {
                if c.last_state.is_some() || c.restart_count > 0 {
                    waiting_restarting += 1;
                } else {
                    waiting_fresh += 1;
                }
            }
        }
    }
    if waiting_fresh > 0 {
        return "Pending";
    }
    if running > 0 || waiting_restarting > 0 {
        return "Running";
    }
    if stopped == total && total > 0 {
        if succeeded == total {
            return "Succeeded";
        }
        return match restart_policy {
            "Always" => "Running",
            _ => "Failed",
        };
    }
    "Pending"
}

/// The condition `type_` with `status`, keeping its old
/// `lastTransitionTime` from `pod` when its status did not change.
fn condition(pod: &Pod, type_: &str, status: bool, now: Timestamp, reason: Option<&str>) -> Value {
    let status = if status { "True" } else { "False" };
    let old = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == type_));
    let since = old
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .map_or_else(|| time(now), |t| json!(t));
    let mut c = json!({"type": type_, "status": status, "lastProbeTime": null, "lastTransitionTime": since});
    if let Some(reason) = reason {
        c["reason"] = json!(reason);
    }
    c
}

/// Everything else the status needs.
#[derive(Debug, Clone)]
pub struct PodView<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// Its app containers, in spec order.
    pub containers: &'a [ContainerView],
    /// Its init containers, in spec order.
    pub init_containers: &'a [ContainerView],
    /// Whether the init containers completed.
    pub initialized: bool,
    /// Whether the sandbox (network namespace and CNI) is up.
    pub sandbox_ready: bool,
    /// The pod IP.
    pub pod_ip: Option<String>,
    /// The node's IP.
    pub host_ip: String,
    /// When the agent first saw the pod.
    pub start_time: Timestamp,
    /// Now.
    pub now: Timestamp,
}

/// The `status` object of a `pods/status` merge patch.
pub fn pod_status(view: &PodView<'_>) -> Value {
    let policy = view
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    let phase = phase(view.containers, policy, view.initialized);
    let all_ready = !view.containers.is_empty() && view.containers.iter().all(|c| c.ready);
    let not_ready = (!all_ready).then_some("ContainersNotReady");
    let terminal = matches!(phase, "Succeeded" | "Failed");
    let ready_reason = if terminal && !all_ready {
        Some("PodCompleted")
    } else {
        not_ready
    };
    let scheduled_since = view
        .pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
        .and_then(|c| c.last_transition_time.clone())
        .map_or_else(|| time(view.now), |t| json!(t));
    let p = view.pod;
    let now = view.now;
    let mut status = json!({
        "phase": phase,
        "hostIP": view.host_ip,
        "hostIPs": [{"ip": view.host_ip}],
        "startTime": time(view.start_time),
        "qosClass": view.pod.status.as_ref().and_then(|s| s.qos_class.clone()).unwrap_or_else(|| "BestEffort".into()),
        "conditions": [
            condition(p, "PodReadyToStartContainers", view.sandbox_ready && !terminal, now, None),
            condition(p, "Initialized", view.initialized, now, (!view.initialized).then_some("ContainersNotInitialized")),
            condition(p, "Ready", all_ready, now, ready_reason),
            condition(p, "ContainersReady", all_ready, now, ready_reason),
            {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": scheduled_since},
        ],
        "containerStatuses": view.containers.iter().map(container_status).collect::<Vec<_>>(),
    });
    if let Some(ip) = &view.pod_ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    if !view.init_containers.is_empty() {
        status["initContainerStatuses"] = json!(
            view.init_containers
                .iter()
                .map(container_status)
                .collect::<Vec<_>>()
        );
    }
    status
}

/// The status without its timestamps' churn: what decides whether a new
/// patch is needed (heartbeat times and the like are not in pod status,
/// so this is the status itself).
pub fn changed(old: Option<&Value>, new: &Value) -> bool {
    old != Some(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, state: CState, restarts: i32, ready: bool) -> ContainerView {
        ContainerView {
            name: name.into(),
            image: "img".into(),
            image_id: "sha256:x".into(),
            container_id: Some(format!("containerd://{name}")),
            state,
            last_state: None,
            restart_count: restarts,
            ready,
            started: ready,
        }
    }

    fn term(code: i32) -> CState {
        CState::Terminated(Terminated {
            exit_code: code,
            reason: if code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            },
            started_at: None,
            finished_at: Timestamp::UNIX_EPOCH,
            container_id: "containerd://x".into(),
        })
    }

    #[test]
    fn phases_follow_upstream() {
        let run = CState::Running {
            started_at: Timestamp::UNIX_EPOCH,
        };
        let wait = CState::Waiting {
            reason: "ContainerCreating".into(),
            message: String::new(),
        };
        assert_eq!(
            phase(&[view("a", wait.clone(), 0, false)], "Always", true),
            "Pending"
        );
        assert_eq!(
            phase(&[view("a", run.clone(), 0, true)], "Always", true),
            "Running"
        );
        assert_eq!(
            phase(&[view("a", run.clone(), 0, true)], "Always", false),
            "Pending"
        );
        assert_eq!(
            phase(&[view("a", wait.clone(), 2, false)], "Always", true),
            "Running"
        );
        assert_eq!(
            phase(&[view("a", term(0), 0, false)], "Never", true),
            "Succeeded"
        );
        assert_eq!(
            phase(&[view("a", term(1), 0, false)], "Never", true),
            "Failed"
        );
        assert_eq!(
            phase(
                &[view("a", term(0), 0, false), view("b", run, 0, true)],
                "Never",
                true
            ),
            "Running"
        );
    }

    #[test]
    fn status_reports_ips_conditions_and_containers() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "d", "uid": "u"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "2025-01-01T00:00:00Z"}]},
        }))
        .expect("pod");
        let run = CState::Running {
            started_at: Timestamp::UNIX_EPOCH,
        };
        let mut b = view("b", run.clone(), 1, false);
        b.last_state = Some(Terminated {
            exit_code: 137,
            reason: "Error".into(),
            started_at: Some(Timestamp::UNIX_EPOCH),
            finished_at: Timestamp::UNIX_EPOCH,
            container_id: "containerd://old".into(),
        });
        let containers = [view("a", run, 0, true), b];
        let status = pod_status(&PodView {
            pod: &pod,
            containers: &containers,
            init_containers: &[],
            initialized: true,
            sandbox_ready: true,
            pod_ip: Some("10.244.1.2".into()),
            host_ip: "192.168.0.1".into(),
            start_time: Timestamp::UNIX_EPOCH,
            now: Timestamp::UNIX_EPOCH,
        });
        assert_eq!(status["phase"], "Running");
        assert_eq!(status["podIPs"], json!([{"ip": "10.244.1.2"}]));
        let cond = |t: &str| {
            status["conditions"]
                .as_array()
                .expect("conditions")
                .iter()
                .find(|c| c["type"] == t)
                .expect("condition")
                .clone()
        };
        assert_eq!(cond("Ready")["status"], "False");
        assert_eq!(cond("Ready")["reason"], "ContainersNotReady");
        assert_eq!(
            cond("PodScheduled")["lastTransitionTime"],
            "2025-01-01T00:00:00Z"
        );
        assert_eq!(status["containerStatuses"][1]["restartCount"], 1);
        assert_eq!(
            status["containerStatuses"][1]["lastState"]["terminated"]["exitCode"],
            137
        );
        let parsed: k8s_openapi::api::core::v1::PodStatus =
            serde_json::from_value(status).expect("a PodStatus");
        assert_eq!(parsed.container_statuses.expect("statuses").len(), 2);
    }
}
