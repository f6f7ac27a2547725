//! `patch`: JSON, merge and strategic merge patches, and server-side
//! apply with field ownership.

use super::*;

impl Request<'_> {
    pub(super) async fn patch(&self) -> Result<Response, ApiError> {
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
            let mut patched = match crate::patch::apply_patch(info, ty, &view, &self.body) {
                Ok(patched) => patched,
                Err(_) if cached => continue,
                Err(e) => {
                    return Err(ApiError::new(
                        e.http_code(),
                        reason_for(e.http_code()),
                        skiff_common::error::chain(&e),
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

    pub(super) async fn server_side_apply(&self) -> Result<Response, ApiError> {
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
}

pub(super) fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        409 => "Conflict",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        _ => "InternalError",
    }
}
