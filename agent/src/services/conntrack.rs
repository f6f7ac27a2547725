//! Conntrack of translated connections: the agent's collector of idle entries ([`collect`]) and
//! the view `skiffctl bpf ct list` prints ([`list`]).
//!
//! The programs write both directions of a connection and refresh `last_seen_ns` on every
//! packet; the table is a plain hash (not LRU: a full table is counted, never a live connection
//! evicted), so idle entries are removed here. Timeouts are Cilium's: TCP established 6 h, TCP
//! not yet answered 60 s, TCP closing (FIN or RST seen) 10 s, UDP 60 s. An entry goes with its
//! other direction, once both are idle, and is read again just before deletion.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;
use skiff_ebpf_common::lb::*;

use super::table::endpoint;
use crate::bpf::BpfError;
use crate::bpf::lb::LbMaps;

/// TCP, both directions seen.
pub const TCP_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// TCP, no reply yet.
pub const TCP_SYN_TIMEOUT: Duration = Duration::from_secs(60);
/// TCP, FIN or RST seen.
pub const TCP_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// UDP.
pub const UDP_TIMEOUT: Duration = Duration::from_secs(60);

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64
}

/// The idle timeout of a connection whose two directions saw `flags` and `other_flags`.
pub fn timeout(proto: u8, flags: u8, other_flags: u8) -> Duration {
    if proto != PROTO_TCP {
        return UDP_TIMEOUT;
    }
    let seen = flags | other_flags;
    if seen & (TCP_FIN | TCP_RST) != 0 {
        TCP_CLOSE_TIMEOUT
    } else if flags != 0 && other_flags != 0 {
        TCP_ESTABLISHED_TIMEOUT
    } else {
        TCP_SYN_TIMEOUT
    }
}

/// What one collection did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Collected {
    /// Entries removed.
    pub removed: usize,
    /// Entries left.
    pub remaining: usize,
}

/// Removes the connections idle beyond their timeout at `now_ns`.
pub fn collect(maps: &mut impl LbMaps, now_ns: u64) -> Result<Collected, BpfError> {
    let entries = maps.conntrack()?;
    let all: std::collections::HashMap<CtKey, CtValue> = entries.iter().copied().collect();
    let mut doomed = BTreeSet::new();
    for (key, value) in &entries {
        let other_key = key.other_direction(value);
        let other = all.get(&other_key);
        let last = value.last_seen_ns.max(other.map_or(0, |o| o.last_seen_ns));
        let limit = timeout(key.proto, value.tcp_flags, other.map_or(0, |o| o.tcp_flags));
        if now_ns.saturating_sub(last) > limit.as_nanos() as u64 {
            doomed.insert(*key);
            doomed.insert(other_key);
        }
    }
    let mut removed = 0;
    for key in doomed {
        // Read again: a packet may have refreshed it since the scan.
        let scanned = all.get(&key).map(|v| v.last_seen_ns);
        match maps.conntrack_entry(&key)? {
            Some(value) if Some(value.last_seen_ns) != scanned && scanned.is_some() => {}
            Some(_) => {
                maps.remove_conntrack(&key)?;
                removed += 1;
            }
            None => {}
        }
    }
    Ok(Collected {
        removed,
        remaining: entries.len().saturating_sub(removed),
    })
}

/// One conntrack entry as `skiffctl bpf ct list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CtRow {
    /// `forward` (client to backend) or `reverse` (replies).
    pub direction: &'static str,
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
    /// The tuple as the packet carries it: `src:port -> dst:port`.
    pub tuple: String,
    /// What it becomes: `src:port -> dst:port`.
    pub nat: String,
    /// The frontend's id.
    pub frontend: u32,
    /// Seconds since it was created.
    pub age_seconds: u64,
    /// Seconds until it expires if idle.
    pub expires_in_seconds: u64,
    /// TCP flags seen (`SYN,ACK,FIN,RST`).
    pub tcp_flags: String,
}

fn flags_text(flags: u8) -> String {
    let names = [
        (TCP_SYN, "SYN"),
        (TCP_ACK, "ACK"),
        (TCP_FIN, "FIN"),
        (TCP_RST, "RST"),
    ];
    names
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(",")
}

/// Every entry of `maps`, as of `now_ns`, sorted by tuple.
pub fn list(maps: &impl LbMaps, now_ns: u64) -> Result<Vec<CtRow>, BpfError> {
    let entries = maps.conntrack()?;
    let all: std::collections::HashMap<CtKey, CtValue> = entries.iter().copied().collect();
    let mut sorted = entries;
    sorted.sort_by_key(|(k, _)| *k);
    Ok(sorted
        .into_iter()
        .map(|(key, value)| {
            let other = all.get(&key.other_direction(&value));
            let limit = timeout(key.proto, value.tcp_flags, other.map_or(0, |o| o.tcp_flags));
            let last = value.last_seen_ns.max(other.map_or(0, |o| o.last_seen_ns));
            let idle = now_ns.saturating_sub(last);
            CtRow {
                direction: if value.kind == CT_FORWARD {
                    "forward"
                } else {
                    "reverse"
                },
                protocol: super::table::proto_name(key.proto),
                tuple: format!(
                    "{} -> {}",
                    endpoint(key.saddr, key.sport),
                    endpoint(key.daddr, key.dport)
                ),
                nat: format!(
                    "{} -> {}",
                    endpoint(value.nat_saddr, value.nat_sport),
                    endpoint(value.nat_daddr, value.nat_dport)
                ),
                frontend: value.frontend,
                age_seconds: now_ns.saturating_sub(value.created_ns) / 1_000_000_000,
                expires_in_seconds: (limit.as_nanos() as u64).saturating_sub(idle) / 1_000_000_000,
                tcp_flags: flags_text(value.tcp_flags),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::lb_fake::FakeLbMaps;

    fn pair(maps: &mut FakeLbMaps, sport: u16, proto: u8, flags: (u8, u8), seen: u64) {
        let key = CtKey {
            saddr: [10, 244, 1, 2],
            daddr: [10, 96, 0, 20],
            sport: sport.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            proto,
            _pad: [0; 3],
        };
        let forward = CtValue {
            nat_saddr: key.saddr,
            nat_daddr: [10, 244, 2, 5],
            nat_sport: key.sport,
            nat_dport: 8080u16.to_be_bytes(),
            kind: CT_FORWARD,
            tcp_flags: flags.0,
            last_seen_ns: seen,
            ..CtValue::default()
        };
        let reverse = CtValue {
            nat_saddr: key.daddr,
            nat_daddr: key.saddr,
            nat_sport: key.dport,
            nat_dport: key.sport,
            kind: CT_REVERSE,
            tcp_flags: flags.1,
            last_seen_ns: seen,
            ..forward
        };
        maps.conntrack
            .insert(key.other_direction(&forward), reverse);
        maps.conntrack.insert(key, forward);
    }

    #[test]
    fn idle_connections_go_in_pairs_by_protocol_and_state() {
        let s = 1_000_000_000u64;
        let mut maps = FakeLbMaps::new(0);
        let now = 100_000 * s;
        pair(
            &mut maps,
            1000,
            PROTO_TCP,
            (TCP_SYN | TCP_ACK, TCP_SYN | TCP_ACK),
            now - 3600 * s,
        );
        pair(&mut maps, 1001, PROTO_TCP, (TCP_SYN, 0), now - 61 * s);
        pair(
            &mut maps,
            1002,
            PROTO_TCP,
            (TCP_ACK | TCP_FIN, TCP_ACK),
            now - 11 * s,
        );
        pair(&mut maps, 1003, PROTO_UDP, (0, 0), now - 59 * s);
        pair(&mut maps, 1004, PROTO_UDP, (0, 0), now - 61 * s);
        assert_eq!(
            collect(&mut maps, now).expect("collect"),
            Collected {
                removed: 6,
                remaining: 4
            }
        );
        let left: Vec<u16> = maps
            .conntrack
            .iter()
            .filter(|(_, v)| v.kind == CT_FORWARD)
            .map(|(k, _)| u16::from_be_bytes(k.sport))
            .collect();
        assert_eq!(
            left,
            [1000, 1003],
            "established within 6 h and fresh UDP stay"
        );
        assert_eq!(maps.conntrack.len(), 4, "both directions of each stay");
        let rows = list(&maps, now).expect("list");
        assert_eq!(rows[0].tuple, "10.244.1.2:1000 -> 10.96.0.20:80");
        assert_eq!(rows[0].nat, "10.244.1.2:1000 -> 10.244.2.5:8080");
        assert_eq!(rows[0].tcp_flags, "SYN,ACK");
    }
}
