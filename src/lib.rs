//! agent-type-backfill: repairs stale agent types in a registry's `member_profiles`.
//!
//! The binary is a thin shell over [`run`]. The rule lives in [`resolver`] (pure), every SQL
//! statement in [`db`], and one run's steps in [`backfill`].

pub mod backfill;
pub mod cli;
pub mod db;
pub mod ephemeral;
pub mod error;
pub mod interrupt;
pub mod rehearse;
pub mod report;
pub mod resolver;
pub mod seed;

use anyhow::Result;

use crate::cli::{Cli, Command};
use crate::error::Failure;

pub async fn run(cli: Cli) -> Result<()> {
    let mut stdout = std::io::stdout();
    match cli.command {
        Some(Command::Rehearse(args)) => rehearse::rehearse(&args, &mut stdout).await,
        None => {
            let url = cli
                .backfill
                .connect
                .database_url
                .as_deref()
                .ok_or_else(|| {
                    Failure::Usage(
                        "no database given: set DATABASE_URL or pass --database-url".to_owned(),
                    )
                })?;
            let stop = interrupt::StopSignal::from_os()?;
            backfill::execute_with(&cli.backfill, url, &mut stdout, stop).await?;
            Ok(())
        }
    }
}
