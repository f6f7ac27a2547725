//! `delete` and `deletecollection`: graceful deletion, finalizers,
//! preconditions and propagation policies.

use super::*;

impl Request<'_> {
    pub(super) fn delete_options(&self) -> Result<Value, ApiError> {
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

    pub(super) async fn delete(&self) -> Result<Response, ApiError> {
        let options = self.delete_options()?;
        let object = self.delete_one(&options).await?;
        Ok(json_response(StatusCode::OK, &object))
    }

    pub(super) async fn delete_one(&self, options: &Value) -> Result<Value, ApiError> {
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

    pub(super) async fn delete_collection(&self) -> Result<Response, ApiError> {
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
