//! The guards on top of the rule: flips it found that nobody may write (held), and the limits a
//! plan must stay within (`--max-flips`, `--allow-transition`). They never change what the rule
//! decides; they only stop a run from writing it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::config::Guards;
use crate::domain::{count, HoldReason, Transition};
use crate::events::{Event, Held};
use crate::outcome::Refusal;
use crate::plan::PlannedFlip;
use crate::plan_file::PlanFile;
use crate::resolver::{is_valid_agent_type, retirement_of, UNKNOWN_TYPE};

/// Why a guard holds a flip back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hold {
    pub(crate) reason: HoldReason,
    /// The type outside the rule's vocabulary behind an `unrecognised_inferred_type` or
    /// `retired_inferred_type` hold.
    pub(crate) inferred_type: Option<String>,
}

impl Hold {
    fn because(reason: HoldReason) -> Hold {
        Hold {
            reason,
            inferred_type: None,
        }
    }
}

/// A flip the rule found and a guard holds back.
#[derive(Debug, Clone)]
pub(crate) struct HeldFlip {
    pub(crate) planned: PlannedFlip,
    pub(crate) hold: Hold,
}

impl HeldFlip {
    pub(crate) fn event(&self, now: DateTime<Utc>) -> Event {
        Event::Held(Held {
            flip: self.planned.event(now),
            reason: self.hold.reason,
            inferred_type: self.hold.inferred_type.clone(),
        })
    }
}

/// What decides whether a flip is held.
pub(crate) struct Holds<'a> {
    pub(crate) guards: &'a Guards,
    /// Every non-empty inferred type outside the vocabulary, from the snapshot table.
    pub(crate) unrecognised_inferred_types: &'a BTreeMap<String, u64>,
    pub(crate) now: DateTime<Utc>,
    /// The reviewed plan being applied: what it held stays held.
    pub(crate) reviewed: Option<&'a PlanFile>,
}

impl Holds<'_> {
    /// Why `planned` is held back, if it is.
    pub(crate) fn reason(&self, planned: &PlannedFlip) -> Option<Hold> {
        let inferred = planned
            .probe()
            .and_then(|probe| probe.inferred_type.as_deref());
        if let Some(inferred) =
            inferred.filter(|name| !name.is_empty() && !is_valid_agent_type(name))
        {
            return Some(outside_vocabulary(inferred));
        }
        if let Some(stored) = planned
            .at
            .flip
            .from
            .as_str()
            .filter(|stored| self.unrecognised_inferred_types.contains_key(*stored))
        {
            return Some(outside_vocabulary(stored));
        }
        if let (Some(max_age), Some(probe)) = (self.guards.max_probe_age, planned.probe()) {
            let limit = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
            if self.now - probe.last_discovered > limit {
                return Some(Hold::because(HoldReason::StaleProbe));
            }
        }
        if let Some(minimum) = self.guards.min_corroboration {
            let reclassification = planned
                .at
                .flip
                .from
                .as_str()
                .is_some_and(|from| from != UNKNOWN_TYPE)
                && planned.at.flip.to != UNKNOWN_TYPE;
            let agreeing = planned
                .evidence
                .as_ref()
                .map_or(0, |evidence| evidence.agreeing());
            if reclassification && agreeing < minimum {
                return Some(Hold::because(HoldReason::Uncorroborated));
            }
        }
        // A flip the reviewed plan marks held stays held, whatever guards this run has.
        self.reviewed
            .and_then(|reviewed| reviewed.held_reason(planned))
            .map(Hold::because)
    }

    /// Splits `flips` into those that may be written and those a guard holds back.
    pub(crate) fn split(&self, flips: Vec<PlannedFlip>) -> (Vec<PlannedFlip>, Vec<HeldFlip>) {
        let mut writable = Vec::new();
        let mut held = Vec::new();
        for planned in flips {
            match self.reason(&planned) {
                None => writable.push(planned),
                Some(hold) => held.push(HeldFlip { planned, hold }),
            }
        }
        (writable, held)
    }
}

/// Why a type outside the rule's vocabulary holds a flip: one the server retired says the probe
/// is older than the retirement; one never known says the server may be newer than the tool.
fn outside_vocabulary(name: &str) -> Hold {
    Hold {
        reason: if retirement_of(name).is_some() {
            HoldReason::RetiredInferredType
        } else {
            HoldReason::UnrecognisedInferredType
        },
        inferred_type: Some(name.to_owned()),
    }
}

/// Any held flip refuses the whole plan: nothing is written.
pub(crate) fn held_refusal(held: &[HeldFlip]) -> Option<Refusal> {
    if held.is_empty() {
        return None;
    }
    let mut reasons: BTreeMap<HoldReason, Vec<String>> = BTreeMap::new();
    for flip in held {
        reasons
            .entry(flip.hold.reason)
            .or_default()
            .extend(flip.hold.inferred_type.clone());
    }
    let reasons = reasons
        .into_iter()
        .map(|(reason, mut names)| {
            names.sort();
            names.dedup();
            if names.is_empty() {
                reason.as_str().to_owned()
            } else {
                format!("{} '{}'", reason.as_str(), names.join("', '"))
            }
        })
        .collect();
    Some(Refusal::Held {
        held: count(held.len()),
        reasons,
    })
}

/// More flips than `--max-flips`: the run writes nothing.
pub(crate) fn check_threshold(flips: usize, max_flips: usize) -> Option<Refusal> {
    (flips > max_flips).then(|| Refusal::TooManyFlips {
        flips: count(flips),
        max_flips: count(max_flips),
    })
}

/// The flips whose transition `--allow-transition` does not list; none when it lists nothing.
pub(crate) fn not_allowed(flips: &[PlannedFlip], allowed: &[Transition]) -> Vec<PlannedFlip> {
    if allowed.is_empty() {
        return Vec::new();
    }
    flips
        .iter()
        .filter(|planned| {
            let from = planned.at.flip.stored_label();
            !allowed
                .iter()
                .any(|allowed| allowed.from == from && allowed.to == planned.at.flip.to)
        })
        .cloned()
        .collect()
}

/// A plan holding a transition `--allow-transition` does not list is written not at all.
pub(crate) fn transitions_refusal(refused: &[PlannedFlip]) -> Option<Refusal> {
    if refused.is_empty() {
        return None;
    }
    let mut transitions: Vec<Transition> = refused
        .iter()
        .map(|planned| Transition::new(planned.at.flip.stored_label(), planned.at.flip.to.clone()))
        .collect();
    transitions.sort();
    transitions.dedup();
    Some(Refusal::NotAllowed {
        flips: count(refused.len()),
        transitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::SnapshotRow;
    use crate::domain::CrawlerEvidence;
    use crate::domain::ProfileFlip;
    use crate::plan::Basis;
    use crate::resolver::Flip;
    use serde_json::json;

    fn flip(from: serde_json::Value, to: &str, probed: DateTime<Utc>) -> PlannedFlip {
        let flip = Flip {
            index: 0,
            url: "https://acme.example/mcp".into(),
            from,
            to: to.into(),
        };
        let mut planned = PlannedFlip::new(
            ProfileFlip::new(uuid::Uuid::nil(), "acme", flip),
            Basis::Probe(SnapshotRow {
                inferred_type: Some(to.into()),
                last_discovered: probed,
                discovery_error: false,
                oauth_required: false,
            }),
        );
        planned.evidence = Some(CrawlerEvidence::for_flip(&[], to));
        planned
    }

    fn holds<'a>(
        guards: &'a Guards,
        now: DateTime<Utc>,
        none: &'a BTreeMap<String, u64>,
    ) -> Holds<'a> {
        Holds {
            guards,
            unrecognised_inferred_types: none,
            now,
            reviewed: None,
        }
    }

    /// A probe exactly `--max-probe-age` old is still fresh; a millisecond older is stale.
    #[test]
    fn max_probe_age_holds_only_a_probe_older_than_the_limit() {
        let now = Utc::now();
        let guards = Guards {
            max_probe_age: Some(std::time::Duration::from_secs(24 * 3600)),
            ..Guards::default()
        };
        let none = BTreeMap::new();
        let holds = holds(&guards, now, &none);
        let day = chrono::Duration::hours(24);
        assert_eq!(
            holds.reason(&flip(json!("buying"), "sales", now - day)),
            None
        );
        let older = now - day - chrono::Duration::milliseconds(1);
        assert_eq!(
            holds.reason(&flip(json!("buying"), "sales", older)),
            Some(Hold::because(HoldReason::StaleProbe))
        );
    }

    /// `--min-corroboration` holds a reclassification (known type to known type) only: the
    /// crawler never logs a flip to or from `unknown`, so those are never held for lack of rows.
    #[test]
    fn min_corroboration_holds_reclassifications_only() {
        let now = Utc::now();
        let guards = Guards {
            min_corroboration: Some(1),
            ..Guards::default()
        };
        let none = BTreeMap::new();
        let holds = holds(&guards, now, &none);
        assert_eq!(
            holds.reason(&flip(json!("buying"), "sales", now)),
            Some(Hold::because(HoldReason::Uncorroborated))
        );
        for (from, to) in [(json!("unknown"), "sales"), (json!("buyer"), "unknown")] {
            assert_eq!(
                holds.reason(&flip(from.clone(), to, now)),
                None,
                "{from} -> {to}"
            );
        }
        // A missing or null stored type reads as "unknown", and a non-string one is no type.
        assert_eq!(holds.reason(&flip(json!(3), "sales", now)), None);
    }
}
