//! skiff's eBPF programs, loaded by the agent (`skiff_agent::bpf`).
//!
//! Two tc classifiers for a pod's host-side veth, attached with TCX:
//!
//! - `skf_pod_ingress` at the veth's ingress: packets coming out of the pod (the pod sends),
//! - `skf_pod_egress` at the veth's egress: packets going into the pod (the pod receives).
//!
//! Both count packets and bytes per pod in the per-CPU hash map `SKF_PODCNT_V1`, keyed by the
//! veth's ifindex, for the veths the agent registered in `SKF_PODID_V1`, and always hand the
//! packet on with `TCX_NEXT`: counting must never change what the network does, and a program
//! attached after them on the same hook (service load balancing) still runs; with none after
//! them, TCX passes the packet. They read no packet data, only `skb->ifindex` and `skb->len`.
//!
//! The map layouts and names come from `skiff-ebpf-common`, shared with the agent.

#![no_std]
#![no_main]

use aya_ebpf::bindings::tcx_action_base::TCX_NEXT;
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::{HashMap, PerCpuHashMap};
use aya_ebpf::programs::TcContext;
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
pub fn skf_pod_ingress(ctx: TcContext) -> i32 {
    action(try_count(&ctx, Way::FromPod))
}

/// Host veth egress: traffic sent to the pod.
#[classifier]
pub fn skf_pod_egress(ctx: TcContext) -> i32 {
    action(try_count(&ctx, Way::ToPod))
}

/// Counting is best effort: whatever happened, the packet goes on to the
/// next program of the hook (`TCX_NEXT`; `TC_ACT_OK` would end the chain).
#[inline(always)]
fn action(_result: Result<(), i64>) -> i32 {
    TCX_NEXT
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
