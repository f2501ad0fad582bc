//! `rr-load`: see `rr-load --help` and the `rr_load` library.

use std::io::IsTerminal as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser as _};
use rr_load::cli::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match args.to_config(std::io::stderr().is_terminal()) {
        Ok(config) => config,
        // Same format and exit code (2) as clap's own usage errors.
        Err(e) => Args::command()
            .error(clap::error::ErrorKind::ValueValidation, e)
            .exit(),
    };
    match run(&args, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rr-load: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args, config: rr_load::Config) -> anyhow::Result<()> {
    let report = rr_load::run_blocking(config)?;
    let json = || serde_json::to_string_pretty(&report).context("serializing the report");
    match args.json.as_deref() {
        Some(path) if path == Path::new("-") => {
            eprint!("{}", report.to_table());
            println!("{}", json()?);
        }
        Some(path) => {
            print!("{}", report.to_table());
            std::fs::write(path, json()? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        None => print!("{}", report.to_table()),
    }
    Ok(())
}
