//! The REST surface: routes, request parsing and the verbs (get, list,
//! watch, create, update, patch, delete, deletecollection) with their
//! subresources, over the etcd [`Store`].
//!
//! Every write goes through the same steps: decode, server-owned metadata
//! ([`crate::meta`]), defaults and validation ([`crate::admission`]),
//! managedFields ([`crate::apply`]), then one guarded etcd transaction.
//!
//! One module per verb family, each adding its verbs to [`Request`]:
//! [`read`] (get, list), [`watch`], [`create`], [`update`], [`patch`]
//! (patches and server-side apply), [`bind`] (`pods/binding`), [`delete`]
//! (delete, deletecollection). This module routes, parses the request and
//! holds what every verb shares.

mod bind;
mod create;
mod delete;
mod patch;
mod read;
mod token;
mod update;
mod watch;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::admission::{self, ServiceAllocator};
use crate::apply;
use crate::discovery;
use crate::meta;
use crate::metrics::Metrics;
use crate::openapi::OpenApi;
use crate::patch::PatchType;
use crate::rawjson;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{self, ApiError, Cause};
use crate::storage::{ChangeKind, StorageError, Store, Stored, WatchItem};
use crate::table::{self, IncludeObject};
use skiff_common::registry::{self, ResourceInfo, Subresource};

/// The largest request body accepted (upstream's limit for writes).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// How long a write that keeps losing races on resourceVersion is retried
/// when the client gave no precondition (patch, binding, allocation): as
/// upstream's `GuaranteedUpdate`, until it lands or the request times out
/// (upstream's default `--request-timeout`). Each lost race is another
/// writer's win, so contention ends.
const WRITE_RETRY_BUDGET: std::time::Duration = std::time::Duration::from_secs(60);

/// Attempt numbers of a write, 0 first, for as long as
/// [`WRITE_RETRY_BUDGET`] allows.
fn write_attempts() -> impl Iterator<Item = usize> {
    let started = std::time::Instant::now();
    (0..).take_while(move |attempt| *attempt == 0 || started.elapsed() < WRITE_RETRY_BUDGET)
}

/// What every handler shares.
pub struct AppState {
    /// The object store.
    pub store: Store,
    /// The generated OpenAPI v3 documents.
    pub openapi: OpenApi,
    /// ClusterIP and NodePort allocation.
    pub allocator: ServiceAllocator,
    /// Request metrics.
    pub metrics: Arc<Metrics>,
    /// The address clients reach this server at, for `/api`.
    pub server_addr: String,
    /// Cancelled when the server shuts down; open watches end their
    /// streams then, so that graceful shutdown need not wait for them.
    pub shutdown: CancellationToken,
    /// Active namespaces, so creates need not read theirs from etcd.
    pub namespaces: Arc<crate::nscache::NamespaceCache>,
    /// How `pods/log`, `pods/exec`… reach the node agents.
    pub node_proxy: crate::nodeproxy::NodeProxy,
    /// Shared etcd watches, one per resource, that client watches follow.
    pub watches: crate::watchcache::WatchCache,
    /// What signs the tokens of `serviceaccounts/token`, when the server has a signing key.
    pub tokens: Option<skiff_common::serviceaccount::TokenIssuer>,
}

impl AppState {
    /// The state of a server on `store`: its watch and namespace caches
    /// follow etcd until `shutdown`; the OpenAPI documents are generated.
    pub fn new(
        store: Store,
        allocator: ServiceAllocator,
        metrics: Arc<Metrics>,
        server_addr: String,
        shutdown: CancellationToken,
        node_proxy: crate::nodeproxy::NodeProxy,
    ) -> AppState {
        AppState {
            watches: crate::watchcache::WatchCache::new(store.clone(), shutdown.clone()),
            namespaces: crate::nscache::NamespaceCache::spawn(store.clone(), shutdown.clone()),
            store,
            openapi: OpenApi::build(),
            allocator,
            metrics,
            server_addr,
            shutdown,
            node_proxy,
            tokens: None,
        }
    }
}

/// The API server's routes (authentication and metrics are layered on by
/// the caller).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/version",
            get(|| async { axum::Json(discovery::version()) }),
        )
        .route("/healthz", get(health))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(health))
        .route("/metrics", get(metrics))
        .route("/api", get(api_root))
        .route("/apis", get(apis_root))
        .route("/openapi/v3", get(openapi_index))
        .route("/openapi/v3/{*path}", get(openapi_document))
        .route(
            "/api/v1/namespaces/{namespace}/pods/{name}/{subresource}",
            get(crate::nodeproxy::pod_subresource)
                .post(crate::nodeproxy::pod_subresource)
                .fallback(resource),
        )
        .fallback(resource)
        .with_state(state)
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.store.healthy().await {
        "ok".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "[-]etcd failed: etcd is unavailable\nreadyz check failed",
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn api_root(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if discovery::wants_aggregated(accept(&headers)) {
        aggregated(discovery::aggregated(true))
    } else {
        json_response(StatusCode::OK, &discovery::api_versions(&state.server_addr))
    }
}

async fn apis_root(headers: HeaderMap) -> Response {
    if discovery::wants_aggregated(accept(&headers)) {
        aggregated(discovery::aggregated(false))
    } else {
        json_response(StatusCode::OK, &discovery::api_group_list())
    }
}

fn aggregated(body: Value) -> Response {
    let mut response = json_response(StatusCode::OK, &body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(discovery::AGGREGATED_CONTENT_TYPE),
    );
    response
}

async fn openapi_index(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::copy_from_slice(state.openapi.index()),
    )
        .into_response()
}

async fn openapi_document(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(path): axum::extract::Path<String>,
    uri: Uri,
) -> Response {
    let Some((doc, hash)) = state.openapi.document(&path) else {
        return ApiError::no_route(uri.path()).into_response();
    };
    let pinned = query_map(&uri).get("hash").is_some_and(|h| h == hash);
    let cache = if pinned {
        "public, immutable"
    } else {
        "no-cache, private"
    };
    let mut response = (
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::copy_from_slice(doc),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{hash}\"")) {
        headers.insert(header::ETAG, etag);
    }
    response
}

/// What a resource path names.
#[derive(Debug, Clone)]
pub struct Target {
    /// The kind.
    pub info: &'static ResourceInfo,
    /// The namespace from the path.
    pub namespace: Option<String>,
    /// The object name from the path.
    pub name: Option<String>,
    /// The subresource from the path.
    pub subresource: Option<Subresource>,
}

/// Parse a resource path, `None` when it names no served resource.
pub fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let find = |plural: &str| registry::find(group, version, plural);
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] if find(plural).is_some_and(|r| r.namespaced) => {
            (Some(ns.to_string()), {
                let mut v = vec![*plural];
                v.extend_from_slice(tail);
                v
            })
        }
        other => (None, other.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(*sub)),
        _ => return None,
    };
    let info = find(plural)?;
    let subresource = match sub {
        None => None,
        Some(s) => Some(*info.subresources.iter().find(|r| r.name() == s)?),
    };
    Some(Target {
        info,
        namespace,
        name,
        subresource,
    })
}

/// Every resource request: the generic REST verbs on a parsed path.
pub(crate) async fn resource(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = uri.path().to_string();
    // One byte over the limit is enough to know the body is too large.
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES + 1).await {
        Ok(body) if body.len() <= MAX_BODY_BYTES => body,
        _ => {
            return ApiError::too_large(format!(
                "the request body is over the limit of {MAX_BODY_BYTES} bytes"
            ))
            .into_response();
        }
    };
    // Group-version documents answer before resources.
    if let Some(list) = discovery_path(&path) {
        return list;
    }
    let Some(target) = parse_path(&path) else {
        return ApiError::no_route(&path).into_response();
    };
    let query = query_map(&uri);
    let request = Request {
        state: &state,
        target,
        query,
        headers,
        body,
    };
    let result = match (&method, request.target.name.is_some()) {
        (&Method::GET, _) if request.flag("watch") => return request.watch().await,
        (&Method::GET, false) => request.list().await,
        (&Method::GET, true) => request.get().await,
        (&Method::POST, false) => request.create().await,
        (&Method::POST, true) if request.target.subresource == Some(Subresource::Binding) => {
            request.bind().await
        }
        (&Method::POST, true) if request.target.subresource == Some(Subresource::Token) => {
            request.token().await
        }
        (&Method::PUT, true) => request.update().await,
        (&Method::PATCH, true) => request.patch().await,
        (&Method::DELETE, true) => request.delete().await,
        (&Method::DELETE, false) => request.delete_collection().await,
        _ => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({method} {path})"
        ))),
    };
    match result {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

fn discovery_path(path: &str) -> Option<Response> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let body = match parts.as_slice() {
        ["api", version] => discovery::resource_list("", version),
        ["apis", group] => discovery::api_group(group),
        ["apis", group, version] => discovery::resource_list(group, version),
        _ => return None,
    };
    Some(match body {
        Some(body) => json_response(StatusCode::OK, &body),
        None => ApiError::no_route(path).into_response(),
    })
}

/// One resource request in flight.
struct Request<'a> {
    state: &'a AppState,
    target: Target,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
}

/// A write's outcome before it is answered: the object and warnings.
struct Written {
    object: Value,
    warnings: Vec<String>,
}

impl Request<'_> {
    fn info(&self) -> &'static ResourceInfo {
        self.target.info
    }

    fn flag(&self, name: &str) -> bool {
        self.query
            .get(name)
            .is_some_and(|v| v == "true" || v == "1")
    }

    fn name(&self) -> &str {
        self.target.name.as_deref().unwrap_or("")
    }

    fn key(&self) -> String {
        meta::key(self.info(), self.target.namespace.as_deref(), self.name())
    }

    fn not_found(&self) -> ApiError {
        ApiError::not_found(self.info().group, self.info().plural, self.name())
    }

    fn dry_run(&self) -> bool {
        self.query.get("dryRun").is_some_and(|v| v == "All")
    }

    fn manager(&self) -> String {
        if let Some(m) = self.query.get("fieldManager").filter(|m| !m.is_empty()) {
            return m.clone();
        }
        let agent = self
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown");
        agent.split('/').next().unwrap_or(agent).to_string()
    }

    fn storage_error(&self, error: StorageError) -> ApiError {
        let info = self.info();
        match error {
            StorageError::Unavailable { source } => {
                ApiError::unavailable(format!("etcd is unavailable: {source}"))
            }
            StorageError::AlreadyExists { .. } => {
                ApiError::already_exists(info.group, info.plural, self.name())
            }
            StorageError::NotFound { .. } => self.not_found(),
            StorageError::Conflict { .. } => {
                ApiError::conflict(info.group, info.plural, self.name())
            }
            StorageError::ClaimTaken { key } => {
                ApiError::conflict(info.group, info.plural, self.name())
                    .with_message(format!("{key} was allocated concurrently; retry"))
            }
            StorageError::Corrupt { key, source } => {
                ApiError::internal(format!("stored object {key} is corrupt: {source}"))
            }
            StorageError::Compacted {
                requested,
                compacted,
            } => ApiError::expired(format!(
                "too old resource version: {requested} ({compacted})"
            )),
        }
    }

    // ---- reads ----------------------------------------------------------

    async fn read(&self) -> Result<Stored, ApiError> {
        self.state
            .store
            .get(&self.key())
            .await
            .map_err(|e| self.storage_error(e))?
            .ok_or_else(|| self.not_found())
    }

    /// The object a write starts from, and whether it came from the watch
    /// cache. The first attempt of a write takes the cache's latest state
    /// of the object when it has one, sparing etcd a read (upstream's
    /// `cachedExistingObject`). That state may be behind etcd's: the write,
    /// guarded by its revision, then conflicts, and any other failure the
    /// stale state could cause is retried too, from etcd, which every later
    /// attempt reads.
    async fn read_for_write(&self, attempt: usize) -> Result<(Stored, bool), ApiError> {
        if attempt == 0 && !self.dry_run() {
            let root = meta::collection_prefix(self.info(), None);
            if let Some((text, revision)) = self.state.watches.latest(&root, &self.key())
                && let Ok(value) = serde_json::from_slice(&text)
            {
                return Ok((Stored { value, revision }, true));
            }
        }
        Ok((self.read().await?, false))
    }

    /// Render one object, as a Table when asked for one.
    fn render_one(&self, code: StatusCode, object: Value, warnings: Vec<String>) -> Response {
        let mut response = match table::wants_table(accept(&self.headers)) {
            Some(api_version) if self.target.subresource.is_none() => {
                let include =
                    IncludeObject::parse(self.query.get("includeObject").map(String::as_str));
                json_response(
                    code,
                    &one_row_table(self.info(), &object, include, api_version),
                )
            }
            _ => json_response(code, &object),
        };
        add_warnings(&mut response, &warnings);
        response
    }

    // ---- watch ----------------------------------------------------------

    // ---- writes ---------------------------------------------------------

    fn decode(&self) -> Result<Value, ApiError> {
        decode_body(&self.headers, &self.body)
    }

    /// Typed decoding of a request object, as upstream's: a value of the
    /// wrong JSON type fails the request (400), and fields unknown to the
    /// schema are dropped from `obj` in every `fieldValidation` mode —
    /// silently for `Ignore`, with a warning each for `Warn` (the default),
    /// while `Strict` fails the request instead.
    fn field_validation(&self, obj: &mut Value) -> Result<Vec<String>, ApiError> {
        // A Scale body is checked against nothing but its own few fields.
        if self.target.subresource == Some(Subresource::Scale) {
            return Ok(Vec::new());
        }
        let info = self.info();
        let mode = self
            .query
            .get("fieldValidation")
            .map(String::as_str)
            .unwrap_or("Warn");
        // One walk finds both a type error and the unknown fields.
        let unknown = self
            .state
            .openapi
            .decode_check(info, obj, mode != "Strict")
            .map_err(|error| {
                ApiError::bad_request(format!(
                    "{kind} in version \"{version}\" cannot be handled as a {kind}: {error}",
                    kind = info.kind,
                    version = info.version,
                ))
            })?;
        if unknown.is_empty() || mode == "Ignore" {
            return Ok(Vec::new());
        }
        let messages: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field \"{}\"", f.trim_start_matches('.')))
            .collect();
        match mode {
            "Strict" => Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                messages.join(", ")
            ))),
            _ => Ok(messages),
        }
    }

    /// Admission for a new state of an object: defaults, validation and,
    /// for Services, allocation. Returns the side keys to claim and release.
    async fn admit(
        &self,
        object: &mut Value,
        old: Option<&Value>,
    ) -> Result<(Vec<String>, Vec<String>), ApiError> {
        let info = self.info();
        admission::default_object(info, object);
        if info.kind == "Pod" && info.group.is_empty() && old.is_none() {
            self.mount_service_account(object).await?;
        }
        let causes = admission::validate(info, object, old);
        if !causes.is_empty() {
            let name = meta::name(object).unwrap_or("").to_string();
            return Err(ApiError::invalid(info.group, info.kind, &name, causes));
        }
        if info.kind == "Service" && info.group.is_empty() {
            let allocation = self
                .state
                .allocator
                .allocate(&self.state.store, object, old)
                .await?;
            return Ok((allocation.claims, allocation.releases));
        }
        Ok((Vec::new(), Vec::new()))
    }

    // ---- deletes --------------------------------------------------------
}

/// The `autoscaling/v1` Scale view of a Deployment or ReplicaSet.
pub fn scale_of(object: &Value) -> Value {
    let selector = object
        .pointer("/spec/selector")
        .map(|selector| skiff_common::labels::selector_string(Some(selector)).unwrap_or_default())
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": object.pointer("/metadata/name"),
            "namespace": object.pointer("/metadata/namespace"),
            "uid": object.pointer("/metadata/uid"),
            "resourceVersion": object.pointer("/metadata/resourceVersion"),
            "creationTimestamp": object.pointer("/metadata/creationTimestamp"),
        },
        "spec": {"replicas": object.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
        "status": {
            "replicas": object.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector,
        },
    })
}

/// A Table of one object carrying that object's resourceVersion, as a
/// single GET and each watch event answer under `kubectl get`.
fn one_row_table(
    info: &ResourceInfo,
    object: &Value,
    include: IncludeObject,
    api_version: &str,
) -> Value {
    let rv = object
        .pointer("/metadata/resourceVersion")
        .cloned()
        .unwrap_or(Value::Null);
    let mut t = table::table(
        info,
        std::slice::from_ref(object),
        include,
        api_version,
        jiff::Timestamp::now(),
    );
    t["metadata"] = json!({"resourceVersion": rv});
    t
}

/// Decode a JSON or YAML request body.
pub fn decode_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::too_large(format!(
            "the request body is {} bytes, over the limit of {MAX_BODY_BYTES}",
            body.len()
        )));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let value: Value = match essence {
        "application/yaml" | "application/x-yaml" | "text/yaml" => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
        "application/json" | "" | "*/*" => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))?,
        "application/vnd.kubernetes.protobuf" => crate::protobuf::decode(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding protobuf: {e}")))?,
        _ => serde_json::from_slice(body)
            .map_err(|_| ApiError::unsupported_media_type(content_type))?,
    };
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request must be a json object",
        ));
    }
    Ok(value)
}

fn accept(headers: &HeaderMap) -> &str {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn query_map(uri: &Uri) -> HashMap<String, String> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (code, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

fn add_warnings(response: &mut Response, warnings: &[String]) {
    for warning in warnings {
        let text = format!("299 - \"{}\"", warning.replace('"', "\\\""));
        if let Ok(value) = HeaderValue::from_str(&text) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API server's routes on a real etcd, without authentication.
    struct TestServer {
        app: Router,
        state: Arc<AppState>,
        _etcd: crate::testing::Etcd,
        _dir: tempfile::TempDir,
    }

    impl TestServer {
        async fn start() -> TestServer {
            let etcd = crate::testing::Etcd::start();
            let store = crate::testing::store(&etcd).await;
            let dir = tempfile::tempdir().expect("tempdir for the pki");
            let pki = crate::pki::Pki::load_or_create(&dir.path().join("pki"), &[]).expect("pki");
            let state = Arc::new(AppState::new(
                store,
                ServiceAllocator::new("10.96.0.0/12".parse().expect("range"), 30000..=32767),
                Arc::new(crate::metrics::Metrics::new()),
                "127.0.0.1:6443".into(),
                CancellationToken::new(),
                crate::nodeproxy::NodeProxy::new(&pki).expect("node proxy"),
            ));
            TestServer {
                app: router(state.clone()),
                state,
                _etcd: etcd,
                _dir: dir,
            }
        }

        /// Send `method path` with a JSON `body`: the status and the JSON answer.
        async fn call(
            &self,
            method: Method,
            path: &str,
            body: Option<Value>,
        ) -> (StatusCode, Value) {
            let content_type = if method == Method::PATCH {
                "application/merge-patch+json"
            } else {
                "application/json"
            };
            let request = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header(header::CONTENT_TYPE, content_type)
                .body(Body::from(body.map(|b| b.to_string()).unwrap_or_default()))
                .expect("request");
            let response = tower::ServiceExt::oneshot(self.app.clone(), request)
                .await
                .expect("infallible");
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("body");
            let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!("{path}: not json: {}", String::from_utf8_lossy(&bytes))
            });
            (status, value)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_refused_on_stale_cached_state_are_decided_on_etcds() {
        let server = TestServer::start().await;
        let (code, _) = server
            .call(
                Method::POST,
                "/api/v1/namespaces",
                Some(json!({"metadata": {"name": "t"}})),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED);
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
        let (code, created) = server
            .call(Method::POST, "/api/v1/namespaces/t/pods", Some(pod))
            .await;
        assert_eq!(code, StatusCode::CREATED, "{created}");

        // The cache has the pod bound to node-a (a pod of that name that
        // was deleted, say); etcd has it unbound.
        let mut stale = created.clone();
        stale["spec"]["nodeName"] = json!("node-a");
        let revision: i64 = created["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|rv| rv.parse().ok())
            .expect("resourceVersion");
        server.state.watches.install_stale_hub(
            "/registry/core/pods/",
            vec![Arc::new(crate::storage::Change::new(
                crate::storage::ChangeKind::Modified,
                "/registry/core/pods/t/p".into(),
                bytes::Bytes::from(stale.to_string()),
                None,
                revision,
            ))],
        );
        assert!(
            server
                .state
                .watches
                .latest("/registry/core/pods/", "/registry/core/pods/t/p")
                .is_some(),
            "the stale state is what a write starts from"
        );

        let binding = |node: &str| {
            json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"},
                "target": {"kind": "Node", "name": node}})
        };
        let (code, answer) = server
            .call(
                Method::POST,
                "/api/v1/namespaces/t/pods/p/binding",
                Some(binding("node-b")),
            )
            .await;
        assert_eq!(code, StatusCode::CREATED, "bound on etcd's state: {answer}");
        let (_, got) = server
            .call(Method::GET, "/api/v1/namespaces/t/pods/p", None)
            .await;
        assert_eq!(got["spec"]["nodeName"], "node-b");

        // Now bound in etcd too: refused, naming etcd's node, not the cache's.
        let (code, answer) = server
            .call(
                Method::POST,
                "/api/v1/namespaces/t/pods/p/binding",
                Some(binding("node-c")),
            )
            .await;
        assert_eq!(code, StatusCode::CONFLICT, "{answer}");
        assert_eq!(
            answer["message"], "pod p is already assigned to node \"node-b\"",
            "{answer}"
        );

        // A patch guarded by etcd's resourceVersion fails on the cache's
        // older one, and lands on etcd's; one guarded by the older fails.
        let current = got["metadata"]["resourceVersion"].clone();
        let labels =
            |rv: &Value| json!({"metadata": {"resourceVersion": rv, "labels": {"a": "b"}}});
        let (code, answer) = server
            .call(
                Method::PATCH,
                "/api/v1/namespaces/t/pods/p",
                Some(labels(&current)),
            )
            .await;
        assert_eq!(code, StatusCode::OK, "patched on etcd's state: {answer}");
        assert_eq!(answer["metadata"]["labels"]["a"], "b");
        let (code, answer) = server
            .call(
                Method::PATCH,
                "/api/v1/namespaces/t/pods/p",
                Some(labels(&json!(revision.to_string()))),
            )
            .await;
        assert_eq!(code, StatusCode::CONFLICT, "a stale precondition: {answer}");
    }

    #[test]
    fn paths_name_their_targets() {
        let t = parse_path("/api/v1/namespaces/default/pods/web/status").expect("pod status");
        assert_eq!(t.info.plural, "pods");
        assert_eq!(t.namespace.as_deref(), Some("default"));
        assert_eq!(t.name.as_deref(), Some("web"));
        assert_eq!(t.subresource, Some(Subresource::Status));
        let t = parse_path("/api/v1/namespaces/demo").expect("namespace");
        assert_eq!(t.info.plural, "namespaces");
        assert_eq!(t.name.as_deref(), Some("demo"));
        let t = parse_path("/api/v1/namespaces").expect("namespaces");
        assert!(t.name.is_none());
        let t = parse_path("/apis/apps/v1/namespaces/d/deployments/w/scale").expect("scale");
        assert_eq!(t.subresource, Some(Subresource::Scale));
        let t = parse_path("/apis/apps/v1/deployments").expect("all namespaces");
        assert!(t.namespace.is_none() && t.name.is_none());
        assert!(parse_path("/api/v1/namespaces/d/configmaps/c/scale").is_none());
        assert!(parse_path("/apis/nope/v1/things").is_none());
    }

    #[test]
    fn scale_view_carries_the_selector_string() {
        let deploy = json!({
            "metadata": {"name": "w", "namespace": "d", "resourceVersion": "5"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "w"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}},
            "status": {"replicas": 2},
        });
        let scale = scale_of(&deploy);
        assert_eq!(scale["spec"]["replicas"], 3);
        assert_eq!(scale["status"]["replicas"], 2);
        assert_eq!(scale["status"]["selector"], "app=w,tier in (a,b)");
        assert_eq!(scale["metadata"]["resourceVersion"], "5");
    }

    #[test]
    fn bodies_decode_from_json_and_yaml_and_refuse_garbage() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/yaml"),
        );
        let v = decode_body(&headers, b"kind: Pod\nmetadata:\n  name: a\n").expect("yaml");
        assert_eq!(v["metadata"]["name"], "a");
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert_eq!(
            decode_body(&headers, b"{nope").expect_err("bad json").code,
            400
        );
        assert_eq!(
            decode_body(&headers, b"[1]")
                .expect_err("not an object")
                .code,
            400
        );
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert_eq!(decode_body(&headers, &big).expect_err("too big").code, 413);
    }
}
