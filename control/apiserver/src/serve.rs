//! The HTTPS accept loop: TLS via rustls, HTTP/1.1 and HTTP/2 via hyper,
//! requests handed to an axum [`Router`](axum::Router).
//!
//! Each connection runs in its own task, TLS handshake included, so a slow
//! or stalled client never blocks `accept`. The verified client certificate
//! chain of a connection is inserted into every request's extensions as
//! [`PeerCertificates`] (the authenticator reads it), and the peer address
//! as [`axum::extract::ConnectInfo`]. On shutdown the listener closes,
//! connections are asked to finish gracefully, and whatever is still open
//! after a bounded grace (long-running watches) is dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// How long a client may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight connections may run on after shutdown began.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long to pause accepting after an accept error (e.g. out of file
/// descriptors), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The verified client certificate chain of the connection (leaf first),
/// inserted into every request's extensions; absent when the client sent none.
///
/// Cloning is cheap (one shared chain per connection), and the user the
/// leaf names is parsed once per connection, on first use, not per request.
#[derive(Clone, Debug)]
pub struct PeerCertificates(Arc<PeerChain>);

#[derive(Debug)]
struct PeerChain {
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    user: std::sync::OnceLock<Option<crate::auth::UserInfo>>,
}

impl PeerCertificates {
    /// A verified chain, leaf first.
    pub fn new(chain: Vec<rustls::pki_types::CertificateDer<'static>>) -> PeerCertificates {
        PeerCertificates(Arc::new(PeerChain {
            chain,
            user: std::sync::OnceLock::new(),
        }))
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[rustls::pki_types::CertificateDer<'static>] {
        &self.0.chain
    }

    /// The value `parse` computes from the chain, computed once per
    /// connection and cached.
    pub fn user_with(
        &self,
        parse: impl FnOnce(
            &[rustls::pki_types::CertificateDer<'static>],
        ) -> Option<crate::auth::UserInfo>,
    ) -> Option<&crate::auth::UserInfo> {
        self.0.user.get_or_init(|| parse(&self.0.chain)).as_ref()
    }
}

/// Serve `app` over TLS on `listener` until `shutdown` resolves, then stop
/// accepting, let in-flight connections finish for up to 5 s and drop the
/// rest. HTTP/1.1 (with upgrades) and HTTP/2. Handshake and connection
/// errors are logged at debug level and never end the loop.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(
                        stream,
                        remote,
                        acceptor.clone(),
                        app.clone(),
                        closing_rx.clone(),
                    ));
                }
                Err(err) => {
                    tracing::warn!(error = %err, "failed to accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
            // Reap finished connections so the set does not grow forever.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    drop(listener);
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            open = connections.len(),
            "closing connections still open after the shutdown grace"
        );
        connections.shutdown().await;
    }
    Ok(())
}

/// Handshake, then serve one connection until it ends or `closing` flips.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    app: axum::Router,
    mut closing: watch::Receiver<bool>,
) {
    let handshake = tokio::select! {
        result = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => result,
        _ = closing.wait_for(|closing| *closing) => return,
    };
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            tracing::debug!(%remote, error = %err, "tls handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "tls handshake timed out");
            return;
        }
    };
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .filter(|chain| !chain.is_empty())
        .map(|chain| PeerCertificates::new(chain.to_vec()));

    let service = app.map_request(move |mut request: http::Request<Incoming>| {
        if let Some(peer) = &peer {
            request.extensions_mut().insert(peer.clone());
        }
        request.extensions_mut().insert(ConnectInfo(remote));
        request
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(service));
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(%remote, error = %err, "connection ended with an error");
            }
            return;
        }
        _ = closing.wait_for(|closing| *closing) => {}
    }
    // Shutting down: finish in-flight requests, accept no new ones.
    connection.as_mut().graceful_shutdown();
    if let Err(err) = connection.await {
        tracing::debug!(%remote, error = %err, "connection ended with an error during shutdown");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AllowAuthenticated, AuthState, Authenticator, UserInfo};
    use crate::pki::Pki;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use http_body_util::BodyExt;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::net::TcpStream;

    struct Server {
        addr: SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
        pki: Pki,
        _dir: tempfile::TempDir,
    }

    async fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::load_or_create(dir.path(), &[]).expect("pki");
        let mut authenticator = Authenticator::new(None).expect("authenticator");
        authenticator.add_token("test-token", UserInfo::new("token-user", &[]));
        let state = Arc::new(AuthState {
            authenticator,
            authorizer: Box::new(AllowAuthenticated),
        });
        let whoami = |axum::Extension(user): axum::Extension<UserInfo>| async move { user.name };
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/api/v1/namespaces/{ns}/pods", get(whoami))
            .route(
                "/stream",
                get(|| async {
                    Body::from_stream(futures::stream::pending::<
                        Result<bytes::Bytes, std::io::Error>,
                    >())
                }),
            )
            .layer(axum::middleware::from_fn_with_state(
                state,
                crate::auth::middleware,
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let tls = pki.server_config().expect("server config");
        let task = tokio::spawn(serve_tls(listener, tls, app, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
            pki,
            _dir: dir,
        }
    }

    fn client_config(
        pki: &Pki,
        cert: Option<(&str, &str)>,
        alpn: &[u8],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).expect("ca pem"))
            .expect("ca is a valid root");
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
        let mut config = match cert {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert pem")],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key pem"),
                )
                .expect("client auth"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    }

    async fn connect(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.expect("tcp connect");
        tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").expect("server name"), tcp)
            .await
            .expect("tls handshake")
    }

    /// GET `path` over HTTP/1.1 (or HTTP/2 when `h2`): (status, body).
    async fn request(
        server: &Server,
        cert: Option<(&str, &str)>,
        token: Option<&str>,
        path: &str,
        h2: bool,
    ) -> (u16, String) {
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        let tls = connect(server.addr, client_config(&server.pki, cert, alpn)).await;
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(alpn),
            "ALPN negotiated"
        );
        let io = TokioIo::new(tls);
        let mut builder = http::Request::get(format!("https://localhost{path}"));
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let request = builder
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let response = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
            tokio::spawn(conn);
            sender.send_request(request).await.expect("h2 response")
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("http/1.1 handshake");
            tokio::spawn(conn);
            sender
                .send_request(request)
                .await
                .expect("http/1.1 response")
        };
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn authenticates_over_tls_by_certificate_token_or_not_at_all() {
        let server = start().await;
        let pods = "/api/v1/namespaces/default/pods";
        let (admin_cert, admin_key) = server.pki.admin_cert();
        let admin = Some((admin_cert, admin_key));

        assert_eq!(
            request(&server, admin, None, pods, false).await,
            (200, "skiff-admin".to_string())
        );
        assert_eq!(
            request(&server, admin, None, pods, true).await,
            (200, "skiff-admin".to_string())
        );

        let (status, body) = request(&server, None, None, pods, false).await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("\"reason\":\"Unauthorized\""), "{body}");
        assert_eq!(
            request(&server, None, None, "/healthz", false).await,
            (200, "ok".to_string())
        );

        assert_eq!(
            request(&server, None, Some("test-token"), pods, true).await,
            (200, "token-user".to_string())
        );
        assert_eq!(
            request(&server, None, Some("wrong"), pods, false).await.0,
            401
        );

        let (cert, key) = server
            .pki
            .issue_client_cert("jane", &["devs"])
            .expect("issue");
        assert_eq!(
            request(&server, Some((&cert, &key)), None, pods, false).await,
            (200, "jane".to_string())
        );

        // A certificate from another CA fails the handshake; the server lives on.
        let other_dir = tempfile::tempdir().expect("tempdir");
        let other = Pki::load_or_create(other_dir.path(), &[]).expect("other pki");
        let mut config =
            (*client_config(&server.pki, Some(other.admin_cert()), b"http/1.1")).clone();
        config.alpn_protocols.clear();
        let tcp = TcpStream::connect(server.addr).await.expect("tcp connect");
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("the client side of a TLS 1.3 handshake completes");
        // With TLS 1.3 the server rejects the client certificate after the
        // client finished; the rejection shows on the first read.
        let mut buf = [0u8; 16];
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = tls
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        let read = tls.read(&mut buf).await;
        assert!(
            read.is_err() || read.is_ok_and(|n| n == 0),
            "a foreign client certificate is refused"
        );
        assert_eq!(request(&server, None, None, "/healthz", false).await.0, 200);
    }

    #[tokio::test]
    async fn a_stalled_handshake_does_not_block_accept() {
        let server = start().await;
        let _idle = TcpStream::connect(server.addr)
            .await
            .expect("idle connection");
        let result = tokio::time::timeout(
            Duration::from_secs(5),
            request(&server, None, None, "/healthz", false),
        )
        .await
        .expect("served despite an idle connection");
        assert_eq!(result.0, 200);
    }

    #[tokio::test]
    async fn shutdown_is_bounded_with_an_open_stream() {
        let mut server = start().await;
        let (cert, key) = server.pki.admin_cert();
        let tls = connect(
            server.addr,
            client_config(&server.pki, Some((cert, key)), b"http/1.1"),
        )
        .await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let response = sender
            .send_request(
                http::Request::get("https://localhost/stream")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .expect("request"),
            )
            .await
            .expect("stream response");
        assert_eq!(response.status(), 200);

        let started = std::time::Instant::now();
        server
            .stop
            .take()
            .expect("stop sender")
            .send(())
            .expect("server is running");
        tokio::time::timeout(Duration::from_secs(15), &mut server.task)
            .await
            .expect("serve_tls returns despite the open stream")
            .expect("task joins")
            .expect("serve_tls succeeds");
        assert!(
            started.elapsed() >= SHUTDOWN_GRACE - Duration::from_millis(500),
            "the stream got its grace"
        );
        assert!(
            TcpStream::connect(server.addr).await.is_err(),
            "the listener is closed"
        );
    }

    #[tokio::test]
    async fn shutdown_is_prompt_when_idle() {
        let mut server = start().await;
        assert_eq!(request(&server, None, None, "/healthz", false).await.0, 200);
        let started = std::time::Instant::now();
        server
            .stop
            .take()
            .expect("stop sender")
            .send(())
            .expect("server is running");
        (&mut server.task)
            .await
            .expect("task joins")
            .expect("serve_tls succeeds");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "idle shutdown took {:?}",
            started.elapsed()
        );
    }
}
