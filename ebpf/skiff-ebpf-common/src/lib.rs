//! The contract between skiff's eBPF programs (`ebpf/skiff-ebpf`, built for `bpfel-unknown-none`)
//! and the agent: map names, key and value layouts.
//!
//! Every map value is `#[repr(C)]`, `Copy`, made of fixed-width integers and byte arrays only (no
//! `bool`, `Option` or enums, whose bit patterns the kernel side cannot promise), with explicit
//! padding and a size asserted at compile time, so both sides agree byte for byte. Map names carry
//! a version suffix: a layout change gets a new name (`…_V2`), and the agent never reads an old
//! pinned map with a new layout. BPF object names are at most 15 bytes; that is asserted too.
//!
//! With the `user` feature (the agent), the types implement `aya::Pod`.

#![cfg_attr(not(test), no_std)]

use core::mem::size_of;

pub mod lb;

/// Name of the per-CPU hash map of per-pod counters: key [`PodKey`], value [`PodCountersValue`].
pub const POD_COUNTERS_MAP: &str = "SKF_PODCNT_V1";
/// Name of the hash map of pod identities, written by the agent only: key [`PodKey`], value
/// [`PodIdentityValue`]. It lets `skiffctl bpf pods` name pods from the pins alone.
pub const POD_IDENTITY_MAP: &str = "SKF_PODID_V1";
/// Capacity of both pod maps (pods per node).
pub const MAX_PODS: u32 = 4096;

/// The tc classifier attached at the ingress of a pod's host-side veth: traffic sent BY the pod.
pub const POD_INGRESS_PROG: &str = "skf_pod_ingress";
/// The tc classifier attached at the egress of a pod's host-side veth: traffic sent TO the pod.
pub const POD_EGRESS_PROG: &str = "skf_pod_egress";

const _: () = assert!(POD_COUNTERS_MAP.len() <= 15);
const _: () = assert!(POD_IDENTITY_MAP.len() <= 15);
const _: () = assert!(POD_INGRESS_PROG.len() <= 15);
const _: () = assert!(POD_EGRESS_PROG.len() <= 15);

/// Key of both pod maps: the interface index of the pod's host-side veth (host byte order), as
/// the kernel reports it in `__sk_buff.ifindex` in the node's network namespace.
pub type PodKey = u32;

/// Per-pod counters, one copy per CPU (the agent sums them). All fields in host byte order.
///
/// Directions are from the pod's point of view: "from pod" is counted at the host veth's ingress
/// hook, "to pod" at its egress hook. Bytes are `skb->len`, which includes the Ethernet header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCountersValue {
    /// Packets the pod sent (host veth ingress).
    pub from_pod_packets: u64,
    /// Bytes the pod sent (host veth ingress).
    pub from_pod_bytes: u64,
    /// Packets sent to the pod (host veth egress).
    pub to_pod_packets: u64,
    /// Bytes sent to the pod (host veth egress).
    pub to_pod_bytes: u64,
}

const _: () = assert!(size_of::<PodCountersValue>() == 32);

/// Length of [`PodIdentityValue::ifname`]: `IFNAMSIZ`.
pub const IFNAME_LEN: usize = 16;
/// Length of [`PodIdentityValue::namespace`]: a namespace name is at most 63 bytes.
pub const NAMESPACE_LEN: usize = 64;
/// Length of [`PodIdentityValue::name`]: a pod name is at most 253 bytes.
pub const NAME_LEN: usize = 256;
/// Length of [`PodIdentityValue::uid`]: a UUID is 36 bytes.
pub const UID_LEN: usize = 40;

/// Who sits behind a host-side veth. Written by the agent when it attaches the programs (before
/// the links, since the programs count only veths that have an identity), read by `skiffctl`.
///
/// Strings are UTF-8, NUL-padded (no NUL when they fill the array). All byte arrays, so the
/// alignment is 1 and there is no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodIdentityValue {
    /// The pod's IPv4 address in network byte order (big-endian octets).
    pub ipv4: [u8; 4],
    /// The host-side veth's name.
    pub ifname: [u8; IFNAME_LEN],
    /// The pod's namespace.
    pub namespace: [u8; NAMESPACE_LEN],
    /// The pod's name.
    pub name: [u8; NAME_LEN],
    /// The pod's `metadata.uid`.
    pub uid: [u8; UID_LEN],
}

const _: () = assert!(size_of::<PodIdentityValue>() == 380);
const _: () = assert!(core::mem::align_of::<PodIdentityValue>() == 1);

impl PodIdentityValue {
    /// An all-zero identity (every string empty).
    pub const ZERO: Self = Self {
        ipv4: [0; 4],
        ifname: [0; IFNAME_LEN],
        namespace: [0; NAMESPACE_LEN],
        name: [0; NAME_LEN],
        uid: [0; UID_LEN],
    };
}

/// Copies `s` into the NUL-padded array `dst`; false (and `dst` untouched) when it does not fit.
pub fn put_str(dst: &mut [u8], s: &str) -> bool {
    let bytes = s.as_bytes();
    if bytes.len() > dst.len() || bytes.contains(&0) {
        return false;
    }
    dst.fill(0);
    dst[..bytes.len()].copy_from_slice(bytes);
    true
}

/// The string in a NUL-padded array, up to the first NUL; `None` when it is not UTF-8.
pub fn get_str(src: &[u8]) -> Option<&str> {
    let end = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    core::str::from_utf8(&src[..end]).ok()
}

/// Whether two strings are equal, usable in `const` assertions (the programs check their
/// `#[map(name = "…")]` literals against the constants above).
pub const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(feature = "user")]
mod pod {
    #![allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]

    // SAFETY: both types are #[repr(C)], Copy, made of integers and byte arrays only, have no
    // implicit padding (sizes asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::PodCountersValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodIdentityValue {}
    // SAFETY: as above: every type of `lb` is #[repr(C)], Copy, integers and byte arrays, with
    // explicit padding and its size asserted.
    unsafe impl aya::Pod for super::lb::FrontendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::lb::FrontendValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::lb::SlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::lb::SlotValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::lb::BackendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::lb::BackendValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::lb::ServiceIdentityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::lb::AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::lb::AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::lb::FrontendStatsValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::lb::CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::lb::CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::lb::NodeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::lb::L2AnnounceValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_and_refuse_what_does_not_fit() {
        let mut id = PodIdentityValue::ZERO;
        assert!(put_str(&mut id.namespace, "default"));
        assert_eq!(get_str(&id.namespace), Some("default"));
        let full = "x".repeat(NAMESPACE_LEN);
        assert!(put_str(&mut id.namespace, &full));
        assert_eq!(get_str(&id.namespace), Some(full.as_str()));
        assert!(!put_str(&mut id.namespace, &"y".repeat(NAMESPACE_LEN + 1)));
        assert_eq!(
            get_str(&id.namespace),
            Some(full.as_str()),
            "left untouched"
        );
        assert!(!put_str(&mut id.name, "a\0b"));
        assert!(put_str(&mut id.name, "short"));
        assert_eq!(
            get_str(&id.name),
            Some("short"),
            "a shorter string clears the tail"
        );
    }

    #[test]
    fn const_str_eq() {
        assert!(str_eq(POD_COUNTERS_MAP, "SKF_PODCNT_V1"));
        assert!(!str_eq(POD_COUNTERS_MAP, "SKF_PODCNT_V2"));
        assert!(!str_eq("a", "ab"));
    }
}
