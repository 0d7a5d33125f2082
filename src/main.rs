//! The `clawfleet` binary: parses the command line and runs a command.

use std::process::ExitCode;

use clap::Parser;

use clawfleet::cli::{self, Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Every error's message already names its cause; no backtrace for operators.
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Run(_) => anyhow::bail!(
            "`clawfleet run` is not available yet: the reconciler lands with the next change; `migrate`, `users` and `keygen` work"
        ),
        Command::Migrate => cli::migrate(&cli.global).await?,
        Command::Users(command) => cli::users(&cli.global, command).await?,
        Command::Keygen(args) => cli::keygen(args)?,
    }
    Ok(())
}
