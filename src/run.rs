//! One run of any command that may write: its id, clock, session and log, what it found and the
//! fate of every flip, and the one place its ending is decided. The backfill and `revert` differ
//! only in how they plan and how a locked row is rechecked.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::{DateTime, Utc};
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::ConnectConfig;
use crate::db;
use crate::dispositions::{Census, Disposition, Dispositions};
use crate::domain::{Mode, SkipReason};
use crate::error::{exit_code, render, Failure, Usage};
use crate::events::{Event, Rule, Start, Summary};
use crate::interrupt::StopSignal;
use crate::outcome::{Ending, Outcome, Phase, Refusal, Stop};
use crate::plan::PlanningBackend;
use crate::report::Printer;
use crate::write::{write, Ledger, Pace, Recheck, WriteOutcome};
use crate::VERSION;

/// A run id that sorts by time and is easy to grep for in `type_reclassification_log`.
pub(crate) fn new_run_id(now: DateTime<Utc>) -> String {
    let random = Uuid::new_v4().simple().to_string();
    format!("atb-{}-{}", now.format("%Y%m%dT%H%M%SZ"), &random[..8])
}

/// The preflight of a command that may write: the tables and privileges `needs`, and for an
/// apply with `--max-replica-lag`, the right to read the standbys' lag.
pub(crate) async fn preflight(
    session: &db::Session,
    mode: Mode,
    needs: db::Needs,
    max_replica_lag: Option<Duration>,
) -> Result<()> {
    db::preflight(&session.pool, needs).await?;
    let (Mode::Apply, Some(bound)) = (mode, max_replica_lag) else {
        return Ok(());
    };
    let standbys = db::preflight_replica_lag(&session.pool).await?;
    let bound = crate::write::lag_text(bound);
    if standbys.is_empty() {
        warn!(
            "--max-replica-lag {bound}: no standby streams from this server now; one that \
             connects during the write is watched from the next batch on"
        );
    } else {
        let names: Vec<&str> = standbys.iter().map(|s| s.name.as_str()).collect();
        info!(
            "--max-replica-lag {bound}: watching standbys {}",
            names.join(", ")
        );
    }
    Ok(())
}

/// A signal (or a closed stdout) stopped the plan: the run ends interrupted, nothing written.
#[derive(Debug)]
struct PlanStopped(Stop);

impl std::fmt::Display for PlanStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by {} while planning", self.0.name())
    }
}

impl std::error::Error for PlanStopped {}

pub(crate) struct Run<'p> {
    pub(crate) mode: Mode,
    pub(crate) run_id: String,
    pub(crate) started_at: DateTime<Utc>,
    clock: Instant,
    pub(crate) session: db::Session,
    printer: &'p mut dyn Printer,
    pub(crate) stop: StopSignal,
    pub(crate) census: Census,
    /// Every flip the run found and what became of it: the log, the refusals and the summary
    /// read it.
    pub(crate) dispositions: Dispositions,
    /// `--max-flips`, as the header says it.
    max_flips: usize,
    /// Why the crawler's log cannot be read, said once in the header and once in the summary.
    crawler_log_unavailable: Option<String>,
    /// How a write that stopped early was interrupted.
    stopped: Option<Outcome>,
    /// `--leave-held`, for the log header.
    pub(crate) leave_held: bool,
}

/// How long closing the pool may take at the end of a run: on a dead link it would wait for the
/// connections' own timeouts, and the operator is owed the report first.
const CLOSE_LIMIT: Duration = Duration::from_secs(2);

impl<'p> Run<'p> {
    /// The first step of every command that may write: a run id, a connection that carries it as
    /// `application_name` with the operator's timeouts, and the `--expect-database` guard.
    pub(crate) async fn open(
        connect: &ConnectConfig,
        mode: Mode,
        printer: &'p mut dyn Printer,
        stop: StopSignal,
    ) -> Result<Run<'p>> {
        let clock = Instant::now();
        let started_at = Utc::now();
        let run_id = new_run_id(started_at);
        let session = open_session(connect, &format!("agent-type-backfill {run_id}")).await?;
        info!(target = %session.target, %run_id, "connected");
        Ok(Run {
            mode,
            run_id,
            started_at,
            clock,
            session,
            printer,
            stop,
            census: Census::default(),
            dispositions: Dispositions::default(),
            max_flips: 0,
            crawler_log_unavailable: None,
            stopped: None,
            leave_held: false,
        })
    }

    pub(crate) fn print(&mut self, event: Event) -> Result<()> {
        self.printer.print(&event)
    }

    /// The log header. `crawler_log` says why the crawler's evidence cannot be read, once for the
    /// whole run.
    pub(crate) fn header(
        &mut self,
        max_flips: usize,
        reverts: Option<&str>,
        crawler_log: Option<&str>,
    ) -> Result<()> {
        let start = Start {
            tool: "agent-type-backfill",
            version: VERSION,
            mode: self.mode,
            target: self.session.target.clone(),
            started_at: self.started_at,
            run_id: self.run_id.clone(),
            max_flips,
            reverts: reverts.map(str::to_owned),
            crawler_log_unavailable: crawler_log.map(str::to_owned),
            rule: Rule::ported(),
            leave_held: self.leave_held,
        };
        self.crawler_log_unavailable = crawler_log.map(str::to_owned);
        self.max_flips = max_flips;
        self.print(Event::Start(start))
    }

    /// Takes the plan's `dispositions` as the run's and lists them.
    pub(crate) fn list_plan(&mut self, dispositions: Dispositions) -> Result<()> {
        self.dispositions = dispositions;
        for event in self.dispositions.plan_lines(self.started_at) {
            self.printer.print(&event)?;
        }
        Ok(())
    }

    /// The limits and guards that refuse the plan; the run writes nothing when any does.
    fn refusals(&self) -> Vec<Refusal> {
        crate::guard::refusals(&self.dispositions, self.max_flips)
    }

    /// Plans, unless a signal (or a closed stdout) comes first: then the planning statement is
    /// cancelled on the server, the log says the plan was interrupted, and the run ends with
    /// nothing written.
    pub(crate) async fn plan<T>(
        &mut self,
        planning: impl Future<Output = Result<T>>,
        backend: &PlanningBackend,
    ) -> Result<T> {
        self.stop.enter(Phase::Plan);
        let mut stop = self.stop.clone();
        tokio::select! {
            planned = planning => planned,
            signal = stop.wait() => {
                backend.cancel(&self.session.pool).await;
                let stop = Stop::from_number(signal);
                self.print(Event::Interrupted {
                    signal: stop.name(),
                    during: "plan",
                    duration_ms: self.elapsed_ms(),
                })?;
                Err(PlanStopped(stop).into())
            }
        }
    }

    fn elapsed_ms(&self) -> u64 {
        crate::domain::millis(self.clock.elapsed())
    }

    /// Writes the flips to write: only in an apply that nothing refused. A second signal
    /// abandons the batch in flight; the flips of the batches that had committed are still
    /// marked written, as they are when the write fails.
    pub(crate) async fn write(&mut self, pace: Pace, recheck: &dyn Recheck) -> Result<()> {
        if !self.refusals().is_empty() || self.mode != Mode::Apply {
            return Ok(());
        }
        let flips = self.dispositions.to_write();
        if flips.is_empty() {
            return Ok(());
        }
        self.stop.enter(Phase::Write);
        // Outside the write, so that an abandoned write still says what it committed.
        let ledger = Ledger::default();
        let mut twice = self.stop.clone();
        let written = tokio::select! {
            written = write(
                &self.session.pool,
                &flips,
                pace,
                recheck,
                &self.run_id,
                &self.stop,
                &ledger,
            ) => Some(written),
            () = twice.wait_twice() => None,
        };
        self.dispositions.mark_written(&ledger.committed());
        let (stop, twice) = match written {
            Some(written) => {
                let WriteOutcome {
                    unwritten,
                    interrupted_by,
                } = written?;
                self.dispositions
                    .mark_not_written(&unwritten.planned, unwritten.unplanned);
                match interrupted_by {
                    Some(number) => (Stop::from_number(number), false),
                    None => return Ok(()),
                }
            }
            None => {
                let stop = self
                    .stop
                    .stop()
                    .unwrap_or(Stop::Signal(crate::outcome::SIGINT));
                (stop, true)
            }
        };
        self.stopped = Some(Outcome::Interrupted {
            stop,
            during: Phase::Write,
            twice,
            at_commit: twice && ledger.at_commit(),
        });
        Ok(())
    }

    /// The last step of every run: how it ended, decided once from what happened, then the
    /// skipped lines and the summary in every format. `steps` is what the run's steps after the
    /// header came to.
    pub(crate) async fn conclude(mut self, steps: Result<()>) -> Result<Summary> {
        let refusals = self.refusals();
        let timed_out = self.dispositions.count(|disposition| {
            *disposition == Disposition::NotWritten(SkipReason::NotWrittenTimeout)
        });
        let (outcome, error) = match steps {
            Err(error) => match error.downcast_ref::<PlanStopped>() {
                Some(PlanStopped(stop)) => (
                    Outcome::Interrupted {
                        stop: *stop,
                        during: Phase::Plan,
                        twice: false,
                        at_commit: false,
                    },
                    None,
                ),
                None => (
                    Outcome::Failed {
                        error: render(&error),
                        code: exit_code(&error),
                    },
                    Some(error),
                ),
            },
            Ok(()) if !refusals.is_empty() => (Outcome::Refused(refusals), None),
            Ok(()) => match self.stopped.take() {
                Some(interrupted) => (interrupted, None),
                None if timed_out > 0 => (
                    Outcome::TimedOut {
                        not_written: timed_out,
                    },
                    None,
                ),
                None => (Outcome::Completed, None),
            },
        };
        let ending = Ending {
            outcome,
            mode: self.mode,
            to_write: self.dispositions.count(Disposition::set_out),
            written: self
                .dispositions
                .count(|disposition| *disposition == Disposition::Written),
            run_id: self.run_id.clone(),
        };

        for event in self.dispositions.write_lines(self.started_at) {
            self.printer.print(&event)?;
        }
        let summary = self.dispositions.summary(
            &self.census,
            &ending,
            self.elapsed_ms(),
            self.crawler_log_unavailable.clone(),
        );
        self.print(Event::Summary(summary.clone()))?;
        if tokio::time::timeout(CLOSE_LIMIT, self.session.pool.close())
            .await
            .is_err()
        {
            info!("the pool did not close within {CLOSE_LIMIT:?}; leaving it to the server");
        }

        match ending.outcome {
            Outcome::Completed => Ok(summary),
            // The error stays inspectable by a library caller; the process prints the ending.
            Outcome::Failed { .. } => Err(error
                .unwrap_or_else(|| anyhow::anyhow!("the run failed"))
                .context(Failure::Ended(Box::new(ending)))),
            _ => Err(Failure::Ended(Box::new(ending)).into()),
        }
    }
}

/// A session for the tool: a first connection checked with the operator's timeouts, then the
/// pool, and the `--expect-database` guard. `history` uses it too, without a run.
pub(crate) async fn open_session(
    connect: &ConnectConfig,
    application_name: &str,
) -> Result<db::Session> {
    let settings = db::SessionSettings {
        application_name: application_name.to_owned(),
        lock_timeout: connect.lock_timeout,
        statement_timeout: connect.statement_timeout,
    };
    let session = db::connect(&connect.url, &settings).await?;
    if let Some(expected) = &connect.expect_database {
        if *expected != session.target.database {
            return Err(Failure::Usage(Usage::WrongDatabase {
                connected: session.target.database.clone(),
                expected: expected.clone(),
            })
            .into());
        }
    }
    Ok(session)
}
