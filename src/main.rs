//! The `clawfleet` binary: parses the command line and runs a command.

use std::process::ExitCode;

use clap::Parser;

use clawfleet::cli::{self, Cli, Command};
use clawfleet::config::LogFormat;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
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
        Command::Run(args) => cli::run(&cli.global, cli.default_image.clone(), args).await?,
        Command::Migrate => cli::migrate(&cli.global).await?,
        Command::Users(command) => cli::users(&cli.global, command).await?,
        Command::Keygen(args) => cli::keygen(args)?,
        Command::Import(command) => cli::import(&cli.global, command).await?,
        Command::Doctor(args) => {
            let image = args.default_image.clone().or(cli.default_image.clone());
            cli::doctor(&cli.global, image, args.strict).await?
        }
        Command::Healthcheck => cli::healthcheck(&cli.global).await?,
    }
    Ok(())
}

/// Logs to stderr: `info` for the controller, `warn` for one-shot commands;
/// `RUST_LOG` overrides. The format is `--log-format`.
fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let default = match cli.command {
        Command::Run(_) => "info",
        _ => "warn",
    };
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // These crates log request and response bodies at debug level, and a
    // container create carries the gateway token: never below warn, whatever
    // RUST_LOG says.
    for directive in [
        "bollard=warn",
        "hyper=warn",
        "hyper_util=warn",
        "sqlx=warn",
        "sea_orm=warn",
    ] {
        if let Ok(d) = directive.parse() {
            filter = filter.add_directive(d);
        }
    }
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cli.global.log_format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
