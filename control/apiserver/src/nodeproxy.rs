//! The API server's way to the node agents: `pods/log`, `pods/exec`,
//! `pods/attach` and `pods/portforward`, proxied to the agent (the kubelet
//! role) that runs the pod, as upstream's API server does.
//!
//! The pod's `spec.nodeName` names the node; the node's InternalIP (else its
//! first address) and `status.daemonEndpoints.kubeletEndpoint.Port` (default
//! 10250) say where its agent serves HTTPS. The API server presents a client
//! certificate signed by the cluster CA (user `kube-apiserver-kubelet-client`,
//! group `system:masters`), which is how the agent knows the caller. Like
//! upstream without `--kubelet-certificate-authority`, the agent's serving
//! certificate (self-signed per node) is not verified.
//!
//! `log` is a plain streamed GET (`follow=true` keeps it open). `exec`,
//! `attach` and `portforward` are upgrades (WebSocket `v5.channel.k8s.io`
//! for kubectl 1.30+): the request goes to the agent with its upgrade headers,
//! and once the agent answers `101 Switching Protocols` the two upgraded
//! connections are spliced byte for byte, so the API server does not need to
//! understand the stream protocol.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde_json::Value;

use crate::api::AppState;
use crate::meta;
use crate::status::ApiError;
use skiff_common::registry;

/// The kubelet port when a node does not publish one.
pub const DEFAULT_KUBELET_PORT: u16 = 10250;

/// The user the API server is to the agents.
pub const KUBELET_CLIENT_USER: &str = "kube-apiserver-kubelet-client";

/// How long connecting to an agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Query parameters of `pods/log` passed on to the agent.
const LOG_PARAMS: &[&str] = &[
    "follow",
    "previous",
    "tailLines",
    "timestamps",
    "sinceSeconds",
    "sinceTime",
    "limitBytes",
];

/// Errors setting up the proxy.
#[derive(Debug, thiserror::Error)]
pub enum NodeProxyError {
    /// The client certificate could not be issued.
    #[error("cannot issue the kubelet client certificate")]
    Certificate {
        /// The cause.
        #[source]
        source: crate::pki::PkiError,
    },
    /// The issued certificate or key could not be read back.
    #[error("cannot read the kubelet client certificate: {message}")]
    Pem {
        /// What failed.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("cannot build the kubelet client tls configuration")]
    Tls {
        /// The cause.
        #[source]
        source: rustls::Error,
    },
}

/// How the API server reaches agents: the TLS client configuration.
#[derive(Clone)]
pub struct NodeProxy {
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for NodeProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProxy").finish_non_exhaustive()
    }
}

impl NodeProxy {
    /// A proxy presenting a fresh client certificate signed by `pki`'s CA.
    pub fn new(pki: &crate::pki::Pki) -> Result<NodeProxy, NodeProxyError> {
        use rustls::pki_types::pem::PemObject;
        let (cert, key) = pki
            .issue_client_cert(KUBELET_CLIENT_USER, &["system:masters"])
            .map_err(|source| NodeProxyError::Certificate { source })?;
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| NodeProxyError::Pem {
                message: e.to_string(),
            })?;
        let key =
            PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| NodeProxyError::Pem {
                message: e.to_string(),
            })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| NodeProxyError::Tls { source })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCertificate { provider }))
            .with_client_auth_cert(chain, key)
            .map_err(|source| NodeProxyError::Tls { source })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(NodeProxy {
            tls: Arc::new(config),
        })
    }

    /// Opens an HTTP/1.1 connection to the agent at `addr`.
    async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<
        (
            hyper::client::conn::http1::SendRequest<Body>,
            hyper::client::conn::http1::Connection<
                TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
                Body,
            >,
        ),
        ApiError,
    > {
        let unreachable = |e: &dyn std::fmt::Display| {
            ApiError::internal(format!(
                "error dialing backend: cannot reach the node agent at {addr}: {e}"
            ))
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| unreachable(&"connection timed out"))?
            .map_err(|e| unreachable(&e))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(&e))?;
        hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(&e))
    }
}

/// Accepts whatever certificate an agent serves (upstream's default when no
/// kubelet CA is configured); signatures are still checked.
#[derive(Debug)]
struct AnyServerCertificate {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The pod subresources served through the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeSubresource {
    Log,
    Exec,
    Attach,
    PortForward,
}

impl NodeSubresource {
    fn parse(name: &str) -> Option<NodeSubresource> {
        Some(match name {
            "log" => NodeSubresource::Log,
            "exec" => NodeSubresource::Exec,
            "attach" => NodeSubresource::Attach,
            "portforward" => NodeSubresource::PortForward,
            _ => return None,
        })
    }
}

/// `GET|POST /api/v1/namespaces/{namespace}/pods/{name}/{log,exec,attach,portforward}`.
pub async fn pod_subresource(
    State(state): State<Arc<AppState>>,
    Path((namespace, name, subresource)): Path<(String, String, String)>,
    request: Request,
) -> Response {
    let Some(subresource) = NodeSubresource::parse(&subresource) else {
        // Every other pod subresource (status, binding, eviction…) is the
        // API server's own.
        let (parts, body) = request.into_parts();
        return crate::api::resource(State(state), parts.method, parts.uri, parts.headers, body)
            .await;
    };
    match proxy(&state, &namespace, &name, subresource, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn proxy(
    state: &AppState,
    namespace: &str,
    name: &str,
    subresource: NodeSubresource,
    mut request: Request,
) -> Result<Response, ApiError> {
    let allowed = match subresource {
        NodeSubresource::Log => request.method() == Method::GET,
        _ => request.method() == Method::GET || request.method() == Method::POST,
    };
    if !allowed {
        return Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({} {})",
            request.method(),
            request.uri().path()
        )));
    }
    let pod = read(state, "pods", Some(namespace), name)
        .await?
        .ok_or_else(|| ApiError::not_found("", "pods", name))?;
    let query = query_pairs(request.uri());
    let container = container_of(&pod, &query, subresource)?;
    let node_name = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(format!("pod {name} does not have a host assigned"))
        })?;
    let node = read(state, "nodes", None, node_name)
        .await?
        .ok_or_else(|| ApiError::not_found("", "nodes", node_name))?;
    let addr = agent_address(&node).ok_or_else(|| {
        ApiError::bad_request(format!(
            "node {node_name} publishes no address for its agent"
        ))
    })?;
    let path = agent_path(subresource, namespace, name, container.as_deref(), &query);
    let uri: Uri = path
        .parse()
        .map_err(|e| ApiError::bad_request(format!("invalid proxied path {path:?}: {e}")))?;

    let (mut sender, connection) = state.node_proxy.connect(addr).await?;
    let upgrade = subresource != NodeSubresource::Log && is_upgrade(&request);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let connection = tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(error = %skiff_common::error::chain(&error), "agent connection ended with an error");
        }
    });

    let mut outgoing = hyper::Request::builder()
        .method(request.method().clone())
        .uri(uri);
    for (key, value) in request.headers() {
        if forwarded(key, upgrade) {
            outgoing = outgoing.header(key, value);
        }
    }
    let outgoing = outgoing
        .header(header::HOST, addr.to_string())
        .body(if request.method() == Method::POST && !upgrade {
            request.into_body()
        } else {
            Body::empty()
        })
        .map_err(|e| ApiError::internal(format!("cannot build the agent request: {e}")))?;
    let mut response = sender.send_request(outgoing).await.map_err(|e| {
        ApiError::internal(format!("error talking to the node agent at {addr}: {e}"))
    })?;

    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let agent_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let (client, agent) = match tokio::try_join!(client_upgrade, agent_upgrade) {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::debug!(error = %skiff_common::error::chain(&error), "upgrade through the node proxy failed");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut agent = TokioIo::new(agent);
            if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut agent).await {
                tracing::debug!(error = %skiff_common::error::chain(&error), "node proxy stream ended with an error");
            }
            drop(connection);
        });
        let (parts, _) = response.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let (mut parts, body) = response.into_parts();
    if subresource == NodeSubresource::Log && parts.status.is_success() {
        parts
            .headers
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

async fn read(
    state: &AppState,
    plural: &str,
    namespace: Option<&str>,
    name: &str,
) -> Result<Option<Value>, ApiError> {
    let info = registry::find("", "v1", plural).expect("pods and nodes are served");
    match state.store.get(&meta::key(info, namespace, name)).await {
        Ok(stored) => Ok(stored.map(|s| s.value)),
        Err(error) => Err(ApiError::unavailable(format!(
            "cannot read {plural} {name}: {error}"
        ))),
    }
}

fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// The container a request is for: the `container` parameter, else the
/// `kubectl.kubernetes.io/default-container` annotation, else the only
/// container; upstream's error when the choice is ambiguous or wrong.
/// Port forwarding names no container.
fn container_of(
    pod: &Value,
    query: &[(String, String)],
    subresource: NodeSubresource,
) -> Result<Option<String>, ApiError> {
    if subresource == NodeSubresource::PortForward {
        return Ok(None);
    }
    let pod_name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let names = |path: &str| -> Vec<String> {
        pod.pointer(path)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    };
    let containers = names("/spec/containers");
    let init = names("/spec/initContainers");
    let ephemeral = names("/spec/ephemeralContainers");
    let requested = query
        .iter()
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty());
    if let Some(container) = requested {
        if containers.contains(&container)
            || init.contains(&container)
            || ephemeral.contains(&container)
        {
            return Ok(Some(container));
        }
        return Err(ApiError::bad_request(format!(
            "container {container} is not valid for pod {pod_name}"
        )));
    }
    let default = pod
        .pointer("/metadata/annotations/kubectl.kubernetes.io~1default-container")
        .and_then(Value::as_str)
        .filter(|c| containers.iter().any(|n| n == c));
    if let Some(default) = default {
        return Ok(Some(default.to_string()));
    }
    match containers.as_slice() {
        [only] => Ok(Some(only.clone())),
        _ => {
            let mut message = format!(
                "a container name must be specified for pod {pod_name}, choose one of: [{}]",
                containers.join(" ")
            );
            if !init.is_empty() {
                message.push_str(&format!(
                    " or one of the init containers: [{}]",
                    init.join(" ")
                ));
            }
            Err(ApiError::bad_request(message))
        }
    }
}

/// Where the node's agent serves: its InternalIP (else first address) and
/// kubelet port.
fn agent_address(node: &Value) -> Option<SocketAddr> {
    let addresses = node.pointer("/status/addresses")?.as_array()?;
    let pick = |kind: Option<&str>| {
        addresses
            .iter()
            .filter(|a| kind.is_none_or(|k| a["type"] == k))
            .find_map(|a| a["address"].as_str()?.parse::<std::net::IpAddr>().ok())
    };
    let ip = pick(Some("InternalIP")).or_else(|| pick(None))?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .unwrap_or(DEFAULT_KUBELET_PORT);
    Some(SocketAddr::new(ip, port))
}

/// The agent's path for a subresource, upstream kubelet's layout:
/// `/containerLogs/{ns}/{pod}/{container}`, `/exec/{ns}/{pod}/{container}`,
/// `/attach/{ns}/{pod}/{container}`, `/portForward/{ns}/{pod}`.
fn agent_path(
    subresource: NodeSubresource,
    namespace: &str,
    pod: &str,
    container: Option<&str>,
    query: &[(String, String)],
) -> String {
    let container = container.unwrap_or("");
    let (path, keep): (String, &dyn Fn(&str) -> bool) = match subresource {
        NodeSubresource::Log => (
            format!("/containerLogs/{namespace}/{pod}/{container}"),
            &|k: &str| LOG_PARAMS.contains(&k),
        ),
        NodeSubresource::Exec => (
            format!("/exec/{namespace}/{pod}/{container}"),
            &|k: &str| k != "container",
        ),
        NodeSubresource::Attach => (
            format!("/attach/{namespace}/{pod}/{container}"),
            &|k: &str| k != "container",
        ),
        NodeSubresource::PortForward => {
            (format!("/portForward/{namespace}/{pod}"), &|_: &str| true)
        }
    };
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (k, v) in query.iter().filter(|(k, _)| keep(k)) {
        serializer.append_pair(k, v);
    }
    let query = serializer.finish();
    if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    }
}

fn is_upgrade(request: &Request) -> bool {
    request
        .headers()
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
}

/// Request headers passed on to the agent: the upgrade handshake ones, and
/// content negotiation; never the caller's credentials.
fn forwarded(name: &header::HeaderName, upgrade: bool) -> bool {
    let always = [header::ACCEPT, header::CONTENT_TYPE, header::USER_AGENT];
    if always.contains(name) {
        return true;
    }
    upgrade
        && (name == header::CONNECTION
            || name == header::UPGRADE
            || name.as_str().starts_with("sec-websocket-")
            || name.as_str().starts_with("x-stream-protocol-"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_only_container_is_the_default() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}});
        assert_eq!(
            container_of(&pod, &[], NodeSubresource::Log)
                .expect("ok")
                .as_deref(),
            Some("a")
        );
    }

    #[test]
    fn several_containers_need_a_choice_or_the_annotation() {
        let mut pod = json!({"metadata": {"name": "p"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "initContainers": [{"name": "i"}]}});
        let error = container_of(&pod, &[], NodeSubresource::Exec).expect_err("ambiguous");
        let text = error.to_status().to_string();
        assert!(
            text.contains("a container name must be specified for pod p, choose one of: [a b] or one of the init containers: [i]"),
            "{text}"
        );
        assert_eq!(
            container_of(&pod, &q(&[("container", "b")]), NodeSubresource::Exec)
                .expect("ok")
                .as_deref(),
            Some("b")
        );
        assert_eq!(
            container_of(&pod, &q(&[("container", "i")]), NodeSubresource::Log)
                .expect("ok")
                .as_deref(),
            Some("i")
        );
        assert!(container_of(&pod, &q(&[("container", "zz")]), NodeSubresource::Log).is_err());
        pod["metadata"]["annotations"] = json!({"kubectl.kubernetes.io/default-container": "b"});
        assert_eq!(
            container_of(&pod, &[], NodeSubresource::Log)
                .expect("ok")
                .as_deref(),
            Some("b")
        );
        assert_eq!(
            container_of(&pod, &[], NodeSubresource::PortForward).expect("ok"),
            None
        );
    }

    #[test]
    fn agent_address_prefers_internal_ip_and_the_published_port() {
        let node = json!({"status": {
            "addresses": [{"type": "Hostname", "address": "n1"}, {"type": "ExternalIP", "address": "192.0.2.9"},
                          {"type": "InternalIP", "address": "10.99.0.11"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10251}}}});
        assert_eq!(
            agent_address(&node),
            Some("10.99.0.11:10251".parse().expect("addr"))
        );
        let node =
            json!({"status": {"addresses": [{"type": "ExternalIP", "address": "192.0.2.9"}]}});
        assert_eq!(
            agent_address(&node),
            Some("192.0.2.9:10250".parse().expect("addr"))
        );
        assert_eq!(agent_address(&json!({"status": {}})), None);
    }

    #[test]
    fn agent_paths_follow_the_kubelet_layout() {
        let query = q(&[
            ("follow", "true"),
            ("container", "c"),
            ("pretty", "1"),
            ("tailLines", "5"),
        ]);
        assert_eq!(
            agent_path(NodeSubresource::Log, "ns", "p", Some("c"), &query),
            "/containerLogs/ns/p/c?follow=true&tailLines=5"
        );
        let query = q(&[
            ("command", "sh"),
            ("command", "-c"),
            ("command", "echo a b"),
            ("container", "c"),
            ("stdout", "true"),
        ]);
        assert_eq!(
            agent_path(NodeSubresource::Exec, "ns", "p", Some("c"), &query),
            "/exec/ns/p/c?command=sh&command=-c&command=echo+a+b&stdout=true"
        );
        assert_eq!(
            agent_path(NodeSubresource::PortForward, "ns", "p", None, &[]),
            "/portForward/ns/p"
        );
    }
}
