//! The guarantees that decide whether a value nobody reviewed is written or a member's edit is
//! overwritten: a reviewed plan is matched on every field, an element is its index and its url,
//! revert rechecks under the lock, and only the crawler's own rows corroborate a flip.
//!
//! Changes "between planning and the locked write" are made by holding the profile's row lock in
//! another session: the tool plans (a read-only snapshot, which the lock does not block), then
//! waits on the lock; the test makes its change and commits, and the tool re-reads under it.

use crate::common::{backfill, revert, wait_for_blocked_tool, RunLog, Scratch, TestDb};
use agent_type_backfill::error::exit_code;
use agent_type_backfill::events::Summary;
use agent_type_backfill::support::seed::{self, NewProfile, NewSnapshot, BIDCLIQ_URL, SWIVEL_URL};
use serde_json::{json, Value};
use sqlx::PgConnection;
use uuid::Uuid;

/// `(event, profile, index, url, to, reason)` of every flip-shaped line, in log order.
fn lines(log: &RunLog) -> Vec<(&str, &str, u64, &str, &str, &str)> {
    log.events()
        .iter()
        .filter_map(|event| {
            let flip = event.flip()?;
            Some((
                event.kind(),
                flip.profile.as_str(),
                flip.index,
                flip.url.as_str(),
                flip.to.as_str(),
                event.reason().unwrap_or_default(),
            ))
        })
        .collect()
}

async fn commit(mut holder: PgConnection) {
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
}

/// Replaces a profile's `agents` inside the holder's transaction.
async fn set_agents(holder: &mut PgConnection, slug: &str, agents: &Value) {
    sqlx::query("UPDATE member_profiles SET agents = $2 WHERE slug = $1")
        .bind(slug)
        .bind(agents)
        .execute(&mut *holder)
        .await
        .unwrap();
}

async fn probe_now_says(db: &TestDb, url: &str, inferred: &str) {
    sqlx::query("UPDATE agent_capabilities_snapshot SET inferred_type = $2 WHERE agent_url = $1")
        .bind(url)
        .bind(inferred)
        .execute(&db.pool)
        .await
        .unwrap();
}

/// Runs the backfill with `flags` in the background while `holder` keeps the lock.
fn spawn_backfill(
    db: &TestDb,
    flags: &[&str],
) -> tokio::task::JoinHandle<(anyhow::Result<Summary>, RunLog)> {
    let flags = [flags, &["--lock-timeout", "120s"]].concat();
    tokio::spawn(backfill(&db.url, &flags).run())
}

const PAIR_A: &str = "https://pair-a.example/mcp";
const PAIR_B: &str = "https://pair-b.example/mcp";
const PAIR_C: &str = "https://pair-c.example/mcp";

/// A profile with two stale agents side by side, and a third agent elsewhere whose probe says
/// the same: an element swapped for it looks like the reviewed flip on every field but its url.
async fn with_pair(db: &TestDb) {
    let pair = NewProfile {
        id: Uuid::from_u128(0xA1),
        slug: "pair".into(),
        display_name: "Pair".into(),
        agents: Some(pair_agents(PAIR_A)),
    };
    let snapshots: Vec<NewSnapshot> = [PAIR_A, PAIR_B, PAIR_C]
        .iter()
        .map(|url| NewSnapshot::new(url, Some("sales")))
        .collect();
    seed::insert(&db.pool, &[pair], &snapshots).await.unwrap();
}

fn pair_agents(first: &str) -> Value {
    json!([
        {"url": first, "type": "buying", "name": "first"},
        {"url": PAIR_B, "type": "buying", "name": "second"}
    ])
}

#[tokio::test]
async fn a_reviewed_flip_is_written_only_while_target_and_stored_type_are_as_reviewed() {
    let db = TestDb::seeded(10).await;
    let scratch = Scratch::new();
    let plan = &scratch.arg("plan.json");
    let (dry, _) = backfill(&db.url, &["--dry-run", "--plan-out", plan])
        .run()
        .await;
    assert_eq!(dry.unwrap().flips, 2);
    // After review: bidcliq's probe now infers another type (same element, same stored type, a
    // new target), and swivel's stored type changed to another legacy value with the same target.
    probe_now_says(&db, BIDCLIQ_URL, "creative").await;
    db.member_sets_type("swivel", 1, "buyer").await;

    // Nothing unreviewed is written.
    let (applied, log) = backfill(&db.url, &["--apply", "--plan", plan])
        .writes_nothing(&db)
        .run()
        .await;
    let applied = applied.unwrap();
    assert_eq!(applied.written, 0, "{log:?}");
    let mut found = lines(&log);
    found.sort();
    assert_eq!(
        found
            .iter()
            .map(|&(event, profile, index, _, to, reason)| (event, profile, index, to, reason))
            .collect::<Vec<_>>(),
        [
            ("skipped", "bidcliq", 0, "creative", "unplanned"),
            ("skipped", "bidcliq", 0, "sales", "changed_since_plan"),
            ("skipped", "swivel", 1, "sales", "changed_since_plan"),
            ("skipped", "swivel", 1, "sales", "unplanned"),
        ]
    );
}

#[tokio::test]
async fn a_reviewed_flip_is_not_written_to_another_agent_at_its_index() {
    let db = TestDb::seeded(0).await;
    with_pair(&db).await;
    let scratch = Scratch::new();
    let plan = &scratch.arg("plan.json");
    backfill(&db.url, &["--dry-run", "--plan-out", plan])
        .run()
        .await
        .0
        .unwrap();
    // The member replaced the first agent by another one, stored and probed alike.
    let mut holder = db.lock_profiles(&[]).await;
    set_agents(&mut holder, "pair", &pair_agents(PAIR_C)).await;
    commit(holder).await;

    let (applied, log) = backfill(&db.url, &["--apply", "--plan", plan, "--max-flips", "10"])
        .run()
        .await;
    let applied = applied.unwrap();
    let agents = db.agents_of("pair").await;
    assert_eq!(
        (agents[0]["url"].as_str(), agents[0]["type"].as_str()),
        (Some(PAIR_C), Some("buying")),
        "the reviewed flip was for {PAIR_A}, not the agent now at its index: {log:?}"
    );
    assert_eq!(agents[1]["type"], "sales", "the other reviewed flip holds");
    assert_eq!(
        applied.written, 3,
        "bidcliq, swivel and pair's second agent"
    );
    let urls: Vec<String> = db
        .audit_rows()
        .await
        .into_iter()
        .map(|row| row.agent_url)
        .collect();
    assert!(!urls.iter().any(|url| url == PAIR_C), "{urls:?}");
}

#[tokio::test]
async fn a_flip_whose_target_changed_before_the_locked_write_is_reported_not_written() {
    let db = TestDb::seeded(10).await;
    let holder = db.lock_profiles(&["bidcliq"]).await;
    let apply = spawn_backfill(&db, &["--apply"]);
    wait_for_blocked_tool(&db).await;
    // The crawler re-probes bidcliq while the backfill waits on the member's save.
    probe_now_says(&db, BIDCLIQ_URL, "creative").await;
    commit(holder).await;

    let (result, log) = apply.await.unwrap();
    let summary = result.unwrap();
    assert_eq!(summary.written, 1, "{log:?}");
    assert_eq!(
        db.agents_of("bidcliq").await[0]["type"],
        "buying",
        "the log showed buying -> sales; buying -> creative was never shown"
    );
    assert_eq!(db.agents_of("swivel").await[1]["type"], "sales");
    let skipped: Vec<(&str, &str, &str)> = log
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
        skipped,
        [
            ("bidcliq", "sales", "changed_since_plan"),
            ("bidcliq", "creative", "unplanned"),
        ]
    );
    let audit = db.audit_rows().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].agent_url, SWIVEL_URL);
}

#[tokio::test]
async fn an_element_replaced_before_the_locked_write_is_not_written_to() {
    let db = TestDb::seeded(0).await;
    with_pair(&db).await;
    let mut holder = db.lock_profiles(&["pair"]).await;
    let apply = spawn_backfill(&db, &["--apply", "--max-flips", "10"]);
    wait_for_blocked_tool(&db).await;
    set_agents(&mut holder, "pair", &pair_agents(PAIR_C)).await;
    commit(holder).await;

    let (result, log) = apply.await.unwrap();
    assert_eq!(result.unwrap().written, 3, "{log:?}");
    let agents = db.agents_of("pair").await;
    assert_eq!(
        (agents[0]["url"].as_str(), agents[0]["type"].as_str()),
        (Some(PAIR_C), Some("buying")),
        "{log:?}"
    );
    assert_eq!(agents[1]["type"], "sales");
    let pair: Vec<(u64, &str, &str)> = log
        .skipped()
        .into_iter()
        .filter(|skipped| skipped.profile == "pair")
        .map(|skipped| (skipped.index, skipped.url.as_str(), skipped.reason.as_str()))
        .collect();
    assert_eq!(
        pair,
        [(0, PAIR_A, "changed_since_plan"), (0, PAIR_C, "unplanned")]
    );
}

#[tokio::test]
async fn a_reordered_array_gets_nothing_written_by_the_backfill_or_a_revert() {
    let db = TestDb::seeded(10).await;
    let swivel = db.agents_of("swivel").await;
    let reordered = json!([swivel[1], swivel[0]]);
    // The backfill: reordered between its plan and its locked write.
    let mut holder = db.lock_profiles(&["swivel"]).await;
    let apply = spawn_backfill(&db, &["--apply"]);
    wait_for_blocked_tool(&db).await;
    set_agents(&mut holder, "swivel", &reordered).await;
    commit(holder).await;
    let (result, log) = apply.await.unwrap();
    assert_eq!(result.unwrap().written, 1, "bidcliq only: {log:?}");
    assert_eq!(db.agents_of("swivel").await, reordered);

    // A revert: swivel's flip is written, then the array is reordered by its member with another
    // agent of the written type at the flipped index. Neither element gets the old type back.
    let mut holder = db.lock_profiles(&[]).await;
    set_agents(&mut holder, "swivel", &swivel).await;
    commit(holder).await;
    let (applied, log) = backfill(&db.url, &["--apply"]).run().await;
    assert_eq!(applied.unwrap().written, 1, "swivel: {log:?}");
    let run_id = log.run_id();
    let written = db.agents_of("swivel").await;
    assert_eq!(written[1]["type"], "sales");
    let mut impostor = written[1].clone();
    impostor["url"] = json!("https://impostor.example/mcp");
    let member_reorder = json!([written[1], impostor]);
    let mut holder = db.lock_profiles(&[]).await;
    set_agents(&mut holder, "swivel", &member_reorder).await;
    commit(holder).await;
    let (reverted, log) = revert(&db.url, &[&run_id, "--apply"]).run().await;
    reverted.unwrap();
    assert_eq!(db.agents_of("swivel").await, member_reorder, "{log:?}");
    assert!(log
        .skipped()
        .iter()
        .any(|skipped| skipped.reason == "changed_since_run"));
}

#[tokio::test]
async fn revert_rechecks_under_the_lock_and_keeps_a_members_edit_made_meanwhile() {
    let db = TestDb::seeded(10).await;
    let (applied, log) = backfill(&db.url, &["--apply"]).run().await;
    assert_eq!(applied.unwrap().written, 2);
    let run_id = log.run_id();
    let mut holder = db.lock_profiles(&["bidcliq"]).await;
    let flags = [&run_id, "--apply", "--lock-timeout", "120s"];
    let revert = tokio::spawn(revert(&db.url, &flags).run());
    wait_for_blocked_tool(&db).await;
    // The member changes bidcliq's type after revert planned, before it could lock the row.
    sqlx::query(
        "UPDATE member_profiles SET agents = jsonb_set(agents, '{0,type}', '\"creative\"') \
         WHERE slug = 'bidcliq'",
    )
    .execute(&mut holder)
    .await
    .unwrap();
    commit(holder).await;

    let (result, log) = revert.await.unwrap();
    let summary = result.unwrap();
    assert_eq!(summary.written, 1, "{log:?}");
    assert_eq!(db.agents_of("bidcliq").await[0]["type"], "creative");
    assert_eq!(db.agents_of("swivel").await[1]["type"], "buying");
    let conflicts: Vec<&str> = log
        .skipped()
        .into_iter()
        .filter(|skipped| skipped.reason == "changed_since_run")
        .map(|skipped| skipped.profile.as_str())
        .collect();
    assert_eq!(conflicts, ["bidcliq"], "{log:?}");
}

async fn log_row(
    db: &TestDb,
    url: &str,
    new_type: &str,
    source: &str,
    days_ago: i32,
    notes: Value,
) {
    sqlx::query(
        "INSERT INTO type_reclassification_log \
             (agent_url, old_type, new_type, source, run_id, changed_at, notes) \
         VALUES ($1, 'buying', $2, $3, $4, now() - make_interval(days => $5), $6)",
    )
    .bind(url)
    .bind(new_type)
    .bind(source)
    .bind((source == "backfill_script").then_some("atb-earlier-run"))
    .bind(days_ago)
    .bind(notes)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn only_the_crawlers_own_rows_corroborate_a_flip() {
    let db = TestDb::seeded(5).await;
    // One crawler row for bidcliq, none for swivel; around them, rows of every other kind for
    // the same urls, later and agreeing with the flip: an earlier backfill, its revert, a
    // member's own edits.
    log_row(&db, BIDCLIQ_URL, "sales", "crawler_promote", 6, json!({})).await;
    for url in [BIDCLIQ_URL, SWIVEL_URL] {
        let tool = json!({"tool": "agent-type-backfill", "index": 0});
        log_row(&db, url, "sales", "backfill_script", 4, tool).await;
        let legacy = json!({"script": "backfill-agent-types.js"});
        log_row(&db, url, "sales", "backfill_script", 3, legacy).await;
        let reverts = json!({"tool": "agent-type-backfill", "reverts": "atb-earlier-run"});
        log_row(&db, url, "sales", "backfill_script", 2, reverts).await;
        log_row(&db, url, "sales", "member_write", 1, json!({})).await;
        log_row(&db, url, "creative", "member_write", 0, json!({})).await;
    }

    let (dry, log) = backfill(&db.url, &["--dry-run"]).run().await;
    dry.unwrap();
    let evidence = |profile: &str| log.flip_of(profile).crawler_disagreements.clone().unwrap();
    let bidcliq = evidence("bidcliq");
    assert_eq!(bidcliq.count, Some(1), "{bidcliq:?}");
    assert_eq!(bidcliq.first_at, bidcliq.last_at, "{bidcliq:?}");
    assert_eq!(
        bidcliq.last_inferred.as_deref(),
        Some("sales"),
        "{bidcliq:?}"
    );
    let first = bidcliq.first_at.unwrap();
    assert_eq!((chrono::Utc::now() - first).num_days(), 6);
    let swivel = evidence("swivel");
    assert_eq!(
        (
            swivel.count,
            swivel.first_at,
            swivel.last_at,
            swivel.last_inferred.as_deref()
        ),
        (Some(0), None, None, None),
        "{swivel:?}"
    );

    let (refused, log) = backfill(&db.url, &["--apply", "--min-corroboration", "1"])
        .writes_nothing(&db)
        .run()
        .await;
    assert_eq!(exit_code(&refused.unwrap_err()), 3);
    let held: Vec<(&str, &str)> = log
        .held()
        .into_iter()
        .map(|held| (held.profile.as_str(), held.reason.as_str()))
        .collect();
    assert_eq!(held, [("swivel", "uncorroborated")], "{log:?}");
    let (refused, _) = backfill(&db.url, &["--apply", "--min-corroboration", "2"])
        .writes_nothing(&db)
        .run()
        .await;
    assert_eq!(
        exit_code(&refused.unwrap_err()),
        3,
        "bidcliq has one crawler row"
    );
}
