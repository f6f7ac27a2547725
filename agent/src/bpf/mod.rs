//! The agent's eBPF datapath: skiff's programs (built from `ebpf/skiff-ebpf` by `build.rs` and
//! embedded here), loaded once per node and kept in bpffs so that they outlive the agent.
//!
//! Layout under `<bpffs>/skiff/<node-name>/` (bpffs is `/sys/fs/bpf`, mounted if it is not):
//!
//! - `maps/SKF_PODCNT_V1`, `maps/SKF_PODID_V1`: the per-pod counters and identities,
//! - `progs/<object-hash>/skf_pod_ingress`, `…/skf_pod_egress`: the programs of the embedded
//!   object (a new agent build with other programs loads them beside, moves every link over
//!   atomically and drops the old ones),
//! - `links/<host-ifname>-ingress`, `…-egress`: one TCX link per hook of each pod's host-side
//!   veth; removing the pin detaches.
//!
//! [`Datapath::open`] restores from these pins when they are there: an agent restart neither
//! detaches nor resets anything.
//!
//! Three layers, as everywhere in skiff: [`maps::MapWriter`] is the only code that touches BPF
//! maps and [`links::LinkManager`] the only one that touches programs and links (both have an
//! aya implementation and, in tests, in-memory fakes and a fault injector); [`pods::PodTable`]
//! holds the attach/detach logic on top of them and is unit-tested without root; [`Datapath`]
//! wires the aya implementations. [`read_pinned_counters`] reads the pins for `skiffctl`
//! without loading anything, and [`metrics::encode_prometheus`] renders the counters for the
//! agent's `/metrics`.

pub mod lb;
pub mod links;
pub mod maps;
pub mod metrics;
pub mod pins;
pub mod pods;

#[cfg(test)]
mod fake;
#[cfg(test)]
pub(crate) mod lb_fake;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

pub use metrics::{encode_lb_prometheus, encode_prometheus};

use links::AyaLinks;
use maps::AyaMaps;
use pins::PinLayout;
use pods::PodTable;

/// The eBPF object built from `ebpf/skiff-ebpf`.
pub static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/skiff-ebpf.o"));

/// Where bpffs is mounted, and where skiff pins.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Who a pod is, as the agent knows it when the CNI plugin has wired it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodIdentity {
    /// `metadata.namespace` (at most 63 bytes).
    pub namespace: String,
    /// `metadata.name` (at most 253 bytes).
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// The pod's IPv4 address.
    pub ip: Ipv4Addr,
}

/// Packets and bytes in one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// Bytes, Ethernet header included.
    pub bytes: u64,
}

/// One pod's counters, summed over CPUs. Directions are from the pod's point of view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodCounters {
    /// The pod.
    pub pod: PodIdentity,
    /// Its host-side veth.
    pub host_ifname: String,
    /// That veth's interface index in the node's network namespace (the maps' key).
    pub ifindex: u32,
    /// Received by the pod: counted at the host veth's egress.
    pub rx: Traffic,
    /// Sent by the pod: counted at the host veth's ingress.
    pub tx: Traffic,
}

/// A pod's counters and the node whose pins they come from ([`read_pinned_counters`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodePodCounters {
    /// The node name (the directory under `<bpffs>/skiff/`).
    pub node: String,
    /// The pod's counters.
    #[serde(flatten)]
    pub counters: PodCounters,
}

/// Where one of skiff's programs is attached (a tc hook of an interface, with TCX).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// A pod's host-side veth's ingress: traffic from the pod (`skf_pod_ingress`: counts and
    /// translates traffic to Services).
    Ingress,
    /// A pod's host-side veth's egress: traffic to the pod (`skf_pod_egress`: counts).
    Egress,
    /// The node's uplink's ingress (`skf_uplink_in`: NodePort, LoadBalancer and external IPs,
    /// replies, ARP for announced LoadBalancer IPs).
    Uplink,
    /// The ingress of `skfsvc1`, where the node routes the service range (`skf_host_svc`:
    /// Services reached from the node's own processes).
    HostService,
}

impl Hook {
    /// The hooks of a pod's host-side veth, ingress first.
    pub const BOTH: [Hook; 2] = [Hook::Ingress, Hook::Egress];
    /// Every hook, one program each.
    pub const ALL: [Hook; 4] = [Hook::Ingress, Hook::Egress, Hook::Uplink, Hook::HostService];

    /// The suffix of the link pins' names: `ingress`, `egress`, `uplink`, `hostsvc`.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
            Hook::Uplink => "uplink",
            Hook::HostService => "hostsvc",
        }
    }

    /// The hook whose pins end in `-<suffix>`.
    pub fn from_suffix(suffix: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|h| h.as_str() == suffix)
    }
}

/// What can go wrong in the datapath.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// bpffs could not be mounted or checked.
    #[error("cannot mount bpffs at {path}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// A file or directory of the pin tree could not be read, created or removed.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done ("create", "remove", "read").
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The embedded object could not be loaded.
    #[error("cannot load the eBPF object")]
    Load {
        /// Why.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program could not be found, loaded, pinned, restored or attached.
    #[error("eBPF program {program}: cannot {action}")]
    Program {
        /// The program's name.
        program: &'static str,
        /// What was being done.
        action: String,
        /// Why.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A pin could not be created.
    #[error("cannot pin {path}")]
    Pin {
        /// The pin.
        path: PathBuf,
        /// Why.
        #[source]
        source: aya::pin::PinError,
    },
    /// A pinned link could not be opened.
    #[error("cannot open the pinned link {path}")]
    Link {
        /// The pin.
        path: PathBuf,
        /// Why.
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// A map operation failed (a full map shows up here too, as E2BIG).
    #[error("map {map}: cannot {action}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// What was being done.
        action: String,
        /// Why.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// The host-side interface does not exist.
    #[error("no interface named {ifname}")]
    NoInterface {
        /// The interface name.
        ifname: String,
    },
    /// An interface could not be looked up.
    #[error("cannot look up interface {ifname}")]
    Interface {
        /// The interface name.
        ifname: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// A name does not fit the maps or the pin tree.
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        /// What the value is ("node name", "pod name", …).
        what: &'static str,
        /// The value.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// There are no pins for this node.
    #[error("no eBPF pins for node {node} under {path}")]
    NoNode {
        /// The node name.
        node: String,
        /// Where they were looked for.
        path: PathBuf,
    },
}

/// The sizes of the load-balancing maps, set when the maps are created (a node's first start
/// with this layout); afterwards the pinned maps keep theirs, and the agent reports any
/// difference ([`Datapath::open_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Args)]
pub struct MapLimits {
    /// Entries of the conntrack map (a translated connection takes two).
    #[arg(long = "bpf-ct-max", default_value_t = skiff_ebpf_common::lb::DEFAULT_MAX_CT)]
    pub ct: u32,
    /// Frontends (ClusterIP, NodePort, LoadBalancer and external-IP ports) per node.
    #[arg(long = "bpf-lb-frontends-max", default_value_t = skiff_ebpf_common::lb::DEFAULT_MAX_FRONTENDS)]
    pub frontends: u32,
    /// Backend slots over all service ports (each revision's slots, and the backends).
    #[arg(long = "bpf-lb-backends-max", default_value_t = skiff_ebpf_common::lb::DEFAULT_MAX_SLOTS)]
    pub slots: u32,
    /// Service ports per node.
    #[arg(long = "bpf-lb-services-max", default_value_t = skiff_ebpf_common::lb::DEFAULT_MAX_SERVICES)]
    pub services: u32,
    /// Clients remembered for session affinity.
    #[arg(long = "bpf-lb-affinity-max", default_value_t = skiff_ebpf_common::lb::DEFAULT_MAX_AFFINITY)]
    pub affinity: u32,
}

impl Default for MapLimits {
    fn default() -> Self {
        use skiff_ebpf_common::lb::*;
        MapLimits {
            ct: DEFAULT_MAX_CT,
            frontends: DEFAULT_MAX_FRONTENDS,
            slots: DEFAULT_MAX_SLOTS,
            services: DEFAULT_MAX_SERVICES,
            affinity: DEFAULT_MAX_AFFINITY,
        }
    }
}

impl MapLimits {
    /// Each sized map's name and size.
    pub fn sizes(&self) -> [(&'static str, u32); 7] {
        use skiff_ebpf_common::lb::*;
        [
            (CT_MAP, self.ct),
            (LB_FRONTEND_MAP, self.frontends),
            (LB_STATS_MAP, self.frontends),
            (LB_SLOT_MAP, self.slots),
            (LB_BACKEND_MAP, self.slots),
            (LB_SERVICE_MAP, self.services),
            (LB_AFFINITY_MAP, self.affinity),
        ]
    }
}

/// The loaded (or restored) datapath of one node.
///
/// Dropping it closes file descriptors only: everything stays pinned and attached.
pub struct Datapath {
    node: String,
    layout: PinLayout,
    table: Mutex<PodTable<AyaMaps, AyaLinks>>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("node", &self.node)
            .field("root", &self.layout.root())
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the programs for `node_name`, or restores them and their maps from the pins under
    /// `/sys/fs/bpf/skiff/<node_name>/` (mounting bpffs there if needed).
    pub fn open(node_name: &str) -> Result<Datapath, BpfError> {
        Self::open_at(Path::new(DEFAULT_BPFFS), node_name)
    }

    /// As [`Datapath::open`], with bpffs at `bpffs` (mounted there if it is not).
    pub fn open_at(bpffs: &Path, node_name: &str) -> Result<Datapath, BpfError> {
        Self::open_with_object(bpffs, node_name, PROGRAM_OBJECT)
    }

    /// As [`Datapath::open_at`], with `object` instead of the embedded programs: when its
    /// programs are not the pinned ones, they are loaded and take over the existing links (what
    /// an agent upgrade does; tests use it with a modified object).
    pub fn open_with_object(
        bpffs: &Path,
        node_name: &str,
        object: &[u8],
    ) -> Result<Datapath, BpfError> {
        Self::open_with(bpffs, node_name, object, &MapLimits::default())
    }

    /// As [`Datapath::open_with_object`], creating missing maps with `limits`. Maps pinned
    /// before keep their size (recreating them would drop every connection): a size that differs
    /// from `limits` is logged as a warning.
    pub fn open_with(
        bpffs: &Path,
        node_name: &str,
        object: &[u8],
        limits: &MapLimits,
    ) -> Result<Datapath, BpfError> {
        pins::ensure_bpffs(bpffs)?;
        let layout = PinLayout::new(bpffs, node_name)?;
        layout.create_dirs()?;
        let links = AyaLinks::open(&layout, object, limits)?;
        for (map, wanted) in limits.sizes() {
            match pins::pinned_map_size(&layout.maps_dir().join(map)) {
                Ok(size) if size != wanted => tracing::warn!(
                    %map, pinned = size, flag = wanted,
                    "a pinned map keeps the size it was created with; remove the node's pins (which drops its connections) to resize it"
                ),
                Ok(_) => {}
                Err(error) => return Err(error),
            }
        }
        let maps = AyaMaps::open(&layout.maps_dir())?;
        Ok(Datapath {
            node: node_name.to_owned(),
            layout,
            table: Mutex::new(PodTable::new(maps, links)),
        })
    }

    /// The node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The node's pin directory.
    pub fn pin_dir(&self) -> &Path {
        self.layout.root()
    }

    /// Counts the pod behind `host_ifname`: records its identity and attaches both programs to
    /// the veth. Idempotent: attaching an attached pod changes nothing and keeps its counters.
    pub fn attach_pod(&self, host_ifname: &str, pod: &PodIdentity) -> Result<(), BpfError> {
        self.table().attach_pod(host_ifname, pod)
    }

    /// Attaches a node-level program (`Hook::Uplink`, `Hook::HostService`) to `ifname`, unless
    /// it is attached already. The link is pinned like the pods'.
    pub fn attach_node(&self, ifname: &str, hook: Hook) -> Result<(), BpfError> {
        self.table().attach_hook(ifname, hook)
    }

    /// The node's load-balancing maps (the services reconciler's map writer).
    pub fn lb_maps(&self) -> Result<lb::AyaLbMaps, BpfError> {
        lb::AyaLbMaps::open(&self.layout.maps_dir())
    }

    /// Stops counting the pod behind `host_ifname`: detaches the programs (removes the link pins)
    /// and removes its map entries. Idempotent, and works when the veth is already gone.
    ///
    /// The pod's identity goes first, so nothing is counted for it once this returns; the kernel
    /// itself lets go of the links after an RCU grace period, so a query right after may still
    /// list the programs for some milliseconds.
    pub fn detach_pod(&self, host_ifname: &str) -> Result<(), BpfError> {
        self.table().detach_pod(host_ifname)
    }

    /// Every attached pod's counters, summed over CPUs.
    pub fn pod_counters(&self) -> Result<Vec<PodCounters>, BpfError> {
        self.table().pod_counters()
    }

    /// Forgets the pods whose host-side veth no longer exists (or is another interface now);
    /// returns their veth names. For the agent's start-up clean-up.
    pub fn prune_gone_pods(&self) -> Result<Vec<String>, BpfError> {
        self.table().prune_gone_pods()
    }

    fn table(&self) -> MutexGuard<'_, PodTable<AyaMaps, AyaLinks>> {
        // A panic while holding the lock leaves the kernel state as consistent as any error does.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes every pin of `node_name` under `<bpffs>/skiff/`: detaches its links and frees its
/// programs and maps. Idempotent. For `skiffctl down` and tests.
pub fn remove_node_pins(bpffs: &Path, node_name: &str) -> Result<(), BpfError> {
    let layout = PinLayout::new(bpffs, node_name)?;
    pins::remove_tree(layout.root())
}

/// Reads the counters from the pins of `node` (or of every node) under `<bpffs>/skiff/`, without
/// loading anything. No pins at all is an empty list; pins missing for a named node an error.
pub fn read_pinned_counters(
    bpffs: &Path,
    node: Option<&str>,
) -> Result<Vec<NodePodCounters>, BpfError> {
    let nodes = match node {
        Some(node) => {
            let layout = PinLayout::new(bpffs, node)?;
            if !layout.maps_dir().is_dir() {
                return Err(BpfError::NoNode {
                    node: node.to_owned(),
                    path: layout.root().to_path_buf(),
                });
            }
            vec![layout]
        }
        None => pins::node_layouts(bpffs)?,
    };
    let mut rows = Vec::new();
    for layout in nodes {
        let maps = AyaMaps::open(&layout.maps_dir())?;
        for counters in pods::read_counters(&maps)? {
            rows.push(NodePodCounters {
                node: layout.node().to_owned(),
                counters,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datapath_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Datapath>();
    }

    #[test]
    fn the_object_is_embedded() {
        assert!(PROGRAM_OBJECT.starts_with(b"\x7fELF"), "an ELF object");
        let text = String::from_utf8_lossy(PROGRAM_OBJECT);
        for name in [
            skiff_ebpf_common::POD_COUNTERS_MAP,
            skiff_ebpf_common::POD_IDENTITY_MAP,
            skiff_ebpf_common::POD_INGRESS_PROG,
            skiff_ebpf_common::POD_EGRESS_PROG,
        ] {
            assert!(text.contains(name), "{name} in the object");
        }
    }
}
