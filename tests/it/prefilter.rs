//! The server-side pass (`db::plan_chunk`, the statement of one planning chunk) against every conformance vector,
//! inside PostgreSQL. The pass only chooses which profiles the Rust resolver reads, so it must
//! never leave out a profile with a flip; it should also name no profile without one, and count
//! malformed columns and untouchable elements exactly as the resolver does.

use crate::common;

use std::collections::HashMap;

use agent_type_backfill::db;
use agent_type_backfill::resolver::AgentsColumn;
use common::TestDb;
use serde_json::Value;
use uuid::Uuid;

const VECTORS: &str = "tests/data/conformance/resolve_agent_types.json";

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(VECTORS).expect("read the conformance vectors");
    let mut file: Value = serde_json::from_str(&text).expect("parse the conformance vectors");
    let Value::Array(cases) = file["cases"].take() else {
        panic!("no cases array")
    };
    cases
}

/// What the server pass said about one profile holding `agents`, given `snapshots`.
#[derive(Debug, PartialEq)]
struct ServerView {
    candidate: bool,
    malformed: bool,
    untouchable: u64,
}

async fn server_view(pool: &sqlx::PgPool, agents: &Value, snapshots: &Value) -> ServerView {
    let connection = pool.acquire().await.unwrap();
    let mut transaction = db::Transaction::begin_on(
        connection,
        agent_type_backfill::db::Deadlines::new(None, std::time::Duration::from_secs(600)),
        None,
    )
    .await
    .unwrap();
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO organizations (workos_organization_id, name) VALUES ('org_vector', 'v')",
    )
    .execute(&mut transaction)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO member_profiles (id, workos_organization_id, display_name, slug, agents) \
         VALUES ($1, 'org_vector', 'v', 'vector', $2::text::jsonb)",
    )
    .bind(id)
    .bind(agents.to_string())
    .execute(&mut transaction)
    .await
    .unwrap();
    let rows = snapshots.as_array().expect("snapshots array");
    let urls: Vec<&str> = rows
        .iter()
        .map(|row| row["agent_url"].as_str().unwrap())
        .collect();
    let types: Vec<Option<&str>> = rows
        .iter()
        .map(|row| row["inferred_type"].as_str())
        .collect();
    sqlx::query(
        "INSERT INTO agent_capabilities_snapshot (agent_url, protocol, inferred_type) \
         SELECT url, 'mcp', inferred FROM unnest($1::text[], $2::text[]) AS s(url, inferred)",
    )
    .bind(&urls)
    .bind(&types)
    .execute(&mut transaction)
    .await
    .unwrap();

    let found = db::plan_chunk(&mut transaction, Uuid::nil(), Uuid::max(), 10)
        .await
        .unwrap();
    transaction.rollback().await.unwrap();
    assert_eq!(found.profiles, 1);
    assert_eq!(found.last_id, Some(id));
    assert!(found.candidates.is_empty() || found.candidates == [id]);
    ServerView {
        candidate: !found.candidates.is_empty(),
        malformed: found.malformed == 1,
        untouchable: found.untouchable_elements,
    }
}

fn resolver_view(case: &Value) -> ServerView {
    let snapshots: HashMap<String, Option<String>> = case["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["agent_url"].as_str().unwrap().to_owned(),
                row["inferred_type"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let verdict = AgentsColumn::parse(&case["agents"].to_string())
        .unwrap()
        .verdict(&snapshots);
    ServerView {
        candidate: !verdict.flips.is_empty(),
        malformed: verdict.malformed,
        untouchable: verdict.untouchable_elements as u64,
    }
}

#[tokio::test]
async fn the_server_pass_names_exactly_the_profiles_with_flips_on_every_vector() {
    let db = TestDb::new().await;
    let cases = cases();
    assert_eq!(cases.len(), 787, "the vector file changed size");
    let (mut missed, mut extra, mut miscounted) = (Vec::new(), Vec::new(), Vec::new());
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let has_flips = !case["flips"].as_array().unwrap().is_empty();
        let server = server_view(&db.pool, &case["agents"], &case["snapshots"]).await;
        let resolver = resolver_view(case);
        assert_eq!(
            resolver.candidate, has_flips,
            "{name}: the resolver disagrees with the vector"
        );
        match (has_flips, server.candidate) {
            (true, false) => missed.push(name),
            (false, true) => extra.push(name),
            _ => {}
        }
        if (server.malformed, server.untouchable) != (resolver.malformed, resolver.untouchable) {
            miscounted.push(format!("{name}: server {server:?}, resolver {resolver:?}"));
        }
    }
    assert!(
        missed.is_empty(),
        "the server pass would miss the flips of {missed:?}"
    );
    assert!(
        extra.is_empty(),
        "the server pass names profiles without flips: {extra:?}"
    );
    assert!(miscounted.is_empty(), "counts differ: {miscounted:#?}");
}

/// Regression: a `url` that is a number is junk to the resolver, yet its text ("5") can equal a
/// snapshot's `agent_url`; the join must not turn it into a candidate.
#[tokio::test]
async fn a_numeric_url_matching_a_snapshot_stays_untouchable() {
    let db = TestDb::new().await;
    let agents = serde_json::json!([{"url": 5, "type": "buying"}]);
    let snapshots = serde_json::json!([{"agent_url": "5", "inferred_type": "sales"}]);
    let view = server_view(&db.pool, &agents, &snapshots).await;
    assert_eq!(
        view,
        ServerView {
            candidate: false,
            malformed: false,
            untouchable: 1
        }
    );
}
