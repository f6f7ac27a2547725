//! `skiff-control all`: the API server, the controller manager and the
//! scheduler in one process.

use skiff_apiserver::server::ServerError;
use skiff_common::informer::SharedWatch;
use tokio_util::sync::CancellationToken;

use crate::cli::AllArgs;

/// Errors of `skiff-control all`.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The API server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The daemon's client certificate could not be issued.
    #[error("cannot issue the {daemon} client certificate")]
    Credentials {
        /// Which daemon.
        daemon: &'static str,
        /// The cause.
        #[source]
        source: skiff_apiserver::pki::PkiError,
    },
}

/// `skiff-control all`: the API server, then the controller manager and
/// the scheduler, each with its own client certificate, their requests
/// handed to the server's handler stack in process.
pub async fn run_all(args: AllArgs, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let data_dir = args.apiserver.data_dir.clone();
    let mut args = args;
    // The token controller signs with the key the API server verifies with.
    if args.controllers.service_account_private_key_file.is_none() {
        let (private, _) = skiff_common::serviceaccount::default_key_paths(&data_dir);
        args.controllers.service_account_private_key_file = Some(private);
    }
    // The CA published in every namespace is the API server's own.
    if args.controllers.root_ca_file.is_none() {
        args.controllers.root_ca_file = Some(data_dir.join("pki").join("ca.crt"));
    }
    let server = tokio::spawn(skiff_apiserver::server::run_apiserver_with(
        args.apiserver.clone(),
        shutdown.clone(),
        Some(tx),
    ));
    let Ok(ready) = rx.await else {
        // The server stopped before it listened: its error says why.
        return match server.await {
            Ok(result) => result.map_err(DaemonError::from),
            Err(_) => Ok(()),
        };
    };
    // Each daemon with a client certificate of its own, its requests handed
    // to the server's handler stack in process.
    let client = |daemon: &'static str, user: &str| {
        let identity = ready
            .pki
            .issue_client_identity(user)
            .map_err(|source| DaemonError::Credentials { daemon, source })?;
        Ok::<_, DaemonError>(skiff_apiserver::client::in_process(
            ready.app.clone(),
            identity,
        ))
    };
    let controllers = client("controller-manager", "system:kube-controller-manager")?;
    let scheduler = client("scheduler", "system:kube-scheduler")?;
    // One watch of every pod serves both daemons (upstream's shared
    // informers; here across daemons as well, since they share a process),
    // under the controller manager's identity.
    let pods = SharedWatch::new(controllers.clone(), shutdown.clone());
    let mut daemons = tokio::task::JoinSet::new();
    daemons.spawn(skiff_controller_manager::run(
        controllers,
        args.controllers,
        pods.clone(),
        args.election,
        shutdown.clone(),
    ));
    daemons.spawn(skiff_scheduler::run(
        scheduler,
        args.scheduler,
        pods,
        args.election,
        shutdown.clone(),
    ));
    let result = server.await;
    shutdown.cancel();
    while daemons.join_next().await.is_some() {}
    match result {
        Ok(result) => result.map_err(DaemonError::from),
        Err(_) => Ok(()),
    }
}
