//! The failures that decide an exit code. Everything else is an `anyhow::Error` and exits 1.

use std::fmt;

use crate::outcome::{Ending, Stop};

/// A failure the operator must act on differently from a crash; `code()` is its exit status.
/// Failures before a run's log header are `Usage` and `Preflight`; every ending after it is an
/// [`Ending`], whose outcome alone decides the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Bad flags or configuration (a URL, host, password or database that does not connect):
    /// nothing was read or written.
    Usage(String),
    /// The target is missing a table, a column or a privilege: nothing was written.
    Preflight(String),
    /// A run that printed its header ended otherwise than completed.
    Ended(Box<Ending>),
    /// A signal stopped a command that is not a run (the rehearsal): `what` says what it left.
    Interrupted { stop: Stop, what: &'static str },
}

impl Failure {
    pub fn code(&self) -> i32 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Preflight(_) => 4,
            Failure::Ended(ending) => ending.code(),
            Failure::Interrupted { stop, .. } => 128 + stop.number(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(message) | Failure::Preflight(message) => f.write_str(message),
            Failure::Ended(ending) => ending.fmt(f),
            Failure::Interrupted { stop, what } => {
                write!(f, "interrupted by {}: {what}", stop.name())
            }
        }
    }
}

impl std::error::Error for Failure {}

/// The error as one line, outermost context first. A database error repeats its own message as
/// its source (`error returned from database: X`, then `X`); a cause that the line already ends
/// with is dropped, so the operator reads each cause once.
pub fn render(error: &anyhow::Error) -> String {
    // A run's ending already says its cause and what was written.
    if let Some(ending @ Failure::Ended(_)) = error.downcast_ref::<Failure>() {
        return ending.to_string();
    }
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
    failure(error).map_or(1, Failure::code)
}

/// The typed failure in `error`, whether it is the error itself, a cause, or a context added to
/// another error (a connection failure keeps the driver's error as its cause).
pub fn failure(error: &anyhow::Error) -> Option<&Failure> {
    error.downcast_ref::<Failure>().or_else(|| {
        error
            .chain()
            .find_map(|cause| cause.downcast_ref::<Failure>())
    })
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
        let refused = Failure::Ended(Box::new(Ending {
            outcome: crate::outcome::Outcome::Refused(vec![]),
            mode: crate::domain::Mode::Apply,
            to_write: 3,
            written: 0,
            run_id: "atb-x".into(),
        }));
        assert_eq!(refused.code(), 3);
        let connect = anyhow::anyhow!("connection refused")
            .context(Failure::Usage("could not connect".into()));
        assert_eq!(exit_code(&connect), 2);
    }
}
