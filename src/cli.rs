//! The command line. Flag names, defaults and exit codes are a contract with the runbook.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::resolver::{is_valid_agent_type, VALID_AGENT_TYPES};

/// `0.1.0 (git 0123456789ab)`: the package version and the commit it was built from.
pub(crate) const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("AGENT_TYPE_BACKFILL_COMMIT"),
    ")"
);

/// What `--version` prints: the build, and the server rule it ports with that rule's vocabulary.
pub(crate) const VERSION_WITH_RULE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("AGENT_TYPE_BACKFILL_COMMIT"),
    ")\nrule: adcp resolveAgentTypes at 4439b18 \
     (brand, rights, measurement, governance, creative, sales, buying, signals, unknown)"
);

#[derive(Debug, Parser)]
#[command(
    name = "agent-type-backfill",
    version = VERSION_WITH_RULE,
    term_width = 100,
    max_term_width = 100,
    about = "Repairs stale agent types in member_profiles, auditing every change",
    long_about = "Loads every member_profiles row, runs the registry server's resolveAgentTypes \
rule over its agents array against agent_capabilities_snapshot, and prints (--dry-run) or writes \
(--apply) the disagreements, each audited in type_reclassification_log under one run id.",
    after_help = format!("{}\n{DURATIONS}\n\n{EXAMPLES}", crate::outcome::exit_code_help()),
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub backfill: BackfillArgs,
}

/// The grammar every DURATION flag takes (`parse_duration`), as `--help` states it.
const DURATIONS: &str = "Durations: a number with a unit (ms, s, m or min, h, d, w, or sec, minutes, \
hours, days, weeks),\n  \
parts added up (1h30m) or a fraction (1.5h). Refused: a bare number (PostgreSQL would read it as\n  \
milliseconds), months and years (their length varies), zero, and steps under 1ms. Timeouts go\n  \
up to 2147483647ms (about 24d), ages up to 3650d.";

/// The examples `--help` ends with, each a RUNBOOK step.
const EXAMPLES: &str = "Examples (RUNBOOK.md):\n  \
# 1. staging dry-run, log kept\n  \
DATABASE_URL=postgres://backfill@staging-db/registry agent-type-backfill --dry-run \\\n      \
--expect-database registry | tee staging-dry-run.log\n  \
# 3. staging apply, held to what the dry-run showed\n  \
agent-type-backfill --apply --max-flips 2 --allow-transition buying:sales | tee staging-apply.log\n  \
# 4. spot-check: a re-run finds nothing\n  \
agent-type-backfill --dry-run --max-flips 0\n  \
# rehearse the whole procedure on a throwaway local database\n  \
agent-type-backfill rehearse";

impl Cli {
    /// The URL this command connects to, whichever command it is: the one string a panic message
    /// must never quote.
    pub fn database_url(&self) -> Option<&str> {
        let connect = match &self.command {
            Some(Command::Revert(args)) => &args.connect,
            Some(Command::History(args)) => &args.connect,
            _ => &self.backfill.connect,
        };
        connect.database_url.as_deref()
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a throwaway local PostgreSQL, seed a realistic registry, run dry-run, apply and
    /// re-run through the real code paths, show their output and remove everything
    Rehearse(RehearseArgs),
    /// Undo one run: restore the old type of every element that still has the type that run
    /// wrote; elements changed since are reported as conflicts and left alone
    Revert(RevertArgs),
    /// List the backfill runs recorded in type_reclassification_log, or one run's rows
    History(HistoryArgs),
    /// Print shell completions to stdout (e.g. `completions bash > /etc/bash_completion.d/atb`)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout (e.g. `man > agent-type-backfill.1`)
    Man,
}

#[derive(Debug, Args)]
pub struct RehearseArgs {
    /// Ordinary profiles to seed beside the named stale, buying and junk ones
    #[arg(long, default_value_t = 300)]
    pub profiles: usize,

    /// Report format of the three runs
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct RevertArgs {
    /// The run to undo, as printed in its log header (atb-...)
    #[arg(value_name = "RUN_ID")]
    pub run_id: String,

    #[command(flatten)]
    pub mode: ModeArgs,

    #[command(flatten)]
    pub connect: ConnectOpts,

    #[command(flatten)]
    pub run: RunOpts,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Show this run's audit rows instead of the list of runs
    #[arg(value_name = "RUN_ID")]
    pub run_id: Option<String>,

    #[command(flatten)]
    pub connect: ConnectOpts,

    /// Output format on stdout: text, JSON lines, or Markdown for a ticket
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, Clone, Args)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub mode: ModeArgs,

    #[command(flatten)]
    pub connect: ConnectOpts,

    #[command(flatten)]
    pub run: RunOpts,

    /// Profiles the plan reads per chunk, each chunk in its own short read-only snapshot; lower
    /// it when a chunk runs past --statement-timeout or a standby cancels it
    #[arg(long, value_name = "N", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub chunk_size: u32,

    /// Chunks the plan reads at once, each job over its own range of ids on its own connection
    /// (the tool's pool holds three: one stays free to cancel them)
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub plan_jobs: u32,

    /// With --dry-run: also write the plan (every flip, counts, the target's fingerprint) to FILE
    /// as JSON, for review and for --apply --plan
    #[arg(long, value_name = "FILE", conflicts_with = "apply")]
    pub plan_out: Option<PathBuf>,

    /// With --apply: write only the flips of this reviewed plan that still hold exactly; list
    /// planned flips that no longer hold and new ones that were not planned, writing neither
    #[arg(long, value_name = "FILE", conflicts_with = "dry_run")]
    pub plan: Option<PathBuf>,

    /// With --apply --plan: write the reviewed plan's flips that are not held and still hold
    /// exactly, list each held flip as left unwritten with its reason, and exit 0
    #[arg(long)]
    pub leave_held: bool,

    /// Refuse a --plan older than this (e.g. 30min, 24h)
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_age, allow_hyphen_values = true)]
    pub plan_max_age: Duration,

    /// Only write flips of this transition, e.g. buying:sales (repeatable; 'buying->sales' quoted
    /// also works). Any other transition in the plan is reported and the run exits 3 with nothing
    /// written
    #[arg(long, value_name = "FROM:TO", value_parser = parse_transition, allow_hyphen_values = true)]
    pub allow_transition: Vec<Transition>,

    /// Hold (never write, exit 3) a flip decided by a snapshot probed longer ago than this
    /// (e.g. 7d, 48h); off by default
    #[arg(long, value_name = "DURATION", value_parser = parse_age, allow_hyphen_values = true)]
    pub max_probe_age: Option<Duration>,

    /// Hold (never write, exit 3) a flip from one known type to another that fewer than N of the
    /// crawler's own logged disagreements agree with; off by default
    #[arg(long, value_name = "N", value_parser = parse_count::<u64>, allow_hyphen_values = true)]
    pub min_corroboration: Option<u64>,
}

/// How a run that may write is bounded and reported; shared by the backfill and `revert`.
#[derive(Debug, Clone, Args)]
pub struct RunOpts {
    /// Abort without writing when the plan has more agent flips than this
    #[arg(long, value_name = "N", default_value_t = 25, value_parser = parse_count::<usize>, allow_hyphen_values = true)]
    pub max_flips: usize,

    /// Report format on stdout: a text run log, one JSON object per line, or Markdown for a ticket
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Profiles written per transaction, and candidate profiles read back per statement
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000), allow_hyphen_values = true)]
    pub batch_size: u32,

    /// Attempts at a batch that hits a lock or statement timeout before it is reported as not written
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100), allow_hyphen_values = true)]
    pub write_attempts: u32,

    /// With --apply: before each batch, wait while any streaming standby replays further behind
    /// than this (e.g. 5s, 1min); needs pg_monitor or pg_read_all_stats; off by default
    #[arg(long, value_name = "DURATION", value_parser = parse_age, allow_hyphen_values = true)]
    pub max_replica_lag: Option<Duration>,
}

#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct ModeArgs {
    /// Plan and print every flip inside a READ ONLY transaction; writes nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Plan, check the threshold, then write the flips and their audit rows
    #[arg(long)]
    pub apply: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectOpts {
    /// PostgreSQL URL of the registry; its password is never printed
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    pub database_url: Option<String>,

    /// Exit 2 before reading anything unless the connected database has this name
    #[arg(long, value_name = "NAME")]
    pub expect_database: Option<String>,

    /// How long one statement waits for a row lock before the batch is retried (e.g. 500ms, 5s)
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_server_timeout, allow_hyphen_values = true)]
    pub lock_timeout: Duration,

    /// Longest any single statement may run (e.g. 30s, 2min); each planning statement reads one
    /// chunk of --chunk-size profiles
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_server_timeout, allow_hyphen_values = true)]
    pub statement_timeout: Duration,
}

use crate::domain::{Format, Transition};

/// `FROM:TO`, which no shell mangles; `FROM->TO` too, for those who quote it. A bare `>` in a
/// shell redirects, so the colon is the spelling every message and document uses.
pub(crate) fn parse_transition(text: &str) -> Result<Transition, String> {
    let split = text.split_once("->").or_else(|| text.split_once(':'));
    match split {
        // The rule only ever writes a type of its vocabulary, so a `TO` outside it is a typo
        // that would refuse the real transition later. `FROM` is any stored type: legacy ones
        // such as `buyer` are what the backfill repairs.
        Some((_, to)) if !to.trim().is_empty() && !is_valid_agent_type(to.trim()) => Err(format!(
            "'{text}' names '{}', which the rule never writes: TO must be one of {}",
            to.trim(),
            VALID_AGENT_TYPES.join(", ")
        )),
        Some((from, to)) if !from.trim().is_empty() && !to.trim().is_empty() => {
            Ok(Transition::new(from.trim(), to.trim()))
        }
        _ => Err(format!(
            "'{text}' is not a transition: write it as FROM:TO, e.g. buying:sales"
        )),
    }
}

impl ModeArgs {
    pub fn mode(&self) -> crate::domain::Mode {
        if self.apply {
            crate::domain::Mode::Apply
        } else {
            crate::domain::Mode::DryRun
        }
    }
}

/// The longest timeout PostgreSQL takes: its timeouts are `int` milliseconds.
pub(crate) const MAX_SERVER_TIMEOUT: Duration = Duration::from_millis(2_147_483_647);

/// The longest age a guard takes: ten years, far past any probe or plan an operator reviews.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(3650 * 86_400);

/// `--lock-timeout`, `--statement-timeout`: a duration PostgreSQL can hold.
pub(crate) fn parse_server_timeout(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration > MAX_SERVER_TIMEOUT {
        return Err(format!(
            "'{text}' is longer than PostgreSQL allows for a timeout (2147483647ms, about 24d)"
        ));
    }
    Ok(duration)
}

/// `--plan-max-age`, `--max-probe-age`: a duration of at most ten years.
pub(crate) fn parse_age(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration > MAX_AGE {
        return Err(format!("'{text}' is longer than the 3650d this takes"));
    }
    Ok(duration)
}

/// What a refused duration is told to look like.
const DURATION_USAGE: &str =
    "use a number with a unit: ms, s, m or min, h, d or w (e.g. 500ms, 5s, 2min, 1h30m, 7d)";

/// Units whose length varies (humantime makes a month 30.44 days and a year 365.25), and `M`,
/// one shift-key away from `m` for minutes: refused, so that an age means one thing.
const VARYING_UNITS: [&str; 8] = ["M", "month", "months", "y", "yr", "yrs", "year", "years"];

/// A duration in humantime's grammar (`250ms`, `5s`, `2min`, `1h30m`, `1.5h`, `7d`, `2w`, and
/// the long forms such as `sec`, `hours`, `days`), the Rust command-line convention, with what
/// an operator and PostgreSQL need on top. A bare number is refused: PostgreSQL reads one as
/// milliseconds and people as seconds. Months and years are refused (see [`VARYING_UNITS`]), as
/// are zero and anything finer than a millisecond, the unit PostgreSQL's timeouts are set in:
/// `500us` would be sent as `0`, which turns the timeout off.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err(format!("'{text}' is negative: {DURATION_USAGE}"));
    }
    let no_unit = || {
        format!("'{text}' has no unit (PostgreSQL would read it as milliseconds): {DURATION_USAGE}")
    };
    // humantime takes a lone `0` for zero; PostgreSQL would read it as milliseconds too.
    if trimmed == "0" {
        return Err(no_unit());
    }
    let duration = humantime::parse_duration(trimmed).map_err(|error| match error {
        humantime::DurationError::UnknownUnit { unit, .. } if unit.is_empty() => {
            if trimmed.contains(|c: char| c.is_alphabetic()) {
                format!("'{text}' ends in a number with no unit: {DURATION_USAGE}")
            } else {
                no_unit()
            }
        }
        humantime::DurationError::UnknownUnit { unit, .. } => {
            format!("'{text}' has an unknown unit '{unit}': {DURATION_USAGE}")
        }
        humantime::DurationError::NumberOverflow => {
            format!("'{text}' is too long a duration, or finer than a nanosecond")
        }
        _ => format!("'{text}' is not a duration: {DURATION_USAGE}"),
    })?;
    if let Some(unit) = trimmed
        .split(|c: char| !c.is_alphabetic())
        .find(|unit| VARYING_UNITS.contains(unit))
    {
        return Err(format!(
            "'{text}' counts in '{unit}' (months or years), whose length varies: use days or \
             weeks (e.g. 30d, 52w)"
        ));
    }
    if duration.is_zero() {
        return Err(format!("'{text}' must be longer than zero"));
    }
    if duration.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!(
            "'{text}' is finer than a millisecond, the smallest step PostgreSQL's timeouts take"
        ));
    }
    Ok(duration)
}

/// A count of 0 or more, saying so when given anything else (`-1` included, which clap would
/// otherwise take for an unknown flag).
pub(crate) fn parse_count<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a count: use a whole number, 0 or more"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_humantimes_grammar_to_whole_milliseconds() {
        let accepted = [
            ("250ms", Duration::from_millis(250)),
            ("5s", Duration::from_secs(5)),
            ("5sec", Duration::from_secs(5)),
            (" 5 s ", Duration::from_secs(5)),
            ("2min", Duration::from_secs(120)),
            ("2m", Duration::from_secs(120)),
            ("2 minutes", Duration::from_secs(120)),
            ("1h30m", Duration::from_secs(5400)),
            ("1h 30min", Duration::from_secs(5400)),
            ("1.5h", Duration::from_secs(5400)),
            ("1.5s", Duration::from_millis(1500)),
            ("48hours", Duration::from_secs(48 * 3600)),
            ("7d", Duration::from_secs(7 * 86_400)),
            ("7 days", Duration::from_secs(7 * 86_400)),
            ("2w", Duration::from_secs(14 * 86_400)),
            ("1000us", Duration::from_millis(1)),
        ];
        for (text, expected) in accepted {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn durations_refused_say_why_quoting_the_value() {
        let refused = [
            // PostgreSQL reads a bare number as milliseconds, people as seconds.
            (
                "7",
                "has no unit (PostgreSQL would read it as milliseconds)",
            ),
            (
                "0",
                "has no unit (PostgreSQL would read it as milliseconds)",
            ),
            (
                "1.5",
                "has no unit (PostgreSQL would read it as milliseconds)",
            ),
            ("5s 3", "ends in a number with no unit"),
            ("-1s", "is negative"),
            ("-0s", "is negative"),
            ("0s", "must be longer than zero"),
            ("0h 0ms", "must be longer than zero"),
            // `500us` would be sent to PostgreSQL as 0, no timeout at all.
            ("500us", "finer than a millisecond"),
            ("0.5ms", "finer than a millisecond"),
            ("1.0005s", "finer than a millisecond"),
            ("1M", "'M' (months or years), whose length varies"),
            ("2months", "'months' (months or years)"),
            ("1y", "'y' (months or years)"),
            ("1d 1year", "'year' (months or years)"),
            ("5 fortnights", "unknown unit 'fortnights'"),
            ("5S", "unknown unit 'S'"),
            ("fast", "is not a duration"),
            ("", "is not a duration"),
            ("99999999999999999999s", "too long a duration"),
        ];
        for (text, says) in refused {
            let message = parse_duration(text).unwrap_err();
            assert!(message.starts_with(&format!("'{text}' ")), "{message}");
            assert!(message.contains(says), "{text}: {message}");
        }
    }

    #[test]
    fn timeouts_end_at_postgresqls_limit_and_ages_at_ten_years() {
        assert_eq!(parse_server_timeout("2147483647ms"), Ok(MAX_SERVER_TIMEOUT));
        assert_eq!(
            parse_server_timeout("24d 20h 31m 23s 647ms"),
            Ok(MAX_SERVER_TIMEOUT)
        );
        for text in ["2147483648ms", "25d", "99999999999h"] {
            let message = parse_server_timeout(text).unwrap_err();
            assert!(
                message.starts_with(&format!("'{text}' is longer than PostgreSQL allows")),
                "{message}"
            );
        }
        assert_eq!(parse_age("3650d"), Ok(MAX_AGE));
        assert!(parse_age("521w").is_ok());
        for text in ["3651d", "522w"] {
            let message = parse_age(text).unwrap_err();
            assert_eq!(
                message,
                format!("'{text}' is longer than the 3650d this takes")
            );
        }
        // The grammar's refusals hold for both.
        assert!(parse_server_timeout("5").unwrap_err().contains("no unit"));
        assert!(parse_age("1y").unwrap_err().contains("length varies"));
    }

    #[test]
    fn transitions_parse_as_from_colon_to_or_from_arrow_to() {
        for spelling in ["buying:sales", "buying->sales", " buying : sales "] {
            let parsed = parse_transition(spelling).unwrap();
            assert_eq!(
                (parsed.from.as_str(), parsed.to.as_str()),
                ("buying", "sales"),
                "{spelling}"
            );
        }
        assert_eq!(
            parse_transition("buying:sales").unwrap().to_string(),
            "buying:sales"
        );
        assert!(parse_transition("buying").is_err());
        assert!(parse_transition("->sales").is_err());
        assert!(parse_transition(":sales").is_err());
        let message = parse_transition("buying>sales").unwrap_err();
        assert!(message.contains("buying:sales"), "{message}");
        // A legacy stored type may be FROM; TO must be a type the rule writes.
        assert!(parse_transition("buyer:unknown").is_ok());
        let message = parse_transition("buying:sale").unwrap_err();
        assert!(
            message.contains("'sale'") && message.contains("sales, buying"),
            "{message}"
        );
    }

    #[test]
    fn version_names_the_ported_rule_and_its_vocabulary() {
        let rule = VERSION_WITH_RULE.lines().nth(1).unwrap();
        assert_eq!(
            rule,
            format!("rule: {}", crate::events::Rule::ported().short())
        );
    }

    #[test]
    fn every_command_that_connects_names_its_url_for_redaction() {
        let url = "postgres://backfill:s3cret@db/registry";
        for argv in [
            vec!["agent-type-backfill", "--dry-run", "--database-url", url],
            vec![
                "agent-type-backfill",
                "revert",
                "atb-x",
                "--dry-run",
                "--database-url",
                url,
            ],
            vec!["agent-type-backfill", "history", "--database-url", url],
        ] {
            let cli = Cli::try_parse_from(&argv).unwrap();
            assert_eq!(cli.database_url(), Some(url), "{argv:?}");
        }
    }

    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
