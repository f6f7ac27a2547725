//! A kube-rs client for daemons that run in the API server's own process
//! (`skiff-control all`): each request is handed straight to the server's
//! handler stack. Clients of daemons apart from it come from
//! `skiff_common::daemon::client`.

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
