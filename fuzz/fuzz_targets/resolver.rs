//! Both resolver paths on arbitrary `agents` text. Input layout: the column's JSON text, then
//! optionally a 0xFF byte (never valid UTF-8, so it cannot be part of the text) and one byte per
//! distinct agent URL, in order of first appearance, choosing that URL's snapshot. Deriving the
//! snapshot keys from the text, instead of fuzzing them separately, makes lookups hit: libFuzzer
//! cannot see through a hash map to learn matching URLs.
//!
//! Only a stable toolchain is assumed, hence the bootstrap variable. From the repository root:
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run resolver --fuzz-dir fuzz -- -max_total_time=300
//! -dict=$PWD/fuzz/resolver.dict` (the dictionary path must be absolute).

#![no_main]

use std::collections::HashMap;

use agent_type_backfill::resolver::{diff_flips, resolve_agents, AgentsColumn, VALID_AGENT_TYPES};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::Value;

type Lookup = HashMap<String, Option<String>>;

/// What the crawler stored for one URL, from one input byte; `None` is no snapshot row.
fn probe(byte: u8) -> Option<Option<String>> {
    match byte % 13 {
        n @ 0..=8 => Some(Some(VALID_AGENT_TYPES[n as usize].to_owned())),
        9 => Some(None),
        10 => Some(Some("SALES".to_owned())),
        11 => Some(Some("buyer".to_owned())),
        _ => None,
    }
}

/// The same depth policy as `AgentsColumn::parse`, so the two parsers can be held to accepting
/// exactly the same texts.
fn parse_value(text: &str) -> serde_json::Result<Value> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer.disable_recursion_limit();
    let value = Value::deserialize(serde_stacker::Deserializer::new(&mut deserializer))?;
    deserializer.end()?;
    Ok(value)
}

fn is_agent(element: &Value) -> bool {
    element.is_object() && element.get("url").is_some_and(Value::is_string)
}

fn without_type(element: &Value) -> Value {
    let mut element = element.clone();
    if let Some(object) = element.as_object_mut() {
        object.remove("type");
    }
    element
}

fuzz_target!(|data: &[u8]| {
    let (text, probes) = match data.iter().position(|byte| *byte == 0xFF) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };

    let lean = AgentsColumn::parse(text);
    let full = parse_value(text);
    let (column, agents) = match (lean, full) {
        (Ok(column), Ok(agents)) => (column, agents),
        (Err(_), Err(_)) => return,
        (lean, full) => panic!(
            "the parsers disagree on {text:?}: lean {:?}, serde_json::Value {:?}",
            lean.err(),
            full.err()
        ),
    };

    let mut urls: Vec<&str> = Vec::new();
    for url in column.urls() {
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    let lookup: Lookup = urls
        .iter()
        .zip(probes)
        .filter_map(|(url, byte)| probe(*byte).map(|inferred| (url.to_string(), inferred)))
        .collect();

    let verdict = column.verdict(&lookup);
    let resolved = resolve_agents(&agents, &lookup);
    let expected = diff_flips(&agents, &resolved);
    assert_eq!(
        verdict.flips, expected,
        "flips differ for {text:?} with {lookup:?}"
    );
    assert_eq!(verdict.malformed, !agents.is_array());

    // Escapes, whitespace and duplicate keys are gone from the re-serialised text; the verdict
    // must not depend on them.
    let normalised = AgentsColumn::parse(&agents.to_string())
        .expect("serde_json's own output parses")
        .verdict(&lookup);
    assert_eq!(
        normalised, verdict,
        "normalising {text:?} changed the verdict"
    );

    let Value::Array(before) = &agents else {
        assert_eq!(resolved, agents, "a non-array came back changed");
        return;
    };
    let after = resolved.as_array().expect("an array resolves to an array");
    assert_eq!(before.len(), after.len());
    let junk = before.iter().filter(|element| !is_agent(element)).count();
    assert_eq!(verdict.untouchable_elements, junk);
    for (old, new) in before.iter().zip(after) {
        assert_eq!(
            without_type(old),
            without_type(new),
            "more than `type` changed"
        );
        if !is_agent(old) {
            assert_eq!(old, new, "a junk element was touched");
        }
    }
    assert_eq!(
        resolve_agents(&resolved, &lookup),
        resolved,
        "resolving twice changed {text:?}"
    );
});
