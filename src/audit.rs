//! Reading the audit trail back: `history` lists runs, `revert` undoes one through the same write
//! path, threshold and report as the backfill.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::backfill::{
    self, check_threshold, finish, new_run_id, open_session, Ending, PlannedFlip, Recheck, VERSION,
};
use crate::cli::{Format, HistoryArgs, RevertArgs};
use crate::db::{self, AuditEntry};
use crate::error::Failure;
use crate::interrupt::StopSignal;
use crate::report::{printable, Header, Reporter, SkipReason, Summary};
use crate::resolver::{type_label, Flip};

/// `history [RUN_ID]`: the runs in `type_reclassification_log`, or one run's rows.
pub async fn history(args: &HistoryArgs, url: &str, out: &mut (dyn Write + Send)) -> Result<()> {
    let run_id = new_run_id(Utc::now());
    let session = open_session(url, &args.connect, &run_id).await?;
    db::preflight(&session.pool, db::Needs::ReadAudit).await?;
    let mut lines = Vec::new();
    match &args.run_id {
        None => {
            let runs = db::backfill_runs(&session.pool).await?;
            match args.format {
                Format::Json => lines.extend(runs.iter().map(|run| {
                    let mut event = json!(run);
                    event["event"] = json!("run");
                    event.to_string()
                })),
                Format::Text => {
                    lines.push(format!(
                        "{:<31}  {:<20}  {:<20}  {:>6}  {:>8}  reverts",
                        "run id", "first change", "last change", "flips", "profiles"
                    ));
                    lines.extend(runs.iter().map(|run| {
                        format!(
                            "{:<31}  {:<20}  {:<20}  {:>6}  {:>8}  {}",
                            run.run_id,
                            run.first_change.to_rfc3339_opts(SecondsFormat::Secs, true),
                            run.last_change.to_rfc3339_opts(SecondsFormat::Secs, true),
                            run.flips,
                            run.profiles,
                            run.reverts.as_deref().unwrap_or("-")
                        )
                    }));
                    lines.push(format!("{} runs", runs.len()));
                }
            }
        }
        Some(wanted) => {
            let entries = db::run_entries(&session.pool, wanted).await?;
            if entries.is_empty() {
                return Err(no_such_run(wanted));
            }
            match args.format {
                Format::Json => lines.extend(entries.iter().map(|entry| {
                    let mut event = json!(entry);
                    event["event"] = json!("row");
                    event.to_string()
                })),
                Format::Text => {
                    lines.extend(entries.iter().map(|entry| {
                        format!(
                            "{}  {}  {}  {}  {} -> {}",
                            entry.changed_at.to_rfc3339_opts(SecondsFormat::Secs, true),
                            printable(&entry_label(entry)),
                            printable(&entry.agent_url),
                            entry
                                .notes
                                .as_ref()
                                .and_then(|notes| notes.get("index"))
                                .map_or("?".to_owned(), Value::to_string),
                            printable(entry.old_type.as_deref().unwrap_or("(none)")),
                            printable(&entry.new_type)
                        )
                    }));
                    lines.push(format!("{} rows in run {wanted}", entries.len()));
                }
            }
        }
    }
    session.pool.close().await;
    for line in lines {
        writeln!(out, "{line}").context("could not write to stdout")?;
    }
    Ok(())
}

fn no_such_run(run_id: &str) -> anyhow::Error {
    Failure::Usage(format!(
        "no audit rows with run id '{run_id}' and source 'backfill_script': list the runs with \
         'agent-type-backfill history'"
    ))
    .into()
}

fn entry_label(entry: &AuditEntry) -> String {
    entry
        .notes
        .as_ref()
        .and_then(|notes| notes.get("profile"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| entry.member_id.clone())
        .unwrap_or_default()
}

/// `revert RUN_ID`: restores the old type of every element that still carries the type the run
/// wrote. Elements changed since are conflicts: reported and left alone.
pub async fn revert(
    args: &RevertArgs,
    url: &str,
    out: &mut (dyn Write + Send),
    mut stop: StopSignal,
) -> Result<Summary> {
    let clock = Instant::now();
    let mode = args.mode.mode();
    let started_at = Utc::now();
    let run_id = new_run_id(started_at);
    let session = open_session(url, &args.connect, &run_id).await?;
    let needs = match mode {
        crate::cli::Mode::Apply => db::Needs::RevertApply,
        _ => db::Needs::ReadAudit,
    };
    db::preflight(&session.pool, needs).await?;
    let entries = db::run_entries(&session.pool, &args.run_id).await?;
    if entries.is_empty() {
        return Err(no_such_run(&args.run_id));
    }

    let mut report = Reporter::new(args.run.format, out);
    report.header(&Header {
        version: VERSION,
        mode,
        target: &session.target,
        started_at,
        run_id: &run_id,
        max_flips: args.run.max_flips,
        reverts: Some(&args.run_id),
    })?;

    let (flips, conflicts, profiles) = tokio::select! {
        planned = plan_revert(&session.pool, &args.run_id, &entries) => planned?,
        signal = stop.wait() => {
            return Err(Failure::Interrupted { signal, written: 0, planned: 0, run_id }.into());
        }
    };
    for planned in &flips {
        report.flip(&planned.line(started_at))?;
    }
    for conflict in &conflicts {
        report.skipped(&conflict.line(started_at), SkipReason::ChangedSinceRun)?;
    }
    let summary = Summary {
        profiles_scanned: profiles,
        profiles_changed: flips
            .iter()
            .map(|flip| flip.profile_id)
            .collect::<BTreeSet<_>>()
            .len() as u64,
        flips: flips.len() as u64,
        skipped: conflicts.len() as u64,
        ..Summary::default()
    };

    let refusal = check_threshold(flips.len(), args.run.max_flips);
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
        flips: &flips,
        recheck: Recheck::StillCarriesFrom {
            reverts: args.run_id.clone(),
        },
    })
    .await
}

/// Splits the run's audit rows into restorable flips and conflicts, against current data in one
/// read-only snapshot. Returns them with the number of profiles the run touched.
async fn plan_revert(
    pool: &db::Pool,
    reverted: &str,
    entries: &[AuditEntry],
) -> Result<(Vec<PlannedFlip>, Vec<PlannedFlip>, u64)> {
    let ids: BTreeSet<Uuid> = entries
        .iter()
        .filter_map(|entry| entry.member_id.as_deref()?.parse().ok())
        .collect();
    let ids: Vec<Uuid> = ids.into_iter().collect();
    let mut transaction = db::begin_read_only(pool).await?;
    let rows = db::profiles_by_id(&mut transaction, &ids).await?;
    transaction
        .rollback()
        .await
        .context("could not close the planning transaction")?;
    let columns: HashMap<Uuid, (String, _)> = rows
        .iter()
        .map(|row| Ok((row.id, (row.label(), backfill::parse_column(row)?))))
        .collect::<Result<_>>()?;

    let note = format!("reverts {reverted}");
    let mut flips = Vec::new();
    let mut conflicts = Vec::new();
    for entry in entries {
        let restore = entry
            .notes
            .as_ref()
            .and_then(|notes| notes.get("from"))
            .cloned()
            .unwrap_or_else(|| json!(entry.old_type.as_deref().unwrap_or("unknown")));
        let index = entry
            .notes
            .as_ref()
            .and_then(|notes| notes.get("index"))
            .and_then(Value::as_u64);
        let profile_id = entry
            .member_id
            .as_deref()
            .and_then(|id| id.parse::<Uuid>().ok());
        let planned = PlannedFlip {
            profile_id: profile_id.unwrap_or(Uuid::nil()),
            label: entry_label(entry),
            flip: Flip {
                index: index.unwrap_or(u64::MAX) as usize,
                url: entry.agent_url.clone(),
                from: Value::String(entry.new_type.clone()),
                to: type_label(&restore),
            },
            probe: None,
            restore: Some(restore),
            note: Some(note.clone()),
        };
        let holds = profile_id
            .and_then(|id| columns.get(&id))
            .is_some_and(|(_, column)| index.is_some() && column.carries(&planned.flip));
        if holds {
            flips.push(planned);
        } else {
            conflicts.push(planned);
        }
    }
    // The writer batches consecutive flips of one profile together.
    flips.sort_by_key(|planned| (planned.profile_id, planned.flip.index));
    Ok((flips, conflicts, ids.len() as u64))
}
