//! In-memory stand-ins for the map and link layers, and a fault injector, for the unit tests of
//! [`super::pods`].

use std::collections::BTreeMap;
use std::io;

use aya::maps::MapError;
use aya::programs::ProgramError;
use aya::sys::SyscallError;
use skiff_ebpf_common::{
    POD_COUNTERS_MAP, POD_EGRESS_PROG, POD_IDENTITY_MAP, PodCountersValue, PodIdentityValue, PodKey,
};

use super::links::LinkManager;
use super::maps::MapWriter;
use super::{BpfError, Hook};

/// The maps as two ordered maps (counters already summed over CPUs).
#[derive(Default)]
pub struct FakeMaps {
    identities: BTreeMap<PodKey, PodIdentityValue>,
    counters: BTreeMap<PodKey, PodCountersValue>,
}

impl FakeMaps {
    /// What the programs do for `key`: add packets and bytes (from the pod, to the pod).
    pub fn bump(
        &mut self,
        key: PodKey,
        from_pkts: u64,
        from_bytes: u64,
        to_pkts: u64,
        to_bytes: u64,
    ) {
        let c = self.counters.entry(key).or_default();
        c.from_pod_packets += from_pkts;
        c.from_pod_bytes += from_bytes;
        c.to_pod_packets += to_pkts;
        c.to_pod_bytes += to_bytes;
    }

    /// Whether both maps are empty.
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty() && self.counters.is_empty()
    }
}

impl MapWriter for FakeMaps {
    fn identities(&self) -> Result<Vec<(PodKey, PodIdentityValue)>, BpfError> {
        Ok(self.identities.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn identity(&self, key: PodKey) -> Result<Option<PodIdentityValue>, BpfError> {
        Ok(self.identities.get(&key).copied())
    }

    fn put_identity(&mut self, key: PodKey, value: &PodIdentityValue) -> Result<(), BpfError> {
        self.identities.insert(key, *value);
        Ok(())
    }

    fn remove_identity(&mut self, key: PodKey) -> Result<(), BpfError> {
        self.identities.remove(&key);
        Ok(())
    }

    fn counters(&self, key: PodKey) -> Result<Option<PodCountersValue>, BpfError> {
        Ok(self.counters.get(&key).copied())
    }

    fn reset_counters(&mut self, key: PodKey) -> Result<(), BpfError> {
        self.counters.insert(key, PodCountersValue::default());
        Ok(())
    }

    fn remove_counters(&mut self, key: PodKey) -> Result<(), BpfError> {
        self.counters.remove(&key);
        Ok(())
    }
}

/// A map operation that [`FaultyMaps`] can make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `put_identity`.
    PutIdentity,
    /// `reset_counters`.
    ResetCounters,
    /// `remove_counters`.
    RemoveCounters,
}

/// Wraps a map layer and fails the chosen operation as a full map would (E2BIG).
pub struct FaultyMaps<M> {
    inner: M,
    fault: Option<Fault>,
}

impl<M: MapWriter> FaultyMaps<M> {
    /// No fault until [`FaultyMaps::fail`].
    pub fn new(inner: M) -> Self {
        FaultyMaps { inner, fault: None }
    }

    /// Fails `fault` from now on (`None`: nothing fails).
    pub fn fail(&mut self, fault: Option<Fault>) {
        self.fault = fault;
    }

    /// The wrapped layer.
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// The wrapped layer, to play the programs' part.
    pub fn inner_mut(&mut self) -> &mut M {
        &mut self.inner
    }

    fn check(&self, op: Fault, map: &'static str) -> Result<(), BpfError> {
        if self.fault != Some(op) {
            return Ok(());
        }
        Err(BpfError::Map {
            map,
            action: format!("{op:?} (injected)"),
            source: Box::new(MapError::SyscallError(SyscallError {
                call: "bpf_map_update_elem",
                io_error: io::Error::from_raw_os_error(nix::errno::Errno::E2BIG as i32),
            })),
        })
    }
}

impl<M: MapWriter> MapWriter for FaultyMaps<M> {
    fn identities(&self) -> Result<Vec<(PodKey, PodIdentityValue)>, BpfError> {
        self.inner.identities()
    }

    fn identity(&self, key: PodKey) -> Result<Option<PodIdentityValue>, BpfError> {
        self.inner.identity(key)
    }

    fn put_identity(&mut self, key: PodKey, value: &PodIdentityValue) -> Result<(), BpfError> {
        self.check(Fault::PutIdentity, POD_IDENTITY_MAP)?;
        self.inner.put_identity(key, value)
    }

    fn remove_identity(&mut self, key: PodKey) -> Result<(), BpfError> {
        self.inner.remove_identity(key)
    }

    fn counters(&self, key: PodKey) -> Result<Option<PodCountersValue>, BpfError> {
        self.inner.counters(key)
    }

    fn reset_counters(&mut self, key: PodKey) -> Result<(), BpfError> {
        self.check(Fault::ResetCounters, POD_COUNTERS_MAP)?;
        self.inner.reset_counters(key)
    }

    fn remove_counters(&mut self, key: PodKey) -> Result<(), BpfError> {
        self.check(Fault::RemoveCounters, POD_COUNTERS_MAP)?;
        self.inner.remove_counters(key)
    }
}

/// Interfaces and links as sets; can fail the attach of one hook.
#[derive(Default)]
pub struct FakeLinks {
    interfaces: BTreeMap<String, u32>,
    /// Pinned links and the ifindex they were attached to.
    links: BTreeMap<(String, Hook), u32>,
    fail_attach: Option<Hook>,
    attach_calls: usize,
}

impl FakeLinks {
    /// A veth appears.
    pub fn add_interface(&mut self, ifname: &str, ifindex: u32) {
        self.interfaces.insert(ifname.to_owned(), ifindex);
    }

    /// A veth goes (its links become defunct: no longer attached, pins stay).
    pub fn remove_interface(&mut self, ifname: &str) {
        self.interfaces.remove(ifname);
    }

    /// Fails every attach at `hook` from now on (`None`: none fails).
    pub fn fail_attach(&mut self, hook: Option<Hook>) {
        self.fail_attach = hook;
    }

    /// Whether a link (pin) exists for `hook` on `ifname`.
    pub fn attached(&self, ifname: &str, hook: Hook) -> bool {
        self.links.contains_key(&(ifname.to_owned(), hook))
    }

    /// How many attaches were made.
    pub fn attach_calls(&self) -> usize {
        self.attach_calls
    }
}

impl LinkManager for FakeLinks {
    fn ifindex(&self, ifname: &str) -> Result<Option<u32>, BpfError> {
        Ok(self.interfaces.get(ifname).copied())
    }

    fn is_attached(&self, ifname: &str, hook: Hook) -> Result<bool, BpfError> {
        // A pinned link whose veth was deleted (and maybe recreated) is defunct.
        let current = self.interfaces.get(ifname);
        Ok(current.is_some() && self.links.get(&(ifname.to_owned(), hook)) == current)
    }

    fn attach(&mut self, ifname: &str, hook: Hook) -> Result<(), BpfError> {
        self.attach_calls += 1;
        if self.fail_attach == Some(hook) {
            return Err(BpfError::Program {
                program: POD_EGRESS_PROG,
                action: format!("attach to {ifname} (injected)"),
                source: Box::new(ProgramError::NotLoaded),
            });
        }
        let Some(&ifindex) = self.interfaces.get(ifname) else {
            return Err(BpfError::NoInterface {
                ifname: ifname.to_owned(),
            });
        };
        self.links.insert((ifname.to_owned(), hook), ifindex);
        Ok(())
    }

    fn detach(&mut self, ifname: &str, hook: Hook) -> Result<(), BpfError> {
        self.links.remove(&(ifname.to_owned(), hook));
        Ok(())
    }
}
