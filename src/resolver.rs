//! A port of the registry server's `resolveAgentTypes` (server/src/routes/member-profiles.ts at
//! adcp commit 4439b18), pinned by the conformance vectors in `tests/data/conformance/`.
//!
//! This module is pure: no I/O, no database, no async. Two entry points share one decision
//! function, [`resolve_type`], so the conformance path (whole JSON values) and the production path
//! (a lean parse of the `agents` column that keeps only `url` and `type`) cannot drift apart.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where the ported rule comes from, as run logs, plan files and `--version` name it.
pub(crate) const RULE_REPOSITORY: &str = "adcontextprotocol/adcp";
pub(crate) const RULE_FILE: &str = "server/src/routes/member-profiles.ts";
pub(crate) const RULE_FUNCTION: &str = "resolveAgentTypes";
/// The adcp commit the port and its conformance vectors were taken from.
pub(crate) const RULE_COMMIT: &str = "4439b1871329488ce24b213e88d855849fb41187";

/// `VALID_AGENT_TYPES` from the server's `types.ts`, `unknown` included.
pub const VALID_AGENT_TYPES: [&str; 9] = [
    "brand",
    "rights",
    "measurement",
    "governance",
    "creative",
    "sales",
    "buying",
    "signals",
    "unknown",
];

/// The one type the server keeps when the probe could not classify the agent: members declare
/// their own buying agents, which a crawler cannot confirm.
pub const SELF_DECLARED_TYPE: &str = "buying";
/// What an unclassifiable or invalid type becomes; an absent or `null` type also reads as this.
pub const UNKNOWN_TYPE: &str = "unknown";

/// One change to the server's `VALID_AGENT_TYPES` (adcontextprotocol/adcp `server/src/types.ts`,
/// read with `git log -p --follow`): from `date` (the commit's author date) the vocabulary is
/// `types`. The last entry is today's [`VALID_AGENT_TYPES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VocabularyEra {
    pub date: &'static str,
    pub commit: &'static str,
    pub types: &'static [&'static str],
}

/// The server's agent-type vocabulary over time, oldest first.
pub(crate) const VOCABULARY_HISTORY: [VocabularyEra; 6] = [
    VocabularyEra {
        date: "2025-11-15",
        commit: "32ca8774b44565fb6cbd5092afd16541f82d4fa1",
        types: &["creative", "signals", "sales"],
    },
    VocabularyEra {
        date: "2025-12-24",
        commit: "bbfe17d9c15ad5a2c348d6de72c1af2e8ad22307",
        types: &["creative", "signals", "sales", "unknown"],
    },
    VocabularyEra {
        date: "2026-01-28",
        commit: "1d7c6876d8b7cc8b11ade27fa5104fdefb73d4b6",
        types: &[
            "creative",
            "signals",
            "sales",
            "governance",
            "si",
            "unknown",
        ],
    },
    // `si` retired, and `sales` dropped by mistake for a day.
    VocabularyEra {
        date: "2026-04-12",
        commit: "7ebc3771b055b1a7901e426caa70f1774d778656",
        types: &[
            "brand",
            "rights",
            "measurement",
            "governance",
            "creative",
            "buying",
            "signals",
            "unknown",
        ],
    },
    VocabularyEra {
        date: "2026-04-13",
        commit: "ea313bbfb6799a1831f11a38a3863bab0b019dd4",
        types: &VALID_AGENT_TYPES,
    },
    // The rule's commit: unchanged since.
    VocabularyEra {
        date: "2026-08-22",
        commit: RULE_COMMIT,
        types: &VALID_AGENT_TYPES,
    },
];

/// When the server retired `name`, a type it once accepted and no longer does: the last era
/// that held it is followed by one that does not. `None` for a valid type or one never known.
pub(crate) fn retirement_of(name: &str) -> Option<&'static VocabularyEra> {
    if is_valid_agent_type(name) {
        return None;
    }
    VOCABULARY_HISTORY
        .windows(2)
        .rev()
        .find(|pair| pair[0].types.contains(&name) && !pair[1].types.contains(&name))
        .map(|pair| &pair[1])
}

pub fn is_valid_agent_type(candidate: &str) -> bool {
    VALID_AGENT_TYPES.contains(&candidate)
}

/// What the crawler knows about one exact agent URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe<'a> {
    /// No row in `agent_capabilities_snapshot` for this URL.
    NotProbed,
    /// A row exists; `None` when the probe could not classify the agent.
    Probed(Option<&'a str>),
}

/// Anything that can answer "what did the crawler infer for this exact URL?".
pub trait SnapshotLookup {
    fn probe(&self, url: &str) -> Probe<'_>;
}

impl SnapshotLookup for HashMap<String, Option<String>> {
    fn probe(&self, url: &str) -> Probe<'_> {
        match self.get(url) {
            None => Probe::NotProbed,
            Some(inferred) => Probe::Probed(inferred.as_deref()),
        }
    }
}

/// The server's decision for one agent object whose `url` is a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The element is returned untouched.
    Keep,
    /// The element is rebuilt with this `type`.
    Set(&'static str),
}

/// The heart of the port. `stored` is the element's `type` key (`None` when the key is absent).
pub fn resolve_type(stored: Option<&Value>, probe: Probe<'_>) -> Decision {
    match probe {
        Probe::Probed(inferred) => match inferred.and_then(canonical_type) {
            Some(valid) => Decision::Set(valid),
            None if stored.and_then(Value::as_str) == Some(SELF_DECLARED_TYPE) => {
                Decision::Set(SELF_DECLARED_TYPE)
            }
            None => Decision::Set(UNKNOWN_TYPE),
        },
        Probe::NotProbed => match stored {
            Some(Value::String(declared)) if !is_valid_agent_type(declared) => {
                Decision::Set(UNKNOWN_TYPE)
            }
            _ => Decision::Keep,
        },
    }
}

fn canonical_type(candidate: &str) -> Option<&'static str> {
    VALID_AGENT_TYPES
        .iter()
        .copied()
        .find(|valid| *valid == candidate)
}

/// One element whose stored type differs from the resolved one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Flip {
    pub index: usize,
    pub url: String,
    /// The stored `type` as a JSON value; an absent or `null` type reads as `"unknown"`.
    pub from: Value,
    pub to: String,
}

impl Flip {
    /// The stored type as an operator reads it: a string bare, anything else as JSON.
    pub(crate) fn stored_label(&self) -> String {
        type_label(&self.from)
    }
}

/// A stored type as an operator reads it: a string bare, any other JSON value as JSON.
pub fn type_label(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Reads a stored type the way the flip rule does: absent or `null` counts as `"unknown"`.
fn effective_type(stored: Option<&Value>) -> Value {
    match stored {
        None | Some(Value::Null) => Value::String(UNKNOWN_TYPE.to_owned()),
        Some(other) => other.clone(),
    }
}

fn flip_for(index: usize, url: &str, stored: Option<&Value>, decision: Decision) -> Option<Flip> {
    let Decision::Set(to) = decision else {
        return None;
    };
    let from = effective_type(stored);
    (from.as_str() != Some(to)).then(|| Flip {
        index,
        url: url.to_owned(),
        from,
        to: to.to_owned(),
    })
}

/// `resolveAgentTypes` over a whole `agents` value, as the server returns it.
pub fn resolve_agents(agents: &Value, snapshots: &impl SnapshotLookup) -> Value {
    let Value::Array(elements) = agents else {
        return agents.clone();
    };
    let resolved = elements
        .iter()
        .map(|element| {
            let Some((object, url)) = agent_object(element) else {
                return element.clone();
            };
            match resolve_type(object.get("type"), snapshots.probe(url)) {
                Decision::Keep => element.clone(),
                Decision::Set(to) => {
                    let mut rebuilt = object.clone();
                    rebuilt.insert("type".to_owned(), Value::String(to.to_owned()));
                    Value::Object(rebuilt)
                }
            }
        })
        .collect();
    Value::Array(resolved)
}

fn agent_object(element: &Value) -> Option<(&serde_json::Map<String, Value>, &str)> {
    let object = element.as_object()?;
    let url = object.get("url")?.as_str()?;
    Some((object, url))
}

/// The conformance flip rule: compares `before` with `after` position by position.
pub fn diff_flips(before: &Value, after: &Value) -> Vec<Flip> {
    let (Value::Array(before), Value::Array(after)) = (before, after) else {
        return Vec::new();
    };
    before
        .iter()
        .zip(after)
        .enumerate()
        .filter_map(|(index, (old, new))| {
            let from = effective_type(element_type(old));
            let to = effective_type(element_type(new));
            (from != to).then(|| Flip {
                index,
                url: new
                    .get("url")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                from,
                to: to.as_str().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

/// Only objects (and arrays, which JavaScript also calls objects) can carry a `type`.
fn element_type(element: &Value) -> Option<&Value> {
    element.as_object().and_then(|object| object.get("type"))
}

/// The `agents` column as the production path reads it: only what the rule looks at.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentsColumn {
    /// SQL NULL or any JSON value that is not an array: returned untouched by the server.
    Malformed,
    Array(Vec<AgentSlot>),
}

/// One element of an `agents` array, reduced to what the rule reads.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentSlot {
    /// Not an object, or an object whose `url` is missing or not a string: never rewritten.
    Untouchable,
    Agent {
        url: String,
        /// `None` when the `type` key is absent.
        stored_type: Option<Value>,
    },
}

/// What the rule found in one profile.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProfileVerdict {
    pub malformed: bool,
    /// Elements the rule cannot touch (not objects, or no string `url`).
    pub untouchable_elements: usize,
    pub flips: Vec<Flip>,
}

impl AgentsColumn {
    /// Parses the column's JSON text. Nesting depth is unbounded here, as in PostgreSQL and
    /// JavaScript, so a deeply nested junk element cannot fail a run.
    pub fn parse(json_text: &str) -> serde_json::Result<Self> {
        let mut deserializer = serde_json::Deserializer::from_str(json_text);
        deserializer.disable_recursion_limit();
        let column = serde_stacker::Deserializer::new(&mut deserializer);
        let parsed = AgentsColumn::deserialize(column)?;
        deserializer.end()?;
        Ok(parsed)
    }

    /// URLs whose snapshot the rule will ask for.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        let slots = match self {
            AgentsColumn::Array(slots) => slots.as_slice(),
            AgentsColumn::Malformed => &[],
        };
        slots.iter().filter_map(|slot| match slot {
            AgentSlot::Agent { url, .. } => Some(url.as_str()),
            AgentSlot::Untouchable => None,
        })
    }

    /// Whether the element at `flip.index` still has `flip.url` and carries `flip.from` as its
    /// type (absent or null reading as "unknown", as in the flip rule).
    pub fn carries(&self, flip: &Flip) -> bool {
        let AgentsColumn::Array(slots) = self else {
            return false;
        };
        match slots.get(flip.index) {
            Some(AgentSlot::Agent { url, stored_type }) => {
                *url == flip.url && effective_type(stored_type.as_ref()) == flip.from
            }
            _ => false,
        }
    }

    pub fn verdict(&self, snapshots: &impl SnapshotLookup) -> ProfileVerdict {
        let AgentsColumn::Array(slots) = self else {
            return ProfileVerdict {
                malformed: true,
                ..ProfileVerdict::default()
            };
        };
        let mut verdict = ProfileVerdict::default();
        for (index, slot) in slots.iter().enumerate() {
            match slot {
                AgentSlot::Untouchable => verdict.untouchable_elements += 1,
                AgentSlot::Agent { url, stored_type } => {
                    let decision = resolve_type(stored_type.as_ref(), snapshots.probe(url));
                    verdict
                        .flips
                        .extend(flip_for(index, url, stored_type.as_ref(), decision));
                }
            }
        }
        verdict
    }
}

impl<'de> Deserialize<'de> for AgentsColumn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ColumnVisitor;
        impl<'de> Visitor<'de> for ColumnVisitor {
            type Value = AgentsColumn;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AgentsColumn, A::Error> {
                let mut slots = Vec::with_capacity(seq.size_hint().unwrap_or(4));
                while let Some(slot) = seq.next_element::<AgentSlot>()? {
                    slots.push(slot);
                }
                Ok(AgentsColumn::Array(slots))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AgentsColumn, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(AgentsColumn::Malformed)
            }
            fn visit_unit<E: de::Error>(self) -> Result<AgentsColumn, E> {
                Ok(AgentsColumn::Malformed)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<AgentsColumn, E> {
                Ok(AgentsColumn::Malformed)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<AgentsColumn, E> {
                Ok(AgentsColumn::Malformed)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<AgentsColumn, E> {
                Ok(AgentsColumn::Malformed)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<AgentsColumn, E> {
                Ok(AgentsColumn::Malformed)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<AgentsColumn, E> {
                Ok(AgentsColumn::Malformed)
            }
        }
        deserializer.deserialize_any(ColumnVisitor)
    }
}

impl<'de> Deserialize<'de> for AgentSlot {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SlotVisitor;
        impl<'de> Visitor<'de> for SlotVisitor {
            type Value = AgentSlot;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AgentSlot, A::Error> {
                let mut url = None;
                let mut stored_type = None;
                // PostgreSQL's jsonb keeps one value per key, so "last wins" never has to apply.
                while let Some(key) = map.next_key::<KeyOfInterest>()? {
                    match key {
                        KeyOfInterest::Url => url = map.next_value::<UrlValue>()?.0,
                        KeyOfInterest::Type => {
                            let raw = map.next_value::<Box<serde_json::value::RawValue>>()?;
                            stored_type = Some(bounded_type(raw.get()).map_err(de::Error::custom)?);
                        }
                        KeyOfInterest::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(match url {
                    Some(url) => AgentSlot::Agent { url, stored_type },
                    None => AgentSlot::Untouchable,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AgentSlot, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(AgentSlot::Untouchable)
            }
            fn visit_unit<E: de::Error>(self) -> Result<AgentSlot, E> {
                Ok(AgentSlot::Untouchable)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<AgentSlot, E> {
                Ok(AgentSlot::Untouchable)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<AgentSlot, E> {
                Ok(AgentSlot::Untouchable)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<AgentSlot, E> {
                Ok(AgentSlot::Untouchable)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<AgentSlot, E> {
                Ok(AgentSlot::Untouchable)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<AgentSlot, E> {
                Ok(AgentSlot::Untouchable)
            }
        }
        deserializer.deserialize_any(SlotVisitor)
    }
}

/// Whether `value` is the summary [`bounded_type`] stands in for a type nested too deep to keep.
pub(crate) fn is_depth_summary(value: &Value) -> bool {
    value
        .get("nested_json_summary")
        .and_then(|summary| summary.get("depth"))
        .and_then(Value::as_u64)
        .is_some_and(|depth| usize::try_from(depth).map_or(true, |depth| depth > MAX_TYPE_DEPTH))
        && value.as_object().is_some_and(|object| object.len() == 1)
}

/// Deeper than this, a stored `type` is kept as a summary object. Cloning, printing or
/// auditing a value nested thousands deep recurses once per level and would overflow the stack;
/// the summary is just as much "not a string" to the rule, so decisions are unchanged.
pub const MAX_TYPE_DEPTH: usize = 64;

pub(crate) fn bounded_type(text: &str) -> serde_json::Result<Value> {
    let depth = nesting_depth(text);
    if depth <= MAX_TYPE_DEPTH {
        return serde_json::from_str(text);
    }
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    Ok(serde_json::json!({
        "nested_json_summary": {
            "depth": depth,
            "bytes": text.len(),
            "hash": format!("{:016x}", hasher.finish()),
        }
    }))
}

/// Deepest bracket nesting of a JSON text, counted without recursion.
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for byte in text.bytes() {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

enum KeyOfInterest {
    Url,
    Type,
    Other,
}

impl<'de> Deserialize<'de> for KeyOfInterest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = KeyOfInterest;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<KeyOfInterest, E> {
                Ok(match key {
                    "url" => KeyOfInterest::Url,
                    "type" => KeyOfInterest::Type,
                    _ => KeyOfInterest::Other,
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// A `url` value: kept when it is a string, otherwise only noted as unusable.
struct UrlValue(Option<String>);

impl<'de> Deserialize<'de> for UrlValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UrlVisitor;
        impl<'de> Visitor<'de> for UrlVisitor {
            type Value = UrlValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, url: &str) -> Result<UrlValue, E> {
                Ok(UrlValue(Some(url.to_owned())))
            }
            fn visit_string<E: de::Error>(self, url: String) -> Result<UrlValue, E> {
                Ok(UrlValue(Some(url)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UrlValue, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(UrlValue(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UrlValue, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(UrlValue(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<UrlValue, E> {
                Ok(UrlValue(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<UrlValue, E> {
                Ok(UrlValue(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<UrlValue, E> {
                Ok(UrlValue(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<UrlValue, E> {
                Ok(UrlValue(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<UrlValue, E> {
                Ok(UrlValue(None))
            }
        }
        deserializer.deserialize_any(UrlVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `si` was valid from 28 January 2026 and retired on 12 April 2026; `sales`, dropped for a
    /// day then, is valid now; a type the server never had was never retired.
    #[test]
    fn the_vocabulary_history_knows_si_was_retired_and_ends_at_today() {
        let si = retirement_of("si").unwrap();
        assert_eq!(
            (si.date, si.commit),
            ("2026-04-12", "7ebc3771b055b1a7901e426caa70f1774d778656")
        );
        for never_retired in ["sales", "buying", "quantum", "buyer", ""] {
            assert_eq!(retirement_of(never_retired), None, "{never_retired}");
        }
        assert_eq!(VOCABULARY_HISTORY.last().unwrap().types, VALID_AGENT_TYPES);
        assert_eq!(VOCABULARY_HISTORY.last().unwrap().commit, RULE_COMMIT);
    }

    fn snapshots(rows: &[(&str, Option<&str>)]) -> HashMap<String, Option<String>> {
        rows.iter()
            .map(|(url, inferred)| (url.to_string(), inferred.map(str::to_owned)))
            .collect()
    }

    fn lean_flips(agents: &Value, lookup: &HashMap<String, Option<String>>) -> Vec<Flip> {
        AgentsColumn::parse(&agents.to_string())
            .unwrap()
            .verdict(lookup)
            .flips
    }

    #[test]
    fn stale_buying_sales_agent_flips_to_sales() {
        let lookup = snapshots(&[("https://bidcliq.example/mcp", Some("sales"))]);
        let agents = json!([{"url": "https://bidcliq.example/mcp", "type": "buying", "name": "x"}]);
        let flips = lean_flips(&agents, &lookup);
        assert_eq!(flips.len(), 1);
        assert_eq!(flips[0].from, json!("buying"));
        assert_eq!(flips[0].to, "sales");
    }

    #[test]
    fn self_declared_buying_survives_an_unclassified_probe() {
        let lookup = snapshots(&[("https://dsp.example", None)]);
        let agents = json!([{"url": "https://dsp.example", "type": "buying"}]);
        assert_eq!(resolve_agents(&agents, &lookup), agents);
        assert!(lean_flips(&agents, &lookup).is_empty());
    }

    #[test]
    fn unclassified_probe_squashes_other_types_to_unknown() {
        let lookup = snapshots(&[
            ("https://a.example", None),
            ("https://b.example", Some("SALES")),
        ]);
        let agents =
            json!([{"url": "https://a.example", "type": "sales"}, {"url": "https://b.example"}]);
        let flips = lean_flips(&agents, &lookup);
        assert_eq!(flips.len(), 1, "a missing type already reads as unknown");
        assert_eq!((flips[0].index, flips[0].to.as_str()), (0, "unknown"));
    }

    #[test]
    fn legacy_type_without_snapshot_becomes_unknown_but_non_strings_stay() {
        let lookup = snapshots(&[]);
        let agents = json!([
            {"url": "https://a.example", "type": "buyer"},
            {"url": "https://b.example", "type": 7},
            {"url": "https://c.example", "type": null},
        ]);
        let flips = lean_flips(&agents, &lookup);
        assert_eq!(flips.len(), 1);
        assert_eq!(flips[0].stored_label(), "buyer");
    }

    #[test]
    fn non_array_columns_are_malformed_and_untouched() {
        for text in ["null", "{}", "\"agents\"", "5", "true", "{\"url\":\"x\"}"] {
            let column = AgentsColumn::parse(text).unwrap();
            assert_eq!(column, AgentsColumn::Malformed, "{text}");
            assert!(column.verdict(&snapshots(&[])).malformed);
        }
    }

    #[test]
    fn junk_elements_are_counted_not_touched() {
        let column =
            AgentsColumn::parse(r#"[null, 1, "s", [], [{"url":"x"}], {"url": 5}, {"name": "n"}]"#)
                .unwrap();
        let verdict = column.verdict(&snapshots(&[("x", Some("sales"))]));
        assert_eq!(verdict.untouchable_elements, 7);
        assert!(verdict.flips.is_empty());
    }

    #[test]
    fn deeply_nested_junk_does_not_fail_the_parse() {
        let depth = 5_000;
        let text = format!(
            "[{}{}, {{\"url\":\"u\",\"type\":\"buyer\"}}]",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let verdict = AgentsColumn::parse(&text).unwrap().verdict(&snapshots(&[]));
        assert_eq!(verdict.flips.len(), 1);
    }

    #[test]
    fn deeply_nested_type_of_a_probed_agent_is_summarised_not_recursed() {
        let depth = 45_000;
        let text = format!(
            "[{{\"url\":\"u\",\"type\":{}{}}}]",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let verdict = AgentsColumn::parse(&text)
            .unwrap()
            .verdict(&snapshots(&[("u", Some("sales"))]));
        assert_eq!(verdict.flips.len(), 1);
        assert_eq!(verdict.flips[0].from["nested_json_summary"]["depth"], depth);
        assert_eq!(verdict.flips[0].to, "sales");
        let unprobed = AgentsColumn::parse(&text).unwrap().verdict(&snapshots(&[]));
        assert!(
            unprobed.flips.is_empty(),
            "still not a string: kept without a snapshot"
        );
    }

    #[test]
    fn nesting_depth_ignores_brackets_inside_strings() {
        assert_eq!(nesting_depth(r#"[{"a":"[[[\"]]]"}]"#), 2);
        assert_eq!(nesting_depth("5"), 0);
        assert_eq!(nesting_depth("[[],[[]]]"), 3);
    }

    /// Brackets after a string count again: an escaped quote does not end the string, an
    /// escaped backslash does not escape the closing quote. Each case fails when one arm of the
    /// string state machine is dropped.
    #[test]
    fn nesting_depth_counts_again_after_strings_with_escapes() {
        assert_eq!(nesting_depth(r#"[{"a":"x\"]]","b":[[1]]}]"#), 4);
        assert_eq!(nesting_depth(r#"["\\",[[2]]]"#), 3);
        assert_eq!(nesting_depth(r#"["",[[]]]"#), 3);
    }

    #[test]
    fn numbers_beyond_f64_range_do_not_fail_the_parse() {
        let text = r#"[{"url":"u","type":"buyer","big":1e400,"n":123456789012345678901234567890}]"#;
        let verdict = AgentsColumn::parse(text).unwrap().verdict(&snapshots(&[]));
        assert_eq!(verdict.flips.len(), 1);
    }
}
