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
pub(crate) struct ProfileRow {
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
pub(crate) struct SnapshotRow {
    pub inferred_type: Option<String>,
    pub last_discovered: DateTime<Utc>,
    pub discovery_error: bool,
    pub oauth_required: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Snapshots(HashMap<String, SnapshotRow>);

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
pub(crate) async fn backend_pid(connection: &mut Transaction) -> Result<i32> {
    super::unnamed_scalar("SELECT pg_backend_pid()")
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
    super::unnamed_scalar("SELECT pg_cancel_backend($1)")
        .bind(pid)
        .fetch_one(&mut transaction)
        .await
        .with_context(|| format!("could not cancel the statement of server process {pid}"))
}

/// One chunk of the planning pass: at most `limit` profiles in id order from `from` on, read in
/// the chunk's own snapshot, and what the server found in them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChunkScan {
    /// Profiles in the chunk; fewer than the limit only at the end of the table.
    pub profiles: u64,
    /// Of them, profiles whose `agents` is SQL NULL or not a JSON array (the server leaves those
    /// untouched).
    pub malformed: u64,
    /// The chunk's highest id: the next chunk starts after it. `None` for an empty chunk.
    pub last_id: Option<Uuid>,
    /// The chunk's profiles that may hold a flip, in id order without repeats.
    pub candidates: Vec<Uuid>,
    /// Elements the rule cannot touch (not an object, or no string `url`).
    pub untouchable_elements: u64,
}

/// The resolve rule of `resolver::resolve_type`, written in SQL and applied to every agent of one
/// chunk of profiles (keyset over the primary key, so its work is bounded by the chunk size, not
/// by the table). It only narrows the profiles the tool reads: each candidate is then read again
/// and decided by the Rust resolver. tests/it/prefilter.rs runs every conformance vector through
/// this statement and checks that it names exactly the profiles with flips.
///
/// The chunk's elements are taken apart once (`e`: one row per element, and one row with no
/// element for a profile whose `agents` is empty or not an array, so every profile is counted).
/// Their urls are looked up in one index scan (`= ANY`), and the elements are hash-joined to the
/// rows found. The array is passed with its repeats: a btree index scan sorts and deduplicates
/// its `= ANY` keys itself (and walks the btree in key order), so a `DISTINCT` here sorted the
/// same urls twice; dropping it took a chunk from 0.86-1.01 s to 0.78-0.83 s (psql, 20,000
/// profiles at 1,000,000, warm), and the rows found are the same whatever plan the server picks,
/// since `agent_url` is the snapshot table's key. Looking each agent up by its own subquery, as
/// this statement did before, walked the btree from its root once per agent in random order and
/// took about 1.6 times as long per chunk (measured with psql at 1,000,000 profiles; README
/// "Performance"). A hash join against
/// the whole snapshot table would be faster still at small sizes, but its work would grow with
/// that table again.
///
/// $1: the valid types; $2: the type kept when the probe could not classify; $3: "unknown";
/// $4: the lowest id of the chunk; $5: the chunk size; $6: the highest id it may hold (both
/// inclusive: parallel jobs each walk a range of the key space).
pub const PLAN_CHUNK: &str = r#"
WITH e AS MATERIALIZED (
    SELECT p.id,
           jsonb_typeof(p.agents) IS DISTINCT FROM 'array' AS malformed,
           x.ord,
           -- Only an object has a `url` key, so this also rules out every other element.
           coalesce(jsonb_typeof(x.element -> 'url') = 'string', false) AS has_url,
           x.element ->> 'url' AS url,
           x.element -> 'type' AS stored
    FROM (
        SELECT id, agents FROM member_profiles
        WHERE id BETWEEN $4::uuid AND $6::uuid ORDER BY id LIMIT $5
    ) p
    LEFT JOIN LATERAL jsonb_array_elements(
        CASE WHEN jsonb_typeof(p.agents) = 'array' THEN p.agents ELSE '[]'::jsonb END
    ) WITH ORDINALITY AS x(element, ord) ON true
), s AS MATERIALIZED (
    SELECT agent_url, inferred_type FROM agent_capabilities_snapshot
    WHERE agent_url = ANY (ARRAY(SELECT url FROM e WHERE has_url))
)
SELECT count(*) FILTER (WHERE e.ord IS NULL OR e.ord = 1),
       count(*) FILTER (WHERE e.malformed),
       -- uuid has no max(); its text form sorts as its bytes do.
       max(e.id::text)::uuid,
       count(*) FILTER (WHERE e.ord IS NOT NULL AND NOT e.has_url),
       coalesce(array_agg(DISTINCT e.id ORDER BY e.id) FILTER (WHERE v.verdict = 'may flip'), '{}')
FROM e
LEFT JOIN s ON e.has_url AND s.agent_url = e.url
CROSS JOIN LATERAL (
    SELECT CASE
               -- No element, or one the rule cannot touch.
               WHEN NOT e.has_url THEN NULL
               -- Never probed: only a string type outside the valid set changes.
               WHEN s.agent_url IS NULL THEN
                   CASE
                       WHEN NOT (e.stored #>> '{}') = ANY ($1::text[])
                            AND jsonb_typeof(e.stored) = 'string' THEN 'may flip'
                   END
               -- The common case, first: the stored type already is the probe's valid type (no
               -- number, boolean, object or array reads as a valid type name).
               WHEN (e.stored #>> '{}') = s.inferred_type
                    AND s.inferred_type = ANY ($1::text[]) THEN NULL
               -- Probed and classified otherwise: the probe's type wins; an absent or null type
               -- reads as "unknown".
               WHEN s.inferred_type = ANY ($1::text[]) THEN
                   CASE
                       WHEN s.inferred_type = $3::text
                            AND coalesce(e.stored, 'null') = 'null' THEN NULL
                       ELSE 'may flip'
                   END
               -- Probed, not classified: a self-declared type survives, anything else becomes
               -- "unknown".
               WHEN coalesce(e.stored, 'null')
                    IN ('null', to_jsonb($2::text), to_jsonb($3::text)) THEN NULL
               ELSE 'may flip'
           END AS verdict
) v
"#;

/// Runs [`PLAN_CHUNK`] for the chunk of at most `limit` profiles with ids from `from` through
/// `through`.
pub async fn plan_chunk(
    connection: &mut Transaction,
    from: Uuid,
    through: Uuid,
    limit: usize,
) -> Result<ChunkScan> {
    let (profiles, malformed, last_id, untouchable, candidates): (
        i64,
        i64,
        Option<Uuid>,
        i64,
        Vec<Uuid>,
    ) = super::unnamed_as(PLAN_CHUNK)
        .bind(&VALID_AGENT_TYPES[..])
        .bind(SELF_DECLARED_TYPE)
        .bind(UNKNOWN_TYPE)
        .bind(from)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(through)
        .fetch_one(connection)
        .await
        .with_context(|| {
            format!("could not scan the agents of member_profiles from id '{from}'")
        })?;
    let count = |n: i64| u64::try_from(n).context("the server counted fewer than nothing");
    Ok(ChunkScan {
        profiles: count(profiles)?,
        malformed: count(malformed)?,
        last_id,
        candidates,
        untouchable_elements: count(untouchable)?,
    })
}

fn profile_row(row: &sqlx::postgres::PgRow) -> ProfileRow {
    ProfileRow {
        id: row.get(0),
        slug: row.get::<Option<String>, _>(1).unwrap_or_default(),
        agents: row.get(2),
    }
}

/// The snapshot rows the rule will ask for when resolving `columns`, in one round trip.
pub(crate) async fn snapshots_for(
    connection: &mut Transaction,
    columns: &[AgentsColumn],
) -> Result<Snapshots> {
    let mut urls: Vec<&str> = columns.iter().flat_map(AgentsColumn::urls).collect();
    urls.sort_unstable();
    urls.dedup();
    if urls.is_empty() {
        return Ok(Snapshots::default());
    }
    let rows = super::unnamed(
        "SELECT agent_url, inferred_type, last_discovered, discovery_error IS NOT NULL, \
                coalesce(oauth_required, false) \
         FROM agent_capabilities_snapshot WHERE agent_url = ANY($1)",
    )
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
    let rows = super::unnamed(
        "SELECT id, slug::text, agents::text FROM member_profiles WHERE id = ANY($1) \
         ORDER BY id FOR UPDATE",
    )
    .bind(ids)
    .fetch_all(connection)
    .await
    .context("could not lock the batch's profiles")?;
    Ok(rows.iter().map(profile_row).collect())
}

/// Current rows of the given profiles, without locking them (planning a revert).
pub(crate) async fn profiles_by_id(
    connection: &mut Transaction,
    ids: &[Uuid],
) -> Result<Vec<ProfileRow>> {
    let rows = super::unnamed(
        "SELECT id, slug::text, agents::text FROM member_profiles WHERE id = ANY($1) ORDER BY id",
    )
    .bind(ids)
    .fetch_all(connection)
    .await
    .context("could not read the profiles of the run")?;
    Ok(rows.iter().map(profile_row).collect())
}

/// One chunk of the count of non-empty `inferred_type` values the rule does not know (a sign that
/// the server, and its crawler, are newer than this port): at most `limit` snapshots in url order
/// after `after`, in the chunk's own snapshot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct InferredTypeChunk {
    /// The chunk's highest url: the next chunk starts after it. `None` for an empty chunk.
    pub last_url: Option<String>,
    pub snapshots: u64,
    /// The unrecognised types among the chunk's snapshots, with how many carry each.
    pub unrecognised: std::collections::BTreeMap<String, u64>,
}

pub(crate) async fn unrecognised_inferred_types(
    connection: &mut Transaction,
    after: Option<&str>,
    limit: usize,
) -> Result<InferredTypeChunk> {
    // An unnamed statement is planned with its parameters' values, so `$1 IS NULL` folds away and
    // the keyset condition is an index range.
    let (last_url, snapshots, names, counts): (Option<String>, i64, Vec<String>, Vec<i64>) =
        super::unnamed_as(
            "WITH chunk AS MATERIALIZED ( \
                 SELECT agent_url, inferred_type FROM agent_capabilities_snapshot \
                 WHERE ($1::text IS NULL OR agent_url > $1::text) ORDER BY agent_url LIMIT $2 \
             ), unrecognised AS ( \
                 SELECT inferred_type, count(*) AS n FROM chunk \
                 WHERE inferred_type <> '' AND NOT inferred_type = ANY($3::text[]) \
                 GROUP BY inferred_type \
             ) \
             SELECT (SELECT max(agent_url) FROM chunk), (SELECT count(*) FROM chunk), \
                    ARRAY(SELECT inferred_type FROM unrecognised ORDER BY inferred_type), \
                    ARRAY(SELECT n FROM unrecognised ORDER BY inferred_type)",
        )
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(&VALID_AGENT_TYPES[..])
        .fetch_one(connection)
        .await
        .context("could not count the inferred types of agent_capabilities_snapshot")?;
    Ok(InferredTypeChunk {
        last_url,
        snapshots: u64::try_from(snapshots).unwrap_or(0),
        unrecognised: names
            .into_iter()
            .zip(counts)
            .map(|(name, count)| (name, u64::try_from(count).unwrap_or(0)))
            .collect(),
    })
}

/// The planner's estimate of how many profiles there are, without reading them (the progress
/// bar's length); `None` before the table was ever analysed.
pub(crate) async fn estimated_profiles(connection: &mut Transaction) -> Result<Option<u64>> {
    let estimate: f32 = super::unnamed_scalar(
        "SELECT reltuples FROM pg_class WHERE oid = 'member_profiles'::regclass",
    )
    .fetch_one(connection)
    .await
    .context("could not read the estimated size of member_profiles")?;
    // reltuples is -1 until the first VACUUM or ANALYZE; a float far below 2^53.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok((estimate >= 0.0).then(|| estimate.round() as u64))
}
