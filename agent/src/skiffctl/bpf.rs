//! `skiffctl bpf`: what the eBPF datapath holds, read from the pins in bpffs without loading
//! anything (so it works while agents run, and after they stopped).
//!
//! `skiffctl bpf pods [--node N] [-o table|json] [--bpffs PATH]` lists every pod whose host-side
//! veth carries skiff's counters. Columns: NODE NAMESPACE POD IP IFACE (the host-side veth),
//! then RX-PKTS RX-BYTES (received by the pod) and TX-PKTS TX-BYTES (sent by the pod); bytes
//! include the Ethernet header.
//!
//! `skiffctl bpf lb list [--node N] [-o table|json]` lists every frontend of the service maps
//! (address:port/protocol, type, namespace/name:port, the revision in force, the traffic policy)
//! with its backends (state active or terminating, local or not), as the programs see them.
//! `skiffctl bpf ct list [--node N] [-o table|json]` lists the conntrack entries of translated
//! connections (tuple, translation, frontend, age, expiry).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use crate::bpf::{DEFAULT_BPFFS, NodePodCounters, read_pinned_counters};

/// `skiffctl bpf`.
#[derive(Debug, Args)]
pub struct BpfArgs {
    /// What to show.
    #[command(subcommand)]
    pub command: BpfCommand,
}

/// The `skiffctl bpf` subcommands.
#[derive(Debug, Subcommand)]
pub enum BpfCommand {
    /// Per-pod packet and byte counters (RX: received by the pod, TX: sent by the pod).
    Pods(PodsArgs),
    /// The service load-balancing maps.
    Lb(MapsArgs),
    /// The conntrack table of translated connections.
    Ct(MapsArgs),
}

/// `skiffctl bpf lb` and `skiffctl bpf ct`.
#[derive(Debug, Args)]
pub struct MapsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: MapsCommand,
}

/// What `skiffctl bpf lb` and `ct` do.
#[derive(Debug, Subcommand)]
pub enum MapsCommand {
    /// List the entries.
    List(PodsArgs),
}

/// One node's frontend in `skiffctl bpf lb list -o json`.
#[derive(Serialize)]
struct NodeFrontend<'a> {
    node: &'a str,
    #[serde(flatten)]
    row: &'a crate::services::table::FrontendRow,
}

/// One node's conntrack entry in `skiffctl bpf ct list -o json`.
#[derive(Serialize)]
struct NodeCt<'a> {
    node: &'a str,
    #[serde(flatten)]
    row: &'a crate::services::conntrack::CtRow,
}

fn lb_maps_of(args: &PodsArgs) -> Result<Vec<(String, crate::bpf::lb::AyaLbMaps)>> {
    let layouts =
        crate::bpf::pins::node_layouts(&args.bpffs).context("cannot read the pinned eBPF maps")?;
    let mut all = Vec::new();
    for layout in layouts {
        if args.node.as_deref().is_some_and(|n| n != layout.node()) {
            continue;
        }
        let maps = crate::bpf::lb::AyaLbMaps::open(&layout.maps_dir())
            .with_context(|| format!("cannot open the service maps of node {}", layout.node()))?;
        all.push((layout.node().to_owned(), maps));
    }
    if let (Some(node), true) = (&args.node, all.is_empty()) {
        anyhow::bail!(
            "no service maps pinned for node {node} under {}",
            args.bpffs.display()
        );
    }
    Ok(all)
}

fn lb_list(args: &PodsArgs) -> Result<String> {
    let mut rows = Vec::new();
    for (node, maps) in lb_maps_of(args)? {
        let frontends = crate::services::table::list(&maps)
            .with_context(|| format!("cannot read the service maps of node {node}"))?;
        rows.extend(frontends.into_iter().map(|row| (node.clone(), row)));
    }
    if args.output == Output::Json {
        let json: Vec<NodeFrontend<'_>> = rows
            .iter()
            .map(|(node, row)| NodeFrontend { node, row })
            .collect();
        return Ok(serde_json::to_string_pretty(&json).context("cannot encode JSON")? + "\n");
    }
    let mut lines = vec![
        [
            "NODE", "FRONTEND", "TYPE", "SERVICE", "REV", "POLICY", "BACKENDS",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for (node, row) in &rows {
        let backends: Vec<String> = row
            .backends
            .iter()
            .map(|b| {
                format!(
                    "{} ({}{})",
                    b.address,
                    b.state,
                    if b.local { ", local" } else { "" }
                )
            })
            .collect();
        lines.push(vec![
            node.clone(),
            row.frontend.clone(),
            row.kind.to_owned(),
            row.service.clone(),
            row.revision.to_string(),
            row.policy.to_owned(),
            if backends.is_empty() {
                "(none)".to_owned()
            } else {
                backends.join(", ")
            },
        ]);
    }
    Ok(align(&lines))
}

fn ct_list(args: &PodsArgs) -> Result<String> {
    let now = crate::services::conntrack::monotonic_ns();
    let mut rows = Vec::new();
    for (node, maps) in lb_maps_of(args)? {
        let entries = crate::services::conntrack::list(&maps, now)
            .with_context(|| format!("cannot read the conntrack map of node {node}"))?;
        rows.extend(entries.into_iter().map(|row| (node.clone(), row)));
    }
    if args.output == Output::Json {
        let json: Vec<NodeCt<'_>> = rows
            .iter()
            .map(|(node, row)| NodeCt { node, row })
            .collect();
        return Ok(serde_json::to_string_pretty(&json).context("cannot encode JSON")? + "\n");
    }
    let mut lines = vec![
        [
            "NODE", "DIR", "PROTO", "TUPLE", "NAT", "FRONTEND", "AGE", "EXPIRES", "FLAGS",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for (node, row) in &rows {
        lines.push(vec![
            node.clone(),
            row.direction.to_owned(),
            row.protocol.to_owned(),
            row.tuple.clone(),
            row.nat.clone(),
            row.frontend.to_string(),
            format!("{}s", row.age_seconds),
            format!("{}s", row.expires_in_seconds),
            row.tcp_flags.clone(),
        ]);
    }
    Ok(align(&lines))
}

/// Rows of cells as aligned columns (three spaces apart, no trailing blanks).
pub fn align(lines: &[Vec<String>]) -> String {
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for line in lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in lines {
        let mut row = String::new();
        for (i, (cell, w)) in line.iter().zip(&widths).enumerate() {
            if i + 1 == line.len() {
                row.push_str(cell);
            } else {
                row.push_str(&format!("{cell:<w$}   ", w = *w));
            }
        }
        out.push_str(row.trim_end());
        out.push('\n');
    }
    out
}

/// `skiffctl bpf pods`.
#[derive(Debug, Args)]
pub struct PodsArgs {
    /// Only this node (default: every node with pins).
    #[arg(long)]
    pub node: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Where bpffs is mounted.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// A JSON array of pods.
    Json,
}

/// Runs `skiffctl bpf`.
pub fn run(args: BpfArgs) -> Result<()> {
    match args.command {
        BpfCommand::Pods(pods) => {
            let rows = read_pinned_counters(&pods.bpffs, pods.node.as_deref())
                .context("cannot read the pinned eBPF maps")?;
            let text = match pods.output {
                Output::Table => render_table(&rows),
                Output::Json => render_json(&rows)?,
            };
            print(&text)
        }
        BpfCommand::Lb(MapsArgs {
            command: MapsCommand::List(args),
        }) => print(&lb_list(&args)?),
        BpfCommand::Ct(MapsArgs {
            command: MapsCommand::List(args),
        }) => print(&ct_list(&args)?),
    }
}

fn print(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .context("cannot write to stdout")
}

/// One pod in `-o json`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonPod<'a> {
    node: &'a str,
    namespace: &'a str,
    pod: &'a str,
    uid: &'a str,
    ip: String,
    host_interface: &'a str,
    ifindex: u32,
    rx_packets: u64,
    rx_bytes: u64,
    tx_packets: u64,
    tx_bytes: u64,
}

/// The JSON array printed by `-o json` (one object per pod, newline-terminated).
pub fn render_json(rows: &[NodePodCounters]) -> Result<String> {
    let pods: Vec<JsonPod<'_>> = rows
        .iter()
        .map(|r| JsonPod {
            node: &r.node,
            namespace: &r.counters.pod.namespace,
            pod: &r.counters.pod.name,
            uid: &r.counters.pod.uid,
            ip: r.counters.pod.ip.to_string(),
            host_interface: &r.counters.host_ifname,
            ifindex: r.counters.ifindex,
            rx_packets: r.counters.rx.packets,
            rx_bytes: r.counters.rx.bytes,
            tx_packets: r.counters.tx.packets,
            tx_bytes: r.counters.tx.bytes,
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&pods).context("cannot encode JSON")?;
    text.push('\n');
    Ok(text)
}

/// The table printed by default (a header even when there are no pods).
pub fn render_table(rows: &[NodePodCounters]) -> String {
    let header = [
        "NODE",
        "NAMESPACE",
        "POD",
        "IP",
        "IFACE",
        "RX-PKTS",
        "RX-BYTES",
        "TX-PKTS",
        "TX-BYTES",
    ]
    .map(str::to_owned);
    let mut lines = vec![header];
    for r in rows {
        let c = &r.counters;
        lines.push([
            r.node.clone(),
            c.pod.namespace.clone(),
            c.pod.name.clone(),
            c.pod.ip.to_string(),
            c.host_ifname.clone(),
            c.rx.packets.to_string(),
            c.rx.bytes.to_string(),
            c.tx.packets.to_string(),
            c.tx.bytes.to_string(),
        ]);
    }
    let lines: Vec<Vec<String>> = lines.into_iter().map(|l| l.to_vec()).collect();
    align(&lines)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::bpf::{PodCounters, PodIdentity, Traffic};

    fn row() -> NodePodCounters {
        NodePodCounters {
            node: "node-1".into(),
            counters: PodCounters {
                pod: PodIdentity {
                    namespace: "default".into(),
                    name: "web-1".into(),
                    uid: "0b6f1f7e-0000-4000-8000-000000000001".into(),
                    ip: Ipv4Addr::new(10, 244, 1, 5),
                },
                host_ifname: "skf0123456789a".into(),
                ifindex: 12,
                rx: Traffic {
                    packets: 3,
                    bytes: 294,
                },
                tx: Traffic {
                    packets: 4,
                    bytes: 392,
                },
            },
        }
    }

    #[test]
    fn table_has_the_columns_and_aligns_them() {
        let text = render_table(&[row()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let header: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            [
                "NODE",
                "NAMESPACE",
                "POD",
                "IP",
                "IFACE",
                "RX-PKTS",
                "RX-BYTES",
                "TX-PKTS",
                "TX-BYTES"
            ]
        );
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "node-1",
                "default",
                "web-1",
                "10.244.1.5",
                "skf0123456789a",
                "3",
                "294",
                "4",
                "392"
            ]
        );
        assert_eq!(
            lines[0].find("IFACE"),
            lines[1].find("skf0123456789a"),
            "aligned"
        );
    }

    #[test]
    fn empty_table_is_just_the_header() {
        assert_eq!(render_table(&[]).lines().count(), 1);
    }

    #[test]
    fn json_names_each_field() {
        let v: serde_json::Value =
            serde_json::from_str(&render_json(&[row()]).expect("json")).expect("parse");
        let pod = &v[0];
        assert_eq!(pod["node"], "node-1");
        assert_eq!(pod["namespace"], "default");
        assert_eq!(pod["pod"], "web-1");
        assert_eq!(pod["ip"], "10.244.1.5");
        assert_eq!(pod["hostInterface"], "skf0123456789a");
        assert_eq!(pod["ifindex"], 12);
        assert_eq!(pod["rxPackets"], 3);
        assert_eq!(pod["rxBytes"], 294);
        assert_eq!(pod["txPackets"], 4);
        assert_eq!(pod["txBytes"], 392);
    }

    #[test]
    fn pods_parses_its_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bpf: BpfArgs,
        }
        let cli = Cli::try_parse_from(["x", "pods", "--node", "n1", "-o", "json", "--bpffs", "/b"])
            .expect("parse");
        let BpfCommand::Pods(p) = cli.bpf.command else {
            panic!("pods parses as pods");
        };
        assert_eq!(p.node.as_deref(), Some("n1"));
        assert_eq!(p.output, Output::Json);
        assert_eq!(p.bpffs, PathBuf::from("/b"));
        let cli = Cli::try_parse_from(["x", "pods"]).expect("parse");
        let BpfCommand::Pods(p) = cli.bpf.command else {
            panic!("pods parses as pods");
        };
        assert_eq!(p.output, Output::Table);
        assert_eq!(p.bpffs, PathBuf::from(DEFAULT_BPFFS));
        let cli =
            Cli::try_parse_from(["x", "lb", "list", "--node", "n2", "-o", "json"]).expect("parse");
        let BpfCommand::Lb(MapsArgs {
            command: MapsCommand::List(l),
        }) = cli.bpf.command
        else {
            panic!("lb list parses as lb list");
        };
        assert_eq!(l.node.as_deref(), Some("n2"));
        assert_eq!(l.output, Output::Json);
    }
}
