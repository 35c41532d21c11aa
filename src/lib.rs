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
mod dispositions;
pub mod domain;
pub mod error;
pub mod events;
mod guard;
pub mod interrupt;
pub mod outcome;
mod plan;
pub mod plan_file;
mod progress;
mod rehearse;
pub mod report;
pub mod resolver;
mod run;
pub mod support;
mod write;

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
        // roff's `.TH` line takes the version as one field: the rule line `--version` adds
        // would break it and render above NAME.
        Some(Command::Man) => clap_mangen::Man::new(Cli::command().version(VERSION))
            .render(&mut stdout)
            .context("could not write the man page to stdout"),
        Some(Command::Revert(args)) => {
            let config = RevertConfig::from_cli(&args)?;
            let stop = interrupt::StopSignal::from_os()?;
            let mut out = RunStdout::new(config.run.mode, &stop);
            let mut printer = report::printer(config.run.format, &mut out);
            audit::revert(&config, printer.as_mut(), stop).await?;
            Ok(())
        }
        Some(Command::History(args)) => {
            let config = HistoryConfig::from_cli(&args)?;
            audit::history(&config, &mut stdout).await
        }
        None => {
            let config = BackfillConfig::from_cli(&cli.backfill)?;
            let stop = interrupt::StopSignal::from_os()?;
            let mut out = RunStdout::new(config.run.mode, &stop);
            let mut printer = report::printer(config.run.format, &mut out);
            backfill::execute(&config, printer.as_mut(), stop).await?;
            Ok(())
        }
    }
}

/// stdout for a run. A reader that goes away (`| head`, a pager quit early) does not fail the
/// run: the rest of the log is dropped, a dry-run still ends with its plan's verdict, and an apply
/// stops as on SIGINT (no new write batch starts), because a tool that writes must not carry on
/// unwatched, nor stop without saying what it wrote (that is said on stderr).
struct RunStdout {
    out: std::io::Stdout,
    closed: bool,
    mode: domain::Mode,
    stop: interrupt::StopSignal,
}

impl RunStdout {
    fn new(mode: domain::Mode, stop: &interrupt::StopSignal) -> RunStdout {
        RunStdout {
            out: std::io::stdout(),
            closed: false,
            mode,
            stop: stop.clone(),
        }
    }

    fn closed(&mut self) {
        self.closed = true;
        match self.mode {
            domain::Mode::Apply => {
                tracing::warn!(
                    "stdout was closed: stopping as on SIGINT, no new write batch starts"
                );
                self.stop.raise(interrupt::SIGPIPE);
            }
            domain::Mode::DryRun => tracing::warn!(
                "stdout was closed: the rest of the run log is dropped; the exit code still \
                 gives the plan's verdict"
            ),
        }
    }

    fn guard<T>(&mut self, result: std::io::Result<T>, closed: T) -> std::io::Result<T> {
        match result {
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed();
                Ok(closed)
            }
            other => other,
        }
    }
}

impl Write for RunStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.closed {
            return Ok(buf.len());
        }
        let written = self.out.write(buf);
        self.guard(written, buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let flushed = self.out.flush();
        self.guard(flushed, ())
    }
}
