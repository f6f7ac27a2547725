//! `create`: a new object, its namespace checked, admitted, and written
//! with its side keys (allocated IPs and ports) in one transaction.

use super::*;

impl Request<'_> {
    pub(super) async fn check_namespace(&self) -> Result<(), ApiError> {
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

    pub(super) async fn create(&self) -> Result<Response, ApiError> {
        let info = self.info();
        let mut object = self.decode()?;
        let warnings = self.field_validation(&mut object)?;
        meta::prepare_create(info, &mut object, self.target.namespace.as_deref())?;
        let manager = self.manager();
        let written = self.create_object(object, &manager, warnings).await?;
        Ok(self.render_one(StatusCode::CREATED, written.object, written.warnings))
    }

    pub(super) async fn create_object(
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

    pub(super) async fn check_namespace_named(
        &self,
        namespace: Option<&str>,
    ) -> Result<(), ApiError> {
        if namespace == self.target.namespace.as_deref() {
            return self.check_namespace().await;
        }
        Ok(())
    }
}

pub(super) fn base_has_claim(base: &Value, key: &str) -> bool {
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
