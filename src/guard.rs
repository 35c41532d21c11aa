//! The guards on top of the rule: flips it found that nobody may write (held), and the limits a
//! plan must stay within (`--max-flips`, `--allow-transition`). They never change what the rule
//! decides; they only stop a run from writing it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::config::Guards;
use crate::dispositions::{Disposition, Dispositions};
use crate::domain::{count, Hold, HoldReason, Transition};
use crate::outcome::Refusal;
use crate::plan::PlannedFlip;
use crate::plan_file::PlanFile;
use crate::resolver::{is_valid_agent_type, retirement_of, UNKNOWN_TYPE};

/// What decides whether a flip is held, and whether one that is not may be written.
pub(crate) struct Holds<'a> {
    pub(crate) guards: &'a Guards,
    /// `--leave-held`: a held flip is left unwritten instead of refusing the run.
    pub(crate) leave_held: bool,
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

    /// What the guards and `--allow-transition` make of `planned`: held (or left held), not
    /// allowed, or to write. Held flips are not checked against `--allow-transition`: they are
    /// never written anyway.
    pub(crate) fn disposition(&self, planned: &PlannedFlip) -> Disposition {
        match self.reason(planned) {
            Some(hold) if self.leave_held => Disposition::LeftHeld(hold),
            Some(hold) => Disposition::Held(hold),
            None if !allowed(planned, &self.guards.allow_transitions) => Disposition::NotAllowed,
            None => Disposition::ToWrite,
        }
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

/// Every limit and guard that refuses the plan of `dispositions`, in the order the outcome names
/// them; the run writes nothing when any does.
pub(crate) fn refusals(dispositions: &Dispositions, max_flips: usize) -> Vec<Refusal> {
    [
        held_refusal(dispositions),
        transitions_refusal(dispositions),
        check_threshold(dispositions.count(Disposition::set_out), max_flips),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Any held flip refuses the whole plan: nothing is written. A flip left held refuses nothing.
fn held_refusal(dispositions: &Dispositions) -> Option<Refusal> {
    let mut held = 0;
    let mut reasons: BTreeMap<HoldReason, Vec<String>> = BTreeMap::new();
    for fate in dispositions.iter() {
        if let Disposition::Held(hold) = &fate.disposition {
            held += 1;
            reasons
                .entry(hold.reason)
                .or_default()
                .extend(hold.inferred_type.clone());
        }
    }
    if held == 0 {
        return None;
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
    Some(Refusal::Held { held, reasons })
}

/// More flips than `--max-flips`: the run writes nothing.
fn check_threshold(flips: u64, max_flips: usize) -> Option<Refusal> {
    let max_flips = count(max_flips);
    (flips > max_flips).then_some(Refusal::TooManyFlips { flips, max_flips })
}

/// Whether `--allow-transition` lets `planned` be written: any transition when it lists none.
fn allowed(planned: &PlannedFlip, allowed: &[Transition]) -> bool {
    let from = planned.at.flip.stored_label();
    allowed.is_empty()
        || allowed
            .iter()
            .any(|allowed| allowed.from == from && allowed.to == planned.at.flip.to)
}

/// A plan holding a transition `--allow-transition` does not list is written not at all.
fn transitions_refusal(dispositions: &Dispositions) -> Option<Refusal> {
    let mut transitions: Vec<Transition> = dispositions
        .iter()
        .filter(|fate| fate.disposition == Disposition::NotAllowed)
        .map(|fate| {
            let flip = &fate.planned.at.flip;
            Transition::new(flip.stored_label(), flip.to.clone())
        })
        .collect();
    if transitions.is_empty() {
        return None;
    }
    let flips = count(transitions.len());
    transitions.sort();
    transitions.dedup();
    Some(Refusal::NotAllowed { flips, transitions })
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
            leave_held: false,
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

    /// A held flip refuses the plan, naming its reason and type; one left held refuses nothing.
    /// A flip not allowed refuses it and counts against `--max-flips`, as a flip to write does; a
    /// held one does not count.
    #[test]
    fn the_refusals_read_each_flips_disposition() {
        let now = Utc::now();
        let planned = |to: &str| flip(json!("buying"), to, now);
        let retail = Hold {
            reason: HoldReason::UnrecognisedInferredType,
            inferred_type: Some("retail_media".into()),
        };
        let mut left = Dispositions::default();
        left.push(planned("sales"), Disposition::ToWrite);
        left.push(planned("sales"), Disposition::LeftHeld(retail.clone()));
        assert_eq!(refusals(&left, 1), []);
        assert_eq!(
            refusals(&left, 0),
            [Refusal::TooManyFlips {
                flips: 1,
                max_flips: 0
            }]
        );

        let mut refused = Dispositions::default();
        refused.push(planned("sales"), Disposition::ToWrite);
        refused.push(planned("creative"), Disposition::NotAllowed);
        refused.push(planned("sales"), Disposition::Held(retail));
        refused.push(
            planned("sales"),
            Disposition::Held(Hold::because(HoldReason::StaleProbe)),
        );
        assert_eq!(
            refusals(&refused, 1),
            [
                Refusal::Held {
                    held: 2,
                    reasons: vec![
                        "unrecognised_inferred_type 'retail_media'".into(),
                        "stale_probe".into()
                    ]
                },
                Refusal::NotAllowed {
                    flips: 1,
                    transitions: vec![Transition::new("buying", "creative")]
                },
                Refusal::TooManyFlips {
                    flips: 2,
                    max_flips: 1
                },
            ]
        );
    }
}
