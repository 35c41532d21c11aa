//! The write path changes one key of one element and nothing else, so an UPDATE that wrote the
//! resolver's whole array fails here: the resolver rewrites a `null` or
//! missing `type` of an element it does not flip to "unknown" under an unclassified snapshot, so
//! writing its array would silently rewrite the other agents of every flipped profile.

use crate::common::{backfill, revert, TestDb};
use agent_type_backfill::support::seed::{self, NewProfile, NewSnapshot};
use serde_json::json;
use uuid::Uuid;

const STALE_URL: &str = "https://stale.example/mcp";

/// Element 0 flips (buying -> sales). Every other element carries something the resolver would
/// rewrite or normalise if it were allowed to write the array: a `null` type and a missing type
/// under unclassified snapshots, an unclassified `buying`, an invalid inferred type, unknown keys,
/// and numbers written as `1.50`, `1e+21` and beyond f64.
const AGENTS: &str = r#"[
  {"url": "https://stale.example/mcp", "type": "buying", "name": "Stale", "price": 1.50},
  {"url": "https://null-type.example", "type": null, "x-extra": {"nested": [1.50, 1e+21, null]}},
  {"url": "https://no-type.example", "price": 1.50, "big": 1e+21, "huge": 123456789012345678901234567890.000},
  {"url": "https://odd-probe.example", "type": null, "unknown_key": true, "ratio": 0.10},
  {"url": "https://self-declared.example", "type": "buying", "weight": 2.50E+3},
  {"url": "https://never-probed.example", "type": null},
  {"url": "https://never-probed-2.example", "note": "no type, no snapshot"},
  "a bare string",
  42.0
]"#;

async fn mixed_profile(db: &TestDb) -> Uuid {
    let id = Uuid::from_u128(0x13);
    let profile = NewProfile {
        id,
        slug: "mixed".into(),
        display_name: "Mixed".into(),
        agents: Some(json!([])),
    };
    let snapshots = [
        NewSnapshot::new(STALE_URL, Some("sales")),
        NewSnapshot::new("https://null-type.example", None),
        NewSnapshot::new("https://no-type.example", None),
        // Not a valid type: the resolver treats it as unclassified.
        NewSnapshot::new("https://odd-probe.example", Some("mystery")),
        NewSnapshot::new("https://self-declared.example", None),
    ];
    seed::insert(&db.pool, &[profile], &snapshots)
        .await
        .unwrap();
    // Stored from text so the numbers reach PostgreSQL exactly as written here.
    sqlx::query("UPDATE member_profiles SET agents = $1::jsonb WHERE id = $2")
        .bind(AGENTS)
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    id
}

async fn agents_text(db: &TestDb, id: Uuid) -> String {
    sqlx::query_scalar("SELECT agents::text FROM member_profiles WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn flipped_profile_keeps_null_and_missing_types_unknown_keys_and_numbers_byte_for_byte() {
    let db = TestDb::new().await;
    let id = mixed_profile(&db).await;
    let before = agents_text(&db, id).await;
    assert!(
        before.contains("1.50") && before.contains("1000000000000000000000"),
        "PostgreSQL keeps the numbers as written: {before}"
    );
    // What the row must hold afterwards: the stored value with exactly one key changed.
    let expected: String =
        sqlx::query_scalar("SELECT jsonb_set($1::jsonb, '{0,type}', '\"sales\"')::text")
            .bind(&before)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        expected,
        before.replacen(r#""type": "buying""#, r#""type": "sales""#, 1),
        "the expectation is the stored text with one value replaced"
    );

    let (summary, log) = backfill(&db.url, &["--apply"]).run().await;
    let summary = summary.unwrap();
    let flips: Vec<(u64, &str)> = log
        .flips()
        .into_iter()
        .map(|flip| (flip.index, flip.to.as_str()))
        .collect();
    assert_eq!(flips, [(0, "sales")], "one flip planned");
    assert_eq!((summary.flips, summary.written), (1, 1));

    let after = agents_text(&db, id).await;
    assert_eq!(after, expected, "only element 0's type may change");
    let same_value: bool = sqlx::query_scalar(
        "SELECT agents = $1::jsonb AND (agents #- '{0,type}') = ($2::jsonb #- '{0,type}') \
         FROM member_profiles WHERE id = $3",
    )
    .bind(&expected)
    .bind(&before)
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(same_value, "the jsonb value differs: {after}");
    let kinds: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT jsonb_typeof(e -> 'type') FROM member_profiles, \
         jsonb_array_elements(agents) WITH ORDINALITY AS a(e, i) WHERE id = $1 ORDER BY i",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let kinds: Vec<Option<&str>> = kinds.iter().map(Option::as_deref).collect();
    assert_eq!(
        kinds,
        [
            Some("string"),
            Some("null"),
            None,
            Some("null"),
            Some("string"),
            Some("null"),
            None,
            None,
            None
        ],
        "null types stay null and missing types stay missing"
    );

    // The revert restores the original bytes, too.
    let run_id = db.audit_rows().await[0].run_id.clone().unwrap();
    let (reverted, _) = revert(&db.url, &[&run_id, "--apply"]).run().await;
    let reverted = reverted.unwrap();
    assert_eq!(reverted.written, 1);
    assert_eq!(
        agents_text(&db, id).await,
        before,
        "revert restores every byte"
    );
}
