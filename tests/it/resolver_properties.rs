//! Property tests of the pure resolver: arbitrary `agents` values and snapshot tables, biased
//! toward the shapes production holds, through both entry points. The conformance vectors pin
//! 787 points; these check that the two paths and the rule's invariants hold between them.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use agent_type_backfill::resolver::{
    diff_flips, is_valid_agent_type, resolve_agents, AgentsColumn, Flip, VALID_AGENT_TYPES,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{json, Map, Value};

type Lookup = HashMap<String, Option<String>>;

/// Small on purpose so generated agents hit generated snapshots often. The near-duplicates pin
/// exact-equality lookup: no case folding, no trailing-slash or Unicode normalisation.
const URLS: [&str; 7] = [
    "https://a.example/mcp",
    "https://A.example/mcp",
    "https://a.example/mcp/",
    " https://a.example/mcp",
    "",
    "https://e\u{301}.example/\u{1F600}",
    "https://\u{e9}.example/\u{1F600}",
];

/// Stored types that are not in `VALID_AGENT_TYPES` but look like they might be.
const NEAR_MISS_TYPES: [&str; 8] = [
    "buyer",
    "seller",
    "Sales",
    "BUYING",
    "",
    " sales",
    "unknown ",
    "sales\u{0}",
];

/// Inferred types the crawler might have written that the server does not accept.
const INVALID_INFERRED: [&str; 4] = ["SALES", "buyer", "", "Buying"];

/// Keys a rebuilt agent must keep, including ones JavaScript treats specially.
const EXTRA_KEYS: [&str; 6] = [
    "name",
    "visibility",
    "__proto__",
    "constructor",
    "tags",
    "Type",
];

const CASES: u32 = 256;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // Shrunk counterexamples are printed on failure; a seed file in the tree would only be
        // noise for the other engineers.
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..ProptestConfig::default()
    }
}

fn number(text: &str) -> Value {
    serde_json::from_str(text).expect("a JSON number")
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        // Beyond f64 and u64: the column keeps them, so the parse must too.
        prop::sample::select(&["1e400", "-0", "123456789012345678901234567890", "1E-400"][..])
            .prop_map(number),
        "[a-z\\u{0}-\\u{1f}\u{fc}\u{1F600}\"\\\\]{0,6}".prop_map(Value::String),
        prop::sample::select(&URLS[..]).prop_map(Value::from),
        prop::sample::select(&VALID_AGENT_TYPES[..]).prop_map(Value::from),
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("url|type|name|[a-z]{1,3}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// `None` is an absent key.
fn url_field() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        8 => prop::sample::select(&URLS[..]).prop_map(|url| Some(Value::from(url))),
        1 => Just(None),
        2 => any_json().prop_map(Some),
    ]
}

/// `None` is an absent key.
fn type_field() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        4 => prop::sample::select(&VALID_AGENT_TYPES[..]).prop_map(|t| Some(Value::from(t))),
        // 'buying' has its own branch in the rule (kept when the probe cannot classify).
        1 => Just(Some(Value::from("buying"))),
        3 => prop::sample::select(&NEAR_MISS_TYPES[..]).prop_map(|t| Some(Value::from(t))),
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        2 => any_json().prop_map(Some),
    ]
}

fn agent_object() -> impl Strategy<Value = Value> {
    (
        url_field(),
        type_field(),
        prop::collection::btree_map(prop::sample::select(&EXTRA_KEYS[..]), any_json(), 0..3),
    )
        .prop_map(|(url, stored_type, extras)| {
            let mut object: Map<String, Value> = extras
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value))
                .collect();
            if let Some(url) = url {
                object.insert("url".to_owned(), url);
            }
            if let Some(stored_type) = stored_type {
                object.insert("type".to_owned(), stored_type);
            }
            Value::Object(object)
        })
}

fn generated_agents() -> impl Strategy<Value = Value> {
    let element = prop_oneof![5 => agent_object(), 1 => any_json()];
    prop_oneof![
        6 => prop::collection::vec(element, 0..10).prop_map(Value::Array),
        1 => any_json(),
    ]
}

fn inferred() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        4 => prop::sample::select(&VALID_AGENT_TYPES[..]).prop_map(|t| Some(t.to_owned())),
        2 => prop::sample::select(&INVALID_INFERRED[..]).prop_map(|t| Some(t.to_owned())),
        2 => Just(None),
    ]
}

fn generated_snapshots() -> impl Strategy<Value = Lookup> {
    prop::collection::hash_map(
        prop::sample::select(&URLS[..]).prop_map(str::to_owned),
        inferred(),
        0..=URLS.len(),
    )
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    agents: Value,
    lookup: Lookup,
    resolved: Value,
    flips: Value,
}

fn conformance_cases() -> &'static [Case] {
    static CASES: OnceLock<Vec<Case>> = OnceLock::new();
    CASES.get_or_init(|| {
        let text = std::fs::read_to_string("tests/data/conformance/resolve_agent_types.json")
            .expect("read the conformance vectors");
        let file: Value = serde_json::from_str(&text).expect("parse the conformance vectors");
        file["cases"]
            .as_array()
            .expect("a cases array")
            .iter()
            .map(|case| Case {
                name: case["name"].as_str().expect("name").to_owned(),
                agents: case["agents"].clone(),
                lookup: case["snapshots"]
                    .as_array()
                    .expect("snapshots")
                    .iter()
                    .map(|row| {
                        (
                            row["agent_url"].as_str().expect("agent_url").to_owned(),
                            row["inferred_type"].as_str().map(str::to_owned),
                        )
                    })
                    .collect(),
                resolved: case["resolved"].clone(),
                flips: case["flips"].clone(),
            })
            .collect()
    })
}

fn conformance_case() -> impl Strategy<Value = Case> {
    prop::sample::select(conformance_cases().to_vec())
}

/// A vector's agents against a fresh snapshot table over the vector's own URLs, so the real
/// shapes in the file meet combinations of probes the file does not hold.
fn conformance_agents_with_new_snapshots() -> impl Strategy<Value = (Value, Lookup)> {
    (
        conformance_case(),
        prop::collection::vec(prop::option::of(inferred()), 8),
    )
        .prop_map(|(case, probes)| {
            let mut urls: Vec<&str> = case
                .agents
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|agent| agent.get("url").and_then(Value::as_str))
                .collect();
            urls.sort_unstable();
            urls.dedup();
            let lookup = urls
                .into_iter()
                .zip(probes)
                .filter_map(|(url, probe)| probe.map(|inferred| (url.to_owned(), inferred)))
                .collect();
            (case.agents, lookup)
        })
}

fn input() -> impl Strategy<Value = (Value, Lookup)> {
    prop_oneof![
        6 => (generated_agents(), generated_snapshots()),
        1 => conformance_case().prop_map(|case| (case.agents, case.lookup)),
        1 => conformance_agents_with_new_snapshots(),
    ]
}

fn lean_flips(text: &str, lookup: &Lookup) -> Vec<Flip> {
    AgentsColumn::parse(text)
        .expect("the lean parse accepts any JSON text")
        .verdict(lookup)
        .flips
}

fn flips_json(flips: &[Flip]) -> Value {
    json!(flips
        .iter()
        .map(|flip| json!({"index": flip.index, "url": flip.url, "from": flip.from, "to": flip.to}))
        .collect::<Vec<_>>())
}

/// What the rule may rewrite: an object whose `url` is a string.
fn is_agent(element: &Value) -> bool {
    element.get("url").is_some_and(Value::is_string) && element.is_object()
}

fn without_type(element: &Value) -> Value {
    let mut element = element.clone();
    if let Some(object) = element.as_object_mut() {
        object.remove("type");
    }
    element
}

/// The rule restated from the vectors' named cases, independent of `resolve_type`: the type an
/// agent with a string `url` must end up with, or `None` when it is returned untouched.
fn model_type(stored: Option<&Value>, probe: Option<Option<&str>>) -> Option<&'static str> {
    let valid = |t: &str| VALID_AGENT_TYPES.iter().copied().find(|v| *v == t);
    match probe {
        Some(inferred) => Some(match inferred.and_then(valid) {
            Some(valid) => valid,
            None if stored == Some(&json!("buying")) => "buying",
            None => "unknown",
        }),
        None => match stored {
            Some(Value::String(declared)) if valid(declared).is_none() => Some("unknown"),
            _ => None,
        },
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn lean_path_flips_equal_diff_of_full_resolution((agents, lookup) in input()) {
        let expected = diff_flips(&agents, &resolve_agents(&agents, &lookup));
        // Compact text is what tests send; PostgreSQL's jsonb output has spaces after ':' and ','.
        for text in [agents.to_string(), serde_json::to_string_pretty(&agents).unwrap()] {
            let verdict = AgentsColumn::parse(&text).unwrap().verdict(&lookup);
            prop_assert_eq!(&verdict.flips, &expected, "text: {}", text);
            prop_assert_eq!(verdict.malformed, !agents.is_array());
            let junk = agents.as_array().map_or(0, |elements| {
                elements.iter().filter(|element| !is_agent(element)).count()
            });
            prop_assert_eq!(verdict.untouchable_elements, junk);
        }
    }

    #[test]
    fn output_length_equals_input_length_and_non_arrays_come_back_unchanged(
        (agents, lookup) in input()
    ) {
        let resolved = resolve_agents(&agents, &lookup);
        match &agents {
            Value::Array(elements) => {
                prop_assert_eq!(resolved.as_array().map(Vec::len), Some(elements.len()));
            }
            other => {
                prop_assert_eq!(&resolved, other);
                prop_assert!(diff_flips(&agents, &resolved).is_empty());
            }
        }
    }

    // Holds everywhere, not just mostly: a rewrite always sets a valid type, and a valid stored
    // type is kept when unprobed; when probed, the same URL gets the same probe, and the outcome
    // ('buying', 'unknown' or the inferred type) maps to itself on the second pass.
    #[test]
    fn resolving_a_resolved_value_changes_nothing((agents, lookup) in input()) {
        let once = resolve_agents(&agents, &lookup);
        let twice = resolve_agents(&once, &lookup);
        prop_assert_eq!(&twice, &once);
        prop_assert!(diff_flips(&once, &twice).is_empty());
        prop_assert!(lean_flips(&once.to_string(), &lookup).is_empty());
    }

    #[test]
    fn only_the_type_key_of_agents_ever_changes((agents, lookup) in input()) {
        let resolved = resolve_agents(&agents, &lookup);
        let (Value::Array(before), Value::Array(after)) = (&agents, &resolved) else {
            return Ok(());
        };
        for (index, (old, new)) in before.iter().zip(after).enumerate() {
            prop_assert_eq!(without_type(old), without_type(new), "element {}", index);
            if !is_agent(old) {
                prop_assert_eq!(old, new, "junk element {} was touched", index);
            } else if old != new {
                let to = new["type"].as_str().unwrap_or_default();
                prop_assert!(is_valid_agent_type(to), "element {} rewritten to {}", index, new);
            }
        }
    }

    #[test]
    fn resolution_matches_the_rule_restated_from_the_vectors((agents, lookup) in input()) {
        let resolved = resolve_agents(&agents, &lookup);
        let (Value::Array(before), Value::Array(after)) = (&agents, &resolved) else {
            return Ok(());
        };
        for (index, (old, new)) in before.iter().zip(after).enumerate() {
            let Some(url) = old.get("url").and_then(Value::as_str).filter(|_| old.is_object())
            else {
                continue;
            };
            let probe = lookup.get(url).map(Option::as_deref);
            match model_type(old.get("type"), probe) {
                None => prop_assert_eq!(old, new, "element {}", index),
                Some(to) => prop_assert_eq!(&new["type"], &json!(to), "element {}", index),
            }
        }
    }

    #[test]
    fn flips_point_at_changed_types_in_index_order((agents, lookup) in input()) {
        let resolved = resolve_agents(&agents, &lookup);
        let flips = diff_flips(&agents, &resolved);
        prop_assert!(flips.windows(2).all(|pair| pair[0].index < pair[1].index));
        for flip in &flips {
            let new = &resolved[flip.index];
            prop_assert!(is_agent(&agents[flip.index]));
            prop_assert_eq!(&new["url"], &json!(flip.url));
            prop_assert_eq!(&new["type"], &json!(flip.to));
            prop_assert!(is_valid_agent_type(&flip.to));
            prop_assert_ne!(&flip.from, &json!(flip.to));
        }
    }
}

proptest! {
    // Draws with replacement reach about half the vectors per run; tests/it/conformance.rs runs them
    // all. This pins the helpers the properties lean on (lean_flips, flips_json) to the vectors.
    #![proptest_config(ProptestConfig { cases: 512, ..config() })]

    #[test]
    fn sampled_conformance_vectors_hold_on_both_paths(case in conformance_case()) {
        let resolved = resolve_agents(&case.agents, &case.lookup);
        prop_assert_eq!(&resolved, &case.resolved, "{}", case.name);
        let flips = flips_json(&diff_flips(&case.agents, &resolved));
        prop_assert_eq!(&flips, &case.flips, "{}", case.name);
        let lean = flips_json(&lean_flips(&case.agents.to_string(), &case.lookup));
        prop_assert_eq!(&lean, &case.flips, "{}", case.name);
    }
}

#[test]
fn the_restated_rule_agrees_with_every_conformance_vector() {
    for case in conformance_cases() {
        let (Value::Array(before), Value::Array(after)) = (&case.agents, &case.resolved) else {
            continue;
        };
        for (old, new) in before.iter().zip(after) {
            let Some(url) = old
                .get("url")
                .and_then(Value::as_str)
                .filter(|_| old.is_object())
            else {
                assert_eq!(old, new, "{}", case.name);
                continue;
            };
            match model_type(old.get("type"), case.lookup.get(url).map(Option::as_deref)) {
                None => assert_eq!(old, new, "{}", case.name),
                Some(to) => assert_eq!(new["type"], json!(to), "{}", case.name),
            }
        }
    }
}

/// The generator is only useful if it reaches the branches of the rule; a silent drift in the
/// strategies (say, URLs that never meet a snapshot) would leave the properties vacuous.
#[test]
fn generated_inputs_reach_every_branch_of_the_rule() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRunner};

    let mut runner = TestRunner::new(Config::default());
    let strategy = (generated_agents(), generated_snapshots());
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for _ in 0..1024 {
        let (agents, lookup) = strategy.new_tree(&mut runner).unwrap().current();
        let Value::Array(elements) = &agents else {
            *seen.entry("non-array").or_default() += 1;
            continue;
        };
        for element in elements {
            let Some(url) = element
                .get("url")
                .and_then(Value::as_str)
                .filter(|_| element.is_object())
            else {
                *seen.entry("junk element").or_default() += 1;
                continue;
            };
            let stored = element.get("type");
            let branch = match (lookup.get(url), stored) {
                (Some(Some(t)), _) if is_valid_agent_type(t) => "probed valid",
                (Some(_), Some(Value::String(s))) if s == "buying" => "probed unclassified, buying",
                (Some(_), _) => "probed unclassified, other",
                (None, Some(Value::String(s))) if !is_valid_agent_type(s) => "unprobed legacy",
                (None, _) => "unprobed kept",
            };
            *seen.entry(branch).or_default() += 1;
        }
        if !diff_flips(&agents, &resolve_agents(&agents, &lookup)).is_empty() {
            *seen.entry("some flip").or_default() += 1;
        }
    }
    for branch in [
        "non-array",
        "junk element",
        "probed valid",
        "probed unclassified, buying",
        "probed unclassified, other",
        "unprobed legacy",
        "unprobed kept",
        "some flip",
    ] {
        assert!(
            seen.get(branch).copied().unwrap_or(0) >= 20,
            "branch '{branch}' reached too rarely: {seen:?}"
        );
    }
}

/// Set in the child process that runs [`deep_type_child`].
const DEEP_CHILD: &str = "RESOLVER_PROPERTIES_DEEP_TYPE_CHILD";

/// A stack overflow aborts the whole test binary, so the case runs in a child process and comes
/// back here as an ordinary failed assertion. Not a fuzz find: libFuzzer's inputs stay far below
/// this depth. PostgreSQL 15 stores such a column (up to 14,536 levels at its default
/// max_stack_depth of 2MB, 45,000 at 7MB), and the CLI's plan aborted on it with SIGABRT in
/// `Value::clone` under `effective_type` <- `flip_for` <- `AgentsColumn::verdict`, until the
/// lean parser kept such a `type` as a summary (`resolver::MAX_TYPE_DEPTH`).
#[test]
fn probed_agent_with_a_45000_deep_type_does_not_overflow_the_stack() {
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "deep_type_child",
            "--ignored",
            "--test-threads=1",
        ])
        .env(DEEP_CHILD, "1")
        .status()
        .unwrap();
    assert!(status.success(), "the child died: {status}");
}

#[test]
#[ignore = "only meaningful as the child of probed_agent_with_a_45000_deep_type_does_not_overflow_the_stack"]
fn deep_type_child() {
    if std::env::var_os(DEEP_CHILD).is_none() {
        return;
    }
    let depth = 45_000;
    let text = format!(
        "[{{\"url\":\"u\",\"type\":{}{}}}]",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    // The CLI plans on its main thread, whose stack is 8 MiB under the usual `ulimit -s`.
    std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(move || {
            let lookup: Lookup = [("u".to_owned(), Some("sales".to_owned()))].into();
            let verdict = AgentsColumn::parse(&text).unwrap().verdict(&lookup);
            assert_eq!(verdict.flips.len(), 1);
            assert_eq!(verdict.flips[0].to, "sales");
            // The run log and the audit notes serialise `from`.
            assert!(serde_json::to_string(&verdict.flips[0]).is_ok());
        })
        .unwrap()
        .join()
        .unwrap();
}
