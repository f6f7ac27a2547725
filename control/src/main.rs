//! `skiff-control`: see the library crate for everything it runs.

use clap::Parser;
use skiff_control::cli::{Cli, Command};

/// mimalloc instead of glibc's malloc: the API server allocates and frees
/// many small JSON values per request, and glibc's allocator took about a
/// tenth of its CPU under load (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    skiff_common::daemon::block_on(&cli.log.clone(), |shutdown| async move {
        match cli.command {
            Command::Apiserver(args) => {
                skiff_apiserver::server::run_apiserver(args, shutdown).await?
            }
            Command::Scheduler(args) => skiff_scheduler::run_daemon(args, shutdown).await?,
            Command::ControllerManager(args) => {
                skiff_controller_manager::run_daemon(args, shutdown).await?
            }
            Command::Dns(args) => skiff_dns::run_daemon(args, shutdown).await?,
            Command::All(args) => skiff_control::all::run_all(args, shutdown).await?,
        }
        Ok(())
    })
}
