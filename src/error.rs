//! The failures that decide an exit code. Everything else is an `anyhow::Error` and exits 1.

use std::fmt;

/// A failure the operator must act on differently from a crash; `code()` is its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Bad flags or configuration: nothing was read or written.
    Usage(String),
    /// The plan has more flips than `--max-flips`: nothing was written.
    ThresholdExceeded { flips: usize, max_flips: usize },
    /// The plan holds transitions that `--allow-transition` does not list: nothing was written.
    TransitionNotAllowed { transitions: Vec<String> },
    /// A guard holds flips the rule found (a type the rule does not know, a stale or
    /// uncorroborated probe): nothing was written.
    Held { held: usize, reasons: Vec<String> },
    /// The target is missing a table, a column or a privilege: nothing was written.
    Preflight(String),
    /// SIGINT or SIGTERM before the plan was complete: nothing was written.
    InterruptedPlanning { signal: i32 },
    /// SIGINT or SIGTERM: the run stopped between batches; what was written is committed.
    Interrupted {
        signal: i32,
        written: u64,
        planned: u64,
        run_id: String,
    },
}

impl Failure {
    pub fn code(&self) -> i32 {
        match self {
            Failure::Usage(_) => 2,
            Failure::ThresholdExceeded { .. }
            | Failure::TransitionNotAllowed { .. }
            | Failure::Held { .. } => 3,
            Failure::Preflight(_) => 4,
            Failure::Interrupted { signal, .. } | Failure::InterruptedPlanning { signal } => {
                128 + signal
            }
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(message) | Failure::Preflight(message) => f.write_str(message),
            Failure::ThresholdExceeded { flips, max_flips } => write!(
                f,
                "the plan has {flips} flips, more than --max-flips {max_flips}: nothing was written; \
                 read the flips above, and rerun with a higher --max-flips only if every one is expected"
            ),
            Failure::Held { held, reasons } => {
                write!(f, "{held} flips are held ({}): nothing was written", reasons.join("; "))?;
                // Only the advice for the reasons given, so none of it is false here.
                let has = |reason: &str| reasons.iter().any(|given| given.starts_with(reason));
                if has("unrecognised_inferred_type") {
                    f.write_str(
                        "; a type this tool's rule does not know means the registry server is \
                         newer than the tool: stop and update the tool",
                    )?;
                }
                if has("retired_inferred_type") {
                    f.write_str(
                        "; a type the server has retired means the probe predates the \
                         retirement: re-probe the agent (the crawler's manual refresh) or follow \
                         the server and demote it",
                    )?;
                }
                if has("stale_probe") || has("uncorroborated") {
                    f.write_str(
                        "; a stale or uncorroborated probe needs a fresh crawl or a closer review",
                    )?;
                }
                Ok(())
            }
            Failure::InterruptedPlanning { signal } => write!(
                f,
                "interrupted by {} while planning: nothing was written",
                signal_name(*signal)
            ),
            Failure::TransitionNotAllowed { transitions } => write!(
                f,
                "the plan holds transitions that --allow-transition does not list ({}): nothing \
                 was written; review them, and allow them only if staging showed them too",
                transitions.join(", ")
            ),
            Failure::Interrupted {
                signal,
                written,
                planned,
                run_id,
            } => write!(
                f,
                "interrupted by {} after writing {written} of {planned} planned flips under run id \
                 '{run_id}'; every batch committed whole or not at all: rerun the same command to \
                 pick up the rest",
                signal_name(*signal)
            ),
        }
    }
}

pub(crate) fn signal_name(signal: i32) -> &'static str {
    match signal {
        2 => "SIGINT",
        15 => "SIGTERM",
        _ => "a signal",
    }
}

impl std::error::Error for Failure {}

/// The error as one line, outermost context first. A database error repeats its own message as
/// its source (`error returned from database: X`, then `X`); a cause that the line already ends
/// with is dropped, so the operator reads each cause once.
pub fn render(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Whether the error is a closed stdout (`| head`): the reader has what it wanted, and the
/// program ends quietly, as ripgrep does.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The exit status for an error returned by [`crate::run`].
pub fn exit_code(error: &anyhow::Error) -> i32 {
    error
        .chain()
        .find_map(|cause| cause.downcast_ref::<Failure>())
        .map_or(1, Failure::code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[derive(Debug)]
    struct Echo(&'static str, Option<Box<Echo>>);

    impl fmt::Display for Echo {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Echo {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1
                .as_deref()
                .map(|echo| echo as &(dyn std::error::Error + 'static))
        }
    }

    #[test]
    fn render_says_a_repeated_cause_once() {
        let inner = Echo("canceling statement due to statement timeout", None);
        let outer = Echo(
            "canceling statement due to statement timeout",
            Some(Box::new(inner)),
        );
        let error = anyhow::Error::new(outer).context("could not update member_profiles");
        assert_eq!(
            render(&error),
            "could not update member_profiles: canceling statement due to statement timeout"
        );
    }

    #[test]
    fn render_says_a_database_cause_once_when_sqlx_wraps_it() {
        let inner = Echo("canceling statement due to statement timeout", None);
        let outer = Echo(
            "error returned from database: canceling statement due to statement timeout",
            Some(Box::new(inner)),
        );
        let error = anyhow::Error::new(outer).context("could not update member_profiles");
        assert_eq!(
            render(&error),
            "could not update member_profiles: error returned from database: canceling \
             statement due to statement timeout"
        );
    }

    #[test]
    fn typed_failures_keep_their_code_under_context() {
        let error = Err::<(), _>(Failure::Preflight("missing".into()))
            .context("while checking the target")
            .unwrap_err();
        assert_eq!(exit_code(&error), 4);
        assert_eq!(exit_code(&anyhow::anyhow!("boom")), 1);
        let threshold = Failure::ThresholdExceeded {
            flips: 3,
            max_flips: 2,
        };
        assert_eq!(threshold.code(), 3);
    }
}
