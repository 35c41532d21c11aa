//! Read-only targets: a real streaming standby of a throwaway primary, made with
//! `pg_basebackup -R` (or, where the server build has none, from a copy of the cleanly stopped
//! primary), and a role whose transactions are read-only by default. Writes stop at preflight;
//! a plan made on the standby applies on its primary.

use crate::common::deployment::{as_user, database_on, registry_on, tool};
use crate::common::{log, Finished, Scratch, TestDb, Tool, HANG};
use agent_type_backfill::domain::count;
use agent_type_backfill::support::ephemeral::EphemeralPostgres;
use serde_json::Value;
use sqlx::Connection;
use std::time::Duration;

#[tokio::test]
async fn a_standby_refuses_writes_at_preflight_and_its_plan_applies_on_the_primary() {
    let mut primary = EphemeralPostgres::start().unwrap();
    let pool = registry_on(&primary, 30).await;
    let standby = EphemeralPostgres::start_standby_of(&mut primary).unwrap();
    let on_standby = standby.url("registry");
    let on_primary = primary.url("registry");

    for apply in [
        vec!["--apply", "--max-flips", "100"],
        vec!["revert", "atb-20260101T000000Z-00000000", "--apply"],
    ] {
        let done = tool(&on_standby, &apply, &[]);
        assert_eq!(done.code(), 4, "{apply:?}: {}", done.stderr);
        assert!(
            done.stderr.contains("this server is a read-only standby")
                && done.stderr.contains("apply on the primary"),
            "{apply:?}: {}",
            done.stderr
        );
        assert_eq!(
            done.stderr.matches("read-only").count(),
            1,
            "the cause once: {}",
            done.stderr
        );
        assert!(done.stdout.is_empty(), "nothing planned: {}", done.stdout);
    }

    let scratch = Scratch::new();
    let plan_path = scratch.join("replica-plan.json");
    let plan_arg = plan_path.to_str().unwrap();
    let dry = tool(
        &on_standby,
        &["--dry-run", "--format", "json", "--plan-out", plan_arg],
        &[],
    );
    dry.exits(0);
    let plan: Value = serde_json::from_str(&std::fs::read_to_string(&plan_path).unwrap()).unwrap();
    assert_eq!(plan["target"]["standby"], true);
    assert_eq!(plan["target"]["port"], standby.port());
    let primary_id: String =
        sqlx::query_scalar("SELECT system_identifier::text FROM pg_control_system()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(plan["target"]["system_identifier"], primary_id.as_str());
    let planned = plan["flips"].as_array().unwrap().len();
    assert!(planned > 0, "the seed has flips");

    let apply = tool(
        &on_primary,
        &[
            "--apply",
            "--format",
            "json",
            "--plan",
            plan_arg,
            "--max-flips",
            &planned.to_string(),
        ],
        &[],
    );
    apply.exits(0);
    assert_eq!(apply.log().summary().written, count(planned));
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM type_reclassification_log")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(audited, i64::try_from(planned).unwrap());

    // Another cluster with a database of the same name is not the standby's primary.
    let stranger = EphemeralPostgres::start().unwrap();
    registry_on(&stranger, 0).await;
    let refused = tool(
        &stranger.url("registry"),
        &["--apply", "--plan", plan_arg],
        &[],
    );
    refused.exits(2);
    refused.stderr_has("(a standby)");
    pool.close().await;
}

#[tokio::test]
async fn a_role_whose_transactions_are_read_only_stops_at_preflight() {
    let db = TestDb::seeded(10).await;
    let role = db.role("atb_ro").await;
    for statement in [
        format!("GRANT SELECT, UPDATE ON member_profiles TO {role}"),
        format!("GRANT SELECT ON agent_capabilities_snapshot TO {role}"),
        format!("GRANT SELECT, INSERT ON type_reclassification_log TO {role}"),
        format!("GRANT USAGE ON SEQUENCE type_reclassification_log_id_seq TO {role}"),
        format!("ALTER ROLE {role} SET default_transaction_read_only = on"),
    ] {
        sqlx::query(&statement).execute(&db.pool).await.unwrap();
    }
    let url = as_user(&db.url, &role);
    let done = Tool::new(&["--apply", "--max-flips", "100"])
        .database(&url)
        .writes_nothing(&db)
        .status(4)
        .run();
    done.stderr_has("this session is read-only")
        .stderr_has("default_transaction_read_only");
    assert!(
        !done.stderr.contains("point DATABASE_URL"),
        "{}",
        done.stderr
    );
    assert!(done.stdout.is_empty(), "{}", done.stdout);

    // Reading is what such a role is for.
    let dry = tool(&url, &["--dry-run"], &[]);
    dry.exits(0);
}

/// RUNBOOK step 1 plans on a hot standby. There, replaying the primary's vacuum cancels any
/// query that holds it up longer than `max_standby_streaming_delay`: a plan in one long snapshot
/// is what gets cancelled. In chunks, each with a snapshot of its own and retried when cancelled,
/// the dry-run completes with the primary's flips while the primary keeps updating and vacuuming
/// member_profiles under a delay of 50 ms.
#[tokio::test]
async fn a_dry_run_on_a_standby_completes_while_the_primary_updates_and_vacuums() {
    let mut primary = EphemeralPostgres::start_with(&[
        ("max_standby_streaming_delay", "50ms"),
        ("hot_standby_feedback", "off"),
    ])
    .unwrap();
    let pool = registry_on(&primary, 3000).await;
    let standby = EphemeralPostgres::start_standby_of(&mut primary).unwrap();
    let on_standby = standby.url("registry");
    let on_primary = primary.url("registry");
    let args = [
        "--dry-run",
        "--format",
        "json",
        "--chunk-size",
        "100",
        "--max-flips",
        "100",
    ];
    let expected = tool(&on_primary, &args, &[]);
    expected.exits(0);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rounds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                // display_name only: the flips stay what they were; the dead rows are the point.
                sqlx::query(
                    "UPDATE member_profiles SET display_name = display_name \
                     WHERE id IN (SELECT id FROM member_profiles ORDER BY random() LIMIT 300)",
                )
                .execute(&pool)
                .await
                .unwrap();
                sqlx::query("VACUUM member_profiles")
                    .execute(&pool)
                    .await
                    .unwrap();
                rounds += 1;
            }
            rounds
        })
    };
    let url = on_standby.clone();
    let planned = tokio::task::spawn_blocking(move || tool(&url, &args, &[]))
        .await
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = churn.await.unwrap();
    assert!(rounds > 0, "the primary never churned");

    planned.exits(0);
    // The same flips and counts; only the time taken may differ.
    let plan = |done: &Finished| -> (Vec<log::Flip>, log::Summary) {
        let flips = done.log().flips().into_iter().cloned().collect();
        let summary = log::Summary {
            duration_ms: 0,
            ..done.log().summary().clone()
        };
        (flips, summary)
    };
    assert_eq!(plan(&planned), plan(&expected));
    // Replay of the primary's last vacuum may still cancel this query (or end its session) as it
    // cancels the tool's: read the figure again on a new connection, as the tool would retry.
    let mut conflicts = None;
    for _ in 0..50 {
        let read = async {
            let mut standby_db = sqlx::PgConnection::connect(&on_standby).await?;
            sqlx::query_scalar::<_, i64>(
                "SELECT confl_snapshot + confl_lock + confl_bufferpin + confl_deadlock \
                 FROM pg_stat_database_conflicts WHERE datname = 'registry'",
            )
            .fetch_one(&mut standby_db)
            .await
        };
        match read.await {
            Ok(count) => {
                conflicts = Some(count);
                break;
            }
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("40001") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("could not read the standby's conflicts: {error}"),
        }
    }
    let conflicts = conflicts.expect("replay cancelled 50 reads of the standby's conflicts");
    eprintln!(
        "[standby] {rounds} update+vacuum rounds on the primary; {conflicts} recovery conflicts \
         cancelled queries on the standby; {} chunk retries",
        planned.stderr.matches("retrying in a new snapshot").count()
    );
    pool.close().await;
}

/// A chunk the standby keeps cancelling for a conflict with recovery fails the run, after the
/// retries, with what to change on the standby. Deterministic: the primary holds an exclusive lock
/// on the crawler's log, which replay takes on the standby, so the chunk that found the flips
/// waits there to read their evidence while it holds its lock on member_profiles; each time, the
/// primary then locks member_profiles too, and replay cancels the chunk after
/// `max_standby_streaming_delay`.
#[tokio::test]
async fn a_chunk_a_standby_keeps_cancelling_fails_the_run_saying_what_to_change_there() {
    let mut primary =
        EphemeralPostgres::start_with(&[("max_standby_streaming_delay", "100ms")]).unwrap();
    let pool = registry_on(&primary, 30).await;
    let standby = EphemeralPostgres::start_standby_of(&mut primary).unwrap();
    let mut on_standby = sqlx::PgConnection::connect(&standby.url("registry"))
        .await
        .unwrap();
    let mut log_lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE type_reclassification_log IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *log_lock)
        .await
        .unwrap();
    // The lock's WAL record is flushed, and so sent to the standby, with the next segment switch
    // (or commit); then wait until replay holds it there.
    sqlx::query("SELECT pg_switch_wal()")
        .execute(&pool)
        .await
        .unwrap();
    let mut replayed = false;
    for _ in 0..400 {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' \
             AND relation = 'type_reclassification_log'::regclass",
        )
        .fetch_one(&mut on_standby)
        .await
        .unwrap();
        if held > 0 {
            replayed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(replayed, "the standby never replayed the lock");

    let mut run =
        crate::common::Tool::new(&["--dry-run", "--plan-jobs", "1", "--lock-timeout", "60s"])
            .database(&standby.url("registry"))
            .spawn();
    let mut cancelled = 0;
    for _ in 0..2400 {
        if !run.running() {
            break;
        }
        let waiting: Option<(i32, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
            "SELECT pid, query_start FROM pg_stat_activity \
             WHERE application_name LIKE 'agent-type-backfill %' AND wait_event_type = 'Lock'",
        )
        .fetch_optional(&mut on_standby)
        .await
        .unwrap();
        if let Some(seen) = waiting {
            let mut lock = pool.begin().await.unwrap();
            sqlx::query("LOCK TABLE member_profiles IN ACCESS EXCLUSIVE MODE")
                .execute(&mut *lock)
                .await
                .unwrap();
            lock.commit().await.unwrap();
            // Until replay has cancelled that statement.
            for _ in 0..400 {
                let still: Option<(i32, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
                    "SELECT pid, query_start FROM pg_stat_activity \
                     WHERE application_name LIKE 'agent-type-backfill %' \
                     AND wait_event_type = 'Lock'",
                )
                .fetch_optional(&mut on_standby)
                .await
                .unwrap();
                if still != Some(seen) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            cancelled += 1;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let done = run.finish().await;
    log_lock.rollback().await.unwrap();

    done.exits(1);
    let error = done.error_line();
    assert!(
        error.contains("nothing was written")
            && error.contains("failed 5 times")
            && error.contains("conflict with recovery")
            && error.contains("raise max_standby_streaming_delay or turn on hot_standby_feedback")
            && error.contains("lower --chunk-size (now 20000)"),
        "{}",
        done.stderr
    );
    assert_eq!(cancelled, 5, "{}", done.stderr);
    pool.close().await;
}

/// `--max-replica-lag`: while a standby's replay is paused, and so further behind than the
/// bound, an apply writes nothing and says why on stderr; once replay resumes and the standby
/// catches up, it writes every flip.
#[tokio::test]
async fn an_apply_waits_while_a_standby_replays_further_behind_than_max_replica_lag() {
    // The standby reports its replay position every second, not every ten.
    let mut primary =
        EphemeralPostgres::start_with(&[("wal_receiver_status_interval", "1s")]).unwrap();
    let pool = registry_on(&primary, 30).await;
    let standby = EphemeralPostgres::start_standby_of(&mut primary).unwrap();
    let on_primary = primary.url("registry");
    let expected = tool(&on_primary, &["--dry-run", "--format", "json"], &[]);
    expected.exits(0);
    let planned = expected.log().flips().len();
    assert!(planned > 1, "the seed has flips for several batches");

    let mut on_standby = sqlx::PgConnection::connect(&standby.url("postgres"))
        .await
        .unwrap();
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&mut on_standby)
        .await
        .unwrap();
    // WAL the paused standby receives and does not replay, until the primary sees it behind.
    sqlx::query("CREATE TABLE wal_churn (n int)")
        .execute(&pool)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        sqlx::query("INSERT INTO wal_churn SELECT generate_series(1, 100)")
            .execute(&pool)
            .await
            .unwrap();
        let behind: Option<f64> = sqlx::query_scalar(
            "SELECT EXTRACT(epoch FROM replay_lag)::float8 FROM pg_stat_replication \
             WHERE replay_lsn < sent_lsn",
        )
        .fetch_optional(&pool)
        .await
        .unwrap()
        .flatten();
        if behind.is_some_and(|seconds| seconds > 2.0) {
            break;
        }
        assert!(started.elapsed() < HANG, "the standby never fell behind");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let mut run = Tool::new(&[
        "--apply",
        "--format",
        "json",
        "--batch-size",
        "1",
        "--max-flips",
        &planned.to_string(),
        "--max-replica-lag",
        "1s",
    ])
    .database(&on_primary)
    .spawn();
    if !run.stderr_shows("writes paused").await {
        let done = run.finish().await;
        panic!(
            "the apply never paused: {}\n{}",
            done.describe(),
            done.stderr
        );
    }
    let audited = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM type_reclassification_log")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(audited().await, 0, "written while the standby was behind");
    assert!(
        run.running(),
        "the apply ended while the standby was behind"
    );

    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&mut on_standby)
        .await
        .unwrap();
    let done = run.finish().await;
    done.exits(0);
    done.stderr_has("writes resumed");
    assert_eq!(
        done.log().summary().written,
        count(planned),
        "{}",
        done.stdout
    );
    assert_eq!(audited().await, i64::try_from(planned).unwrap());
    pool.close().await;
}

/// An apply of up to 100 flips that waits while a standby replays more than 1 s behind.
fn apply_watching_replicas(url: &str) -> Finished {
    tool(
        url,
        &[
            "--apply",
            "--format",
            "json",
            "--max-flips",
            "100",
            "--max-replica-lag",
            "1s",
        ],
        &[],
    )
}

/// Without a standby an apply with `--max-replica-lag` writes as it would without it, saying on
/// stderr that there is nothing to watch.
#[tokio::test]
async fn max_replica_lag_with_no_standby_writes_at_once() {
    let db = TestDb::seeded(10).await;
    let done = apply_watching_replicas(&db.url);
    done.exits(0);
    done.stderr_has("no standby streams from this server");
    let written = done.log().summary().written;
    assert!(written > 0, "{}", done.stdout);
    assert_eq!(count(db.audit_rows().await.len()), written);
}

/// Logical replication is not a standby: a subscription's walsender, bound to a database, is
/// listed in `pg_stat_replication` beside the physical standbys, but it does not serve reads of
/// the registry, so `--max-replica-lag` does not wait on it (nor name it as watched).
#[tokio::test]
async fn max_replica_lag_does_not_watch_a_logical_replication_subscriber() {
    let primary = EphemeralPostgres::start_with(&[("wal_level", "logical")]).unwrap();
    let pool = registry_on(&primary, 10).await;
    for statement in [
        "CREATE TABLE ping (n int PRIMARY KEY)",
        "CREATE PUBLICATION atb_pub FOR TABLE ping",
        // Made apart: a subscription on the same server would wait on its own slot's creation.
        "SELECT pg_create_logical_replication_slot('atb_sub', 'pgoutput')",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let subscriber = database_on(&primary, "subscriber").await;
    sqlx::query("CREATE TABLE ping (n int PRIMARY KEY)")
        .execute(&subscriber)
        .await
        .unwrap();
    sqlx::query(&format!(
        "CREATE SUBSCRIPTION atb_sub CONNECTION '{}' PUBLICATION atb_pub \
         WITH (create_slot = false, slot_name = 'atb_sub')",
        primary
            .url("registry")
            .replace("postgres://", "postgresql://")
    ))
    .execute(&subscriber)
    .await
    .unwrap();
    let started = std::time::Instant::now();
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'atb_sub' \
         AND state = 'streaming'",
    )
    .fetch_one(&pool)
    .await
    .unwrap()
        == 0
    {
        assert!(started.elapsed() < HANG, "the subscription never streamed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let done = apply_watching_replicas(&primary.url("registry"));
    done.exits(0)
        .stderr_has("no standby streams from this server");
    assert!(!done.stderr.contains("atb_sub"), "{}", done.stderr);

    sqlx::query("DROP SUBSCRIPTION atb_sub")
        .execute(&subscriber)
        .await
        .unwrap();
    pool.close().await;
    primary.stop().unwrap();
}
