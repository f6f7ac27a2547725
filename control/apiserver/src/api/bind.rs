//! `pods/binding`: the scheduler's write of a pod's node.

use super::*;

impl Request<'_> {
    pub(super) async fn bind(&self) -> Result<Response, ApiError> {
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
    pub(super) fn bind_refusal(&self, pod: &Value) -> Option<ApiError> {
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
}

pub(super) fn set_condition(object: &mut Value, kind: &str, status: &str, reason: Option<&str>) {
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
