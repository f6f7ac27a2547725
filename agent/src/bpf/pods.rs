//! Attaching and detaching pods: the logic over [`MapWriter`] and [`LinkManager`], free of any
//! kernel call of its own (unit-tested with in-memory fakes).
//!
//! Invariants:
//! - a pod's identity is written before its links exist and removed before they go (the
//!   programs count only veths with an identity, so a late packet never resurrects counters),
//! - counters survive a repeated attach of the same pod (same uid on the same veth), and start
//!   from zero for a new pod, even when it reuses a stale ifindex,
//! - a failed attach leaves nothing of what it created; detach is idempotent.

use std::net::Ipv4Addr;

use skiff_ebpf_common::{PodCountersValue, PodIdentityValue, PodKey, get_str, put_str};

use super::links::{LinkManager, check_ifname};
use super::maps::MapWriter;
use super::{BpfError, Hook, PodCounters, PodIdentity, Traffic};

/// The pods of one node, over a map layer and a link layer.
pub struct PodTable<M, L> {
    maps: M,
    links: L,
}

/// The map value for a pod behind `ifname`.
pub fn identity_value(ifname: &str, pod: &PodIdentity) -> Result<PodIdentityValue, BpfError> {
    check_ifname(ifname)?;
    let mut value = PodIdentityValue::ZERO;
    value.ipv4 = pod.ip.octets();
    let fields: [(&'static str, &mut [u8], &str); 4] = [
        ("interface name", &mut value.ifname, ifname),
        ("pod namespace", &mut value.namespace, &pod.namespace),
        ("pod name", &mut value.name, &pod.name),
        ("pod uid", &mut value.uid, &pod.uid),
    ];
    for (what, dst, src) in fields {
        if src.is_empty() || !put_str(dst, src) {
            return Err(BpfError::Invalid {
                what,
                value: src.to_owned(),
                reason: "empty, too long or containing NUL",
            });
        }
    }
    Ok(value)
}

/// The pod and veth name in a map value; `None` when it is not valid UTF-8.
fn decode_identity(value: &PodIdentityValue) -> Option<(String, PodIdentity)> {
    Some((
        get_str(&value.ifname)?.to_owned(),
        PodIdentity {
            namespace: get_str(&value.namespace)?.to_owned(),
            name: get_str(&value.name)?.to_owned(),
            uid: get_str(&value.uid)?.to_owned(),
            ip: Ipv4Addr::from(value.ipv4),
        },
    ))
}

fn pod_counters(
    ifindex: PodKey,
    identity: &PodIdentityValue,
    counters: PodCountersValue,
) -> Option<PodCounters> {
    let (host_ifname, pod) = decode_identity(identity)?;
    Some(PodCounters {
        pod,
        host_ifname,
        ifindex,
        rx: Traffic {
            packets: counters.to_pod_packets,
            bytes: counters.to_pod_bytes,
        },
        tx: Traffic {
            packets: counters.from_pod_packets,
            bytes: counters.from_pod_bytes,
        },
    })
}

/// Every identified pod's counters in `maps`, sorted by namespace, name and veth. Entries that do
/// not decode are skipped.
pub fn read_counters(maps: &impl MapWriter) -> Result<Vec<PodCounters>, BpfError> {
    let mut all = Vec::new();
    for (key, identity) in maps.identities()? {
        let counters = maps.counters(key)?.unwrap_or_default();
        all.extend(pod_counters(key, &identity, counters));
    }
    all.sort_by(|a, b| {
        (&a.pod.namespace, &a.pod.name, &a.host_ifname).cmp(&(
            &b.pod.namespace,
            &b.pod.name,
            &b.host_ifname,
        ))
    });
    Ok(all)
}

impl<M: MapWriter, L: LinkManager> PodTable<M, L> {
    /// A table over these layers.
    pub fn new(maps: M, links: L) -> Self {
        PodTable { maps, links }
    }

    /// The map layer (tests look at it).
    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The link layer (tests look at it).
    pub fn links(&self) -> &L {
        &self.links
    }

    /// Attaches `hook`'s program to `ifname` unless it is attached already (a node-level hook:
    /// the uplink, the service veth).
    pub fn attach_hook(&mut self, ifname: &str, hook: Hook) -> Result<(), BpfError> {
        if !self.links.is_attached(ifname, hook)? {
            self.links.attach(ifname, hook)?;
        }
        Ok(())
    }

    /// See [`super::Datapath::attach_pod`].
    pub fn attach_pod(&mut self, ifname: &str, pod: &PodIdentity) -> Result<(), BpfError> {
        let value = identity_value(ifname, pod)?;
        let ifindex = self
            .links
            .ifindex(ifname)?
            .ok_or_else(|| BpfError::NoInterface {
                ifname: ifname.to_owned(),
            })?;
        // Entries for this veth name under another ifindex are stale (the veth was recreated).
        for (key, other) in self.maps.identities()? {
            if key != ifindex && get_str(&other.ifname) == Some(ifname) {
                self.maps.remove_identity(key)?;
                self.maps.remove_counters(key)?;
            }
        }
        let previous = self.maps.identity(ifindex)?;
        let same_pod = previous
            .as_ref()
            .is_some_and(|p| p.uid == value.uid && p.ifname == value.ifname);
        if !same_pod {
            self.maps.reset_counters(ifindex)?;
        }
        if let Err(e) = self.maps.put_identity(ifindex, &value) {
            if !same_pod {
                // Best effort: the error that matters is the one returned.
                let _ = self.maps.remove_counters(ifindex);
            }
            return Err(e);
        }
        let mut attached = Vec::new();
        for hook in Hook::BOTH {
            let result = match self.links.is_attached(ifname, hook) {
                Ok(true) => Ok(()),
                Ok(false) => self
                    .links
                    .attach(ifname, hook)
                    .map(|()| attached.push(hook)),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                self.undo_attach(ifname, ifindex, &attached, previous.as_ref(), same_pod);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Best-effort undo of a failed attach: the links it made, and the map entries it wrote
    /// (the previous identity comes back when it was the same pod).
    fn undo_attach(
        &mut self,
        ifname: &str,
        ifindex: PodKey,
        attached: &[Hook],
        previous: Option<&PodIdentityValue>,
        same_pod: bool,
    ) {
        for &hook in attached {
            let _ = self.links.detach(ifname, hook);
        }
        match previous {
            Some(previous) if same_pod => {
                let _ = self.maps.put_identity(ifindex, previous);
            }
            _ => {
                let _ = self.maps.remove_identity(ifindex);
                let _ = self.maps.remove_counters(ifindex);
            }
        }
    }

    /// See [`super::Datapath::detach_pod`].
    pub fn detach_pod(&mut self, ifname: &str) -> Result<(), BpfError> {
        check_ifname(ifname)?;
        let mut keys: Vec<PodKey> = self
            .maps
            .identities()?
            .into_iter()
            .filter(|(_, v)| get_str(&v.ifname) == Some(ifname))
            .map(|(k, _)| k)
            .collect();
        // Counters without an identity (a crash between the two writes) go too.
        if let Some(ifindex) = self.links.ifindex(ifname)?
            && !keys.contains(&ifindex)
            && self.maps.counters(ifindex)?.is_some()
            && self.maps.identity(ifindex)?.is_none()
        {
            keys.push(ifindex);
        }
        for &key in &keys {
            self.maps.remove_identity(key)?;
        }
        for hook in Hook::BOTH {
            self.links.detach(ifname, hook)?;
        }
        for &key in &keys {
            self.maps.remove_counters(key)?;
        }
        Ok(())
    }

    /// See [`super::Datapath::pod_counters`].
    pub fn pod_counters(&self) -> Result<Vec<PodCounters>, BpfError> {
        read_counters(&self.maps)
    }

    /// See [`super::Datapath::prune_gone_pods`].
    pub fn prune_gone_pods(&mut self) -> Result<Vec<String>, BpfError> {
        let mut gone = Vec::new();
        for (key, identity) in self.maps.identities()? {
            let Some(ifname) = get_str(&identity.ifname).map(str::to_owned) else {
                self.maps.remove_identity(key)?;
                self.maps.remove_counters(key)?;
                continue;
            };
            let current = match check_ifname(&ifname) {
                Ok(()) => self.links.ifindex(&ifname)?,
                Err(_) => None,
            };
            if current != Some(key) {
                self.maps.remove_identity(key)?;
                if check_ifname(&ifname).is_ok() && current.is_none() {
                    for hook in Hook::BOTH {
                        self.links.detach(&ifname, hook)?;
                    }
                }
                self.maps.remove_counters(key)?;
                gone.push(ifname);
            }
        }
        gone.sort();
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{FakeLinks, FakeMaps, Fault, FaultyMaps};
    use super::*;

    fn pod(name: &str, uid: &str, last: u8) -> PodIdentity {
        PodIdentity {
            namespace: "default".into(),
            name: name.into(),
            uid: uid.into(),
            ip: Ipv4Addr::new(10, 244, 1, last),
        }
    }

    fn table() -> PodTable<FaultyMaps<FakeMaps>, FakeLinks> {
        let mut links = FakeLinks::default();
        links.add_interface("skfaaa", 7);
        links.add_interface("skfbbb", 8);
        PodTable::new(FaultyMaps::new(FakeMaps::default()), links)
    }

    #[test]
    fn attach_writes_identity_then_both_links_and_is_idempotent() {
        let mut t = table();
        let web = pod("web-1", "uid-1", 2);
        t.attach_pod("skfaaa", &web).expect("attach");
        assert!(t.links().attached("skfaaa", Hook::Ingress));
        assert!(t.links().attached("skfaaa", Hook::Egress));
        let counters = t.pod_counters().expect("counters");
        assert_eq!(counters.len(), 1);
        assert_eq!(counters[0].pod, web);
        assert_eq!(counters[0].host_ifname, "skfaaa");
        assert_eq!(counters[0].ifindex, 7);
        assert_eq!(counters[0].rx, Traffic::default());

        // Traffic, then the same attach again: counters are kept, no second link.
        t.maps.inner_mut().bump(7, 3, 300, 5, 500);
        let attaches = t.links().attach_calls();
        t.attach_pod("skfaaa", &web).expect("attach again");
        assert_eq!(t.links().attach_calls(), attaches, "nothing re-attached");
        let c = &t.pod_counters().expect("counters")[0];
        assert_eq!(
            c.tx,
            Traffic {
                packets: 3,
                bytes: 300
            },
            "from the pod"
        );
        assert_eq!(
            c.rx,
            Traffic {
                packets: 5,
                bytes: 500
            },
            "to the pod"
        );
    }

    #[test]
    fn a_new_pod_on_a_reused_ifindex_starts_from_zero() {
        let mut t = table();
        t.attach_pod("skfaaa", &pod("old", "uid-old", 2))
            .expect("attach");
        t.maps.inner_mut().bump(7, 1, 100, 1, 100);
        t.attach_pod("skfaaa", &pod("new", "uid-new", 3))
            .expect("attach");
        let c = t.pod_counters().expect("counters");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].pod.name, "new");
        assert_eq!(c[0].tx, Traffic::default());
    }

    #[test]
    fn a_recreated_veth_drops_the_stale_entry() {
        let mut t = table();
        let web = pod("web", "uid", 2);
        t.attach_pod("skfaaa", &web).expect("attach");
        t.links.remove_interface("skfaaa");
        t.links.add_interface("skfaaa", 42);
        t.attach_pod("skfaaa", &web).expect("attach");
        let c = t.pod_counters().expect("counters");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].ifindex, 42);
        assert!(t.maps.inner().counters(7).expect("read").is_none());
    }

    #[test]
    fn attach_to_a_missing_interface_fails_and_writes_nothing() {
        let mut t = table();
        let err = t
            .attach_pod("skfnone", &pod("p", "u", 2))
            .expect_err("no veth");
        assert!(matches!(err, BpfError::NoInterface { .. }), "{err}");
        assert!(t.maps.inner().is_empty());
    }

    #[test]
    fn invalid_pods_are_refused_before_anything_is_written() {
        let mut t = table();
        let mut p = pod("p", "u", 2);
        p.namespace = "n".repeat(65);
        let err = t.attach_pod("skfaaa", &p).expect_err("namespace too long");
        assert!(
            matches!(
                err,
                BpfError::Invalid {
                    what: "pod namespace",
                    ..
                }
            ),
            "{err}"
        );
        let err = t
            .attach_pod("skf0123456789abcdef", &pod("p", "u", 2))
            .expect_err("long");
        assert!(
            matches!(
                err,
                BpfError::Invalid {
                    what: "interface name",
                    ..
                }
            ),
            "{err}"
        );
        assert!(t.maps.inner().is_empty());
        assert_eq!(t.links().attach_calls(), 0);
    }

    #[test]
    fn a_failed_link_undoes_the_attach() {
        let mut t = table();
        t.links.fail_attach(Some(Hook::Egress));
        let err = t
            .attach_pod("skfaaa", &pod("p", "u", 2))
            .expect_err("egress fails");
        assert!(
            matches!(err, BpfError::Program { .. }),
            "the injected error: {err}"
        );
        assert!(
            !t.links().attached("skfaaa", Hook::Ingress),
            "ingress undone"
        );
        assert!(t.maps.inner().is_empty(), "identity and counters undone");

        // The retry succeeds.
        t.links.fail_attach(None);
        t.attach_pod("skfaaa", &pod("p", "u", 2)).expect("retry");
        assert!(t.links().attached("skfaaa", Hook::Egress));
    }

    #[test]
    fn a_failed_identity_write_attaches_nothing() {
        let mut t = table();
        t.maps.fail(Some(Fault::PutIdentity));
        let err = t
            .attach_pod("skfaaa", &pod("p", "u", 2))
            .expect_err("map full");
        assert!(matches!(err, BpfError::Map { .. }), "{err}");
        assert_eq!(t.links().attach_calls(), 0);
        assert!(
            t.maps.inner().is_empty(),
            "the zeroed counters are gone too"
        );
    }

    #[test]
    fn a_failed_counter_reset_attaches_nothing() {
        let mut t = table();
        t.maps.fail(Some(Fault::ResetCounters));
        t.attach_pod("skfaaa", &pod("p", "u", 2))
            .expect_err("reset fails");
        assert_eq!(t.links().attach_calls(), 0);
        assert!(t.maps.inner().is_empty());
    }

    #[test]
    fn a_failed_reattach_keeps_the_previous_identity_and_counters() {
        let mut t = table();
        let web = pod("web", "uid", 2);
        t.attach_pod("skfaaa", &web).expect("attach");
        t.maps.inner_mut().bump(7, 2, 20, 2, 20);
        t.links.detach("skfaaa", Hook::Egress).expect("lost link");
        t.links.fail_attach(Some(Hook::Egress));
        t.attach_pod("skfaaa", &web).expect_err("egress fails");
        let c = t.pod_counters().expect("counters");
        assert_eq!(c.len(), 1, "identity kept");
        assert_eq!(c[0].tx.packets, 2, "counters kept");
        assert!(
            t.links().attached("skfaaa", Hook::Ingress),
            "the existing link stays"
        );
    }

    #[test]
    fn detach_removes_links_and_entries_and_is_idempotent() {
        let mut t = table();
        t.attach_pod("skfaaa", &pod("a", "ua", 2))
            .expect("attach a");
        t.attach_pod("skfbbb", &pod("b", "ub", 3))
            .expect("attach b");
        t.detach_pod("skfaaa").expect("detach");
        assert!(!t.links().attached("skfaaa", Hook::Ingress));
        assert!(!t.links().attached("skfaaa", Hook::Egress));
        let c = t.pod_counters().expect("counters");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].pod.name, "b");
        t.detach_pod("skfaaa").expect("again");
        t.detach_pod("skfnever").expect("never attached");
    }

    #[test]
    fn detach_works_when_the_veth_is_gone() {
        let mut t = table();
        t.attach_pod("skfaaa", &pod("a", "ua", 2)).expect("attach");
        t.links.remove_interface("skfaaa");
        t.detach_pod("skfaaa").expect("detach");
        assert!(t.maps.inner().is_empty());
        assert!(!t.links().attached("skfaaa", Hook::Ingress));
    }

    #[test]
    fn a_failed_detach_can_be_retried() {
        let mut t = table();
        t.attach_pod("skfaaa", &pod("a", "ua", 2)).expect("attach");
        t.maps.fail(Some(Fault::RemoveCounters));
        t.detach_pod("skfaaa").expect_err("injected");
        t.maps.fail(None);
        t.detach_pod("skfaaa").expect("retry");
        assert!(t.maps.inner().is_empty(), "the counters went on retry");
        assert!(!t.links().attached("skfaaa", Hook::Egress));
    }

    #[test]
    fn prune_forgets_pods_whose_veth_is_gone() {
        let mut t = table();
        t.attach_pod("skfaaa", &pod("a", "ua", 2))
            .expect("attach a");
        t.attach_pod("skfbbb", &pod("b", "ub", 3))
            .expect("attach b");
        t.links.remove_interface("skfaaa");
        assert_eq!(
            t.prune_gone_pods().expect("prune"),
            vec!["skfaaa".to_owned()]
        );
        let c = t.pod_counters().expect("counters");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].pod.name, "b");
        assert!(
            !t.links().attached("skfaaa", Hook::Ingress),
            "its pins went"
        );
        assert!(t.prune_gone_pods().expect("again").is_empty());
    }

    #[test]
    fn counters_without_identity_are_not_listed() {
        let mut t = table();
        t.maps.inner_mut().bump(99, 1, 1, 1, 1);
        assert!(t.pod_counters().expect("counters").is_empty());
    }
}
