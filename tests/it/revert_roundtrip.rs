//! Apply then revert gives every profile back exactly: jsonb-equal, and byte-identical as
//! PostgreSQL prints it. A property over every conformance vector and a generated corpus of
//! awkward stored types (null, missing, "", numbers, objects, arrays, deep nesting) beside junk
//! elements, with held flips left by `--leave-held` so every other flip is written.

use crate::common;

use agent_type_backfill::support::seed::{self, NewProfile, NewSnapshot};
use common::{backfill, revert, TestDb};
use serde_json::{json, Value};
use std::collections::BTreeMap;

const VECTORS: &str = "tests/data/conformance/resolve_agent_types.json";

/// Each vector as one profile; urls get a per-vector prefix so snapshots of different vectors
/// cannot meet in the one snapshot table (equality within a vector is kept).
fn vector_profiles() -> (Vec<NewProfile>, BTreeMap<String, Option<String>>) {
    let text = std::fs::read_to_string(VECTORS).unwrap();
    let file: Value = serde_json::from_str(&text).unwrap();
    let mut profiles = Vec::new();
    let mut snapshots = BTreeMap::new();
    for (case_index, case) in file["cases"].as_array().unwrap().iter().enumerate() {
        let prefix = |url: &str| format!("c{case_index}/{url}");
        let mut agents = case["agents"].clone();
        if let Value::Array(elements) = &mut agents {
            for element in elements {
                if let Some(Value::String(url)) = element.get_mut("url") {
                    *url = prefix(url);
                }
            }
        }
        for row in case["snapshots"].as_array().unwrap() {
            snapshots.insert(
                prefix(row["agent_url"].as_str().unwrap()),
                row["inferred_type"].as_str().map(str::to_owned),
            );
        }
        profiles.push(NewProfile {
            id: uuid::Uuid::from_u128(0x1000 + case_index as u128),
            slug: format!("vector-{case_index}"),
            display_name: format!("Vector {case_index}"),
            agents: Some(agents),
        });
    }
    (profiles, snapshots)
}

/// Every awkward stored type under every kind of snapshot, with junk elements between them.
fn generated_profiles(snapshots: &mut BTreeMap<String, Option<String>>) -> Vec<NewProfile> {
    let mut deep = json!("core");
    for _ in 0..150 {
        deep = json!([deep]);
    }
    let stored: Vec<Option<Value>> = vec![
        None,
        Some(Value::Null),
        Some(json!("")),
        Some(json!("unknown")),
        Some(json!("buying")),
        Some(json!("sales")),
        Some(json!("si")),
        Some(json!("buyer")),
        Some(serde_json::from_str("1.50").unwrap()),
        Some(json!(0)),
        Some(serde_json::from_str("-1e+21").unwrap()),
        Some(json!(true)),
        Some(json!({"nested": {"type": "sales"}})),
        Some(json!(["sales", null])),
        Some(deep),
    ];
    let probes: [Option<Option<&str>>; 5] = [
        None,
        Some(None),
        Some(Some("sales")),
        Some(Some("signals")),
        Some(Some("mystery")),
    ];
    let junk = [
        json!("a bare string"),
        json!(42.0),
        json!(null),
        json!([{"url": 1}]),
    ];
    let mut profiles = Vec::new();
    for (probe_index, probe) in probes.iter().enumerate() {
        let mut agents = Vec::new();
        for (type_index, stored) in stored.iter().enumerate() {
            let url = format!("https://g{probe_index}-{type_index}.example");
            let mut element = json!({"url": url, "keep": [1.50, {"z": null}]});
            if let Some(stored) = stored {
                element["type"] = stored.clone();
            }
            agents.push(element);
            agents.push(junk[type_index % junk.len()].clone());
            if let Some(inferred) = probe {
                snapshots.insert(url, inferred.map(str::to_owned));
            }
        }
        profiles.push(NewProfile {
            id: uuid::Uuid::from_u128(0x9000 + probe_index as u128),
            slug: format!("generated-{probe_index}"),
            display_name: format!("Generated {probe_index}"),
            agents: Some(Value::Array(agents)),
        });
    }
    profiles
}

async fn profiles_text(db: &TestDb) -> Vec<(uuid::Uuid, Option<String>)> {
    sqlx::query_as("SELECT id, agents::text FROM member_profiles ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn apply_then_revert_returns_every_profile_exactly_as_stored() {
    let db = TestDb::new().await;
    let (mut profiles, mut snapshots) = vector_profiles();
    profiles.extend(generated_profiles(&mut snapshots));
    let snapshots: Vec<NewSnapshot> = snapshots
        .iter()
        .map(|(url, inferred)| NewSnapshot::new(url, inferred.as_deref()))
        .collect();
    seed::insert(&db.pool, &profiles, &snapshots).await.unwrap();
    let before = profiles_text(&db).await;
    // The jsonb values themselves, kept server-side: a 150-deep type is past a client decoder.
    sqlx::query("CREATE TABLE profiles_before AS SELECT id, agents FROM member_profiles")
        .execute(&db.pool)
        .await
        .unwrap();

    let scratch = common::Scratch::new();
    let plan_arg = &scratch.arg("plan.json");
    let max = "100000";
    let (dry, _) = backfill(
        &db.url,
        &["--dry-run", "--plan-out", plan_arg, "--max-flips", max],
    )
    .run()
    .await;
    assert!(
        dry.is_err(),
        "the corpus holds flips (unrecognised and retired types)"
    );
    let flags = [
        "--apply",
        "--plan",
        plan_arg,
        "--leave-held",
        "--max-flips",
        max,
    ];
    let (applied, log) = backfill(&db.url, &flags).run().await;
    let applied = applied.unwrap();
    assert!(applied.written > 500 && applied.held > 0, "{applied:?}");
    assert_ne!(profiles_text(&db).await, before);
    let run_id = log.run_id();

    let (reverted, _) = revert(&db.url, &[&run_id, "--apply", "--max-flips", max])
        .run()
        .await;
    assert_eq!(reverted.unwrap().written, applied.written);

    let after = profiles_text(&db).await;
    let changed: Vec<_> = before
        .iter()
        .zip(&after)
        .filter(|(was, now)| was != now)
        .map(|(was, now)| format!("{}: {:?} -> {:?}", was.0, was.1, now.1))
        .collect();
    assert!(
        changed.is_empty(),
        "{} profiles differ:\n{}",
        changed.len(),
        changed.join("\n")
    );
    let equal: bool = sqlx::query_scalar(
        "SELECT count(*) = $1 AND bool_and(p.agents IS NOT DISTINCT FROM b.agents) \
         FROM member_profiles p JOIN profiles_before b USING (id)",
    )
    .bind(i64::try_from(before.len()).unwrap())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(equal, "jsonb-equal");
}
