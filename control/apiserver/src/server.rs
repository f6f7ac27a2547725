//! Running the API server: certificates, etcd (child or external), the
//! bootstrap objects, the HTTPS listener, and one shutdown signal fanned out
//! to every task.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::admission::ServiceAllocator;
use crate::api::{self, AppState};
use crate::auth::{self, AllowAuthenticated, AuthState, Authenticator};
use crate::cli::ApiserverArgs;
use crate::etcd::EtcdChild;
use crate::metrics::{self, Metrics};
use crate::pki::{self, Pki};
use crate::storage::{StorageError, Store};
use skiff_common::registry;

/// Errors that stop the API server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory could not be made.
    #[error("cannot create data directory {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Certificates could not be loaded or made.
    #[error("certificates")]
    Pki {
        /// The cause.
        #[source]
        source: pki::PkiError,
    },
    /// The proxy to node agents could not be set up.
    #[error("node proxy")]
    NodeProxy {
        /// The cause.
        #[source]
        source: crate::nodeproxy::NodeProxyError,
    },
    /// Authentication could not be set up.
    #[error("authentication")]
    Auth {
        /// The cause.
        #[source]
        source: auth::AuthError,
    },
    /// The service-account token key could not be loaded or made.
    #[error("service-account key")]
    ServiceAccountKey {
        /// The cause.
        #[source]
        source: skiff_common::serviceaccount::TokenError,
    },
    /// The embedded etcd did not start.
    #[error("embedded etcd")]
    Etcd {
        /// The cause.
        #[source]
        source: crate::etcd::EtcdError,
    },
    /// etcd could not be used.
    #[error("storage")]
    Storage {
        /// The cause.
        #[source]
        source: StorageError,
    },
    /// The listener failed.
    #[error("cannot serve on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Run the API server until `shutdown` is cancelled.
pub async fn run_apiserver(
    args: ApiserverArgs,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    run_apiserver_with(args, shutdown, None).await
}

/// What a started API server tells the daemons that run beside it.
pub struct Ready {
    /// The URL it serves on.
    pub url: String,
    /// Its certificates, to issue the daemons' client certificates.
    pub pki: Pki,
    /// Its handler stack, for clients in the same process
    /// ([`crate::client::in_process`]).
    pub app: axum::Router,
}

/// Run the API server, telling `ready` once it listens.
pub async fn run_apiserver_with(
    args: ApiserverArgs,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Ready>>,
) -> Result<(), ServerError> {
    std::fs::create_dir_all(&args.data_dir).map_err(|source| ServerError::DataDir {
        path: args.data_dir.clone(),
        source,
    })?;
    let mut sans = args.tls_san.clone();
    if !args.bind_address.is_unspecified() {
        sans.push(args.bind_address.to_string());
    }
    // In-cluster clients reach the server at the `kubernetes` Service's ClusterIP.
    sans.push(first_service_ip(args.service_cluster_ip_range).to_string());
    if let Some(advertise) = args.advertise_address {
        sans.push(advertise.to_string());
    }
    let pki = Pki::load_or_create(&args.data_dir.join("pki"), &sans)
        .map_err(|source| ServerError::Pki { source })?;

    let (etcd, endpoints) = if args.etcd_servers.is_empty() {
        let child = EtcdChild::start(&args.etcd_binary, &args.data_dir)
            .await
            .map_err(|source| ServerError::Etcd { source })?;
        tracing::info!(endpoint = child.endpoint(), "embedded etcd started");
        let endpoint = child.endpoint().to_string();
        (Some(child), vec![endpoint])
    } else {
        (None, args.etcd_servers.clone())
    };
    let mut store = Store::connect(&endpoints)
        .await
        .map_err(|source| ServerError::Storage { source })?;
    if let Some(events) = registry::find("", "v1", "events") {
        store = store.expiring(&events.key_prefix(), args.event_ttl);
    }

    let addr = SocketAddr::new(args.bind_address, args.secure_port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServerError::Listen { addr, source })?;
    let host = if args.bind_address.is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        args.bind_address.to_string()
    };
    let server_url = if host.contains(':') {
        format!("https://[{host}]:{}", local.port())
    } else {
        format!("https://{host}:{}", local.port())
    };
    let bootstrap_store = store.clone();
    let bootstrap_shutdown = shutdown.clone();
    let service = BootstrapService {
        cluster_ip: first_service_ip(args.service_cluster_ip_range),
        advertise: args
            .advertise_address
            .unwrap_or(if args.bind_address.is_unspecified() {
                std::net::IpAddr::from([127, 0, 0, 1])
            } else {
                args.bind_address
            }),
        port: local.port(),
    };
    tokio::spawn(async move { bootstrap(&bootstrap_store, &bootstrap_shutdown, service).await });
    if let Some(path) = &args.write_kubeconfig {
        pki::write_kubeconfig(path, &server_url, &pki)
            .map_err(|source| ServerError::Pki { source })?;
        tracing::info!(path = %path.display(), "wrote admin kubeconfig");
    }

    let mut authenticator = Authenticator::new(args.token_auth_file.as_deref())
        .map_err(|source| ServerError::Auth { source })?;
    let service_accounts =
        crate::auth::serviceaccount::ServiceAccountTokenAuthenticator::for_apiserver(
            args.service_account_key_file.as_deref(),
            &args.data_dir,
        )
        .map_err(|source| ServerError::ServiceAccountKey { source })?;
    authenticator.add_token_authenticator(Box::new(service_accounts));
    let auth_state = Arc::new(AuthState {
        authenticator,
        authorizer: Box::new(AllowAuthenticated),
    });
    let metrics = Arc::new(Metrics::new());
    let mut state = AppState::new(
        store,
        ServiceAllocator::new(
            args.service_cluster_ip_range,
            args.service_node_port_range.clone(),
        ),
        metrics.clone(),
        format!("{host}:{}", local.port()),
        shutdown.clone(),
        crate::nodeproxy::NodeProxy::new(&pki)
            .map_err(|source| ServerError::NodeProxy { source })?,
    );
    state.tokens =
        token_issuer(&args).map_err(|source| ServerError::ServiceAccountKey { source })?;
    let state = Arc::new(state);
    let app = api::router(state)
        .layer(axum::middleware::from_fn_with_state(
            auth_state,
            auth::middleware,
        ))
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            metrics::middleware,
        ));
    let tls = pki
        .server_config()
        .map_err(|source| ServerError::Pki { source })?;
    tracing::info!("listening on {server_url}");
    eprintln!("listening on {server_url}");
    if let Some(ready) = ready {
        let _ = ready.send(Ready {
            url: server_url.clone(),
            pki: pki.clone(),
            app: app.clone(),
        });
    }
    let stop = shutdown.clone();
    let served =
        crate::serve::serve_tls(listener, tls, app, async move { stop.cancelled().await }).await;
    shutdown.cancel();
    if let Some(etcd) = etcd {
        etcd.stop().await;
    }
    served.map_err(|source| ServerError::Listen { addr, source })
}

/// The first usable address of the service range, upstream's address of
/// the `kubernetes` Service (10.96.0.1 for 10.96.0.0/12).
fn first_service_ip(range: ipnetwork::IpNetwork) -> std::net::IpAddr {
    match range {
        ipnetwork::IpNetwork::V4(v4) => v4.nth(1).map(std::net::IpAddr::V4),
        ipnetwork::IpNetwork::V6(v6) => v6.nth(1).map(std::net::IpAddr::V6),
    }
    .unwrap_or(range.ip())
}

/// What the bootstrap writes besides namespaces: the `default/kubernetes`
/// Service that in-cluster clients use, and its endpoints.
struct BootstrapService {
    /// The first address of the service range.
    cluster_ip: std::net::IpAddr,
    /// Where clients reach this API server.
    advertise: std::net::IpAddr,
    /// The HTTPS port.
    port: u16,
}

/// The signer of `serviceaccounts/token`: `--service-account-signing-key-file`, or the key the
/// server generated under its data directory when no verification key was given (the pair
/// `skiff-control all`'s token controller signs with too); none otherwise.
fn token_issuer(
    args: &ApiserverArgs,
) -> Result<
    Option<skiff_common::serviceaccount::TokenIssuer>,
    skiff_common::serviceaccount::TokenError,
> {
    use skiff_common::serviceaccount::{TokenIssuer, default_key_paths, load_or_create_key};
    let path = match (
        &args.service_account_signing_key_file,
        &args.service_account_key_file,
    ) {
        (Some(path), _) => path.clone(),
        (None, None) => default_key_paths(&args.data_dir).0,
        (None, Some(_)) => return Ok(None),
    };
    let key = load_or_create_key(&path)?;
    TokenIssuer::new(&key, &path).map(Some)
}

/// Create what every cluster has: the four system namespaces and the
/// `default/kubernetes` Service with its Endpoints and EndpointSlice, as
/// upstream's bootstrap controller does. Existing objects are left alone.
/// Retries until etcd answers, since the server starts serving (with 503s)
/// before.
async fn bootstrap(store: &Store, shutdown: &CancellationToken, service: BootstrapService) {
    let find = |group: &str, plural: &str| {
        registry::find(group, "v1", plural).expect("bootstrap kinds are served")
    };
    let mut objects = Vec::new();
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        objects.push((
            find("", "namespaces"),
            json!({
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }),
            Vec::new(),
        ));
    }
    let ip = service.cluster_ip.to_string();
    let family = if service.cluster_ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    };
    let labels = json!({"component": "apiserver", "provider": "kubernetes"});
    objects.push((find("", "services"), json!({
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": "kubernetes", "namespace": "default", "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ipFamilies": [family],
            "ipFamilyPolicy": "SingleStack",
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": service.port}],
        },
        "status": {"loadBalancer": {}},
    }), vec![crate::admission::ServiceAllocator::ip_key(&service.cluster_ip)]));
    let address = service.advertise.to_string();
    objects.push((find("", "endpoints"), json!({
        "kind": "Endpoints",
        "apiVersion": "v1",
        "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": [{"addresses": [{"ip": address}], "ports": [{"name": "https", "port": service.port, "protocol": "TCP"}]}],
    }), Vec::new()));
    objects.push((find("discovery.k8s.io", "endpointslices"), json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": family,
        "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": service.port, "protocol": "TCP"}],
    }), Vec::new()));
    for (info, mut object, claims) in objects {
        let namespace = crate::meta::namespace(&object).map(str::to_string);
        let name = crate::meta::name(&object).unwrap_or_default().to_string();
        if crate::meta::prepare_create(info, &mut object, namespace.as_deref()).is_err() {
            continue;
        }
        let key = crate::meta::key(info, namespace.as_deref(), &name);
        loop {
            match store.create(&key, &object, &claims).await {
                Ok(_)
                | Err(StorageError::AlreadyExists { .. })
                | Err(StorageError::ClaimTaken { .. }) => break,
                Err(error) => {
                    tracing::warn!(error = %skiff_common::error::chain(&error), %key, "bootstrap waits for etcd");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
}
