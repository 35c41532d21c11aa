//! Shared test support: one throwaway PostgreSQL per test binary (or the server named by
//! DATABASE_URL), and a fresh database with `migrations/` applied for every test.

pub mod deployment;
mod in_process;
pub mod log;
pub mod proxy;
mod tool;

pub use in_process::{backfill, revert};
pub use log::{Event, RunLog};
pub use tool::{Finished, Scratch, Tool, ToolRun, BIN, HANG};

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use agent_type_backfill::cli::{BackfillArgs, Cli, Command};
use agent_type_backfill::config::{BackfillConfig, HistoryConfig};
use agent_type_backfill::interrupt::StopSignal;
use agent_type_backfill::report;
use agent_type_backfill::support::ephemeral::EphemeralPostgres;
use agent_type_backfill::support::seed;
use agent_type_backfill::support::MIGRATOR;
use clap::Parser;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// A PostgreSQL server the tests may create databases on, by URL template.
#[derive(Clone)]
pub struct Server {
    /// URL with `{db}` where the database name goes.
    url_template: String,
}

/// pid, backend type, application name and query of a session in `pg_stat_activity`.
type Session = (i32, Option<String>, Option<String>, Option<String>);

impl Server {
    /// The server a throwaway cluster runs, as its superuser over loopback.
    pub fn of(postgres: &EphemeralPostgres) -> Server {
        Server {
            url_template: postgres.url("{db}"),
        }
    }

    pub fn url(&self, database: &str) -> String {
        self.url_template.replace("{db}", database)
    }

    pub async fn admin(&self, statement: &str) {
        let mut admin = PgConnection::connect(&self.url("postgres")).await.unwrap();
        sqlx::query(statement).execute(&mut admin).await.unwrap();
        admin.close().await.unwrap();
    }

    /// `CREATE DATABASE name TEMPLATE template`. Only the tests' own connections ever open a
    /// template, and they are closed and dropped before it is copied; but sqlx 0.8's
    /// `Pool::close` can leave a connection that was being returned at that moment open for as
    /// long as a pool handle lives. Should such a session still be there after the server's 5 s
    /// wait, it is named on stderr, terminated, and the copy tried again.
    pub async fn copy(&self, template: &str, name: &str) {
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
                        "[tests] copy of {template} failed ({error}); terminating the sessions \
                         left on it: {sessions:?}"
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

    pub async fn drop_database(&self, name: &str) {
        self.admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }

    pub async fn pool(&self, database: &str) -> PgPool {
        PgPoolOptions::new()
            .max_connections(8)
            .connect(&self.url(database))
            .await
            .unwrap()
    }
}

/// The server every test shares, with a database holding `migrations/` to copy from.
struct Shared {
    server: Server,
    template_db: String,
}

static SHARED: OnceLock<Shared> = OnceLock::new();
static OWNED: Mutex<Option<EphemeralPostgres>> = Mutex::new(None);

extern "C" fn stop_owned_server() {
    if let Ok(mut owned) = OWNED.lock() {
        drop(owned.take());
    }
}

/// One throwaway PostgreSQL for the whole test run, or the server named by `DATABASE_URL`.
fn shared() -> &'static Shared {
    SHARED.get_or_init(|| {
        // Runs on its own thread: the caller is already inside a tokio runtime.
        std::thread::spawn(|| {
            let server = match std::env::var("DATABASE_URL") {
                Ok(url) => Server {
                    url_template: replace_database(&url),
                },
                Err(_) => {
                    let postgres =
                        EphemeralPostgres::start().expect("start a throwaway PostgreSQL");
                    let server = Server::of(&postgres);
                    *OWNED.lock().unwrap() = Some(postgres);
                    // Statics are never dropped; stop the server when the test process exits.
                    unsafe { libc::atexit(stop_owned_server) };
                    server
                }
            };
            let template_db = format!("atb_template_{}", &Uuid::new_v4().simple().to_string()[..8]);
            block_on(async {
                server
                    .admin(&format!("CREATE DATABASE {template_db}"))
                    .await;
                let mut template = PgConnection::connect(&server.url(&template_db))
                    .await
                    .unwrap();
                MIGRATOR
                    .run(&mut template)
                    .await
                    .expect("apply migrations/");
                template.close().await.unwrap();
            });
            Shared {
                server,
                template_db,
            }
        })
        .join()
        .expect("test server set-up")
    })
}

/// The server every test shares.
pub fn shared_server() -> &'static Server {
    &shared().server
}

/// Drops `database` from a `Drop` impl, which runs inside a test's runtime and cannot block on
/// it: a thread with a runtime of its own does the work.
pub fn drop_database_now(server: &Server, database: &str) {
    let (server, database) = (server.clone(), database.to_owned());
    let dropped =
        std::thread::spawn(move || block_on(async move { server.drop_database(&database).await }))
            .join();
    if dropped.is_err() {
        eprintln!("[tests] could not drop a test database");
    }
}

/// Runs `future` to the end on a runtime of its own: for set-up and clean-up outside any test's
/// runtime.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

fn replace_database(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, format!("?{query}")),
        None => (url, String::new()),
    };
    let scheme_end = head.find("://").map_or(0, |at| at + 3);
    let base = match head[scheme_end..].find('/') {
        Some(slash) => &head[..scheme_end + slash],
        None => head,
    };
    format!("{base}/{{db}}{query}")
}

/// A database of its own for one test, with `migrations/` applied, dropped when the test is done
/// so a run against a shared `DATABASE_URL` server leaves nothing behind.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    server: Server,
    /// Roles the test created with [`TestDb::role`]: dropped with the database, since roles
    /// belong to the whole server and a shared `DATABASE_URL` server would keep them.
    roles: Mutex<Vec<String>>,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let shared = shared();
        let name = format!("t_{}", Uuid::new_v4().simple());
        shared.server.copy(&shared.template_db, &name).await;
        let url = shared.server.url(&name);
        let pool = shared.server.pool(&name).await;
        TestDb {
            name,
            url,
            pool,
            server: shared.server.clone(),
            roles: Mutex::new(Vec::new()),
        }
    }

    /// `CREATE ROLE prefix_<random> LOGIN`, dropped when the test's database is.
    pub async fn role(&self, prefix: &str) -> String {
        let role = deployment::role_name(prefix);
        self.roles.lock().unwrap().push(role.clone());
        sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
            .execute(&self.pool)
            .await
            .unwrap();
        role
    }

    /// The named stale, buying and junk profiles among `ordinary` consistent ones.
    pub async fn seeded(ordinary: usize) -> TestDb {
        let db = TestDb::new().await;
        seed::seed_rehearsal(&db.pool, ordinary).await.unwrap();
        db
    }

    /// Every row of the tables a run could write: compare before and after, or let the builders
    /// do it ([`Tool::writes_nothing`], [`InProcess::writes_nothing`]).
    pub async fn dump(&self) -> Dump {
        Dump::of(&self.url).await
    }

    /// A connection holding `FOR UPDATE` on the profiles with these slugs, in an open
    /// transaction, until it commits, rolls back or is closed: a member's save in progress.
    pub async fn lock_profiles(&self, slugs: &[&str]) -> PgConnection {
        let mut holder = PgConnection::connect(&self.url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
        sqlx::query("SELECT 1 FROM member_profiles WHERE slug = ANY($1) FOR UPDATE")
            .bind(slugs)
            .execute(&mut holder)
            .await
            .unwrap();
        holder
    }

    /// A member's own edit between runs: sets the `type` of one element of one profile.
    pub async fn member_sets_type(&self, slug: &str, index: usize, agent_type: &str) {
        sqlx::query(
            "UPDATE member_profiles SET agents = jsonb_set(agents, ARRAY[$2, 'type'], to_jsonb($3::text)) \
             WHERE slug = $1",
        )
        .bind(slug)
        .bind(index.to_string())
        .bind(agent_type)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    pub async fn agents_of(&self, slug: &str) -> serde_json::Value {
        let text: Option<String> =
            sqlx::query_scalar("SELECT agents::text FROM member_profiles WHERE slug = $1")
                .bind(slug)
                .fetch_one(&self.pool)
                .await
                .unwrap();
        text.map_or(serde_json::Value::Null, |text| {
            serde_json::from_str(&text).unwrap()
        })
    }

    pub async fn audit_rows(&self) -> Vec<AuditRow> {
        audit_rows(&self.pool).await
    }

    /// Holds `table` (ACCESS EXCLUSIVE, as a migration would) until the transaction ends.
    pub async fn hold_table(&self, table: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut blocker = self.pool.begin().await.unwrap();
        sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            .execute(&mut *blocker)
            .await
            .unwrap();
        blocker
    }

    /// Holds `agent_capabilities_snapshot`. The census reads only member_profiles, so this stops
    /// the plan at its server pass and nowhere else.
    pub async fn hold_the_snapshot_table(&self) -> sqlx::Transaction<'static, sqlx::Postgres> {
        self.hold_table("agent_capabilities_snapshot").await
    }

    /// Waits, up to `within`, until no session of the tool matches `condition` (SQL over
    /// `pg_stat_activity a`); returns how many still do.
    pub async fn tool_sessions_left(&self, condition: &str, within: Duration) -> i64 {
        let until = Instant::now() + within;
        let count = format!(
            "SELECT count(*) FROM pg_stat_activity a WHERE a.datname = current_database() \
             AND a.application_name LIKE 'agent-type-backfill %' AND ({condition})"
        );
        loop {
            let left: i64 = sqlx::query_scalar(&count)
                .fetch_one(&self.pool)
                .await
                .unwrap();
            if left == 0 || Instant::now() > until {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The tool's sessions still running a statement once they had 5 s to end: a cancelled
    /// statement ends well within that.
    pub async fn tool_statements_left(&self) -> i64 {
        self.tool_sessions_left("a.state = 'active'", Duration::from_secs(5))
            .await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // `WITH (FORCE)` also ends this pool's sessions and any the tool left behind.
        drop_database_now(&self.server, &self.name);
        // The database held every grant these roles had, so nothing depends on them now.
        let roles = std::mem::take(&mut *self.roles.lock().unwrap_or_else(|e| e.into_inner()));
        if !roles.is_empty() {
            let server = self.server.clone();
            let dropped = std::thread::spawn(move || {
                block_on(async move {
                    for role in roles {
                        server.admin(&format!("DROP ROLE IF EXISTS {role}")).await;
                    }
                })
            })
            .join();
            if dropped.is_err() {
                eprintln!("[tests] could not drop a test role");
            }
        }
    }
}

/// Every row of the tables a run could write (a table that does not exist says so), in a
/// stable order, as text.
#[derive(PartialEq, Eq)]
pub struct Dump(String);

/// The tables, each with the key that orders its rows.
const DUMPED: [(&str, &str); 4] = [
    ("member_profiles", "id"),
    ("agent_capabilities_snapshot", "agent_url"),
    ("type_reclassification_log", "id"),
    ("organizations", "workos_organization_id"),
];

impl Dump {
    /// The database at `url` now, over a connection of its own.
    pub async fn of(url: &str) -> Dump {
        let mut connection = PgConnection::connect(url).await.unwrap();
        let mut dump = String::new();
        for (table, order) in DUMPED {
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(table)
                .fetch_one(&mut connection)
                .await
                .unwrap();
            if !exists {
                dump.push_str(&format!("-- {table} (no such table)\n"));
                continue;
            }
            let rows: Option<String> = sqlx::query_scalar(&format!(
                "SELECT string_agg(t::text, E'\\n' ORDER BY {order}) FROM {table} t"
            ))
            .fetch_one(&mut connection)
            .await
            .unwrap();
            dump.push_str(&format!("-- {table}\n{}\n", rows.unwrap_or_default()));
        }
        connection.close().await.unwrap();
        Dump(dump)
    }

    /// Every row, as text.
    pub fn rows(&self) -> &str {
        &self.0
    }

    /// [`Dump::of`] from code that cannot await (the binary's builder): on a thread and a
    /// runtime of its own.
    pub fn now(url: &str) -> Dump {
        let url = url.to_owned();
        std::thread::spawn(move || block_on(Dump::of(&url)))
            .join()
            .expect("dump the database")
    }

    /// Fails the test unless `after` is this dump, listing the rows that went (`-`) and came
    /// (`+`), then `what` changed them.
    #[track_caller]
    pub fn assert_same(&self, after: &Dump, what: &str) {
        if self == after {
            return;
        }
        let (before, after): (Vec<&str>, Vec<&str>) =
            (self.0.lines().collect(), after.0.lines().collect());
        let mut changes = String::new();
        for line in before.iter().filter(|line| !after.contains(line)) {
            changes.push_str(&format!("- {line}\n"));
        }
        for line in after.iter().filter(|line| !before.contains(line)) {
            changes.push_str(&format!("+ {line}\n"));
        }
        panic!(
            "the run was to write nothing, and changed these rows:\n{changes}--- the run\n{what}"
        );
    }
}

/// The dump itself, so a failing `assert_eq!` of two dumps shows their rows.
impl std::fmt::Debug for Dump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Every row of `type_reclassification_log`, in the order written.
pub async fn audit_rows(pool: &PgPool) -> Vec<AuditRow> {
    sqlx::query_as::<_, AuditRow>(
        "SELECT agent_url, member_id, old_type, new_type, source, run_id, notes \
         FROM type_reclassification_log ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// One audit row, as every test reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    pub agent_url: String,
    pub member_id: Option<String>,
    pub old_type: Option<String>,
    pub new_type: String,
    pub source: String,
    pub run_id: Option<String>,
    pub notes: Option<serde_json::Value>,
}

impl AuditRow {
    /// The element the row changed, as its notes record it.
    pub fn index(&self) -> Option<i64> {
        self.notes.as_ref()?.get("index")?.as_i64()
    }

    /// The stored type before the change, exactly as its notes keep it.
    pub fn from(&self) -> Option<&serde_json::Value> {
        self.notes.as_ref()?.get("from")
    }
}

/// Backfill arguments exactly as the command line would produce them.
pub fn args(flags: &[&str]) -> BackfillArgs {
    let mut argv = vec!["agent-type-backfill"];
    argv.extend_from_slice(flags);
    Cli::try_parse_from(argv)
        .expect("valid test flags")
        .backfill
}

/// Runs the backfill `config` describes and keeps its log as the crate's own typed events, in
/// memory, before any printer renders them.
pub async fn record(
    config: &BackfillConfig,
) -> (
    anyhow::Result<agent_type_backfill::events::Summary>,
    Vec<agent_type_backfill::events::Event>,
) {
    let mut recorder = report::Recorder::default();
    let result =
        agent_type_backfill::backfill::execute(config, &mut recorder, StopSignal::never()).await;
    (result, recorder.events)
}

/// `history` with these flags (after `history`) against `url`; its log into `out`.
pub async fn history(flags: &[&str], url: &str, out: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut argv = vec!["agent-type-backfill", "history", "--database-url", url];
    argv.extend_from_slice(flags);
    let Some(Command::History(args)) = Cli::try_parse_from(argv).unwrap().command else {
        unreachable!("parsed a history command line")
    };
    let config = HistoryConfig::from_cli(&args).unwrap();
    agent_type_backfill::audit::history(&config, out).await
}

/// JSON lines as they are, for what the typed [`RunLog`] does not read (`history`'s lines) and
/// for checks of the wire's exact shape.
pub fn json_lines(output: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect()
}

/// The limits and guards that refused a run, from the error it ended with; empty when it was not
/// refused.
pub fn refusals(error: &anyhow::Error) -> Vec<agent_type_backfill::outcome::Refusal> {
    use agent_type_backfill::error::{failure, Failure};
    use agent_type_backfill::outcome::Outcome;
    match failure(error) {
        Some(Failure::Ended(ending)) => match &ending.outcome {
            Outcome::Refused(refusals) => refusals.clone(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// Waits until a session of the tool waits on a row lock: on a condition, not on the clock (the
/// bound only turns a hang into a failure). Returns the session's `application_name`.
pub async fn wait_for_blocked_tool(db: &TestDb) -> String {
    let started = std::time::Instant::now();
    loop {
        let blocked: Option<String> = sqlx::query_scalar(
            "SELECT application_name FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'agent-type-backfill %' \
               AND wait_event_type = 'Lock'",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some(application_name) = blocked {
            return application_name;
        }
        assert!(
            started.elapsed() < tool::HANG,
            "the tool never blocked on the held row lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
