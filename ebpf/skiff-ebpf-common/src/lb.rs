//! Service load balancing: the frontend, slot, backend, affinity, conntrack, node-config,
//! L2-announcement, statistics and error maps shared by the programs and the agent.
//!
//! How a packet to a Service is translated (the programs in `ebpf/skiff-ebpf`):
//!
//! 1. Its tuple is looked up in conntrack ([`CT_MAP`]): a hit gives the translation of that
//!    connection (forward: to the backend; reverse: a reply made to look like it comes from the
//!    Service).
//! 2. Otherwise its destination is looked up in [`LB_FRONTEND_MAP`] (for a node address, with
//!    the address `0.0.0.0` too: the NodePort entry). The frontend names a service port
//!    ([`FrontendValue::service`]), the revision of its backends in force and their count.
//! 3. A slot `rand % count` (or among the first `local` ones) is read from [`LB_SLOT_MAP`] under
//!    that revision: the backend's address and port. Both conntrack entries are written before
//!    the packet is rewritten; a full map drops the packet and counts the error.
//!
//! The agent never changes a slot in place: it writes every slot of a new revision, then switches
//! each frontend to it with one update, then deletes the old revision's slots. A packet therefore
//! sees a service's old backends or its new ones, never a mix.
//!
//! Addresses and ports are in network byte order (as in the packet); every other integer is in
//! host byte order.

use core::mem::size_of;

/// Frontends: key [`FrontendKey`], value [`FrontendValue`] (hash, `BPF_F_NO_PREALLOC`).
pub const LB_FRONTEND_MAP: &str = "SKF_LBFE_V1";
/// Backend slots: key [`SlotKey`], value [`SlotValue`] (hash, `BPF_F_NO_PREALLOC`).
pub const LB_SLOT_MAP: &str = "SKF_LBSLOT_V1";
/// The backends each service port has now, whatever the revision: key [`BackendKey`], value
/// [`BackendValue`] (hash, `BPF_F_NO_PREALLOC`). A conntrack entry whose backend is no longer
/// here is dropped and the connection balanced again.
pub const LB_BACKEND_MAP: &str = "SKF_LBBE_V1";
/// Who a service port is, written by the agent only, read by `skiffctl`: key the service id
/// (`u32`), value [`ServiceIdentityValue`].
pub const LB_SERVICE_MAP: &str = "SKF_LBSVC_V1";
/// Session affinity (`sessionAffinity: ClientIP`): key [`AffinityKey`], value
/// [`AffinityValue`] (LRU hash).
pub const LB_AFFINITY_MAP: &str = "SKF_LBAFF_V1";
/// Per-frontend packets and bytes, per CPU: key the frontend id (`u32`), value
/// [`FrontendStatsValue`] (per-CPU hash, `BPF_F_NO_PREALLOC`).
pub const LB_STATS_MAP: &str = "SKF_LBSTAT_V1";
/// Connection tracking for translated connections: key [`CtKey`], value [`CtValue`] (hash; not
/// LRU, so that a full table is an error that is counted, never a connection silently evicted).
pub const CT_MAP: &str = "SKF_CT_V1";
/// The node's own settings: one [`NodeConfig`] at index 0 (array).
pub const NODE_CONFIG_MAP: &str = "SKF_NODECFG_V1";
/// The LoadBalancer IPs this node answers ARP for: key the address (`[u8; 4]`), value
/// [`L2AnnounceValue`] (hash).
pub const L2_ANNOUNCE_MAP: &str = "SKF_L2ANN_V1";
/// Errors and notable events the programs count, per CPU: index an `ERR_*` constant, value `u64`
/// (per-CPU array of [`ERROR_KINDS`] entries).
pub const ERRORS_MAP: &str = "SKF_ERRORS_V1";

const _: () = assert!(LB_FRONTEND_MAP.len() <= 15);
const _: () = assert!(LB_SLOT_MAP.len() <= 15);
const _: () = assert!(LB_BACKEND_MAP.len() <= 15);
const _: () = assert!(LB_SERVICE_MAP.len() <= 15);
const _: () = assert!(LB_AFFINITY_MAP.len() <= 15);
const _: () = assert!(LB_STATS_MAP.len() <= 15);
const _: () = assert!(CT_MAP.len() <= 15);
const _: () = assert!(NODE_CONFIG_MAP.len() <= 15);
const _: () = assert!(L2_ANNOUNCE_MAP.len() <= 15);
const _: () = assert!(ERRORS_MAP.len() <= 15);

/// Default capacity of [`LB_FRONTEND_MAP`] (and of the statistics): frontends per node.
pub const DEFAULT_MAX_FRONTENDS: u32 = 65_536;
/// Default capacity of [`LB_SLOT_MAP`] and [`LB_BACKEND_MAP`]: backends over all service ports
/// (twice what one revision needs, so that a full resync fits beside the old revisions).
pub const DEFAULT_MAX_SLOTS: u32 = 262_144;
/// Default capacity of [`LB_SERVICE_MAP`]: service ports per node.
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
/// Default capacity of [`CT_MAP`]: a translated connection takes two entries.
pub const DEFAULT_MAX_CT: u32 = 131_072;
/// Default capacity of [`LB_AFFINITY_MAP`].
pub const DEFAULT_MAX_AFFINITY: u32 = 65_536;
/// Capacity of [`L2_ANNOUNCE_MAP`]: LoadBalancer IPs one node announces.
pub const MAX_L2_ANNOUNCE: u32 = 4096;

/// The tc program at the ingress of the node's uplink: NodePort, LoadBalancer and external IPs
/// from outside, replies of translated connections, and ARP for the announced IPs.
pub const NODE_INGRESS_PROG: &str = "skf_uplink_in";
/// The tc program at the ingress of `skfsvc1`, the far end of the veth pair the node routes the
/// service range into: Services reached from the node's own network namespace.
pub const HOST_SERVICE_PROG: &str = "skf_host_svc";

const _: () = assert!(NODE_INGRESS_PROG.len() <= 15);
const _: () = assert!(HOST_SERVICE_PROG.len() <= 15);

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// A frontend: where a Service is reached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// The address (network order); `0.0.0.0` is a NodePort: any address of this node.
    pub addr: [u8; 4],
    /// The port (network order).
    pub port: [u8; 2],
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Zero.
    pub _pad: u8,
}

const _: () = assert!(size_of::<FrontendKey>() == 8);

/// A ClusterIP frontend.
pub const KIND_CLUSTER_IP: u8 = 1;
/// A NodePort frontend (address `0.0.0.0`).
pub const KIND_NODE_PORT: u8 = 2;
/// A LoadBalancer ingress IP.
pub const KIND_LOAD_BALANCER: u8 = 3;
/// One of `spec.externalIPs`.
pub const KIND_EXTERNAL_IP: u8 = 4;

/// `internalTrafficPolicy: Local` on a ClusterIP frontend: only this node's backends, whoever
/// the client is.
pub const FE_F_LOCAL_INTERNAL: u16 = 1;
/// `externalTrafficPolicy: Local` on a NodePort, LoadBalancer or external IP frontend: only this
/// node's backends and the client's address kept, for traffic from outside the node.
pub const FE_F_LOCAL_EXTERNAL: u16 = 2;

/// What a frontend leads to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendValue {
    /// The service port's id (the slots' and backends' key).
    pub service: u32,
    /// The revision of the slots in force.
    pub rev: u32,
    /// Slots `0..count` hold backends; 0: the Service has none (refused with ICMP).
    pub count: u16,
    /// Slots `0..local` are this node's backends.
    pub local: u16,
    /// `FE_F_*` bits.
    pub flags: u16,
    /// `KIND_*`.
    pub kind: u8,
    /// Zero.
    pub _pad: u8,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`; 0: no affinity.
    pub affinity_timeout: u32,
    /// The frontend's id: its statistics' key.
    pub id: u32,
}

const _: () = assert!(size_of::<FrontendValue>() == 24);

/// A backend slot of a service port under one revision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// The service port's id.
    pub service: u32,
    /// The revision.
    pub rev: u32,
    /// `0..count`.
    pub ordinal: u32,
}

const _: () = assert!(size_of::<SlotKey>() == 12);

/// The backend is on this node.
pub const BE_F_LOCAL: u8 = 1;
/// The backend is terminating (`serving` but not `ready`): used only when no ready one is left.
pub const BE_F_TERMINATING: u8 = 2;

/// A backend in a slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotValue {
    /// The backend's address (network order).
    pub addr: [u8; 4],
    /// The backend's port (network order).
    pub port: [u8; 2],
    /// `BE_F_*` bits.
    pub flags: u8,
    /// Zero.
    pub _pad: u8,
    /// The revision again: the program checks it against the frontend's after copying the value
    /// (a freed element can be reused by another key while a reader holds it).
    pub rev: u32,
}

const _: () = assert!(size_of::<SlotValue>() == 12);

/// A backend of a service port, whatever the revision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// The service port's id.
    pub service: u32,
    /// The backend's address (network order).
    pub addr: [u8; 4],
    /// The backend's port (network order).
    pub port: [u8; 2],
    /// Zero.
    pub _pad: [u8; 2],
}

const _: () = assert!(size_of::<BackendKey>() == 12);

/// What is known of a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendValue {
    /// `BE_F_*` bits.
    pub flags: u32,
    /// Zero.
    pub _pad: u32,
}

const _: () = assert!(size_of::<BackendValue>() == 8);

/// Length of the strings of [`ServiceIdentityValue`]: a DNS label (63 bytes) and its NUL.
pub const LABEL_LEN: usize = 64;

/// Who a service port is: `namespace/name:port_name`. Strings as in
/// [`crate::PodIdentityValue`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceIdentityValue {
    /// The Service's namespace.
    pub namespace: [u8; LABEL_LEN],
    /// The Service's name.
    pub name: [u8; LABEL_LEN],
    /// The port's name (empty for an unnamed port).
    pub port_name: [u8; LABEL_LEN],
}

const _: () = assert!(size_of::<ServiceIdentityValue>() == 192);

impl ServiceIdentityValue {
    /// All strings empty.
    pub const ZERO: Self = Self {
        namespace: [0; LABEL_LEN],
        name: [0; LABEL_LEN],
        port_name: [0; LABEL_LEN],
    };
}

/// A client of a service port with session affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityKey {
    /// The client's address (network order).
    pub client: [u8; 4],
    /// The service port's id.
    pub service: u32,
}

const _: () = assert!(size_of::<AffinityKey>() == 8);

/// The backend a client sticks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// The backend's address (network order).
    pub addr: [u8; 4],
    /// The backend's port (network order).
    pub port: [u8; 2],
    /// Zero.
    pub _pad: [u8; 2],
    /// `bpf_ktime_get_ns` when it was last used (CLOCK_MONOTONIC).
    pub last_used_ns: u64,
}

const _: () = assert!(size_of::<AffinityValue>() == 16);

/// Packets and bytes of one frontend, on one CPU (forward direction only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendStatsValue {
    /// Packets.
    pub packets: u64,
    /// Bytes (`skb->len`, the Ethernet header included).
    pub bytes: u64,
}

const _: () = assert!(size_of::<FrontendStatsValue>() == 16);

/// A connection's tuple as one packet carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Source address (network order).
    pub saddr: [u8; 4],
    /// Destination address (network order).
    pub daddr: [u8; 4],
    /// Source port (network order).
    pub sport: [u8; 2],
    /// Destination port (network order).
    pub dport: [u8; 2],
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Zero.
    pub _pad: [u8; 3],
}

const _: () = assert!(size_of::<CtKey>() == 16);

/// The entry of the client's direction: rewrite to the backend.
pub const CT_FORWARD: u8 = 1;
/// The entry of the backend's replies: rewrite back to the frontend.
pub const CT_REVERSE: u8 = 2;

/// The source was rewritten too (to the node, for a remote backend of a NodePort; to
/// [`HAIRPIN_IP`] for a pod reaching itself).
pub const CT_F_SNAT: u8 = 1;
/// A pod reaching itself through its Service.
pub const CT_F_HAIRPIN: u8 = 2;

/// TCP flags accumulated in [`CtValue::tcp_flags`] (as in the TCP header).
pub const TCP_FIN: u8 = 0x01;
/// See [`TCP_FIN`].
pub const TCP_SYN: u8 = 0x02;
/// See [`TCP_FIN`].
pub const TCP_RST: u8 = 0x04;
/// See [`TCP_FIN`].
pub const TCP_ACK: u8 = 0x10;

/// One direction of a translated connection. A packet matching the key gets its source and
/// destination replaced by `nat_saddr:nat_sport` and `nat_daddr:nat_dport`; the other
/// direction's key is `{nat_daddr, nat_saddr, nat_dport, nat_sport}`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// New source address (network order).
    pub nat_saddr: [u8; 4],
    /// New destination address (network order).
    pub nat_daddr: [u8; 4],
    /// New source port (network order).
    pub nat_sport: [u8; 2],
    /// New destination port (network order).
    pub nat_dport: [u8; 2],
    /// The frontend's id.
    pub frontend: u32,
    /// The service port's id.
    pub service: u32,
    /// [`CT_FORWARD`] or [`CT_REVERSE`].
    pub kind: u8,
    /// TCP flags seen in this direction (OR of the headers').
    pub tcp_flags: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// Zero.
    pub _pad: u8,
    /// `bpf_ktime_get_ns` at creation (CLOCK_MONOTONIC).
    pub created_ns: u64,
    /// `bpf_ktime_get_ns` of the last packet in this direction.
    pub last_seen_ns: u64,
}

const _: () = assert!(size_of::<CtValue>() == 40);

impl CtKey {
    /// The key of the other direction of the connection `self` translates with `value`.
    pub const fn other_direction(&self, value: &CtValue) -> CtKey {
        CtKey {
            saddr: value.nat_daddr,
            daddr: value.nat_saddr,
            sport: value.nat_dport,
            dport: value.nat_sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// The address a pod reaching itself through its Service sees as the source (link-local, and not
/// the pods' gateway 169.254.1.1). It never leaves the node.
pub const HAIRPIN_IP: [u8; 4] = [169, 254, 42, 1];
/// The fake next hop of the service route in the node's namespace (a permanent neighbour on
/// `skfsvc0`).
pub const HOST_SERVICE_GATEWAY: [u8; 4] = [169, 254, 42, 2];
/// Where the agent sends a gratuitous-ARP trigger: a UDP datagram to this address and
/// [`GARP_TRIGGER_PORT`], routed into the service veth, whose 4-byte payload is a LoadBalancer IP
/// this node announces; `skf_host_svc` turns it into a gratuitous ARP request out of the uplink.
pub const GARP_TRIGGER_IP: [u8; 4] = [169, 254, 42, 3];
/// See [`GARP_TRIGGER_IP`].
pub const GARP_TRIGGER_PORT: u16 = 9;
/// The node-side end of the service veth pair: the route to the service range goes through it.
pub const HOST_SERVICE_IFNAME: &str = "skfsvc0";
/// The far end, where [`HOST_SERVICE_PROG`] translates.
pub const HOST_SERVICE_PEER_IFNAME: &str = "skfsvc1";
/// Source ports for connections to a NodePort's remote backend, translated to the node's
/// address: above Linux's default ephemeral range (32768–60999), so that they never meet the
/// node's own connections.
pub const SNAT_PORT_MIN: u16 = 61_000;
/// See [`SNAT_PORT_MIN`].
pub const SNAT_PORT_MAX: u16 = 65_535;

/// The programs translate (the agent sets it once the maps are in sync after a start).
pub const CFG_F_ENABLED: u32 = 1;

/// The node's own settings, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's InternalIP (network order): NodePorts answer on it, and remote backends of
    /// NodePorts see it as the source.
    pub node_ip: [u8; 4],
    /// The uplink's interface index.
    pub uplink_ifindex: u32,
    /// The uplink's MAC address (for ARP replies).
    pub uplink_mac: [u8; 6],
    /// Zero.
    pub _pad: [u8; 2],
    /// `CFG_F_*` bits.
    pub flags: u32,
    /// Zero.
    pub _pad2: u32,
}

const _: () = assert!(size_of::<NodeConfig>() == 24);

/// An announced LoadBalancer IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2AnnounceValue {
    /// The interface the address is announced on.
    pub ifindex: u32,
    /// Zero.
    pub _pad: u32,
}

const _: () = assert!(size_of::<L2AnnounceValue>() == 8);

/// A conntrack entry could not be created (the table is full): the packet was dropped.
pub const ERR_CT_FULL: u32 = 0;
/// A slot the frontend promises was missing or of another revision: the packet was dropped.
pub const ERR_SLOT_MISSING: u32 = 1;
/// A packet could not be rewritten (a helper failed): it was dropped.
pub const ERR_REWRITE: u32 = 2;
/// No free source port for a NodePort connection to a remote backend: the packet was dropped.
pub const ERR_NAT_PORTS: u32 = 3;
/// A frontend's statistics entry could not be created (not counted).
pub const ERR_STATS_FULL: u32 = 4;
/// A pod's counters entry could not be created (not counted).
pub const ERR_POD_COUNTERS_FULL: u32 = 5;
/// An affinity entry could not be written (the connection was balanced anyway).
pub const ERR_AFFINITY: u32 = 6;
/// A packet for a Service without backends (answered with ICMP port unreachable).
pub const EV_NO_BACKEND: u32 = 7;
/// A packet for a Service without local backends under a Local traffic policy (dropped).
pub const EV_NO_LOCAL_BACKEND: u32 = 8;
/// An ICMP port unreachable could not be built (the packet was dropped instead).
pub const ERR_ICMP: u32 = 9;
/// ARP requests answered for announced LoadBalancer IPs, and gratuitous ARPs sent for them.
pub const EV_ARP_REPLIES: u32 = 10;
/// New translated connections.
pub const EV_CT_CREATED: u32 = 11;
/// The route lookup for a packet the program sends on itself failed (it was dropped).
pub const ERR_FIB: u32 = 12;
/// How many `ERR_*`/`EV_*` indexes there are.
pub const ERROR_KINDS: u32 = 13;

/// The name of each index of [`ERRORS_MAP`], for metrics.
pub const ERROR_NAMES: [&str; ERROR_KINDS as usize] = [
    "ct_full",
    "slot_missing",
    "rewrite_failed",
    "nat_ports_exhausted",
    "stats_full",
    "pod_counters_full",
    "affinity_failed",
    "no_backend",
    "no_local_backend",
    "icmp_failed",
    "arp_replies",
    "ct_created",
    "fib_lookup_failed",
];
