//! What a pod asks of a node: resource requests (cpu millicores, memory
//! bytes, one pod slot), computed as upstream's `PodRequests` does (the sum
//! of the containers plus sidecars, at least the largest init container,
//! plus the pod overhead), and the host ports its containers claim.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The cpu request counted for scoring a container that requests none
/// (upstream's `DefaultMilliCPURequest`).
pub const DEFAULT_MILLI_CPU: i64 = 100;

/// The memory request counted for scoring a container that requests none
/// (upstream's `DefaultMemoryRequest`, 200 MiB).
pub const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;

/// Amounts of the resources the scheduler accounts for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// CPU in millicores.
    pub milli_cpu: i64,
    /// Memory in bytes.
    pub memory: i64,
    /// Pod slots.
    pub pods: i64,
}

impl Resources {
    /// `self + other`, component-wise.
    pub fn plus(self, other: Resources) -> Resources {
        Resources {
            milli_cpu: self.milli_cpu.saturating_add(other.milli_cpu),
            memory: self.memory.saturating_add(other.memory),
            pods: self.pods.saturating_add(other.pods),
        }
    }

    /// `self - other`, component-wise.
    pub fn minus(self, other: Resources) -> Resources {
        Resources {
            milli_cpu: self.milli_cpu.saturating_sub(other.milli_cpu),
            memory: self.memory.saturating_sub(other.memory),
            pods: self.pods.saturating_sub(other.pods),
        }
    }

    /// The component-wise maximum.
    pub fn max(self, other: Resources) -> Resources {
        Resources {
            milli_cpu: self.milli_cpu.max(other.milli_cpu),
            memory: self.memory.max(other.memory),
            pods: self.pods.max(other.pods),
        }
    }
}

/// Parse a Kubernetes quantity (`500m`, `1.5`, `128Mi`, `1e3`, `2k`) and
/// return `ceil(value × 10^scale)`, or `None` if it is malformed or out of
/// range. `scale` 3 gives millis (cpu), 0 gives whole units (bytes).
pub fn parse_scaled(text: &str, scale: u32) -> Option<i64> {
    let text = text.trim();
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let number_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_end);
    if number.is_empty() || number == "." {
        return None;
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if fraction.contains('.') || fraction.len() > 30 || whole.len() > 30 {
        return None;
    }
    let digits: i128 = format!("{whole}{fraction}").parse().ok()?;
    // value = digits × 2^binary × 10^(decimal − fraction digits)
    let (binary, decimal): (u32, i32) = match suffix {
        "" => (0, 0),
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        exponent => {
            let exponent = exponent.strip_prefix(['e', 'E'])?;
            (0, exponent.parse::<i32>().ok().filter(|e| e.abs() <= 30)?)
        }
    };
    let power = decimal + scale as i32 - fraction.len() as i32;
    let mut numerator = digits.checked_mul(1i128.checked_shl(binary)?)?;
    let mut denominator: i128 = 1;
    if power >= 0 {
        numerator = numerator.checked_mul(10i128.checked_pow(power as u32)?)?;
    } else {
        denominator = 10i128.checked_pow(power.unsigned_abs())?;
    }
    let value = (numerator + denominator - 1) / denominator;
    let value = i64::try_from(value).ok()?;
    Some(if negative { -value } else { value })
}

/// The millicores of a cpu quantity.
pub fn milli_cpu(q: &Quantity) -> Option<i64> {
    parse_scaled(&q.0, 3)
}

/// The bytes (or count) of a memory or pods quantity.
pub fn value(q: &Quantity) -> Option<i64> {
    parse_scaled(&q.0, 0)
}

/// Resources from a `cpu`/`memory`/`pods` map (allocatable, requests).
pub fn from_map(map: Option<&BTreeMap<String, Quantity>>) -> Resources {
    let Some(map) = map else {
        return Resources::default();
    };
    Resources {
        milli_cpu: map.get("cpu").and_then(milli_cpu).unwrap_or(0),
        memory: map.get("memory").and_then(value).unwrap_or(0),
        pods: map.get("pods").and_then(value).unwrap_or(0),
    }
}

/// A node's allocatable resources (its capacity where allocatable is absent).
pub fn node_allocatable(node: &Node) -> Resources {
    let status = node.status.as_ref();
    let allocatable = status.and_then(|s| s.allocatable.as_ref());
    let capacity = status.and_then(|s| s.capacity.as_ref());
    let a = from_map(allocatable);
    let c = from_map(capacity);
    let pick = |name: &str, a: i64, c: i64| {
        if allocatable.is_some_and(|m| m.contains_key(name)) {
            a
        } else {
            c
        }
    };
    Resources {
        milli_cpu: pick("cpu", a.milli_cpu, c.milli_cpu),
        memory: pick("memory", a.memory, c.memory),
        pods: pick("pods", a.pods, c.pods),
    }
}

/// What a pod requests: `(actual, non_zero)`, where `non_zero` counts
/// [`DEFAULT_MILLI_CPU`]/[`DEFAULT_MEMORY`] for containers that request no
/// cpu/memory (used for scoring only, as upstream). Both count one pod.
pub fn pod_requests(pod: &Pod) -> (Resources, Resources) {
    let Some(spec) = pod.spec.as_ref() else {
        return (ONE_POD, ONE_POD);
    };
    let mut actual = Resources::default();
    let mut non_zero = Resources::default();
    for container in &spec.containers {
        let (a, n) = container_requests(container);
        actual = actual.plus(a);
        non_zero = non_zero.plus(n);
    }
    // Init containers run one at a time before the app containers, next
    // to the restartable (sidecar) init containers started before them.
    let mut sidecars = (Resources::default(), Resources::default());
    let mut init_peak = (Resources::default(), Resources::default());
    for container in spec.init_containers.iter().flatten() {
        let (a, n) = container_requests(container);
        if container.restart_policy.as_deref() == Some("Always") {
            sidecars = (sidecars.0.plus(a), sidecars.1.plus(n));
            init_peak = (init_peak.0.max(sidecars.0), init_peak.1.max(sidecars.1));
        } else {
            init_peak = (
                init_peak.0.max(sidecars.0.plus(a)),
                init_peak.1.max(sidecars.1.plus(n)),
            );
        }
    }
    actual = actual.plus(sidecars.0).max(init_peak.0);
    non_zero = non_zero.plus(sidecars.1).max(init_peak.1);
    // Pod-level resources, where set, replace the containers' sum.
    if let Some(pod_level) = spec.resources.as_ref() {
        let requests = pod_level.requests.as_ref().or(pod_level.limits.as_ref());
        if let Some(requests) = requests {
            if let Some(cpu) = requests.get("cpu").and_then(milli_cpu) {
                actual.milli_cpu = cpu;
                non_zero.milli_cpu = cpu;
            }
            if let Some(memory) = requests.get("memory").and_then(value) {
                actual.memory = memory;
                non_zero.memory = memory;
            }
        }
    }
    let overhead = from_map(spec.overhead.as_ref());
    actual = actual.plus(overhead);
    non_zero = non_zero.plus(overhead);
    actual.pods = 1;
    non_zero.pods = 1;
    (actual, non_zero)
}

const ONE_POD: Resources = Resources {
    milli_cpu: 0,
    memory: 0,
    pods: 1,
};

/// One container's requests (falling back to its limits, as the API
/// server's defaulting does): `(actual, non_zero)`.
fn container_requests(container: &Container) -> (Resources, Resources) {
    let resources = container.resources.as_ref();
    let requests = resources.and_then(|r| r.requests.as_ref());
    let limits = resources.and_then(|r| r.limits.as_ref());
    let get = |name: &str, parse: fn(&Quantity) -> Option<i64>| {
        requests
            .and_then(|m| m.get(name))
            .or_else(|| limits.and_then(|m| m.get(name)))
            .and_then(parse)
    };
    let cpu = get("cpu", milli_cpu);
    let memory = get("memory", value);
    let actual = Resources {
        milli_cpu: cpu.unwrap_or(0),
        memory: memory.unwrap_or(0),
        pods: 0,
    };
    let non_zero = Resources {
        milli_cpu: cpu.unwrap_or(DEFAULT_MILLI_CPU),
        memory: memory.unwrap_or(DEFAULT_MEMORY),
        pods: 0,
    };
    (actual, non_zero)
}

/// A host port a container claims.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// The host IP (`0.0.0.0` when unset).
    pub ip: String,
    /// The port.
    pub port: i32,
}

impl HostPort {
    /// Whether two claims collide: same protocol and port, and the same
    /// IP or either on every address.
    pub fn conflicts(&self, other: &HostPort) -> bool {
        self.port == other.port
            && self.protocol == other.protocol
            && (self.ip == other.ip || self.ip == "0.0.0.0" || other.ip == "0.0.0.0")
    }
}

/// The host ports a pod's containers (and sidecars) claim.
pub fn host_ports(pod: &Pod) -> Vec<HostPort> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    spec.containers
        .iter()
        .chain(sidecars)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let port = p.host_port.filter(|&n| n > 0)?;
            Some(HostPort {
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
                ip: p
                    .host_ip
                    .clone()
                    .filter(|ip| !ip.is_empty() && ip != "::")
                    .unwrap_or_else(|| "0.0.0.0".to_string()),
                port,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_like_upstream() {
        let cases: &[(&str, u32, Option<i64>)] = &[
            ("500m", 3, Some(500)),
            ("1", 3, Some(1000)),
            ("1.5", 3, Some(1500)),
            ("0.1", 3, Some(100)),
            ("2k", 0, Some(2000)),
            ("128Mi", 0, Some(128 * 1024 * 1024)),
            ("1Gi", 0, Some(1 << 30)),
            ("1G", 0, Some(1_000_000_000)),
            ("1e3", 0, Some(1000)),
            ("1E-3", 3, Some(1)),
            ("1n", 3, Some(1)),
            ("100u", 3, Some(1)),
            ("110", 0, Some(110)),
            ("-1", 0, Some(-1)),
            ("abc", 0, None),
            ("1Qi", 0, None),
            ("", 0, None),
        ];
        for (text, scale, want) in cases {
            assert_eq!(
                parse_scaled(text, *scale),
                *want,
                "parse {text:?} at scale {scale}"
            );
        }
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("pod json")
    }

    #[test]
    fn pod_requests_follow_upstream_rules() {
        let cases = [
            (
                "no requests: 0 cpu/memory, 1 pod; defaults for scoring",
                serde_json::json!({"spec": {"containers": [{"name": "a"}]}}),
                (0, 0, 100, DEFAULT_MEMORY),
            ),
            (
                "sum of containers",
                serde_json::json!({"spec": {"containers": [
                    {"name": "a", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}},
                    {"name": "b", "resources": {"requests": {"cpu": "1"}}}]}}),
                (1250, 64 << 20, 1250, (64 << 20) + DEFAULT_MEMORY),
            ),
            (
                "limits stand in for missing requests",
                serde_json::json!({"spec": {"containers": [
                    {"name": "a", "resources": {"limits": {"cpu": "2"}}}]}}),
                (2000, 0, 2000, DEFAULT_MEMORY),
            ),
            (
                "largest init container wins over the sum",
                serde_json::json!({"spec": {
                    "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "3", "memory": "1Mi"}}}],
                    "containers": [{"name": "a", "resources": {"requests": {"cpu": "1", "memory": "2Mi"}}}]}}),
                (3000, 2 << 20, 3000, 2 << 20),
            ),
            (
                "sidecars add to the containers and to later init containers",
                serde_json::json!({"spec": {
                    "initContainers": [
                        {"name": "s", "restartPolicy": "Always", "resources": {"requests": {"cpu": "500m", "memory": "1Mi"}}},
                        {"name": "i", "resources": {"requests": {"cpu": "2", "memory": "1Mi"}}}],
                    "containers": [{"name": "a", "resources": {"requests": {"cpu": "1", "memory": "1Mi"}}}]}}),
                (2500, 2 << 20, 2500, 2 << 20),
            ),
            (
                "overhead is added",
                serde_json::json!({"spec": {"overhead": {"cpu": "100m"},
                    "containers": [{"name": "a", "resources": {"requests": {"cpu": "1", "memory": "1Mi"}}}]}}),
                (1100, 1 << 20, 1100, 1 << 20),
            ),
        ];
        for (what, json, (cpu, memory, nz_cpu, nz_memory)) in cases {
            let (actual, non_zero) = pod_requests(&pod(json));
            assert_eq!(
                actual,
                Resources {
                    milli_cpu: cpu,
                    memory,
                    pods: 1
                },
                "{what}: actual"
            );
            assert_eq!(
                non_zero,
                Resources {
                    milli_cpu: nz_cpu,
                    memory: nz_memory,
                    pods: 1
                },
                "{what}: non-zero"
            );
        }
    }

    #[test]
    fn host_ports_default_and_conflict() {
        let p = pod(
            serde_json::json!({"spec": {"containers": [{"name": "a", "ports": [
            {"containerPort": 80, "hostPort": 8080},
            {"containerPort": 53, "hostPort": 53, "protocol": "UDP", "hostIP": "10.0.0.1"},
            {"containerPort": 9000}]}]}}),
        );
        let ports = host_ports(&p);
        assert_eq!(ports.len(), 2, "only ports with a hostPort: {ports:?}");
        assert_eq!(
            ports[0],
            HostPort {
                protocol: "TCP".into(),
                ip: "0.0.0.0".into(),
                port: 8080
            }
        );
        let udp = |ip: &str| HostPort {
            protocol: "UDP".into(),
            ip: ip.into(),
            port: 53,
        };
        assert!(ports[1].conflicts(&udp("10.0.0.1")));
        assert!(ports[1].conflicts(&udp("0.0.0.0")));
        assert!(!ports[1].conflicts(&udp("10.0.0.2")));
        assert!(!ports[0].conflicts(&udp("0.0.0.0")), "protocols differ");
    }
}
