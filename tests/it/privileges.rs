//! Least privilege: roles granted exactly the statements RUNBOOK.md lists run every command, and a
//! role missing any one of them stops at preflight (exit 4) naming the privilege and its GRANT,
//! with nothing read or written.

use agent_type_backfill::domain::count;

use crate::common::deployment::{as_user, tool};
use crate::common::{Scratch, TestDb, Tool};

/// Each GRANT of RUNBOOK.md, by what it gives, with the role written `backfill` as there.
const SELECT_PROFILES: &str = "GRANT SELECT ON member_profiles TO backfill;";
const SELECT_SNAPSHOTS: &str = "GRANT SELECT ON agent_capabilities_snapshot TO backfill;";
const SELECT_LOG: &str = "GRANT SELECT ON type_reclassification_log TO backfill;";
const UPDATE_AGENTS: &str = "GRANT UPDATE (agents) ON member_profiles TO backfill;";
const INSERT_LOG: &str = "GRANT INSERT ON type_reclassification_log TO backfill;";
const USE_SEQUENCE: &str = "GRANT USAGE ON SEQUENCE type_reclassification_log_id_seq TO backfill;";

const DRY_RUN: &[&str] = &[SELECT_PROFILES, SELECT_SNAPSHOTS];
const READ_AUDIT: &[&str] = &[SELECT_PROFILES, SELECT_SNAPSHOTS, SELECT_LOG];
const APPLY: &[&str] = &[
    SELECT_PROFILES,
    SELECT_SNAPSHOTS,
    UPDATE_AGENTS,
    INSERT_LOG,
    USE_SEQUENCE,
];
const REVERT_APPLY: &[&str] = &[
    SELECT_PROFILES,
    SELECT_SNAPSHOTS,
    SELECT_LOG,
    UPDATE_AGENTS,
    INSERT_LOG,
    USE_SEQUENCE,
];

/// What preflight must name when `grant` is missing: the privilege, and the statement that fixes
/// it (with the role's name and, for the sequence, its schema-qualified name).
fn named_fix(grant: &str, role: &str) -> (String, String) {
    let fix = |statement: &str| statement.trim_end_matches(';').replace("backfill", role);
    match grant {
        SELECT_PROFILES => ("lacks SELECT on 'member_profiles'".into(), fix(grant)),
        SELECT_SNAPSHOTS => (
            "lacks SELECT on 'agent_capabilities_snapshot'".into(),
            fix(grant),
        ),
        SELECT_LOG => (
            "lacks SELECT on 'type_reclassification_log'".into(),
            fix(grant),
        ),
        UPDATE_AGENTS => (
            "lacks UPDATE on 'member_profiles' (column agents)".into(),
            fix(grant),
        ),
        INSERT_LOG => (
            "lacks INSERT on 'type_reclassification_log'".into(),
            fix(grant),
        ),
        USE_SEQUENCE => (
            "lacks USAGE on sequence 'public.type_reclassification_log_id_seq'".into(),
            fix("GRANT USAGE ON SEQUENCE public.type_reclassification_log_id_seq TO backfill"),
        ),
        other => panic!("unknown grant {other}"),
    }
}

async fn role_with(db: &TestDb, grants: &[&str]) -> String {
    let role = db.role("atb_least").await;
    for grant in grants {
        sqlx::query(&grant.replace("backfill", &role))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    role
}

#[test]
fn the_runbook_lists_exactly_these_grants() {
    let runbook =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/RUNBOOK.md")).unwrap();
    for grant in REVERT_APPLY {
        assert!(runbook.contains(grant), "RUNBOOK.md lacks `{grant}`");
    }
    let listed = runbook
        .lines()
        .filter(|line| line.trim_start().starts_with("GRANT "))
        .count();
    assert_eq!(listed, REVERT_APPLY.len(), "RUNBOOK.md lists other GRANTs");
}

#[tokio::test]
async fn roles_with_exactly_the_runbook_grants_run_every_command() {
    let db = TestDb::seeded(30).await;
    let reader = as_user(&db.url, &role_with(&db, DRY_RUN).await);
    let auditor = as_user(&db.url, &role_with(&db, READ_AUDIT).await);
    let writer = as_user(&db.url, &role_with(&db, APPLY).await);
    let reverter = as_user(&db.url, &role_with(&db, REVERT_APPLY).await);

    let dry = tool(&reader, &["--dry-run", "--format", "json"], &[]);
    dry.exits(0);
    let flips = dry.log().flips().len();
    assert!(flips > 0, "the seed has flips");

    let apply = tool(
        &writer,
        &[
            "--apply",
            "--format",
            "json",
            "--max-flips",
            &flips.to_string(),
        ],
        &[],
    );
    apply.exits(0);
    assert_eq!(apply.log().summary().written, count(flips));
    let run_id = apply.log().run_id();
    assert_eq!(db.audit_rows().await.len(), flips);

    for history in [vec!["history"], vec!["history", run_id.as_str()]] {
        let done = tool(&auditor, &history, &[]);
        assert_eq!(done.code(), 0, "{history:?}: {}", done.stderr);
        assert!(done.stdout.contains(&run_id), "{}", done.stdout);
    }
    // A plan carries the cluster's identity only where the user may read pg_control_system()
    // (anyone, unless an administrator revoked it, as here), as RUNBOOK.md says for the
    // replica-then-primary flow.
    sqlx::query("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
        .execute(&db.pool)
        .await
        .unwrap();
    let scratch = Scratch::new();
    let plan_path = scratch.join("plan.json");
    let plan_arg = plan_path.to_str().unwrap();
    let identified = role_with(&db, DRY_RUN).await;
    sqlx::query(&format!(
        "GRANT EXECUTE ON FUNCTION pg_control_system() TO {identified}"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    for (url, readable) in [(&reader, false), (&as_user(&db.url, &identified), true)] {
        let done = tool(url, &["--dry-run", "--plan-out", plan_arg], &[]);
        done.exits(0);
        let plan: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&plan_path).unwrap()).unwrap();
        assert_eq!(
            plan["target"]["system_identifier"].is_string(),
            readable,
            "{plan}"
        );
    }

    let revert_dry = tool(&auditor, &["revert", &run_id, "--dry-run"], &[]);
    revert_dry.exits(0);
    let revert = tool(
        &reverter,
        &[
            "revert",
            &run_id,
            "--apply",
            "--max-flips",
            &flips.to_string(),
        ],
        &[],
    );
    revert.exits(0);
    assert_eq!(db.audit_rows().await.len(), 2 * flips);
}

#[tokio::test]
async fn a_role_missing_any_one_grant_stops_at_preflight_naming_it_and_its_fix() {
    let db = TestDb::seeded(10).await;
    // An applied run for the revert and history commands to find.
    let apply = tool(
        &db.url,
        &["--apply", "--format", "json", "--max-flips", "100"],
        &[],
    );
    apply.exits(0);
    let run_id = apply.log().run_id();
    let before = db.dump().await;
    let commands: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["--dry-run"], DRY_RUN),
        (vec!["history"], READ_AUDIT),
        (vec!["revert", &run_id, "--dry-run"], READ_AUDIT),
        (vec!["--apply", "--max-flips", "100"], APPLY),
        (
            vec!["revert", &run_id, "--apply", "--max-flips", "100"],
            REVERT_APPLY,
        ),
    ];
    for (command, needed) in commands {
        for missing in needed.iter() {
            let granted: Vec<&str> = needed.iter().copied().filter(|g| g != missing).collect();
            let role = role_with(&db, &granted).await;
            let done = tool(&as_user(&db.url, &role), &command, &[]);
            assert_eq!(
                done.code(),
                4,
                "{command:?} without {missing}: {}",
                done.stderr
            );
            let (privilege, fix) = named_fix(missing, &role);
            assert!(
                done.stderr.contains(&privilege) && done.stderr.contains(&fix),
                "{command:?} without {missing}: expected `{privilege}` and `{fix}` in {}",
                done.stderr
            );
            assert!(
                !done.stderr.contains("point DATABASE_URL"),
                "a privilege is not a wrong database: {}",
                done.stderr
            );
            assert!(done.stdout.is_empty(), "{command:?}: {}", done.stdout);
        }
    }
    assert_eq!(db.dump().await, before, "nothing was written");
}

/// An identity column draws from a sequence too; preflight finds it the same way.
#[tokio::test]
async fn an_identity_id_column_needs_usage_on_its_sequence() {
    let db = TestDb::seeded(10).await;
    for statement in [
        "ALTER TABLE type_reclassification_log ALTER id DROP DEFAULT",
        "DROP SEQUENCE type_reclassification_log_id_seq",
        "ALTER TABLE type_reclassification_log ALTER id ADD GENERATED ALWAYS AS IDENTITY",
    ] {
        sqlx::query(statement).execute(&db.pool).await.unwrap();
    }
    let sequence: String =
        sqlx::query_scalar("SELECT pg_get_serial_sequence('type_reclassification_log', 'id')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let without = role_with(&db, &APPLY[..APPLY.len() - 1]).await;
    let refused = tool(
        &as_user(&db.url, &without),
        &["--apply", "--max-flips", "100"],
        &[],
    );
    refused.exits(4);
    refused.stderr_has(&format!("GRANT USAGE ON SEQUENCE {sequence} TO {without}"));
    let with = role_with(&db, APPLY).await;
    sqlx::query(&format!("GRANT USAGE ON SEQUENCE {sequence} TO {with}"))
        .execute(&db.pool)
        .await
        .unwrap();
    let applied = tool(
        &as_user(&db.url, &with),
        &["--apply", "--max-flips", "100"],
        &[],
    );
    applied.exits(0);
    assert!(!db.audit_rows().await.is_empty());
}

/// The two grants that look like the needed ones: SELECT on the audit sequence (nextval needs
/// USAGE or UPDATE), and UPDATE on other columns of member_profiles (enough for FOR UPDATE, not
/// for the write). Each is refused at preflight, before the plan, never at the first write.
#[tokio::test]
async fn near_miss_grants_are_refused_at_preflight_not_at_the_first_write() {
    let db = TestDb::seeded(10).await;
    let before = db.dump().await;
    let near_misses = [
        (
            USE_SEQUENCE,
            "GRANT SELECT ON SEQUENCE type_reclassification_log_id_seq TO backfill;",
        ),
        (
            UPDATE_AGENTS,
            "GRANT UPDATE (slug, display_name, updated_at) ON member_profiles TO backfill;",
        ),
    ];
    for (missing, instead) in near_misses {
        let mut granted: Vec<&str> = APPLY.iter().copied().filter(|g| *g != missing).collect();
        granted.push(instead);
        let role = role_with(&db, &granted).await;
        let done = tool(
            &as_user(&db.url, &role),
            &["--apply", "--max-flips", "100", "--format", "json"],
            &[],
        );
        assert_eq!(done.code(), 4, "{instead}: {}", done.stderr);
        let (privilege, fix) = named_fix(missing, &role);
        assert!(
            done.stderr.contains(&privilege) && done.stderr.contains(&fix),
            "{instead}: expected `{privilege}` and `{fix}` in {}",
            done.stderr
        );
        assert!(done.stdout.is_empty(), "nothing planned: {}", done.stdout);
    }
    assert_eq!(db.dump().await, before, "nothing was written");
}

/// Roles live on the whole server: a test's roles go when its database does, so a run against
/// a shared DATABASE_URL server leaves none behind.
#[tokio::test]
async fn the_roles_a_test_creates_are_dropped_with_its_database() {
    let db = TestDb::seeded(0).await;
    let role = role_with(&db, REVERT_APPLY).await;
    let admin = crate::common::shared_server().pool("postgres").await;
    let exists = || async {
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)")
            .bind(&role)
            .fetch_one(&admin)
            .await
            .unwrap()
    };
    assert!(exists().await);
    drop(db);
    assert!(!exists().await, "role {role} outlived its test database");
    admin.close().await;
}

/// `--max-replica-lag` reads the standbys' lag, which `pg_stat_replication` shows only to members
/// of `pg_read_all_stats`: an apply with it, as a role with only the apply's grants, stops at
/// preflight with the GRANT to run; with that grant it writes; a dry-run needs nothing more.
#[tokio::test]
async fn max_replica_lag_needs_pg_read_all_stats_at_preflight() {
    let db = TestDb::seeded(10).await;
    let role = role_with(&db, APPLY).await;
    let writer = as_user(&db.url, &role);
    let apply = [
        "--apply",
        "--format",
        "json",
        "--max-flips",
        "100",
        "--max-replica-lag",
        "5s",
    ];
    let refused = Tool::new(&apply)
        .database(&writer)
        .writes_nothing(&db)
        .status(4)
        .run();
    refused
        .stderr_has("--max-replica-lag")
        .stderr_has(&format!("GRANT pg_monitor TO {role}"));
    assert!(refused.stdout.is_empty(), "{}", refused.stdout);

    let dry = tool(&writer, &["--dry-run", "--max-replica-lag", "5s"], &[]);
    dry.exits(0);

    sqlx::query(&format!("GRANT pg_read_all_stats TO {role}"))
        .execute(&db.pool)
        .await
        .unwrap();
    let done = tool(&writer, &apply, &[]);
    done.exits(0);
    assert!(!db.audit_rows().await.is_empty());
}
