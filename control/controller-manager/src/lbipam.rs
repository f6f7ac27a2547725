//! LoadBalancer IP allocation: Services of type `LoadBalancer` get
//! `status.loadBalancer.ingress[0].ip` from `--lb-ip-pool`, as MetalLB or
//! a cloud provider would give them.
//!
//! The allocation table is the Services' own status (so it survives
//! restarts: the controller waits for its full list before allocating)
//! plus the assignments this process made whose status write it may not
//! have seen yet. `spec.loadBalancerIP` is honoured when it is in the pool
//! and free; an address is released when its Service is deleted or stops
//! being a LoadBalancer (its status is then cleared). Services with a
//! `loadBalancerClass` belong to another implementation and are skipped.
//! An empty pool raises a Warning event `AllocationFailed`.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Context;
use skiff_common::error::{chain, is_status};
use skiff_common::events::{EventType, reference};

/// What a Service needs from the allocator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LbDecision {
    /// Nothing to do (not ours, or already right).
    Nothing,
    /// Its current address is valid and stays.
    Keep(IpAddr),
    /// Write this address into its status.
    Assign(IpAddr),
    /// It is no longer a LoadBalancer: clear the address it holds.
    Clear,
    /// The requested `spec.loadBalancerIP` is outside the pool or taken.
    RequestedUnavailable(String),
    /// No free address is left.
    Exhausted,
}

fn is_load_balancer(service: &Service) -> bool {
    service.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
        && service.metadata.deletion_timestamp.is_none()
}

fn has_other_class(service: &Service) -> bool {
    service
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_class.as_deref())
        .is_some_and(|c| !c.is_empty())
}

pub use skiff_common::service::ingress_ips;

/// Which pool addresses are held, by Service uid: from the statuses of
/// LoadBalancer Services (the oldest holder wins a duplicate), then the
/// `pending` assignments of Services still present.
pub fn used_addresses(
    services: &[Arc<Service>],
    pool: &BTreeSet<IpAddr>,
    pending: &HashMap<IpAddr, String>,
) -> HashMap<IpAddr, String> {
    let mut holders: Vec<&Arc<Service>> = services
        .iter()
        .filter(|s| is_load_balancer(s) && !has_other_class(s))
        .collect();
    holders.sort_by(|a, b| {
        let key = |s: &Service| {
            (
                s.metadata.creation_timestamp.as_ref().map(|t| t.0),
                s.metadata.uid.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    let mut used = HashMap::new();
    for service in &holders {
        let uid = service.metadata.uid.clone().unwrap_or_default();
        for ip in ingress_ips(service)
            .into_iter()
            .filter(|ip| pool.contains(ip))
        {
            used.entry(ip).or_insert_with(|| uid.clone());
        }
    }
    for (ip, uid) in pending {
        if holders
            .iter()
            .any(|s| s.metadata.uid.as_deref() == Some(uid.as_str()))
        {
            used.entry(*ip).or_insert_with(|| uid.clone());
        }
    }
    used
}

/// Decide what `service` needs, given the pool (in allocation order) and
/// the addresses held (by uid).
pub fn decide(service: &Service, pool: &[IpAddr], used: &HashMap<IpAddr, String>) -> LbDecision {
    let in_pool = |ip: &IpAddr| pool.contains(ip);
    let current: Vec<IpAddr> = ingress_ips(service).into_iter().filter(in_pool).collect();
    if has_other_class(service) {
        return LbDecision::Nothing;
    }
    if !is_load_balancer(service) {
        return if current.is_empty() || service.metadata.deletion_timestamp.is_some() {
            LbDecision::Nothing
        } else {
            LbDecision::Clear
        };
    }
    let uid = service.metadata.uid.clone().unwrap_or_default();
    let free_for_us = |ip: &IpAddr| used.get(ip).is_none_or(|holder| *holder == uid);
    let requested = service
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_deref())
        .filter(|r| !r.is_empty());
    if let Some(requested) = requested {
        return match requested.parse::<IpAddr>() {
            Ok(ip) if current.first() == Some(&ip) && free_for_us(&ip) => LbDecision::Keep(ip),
            Ok(ip) if in_pool(&ip) && free_for_us(&ip) => LbDecision::Assign(ip),
            _ => LbDecision::RequestedUnavailable(requested.to_string()),
        };
    }
    if let Some(ip) = current.first().filter(|ip| free_for_us(ip)) {
        return LbDecision::Keep(*ip);
    }
    let ours = pool.iter().find(|ip| used.get(*ip) == Some(&uid));
    match ours.or_else(|| pool.iter().find(|ip| !used.contains_key(*ip))) {
        Some(ip) => LbDecision::Assign(*ip),
        None => LbDecision::Exhausted,
    }
}

struct Shared {
    ctx: Arc<Context>,
    pool: Vec<IpAddr>,
    pool_set: BTreeSet<IpAddr>,
    services: Store<Service>,
    /// Assignments made here: ip → service uid.
    pending: Mutex<HashMap<IpAddr, String>>,
}

/// A failed reconcile, retried.
#[derive(Debug, thiserror::Error)]
#[error("api request failed")]
struct ReconcileError {
    #[source]
    source: kube::Error,
}

/// Run the allocator until `shutdown`; idle when no pool is configured.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let Some(spec) = ctx.options.lb_ip_pool.clone() else {
        tracing::info!("no --lb-ip-pool: LoadBalancer services stay pending");
        return;
    };
    let pool = match super::parse_pool(&spec) {
        Ok(pool) => pool,
        Err(error) => {
            tracing::error!(error = %skiff_common::error::chain(&error), "bad --lb-ip-pool: LoadBalancer IP allocation does not run");
            return;
        }
    };
    let controller = Controller::new(
        Api::<Service>::all(ctx.client.clone()),
        watcher::Config::default(),
    );
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        pool_set: pool.iter().copied().collect(),
        pool,
        services: controller.store(),
        pending: Mutex::new(HashMap::new()),
    });
    controller
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, shared)
        .for_each(|_| async {})
        .await;
}

fn error_policy(_: Arc<Service>, error: &ReconcileError, _: Arc<Shared>) -> Action {
    tracing::warn!(error = %chain(error), "load-balancer IP reconcile failed");
    Action::requeue(Duration::from_secs(2))
}

async fn reconcile(service: Arc<Service>, shared: Arc<Shared>) -> Result<Action, ReconcileError> {
    // Allocate only from the full picture, so addresses survive restarts.
    if shared.services.wait_until_ready().await.is_err() {
        return Ok(Action::await_change());
    }
    let decision = {
        let mut pending = shared.pending.lock().expect("lb pending lock");
        let services = shared.services.state();
        // Forget assignments of Services that are gone or now show them.
        pending.retain(|_, uid| {
            services
                .iter()
                .any(|s| s.metadata.uid.as_deref() == Some(uid.as_str()) && is_load_balancer(s))
        });
        let used = used_addresses(&services, &shared.pool_set, &pending);
        let decision = decide(&service, &shared.pool, &used);
        if let LbDecision::Assign(ip) = decision {
            pending.insert(ip, service.metadata.uid.clone().unwrap_or_default());
        }
        decision
    };
    let name = service.metadata.name.clone().unwrap_or_default();
    let namespace = service.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Service> = Api::namespaced(shared.ctx.client.clone(), &namespace);
    let object = reference("v1", "Service", &service.metadata);
    let write = |body: serde_json::Value| {
        let api = api.clone();
        let name = name.clone();
        async move {
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
                .await
            {
                Ok(_) => Ok(()),
                Err(error) if is_status(&error, 404) => Ok(()),
                Err(source) => Err(ReconcileError { source }),
            }
        }
    };
    match decision {
        LbDecision::Nothing | LbDecision::Keep(_) => {}
        LbDecision::Assign(ip) => {
            write(json!({"status": {"loadBalancer": {"ingress": [{"ip": ip.to_string(), "ipMode": "VIP"}]}}})).await?;
            tracing::info!(namespace, name, %ip, "assigned a load-balancer IP");
            let message = format!("Assigned IP [\"{ip}\"]");
            shared
                .ctx
                .events
                .record(&object, EventType::Normal, "IPAllocated", &message)
                .await;
        }
        LbDecision::Clear => {
            write(json!({"status": {"loadBalancer": {"ingress": null}}})).await?;
            tracing::info!(
                namespace,
                name,
                "released the load-balancer IP of a service that is no longer a LoadBalancer"
            );
        }
        LbDecision::RequestedUnavailable(requested) => {
            let message = format!(
                "Failed to allocate IP for \"{namespace}/{name}\": requested IP {requested} is not in the pool or already in use"
            );
            shared
                .ctx
                .events
                .record(&object, EventType::Warning, "AllocationFailed", &message)
                .await;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        LbDecision::Exhausted => {
            let message = format!(
                "Failed to allocate IP for \"{namespace}/{name}\": no available IPs in the pool"
            );
            shared
                .ctx
                .events
                .record(&object, EventType::Warning, "AllocationFailed", &message)
                .await;
            // Released addresses show up as Service changes only for the
            // releasing Service: poll for them.
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(name: &str, value: serde_json::Value) -> Arc<Service> {
        let mut base = json!({"metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
            "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}});
        json_patch::merge(&mut base, &value);
        Arc::new(serde_json::from_value(base).expect("service"))
    }

    fn with_ip(ip: &str) -> serde_json::Value {
        json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}})
    }

    fn pool() -> Vec<IpAddr> {
        super::super::parse_pool("192.0.2.0/30").expect("pool")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn used(services: &[Arc<Service>]) -> HashMap<IpAddr, String> {
        used_addresses(services, &pool().into_iter().collect(), &HashMap::new())
    }

    #[test]
    fn allocates_first_free_and_keeps_existing() {
        let a = svc("a", with_ip("192.0.2.1"));
        let b = svc("b", json!({}));
        let services = vec![a.clone(), b.clone()];
        let used = used(&services);
        assert_eq!(
            decide(&a, &pool(), &used),
            LbDecision::Keep(ip("192.0.2.1"))
        );
        assert_eq!(
            decide(&b, &pool(), &used),
            LbDecision::Assign(ip("192.0.2.2"))
        );
        // Pool of two, both held: exhausted.
        let c = svc("c", json!({}));
        let services = vec![a, svc("b", with_ip("192.0.2.2")), c.clone()];
        assert_eq!(
            decide(&c, &pool(), &self::used(&services)),
            LbDecision::Exhausted
        );
    }

    #[test]
    fn requested_addresses_are_honoured_only_when_free_and_in_the_pool() {
        let a = svc("a", with_ip("192.0.2.1"));
        let want_2 = svc("r", json!({"spec": {"loadBalancerIP": "192.0.2.2"}}));
        let want_1 = svc("s", json!({"spec": {"loadBalancerIP": "192.0.2.1"}}));
        let outside = svc("t", json!({"spec": {"loadBalancerIP": "198.51.100.1"}}));
        let services = vec![a, want_2.clone(), want_1.clone(), outside.clone()];
        let used = used(&services);
        assert_eq!(
            decide(&want_2, &pool(), &used),
            LbDecision::Assign(ip("192.0.2.2"))
        );
        assert_eq!(
            decide(&want_1, &pool(), &used),
            LbDecision::RequestedUnavailable("192.0.2.1".into())
        );
        assert!(matches!(
            decide(&outside, &pool(), &used),
            LbDecision::RequestedUnavailable(_)
        ));
    }

    #[test]
    fn type_changes_release_and_duplicates_go_to_the_oldest() {
        let changed = svc(
            "a",
            json!({"spec": {"type": "ClusterIP"}, "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}}),
        );
        let services = vec![changed.clone()];
        assert_eq!(
            decide(&changed, &pool(), &used(&services)),
            LbDecision::Clear
        );
        assert!(
            used(&services).is_empty(),
            "a ClusterIP service holds nothing"
        );
        // Two services claim .1 (e.g. a restored backup): the older keeps it.
        let old = svc("old", with_ip("192.0.2.1"));
        let mut young_value = with_ip("192.0.2.1");
        json_patch::merge(
            &mut young_value,
            &json!({"metadata": {"creationTimestamp": "2025-01-01T00:00:00Z"}}),
        );
        let young = svc("young", young_value);
        let services = vec![young.clone(), old.clone()];
        let used = used(&services);
        assert_eq!(
            decide(&old, &pool(), &used),
            LbDecision::Keep(ip("192.0.2.1"))
        );
        assert_eq!(
            decide(&young, &pool(), &used),
            LbDecision::Assign(ip("192.0.2.2"))
        );
        // Other implementations' services are not ours.
        let other = svc(
            "o",
            json!({"spec": {"loadBalancerClass": "example.com/lb"}}),
        );
        assert_eq!(decide(&other, &pool(), &used), LbDecision::Nothing);
    }

    #[test]
    fn pending_assignments_count_until_their_service_is_gone() {
        let a = svc("a", json!({}));
        let b = svc("b", json!({}));
        let pool_set = pool().into_iter().collect();
        let pending = HashMap::from([(ip("192.0.2.1"), "uid-a".to_string())]);
        let used = used_addresses(&[a.clone(), b.clone()], &pool_set, &pending);
        assert_eq!(
            decide(&a, &pool(), &used),
            LbDecision::Assign(ip("192.0.2.1"))
        );
        assert_eq!(
            decide(&b, &pool(), &used),
            LbDecision::Assign(ip("192.0.2.2"))
        );
        // a deleted: its pending address is free again.
        let used = used_addresses(std::slice::from_ref(&b), &pool_set, &pending);
        assert_eq!(
            decide(&b, &pool(), &used),
            LbDecision::Assign(ip("192.0.2.1"))
        );
    }
}
