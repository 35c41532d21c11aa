//! `type_reclassification_log`: the runs and rows `history` and `revert` read, the crawler's
//! disagreements, and the flips a batch writes with their audit rows.

use std::collections::HashMap;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Pool, Transaction};
use crate::domain::{CrawlerEvidence, ProfileFlip};

/// One backfill run as `history` lists it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct RunRecord {
    pub run_id: String,
    pub first_change: DateTime<Utc>,
    pub last_change: DateTime<Utc>,
    pub flips: i64,
    pub profiles: i64,
    /// The run this one reverted, when it was a revert.
    pub reverts: Option<String>,
}

pub(crate) async fn backfill_runs(pool: &Pool) -> Result<Vec<RunRecord>> {
    let mut transaction = pool.begin().await?;
    super::unnamed_as::<RunRecord>(
        "SELECT run_id, min(changed_at) AS first_change, max(changed_at) AS last_change, \
                count(*) AS flips, count(DISTINCT member_id) AS profiles, \
                max(notes ->> 'reverts') AS reverts \
         FROM type_reclassification_log \
         WHERE source = 'backfill_script' AND run_id IS NOT NULL \
         GROUP BY run_id ORDER BY min(changed_at) DESC, run_id DESC",
    )
    .fetch_all(&mut transaction)
    .await
    .context("could not read type_reclassification_log")
}

/// One audit row of a backfill run.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct AuditEntry {
    pub id: i64,
    pub run_id: Option<String>,
    pub changed_at: DateTime<Utc>,
    pub member_id: Option<String>,
    pub agent_url: String,
    pub old_type: Option<String>,
    pub new_type: String,
    pub notes: Option<serde_json::Value>,
    /// `notes.from` as JSON text, read apart so a revert restores it exactly however deep it
    /// nests.
    pub from_json: Option<String>,
}

impl AuditEntry {
    /// How the log names the row's profile: the slug kept in the notes, else the member id.
    pub fn label(&self) -> String {
        self.notes
            .as_ref()
            .and_then(|notes| notes.get("profile"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .or_else(|| self.member_id.clone())
            .unwrap_or_default()
    }

    /// The element the row changed, as its notes record it.
    pub fn index(&self) -> Option<u64> {
        self.notes
            .as_ref()
            .and_then(|notes| notes.get("index"))
            .and_then(serde_json::Value::as_u64)
    }
}

pub(crate) async fn run_entries(pool: &Pool, run_id: &str) -> Result<Vec<AuditEntry>> {
    let mut transaction = pool.begin().await?;
    let mut entries = super::unnamed_as::<AuditEntry>(
        "SELECT id, run_id, changed_at, member_id, agent_url, old_type, new_type, \
                notes - 'from' AS notes, (notes -> 'from')::text AS from_json \
         FROM type_reclassification_log \
         WHERE source = 'backfill_script' AND run_id = $1 ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(&mut transaction)
    .await
    .with_context(|| format!("could not read the audit rows of run '{run_id}'"))?;
    // `from` travels as text: a stored type nested deeper than a JSON decoder allows must still
    // come back exactly for a revert. The notes show it as the resolver would.
    for entry in &mut entries {
        if let (Some(notes), Some(from)) = (entry.notes.as_mut(), entry.from_json.as_deref()) {
            if let Some(notes) = notes.as_object_mut() {
                let shown = crate::resolver::bounded_type(from).with_context(|| {
                    format!("audit row {} holds a malformed notes.from", entry.id)
                })?;
                notes.insert("from".to_owned(), shown);
            }
        }
    }
    Ok(entries)
}

/// The crawler's logged disagreements about one url: what it probed, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CrawlerRow {
    pub new_type: String,
    pub changed_at: DateTime<Utc>,
}

/// Built here, where the crawler's rows are read.
impl CrawlerEvidence {
    /// `rows` in the order they were logged.
    pub(crate) fn for_flip(rows: &[CrawlerRow], to: &str) -> CrawlerEvidence {
        let agreeing: Vec<&CrawlerRow> = rows.iter().filter(|row| row.new_type == to).collect();
        CrawlerEvidence {
            count: Some(crate::domain::count(agreeing.len())),
            first_at: agreeing.first().map(|row| row.changed_at),
            last_at: agreeing.last().map(|row| row.changed_at),
            last_inferred: rows.last().map(|row| row.new_type.clone()),
            unavailable: None,
        }
    }
}

/// Whether this user may read `type_reclassification_log`: `None` when it may, else why not.
pub(crate) async fn audit_log_unreadable(pool: &Pool) -> Result<Option<String>> {
    let mut transaction = pool.begin().await?;
    let readable: Option<bool> = super::unnamed_scalar(
        "SELECT CASE WHEN to_regclass('type_reclassification_log') IS NULL THEN NULL \
                ELSE has_table_privilege('type_reclassification_log', 'SELECT') END",
    )
    .fetch_one(&mut transaction)
    .await
    .context("could not check SELECT on 'type_reclassification_log'")?;
    Ok(match readable {
        Some(true) => None,
        Some(false) => Some("no SELECT privilege on type_reclassification_log".to_owned()),
        None => Some("table type_reclassification_log is missing".to_owned()),
    })
}

/// The crawler's `crawler_promote` rows for `urls`, per url in the order they were logged.
pub(crate) async fn crawler_disagreements(
    connection: &mut Transaction,
    urls: &[&str],
) -> Result<HashMap<String, Vec<CrawlerRow>>> {
    let rows: Vec<(String, String, DateTime<Utc>)> = super::unnamed_as(
        "SELECT agent_url, new_type, changed_at FROM type_reclassification_log \
         WHERE source = 'crawler_promote' AND agent_url = ANY($1) \
         ORDER BY agent_url, changed_at, id",
    )
    .bind(urls)
    .fetch_all(connection)
    .await
    .context("could not read the crawler's rows in type_reclassification_log")?;
    let mut by_url: HashMap<String, Vec<CrawlerRow>> = HashMap::new();
    for (url, new_type, changed_at) in rows {
        by_url.entry(url).or_default().push(CrawlerRow {
            new_type,
            changed_at,
        });
    }
    Ok(by_url)
}

/// One confirmed flip to write, with what its audit row records.
#[derive(Debug, Clone)]
pub(crate) struct FlipWrite {
    /// The flip as the recheck under the row lock found it.
    pub at: ProfileFlip,
    /// The stored type as the audit log's `old_type` column holds it; `None` to take the stored
    /// value's JSON text from the row itself (a type too deep for the resolver to keep whole).
    pub old_type: Option<String>,
    /// The JSON text written to the element's `type` key; `None` removes the key (a revert
    /// restoring an element that had none).
    pub new_value: Option<String>,
    /// The audit log's `new_type` column.
    pub new_type: String,
}

/// Writes the flips and their audit rows inside the caller's transaction.
///
/// The audit rows go first and take `notes.from` (and, where asked, `old_type`) from the locked
/// row itself, so the record of what was there is exact whatever it holds. Then only the `type`
/// key of each flipped element changes (`jsonb_set`), so every other key, element and number is
/// kept exactly as stored. A profile with several flips gets one `jsonb_set` per round, because a
/// single `UPDATE ... FROM` applies at most one source row per target row.
pub(crate) async fn write_flips(
    connection: &mut Transaction,
    flips: &[FlipWrite],
    run_id: &str,
    tool_version: &str,
    notes_extra: &serde_json::Value,
) -> Result<()> {
    let urls: Vec<&str> = flips.iter().map(|flip| flip.at.flip.url.as_str()).collect();
    let members: Vec<Uuid> = flips.iter().map(|flip| flip.at.profile_id).collect();
    let indexes: Vec<i32> = flips
        .iter()
        .map(|flip| i32::try_from(flip.at.flip.index).unwrap_or(i32::MAX))
        .collect();
    let old_types: Vec<Option<&str>> = flips.iter().map(|flip| flip.old_type.as_deref()).collect();
    let new_types: Vec<&str> = flips.iter().map(|flip| flip.new_type.as_str()).collect();
    let notes: Vec<serde_json::Value> = flips
        .iter()
        .map(|flip| {
            let mut notes = serde_json::json!({
                "profile": flip.at.profile,
                "index": flip.at.flip.index,
                "tool": "agent-type-backfill",
                "tool_version": tool_version,
            });
            if let (Some(notes), Some(extra)) = (notes.as_object_mut(), notes_extra.as_object()) {
                notes.extend(extra.clone());
            }
            notes
        })
        .collect();
    // `old_type` records an absent or null stored type as 'unknown', the server's convention.
    // The notes keep the stored value exactly, so a revert can put it back: `type_key` says
    // whether the element had a `type` key, and `from` (only when it had) is its value, JSON
    // `null` included. Rows without `type_key` were written before this distinction existed.
    let inserted = super::unnamed(
        "INSERT INTO type_reclassification_log \
             (agent_url, member_id, old_type, new_type, source, run_id, notes) \
         SELECT a.url, a.member::text, \
                coalesce(a.old_type, p.agents -> a.idx -> 'type' #>> '{}', 'unknown'), \
                a.new_type, 'backfill_script', $7, \
                a.notes || CASE WHEN p.agents -> a.idx ? 'type' \
                    THEN jsonb_build_object('type_key', 'present', 'from', p.agents -> a.idx -> 'type') \
                    ELSE jsonb_build_object('type_key', 'absent') END \
         FROM unnest($1::text[], $2::uuid[], $3::int[], $4::text[], $5::text[], $6::jsonb[]) \
              WITH ORDINALITY AS a(url, member, idx, old_type, new_type, notes, position) \
         JOIN member_profiles p ON p.id = a.member \
         ORDER BY a.position",
    )
    .bind(&urls)
    .bind(&members)
    .bind(&indexes)
    .bind(&old_types)
    .bind(&new_types)
    .bind(&notes)
    .bind(run_id)
    .execute(&mut *connection)
    .await
    .context("could not insert audit rows into type_reclassification_log")?;
    anyhow::ensure!(
        inserted.rows_affected() == flips.len() as u64,
        "wrote {} audit rows for {} flips: stopping before commit",
        inserted.rows_affected(),
        flips.len()
    );

    let mut rounds: Vec<Vec<&FlipWrite>> = Vec::new();
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for flip in flips {
        let round = seen.entry(flip.at.profile_id).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(flip);
        *round += 1;
    }
    for round in rounds {
        let ids: Vec<Uuid> = round.iter().map(|flip| flip.at.profile_id).collect();
        let paths: Vec<String> = round
            .iter()
            .map(|flip| flip.at.flip.index.to_string())
            .collect();
        let values: Vec<Option<&str>> =
            round.iter().map(|flip| flip.new_value.as_deref()).collect();
        let updated = super::unnamed(
            "UPDATE member_profiles AS p \
             SET agents = CASE WHEN f.new_value IS NULL THEN p.agents #- ARRAY[f.idx, 'type'] \
                 ELSE jsonb_set(p.agents, ARRAY[f.idx, 'type'], f.new_value::jsonb, true) END \
             FROM unnest($1::uuid[], $2::text[], $3::text[]) AS f(id, idx, new_value) \
             WHERE p.id = f.id",
        )
        .bind(&ids)
        .bind(&paths)
        .bind(&values)
        .execute(&mut *connection)
        .await
        .context("could not update member_profiles")?;
        anyhow::ensure!(
            updated.rows_affected() == round.len() as u64,
            "updated {} profiles where {} were locked for writing: stopping before commit",
            updated.rows_affected(),
            round.len()
        );
    }
    Ok(())
}

/// For each flip, the backfill run that last wrote its `to` at its element, if any: a reviewed
/// flip that no longer holds because an earlier apply of the same plan wrote it is "already
/// written (run X)", not "changed since plan". One statement for all of them.
pub(crate) async fn written_by(
    pool: &Pool,
    flips: &[ProfileFlip],
) -> Result<HashMap<(Uuid, usize), String>> {
    if flips.is_empty() {
        return Ok(HashMap::new());
    }
    let members: Vec<String> = flips.iter().map(|at| at.profile_id.to_string()).collect();
    let indexes: Vec<i64> = flips
        .iter()
        .map(|at| i64::try_from(at.flip.index).unwrap_or(i64::MAX))
        .collect();
    let urls: Vec<&str> = flips.iter().map(|at| at.flip.url.as_str()).collect();
    let types: Vec<&str> = flips.iter().map(|at| at.flip.to.as_str()).collect();
    let mut transaction = pool.begin().await?;
    let rows: Vec<(String, i64, String)> = super::unnamed_as(
        "SELECT DISTINCT ON (w.member, w.idx) w.member, w.idx, l.run_id \
         FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[]) AS w(member, idx, url, to_type) \
         JOIN type_reclassification_log l \
           ON l.source = 'backfill_script' AND l.member_id = w.member \
          AND l.agent_url = w.url AND l.new_type = w.to_type \
          AND (l.notes ->> 'index')::bigint = w.idx AND l.notes ? 'tool' \
          AND NOT l.notes ? 'reverts' \
         ORDER BY w.member, w.idx, l.id DESC",
    )
    .bind(&members)
    .bind(&indexes)
    .bind(&urls)
    .bind(&types)
    .fetch_all(&mut transaction)
    .await
    .context("could not look up which runs wrote the reviewed flips")?;
    Ok(rows
        .into_iter()
        .filter_map(|(member, index, run_id)| {
            let member = member.parse::<Uuid>().ok()?;
            Some(((member, usize::try_from(index).ok()?), run_id))
        })
        .collect())
}

/// The elements earlier reverts of `reverted` restored: `(profile, index)` to the revert's run
/// id, the latest revert where there were several. A revert of a run already reverted then names
/// the revert that restored each conflict instead of leaving the operator to guess.
pub(crate) async fn restored_by(
    pool: &Pool,
    reverted: &str,
) -> Result<HashMap<(Uuid, usize), String>> {
    let mut transaction = pool.begin().await?;
    let rows: Vec<(Option<String>, Option<i64>, Option<String>)> = super::unnamed_as(
        "SELECT DISTINCT ON (member_id, (notes ->> 'index')) member_id, \
                (notes ->> 'index')::bigint, run_id \
         FROM type_reclassification_log \
         WHERE source = 'backfill_script' AND notes ->> 'reverts' = $1 \
         ORDER BY member_id, (notes ->> 'index'), id DESC",
    )
    .bind(reverted)
    .fetch_all(&mut transaction)
    .await
    .with_context(|| format!("could not read the reverts of run '{reverted}'"))?;
    Ok(rows
        .into_iter()
        .filter_map(|(member, index, run_id)| {
            let member = member?.parse::<Uuid>().ok()?;
            Some(((member, usize::try_from(index?).ok()?), run_id?))
        })
        .collect())
}
