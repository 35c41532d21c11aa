//! One run, in the order of the runbook: preflight, plan, check the threshold, write, report.
//! The dry-run and the apply share every step up to the write.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::Utc;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::{info, warn};
use uuid::Uuid;

use crate::cli::{BackfillArgs, ConnectOpts, Mode, RunOpts};
use crate::db::{self, FlipWrite, Needs, Pool, ProfileRow, SnapshotRow, Snapshots};
use crate::error::{signal_name, Failure};
use crate::interrupt::StopSignal;
use crate::plan_file::{Fingerprint, PlanFile};
use crate::report::{FlipLine, Header, Reporter, SkipReason, Summary};
use crate::resolver::{AgentsColumn, Flip};

/// The version printed in run logs and audit notes, with the commit it was built from.
pub const VERSION: &str = crate::cli::LONG_VERSION;

/// A flip the plan found, with the profile it belongs to.
#[derive(Debug, Clone)]
pub struct PlannedFlip {
    pub profile_id: Uuid,
    pub label: String,
    pub flip: Flip,
    /// The snapshot behind the decision; `None` when the flip comes from an invalid stored type.
    pub probe: Option<SnapshotRow>,
    /// The exact JSON value to write when it is not the string `flip.to` (a revert restoring a
    /// non-string type).
    pub restore: Option<serde_json::Value>,
    /// Replaces the probe description in the run log (a revert names the run it undoes).
    pub note: Option<String>,
}

impl PlannedFlip {
    fn stale_reason(&self, recheck: &Recheck) -> SkipReason {
        match recheck {
            Recheck::Resolve => SkipReason::ChangedSincePlan,
            Recheck::StillCarriesFrom { .. } => SkipReason::ChangedSinceRun,
        }
    }

    pub fn line(&self, now: chrono::DateTime<Utc>) -> FlipLine<'_> {
        FlipLine {
            profile_id: self.profile_id,
            profile: &self.label,
            index: self.flip.index,
            url: &self.flip.url,
            from: &self.flip.from,
            to: &self.flip.to,
            probe: self.probe.as_ref(),
            note: self.note.as_deref(),
            now,
        }
    }
}

#[derive(Debug, Default)]
pub struct Plan {
    pub flips: Vec<PlannedFlip>,
    pub profiles_scanned: u64,
    pub profiles_changed: u64,
    pub malformed: u64,
    pub junk_elements: u64,
}

/// A run id that sorts by time and is easy to grep for in `type_reclassification_log`.
pub fn new_run_id(now: chrono::DateTime<Utc>) -> String {
    let random = Uuid::new_v4().simple().to_string();
    format!("atb-{}-{}", now.format("%Y%m%dT%H%M%SZ"), &random[..8])
}

/// Runs the backfill against `url` and writes the run log to `out`, ignoring signals.
pub async fn execute(
    args: &BackfillArgs,
    url: &str,
    out: &mut (dyn Write + Send),
) -> Result<Summary> {
    execute_with(args, url, out, StopSignal::never()).await
}

/// [`execute`], stopping between batches when `stop` fires.
pub async fn execute_with(
    args: &BackfillArgs,
    url: &str,
    out: &mut (dyn Write + Send),
    mut stop: StopSignal,
) -> Result<Summary> {
    let clock = Instant::now();
    let mode = args.mode.mode();
    let started_at = Utc::now();
    let run_id = new_run_id(started_at);
    let session = open_session(url, &args.connect, &run_id).await?;

    // Only asked for when a plan file is involved: for a user without the privilege, the query
    // leaves a "permission denied" line in the server log.
    let fingerprint = if args.plan.is_some() || args.plan_out.is_some() {
        Fingerprint::of(&session).await?
    } else {
        Fingerprint::default()
    };
    let reviewed = match &args.plan {
        Some(path) => {
            let reviewed = PlanFile::read(path)?;
            reviewed.check_applies_to(&fingerprint, started_at, args.plan_max_age)?;
            Some(reviewed)
        }
        None => None,
    };

    let needs = if mode == Mode::Apply {
        Needs::Apply
    } else {
        Needs::DryRun
    };
    db::preflight(&session.pool, needs).await?;

    let mut report = Reporter::new(args.run.format, out);
    report.header(&Header {
        version: VERSION,
        mode,
        target: &session.target,
        started_at,
        run_id: &run_id,
        max_flips: args.run.max_flips,
        reverts: None,
    })?;

    let planning = PlanningBackend::default();
    let plan = tokio::select! {
        plan = plan(&session.pool, args.run.batch_size, args.connect.statement_timeout, &planning) => plan?,
        signal = stop.wait() => {
            planning.cancel(&session.pool).await;
            let summary = Summary { interrupted_by: Some(signal_name(signal)), ..Summary::default() };
            report.summary(mode, &run_id, &summary)?;
            return Err(Failure::Interrupted { signal, written: 0, planned: 0, run_id }.into());
        }
    };
    if let Some(path) = &args.plan_out {
        PlanFile::new(&plan, fingerprint, &run_id, VERSION, started_at).write(path)?;
        info!(path = %path.display(), flips = plan.flips.len(), "plan written");
    }
    let (plan, departures) = match &reviewed {
        Some(reviewed) => hold_to_review(plan, reviewed),
        None => (plan, Vec::new()),
    };
    for planned in &plan.flips {
        report.flip(&planned.line(started_at))?;
    }
    if let Some(path) = &args.plan_out {
        report.plan_written(path, plan.flips.len())?;
    }
    for (departure, reason) in &departures {
        report.skipped(&departure.line(started_at), *reason)?;
    }
    let summary = Summary {
        profiles_scanned: plan.profiles_scanned,
        profiles_changed: plan.profiles_changed,
        flips: plan.flips.len() as u64,
        malformed: plan.malformed,
        junk_elements: plan.junk_elements,
        skipped: departures
            .iter()
            .filter(|(_, reason)| *reason != SkipReason::Unplanned)
            .count() as u64,
        unplanned: departures
            .iter()
            .filter(|(_, reason)| *reason == SkipReason::Unplanned)
            .count() as u64,
        ..Summary::default()
    };

    let refusal = check_limits(&plan, args, &mut report)?;
    finish(Ending {
        report: &mut report,
        pool: &session.pool,
        mode,
        run_id,
        summary,
        refusal,
        clock,
        opts: &args.run,
        stop: &stop,
        flips: &plan.flips,
        recheck: Recheck::Resolve,
    })
    .await
}

/// Everything a run knows once its plan is checked against its limits.
pub struct Ending<'r, 'w> {
    pub report: &'r mut Reporter<'w>,
    pub pool: &'r Pool,
    pub mode: Mode,
    pub run_id: String,
    pub summary: Summary,
    pub refusal: Option<Failure>,
    pub clock: Instant,
    pub opts: &'r RunOpts,
    pub stop: &'r StopSignal,
    pub flips: &'r [PlannedFlip],
    pub recheck: Recheck,
}

/// The last two steps of every run: write (an apply that nothing refused), then report.
pub async fn finish(end: Ending<'_, '_>) -> Result<Summary> {
    let written = match end.refusal {
        None if end.mode == Mode::Apply && !end.flips.is_empty() => {
            write(
                end.pool,
                end.flips,
                end.opts,
                &end.recheck,
                &end.run_id,
                end.report,
                end.stop,
            )
            .await?
        }
        _ => WriteOutcome::default(),
    };
    conclude(Conclusion {
        report: end.report,
        pool: end.pool,
        mode: end.mode,
        run_id: end.run_id,
        summary: end.summary,
        refusal: end.refusal,
        written,
        clock: end.clock,
    })
    .await
}

/// What a run reports when it ends.
struct Conclusion<'r, 'w> {
    report: &'r mut Reporter<'w>,
    pool: &'r Pool,
    mode: Mode,
    run_id: String,
    summary: Summary,
    refusal: Option<Failure>,
    written: WriteOutcome,
    clock: Instant,
}

/// Prints the summary, closes the pool, and turns the outcome into the run's result.
async fn conclude(end: Conclusion<'_, '_>) -> Result<Summary> {
    let Conclusion {
        report,
        pool,
        mode,
        run_id,
        mut summary,
        refusal,
        written,
        clock,
    } = end;
    summary.aborted = refusal.is_some();
    summary.written = written.written;
    summary.skipped += written.skipped;
    summary.unplanned += written.unplanned;
    summary.interrupted_by = written.interrupted_by.map(signal_name);
    summary.duration_ms = clock.elapsed().as_millis() as u64;
    report.summary(mode, &run_id, &summary)?;
    pool.close().await;

    if let Some(refusal) = refusal {
        return Err(refusal.into());
    }
    if let Some(signal) = written.interrupted_by {
        return Err(Failure::Interrupted {
            signal,
            written: written.written,
            planned: summary.flips,
            run_id,
        }
        .into());
    }
    if written.timed_out > 0 {
        anyhow::bail!(
            "{} planned flips were not written because their batches kept hitting lock or \
             statement timeouts (see the skipped lines above); everything else was written \
             under run id '{run_id}': rerun the same command to finish",
            written.timed_out
        );
    }
    Ok(summary)
}

/// Keeps only the fresh flips that the reviewed plan holds exactly; returns the others: reviewed
/// flips that no longer hold, and new flips nobody reviewed. Neither kind is written.
fn hold_to_review(fresh: Plan, reviewed: &PlanFile) -> (Plan, Vec<(PlannedFlip, SkipReason)>) {
    let by_element: HashMap<(Uuid, usize), usize> = reviewed
        .flips
        .iter()
        .enumerate()
        .map(|(position, flip)| ((flip.profile_id, flip.index), position))
        .collect();
    let mut matched = vec![false; reviewed.flips.len()];
    let mut kept = Vec::new();
    let mut departures = Vec::new();
    for planned in fresh.flips {
        let reviewed_position = by_element
            .get(&(planned.profile_id, planned.flip.index))
            .copied()
            .filter(|position| reviewed.flips[*position].matches(&planned));
        match reviewed_position {
            Some(position) => {
                matched[position] = true;
                kept.push(planned);
            }
            None => departures.push((planned, SkipReason::Unplanned)),
        }
    }
    for (flip, _) in reviewed
        .flips
        .iter()
        .zip(&matched)
        .filter(|(_, hit)| !**hit)
    {
        let planned = PlannedFlip {
            profile_id: flip.profile_id,
            label: flip.profile.clone(),
            flip: Flip {
                index: flip.index,
                url: flip.url.clone(),
                from: flip.from.clone(),
                to: flip.to.clone(),
            },
            probe: None,
            restore: None,
            note: Some("in the reviewed plan".to_owned()),
        };
        departures.push((planned, SkipReason::ChangedSincePlan));
    }
    let profiles_changed = kept
        .iter()
        .map(|planned| planned.profile_id)
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    let plan = Plan {
        flips: kept,
        profiles_changed,
        ..fresh
    };
    (plan, departures)
}

/// The first step of every command: a run id, a connection that carries it as
/// `application_name` with the operator's timeouts, and the `--expect-database` guard.
pub async fn open_session(url: &str, connect: &ConnectOpts, run_id: &str) -> Result<db::Session> {
    let settings = db::SessionSettings {
        application_name: format!("agent-type-backfill {run_id}"),
        lock_timeout: connect.lock_timeout,
        statement_timeout: connect.statement_timeout,
    };
    let session = db::connect(url, &settings).await?;
    info!(target = %session.target, %run_id, "connected");
    check_expected_database(&session.target, connect.expect_database.as_deref())?;
    Ok(session)
}

/// `--expect-database`: refuses to go on when connected somewhere else.
fn check_expected_database(target: &db::Target, expected: Option<&str>) -> Result<()> {
    match expected {
        Some(expected) if expected != target.database => Err(Failure::Usage(format!(
            "connected to database '{}' but --expect-database is '{expected}': nothing was read; \
             check DATABASE_URL",
            target.database
        ))
        .into()),
        _ => Ok(()),
    }
}

/// The threshold and `--allow-transition`: a plan that breaks either is written not at all.
fn check_limits(
    plan: &Plan,
    args: &BackfillArgs,
    report: &mut Reporter<'_>,
) -> Result<Option<Failure>> {
    let refusal = check_transitions(plan, args, report)?;
    Ok(refusal.or_else(|| check_threshold(plan.flips.len(), args.run.max_flips)))
}

/// More flips than `--max-flips`: the run writes nothing.
pub fn check_threshold(flips: usize, max_flips: usize) -> Option<Failure> {
    (flips > max_flips).then_some(Failure::ThresholdExceeded { flips, max_flips })
}

fn check_transitions(
    plan: &Plan,
    args: &BackfillArgs,
    report: &mut Reporter<'_>,
) -> Result<Option<Failure>> {
    if !args.allow_transition.is_empty() {
        let mut refused: Vec<String> = Vec::new();
        for planned in &plan.flips {
            let from = planned.flip.from_label();
            let allowed = args
                .allow_transition
                .iter()
                .any(|allowed| allowed.from == from && allowed.to == planned.flip.to);
            if !allowed {
                report.not_allowed(&planned.line(Utc::now()))?;
                refused.push(format!("{from}->{}", planned.flip.to));
            }
        }
        if !refused.is_empty() {
            refused.sort();
            refused.dedup();
            return Ok(Some(Failure::TransitionNotAllowed {
                transitions: refused,
            }));
        }
    }
    Ok(None)
}

/// A spinner with the elapsed time, for a step whose progress the server does not report.
fn progress_spinner(message: String) -> ProgressBar {
    let spinner = progress_on_terminal(None, "{spinner} {msg} ({elapsed})", message);
    if !spinner.is_hidden() {
        spinner.enable_steady_tick(Duration::from_millis(200));
    }
    spinner
}

/// A bar over `total` profiles with rate and ETA.
pub fn progress_bar(total: u64, message: &'static str) -> ProgressBar {
    progress_on_terminal(
        Some(total),
        "{msg} {wide_bar} {human_pos}/{human_len} profiles, {per_sec}, eta {eta}",
        message,
    )
}

/// Progress on stderr when it is a terminal, and nothing otherwise: the stdout report is the
/// same either way.
fn progress_on_terminal(
    length: Option<u64>,
    template: &'static str,
    message: impl Into<std::borrow::Cow<'static, str>>,
) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(length, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(template).expect("static progress template is valid"),
    );
    bar.set_message(message);
    bar
}

/// The server process running the plan. An interrupted run cancels its statement there: the
/// server pass can run for minutes on a big registry, and without a cancel it would go on after
/// the tool has exited, until it finished or hit `--statement-timeout`.
#[derive(Debug, Default)]
pub struct PlanningBackend(AtomicI32);

impl PlanningBackend {
    fn record(&self, pid: i32) {
        self.0.store(pid, Ordering::SeqCst);
    }

    pub async fn cancel(&self, pool: &Pool) {
        let pid = self.0.load(Ordering::SeqCst);
        if pid == 0 {
            return;
        }
        match db::cancel_backend(pool, pid).await {
            Ok(_) => info!(pid, "cancelled the planning statement on the server"),
            Err(error) => warn!(
                "{error:#}; the planning statement ends by itself at --statement-timeout at the latest"
            ),
        }
    }
}

/// Reads the registry once inside one read-only snapshot. The server checks every agent against
/// the snapshots in a single pass and names the profiles that may hold a flip; only those are read
/// back and decided by the Rust resolver. Only flips are kept.
pub async fn plan(
    pool: &Pool,
    batch_size: u32,
    statement_timeout: Duration,
    backend: &PlanningBackend,
) -> Result<Plan> {
    let mut transaction = db::begin_read_only(pool).await?;
    backend.record(db::backend_pid(&mut transaction).await?);
    let census = db::census(&mut transaction).await?;
    let scanning = progress_spinner(format!(
        "planning: the server is checking the agents of {} profiles",
        census.profiles
    ));
    let candidates = db::flip_candidates(&mut transaction)
        .await
        .map_err(|error| {
            if db::is_statement_timeout(&error) {
                error.context(format!(
                    "the planning pass reads every agent in one statement and ran past \
                     --statement-timeout '{statement_timeout:?}': raise it (the benchmark's \
                     2-core server needs about 5 s per million profiles)"
                ))
            } else {
                error
            }
        })?;
    scanning.finish_and_clear();
    info!(
        profiles = census.profiles,
        candidates = candidates.profile_ids.len(),
        "server pass complete"
    );

    let mut plan = Plan {
        profiles_scanned: census.profiles,
        malformed: census.malformed,
        junk_elements: candidates.untouchable_elements,
        ..Plan::default()
    };
    let progress = progress_bar(candidates.profile_ids.len() as u64, "resolving candidates");
    for ids in candidates.profile_ids.chunks(batch_size as usize) {
        let rows = db::profiles_by_id(&mut transaction, ids).await?;
        let columns = rows.iter().map(parse_column).collect::<Result<Vec<_>>>()?;
        let snapshots = db::snapshots_for(&mut transaction, &columns).await?;
        for (row, column) in rows.iter().zip(&columns) {
            let verdict = column.verdict(&snapshots);
            if verdict.flips.is_empty() {
                continue;
            }
            plan.profiles_changed += 1;
            let label = row.label();
            plan.flips
                .extend(verdict.flips.into_iter().map(|flip| PlannedFlip {
                    profile_id: row.id,
                    label: label.clone(),
                    probe: snapshots.get(&flip.url).cloned(),
                    restore: None,
                    note: None,
                    flip,
                }));
        }
        progress.inc(ids.len() as u64);
    }
    progress.finish_and_clear();
    transaction
        .rollback()
        .await
        .context("could not close the planning transaction")?;
    info!(
        profiles = plan.profiles_scanned,
        flips = plan.flips.len(),
        "plan complete"
    );
    Ok(plan)
}

pub fn parse_column(row: &ProfileRow) -> Result<AgentsColumn> {
    match &row.agents {
        None => Ok(AgentsColumn::Malformed),
        Some(text) => AgentsColumn::parse(text)
            .with_context(|| format!("could not parse agents of profile '{}'", row.id)),
    }
}

#[derive(Debug, Default)]
pub struct WriteOutcome {
    written: u64,
    skipped: u64,
    unplanned: u64,
    timed_out: u64,
    interrupted_by: Option<i32>,
}

/// How a locked profile is checked before a planned flip is written.
#[derive(Debug, Clone)]
pub enum Recheck {
    /// The backfill: re-resolve against current data; write what still holds exactly as planned.
    Resolve,
    /// `revert`: write only where the element still carries the planned `from`; the audit notes
    /// record which run is being reverted.
    StillCarriesFrom { reverts: String },
}

/// Writes the plan in batches of profiles, one short transaction each.
pub async fn write(
    pool: &Pool,
    flips: &[PlannedFlip],
    opts: &RunOpts,
    recheck: &Recheck,
    run_id: &str,
    report: &mut Reporter<'_>,
    stop: &StopSignal,
) -> Result<WriteOutcome> {
    let mut by_profile: Vec<(Uuid, Vec<&PlannedFlip>)> = Vec::new();
    for planned in flips {
        match by_profile.last_mut() {
            Some((id, flips)) if *id == planned.profile_id => flips.push(planned),
            _ => by_profile.push((planned.profile_id, vec![planned])),
        }
    }
    let progress = progress_bar(by_profile.len() as u64, "writing");
    let mut outcome = WriteOutcome::default();
    for batch in by_profile.chunks(opts.batch_size as usize) {
        // A stop request is honoured between batches only, so each batch commits whole.
        if let Some(signal) = stop.raised() {
            outcome.interrupted_by = Some(signal);
            break;
        }
        let mut attempt = 1;
        let checked = loop {
            match write_batch(pool, batch, recheck, run_id).await {
                Ok(checked) => break Some(checked),
                Err(error) if db::is_retryable(&error) && attempt < opts.write_attempts => {
                    let pause = Duration::from_millis(200 * 2u64.pow(attempt - 1));
                    let reason = crate::error::render(&error);
                    warn!(attempt, ?pause, "batch rolled back ({reason}); retrying");
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                Err(error) if db::is_retryable(&error) => {
                    let reason = crate::error::render(&error);
                    warn!(attempt, "batch rolled back ({reason}); giving up on it");
                    break None;
                }
                Err(error) => return Err(error),
            }
        };
        match checked {
            Some(checked) => {
                outcome.written += checked.written;
                for (line, reason) in &checked.not_written {
                    report.skipped(&line.line(Utc::now()), *reason)?;
                    match reason {
                        SkipReason::Unplanned => outcome.unplanned += 1,
                        _ => outcome.skipped += 1,
                    }
                }
            }
            None => {
                for planned in batch.iter().flat_map(|(_, flips)| flips) {
                    report.skipped(&planned.line(Utc::now()), SkipReason::NotWrittenTimeout)?;
                    outcome.skipped += 1;
                    outcome.timed_out += 1;
                }
            }
        }
        progress.inc(batch.len() as u64);
    }
    progress.finish_and_clear();
    // A signal that arrived during the last batch still ends the run as interrupted: the
    // operator asked to stop and should see that the exit status honours it.
    outcome.interrupted_by = outcome.interrupted_by.or(stop.raised());
    Ok(outcome)
}

struct CheckedBatch {
    written: u64,
    not_written: Vec<(PlannedFlip, SkipReason)>,
}

/// Locks the batch's profiles, checks each planned flip against current data, and writes only
/// the flips that still hold exactly as planned, with their audit rows, in one transaction.
async fn write_batch(
    pool: &Pool,
    batch: &[(Uuid, Vec<&PlannedFlip>)],
    recheck: &Recheck,
    run_id: &str,
) -> Result<CheckedBatch> {
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
    let snapshots = match recheck {
        Recheck::Resolve => db::snapshots_for(&mut transaction, &columns).await?,
        Recheck::StillCarriesFrom { .. } => Snapshots::default(),
    };
    let current: HashMap<Uuid, (String, &AgentsColumn)> = current
        .iter()
        .zip(&columns)
        .map(|(row, column)| (row.id, (row.label(), column)))
        .collect();

    let mut to_write = Vec::new();
    let mut not_written = Vec::new();
    for (id, planned_flips) in batch {
        let Some((label, column)) = current.get(id) else {
            not_written.extend(
                planned_flips
                    .iter()
                    .map(|planned| ((*planned).clone(), SkipReason::ProfileGone)),
            );
            continue;
        };
        let mut found = match recheck {
            Recheck::Resolve => column.verdict(&snapshots).flips,
            Recheck::StillCarriesFrom { .. } => planned_flips
                .iter()
                .filter(|planned| column.carries(&planned.flip))
                .map(|planned| planned.flip.clone())
                .collect(),
        };
        for planned in planned_flips {
            match found.iter().position(|flip| *flip == planned.flip) {
                Some(position) => {
                    let flip = found.swap_remove(position);
                    to_write.push(FlipWrite {
                        profile_id: *id,
                        profile_label: label.clone(),
                        index: flip.index,
                        old_type: flip.from_label(),
                        url: flip.url,
                        old_value: flip.from,
                        new_value: planned
                            .restore
                            .clone()
                            .unwrap_or_else(|| serde_json::Value::String(flip.to.clone())),
                        new_type: flip.to,
                    });
                }
                None => not_written.push(((*planned).clone(), planned.stale_reason(recheck))),
            }
        }
        not_written.extend(found.drain(..).map(|flip| {
            (
                PlannedFlip {
                    profile_id: *id,
                    label: label.clone(),
                    probe: snapshots.get(&flip.url).cloned(),
                    restore: None,
                    note: None,
                    flip,
                },
                SkipReason::Unplanned,
            )
        }));
    }
    to_write.sort_by_key(|flip| (flip.profile_id, flip.index));
    if !to_write.is_empty() {
        let notes_extra = match recheck {
            Recheck::Resolve => serde_json::json!({}),
            Recheck::StillCarriesFrom { reverts } => serde_json::json!({ "reverts": reverts }),
        };
        db::write_flips(&mut transaction, &to_write, run_id, VERSION, &notes_extra).await?;
    }
    transaction
        .commit()
        .await
        .context("could not commit a write batch")?;
    Ok(CheckedBatch {
        written: to_write.len() as u64,
        not_written,
    })
}
