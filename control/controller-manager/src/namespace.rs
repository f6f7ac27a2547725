//! The namespace controller: a namespace being deleted (it has a
//! deletionTimestamp and the `kubernetes` finalizer in `spec.finalizers`)
//! has every object of every served namespaced kind in it deleted; once
//! none is left, `kubernetes` is removed from `spec.finalizers` and the API
//! server deletes the namespace.
//!
//! Upstream finalizes through the `namespaces/<name>/finalize`
//! subresource; this API server does not serve it, so the controller
//! updates the namespace object itself.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams, PropagationPolicy};
use kube::discovery::ApiResource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

use super::Context;
use skiff_common::error::{chain, is_status};
use skiff_common::registry::RESOURCES;

/// The finalizer of namespaces the controller must empty.
pub const FINALIZER: &str = "kubernetes";

/// Whether `namespace` is being deleted and still needs emptying.
pub fn needs_cleanup(namespace: &Namespace) -> bool {
    namespace.metadata.deletion_timestamp.is_some()
        && namespace
            .spec
            .as_ref()
            .and_then(|s| s.finalizers.as_ref())
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

/// `namespace` with the `kubernetes` finalizer removed from
/// `spec.finalizers`; `None` when it has none to remove.
pub fn finalized(namespace: &Namespace) -> Option<Namespace> {
    if !needs_cleanup(namespace) {
        return None;
    }
    let mut next = namespace.clone();
    next.metadata.managed_fields = None;
    if let Some(spec) = next.spec.as_mut() {
        let left: Vec<String> = spec
            .finalizers
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f != FINALIZER)
            .collect();
        // An empty list, not none: the API server defaults a missing one
        // back to `["kubernetes"]`.
        spec.finalizers = Some(left);
    }
    Some(next)
}

/// A failed reconcile, retried.
#[derive(Debug, thiserror::Error)]
#[error("api request failed")]
struct ReconcileError {
    #[source]
    source: kube::Error,
}

/// Run the controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    Controller::new(
        Api::<Namespace>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(async move { shutdown.cancelled().await })
    .run(reconcile, error_policy, ctx)
    .for_each(|_| async {})
    .await;
}

fn error_policy(namespace: Arc<Namespace>, error: &ReconcileError, _: Arc<Context>) -> Action {
    tracing::warn!(
        namespace = namespace.metadata.name.as_deref().unwrap_or_default(),
        error = %chain(error),
        "namespace cleanup failed"
    );
    Action::requeue(Duration::from_secs(2))
}

/// Delete what is left in `namespace`; the number of objects still there
/// (including those just asked to go).
async fn delete_contents(ctx: &Context, namespace: &str) -> Result<usize, kube::Error> {
    let mut remaining = 0;
    for info in RESOURCES.iter().filter(|r| r.namespaced) {
        let resource = ApiResource {
            group: info.group.to_string(),
            version: info.version.to_string(),
            api_version: info.api_version(),
            kind: info.kind.to_string(),
            plural: info.plural.to_string(),
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), namespace, &resource);
        let items = api.list(&ListParams::default()).await?.items;
        remaining += items.len();
        let deletes = items
            .into_iter()
            .filter(|item| item.metadata.deletion_timestamp.is_none())
            .filter_map(|item| item.metadata.name)
            .map(|name| {
                let api = api.clone();
                async move {
                    let params = DeleteParams {
                        propagation_policy: Some(PropagationPolicy::Background),
                        ..DeleteParams::default()
                    };
                    match api.delete(&name, &params).await {
                        Ok(_) => Ok(()),
                        Err(error) if is_status(&error, 404) || is_status(&error, 409) => Ok(()),
                        Err(error) => Err(error),
                    }
                }
            });
        let results: Vec<Result<(), kube::Error>> = futures::stream::iter(deletes)
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect::<Result<(), kube::Error>>()?;
    }
    Ok(remaining)
}

async fn reconcile(namespace: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    if !needs_cleanup(&namespace) {
        return Ok(Action::await_change());
    }
    let name = namespace.metadata.name.clone().unwrap_or_default();
    let remaining = delete_contents(&ctx, &name)
        .await
        .map_err(|source| ReconcileError { source })?;
    if remaining > 0 {
        tracing::debug!(
            namespace = name,
            remaining,
            "waiting for the namespace to empty"
        );
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    let Some(next) = finalized(&namespace) else {
        return Ok(Action::await_change());
    };
    match api.replace(&name, &PostParams::default(), &next).await {
        Ok(_) => tracing::info!(namespace = name, "namespace emptied and finalized"),
        // A newer version is reconciled again; a gone one is done.
        Err(error) if is_status(&error, 409) || is_status(&error, 404) => {}
        Err(source) => return Err(ReconcileError { source }),
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn namespace(value: serde_json::Value) -> Namespace {
        serde_json::from_value(value).expect("namespace")
    }

    #[test]
    fn only_deleted_namespaces_with_the_finalizer_are_cleaned() {
        let active =
            namespace(json!({"metadata": {"name": "a"}, "spec": {"finalizers": ["kubernetes"]}}));
        assert!(!needs_cleanup(&active));
        assert!(finalized(&active).is_none());
        let deleting = namespace(
            json!({"metadata": {"name": "a", "deletionTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"finalizers": ["kubernetes", "example.com/other"]}, "status": {"phase": "Terminating"}}),
        );
        assert!(needs_cleanup(&deleting));
        let next = finalized(&deleting).expect("finalized");
        assert_eq!(
            next.spec.and_then(|s| s.finalizers),
            Some(vec!["example.com/other".to_string()])
        );
        let last = namespace(
            json!({"metadata": {"name": "a", "deletionTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"finalizers": ["kubernetes"]}}),
        );
        assert_eq!(
            finalized(&last)
                .expect("finalized")
                .spec
                .and_then(|s| s.finalizers),
            Some(vec![])
        );
        let done = namespace(
            json!({"metadata": {"name": "a", "deletionTimestamp": "2024-01-01T00:00:00Z"}, "spec": {}}),
        );
        assert!(!needs_cleanup(&done));
    }
}
