//! The cluster zone: what the server answers for names under the cluster domain and for the
//! reverse names of the cluster's addresses, kept from the watches' changes. Pure: no I/O.
//!
//! The names are those of CoreDNS's `kubernetes` plugin (and the Kubernetes DNS specification):
//!
//! - `<svc>.<ns>.svc.<domain>`: A, the ClusterIPs; for a headless Service the addresses of its
//!   ready endpoints; for an ExternalName Service a CNAME to its `externalName`;
//! - `<endpoint>.<svc>.<ns>.svc.<domain>`: A, an endpoint by its `hostname`, or by its address
//!   with dashes (`10-244-1-2`) when it has none;
//! - `_<port>._<proto>.<svc>.<ns>.svc.<domain>`: SRV for a named port (the Service's port and
//!   name for a ClusterIP Service, each ready endpoint and its port for a headless one), the
//!   targets' A records as additional records; SRV on `<svc>.<ns>.svc.<domain>` lists every port;
//! - `<a-b-c-d>.<ns>.pod.<domain>`: A, the address the name spells (CoreDNS's `pods insecure`,
//!   its default);
//! - PTR for ClusterIPs (the Service's name), endpoint addresses (the endpoint's name) and pod
//!   addresses (the pod name above); an address in one of the cluster's ranges with no name is
//!   NXDOMAIN, any other reverse name is not the zone's;
//! - a name under the domain that names nothing is NXDOMAIN, a name that exists without records
//!   of the type asked for (an AAAA for an IPv4 Service) is an empty answer, both with the
//!   zone's SOA.
//!
//! A name is matched case-insensitively. Everything else is [`Answer::Forward`].

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use hickory_proto::rr::rdata::{A, CNAME, PTR, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ipnetwork::Ipv4Network;
use skiff_common::watch::{Change, key_of};

use crate::objects::{DnsPod, DnsService, DnsSlice};

/// The most PTR records one address gets (an address can be an endpoint of many Services).
pub const MAX_PTR: usize = 32;

/// What the zone says about a question.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// The name is the zone's and exists: its records of the type asked (none: no data), and
    /// additional records (the A records of SRV targets).
    Found {
        /// The answer section.
        answers: Vec<Record>,
        /// The additional section.
        additionals: Vec<Record>,
    },
    /// The name is the zone's and does not exist.
    NxDomain,
    /// The name is not the zone's: ask the upstream resolvers.
    Forward,
}

/// What the zone's configuration cannot be.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    /// The cluster domain is not a domain name.
    #[error("the cluster domain {domain:?} is not a valid domain name")]
    Domain {
        /// The domain given.
        domain: String,
        /// Why.
        #[source]
        source: hickory_proto::ProtoError,
    },
}

/// Who gave an address its PTR name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Owner {
    /// A Service's ClusterIP (the Service's key).
    Service(Arc<str>),
    /// An endpoint (the slice's key and the endpoint's index in it).
    Endpoint(Arc<str>, u32),
    /// A pod (its key).
    Pod(Arc<str>),
}

/// The records of the cluster domain. See the module docs.
pub struct Zone {
    domain: Name,
    ttl: u32,
    /// The ranges whose reverse names the zone answers for (the service and pod ranges).
    ranges: Vec<Ipv4Network>,
    services: HashMap<Arc<str>, Arc<DnsService>>,
    /// Services per namespace (a namespace with Services exists as `<ns>.svc.<domain>`).
    namespaces: HashMap<String, usize>,
    /// Slices by their key, with their Service's key.
    slices: HashMap<Arc<str>, (Arc<str>, Arc<DnsSlice>)>,
    /// Each Service's slices.
    by_service: HashMap<Arc<str>, Vec<Arc<str>>>,
    pods: HashMap<Arc<str>, Ipv4Addr>,
    reverse: HashMap<Ipv4Addr, HashSet<Owner>>,
    /// The SOA serial: the number of changes seen.
    serial: u32,
}

impl Zone {
    /// An empty zone for `domain` (e.g. `cluster.local`), its records valid for `ttl` seconds,
    /// answering reverse names in `ranges`.
    pub fn new(domain: &str, ttl: u32, ranges: Vec<Ipv4Network>) -> Result<Zone, ZoneError> {
        let mut name = Name::from_ascii(domain).map_err(|source| ZoneError::Domain {
            domain: domain.to_owned(),
            source,
        })?;
        name.set_fqdn(true);
        Ok(Zone {
            domain: name.to_lowercase(),
            ttl,
            ranges,
            services: HashMap::new(),
            namespaces: HashMap::new(),
            slices: HashMap::new(),
            by_service: HashMap::new(),
            pods: HashMap::new(),
            reverse: HashMap::new(),
            serial: 1,
        })
    }

    /// The cluster domain, fully qualified.
    pub fn domain(&self) -> &Name {
        &self.domain
    }

    /// How many Services, EndpointSlices and pods the zone holds.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.services.len(), self.slices.len(), self.pods.len())
    }

    /// The zone's SOA record (the authority of negative answers).
    pub fn soa(&self) -> Record {
        let label = |prefix: &str| {
            Name::from_ascii(prefix)
                .and_then(|p| p.append_domain(&self.domain))
                .unwrap_or_else(|_| self.domain.clone())
        };
        Record::from_rdata(
            self.domain.clone(),
            self.ttl,
            RData::SOA(SOA::new(
                label("ns.dns"),
                label("hostmaster"),
                self.serial,
                7200,
                1800,
                86400,
                self.ttl,
            )),
        )
    }

    fn changed(&mut self) {
        self.serial = self.serial.wrapping_add(1).max(1);
    }

    fn index(&mut self, ip: Ipv4Addr, owner: Owner) {
        self.reverse.entry(ip).or_default().insert(owner);
    }

    fn unindex(&mut self, ip: Ipv4Addr, owner: &Owner) {
        if let Some(owners) = self.reverse.get_mut(&ip) {
            owners.remove(owner);
            if owners.is_empty() {
                self.reverse.remove(&ip);
            }
        }
    }

    // ---- changes -------------------------------------------------------------------------

    /// Applies a change to the Services.
    pub fn apply_service(&mut self, change: Change<Arc<DnsService>>) {
        match change {
            Change::Applied(service) => self.put_service(service),
            Change::Deleted(service) => self.drop_service(&key_of(&service.metadata)),
            Change::Resynced(list) => {
                let old: Vec<Arc<str>> = self.services.keys().cloned().collect();
                for key in old {
                    self.drop_service(&key);
                }
                for service in list {
                    self.put_service(service);
                }
            }
        }
        self.changed();
    }

    fn put_service(&mut self, service: Arc<DnsService>) {
        let key: Arc<str> = key_of(&service.metadata).into();
        self.drop_service(&key);
        for ip in service.cluster_ipv4s() {
            self.index(ip, Owner::Service(key.clone()));
        }
        let namespace = service.metadata.namespace.clone().unwrap_or_default();
        *self.namespaces.entry(namespace).or_default() += 1;
        self.services.insert(key, service);
    }

    fn drop_service(&mut self, key: &str) {
        let Some((key, old)) = self.services.remove_entry(key) else {
            return;
        };
        for ip in old.cluster_ipv4s() {
            self.unindex(ip, &Owner::Service(key.clone()));
        }
        let namespace = old.metadata.namespace.clone().unwrap_or_default();
        if let Some(count) = self.namespaces.get_mut(&namespace) {
            *count -= 1;
            if *count == 0 {
                self.namespaces.remove(&namespace);
            }
        }
    }

    /// Applies a change to the EndpointSlices.
    pub fn apply_slice(&mut self, change: Change<Arc<DnsSlice>>) {
        match change {
            Change::Applied(slice) => self.put_slice(slice),
            Change::Deleted(slice) => self.drop_slice(&key_of(&slice.metadata)),
            Change::Resynced(list) => {
                let old: Vec<Arc<str>> = self.slices.keys().cloned().collect();
                for key in old {
                    self.drop_slice(&key);
                }
                for slice in list {
                    self.put_slice(slice);
                }
            }
        }
        self.changed();
    }

    fn put_slice(&mut self, slice: Arc<DnsSlice>) {
        let key: Arc<str> = key_of(&slice.metadata).into();
        self.drop_slice(&key);
        let Some(service) = slice.service_key() else {
            return;
        };
        let service: Arc<str> = service.into();
        for (index, endpoint) in slice.endpoints.iter().enumerate() {
            if !endpoint.ready() {
                continue;
            }
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            for ip in endpoint.ipv4s() {
                self.index(ip, Owner::Endpoint(key.clone(), index));
            }
        }
        self.by_service
            .entry(service.clone())
            .or_default()
            .push(key.clone());
        self.slices.insert(key, (service, slice));
    }

    fn drop_slice(&mut self, key: &str) {
        let Some((key, (service, old))) = self.slices.remove_entry(key) else {
            return;
        };
        for (index, endpoint) in old.endpoints.iter().enumerate() {
            let owner = Owner::Endpoint(key.clone(), u32::try_from(index).unwrap_or(u32::MAX));
            for ip in endpoint.ipv4s() {
                self.unindex(ip, &owner);
            }
        }
        if let Some(list) = self.by_service.get_mut(&service) {
            list.retain(|k| *k != key);
            if list.is_empty() {
                self.by_service.remove(&service);
            }
        }
    }

    /// Applies a change to the pods.
    pub fn apply_pod(&mut self, change: Change<Arc<DnsPod>>) {
        match change {
            Change::Applied(pod) => self.put_pod(&pod),
            Change::Deleted(pod) => self.drop_pod(&key_of(&pod.metadata)),
            Change::Resynced(list) => {
                let old: Vec<Arc<str>> = self.pods.keys().cloned().collect();
                for key in old {
                    self.drop_pod(&key);
                }
                for pod in list {
                    self.put_pod(&pod);
                }
            }
        }
        self.changed();
    }

    fn put_pod(&mut self, pod: &DnsPod) {
        let key: Arc<str> = key_of(&pod.metadata).into();
        self.drop_pod(&key);
        if let Some(ip) = pod.ipv4() {
            self.index(ip, Owner::Pod(key.clone()));
            self.pods.insert(key, ip);
        }
    }

    fn drop_pod(&mut self, key: &str) {
        if let Some((key, ip)) = self.pods.remove_entry(key) {
            self.unindex(ip, &Owner::Pod(key));
        }
    }

    // ---- questions -----------------------------------------------------------------------

    /// The answer to a question for `name` of type `qtype`.
    pub fn lookup(&self, name: &Name, qtype: RecordType) -> Answer {
        let mut name = name.to_lowercase();
        name.set_fqdn(true);
        if self.domain.zone_of(&name) {
            let depth = usize::from(name.num_labels() - self.domain.num_labels());
            // Borrowed from the name: a label that is not UTF-8 names nothing here.
            let Some(labels) = name
                .iter()
                .take(depth)
                .map(|l| std::str::from_utf8(l).ok())
                .collect::<Option<Vec<&str>>>()
            else {
                return Answer::NxDomain;
            };
            return match self.node(&labels, qtype, &name) {
                Some(node) => select(node, qtype),
                None => Answer::NxDomain,
            };
        }
        match reverse_ipv4(&name) {
            Some(ip) => self.reverse_lookup(ip, &name, qtype),
            None => Answer::Forward,
        }
    }

    /// The records at the name of `labels` (below the domain, leftmost first) that a question of
    /// `qtype` may need; `None` when the name does not exist.
    fn node(&self, labels: &[&str], qtype: RecordType, owner: &Name) -> Option<Node> {
        match labels {
            [] => Some(Node::of(vec![self.soa()])),
            ["svc"] | ["pod"] | [_, "pod"] => Some(Node::default()),
            [namespace, "svc"] => self.namespaces.contains_key(*namespace).then(Node::default),
            [service, namespace, "svc"] => self.service_node(namespace, service, qtype, owner),
            [proto, service, namespace, "svc"] if proto.starts_with('_') => {
                let found = self.service(namespace, service)?;
                let exists = found.external_name().is_none()
                    && self
                        .ports(namespace, service)
                        .any(|(_, p)| format!("_{p}") == *proto);
                exists.then(Node::default)
            }
            [endpoint, service, namespace, "svc"] => {
                self.endpoint_node(namespace, service, endpoint, owner)
            }
            [port, proto, service, namespace, "svc"]
                if port.starts_with('_') && proto.starts_with('_') =>
            {
                let (records, additionals) =
                    self.srv(namespace, service, Some((&port[1..], &proto[1..])), owner);
                (!records.is_empty()).then_some(Node {
                    records,
                    additionals,
                })
            }
            [dashed, _namespace, "pod"] => {
                let ip = undash(dashed)?;
                Some(Node::of(vec![Record::from_rdata(
                    owner.clone(),
                    self.ttl,
                    RData::A(A(ip)),
                )]))
            }
            _ => None,
        }
    }

    fn service(&self, namespace: &str, name: &str) -> Option<&Arc<DnsService>> {
        self.services.get(format!("{namespace}/{name}").as_str())
    }

    /// The slices of a Service.
    fn slices_of<'a>(
        &'a self,
        namespace: &str,
        name: &str,
    ) -> impl Iterator<Item = (&'a Arc<str>, &'a DnsSlice)> + 'a {
        self.by_service
            .get(format!("{namespace}/{name}").as_str())
            .into_iter()
            .flatten()
            .filter_map(|key| Some((key, self.slices.get(key)?.1.as_ref())))
    }

    /// The (name, protocol label) of each named port SRV can ask for: the Service's for a
    /// ClusterIP Service, the slices' for a headless one.
    fn ports<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> Box<dyn Iterator<Item = (String, String)> + 'a> {
        match self.service(namespace, name) {
            Some(s) if s.headless() => Box::new(
                self.slices_of(namespace, name)
                    .flat_map(|(_, slice)| slice.ports.iter())
                    .filter_map(|p| Some((p.name.clone()?, p.protocol_label()))),
            ),
            Some(s) => Box::new(
                s.spec
                    .ports
                    .iter()
                    .filter_map(|p| Some((p.name.clone()?, p.protocol_label()))),
            ),
            None => Box::new(std::iter::empty()),
        }
    }

    /// `labels` under the domain as a name.
    fn name(&self, labels: &[&str]) -> Option<Name> {
        let mut name = self.domain.clone();
        for label in labels.iter().rev() {
            name = name.prepend_label(*label).ok()?;
        }
        Some(name)
    }

    fn service_node(
        &self,
        namespace: &str,
        service: &str,
        qtype: RecordType,
        name: &Name,
    ) -> Option<Node> {
        let found = self.service(namespace, service)?;
        if let Some(external) = found.external_name() {
            let mut target = Name::from_ascii(external).ok()?;
            target.set_fqdn(true);
            return Some(Node::of(vec![Record::from_rdata(
                name.clone(),
                self.ttl,
                RData::CNAME(CNAME(target)),
            )]));
        }
        let mut node = Node::default();
        if matches!(qtype, RecordType::A | RecordType::ANY) {
            node.records.extend(
                self.addresses(namespace, service, None)
                    .into_iter()
                    .map(|(ip, _)| Record::from_rdata(name.clone(), self.ttl, RData::A(A(ip)))),
            );
        }
        if matches!(qtype, RecordType::SRV | RecordType::ANY) {
            let (records, additionals) = self.srv(namespace, service, None, name);
            node.records.extend(records);
            node.additionals = additionals;
        }
        Some(node)
    }

    /// A Service's addresses with their endpoint names: its ClusterIPs (no endpoint name), or
    /// for a headless Service its ready endpoints' (only the one named `endpoint`, when given).
    fn addresses(
        &self,
        namespace: &str,
        service: &str,
        endpoint: Option<&str>,
    ) -> Vec<(Ipv4Addr, Option<String>)> {
        let Some(found) = self.service(namespace, service) else {
            return Vec::new();
        };
        if !found.headless() && endpoint.is_none() {
            return found
                .cluster_ipv4s()
                .into_iter()
                .map(|ip| (ip, None))
                .collect();
        }
        let mut out: Vec<(Ipv4Addr, Option<String>)> = Vec::new();
        for (_, slice) in self.slices_of(namespace, service) {
            for e in slice.endpoints.iter().filter(|e| e.ready()) {
                for ip in e.ipv4s() {
                    let label = endpoint_label(e.hostname.as_deref(), ip);
                    if endpoint.is_some_and(|want| want != label) {
                        continue;
                    }
                    if !out.iter().any(|(have, _)| *have == ip) {
                        out.push((ip, Some(label)));
                    }
                }
            }
        }
        out
    }

    fn endpoint_node(
        &self,
        namespace: &str,
        service: &str,
        endpoint: &str,
        name: &Name,
    ) -> Option<Node> {
        let found = self.service(namespace, service)?;
        if found.external_name().is_some() {
            return None;
        }
        let addresses = self.addresses(namespace, service, Some(endpoint));
        if addresses.is_empty() {
            return None;
        }
        Some(Node::of(
            addresses
                .into_iter()
                .map(|(ip, _)| Record::from_rdata(name.clone(), self.ttl, RData::A(A(ip))))
                .collect(),
        ))
    }

    /// The SRV records, owned by `owner`, of a Service's ports (only `(port, protocol)` when
    /// given), and the A records of their targets.
    fn srv(
        &self,
        namespace: &str,
        service: &str,
        only: Option<(&str, &str)>,
        owner: &Name,
    ) -> (Vec<Record>, Vec<Record>) {
        let (mut answers, mut additionals) = (Vec::new(), Vec::new());
        let Some(found) = self.service(namespace, service) else {
            return (answers, additionals);
        };
        if found.external_name().is_some() {
            return (answers, additionals);
        }
        let wanted = |name: Option<&str>, proto: &str| match only {
            Some((port, want)) => name == Some(port) && proto == want,
            None => true,
        };
        let mut targets: Vec<(u16, Name, Ipv4Addr)> = Vec::new();
        if found.headless() {
            for (_, slice) in self.slices_of(namespace, service) {
                let ports: Vec<u16> = slice
                    .ports
                    .iter()
                    .filter(|p| wanted(p.name.as_deref(), &p.protocol_label()))
                    .filter_map(|p| u16::try_from(p.port?).ok())
                    .collect();
                if ports.is_empty() {
                    continue;
                }
                for e in slice.endpoints.iter().filter(|e| e.ready()) {
                    for ip in e.ipv4s() {
                        let label = endpoint_label(e.hostname.as_deref(), ip);
                        let Some(target) = self.name(&[&label, service, namespace, "svc"]) else {
                            continue;
                        };
                        for port in &ports {
                            targets.push((*port, target.clone(), ip));
                        }
                    }
                }
            }
        } else {
            let Some(target) = self.name(&[service, namespace, "svc"]) else {
                return (answers, additionals);
            };
            for port in found
                .spec
                .ports
                .iter()
                .filter(|p| wanted(p.name.as_deref(), &p.protocol_label()))
            {
                let Some(port) = port.port.and_then(|p| u16::try_from(p).ok()) else {
                    continue;
                };
                for ip in found.cluster_ipv4s() {
                    targets.push((port, target.clone(), ip));
                }
            }
        }
        let weight = u16::try_from(100 / targets.len().max(1))
            .unwrap_or(1)
            .max(1);
        for (port, target, ip) in targets {
            let srv = Record::from_rdata(
                owner.clone(),
                self.ttl,
                RData::SRV(SRV::new(0, weight, port, target.clone())),
            );
            if !answers.contains(&srv) {
                answers.push(srv);
            }
            let a = Record::from_rdata(target, self.ttl, RData::A(A(ip)));
            if !additionals.contains(&a) {
                additionals.push(a);
            }
        }
        (answers, additionals)
    }

    fn reverse_lookup(&self, ip: Ipv4Addr, name: &Name, qtype: RecordType) -> Answer {
        let Some(owners) = self.reverse.get(&ip) else {
            return if self.ranges.iter().any(|r| r.contains(ip)) {
                Answer::NxDomain
            } else {
                Answer::Forward
            };
        };
        let named = owners.iter().any(|o| !matches!(o, Owner::Pod(_)));
        let mut targets: Vec<Name> = owners
            .iter()
            .filter(|o| !named || !matches!(o, Owner::Pod(_)))
            .filter_map(|owner| self.ptr_target(owner, ip))
            .collect();
        targets.sort();
        targets.dedup();
        targets.truncate(MAX_PTR);
        let records = targets
            .into_iter()
            .map(|t| Record::from_rdata(name.clone(), self.ttl, RData::PTR(PTR(t))))
            .collect();
        select(Node::of(records), qtype)
    }

    fn ptr_target(&self, owner: &Owner, ip: Ipv4Addr) -> Option<Name> {
        match owner {
            Owner::Service(key) => {
                let (namespace, name) = key.split_once('/')?;
                self.name(&[name, namespace, "svc"])
            }
            Owner::Endpoint(slice, index) => {
                let (service, slice) = self.slices.get(slice)?;
                let endpoint = slice.endpoints.get(usize::try_from(*index).ok()?)?;
                let (namespace, name) = service.split_once('/')?;
                let label = endpoint_label(endpoint.hostname.as_deref(), ip);
                self.name(&[&label, name, namespace, "svc"])
            }
            Owner::Pod(key) => {
                let (namespace, _) = key.split_once('/')?;
                self.name(&[&dashed(ip), namespace, "pod"])
            }
        }
    }
}

/// The records at an existing name, and the additional records its SRV records bring.
#[derive(Default)]
struct Node {
    records: Vec<Record>,
    additionals: Vec<Record>,
}

impl Node {
    fn of(records: Vec<Record>) -> Node {
        Node {
            records,
            additionals: Vec::new(),
        }
    }
}

/// The answer from the records at an existing name: a CNAME answers every type; otherwise the
/// records of `qtype` (all of them for ANY), with the additional records when SRV ones are among
/// them.
fn select(node: Node, qtype: RecordType) -> Answer {
    if let Some(cname) = node
        .records
        .iter()
        .find(|r| r.record_type() == RecordType::CNAME)
    {
        return Answer::Found {
            answers: vec![cname.clone()],
            additionals: Vec::new(),
        };
    }
    let answers: Vec<Record> = node
        .records
        .into_iter()
        .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
        .collect();
    let additionals = if answers.iter().any(|r| r.record_type() == RecordType::SRV) {
        node.additionals
    } else {
        Vec::new()
    };
    Answer::Found {
        answers,
        additionals,
    }
}

/// An endpoint's name: its hostname, or its address with dashes.
fn endpoint_label(hostname: Option<&str>, ip: Ipv4Addr) -> String {
    match hostname {
        Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
        _ => dashed(ip),
    }
}

/// `10.244.1.2` as `10-244-1-2`.
fn dashed(ip: Ipv4Addr) -> String {
    ip.to_string().replace('.', "-")
}

/// `10-244-1-2` as `10.244.1.2`.
fn undash(label: &str) -> Option<Ipv4Addr> {
    label.replace('-', ".").parse().ok()
}

/// The address of a full IPv4 reverse name (`4.3.2.1.in-addr.arpa.`).
fn reverse_ipv4(name: &Name) -> Option<Ipv4Addr> {
    if name.num_labels() != 6 {
        return None;
    }
    let labels: Vec<&[u8]> = name.iter().collect();
    if labels[4] != b"in-addr" || labels[5] != b"arpa" {
        return None;
    }
    let mut octets = [0u8; 4];
    for (i, label) in labels[..4].iter().enumerate() {
        let text = std::str::from_utf8(label).ok()?;
        if text.len() > 1 && text.starts_with('0') {
            return None;
        }
        octets[3 - i] = text.parse().ok()?;
    }
    Some(Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(value: serde_json::Value) -> Arc<DnsService> {
        Arc::new(serde_json::from_value(value).expect("a Service"))
    }

    fn slice(value: serde_json::Value) -> Arc<DnsSlice> {
        Arc::new(serde_json::from_value(value).expect("an EndpointSlice"))
    }

    /// A zone with a ClusterIP Service (`web`, two named ports), a headless one (`db`, three
    /// endpoints, one not ready), an ExternalName one (`ext`) and a pod.
    fn zone() -> Zone {
        let ranges = vec![
            "10.96.0.0/12".parse().expect("a range"),
            "10.244.0.0/16".parse().expect("a range"),
        ];
        let mut zone = Zone::new("cluster.local", 5, ranges).expect("a zone");
        zone.apply_service(Change::Resynced(vec![
            service(json!({"metadata": {"namespace": "ns", "name": "web"},
                "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                                   {"name": "dns", "port": 53, "protocol": "UDP"}]}})),
            service(json!({"metadata": {"namespace": "ns", "name": "db"},
                "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}})),
            service(json!({"metadata": {"namespace": "ns", "name": "ext"},
                "spec": {"type": "ExternalName", "externalName": "example.org"}})),
        ]));
        zone.apply_slice(Change::Applied(slice(json!({
        "metadata": {"namespace": "ns", "name": "db-1",
                     "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "ports": [{"name": "pg", "port": 5433, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.244.1.2"], "hostname": "db-0", "conditions": {"ready": true}},
            {"addresses": ["10.244.2.3"], "conditions": {"ready": true}},
            {"addresses": ["10.244.2.4"], "hostname": "db-2", "conditions": {"ready": false}}
        ]}))));
        zone.apply_slice(Change::Applied(slice(json!({
            "metadata": {"namespace": "ns", "name": "web-1",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.244.1.7"], "conditions": {"ready": true}}]}))));
        zone.apply_pod(Change::Applied(Arc::new(
            serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "lonely"},
                                          "status": {"podIP": "10.244.3.9"}}))
            .expect("a pod"),
        )));
        zone
    }

    /// The answer as text: `NXDOMAIN`, `FORWARD`, or its records (`name TYPE data`, additional
    /// ones after `+`), sorted.
    fn ask(zone: &Zone, name: &str, qtype: RecordType) -> Vec<String> {
        let name = Name::from_ascii(name).expect("a name");
        match zone.lookup(&name, qtype) {
            Answer::NxDomain => vec!["NXDOMAIN".to_owned()],
            Answer::Forward => vec!["FORWARD".to_owned()],
            Answer::Found {
                answers,
                additionals,
            } => {
                let text = |prefix: &str, r: &Record| {
                    format!("{prefix}{} {} {}", r.name(), r.record_type(), r.data())
                };
                let mut out: Vec<String> = answers.iter().map(|r| text("", r)).collect();
                out.sort();
                let mut extra: Vec<String> = additionals.iter().map(|r| text("+", r)).collect();
                extra.sort();
                out.extend(extra);
                out
            }
        }
    }

    #[test]
    fn services_resolve_as_coredns_answers_them() {
        let zone = zone();
        use RecordType::*;
        let cases: &[(&str, RecordType, &[&str])] = &[
            (
                "web.ns.svc.cluster.local.",
                A,
                &["web.ns.svc.cluster.local. A 10.96.0.20"],
            ),
            (
                "WEB.Ns.svc.cluster.local",
                A,
                &["web.ns.svc.cluster.local. A 10.96.0.20"],
            ),
            // An IPv4 Service has no AAAA: no data, not NXDOMAIN (resolvers ask both).
            ("web.ns.svc.cluster.local.", AAAA, &[]),
            ("nope.ns.svc.cluster.local.", A, &["NXDOMAIN"]),
            ("web.other.svc.cluster.local.", A, &["NXDOMAIN"]),
            // The headless Service: its ready endpoints, each also by name.
            (
                "db.ns.svc.cluster.local.",
                A,
                &[
                    "db.ns.svc.cluster.local. A 10.244.1.2",
                    "db.ns.svc.cluster.local. A 10.244.2.3",
                ],
            ),
            (
                "db-0.db.ns.svc.cluster.local.",
                A,
                &["db-0.db.ns.svc.cluster.local. A 10.244.1.2"],
            ),
            (
                "10-244-2-3.db.ns.svc.cluster.local.",
                A,
                &["10-244-2-3.db.ns.svc.cluster.local. A 10.244.2.3"],
            ),
            ("db-2.db.ns.svc.cluster.local.", A, &["NXDOMAIN"]),
            // An endpoint of a ClusterIP Service has a name too.
            (
                "10-244-1-7.web.ns.svc.cluster.local.",
                A,
                &["10-244-1-7.web.ns.svc.cluster.local. A 10.244.1.7"],
            ),
            (
                "ext.ns.svc.cluster.local.",
                A,
                &["ext.ns.svc.cluster.local. CNAME example.org."],
            ),
            (
                "ext.ns.svc.cluster.local.",
                AAAA,
                &["ext.ns.svc.cluster.local. CNAME example.org."],
            ),
            // Named ports: the Service's port for a ClusterIP Service, each endpoint's otherwise.
            (
                "_http._tcp.web.ns.svc.cluster.local.",
                SRV,
                &[
                    "_http._tcp.web.ns.svc.cluster.local. SRV 0 100 80 web.ns.svc.cluster.local.",
                    "+web.ns.svc.cluster.local. A 10.96.0.20",
                ],
            ),
            (
                "_dns._udp.web.ns.svc.cluster.local.",
                SRV,
                &[
                    "_dns._udp.web.ns.svc.cluster.local. SRV 0 100 53 web.ns.svc.cluster.local.",
                    "+web.ns.svc.cluster.local. A 10.96.0.20",
                ],
            ),
            ("_dns._tcp.web.ns.svc.cluster.local.", SRV, &["NXDOMAIN"]),
            ("_http._tcp.web.ns.svc.cluster.local.", A, &[]),
            (
                "_pg._tcp.db.ns.svc.cluster.local.",
                SRV,
                &[
                    "_pg._tcp.db.ns.svc.cluster.local. SRV 0 50 5433 10-244-2-3.db.ns.svc.cluster.local.",
                    "_pg._tcp.db.ns.svc.cluster.local. SRV 0 50 5433 db-0.db.ns.svc.cluster.local.",
                    "+10-244-2-3.db.ns.svc.cluster.local. A 10.244.2.3",
                    "+db-0.db.ns.svc.cluster.local. A 10.244.1.2",
                ],
            ),
            ("_tcp.web.ns.svc.cluster.local.", A, &[]),
            (
                "web.ns.svc.cluster.local.",
                SRV,
                &[
                    "web.ns.svc.cluster.local. SRV 0 50 53 web.ns.svc.cluster.local.",
                    "web.ns.svc.cluster.local. SRV 0 50 80 web.ns.svc.cluster.local.",
                    "+web.ns.svc.cluster.local. A 10.96.0.20",
                ],
            ),
            // The tree above the Services exists.
            ("ns.svc.cluster.local.", A, &[]),
            ("svc.cluster.local.", A, &[]),
            ("empty.svc.cluster.local.", A, &["NXDOMAIN"]),
            (
                "10-244-3-9.ns.pod.cluster.local.",
                A,
                &["10-244-3-9.ns.pod.cluster.local. A 10.244.3.9"],
            ),
            ("not-an-ip.ns.pod.cluster.local.", A, &["NXDOMAIN"]),
            ("web.ns.cluster.local.", A, &["NXDOMAIN"]),
            ("example.org.", A, &["FORWARD"]),
            ("cluster.local.example.org.", A, &["FORWARD"]),
        ];
        for (name, qtype, want) in cases {
            assert_eq!(ask(&zone, name, *qtype), *want, "{name} {qtype}");
        }
        let soa = ask(&zone, "cluster.local.", SOA);
        assert_eq!(soa.len(), 1);
        assert!(
            soa[0]
                .starts_with("cluster.local. SOA ns.dns.cluster.local. hostmaster.cluster.local."),
            "{soa:?}"
        );
    }

    #[test]
    fn addresses_have_their_names_back() {
        let zone = zone();
        let cases: &[(&str, &[&str])] = &[
            (
                "20.0.96.10.in-addr.arpa.",
                &["20.0.96.10.in-addr.arpa. PTR web.ns.svc.cluster.local."],
            ),
            (
                "2.1.244.10.in-addr.arpa.",
                &["2.1.244.10.in-addr.arpa. PTR db-0.db.ns.svc.cluster.local."],
            ),
            (
                "3.2.244.10.in-addr.arpa.",
                &["3.2.244.10.in-addr.arpa. PTR 10-244-2-3.db.ns.svc.cluster.local."],
            ),
            (
                "9.3.244.10.in-addr.arpa.",
                &["9.3.244.10.in-addr.arpa. PTR 10-244-3-9.ns.pod.cluster.local."],
            ),
            // Not ready: no name; in the cluster's ranges: NXDOMAIN.
            ("4.2.244.10.in-addr.arpa.", &["NXDOMAIN"]),
            ("1.0.0.127.in-addr.arpa.", &["FORWARD"]),
            ("0.244.10.in-addr.arpa.", &["FORWARD"]),
        ];
        for (name, want) in cases {
            assert_eq!(ask(&zone, name, RecordType::PTR), *want, "{name}");
        }
    }

    #[test]
    fn changes_show_at_once() {
        let mut zone = zone();
        let serial = zone.serial;
        let web = zone.services.get("ns/web").cloned().expect("web is there");
        zone.apply_service(Change::Deleted(web));
        assert!(zone.serial != serial, "the SOA serial moves");
        assert_eq!(
            ask(&zone, "web.ns.svc.cluster.local.", RecordType::A),
            ["NXDOMAIN"]
        );
        assert_eq!(
            ask(&zone, "20.0.96.10.in-addr.arpa.", RecordType::PTR),
            ["NXDOMAIN"]
        );
        // The slice moves to another Service: its endpoint names move with it.
        zone.apply_slice(Change::Applied(slice(json!({
            "metadata": {"namespace": "ns", "name": "db-1",
                         "labels": {"kubernetes.io/service-name": "ext"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.2"], "hostname": "db-0"}]}))));
        assert_eq!(
            ask(&zone, "db.ns.svc.cluster.local.", RecordType::A),
            Vec::<String>::new(),
            "a headless Service without endpoints exists, with no addresses"
        );
        assert_eq!(
            ask(&zone, "2.1.244.10.in-addr.arpa.", RecordType::PTR),
            ["2.1.244.10.in-addr.arpa. PTR db-0.ext.ns.svc.cluster.local."]
        );
        // A resync replaces everything; the namespace goes with its last Service.
        zone.apply_service(Change::Resynced(Vec::new()));
        zone.apply_slice(Change::Resynced(Vec::new()));
        assert_eq!(zone.counts(), (0, 0, 1));
        assert_eq!(
            ask(&zone, "ns.svc.cluster.local.", RecordType::A),
            ["NXDOMAIN"]
        );
        assert_eq!(
            ask(&zone, "2.1.244.10.in-addr.arpa.", RecordType::PTR),
            ["NXDOMAIN"]
        );
        assert!(zone.reverse.len() == 1, "only the pod's address is left");
    }

    #[test]
    fn a_bad_domain_is_refused() {
        let error = Zone::new("a..b", 5, Vec::new()).err().expect("refused");
        assert!(error.to_string().contains("a..b"), "{error}");
    }
}
