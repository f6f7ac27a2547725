//! What more than one daemon reads off a Service.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;

/// The ingress IPs in a Service's `status.loadBalancer` (entries without an IP, or with one
/// that does not parse, are skipped).
pub fn ingress_ips(service: &Service) -> Vec<IpAddr> {
    service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}
