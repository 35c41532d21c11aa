//! `revert` and `history` against a real PostgreSQL.

use crate::common;

use agent_type_backfill::error::exit_code;
use agent_type_backfill::support::seed::{self, NewProfile, NewSnapshot, BIDCLIQ_URL, SWIVEL_URL};
use common::{backfill, json_lines, revert, TestDb};
use serde_json::{json, Value};

/// Applies the backfill; its run id.
async fn apply(db: &TestDb) -> String {
    let (result, log) = backfill(&db.url, &["--apply"]).run().await;
    result.unwrap();
    log.run_id()
}

/// `history` in JSON: its result and its lines, which are not a run log's events.
async fn history(db: &TestDb, flags: &[&str]) -> (anyhow::Result<()>, Vec<Value>) {
    let mut flags = flags.to_vec();
    flags.extend_from_slice(&["--format", "json"]);
    let mut out = Vec::new();
    let result = common::history(&flags, &db.url, &mut out).await;
    (result, json_lines(&out))
}

#[tokio::test]
async fn revert_restores_what_still_holds_and_leaves_conflicts() {
    let db = TestDb::seeded(20).await;
    let applied = apply(&db).await;
    // A member changes swivel's agent after the run: that element is no longer the run's to undo.
    db.member_sets_type("swivel", 1, "creative").await;

    let (dry, log) = revert(&db.url, &[&applied, "--dry-run"])
        .writes_nothing(&db)
        .run()
        .await;
    let dry = dry.unwrap();
    assert_eq!((dry.flips, dry.skipped, dry.written), (1, 1, 0));
    assert_eq!(log.start().reverts.as_ref(), Some(&applied));
    let [flip] = log.flips()[..] else {
        panic!("one flip: {log:?}")
    };
    assert_eq!(
        (flip.profile.as_str(), &flip.from, flip.to.as_str()),
        ("bidcliq", &json!("sales"), "buying")
    );
    let [conflict] = log.skipped()[..] else {
        panic!("one conflict: {log:?}")
    };
    assert_eq!(
        (conflict.profile.as_str(), conflict.reason.as_str()),
        ("swivel", "changed_since_run")
    );

    let (applied_revert, log) = revert(&db.url, &[&applied, "--apply"]).run().await;
    assert_eq!(applied_revert.unwrap().written, 1);
    let revert_run = log.run_id();
    assert_eq!(db.agents_of("bidcliq").await[0]["type"], "buying");
    assert_eq!(db.agents_of("swivel").await[1]["type"], "creative");

    let audit = db.audit_rows().await;
    assert_eq!(audit.len(), 3);
    let undo = &audit[2];
    assert_eq!(undo.run_id.as_deref(), Some(revert_run.as_str()));
    assert_eq!(undo.agent_url, BIDCLIQ_URL);
    assert_eq!(
        (undo.old_type.as_deref(), undo.new_type.as_str()),
        (Some("sales"), "buying")
    );
    assert_eq!(undo.notes.as_ref().unwrap()["reverts"], applied.as_str());

    let (again, _) = revert(&db.url, &[&applied, "--apply"]).run().await;
    let again = again.unwrap();
    assert_eq!(
        (again.flips, again.written, again.skipped),
        (0, 0, 2),
        "nothing left to undo"
    );

    let (listed, runs) = history(&db, &[]).await;
    listed.unwrap();
    let by_id = |id: &str| {
        runs.iter()
            .find(|run| run["run_id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_id(&applied)["flips"], 2);
    assert_eq!(by_id(&applied)["profiles"], 2);
    assert_eq!(by_id(&applied)["reverts"], Value::Null);
    assert_eq!(by_id(&revert_run)["reverts"], applied.as_str());
    // The wire shape of `history`'s events, key by key (the log is a contract).
    let keys = |event: &Value| -> Vec<String> {
        let mut keys: Vec<String> = event.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(
        keys(&by_id(&applied)),
        [
            "event",
            "first_change",
            "flips",
            "last_change",
            "profiles",
            "reverts",
            "run_id"
        ]
    );

    let (one, rows) = history(&db, &[&applied]).await;
    one.unwrap();
    let urls: Vec<&str> = rows
        .iter()
        .map(|row| row["agent_url"].as_str().unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(urls.contains(&BIDCLIQ_URL) && urls.contains(&SWIVEL_URL));
    assert_eq!(
        keys(&rows[0]),
        [
            "agent_url",
            "changed_at",
            "event",
            "id",
            "member_id",
            "new_type",
            "notes",
            "old_type",
            "run_id"
        ]
    );
    assert_eq!(rows[0]["event"], "row");
    assert_eq!(rows[0]["run_id"], applied.as_str());
    assert_eq!(rows[0]["old_type"], "buying");
}

/// A JSON `null` type and a missing `type` key come back as they were, and the audit rows tell
/// them apart from each other and from the string "unknown".
#[tokio::test]
async fn revert_restores_null_as_null_and_removes_a_type_key_that_was_absent() {
    let db = TestDb::new().await;
    let agents = json!([
        {"url": "https://n1.example", "type": null},
        {"url": "https://n2.example"},
        {"url": "https://number.example", "type": 3, "keep": [1, 2]},
        {"url": "https://word.example", "type": "unknown"}
    ]);
    let profile = NewProfile {
        id: uuid::Uuid::from_u128(11),
        slug: "odd".into(),
        display_name: "Odd".into(),
        agents: Some(agents.clone()),
    };
    seed::insert(
        &db.pool,
        &[profile],
        &[
            NewSnapshot::new("https://n1.example", Some("sales")),
            NewSnapshot::new("https://n2.example", Some("signals")),
            NewSnapshot::new("https://number.example", Some("sales")),
            NewSnapshot::new("https://word.example", Some("creative")),
        ],
    )
    .await
    .unwrap();
    let stored_text = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT agents::text FROM member_profiles WHERE slug = 'odd'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let before = stored_text(&db).await;
    let applied = apply(&db).await;

    let audit = db.audit_rows().await;
    assert_eq!(audit.len(), 4);
    let notes_of = |url: &str| {
        audit
            .iter()
            .find(|row| row.agent_url == url)
            .unwrap()
            .notes
            .clone()
            .unwrap()
    };
    // The server's convention in old_type; the exact value in the notes.
    assert!(audit.iter().all(|row| row.old_type.as_deref()
        == Some(if row.agent_url.contains("number") {
            "3"
        } else {
            "unknown"
        })));
    let null = notes_of("https://n1.example");
    assert_eq!(
        (&null["type_key"], &null["from"]),
        (&json!("present"), &Value::Null)
    );
    assert!(null.as_object().unwrap().contains_key("from"));
    let missing = notes_of("https://n2.example");
    assert_eq!(missing["type_key"], "absent");
    assert!(!missing.as_object().unwrap().contains_key("from"));
    let word = notes_of("https://word.example");
    assert_eq!(
        (&word["type_key"], &word["from"]),
        (&json!("present"), &json!("unknown"))
    );

    let (dry, log) = revert(&db.url, &[&applied, "--dry-run"]).run().await;
    assert_eq!(dry.unwrap().flips, 4);
    let to_of = |url: &str| {
        let flips = log.flips();
        let flip = flips.iter().find(|flip| flip.url == url).unwrap();
        flip.to.clone()
    };
    assert_eq!(to_of("https://n1.example"), "null");
    assert_eq!(to_of("https://n2.example"), "(no type key)");

    let (reverted, _) = revert(&db.url, &[&applied, "--apply"]).run().await;
    assert_eq!(reverted.unwrap().written, 4);
    assert_eq!(db.agents_of("odd").await, agents);
    assert_eq!(
        stored_text(&db).await,
        before,
        "byte-identical as PostgreSQL stores it"
    );
    let undo_types: Vec<String> = db.audit_rows().await[4..]
        .iter()
        .map(|row| row.new_type.clone())
        .collect();
    assert_eq!(undo_types, ["unknown", "unknown", "3", "unknown"]);
}

/// Rows written before the distinction record an absent or null type as "unknown": a revert
/// restores the string, and its log says it cannot know which it was.
#[tokio::test]
async fn revert_of_an_old_row_restores_unknown_and_says_it_cannot_tell() {
    let db = TestDb::new().await;
    let profile = NewProfile {
        id: uuid::Uuid::from_u128(12),
        slug: "old".into(),
        display_name: "Old".into(),
        agents: Some(json!([{"url": "https://n1.example", "type": null}])),
    };
    seed::insert(
        &db.pool,
        &[profile],
        &[NewSnapshot::new("https://n1.example", Some("sales"))],
    )
    .await
    .unwrap();
    let applied = apply(&db).await;
    // What an earlier version wrote: no type_key, and "unknown" for the null.
    sqlx::query(
        "UPDATE type_reclassification_log \
         SET notes = (notes - 'type_key') || '{\"from\": \"unknown\"}'::jsonb",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (dry, text) = revert(&db.url, &[&applied, "--dry-run", "--format", "text"])
        .run()
        .await;
    dry.unwrap();
    assert!(
        text.text
            .contains("old row: \"unknown\" may have been no type key or null"),
        "{text:?}"
    );
    let (reverted, log) = revert(&db.url, &[&applied, "--apply"]).run().await;
    assert_eq!(reverted.unwrap().written, 1);
    assert_eq!(log.flips()[0].to, "unknown");
    assert_eq!(
        db.agents_of("old").await,
        json!([{"url": "https://n1.example", "type": "unknown"}])
    );
}

#[tokio::test]
async fn revert_is_held_to_the_threshold_and_unknown_runs_are_usage_errors() {
    let db = TestDb::seeded(5).await;
    let applied = apply(&db).await;
    let (refused, log) = revert(&db.url, &[&applied, "--apply", "--max-flips", "1"])
        .writes_nothing(&db)
        .run()
        .await;
    assert_eq!(exit_code(&refused.unwrap_err()), 3);
    assert!(log.summary().aborted);

    let (unknown, _) = revert(&db.url, &["atb-19700101T000000Z-00000000", "--dry-run"])
        .run()
        .await;
    let error = unknown.unwrap_err();
    assert_eq!(exit_code(&error), 2);
    assert!(format!("{error:#}").contains("'agent-type-backfill history'"));
    let (unknown, _) = history(&db, &["atb-19700101T000000Z-00000000"]).await;
    assert_eq!(exit_code(&unknown.unwrap_err()), 2);
}
