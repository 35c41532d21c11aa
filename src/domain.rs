//! The words every layer shares (what a run does, how it prints, a type change, what names a
//! flip, why one is held or skipped, what the crawler says of it, where the tool is connected),
//! defined here so that neither the command line, the log, the guards nor the database layer
//! depend on one another for them. This module depends on nothing else in the crate but the
//! rule's [`Flip`].

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};

use serde::{Deserialize, Serialize, Serializer};
use uuid::Uuid;

use crate::resolver::Flip;

/// Whether a run may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    DryRun,
    Apply,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::DryRun => "dry-run",
            Mode::Apply => "apply",
        }
    }
}

/// How the run report is printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Markdown,
}

/// One type change, `FROM:TO`: what `--allow-transition` names and what the summary counts.
/// `from` is the stored type as an operator reads it (a string bare, any other JSON as JSON).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Transition {
    pub from: String,
    pub to: String,
}

impl Transition {
    pub fn new(from: impl Into<String>, to: impl Into<String>) -> Transition {
        Transition {
            from: from.into(),
            to: to.into(),
        }
    }
}

/// `FROM:TO`, the spelling every message and document uses (no shell mangles a colon).
impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.from, self.to)
    }
}

/// The JSON summary's `transitions` keys have always been `from->to`; scripts read them, so the
/// wire spelling stays while every message says `FROM:TO`.
impl Serialize for Transition {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}->{}", self.from, self.to))
    }
}

/// A flip where it is: the rule's flip of one element and the profile holding it. Every shape a
/// flip takes (the plan's, the log line's, the plan file's entry, the audit row being written)
/// carries this one value, so what names a flip and its JSON field names (`profile_id`,
/// `profile`, `index`, `url`, `from`, `to`) are defined here alone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProfileFlip {
    pub profile_id: Uuid,
    /// The profile as the log names it: its slug, or its id when it has none.
    pub profile: String,
    #[serde(flatten)]
    pub flip: Flip,
}

impl ProfileFlip {
    pub fn new(profile_id: Uuid, profile: impl Into<String>, flip: Flip) -> ProfileFlip {
        ProfileFlip {
            profile_id,
            profile: profile.into(),
            flip,
        }
    }

    /// The element it is in: a flip's identity across a plan, a reviewed plan and a write.
    pub fn element(&self) -> (Uuid, usize) {
        (self.profile_id, self.flip.index)
    }

    /// The same change at the same element, whatever the profile is called now: how a
    /// reviewed plan's flip is found again. The flip is compared whole, as the locked recheck
    /// compares it, so a field added to `Flip` is compared here too.
    pub(crate) fn same_change(&self, other: &ProfileFlip) -> bool {
        self.profile_id == other.profile_id && self.flip == other.flip
    }
}

/// A count as the log prints it. Lengths and counts never come near `u64::MAX`; saturating keeps
/// the one conversion in one place instead of an `unwrap_or` at every call site.
pub fn count(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// A duration in whole milliseconds, as logs print one; saturating, like [`count`].
pub(crate) fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A timestamp as the log, the plan file and the audit notes print it: whole seconds, `Z`.
pub(crate) fn rfc3339(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub(crate) fn seconds<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&rfc3339(at))
}

pub(crate) fn optional_seconds<S: Serializer>(
    at: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => serializer.serialize_str(&rfc3339(at)),
        None => serializer.serialize_none(),
    }
}

/// What the crawler's own log says about a flip: how many of its rows for the url agree with the
/// flip's new type, when the first and last of those were logged, and what its latest row saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CrawlerEvidence {
    pub count: Option<u64>,
    #[serde(serialize_with = "optional_seconds")]
    pub first_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "optional_seconds")]
    pub last_at: Option<DateTime<Utc>>,
    pub last_inferred: Option<String>,
    /// Why the log could not be read; the other fields are then null.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

impl CrawlerEvidence {
    pub fn unavailable(why: &str) -> CrawlerEvidence {
        CrawlerEvidence {
            count: None,
            first_at: None,
            last_at: None,
            last_inferred: None,
            unavailable: Some(why.to_owned()),
        }
    }

    /// Agreeing rows; none when the log could not be read.
    pub fn agreeing(&self) -> u64 {
        self.count.unwrap_or(0)
    }
}

/// Why a flip is held: the rule found it, but something says the rule may be wrong about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldReason {
    /// The snapshot, or the stored type, names a type this tool's rule does not know: the
    /// server (and its crawler) may be newer than the port.
    UnrecognisedInferredType,
    /// The snapshot, or the stored type, names a type the server once accepted and has since
    /// retired: the probe predates the retirement.
    RetiredInferredType,
    /// The snapshot behind the flip is older than `--max-probe-age`.
    StaleProbe,
    /// A reclassification with fewer agreeing crawler rows than `--min-corroboration`.
    Uncorroborated,
}

impl HoldReason {
    /// As JSON names it.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::UnrecognisedInferredType => "unrecognised_inferred_type",
            HoldReason::RetiredInferredType => "retired_inferred_type",
            HoldReason::StaleProbe => "stale_probe",
            HoldReason::Uncorroborated => "uncorroborated",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            HoldReason::UnrecognisedInferredType => {
                "type unknown to this tool's rule; the server may be newer: stop"
            }
            HoldReason::RetiredInferredType => {
                "type the server has retired; the probe predates the retirement: re-probe the \
                 agent (the crawler's manual refresh) or follow the server and demote it"
            }
            HoldReason::StaleProbe => "probe older than --max-probe-age",
            HoldReason::Uncorroborated => "fewer crawler rows agree than --min-corroboration",
        }
    }
}

/// Why a guard holds a flip back: the reason, and the type outside the rule's vocabulary behind
/// an `unrecognised_inferred_type` or `retired_inferred_type` hold. Its JSON fields are the held
/// line's `reason` and `inferred_type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hold {
    pub reason: HoldReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inferred_type: Option<String>,
}

impl Hold {
    pub(crate) fn because(reason: HoldReason) -> Hold {
        Hold {
            reason,
            inferred_type: None,
        }
    }
}

/// Why a planned flip was not written, or a found flip was not planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The profile or its snapshot changed between plan and write; the flip no longer holds.
    ChangedSincePlan,
    /// The profile was deleted between plan and write.
    ProfileGone,
    /// Found while writing but absent from the plan; left for the next run.
    Unplanned,
    /// The batch kept hitting lock or statement timeouts and was rolled back.
    NotWrittenTimeout,
    /// `revert`: the element no longer carries the type the reverted run wrote.
    ChangedSinceRun,
    /// A reviewed flip whose element already carries the reviewed type: an earlier apply of the
    /// same plan wrote it (its note names the run where the audit table may be read), or a
    /// member or the server did.
    AlreadyWritten,
}

impl SkipReason {
    pub const ALL: [SkipReason; 6] = [
        SkipReason::ChangedSincePlan,
        SkipReason::ProfileGone,
        SkipReason::Unplanned,
        SkipReason::NotWrittenTimeout,
        SkipReason::ChangedSinceRun,
        SkipReason::AlreadyWritten,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::ChangedSincePlan => "changed_since_plan",
            SkipReason::ProfileGone => "profile_gone",
            SkipReason::Unplanned => "unplanned",
            SkipReason::NotWrittenTimeout => "not_written_timeout",
            SkipReason::ChangedSinceRun => "changed_since_run",
            SkipReason::AlreadyWritten => "already_written",
        }
    }

    /// What a skipped line says.
    pub fn describe(self) -> &'static str {
        match self {
            SkipReason::ChangedSincePlan => "changed since plan, not written",
            SkipReason::ProfileGone => "profile deleted since plan, not written",
            SkipReason::Unplanned => "new since plan, not written; the next run will find it",
            SkipReason::NotWrittenTimeout => "lock or statement timeout, not written; rerun",
            SkipReason::ChangedSinceRun => "changed since that run, conflict left alone",
            SkipReason::AlreadyWritten => "already written, not written again",
        }
    }

    /// How the summary counts it.
    pub(crate) fn summary_label(self) -> &'static str {
        match self {
            SkipReason::ChangedSincePlan => "skipped (changed since plan)",
            SkipReason::ProfileGone => "skipped (profile deleted)",
            SkipReason::Unplanned => "new since plan (not written)",
            SkipReason::NotWrittenTimeout => "skipped (timeout)",
            SkipReason::ChangedSinceRun => "conflicts (changed since run)",
            SkipReason::AlreadyWritten => "skipped (already written)",
        }
    }
}

/// Where the tool is connected, as printed in the run log header. Never holds the password.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "host={} port={} database={} user={}",
            self.host, self.port, self.database, self.user
        )
    }
}
