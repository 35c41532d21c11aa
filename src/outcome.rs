//! How a run ended, as one value. The exit code, the log's outcome line (text, JSON, Markdown),
//! the stderr message and the exit-code table in `--help`, README and RUNBOOK are all derived
//! from [`Ending`] and [`EXIT_CODES`], so they cannot disagree.

use std::fmt;

use serde::Serialize;

use crate::domain::{Mode, Transition};

/// SIGINT, SIGTERM, and the number a closed stdout is reported under (as a shell reports a
/// process that SIGPIPE ended: 128 + 13).
pub const SIGINT: i32 = 2;
pub(crate) const SIGPIPE: i32 = 13;
pub const SIGTERM: i32 = 15;

/// Every exit status the tool uses, with what it means. `--help` prints this table, and a test
/// holds README.md and RUNBOOK.md to it.
pub const EXIT_CODES: [(i32, &str); 8] = [
    (
        0,
        "done: a dry-run whose plan may be applied, or an apply that wrote all that held",
    ),
    (
        1,
        "error after connecting, or flips left unwritten by timeouts; rerun to finish",
    ),
    (
        2,
        "usage or configuration: flag, plan file, URL, host, password, database, TLS",
    ),
    (
        3,
        "refused by --max-flips, --allow-transition or a held flip: nothing written",
    ),
    (
        4,
        "preflight: a missing table, column or privilege, or a read-only target",
    ),
    (
        130,
        "interrupted by SIGINT: every batch committed whole or not at all; rerun",
    ),
    (
        141,
        "stdout closed during an apply (| head): stopped as on SIGINT; rerun",
    ),
    (143, "interrupted by SIGTERM: as for 130"),
];

/// The exit-code table as `--help` prints it.
pub(crate) fn exit_code_help() -> String {
    let mut help = String::from("Exit codes:\n");
    for (code, meaning) in EXIT_CODES {
        help.push_str(&format!("  {code:>3}  {meaning}\n"));
    }
    help
}

/// What stopped a run early, as the operator caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Signal(i32),
    /// The reader of stdout went away (`| head`, a closed pager).
    StdoutClosed,
}

impl Stop {
    pub(crate) fn from_number(number: i32) -> Stop {
        if number == SIGPIPE {
            Stop::StdoutClosed
        } else {
            Stop::Signal(number)
        }
    }

    pub fn number(self) -> i32 {
        match self {
            Stop::Signal(number) => number,
            Stop::StdoutClosed => SIGPIPE,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stop::Signal(SIGINT) => "SIGINT",
            Stop::Signal(SIGTERM) => "SIGTERM",
            Stop::Signal(_) => "a signal",
            Stop::StdoutClosed => "a closed stdout",
        }
    }
}

/// Where a run was when it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Plan,
    Write,
}

/// One limit or guard that refused a plan. Every one that tripped is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A guard holds flips: nobody may write them.
    Held { held: u64, reasons: Vec<String> },
    /// Flips of transitions `--allow-transition` does not list.
    NotAllowed {
        flips: u64,
        transitions: Vec<Transition>,
    },
    /// More flips to write than `--max-flips`.
    TooManyFlips { flips: u64, max_flips: u64 },
}

impl Refusal {
    fn kind(&self) -> &'static str {
        match self {
            Refusal::Held { .. } => "held",
            Refusal::NotAllowed { .. } => "not_allowed",
            Refusal::TooManyFlips { .. } => "max_flips",
        }
    }

    /// What to do about it: for held flips, only the advice that fits the reasons given, so
    /// none of it is false.
    fn advice(&self) -> String {
        match self {
            Refusal::Held { reasons, .. } => {
                let has = |reason: &str| reasons.iter().any(|given| given.starts_with(reason));
                let mut advice = Vec::new();
                if has("unrecognised_inferred_type") {
                    advice.push(
                        "a type this tool's rule does not know means the registry server is \
                         newer than the tool: stop and update the tool",
                    );
                }
                if has("retired_inferred_type") {
                    advice.push(
                        "a type the server has retired means the probe predates the retirement: \
                         re-probe the agent (the crawler's manual refresh) or follow the server \
                         and demote it; a reviewed plan may be applied with --leave-held",
                    );
                }
                if has("stale_probe") || has("uncorroborated") {
                    advice.push(
                        "a stale or uncorroborated probe needs a fresh crawl or a closer review",
                    );
                }
                advice.join("; ")
            }
            Refusal::NotAllowed { .. } => {
                "review them, and allow them only if staging showed them too".to_owned()
            }
            Refusal::TooManyFlips { .. } => "read the flips above, and rerun with a higher \
                 --max-flips only if every one is expected"
                .to_owned(),
        }
    }
}

/// The cause alone, with its numbers: what the log's outcome line says.
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Held { held, reasons } => {
                write!(f, "{} held ({})", flips(*held), reasons.join("; "))
            }
            Refusal::NotAllowed {
                flips: n,
                transitions,
            } => write!(
                f,
                "{} of transitions --allow-transition does not list ({})",
                flips(*n),
                transitions
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Refusal::TooManyFlips {
                flips: n,
                max_flips,
            } => {
                write!(
                    f,
                    "{} to write, more than --max-flips {max_flips}",
                    flips(*n)
                )
            }
        }
    }
}

/// `1 flip`, `3 flips`.
pub fn flips(count: u64) -> String {
    if count == 1 {
        "1 flip".to_owned()
    } else {
        format!("{count} flips")
    }
}

/// How a run that printed its header ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing stopped it: a dry-run's plan may be applied; an apply wrote every flip that still
    /// held exactly as planned.
    Completed,
    /// Limits or guards refused the plan: nothing was written.
    Refused(Vec<Refusal>),
    /// Batches kept hitting lock or statement timeouts: their flips were not written.
    TimedOut { not_written: u64 },
    /// A signal or a closed stdout: no new write started after it.
    Interrupted {
        stop: Stop,
        during: Phase,
        /// A second signal: the batch in flight was abandoned, and the server rolls it back.
        twice: bool,
        /// With `twice`: the batch in flight had sent its COMMIT, so it may have committed.
        at_commit: bool,
    },
    /// An error after the header: a lost connection, a statement timeout while planning, a
    /// failure nobody expected. `code` is the error's own exit status (1 unless it is typed).
    Failed { error: String, code: i32 },
}

/// How a run ended, with the facts every rendering of it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub outcome: Outcome,
    pub mode: Mode,
    /// Flips the apply set out to write (after the guards).
    pub to_write: u64,
    pub written: u64,
    pub run_id: String,
}

impl Ending {
    /// The process's exit status.
    pub fn code(&self) -> i32 {
        match &self.outcome {
            Outcome::Completed => 0,
            Outcome::Refused(_) => 3,
            Outcome::TimedOut { .. } => 1,
            Outcome::Failed { code, .. } => *code,
            // A dry-run's verdict does not depend on whether a pager read all of it.
            Outcome::Interrupted {
                stop: Stop::StdoutClosed,
                ..
            } if self.mode == Mode::DryRun => 0,
            Outcome::Interrupted { stop, .. } => 128 + stop.number(),
        }
    }

    /// `completed`, `refused`, ...: the JSON outcome's `kind`.
    pub fn kind(&self) -> &'static str {
        match self.outcome {
            Outcome::Completed => "completed",
            Outcome::Refused(_) => "refused",
            Outcome::TimedOut { .. } => "timed_out",
            Outcome::Interrupted { .. } => "interrupted",
            Outcome::Failed { .. } => "failed",
        }
    }

    /// What was written, and under which run id.
    fn written_text(&self) -> String {
        match (self.mode, self.written) {
            (Mode::DryRun, _) => "nothing was written (dry-run)".to_owned(),
            (Mode::Apply, 0) => "nothing was written".to_owned(),
            (Mode::Apply, written) => format!(
                "{} of {} written under run id '{}'",
                written, self.to_write, self.run_id
            ),
        }
    }

    /// The log's outcome line: the cause, then what was written.
    pub fn line(&self) -> String {
        match &self.outcome {
            Outcome::Completed if self.mode == Mode::Apply => {
                format!("completed; {}", self.written_text())
            }
            Outcome::Completed => "completed".to_owned(),
            Outcome::Refused(refusals) => format!(
                "refused: {}; nothing was written",
                refusals
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            Outcome::TimedOut { not_written } => format!(
                "{} not written (lock or statement timeouts); {}; rerun the same command to finish",
                flips(*not_written),
                self.written_text()
            ),
            Outcome::Interrupted {
                stop,
                during,
                twice,
                at_commit,
            } => {
                let mut line = format!("interrupted by {}", stop.name());
                if *twice {
                    line.push_str(" twice");
                }
                match during {
                    Phase::Plan => line.push_str(" while planning: nothing was written"),
                    Phase::Write => {
                        if *twice && *at_commit {
                            line.push_str(
                                "; the batch in flight had sent its COMMIT and may have \
                                 committed: 'history' shows what was stored",
                            );
                        } else if *twice {
                            line.push_str("; the batch in flight was rolled back");
                        }
                        line.push_str(&format!(
                            "; {}; rerun the same command to finish",
                            self.written_text()
                        ));
                    }
                }
                line
            }
            Outcome::Failed { error, .. } => {
                let tail = if self.mode == Mode::Apply && self.written > 0 {
                    format!(
                        "; {}; rerun the same command to finish",
                        self.written_text()
                    )
                } else {
                    format!("; {}", self.written_text())
                };
                format!("failed: {error}{tail}")
            }
        }
    }

    /// What the JSON summary carries: the kind, the exit code and the line.
    pub fn report(&self) -> OutcomeReport {
        let (refused_by, signal) = match &self.outcome {
            Outcome::Refused(refusals) => (refusals.iter().map(Refusal::kind).collect(), None),
            Outcome::Interrupted { stop, .. } => (Vec::new(), Some(stop.name())),
            _ => (Vec::new(), None),
        };
        OutcomeReport {
            kind: self.kind(),
            exit_code: self.code(),
            refused_by,
            signal,
            message: self.line(),
        }
    }
}

/// The stderr message: the outcome line, and what to do.
impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Refused(refusals) => {
                let causes: Vec<String> = refusals.iter().map(ToString::to_string).collect();
                let advice: Vec<String> = refusals.iter().map(Refusal::advice).collect();
                write!(
                    f,
                    "refused: {}: nothing was written; {}",
                    causes.join("; "),
                    advice.join("; ")
                )
            }
            Outcome::Interrupted {
                stop: Stop::StdoutClosed,
                during,
                ..
            } => write!(
                f,
                "stdout was closed while {}: stopped as on SIGINT; {}; rerun without closing the \
                 output (e.g. '| tee FILE' rather than '| head') to finish",
                match during {
                    Phase::Plan => "planning",
                    Phase::Write => "writing",
                },
                self.written_text()
            ),
            Outcome::TimedOut { not_written } => {
                let rest = if self.written == 0 {
                    "nothing was written".to_owned()
                } else {
                    format!(
                        "the other {} were written under run id '{}'",
                        self.written, self.run_id
                    )
                };
                write!(
                    f,
                    "{not_written} planned flips were not written because their batches kept \
                     hitting lock or statement timeouts (see the skipped lines above); {rest}: \
                     rerun the same command to finish"
                )
            }
            // The error first, as every other error reads; then what was written.
            Outcome::Failed { error, .. } => match (self.mode, self.written) {
                (Mode::Apply, 1..) => write!(
                    f,
                    "{error}; {}; every batch committed whole or not at all: rerun the same \
                     command to finish",
                    self.written_text()
                ),
                _ => write!(f, "{error}; {}", self.written_text()),
            },
            _ => f.write_str(&self.line()),
        }
    }
}

/// The outcome in the JSON summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutcomeReport {
    pub kind: &'static str,
    pub exit_code: i32,
    /// For `refused`: `held`, `not_allowed`, `max_flips`, each that tripped.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused_by: Vec<&'static str>,
    /// For `interrupted`: `SIGINT`, `SIGTERM` or `a closed stdout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<&'static str>,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ending(outcome: Outcome, mode: Mode) -> Ending {
        Ending {
            outcome,
            mode,
            to_write: 10,
            written: 4,
            run_id: "atb-x".into(),
        }
    }

    #[test]
    fn every_outcome_has_a_documented_exit_code() {
        let documented: Vec<i32> = EXIT_CODES.iter().map(|(code, _)| *code).collect();
        let outcomes = [
            Outcome::Completed,
            Outcome::Refused(vec![]),
            Outcome::TimedOut { not_written: 1 },
            Outcome::Failed {
                error: "x".into(),
                code: 1,
            },
        ];
        let stops = [
            Stop::Signal(SIGINT),
            Stop::Signal(SIGTERM),
            Stop::StdoutClosed,
        ];
        let interrupted = stops.iter().map(|stop| Outcome::Interrupted {
            stop: *stop,
            during: Phase::Write,
            twice: false,
            at_commit: false,
        });
        for outcome in outcomes.into_iter().chain(interrupted) {
            for mode in [Mode::DryRun, Mode::Apply] {
                let ending = ending(outcome.clone(), mode);
                assert!(
                    documented.contains(&ending.code()),
                    "{outcome:?} in {mode:?} exits {}",
                    ending.code()
                );
            }
        }
    }

    #[test]
    fn a_closed_stdout_stops_an_apply_but_not_a_dry_runs_verdict() {
        let closed = Outcome::Interrupted {
            stop: Stop::StdoutClosed,
            during: Phase::Write,
            twice: false,
            at_commit: false,
        };
        assert_eq!(ending(closed.clone(), Mode::Apply).code(), 141);
        assert_eq!(ending(closed, Mode::DryRun).code(), 0);
    }

    #[test]
    fn a_refusal_names_every_limit_that_tripped_with_its_numbers() {
        let ending = ending(
            Outcome::Refused(vec![
                Refusal::NotAllowed {
                    flips: 2,
                    transitions: vec![Transition::new("buyer", "unknown")],
                },
                Refusal::TooManyFlips {
                    flips: 31,
                    max_flips: 25,
                },
            ]),
            Mode::Apply,
        );
        assert_eq!(
            ending.line(),
            "refused: 2 flips of transitions --allow-transition does not list (buyer:unknown); \
             31 flips to write, more than --max-flips 25; nothing was written"
        );
        assert_eq!(ending.code(), 3);
        assert_eq!(ending.report().refused_by, ["not_allowed", "max_flips"]);
    }

    #[test]
    fn an_interrupted_apply_says_what_was_written_and_under_which_run_id() {
        let ending = ending(
            Outcome::Interrupted {
                stop: Stop::Signal(SIGINT),
                during: Phase::Write,
                twice: true,
                at_commit: false,
            },
            Mode::Apply,
        );
        assert_eq!(
            ending.line(),
            "interrupted by SIGINT twice; the batch in flight was rolled back; 4 of 10 written \
             under run id 'atb-x'; rerun the same command to finish"
        );
        assert_eq!(ending.code(), 130);
    }

    #[test]
    fn help_lists_every_exit_code() {
        let help = exit_code_help();
        for (code, meaning) in EXIT_CODES {
            assert!(help.contains(&format!("{code:>3}  {meaning}")), "{help}");
        }
    }
}
