//! Services, EndpointSlices and Pods as the cluster DNS reads them: the fields the zone answers
//! from, decoded straight from the API's JSON, everything else skipped (at 10,000 Services of
//! 10 endpoints, k8s-openapi's full types would be most of the server's memory). Field names and
//! types follow the API's, so an object's JSON decodes into these as into the full types.

use std::net::Ipv4Addr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// The metadata DNS keeps: the name, the namespace and the resourceVersion (the watch resumes
/// from it); labels, annotations, uid and the rest are skipped (at 10,000 EndpointSlices a
/// one-label map alone was 5 MB).
fn lean_meta<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Lean {
        name: Option<String>,
        namespace: Option<String>,
        resource_version: Option<String>,
    }
    let lean = Option::<Lean>::deserialize(deserializer)?;
    Ok(lean.map_or_else(ObjectMeta::default, |l| ObjectMeta {
        name: l.name,
        namespace: l.namespace,
        resource_version: l.resource_version,
        ..ObjectMeta::default()
    }))
}

/// A Service (`v1`), as far as DNS reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DnsService {
    /// Its metadata (name, namespace, resourceVersion).
    #[serde(default, deserialize_with = "lean_meta")]
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
#[derive(Clone, Debug, Default)]
pub struct DnsSlice {
    /// Its metadata (name, namespace, resourceVersion).
    pub metadata: ObjectMeta,
    /// Its Service's name (the `kubernetes.io/service-name` label).
    pub service: Option<Box<str>>,
    /// `addressType`.
    pub address_type: Box<str>,
    /// `endpoints`.
    pub endpoints: Box<[DnsEndpoint]>,
    /// `ports`.
    pub ports: Box<[DnsPort]>,
}

/// The label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl<'de> Deserialize<'de> for DnsSlice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Meta {
            name: Option<String>,
            namespace: Option<String>,
            resource_version: Option<String>,
            #[serde(default)]
            labels: std::collections::BTreeMap<String, String>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Raw {
            metadata: Option<Meta>,
            #[serde(default)]
            address_type: String,
            #[serde(default)]
            endpoints: Option<Vec<DnsEndpoint>>,
            #[serde(default)]
            ports: Option<Vec<DnsPort>>,
        }
        let raw = Raw::deserialize(deserializer)?;
        let mut service = None;
        let metadata = raw.metadata.map_or_else(ObjectMeta::default, |mut m| {
            service = m
                .labels
                .remove(SERVICE_NAME_LABEL)
                .map(String::into_boxed_str);
            ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                resource_version: m.resource_version,
                ..ObjectMeta::default()
            }
        });
        Ok(DnsSlice {
            metadata,
            service,
            address_type: raw.address_type.into_boxed_str(),
            endpoints: raw.endpoints.unwrap_or_default().into_boxed_slice(),
            ports: raw.ports.unwrap_or_default().into_boxed_slice(),
        })
    }
}

impl DnsSlice {
    /// The `namespace/name` key of its Service, when it names one and holds IPv4 addresses.
    pub fn service_key(&self) -> Option<String> {
        if &*self.address_type != "IPv4" {
            return None;
        }
        let name = self.service.as_deref()?;
        Some(format!(
            "{}/{name}",
            self.metadata.namespace.as_deref().unwrap_or_default()
        ))
    }
}

/// The parts of an `Endpoint` DNS reads: its IPv4 addresses, hostname and readiness.
#[derive(Clone, Debug, Default)]
pub struct DnsEndpoint {
    /// `addresses` that are IPv4 addresses.
    pub addresses: Box<[Ipv4Addr]>,
    /// `hostname`.
    pub hostname: Option<Box<str>>,
    /// `conditions.ready` (absent means ready, as the API says consumers should read it; a
    /// Service with `publishNotReadyAddresses` has its endpoints marked ready by the
    /// EndpointSlice controller).
    pub ready: bool,
}

impl<'de> Deserialize<'de> for DnsEndpoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize, Default)]
        struct Conditions {
            ready: Option<bool>,
        }
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            addresses: Vec<std::borrow::Cow<'static, str>>,
            hostname: Option<String>,
            #[serde(default)]
            conditions: Option<Conditions>,
        }
        let raw = Raw::deserialize(deserializer)?;
        Ok(DnsEndpoint {
            addresses: raw
                .addresses
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            hostname: raw
                .hostname
                .filter(|h| !h.is_empty())
                .map(String::into_boxed_str),
            ready: raw.conditions.unwrap_or_default().ready != Some(false),
        })
    }
}

impl DnsEndpoint {
    /// Whether it is published.
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Its IPv4 addresses.
    pub fn ipv4s(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.addresses.iter().copied()
    }
}

/// A Pod (`v1`), as far as DNS reads it: its name, namespace and addresses.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DnsPod {
    /// Its metadata (name, namespace, resourceVersion).
    #[serde(default, deserialize_with = "lean_meta")]
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
