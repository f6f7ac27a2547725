//! The CNI result (interfaces, IPs, routes, DNS) and how this plugin's part is appended to the
//! previous plugin's result so that chains work.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::is_pre_1_0;
use crate::error::CniError;

/// A CNI ADD result (spec section "Success").
///
/// Unknown fields are kept as they came, so a result passed through keeps what other plugins put
/// in it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    /// The CNI version of the result.
    #[serde(default)]
    pub cni_version: String,
    /// Interfaces created by the chain so far.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned, each pointing at an entry of `interfaces`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    /// Routes added in the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
    /// Fields this plugin does not interpret.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One interface of a result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// Hardware address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The network namespace path for a container interface; absent for a host interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Fields this plugin does not interpret (socketPath, pciID…).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One IP configuration of a result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address in CIDR notation, e.g. `10.244.1.2/32`.
    pub address: String,
    /// Default gateway, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces` of the interface holding the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// `"4"` or `"6"`: only in results before 1.0.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Fields this plugin does not interpret.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One route of a result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// Destination in CIDR notation.
    pub dst: String,
    /// Next hop, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
    /// Fields this plugin does not interpret (mtu, advmss, priority, table, scope).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CniResult {
    /// Decodes a `prevResult` (code 7 when it is not a result).
    pub fn from_prev(value: &Value) -> Result<CniResult, CniError> {
        serde_json::from_value(value.clone()).map_err(|e| CniError::InvalidConfig {
            reason: format!("prevResult is not a CNI result: {e}"),
        })
    }

    /// Appends `ours` after this result: its interfaces come after the existing ones and the
    /// `interface` indices of its IPs are shifted to match; routes are appended; DNS is kept when
    /// already set, else taken from `ours`.
    pub fn merge(mut self, ours: CniResult) -> CniResult {
        let offset = self.interfaces.len();
        self.interfaces.extend(ours.interfaces);
        self.ips.extend(ours.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        self.routes.extend(ours.routes);
        if self.dns.as_ref().is_none_or(is_empty_dns) {
            self.dns = ours.dns.filter(|d| !is_empty_dns(d));
        }
        self
    }

    /// Converts to the format of `version`: before 1.0.0 every IP carries `version` ("4"/"6"),
    /// from 1.0.0 on it does not.
    pub fn into_version(mut self, version: &str) -> CniResult {
        let old = is_pre_1_0(version);
        for ip in &mut self.ips {
            ip.version = old.then(|| if ip.address.contains(':') { "6" } else { "4" }.to_string());
        }
        self.cni_version = version.to_string();
        self
    }

    /// The index of the interface named `name` in `sandbox`, if the result lists it.
    pub fn find_interface(&self, name: &str, sandbox: &str) -> Option<usize> {
        self.interfaces
            .iter()
            .position(|i| i.name == name && i.sandbox.as_deref() == Some(sandbox))
    }
}

fn is_empty_dns(v: &Value) -> bool {
    v.as_object().is_none_or(Map::is_empty)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ours() -> CniResult {
        CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![
                Interface {
                    name: "skf0123456789a".into(),
                    mac: Some("ee:ee:ee:ee:ee:ee".into()),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    sandbox: Some("/run/netns/x".into()),
                    ..Default::default()
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.2/32".into(),
                interface: Some(1),
                ..Default::default()
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("169.254.1.1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn merge_without_previous_keeps_indices() {
        let merged = CniResult::default().merge(ours());
        assert_eq!(merged.interfaces.len(), 2);
        assert_eq!(merged.ips[0].interface, Some(1));
        assert_eq!(merged.interfaces[1].name, "eth0");
    }

    #[test]
    fn merge_shifts_indices_after_previous_interfaces() {
        let prev = json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "lo0", "sandbox": "/run/netns/x"}, {"name": "br0", "mac": "aa:bb:cc:dd:ee:ff"}],
            "ips": [{"address": "192.0.2.1/24", "interface": 0}],
            "routes": [{"dst": "192.0.2.0/24", "mtu": 1400}],
            "dns": {"nameservers": ["10.96.0.10"]},
            "custom": {"kept": true}
        });
        let merged = CniResult::from_prev(&prev)
            .expect("prev decodes")
            .merge(ours());
        assert_eq!(merged.interfaces.len(), 4);
        assert_eq!(
            merged.ips[0].interface,
            Some(0),
            "previous ip index untouched"
        );
        assert_eq!(
            merged.ips[1].interface,
            Some(3),
            "our ip points at our eth0"
        );
        assert_eq!(merged.interfaces[3].name, "eth0");
        assert_eq!(merged.routes.len(), 2);
        assert_eq!(
            merged.routes[0].extra["mtu"], 1400,
            "unknown route fields kept"
        );
        assert_eq!(merged.dns, Some(json!({"nameservers": ["10.96.0.10"]})));
        let out = serde_json::to_value(&merged).expect("serializes");
        assert_eq!(
            out["custom"],
            json!({"kept": true}),
            "unknown top-level fields kept"
        );
        assert_eq!(out["interfaces"][2]["mac"], "ee:ee:ee:ee:ee:ee");
        assert!(
            out["interfaces"][2].get("sandbox").is_none(),
            "host veth has no sandbox"
        );
    }

    #[test]
    fn conversion_to_old_and_new_formats() {
        let old = CniResult::default().merge(ours()).into_version("0.4.0");
        let v = serde_json::to_value(&old).expect("serializes");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["ips"][0]["version"], "4");
        let prev = CniResult::from_prev(&v).expect("0.4.0 result decodes");
        let new = prev.merge(CniResult::default()).into_version("1.1.0");
        let v = serde_json::to_value(&new).expect("serializes");
        assert!(
            v["ips"][0].get("version").is_none(),
            "1.x results have no ip version"
        );
    }

    #[test]
    fn prev_result_that_is_not_a_result_is_code_7() {
        let err = CniResult::from_prev(&json!({"interfaces": "nope"})).expect_err("invalid");
        assert_eq!(err.code(), 7);
    }

    #[test]
    fn find_interface_matches_name_and_sandbox() {
        let r = ours();
        assert_eq!(r.find_interface("eth0", "/run/netns/x"), Some(1));
        assert_eq!(r.find_interface("eth0", "/run/netns/y"), None);
        assert_eq!(r.find_interface("skf0123456789a", "/run/netns/x"), None);
    }
}
