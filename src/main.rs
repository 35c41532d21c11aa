use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use agent_type_backfill::cli::Cli;
use agent_type_backfill::db::redact;
use agent_type_backfill::error::{exit_code, is_broken_pipe, render};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every command that connects takes a URL; a panic message must not become the one place
    // its password leaks.
    let database_url = cli.database_url().unwrap_or_default().to_owned();
    std::panic::set_hook(Box::new(move |info| {
        eprintln!(
            "error: internal error, please report it: {}",
            redact(&info.to_string(), &database_url)
        );
    }));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            EnvFilter::new(
                // sqlx reads the password file too, by its own rules, and warns about it;
                // the tool reads it as libpq does and gives libpq's one warning itself.
                "agent_type_backfill=info,sqlx=warn,sqlx_postgres::options::pgpass=off",
            )
        }))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: could not start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(agent_type_backfill::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", render(&error));
            ExitCode::from(u8::try_from(exit_code(&error)).unwrap_or(1))
        }
    }
}
