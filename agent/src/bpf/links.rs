//! The one layer that touches programs and links: [`LinkManager`], and its aya implementation
//! (programs loaded once per object version and pinned, TCX links pinned per veth and hook).

use std::path::{Path, PathBuf};

use aya::EbpfLoader;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use skiff_ebpf_common::lb::{HOST_SERVICE_PROG, NODE_INGRESS_PROG};
use skiff_ebpf_common::{IFNAME_LEN, POD_EGRESS_PROG, POD_INGRESS_PROG};

use super::pins::{self, PinLayout};
use super::{BpfError, Hook};

/// How often an attach refused with EEXIST is retried, and the pause between tries (about a
/// second in all: a few RCU grace periods).
const ATTACH_RETRIES: u32 = 50;
const ATTACH_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// Programs on interfaces, as the logic above sees them.
pub trait LinkManager {
    /// The interface index of `ifname` in this network namespace; `None` when there is no such
    /// interface.
    fn ifindex(&self, ifname: &str) -> Result<Option<u32>, BpfError>;
    /// Whether our program is attached at `hook` of `ifname` through our pinned link.
    fn is_attached(&self, ifname: &str, hook: Hook) -> Result<bool, BpfError>;
    /// Attaches our program at `hook` of `ifname` and pins the link (a stale pin is replaced).
    fn attach(&mut self, ifname: &str, hook: Hook) -> Result<(), BpfError>;
    /// Removes the pinned link of `hook` on `ifname`, which detaches it (the kernel releases the
    /// link after an RCU grace period); absent is fine.
    fn detach(&mut self, ifname: &str, hook: Hook) -> Result<(), BpfError>;
}

/// The program for a hook.
pub fn program_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Ingress => POD_INGRESS_PROG,
        Hook::Egress => POD_EGRESS_PROG,
        Hook::Uplink => NODE_INGRESS_PROG,
        Hook::HostService => HOST_SERVICE_PROG,
    }
}

fn attach_type(hook: Hook) -> TcAttachType {
    match hook {
        Hook::Ingress | Hook::Uplink | Hook::HostService => TcAttachType::Ingress,
        Hook::Egress => TcAttachType::Egress,
    }
}

/// Refuses what cannot be an interface name (and so a pin name).
pub(crate) fn check_ifname(ifname: &str) -> Result<(), BpfError> {
    pins::check_component("interface name", ifname)?;
    if ifname.len() >= IFNAME_LEN {
        return Err(BpfError::Invalid {
            what: "interface name",
            value: ifname.to_owned(),
            reason: "longer than 15 bytes",
        });
    }
    Ok(())
}

/// A short, stable name for the embedded object's contents (FNV-1a 64): its programs' pin
/// directory, so that a new build's programs never get confused with pinned old ones.
pub fn object_version(object: &[u8]) -> String {
    let hash = object.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

fn program_error(
    program: &'static str,
    action: impl Into<String>,
) -> impl FnOnce(ProgramError) -> BpfError {
    let action = action.into();
    move |source| BpfError::Program {
        program,
        action,
        source: Box::new(source),
    }
}

/// The ids of the programs attached with TCX at `hook` of `ifname` (in this thread's network
/// namespace), whoever attached them: the kernel's view, for checks and diagnostics.
pub fn tcx_program_ids(ifname: &str, hook: Hook) -> Result<Vec<u32>, BpfError> {
    check_ifname(ifname)?;
    let (_, programs) =
        SchedClassifier::query_tcx(ifname, attach_type(hook)).map_err(program_error(
            program_name(hook),
            format!("query the tcx programs of {ifname}"),
        ))?;
    Ok(programs.iter().map(|p| p.id()).collect())
}

/// The node's programs, restored from their pins, and its link pins.
pub struct AyaLinks {
    layout: PinLayout,
    programs: Vec<(Hook, SchedClassifier, u32)>,
}

impl AyaLinks {
    /// Restores the programs of `object` from their pins, loading and pinning them first when
    /// this object version has none (the maps are created with `limits`, or reused, pinned by
    /// name in the node's `maps/`). Links of an older version move to the new programs
    /// atomically, and the older programs' pins are removed.
    pub fn open(
        layout: &PinLayout,
        object: &[u8],
        limits: &super::MapLimits,
    ) -> Result<AyaLinks, BpfError> {
        let dir = layout.progs_dir().join(object_version(object));
        let pin = |hook| dir.join(program_name(hook));
        if !Hook::ALL.iter().all(|&hook| pin(hook).exists()) {
            load_and_pin(layout, object, &dir, limits)?;
        }
        for old in pins::read_dir(&layout.progs_dir())? {
            if old != dir {
                pins::remove_tree(&old)?;
            }
        }
        let mut programs = Vec::new();
        for hook in Hook::ALL {
            let name = program_name(hook);
            let prog = SchedClassifier::from_pin(pin(hook))
                .map_err(program_error(name, "restore from its pin"))?;
            let id = prog
                .info()
                .map_err(program_error(name, "read its info"))?
                .id();
            programs.push((hook, prog, id));
        }
        Ok(AyaLinks {
            layout: layout.clone(),
            programs,
        })
    }

    fn program(&mut self, hook: Hook) -> &mut SchedClassifier {
        let (_, prog, _) = self
            .programs
            .iter_mut()
            .find(|(h, _, _)| *h == hook)
            .expect("every hook's program is restored in open");
        prog
    }

    fn program_id(&self, hook: Hook) -> u32 {
        self.programs
            .iter()
            .find(|(h, _, _)| *h == hook)
            .map(|(_, _, id)| *id)
            .expect("every hook's program is restored in open")
    }
}

/// The link pins of `hook` in the node's `links/`.
fn link_pins(layout: &PinLayout, hook: Hook) -> Result<Vec<PathBuf>, BpfError> {
    let suffix = format!("-{}", hook.as_str());
    Ok(pins::read_dir(&layout.links_dir())?
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&suffix))
        })
        .collect())
}

fn load_and_pin(
    layout: &PinLayout,
    object: &[u8],
    dir: &Path,
    limits: &super::MapLimits,
) -> Result<(), BpfError> {
    let mut loader = EbpfLoader::new();
    loader.map_pin_path(layout.maps_dir());
    for (map, size) in limits.sizes() {
        loader.set_max_entries(map, size);
    }
    let mut ebpf = loader.load(object).map_err(|e| BpfError::Load {
        source: Box::new(e),
    })?;
    pins::create_dir(dir)?;
    for hook in Hook::ALL {
        let name = program_name(hook);
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| BpfError::Invalid {
                what: "eBPF object",
                value: name.to_owned(),
                reason: "has no such program",
            })?
            .try_into()
            .map_err(program_error(name, "use it as a tc classifier"))?;
        prog.load().map_err(program_error(name, "load it"))?;
        // Links of an older object version: replace their program in place (bpf_link_update),
        // so that the veths are never without a program.
        for path in link_pins(layout, hook)? {
            let link = PinnedLink::from_pin(&path).map_err(|source| BpfError::Link {
                path: path.clone(),
                source,
            })?;
            let link = SchedClassifierLink::try_from(FdLink::from(link)).map_err(|source| {
                BpfError::Link {
                    path: path.clone(),
                    source,
                }
            })?;
            prog.attach_to_link(link)
                .map_err(program_error(name, format!("take over {}", path.display())))?;
        }
        let path = dir.join(name);
        pins::remove_file(&path)?;
        prog.pin(&path)
            .map_err(|source| BpfError::Pin { path, source })?;
    }
    // Dropping `ebpf` closes our descriptors; the pins keep programs, maps and links.
    Ok(())
}

impl LinkManager for AyaLinks {
    fn ifindex(&self, ifname: &str) -> Result<Option<u32>, BpfError> {
        check_ifname(ifname)?;
        match nix::net::if_::if_nametoindex(ifname) {
            Ok(index) => Ok(Some(index)),
            Err(nix::errno::Errno::ENODEV) => Ok(None),
            Err(source) => Err(BpfError::Interface {
                ifname: ifname.to_owned(),
                source,
            }),
        }
    }

    fn is_attached(&self, ifname: &str, hook: Hook) -> Result<bool, BpfError> {
        check_ifname(ifname)?;
        if !self.layout.link_pin(ifname, hook).exists() || self.ifindex(ifname)?.is_none() {
            return Ok(false);
        }
        Ok(tcx_program_ids(ifname, hook)?.contains(&self.program_id(hook)))
    }

    fn attach(&mut self, ifname: &str, hook: Hook) -> Result<(), BpfError> {
        check_ifname(ifname)?;
        let path = self.layout.link_pin(ifname, hook);
        pins::remove_file(&path)?;
        let name = program_name(hook);
        let prog = self.program(hook);
        // A link of ours detached just before (pin removed) is released by the kernel after an
        // RCU grace period; until then the same program cannot be attached again (EEXIST).
        let mut tries = 0;
        let id = loop {
            let attached = prog.attach_with_options(
                ifname,
                attach_type(hook),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            );
            match attached {
                Err(ProgramError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(nix::errno::Errno::EEXIST as i32)
                        && tries < ATTACH_RETRIES =>
                {
                    tries += 1;
                    std::thread::sleep(ATTACH_RETRY_PAUSE);
                }
                other => {
                    break other.map_err(program_error(
                        name,
                        format!("attach to {ifname} {}", hook.as_str()),
                    ))?;
                }
            }
        };
        let link = prog
            .take_link(id)
            .map_err(program_error(name, format!("take the link on {ifname}")))?;
        let link = FdLink::try_from(link).map_err(|source| BpfError::Link {
            path: path.clone(),
            source,
        })?;
        // Dropping the pinned link closes our descriptor only; the pin keeps it attached.
        link.pin(&path)
            .map(drop)
            .map_err(|source| BpfError::Pin { path, source })
    }

    fn detach(&mut self, ifname: &str, hook: Hook) -> Result<(), BpfError> {
        check_ifname(ifname)?;
        pins::remove_file(&self.layout.link_pin(ifname, hook))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_versions_differ_with_contents() {
        assert_eq!(object_version(b"abc"), object_version(b"abc"));
        assert_ne!(object_version(b"abc"), object_version(b"abd"));
        assert_eq!(object_version(b"").len(), 16);
    }

    #[test]
    fn interface_names_are_checked() {
        check_ifname("skf0123456789a").expect("15 bytes fit");
        for bad in ["", "skf0123456789abc", "a/b", ".."] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
    }
}
