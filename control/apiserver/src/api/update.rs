//! `update` (PUT) of an object or its `status`/`scale` subresource, guarded
//! by resourceVersion.

use super::*;

impl Request<'_> {
    pub(super) async fn update(&self) -> Result<Response, ApiError> {
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
    pub(super) fn merge_subresource(&self, current: &Value, mut next: Value) -> Value {
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
    pub(super) async fn write_update(
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
}
