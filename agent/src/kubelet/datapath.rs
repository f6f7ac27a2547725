//! The eBPF datapath ([`crate::bpf::Datapath`]) as the kubelet's
//! [`PodNetworkHook`]: attached to a pod's host-side veth after CNI ADD,
//! detached before CNI DEL, pruned of veths that are gone once the node's
//! pods are known, and rendered for `/metrics`.
//!
//! Attachment is desired state: the hook remembers every pod it was asked to
//! attach until it is detached, and [`PodNetworkHook::reconcile`] attaches
//! again whatever failed or went missing (the kubelet calls it periodically).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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
    /// The pods to keep attached, by host-side veth.
    desired: Mutex<BTreeMap<String, PodIdentity>>,
    /// The load-balancing maps, opened at the first `/metrics` scrape and kept.
    lb: Mutex<Option<crate::bpf::lb::AyaLbMaps>>,
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
            desired: Mutex::default(),
            lb: Mutex::default(),
        })
    }

    /// The datapath.
    pub fn datapath(&self) -> &Arc<Datapath> {
        &self.datapath
    }

    fn desired(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PodIdentity>> {
        self.desired.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PodNetworkHook for BpfHook {
    fn attach(&self, host_ifname: &str, pod: &PodIdentity) -> Result<(), BpfError> {
        self.desired().insert(host_ifname.to_owned(), pod.clone());
        self.datapath.attach_pod(host_ifname, pod)
    }

    fn detach(&self, host_ifname: &str) -> Result<(), BpfError> {
        // Held across the detach, so that a reconcile pass cannot attach in between.
        let mut desired = self.desired();
        desired.remove(host_ifname);
        self.datapath.detach_pod(host_ifname)
    }

    fn reconcile(&self) -> Vec<(String, BpfError)> {
        let names: Vec<String> = self.desired().keys().cloned().collect();
        names
            .into_iter()
            .filter_map(|ifname| {
                // Held across the attach; a pod detached meanwhile is not attached again.
                let desired = self.desired();
                let pod = desired.get(&ifname)?;
                self.datapath
                    .attach_pod(&ifname, pod)
                    .err()
                    .map(|e| (ifname, e))
            })
            .collect()
    }

    fn prune(&self) -> Result<Vec<String>, BpfError> {
        self.datapath.prune_gone_pods()
    }

    fn metrics(&self) -> Result<String, BpfError> {
        let counters = self.datapath.pod_counters()?;
        let mut text = encode_prometheus(&counters);
        let mut lb = self.lb.lock().unwrap_or_else(|e| e.into_inner());
        if lb.is_none() {
            *lb = Some(self.datapath.lb_maps()?);
        }
        let maps = lb.as_ref().expect("opened just above");
        let frontends = crate::services::table::list(maps)?;
        let conntrack = maps.conntrack()?.len();
        text.push_str(&encode_lb_prometheus(
            &frontends,
            conntrack,
            &maps.errors()?,
        ));
        Ok(text)
    }
}
