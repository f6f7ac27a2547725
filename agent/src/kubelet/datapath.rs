//! The eBPF datapath ([`crate::bpf::Datapath`]) as the kubelet's
//! [`PodNetworkHook`]: attached to a pod's host-side veth after CNI ADD,
//! detached before CNI DEL, pruned of veths that are gone once the node's
//! pods are known, and rendered for `/metrics`.

use std::sync::Arc;

use super::PodNetworkHook;
use crate::bpf::lb::LbMaps;
use crate::bpf::{
    BpfError, DEFAULT_BPFFS, Datapath, MapLimits, PROGRAM_OBJECT, PodIdentity,
    encode_lb_prometheus, encode_prometheus,
};

/// The datapath of one node.
#[derive(Debug)]
pub struct BpfHook {
    datapath: Arc<Datapath>,
}

impl BpfHook {
    /// Load the datapath of `node_name` (or restore it from its pins), creating missing maps
    /// with `limits`.
    pub fn open(node_name: &str, limits: &MapLimits) -> Result<BpfHook, BpfError> {
        Ok(BpfHook {
            datapath: Arc::new(Datapath::open_with(
                std::path::Path::new(DEFAULT_BPFFS),
                node_name,
                PROGRAM_OBJECT,
                limits,
            )?),
        })
    }

    /// The datapath.
    pub fn datapath(&self) -> &Arc<Datapath> {
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
        let mut text = encode_prometheus(&counters);
        let maps = self.datapath.lb_maps()?;
        let frontends = crate::services::table::list(&maps)?;
        let conntrack = maps.conntrack()?.len();
        text.push_str(&encode_lb_prometheus(
            &frontends,
            conntrack,
            &maps.errors()?,
        ));
        Ok(text)
    }
}
