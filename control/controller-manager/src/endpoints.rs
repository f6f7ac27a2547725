//! The endpoints and endpointslice controllers: for every Service with a
//! selector, an `Endpoints` object of the same name and
//! `discovery.k8s.io/v1` EndpointSlices listing the pods it selects.
//!
//! As upstream: pods without an IP or that have finished are left out;
//! ready pods are `addresses`, others `notReadyAddresses` (terminating
//! pods are left out of Endpoints unless `publishNotReadyAddresses`);
//! slices carry the `ready`/`serving`/`terminating` conditions, `nodeName`,
//! the zone of the pod's node (`topology.kubernetes.io/zone`), `targetRef`
//! and `hostname` (for pods whose `subdomain` is the Service); named
//! `targetPort`s are resolved per pod from its container ports (pods
//! without such a port are left out of that port's set). Endpoints are
//! grouped by their resolved ports into subsets and slices; one slice
//! holds at most [`MAX_ENDPOINTS_PER_SLICE`] endpoints of one address
//! type. Services without a selector are left alone, and so is
//! `default/kubernetes`, the API server's own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort as CoreEndpointPort, EndpointSubset, Endpoints, Node,
    ObjectReference, Pod, Service,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use super::Context;
use skiff_common::error::{chain, is_status};
use skiff_common::trimmed::Trimmed;

/// The label naming the Service of an EndpointSlice.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming who manages an EndpointSlice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// This controller's value of [`MANAGED_BY_LABEL`], upstream's.
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
/// The label marking objects of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The node label holding its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// At most this many endpoints go into one slice (upstream's default
/// `--max-endpoints-per-slice`).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// What a Service's endpoints should be: the `Endpoints` object and the
/// slices (without names: [`plan_slices`] matches them to existing ones).
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// The Endpoints object.
    pub endpoints: Endpoints,
    /// The EndpointSlices, ordered by address type then contents.
    pub slices: Vec<EndpointSlice>,
}

/// Whether the controller manages the endpoints of `service`: it has a
/// selector and is not the API server's own `default/kubernetes`.
pub fn manages(service: &Service) -> bool {
    let meta = &service.metadata;
    if meta.namespace.as_deref() == Some("default") && meta.name.as_deref() == Some("kubernetes") {
        return false;
    }
    service
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.is_empty())
}

/// Whether `pod`'s labels match `service`'s selector (and both are in the
/// same namespace).
pub fn selects(service: &Service, pod: &Pod) -> bool {
    if service.metadata.namespace != pod.metadata.namespace || !manages(service) {
        return false;
    }
    let selector = service.spec.as_ref().and_then(|s| s.selector.as_ref());
    let labels = pod.metadata.labels.as_ref();
    selector.is_some_and(|selector| {
        selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
    })
}

fn pod_condition(pod: &Pod, kind: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
}

fn pod_ips(pod: &Pod) -> Vec<String> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<String> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ip.ip.clone())
        .filter(|ip| !ip.is_empty())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_ref().filter(|ip| !ip.is_empty())
    {
        ips.push(ip.clone());
    }
    ips
}

fn address_type(ip: &str) -> Option<&'static str> {
    match ip.parse::<std::net::IpAddr>().ok()? {
        std::net::IpAddr::V4(_) => Some("IPv4"),
        std::net::IpAddr::V6(_) => Some("IPv6"),
    }
}

/// The port a Service port reaches on `pod`: `targetPort` as a number, a
/// named container port of the same protocol, or the port itself; `None`
/// when the name is not found.
pub fn resolve_target_port(
    pod: &Pod,
    port: &k8s_openapi::api::core::v1::ServicePort,
) -> Option<i32> {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => match name.parse::<i32>() {
            Ok(n) => Some(n),
            Err(_) => pod.spec.as_ref()?.containers.iter().find_map(|c| {
                c.ports.iter().flatten().find_map(|p| {
                    (p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol)
                        .then_some(p.container_port)
                })
            }),
        },
    }
}

/// One pod's port set: (name, port, protocol, appProtocol) per Service port.
type PortSet = Vec<(Option<String>, i32, String, Option<String>)>;

fn pod_ports(service: &Service, pod: &Pod) -> PortSet {
    let ports = service.spec.as_ref().and_then(|s| s.ports.as_ref());
    ports
        .iter()
        .copied()
        .flatten()
        .filter_map(|port| {
            Some((
                port.name.clone().filter(|n| !n.is_empty()),
                resolve_target_port(pod, port)?,
                port.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
                port.app_protocol.clone(),
            ))
        })
        .collect()
}

fn pod_reference(pod: &Pod) -> ObjectReference {
    ObjectReference {
        kind: Some("Pod".to_string()),
        namespace: pod.metadata.namespace.clone(),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone(),
        ..ObjectReference::default()
    }
}

/// The labels of the objects written for `service`: its own (as upstream
/// copies them), plus the headless marker.
fn object_labels(service: &Service) -> BTreeMap<String, String> {
    let mut labels = service.metadata.labels.clone().unwrap_or_default();
    labels.remove(SERVICE_NAME_LABEL);
    labels.remove(MANAGED_BY_LABEL);
    if service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None") {
        labels.insert(HEADLESS_LABEL.to_string(), String::new());
    }
    labels
}

/// The Endpoints and EndpointSlices `service` should have, given the pods
/// of its namespace (any order; those it does not select are skipped) and
/// the zone of each node by name; `None` for Services the controller does
/// not manage.
pub fn desired(
    service: &Service,
    pods: &[Pod],
    zones: &HashMap<String, String>,
) -> Option<Desired> {
    if !manages(service) {
        return None;
    }
    let spec = service.spec.as_ref()?;
    let name = service.metadata.name.clone()?;
    let namespace = service.metadata.namespace.clone()?;
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    let families: Option<HashSet<&str>> = spec
        .ip_families
        .as_ref()
        .filter(|f| !f.is_empty())
        .map(|f| f.iter().map(String::as_str).collect());

    let mut pods: Vec<&Pod> = pods
        .iter()
        .filter(|pod| selects(service, pod))
        .filter(|pod| {
            !matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .collect();
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    // Endpoints: subsets by port set, addresses sorted by IP.
    let mut subsets: BTreeMap<PortSet, (Vec<EndpointAddress>, Vec<EndpointAddress>)> =
        BTreeMap::new();
    // Slices: endpoints by (address type, port set).
    let mut groups: BTreeMap<(&'static str, PortSet), Vec<Endpoint>> = BTreeMap::new();
    for pod in pods {
        let ports = pod_ports(service, pod);
        let has_ports = spec.ports.as_ref().is_some_and(|p| !p.is_empty());
        if has_ports && ports.is_empty() {
            continue;
        }
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let serving = pod_condition(pod, "Ready");
        let ready = publish_not_ready || (serving && !terminating);
        let pod_spec = pod.spec.as_ref();
        let node_name = pod_spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty());
        let hostname = pod_spec
            .filter(|s| s.subdomain.as_deref() == Some(name.as_str()))
            .and_then(|s| s.hostname.clone())
            .filter(|h| !h.is_empty());
        for ip in pod_ips(pod) {
            let Some(family) = address_type(&ip) else {
                continue;
            };
            if families.as_ref().is_some_and(|f| !f.contains(family)) {
                continue;
            }
            if !terminating || publish_not_ready {
                let address = EndpointAddress {
                    ip: ip.clone(),
                    hostname: hostname.clone(),
                    node_name: node_name.clone(),
                    target_ref: Some(pod_reference(pod)),
                };
                let (ready_list, not_ready) = subsets.entry(ports.clone()).or_default();
                if ready {
                    ready_list.push(address);
                } else {
                    not_ready.push(address);
                }
            }
            groups
                .entry((family, ports.clone()))
                .or_default()
                .push(Endpoint {
                    addresses: vec![ip],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        serving: Some(serving || publish_not_ready),
                        terminating: Some(terminating),
                    }),
                    hostname: hostname.clone(),
                    node_name: node_name.clone(),
                    zone: node_name.as_ref().and_then(|n| zones.get(n)).cloned(),
                    target_ref: Some(pod_reference(pod)),
                    ..Endpoint::default()
                });
        }
    }

    let core_ports = |ports: &PortSet| -> Option<Vec<CoreEndpointPort>> {
        (!ports.is_empty()).then(|| {
            ports
                .iter()
                .map(|(name, port, protocol, app)| CoreEndpointPort {
                    name: name.clone(),
                    port: *port,
                    protocol: Some(protocol.clone()),
                    app_protocol: app.clone(),
                })
                .collect()
        })
    };
    let by_ip = |a: &EndpointAddress, b: &EndpointAddress| a.ip.cmp(&b.ip);
    let subsets: Vec<EndpointSubset> = subsets
        .into_iter()
        .map(|(ports, (mut ready, mut not_ready))| {
            ready.sort_by(by_ip);
            not_ready.sort_by(by_ip);
            EndpointSubset {
                addresses: (!ready.is_empty()).then_some(ready),
                not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                ports: core_ports(&ports),
            }
        })
        .collect();
    let labels = object_labels(service);
    let endpoints = Endpoints {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    };

    let mut slice_labels = labels;
    slice_labels.insert(SERVICE_NAME_LABEL.to_string(), name.clone());
    slice_labels.insert(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string());
    let owner = OwnerReference {
        api_version: "v1".to_string(),
        kind: "Service".to_string(),
        name: name.clone(),
        uid: service.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let slice = |family: &str, ports: &PortSet, endpoints: Vec<Endpoint>| EndpointSlice {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}-")),
            namespace: Some(namespace.clone()),
            labels: Some(slice_labels.clone()),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        address_type: family.to_string(),
        endpoints: Some(endpoints),
        ports: Some(
            ports
                .iter()
                .map(|(name, port, protocol, app)| EndpointPort {
                    name: name.clone(),
                    port: Some(*port),
                    protocol: Some(protocol.clone()),
                    app_protocol: app.clone(),
                })
                .collect(),
        ),
    };
    let mut slices = Vec::new();
    for ((family, ports), endpoints) in groups {
        for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE) {
            slices.push(slice(family, &ports, chunk.to_vec()));
        }
    }
    if slices.is_empty() {
        // Upstream keeps one empty slice per Service, of its primary family.
        let family = spec
            .ip_families
            .as_ref()
            .and_then(|f| f.first().cloned())
            .unwrap_or_else(|| "IPv4".to_string());
        let ports: PortSet = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| matches!(p.target_port, None | Some(IntOrString::Int(_))))
            .map(|p| {
                let target = match p.target_port {
                    Some(IntOrString::Int(n)) => n,
                    _ => p.port,
                };
                (
                    p.name.clone().filter(|n| !n.is_empty()),
                    target,
                    p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
                    p.app_protocol.clone(),
                )
            })
            .collect();
        slices.push(slice(&family, &ports, Vec::new()));
    }
    Some(Desired { endpoints, slices })
}

/// Whether an existing slice already has `want`'s contents.
fn same_slice(have: &EndpointSlice, want: &EndpointSlice) -> bool {
    have.address_type == want.address_type
        && have.endpoints.clone().unwrap_or_default() == want.endpoints.clone().unwrap_or_default()
        && have.ports.clone().unwrap_or_default() == want.ports.clone().unwrap_or_default()
        && have.metadata.labels == want.metadata.labels
        && have.metadata.owner_references == want.metadata.owner_references
}

/// The writes that turn `existing` slices into `desired` ones.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SlicePlan {
    /// New slices (with `generateName`).
    pub create: Vec<EndpointSlice>,
    /// Existing slices with new contents (name and resourceVersion kept).
    pub update: Vec<EndpointSlice>,
    /// Names of slices to delete.
    pub delete: Vec<String>,
}

impl SlicePlan {
    /// Whether nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }
}

/// Match desired slices to existing ones: unchanged ones are kept,
/// others reuse an existing slice of the same address type, the rest are
/// created; leftovers are deleted.
pub fn plan_slices(desired: &[EndpointSlice], existing: &[EndpointSlice]) -> SlicePlan {
    let mut plan = SlicePlan::default();
    let mut unused: Vec<&EndpointSlice> = existing.iter().collect();
    let mut pending = Vec::new();
    for want in desired {
        match unused.iter().position(|have| same_slice(have, want)) {
            Some(i) => {
                unused.remove(i);
            }
            None => pending.push(want),
        }
    }
    for want in pending {
        match unused
            .iter()
            .position(|have| have.address_type == want.address_type)
        {
            Some(i) => {
                let have = unused.remove(i);
                let mut next = want.clone();
                next.metadata.generate_name = None;
                next.metadata.name = have.metadata.name.clone();
                next.metadata.resource_version = have.metadata.resource_version.clone();
                plan.update.push(next);
            }
            None => plan.create.push(want.clone()),
        }
    }
    plan.delete = unused
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    plan
}

/// The Services each pod (namespace, name) was last mapped to.
type PodServices = HashMap<(String, String), Vec<ObjectRef<Service>>>;

/// Run the controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    // Node zones, for the slices' `zone`.
    let (nodes, writer) = reflector::store::<Trimmed<Node>>();
    let node_stream = reflector::reflector(
        writer,
        watcher(
            Api::<Trimmed<Node>>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .for_each(|_| async {});
    let controller = Controller::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    );
    let services = controller.store();
    // The services each pod was last mapped to, so that a pod whose labels
    // change still triggers the services it left.
    let memo: Arc<Mutex<PodServices>> = Arc::default();
    let pod_services = services.clone();
    let map_pod = move |pod: Arc<Pod>| {
        let key = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        let now: Vec<ObjectRef<Service>> = pod_services
            .state()
            .iter()
            .filter(|svc| selects(svc, &pod))
            .map(|svc| ObjectRef::from_obj(svc.as_ref()))
            .collect();
        let mut memo = memo.lock().expect("endpoints memo lock");
        let before = if now.is_empty() {
            memo.remove(&key)
        } else {
            memo.insert(key, now.clone())
        };
        let mut all = now;
        for old in before.into_iter().flatten() {
            if !all.contains(&old) {
                all.push(old);
            }
        }
        all
    };
    let slice_config =
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let controller_stream = controller
        .watches_shared_stream(ctx.pods.touched(), map_pod)
        .watches(
            Api::<EndpointSlice>::all(client.clone()),
            slice_config,
            |slice: EndpointSlice| {
                let service = slice
                    .metadata
                    .labels
                    .as_ref()?
                    .get(SERVICE_NAME_LABEL)?
                    .clone();
                Some(ObjectRef::new(&service).within(slice.metadata.namespace.as_deref()?))
            },
        )
        .watches(
            Api::<Endpoints>::all(client.clone()),
            watcher::Config::default(),
            |ep: Endpoints| {
                Some(
                    ObjectRef::new(ep.metadata.name.as_deref()?)
                        .within(ep.metadata.namespace.as_deref()?),
                )
            },
        )
        .graceful_shutdown_on({
            let shutdown = shutdown.clone();
            async move { shutdown.cancelled().await }
        })
        .run(
            reconcile,
            error_policy,
            Arc::new(Shared {
                ctx: ctx.clone(),
                nodes,
            }),
        )
        .for_each(|_| async {});
    tokio::select! {
        _ = controller_stream => {}
        _ = node_stream => {}
        _ = cleanup_deleted(ctx.clone()) => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Deletes the Endpoints of deleted Services (slices go by their owner
/// reference, through the garbage collector).
async fn cleanup_deleted(ctx: Arc<Context>) {
    let services: Api<Service> = Api::all(ctx.client.clone());
    let mut events = watcher(services, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let Ok(watcher::Event::Delete(service)) = event else {
            continue;
        };
        let (Some(name), Some(namespace)) = (
            service.metadata.name.as_deref(),
            service.metadata.namespace.as_deref(),
        ) else {
            continue;
        };
        if namespace == "default" && name == "kubernetes" {
            continue;
        }
        let api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), namespace);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => tracing::debug!(
                namespace,
                name,
                "deleted the endpoints of a deleted service"
            ),
            Err(error) if is_status(&error, 404) => {}
            Err(error) => {
                tracing::warn!(namespace, name, error = %chain(&error), "cannot delete endpoints")
            }
        }
    }
}

struct Shared {
    ctx: Arc<Context>,
    nodes: Store<Trimmed<Node>>,
}

/// A failed reconcile, retried.
#[derive(Debug, thiserror::Error)]
#[error("api request failed")]
struct ReconcileError {
    #[source]
    source: kube::Error,
}

fn api_error(source: kube::Error) -> ReconcileError {
    ReconcileError { source }
}

fn error_policy(service: Arc<Service>, error: &ReconcileError, _: Arc<Shared>) -> Action {
    tracing::warn!(
        service = service.metadata.name.as_deref().unwrap_or_default(),
        error = %chain(error),
        "endpoints reconcile failed"
    );
    Action::requeue(Duration::from_secs(2))
}

async fn reconcile(service: Arc<Service>, shared: Arc<Shared>) -> Result<Action, ReconcileError> {
    if !manages(&service) {
        return Ok(Action::await_change());
    }
    let client = shared.ctx.client.clone();
    let name = service.metadata.name.clone().unwrap_or_default();
    let namespace = service.metadata.namespace.clone().unwrap_or_default();
    let selector = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .map(|s| {
            s.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pods = pods_api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(api_error)?
        .items;
    let zones: HashMap<String, String> = shared
        .nodes
        .state()
        .iter()
        .filter_map(|node| {
            let zone = node.metadata.labels.as_ref()?.get(ZONE_LABEL)?.clone();
            Some((node.metadata.name.clone()?, zone))
        })
        .collect();
    let Some(want) = desired(&service, &pods, &zones) else {
        return Ok(Action::await_change());
    };

    let endpoints_api: Api<Endpoints> = Api::namespaced(client.clone(), &namespace);
    match endpoints_api.get_opt(&name).await.map_err(api_error)? {
        None => match endpoints_api
            .create(&PostParams::default(), &want.endpoints)
            .await
        {
            Ok(_) => {}
            Err(error) if is_status(&error, 409) => {
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            Err(error) => return Err(api_error(error)),
        },
        Some(current) => {
            let current_labels = current.metadata.labels.clone().unwrap_or_default();
            if current.subsets.clone().filter(|s| !s.is_empty()) != want.endpoints.subsets
                || Some(&current_labels) != want.endpoints.metadata.labels.as_ref()
            {
                let mut next = current.clone();
                next.metadata.managed_fields = None;
                next.metadata.labels = want.endpoints.metadata.labels.clone();
                next.subsets = want.endpoints.subsets.clone();
                match endpoints_api
                    .replace(&name, &PostParams::default(), &next)
                    .await
                {
                    Ok(_) => {}
                    Err(error) if is_status(&error, 409) => {
                        return Ok(Action::requeue(Duration::from_millis(200)));
                    }
                    Err(error) => return Err(api_error(error)),
                }
            }
        }
    }

    let slices_api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let existing = slices_api
        .list(&ListParams::default().labels(&format!(
            "{SERVICE_NAME_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY}"
        )))
        .await
        .map_err(api_error)?
        .items;
    let plan = plan_slices(&want.slices, &existing);
    for slice in &plan.update {
        let slice_name = slice.metadata.name.clone().unwrap_or_default();
        match slices_api
            .replace(&slice_name, &PostParams::default(), slice)
            .await
        {
            Ok(_) => {}
            Err(error) if is_status(&error, 409) || is_status(&error, 404) => {
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            Err(error) => return Err(api_error(error)),
        }
    }
    for slice in &plan.create {
        slices_api
            .create(&PostParams::default(), slice)
            .await
            .map_err(api_error)?;
    }
    for slice_name in &plan.delete {
        match slices_api
            .delete(slice_name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(error) if is_status(&error, 404) => {}
            Err(error) => return Err(api_error(error)),
        }
    }
    if !plan.is_empty() {
        tracing::debug!(namespace, name, ?plan.delete, created = plan.create.len(), updated = plan.update.len(), "endpoint slices written");
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(value: serde_json::Value) -> Service {
        serde_json::from_value(value).expect("service")
    }

    fn pod(name: &str, ip: &str, ready: bool, extra: serde_json::Value) -> Pod {
        let mut value = json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip,
                "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        });
        merge(&mut value, extra);
        serde_json::from_value(value).expect("pod")
    }

    fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
        json_patch::merge(base, &patch);
    }

    fn web() -> Service {
        service(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "svc-uid", "labels": {"tier": "front"}},
            "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.10",
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}, {"name": "metrics", "port": 9090}]},
        }))
    }

    fn zones() -> HashMap<String, String> {
        HashMap::from([("n1".to_string(), "zone-a".to_string())])
    }

    #[test]
    fn ready_and_not_ready_pods_split_with_named_ports_resolved() {
        let pods = vec![
            pod("b", "10.244.0.3", false, json!({})),
            pod("a", "10.244.0.2", true, json!({})),
            pod(
                "other",
                "10.244.0.9",
                true,
                json!({"metadata": {"labels": {"app": "db"}}}),
            ),
            pod("no-ip", "", true, json!({})),
            pod(
                "done",
                "10.244.0.7",
                true,
                json!({"status": {"phase": "Succeeded"}}),
            ),
        ];
        let want = desired(&web(), &pods, &zones()).expect("managed");
        let subsets = want.endpoints.subsets.expect("subsets");
        assert_eq!(subsets.len(), 1);
        let ips = |a: &Option<Vec<EndpointAddress>>| {
            a.iter().flatten().map(|a| a.ip.clone()).collect::<Vec<_>>()
        };
        assert_eq!(ips(&subsets[0].addresses), ["10.244.0.2"]);
        assert_eq!(ips(&subsets[0].not_ready_addresses), ["10.244.0.3"]);
        let ports: Vec<(Option<String>, i32)> = subsets[0]
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.port))
            .collect();
        assert_eq!(
            ports,
            [(Some("http".into()), 8080), (Some("metrics".into()), 9090)]
        );
        assert_eq!(
            want.endpoints
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("tier"))
                .map(String::as_str),
            Some("front")
        );

        assert_eq!(want.slices.len(), 1);
        let slice = &want.slices[0];
        assert_eq!(slice.address_type, "IPv4");
        let labels = slice.metadata.labels.clone().expect("labels");
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        let owner = &slice.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("Service", "svc-uid", Some(true))
        );
        let endpoints = slice.endpoints.as_ref().expect("endpoints");
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[0].addresses, ["10.244.0.2"]);
        let conditions = endpoints[0].conditions.clone().expect("conditions");
        assert_eq!(
            (conditions.ready, conditions.serving, conditions.terminating),
            (Some(true), Some(true), Some(false))
        );
        let conditions = endpoints[1].conditions.clone().expect("conditions");
        assert_eq!(
            (conditions.ready, conditions.serving),
            (Some(false), Some(false))
        );
        assert_eq!(endpoints[0].zone.as_deref(), Some("zone-a"));
        assert_eq!(endpoints[0].node_name.as_deref(), Some("n1"));
        assert_eq!(
            endpoints[0]
                .target_ref
                .as_ref()
                .and_then(|r| r.name.as_deref()),
            Some("a")
        );
        let ports: Vec<Option<i32>> = slice.ports.iter().flatten().map(|p| p.port).collect();
        assert_eq!(ports, [Some(8080), Some(9090)]);
    }

    #[test]
    fn terminating_pods_leave_endpoints_but_stay_in_slices() {
        let pods = vec![pod(
            "a",
            "10.244.0.2",
            true,
            json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}}),
        )];
        let want = desired(&web(), &pods, &zones()).expect("managed");
        assert_eq!(want.endpoints.subsets, None);
        let endpoint = &want.slices[0].endpoints.as_ref().expect("endpoints")[0];
        let conditions = endpoint.conditions.clone().expect("conditions");
        assert_eq!(
            (conditions.ready, conditions.serving, conditions.terminating),
            (Some(false), Some(true), Some(true))
        );
        // publishNotReadyAddresses keeps them, ready.
        let mut svc = web();
        svc.spec.as_mut().expect("spec").publish_not_ready_addresses = Some(true);
        let want = desired(&svc, &pods, &zones()).expect("managed");
        let subsets = want.endpoints.subsets.expect("subsets");
        assert_eq!(subsets[0].addresses.as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn pods_with_different_named_ports_get_separate_subsets_and_slices() {
        let other_port = json!({"spec": {"containers": [{"name": "c", "image": "i",
            "ports": [{"name": "http", "containerPort": 9000}]}]}});
        let missing = json!({"spec": {"containers": [{"name": "c", "image": "i"}]}});
        let pods = vec![
            pod("a", "10.244.0.2", true, json!({})),
            pod("b", "10.244.0.3", true, other_port),
            pod("c", "10.244.0.4", true, missing),
        ];
        let want = desired(&web(), &pods, &zones()).expect("managed");
        let subsets = want.endpoints.subsets.expect("subsets");
        // The pod without the named port still serves the numeric one.
        assert_eq!(subsets.len(), 3);
        assert_eq!(want.slices.len(), 3);
    }

    #[test]
    fn large_services_are_chunked_and_unmanaged_ones_skipped() {
        let pods: Vec<Pod> = (0..250)
            .map(|i| {
                pod(
                    &format!("p{i:03}"),
                    &format!("10.244.{}.{}", i / 200, i % 200 + 1),
                    true,
                    json!({}),
                )
            })
            .collect();
        let want = desired(&web(), &pods, &zones()).expect("managed");
        let sizes: Vec<usize> = want
            .slices
            .iter()
            .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
            .collect();
        assert_eq!(sizes, [100, 100, 50]);
        // No selector: untouched.
        let manual = service(
            json!({"metadata": {"name": "ext", "namespace": "ns"}, "spec": {"ports": [{"port": 80}]}}),
        );
        assert!(desired(&manual, &pods, &zones()).is_none());
        let api = service(
            json!({"metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"selector": {"app": "web"}}}),
        );
        assert!(desired(&api, &pods, &zones()).is_none());
    }

    #[test]
    fn headless_services_and_empty_selections() {
        let svc = service(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "svc-uid"},
            "spec": {"selector": {"app": "web"}, "clusterIP": "None"},
        }));
        let pods = vec![pod(
            "a",
            "10.244.0.2",
            true,
            json!({"spec": {"hostname": "a", "subdomain": "web"}}),
        )];
        let want = desired(&svc, &pods, &zones()).expect("managed");
        let subsets = want.endpoints.subsets.expect("subsets");
        assert_eq!(subsets[0].ports, None);
        assert_eq!(
            subsets[0].addresses.as_ref().expect("ready")[0]
                .hostname
                .as_deref(),
            Some("a")
        );
        assert!(
            want.endpoints
                .metadata
                .labels
                .expect("labels")
                .contains_key(HEADLESS_LABEL)
        );
        // Nothing selected: no subsets, one empty slice.
        let want = desired(&web(), &[], &zones()).expect("managed");
        assert_eq!(want.endpoints.subsets, None);
        assert_eq!(want.slices.len(), 1);
        assert_eq!(want.slices[0].endpoints.as_ref().map(Vec::len), Some(0));
    }

    #[test]
    fn slice_plans_keep_reuse_create_and_delete() {
        let pods = vec![pod("a", "10.244.0.2", true, json!({}))];
        let want = desired(&web(), &pods, &zones()).expect("managed").slices;
        let named = |mut s: EndpointSlice, name: &str| {
            s.metadata.name = Some(name.into());
            s.metadata.generate_name = None;
            s.metadata.resource_version = Some("7".into());
            s
        };
        // First time: create.
        let plan = plan_slices(&want, &[]);
        assert_eq!(
            (plan.create.len(), plan.update.len(), plan.delete.len()),
            (1, 0, 0)
        );
        // Same contents: nothing.
        assert!(plan_slices(&want, &[named(want[0].clone(), "web-abc")]).is_empty());
        // Changed contents: update in place; extra slices deleted.
        let old = desired(&web(), &[], &zones()).expect("managed").slices[0].clone();
        let plan = plan_slices(
            &want,
            &[named(old.clone(), "web-abc"), named(old, "web-def")],
        );
        assert_eq!(plan.update.len(), 1);
        assert_eq!(plan.update[0].metadata.name.as_deref(), Some("web-abc"));
        assert_eq!(
            plan.update[0].metadata.resource_version.as_deref(),
            Some("7")
        );
        assert_eq!(plan.delete, ["web-def"]);
    }
}
