//! The `skiff-control` command line: one subcommand per daemon, and `all`.

use clap::{Args, Parser, Subcommand};
pub use skiff_apiserver::cli::ApiserverArgs;

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
    Scheduler(skiff_scheduler::SchedulerArgs),
    /// The controller manager: ReplicaSets, Deployments, endpoints, nodes…
    ControllerManager(skiff_controller_manager::ControllerManagerArgs),
    /// The cluster DNS: Services, endpoints and pods by name, other names
    /// forwarded.
    Dns(skiff_dns::DnsArgs),
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
    pub controllers: skiff_controller_manager::ControllerOptions,
    /// The scheduler's configuration.
    #[command(flatten)]
    pub scheduler: skiff_scheduler::SchedulerOptions,
    /// Leader election (for several `all` replicas on one etcd).
    #[command(flatten)]
    pub election: skiff_common::leader::ElectionArgs,
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
}
