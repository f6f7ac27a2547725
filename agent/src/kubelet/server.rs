//! The agent's HTTPS API: the part of the kubelet API the API server
//! proxies `kubectl logs`, `exec` and `port-forward` to, plus `/metrics` and
//! `/healthz`.
//!
//! - TLS with a serving certificate of the node's own, self-signed (SANs:
//!   node name and node IP), kept under `<root-dir>/pki/` and reused while it
//!   is valid and names the node; the API server does not verify it, as
//!   upstream without `--kubelet-certificate-authority`.
//! - Client certificates are required and verified against the cluster CA
//!   (the kubeconfig's `certificate-authority-data` or `-file`, or
//!   `--client-ca-file`); only the API server (`kube-apiserver-kubelet-client`)
//!   and group `system:masters` may call anything but `/healthz` (403).
//! - `GET /containerLogs/{ns}/{pod}/{container}` ([`super::logs`]),
//!   `GET|POST /exec/{ns}/{pod}/{container}` as a WebSocket or SPDY/3.1
//!   upgrade ([`super::exec`]), `GET|POST /portForward/{ns}/{pod}` as a SPDY/3.1
//!   upgrade, SPDY tunnelled in a WebSocket, or the WebSocket channel
//!   protocol ([`super::portforward`]), `GET /metrics` (the
//!   datapath's per-pod counters and the agent's gauges, Prometheus text),
//!   `GET /healthz`.
//! - Errors are metav1 `Status` objects (JSON) with the kubelet's messages,
//!   so that kubectl shows them through the API server's proxy.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path as UrlPath, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::Kubelet;
use super::exec::{ExecOptions, ExecTarget, PROTOCOL_V5, PROTOCOLS, SPDY_PROTOCOL};
use super::logs::{LogOptions, LogSource, log_files};
use super::portforward::{
    CHANNEL_PROTOCOL as PORT_FORWARD_CHANNELS, PROTOCOL as PORT_FORWARD_PROTOCOL,
    Target as PortForwardTarget, WEBSOCKET_PROTOCOL as PORT_FORWARD_WEBSOCKET,
};
use super::runtime::{LABEL_CONTAINER, LABEL_POD_UID, LABEL_RESTART};

/// The kubelet port, as upstream.
pub const DEFAULT_KUBELET_PORT: u16 = 10250;
/// The user the API server is to the agents.
pub const KUBELET_CLIENT_USER: &str = "kube-apiserver-kubelet-client";
/// The group allowed everything.
pub const MASTERS_GROUP: &str = "system:masters";

/// How long the serving certificate is valid.
const CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A certificate expiring sooner than this is replaced at start.
const CERT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a client may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors setting the API up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The kubeconfig could not be read.
    #[error("cannot read the cluster CA from kubeconfig {path}")]
    Kubeconfig {
        /// The kubeconfig.
        path: PathBuf,
        /// The cause.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No kubeconfig was given and none could be inferred.
    #[error("cannot find the cluster CA: no kubeconfig")]
    Infer {
        /// The cause.
        #[source]
        source: kube::config::InferConfigError,
    },
    /// The kubeconfig names no CA.
    #[error(
        "the kubeconfig has no certificate-authority(-data) to verify the API server's client certificate with; give --client-ca-file"
    )]
    NoClientCa,
    /// The CA file could not be read or holds no certificate.
    #[error("cannot use the client CA file {path}: {message}")]
    ClientCaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file of the serving certificate could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The serving certificate could not be made.
    #[error("cannot generate the serving certificate")]
    Generate {
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused the configuration.
    #[error("invalid tls configuration: {message}")]
    Tls {
        /// What rustls said.
        message: String,
    },
    /// The port could not be bound.
    #[error("cannot listen on {addr} for the kubelet API")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The cluster CA (DER certificates) client certificates are checked
/// against: `ca_file` (PEM) when given, else the kubeconfig's
/// `certificate-authority-data` or `certificate-authority`.
pub async fn client_ca(
    kubeconfig: Option<&Path>,
    ca_file: Option<&Path>,
) -> Result<Vec<Vec<u8>>, ServerError> {
    if let Some(path) = ca_file {
        use rustls::pki_types::pem::PemObject;
        let bad = |message: String| ServerError::ClientCaFile {
            path: path.to_path_buf(),
            message,
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no certificate in it".into()));
        }
        return Ok(certs);
    }
    let config = match kubeconfig {
        Some(path) => {
            let wrap = |source| ServerError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(wrap)?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(wrap)?
        }
        None => kube::Config::infer()
            .await
            .map_err(|source| ServerError::Infer { source })?,
    };
    config
        .root_cert
        .filter(|c| !c.is_empty())
        .ok_or(ServerError::NoClientCa)
}

/// The node's serving certificate and key (PEM), from `dir` when they are
/// there, valid for a while yet and name `node_name` and `node_ip`; else
/// made anew (self-signed) and written there.
pub fn serving_certificate(
    dir: &Path,
    node_name: &str,
    node_ip: IpAddr,
) -> Result<(String, String), ServerError> {
    let cert_path = dir.join("kubelet.crt");
    let key_path = dir.join("kubelet.key");
    if let (Ok(cert), Ok(key)) = (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) && certificate_fits(&cert, &key, node_name, node_ip, SystemTime::now())
    {
        return Ok((cert, key));
    }
    let (cert, key) = generate_certificate(node_name, node_ip, SystemTime::now())?;
    let write = |path: &Path, text: &str, mode: u32| {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let tmp = path.with_extension("tmp");
        let result = (|| {
            std::fs::create_dir_all(dir)?;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)?;
            std::io::Write::write_all(&mut file, text.as_bytes())?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&tmp, path)
        })();
        result.map_err(|source| ServerError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    write(&key_path, &key, 0o600)?;
    write(&cert_path, &cert, 0o644)?;
    Ok((cert, key))
}

/// A self-signed serving certificate for the node: `(cert, key)` PEM.
pub fn generate_certificate(
    node_name: &str,
    node_ip: IpAddr,
    now: SystemTime,
) -> Result<(String, String), ServerError> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let generate = |source| ServerError::Generate { source };
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::default();
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("{node_name}@{}", since.as_secs()),
    );
    params.subject_alt_names = vec![
        SanType::DnsName(node_name.try_into().map_err(generate)?),
        SanType::IpAddress(node_ip),
    ];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since.saturating_sub(Duration::from_secs(3600));
    params.not_after = epoch + since + CERT_VALIDITY;
    let cert = params.self_signed(&key).map_err(generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Whether `cert` (PEM) belongs to `key`, names the node and stays valid
/// for a while.
fn certificate_fits(
    cert: &str,
    key: &str,
    node_name: &str,
    node_ip: IpAddr,
    now: SystemTime,
) -> bool {
    use rustls::pki_types::pem::PemObject;
    use x509_parser::extensions::GeneralName;
    let Ok(der) = CertificateDer::from_pem_slice(cert.as_bytes()) else {
        return false;
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    let Ok(key) = rcgen::KeyPair::from_pem(key) else {
        return false;
    };
    if key.public_key_raw() != parsed.public_key().subject_public_key.data.as_ref() {
        return false;
    }
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    if parsed.validity().not_after.timestamp() < now + CERT_RENEW_BEFORE.as_secs() as i64 {
        return false;
    }
    let Ok(Some(sans)) = parsed.subject_alternative_name() else {
        return false;
    };
    let mut has_name = false;
    let mut has_ip = false;
    for name in &sans.value.general_names {
        match name {
            GeneralName::DNSName(n) if *n == node_name => has_name = true,
            GeneralName::IPAddress(bytes) => {
                let ip = match bytes.len() {
                    4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                    _ => None,
                };
                has_ip |= ip == Some(node_ip);
            }
            _ => {}
        }
    }
    has_name && has_ip
}

/// The TLS configuration of the API: the node's serving certificate (kept
/// under `<root_dir>/pki/`), client certificates required and verified
/// against `client_ca`, HTTP/1.1.
pub fn tls_config(
    root_dir: &Path,
    node_name: &str,
    node_ip: IpAddr,
    client_ca: &[Vec<u8>],
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    use rustls::pki_types::pem::PemObject;
    let tls = |e: &dyn std::fmt::Display| ServerError::Tls {
        message: e.to_string(),
    };
    let (cert, key) = serving_certificate(&root_dir.join("pki"), node_name, node_ip)?;
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls(&e))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| tls(&e))?;
    let mut roots = rustls::RootCertStore::empty();
    for der in client_ca {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| tls(&e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| tls(&e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls(&e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Who called, from the verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The common name.
    pub user: String,
    /// The organizations.
    pub groups: Vec<String>,
}

impl Caller {
    /// The subject of a DER certificate.
    pub fn from_certificate(der: &[u8]) -> Option<Caller> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject();
        let user = subject
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .unwrap_or_default()
            .to_string();
        let groups = subject
            .iter_organization()
            .filter_map(|a| a.as_str().ok().map(str::to_string))
            .collect();
        Some(Caller { user, groups })
    }

    /// Whether it may use the API: the API server, or `system:masters`.
    pub fn allowed(&self) -> bool {
        self.user == KUBELET_CLIENT_USER || self.groups.iter().any(|g| g == MASTERS_GROUP)
    }
}

/// The API's state.
struct ServerState {
    k: Arc<Kubelet>,
    exec_sessions: AtomicUsize,
    log_streams: AtomicUsize,
    port_forwards: AtomicUsize,
}

/// Counts one in-flight stream while alive.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicUsize) -> InFlight<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An error as the kubelet API returns it: a metav1 `Status`.
fn status(code: StatusCode, message: impl Into<String>) -> Response {
    let reason = match code {
        StatusCode::BAD_REQUEST => "BadRequest",
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::NOT_FOUND => "NotFound",
        _ => "InternalError",
    };
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message.into(), "reason": reason,
        "code": code.as_u16(),
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .route("/exec/{namespace}/{pod}/{container}", get(exec).post(exec))
        .route(
            "/portForward/{namespace}/{pod}",
            get(port_forward).post(port_forward),
        )
        .route_layer(axum::middleware::from_fn(authorize))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|request: Request| async move {
            status(
                StatusCode::NOT_FOUND,
                format!("the agent serves no {}", request.uri().path()),
            )
        })
        .with_state(state)
}

/// 403 unless the caller is the API server or in `system:masters`.
async fn authorize(request: Request, next: Next) -> Response {
    let caller = request
        .extensions()
        .get::<Option<Caller>>()
        .cloned()
        .flatten();
    match caller {
        Some(caller) if caller.allowed() => next.run(request).await,
        caller => {
            let user = caller.map(|c| c.user).unwrap_or_default();
            status(
                StatusCode::FORBIDDEN,
                format!(
                    "Forbidden (user={user}, verb={}, path={}): only {KUBELET_CLIENT_USER} and group {MASTERS_GROUP} may use the agent's API",
                    request.method().as_str().to_lowercase(),
                    request.uri().path()
                ),
            )
        }
    }
}

async fn metrics(State(state): State<Arc<ServerState>>) -> Response {
    use std::fmt::Write as _;
    let k = &state.k;
    let mut out = String::new();
    if let Some(hook) = &k.hook {
        match hook.metrics() {
            Ok(text) => out.push_str(&text),
            Err(error) => {
                tracing::warn!(error = %skiff_common::error::chain(&error), "cannot read the datapath's counters")
            }
        }
    }
    let gauges: [(&str, &str, usize); 5] = [
        (
            "skiff_agent_pods",
            "Pods bound to this node that the agent runs.",
            k.pod_count(),
        ),
        (
            "skiff_agent_node_ready",
            "Whether the node is Ready (1) or not (0).",
            usize::from(k.ready.load(Ordering::Relaxed)),
        ),
        (
            "skiff_agent_exec_sessions",
            "kubectl exec sessions in progress.",
            state.exec_sessions.load(Ordering::Relaxed),
        ),
        (
            "skiff_agent_log_streams",
            "Container log requests in progress.",
            state.log_streams.load(Ordering::Relaxed),
        ),
        (
            "skiff_agent_port_forwards",
            "kubectl port-forward connections in progress.",
            state.port_forwards.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name}{{node=\"{}\"}} {value}", k.node_name);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// The pod and the named container of it, or the kubelet's 404.
fn pod_and_container(
    k: &Kubelet,
    namespace: &str,
    name: &str,
    container: &str,
) -> Result<(String, Pod), (StatusCode, String)> {
    let Some((uid, pod)) = k.find_pod(namespace, name) else {
        return Err((
            StatusCode::NOT_FOUND,
            format!("pod \"{name}\" does not exist"),
        ));
    };
    let spec = pod.spec.as_ref();
    let known = spec
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .any(|c| c.name == container)
        || spec
            .and_then(|s| s.init_containers.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.name == container);
    if !known {
        return Err((
            StatusCode::NOT_FOUND,
            format!("container \"{container}\" not found in pod \"{name}\""),
        ));
    }
    Ok((uid, pod))
}

/// Why a container has no output yet, from the pod's status.
fn waiting_reason(pod: &Pod, container: &str) -> String {
    let status = pod.status.as_ref();
    status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .chain(status.and_then(|s| s.init_container_statuses.as_ref()))
        .flatten()
        .find(|c| c.name == container)
        .and_then(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
        .unwrap_or_else(|| "ContainerCreating".into())
}

async fn container_logs(
    State(state): State<Arc<ServerState>>,
    UrlPath((namespace, name, container)): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let options = match LogOptions::parse(query.as_deref(), Timestamp::now()) {
        Ok(o) => o,
        Err(error) => return status(StatusCode::BAD_REQUEST, error.to_string()),
    };
    let k = &state.k;
    let (uid, pod) = match pod_and_container(k, &namespace, &name, &container) {
        Ok(found) => found,
        Err((code, message)) => return status(code, message),
    };
    let dir = k.pod_dir(&uid).join("logs").join(&container);
    let files = log_files(&dir);
    let chosen = if options.previous {
        if files.len() < 2 {
            return status(
                StatusCode::BAD_REQUEST,
                format!(
                    "previous terminated container \"{container}\" in pod \"{name}\" not found"
                ),
            );
        }
        files[files.len() - 2].clone()
    } else {
        match files.last() {
            Some(f) => f.clone(),
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "container \"{container}\" in pod \"{name}\" is waiting to start: {}",
                        waiting_reason(&pod, &container)
                    ),
                );
            }
        }
    };
    let (restart, path) = chosen;
    let source = LogSource {
        path,
        dir,
        restart,
        container_id: super::pod::container_id(&uid, &container, restart),
    };
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let runtime = k.runtime.clone();
    let state = state.clone();
    tokio::spawn(async move {
        let _in_flight = InFlight::new(&state.log_streams);
        super::logs::stream(runtime, source, options, tx).await;
    });
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    ([(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

/// The running instance of container `name` of pod `uid`: its containerd ID.
async fn running_instance(k: &Kubelet, uid: &str, name: &str) -> Option<String> {
    let found = k.runtime.list(LABEL_POD_UID, uid).await.ok()?;
    let newest = found
        .into_iter()
        .filter(|c| c.labels.get(LABEL_CONTAINER).map(String::as_str) == Some(name))
        .max_by_key(|c| {
            c.labels
                .get(LABEL_RESTART)
                .and_then(|r| r.parse::<i32>().ok())
                .unwrap_or(0)
        })?;
    let task = k.runtime.task(&newest.id).await.ok()??;
    task.running.then_some(newest.id)
}

async fn exec(
    State(state): State<Arc<ServerState>>,
    UrlPath((namespace, name, container)): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    let options = match ExecOptions::parse(query.as_deref()) {
        Ok(o) => o,
        Err(error) => return status(StatusCode::BAD_REQUEST, error.to_string()),
    };
    let k = &state.k;
    let uid = match pod_and_container(k, &namespace, &name, &container) {
        Ok((uid, _)) => uid,
        Err((code, message)) => return status(code, message),
    };
    let Some(container_id) = running_instance(k, &uid, &container).await else {
        return status(
            StatusCode::BAD_REQUEST,
            format!("container \"{container}\" in pod \"{name}\" is not running"),
        );
    };
    let spec = match k.runtime.spec(&container_id).await {
        Ok(spec) => spec,
        Err(error) => {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                skiff_common::error::chain(&error),
            );
        }
    };
    let target = ExecTarget {
        runtime: k.runtime.clone(),
        container_id,
        spec,
        fifo_dir: k.run_dir.join("exec"),
    };
    if wants_spdy(&request) {
        tracing::info!(pod = %format!("{namespace}/{name}"), %container, command = ?options.command, "exec (SPDY)");
        return spdy_upgrade(request, SPDY_PROTOCOL, false, move |io| async move {
            let _in_flight = InFlight::new(&state.exec_sessions);
            super::exec::spdy_session(target, options, io).await;
        });
    }
    let (mut parts, _) = request.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u.protocols(PROTOCOLS),
        Err(rejection) => {
            return status(
                StatusCode::BAD_REQUEST,
                format!(
                    "exec needs an upgrade to SPDY/3.1, or to a WebSocket with subprotocol {}: {rejection}",
                    PROTOCOLS.join(" or ")
                ),
            );
        }
    };
    let Some(protocol) = upgrade.selected_protocol().cloned() else {
        return status(
            StatusCode::BAD_REQUEST,
            format!(
                "none of the requested WebSocket subprotocols is served; use {}",
                PROTOCOLS.join(" or ")
            ),
        );
    };
    let v5 = protocol.as_bytes() == PROTOCOL_V5.as_bytes();
    tracing::info!(pod = %format!("{namespace}/{name}"), %container, command = ?options.command, protocol = ?protocol, "exec");
    let state = state.clone();
    upgrade.on_upgrade(move |socket| async move {
        let _in_flight = InFlight::new(&state.exec_sessions);
        super::exec::session(target, options, socket, v5).await;
    })
}

/// `kubectl port-forward`: the pod's ports over SPDY, on an `Upgrade:
/// SPDY/3.1` connection or tunnelled in a WebSocket ([`super::portforward`]).
async fn port_forward(
    State(state): State<Arc<ServerState>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    request: Request,
) -> Response {
    let k = &state.k;
    let Some((uid, pod)) = k.find_pod(&namespace, &name) else {
        return status(
            StatusCode::NOT_FOUND,
            format!("pod \"{name}\" does not exist"),
        );
    };
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    let netns = if host_network {
        None
    } else {
        let path = super::netns::netns_path(&k.run_dir, &uid);
        if !super::netns::is_mounted(&path) {
            return status(
                StatusCode::BAD_REQUEST,
                format!("pod \"{name}\" has no network namespace yet"),
            );
        }
        Some(path)
    };
    let target = PortForwardTarget {
        pod: format!("{namespace}/{name}"),
        uid,
        netns,
    };
    if wants_spdy(&request) {
        tracing::info!(pod = %target.pod, "port-forward (SPDY)");
        return spdy_upgrade(request, PORT_FORWARD_PROTOCOL, true, move |io| async move {
            let _in_flight = InFlight::new(&state.port_forwards);
            super::portforward::serve_spdy(io, target).await;
        });
    }
    let (mut parts, _) = request.into_parts();
    let offered = parts.headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL);
    let socket = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u.protocols([PORT_FORWARD_WEBSOCKET, PORT_FORWARD_CHANNELS]),
        Err(rejection) => {
            return status(
                StatusCode::BAD_REQUEST,
                format!(
                    "port-forward needs an upgrade to {} or a WebSocket with subprotocol {PORT_FORWARD_WEBSOCKET}: {rejection}",
                    super::spdy::UPGRADE
                ),
            );
        }
    };
    let tunnel = match socket.selected_protocol().map(|p| p.as_bytes()) {
        Some(p) if p == PORT_FORWARD_WEBSOCKET.as_bytes() => true,
        Some(_) => false,
        None if !offered => false,
        None => {
            return status(
                StatusCode::BAD_REQUEST,
                format!(
                    "none of the requested WebSocket subprotocols is served; use {PORT_FORWARD_WEBSOCKET} or {PORT_FORWARD_CHANNELS}"
                ),
            );
        }
    };
    if tunnel {
        tracing::info!(pod = %target.pod, "port-forward (SPDY over WebSocket)");
        return socket.on_upgrade(move |socket| async move {
            let _in_flight = InFlight::new(&state.port_forwards);
            super::portforward::serve_websocket(socket, target).await;
        });
    }
    let ports = match super::portforward::query_ports(parts.uri.query()) {
        Ok(ports) => ports,
        Err(error) => return status(StatusCode::BAD_REQUEST, error.to_string()),
    };
    tracing::info!(pod = %target.pod, ?ports, "port-forward (WebSocket channels)");
    socket.on_upgrade(move |socket| async move {
        let _in_flight = InFlight::new(&state.port_forwards);
        super::portforward::serve_channels(socket, target, ports).await;
    })
}

/// Answer an `Upgrade: SPDY/3.1` request with upstream's handshake and hand
/// the upgraded connection to `serve`. The client's
/// `X-Stream-Protocol-Version`s must include `protocol`; a client that
/// names none is let through only when `unnamed_ok` (port-forward clients
/// older than the header).
fn spdy_upgrade<F, Fut>(
    mut request: Request,
    protocol: &'static str,
    unnamed_ok: bool,
    serve: F,
) -> Response
where
    F: FnOnce(TokioIo<hyper::upgrade::Upgraded>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let offered: Vec<String> = request
        .headers()
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    let named = offered.iter().any(|p| p == protocol);
    let allowed = named || (offered.is_empty() && unnamed_ok);
    if !allowed {
        return status(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server supports [\"{protocol}\"]"
            ),
        );
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => serve(TokioIo::new(upgraded)).await,
            Err(error) => {
                tracing::debug!(error = %skiff_common::error::chain(&error), "SPDY upgrade failed")
            }
        }
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::UPGRADE,
        HeaderValue::from_static(super::spdy::UPGRADE),
    );
    if named {
        headers.insert(
            "x-stream-protocol-version",
            HeaderValue::from_static(protocol),
        );
    }
    response
}

/// Whether `request` asks to upgrade to SPDY/3.1.
fn wants_spdy(request: &Request) -> bool {
    request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(super::spdy::UPGRADE))
}

/// Serve the API on `listener` until `shutdown`.
pub(super) async fn serve(
    k: Arc<Kubelet>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) {
    let state = Arc::new(ServerState {
        k,
        exec_sessions: AtomicUsize::new(0),
        log_streams: AtomicUsize::new(0),
        port_forwards: AtomicUsize::new(0),
    });
    let app = router(state);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(stream, remote, acceptor.clone(), app.clone(), shutdown.clone()));
                }
                Err(error) => {
                    tracing::warn!(error = %skiff_common::error::chain(&error), "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    shutdown: CancellationToken,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%remote, error = %skiff_common::error::chain(&error), "tls handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "tls handshake timed out");
            return;
        }
    };
    let caller = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| Caller::from_certificate(leaf));
    let service = app.map_request(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(caller.clone());
        request
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(service));
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%remote, error = %skiff_common::error::chain(&*error), "connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_api_server_and_masters_are_allowed() {
        let caller = |user: &str, groups: &[&str]| Caller {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        };
        assert!(caller(KUBELET_CLIENT_USER, &[]).allowed());
        assert!(caller("skiff-admin", &["system:masters"]).allowed());
        assert!(!caller("system:kube-scheduler", &[]).allowed());
        assert!(!caller("someone", &["system:authenticated"]).allowed());
    }

    #[test]
    fn serving_certificates_are_kept_while_they_fit_the_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ip: IpAddr = "10.99.0.11".parse().expect("ip");
        let (cert, key) = serving_certificate(dir.path(), "node-1", ip).expect("generated");
        assert!(certificate_fits(
            &cert,
            &key,
            "node-1",
            ip,
            SystemTime::now()
        ));
        let again = serving_certificate(dir.path(), "node-1", ip).expect("reused");
        assert_eq!(again.0, cert, "reused while it fits");
        assert!(!certificate_fits(
            &cert,
            &key,
            "node-2",
            ip,
            SystemTime::now()
        ));
        let other_ip: IpAddr = "10.99.0.12".parse().expect("ip");
        assert!(!certificate_fits(
            &cert,
            &key,
            "node-1",
            other_ip,
            SystemTime::now()
        ));
        let later = SystemTime::now() + CERT_VALIDITY;
        assert!(!certificate_fits(&cert, &key, "node-1", ip, later));
        let moved = serving_certificate(dir.path(), "node-1", other_ip).expect("regenerated");
        assert_ne!(moved.0, cert, "a new address needs a new certificate");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("kubelet.key"))
                .expect("key")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn callers_come_from_the_certificate_subject() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:masters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "skiff-admin");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            Caller::from_certificate(cert.der()),
            Some(Caller {
                user: "skiff-admin".into(),
                groups: vec!["system:masters".into()],
            })
        );
    }

    #[test]
    fn tls_configuration_builds_with_a_cluster_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).expect("ca");
        let config = tls_config(
            dir.path(),
            "node-1",
            "127.0.0.1".parse().expect("ip"),
            &[ca.der().to_vec()],
        )
        .expect("tls");
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
        assert!(dir.path().join("pki/kubelet.crt").exists());
    }
}
