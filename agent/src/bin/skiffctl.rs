//! `skiffctl`: see `skiff_agent::skiffctl` for everything it does.

use std::process::ExitCode;

use clap::Parser;
use skiff_agent::skiffctl::{Cli, run};

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The cause chain on one line, no backtrace: this is for operators.
            eprintln!("skiffctl: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
