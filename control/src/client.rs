//! A kube-rs client for the daemons that talk to the API server (the
//! scheduler and the controllers), from a kubeconfig file.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Errors building a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig could not be read or used.
    #[error("cannot use kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No kubeconfig was given and none could be inferred.
    #[error("no kubeconfig given and none could be inferred: {source}")]
    Infer {
        /// The cause.
        #[source]
        source: kube::config::InferConfigError,
    },
    /// The client could not be built.
    #[error("cannot build a client: {source}")]
    Build {
        /// The cause.
        #[source]
        source: kube::Error,
    },
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
