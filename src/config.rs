//! What a run was asked to do, built once from the command line. The clap structs in `cli.rs`
//! only parse; everything after `main` (the runs, the rehearsal, the tests) works from these.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::cli::{BackfillArgs, Cli, ConnectOpts, HistoryArgs, RevertArgs, RunOpts};
use crate::domain::{Format, Mode, Transition};
use crate::error::{Failure, Usage};
use crate::write::Pace;

/// Where to connect and how each statement is bounded.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    pub url: String,
    /// Stop right after connecting unless the database has this name.
    pub expect_database: Option<String>,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
}

impl ConnectConfig {
    fn from_cli(connect: &ConnectOpts) -> Result<ConnectConfig, Failure> {
        let url = connect
            .database_url
            .clone()
            .ok_or(Failure::Usage(Usage::NoDatabase))?;
        Ok(ConnectConfig {
            url,
            expect_database: connect.expect_database.clone(),
            lock_timeout: connect.lock_timeout,
            statement_timeout: connect.statement_timeout,
        })
    }
}

/// How a run that may write is bounded and printed; shared by the backfill and `revert`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub mode: Mode,
    pub format: Format,
    /// More flips than this in the plan: nothing is written.
    pub max_flips: usize,
    pub batch_size: usize,
    pub write_attempts: u32,
    /// `--max-replica-lag`: an apply waits before each batch while a standby is further behind.
    pub max_replica_lag: Option<Duration>,
}

impl RunConfig {
    fn from_cli(mode: Mode, run: &RunOpts) -> RunConfig {
        RunConfig {
            mode,
            format: run.format,
            max_flips: run.max_flips,
            batch_size: usize::try_from(run.batch_size).unwrap_or(usize::MAX),
            write_attempts: run.write_attempts,
            max_replica_lag: run.max_replica_lag,
        }
    }

    /// How the write goes through its batches.
    pub(crate) fn pace(&self) -> Pace {
        Pace {
            batch_size: self.batch_size,
            attempts: self.write_attempts,
            max_replica_lag: self.max_replica_lag,
        }
    }
}

/// The checks that hold a flip back even though the rule found it.
#[derive(Debug, Clone, Default)]
pub struct Guards {
    /// Only these transitions may be written; empty: any.
    pub allow_transitions: Vec<Transition>,
    /// A flip decided by an older snapshot is held.
    pub max_probe_age: Option<Duration>,
    /// A reclassification with fewer agreeing crawler rows is held.
    pub min_corroboration: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct BackfillConfig {
    pub connect: ConnectConfig,
    pub run: RunConfig,
    pub guards: Guards,
    /// With a dry-run: also write the plan here.
    pub plan_out: Option<PathBuf>,
    /// Write only the flips of this reviewed plan that still hold.
    pub reviewed_plan: Option<PathBuf>,
    pub plan_max_age: Duration,
    /// Profiles the plan reads per chunk (one short snapshot each).
    pub chunk_size: usize,
    /// Chunks the plan reads at once, on connections of their own.
    pub plan_jobs: usize,
    /// `--leave-held`: held flips of the reviewed plan are left unwritten, the rest written.
    pub leave_held: bool,
}

impl BackfillConfig {
    /// A run with every default the command line has, taken from the command line itself so
    /// that the two cannot drift apart.
    pub fn new(mode: Mode, url: impl Into<String>) -> BackfillConfig {
        let url = url.into();
        let flag = match mode {
            Mode::DryRun => "--dry-run",
            Mode::Apply => "--apply",
        };
        let cli = Cli::try_parse_from(["agent-type-backfill", flag, "--database-url", &url])
            .expect("the command line's defaults parse");
        BackfillConfig::from_cli(&cli.backfill).expect("a URL is given")
    }

    pub fn from_cli(args: &BackfillArgs) -> Result<BackfillConfig, Failure> {
        let mode = args.mode.mode();
        if args.leave_held && args.plan.is_none() {
            return Err(Failure::Usage(Usage::LeaveHeldWithoutPlan));
        }
        Ok(BackfillConfig {
            connect: ConnectConfig::from_cli(&args.connect)?,
            run: RunConfig::from_cli(mode, &args.run),
            guards: Guards {
                allow_transitions: args.allow_transition.clone(),
                max_probe_age: args.max_probe_age,
                min_corroboration: args.min_corroboration,
            },
            plan_out: args.plan_out.clone(),
            reviewed_plan: args.plan.clone(),
            plan_max_age: args.plan_max_age,
            chunk_size: usize::try_from(args.chunk_size).unwrap_or(usize::MAX),
            plan_jobs: usize::try_from(args.plan_jobs).unwrap_or(1),
            leave_held: args.leave_held,
        })
    }
}

#[derive(Debug, Clone)]
pub struct RevertConfig {
    /// The run to undo.
    pub reverted_run: String,
    pub connect: ConnectConfig,
    pub run: RunConfig,
}

impl RevertConfig {
    /// A revert with every default the command line has, taken from the command line itself.
    pub fn new(mode: Mode, url: impl Into<String>, reverted_run: impl Into<String>) -> Self {
        let (url, reverted_run) = (url.into(), reverted_run.into());
        let flag = match mode {
            Mode::DryRun => "--dry-run",
            Mode::Apply => "--apply",
        };
        let cli = Cli::try_parse_from([
            "agent-type-backfill",
            "revert",
            &reverted_run,
            flag,
            "--database-url",
            &url,
        ])
        .expect("the command line's defaults parse");
        match cli.command {
            Some(crate::cli::Command::Revert(args)) => {
                RevertConfig::from_cli(&args).expect("a URL is given")
            }
            _ => unreachable!("parsed as a revert"),
        }
    }

    pub fn from_cli(args: &RevertArgs) -> Result<RevertConfig, Failure> {
        Ok(RevertConfig {
            reverted_run: args.run_id.clone(),
            connect: ConnectConfig::from_cli(&args.connect)?,
            run: RunConfig::from_cli(args.mode.mode(), &args.run),
        })
    }
}

#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// One run's rows instead of the list of runs.
    pub run_id: Option<String>,
    pub connect: ConnectConfig,
    pub format: Format,
}

impl HistoryConfig {
    pub fn from_cli(args: &HistoryArgs) -> Result<HistoryConfig, Failure> {
        Ok(HistoryConfig {
            run_id: args.run_id.clone(),
            connect: ConnectConfig::from_cli(&args.connect)?,
            format: args.format,
        })
    }
}
