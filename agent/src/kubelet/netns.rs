//! Pod network namespaces: one per pod, kept alive by a bind mount of its
//! nsfs file at `<run-dir>/netns/<pod-uid>` (as `ip netns add` does under
//! /run/netns), so that runc joins it by path and CNI plugins get it as
//! `CNI_NETNS`.
//!
//! A namespace is made on a short-lived thread of its own: the thread
//! leaves the agent's network namespace with `unshare(CLONE_NEWNET)`, brings
//! the new namespace's loopback up (containers of a pod talk over
//! localhost), bind-mounts its own namespace file and exits; the agent's
//! other threads never change namespace.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

/// Errors creating or removing a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A file operation failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("cannot {what} for {path}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// Nothing listens on the port, on either loopback address.
    #[error("cannot connect to localhost:{port} {place}: IPv4: {ipv4}; IPv6: {ipv6}")]
    Connect {
        /// Where: `inside <namespace file>`, or `on the node`.
        place: String,
        /// The port.
        port: u16,
        /// Why 127.0.0.1 failed.
        #[source]
        ipv4: std::io::Error,
        /// Why ::1 failed.
        ipv6: std::io::Error,
    },
    /// Bringing loopback up failed.
    #[error("cannot bring lo up in {path}: {message}")]
    Loopback {
        /// The namespace file.
        path: PathBuf,
        /// What `ip` said.
        message: String,
    },
}

/// The namespace file of pod `uid` under `run_dir`.
pub fn netns_path(run_dir: &Path, uid: &str) -> PathBuf {
    run_dir.join("netns").join(uid)
}

/// Whether `path` is a mounted namespace file (not just a leftover file).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mount_point| mount_point == wanted)
}

/// Create a new network namespace mounted at `path` (a no-op when one is
/// mounted there already).
pub fn create(path: &Path) -> Result<(), NetnsError> {
    if is_mounted(path) {
        return Ok(());
    }
    let io = |what, source| NetnsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
    }
    std::fs::File::create(path).map_err(|e| io("create", e))?;
    let target = path.to_path_buf();
    let made = std::thread::spawn(move || -> Result<(), NetnsError> {
        let sys = |what, source| NetnsError::Sys {
            what,
            path: target.clone(),
            source,
        };
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| sys("unshare the network namespace", e))?;
        let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
        mount(
            Some(own.as_str()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| sys("bind-mount the namespace", e))?;
        // A child forked by this thread starts in this thread's namespace.
        let out = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .output()
            .map_err(|e| NetnsError::Loopback {
                path: target.clone(),
                message: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(NetnsError::Loopback {
                path: target.clone(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| {
        Err(NetnsError::Loopback {
            path: path.to_path_buf(),
            message: "the namespace thread panicked".into(),
        })
    });
    if made.is_err() {
        let _ = remove(path);
    }
    made
}

/// A TCP connection to `localhost:port` (127.0.0.1, else ::1) inside the
/// namespace at `path`, or in the caller's own with `None` (a host-network
/// pod), as `kubectl port-forward` reaches a pod. Blocking. A namespace is
/// joined by a short-lived thread of its own; the socket stays in that
/// namespace wherever it is used after.
pub fn connect(path: Option<&Path>, port: u16, timeout: Duration) -> Result<TcpStream, NetnsError> {
    let Some(path) = path else {
        return connect_loopback(port, timeout).map_err(|(ipv4, ipv6)| NetnsError::Connect {
            place: "on the node".into(),
            port,
            ipv4,
            ipv6,
        });
    };
    let target = path.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&target).map_err(|source| NetnsError::Io {
            what: "open",
            path: target.clone(),
            source,
        })?;
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Sys {
            what: "join the network namespace",
            path: target.clone(),
            source,
        })?;
        connect_loopback(port, timeout).map_err(|(ipv4, ipv6)| NetnsError::Connect {
            place: format!("inside {}", target.display()),
            port,
            ipv4,
            ipv6,
        })
    })
    .join()
    .unwrap_or_else(|_| {
        Err(NetnsError::Io {
            what: "connect inside",
            path: path.to_path_buf(),
            source: std::io::Error::other("the connecting thread panicked"),
        })
    })
}

/// 127.0.0.1:`port`, else [::1]:`port`, in the calling thread's namespace;
/// both errors when neither answers.
fn connect_loopback(
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, (std::io::Error, std::io::Error)> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let ipv4 = match TcpStream::connect_timeout(&v4, timeout) {
        Ok(stream) => return Ok(stream),
        Err(e) => e,
    };
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&v6, timeout).map_err(|ipv6| (ipv4, ipv6))
}

/// Unmount and remove a namespace file; nothing to do is fine.
pub fn remove(path: &Path) -> Result<(), NetnsError> {
    if is_mounted(path) {
        umount2(path, MntFlags::MNT_DETACH).map_err(|source| NetnsError::Sys {
            what: "unmount",
            path: path.to_path_buf(),
            source,
        })?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(NetnsError::Io {
            what: "remove",
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The pod uids that have a namespace file under `run_dir`.
pub fn list(run_dir: &Path) -> Vec<String> {
    std::fs::read_dir(run_dir.join("netns"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}
