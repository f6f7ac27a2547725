//! `get` and `list`: one object, or a collection filtered by label and
//! field selectors, as JSON or as a server-side Table.

use super::*;
use crate::storage::Page;

impl Request<'_> {
    pub(super) async fn get(&self) -> Result<Response, ApiError> {
        let stored = self.read().await?;
        let object = match self.target.subresource {
            Some(Subresource::Scale) => scale_of(&stored.value),
            _ => stored.value,
        };
        Ok(self.render_one(StatusCode::OK, object, Vec::new()))
    }

    pub(super) fn selectors(&self) -> Result<(LabelSelector, FieldSelector), ApiError> {
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

    pub(super) async fn list(&self) -> Result<Response, ApiError> {
        let (labels, fields) = self.selectors()?;
        let Some(api_version) = table::wants_table(accept(&self.headers)) else {
            return self.list_json(&labels, &fields).await;
        };
        // A server-side Table (what `kubectl get` prints) is built from the decoded objects.
        let (items, revision) = self.list_matching(&labels, &fields).await?;
        let include = IncludeObject::parse(self.query.get("includeObject").map(String::as_str));
        let mut table = table::table(
            self.info(),
            &items,
            include,
            api_version,
            jiff::Timestamp::now(),
        );
        table["metadata"] = json!({"resourceVersion": revision.to_string()});
        Ok(json_response(StatusCode::OK, &table))
    }

    /// A list as JSON, put together from the objects' stored text: no object is decoded but for
    /// the fields selectors read. At 10,000 EndpointSlices this is most of the time a list took.
    async fn list_json(
        &self,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Result<Response, ApiError> {
        let info = self.info();
        let prefix = meta::collection_prefix(info, self.target.namespace.as_deref());
        let page = self.page(&prefix)?;
        let (objects, revision, next) = self
            .state
            .store
            .list_json(&prefix, &page)
            .await
            .map_err(|e| match e {
                StorageError::Compacted { .. } => ApiError::expired(
                    "the provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter",
                ),
                e => self.storage_error(e),
            })?;
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if let Some(start) = next {
            metadata["continue"] = Value::String(continue_token(revision, &start));
        }
        let head = json!({
            "kind": info.list_kind(),
            "apiVersion": info.api_version(),
            "metadata": metadata,
        });
        // `{"kind":…,"metadata":{…}` + `,"items":[` + the objects + `]}`.
        let mut body = serde_json::to_vec(&head).unwrap_or_default();
        body.pop();
        body.extend_from_slice(b",\"items\":[");
        let selecting = !labels.is_empty() || !fields.is_empty();
        let mut first = true;
        for object in &objects {
            if selecting {
                let selectable = crate::selector::selectable(object)
                    .map_err(|e| ApiError::internal(format!("stored object: {e}")))?;
                if !matches(&selectable, labels, fields) {
                    continue;
                }
            }
            if !first {
                body.push(b',');
            }
            first = false;
            body.extend_from_slice(object);
        }
        body.extend_from_slice(b"]}");
        Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response())
    }

    /// The page `limit` and `continue` ask for, under `prefix`.
    fn page(&self, prefix: &str) -> Result<Page, ApiError> {
        let limit = match self.query.get("limit").map(String::as_str) {
            None | Some("") => 0,
            Some(text) => text
                .parse::<i64>()
                .ok()
                .filter(|l| *l >= 0)
                .ok_or_else(|| ApiError::bad_request(format!("invalid limit: {text:?}")))?,
        };
        let mut page = Page {
            limit,
            ..Page::default()
        };
        if let Some(token) = self.query.get("continue").filter(|t| !t.is_empty()) {
            let (revision, start) = parse_continue(token)
                .filter(|(_, start)| start.starts_with(prefix))
                .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
            page.revision = revision;
            page.start = Some(start);
        }
        Ok(page)
    }

    pub(super) async fn list_matching(
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
}

pub(super) fn matches(obj: &Value, labels: &LabelSelector, fields: &FieldSelector) -> bool {
    labels.matches_object(obj) && fields.matches(obj)
}

/// The `continue` token of a list page: the revision the list is read at and the key the next
/// page starts from, as JSON in base64 (upstream's is the same in spirit: `{"v":…,"rv":…,"start":…}`).
fn continue_token(revision: i64, start: &str) -> String {
    use base64::Engine as _;
    let token = json!({"v": "skiff/v1", "rv": revision, "start": start});
    base64::engine::general_purpose::STANDARD.encode(token.to_string())
}

/// The revision and start key of a `continue` token; `None` when it is not one of ours.
fn parse_continue(token: &str) -> Option<(i64, String)> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    if value["v"] != "skiff/v1" {
        return None;
    }
    let revision = value["rv"].as_i64().filter(|rv| *rv > 0)?;
    Some((revision, value["start"].as_str()?.to_owned()))
}
