//! The API forwarder: the control plane listens on the fabric (10.90.0.1),
//! where the node agents reach it; kubectl on the host reaches it through
//! this small TCP proxy on 127.0.0.1.
//!
//! `skiffctl up` binds the host listener itself (so a busy port is a clear
//! error at once) and hands it to a detached `skiffctl forward` as its
//! standard input. The forwarder then enters the fabric namespace with its
//! only thread: the listener stays in the host namespace, while every
//! socket it opens afterwards (the upstream connections) belongs to the
//! fabric.

use std::net::SocketAddr;
use std::os::fd::AsFd;

use clap::Args;
use nix::sched::CloneFlags;

use super::SkiffctlError;
use super::fabric::netns_path;

/// Flags of the hidden `skiffctl forward` (its listener is its stdin).
#[derive(Debug, Clone, Args)]
pub struct ForwardArgs {
    /// The named network namespace the upstream lives in.
    #[arg(long)]
    pub netns: String,
    /// The upstream address inside that namespace.
    #[arg(long)]
    pub connect: SocketAddr,
}

/// Run the forwarder until killed.
pub fn run(args: &ForwardArgs) -> Result<(), SkiffctlError> {
    let _ = nix::unistd::setsid();
    let stdin = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| SkiffctlError::Io {
            what: "cannot take the listener from stdin",
            path: "/dev/stdin".into(),
            source,
        })?;
    let listener = std::net::TcpListener::from(stdin);
    listener
        .set_nonblocking(true)
        .map_err(|source| SkiffctlError::Io {
            what: "stdin is not a listening socket",
            path: "/dev/stdin".into(),
            source,
        })?;
    let path = netns_path(&args.netns);
    let ns = std::fs::File::open(&path).map_err(|source| SkiffctlError::Io {
        what: "cannot open the network namespace",
        path,
        source,
    })?;
    // Only thread so far: after this, new sockets belong to the fabric.
    nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
        SkiffctlError::Sys {
            what: format!("cannot enter network namespace {}", args.netns),
            source,
        }
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| SkiffctlError::Io {
            what: "cannot start the runtime",
            path: "/proc/self".into(),
            source,
        })?;
    let upstream = args.connect;
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(|source| SkiffctlError::Io {
                what: "cannot register the listener",
                path: "/dev/stdin".into(),
                source,
            })?;
        eprintln!("forwarding {:?} to {upstream}", listener.local_addr().ok());
        loop {
            let (mut inbound, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(error) => {
                    eprintln!("accept failed: {error}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let _ = inbound.set_nodelay(true);
                match tokio::net::TcpStream::connect(upstream).await {
                    Ok(mut outbound) => {
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    Err(error) => eprintln!("{peer}: cannot reach {upstream}: {error}"),
                }
            });
        }
    })
}
