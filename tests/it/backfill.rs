//! The backfill against a real PostgreSQL: each test in its own database with migrations/ applied.

use crate::common;

use std::time::Duration;

use agent_type_backfill::config::BackfillConfig;
use agent_type_backfill::db;
use agent_type_backfill::error::exit_code;
use agent_type_backfill::events::{Event, FlipEvent, Hold, HoldReason, Mode};
use agent_type_backfill::outcome::Refusal;
use agent_type_backfill::support::seed::{
    self, NewProfile, NewSnapshot, BIDCLIQ_URL, NORTHWIND_URL, SWIVEL_URL,
};
use common::{backfill, wait_for_blocked_tool, TestDb};
use serde_json::{json, Value};
use sqlx::Connection;

#[tokio::test]
async fn known_stale_cases_bidcliq_and_swivel_are_exactly_the_flips() {
    let db = TestDb::seeded(200).await;
    let (result, log) = backfill(&db.url, &["--dry-run"]).run().await;
    let summary = result.unwrap();
    let found: Vec<(&str, &str, &Value, &str)> = log
        .flips()
        .into_iter()
        .map(|f| (f.profile.as_str(), f.url.as_str(), &f.from, f.to.as_str()))
        .collect();
    let buying = json!("buying");
    let mut expected = vec![
        ("bidcliq", BIDCLIQ_URL, &buying, "sales"),
        ("swivel", SWIVEL_URL, &buying, "sales"),
    ];
    let mut found_sorted = found.clone();
    found_sorted.sort_by_key(|f| f.0);
    expected.sort_by_key(|f| f.0);
    assert_eq!(found_sorted, expected);
    assert_eq!(summary.flips, 2);
    assert_eq!(summary.profiles_changed, 2);
    assert_eq!(summary.profiles_scanned, 211);
    assert_eq!(
        summary.malformed, 5,
        "NULL, JSON null, object, string and number rows"
    );
    assert_eq!(
        log.flip_of("swivel").index,
        1,
        "index is the position in the agents array"
    );
}

#[tokio::test]
async fn apply_writes_the_two_flips_with_two_audit_rows_and_a_rerun_finds_none() {
    let db = TestDb::seeded(50).await;
    let updated_before: Vec<(String, String)> =
        sqlx::query_as("SELECT slug::text, updated_at::text FROM member_profiles ORDER BY slug")
            .fetch_all(&db.pool)
            .await
            .unwrap();

    let (result, log) = backfill(&db.url, &["--apply"]).run().await;
    let summary = result.unwrap();
    assert_eq!((summary.flips, summary.written, summary.skipped), (2, 2, 0));
    let run_id = log.run_id();
    let run_id = run_id.as_str();
    assert_eq!(log.summary().run_id.as_deref(), Some(run_id));
    assert!(!log.summary().aborted);

    assert_eq!(db.agents_of("bidcliq").await[0]["type"], "sales");
    assert_eq!(db.agents_of("swivel").await[1]["type"], "sales");

    let audit = db.audit_rows().await;
    assert_eq!(audit.len(), 2);
    for row in &audit {
        assert_eq!(row.source, "backfill_script");
        assert_eq!(row.run_id.as_deref(), Some(run_id));
        assert_eq!(row.old_type.as_deref(), Some("buying"));
        assert_eq!(row.new_type, "sales");
        let notes = row.notes.as_ref().unwrap();
        assert_eq!(notes["tool_version"], agent_type_backfill::VERSION);
        let (slug, url) = if row.agent_url == BIDCLIQ_URL {
            ("bidcliq", BIDCLIQ_URL)
        } else {
            ("swivel", SWIVEL_URL)
        };
        assert_eq!(row.agent_url, url);
        assert_eq!(notes["profile"], slug);
        let member: String =
            sqlx::query_scalar("SELECT id::text FROM member_profiles WHERE slug = $1")
                .bind(slug)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(row.member_id.as_deref(), Some(member.as_str()));
    }

    let updated_after: Vec<(String, String)> =
        sqlx::query_as("SELECT slug::text, updated_at::text FROM member_profiles ORDER BY slug")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let moved: Vec<&str> = updated_before
        .iter()
        .zip(&updated_after)
        .filter(|(before, after)| before.1 != after.1)
        .map(|(before, _)| before.0.as_str())
        .collect();
    assert_eq!(
        moved,
        ["bidcliq", "swivel"],
        "only written profiles are touched"
    );

    let (rerun, _) = backfill(&db.url, &["--apply"])
        .writes_nothing(&db)
        .run()
        .await;
    let rerun = rerun.unwrap();
    assert_eq!((rerun.flips, rerun.written), (0, 0), "idempotent");
}

#[tokio::test]
async fn members_own_buying_agent_with_unclassified_snapshot_is_kept() {
    let db = TestDb::seeded(10).await;
    let (result, log) = backfill(&db.url, &["--apply"]).run().await;
    result.unwrap();
    assert!(!log.text.contains(NORTHWIND_URL), "{log:?}");
    assert_eq!(db.agents_of("northwind-media").await[0]["type"], "buying");
}

#[tokio::test]
async fn dry_run_writes_nothing_and_its_transaction_refuses_writes() {
    let db = TestDb::seeded(100).await;
    let (result, log) = backfill(&db.url, &["--dry-run", "--format", "text"])
        .writes_nothing(&db)
        .run()
        .await;
    assert_eq!(result.unwrap().written, 0);
    assert!(
        log.text
            .contains("  bidcliq  https://bidcliq.example/mcp  buying -> sales  (probed 30h ago)"),
        "{log:?}"
    );

    let settings = db::SessionSettings {
        application_name: "agent-type-backfill atb-read-only".to_owned(),
        lock_timeout: std::time::Duration::from_secs(5),
        statement_timeout: std::time::Duration::from_secs(60),
    };
    let session = db::connect(&db.url, &settings).await.unwrap();
    let mut transaction = db::begin_read_only(&session.pool).await.unwrap();
    let error = sqlx::query("UPDATE member_profiles SET agents = '[]'")
        .execute(&mut transaction)
        .await
        .unwrap_err();
    let code = error
        .as_database_error()
        .unwrap()
        .code()
        .unwrap()
        .into_owned();
    assert_eq!(code, "25006", "read_only_sql_transaction");
}

#[tokio::test]
async fn threshold_abort_prints_every_flip_and_writes_nothing() {
    let db = TestDb::seeded(100).await;
    for mode in ["--apply", "--dry-run"] {
        let (result, log) = backfill(&db.url, &[mode, "--max-flips", "1"])
            .writes_nothing(&db)
            .run()
            .await;
        let error = result.unwrap_err();
        assert_eq!(exit_code(&error), 3, "{error:#}");
        assert_eq!(
            common::refusals(&error),
            [Refusal::TooManyFlips {
                flips: 2,
                max_flips: 1
            }]
        );
        assert_eq!(log.flips().len(), 2, "{mode} shows what would abort");
        assert!(log.summary().aborted);
        assert_eq!(log.summary().run_id, None);
    }
    let (at_limit, _) = backfill(&db.url, &["--dry-run", "--max-flips", "2"])
        .run()
        .await;
    assert!(at_limit.is_ok(), "exactly --max-flips flips is allowed");
}

#[tokio::test]
async fn extra_keys_big_numbers_and_other_elements_are_preserved_exactly() {
    let db = TestDb::seeded(0).await;
    let element_text = |index: i32| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT (agents -> $1)::text FROM member_profiles WHERE slug = 'swivel'",
            )
            .bind(index)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let stale_without_type = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT (agents #- '{1,type}')::text FROM member_profiles WHERE slug = 'swivel'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let sibling_before = element_text(0).await;
    let rest_before = stale_without_type(db.pool.clone()).await;
    assert!(
        rest_before.contains("12345678901234567890123"),
        "{rest_before}"
    );

    backfill(&db.url, &["--apply"]).run().await.0.unwrap();

    assert_eq!(element_text(0).await, sibling_before);
    assert_eq!(stale_without_type(db.pool.clone()).await, rest_before);
    assert!(element_text(1).await.contains("\"type\": \"sales\""));
}

#[tokio::test]
async fn type_key_is_added_when_a_flipped_element_had_none() {
    let db = TestDb::new().await;
    let profile = NewProfile {
        id: uuid::Uuid::from_u128(7),
        slug: "typeless".into(),
        display_name: "Typeless".into(),
        agents: Some(json!([{"url": "https://typeless.example", "name": "t"}])),
    };
    seed::insert(
        &db.pool,
        &[profile],
        &[NewSnapshot::new(
            "https://typeless.example",
            Some("signals"),
        )],
    )
    .await
    .unwrap();
    let (result, log) = backfill(&db.url, &["--apply"]).run().await;
    result.unwrap();
    assert_eq!(
        log.flip_of("typeless").from,
        "unknown",
        "a missing type reads as unknown"
    );
    assert_eq!(
        db.agents_of("typeless").await,
        json!([{"url": "https://typeless.example", "name": "t", "type": "signals"}])
    );
    assert_eq!(
        db.audit_rows().await[0].old_type.as_deref(),
        Some("unknown")
    );
}

#[tokio::test]
async fn preflight_failures_exit_4_before_anything_is_written() {
    let db = TestDb::seeded(5).await;
    sqlx::query("DROP TABLE type_reclassification_log")
        .execute(&db.pool)
        .await
        .unwrap();
    let (result, log) = backfill(&db.url, &["--apply"])
        .writes_nothing(&db)
        .run()
        .await;
    let error = result.unwrap_err();
    assert_eq!(exit_code(&error), 4);
    assert!(format!("{error:#}").contains("table 'type_reclassification_log' is missing"));
    assert!(log.is_empty(), "no report before preflight passes: {log:?}");

    let (dry, _) = backfill(&db.url, &["--dry-run"]).run().await;
    assert_eq!(
        dry.unwrap().flips,
        2,
        "a dry-run does not need the audit table"
    );

    sqlx::query("ALTER TABLE member_profiles RENAME COLUMN agents TO agent_list")
        .execute(&db.pool)
        .await
        .unwrap();
    let (result, _) = backfill(&db.url, &["--dry-run"]).run().await;
    let error = result.unwrap_err();
    assert_eq!(exit_code(&error), 4);
    assert!(format!("{error:#}").contains("column 'member_profiles.agents' is missing"));
}

#[tokio::test]
async fn profile_edited_between_plan_and_write_is_re_resolved_not_overwritten() {
    let db = TestDb::seeded(20).await;
    let mut holder = db.lock_profiles(&["bidcliq"]).await;
    let apply = tokio::spawn(backfill(&db.url, &["--apply", "--lock-timeout", "30s"]).run());
    let application_name = wait_for_blocked_tool(&db).await;
    assert!(
        application_name.starts_with("agent-type-backfill atb-"),
        "{application_name}"
    );

    // A member saves their profile while the backfill waits: the type is now theirs to keep.
    let member_edit =
        json!([{"url": BIDCLIQ_URL, "type": "creative", "name": "Renamed", "visits": 3}]);
    sqlx::query("UPDATE member_profiles SET agents = $1 WHERE slug = 'bidcliq'")
        .bind(&member_edit)
        .execute(&mut holder)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();

    let (result, log) = apply.await.unwrap();
    let summary = result.unwrap();
    assert_eq!(
        (
            summary.flips,
            summary.written,
            summary.skipped,
            summary.unplanned
        ),
        (2, 1, 1, 1)
    );
    let not_written: Vec<(&str, &str, &str)> = log
        .skipped()
        .into_iter()
        .map(|skipped| {
            (
                skipped.profile.as_str(),
                skipped.to.as_str(),
                skipped.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        not_written,
        [
            ("bidcliq", "sales", "changed_since_plan"),
            ("bidcliq", "sales", "unplanned")
        ],
        "the planned buying->sales flip no longer holds; creative->sales is new and waits for the next run"
    );
    assert_eq!(
        db.agents_of("bidcliq").await,
        member_edit,
        "the member's edit survives"
    );
    let audit = db.audit_rows().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].agent_url, SWIVEL_URL);
}

#[tokio::test]
async fn concurrent_edit_that_keeps_the_flip_is_written_without_losing_the_edit() {
    let db = TestDb::seeded(20).await;
    let mut holder = db.lock_profiles(&["bidcliq"]).await;
    let apply = tokio::spawn(backfill(&db.url, &["--apply", "--lock-timeout", "30s"]).run());
    wait_for_blocked_tool(&db).await;
    sqlx::query(
        "UPDATE member_profiles SET agents = jsonb_set(agents, '{0,visits}', '41') WHERE slug = 'bidcliq'",
    )
    .execute(&mut holder)
    .await
    .unwrap();
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let (result, _) = apply.await.unwrap();
    assert_eq!(result.unwrap().written, 2);
    let agents = db.agents_of("bidcliq").await;
    assert_eq!(agents[0]["visits"], 41, "the concurrent edit is kept");
    assert_eq!(agents[0]["type"], "sales");
}

#[tokio::test]
async fn lock_timeout_is_retried_then_reported_never_half_applied() {
    let db = TestDb::seeded(20).await;
    let holder = db.lock_profiles(&["bidcliq"]).await;
    let flags = [
        "--apply",
        "--lock-timeout",
        "100ms",
        "--write-attempts",
        "2",
    ];
    // The batch rolled back whole.
    let (result, log) = backfill(&db.url, &flags).writes_nothing(&db).run().await;
    let error = result.unwrap_err();
    assert_eq!(exit_code(&error), 1);
    assert!(
        format!("{error:#}").contains("2 planned flips were not written"),
        "{error:#}"
    );
    let reasons: Vec<&str> = log
        .skipped()
        .into_iter()
        .map(|skipped| skipped.reason.as_str())
        .collect();
    assert_eq!(reasons, ["not_written_timeout", "not_written_timeout"]);
    holder.close().await.unwrap();

    // Released within the retry budget: the same command now finishes the job.
    let holder = db.lock_profiles(&["bidcliq"]).await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        holder.close().await.unwrap();
    });
    let flags = [
        "--apply",
        "--lock-timeout",
        "100ms",
        "--write-attempts",
        "5",
    ];
    let (result, _) = backfill(&db.url, &flags).run().await;
    release.await.unwrap();
    assert_eq!(result.unwrap().written, 2);
    assert_eq!(db.audit_rows().await.len(), 2);
}

#[tokio::test]
async fn batches_smaller_than_the_table_cover_every_profile_once() {
    let db = TestDb::seeded(95).await;
    let (result, _) = backfill(&db.url, &["--apply", "--batch-size", "7"])
        .run()
        .await;
    let summary = result.unwrap();
    assert_eq!(summary.profiles_scanned, 106);
    assert_eq!(summary.written, 2);
    let (rerun, _) = backfill(&db.url, &["--dry-run", "--batch-size", "1"])
        .run()
        .await;
    assert_eq!(rerun.unwrap().flips, 0);
}

#[tokio::test]
async fn stop_request_lets_the_batch_in_flight_commit_then_reports_and_exits_143() {
    let db = TestDb::seeded(20).await;
    // One profile per batch: bidcliq and swivel land in different batches.
    let first: String = sqlx::query_scalar(
        "SELECT slug::text FROM member_profiles WHERE slug IN ('bidcliq', 'swivel') ORDER BY id LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let holder = db.lock_profiles(&[&first]).await;
    let stop = agent_type_backfill::interrupt::StopSignal::manual();
    let raise = stop.clone();
    let flags = ["--apply", "--batch-size", "1", "--lock-timeout", "30s"];
    let apply = tokio::spawn(backfill(&db.url, &flags).stop(stop).run());
    wait_for_blocked_tool(&db).await;
    raise.raise(agent_type_backfill::interrupt::SIGTERM);
    holder.close().await.unwrap();

    let (result, log) = apply.await.unwrap();
    let error = result.unwrap_err();
    assert_eq!(exit_code(&error), 143);
    assert!(
        format!("{error:#}").contains("1 of 2 written under run id"),
        "{error:#}"
    );
    assert_eq!(log.summary().written, 1);
    assert_eq!(log.summary().interrupted_by.as_deref(), Some("SIGTERM"));
    assert_eq!(
        db.audit_rows().await.len(),
        1,
        "the batch in flight committed whole"
    );

    let (rerun, _) = backfill(&db.url, &["--apply"]).run().await;
    let rerun = rerun.unwrap();
    assert_eq!(
        (rerun.flips, rerun.written),
        (1, 1),
        "a second run picks up the rest"
    );
    assert_eq!(db.audit_rows().await.len(), 2);
}

#[tokio::test]
async fn flip_lines_show_probe_age_and_warning_signs() {
    let db = TestDb::new().await;
    let profile = NewProfile {
        id: uuid::Uuid::from_u128(9),
        slug: "probe-flags".into(),
        display_name: "Probe flags".into(),
        agents: Some(json!([
            {"url": "https://stale.example", "type": "buying"},
            {"url": "https://legacy.example", "type": "buyer"}
        ])),
    };
    let mut snapshot = NewSnapshot::new("https://stale.example", Some("sales"));
    snapshot.age_hours = 24 * 3 + 1;
    snapshot.discovery_error = Some("timeout".into());
    snapshot.oauth_required = true;
    seed::insert(&db.pool, &[profile], &[snapshot])
        .await
        .unwrap();

    let (result, text) = backfill(&db.url, &["--dry-run", "--format", "text"])
        .run()
        .await;
    result.unwrap();
    assert!(text.text.contains(
        "  probe-flags  https://stale.example  buying -> sales  (probed 3d ago, discovery error, needs OAuth)\n"
    ), "{text:?}");
    assert!(
        text.text
            .contains("  probe-flags  https://legacy.example  buyer -> unknown  (no snapshot)\n"),
        "{text:?}"
    );

    let (_, log) = backfill(&db.url, &["--dry-run"]).run().await;
    let flips = log.flips();
    assert!(flips[0].discovery_error);
    assert!(flips[0].oauth_required);
    assert!(flips[0].probed_at.is_some());
    assert_eq!(flips[1].probed_at, None);
}

/// The tool's session settings go beside any options in the URL instead of replacing them:
/// RUNBOOK.md tells a DBA to keep the planning pass off the parallel workers that way. The tool's
/// own are set per transaction (PgBouncer in transaction mode), so they are read in one.
#[tokio::test]
async fn session_settings_are_added_to_the_options_in_the_url() {
    let db = TestDb::new().await;
    let separator = if db.url.contains('?') { '&' } else { '?' };
    let url = format!(
        "{}{separator}options=-c%20max_parallel_workers_per_gather%3D0",
        db.url
    );
    let settings = db::SessionSettings {
        application_name: "agent-type-backfill atb-options".to_owned(),
        lock_timeout: std::time::Duration::from_secs(5),
        statement_timeout: std::time::Duration::from_secs(42),
    };
    let session = db::connect(&url, &settings).await.unwrap();
    let settings: (String, String, String, String) = sqlx::query_as(
        "SELECT current_setting('max_parallel_workers_per_gather'), current_setting('jit'), \
                current_setting('statement_timeout'), current_setting('application_name')",
    )
    .fetch_one(&mut session.pool.begin().await.unwrap())
    .await
    .unwrap();
    assert_eq!(
        settings,
        (
            "0".to_owned(),
            "off".to_owned(),
            "42s".to_owned(),
            "agent-type-backfill atb-options".to_owned()
        )
    );
}

async fn crawler_says(db: &TestDb, url: &str, old_type: &str, new_type: &str, days_ago: i32) {
    sqlx::query(
        "INSERT INTO type_reclassification_log (agent_url, old_type, new_type, source, changed_at, notes) \
         VALUES ($1, $2, $3, 'crawler_promote', now() - make_interval(days => $4), \
                 '{\"decision\": \"logged_only_no_promote\"}')",
    )
    .bind(url)
    .bind(old_type)
    .bind(new_type)
    .bind(days_ago)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// A server newer than the port knows types the tool does not: a stored `sales` whose snapshot
/// infers `retail_media` used to print `sales -> unknown` and be written. It is held: listed,
/// never written, exit 3; and the summary names every such type in the snapshot table.
#[tokio::test]
async fn a_type_the_rule_does_not_know_holds_the_flip_and_writes_nothing() {
    let db = TestDb::seeded(5).await;
    let newer = NewProfile {
        id: uuid::Uuid::from_u128(0xa1),
        slug: "retailer".into(),
        display_name: "Retailer".into(),
        agents: Some(json!([{"url": "https://retail.example/mcp", "type": "sales"}])),
    };
    let stored_newer = NewProfile {
        id: uuid::Uuid::from_u128(0xa2),
        slug: "declared-newer".into(),
        display_name: "Declared".into(),
        agents: Some(json!([{"url": "https://declared.example/mcp", "type": "retail_media"}])),
    };
    seed::insert(
        &db.pool,
        &[newer, stored_newer],
        &[
            NewSnapshot::new("https://retail.example/mcp", Some("retail_media")),
            NewSnapshot::new("https://nobody.example/mcp", Some("ctv")),
        ],
    )
    .await
    .unwrap();
    let before = db.dump().await;
    for mode in [Mode::DryRun, Mode::Apply] {
        // The events as the run emitted them, typed, before any printer rendered them.
        let (result, events) = common::record(&BackfillConfig::new(mode, db.url.clone())).await;
        let error = result.unwrap_err();
        assert_eq!(exit_code(&error), 3, "{error:#}");
        assert!(error.to_string().contains("retail_media"), "{error:#}");
        let held: Vec<(&FlipEvent, &Hold)> = events
            .iter()
            .filter_map(|event| match event {
                Event::Held { flip, hold } => Some((flip, hold)),
                _ => None,
            })
            .collect();
        let described: Vec<(&str, &str, &str, HoldReason, Option<&str>)> = held
            .iter()
            .map(|(flip, hold)| {
                (
                    flip.at.profile.as_str(),
                    flip.at.flip.from.as_str().unwrap(),
                    flip.at.flip.to.as_str(),
                    hold.reason,
                    hold.inferred_type.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            described,
            [
                (
                    "declared-newer",
                    "retail_media",
                    "unknown",
                    HoldReason::UnrecognisedInferredType,
                    Some("retail_media")
                ),
                (
                    "retailer",
                    "sales",
                    "unknown",
                    HoldReason::UnrecognisedInferredType,
                    Some("retail_media")
                ),
            ]
        );
        let Some(Event::Summary(summary)) = events.last() else {
            panic!("the last event is the summary: {events:?}");
        };
        assert_eq!(summary.held, 2);
        assert_eq!(
            summary.unrecognised_inferred_types,
            [("ctv".to_owned(), 1), ("retail_media".to_owned(), 1)].into()
        );
        assert_eq!(summary.written, 0);
        // The expected flips are listed as flips, and not written either.
        assert_eq!(
            events
                .iter()
                .filter(|event| matches!(event, Event::Flip(_)))
                .count(),
            2
        );
        assert_eq!(db.dump().await, before, "{mode:?} wrote");
    }
    let (result, log) = backfill(&db.url, &["--dry-run"]).run().await;
    assert_eq!(exit_code(&result.unwrap_err()), 3);
    let held = log.held_of("retailer");
    assert_eq!(
        (held.reason.as_str(), held.inferred_type.as_deref()),
        ("unrecognised_inferred_type", Some("retail_media"))
    );
    let (_, text) = backfill(&db.url, &["--dry-run", "--format", "text"])
        .run()
        .await;
    assert!(
        text.text.contains("  held  retailer  https://retail.example/mcp  sales -> unknown  (probed 30h ago)  [type unknown to this tool's rule; the server may be newer: stop: 'retail_media']"),
        "{text:?}"
    );
    assert!(
        text.text
            .contains("unrecognised inferred types:    ctv 1, retail_media 1"),
        "{text:?}"
    );
}

/// `--max-probe-age`: a flip decided by an older snapshot is held, with the same exit 3.
#[tokio::test]
async fn a_probe_older_than_max_probe_age_holds_its_flip() {
    let db = TestDb::seeded(5).await;
    let (result, log) = backfill(&db.url, &["--apply", "--max-probe-age", "24h"])
        .writes_nothing(&db)
        .run()
        .await;
    assert_eq!(exit_code(&result.unwrap_err()), 3);
    assert_eq!(log.held_of("bidcliq").reason, "stale_probe");
    // The fixtures were probed 30 hours ago: a two-day limit lets them through.
    let (result, _) = backfill(&db.url, &["--apply", "--max-probe-age", "2d"])
        .run()
        .await;
    assert_eq!(result.unwrap().written, 2);
}

/// The crawler's own disagreement log beside each flip, and `--min-corroboration` on top.
#[tokio::test]
async fn crawler_disagreements_are_shown_on_each_flip_and_can_be_demanded() {
    let db = TestDb::seeded(5).await;
    for days in [9, 5, 1] {
        crawler_says(&db, BIDCLIQ_URL, "buying", "sales", days).await;
    }
    crawler_says(&db, SWIVEL_URL, "buying", "sales", 4).await;
    crawler_says(&db, SWIVEL_URL, "buying", "signals", 2).await;
    crawler_says(&db, "https://no-flip.example/mcp", "sales", "creative", 1).await;

    let (result, planned) = backfill(&db.url, &["--dry-run"]).run().await;
    result.unwrap();
    let evidence = |profile: &str| {
        let flip = planned.flip_of(profile);
        flip.crawler_disagreements.clone().unwrap()
    };
    let bidcliq = evidence("bidcliq");
    assert_eq!(bidcliq.count, Some(3));
    assert_eq!(bidcliq.last_inferred.as_deref(), Some("sales"));
    let (first, last) = (bidcliq.first_at.unwrap(), bidcliq.last_at.unwrap());
    assert_eq!((last - first).num_days(), 8);
    let swivel = evidence("swivel");
    assert_eq!(
        (swivel.count, swivel.last_inferred.as_deref()),
        (Some(1), Some("signals"))
    );

    let (_, text) = backfill(&db.url, &["--dry-run", "--format", "text"])
        .run()
        .await;
    let text = text.text;
    let since = (chrono::Utc::now() - chrono::Duration::days(9))
        .format("%Y-%m-%d")
        .to_string();
    assert!(
        text.contains(&format!(
            "(probed 30h ago; crawler disagreed 3x since {since})"
        )),
        "{text}"
    );
    assert!(text.contains("crawler disagreed 1x since"), "{text}");
    assert!(text.contains("crawler last saw signals)"), "{text}");

    // Swivel has one agreeing row: not enough for two. Flips to or from unknown are untouched.
    let (result, guarded) = backfill(&db.url, &["--apply", "--min-corroboration", "2"])
        .writes_nothing(&db)
        .run()
        .await;
    assert_eq!(exit_code(&result.unwrap_err()), 3);
    assert_eq!(guarded.held_of("swivel").reason, "uncorroborated");
    assert!(guarded.held().iter().all(|held| held.to != "unknown"));
    let (result, _) = backfill(&db.url, &["--apply", "--min-corroboration", "1"])
        .run()
        .await;
    assert_eq!(result.unwrap().written, 2);
}

/// Without SELECT on the audit table a dry-run still runs, and says the evidence is unavailable;
/// `--min-corroboration`, which needs it, is refused at preflight.
#[tokio::test]
async fn crawler_evidence_without_select_on_the_log_is_unavailable_and_cannot_be_demanded() {
    let db = TestDb::seeded(5).await;
    let role = db.role("reader").await;
    for statement in [format!(
        "GRANT SELECT ON member_profiles, agent_capabilities_snapshot TO {role}"
    )] {
        sqlx::query(&statement).execute(&db.pool).await.unwrap();
    }
    let url = db.url.replacen("postgres@", &format!("{role}@"), 1);
    let (result, log) = backfill(&url, &["--dry-run"]).run().await;
    result.unwrap();
    let evidence = log
        .flip_of("bidcliq")
        .crawler_disagreements
        .clone()
        .unwrap();
    assert_eq!(
        evidence.unavailable.as_deref(),
        Some("no SELECT privilege on type_reclassification_log")
    );
    assert_eq!(evidence.count, None);
    let (result, out) = backfill(&url, &["--dry-run", "--min-corroboration", "1"])
        .run()
        .await;
    let error = result.unwrap_err();
    assert_eq!(exit_code(&error), 4, "{error:#}");
    assert!(
        error
            .to_string()
            .contains("GRANT SELECT ON type_reclassification_log"),
        "{error:#}"
    );
    assert!(out.is_empty());
}

/// A stored type nested deeper than the resolver keeps whole is audited, and reverted, as the
/// exact value it was: auditing its summary made revert write the summary back (a regression
/// once).
#[tokio::test]
async fn a_deeply_nested_type_is_audited_and_reverted_exactly() {
    let db = TestDb::new().await;
    let mut deep = json!("core");
    for level in 0..70 {
        deep = if level % 2 == 0 {
            json!([deep])
        } else {
            json!({ "k": deep })
        };
    }
    let agents = json!([
        {"url": "https://deep.example/mcp", "type": deep.clone(), "name": "Deep"},
        {"url": "https://other.example/mcp", "type": null, "price": 1.50}
    ]);
    let profile = NewProfile {
        id: uuid::Uuid::from_u128(0xdee9),
        slug: "deep".into(),
        display_name: "Deep".into(),
        agents: Some(agents.clone()),
    };
    seed::insert(
        &db.pool,
        &[profile],
        &[NewSnapshot::new("https://deep.example/mcp", Some("sales"))],
    )
    .await
    .unwrap();
    let (result, log) = backfill(&db.url, &["--apply"]).run().await;
    assert_eq!(result.unwrap().written, 1);
    let run_id = log.run_id();
    let (old_type, from_equal): (String, bool) = sqlx::query_as(
        "SELECT old_type, notes -> 'from' = $1::jsonb FROM type_reclassification_log WHERE run_id = $2",
    )
    .bind(deep.to_string())
    .bind(&run_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(from_equal, "notes.from is not the stored value");
    assert_eq!(serde_json::from_str::<Value>(&old_type).unwrap(), deep);

    common::revert(&db.url, &[&run_id, "--apply"])
        .run()
        .await
        .0
        .unwrap();
    let restored: bool =
        sqlx::query_scalar("SELECT agents = $1::jsonb FROM member_profiles WHERE slug = 'deep'")
            .bind(agents.to_string())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        restored,
        "revert did not restore the profile exactly: {:?}",
        db.agents_of("deep").await
    );
}
