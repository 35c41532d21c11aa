//! `revert` and `history` against a real PostgreSQL.

mod common;

use agent_type_backfill::audit;
use agent_type_backfill::backfill::execute;
use agent_type_backfill::cli::{Cli, Command};
use agent_type_backfill::error::exit_code;
use agent_type_backfill::report::Summary;
use agent_type_backfill::seed::{self, NewProfile, NewSnapshot, BIDCLIQ_URL, SWIVEL_URL};
use clap::Parser;
use common::{args, events, TestDb};
use serde_json::{json, Value};

async fn apply(db: &TestDb) -> String {
    let mut out = Vec::new();
    execute(&args(&["--apply", "--format", "json"]), &db.url, &mut out)
        .await
        .unwrap();
    events(&out)[0]["run_id"].as_str().unwrap().to_owned()
}

async fn revert(db: &TestDb, flags: &[&str]) -> (anyhow::Result<Summary>, Vec<Value>) {
    common::revert(&db.url, flags).await
}

async fn history(db: &TestDb, flags: &[&str]) -> (anyhow::Result<()>, Vec<Value>) {
    let mut argv = vec!["agent-type-backfill", "history"];
    argv.extend_from_slice(flags);
    argv.extend_from_slice(&["--format", "json"]);
    let Some(Command::History(history_args)) = Cli::try_parse_from(argv).unwrap().command else {
        unreachable!("parsed a history command line")
    };
    let mut out = Vec::new();
    let result = audit::history(&history_args, &db.url, &mut out).await;
    (result, events(&out))
}

#[tokio::test]
async fn revert_restores_what_still_holds_and_leaves_conflicts() {
    let db = TestDb::seeded(20).await;
    let applied = apply(&db).await;
    // A member changes swivel's agent after the run: that element is no longer the run's to undo.
    db.member_sets_type("swivel", 1, "creative").await;
    let after_member_edit = db.dump().await;

    let (dry, log) = revert(&db, &[&applied, "--dry-run"]).await;
    let dry = dry.unwrap();
    assert_eq!((dry.flips, dry.skipped, dry.written), (1, 1, 0));
    assert_eq!(log[0]["reverts"], applied.as_str());
    let flip = log.iter().find(|e| e["event"] == "flip").unwrap();
    assert_eq!(
        (&flip["profile"], &flip["from"], &flip["to"]),
        (&json!("bidcliq"), &json!("sales"), &json!("buying"))
    );
    let conflict = log.iter().find(|e| e["event"] == "skipped").unwrap();
    assert_eq!(conflict["profile"], "swivel");
    assert_eq!(conflict["reason"], "changed_since_run");
    assert_eq!(
        db.dump().await,
        after_member_edit,
        "a dry-run revert writes nothing"
    );

    let (applied_revert, log) = revert(&db, &[&applied, "--apply"]).await;
    assert_eq!(applied_revert.unwrap().written, 1);
    let revert_run = log[0]["run_id"].as_str().unwrap().to_owned();
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

    let (again, _) = revert(&db, &[&applied, "--apply"]).await;
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

    let (one, rows) = history(&db, &[&applied]).await;
    one.unwrap();
    let urls: Vec<&str> = rows
        .iter()
        .map(|row| row["agent_url"].as_str().unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(urls.contains(&BIDCLIQ_URL) && urls.contains(&SWIVEL_URL));
}

#[tokio::test]
async fn revert_restores_missing_and_non_string_types_as_recorded() {
    let db = TestDb::new().await;
    let profile = NewProfile {
        id: uuid::Uuid::from_u128(11),
        slug: "odd".into(),
        display_name: "Odd".into(),
        agents: Some(json!([
            {"url": "https://number.example", "type": 3, "keep": [1, 2]},
            {"url": "https://missing.example"}
        ])),
    };
    seed::insert(
        &db.pool,
        &[profile],
        &[
            NewSnapshot::new("https://number.example", Some("sales")),
            NewSnapshot::new("https://missing.example", Some("signals")),
        ],
    )
    .await
    .unwrap();
    let applied = apply(&db).await;
    let (reverted, _) = revert(&db, &[&applied, "--apply"]).await;
    assert_eq!(reverted.unwrap().written, 2);
    assert_eq!(
        db.agents_of("odd").await,
        json!([
            {"url": "https://number.example", "type": 3, "keep": [1, 2]},
            {"url": "https://missing.example", "type": "unknown"}
        ]),
        "the number comes back as a number; a missing type comes back as 'unknown'"
    );
}

#[tokio::test]
async fn revert_is_held_to_the_threshold_and_unknown_runs_are_usage_errors() {
    let db = TestDb::seeded(5).await;
    let applied = apply(&db).await;
    let before = db.dump().await;
    let (refused, log) = revert(&db, &[&applied, "--apply", "--max-flips", "1"]).await;
    assert_eq!(exit_code(&refused.unwrap_err()), 3);
    assert_eq!(log.last().unwrap()["aborted"], true);
    assert_eq!(db.dump().await, before);

    let (unknown, _) = revert(&db, &["atb-19700101T000000Z-00000000", "--dry-run"]).await;
    let error = unknown.unwrap_err();
    assert_eq!(exit_code(&error), 2);
    assert!(format!("{error:#}").contains("'agent-type-backfill history'"));
    let (unknown, _) = history(&db, &["atb-19700101T000000Z-00000000"]).await;
    assert_eq!(exit_code(&unknown.unwrap_err()), 2);
}
