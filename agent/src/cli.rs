//! The `skiff-agent` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};

/// skiff's node agent.
#[derive(Debug, Parser)]
#[command(
    name = "skiff-agent",
    version,
    about = "skiff's node agent: a real node on containerd, or hollow nodes (--hollow)"
)]
pub struct Cli {
    /// Log filter, as RUST_LOG (e.g. `info`, `skiff_agent=debug`).
    #[arg(long, env = "SKIFF_LOG", default_value = "info")]
    pub log: String,
    /// The kubeconfig to reach the API server with; `$KUBECONFIG` or
    /// in-cluster config when absent.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Run hollow nodes: registered and heartbeating, their pods reported
    /// Running without containers.
    #[arg(long)]
    pub hollow: bool,
    /// The nodes' shape and timing.
    #[command(flatten)]
    pub node: NodeArgs,
    /// The real node mode (without `--hollow`): containerd, CNI, state dirs.
    #[command(flatten)]
    pub kubelet: crate::kubelet::KubeletArgs,
}

/// What the agent's nodes look like and how often they report.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// How many nodes this process runs.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Node names are this prefix followed by their index.
    #[arg(long, default_value = "hollow-")]
    pub name_prefix: String,
    /// The index of the first node (for several processes sharing a prefix).
    #[arg(long, default_value_t = 0)]
    pub first_index: u32,
    /// CPU capacity of each node (a Kubernetes quantity).
    #[arg(long, default_value = "4")]
    pub cpu: String,
    /// Memory capacity of each node (a Kubernetes quantity).
    #[arg(long, default_value = "16Gi")]
    pub memory: String,
    /// How many pods each node takes.
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// Extra node labels, `key=value`, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    pub node_labels: Vec<(String, String)>,
    /// How often each node renews its Lease in `kube-node-lease`.
    #[arg(long, value_parser = skiff_common::duration::parse_duration, default_value = "10s")]
    pub node_lease_renew_interval: Duration,
    /// How often each node posts its conditions when nothing changed.
    #[arg(long, value_parser = skiff_common::duration::parse_duration, default_value = "40s")]
    pub node_status_report_frequency: Duration,
    /// The Lease's `leaseDurationSeconds`.
    #[arg(long, default_value_t = 40)]
    pub node_lease_duration_seconds: i32,
    /// How many API writes the agent has in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
}

/// A `--node-labels` entry that is not `key=value`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// No `=`.
    #[error("expected key=value, got {text:?}")]
    Syntax {
        /// What was given.
        text: String,
    },
    /// `=value`.
    #[error("empty label key in {text:?}")]
    EmptyKey {
        /// What was given.
        text: String,
    },
}

/// Parse `key=value`.
pub fn parse_label(s: &str) -> Result<(String, String), LabelError> {
    let (key, value) = s.split_once('=').ok_or_else(|| LabelError::Syntax {
        text: s.to_string(),
    })?;
    if key.is_empty() {
        return Err(LabelError::EmptyKey {
            text: s.to_string(),
        });
    }
    Ok((key.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hollow_flags_parse() {
        let cli = Cli::try_parse_from([
            "skiff-agent",
            "--hollow",
            "--count",
            "3",
            "--kubeconfig",
            "/tmp/kc",
            "--memory",
            "8Gi",
            "--node-labels",
            "topology.kubernetes.io/zone=a,tier=x",
            "--node-lease-renew-interval",
            "500ms",
        ])
        .expect("parses");
        assert!(cli.hollow);
        assert_eq!(cli.node.count, 3);
        assert_eq!(cli.node.name_prefix, "hollow-");
        assert_eq!(cli.node.memory, "8Gi");
        assert_eq!(cli.node.cpu, "4");
        assert_eq!(cli.node.max_pods, 110);
        assert_eq!(cli.node.node_labels.len(), 2);
        assert_eq!(cli.node.node_labels[0].0, "topology.kubernetes.io/zone");
        assert_eq!(
            cli.node.node_lease_renew_interval,
            Duration::from_millis(500)
        );
        assert_eq!(
            cli.node.node_status_report_frequency,
            Duration::from_secs(40)
        );
    }

    #[test]
    fn real_node_flags_parse() {
        let cli = Cli::try_parse_from(["skiff-agent", "--node-name", "n1"]).expect("parses");
        assert!(!cli.hollow);
        assert_eq!(cli.kubelet.node_name.as_deref(), Some("n1"));
        assert!(cli.kubelet.bpf, "the datapath is on by default");
        assert_eq!(cli.kubelet.kubelet_port, 10250);
        assert_eq!(
            cli.kubelet.kubelet_address,
            "0.0.0.0".parse::<std::net::IpAddr>().expect("ip")
        );
        assert_eq!(cli.kubelet.client_ca_file, None);
        let cli = Cli::try_parse_from([
            "skiff-agent",
            "--node-name",
            "n1",
            "--bpf=false",
            "--kubelet-port",
            "10350",
            "--kubelet-address",
            "10.99.0.11",
            "--client-ca-file",
            "/etc/skiff/ca.crt",
        ])
        .expect("parses");
        assert!(!cli.kubelet.bpf);
        assert_eq!(cli.kubelet.kubelet_port, 10350);
        assert_eq!(
            cli.kubelet.kubelet_address,
            "10.99.0.11".parse::<std::net::IpAddr>().expect("ip")
        );
        assert_eq!(
            cli.kubelet.client_ca_file,
            Some(PathBuf::from("/etc/skiff/ca.crt"))
        );
    }

    #[test]
    fn labels_are_checked() {
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=v").is_err());
        assert_eq!(
            parse_label("a=").expect("empty value is fine"),
            ("a".into(), "".into())
        );
    }
}
