//! `/metrics` in Prometheus text format: request counts and latencies per
//! verb, resource and code, as upstream's `apiserver_request_total` and
//! `apiserver_request_duration_seconds`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a counted request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// upstream's verb: GET, LIST, WATCH, POST, PUT, PATCH, DELETE.
    pub verb: String,
    /// The resource, e.g. `pods`, or empty for non-resource paths.
    pub resource: String,
    /// The subresource, e.g. `status`.
    pub subresource: String,
    /// The HTTP status code.
    pub code: String,
}

/// Labels of a latency observation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// As in [`RequestLabels`].
    pub verb: String,
    /// As in [`RequestLabels`].
    pub resource: String,
}

/// The API server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<LatencyLabels, Histogram>,
    watchers: Family<LatencyLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let durations = Family::<LatencyLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0005, 2.0, 16))) as fn() -> Histogram,
        );
        let watchers = Family::<LatencyLabels, Gauge>::default();
        registry.register(
            "apiserver_request",
            "Counter of API server requests by verb, resource, subresource and code",
            requests.clone(),
        );
        registry.register(
            "apiserver_request_duration_seconds",
            "Response latency distribution in seconds by verb and resource (watch excluded)",
            durations.clone(),
        );
        registry.register(
            "apiserver_longrunning_requests",
            "Number of open watch requests by resource",
            watchers.clone(),
        );
        Metrics {
            registry,
            requests,
            durations,
            watchers,
        }
    }

    /// Count a finished request.
    pub fn observe(&self, labels: RequestLabels, seconds: f64) {
        let latency = LatencyLabels {
            verb: labels.verb.clone(),
            resource: labels.resource.clone(),
        };
        self.requests.get_or_create(&labels).inc();
        if labels.verb != "WATCH" {
            self.durations.get_or_create(&latency).observe(seconds);
        }
    }

    /// A guard that counts one open watch on `resource` while it lives.
    pub fn watching(self: &Arc<Self>, resource: &str) -> WatchGuard {
        let labels = LatencyLabels {
            verb: "WATCH".into(),
            resource: resource.into(),
        };
        self.watchers.get_or_create(&labels).inc();
        WatchGuard {
            metrics: self.clone(),
            labels,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %skiff_common::error::chain(&error), "cannot encode metrics");
        }
        out
    }
}

/// Counts one open watch until dropped.
pub struct WatchGuard {
    metrics: Arc<Metrics>,
    labels: LatencyLabels,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.metrics.watchers.get_or_create(&self.labels).dec();
    }
}

/// What a request path and query say about verb and resource, for labels.
pub fn classify(method: &http::Method, path: &str, query: &str) -> (String, String, String) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match parts.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return (method.as_str().to_string(), String::new(), String::new()),
    };
    let rest = match rest {
        ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let (resource, has_name, sub) = match rest {
        [] => (String::new(), false, String::new()),
        [resource] => (resource.to_string(), false, String::new()),
        [resource, _name] => (resource.to_string(), true, String::new()),
        [resource, _name, sub, ..] => (resource.to_string(), true, sub.to_string()),
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method.as_str(), has_name) {
        ("GET", _) if watch => "WATCH",
        ("GET", false) => "LIST",
        (m, _) => m,
    };
    (verb.to_string(), resource, sub)
}

/// axum middleware recording every request.
pub async fn middleware(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let (verb, resource, subresource) = classify(
        request.method(),
        request.uri().path(),
        request.uri().query().unwrap_or(""),
    );
    let start = Instant::now();
    let response = next.run(request).await;
    metrics.observe(
        RequestLabels {
            verb,
            resource,
            subresource,
            code: response.status().as_u16().to_string(),
        },
        start.elapsed().as_secs_f64(),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_like_upstream() {
        let get = http::Method::GET;
        assert_eq!(
            classify(&get, "/api/v1/namespaces/default/pods", ""),
            ("LIST".into(), "pods".into(), "".into())
        );
        assert_eq!(
            classify(&get, "/apis/apps/v1/namespaces/d/deployments/web/scale", ""),
            ("GET".into(), "deployments".into(), "scale".into())
        );
        assert_eq!(
            classify(&get, "/api/v1/pods", "watch=1&resourceVersion=3"),
            ("WATCH".into(), "pods".into(), "".into())
        );
        assert_eq!(
            classify(&http::Method::POST, "/api/v1/namespaces", ""),
            ("POST".into(), "namespaces".into(), "".into())
        );
        assert_eq!(classify(&get, "/healthz", "").1, "");
    }

    #[test]
    fn renders_counts_and_latencies() {
        let metrics = Metrics::new();
        metrics.observe(
            RequestLabels {
                verb: "LIST".into(),
                resource: "pods".into(),
                subresource: "".into(),
                code: "200".into(),
            },
            0.002,
        );
        let text = metrics.render();
        assert!(text.contains("apiserver_request_total{verb=\"LIST\",resource=\"pods\",subresource=\"\",code=\"200\"} 1"), "{text}");
        assert!(
            text.contains("apiserver_request_duration_seconds_bucket"),
            "{text}"
        );
    }
}
