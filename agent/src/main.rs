//! `skiff-agent`: see the library crate for everything it runs.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use skiff_agent::cli::Cli;
use skiff_agent::hollow;
use skiff_agent::kubelet::{self, PodNetworkHook, datapath::BpfHook};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    skiff_common::daemon::block_on(&cli.log.clone(), |shutdown| async move {
        let client = skiff_common::daemon::client(cli.kubeconfig.as_deref()).await?;
        if cli.hollow {
            hollow::run(client, cli.node, shutdown).await?;
            return Ok(());
        }
        let bpf = match (&cli.kubelet.node_name, cli.kubelet.bpf) {
            (Some(node), true) => Some(Arc::new(
                BpfHook::open(node, &cli.kubelet.services.limits).with_context(|| {
                    format!(
                        "cannot load the eBPF datapath for node {node} (--bpf=false runs without it)"
                    )
                })?,
            )),
            _ => None,
        };
        let datapath = bpf.as_ref().map(|b| b.datapath().clone());
        let hook = bpf.map(|b| b as Arc<dyn PodNetworkHook>);
        let client_ca = kubelet::server::client_ca(
            cli.kubeconfig.as_deref(),
            cli.kubelet.client_ca_file.as_deref(),
        )
        .await?;
        kubelet::run(
            client,
            cli.kubelet,
            cli.node,
            hook,
            datapath,
            client_ca,
            shutdown,
        )
        .await?;
        Ok(())
    })
}
