//! Everything the run log says, as typed events. A run emits events; a printer (text, JSON lines
//! or Markdown, in `report.rs`) renders them, so every format says the same thing.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::db;
pub(crate) use crate::domain::rfc3339;
use crate::domain::{CrawlerEvidence, ProfileFlip, Target, Transition};
// The vocabulary the log speaks, defined in `domain` and named here for the log's readers.
pub use crate::domain::{Hold, HoldReason, Mode, SkipReason};
use crate::outcome::OutcomeReport;
use crate::resolver::{RULE_COMMIT, RULE_FILE, RULE_FUNCTION, RULE_REPOSITORY, VALID_AGENT_TYPES};

/// One line of the run log.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Start(Start),
    /// A flip the run will write (an apply) or would write (a dry-run).
    Flip(FlipEvent),
    /// A flip the rule found that a guard will not let anyone write, and the guard's hold.
    Held {
        #[serde(flatten)]
        flip: FlipEvent,
        #[serde(flatten)]
        hold: Hold,
    },
    /// A flip whose transition `--allow-transition` does not list.
    NotAllowed(FlipEvent),
    /// A flip that was planned or found but not written, and why.
    Skipped {
        #[serde(flatten)]
        flip: FlipEvent,
        reason: SkipReason,
    },
    PlanWritten {
        path: String,
        flips: usize,
    },
    /// A signal stopped the run before its plan was complete: nothing was written.
    Interrupted {
        signal: &'static str,
        during: &'static str,
        duration_ms: u64,
    },
    Summary(Summary),
}

/// `history`: one backfill run, as the log says it (from the audit table's rows of the run).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HistoryRun {
    pub run_id: String,
    pub first_change: DateTime<Utc>,
    pub last_change: DateTime<Utc>,
    pub flips: i64,
    pub profiles: i64,
    /// The run this one reverted, when it was a revert.
    pub reverts: Option<String>,
}

impl From<db::RunRecord> for HistoryRun {
    fn from(record: db::RunRecord) -> HistoryRun {
        HistoryRun {
            run_id: record.run_id,
            first_change: record.first_change,
            last_change: record.last_change,
            flips: record.flips,
            profiles: record.profiles,
            reverts: record.reverts,
        }
    }
}

/// `history RUN_ID`: one audit row, as the log says it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HistoryRow {
    pub id: i64,
    pub run_id: Option<String>,
    pub changed_at: DateTime<Utc>,
    pub member_id: Option<String>,
    pub agent_url: String,
    pub old_type: Option<String>,
    pub new_type: String,
    pub notes: Option<serde_json::Value>,
    /// How the text and Markdown logs name the row's profile: the slug its notes keep, else the
    /// member id (JSON has both in the fields above).
    #[serde(skip)]
    pub profile: String,
    /// The element the row changed, as its notes record it.
    #[serde(skip)]
    pub index: Option<u64>,
}

impl From<db::AuditEntry> for HistoryRow {
    fn from(entry: db::AuditEntry) -> HistoryRow {
        HistoryRow {
            profile: entry.label(),
            index: entry.index(),
            id: entry.id,
            run_id: entry.run_id,
            changed_at: entry.changed_at,
            member_id: entry.member_id,
            agent_url: entry.agent_url,
            old_type: entry.old_type,
            new_type: entry.new_type,
            notes: entry.notes,
        }
    }
}

/// The log header: what ran, against what, under which rule.
#[derive(Debug, Clone, Serialize)]
pub struct Start {
    pub tool: &'static str,
    pub version: &'static str,
    pub mode: Mode,
    pub target: Target,
    #[serde(serialize_with = "crate::domain::seconds")]
    pub started_at: DateTime<Utc>,
    pub run_id: String,
    pub max_flips: usize,
    /// For `revert`: the run being undone.
    pub reverts: Option<String>,
    /// Why the crawler's log cannot be read (each flip's `crawler_disagreements` says it too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crawler_log_unavailable: Option<String>,
    pub rule: Rule,
    /// `--leave-held`: held flips are left unwritten and the rest written. Only present when set.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub leave_held: bool,
}

/// The server rule this build ports, so a log says which rule decided its flips.
#[derive(Debug, Clone, Serialize)]
pub struct Rule {
    /// `adcontextprotocol/adcp server/src/routes/member-profiles.ts resolveAgentTypes`.
    pub source: String,
    pub commit: &'static str,
    pub types: &'static [&'static str],
}

impl Rule {
    pub(crate) fn ported() -> Rule {
        Rule {
            source: format!("{RULE_REPOSITORY} {RULE_FILE} {RULE_FUNCTION}"),
            commit: RULE_COMMIT,
            types: &VALID_AGENT_TYPES,
        }
    }

    /// `adcp resolveAgentTypes at 4439b18 (brand, ...)`, as the text log and `--version` say it.
    pub fn short(&self) -> String {
        format!(
            "adcp {RULE_FUNCTION} at {} ({})",
            &self.commit[..7.min(self.commit.len())],
            self.types.join(", ")
        )
    }
}

/// One flip as every format shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FlipEvent {
    #[serde(flatten)]
    pub at: ProfileFlip,
    #[serde(serialize_with = "crate::domain::optional_seconds")]
    pub probed_at: Option<DateTime<Utc>>,
    pub discovery_error: bool,
    pub oauth_required: bool,
    /// The crawler's own logged disagreements for this url; absent for a revert.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crawler_disagreements: Option<CrawlerEvidence>,
    /// How old the probe was, or what stands in for it (`no snapshot`, `reverts RUN`), as the
    /// text and Markdown logs print it.
    #[serde(skip)]
    pub probe_note: String,
}

/// The last event of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// The plan finished; when it did not (interrupted, failed), its counts are zero and say
    /// nothing.
    pub plan_complete: bool,
    pub profiles_scanned: u64,
    pub profiles_changed: u64,
    /// Flips the rule found, held ones among them.
    pub flips: u64,
    /// Flips no guard holds: what an apply writes and `--max-flips` is checked against.
    pub to_write: u64,
    /// Flips a guard holds back (`held` events): never written.
    pub held: u64,
    /// Of `to_write`, flips of transitions `--allow-transition` does not list: the run is refused.
    pub not_allowed: u64,
    /// Profiles whose `agents` is not an array (NULL included): never written.
    pub malformed: u64,
    /// Array elements the rule cannot touch (not objects, or no string `url`).
    pub junk_elements: u64,
    pub written: u64,
    /// Planned flips not written, every reason but `unplanned`.
    pub skipped: u64,
    pub unplanned: u64,
    /// Every reason a flip was not written, with its count.
    pub skipped_by_reason: BTreeMap<SkipReason, u64>,
    /// Flips per transition (JSON keys `from->to`).
    pub transitions: BTreeMap<Transition, u64>,
    /// Non-empty `inferred_type` values in `agent_capabilities_snapshot` outside the rule's
    /// vocabulary, with how many snapshots carry each, whether or not a flip involves them.
    pub unrecognised_inferred_types: BTreeMap<String, u64>,
    pub aborted: bool,
    /// The signal that stopped the run between batches, if any.
    pub interrupted_by: Option<&'static str>,
    pub duration_ms: u64,
    pub mode: Option<Mode>,
    /// The audit run id, when something was written.
    pub run_id: Option<String>,
    /// How the run ended: the exit code and the outcome line come from the same value.
    pub outcome: Option<OutcomeReport>,
    /// Why the crawler's log could not be read, as the header said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crawler_log_unavailable: Option<String>,
}

impl Summary {
    /// Counts `flip` under its transition.
    pub(crate) fn count_transition(&mut self, flip: &crate::resolver::Flip) {
        let transition = Transition::new(flip.stored_label(), flip.to.clone());
        *self.transitions.entry(transition).or_default() += 1;
    }

    pub(crate) fn count_skip(&mut self, reason: SkipReason) {
        *self.skipped_by_reason.entry(reason).or_default() += 1;
        if reason == SkipReason::Unplanned {
            self.unplanned += 1;
        } else {
            self.skipped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolver::Flip;
    use serde_json::{json, Value};

    fn flip() -> FlipEvent {
        let flip = Flip {
            index: 1,
            url: "https://acme.example/mcp".into(),
            from: json!("buying"),
            to: "sales".into(),
        };
        FlipEvent {
            at: ProfileFlip::new(uuid::Uuid::nil(), "acme", flip),
            probed_at: None,
            discovery_error: false,
            oauth_required: false,
            crawler_disagreements: None,
            probe_note: "no snapshot".into(),
        }
    }

    /// A held and a skipped line are the flip's own fields with the hold's or the reason's beside
    /// them, flat, under their `event` tag; an inferred type is present only when there is one.
    #[test]
    fn held_and_skipped_lines_carry_the_flip_flat_with_their_reason() {
        let line = |event: Event| serde_json::to_value(event).unwrap();
        let flip_fields = json!({
            "profile_id": "00000000-0000-0000-0000-000000000000",
            "profile": "acme",
            "index": 1,
            "url": "https://acme.example/mcp",
            "from": "buying",
            "to": "sales",
            "probed_at": null,
            "discovery_error": false,
            "oauth_required": false,
        });
        let with = |extra: Value| {
            let mut expected = flip_fields.clone();
            expected
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            expected
        };
        let held = Hold {
            reason: HoldReason::UnrecognisedInferredType,
            inferred_type: Some("retail_media".into()),
        };
        assert_eq!(
            line(Event::Held {
                flip: flip(),
                hold: held
            }),
            with(json!({
                "event": "held",
                "reason": "unrecognised_inferred_type",
                "inferred_type": "retail_media",
            }))
        );
        assert_eq!(
            line(Event::Held {
                flip: flip(),
                hold: Hold::because(HoldReason::StaleProbe)
            }),
            with(json!({"event": "held", "reason": "stale_probe"}))
        );
        assert_eq!(
            line(Event::Skipped {
                flip: flip(),
                reason: SkipReason::ProfileGone
            }),
            with(json!({"event": "skipped", "reason": "profile_gone"}))
        );
    }
}
