//! The node's side of service load balancing, through rtnetlink: the uplink (the interface that
//! holds the node's InternalIP, where `skf_uplink_in` is attached) and the route that takes the
//! node's own traffic to the service range into `skf_host_svc`.
//!
//! ```text
//!  node process ──> route <service-cidr> via 169.254.42.2 dev skfsvc0 onlink src <node-ip>
//!                   skfsvc0 ══ veth ══ skfsvc1 (tc ingress: skf_host_svc translates, then
//!                                      redirects to the backend's device)
//! ```
//!
//! 169.254.42.2 is a permanent neighbour on `skfsvc0` with `skfsvc1`'s MAC address, so nothing
//! waits for ARP. Everything here is idempotent.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use skiff_ebpf_common::lb::{
    GARP_TRIGGER_IP, GARP_TRIGGER_PORT, HOST_SERVICE_GATEWAY, HOST_SERVICE_IFNAME,
    HOST_SERVICE_PEER_IFNAME,
};

/// What can go wrong here.
#[derive(Debug, thiserror::Error)]
pub enum HostPathError {
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket")]
    Socket {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("cannot {action}")]
    Netlink {
        /// What was being done.
        action: String,
        /// Why.
        #[source]
        source: rtnetlink::Error,
    },
    /// No interface holds the node's address.
    #[error("no interface holds the node address {ip}; name the uplink with --uplink")]
    NoUplink {
        /// The node's address.
        ip: Ipv4Addr,
    },
    /// The named uplink does not exist.
    #[error("no interface named {name} (--uplink)")]
    NoInterface {
        /// The name.
        name: String,
    },
}

fn nl(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> HostPathError {
    let action = action.into();
    move |source| HostPathError::Netlink { action, source }
}

/// The node's uplink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    /// Its name.
    pub name: String,
    /// Its interface index.
    pub index: u32,
    /// Its MAC address.
    pub mac: [u8; 6],
}

fn handle() -> Result<Handle, HostPathError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|source| HostPathError::Socket { source })?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, HostPathError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -nix::libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("look up link {name}"))(e)),
    }
}

fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn link_mac(link: &LinkMessage) -> [u8; 6] {
    let mut mac = [0; 6];
    if let Some(addr) = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) if m.len() == 6 => Some(m.clone()),
        _ => None,
    }) {
        mac.copy_from_slice(&addr);
    }
    mac
}

/// The uplink: `name` when given, else the interface holding `node_ip`.
pub async fn find_uplink(node_ip: Ipv4Addr, name: Option<&str>) -> Result<Uplink, HostPathError> {
    let handle = handle()?;
    let link = match name {
        Some(name) => {
            link_by_name(&handle, name)
                .await?
                .ok_or_else(|| HostPathError::NoInterface {
                    name: name.to_owned(),
                })?
        }
        None => {
            let addresses: Vec<_> = handle
                .address()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(nl("list addresses"))?;
            let index = addresses
                .iter()
                .find(|a| {
                    a.attributes.iter().any(|attr| {
                        matches!(attr, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == node_ip)
                    })
                })
                .map(|a| a.header.index)
                .ok_or(HostPathError::NoUplink { ip: node_ip })?;
            handle
                .link()
                .get()
                .match_index(index)
                .execute()
                .try_next()
                .await
                .map_err(nl(format!("look up link {index}")))?
                .ok_or(HostPathError::NoUplink { ip: node_ip })?
        }
    };
    Ok(Uplink {
        name: link_name(&link),
        index: link.header.index,
        mac: link_mac(&link),
    })
}

/// Creates (or checks) the service veth pair, its neighbour and the route of `service_cidr`
/// through it with `node_ip` as the source. Returns the far end's name, where `skf_host_svc`
/// goes.
pub async fn ensure(service_cidr: Ipv4Network, node_ip: Ipv4Addr) -> Result<String, HostPathError> {
    let handle = handle()?;
    if link_by_name(&handle, HOST_SERVICE_IFNAME).await?.is_none() {
        let peer = LinkMessageBuilder::<LinkUnspec>::default()
            .name(HOST_SERVICE_PEER_IFNAME)
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(HOST_SERVICE_IFNAME.to_owned())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        handle.link().add(veth).execute().await.map_err(nl(format!(
            "create the veth pair {HOST_SERVICE_IFNAME} / {HOST_SERVICE_PEER_IFNAME}"
        )))?;
    }
    let near = link_by_name(&handle, HOST_SERVICE_IFNAME)
        .await?
        .ok_or_else(|| HostPathError::NoInterface {
            name: HOST_SERVICE_IFNAME.to_owned(),
        })?;
    let far = link_by_name(&handle, HOST_SERVICE_PEER_IFNAME)
        .await?
        .ok_or_else(|| HostPathError::NoInterface {
            name: HOST_SERVICE_PEER_IFNAME.to_owned(),
        })?;
    for link in [&near, &far] {
        handle
            .link()
            .set(LinkUnspec::new_with_index(link.header.index).up().build())
            .execute()
            .await
            .map_err(nl(format!("set {} up", link_name(link))))?;
    }
    let gateway = Ipv4Addr::from(HOST_SERVICE_GATEWAY);
    handle
        .neighbours()
        .add(near.header.index, IpAddr::V4(gateway))
        .link_layer_address(&link_mac(&far))
        .replace()
        .execute()
        .await
        .map_err(nl(format!(
            "add the neighbour {gateway} on {HOST_SERVICE_IFNAME}"
        )))?;
    route_through(
        &handle,
        service_cidr,
        gateway,
        near.header.index,
        Some(node_ip),
    )
    .await?;
    // The agent's gratuitous-ARP triggers take the same way.
    let trigger = Ipv4Network::new(Ipv4Addr::from(GARP_TRIGGER_IP), 32).expect("a /32");
    route_through(&handle, trigger, gateway, near.header.index, None).await?;
    Ok(HOST_SERVICE_PEER_IFNAME.to_owned())
}

/// Routes `dst` via `gateway` on the interface `index` (on-link), with `source` as the preferred
/// source address; replaces a route there already.
async fn route_through(
    handle: &Handle,
    dst: Ipv4Network,
    gateway: Ipv4Addr,
    index: u32,
    source: Option<Ipv4Addr>,
) -> Result<(), HostPathError> {
    let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix())
        .gateway(gateway)
        .output_interface(index)
        .onlink();
    if let Some(source) = source {
        route = route.pref_source(source);
    }
    handle
        .route()
        .add(route.build())
        .replace()
        .execute()
        .await
        .map_err(nl(format!("route {dst} through {HOST_SERVICE_IFNAME}")))
}

/// Has `skf_host_svc` send a gratuitous ARP for `ip` out of the uplink, `times` times a second
/// apart (the first at once), as MetalLB does after taking an address over: neighbours that
/// ignored one (Linux's `locktime`) take a later one.
pub async fn gratuitous_arp(ip: Ipv4Addr, times: usize) {
    let socket = match tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await {
        Ok(socket) => socket,
        Err(error) => {
            tracing::warn!(%ip, %error, "cannot send gratuitous ARP");
            return;
        }
    };
    let target = (Ipv4Addr::from(GARP_TRIGGER_IP), GARP_TRIGGER_PORT);
    for round in 0..times {
        if round > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        if let Err(error) = socket.send_to(&ip.octets(), target).await {
            tracing::warn!(%ip, %error, "cannot send gratuitous ARP");
        }
    }
}
