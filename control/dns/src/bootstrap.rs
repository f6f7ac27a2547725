//! What makes the server reachable from pods: the `kube-system/kube-dns` Service (no selector,
//! its ClusterIP the tenth address of the service range, `dns` 53/UDP and `dns-tcp` 53/TCP, as
//! kubeadm's CoreDNS addon names them), and an EndpointSlice of this server's address and port,
//! named after the address (one per server, when several run). The nodes' datapath does the
//! rest, as for any Service.
//!
//! Both are created when missing and checked again every [`RECHECK`]: a Service an operator
//! edited is left as it is; the slice is put back to this server's address and port.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The Service's namespace and name.
pub const NAMESPACE: &str = "kube-system";
/// The Service's name.
pub const SERVICE: &str = "kube-dns";
/// How often the Service and the slice are checked.
pub const RECHECK: Duration = Duration::from_secs(10);
/// The label naming what manages the slice.
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// Its value for the slices this server keeps.
const MANAGER: &str = "skiff-dns";

/// What this server publishes.
#[derive(Clone, Copy, Debug)]
pub struct Published {
    /// The Service's ClusterIP.
    pub cluster_ip: Ipv4Addr,
    /// This server's address.
    pub address: Ipv4Addr,
    /// Its port.
    pub port: u16,
}

/// The Service, as created.
pub fn service(published: &Published) -> Service {
    let ip = published.cluster_ip.to_string();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": SERVICE, "namespace": NAMESPACE,
                     "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS",
                                "kubernetes.io/cluster-service": "true",
                                "app.kubernetes.io/managed-by": MANAGER}},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": published.port},
                           {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": published.port}]}
    }))
    .expect("a valid Service")
}

/// The slice's name: `kube-dns-` and the address with dashes.
pub fn slice_name(address: Ipv4Addr) -> String {
    format!("{SERVICE}-{}", address.to_string().replace('.', "-"))
}

/// This server's EndpointSlice.
pub fn slice(published: &Published) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": slice_name(published.address), "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": SERVICE, MANAGED_BY: MANAGER}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [published.address.to_string()],
                       "conditions": {"ready": true, "serving": true, "terminating": false}}],
        "ports": [{"name": "dns", "port": published.port, "protocol": "UDP"},
                  {"name": "dns-tcp", "port": published.port, "protocol": "TCP"}]
    }))
    .expect("a valid EndpointSlice")
}

/// Whether `have` publishes what `want` does.
fn same_slice(have: &EndpointSlice, want: &EndpointSlice) -> bool {
    let strip = |s: &EndpointSlice| {
        (
            serde_json::to_value(&s.endpoints).ok(),
            serde_json::to_value(&s.ports).ok(),
            s.address_type.clone(),
        )
    };
    strip(have) == strip(want)
}

/// Creates the Service and the slice when missing and puts the slice back when it differs.
pub async fn ensure(client: &kube::Client, published: &Published) -> Result<(), kube::Error> {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    if services.get_opt(SERVICE).await?.is_none() {
        match services
            .create(&PostParams::default(), &service(published))
            .await
        {
            Ok(_) => {
                tracing::info!(cluster_ip = %published.cluster_ip, "created the kube-dns Service")
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let want = slice(published);
    let name = slice_name(published.address);
    match slices.get_opt(&name).await? {
        None => match slices.create(&PostParams::default(), &want).await {
            Ok(_) => {
                tracing::info!(address = %published.address, port = published.port, "published the DNS server")
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        },
        Some(have) if !same_slice(&have, &want) => {
            let replacement = EndpointSlice {
                metadata: ObjectMeta {
                    resource_version: have.metadata.resource_version.clone(),
                    ..want.metadata.clone()
                },
                ..want
            };
            slices
                .replace(&name, &PostParams::default(), &replacement)
                .await?;
            tracing::info!(address = %published.address, port = published.port, "put the DNS server's EndpointSlice back");
        }
        Some(_) => {}
    }
    Ok(())
}

/// [`ensure`] now and every [`RECHECK`] until `shutdown`; failures are logged and tried again.
pub async fn keep(client: kube::Client, published: Published, shutdown: CancellationToken) {
    loop {
        if let Err(error) = ensure(&client, &published).await {
            tracing::warn!(error = %skiff_common::error::chain(&error), "cannot publish the cluster DNS Service");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RECHECK) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_and_slice_are_kubeadms_names_with_this_servers_address() {
        let published = Published {
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            address: Ipv4Addr::new(10, 90, 0, 1),
            port: 5353,
        };
        let service = service(&published);
        let spec = service.spec.as_ref().expect("a spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert!(spec.selector.is_none(), "no selector: the slice is ours");
        let ports: Vec<_> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone().unwrap_or_default(),
                    p.port,
                    p.protocol.clone().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                ("dns".to_owned(), 53, "UDP".to_owned()),
                ("dns-tcp".to_owned(), 53, "TCP".to_owned())
            ]
        );
        let slice = slice(&published);
        assert_eq!(slice.metadata.name.as_deref(), Some("kube-dns-10-90-0-1"));
        assert_eq!(
            slice.endpoints.as_ref().expect("endpoints")[0].addresses,
            ["10.90.0.1"]
        );
        assert_eq!(slice.ports.as_ref().expect("ports")[0].port, Some(5353));
        assert!(same_slice(&slice, &slice.clone()));
        let moved = self::slice(&Published {
            port: 53,
            ..published
        });
        assert!(!same_slice(&slice, &moved));
    }
}
