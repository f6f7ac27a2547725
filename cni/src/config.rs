//! The plugin's input: the CNI_* environment and the network configuration on stdin.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::CniError;

/// Where IPAM state lives when the configuration has no `dataDir`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/skiff/cni";

/// The MTU of both veth ends when the configuration has no `mtu`.
pub const DEFAULT_MTU: u32 = 1500;

/// The CNI versions this plugin speaks (for its configuration and its results).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The version used for output when the input names none (VERSION, undecodable input).
pub const LATEST_VERSION: &str = "1.1.0";

/// The CNI operation, from `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach the container to the network.
    Add,
    /// Detach it (idempotent).
    Del,
    /// Verify an attachment against its previous result.
    Check,
    /// Report the supported versions.
    Version,
    /// Report whether ADD can be served.
    Status,
    /// Remove state of attachments that no longer exist.
    Gc,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(value: &str) -> Result<Command, CniError> {
        Ok(match value {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::InvalidEnv {
                    variable: "CNI_COMMAND",
                    reason: format!(
                        "unknown command {other:?} (expected ADD, DEL, CHECK, VERSION, STATUS or GC)"
                    ),
                });
            }
        })
    }
}

/// The CNI_* environment of one invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND` as given.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
    /// `CNI_ARGS`, split into pairs.
    pub args: Vec<(String, String)>,
    /// `CNI_PATH`.
    pub path: Option<String>,
}

impl CniEnv {
    /// Reads the environment through `get` (e.g. `|k| std::env::var(k).ok()`); empty values count
    /// as absent.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> CniEnv {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        CniEnv {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS").map(PathBuf::from),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS")
                .map(|a| {
                    a.split(';')
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| match kv.split_once('=') {
                            Some((k, v)) => (k.to_string(), v.to_string()),
                            None => (kv.to_string(), String::new()),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            path: get("CNI_PATH"),
        }
    }

    /// The validated `CNI_CONTAINERID` (required for ADD, DEL and CHECK).
    pub fn container_id(&self) -> Result<&str, CniError> {
        let id = self.container_id.as_deref().ok_or(CniError::InvalidEnv {
            variable: "CNI_CONTAINERID",
            reason: "missing".into(),
        })?;
        let valid = id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        if !valid {
            return Err(CniError::InvalidEnv {
                variable: "CNI_CONTAINERID",
                reason: format!(
                    "{id:?} must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"
                ),
            });
        }
        Ok(id)
    }

    /// The validated `CNI_IFNAME` (required for ADD, DEL and CHECK).
    pub fn ifname(&self) -> Result<&str, CniError> {
        let name = self.ifname.as_deref().ok_or(CniError::InvalidEnv {
            variable: "CNI_IFNAME",
            reason: "missing".into(),
        })?;
        validate_ifname(name).map_err(|error| CniError::InvalidEnv {
            variable: "CNI_IFNAME",
            reason: error.to_string(),
        })?;
        Ok(name)
    }

    /// `CNI_NETNS` (required for ADD and CHECK, optional for DEL).
    pub fn netns(&self) -> Result<&PathBuf, CniError> {
        self.netns.as_ref().ok_or(CniError::InvalidEnv {
            variable: "CNI_NETNS",
            reason: "missing".into(),
        })
    }
}

/// An interface name the kernel or the CNI spec refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IfnameError {
    /// Empty or longer than `IFNAMSIZ - 1`.
    #[error("{name:?} must be 1 to 15 bytes long")]
    Length {
        /// The name.
        name: String,
    },
    /// `.` or `..`.
    #[error("{name:?} is not a valid interface name")]
    Dots {
        /// The name.
        name: String,
    },
    /// A `/`, `:`, whitespace or control character.
    #[error("{name:?} must not contain '/', ':' or whitespace")]
    Character {
        /// The name.
        name: String,
    },
}

/// Checks an interface name as the kernel and the CNI spec want it.
pub fn validate_ifname(name: &str) -> Result<(), IfnameError> {
    let name_owned = || name.to_string();
    if name.is_empty() || name.len() > 15 {
        return Err(IfnameError::Length { name: name_owned() });
    }
    if name == "." || name == ".." {
        return Err(IfnameError::Dots { name: name_owned() });
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(IfnameError::Character { name: name_owned() });
    }
    Ok(())
}

/// One `{containerID, ifname}` pair, as in `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// The container (sandbox) id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface name inside the container.
    pub ifname: String,
}

/// The network configuration on stdin, as the runtime hands it to this plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawNetConf {
    /// The CNI version of the configuration (and of the result wanted).
    pub cni_version: Option<String>,
    /// The network name.
    pub name: Option<String>,
    /// The plugin type (`skiff-cni`).
    #[serde(rename = "type")]
    pub plugin_type: Option<String>,
    /// The node's pod CIDR, e.g. `10.244.1.0/24`.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    /// Where IPAM state is kept (default [`DEFAULT_DATA_DIR`]).
    pub data_dir: Option<PathBuf>,
    /// MTU of both veth ends (default [`DEFAULT_MTU`]).
    pub mtu: Option<u32>,
    /// The result of the previous plugin of the chain.
    pub prev_result: Option<Value>,
    /// DNS settings to report when the previous result has none.
    pub dns: Option<Value>,
    /// GC only: the attachments that still exist.
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// Everything else (runtimeConfig, args, capabilities…), ignored.
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// A validated network configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// The CNI version of the configuration.
    pub cni_version: String,
    /// The network name (a directory name under the data dir).
    pub name: String,
    /// The pod CIDR the IPAM allocates from.
    pub pod_cidr: Ipv4Network,
    /// The IPAM state directory's parent.
    pub data_dir: PathBuf,
    /// MTU of both veth ends.
    pub mtu: u32,
    /// The previous result, if any.
    pub prev_result: Option<Value>,
    /// DNS settings of the configuration.
    pub dns: Option<Value>,
    /// GC only: the attachments that still exist (`None` when the key is absent).
    pub valid_attachments: Option<Vec<Attachment>>,
}

impl NetConf {
    /// Parses and validates the configuration bytes.
    ///
    /// Errors: code 6 when it is not JSON of the right shape, 1 for an unsupported `cniVersion`, 7
    /// for a missing or invalid field.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let raw: RawNetConf =
            serde_json::from_slice(bytes).map_err(|source| CniError::Decode { source })?;
        NetConf::validate(raw)
    }

    /// Validates a decoded configuration.
    pub fn validate(raw: RawNetConf) -> Result<NetConf, CniError> {
        let invalid = |reason: String| CniError::InvalidConfig { reason };
        // As upstream's skel: a configuration without a version is a 0.1.0 one, which we do not speak.
        let cni_version = raw.cni_version.unwrap_or_else(|| "0.1.0".to_string());
        check_version(&cni_version)?;
        let name = raw
            .name
            .ok_or_else(|| invalid("the network name (\"name\") is missing".into()))?;
        let valid_name = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid_name {
            return Err(invalid(format!(
                "network name {name:?} must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"
            )));
        }
        let cidr_text = raw
            .pod_cidr
            .ok_or_else(|| invalid("\"podCIDR\" is missing".into()))?;
        let pod_cidr = parse_pod_cidr(&cidr_text).map_err(|error| invalid(error.to_string()))?;
        let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
        if !(68..=65535).contains(&mtu) {
            return Err(invalid(format!("mtu {mtu} is outside 68..=65535")));
        }
        let data_dir = raw
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if !data_dir.is_absolute() {
            return Err(invalid(format!(
                "dataDir {} must be an absolute path",
                data_dir.display()
            )));
        }
        Ok(NetConf {
            cni_version,
            name,
            pod_cidr,
            data_dir,
            mtu,
            prev_result: raw.prev_result,
            dns: raw.dns,
            valid_attachments: raw.valid_attachments,
        })
    }

    /// The directory of this network's IPAM state: `<dataDir>/<name>`.
    pub fn ipam_dir(&self) -> PathBuf {
        self.data_dir.join(&self.name)
    }
}

/// Fails with code 1 unless `version` is one of [`SUPPORTED_VERSIONS`].
pub fn check_version(version: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(CniError::IncompatibleVersion {
            version: version.to_string(),
            supported: SUPPORTED_VERSIONS.join(", "),
        })
    }
}

/// A `podCIDR` the plugin cannot hand addresses out of.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodCidrError {
    /// Not an IPv4 CIDR.
    #[error("podCIDR {text:?} is not an IPv4 CIDR: {reason}")]
    Syntax {
        /// What was given.
        text: String,
        /// Why it does not parse (the plugin's errors are flat strings in
        /// the CNI error's `msg`, so the cause is kept as its message).
        reason: String,
    },
    /// Smaller than a /30.
    #[error(
        "podCIDR {text} is too small: at least a /30 is needed (network, node and broadcast addresses are reserved)"
    )]
    TooSmall {
        /// What was given.
        text: String,
    },
    /// Host bits set.
    #[error("podCIDR {text} has host bits set (the network is {network})")]
    HostBits {
        /// What was given.
        text: String,
        /// The network it names.
        network: Ipv4Network,
    },
}

/// Parses a pod CIDR: IPv4, no host bits set, prefix at most /30 (so that one address is left
/// after the network, node and broadcast addresses).
pub fn parse_pod_cidr(text: &str) -> Result<Ipv4Network, PodCidrError> {
    let net: Ipv4Network =
        text.parse()
            .map_err(|e: ipnetwork::IpNetworkError| PodCidrError::Syntax {
                text: text.to_string(),
                reason: e.to_string(),
            })?;
    if net.prefix() > 30 {
        return Err(PodCidrError::TooSmall {
            text: text.to_string(),
        });
    }
    if net.ip() != net.network() {
        return Err(PodCidrError::HostBits {
            text: text.to_string(),
            network: Ipv4Network::new(net.network(), net.prefix()).unwrap_or(net),
        });
    }
    Ok(net)
}

/// Whether results of `version` use the pre-1.0 format (an `ips[].version` field).
pub fn is_pre_1_0(version: &str) -> bool {
    version.starts_with("0.")
}

/// The node (gateway) address of a pod CIDR, which the IPAM never hands out: the first host
/// address, as kubenet does.
pub fn node_address(net: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fixed_interface_with_defaults() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"skiff","type":"skiff-cni","podCIDR":"10.244.1.0/24",
                "runtimeConfig":{"portMappings":[]},"prevResult":{"cniVersion":"1.1.0"}}"#,
        )
        .expect("valid");
        assert_eq!(
            conf.pod_cidr,
            "10.244.1.0/24".parse::<Ipv4Network>().unwrap()
        );
        assert_eq!(conf.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(conf.mtu, DEFAULT_MTU);
        assert_eq!(conf.ipam_dir(), PathBuf::from("/var/lib/skiff/cni/skiff"));
        assert!(conf.prev_result.is_some());
        assert_eq!(node_address(conf.pod_cidr), Ipv4Addr::new(10, 244, 1, 1));
    }

    #[test]
    fn parses_data_dir_mtu_and_valid_attachments() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"skiff-cni","podCIDR":"10.1.0.0/16",
                "dataDir":"/tmp/x","mtu":1400,
                "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        )
        .expect("valid");
        assert_eq!(conf.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(conf.mtu, 1400);
        assert_eq!(
            conf.valid_attachments,
            Some(vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }])
        );
    }

    fn code_of(json: &str) -> (u32, String) {
        let err = NetConf::parse(json.as_bytes()).expect_err("invalid");
        (err.code(), err.to_string())
    }

    #[test]
    fn rejects_bad_configurations_with_the_right_codes() {
        let base = r#""type":"skiff-cni","name":"n""#;
        let cases = [
            (format!(r#"{{{base},"cniVersion":"1.1.0"}}"#), 7, "podCIDR"),
            (
                format!(r#"{{{base},"cniVersion":"1.1.0","podCIDR":"fd00::/64"}}"#),
                7,
                "IPv4",
            ),
            (
                format!(r#"{{{base},"cniVersion":"1.1.0","podCIDR":"10.0.0.0/31"}}"#),
                7,
                "too small",
            ),
            (
                format!(r#"{{{base},"cniVersion":"1.1.0","podCIDR":"10.0.0.7/24"}}"#),
                7,
                "host bits",
            ),
            (
                format!(r#"{{{base},"cniVersion":"1.1.0","podCIDR":"10.0.0.0/24","mtu":20}}"#),
                7,
                "mtu",
            ),
            (
                format!(
                    r#"{{{base},"cniVersion":"1.1.0","podCIDR":"10.0.0.0/24","dataDir":"rel"}}"#
                ),
                7,
                "absolute",
            ),
            (
                r#"{"type":"skiff-cni","name":"../x","cniVersion":"1.1.0","podCIDR":"10.0.0.0/24"}"#
                    .to_string(),
                7,
                "network name",
            ),
            (
                format!(r#"{{{base},"cniVersion":"2.0.0","podCIDR":"10.0.0.0/24"}}"#),
                1,
                "2.0.0",
            ),
            (format!(r#"{{{base},"podCIDR":"10.0.0.0/24"}}"#), 1, "0.1.0"),
            (r#"{"cniVersion":1}"#.to_string(), 6, "decode"),
        ];
        for (json, code, needle) in cases {
            let (got, msg) = code_of(&json);
            assert_eq!(got, code, "{json}: {msg}");
            assert!(msg.contains(needle), "{json}: {msg:?} lacks {needle:?}");
        }
    }

    #[test]
    fn env_validation() {
        let env = CniEnv::from_lookup(|k| {
            match k {
                "CNI_COMMAND" => Some("ADD"),
                "CNI_CONTAINERID" => Some("abc-1"),
                "CNI_IFNAME" => Some("eth0"),
                "CNI_NETNS" => Some("/run/netns/x"),
                "CNI_ARGS" => Some("IgnoreUnknown=1;K8S_POD_NAME=p"),
                _ => None,
            }
            .map(str::to_string)
        });
        assert_eq!(env.container_id().expect("id"), "abc-1");
        assert_eq!(env.ifname().expect("ifname"), "eth0");
        assert_eq!(env.args[1], ("K8S_POD_NAME".to_string(), "p".to_string()));
        let bad = CniEnv {
            container_id: Some("a/b".into()),
            ifname: Some("this-name-is-too-long".into()),
            ..Default::default()
        };
        assert_eq!(bad.container_id().expect_err("slash").code(), 4);
        assert_eq!(bad.ifname().expect_err("long").code(), 4);
        assert_eq!(CniEnv::default().netns().expect_err("missing").code(), 4);
        assert!(validate_ifname("eth:0").is_err());
        assert!(validate_ifname("..").is_err());
        assert_eq!(Command::parse("GC").expect("gc"), Command::Gc);
    }
}
