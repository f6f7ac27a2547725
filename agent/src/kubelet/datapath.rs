//! The eBPF datapath ([`crate::bpf::Datapath`]) as the kubelet's
//! [`PodNetworkHook`]: attached to a pod's host-side veth after CNI ADD,
//! detached before CNI DEL, pruned of veths that are gone once the node's
//! pods are known, and rendered for `/metrics`.

use super::PodNetworkHook;
use crate::bpf::{BpfError, Datapath, PodIdentity, encode_prometheus};

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

impl PodNetworkHook for BpfHook {
    fn attach(&self, host_ifname: &str, pod: &PodIdentity) -> Result<(), BpfError> {
        self.datapath.attach_pod(host_ifname, pod)
    }

    fn detach(&self, host_ifname: &str) -> Result<(), BpfError> {
        self.datapath.detach_pod(host_ifname)
    }

    fn prune(&self) -> Result<Vec<String>, BpfError> {
        self.datapath.prune_gone_pods()
    }

    fn metrics(&self) -> Result<String, BpfError> {
        let counters = self.datapath.pod_counters()?;
        Ok(encode_prometheus(&counters))
    }
}
