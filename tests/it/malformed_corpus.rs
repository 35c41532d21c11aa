//! Every malformed shape the `agents` column can hold, mixed into an ordinary registry, through a
//! real `--apply`. The rule decides what may change; everything else must come back byte for byte.

use crate::common;

use std::collections::{BTreeMap, HashMap};

use agent_type_backfill::support::seed::{self, NewProfile, NewSnapshot, BIDCLIQ_URL, SWIVEL_URL};
use common::{backfill, TestDb};
use serde_json::{json, Value};
use uuid::Uuid;

/// Probed and classified: a legacy or odd stored type here must become 'sales'.
const PROBED_SALES: &str = "https://corpus-probed.example/mcp";
/// Probed but not classified: anything but 'buying' becomes 'unknown'.
const PROBED_UNCLASSIFIED: &str = "https://corpus-unclassified.example/mcp";
/// Control characters (BEL, ESC, US, DEL), a zero-width joiner and an astral character, probed
/// and classified, so the exact bytes have to survive the lookup and the audit row.
const UNICODE_URL: &str =
    "https://\u{fc}n\u{ef}.example/\u{1F600}\u{7}\u{1b}[2J\u{1f}\u{7f}\u{200d}";

const HUGE_ARRAY_LEN: usize = 10_000;
const MEGABYTE: usize = 1 << 20;

/// One kind of malformed (or merely odd) column. `flips` is what the rule must do to it, as
/// (element index, new type); empty for a row that must not be written at all.
struct Kind {
    name: &'static str,
    agents: Option<Value>,
    flips: Vec<(usize, &'static str)>,
}

fn kind(name: &'static str, agents: Option<Value>, flips: &[(usize, &'static str)]) -> Kind {
    Kind {
        name,
        agents,
        flips: flips.to_vec(),
    }
}

fn number(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

/// Thirds of junk, a shared valid agent nobody probed, and every 1000th a legacy 'buyer'.
fn huge_array() -> (Value, Vec<(usize, &'static str)>) {
    let mut flips = Vec::new();
    let elements = (0..HUGE_ARRAY_LEN)
        .map(|i| {
            if i % 1000 == 7 {
                flips.push((i, "unknown"));
                json!({"url": format!("https://huge-{i}.example/mcp"), "type": "buyer"})
            } else if i % 3 == 0 {
                Value::Null
            } else {
                json!({"url": "https://huge.example/shared", "type": "sales", "n": i})
            }
        })
        .collect();
    (Value::Array(elements), flips)
}

fn corpus() -> Vec<Kind> {
    let (huge, huge_flips) = huge_array();
    // Past serde_json's default depth limit (128). Kept modest because the test's own clones,
    // serialisation and drops of it recurse on a 2 MiB test thread.
    let deep_junk = (0..1_000).fold(json!([]), |inner, _| Value::Array(vec![inner]));
    vec![
        // Not arrays: the server returns them untouched, so they are counted and never written.
        kind("column-sql-null", None, &[]),
        kind("column-json-null", Some(Value::Null), &[]),
        kind(
            "column-object-shaped-like-a-stale-agent",
            Some(json!({"url": BIDCLIQ_URL, "type": "buying"})),
            &[],
        ),
        kind("column-empty-object", Some(json!({})), &[]),
        kind(
            "column-string",
            Some(json!("https://string.example/mcp")),
            &[],
        ),
        kind("column-string-legacy-type", Some(json!("buyer")), &[]),
        kind("column-number", Some(json!(42)), &[]),
        kind("column-number-beyond-f64", Some(number("1e400")), &[]),
        kind("column-boolean", Some(json!(true)), &[]),
        kind(
            "column-megabyte-string",
            Some(Value::String("x".repeat(MEGABYTE))),
            &[],
        ),
        // Arrays whose elements the rule cannot touch: no object with a string url.
        kind("array-empty", Some(json!([])), &[]),
        kind("array-of-nulls", Some(json!([null, null, null])), &[]),
        kind(
            "array-of-numbers",
            Some(json!([0, -1, 2.5, number("1e400")])),
            &[],
        ),
        kind("array-of-booleans", Some(json!([true, false])), &[]),
        kind(
            "array-of-strings",
            Some(json!([PROBED_SALES, "buyer", ""])),
            &[],
        ),
        kind(
            "array-of-nested-arrays",
            Some(json!([[{"url": PROBED_SALES, "type": "buyer"}], [[]], []])),
            &[],
        ),
        kind(
            "element-url-missing",
            Some(json!([{"type": "buyer", "name": "no url"}])),
            &[],
        ),
        kind(
            "element-url-null",
            Some(json!([{"url": null, "type": "buyer"}])),
            &[],
        ),
        kind(
            "element-url-number",
            Some(json!([{"url": 12, "type": "buyer"}])),
            &[],
        ),
        kind(
            "element-url-object",
            Some(json!([{"url": {"href": PROBED_SALES}, "type": "buying"}])),
            &[],
        ),
        kind(
            "element-url-array",
            Some(json!([{"url": [PROBED_SALES], "type": "buyer"}])),
            &[],
        ),
        kind(
            "element-url-uppercase-key",
            Some(json!([{"URL": PROBED_SALES, "type": "buyer"}])),
            &[],
        ),
        // Agents the rule reads: a string url, whatever the type holds.
        kind(
            "element-url-empty-string-with-legacy-type",
            Some(json!([{"url": "", "type": "buyer"}, {"url": "", "type": "sales"}])),
            &[(0, "unknown")],
        ),
        kind(
            "element-type-number-unprobed",
            Some(json!([{"url": "https://corpus-odd.example/a", "type": 3}])),
            &[],
        ),
        kind(
            "element-type-number-probed",
            Some(json!([{"url": PROBED_SALES, "type": 3}])),
            &[(0, "sales")],
        ),
        kind(
            "element-type-boolean-unprobed",
            Some(json!([
                {"url": "https://corpus-odd.example/b", "type": false},
                {"url": "https://corpus-odd.example/c", "type": true}
            ])),
            &[],
        ),
        kind(
            "element-type-boolean-probed-unclassified",
            Some(json!([{"url": PROBED_UNCLASSIFIED, "type": false}])),
            &[(0, "unknown")],
        ),
        kind(
            "element-type-object-unprobed",
            Some(json!([{"url": "https://corpus-odd.example/d", "type": {"name": "sales"}}])),
            &[],
        ),
        kind(
            "element-type-array-probed",
            Some(json!([{"url": PROBED_SALES, "type": ["buying"]}])),
            &[(0, "sales")],
        ),
        // null reads as 'unknown', so an unclassified probe rewrites nothing visible.
        kind(
            "element-type-null-and-missing-probed-unclassified",
            Some(json!([
                {"url": PROBED_UNCLASSIFIED, "type": null},
                {"url": PROBED_UNCLASSIFIED}
            ])),
            &[],
        ),
        kind(
            "element-type-legacy-buyer-unprobed",
            Some(json!([{"url": "https://corpus-legacy.example/mcp", "type": "buyer"}])),
            &[(0, "unknown")],
        ),
        kind(
            "element-type-wrong-case",
            Some(json!([
                {"url": "https://corpus-case.example/mcp", "type": "Sales"},
                {"url": PROBED_UNCLASSIFIED, "type": "BUYING"},
                {"url": "https://corpus-case.example/ok", "type": "sales"}
            ])),
            &[(0, "unknown"), (1, "unknown")],
        ),
        kind(
            "element-type-empty-string",
            Some(json!([{"url": "https://corpus-empty-type.example/mcp", "type": ""}])),
            &[(0, "unknown")],
        ),
        kind(
            "array-junk-around-one-stale-agent",
            Some(json!([
                null, 7, "s", [], {"url": 5, "type": "buyer"},
                {"url": PROBED_SALES, "type": "buying", "name": "the stale one"},
                {"name": "no url"}
            ])),
            &[(5, "sales")],
        ),
        kind("array-ten-thousand-elements", Some(huge), &huge_flips),
        kind(
            "element-megabyte-url-with-legacy-type",
            Some(
                json!([{"url": format!("https://{}.example", "m".repeat(MEGABYTE)), "type": "buyer"}]),
            ),
            &[(0, "unknown")],
        ),
        kind(
            "element-megabyte-name-kept-on-rewrite",
            Some(json!([{"url": PROBED_SALES, "type": "buying", "name": "n".repeat(MEGABYTE)}])),
            &[(0, "sales")],
        ),
        kind(
            "element-unicode-and-control-characters",
            Some(json!([
                {"url": UNICODE_URL, "type": "buying", "name": "\u{1}\u{8}\u{b}\u{c}\r\n\t\u{fffd}"},
                {"url": "https://\u{e9}.example/\u{1F600}", "type": "b\u{1b}uyer"},
                {"url": "https://e\u{301}.example/\u{1F600}", "type": "sales"}
            ])),
            &[(0, "sales"), (1, "unknown")],
        ),
        kind(
            "element-numbers-beyond-f64-kept-on-rewrite",
            Some(json!([{
                "url": PROBED_SALES, "type": "buyer", "big": number("1e400"),
                "long": number("123456789012345678901234567890"), "tiny": number("1E-400"),
                "neg_zero": number("-0")
            }])),
            &[(0, "sales")],
        ),
        kind(
            "element-special-keys-kept-on-rewrite",
            Some(json!([{
                "url": PROBED_SALES, "type": "buying", "__proto__": {"type": "sales"},
                "constructor": null, "Type": "buyer", "": ""
            }])),
            &[(0, "sales")],
        ),
        kind(
            "array-deeply-nested-junk-before-a-legacy-agent",
            Some(json!([deep_junk, {"url": "https://corpus-deep.example/mcp", "type": "buyer"}])),
            &[(1, "unknown")],
        ),
    ]
}

/// What the planner may rewrite: an object whose `url` is a string.
fn is_agent(element: &Value) -> bool {
    element.is_object() && element.get("url").is_some_and(Value::is_string)
}

/// Each row's id, agents (as PostgreSQL prints them) and updated_at, by slug.
async fn rows(db: &TestDb) -> BTreeMap<String, (Uuid, Option<String>, String)> {
    sqlx::query_as::<_, (String, Uuid, Option<String>, String)>(
        "SELECT slug, id, agents::text, updated_at::text FROM member_profiles",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(slug, id, agents, updated_at)| (slug, (id, agents, updated_at)))
    .collect()
}

/// Without serde_json's depth limit of 128: the corpus nests deeper, as jsonb allows.
fn parse(text: &Option<String>) -> Option<Value> {
    use serde::Deserialize;
    let text = text.as_deref()?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer.disable_recursion_limit();
    let value = Value::deserialize(serde_stacker::Deserializer::new(&mut deserializer)).unwrap();
    deserializer.end().unwrap();
    Some(value)
}

/// The audit log's `old_type`: the stored type as the flip rule reads it (absent or null is
/// 'unknown'), a string bare and anything else as JSON.
fn old_type_label(stored: Option<&Value>) -> String {
    match stored {
        None | Some(Value::Null) => "unknown".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

#[tokio::test]
async fn apply_over_a_malformed_corpus_writes_only_the_types_the_rule_flips() {
    let db = TestDb::seeded(200).await;
    let corpus = corpus();
    assert!(corpus.len() >= 15);
    let profiles: Vec<NewProfile> = corpus
        .iter()
        .enumerate()
        .map(|(n, kind)| NewProfile {
            id: Uuid::from_u64_pair(0xC0_4905, n as u64),
            slug: format!("corpus-{}", kind.name),
            display_name: kind.name.to_owned(),
            agents: kind.agents.clone(),
        })
        .collect();
    let snapshots = [
        NewSnapshot::new(PROBED_SALES, Some("sales")),
        NewSnapshot::new(PROBED_UNCLASSIFIED, None),
        NewSnapshot::new(UNICODE_URL, Some("sales")),
    ];
    seed::insert(&db.pool, &profiles, &snapshots).await.unwrap();

    // Every other row keeps its types: the bulk is consistent by construction, and the named
    // fixtures' only stale agents are these two.
    let mut expected: HashMap<String, Vec<(usize, &str)>> = HashMap::from([
        ("bidcliq".to_owned(), vec![(0, "sales")]),
        ("swivel".to_owned(), vec![(1, "sales")]),
    ]);
    for kind in &corpus {
        expected.insert(format!("corpus-{}", kind.name), kind.flips.clone());
    }

    let before = rows(&db).await;
    let malformed = before
        .values()
        .filter(|(_, agents, _)| !parse(agents).is_some_and(|agents| agents.is_array()))
        .count();
    let corpus_malformed = corpus
        .iter()
        .filter(|kind| !kind.agents.as_ref().is_some_and(Value::is_array))
        .count();
    let named_malformed = seed::named_fixtures()
        .0
        .iter()
        .filter(|profile| !profile.agents.as_ref().is_some_and(Value::is_array))
        .count();
    assert_eq!(malformed, corpus_malformed + named_malformed);
    let junk: usize = before
        .values()
        .filter_map(|(_, agents, _)| parse(agents))
        .filter_map(|agents| agents.as_array().cloned())
        .map(|elements| elements.iter().filter(|element| !is_agent(element)).count())
        .sum();
    let total_flips: usize = expected.values().map(Vec::len).sum();

    // The plan a reviewer reads first: its counts must be the run's.
    let scratch = common::Scratch::new();
    let plan_path = scratch.arg("plan.json");
    backfill(
        &db.url,
        &[
            "--dry-run",
            "--max-flips",
            "1000000",
            "--plan-out",
            &plan_path,
        ],
    )
    .run()
    .await
    .0
    .expect("the dry-run completes over every malformed kind");
    let planned = agent_type_backfill::plan_file::PlanFile::read(plan_path.as_ref()).unwrap();

    let summary = backfill(&db.url, &["--apply", "--max-flips", "1000000"])
        .run()
        .await
        .0
        .expect("the run completes over every malformed kind");
    assert_eq!(summary.profiles_scanned, before.len() as u64);
    assert_eq!(
        summary.malformed, malformed as u64,
        "every non-array row is counted"
    );
    assert_eq!(summary.junk_elements, junk as u64);
    assert_eq!(summary.flips, total_flips as u64);
    assert_eq!(summary.written, total_flips as u64);
    assert_eq!(
        (summary.skipped, summary.unplanned, summary.aborted),
        (0, 0, false)
    );
    // Profiles with several flips among them: each is counted once, in the summary and in the
    // plan file alike.
    let changed = expected.values().filter(|flips| !flips.is_empty()).count();
    assert!(
        changed < total_flips,
        "the corpus has a profile with two flips"
    );
    assert_eq!(summary.profiles_changed, changed as u64);
    assert_eq!(
        (planned.counts.profiles_changed, planned.counts.flips),
        (changed as u64, total_flips as u64)
    );

    let after = rows(&db).await;
    assert_eq!(after.len(), before.len());
    let mut wrong = Vec::new();
    let mut audit_expected = Vec::new();
    for (slug, (id, old_text, old_updated)) in &before {
        let (_, new_text, new_updated) = &after[slug];
        let flips = expected.get(slug).cloned().unwrap_or_default();
        if flips.is_empty() {
            if (new_text, new_updated) != (old_text, old_updated) {
                wrong.push(format!(
                    "{slug}: written although the rule flips nothing in it"
                ));
            }
            continue;
        }
        let mut want = parse(old_text).expect("a flipped row is an array");
        for (index, to) in &flips {
            let element = &mut want[*index];
            assert!(
                is_agent(element),
                "{slug}: expected flip {index} is not an agent"
            );
            audit_expected.push((
                element["url"].as_str().unwrap().to_owned(),
                id.to_string(),
                old_type_label(element.get("type")),
                to.to_string(),
            ));
            element["type"] = json!(to);
        }
        if parse(new_text).as_ref() != Some(&want) {
            wrong.push(format!("{slug}: not exactly the expected type changes"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    let mut audit: Vec<_> = db
        .audit_rows()
        .await
        .into_iter()
        .map(|row| {
            (
                row.agent_url,
                row.member_id.unwrap(),
                row.old_type.unwrap(),
                row.new_type,
            )
        })
        .collect();
    audit.sort();
    audit_expected.sort();
    assert!(
        audit == audit_expected,
        "audit rows differ from the expected flips ({} found, {} expected)",
        audit.len(),
        audit_expected.len()
    );

    // Nothing the rule would still change may be left behind.
    let rerun = backfill(&db.url, &["--dry-run"]).run().await.0.unwrap();
    assert_eq!((rerun.flips, rerun.malformed), (0, malformed as u64));
}

/// jsonb cannot hold U+0000 (PostgreSQL rejects `\u0000` on input), so a NUL can never reach the
/// resolver from the column and the corpus uses other control characters.
#[tokio::test]
async fn jsonb_rejects_a_nul_character_before_the_tool_could_see_it() {
    let db = TestDb::new().await;
    let profile = NewProfile {
        id: Uuid::from_u64_pair(0xC0_4905, u64::MAX),
        slug: "nul".to_owned(),
        display_name: "nul".to_owned(),
        agents: Some(json!([{"url": "https://nul.example/\u{0}", "type": "buyer"}])),
    };
    let error = seed::insert(&db.pool, &[profile], &[])
        .await
        .expect_err("PostgreSQL stores no NUL in jsonb");
    let code = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<sqlx::Error>())
        .and_then(|error| error.as_database_error())
        .and_then(|error| error.code().map(|code| code.into_owned()));
    assert_eq!(code.as_deref(), Some("22P05"), "{error:#}");
}

#[test]
fn seed_stale_urls_are_the_ones_the_expectations_name() {
    // The expectations above hard-code the named fixtures' two stale agents; tie them to seed.rs
    // so a change there fails here with a reason instead of as a stray write.
    let (profiles, snapshots) = seed::named_fixtures();
    let agents = |slug: &str| {
        profiles
            .iter()
            .find(|profile| profile.slug == slug)
            .and_then(|profile| profile.agents.clone())
            .unwrap()
    };
    assert_eq!(agents("bidcliq")[0]["url"], json!(BIDCLIQ_URL));
    assert_eq!(agents("swivel")[1]["url"], json!(SWIVEL_URL));
    assert!(snapshots
        .iter()
        .any(|s| s.agent_url == SWIVEL_URL && s.inferred_type.as_deref() == Some("sales")));
}
