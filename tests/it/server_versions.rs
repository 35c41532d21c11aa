//! What the tool relies on from the server and what could change between PostgreSQL versions:
//! `pg_cancel_backend` from an ordinary user, plus a check
//! that the tests ran on the server `scripts/pg-matrix` names. The script runs the whole crate on
//! every supported version, so privileges.rs (privilege functions, `pg_control_system()`),
//! backfill.rs and pooler.rs (`jit`) and cli.rs (cancelling an interrupted plan) are checked on
//! each as well, and chunked.rs the plan shape of the planning chunks.

use crate::common;
use crate::common::deployment::as_user;

use std::time::Duration;

use agent_type_backfill::db;
use agent_type_backfill::support::ephemeral::server_bin_dir;
use common::TestDb;
use sqlx::{Connection, PgConnection};

/// A login role with no privileges, and the test database's URL for it.
async fn plain_role(db: &TestDb) -> String {
    let role = db.role("atb_plain").await;
    as_user(&db.url, &role)
}

/// scripts/pg-matrix labels its results with the version the binaries report; this checks that
/// the tests really ran on a server started from them.
#[tokio::test]
async fn the_throwaway_server_runs_the_binaries_of_pg_bin() {
    if std::env::var_os("DATABASE_URL").is_some() {
        eprintln!("DATABASE_URL names the server: no throwaway server to check");
        return;
    }
    let db = TestDb::new().await;
    let bin = server_bin_dir().unwrap();
    let output = std::process::Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .unwrap();
    // "postgres (PostgreSQL) 16.14", with " (Debian 15.18-0+deb12u1)" after it on Debian.
    let reported = String::from_utf8(output.stdout).unwrap();
    let binaries = reported.split_whitespace().nth(2).unwrap().to_owned();
    let running: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        running.split_whitespace().next(),
        Some(binaries.as_str()),
        "{bin:?} reports {reported:?}"
    );
}

/// An interrupted plan cancels its own statement from a second session of the same user, which
/// needs no superuser on any version.
#[tokio::test]
async fn an_ordinary_user_cancels_its_own_statement_with_pg_cancel_backend() {
    let db = TestDb::new().await;
    let url = plain_role(&db).await;
    let mut busy = PgConnection::connect(&url).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut busy)
        .await
        .unwrap();
    let sleeping = tokio::spawn(async move {
        let outcome = sqlx::query("SELECT pg_sleep(60)").execute(&mut busy).await;
        outcome.map(|_| ())
    });

    // The canceller is the tool's own kind of session, as an interrupted run uses it.
    let settings = db::SessionSettings {
        application_name: "agent-type-backfill atb-cancel".to_owned(),
        lock_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(30),
    };
    let canceller = db::connect(&url, &settings).await.unwrap().pool;
    let mut watcher = PgConnection::connect(&url).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let active: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT FROM pg_stat_activity \
             WHERE pid = $1 AND state = 'active' AND query LIKE 'SELECT pg_sleep%')",
        )
        .bind(pid)
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if active {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sleep never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(db::cancel_backend(&canceller, pid).await.unwrap());

    let outcome = tokio::time::timeout(Duration::from_secs(20), sleeping)
        .await
        .expect("the cancelled statement ended")
        .unwrap();
    let error = outcome.expect_err("the sleep was cancelled");
    let code = error
        .as_database_error()
        .and_then(|error| error.code())
        .map(|code| code.into_owned());
    assert_eq!(code.as_deref(), Some("57014"), "{error}");
}
