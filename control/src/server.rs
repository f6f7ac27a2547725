//! Running the API server: certificates, etcd (child or external), the
//! bootstrap objects, the HTTPS listener, and one shutdown signal fanned out
//! to every task.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::admission::ServiceAllocator;
use crate::api::{self, AppState};
use crate::auth::{self, AllowAuthenticated, AuthState, Authenticator};
use crate::cli::ApiserverArgs;
use crate::etcd::EtcdChild;
use crate::metrics::{self, Metrics};
use crate::openapi::OpenApi;
use crate::pki::{self, Pki};
use crate::registry;
use crate::storage::{StorageError, Store};

/// Errors that stop the API server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory could not be made.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Certificates could not be loaded or made.
    #[error("certificates: {source}")]
    Pki {
        /// The cause.
        #[source]
        source: pki::PkiError,
    },
    /// Authentication could not be set up.
    #[error("authentication: {source}")]
    Auth {
        /// The cause.
        #[source]
        source: auth::AuthError,
    },
    /// The embedded etcd did not start.
    #[error("embedded etcd: {source}")]
    Etcd {
        /// The cause.
        #[source]
        source: crate::etcd::EtcdError,
    },
    /// etcd could not be used.
    #[error("storage: {source}")]
    Storage {
        /// The cause.
        #[source]
        source: StorageError,
    },
    /// The listener failed.
    #[error("cannot serve on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Set up the one tracing subscriber of the process.
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                cancel.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        cancel.cancel();
    });
    token
}

/// Run the API server until `shutdown` is cancelled.
pub async fn run_apiserver(args: ApiserverArgs, shutdown: CancellationToken) -> Result<(), ServerError> {
    std::fs::create_dir_all(&args.data_dir).map_err(|source| ServerError::DataDir {
        path: args.data_dir.clone(),
        source,
    })?;
    let mut sans = args.tls_san.clone();
    if !args.bind_address.is_unspecified() {
        sans.push(args.bind_address.to_string());
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
    let store = Store::connect(&endpoints)
        .await
        .map_err(|source| ServerError::Storage { source })?;
    let bootstrap_store = store.clone();
    let bootstrap_shutdown = shutdown.clone();
    tokio::spawn(async move { bootstrap(&bootstrap_store, &bootstrap_shutdown).await });

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
    if let Some(path) = &args.write_kubeconfig {
        pki::write_kubeconfig(path, &server_url, &pki).map_err(|source| ServerError::Pki { source })?;
        tracing::info!(path = %path.display(), "wrote admin kubeconfig");
    }

    let authenticator = Authenticator::new(args.token_auth_file.as_deref())
        .map_err(|source| ServerError::Auth { source })?;
    let auth_state = Arc::new(AuthState {
        authenticator,
        authorizer: Box::new(AllowAuthenticated),
    });
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(AppState {
        store,
        openapi: OpenApi::build(),
        allocator: ServiceAllocator::new(args.service_cluster_ip_range, args.service_node_port_range.clone()),
        metrics: metrics.clone(),
        server_addr: format!("{host}:{}", local.port()),
    });
    let app = api::router(state)
        .layer(DefaultBodyLimit::max(api::MAX_BODY_BYTES + 1))
        .layer(axum::middleware::from_fn_with_state(auth_state, auth::middleware))
        .layer(axum::middleware::from_fn_with_state(metrics, metrics::middleware));
    let tls = pki.server_config().map_err(|source| ServerError::Pki { source })?;
    tracing::info!("listening on {server_url}");
    eprintln!("listening on {server_url}");
    let stop = shutdown.clone();
    let served = crate::serve::serve_tls(listener, tls, app, async move { stop.cancelled().await }).await;
    shutdown.cancel();
    if let Some(etcd) = etcd {
        etcd.stop().await;
    }
    served.map_err(|source| ServerError::Listen { addr, source })
}

/// Create what every cluster has: the four system namespaces. Retries
/// until etcd answers, since the server starts serving (with 503s) before.
async fn bootstrap(store: &Store, shutdown: &CancellationToken) {
    let namespaces = registry::find("", "v1", "namespaces").expect("namespaces are served");
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let key = crate::meta::key(namespaces, None, name);
        loop {
            let mut object = json!({
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            });
            if crate::meta::prepare_create(namespaces, &mut object, None).is_err() {
                break;
            }
            match store.create(&key, &object, &[]).await {
                Ok(_) | Err(StorageError::AlreadyExists { .. }) => break,
                Err(error) => {
                    tracing::warn!(%error, namespace = name, "bootstrap waits for etcd");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
}
