//! One run of any command that may write: its id, clock, session and log, the fate of every flip
//! it found, and the one place its ending is decided. The backfill and `revert` differ only in
//! how they plan and how a locked row is rechecked.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::{DateTime, Utc};
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::ConnectConfig;
use crate::db;
use crate::domain::{count, Mode, SkipReason};
use crate::error::{exit_code, render, Failure};
use crate::events::{Event, Rule, Skipped, Start, Summary};
use crate::guard::HeldFlip;
use crate::interrupt::StopSignal;
use crate::outcome::{Ending, Outcome, Phase, Refusal, Stop};
use crate::plan::{in_log_order, PlannedFlip, PlanningBackend};
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

/// What the plan says of the registry as a whole, beside its flips.
#[derive(Debug, Clone, Default)]
pub(crate) struct Census {
    /// The plan finished: the counts below mean something.
    pub(crate) complete: bool,
    pub(crate) profiles_scanned: u64,
    pub(crate) malformed: u64,
    pub(crate) junk_elements: u64,
    pub(crate) unrecognised_inferred_types: std::collections::BTreeMap<String, u64>,
}

/// The fate of every flip a run found, each flip in exactly one place. The log, the exit code and
/// the summary are all read from here; [`Dispositions::summary`] is the one place a run's
/// numbers are counted.
#[derive(Debug, Default)]
pub(crate) struct Dispositions {
    /// Flips nothing holds back: written by an apply that nothing refused.
    pub(crate) to_write: Vec<PlannedFlip>,
    /// Flips a guard holds back: never written.
    pub(crate) held: Vec<HeldFlip>,
    /// How many of `to_write` `--allow-transition` does not list (the run is refused).
    pub(crate) not_allowed: u64,
    /// Found or planned, and left before the write, with why (a reviewed plan's departures, a
    /// revert's conflicts): listed with the plan.
    pub(crate) departed: Vec<(PlannedFlip, SkipReason)>,
    /// Planned and not written by the write itself, with why (the locked recheck, timeouts):
    /// listed after the write.
    pub(crate) not_written: Vec<(PlannedFlip, SkipReason)>,
    /// Flips written, as the batches that committed counted them.
    pub(crate) written: u64,
}

impl Dispositions {
    /// Every count of the run's summary, from the fates above.
    fn summary(&self, census: &Census, ending: &Ending) -> Summary {
        let found: Vec<&PlannedFlip> = self
            .to_write
            .iter()
            .chain(self.held.iter().map(|held| &held.planned))
            .collect();
        let mut summary = Summary {
            plan_complete: census.complete,
            profiles_scanned: census.profiles_scanned,
            profiles_changed: crate::plan::profiles_changed(found.iter().copied()),
            flips: count(found.len()),
            to_write: count(self.to_write.len()),
            held: count(self.held.len()),
            not_allowed: self.not_allowed,
            malformed: census.malformed,
            junk_elements: census.junk_elements,
            unrecognised_inferred_types: census.unrecognised_inferred_types.clone(),
            written: self.written,
            aborted: matches!(ending.outcome, Outcome::Refused(_)),
            interrupted_by: match ending.outcome {
                Outcome::Interrupted { stop, .. } => Some(stop.name()),
                _ => None,
            },
            mode: Some(ending.mode),
            run_id: (ending.mode == Mode::Apply && self.written > 0).then(|| ending.run_id.clone()),
            outcome: Some(ending.report()),
            ..Summary::default()
        };
        for planned in found {
            summary.count_transition(&planned.at.flip);
        }
        for (_, reason) in self.departed.iter().chain(&self.not_written) {
            summary.count_skip(*reason);
        }
        summary
    }

    /// Flips whose batches kept timing out.
    fn timed_out(&self) -> u64 {
        count(
            self.not_written
                .iter()
                .filter(|(_, reason)| *reason == SkipReason::NotWrittenTimeout)
                .count(),
        )
    }
}

pub(crate) struct Run<'p> {
    pub(crate) mode: Mode,
    pub(crate) run_id: String,
    pub(crate) started_at: DateTime<Utc>,
    clock: Instant,
    pub(crate) session: db::Session,
    printer: &'p mut dyn Printer,
    pub(crate) stop: StopSignal,
    pub(crate) census: Census,
    pub(crate) dispositions: Dispositions,
    /// The limits and guards that refused the plan; the run writes nothing when any did.
    pub(crate) refusals: Vec<Refusal>,
    /// Why the crawler's log cannot be read, said once in the header and once in the summary.
    crawler_log_unavailable: Option<String>,
    /// What the write path has committed so far, read even when the write is abandoned.
    ledger: Arc<Ledger>,
    /// The write stopped early: by what, and whether the batch in flight was abandoned.
    stopped: Option<(Stop, bool)>,
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
            refusals: Vec::new(),
            crawler_log_unavailable: None,
            ledger: Arc::new(Ledger::default()),
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
        self.print(Event::Start(start))
    }

    /// Prints `flips` in log order, each as `event` makes it, without copying them.
    pub(crate) fn print_flips<T>(
        &mut self,
        flips: &[T],
        key: impl Fn(&T) -> &PlannedFlip,
        event: impl Fn(&T, DateTime<Utc>) -> Event,
    ) -> Result<()> {
        for flip in in_log_order(flips, key) {
            let event = event(flip, self.started_at);
            self.printer.print(&event)?;
        }
        Ok(())
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
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Writes `dispositions.to_write`: only in an apply that nothing refused. A second signal
    /// abandons the batch in flight; what had committed is still counted.
    pub(crate) async fn write(&mut self, pace: Pace, recheck: &dyn Recheck) -> Result<()> {
        if !self.refusals.is_empty()
            || self.mode != Mode::Apply
            || self.dispositions.to_write.is_empty()
        {
            return Ok(());
        }
        self.stop.enter(Phase::Write);
        let mut twice = self.stop.clone();
        let written = tokio::select! {
            written = write(
                &self.session.pool,
                &self.dispositions.to_write,
                pace,
                recheck,
                &self.run_id,
                &self.stop,
                &self.ledger,
            ) => Some(written),
            () = twice.wait_twice() => None,
        };
        self.dispositions.written = self.ledger.written();
        match written {
            Some(written) => {
                let WriteOutcome {
                    not_written,
                    interrupted_by,
                } = written?;
                self.dispositions.not_written = not_written;
                self.stopped = interrupted_by.map(|number| (Stop::from_number(number), false));
            }
            None => {
                let stop = self
                    .stop
                    .stop()
                    .unwrap_or(Stop::Signal(crate::outcome::SIGINT));
                self.stopped = Some((stop, true));
            }
        }
        Ok(())
    }

    /// The last step of every run: how it ended, decided once from what happened, then the
    /// skipped lines and the summary in every format. `steps` is what the run's steps after the
    /// header came to.
    pub(crate) async fn conclude(mut self, steps: Result<()>) -> Result<Summary> {
        // A write that failed still committed what the ledger counted.
        self.dispositions.written = self.dispositions.written.max(self.ledger.written());
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
            Ok(()) if !self.refusals.is_empty() => (Outcome::Refused(self.refusals.clone()), None),
            Ok(()) => match self.stopped {
                Some((stop, twice)) => (
                    Outcome::Interrupted {
                        stop,
                        during: Phase::Write,
                        twice,
                        at_commit: twice && self.ledger.at_commit(),
                    },
                    None,
                ),
                None if self.dispositions.timed_out() > 0 => (
                    Outcome::TimedOut {
                        not_written: self.dispositions.timed_out(),
                    },
                    None,
                ),
                None => (Outcome::Completed, None),
            },
        };
        let ending = Ending {
            outcome,
            mode: self.mode,
            to_write: count(self.dispositions.to_write.len()),
            written: self.dispositions.written,
            run_id: self.run_id.clone(),
        };

        let not_written = std::mem::take(&mut self.dispositions.not_written);
        self.print_flips(&not_written, |(planned, _)| planned, skipped_event)?;
        self.dispositions.not_written = not_written;
        let mut summary = self.dispositions.summary(&self.census, &ending);
        summary.duration_ms = self.elapsed_ms();
        summary.crawler_log_unavailable = self.crawler_log_unavailable.clone();
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

/// A skipped line of the log.
pub(crate) fn skipped_event(
    (planned, reason): &(PlannedFlip, SkipReason),
    now: DateTime<Utc>,
) -> Event {
    Event::Skipped(Skipped {
        flip: planned.event(now),
        reason: *reason,
    })
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
            return Err(Failure::Usage(format!(
                "connected to database '{}' but --expect-database is '{expected}': nothing \
                 was read; check DATABASE_URL",
                session.target.database
            ))
            .into());
        }
    }
    Ok(session)
}
