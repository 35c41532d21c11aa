//! Read-only targets: a real streaming standby of a throwaway primary, made with
//! `pg_basebackup -R` (or, where the server build has none, from a copy of the cleanly stopped
//! primary), and a role whose transactions are read-only by default. Writes stop at preflight;
//! a plan made on the standby applies on its primary.

use crate::common::deployment::{as_user, registry_on, tool};
use crate::common::{events, TestDb};
use agent_type_backfill::support::ephemeral::EphemeralPostgres;
use serde_json::Value;

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

    let scratch = std::env::temp_dir().join(format!("atb-standby-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let plan_path = scratch.join("replica-plan.json");
    let plan_arg = plan_path.to_str().unwrap();
    let dry = tool(
        &on_standby,
        &["--dry-run", "--format", "json", "--plan-out", plan_arg],
        &[],
    );
    assert_eq!(dry.code(), 0, "{}", dry.stderr);
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
    assert_eq!(apply.code(), 0, "{}", apply.stderr);
    let summary = events(apply.stdout.as_bytes())
        .into_iter()
        .find(|event| event["event"] == "summary")
        .unwrap();
    assert_eq!(summary["written"], planned);
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
    assert_eq!(refused.code(), 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("(a standby)"), "{}", refused.stderr);
    std::fs::remove_dir_all(scratch).unwrap();
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
    let before = db.dump().await;
    let url = as_user(&db.url, &role);
    let done = tool(&url, &["--apply", "--max-flips", "100"], &[]);
    assert_eq!(done.code(), 4, "{}", done.stderr);
    assert!(
        done.stderr.contains("this session is read-only")
            && done.stderr.contains("default_transaction_read_only"),
        "{}",
        done.stderr
    );
    assert!(
        !done.stderr.contains("point DATABASE_URL"),
        "{}",
        done.stderr
    );
    assert!(done.stdout.is_empty(), "{}", done.stdout);
    assert_eq!(db.dump().await, before);

    // Reading is what such a role is for.
    let dry = tool(&url, &["--dry-run"], &[]);
    assert_eq!(dry.code(), 0, "{}", dry.stderr);
}
