//! What a run found and what became of it: the plan's census of the registry, and every flip once
//! with exactly one [`Disposition`]. The log's flip lines, the plan file, the refusals (and so
//! the exit code) and the summary all read this one list; [`Dispositions::summary`] is the one
//! place a run's numbers are counted.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::{count, Hold, Mode, SkipReason};
use crate::events::{Event, Summary};
use crate::outcome::{Ending, Outcome};
use crate::plan::{in_log_order, profiles_changed, PlannedFlip};

/// What the plan says of the registry as a whole, beside its flips.
#[derive(Debug, Clone, Default)]
pub(crate) struct Census {
    /// The plan finished: the counts below mean something.
    pub(crate) complete: bool,
    pub(crate) profiles_scanned: u64,
    pub(crate) malformed: u64,
    pub(crate) junk_elements: u64,
    pub(crate) unrecognised_inferred_types: BTreeMap<String, u64>,
}

/// What became of one flip. The plan gives each flip it found one of the first five; the write
/// turns `ToWrite` into `Written` or `NotWritten`, and adds the flips its recheck found that the
/// plan did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Nothing holds it back: an apply that nothing refused writes it.
    ToWrite,
    /// A guard holds it: never written, and the run is refused.
    Held(Hold),
    /// `--leave-held`: a guard holds it, and the reviewed plan it belongs to is applied without
    /// it: listed as held, never written, refusing nothing.
    LeftHeld(Hold),
    /// `--allow-transition` does not list its transition: never written, and the run is refused.
    NotAllowed,
    /// Found or planned, and left before the write, with why (a reviewed plan's departures, a
    /// revert's conflicts): listed with the plan.
    Departed(SkipReason),
    /// Written by a batch that committed.
    Written,
    /// Set out to be written and not written by the write itself, with why (the locked recheck,
    /// a deleted profile, timeouts): listed after the write.
    NotWritten(SkipReason),
    /// Found by the write's locked recheck but absent from the plan: not written, the next run
    /// finds it; listed after the write as `unplanned`.
    FoundAtWrite,
}

impl Disposition {
    /// One of the plan's flips, held ones among them: what `flips`, `profiles changed`, the
    /// transitions and the plan file count. A departure and a flip found at the write are not.
    fn found(&self) -> bool {
        !matches!(self, Disposition::Departed(_) | Disposition::FoundAtWrite)
    }

    /// One the apply set out to write, whatever the write made of it: what `to_write` and
    /// `--max-flips` count.
    pub(crate) fn set_out(&self) -> bool {
        matches!(
            self,
            Disposition::ToWrite
                | Disposition::NotAllowed
                | Disposition::Written
                | Disposition::NotWritten(_)
        )
    }

    /// The guard's hold on it, held or left held.
    pub(crate) fn hold(&self) -> Option<&Hold> {
        match self {
            Disposition::Held(hold) | Disposition::LeftHeld(hold) => Some(hold),
            _ => None,
        }
    }

    /// Why it was not written, for its skipped line and the summary's reasons.
    fn skip_reason(&self) -> Option<SkipReason> {
        match self {
            Disposition::Departed(reason) | Disposition::NotWritten(reason) => Some(*reason),
            Disposition::FoundAtWrite => Some(SkipReason::Unplanned),
            _ => None,
        }
    }
}

/// A flip and its disposition.
#[derive(Debug, Clone)]
pub(crate) struct Fate {
    pub(crate) planned: PlannedFlip,
    pub(crate) disposition: Disposition,
}

impl Fate {
    /// Its line in the log, as its disposition says it; `now` dates the probe.
    fn line(&self, now: DateTime<Utc>) -> Event {
        let flip = self.planned.event(now);
        match &self.disposition {
            Disposition::ToWrite | Disposition::Written => Event::Flip(flip),
            Disposition::Held(hold) | Disposition::LeftHeld(hold) => Event::Held {
                flip,
                hold: hold.clone(),
            },
            Disposition::NotAllowed => Event::NotAllowed(flip),
            Disposition::Departed(reason) | Disposition::NotWritten(reason) => Event::Skipped {
                flip,
                reason: *reason,
            },
            Disposition::FoundAtWrite => Event::Skipped {
                flip,
                reason: SkipReason::Unplanned,
            },
        }
    }
}

/// Every flip a run found, each once, in the order it was found (the write adds the flips it
/// found at the end). Every list the log prints is drawn from it in log order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Dispositions(Vec<Fate>);

/// Which dispositions a list of the log holds.
type Listing = fn(&Disposition) -> bool;

impl Dispositions {
    pub(crate) fn push(&mut self, planned: PlannedFlip, disposition: Disposition) {
        self.0.push(Fate {
            planned,
            disposition,
        });
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Fate> {
        self.0.iter()
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Fate> {
        self.0.iter_mut()
    }

    /// How many flips have a disposition `which` admits.
    pub(crate) fn count(&self, which: impl Fn(&Disposition) -> bool) -> u64 {
        count(
            self.0
                .iter()
                .filter(|fate| which(&fate.disposition))
                .count(),
        )
    }

    /// The flips an apply writes, in the order they were found.
    pub(crate) fn to_write(&self) -> Vec<&PlannedFlip> {
        self.0
            .iter()
            .filter(|fate| fate.disposition == Disposition::ToWrite)
            .map(|fate| &fate.planned)
            .collect()
    }

    /// The plan's flips, held ones among them, in log order: what the plan file lists.
    pub(crate) fn found(&self) -> Vec<&Fate> {
        self.listed(Disposition::found)
    }

    /// The flips `which` admits, in log order (stable: flips of one element keep the order they
    /// were found in).
    fn listed(&self, which: Listing) -> Vec<&Fate> {
        let fates: Vec<&Fate> = self
            .0
            .iter()
            .filter(|fate| which(&fate.disposition))
            .collect();
        in_log_order(&fates, |fate| &fate.planned)
            .into_iter()
            .copied()
            .collect()
    }

    /// The plan's lines, in the order the log prints them: the flips to write (those not allowed
    /// among them, so the list is the whole plan), then those held, those that departed, and
    /// those not allowed, each list in log order.
    pub(crate) fn plan_lines(&self, now: DateTime<Utc>) -> impl Iterator<Item = Event> + '_ {
        let flips = self
            .listed(|disposition| {
                matches!(disposition, Disposition::ToWrite | Disposition::NotAllowed)
            })
            .into_iter()
            .map(move |fate| Event::Flip(fate.planned.event(now)));
        let lists: [Listing; 3] = [
            |disposition| disposition.hold().is_some(),
            |disposition| matches!(disposition, Disposition::Departed(_)),
            |disposition| *disposition == Disposition::NotAllowed,
        ];
        let others = lists
            .into_iter()
            .flat_map(|which| self.listed(which))
            .map(move |fate| fate.line(now));
        flips.chain(others)
    }

    /// The write's lines: the flips it did not write and those it found unplanned, in log order.
    pub(crate) fn write_lines(&self, now: DateTime<Utc>) -> impl Iterator<Item = Event> + '_ {
        self.listed(|disposition| {
            matches!(
                disposition,
                Disposition::NotWritten(_) | Disposition::FoundAtWrite
            )
        })
        .into_iter()
        .map(move |fate| fate.line(now))
    }

    /// The flips to write whose batches committed, by element (a plan holds one flip per
    /// element), are written.
    pub(crate) fn mark_written(&mut self, committed: &[(Uuid, usize)]) {
        let committed: HashSet<&(Uuid, usize)> = committed.iter().collect();
        for fate in &mut self.0 {
            if fate.disposition == Disposition::ToWrite
                && committed.contains(&fate.planned.at.element())
            {
                fate.disposition = Disposition::Written;
            }
        }
    }

    /// What the write left: flips to write it did not write, by element, with why, and the flips
    /// its recheck found that the plan did not hold.
    pub(crate) fn mark_not_written(
        &mut self,
        not_written: &HashMap<(Uuid, usize), SkipReason>,
        found: Vec<PlannedFlip>,
    ) {
        for fate in &mut self.0 {
            if fate.disposition != Disposition::ToWrite {
                continue;
            }
            if let Some(reason) = not_written.get(&fate.planned.at.element()) {
                fate.disposition = Disposition::NotWritten(*reason);
            }
        }
        for planned in found {
            self.push(planned, Disposition::FoundAtWrite);
        }
    }

    /// Every count of the run's summary, each with one meaning, from the dispositions and the
    /// census.
    pub(crate) fn summary(
        &self,
        census: &Census,
        ending: &Ending,
        duration_ms: u64,
        crawler_log_unavailable: Option<String>,
    ) -> Summary {
        let found: Vec<&PlannedFlip> = self
            .0
            .iter()
            .filter(|fate| fate.disposition.found())
            .map(|fate| &fate.planned)
            .collect();
        let written = self.count(|disposition| *disposition == Disposition::Written);
        let mut summary = Summary {
            plan_complete: census.complete,
            profiles_scanned: census.profiles_scanned,
            profiles_changed: profiles_changed(found.iter().copied()),
            flips: count(found.len()),
            to_write: self.count(Disposition::set_out),
            held: self.count(|disposition| disposition.hold().is_some()),
            not_allowed: self.count(|disposition| *disposition == Disposition::NotAllowed),
            malformed: census.malformed,
            junk_elements: census.junk_elements,
            unrecognised_inferred_types: census.unrecognised_inferred_types.clone(),
            written,
            aborted: matches!(ending.outcome, Outcome::Refused(_)),
            interrupted_by: match ending.outcome {
                Outcome::Interrupted { stop, .. } => Some(stop.name()),
                _ => None,
            },
            duration_ms,
            mode: Some(ending.mode),
            run_id: (ending.mode == Mode::Apply && written > 0).then(|| ending.run_id.clone()),
            outcome: Some(ending.report()),
            crawler_log_unavailable,
            ..Summary::default()
        };
        for planned in found {
            summary.count_transition(&planned.at.flip);
        }
        for reason in self
            .0
            .iter()
            .filter_map(|fate| fate.disposition.skip_reason())
        {
            summary.count_skip(reason);
        }
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{HoldReason, ProfileFlip, Transition};
    use crate::plan::Basis;
    use crate::resolver::Flip;
    use serde_json::json;

    fn planned(profile: &str, id: u128, index: usize, to: &str) -> PlannedFlip {
        let flip = Flip {
            index,
            url: format!("https://{profile}.example/{index}"),
            from: json!("buying"),
            to: to.to_owned(),
        };
        PlannedFlip::new(
            ProfileFlip::new(Uuid::from_u128(id), profile, flip),
            Basis::NoSnapshot,
        )
    }

    fn ending(mode: Mode) -> Ending {
        Ending {
            outcome: Outcome::Completed,
            mode,
            to_write: 0,
            written: 0,
            run_id: "atb-x".into(),
        }
    }

    /// One flip of every disposition, as an apply leaves them: each count of the summary
    /// counts exactly the dispositions its meaning names.
    #[test]
    fn each_count_of_the_summary_has_one_meaning() {
        let held = Hold::because(HoldReason::StaleProbe);
        let mut dispositions = Dispositions::default();
        dispositions.push(planned("a", 1, 0, "sales"), Disposition::ToWrite);
        dispositions.push(planned("a", 1, 1, "sales"), Disposition::Written);
        dispositions.push(
            planned("b", 2, 0, "sales"),
            Disposition::NotWritten(SkipReason::ProfileGone),
        );
        dispositions.push(planned("c", 3, 0, "creative"), Disposition::NotAllowed);
        dispositions.push(planned("d", 4, 0, "sales"), Disposition::Held(held.clone()));
        dispositions.push(planned("e", 5, 0, "sales"), Disposition::LeftHeld(held));
        dispositions.push(
            planned("f", 6, 0, "sales"),
            Disposition::Departed(SkipReason::Unplanned),
        );
        dispositions.push(planned("g", 7, 0, "sales"), Disposition::FoundAtWrite);

        let summary = dispositions.summary(&Census::default(), &ending(Mode::Apply), 5, None);
        assert_eq!(summary.flips, 6, "written, not written and held are found");
        assert_eq!(summary.profiles_changed, 5, "a's two flips are one profile");
        assert_eq!(
            summary.to_write, 4,
            "held ones are never set out to be written"
        );
        assert_eq!(summary.held, 2);
        assert_eq!(summary.not_allowed, 1);
        assert_eq!(summary.written, 1);
        assert_eq!((summary.skipped, summary.unplanned), (1, 2));
        assert_eq!(
            summary.skipped_by_reason,
            [(SkipReason::ProfileGone, 1), (SkipReason::Unplanned, 2)].into()
        );
        assert_eq!(
            summary.transitions,
            [
                (Transition::new("buying", "creative"), 1),
                (Transition::new("buying", "sales"), 5)
            ]
            .into()
        );
        assert_eq!(summary.run_id.as_deref(), Some("atb-x"));
        assert_eq!(summary.duration_ms, 5);
    }

    /// The write marks by element: a committed element is written, a left one says why, and a
    /// flip that was not to be written keeps its disposition even at a committed element.
    #[test]
    fn the_write_marks_only_flips_to_write_by_their_element() {
        let mut dispositions = Dispositions::default();
        dispositions.push(planned("a", 1, 0, "sales"), Disposition::ToWrite);
        dispositions.push(planned("a", 1, 1, "sales"), Disposition::ToWrite);
        dispositions.push(planned("b", 2, 0, "sales"), Disposition::ToWrite);
        dispositions.push(
            planned("c", 3, 0, "sales"),
            Disposition::Departed(SkipReason::ChangedSinceRun),
        );
        let element = |id: u128, index: usize| (Uuid::from_u128(id), index);
        dispositions.mark_written(&[element(1, 1), element(3, 0)]);
        dispositions.mark_not_written(
            &[(element(2, 0), SkipReason::ChangedSincePlan)].into(),
            vec![planned("b", 2, 1, "creative")],
        );
        let after: Vec<&Disposition> = dispositions.iter().map(|fate| &fate.disposition).collect();
        assert_eq!(
            after,
            [
                &Disposition::ToWrite,
                &Disposition::Written,
                &Disposition::NotWritten(SkipReason::ChangedSincePlan),
                &Disposition::Departed(SkipReason::ChangedSinceRun),
                &Disposition::FoundAtWrite,
            ]
        );
    }

    /// The plan's lines: flips to write with the not-allowed ones among them, then held,
    /// departed and not allowed, each list sorted by profile label and element.
    #[test]
    fn the_plan_lines_list_each_disposition_in_its_place_and_in_log_order() {
        let mut dispositions = Dispositions::default();
        dispositions.push(planned("zulu", 1, 0, "sales"), Disposition::ToWrite);
        dispositions.push(planned("mike", 2, 0, "creative"), Disposition::NotAllowed);
        dispositions.push(
            planned("kilo", 3, 0, "sales"),
            Disposition::Departed(SkipReason::ChangedSincePlan),
        );
        dispositions.push(
            planned("bravo", 4, 0, "sales"),
            Disposition::Held(Hold::because(HoldReason::Uncorroborated)),
        );
        dispositions.push(planned("alpha", 5, 0, "sales"), Disposition::ToWrite);
        let lines: Vec<(&str, String)> = dispositions
            .plan_lines(Utc::now())
            .map(|event| match event {
                Event::Flip(flip) => ("flip", flip.at.profile),
                Event::Held { flip, .. } => ("held", flip.at.profile),
                Event::NotAllowed(flip) => ("not_allowed", flip.at.profile),
                Event::Skipped { flip, .. } => ("skipped", flip.at.profile),
                other => panic!("not a flip line: {other:?}"),
            })
            .collect();
        let expected = [
            ("flip", "alpha"),
            ("flip", "mike"),
            ("flip", "zulu"),
            ("held", "bravo"),
            ("skipped", "kilo"),
            ("not_allowed", "mike"),
        ];
        let expected: Vec<(&str, String)> = expected
            .iter()
            .map(|(kind, profile)| (*kind, (*profile).to_owned()))
            .collect();
        assert_eq!(lines, expected);
        assert_eq!(dispositions.write_lines(Utc::now()).count(), 0);
    }
}
