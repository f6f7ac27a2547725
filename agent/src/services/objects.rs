//! Services and EndpointSlices as the load balancer reads them: the fields [`model::desired`]
//! and the loop read, decoded straight from the API's JSON, everything else skipped.
//!
//! The loop keeps every Service and EndpointSlice of the cluster. k8s-openapi's types hold every
//! field of the API (an `Endpoint` alone is about 350 bytes before its strings, most of it
//! `targetRef`, `hints` and `deprecatedTopology`), so at 10,000 Services of 10 endpoints they
//! took about 100 MiB of the agent's memory, and decoding them most of a cold start's CPU. These
//! types keep the same field names and types for what they hold, so that a Service's JSON
//! decodes into either; the watch decodes them without `managedFields`, as every watch does.
//!
//! [`model::desired`]: super::model::desired

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{
    ServicePort as K8sServicePort, ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// A Service (`v1`), as far as the load balancer reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LbService {
    /// Its metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Its spec.
    pub spec: Option<LbServiceSpec>,
    /// Its status (the LoadBalancer ingress IPs).
    pub status: Option<ServiceStatus>,
}

/// The parts of a `ServiceSpec` the load balancer reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LbServiceSpec {
    /// `type`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// `clusterIP`.
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// `clusterIPs`.
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    /// `externalIPs`.
    #[serde(rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    /// `internalTrafficPolicy`.
    pub internal_traffic_policy: Option<String>,
    /// `externalTrafficPolicy`.
    pub external_traffic_policy: Option<String>,
    /// `healthCheckNodePort`.
    pub health_check_node_port: Option<i32>,
    /// `sessionAffinity`.
    pub session_affinity: Option<String>,
    /// `sessionAffinityConfig`.
    pub session_affinity_config: Option<SessionAffinityConfig>,
    /// `ports`.
    pub ports: Option<Vec<K8sServicePort>>,
}

/// An EndpointSlice (`discovery.k8s.io/v1`), as far as the load balancer reads it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LbSlice {
    /// Its metadata (the `kubernetes.io/service-name` label).
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `addressType`.
    #[serde(default)]
    pub address_type: String,
    /// `endpoints`.
    pub endpoints: Option<Vec<LbEndpoint>>,
    /// `ports`.
    pub ports: Option<Vec<EndpointPort>>,
}

/// The parts of an `Endpoint` the load balancer reads, without an allocation of its own: there
/// are as many as Services times endpoints.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LbEndpoint {
    /// The first of `addresses`, when it is an IPv4 address: the one kube-proxy uses (the API
    /// says they are fungible, and only the first is used in practice).
    #[serde(default, rename = "addresses", deserialize_with = "first_ipv4")]
    pub address: Option<Ipv4Addr>,
    /// `conditions`.
    pub conditions: Option<EndpointConditions>,
    /// `nodeName`, shared with every endpoint on the same node.
    #[serde(default, deserialize_with = "interned")]
    pub node_name: Option<Arc<str>>,
}

/// The first element of a list of strings, when it parses as an IPv4 address.
fn first_ipv4<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Ipv4Addr>, D::Error> {
    struct First;
    impl<'de> Visitor<'de> for First {
        type Value = Option<Ipv4Addr>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of addresses")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let first: Option<Cow<'de, str>> = seq.next_element()?;
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(first.and_then(|a| a.parse().ok()))
        }
    }
    deserializer.deserialize_any(First)
}

/// A node name, interned: an endpoint holds a reference to the one copy of its node's name.
fn interned<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Arc<str>>, D::Error> {
    static NAMES: Mutex<BTreeSet<Arc<str>>> = Mutex::new(BTreeSet::new());
    let Some(name) = Option::<Cow<'de, str>>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = names.get(name.as_ref()) {
        return Ok(Some(known.clone()));
    }
    let name: Arc<str> = Arc::from(name.as_ref());
    names.insert(name.clone());
    Ok(Some(name))
}

skiff_common::namespaced_resource!(LbService, "", "v1", "Service", "services");
skiff_common::namespaced_resource!(
    LbSlice,
    "discovery.k8s.io",
    "v1",
    "EndpointSlice",
    "endpointslices"
);

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    #[test]
    fn the_api_paths_are_the_full_types() {
        use k8s_openapi::api::core::v1::Service;
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        assert_eq!(
            LbService::url_path(&(), Some("ns")),
            Service::url_path(&(), Some("ns"))
        );
        assert_eq!(
            LbSlice::url_path(&(), None),
            EndpointSlice::url_path(&(), None)
        );
        assert_eq!(LbSlice::api_version(&()), EndpointSlice::api_version(&()));
        assert_eq!(LbService::kind(&()), Service::kind(&()));
    }

    #[test]
    fn they_read_what_the_full_types_read() {
        let service: LbService = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "web", "uid": "u1"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                     "clusterIPs": ["10.96.0.10"], "externalIPs": ["192.0.2.1"],
                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
                     "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                     "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "web", "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "10.99.1.1"}]}}
        }))
        .expect("decodes");
        let spec = service.spec.as_ref().expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(
            spec.external_ips.as_deref(),
            Some(&["192.0.2.1".to_owned()][..])
        );
        assert_eq!(spec.health_check_node_port, Some(31000));
        assert_eq!(
            spec.ports.as_ref().and_then(|p| p[0].node_port),
            Some(30080)
        );
        let slice: LbSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "web-1",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.0.2", "10.244.0.3"], "nodeName": "n1",
                           "conditions": {"ready": true},
                           "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "ns"}},
                          {"addresses": ["fd00::1"], "nodeName": "n1"},
                          {"addresses": [], "nodeName": null}]
        }))
        .expect("decodes");
        let endpoint = &slice.endpoints.as_ref().expect("endpoints")[0];
        assert_eq!(endpoint.address, Some(Ipv4Addr::new(10, 244, 0, 2)));
        assert_eq!(endpoint.node_name.as_deref(), Some("n1"));
        assert_eq!(
            endpoint.conditions.as_ref().and_then(|c| c.ready),
            Some(true)
        );
        assert_eq!(slice.address_type, "IPv4");
        let rest = &slice.endpoints.as_ref().expect("endpoints")[1..];
        assert_eq!(rest[0].address, None, "not IPv4");
        assert!(Arc::ptr_eq(
            rest[0].node_name.as_ref().expect("a node"),
            endpoint.node_name.as_ref().expect("a node")
        ));
        assert_eq!((rest[1].address, rest[1].node_name.is_none()), (None, true));
    }
}
