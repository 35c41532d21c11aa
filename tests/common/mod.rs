//! Shared test support: one throwaway PostgreSQL per test binary (or the server named by
//! DATABASE_URL), and a fresh database with `migrations/` applied for every test.
#![allow(dead_code)]

use std::sync::{Mutex, OnceLock};

use agent_type_backfill::cli::{BackfillArgs, Cli};
use agent_type_backfill::ephemeral::EphemeralPostgres;
use agent_type_backfill::rehearse::MIGRATOR;
use agent_type_backfill::seed;
use clap::Parser;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

struct Server {
    /// URL template with `{db}` where the database name goes.
    url_template: String,
    template_db: String,
}

impl Server {
    fn url(&self, database: &str) -> String {
        self.url_template.replace("{db}", database)
    }
}

static SERVER: OnceLock<Server> = OnceLock::new();
static OWNED: Mutex<Option<EphemeralPostgres>> = Mutex::new(None);

extern "C" fn stop_owned_server() {
    if let Ok(mut owned) = OWNED.lock() {
        drop(owned.take());
    }
}

fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        // Runs on its own thread: the caller is already inside a tokio runtime.
        std::thread::spawn(|| {
            let url_template = match std::env::var("DATABASE_URL") {
                Ok(url) => replace_database(&url),
                Err(_) => {
                    let postgres =
                        EphemeralPostgres::start().expect("start a throwaway PostgreSQL");
                    let template = postgres.url("{db}");
                    *OWNED.lock().unwrap() = Some(postgres);
                    // Statics are never dropped; stop the server when the test process exits.
                    unsafe { libc::atexit(stop_owned_server) };
                    template
                }
            };
            let template_db = format!("atb_template_{}", &Uuid::new_v4().simple().to_string()[..8]);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&url_template.replace("{db}", "postgres"))
                    .await
                    .expect("connect to the test server");
                sqlx::query(&format!("CREATE DATABASE {template_db}"))
                    .execute(&mut admin)
                    .await
                    .expect("create template database");
                admin.close().await.unwrap();
                let mut template =
                    PgConnection::connect(&url_template.replace("{db}", &template_db))
                        .await
                        .unwrap();
                MIGRATOR
                    .run(&mut template)
                    .await
                    .expect("apply migrations/");
                template.close().await.unwrap();
            });
            Server {
                url_template,
                template_db,
            }
        })
        .join()
        .expect("test server set-up")
    })
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

/// A database of its own for one test, with `migrations/` applied.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let server = server();
        let name = format!("t_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&server.url("postgres"))
            .await
            .unwrap();
        sqlx::query(&format!(
            "CREATE DATABASE {name} TEMPLATE {}",
            server.template_db
        ))
        .execute(&mut admin)
        .await
        .expect("create the test database");
        admin.close().await.unwrap();
        let url = server.url(&name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .unwrap();
        TestDb { name, url, pool }
    }

    /// The named stale, buying and junk profiles among `ordinary` consistent ones.
    pub async fn seeded(ordinary: usize) -> TestDb {
        let db = TestDb::new().await;
        seed::seed_rehearsal(&db.pool, ordinary).await.unwrap();
        db
    }

    /// Every row of the tables, in a stable order, as text: compare before and after.
    pub async fn dump(&self) -> String {
        self.dump_tables(&[
            ("member_profiles", "id"),
            ("agent_capabilities_snapshot", "agent_url"),
            ("type_reclassification_log", "id"),
            ("organizations", "workos_organization_id"),
        ])
        .await
    }

    /// [`TestDb::dump`] for a database whose audit table was dropped.
    pub async fn dump_without_audit(&self) -> String {
        self.dump_tables(&[
            ("member_profiles", "id"),
            ("agent_capabilities_snapshot", "agent_url"),
            ("organizations", "workos_organization_id"),
        ])
        .await
    }

    async fn dump_tables(&self, tables: &[(&str, &str)]) -> String {
        let mut dump = String::new();
        for (table, order) in tables {
            let rows: Option<String> = sqlx::query_scalar(&format!(
                "SELECT string_agg(t::text, E'\\n' ORDER BY {order}) FROM {table} t"
            ))
            .fetch_one(&self.pool)
            .await
            .unwrap();
            dump.push_str(&format!("-- {table}\n{}\n", rows.unwrap_or_default()));
        }
        dump
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
        sqlx::query_as::<_, AuditRow>(
            "SELECT agent_url, member_id, old_type, new_type, source, run_id, notes \
             FROM type_reclassification_log ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }
}

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

/// Backfill arguments exactly as the command line would produce them.
pub fn args(flags: &[&str]) -> BackfillArgs {
    let mut argv = vec!["agent-type-backfill"];
    argv.extend_from_slice(flags);
    Cli::try_parse_from(argv)
        .expect("valid test flags")
        .backfill
}

/// Parses a `--format json` run log into its events.
pub fn events(output: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect()
}

/// `revert` with these arguments (`--format json` added) against `url`: its result and events.
pub async fn revert(
    url: &str,
    flags: &[&str],
) -> (
    anyhow::Result<agent_type_backfill::report::Summary>,
    Vec<serde_json::Value>,
) {
    let mut argv = vec!["agent-type-backfill", "revert"];
    argv.extend_from_slice(flags);
    argv.extend_from_slice(&["--format", "json"]);
    let Some(agent_type_backfill::cli::Command::Revert(revert_args)) =
        Cli::try_parse_from(argv).unwrap().command
    else {
        unreachable!("parsed a revert command line")
    };
    let mut out = Vec::new();
    let never = agent_type_backfill::interrupt::StopSignal::never();
    let result = agent_type_backfill::audit::revert(&revert_args, url, &mut out, never).await;
    (result, events(&out))
}

/// A scratch file or directory, removed however the test ends.
pub struct RemovedOnDrop(pub std::path::PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        if std::fs::remove_file(&self.0).is_err() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
