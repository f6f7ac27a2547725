//! `watch`: a stream of changes from a resourceVersion, from the watch
//! cache or etcd, as JSON event lines or Table rows.

use super::*;

impl Request<'_> {
    pub(super) async fn watch(self) -> Response {
        match self.watch_stream().await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        }
    }

    pub(super) async fn watch_stream(self) -> Result<Response, ApiError> {
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
                                    .is_some_and(|p| super::read::matches(p, &labels, &fields)),
                                super::read::matches(change.selectable(), &labels, &fields),
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
                        tracing::debug!(error = %skiff_common::error::chain(&error), "watch ended");
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
}

/// One line of a JSON watch stream.
#[derive(serde::Serialize)]
pub(super) struct WatchEventLine<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    object: &'a Value,
}

pub(super) fn error_watch(line: Bytes) -> Response {
    let mut response = Response::new(Body::from(line));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
