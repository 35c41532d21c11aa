//! Every command through Debian's PgBouncer with its default settings, in session and transaction
//! pool mode, with the tool's timeouts proven in force on the server sessions the pooler hands
//! out.

use std::time::Duration;

use agent_type_backfill::domain::count;

use crate::common::deployment::{host_port, tool, via, PgBouncer, PoolMode};
use crate::common::{json_lines, wait_for_blocked_tool, Scratch, TestDb, Tool};
use sqlx::{Connection, PgConnection};

const MODES: [PoolMode; 2] = [PoolMode::Session, PoolMode::Transaction];

fn bouncer_for(db: &TestDb, mode: PoolMode) -> (PgBouncer, String) {
    let (host, port) = host_port(&db.url);
    let bouncer = PgBouncer::start(&host, port, mode, &["postgres"]);
    let url = via(&db.url, "127.0.0.1", bouncer.port);
    (bouncer, url)
}

async fn agents(db: &TestDb) -> Vec<(String, Option<String>)> {
    sqlx::query_as("SELECT slug::text, agents::text FROM member_profiles ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn every_command_works_through_pgbouncer_in_session_and_transaction_mode() {
    for mode in MODES {
        let db = TestDb::seeded(40).await;
        let original = agents(&db).await;
        let direct = tool(&db.url, &["--dry-run", "--format", "json"], &[]);
        direct.exits(0);
        let expected = direct.log().flips();
        assert!(!expected.is_empty(), "the seed has flips");

        let (_bouncer, url) = bouncer_for(&db, mode);
        let scratch = Scratch::new();
        let plan = scratch.join("plan.json");
        let plan = plan.to_str().unwrap();
        let dry = tool(
            &url,
            &["--dry-run", "--format", "json", "--plan-out", plan],
            &[],
        );
        assert_eq!(dry.code(), 0, "{mode:?}: {}", dry.stderr);
        assert_eq!(dry.log().flips(), expected, "{mode:?}");

        let max = expected.len().to_string();
        let apply = tool(
            &url,
            &[
                "--apply",
                "--format",
                "json",
                "--plan",
                plan,
                "--max-flips",
                &max,
            ],
            &[],
        );
        assert_eq!(apply.code(), 0, "{mode:?}: {}", apply.stderr);
        let summary = apply.log().summary();
        assert_eq!(summary.written, count(expected.len()), "{mode:?}");
        let run_id = apply.log().run_id();
        assert_eq!(db.audit_rows().await.len(), expected.len());

        let again = tool(&url, &["--dry-run", "--format", "json"], &[]);
        assert_eq!(again.code(), 0, "{mode:?}: {}", again.stderr);
        assert_eq!(again.log().summary().flips, 0);

        let history = tool(&url, &["history", "--format", "json"], &[]);
        assert_eq!(history.code(), 0, "{mode:?}: {}", history.stderr);
        let runs = json_lines(history.stdout.as_bytes());
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0]["run_id"], run_id.as_str());
        let rows = tool(&url, &["history", &run_id, "--format", "json"], &[]);
        assert_eq!(rows.code(), 0, "{mode:?}: {}", rows.stderr);
        assert_eq!(json_lines(rows.stdout.as_bytes()).len(), expected.len());

        let revert_dry = tool(
            &url,
            &["revert", &run_id, "--dry-run", "--format", "json"],
            &[],
        );
        assert_eq!(revert_dry.code(), 0, "{mode:?}: {}", revert_dry.stderr);
        assert_eq!(revert_dry.log().flips().len(), expected.len());
        let revert = tool(
            &url,
            &[
                "revert",
                &run_id,
                "--apply",
                "--max-flips",
                &max,
                "--format",
                "json",
            ],
            &[],
        );
        assert_eq!(revert.code(), 0, "{mode:?}: {}", revert.stderr);
        assert_eq!(revert.log().summary().written, count(expected.len()));
        assert_eq!(
            agents(&db).await,
            original,
            "{mode:?}: the revert restored every type"
        );
    }
}

/// A member's save holds the row lock of a profile with a planned flip. Through the pooler the
/// apply gives up on it after --lock-timeout instead of waiting it out (before the fix the
/// timeout travelled in startup `options`, which PgBouncer drops, and the apply waited).
#[tokio::test]
async fn a_locked_row_is_given_up_after_lock_timeout_through_pgbouncer() {
    for mode in MODES {
        let db = TestDb::seeded(40).await;
        let (_bouncer, url) = bouncer_for(&db, mode);
        let mut member = PgConnection::connect(&db.url).await.unwrap();
        let mut save = member.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM member_profiles WHERE slug = 'bidcliq' FOR UPDATE")
            .execute(&mut *save)
            .await
            .unwrap();
        // Spawned and finished with the runner's hang limit: a run that waited on the lock would
        // wait for as long as this test holds it.
        let apply = Tool::new(&[
            "--apply",
            "--format",
            "json",
            "--max-flips",
            "100",
            "--lock-timeout",
            "300ms",
            "--write-attempts",
            "2",
        ])
        .database(&url)
        .spawn()
        .finish()
        .await;
        assert_eq!(apply.code(), 1, "{mode:?}: {}", apply.stderr);
        let skipped = apply.log().skipped();
        assert!(!skipped.is_empty(), "{mode:?}: {}", apply.stdout);
        assert!(
            skipped
                .iter()
                .all(|skipped| skipped.reason == "not_written_timeout"),
            "{mode:?}: {}",
            apply.stdout
        );
        assert!(
            apply.stderr.contains("lock timeout"),
            "{mode:?}: {}",
            apply.stderr
        );
        // Two attempts of 300 ms and one pause of 200 ms; a wait on the lock would last until
        // the member's transaction ends, which it does only after the run.
        assert!(
            apply.elapsed < Duration::from_secs(20),
            "{mode:?}: {:?}",
            apply.elapsed
        );
        save.rollback().await.unwrap();
        assert!(
            db.audit_rows().await.is_empty(),
            "one batch, rolled back whole"
        );
    }
}

/// A DDL lock on the snapshots stalls the planning pass; --statement-timeout, set per
/// transaction through the pooler, cuts it.
#[tokio::test]
async fn statement_timeout_cuts_the_planning_pass_through_pgbouncer() {
    for mode in MODES {
        let db = TestDb::seeded(10).await;
        let (_bouncer, url) = bouncer_for(&db, mode);
        let migration = db.hold_the_snapshot_table().await;
        let dry = Tool::new(&[
            "--dry-run",
            "--statement-timeout",
            "400ms",
            "--lock-timeout",
            "60s",
        ])
        .database(&url)
        .spawn()
        .finish()
        .await;
        migration.rollback().await.unwrap();
        assert_eq!(dry.code(), 1, "{mode:?}: {}", dry.stderr);
        assert!(
            dry.stderr.contains("ran past --statement-timeout '400ms'"),
            "{mode:?}: {}",
            dry.stderr
        );
        assert!(dry.elapsed < Duration::from_secs(20), "{:?}", dry.elapsed);
    }
}

/// Ctrl-C while planning cancels the planning statement through the pooler: the cancel runs on
/// another server session and `pg_cancel_backend` reaches the planning one. A backend blocked on a
/// lock does not notice that PgBouncer closed its connection, so without the cancel it would wait.
#[tokio::test]
async fn sigint_while_planning_cancels_the_statement_through_pgbouncer() {
    for mode in MODES {
        let db = TestDb::seeded(10).await;
        let (_bouncer, url) = bouncer_for(&db, mode);
        let blocker = db.hold_the_snapshot_table().await;
        let run = Tool::new(&[
            "--dry-run",
            "--lock-timeout",
            "60s",
            "--statement-timeout",
            "60s",
        ])
        .database(&url)
        .spawn();
        // The dry-run reached its server pass.
        wait_for_blocked_tool(&db).await;
        run.signal(libc::SIGINT);
        let done = run.finish().await;
        assert_eq!(
            done.code(),
            130,
            "{mode:?}: {}\n{}",
            done.stdout,
            done.stderr
        );
        assert!(
            done.stderr
                .contains("cancelled the planning statement on the server"),
            "{mode:?}: {}",
            done.stderr
        );
        let still_active = db.tool_statements_left().await;
        blocker.rollback().await.unwrap();
        assert_eq!(
            still_active, 0,
            "{mode:?}: the planning statement outlived the tool"
        );
    }
}

/// Inside every transaction the tool opens through the pooler, its settings and name are the
/// server session's, whichever server session the pooler picked.
#[tokio::test]
async fn every_transaction_through_pgbouncer_carries_the_tool_settings() {
    use agent_type_backfill::db;
    for mode in MODES {
        let test_db = TestDb::new().await;
        let (_bouncer, url) = bouncer_for(&test_db, mode);
        let settings = db::SessionSettings {
            application_name: "agent-type-backfill atb-pooled".to_owned(),
            lock_timeout: Duration::from_millis(1234),
            statement_timeout: Duration::from_secs(42),
        };
        let session = db::connect(&url, &settings).await.unwrap();
        for read_only in [false, true, false, true] {
            let mut transaction = if read_only {
                db::begin_read_only(&session.pool).await.unwrap()
            } else {
                session.pool.begin().await.unwrap()
            };
            let settings: (String, String, String, String) = sqlx::query_as(
                "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), \
                        current_setting('jit'), current_setting('application_name')",
            )
            // Unnamed, as the tool's own: each pooled connection numbers its named statements
            // from sqlx_s_1, and under transaction pooling they meet on one server session
            // ("prepared statement \"sqlx_s_1\" already exists").
            .persistent(false)
            .fetch_one(&mut transaction)
            .await
            .unwrap();
            assert_eq!(
                settings,
                (
                    "1234ms".to_owned(),
                    "42s".to_owned(),
                    "off".to_owned(),
                    "agent-type-backfill atb-pooled".to_owned()
                ),
                "{mode:?}"
            );
        }
        session.pool.close().await;
    }
}
