//! `healthCheckNodePort`: for each LoadBalancer Service with `externalTrafficPolicy: Local`, the
//! agent answers `GET /` on that port of every address of the node, as kube-proxy's health
//! check server does: 200 when the node has local endpoints for the Service, 503 when not, with
//! the count in the body. A load balancer outside the cluster sends traffic only to nodes that
//! answer 200.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What one health check port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// The response to a health check: 200 with local endpoints, else 503.
pub fn response(health: &Health) -> (StatusCode, String) {
    let status = if health.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "service": {"namespace": health.namespace, "name": health.name},
        "localEndpoints": health.local_endpoints,
        "serviceProxyHealthy": true,
    });
    (status, body.to_string())
}

/// The health check listeners of this node.
pub struct HealthServer {
    state: Arc<Mutex<HashMap<u16, Health>>>,
    listeners: HashMap<u16, JoinHandle<()>>,
    shutdown: CancellationToken,
}

impl HealthServer {
    /// No listener yet; they stop at `shutdown`.
    pub fn new(shutdown: CancellationToken) -> HealthServer {
        HealthServer {
            state: Arc::default(),
            listeners: HashMap::new(),
            shutdown,
        }
    }

    /// Serves exactly `ports`, with what each reports.
    pub fn update(&mut self, ports: HashMap<u16, Health>) {
        self.listeners.retain(|port, task| {
            let keep = ports.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for &port in ports.keys() {
            if !self.listeners.contains_key(&port) {
                let task = tokio::spawn(serve(port, self.state.clone(), self.shutdown.clone()));
                self.listeners.insert(port, task);
            }
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = ports;
    }
}

async fn serve(port: u16, state: Arc<Mutex<HashMap<u16, Health>>>, shutdown: CancellationToken) {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(error) => {
                tracing::warn!(%addr, %error, "cannot listen for health checks; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
            }
        }
    };
    let app = axum::Router::new().fallback(move || {
        let health = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&port)
            .cloned();
        async move {
            match health {
                Some(health) => {
                    let (status, body) = response(&health);
                    (status, [("content-type", "application/json")], body).into_response()
                }
                None => StatusCode::NOT_FOUND.into_response(),
            }
        }
    });
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(%addr, %error, "health check server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_with_local_endpoints_unavailable_without() {
        let mut health = Health {
            namespace: "demo".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let (status, body) = response(&health);
        assert_eq!(status, StatusCode::OK);
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(body["localEndpoints"], 2);
        assert_eq!(body["service"]["name"], "web");
        health.local_endpoints = 0;
        assert_eq!(response(&health).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
