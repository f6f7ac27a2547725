//! skiff's node agent, and `skiffctl`.
//!
//! - [`kubelet`]: the real node (`skiff-agent --node-name N`): registers the
//!   Node and heartbeats it, runs the pods bound to it through containerd
//!   and the CNI plugin, probes them, reports their status, serves logs,
//!   exec and port-forward, and attaches the eBPF datapath to each pod.
//! - [`hollow`]: simulated nodes (`skiff-agent --hollow --count N`) that
//!   heartbeat and report their pods Running without containers, for tests
//!   and benchmarks at scale.
//! - [`bpf`]: the eBPF datapath: programs loaded and pinned, maps written
//!   only through the map writer, links attached per pod.
//! - [`services`]: kube-proxy's role in eBPF: Services and EndpointSlices reconciled into the
//!   node's load-balancing maps.
//! - [`skiffctl`]: the local multi-node cluster (`up`, `down`, `status`) and
//!   the views of the pinned maps (`bpf pods`).
//! - [`cli`]: the agent's flags; start-up is `skiff_common::daemon`.

pub mod bpf;
pub mod cli;
pub mod hollow;
pub mod kubelet;
pub mod services;
pub mod skiffctl;
