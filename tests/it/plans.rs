//! Reviewed plans: `--dry-run --plan-out` and `--apply --plan`, against a real PostgreSQL.

use crate::common;

use agent_type_backfill::error::exit_code;
use agent_type_backfill::plan_file::PlanFile;
use agent_type_backfill::support::seed::{self, NewProfile, BIDCLIQ_URL, SWIVEL_URL};
use common::{backfill, Scratch, TestDb};
use serde_json::{json, Value};

#[tokio::test]
async fn reviewed_plan_records_the_flips_and_an_apply_writes_exactly_them() {
    let db = TestDb::seeded(20).await;
    let scratch = Scratch::new();
    let path = scratch.arg("plan.json");
    // Trust authentication ignores the password; the tool must still never write it anywhere.
    let url_with_password = db.url.replacen("postgres@", "postgres:Sup3rSecret@", 1);
    let (dry, log) = backfill(&url_with_password, &["--dry-run", "--plan-out", &path])
        .run()
        .await;
    assert_eq!(dry.unwrap().flips, 2);
    assert_eq!(log.plan_written().map(|written| written.flips), Some(2));

    let plan = PlanFile::read(path.as_ref()).unwrap();
    assert_eq!(plan.target.database, db.name);
    assert!(
        plan.target.system_identifier.is_some(),
        "readable as superuser"
    );
    assert_eq!(plan.counts.flips, 2);
    assert_eq!(plan.counts.profiles_scanned, 31);
    let urls: Vec<&str> = plan.flips.iter().map(|f| f.at.flip.url.as_str()).collect();
    assert!(urls.contains(&BIDCLIQ_URL) && urls.contains(&SWIVEL_URL));
    assert!(plan.flips.iter().all(|f| f.last_discovered.is_some()));
    assert!(!std::fs::read_to_string(&path).unwrap().contains("password"));

    let (applied, log) = backfill(
        &url_with_password,
        &["--apply", "--plan", &path, "--format", "text"],
    )
    .run()
    .await;
    let applied = applied.unwrap();
    assert!(!log.text.contains("Sup3rSecret"));
    assert_eq!((applied.flips, applied.written), (2, 2));
    let audit = db.audit_rows().await;
    assert_eq!(audit.len(), 2);
    for row in audit {
        assert!(!row.notes.unwrap().to_string().contains("Sup3rSecret"));
    }
}

#[tokio::test]
async fn apply_with_plan_writes_only_what_still_holds_and_lists_the_rest() {
    let db = TestDb::seeded(20).await;
    let scratch = Scratch::new();
    let path = scratch.arg("plan.json");
    backfill(&db.url, &["--dry-run", "--plan-out", &path])
        .run()
        .await
        .0
        .unwrap();
    // After review: a member fixes bidcliq by hand, and a new legacy type appears elsewhere.
    db.member_sets_type("bidcliq", 0, "creative").await;
    let newcomer = NewProfile {
        id: uuid::Uuid::from_u128(5),
        slug: "newcomer".into(),
        display_name: "Newcomer".into(),
        agents: Some(json!([{"url": "https://new.example", "type": "buyer"}])),
    };
    seed::insert(&db.pool, &[newcomer], &[]).await.unwrap();

    let (applied, log) = backfill(&db.url, &["--apply", "--plan", &path]).run().await;
    let applied = applied.unwrap();
    assert_eq!(
        (
            applied.flips,
            applied.written,
            applied.skipped,
            applied.unplanned
        ),
        (1, 1, 1, 2),
        "bidcliq's reviewed flip no longer holds; its new flip and the newcomer were not reviewed"
    );
    let mut departures: Vec<(&str, &str)> = log
        .skipped()
        .into_iter()
        .map(|skipped| (skipped.profile.as_str(), skipped.reason.as_str()))
        .collect();
    departures.sort();
    assert_eq!(
        departures,
        [
            ("bidcliq", "changed_since_plan"),
            ("bidcliq", "unplanned"),
            ("newcomer", "unplanned"),
        ]
    );
    let audit = db.audit_rows().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].agent_url, SWIVEL_URL);
    assert_eq!(db.agents_of("newcomer").await[0]["type"], "buyer");
}

#[tokio::test]
async fn plans_for_another_database_or_too_old_are_refused_with_nothing_written() {
    let made_on = TestDb::seeded(5).await;
    let other = TestDb::seeded(5).await;
    let scratch = Scratch::new();
    let path = scratch.arg("plan.json");
    backfill(&made_on.url, &["--dry-run", "--plan-out", &path])
        .run()
        .await
        .0
        .unwrap();

    let (refused, log) = backfill(&other.url, &["--apply", "--plan", &path])
        .writes_nothing(&other)
        .run()
        .await;
    let error = refused.unwrap_err();
    assert_eq!(exit_code(&error), 2);
    assert!(format!("{error:#}").contains(&format!("database={}", made_on.name)));
    assert!(log.is_empty(), "refused before anything was read");

    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let flags = ["--apply", "--plan", &path, "--plan-max-age", "10ms"];
    let (too_old, _) = backfill(&made_on.url, &flags).run().await;
    let error = too_old.unwrap_err();
    assert_eq!(exit_code(&error), 2);
    assert!(
        format!("{error:#}").contains("more than --plan-max-age"),
        "{error:#}"
    );

    let (over, _) = backfill(
        &made_on.url,
        &["--apply", "--plan", &path, "--max-flips", "1"],
    )
    .run()
    .await;
    assert_eq!(
        exit_code(&over.unwrap_err()),
        3,
        "the threshold holds for what would be written"
    );
    assert!(made_on.audit_rows().await.is_empty());
}

/// A flip a guard held in the reviewed dry-run stays held when that plan is applied, even by an
/// apply that forgot the guard's flag; the plan file names the rule and the held reason.
#[tokio::test]
async fn a_flip_held_in_the_reviewed_plan_stays_held_in_its_apply() {
    let db = TestDb::seeded(5).await;
    let scratch = Scratch::new();
    let path = scratch.arg("plan.json");
    let (dry, log) = backfill(
        &db.url,
        &["--dry-run", "--max-probe-age", "24h", "--plan-out", &path],
    )
    .run()
    .await;
    assert_eq!(exit_code(&dry.unwrap_err()), 3);
    assert_eq!(log.held().len(), 2);
    let plan = PlanFile::read(path.as_ref()).unwrap();
    assert!(
        plan.flips.iter().all(|f| f.held.is_some()),
        "{:?}",
        plan.flips
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"held\": \"stale_probe\""), "{text}");
    assert!(
        text.contains("\"commit\": \"4439b1871329488ce24b213e88d855849fb41187\""),
        "{text}"
    );
    assert!(text.contains("\"crawler_disagreements\": {"), "{text}");

    let (applied, log) = backfill(&db.url, &["--apply", "--plan", &path])
        .writes_nothing(&db)
        .run()
        .await;
    assert_eq!(exit_code(&applied.unwrap_err()), 3);
    let held = log.held();
    assert_eq!(held.len(), 2, "{log:?}");
    assert!(held.iter().all(|held| held.reason == "stale_probe"));
}

/// A reviewed plan is applied only as `--plan-out` wrote it: a flip removed, a flip added or a
/// `to` changed by hand is refused with exit 2 before any table is read, and nothing is written.
/// Formatting is not content: the same plan re-indented, compacted or with its keys reordered
/// still applies.
#[tokio::test]
async fn an_edited_plan_is_refused_and_a_reformatted_one_applies() {
    let db = TestDb::seeded(20).await;
    let scratch = Scratch::new();
    let path = scratch.arg("plan.json");
    backfill(&db.url, &["--dry-run", "--plan-out", &path])
        .run()
        .await
        .0
        .unwrap();
    let written = std::fs::read_to_string(&path).unwrap();
    let original: Value = serde_json::from_str(&written).unwrap();
    assert!(original["digest"]
        .as_str()
        .is_some_and(|digest| digest.starts_with("sha256:") && digest.len() == 7 + 64));

    let edited = scratch.arg("plan.edited.json");
    type Edit = (&'static str, fn(&mut Value));
    let edits: [Edit; 4] = [
        ("a flip removed", |plan| {
            plan["flips"].as_array_mut().unwrap().pop();
        }),
        ("a flip added", |plan| {
            let mut copy = plan["flips"][0].clone();
            copy["index"] = json!(7);
            plan["flips"].as_array_mut().unwrap().push(copy);
        }),
        ("a to changed", |plan| {
            plan["flips"][0]["to"] = json!("creative")
        }),
        ("a number rewritten", |plan| {
            plan["counts"]["flips"] = json!(3);
        }),
    ];
    for (what, edit) in edits {
        let mut plan = original.clone();
        edit(&mut plan);
        std::fs::write(&edited, serde_json::to_string_pretty(&plan).unwrap()).unwrap();
        let (refused, log) = backfill(&db.url, &["--apply", "--plan", &edited])
            .writes_nothing(&db)
            .run()
            .await;
        let error = refused.unwrap_err();
        assert_eq!(exit_code(&error), 2, "{what}: {error:#}");
        let message = format!("{error:#}");
        assert!(
            message.contains("was changed after --plan-out wrote it")
                && message.contains(original["digest"].as_str().unwrap()),
            "{what}: {message}"
        );
        assert!(log.is_empty(), "{what}: refused before anything was read");
    }

    // Compact, one line, keys in serde_json's sorted order: only the formatting differs.
    std::fs::write(&edited, original.to_string()).unwrap();
    assert_ne!(std::fs::read_to_string(&edited).unwrap(), written);
    let (applied, _) = backfill(&db.url, &["--apply", "--plan", &edited])
        .run()
        .await;
    assert_eq!(applied.unwrap().written, 2);
}

/// A staging registry with two flips to write and one held for a retired type. Without
/// `--leave-held` every apply writes nothing (exit 3); with it and the reviewed plan, exactly the
/// two are written, the held one is listed and left, and the audit notes say the run left it.
/// `--leave-held` without `--plan` is a usage error.
#[tokio::test]
async fn leave_held_writes_exactly_the_reviewed_flips_that_are_not_held() {
    let db = TestDb::seeded(20).await;
    let url = "https://old-probe.example/mcp";
    let profile = NewProfile {
        id: uuid::Uuid::from_u128(0x52),
        slug: "old-probe".into(),
        display_name: "Old probe".into(),
        agents: Some(json!([{"url": url, "type": "sales"}])),
    };
    seed::insert(
        &db.pool,
        &[profile],
        &[seed::NewSnapshot::new(url, Some("si"))],
    )
    .await
    .unwrap();
    let scratch = Scratch::new();
    let path = scratch.arg("plan.json");
    let (dry, _) = backfill(&db.url, &["--dry-run", "--plan-out", &path])
        .run()
        .await;
    assert_eq!(exit_code(&dry.unwrap_err()), 3);

    let no_plan = agent_type_backfill::config::BackfillConfig::from_cli(&common::args(&[
        "--apply",
        "--leave-held",
    ]))
    .unwrap_err();
    assert_eq!(exit_code(&no_plan.clone().into()), 2);
    assert!(
        no_plan.to_string().contains("--leave-held needs --plan"),
        "{no_plan}"
    );
    // Without --leave-held nothing is written.
    let (without, _) = backfill(&db.url, &["--apply", "--plan", &path])
        .writes_nothing(&db)
        .run()
        .await;
    assert_eq!(exit_code(&without.unwrap_err()), 3);

    let (left, log) = backfill(&db.url, &["--apply", "--plan", &path, "--leave-held"])
        .run()
        .await;
    let left = left.unwrap();
    assert_eq!((left.flips, left.held, left.written), (3, 1, 2));
    let [held] = log.held()[..] else {
        panic!("one held flip: {log:?}")
    };
    assert_eq!(
        (held.url.as_str(), held.reason.as_str()),
        (url, "retired_inferred_type")
    );
    assert_eq!(log.summary().held, 1);
    assert!(log.start().leave_held, "the header records it");
    assert_eq!(db.agents_of("old-probe").await[0]["type"], "sales");
    let audit = db.audit_rows().await;
    let urls: Vec<&str> = audit.iter().map(|row| row.agent_url.as_str()).collect();
    assert_eq!(audit.len(), 2);
    assert!(urls.contains(&BIDCLIQ_URL) && urls.contains(&SWIVEL_URL));
    for row in &audit {
        let notes = row.notes.as_ref().unwrap();
        assert_eq!(
            (&notes["leave_held"], &notes["held_left"]),
            (&json!(true), &json!(1))
        );
    }
}
