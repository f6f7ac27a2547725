//! From a pod's container to an OCI runtime spec: command and args
//! resolved against the image's Entrypoint and Cmd as upstream does,
//! environment (image, then the container's, with `$(VAR)` expansion and
//! the downward-API fields), working directory, hostname, namespaces (new
//! pid, ipc, uts and mount; the pod's network namespace), the usual mounts,
//! emptyDir bind mounts, and CPU and memory limits as cgroup limits.
//!
//! Everything here is pure: the runtime layer fills in [`ImageConfig`] and
//! [`SpecInput`] and sends the JSON to containerd.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};
use skiff_common::quantity::Quantity;

/// What the image says about how to run it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, `NAME=value`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
}

impl ImageConfig {
    /// Read the `config` section of an OCI image config.
    pub fn from_oci(config: &Value) -> ImageConfig {
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        };
        let c = &config["config"];
        ImageConfig {
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            env: strings(&c["Env"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_string(),
        }
    }
}

/// Expand `$(VAR)` references from `env` as upstream does: `$$` is a
/// literal `$`, unknown references are kept as written.
pub fn expand(text: &str, env: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match env.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment: the image's, then the service variables,
/// then the container's `env` in order (later wins, `$(VAR)` expanded
/// against what came before), with
/// `fieldRef`s to the pod's name, namespace, uid, IPs, node and service
/// account resolved.
pub fn environment(
    pod: &Pod,
    container: &Container,
    image: &ImageConfig,
    service_env: &[(String, String)],
    pod_ip: Option<&str>,
    host_ip: &str,
) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut values: HashMap<String, String> = HashMap::new();
    fn set(
        values: &mut HashMap<String, String>,
        order: &mut Vec<String>,
        name: String,
        value: String,
    ) {
        if !values.contains_key(&name) {
            order.push(name.clone());
        }
        values.insert(name, value);
    }
    for entry in &image.env {
        let (name, value) = entry.split_once('=').unwrap_or((entry, ""));
        set(&mut values, &mut order, name.to_string(), value.to_string());
    }
    for (name, value) in service_env {
        set(&mut values, &mut order, name.clone(), value.clone());
    }
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    for var in container.env.iter().flatten() {
        let value = if let Some(value) = &var.value {
            expand(value, &values)
        } else if let Some(field) = var.value_from.as_ref().and_then(|v| v.field_ref.as_ref()) {
            match field.field_path.as_str() {
                "metadata.name" => meta.name.clone().unwrap_or_default(),
                "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
                "metadata.uid" => meta.uid.clone().unwrap_or_default(),
                "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
                "spec.serviceAccountName" => spec
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_default(),
                "status.podIP" | "status.podIPs" => pod_ip.unwrap_or_default().to_string(),
                "status.hostIP" | "status.hostIPs" => host_ip.to_string(),
                _ => String::new(),
            }
        } else {
            String::new()
        };
        set(&mut values, &mut order, var.name.clone(), value);
    }
    if !values.contains_key("HOSTNAME") {
        set(
            &mut values,
            &mut order,
            "HOSTNAME".into(),
            meta.name.clone().unwrap_or_default(),
        );
    }
    order
        .into_iter()
        .map(|name| {
            let value = &values[&name];
            format!("{name}={value}")
        })
        .collect()
}

/// The process arguments, as upstream: `command` replaces the image's
/// Entrypoint (and then the image's Cmd is ignored), `args` replaces its
/// Cmd; `$(VAR)` expanded from the container's environment.
pub fn process_args(container: &Container, image: &ImageConfig, env: &[String]) -> Vec<String> {
    let vars: HashMap<String, String> = env
        .iter()
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let command: Vec<String> = container.command.clone().unwrap_or_default();
    let args: Vec<String> = container.args.clone().unwrap_or_default();
    let mut out = if command.is_empty() {
        image.entrypoint.clone()
    } else {
        command.iter().map(|c| expand(c, &vars)).collect()
    };
    if !args.is_empty() {
        out.extend(args.iter().map(|a| expand(a, &vars)));
    } else if command.is_empty() {
        out.extend(image.cmd.iter().cloned());
    }
    out
}

/// cgroup limits of a container: `(cpu shares, cpu quota µs per 100 ms,
/// memory limit bytes)`, as upstream derives them from requests and limits.
pub fn resources(container: &Container) -> (u64, Option<i64>, Option<i64>) {
    let res = container.resources.as_ref();
    let get = |which: Option<
        &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >,
               name: &str| {
        which
            .and_then(|m| m.get(name))
            .and_then(|q| Quantity::parse(q.0.trim()).ok())
    };
    let limits = res.and_then(|r| r.limits.as_ref());
    let requests = res.and_then(|r| r.requests.as_ref());
    let cpu_request = get(requests, "cpu").or_else(|| get(limits, "cpu"));
    // Upstream's MilliCPUToShares and milliCPUToQuota (100 ms periods).
    let shares = cpu_request
        .map(|cpu| {
            u64::try_from(cpu.milli_value().saturating_mul(1024) / 1000)
                .unwrap_or(0)
                .max(2)
        })
        .unwrap_or(2);
    let quota = get(limits, "cpu").map(|cpu| (cpu.milli_value().saturating_mul(100)).max(1000));
    let memory = get(limits, "memory").map(|m| m.value());
    (shares, quota, memory)
}

/// Everything about one container the spec needs besides the pod.
#[derive(Debug, Clone)]
pub struct SpecInput<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// The container.
    pub container: &'a Container,
    /// Its image's configuration.
    pub image: &'a ImageConfig,
    /// The pod's network namespace file.
    pub netns: &'a Path,
    /// The pod's IP, when known.
    pub pod_ip: Option<&'a str>,
    /// The node's IP.
    pub host_ip: &'a str,
    /// Host directories of the pod's emptyDir volumes, by volume name.
    pub volumes: &'a HashMap<String, PathBuf>,
    /// The pod's `/etc/hosts` file on the host, if any.
    pub hosts_file: Option<&'a Path>,
    /// The pod's `/etc/resolv.conf` file on the host, if any.
    pub resolv_file: Option<&'a Path>,
    /// The pod's hostname.
    pub hostname: &'a str,
    /// The service environment variables (before the container's own).
    pub service_env: &'a [(String, String)],
    /// The cgroup path (`/skiff/<node>/pod<uid>/<container-id>`).
    pub cgroups_path: &'a str,
}

const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The OCI runtime spec of one container (runc's `config.json`; the root
/// filesystem comes from the snapshot containerd mounts at `rootfs`).
pub fn oci_spec(input: &SpecInput<'_>) -> Value {
    let env = environment(
        input.pod,
        input.container,
        input.image,
        input.service_env,
        input.pod_ip,
        input.host_ip,
    );
    let args = process_args(input.container, input.image, &env);
    let cwd = input
        .container
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| Some(input.image.working_dir.clone()).filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".to_string());
    let security = input.container.security_context.as_ref();
    let pod_security = input
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref());
    let uid = security
        .and_then(|s| s.run_as_user)
        .or_else(|| pod_security.and_then(|s| s.run_as_user))
        .unwrap_or(0);
    let gid = security
        .and_then(|s| s.run_as_group)
        .or_else(|| pod_security.and_then(|s| s.run_as_group))
        .unwrap_or(0);
    let caps = json!(CAPABILITIES);
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    if let Some(hosts) = input.hosts_file {
        mounts.push(json!({"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "rprivate", "rw"]}));
    }
    if let Some(resolv) = input.resolv_file {
        mounts.push(json!({"destination": "/etc/resolv.conf", "type": "bind", "source": resolv, "options": ["rbind", "rprivate", "rw"]}));
    }
    for mount in input.container.volume_mounts.iter().flatten() {
        let Some(source) = input.volumes.get(&mount.name) else {
            continue;
        };
        let source = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => source.join(sub),
            None => source.clone(),
        };
        let mode = if mount.read_only == Some(true) {
            "ro"
        } else {
            "rw"
        };
        mounts.push(json!({"destination": mount.mount_path, "type": "bind", "source": source, "options": ["rbind", "rprivate", mode]}));
    }
    let (shares, quota, memory) = resources(input.container);
    let mut cpu = json!({"shares": shares});
    if let Some(quota) = quota {
        cpu["quota"] = json!(quota);
        cpu["period"] = json!(100_000);
    }
    let mut linux_resources = json!({
        "devices": [{"allow": false, "access": "rwm"}],
        "cpu": cpu,
    });
    if let Some(limit) = memory {
        linux_resources["memory"] = json!({"limit": limit});
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": false,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": input.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": input.netns},
            ],
            "resources": linux_resources,
            "cgroupsPath": input.cgroups_path,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    })
}

/// An exec'd process (probes): `args` with the container's environment.
pub fn exec_process(args: &[String], env: &Value, cwd: &Value) -> Value {
    json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": {"bounding": CAPABILITIES, "effective": CAPABILITIES, "permitted": CAPABILITIES},
        "noNewPrivileges": false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).expect("a pod")
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into(), "cmd".into()],
            env: vec!["PATH=/bin".into(), "A=image".into()],
            working_dir: "/work".into(),
        }
    }

    #[test]
    fn commands_resolve_as_upstream() {
        let img = image();
        let c = |v: Value| -> Container { serde_json::from_value(v).expect("container") };
        let env = vec!["X=1".to_string()];
        assert_eq!(
            process_args(&c(json!({"name": "a"})), &img, &env),
            ["/entry", "default", "cmd"]
        );
        assert_eq!(
            process_args(&c(json!({"name": "a", "args": ["x", "$(X)"]})), &img, &env),
            ["/entry", "x", "1"]
        );
        assert_eq!(
            process_args(&c(json!({"name": "a", "command": ["sh"]})), &img, &env),
            ["sh"]
        );
        assert_eq!(
            process_args(
                &c(json!({"name": "a", "command": ["sh"], "args": ["-c", "$$(X) $(Y)"]})),
                &img,
                &env
            ),
            ["sh", "-c", "$(X) $(Y)"]
        );
    }

    #[test]
    fn environment_layers_image_container_and_fields() {
        let p = pod(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "env": [
                {"name": "A", "value": "mine"},
                {"name": "B", "value": "$(A)-x"},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            ]}]},
        }));
        let container = &p.spec.as_ref().expect("spec").containers[0];
        let services = [
            ("A".to_owned(), "from-a-service".to_owned()),
            ("WEB_SERVICE_HOST".to_owned(), "10.96.0.20".to_owned()),
        ];
        let env = environment(
            &p,
            container,
            &image(),
            &services,
            Some("10.244.1.2"),
            "192.168.1.1",
        );
        // The service variables come after the image's and before the container's own, which
        // win.
        assert_eq!(
            env,
            [
                "PATH=/bin",
                "A=mine",
                "WEB_SERVICE_HOST=10.96.0.20",
                "B=mine-x",
                "POD=web",
                "IP=10.244.1.2",
                "HOSTNAME=web"
            ]
        );
    }

    #[test]
    fn quantities_and_limits() {
        let c: Container = serde_json::from_value(json!({"name": "a", "resources": {
            "limits": {"cpu": "250m", "memory": "32Mi"}, "requests": {"cpu": "100m"}}}))
        .expect("container");
        assert_eq!(resources(&c), (102, Some(25_000), Some(32 * 1024 * 1024)));
        let c: Container = serde_json::from_value(json!({"name": "a"})).expect("container");
        assert_eq!(resources(&c), (2, None, None));
    }

    #[test]
    fn the_spec_joins_the_pod_netns_and_mounts_volumes() {
        let p = pod(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1"},
            "spec": {"containers": [{"name": "c", "image": "i", "workingDir": "/srv",
                "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "cfg", "mountPath": "/cfg", "readOnly": true}],
                "resources": {"limits": {"memory": "16Mi"}}}]},
        }));
        let container = &p.spec.as_ref().expect("spec").containers[0];
        let volumes = HashMap::from([
            (
                "data".to_string(),
                PathBuf::from("/var/lib/skiff/n/pods/u1/volumes/data"),
            ),
            (
                "cfg".to_string(),
                PathBuf::from("/var/lib/skiff/n/pods/u1/volumes/cfg"),
            ),
        ]);
        let img = image();
        let spec = oci_spec(&SpecInput {
            pod: &p,
            container,
            image: &img,
            netns: Path::new("/run/skiff/n/netns/u1"),
            pod_ip: Some("10.244.1.2"),
            host_ip: "192.168.1.1",
            volumes: &volumes,
            hosts_file: None,
            resolv_file: Some(Path::new("/var/lib/skiff/n/pods/u1/resolv.conf")),
            hostname: "web-host",
            service_env: &[],
            cgroups_path: "/skiff/n/podu1/x",
        });
        assert_eq!(spec["hostname"], "web-host");
        assert_eq!(spec["process"]["cwd"], "/srv");
        assert_eq!(spec["process"]["args"], json!(["/entry", "default", "cmd"]));
        let ns = spec["linux"]["namespaces"].as_array().expect("namespaces");
        assert!(ns.contains(&json!({"type": "network", "path": "/run/skiff/n/netns/u1"})));
        assert_eq!(
            spec["linux"]["resources"]["memory"]["limit"],
            16 * 1024 * 1024
        );
        assert_eq!(spec["linux"]["cgroupsPath"], "/skiff/n/podu1/x");
        let mounts = spec["mounts"].as_array().expect("mounts");
        let data = mounts
            .iter()
            .find(|m| m["destination"] == "/data")
            .expect("data mount");
        assert_eq!(data["source"], "/var/lib/skiff/n/pods/u1/volumes/data");
        let cfg = mounts
            .iter()
            .find(|m| m["destination"] == "/cfg")
            .expect("cfg mount");
        assert_eq!(cfg["options"][2], "ro");
        let resolv = mounts
            .iter()
            .find(|m| m["destination"] == "/etc/resolv.conf")
            .expect("resolv.conf mount");
        assert_eq!(resolv["source"], "/var/lib/skiff/n/pods/u1/resolv.conf");
    }
}
