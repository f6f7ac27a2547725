//! What every daemon's start shares (the agent in each mode, the API
//! server, the scheduler, the controller manager, skiffctl): the one
//! tracing subscriber of the process, the one shutdown token fanned out to
//! its tasks, and the API client from a kubeconfig.

use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio_util::sync::CancellationToken;

/// Errors building a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig could not be read or used.
    #[error("cannot use kubeconfig {path}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No kubeconfig was given and none could be inferred.
    #[error("no kubeconfig given and none could be inferred")]
    Infer {
        /// The cause.
        #[source]
        source: kube::config::InferConfigError,
    },
    /// The client could not be built.
    #[error("cannot build a client")]
    Build {
        /// The cause.
        #[source]
        source: kube::Error,
    },
}

/// Flags shared by the daemons that reach the API server as clients and
/// elect a leader (the scheduler and the controller manager, each as its
/// own process).
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// The kubeconfig to reach the API server with; `$KUBECONFIG` or
    /// in-cluster config when absent.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Leader election among replicas.
    #[command(flatten)]
    pub election: crate::leader::ElectionArgs,
}

/// A daemon's `main` after its flags are parsed: the tracing subscriber
/// (`log_filter`, RUST_LOG syntax), a multi-threaded runtime, and `main`
/// run on it with the process's shutdown token.
pub fn block_on<F, Fut, E>(log_filter: &str, main: F) -> Result<(), E>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: From<std::io::Error>,
{
    init_tracing(log_filter);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async { main(shutdown_on_signal()).await })
}

/// A daemon apart from the API server (the scheduler, the controller
/// manager): its client from `daemon`'s kubeconfig and the process's one
/// pod watch, then `run` with them, its `options` and its election, until
/// `shutdown`.
pub async fn run_client_daemon<O, F, Fut>(
    daemon: DaemonArgs,
    options: O,
    shutdown: CancellationToken,
    run: F,
) -> Result<(), ClientError>
where
    F: FnOnce(
        kube::Client,
        O,
        std::sync::Arc<crate::informer::SharedWatch<k8s_openapi::api::core::v1::Pod>>,
        crate::leader::ElectionArgs,
        CancellationToken,
    ) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let client = self::client(daemon.kubeconfig.as_deref()).await?;
    let pods = crate::informer::SharedWatch::new(client.clone(), shutdown.clone());
    run(client, options, pods, daemon.election, shutdown).await;
    Ok(())
}

/// Set up the one tracing subscriber of the process (stderr, `filter` as
/// RUST_LOG; `info` if it does not parse).
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: the daemons' log files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The process's shutdown token, cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(error = %crate::error::chain(&error), "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutting down");
        cancel.cancel();
    });
    token
}

/// A client from `kubeconfig`, or from the environment (`$KUBECONFIG`,
/// in-cluster) when `None`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let wrap = |source| ClientError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(wrap)?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(wrap)?
        }
        None => kube::Config::infer()
            .await
            .map_err(|source| ClientError::Infer { source })?,
    };
    kube::Client::try_from(config).map_err(|source| ClientError::Build { source })
}
