//! Liveness, readiness and startup probes: exec (a process in the
//! container through containerd's exec API), httpGet and tcpSocket (from
//! the node's network namespace to the pod IP, which the CNI plugin routes
//! to the pod, as upstream's kubelet does).
//!
//! One task per probe and container instance runs the probe every
//! `periodSeconds` after `initialDelaySeconds`, counts consecutive results
//! against `successThreshold` and `failureThreshold`, and reports each
//! change of verdict to the pod worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Probe;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::runtime::Runtime;

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// Restarts the container when it fails.
    Liveness,
    /// Drives the Ready condition.
    Readiness,
    /// Holds the others back until it succeeds once.
    Startup,
}

impl ProbeKind {
    /// As in events (`Liveness probe failed: …`).
    pub fn label(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "Liveness",
            ProbeKind::Readiness => "Readiness",
            ProbeKind::Startup => "Startup",
        }
    }
}

/// A verdict sent to the pod worker.
#[derive(Debug, Clone)]
pub struct ProbeVerdict {
    /// The container's name.
    pub container: String,
    /// The containerd ID of the instance probed.
    pub container_id: String,
    /// Which probe.
    pub kind: ProbeKind,
    /// The verdict after this attempt: `None` until a threshold was reached.
    pub verdict: Option<bool>,
    /// This attempt's failure, if it failed.
    pub error: Option<String>,
}

/// What a probe reaches.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// The pod's IP.
    pub pod_ip: Option<String>,
    /// containerd.
    pub runtime: Runtime,
    /// The containerd ID of the instance.
    pub container_id: String,
    /// The container's environment (for exec).
    pub env: Value,
    /// The container's named ports (for `port: name`).
    pub ports: Vec<(String, i32)>,
}

/// Why a probe failed, worded as upstream's prober words its output (what
/// the Unhealthy event shows, with [`skiff_common::error::chain`]).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A numeric port out of range.
    #[error("invalid port {port}")]
    InvalidPort {
        /// The port.
        port: i32,
    },
    /// A named port the container does not declare.
    #[error("no container port named {name:?}")]
    NoNamedPort {
        /// The name.
        name: String,
    },
    /// An exec probe's command exited non-zero.
    #[error("command {command:?} exited with {code}")]
    ExitCode {
        /// The command.
        command: Vec<String>,
        /// Its exit code.
        code: u32,
    },
    /// An exec probe's command could not run.
    #[error(transparent)]
    Exec(#[from] super::runtime::RuntimeError),
    /// A network probe of a pod without an address yet.
    #[error("the pod has no IP")]
    NoPodIp,
    /// A tcpSocket probe's connect failed.
    #[error("dial tcp {host}:{port}")]
    TcpDial {
        /// The host.
        host: String,
        /// The port.
        port: u16,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// An httpGet probe's connect failed.
    #[error("Get \"http://{host}:{port}{path}\": dial tcp")]
    HttpDial {
        /// The host.
        host: String,
        /// The port.
        port: u16,
        /// The path.
        path: String,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// Sending the request failed.
    #[error("write")]
    Write {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the answer failed.
    #[error("read")]
    Read {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not HTTP.
    #[error("not an HTTP answer: {line:?}")]
    NotHttp {
        /// Its first line.
        line: Option<String>,
    },
    /// An HTTP status outside 200–399.
    #[error("HTTP probe failed with statuscode: {code}")]
    Status {
        /// The status code.
        code: u16,
    },
    /// No exec, tcpSocket or httpGet.
    #[error("the probe has no handler")]
    NoHandler,
    /// No answer within `timeoutSeconds`.
    #[error("probe timed out after {seconds}s")]
    Timeout {
        /// The timeout.
        seconds: u64,
    },
}

fn port(target: &ProbeTarget, port: &IntOrString) -> Result<u16, ProbeError> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| ProbeError::InvalidPort { port: *p }),
        IntOrString::String(name) => target
            .ports
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, p)| u16::try_from(*p).ok())
            .ok_or_else(|| ProbeError::NoNamedPort { name: name.clone() }),
    }
}

/// Run a probe once: `Ok(())` when it passes, why not otherwise.
pub async fn run_once(probe: &Probe, target: &ProbeTarget) -> Result<(), ProbeError> {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let attempt = async {
        if let Some(exec) = &probe.exec {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let exec_id = format!("probe-{}", NEXT.fetch_add(1, Ordering::Relaxed));
            let args = exec.command.clone().unwrap_or_default();
            let process = super::spec::exec_process(&args, &target.env, &Value::String("/".into()));
            return match target
                .runtime
                .exec(&target.container_id, &exec_id, &process)
                .await
            {
                Ok(0) => Ok(()),
                Ok(code) => Err(ProbeError::ExitCode {
                    command: args,
                    code,
                }),
                Err(e) => Err(e.into()),
            };
        }
        let ip = target.pod_ip.clone().ok_or(ProbeError::NoPodIp)?;
        if let Some(tcp) = &probe.tcp_socket {
            let port = port(target, &tcp.port)?;
            let host = tcp.host.clone().unwrap_or(ip);
            return tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map(drop)
                .map_err(|source| ProbeError::TcpDial { host, port, source });
        }
        if let Some(http) = &probe.http_get {
            let port = port(target, &http.port)?;
            let host = http.host.clone().unwrap_or(ip);
            let path = http.path.clone().unwrap_or_else(|| "/".into());
            let mut stream = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|source| ProbeError::HttpDial {
                    host: host.clone(),
                    port,
                    path: path.clone(),
                    source,
                })?;
            let mut request = format!(
                "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\n"
            );
            for header in http.http_headers.iter().flatten() {
                request.push_str(&format!("{}: {}\r\n", header.name, header.value));
            }
            request.push_str("\r\n");
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|source| ProbeError::Write { source })?;
            let mut head = vec![0u8; 64];
            let n = stream
                .read(&mut head)
                .await
                .map_err(|source| ProbeError::Read { source })?;
            let line = String::from_utf8_lossy(&head[..n]).to_string();
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| ProbeError::NotHttp {
                    line: line.lines().next().map(str::to_string),
                })?;
            return if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(ProbeError::Status { code })
            };
        }
        Err(ProbeError::NoHandler)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout {
            seconds: timeout.as_secs(),
        }),
    }
}

/// Run `probe` until `cancel`, reporting verdict changes on `tx`. The first
/// verdict is sent once a threshold is reached. A startup probe stops after
/// its first success.
pub async fn probe_loop(
    container: String,
    kind: ProbeKind,
    probe: Probe,
    target: Arc<ProbeTarget>,
    tx: mpsc::UnboundedSender<ProbeVerdict>,
    cancel: CancellationToken,
) {
    let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
    let delay = Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64);
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = tokio::time::sleep(delay) => {}
    }
    let mut successes = 0;
    let mut failures = 0;
    let mut verdict: Option<bool> = None;
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = run_once(&probe, &target) => r,
        };
        match &result {
            Ok(()) => {
                successes += 1;
                failures = 0;
            }
            Err(_) => {
                failures += 1;
                successes = 0;
            }
        }
        let new = if successes >= success_threshold {
            Some(true)
        } else if failures >= failure_threshold {
            Some(false)
        } else {
            verdict
        };
        // Every failure is worth an Unhealthy event; the verdict goes out on change.
        if new != verdict || result.is_err() {
            let _ = tx.send(ProbeVerdict {
                container: container.clone(),
                container_id: target.container_id.clone(),
                kind,
                verdict: new,
                error: result.err().map(|e| skiff_common::error::chain(&e)),
            });
            verdict = new;
        }
        if kind == ProbeKind::Startup && verdict == Some(true) {
            return;
        }
        if kind == ProbeKind::Liveness && verdict == Some(false) {
            // The worker restarts the container; this instance is done.
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}
