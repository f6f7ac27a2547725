//! Calico-style wiring of a pod with rtnetlink.
//!
//! - A veth pair: the host end `skf<11 hex>` (see [`host_veth_name`]) has no address, the MAC
//!   `ee:ee:ee:ee:ee:ee`, `proxy_arp=1`, `proxy_delay=0`, `forwarding=1` and an alias naming the
//!   network and attachment (so GC removes only its own links); the pod end is created directly
//!   in the pod's network namespace under `CNI_IFNAME`.
//! - In the pod: the address as a /32, `169.254.1.1 dev <ifname> scope link`, a permanent
//!   neighbour entry `169.254.1.1 lladdr ee:ee:ee:ee:ee:ee` (the first packet does not wait for
//!   proxy ARP, and the node needs no route to 169.254.1.1), and `default via 169.254.1.1`.
//! - On the node: `<pod ip>/32 dev <host veth> scope link`.
//!
//! Netlink sockets are bound to the network namespace of the thread that creates them, so
//! [`handle_in`] enters the pod's namespace with `setns(2)` just long enough to open its socket and
//! then returns to the namespace it came from; all requests run on one current-thread runtime.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use nix::sched::{CloneFlags, setns};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use sha2::{Digest, Sha256};

use crate::config::Attachment;
use crate::error::{CniError, netlink_errno};

/// The pods' gateway address, answered by the host veth (link-local, never on the wire).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The MAC address of every host-side veth.
pub const HOST_VETH_MAC: [u8; 6] = [0xee; 6];

/// Prefix of host-side veth names.
pub const HOST_VETH_PREFIX: &str = "skf";

/// Prefix of the alias set on host-side veths: `skiff-cni:<network>:<containerID>:<ifname>`.
pub const ALIAS_PREFIX: &str = "skiff-cni:";

const ENODEV: i32 = 19;
const EEXIST: i32 = 17;

/// The host-side veth name of an attachment: `skf` + the first 11 hex digits of
/// sha256(`<containerID>/<ifname>`).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{HOST_VETH_PREFIX}{}", &hex[..11])
}

/// The alias marking a host veth as this network's, for `attachment`.
pub fn host_veth_alias(network: &str, attachment: &Attachment) -> String {
    format!(
        "{ALIAS_PREFIX}{network}:{}:{}",
        attachment.container_id, attachment.ifname
    )
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An open network namespace (kept open while links are moved into it).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace file at `path` (e.g. `/var/run/netns/x` or `/proc/PID/ns/net`).
    pub fn open(path: &Path) -> io::Result<Netns> {
        Ok(Netns {
            file: File::open(path)?,
            path: path.to_path_buf(),
        })
    }

    /// The namespace's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn nl(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> CniError {
    let action = action.into();
    move |source| CniError::Netlink { action, source }
}

/// A netlink handle in the current network namespace (its connection runs on the current tokio
/// runtime).
pub fn handle_here() -> Result<Handle, CniError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| CniError::Io {
        what: "open a netlink socket".into(),
        source,
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink handle whose socket lives in `netns`.
pub fn handle_in(netns: &Netns) -> Result<Handle, CniError> {
    let ns_err = |source: io::Error| CniError::Netns {
        path: netns.path.clone(),
        source,
    };
    let home = File::open("/proc/thread-self/ns/net").map_err(ns_err)?;
    setns(&netns.file, CloneFlags::CLONE_NEWNET).map_err(|e| ns_err(e.into()))?;
    let opened = rtnetlink::new_connection();
    if let Err(e) = setns(&home, CloneFlags::CLONE_NEWNET) {
        // Staying in the pod's namespace would make every later host-side step act on the pod.
        eprintln!("skiff-cni: cannot return to the original network namespace: {e}");
        std::process::exit(2);
    }
    let (conn, handle, _) = opened.map_err(|source| CniError::Io {
        what: format!("open a netlink socket in {}", netns.path.display()),
        source,
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The link named `name`, if it exists.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, CniError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if netlink_errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("look up link {name}"))(e)),
    }
}

/// Every link of the namespace.
pub async fn all_links(handle: &Handle) -> Result<Vec<LinkMessage>, CniError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list links"))
}

/// The name of a link message.
pub fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// The alias of a link message.
pub fn link_alias(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(n) => Some(n.as_str()),
        _ => None,
    })
}

/// The MAC address of a link message.
pub fn link_mac(link: &LinkMessage) -> Option<&[u8]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    })
}

fn link_is_veth(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
        _ => false,
    })
}

/// What to wire.
#[derive(Debug, Clone)]
pub struct WireSpec {
    /// The network name (for the host veth's alias).
    pub network: String,
    /// The attachment.
    pub attachment: Attachment,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// MTU of both ends.
    pub mtu: u32,
}

/// What [`wire`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wired {
    /// Host-side veth name.
    pub host_ifname: String,
    /// Pod-side MAC address.
    pub pod_mac: String,
    /// Whether the pod's default route (via [`GATEWAY`]) goes through this interface (false for
    /// a second interface of a pod whose first one has it).
    pub default_route: bool,
}

/// Writes a sysctl of the current network namespace.
pub fn write_sysctl(path: &str, value: &str) -> Result<(), CniError> {
    fs::write(path, value).map_err(|source| CniError::Sysctl {
        path: PathBuf::from(path),
        value: value.to_string(),
        source,
    })
}

/// Reads a sysctl of the current network namespace (trimmed).
pub fn read_sysctl(path: &str) -> Result<String, CniError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| CniError::Sysctl {
            path: PathBuf::from(path),
            value: "(read)".to_string(),
            source,
        })
}

/// Creates the veth pair and configures both ends. The caller removes the host veth (and with
/// it the pod end) if this fails.
pub async fn wire(
    host: &Handle,
    pod: &Handle,
    netns: &Netns,
    spec: &WireSpec,
) -> Result<Wired, CniError> {
    let host_ifname = host_veth_name(&spec.attachment.container_id, &spec.attachment.ifname);
    let pod_ifname = spec.attachment.ifname.as_str();

    // A host veth left by an ADD that crashed half-way: its pod end is gone (the caller checked
    // that CNI_IFNAME is free in the namespace), so it is stale.
    if let Some(stale) = link_by_name(host, &host_ifname).await? {
        host.link()
            .del(stale.header.index)
            .execute()
            .await
            .map_err(nl(format!("delete stale veth {host_ifname}")))?;
    }

    let peer = LinkMessageBuilder::<LinkUnspec>::default()
        .name(pod_ifname)
        .mtu(spec.mtu)
        .setns_by_fd(netns.file.as_raw_fd())
        .build();
    let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_ifname.clone())
        .mtu(spec.mtu)
        .address(HOST_VETH_MAC.to_vec())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    host.link().add(veth).execute().await.map_err(|e| {
        if netlink_errno(&e) == Some(EEXIST) {
            CniError::InterfaceExists {
                ifname: format!("{host_ifname} or {pod_ifname}"),
                netns: netns.path.clone(),
            }
        } else {
            nl(format!("create veth pair {host_ifname} / {pod_ifname}"))(e)
        }
    })?;

    // Host end.
    let host_link =
        link_by_name(host, &host_ifname)
            .await?
            .ok_or_else(|| CniError::CheckFailed {
                reason: format!("veth {host_ifname} vanished right after creation"),
            })?;
    let host_index = host_link.header.index;
    write_sysctl(
        &format!("/proc/sys/net/ipv4/conf/{host_ifname}/proxy_arp"),
        "1",
    )?;
    write_sysctl(
        &format!("/proc/sys/net/ipv4/neigh/{host_ifname}/proxy_delay"),
        "0",
    )?;
    write_sysctl(
        &format!("/proc/sys/net/ipv4/conf/{host_ifname}/forwarding"),
        "1",
    )?;
    host.link()
        .set(
            LinkUnspec::new_with_index(host_index)
                .alias(host_veth_alias(&spec.network, &spec.attachment))
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("set {host_ifname} up")))?;

    // Pod end.
    let pod_link = link_by_name(pod, pod_ifname)
        .await?
        .ok_or_else(|| CniError::CheckFailed {
            reason: format!(
                "{pod_ifname} is missing from {} right after creation",
                netns.path.display()
            ),
        })?;
    let pod_index = pod_link.header.index;
    let pod_mac = link_mac(&pod_link).map(format_mac).unwrap_or_default();
    pod.address()
        .add(pod_index, IpAddr::V4(spec.ip), 32)
        .execute()
        .await
        .map_err(nl(format!("add {}/32 to {pod_ifname}", spec.ip)))?;
    pod.link()
        .set(LinkUnspec::new_with_index(pod_index).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {pod_ifname} up")))?;
    // A second interface of the same pod finds the gateway routes already there (through the
    // first one): the pod keeps them and this interface gets only its address.
    let default_route = add_pod_route(
        pod,
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(GATEWAY, 32)
            .output_interface(pod_index)
            .scope(RouteScope::Link)
            .build(),
        format!("add route {GATEWAY} dev {pod_ifname} scope link"),
    )
    .await?;
    pod.neighbours()
        .add(pod_index, IpAddr::V4(GATEWAY))
        .link_layer_address(&HOST_VETH_MAC)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("add neighbour {GATEWAY} on {pod_ifname}")))?;
    let default_route = default_route
        && add_pod_route(
            pod,
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(GATEWAY)
                .output_interface(pod_index)
                .build(),
            format!("add default route via {GATEWAY} dev {pod_ifname}"),
        )
        .await?;

    // The node's route to the pod (replacing one left by a stale attachment of the same address).
    host.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(spec.ip, 32)
                .output_interface(host_index)
                .scope(RouteScope::Link)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(nl(format!("add route {}/32 dev {host_ifname}", spec.ip)))?;

    Ok(Wired {
        host_ifname,
        pod_mac,
        default_route,
    })
}

/// Adds a route in the pod: `Ok(false)` when one to the same destination exists already.
async fn add_pod_route(
    pod: &Handle,
    route: RouteMessage,
    action: String,
) -> Result<bool, CniError> {
    match pod.route().add(route).execute().await {
        Ok(()) => Ok(true),
        Err(e) if netlink_errno(&e) == Some(EEXIST) => Ok(false),
        Err(e) => Err(nl(action)(e)),
    }
}

/// Deletes the host veth `name` (and so its pod end and the node's route over it); `Ok(false)`
/// when it does not exist.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool, CniError> {
    let Some(link) = link_by_name(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(link.header.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if netlink_errno(&e) == Some(ENODEV) => Ok(false),
        Err(e) => Err(nl(format!("delete link {name}"))(e)),
    }
}

/// Removes every host veth of `network` whose attachment is not in `valid`; returns the names
/// removed and the failures (it goes on past each).
pub async fn gc_host_veths(
    handle: &Handle,
    network: &str,
    valid: &HashSet<Attachment>,
) -> (Vec<String>, Vec<CniError>) {
    let mut removed = Vec::new();
    let mut failures = Vec::new();
    let links = match all_links(handle).await {
        Ok(l) => l,
        Err(e) => return (removed, vec![e]),
    };
    let prefix = format!("{ALIAS_PREFIX}{network}:");
    for link in links {
        let (Some(name), Some(alias)) = (link_name(&link), link_alias(&link)) else {
            continue;
        };
        if !name.starts_with(HOST_VETH_PREFIX) || !link_is_veth(&link) {
            continue;
        }
        let Some((container_id, ifname)) = alias
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split_once(':'))
        else {
            continue;
        };
        let attachment = Attachment {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        };
        if valid.contains(&attachment) {
            continue;
        }
        let name = name.to_string();
        match handle.link().del(link.header.index).execute().await {
            Ok(()) => removed.push(name),
            Err(e) if netlink_errno(&e) == Some(ENODEV) => {}
            Err(e) => failures.push(nl(format!("delete stale veth {name}"))(e)),
        }
    }
    (removed, failures)
}

/// IPv4 routes of the main table.
async fn main_routes(handle: &Handle) -> Result<Vec<RouteMessage>, CniError> {
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("list routes"))?;
    Ok(routes
        .into_iter()
        .filter(|r| {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            table == 254
        })
        .collect())
}

fn route_matches(
    r: &RouteMessage,
    dst: Ipv4Addr,
    prefix: u8,
    gw: Option<Ipv4Addr>,
    oif: u32,
) -> bool {
    let mut r_dst = None;
    let mut r_gw = None;
    let mut r_oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => r_dst = Some(*d),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => r_gw = Some(*g),
            RouteAttribute::Oif(o) => r_oif = Some(*o),
            _ => {}
        }
    }
    r.header.destination_prefix_length == prefix
        && r_dst.unwrap_or(Ipv4Addr::UNSPECIFIED) == dst
        && r_gw == gw
        && r_oif == Some(oif)
}

/// CHECK: verifies both ends, the pod's address and routes, and the node's route.
pub async fn check(
    host: &Handle,
    pod: &Handle,
    netns: &Netns,
    attachment: &Attachment,
    ip: Ipv4Addr,
    default_route: bool,
) -> Result<(), CniError> {
    let failed = |reason: String| CniError::CheckFailed { reason };
    let host_ifname = host_veth_name(&attachment.container_id, &attachment.ifname);
    let ifname = attachment.ifname.as_str();
    let ns = netns.path.display();

    let host_link = link_by_name(host, &host_ifname)
        .await?
        .ok_or_else(|| failed(format!("host veth {host_ifname} does not exist")))?;
    if !host_link.header.flags.contains(LinkFlags::Up) {
        return Err(failed(format!("host veth {host_ifname} is down")));
    }
    if link_mac(&host_link) != Some(&HOST_VETH_MAC[..]) {
        return Err(failed(format!(
            "host veth {host_ifname} has MAC {} instead of {}",
            link_mac(&host_link).map(format_mac).unwrap_or_default(),
            format_mac(&HOST_VETH_MAC)
        )));
    }
    let proxy_arp = read_sysctl(&format!("/proc/sys/net/ipv4/conf/{host_ifname}/proxy_arp"))?;
    if proxy_arp != "1" {
        return Err(failed(format!(
            "proxy_arp is {proxy_arp} on {host_ifname}, not 1"
        )));
    }
    let host_routes = main_routes(host).await?;
    if !host_routes
        .iter()
        .any(|r| route_matches(r, ip, 32, None, host_link.header.index))
    {
        return Err(failed(format!(
            "node has no route {ip}/32 dev {host_ifname}"
        )));
    }

    let pod_link = link_by_name(pod, ifname)
        .await?
        .ok_or_else(|| failed(format!("{ifname} does not exist in {ns}")))?;
    if !pod_link.header.flags.contains(LinkFlags::Up) {
        return Err(failed(format!("{ifname} is down in {ns}")));
    }
    let index = pod_link.header.index;
    let addresses: Vec<_> = pod
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("list addresses of {ifname}")))?;
    let has_ip = addresses.iter().any(|m| {
        m.header.prefix_len == 32
            && m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(v)) if *v == ip))
    });
    if !has_ip {
        return Err(failed(format!("{ifname} in {ns} does not have {ip}/32")));
    }
    if !default_route {
        return Ok(());
    }
    let routes = main_routes(pod).await?;
    if !routes
        .iter()
        .any(|r| route_matches(r, GATEWAY, 32, None, index))
    {
        return Err(failed(format!("{ns} has no route {GATEWAY} dev {ifname}")));
    }
    if !routes
        .iter()
        .any(|r| route_matches(r, Ipv4Addr::UNSPECIFIED, 0, Some(GATEWAY), index))
    {
        return Err(failed(format!(
            "{ns} has no default route via {GATEWAY} dev {ifname}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_name_is_skf_and_11_hex_of_sha256() {
        // Compared with sha256("abc/eth0") as computed by coreutils' sha256sum.
        let name = host_veth_name("abc", "eth0");
        assert_eq!(name.len(), 14, "{name}");
        assert!(name.starts_with("skf"));
        assert_eq!(name, format!("skf{}", expected_hex("abc/eth0")));
        assert_ne!(host_veth_name("abc", "eth1"), name);
    }

    fn expected_hex(input: &str) -> String {
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().expect("stdin").write_all(input.as_bytes())?;
                c.wait_with_output()
            })
            .expect("run sha256sum");
        String::from_utf8(out.stdout).expect("utf8")[..11].to_string()
    }

    #[test]
    fn mac_formatting() {
        assert_eq!(format_mac(&HOST_VETH_MAC), "ee:ee:ee:ee:ee:ee");
        assert_eq!(format_mac(&[0, 1, 0xab]), "00:01:ab");
    }
}
