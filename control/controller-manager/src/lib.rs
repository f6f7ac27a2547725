//! The controller manager: controllers that keep the cluster's observed
//! state in line with its desired state, each a loop over the API (never
//! etcd) through a kube-rs client.
//!
//! Every controller is `async fn run(ctx: Arc<Context>, shutdown: CancellationToken)`:
//! it watches what it needs, reconciles idempotently, logs and retries its
//! errors, and returns when `shutdown` is cancelled. Only the leader of the
//! `kube-system/kube-controller-manager` Lease runs them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use k8s_openapi::api::core::v1::Pod;

use skiff_common::events::EventRecorder;
use skiff_common::informer::SharedWatch;
use skiff_common::leader::{self, ElectionArgs};

pub mod deployment;
pub mod endpoints;
pub mod expectations;
pub mod gc;
pub mod lbipam;
pub mod namespace;
pub mod node_ipam;
pub mod node_lifecycle;
pub mod pods;
pub mod replicaset;
pub mod serviceaccount;

/// What the controllers are configured with (upstream's
/// kube-controller-manager flags of the same names).
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerOptions {
    /// The pod network, from which every Node gets `spec.podCIDR`.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: ipnetwork::IpNetwork,
    /// The prefix length of each Node's pod CIDR.
    #[arg(long, default_value_t = 24)]
    pub node_cidr_mask_size: u8,
    /// How long a Node may go without a heartbeat before it is marked
    /// NotReady/Unknown.
    #[arg(long, value_parser = skiff_common::duration::parse_duration, default_value = "40s")]
    pub node_monitor_grace_period: Duration,
    /// The pool LoadBalancer Services get their ingress IPs from: a CIDR
    /// (`192.0.2.0/28`) or a range (`192.0.2.10-192.0.2.20`); none = such
    /// Services stay pending, as without a cloud provider.
    #[arg(long)]
    pub lb_ip_pool: Option<String>,
    /// Where service-account tokens' signing key is kept (created if
    /// missing); the API server verifies tokens with its public half.
    #[arg(long)]
    pub service_account_private_key_file: Option<PathBuf>,
    /// The cluster CA certificate (PEM) published in every namespace as the ConfigMap
    /// `kube-root-ca.crt` (key `ca.crt`), which pods' service-account volumes project.
    #[arg(long)]
    pub root_ca_file: Option<PathBuf>,
}

/// Flags of `skiff-control controller-manager`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerManagerArgs {
    /// Connection and election.
    #[command(flatten)]
    pub daemon: skiff_common::daemon::DaemonArgs,
    /// The controllers' configuration.
    #[command(flatten)]
    pub options: ControllerOptions,
}

/// What every controller shares.
pub struct Context {
    /// The API client.
    pub client: kube::Client,
    /// Events as `controller-manager` components write them.
    pub events: EventRecorder,
    /// Configuration.
    pub options: ControllerOptions,
    /// Every pod, watched once for all the controllers (and, in `all`, the
    /// scheduler).
    pub pods: Arc<SharedWatch<Pod>>,
}

impl Context {
    /// A context over `client`, with the pods of `pods`.
    pub fn new(
        client: kube::Client,
        options: ControllerOptions,
        pods: Arc<SharedWatch<Pod>>,
    ) -> Arc<Context> {
        Arc::new(Context {
            events: EventRecorder::new(client.clone(), "controller-manager"),
            client,
            options,
            pods,
        })
    }
}

/// Run every controller until `shutdown`.
pub async fn run_controllers(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut tasks: JoinSet<()> = JoinSet::new();
    // One line per controller; each returns when `shutdown` is cancelled.
    let _ = (&ctx, &mut tasks);
    tasks.spawn(endpoints::run(ctx.clone(), shutdown.clone()));
    tasks.spawn(serviceaccount::run(ctx.clone(), shutdown.clone()));
    tasks.spawn(namespace::run(ctx.clone(), shutdown.clone()));
    tasks.spawn(gc::run(ctx.clone(), shutdown.clone()));
    tasks.spawn(lbipam::run(ctx.clone(), shutdown.clone()));
    tasks.spawn(replicaset::run(ctx.clone(), shutdown.clone()));
    tasks.spawn(deployment::run(ctx.clone(), shutdown.clone()));
    tasks.spawn(node_ipam::run(ctx.clone(), shutdown.clone()));
    tasks.spawn(node_lifecycle::run(ctx.clone(), shutdown.clone()));
    shutdown.cancelled().await;
    while tasks.join_next().await.is_some() {}
}

/// `skiff-control controller-manager`: the controllers as their own
/// process, a client of the API server named by its kubeconfig.
pub async fn run_daemon(
    args: ControllerManagerArgs,
    shutdown: CancellationToken,
) -> Result<(), skiff_common::daemon::ClientError> {
    skiff_common::daemon::run_client_daemon(args.daemon, args.options, shutdown, run).await
}

/// Run the controller manager: every controller while this process leads
/// (the Lease `kube-system/kube-controller-manager`), or always with
/// election off; the controllers' pods come from `pods`.
pub async fn run(
    client: kube::Client,
    options: ControllerOptions,
    pods: Arc<SharedWatch<Pod>>,
    election: ElectionArgs,
    shutdown: CancellationToken,
) {
    let ctx = Context::new(client.clone(), options, pods);
    leader::run_elected(
        client,
        "kube-controller-manager",
        election,
        shutdown,
        move |leading| run_controllers(ctx.clone(), leading),
    )
    .await;
}

/// A `--lb-ip-pool` that is not a pool of addresses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// One end of a range is not an IPv4 address.
    #[error("bad address {text:?}")]
    Address {
        /// The end.
        text: String,
        /// Why it does not parse.
        #[source]
        source: std::net::AddrParseError,
    },
    /// A range whose first address is after its last, or of more than
    /// 65,536 addresses.
    #[error("bad or too large range {pool:?}")]
    Range {
        /// The pool.
        pool: String,
    },
    /// Neither a range nor a CIDR.
    #[error("bad pool {pool:?}")]
    Cidr {
        /// The pool.
        pool: String,
        /// Why it does not parse.
        #[source]
        source: ipnetwork::IpNetworkError,
    },
    /// A CIDR that is not IPv4 or larger than a /16.
    #[error("pool {pool:?} must be an IPv4 CIDR of /16 or smaller, or a range")]
    TooLarge {
        /// The pool.
        pool: String,
    },
}

/// Parse an LB pool: a CIDR or `first-last`; every usable address in order.
pub fn parse_pool(pool: &str) -> Result<Vec<IpAddr>, PoolError> {
    if let Some((first, last)) = pool.split_once('-') {
        let address = |text: &str| {
            text.trim()
                .parse::<std::net::Ipv4Addr>()
                .map_err(|source| PoolError::Address {
                    text: text.to_string(),
                    source,
                })
        };
        let (a, b) = (u32::from(address(first)?), u32::from(address(last)?));
        if a > b || b - a > 65_535 {
            return Err(PoolError::Range {
                pool: pool.to_string(),
            });
        }
        return Ok((a..=b).map(|n| IpAddr::V4(n.into())).collect());
    }
    let net: ipnetwork::IpNetwork = pool.parse().map_err(|source| PoolError::Cidr {
        pool: pool.to_string(),
        source,
    })?;
    match net {
        ipnetwork::IpNetwork::V4(v4) if v4.prefix() >= 16 => {
            let all: Vec<IpAddr> = v4.iter().map(IpAddr::V4).collect();
            // Skip network and broadcast addresses of real subnets.
            if v4.prefix() <= 30 {
                Ok(all[1..all.len() - 1].to_vec())
            } else {
                Ok(all)
            }
        }
        _ => Err(PoolError::TooLarge {
            pool: pool.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_parse_from_cidrs_and_ranges() {
        let pool = parse_pool("192.0.2.0/30").expect("cidr");
        assert_eq!(
            pool,
            vec![
                "192.0.2.1".parse::<IpAddr>().expect("ip"),
                "192.0.2.2".parse().expect("ip")
            ]
        );
        let pool = parse_pool("192.0.2.10-192.0.2.12").expect("range");
        assert_eq!(pool.len(), 3);
        assert!(parse_pool("192.0.2.12-192.0.2.10").is_err());
        assert!(parse_pool("10.0.0.0/8").is_err());
    }
}
