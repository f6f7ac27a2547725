//! skiff's node agent.
//!
//! Its first mode is hollow nodes (`skiff-agent --hollow`): Node objects
//! with capacity and heartbeats whose pods are reported Running without any
//! container being started, to exercise the control plane at scale. The real
//! node role (containers, networking, eBPF) will sit beside [`hollow`] and
//! share [`cli`] and `skiff_common::daemon`.

pub mod bpf;
pub mod cli;
pub mod hollow;
pub mod kubelet;
pub mod skiffctl;
