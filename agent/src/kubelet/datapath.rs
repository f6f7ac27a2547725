//! The eBPF datapath ([`crate::bpf::Datapath`]) as the kubelet's
//! [`PodNetworkHook`]: attached to a pod's host-side veth after CNI ADD,
//! detached before CNI DEL, pruned of veths that are gone once the node's
//! pods are known, and rendered for `/metrics`.

use super::{PodIdentity, PodNetworkHook};
use crate::bpf::{BpfError, Datapath, PodIdent, encode_prometheus};

/// The datapath of one node.
#[derive(Debug)]
pub struct BpfHook {
    datapath: Datapath,
}

impl BpfHook {
    /// Load the datapath of `node_name` (or restore it from its pins).
    pub fn open(node_name: &str) -> Result<BpfHook, BpfError> {
        Ok(BpfHook {
            datapath: Datapath::open(node_name)?,
        })
    }

    /// The datapath.
    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }
}

/// An error with its causes, `a: b: c`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn chain(error: BpfError) -> String {
    error_chain(&error)
}

impl PodNetworkHook for BpfHook {
    fn attach(&self, host_ifname: &str, pod: &PodIdentity) -> Result<(), String> {
        let ident = PodIdent {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            ip: pod.ip,
        };
        self.datapath.attach_pod(host_ifname, &ident).map_err(chain)
    }

    fn detach(&self, host_ifname: &str) -> Result<(), String> {
        self.datapath.detach_pod(host_ifname).map_err(chain)
    }

    fn prune(&self) -> Result<Vec<String>, String> {
        self.datapath.prune_gone_pods().map_err(chain)
    }

    fn metrics(&self) -> Result<String, String> {
        let counters = self.datapath.pod_counters().map_err(chain)?;
        Ok(encode_prometheus(&counters))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn errors_show_their_causes() {
        let error = Outer {
            source: std::io::Error::other("inner"),
        };
        assert_eq!(error_chain(&error), "outer: inner");
    }
}
