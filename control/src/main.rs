//! `skiff-control`: see the library crate for everything it runs.

use clap::Parser;
use skiff_control::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    skiff_control::server::init_tracing(&cli.log);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = skiff_control::server::shutdown_on_signal();
        match cli.command {
            Command::Apiserver(args) | Command::All(args) => {
                skiff_control::server::run_apiserver(args, shutdown).await?;
            }
        }
        Ok(())
    })
}
