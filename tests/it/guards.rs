//! What stops a run from writing what it should not: the `--max-flips` boundary for the backfill
//! and for `revert`, a dry-run that cannot write even without its READ ONLY transaction, and the
//! `buying` carve-out end to end. Each test is named for the boundary it holds, so an off-by-one
//! or a dropped condition fails the one test that says which.

use crate::common;

use agent_type_backfill::domain::Transition;
use agent_type_backfill::error::exit_code;
use agent_type_backfill::events::Summary;
use agent_type_backfill::outcome::Refusal;
use agent_type_backfill::support::seed::{self, NewProfile, NewSnapshot};
use common::{backfill, revert, Scratch, TestDb, Tool};
use serde_json::{json, Value};
use sqlx::Connection;
use uuid::Uuid;

fn assert_threshold_abort(result: anyhow::Result<Summary>, flips: usize, max_flips: usize) {
    let error = result.unwrap_err();
    assert_eq!(exit_code(&error), 3, "{error:#}");
    assert_eq!(
        common::refusals(&error),
        [Refusal::TooManyFlips {
            flips: u64::try_from(flips).unwrap(),
            max_flips: u64::try_from(max_flips).unwrap()
        }]
    );
}

/// Off-by-one in the threshold (`>=` for `>`): the seeded registry plans exactly 2 flips.
#[tokio::test]
async fn apply_at_exactly_max_flips_writes_and_one_over_writes_nothing() {
    let db = TestDb::seeded(20).await;
    let (over, log) = backfill(&db.url, &["--apply", "--max-flips", "1"])
        .writes_nothing(&db)
        .run()
        .await;
    assert_threshold_abort(over, 2, 1);
    assert!(log.summary().aborted);

    let (at_limit, log) = backfill(&db.url, &["--apply", "--max-flips", "2"])
        .run()
        .await;
    let summary = at_limit.unwrap();
    assert_eq!((summary.flips, summary.written), (2, 2));
    assert!(!log.summary().aborted);
    assert_eq!(db.audit_rows().await.len(), 2);
    assert_eq!(db.agents_of("bidcliq").await[0]["type"], "sales");
}

#[tokio::test]
async fn revert_at_exactly_max_flips_writes_and_one_over_writes_nothing() {
    let db = TestDb::seeded(20).await;
    let (applied, log) = backfill(&db.url, &["--apply"]).run().await;
    assert_eq!(applied.unwrap().written, 2);
    let run_id = log.summary().run_id.clone().unwrap();

    let (over, log) = revert(&db.url, &[&run_id, "--apply", "--max-flips", "1"])
        .writes_nothing(&db)
        .run()
        .await;
    assert_threshold_abort(over, 2, 1);
    assert_eq!(log.summary().run_id, None);

    let (at_limit, _) = revert(&db.url, &[&run_id, "--apply", "--max-flips", "2"])
        .run()
        .await;
    assert_eq!(at_limit.unwrap().written, 2);
    assert_eq!(db.audit_rows().await.len(), 4);
    assert_eq!(db.agents_of("bidcliq").await[0]["type"], "buying");
    assert_eq!(db.agents_of("swivel").await[1]["type"], "buying");
}

/// Every row version of the tables a run could write: an UPDATE, even of identical values,
/// gives its row a new `xmin` and `ctid`; an INSERT or DELETE changes the set.
async fn row_versions(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT t || ' ' || ctid::text || ' ' || xmin::text FROM ( \
             SELECT 'member_profiles' AS t, ctid, xmin FROM member_profiles \
             UNION ALL SELECT 'agent_capabilities_snapshot', ctid, xmin FROM agent_capabilities_snapshot \
             UNION ALL SELECT 'type_reclassification_log', ctid, xmin FROM type_reclassification_log \
         ) v ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Independent of the planning transaction's READ ONLY: the dry-run runs as a role that may only
/// read, so any statement that writes fails the run; and under the owner, no row gets a new
/// version. A dry-run that wrote (through the write path, or with the same values) fails here
/// even if the READ ONLY setting were gone.
#[tokio::test]
async fn dry_run_as_a_select_only_role_succeeds_and_leaves_every_row_version_alone() {
    let db = TestDb::seeded(30).await;
    let reader = db.role("reader").await;
    for statement in [format!(
        "GRANT SELECT ON member_profiles, agent_capabilities_snapshot TO {reader}"
    )] {
        sqlx::query(&statement).execute(&db.pool).await.unwrap();
    }
    let can_write: bool = sqlx::query_scalar(
        "SELECT has_table_privilege($1, 'member_profiles', 'UPDATE') \
             OR has_table_privilege($1, 'type_reclassification_log', 'INSERT')",
    )
    .bind(&reader)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(!can_write, "the reader must not be able to write");
    let reader_url = db.url.replacen("postgres@", &format!("{reader}@"), 1);
    assert_ne!(reader_url, db.url, "the test URL names the postgres user");

    let before = row_versions(&db).await;
    let (as_reader, log) = backfill(&reader_url, &["--dry-run"]).run().await;
    let summary = as_reader.unwrap();
    assert_eq!((summary.flips, summary.written), (2, 0));
    assert_eq!(log.start().target.user, reader);

    let (as_owner, _) = backfill(&db.url, &["--dry-run"]).run().await;
    assert_eq!(as_owner.unwrap().flips, 2);
    assert_eq!(row_versions(&db).await, before, "a dry-run wrote a row");

    // The same user with the apply: preflight refuses before anything is read.
    let (apply, _) = backfill(&reader_url, &["--apply"]).run().await;
    assert_eq!(exit_code(&apply.unwrap_err()), 4);
    assert_eq!(row_versions(&db).await, before);
}

const KEPT_URL: &str = "https://dsp.self-declared.example/mcp";
const ALONE_URL: &str = "https://dsp.alone.example/mcp";
const STALE_URL: &str = "https://ssp.stale.example/mcp";

/// The `buying` carve-out lives twice: in the resolver (`SELF_DECLARED_TYPE`) and in the SQL
/// prefilter (`db::FLIP_CANDIDATES`). The profile "mixed-buyer" is read because of its stale
/// element, so the resolver's carve-out decides its self-declared agent; "alone-buyer" has only a
/// self-declared agent, so the prefilter's carve-out decides whether it is read at all, which the
/// run logs as its candidate count. Removing either carve-out fails this test.
#[test]
fn self_declared_buying_agents_are_kept_by_the_resolver_and_never_read_by_the_prefilter() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(async {
        let db = TestDb::new().await;
        let profiles = [
            NewProfile {
                id: Uuid::from_u128(0xb1),
                slug: "mixed-buyer".into(),
                display_name: "Mixed buyer".into(),
                agents: Some(json!([
                    {"url": KEPT_URL, "type": "buying", "name": "own DSP"},
                    {"url": STALE_URL, "type": "buying", "name": "really a sales agent"}
                ])),
            },
            NewProfile {
                id: Uuid::from_u128(0xb2),
                slug: "alone-buyer".into(),
                display_name: "Alone buyer".into(),
                agents: Some(json!([{"url": ALONE_URL, "type": "buying"}])),
            },
        ];
        let snapshots = [
            NewSnapshot::new(KEPT_URL, None),
            NewSnapshot::new(ALONE_URL, None),
            NewSnapshot::new(STALE_URL, Some("sales")),
        ];
        seed::insert(&db.pool, &profiles, &snapshots).await.unwrap();
        db
    });
    let alone_before = runtime.block_on(db.agents_of("alone-buyer"));

    let done = Tool::new(&["--apply", "--format", "json"])
        .database(&db.url)
        .env("RUST_LOG", "agent_type_backfill=info")
        .status(0)
        .run();
    let flips: Vec<(&str, u64, &Value, &str)> = done
        .log()
        .flips()
        .into_iter()
        .map(|f| (f.profile.as_str(), f.index, &f.from, f.to.as_str()))
        .collect();
    assert_eq!(
        flips,
        [("mixed-buyer", 1, &json!("buying"), "sales")],
        "only the stale element flips; the self-declared buying agent is kept"
    );
    // The prefilter reads only the profile with a flip.
    done.stderr_has("server pass complete profiles=2 candidates=1");

    let (mixed, alone, audit) = runtime.block_on(async {
        (
            db.agents_of("mixed-buyer").await,
            db.agents_of("alone-buyer").await,
            db.audit_rows().await,
        )
    });
    assert_eq!(
        mixed,
        json!([
            {"url": KEPT_URL, "type": "buying", "name": "own DSP"},
            {"url": STALE_URL, "type": "sales", "name": "really a sales agent"}
        ])
    );
    assert_eq!(alone, alone_before);
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].agent_url, STALE_URL);
}

/// `--allow-transition` must match both ends of a flip: allowing only its source or only its
/// target refuses the run (exit 3, nothing written), and allowing it writes.
#[tokio::test]
async fn allow_transition_needs_both_ends_of_every_flip() {
    let db = TestDb::seeded(10).await;
    for allowed in ["buying->signals", "buyer->sales"] {
        let (refused, log) = backfill(&db.url, &["--apply", "--allow-transition", allowed])
            .writes_nothing(&db)
            .run()
            .await;
        let error = refused.unwrap_err();
        assert_eq!(exit_code(&error), 3, "{allowed}: {error:#}");
        assert_eq!(
            common::refusals(&error),
            [Refusal::NotAllowed {
                flips: 2,
                transitions: vec![Transition::new("buying", "sales")]
            }],
            "{allowed}"
        );
        // Messages spell a transition FROM:TO, which no shell mangles.
        assert!(format!("{error:#}").contains("(buying:sales)"), "{error:#}");
        let listed = log.not_allowed().len();
        assert_eq!(listed, 2, "{allowed}: every refused flip is listed");
    }
    let (allowed, _) = backfill(&db.url, &["--apply", "--allow-transition", "buying->sales"])
        .run()
        .await;
    assert_eq!(allowed.unwrap().written, 2);
}

/// An apply held to a reviewed plan counts the profiles it will write, not the profiles of the
/// fresh plan: a departed flip's profile is not "with type changes".
#[tokio::test]
async fn apply_with_a_plan_counts_only_the_profiles_it_keeps() {
    let db = TestDb::seeded(10).await;
    let scratch = Scratch::new();
    let plan = &scratch.arg("plan.json");
    let (dry, _) = backfill(&db.url, &["--dry-run", "--plan-out", plan])
        .run()
        .await;
    assert_eq!(dry.unwrap().profiles_changed, 2);
    // swivel's agent changes after review: its reviewed flip no longer holds, and the new one
    // (creative -> sales) was never reviewed.
    db.member_sets_type("swivel", 1, "creative").await;
    let (applied, _) = backfill(&db.url, &["--apply", "--plan", plan]).run().await;
    let summary = applied.unwrap();
    assert_eq!(
        (
            summary.flips,
            summary.profiles_changed,
            summary.written,
            summary.skipped,
            summary.unplanned
        ),
        (1, 1, 1, 1, 1)
    );
}

/// Only lock and statement timeouts, deadlocks and serialization failures are retried: any other
/// error in a batch ends the run at once with that error, instead of being retried or reported
/// as a timeout.
#[test]
fn an_error_that_is_not_a_timeout_ends_the_run_without_retrying() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(async {
        let db = TestDb::seeded(10).await;
        for statement in [
            "CREATE FUNCTION refuse_write() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'registry frozen for maintenance'; END $$",
            "CREATE TRIGGER refuse_write BEFORE UPDATE ON member_profiles \
             FOR EACH ROW EXECUTE FUNCTION refuse_write()",
        ] {
            sqlx::query(statement).execute(&db.pool).await.unwrap();
        }
        db
    });
    let done = Tool::new(&["--apply", "--write-attempts", "4", "--format", "json"])
        .database(&db.url)
        .env("RUST_LOG", "agent_type_backfill=info")
        .writes_nothing(&db)
        .status(1)
        // A run that retries for ever fails the test instead of hanging it.
        .run_within(RETRY_BOUND);
    done.stderr_has("error: could not update member_profiles")
        .stderr_has("registry frozen for maintenance");
    assert!(!done.stderr.contains("retrying"), "{}", done.stderr);
    let timed_out = done
        .log()
        .skipped()
        .into_iter()
        .filter(|skipped| skipped.reason == "not_written_timeout");
    assert_eq!(timed_out.count(), 0, "{:?}", done.log());
}

/// Longer than any of these runs retries, far shorter than a hang.
const RETRY_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

/// `--write-attempts N` tries a batch that keeps hitting the lock timeout exactly N times.
#[test]
fn write_attempts_is_the_number_of_tries_not_retries() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::seeded(10));
    let holder = runtime.block_on(db.lock_profiles(&["bidcliq"]));
    let flags = [
        "--apply",
        "--lock-timeout",
        "100ms",
        "--write-attempts",
        "3",
    ];
    let done = Tool::new(&[&flags[..], &["--format", "json"]].concat())
        .database(&db.url)
        .env("RUST_LOG", "agent_type_backfill=info")
        .status(1)
        .run_within(RETRY_BOUND);
    let summary = done.log().summary();
    assert_eq!(
        (summary.written, summary.skipped),
        (0, 2),
        "both flips share the batch that timed out"
    );
    let stderr = &done.stderr;
    assert_eq!(stderr.matches("; retrying").count(), 2, "{stderr}");
    assert_eq!(stderr.matches("giving up on it").count(), 1, "{stderr}");
    // The error says what the summary says: nothing was written.
    done.stderr_has("2 planned flips were not written because their batches kept hitting")
        .stderr_has("; nothing was written: rerun the same command to finish");
    runtime.block_on(holder.close()).unwrap();
}

/// A snapshot inferring `si` (valid from 28 January to 12 April 2026, then retired) holds its
/// flip with its own reason and advice to re-probe or demote; a type the server never had keeps
/// the advice to update the tool. Each in text, JSON and Markdown; nothing is written either way.
#[tokio::test]
async fn a_retired_type_is_held_with_re_probe_advice_and_a_never_known_one_with_update_advice() {
    for (inferred, reason, advice, not_advice) in [
        ("si", "retired_inferred_type", "re-probe the agent", "newer"),
        ("quantum", "unrecognised_inferred_type", "newer", "re-probe"),
    ] {
        let db = TestDb::seeded(5).await;
        let url = "https://old-probe.example/mcp";
        let profile = NewProfile {
            id: Uuid::from_u128(0x51),
            slug: "old-probe".into(),
            display_name: "Old probe".into(),
            agents: Some(json!([{"url": url, "type": "sales"}])),
        };
        seed::insert(
            &db.pool,
            &[profile],
            &[NewSnapshot::new(url, Some(inferred))],
        )
        .await
        .unwrap();

        let (refused, log) = backfill(&db.url, &["--apply"])
            .writes_nothing(&db)
            .run()
            .await;
        let error = refused.unwrap_err();
        assert_eq!(exit_code(&error), 3);
        let message = format!("{error:#}");
        assert!(
            message.contains(&format!("{reason} '{inferred}'")) && message.contains(advice),
            "{message}"
        );
        assert!(!message.contains(not_advice), "{message}");
        assert!(
            log.held().iter().any(
                |held| held.reason == reason && held.inferred_type.as_deref() == Some(inferred)
            ),
            "{log:?}"
        );

        for format in ["text", "markdown"] {
            let (result, out) = backfill(&db.url, &["--dry-run", "--format", format])
                .run()
                .await;
            assert_eq!(exit_code(&result.unwrap_err()), 3);
            assert!(
                out.text.contains(advice) && !out.text.contains(not_advice),
                "{format}: {out:?}"
            );
        }
    }
}
