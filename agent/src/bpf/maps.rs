//! The one layer that touches BPF maps: [`MapWriter`], and its aya implementation over the
//! pinned maps.

use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuHashMap, PerCpuValues};
use skiff_ebpf_common::{
    POD_COUNTERS_MAP, POD_IDENTITY_MAP, PodCountersValue, PodIdentityValue, PodKey,
};

use super::BpfError;

/// The pod maps, as the logic above sees them. Removing an absent key is not an error.
pub trait MapWriter {
    /// Every pod identity, by key.
    fn identities(&self) -> Result<Vec<(PodKey, PodIdentityValue)>, BpfError>;
    /// The identity of one key.
    fn identity(&self, key: PodKey) -> Result<Option<PodIdentityValue>, BpfError>;
    /// Writes the identity of a key.
    fn put_identity(&mut self, key: PodKey, value: &PodIdentityValue) -> Result<(), BpfError>;
    /// Removes the identity of a key.
    fn remove_identity(&mut self, key: PodKey) -> Result<(), BpfError>;
    /// The counters of a key, summed over CPUs.
    fn counters(&self, key: PodKey) -> Result<Option<PodCountersValue>, BpfError>;
    /// Sets the counters of a key to zero on every CPU.
    fn reset_counters(&mut self, key: PodKey) -> Result<(), BpfError>;
    /// Removes the counters of a key.
    fn remove_counters(&mut self, key: PodKey) -> Result<(), BpfError>;
}

/// The pinned maps of one node, through aya.
pub struct AyaMaps {
    counters: PerCpuHashMap<MapData, PodKey, PodCountersValue>,
    identities: HashMap<MapData, PodKey, PodIdentityValue>,
}

/// A map error as a [`BpfError`] naming the map and what was being done.
pub(crate) fn map_error(
    map: &'static str,
    action: impl Into<String>,
) -> impl FnOnce(MapError) -> BpfError {
    let action = action.into();
    move |source| BpfError::Map {
        map,
        action,
        source: Box::new(source),
    }
}

/// A missing key (`KeyNotFound` from a lookup, ENOENT from a delete) as `None`.
pub(crate) fn found<T>(result: Result<T, MapError>) -> Result<Option<T>, MapError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc_enoent()) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn libc_enoent() -> i32 {
    nix::errno::Errno::ENOENT as i32
}

impl AyaMaps {
    /// Opens the maps pinned in `maps_dir` (named after the shared constants).
    pub fn open(maps_dir: &Path) -> Result<AyaMaps, BpfError> {
        let counters = MapData::from_pin(maps_dir.join(POD_COUNTERS_MAP))
            .map_err(map_error(POD_COUNTERS_MAP, "open its pin"))?;
        let counters = PerCpuHashMap::try_from(Map::PerCpuHashMap(counters))
            .map_err(map_error(POD_COUNTERS_MAP, "check its layout"))?;
        let identities = MapData::from_pin(maps_dir.join(POD_IDENTITY_MAP))
            .map_err(map_error(POD_IDENTITY_MAP, "open its pin"))?;
        let identities = HashMap::try_from(Map::HashMap(identities))
            .map_err(map_error(POD_IDENTITY_MAP, "check its layout"))?;
        Ok(AyaMaps {
            counters,
            identities,
        })
    }
}

impl MapWriter for AyaMaps {
    fn identities(&self) -> Result<Vec<(PodKey, PodIdentityValue)>, BpfError> {
        let mut all = Vec::new();
        for entry in self.identities.iter() {
            // An entry removed while iterating shows up as KeyNotFound: skip it.
            if let Some(entry) = found(entry).map_err(map_error(POD_IDENTITY_MAP, "iterate"))? {
                all.push(entry);
            }
        }
        Ok(all)
    }

    fn identity(&self, key: PodKey) -> Result<Option<PodIdentityValue>, BpfError> {
        found(self.identities.get(&key, 0))
            .map_err(map_error(POD_IDENTITY_MAP, format!("read {key}")))
    }

    fn put_identity(&mut self, key: PodKey, value: &PodIdentityValue) -> Result<(), BpfError> {
        self.identities
            .insert(key, value, 0)
            .map_err(map_error(POD_IDENTITY_MAP, format!("write {key}")))
    }

    fn remove_identity(&mut self, key: PodKey) -> Result<(), BpfError> {
        found(self.identities.remove(&key))
            .map(drop)
            .map_err(map_error(POD_IDENTITY_MAP, format!("remove {key}")))
    }

    fn counters(&self, key: PodKey) -> Result<Option<PodCountersValue>, BpfError> {
        let per_cpu = found(self.counters.get(&key, 0))
            .map_err(map_error(POD_COUNTERS_MAP, format!("read {key}")))?;
        Ok(per_cpu.map(|values| {
            values
                .iter()
                .fold(PodCountersValue::default(), |sum, v| PodCountersValue {
                    from_pod_packets: sum.from_pod_packets.wrapping_add(v.from_pod_packets),
                    from_pod_bytes: sum.from_pod_bytes.wrapping_add(v.from_pod_bytes),
                    to_pod_packets: sum.to_pod_packets.wrapping_add(v.to_pod_packets),
                    to_pod_bytes: sum.to_pod_bytes.wrapping_add(v.to_pod_bytes),
                })
        }))
    }

    fn reset_counters(&mut self, key: PodKey) -> Result<(), BpfError> {
        let error = |e| map_error(POD_COUNTERS_MAP, format!("reset {key}"))(MapError::IoError(e));
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| error(e))?;
        let zeros =
            PerCpuValues::try_from(vec![PodCountersValue::default(); cpus]).map_err(error)?;
        self.counters
            .insert(key, zeros, 0)
            .map_err(map_error(POD_COUNTERS_MAP, format!("reset {key}")))
    }

    fn remove_counters(&mut self, key: PodKey) -> Result<(), BpfError> {
        found(self.counters.remove(&key))
            .map(drop)
            .map_err(map_error(POD_COUNTERS_MAP, format!("remove {key}")))
    }
}
