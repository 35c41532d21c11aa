//! agent-type-backfill: repairs stale agent types in a registry's `member_profiles`.
//!
//! The binary is a thin shell over [`run`]. The rule lives in [`resolver`] (pure), every SQL
//! statement in [`db`], and one run's steps in [`backfill`].

pub mod audit;
pub mod backfill;
pub mod cli;
pub mod db;
pub mod ephemeral;
pub mod error;
pub mod interrupt;
pub mod plan_file;
pub mod rehearse;
pub mod report;
pub mod resolver;
pub mod seed;

use std::io::Write;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::{Cli, Command};
use crate::error::Failure;

pub async fn run(cli: Cli) -> Result<()> {
    let mut stdout = std::io::stdout();
    match cli.command {
        Some(Command::Rehearse(args)) => rehearse::rehearse(&args, &mut stdout).await,
        Some(Command::Completions { shell }) => {
            // clap_complete panics on a failed write; buffer so a closed pipe is an error instead.
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "agent-type-backfill",
                &mut script,
            );
            stdout
                .write_all(&script)
                .context("could not write the completions to stdout")
        }
        Some(Command::Man) => clap_mangen::Man::new(Cli::command())
            .render(&mut stdout)
            .context("could not write the man page to stdout"),
        Some(Command::Revert(args)) => {
            let url = database_url(&args.connect)?;
            let stop = interrupt::StopSignal::from_os()?;
            audit::revert(&args, url, &mut stdout, stop).await?;
            Ok(())
        }
        Some(Command::History(args)) => {
            audit::history(&args, database_url(&args.connect)?, &mut stdout).await
        }
        None => {
            let url = database_url(&cli.backfill.connect)?;
            let stop = interrupt::StopSignal::from_os()?;
            backfill::execute_with(&cli.backfill, url, &mut stdout, stop).await?;
            Ok(())
        }
    }
}

fn database_url(connect: &cli::ConnectOpts) -> Result<&str> {
    connect.database_url.as_deref().ok_or_else(|| {
        Failure::Usage("no database given: set DATABASE_URL or pass --database-url".to_owned())
            .into()
    })
}
