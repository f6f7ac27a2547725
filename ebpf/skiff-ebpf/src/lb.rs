//! Per-packet service load balancing at tc: conntrack, frontend, slot, translation.
//!
//! [`translate`] is shared by the three hooks that see traffic to Services: a pod's host-side
//! veth ingress ([`From::Pod`]), the node's uplink ingress ([`From::Netdev`]) and the service
//! veth's far end ([`From::Host`], the node's own processes). It returns the tc action:
//! `TCX_NEXT` to hand the (possibly rewritten) packet on to the kernel, `TC_ACT_SHOT` to drop it,
//! `TC_ACT_REDIRECT` when it was redirected (a translated packet goes straight to its egress
//! device, past netfilter; see `redirect_out`).
//!
//! Every failure is counted in `SKF_ERRORS_V1`; none is silent.

use aya_ebpf::bindings::tcx_action_base::TCX_NEXT;
use aya_ebpf::bindings::{
    BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, TC_ACT_SHOT, bpf_fib_lookup as FibLookup,
};
use aya_ebpf::helpers::r#gen::{
    bpf_csum_diff, bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect,
    bpf_redirect_neigh, bpf_skb_change_tail,
};
use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap};
use aya_ebpf::programs::TcContext;
use skiff_ebpf_common::lb::*;
use skiff_ebpf_common::str_eq;

const _: () = assert!(str_eq(LB_FRONTEND_MAP, "SKF_LBFE_V1"));
const _: () = assert!(str_eq(LB_SLOT_MAP, "SKF_LBSLOT_V1"));
const _: () = assert!(str_eq(LB_BACKEND_MAP, "SKF_LBBE_V1"));
const _: () = assert!(str_eq(LB_SERVICE_MAP, "SKF_LBSVC_V1"));
const _: () = assert!(str_eq(LB_AFFINITY_MAP, "SKF_LBAFF_V1"));
const _: () = assert!(str_eq(LB_STATS_MAP, "SKF_LBSTAT_V1"));
const _: () = assert!(str_eq(CT_MAP, "SKF_CT_V1"));
const _: () = assert!(str_eq(NODE_CONFIG_MAP, "SKF_NODECFG_V1"));
const _: () = assert!(str_eq(L2_ANNOUNCE_MAP, "SKF_L2ANN_V1"));
const _: () = assert!(str_eq(ERRORS_MAP, "SKF_ERRORS_V1"));

/// `BPF_F_NO_PREALLOC`: elements are allocated on update, so a replaced value is not recycled
/// under a reader at once.
const NO_PREALLOC: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
/// `-EEXIST`.
const EEXIST: i64 = -17;

// Sizes here are the defaults; the agent sets the flags' values when it creates the maps.
#[map(name = "SKF_LBFE_V1")]
static FRONTENDS: HashMap<FrontendKey, FrontendValue> =
    HashMap::pinned(DEFAULT_MAX_FRONTENDS, NO_PREALLOC);

#[map(name = "SKF_LBSLOT_V1")]
static SLOTS: HashMap<SlotKey, SlotValue> = HashMap::pinned(DEFAULT_MAX_SLOTS, NO_PREALLOC);

#[map(name = "SKF_LBBE_V1")]
static BACKENDS: HashMap<BackendKey, BackendValue> =
    HashMap::pinned(DEFAULT_MAX_SLOTS, NO_PREALLOC);

/// Written and read by the agent only; declared here so that it is created and pinned with the
/// others.
#[map(name = "SKF_LBSVC_V1")]
static SERVICES: HashMap<u32, ServiceIdentityValue> =
    HashMap::pinned(DEFAULT_MAX_SERVICES, NO_PREALLOC);

#[map(name = "SKF_LBAFF_V1")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(DEFAULT_MAX_AFFINITY, 0);

#[map(name = "SKF_LBSTAT_V1")]
static STATS: PerCpuHashMap<u32, FrontendStatsValue> =
    PerCpuHashMap::pinned(DEFAULT_MAX_FRONTENDS, NO_PREALLOC);

#[map(name = "SKF_CT_V1")]
static CT: HashMap<CtKey, CtValue> = HashMap::pinned(DEFAULT_MAX_CT, 0);

#[map(name = "SKF_NODECFG_V1")]
static CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

#[map(name = "SKF_L2ANN_V1")]
static L2_ANNOUNCE: HashMap<[u8; 4], L2AnnounceValue> = HashMap::pinned(MAX_L2_ANNOUNCE, 0);

#[map(name = "SKF_ERRORS_V1")]
static ERRORS: PerCpuArray<u64> = PerCpuArray::pinned(ERROR_KINDS, 0);

/// The LoadBalancer IP `addr` is announced on `ifindex` by this node.
#[inline(always)]
pub fn announces(addr: &[u8; 4], ifindex: u32) -> bool {
    match L2_ANNOUNCE.get_ptr(addr) {
        // SAFETY: a pointer from a successful lookup, read once.
        Some(value) => unsafe { (*value).ifindex == ifindex },
        None => false,
    }
}

/// The node's settings, when the agent has enabled translation.
#[inline(always)]
pub fn config() -> Option<NodeConfig> {
    let config = *CONFIG.get(0)?;
    (config.flags & CFG_F_ENABLED != 0).then_some(config)
}

/// Counts one error or event.
#[inline(always)]
pub fn count(kind: u32) {
    if let Some(slot) = ERRORS.get_ptr_mut(kind) {
        // SAFETY: a per-CPU slot, touched by this CPU only, from a successful lookup.
        unsafe { *slot = (*slot).wrapping_add(1) };
    }
}

/// Where a packet entered.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// A pod's host-side veth: the pod sent it.
    Pod,
    /// The node's uplink: from outside the node.
    Netdev,
    /// The service veth: the node's own processes.
    Host,
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_TTL_OFF: usize = ETH_HLEN + 8;
const IP_PROTO_OFF: usize = ETH_HLEN + 9;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
const TCP_FLAGS: usize = 13;

/// The parts of an IPv4 TCP or UDP packet the translation needs.
struct Packet {
    key: CtKey,
    l4_off: usize,
    tcp_flags: u8,
}

/// `None` for what is not IPv4 TCP or UDP with ports (non-first fragments included).
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    if ethertype != ETH_P_IP {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
    if frag & 0x1fff != 0 {
        return None;
    }
    let proto: u8 = ctx.load(IP_PROTO_OFF).ok()?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let l4_off = ETH_HLEN + ihl;
    let tcp_flags = if proto == PROTO_TCP {
        ctx.load::<u8>(l4_off + TCP_FLAGS).ok()?
    } else {
        0
    };
    Some(Packet {
        key: CtKey {
            saddr: ctx.load(IP_SRC_OFF).ok()?,
            daddr: ctx.load(IP_DST_OFF).ok()?,
            sport: ctx.load(l4_off).ok()?,
            dport: ctx.load(l4_off + 2).ok()?,
            proto,
            _pad: [0; 3],
        },
        l4_off,
        tcp_flags,
    })
}

/// See the module docs.
#[inline(always)]
pub fn translate(ctx: &mut TcContext, from: From) -> i32 {
    let Some(config) = config() else {
        return TCX_NEXT;
    };
    let Some(packet) = parse(ctx) else {
        return TCX_NEXT;
    };
    match try_translate(ctx, from, &config, &packet) {
        Ok(action) => action,
        Err(kind) => {
            count(kind);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
fn try_translate(
    ctx: &mut TcContext,
    from: From,
    config: &NodeConfig,
    packet: &Packet,
) -> Result<i32, u32> {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = CT.get_ptr_mut(&packet.key) {
        // SAFETY: a pointer from a successful lookup of a preallocated hash map; copied at once.
        let value = unsafe { *entry };
        let alive = value.kind != CT_FORWARD
            || BACKENDS
                .get_ptr(&BackendKey {
                    service: value.service,
                    addr: value.nat_daddr,
                    port: value.nat_dport,
                    _pad: [0; 2],
                })
                .is_some();
        // A new connection on the tuple of one that closed (the client reused its port): a SYN
        // on the forward entry, or a SYN-ACK on the reply entry (another NAT's connection, e.g. a
        // hostPort's, whose replies carry the tuple).
        let syn = packet.tcp_flags & (TCP_SYN | TCP_ACK);
        let reused = key_is_tcp(packet)
            && ((value.kind == CT_FORWARD && syn == TCP_SYN)
                || (value.kind == CT_REVERSE && syn == TCP_SYN | TCP_ACK))
            && closed(&packet.key, &value);
        if alive && !reused {
            // SAFETY: as above; plain stores of fields, racing only with themselves.
            unsafe {
                (*entry).last_seen_ns = now;
                (*entry).tcp_flags |= packet.tcp_flags;
            }
            if value.kind == CT_FORWARD {
                count_frontend(ctx, value.frontend);
            }
            return rewrite(ctx, config, packet, &value);
        }
        // The backend is gone, or the connection is over: forget it (and balance this one
        // again, when it is to a Service).
        let other = packet.key.other_direction(&value);
        if CT
            .get_ptr(&other)
            // SAFETY: a pointer from a successful lookup, read once.
            .is_some_and(|o| other.other_direction(unsafe { &*o }) == packet.key)
        {
            let _ = CT.remove(&other);
        }
        let _ = CT.remove(&packet.key);
        if value.kind == CT_REVERSE {
            return Ok(TCX_NEXT);
        }
    }
    let key = packet.key;
    let mut frontend_key = FrontendKey {
        addr: key.daddr,
        port: key.dport,
        proto: key.proto,
        _pad: 0,
    };
    let mut found = FRONTENDS.get_ptr(&frontend_key);
    if found.is_none() && key.daddr == config.node_ip {
        frontend_key.addr = [0; 4];
        found = FRONTENDS.get_ptr(&frontend_key);
    }
    let Some(frontend) = found else {
        forget_stale_reply(packet);
        return Ok(TCX_NEXT);
    };
    // SAFETY: a pointer from a successful lookup; copied at once (see SlotValue::rev).
    let frontend = unsafe { *frontend };
    let local_only = frontend.flags & FE_F_LOCAL_INTERNAL != 0
        || (frontend.flags & FE_F_LOCAL_EXTERNAL != 0 && from == From::Netdev);
    if frontend.count == 0 {
        count(EV_NO_BACKEND);
        return port_unreachable(ctx);
    }
    let choices = if local_only {
        frontend.local
    } else {
        frontend.count
    };
    if choices == 0 {
        count(EV_NO_LOCAL_BACKEND);
        return Ok(TC_ACT_SHOT as i32);
    }
    let (addr, port, backend_flags) = choose(&frontend, &key, choices, local_only, now)?;

    let mut value = CtValue {
        nat_saddr: key.saddr,
        nat_daddr: addr,
        nat_sport: key.sport,
        nat_dport: port,
        frontend: frontend.id,
        service: frontend.service,
        created_ns: now,
        last_seen_ns: now,
        kind: CT_FORWARD,
        tcp_flags: packet.tcp_flags,
        flags: 0,
        _pad: 0,
    };
    let snat = from == From::Netdev && backend_flags & BE_F_LOCAL == 0;
    if from == From::Pod && addr == key.saddr {
        value.nat_saddr = HAIRPIN_IP;
        value.flags = CT_F_SNAT | CT_F_HAIRPIN;
    } else if snat {
        value.nat_saddr = config.node_ip;
        value.flags = CT_F_SNAT;
    }
    let mut reverse = CtValue {
        nat_saddr: key.daddr,
        nat_daddr: key.saddr,
        nat_sport: key.dport,
        nat_dport: key.sport,
        kind: CT_REVERSE,
        ..value
    };
    reverse.tcp_flags = 0;
    // The reply entry. Its tuple may be taken: by a closed connection (replaced), or by a live
    // one of the same client port to another Service with the same backend (a clash, as
    // netfilter calls it: this connection gets another source port, as netfilter would give
    // it); a NodePort's remote backend always gets the node's address and a port of its own.
    let mut remap = snat;
    if !snat {
        let reverse_key = key.other_direction(&value);
        match CT.insert(&reverse_key, &reverse, BPF_NOEXIST) {
            Ok(()) => {}
            Err(EEXIST) => {
                let live = CT.get_ptr(&reverse_key).is_some_and(|r| {
                    // SAFETY: a pointer from a successful lookup, copied at once.
                    let r = unsafe { *r };
                    !closed(&reverse_key, &r)
                });
                if live {
                    remap = true;
                    value.flags |= CT_F_SNAT;
                } else {
                    CT.insert(&reverse_key, &reverse, BPF_ANY)
                        .map_err(|_| ERR_CT_FULL)?;
                }
            }
            Err(_) => return Err(ERR_CT_FULL),
        }
    }
    if remap {
        // A free source port towards this backend: a few random tries.
        let mut tries = 0;
        loop {
            // SAFETY: bpf_get_prandom_u32 has no preconditions.
            let r = unsafe { bpf_get_prandom_u32() };
            let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
            let port = (SNAT_PORT_MIN as u32 + r % span) as u16;
            value.nat_sport = port.to_be_bytes();
            let reverse_key = key.other_direction(&value);
            match CT.insert(&reverse_key, &reverse, BPF_NOEXIST) {
                Ok(()) => break,
                Err(EEXIST) if tries < 8 => tries += 1,
                Err(EEXIST) => return Err(ERR_NAT_PORTS),
                Err(_) => return Err(ERR_CT_FULL),
            }
        }
    }
    if CT.insert(&key, &value, BPF_ANY).is_err() {
        let _ = CT.remove(&key.other_direction(&value));
        return Err(ERR_CT_FULL);
    }
    count(EV_CT_CREATED);
    count_frontend(ctx, frontend.id);
    rewrite(ctx, config, packet, &value)
}

#[inline(always)]
fn key_is_tcp(packet: &Packet) -> bool {
    packet.key.proto == PROTO_TCP
}

/// Whether the connection of the entry `value` at `key` saw a FIN or a RST in either direction.
#[inline(always)]
fn closed(key: &CtKey, value: &CtValue) -> bool {
    let mut flags = value.tcp_flags;
    if let Some(other) = CT.get_ptr(&key.other_direction(value)) {
        // SAFETY: a pointer from a successful lookup, read once.
        flags |= unsafe { (*other).tcp_flags };
    }
    flags & (TCP_FIN | TCP_RST) != 0
}

/// A new TCP connection that is not to a Service (a SYN without ACK that matched nothing) may
/// reuse the tuple of a translated connection that closed moments ago: a reply entry left for
/// that tuple would turn its replies into the Service's. It is removed, with its other direction.
#[inline(always)]
fn forget_stale_reply(packet: &Packet) {
    if packet.key.proto != PROTO_TCP || packet.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    let key = &packet.key;
    let reply = CtKey {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        proto: key.proto,
        _pad: [0; 3],
    };
    if let Some(entry) = CT.get_ptr(&reply) {
        // SAFETY: a pointer from a successful lookup; copied at once.
        let entry = unsafe { *entry };
        if entry.kind == CT_REVERSE {
            let _ = CT.remove(&reply.other_direction(&entry));
            let _ = CT.remove(&reply);
        }
    }
}

/// The backend for a new connection: the client's affinity when it still holds, else a random
/// slot among the first `choices`.
#[inline(always)]
fn choose(
    frontend: &FrontendValue,
    key: &CtKey,
    choices: u16,
    local_only: bool,
    now: u64,
) -> Result<([u8; 4], [u8; 2], u8), u32> {
    let affinity_key = AffinityKey {
        client: key.saddr,
        service: frontend.service,
    };
    if frontend.affinity_timeout != 0 {
        if let Some(sticky) = AFFINITY.get_ptr(&affinity_key) {
            // SAFETY: a pointer from a successful lookup; copied at once.
            let sticky = unsafe { *sticky };
            let fresh = now.wrapping_sub(sticky.last_used_ns)
                < u64::from(frontend.affinity_timeout) * 1_000_000_000;
            let backend = BACKENDS.get_ptr(&BackendKey {
                service: frontend.service,
                addr: sticky.addr,
                port: sticky.port,
                _pad: [0; 2],
            });
            if let (true, Some(backend)) = (fresh, backend) {
                // SAFETY: as above.
                let flags = unsafe { (*backend).flags } as u8;
                if !local_only || flags & BE_F_LOCAL != 0 {
                    let refreshed = AffinityValue {
                        last_used_ns: now,
                        ..sticky
                    };
                    if AFFINITY.insert(&affinity_key, &refreshed, BPF_ANY).is_err() {
                        count(ERR_AFFINITY);
                    }
                    return Ok((sticky.addr, sticky.port, flags));
                }
            }
        }
    }
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let ordinal = unsafe { bpf_get_prandom_u32() } % u32::from(choices);
    let slot = SLOTS
        .get_ptr(&SlotKey {
            service: frontend.service,
            rev: frontend.rev,
            ordinal,
        })
        .ok_or(ERR_SLOT_MISSING)?;
    // SAFETY: a pointer from a successful lookup; copied at once, then checked.
    let slot = unsafe { *slot };
    if slot.rev != frontend.rev {
        return Err(ERR_SLOT_MISSING);
    }
    if frontend.affinity_timeout != 0 {
        let sticky = AffinityValue {
            addr: slot.addr,
            port: slot.port,
            _pad: [0; 2],
            last_used_ns: now,
        };
        if AFFINITY.insert(&affinity_key, &sticky, BPF_ANY).is_err() {
            count(ERR_AFFINITY);
        }
    }
    Ok((slot.addr, slot.port, slot.flags))
}

#[inline(always)]
fn count_frontend(ctx: &TcContext, id: u32) {
    let len = u64::from(ctx.len());
    match STATS.get_ptr_mut(&id) {
        Some(stats) => {
            // SAFETY: a per-CPU value from a successful lookup, touched by this CPU only.
            unsafe {
                (*stats).packets = (*stats).packets.wrapping_add(1);
                (*stats).bytes = (*stats).bytes.wrapping_add(len);
            }
        }
        None => {
            let first = FrontendStatsValue {
                packets: 1,
                bytes: len,
            };
            if STATS.insert(&id, &first, BPF_NOEXIST).is_err() {
                count(ERR_STATS_FULL);
            }
        }
    }
}

/// Rewrites the packet's addresses and ports to the entry's, fixing the checksums, and sends it to
/// its egress device directly (see [`redirect_out`]).
#[inline(always)]
fn rewrite(
    ctx: &mut TcContext,
    config: &NodeConfig,
    packet: &Packet,
    value: &CtValue,
) -> Result<i32, u32> {
    let key = &packet.key;
    let (csum_off, mangled) = if key.proto == PROTO_TCP {
        (packet.l4_off + TCP_CSUM, 0)
    } else {
        (packet.l4_off + UDP_CSUM, u64::from(BPF_F_MARK_MANGLED_0))
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | mangled;
    if value.nat_saddr != key.saddr {
        replace_addr(ctx, IP_SRC_OFF, csum_off, pseudo, key.saddr, value.nat_saddr)?;
    }
    if value.nat_daddr != key.daddr {
        replace_addr(ctx, IP_DST_OFF, csum_off, pseudo, key.daddr, value.nat_daddr)?;
    }
    if value.nat_sport != key.sport {
        replace_port(ctx, packet.l4_off, csum_off, mangled, key.sport, value.nat_sport)?;
    }
    if value.nat_dport != key.dport {
        replace_port(
            ctx,
            packet.l4_off + 2,
            csum_off,
            mangled,
            key.dport,
            value.nat_dport,
        )?;
    }
    redirect_out(ctx, value, key.proto, value.nat_saddr == config.node_ip)
}

#[inline(always)]
fn replace_addr(
    ctx: &mut TcContext,
    off: usize,
    csum_off: usize,
    l4_flags: u64,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), u32> {
    let (old, new) = (u32::from_ne_bytes(old), u32::from_ne_bytes(new));
    ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), l4_flags | 4)
        .map_err(|_| ERR_REWRITE)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)
        .map_err(|_| ERR_REWRITE)?;
    ctx.store(off, &new, 0).map_err(|_| ERR_REWRITE)
}

#[inline(always)]
fn replace_port(
    ctx: &mut TcContext,
    off: usize,
    csum_off: usize,
    l4_flags: u64,
    old: [u8; 2],
    new: [u8; 2],
) -> Result<(), u32> {
    let (old, new) = (u16::from_ne_bytes(old), u16::from_ne_bytes(new));
    ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), l4_flags | 2)
        .map_err(|_| ERR_REWRITE)?;
    ctx.store(off, &new, 0).map_err(|_| ERR_REWRITE)
}

/// The new headers of an ICMP port unreachable: IPv4, ICMP, and the offending packet's IPv4
/// header and first 8 bytes of its transport header. 4-byte aligned for `bpf_csum_diff`.
#[repr(C, align(4))]
struct Unreachable {
    ip: [u8; 20],
    icmp: [u8; 8],
    quoted: [u8; 28],
}

const UNREACHABLE_LEN: usize = core::mem::size_of::<Unreachable>();
const _: () = assert!(UNREACHABLE_LEN == 56);

/// The RFC 1071 checksum of `len` bytes at `data` (a multiple of 4), folded and inverted, in the
/// byte order of the data.
#[inline(always)]
fn checksum(data: *mut u8, len: u32) -> Result<[u8; 2], u32> {
    // SAFETY: `data` points to `len` readable bytes on this program's stack.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, data as *mut u32, len, 0) };
    if sum < 0 {
        return Err(ERR_ICMP);
    }
    let mut sum = sum as u64 & 0xffff_ffff;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    Ok((!(sum as u16)).to_ne_bytes())
}

/// Turns the packet into an ICMP port unreachable from its destination to its source and sends
/// it back out of the interface it came in on: a connect to a Service without endpoints is
/// refused at once (Linux maps the ICMP error to ECONNREFUSED) instead of timing out. Packets
/// with IPv4 options are dropped instead.
#[inline(always)]
fn port_unreachable(ctx: &mut TcContext) -> Result<i32, u32> {
    let vihl: u8 = ctx.load(ETH_HLEN).map_err(|_| ERR_ICMP)?;
    if vihl != 0x45 {
        return Err(ERR_ICMP);
    }
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ERR_ICMP)?;
    let mut reply = Unreachable {
        ip: [0; 20],
        icmp: [3, 3, 0, 0, 0, 0, 0, 0],
        quoted: ctx.load(ETH_HLEN).map_err(|_| ERR_ICMP)?,
    };
    let total = (20 + 8 + 28u16).to_be_bytes();
    reply.ip = [
        0x45, 0, total[0], total[1], 0, 0, 0x40, 0, 64, 1, 0, 0, // ver/ihl … protocol ICMP, csum
        reply.quoted[16], reply.quoted[17], reply.quoted[18], reply.quoted[19], // from the Service
        reply.quoted[12], reply.quoted[13], reply.quoted[14], reply.quoted[15], // to the client
    ];
    let base = &mut reply as *mut Unreachable as *mut u8;
    let ip_sum = checksum(base, 20)?;
    reply.ip[10] = ip_sum[0];
    reply.ip[11] = ip_sum[1];
    let base = &mut reply as *mut Unreachable as *mut u8;
    // The ICMP checksum covers the ICMP header and the quoted bytes that follow it.
    // SAFETY: `icmp` and `quoted` are contiguous (repr(C), byte arrays), 36 bytes from offset 20.
    let icmp_sum = checksum(unsafe { base.add(20) }, 36)?;
    reply.icmp[2] = icmp_sum[0];
    reply.icmp[3] = icmp_sum[1];
    // SAFETY: the program's context; resizing invalidates no pointer this code holds.
    let resized = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + UNREACHABLE_LEN) as u32, 0) };
    if resized != 0 {
        return Err(ERR_ICMP);
    }
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(|_| ERR_ICMP)?;
    ctx.store(ETH_HLEN, &reply, 0).map_err(|_| ERR_ICMP)?;
    // SAFETY: `ctx.skb.skb` is the program's context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: bpf_redirect takes an ifindex and flags; 0 sends it out of that device.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// Sends a translated packet straight to the device the node's routing table names for its new
/// destination (the neighbour resolved by the kernel), past the kernel's forwarding path and so
/// past netfilter, its TTL decremented as forwarding would. Netfilter's conntrack sees neither
/// direction of a translated connection: were the packets handed on, it would see one half of
/// each (the forward packets after translation, the replies before their reverse translation)
/// and keep every connection as a half-open one until its table filled.
///
/// A packet for the node itself (the reply to one of its processes) goes up the stack. `must` is
/// set when the new source is the node's own address (a NodePort's remote backend, the node's
/// processes): the kernel would drop such a packet arriving on an interface as spoofed, so a
/// failed lookup is an error; otherwise it is counted and the packet handed on.
#[inline(always)]
fn redirect_out(
    ctx: &mut TcContext,
    value: &CtValue,
    proto: u8,
    must: bool,
) -> Result<i32, u32> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid value (integers and unions of integers).
    let mut params: FibLookup = unsafe { core::mem::zeroed() };
    params.family = 2; // AF_INET
    params.l4_protocol = 0;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(value.nat_saddr);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(value.nat_daddr);
    // SAFETY: `ctx.skb.skb` is the program's context.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the context and a pointer to a stack struct of the size passed.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut params,
            core::mem::size_of::<FibLookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if ret == i64::from(BPF_FIB_LKUP_RET_NOT_FWDED) && !must {
        return Ok(TCX_NEXT);
    }
    if ret != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        if must {
            return Err(ERR_FIB);
        }
        count(ERR_FIB);
        return Ok(TCX_NEXT);
    }
    let ttl: u8 = ctx.load(IP_TTL_OFF).map_err(|_| ERR_REWRITE)?;
    if ttl <= 1 {
        // The stack's forwarding drops it with an ICMP time exceeded.
        return Ok(TCX_NEXT);
    }
    // TTL and protocol are one 16-bit word of the header checksum.
    let old = u16::from_be_bytes([ttl, proto]).to_be();
    let new = u16::from_be_bytes([ttl - 1, proto]).to_be();
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 2)
        .map_err(|_| ERR_REWRITE)?;
    ctx.store(IP_TTL_OFF, &(ttl - 1), 0)
        .map_err(|_| ERR_REWRITE)?;
    // SAFETY: a helper call with a null parameter block: the kernel resolves the next hop.
    let action = unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) };
    Ok(action as i32)
}
