//! The plan: every flip the rule finds, read inside one read-only snapshot of the registry.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use tracing::{info, warn};
use uuid::Uuid;

use crate::db::{self, CrawlerEvidence, ProfileRow, SnapshotRow};
use crate::events::FlipEvent;
use crate::progress;
use crate::report::age;
use crate::resolver::{AgentsColumn, Flip};

/// What a revert puts back in an element's `type` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restore {
    /// This exact JSON text (JSON `null` included), kept losslessly however deep it nests.
    Json(String),
    /// The element had no `type` key: the key is removed.
    Absent,
}

/// A flip the plan found, with the profile it belongs to.
#[derive(Debug, Clone)]
pub struct PlannedFlip {
    pub profile_id: Uuid,
    pub label: String,
    pub flip: Flip,
    /// The snapshot behind the decision; `None` when the flip comes from an invalid stored type.
    pub probe: Option<SnapshotRow>,
    /// What to write when it is not the string `flip.to`: a revert restores the stored value
    /// exactly, or removes a `type` key that was absent.
    pub restore: Option<Restore>,
    /// Replaces the probe description in the run log (a revert names the run it undoes).
    pub note: Option<String>,
    /// The crawler's logged disagreements for this url, when they were read.
    pub evidence: Option<CrawlerEvidence>,
}

impl PlannedFlip {
    pub fn found(row_id: Uuid, label: &str, flip: Flip, probe: Option<SnapshotRow>) -> Self {
        PlannedFlip {
            profile_id: row_id,
            label: label.to_owned(),
            flip,
            probe,
            restore: None,
            note: None,
            evidence: None,
        }
    }

    /// The flip as the run log shows it; `now` dates the probe.
    pub fn event(&self, now: DateTime<Utc>) -> FlipEvent {
        FlipEvent {
            profile_id: self.profile_id,
            profile: self.label.clone(),
            index: self.flip.index,
            url: self.flip.url.clone(),
            from: self.flip.from.clone(),
            to: self.flip.to.clone(),
            probed_at: self.probe.as_ref().map(|probe| probe.last_discovered),
            discovery_error: self
                .probe
                .as_ref()
                .is_some_and(|probe| probe.discovery_error),
            oauth_required: self
                .probe
                .as_ref()
                .is_some_and(|probe| probe.oauth_required),
            crawler_disagreements: self.evidence.clone(),
            probe_note: self.probe_note(now),
        }
    }

    /// `probed 3d ago`, with the snapshot's warning signs; `no snapshot` for a legacy type.
    fn probe_note(&self, now: DateTime<Utc>) -> String {
        if let Some(note) = &self.note {
            return note.clone();
        }
        let Some(probe) = &self.probe else {
            return "no snapshot".to_owned();
        };
        let mut note = format!("probed {} ago", age(now - probe.last_discovered));
        if probe.discovery_error {
            note.push_str(", discovery error");
        }
        if probe.oauth_required {
            note.push_str(", needs OAuth");
        }
        note
    }

    /// The order every log lists flips in: profile label, then element index.
    pub fn log_order(&self) -> (&str, Uuid, usize) {
        (&self.label, self.profile_id, self.flip.index)
    }
}

/// `items` in the order every log and plan file lists flips, so two logs of the same data diff
/// cleanly; by reference, since a plan can hold thousands of flips.
pub fn in_log_order<T>(items: &[T], flip: impl Fn(&T) -> &PlannedFlip) -> Vec<&T> {
    let mut ordered: Vec<&T> = items.iter().collect();
    ordered.sort_by(|a, b| flip(a).log_order().cmp(&flip(b).log_order()));
    ordered
}

#[derive(Debug, Default)]
pub struct Plan {
    pub flips: Vec<PlannedFlip>,
    pub profiles_scanned: u64,
    pub profiles_changed: u64,
    pub malformed: u64,
    pub junk_elements: u64,
    /// Non-empty `inferred_type` values outside the rule's vocabulary, with their counts.
    pub unrecognised_inferred_types: BTreeMap<String, u64>,
}

impl Plan {
    /// Profiles with at least one of `flips`.
    pub fn count_profiles<'f>(flips: impl Iterator<Item = &'f PlannedFlip>) -> u64 {
        let profiles: BTreeSet<Uuid> = flips.map(|planned| planned.profile_id).collect();
        u64::try_from(profiles.len()).unwrap_or(u64::MAX)
    }
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

    pub async fn cancel(&self, pool: &db::Pool) {
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

/// What planning reads besides the rule's own inputs.
pub struct PlanOptions<'a> {
    pub batch_size: usize,
    pub statement_timeout: Duration,
    pub backend: &'a PlanningBackend,
    /// Read the crawler's disagreement log for the flips' urls.
    pub evidence: EvidenceAccess,
}

/// Whether the crawler's rows in `type_reclassification_log` may be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvidenceAccess {
    Readable,
    /// Why not, as every flip then says.
    Unavailable(String),
}

/// Reads the registry once inside one read-only snapshot. The server checks every agent against
/// the snapshots in a single pass and names the profiles that may hold a flip; only those are read
/// back and decided by the Rust resolver. Only flips are kept.
pub async fn plan(pool: &db::Pool, options: &PlanOptions<'_>) -> Result<Plan> {
    let mut transaction = db::begin_read_only(pool).await?;
    options
        .backend
        .record(db::backend_pid(&mut transaction).await?);
    let census = db::census(&mut transaction).await?;
    let scanning = progress::spinner(format!(
        "planning: the server is checking the agents of {} profiles",
        census.profiles
    ));
    let candidates = db::flip_candidates(&mut transaction)
        .await
        .map_err(|error| {
            if db::is_statement_timeout(&error) {
                error.context(format!(
                    "the planning pass reads every agent in one statement and ran past \
                     --statement-timeout '{:?}': raise it (the benchmark's 2-core server needs \
                     about 5 s per million profiles)",
                    options.statement_timeout
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
        unrecognised_inferred_types: db::unrecognised_inferred_types(&mut transaction).await?,
        ..Plan::default()
    };
    let bar = progress::bar(candidates.profile_ids.len(), "resolving candidates");
    for ids in candidates.profile_ids.chunks(options.batch_size.max(1)) {
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
            plan.flips.extend(verdict.flips.into_iter().map(|flip| {
                let probe = snapshots.get(&flip.url).cloned();
                PlannedFlip::found(row.id, &label, flip, probe)
            }));
        }
        bar.inc(u64::try_from(ids.len()).unwrap_or(u64::MAX));
    }
    bar.finish_and_clear();
    attach_evidence(&mut transaction, &mut plan.flips, &options.evidence).await?;
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

/// Puts the crawler's own record of each flip's disagreement beside it: one query for every url.
pub async fn attach_evidence(
    connection: &mut PgConnection,
    flips: &mut [PlannedFlip],
    access: &EvidenceAccess,
) -> Result<()> {
    if flips.is_empty() {
        return Ok(());
    }
    let logged = match access {
        EvidenceAccess::Unavailable(why) => {
            let unavailable = CrawlerEvidence::unavailable(why);
            for planned in flips.iter_mut() {
                planned.evidence = Some(unavailable.clone());
            }
            return Ok(());
        }
        EvidenceAccess::Readable => {
            let urls: BTreeSet<&str> = flips
                .iter()
                .map(|planned| planned.flip.url.as_str())
                .collect();
            db::crawler_disagreements(connection, &urls.into_iter().collect::<Vec<_>>()).await?
        }
    };
    for planned in flips.iter_mut() {
        let rows = logged
            .get(&planned.flip.url)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        planned.evidence = Some(CrawlerEvidence::for_flip(rows, &planned.flip.to));
    }
    Ok(())
}

pub fn parse_column(row: &ProfileRow) -> Result<AgentsColumn> {
    match &row.agents {
        None => Ok(AgentsColumn::Malformed),
        Some(text) => AgentsColumn::parse(text)
            .with_context(|| format!("could not parse agents of profile '{}'", row.id)),
    }
}
