//! What the tool relies on from the server and what could change between PostgreSQL versions:
//! the server pass in parallel workers, `pg_control_system()`, the privilege functions of the
//! preflight and `pg_cancel_backend`, each as an ordinary (non-superuser) user where it matters.
//! `scripts/pg-matrix` runs these, with the rest of the integration tests, on every supported
//! version; JIT is pinned by `session_settings_are_added_to_the_options_in_the_url` in
//! backfill.rs and the cancel of an interrupted plan end to end in cli.rs.

use crate::common;

use std::time::Duration;

use agent_type_backfill::db;
use agent_type_backfill::ephemeral::server_bin_dir;
use agent_type_backfill::error::exit_code;
use agent_type_backfill::resolver::{SELF_DECLARED_TYPE, UNKNOWN_TYPE, VALID_AGENT_TYPES};
use common::{args, execute, TestDb};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// A login role of its own with no privileges yet, and the test database's URL for it.
async fn plain_role(db: &TestDb) -> (String, String) {
    let suffix = &Uuid::new_v4().simple().to_string()[..12];
    let role = format!("atb_plain_{suffix}");
    let password = Uuid::new_v4().simple().to_string();
    sqlx::query(&format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        .execute(&db.pool)
        .await
        .unwrap();
    let (scheme, rest) = db.url.split_once("://").expect("a URL with a scheme");
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let host_and_rest = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    let url = format!("{scheme}://{role}:{password}@{host_and_rest}");
    (role, url)
}

async fn grant(db: &TestDb, statements: &[String]) {
    for statement in statements {
        sqlx::query(statement).execute(&db.pool).await.unwrap();
    }
}

async fn pool_for(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .unwrap()
}

async fn run(url: &str, flags: &[&str]) -> anyhow::Result<agent_type_backfill::events::Summary> {
    let mut out = Vec::new();
    execute(&args(flags), url, &mut out).await
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

/// The server pass is written so the planner may run it in parallel workers (see
/// `db::FLIP_CANDIDATES`); every function in it must be parallel safe on every version, and the
/// workers' answer must be the serial one.
#[tokio::test]
async fn the_server_pass_runs_in_parallel_workers_and_finds_what_a_serial_pass_finds() {
    let db = TestDb::seeded(3000).await;
    let mut connection = db.pool.acquire().await.unwrap();

    let mut serial = connection.begin().await.unwrap();
    sqlx::query("SET LOCAL max_parallel_workers_per_gather = 0")
        .execute(&mut *serial)
        .await
        .unwrap();
    let expected = db::flip_candidates(&mut serial).await.unwrap();
    serial.rollback().await.unwrap();
    assert_eq!(expected.profile_ids.len(), 2, "the seeded stale profiles");

    let mut parallel = connection.begin().await.unwrap();
    // Costs at zero make a parallel plan the cheapest even on this small table.
    for setting in [
        "max_parallel_workers_per_gather = 2",
        "parallel_setup_cost = 0",
        "parallel_tuple_cost = 0",
        "min_parallel_table_scan_size = 0",
    ] {
        sqlx::query(&format!("SET LOCAL {setting}"))
            .execute(&mut *parallel)
            .await
            .unwrap();
    }
    let plan: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, COSTS OFF) {}",
        db::FLIP_CANDIDATES
    ))
    .bind(&VALID_AGENT_TYPES[..])
    .bind(SELF_DECLARED_TYPE)
    .bind(UNKNOWN_TYPE)
    .fetch_all(&mut *parallel)
    .await
    .unwrap();
    let launched: u32 = plan
        .iter()
        .filter_map(|line| line.trim().strip_prefix("Workers Launched: "))
        .map(|count| count.parse::<u32>().unwrap())
        .sum();
    assert!(
        launched > 0,
        "no parallel worker ran the server pass:\n{}",
        plan.join("\n")
    );
    let found = db::flip_candidates(&mut parallel).await.unwrap();
    parallel.rollback().await.unwrap();
    assert_eq!(found, expected);
}

/// The plan file's fingerprint: `pg_control_system()` is open to every user by default, and a
/// DBA may revoke it, which must leave the identifier out instead of failing the run.
#[tokio::test]
async fn the_cluster_identifier_comes_from_pg_control_system_unless_it_is_revoked() {
    let db = TestDb::new().await;
    let (_, url) = plain_role(&db).await;
    let as_superuser = db::system_identifier(&db.pool)
        .await
        .expect("readable as superuser");
    assert!(
        as_superuser.parse::<u64>().is_ok(),
        "not a number: {as_superuser:?}"
    );

    let plain = pool_for(&url).await;
    assert_eq!(
        db::system_identifier(&plain).await.as_ref(),
        Some(&as_superuser)
    );
    plain.close().await;

    grant(
        &db,
        &["REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC".to_owned()],
    )
    .await;
    let plain = pool_for(&url).await;
    assert_eq!(db::system_identifier(&plain).await, None);
    assert_eq!(
        db::system_identifier(&db.pool).await.as_ref(),
        Some(&as_superuser)
    );
}

/// The preflight asks `has_table_privilege` for what each mode needs; an ordinary user with read
/// access may dry-run, and may apply only once it may also update and insert audit rows.
#[tokio::test]
async fn the_preflight_sees_the_privileges_of_an_ordinary_user() {
    let db = TestDb::seeded(5).await;
    let (role, url) = plain_role(&db).await;
    grant(&db, &[format!("GRANT SELECT ON member_profiles TO {role}")]).await;

    let error = run(&url, &["--dry-run"]).await.unwrap_err();
    assert_eq!(exit_code(&error), 4);
    assert!(
        format!("{error:#}").contains("this user lacks SELECT on 'agent_capabilities_snapshot'"),
        "{error:#}"
    );

    grant(
        &db,
        &[format!(
            "GRANT SELECT ON agent_capabilities_snapshot TO {role}"
        )],
    )
    .await;
    assert_eq!(run(&url, &["--dry-run"]).await.unwrap().flips, 2);

    let before = db.dump().await;
    let error = run(&url, &["--apply"]).await.unwrap_err();
    assert_eq!(exit_code(&error), 4, "{error:#}");
    let message = format!("{error:#}");
    assert!(
        message.contains("this user lacks UPDATE on 'member_profiles'")
            && message.contains("this user lacks INSERT on 'type_reclassification_log'"),
        "{message}"
    );
    assert_eq!(db.dump().await, before, "a failed preflight writes nothing");

    // Regression: INSERT alone passed the preflight, and the first audit insert then failed on
    // the `serial` id's sequence after the batch's update.
    grant(
        &db,
        &[
            format!("GRANT UPDATE ON member_profiles TO {role}"),
            format!("GRANT INSERT ON type_reclassification_log TO {role}"),
        ],
    )
    .await;
    let error = run(&url, &["--apply"]).await.unwrap_err();
    assert_eq!(exit_code(&error), 4);
    assert!(
        format!("{error:#}")
            .contains("this user lacks USAGE on sequence 'type_reclassification_log_id_seq'"),
        "{error:#}"
    );
    assert_eq!(db.dump().await, before);

    grant(
        &db,
        &[format!(
            "GRANT USAGE ON SEQUENCE type_reclassification_log_id_seq TO {role}"
        )],
    )
    .await;
    let summary = run(&url, &["--apply"]).await.unwrap();
    assert_eq!((summary.flips, summary.written), (2, 2));
    assert_eq!(db.audit_rows().await.len(), 2);
}

/// An interrupted plan cancels its own statement from a second session of the same user, which
/// needs no superuser on any version.
#[tokio::test]
async fn an_ordinary_user_cancels_its_own_statement_with_pg_cancel_backend() {
    let db = TestDb::new().await;
    let (_, url) = plain_role(&db).await;
    let mut busy = PgConnection::connect(&url).await.unwrap();
    let pid = db::backend_pid(&mut busy).await.unwrap();
    let sleeping = tokio::spawn(async move {
        let outcome = sqlx::query("SELECT pg_sleep(60)").execute(&mut busy).await;
        outcome.map(|_| ())
    });

    let canceller = pool_for(&url).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let active: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT FROM pg_stat_activity \
             WHERE pid = $1 AND state = 'active' AND query LIKE 'SELECT pg_sleep%')",
        )
        .bind(pid)
        .fetch_one(&canceller)
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
