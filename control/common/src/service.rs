//! What more than one daemon reads off a Service.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServiceStatus};

/// The ingress IPs in a Service's `status.loadBalancer` (entries without an IP, or with one
/// that does not parse, are skipped).
pub fn ingress_ips(service: &Service) -> Vec<IpAddr> {
    status_ingress_ips(service.status.as_ref())
}

/// [`ingress_ips`] from the Service's status alone (for types that hold only part of a Service).
pub fn status_ingress_ips(status: Option<&ServiceStatus>) -> Vec<IpAddr> {
    status
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

/// The cluster DNS Service's ClusterIP in the service range `range`: its tenth address
/// (`10.96.0.10` in `10.96.0.0/12`), as kubeadm picks it; `None` in a range too small.
pub fn cluster_dns_ip(range: ipnetwork::Ipv4Network) -> Option<std::net::Ipv4Addr> {
    (range.size() > 10).then(|| std::net::Ipv4Addr::from(u32::from(range.network()) + 10))
}
