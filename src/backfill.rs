//! One backfill run, in the order of the runbook: preflight, plan, hold what the guards hold,
//! check the limits, write, report. The dry-run and the apply share every step up to the write.

use std::collections::BTreeMap;

use anyhow::Result;
use chrono::{DateTime, Utc};
use tracing::info;

use crate::config::{BackfillConfig, Guards};
use crate::db::{self, Needs};
use crate::error::Failure;
use crate::events::{Event, Held, HoldReason, Mode, Skipped, Summary};
use crate::interrupt::StopSignal;
use crate::plan::{self, EvidenceAccess, Plan, PlanOptions, PlannedFlip, PlanningBackend};
use crate::plan_file::{hold_to_review, Fingerprint, PlanFile};
use crate::report::Printer;
use crate::resolver::{is_valid_agent_type, UNKNOWN_TYPE};
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
    let plan = run.plan(plan::plan(&pool, &options), &backend).await?;
    let holds = |planned: &PlannedFlip| hold(planned, &config.guards, &plan, run.started_at);
    if let Some(path) = &config.plan_out {
        PlanFile::new(&plan, &holds, fingerprint, &run.run_id, run.started_at).write(path)?;
        info!(path = %path.display(), flips = plan.flips.len(), "plan written");
    }
    let (kept, departures) = match &reviewed {
        Some(reviewed) => hold_to_review(plan.flips.clone(), reviewed),
        None => (plan.flips.clone(), Vec::new()),
    };

    // 3. Hold what a guard distrusts, then check the limits on the rest.
    let (writable, held): (Vec<_>, Vec<_>) = kept
        .into_iter()
        .map(|planned| {
            // A flip the reviewed plan marks held stays held, whatever guards this run has.
            let reviewed_hold = reviewed
                .as_ref()
                .and_then(|reviewed| reviewed.held_reason(&planned))
                .map(|reason| (reason, None));
            let hold = holds(&planned).or(reviewed_hold);
            (planned, hold)
        })
        .partition(|(_, hold)| hold.is_none());
    let writable: Vec<PlannedFlip> = writable.into_iter().map(|(planned, _)| planned).collect();
    let held: Vec<(PlannedFlip, (HoldReason, Option<String>))> = held
        .into_iter()
        .filter_map(|(planned, hold)| Some((planned, hold?)))
        .collect();

    run.print_flips(
        writable.clone(),
        |planned| planned,
        |planned, now| Event::Flip(planned.event(now)),
    )?;
    if let Some(path) = &config.plan_out {
        run.print(Event::PlanWritten {
            path: path.display().to_string(),
            flips: plan.flips.len(),
        })?;
    }
    run.print_flips(
        held.clone(),
        |(planned, _)| planned,
        |(planned, (reason, inferred)), now| {
            Event::Held(Held {
                flip: planned.event(now),
                reason: *reason,
                inferred_type: inferred.clone(),
            })
        },
    )?;
    run.print_flips(
        departures.clone(),
        |(planned, _)| planned,
        |(planned, reason), now| {
            Event::Skipped(Skipped {
                flip: planned.event(now),
                reason: *reason,
            })
        },
    )?;

    let mut summary = Summary {
        profiles_scanned: plan.profiles_scanned,
        profiles_changed: Plan::count_profiles(
            writable
                .iter()
                .chain(held.iter().map(|(planned, _)| planned)),
        ),
        flips: count(writable.len() + held.len()),
        held: count(held.len()),
        malformed: plan.malformed,
        junk_elements: plan.junk_elements,
        unrecognised_inferred_types: plan.unrecognised_inferred_types.clone(),
        ..Summary::default()
    };
    for (_, reason) in &departures {
        summary.count_skip(*reason);
    }
    for planned in writable
        .iter()
        .chain(held.iter().map(|(planned, _)| planned))
    {
        *summary
            .transitions
            .entry(planned.event(run.started_at).transition())
            .or_default() += 1;
    }

    let refusal = if held.is_empty() {
        check_transitions(&mut run, &writable, &config.guards)?
            .or_else(|| check_threshold(writable.len(), config.run.max_flips))
    } else {
        Some(Failure::Held {
            held: held.len(),
            reasons: held_reasons(&held),
        })
    };

    // 4. Write, and 5. report.
    run.write_and_report(Ending {
        flips: &writable,
        refusal,
        summary,
        batch_size: config.run.batch_size,
        write_attempts: config.run.write_attempts,
        recheck: &ResolveAgain,
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

/// Why a guard holds `planned` back, if one does. The rule found the flip; these say the rule,
/// or the probe behind it, may be wrong about it.
pub fn hold(
    planned: &PlannedFlip,
    guards: &Guards,
    plan: &Plan,
    now: DateTime<Utc>,
) -> Option<(HoldReason, Option<String>)> {
    let inferred = planned
        .probe
        .as_ref()
        .and_then(|probe| probe.inferred_type.as_deref());
    if let Some(inferred) = inferred.filter(|name| !name.is_empty() && !is_valid_agent_type(name)) {
        return Some((
            HoldReason::UnrecognisedInferredType,
            Some(inferred.to_owned()),
        ));
    }
    if let Some(stored) = planned
        .flip
        .from
        .as_str()
        .filter(|stored| plan.unrecognised_inferred_types.contains_key(*stored))
    {
        return Some((
            HoldReason::UnrecognisedInferredType,
            Some(stored.to_owned()),
        ));
    }
    if let (Some(max_age), Some(probe)) = (guards.max_probe_age, &planned.probe) {
        let limit = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        if now - probe.last_discovered > limit {
            return Some((HoldReason::StaleProbe, None));
        }
    }
    if let Some(minimum) = guards.min_corroboration {
        let reclassification = planned
            .flip
            .from
            .as_str()
            .is_some_and(|from| from != UNKNOWN_TYPE)
            && planned.flip.to != UNKNOWN_TYPE;
        let agreeing = planned
            .evidence
            .as_ref()
            .map_or(0, |evidence| evidence.agreeing());
        if reclassification && agreeing < minimum {
            return Some((HoldReason::Uncorroborated, None));
        }
    }
    None
}

fn held_reasons(held: &[(PlannedFlip, (HoldReason, Option<String>))]) -> Vec<String> {
    let mut reasons: BTreeMap<HoldReason, Vec<String>> = BTreeMap::new();
    for (_, (reason, inferred)) in held {
        let names = reasons.entry(*reason).or_default();
        names.extend(inferred.clone());
    }
    reasons
        .into_iter()
        .map(|(reason, mut names)| {
            names.sort();
            names.dedup();
            let reason = serde_json::to_value(reason)
                .ok()
                .and_then(|value| value.as_str().map(str::to_owned))
                .unwrap_or_default();
            if names.is_empty() {
                reason
            } else {
                format!("{reason} '{}'", names.join("', '"))
            }
        })
        .collect()
}

/// More flips than `--max-flips`: the run writes nothing.
pub fn check_threshold(flips: usize, max_flips: usize) -> Option<Failure> {
    (flips > max_flips).then_some(Failure::ThresholdExceeded { flips, max_flips })
}

/// `--allow-transition`: a plan holding any other transition is written not at all.
fn check_transitions(
    run: &mut Run<'_>,
    flips: &[PlannedFlip],
    guards: &Guards,
) -> Result<Option<Failure>> {
    if guards.allow_transitions.is_empty() {
        return Ok(None);
    }
    let refused: Vec<&PlannedFlip> = flips
        .iter()
        .filter(|planned| {
            let from = planned.flip.from_label();
            !guards
                .allow_transitions
                .iter()
                .any(|allowed| allowed.from == from && allowed.to == planned.flip.to)
        })
        .collect();
    if refused.is_empty() {
        return Ok(None);
    }
    let mut transitions: Vec<String> = refused
        .iter()
        .map(|planned| format!("{}:{}", planned.flip.from_label(), planned.flip.to))
        .collect();
    transitions.sort();
    transitions.dedup();
    run.print_flips(
        refused,
        |planned| planned,
        |planned, now| Event::NotAllowed(planned.event(now)),
    )?;
    Ok(Some(Failure::TransitionNotAllowed { transitions }))
}
