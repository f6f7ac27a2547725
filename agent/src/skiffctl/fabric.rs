//! The local cluster's network: network namespaces only, nothing bridged to
//! the machine's real interfaces.
//!
//! ```text
//!  skiff-fabric ns: br0 10.90.0.1/24 (the control plane listens here)
//!     ├── veth-1 ─── eth0 10.90.0.11/24  in skiff-node-1
//!     ├── veth-2 ─── eth0 10.90.0.12/24  in skiff-node-2
//!     └── veth-ext ─ eth0 10.90.0.200/24 in skiff-ext
//! ```
//!
//! The fabric's /24 lies outside the default service range (10.96.0.0/12)
//! and pod network (10.244.0.0/16), so no ClusterIP or pod IP can equal a
//! node's address; `skiffctl up` refuses ranges that overlap.
//!
//! ```text
//! ```
//!
//! Links and addresses are made with iproute2's `ip` (glue for a CLI);
//! sysctls are written from a thread that entered the namespace.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::CloneFlags;

use super::SkiffctlError;

/// The fabric's prefix length.
pub const FABRIC_PREFIX_LEN: u8 = 24;
/// The fabric's network address.
pub const FABRIC_NETWORK: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 0);
/// The control plane's address on the fabric bridge.
pub const CONTROL_IP: Ipv4Addr = fabric_host(1);
/// The outside client's address.
pub const EXT_IP: Ipv4Addr = fabric_host(200);
/// The LoadBalancer IP pool's first and last addresses (on the fabric, so
/// that the outside client reaches them on its link).
pub const LB_POOL: (Ipv4Addr, Ipv4Addr) = (fabric_host(100), fabric_host(149));

/// Host `host` of the fabric's /24.
pub const fn fabric_host(host: u8) -> Ipv4Addr {
    let [a, b, c, _] = FABRIC_NETWORK.octets();
    Ipv4Addr::new(a, b, c, host)
}
/// The most nodes a fabric holds (10.90.0.11 to 10.90.0.199).
pub const MAX_NODES: usize = 189;
/// The fabric's network, `10.90.0.0/24`.
pub fn fabric_cidr() -> ipnetwork::Ipv4Network {
    ipnetwork::Ipv4Network::new(FABRIC_NETWORK, FABRIC_PREFIX_LEN).expect("a /24 is a valid prefix")
}

/// The bridge's name in the fabric namespace.
pub const BRIDGE: &str = "br0";
/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Names and addresses of one local cluster, derived from its name and node
/// count so that `down` can find them even without a state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The cluster name ("" for the default cluster).
    pub name: String,
    /// How many nodes.
    pub nodes: usize,
}

impl Layout {
    /// The layout of cluster `name` with `nodes` nodes.
    pub fn new(name: &str, nodes: usize) -> Layout {
        Layout {
            name: name.to_string(),
            nodes,
        }
    }

    fn prefix(&self) -> String {
        if self.name.is_empty() {
            String::new()
        } else {
            format!("{}-", self.name)
        }
    }

    /// The name of node `i` (1-based): `node-1`, or `<name>-node-1`.
    pub fn node_name(&self, i: usize) -> String {
        format!("{}node-{i}", self.prefix())
    }

    /// The network namespace of node `i`: `skiff-<node-name>`.
    pub fn node_netns(&self, i: usize) -> String {
        format!("skiff-{}", self.node_name(i))
    }

    /// The fabric namespace: `skiff-fabric` or `skiff-<name>-fabric`.
    pub fn fabric_netns(&self) -> String {
        format!("skiff-{}fabric", self.prefix())
    }

    /// The outside client namespace: `skiff-ext` or `skiff-<name>-ext`.
    pub fn ext_netns(&self) -> String {
        format!("skiff-{}ext", self.prefix())
    }

    /// The fabric address of node `i`: 10.90.0.(10 + i).
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        fabric_host(u8::try_from(10 + i).expect("node index within MAX_NODES"))
    }

    /// Whether `netns` looks like one of this cluster's namespaces (for a
    /// `down` without a state file).
    pub fn owns_netns(&self, netns: &str) -> bool {
        if netns == self.fabric_netns() || netns == self.ext_netns() {
            return true;
        }
        let node_prefix = format!("skiff-{}node-", self.prefix());
        netns
            .strip_prefix(&node_prefix)
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
    }
}

/// A cluster name `skiffctl` refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterNameError {
    /// Too long for the namespace and node names made from it.
    #[error("cluster name {name:?} is longer than 20 characters")]
    TooLong {
        /// The name.
        name: String,
    },
    /// Not lowercase letters, digits and inner dashes.
    #[error("cluster name {name:?} must be lowercase letters, digits and inner dashes")]
    Characters {
        /// The name.
        name: String,
    },
}

/// Check a cluster name: lowercase letters, digits and `-`, short enough
/// for namespace and node names.
pub fn validate_name(name: &str) -> Result<(), ClusterNameError> {
    if name.len() > 20 {
        return Err(ClusterNameError::TooLong {
            name: name.to_string(),
        });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(ClusterNameError::Characters {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// The path of named namespace `netns`.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns)
}

/// Whether named namespace `netns` exists.
pub fn netns_exists(netns: &str) -> bool {
    netns_path(netns).exists()
}

/// The named namespaces that exist (`ip netns list`, read from the
/// directory).
pub fn list_netns() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Run `ip` with `args`; its stdout on success.
pub fn ip(args: &[&str]) -> Result<String, SkiffctlError> {
    run("ip", args)
}

/// Run `program` with `args` and wait; its stdout on success, an error
/// quoting the command and its stderr otherwise.
pub fn run(program: &str, args: &[&str]) -> Result<String, SkiffctlError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| SkiffctlError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SkiffctlError::CommandFailed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Run `f` on a thread that entered named namespace `netns` (sockets it
/// opens and `/proc/sys/net` it writes belong to that namespace).
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SkiffctlError> {
    let path = netns_path(netns);
    let file = std::fs::File::open(&path).map_err(|source| SkiffctlError::Io {
        what: "cannot open the network namespace",
        path: path.clone(),
        source,
    })?;
    let what = format!("cannot enter network namespace {netns}");
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|source| SkiffctlError::Sys { what, source })?;
        Ok(f())
    })
    .join()
    .expect("the namespace thread does not panic")
}

/// Enable IPv4 forwarding in `netns`.
pub fn enable_forwarding(netns: &str) -> Result<(), SkiffctlError> {
    let path = PathBuf::from("/proc/sys/net/ipv4/ip_forward");
    in_netns(netns, {
        let path = path.clone();
        move || std::fs::write(path, "1")
    })?
    .map_err(|source| SkiffctlError::Io {
        what: "cannot enable forwarding",
        path,
        source,
    })
}

/// Create a named namespace with its loopback up.
pub fn add_netns(netns: &str) -> Result<(), SkiffctlError> {
    ip(&["netns", "add", netns])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Create the fabric namespace's bridge with the control plane address.
pub fn create_bridge(fabric: &str) -> Result<(), SkiffctlError> {
    ip(&["-n", fabric, "link", "add", BRIDGE, "type", "bridge"])?;
    let addr = format!("{CONTROL_IP}/{FABRIC_PREFIX_LEN}");
    ip(&["-n", fabric, "addr", "add", &addr, "dev", BRIDGE])?;
    ip(&["-n", fabric, "link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// Plug namespace `netns` into the fabric: a veth `port` on the bridge in
/// `fabric`, its peer `eth0` in `netns` with `addr`/24, both up.
pub fn plug(fabric: &str, port: &str, netns: &str, addr: Ipv4Addr) -> Result<(), SkiffctlError> {
    ip(&[
        "-n", fabric, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ])?;
    ip(&["-n", fabric, "link", "set", port, "master", BRIDGE, "up"])?;
    let cidr = format!("{addr}/{FABRIC_PREFIX_LEN}");
    ip(&["-n", netns, "addr", "add", &cidr, "dev", "eth0"])?;
    ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    Ok(())
}

/// Route `cidr` via `via` in `netns` (replacing any route to it).
pub fn route(netns: &str, cidr: &str, via: Ipv4Addr) -> Result<(), SkiffctlError> {
    ip(&[
        "-n",
        netns,
        "route",
        "replace",
        cidr,
        "via",
        &via.to_string(),
    ])?;
    Ok(())
}

/// Delete named namespace `netns` if it exists (its links go with it).
pub fn delete_netns(netns: &str) -> Result<(), SkiffctlError> {
    if netns_exists(netns) {
        ip(&["netns", "delete", netns])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_uses_the_issue_names() {
        let layout = Layout::new("", 3);
        assert_eq!(layout.node_name(1), "node-1");
        assert_eq!(layout.node_netns(3), "skiff-node-3");
        assert_eq!(layout.fabric_netns(), "skiff-fabric");
        assert_eq!(layout.ext_netns(), "skiff-ext");
        assert_eq!(layout.node_ip(1), Ipv4Addr::new(10, 90, 0, 11));
        assert_eq!(layout.node_ip(MAX_NODES), Ipv4Addr::new(10, 90, 0, 199));
    }

    #[test]
    fn named_layouts_prefix_everything_and_own_only_their_namespaces() {
        let layout = Layout::new("t42", 2);
        assert_eq!(layout.node_name(2), "t42-node-2");
        assert_eq!(layout.node_netns(2), "skiff-t42-node-2");
        assert_eq!(layout.fabric_netns(), "skiff-t42-fabric");
        assert!(layout.owns_netns("skiff-t42-node-17"));
        assert!(layout.owns_netns("skiff-t42-ext"));
        assert!(!layout.owns_netns("skiff-node-1"));
        assert!(!layout.owns_netns("skiff-t42-node-"));
        assert!(!layout.owns_netns("skiff-t42-node-1x"));
        let default = Layout::new("", 1);
        assert!(default.owns_netns("skiff-node-1"));
        assert!(!default.owns_netns("skiff-t42-node-1"));
    }

    #[test]
    fn cluster_names_are_checked() {
        assert!(validate_name("").is_ok());
        assert!(validate_name("t-123").is_ok());
        assert!(validate_name("Bad").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"a".repeat(21)).is_err());
    }
}
