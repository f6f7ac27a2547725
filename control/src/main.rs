//! `skiff-control`: see the library crate for everything it runs.

use clap::Parser;
use skiff_control::cli::{Cli, Command};
use skiff_control::server;

/// mimalloc instead of glibc's malloc: the API server allocates and frees
/// many small JSON values per request, and glibc's allocator took about a
/// tenth of its CPU under load (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    server::init_tracing(&cli.log);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = server::shutdown_on_signal();
        match cli.command {
            Command::Apiserver(args) => server::run_apiserver(args, shutdown).await?,
            Command::Scheduler(args) => server::run_scheduler(args, shutdown).await?,
            Command::ControllerManager(args) => {
                server::run_controller_manager(args, shutdown).await?
            }
            Command::All(args) => server::run_all(args, shutdown).await?,
        }
        Ok(())
    })
}
