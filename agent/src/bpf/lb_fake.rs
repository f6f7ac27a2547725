//! An in-memory [`LbMaps`] with the kernel maps' capacities, and a fault injector: the
//! reconcilers' tests run against it without root.

use std::collections::BTreeMap;

use aya::maps::MapError;
use skiff_ebpf_common::lb::*;

use super::BpfError;
use super::lb::{Entries, LbMaps};

/// The maps of one node, in memory.
#[derive(Debug, Default)]
pub struct FakeLbMaps {
    /// Frontends.
    pub frontends: BTreeMap<FrontendKey, FrontendValue>,
    /// Slots.
    pub slots: BTreeMap<SlotKey, SlotValue>,
    /// Backends.
    pub backends: BTreeMap<BackendKey, BackendValue>,
    /// Service identities.
    pub services: BTreeMap<u32, ServiceIdentityValue>,
    /// Frontend statistics.
    pub stats: BTreeMap<u32, FrontendStatsValue>,
    /// Conntrack.
    pub conntrack: BTreeMap<CtKey, CtValue>,
    /// Node settings.
    pub config: NodeConfig,
    /// Announced IPs.
    pub announced: BTreeMap<[u8; 4], L2AnnounceValue>,
    /// Error counters.
    pub errors: [u64; ERROR_KINDS as usize],
    /// Capacity of the slot map (the others are unbounded).
    pub max_slots: usize,
    /// Writes (puts) that succeed before every later write fails; `None`: no fault.
    pub writes_left: Option<usize>,
    /// How many writes were made.
    pub writes: usize,
}

impl FakeLbMaps {
    /// Empty maps, with room for `max_slots` slots.
    pub fn new(max_slots: usize) -> Self {
        FakeLbMaps {
            max_slots,
            ..FakeLbMaps::default()
        }
    }

    fn write(&mut self, map: &'static str) -> Result<(), BpfError> {
        self.writes += 1;
        match &mut self.writes_left {
            Some(0) => Err(BpfError::Map {
                map,
                action: "write an entry (injected fault)".into(),
                source: Box::new(MapError::KeyNotFound),
            }),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

fn entries<K: Copy, V: Copy>(map: &BTreeMap<K, V>) -> Entries<K, V> {
    map.iter().map(|(k, v)| (*k, *v)).collect()
}

impl LbMaps for FakeLbMaps {
    fn frontends(&self) -> Result<Entries<FrontendKey, FrontendValue>, BpfError> {
        Ok(entries(&self.frontends))
    }
    fn put_frontend(&mut self, key: &FrontendKey, value: &FrontendValue) -> Result<(), BpfError> {
        self.write(LB_FRONTEND_MAP)?;
        self.frontends.insert(*key, *value);
        Ok(())
    }
    fn remove_frontend(&mut self, key: &FrontendKey) -> Result<(), BpfError> {
        self.frontends.remove(key);
        Ok(())
    }
    fn slots(&self) -> Result<Entries<SlotKey, SlotValue>, BpfError> {
        Ok(entries(&self.slots))
    }
    fn put_slot(&mut self, key: &SlotKey, value: &SlotValue) -> Result<(), BpfError> {
        self.write(LB_SLOT_MAP)?;
        if !self.slots.contains_key(key) && self.slots.len() >= self.max_slots {
            return Err(BpfError::Map {
                map: LB_SLOT_MAP,
                action: "write an entry (is it full?)".into(),
                source: Box::new(MapError::KeyNotFound),
            });
        }
        self.slots.insert(*key, *value);
        Ok(())
    }
    fn remove_slot(&mut self, key: &SlotKey) -> Result<(), BpfError> {
        self.slots.remove(key);
        Ok(())
    }
    fn backends(&self) -> Result<Entries<BackendKey, BackendValue>, BpfError> {
        Ok(entries(&self.backends))
    }
    fn put_backend(&mut self, key: &BackendKey, value: &BackendValue) -> Result<(), BpfError> {
        self.write(LB_BACKEND_MAP)?;
        self.backends.insert(*key, *value);
        Ok(())
    }
    fn remove_backend(&mut self, key: &BackendKey) -> Result<(), BpfError> {
        self.backends.remove(key);
        Ok(())
    }
    fn services(&self) -> Result<Entries<u32, ServiceIdentityValue>, BpfError> {
        Ok(entries(&self.services))
    }
    fn put_service(&mut self, id: u32, value: &ServiceIdentityValue) -> Result<(), BpfError> {
        self.write(LB_SERVICE_MAP)?;
        self.services.insert(id, *value);
        Ok(())
    }
    fn remove_service(&mut self, id: u32) -> Result<(), BpfError> {
        self.services.remove(&id);
        Ok(())
    }
    fn stats(&self) -> Result<Entries<u32, FrontendStatsValue>, BpfError> {
        Ok(entries(&self.stats))
    }
    fn remove_stats(&mut self, id: u32) -> Result<(), BpfError> {
        self.stats.remove(&id);
        Ok(())
    }
    fn config(&self) -> Result<NodeConfig, BpfError> {
        Ok(self.config)
    }
    fn set_config(&mut self, config: &NodeConfig) -> Result<(), BpfError> {
        self.write(NODE_CONFIG_MAP)?;
        self.config = *config;
        Ok(())
    }
    fn announced(&self) -> Result<Entries<[u8; 4], L2AnnounceValue>, BpfError> {
        Ok(entries(&self.announced))
    }
    fn put_announced(&mut self, addr: [u8; 4], value: &L2AnnounceValue) -> Result<(), BpfError> {
        self.write(L2_ANNOUNCE_MAP)?;
        self.announced.insert(addr, *value);
        Ok(())
    }
    fn remove_announced(&mut self, addr: [u8; 4]) -> Result<(), BpfError> {
        self.announced.remove(&addr);
        Ok(())
    }
    fn conntrack(&self) -> Result<Entries<CtKey, CtValue>, BpfError> {
        Ok(entries(&self.conntrack))
    }
    fn conntrack_entry(&self, key: &CtKey) -> Result<Option<CtValue>, BpfError> {
        Ok(self.conntrack.get(key).copied())
    }
    fn remove_conntrack(&mut self, key: &CtKey) -> Result<(), BpfError> {
        self.conntrack.remove(key);
        Ok(())
    }
    fn errors(&self) -> Result<[u64; ERROR_KINDS as usize], BpfError> {
        Ok(self.errors)
    }
}
