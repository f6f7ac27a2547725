//! skiff's cluster DNS (`skiff-control dns`): the names of Services, their endpoints and pods
//! under the cluster domain, as CoreDNS's `kubernetes` plugin answers them, and every other
//! name forwarded to upstream resolvers through a cache.
//!
//! - [`objects`]: Services, EndpointSlices and Pods decoded with only the fields DNS reads,
//! - [`zone`]: the records, kept from the watches' changes (pure),
//! - [`server`]: the UDP and TCP server (hickory-server), truncation and the forwarder,
//! - [`bootstrap`]: the `kube-system/kube-dns` Service at the tenth address of the service range
//!   and this server's EndpointSlice, which make it reachable through the nodes' datapath,
//! - [`run`]: the watches, the first sync, then the server, until shutdown.
//!
//! The server binds only once the first lists of Services, EndpointSlices and Pods are in the
//! zone: an empty zone would answer NXDOMAIN for names that exist, and clients cache that.

pub mod bootstrap;
pub mod objects;
pub mod server;
pub mod zone;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use ipnetwork::{IpNetwork, Ipv4Network};
use skiff_common::informer::SharedWatch;
use skiff_common::watch::Change;
use tokio_util::sync::CancellationToken;

use objects::{DnsPod, DnsService, DnsSlice};
use server::{Forwarder, Handler, SharedZone};
use zone::Zone;

/// Flags of `skiff-control dns`.
#[derive(Debug, Clone, clap::Args)]
pub struct DnsArgs {
    /// The kubeconfig to reach the API server with; `$KUBECONFIG` or in-cluster config when
    /// absent.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The address to serve DNS on (UDP and TCP).
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// The port to serve DNS on.
    #[arg(long, default_value_t = 53)]
    pub port: u16,
    /// The address the nodes reach this server at, published in the `kube-dns` Service's
    /// EndpointSlice (default: `--bind-address`, when it is not the unspecified address).
    #[arg(long)]
    pub advertise_address: Option<Ipv4Addr>,
    /// The cluster's domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The cluster's service range (its tenth address is the DNS Service's ClusterIP, and its
    /// reverse names are the zone's).
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cluster_ip_range: Ipv4Network,
    /// The cluster's pod range (its reverse names are the zone's).
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: Ipv4Network,
    /// The DNS Service's ClusterIP (default: the tenth address of the service range).
    #[arg(long)]
    pub cluster_dns: Option<Ipv4Addr>,
    /// A resolver for names outside the cluster (`ip` or `ip:port`; repeat for more). Default:
    /// the nameservers of `--resolv-conf`.
    #[arg(long = "upstream", value_parser = parse_upstream)]
    pub upstreams: Vec<SocketAddr>,
    /// The resolver configuration to take the upstream resolvers from when none is given.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// Answers from upstream kept in the cache.
    #[arg(long, default_value_t = 10_000)]
    pub cache_size: usize,
    /// The TTL of the cluster's records, in seconds (CoreDNS's default).
    #[arg(long, default_value_t = 5)]
    pub ttl: u32,
    /// Clients whose questions for names outside the cluster are forwarded (others get
    /// REFUSED: an open resolver on a reachable address serves anyone).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,127.0.0.0/8"
    )]
    pub recursion_from: Vec<IpNetwork>,
}

/// `ip` or `ip:port` (port 53 when absent).
fn parse_upstream(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{text:?} is neither an address nor an address:port"))
}

impl DnsArgs {
    /// The DNS Service's ClusterIP.
    pub fn cluster_dns_ip(&self) -> Option<Ipv4Addr> {
        self.cluster_dns
            .or_else(|| skiff_common::service::cluster_dns_ip(self.service_cluster_ip_range))
    }

    /// The address published for this server.
    pub fn advertised(&self) -> Option<Ipv4Addr> {
        self.advertise_address.or(match self.bind_address {
            IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
            _ => None,
        })
    }
}

/// Why the DNS server stopped.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The client could not be built.
    #[error(transparent)]
    Client(#[from] skiff_common::daemon::ClientError),
    /// The zone's configuration is wrong.
    #[error(transparent)]
    Zone(#[from] zone::ZoneError),
    /// The address to publish is unknown.
    #[error("no address to publish: give --advertise-address (or a --bind-address of one)")]
    NoAdvertiseAddress,
    /// The service range has no tenth address.
    #[error("the service range {range} has no tenth address: give --cluster-dns")]
    NoClusterDns {
        /// The range.
        range: Ipv4Network,
    },
    /// The resolver configuration cannot be read.
    #[error("cannot read the upstream resolvers from {path}")]
    ResolvConf {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The resolver configuration does not parse.
    #[error("cannot parse the resolver configuration {path}")]
    ResolvConfSyntax {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: hickory_resolver::ResolveError,
    },
    /// The sockets could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server failed.
    #[error("the DNS server failed")]
    Serve {
        /// Why.
        #[source]
        source: hickory_proto::ProtoError,
    },
}

/// The upstream resolvers: the flags', or the nameservers of the resolver configuration.
pub fn upstreams(args: &DnsArgs) -> Result<Vec<SocketAddr>, DnsError> {
    if !args.upstreams.is_empty() {
        return Ok(args.upstreams.clone());
    }
    let text = std::fs::read(&args.resolv_conf).map_err(|source| DnsError::ResolvConf {
        path: args.resolv_conf.clone(),
        source,
    })?;
    let (config, _) =
        hickory_resolver::system_conf::parse_resolv_conf(&text).map_err(|source| {
            DnsError::ResolvConfSyntax {
                path: args.resolv_conf.clone(),
                source,
            }
        })?;
    let mut out: Vec<SocketAddr> = config
        .name_servers()
        .iter()
        .map(|ns| ns.socket_addr)
        .collect();
    out.dedup();
    Ok(out)
}

/// `skiff-control dns`: the client from the kubeconfig, then [`run`].
pub async fn run_daemon(args: DnsArgs, shutdown: CancellationToken) -> Result<(), DnsError> {
    let client = skiff_common::daemon::client(args.kubeconfig.as_deref()).await?;
    run(client, args, shutdown).await
}

/// Watches Services, EndpointSlices and Pods into the zone, keeps the `kube-dns` Service and
/// this server's EndpointSlice, and serves until `shutdown`.
pub async fn run(
    client: kube::Client,
    args: DnsArgs,
    shutdown: CancellationToken,
) -> Result<(), DnsError> {
    let advertised = args.advertised().ok_or(DnsError::NoAdvertiseAddress)?;
    let cluster_dns = args.cluster_dns_ip().ok_or(DnsError::NoClusterDns {
        range: args.service_cluster_ip_range,
    })?;
    let upstreams = upstreams(&args)?;
    let zone: SharedZone = Arc::new(RwLock::new(Zone::new(
        &args.cluster_domain,
        args.ttl,
        vec![args.service_cluster_ip_range, args.cluster_cidr],
    )?));

    let services: Arc<SharedWatch<DnsService>> = SharedWatch::new(client.clone(), shutdown.clone());
    let slices: Arc<SharedWatch<DnsSlice>> = SharedWatch::new(client.clone(), shutdown.clone());
    let pods: Arc<SharedWatch<DnsPod>> = SharedWatch::new(client.clone(), shutdown.clone());
    let mut service_changes = services.subscribe();
    let mut slice_changes = slices.subscribe();
    let mut pod_changes = pods.subscribe();
    // The feeder applies every change to the zone; it says when the first list of each kind is
    // in (each subscriber's first change is a whole list).
    let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
    let feeder = {
        let zone = zone.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut listed = [false; 3];
            let mut synced_tx = Some(synced_tx);
            loop {
                let kind = tokio::select! {
                    () = shutdown.cancelled() => return,
                    Some(change) = service_changes.recv() => {
                        let list = matches!(change, Change::Resynced(_));
                        zone.write().unwrap_or_else(|e| e.into_inner()).apply_service(change);
                        list.then_some(0)
                    }
                    Some(change) = slice_changes.recv() => {
                        let list = matches!(change, Change::Resynced(_));
                        zone.write().unwrap_or_else(|e| e.into_inner()).apply_slice(change);
                        list.then_some(1)
                    }
                    Some(change) = pod_changes.recv() => {
                        let list = matches!(change, Change::Resynced(_));
                        zone.write().unwrap_or_else(|e| e.into_inner()).apply_pod(change);
                        list.then_some(2)
                    }
                    else => return,
                };
                if let Some(kind) = kind {
                    listed[kind] = true;
                    if listed.iter().all(|l| *l)
                        && let Some(tx) = synced_tx.take()
                    {
                        let _ = tx.send(());
                    }
                }
            }
        })
    };
    tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        synced = synced_rx => if synced.is_err() { return Ok(()) },
    }

    let addr = SocketAddr::new(args.bind_address, args.port);
    let bind = |source| DnsError::Bind { addr, source };
    let udp = tokio::net::UdpSocket::bind(addr).await.map_err(bind)?;
    let tcp = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
    let (services_n, slices_n, pods_n) = zone.read().unwrap_or_else(|e| e.into_inner()).counts();
    tracing::info!(
        %addr, %advertised, %cluster_dns, domain = %args.cluster_domain,
        upstreams = ?upstreams, services = services_n, slices = slices_n, pods = pods_n,
        "cluster DNS serving"
    );

    let keeper = tokio::spawn(bootstrap::keep(
        client,
        bootstrap::Published {
            cluster_ip: cluster_dns,
            address: advertised,
            port: args.port,
        },
        shutdown.clone(),
    ));
    let forwarder = (!upstreams.is_empty()).then(|| Forwarder::new(&upstreams, args.cache_size));
    let handler = Handler::new(zone, forwarder, args.recursion_from.clone());
    let result = server::serve(handler, udp, tcp, shutdown.clone()).await;
    shutdown.cancel();
    let _ = feeder.await;
    let _ = keeper.await;
    result.map_err(|source| DnsError::Serve { source })
}
