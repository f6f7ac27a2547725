//! The one layer that touches the load-balancing maps: [`LbMaps`], and its aya implementation
//! over a node's pinned maps ([`AyaLbMaps`]). Tests use the in-memory fake with its fault
//! injector (`lb_fake`).

use std::path::Path;

use aya::Pod;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use skiff_ebpf_common::lb::*;

use super::BpfError;
use super::maps::{found, map_error};

/// Every entry of a map, summed over CPUs where the map is per-CPU.
pub type Entries<K, V> = Vec<(K, V)>;

/// The load-balancing maps, as the reconcilers see them. Removing an absent key is not an error;
/// a full map is an error naming the map.
pub trait LbMaps {
    /// Every frontend.
    fn frontends(&self) -> Result<Entries<FrontendKey, FrontendValue>, BpfError>;
    /// Writes a frontend (one update: readers see the old value or the new one).
    fn put_frontend(&mut self, key: &FrontendKey, value: &FrontendValue) -> Result<(), BpfError>;
    /// Removes a frontend.
    fn remove_frontend(&mut self, key: &FrontendKey) -> Result<(), BpfError>;
    /// Every slot.
    fn slots(&self) -> Result<Entries<SlotKey, SlotValue>, BpfError>;
    /// Writes a slot.
    fn put_slot(&mut self, key: &SlotKey, value: &SlotValue) -> Result<(), BpfError>;
    /// Removes a slot.
    fn remove_slot(&mut self, key: &SlotKey) -> Result<(), BpfError>;
    /// Every backend.
    fn backends(&self) -> Result<Entries<BackendKey, BackendValue>, BpfError>;
    /// Writes a backend.
    fn put_backend(&mut self, key: &BackendKey, value: &BackendValue) -> Result<(), BpfError>;
    /// Removes a backend.
    fn remove_backend(&mut self, key: &BackendKey) -> Result<(), BpfError>;
    /// Every service port's identity.
    fn services(&self) -> Result<Entries<u32, ServiceIdentityValue>, BpfError>;
    /// Writes a service port's identity.
    fn put_service(&mut self, id: u32, value: &ServiceIdentityValue) -> Result<(), BpfError>;
    /// Removes a service port's identity.
    fn remove_service(&mut self, id: u32) -> Result<(), BpfError>;
    /// Every frontend's statistics, summed over CPUs.
    fn stats(&self) -> Result<Entries<u32, FrontendStatsValue>, BpfError>;
    /// Removes a frontend's statistics.
    fn remove_stats(&mut self, id: u32) -> Result<(), BpfError>;
    /// The node's settings.
    fn config(&self) -> Result<NodeConfig, BpfError>;
    /// Writes the node's settings.
    fn set_config(&mut self, config: &NodeConfig) -> Result<(), BpfError>;
    /// Every announced LoadBalancer IP.
    fn announced(&self) -> Result<Entries<[u8; 4], L2AnnounceValue>, BpfError>;
    /// Announces a LoadBalancer IP.
    fn put_announced(&mut self, addr: [u8; 4], value: &L2AnnounceValue) -> Result<(), BpfError>;
    /// Stops announcing a LoadBalancer IP.
    fn remove_announced(&mut self, addr: [u8; 4]) -> Result<(), BpfError>;
    /// Every conntrack entry.
    fn conntrack(&self) -> Result<Entries<CtKey, CtValue>, BpfError>;
    /// One conntrack entry.
    fn conntrack_entry(&self, key: &CtKey) -> Result<Option<CtValue>, BpfError>;
    /// Removes a conntrack entry.
    fn remove_conntrack(&mut self, key: &CtKey) -> Result<(), BpfError>;
    /// The error and event counters, summed over CPUs, by `ERR_*`/`EV_*` index.
    fn errors(&self) -> Result<[u64; ERROR_KINDS as usize], BpfError>;
}

fn open_pin(maps_dir: &Path, name: &'static str) -> Result<MapData, BpfError> {
    MapData::from_pin(maps_dir.join(name)).map_err(map_error(name, "open its pin"))
}

/// A hash map of the node and its name.
struct Table<K, V> {
    name: &'static str,
    map: HashMap<MapData, K, V>,
}

impl<K: Pod, V: Pod> Table<K, V> {
    fn open(maps_dir: &Path, name: &'static str, lru: bool) -> Result<Self, BpfError> {
        let data = open_pin(maps_dir, name)?;
        let map = if lru {
            Map::LruHashMap(data)
        } else {
            Map::HashMap(data)
        };
        let map = HashMap::try_from(map).map_err(map_error(name, "check its layout"))?;
        Ok(Table { name, map })
    }

    fn entries(&self) -> Result<Entries<K, V>, BpfError> {
        let mut all = Vec::new();
        for entry in self.map.iter() {
            // An entry removed while iterating shows up as KeyNotFound: skip it.
            if let Some(entry) = found(entry).map_err(map_error(self.name, "iterate"))? {
                all.push(entry);
            }
        }
        Ok(all)
    }

    fn get(&self, key: &K) -> Result<Option<V>, BpfError> {
        found(self.map.get(key, 0)).map_err(map_error(self.name, "read an entry"))
    }

    fn put(&mut self, key: &K, value: &V) -> Result<(), BpfError> {
        self.map
            .insert(key, value, 0)
            .map_err(map_error(self.name, "write an entry (is it full?)"))
    }

    fn remove(&mut self, key: &K) -> Result<(), BpfError> {
        found(self.map.remove(key))
            .map(drop)
            .map_err(map_error(self.name, "remove an entry"))
    }
}

/// The load-balancing maps pinned for one node, through aya.
pub struct AyaLbMaps {
    frontends: Table<FrontendKey, FrontendValue>,
    slots: Table<SlotKey, SlotValue>,
    backends: Table<BackendKey, BackendValue>,
    services: Table<u32, ServiceIdentityValue>,
    stats: PerCpuHashMap<MapData, u32, FrontendStatsValue>,
    conntrack: Table<CtKey, CtValue>,
    config: Array<MapData, NodeConfig>,
    announced: Table<[u8; 4], L2AnnounceValue>,
    errors: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for AyaLbMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AyaLbMaps").finish_non_exhaustive()
    }
}

impl AyaLbMaps {
    /// Opens the maps pinned in `maps_dir`.
    pub fn open(maps_dir: &Path) -> Result<AyaLbMaps, BpfError> {
        let stats = PerCpuHashMap::try_from(Map::PerCpuHashMap(open_pin(maps_dir, LB_STATS_MAP)?))
            .map_err(map_error(LB_STATS_MAP, "check its layout"))?;
        let config = Array::try_from(Map::Array(open_pin(maps_dir, NODE_CONFIG_MAP)?))
            .map_err(map_error(NODE_CONFIG_MAP, "check its layout"))?;
        let errors = PerCpuArray::try_from(Map::PerCpuArray(open_pin(maps_dir, ERRORS_MAP)?))
            .map_err(map_error(ERRORS_MAP, "check its layout"))?;
        Ok(AyaLbMaps {
            frontends: Table::open(maps_dir, LB_FRONTEND_MAP, false)?,
            slots: Table::open(maps_dir, LB_SLOT_MAP, false)?,
            backends: Table::open(maps_dir, LB_BACKEND_MAP, false)?,
            services: Table::open(maps_dir, LB_SERVICE_MAP, false)?,
            stats,
            conntrack: Table::open(maps_dir, CT_MAP, false)?,
            config,
            announced: Table::open(maps_dir, L2_ANNOUNCE_MAP, false)?,
            errors,
        })
    }
}

impl LbMaps for AyaLbMaps {
    fn frontends(&self) -> Result<Entries<FrontendKey, FrontendValue>, BpfError> {
        self.frontends.entries()
    }
    fn put_frontend(&mut self, key: &FrontendKey, value: &FrontendValue) -> Result<(), BpfError> {
        self.frontends.put(key, value)
    }
    fn remove_frontend(&mut self, key: &FrontendKey) -> Result<(), BpfError> {
        self.frontends.remove(key)
    }
    fn slots(&self) -> Result<Entries<SlotKey, SlotValue>, BpfError> {
        self.slots.entries()
    }
    fn put_slot(&mut self, key: &SlotKey, value: &SlotValue) -> Result<(), BpfError> {
        self.slots.put(key, value)
    }
    fn remove_slot(&mut self, key: &SlotKey) -> Result<(), BpfError> {
        self.slots.remove(key)
    }
    fn backends(&self) -> Result<Entries<BackendKey, BackendValue>, BpfError> {
        self.backends.entries()
    }
    fn put_backend(&mut self, key: &BackendKey, value: &BackendValue) -> Result<(), BpfError> {
        self.backends.put(key, value)
    }
    fn remove_backend(&mut self, key: &BackendKey) -> Result<(), BpfError> {
        self.backends.remove(key)
    }
    fn services(&self) -> Result<Entries<u32, ServiceIdentityValue>, BpfError> {
        self.services.entries()
    }
    fn put_service(&mut self, id: u32, value: &ServiceIdentityValue) -> Result<(), BpfError> {
        self.services.put(&id, value)
    }
    fn remove_service(&mut self, id: u32) -> Result<(), BpfError> {
        self.services.remove(&id)
    }
    fn stats(&self) -> Result<Entries<u32, FrontendStatsValue>, BpfError> {
        let mut all = Vec::new();
        for entry in self.stats.iter() {
            let Some((id, per_cpu)) = found(entry).map_err(map_error(LB_STATS_MAP, "iterate"))?
            else {
                continue;
            };
            let sum =
                per_cpu
                    .iter()
                    .fold(FrontendStatsValue::default(), |s, v| FrontendStatsValue {
                        packets: s.packets.wrapping_add(v.packets),
                        bytes: s.bytes.wrapping_add(v.bytes),
                    });
            all.push((id, sum));
        }
        Ok(all)
    }
    fn remove_stats(&mut self, id: u32) -> Result<(), BpfError> {
        found(self.stats.remove(&id))
            .map(drop)
            .map_err(map_error(LB_STATS_MAP, format!("remove {id}")))
    }
    fn config(&self) -> Result<NodeConfig, BpfError> {
        self.config
            .get(&0, 0)
            .map_err(map_error(NODE_CONFIG_MAP, "read"))
    }
    fn set_config(&mut self, config: &NodeConfig) -> Result<(), BpfError> {
        self.config
            .set(0, config, 0)
            .map_err(map_error(NODE_CONFIG_MAP, "write"))
    }
    fn announced(&self) -> Result<Entries<[u8; 4], L2AnnounceValue>, BpfError> {
        self.announced.entries()
    }
    fn put_announced(&mut self, addr: [u8; 4], value: &L2AnnounceValue) -> Result<(), BpfError> {
        self.announced.put(&addr, value)
    }
    fn remove_announced(&mut self, addr: [u8; 4]) -> Result<(), BpfError> {
        self.announced.remove(&addr)
    }
    fn conntrack(&self) -> Result<Entries<CtKey, CtValue>, BpfError> {
        self.conntrack.entries()
    }
    fn conntrack_entry(&self, key: &CtKey) -> Result<Option<CtValue>, BpfError> {
        self.conntrack.get(key)
    }
    fn remove_conntrack(&mut self, key: &CtKey) -> Result<(), BpfError> {
        self.conntrack.remove(key)
    }
    fn errors(&self) -> Result<[u64; ERROR_KINDS as usize], BpfError> {
        let mut sums = [0u64; ERROR_KINDS as usize];
        for (index, sum) in sums.iter_mut().enumerate() {
            let per_cpu = self
                .errors
                .get(&(index as u32), 0)
                .map_err(map_error(ERRORS_MAP, "read"))?;
            *sum = per_cpu.iter().fold(0u64, |s, v| s.wrapping_add(*v));
        }
        Ok(sums)
    }
}
