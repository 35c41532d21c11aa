//! agent-type-backfill: repairs stale agent types in a registry's `member_profiles`.
//!
//! The binary is a thin shell over [`run`]. The rule lives in [`resolver`] (pure), every SQL
//! statement in [`db`], one backfill's steps in [`backfill`], and everything the log prints in
//! [`events`], rendered by the printers in [`report`].

pub mod audit;
pub mod backfill;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod events;
mod guard;
pub mod interrupt;
mod plan;
pub mod plan_file;
mod progress;
mod rehearse;
pub mod report;
pub mod resolver;
mod run;
pub mod support;
mod write;

pub use plan::parse_column;

use std::io::Write;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::{Cli, Command};
use crate::config::{BackfillConfig, HistoryConfig, RevertConfig};

/// The version printed in run logs, plan files and audit notes, with the commit it was built
/// from.
pub const VERSION: &str = crate::cli::LONG_VERSION;

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
            let config = RevertConfig::from_cli(&args)?;
            let stop = interrupt::StopSignal::from_os()?;
            let mut printer = report::printer(config.run.format, &mut stdout);
            audit::revert(&config, printer.as_mut(), stop).await?;
            Ok(())
        }
        Some(Command::History(args)) => {
            let config = HistoryConfig::from_cli(&args)?;
            let mut printer = report::printer(config.format, &mut stdout);
            audit::history(&config, printer.as_mut()).await
        }
        None => {
            let config = BackfillConfig::from_cli(&cli.backfill)?;
            let stop = interrupt::StopSignal::from_os()?;
            let mut printer = report::printer(config.run.format, &mut stdout);
            backfill::execute(&config, printer.as_mut(), stop).await?;
            Ok(())
        }
    }
}
