//! Services, EndpointSlices and Pods as the cluster DNS reads them: the fields the zone answers
//! from, decoded straight from the API's JSON, everything else skipped (at 10,000 Services of
//! 10 endpoints, k8s-openapi's full types would be most of the server's memory). Field names and
//! types follow the API's, so an object's JSON decodes into these as into the full types.

use std::net::Ipv4Addr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// A Service (`v1`), as far as DNS reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DnsService {
    /// Its metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Its spec.
    #[serde(default)]
    pub spec: DnsServiceSpec,
}

/// The parts of a `ServiceSpec` DNS reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsServiceSpec {
    /// `type`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// `clusterIP` (`None` for a headless Service).
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// `clusterIPs`.
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    /// `externalName`.
    pub external_name: Option<String>,
    /// `ports`.
    #[serde(default)]
    pub ports: Vec<DnsPort>,
}

/// A port of a Service or an EndpointSlice.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DnsPort {
    /// `name`.
    pub name: Option<String>,
    /// `protocol` (`TCP` when absent).
    pub protocol: Option<String>,
    /// `port`.
    pub port: Option<i32>,
}

impl DnsPort {
    /// The protocol as an SRV label wants it: `tcp`, `udp`, `sctp`.
    pub fn protocol_label(&self) -> String {
        self.protocol
            .as_deref()
            .unwrap_or("TCP")
            .to_ascii_lowercase()
    }
}

impl DnsService {
    /// Whether it has no ClusterIP (`clusterIP: None`): its name resolves to its endpoints.
    pub fn headless(&self) -> bool {
        self.spec.cluster_ip.as_deref() == Some("None")
    }

    /// Its IPv4 ClusterIPs (none for a headless or ExternalName Service).
    pub fn cluster_ipv4s(&self) -> Vec<Ipv4Addr> {
        let mut ips: Vec<Ipv4Addr> = self
            .spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(self.spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }

    /// The `externalName` of an ExternalName Service.
    pub fn external_name(&self) -> Option<&str> {
        (self.spec.type_.as_deref() == Some("ExternalName"))
            .then_some(self.spec.external_name.as_deref())
            .flatten()
            .filter(|name| !name.is_empty())
    }
}

/// An EndpointSlice (`discovery.k8s.io/v1`), as far as DNS reads it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsSlice {
    /// Its metadata (the `kubernetes.io/service-name` label).
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `addressType`.
    #[serde(default)]
    pub address_type: String,
    /// `endpoints`.
    #[serde(default)]
    pub endpoints: Vec<DnsEndpoint>,
    /// `ports`.
    #[serde(default)]
    pub ports: Vec<DnsPort>,
}

/// The label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl DnsSlice {
    /// The `namespace/name` key of its Service, when it names one and holds IPv4 addresses.
    pub fn service_key(&self) -> Option<String> {
        if self.address_type != "IPv4" {
            return None;
        }
        let name = self.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        Some(format!(
            "{}/{name}",
            self.metadata.namespace.as_deref().unwrap_or_default()
        ))
    }
}

/// The parts of an `Endpoint` DNS reads.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DnsEndpoint {
    /// `addresses`.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// `hostname`.
    pub hostname: Option<String>,
    /// `conditions`.
    #[serde(default)]
    pub conditions: DnsConditions,
}

/// The endpoint's conditions DNS reads.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DnsConditions {
    /// `ready` (absent means ready, as the API says consumers should read it).
    pub ready: Option<bool>,
}

impl DnsEndpoint {
    /// Whether it is published: ready, or of unknown readiness. (A Service with
    /// `publishNotReadyAddresses` has its endpoints marked ready by the EndpointSlice controller.)
    pub fn ready(&self) -> bool {
        self.conditions.ready != Some(false)
    }

    /// Its IPv4 addresses.
    pub fn ipv4s(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.addresses.iter().filter_map(|a| a.parse().ok())
    }
}

/// A Pod (`v1`), as far as DNS reads it: its name, namespace and addresses.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DnsPod {
    /// Its metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Its spec.
    #[serde(default)]
    pub spec: DnsPodSpec,
    /// Its status.
    #[serde(default)]
    pub status: DnsPodStatus,
}

/// The parts of a `PodSpec` DNS reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsPodSpec {
    /// `hostNetwork`: such a pod has its node's address, not one of its own.
    pub host_network: Option<bool>,
}

/// The parts of a `PodStatus` DNS reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsPodStatus {
    /// `podIP`.
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
}

impl DnsPod {
    /// Its own IPv4 address (none for a host-network pod).
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        if self.spec.host_network == Some(true) {
            return None;
        }
        self.status.pod_ip.as_deref()?.parse().ok()
    }
}

skiff_common::namespaced_resource!(DnsService, "", "v1", "Service", "services");
skiff_common::namespaced_resource!(
    DnsSlice,
    "discovery.k8s.io",
    "v1",
    "EndpointSlice",
    "endpointslices"
);
skiff_common::namespaced_resource!(DnsPod, "", "v1", "Pod", "pods");

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    #[test]
    fn they_read_what_the_full_types_read() {
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        assert_eq!(
            DnsSlice::url_path(&(), Some("ns")),
            EndpointSlice::url_path(&(), Some("ns"))
        );
        let service: DnsService = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "web"},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                     "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
        }))
        .expect("decodes");
        assert_eq!(service.cluster_ipv4s(), [Ipv4Addr::new(10, 96, 0, 20)]);
        assert!(!service.headless());
        assert_eq!(service.external_name(), None);
        assert_eq!(service.spec.ports[0].protocol_label(), "tcp");
        let external: DnsService = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "ext"},
            "spec": {"type": "ExternalName", "externalName": "example.org"}
        }))
        .expect("decodes");
        assert_eq!(external.external_name(), Some("example.org"));
        let slice: DnsSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "web-x",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.2"], "hostname": "web-0",
                           "conditions": {"ready": false}, "nodeName": "n1"},
                          {"addresses": ["10.244.1.3"]}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }))
        .expect("decodes");
        assert_eq!(slice.service_key().as_deref(), Some("ns/web"));
        assert!(!slice.endpoints[0].ready());
        assert!(slice.endpoints[1].ready(), "unknown readiness is ready");
        let pod: DnsPod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "p"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            "status": {"podIP": "10.244.1.9", "phase": "Running"}
        }))
        .expect("decodes");
        assert_eq!(pod.ipv4(), Some(Ipv4Addr::new(10, 244, 1, 9)));
    }
}
