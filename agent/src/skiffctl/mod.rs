//! `skiffctl`: a local multi-node cluster in one command, and node tools.
//!
//! - `skiffctl up --nodes N` builds a fabric of network namespaces (one per
//!   node, `skiff-<node-name>`, on a bridge in `skiff-fabric`, plus the
//!   outside client `skiff-ext`), starts the control plane (with its etcd)
//!   on the fabric, a 127.0.0.1 forwarder for kubectl, one containerd and
//!   one agent per node inside its namespace, waits until every node is
//!   Ready and routes the nodes' pod CIDRs between them ([`up`]).
//! - `skiffctl down` removes every process, namespace, link, mount and file
//!   the cluster made, from the state file and from what `/proc` shows
//!   ([`down`]).
//! - `skiffctl status` shows the nodes, processes and kubeconfig
//!   ([`status`]).
//! - `skiffctl bpf pods` shows the per-pod eBPF counters ([`bpf`]).
//!
//! Everything made is recorded in a state file ([`state`]) under the state
//! directory, which also holds every process's log.

pub mod bpf;
pub mod down;
pub mod fabric;
pub mod forward;
pub mod procs;
pub mod restart;
pub mod service;
pub mod state;
pub mod status;
pub mod up;

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/skiff/local";

/// `skiffctl`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "skiffctl",
    version,
    about = "skiff's operator tool: a local multi-node cluster in network namespaces"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `skiffctl`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a local cluster (or show the running one).
    Up(up::UpArgs),
    /// Stop the local cluster and remove everything it made.
    Down(ClusterArgs),
    /// Show the local cluster's nodes, processes and kubeconfig.
    Status(ClusterArgs),
    /// Show what the eBPF datapath holds (from its pins).
    Bpf(bpf::BpfArgs),
    /// Show how each node programmed the Services.
    Service(service::ServiceArgs),
    /// Run a command detached, inside a network namespace (internal).
    #[command(hide = true)]
    ExecIn(procs::ExecInArgs),
    /// Forward the host's API port into the fabric (internal).
    #[command(hide = true)]
    Forward(forward::ForwardArgs),
    /// Stop one node's agent and start it again as `up` did (for tests).
    #[command(hide = true)]
    RestartAgent(restart::RestartAgentArgs),
}

/// Flags naming a local cluster.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Where the cluster's state file, data and logs live.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// A name for the cluster, prefixing its node and namespace names
    /// (`<name>-node-1` in `skiff-<name>-node-1`), so several clusters can
    /// coexist; empty for the default names. `down` and `status` read it
    /// from the state file.
    #[arg(long, default_value = "", value_parser = parse_name)]
    pub name: String,
}

impl ClusterArgs {
    /// The state directory as an absolute path.
    pub fn state_dir(&self) -> PathBuf {
        absolute(&self.state_dir)
    }
}

fn parse_name(s: &str) -> Result<String, fabric::ClusterNameError> {
    fabric::validate_name(s).map(|()| s.to_string())
}

/// `path` made absolute against the current directory.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// What can go wrong in `skiffctl`.
#[derive(Debug, thiserror::Error)]
pub enum SkiffctlError {
    /// A file operation failed.
    #[error("{what}: {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A program could not be started.
    #[error("cannot run {command}")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A program failed.
    #[error("{command} failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The state file does not parse.
    #[error("state file {} is unreadable", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A system call failed.
    #[error("{what}")]
    Sys {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The API server could not be used.
    #[error("{what}")]
    Kube {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The cluster is not in the expected shape (a timeout, a dead process,
    /// a partial cluster); the message says what to do.
    #[error("{message}")]
    Cluster {
        /// What is wrong and what to do.
        message: String,
    },
}

impl SkiffctlError {
    fn cluster(message: impl Into<String>) -> SkiffctlError {
        SkiffctlError::Cluster {
            message: message.into(),
        }
    }
}

/// Run a parsed `skiffctl` command line (the binary's glue).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::ExecIn(args) => Err(procs::exec_in(&args).into()),
        Command::Forward(args) => Ok(forward::run(&args)?),
        Command::Up(args) => Ok(up::up(&args)?),
        Command::Down(args) => Ok(down::down(&args)?),
        Command::Status(args) => Ok(status::status(&args)?),
        Command::Bpf(args) => bpf::run(args),
        Command::Service(args) => service::run(args),
        Command::RestartAgent(args) => Ok(restart::restart_agent(&args)?),
    }
}

/// A small runtime for the API calls of `up` and `status`.
fn runtime() -> Result<tokio::runtime::Runtime, SkiffctlError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| SkiffctlError::Io {
            what: "cannot start the async runtime",
            path: PathBuf::from("/proc/self"),
            source,
        })
}

/// The last `n` lines of file `path` (for error messages pointing at logs).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subcommands_parse() {
        let cli = Cli::try_parse_from([
            "skiffctl",
            "up",
            "--nodes",
            "2",
            "--state-dir",
            "/tmp/x",
            "--name",
            "t1",
        ])
        .expect("up parses");
        let Command::Up(up) = cli.command else {
            panic!("expected up");
        };
        assert_eq!(up.nodes, 2);
        assert_eq!(up.cluster.name, "t1");
        assert_eq!(up.cluster.state_dir, PathBuf::from("/tmp/x"));
        assert!(!up.hollow);
        let cli = Cli::try_parse_from(["skiffctl", "down"]).expect("down parses");
        let Command::Down(down) = cli.command else {
            panic!("expected down");
        };
        assert_eq!(down.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(down.name, "");
        assert!(Cli::try_parse_from(["skiffctl", "down", "--name", "Bad/"]).is_err());
        let cli = Cli::try_parse_from([
            "skiffctl", "exec-in", "--netns", "n", "--", "prog", "--flag", "x",
        ])
        .expect("exec-in parses");
        let Command::ExecIn(exec) = cli.command else {
            panic!("expected exec-in");
        };
        assert_eq!(exec.command, ["prog", "--flag", "x"]);
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let path = std::env::temp_dir().join(format!("skiffctl-tail-{}", std::process::id()));
        std::fs::write(&path, "a\nb\nc\n").expect("write");
        assert_eq!(log_tail(&path, 2), "b\nc");
        assert_eq!(log_tail(&path, 10), "a\nb\nc");
        std::fs::remove_file(&path).expect("cleanup");
        assert_eq!(log_tail(&path, 2), "");
    }
}
