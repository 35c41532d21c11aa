//! Reliability of `--apply` under concurrent writers, SIGKILL, terminated sessions, a server
//! restart and lock/statement timeouts, against a real PostgreSQL.
//!
//! Every fault test checks the same invariant, [`atomicity_violations`]: an element's type differs
//! from the seeded one exactly when one audit row records that flip, the audit row's element holds
//! its `new_type`, and nothing else in any profile moved. After each fault a re-run must exit 0
//! and leave the table and the audit log equal to one uninterrupted run on an identical copy.
//!
//! The figures of each test are printed with `eprintln!`:
//! `cargo test --test it reliability -- --nocapture`.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_type_backfill::domain::count;
use agent_type_backfill::events::Summary;
use agent_type_backfill::resolver::{resolve_agents, type_label};
use agent_type_backfill::support::ephemeral::EphemeralPostgres;
use agent_type_backfill::support::seed::{self, BulkSpec, Rng};
use agent_type_backfill::support::MIGRATOR;
use common::{backfill, log, AuditRow, Finished, RunLog, Scratch, Server, Tool, ToolRun, HANG};
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// `--max-flips` for runs whose plan is big on purpose.
const NO_LIMIT: &str = "1000000";

// ------------------------------------------------------------------------------------------------
// Registry contents and the state of a database
// ------------------------------------------------------------------------------------------------

/// The named fixtures (junk rows, odd types, big numbers) among `profiles` ordinary profiles.
async fn seed_registry(pool: &PgPool, profiles: usize, stale_per_mille: u64) {
    let (named, snapshots) = seed::named_fixtures();
    seed::insert(pool, &named, &snapshots).await.unwrap();
    seed::seed_bulk(
        pool,
        BulkSpec {
            profiles,
            snapshot_per_mille: 600,
            unclassified_per_mille: 167,
            stale_per_mille,
            seed: 0x5EED_2026,
        },
    )
    .await
    .unwrap();
}

/// Every profile's `agents` by id; `None` for SQL NULL.
type AgentsById = BTreeMap<Uuid, Option<Value>>;

async fn load_agents(pool: &PgPool) -> AgentsById {
    let rows: Vec<(Uuid, Option<String>)> =
        sqlx::query_as("SELECT id, agents::text FROM member_profiles")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(id, text)| (id, text.map(|text| serde_json::from_str(&text).unwrap())))
        .collect()
}

/// What "the same audit log" compares: one row per flip, as a multiset.
type AuditKey = (Option<String>, String, Option<String>, String, Option<i64>);

fn audit_key(row: &AuditRow) -> AuditKey {
    (
        row.member_id.clone(),
        row.agent_url.clone(),
        row.old_type.clone(),
        row.new_type.clone(),
        row.index(),
    )
}

async fn load_audit(pool: &PgPool) -> Vec<AuditRow> {
    common::audit_rows(pool).await
}

fn audit_multiset(rows: &[AuditRow]) -> Vec<AuditKey> {
    let mut keys: Vec<AuditKey> = rows.iter().map(audit_key).collect();
    keys.sort();
    keys
}

struct State {
    agents: AgentsById,
    audit: Vec<AuditRow>,
}

async fn load_state(pool: &PgPool) -> State {
    State {
        agents: load_agents(pool).await,
        audit: load_audit(pool).await,
    }
}

/// The stored type as the audit log's `old_type` holds it: absent or null reads as `unknown`.
fn effective_label(element: &Value) -> String {
    match element.get("type") {
        None | Some(Value::Null) => "unknown".to_owned(),
        Some(other) => type_label(other),
    }
}

/// Whether two elements are equal in everything but their `type` key.
fn same_but_type(old: &Value, new: &Value) -> bool {
    match (old.as_object(), new.as_object()) {
        (Some(old), Some(new)) => {
            let rest = |object: &serde_json::Map<String, Value>| {
                object.iter().filter(|(key, _)| *key != "type").count()
            };
            rest(old) == rest(new)
                && old
                    .iter()
                    .filter(|(key, _)| *key != "type")
                    .all(|(key, value)| new.get(key) == Some(value))
        }
        _ => old == new,
    }
}

/// The fault invariant. Empty when: every audit row's element exists, carries the row's url and
/// `new_type`, and had the row's `old_type` when seeded; no element has two audit rows; every
/// element whose type differs from the seeded one has an audit row; and no profile changed in any
/// other way (same profiles, same lengths, every other key of every element as seeded).
fn atomicity_violations<'a>(
    seeded: &'a AgentsById,
    now: &'a AgentsById,
    audit: &[AuditRow],
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut audited: HashMap<(Uuid, usize), usize> = HashMap::new();
    for row in audit {
        let member = row
            .member_id
            .as_deref()
            .and_then(|id| Uuid::parse_str(id).ok());
        let index = row.index().and_then(|index| usize::try_from(index).ok());
        let (Some(member), Some(index)) = (member, index) else {
            problems.push(format!("audit row without a member or an index: {row:?}"));
            continue;
        };
        *audited.entry((member, index)).or_default() += 1;
        let element = |agents: &'a AgentsById| -> Option<&'a Value> {
            agents
                .get(&member)
                .and_then(Option::as_ref)
                .and_then(|agents| agents.get(index))
        };
        match element(now) {
            None => problems.push(format!("audit row names no element: {row:?}")),
            Some(element) => {
                if element.get("type") != Some(&Value::String(row.new_type.clone())) {
                    problems.push(format!(
                        "audit row without its flip: {row:?}, element is {element}"
                    ));
                }
                if element.get("url").and_then(Value::as_str) != Some(row.agent_url.as_str()) {
                    problems.push(format!("audit row names another url: {row:?} vs {element}"));
                }
            }
        }
        if let Some(before) = element(seeded) {
            if Some(effective_label(before)) != row.old_type {
                problems.push(format!(
                    "audit row's old_type is not the seeded type: {row:?}"
                ));
            }
        }
    }
    for ((member, index), count) in &audited {
        if *count > 1 {
            problems.push(format!(
                "{count} audit rows for element {index} of profile {member}"
            ));
        }
    }
    if seeded.keys().ne(now.keys()) {
        problems.push("the set of profiles changed".to_owned());
    }
    for (id, before) in seeded {
        let after = now.get(id).and_then(Option::as_ref);
        match (before, after) {
            (Some(Value::Array(before)), Some(Value::Array(after))) => {
                if before.len() != after.len() {
                    problems.push(format!("profile {id} changed length"));
                }
                for (index, (old, new)) in before.iter().zip(after).enumerate() {
                    if !same_but_type(old, new) {
                        problems.push(format!(
                            "profile {id} element {index} changed beyond its type: {old} -> {new}"
                        ));
                    }
                    if old.get("type") != new.get("type") && !audited.contains_key(&(*id, index)) {
                        problems.push(format!(
                            "flip without audit row: profile {id} element {index}: {old} -> {new}"
                        ));
                    }
                }
            }
            (before, after) => {
                if before.as_ref() != after {
                    problems.push(format!("non-array profile {id} changed"));
                }
            }
        }
    }
    problems
}

fn assert_no_problems(problems: &[String], context: &str) {
    assert!(
        problems.is_empty(),
        "{context}: {} problems, first ones:\n{}",
        problems.len(),
        problems
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Flip, skipped and other events identify a flip by these fields; audit rows by the same ones.
type FlipKey = (String, u64, String, String, String);

fn event_key(flip: &log::Flip) -> FlipKey {
    (
        flip.profile_id.to_string(),
        flip.index,
        flip.url.clone(),
        flip.from.to_string(),
        flip.to.clone(),
    )
}

fn audit_flip_key(row: &AuditRow) -> FlipKey {
    (
        row.member_id.clone().unwrap_or_default(),
        row.index()
            .map_or(u64::MAX, |index| u64::try_from(index).unwrap()),
        row.agent_url.clone(),
        row.from().map_or("null".to_owned(), Value::to_string),
        row.new_type.clone(),
    )
}

/// Audit rows of `run_id` that match no `flip` event of that run's log: written but not planned.
fn unplanned_audit_rows(log: &RunLog, audit: &[AuditRow], run_id: &str) -> Vec<String> {
    let planned: HashSet<FlipKey> = log.flips().into_iter().map(event_key).collect();
    audit
        .iter()
        .filter(|row| row.run_id.as_deref() == Some(run_id))
        .filter(|row| !planned.contains(&audit_flip_key(row)))
        .map(|row| format!("audit row of run {run_id} matches no flip event: {row:?}"))
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Databases on a server
// ------------------------------------------------------------------------------------------------

// ------------------------------------------------------------------------------------------------
// The built binary
// ------------------------------------------------------------------------------------------------

async fn audit_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM type_reclassification_log")
        .fetch_one(pool)
        .await
        .unwrap()
}

const TOOL_SESSIONS: &str = "datname = current_database() \
     AND application_name LIKE 'agent-type-backfill %' AND pid <> pg_backend_pid()";

/// Waits until the tool waits on a lock in a statement starting with `statement`; false if the
/// tool exited first.
async fn wait_blocked(pool: &PgPool, run: &mut ToolRun, statement: &str) -> bool {
    let pattern = format!("{statement}%");
    loop {
        let blocked: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE {TOOL_SESSIONS} \
             AND wait_event_type = 'Lock' AND query LIKE $1"
        ))
        .bind(&pattern)
        .fetch_one(pool)
        .await
        .unwrap();
        if blocked > 0 {
            return true;
        }
        if !run.running() || run.started.elapsed() > HANG {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// Waits until the audit table holds at least `rows` rows; false if the tool exited first.
async fn wait_audit_rows(pool: &PgPool, run: &mut ToolRun, rows: i64) -> bool {
    loop {
        if audit_count(pool).await >= rows {
            return true;
        }
        if !run.running() || run.started.elapsed() > HANG {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Terminates every session of the tool; returns how many there were.
async fn terminate_tool_sessions(pool: &PgPool) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE {TOOL_SESSIONS}) AS terminated"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Whether the tool holds a granted row-exclusive lock on `member_profiles`: its `UPDATE` ran
/// in the transaction that is still open.
async fn tool_has_written_audit_rows(pool: &PgPool) -> bool {
    sqlx::query_scalar(&format!(
        "SELECT count(*) > 0 FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE {TOOL_SESSIONS} AND l.relation = 'type_reclassification_log'::regclass \
           AND l.mode = 'RowExclusiveLock' AND l.granted"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A connection holding `FOR UPDATE` on one profile until it is closed or dropped.
async fn hold_row_lock(url: &str, id: Uuid) -> PgConnection {
    let mut holder = PgConnection::connect(url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM member_profiles WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut holder)
        .await
        .unwrap();
    holder
}

/// A connection holding SHARE on the audit table: the tool's `INSERT` waits after its `UPDATE`.
async fn hold_audit_table(url: &str) -> PgConnection {
    hold_table_from_writers(url, "type_reclassification_log").await
}

/// A connection holding `table` in SHARE mode: reads and `FOR UPDATE` go on, any write waits.
async fn hold_table_from_writers(url: &str, table: &str) -> PgConnection {
    let mut holder = PgConnection::connect(url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query(&format!("LOCK TABLE {table} IN SHARE MODE"))
        .execute(&mut holder)
        .await
        .unwrap();
    holder
}

// ------------------------------------------------------------------------------------------------
// Faults: a seeded template, its uninterrupted reference, and one trial per fault
// ------------------------------------------------------------------------------------------------

/// The flags of every fault trial and of its uninterrupted reference run.
fn fault_flags() -> Vec<&'static str> {
    apply_flags("10", &["--lock-timeout", "30s"])
}

/// A re-run only has to finish the job: bigger pages plan faster.
fn rerun_flags() -> Vec<&'static str> {
    apply_flags("500", &["--lock-timeout", "30s"])
}

/// `--apply` with a JSON log, `batch_size` and no flip limit, then `extra`.
fn apply_flags<'a>(batch_size: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--apply",
        "--format",
        "json",
        "--batch-size",
        batch_size,
        "--max-flips",
        NO_LIMIT,
    ];
    flags.extend_from_slice(extra);
    flags
}

struct FaultFixture {
    server: Server,
    template: String,
    seeded: AgentsById,
    /// Profiles with planned flips in the order the tool writes them, with their flip counts.
    flipped: Vec<(Uuid, usize)>,
    flips: usize,
    reference_agents: AgentsById,
    reference_audit: Vec<AuditKey>,
    /// From start to the first audit row, and to the end, of the uninterrupted run.
    plan_ms: u64,
    run_ms: u64,
    scratch: Scratch,
}

impl Drop for FaultFixture {
    fn drop(&mut self) {
        common::drop_database_now(&self.server, &self.template);
    }
}

/// Seeds `template` (through `pool`, which is closed here), then applies an identical copy
/// without interruption: that copy's table and audit log are what every faulted copy must reach.
async fn fault_fixture(
    server: Server,
    template: &str,
    pool: PgPool,
    profiles: usize,
    stale_per_mille: u64,
) -> FaultFixture {
    seed_registry(&pool, profiles, stale_per_mille).await;
    let seeded = load_agents(&pool).await;
    pool.close().await;
    drop(pool);
    let scratch = Scratch::new();
    let reference = format!("{template}_reference");
    server.copy(template, &reference).await;
    let reference_pool = server.pool(&reference).await;
    let mut run = Tool::new(&fault_flags())
        .database(&server.url(&reference))
        .spawn_into(&scratch, "reference");
    let mut plan_ms = None;
    while run.running() && plan_ms.is_none() {
        if audit_count(&reference_pool).await > 0 {
            plan_ms = Some(u64::try_from(run.started.elapsed().as_millis()).unwrap());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let done = run.finish().await;
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
    let mut flipped: Vec<(Uuid, usize)> = Vec::new();
    for flip in done.log().flips() {
        let id = flip.profile_id;
        match flipped.last_mut() {
            Some((last, count)) if *last == id => *count += 1,
            _ => flipped.push((id, 1)),
        }
    }
    // The log lists flips by profile label; the tool writes its batches in profile id order.
    flipped.sort_by_key(|(id, _)| *id);
    let flips = flipped.iter().map(|(_, count)| count).sum();
    let state = load_state(&reference_pool).await;
    assert_eq!(state.audit.len(), flips, "one audit row per planned flip");
    assert_no_problems(
        &atomicity_violations(&seeded, &state.agents, &state.audit),
        "uninterrupted reference run",
    );
    reference_pool.close().await;
    let rerun = Tool::new(&rerun_flags())
        .database(&server.url(&reference))
        .spawn_into(&scratch, "ref-rerun")
        .finish()
        .await;
    assert_eq!(rerun.status.code(), Some(0), "{}", rerun.stderr);
    assert_eq!(
        rerun.log().summary().flips,
        0,
        "a reference re-run finds nothing"
    );
    server.drop_database(&reference).await;
    FaultFixture {
        server,
        template: template.to_owned(),
        seeded,
        flipped,
        flips,
        reference_agents: state.agents,
        reference_audit: audit_multiset(&state.audit),
        plan_ms: plan_ms.unwrap_or(0),
        run_ms: u64::try_from(done.elapsed.as_millis()).unwrap(),
        scratch,
    }
}

/// A fresh database on the shared test server to seed and copy, with the only handle to its
/// pool (dropped by [`fault_fixture`] so no connection outlives the seeding).
async fn template_database() -> (Server, String, PgPool) {
    let name = format!("t_{}", Uuid::new_v4().simple());
    let server = common::shared_server().clone();
    server.admin(&format!("CREATE DATABASE {name}")).await;
    let pool = server.pool(&name).await;
    MIGRATOR.run(&pool).await.unwrap();
    (server, name, pool)
}

mod faults;
mod restart;
mod timeouts;
mod writers;
