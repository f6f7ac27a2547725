//! The API server's flags (`skiff-control apiserver`, and its part of
//! `skiff-control all`), upstream's kube-apiserver flags of the same names.

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use clap::Args;

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
    pub service_node_port_range: RangeInclusive<u16>,
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
    /// The private key the `serviceaccounts/token` subresource (TokenRequest) signs tokens
    /// with; default `<data-dir>/pki/sa.key` when `--service-account-key-file` is not given
    /// (then TokenRequest is refused without this flag).
    #[arg(long)]
    pub service_account_signing_key_file: Option<PathBuf>,
    /// How long events are kept after their last write (etcd deletes them
    /// then); 0 keeps them.
    #[arg(long, value_parser = skiff_common::duration::parse_duration, default_value = "1h0m0s")]
    pub event_ttl: std::time::Duration,
}

/// A `--service-node-port-range` that is not a range of ports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    /// Not `first-last`.
    #[error("expected first-last, got {text:?}")]
    Syntax {
        /// What was given.
        text: String,
    },
    /// One end is not a port number.
    #[error("bad port {text:?}")]
    Port {
        /// The end.
        text: String,
        /// Why it does not parse.
        #[source]
        source: std::num::ParseIntError,
    },
    /// `first` after `last`, or port 0.
    #[error("empty or invalid port range {text:?}")]
    Empty {
        /// What was given.
        text: String,
    },
}

/// Parse `first-last` into a port range.
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, PortRangeError> {
    let (first, last) = s.split_once('-').ok_or_else(|| PortRangeError::Syntax {
        text: s.to_string(),
    })?;
    let port = |text: &str| {
        text.trim()
            .parse::<u16>()
            .map_err(|source| PortRangeError::Port {
                text: text.to_string(),
                source,
            })
    };
    let (first, last) = (port(first)?, port(last)?);
    if first > last || first == 0 {
        return Err(PortRangeError::Empty {
            text: s.to_string(),
        });
    }
    Ok(first..=last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_are_checked() {
        assert!(parse_port_range("32767-30000").is_err());
        assert!(parse_port_range("30000").is_err());
        assert_eq!(parse_port_range("1-2"), Ok(1..=2));
    }
}
