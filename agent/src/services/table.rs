//! The load-balancing reconciler: a node's service ports onto its maps through [`LbMaps`],
//! idempotently, never showing a packet a half-written service.
//!
//! For one service port, [`LbTable::reconcile`]:
//! 1. writes the identity (`namespace/name:port`) of a new service port,
//! 2. writes the backends it gains (a conntrack entry is kept only while its backend is there),
//! 3. when the slots change, writes all of them under a new revision,
//! 4. switches each frontend to that revision with one update (and adds new frontends),
//! 5. removes the frontends it lost, then the backends it lost,
//! 6. retires the old revision's slots: they are deleted a second later ([`LbTable::collect`]),
//!    after any packet that read the old frontend has read its slot.
//!
//! A failure stops the pass with the map's error; what was written is recorded, so the next pass
//! (the caller retries) finishes the job, and slots of a revision no frontend uses are retired.
//! [`LbTable::restore`] adopts what a previous agent left in the pinned maps, so a restart
//! rewrites nothing that is already right.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde::Serialize;
use skiff_ebpf_common::lb::*;
use skiff_ebpf_common::{get_str, put_str};

use super::model::{ServicePort, ServicePortKey};
use crate::bpf::BpfError;
use crate::bpf::lb::LbMaps;

/// How long a retired revision's slots stay.
pub const RETIRE_AFTER: Duration = Duration::from_secs(1);

/// What the maps hold for one service port.
#[derive(Clone, Debug, Default)]
struct Programmed {
    id: u32,
    /// The revision of the complete slot set [`Self::slots`].
    rev: u32,
    slots: Vec<SlotValue>,
    /// Every revision with slots written, and how many.
    slot_revs: VecMap<u32, u32>,
    /// The highest revision ever used: a new one is always above it (a retired revision's
    /// slots must never be rewritten before they are deleted).
    last_rev: u32,
    frontends: VecMap<FrontendKey, FrontendValue>,
    backends: VecMap<BackendKey, BackendValue>,
}

/// A small map as a sorted list: a service port has one to a few frontends and revisions and
/// its endpoints' backends, and a `BTreeMap`'s node holds room for eleven entries (at 10,000
/// Services the three maps were a tenth of the agent's memory).
#[derive(Clone, Debug)]
struct VecMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap(Vec::new())
    }
}

impl<K: Ord, V> VecMap<K, V> {
    fn find(&self, key: &K) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.cmp(key))
    }
    fn get(&self, key: &K) -> Option<&V> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }
    fn contains_key(&self, key: &K) -> bool {
        self.find(key).is_ok()
    }
    fn insert(&mut self, key: K, value: V) {
        match self.find(&key) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (key, value)),
        }
    }
    fn remove(&mut self, key: &K) -> Option<V> {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }
    fn entry_or_default(&mut self, key: K) -> &mut V
    where
        V: Default,
    {
        let i = match self.find(&key) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (key, V::default()));
                i
            }
        };
        &mut self.0[i].1
    }
    fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.0.retain_mut(|(k, v)| keep(k, v));
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }
    fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }
    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<'a, K, V> IntoIterator for &'a VecMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

/// Slots to delete once their time has come.
#[derive(Debug)]
struct Retired {
    at: Instant,
    service: u32,
    rev: u32,
    count: u32,
    /// The Service is gone: its id goes back to the pool with these slots, not before (a new
    /// Service with the id would program the same slot keys, and lose them here).
    release: bool,
}

/// The programmed state of one node's service ports, over a map writer.
pub struct LbTable<M> {
    maps: M,
    ports: HashMap<ServicePortKey, Programmed>,
    service_ids: IdPool,
    frontend_ids: BTreeMap<FrontendKey, u32>,
    used_frontend_ids: IdPool,
    retired: VecDeque<Retired>,
    /// Frontends found at restore whose service port is unknown: removed by [`Self::retain`].
    orphans: Vec<FrontendKey>,
}

fn identity(key: &ServicePortKey) -> Result<ServiceIdentityValue, BpfError> {
    let mut value = ServiceIdentityValue::ZERO;
    let fields: [(&'static str, &mut [u8], &str); 3] = [
        ("service namespace", &mut value.namespace, &key.namespace),
        ("service name", &mut value.name, &key.name),
        ("service port name", &mut value.port_name, &key.port),
    ];
    for (what, dst, src) in fields {
        if !put_str(dst, src) {
            return Err(BpfError::Invalid {
                what,
                value: src.to_owned(),
                reason: "longer than 63 bytes or containing NUL",
            });
        }
    }
    Ok(value)
}

/// The service port an identity names; `None` when it does not decode.
pub fn decode_identity(value: &ServiceIdentityValue) -> Option<ServicePortKey> {
    Some(ServicePortKey {
        namespace: get_str(&value.namespace)?.to_owned(),
        name: get_str(&value.name)?.to_owned(),
        port: get_str(&value.port_name)?.to_owned(),
    })
}

/// Ids from 1 up, each handed out at most once at a time, the smallest free one first, in
/// O(log n): every id below `next` is either in use or in `free`.
#[derive(Debug)]
struct IdPool {
    next: u32,
    free: BTreeSet<u32>,
}

impl Default for IdPool {
    fn default() -> Self {
        IdPool {
            next: 1,
            free: BTreeSet::new(),
        }
    }
}

impl IdPool {
    /// The smallest id not in use, now in use.
    fn take(&mut self) -> u32 {
        match self.free.pop_first() {
            Some(id) => id,
            None => {
                self.next += 1;
                self.next - 1
            }
        }
    }

    /// Marks `id` in use (an id found in the maps at restore).
    fn claim(&mut self, id: u32) {
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
        } else {
            self.free.remove(&id);
        }
    }

    /// Gives `id` back.
    fn release(&mut self, id: u32) {
        if id != 0 && id < self.next {
            self.free.insert(id);
        }
    }
}

impl<M: LbMaps> LbTable<M> {
    /// Adopts what the maps hold (a previous agent's work, or nothing).
    pub fn restore(maps: M, now: Instant) -> Result<LbTable<M>, BpfError> {
        let mut table = LbTable {
            maps,
            ports: HashMap::new(),
            service_ids: IdPool::default(),
            frontend_ids: BTreeMap::new(),
            used_frontend_ids: IdPool::default(),
            retired: VecDeque::new(),
            orphans: Vec::new(),
        };
        let mut keys = BTreeMap::new();
        for (id, value) in table.maps.services()? {
            match decode_identity(&value) {
                Some(key) => {
                    keys.insert(id, key.clone());
                    table.service_ids.claim(id);
                    table.ports.insert(
                        key,
                        Programmed {
                            id,
                            ..Programmed::default()
                        },
                    );
                }
                None => table.maps.remove_service(id)?,
            }
        }
        for (key, value) in table.maps.frontends()? {
            table.frontend_ids.insert(key, value.id);
            table.used_frontend_ids.claim(value.id);
            match keys.get(&value.service) {
                Some(port) => {
                    let programmed = table.ports.get_mut(port).expect("inserted above");
                    programmed.rev = value.rev;
                    programmed.last_rev = programmed.last_rev.max(value.rev);
                    programmed.frontends.insert(key, value);
                }
                None => table.orphans.push(key),
            }
        }
        let mut by_service: HashMap<u32, &mut Programmed> =
            table.ports.values_mut().map(|p| (p.id, p)).collect();
        let mut stray = Vec::new();
        let mut slots: Vec<(SlotKey, SlotValue)> = table.maps.slots()?;
        slots.sort_by_key(|(k, _)| *k);
        for (key, value) in slots {
            match by_service.get_mut(&key.service) {
                Some(programmed) => {
                    let count = programmed.slot_revs.entry_or_default(key.rev);
                    *count = (*count).max(key.ordinal + 1);
                    programmed.last_rev = programmed.last_rev.max(key.rev);
                    if key.rev == programmed.rev && key.ordinal as usize == programmed.slots.len() {
                        programmed.slots.push(value);
                    }
                }
                None => stray.push(key),
            }
        }
        for (key, value) in table.maps.backends()? {
            match by_service.get_mut(&key.service) {
                Some(programmed) => {
                    programmed.backends.insert(key, value);
                }
                None => table.maps.remove_backend(&key)?,
            }
        }
        for key in stray {
            table.maps.remove_slot(&key)?;
        }
        for programmed in table.ports.values_mut() {
            let in_use: BTreeSet<u32> = programmed.frontends.values().map(|f| f.rev).collect();
            // The slots of the revision in force must be complete, else they are rewritten.
            let complete = programmed
                .frontends
                .values()
                .all(|f| f.rev == programmed.rev && usize::from(f.count) == programmed.slots.len());
            if !complete {
                programmed.slots.clear();
            }
            for (&rev, &count) in &programmed.slot_revs {
                if !in_use.contains(&rev) {
                    table.retired.push_back(Retired {
                        at: now,
                        service: programmed.id,
                        rev,
                        count,
                        release: false,
                    });
                }
            }
            programmed.slot_revs.retain(|rev, _| in_use.contains(rev));
        }
        Ok(table)
    }

    /// The map writer.
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The map writer, for the conntrack collector and the announcer.
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// The revision in force for a service port, if it is programmed.
    pub fn revision(&self, key: &ServicePortKey) -> Option<u32> {
        self.ports.get(key).map(|p| p.rev)
    }

    /// Every programmed service port.
    pub fn keys(&self) -> impl Iterator<Item = &ServicePortKey> {
        self.ports.keys()
    }

    /// Brings the maps in line with `desired` for the service port `key` (`None`: the port is
    /// gone). Returns the revision in force.
    pub fn reconcile(
        &mut self,
        key: &ServicePortKey,
        desired: Option<&ServicePort>,
        now: Instant,
    ) -> Result<Option<u32>, BpfError> {
        match desired {
            None => self.remove(key, now).map(|()| None),
            Some(port) => {
                let mut programmed = match self.ports.remove(key) {
                    Some(p) => p,
                    None => {
                        let value = identity(key)?;
                        let id = self.service_ids.take();
                        if let Err(e) = self.maps.put_service(id, &value) {
                            self.service_ids.release(id);
                            return Err(e);
                        }
                        Programmed {
                            id,
                            ..Programmed::default()
                        }
                    }
                };
                let result = self.apply(&mut programmed, port, now);
                self.retire_unused(&mut programmed, now);
                self.ports.insert(key.clone(), programmed);
                result.map(Some)
            }
        }
    }

    fn apply(
        &mut self,
        programmed: &mut Programmed,
        port: &ServicePort,
        now: Instant,
    ) -> Result<u32, BpfError> {
        let _ = now;
        let id = programmed.id;
        let slots: Vec<SlotValue> = port
            .backends
            .iter()
            .map(|b| SlotValue {
                addr: b.addr.octets(),
                port: b.port.to_be_bytes(),
                flags: backend_flags(b.remote, b.terminating),
                _pad: 0,
                rev: 0,
            })
            .collect();
        let backends: BTreeMap<BackendKey, BackendValue> = slots
            .iter()
            .map(|s| {
                (
                    BackendKey {
                        service: id,
                        addr: s.addr,
                        port: s.port,
                        _pad: [0; 2],
                    },
                    BackendValue {
                        flags: u32::from(s.flags),
                        _pad: 0,
                    },
                )
            })
            .collect();
        // 2. Backends gained (or changed).
        for (key, value) in &backends {
            if programmed.backends.get(key) != Some(value) {
                self.maps.put_backend(key, value)?;
                programmed.backends.insert(*key, *value);
            }
        }
        // 3. A new revision when the slots change.
        let unchanged = !programmed.slot_revs.is_empty()
            && programmed.slots.len() == slots.len()
            && programmed
                .slots
                .iter()
                .zip(&slots)
                .all(|(a, b)| SlotValue { rev: 0, ..*a } == *b);
        if !unchanged {
            let rev = programmed.last_rev.wrapping_add(1).max(1);
            programmed.last_rev = rev;
            programmed.slot_revs.insert(rev, slots.len() as u32);
            let mut written = Vec::with_capacity(slots.len());
            for (ordinal, slot) in slots.iter().enumerate() {
                let value = SlotValue { rev, ..*slot };
                self.maps.put_slot(
                    &SlotKey {
                        service: id,
                        rev,
                        ordinal: ordinal as u32,
                    },
                    &value,
                )?;
                written.push(value);
            }
            programmed.rev = rev;
            programmed.slots = written;
        }
        // 4. Each frontend switched in one update.
        let local = port.local_count();
        for frontend in &port.frontends {
            let fe_id = match self.frontend_ids.get(&frontend.key) {
                Some(&fe_id) => fe_id,
                None => {
                    let fe_id = self.used_frontend_ids.take();
                    self.frontend_ids.insert(frontend.key, fe_id);
                    fe_id
                }
            };
            let value = FrontendValue {
                service: id,
                rev: programmed.rev,
                count: u16::try_from(slots.len()).unwrap_or(u16::MAX),
                local: u16::try_from(local).unwrap_or(u16::MAX),
                flags: frontend.flags,
                kind: frontend.kind,
                _pad: 0,
                affinity_timeout: port.affinity_timeout,
                id: fe_id,
            };
            if programmed.frontends.get(&frontend.key) != Some(&value) {
                if let Err(e) = self.maps.put_frontend(&frontend.key, &value) {
                    if !programmed.frontends.contains_key(&frontend.key) {
                        self.forget_frontend_id(&frontend.key);
                    }
                    return Err(e);
                }
                programmed.frontends.insert(frontend.key, value);
            }
        }
        // 5. Frontends lost, then backends lost.
        let wanted: BTreeSet<FrontendKey> = port.frontends.iter().map(|f| f.key).collect();
        let lost: Vec<FrontendKey> = programmed
            .frontends
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in lost {
            self.remove_frontend(programmed, &key)?;
        }
        let gone: Vec<BackendKey> = programmed
            .backends
            .keys()
            .filter(|k| !backends.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.maps.remove_backend(&key)?;
            programmed.backends.remove(&key);
        }
        Ok(programmed.rev)
    }

    fn forget_frontend_id(&mut self, key: &FrontendKey) {
        if let Some(fe_id) = self.frontend_ids.remove(key) {
            self.used_frontend_ids.release(fe_id);
        }
    }

    fn remove_frontend(
        &mut self,
        programmed: &mut Programmed,
        key: &FrontendKey,
    ) -> Result<(), BpfError> {
        self.maps.remove_frontend(key)?;
        if let Some(value) = programmed.frontends.remove(key) {
            self.maps.remove_stats(value.id)?;
        }
        self.forget_frontend_id(key);
        Ok(())
    }

    /// Slots of revisions no frontend uses (other than the complete one in force) are retired.
    fn retire_unused(&mut self, programmed: &mut Programmed, now: Instant) {
        let mut in_use: BTreeSet<u32> = programmed.frontends.values().map(|f| f.rev).collect();
        if !programmed.frontends.is_empty() || !programmed.slots.is_empty() {
            in_use.insert(programmed.rev);
        }
        let unused: Vec<(u32, u32)> = programmed
            .slot_revs
            .iter()
            .filter(|(rev, _)| !in_use.contains(rev))
            .map(|(r, c)| (*r, *c))
            .collect();
        for (rev, count) in unused {
            programmed.slot_revs.remove(&rev);
            self.retired.push_back(Retired {
                at: now + RETIRE_AFTER,
                service: programmed.id,
                rev,
                count,
                release: false,
            });
        }
    }

    fn remove(&mut self, key: &ServicePortKey, now: Instant) -> Result<(), BpfError> {
        let Some(mut programmed) = self.ports.remove(key) else {
            return Ok(());
        };
        let result = (|| {
            let frontends: Vec<FrontendKey> = programmed.frontends.keys().copied().collect();
            for fe in frontends {
                self.remove_frontend(&mut programmed, &fe)?;
            }
            let backends: Vec<BackendKey> = programmed.backends.keys().copied().collect();
            for be in backends {
                self.maps.remove_backend(&be)?;
                programmed.backends.remove(&be);
            }
            Ok(())
        })();
        programmed.slots.clear();
        self.retire_unused(&mut programmed, now);
        if let Err(e) = result {
            self.ports.insert(key.clone(), programmed);
            return Err(e);
        }
        self.maps.remove_service(programmed.id)?;
        self.retired.push_back(Retired {
            at: now + RETIRE_AFTER,
            service: programmed.id,
            rev: 0,
            count: 0,
            release: true,
        });
        Ok(())
    }

    /// Removes every service port not in `keep` (after a full list), and the frontends a previous
    /// agent left without an identity.
    pub fn retain(
        &mut self,
        keep: &BTreeSet<ServicePortKey>,
        now: Instant,
    ) -> Result<(), BpfError> {
        for key in std::mem::take(&mut self.orphans) {
            self.maps.remove_frontend(&key)?;
            self.forget_frontend_id(&key);
        }
        let gone: Vec<ServicePortKey> = self
            .ports
            .keys()
            .filter(|k| !keep.contains(k))
            .cloned()
            .collect();
        for key in gone {
            self.remove(&key, now)?;
        }
        Ok(())
    }

    /// Deletes the retired slots whose time has come; returns how many are still waiting.
    pub fn collect(&mut self, now: Instant) -> Result<usize, BpfError> {
        while let Some(retired) = self.retired.front() {
            if retired.at > now {
                break;
            }
            for ordinal in 0..retired.count {
                self.maps.remove_slot(&SlotKey {
                    service: retired.service,
                    rev: retired.rev,
                    ordinal,
                })?;
            }
            if retired.release {
                self.service_ids.release(retired.service);
            }
            self.retired.pop_front();
        }
        Ok(self.retired.len())
    }
}

fn backend_flags(remote: bool, terminating: bool) -> u8 {
    let mut flags = 0;
    if !remote {
        flags |= BE_F_LOCAL;
    }
    if terminating {
        flags |= BE_F_TERMINATING;
    }
    flags
}

/// One backend as `skiffctl bpf lb list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendRow {
    /// `address:port`.
    pub address: String,
    /// `active` or `terminating`.
    pub state: &'static str,
    /// Whether it runs on this node.
    pub local: bool,
}

/// One frontend as `skiffctl bpf lb list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendRow {
    /// `address:port/protocol` (`0.0.0.0` for a NodePort: every address of the node).
    pub frontend: String,
    /// `ClusterIP`, `NodePort`, `LoadBalancer` or `ExternalIP`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `namespace/name:port`.
    pub service: String,
    /// The revision in force.
    pub revision: u32,
    /// `Local` when only this node's backends serve it (a traffic policy), else `Cluster`.
    pub policy: &'static str,
    /// Session affinity timeout in seconds (0: none).
    pub affinity_timeout: u32,
    /// The backends of that revision, in slot order.
    pub backends: Vec<BackendRow>,
    /// Packets and bytes through it (forward direction).
    pub packets: u64,
    /// See `packets`.
    pub bytes: u64,
}

/// `address:port` from network-order bytes.
pub fn endpoint(addr: [u8; 4], port: [u8; 2]) -> String {
    format!("{}:{}", Ipv4Addr::from(addr), u16::from_be_bytes(port))
}

/// A frontend as `address:port/PROTOCOL`.
pub fn frontend_text(key: &FrontendKey) -> String {
    format!("{}/{}", endpoint(key.addr, key.port), proto_name(key.proto))
}

/// `KIND_*` as the Service type that makes it.
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_CLUSTER_IP => "ClusterIP",
        KIND_NODE_PORT => "NodePort",
        KIND_LOAD_BALANCER => "LoadBalancer",
        KIND_EXTERNAL_IP => "ExternalIP",
        _ => "unknown",
    }
}

/// `PROTO_*` as a name.
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        _ => "?",
    }
}

/// Every frontend of `maps` with its backends, sorted by address, port and protocol: the
/// service map as the programs see it.
pub fn list(maps: &impl LbMaps) -> Result<Vec<FrontendRow>, BpfError> {
    let names: HashMap<u32, String> = maps
        .services()?
        .into_iter()
        .map(|(id, v)| {
            (
                id,
                decode_identity(&v).map_or_else(|| format!("#{id}"), |k| k.to_string()),
            )
        })
        .collect();
    let mut slots: BTreeMap<(u32, u32), Vec<(u32, SlotValue)>> = BTreeMap::new();
    for (key, value) in maps.slots()? {
        slots
            .entry((key.service, key.rev))
            .or_default()
            .push((key.ordinal, value));
    }
    let stats: HashMap<u32, FrontendStatsValue> = maps.stats()?.into_iter().collect();
    let mut frontends = maps.frontends()?;
    frontends.sort_by_key(|(k, _)| (k.addr, u16::from_be_bytes(k.port), k.proto));
    Ok(frontends
        .into_iter()
        .map(|(key, value)| {
            let mut backends = slots
                .get(&(value.service, value.rev))
                .cloned()
                .unwrap_or_default();
            backends.sort_by_key(|(ordinal, _)| *ordinal);
            let stats = stats.get(&value.id).copied().unwrap_or_default();
            FrontendRow {
                frontend: frontend_text(&key),
                kind: kind_name(value.kind),
                service: names
                    .get(&value.service)
                    .cloned()
                    .unwrap_or_else(|| format!("#{}", value.service)),
                revision: value.rev,
                policy: if value.flags & (FE_F_LOCAL_INTERNAL | FE_F_LOCAL_EXTERNAL) != 0 {
                    "Local"
                } else {
                    "Cluster"
                },
                affinity_timeout: value.affinity_timeout,
                backends: backends
                    .into_iter()
                    .take(usize::from(value.count))
                    .map(|(_, slot)| BackendRow {
                        address: endpoint(slot.addr, slot.port),
                        state: if slot.flags & BE_F_TERMINATING != 0 {
                            "terminating"
                        } else {
                            "active"
                        },
                        local: slot.flags & BE_F_LOCAL != 0,
                    })
                    .collect(),
                packets: stats.packets,
                bytes: stats.bytes,
            }
        })
        .collect())
}

/// The rows as text, one frontend per line: `frontend type service rev=R policy -> backends`.
pub fn render(rows: &[FrontendRow]) -> String {
    let mut out = String::new();
    for row in rows {
        let backends: Vec<String> = row
            .backends
            .iter()
            .map(|b| {
                format!(
                    "{}({}{})",
                    b.address,
                    b.state,
                    if b.local { ",local" } else { "" }
                )
            })
            .collect();
        out.push_str(&format!(
            "{} {} {} rev={} {}{} -> {}\n",
            row.frontend,
            row.kind,
            row.service,
            row.revision,
            row.policy,
            if row.affinity_timeout > 0 {
                format!(" affinity={}s", row.affinity_timeout)
            } else {
                String::new()
            },
            if backends.is_empty() {
                "(none)".to_owned()
            } else {
                backends.join(" ")
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::lb_fake::FakeLbMaps;
    use crate::services::model::desired;
    use crate::services::model::tests::{service, slice};
    use serde_json::json;

    #[test]
    fn ids_are_the_smallest_free_ones() {
        let mut pool = IdPool::default();
        assert_eq!([pool.take(), pool.take()], [1, 2]);
        // Restored ids leave their gaps free.
        pool.claim(5);
        pool.claim(3);
        assert_eq!([pool.take(), pool.take(), pool.take()], [4, 6, 7]);
        pool.release(2);
        pool.release(6);
        assert_eq!([pool.take(), pool.take(), pool.take()], [2, 6, 8]);
    }

    fn svc(type_: &str, extra: serde_json::Value) -> crate::services::objects::LbService {
        let mut spec = json!({
            "type": type_, "clusterIP": "10.96.0.20",
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]
        });
        for (k, v) in extra.as_object().expect("object") {
            spec[k] = v.clone();
        }
        service(json!({"metadata": {"namespace": "default", "name": "web"}, "spec": spec}))
    }

    fn eps(endpoints: &[(&str, &str, bool)]) -> crate::services::objects::LbSlice {
        let endpoints: Vec<_> = endpoints
            .iter()
            .map(|(ip, node, ready)| {
                json!({"addresses": [ip], "nodeName": node,
                       "conditions": {"ready": ready, "serving": true, "terminating": !ready}})
            })
            .collect();
        slice(json!({
            "metadata": {"namespace": "default", "name": "web-1",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": endpoints
        }))
    }

    fn sync(
        table: &mut LbTable<FakeLbMaps>,
        service: &crate::services::objects::LbService,
        slices: &[crate::services::objects::LbSlice],
        now: Instant,
    ) {
        for port in desired(service, slices, "n1") {
            table
                .reconcile(&port.key, Some(&port), now)
                .expect("reconcile");
        }
    }

    fn dump(table: &LbTable<FakeLbMaps>) -> String {
        render(&list(table.maps()).expect("list"))
    }

    /// Data-driven: objects in, the map dump out.
    #[test]
    fn objects_in_map_dump_out() {
        let cases = [
            (
                svc("ClusterIP", json!({})),
                vec![eps(&[
                    ("10.244.2.5", "n2", true),
                    ("10.244.1.9", "n1", true),
                ])],
                "10.96.0.20:80/TCP ClusterIP default/web:http rev=1 Cluster -> 10.244.1.9:8080(active,local) 10.244.2.5:8080(active)\n",
            ),
            (
                svc(
                    "NodePort",
                    json!({"externalTrafficPolicy": "Local", "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
                ),
                vec![eps(&[
                    ("10.244.2.5", "n2", true),
                    ("10.244.1.3", "n1", false),
                ])],
                "0.0.0.0:30080/TCP NodePort default/web:http rev=1 Local affinity=60s -> 10.244.2.5:8080(active)\n\
                 10.96.0.20:80/TCP ClusterIP default/web:http rev=1 Cluster affinity=60s -> 10.244.2.5:8080(active)\n",
            ),
            (
                svc("ClusterIP", json!({})),
                vec![eps(&[("10.244.1.3", "n1", false)])],
                "10.96.0.20:80/TCP ClusterIP default/web:http rev=1 Cluster -> 10.244.1.3:8080(terminating,local)\n",
            ),
            (
                svc("ClusterIP", json!({})),
                vec![],
                "10.96.0.20:80/TCP ClusterIP default/web:http rev=1 Cluster -> (none)\n",
            ),
        ];
        let now = Instant::now();
        for (service, slices, expected) in cases {
            let mut table = LbTable::restore(FakeLbMaps::new(1024), now).expect("restore");
            sync(&mut table, &service, &slices, now);
            assert_eq!(dump(&table), expected, "{service:?}");
            // Idempotent: a second pass writes nothing.
            let writes = table.maps().writes;
            sync(&mut table, &service, &slices, now);
            assert_eq!(table.maps().writes, writes, "nothing rewritten");
        }
    }

    #[test]
    fn a_change_switches_revision_and_old_slots_go_a_second_later() {
        let now = Instant::now();
        let mut table = LbTable::restore(FakeLbMaps::new(1024), now).expect("restore");
        let service = svc("ClusterIP", json!({}));
        sync(
            &mut table,
            &service,
            &[eps(&[("10.244.2.5", "n2", true)])],
            now,
        );
        sync(
            &mut table,
            &service,
            &[eps(&[
                ("10.244.2.5", "n2", true),
                ("10.244.3.5", "n3", true),
            ])],
            now,
        );
        assert_eq!(
            dump(&table),
            "10.96.0.20:80/TCP ClusterIP default/web:http rev=2 Cluster -> 10.244.2.5:8080(active) 10.244.3.5:8080(active)\n"
        );
        assert_eq!(table.maps().slots.len(), 3, "rev 1's slot is still there");
        assert_eq!(table.collect(now).expect("collect"), 1, "not yet");
        assert_eq!(table.collect(now + RETIRE_AFTER).expect("collect"), 0);
        assert_eq!(table.maps().slots.len(), 2);
        assert!(table.maps().slots.keys().all(|k| k.rev == 2));
        // Scale to one: a backend removed leaves the backend map too.
        sync(
            &mut table,
            &service,
            &[eps(&[("10.244.3.5", "n3", true)])],
            now,
        );
        assert_eq!(table.maps().backends.len(), 1);
    }

    /// A Service removed and another created at once (a `kubectl delete` then `apply`): the
    /// new one must not get the old one's id while the old one's slots wait to be deleted, or
    /// their deletion takes the new one's slots of the same revision with them (found by
    /// cluster_e2e: the new Service answered nothing).
    #[test]
    fn a_removed_services_id_is_not_reused_before_its_slots_are_gone() {
        let now = Instant::now();
        let mut table = LbTable::restore(FakeLbMaps::new(1024), now).expect("restore");
        let old = svc("ClusterIP", json!({}));
        sync(&mut table, &old, &[], now);
        sync(&mut table, &old, &[eps(&[("10.244.2.5", "n2", true)])], now);
        for port in desired(&old, &[], "n1") {
            table.reconcile(&port.key, None, now).expect("removed");
        }
        let new = service(
            json!({"metadata": {"namespace": "default", "name": "names"},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.30",
                     "ports": [{"name": "http", "port": 80}]}}),
        );
        let mut names = eps(&[("10.244.3.7", "n3", true)]);
        names.metadata.name = Some("names-1".into());
        names
            .metadata
            .labels
            .as_mut()
            .expect("labels")
            .insert("kubernetes.io/service-name".into(), "names".into());
        sync(&mut table, &new, &[], now);
        sync(&mut table, &new, &[names], now);
        table.collect(now + RETIRE_AFTER).expect("collect");
        assert_eq!(
            dump(&table),
            "10.96.0.30:80/TCP ClusterIP default/names:http rev=2 Cluster -> 10.244.3.7:8080(active)\n"
        );
        // Once the old slots are gone, the id is free again.
        assert_eq!(table.collect(now + RETIRE_AFTER * 2).expect("collect"), 0);
        assert!(
            table.service_ids.take() < 3,
            "the old id came back to the pool"
        );
    }

    #[test]
    fn a_full_map_is_an_error_naming_it_and_a_retry_finishes_the_job() {
        let now = Instant::now();
        let mut table = LbTable::restore(FakeLbMaps::new(1), now).expect("restore");
        let service = svc("ClusterIP", json!({}));
        let two = [eps(&[
            ("10.244.2.5", "n2", true),
            ("10.244.3.5", "n3", true),
        ])];
        let port = &desired(&service, &two, "n1")[0];
        let err = table
            .reconcile(&port.key, Some(port), now)
            .expect_err("the slot map holds one");
        assert!(err.to_string().contains("SKF_LBSLOT_V1"), "{err}");
        assert!(
            table.maps().frontends.is_empty(),
            "no frontend points at half-written slots"
        );
        table.maps_mut().max_slots = 8;
        table.collect(now + RETIRE_AFTER).expect("collect");
        table.reconcile(&port.key, Some(port), now).expect("retry");
        table.collect(now + RETIRE_AFTER * 2).expect("collect");
        assert_eq!(
            dump(&table),
            "10.96.0.20:80/TCP ClusterIP default/web:http rev=2 Cluster -> 10.244.2.5:8080(active) 10.244.3.5:8080(active)\n",
            "a new revision, never the failed one's"
        );
        assert_eq!(
            table.maps().slots.len(),
            2,
            "the failed revision's slot is gone"
        );
    }

    #[test]
    fn faults_at_every_write_converge_on_retry() {
        let service = svc("LoadBalancer", json!({}));
        let slices = [eps(&[
            ("10.244.2.5", "n2", true),
            ("10.244.1.9", "n1", true),
        ])];
        let now = Instant::now();
        let mut reference = LbTable::restore(FakeLbMaps::new(64), now).expect("restore");
        sync(&mut reference, &service, &slices, now);
        let expected = dump(&reference);
        for fail_at in 0..reference.maps().writes {
            let mut maps = FakeLbMaps::new(64);
            maps.writes_left = Some(fail_at);
            let mut table = LbTable::restore(maps, now).expect("restore");
            for port in desired(&service, &slices, "n1") {
                let _ = table.reconcile(&port.key, Some(&port), now);
            }
            table.maps_mut().writes_left = None;
            sync(&mut table, &service, &slices, now);
            table.collect(now + RETIRE_AFTER).expect("collect");
            assert_eq!(
                dump(&table),
                expected.replace(
                    "rev=1",
                    &format!(
                        "rev={}",
                        table
                            .revision(&desired(&service, &slices, "n1")[0].key)
                            .expect("programmed")
                    )
                ),
                "fault at write {fail_at}"
            );
        }
    }

    #[test]
    fn restore_adopts_the_pins_and_a_resync_rewrites_nothing() {
        let now = Instant::now();
        let service = svc("NodePort", json!({}));
        let slices = [eps(&[("10.244.2.5", "n2", true)])];
        let mut first = LbTable::restore(FakeLbMaps::new(64), now).expect("restore");
        sync(&mut first, &service, &slices, now);
        let before = dump(&first);
        let maps = std::mem::take(first.maps_mut());
        let mut second = LbTable::restore(maps, now).expect("restore");
        let writes = second.maps().writes;
        sync(&mut second, &service, &slices, now);
        assert_eq!(
            second.maps().writes,
            writes,
            "nothing rewritten after a restart"
        );
        assert_eq!(dump(&second), before);
        // The Service deleted while the agent was down: a full sync removes it.
        second.retain(&BTreeSet::new(), now).expect("retain");
        second.collect(now + RETIRE_AFTER).expect("collect");
        let maps = second.maps();
        assert!(maps.frontends.is_empty() && maps.slots.is_empty());
        assert!(maps.backends.is_empty() && maps.services.is_empty());
    }
}
