//! One backfill run, in the order of the runbook: preflight, plan, hold what the guards hold,
//! check the limits, write, report. The dry-run and the apply share every step up to the write.

use anyhow::{Context, Result};
use tracing::info;

use crate::config::{BackfillConfig, Guards};
use crate::db::{self, Needs};
use crate::dispositions::{Census, Disposition, Dispositions};
use crate::domain::{Mode, SkipReason};
use crate::error::{Failure, Preflight};
use crate::events::{Event, Summary};
use crate::guard::Holds;
use crate::interrupt::StopSignal;
use crate::plan::{
    self, Basis, EvidenceAccess, PlanOptions, PlannedFlip, PlanningBackend, Reviewed,
};
use crate::plan_file::{hold_to_review, Fingerprint, PlanFile};
use crate::report::Printer;
use crate::resolver::{AgentsColumn, Flip};
use crate::run::Run;
use crate::write::ResolveAgain;

/// Runs the backfill `config` describes, printing its log to `printer`, stopping between
/// batches when `stop` fires. Once the header is printed, every ending (completed, refused,
/// interrupted, failed) is reported by [`Run::conclude`].
pub async fn execute(
    config: &BackfillConfig,
    printer: &mut dyn Printer,
    stop: StopSignal,
) -> Result<Summary> {
    let mut run = Run::open(&config.connect, config.run.mode, printer, stop).await?;

    // 1. Preflight: the reviewed plan belongs here and is fresh; the tables and privileges are
    // what this mode needs.
    let fingerprint = if config.reviewed_plan.is_some() || config.plan_out.is_some() {
        Fingerprint::of(&run.session).await?
    } else {
        Fingerprint::default()
    };
    let reviewed = match &config.reviewed_plan {
        Some(path) => {
            let reviewed = PlanFile::read(path)?;
            reviewed.check_applies_to(&fingerprint, run.started_at, config.plan_max_age)?;
            Some(reviewed)
        }
        None => None,
    };
    let needs = match run.mode {
        Mode::Apply => Needs::Apply,
        Mode::DryRun => Needs::DryRun,
    };
    crate::run::preflight(&run.session, run.mode, needs, config.run.max_replica_lag).await?;
    let evidence = evidence_access(&run.session, &config.guards).await?;
    run.leave_held = config.leave_held;
    let unavailable = match &evidence {
        EvidenceAccess::Unavailable(why) => Some(why.clone()),
        EvidenceAccess::Readable => None,
    };
    run.header(config.run.max_flips, None, unavailable.as_deref())?;

    let steps =
        plan_check_and_write(&mut run, config, reviewed.as_ref(), fingerprint, evidence).await;
    run.conclude(steps).await
}

/// Steps 2 to 4: plan, hold and check, write. What they found is left in `run` for the report.
async fn plan_check_and_write(
    run: &mut Run<'_>,
    config: &BackfillConfig,
    reviewed: Option<&PlanFile>,
    fingerprint: Fingerprint,
    evidence: EvidenceAccess,
) -> Result<()> {
    // 2. Plan.
    let evidence_readable = evidence == EvidenceAccess::Readable;
    let backend = PlanningBackend::default();
    let options = PlanOptions {
        batch_size: config.run.batch_size,
        chunk_size: config.chunk_size,
        jobs: config.plan_jobs,
        statement_timeout: config.connect.statement_timeout,
        backend: &backend,
        evidence,
    };
    let pool = run.session.pool.clone();
    let mut plan = run.plan(plan::plan(&pool, &options), &backend).await?;
    run.census = Census {
        complete: true,
        profiles_scanned: plan.profiles_scanned,
        malformed: plan.malformed,
        junk_elements: plan.junk_elements,
        unrecognised_inferred_types: plan.unrecognised_inferred_types.clone(),
    };
    // 3. Hold what a guard distrusts, and check `--allow-transition` on the rest; a reviewed
    // plan keeps only its own flips. Every flip the plan found gets its one disposition.
    let holds = Holds {
        guards: &config.guards,
        leave_held: config.leave_held,
        unrecognised_inferred_types: &plan.unrecognised_inferred_types,
        now: run.started_at,
        reviewed,
    };
    let planned_flips = plan.flips.len();
    let found = std::mem::take(&mut plan.flips);
    let mut dispositions = match reviewed {
        Some(reviewed) => hold_to_review(found, reviewed, |planned| holds.disposition(planned)),
        None => {
            let mut dispositions = Dispositions::default();
            for planned in found {
                let disposition = holds.disposition(&planned);
                dispositions.push(planned, disposition);
            }
            dispositions
        }
    };
    if let Some(path) = &config.plan_out {
        PlanFile::new(
            &dispositions,
            &run.census,
            fingerprint,
            &run.run_id,
            run.started_at,
        )
        .write(path)?;
        info!(path = %path.display(), flips = planned_flips, "plan written");
    }
    name_earlier_writes(&run.session.pool, &mut dispositions, evidence_readable).await?;

    // The log lists the flips to write, then those held, then those the review left, then those
    // not allowed; the plan file's line follows every list. The limits are checked on the list
    // as it stands.
    run.list_plan(dispositions)?;
    if let Some(path) = &config.plan_out {
        run.print(Event::PlanWritten {
            path: path.display().to_string(),
            flips: planned_flips,
        })?;
    }

    // 4. Write (an apply nothing refused); the report is the run's conclusion. `--leave-held`
    // (only with a reviewed plan): the held flips are listed and left unwritten, and the audit
    // notes say how many.
    let left_held = config.leave_held.then(|| {
        run.dispositions
            .count(|disposition| matches!(disposition, Disposition::LeftHeld(_)))
    });
    run.write(config.run.pace(), &ResolveAgain { left_held })
        .await
}

/// A reviewed flip that no longer holds because its element already carries the reviewed type
/// (an earlier apply of the same plan wrote it, or a member or the server did) is said as such,
/// instead of "changed since plan"; where the audit table may be read, the note names the
/// backfill run that wrote it.
async fn name_earlier_writes(
    pool: &db::Pool,
    dispositions: &mut Dispositions,
    audit_readable: bool,
) -> Result<()> {
    const CHANGED: Disposition = Disposition::Departed(SkipReason::ChangedSincePlan);
    const ALREADY: Disposition = Disposition::Departed(SkipReason::AlreadyWritten);
    let ids: Vec<uuid::Uuid> = dispositions
        .iter()
        .filter(|fate| fate.disposition == CHANGED)
        .map(|fate| fate.planned.at.profile_id)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let mut transaction = db::begin_read_only(pool).await?;
    let rows = db::profiles_by_id(&mut transaction, &ids).await?;
    transaction
        .rollback()
        .await
        .context("could not close the read of the reviewed profiles")?;
    let columns: std::collections::HashMap<uuid::Uuid, AgentsColumn> = rows
        .iter()
        .map(|row| Ok((row.id, plan::parse_column(row)?)))
        .collect::<Result<_>>()?;
    let carries_target = |planned: &PlannedFlip| {
        let target = Flip {
            from: serde_json::Value::String(planned.at.flip.to.clone()),
            ..planned.at.flip.clone()
        };
        columns
            .get(&planned.at.profile_id)
            .is_some_and(|column| column.carries(&target))
    };
    let mut done = Vec::new();
    for fate in dispositions.iter_mut() {
        if fate.disposition == CHANGED && carries_target(&fate.planned) {
            fate.disposition = ALREADY;
            fate.planned.basis = Basis::Reviewed(Reviewed::AlreadyCarried);
            done.push(fate.planned.at.clone());
        }
    }
    if !audit_readable || done.is_empty() {
        return Ok(());
    }
    let written = db::written_by(pool, &done).await?;
    for fate in dispositions.iter_mut() {
        if fate.disposition != ALREADY {
            continue;
        }
        if let Some(run_id) = written.get(&fate.planned.at.element()) {
            fate.planned.basis = Basis::Reviewed(Reviewed::WrittenBy(run_id.clone()));
        }
    }
    Ok(())
}

/// Whether the crawler's log may be read. `--min-corroboration` cannot work without it.
async fn evidence_access(session: &db::Session, guards: &Guards) -> Result<EvidenceAccess> {
    match db::audit_log_unreadable(&session.pool).await? {
        None => Ok(EvidenceAccess::Readable),
        Some(why) if guards.min_corroboration.is_some() => {
            Err(Failure::Preflight(Preflight::CrawlerLogUnreadable {
                why,
                user: session.target.user.clone(),
            })
            .into())
        }
        Some(why) => Ok(EvidenceAccess::Unavailable(why)),
    }
}
