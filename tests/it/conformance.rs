//! Every conformance vector from the server's own `resolveAgentTypes`, through both of the
//! resolver's entry points. A single disagreement fails the port.

use std::collections::HashMap;
use std::path::Path;

use agent_type_backfill::resolver::{diff_flips, resolve_agents, AgentsColumn, Flip};
use serde_json::{json, Value};

const VECTORS: &str = "tests/data/conformance/resolve_agent_types.json";

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(VECTORS).expect("read the conformance vectors");
    let mut file: Value = serde_json::from_str(&text).expect("parse the conformance vectors");
    let cases = file["cases"].take();
    let Value::Array(cases) = cases else {
        panic!("no cases array")
    };
    cases
}

fn lookup(case: &Value) -> HashMap<String, Option<String>> {
    case["snapshots"]
        .as_array()
        .expect("snapshots array")
        .iter()
        .map(|row| {
            (
                row["agent_url"].as_str().expect("agent_url").to_owned(),
                row["inferred_type"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

fn as_json(flips: &[Flip]) -> Value {
    json!(flips
        .iter()
        .map(|flip| json!({"index": flip.index, "url": flip.url, "from": flip.from, "to": flip.to}))
        .collect::<Vec<_>>())
}

#[test]
fn every_vector_matches_resolved_and_flips_on_both_paths() {
    let cases = cases();
    assert_eq!(cases.len(), 787, "the vector file changed size");
    let mut failures = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().expect("name");
        let snapshots = lookup(case);
        let agents = &case["agents"];

        let resolved = resolve_agents(agents, &snapshots);
        if resolved != case["resolved"] {
            failures.push(format!("{name}: resolved differs"));
        }
        let flips = as_json(&diff_flips(agents, &resolved));
        if flips != case["flips"] {
            failures.push(format!("{name}: flips {flips} != {}", case["flips"]));
        }

        // The production path parses the column text and keeps only url and type.
        let column = AgentsColumn::parse(&agents.to_string()).expect("lean parse");
        let verdict = column.verdict(&snapshots);
        if as_json(&verdict.flips) != case["flips"] {
            failures.push(format!("{name}: lean-path flips differ"));
        }
        let non_array = !agents.is_array();
        if verdict.malformed != non_array {
            failures.push(format!("{name}: malformed should be {non_array}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases disagree:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn vectors_are_kept_identical_to_the_shared_copy() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance");
    if !shared.is_dir() {
        eprintln!("no ../shared/conformance beside the checkout; nothing to compare");
        return;
    }
    for file in ["resolve_agent_types.json", "README.md"] {
        let ours = std::fs::read(Path::new("tests/data/conformance").join(file)).unwrap();
        let theirs = std::fs::read(shared.join(file)).unwrap();
        assert!(
            ours == theirs,
            "tests/data/conformance/{file} differs from ../shared: copy it again"
        );
    }
}
