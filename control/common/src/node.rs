//! What every node agent (the real kubelet role and the hollow nodes) and
//! the controllers agree on about Nodes: the version they report, where
//! their heartbeat Leases live, valid names, and a Node's pod CIDR.

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;

/// The kubelet version skiff's agents report in `status.nodeInfo`.
pub const KUBELET_VERSION: &str = "v1.37.0-skiff";

/// The namespace of node heartbeat Leases (`kube-node-lease/<node>`).
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

/// A name a Node cannot have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node name {name:?}: {reasons}")]
pub struct InvalidNodeName {
    /// The name.
    pub name: String,
    /// What is wrong with it, in upstream's words.
    pub reasons: String,
}

/// Check that `name` is a DNS-1123 subdomain, as Node names must be
/// (upstream's `ValidateNodeName`).
pub fn validate_name(name: &str) -> Result<(), InvalidNodeName> {
    let mut reasons = crate::validation::is_dns1123_subdomain(name);
    if name.is_empty() {
        reasons = vec!["must be non-empty".to_string()];
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(InvalidNodeName {
            name: name.to_string(),
            reasons: reasons.join(", "),
        })
    }
}

/// A Node's pod CIDR: `spec.podCIDR`, else the first of `spec.podCIDRs`.
pub fn pod_cidr(node: &Node) -> Option<IpNetwork> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidr
        .as_deref()
        .or_else(|| {
            spec.pod_cidrs
                .as_ref()
                .and_then(|c| c.first())
                .map(String::as_str)
        })?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn net(s: &str) -> IpNetwork {
        s.parse().expect("a cidr")
    }

    #[test]
    fn names_are_validated() {
        validate_name("hollow-7").expect("valid");
        validate_name("a.b-c").expect("valid");
        assert!(validate_name("Hollow-1").is_err());
        assert!(validate_name("-a").is_err());
        assert!(validate_name("a-").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("a_b").is_err());
    }

    #[test]
    fn pod_cidr_is_read_from_either_field() {
        let node: Node = serde_json::from_value(
            json!({"metadata": {"name": "a"}, "spec": {"podCIDRs": ["10.244.3.0/24"]}}),
        )
        .expect("node");
        assert_eq!(pod_cidr(&node), Some(net("10.244.3.0/24")));
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": "a"}, "spec": {}})).expect("node");
        assert_eq!(pod_cidr(&node), None);
    }
}
