//! Reading the audit trail back: `history` lists runs, `revert` undoes one through the same write
//! path, threshold and log as the backfill.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;

use anyhow::{Context, Result};
use serde_json::Value;
use tracing::warn;
use uuid::Uuid;

use crate::config::{HistoryConfig, RevertConfig};
use crate::db::{self, AuditEntry, Snapshots};
use crate::dispositions::{Census, Disposition, Dispositions};
use crate::domain::{Mode, ProfileFlip, SkipReason};
use crate::error::{Failure, Usage};
use crate::events::{HistoryRow, HistoryRun, Summary};
use crate::interrupt::StopSignal;
use crate::plan::{parse_column, Basis, PlannedFlip, PlanningBackend, Restore, Reversal};
use crate::report::history::Listing;
use crate::report::{self, Printer};
use crate::resolver::{bounded_type, type_label, AgentsColumn, Flip};
use crate::run::{open_session, Run};
use crate::write::Recheck;

/// `history [RUN_ID]`: the runs in `type_reclassification_log`, or one run's rows, printed by
/// the history printer in `report::history`. It only reads: no run id, no write run, no summary.
pub async fn history(config: &HistoryConfig, out: &mut (dyn Write + Send)) -> Result<()> {
    let session = open_session(&config.connect, "agent-type-backfill history").await?;
    db::preflight(&session.pool, db::Needs::ReadAudit).await?;
    let listing = match &config.run_id {
        None => Listing::Runs(
            db::backfill_runs(&session.pool)
                .await?
                .into_iter()
                .map(HistoryRun::from)
                .collect(),
        ),
        Some(wanted) => {
            let entries = db::run_entries(&session.pool, wanted).await?;
            if entries.is_empty() {
                return Err(no_such_run(wanted));
            }
            Listing::Rows {
                run_id: wanted.clone(),
                rows: entries.into_iter().map(HistoryRow::from).collect(),
            }
        }
    };
    session.pool.close().await;
    report::history::print(config.format, out, &listing)
}

fn no_such_run(run_id: &str) -> anyhow::Error {
    Failure::Usage(Usage::NoSuchRun {
        run_id: run_id.to_owned(),
    })
    .into()
}

/// `revert`: write only where the element still carries the type the reverted run wrote; the
/// audit notes record which run is being reverted.
struct StillCarriesFrom {
    reverts: String,
}

impl Recheck for StillCarriesFrom {
    fn reads_snapshots(&self) -> bool {
        false
    }

    fn holding(&self, column: &AgentsColumn, _: &Snapshots, planned: &[&PlannedFlip]) -> Vec<Flip> {
        planned
            .iter()
            .filter(|planned| column.carries(&planned.at.flip))
            .map(|planned| planned.at.flip.clone())
            .collect()
    }

    fn stale_reason(&self) -> SkipReason {
        SkipReason::ChangedSinceRun
    }

    fn notes_extra(&self) -> Value {
        serde_json::json!({ "reverts": self.reverts })
    }
}

/// `revert RUN_ID`: restores the old type of every element that still carries the type the run
/// wrote. Elements changed since are conflicts: reported and left alone.
pub async fn revert(
    config: &RevertConfig,
    printer: &mut dyn Printer,
    stop: StopSignal,
) -> Result<Summary> {
    let mut run = Run::open(&config.connect, config.run.mode, printer, stop).await?;
    // Even a dry-run reads the audit table here.
    let needs = match run.mode {
        Mode::Apply => db::Needs::RevertApply,
        Mode::DryRun => db::Needs::ReadAudit,
    };
    crate::run::preflight(&run.session, run.mode, needs, config.run.max_replica_lag).await?;
    let entries = db::run_entries(&run.session.pool, &config.reverted_run).await?;
    if entries.is_empty() {
        return Err(no_such_run(&config.reverted_run));
    }
    run.header(config.run.max_flips, Some(&config.reverted_run), None)?;
    let steps = plan_and_write(&mut run, config, &entries).await;
    run.conclude(steps).await
}

/// The revert's plan (what still carries the reverted run's types, and the conflicts), its
/// threshold, and its write.
async fn plan_and_write(
    run: &mut Run<'_>,
    config: &RevertConfig,
    entries: &[AuditEntry],
) -> Result<()> {
    let pool = run.session.pool.clone();
    let planning = plan_revert(&pool, &config.reverted_run, entries);
    let (dispositions, profiles) = run.plan(planning, &PlanningBackend::default()).await?;
    run.census = Census {
        complete: true,
        profiles_scanned: profiles,
        ..Census::default()
    };
    run.list_plan(dispositions)?;
    let recheck = StillCarriesFrom {
        reverts: config.reverted_run.clone(),
    };
    run.write(config.run.pace(), &recheck).await
}

/// Where an audit row says its change was made.
enum Restorable {
    /// The row names the profile and the element.
    At { profile_id: Uuid, index: usize },
    /// The row lacks a profile id or an element index: nothing can be restored from it. It
    /// keeps what the row does name, for the log.
    Unlocatable {
        profile_id: Option<Uuid>,
        index: Option<usize>,
    },
}

impl Restorable {
    fn of(entry: &AuditEntry) -> Restorable {
        let profile_id = entry
            .member_id
            .as_deref()
            .and_then(|id| id.parse::<Uuid>().ok());
        let index = entry.index().and_then(|index| usize::try_from(index).ok());
        match (profile_id, index) {
            (Some(profile_id), Some(index)) => Restorable::At { profile_id, index },
            (profile_id, index) => Restorable::Unlocatable { profile_id, index },
        }
    }
}

/// The run's audit rows as flips to restore and conflicts (departed, `changed_since_run`),
/// against current data in one read-only snapshot, with the number of profiles the run touched.
async fn plan_revert(
    pool: &db::Pool,
    reverted: &str,
    entries: &[AuditEntry],
) -> Result<(Dispositions, u64)> {
    let ids: BTreeSet<Uuid> = entries
        .iter()
        .filter_map(|entry| match Restorable::of(entry) {
            Restorable::At { profile_id, .. } => Some(profile_id),
            Restorable::Unlocatable { .. } => None,
        })
        .collect();
    let ids: Vec<Uuid> = ids.into_iter().collect();
    let mut transaction = db::begin_read_only(pool).await?;
    let rows = db::profiles_by_id(&mut transaction, &ids).await?;
    transaction
        .rollback()
        .await
        .context("could not close the planning transaction")?;
    let columns: HashMap<Uuid, AgentsColumn> = rows
        .iter()
        .map(|row| Ok((row.id, parse_column(row)?)))
        .collect::<Result<_>>()?;

    let mut legacy_unknown = 0usize;
    let mut dispositions = Dispositions::default();
    for entry in entries {
        // The stored value exactly as the run found it, however deep; the log shows it as the
        // resolver would.
        let (restore, to, legacy) = restore_of(entry)?;
        legacy_unknown += usize::from(legacy);
        let location = Restorable::of(entry);
        let (profile_id, index) = match location {
            Restorable::At { profile_id, index } => (profile_id, index),
            // Only ever listed as a conflict: the log shows what the row holds, and the maximum
            // index for an element it does not name.
            Restorable::Unlocatable { profile_id, index } => {
                (profile_id.unwrap_or_default(), index.unwrap_or(usize::MAX))
            }
        };
        let flip = Flip {
            index,
            url: entry.agent_url.clone(),
            from: Value::String(entry.new_type.clone()),
            to,
        };
        let planned = PlannedFlip::new(
            ProfileFlip::new(profile_id, entry.label(), flip),
            Basis::Reverts(Reversal {
                run_id: reverted.to_owned(),
                restore,
                legacy_unknown: legacy,
                restored_by: None,
            }),
        );
        let holds = matches!(location, Restorable::At { .. })
            && columns
                .get(&profile_id)
                .is_some_and(|column| column.carries(&planned.at.flip));
        let disposition = if holds {
            Disposition::ToWrite
        } else {
            Disposition::Departed(SkipReason::ChangedSinceRun)
        };
        dispositions.push(planned, disposition);
    }
    let conflict = |disposition: &Disposition| *disposition != Disposition::ToWrite;
    if dispositions.count(conflict) > 0 {
        let restored = db::restored_by(pool, reverted).await?;
        for fate in dispositions.iter_mut() {
            if !conflict(&fate.disposition) {
                continue;
            }
            if let (Some(revert), Basis::Reverts(reversal)) = (
                restored.get(&fate.planned.at.element()),
                &mut fate.planned.basis,
            ) {
                reversal.restored_by = Some(revert.clone());
            }
        }
    }
    if legacy_unknown > 0 {
        warn!(
            rows = legacy_unknown,
            "audit rows of run '{reverted}' record the old type \"unknown\" without saying \
             whether the element had no type key, a JSON null or the string \"unknown\" (they \
             were written before the tool told these apart): revert restores the string \
             \"unknown\" there; it cannot know which it was"
        );
    }
    Ok((dispositions, crate::domain::count(ids.len())))
}

/// How the log shows a restored absent `type` key.
pub(crate) const ABSENT_TYPE_LABEL: &str = "(no type key)";

/// What a revert puts back for `entry`, the label the log shows for it, and whether the row
/// predates exact old types and records "unknown", so the original may have been absent or null.
fn restore_of(entry: &AuditEntry) -> Result<(Restore, String, bool)> {
    let type_key = entry
        .notes
        .as_ref()
        .and_then(|notes| notes.get("type_key"))
        .and_then(Value::as_str);
    if type_key == Some("absent") {
        return Ok((Restore::Absent, ABSENT_TYPE_LABEL.to_owned(), false));
    }
    // A row of an earlier version: `from` holds the stored value, except that an absent or null
    // type was written as "unknown". Rows older still may lack `from`: the `old_type` column.
    let raw = entry.from_json.clone().unwrap_or_else(|| {
        Value::String(
            entry
                .old_type
                .clone()
                .unwrap_or_else(|| "unknown".to_owned()),
        )
        .to_string()
    });
    let shown = bounded_type(&raw)
        .with_context(|| format!("audit row {} holds a malformed notes.from", entry.id))?;
    let legacy = type_key.is_none() && shown.as_str() == Some(crate::resolver::UNKNOWN_TYPE);
    Ok((Restore::Json(raw), type_label(&shown), legacy))
}
