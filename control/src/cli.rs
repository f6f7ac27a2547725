//! The `skiff-control` command line: one subcommand per daemon, and `all`.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// skiff's control plane.
#[derive(Debug, Parser)]
#[command(
    name = "skiff-control",
    version,
    about = "skiff's control plane: a Kubernetes-compatible API server on etcd"
)]
pub struct Cli {
    /// Log filter, as RUST_LOG (e.g. `info`, `skiff_control=debug`).
    #[arg(long, global = true, env = "SKIFF_LOG", default_value = "info")]
    pub log: String,
    /// The daemon to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The daemons.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The API server: Kubernetes REST over etcd.
    Apiserver(ApiserverArgs),
    /// The scheduler: binds unscheduled pods to nodes.
    Scheduler(crate::scheduler::SchedulerArgs),
    /// The controller manager: ReplicaSets, Deployments, endpoints, nodes…
    ControllerManager(crate::controllers::ControllerManagerArgs),
    /// The API server, the controller manager and the scheduler in one
    /// process (the two talk to the API server over loopback HTTPS).
    All(AllArgs),
}

/// Flags of `skiff-control all`.
#[derive(Debug, Clone, Args)]
pub struct AllArgs {
    /// The API server's flags.
    #[command(flatten)]
    pub apiserver: ApiserverArgs,
    /// The controllers' configuration.
    #[command(flatten)]
    pub controllers: crate::controllers::ControllerOptions,
    /// The scheduler's configuration.
    #[command(flatten)]
    pub scheduler: crate::scheduler::SchedulerOptions,
    /// Take part in leader election (for several `all` replicas on one etcd).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Election timing.
    #[command(flatten)]
    pub timing: crate::leader::ElectionTiming,
}

/// Flags of the API server.
#[derive(Debug, Clone, Args)]
pub struct ApiserverArgs {
    /// Where the API server keeps its certificates and, with no
    /// `--etcd-servers`, its own etcd's data.
    #[arg(long, default_value = "/var/lib/skiff/control")]
    pub data_dir: PathBuf,
    /// The address to serve HTTPS on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_address: IpAddr,
    /// The address published in the `default/kubernetes` endpoints: the
    /// bind address, or 127.0.0.1 when binding every address.
    #[arg(long)]
    pub advertise_address: Option<IpAddr>,
    /// The HTTPS port (0 picks a free one).
    #[arg(long, default_value_t = 6443)]
    pub secure_port: u16,
    /// External etcd client URLs, comma-separated; without them the API
    /// server runs its own etcd child under `--data-dir`.
    #[arg(long, value_delimiter = ',')]
    pub etcd_servers: Vec<String>,
    /// The etcd binary used for the embedded default.
    #[arg(long, default_value = "etcd")]
    pub etcd_binary: String,
    /// The range ClusterIPs are allocated from.
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cluster_ip_range: ipnetwork::IpNetwork,
    /// The range NodePorts are allocated from, `first-last`.
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    pub service_node_port_range: std::ops::RangeInclusive<u16>,
    /// Write an admin kubeconfig (client certificate) to this path.
    #[arg(long)]
    pub write_kubeconfig: Option<PathBuf>,
    /// Static bearer tokens, upstream's CSV format `token,user,uid,"group1,group2"`.
    #[arg(long)]
    pub token_auth_file: Option<PathBuf>,
    /// Extra names and addresses for the serving certificate.
    #[arg(long, value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// The key service-account tokens are verified with (a public key, or
    /// a private key whose public half is used); default
    /// `<data-dir>/pki/sa.pub`, generated with `sa.key` when missing.
    #[arg(long)]
    pub service_account_key_file: Option<PathBuf>,
    /// How long events are kept after their last write (etcd deletes them
    /// then); 0 keeps them.
    #[arg(long, value_parser = crate::leader::parse_seconds, default_value = "1h0m0s")]
    pub event_ttl: std::time::Duration,
}

/// Parse `first-last` into a port range.
pub fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (first, last) = s
        .split_once('-')
        .ok_or_else(|| format!("expected first-last, got {s:?}"))?;
    let first: u16 = first
        .trim()
        .parse()
        .map_err(|e| format!("bad port {first:?}: {e}"))?;
    let last: u16 = last
        .trim()
        .parse()
        .map_err(|e| format!("bad port {last:?}: {e}"))?;
    if first > last || first == 0 {
        return Err(format!("empty or invalid port range {s:?}"));
    }
    Ok(first..=last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_upstream_defaults() {
        let cli = Cli::try_parse_from([
            "skiff-control",
            "apiserver",
            "--etcd-servers",
            "http://a:2379,http://b:2379",
        ])
        .expect("parses");
        let Command::Apiserver(args) = cli.command else {
            panic!("expected apiserver");
        };
        assert_eq!(args.etcd_servers, ["http://a:2379", "http://b:2379"]);
        assert_eq!(args.service_node_port_range, 30000..=32767);
        assert_eq!(args.service_cluster_ip_range.to_string(), "10.96.0.0/12");
        assert_eq!(args.secure_port, 6443);
        assert_eq!(args.event_ttl, std::time::Duration::from_secs(3600));
    }

    #[test]
    fn port_ranges_are_checked() {
        assert!(parse_port_range("32767-30000").is_err());
        assert!(parse_port_range("30000").is_err());
        assert_eq!(parse_port_range("1-2"), Ok(1..=2));
    }
}
