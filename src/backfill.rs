//! One backfill run, in the order of the runbook: preflight, plan, hold what the guards hold,
//! check the limits, write, report. The dry-run and the apply share every step up to the write.

use anyhow::Result;
use tracing::info;

use crate::config::{BackfillConfig, Guards};
use crate::db::{self, Needs};
use crate::error::Failure;
use crate::events::{Event, Mode, Skipped, Summary};
use crate::guard::{
    check_threshold, held_refusal, not_allowed, transitions_refusal, HeldFlip, Holds,
};
use crate::interrupt::StopSignal;
use crate::plan::{self, EvidenceAccess, Plan, PlanOptions, PlanningBackend};
use crate::plan_file::{hold_to_review, Fingerprint, PlanFile};
use crate::report::Printer;
use crate::run::{Ending, Run};
use crate::write::ResolveAgain;

/// Runs the backfill `config` describes, printing its log to `printer`, stopping between
/// batches when `stop` fires.
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
    db::preflight(&run.session.pool, needs).await?;
    let evidence = evidence_access(&run.session, &config.guards).await?;
    run.leave_held = config.leave_held;
    run.header(config.run.max_flips, None)?;

    // 2. Plan.
    let backend = PlanningBackend::default();
    let options = PlanOptions {
        batch_size: config.run.batch_size,
        statement_timeout: config.connect.statement_timeout,
        backend: &backend,
        evidence,
    };
    let pool = run.session.pool.clone();
    let mut plan = run.plan(plan::plan(&pool, &options), &backend).await?;
    let holds = Holds {
        guards: &config.guards,
        unrecognised_inferred_types: &plan.unrecognised_inferred_types,
        now: run.started_at,
        reviewed: reviewed.as_ref(),
    };
    if let Some(path) = &config.plan_out {
        PlanFile::new(
            &plan,
            &|planned| holds.reason(planned),
            fingerprint,
            &run.run_id,
            run.started_at,
        )
        .write(path)?;
        info!(path = %path.display(), flips = plan.flips.len(), "plan written");
    }
    let planned_flips = plan.flips.len();
    let found = std::mem::take(&mut plan.flips);
    let (kept, departures) = match &reviewed {
        Some(reviewed) => hold_to_review(found, reviewed),
        None => (found, Vec::new()),
    };

    // 3. Hold what a guard distrusts, then check the limits on the rest.
    let (writable, held) = holds.split(kept);
    run.print_flips(
        &writable,
        |planned| planned,
        |planned, now| Event::Flip(planned.event(now)),
    )?;
    if let Some(path) = &config.plan_out {
        run.print(Event::PlanWritten {
            path: path.display().to_string(),
            flips: planned_flips,
        })?;
    }
    run.print_flips(&held, |held| &held.planned, HeldFlip::event)?;
    run.print_flips(
        &departures,
        |(planned, _)| planned,
        |(planned, reason), now| {
            Event::Skipped(Skipped {
                flip: planned.event(now),
                reason: *reason,
            })
        },
    )?;

    let found = writable.iter().chain(held.iter().map(|held| &held.planned));
    let mut summary = Summary {
        profiles_scanned: plan.profiles_scanned,
        profiles_changed: Plan::count_profiles(found.clone()),
        flips: count(writable.len() + held.len()),
        held: count(held.len()),
        malformed: plan.malformed,
        junk_elements: plan.junk_elements,
        unrecognised_inferred_types: plan.unrecognised_inferred_types.clone(),
        ..Summary::default()
    };
    for planned in found {
        summary.count_transition(&planned.flip);
    }
    for (_, reason) in &departures {
        summary.count_skip(*reason);
    }

    // `--leave-held` (only with a reviewed plan): the held flips are listed and left unwritten.
    let refusal = match held_refusal(&held).filter(|_| !config.leave_held) {
        Some(refusal) => Some(refusal),
        None => {
            let refused = not_allowed(&writable, &config.guards.allow_transitions);
            run.print_flips(
                &refused,
                |planned| planned,
                |planned, now| Event::NotAllowed(planned.event(now)),
            )?;
            transitions_refusal(&refused)
                .or_else(|| check_threshold(writable.len(), config.run.max_flips))
        }
    };

    // 4. Write, and 5. report.
    run.write_and_report(Ending {
        flips: &writable,
        refusal,
        summary,
        batch_size: config.run.batch_size,
        write_attempts: config.run.write_attempts,
        recheck: &ResolveAgain {
            left_held: config.leave_held.then(|| count(held.len())),
        },
    })
    .await
}

fn count(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Whether the crawler's log may be read. `--min-corroboration` cannot work without it.
async fn evidence_access(session: &db::Session, guards: &Guards) -> Result<EvidenceAccess> {
    match db::audit_log_unreadable(&session.pool).await? {
        None => Ok(EvidenceAccess::Readable),
        Some(why) if guards.min_corroboration.is_some() => Err(Failure::Preflight(format!(
            "preflight failed, nothing was read or written: --min-corroboration reads the \
             crawler's rows in type_reclassification_log, but there is {why}: GRANT SELECT ON \
             type_reclassification_log TO {}, or run without --min-corroboration",
            session.target.user
        ))
        .into()),
        Some(why) => Ok(EvidenceAccess::Unavailable(why)),
    }
}
