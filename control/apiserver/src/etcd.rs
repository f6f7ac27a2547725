//! The embedded default: an etcd child process under the API server's data
//! directory, started on loopback ports and restarted if it dies.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;

/// Errors starting the etcd child.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The data directory could not be prepared.
    #[error("cannot prepare etcd data directory {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No free loopback port could be found.
    #[error("cannot pick a free loopback port for etcd")]
    Port {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The `etcd` binary could not be started.
    #[error(
        "cannot start {binary} (install Debian's etcd-server, e.g. with cargo xtask setup): {source}"
    )]
    Spawn {
        /// The binary.
        binary: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// etcd did not start answering in time.
    #[error("etcd did not become ready within {seconds} s; see {log}")]
    NotReady {
        /// How long was waited.
        seconds: u64,
        /// Its log file.
        log: PathBuf,
    },
}

/// A supervised etcd child process.
pub struct EtcdChild {
    endpoint: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl EtcdChild {
    /// Start `binary` (usually `etcd`) with its data under `data_dir/etcd`,
    /// reusing the ports of the previous run when they are free, and wait
    /// until it answers.
    pub async fn start(binary: &str, data_dir: &Path) -> Result<EtcdChild, EtcdError> {
        let dir = data_dir.join("etcd");
        std::fs::create_dir_all(&dir).map_err(|source| EtcdError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let ports_file = data_dir.join("etcd.ports");
        let (client, peer) = ports(&ports_file)?;
        std::fs::write(&ports_file, format!("{client} {peer}\n")).map_err(|source| {
            EtcdError::DataDir {
                path: ports_file.clone(),
                source,
            }
        })?;
        let endpoint = format!("http://127.0.0.1:{client}");
        let log = data_dir.join("etcd.log");
        let spec = Spec {
            binary: binary.to_string(),
            dir,
            log: log.clone(),
            client,
            peer,
        };
        let child = spec.spawn()?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(supervise(spec, child, stopped));
        let etcd = EtcdChild {
            endpoint,
            stop,
            task,
        };
        etcd.wait_ready(&log).await?;
        Ok(etcd)
    }

    /// The client URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn wait_ready(&self, log: &Path) -> Result<(), EtcdError> {
        const SECONDS: u64 = 30;
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(SECONDS);
        while tokio::time::Instant::now() < deadline {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                let url = format!("{}/health", self.endpoint);
                if health(&url).await {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(EtcdError::NotReady {
            seconds: SECONDS,
            log: log.to_path_buf(),
        })
    }

    /// Stop etcd and wait for it to exit.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Whether etcd's `/health` answers healthy.
async fn health(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let Some((addr, path)) = rest.split_once('/') else {
        return false;
    };
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut body = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut body)).await;
    matches!(read, Ok(Ok(_))) && String::from_utf8_lossy(&body).contains("\"health\":\"true\"")
}

struct Spec {
    binary: String,
    dir: PathBuf,
    log: PathBuf,
    client: u16,
    peer: u16,
}

impl Spec {
    fn spawn(&self) -> Result<Child, EtcdError> {
        let client = format!("http://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| EtcdError::DataDir {
                path: self.log.clone(),
                source,
            })?;
        let log2 = log.try_clone().map_err(|source| EtcdError::DataDir {
            path: self.log.clone(),
            source,
        })?;
        Command::new(&self.binary)
            .arg("--name=skiff")
            .arg(format!("--data-dir={}", self.dir.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=skiff={peer}"))
            .arg("--auto-compaction-mode=periodic")
            .arg("--auto-compaction-retention=1h")
            .arg("--logger=zap")
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| EtcdError::Spawn {
                binary: self.binary.clone(),
                source,
            })
    }
}

async fn supervise(spec: Spec, mut child: Child, mut stopped: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        tokio::select! {
            _ = stopped.changed() => {
                terminate(&mut child).await;
                return;
            }
            status = child.wait() => {
                tracing::warn!(?status, log = %spec.log.display(), "etcd exited; restarting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                match spec.spawn() {
                    Ok(next) => child = next,
                    Err(error) => {
                        tracing::error!(error = %skiff_common::error::chain(&error), "cannot restart etcd");
                        return;
                    }
                }
            }
        }
    }
}

async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SIGTERM lets etcd close its database cleanly.
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

fn ports(file: &Path) -> Result<(u16, u16), EtcdError> {
    if let Ok(text) = std::fs::read_to_string(file) {
        let mut parts = text
            .split_whitespace()
            .filter_map(|p| p.parse::<u16>().ok());
        if let (Some(client), Some(peer)) = (parts.next(), parts.next())
            && free(client)
            && free(peer)
        {
            return Ok((client, peer));
        }
    }
    let a = pick()?;
    let b = pick()?;
    let (client, peer) = (port_of(&a)?, port_of(&b)?);
    Ok((client, peer))
}

fn free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A listener on a free port, held until both ports are known so the two
/// picks differ.
fn pick() -> Result<TcpListener, EtcdError> {
    TcpListener::bind("127.0.0.1:0").map_err(|source| EtcdError::Port { source })
}

fn port_of(listener: &TcpListener) -> Result<u16, EtcdError> {
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|source| EtcdError::Port { source })
}
