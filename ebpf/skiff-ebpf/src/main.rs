//! skiff's eBPF programs, loaded by the agent (`skiff_agent::bpf`). tc classifiers, attached
//! with TCX:
//!
//! - `skf_pod_ingress` at a pod's host-side veth's ingress (what the pod sends): counts, then
//!   translates traffic to Services ([`lb`]),
//! - `skf_pod_egress` at its egress (what the pod receives): counts,
//! - `skf_uplink_in` at the node's uplink's ingress: answers ARP for the LoadBalancer IPs
//!   this node announces, translates NodePort, LoadBalancer and external-IP traffic and the
//!   replies of translated connections,
//! - `skf_host_svc` at the ingress of `skfsvc1`, where the node routes the service range:
//!   translates the node's own processes' traffic to Services.
//!
//! Counting is per pod in the per-CPU hash map `SKF_PODCNT_V1`, keyed by the veth's ifindex,
//! for the veths the agent registered in `SKF_PODID_V1`; it never changes what the network does.
//! Packets the programs do not drop or redirect go on with `TCX_NEXT`, so a program attached
//! after them on the same hook still runs (with none after them, TCX passes the packet).
//!
//! The map layouts and names come from `skiff-ebpf-common`, shared with the agent.


#![no_std]
#![no_main]

mod lb;

use aya_ebpf::bindings::tcx_action_base::TCX_NEXT;
use aya_ebpf::helpers::r#gen::bpf_redirect;
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::{HashMap, PerCpuHashMap};
use aya_ebpf::programs::TcContext;
use skiff_ebpf_common::lb::{
    ERR_POD_COUNTERS_FULL, EV_ARP_REPLIES, HOST_SERVICE_PROG, NODE_INGRESS_PROG,
};
use skiff_ebpf_common::{
    MAX_PODS, POD_COUNTERS_MAP, POD_EGRESS_PROG, POD_IDENTITY_MAP, POD_INGRESS_PROG,
    PodCountersValue, PodIdentityValue, PodKey, str_eq,
};

// The `#[map(name = …)]` attribute takes a literal; these keep the literals and the program
// names in step with the shared constants.
const _: () = assert!(str_eq(POD_COUNTERS_MAP, "SKF_PODCNT_V1"));
const _: () = assert!(str_eq(POD_IDENTITY_MAP, "SKF_PODID_V1"));
const _: () = assert!(str_eq(POD_INGRESS_PROG, "skf_pod_ingress"));
const _: () = assert!(str_eq(POD_EGRESS_PROG, "skf_pod_egress"));
const _: () = assert!(str_eq(NODE_INGRESS_PROG, "skf_uplink_in"));
const _: () = assert!(str_eq(HOST_SERVICE_PROG, "skf_host_svc"));

/// BPF_NOEXIST: create an entry only if there is none (another CPU may have raced us).
const BPF_NOEXIST: u64 = 1;

/// Per-pod counters, pinned by name so they outlive the agent.
#[map(name = "SKF_PODCNT_V1")]
static POD_COUNTERS: PerCpuHashMap<PodKey, PodCountersValue> = PerCpuHashMap::pinned(MAX_PODS, 0);

/// Pod identities, written by the agent only: the programs count a veth only when it has one.
#[map(name = "SKF_PODID_V1")]
static POD_IDENTITY: HashMap<PodKey, PodIdentityValue> = HashMap::pinned(MAX_PODS, 0);

/// Which way a packet goes, from the pod's point of view.
#[derive(Clone, Copy)]
enum Way {
    FromPod,
    ToPod,
}

/// Host veth ingress: traffic the pod sends.
#[classifier]
pub fn skf_pod_ingress(mut ctx: TcContext) -> i32 {
    counted(try_count(&ctx, Way::FromPod));
    lb::translate(&mut ctx, lb::From::Pod)
}

/// Host veth egress: traffic sent to the pod.
#[classifier]
pub fn skf_pod_egress(ctx: TcContext) -> i32 {
    counted(try_count(&ctx, Way::ToPod));
    TCX_NEXT
}

/// The node's uplink ingress: ARP for announced LoadBalancer IPs, then Services.
#[classifier]
pub fn skf_uplink_in(mut ctx: TcContext) -> i32 {
    if let Some(action) = arp::answer(&mut ctx) {
        return action;
    }
    lb::translate(&mut ctx, lb::From::Netdev)
}

/// The far end of the service veth: gratuitous-ARP triggers from the agent, and Services
/// reached from the node's own processes.
#[classifier]
pub fn skf_host_svc(mut ctx: TcContext) -> i32 {
    if let Some(action) = arp::gratuitous(&mut ctx) {
        return action;
    }
    lb::translate(&mut ctx, lb::From::Host)
}

/// Counting never stops a packet; a counter that could not be created is counted as an error.
#[inline(always)]
fn counted(result: Result<(), i64>) {
    if result.is_err() {
        lb::count(ERR_POD_COUNTERS_FULL);
    }
}

/// The ARP responder for the LoadBalancer IPs this node announces (the agent's L2 announcer
/// holds their Leases and writes `SKF_L2ANN_V1`).
mod arp {
    use super::*;

    const ETH_P_ARP: u16 = 0x0806;
    const ARP_REQUEST: u16 = 1;
    const ARP_REPLY: u16 = 2;

    /// `Some(action)` when the packet was an ARP request for an announced address, turned into
    /// the reply and sent back out of the uplink; `None` for everything else.
    #[inline(always)]
    pub fn answer(ctx: &mut TcContext) -> Option<i32> {
        if u16::from_be(ctx.load::<u16>(12).ok()?) != ETH_P_ARP {
            return None;
        }
        let config = lb::config()?;
        // Ethernet/IPv4 requests only: htype 1, ptype 0x0800, hlen 6, plen 4.
        let header: [u8; 8] = ctx.load(14).ok()?;
        if header[..6] != [0, 1, 8, 0, 6, 4] || u16::from_be_bytes([header[6], header[7]]) != ARP_REQUEST {
            return None;
        }
        let sender_mac: [u8; 6] = ctx.load(22).ok()?;
        let sender_ip: [u8; 4] = ctx.load(28).ok()?;
        let target_ip: [u8; 4] = ctx.load(38).ok()?;
        // SAFETY: `ctx.skb.skb` is the program's context.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        if !lb::announces(&target_ip, ifindex) {
            return None;
        }
        let mac = config.uplink_mac;
        let stored = ctx.store(0, &sender_mac, 0).is_ok()
            && ctx.store(6, &mac, 0).is_ok()
            && ctx.store(20, &ARP_REPLY.to_be_bytes(), 0).is_ok()
            && ctx.store(22, &mac, 0).is_ok()
            && ctx.store(28, &target_ip, 0).is_ok()
            && ctx.store(32, &sender_mac, 0).is_ok()
            && ctx.store(38, &sender_ip, 0).is_ok();
        if !stored {
            lb::count(skiff_ebpf_common::lb::ERR_REWRITE);
            return None;
        }
        lb::count(EV_ARP_REPLIES);
        // SAFETY: bpf_redirect takes an ifindex and flags; 0 sends it out of that device.
        Some(unsafe { bpf_redirect(ifindex, 0) } as i32)
    }

    /// `Some(action)` when the packet is the agent's gratuitous-ARP trigger (a UDP datagram to
    /// `GARP_TRIGGER_IP:GARP_TRIGGER_PORT` carrying an announced LoadBalancer IP): it becomes a
    /// broadcast ARP request for that IP from the uplink's MAC address, sent out of the uplink.
    /// A trigger for an IP this node does not announce is dropped.
    #[inline(always)]
    pub fn gratuitous(ctx: &mut TcContext) -> Option<i32> {
        use skiff_ebpf_common::lb::{GARP_TRIGGER_IP, GARP_TRIGGER_PORT};
        if u16::from_be(ctx.load::<u16>(12).ok()?) != 0x0800 {
            return None;
        }
        // IPv4 without options, UDP, to the trigger address and port.
        let header: [u8; 24] = ctx.load(14).ok()?;
        if header[0] != 0x45
            || header[9] != 17
            || header[16..20] != GARP_TRIGGER_IP
            || header[22..24] != GARP_TRIGGER_PORT.to_be_bytes()
        {
            return None;
        }
        let ip: [u8; 4] = ctx.load(14 + 20 + 8).ok()?;
        let config = lb::config()?;
        if !lb::announces(&ip, config.uplink_ifindex) {
            return Some(aya_ebpf::bindings::TC_ACT_SHOT as i32);
        }
        let mac = config.uplink_mac;
        let mut frame = [0u8; 42];
        frame[..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&mac);
        frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
        frame[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, ARP_REQUEST as u8]);
        frame[22..28].copy_from_slice(&mac);
        frame[28..32].copy_from_slice(&ip);
        frame[38..42].copy_from_slice(&ip);
        // SAFETY: the program's context; no pointer into the packet is held.
        let resized = unsafe { aya_ebpf::helpers::r#gen::bpf_skb_change_tail(ctx.skb.skb, 42, 0) };
        if resized != 0 || ctx.store(0, &frame, 0).is_err() {
            lb::count(skiff_ebpf_common::lb::ERR_REWRITE);
            return Some(aya_ebpf::bindings::TC_ACT_SHOT as i32);
        }
        lb::count(EV_ARP_REPLIES);
        // SAFETY: bpf_redirect takes an ifindex and flags; 0 sends it out of that device.
        Some(unsafe { bpf_redirect(config.uplink_ifindex, 0) } as i32)
    }
}

#[inline(always)]
fn try_count(ctx: &TcContext, way: Way) -> Result<(), i64> {
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel passed to this program; reading its
    // `ifindex` field is a plain context access the verifier checks.
    let ifindex: PodKey = unsafe { (*ctx.skb.skb).ifindex };
    // Only veths the agent registered are counted: once it removes a pod's identity, a late
    // packet cannot bring the pod's counters back.
    if POD_IDENTITY.get_ptr(&ifindex).is_none() {
        return Ok(());
    }
    let len = u64::from(ctx.len());
    match POD_COUNTERS.get_ptr_mut(&ifindex) {
        Some(counters) => {
            // SAFETY: a per-CPU value is only ever touched by this CPU, and the program cannot be
            // preempted by itself on the same CPU; the pointer comes from a successful lookup.
            let counters = unsafe { &mut *counters };
            bump(counters, way, len);
            Ok(())
        }
        None => {
            let mut first = PodCountersValue::default();
            bump(&mut first, way, len);
            POD_COUNTERS.insert(&ifindex, &first, BPF_NOEXIST)
        }
    }
}

#[inline(always)]
fn bump(counters: &mut PodCountersValue, way: Way, len: u64) {
    match way {
        Way::FromPod => {
            counters.from_pod_packets = counters.from_pod_packets.wrapping_add(1);
            counters.from_pod_bytes = counters.from_pod_bytes.wrapping_add(len);
        }
        Way::ToPod => {
            counters.to_pod_packets = counters.to_pod_packets.wrapping_add(1);
            counters.to_pod_bytes = counters.to_pod_bytes.wrapping_add(len);
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No panic can be reached from the programs (no indexing, no unwrap, wrapping arithmetic); the verifier would reject an unbounded loop anyway.
    loop {}
}

/// The kernel's licence check for the helpers the programs call.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
