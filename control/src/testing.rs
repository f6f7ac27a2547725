//! What unit tests share: a real etcd child on 127.0.0.1.

use std::time::Duration;

use crate::storage::Store;

/// An etcd child process on free loopback ports, killed when dropped (also
/// on panic), with its data in a temporary directory.
pub struct Etcd {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    /// The client URL.
    pub endpoint: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

impl Etcd {
    /// Start Debian's etcd (`cargo xtask setup` installs it).
    pub fn start() -> Etcd {
        let binary = std::path::Path::new("/usr/bin/etcd");
        assert!(
            binary.exists(),
            "etcd is not installed at /usr/bin/etcd: run cargo xtask setup"
        );
        let dir = tempfile::tempdir().expect("tempdir for etcd");
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = std::process::Command::new(binary)
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log file"))
            .spawn()
            .expect("start etcd");
        Etcd {
            child,
            _dir: dir,
            endpoint,
        }
    }

    /// A store on this etcd, once it answers (within 10 s).
    pub async fn store(&self) -> Store {
        for _ in 0..100 {
            if let Ok(s) = Store::connect(std::slice::from_ref(&self.endpoint)).await
                && s.healthy().await
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("etcd at {} did not answer within 10s", self.endpoint);
    }
}
