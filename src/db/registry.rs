//! Reading the registry: the planning snapshot, the server pass, candidate profiles and their
//! snapshots, and the locked rows a batch writes.

use std::collections::HashMap;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use uuid::Uuid;

use super::{Pool, Transaction};
use crate::resolver::{
    AgentsColumn, Probe, SnapshotLookup, SELF_DECLARED_TYPE, UNKNOWN_TYPE, VALID_AGENT_TYPES,
};

/// One profile as the planner reads it.
#[derive(Debug, Clone)]
pub struct ProfileRow {
    pub id: Uuid,
    pub slug: String,
    /// The `agents` column as JSON text; `None` for SQL NULL.
    pub agents: Option<String>,
}

impl ProfileRow {
    /// How the run log names a profile: its slug, or its id when there is no slug.
    pub fn label(&self) -> String {
        label(&self.slug, self.id)
    }
}

pub fn label(slug: &str, id: Uuid) -> String {
    if slug.trim().is_empty() {
        id.to_string()
    } else {
        slug.to_owned()
    }
}

/// What the crawler stored for one URL, with what a reviewer needs to judge it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnapshotRow {
    pub inferred_type: Option<String>,
    pub last_discovered: DateTime<Utc>,
    pub discovery_error: bool,
    pub oauth_required: bool,
}

#[derive(Debug, Default)]
pub struct Snapshots(HashMap<String, SnapshotRow>);

impl Snapshots {
    pub fn get(&self, url: &str) -> Option<&SnapshotRow> {
        self.0.get(url)
    }
}

impl SnapshotLookup for Snapshots {
    fn probe(&self, url: &str) -> Probe<'_> {
        match self.0.get(url) {
            None => Probe::NotProbed,
            Some(row) => Probe::Probed(row.inferred_type.as_deref()),
        }
    }
}

/// The server process behind `connection`, so a statement running on it can be cancelled from
/// another connection.
pub async fn backend_pid(connection: &mut Transaction) -> Result<i32> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .persistent(false)
        .fetch_one(connection)
        .await
        .context("could not ask the server for the planning session's process id")
}

/// Cancels whatever statement backend `pid` is running. A backend blocked on a lock, or busy in a
/// scan that returns few rows, does not notice that its client has gone away. Through a pooler
/// this runs on another server session of the same server, which may signal a backend of the
/// same user.
pub async fn cancel_backend(pool: &Pool, pid: i32) -> Result<bool> {
    let mut transaction = pool.begin().await?;
    sqlx::query_scalar("SELECT pg_cancel_backend($1)")
        .persistent(false)
        .bind(pid)
        .fetch_one(&mut transaction)
        .await
        .with_context(|| format!("could not cancel the statement of server process {pid}"))
}

/// How many profiles the planning snapshot holds, and how many of them have an `agents` column
/// that is SQL NULL or not a JSON array (the server leaves those untouched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    pub profiles: u64,
    pub malformed: u64,
}

pub async fn census(connection: &mut Transaction) -> Result<Census> {
    let (profiles, malformed): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE jsonb_typeof(agents) IS DISTINCT FROM 'array') \
         FROM member_profiles",
    )
    .persistent(false)
    .fetch_one(connection)
    .await
    .context("could not count member_profiles")?;
    Ok(Census {
        profiles: u64::try_from(profiles).context("the server counted fewer than no profiles")?,
        malformed: u64::try_from(malformed).context("the server counted fewer than no profiles")?,
    })
}

/// What one pass of the server over every agent found: the profiles that may hold a flip, in id
/// order without repeats, and how many elements the rule cannot touch (not an object, or no
/// string `url`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlipCandidates {
    pub profile_ids: Vec<Uuid>,
    pub untouchable_elements: u64,
}

/// The resolve rule of `resolver::resolve_type`, written in SQL and applied to every agent in one
/// statement, so the snapshots are joined once (a hash join) instead of looked up page by page.
/// It only narrows the profiles the tool reads: each candidate is then read again and decided by
/// the Rust resolver. tests/it/prefilter.rs runs every conformance vector through this statement and
/// checks that it names exactly the profiles with flips.
///
/// The filter is one equality on `verdict` on purpose: the planner estimates it as selective and
/// picks a parallel plan, where a `<>` test reads as "almost every row" and keeps it serial.
///
/// $1: the valid types; $2: the type kept when the probe could not classify; $3: "unknown".
pub const FLIP_CANDIDATES: &str = r#"
SELECT id, verdict = 'untouchable' FROM (
    SELECT p.id,
           CASE
               -- Only an object has a `url` key, so this also rules out every other element.
               WHEN jsonb_typeof(e.element -> 'url') IS DISTINCT FROM 'string' THEN 'untouchable'
               -- Never probed: only a string type outside the valid set changes.
               WHEN s.agent_url IS NULL THEN
                   CASE
                       WHEN NOT (e.element ->> 'type') = ANY ($1::text[])
                            AND jsonb_typeof(e.element -> 'type') = 'string' THEN 'may flip'
                   END
               -- The common case, first: the stored type already is the probe's valid type (no
               -- number, boolean, object or array reads as a valid type name).
               WHEN (e.element ->> 'type') = s.inferred_type
                    AND s.inferred_type = ANY ($1::text[]) THEN NULL
               -- Probed and classified otherwise: the probe's type wins; an absent or null type
               -- reads as "unknown".
               WHEN s.inferred_type = ANY ($1::text[]) THEN
                   CASE
                       WHEN s.inferred_type = $3::text
                            AND coalesce(e.element -> 'type', 'null') = 'null' THEN NULL
                       ELSE 'may flip'
                   END
               -- Probed, not classified: a self-declared type survives, anything else becomes
               -- "unknown".
               WHEN coalesce(e.element -> 'type', 'null')
                    IN ('null', to_jsonb($2::text), to_jsonb($3::text)) THEN NULL
               ELSE 'may flip'
           END AS verdict
    FROM member_profiles p
    CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN jsonb_typeof(p.agents) = 'array' THEN p.agents ELSE '[]'::jsonb END
    ) AS e(element)
    LEFT JOIN agent_capabilities_snapshot s ON s.agent_url = e.element ->> 'url'
) elements
WHERE verdict IN ('untouchable', 'may flip')
"#;

/// Streams [`FLIP_CANDIDATES`]; only candidate ids are kept, so memory follows the flips, not
/// the table.
pub async fn flip_candidates(connection: &mut Transaction) -> Result<FlipCandidates> {
    use futures_util::TryStreamExt;
    let mut rows = sqlx::query_as::<_, (Uuid, bool)>(FLIP_CANDIDATES)
        .persistent(false)
        .bind(&VALID_AGENT_TYPES[..])
        .bind(SELF_DECLARED_TYPE)
        .bind(UNKNOWN_TYPE)
        .fetch(connection);
    let mut found = FlipCandidates::default();
    while let Some((id, untouchable)) = rows
        .try_next()
        .await
        .context("could not scan the agents of member_profiles")?
    {
        if untouchable {
            found.untouchable_elements += 1;
        } else {
            found.profile_ids.push(id);
        }
    }
    found.profile_ids.sort_unstable();
    found.profile_ids.dedup();
    Ok(found)
}

fn profile_row(row: &sqlx::postgres::PgRow) -> ProfileRow {
    ProfileRow {
        id: row.get(0),
        slug: row.get::<Option<String>, _>(1).unwrap_or_default(),
        agents: row.get(2),
    }
}

/// The snapshot rows the rule will ask for when resolving `columns`, in one round trip.
pub async fn snapshots_for(
    connection: &mut Transaction,
    columns: &[AgentsColumn],
) -> Result<Snapshots> {
    let mut urls: Vec<&str> = columns.iter().flat_map(AgentsColumn::urls).collect();
    urls.sort_unstable();
    urls.dedup();
    if urls.is_empty() {
        return Ok(Snapshots::default());
    }
    let rows = sqlx::query(
        "SELECT agent_url, inferred_type, last_discovered, discovery_error IS NOT NULL, \
                coalesce(oauth_required, false) \
         FROM agent_capabilities_snapshot WHERE agent_url = ANY($1)",
    )
    .persistent(false)
    .bind(urls)
    .fetch_all(connection)
    .await
    .context("could not read agent_capabilities_snapshot")?;
    Ok(Snapshots(
        rows.iter()
            .map(|row| {
                (
                    row.get::<String, _>(0),
                    SnapshotRow {
                        inferred_type: row.get(1),
                        last_discovered: row.get(2),
                        discovery_error: row.get(3),
                        oauth_required: row.get(4),
                    },
                )
            })
            .collect(),
    ))
}

/// Locks the given profiles for the rest of the transaction and returns their current rows.
pub(crate) async fn lock_profiles(
    connection: &mut Transaction,
    ids: &[Uuid],
) -> Result<Vec<ProfileRow>> {
    let rows = sqlx::query(
        "SELECT id, slug::text, agents::text FROM member_profiles WHERE id = ANY($1) \
         ORDER BY id FOR UPDATE",
    )
    .persistent(false)
    .bind(ids)
    .fetch_all(connection)
    .await
    .context("could not lock the batch's profiles")?;
    Ok(rows.iter().map(profile_row).collect())
}

/// Current rows of the given profiles, without locking them (planning a revert).
pub async fn profiles_by_id(connection: &mut Transaction, ids: &[Uuid]) -> Result<Vec<ProfileRow>> {
    let rows = sqlx::query(
        "SELECT id, slug::text, agents::text FROM member_profiles WHERE id = ANY($1) ORDER BY id",
    )
    .persistent(false)
    .bind(ids)
    .fetch_all(connection)
    .await
    .context("could not read the profiles of the run")?;
    Ok(rows.iter().map(profile_row).collect())
}

/// Non-empty `inferred_type` values the rule does not know, with how many snapshots carry each:
/// a sign that the server, and its crawler, are newer than this port.
pub(crate) async fn unrecognised_inferred_types(
    connection: &mut Transaction,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT inferred_type, count(*) FROM agent_capabilities_snapshot \
         WHERE inferred_type <> '' AND NOT inferred_type = ANY($1::text[]) \
         GROUP BY inferred_type ORDER BY inferred_type",
    )
    .persistent(false)
    .bind(&VALID_AGENT_TYPES[..])
    .fetch_all(connection)
    .await
    .context("could not count the inferred types of agent_capabilities_snapshot")?;
    Ok(rows
        .into_iter()
        .map(|(name, count)| (name, u64::try_from(count).unwrap_or(0)))
        .collect())
}
