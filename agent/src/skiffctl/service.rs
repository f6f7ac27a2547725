//! `skiffctl service list [-o table|json] [--run-root DIR]`: each Service port's frontends and
//! its programming status on each node (programmed at revision R, or the error), as the agents
//! report it in `<run-root>/<node>/services.json`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::bpf::{Output, align};
use crate::services::{PortStatus, read_status};

/// `skiffctl service`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ServiceCommand,
}

/// The `skiffctl service` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Each Service port's frontends and programming status per node.
    List(ListArgs),
}

/// `skiffctl service list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The agents' run directories' parent (`/run/skiff/<node>` by default).
    #[arg(long, default_value = "/run/skiff")]
    pub run_root: PathBuf,
}

/// The table (a header even when there is nothing).
pub fn render_table(rows: &[PortStatus]) -> String {
    let mut lines = vec![
        ["SERVICE", "NODE", "STATUS", "FRONTENDS"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for row in rows {
        let status = match (&row.error, row.revision) {
            (Some(error), Some(rev)) => format!("error (revision {rev} in force): {error}"),
            (Some(error), None) => format!("error: {error}"),
            (None, Some(rev)) => format!("programmed at revision {rev}"),
            (None, None) => "pending".to_owned(),
        };
        lines.push(vec![
            row.service.clone(),
            row.node.clone(),
            status,
            row.frontends.join(", "),
        ]);
    }
    align(&lines)
}

/// Runs `skiffctl service`.
pub fn run(args: ServiceArgs) -> Result<()> {
    let ServiceCommand::List(list) = args.command;
    let rows = read_status(&list.run_root);
    let text = match list.output {
        Output::Table => render_table(&rows),
        Output::Json => serde_json::to_string_pretty(&rows).context("cannot encode JSON")? + "\n",
    };
    print!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_per_node() {
        let rows = [
            PortStatus {
                service: "default/web:http".into(),
                node: "skiff-node-1".into(),
                revision: Some(3),
                error: None,
                frontends: vec!["10.96.0.20:80/TCP".into(), "0.0.0.0:30080/TCP".into()],
            },
            PortStatus {
                service: "default/web:http".into(),
                node: "skiff-node-2".into(),
                revision: None,
                error: Some("map SKF_LBSLOT_V1: cannot write an entry (is it full?)".into()),
                frontends: vec!["10.96.0.20:80/TCP".into()],
            },
        ];
        let text = render_table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SERVICE"), "{text}");
        assert!(lines[1].contains("programmed at revision 3"), "{text}");
        assert!(
            lines[1].ends_with("10.96.0.20:80/TCP, 0.0.0.0:30080/TCP"),
            "{text}"
        );
        assert!(lines[2].contains("error: map SKF_LBSLOT_V1"), "{text}");
    }
}
