//! The server-side narrowing never drops a profile the rule flips, on generated registries beyond
//! the conformance vectors: every stored type against every probe for one element (JSON values
//! whose text looks like a kept value, out-of-vocabulary types equal to the probe's), then random
//! profiles of several elements with shared urls and junk.
//!
//! Judged through the tool's own dry-run (plan, narrowing, guards and log), never through the
//! narrowing's SQL directly, so the check survives a rewrite of how planning is done: what the
//! log lists (as flips or held) must be exactly what the pure resolver finds profile by profile.

use std::collections::{BTreeSet, HashMap};

use crate::common::{backfill, TestDb};
use agent_type_backfill::resolver::{type_label, AgentsColumn};
use agent_type_backfill::support::seed::{self, NewProfile, NewSnapshot, Rng};
use serde_json::{json, Value};
use uuid::Uuid;

/// Stored `type` values; `None` is a missing key.
fn stored_types() -> Vec<Option<Value>> {
    let mut stored: Vec<Option<Value>> = vec![None];
    stored.extend(
        [
            json!(null),
            json!("buying"),
            json!("sales"),
            json!("unknown"),
            json!("creative"),
            json!("retail_media"),
            json!("null"),
            json!("\"buying\""),
            json!("Buying"),
            json!("buying "),
            json!("buyer"),
            json!(""),
            json!(3),
            json!(0),
            json!(true),
            json!(false),
            json!({"buying": 1}),
            json!({}),
            json!(["buying"]),
            json!([]),
        ]
        .into_iter()
        .map(Some),
    );
    stored
}

/// A url's snapshot: `None` for no row, `Some(None)` for a probe that could not classify.
fn probes() -> Vec<Option<Option<&'static str>>> {
    vec![
        None,
        Some(None),
        Some(Some("sales")),
        Some(Some("buying")),
        Some(Some("creative")),
        Some(Some("unknown")),
        Some(Some("retail_media")),
        Some(Some("null")),
        Some(Some("")),
        Some(Some("Sales")),
        Some(Some("buying ")),
        Some(Some("\"buying\"")),
    ]
}

struct Registry {
    profiles: Vec<NewProfile>,
    snapshots: Vec<NewSnapshot>,
    lookup: HashMap<String, Option<String>>,
}

impl Registry {
    fn add(&mut self, agents: Value, probes: &[(String, Option<&str>)]) {
        let n = self.profiles.len();
        for (url, inferred) in probes {
            self.snapshots.push(NewSnapshot::new(url, *inferred));
            self.lookup.insert(url.clone(), inferred.map(str::to_owned));
        }
        self.profiles.push(NewProfile {
            id: Uuid::from_u128(0x6e00_0000 + n as u128),
            slug: format!("g{n:04}"),
            display_name: format!("generated {n}"),
            agents: Some(agents),
        });
    }

    /// `(profile, index, from, to)` of every flip the pure resolver finds.
    fn expected(&self) -> BTreeSet<(String, u64, String, String)> {
        let mut flips = BTreeSet::new();
        for profile in &self.profiles {
            let text = profile.agents.as_ref().unwrap().to_string();
            let verdict = AgentsColumn::parse(&text).unwrap().verdict(&self.lookup);
            for flip in verdict.flips {
                flips.insert((
                    profile.slug.clone(),
                    flip.index as u64,
                    type_label(&flip.from),
                    flip.to,
                ));
            }
        }
        flips
    }
}

fn element(url: &str, stored: &Option<Value>) -> Value {
    let mut element = json!({"url": url, "name": "agent"});
    if let Some(stored) = stored {
        element["type"] = stored.clone();
    }
    element
}

fn generated() -> Registry {
    let mut registry = Registry {
        profiles: Vec::new(),
        snapshots: Vec::new(),
        lookup: HashMap::new(),
    };
    let stored = stored_types();
    let probes = probes();
    // Every stored type against every probe, one element each.
    for (s, stored_type) in stored.iter().enumerate() {
        for (p, probe) in probes.iter().enumerate() {
            let url = format!("https://x{s}-{p}.example/mcp");
            let rows: Vec<(String, Option<&str>)> = probe
                .map(|inferred| (url.clone(), inferred))
                .into_iter()
                .collect();
            registry.add(json!([element(&url, stored_type)]), &rows);
        }
    }
    // Random profiles: up to four elements over two urls (the same agent listed twice), junk
    // elements among them.
    let mut rng = Rng::new(0x5EED_0020);
    for n in 0..400 {
        let urls = [
            format!("https://r{n}-a.example/mcp"),
            format!("https://r{n}-b.example/mcp"),
        ];
        let elements: Vec<Value> = (0..1 + rng.index_below(4))
            .map(|_| match rng.below(8) {
                0 => json!({"url": 7, "type": "buying"}),
                1 => json!("https://bare.example"),
                _ => element(
                    &urls[rng.index_below(2)],
                    &stored[rng.index_below(stored.len())],
                ),
            })
            .collect();
        let rows: Vec<(String, Option<&str>)> = urls
            .iter()
            .filter_map(|url| probes[rng.index_below(probes.len())].map(|p| (url.clone(), p)))
            .collect();
        registry.add(Value::Array(elements), &rows);
    }
    registry
}

#[tokio::test]
async fn the_tool_lists_every_flip_the_resolver_finds_on_generated_registries() {
    let registry = generated();
    let expected = registry.expected();
    assert!(
        expected.len() > 300,
        "the generator makes flips: {}",
        expected.len()
    );
    let db = TestDb::new().await;
    seed::insert(&db.pool, &registry.profiles, &registry.snapshots)
        .await
        .unwrap();

    // Held flips refuse the run; its log still lists every flip found.
    let (_, log) = backfill(&db.url, &["--dry-run", "--max-flips", "100000"])
        .run()
        .await;
    let held = log.held().into_iter().map(|held| &held.flip);
    let listed: BTreeSet<(String, u64, String, String)> = log
        .flips()
        .into_iter()
        .chain(held)
        .map(|flip| {
            (
                flip.profile.clone(),
                flip.index,
                type_label(&flip.from),
                flip.to.clone(),
            )
        })
        .collect();
    let missed: Vec<_> = expected.difference(&listed).collect();
    let extra: Vec<_> = listed.difference(&expected).collect();
    assert!(missed.is_empty(), "the run never listed {missed:#?}");
    assert!(
        extra.is_empty(),
        "the run listed flips the rule does not make: {extra:#?}"
    );

    // An out-of-vocabulary stored type equal to its probe's out-of-vocabulary inference is
    // demoted to unknown by the rule, and the vocabulary guard holds it.
    let held = |profile: &str| {
        log.held()
            .iter()
            .any(|held| held.profile == profile && held.reason == "unrecognised_inferred_type")
    };
    let (s, p) = (
        stored_types()
            .iter()
            .position(|t| *t == Some(json!("retail_media")))
            .unwrap(),
        probes()
            .iter()
            .position(|p| *p == Some(Some("retail_media")))
            .unwrap(),
    );
    let slug = format!("g{:04}", s * probes().len() + p);
    assert!(
        held(&slug),
        "{slug} (retail_media stored and inferred) is held"
    );
}
