//! `skiff-agent`: see the library crate for everything it runs.

use clap::Parser;
use skiff_agent::cli::Cli;
use skiff_agent::{daemon, hollow};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    daemon::init_tracing(&cli.log);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = daemon::shutdown_on_signal();
        if !cli.hollow {
            anyhow::bail!("only hollow nodes are implemented yet: pass --hollow");
        }
        let client = daemon::client(cli.kubeconfig.as_deref()).await?;
        hollow::run(client, cli.node, shutdown).await?;
        Ok(())
    })
}
