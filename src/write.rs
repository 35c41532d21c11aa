//! The locked batch write shared by the backfill and `revert`: lock a batch of profiles, check
//! every planned flip against what is there now, write only those that still hold, with their
//! audit rows, in one short transaction.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{info, warn};
use uuid::Uuid;

use crate::db::{self, FlipWrite, Snapshots};
use crate::domain::{ProfileFlip, SkipReason};
use crate::interrupt::StopSignal;
use crate::plan::{parse_column, Basis, PlannedFlip, Restore};
use crate::resolver::{is_depth_summary, AgentsColumn, Flip};
use crate::VERSION;

/// How a locked profile is checked before a planned flip is written.
pub(crate) trait Recheck: Sync {
    /// Whether [`Recheck::holding`] reads the snapshots.
    fn reads_snapshots(&self) -> bool;

    /// The flips that hold in `column` now. Planned flips among them are written; the others
    /// are reported as `unplanned`.
    fn holding(
        &self,
        column: &AgentsColumn,
        snapshots: &Snapshots,
        planned: &[&PlannedFlip],
    ) -> Vec<Flip>;

    /// Why a planned flip that no longer holds is not written.
    fn stale_reason(&self) -> SkipReason;

    /// What the audit notes of this kind of write add.
    fn notes_extra(&self) -> serde_json::Value;
}

/// The backfill: re-resolve against current data and write what still holds exactly as planned.
pub(crate) struct ResolveAgain {
    /// With `--leave-held`: how many held flips the run left unwritten; the audit notes say so.
    pub(crate) left_held: Option<u64>,
}

impl Recheck for ResolveAgain {
    fn reads_snapshots(&self) -> bool {
        true
    }

    fn holding(
        &self,
        column: &AgentsColumn,
        snapshots: &Snapshots,
        _: &[&PlannedFlip],
    ) -> Vec<Flip> {
        column.verdict(snapshots).flips
    }

    fn stale_reason(&self) -> SkipReason {
        SkipReason::ChangedSincePlan
    }

    fn notes_extra(&self) -> serde_json::Value {
        match self.left_held {
            Some(held) => serde_json::json!({ "leave_held": true, "held_left": held }),
            None => serde_json::json!({}),
        }
    }
}

/// What the write's committed batches left unwritten.
#[derive(Debug, Default)]
pub(crate) struct Unwritten {
    /// Flips to write that were not written, by element, with why.
    pub(crate) planned: HashMap<(Uuid, usize), SkipReason>,
    /// Flips the locked recheck found that the plan did not hold.
    pub(crate) unplanned: Vec<PlannedFlip>,
}

#[derive(Debug, Default)]
pub(crate) struct WriteOutcome {
    pub(crate) unwritten: Unwritten,
    pub(crate) interrupted_by: Option<i32>,
}

/// What the write has committed, kept outside the write so that a run whose write is abandoned
/// (a second signal) or fails (a lost connection) still says exactly which flips were written.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// The elements of the flips written by the batches that committed.
    committed: Mutex<Vec<(Uuid, usize)>>,
    /// A batch has sent its COMMIT and not heard back: abandoned now, it may have committed.
    at_commit: AtomicBool,
}

impl Ledger {
    pub(crate) fn committed(&self) -> Vec<(Uuid, usize)> {
        // A panic elsewhere cannot make a committed batch uncommitted: the list stays true.
        self.committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn at_commit(&self) -> bool {
        self.at_commit.load(Ordering::SeqCst)
    }
}

/// How the write goes through its batches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    /// Profiles per batch, one short transaction each.
    pub(crate) batch_size: usize,
    /// Attempts at a batch that hits a lock or statement timeout.
    pub(crate) attempts: u32,
    /// `--max-replica-lag`: before each batch, wait while a standby's replay is further behind.
    pub(crate) max_replica_lag: Option<Duration>,
}

/// How often a paused write asks the standbys again. Each status reply of a standby (every
/// `wal_receiver_status_interval`, 10 s by default, and on every WAL it receives) updates its lag.
const LAG_POLL: Duration = Duration::from_millis(500);

/// Writes `flips` in batches at `pace`, one short transaction each, recording what commits in
/// `ledger`.
pub(crate) async fn write(
    pool: &db::Pool,
    flips: &[&PlannedFlip],
    pace: Pace,
    recheck: &dyn Recheck,
    run_id: &str,
    stop: &StopSignal,
    ledger: &Ledger,
) -> Result<WriteOutcome> {
    // Batches go in profile id order, whatever order the log lists flips in.
    let mut by_profile: BTreeMap<Uuid, Vec<&PlannedFlip>> = BTreeMap::new();
    for planned in flips {
        by_profile
            .entry(planned.at.profile_id)
            .or_default()
            .push(*planned);
    }
    let by_profile: Vec<(Uuid, Vec<&PlannedFlip>)> = by_profile.into_iter().collect();
    let bar = crate::progress::bar(by_profile.len(), "writing");
    let mut outcome = WriteOutcome::default();
    for batch in by_profile.chunks(pace.batch_size.max(1)) {
        // A stop request is honoured between attempts only, so each batch commits whole.
        if let Some(signal) = stop.raised() {
            outcome.interrupted_by = Some(signal);
            break;
        }
        if let Some(bound) = pace.max_replica_lag {
            if let Some(signal) = wait_for_standbys(pool, bound, stop).await? {
                outcome.interrupted_by = Some(signal);
                break;
            }
        }
        match write_with_retries(pool, batch, pace.attempts, recheck, run_id, stop, ledger).await? {
            Attempts::Written(unwritten) => {
                outcome.unwritten.planned.extend(unwritten.planned);
                outcome.unwritten.unplanned.extend(unwritten.unplanned);
            }
            Attempts::GaveUp => {
                for planned in batch.iter().flat_map(|(_, flips)| flips) {
                    outcome
                        .unwritten
                        .planned
                        .insert(planned.at.element(), SkipReason::NotWrittenTimeout);
                }
            }
            Attempts::Stopped(signal) => {
                outcome.interrupted_by = Some(signal);
                break;
            }
        }
        bar.inc(crate::domain::count(batch.len()));
    }
    bar.finish_and_clear();
    // A signal that arrived during the last batch still ends the run as interrupted: the
    // operator asked to stop and should see that the exit status honours it.
    outcome.interrupted_by = outcome.interrupted_by.or(stop.raised());
    Ok(outcome)
}

/// Waits while any standby's replay is more than `bound` behind, as gh-ost and GitLab's batched
/// migrations throttle on replication lag: the primary takes batches faster than a busy standby
/// replays them. Returns the signal that stopped the wait, if one did. Said on stderr only: the
/// run log's lines do not depend on how long a standby took.
async fn wait_for_standbys(
    pool: &db::Pool,
    bound: Duration,
    stop: &StopSignal,
) -> Result<Option<i32>> {
    let mut paused: Option<std::time::Instant> = None;
    loop {
        let lags = db::standby_lags(pool).await?;
        match lags.iter().find(|standby| standby.lag > bound) {
            Some(behind) => {
                if paused.is_none() {
                    warn!(
                        "standby '{}' replays {} behind, more than --max-replica-lag {}: writes \
                         paused until every standby is within it (Ctrl-C stops the run; what is \
                         written so far stays written and audited)",
                        behind.name,
                        lag_text(behind.lag),
                        lag_text(bound),
                    );
                    paused = Some(std::time::Instant::now());
                }
                let mut stop = stop.clone();
                tokio::select! {
                    () = tokio::time::sleep(LAG_POLL) => {}
                    signal = stop.wait() => return Ok(Some(signal)),
                }
            }
            None => {
                if let Some(since) = paused {
                    info!(
                        "standbys within --max-replica-lag {} after {}: writes resumed",
                        lag_text(bound),
                        lag_text(since.elapsed()),
                    );
                }
                return Ok(None);
            }
        }
    }
}

/// A lag as the pause messages say it: seconds with one decimal, as `pg_stat_replication` shows
/// it to a person.
pub(crate) fn lag_text(lag: Duration) -> String {
    format!("{:.1}s", lag.as_secs_f64())
}

enum Attempts {
    /// The batch committed; what it did not write, with why.
    Written(Unwritten),
    /// Every attempt hit a lock or statement timeout.
    GaveUp,
    /// A signal arrived: no new attempt was started.
    Stopped(i32),
}

async fn write_with_retries(
    pool: &db::Pool,
    batch: &[(Uuid, Vec<&PlannedFlip>)],
    write_attempts: u32,
    recheck: &dyn Recheck,
    run_id: &str,
    stop: &StopSignal,
    ledger: &Ledger,
) -> Result<Attempts> {
    let mut attempt = 1;
    loop {
        match write_batch(pool, batch, recheck, run_id, ledger).await {
            Ok(unwritten) => return Ok(Attempts::Written(unwritten)),
            // A stop request that came while this batch waited: it rolled back whole, and no new
            // attempt starts.
            Err(error) if db::is_retryable(&error) && stop.raised().is_some() => {
                let reason = crate::error::render(&error);
                warn!(
                    attempt,
                    "batch rolled back ({reason}); not retried: stopping"
                );
                return Ok(Attempts::Stopped(stop.raised().unwrap_or_default()));
            }
            Err(error) if db::is_retryable(&error) && attempt < write_attempts => {
                let pause = Duration::from_millis(200 * 2u64.pow(attempt - 1));
                let reason = crate::error::render(&error);
                warn!(attempt, ?pause, "batch rolled back ({reason}); retrying");
                let mut stop = stop.clone();
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    signal = stop.wait() => return Ok(Attempts::Stopped(signal)),
                }
                attempt += 1;
            }
            Err(error) if db::is_retryable(&error) => {
                let reason = crate::error::render(&error);
                warn!(attempt, "batch rolled back ({reason}); giving up on it");
                return Ok(Attempts::GaveUp);
            }
            Err(error) => return Err(error),
        }
    }
}

/// Locks the batch's profiles, checks each planned flip against current data, and writes only
/// the flips that still hold exactly as planned, with their audit rows, in one transaction.
async fn write_batch(
    pool: &db::Pool,
    batch: &[(Uuid, Vec<&PlannedFlip>)],
    recheck: &dyn Recheck,
    run_id: &str,
    ledger: &Ledger,
) -> Result<Unwritten> {
    let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
    let mut transaction = pool
        .begin()
        .await
        .context("could not open a write transaction")?;
    let current = db::lock_profiles(&mut transaction, &ids).await?;
    let columns = current
        .iter()
        .map(parse_column)
        .collect::<Result<Vec<_>>>()?;
    let snapshots = if recheck.reads_snapshots() {
        db::snapshots_for(&mut transaction, &columns).await?
    } else {
        Snapshots::default()
    };
    let current: HashMap<Uuid, (String, &AgentsColumn)> = current
        .iter()
        .zip(&columns)
        .map(|(row, column)| (row.id, (row.label(), column)))
        .collect();

    let mut to_write = Vec::new();
    let mut unwritten = Unwritten::default();
    for (id, planned_flips) in batch {
        let Some((label, column)) = current.get(id) else {
            unwritten.planned.extend(
                planned_flips
                    .iter()
                    .map(|planned| (planned.at.element(), SkipReason::ProfileGone)),
            );
            continue;
        };
        let mut holding = recheck.holding(column, &snapshots, planned_flips);
        for planned in planned_flips {
            match holding.iter().position(|flip| *flip == planned.at.flip) {
                Some(position) => {
                    let flip = holding.swap_remove(position);
                    to_write.push(flip_write(
                        ProfileFlip::new(*id, label.clone(), flip),
                        planned,
                    ));
                }
                None => {
                    unwritten
                        .planned
                        .insert(planned.at.element(), recheck.stale_reason());
                }
            }
        }
        unwritten.unplanned.extend(holding.into_iter().map(|flip| {
            let probe = snapshots.get(&flip.url).cloned();
            PlannedFlip::new(
                ProfileFlip::new(*id, label.clone(), flip),
                Basis::found(probe),
            )
        }));
    }
    to_write.sort_by_key(|flip| flip.at.element());
    if !to_write.is_empty() {
        db::write_flips(
            &mut transaction,
            &to_write,
            run_id,
            VERSION,
            &recheck.notes_extra(),
        )
        .await?;
    }
    ledger.at_commit.store(true, Ordering::SeqCst);
    let committed = transaction.commit().await;
    ledger.at_commit.store(false, Ordering::SeqCst);
    committed.context("could not commit a write batch")?;
    ledger
        .committed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extend(to_write.iter().map(|written| written.at.element()));
    Ok(unwritten)
}

fn flip_write(at: ProfileFlip, planned: &PlannedFlip) -> FlipWrite {
    // A type too deep to keep whole is recorded from the row itself, never from its summary.
    let old_type = (!is_depth_summary(&at.flip.from)).then(|| at.flip.stored_label());
    let restore = match &planned.basis {
        Basis::Reverts(reversal) => Some(&reversal.restore),
        Basis::Probe(_) | Basis::NoSnapshot | Basis::Reviewed(_) => None,
    };
    let (new_value, new_type) = match restore {
        Some(Restore::Json(raw)) => (Some(raw.clone()), restored_type_label(raw, &at.flip.to)),
        // The audit `new_type` column follows the server: an absent type reads as "unknown".
        Some(Restore::Absent) => (None, crate::resolver::UNKNOWN_TYPE.to_owned()),
        None => (
            Some(serde_json::Value::String(at.flip.to.clone()).to_string()),
            at.flip.to.clone(),
        ),
    };
    FlipWrite {
        at,
        old_type,
        new_value,
        new_type,
    }
}

/// The audit `new_type` of a restored value: its label, `unknown` for JSON `null` (the server's
/// convention, as for `old_type`), or for a type too deep to keep whole, its exact JSON text
/// rather than the summary the log shows.
fn restored_type_label(raw: &str, shown: &str) -> String {
    match crate::resolver::bounded_type(raw) {
        Ok(value) if is_depth_summary(&value) => raw.to_owned(),
        Ok(serde_json::Value::Null) => crate::resolver::UNKNOWN_TYPE.to_owned(),
        _ => shown.to_owned(),
    }
}
