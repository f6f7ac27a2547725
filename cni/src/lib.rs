//! skiff-cni: skiff's CNI plugin (CNI spec 1.1).
//!
//! Wires a pod the way Calico does (a host-side veth without an address that answers ARP for
//! everything, a /32 in the pod with `default via 169.254.1.1`, a /32 route on the node) and
//! allocates addresses from the node's pod CIDR with a file-per-address IPAM that no crash or
//! concurrent ADD can make hand out an address twice.
//!
//! - [`config`]: the CNI_* environment and the network configuration (`podCIDR`, `dataDir`, `mtu`),
//! - [`result`]: the CNI result and its chaining with `prevResult`,
//! - [`ipam`]: the address store,
//! - [`dataplane`]: links, addresses, routes and sysctls through rtnetlink,
//! - [`plugin`]: the commands ADD, DEL, CHECK, VERSION, STATUS and GC,
//! - [`error`]: errors and their CNI codes.

pub mod config;
pub mod dataplane;
pub mod error;
pub mod ipam;
pub mod plugin;
pub mod result;

pub use config::{Attachment, CniEnv, Command, NetConf};
pub use dataplane::host_veth_name;
pub use error::CniError;
pub use ipam::Ipam;
pub use result::CniResult;
