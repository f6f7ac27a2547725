//! `get` and `list`: one object, or a collection filtered by label and
//! field selectors, as JSON or as a server-side Table.

use super::*;

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
