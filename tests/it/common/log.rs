//! A `--format json` run log read back as typed events: a test says `log.summary().to_write`
//! instead of `summary["to_write"]`, so a field renamed or dropped on the wire fails every test
//! that reads it, loudly, where an index into JSON would have read `null`.
//!
//! The types here are the wire format as a reader of the log sees it, written from the README's
//! description rather than derived from the crate's own `events` types: a test that read the log
//! back with the types that wrote it would pass whatever the wire said. Every struct refuses
//! fields it does not know, so a field added, renamed or moved on the wire fails here first.
//!
//! The crate's serde_json has `arbitrary_precision`, under which `#[serde(flatten)]` and
//! internally tagged enums lose numbers on the way in (serde buffers the fields and a number
//! comes back as a map). So nothing here is flattened or tagged: [`Event::read`] dispatches on
//! the `event` field itself, and the fields a `held` or `skipped` line adds to a flip are split
//! off by hand before the rest is read as a [`Flip`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use uuid::Uuid;

/// A run log: the text the run printed, read as events on first use (a text or Markdown log is
/// only ever read as text).
pub struct RunLog {
    pub text: String,
    events: OnceLock<Vec<Event>>,
}

impl RunLog {
    pub fn new(text: impl Into<String>) -> RunLog {
        RunLog {
            text: text.into(),
            events: OnceLock::new(),
        }
    }

    /// The events, in log order; a line that is not an event of a known shape fails the test.
    pub fn events(&self) -> &[Event] {
        self.events.get_or_init(|| {
            self.text
                .lines()
                .map(|line| {
                    Event::read(line).unwrap_or_else(|error| {
                        panic!(
                            "not a run log event: {error}\n{line}\n--- log\n{}",
                            self.text
                        )
                    })
                })
                .collect()
        })
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// The header, which every log starts with.
    pub fn start(&self) -> &Start {
        match self.events().first() {
            Some(Event::Start(start)) => start,
            _ => panic!("the log does not start with its header:\n{}", self.text),
        }
    }

    /// The audit run id the header announces.
    pub fn run_id(&self) -> String {
        self.start().run_id.clone()
    }

    /// The summary, which every complete log ends with.
    pub fn summary(&self) -> &Summary {
        match self.events().last() {
            Some(Event::Summary(summary)) => summary,
            _ => panic!("the log does not end with a summary:\n{}", self.text),
        }
    }

    /// How the run ended, as its summary says.
    pub fn outcome(&self) -> &Outcome {
        self.summary()
            .outcome
            .as_ref()
            .unwrap_or_else(|| panic!("the summary has no outcome:\n{}", self.text))
    }

    /// The flips the run writes or would write (`flip` lines).
    pub fn flips(&self) -> Vec<&Flip> {
        self.kind(|event| match event {
            Event::Flip(flip) => Some(flip),
            _ => None,
        })
    }

    /// The flips a guard holds (`held` lines).
    pub fn held(&self) -> Vec<&Held> {
        self.kind(|event| match event {
            Event::Held(held) => Some(held),
            _ => None,
        })
    }

    /// The flips `--allow-transition` does not list (`not_allowed` lines).
    pub fn not_allowed(&self) -> Vec<&Flip> {
        self.kind(|event| match event {
            Event::NotAllowed(flip) => Some(flip),
            _ => None,
        })
    }

    /// The flips found or planned and not written, with why (`skipped` lines).
    pub fn skipped(&self) -> Vec<&Skipped> {
        self.kind(|event| match event {
            Event::Skipped(skipped) => Some(skipped),
            _ => None,
        })
    }

    /// The `plan_written` line of a dry-run with `--plan-out`.
    pub fn plan_written(&self) -> Option<&PlanWritten> {
        self.events().iter().find_map(|event| match event {
            Event::PlanWritten(written) => Some(written),
            _ => None,
        })
    }

    /// The `flip` line of this profile (its only one).
    pub fn flip_of(&self, profile: &str) -> &Flip {
        self.one(profile, self.flips())
    }

    /// The `held` line of this profile (its only one).
    pub fn held_of(&self, profile: &str) -> &Held {
        self.one(profile, self.held())
    }

    fn kind<'a, T>(&'a self, pick: impl Fn(&'a Event) -> Option<&'a T>) -> Vec<&'a T> {
        self.events().iter().filter_map(pick).collect()
    }

    fn one<'a, T: AsRef<Flip>>(&self, profile: &str, lines: Vec<&'a T>) -> &'a T {
        let mut of_profile = lines
            .into_iter()
            .filter(|line| line.as_ref().profile == profile);
        match (of_profile.next(), of_profile.next()) {
            (Some(line), None) => line,
            _ => panic!("not one line for {profile}:\n{}", self.text),
        }
    }
}

/// The log as it was printed, so a failing assertion shows it whole.
impl fmt::Debug for RunLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One line of the run log.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Start(Start),
    Flip(Flip),
    Held(Held),
    NotAllowed(Flip),
    Skipped(Skipped),
    PlanWritten(PlanWritten),
    Interrupted(Interrupted),
    Summary(Summary),
}

impl Event {
    /// One JSON line, by its `event` field.
    pub fn read(line: &str) -> Result<Event, String> {
        let mut fields: Map<String, Value> =
            serde_json::from_str(line).map_err(|error| error.to_string())?;
        let kind = match fields.remove("event") {
            Some(Value::String(kind)) => kind,
            other => return Err(format!("no event kind: {other:?}")),
        };
        let event = match kind.as_str() {
            "start" => Event::Start(read(fields)?),
            "flip" => Event::Flip(read(fields)?),
            "not_allowed" => Event::NotAllowed(read(fields)?),
            "held" => {
                let extra = split_off(&mut fields, &["reason", "inferred_type"]);
                let HeldBecause {
                    reason,
                    inferred_type,
                } = read(extra)?;
                Event::Held(Held {
                    flip: read(fields)?,
                    reason,
                    inferred_type,
                })
            }
            "skipped" => {
                let extra = split_off(&mut fields, &["reason"]);
                let SkippedBecause { reason } = read(extra)?;
                Event::Skipped(Skipped {
                    flip: read(fields)?,
                    reason,
                })
            }
            "plan_written" => Event::PlanWritten(read(fields)?),
            "interrupted" => Event::Interrupted(read(fields)?),
            "summary" => Event::Summary(read(fields)?),
            other => return Err(format!("unknown event kind {other:?}")),
        };
        Ok(event)
    }

    /// The `event` field it was read from.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Start(_) => "start",
            Event::Flip(_) => "flip",
            Event::Held(_) => "held",
            Event::NotAllowed(_) => "not_allowed",
            Event::Skipped(_) => "skipped",
            Event::PlanWritten(_) => "plan_written",
            Event::Interrupted(_) => "interrupted",
            Event::Summary(_) => "summary",
        }
    }

    /// The flip a flip-shaped line (flip, held, not allowed, skipped) is about.
    pub fn flip(&self) -> Option<&Flip> {
        match self {
            Event::Flip(flip) | Event::NotAllowed(flip) => Some(flip),
            Event::Held(held) => Some(&held.flip),
            Event::Skipped(skipped) => Some(&skipped.flip),
            _ => None,
        }
    }

    /// Why a held or skipped line's flip was not written.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Event::Held(held) => Some(&held.reason),
            Event::Skipped(skipped) => Some(&skipped.reason),
            _ => None,
        }
    }
}

fn read<T: DeserializeOwned>(fields: Map<String, Value>) -> Result<T, String> {
    serde_json::from_value(Value::Object(fields)).map_err(|error| error.to_string())
}

/// Moves `keys` out of `fields` into a map of their own.
fn split_off(fields: &mut Map<String, Value>, keys: &[&str]) -> Map<String, Value> {
    keys.iter()
        .filter_map(|key| Some(((*key).to_owned(), fields.remove(*key)?)))
        .collect()
}

/// The log header.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    pub tool: String,
    pub version: String,
    /// `dry-run` or `apply`.
    pub mode: String,
    pub target: Target,
    pub started_at: DateTime<Utc>,
    pub run_id: String,
    pub max_flips: u64,
    /// For `revert`: the run being undone.
    pub reverts: Option<String>,
    pub crawler_log_unavailable: Option<String>,
    pub rule: Rule,
    /// Present, and true, only under `--leave-held`.
    #[serde(default)]
    pub leave_held: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub source: String,
    pub commit: String,
    pub types: Vec<String>,
}

/// A flip as the `flip` and `not_allowed` lines print it, and the flip inside `held` and
/// `skipped` lines.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flip {
    pub profile_id: Uuid,
    /// The slug, or the id when the profile has none.
    pub profile: String,
    pub index: u64,
    pub url: String,
    /// The stored type, as stored (any JSON).
    pub from: Value,
    pub to: String,
    pub probed_at: Option<DateTime<Utc>>,
    pub discovery_error: bool,
    pub oauth_required: bool,
    /// Absent for a revert's flips.
    pub crawler_disagreements: Option<Evidence>,
}

/// What the crawler's own log says about a flip.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    pub count: Option<u64>,
    pub first_at: Option<DateTime<Utc>>,
    pub last_at: Option<DateTime<Utc>>,
    pub last_inferred: Option<String>,
    pub unavailable: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub flip: Flip,
    /// `unrecognised_inferred_type`, `retired_inferred_type`, `stale_probe`, `uncorroborated`.
    pub reason: String,
    pub inferred_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeldBecause {
    reason: String,
    inferred_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub flip: Flip,
    /// `changed_since_plan`, `unplanned`, `not_written_timeout`, `changed_since_run`...
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SkippedBecause {
    reason: String,
}

/// A held or skipped line reads as the flip it is about: `held.profile`, `skipped.to`.
impl std::ops::Deref for Held {
    type Target = Flip;
    fn deref(&self) -> &Flip {
        &self.flip
    }
}

impl std::ops::Deref for Skipped {
    type Target = Flip;
    fn deref(&self) -> &Flip {
        &self.flip
    }
}

/// What [`RunLog::flip_of`] and [`RunLog::held_of`] look a profile up by.
impl AsRef<Flip> for Flip {
    fn as_ref(&self) -> &Flip {
        self
    }
}

impl AsRef<Flip> for Held {
    fn as_ref(&self) -> &Flip {
        &self.flip
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanWritten {
    pub path: String,
    pub flips: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interrupted {
    pub signal: String,
    pub during: String,
    pub duration_ms: u64,
}

/// The last line of a run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    pub plan_complete: bool,
    pub profiles_scanned: u64,
    pub profiles_changed: u64,
    pub flips: u64,
    pub to_write: u64,
    pub held: u64,
    pub not_allowed: u64,
    pub malformed: u64,
    pub junk_elements: u64,
    pub written: u64,
    pub skipped: u64,
    pub unplanned: u64,
    pub skipped_by_reason: BTreeMap<String, u64>,
    /// Keyed `from->to`.
    pub transitions: BTreeMap<String, u64>,
    pub unrecognised_inferred_types: BTreeMap<String, u64>,
    pub aborted: bool,
    pub interrupted_by: Option<String>,
    pub duration_ms: u64,
    pub mode: Option<String>,
    pub run_id: Option<String>,
    pub outcome: Option<Outcome>,
    pub crawler_log_unavailable: Option<String>,
}

/// How a run ended: its kind, exit code and outcome line.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// `completed`, `refused`, `interrupted`, `failed`...
    pub kind: String,
    pub exit_code: i32,
    /// For `refused`: `held`, `not_allowed`, `max_flips`, each that tripped.
    #[serde(default)]
    pub refused_by: Vec<String>,
    pub signal: Option<String>,
    pub message: String,
}

/// Numbers come back as numbers whatever their size, and an event of a known kind with a field
/// the wire does not have is refused: the two ways the typed log could quietly read wrong.
#[test]
fn the_typed_log_reads_numbers_exactly_and_refuses_unknown_fields() {
    let flip = r#"{"event":"held","profile_id":"00000000-0000-0000-0000-000000000007","profile":"p","index":18446744073709551615,"url":"u","from":12345678901234567890123,"to":"sales","probed_at":"2026-01-02T03:04:05Z","discovery_error":false,"oauth_required":true,"crawler_disagreements":{"count":3,"first_at":null,"last_at":null,"last_inferred":null},"reason":"stale_probe"}"#;
    let Ok(Event::Held(held)) = Event::read(flip) else {
        panic!("{:?}", Event::read(flip));
    };
    assert_eq!(held.index, u64::MAX);
    assert_eq!(held.from.to_string(), "12345678901234567890123");
    assert_eq!(held.crawler_disagreements.as_ref().unwrap().count, Some(3));
    assert_eq!(
        (held.reason.as_str(), held.inferred_type.as_deref()),
        ("stale_probe", None)
    );
    assert_eq!(
        held.probed_at.unwrap().to_rfc3339(),
        "2026-01-02T03:04:05+00:00"
    );

    let renamed = flip.replace("\"oauth_required\"", "\"needs_oauth\"");
    let error = Event::read(&renamed).unwrap_err();
    assert!(error.contains("needs_oauth"), "{error}");
    let unknown = flip.replace("\"event\":\"held\"", "\"event\":\"kept\"");
    assert!(Event::read(&unknown).is_err());
}
