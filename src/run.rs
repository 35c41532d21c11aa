//! One run of any command that may write: its id, clock, session and log, and the steps every
//! such run ends with. The backfill and `revert` differ only in how they plan.

use std::future::Future;
use std::time::Instant;

use anyhow::Result;
use chrono::{DateTime, Utc};
use tracing::info;
use uuid::Uuid;

use crate::config::ConnectConfig;
use crate::db;
use crate::error::{signal_name, Failure};
use crate::events::{Event, Mode, Rule, Skipped, Start, Summary};
use crate::interrupt::StopSignal;
use crate::plan::{in_log_order, PlannedFlip, PlanningBackend};
use crate::report::Printer;
use crate::write::{write, Recheck};
use crate::VERSION;

/// A run id that sorts by time and is easy to grep for in `type_reclassification_log`.
pub fn new_run_id(now: DateTime<Utc>) -> String {
    let random = Uuid::new_v4().simple().to_string();
    format!("atb-{}-{}", now.format("%Y%m%dT%H%M%SZ"), &random[..8])
}

pub struct Run<'p> {
    pub mode: Mode,
    pub run_id: String,
    pub started_at: DateTime<Utc>,
    clock: Instant,
    pub session: db::Session,
    printer: &'p mut dyn Printer,
    pub stop: StopSignal,
    /// `--leave-held`, for the log header.
    pub leave_held: bool,
}

/// What the last step of a run is given: the flips to write, unless a guard refused them.
pub struct Ending<'f> {
    pub flips: &'f [PlannedFlip],
    /// Set when a limit or guard refused the plan: nothing is written.
    pub refusal: Option<Failure>,
    pub summary: Summary,
    pub batch_size: usize,
    pub write_attempts: u32,
    pub recheck: &'f dyn Recheck,
}

impl<'p> Run<'p> {
    /// The first step of every command: a run id, a connection that carries it as
    /// `application_name` with the operator's timeouts, and the `--expect-database` guard.
    pub async fn open(
        connect: &ConnectConfig,
        mode: Mode,
        printer: &'p mut dyn Printer,
        stop: StopSignal,
    ) -> Result<Run<'p>> {
        let clock = Instant::now();
        let started_at = Utc::now();
        let run_id = new_run_id(started_at);
        let settings = db::SessionSettings {
            application_name: format!("agent-type-backfill {run_id}"),
            lock_timeout: connect.lock_timeout,
            statement_timeout: connect.statement_timeout,
        };
        let session = db::connect(&connect.url, &settings).await?;
        info!(target = %session.target, %run_id, "connected");
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
        Ok(Run {
            mode,
            run_id,
            started_at,
            clock,
            session,
            printer,
            stop,
            leave_held: false,
        })
    }

    pub fn print(&mut self, event: Event) -> Result<()> {
        self.printer.print(&event)
    }

    pub fn print_finish(&mut self) -> Result<()> {
        self.printer.finish()
    }

    /// The log header.
    pub fn header(&mut self, max_flips: usize, reverts: Option<&str>) -> Result<()> {
        let start = Start {
            tool: "agent-type-backfill",
            version: VERSION,
            mode: self.mode,
            target: self.session.target.clone(),
            started_at: self.started_at,
            run_id: self.run_id.clone(),
            max_flips,
            reverts: reverts.map(str::to_owned),
            rule: Rule::ported(),
            leave_held: self.leave_held,
        };
        self.print(Event::Start(start))
    }

    /// Prints `flips` in log order, each as `event` makes it, without copying them.
    pub fn print_flips<T>(
        &mut self,
        flips: &[T],
        key: impl Fn(&T) -> &PlannedFlip,
        event: impl Fn(&T, DateTime<Utc>) -> Event,
    ) -> Result<()> {
        for flip in in_log_order(flips, key) {
            let event = event(flip, self.started_at);
            self.print(event)?;
        }
        Ok(())
    }

    /// Plans, unless a signal comes first: then the planning statement is cancelled on the
    /// server, the log says the plan was interrupted, and the run ends with nothing written.
    pub async fn plan<T>(
        &mut self,
        planning: impl Future<Output = Result<T>>,
        backend: &PlanningBackend,
    ) -> Result<T> {
        let mut stop = self.stop.clone();
        tokio::select! {
            planned = planning => planned,
            signal = stop.wait() => {
                backend.cancel(&self.session.pool).await;
                self.print(Event::Interrupted {
                    signal: signal_name(signal),
                    during: "plan",
                    duration_ms: self.elapsed_ms(),
                })?;
                self.session.pool.close().await;
                Err(Failure::InterruptedPlanning { signal }.into())
            }
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The last two steps of every run: write (an apply that nothing refused), then report.
    pub async fn write_and_report(mut self, ending: Ending<'_>) -> Result<Summary> {
        let Ending {
            flips,
            refusal,
            mut summary,
            batch_size,
            write_attempts,
            recheck,
        } = ending;
        let outcome = if refusal.is_none() && self.mode == Mode::Apply && !flips.is_empty() {
            write(
                &self.session.pool,
                flips,
                batch_size,
                write_attempts,
                recheck,
                &self.run_id,
                &self.stop,
            )
            .await?
        } else {
            crate::write::WriteOutcome::default()
        };
        let mut not_written = outcome.not_written;
        not_written.sort_by(|a, b| a.0.log_order().cmp(&b.0.log_order()));
        for (planned, reason) in &not_written {
            summary.count_skip(*reason);
            let flip = planned.event(self.started_at);
            self.print(Event::Skipped(Skipped {
                flip,
                reason: *reason,
            }))?;
        }
        summary.aborted = refusal.is_some();
        summary.written = outcome.written;
        summary.interrupted_by = outcome.interrupted_by.map(signal_name);
        summary.duration_ms = self.elapsed_ms();
        summary.mode = Some(self.mode);
        summary.run_id =
            (self.mode == Mode::Apply && summary.written > 0).then(|| self.run_id.clone());
        self.print(Event::Summary(summary.clone()))?;
        self.session.pool.close().await;

        if let Some(refusal) = refusal {
            return Err(refusal.into());
        }
        if let Some(signal) = outcome.interrupted_by {
            return Err(Failure::Interrupted {
                signal,
                written: summary.written,
                planned: summary.flips,
                run_id: self.run_id,
            }
            .into());
        }
        if outcome.timed_out > 0 {
            let rest = if summary.written == 0 {
                "nothing was written".to_owned()
            } else {
                format!(
                    "the other {} were written under run id '{}'",
                    summary.written, self.run_id
                )
            };
            anyhow::bail!(
                "{} planned flips were not written because their batches kept hitting lock or \
                 statement timeouts (see the skipped lines above); {rest}: rerun the same command \
                 to finish",
                outcome.timed_out
            );
        }
        Ok(summary)
    }
}
