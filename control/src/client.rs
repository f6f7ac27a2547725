//! A kube-rs client for the daemons that talk to the API server (the
//! scheduler and the controllers): from a kubeconfig file, or, for daemons
//! that run in the API server's own process (`skiff-control all`), one that
//! hands each request straight to the server's handler stack.

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

/// A client whose requests go straight to `app`, the API server's router
/// in this process, as if they came over a TLS connection that presented
/// the client certificate `certificate`.
///
/// Every request still goes through the whole handler stack (metrics,
/// authentication of that certificate, authorization, admission, storage):
/// only TLS, HTTP framing and the loopback socket are left out, which cost
/// daemons in the same process as much CPU as some of the handlers.
pub fn in_process(
    app: axum::Router,
    certificate: rustls::pki_types::CertificateDer<'static>,
) -> kube::Client {
    use tower::ServiceExt;
    let peer = crate::serve::PeerCertificates::new(vec![certificate]);
    let remote = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let (parts, body) = request.into_parts();
        let mut request = http::Request::from_parts(parts, axum::body::Body::new(body));
        request.extensions_mut().insert(peer.clone());
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(remote));
        app.clone().oneshot(request)
    });
    kube::Client::new(service, "default")
}
