//! What a node's load-balancing maps should hold for a Service: a pure function of the Service,
//! its EndpointSlices and the node's name ([`desired`]).
//!
//! One [`ServicePort`] per port of the Service (TCP or UDP), with:
//! - its frontends: each ClusterIP, the NodePort (as the address `0.0.0.0`: any address of the
//!   node), each LoadBalancer ingress IP and each external IP, with the traffic policies that
//!   apply to them;
//! - its backends, from the EndpointSlices' endpoints for the port of the same name: the ready
//!   ones, or the serving-terminating ones when none is ready (as kube-proxy does), this node's
//!   first, then by address and port, so that equal inputs give equal slots.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::objects::{LbService, LbSlice};
use k8s_openapi::api::core::v1::ServicePort as K8sServicePort;
use skiff_ebpf_common::lb::{
    FE_F_LOCAL_EXTERNAL, FE_F_LOCAL_INTERNAL, FrontendKey, KIND_CLUSTER_IP, KIND_EXTERNAL_IP,
    KIND_LOAD_BALANCER, KIND_NODE_PORT, PROTO_TCP, PROTO_UDP,
};

/// The label naming the Service of an LbSlice.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when the Service sets none (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Which port of which Service: `namespace/name:port`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortKey {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The port's name ("" for a Service's only, unnamed port).
    pub port: String,
}

impl std::fmt::Display for ServicePortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// Where a service port is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frontend {
    /// Address, port and protocol (the map key).
    pub key: FrontendKey,
    /// `KIND_*`.
    pub kind: u8,
    /// `FE_F_*`.
    pub flags: u16,
}

/// A backend of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// Whether it runs on this node (sorts first).
    pub remote: bool,
    /// Its address.
    pub addr: Ipv4Addr,
    /// Its port.
    pub port: u16,
    /// Serving but terminating (used only because no ready backend is left).
    pub terminating: bool,
}

/// What the maps should hold for one port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Which port.
    pub key: ServicePortKey,
    /// Its frontends, sorted.
    pub frontends: Vec<Frontend>,
    /// Its backends, this node's first, then by address and port.
    pub backends: Vec<Backend>,
    /// Session affinity timeout in seconds; 0: none.
    pub affinity_timeout: u32,
}

impl ServicePort {
    /// How many backends are on this node (they come first).
    pub fn local_count(&self) -> usize {
        self.backends.iter().filter(|b| !b.remote).count()
    }
}

fn protocol(port: &K8sServicePort) -> Option<u8> {
    match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        _ => None,
    }
}

fn ipv4(s: &str) -> Option<Ipv4Addr> {
    s.parse().ok()
}

/// The service ports `service` should have on node `node`, given every LbSlice of the
/// cluster that names it (others are ignored). A Service without a ClusterIP that is not
/// headless, an ExternalName Service and SCTP ports give nothing.
pub fn desired<'a>(
    service: &LbService,
    slices: impl IntoIterator<Item = &'a LbSlice>,
    node: &str,
) -> Vec<ServicePort> {
    let namespace = service.metadata.namespace.clone().unwrap_or_default();
    let name = service.metadata.name.clone().unwrap_or_default();
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        return Vec::new();
    }
    let mut cluster_ips: BTreeSet<Ipv4Addr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .filter_map(|ip| ipv4(ip))
        .collect();
    cluster_ips.extend(spec.cluster_ip.as_deref().and_then(ipv4));
    let external_ips: BTreeSet<Ipv4Addr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| ipv4(ip))
        .collect();
    let lb_ips: BTreeSet<Ipv4Addr> = if type_ == "LoadBalancer" {
        lb_ips(service).into_iter().collect()
    } else {
        BTreeSet::new()
    };
    let node_ports = matches!(type_, "NodePort" | "LoadBalancer");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let affinity_timeout = if spec.session_affinity.as_deref() == Some("ClientIP") {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|&t| t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    } else {
        0
    };
    let slices: Vec<&LbSlice> = slices
        .into_iter()
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(namespace.as_str())
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    == Some(&name)
                && s.address_type == "IPv4"
        })
        .collect();

    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        let Some(proto) = protocol(port) else {
            continue;
        };
        let Ok(service_port) = u16::try_from(port.port) else {
            continue;
        };
        let key_for = |addr: Ipv4Addr, port: u16| FrontendKey {
            addr: addr.octets(),
            port: port.to_be_bytes(),
            proto,
            _pad: 0,
        };
        let mut frontends = Vec::new();
        let internal = if internal_local {
            FE_F_LOCAL_INTERNAL
        } else {
            0
        };
        let external = if external_local {
            FE_F_LOCAL_EXTERNAL
        } else {
            0
        };
        for &ip in &cluster_ips {
            frontends.push(Frontend {
                key: key_for(ip, service_port),
                kind: KIND_CLUSTER_IP,
                flags: internal,
            });
        }
        if let (true, Some(node_port)) = (
            node_ports,
            port.node_port.and_then(|p| u16::try_from(p).ok()),
        ) {
            frontends.push(Frontend {
                key: key_for(Ipv4Addr::UNSPECIFIED, node_port),
                kind: KIND_NODE_PORT,
                flags: external,
            });
        }
        for &ip in &lb_ips {
            frontends.push(Frontend {
                key: key_for(ip, service_port),
                kind: KIND_LOAD_BALANCER,
                flags: external,
            });
        }
        for &ip in &external_ips {
            frontends.push(Frontend {
                key: key_for(ip, service_port),
                kind: KIND_EXTERNAL_IP,
                flags: external,
            });
        }
        frontends.sort();
        frontends.dedup_by_key(|f| f.key);
        if frontends.is_empty() {
            continue;
        }
        let port_name = port.name.clone().unwrap_or_default();
        ports.push(ServicePort {
            key: ServicePortKey {
                namespace: namespace.clone(),
                name: name.clone(),
                port: port_name.clone(),
            },
            frontends,
            backends: backends(&slices, &port_name, proto, node),
            affinity_timeout,
        });
    }
    ports
}

/// The backends of the port named `port_name` (protocol `proto`) in `slices`.
fn backends(slices: &[&LbSlice], port_name: &str, proto: u8, node: &str) -> Vec<Backend> {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for slice in slices {
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && protocol_of(p.protocol.as_deref()) == Some(proto)
        }) else {
            continue;
        };
        let Some(port) = port.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let conditions = endpoint.conditions.as_ref();
            // Unset `ready` means ready; unset `serving` means as ready; unset `terminating`
            // means not terminating (discovery/v1 semantics).
            let is_ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let is_serving = conditions.and_then(|c| c.serving).unwrap_or(is_ready);
            let is_terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let remote = endpoint.node_name.as_deref() != Some(node);
            if let Some(addr) = endpoint.address {
                if is_ready && !is_terminating {
                    ready.insert(Backend {
                        remote,
                        addr,
                        port,
                        terminating: false,
                    });
                } else if is_serving && is_terminating {
                    terminating.insert(Backend {
                        remote,
                        addr,
                        port,
                        terminating: true,
                    });
                }
            }
        }
    }
    let chosen = if ready.is_empty() { terminating } else { ready };
    chosen.into_iter().collect()
}

fn protocol_of(protocol: Option<&str>) -> Option<u8> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        _ => None,
    }
}

/// A Service's LoadBalancer ingress IPs (IPv4).
pub fn lb_ips(service: &LbService) -> Vec<Ipv4Addr> {
    skiff_common::service::status_ingress_ips(service.status.as_ref())
        .into_iter()
        .filter_map(|ip| match ip {
            std::net::IpAddr::V4(ip) => Some(ip),
            std::net::IpAddr::V6(_) => None,
        })
        .collect()
}

/// The Service an LbSlice belongs to, as `namespace/name`.
pub fn slice_service(slice: &LbSlice) -> Option<String> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(format!(
        "{}/{name}",
        slice.metadata.namespace.as_deref().unwrap_or_default()
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn service(value: serde_json::Value) -> LbService {
        serde_json::from_value(value).expect("a Service")
    }

    pub(crate) fn slice(value: serde_json::Value) -> LbSlice {
        serde_json::from_value(value).expect("an EndpointSlice")
    }

    fn fe(addr: [u8; 4], port: u16, proto: u8, kind: u8, flags: u16) -> Frontend {
        Frontend {
            key: FrontendKey {
                addr,
                port: port.to_be_bytes(),
                proto,
                _pad: 0,
            },
            kind,
            flags,
        }
    }

    fn web() -> LbService {
        service(json!({
            "metadata": {"namespace": "default", "name": "web"},
            "spec": {
                "type": "LoadBalancer", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                "externalIPs": ["192.0.2.7"],
                "externalTrafficPolicy": "Local",
                "sessionAffinity": "ClientIP",
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "sctp", "port": 9, "protocol": "SCTP"}
                ]
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "10.90.0.100"}]}}
        }))
    }

    fn web_slice() -> LbSlice {
        slice(json!({
            "metadata": {"namespace": "default", "name": "web-abc",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.244.2.5"], "nodeName": "n2", "conditions": {"ready": true}},
                {"addresses": ["10.244.1.9"], "nodeName": "n1", "conditions": {"ready": true}},
                {"addresses": ["10.244.1.3"], "nodeName": "n1",
                 "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.3.1"], "nodeName": "n3", "conditions": {"ready": false}}
            ]
        }))
    }

    #[test]
    fn every_frontend_of_every_port_with_ready_backends_local_first() {
        let slices = [web_slice()];
        let ports = desired(&web(), &slices, "n1");
        assert_eq!(ports.len(), 2, "SCTP is skipped: {ports:#?}");
        let http = &ports[0];
        assert_eq!(http.key.to_string(), "default/web:http");
        assert_eq!(
            http.frontends,
            vec![
                fe(
                    [0, 0, 0, 0],
                    30080,
                    PROTO_TCP,
                    KIND_NODE_PORT,
                    FE_F_LOCAL_EXTERNAL
                ),
                fe(
                    [10, 90, 0, 100],
                    80,
                    PROTO_TCP,
                    KIND_LOAD_BALANCER,
                    FE_F_LOCAL_EXTERNAL
                ),
                fe([10, 96, 0, 20], 80, PROTO_TCP, KIND_CLUSTER_IP, 0),
                fe(
                    [192, 0, 2, 7],
                    80,
                    PROTO_TCP,
                    KIND_EXTERNAL_IP,
                    FE_F_LOCAL_EXTERNAL
                ),
            ]
        );
        let addrs: Vec<String> = http
            .backends
            .iter()
            .map(|b| format!("{}:{} remote={}", b.addr, b.port, b.remote))
            .collect();
        assert_eq!(
            addrs,
            [
                "10.244.1.9:8080 remote=false",
                "10.244.2.5:8080 remote=true"
            ]
        );
        assert_eq!(http.local_count(), 1);
        assert_eq!(http.affinity_timeout, DEFAULT_AFFINITY_TIMEOUT);
        let dns = &ports[1];
        assert_eq!(
            dns.frontends[0].key.proto, PROTO_UDP,
            "the UDP port: {dns:#?}"
        );
        assert_eq!(dns.backends.len(), 2);
        assert_eq!(dns.backends[0].port, 5353);
    }

    #[test]
    fn terminating_backends_only_when_no_ready_one_is_left() {
        let mut slice = web_slice();
        for endpoint in slice.endpoints.iter_mut().flatten() {
            if let Some(c) = endpoint
                .conditions
                .as_mut()
                .filter(|c| c.ready == Some(true))
            {
                c.ready = Some(false);
                c.serving = Some(false);
            }
        }
        let ports = desired(&web(), [&slice], "n1");
        let backends = &ports[0].backends;
        assert_eq!(backends.len(), 1, "{backends:?}");
        assert!(backends[0].terminating);
        assert_eq!(backends[0].addr, Ipv4Addr::new(10, 244, 1, 3));
    }

    #[test]
    fn no_frontends_for_headless_or_external_name_services_and_slices_of_others_ignored() {
        let headless = service(json!({
            "metadata": {"namespace": "default", "name": "db"},
            "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}
        }));
        assert!(desired(&headless, &[web_slice()], "n1").is_empty());
        let external = service(json!({
            "metadata": {"namespace": "default", "name": "ext"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}
        }));
        assert!(desired(&external, &[], "n1").is_empty());
        let other = service(json!({
            "metadata": {"namespace": "default", "name": "other"},
            "spec": {"clusterIP": "10.96.0.30", "internalTrafficPolicy": "Local",
                     "ports": [{"port": 80}]}
        }));
        let ports = desired(&other, &[web_slice()], "n1");
        assert_eq!(ports.len(), 1);
        assert!(ports[0].backends.is_empty(), "web's slice is not other's");
        assert_eq!(ports[0].frontends[0].flags, FE_F_LOCAL_INTERNAL);
        assert_eq!(ports[0].key.to_string(), "default/other");
        assert_eq!(ports[0].affinity_timeout, 0);
    }
}
