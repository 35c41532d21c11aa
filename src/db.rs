//! Every statement the tool sends lives here. Bind parameters only; arrays instead of one round
//! trip per row.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::error::Failure;
use crate::resolver::{
    AgentsColumn, Probe, SnapshotLookup, SELF_DECLARED_TYPE, UNKNOWN_TYPE, VALID_AGENT_TYPES,
};

/// Where the tool is connected, as printed in the run log header. Never holds the password.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "host={} port={} database={} user={}",
            self.host, self.port, self.database, self.user
        )
    }
}

pub struct Session {
    pub pool: PgPool,
    pub target: Target,
}

/// Session settings every connection carries so a DBA can see and bound what the tool does.
pub struct SessionSettings {
    pub application_name: String,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
}

/// Parses the URL without ever echoing it: sqlx errors can quote their input.
pub fn parse_url(url: &str) -> Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(url).map_err(|error| {
        let reason = redact(&error.to_string(), url);
        Failure::Usage(format!(
            "the database URL could not be parsed ({reason}): check DATABASE_URL or --database-url"
        ))
    })?;
    // libpq treats `require` with a root certificate as `verify-ca`; sqlx would silently skip
    // the verification the operator asked for by naming the certificate.
    if matches!(options.get_ssl_mode(), PgSslMode::Require) && names_root_certificate(url) {
        return Ok(options.ssl_mode(PgSslMode::VerifyCa));
    }
    Ok(options)
}

fn names_root_certificate(url: &str) -> bool {
    let in_url = url
        .split_once('?')
        .map(|(_, query)| query.split('&'))
        .into_iter()
        .flatten()
        .any(|pair| pair.starts_with("sslrootcert=") || pair.starts_with("ssl-root-cert="));
    in_url || std::env::var_os("PGSSLROOTCERT").is_some_and(|path| !path.is_empty())
}

/// Removes the URL's password (and the URL itself) from a message that may quote them.
pub fn redact(message: &str, url: &str) -> String {
    let mut clean = message.to_owned();
    if !url.is_empty() {
        clean = clean.replace(url, "<database url>");
    }
    if let Some(password) = url_password(url) {
        if !password.is_empty() {
            clean = clean.replace(&password, "***");
        }
    }
    if let Ok(password) = std::env::var("PGPASSWORD") {
        if !password.is_empty() {
            clean = clean.replace(&password, "***");
        }
    }
    clean
}

fn url_password(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    Some(userinfo.split_once(':')?.1.to_owned())
}

pub async fn connect(url: &str, settings: &SessionSettings) -> Result<Session> {
    let options = parse_url(url)?
        .application_name(&settings.application_name)
        // The planning pass is one long statement by design; say so at info, not as a warning.
        .log_slow_statements(log::LevelFilter::Info, Duration::from_secs(1))
        .options([
            (
                "lock_timeout",
                settings.lock_timeout.as_millis().to_string(),
            ),
            (
                "statement_timeout",
                settings.statement_timeout.as_millis().to_string(),
            ),
            // The planning pass is one cheap scan that a JIT would spend seconds compiling.
            ("jit", "off".to_owned()),
        ]);
    let described = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    );
    // One direct connection first: a pool would retry a refused connection until its acquire
    // timeout, and the operator should hear at once that the target is wrong.
    let mut first = PgConnection::connect_with(&options)
        .await
        .map_err(|error| anyhow::anyhow!(redact(&error.to_string(), url)))
        .with_context(|| {
            format!("could not connect to '{described}': check DATABASE_URL, the network and the credentials")
        })?;
    let row = sqlx::query("SELECT current_database()::text, current_user::text")
        .fetch_one(&mut first)
        .await
        .context("could not ask the server who we are")?;
    first
        .close()
        .await
        .context("could not close the first connection")?;
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(30))
        .connect_lazy_with(options.clone());
    let target = Target {
        host: options.get_host().to_owned(),
        port: options.get_port(),
        database: row.get(0),
        user: row.get(1),
    };
    Ok(Session { pool, target })
}

/// A column the tool reads or writes, with the type it relies on (`None`: any type).
type ColumnSpec = (&'static str, Option<&'static str>);
type TableSpec = (&'static str, &'static [ColumnSpec]);

const REQUIRED_COLUMNS: &[TableSpec] = &[
    (
        "member_profiles",
        &[
            ("id", Some("uuid")),
            ("slug", None),
            ("agents", Some("jsonb")),
            ("updated_at", None),
        ],
    ),
    (
        "agent_capabilities_snapshot",
        &[
            ("agent_url", Some("text")),
            ("inferred_type", Some("text")),
            ("last_discovered", None),
            ("discovery_error", None),
            ("oauth_required", None),
        ],
    ),
];

const AUDIT_COLUMNS: &[ColumnSpec] = &[
    ("agent_url", Some("text")),
    ("member_id", Some("text")),
    ("old_type", Some("text")),
    ("new_type", Some("text")),
    ("source", Some("text")),
    ("run_id", Some("text")),
    ("changed_at", None),
    ("notes", Some("jsonb")),
];

/// Checks tables, columns and privileges before anything is read or written. `for_apply` adds the
/// audit table and the write privileges.
pub async fn preflight(pool: &PgPool, for_apply: bool) -> Result<()> {
    let mut problems = Vec::new();
    let mut tables: Vec<TableSpec> = REQUIRED_COLUMNS.to_vec();
    if for_apply {
        tables.push(("type_reclassification_log", AUDIT_COLUMNS));
    }
    for (table, columns) in tables {
        let rows = sqlx::query(
            "SELECT a.attname::text, format_type(a.atttypid, NULL) \
             FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(table)
        .fetch_all(pool)
        .await
        .with_context(|| format!("could not inspect table '{table}'"))?;
        if rows.is_empty() {
            problems.push(format!("table '{table}' is missing"));
            continue;
        }
        let found: HashMap<String, String> = rows
            .iter()
            .map(|row| (row.get::<String, _>(0), row.get::<String, _>(1)))
            .collect();
        for (column, wanted) in columns {
            match (found.get(*column), wanted) {
                (None, _) => problems.push(format!("column '{table}.{column}' is missing")),
                (Some(actual), Some(wanted)) if actual != wanted && !compatible(actual, wanted) => {
                    problems.push(format!(
                        "column '{table}.{column}' is {actual}, expected {wanted}"
                    ))
                }
                _ => {}
            }
        }
    }
    if problems.is_empty() {
        let wanted = if for_apply {
            vec![
                ("member_profiles", "SELECT"),
                ("member_profiles", "UPDATE"),
                ("agent_capabilities_snapshot", "SELECT"),
                ("type_reclassification_log", "INSERT"),
            ]
        } else {
            vec![
                ("member_profiles", "SELECT"),
                ("agent_capabilities_snapshot", "SELECT"),
            ]
        };
        for (table, privilege) in wanted {
            let granted: bool = sqlx::query_scalar("SELECT has_table_privilege($1, $2)")
                .bind(table)
                .bind(privilege)
                .fetch_one(pool)
                .await
                .with_context(|| format!("could not check {privilege} on '{table}'"))?;
            if !granted {
                problems.push(format!("this user lacks {privilege} on '{table}'"));
            }
        }
        if for_apply {
            for sequence in sequences_without_usage(pool, "type_reclassification_log").await? {
                problems.push(format!("this user lacks USAGE on sequence '{sequence}'"));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::Preflight(format!(
            "preflight failed, nothing was read or written: {}; point DATABASE_URL at the registry database",
            problems.join("; ")
        ))
        .into())
    }
}

/// Sequences behind the column defaults of `table` (a `serial` id) this user may not draw from:
/// INSERT on the table alone is not enough for them, and the first audit insert would fail
/// after the batch's update. Identity columns need no such grant and are not listed.
async fn sequences_without_usage(pool: &PgPool, table: &str) -> Result<Vec<String>> {
    // The CASE keeps the privilege test off the rows that are no sequence: the planner may
    // evaluate it before the join has filtered them out.
    sqlx::query_scalar(
        "SELECT DISTINCT d.refobjid::regclass::text \
         FROM pg_attrdef ad \
         JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid \
              AND d.refclassid = 'pg_class'::regclass \
         JOIN pg_class c ON c.oid = d.refobjid \
         WHERE ad.adrelid = to_regclass($1) \
           AND CASE WHEN c.relkind = 'S' THEN NOT has_sequence_privilege(c.oid, 'USAGE') END",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .with_context(|| format!("could not check the sequences behind '{table}'"))
}

fn compatible(actual: &str, wanted: &str) -> bool {
    // The server is free to widen text-like columns.
    wanted == "text" && (actual.starts_with("character varying") || actual == "character")
}

/// The cluster's identity, when this user may read `pg_control_system()`.
pub async fn system_identifier(pool: &PgPool) -> Option<String> {
    sqlx::query_scalar("SELECT system_identifier::text FROM pg_control_system()")
        .fetch_one(pool)
        .await
        .ok()
}

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

/// A read-only, repeatable-read transaction: the whole plan sees one snapshot of the registry
/// and the server refuses any write inside it.
pub async fn begin_read_only(pool: &PgPool) -> Result<Transaction<'static, Postgres>> {
    let mut transaction = pool
        .begin()
        .await
        .context("could not open the planning transaction")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *transaction)
        .await
        .context("could not make the planning transaction read only")?;
    Ok(transaction)
}

/// The server process behind `connection`, so a statement running on it can be cancelled from
/// another connection.
pub async fn backend_pid(connection: &mut PgConnection) -> Result<i32> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(connection)
        .await
        .context("could not ask the server for the planning session's process id")
}

/// Cancels whatever statement backend `pid` is running. A backend blocked on a lock, or busy in a
/// scan that returns few rows, does not notice that its client has gone away.
pub async fn cancel_backend(pool: &PgPool, pid: i32) -> Result<bool> {
    sqlx::query_scalar("SELECT pg_cancel_backend($1)")
        .bind(pid)
        .fetch_one(pool)
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

pub async fn census(connection: &mut PgConnection) -> Result<Census> {
    let (profiles, malformed): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE jsonb_typeof(agents) IS DISTINCT FROM 'array') \
         FROM member_profiles",
    )
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
pub async fn flip_candidates(connection: &mut PgConnection) -> Result<FlipCandidates> {
    use futures_util::TryStreamExt;
    let mut rows = sqlx::query_as::<_, (Uuid, bool)>(FLIP_CANDIDATES)
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
    connection: &mut PgConnection,
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
pub async fn lock_profiles(connection: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<ProfileRow>> {
    let rows = sqlx::query(
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
pub async fn profiles_by_id(
    connection: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<ProfileRow>> {
    let rows = sqlx::query(
        "SELECT id, slug::text, agents::text FROM member_profiles WHERE id = ANY($1) ORDER BY id",
    )
    .bind(ids)
    .fetch_all(connection)
    .await
    .context("could not read the profiles of the run")?;
    Ok(rows.iter().map(profile_row).collect())
}

/// One backfill run as `history` lists it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RunRecord {
    pub run_id: String,
    pub first_change: DateTime<Utc>,
    pub last_change: DateTime<Utc>,
    pub flips: i64,
    pub profiles: i64,
    /// The run this one reverted, when it was a revert.
    pub reverts: Option<String>,
}

pub async fn backfill_runs(pool: &PgPool) -> Result<Vec<RunRecord>> {
    sqlx::query_as::<_, RunRecord>(
        "SELECT run_id, min(changed_at) AS first_change, max(changed_at) AS last_change, \
                count(*) AS flips, count(DISTINCT member_id) AS profiles, \
                max(notes ->> 'reverts') AS reverts \
         FROM type_reclassification_log \
         WHERE source = 'backfill_script' AND run_id IS NOT NULL \
         GROUP BY run_id ORDER BY min(changed_at) DESC, run_id DESC",
    )
    .fetch_all(pool)
    .await
    .context("could not read type_reclassification_log")
}

/// One audit row of a backfill run.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
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
    #[serde(skip)]
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

pub async fn run_entries(pool: &PgPool, run_id: &str) -> Result<Vec<AuditEntry>> {
    let mut entries = sqlx::query_as::<_, AuditEntry>(
        "SELECT id, run_id, changed_at, member_id, agent_url, old_type, new_type, \
                notes - 'from' AS notes, (notes -> 'from')::text AS from_json \
         FROM type_reclassification_log \
         WHERE source = 'backfill_script' AND run_id = $1 ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(pool)
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
pub struct CrawlerRow {
    pub new_type: String,
    pub changed_at: DateTime<Utc>,
}

/// What the crawler's own log says about a flip: how many of its rows for the url agree with the
/// flip's new type, when the first and last of those were logged, and what its latest row saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CrawlerEvidence {
    pub count: Option<u64>,
    #[serde(serialize_with = "optional_rfc3339")]
    pub first_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "optional_rfc3339")]
    pub last_at: Option<DateTime<Utc>>,
    pub last_inferred: Option<String>,
    /// Why the log could not be read; the other fields are then null.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

impl CrawlerEvidence {
    pub fn unavailable(why: &str) -> CrawlerEvidence {
        CrawlerEvidence {
            count: None,
            first_at: None,
            last_at: None,
            last_inferred: None,
            unavailable: Some(why.to_owned()),
        }
    }

    /// `rows` in the order they were logged.
    pub fn for_flip(rows: &[CrawlerRow], to: &str) -> CrawlerEvidence {
        let agreeing: Vec<&CrawlerRow> = rows.iter().filter(|row| row.new_type == to).collect();
        CrawlerEvidence {
            count: Some(u64::try_from(agreeing.len()).unwrap_or(u64::MAX)),
            first_at: agreeing.first().map(|row| row.changed_at),
            last_at: agreeing.last().map(|row| row.changed_at),
            last_inferred: rows.last().map(|row| row.new_type.clone()),
            unavailable: None,
        }
    }

    /// Agreeing rows; none when the log could not be read.
    pub fn agreeing(&self) -> u64 {
        self.count.unwrap_or(0)
    }
}

fn optional_rfc3339<S: serde::Serializer>(
    at: &Option<DateTime<Utc>>,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    match at {
        Some(at) => {
            serializer.serialize_str(&at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        }
        None => serializer.serialize_none(),
    }
}

/// Whether this user may read `type_reclassification_log`: `None` when it may, else why not.
pub async fn audit_log_unreadable(pool: &PgPool) -> Result<Option<String>> {
    let readable: Option<bool> = sqlx::query_scalar(
        "SELECT CASE WHEN to_regclass('type_reclassification_log') IS NULL THEN NULL \
                ELSE has_table_privilege('type_reclassification_log', 'SELECT') END",
    )
    .fetch_one(pool)
    .await
    .context("could not check SELECT on 'type_reclassification_log'")?;
    Ok(match readable {
        Some(true) => None,
        Some(false) => Some("no SELECT privilege on type_reclassification_log".to_owned()),
        None => Some("table type_reclassification_log is missing".to_owned()),
    })
}

/// The crawler's `crawler_promote` rows for `urls`, per url in the order they were logged.
pub async fn crawler_disagreements(
    connection: &mut PgConnection,
    urls: &[&str],
) -> Result<HashMap<String, Vec<CrawlerRow>>> {
    let rows: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
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

/// Non-empty `inferred_type` values the rule does not know, with how many snapshots carry each:
/// a sign that the server, and its crawler, are newer than this port.
pub async fn unrecognised_inferred_types(
    connection: &mut PgConnection,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT inferred_type, count(*) FROM agent_capabilities_snapshot \
         WHERE inferred_type <> '' AND NOT inferred_type = ANY($1::text[]) \
         GROUP BY inferred_type ORDER BY inferred_type",
    )
    .bind(&VALID_AGENT_TYPES[..])
    .fetch_all(connection)
    .await
    .context("could not count the inferred types of agent_capabilities_snapshot")?;
    Ok(rows
        .into_iter()
        .map(|(name, count)| (name, u64::try_from(count).unwrap_or(0)))
        .collect())
}

/// One confirmed flip to write, with what its audit row records.
#[derive(Debug, Clone)]
pub struct FlipWrite {
    pub profile_id: Uuid,
    pub profile_label: String,
    pub index: usize,
    pub url: String,
    /// The stored type as the audit log's `old_type` column holds it; `None` to take the stored
    /// value's JSON text from the row itself (a type too deep for the resolver to keep whole).
    pub old_type: Option<String>,
    /// The JSON text written to the element's `type` key.
    pub new_value: String,
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
pub async fn write_flips(
    connection: &mut PgConnection,
    flips: &[FlipWrite],
    run_id: &str,
    tool_version: &str,
    notes_extra: &serde_json::Value,
) -> Result<()> {
    let urls: Vec<&str> = flips.iter().map(|flip| flip.url.as_str()).collect();
    let members: Vec<Uuid> = flips.iter().map(|flip| flip.profile_id).collect();
    let indexes: Vec<i32> = flips
        .iter()
        .map(|flip| i32::try_from(flip.index).unwrap_or(i32::MAX))
        .collect();
    let old_types: Vec<Option<&str>> = flips.iter().map(|flip| flip.old_type.as_deref()).collect();
    let new_types: Vec<&str> = flips.iter().map(|flip| flip.new_type.as_str()).collect();
    let notes: Vec<serde_json::Value> = flips
        .iter()
        .map(|flip| {
            let mut notes = serde_json::json!({
                "profile": flip.profile_label,
                "index": flip.index,
                "tool": "agent-type-backfill",
                "tool_version": tool_version,
            });
            if let (Some(notes), Some(extra)) = (notes.as_object_mut(), notes_extra.as_object()) {
                notes.extend(extra.clone());
            }
            notes
        })
        .collect();
    // An absent or null stored type is recorded as "unknown", as the flip rule reads it.
    let inserted = sqlx::query(
        "INSERT INTO type_reclassification_log \
             (agent_url, member_id, old_type, new_type, source, run_id, notes) \
         SELECT a.url, a.member::text, \
                coalesce(a.old_type, p.agents -> a.idx -> 'type' #>> '{}', 'unknown'), \
                a.new_type, 'backfill_script', $7, \
                a.notes || jsonb_build_object('from', \
                    coalesce(nullif(p.agents -> a.idx -> 'type', 'null'::jsonb), '\"unknown\"'::jsonb)) \
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
        let round = seen.entry(flip.profile_id).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(flip);
        *round += 1;
    }
    for round in rounds {
        let ids: Vec<Uuid> = round.iter().map(|flip| flip.profile_id).collect();
        let paths: Vec<String> = round.iter().map(|flip| flip.index.to_string()).collect();
        let values: Vec<&str> = round.iter().map(|flip| flip.new_value.as_str()).collect();
        let updated = sqlx::query(
            "UPDATE member_profiles AS p \
             SET agents = jsonb_set(p.agents, ARRAY[f.idx, 'type'], f.new_value::jsonb, true) \
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

/// Whether an error is a lock or statement timeout, a deadlock or a serialization failure: the
/// batch rolled back whole and may simply be tried again.
pub fn is_retryable(error: &anyhow::Error) -> bool {
    sqlstates(error).any(|code| matches!(code.as_str(), "55P03" | "57014" | "40001" | "40P01"))
}

/// Whether the server cancelled a statement for running past `statement_timeout` (57014 is also
/// what a cancel request gives, and the tool never sends one).
pub fn is_statement_timeout(error: &anyhow::Error) -> bool {
    sqlstates(error).any(|code| code == "57014")
}

fn sqlstates(error: &anyhow::Error) -> impl Iterator<Item = String> + '_ {
    error.chain().filter_map(|cause| {
        let error = cause.downcast_ref::<sqlx::Error>()?.as_database_error()?;
        Some(error.code()?.into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_removes_the_url_and_its_password_wherever_they_appear() {
        let url = "postgres://backfill:Sup3r%2FSecret@db:5432/registry";
        let message = format!("failed on {url}; password Sup3r%2FSecret was rejected");
        let clean = redact(&message, url);
        assert!(!clean.contains("Sup3r"), "{clean}");
        assert!(clean.contains("<database url>"));
        assert_eq!(redact("nothing to hide", ""), "nothing to hide");
        assert_eq!(url_password("postgres://u@db/x"), None);
        assert!(names_root_certificate(
            "postgres://db/x?sslmode=require&sslrootcert=/ca.pem"
        ));
        assert!(!names_root_certificate("postgres://db/x?sslmode=require"));
        assert_eq!(
            url_password("postgres://u:p@ss@db/x").as_deref(),
            Some("p@ss")
        );
    }
}
