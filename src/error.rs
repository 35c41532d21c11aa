//! The failures that decide an exit code, each refusal a variant carrying the values it names,
//! its message its `Display` (as diesel_cli keeps its messages in its error enum), its exit code
//! decided in [`Failure::code`] alone. Everything else is an `anyhow::Error` and exits 1.

use std::fmt;
use std::path::PathBuf;

use crate::outcome::{Ending, Stop};
use crate::plan_file::{Fingerprint, DIGEST_PREFIX, FORMAT};
use crate::report::precise_age;

/// A failure the operator must act on differently from a crash; `code()` is its exit status.
/// Failures before a run's log header are `Usage` and `Preflight`; every ending after it is an
/// [`Ending`], whose outcome alone decides the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Bad flags or configuration (a URL, host, password or database that does not connect, a
    /// reviewed plan that may not be applied): nothing was read or written.
    Usage(Usage),
    /// The target is missing a table, a column or a privilege: nothing was written.
    Preflight(Preflight),
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
            Failure::Usage(usage) => usage.fmt(f),
            Failure::Preflight(preflight) => preflight.fmt(f),
            Failure::Ended(ending) => ending.fmt(f),
            Failure::Interrupted { stop, what } => {
                write!(f, "interrupted by {}: {what}", stop.name())
            }
        }
    }
}

impl std::error::Error for Failure {}

/// What the operator asked for that cannot be done as asked (exit 2), with the values they gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usage {
    /// Neither `--database-url` nor `DATABASE_URL`.
    NoDatabase,
    /// `--leave-held` without `--plan`: only reviewed held flips may be left.
    LeaveHeldWithoutPlan,
    /// `--expect-database` names another database than the one connected to.
    WrongDatabase { connected: String, expected: String },
    /// `revert` or `history` names a run with no audit rows of the tool.
    NoSuchRun { run_id: String },
    /// The reviewed plan's file cannot be read.
    PlanUnreadable { path: PathBuf, cause: String },
    /// The reviewed plan's file is not a plan.
    NotAPlan { path: PathBuf, cause: String },
    /// The reviewed plan is of a format this tool does not read.
    PlanFormat { path: PathBuf, format: String },
    /// The reviewed plan's digest is not one `--plan-out` writes.
    PlanDigestMalformed {
        path: PathBuf,
        digest: serde_json::Value,
    },
    /// The reviewed plan's content is not what `--plan-out` wrote.
    PlanChanged {
        path: PathBuf,
        actual: String,
        written: String,
    },
    /// The reviewed plan was made on another database. Boxed, so that every `Result` carrying a
    /// `Failure` stays small.
    PlanElsewhere {
        made_on: Box<Fingerprint>,
        here: Box<Fingerprint>,
    },
    /// The reviewed plan is older than `--plan-max-age`.
    PlanTooOld {
        age: chrono::Duration,
        max_age: chrono::Duration,
    },
    /// The database URL names no scheme.
    UrlWithoutScheme,
    /// The database URL's scheme is not PostgreSQL's.
    UrlScheme { scheme: String },
    /// The database URL cannot be parsed; `reason` is the parser's, with the URL redacted.
    UrlUnparsable { reason: String },
    /// A connection option of the URL that must be a whole number is not.
    ConnectOption { key: String, value: String },
    /// The server refused the connection or could not be reached. `target` is its address and
    /// database; for a refused login, `hint` says where the password came from (else empty).
    Unreachable { target: String, hint: String },
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Usage::NoDatabase => {
                f.write_str("no database given: set DATABASE_URL or pass --database-url")
            }
            Usage::LeaveHeldWithoutPlan => f.write_str(
                "--leave-held needs --plan FILE: the held flips must have been reviewed; make a \
                 plan with --dry-run --plan-out, review it, then --apply --plan FILE --leave-held",
            ),
            Usage::WrongDatabase {
                connected,
                expected,
            } => write!(
                f,
                "connected to database '{connected}' but --expect-database is '{expected}': \
                 nothing was read; check DATABASE_URL"
            ),
            Usage::NoSuchRun { run_id } => write!(
                f,
                "no audit rows with run id '{run_id}' and source 'backfill_script': list the runs \
                 with 'agent-type-backfill history'"
            ),
            Usage::PlanUnreadable { path, cause } => {
                write!(f, "could not read the plan '{}': {cause}", path.display())
            }
            Usage::NotAPlan { path, cause } => write!(
                f,
                "'{}' is not a plan written by --plan-out: {cause}",
                path.display()
            ),
            Usage::PlanFormat { path, format } => write!(
                f,
                "'{}' has plan format '{format}', this tool reads '{FORMAT}'",
                path.display()
            ),
            Usage::PlanDigestMalformed { path, digest } => write!(
                f,
                "the plan '{}' has digest {digest}, not a '{DIGEST_PREFIX}' digest written by \
                 --plan-out: nothing was read or written; make a new plan with --dry-run \
                 --plan-out",
                path.display()
            ),
            Usage::PlanChanged {
                path,
                actual,
                written,
            } => write!(
                f,
                "the plan '{}' was changed after --plan-out wrote it: its content digests to \
                 {actual}, not the {written} it was written with: nothing was read or written; a \
                 reviewed plan is applied only as written: make a new plan with --dry-run \
                 --plan-out (narrow what is written with --allow-transition or --max-flips, which \
                 the log records)",
                path.display()
            ),
            Usage::PlanElsewhere { made_on, here } => {
                write!(
                    f,
                    "the plan was made on {made_on} but this is {here}: nothing was written; make \
                     a new plan with --dry-run --plan-out against this database"
                )?;
                if made_on.standby {
                    f.write_str(
                        " (a plan made on a standby applies on its primary only when both \
                         system_identifiers are readable: GRANT EXECUTE ON FUNCTION \
                         pg_control_system() to the user on the primary)",
                    )?;
                }
                Ok(())
            }
            Usage::PlanTooOld { age, max_age } => write!(
                f,
                "the plan is {} old, more than --plan-max-age {}: nothing was written; make a new \
                 plan with --dry-run --plan-out",
                precise_age(*age),
                precise_age(*max_age)
            ),
            Usage::UrlWithoutScheme => f.write_str(
                "the database URL must start with postgres:// or postgresql://: check \
                 DATABASE_URL or --database-url",
            ),
            Usage::UrlScheme { scheme } => write!(
                f,
                "the database URL starts with '{scheme}://', but only postgres:// and \
                 postgresql:// are PostgreSQL URLs: check DATABASE_URL or --database-url"
            ),
            Usage::UrlUnparsable { reason } => write!(
                f,
                "the database URL could not be parsed ({reason}): check DATABASE_URL or \
                 --database-url"
            ),
            Usage::ConnectOption { key, value } => write!(
                f,
                "invalid integer value '{value}' for connection option '{key}': give a whole \
                 number"
            ),
            Usage::Unreachable { target, hint } => write!(
                f,
                "could not connect to '{target}': check DATABASE_URL, the network and the \
                 credentials{hint}"
            ),
        }
    }
}

/// What the target lacks for the command (exit 4): found before anything is read or written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preflight {
    /// Tables or columns missing, or of another type: probably not the registry database.
    Schema { problems: Vec<String> },
    /// Privileges the command uses that the user lacks, or a target that takes no writes; each
    /// problem names its fix.
    Access { problems: Vec<String> },
    /// `--max-replica-lag`, and `role` may not read the standbys' lag.
    ReplicaLagUnreadable { role: String },
    /// `--min-corroboration`, and `user` may not read the crawler's rows, for the reason `why`.
    CrawlerLogUnreadable { why: String, user: String },
}

impl fmt::Display for Preflight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("preflight failed, nothing was read or written: ")?;
        match self {
            Preflight::Schema { problems } => write!(
                f,
                "{}; point DATABASE_URL at the registry database",
                problems.join("; ")
            ),
            Preflight::Access { problems } => f.write_str(&problems.join("; ")),
            Preflight::ReplicaLagUnreadable { role } => write!(
                f,
                "--max-replica-lag reads each standby's replay lag from pg_stat_replication, \
                 which shows it only to superusers and members of pg_read_all_stats, and user \
                 {role} is neither: run GRANT pg_monitor TO {role} (or pg_read_all_stats), or run \
                 without --max-replica-lag"
            ),
            Preflight::CrawlerLogUnreadable { why, user } => write!(
                f,
                "--min-corroboration reads the crawler's rows in type_reclassification_log, but \
                 there is {why}: GRANT SELECT ON type_reclassification_log TO {user}, or run \
                 without --min-corroboration"
            ),
        }
    }
}

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
        let missing = Preflight::Schema {
            problems: vec!["table 'member_profiles' is missing".into()],
        };
        let error = Err::<(), _>(Failure::Preflight(missing))
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
        let connect =
            anyhow::anyhow!("connection refused").context(Failure::Usage(Usage::Unreachable {
                target: "db:5432/registry".into(),
                hint: String::new(),
            }));
        assert_eq!(exit_code(&connect), 2);
    }

    /// Every refusal's message, word for word as operators and their scripts read it, from the
    /// values it carries.
    #[test]
    fn each_refusal_says_its_message_with_its_values() {
        let plan = || PathBuf::from("/tmp/plan.json");
        let fingerprint = |database: &str, standby: bool| Fingerprint {
            system_identifier: Some("7301".into()),
            host: "db".into(),
            port: 5432,
            database: database.into(),
            standby,
        };
        let cases = [
            (
                Failure::Usage(Usage::NoDatabase),
                "no database given: set DATABASE_URL or pass --database-url",
            ),
            (
                Failure::Usage(Usage::LeaveHeldWithoutPlan),
                "--leave-held needs --plan FILE: the held flips must have been reviewed; make a \
                 plan with --dry-run --plan-out, review it, then --apply --plan FILE --leave-held",
            ),
            (
                Failure::Usage(Usage::WrongDatabase {
                    connected: "scen".into(),
                    expected: "registry".into(),
                }),
                "connected to database 'scen' but --expect-database is 'registry': nothing was \
                 read; check DATABASE_URL",
            ),
            (
                Failure::Usage(Usage::NoSuchRun {
                    run_id: "atb-nope".into(),
                }),
                "no audit rows with run id 'atb-nope' and source 'backfill_script': list the runs \
                 with 'agent-type-backfill history'",
            ),
            (
                Failure::Usage(Usage::PlanUnreadable {
                    path: plan(),
                    cause: "No such file or directory (os error 2)".into(),
                }),
                "could not read the plan '/tmp/plan.json': No such file or directory (os error 2)",
            ),
            (
                Failure::Usage(Usage::NotAPlan {
                    path: plan(),
                    cause: "expected value at line 1 column 1".into(),
                }),
                "'/tmp/plan.json' is not a plan written by --plan-out: expected value at line 1 \
                 column 1",
            ),
            (
                Failure::Usage(Usage::PlanFormat {
                    path: plan(),
                    format: "agent-type-backfill plan v9".into(),
                }),
                "'/tmp/plan.json' has plan format 'agent-type-backfill plan v9', this tool reads \
                 'agent-type-backfill plan v1'",
            ),
            (
                Failure::Usage(Usage::PlanDigestMalformed {
                    path: plan(),
                    digest: serde_json::json!("md5:abc"),
                }),
                "the plan '/tmp/plan.json' has digest \"md5:abc\", not a 'sha256:' digest written \
                 by --plan-out: nothing was read or written; make a new plan with --dry-run \
                 --plan-out",
            ),
            (
                Failure::Usage(Usage::PlanChanged {
                    path: plan(),
                    actual: "sha256:5e".into(),
                    written: "sha256:ed".into(),
                }),
                "the plan '/tmp/plan.json' was changed after --plan-out wrote it: its content \
                 digests to sha256:5e, not the sha256:ed it was written with: nothing was read or \
                 written; a reviewed plan is applied only as written: make a new plan with \
                 --dry-run --plan-out (narrow what is written with --allow-transition or \
                 --max-flips, which the log records)",
            ),
            (
                Failure::Usage(Usage::PlanElsewhere {
                    made_on: Box::new(fingerprint("registry", true)),
                    here: Box::new(fingerprint("copy", false)),
                }),
                "the plan was made on host=db port=5432 database=registry system_identifier=7301 \
                 (a standby) but this is host=db port=5432 database=copy system_identifier=7301: \
                 nothing was written; make a new plan with --dry-run --plan-out against this \
                 database (a plan made on a standby applies on its primary only when both \
                 system_identifiers are readable: GRANT EXECUTE ON FUNCTION pg_control_system() \
                 to the user on the primary)",
            ),
            (
                Failure::Usage(Usage::PlanTooOld {
                    age: chrono::Duration::milliseconds(5_600),
                    max_age: chrono::Duration::seconds(1),
                }),
                "the plan is 5.6s old, more than --plan-max-age 1.0s: nothing was written; make a \
                 new plan with --dry-run --plan-out",
            ),
            (
                Failure::Usage(Usage::UrlWithoutScheme),
                "the database URL must start with postgres:// or postgresql://: check \
                 DATABASE_URL or --database-url",
            ),
            (
                Failure::Usage(Usage::UrlScheme {
                    scheme: "mysql".into(),
                }),
                "the database URL starts with 'mysql://', but only postgres:// and postgresql:// \
                 are PostgreSQL URLs: check DATABASE_URL or --database-url",
            ),
            (
                Failure::Usage(Usage::UrlUnparsable {
                    reason: "invalid port number".into(),
                }),
                "the database URL could not be parsed (invalid port number): check DATABASE_URL \
                 or --database-url",
            ),
            (
                Failure::Usage(Usage::ConnectOption {
                    key: "connect_timeout".into(),
                    value: "abc".into(),
                }),
                "invalid integer value 'abc' for connection option 'connect_timeout': give a \
                 whole number",
            ),
            (
                Failure::Usage(Usage::Unreachable {
                    target: "db:5432/registry".into(),
                    hint: " (the password came from the URL or PGPASSWORD)".into(),
                }),
                "could not connect to 'db:5432/registry': check DATABASE_URL, the network and the \
                 credentials (the password came from the URL or PGPASSWORD)",
            ),
            (
                Failure::Preflight(Preflight::Schema {
                    problems: vec![
                        "table 'member_profiles' is missing".into(),
                        "column 'agent_capabilities_snapshot.inferred_type' is missing".into(),
                    ],
                }),
                "preflight failed, nothing was read or written: table 'member_profiles' is \
                 missing; column 'agent_capabilities_snapshot.inferred_type' is missing; point \
                 DATABASE_URL at the registry database",
            ),
            (
                Failure::Preflight(Preflight::Access {
                    problems: vec!["this server is a read-only standby".into()],
                }),
                "preflight failed, nothing was read or written: this server is a read-only standby",
            ),
            (
                Failure::Preflight(Preflight::ReplicaLagUnreadable {
                    role: "writer".into(),
                }),
                "preflight failed, nothing was read or written: --max-replica-lag reads each \
                 standby's replay lag from pg_stat_replication, which shows it only to superusers \
                 and members of pg_read_all_stats, and user writer is neither: run GRANT \
                 pg_monitor TO writer (or pg_read_all_stats), or run without --max-replica-lag",
            ),
            (
                Failure::Preflight(Preflight::CrawlerLogUnreadable {
                    why: "no SELECT privilege on type_reclassification_log".into(),
                    user: "limited".into(),
                }),
                "preflight failed, nothing was read or written: --min-corroboration reads the \
                 crawler's rows in type_reclassification_log, but there is no SELECT privilege on \
                 type_reclassification_log: GRANT SELECT ON type_reclassification_log TO \
                 limited, or run without --min-corroboration",
            ),
        ];
        for (failure, message) in cases {
            assert_eq!(failure.to_string(), message);
            let expected = if matches!(failure, Failure::Usage(_)) {
                2
            } else {
                4
            };
            assert_eq!(failure.code(), expected, "{failure}");
        }
    }
}
