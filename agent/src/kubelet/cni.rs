//! The agent as a CNI runtime: it finds the network configuration list,
//! injects what a runtime injects into each plugin's configuration
//! (`cniVersion`, `name`, `runtimeConfig` for the capabilities a plugin
//! declares, and `prevResult` along the chain), and execs each plugin binary per the CNI spec (`CNI_*`
//! environment, configuration on stdin, result or error JSON on stdout).
//!
//! ADD runs the plugins in order, each getting the previous one's result;
//! DEL runs them in reverse with the ADD result as `prevResult`; CHECK in
//! order; STATUS (CNI 1.1) in order, only when the list's version is 1.1 or
//! later, as libcni does. Node readiness also asks each plugin VERSION, so a
//! plugin that does not run, or does not speak the list's version, keeps the
//! node NotReady with a message that names it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;

/// How long one plugin invocation may take.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The conflist the agent writes when the directory holds none.
pub const SKIFF_CONFLIST: &str = "10-skiff.conflist";

/// The reference plugin that wires hostPorts (`portMappings` capability).
pub const PORTMAP_PLUGIN: &str = "portmap";

/// Errors of CNI invocations.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// No `*.conflist` in the configuration directory.
    #[error("no network configuration (*.conflist) in {dir}")]
    NoConfig {
        /// The directory.
        dir: PathBuf,
    },
    /// The configuration could not be read or parsed.
    #[error("cannot read network configuration {path}: {message}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A plugin binary is not in the bin dir.
    #[error("CNI plugin {plugin:?} not found in {dir}")]
    MissingPlugin {
        /// The plugin type.
        plugin: String,
        /// The bin dir.
        dir: PathBuf,
    },
    /// A plugin could not be run.
    #[error("cannot run CNI plugin {plugin}")]
    Exec {
        /// The plugin type.
        plugin: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A plugin did not finish in time.
    #[error("CNI plugin {plugin} {command} timed out")]
    Timeout {
        /// The plugin type.
        plugin: String,
        /// The CNI command.
        command: String,
    },
    /// A plugin failed (with the CNI error it printed, if any).
    #[error("CNI plugin {plugin} {command} failed (code {code}): {message}")]
    Plugin {
        /// The plugin type.
        plugin: String,
        /// The CNI command.
        command: String,
        /// The CNI error code (0 when it printed none).
        code: i64,
        /// The error message and details.
        message: String,
    },
    /// A plugin does not speak the list's CNI version (its VERSION answer).
    #[error("CNI plugin {plugin} does not support CNI version {version} (it supports {supported})")]
    UnsupportedVersion {
        /// The plugin type.
        plugin: String,
        /// The list's `cniVersion`.
        version: String,
        /// What the plugin's VERSION listed.
        supported: String,
    },
    /// A plugin's result could not be parsed, or named no IPv4 address.
    #[error("CNI plugin {plugin} returned an unusable result: {message}")]
    BadResult {
        /// The plugin type.
        plugin: String,
        /// What is wrong.
        message: String,
    },
}

/// A loaded network configuration list.
#[derive(Debug, Clone)]
pub struct NetConfList {
    /// Where it came from.
    pub path: PathBuf,
    /// The list's `name`.
    pub name: String,
    /// The list's `cniVersion`.
    pub cni_version: String,
    /// Each plugin's configuration, as in the file.
    pub plugins: Vec<Value>,
}

impl NetConfList {
    /// Parse a conflist's text.
    pub fn parse(path: &Path, text: &str) -> Result<NetConfList, CniError> {
        let bad = |message: String| CniError::BadConfig {
            path: path.to_path_buf(),
            message,
        };
        let value: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let name = value["name"]
            .as_str()
            .ok_or_else(|| bad("no \"name\"".into()))?
            .to_string();
        let cni_version = value["cniVersion"]
            .as_str()
            .ok_or_else(|| bad("no \"cniVersion\"".into()))?
            .to_string();
        let plugins = value["plugins"]
            .as_array()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| bad("no \"plugins\"".into()))?
            .clone();
        for plugin in &plugins {
            if plugin["type"].as_str().is_none_or(str::is_empty) {
                return Err(bad("a plugin without \"type\"".into()));
            }
        }
        Ok(NetConfList {
            path: path.to_path_buf(),
            name,
            cni_version,
            plugins,
        })
    }

    /// The first `*.conflist` (by file name) of `dir`.
    pub fn load(dir: &Path) -> Result<NetConfList, CniError> {
        let path = first_conflist(dir).ok_or_else(|| CniError::NoConfig {
            dir: dir.to_path_buf(),
        })?;
        let text = std::fs::read_to_string(&path).map_err(|e| CniError::BadConfig {
            path: path.clone(),
            message: e.to_string(),
        })?;
        NetConfList::parse(&path, &text)
    }

    /// The configuration plugin `index` gets: its own, with the list's
    /// `name` and `cniVersion`, `runtimeConfig` holding those of
    /// `capability_args` the plugin declares in its `capabilities` (as
    /// libcni injects them), and `prevResult` when given.
    pub fn plugin_config(
        &self,
        index: usize,
        prev: Option<&Value>,
        capability_args: &Map<String, Value>,
    ) -> Value {
        let mut config = self.plugins[index].clone();
        config["name"] = json!(self.name);
        config["cniVersion"] = json!(self.cni_version);
        let runtime_config: Map<String, Value> = config["capabilities"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, declared)| declared.as_bool() == Some(true))
            .filter_map(|(name, _)| Some((name.clone(), capability_args.get(name)?.clone())))
            .collect();
        if !runtime_config.is_empty() {
            config["runtimeConfig"] = Value::Object(runtime_config);
        }
        if let Some(prev) = prev {
            config["prevResult"] = prev.clone();
        }
        config
    }

    /// Whether the list's version has STATUS (1.1.0 or later).
    pub fn has_status(&self) -> bool {
        version_at_least(&self.cni_version, (1, 1))
    }
}

fn version_at_least(version: &str, (major, minor): (u64, u64)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    have >= (major, minor)
}

/// The first `*.conflist` of `dir` by name, if any.
pub fn first_conflist(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    found.sort();
    found.into_iter().next()
}

/// The conflist the agent writes for skiff-cni with the node's pod CIDR and
/// the node's own IPAM directory (`data_dir`, under the agent's root dir: two
/// nodes on one machine must not share their address allocations).
///
/// With `portmap`, the reference `portmap` plugin is chained after
/// skiff-cni with the `portMappings` capability, so that pods' hostPorts are
/// wired, as Calico's conflist does. The list then says CNI 1.0.0: the
/// reference plugins of Debian 12 (1.1.1) refuse 1.1.0, so such a list has
/// no STATUS (which CNI 1.1 added).
pub fn skiff_conflist(pod_cidr: &str, data_dir: &Path, portmap: bool) -> Value {
    let skiff = json!({"type": "skiff-cni", "podCIDR": pod_cidr, "dataDir": data_dir});
    if portmap {
        json!({
            "cniVersion": "1.0.0",
            "name": "skiff",
            "plugins": [
                skiff,
                {"type": PORTMAP_PLUGIN, "snat": true, "capabilities": {"portMappings": true}},
            ],
        })
    } else {
        json!({"cniVersion": "1.1.0", "name": "skiff", "plugins": [skiff]})
    }
}

/// Write [`skiff_conflist`] as `10-skiff.conflist` in `dir` unless the
/// directory holds another conflist first (by name); an own conflist that
/// says something else (an older agent's) is rewritten. `portmap` is chained
/// when `bin_dir` has it. True when it wrote.
pub fn ensure_conflist(
    dir: &Path,
    bin_dir: &Path,
    pod_cidr: &str,
    data_dir: &Path,
) -> std::io::Result<bool> {
    let path = dir.join(SKIFF_CONFLIST);
    let portmap = bin_dir.join(PORTMAP_PLUGIN).is_file();
    let wanted = skiff_conflist(pod_cidr, data_dir, portmap);
    match first_conflist(dir) {
        Some(first) if first != path => return Ok(false),
        Some(_) => {
            let current: Option<Value> = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            if current.as_ref() == Some(&wanted) {
                return Ok(false);
            }
        }
        None => {}
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{SKIFF_CONFLIST}.tmp"));
    let text = serde_json::to_string_pretty(&wanted).expect("json");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(true)
}

/// Who is being attached.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// `CNI_CONTAINERID` (the pod uid).
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` pairs (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID…).
    pub args: Vec<(String, String)>,
    /// Capability arguments (`portMappings`…), handed to the plugins that
    /// declare the capability as their `runtimeConfig`.
    pub capability_args: Map<String, Value>,
}

/// The `portMappings` capability argument of a pod: one entry per container
/// port with a `hostPort`, as the kubelet hands them to CNI (`protocol`
/// lowercase, `hostIP` when set). `None` when the pod has no hostPort.
pub fn port_mappings(pod: &k8s_openapi::api::core::v1::PodSpec) -> Option<Value> {
    let mappings: Vec<Value> = pod
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.is_some_and(|h| h > 0))
        .map(|p| {
            let mut mapping = json!({
                "hostPort": p.host_port,
                "containerPort": p.container_port,
                "protocol": p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase(),
            });
            if let Some(ip) = p.host_ip.as_deref().filter(|ip| !ip.is_empty()) {
                mapping["hostIP"] = json!(ip);
            }
            mapping
        })
        .collect();
    (!mappings.is_empty()).then(|| Value::Array(mappings))
}

/// `CNI_ARGS` for a pod.
pub fn pod_args(namespace: &str, name: &str, uid: &str) -> Vec<(String, String)> {
    vec![
        ("IgnoreUnknown".into(), "1".into()),
        ("K8S_POD_NAMESPACE".into(), namespace.into()),
        ("K8S_POD_NAME".into(), name.into()),
        ("K8S_POD_INFRA_CONTAINER_ID".into(), uid.into()),
        ("K8S_POD_UID".into(), uid.into()),
    ]
}

/// Runs CNI plugins from one bin dir.
#[derive(Debug, Clone)]
pub struct Cni {
    /// `CNI_PATH`: where plugin binaries are.
    pub bin_dir: PathBuf,
    /// Where the conflist is.
    pub conf_dir: PathBuf,
    /// The conflist (path, version, plugin types) whose plugins last
    /// answered VERSION with its version: asked again only when it changes.
    pub versions_checked: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

/// What an ADD gave.
#[derive(Debug, Clone)]
pub struct AddResult {
    /// The final result JSON (kept for DEL and CHECK).
    pub raw: Value,
    /// The pod's IPv4 address.
    pub ip: std::net::Ipv4Addr,
    /// The first interface without `sandbox`: the host side of the pod's link.
    pub host_ifname: Option<String>,
}

/// Read an ADD result: the first IPv4 address and the host-side interface.
pub fn parse_add_result(plugin: &str, raw: Value) -> Result<AddResult, CniError> {
    let bad = |message: &str| CniError::BadResult {
        plugin: plugin.to_string(),
        message: message.to_string(),
    };
    let ip = raw["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse::<std::net::Ipv4Addr>().ok())
        .next()
        .ok_or_else(|| bad("no IPv4 address in \"ips\""))?;
    let host_ifname = raw["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
        .and_then(|i| i["name"].as_str())
        .map(str::to_string);
    Ok(AddResult {
        raw,
        ip,
        host_ifname,
    })
}

impl Cni {
    fn plugin_path(&self, plugin: &str) -> Result<PathBuf, CniError> {
        let path = self.bin_dir.join(plugin);
        if plugin.contains('/') || !path.is_file() {
            return Err(CniError::MissingPlugin {
                plugin: plugin.to_string(),
                dir: self.bin_dir.clone(),
            });
        }
        Ok(path)
    }

    /// Exec one plugin; its stdout parsed as JSON (Null when empty).
    async fn exec(
        &self,
        command: &str,
        config: &Value,
        attachment: Option<&Attachment>,
    ) -> Result<Value, CniError> {
        let plugin = config["type"].as_str().unwrap_or_default().to_string();
        let path = self.plugin_path(&plugin)?;
        let mut cmd = tokio::process::Command::new(&path);
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(a) = attachment {
            let args: Vec<String> = a.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
            cmd.env("CNI_CONTAINERID", &a.container_id)
                .env("CNI_NETNS", &a.netns)
                .env("CNI_IFNAME", &a.ifname)
                .env("CNI_ARGS", args.join(";"));
        }
        let exec_error = |source| CniError::Exec {
            plugin: plugin.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(exec_error)?;
        let input = serde_json::to_vec(config).expect("json");
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&input).await.map_err(exec_error)?;
        }
        let output = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| CniError::Timeout {
                plugin: plugin.clone(),
                command: command.to_string(),
            })?
            .map_err(exec_error)?;
        let stdout: Value = if output.stdout.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&output.stdout).unwrap_or_else(
                |_| json!({"msg": String::from_utf8_lossy(&output.stdout).trim().to_string()}),
            )
        };
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
            let mut message = stdout["msg"].as_str().unwrap_or_default().to_string();
            if let Some(details) = stdout["details"].as_str().filter(|d| !d.is_empty()) {
                message = format!("{message}; {details}");
            }
            if message.is_empty() {
                message = if stderr.is_empty() {
                    format!("exited with {}", output.status)
                } else {
                    stderr
                };
            }
            return Err(CniError::Plugin {
                plugin,
                command: command.to_string(),
                code: stdout["code"].as_i64().unwrap_or(0),
                message,
            });
        }
        Ok(stdout)
    }

    /// ADD through the chain; the final result.
    pub async fn add(&self, attachment: &Attachment) -> Result<AddResult, CniError> {
        let list = NetConfList::load(&self.conf_dir)?;
        let mut prev: Option<Value> = None;
        let mut last = String::new();
        for index in 0..list.plugins.len() {
            let config = list.plugin_config(index, prev.as_ref(), &attachment.capability_args);
            last = config["type"].as_str().unwrap_or_default().to_string();
            let result = self.exec("ADD", &config, Some(attachment)).await?;
            prev = Some(result);
        }
        parse_add_result(&last, prev.unwrap_or(Value::Null))
    }

    /// DEL through the chain, last plugin first, with `prev` (the ADD
    /// result) when known. Every plugin runs; the first error is returned.
    pub async fn del(&self, attachment: &Attachment, prev: Option<&Value>) -> Result<(), CniError> {
        let list = NetConfList::load(&self.conf_dir)?;
        let mut first_error = None;
        for index in (0..list.plugins.len()).rev() {
            let config = list.plugin_config(
                index,
                prev.filter(|p| !p.is_null()),
                &attachment.capability_args,
            );
            if let Err(error) = self.exec("DEL", &config, Some(attachment)).await
                && first_error.is_none()
            {
                first_error = Some(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// CHECK through the chain with the ADD result.
    pub async fn check(&self, attachment: &Attachment, prev: &Value) -> Result<(), CniError> {
        let list = NetConfList::load(&self.conf_dir)?;
        for index in 0..list.plugins.len() {
            let config = list.plugin_config(index, Some(prev), &attachment.capability_args);
            self.exec("CHECK", &config, Some(attachment)).await?;
        }
        Ok(())
    }

    /// Whether the network can serve ADD: a conflist whose plugins are all
    /// in the bin dir and answer VERSION with the list's version among
    /// those they support, and (CNI 1.1 lists) whose plugins' STATUS all
    /// succeed.
    pub async fn status(&self) -> Result<(), CniError> {
        let list = NetConfList::load(&self.conf_dir)?;
        for plugin in &list.plugins {
            self.plugin_path(plugin["type"].as_str().unwrap_or_default())?;
        }
        let signature = format!(
            "{} {} {:?}",
            list.path.display(),
            list.cni_version,
            list.plugins.iter().map(|p| &p["type"]).collect::<Vec<_>>()
        );
        let checked = || {
            self.versions_checked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if checked().as_deref() != Some(signature.as_str()) {
            self.check_versions(&list).await?;
            *checked() = Some(signature);
        }
        if list.has_status() {
            for index in 0..list.plugins.len() {
                let config = list.plugin_config(index, None, &Map::new());
                self.exec("STATUS", &config, None).await?;
            }
        }
        Ok(())
    }

    /// Every plugin of `list` answers VERSION with the list's version among
    /// those it supports.
    async fn check_versions(&self, list: &NetConfList) -> Result<(), CniError> {
        for plugin in &list.plugins {
            let plugin = plugin["type"].as_str().unwrap_or_default();
            let config = json!({"cniVersion": list.cni_version, "type": plugin});
            let answer = self.exec("VERSION", &config, None).await?;
            let supported: Vec<&str> = answer["supportedVersions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if !supported.contains(&list.cni_version.as_str()) {
                return Err(CniError::UnsupportedVersion {
                    plugin: plugin.to_string(),
                    version: list.cni_version.clone(),
                    supported: supported.join(", "),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflists_are_parsed_and_injected() {
        let text = r#"{"cniVersion":"1.0.0","name":"net","plugins":[{"type":"bridge","ipam":{"type":"host-local"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;
        let list = NetConfList::parse(Path::new("/x.conflist"), text).expect("parses");
        assert!(!list.has_status());
        let mut caps = Map::new();
        caps.insert(
            "portMappings".into(),
            json!([{"hostPort": 80, "containerPort": 8080, "protocol": "tcp"}]),
        );
        caps.insert("bandwidth".into(), json!({"ingressRate": 1}));
        let first = list.plugin_config(0, None, &caps);
        assert_eq!(first["name"], "net");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none());
        assert!(
            first.get("runtimeConfig").is_none(),
            "bridge declares no capability: {first}"
        );
        let prev = json!({"ips": []});
        let second = list.plugin_config(1, Some(&prev), &caps);
        assert_eq!(second["prevResult"], prev);
        assert_eq!(second["type"], "portmap");
        assert_eq!(
            second["runtimeConfig"],
            json!({"portMappings": caps["portMappings"]}),
            "only the declared capability is injected"
        );
        assert!(
            list.plugin_config(1, None, &Map::new())
                .get("runtimeConfig")
                .is_none()
        );
        assert!(
            NetConfList::parse(
                Path::new("/x"),
                r#"{"name":"a","cniVersion":"1.0.0","plugins":[]}"#
            )
            .is_err()
        );
        assert!(
            NetConfList::parse(Path::new("/x"), r#"{"name":"a","plugins":[{"type":"x"}]}"#)
                .is_err()
        );
        let skiff = skiff_conflist("10.244.1.0/24", Path::new("/var/lib/skiff/n1/cni"), false);
        let list = NetConfList::parse(Path::new("/s"), &skiff.to_string()).expect("parses");
        assert!(list.has_status());
        assert_eq!(list.plugins.len(), 1);
        assert_eq!(list.plugins[0]["podCIDR"], "10.244.1.0/24");
        assert_eq!(list.plugins[0]["dataDir"], "/var/lib/skiff/n1/cni");
        let chained = skiff_conflist("10.244.1.0/24", Path::new("/d"), true);
        let list = NetConfList::parse(Path::new("/s"), &chained.to_string()).expect("parses");
        assert_eq!(
            list.cni_version, "1.0.0",
            "Debian's portmap speaks at most 1.0.0"
        );
        assert_eq!(list.plugins[1]["type"], PORTMAP_PLUGIN);
        let portmap = list.plugin_config(1, None, &caps);
        assert_eq!(portmap["runtimeConfig"]["portMappings"][0]["hostPort"], 80);
    }

    /// Readiness asks every plugin VERSION: Debian's reference portmap
    /// (installed by `cargo xtask setup`) answers for a 1.0.0 list and is
    /// named as unable to speak a 1.1.0 one.
    #[tokio::test]
    async fn status_names_a_plugin_that_does_not_speak_the_list_version() {
        let reference = Path::new("/usr/lib/cni").join(PORTMAP_PLUGIN);
        assert!(
            reference.is_file(),
            "{} missing: `cargo xtask setup` installs containernetworking-plugins",
            reference.display()
        );
        let dir = tempfile::tempdir().expect("temporary directory");
        let bin = dir.path().join("bin");
        let conf = dir.path().join("net.d");
        std::fs::create_dir_all(&bin).expect("bin dir");
        std::fs::create_dir_all(&conf).expect("conf dir");
        std::os::unix::fs::symlink(&reference, bin.join(PORTMAP_PLUGIN)).expect("symlink");
        let cni = Cni {
            bin_dir: bin,
            conf_dir: conf.clone(),
            versions_checked: Default::default(),
        };
        let write = |version: &str| {
            let list =
                json!({"cniVersion": version, "name": "t", "plugins": [{"type": PORTMAP_PLUGIN}]});
            std::fs::write(conf.join("10-t.conflist"), list.to_string()).expect("conflist");
        };
        write("1.0.0");
        cni.status().await.expect("portmap speaks 1.0.0");
        cni.status()
            .await
            .expect("and still does (not asked again)");
        write("1.1.0");
        match cni.status().await {
            Err(CniError::UnsupportedVersion {
                plugin, version, ..
            }) => {
                assert_eq!(plugin, PORTMAP_PLUGIN);
                assert_eq!(version, "1.1.0");
            }
            other => panic!("expected UnsupportedVersion for portmap at 1.1.0, got {other:?}"),
        }
    }

    #[test]
    fn host_ports_become_port_mappings() {
        let spec: k8s_openapi::api::core::v1::PodSpec = serde_json::from_value(json!({
            "containers": [
                {"name": "a", "ports": [
                    {"containerPort": 8080, "hostPort": 80},
                    {"containerPort": 9090},
                    {"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "10.99.0.11"},
                ]},
                {"name": "b"},
            ],
        }))
        .expect("pod spec");
        assert_eq!(
            port_mappings(&spec),
            Some(json!([
                {"hostPort": 80, "containerPort": 8080, "protocol": "tcp"},
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "10.99.0.11"},
            ]))
        );
        let none: k8s_openapi::api::core::v1::PodSpec = serde_json::from_value(
            json!({"containers": [{"name": "a", "ports": [{"containerPort": 80}]}]}),
        )
        .expect("pod spec");
        assert_eq!(port_mappings(&none), None);
    }

    #[test]
    fn add_results_give_the_ip_and_host_interface() {
        let raw = json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "skf0123456789a", "mac": "ee:ee:ee:ee:ee:ee"},
                {"name": "eth0", "sandbox": "/run/netns/x"},
            ],
            "ips": [{"address": "10.244.1.5/32", "interface": 1}],
        });
        let result = parse_add_result("skiff-cni", raw).expect("usable");
        assert_eq!(result.ip, std::net::Ipv4Addr::new(10, 244, 1, 5));
        assert_eq!(result.host_ifname.as_deref(), Some("skf0123456789a"));
        assert!(parse_add_result("x", json!({"ips": [{"address": "fd00::1/128"}]})).is_err());
    }

    #[test]
    fn the_first_conflist_by_name_wins_and_is_not_overwritten() {
        let dir = std::env::temp_dir().join(format!("skiff-cni-conf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("bin dir");
        let ensure = |data: &str| ensure_conflist(&dir, &bin, "10.244.2.0/24", &dir.join(data));
        assert!(ensure("ipam").expect("writes"));
        assert!(!ensure("ipam").expect("keeps"));
        assert!(ensure("other").expect("updates its own"));
        let list = NetConfList::load(&dir).expect("loads");
        assert_eq!(list.plugins.len(), 1, "no portmap in the bin dir");
        std::fs::write(bin.join(PORTMAP_PLUGIN), "").expect("portmap");
        assert!(ensure("other").expect("chains portmap once it is there"));
        let list = NetConfList::load(&dir).expect("loads");
        assert_eq!(list.plugins[1]["type"], PORTMAP_PLUGIN);
        std::fs::write(dir.join("05-other.conflist"), "{}").expect("write");
        assert_eq!(first_conflist(&dir), Some(dir.join("05-other.conflist")));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
