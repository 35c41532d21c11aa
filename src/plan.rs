//! The plan: every flip the rule finds, read in chunks of profiles in key order, each chunk inside
//! a read-only snapshot of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::db::Transaction;
use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use tracing::{info, warn};
use uuid::Uuid;

use crate::db::{self, ProfileRow, SnapshotRow};
use crate::domain::{CrawlerEvidence, ProfileFlip};
use crate::events::FlipEvent;
use crate::progress;
use crate::report::basis_note;
use crate::resolver::AgentsColumn;

/// What a revert puts back in an element's `type` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Restore {
    /// This exact JSON text (JSON `null` included), kept losslessly however deep it nests.
    Json(String),
    /// The element had no `type` key: the key is removed.
    Absent,
}

/// Why a flip exists: what the plan knows behind it. One value instead of optional side fields,
/// so a flip cannot be both a probe's and a revert's, and every reader matches every case.
#[derive(Debug, Clone)]
pub(crate) enum Basis {
    /// The rule decided it from this crawler snapshot.
    Probe(SnapshotRow),
    /// The rule decided it without a snapshot: a stored type outside the vocabulary, demoted.
    NoSnapshot,
    /// A flip of the reviewed plan (`--plan`) that the plan made now does not find.
    Reviewed(Reviewed),
    /// `revert`: put back exactly what a run found.
    Reverts(Reversal),
}

impl Basis {
    /// The snapshot behind the flip, when a probe decided it.
    pub(crate) fn probe(&self) -> Option<&SnapshotRow> {
        match self {
            Basis::Probe(probe) => Some(probe),
            Basis::NoSnapshot | Basis::Reviewed(_) | Basis::Reverts(_) => None,
        }
    }

    /// What the backfill's rule found for this element, given the snapshot it read (or none).
    pub(crate) fn found(probe: Option<SnapshotRow>) -> Basis {
        probe.map_or(Basis::NoSnapshot, Basis::Probe)
    }
}

/// What became of a reviewed flip the plan made now does not find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reviewed {
    /// Listed in the reviewed plan; the element no longer matches it.
    InPlan,
    /// The element already carries the reviewed type, by whom is not known (a member, the
    /// server, or an apply whose audit rows cannot be read).
    AlreadyCarried,
    /// The element carries the reviewed type, written by the tool's run with this id.
    WrittenBy(String),
}

/// What a revert restores and what its log line says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reversal {
    /// The run being reverted.
    pub(crate) run_id: String,
    /// The stored value to put back.
    pub(crate) restore: Restore,
    /// The audit row predates exact old types and records "unknown": the original may have been
    /// an absent key or a JSON `null`.
    pub(crate) legacy_unknown: bool,
    /// A revert run that already restored this element.
    pub(crate) restored_by: Option<String>,
}

/// A flip the plan found: where it is, and what the plan knows behind it.
#[derive(Debug, Clone)]
pub(crate) struct PlannedFlip {
    pub(crate) at: ProfileFlip,
    pub(crate) basis: Basis,
    /// The crawler's logged disagreements for this url, when they were read.
    pub(crate) evidence: Option<CrawlerEvidence>,
}

impl PlannedFlip {
    pub(crate) fn new(at: ProfileFlip, basis: Basis) -> Self {
        PlannedFlip {
            at,
            basis,
            evidence: None,
        }
    }

    /// The snapshot behind the flip, when a probe decided it.
    pub(crate) fn probe(&self) -> Option<&SnapshotRow> {
        self.basis.probe()
    }

    /// The flip as the run log shows it; `now` dates the probe.
    pub(crate) fn event(&self, now: DateTime<Utc>) -> FlipEvent {
        let probe = self.probe();
        FlipEvent {
            at: self.at.clone(),
            probed_at: probe.map(|probe| probe.last_discovered),
            discovery_error: probe.is_some_and(|probe| probe.discovery_error),
            oauth_required: probe.is_some_and(|probe| probe.oauth_required),
            crawler_disagreements: self.evidence.clone(),
            probe_note: basis_note(&self.basis, now),
        }
    }

    /// The order every log lists flips in: profile label, then element index.
    pub(crate) fn log_order(&self) -> (&str, Uuid, usize) {
        (&self.at.profile, self.at.profile_id, self.at.flip.index)
    }
}

/// How many distinct profiles `flips` change: the one meaning of "profiles changed", for the
/// plan file's counts and the run's summary alike.
pub(crate) fn profiles_changed<'a>(flips: impl IntoIterator<Item = &'a PlannedFlip>) -> u64 {
    let profiles: BTreeSet<Uuid> = flips
        .into_iter()
        .map(|planned| planned.at.profile_id)
        .collect();
    crate::domain::count(profiles.len())
}

/// `items` in the order every log and plan file lists flips, so two logs of the same data diff
/// cleanly; by reference, since a plan can hold thousands of flips.
pub(crate) fn in_log_order<T>(items: &[T], flip: impl Fn(&T) -> &PlannedFlip) -> Vec<&T> {
    let mut ordered: Vec<&T> = items.iter().collect();
    ordered.sort_by(|a, b| flip(a).log_order().cmp(&flip(b).log_order()));
    ordered
}

#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub(crate) flips: Vec<PlannedFlip>,
    pub(crate) profiles_scanned: u64,
    pub(crate) malformed: u64,
    pub(crate) junk_elements: u64,
    /// Non-empty `inferred_type` values outside the rule's vocabulary, with their counts.
    pub(crate) unrecognised_inferred_types: BTreeMap<String, u64>,
}

/// The server processes running the plan's current statements, one per job. An interrupted run
/// cancels them there: without a cancel a statement would go on after the tool has exited, until
/// it finished or hit `--statement-timeout`. Each chunk may run on another server process (a
/// pooler hands every transaction its own), so each chunk records its own.
#[derive(Debug, Default)]
pub(crate) struct PlanningBackend(std::sync::Mutex<BTreeMap<usize, i32>>);

impl PlanningBackend {
    fn record(&self, job: usize, pid: i32) {
        if let Ok(mut pids) = self.0.lock() {
            pids.insert(job, pid);
        }
    }

    pub(crate) async fn cancel(&self, pool: &db::Pool) {
        let pids: Vec<i32> = match self.0.lock() {
            Ok(pids) => pids.values().copied().collect(),
            Err(_) => return,
        };
        for pid in pids {
            match db::cancel_backend(pool, pid).await {
                Ok(_) => info!(pid, "cancelled the planning statement on the server"),
                Err(error) => warn!(
                    "{error:#}; the planning statement ends by itself at --statement-timeout at the latest"
                ),
            }
        }
    }
}

/// What planning reads besides the rule's own inputs.
pub(crate) struct PlanOptions<'a> {
    pub(crate) batch_size: usize,
    /// Profiles per chunk: each chunk is read in its own short snapshot.
    pub(crate) chunk_size: usize,
    /// Chunks read at once, each job over its own range of the key space, on its own connection.
    pub(crate) jobs: usize,
    pub(crate) statement_timeout: Duration,
    pub(crate) backend: &'a PlanningBackend,
    /// Read the crawler's disagreement log for the flips' urls.
    pub(crate) evidence: EvidenceAccess,
}

/// Whether the crawler's rows in `type_reclassification_log` may be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EvidenceAccess {
    Readable,
    /// Why not, as every flip then says.
    Unavailable(String),
}

/// Attempts at one chunk that the server cancelled (a recovery conflict on a standby, a statement
/// or lock timeout, a deadlock) before the plan fails.
pub(crate) const CHUNK_ATTEMPTS: u32 = 5;

/// The wait before attempt `attempt + 1`: 100 ms, doubling (1.5 s over all the retries), so a
/// standby's replay can move past what the chunk's snapshot held up.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.saturating_sub(1).min(10))
}

/// Reads the registry in chunks of `chunk_size` profiles in id order, each chunk in its own
/// read-only snapshot, so no statement's work and no snapshot's age grows with the table. In each
/// chunk the server checks every agent against the snapshots and names the profiles that may
/// hold a flip; only those are read back, decided by the Rust resolver and given the crawler's
/// evidence, all inside the chunk's snapshot. Only flips are kept.
///
/// The counts are sums over the chunks, so they describe exactly the profiles whose flips are
/// listed; a profile is read once, in the snapshot of the chunk its id falls in.
pub(crate) async fn plan(pool: &db::Pool, options: &PlanOptions<'_>) -> Result<Plan> {
    let chunk_size = options.chunk_size.max(1);
    let mut plan = Plan {
        unrecognised_inferred_types: unrecognised_inferred_types(pool, options).await?,
        ..Plan::default()
    };
    let estimate = retried(options, "reading the size of member_profiles", || async {
        let mut transaction = db::begin_read_only(pool).await?;
        let estimate = db::estimated_profiles(&mut transaction).await?;
        transaction
            .rollback()
            .await
            .context("could not close the planning transaction")?;
        Ok(estimate)
    })
    .await?;
    let bar = progress::profiles(estimate, "planning");
    let jobs = options.jobs.clamp(1, 16);
    let step = u128::MAX / u128::try_from(jobs).unwrap_or(1);
    let ranges = (0..jobs).map(|job| {
        let first = step * u128::try_from(job).unwrap_or(0);
        let last = if job + 1 == jobs {
            u128::MAX
        } else {
            first + step - 1
        };
        walk(pool, options, job, (first, last), chunk_size, &bar)
    });
    let parts = futures_util::future::try_join_all(ranges).await?;
    bar.finish_and_clear();
    let mut pass = Pass::default();
    for (part, walked) in parts {
        pass.add(&walked);
        plan.profiles_scanned += part.profiles_scanned;
        plan.malformed += part.malformed;
        plan.junk_elements += part.junk_elements;
        plan.flips.extend(part.flips);
    }
    info!(
        profiles = plan.profiles_scanned,
        candidates = pass.candidates,
        chunks = pass.chunks,
        jobs,
        slowest_statement_ms = crate::domain::millis(pass.slowest),
        "server pass complete"
    );
    if pass.slowest > options.statement_timeout / 2 {
        warn!(
            "the slowest chunk statement took {}ms, more than half of --statement-timeout {}ms: \
             a colder cache or a larger registry may reach it; lower --chunk-size (now {})",
            crate::domain::millis(pass.slowest),
            crate::domain::millis(options.statement_timeout),
            options.chunk_size
        );
    }
    info!(
        profiles = plan.profiles_scanned,
        flips = plan.flips.len(),
        "plan complete"
    );
    Ok(plan)
}

/// How the server pass went, for the log on stderr: how many chunks and candidate profiles, and
/// the slowest chunk statement, the one `--statement-timeout` has to cover.
#[derive(Debug, Default, Clone, Copy)]
struct Pass {
    chunks: u64,
    candidates: usize,
    slowest: Duration,
}

impl Pass {
    fn add(&mut self, other: &Pass) {
        self.chunks += other.chunks;
        self.candidates += other.candidates;
        self.slowest = self.slowest.max(other.slowest);
    }
}

/// One job: the chunks of the key range `first..=last` in key order, one after the other; what
/// they found, and how the pass went.
async fn walk(
    pool: &db::Pool,
    options: &PlanOptions<'_>,
    job: usize,
    (first, last): (u128, u128),
    chunk_size: usize,
    bar: &indicatif::ProgressBar,
) -> Result<(Plan, Pass)> {
    let through = Uuid::from_u128(last);
    let mut plan = Plan::default();
    let mut pass = Pass::default();
    let mut from = Some(Uuid::from_u128(first));
    while let Some(start) = from {
        let chunk = retried(
            options,
            &format!("the chunk of profiles from id '{start}'"),
            || plan_chunk(pool, options, job, (start, through), chunk_size),
        )
        .await?;
        pass.add(&Pass {
            chunks: 1,
            candidates: chunk.scan.candidates.len(),
            slowest: chunk.took,
        });
        plan.profiles_scanned += chunk.scan.profiles;
        plan.malformed += chunk.scan.malformed;
        plan.junk_elements += chunk.scan.untouchable_elements;
        plan.flips.extend(chunk.flips);
        bar.inc(chunk.scan.profiles);
        if bar.length().is_some_and(|length| bar.position() > length) {
            bar.set_length(bar.position());
        }
        // A short chunk is the end of the range; the next chunk starts just above this one's
        // last id (uuids compare as their bytes, as big-endian u128 do).
        from = match chunk.scan.last_id {
            Some(last_id) if chunk.scan.profiles >= crate::domain::count(chunk_size) => last_id
                .as_u128()
                .checked_add(1)
                .filter(|next| *next <= last)
                .map(Uuid::from_u128),
            _ => None,
        };
    }
    Ok((plan, pass))
}

/// What one chunk found.
struct ChunkPlan {
    scan: db::ChunkScan,
    /// How long the chunk statement ran (the server's part of the chunk).
    took: Duration,
    flips: Vec<PlannedFlip>,
}

/// One chunk, read and decided inside one read-only transaction of its own.
async fn plan_chunk(
    pool: &db::Pool,
    options: &PlanOptions<'_>,
    job: usize,
    (from, through): (Uuid, Uuid),
    chunk_size: usize,
) -> Result<ChunkPlan> {
    let mut transaction = db::begin_read_only(pool).await?;
    options
        .backend
        .record(job, db::backend_pid(&mut transaction).await?);
    let started = std::time::Instant::now();
    let scan = db::plan_chunk(&mut transaction, from, through, chunk_size).await?;
    let mut found = ChunkPlan {
        took: started.elapsed(),
        flips: Vec::new(),
        scan,
    };
    for ids in found.scan.candidates.chunks(options.batch_size.max(1)) {
        let rows = db::profiles_by_id(&mut transaction, ids).await?;
        let columns = rows.iter().map(parse_column).collect::<Result<Vec<_>>>()?;
        let snapshots = db::snapshots_for(&mut transaction, &columns).await?;
        for (row, column) in rows.iter().zip(&columns) {
            let verdict = column.verdict(&snapshots);
            if verdict.flips.is_empty() {
                continue;
            }
            let label = row.label();
            found.flips.extend(verdict.flips.into_iter().map(|flip| {
                let probe = snapshots.get(&flip.url).cloned();
                PlannedFlip::new(
                    ProfileFlip::new(row.id, label.clone(), flip),
                    Basis::found(probe),
                )
            }));
        }
    }
    attach_evidence(&mut transaction, &mut found.flips, &options.evidence).await?;
    transaction
        .rollback()
        .await
        .context("could not close the planning transaction")?;
    Ok(found)
}

/// The unrecognised inferred types of the whole snapshot table, counted in chunks in url order,
/// each in its own snapshot.
async fn unrecognised_inferred_types(
    pool: &db::Pool,
    options: &PlanOptions<'_>,
) -> Result<BTreeMap<String, u64>> {
    let limit = options.chunk_size.max(1);
    let mut counts = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let chunk = retried(
            options,
            "counting the inferred types of the snapshots",
            || async {
                let mut transaction = db::begin_read_only(pool).await?;
                options
                    .backend
                    .record(0, db::backend_pid(&mut transaction).await?);
                let chunk =
                    db::unrecognised_inferred_types(&mut transaction, after.as_deref(), limit)
                        .await?;
                transaction
                    .rollback()
                    .await
                    .context("could not close the planning transaction")?;
                Ok(chunk)
            },
        )
        .await?;
        for (name, count) in chunk.unrecognised {
            *counts.entry(name).or_insert(0) += count;
        }
        match chunk.last_url {
            Some(last) if chunk.snapshots >= crate::domain::count(limit) => {
                after = Some(last);
            }
            _ => return Ok(counts),
        }
    }
}

/// Runs `attempt` until it succeeds, or fails in a way a retry cannot mend, or the server has
/// cancelled it [`CHUNK_ATTEMPTS`] times; then says what to change.
async fn retried<T, F, Fut>(options: &PlanOptions<'_>, what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempts = 0;
    loop {
        attempts += 1;
        let error = match attempt().await {
            Ok(done) => return Ok(done),
            Err(error) => error,
        };
        if !db::is_retryable(&error) {
            return Err(error);
        }
        if attempts >= CHUNK_ATTEMPTS {
            let advice = if db::is_statement_timeout(&error) {
                format!(
                    "it ran past --statement-timeout '{:?}': lower --chunk-size (now {}) or \
                     raise --statement-timeout",
                    options.statement_timeout, options.chunk_size
                )
            } else if db::is_recovery_conflict(&error) {
                format!(
                    "the server cancelled it for a conflict with recovery: on this standby raise \
                     max_standby_streaming_delay or turn on hot_standby_feedback, or lower \
                     --chunk-size (now {})",
                    options.chunk_size
                )
            } else {
                "it waited past --lock-timeout for a lock on the registry's tables: find what \
                 holds an exclusive lock on them (pg_locks) and run again once it is gone, or \
                 raise --lock-timeout"
                    .to_owned()
            };
            return Err(error.context(format!(
                "planning stopped, nothing was written: {what} failed {attempts} times; {advice}"
            )));
        }
        let wait = backoff(attempts);
        warn!(
            attempt = attempts,
            of = CHUNK_ATTEMPTS,
            retry_in_ms = crate::domain::millis(wait),
            "{what} was cancelled by the server ({}); retrying in a new snapshot",
            crate::error::render(&error)
        );
        tokio::time::sleep(wait).await;
    }
}

/// Puts the crawler's own record of each flip's disagreement beside it: one query for every url.
pub(crate) async fn attach_evidence(
    connection: &mut Transaction,
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
                .map(|planned| planned.at.flip.url.as_str())
                .collect();
            db::crawler_disagreements(connection, &urls.into_iter().collect::<Vec<_>>()).await?
        }
    };
    for planned in flips.iter_mut() {
        let rows = logged
            .get(&planned.at.flip.url)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        planned.evidence = Some(CrawlerEvidence::for_flip(rows, &planned.at.flip.to));
    }
    Ok(())
}

pub(crate) fn parse_column(row: &ProfileRow) -> Result<AgentsColumn> {
    match &row.agents {
        None => Ok(AgentsColumn::Malformed),
        Some(text) => AgentsColumn::parse(text)
            .with_context(|| format!("could not parse agents of profile '{}'", row.id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolver::Flip;

    fn planned(profile: u128, index: usize) -> PlannedFlip {
        let flip = Flip {
            index,
            url: format!("https://{profile}-{index}.example/mcp"),
            from: serde_json::json!("buying"),
            to: "sales".to_owned(),
        };
        PlannedFlip::new(
            ProfileFlip::new(Uuid::from_u128(profile), format!("p{profile}"), flip),
            Basis::NoSnapshot,
        )
    }

    /// Three flips in two profiles change two profiles, in whatever order they come.
    #[test]
    fn profiles_changed_counts_each_profile_once() {
        let flips = [planned(1, 0), planned(2, 0), planned(1, 3)];
        assert_eq!(profiles_changed(&flips), 2);
        assert_eq!(profiles_changed(flips.iter().rev()), 2);
        assert_eq!(profiles_changed(&[]), 0);
    }
}
