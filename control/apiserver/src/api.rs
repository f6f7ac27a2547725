//! The REST surface: routes, request parsing and the verbs (get, list,
//! watch, create, update, patch, delete, deletecollection) with their
//! subresources, over the etcd [`Store`].
//!
//! Every write goes through the same steps: decode, server-owned metadata
//! ([`crate::meta`]), defaults and validation ([`crate::admission`]),
//! managedFields ([`crate::apply`]), then one guarded etcd transaction.

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
use crate::patch::{self, PatchType};
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
        }
    }
}

/// One line of a JSON watch stream.
#[derive(serde::Serialize)]
struct WatchEventLine<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    object: &'a Value,
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

    async fn get(&self) -> Result<Response, ApiError> {
        let stored = self.read().await?;
        let object = match self.target.subresource {
            Some(Subresource::Scale) => scale_of(&stored.value),
            _ => stored.value,
        };
        Ok(self.render_one(StatusCode::OK, object, Vec::new()))
    }

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

    fn selectors(&self) -> Result<(LabelSelector, FieldSelector), ApiError> {
        let labels =
            LabelSelector::parse(self.query.get("labelSelector").map_or("", String::as_str))
                .map_err(|e| e.into_api_error())?;
        let fields = FieldSelector::parse(
            self.info(),
            self.query.get("fieldSelector").map_or("", String::as_str),
        )
        .map_err(|e| e.into_api_error())?;
        Ok((labels, fields))
    }

    async fn list(&self) -> Result<Response, ApiError> {
        let (labels, fields) = self.selectors()?;
        let (items, revision) = self.list_matching(&labels, &fields).await?;
        let info = self.info();
        if let Some(api_version) = table::wants_table(accept(&self.headers)) {
            let include = IncludeObject::parse(self.query.get("includeObject").map(String::as_str));
            let mut table =
                table::table(info, &items, include, api_version, jiff::Timestamp::now());
            table["metadata"] = json!({"resourceVersion": revision.to_string()});
            return Ok(json_response(StatusCode::OK, &table));
        }
        let list = json!({
            "kind": info.list_kind(),
            "apiVersion": info.api_version(),
            "metadata": {"resourceVersion": revision.to_string()},
            "items": items,
        });
        Ok(json_response(StatusCode::OK, &list))
    }

    async fn list_matching(
        &self,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Result<(Vec<Value>, i64), ApiError> {
        let prefix = meta::collection_prefix(self.info(), self.target.namespace.as_deref());
        let (stored, revision) = self
            .state
            .store
            .list(&prefix)
            .await
            .map_err(|e| self.storage_error(e))?;
        let items = stored
            .into_iter()
            .map(|s| s.value)
            .filter(|obj| matches(obj, labels, fields))
            .collect();
        Ok((items, revision))
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

    async fn watch(self) -> Response {
        match self.watch_stream().await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        }
    }

    async fn watch_stream(self) -> Result<Response, ApiError> {
        let (labels, fields) = self.selectors()?;
        let info = self.info();
        let bookmarks = self.flag("allowWatchBookmarks");
        let send_initial_param = self.query.get("sendInitialEvents").cloned();
        let send_initial = send_initial_param.as_deref();
        let rv = self
            .query
            .get("resourceVersion")
            .cloned()
            .unwrap_or_default();
        if send_initial.is_some() {
            if !bookmarks && send_initial == Some("true") {
                return Err(ApiError::invalid(
                    "meta.k8s.io",
                    "ListOptions",
                    "",
                    vec![Cause::new(
                        "FieldValueForbidden",
                        "allowWatchBookmarks",
                        "Forbidden: allowWatchBookmarks required when sendInitialEvents is true",
                    )],
                ));
            }
            let matching = self.query.get("resourceVersionMatch").map(String::as_str);
            if matching != Some("NotOlderThan") {
                return Err(ApiError::invalid(
                    "meta.k8s.io",
                    "ListOptions",
                    "",
                    vec![Cause::new(
                        "FieldValueInvalid",
                        "resourceVersionMatch",
                        "Invalid value: \"\": sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                    )],
                ));
            }
        }
        let initial = match send_initial {
            Some("true") => true,
            Some(_) => false,
            None => rv.is_empty() || rv == "0",
        };
        let after: i64 = if rv.is_empty() || rv == "0" {
            0
        } else {
            rv.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?
        };
        let timeout = self
            .query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        let table_version = table::wants_table(accept(&self.headers));
        let include = IncludeObject::parse(self.query.get("includeObject").map(String::as_str));
        let prefix = meta::collection_prefix(info, self.target.namespace.as_deref());

        // The initial state, when asked for, is a list at one revision; the
        // watch then starts right after it.
        let (initial_items, start) = if initial {
            let (items, revision) = self.list_matching(&labels, &fields).await?;
            (items, revision)
        } else {
            (Vec::new(), after)
        };
        let render = move |kind: &str, object: &Value| -> Bytes {
            let table;
            let object = match table_version {
                Some(v) if kind != "BOOKMARK" && kind != "ERROR" => {
                    table = one_row_table(info, object, include, v);
                    &table
                }
                _ => object,
            };
            let mut line = serde_json::to_vec(&WatchEventLine { kind, object }).unwrap_or_default();
            line.push(b'\n');
            Bytes::from(line)
        };
        let bookmark = move |revision: i64, end_of_initial: bool| -> Value {
            let mut meta = json!({"resourceVersion": revision.to_string()});
            if end_of_initial {
                meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            json!({"kind": info.kind, "apiVersion": info.api_version(), "metadata": meta})
        };
        let root = meta::collection_prefix(info, None);
        let upstream = match self.state.watches.watch(&root, &prefix, start).await {
            Ok(stream) => Some(stream),
            Err(StorageError::Compacted {
                requested,
                compacted,
            }) => {
                let _ = compacted;
                return Ok(error_watch(render(
                    "ERROR",
                    &ApiError::expired(format!("too old resource version: {requested}"))
                        .to_status(),
                )));
            }
            Err(e) => return Err(self.storage_error(e)),
        };
        let guard = self.state.metrics.watching(info.plural);
        let shutdown = self.state.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
        tokio::spawn(async move {
            let _guard = guard;
            for item in initial_items {
                let sent = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    sent = tx.send(render("ADDED", &item)) => sent,
                };
                if sent.is_err() {
                    return;
                }
            }
            if send_initial_param.as_deref() == Some("true")
                && tx
                    .send(render("BOOKMARK", &bookmark(start, true)))
                    .await
                    .is_err()
            {
                return;
            }
            let Some(mut upstream) = upstream else {
                return;
            };
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            loop {
                let item = tokio::select! {
                    _ = &mut deadline => return,
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    item = upstream.next() => item,
                };
                let line = match item {
                    None => return,
                    Some(Ok(WatchItem::Progress(revision))) => {
                        if !bookmarks {
                            continue;
                        }
                        render("BOOKMARK", &bookmark(revision, false))
                    }
                    Some(Ok(WatchItem::Change(change))) => {
                        // Without selectors, the object's text is sent as
                        // it is, and whether it existed is enough; with
                        // them, only what they read is decoded.
                        let (before, now) = if labels.is_empty() && fields.is_empty() {
                            (change.had_previous(), true)
                        } else {
                            (
                                change
                                    .previous_selectable()
                                    .is_some_and(|p| matches(p, &labels, &fields)),
                                matches(change.selectable(), &labels, &fields),
                            )
                        };
                        // The event type, and whether it is the change's own
                        // (not a selector's ADDED/DELETED transition).
                        let (kind, as_stored) = match (change.kind, before, now) {
                            (ChangeKind::Deleted, true, _) => ("DELETED", true),
                            (ChangeKind::Deleted, false, _) => continue,
                            (ChangeKind::Added, _, true) => ("ADDED", true),
                            (ChangeKind::Modified, true, true) => ("MODIFIED", true),
                            (ChangeKind::Modified, false, true) => ("ADDED", false),
                            (ChangeKind::Modified, true, false) => ("DELETED", false),
                            _ => continue,
                        };
                        match (table_version, as_stored) {
                            // The same line for every watcher that sends it as is.
                            (None, true) => change
                                .encoded
                                .get_or_init(|| {
                                    Bytes::from(rawjson::watch_event_line(kind, &change.json))
                                })
                                .clone(),
                            (None, false) => {
                                Bytes::from(rawjson::watch_event_line(kind, &change.json))
                            }
                            (Some(_), _) => render(kind, change.object()),
                        }
                    }
                    Some(Err(StorageError::Compacted { requested, .. })) => {
                        let _ = tx
                            .send(render(
                                "ERROR",
                                &ApiError::expired(format!(
                                    "too old resource version: {requested}"
                                ))
                                .to_status(),
                            ))
                            .await;
                        return;
                    }
                    Some(Err(error)) => {
                        tracing::debug!(%error, "watch ended");
                        return;
                    }
                };
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        });
        let body = Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<Bytes, std::io::Error>),
        );
        let mut response = Response::new(body);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, private"),
        );
        Ok(response)
    }

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

    async fn check_namespace(&self) -> Result<(), ApiError> {
        let Some(ns) = self.target.namespace.as_deref() else {
            return Ok(());
        };
        if self.state.namespaces.is_active(ns) {
            return Ok(());
        }
        let namespaces = registry::find("", "v1", "namespaces").expect("namespaces are served");
        let stored = self
            .state
            .store
            .get(&meta::key(namespaces, None, ns))
            .await
            .map_err(|e| self.storage_error(e))?;
        match stored {
            None => Err(ApiError::not_found("", "namespaces", ns)),
            Some(s) if meta::is_deleting(&s.value) => Err(ApiError::forbidden(format!(
                "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                self.info().qualified(),
                self.name()
            ))),
            Some(_) => Ok(()),
        }
    }

    async fn create(&self) -> Result<Response, ApiError> {
        let info = self.info();
        let mut object = self.decode()?;
        let warnings = self.field_validation(&mut object)?;
        meta::prepare_create(info, &mut object, self.target.namespace.as_deref())?;
        let manager = self.manager();
        let written = self.create_object(object, &manager, warnings).await?;
        Ok(self.render_one(StatusCode::CREATED, written.object, written.warnings))
    }

    async fn create_object(
        &self,
        mut object: Value,
        manager: &str,
        warnings: Vec<String>,
    ) -> Result<Written, ApiError> {
        let info = self.info();
        let name = meta::name(&object).unwrap_or("").to_string();
        let namespace = meta::namespace(&object).map(str::to_string);
        if info.namespaced {
            self.check_namespace_named(namespace.as_deref()).await?;
        }
        if info.kind == "Pod" && info.group.is_empty() {
            // Clients cannot set a new pod's status; admission's defaulting
            // adds its QoS class (upstream's PrepareForCreate).
            object["status"] = json!({"phase": "Pending"});
        }
        let key = meta::key(info, namespace.as_deref(), &name);
        let base = object.clone();
        for _ in write_attempts() {
            let mut object = base.clone();
            let (claims, _) = self.admit(&mut object, None).await?;
            apply::record_update(info, None, &mut object, manager, None, &meta::now());
            if self.dry_run() {
                return Ok(Written { object, warnings });
            }
            match self.state.store.create(&key, &object, &claims).await {
                Ok(revision) => {
                    crate::storage::set_resource_version(&mut object, revision);
                    return Ok(Written { object, warnings });
                }
                Err(StorageError::AlreadyExists { .. }) => {
                    return Err(ApiError::already_exists(info.group, info.plural, &name));
                }
                Err(StorageError::ClaimTaken { key }) if base_has_claim(&base, &key) => {
                    return Err(self.storage_error(StorageError::ClaimTaken { key }));
                }
                Err(StorageError::ClaimTaken { .. }) => continue,
                Err(e) => return Err(self.storage_error(e)),
            }
        }
        Err(ApiError::conflict(info.group, info.plural, &name))
    }

    async fn check_namespace_named(&self, namespace: Option<&str>) -> Result<(), ApiError> {
        if namespace == self.target.namespace.as_deref() {
            return self.check_namespace().await;
        }
        Ok(())
    }

    async fn update(&self) -> Result<Response, ApiError> {
        let info = self.info();
        let mut body = self.decode()?;
        let warnings = self.field_validation(&mut body)?;
        if let Some(Subresource::Scale) = self.target.subresource {
            let current = self.read().await?;
            let replicas = body
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let precondition = body
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .and_then(|v| v.parse::<i64>().ok());
            if precondition.is_some_and(|p| p != current.revision) {
                return Err(ApiError::conflict(info.group, info.plural, self.name()));
            }
            let mut next = current.value.clone();
            next["spec"]["replicas"] = json!(replicas);
            let written = self
                .write_update(current, next, Some("scale"), &self.manager(), warnings)
                .await?;
            return Ok(json_response(StatusCode::OK, &scale_of(&written.object)));
        }
        // Upstream allows an update without resourceVersion (unconditional).
        let precondition = body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))
            })
            .transpose()?;
        if meta::name(&body).is_some_and(|n| n != self.name()) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        let current = match self.state.store.get(&self.key()).await {
            Ok(Some(current)) => current,
            Ok(None) if info.kind == "Endpoints" || info.kind == "Lease" => {
                // Upstream allows create-on-update for these kinds.
                meta::prepare_create(info, &mut body, self.target.namespace.as_deref())?;
                let written = self.create_object(body, &self.manager(), warnings).await?;
                return Ok(self.render_one(StatusCode::CREATED, written.object, written.warnings));
            }
            Ok(None) => return Err(self.not_found()),
            Err(e) => return Err(self.storage_error(e)),
        };
        if precondition.is_some_and(|p| p != current.revision) {
            return Err(ApiError::conflict(info.group, info.plural, self.name()));
        }
        let sub = self.target.subresource.map(Subresource::name);
        let next = self.merge_subresource(&current.value, body);
        let written = self
            .write_update(current, next, sub, &self.manager(), warnings)
            .await?;
        Ok(self.render_one(StatusCode::OK, written.object, written.warnings))
    }

    /// A write to `/status` changes only `.status`; a write to the main
    /// resource of a kind with a status subresource keeps the old `.status`.
    fn merge_subresource(&self, current: &Value, mut next: Value) -> Value {
        match self.target.subresource {
            Some(Subresource::Status) => {
                let mut merged = current.clone();
                merged["status"] = next.get("status").cloned().unwrap_or(Value::Null);
                if let Some(rv) = next.pointer("/metadata/resourceVersion").cloned() {
                    merged["metadata"]["resourceVersion"] = rv;
                }
                merged
            }
            None if self.info().has(Subresource::Status) => {
                match current.get("status") {
                    Some(status) => next["status"] = status.clone(),
                    None => {
                        if let Some(map) = next.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
                next
            }
            _ => next,
        }
    }

    /// Write `next` over `current`, guarded by `current`'s revision.
    async fn write_update(
        &self,
        current: Stored,
        mut next: Value,
        subresource: Option<&str>,
        manager: &str,
        warnings: Vec<String>,
    ) -> Result<Written, ApiError> {
        let info = self.info();
        meta::prepare_update(info, &current.value, &mut next)?;
        let (claims, releases) = self.admit(&mut next, Some(&current.value)).await?;
        if subresource != Some("apply") {
            apply::record_update(
                info,
                Some(&current.value),
                &mut next,
                manager,
                subresource,
                &meta::now(),
            );
        }
        if self.dry_run() {
            return Ok(Written {
                object: next,
                warnings,
            });
        }
        // The last finalizer removed from an object being deleted deletes it
        // (for a Namespace, also the last of `spec.finalizers`).
        let namespace_finalizers = info.kind == "Namespace"
            && info.group.is_empty()
            && next
                .pointer("/spec/finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty());
        if meta::is_deleting(&next) && meta::finalizers(&next).is_empty() && !namespace_finalizers {
            let mut releases = releases;
            if info.kind == "Service" && info.group.is_empty() {
                releases.extend(self.state.allocator.releases_for(&current.value));
            }
            let revision = self
                .state
                .store
                .delete(&self.key(), current.revision, &releases)
                .await
                .map_err(|e| self.storage_error(e))?;
            crate::storage::set_resource_version(&mut next, revision);
            return Ok(Written {
                object: next,
                warnings,
            });
        }
        let revision = self
            .state
            .store
            .update(&self.key(), &next, current.revision, &claims, &releases)
            .await
            .map_err(|e| self.storage_error(e))?;
        crate::storage::set_resource_version(&mut next, revision);
        Ok(Written {
            object: next,
            warnings,
        })
    }

    async fn patch(&self) -> Result<Response, ApiError> {
        let info = self.info();
        let content_type = self
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let ty = PatchType::from_content_type(content_type)
            .ok_or_else(|| ApiError::unsupported_media_type(content_type))?;
        if ty == PatchType::Apply {
            return self.server_side_apply().await;
        }
        let manager = self.manager();
        for attempt in write_attempts() {
            // A failure on the watch cache's state is retried from etcd's.
            let (current, cached) = self.read_for_write(attempt).await?;
            let view = match self.target.subresource {
                Some(Subresource::Scale) => scale_of(&current.value),
                _ => current.value.clone(),
            };
            let mut patched = match patch::apply_patch(info, ty, &view, &self.body) {
                Ok(patched) => patched,
                Err(_) if cached => continue,
                Err(e) => {
                    return Err(ApiError::new(
                        e.http_code(),
                        reason_for(e.http_code()),
                        e.to_string(),
                    ));
                }
            };
            let warnings = self.field_validation(&mut patched)?;
            // The patched object keeps the current resourceVersion unless the
            // patch itself names another one: that is a precondition.
            let precondition = patched
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .and_then(|v| v.parse::<i64>().ok())
                .filter(|p| *p != current.revision);
            if precondition.is_some() {
                if cached {
                    continue;
                }
                return Err(ApiError::conflict(info.group, info.plural, self.name()));
            }
            let (next, sub) = match self.target.subresource {
                Some(Subresource::Scale) => {
                    let mut next = current.value.clone();
                    let replicas = patched
                        .pointer("/spec/replicas")
                        .cloned()
                        .unwrap_or(json!(0));
                    next["spec"]["replicas"] = replicas;
                    (next, Some("scale"))
                }
                other => (
                    self.merge_subresource(&current.value, patched),
                    other.map(Subresource::name),
                ),
            };
            match self
                .write_update(current, next, sub, &manager, warnings)
                .await
            {
                Ok(written) => {
                    let object = if self.target.subresource == Some(Subresource::Scale) {
                        scale_of(&written.object)
                    } else {
                        written.object
                    };
                    return Ok(self.render_one(StatusCode::OK, object, written.warnings));
                }
                // Lost a race with another writer (or the watch cache was
                // behind): patch the new state.
                Err(e) if e.reason == "Conflict" || cached => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::conflict(info.group, info.plural, self.name()))
    }

    async fn server_side_apply(&self) -> Result<Response, ApiError> {
        let info = self.info();
        let mut applied: Value = serde_yaml::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
        if !applied.is_object() {
            return Err(ApiError::bad_request(
                "the body of an apply patch must be an object",
            ));
        }
        let Some(manager) = self.query.get("fieldManager").filter(|m| !m.is_empty()) else {
            return Err(ApiError::bad_request(
                "PATCH request of type application/apply-patch+yaml requires fieldManager",
            ));
        };
        let force = self.flag("force");
        let warnings = self.field_validation(&mut applied)?;
        for _ in write_attempts() {
            let live = self
                .state
                .store
                .get(&self.key())
                .await
                .map_err(|e| self.storage_error(e))?;
            let result = apply::server_side_apply(
                info,
                live.as_ref().map(|s| &s.value),
                &applied,
                manager,
                force,
                &meta::now(),
            )
            .map_err(|e| match e {
                apply::ApplyError::Conflicts { .. } => ApiError::new(409, "Conflict", e.message())
                    .with_details(info.group, info.plural, self.name()),
                other => ApiError::new(422, "Invalid", other.message()),
            })?;
            match live {
                None => {
                    let mut object = result;
                    meta::prepare_create(info, &mut object, self.target.namespace.as_deref())?;
                    if meta::name(&object) != Some(self.name()) {
                        return Err(ApiError::bad_request(
                            "the name of the object does not match the name on the URL",
                        ));
                    }
                    let managed = object.pointer("/metadata/managedFields").cloned();
                    let mut written = self
                        .create_object(object, manager, warnings.clone())
                        .await?;
                    // Keep the apply's ownership rather than an Update entry.
                    if let Some(managed) = managed {
                        written.object["metadata"]["managedFields"] = managed;
                    }
                    return Ok(self.render_one(
                        StatusCode::CREATED,
                        written.object,
                        written.warnings,
                    ));
                }
                Some(current) => {
                    let next = self.merge_subresource(&current.value, result);
                    match self
                        .write_update(current, next, Some("apply"), manager, warnings.clone())
                        .await
                    {
                        Ok(written) => {
                            return Ok(self.render_one(
                                StatusCode::OK,
                                written.object,
                                written.warnings,
                            ));
                        }
                        Err(e) if e.reason == "Conflict" => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Err(ApiError::conflict(info.group, info.plural, self.name()))
    }

    async fn bind(&self) -> Result<Response, ApiError> {
        let binding = self.decode()?;
        let node = binding
            .pointer("/target/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                ApiError::invalid(
                    "",
                    "Binding",
                    self.name(),
                    vec![Cause::new(
                        "FieldValueRequired",
                        "target.name",
                        "Required value",
                    )],
                )
            })?
            .to_string();
        for attempt in write_attempts() {
            // A refusal on the watch cache's state, which may be behind
            // (the pod deleted and created again), is checked against etcd's.
            let (current, cached) = self.read_for_write(attempt).await?;
            if let Some(refusal) = self.bind_refusal(&current.value) {
                if cached {
                    continue;
                }
                return Err(refusal);
            }
            let mut next = current.value.clone();
            next["spec"]["nodeName"] = json!(node);
            set_condition(&mut next, "PodScheduled", "True", None);
            let revision = current.revision;
            match self
                .state
                .store
                .update(&self.key(), &next, revision, &[], &[])
                .await
            {
                Ok(_) => {
                    return Ok(json_response(
                        StatusCode::CREATED,
                        &status::success(json!({"name": self.name(), "kind": "pods"})),
                    ));
                }
                Err(StorageError::Conflict { .. }) => continue,
                Err(e) => return Err(self.storage_error(e)),
            }
        }
        Err(ApiError::conflict("", "pods", self.name()))
    }

    /// Why `pod` cannot be bound: it is being deleted, or already bound.
    fn bind_refusal(&self, pod: &Value) -> Option<ApiError> {
        let message = if meta::is_deleting(pod) {
            format!(
                "pod {} is being deleted, cannot be assigned to a host",
                self.name()
            )
        } else {
            let existing = pod
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())?;
            format!(
                "pod {} is already assigned to node \"{existing}\"",
                self.name()
            )
        };
        Some(ApiError::conflict("", "pods", self.name()).with_message(message))
    }

    // ---- deletes --------------------------------------------------------

    fn delete_options(&self) -> Result<Value, ApiError> {
        let mut options = if self.body.is_empty() {
            json!({})
        } else {
            self.decode()?
        };
        for (param, field) in [
            ("propagationPolicy", "propagationPolicy"),
            ("gracePeriodSeconds", "gracePeriodSeconds"),
            ("orphanDependents", "orphanDependents"),
        ] {
            if let Some(v) = self.query.get(param) {
                options[field] = match v.parse::<i64>() {
                    Ok(n) => json!(n),
                    Err(_) => json!(v),
                };
            }
        }
        Ok(options)
    }

    async fn delete(&self) -> Result<Response, ApiError> {
        let options = self.delete_options()?;
        let object = self.delete_one(&options).await?;
        Ok(json_response(StatusCode::OK, &object))
    }

    async fn delete_one(&self, options: &Value) -> Result<Value, ApiError> {
        let info = self.info();
        for _ in write_attempts() {
            let current = self.read().await?;
            if let Some(uid) = options
                .pointer("/preconditions/uid")
                .and_then(Value::as_str)
                && meta::uid(&current.value) != Some(uid)
            {
                return Err(
                    ApiError::conflict(info.group, info.plural, self.name()).with_message(format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta::uid(&current.value).unwrap_or("")
                    )),
                );
            }
            if let Some(rv) = options
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
                && rv != current.revision.to_string()
            {
                return Err(ApiError::conflict(info.group, info.plural, self.name()).with_message(format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    current.revision
                )));
            }
            let mut next = current.value.clone();
            let mut finalizers = meta::finalizers(&next);
            let policy = options
                .get("propagationPolicy")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| {
                    options
                        .get("orphanDependents")
                        .and_then(Value::as_bool)
                        .filter(|o| *o)
                        .map(|_| "Orphan".to_string())
                });
            match policy.as_deref() {
                Some("Foreground") if !finalizers.iter().any(|f| f == "foregroundDeletion") => {
                    finalizers.push("foregroundDeletion".into())
                }
                Some("Orphan") if !finalizers.iter().any(|f| f == "orphan") => {
                    finalizers.push("orphan".into())
                }
                _ => {}
            }
            let namespace_spec_finalizers = info.kind == "Namespace"
                && next
                    .pointer("/spec/finalizers")
                    .and_then(Value::as_array)
                    .is_some_and(|f| !f.is_empty());
            let graceful_pod = info.kind == "Pod"
                && info.group.is_empty()
                && next
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .is_some_and(|n| !n.is_empty())
                && !matches!(
                    next.pointer("/status/phase").and_then(Value::as_str),
                    Some("Succeeded" | "Failed")
                );
            let grace = options
                .get("gracePeriodSeconds")
                .and_then(Value::as_i64)
                .or_else(|| {
                    next.pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                })
                .unwrap_or(30);
            let graceful_pod = graceful_pod && grace > 0;
            if finalizers.is_empty() && !namespace_spec_finalizers && !graceful_pod {
                if self.dry_run() {
                    return Ok(current.value);
                }
                let releases = if info.kind == "Service" && info.group.is_empty() {
                    self.state.allocator.releases_for(&current.value)
                } else {
                    Vec::new()
                };
                match self
                    .state
                    .store
                    .delete(&self.key(), current.revision, &releases)
                    .await
                {
                    Ok(revision) => {
                        let mut gone = current.value;
                        crate::storage::set_resource_version(&mut gone, revision);
                        return Ok(gone);
                    }
                    Err(StorageError::Conflict { .. }) => continue,
                    Err(e) => return Err(self.storage_error(e)),
                }
            }
            // Deletion waits: for finalizers, for the namespace controller,
            // or for the pod's kubelet to stop its containers.
            if meta::is_deleting(&current.value) && meta::finalizers(&current.value) == finalizers {
                return Ok(current.value);
            }
            let meta_map = meta::metadata_mut(&mut next);
            if !meta_map.contains_key("deletionTimestamp") {
                let when = if graceful_pod {
                    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(grace);
                    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
                } else {
                    meta::now()
                };
                meta_map.insert("deletionTimestamp".into(), json!(when));
                meta_map.insert(
                    "deletionGracePeriodSeconds".into(),
                    json!(if graceful_pod { grace } else { 0 }),
                );
            }
            if !finalizers.is_empty() {
                meta_map.insert("finalizers".into(), json!(finalizers));
            }
            if info.kind == "Namespace" {
                next["status"]["phase"] = json!("Terminating");
            }
            if self.dry_run() {
                return Ok(next);
            }
            match self
                .state
                .store
                .update(&self.key(), &next, current.revision, &[], &[])
                .await
            {
                Ok(revision) => {
                    crate::storage::set_resource_version(&mut next, revision);
                    return Ok(next);
                }
                Err(StorageError::Conflict { .. }) => continue,
                Err(e) => return Err(self.storage_error(e)),
            }
        }
        Err(ApiError::conflict(info.group, info.plural, self.name()))
    }

    async fn delete_collection(&self) -> Result<Response, ApiError> {
        let options = self.delete_options()?;
        let (labels, fields) = self.selectors()?;
        let (items, revision) = self.list_matching(&labels, &fields).await?;
        let mut deleted = Vec::with_capacity(items.len());
        for item in items {
            let name = meta::name(&item).unwrap_or("").to_string();
            let one = Request {
                state: self.state,
                target: Target {
                    info: self.info(),
                    namespace: meta::namespace(&item).map(str::to_string),
                    name: Some(name),
                    subresource: None,
                },
                query: self.query.clone(),
                headers: self.headers.clone(),
                body: Bytes::new(),
            };
            match one.delete_one(&options).await {
                Ok(obj) => deleted.push(obj),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let info = self.info();
        let list = json!({
            "kind": info.list_kind(),
            "apiVersion": info.api_version(),
            "metadata": {"resourceVersion": revision.to_string()},
            "items": deleted,
        });
        Ok(json_response(StatusCode::OK, &list))
    }
}

fn base_has_claim(base: &Value, key: &str) -> bool {
    // An explicitly requested ClusterIP or NodePort that is taken is the
    // client's error; a randomly picked one that lost a race is retried.
    let Some(value) = key.rsplit('/').next() else {
        return false;
    };
    let ips = base
        .pointer("/spec/clusterIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .chain(base.pointer("/spec/clusterIP"))
        .filter_map(Value::as_str)
        .any(|ip| ip == value);
    let ports = base
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("nodePort").and_then(Value::as_i64))
        .any(|p| p.to_string() == value);
    ips || ports
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

fn set_condition(object: &mut Value, kind: &str, status: &str, reason: Option<&str>) {
    let now = meta::now();
    let mut condition =
        json!({"type": kind, "status": status, "lastProbeTime": null, "lastTransitionTime": now});
    if let Some(reason) = reason {
        condition["reason"] = json!(reason);
    }
    if !object.get("status").is_some_and(Value::is_object) {
        object["status"] = json!({});
    }
    let conditions = object["status"]
        .as_object_mut()
        .expect("status was just made an object")
        .entry("conditions")
        .or_insert_with(|| json!([]));
    if let Some(list) = conditions.as_array_mut() {
        match list
            .iter_mut()
            .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
        {
            Some(existing) => *existing = condition,
            None => list.push(condition),
        }
    }
}

fn matches(obj: &Value, labels: &LabelSelector, fields: &FieldSelector) -> bool {
    labels.matches_object(obj) && fields.matches(obj)
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        409 => "Conflict",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        _ => "InternalError",
    }
}

fn error_watch(line: Bytes) -> Response {
    let mut response = Response::new(Body::from(line));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
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
