//! Reliability of `--apply` under concurrent writers, SIGKILL, terminated sessions, a server
//! restart and lock/statement timeouts (issue "Prove it"), against a real PostgreSQL.
//!
//! Every fault test checks the same invariant, [`atomicity_violations`]: an element's type differs
//! from the seeded one exactly when one audit row records that flip, the audit row's element holds
//! its `new_type`, and nothing else in any profile moved. After each fault a re-run must exit 0
//! and leave the table and the audit log equal to one uninterrupted run on an identical copy.
//!
//! The figures of each test are printed with `eprintln!`:
//! `cargo test --test reliability -- --nocapture`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_type_backfill::ephemeral::EphemeralPostgres;
use agent_type_backfill::events::Summary;
use agent_type_backfill::rehearse::MIGRATOR;
use agent_type_backfill::resolver::{resolve_agents, type_label};
use agent_type_backfill::seed::{self, BulkSpec, Rng};
use common::{args, events, execute, TestDb};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_agent-type-backfill");
/// `--max-flips` for runs whose plan is big on purpose.
const NO_LIMIT: &str = "1000000";
/// Longest any single run of the binary may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(90);

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

#[derive(Debug, Clone)]
struct AuditRow {
    member_id: Option<String>,
    agent_url: String,
    old_type: Option<String>,
    new_type: String,
    index: Option<i64>,
    from: Option<Value>,
    run_id: Option<String>,
}

/// What "the same audit log" compares: one row per flip, as a multiset.
type AuditKey = (Option<String>, String, Option<String>, String, Option<i64>);

impl AuditRow {
    fn key(&self) -> AuditKey {
        (
            self.member_id.clone(),
            self.agent_url.clone(),
            self.old_type.clone(),
            self.new_type.clone(),
            self.index,
        )
    }
}

type AuditTuple = (
    Option<String>,
    String,
    Option<String>,
    String,
    Option<i64>,
    Option<String>,
    Option<String>,
);

async fn load_audit(pool: &PgPool) -> Vec<AuditRow> {
    let rows: Vec<AuditTuple> = sqlx::query_as(
        "SELECT member_id, agent_url, old_type, new_type, (notes->>'index')::bigint, \
                (notes->'from')::text, run_id \
         FROM type_reclassification_log ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(
            |(member_id, agent_url, old_type, new_type, index, from, run_id)| AuditRow {
                member_id,
                agent_url,
                old_type,
                new_type,
                index,
                from: from.map(|text| serde_json::from_str(&text).unwrap()),
                run_id,
            },
        )
        .collect()
}

fn audit_multiset(rows: &[AuditRow]) -> Vec<AuditKey> {
    let mut keys: Vec<AuditKey> = rows.iter().map(AuditRow::key).collect();
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
        let index = row.index.and_then(|index| usize::try_from(index).ok());
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

fn event_key(event: &Value) -> FlipKey {
    (
        event["profile_id"].as_str().unwrap_or_default().to_owned(),
        event["index"].as_u64().unwrap_or(u64::MAX),
        event["url"].as_str().unwrap_or_default().to_owned(),
        event["from"].to_string(),
        event["to"].as_str().unwrap_or_default().to_owned(),
    )
}

fn audit_flip_key(row: &AuditRow) -> FlipKey {
    (
        row.member_id.clone().unwrap_or_default(),
        row.index.map_or(u64::MAX, |index| index as u64),
        row.agent_url.clone(),
        row.from
            .as_ref()
            .map_or("null".to_owned(), Value::to_string),
        row.new_type.clone(),
    )
}

fn of_kind<'a>(log: &'a [Value], kind: &str) -> Vec<&'a Value> {
    log.iter().filter(|event| event["event"] == kind).collect()
}

/// Audit rows of `run_id` that match no `flip` event of that run's log: written but not planned.
fn unplanned_audit_rows(log: &[Value], audit: &[AuditRow], run_id: &str) -> Vec<String> {
    let planned: HashSet<FlipKey> = of_kind(log, "flip").into_iter().map(event_key).collect();
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

/// pid, backend type, application name and query of a session in `pg_stat_activity`.
type Session = (i32, Option<String>, Option<String>, Option<String>);

/// A server's URLs by database name, and the admin statements the tests need.
#[derive(Clone)]
struct Server {
    /// URL with `{db}` where the database name goes.
    template: String,
}

impl Server {
    fn url(&self, database: &str) -> String {
        self.template.replace("{db}", database)
    }

    async fn admin(&self, statement: &str) {
        let mut admin = PgConnection::connect(&self.url("postgres")).await.unwrap();
        sqlx::query(statement).execute(&mut admin).await.unwrap();
        admin.close().await.unwrap();
    }

    /// `CREATE DATABASE name TEMPLATE template`. Only the tests' own connections ever open a
    /// template, and they are closed and dropped before it is copied; but sqlx 0.8's
    /// `Pool::close` can leave a connection that was being returned at that moment open for as
    /// long as a pool handle lives. Should such a session still be there after the server's 5 s
    /// wait, it is named on stderr, terminated, and the copy tried again.
    async fn copy(&self, template: &str, name: &str) {
        let mut admin = PgConnection::connect(&self.url("postgres")).await.unwrap();
        for attempt in 1.. {
            let created = sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
                .execute(&mut admin)
                .await;
            match created {
                Ok(_) => break,
                Err(error) if attempt < 3 => {
                    let sessions: Vec<Session> = sqlx::query_as(
                        "SELECT pid, backend_type, application_name, query \
                         FROM pg_stat_activity WHERE datname = $1",
                    )
                    .bind(template)
                    .fetch_all(&mut admin)
                    .await
                    .unwrap();
                    eprintln!(
                        "[reliability] copy of {template} failed ({error}); terminating the \
                         sessions left on it: {sessions:?}"
                    );
                    sqlx::query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = $1 AND pid <> pg_backend_pid()",
                    )
                    .bind(template)
                    .execute(&mut admin)
                    .await
                    .unwrap();
                }
                Err(error) => panic!("could not copy {template}: {error}"),
            }
        }
        admin.close().await.unwrap();
    }

    async fn drop_database(&self, name: &str) {
        self.admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }

    async fn pool(&self, database: &str) -> PgPool {
        PgPoolOptions::new()
            .max_connections(3)
            .connect(&self.url(database))
            .await
            .unwrap()
    }
}

// ------------------------------------------------------------------------------------------------
// The built binary
// ------------------------------------------------------------------------------------------------

/// A directory for run logs, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "atb-reliability-{}",
            &Uuid::new_v4().simple().to_string()[..12]
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct ToolRun {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    started: Instant,
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Starts the binary with `DATABASE_URL=url`; stdout and stderr go to files so a long run log
/// can never block it on a full pipe.
fn spawn_tool(url: &str, flags: &[&str], scratch: &Scratch, tag: &str) -> ToolRun {
    let stdout = scratch.0.join(format!("{tag}.stdout"));
    let stderr = scratch.0.join(format!("{tag}.stderr"));
    let child = Command::new(BIN)
        .args(flags)
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG")
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    ToolRun {
        child,
        stdout,
        stderr,
        started: Instant::now(),
    }
}

impl ToolRun {
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn kill(&self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
    }

    async fn finish(mut self) -> Finished {
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if self.started.elapsed() > HANG {
                self.kill();
                let _ = self.child.wait();
                panic!(
                    "the tool hung for {HANG:?}; stderr:\n{}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        Finished {
            status,
            stdout: std::fs::read_to_string(&self.stdout).unwrap(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap(),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Finished {
    /// The JSON run log; a line cut short by SIGKILL is ignored.
    fn events(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    fn run_id(&self) -> Option<String> {
        self.events()
            .iter()
            .find(|event| event["event"] == "start")
            .and_then(|event| event["run_id"].as_str().map(str::to_owned))
    }

    fn describe(&self) -> String {
        match (self.status.code(), self.status.signal()) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            _ => format!("{:?}", self.status),
        }
    }

    /// The one `error: ...` line a failed run prints.
    fn error_line(&self) -> String {
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|line| line.starts_with("error: "))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "a failed run prints one error line:\n{}",
            self.stderr
        );
        errors[0].to_owned()
    }
}

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
async fn tool_has_updated_profiles(pool: &PgPool) -> bool {
    sqlx::query_scalar(&format!(
        "SELECT count(*) > 0 FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE {TOOL_SESSIONS} AND l.relation = 'member_profiles'::regclass \
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
    let mut holder = PgConnection::connect(url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("LOCK TABLE type_reclassification_log IN SHARE MODE")
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
    let mut run = spawn_tool(
        &server.url(&reference),
        &fault_flags(),
        &scratch,
        "reference",
    );
    let mut plan_ms = None;
    while run.running() && plan_ms.is_none() {
        if audit_count(&reference_pool).await > 0 {
            plan_ms = Some(run.started.elapsed().as_millis() as u64);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let done = run.finish().await;
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
    let log = done.events();
    let mut flipped: Vec<(Uuid, usize)> = Vec::new();
    for flip in of_kind(&log, "flip") {
        let id = Uuid::parse_str(flip["profile_id"].as_str().unwrap()).unwrap();
        match flipped.last_mut() {
            Some((last, count)) if *last == id => *count += 1,
            _ => flipped.push((id, 1)),
        }
    }
    let flips = flipped.iter().map(|(_, count)| count).sum();
    let state = load_state(&reference_pool).await;
    assert_eq!(state.audit.len(), flips, "one audit row per planned flip");
    assert_no_problems(
        &atomicity_violations(&seeded, &state.agents, &state.audit),
        "uninterrupted reference run",
    );
    reference_pool.close().await;
    let rerun = spawn_tool(
        &server.url(&reference),
        &rerun_flags(),
        &scratch,
        "ref-rerun",
    )
    .finish()
    .await;
    assert_eq!(rerun.status.code(), Some(0), "{}", rerun.stderr);
    let summary = rerun.events().pop().unwrap();
    assert_eq!(summary["flips"], 0, "a reference re-run finds nothing");
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
        run_ms: done.elapsed.as_millis() as u64,
        scratch,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Kill,
    Terminate,
}

#[derive(Debug, Clone, Copy)]
enum Moment {
    /// Milliseconds after the process started: connecting, preflight or planning.
    /// (For the timed moments the test holds the last flipped profile's row until the fault.)
    AfterMs(u64),
    /// Once the audit table holds this many rows: between or inside write batches.
    AfterAuditRows(i64),
    /// While the tool waits for the row lock the test holds on this flipped profile (by position).
    WaitingForRowLock(usize),
    /// In the batch of this flipped profile (by position), while the tool's `INSERT` of audit
    /// rows waits on a table lock the test holds, its `UPDATE` of the profiles already done in
    /// the open transaction. (The test holds the profile's row until it holds the table.)
    BetweenUpdateAndAudit(usize),
}

impl FaultFixture {
    /// Twenty moments spread over the run; the terminations use other fractions than the kills.
    fn moments(&self, fault: Fault) -> Vec<Moment> {
        let rows = |share: f64| (self.flips as f64 * share) as i64;
        let nth = |share: f64| ((self.flipped.len() - 1) as f64 * share) as usize;
        let ms = |share: f64| (self.plan_ms as f64 * share) as u64;
        let (times, row_shares, lock_shares, between_shares): (&[f64], &[f64], &[f64], &[f64]) =
            match fault {
                Fault::Kill => (
                    &[0.0, 0.3, 0.7],
                    &[0.02, 0.12, 0.24, 0.36, 0.48, 0.6, 0.7, 0.8],
                    &[0.1, 0.4, 0.7, 0.97],
                    &[0.0, 0.25, 0.5, 0.75, 0.9],
                ),
                Fault::Terminate => (
                    &[0.1, 0.5, 0.85],
                    &[0.05, 0.1, 0.2, 0.3, 0.42, 0.54, 0.65, 0.75],
                    &[0.0, 0.3, 0.55, 0.85],
                    &[0.1, 0.35, 0.6, 0.8, 0.93],
                ),
            };
        let mut moments: Vec<Moment> = times.iter().map(|s| Moment::AfterMs(ms(*s))).collect();
        moments.extend(
            row_shares
                .iter()
                .map(|s| Moment::AfterAuditRows(rows(*s).max(1))),
        );
        moments.extend(
            lock_shares
                .iter()
                .map(|s| Moment::WaitingForRowLock(nth(*s))),
        );
        moments.extend(
            between_shares
                .iter()
                .map(|s| Moment::BetweenUpdateAndAudit(nth(*s))),
        );
        moments
    }

    /// Checks a copy after a faulted run: the invariant, that the faulted run wrote only what it
    /// planned, that a re-run exits 0, and that the result equals the uninterrupted reference.
    /// Returns the audit rows the faulted run left.
    async fn assert_recovers(&self, database: &str, faulted: &Finished, context: &str) -> usize {
        let pool = self.server.pool(database).await;
        let state = load_state(&pool).await;
        assert_no_problems(
            &atomicity_violations(&self.seeded, &state.agents, &state.audit),
            &format!("{context}: after the fault"),
        );
        let left = match faulted.run_id() {
            Some(run_id) => {
                assert_no_problems(
                    &unplanned_audit_rows(&faulted.events(), &state.audit, &run_id),
                    context,
                );
                assert!(
                    state
                        .audit
                        .iter()
                        .all(|row| row.run_id.as_deref() == Some(&run_id)),
                    "{context}: audit rows of another run"
                );
                state.audit.len()
            }
            None => {
                assert!(
                    state.audit.is_empty(),
                    "{context}: audit rows without a run log"
                );
                0
            }
        };

        let rerun = spawn_tool(
            &self.server.url(database),
            &rerun_flags(),
            &self.scratch,
            &format!("{database}-rerun"),
        )
        .finish()
        .await;
        assert_eq!(
            rerun.status.code(),
            Some(0),
            "{context}: the re-run must finish the job: {}",
            rerun.stderr
        );
        let state = load_state(&pool).await;
        if let Some(run_id) = rerun.run_id() {
            assert_no_problems(
                &unplanned_audit_rows(&rerun.events(), &state.audit, &run_id),
                &format!("{context}: re-run"),
            );
        }
        let differing = self
            .reference_agents
            .iter()
            .filter(|(id, agents)| state.agents.get(id) != Some(agents))
            .count();
        assert_eq!(
            differing, 0,
            "{context}: profiles differ from the uninterrupted run"
        );
        assert_eq!(
            state.agents.len(),
            self.reference_agents.len(),
            "{context}: profile count"
        );
        assert_eq!(
            audit_multiset(&state.audit),
            self.reference_audit,
            "{context}: the audit log differs from the uninterrupted run's"
        );
        pool.close().await;
        left
    }

    fn trial_database(&self, number: usize, fault: Fault) -> String {
        let tag = match fault {
            Fault::Kill => "kill",
            Fault::Terminate => "term",
        };
        format!("{}_{tag}{number}", self.template)
    }

    /// Creates the copy for a trial while the previous trial runs.
    fn copy_in_background(&self, number: usize, fault: Fault) -> tokio::task::JoinHandle<()> {
        let server = self.server.clone();
        let template = self.template.clone();
        let database = self.trial_database(number, fault);
        tokio::spawn(async move { server.copy(&template, &database).await })
    }

    /// One apply on a fresh copy (made by [`FaultFixture::copy_in_background`]), faulted at
    /// `moment`, then checked and re-run.
    async fn trial(&self, number: usize, fault: Fault, moment: Moment) -> TrialOutcome {
        let database = self.trial_database(number, fault);
        let context = format!("{fault:?} #{number} at {moment:?}");
        let url = self.server.url(&database);
        let pool = self.server.pool(&database).await;
        // A timed moment must find the run still going: the last flipped profile stays locked
        // until the fault, so the run cannot finish before it.
        let last = self.flipped.len() - 1;
        let mut holder = match moment {
            Moment::WaitingForRowLock(nth) | Moment::BetweenUpdateAndAudit(nth) => {
                Some(hold_row_lock(&url, self.flipped[nth].0).await)
            }
            Moment::AfterMs(_) | Moment::AfterAuditRows(_) => {
                Some(hold_row_lock(&url, self.flipped[last].0).await)
            }
        };
        let mut run = spawn_tool(&url, &fault_flags(), &self.scratch, &database);
        let reached = match moment {
            Moment::AfterMs(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                run.running()
            }
            Moment::AfterAuditRows(rows) => wait_audit_rows(&pool, &mut run, rows).await,
            Moment::WaitingForRowLock(_) => {
                wait_blocked(&pool, &mut run, "SELECT id, slug::text, agents::text").await
            }
            Moment::BetweenUpdateAndAudit(_) => {
                let row_locked =
                    wait_blocked(&pool, &mut run, "SELECT id, slug::text, agents::text").await;
                assert!(row_locked, "{context}: the tool never reached the held row");
                let table = hold_audit_table(&url).await;
                let _ = holder.replace(table).unwrap().close().await;
                let blocked =
                    wait_blocked(&pool, &mut run, "INSERT INTO type_reclassification_log").await;
                assert!(
                    blocked && tool_has_updated_profiles(&pool).await,
                    "{context}: the tool should wait with its UPDATE done"
                );
                blocked
            }
        };
        assert!(reached, "{context}: the run ended before the moment");
        let rows_at_fault = audit_count(&pool).await;
        let sessions = match fault {
            Fault::Kill => {
                run.kill();
                0
            }
            Fault::Terminate => loop {
                let terminated = terminate_tool_sessions(&pool).await;
                if terminated > 0 || !run.running() {
                    break terminated;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            },
        };
        if let Some(holder) = holder.take() {
            let _ = holder.close().await;
        }
        let done = run.finish().await;
        match fault {
            Fault::Kill => assert_eq!(
                done.status.signal(),
                Some(libc::SIGKILL),
                "{context}: killed while running, got {}",
                done.describe()
            ),
            Fault::Terminate => {
                assert!(
                    sessions > 0,
                    "{context}: no session of the tool to terminate"
                );
                match done.status.code() {
                    Some(0) => {}
                    Some(1) => {
                        let error = done.error_line();
                        assert!(error.contains("could not"), "{context}: {error}");
                    }
                    _ => panic!("{context}: {} {}", done.describe(), done.stderr),
                }
            }
        }
        pool.close().await;
        let left = self.assert_recovers(&database, &done, &context).await;
        self.server.drop_database(&database).await;
        TrialOutcome {
            moment,
            rows_at_fault,
            left,
            exit: done.describe(),
            error: (done.status.code() == Some(1)).then(|| done.error_line()),
        }
    }
}

#[derive(Debug)]
struct TrialOutcome {
    moment: Moment,
    rows_at_fault: i64,
    left: usize,
    exit: String,
    error: Option<String>,
}

/// A fresh database on the shared test server to seed and copy, with the only handle to its
/// pool (dropped by [`fault_fixture`] so no connection outlives the seeding).
async fn template_database() -> (Server, String, PgPool) {
    let TestDb { name, url, pool } = TestDb::new().await;
    let server = Server {
        template: url.replace(&name, "{db}"),
    };
    (server, name, pool)
}

async fn fault_series(fault: Fault) {
    let clock = Instant::now();
    let (server, template, pool) = template_database().await;
    let fixture = fault_fixture(server, &template, pool, 1_000, 200).await;
    let moments = fixture.moments(fault);
    assert_eq!(moments.len(), 20);
    let mut outcomes = Vec::new();
    let mut copy = fixture.copy_in_background(0, fault);
    for (number, moment) in moments.iter().enumerate() {
        copy.await.unwrap();
        if number + 1 < moments.len() {
            copy = fixture.copy_in_background(number + 1, fault);
        } else {
            copy = tokio::spawn(async {});
        }
        outcomes.push(fixture.trial(number, fault, *moment).await);
    }
    copy.await.unwrap();
    let name = match fault {
        Fault::Kill => "SIGKILL",
        Fault::Terminate => "pg_terminate_backend",
    };
    eprintln!(
        "[reliability] {name}: {} profiles, {} planned flips over {} profiles, --batch-size 10; \
         uninterrupted run {} ms (first audit row at {} ms)",
        fixture.seeded.len(),
        fixture.flips,
        fixture.flipped.len(),
        fixture.run_ms,
        fixture.plan_ms
    );
    for outcome in &outcomes {
        eprintln!(
            "[reliability]   {name} at {:?}: {} audit rows at the fault, {} left, {}{}",
            outcome.moment,
            outcome.rows_at_fault,
            outcome.left,
            outcome.exit,
            outcome
                .error
                .as_deref()
                .map(|error| format!(" ({error})"))
                .unwrap_or_default()
        );
    }
    let exits: BTreeMap<&str, usize> = outcomes.iter().fold(BTreeMap::new(), |mut by, outcome| {
        *by.entry(outcome.exit.as_str()).or_default() += 1;
        by
    });
    eprintln!(
        "[reliability] {name}: {} faults survived (invariant held, re-run exit 0, same table and \
         audit log as one uninterrupted run); exits {exits:?}; {:.1}s",
        outcomes.len(),
        clock.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_20_moments_of_an_apply_never_splits_a_flip_from_its_audit_row_and_a_rerun_converges(
) {
    fault_series(Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_session_at_20_moments_never_splits_a_flip_from_its_audit_row_and_a_rerun_converges(
) {
    fault_series(Fault::Terminate).await;
}

// ------------------------------------------------------------------------------------------------
// Concurrent writers
// ------------------------------------------------------------------------------------------------

const WRITERS: usize = 4;
/// Pause between two edits of one writer. The plan is one snapshot taken at its start and takes
/// a fraction of a second, so the writers edit at the same pace throughout the run.
const EDIT_PAUSE: Duration = Duration::from_millis(3);

/// How each writer edits a profile, besides bumping its own counter key `"w<n>"` in one element.
/// Every edit re-serialises the whole array; the reshaping ones happen on every other edit.
const WRITER_STYLES: [&str; WRITERS] = [
    "counter bump only",
    "counter bump; every other edit the whole array rotated by one (re-ordered)",
    "counter bump; every other edit the whole array resolved as the server saves it",
    "counter bump; every other edit that element's type replaced by the server's resolution",
];

struct WriterInput {
    number: usize,
    url: String,
    /// Profiles with planned flips: edited four times out of five.
    hot: Arc<Vec<Uuid>>,
    all: Arc<Vec<Uuid>>,
    snapshots: Arc<HashMap<String, Option<String>>>,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
}

#[derive(Default)]
struct WriterLog {
    edits: u64,
    /// The last value this writer committed to its counter, by profile and element url.
    counters: HashMap<(Uuid, String), u64>,
    /// Profiles where this writer changed a type or the order of elements.
    reshaped: HashSet<Uuid>,
    /// Reads that found the counter at another value than this writer last committed.
    lost_on_read: u64,
}

fn counter_key(writer: usize) -> String {
    format!("w{writer}")
}

/// The array without the writers' counter keys, to tell a reshaping edit from a counter bump.
fn without_counters(elements: &[Value]) -> Vec<Value> {
    elements
        .iter()
        .map(|element| {
            let mut element = element.clone();
            if let Some(object) = element.as_object_mut() {
                for writer in 0..WRITERS {
                    object.remove(&counter_key(writer));
                }
            }
            element
        })
        .collect()
}

/// Read-modify-write of `agents` in a transaction, the way the server saves a profile, until
/// told to stop.
async fn writer(input: WriterInput) -> WriterLog {
    let mut connection = PgConnection::connect(&input.url).await.unwrap();
    let mut rng = Rng::new(0x00D0_0D00 + input.number as u64);
    let key = counter_key(input.number);
    let mut log = WriterLog::default();
    while !input.stop.load(Ordering::Relaxed) {
        let id = if rng.below(5) < 4 {
            input.hot[rng.below(input.hot.len() as u64) as usize]
        } else {
            input.all[rng.below(input.all.len() as u64) as usize]
        };
        let mut transaction = connection.begin().await.unwrap();
        let text: Option<String> =
            sqlx::query_scalar("SELECT agents::text FROM member_profiles WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_one(&mut *transaction)
                .await
                .unwrap();
        let parsed = text.map(|text| serde_json::from_str::<Value>(&text).unwrap());
        let Some(Value::Array(mut elements)) = parsed else {
            transaction.rollback().await.unwrap();
            continue;
        };
        let agents: Vec<usize> = (0..elements.len())
            .filter(|&index| elements[index].get("url").is_some_and(Value::is_string))
            .collect();
        if agents.is_empty() {
            transaction.rollback().await.unwrap();
            continue;
        }
        let index = agents[rng.below(agents.len() as u64) as usize];
        let url = elements[index]["url"].as_str().unwrap().to_owned();
        let stored = elements[index]
            .get(&key)
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let last = log.counters.get(&(id, url.clone())).copied().unwrap_or(0);
        if stored != last {
            log.lost_on_read += 1;
        }
        elements[index][key.as_str()] = Value::from(stored + 1);
        let before = without_counters(&elements);
        let reshape = rng.below(2) == 0;
        match input.number {
            _ if !reshape => {}
            1 => elements.rotate_left(1),
            2 => {
                let Value::Array(resolved) =
                    resolve_agents(&Value::Array(elements), &*input.snapshots)
                else {
                    unreachable!("an array resolves to an array")
                };
                elements = resolved;
            }
            3 => {
                let one = Value::Array(vec![elements[index].clone()]);
                elements[index] = resolve_agents(&one, &*input.snapshots)[0].clone();
            }
            _ => {}
        }
        if without_counters(&elements) != before {
            log.reshaped.insert(id);
        }
        sqlx::query("UPDATE member_profiles SET agents = $1::jsonb WHERE id = $2")
            .bind(Value::Array(elements).to_string())
            .bind(id)
            .execute(&mut *transaction)
            .await
            .unwrap();
        transaction.commit().await.unwrap();
        log.counters.insert((id, url), stored + 1);
        log.edits += 1;
        input.committed.fetch_add(1, Ordering::Relaxed);
        // A busy registry, not a benchmark: leave the two cores to the tool and the server.
        tokio::time::sleep(EDIT_PAUSE).await;
    }
    connection.close().await.unwrap();
    log
}

/// The element of `agents` with this url.
fn element_with_url<'a>(agents: Option<&'a Value>, url: &str) -> Option<&'a Value> {
    agents?
        .as_array()?
        .iter()
        .find(|element| element.get("url").and_then(Value::as_str) == Some(url))
}

/// Every element without its type and the writers' counters, in a stable order: what neither
/// the tool nor the writers may change.
fn content(agents: Option<&Value>) -> Vec<String> {
    let Some(Value::Array(elements)) = agents else {
        return vec![agents.map_or("SQL NULL".to_owned(), Value::to_string)];
    };
    let mut rest: Vec<String> = without_counters(elements)
        .into_iter()
        .map(|mut element| {
            if let Some(object) = element.as_object_mut() {
                object.remove("type");
            }
            element.to_string()
        })
        .collect();
    rest.sort();
    rest
}

async fn in_process(url: &str, flags: &[&str]) -> (anyhow::Result<Summary>, Vec<Value>) {
    let mut out = Vec::new();
    let result = execute(&args(flags), url, &mut out).await;
    (result, events(&out))
}

/// The seeded registry every concurrent-writer test copies, with what a dry-run found in it.
struct WritersTemplate {
    server: Server,
    name: String,
    seeded: AgentsById,
    /// Profiles with planned flips.
    hot: Vec<Uuid>,
    planned: Summary,
    snapshots: HashMap<String, Option<String>>,
    seed_ms: u128,
}

static WRITERS_TEMPLATE: tokio::sync::OnceCell<WritersTemplate> =
    tokio::sync::OnceCell::const_new();

/// Seeds 20,000 ordinary profiles once per test binary; the first test to ask pays for it.
async fn writers_template() -> &'static WritersTemplate {
    WRITERS_TEMPLATE
        .get_or_init(|| async {
            let clock = Instant::now();
            let (server, name, pool) = template_database().await;
            seed_registry(&pool, 20_000, 45).await;
            let seeded = load_agents(&pool).await;
            let (planned, log) = in_process(
                &server.url(&name),
                &["--dry-run", "--format", "json", "--max-flips", NO_LIMIT],
            )
            .await;
            let planned = planned.unwrap();
            assert!(planned.profiles_scanned >= 20_000, "{planned:?}");
            assert!(planned.flips >= 1_000, "{planned:?}");
            let hot: BTreeSet<Uuid> = of_kind(&log, "flip")
                .iter()
                .map(|flip| Uuid::parse_str(flip["profile_id"].as_str().unwrap()).unwrap())
                .collect();
            let snapshots: HashMap<String, Option<String>> =
                sqlx::query_as("SELECT agent_url, inferred_type FROM agent_capabilities_snapshot")
                    .fetch_all(&pool)
                    .await
                    .unwrap()
                    .into_iter()
                    .collect();
            pool.close().await;
            drop(pool);
            WritersTemplate {
                server,
                name,
                seeded,
                hot: hot.into_iter().collect(),
                planned,
                snapshots,
                seed_ms: clock.elapsed().as_millis(),
            }
        })
        .await
}

/// An apply with `batch_size` over 20,000+ profiles and 1,000+ planned flips while four writers
/// edit the same profiles; then every writer's last commit, every audit row, every skipped flip
/// and a follow-up dry-run are checked.
async fn apply_under_concurrent_writers(batch_size: u32) {
    let clock = Instant::now();
    let template = writers_template().await;
    let name = format!("{}_batch{batch_size}", template.name);
    template.server.copy(&template.name, &name).await;
    let url = template.server.url(&name);
    let pool = template.server.pool(&name).await;
    let seeded = &template.seeded;
    let planned = &template.planned;

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let hot = Arc::new(template.hot.clone());
    let all = Arc::new(seeded.keys().copied().collect::<Vec<_>>());
    let snapshots = Arc::new(template.snapshots.clone());
    let writers: Vec<_> = (0..WRITERS)
        .map(|number| {
            tokio::spawn(writer(WriterInput {
                number,
                url: url.clone(),
                hot: hot.clone(),
                all: all.clone(),
                snapshots: snapshots.clone(),
                stop: stop.clone(),
                committed: committed.clone(),
            }))
        })
        .collect();
    let monitor = {
        let (pool, stop, committed) = (pool.clone(), stop.clone(), committed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if audit_count(&pool).await > 0 {
                    return Some(committed.load(Ordering::Relaxed));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            None
        })
    };
    while committed.load(Ordering::Relaxed) < 2 * WRITERS as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let before_run = committed.load(Ordering::Relaxed);
    let run_clock = Instant::now();
    let batch = batch_size.to_string();
    let (result, log) = in_process(
        &url,
        &[
            "--apply",
            "--format",
            "json",
            "--batch-size",
            &batch,
            "--max-flips",
            NO_LIMIT,
        ],
    )
    .await;
    let during_run = committed.load(Ordering::Relaxed) - before_run;
    let run_ms = run_clock.elapsed().as_millis();
    stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for writer in writers {
        logs.push(writer.await.unwrap());
    }
    let during_writes = monitor
        .await
        .unwrap()
        .map_or(0, |at_first_write| before_run + during_run - at_first_write);
    let summary = result.unwrap();
    let now = load_agents(&pool).await;
    let mut problems = Vec::new();

    // No writer's committed change is missing.
    let mut lost = 0;
    for (number, writer_log) in logs.iter().enumerate() {
        let key = counter_key(number);
        lost += writer_log.lost_on_read;
        for ((id, url), value) in &writer_log.counters {
            let found = element_with_url(now.get(id).and_then(Option::as_ref), url)
                .and_then(|element| element.get(&key))
                .and_then(Value::as_u64);
            if found != Some(*value) {
                lost += 1;
                problems.push(format!(
                    "lost update: writer {number} committed {key}={value} in {url} of {id}, \
                     the table holds {found:?}"
                ));
            }
        }
    }

    // Audit rows of the run and the run log agree exactly.
    let run_id = of_kind(&log, "start")[0]["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let audit: Vec<AuditRow> = load_audit(&pool)
        .await
        .into_iter()
        .filter(|row| row.run_id.as_deref() == Some(run_id.as_str()))
        .collect();
    problems.extend(unplanned_audit_rows(&log, &audit, &run_id));
    let flips: HashSet<FlipKey> = of_kind(&log, "flip").into_iter().map(event_key).collect();
    let skipped = of_kind(&log, "skipped");
    let skipped_planned: HashSet<FlipKey> = skipped
        .iter()
        .filter(|event| event["reason"] != "unplanned")
        .map(|event| event_key(event))
        .collect();
    let unplanned = skipped.len() - skipped_planned.len();
    let mut written: HashMap<FlipKey, usize> = HashMap::new();
    for row in &audit {
        *written.entry(audit_flip_key(row)).or_default() += 1;
        if row.from.as_ref().map(type_label) != row.old_type {
            problems.push(format!("old_type is not the label of notes.from: {row:?}"));
        }
    }
    for (flip, count) in &written {
        if *count != 1 {
            problems.push(format!("{count} audit rows for one flip: {flip:?}"));
        }
        if skipped_planned.contains(flip) {
            problems.push(format!("flip both written and reported skipped: {flip:?}"));
        }
    }
    for flip in &flips {
        if !written.contains_key(flip) && !skipped_planned.contains(flip) {
            problems.push(format!(
                "planned flip neither written nor skipped: {flip:?}"
            ));
        }
    }
    for flip in &skipped_planned {
        if !flips.contains(flip) {
            problems.push(format!("skipped event for a flip never planned: {flip:?}"));
        }
    }
    if (summary.written, summary.skipped, summary.unplanned)
        != (
            audit.len() as u64,
            skipped_planned.len() as u64,
            unplanned as u64,
        )
    {
        problems.push(format!(
            "summary says written {} skipped {} unplanned {}; the audit has {} rows and the log \
             {} skipped and {unplanned} unplanned events",
            summary.written,
            summary.skipped,
            summary.unplanned,
            audit.len(),
            skipped_planned.len()
        ));
    }

    // Every written flip is still in the table: no writer overwrote it with a stale copy.
    for row in &audit {
        let id = Uuid::parse_str(row.member_id.as_deref().unwrap_or_default()).unwrap();
        let element = element_with_url(now.get(&id).and_then(Option::as_ref), &row.agent_url);
        if element.and_then(|element| element.get("type")) != Some(&Value::from(&*row.new_type)) {
            problems.push(format!("written flip gone from the table: {row:?}"));
        }
    }

    // Skips only where a writer re-ordered or re-typed the profile.
    let reshaped: HashSet<Uuid> = logs
        .iter()
        .flat_map(|log| log.reshaped.iter().copied())
        .collect();
    let skipped_at: HashSet<(String, String)> = skipped
        .iter()
        .map(|event| {
            (
                event["profile_id"].as_str().unwrap().to_owned(),
                event["url"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for event in &skipped {
        let id = Uuid::parse_str(event["profile_id"].as_str().unwrap()).unwrap();
        if !reshaped.contains(&id) {
            problems.push(format!("skipped although no writer reshaped it: {event}"));
        }
    }

    // Nothing but types and counters changed anywhere.
    for (id, before) in seeded {
        let after = now.get(id).and_then(Option::as_ref);
        if before.as_ref() != after && content(before.as_ref()) != content(after) {
            problems.push(format!("profile {id} changed beyond types and counters"));
        }
    }

    // A follow-up dry-run finds only flips the writers' edits left: ones this run reported as
    // skipped, in profiles a writer reshaped.
    let (follow_up, follow_log) = in_process(
        &url,
        &["--dry-run", "--format", "json", "--max-flips", NO_LIMIT],
    )
    .await;
    let follow_up = follow_up.unwrap();
    for flip in of_kind(&follow_log, "flip") {
        let at = (
            flip["profile_id"].as_str().unwrap().to_owned(),
            flip["url"].as_str().unwrap().to_owned(),
        );
        let id = Uuid::parse_str(&at.0).unwrap();
        if !skipped_at.contains(&at) || !reshaped.contains(&id) {
            problems.push(format!("follow-up flip the writers did not cause: {flip}"));
        }
    }

    let edits: u64 = logs.iter().map(|log| log.edits).sum();
    for (number, style) in WRITER_STYLES.iter().enumerate() {
        eprintln!(
            "[reliability]   writer w{number} ({style}): {} edits, {} profiles reshaped, \
             {} counters checked",
            logs[number].edits,
            logs[number].reshaped.len(),
            logs[number].counters.len()
        );
    }
    eprintln!(
        "[reliability] concurrent writers, --batch-size {batch_size}: {} profiles, {} planned \
         flips over {} profiles ({} in a dry-run without writers); apply {run_ms} ms: written {}, skipped {}, unplanned {}; \
         writers {WRITERS}, edits committed during the run {during_run} ({during_writes} of them \
         after the first write, {edits} in all, per writer {:?}), profiles reshaped {}, lost updates {lost}; follow-up dry-run flips {}; \
         {:.1}s (seeding the shared template took {} ms)",
        summary.profiles_scanned,
        summary.flips,
        hot.len(),
        planned.flips,
        summary.written,
        summary.skipped,
        summary.unplanned,
        logs.iter().map(|log| log.edits).collect::<Vec<_>>(),
        reshaped.len(),
        follow_up.flips,
        clock.elapsed().as_secs_f64(),
        template.seed_ms
    );
    assert_no_problems(&problems, &format!("--batch-size {batch_size}"));
    assert_eq!(lost, 0, "lost updates");
    assert!(
        logs.iter().all(|log| log.edits > 0) && during_run >= 100 && during_writes > 0,
        "the writers committed only {during_run} edits during the run, {during_writes} while \
         it wrote"
    );
    assert!(summary.written > 0, "{summary:?}");
    assert!(summary.flips >= 1_000, "{summary:?}");
    assert!(summary.profiles_scanned >= 20_000, "{summary:?}");
    pool.close().await;
    template.server.drop_database(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_writers_lose_no_update_and_every_write_is_audited_batch_size_1() {
    apply_under_concurrent_writers(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_writers_lose_no_update_and_every_write_is_audited_batch_size_50() {
    apply_under_concurrent_writers(50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_writers_lose_no_update_and_every_write_is_audited_batch_size_1000() {
    apply_under_concurrent_writers(1000).await;
}

// ------------------------------------------------------------------------------------------------
// Server restart
// ------------------------------------------------------------------------------------------------

/// `EphemeralPostgres::restart` blocks (fast shutdown, start, wait until ready).
async fn restart(server: EphemeralPostgres) -> (EphemeralPostgres, Duration) {
    tokio::task::spawn_blocking(move || {
        let clock = Instant::now();
        let mut server = server;
        server.restart().unwrap();
        (server, clock.elapsed())
    })
    .await
    .unwrap()
}

const RESTART_FLAGS: [&str; 9] = [
    "--apply",
    "--format",
    "json",
    "--batch-size",
    "5",
    "--max-flips",
    NO_LIMIT,
    "--lock-timeout",
    "60s",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_apply_exits_1_with_a_clear_error_and_a_rerun_converges() {
    let clock = Instant::now();
    let mut postgres = tokio::task::spawn_blocking(EphemeralPostgres::start)
        .await
        .unwrap()
        .unwrap();
    let server = Server {
        template: postgres.url("{db}"),
    };
    server.admin("CREATE DATABASE registry").await;
    let pool = server.pool("registry").await;
    MIGRATOR.run(&pool).await.unwrap();
    let fixture = fault_fixture(server.clone(), "registry", pool, 1_000, 100).await;

    // Mid-batch: restart while the tool's batch transaction is open (it waits on a row lock,
    // earlier batches committed), so its session dies under it: exit 1. While writing: restart
    // after a third of the audit rows, wherever the tool is (a restart between two batches may
    // be bridged by the pool reconnecting: exit 0 is accepted there, with the same checks).
    let mut outcomes = Vec::new();
    for (scenario, database) in [("mid-batch", "mid_batch"), ("while writing", "writing")] {
        server.copy("registry", database).await;
        let url = server.url(database);
        let pool = server.pool(database).await;
        let middle = fixture.flipped[fixture.flipped.len() / 2].0;
        // Mid-batch: the tool waits on the middle profile's row. While writing: the last one is
        // held only so the run cannot end before the restart; the restart ends the holder too.
        let held = match scenario {
            "mid-batch" => middle,
            _ => fixture.flipped[fixture.flipped.len() - 1].0,
        };
        let holder = hold_row_lock(&url, held).await;
        let mut run = spawn_tool(&url, &RESTART_FLAGS, &fixture.scratch, database);
        let reached = match scenario {
            "mid-batch" => {
                wait_blocked(&pool, &mut run, "SELECT id, slug::text, agents::text").await
            }
            _ => wait_audit_rows(&pool, &mut run, fixture.flips as i64 / 3).await,
        };
        assert!(reached, "{scenario}: the run ended before the restart");
        let rows_at_restart = audit_count(&pool).await;
        pool.close().await;
        let took;
        (postgres, took) = restart(postgres).await;
        drop(holder);
        let done = run.finish().await;
        let error = (done.status.code() != Some(0)).then(|| done.error_line());
        eprintln!(
            "[reliability] restart {scenario}: {rows_at_restart} audit rows at the restart \
             ({took:?} down), tool {}: {}",
            done.describe(),
            error.as_deref().unwrap_or("no error")
        );
        if scenario == "mid-batch" {
            assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
        }
        if let Some(error) = &error {
            assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
            assert!(error.starts_with("error: could not "), "{error}");
        }
        let left = fixture
            .assert_recovers(database, &done, &format!("restart {scenario}"))
            .await;
        outcomes.push((scenario, rows_at_restart, left, done.describe()));
    }
    eprintln!(
        "[reliability] server restart: {} profiles, {} planned flips, --batch-size 5; \
         outcomes (scenario, audit rows at restart, rows left, exit) {outcomes:?}; \
         each re-run converged to the uninterrupted run; {:.1}s",
        fixture.seeded.len(),
        fixture.flips,
        clock.elapsed().as_secs_f64()
    );
    drop(fixture);
    tokio::task::spawn_blocking(move || postgres.stop())
        .await
        .unwrap()
        .unwrap();
}

// ------------------------------------------------------------------------------------------------
// Lock and statement timeouts
// ------------------------------------------------------------------------------------------------

/// Flags for a timeout case: `--batch-size 10` and no flip limit, then `extra`.
fn timeout_flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    apply_flags("10", extra)
}

impl FaultFixture {
    /// The profiles the tool writes in the same batch of `batch_size` as `profile`, and their
    /// planned flips.
    fn batch_of(&self, profile: Uuid, batch_size: usize) -> (BTreeSet<String>, usize) {
        let batch = self
            .flipped
            .chunks(batch_size)
            .find(|batch| batch.iter().any(|(id, _)| *id == profile))
            .unwrap();
        (
            batch.iter().map(|(id, _)| id.to_string()).collect(),
            batch.iter().map(|(_, flips)| flips).sum(),
        )
    }

    async fn fresh_copy(&self, name: &str) -> (String, String, PgPool) {
        let database = format!("{}_{name}", self.template);
        self.server.copy(&self.template, &database).await;
        let url = self.server.url(&database);
        let pool = self.server.pool(&database).await;
        (database, url, pool)
    }

    async fn run(&self, url: &str, flags: &[&str], tag: &str) -> Finished {
        spawn_tool(url, flags, &self.scratch, tag).finish().await
    }
}

/// The profiles and count of `not_written_timeout` events in a run log.
fn timed_out(done: &Finished) -> (BTreeSet<String>, usize) {
    let log = done.events();
    let events: Vec<&Value> = of_kind(&log, "skipped")
        .into_iter()
        .filter(|event| event["reason"] == "not_written_timeout")
        .collect();
    (
        events
            .iter()
            .map(|event| event["profile_id"].as_str().unwrap().to_owned())
            .collect(),
        events.len(),
    )
}

fn assert_reported_not_written(done: &Finished, flips: usize, context: &str) {
    assert_eq!(done.status.code(), Some(1), "{context}: {}", done.stderr);
    let error = done.error_line();
    assert!(
        error.contains(&format!(
            "{flips} planned flips were not written because their batches kept hitting lock or \
             statement timeouts"
        )),
        "{context}: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_timeouts_are_retried_or_reported_and_never_half_applied() {
    let clock = Instant::now();
    let (server, template, pool) = template_database().await;
    let fixture = fault_fixture(server, &template, pool, 500, 200).await;
    let locked = fixture.flipped[fixture.flipped.len() / 2].0;
    let (batch_profiles, batch_flips) = fixture.batch_of(locked, 10);
    let flags = timeout_flags(&["--lock-timeout", "100ms", "--write-attempts", "2"]);

    // A profile locked for the whole run: its batch times out twice, is rolled back whole and
    // reported; every other batch is written.
    let (database, url, pool) = fixture.fresh_copy("row_lock").await;
    let holder = hold_row_lock(&url, locked).await;
    let done = fixture.run(&url, &flags, "row-lock").await;
    assert_reported_not_written(&done, batch_flips, "row lock held");
    assert_eq!(timed_out(&done), (batch_profiles.clone(), batch_flips));
    assert_eq!(
        audit_count(&pool).await as usize,
        fixture.flips - batch_flips,
        "every other batch is written"
    );
    holder.close().await.unwrap();
    pool.close().await;
    fixture
        .assert_recovers(&database, &done, "row lock held")
        .await;
    eprintln!(
        "[reliability] lock timeout, row held all run: {}, {batch_flips} flips of {} profiles \
         reported not_written_timeout, {} written; re-run converged",
        done.describe(),
        batch_profiles.len(),
        fixture.flips - batch_flips
    );

    // The audit table locked: every INSERT times out after its UPDATE ran in the same
    // transaction; nothing may stay behind.
    let (database, url, pool) = fixture.fresh_copy("audit_lock").await;
    let holder = hold_audit_table(&url).await;
    let flags_one_batch = [
        "--apply",
        "--format",
        "json",
        "--batch-size",
        "1000",
        "--max-flips",
        NO_LIMIT,
        "--lock-timeout",
        "100ms",
        "--write-attempts",
        "2",
    ];
    let done = fixture.run(&url, &flags_one_batch, "audit-lock").await;
    assert_reported_not_written(&done, fixture.flips, "audit table locked");
    assert_eq!(timed_out(&done).1, fixture.flips);
    holder.close().await.unwrap();
    assert!(
        load_agents(&pool).await == fixture.seeded,
        "the rolled-back batch left no profile change"
    );
    assert_eq!(audit_count(&pool).await, 0);
    pool.close().await;
    fixture
        .assert_recovers(&database, &done, "audit table locked")
        .await;
    eprintln!(
        "[reliability] lock timeout on the audit INSERT after the UPDATE: {}, all {} flips \
         reported not_written_timeout, nothing written; re-run converged",
        done.describe(),
        fixture.flips
    );

    // A lock released within the retry budget: retried, everything written.
    let (database, url, pool) = fixture.fresh_copy("released").await;
    let holder = hold_row_lock(&url, locked).await;
    let flags = timeout_flags(&["--lock-timeout", "100ms", "--write-attempts", "5"]);
    let mut run = spawn_tool(&url, &flags, &fixture.scratch, "released");
    assert!(wait_blocked(&pool, &mut run, "SELECT id, slug::text, agents::text").await);
    tokio::time::sleep(Duration::from_millis(250)).await;
    holder.close().await.unwrap();
    let done = run.finish().await;
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
    assert_eq!(done.events().pop().unwrap()["written"], fixture.flips);
    assert!(done.stderr.contains("retrying"), "{}", done.stderr);
    pool.close().await;
    fixture
        .assert_recovers(&database, &done, "lock released")
        .await;
    eprintln!(
        "[reliability] lock timeout, row released 250 ms after the tool blocked: retried, {}, all {} flips \
         written; {:.1}s",
        done.describe(),
        fixture.flips,
        clock.elapsed().as_secs_f64()
    );
}

/// A trigger that makes the `UPDATE` of `profile` sleep 1 s, the first `times` times.
async fn slow_updates(pool: &PgPool, profile: Uuid, times: u32) {
    sqlx::raw_sql(&format!(
        "CREATE SEQUENCE slow_updates; \
         CREATE FUNCTION slow_update() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
             IF NEW.id = '{profile}' AND nextval('slow_updates') <= {times} THEN \
                 PERFORM pg_sleep(1); \
             END IF; \
             RETURN NEW; \
         END $$; \
         CREATE TRIGGER slow_update BEFORE UPDATE ON member_profiles \
             FOR EACH ROW EXECUTE FUNCTION slow_update();"
    ))
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeouts_are_retried_or_reported_and_never_half_applied() {
    let clock = Instant::now();
    let (server, template, pool) = template_database().await;
    let fixture = fault_fixture(server, &template, pool, 500, 200).await;
    let slow = fixture.flipped[fixture.flipped.len() / 2].0;
    let (batch_profiles, batch_flips) = fixture.batch_of(slow, 10);

    // Slow once: the batch's UPDATE is cancelled, the batch rolled back and retried.
    let (database, url, pool) = fixture.fresh_copy("slow_once").await;
    slow_updates(&pool, slow, 1).await;
    let flags = timeout_flags(&["--statement-timeout", "300ms"]);
    let done = fixture.run(&url, &flags, "slow-once").await;
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
    assert_eq!(done.events().pop().unwrap()["written"], fixture.flips);
    assert!(done.stderr.contains("retrying"), "{}", done.stderr);
    pool.close().await;
    fixture.assert_recovers(&database, &done, "slow once").await;
    eprintln!(
        "[reliability] statement timeout once: retried, {}, all {} flips written",
        done.describe(),
        fixture.flips
    );

    // Slow every time: reported after the last attempt, the rest written.
    let (database, url, pool) = fixture.fresh_copy("slow_always").await;
    slow_updates(&pool, slow, 1_000).await;
    let flags = timeout_flags(&["--statement-timeout", "300ms", "--write-attempts", "2"]);
    let done = fixture.run(&url, &flags, "slow-always").await;
    assert_reported_not_written(&done, batch_flips, "slow always");
    assert_eq!(timed_out(&done), (batch_profiles, batch_flips));
    assert_eq!(
        audit_count(&pool).await as usize,
        fixture.flips - batch_flips
    );
    sqlx::query("DROP TRIGGER slow_update ON member_profiles")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    fixture
        .assert_recovers(&database, &done, "slow always")
        .await;
    eprintln!(
        "[reliability] statement timeout every time: {}, {batch_flips} flips reported \
         not_written_timeout, {} written; re-run converged",
        done.describe(),
        fixture.flips - batch_flips
    );

    // A 1 ms statement timeout on everything: whatever fails, nothing is half-applied.
    let mut outcomes = Vec::new();
    for attempt in 0..3 {
        let (database, url, pool) = fixture.fresh_copy(&format!("one_ms_{attempt}")).await;
        let flags = timeout_flags(&["--statement-timeout", "1ms", "--write-attempts", "2"]);
        let done = fixture
            .run(&url, &flags, &format!("one-ms-{attempt}"))
            .await;
        let written = audit_count(&pool).await;
        pool.close().await;
        let error = match done.status.code() {
            Some(0) => None,
            Some(1) => Some(done.error_line()),
            _ => panic!(
                "--statement-timeout 1ms: {} {}",
                done.describe(),
                done.stderr
            ),
        };
        fixture
            .assert_recovers(&database, &done, "--statement-timeout 1ms")
            .await;
        outcomes.push((done.describe(), written, error));
    }
    eprintln!(
        "[reliability] --statement-timeout 1ms, 3 runs (exit, audit rows, error): {outcomes:?}; \
         each re-run converged; {:.1}s",
        clock.elapsed().as_secs_f64()
    );
}
